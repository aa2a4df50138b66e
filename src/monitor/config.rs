//! What the daemon tells a monitor: written by `spawn` as
//! `<bundle>/monitor.json`, read by `berth monitor --config`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::MonitorError;
use super::atomic_file::write_atomic;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    pub container_id: String,
    /// The container's bundle directory; `monitor.json` is written here.
    pub bundle: PathBuf,
    /// The OCI runtime spec (`config.json`) given to the executor.
    pub spec_path: PathBuf,
    /// The CRI log file (kubelet's `LogPath`, joined with the pod's log
    /// directory). None: no log was asked for, and the output is read and
    /// dropped, as containerd does.
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// Keep a stdin the attachers can write to (CRI `stdin`).
    #[serde(default)]
    pub stdin: bool,
    /// Close the container's stdin when the first attacher with stdin
    /// detaches (CRI `stdin_once`; as containerd, only without a tty).
    #[serde(default)]
    pub stdin_once: bool,
    /// Give the container a pty instead of pipes (CRI `tty`).
    #[serde(default)]
    pub tty: bool,
    /// `cgroup.procs` files the container's process is moved into.
    #[serde(default)]
    pub cgroup_procs: Vec<PathBuf>,
    /// The control socket (unix, stream) the monitor listens on.
    pub control_socket: PathBuf,
    /// Where the exit record is written; its file name is what
    /// `ExitWatcher` yields, so make it the container id.
    pub exit_record: PathBuf,
    /// Where the container's pid is written once it is created.
    pub pid_file: PathBuf,
    /// The cgroup file with an `oom_kill N` line: v2 `memory.events`, v1
    /// `memory.oom_control`. None: OOM kills are not detected.
    #[serde(default)]
    pub oom_kill_file: Option<PathBuf>,
    /// The `oom_kill` count before the container was created; a higher
    /// count at exit means the container was OOM-killed.
    #[serde(default)]
    pub oom_kill_initial: u64,
    /// The monitor's own diagnostics (stderr) are appended here; None:
    /// discarded.
    #[serde(default)]
    pub monitor_log: Option<PathBuf>,
    /// The host's cgroup mounts, as the daemon read them once; None: the
    /// executor reads mountinfo itself (see `executor::CreateOptions`).
    #[serde(default)]
    pub cgroup_mounts: Option<Vec<crate::executor::mounts::MountInfo>>,
}

impl MonitorConfig {
    /// Where `spawn` writes this config.
    pub fn path(&self) -> PathBuf {
        self.bundle.join("monitor.json")
    }

    pub fn load(path: &Path) -> Result<Self, MonitorError> {
        let data = std::fs::read(path).map_err(|source| MonitorError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&data).map_err(|source| MonitorError::ParseConfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes the config to `path()` atomically.
    pub fn save(&self) -> Result<PathBuf, MonitorError> {
        let path = self.path();
        let data = serde_json::to_vec_pretty(self).map_err(|source| MonitorError::ParseConfig {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &data)?;
        Ok(path)
    }
}
