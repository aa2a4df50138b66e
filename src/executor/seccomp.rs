//! Seccomp: the spec's `linux.seccomp` profile compiled to classic BPF with
//! the pure-Rust `seccompiler` and installed right before `execve`.
//!
//! `seccompiler` builds filters with one match action and one mismatch action,
//! while an OCI profile gives each rule its own action. The kernel runs every
//! installed filter and keeps the most restrictive result (KILL > TRAP >
//! ERRNO > TRACE > LOG > ALLOW), so a profile becomes several filters:
//! - the default filter: any syscall some rule names (with that rule's
//!   argument conditions) → ALLOW, anything else → the default action;
//! - one filter per other action A: the rules with action A → A, else ALLOW.
//!
//! A syscall a rule matches thus gets that rule's action, any other syscall
//! the default. Syscall names unknown on this architecture are skipped (as
//! runc does). Only the native architecture is compiled; syscalls made
//! through another ABI (32-bit x86 on x86_64) get the default action.
//! Compiling happens in the parent; the child only installs.

use std::collections::BTreeMap;
use std::str::FromStr;

use nix::errno::Errno;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: action {0} is not supported")]
    UnsupportedAction(String),
    #[error("seccomp: this architecture ({0}) is not supported")]
    UnsupportedArch(&'static str),
    #[error("seccomp: profile architectures {listed:?} do not include this host's ({native})")]
    ForeignArch {
        listed: Vec<String>,
        native: &'static str,
    },
    #[error("seccomp: syscall {name}: argument index {index} is out of range (0-5)")]
    ArgIndex { name: String, index: usize },
    #[error("seccomp: compile filter: {0}")]
    Compile(String),
    #[error("seccomp: install filter: {0}")]
    Install(Errno),
}

/// A compiled profile: the filters to install (in order) and the flags.
#[derive(Debug, Clone, Default)]
pub struct SeccompProgram {
    pub filters: Vec<BpfProgram>,
    pub flags: libc::c_ulong,
}

fn native_arch() -> Result<(TargetArch, Arch, &'static str), SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok((TargetArch::x86_64, Arch::ScmpArchX86_64, "x86_64")),
        "aarch64" => Ok((TargetArch::aarch64, Arch::ScmpArchAarch64, "aarch64")),
        other => Err(SeccompError::UnsupportedArch(other)),
    }
}

fn action(a: LinuxSeccompAction, errno_ret: Option<u32>) -> Result<SeccompAction, SeccompError> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno_ret.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => {
            SeccompAction::Trace(errno_ret.unwrap_or(libc::EPERM as u32))
        }
        other => return Err(SeccompError::UnsupportedAction(other.to_string())),
    })
}

fn condition(name: &str, arg: &LinuxSeccompArg) -> Result<SeccompCondition, SeccompError> {
    let index = u8::try_from(arg.index())
        .ok()
        .filter(|i| *i < 6)
        .ok_or_else(|| SeccompError::ArgIndex {
            name: name.to_owned(),
            index: arg.index(),
        })?;
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // libseccomp: value is the mask, valueTwo the datum.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| SeccompError::Compile(e.to_string()))
}

/// The rules of one spec entry for one syscall: `None` when unconditional.
/// As in runc, several conditions on the same argument are alternatives
/// (one rule each); conditions on different arguments all must hold.
fn rules(name: &str, sc: &LinuxSyscall) -> Result<Option<Vec<SeccompRule>>, SeccompError> {
    let args = sc.args().as_deref().unwrap_or_default();
    if args.is_empty() {
        return Ok(None);
    }
    let mut seen = [false; 6];
    let mut repeated = false;
    for a in args {
        if let Some(s) = seen.get_mut(a.index()) {
            repeated |= *s;
            *s = true;
        }
    }
    let compile = |conds: Vec<SeccompCondition>| {
        SeccompRule::new(conds).map_err(|e| SeccompError::Compile(e.to_string()))
    };
    if repeated {
        args.iter()
            .map(|a| compile(vec![condition(name, a)?]))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    } else {
        let conds = args
            .iter()
            .map(|a| condition(name, a))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(vec![compile(conds)?]))
    }
}

/// Syscall number → its rules (`None`: unconditional).
type RuleMap = BTreeMap<i64, Option<Vec<SeccompRule>>>;

/// Adds rules for `nr` to a filter's rule map; an unconditional entry wins.
fn add(map: &mut RuleMap, nr: i64, rules: Option<Vec<SeccompRule>>) {
    match (map.get_mut(&nr), rules) {
        (None, r) => {
            map.insert(nr, r);
        }
        (Some(existing @ Some(_)), None) => *existing = None,
        (Some(Some(existing)), Some(mut more)) => existing.append(&mut more),
        (Some(None), _) => {}
    }
}

