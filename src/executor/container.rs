//! Creating a container in two steps: [`create`] sets the init process up
//! completely and parks it right before `execve`; [`Created::start`]
//! releases it. Everything that can fail without the container's
//! filesystem is checked in the caller before anything is forked.
//!
//! Processes (the caller must be single-threaded: `berth monitor`):
//!
//! ```text
//! caller ──fork──► intermediate: cgroups, oom_score_adj, setns (joined
//!   │                namespaces), unshare(user); "ready" ─► caller: id maps; "go"
//!   │                unshare(the other new namespaces)
//!   │                clone(CLONE_PARENT) ─► init (pid 1 of a new pid namespace,
//!   │                "pid" ─► caller;  exits        a child of the caller)
//!   ◄──────────────────────────────────────────── init: rootfs, pivot_root,
//!                                                   sysctls, pty, masks, rlimits,
//!                                                   caps, user, nnp; "created";
//!                                                   waits for "start"; seccomp; execve
//! ```
//!
//! The extra process exists because a new pid namespace (and a joined one)
//! only applies to children of the process that made it. Errors in either
//! child travel back as text over the sync socket (see `sync`); the socket
//! is close-on-exec, so end-of-file after "start" means `execve` succeeded.

use std::convert::Infallible;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork, setresgid, setresuid, setsid};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::error::ExecutorError;
use super::namespaces::NamespacePlan;
use super::process::{self, ProcessError, ProcessPlan};
use super::rootfs::{self, RootfsPlan};
use super::seccomp::{self, SeccompProgram};
use super::sync::{Message, SyncError, SyncSocket};
use super::{clone_into, lsm, sysctl, terminal};

/// How long the caller waits for any one step of the setup processes.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Stack of the cloned init process (copy-on-write, mostly untouched).
const STACK_SIZE: usize = 1 << 20;

/// The container process's stdio.
#[derive(Debug)]
pub enum Stdio {
    /// The caller's pipe ends (or files); no stdin means `/dev/null`.
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// A pty made inside the container; the master comes back to the caller
    /// ([`Created::take_pty_master`], [`super::exec::Spawned::pty_master`]).
    Terminal,
}

pub struct CreateOptions<'a> {
    /// `root.path` is the absolute path of the prepared rootfs directory.
    pub spec: &'a Spec,
    pub stdio: Stdio,
    /// `cgroup.procs` files the container joins before its setup goes on.
    pub cgroup_procs: &'a [PathBuf],
    /// The host's cgroup mounts ([`super::mounts::cgroup_mounts`]) when the
    /// caller knows them; else they are read from `/proc/self/mountinfo`,
    /// whose every line costs the kernel ~2 µs: 10 ms per container on a
    /// node with 5000 mounts (1000 pods).
    pub cgroup_mounts: Option<&'a [super::mounts::MountInfo]>,
}

/// What the container's processes need, resolved in the caller.
pub(crate) struct InitPlan {
    pub namespaces: NamespacePlan,
    pub rootfs: Option<RootfsPlan>,
    pub process: ProcessPlan,
    pub seccomp: Option<SeccompProgram>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    /// The AppArmor profile the process enters at `execve`.
    pub apparmor: Option<String>,
    pub sysctls: Vec<(String, String, PathBuf)>,
    pub console_size: Option<(u16, u16)>,
}

impl InitPlan {
    fn for_create(
        spec: &Spec,
        cgroup_procs: &[PathBuf],
        cgroup_mounts: Option<&[super::mounts::MountInfo]>,
    ) -> Result<InitPlan, ExecutorError> {
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| ExecutorError::Spec("spec has no process".into()))?;
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| ExecutorError::Spec("spec has no root".into()))?;
        let linux = spec.linux().as_ref();
        let apparmor = lsm::check(
            process.apparmor_profile().as_deref(),
            process.selinux_label().as_deref(),
        )?;
        let namespaces = NamespacePlan::for_create(linux)?;
        if !namespaces.creates(CloneFlags::CLONE_NEWNS) {
            return Err(ExecutorError::Spec(
                "a container needs a new mount namespace".into(),
            ));
        }
        let has_uts = namespaces.creates(CloneFlags::CLONE_NEWUTS)
            || namespaces.joins(LinuxNamespaceType::Uts);
        let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
        let domainname = spec.domainname().clone().filter(|h| !h.is_empty());
        if (hostname.is_some() || domainname.is_some()) && !has_uts {
            return Err(ExecutorError::Spec(
                "hostname or domainname set without a uts namespace of the container's own".into(),
            ));
        }
        let mut owned = namespaces.new;
        for j in &namespaces.join {
            owned |= match j.kind {
                LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
                LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
                LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
                _ => CloneFlags::empty(),
            };
        }
        let sysctls = sysctl::plan(linux.and_then(|l| l.sysctl().as_ref()), owned)?;
        let seccomp = linux
            .and_then(|l| l.seccomp().as_ref())
            .map(seccomp::compile)
            .transpose()?;
        let mut rootfs = RootfsPlan::from_spec(spec, root.path(), cgroup_procs, cgroup_mounts)?;
        make_idmapped_mounts(&mut rootfs, &namespaces, linux)?;
        Ok(InitPlan {
            rootfs: Some(rootfs),
            process: ProcessPlan::from_spec(process)?,
            namespaces,
            seccomp,
            hostname,
            domainname,
            apparmor,
            sysctls,
            console_size: process
                .console_size()
                .map(|b| (b.height() as u16, b.width() as u16)),
        })
    }
}

