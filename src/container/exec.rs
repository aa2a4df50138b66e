//! Running a command in a running container (ExecSync).
//!
//! The daemon cannot fork into a container's namespaces itself (it is
//! multi-threaded), so it runs `berth exec-helper`: a single-threaded
//! re-exec that joins the container through the executor, hands the
//! process its own stdout/stderr, waits for it and exits with its status.
//! On SIGTERM (the daemon's timeout) the helper kills the process first, so
//! nothing is left behind.

use std::os::fd::AsFd;
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
    let process = exec_process(&spec, cmd, false)?;
    let process_json =
        serde_json::to_string(&process).map_err(|e| ExecError::Spec(e.to_string()))?;
    let exe = std::env::current_exe().map_err(|source| ExecError::Io {
        op: "find own binary",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let mut command = tokio::process::Command::new(exe);
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
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ExecError::Io {
            op: "run",
            path: PathBuf::from("berth exec-helper"),
            source,
        })?;
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
                return Err(ExecError::Timeout(timeout));
            }
        }
    };
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
    // The helper says why it could not run the command with exit 255 and a
    // `berth exec-helper:` line on stderr.
    let code = status.code().unwrap_or(255);
    if code == HELPER_FAILED
        && let Some(message) = String::from_utf8_lossy(&stderr)
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(HELPER_PREFIX))
    {
        return Err(ExecError::Helper(message.to_string()));
    }
    Ok(ExecOutput {
        stdout,
        stderr,
        exit_code: code,
    })
}

const HELPER_FAILED: i32 = 255;
const HELPER_PREFIX: &str = "berth exec-helper: ";

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
) -> i32 {
    match helper(pid, spec_path, process_json, cgroup_procs) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{HELPER_PREFIX}{e}");
            HELPER_FAILED
        }
    }
}

fn helper(
    pid: i32,
    spec_path: &Path,
    process_json: &str,
    cgroup_procs: &[PathBuf],
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
    let stdio = executor::Stdio::Pipes {
        stdin: None,
        stdout,
        stderr,
    };
    let target = JoinTarget {
        pid: Pid::from_raw(pid),
        spec: &spec,
    };
    let spawned = executor::exec(&target, &process, stdio, cgroup_procs)?;
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
