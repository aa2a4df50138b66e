//! The daemon's side of starting a monitor: write its config, re-execute
//! ourselves as `berth monitor --config`, and wait (bounded) for the
//! created container's pid or the precise reason it could not be created.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::MonitorError;
use super::config::MonitorConfig;
use super::framing::{MAX_INBOUND_FRAME, take_frame};
use super::proto::{SpawnResult, spawn_result};

/// How long `spawn` waits for the monitor to create the container: rootfs
/// and cgroup setup included, so generous.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a monitor for `config` from this very binary and returns the
/// container's pid once it is created and parked.
pub async fn spawn(config: &MonitorConfig) -> Result<u32, MonitorError> {
    spawn_with(Path::new("/proc/self/exe"), config, SPAWN_TIMEOUT).await
}

/// `spawn` with the binary and the bound given (tests run the monitor from
/// a binary other than themselves).
pub async fn spawn_with(
    exe: &Path,
    config: &MonitorConfig,
    timeout: Duration,
) -> Result<u32, MonitorError> {
    let config_path = config.save()?;
    let spawn_err = |source| MonitorError::Spawn {
        exe: exe.to_path_buf(),
        source,
    };
    // The result pipe is the monitor's stdin (see process.rs).
    let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
    let stderr = match &config.monitor_log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| MonitorError::WriteFile {
                    path: path.clone(),
                    source,
                })?,
        ),
        None => Stdio::null(),
    };
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("monitor")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::from(writer))
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut child = command.spawn().map_err(spawn_err)?;
    // Our copy of the write end must go, or the pipe never reaches EOF.
    drop(command);
    let mut reader =
        tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into()).map_err(spawn_err)?;

    let wait = async {
        // The first process exits as soon as it has forked the real monitor.
        let status = child.wait().await;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match take_frame::<SpawnResult>(&mut buf, MAX_INBOUND_FRAME) {
                Ok(Some(result)) => return Ok(Some(result)),
                Ok(None) => {}
                Err(message) => {
                    return Err(MonitorError::Protocol {
                        path: config_path.clone(),
                        message,
                    });
                }
            }
            match reader.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(spawn_err(source)),
            }
        }
        Err(MonitorError::NoReport {
            container_id: config.container_id.clone(),
            status: match status {
                Ok(status) => status.to_string(),
                Err(e) => e.to_string(),
            },
        })
    };
    // On timeout the pipe is dropped here; the monitor's report then fails
    // with EPIPE and it kills the parked container itself.
    let result =
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| MonitorError::Timeout {
                op: "create container",
                after: timeout,
            })??;
    match result.and_then(|r| r.result) {
        Some(spawn_result::Result::Pid(pid)) => Ok(pid),
        Some(spawn_result::Result::Error(message)) => Err(MonitorError::Create {
            container_id: config.container_id.clone(),
            message,
        }),
        None => Err(MonitorError::Protocol {
            path: config_path,
            message: "empty spawn result".into(),
        }),
    }
}
