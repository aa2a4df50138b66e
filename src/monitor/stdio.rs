//! The container's stdio as the monitor holds it: the read ends of the
//! stdout/stderr pipes (or the pty master), and the write end of stdin.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::unistd::{pipe2, read, write};

use super::MonitorError;
use crate::executor::Stdio;
use crate::logs::Stream;

/// Attach input waiting for the container to read it; above this the
/// monitor stops reading from attachers until the container catches up.
pub const STDIN_LIMIT: usize = 64 * 1024;

pub struct Output {
    pub stream: Stream,
    pub fd: OwnedFd,
}

pub struct StdinSink {
    pub fd: OwnedFd,
    pub buf: Vec<u8>,
    /// Close (EOF for the container) once `buf` is written: stdin_once.
    pub close_when_flushed: bool,
}

/// The monitor's ends of the container's stdio.
pub struct MonitorStdio {
    pub outputs: Vec<Output>,
    pub stdin: Option<StdinSink>,
    /// The pty master (a second fd of it, for resize), when tty is set.
    pub pty: Option<OwnedFd>,
}

/// Pipes for a container without a tty: the executor gets the container's
/// ends, the monitor keeps the others (non-blocking).
pub fn pipes(with_stdin: bool) -> Result<(Stdio, MonitorStdio), MonitorError> {
    let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(MonitorError::sys("create stdio pipe"));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (stdin, sink) = if with_stdin {
        let (in_r, in_w) = pipe()?;
        set_nonblocking(&in_w)?;
        (
            Some(in_r),
            Some(StdinSink {
                fd: in_w,
                buf: Vec::new(),
                close_when_flushed: false,
            }),
        )
    } else {
        (None, None)
    };
    set_nonblocking(&out_r)?;
    set_nonblocking(&err_r)?;
    let stdio = Stdio::Pipes {
        stdin,
        stdout: out_w,
        stderr: err_w,
    };
    let ours = MonitorStdio {
        outputs: vec![
            Output {
                stream: Stream::Stdout,
                fd: out_r,
            },
            Output {
                stream: Stream::Stderr,
                fd: err_r,
            },
        ],
        stdin: sink,
        pty: None,
    };
    Ok((stdio, ours))
}

/// The monitor's side of a tty container: output is all `stdout` (as in
/// kubelet and containerd), stdin is written to the same master.
pub fn from_pty_master(master: OwnedFd, with_stdin: bool) -> Result<MonitorStdio, MonitorError> {
    set_nonblocking(&master)?;
    let dup = || {
        master.try_clone().map_err(|e| MonitorError::Sys {
            op: "duplicate pty master",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })
    };
    let stdin = if with_stdin {
        Some(StdinSink {
            fd: dup()?,
            buf: Vec::new(),
            close_when_flushed: false,
        })
    } else {
        None
    };
    let resize = dup()?;
    Ok(MonitorStdio {
        outputs: vec![Output {
            stream: Stream::Stdout,
            fd: master,
        }],
        stdin,
        pty: Some(resize),
    })
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), MonitorError> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(MonitorError::sys("get fd flags"))?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(MonitorError::sys("set fd non-blocking"))?;
    Ok(())
}

pub enum ReadOutcome {
    Data(usize),
    WouldBlock,
    /// EOF, or EIO on a pty master whose slave is closed.
    Closed,
}

pub fn read_output(fd: impl AsFd, buf: &mut [u8]) -> ReadOutcome {
    loop {
        return match read(&fd, buf) {
            Ok(0) => ReadOutcome::Closed,
            Ok(n) => ReadOutcome::Data(n),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => ReadOutcome::WouldBlock,
            Err(errno) => {
                if errno != Errno::EIO {
                    tracing::warn!(%errno, "read container output");
                }
                ReadOutcome::Closed
            }
        };
    }
}

impl StdinSink {
    /// Writes what it can. Err when the container's stdin is gone (EPIPE):
    /// the sink should be dropped.
    pub fn flush(&mut self) -> Result<(), Errno> {
        let mut written = 0;
        while written < self.buf.len() {
            match write(&self.fd, &self.buf[written..]) {
                Ok(n) => written += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(errno) => return Err(errno),
            }
        }
        self.buf.drain(..written);
        Ok(())
    }
}
