//! `berth monitor --config PATH`: detach from the daemon, create the
//! container, report the outcome on the result pipe, then supervise.
//!
//! The result pipe is the monitor's stdin as `spawn` starts it (so that no
//! fd numbers need passing). The report is one `SpawnResult` frame: the
//! container's pid, or the precise error. If the daemon is gone by then
//! (it timed out, or died), nobody will ever start the container, so the
//! monitor kills it and leaves.

use std::fs::File;
use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::ExitCode;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::stat::{SFlag, fstat};
use nix::unistd::{ForkResult, fork, setsid};

use super::MonitorError;
use super::config::MonitorConfig;
use super::footprint;
use super::framing::encode_frame;
use super::proto::{SpawnResult, spawn_result};
use super::supervisor::Supervisor;

/// The entry point of `berth monitor --config PATH`. The caller must be
/// single-threaded (no tokio runtime, no threads): this forks.
#[allow(unsafe_code)] // fork(2)
pub fn run(config_path: &Path) -> ExitCode {
    footprint::tune_allocator();
    cloexec_inherited_fds();
    let mut report = ResultPipe::from_stdin();
    let config = match MonitorConfig::load(config_path) {
        Ok(config) => config,
        Err(e) => return report.fail(&e),
    };

    // Detach: the daemon waits only for this first process, which exits
    // at once; the child is reparented to the nearest subreaper or init,
    // in a session of its own, so the daemon's death (or its process
    // group's) does not reach it.
    // SAFETY: nothing has started a thread (see the contract above); the
    // child goes on with the same single thread.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => ExitCode::SUCCESS,
        Ok(ForkResult::Child) => supervise(config, report),
        Err(errno) => report.fail(&MonitorError::Sys {
            op: "fork monitor",
            errno,
        }),
    }
}

/// The entry point of a monitor forked by the zygote: stdin is already the
/// result pipe, stderr the monitor's log, and the zygote is a parent that
/// waits for nothing (see `zygote`).
pub fn run_forked(config_path: &Path) -> ExitCode {
    let mut report = ResultPipe::from_stdin();
    match MonitorConfig::load(config_path) {
        Ok(config) => supervise(config, report),
        Err(e) => report.fail(&e),
    }
}

/// The monitor proper, once detached from whoever started it: own session,
/// subreaper, the container created and reported, then supervised.
fn supervise(config: MonitorConfig, mut report: ResultPipe) -> ExitCode {
    if let Err(errno) = setsid() {
        return report.fail(&MonitorError::Sys {
            op: "setsid",
            errno,
        });
    }
    if let Err(errno) = nix::sys::prctl::set_child_subreaper(true) {
        return report.fail(&MonitorError::Sys {
            op: "become child subreaper",
            errno,
        });
    }
    // Do not pin the daemon's working directory (or its mount).
    let _ = std::env::set_current_dir("/");

    let supervisor = match Supervisor::create(config) {
        Ok(supervisor) => supervisor,
        Err(e) => return report.fail(&e),
    };
    let pid = supervisor.pid();
    if let Err(e) = report.send(spawn_result::Result::Pid(pid.as_raw().unsigned_abs())) {
        tracing::warn!(error = %e, container_pid = pid.as_raw(), "daemon gone before the container was reported; killing it");
        supervisor.abandon();
        return ExitCode::FAILURE;
    }
    drop(report);
    if supervisor.run() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Fds our launcher leaked to us (not close-on-exec) must not reach the
/// container through the executor.
#[allow(unsafe_code)] // borrowing fds by number
pub(super) fn cloexec_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: the fd is only borrowed for this fcntl; the one fd of the
        // list that is gone by now (read_dir's own) fails with EBADF.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

/// The write end of the daemon's result pipe, if stdin is one.
struct ResultPipe {
    pipe: Option<File>,
}

impl ResultPipe {
    /// Takes stdin as the result pipe and puts /dev/null in its place, so
    /// that the pipe is closed (EOF for the daemon) once we drop it.
    fn from_stdin() -> Self {
        // Not `std::io::stdin()`: that allocates a read buffer we would
        // carry for good.
        let stdin = rustix::stdio::stdin();
        let is_pipe = fstat(stdin)
            .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO)
            .unwrap_or(false);
        if !is_pipe {
            return Self { pipe: None };
        }
        let pipe: Option<OwnedFd> = stdin.try_clone_to_owned().ok();
        if let Ok(null) = File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdin(&null);
        }
        Self {
            pipe: pipe.map(File::from),
        }
    }

    fn send(&mut self, result: spawn_result::Result) -> std::io::Result<()> {
        let Some(pipe) = &mut self.pipe else {
            return Ok(());
        };
        let mut frame = Vec::new();
        encode_frame(
            &SpawnResult {
                result: Some(result),
            },
            &mut frame,
        );
        pipe.write_all(&frame)
    }

    fn fail(&mut self, e: &MonitorError) -> ExitCode {
        tracing::error!(error = %e, "monitor failed");
        let _ = self.send(spawn_result::Result::Error(e.to_string()));
        ExitCode::FAILURE
    }
}