/// Makes the idmapped trees of the spec's idmapped binds, here in the
/// caller, privileged on the host. berth maps them through the user
/// namespace the container joins, so their maps must be its (as kubelet
/// gives a pod's volumes the pod's); other maps would need a namespace of
/// their own made for the mount.
fn make_idmapped_mounts(
    rootfs: &mut RootfsPlan,
    namespaces: &NamespacePlan,
    linux: Option<&oci_spec::runtime::Linux>,
) -> Result<(), ExecutorError> {
    use super::mounts::MountError;
    let userns = namespaces
        .join
        .iter()
        .find(|j| j.kind == LinuxNamespaceType::User);
    for m in &mut rootfs.mounts {
        let Some(idmap) = &m.idmap else { continue };
        let bad = |message| MountError::BadIdmap {
            destination: m.destination.clone(),
            message,
        };
        let Some(userns) = userns else {
            return Err(bad("an idmapped mount needs a user namespace joined by path").into());
        };
        let same = linux.is_some_and(|l| {
            l.uid_mappings().as_ref() == Some(&idmap.uid_mappings)
                && l.gid_mappings().as_ref() == Some(&idmap.gid_mappings)
        });
        if !same {
            return Err(
                bad("a mount's id maps must be those of the container's user namespace").into(),
            );
        }
        m.make_idmapped(userns.fd.as_fd())?;
    }
    Ok(())
}

/// A container whose init process is set up and parked before `execve`.
/// Dropping it without [`Created::start`] kills and reaps the process.
#[derive(Debug)]
pub struct Created {
    pid: Pid,
    sock: Option<SyncSocket>,
    pty_master: Option<OwnedFd>,
}

impl Created {
    /// The init process's pid, in the caller's pid namespace.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The pty master when the container has a terminal.
    pub fn take_pty_master(&mut self) -> Option<OwnedFd> {
        self.pty_master.take()
    }

    /// Lets the init process `execve`. Returns once it has (the sync socket
    /// closed on exec) or the process's own error, e.g.
    /// `exec "/bin/foo": no such file or directory in container rootfs`.
    pub fn start(mut self) -> Result<Pid, ExecutorError> {
        let pid = self.pid;
        let Some(sock) = self.sock.take() else {
            return Err(ExecutorError::Child("container already started".into()));
        };
        if let Err(e) = sock.send(&Message::Start) {
            self.sock = Some(sock);
            return Err(e.into());
        }
        match sock.recv() {
            Ok(None) => Ok(pid),
            Ok(Some((Message::Error(text), _))) => {
                reap(pid);
                Err(ExecutorError::Child(text))
            }
            Ok(Some((other, _))) => {
                kill_and_reap(pid);
                Err(SyncError::Unexpected {
                    expected: "end of file",
                    got: other.name(),
                }
                .into())
            }
            Err(e) => {
                kill_and_reap(pid);
                Err(e.into())
            }
        }
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.sock.is_some() {
            kill_and_reap(self.pid);
        }
    }
}