fn build(
    rules: RuleMap,
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, SeccompError> {
    let other_arch_action = u32::from(mismatch.clone());
    let rules = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, matched, arch)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    let mut prog =
        BpfProgram::try_from(filter).map_err(|e| SeccompError::Compile(e.to_string()))?;
    // seccompiler's first three instructions check the audit arch and kill
    // the process on a mismatch; give foreign-ABI syscalls this filter's
    // mismatch action instead (for the default filter: the profile default).
    const RET_K: u16 = 0x06;
    if let Some(insn) = prog.get_mut(2)
        && insn.code == RET_K
        && insn.k == libc::SECCOMP_RET_KILL_PROCESS
    {
        insn.k = other_arch_action;
    }
    Ok(prog)
}

/// Compiles a profile for the native architecture.
pub fn compile(profile: &LinuxSeccomp) -> Result<SeccompProgram, SeccompError> {
    let (target, native, native_name) = native_arch()?;
    if let Some(archs) = profile.architectures().as_ref().filter(|a| !a.is_empty())
        && !archs
            .iter()
            .any(|a| *a == native || *a == Arch::ScmpArchNative)
    {
        return Err(SeccompError::ForeignArch {
            listed: archs.iter().map(|a| format!("{a:?}")).collect(),
            native: native_name,
        });
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;

    // Rules grouped by action (in the order the profile names them), and
    // the union of every rule whose action differs from the default.
    let mut by_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    let mut named = RuleMap::new();
    for sc in profile.syscalls().as_deref().unwrap_or_default() {
        let act = action(sc.action(), sc.errno_ret())?;
        if act == default {
            continue;
        }
        for name in sc.names() {
            let Ok(sysno) = syscalls::Sysno::from_str(name) else {
                tracing::debug!(syscall = %name, "seccomp: syscall unknown on this architecture, skipped");
                continue;
            };
            let nr = sysno.id() as i64;
            add(&mut named, nr, rules(name, sc)?);
            if act != SeccompAction::Allow {
                let slot = match by_action.iter().position(|(a, _)| *a == act) {
                    Some(i) => i,
                    None => {
                        by_action.push((act.clone(), BTreeMap::new()));
                        by_action.len() - 1
                    }
                };
                add(&mut by_action[slot].1, nr, rules(name, sc)?);
            }
        }
    }

    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(build(named, default, SeccompAction::Allow, target)?);
    }
    for (act, rules) in by_action {
        filters.push(build(rules, SeccompAction::Allow, act, target)?);
    }
    let mut flags: libc::c_ulong = 0;
    for f in profile.flags().as_deref().unwrap_or_default() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
            #[allow(unreachable_patterns)]
            _ => 0,
        };
    }
    Ok(SeccompProgram { filters, flags })
}

/// Installs the filters on the calling thread. Needs no_new_privs or
/// CAP_SYS_ADMIN; does not set no_new_privs itself (unlike
/// `seccompiler::apply_filter`), since the spec decides that.
pub fn install(program: &SeccompProgram) -> Result<(), SeccompError> {
    for filter in &program.filters {
        let len = u16::try_from(filter.len()).map_err(|_| {
            SeccompError::Compile(format!(
                "filter of {} instructions is too long",
                filter.len()
            ))
        })?;
        let fprog = libc::sock_fprog {
            len,
            // seccompiler's sock_filter is #[repr(C)] with libc's layout.
            filter: filter.as_ptr().cast::<libc::sock_filter>().cast_mut(),
        };
        // SAFETY: `fprog` points at `filter`, a live, well-formed BPF program
        // of `len` instructions; the kernel copies it before returning.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                program.flags,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(SeccompError::Install(Errno::last()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn allow_list_profile_compiles_to_one_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_AARCH64"],
                "syscalls":[{"names":["read","write","no_such_syscall"],"action":"SCMP_ACT_ALLOW"}]}"#,
        );
        let prog = compile(&p).unwrap();
        assert_eq!(prog.filters.len(), 1);
    }

    #[test]
    fn mixed_actions_compile_to_one_filter_per_action() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
                "syscalls":[
                  {"names":["read"],"action":"SCMP_ACT_ALLOW"},
                  {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
                  {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"},{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                  {"names":["ptrace"],"action":"SCMP_ACT_KILL_PROCESS"},
                  {"names":["mmap"],"action":"SCMP_ACT_ALLOW","args":[{"index":2,"value":4,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}
                ]}"#,
        );
        let prog = compile(&p).unwrap();
        assert_eq!(prog.filters.len(), 3);
    }

    #[test]
    fn foreign_architecture_only_is_refused() {
        let p = profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_MIPS"]}"#);
        assert!(matches!(compile(&p), Err(SeccompError::ForeignArch { .. })));
    }

    #[test]
    fn bad_arg_index_is_refused() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":7,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        let err = compile(&p).unwrap_err();
        assert!(err.to_string().contains("argument index 7"), "{err}");
    }
}
