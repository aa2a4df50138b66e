//! Running a command in a running container (ExecSync).
//!
//! The daemon cannot fork into a container's namespaces itself (it is
//! multi-threaded), so it runs `berth exec-helper`: a single-threaded
//! re-exec that joins the container through the executor, hands the
//! process its own stdout/stderr, waits for it and exits with its status.
//! On SIGTERM (the daemon's timeout) the helper kills the process first, so
//! nothing is left behind.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use oci_spec::runtime::{Process, Spec};
use tokio::io::AsyncReadExt;

use crate::executor::{self, ExecutorError, JoinTarget};

/// kubelet reads at most this much of each stream of an exec probe.
pub const MAX_OUTPUT: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    Executor(#[from] ExecutorError),
    #[error("exec: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("exec: {0}")]
    Spec(String),
    #[error("exec: {0}: {1}")]
    Sys(&'static str, nix::errno::Errno),
    #[error("command timed out after {0:?} and was killed")]
    Timeout(Duration),
    #[error("{0}")]
    Helper(String),
}

/// What an exec returned.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// The process an exec runs: the container's own process settings (user,
/// env, capabilities, no_new_privs, AppArmor) with the command replaced.
pub fn exec_process(spec: &Spec, cmd: &[String], tty: bool) -> Result<Process, ExecError> {
    if cmd.is_empty() {
        return Err(ExecError::Spec("a command is required".into()));
    }
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| ExecError::Spec("the container's spec has no process".into()))?;
    process.set_args(Some(cmd.to_vec()));
    process.set_terminal(Some(tty));
    process.set_console_size(None);
    Ok(process)
}

/// Runs `cmd` in the container whose init is `pid` and waits for it, with
/// output capped at [`MAX_OUTPUT`] per stream and `timeout` (zero: none).
pub async fn exec_sync(
    bundle: &Path,
    pid: u32,
    cmd: &[String],
    cgroup_procs: &[PathBuf],
    timeout: Duration,
) -> Result<ExecOutput, ExecError> {
    let mut child = helper_command(bundle, pid, cmd, cgroup_procs, HelperStdio::Null)?
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ExecError::Io {
            op: "run",
            path: PathBuf::from("berth exec-helper"),
            source,
        })?;
    // A cancelled call (kubelet gave up) ends the exec with it.
    let mut guard = TerminateOnDrop(child.id());
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(ExecError::Helper("exec helper has no output pipes".into()));
    };
    let run = async {
        let (out, err, status) = tokio::join!(
            read_capped(&mut stdout),
            read_capped(&mut stderr),
            child.wait()
        );
        (out, err, status)
    };
    let (stdout, stderr, status) = if timeout.is_zero() {
        run.await
    } else {
        match tokio::time::timeout(timeout, run).await {
            Ok(done) => done,
            Err(_) => {
                if let Some(pid) = child.id() {
                    // The helper kills the exec'd process, then exits.
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                guard.0 = None;
                return Err(ExecError::Timeout(timeout));
            }
        }
    };
    // Reaped: its pid is no longer ours to signal.
    guard.0 = None;
    let status = status.map_err(|source| ExecError::Io {
        op: "wait for",
        path: PathBuf::from("berth exec-helper"),
        source,
    })?;
    let stderr = stderr.map_err(|source| ExecError::Io {
        op: "read stderr of",
        path: PathBuf::from("berth exec-helper"),
        source,
    })?;
    let stdout = stdout.map_err(|source| ExecError::Io {
        op: "read stdout of",
        path: PathBuf::from("berth exec-helper"),
        source,
    })?;
    let code = status.code().unwrap_or(HELPER_FAILED);
    if code == HELPER_FAILED
        && let Some(message) = helper_message(&stderr)
    {
        return Err(ExecError::Helper(message));
    }
    Ok(ExecOutput {
        stdout,
        stderr,
        exit_code: code,
    })
}

const HELPER_FAILED: i32 = 255;
const HELPER_PREFIX: &str = "berth exec-helper: ";

/// Why the helper could not run the command: it exits 255 after a last
/// `berth exec-helper: …` line on its stderr.
fn helper_message(stderr: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(HELPER_PREFIX).map(str::to_string))
}

