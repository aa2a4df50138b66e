//! The daemon's [`Runtime`]: exec through `berth exec-helper` (pipes or a
//! pty), attach through the container's monitor, port connections dialled
//! from a thread inside the pod's network namespace.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::debug;

use super::io::{BoxRead, BoxWrite, RemoteIo, TerminalSize};
use super::{Outcome, Runtime};
use crate::container::ContainerManager;
use crate::container::exec::{ExecExit, ExecProcess};
use crate::logs::Stream;
use crate::monitor::{AttachOptions, AttachReader, AttachWriter};
use crate::sandbox::SandboxManager;

/// Output still buffered when an exec'd process exits gets this long to
/// arrive (a background child may hold the pipes open for ever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long a dial inside the pod may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The end of stderr kept to find the exec helper's own error line.
const STDERR_TAIL: usize = 4096;

pub struct DaemonRuntime {
    containers: Arc<ContainerManager>,
    sandboxes: Arc<SandboxManager>,
}

impl DaemonRuntime {
    pub fn new(containers: Arc<ContainerManager>, sandboxes: Arc<SandboxManager>) -> Self {
        DaemonRuntime {
            containers,
            sandboxes,
        }
    }
}

impl Runtime for DaemonRuntime {
    fn exec(
        &self,
        container_id: String,
        cmd: Vec<String>,
        io: RemoteIo,
    ) -> BoxFuture<'static, Outcome> {
        let containers = self.containers.clone();
        Box::pin(async move {
            let process = containers
                .exec_interactive(&container_id, &cmd, io.stdin.is_some(), io.tty)
                .await;
            match process {
                Ok(process) => match run_exec(process, io).await {
                    Ok(ExecExit::Exited(code)) => Outcome::exited(&cmd, code),
                    Ok(ExecExit::Failed(message)) => Outcome::exec_failed(message),
                    Err(e) => Outcome::exec_failed(e),
                },
                Err(e) => Outcome::exec_failed(e),
            }
        })
    }

    fn attach(&self, container_id: String, io: RemoteIo) -> BoxFuture<'static, Outcome> {
        let containers = self.containers.clone();
        Box::pin(async move {
            match run_attach(&containers, &container_id, io).await {
                Ok(()) => Outcome::Success,
                Err(e) => Outcome::attach_failed(e),
            }
        })
    }

    fn dial(
        &self,
        pod_id: String,
        port: u16,
    ) -> BoxFuture<'static, Result<tokio::net::TcpStream, String>> {
        let sandboxes = self.sandboxes.clone();
        Box::pin(async move {
            let pod = sandboxes.get(&pod_id).await.map_err(|e| e.to_string())?;
            let connect = move || connect_localhost(port);
            let stream = match sandboxes.namespace_path(&pod, "net") {
                Some(netns) => {
                    crate::network::netns::run_in(&netns.clone(), "port-forward", move || {
                        connect().map_err(|message| crate::network::NetworkError::Netns {
                            op: "port-forward".to_string(),
                            path: netns,
                            error: std::io::Error::other(message),
                        })
                    })
                    .await
                    .map_err(|e| format!("inside the network namespace of pod {}: {e}", pod.id))?
                }
                // hostNetwork: the pod's localhost is the node's.
                None => tokio::task::spawn_blocking(connect)
                    .await
                    .map_err(|e| e.to_string())??,
            };
            stream.set_nonblocking(true).map_err(|e| e.to_string())?;
            tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())
        })
    }
}

/// `localhost:port` over IPv4, then IPv6, as containerd.
fn connect_localhost(port: u16) -> Result<std::net::TcpStream, String> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v4_err = match TcpStream::connect_timeout(&v4, DIAL_TIMEOUT) {
        Ok(stream) => return Ok(stream),
        Err(e) => e,
    };
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&v6, DIAL_TIMEOUT).map_err(|v6_err| {
        format!("failed to connect to localhost:{port}, IPv4: {v4_err} IPv6: {v6_err}")
    })
}

/// Copies `from` to `to` until EOF and shuts `to` down; Err when the
/// writer (the client) is gone. Returns the last [`STDERR_TAIL`] bytes.
async fn pump(mut from: impl AsyncRead + Unpin, mut to: BoxWrite) -> (Result<(), ()>, Vec<u8>) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut tail = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tail.extend_from_slice(&buf[..n]);
        let excess = tail.len().saturating_sub(STDERR_TAIL);
        tail.drain(..excess);
        if to.write_all(&buf[..n]).await.is_err() {
            return (Err(()), tail);
        }
    }
    let _ = to.shutdown().await;
    (Ok(()), tail)
}

/// Where output goes that the client did not ask for: read and dropped,
/// so that the process never blocks on a full pipe.
fn discard() -> BoxWrite {
    Box::new(tokio::io::sink())
}

/// Feeds the client's stdin to `to`; closes `to` at EOF.
async fn feed(mut from: BoxRead, mut to: impl AsyncWrite + Unpin) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Stdout,
    Stderr,
}

