//! The container's root filesystem, in the order runc and firecracker's
//! jailer use, as one short function each side of pivot_root:
//!
//! [`prepare`] (in the new mount namespace, before pivot_root):
//! 1. make `/` recursively private (or the spec's `rootfsPropagation`), so
//!    nothing below propagates back to the host;
//! 2. bind the rootfs onto itself (pivot_root needs a mount point);
//! 3. the spec's mounts, each resolved inside the rootfs (see `mounts`);
//! 4. device nodes and `/dev` links;
//! 5. `pivot_root(".", ".")`, the old root made a slave and detached.
//!
//! [`finish`] (after pivot_root and sysctls): masked paths, read-only paths,
//! read-only rootfs.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::unistd::{chdir, pivot_root};
use oci_spec::runtime::Spec;
use rustix::fs::OFlags;

use super::devices::{self, DeviceError, DeviceNode};
use super::mounts::{self, CgroupBind, MountError, MountKind, MountPlan};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs {0:?} must be an absolute path")]
    NotAbsolute(PathBuf),
    #[error("open rootfs {path:?}: {errno}")]
    Open { path: PathBuf, errno: Errno },
    #[error(
        "rootfs propagation {0:?} is not one of private, rprivate, slave, rslave, shared, rshared, unbindable, runbindable"
    )]
    BadPropagation(String),
    #[error("make {path:?} {what}: {errno}")]
    Propagation {
        path: PathBuf,
        what: &'static str,
        errno: Errno,
    },
    #[error("bind rootfs {path:?} onto itself: {errno}")]
    BindSelf { path: PathBuf, errno: Errno },
    #[error("pivot_root into {path:?}: {step}: {errno}")]
    Pivot {
        path: PathBuf,
        step: &'static str,
        errno: Errno,
    },
    #[error("mask path {path:?}: {errno}")]
    Mask { path: PathBuf, errno: Errno },
    #[error("make path {path:?} read-only: {errno}")]
    Readonly { path: PathBuf, errno: Errno },
    #[error("make rootfs read-only: {0}")]
    ReadonlyRoot(Errno),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Everything the child needs for the rootfs, resolved in the parent.
#[derive(Debug, Clone)]
pub struct RootfsPlan {
    pub rootfs: PathBuf,
    /// Applied recursively to `/` first.
    pub propagation: MsFlags,
    /// The spec's `rootfsPropagation`, re-applied to the new `/`.
    pub spec_propagation: Option<MsFlags>,
    pub mounts: Vec<MountPlan>,
    pub cgroups: Vec<CgroupBind>,
    /// Default devices and links are made unless `/dev` is bound from the host.
    pub make_default_devices: bool,
    pub devices: Vec<DeviceNode>,
    pub masked: Vec<PathBuf>,
    pub readonly: Vec<PathBuf>,
    pub readonly_root: bool,
}

fn parse_root_propagation(s: &str) -> Result<MsFlags, RootfsError> {
    Ok(match s {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        other => return Err(RootfsError::BadPropagation(other.to_owned())),
    })
}

fn clean_paths(paths: Option<&Vec<String>>) -> Vec<PathBuf> {
    paths
        .into_iter()
        .flatten()
        .filter_map(|p| mounts::clean_destination(Path::new(p)).ok())
        .collect()
}

