//! A pod's shared namespaces (network, IPC, UTS), pinned by bind mounts so
//! that a pod needs no process of its own (CRI-O's `pinns`).
//!
//! The namespaces are made by `berth ns-pin`, a single-threaded re-exec of
//! the daemon's binary: `unshare(2)` of a network namespace from the
//! multi-threaded tokio daemon would move only one of its threads.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    #[error("pin pod namespaces: {0}")]
    Helper(String),
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
        [("net", self.net), ("ipc", self.ipc), ("uts", self.uts)]
            .into_iter()
            .filter(|(_, wanted)| *wanted)
            .map(|(name, _)| (name, dir.join(name)))
            .collect()
    }
}

/// Makes the namespaces by running `berth ns-pin` and waiting for it; the
/// helper pins them in `dir`, inside the mount namespace pinned at
/// `mount_ns` (see `pin_ns`). Blocking. A failed helper may leave some
/// pins: the caller removes them.
pub fn run_pin_helper(dir: &Path, mount_ns: &Path, request: &PinRequest) -> Result<(), PinError> {
    request.check_sysctls()?;
    if request.flags().is_empty() {
        return Ok(());
    }
    // Fix: the path `current_exe` names is gone once the binary is
    // replaced (a package upgrade before the daemon's restart), and every
    // RunPodSandbox failed with ENOENT; /proc/self/exe still runs this
    // daemon's own binary, as the zygote does.
    let exe = Path::new("/proc/self/exe");
    let mut args: Vec<OsString> = vec![
        "ns-pin".into(),
        "--mount-ns".into(),
        mount_ns.into(),
        "--dir".into(),
        dir.into(),
    ];
    for (flag, wanted) in [
        ("--net", request.net),
        ("--ipc", request.ipc),
        ("--uts", request.uts),
    ] {
        if wanted {
            args.push(flag.into());
        }
    }
    if request.uts && !request.hostname.is_empty() {
        args.push("--hostname".into());
        args.push(request.hostname.clone().into());
    }
    for (key, value) in &request.sysctls {
        args.push("--sysctl".into());
        args.push(format!("{key}={value}").into());
    }
    let output = Command::new(exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| PinError::Helper(format!("run berth ns-pin: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = stderr.trim().trim_start_matches("berth: ");
        return Err(PinError::Helper(if message.is_empty() {
            format!("berth ns-pin exited with {}", output.status)
        } else {
            message.to_string()
        }));
    }
    Ok(())
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

/// The body of `berth ns-pin`: runs in a fresh single-threaded process.
/// The pins go in `dir`, inside the mount namespace pinned at `mount_ns`.
pub fn pin_main(dir: &Path, mount_ns: &Path, request: &PinRequest) -> Result<(), PinError> {
    let flags = request.flags();
    let planned = {
        let map = request.sysctls.iter().cloned().collect();
        sysctl::plan(Some(&map), flags)?
    };
    nix::sched::unshare(flags).map_err(|errno| PinError::Sys {
        op: format!("unshare {flags:?}"),
        errno,
    })?;
    if request.uts && !request.hostname.is_empty() {
        nix::unistd::sethostname(&request.hostname).map_err(|errno| PinError::Sys {
            op: format!("sethostname {:?}", request.hostname),
            errno,
        })?;
    }
    // /proc/sys/net and the IPC keys read the namespaces of the process
    // writing them: ours, now.
    sysctl::apply(&planned)?;
    let file = std::fs::File::open(mount_ns).map_err(|source| PinError::Io {
        op: "open",
        path: mount_ns.to_path_buf(),
        source,
    })?;
    nix::sched::setns(file, CloneFlags::CLONE_NEWNS).map_err(|errno| PinError::Sys {
        op: format!("join the mount namespace {}", mount_ns.display()),
        errno,
    })?;
    std::fs::create_dir_all(dir).map_err(|source| PinError::Io {
        op: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut made = Vec::new();
    let result = (|| {
        for (name, path) in request.pins(dir) {
            std::fs::File::create(&path).map_err(|source| PinError::Io {
                op: "create",
                path: path.clone(),
                source,
            })?;
            made.push(path.clone());
            let source = PathBuf::from("/proc/self/ns").join(name);
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
    })();
    if result.is_err() {
        for path in made {
            let _ = unpin_one(&path);
        }
    }
    result
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
