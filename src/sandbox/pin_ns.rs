//! The mount namespace the pods' namespace pins live in.
//!
//! Pinned in the daemon's (the host's) mount namespace, the pins of 1000
//! pods were 3000 of its 4000 mounts, and every CreateContainer copies the
//! whole table into the container's new mount namespace and detaches it
//! again (~7 ms for `unshare(CLONE_NEWNS)` alone at that size); every
//! process on the node that reads its mountinfo read them too. So the pins
//! are made in a mount namespace of their own, which holds nothing of the
//! host's: a tmpfs root with `/proc`, and `/<pod id>/{net,ipc,uts}`.
//!
//! That namespace is pinned itself, by one bind mount at `<state>/pins`, so
//! pods outlive the daemon as they did: a restarted daemon joins it again.
//! Unmounting that one file releases every pin in it.
//!
//! The daemon keeps one thread inside it, which makes the namespace's files
//! reachable from anywhere through the thread's root,
//! `/proc/<daemon>/task/<thread>/root/<pod id>/net`: containers, CNI plugins
//! and the daemon open the pins by those paths. The thread also removes
//! pins: an unmount must be made from inside the namespace.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use super::namespaces::{PinError, PinRequest};

/// The pin of the namespace, in the state directory.
const PIN_FILE: &str = "pins";

/// What the daemon's thread in the namespace is asked: remove a pod's pins.
struct Unpin {
    pod_id: String,
    kinds: Vec<&'static str>,
    done: mpsc::Sender<Result<(), PinError>>,
}

/// The pins' mount namespace and the daemon's thread in it.
pub struct PinNamespace {
    /// `<state>/pins`: the namespace's pin in the host's mount namespace.
    pin: PathBuf,
    /// The thread's root: the namespace's root as every process sees it.
    root: PathBuf,
    unpins: mpsc::Sender<Unpin>,
}

fn sys(op: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> PinError {
    move |errno| PinError::Sys {
        op: op.into(),
        errno,
    }
}

impl PinNamespace {
    /// Joins the namespace pinned under `state`, or makes and pins one.
    /// Blocking.
    pub fn open(state: &Path) -> Result<PinNamespace, PinError> {
        let pin = state.join(PIN_FILE);
        let existing = is_namespace_pin(&pin);
        let (ready_tx, ready_rx) = mpsc::channel();
        let (unpins, requests) = mpsc::channel();
        let (join, mountpoint) = (existing.then(|| pin.clone()), state.to_path_buf());
        std::thread::Builder::new()
            .name("berth-pins".into())
            .spawn(move || {
                let entered = enter(join.as_deref(), &mountpoint).map(|()| nix::unistd::gettid());
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    serve(requests);
                }
            })
            .map_err(|source| PinError::Io {
                op: "start the thread of",
                path: pin.clone(),
                source,
            })?;
        let tid = ready_rx
            .recv()
            .map_err(|_| PinError::Thread("the pins' thread ended before it was ready".into()))??;
        let task = PathBuf::from(format!("/proc/{}/task/{tid}", std::process::id()));
        if !existing {
            pin_namespace(&task.join("ns/mnt"), &pin)?;
        }
        Ok(PinNamespace {
            pin,
            root: task.join("root"),
            unpins,
        })
    }

    /// Where the pod's pins are, as the daemon's children see them.
    pub fn pod_dir(&self, pod_id: &str) -> PathBuf {
        self.root.join(pod_id)
    }

    /// Where the pod's pins are inside the namespace.
    fn inner_dir(pod_id: &str) -> PathBuf {
        Path::new("/").join(pod_id)
    }

    /// Makes the pod's namespaces and pins them here, from a thread that
    /// joins this namespace and ends (`namespaces::make_and_pin`). The
    /// request's sysctls were checked with the pod's config (`validate`).
    /// Blocking. On failure nothing is left pinned.
    pub fn pin(&self, pod_id: &str, request: &PinRequest) -> Result<(), PinError> {
        if !(request.net || request.ipc || request.uts || request.user.is_some()) {
            return Ok(());
        }
        let dir = Self::inner_dir(pod_id);
        let result = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("berth-ns-pin".into())
                .spawn_scoped(scope, || {
                    super::namespaces::make_and_pin(&dir, &self.pin, request)
                })
                .map_err(|source| PinError::Io {
                    op: "start a thread to pin in",
                    path: self.pin.clone(),
                    source,
                })?
                .join()
                .unwrap_or_else(|_| Err(PinError::Thread("the pinning thread panicked".into())))
        });
        if result.is_err() {
            self.unpin(pod_id, request)?;
        }
        result
    }

    /// Removes the pod's pins and its directory here; missing ones are
    /// fine, so this is idempotent. Blocking.
    pub fn unpin(&self, pod_id: &str, request: &PinRequest) -> Result<(), PinError> {
        let kinds = request
            .pins(Path::new(""))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let (done, result) = mpsc::channel();
        self.unpins
            .send(Unpin {
                pod_id: pod_id.to_string(),
                kinds,
                done,
            })
            .map_err(|_| gone())?;
        result.recv().map_err(|_| gone())?
    }

    /// Removes the namespace's pin, which releases every pin in it once
    /// this daemon's thread is gone too. For a daemon that stops with no
    /// pod left.
    pub fn release(&self) -> Result<(), PinError> {
        super::namespaces::unpin_one(&self.pin)
    }
}

fn gone() -> PinError {
    PinError::Thread("the pins' thread is gone".into())
}

