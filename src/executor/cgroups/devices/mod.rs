//! Device access control: the OCI device rules as berth reads them, and on
//! cgroup v2 the eBPF program that enforces them.
//!
//! cgroup v1 has a `devices` controller: [`super::resources`] writes each
//! rule to `devices.allow` or `devices.deny` and the kernel keeps the list.
//! cgroup v2 has none; instead a program of type
//! `BPF_PROG_TYPE_CGROUP_DEVICE` is attached to the cgroup
//! (`BPF_CGROUP_DEVICE`) and the kernel asks it on every `open(2)` and
//! `mknod(2)` of a device node. The way there, as runc does it:
//!
//! 1. [`Filter`] (the emulator) replays the rules as v1 would and reduces
//!    them to a default (allow or deny every device) plus exceptions,
//! 2. [`Program`] assembles that into instructions, by hand: a handful of
//!    opcodes, no LLVM,
//! 3. [`install`] loads it (`BPF_PROG_LOAD`) and attaches it to the cgroup's
//!    directory, replacing the program attached before, so that an update
//!    never leaves the cgroup without a filter.
//!
//! The one thing to know before changing this: the program is the only
//! thing between a container and every device node it can create or find,
//! so each change to the emulator or the assembler needs a test that runs
//! the program (the tests interpret it) against the emulator's answer.

// The one place in the cgroups module that talks to the kernel through raw
// pointers: the `bpf(2)` attribute structs.
#[allow(unsafe_code)]
mod bpf;
mod emulator;
mod program;

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

pub use self::emulator::{Device, Filter};
pub use self::program::{Insn, Program};
use super::CgroupError;

/// Which device nodes a rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    /// `a`: every device, whatever the numbers and access say (as the v1
    /// kernel reads it).
    All,
    Block,
    Char,
}

/// A block or character device, as the kernel tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Block,
    Char,
}

impl Node {
    fn letter(self) -> char {
        match self {
            Node::Block => 'b',
            Node::Char => 'c',
        }
    }

    /// `BPF_DEVCG_DEV_*`, the low 16 bits of the program's `access_type`.
    pub fn bpf_type(self) -> u32 {
        match self {
            Node::Block => 1,
            Node::Char => 2,
        }
    }
}

/// A set of `r` (read), `w` (write), `m` (mknod), with the kernel's bits for
/// them: `BPF_DEVCG_ACC_*` on v2, the same values as v1's `ACC_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Access(u8);

impl Access {
    pub const MKNOD: Access = Access(1);
    pub const READ: Access = Access(2);
    pub const WRITE: Access = Access(4);
    pub const NONE: Access = Access(0);
    pub const ALL: Access = Access(7);

    /// `r`, `w`, `m` in any order; empty means all, as runc reads it.
    pub fn parse(s: &str) -> Option<Access> {
        if s.is_empty() {
            return Some(Access::ALL);
        }
        s.chars().try_fold(Access::NONE, |acc, c| {
            let bit = match c {
                'r' => Access::READ,
                'w' => Access::WRITE,
                'm' => Access::MKNOD,
                _ => return None,
            };
            Some(acc.union(bit))
        })
    }

    pub fn bits(self) -> u32 {
        u32::from(self.0)
    }

    pub fn union(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }

    pub fn difference(self, other: Access) -> Access {
        Access(self.0 & !other.0)
    }

    pub fn intersection(self, other: Access) -> Access {
        Access(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Access) -> bool {
        other.difference(self).is_empty()
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (bit, c) in [
            (Access::READ, 'r'),
            (Access::WRITE, 'w'),
            (Access::MKNOD, 'm'),
        ] {
            if self.contains(bit) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// One OCI `linux.resources.devices` entry, checked. `None` numbers are
/// wildcards (`*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    pub typ: DeviceType,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: Access,
}

impl DeviceRule {
    /// Checks an OCI rule: `u` is a character device, `p` (fifo) has no
    /// device cgroup meaning and is refused, as are numbers outside the
    /// kernel's 32 bits and access other than `r`, `w`, `m`.
    pub fn parse(rule: &LinuxDeviceCgroup) -> Result<DeviceRule, CgroupError> {
        let invalid = |reason: String| CgroupError::InvalidResource {
            what: "device rule".to_string(),
            reason,
        };
        let access = rule.access().as_deref().unwrap_or("");
        let access = Access::parse(access)
            .ok_or_else(|| invalid(format!("access {access:?} is not of r, w, m")))?;
        let typ = match rule.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => DeviceType::All,
            LinuxDeviceType::B => DeviceType::Block,
            LinuxDeviceType::C | LinuxDeviceType::U => DeviceType::Char,
            LinuxDeviceType::P => {
                return Err(invalid(
                    "fifo rules are not supported by the kernel".to_string(),
                ));
            }
        };
        let number = |n: Option<i64>| match n {
            None | Some(-1) => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| invalid(format!("device number {n} is not a 32-bit unsigned number"))),
        };
        Ok(DeviceRule {
            allow: rule.allow(),
            typ,
            major: number(rule.major())?,
            minor: number(rule.minor())?,
            access,
        })
    }
}

/// The rule as a v1 `devices.allow`/`devices.deny` line: `c 1:3 rwm`.
impl fmt::Display for DeviceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let typ = match self.typ {
            DeviceType::All => 'a',
            DeviceType::Block => 'b',
            DeviceType::Char => 'c',
        };
        write!(
            f,
            "{typ} {}:{} {}",
            Number(self.major),
            Number(self.minor),
            self.access
        )
    }
}

