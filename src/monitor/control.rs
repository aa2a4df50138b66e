//! The control socket: requests from the daemon (`proto/monitor.proto`),
//! and attach sessions that get the container's output and feed its stdin.
//! Connections are non-blocking; a slow attacher loses output (counted)
//! rather than slowing the container or the log.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::poll::PollFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

use super::framing::{MAX_INBOUND_FRAME, encode_frame, take_frame};
use super::now_ns;
use super::proto::{
    self, AttachInput, AttachOutput, Request, Response, StatusReply, attach_input, request,
};
use super::supervisor::Supervisor;
use crate::executor;
use crate::logs::LogWriter;
use crate::logs::Stream;

/// Output queued for one attacher before its chunks are dropped.
const ATTACH_OUT_LIMIT: usize = 256 * 1024;

/// How long the exiting monitor waits for each attacher to take the rest.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// The exit code of a container whose start failed (containerd's
/// `errorStartExitCode`), with reason `StartError`.
const START_ERROR_EXIT_CODE: i32 = 128;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Control,
    Attach {
        stdin: bool,
        stdout: bool,
        stderr: bool,
    },
}

pub struct Conn {
    pub stream: UnixStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    mode: Mode,
    pub closed: bool,
    dropped_chunks: u64,
}

impl Conn {
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            inbuf: Vec::new(),
            out: Vec::new(),
            mode: Mode::Control,
            closed: false,
            dropped_chunks: 0,
        })
    }

    pub fn sends_stdin(&self) -> bool {
        matches!(self.mode, Mode::Attach { stdin: true, .. })
    }

    pub fn is_attached(&self) -> bool {
        matches!(self.mode, Mode::Attach { .. })
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Queues container output for an attacher that asked for `stream`.
    pub fn send_output(&mut self, stream: Stream, data: &[u8]) {
        let wanted = match self.mode {
            Mode::Attach { stdout, stderr, .. } => match stream {
                Stream::Stdout => stdout,
                Stream::Stderr => stderr,
            },
            Mode::Control => false,
        };
        if !wanted || self.closed {
            return;
        }
        if self.out.len() + data.len() > ATTACH_OUT_LIMIT {
            self.dropped_chunks += 1;
            if self.dropped_chunks.is_power_of_two() {
                tracing::warn!(
                    dropped_chunks = self.dropped_chunks,
                    "attacher too slow: dropping output"
                );
            }
            return;
        }
        let stream = match stream {
            Stream::Stdout => proto::Stream::Stdout,
            Stream::Stderr => proto::Stream::Stderr,
        };
        encode_frame(
            &AttachOutput {
                stream: stream as i32,
                data: data.to_vec(),
            },
            &mut self.out,
        );
        self.flush_out();
    }

    fn send(&mut self, response: &Response) {
        encode_frame(response, &mut self.out);
        self.flush_out();
    }

    fn flush_out(&mut self) {
        let mut written = 0;
        while written < self.out.len() {
            match self.stream.write(&self.out[written..]) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
        if self.closed {
            self.out = Vec::new();
        } else {
            self.out.drain(..written);
            if self.out.is_empty() && self.out.capacity() > 64 * 1024 {
                self.out = Vec::new();
            }
        }
    }

    /// The monitor is leaving: give the attacher what is queued, bounded.
    pub fn flush_before_close(&mut self) {
        if self.closed || self.out.is_empty() {
            return;
        }
        let _ = self.stream.set_nonblocking(false);
        let _ = self.stream.set_write_timeout(Some(FINAL_FLUSH_TIMEOUT));
        let _ = self.stream.write_all(&self.out);
        self.out.clear();
    }
}

fn error(message: impl std::fmt::Display) -> Response {
    Response {
        error: message.to_string(),
        status: None,
    }
}

fn ok() -> Response {
    Response::default()
}

impl Supervisor {
    pub(super) fn service_conn(&mut self, i: usize, revents: PollFlags) {
        if revents.contains(PollFlags::POLLOUT) {
            self.conns[i].flush_out();
        }
        if !revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            return;
        }
        let conn = &mut self.conns[i];
        let room = (MAX_INBOUND_FRAME + 16).saturating_sub(conn.inbuf.len());
        let limit = room.min(self.buf.len());
        match conn.stream.read(&mut self.buf[..limit]) {
            Ok(0) => self.detach(i),
            Ok(n) => {
                conn.inbuf.extend_from_slice(&self.buf[..n]);
                self.process_frames(i);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => self.detach(i),
        }
    }

    fn process_frames(&mut self, i: usize) {
        while !self.conns[i].closed {
            let conn = &mut self.conns[i];
            if conn.mode == Mode::Control {
                match take_frame::<Request>(&mut conn.inbuf, MAX_INBOUND_FRAME) {
                    Ok(Some(req)) => {
                        let response = self.handle_request(i, req);
                        self.conns[i].send(&response);
                    }
                    Ok(None) => break,
                    Err(message) => {
                        tracing::warn!(%message, "bad control request; closing connection");
                        self.detach(i);
                    }
                }
            } else {
                match take_frame::<AttachInput>(&mut conn.inbuf, MAX_INBOUND_FRAME) {
                    Ok(Some(input)) => self.handle_input(i, input),
                    Ok(None) => break,
                    Err(message) => {
                        tracing::warn!(%message, "bad attach input; detaching");
                        self.detach(i);
                    }
                }
            }
        }
        if self.conns[i].inbuf.is_empty() && self.conns[i].inbuf.capacity() > 64 * 1024 {
            self.conns[i].inbuf = Vec::new();
        }
    }

    fn handle_request(&mut self, i: usize, req: Request) -> Response {
        let Some(kind) = req.kind else {
            return error("empty request");
        };
        match kind {
            request::Kind::Start(_) => self.start(),
            request::Kind::Status(_) => Response {
                error: String::new(),
                status: Some(self.status()),
            },
            request::Kind::Attach(a) => {
                if a.stdin && self.stdio.stdin.is_none() {
                    return error(
                        "attach with stdin: the container has no stdin (stdin not set, or closed)",
                    );
                }
                self.conns[i].mode = Mode::Attach {
                    stdin: a.stdin,
                    stdout: a.stdout,
                    stderr: a.stderr,
                };
                ok()
            }
            request::Kind::Resize(r) => match self.resize(r) {
                Ok(()) => ok(),
                Err(message) => error(message),
            },
            request::Kind::ReopenLog(_) => match self.log.as_mut().map(LogWriter::reopen) {
                None | Some(Ok(())) => ok(),
                Some(Err(e)) => error(e),
            },
            request::Kind::Signal(s) => {
                let signal = match Signal::try_from(s.signal) {
                    Ok(signal) => signal,
                    Err(_) => {
                        return error(format!("signal container: invalid signal {}", s.signal));
                    }
                };
                match executor::kill(self.pid, signal) {
                    Ok(()) => ok(),
                    Err(e) => error(e),
                }
            }
        }
    }

    fn start(&mut self) -> Response {
        let Some(created) = self.created.take() else {
            return error("start container: already started");
        };
        match created.start() {
            Ok(_) => {
                self.started_at = now_ns();
                self.release_later();
                Response {
                    error: String::new(),
                    status: Some(self.status()),
                }
            }
            Err(e) => {
                // The executor has killed and reaped the process on every
                // start error, so no SIGCHLD status will come for it (and a
                // kill now could hit a reused pid): the container ends here,
                // with the exit code containerd gives a failed start.
                let message = e.to_string();
                self.start_error = Some(message.clone());
                self.exit = Some(WaitStatus::Exited(self.pid, START_ERROR_EXIT_CODE));
                error(message)
            }
        }
    }

    pub(super) fn status(&self) -> StatusReply {
        let state = if self.created.is_some() {
            proto::State::Created
        } else {
            proto::State::Running
        };
        StatusReply {
            pid: u32::try_from(self.pid.as_raw()).unwrap_or(0),
            state: state as i32,
            created_at: self.created_at,
            started_at: self.started_at,
            attachers: self
                .conns
                .iter()
                .filter(|c| c.is_attached() && !c.closed)
                .count() as u32,
            log_dropped_records: self.log.as_ref().map_or(0, LogWriter::dropped_records),
        }
    }

    fn resize(&self, r: proto::Resize) -> Result<(), String> {
        let pty = self
            .stdio
            .pty
            .as_ref()
            .ok_or("resize: the container has no terminal")?;
        let (Ok(cols), Ok(rows)) = (u16::try_from(r.width), u16::try_from(r.height)) else {
            return Err(format!("resize: {}x{} out of range", r.width, r.height));
        };
        let size = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(pty, size)
            .map_err(|errno| format!("resize terminal (TIOCSWINSZ): {errno}"))
    }

    fn handle_input(&mut self, i: usize, input: AttachInput) {
        match input.kind {
            Some(attach_input::Kind::Stdin(data)) => {
                if !self.conns[i].sends_stdin() {
                    return;
                }
                if let Some(sink) = &mut self.stdio.stdin {
                    sink.buf.extend_from_slice(&data);
                    self.flush_stdin();
                }
            }
            Some(attach_input::Kind::CloseStdin(_)) => self.stdin_ended(i),
            Some(attach_input::Kind::Resize(r)) => {
                if let Err(message) = self.resize(r) {
                    tracing::debug!(%message, "resize from attacher");
                }
            }
            None => {}
        }
    }

    fn detach(&mut self, i: usize) {
        self.stdin_ended(i);
        let conn = &mut self.conns[i];
        conn.closed = true;
        conn.out = Vec::new();
        conn.inbuf = Vec::new();
    }

    /// An attacher's input ended (it closed stdin or went away). With
    /// stdin_once and no tty the container's stdin is closed once what it
    /// sent is written, as containerd does (`container_io.go`).
    fn stdin_ended(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        let Mode::Attach {
            stdin: true,
            stdout,
            stderr,
        } = conn.mode
        else {
            return;
        };
        conn.mode = Mode::Attach {
            stdin: false,
            stdout,
            stderr,
        };
        if self.config.stdin_once
            && !self.config.tty
            && let Some(sink) = &mut self.stdio.stdin
        {
            sink.close_when_flushed = true;
            self.flush_stdin();
        }
    }
}
