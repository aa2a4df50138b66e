//! The monitor zygote: one idle, single-threaded `berth monitor --zygote`
//! per daemon that forks a monitor for each container instead of the daemon
//! executing the binary anew. Creating a container is on the pod start path,
//! and an `execve` of berth (loading, relocating, starting up), the
//! monitor's own detaching fork and the hand-offs between those processes
//! were a third of CreateContainer.
//!
//! Protocol: the daemon holds one end of a `SOCK_SEQPACKET` pair, the
//! zygote's stdin is the other. One packet per monitor: the path of its
//! `monitor.json`, with two fds as `SCM_RIGHTS`: the write end of the
//! result pipe and the monitor's stderr. The zygote forks; the child puts
//! the fds on 0 and 2 and is from then on what `berth monitor --config`
//! would be after detaching (see `process`). The daemon reads the result
//! pipe as it does for an executed monitor.
//!
//! The zygote keeps one monitor forked ahead, a spare, named `berth-spare`
//! while it waits on a socket pair of its own: a request goes to the spare
//! when there is one (the zygote forwards the packet, fds and all), and
//! the zygote forks the next spare 20 ms later. The fork, ~0.2 ms on a VM,
//! and the new process's first page faults are then off CreateContainer's
//! path; a burst of creates that finds no spare is forked for as before.
//!
//! Monitors stay the zygote's children (it reaps them) until the zygote
//! exits, which it does when the daemon's end closes; they are then
//! reparented to init like any orphan, and keep supervising their
//! containers. If the zygote is gone, or cannot be started, the daemon
//! falls back to executing the monitor.

use std::ffi::{CStr, OsStr};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::unistd::{ForkResult, fork};

use super::MonitorError;

/// Longest config path a request may carry.
const MAX_PATH: usize = 4096;
/// How long after a request the zygote forks the next spare monitor: the
/// fork and the spare's start then do not take a CPU from the container
/// being set up.
const SPARE_DELAY: Duration = Duration::from_millis(20);
/// The process name of a spare monitor while it waits (`berth bench`
/// counts it with the daemon, as the zygote).
pub const SPARE_NAME: &CStr = c"berth-spare";
/// The process names of the zygote and of a monitor, as `ps` shows them
/// (otherwise both would be `exe`, of `/proc/self/exe`).
const ZYGOTE_NAME: &CStr = c"berth-zygote";
const MONITOR_NAME: &CStr = c"berth-monitor";

/// The daemon's handle on its zygote.
#[derive(Debug)]
pub struct Zygote {
    sock: OwnedFd,
    child: Child,
}

impl Zygote {
    /// Starts `exe monitor --zygote` with its end of the socket as stdin.
    pub fn start(exe: &Path) -> Result<Zygote, MonitorError> {
        let spawn_err = |source| MonitorError::Spawn {
            exe: exe.to_path_buf(),
            source,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|errno| spawn_err(errno.into()))?;
        let child = std::process::Command::new(exe)
            .args(["monitor", "--zygote"])
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()
            .map_err(spawn_err)?;
        Ok(Zygote { sock: ours, child })
    }