/// Sets up a new container and parks its init process (see module doc).
pub fn create(opts: CreateOptions<'_>) -> Result<Created, ExecutorError> {
    let plan = InitPlan::for_create(opts.spec, opts.cgroup_procs, opts.cgroup_mounts)?;
    let stdio = opts.stdio;
    let mut init = |sock: &SyncSocket| run_init(&plan, &stdio, sock);
    let direct = if plan.namespaces.needs_intermediate() {
        None
    } else {
        launch_direct(&plan, opts.cgroup_procs, &mut init)?
    };
    let launched = match direct {
        Some(launched) => launched,
        None => launch(&plan, opts.cgroup_procs, true, &mut init)?,
    };
    Ok(Created {
        pid: launched.pid,
        sock: Some(launched.sock),
        pty_master: launched.pty_master,
    })
}

/// Sends `signal` to `pid`.
pub fn kill(pid: Pid, signal: Signal) -> Result<(), ExecutorError> {
    nix::sys::signal::kill(pid, signal).map_err(|errno| ExecutorError::Kill {
        pid: pid.as_raw(),
        signal: signal.as_str().to_owned(),
        errno,
    })
}

pub(crate) struct Launched {
    pub pid: Pid,
    pub sock: SyncSocket,
    pub pty_master: Option<OwnedFd>,
}

/// Kills and reaps the listed processes unless disarmed.
struct ReapGuard(Vec<Pid>);

impl Drop for ReapGuard {
    fn drop(&mut self) {
        for pid in self.0.drain(..) {
            kill_and_reap(pid);
        }
    }
}

fn reap(pid: Pid) -> Option<WaitStatus> {
    loop {
        match waitpid(pid, None) {
            Err(Errno::EINTR) => continue,
            Ok(status) => return Some(status),
            Err(_) => return None,
        }
    }
}

fn kill_and_reap(pid: Pid) {
    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    reap(pid);
}

