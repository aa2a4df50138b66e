//! Control groups: where the host mounts them ([`layout`]), how a pod's or
//! container's cgroup is named ([`path`]), and the container's cgroup itself
//! ([`Cgroup`]): created in every hierarchy, resources applied (also live, for
//! UpdateContainerResources), processes added, stats and the OOM kill counter
//! read, processes killed, removed.
//!
//! cgroup v1 and v2 are chosen per controller at run time from the host's
//! [`CgroupLayout`]: on a v1 host every controller has its own hierarchy
//! (`cpu` and `cpuacct` may be split or co-mounted), on a hybrid host a
//! controller may live on the v2 hierarchy (hugetlb does on some), on a v2
//! host all live in one. What to write is a table ([`resources`]) from the OCI
//! `LinuxResources` to control files; everything below takes its roots from
//! the layout, so the same code runs against fake trees in tests.
//!
//! The one thing to know before changing this: a write to a control file is
//! one `write(2)` of the whole value, to a file that must already exist (the
//! kernel creates them with the directory). Files are never created here, so
//! a missing file means a controller or feature the kernel lacks, and some of
//! those are skipped on purpose (swap accounting off, no blkio weight without
//! BFQ).
//!
//! Why hand-written rather than `cgroups-rs` or youki's `libcgroups`: both
//! find v1 hierarchies only through the host's `/proc/self/mountinfo` and
//! `/proc/self/cgroup` (no root to point at a fake tree), neither handles a
//! hybrid host whose hugetlb lives on the v2 hierarchy, `libcgroups`'s v2
//! shares conversion is not kubelet's, its v1 memory code fails when swap
//! accounting is off, its systemd driver needs D-Bus, and `cgroups-rs` always
//! links zbus. The table here is small and covers exactly what kubelet asks.

mod cgroup;
pub mod devices;
pub mod layout;
pub mod path;
pub mod resources;
pub mod stats;

#[cfg(test)]
pub(crate) mod fake_tree_tests;
#[cfg(test)]
mod host_tests;

use std::path::PathBuf;

pub use self::cgroup::{Cgroup, CgroupGuard, CgroupManager};
pub use self::layout::{CgroupLayout, CgroupMode, REQUIRED_CONTROLLERS};
pub use self::path::CgroupPath;
pub use self::stats::{CgroupStats, CpuStats, CpuThrottling, MemoryStats, PidsStats};
pub use crate::config::CgroupDriver;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("read /proc/self/mountinfo: {0}")]
    Detect(std::io::Error),
    #[error("no cgroup hierarchy is mounted: mount cgroup2 on /sys/fs/cgroup")]
    NotMounted,
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("invalid container id {id:?} for a cgroup name: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("invalid cgroup resource {what}: {reason}")]
    InvalidResource { what: String, reason: String },
    #[error("cgroup controller {controller} is not available on this host (needed for {what})")]
    MissingController {
        controller: &'static str,
        what: String,
    },
    #[error("unified cgroup resources need a cgroup v2 hierarchy; this host runs {mode}")]
    UnifiedNeedsV2 { mode: CgroupMode },
    #[error("create cgroup {path}: {errno}")]
    Mkdir {
        path: PathBuf,
        errno: std::io::Error,
    },
    #[error("remove cgroup {path}: {errno}")]
    Rmdir {
        path: PathBuf,
        errno: std::io::Error,
    },
    #[error("read {path}: {errno}")]
    Read {
        path: PathBuf,
        errno: std::io::Error,
    },
    #[error("write {value:?} to {path}: {errno}")]
    Write {
        path: PathBuf,
        value: String,
        errno: std::io::Error,
    },
    #[error("parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(transparent)]
    DeviceFilter(#[from] devices::DeviceFilterError),
    #[error("{path} has no oom_kill counter (needs kernel 4.13 or later)")]
    NoOomKillCounter { path: PathBuf },
    #[error("send SIGKILL to process {pid} of cgroup {cgroup}: {errno}")]
    Kill {
        pid: i32,
        cgroup: CgroupPath,
        errno: nix::errno::Errno,
    },
    #[error("cgroup {cgroup} still has processes {pids:?} after {waited_ms} ms of SIGKILL")]
    KillTimeout {
        cgroup: CgroupPath,
        pids: Vec<i32>,
        waited_ms: u128,
    },
}