async fn run_exec(
    mut process: ExecProcess,
    io: RemoteIo,
) -> Result<ExecExit, crate::container::exec::ExecError> {
    let RemoteIo {
        stdin,
        stdout,
        stderr,
        resize,
        tty: _,
    } = io;
    // Input and resizes end with the process; outputs are drained.
    let mut inputs = tokio::task::JoinSet::new();
    let mut outputs = tokio::task::JoinSet::new();
    if let Some(pty) = process.pty.take() {
        let out = stdout.unwrap_or_else(discard);
        let reader = pty.clone();
        outputs.spawn(async move { (Output::Stdout, pump(reader, out).await) });
        if let Some(stdin) = stdin {
            let writer = pty.clone();
            // A terminal has no EOF to pass on: the client's end is ignored.
            inputs.spawn(async move {
                let mut stdin = stdin;
                let mut writer = writer;
                let _ = tokio::io::copy(&mut stdin, &mut writer).await;
            });
        }
        if let Some(mut resize) = resize {
            inputs.spawn(async move {
                while let Some(size) = resize.recv().await {
                    if size.width > 0
                        && size.height > 0
                        && let Err(e) = pty.resize(size.width, size.height)
                    {
                        debug!("exec: resize terminal: {e}");
                    }
                }
            });
        }
    } else {
        if let (Some(stdin), Some(pipe)) = (stdin, process.stdin.take()) {
            inputs.spawn(feed(stdin, pipe));
        }
        if let Some(pipe) = process.stdout.take() {
            let out = stdout.unwrap_or_else(discard);
            outputs.spawn(async move { (Output::Stdout, pump(pipe, out).await) });
        }
        if let Some(pipe) = process.stderr.take() {
            let out = stderr.unwrap_or_else(discard);
            outputs.spawn(async move { (Output::Stderr, pump(pipe, out).await) });
        }
    }
    let helper = process.helper_pid();
    let mut stderr_tail = Vec::new();
    let code = {
        let wait = process.wait_code();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                code = &mut wait => break code?,
                Some(joined) = outputs.join_next(), if !outputs.is_empty() => {
                    if let Ok((which, (result, tail))) = joined {
                        if which == Output::Stderr {
                            stderr_tail = tail;
                        }
                        if result.is_err() {
                            debug!("exec: the client is gone; ending the process");
                            crate::container::exec::terminate(helper);
                        }
                    }
                }
            }
        }
    };
    inputs.abort_all();
    let drained = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
        while let Some(joined) = outputs.join_next().await {
            if let Ok((Output::Stderr, (_, tail))) = joined {
                stderr_tail = tail;
            }
        }
    })
    .await;
    if drained.is_err() {
        debug!("exec: output still open {DRAIN_AFTER_EXIT:?} after exit; closed");
        outputs.abort_all();
    }
    Ok(process.finish(code, &stderr_tail).await)
}

async fn run_attach(
    containers: &ContainerManager,
    id: &str,
    io: RemoteIo,
) -> Result<(), crate::container::ContainerError> {
    let (client, _tty) = containers.attach_target(id).await?;
    let RemoteIo {
        stdin,
        stdout,
        stderr,
        resize,
        tty,
    } = io;
    let attached = client
        .attach(AttachOptions {
            stdin: stdin.is_some(),
            stdout: stdout.is_some(),
            stderr: stderr.is_some(),
        })
        .await?;
    let (reader, writer) = attached.into_split();
    let input = tokio::spawn(attach_input(writer, stdin, resize));
    match attach_output(reader, stdout, stderr, tty) {
        Some(output) => {
            output.await;
            input.abort();
        }
        // Only stdin: the session lasts as long as the client sends.
        None => {
            let _ = input.await;
        }
    }
    Ok(())
}

/// The client's stdin and resizes into the monitor; at stdin EOF the
/// monitor closes the container's stdin if the container is `stdin_once`.
async fn attach_input(
    mut writer: AttachWriter,
    stdin: Option<BoxRead>,
    resize: Option<mpsc::Receiver<TerminalSize>>,
) {
    let mut stdin = stdin;
    let mut resize = resize;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            read = async {
                match stdin.as_mut() {
                    Some(s) => s.read(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => {
                match read {
                    Ok(n) if n > 0 => {
                        if writer.write_stdin(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    _ => {
                        stdin = None;
                        if writer.close_stdin().await.is_err() {
                            return;
                        }
                        if resize.is_none() {
                            return;
                        }
                    }
                }
            }
            size = async {
                match resize.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match size {
                    Some(size) if size.width > 0 && size.height > 0 => {
                        if writer.resize(u32::from(size.width), u32::from(size.height)).await.is_err() {
                            return;
                        }
                    }
                    Some(_) => {}
                    None => {
                        resize = None;
                        if stdin.is_none() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// The container's output to the client until the container exits or the
/// client is gone. None when the client asked for no output.
fn attach_output(
    mut reader: AttachReader,
    stdout: Option<BoxWrite>,
    stderr: Option<BoxWrite>,
    tty: bool,
) -> Option<BoxFuture<'static, ()>> {
    if stdout.is_none() && stderr.is_none() {
        return None;
    }
    let mut stdout = stdout;
    let mut stderr = stderr;
    Some(Box::pin(async move {
        loop {
            let (stream, data) = match reader.next().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    debug!("attach: {e}");
                    break;
                }
            };
            let target = match (stream, tty) {
                (Stream::Stderr, false) => stderr.as_mut(),
                _ => stdout.as_mut(),
            };
            if let Some(target) = target
                && target.write_all(&data).await.is_err()
            {
                break;
            }
        }
        for w in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
            let _ = w.shutdown().await;
        }
    }))
}
