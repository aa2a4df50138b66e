//! Forking straight into a cgroup v2 directory (`clone3` with
//! `CLONE_INTO_CGROUP`, Linux 5.7), so that the new process never has to be
//! moved. Moving a process (a write to `cgroup.procs`) takes the kernel's
//! global threadgroup lock for writing, which waits for an RCU grace period
//! unless the host mounted cgroups with `favordynmods`: 5–15 ms on every
//! container create and exec. Birth in the cgroup takes only the read side.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Pid};

/// From `linux/sched.h`; libc's constant is an `i32` that cannot hold it.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// The cgroup v2 directory among `cgroup_procs` (paths of `cgroup.procs`
/// files; on a hybrid host one of them may be on the v2 hierarchy), opened
/// for `CLONE_INTO_CGROUP`, and the procs files that still need a write.
pub(crate) fn split_v2(cgroup_procs: &[PathBuf]) -> (Option<OwnedFd>, Vec<&Path>) {
    let mut v2 = None;
    let mut rest = Vec::new();
    for procs in cgroup_procs {
        if v2.is_none()
            && let Some(dir) = procs.parent()
            && is_cgroup2(dir)
            && let Ok(fd) = rustix::fs::open(
                dir,
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
        {
            v2 = Some(fd);
            continue;
        }
        rest.push(procs.as_path());
    }
    (v2, rest)
}

/// Whether `dir` is on a cgroup v2 hierarchy.
pub(crate) fn is_cgroup2(dir: &Path) -> bool {
    rustix::fs::statfs(dir).is_ok_and(|s| {
        // f_type's width differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        let magic = s.f_type as i64;
        magic == CGROUP2_SUPER_MAGIC
    })
}

/// Like `fork()`, but the child starts in the cgroup `dir`. `Err(ENOSYS)`,
/// `E2BIG` or `EINVAL` mean a kernel without `clone3` or without
/// `CLONE_INTO_CGROUP`; the caller then forks and writes `cgroup.procs`.
///
/// # Safety
///
/// As for `fork()`: the caller is single-threaded. The child must not rely on
/// glibc's fork bookkeeping (atfork handlers, the cached thread id that
/// `raise` uses); the executor's children only make system calls, allocate,
/// and end in `_exit` or `execve`.
#[allow(unsafe_code)]
pub(crate) unsafe fn fork_into(dir: &OwnedFd) -> Result<ForkResult, Errno> {
    // SAFETY: the caller's contract is this function's.
    unsafe { clone3(Some(dir), CloneFlags::empty()) }
}

/// `fork_into` with namespace flags (`CLONE_NEWPID`): the child is born in
/// the cgroup `dir`, when given, and in the new namespaces. `Err(ENOSYS)` or
/// `E2BIG` mean a kernel without `clone3`; `EINVAL` also one without
/// `CLONE_INTO_CGROUP`.
///
/// # Safety
///
/// As for [`fork_into`].
#[allow(unsafe_code)]
pub(crate) unsafe fn clone3(dir: Option<&OwnedFd>, flags: CloneFlags) -> Result<ForkResult, Errno> {
    let mut args = CloneArgs {
        flags: flags.bits() as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(dir) = dir {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
    }
    // SAFETY: `args` is a valid, initialised clone_args of the size passed;
    // without CLONE_VM and without a stack the child runs on a copy of this
    // process's memory like after fork(), which the caller's contract allows.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        -1 => Err(Errno::last()),
        0 => Ok(ForkResult::Child),
        pid => Ok(ForkResult::Parent {
            child: Pid::from_raw(pid as i32),
        }),
    }
}

/// Whether `fork_into` failed because the kernel cannot do it at all.
pub(crate) fn unsupported(errno: Errno) -> bool {
    matches!(errno, Errno::ENOSYS | Errno::E2BIG | Errno::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_args_has_the_kernel_layout_of_version_2() {
        assert_eq!(std::mem::size_of::<CloneArgs>(), 88);
    }

    #[test]
    fn procs_files_off_cgroup2_all_need_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let procs = vec![
            dir.path().join("a/cgroup.procs"),
            dir.path().join("cgroup.procs"),
        ];
        let (v2, rest) = split_v2(&procs);
        assert!(v2.is_none());
        assert_eq!(rest, vec![procs[0].as_path(), procs[1].as_path()]);
    }
}