/// What the helper's stdin is.
enum HelperStdio {
    Null,
    /// A pipe the exec'd process reads as its stdin.
    Pipe,
    /// A unix socket the helper sends the pty master through.
    PtySocket(OwnedFd),
}

/// `berth exec-helper` for `cmd` in the container; stdout and stderr are
/// left to the caller.
fn helper_command(
    bundle: &Path,
    pid: u32,
    cmd: &[String],
    cgroup_procs: &[PathBuf],
    stdin: HelperStdio,
) -> Result<tokio::process::Command, ExecError> {
    let spec_path = bundle.join("config.json");
    let spec: Spec = {
        let bytes = std::fs::read(&spec_path).map_err(|source| ExecError::Io {
            op: "read",
            path: spec_path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ExecError::Spec(format!("{}: {e}", spec_path.display())))?
    };
    let tty = matches!(stdin, HelperStdio::PtySocket(_));
    let process = exec_process(&spec, cmd, tty)?;
    let process_json =
        serde_json::to_string(&process).map_err(|e| ExecError::Spec(e.to_string()))?;
    // Fix: the path `current_exe` names is gone once the binary is
    // replaced (a package upgrade before the daemon's restart), and every
    // exec failed with ENOENT; /proc/self/exe still runs this daemon's own
    // binary, as the zygote does.
    let mut command = tokio::process::Command::new("/proc/self/exe");
    command
        .arg("exec-helper")
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--spec")
        .arg(&spec_path)
        .arg("--process")
        .arg(process_json);
    for procs in cgroup_procs {
        command.arg("--cgroup-procs").arg(procs);
    }
    match stdin {
        HelperStdio::Null => {
            command.stdin(Stdio::null());
        }
        HelperStdio::Pipe => {
            command.arg("--stdin").stdin(Stdio::piped());
        }
        HelperStdio::PtySocket(socket) => {
            command.arg("--tty").stdin(Stdio::from(socket));
        }
    }
    // Not kill_on_drop: a SIGKILLed helper leaves the exec'd process
    // running; callers end it with SIGTERM (`terminate`).
    Ok(command)
}

/// An exec with its stdio wired to the caller (the streaming server's
/// Exec): pipes, or a pty whose master the helper handed back.
pub struct ExecProcess {
    child: tokio::process::Child,
    pub stdin: Option<tokio::process::ChildStdin>,
    pub stdout: Option<tokio::process::ChildStdout>,
    pub stderr: Option<tokio::process::ChildStderr>,
    pub pty: Option<Pty>,
    /// With a pty the helper's own stderr is only its error, read here.
    helper_stderr: Option<tokio::task::JoinHandle<Vec<u8>>>,
}

/// How an [`ExecProcess`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecExit {
    Exited(i32),
    /// The helper could not run the command (its message).
    Failed(String),
}

/// How long the helper has to hand the pty master back.
const PTY_HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `cmd` in the container with `stdin` (a pipe) and a `tty` as asked.
pub async fn exec_interactive(
    bundle: &Path,
    pid: u32,
    cmd: &[String],
    cgroup_procs: &[PathBuf],
    stdin: bool,
    tty: bool,
) -> Result<ExecProcess, ExecError> {
    let io = |op: &'static str| {
        move |source| ExecError::Io {
            op,
            path: PathBuf::from("berth exec-helper"),
            source,
        }
    };
    if !tty {
        let helper_stdin = if stdin {
            HelperStdio::Pipe
        } else {
            HelperStdio::Null
        };
        let mut child = helper_command(bundle, pid, cmd, cgroup_procs, helper_stdin)?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("run"))?;
        return Ok(ExecProcess {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            pty: None,
            helper_stderr: None,
            child,
        });
    }
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io("socketpair for"))?;
    let mut child = helper_command(
        bundle,
        pid,
        cmd,
        cgroup_procs,
        HelperStdio::PtySocket(theirs.into()),
    )?
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .map_err(io("run"))?;
    let helper_stderr = child.stderr.take().map(|mut stderr| {
        tokio::spawn(async move {
            let mut kept = Vec::new();
            let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut kept).await;
            kept
        })
    });
    ours.set_nonblocking(true).map_err(io("set up socket to"))?;
    let socket = tokio::net::UnixStream::from_std(ours).map_err(io("set up socket to"))?;
    let master = tokio::time::timeout(PTY_HANDOVER_TIMEOUT, receive_fd(&socket))
        .await
        .map_err(|_| ExecError::Helper("the exec helper did not hand over its terminal".into()))?
        .map_err(io("receive the terminal from"))?;
    let mut process = ExecProcess {
        child,
        stdin: None,
        stdout: None,
        stderr: None,
        pty: None,
        helper_stderr,
    };
    match master {
        Some(master) => {
            process.pty = Some(Pty::new(master).map_err(io("watch the terminal of"))?);
            Ok(process)
        }
        // The helper failed before it had a terminal: its message says why.
        None => match process.wait().await? {
            ExecExit::Failed(message) => Err(ExecError::Helper(message)),
            ExecExit::Exited(code) => Err(ExecError::Helper(format!(
                "the exec helper exited with {code} without a terminal"
            ))),
        },
    }
}

