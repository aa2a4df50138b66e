//! The executor: an OCI runtime spec becomes an isolated process, in two
//! steps (create parks the init process right before `execve`, start
//! releases it), always called from a single-threaded process (`berth
//! monitor`), never from the tokio daemon. One file per kernel concept, in
//! the order of youki's and runc's init sequence.

pub mod capabilities;
pub mod cgroups;
mod clone_into;
pub mod container;
pub mod devices;
pub mod error;
pub mod exec;
pub mod lsm;
pub mod mounts;
pub mod namespaces;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod sync;
pub mod sysctl;
pub mod terminal;
#[cfg(test)]
pub(crate) mod test_support;

pub(crate) use clone_into::is_cgroup2;

pub use container::{CreateOptions, Created, Stdio, create, kill};
pub use error::ExecutorError;
pub use exec::{JoinTarget, Spawned, exec};
