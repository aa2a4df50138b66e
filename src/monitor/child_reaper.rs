//! Reaping: SIGCHLD arrives on a signalfd; every exited child is reaped
//! (the monitor is subreaper, so orphans of the container land here too),
//! and the container's own status is kept.

use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::MonitorError;

pub struct ChildReaper {
    signals: SignalFd,
}

impl ChildReaper {
    /// Blocks SIGCHLD and opens a signalfd for it. Called after the
    /// container is created, so that it does not inherit the blocked mask;
    /// a child that exited before is still a zombie and is found by the
    /// first `reap`.
    pub fn new() -> Result<Self, MonitorError> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
            .map_err(MonitorError::sys("block SIGCHLD"))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(MonitorError::sys("open signalfd for SIGCHLD"))?;
        Ok(Self { signals })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.signals.as_fd()
    }

    /// Drains the signalfd and reaps every exited child. Returns the
    /// container's status if it was among them.
    pub fn reap(&self, container: Pid) -> Option<WaitStatus> {
        while let Ok(Some(_)) = self.signals.read_signal() {}
        reap_all(container)
    }
}

/// Reaps every exited child without blocking; the container's status if it
/// was one of them.
pub fn reap_all(container: Pid) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))) => {
                if pid == container {
                    found = Some(status);
                }
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => {
                tracing::warn!(%errno, "waitpid failed");
                break;
            }
        }
    }
    found
}

/// Kills the container and waits for it: cleanup when the monitor gives
/// up before the container could run.
pub fn kill_and_reap(container: Pid) {
    let _ = crate::executor::kill(container, Signal::SIGKILL);
    while let Err(Errno::EINTR) = waitpid(container, None) {}
}

/// The exit code as containerd reports it (128 + signal for a killed
/// process) and the signal, if one killed it.
pub fn exit_code_and_signal(status: WaitStatus) -> (i32, Option<i32>) {
    match status {
        WaitStatus::Exited(_, code) => (code, None),
        WaitStatus::Signaled(_, signal, _) => (128 + signal as i32, Some(signal as i32)),
        _ => (-1, None),
    }
}