/// True when `path` is a pinned mount namespace (a bind of an nsfs file).
fn is_namespace_pin(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    rustix::fs::fstatfs(file.as_fd()).is_ok_and(|s| s.f_type == NSFS_MAGIC)
}

/// `NSFS_MAGIC` from linux/magic.h.
const NSFS_MAGIC: rustix::fs::FsWord = 0x6e73_6673;

/// Puts the calling thread alone into the mount namespace pinned at `pin`.
pub(super) fn join(pin: &Path) -> Result<(), PinError> {
    own_root_and_cwd()?;
    let file = std::fs::File::open(pin).map_err(|source| PinError::Io {
        op: "open",
        path: pin.to_path_buf(),
        source,
    })?;
    nix::sched::setns(file, CloneFlags::CLONE_NEWNS)
        .map_err(sys(format!("join the mount namespace {}", pin.display())))
}

/// A thread shares its root and working directory with the whole process;
/// a mount namespace can only be entered or made with its own.
fn own_root_and_cwd() -> Result<(), PinError> {
    nix::sched::unshare(CloneFlags::CLONE_FS).map_err(sys("unshare CLONE_FS"))
}

/// Puts the calling thread into the namespace: joins the one pinned at
/// `existing`, or makes a new one at `mountpoint` (any directory: the new
/// root's tmpfs is mounted over it, inside the new namespace only).
fn enter(existing: Option<&Path>, mountpoint: &Path) -> Result<(), PinError> {
    if let Some(pin) = existing {
        return join(pin);
    }
    own_root_and_cwd()?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare CLONE_NEWNS"))?;
    // Nothing made here may reach the host, nor the host's later mounts
    // come here.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("make / private"))?;
    nix::mount::mount(
        Some("tmpfs"),
        mountpoint,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(sys(format!("mount tmpfs on {}", mountpoint.display())))?;
    let proc_dir = mountpoint.join("proc");
    std::fs::create_dir(&proc_dir).map_err(|source| PinError::Io {
        op: "create",
        path: proc_dir.clone(),
        source,
    })?;
    // Pods' namespaces are bound from /proc/thread-self/ns in here.
    nix::mount::mount(
        Some("/proc"),
        &proc_dir,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys("bind /proc"))?;
    // The host's tree goes: a copy of it here would hold on to whatever
    // was mounted when the namespace was made (a volume, a disk).
    nix::unistd::chdir(mountpoint).map_err(sys(format!("chdir {}", mountpoint.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root"))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the old root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))
}

/// Binds the namespace `ns` (an nsfs file) onto `pin`, made as an empty
/// file first.
fn pin_namespace(ns: &Path, pin: &Path) -> Result<(), PinError> {
    std::fs::File::create(pin).map_err(|source| PinError::Io {
        op: "create",
        path: pin.to_path_buf(),
        source,
    })?;
    nix::mount::mount(Some(ns), pin, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(sys(format!("bind {} on {}", ns.display(), pin.display())))
}

/// The thread's work, inside the namespace, until the daemon drops its
/// end of the channel.
fn serve(requests: mpsc::Receiver<Unpin>) {
    while let Ok(Unpin {
        pod_id,
        kinds,
        done,
    }) = requests.recv()
    {
        let _ = done.send(unpin_here(&pod_id, &kinds));
    }
}

fn unpin_here(pod_id: &str, kinds: &[&'static str]) -> Result<(), PinError> {
    let dir = PinNamespace::inner_dir(pod_id);
    for kind in kinds {
        super::namespaces::unpin_one(&dir.join(kind))?;
    }
    match std::fs::remove_dir(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PinError::Io {
            op: "remove",
            path: dir,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn is_root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("skipped: needs root (mount namespaces)");
        }
        root
    }

    /// The inode of the mount namespace of the thread behind `pins`.
    fn namespace_of(pins: &PinNamespace) -> u64 {
        let task = pins.root.parent().expect("the root is in a task dir");
        std::fs::metadata(task.join("ns/mnt"))
            .expect("the thread's mount namespace")
            .ino()
    }

    #[test]
    fn a_new_namespace_holds_nothing_of_the_hosts_and_is_joined_again() {
        if !is_root() {
            return;
        }
        let state = tempfile::tempdir().expect("tempdir");
        let pin = state.path().join(PIN_FILE);
        let first = PinNamespace::open(state.path()).expect("make");
        assert!(is_namespace_pin(&pin));
        // The thread's mountinfo is the namespace's.
        let task = first.root.parent().expect("the root is in a task dir");
        let mut mounts: Vec<PathBuf> = std::fs::read_to_string(task.join("mountinfo"))
            .expect("mountinfo")
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .collect();
        mounts.sort();
        assert_eq!(mounts, [PathBuf::from("/"), PathBuf::from("/proc")]);
        let own = std::fs::metadata("/proc/thread-self/ns/mnt")
            .expect("own mount namespace")
            .ino();
        assert_ne!(namespace_of(&first), own);
        // Its tmpfs root was mounted over the state directory in there only.
        let host = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let state_shown = state.path().display().to_string();
        assert!(
            !host
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(state_shown.as_str())),
            "{host}"
        );

        // A daemon started again joins the same namespace.
        let second = PinNamespace::open(state.path()).expect("join");
        assert_eq!(namespace_of(&second), namespace_of(&first));
        assert_eq!(second.pod_dir("p"), second.root.join("p"));
        let request = PinRequest {
            net: true,
            ipc: true,
            ..PinRequest::default()
        };
        second.unpin("never-pinned", &request).expect("idempotent");

        first.release().expect("release");
        assert!(!pin.exists());
        second.release().expect("release again");
    }
}
