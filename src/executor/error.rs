//! The executor's top-level error: what `create`, `start`, `exec` and `kill`
//! return. Errors raised inside the container's setup process travel back to
//! the caller as text over the sync socket and arrive as [`ExecutorError::Child`],
//! so a kubelet event shows the child's precise message, never an exit code.

use std::path::PathBuf;

use nix::errno::Errno;

use super::{
    capabilities::CapabilityError, devices::DeviceError, lsm::LsmError, mounts::MountError,
    namespaces::NamespaceError, process::ProcessError, rootfs::RootfsError, seccomp::SeccompError,
    sync::SyncError, sysctl::SysctlError, terminal::TerminalError,
};

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The spec asks for something the executor cannot or will not do.
    #[error("invalid spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    #[error(transparent)]
    Lsm(#[from] LsmError),
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// The container's setup process reported this error (its own text).
    #[error("{0}")]
    Child(String),
    /// The setup process died without saying why.
    #[error("container setup process exited unexpectedly: {0}")]
    ChildDied(String),
    #[error("set {what} to {name:?}: {errno}")]
    Hostname {
        what: &'static str,
        name: String,
        errno: Errno,
    },
    #[error("fork container setup process: {0}")]
    Fork(Errno),
    #[error("add pid {pid} to cgroup {path}: {source}")]
    CgroupJoin {
        pid: i32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("send signal {signal} to pid {pid}: {errno}")]
    Kill {
        pid: i32,
        signal: String,
        errno: Errno,
    },
}
