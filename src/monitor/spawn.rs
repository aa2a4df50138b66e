//! The daemon's side of starting a monitor: write its config, have the
//! zygote fork a monitor (or re-execute ourselves as `berth monitor
//! --config`), and wait (bounded) for the created container's pid or the
//! precise reason it could not be created.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::MonitorError;
use super::config::MonitorConfig;
use super::framing::{MAX_INBOUND_FRAME, take_frame};
use super::proto::{SpawnResult, spawn_result};
use super::zygote::Zygote;

/// How long `spawn` waits for the monitor to create the container: rootfs
/// and cgroup setup included, so generous.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a monitor for `config` and returns the container's pid once it is
/// created and parked. The daemon's zygote forks it (see `zygote`); when the
/// zygote cannot, this very binary is executed as `berth monitor`.
pub async fn spawn(config: &MonitorConfig) -> Result<u32, MonitorError> {
    let exe = Path::new("/proc/self/exe");
    match hand_to_zygote(exe, config, super::zygote::request_from_daemon_zygote) {
        Ok((config_path, reader)) => {
            await_forked(exe, config, &config_path, reader, SPAWN_TIMEOUT).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "no monitor zygote; executing the monitor");
            spawn_with(exe, config, SPAWN_TIMEOUT).await
        }
    }
}

/// `spawn` through the given zygote (tests start their own).
pub async fn spawn_with_zygote(
    zygote: &Zygote,
    exe: &Path,
    config: &MonitorConfig,
    timeout: Duration,
) -> Result<u32, MonitorError> {
    let (config_path, reader) = hand_to_zygote(exe, config, |path, result, log| {
        zygote
            .request(path, result, log)
            .map_err(|errno| MonitorError::Sys {
                op: "hand a monitor to the zygote",
                errno,
            })
    })?;
    await_forked(exe, config, &config_path, reader, timeout).await
}

/// Saves `config` and has `request` pass it, the result pipe's write end and
/// the monitor's log to a zygote. Returns the config's path and the pipe's
/// read end; `Err` when the zygote did not take the request.
fn hand_to_zygote(
    exe: &Path,
    config: &MonitorConfig,
    request: impl FnOnce(&Path, BorrowedFd<'_>, BorrowedFd<'_>) -> Result<(), MonitorError>,
) -> Result<(PathBuf, std::io::PipeReader), MonitorError> {
    let config_path = config.save()?;
    let (reader, writer) = result_pipe(exe)?;
    let log = open_monitor_log(config)?;
    request(&config_path, writer.as_fd(), log.as_fd())?;
    Ok((config_path, reader))
}

/// Waits, bounded, for the report of a monitor a zygote forked.
async fn await_forked(
    exe: &Path,
    config: &MonitorConfig,
    config_path: &Path,
    reader: std::io::PipeReader,
    timeout: Duration,
) -> Result<u32, MonitorError> {
    let report = read_report(exe, reader, config, config_path, async { None });
    finish(config, config_path, report, timeout).await
}

/// Executes `exe monitor --config` for `config` (tests run the monitor from
/// a binary other than themselves) and waits, bounded, for its report.
pub async fn spawn_with(
    exe: &Path,
    config: &MonitorConfig,
    timeout: Duration,
) -> Result<u32, MonitorError> {
    let config_path = config.save()?;
    // The result pipe is the monitor's stdin (see process.rs).
    let (reader, writer) = result_pipe(exe)?;
    let log = open_monitor_log(config)?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("monitor")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::from(writer))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    let mut child = command.spawn().map_err(|source| MonitorError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })?;
    // Our copy of the write end must go, or the pipe never reaches EOF.
    drop(command);
    // The first process exits as soon as it has forked the real monitor.
    let exited = async move {
        Some(match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        })
    };
    let report = read_report(exe, reader, config, &config_path, exited);
    finish(config, &config_path, report, timeout).await
}

fn result_pipe(exe: &Path) -> Result<(std::io::PipeReader, std::io::PipeWriter), MonitorError> {
    std::io::pipe().map_err(|source| MonitorError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })
}

/// The monitor's stderr: its log file, or /dev/null.
fn open_monitor_log(config: &MonitorConfig) -> Result<OwnedFd, MonitorError> {
    let path = config
        .monitor_log
        .as_deref()
        .unwrap_or(Path::new("/dev/null"));
    std::fs::OpenOptions::new()
        .create(config.monitor_log.is_some())
        .append(true)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| MonitorError::WriteFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads the monitor's one report frame from the result pipe. `exited`
/// says how the launched process ended, when there is one to wait for.
async fn read_report(
    exe: &Path,
    reader: std::io::PipeReader,
    config: &MonitorConfig,
    config_path: &Path,
    exited: impl Future<Output = Option<String>>,
) -> Result<Option<SpawnResult>, MonitorError> {
    let spawn_err = |source| MonitorError::Spawn {
        exe: exe.to_path_buf(),
        source,
    };
    let mut reader =
        tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into()).map_err(spawn_err)?;
    let status = exited.await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match take_frame::<SpawnResult>(&mut buf, MAX_INBOUND_FRAME) {
            Ok(Some(result)) => return Ok(Some(result)),
            Ok(None) => {}
            Err(message) => {
                return Err(MonitorError::Protocol {
                    path: config_path.to_path_buf(),
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
        status: status.unwrap_or_else(|| "result pipe closed".into()),
    })
}

/// Bounds the wait for the report and turns it into the pid or the error.
async fn finish(
    config: &MonitorConfig,
    config_path: &Path,
    report: impl Future<Output = Result<Option<SpawnResult>, MonitorError>>,
    timeout: Duration,
) -> Result<u32, MonitorError> {
    // On timeout the pipe is dropped here; the monitor's report then fails
    // with EPIPE and it kills the parked container itself.
    let result =
        tokio::time::timeout(timeout, report)
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
            path: config_path.to_path_buf(),
            message: "empty spawn result".into(),
        }),
    }
}