    /// Asks the zygote to fork a monitor for the config at `config_path`,
    /// reporting on `result` with `stderr` as its log.
    pub fn request(
        &self,
        config_path: &Path,
        result: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> Result<(), Errno> {
        send_request(&self.sock, config_path, result, stderr)
    }

    /// The zygote's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Zygote {
    /// Closing our end makes the zygote exit; it is reaped here (a zygote
    /// that does not go at once is killed) so that no zombie is left.
    fn drop(&mut self) {
        // SAFETY: shutdown only changes the socket's state; the fd stays
        // owned by `self.sock` and is closed once, by its drop.
        #[allow(unsafe_code)]
        unsafe {
            libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on `sock`: the path, with the two fds as `SCM_RIGHTS`.
fn send_request(
    sock: &OwnedFd,
    config_path: &Path,
    result: BorrowedFd<'_>,
    stderr: BorrowedFd<'_>,
) -> Result<(), Errno> {
    let path = config_path.as_os_str().as_bytes();
    if path.is_empty() || path.len() > MAX_PATH {
        return Err(Errno::ENAMETOOLONG);
    }
    let fds = [result.as_raw_fd(), stderr.as_raw_fd()];
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(path)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno),
        }
    }
}

/// The daemon's zygote, started on first use and again after it died.
static DAEMON_ZYGOTE: Mutex<Option<Zygote>> = Mutex::new(None);

/// Has the daemon's zygote fork a monitor. `Err` means the zygote cannot
/// take the request (it could not be started, or died twice in a row); the
/// caller then executes the monitor itself.
pub(super) fn request_from_daemon_zygote(
    config_path: &Path,
    result: BorrowedFd<'_>,
    stderr: BorrowedFd<'_>,
) -> Result<(), MonitorError> {
    let mut slot = DAEMON_ZYGOTE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..2 {
        let zygote = match slot.take() {
            Some(zygote) => zygote,
            None => Zygote::start(Path::new("/proc/self/exe"))?,
        };
        match zygote.request(config_path, result, stderr) {
            Ok(()) => {
                *slot = Some(zygote);
                return Ok(());
            }
            // Dropping it reaps it.
            Err(errno) => {
                tracing::warn!(pid = zygote.pid(), %errno, "monitor zygote gone; starting another")
            }
        }
    }
    Err(MonitorError::Sys {
        op: "hand a monitor to the zygote",
        errno: Errno::EPIPE,
    })
}

/// What the zygote's child must do: run the monitor for this config.
pub struct Forked {
    pub config_path: PathBuf,
}

/// The entry point of `berth monitor --zygote`: serves requests until the
/// daemon's end closes. Returns `Some` in a forked child (which then goes
/// on as a monitor) and `None` in the zygote when it is done.
#[allow(unsafe_code)] // fork(2), adopting received fds
pub fn serve() -> Result<Option<Forked>, MonitorError> {
    super::footprint::tune_allocator();
    super::process::cloexec_inherited_fds();
    let _ = nix::sys::prctl::set_name(ZYGOTE_NAME);
    let sock = take_stdin()?;
    // SIGCHLD on a signalfd, so that exited monitors are reaped while the
    // zygote waits for the next request.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    let mut old_mask = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), Some(&mut old_mask))
        .map_err(MonitorError::sys("block SIGCHLD"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(MonitorError::sys("open signalfd for SIGCHLD"))?;
    // A monitor forked ahead of time, waiting for its request: the fork
    // and the new process's first steps are then off the create's path.
    // The first one only after a quiet spell: the daemon starts the zygote
    // for a request that is on its way.
    let mut spare: Option<OwnedFd> = None;
    let mut spare_due = Some(Instant::now() + SPARE_DELAY);
    loop {
        if spare.is_none() && spare_due.is_some_and(|due| due <= Instant::now()) {
            spare_due = None;
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(MonitorError::sys("socketpair for a spare monitor"))?;
            // SAFETY: as for the monitor's fork below.
            match unsafe { fork() } {
                Ok(ForkResult::Parent { .. }) => spare = Some(ours),
                Ok(ForkResult::Child) => {
                    drop((sock, signals, ours));
                    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None)
                        .map_err(MonitorError::sys("restore the signal mask"))?;
                    return wait_as_spare(theirs);
                }
                // The next request forks its monitor itself.
                Err(errno) => tracing::warn!(%errno, "fork a spare monitor"),
            }
        }
        let timeout = match (&spare, spare_due) {
            (None, Some(due)) => {
                let ms = due.saturating_duration_since(Instant::now()).as_millis();
                PollTimeout::from(ms.min(u16::MAX.into()) as u16)
            }
            _ => PollTimeout::NONE,
        };
        let mut fds = [
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => return Err(MonitorError::Sys { op: "poll", errno }),
        }
        let (sock_ready, child_exited) =
            (fds[0].any().unwrap_or(false), fds[1].any().unwrap_or(false));
        if child_exited {
            while let Ok(Some(_)) = signals.read_signal() {}
            super::child_reaper::reap_all(nix::unistd::Pid::from_raw(0));
        }
        if !sock_ready {
            continue;
        }
        let Some(request) = receive(&sock)? else {
            // The daemon's end is closed: the daemon is gone or restarting.
            // (A spare sees its own end close and leaves too.)
            return Ok(None);
        };
        spare_due = Some(Instant::now() + SPARE_DELAY);
        if let Some(chan) = spare.take() {
            match send_request(
                &chan,
                &request.config_path,
                request.result.as_fd(),
                request.stderr.as_fd(),
            ) {
                Ok(()) => continue,
                // It died: fork as if there had been none.
                Err(errno) => tracing::warn!(%errno, "hand a request to the spare monitor"),
            }
        }
        // SAFETY: the zygote is single-threaded (it started no thread); the
        // child goes on with the same single thread.
        match unsafe { fork() } {
            Ok(ForkResult::Parent { .. }) => drop(request),
            Ok(ForkResult::Child) => {
                drop((sock, signals, spare));
                sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None)
                    .map_err(MonitorError::sys("restore the signal mask"))?;
                let _ = nix::sys::prctl::set_name(MONITOR_NAME);
                let config_path = request.install()?;
                return Ok(Some(Forked { config_path }));
            }
            Err(errno) => {
                // The daemon sees the result pipe close without a report.
                tracing::error!(%errno, "fork monitor");
                drop(request);
            }
        }
    }
}

/// A spare monitor: waits, under its own name, for the one request the
/// zygote hands it, then goes on as that monitor. `None` when the zygote is
/// gone first.
fn wait_as_spare(chan: OwnedFd) -> Result<Option<Forked>, MonitorError> {
    let _ = nix::sys::prctl::set_name(SPARE_NAME);
    warm_up();
    let Some(request) = receive(&chan)? else {
        return Ok(None);
    };
    drop(chan);
    // Fix: the spare used to restore the name nix's `get_name` had read,
    // which in optimized builds is always empty (nix 0.30 passes prctl a
    // buffer it declares immutable), so `ps` showed such monitors nameless.
    let _ = nix::sys::prctl::set_name(MONITOR_NAME);
    let config_path = request.install()?;
    Ok(Some(Forked { config_path }))
}

/// A spec's JSON round trip, once: the code and heap pages a monitor's
/// first steps touch (a fork shares them copy-on-write, or not at all for
/// code) become this spare's while it waits rather than after its request.
fn warm_up() {
    if let Ok(json) = serde_json::to_vec(&oci_spec::runtime::Spec::default()) {
        let _ = serde_json::from_slice::<oci_spec::runtime::Spec>(&json);
    }
}

/// One request: the config path and the two fds.
struct Request {
    config_path: PathBuf,
    result: OwnedFd,
    stderr: OwnedFd,
}

impl Request {
    /// In the forked child: the result pipe becomes stdin, the log stderr.
    fn install(self) -> Result<PathBuf, MonitorError> {
        nix::unistd::dup2_stdin(&self.result).map_err(MonitorError::sys("dup result pipe"))?;
        nix::unistd::dup2_stderr(&self.stderr).map_err(MonitorError::sys("dup monitor log"))?;
        Ok(self.config_path)
    }
}

/// Takes the socket from stdin and puts /dev/null in its place.
fn take_stdin() -> Result<OwnedFd, MonitorError> {
    let stdin = rustix::stdio::stdin();
    let sock = rustix::io::fcntl_dupfd_cloexec(stdin, 3).map_err(|e| MonitorError::Sys {
        op: "take zygote socket",
        errno: Errno::from_raw(e.raw_os_error()),
    })?;
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
    }
    Ok(sock)
}

