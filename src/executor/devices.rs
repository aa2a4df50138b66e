//! Device nodes in the container's `/dev`: the defaults every container gets
//! (null zero full random urandom tty, and the links ptmx, fd, stdin, stdout,
//! stderr) and the spec's `linux.devices`. Nodes are made with mknod; where
//! that is not allowed (a user namespace) the host's node is bind-mounted
//! onto an empty file instead, as runc does. Paths are resolved inside the
//! rootfs like mount targets (see `mounts`).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::mount::{MsFlags, mount};
use nix::sys::stat::{Mode, SFlag, makedev, mknodat};
use nix::unistd::{Gid, Uid, fchownat};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};
use rustix::fs::OFlags;

use super::mounts::{self, MountError, fd_path, open_in_root};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {path:?}: type {kind} cannot be created")]
    BadType { path: PathBuf, kind: String },
    #[error("device {path:?}: path must be absolute and without \"..\"")]
    BadPath { path: PathBuf },
    #[error("create device {path:?}: {errno}")]
    Create { path: PathBuf, errno: Errno },
    #[error("bind host device {host:?} onto {path:?}: {errno}")]
    Bind {
        host: PathBuf,
        path: PathBuf,
        errno: Errno,
    },
    #[error("symlink {path:?} -> {target:?}: {errno}")]
    Link {
        path: PathBuf,
        target: String,
        errno: Errno,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
}

/// A device node to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Absolute path inside the container.
    pub path: PathBuf,
    pub kind: SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

fn char_dev(name: &str, major: u64, minor: u64) -> DeviceNode {
    DeviceNode {
        path: PathBuf::from("/dev").join(name),
        kind: SFlag::S_IFCHR,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    }
}

/// The devices every container gets (runc's list).
pub fn default_devices() -> Vec<DeviceNode> {
    vec![
        char_dev("null", 1, 3),
        char_dev("zero", 1, 5),
        char_dev("full", 1, 7),
        char_dev("random", 1, 8),
        char_dev("urandom", 1, 9),
        char_dev("tty", 5, 0),
    ]
}

/// The spec's devices, checked in the parent.
pub fn spec_devices(devices: &[LinuxDevice]) -> Result<Vec<DeviceNode>, DeviceError> {
    devices
        .iter()
        .map(|d| {
            let path = d.path().clone();
            let clean = mounts::clean_destination(&path)
                .map_err(|_| DeviceError::BadPath { path: path.clone() })?;
            if !path.is_absolute() {
                return Err(DeviceError::BadPath { path });
            }
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
                LinuxDeviceType::B => SFlag::S_IFBLK,
                LinuxDeviceType::P => SFlag::S_IFIFO,
                LinuxDeviceType::A => {
                    return Err(DeviceError::BadType {
                        path,
                        kind: "a".into(),
                    });
                }
            };
            Ok(DeviceNode {
                path: clean,
                kind,
                major: u64::try_from(d.major()).unwrap_or(0),
                minor: u64::try_from(d.minor()).unwrap_or(0),
                mode: d.file_mode().unwrap_or(0o666) & 0o7777,
                uid: d.uid().unwrap_or(0),
                gid: d.gid().unwrap_or(0),
            })
        })
        .collect()
}

/// Creates `node` inside the root. `bind_fallback`: when mknod is refused,
/// bind the host's node at the same path.
pub fn create_device(root: BorrowedFd<'_>, node: &DeviceNode) -> Result<(), DeviceError> {
    let rel = node.path.strip_prefix("/").unwrap_or(&node.path);
    let (parent, name) = match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => {
            return Err(DeviceError::BadPath {
                path: node.path.clone(),
            });
        }
    };
    let dir = mounts::mkdir_all(root, parent)?;
    let dev = makedev(node.major, node.minor);
    match mknodat(
        dir.as_fd(),
        name,
        node.kind,
        Mode::from_bits_truncate(node.mode),
        dev,
    ) {
        Ok(()) => {
            fchownat(
                dir.as_fd(),
                name,
                Some(Uid::from_raw(node.uid)),
                Some(Gid::from_raw(node.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|errno| DeviceError::Create {
                path: node.path.clone(),
                errno,
            })?;
            // mknod applies the umask; set the mode the spec asked for.
            let fd =
                open_in_root(root, rel, OFlags::PATH).map_err(|errno| DeviceError::Create {
                    path: node.path.clone(),
                    errno,
                })?;
            rustix::fs::chmod(
                fd_path(fd.as_fd()).as_path(),
                rustix::fs::Mode::from_raw_mode(node.mode),
            )
            .map_err(|e| DeviceError::Create {
                path: node.path.clone(),
                errno: Errno::from_raw(e.raw_os_error()),
            })?;
            Ok(())
        }
        // Already there (an image that ships /dev/null): keep it.
        Err(Errno::EEXIST) => Ok(()),
        Err(Errno::EPERM) => bind_host_device(root, node, rel),
        Err(errno) => Err(DeviceError::Create {
            path: node.path.clone(),
            errno,
        }),
    }
}

fn bind_host_device(
    root: BorrowedFd<'_>,
    node: &DeviceNode,
    rel: &Path,
) -> Result<(), DeviceError> {
    let target = mounts::ensure_file(root, rel)?;
    let host = node.path.clone();
    mount(
        Some(&host),
        &fd_path(target.as_fd()),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|errno| DeviceError::Bind {
        host,
        path: node.path.clone(),
        errno,
    })
}

/// The standard links in `/dev`. A `/dev/ptmx` node from the image is
/// replaced: the container's ptys come from its own devpts instance.
pub fn create_links(root: BorrowedFd<'_>) -> Result<(), DeviceError> {
    let dev = mounts::mkdir_all(root, Path::new("dev"))?;
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, target) in links {
        if name == "ptmx" {
            let _ = rustix::fs::unlinkat(&dev, name, rustix::fs::AtFlags::empty());
        }
        match rustix::fs::symlinkat(target, &dev, name) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err(DeviceError::Link {
                    path: PathBuf::from("/dev").join(name),
                    target: target.into(),
                    errno: Errno::from_raw(e.raw_os_error()),
                });
            }
        }
    }
    Ok(())
}