fn describe(status: Option<WaitStatus>) -> String {
    match status {
        Some(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
        Some(WaitStatus::Signaled(_, sig, _)) => format!("killed by {sig}"),
        Some(other) => format!("{other:?}"),
        None => "status unknown".into(),
    }
}

/// Forks the intermediate process, which clones the container process
/// running `child_main`; drives the sync protocol up to "created" (create)
/// or up to a successful `execve` (exec, `parked == false`).
pub(crate) fn launch(
    plan: &InitPlan,
    cgroup_procs: &[PathBuf],
    parked: bool,
    child_main: &mut dyn FnMut(&SyncSocket) -> Result<Infallible, ExecutorError>,
) -> Result<Launched, ExecutorError> {
    let (parent, child) = SyncSocket::pair()?;
    parent.set_timeout(SETUP_TIMEOUT)?;

    // The intermediate is born in the v2 cgroup when there is one and moves
    // itself into the others (see `join_cgroups`).
    let (v2_dir, v1_procs) = clone_into::split_v2(cgroup_procs);
    // SAFETY: the executor's callers are single-threaded (`berth monitor`;
    // tests run each container in a single-threaded re-exec of the test
    // binary), and glibc's fork() leaves malloc usable in the child, so
    // the child may allocate. It never returns: it ends in `_exit`. The
    // clone3 child makes system calls, allocates and ends the same way.
    #[allow(unsafe_code)]
    let (forked, to_join) = match &v2_dir {
        Some(dir) => match unsafe { clone_into::fork_into(dir) } {
            Err(e) if clone_into::unsupported(e) => (
                unsafe { fork() },
                cgroup_procs.iter().map(PathBuf::as_path).collect(),
            ),
            born => (born, v1_procs),
        },
        None => (unsafe { fork() }, v1_procs),
    };
    drop(v2_dir);
    let forked = forked.map_err(ExecutorError::Fork)?;
    let mid = match forked {
        ForkResult::Child => {
            drop(parent);
            let code = match join_cgroups(&to_join)
                .and_then(|()| intermediate(plan, &child, child_main))
            {
                Ok(()) => 0,
                Err(e) => {
                    let _ = child.send(&Message::Error(e.to_string()));
                    1
                }
            };
            exit_now(code);
        }
        ForkResult::Parent { child: mid } => mid,
    };
    drop(child);
    let mut guard = ReapGuard(vec![mid]);

    // Phase 1: the intermediate is in its user namespace; put it in the
    // cgroups (its children inherit them) and write its id maps.
    match parent.recv()? {
        Some((Message::Ready, _)) => {}
        Some((Message::Error(text), _)) => {
            guard.0.clear();
            reap(mid);
            return Err(ExecutorError::Child(text));
        }
        Some((other, _)) => {
            return Err(SyncError::Unexpected {
                expected: "ready",
                got: other.name(),
            }
            .into());
        }
        None => {
            guard.0.clear();
            return Err(ExecutorError::ChildDied(describe(reap(mid))));
        }
    }
    plan.namespaces.write_id_maps(mid)?;
    parent.send(&Message::Go)?;

    // Phase 2: collect the container's pid, its pty, and "created" (or,
    // for exec, end-of-file), in whatever order the two processes send them.
    let mut pid = None;
    let mut pty_master = None;
    let mut created = false;
    let mut error = None;
    let mut eof = false;
    loop {
        match parent.recv() {
            Ok(Some((Message::Pid(p), _))) => {
                let p = Pid::from_raw(p);
                guard.0.push(p);
                pid = Some(p);
            }
            Ok(Some((Message::Pty, fd))) => pty_master = fd,
            Ok(Some((Message::Created, _))) if parked => created = true,
            Ok(Some((Message::Error(text), _))) => error = Some(text),
            Ok(Some((other, _))) => {
                return Err(SyncError::Unexpected {
                    expected: "pid, pty, created or error",
                    got: other.name(),
                }
                .into());
            }
            Ok(None) => eof = true,
            Err(e) => return Err(e.into()),
        }
        let done = eof || (pid.is_some() && (created || error.is_some()));
        if done {
            break;
        }
    }
    // The intermediate exits right after sending the pid.
    let mid_status = reap(mid);
    guard.0.retain(|p| *p != mid);
    if let Some(text) = error {
        return Err(ExecutorError::Child(text));
    }
    let Some(pid) = pid else {
        return Err(ExecutorError::ChildDied(describe(mid_status)));
    };
    if parked && !created {
        guard.0.clear();
        return Err(ExecutorError::ChildDied(describe(reap(pid))));
    }
    guard.0.clear();
    Ok(Launched {
        pid,
        sock: parent,
        pty_master,
    })
}

/// Clones the container process straight from the caller, with
/// `CLONE_NEWPID` and, on cgroup v2, born in its cgroup: for a container
/// that neither makes nor joins a user namespace and joins no pid or time
/// namespace (those apply to children only, or need id maps written from
/// outside), nothing needs the intermediate process. The child joins the
/// rest itself. Saves a fork and a round trip per create. `None` when the
/// kernel has no `clone3`; the caller then takes the intermediate's way.
fn launch_direct(
    plan: &InitPlan,
    cgroup_procs: &[PathBuf],
    child_main: &mut dyn FnMut(&SyncSocket) -> Result<Infallible, ExecutorError>,
) -> Result<Option<Launched>, ExecutorError> {
    let (parent, child) = SyncSocket::pair()?;
    parent.set_timeout(SETUP_TIMEOUT)?;
    let (v2_dir, v1_procs) = clone_into::split_v2(cgroup_procs);
    let new_pid = plan.namespaces.new & CloneFlags::CLONE_NEWPID;
    // SAFETY: as for the fork in `launch`: a single-threaded caller, and a
    // child that only makes system calls, allocates and ends in `_exit` or
    // `execve`.
    #[allow(unsafe_code)]
    let forked = unsafe { clone_into::clone3(v2_dir.as_ref(), new_pid) };
    drop(v2_dir);
    let pid = match forked {
        Err(errno) if clone_into::unsupported(errno) => return Ok(None),
        Err(errno) => return Err(ExecutorError::Fork(errno)),
        Ok(ForkResult::Child) => {
            drop(parent);
            let err = match join_cgroups(&v1_procs)
                .and_then(|()| enter_namespaces(plan, new_pid))
                .and_then(|()| child_main(&child))
            {
                Err(e) => e,
                Ok(never) => match never {},
            };
            let _ = child.send(&Message::Error(err.to_string()));
            exit_now(1);
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop(child);
    let mut guard = ReapGuard(vec![pid]);
    let mut pty_master = None;
    loop {
        match parent.recv()? {
            Some((Message::Pty, fd)) => pty_master = fd,
            Some((Message::Created, _)) => break,
            Some((Message::Error(text), _)) => return Err(ExecutorError::Child(text)),
            Some((other, _)) => {
                return Err(SyncError::Unexpected {
                    expected: "pty, created or error",
                    got: other.name(),
                }
                .into());
            }
            None => {
                guard.0.clear();
                return Err(ExecutorError::ChildDied(describe(reap(pid))));
            }
        }
    }
    guard.0.clear();
    Ok(Some(Launched {
        pid,
        sock: parent,
        pty_master,
    }))
}

/// In the directly cloned container process: what the intermediate does
/// for it otherwise, less the user namespace and what `clone3` did.
fn enter_namespaces(plan: &InitPlan, cloned: CloneFlags) -> Result<(), ExecutorError> {
    plan.process.apply_oom_score_adj()?;
    plan.namespaces.join_all()?;
    plan.namespaces.unshare_rest_except(cloned)?;
    Ok(())
}

/// Moves the calling (single-threaded) process into the cgroups whose
/// `cgroup.procs` files are listed. On v1 it writes `0` to `tasks`: the
/// kernel moves the writing thread alone without its global threadgroup
/// lock, whose write side waits for an RCU grace period (~10 ms) unless
/// the host mounted cgroup2 with `favordynmods`; for a process of one
/// thread that is the whole process. Elsewhere it writes `cgroup.procs`.
fn join_cgroups(procs_files: &[&Path]) -> Result<(), ExecutorError> {
    let pid = std::process::id() as i32;
    for procs in procs_files {
        let tasks = procs.with_file_name("tasks");
        let written = match std::fs::write(&tasks, "0") {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(procs, "0").map_err(|e| (procs.to_path_buf(), e))
            }
            other => other.map_err(|e| (tasks, e)),
        };
        written.map_err(|(path, source)| ExecutorError::CgroupJoin { pid, path, source })?;
    }
    Ok(())
}

/// The intermediate process: namespaces, then the clone of the container
/// process. Returns after sending its pid; the caller `_exit`s.
fn intermediate(
    plan: &InitPlan,
    sock: &SyncSocket,
    child_main: &mut dyn FnMut(&SyncSocket) -> Result<Infallible, ExecutorError>,
) -> Result<(), ExecutorError> {
    // While still in the caller's user namespace: raising needs nothing,
    // and the parent has clamped lowering.
    plan.process.apply_oom_score_adj()?;
    let ns = &plan.namespaces;
    ns.join_all()?;
    ns.unshare_user()?;
    sock.send(&Message::Ready)?;
    match sock.recv()? {
        Some((Message::Go, _)) => {}
        Some((other, _)) => {
            return Err(SyncError::Unexpected {
                expected: "go",
                got: other.name(),
            }
            .into());
        }
        None => return Err(ExecutorError::ChildDied("caller went away".into())),
    }
    if ns.new_user || ns.joins(LinuxNamespaceType::User) {
        // Become root of the user namespace (full capabilities in it).
        let root_err = |what| {
            move |errno| ProcessError::SetId {
                what,
                id: "0 in the user namespace".into(),
                errno,
            }
        };
        setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).map_err(root_err("gid"))?;
        setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).map_err(root_err("uid"))?;
    }
    ns.unshare_rest()?;

    let mut stack = vec![0u8; STACK_SIZE];
    let callback = Box::new(|| {
        let err = match child_main(sock) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        let _ = sock.send(&Message::Error(err.to_string()));
        exit_now(1)
    });
    // SAFETY: this process is single-threaded (a fork of a single-threaded
    // caller); clone without CLONE_VM gives the child its own copy of the
    // memory, `stack` included, and the callback never returns (it execs or
    // `_exit`s). CLONE_PARENT makes the caller its parent, SIGCHLD lets the
    // caller wait for it as usual.
    #[allow(unsafe_code)]
    let pid = unsafe {
        nix::sched::clone(
            callback,
            &mut stack,
            CloneFlags::CLONE_PARENT,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(ExecutorError::Fork)?;
    sock.send(&Message::Pid(pid.as_raw()))?;
    Ok(())
}

/// Ends a setup process without running atexit handlers or flushing the
/// caller's buffered state (it belongs to the caller).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit only ends the calling process; it touches no memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::_exit(code)
    }
}