impl RootfsPlan {
    pub fn from_spec(
        spec: &Spec,
        rootfs: &Path,
        cgroup_procs: &[PathBuf],
        cgroup_mounts: Option<&[mounts::MountInfo]>,
    ) -> Result<RootfsPlan, super::error::ExecutorError> {
        if !rootfs.is_absolute() {
            return Err(RootfsError::NotAbsolute(rootfs.to_owned()).into());
        }
        let linux = spec.linux().as_ref();
        let spec_propagation = linux
            .and_then(|l| l.rootfs_propagation().as_deref())
            .filter(|p| !p.is_empty())
            .map(parse_root_propagation)
            .transpose()?;
        let mut plan_mounts = Vec::new();
        for m in spec.mounts().as_deref().unwrap_or_default() {
            plan_mounts.push(MountPlan::from_spec(m)?);
        }
        // A tmpfs /dev needs its pts, shm and mqueue even when the spec
        // forgot them (containerd's default spec has them).
        let dev = plan_mounts
            .iter()
            .position(|m| m.destination == Path::new("/dev"));
        let dev_is_bind =
            dev.is_some_and(|i| matches!(plan_mounts[i].kind, MountKind::Bind { .. }));
        if let Some(i) = dev
            && !dev_is_bind
        {
            let has = |d: &str| plan_mounts.iter().any(|m| m.destination == Path::new(d));
            let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
            let mut extra = Vec::new();
            if !has("/dev/pts") {
                extra.push(MountPlan::filesystem(
                    "/dev/pts",
                    "devpts",
                    nosuid_noexec,
                    "newinstance,ptmxmode=0666,mode=0620,gid=5",
                ));
            }
            if !has("/dev/shm") {
                extra.push(MountPlan::filesystem(
                    "/dev/shm",
                    "tmpfs",
                    nosuid_noexec | MsFlags::MS_NODEV,
                    "mode=1777,size=65536k",
                ));
            }
            if !has("/dev/mqueue") {
                extra.push(MountPlan::filesystem(
                    "/dev/mqueue",
                    "mqueue",
                    nosuid_noexec | MsFlags::MS_NODEV,
                    "",
                ));
            }
            plan_mounts.splice(i + 1..i + 1, extra);
        }
        let cgroups = if plan_mounts.iter().any(|m| m.kind == MountKind::Cgroup) {
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            let read;
            let infos = match cgroup_mounts {
                Some(given) => given,
                None => {
                    read = mounts::mountinfo()?;
                    &read
                }
            };
            mounts::cgroup_binds(infos, &own, cgroup_procs)
        } else {
            Vec::new()
        };
        let mut devices = if dev_is_bind {
            Vec::new()
        } else {
            devices::default_devices()
        };
        devices.extend(devices::spec_devices(
            linux
                .and_then(|l| l.devices().as_deref())
                .unwrap_or_default(),
        )?);
        Ok(RootfsPlan {
            rootfs: rootfs.to_owned(),
            propagation: spec_propagation.unwrap_or(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
            spec_propagation,
            mounts: plan_mounts,
            cgroups,
            make_default_devices: !dev_is_bind,
            devices,
            masked: clean_paths(linux.and_then(|l| l.masked_paths().as_ref())),
            readonly: clean_paths(linux.and_then(|l| l.readonly_paths().as_ref())),
            readonly_root: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
        })
    }
}

fn propagation_err<'a>(path: &'a Path, what: &'static str) -> impl Fn(Errno) -> RootfsError + 'a {
    move |errno| RootfsError::Propagation {
        path: path.to_owned(),
        what,
        errno,
    }
}

/// pivot_root refuses a new root whose parent mount is shared; with a shared
/// rootfsPropagation, make that one mount private (runc does the same). The
/// parent is the mount the rootfs bind will sit on: the rootfs itself when
/// it is a mount point (an overlay snapshot), as runc's getParentMount.
fn make_parent_mount_private(rootfs: &Path) -> Result<(), RootfsError> {
    let infos = mounts::mountinfo()?;
    let parent = infos
        .iter()
        .map(|i| i.mount_point.as_path())
        .filter(|mp| rootfs.starts_with(mp))
        .max_by_key(|mp| mp.as_os_str().len())
        .unwrap_or(Path::new("/"));
    mount(
        None::<&str>,
        parent,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(propagation_err(parent, "private"))
}

/// Steps 1–5 (see the module doc). Runs in the container's mount namespace.
pub fn prepare(plan: &RootfsPlan) -> Result<(), RootfsError> {
    let rootfs = plan.rootfs.as_path();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        plan.propagation,
        None::<&str>,
    )
    .map_err(propagation_err(Path::new("/"), "private"))?;
    if plan.propagation.contains(MsFlags::MS_SHARED) {
        make_parent_mount_private(rootfs)?;
    }
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|errno| RootfsError::BindSelf {
        path: rootfs.to_owned(),
        errno,
    })?;
    let root: OwnedFd = rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| RootfsError::Open {
        path: rootfs.to_owned(),
        errno: Errno::from_raw(e.raw_os_error()),
    })?;

    for m in &plan.mounts {
        mounts::mount_in_root(root.as_fd(), m, &plan.cgroups)?;
    }
    for d in &plan.devices {
        devices::create_device(root.as_fd(), d)?;
    }
    if plan.make_default_devices {
        devices::create_links(root.as_fd())?;
    }

    let pivot_err = |step: &'static str| {
        move |errno| RootfsError::Pivot {
            path: rootfs.to_owned(),
            step,
            errno,
        }
    };
    // The old root, held open so that it can be named after pivot_root.
    let old_root: OwnedFd = rustix::fs::open(
        "/",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| pivot_err("open the old root")(Errno::from_raw(e.raw_os_error())))?;
    chdir(rootfs).map_err(pivot_err("chdir"))?;
    pivot_root(".", ".").map_err(pivot_err("pivot_root"))?;
    // The old root is now stacked on the new one. "." still names the new
    // root's mount, so step into the old root itself (as runc does): making
    // "." a recursive slave would otherwise also turn every mount of the
    // container into a slave, and a bidirectional mount would no longer
    // propagate back to the host.
    nix::unistd::fchdir(&old_root).map_err(pivot_err("fchdir to the old root"))?;
    drop(old_root);
    // Keep the old root's unmount from propagating anywhere, then detach it.
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(pivot_err("make old root a slave"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(pivot_err("detach old root"))?;
    chdir("/").map_err(pivot_err("chdir /"))?;
    if let Some(p) = plan.spec_propagation {
        mount(None::<&str>, "/", None::<&str>, p, None::<&str>)
            .map_err(propagation_err(Path::new("/"), "use rootfsPropagation"))?;
    }
    Ok(())
}

/// Masked paths, read-only paths, read-only root. Runs after pivot_root,
/// so every path is the container's own.
pub fn finish(plan: &RootfsPlan) -> Result<(), RootfsError> {
    for path in &plan.masked {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(RootfsError::Mask {
                    path: path.clone(),
                    errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                });
            }
        };
        let res = if meta.is_dir() {
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            )
        } else {
            mount(
                Some("/dev/null"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        res.map_err(|errno| RootfsError::Mask {
            path: path.clone(),
            errno,
        })?;
    }
    for path in &plan.readonly {
        match mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => {}
            Err(Errno::ENOENT) => continue,
            Err(errno) => {
                return Err(RootfsError::Readonly {
                    path: path.clone(),
                    errno,
                });
            }
        }
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| RootfsError::Readonly {
            path: path.clone(),
            errno: Errno::from_raw(e.raw_os_error()),
        })?;
        mounts::remount_bind(
            fd.as_fd(),
            path,
            MsFlags::MS_RDONLY | MsFlags::MS_REC,
            MsFlags::empty(),
        )
        .map_err(|e| match e {
            MountError::Remount { errno, .. } => RootfsError::Readonly {
                path: path.clone(),
                errno,
            },
            other => other.into(),
        })?;
    }
    if plan.readonly_root {
        let fd = rustix::fs::open(
            "/",
            OFlags::PATH | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| RootfsError::ReadonlyRoot(Errno::from_raw(e.raw_os_error())))?;
        mounts::remount_bind(
            fd.as_fd(),
            Path::new("/"),
            MsFlags::MS_RDONLY,
            MsFlags::empty(),
        )
        .map_err(|e| match e {
            MountError::Remount { errno, .. } => RootfsError::ReadonlyRoot(errno),
            other => other.into(),
        })?;
    }
    Ok(())
}