/// A major or minor number, `*` for any.
struct Number(Option<u32>);

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("*"),
        }
    }
}

/// What went wrong talking to the kernel about a cgroup's device filter.
#[derive(Debug, thiserror::Error)]
pub enum DeviceFilterError {
    #[error("open cgroup {path} to attach its device filter: {errno}")]
    Open {
        path: PathBuf,
        errno: std::io::Error,
    },
    #[error("list the device filter programs attached to {path}: {errno}")]
    Query { path: PathBuf, errno: Errno },
    #[error("open device filter program {id} attached to {path}: {errno}")]
    GetProgram {
        path: PathBuf,
        id: u32,
        errno: Errno,
    },
    #[error("load the device filter program ({insns} instructions) for {path}: {errno}{}", verifier(.log))]
    Load {
        path: PathBuf,
        insns: usize,
        errno: Errno,
        /// The verifier's log, when it rejected the program.
        log: String,
    },
    #[error("attach the device filter program to {path}: {errno}")]
    Attach { path: PathBuf, errno: Errno },
    #[error("replace device filter program {old} on {path}: {errno}")]
    Replace {
        path: PathBuf,
        old: u32,
        errno: Errno,
    },
    #[error("detach the previous device filter program {id} from {path}: {errno}")]
    Detach {
        path: PathBuf,
        id: u32,
        errno: Errno,
    },
}

fn verifier(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!("; verifier: {log}")
    }
}