/// Stdio of the container process: pipes onto 0, 1, 2; every other fd
/// inherited from the caller close-on-exec.
pub(crate) fn setup_stdio(stdio: &Stdio) -> Result<(), ExecutorError> {
    let dup_err = |what: &'static str| move |errno| ProcessError::Prctl { what, errno };
    if let Stdio::Pipes {
        stdin,
        stdout,
        stderr,
    } = stdio
    {
        match stdin {
            Some(fd) => nix::unistd::dup2_stdin(fd.as_fd()).map_err(dup_err("stdin"))?,
            None => {
                let null = std::fs::File::open("/dev/null").map_err(|e| ProcessError::Prctl {
                    what: "stdin (/dev/null)",
                    errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                })?;
                nix::unistd::dup2_stdin(null.as_fd()).map_err(dup_err("stdin"))?;
            }
        }
        nix::unistd::dup2_stdout(stdout.as_fd()).map_err(dup_err("stdout"))?;
        nix::unistd::dup2_stderr(stderr.as_fd()).map_err(dup_err("stderr"))?;
    }
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it only
    // marks fds 3 and up close-on-exec, so no owner sees a closed fd.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    if rc != 0 {
        return Err(ProcessError::Prctl {
            what: "close-on-exec on inherited fds",
            errno: Errno::last(),
        }
        .into());
    }
    Ok(())
}

