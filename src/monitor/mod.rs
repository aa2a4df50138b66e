//! The per-container monitor (`berth monitor`) and the daemon's side of it.
//!
//! The monitor is the same binary re-executed by [`spawn`]: it detaches
//! from the daemon (forks once more, new session, reparented away),
//! becomes child subreaper, creates the container through the executor,
//! holds its stdio (pipes or a pty), writes the CRI log, serves the control
//! socket (`proto/monitor.proto`), reaps the container and writes its exit
//! record, then exits. The daemon talks to it with [`MonitorClient`] and
//! learns of exits with [`ExitWatcher`].
//!
//! Before changing the monitor side: it must stay single-threaded and small
//! (no tokio, no allocation per line, blocking `poll(2)` on a handful of
//! fds, no timers), because there is one per container and the executor
//! forks from it. Everything tokio lives in `client`, `spawn` and
//! `exit_watcher`, which only the daemon uses.

mod atomic_file;
mod child_reaper;
mod client;
mod config;
mod control;
mod exit_record;
mod exit_watcher;
pub(crate) mod footprint;
mod framing;
mod process;
pub mod proto;
mod spawn;
mod stdio;
mod supervisor;
mod zygote;

use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;

pub use client::{AttachOptions, AttachReader, AttachWriter, Attached, MonitorClient};
pub use config::MonitorConfig;
pub use exit_record::{ExitRecord, read_exit_record, read_oom_kill_count};
pub use exit_watcher::{ExitWatcher, list_exit_records};
pub use process::{run, run_forked};
pub use proto::{State, StatusReply};
pub use spawn::{SPAWN_TIMEOUT, spawn, spawn_with, spawn_with_zygote};
pub use zygote::{SPARE_NAME, Zygote, serve as serve_zygote};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse monitor config {path}: {source}")]
    ParseConfig {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("parse exit record {path}: {source}")]
    ParseExitRecord {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} has no oom_kill line")]
    NoOomKillCount { path: PathBuf },
    #[error("load OCI spec {path}: {message}")]
    LoadSpec { path: PathBuf, message: String },
    #[error(transparent)]
    Log(#[from] crate::logs::LogError),
    #[error("{op}: {errno}")]
    Sys { op: &'static str, errno: Errno },
    #[error("bind control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("create container: {0}")]
    Executor(#[from] crate::executor::ExecutorError),
    #[error("executor gave no pty master for a tty container")]
    NoPtyMaster,
    #[error("start monitor {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    /// The monitor reported that it could not create the container; the
    /// message is the executor's (or the monitor's) own.
    #[error("monitor for container {container_id}: {message}")]
    Create {
        container_id: String,
        message: String,
    },
    #[error("monitor for container {container_id} exited ({status}) without reporting")]
    NoReport {
        container_id: String,
        status: String,
    },
    #[error("connect to monitor {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talk to monitor {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("monitor {path}: protocol error: {message}")]
    Protocol { path: PathBuf, message: String },
    /// The monitor refused or failed the request.
    #[error("monitor {path}: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("{op}: no answer from monitor within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("watch exit records in {path}: {errno}")]
    Watch { path: PathBuf, errno: Errno },
}

impl MonitorError {
    fn sys(op: &'static str) -> impl FnOnce(Errno) -> MonitorError {
        move |errno| MonitorError::Sys { op, errno }
    }
}

/// Nanoseconds since the epoch, as CRI timestamps are.
fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