impl ExecProcess {
    /// The helper's pid while it runs, for [`terminate`].
    pub fn helper_pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the helper; its exit code is the process's.
    pub async fn wait_code(&mut self) -> Result<i32, ExecError> {
        let status = self.child.wait().await.map_err(|source| ExecError::Io {
            op: "wait for",
            path: PathBuf::from("berth exec-helper"),
            source,
        })?;
        Ok(status.code().unwrap_or(HELPER_FAILED))
    }

    /// How the exec ended, given the helper's `code` and the end of what
    /// the caller read from [`Self::stderr`] (where the helper says why it
    /// could not run the command).
    pub async fn finish(&mut self, code: i32, stderr_tail: &[u8]) -> ExecExit {
        if code != HELPER_FAILED {
            return ExecExit::Exited(code);
        }
        let own = match self.helper_stderr.take() {
            Some(task) => task.await.unwrap_or_default(),
            None => Vec::new(),
        };
        let message = helper_message(&own).or_else(|| helper_message(stderr_tail));
        message.map_or(ExecExit::Exited(code), ExecExit::Failed)
    }

    pub async fn wait(&mut self) -> Result<ExecExit, ExecError> {
        let code = self.wait_code().await?;
        Ok(self.finish(code, &[]).await)
    }
}

impl Drop for ExecProcess {
    /// An exec abandoned by its caller (the client left) must not outlive
    /// it: the helper kills the process when told to end.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            terminate(self.child.id());
        }
    }
}

/// Terminates the helper when dropped, unless its pid was taken back.
struct TerminateOnDrop(Option<u32>);

impl Drop for TerminateOnDrop {
    fn drop(&mut self) {
        terminate(self.0);
    }
}

