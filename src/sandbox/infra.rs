//! The infra process of a pod whose containers share one PID namespace:
//! `berth pause`, run through the executor and a monitor like any
//! container, never pulled from a registry. It is PID 1 of the pod's PID
//! namespace, reaps orphans and exits on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use crate::monitor::{MonitorClient, MonitorConfig};

#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error("infra process: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("infra process: {0}")]
    Spec(String),
    #[error("infra process: {0}")]
    Monitor(#[from] crate::monitor::MonitorError),
}

/// The body of `berth pause`.
pub fn pause() -> ExitCode {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        signals.add(signal);
    }
    if signals.thread_block().is_err() {
        return ExitCode::FAILURE;
    }
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => {
                // Orphans of the pod are reparented here: reap them all.
                while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    if status == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => return ExitCode::SUCCESS,
            Err(_) => return ExitCode::FAILURE,
        }
    }
}

/// Makes `root`/pause the binary this daemon runs, for the infra
/// containers to bind as their `/pause`. The path the daemon was started
/// from may name another binary after an upgrade, or none; the bind is
/// made in the container's mount namespace, where `/proc/self/exe` (a
/// mount of the daemon's namespace) cannot be its source. So the daemon's
/// own inode gets a name under its root at start: a hard link, which needs
/// the root on the binary's filesystem (the caller falls back to the
/// binary's path otherwise; a copy would cost the root the binary's size
/// at every start). Pods running keep the binary their bind holds.
pub fn install_pause(root: &Path) -> Result<PathBuf, InfraError> {
    let target = root.join("pause");
    let fresh = root.join("pause.new");
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| InfraError::Io { op, path, source }
    };
    for stale in [&fresh, &target] {
        match std::fs::remove_file(stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", stale)(e));
            }
            _ => {}
        }
    }
    // Through the magic link: the inode this process runs, whatever its
    // path names now.
    nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        "/proc/self/exe",
        nix::fcntl::AT_FDCWD,
        &fresh,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )
    .map_err(|errno| io("link the daemon's binary as", &fresh)(errno.into()))?;
    std::fs::rename(&fresh, &target).map_err(io("rename", &target))?;
    Ok(target)
}

/// Where the infra process's files live inside the pod directory.
pub struct InfraPaths {
    pub bundle: PathBuf,
    pub control_socket: PathBuf,
}

impl InfraPaths {
    pub fn new(pod_dir: &Path, state: &Path, pod_id: &str) -> InfraPaths {
        InfraPaths {
            bundle: pod_dir.join("infra"),
            // Short: a unix socket path has 108 bytes. Pod and container
            // ids are both random 256-bit names, so they share the dir.
            control_socket: state.join("s").join(pod_id),
        }
    }
}

/// Starts the pod's infra process in the pod's pinned namespaces and a new
/// PID namespace; returns its pid (in the host's PID namespace). `owner`:
/// the host ids of root in the pod's own user namespace, if it has one,
/// for whom the process's root directory is made.
pub async fn start(
    paths: &InfraPaths,
    pause: &Path,
    pod_id: &str,
    namespaces: &[(&str, PathBuf)],
    cgroup_procs: Vec<PathBuf>,
    owner: Option<(u32, u32)>,
) -> Result<u32, InfraError> {
    let rootfs = paths.bundle.join("rootfs");
    let pause_target = rootfs.join("pause");
    let io = |op| {
        let path = rootfs.clone();
        move |source| InfraError::Io { op, path, source }
    };
    // One step after the other: the file and the chown need the directory.
    std::fs::create_dir_all(&rootfs).map_err(io("create"))?;
    std::fs::write(&pause_target, b"").map_err(io("create"))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&rootfs, Some(uid), Some(gid)).map_err(io("chown"))?;
    }
    // berth is linked against the host's libc: its loader and libraries
    // come from the host, read-only. On merged-/usr hosts /lib and /lib64
    // are links into /usr; elsewhere they are bound too.
    let mut mounts = vec![
        serde_json::json!({"destination": "/pause", "type": "bind", "source": pause, "options": ["rbind", "ro", "nosuid", "nodev"]}),
        serde_json::json!({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro", "nosuid", "nodev"]}),
    ];
    for dir in ["lib", "lib64"] {
        let host = Path::new("/").join(dir);
        let inside = rootfs.join(dir);
        match std::fs::read_link(&host) {
            Ok(target) => {
                if std::fs::symlink_metadata(&inside).is_err() {
                    std::os::unix::fs::symlink(&target, &inside).map_err(|source| InfraError::Io {
                        op: "link",
                        path: inside.clone(),
                        source,
                    })?;
                }
            }
            Err(_) if host.is_dir() => mounts.push(serde_json::json!({
                "destination": host, "type": "bind", "source": host, "options": ["rbind", "ro", "nosuid", "nodev"]
            })),
            Err(_) => {}
        }
    }
    let mut linux_namespaces = vec![
        serde_json::json!({"type": "pid"}),
        serde_json::json!({"type": "mount"}),
    ];
    for (kind, path) in namespaces {
        let kind = match *kind {
            "net" => "network",
            other => other,
        };
        linux_namespaces.push(serde_json::json!({"type": kind, "path": path}));
    }
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": rootfs},
        "process": {
            "args": ["/pause", "pause"],
            "cwd": "/",
            "env": ["PATH=/"],
            "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": true,
            "capabilities": {"bounding": [], "effective": [], "permitted": [], "inheritable": [], "ambient": []}
        },
        "mounts": mounts,
        "linux": {"namespaces": linux_namespaces}
    });
    let spec_path = paths.bundle.join("config.json");
    std::fs::write(&spec_path, spec.to_string()).map_err(|source| InfraError::Io {
        op: "write",
        path: spec_path.clone(),
        source,
    })?;
    let config = MonitorConfig {
        container_id: format!("{pod_id}-infra"),
        bundle: paths.bundle.clone(),
        spec_path,
        log_path: Some(paths.bundle.join("infra.log")),
        stdin: false,
        stdin_once: false,
        tty: false,
        cgroup_procs,
        control_socket: paths.control_socket.clone(),
        // Not in the containers' exit directory: the pod owns this record.
        exit_record: paths.bundle.join("exit"),
        pid_file: paths.bundle.join("pid"),
        oom_kill_file: None,
        oom_kill_initial: 0,
        monitor_log: Some(paths.bundle.join("monitor.log")),
        // The infra process has no cgroup mount.
        cgroup_mounts: None,
    };
    let pid = crate::monitor::spawn(&config).await?;
    MonitorClient::new(&paths.control_socket).start().await?;
    Ok(pid)
}

/// Stops the infra process (SIGKILL: it holds nothing) and waits, bounded,
/// for its monitor to record the exit. Idempotent.
pub async fn stop(paths: &InfraPaths) {
    let exit = paths.bundle.join("exit");
    if exit.exists() || !paths.control_socket.exists() {
        return;
    }
    if let Err(e) = MonitorClient::new(&paths.control_socket)
        .signal(Signal::SIGKILL)
        .await
    {
        tracing::debug!("signal infra process: {e}");
        return;
    }
    // Polled with a short backoff: the monitor records the exit within a
    // millisecond or so of the kill. (An inotify watch looked better, but
    // closing one waits for an SRCU grace period, 18 ms here.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut pause = Duration::from_micros(500);
    while !exit.exists() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(bundle = %paths.bundle.display(), "infra process not reported gone after 2 s");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}
