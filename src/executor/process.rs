//! The container process itself: user and groups, umask, cwd, environment,
//! argv (with PATH lookup inside the container, as runc does), rlimits,
//! no_new_privs, oom_score_adj and the final `execve`. Everything that can be
//! checked without the container's filesystem is resolved in the parent
//! ([`ProcessPlan::from_spec`]); the child only applies.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
use nix::sys::stat::{Mode, umask};
use nix::unistd::{AccessFlags, Gid, Uid, access, chdir, execve, setgroups, setresgid, setresuid};
use oci_spec::runtime::{PosixRlimitType, Process};

use super::capabilities::CapabilityPlan;

/// runc's default when the spec's env has no PATH.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process: {0}")]
    Invalid(String),
    #[error("set rlimit {resource} to {soft}/{hard}: {errno}")]
    Rlimit {
        resource: String,
        soft: u64,
        hard: u64,
        errno: Errno,
    },
    #[error("set {what} to {id}: {errno}")]
    SetId {
        what: &'static str,
        id: String,
        errno: Errno,
    },
    #[error("set {what}: {errno}")]
    Prctl { what: &'static str, errno: Errno },
    #[error("chdir to cwd {cwd:?}: {errno}")]
    Cwd { cwd: PathBuf, errno: Errno },
    #[error("set oom_score_adj to {value}: {source}")]
    OomScoreAdj { value: i32, source: std::io::Error },
    #[error("exec {arg0:?}: executable file not found in $PATH")]
    NotInPath { arg0: String },
    #[error("exec {arg0:?}: no such file or directory in container rootfs")]
    NotFound { arg0: String },
    #[error("exec {arg0:?}: {reason}")]
    Exec { arg0: String, reason: String },
}

/// Lowercase text of an errno, e.g. "permission denied".
pub fn errno_text(errno: Errno) -> String {
    let desc = errno.desc();
    let mut s = desc.to_owned();
    if let Some(first) = s.get(..1) {
        let lower = first.to_lowercase();
        s.replace_range(..1, &lower);
    }
    s
}

/// The resolved process settings.
#[derive(Debug, Clone)]
pub struct ProcessPlan {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: u32,
    pub cwd: PathBuf,
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    pub path_env: String,
    pub rlimits: Vec<(Resource, String, u64, u64)>,
    pub no_new_privileges: bool,
    pub capabilities: CapabilityPlan,
    /// The value to write, already clamped to what this process may set.
    pub oom_score_adj: Option<i32>,
}