/// Ends an exec: its helper kills the process, then exits.
pub fn terminate(helper_pid: Option<u32>) {
    if let Some(pid) = helper_pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

/// Receives one fd sent with SCM_RIGHTS; None when the peer closed first.
async fn receive_fd(socket: &tokio::net::UnixStream) -> std::io::Result<Option<OwnedFd>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    loop {
        socket.readable().await?;
        let received = socket.try_io(tokio::io::Interest::READABLE, || {
            let mut byte = [0u8; 1];
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = recvmsg(
                socket,
                &mut [std::io::IoSliceMut::new(&mut byte)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fd = None;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = message {
                    fd = fds.last();
                }
            }
            Ok((msg.bytes, fd))
        });
        match received {
            Ok((_, Some(fd))) => return Ok(Some(fd)),
            Ok((0, None)) => return Ok(None),
            Ok((_, None)) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends `fd` over the helper's stdin socket (the `--tty` handover).
fn send_fd(socket: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let fds = [fd];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("control buffer too small"));
    }
    sendmsg(
        socket,
        &[std::io::IoSlice::new(b"t")],
        &mut control,
        SendFlags::empty(),
    )
    .map(drop)
    .map_err(std::io::Error::from)
}

/// A pty master for tokio: reads and writes the exec'd process's terminal.
/// The process is gone (every slave closed) when a read fails with EIO,
/// which reads as EOF here.
#[derive(Clone)]
pub struct Pty {
    fd: std::sync::Arc<tokio::io::unix::AsyncFd<OwnedFd>>,
}

impl Pty {
    fn new(master: OwnedFd) -> std::io::Result<Pty> {
        rustix::io::ioctl_fionbio(&master, true).map_err(std::io::Error::from)?;
        #[allow(unsafe_code)]
        // SAFETY: the AsyncFd owns `master`, so the fd stays open and is
        // the same file for as long as it is registered.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(master) }?;
        Ok(Pty {
            fd: std::sync::Arc::new(fd),
        })
    }

    /// Sets the window size (TIOCSWINSZ); the process gets SIGWINCH.
    pub fn resize(&self, width: u16, height: u16) -> std::io::Result<()> {
        let size = rustix::termios::Winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(self.fd.get_ref(), size).map_err(std::io::Error::from)
    }
}

impl tokio::io::AsyncRead for Pty {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        loop {
            let mut guard = match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                rustix::io::read(fd.get_ref(), &mut *unfilled).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl tokio::io::AsyncWrite for Pty {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        loop {
            let mut guard = match self.fd.poll_write_ready(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            match guard
                .try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Reads a stream to its end, keeping the first [`MAX_OUTPUT`] bytes.
async fn read_capped(reader: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        let room = MAX_OUTPUT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// The body of `berth exec-helper`: joins the container, runs the process
/// with this process's stdout and stderr, waits, and exits as it did.
pub fn helper_main(
    pid: i32,
    spec_path: &Path,
    process_json: &str,
    cgroup_procs: &[PathBuf],
    stdin: HelperInput,
) -> i32 {
    match helper(pid, spec_path, process_json, cgroup_procs, stdin) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{HELPER_PREFIX}{e}");
            HELPER_FAILED
        }
    }
}

/// What the helper's own stdin is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelperInput {
    /// Nothing: the process gets `/dev/null`.
    None,
    /// The process's stdin.
    Stdin,
    /// A unix socket: the process gets a pty, whose master goes back here.
    PtySocket,
}

fn helper(
    pid: i32,
    spec_path: &Path,
    process_json: &str,
    cgroup_procs: &[PathBuf],
    input: HelperInput,
) -> Result<i32, ExecError> {
    let bytes = std::fs::read(spec_path).map_err(|source| ExecError::Io {
        op: "read",
        path: spec_path.to_path_buf(),
        source,
    })?;
    let spec: Spec = serde_json::from_slice(&bytes).map_err(|e| ExecError::Spec(e.to_string()))?;
    let process: Process =
        serde_json::from_str(process_json).map_err(|e| ExecError::Spec(e.to_string()))?;
    // SIGTERM and SIGCHLD are taken with sigwait, so they are blocked
    // before the process exists (it gets a default mask from the executor).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGCHLD);
    signals
        .thread_block()
        .map_err(|e| ExecError::Sys("block signals", e))?;
    let io_err = |stream: &'static str| {
        move |source| ExecError::Io {
            op: "duplicate",
            path: PathBuf::from(stream),
            source,
        }
    };
    let stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_err("stdout"))?;
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_err("stderr"))?;
    let stdin = match input {
        HelperInput::Stdin => Some(
            std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("stdin"))?,
        ),
        HelperInput::None | HelperInput::PtySocket => None,
    };
    let stdio = if input == HelperInput::PtySocket {
        executor::Stdio::Terminal
    } else {
        executor::Stdio::Pipes {
            stdin,
            stdout,
            stderr,
        }
    };
    let target = JoinTarget {
        pid: Pid::from_raw(pid),
        spec: &spec,
    };
    let spawned = executor::exec(&target, &process, stdio, cgroup_procs)?;
    if let Some(master) = &spawned.pty_master {
        send_fd(std::io::stdin().as_fd(), master.as_fd()).map_err(|source| ExecError::Io {
            op: "hand over the terminal to",
            path: PathBuf::from("the daemon"),
            source,
        })?;
    }
    // The daemon holds the master now; this copy would keep the terminal
    // open after the process exits.
    drop(spawned.pty_master);
    loop {
        match signals
            .wait()
            .map_err(|e| ExecError::Sys("wait for signals", e))?
        {
            Signal::SIGTERM | Signal::SIGINT => {
                let _ = nix::sys::signal::kill(spawned.pid, Signal::SIGKILL);
            }
            _ => {}
        }
        match waitpid(spawned.pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => return Ok(HELPER_FAILED),
            Err(e) => return Err(ExecError::Sys("waitpid", e)),
        }
    }
}