/// Makes a pty inside the container, hands the master to the caller and
/// makes the slave the controlling terminal and stdio.
pub(crate) fn setup_terminal(plan: &InitPlan, sock: &SyncSocket) -> Result<(), ExecutorError> {
    let (master, slave) = terminal::open_pty(plan.console_size)?;
    sock.send_with_fd(&Message::Pty, Some(master.as_fd()))?;
    drop(master);
    terminal::attach_slave(&slave)?;
    Ok(())
}

/// Process settings shared by init and exec, up to the point of parking:
/// rlimits, seccomp (when no_new_privs is off it must be loaded while we
/// still have CAP_SYS_ADMIN), bounding set, user, capabilities, umask, cwd,
/// no_new_privs, signals.
pub(crate) fn apply_process(plan: &InitPlan) -> Result<(), ExecutorError> {
    let p = &plan.process;
    // First, as runc does: still root, all capabilities, no no_new_privs.
    if let Some(profile) = &plan.apparmor {
        lsm::apply_apparmor_on_exec(profile)?;
    }
    p.apply_rlimits()?;
    if let Some(filter) = &plan.seccomp
        && !p.no_new_privileges
    {
        seccomp::install(filter)?;
    }
    p.capabilities.apply_bounding()?;
    let cwd_as_root = p.chdir_cwd();
    p.apply_user_and_capabilities()?;
    p.apply_umask();
    if cwd_as_root.is_err() {
        p.chdir_cwd()?;
    }
    p.apply_no_new_privileges()?;
    process::reset_signals()?;
    Ok(())
}

/// The last steps: find the executable, seccomp (with no_new_privs, as
/// close to execve as possible), execve.
pub(crate) fn exec_process(plan: &InitPlan) -> Result<Infallible, ExecutorError> {
    let p = &plan.process;
    let path = p.resolve_executable()?;
    if let Some(filter) = &plan.seccomp
        && p.no_new_privileges
    {
        seccomp::install(filter)?;
    }
    Err(p.exec(&path).into())
}

/// The container's init process, from clone to execve.
fn run_init(
    plan: &InitPlan,
    stdio: &Stdio,
    sock: &SyncSocket,
) -> Result<Infallible, ExecutorError> {
    setsid().map_err(|errno| ProcessError::Prctl {
        what: "new session",
        errno,
    })?;
    setup_stdio(stdio)?;
    // The sync socket must survive until execve, and then close.
    debug_assert!(sock.as_fd().as_raw_fd() > 2);
    if let Some(name) = &plan.hostname {
        rustix::system::sethostname(name.as_bytes()).map_err(|e| ExecutorError::Hostname {
            what: "hostname",
            name: name.clone(),
            errno: Errno::from_raw(e.raw_os_error()),
        })?;
    }
    if let Some(name) = &plan.domainname {
        rustix::system::setdomainname(name.as_bytes()).map_err(|e| ExecutorError::Hostname {
            what: "domainname",
            name: name.clone(),
            errno: Errno::from_raw(e.raw_os_error()),
        })?;
    }
    if let Some(rootfs) = &plan.rootfs {
        rootfs::prepare(rootfs)?;
    }
    sysctl::apply(&plan.sysctls)?;
    if matches!(stdio, Stdio::Terminal) {
        setup_terminal(plan, sock)?;
    }
    if let Some(rootfs) = &plan.rootfs {
        rootfs::finish(rootfs)?;
    }
    apply_process(plan)?;
    sock.send(&Message::Created)?;
    match sock.recv()? {
        Some((Message::Start, _)) => {}
        // The caller dropped the container before starting it.
        None => exit_now(0),
        Some((other, _)) => {
            return Err(SyncError::Unexpected {
                expected: "start",
                got: other.name(),
            }
            .into());
        }
    }
    exec_process(plan)
}

#[cfg(test)]
#[path = "container/tests.rs"]
mod tests;
