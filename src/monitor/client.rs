//! The daemon's client of a monitor's control socket (tokio). Each call is
//! one connection, bounded by the client's timeout; `attach` keeps its
//! connection and streams until the container exits or either side leaves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::MonitorError;
use super::framing::{MAX_FRAME, STDIN_CHUNK, encode_frame};
use super::proto::{
    self, AttachInput, AttachOutput, Request, Response, StatusReply, attach_input, request,
};
use crate::logs::Stream;

/// The default bound on a control call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct MonitorClient {
    socket: PathBuf,
    timeout: Duration,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct AttachOptions {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl MonitorClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: CALL_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Releases the parked container to execve.
    pub async fn start(&self) -> Result<StatusReply, MonitorError> {
        let response = self
            .call("start container", request::Kind::Start(proto::Start {}))
            .await?;
        self.status_of(response)
    }

    pub async fn status(&self) -> Result<StatusReply, MonitorError> {
        let response = self
            .call("container status", request::Kind::Status(proto::Status {}))
            .await?;
        self.status_of(response)
    }

    pub async fn resize(&self, width: u32, height: u32) -> Result<(), MonitorError> {
        self.call(
            "resize terminal",
            request::Kind::Resize(proto::Resize { width, height }),
        )
        .await
        .map(drop)
    }

    pub async fn reopen_log(&self) -> Result<(), MonitorError> {
        self.call(
            "reopen container log",
            request::Kind::ReopenLog(proto::ReopenLog {}),
        )
        .await
        .map(drop)
    }

    pub async fn signal(&self, signal: Signal) -> Result<(), MonitorError> {
        let signal = proto::Signal {
            signal: signal as i32,
        };
        self.call("signal container", request::Kind::Signal(signal))
            .await
            .map(drop)
    }

    /// Attaches to the container's stdio. The handshake is bounded; the
    /// stream itself is not.
    pub async fn attach(&self, options: AttachOptions) -> Result<Attached, MonitorError> {
        let attach = request::Kind::Attach(proto::Attach {
            stdin: options.stdin,
            stdout: options.stdout,
            stderr: options.stderr,
        });
        let (read, write, response) = tokio::time::timeout(self.timeout, self.exchange(attach))
            .await
            .map_err(|_| MonitorError::Timeout {
                op: "attach",
                after: self.timeout,
            })??;
        self.check(response)?;
        Ok(Attached {
            reader: AttachReader {
                socket: self.socket.clone(),
                read,
            },
            writer: AttachWriter {
                socket: self.socket.clone(),
                write,
            },
        })
    }

    async fn call(&self, op: &'static str, kind: request::Kind) -> Result<Response, MonitorError> {
        let (_, _, response) = tokio::time::timeout(self.timeout, self.exchange(kind))
            .await
            .map_err(|_| MonitorError::Timeout {
                op,
                after: self.timeout,
            })??;
        self.check(response)
    }

    async fn exchange(
        &self,
        kind: request::Kind,
    ) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf, Response), MonitorError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| MonitorError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut frame = Vec::new();
        encode_frame(&Request { kind: Some(kind) }, &mut frame);
        write.write_all(&frame).await.map_err(|e| self.io(e))?;
        let response = read_frame::<Response, _>(&mut read, &self.socket)
            .await?
            .ok_or_else(|| MonitorError::Protocol {
                path: self.socket.clone(),
                message: "connection closed before the response".into(),
            })?;
        Ok((read, write, response))
    }

    fn check(&self, response: Response) -> Result<Response, MonitorError> {
        if response.error.is_empty() {
            Ok(response)
        } else {
            Err(MonitorError::Refused {
                path: self.socket.clone(),
                message: response.error,
            })
        }
    }

    fn status_of(&self, response: Response) -> Result<StatusReply, MonitorError> {
        response.status.ok_or_else(|| MonitorError::Protocol {
            path: self.socket.clone(),
            message: "response without status".into(),
        })
    }

    fn io(&self, source: std::io::Error) -> MonitorError {
        MonitorError::Io {
            path: self.socket.clone(),
            source,
        }
    }
}

/// An attach session; split it to read and write from different tasks.
pub struct Attached {
    pub reader: AttachReader,
    pub writer: AttachWriter,
}

impl Attached {
    pub fn into_split(self) -> (AttachReader, AttachWriter) {
        (self.reader, self.writer)
    }
}

pub struct AttachReader {
    socket: PathBuf,
    read: BufReader<OwnedReadHalf>,
}

pub struct AttachWriter {
    socket: PathBuf,
    write: OwnedWriteHalf,
}

impl AttachReader {
    /// The next chunk of output; None when the container has exited and
    /// everything was delivered (or the monitor went away).
    pub async fn next(&mut self) -> Result<Option<(Stream, Vec<u8>)>, MonitorError> {
        let Some(output) = read_frame::<AttachOutput, _>(&mut self.read, &self.socket).await?
        else {
            return Ok(None);
        };
        let stream = match proto::Stream::try_from(output.stream) {
            Ok(proto::Stream::Stderr) => Stream::Stderr,
            _ => Stream::Stdout,
        };
        Ok(Some((stream, output.data)))
    }
}

impl AttachWriter {
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), MonitorError> {
        for chunk in data.chunks(STDIN_CHUNK) {
            self.send(attach_input::Kind::Stdin(chunk.to_vec())).await?;
        }
        Ok(())
    }

    /// No more input from this attacher; with stdin_once (and no tty) the
    /// container's stdin is closed.
    pub async fn close_stdin(&mut self) -> Result<(), MonitorError> {
        self.send(attach_input::Kind::CloseStdin(true)).await
    }

    pub async fn resize(&mut self, width: u32, height: u32) -> Result<(), MonitorError> {
        self.send(attach_input::Kind::Resize(proto::Resize { width, height }))
            .await
    }

    async fn send(&mut self, kind: attach_input::Kind) -> Result<(), MonitorError> {
        let mut frame = Vec::new();
        encode_frame(&AttachInput { kind: Some(kind) }, &mut frame);
        self.write
            .write_all(&frame)
            .await
            .map_err(|source| MonitorError::Io {
                path: self.socket.clone(),
                source,
            })
    }
}

/// Reads one length-delimited message; None at a clean EOF before it.
async fn read_frame<M: Message + Default, R: AsyncRead + Unpin>(
    read: &mut R,
    socket: &Path,
) -> Result<Option<M>, MonitorError> {
    let io = |source| MonitorError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut len: u64 = 0;
    for i in 0..10 {
        let byte = match read.read_u8().await {
            Ok(b) => b,
            Err(e) if i == 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > MAX_FRAME {
                break;
            }
            let mut buf = vec![0; len];
            read.read_exact(&mut buf).await.map_err(io)?;
            return M::decode(buf.as_slice())
                .map(Some)
                .map_err(|e| MonitorError::Protocol {
                    path: socket.to_path_buf(),
                    message: format!("decode message: {e}"),
                });
        }
    }
    Err(MonitorError::Protocol {
        path: socket.to_path_buf(),
        message: "malformed or oversized frame".into(),
    })
}
