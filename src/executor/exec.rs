//! A new process in a running container (CRI Exec/ExecSync): it joins the
//! container's namespaces from `/proc/<pid>/ns/*` (user first, mount last),
//! its cgroups through the caller-provided `cgroup.procs` files, and gets
//! the exec's own user, env, cwd, capabilities, rlimits and no_new_privs with
//! the container's seccomp profile. Same process shape and error path as
//! `create` (see `container`), without the parking step.

use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::unistd::{Pid, setsid};
use oci_spec::runtime::{Process, Spec};

use super::container::{
    self, InitPlan, Stdio, apply_process, exec_process, setup_stdio, setup_terminal,
};
use super::error::ExecutorError;
use super::lsm;
use super::namespaces::NamespacePlan;
use super::process::{ProcessError, ProcessPlan};
use super::seccomp;
use super::sync::SyncSocket;

/// The running container to join.
pub struct JoinTarget<'a> {
    /// Its init process, in the caller's pid namespace.
    pub pid: Pid,
    /// Its spec: which namespaces it has, and its seccomp profile.
    pub spec: &'a Spec,
}

/// A process started in a container.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// The pty master, when `stdio` was [`Stdio::Terminal`].
    pub pty_master: Option<OwnedFd>,
}

/// Starts `process` inside the running container; returns once it has
/// `execve`d, or with its precise error.
pub fn exec(
    target: &JoinTarget<'_>,
    process: &Process,
    stdio: Stdio,
    cgroup_procs: &[PathBuf],
) -> Result<Spawned, ExecutorError> {
    let apparmor = lsm::check(
        process.apparmor_profile().as_deref(),
        process.selinux_label().as_deref(),
    )?;
    let linux = target.spec.linux().as_ref();
    let plan = InitPlan {
        namespaces: NamespacePlan::for_exec(target.pid, linux)?,
        rootfs: None,
        process: ProcessPlan::from_spec(process)?,
        seccomp: linux
            .and_then(|l| l.seccomp().as_ref())
            .map(seccomp::compile)
            .transpose()?,
        hostname: None,
        domainname: None,
        apparmor,
        sysctls: Vec::new(),
        console_size: process
            .console_size()
            .map(|b| (b.height() as u16, b.width() as u16)),
    };
    let launched = container::launch(&plan, cgroup_procs, false, &mut |sock| {
        run_exec(&plan, &stdio, sock)
    })?;
    Ok(Spawned {
        pid: launched.pid,
        pty_master: launched.pty_master,
    })
}

fn run_exec(
    plan: &InitPlan,
    stdio: &Stdio,
    sock: &SyncSocket,
) -> Result<Infallible, ExecutorError> {
    setsid().map_err(|errno| ProcessError::Prctl {
        what: "new session",
        errno,
    })?;
    setup_stdio(stdio)?;
    if matches!(stdio, Stdio::Terminal) {
        setup_terminal(plan, sock)?;
    }
    apply_process(plan)?;
    exec_process(plan)
}
