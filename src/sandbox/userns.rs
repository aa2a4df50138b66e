//! A pod's own user namespace (`hostUsers: false`) is made by a holder: a
//! fork of the daemon that unshares it, with the pod's other namespaces
//! made inside it so that it owns them, and waits. Only a single-threaded
//! process may make a user namespace, and the daemon has threads; the
//! fork has one. The daemon writes the namespace's id maps, pins what it
//! needs from `/proc/<holder>/ns/` and lets the holder go.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid};

use super::namespaces::{PinError, UserNamespaceMaps};

/// A process in a new user namespace (and in the new namespaces it was
/// asked for, made inside it). It waits until dropped; the drop ends and
/// reaps it. Tests hold user namespaces with it too.
pub(crate) struct Holder {
    pid: Pid,
    /// The write end of the pipe the holder waits on: closed, it exits.
    release: Option<OwnedFd>,
}

impl Holder {
    /// Forks the holder into a new user namespace and `flags`, and writes
    /// the namespace's id maps. Blocking.
    pub(crate) fn start(flags: CloneFlags, maps: &UserNamespaceMaps) -> Result<Holder, PinError> {
        let flags = flags | CloneFlags::CLONE_NEWUSER;
        let sys = |op: &str| {
            let op = op.to_string();
            move |errno| PinError::Sys { op, errno }
        };
        let (ready_read, ready_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe for the holder"))?;
        let (hold_read, hold_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe for the holder"))?;
        // SAFETY: the daemon has threads, so the child may only make
        // async-signal-safe calls until it ends: it closes fds, unshares,
        // writes and reads a pipe and `_exit`s, all plain system calls, and
        // never returns into code that could take a lock another thread
        // held at the fork.
        #[allow(unsafe_code)]
        let forked = unsafe { nix::unistd::fork() }.map_err(sys("fork the holder"))?;
        let pid = match forked {
            ForkResult::Child => {
                drop(ready_read);
                drop(hold_write);
                let made = nix::sched::unshare(flags).is_ok();
                let _ = nix::unistd::write(&ready_write, &[u8::from(made)]);
                let mut byte = [0u8; 1];
                let _ = nix::unistd::read(hold_read.as_fd(), &mut byte);
                // SAFETY: ends the child at once: no destructors or exit
                // handlers of the parent's run in it.
                #[allow(unsafe_code)]
                unsafe {
                    libc::_exit(0)
                }
            }
            ForkResult::Parent { child } => child,
        };
        drop(ready_write);
        drop(hold_read);
        let holder = Holder {
            pid,
            release: Some(hold_write),
        };
        let mut made = [0u8; 1];
        let n = nix::unistd::read(ready_read.as_fd(), &mut made)
            .map_err(sys("hear from the holder"))?;
        if n != 1 || made[0] != 1 {
            return Err(PinError::Thread(format!(
                "the holder could not unshare {flags:?} (user.max_user_namespaces?)"
            )));
        }
        // Written by this privileged process, a gid map needs no
        // `setgroups deny`: the pod's processes may set their groups.
        for (file, map) in [("uid_map", &maps.uid_map), ("gid_map", &maps.gid_map)] {
            let path = PathBuf::from(format!("/proc/{pid}/{file}"));
            std::fs::write(&path, map).map_err(|source| PinError::Io {
                op: "write",
                path,
                source,
            })?;
        }
        Ok(holder)
    }

    /// The holder's namespace of `kind` (`user`, `net`, ...).
    pub(crate) fn namespace(&self, kind: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/{kind}", self.pid))
    }

    /// Moves the calling thread into the holder's namespaces among `flags`
    /// (not its user namespace: a thread of a threaded process cannot
    /// join one, and need not, being privileged over it from outside).
    pub(super) fn join(&self, flags: CloneFlags) -> Result<(), PinError> {
        for (flag, kind) in [
            (CloneFlags::CLONE_NEWNET, "net"),
            (CloneFlags::CLONE_NEWIPC, "ipc"),
            (CloneFlags::CLONE_NEWUTS, "uts"),
        ] {
            if !flags.contains(flag) {
                continue;
            }
            let path = self.namespace(kind);
            let ns = std::fs::File::open(&path).map_err(|source| PinError::Io {
                op: "open",
                path: path.clone(),
                source,
            })?;
            nix::sched::setns(&ns, flag).map_err(|errno| PinError::Sys {
                op: format!("join {}", path.display()),
                errno,
            })?;
        }
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Its pipe closed, the holder exits; the kill is for one that is
        // not yet reading it.
        drop(self.release.take());
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}

/// Whether the kernel and the filesystem of `dir` take idmapped mounts,
/// which the containers of pods with user namespaces of their own need
/// for their layers and volumes: a clone of `dir` is idmapped through a
/// holder's new user namespace and dropped unattached. Blocking.
pub fn idmapped_mounts_work(dir: &Path) -> Result<(), PinError> {
    let holder = Holder::start(
        CloneFlags::empty(),
        &UserNamespaceMaps::one_range(100_000, 65536),
    )?;
    let path = holder.namespace("user");
    let userns = std::fs::File::open(&path).map_err(|source| PinError::Io {
        op: "open",
        path,
        source,
    })?;
    crate::executor::mounts::idmapped_tree(dir, false, userns.as_fd(), 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_owns_the_namespaces_it_was_asked_for_and_goes_when_dropped() {
        if !crate::executor::test_support::root_or_skip("user namespaces") {
            return;
        }
        let maps = UserNamespaceMaps::one_range(300_000, 65536);
        let holder = Holder::start(CloneFlags::CLONE_NEWNET, &maps).expect("holder");
        let pid = holder.pid;
        let uid_map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).expect("uid_map");
        assert_eq!(
            uid_map.split_whitespace().collect::<Vec<_>>(),
            ["0", "300000", "65536"]
        );
        let ours = |kind: &str| std::fs::read_link(format!("/proc/self/ns/{kind}")).ok();
        let its = |kind: &str| std::fs::read_link(holder.namespace(kind)).ok();
        assert_ne!(its("user"), ours("user"));
        assert_ne!(its("net"), ours("net"));
        assert_eq!(its("ipc"), ours("ipc"), "only what was asked for");
        drop(holder);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the holder is gone and reaped"
        );
    }

    #[test]
    fn this_host_takes_idmapped_mounts() {
        if !crate::executor::test_support::root_or_skip("user namespaces, idmapped mounts") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        idmapped_mounts_work(dir.path()).expect("kernel 6.x on ext4 or tmpfs");
        assert!(
            idmapped_mounts_work(&dir.path().join("missing")).is_err(),
            "a missing directory is no answer"
        );
    }
}