/// Reads one request; `None` when the daemon's end is closed.
#[allow(unsafe_code)] // adopting the received fds
fn receive(sock: &OwnedFd) -> Result<Option<Request>, MonitorError> {
    let mut buf = vec![0u8; MAX_PATH + 1];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let (len, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds: Vec<OwnedFd> = Vec::new();
                for c in msg
                    .cmsgs()
                    .map_err(MonitorError::sys("read zygote request"))?
                {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: SCM_RIGHTS fds are new in this process and
                        // owned by nobody else; each is adopted once.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break (msg.bytes, fds);
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => {
                return Err(MonitorError::Sys {
                    op: "read zygote request",
                    errno,
                });
            }
        }
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let mut fds = fds.into_iter();
    let (Some(result), Some(stderr), None) = (fds.next(), fds.next(), fds.next()) else {
        return Err(MonitorError::Sys {
            op: "read zygote request (expected two fds)",
            errno: Errno::EBADMSG,
        });
    };
    if len == 0 || len > MAX_PATH {
        return Err(MonitorError::Sys {
            op: "read zygote request (bad config path)",
            errno: Errno::EBADMSG,
        });
    }
    Ok(Some(Request {
        config_path: PathBuf::from(OsStr::from_bytes(&buf[..len])),
        result,
        stderr,
    }))
}