/// Makes `filter` the device filter of the v2 cgroup at `dir`.
///
/// Programs already attached to `dir` (ours, from create or an earlier
/// update) are replaced so that the cgroup is never without a filter: one
/// old program is swapped in one step (`BPF_F_REPLACE`, kernel 5.6+);
/// otherwise the new one is attached first and the old ones detached after,
/// so for a moment both apply and access is the stricter of the two. An
/// allow-all filter is no program at all: the old ones are detached.
/// Programs attached to parent cgroups apply as well, whatever this does.
pub fn install(dir: &Path, filter: &Filter) -> Result<(), DeviceFilterError> {
    let cgroup = open_dir(dir)?;
    let old = match attached_programs(dir, &cgroup) {
        Ok(old) => old,
        // Without bpf (kernel config, user namespace) nothing can have been
        // attached, and allow-all needs nothing.
        Err(
            e @ DeviceFilterError::Query {
                errno: Errno::ENOSYS | Errno::EINVAL | Errno::EPERM,
                ..
            },
        ) if filter.is_allow_all() => {
            tracing::debug!("{e}; allow-all needs no program");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if filter.is_allow_all() {
        return detach_all(dir, &cgroup, &old);
    }
    let new = load(dir, filter)?;
    if let [(id, only)] = old.as_slice() {
        match bpf::attach(cgroup.as_fd(), new.as_fd(), Some(only.as_fd())) {
            Ok(()) => return Ok(()),
            // Kernels before 5.6 have no BPF_F_REPLACE.
            Err(Errno::EINVAL) => {
                tracing::debug!(
                    "replace device filter program {id} on {}: EINVAL; attaching, then detaching",
                    dir.display()
                );
            }
            Err(errno) => {
                return Err(DeviceFilterError::Replace {
                    path: dir.to_path_buf(),
                    old: *id,
                    errno,
                });
            }
        }
    }
    bpf::attach(cgroup.as_fd(), new.as_fd(), None).map_err(|errno| DeviceFilterError::Attach {
        path: dir.to_path_buf(),
        errno,
    })?;
    // The attachment holds the program now; `new` is closed on return.
    detach_all(dir, &cgroup, &old)
}

/// The ids of the device filter programs attached to `dir` itself (not its
/// parents'), in the order the kernel runs them.
pub fn attached(dir: &Path) -> Result<Vec<u32>, DeviceFilterError> {
    let cgroup = open_dir(dir)?;
    bpf::query(cgroup.as_fd()).map_err(|errno| DeviceFilterError::Query {
        path: dir.to_path_buf(),
        errno,
    })
}

/// Attaches `filter` next to the programs on `dir`, leaving them: the state
/// [`install`] must clean up after when something else added a program.
#[cfg(test)]
pub(crate) fn attach_another(dir: &Path, filter: &Filter) -> Result<(), DeviceFilterError> {
    let cgroup = open_dir(dir)?;
    let new = load(dir, filter)?;
    bpf::attach(cgroup.as_fd(), new.as_fd(), None).map_err(|errno| DeviceFilterError::Attach {
        path: dir.to_path_buf(),
        errno,
    })
}

/// The filter's program, loaded (not attached yet) for the cgroup at `dir`.
fn load(dir: &Path, filter: &Filter) -> Result<OwnedFd, DeviceFilterError> {
    let program = Program::build(filter);
    bpf::load(program.insns()).map_err(|(errno, log)| DeviceFilterError::Load {
        path: dir.to_path_buf(),
        insns: program.insns().len(),
        errno,
        log,
    })
}

fn open_dir(dir: &Path) -> Result<OwnedFd, DeviceFilterError> {
    nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|errno| DeviceFilterError::Open {
        path: dir.to_path_buf(),
        errno: errno.into(),
    })
}

/// The programs attached to the cgroup, each with an fd to name it when it
/// is replaced or detached. Programs we may not open (an LSM's label on
/// someone else's program) are left alone, as runc does: another device
/// program can only take access away.
fn attached_programs(
    dir: &Path,
    cgroup: &OwnedFd,
) -> Result<Vec<(u32, OwnedFd)>, DeviceFilterError> {
    let ids = bpf::query(cgroup.as_fd()).map_err(|errno| DeviceFilterError::Query {
        path: dir.to_path_buf(),
        errno,
    })?;
    let mut programs = Vec::with_capacity(ids.len());
    for id in ids {
        match bpf::program_by_id(id) {
            Ok(fd) => programs.push((id, fd)),
            Err(errno @ (Errno::EPERM | Errno::EACCES | Errno::ENOENT)) => {
                tracing::debug!(
                    "device filter program {id} on {} left alone: {errno}",
                    dir.display()
                );
            }
            Err(errno) => {
                return Err(DeviceFilterError::GetProgram {
                    path: dir.to_path_buf(),
                    id,
                    errno,
                });
            }
        }
    }
    Ok(programs)
}

fn detach_all(
    dir: &Path,
    cgroup: &OwnedFd,
    programs: &[(u32, OwnedFd)],
) -> Result<(), DeviceFilterError> {
    for (id, program) in programs {
        bpf::detach(cgroup.as_fd(), program.as_fd()).map_err(|errno| {
            DeviceFilterError::Detach {
                path: dir.to_path_buf(),
                id: *id,
                errno,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::LinuxDeviceCgroupBuilder;

    use super::*;

    fn oci(
        typ: LinuxDeviceType,
        major: Option<i64>,
        minor: Option<i64>,
        access: &str,
    ) -> LinuxDeviceCgroup {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(typ)
            .access(access);
        if let Some(m) = major {
            b = b.major(m);
        }
        if let Some(m) = minor {
            b = b.minor(m);
        }
        b.build().expect("rule")
    }

    #[test]
    fn rules_parse_and_print_as_v1_lines() {
        let cases = [
            (
                oci(LinuxDeviceType::C, Some(1), Some(3), "rwm"),
                "c 1:3 rwm",
            ),
            (
                oci(LinuxDeviceType::U, Some(136), None, "mwr"),
                "c 136:* rwm",
            ),
            (oci(LinuxDeviceType::B, Some(8), Some(-1), "w"), "b 8:* w"),
            (oci(LinuxDeviceType::A, None, None, ""), "a *:* rwm"),
            (oci(LinuxDeviceType::C, None, Some(0), "mr"), "c *:0 rm"),
        ];
        for (rule, line) in cases {
            assert_eq!(DeviceRule::parse(&rule).expect(line).to_string(), line);
        }
    }

    #[test]
    fn bad_rules_are_refused() {
        let cases = [
            (oci(LinuxDeviceType::P, None, None, "rwm"), "fifo"),
            (
                oci(LinuxDeviceType::C, Some(1), Some(3), "rwx"),
                "not of r, w, m",
            ),
            (oci(LinuxDeviceType::C, Some(-2), None, "r"), "-2 is not"),
            (
                oci(LinuxDeviceType::C, Some(1 << 32), None, "r"),
                "4294967296 is not",
            ),
        ];
        for (rule, want) in cases {
            let err = DeviceRule::parse(&rule).expect_err(want);
            assert!(err.to_string().contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn access_sets() {
        let rw = Access::READ.union(Access::WRITE);
        assert_eq!(rw.to_string(), "rw");
        assert_eq!(Access::parse("wr"), Some(rw));
        assert_eq!(Access::parse(""), Some(Access::ALL));
        assert!(Access::ALL.contains(rw) && !rw.contains(Access::MKNOD));
        assert_eq!(Access::ALL.difference(rw), Access::MKNOD);
        assert!(rw.intersection(Access::MKNOD).is_empty());
        assert_eq!(Access::ALL.bits(), 7);
    }

    #[test]
    fn load_error_carries_the_verifier_log() {
        let err = DeviceFilterError::Load {
            path: PathBuf::from("/sys/fs/cgroup/pod/c1"),
            insns: 2,
            errno: Errno::EACCES,
            log: "0: R0 !read_ok".to_string(),
        };
        assert_eq!(
            err.to_string(),
            "load the device filter program (2 instructions) for /sys/fs/cgroup/pod/c1: EACCES: Permission denied; verifier: 0: R0 !read_ok"
        );
    }
}