fn resource(t: PosixRlimitType) -> Resource {
    match t {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

fn cstring(what: &str, s: &str) -> Result<CString, ProcessError> {
    CString::new(s).map_err(|_| ProcessError::Invalid(format!("{what} {s:?} contains a NUL byte")))
}

/// The oom_score_adj the child may set: raising always works, lowering below
/// our own value needs CAP_SYS_RESOURCE, so without it the value is clamped
/// to ours with a warning.
pub fn clamp_oom_score_adj(requested: i32) -> i32 {
    let current = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let can_lower = caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap_or(false);
    match current {
        Some(current) if requested < current && !can_lower => {
            tracing::warn!(
                requested,
                current,
                "oom_score_adj lower than the monitor's needs CAP_SYS_RESOURCE, which berth lacks: clamped"
            );
            current
        }
        _ => requested,
    }
}

impl ProcessPlan {
    pub fn from_spec(process: &Process) -> Result<ProcessPlan, ProcessError> {
        let args = process.args().as_deref().unwrap_or_default();
        if args.is_empty() {
            return Err(ProcessError::Invalid("args must not be empty".into()));
        }
        let cwd = process.cwd().clone();
        if !cwd.is_absolute() {
            return Err(ProcessError::Invalid(format!(
                "cwd {cwd:?} is not absolute"
            )));
        }
        let env_list = process.env().as_deref().unwrap_or_default();
        let path_env = env_list
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_owned();
        let user = process.user();
        Ok(ProcessPlan {
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask().unwrap_or(0o022),
            cwd,
            args: args
                .iter()
                .map(|a| cstring("argument", a))
                .collect::<Result<_, _>>()?,
            env: env_list
                .iter()
                .map(|e| cstring("environment variable", e))
                .collect::<Result<_, _>>()?,
            path_env,
            rlimits: process
                .rlimits()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|r| (resource(r.typ()), r.typ().to_string(), r.soft(), r.hard()))
                .collect(),
            no_new_privileges: process.no_new_privileges().unwrap_or(false),
            capabilities: CapabilityPlan::from_spec(process.capabilities().as_ref()),
            oom_score_adj: process.oom_score_adj().map(clamp_oom_score_adj),
        })
    }

    pub fn arg0(&self) -> String {
        self.args
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn apply_oom_score_adj(&self) -> Result<(), ProcessError> {
        if let Some(value) = self.oom_score_adj {
            std::fs::write("/proc/self/oom_score_adj", value.to_string())
                .map_err(|source| ProcessError::OomScoreAdj { value, source })?;
        }
        Ok(())
    }

    pub fn apply_rlimits(&self) -> Result<(), ProcessError> {
        for (res, name, soft, hard) in &self.rlimits {
            setrlimit(*res, *soft, *hard).map_err(|errno| ProcessError::Rlimit {
                resource: name.clone(),
                soft: *soft,
                hard: *hard,
                errno,
            })?;
        }
        Ok(())
    }

    /// Switches to the spec's user and groups keeping capabilities, then
    /// sets the capability sets. The bounding set must be dropped before.
    pub fn apply_user_and_capabilities(&self) -> Result<(), ProcessError> {
        let keep = |on: bool| {
            nix::sys::prctl::set_keepcaps(on).map_err(|errno| ProcessError::Prctl {
                what: "keep-caps",
                errno,
            })
        };
        keep(true)?;
        let gids: Vec<Gid> = self
            .additional_gids
            .iter()
            .map(|g| Gid::from_raw(*g))
            .collect();
        setgroups(&gids).map_err(|errno| ProcessError::SetId {
            what: "supplementary groups",
            id: format!("{:?}", self.additional_gids),
            errno,
        })?;
        let gid = Gid::from_raw(self.gid);
        setresgid(gid, gid, gid).map_err(|errno| ProcessError::SetId {
            what: "gid",
            id: self.gid.to_string(),
            errno,
        })?;
        let uid = Uid::from_raw(self.uid);
        setresuid(uid, uid, uid).map_err(|errno| ProcessError::SetId {
            what: "uid",
            id: self.uid.to_string(),
            errno,
        })?;
        keep(false)?;
        self.capabilities
            .apply_sets()
            .map_err(|e| ProcessError::Invalid(e.to_string()))?;
        Ok(())
    }

    pub fn apply_umask(&self) {
        umask(Mode::from_bits_truncate(self.umask));
    }

    /// chdir to the cwd; called as root before the uid switch (so that a
    /// cwd only root can enter works, as in runc) and again after when the
    /// first attempt failed.
    pub fn chdir_cwd(&self) -> Result<(), ProcessError> {
        chdir(&self.cwd).map_err(|errno| ProcessError::Cwd {
            cwd: self.cwd.clone(),
            errno,
        })
    }

    pub fn apply_no_new_privileges(&self) -> Result<(), ProcessError> {
        if self.no_new_privileges {
            nix::sys::prctl::set_no_new_privs().map_err(|errno| ProcessError::Prctl {
                what: "no_new_privs",
                errno,
            })?;
        }
        Ok(())
    }

    /// Finds the executable in the container (after pivot_root): argv[0]
    /// as a path when it has a '/', else the first executable match in PATH.
    pub fn resolve_executable(&self) -> Result<CString, ProcessError> {
        let arg0 = self.arg0();
        if arg0.contains('/') {
            check_executable(&arg0, Path::new(&arg0))?;
            return cstring("argument", &arg0);
        }
        for dir in self.path_env.split(':') {
            let dir = if dir.is_empty() { "." } else { dir };
            let candidate = Path::new(dir).join(&arg0);
            if let Ok(meta) = std::fs::metadata(&candidate)
                && meta.is_file()
                && meta.permissions().mode() & 0o111 != 0
            {
                return CString::new(candidate.as_os_str().as_bytes())
                    .map_err(|_| ProcessError::Invalid("path contains a NUL byte".into()));
            }
        }
        Err(ProcessError::NotInPath { arg0 })
    }

    /// Replaces this process with the container's program; returns only on
    /// failure.
    pub fn exec(&self, path: &CString) -> ProcessError {
        let errno = match execve(path, &self.args, &self.env) {
            Err(errno) => errno,
            Ok(never) => match never {},
        };
        let arg0 = self.arg0();
        match errno {
            Errno::ENOENT => ProcessError::NotFound { arg0 },
            other => ProcessError::Exec {
                arg0,
                reason: errno_text(other),
            },
        }
    }
}

fn check_executable(arg0: &str, path: &Path) -> Result<(), ProcessError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ProcessError::NotFound { arg0: arg0.into() });
        }
        Err(e) => {
            return Err(ProcessError::Exec {
                arg0: arg0.into(),
                reason: e
                    .raw_os_error()
                    .map(|n| errno_text(Errno::from_raw(n)))
                    .unwrap_or_else(|| e.to_string()),
            });
        }
        Ok(meta) if meta.is_dir() => {
            return Err(ProcessError::Exec {
                arg0: arg0.into(),
                reason: "is a directory".into(),
            });
        }
        Ok(_) => {}
    }
    access(OsStr::new(path), AccessFlags::X_OK).map_err(|errno| ProcessError::Exec {
        arg0: arg0.into(),
        reason: errno_text(errno),
    })
}

/// Undoes what the monitor may have set that `execve` keeps: a blocked
/// signal mask and ignored signals (Rust ignores SIGPIPE at startup).
pub fn reset_signals() -> Result<(), ProcessError> {
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).map_err(|errno| {
        ProcessError::Prctl {
            what: "signal mask",
            errno,
        }
    })?;
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler code, so nothing can run
        // concurrently with this process's state.
        #[allow(unsafe_code)]
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    reset_realtime_signals();
    Ok(())
}

/// The real-time signals `Signal::iterator` leaves out. They arrive
/// ignored more often than one would think: glibc's `posix_spawn` (which
/// Rust's `Command`, and so the daemon's spawn of `berth monitor`, uses)
/// sets its internal SIGCANCEL and SIGSETXID (32, 33) to SIG_IGN in the
/// child, and an ignored disposition survives `execve`. glibc's own
/// `sigaction` refuses those two (EINVAL), hence the raw syscall.
fn reset_realtime_signals() {
    /// Highest signal number on Linux (x86_64, aarch64: `_NSIG` 64).
    const NSIG: libc::c_int = 64;
    // An all-zero kernel `struct sigaction` is SIG_DFL with no flags and an
    // empty mask; its layout (handler, flags, restorer, mask: 32 bytes on
    // x86_64 and aarch64) then needs no per-architecture definition.
    let dfl = [0u64; 4];
    for sig in 32..=NSIG {
        // SAFETY: rt_sigaction reads `dfl` (large enough for the kernel's
        // struct) and writes nothing (old action NULL); SIG_DFL runs no code.
        #[allow(unsafe_code)]
        let _ = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}
