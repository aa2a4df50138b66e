//! A pod's shared namespaces (network, IPC, UTS and, with `hostUsers:
//! false`, user), pinned by bind mounts so that a pod needs no process of
//! its own (CRI-O's `pinns`).
//!
//! The namespaces are made by a thread of the daemon's own, which joins the
//! pins' mount namespace, unshares the pod's namespaces, binds them and
//! ends: namespaces are per thread, so nothing else of the daemon moves.
//! A user namespace is the exception: only a single-threaded process may
//! make one, and the pod's other namespaces must be made inside it to be
//! owned by it. So a short-lived holder process makes them all (`userns`);
//! the thread joins its other namespaces and pins them.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::executor::sysctl;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op}: {errno}")]
    Sys {
        op: String,
        errno: nix::errno::Errno,
    },
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    /// A thread that makes or removes pins (see `pin_ns`) could not do it.
    #[error("pin pod namespaces: {0}")]
    Thread(String),
    #[error(transparent)]
    Mount(#[from] crate::executor::mounts::MountError),
}

/// Which namespaces a pod gets of its own, and what goes into them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinRequest {
    pub net: bool,
    pub ipc: bool,
    pub uts: bool,
    pub hostname: String,
    /// Pod-level sysctls, already checked to belong to the new namespaces.
    pub sysctls: Vec<(String, String)>,
    /// The pod's own user namespace, which then owns the others.
    pub user: Option<UserNamespaceMaps>,
}

/// A pod user namespace's id maps, as `/proc/<pid>/{uid,gid}_map` take them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserNamespaceMaps {
    pub uid_map: String,
    pub gid_map: String,
}

impl UserNamespaceMaps {
    /// Uids and gids 0..`length` as the host's `host_id`.. alike.
    pub fn one_range(host_id: u32, length: u32) -> UserNamespaceMaps {
        let map = format!("0 {host_id} {length}\n");
        UserNamespaceMaps {
            uid_map: map.clone(),
            gid_map: map,
        }
    }
}

impl PinRequest {
    fn flags(&self) -> CloneFlags {
        let mut flags = CloneFlags::empty();
        for (wanted, flag) in [
            (self.net, CloneFlags::CLONE_NEWNET),
            (self.ipc, CloneFlags::CLONE_NEWIPC),
            (self.uts, CloneFlags::CLONE_NEWUTS),
        ] {
            if wanted {
                flags |= flag;
            }
        }
        flags
    }

    /// Checks the sysctls against the namespaces the pod owns, before
    /// anything is made: a host-wide key or one for a shared namespace is
    /// refused.
    pub fn check_sysctls(&self) -> Result<(), PinError> {
        let map = self.sysctls.iter().cloned().collect();
        sysctl::plan(Some(&map), self.flags())?;
        Ok(())
    }

    /// The pins `pin` makes in `dir`, by namespace name.
    pub fn pins(&self, dir: &Path) -> Vec<(&'static str, PathBuf)> {
        [
            ("net", self.net),
            ("ipc", self.ipc),
            ("uts", self.uts),
            ("user", self.user.is_some()),
        ]
        .into_iter()
        .filter(|(_, wanted)| *wanted)
        .map(|(name, _)| (name, dir.join(name)))
        .collect()
    }
}

/// Removes pins made in the daemon's own mount namespace, as berth did
/// before `pin_ns` (pods from then keep theirs there); missing ones are
/// fine, so this is idempotent.
pub fn unpin(dir: &Path, request: &PinRequest) -> Result<(), PinError> {
    for (_, path) in request.pins(dir) {
        unpin_one(&path)?;
    }
    Ok(())
}

/// Unmounts one pin (any nsfs bind) and removes its file; missing either
/// is fine.
pub(super) fn unpin_one(path: &Path) -> Result<(), PinError> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(errno) => {
            return Err(PinError::Sys {
                op: format!("unmount namespace pin {}", path.display()),
                errno,
            });
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PinError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Makes the pod's namespaces and pins them in `dir`, inside the mount
/// namespace pinned at `mount_ns` (see `pin_ns`). The calling thread is
/// left in all of them but the user namespace: call it on a thread of its
/// own that ends after it. namespaces(7) are per thread, so the daemon's
/// other threads keep theirs. A pod with a user namespace of its own gets
/// its namespaces from a holder process (`userns`), which is gone when
/// this returns.
pub(super) fn make_and_pin(
    dir: &Path,
    mount_ns: &Path,
    request: &PinRequest,
) -> Result<(), PinError> {
    let flags = request.flags();
    let planned = {
        let map = request.sysctls.iter().cloned().collect();
        sysctl::plan(Some(&map), flags)?
    };
    let holder = match &request.user {
        Some(maps) => Some(super::userns::Holder::start(flags, maps)?),
        None => None,
    };
    super::pin_ns::join(mount_ns)?;
    match &holder {
        Some(holder) => holder.join(flags)?,
        None => nix::sched::unshare(flags).map_err(|errno| PinError::Sys {
            op: format!("unshare {flags:?}"),
            errno,
        })?,
    }
    if request.uts && !request.hostname.is_empty() {
        nix::unistd::sethostname(&request.hostname).map_err(|errno| PinError::Sys {
            op: format!("sethostname {:?}", request.hostname),
            errno,
        })?;
    }
    // /proc/sys/net and the IPC keys are those of the thread writing them:
    // this one, now.
    sysctl::apply(&planned)?;
    std::fs::create_dir_all(dir).map_err(|source| PinError::Io {
        op: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    for (name, path) in request.pins(dir) {
        std::fs::File::create(&path).map_err(|source| PinError::Io {
            op: "create",
            path: path.clone(),
            source,
        })?;
        // thread-self: /proc/self would name the main thread's namespaces.
        // The user namespace is only the holder's.
        let source = match (&holder, name) {
            (Some(holder), "user") => holder.namespace("user"),
            _ => PathBuf::from("/proc/thread-self/ns").join(name),
        };
        nix::mount::mount(
            Some(&source),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|errno| PinError::Sys {
            op: format!("bind {} on {}", source.display(), path.display()),
            errno,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_wide_and_shared_namespace_sysctls_are_refused() {
        let request = PinRequest {
            net: true,
            sysctls: vec![("kernel.panic".into(), "1".into())],
            ..PinRequest::default()
        };
        assert!(request.check_sysctls().is_err());
        let request = PinRequest {
            net: true,
            ipc: false,
            sysctls: vec![("kernel.shmmax".into(), "1".into())],
            ..PinRequest::default()
        };
        assert!(
            request.check_sysctls().is_err(),
            "IPC key with the host's IPC namespace"
        );
        let request = PinRequest {
            net: true,
            ipc: true,
            sysctls: vec![
                ("kernel.shmmax".into(), "1".into()),
                ("net.ipv4.ping_group_range".into(), "0 0".into()),
            ],
            ..PinRequest::default()
        };
        request.check_sysctls().expect("namespaced keys");
    }

    #[test]
    fn pins_are_named_after_their_namespaces() {
        let request = PinRequest {
            net: true,
            uts: true,
            ..PinRequest::default()
        };
        let pins = request.pins(Path::new("/run/berth/pods/x/ns"));
        assert_eq!(
            pins,
            vec![
                ("net", PathBuf::from("/run/berth/pods/x/ns/net")),
                ("uts", PathBuf::from("/run/berth/pods/x/ns/uts"))
            ]
        );
    }
}
