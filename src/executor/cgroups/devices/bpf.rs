//! The `bpf(2)` commands a device filter needs: load a program, attach it
//! to a cgroup (or replace one attached there), detach one, list those
//! attached, open one by id.
//!
//! Each attribute struct is the `#[repr(C)]` prefix of the kernel's
//! `union bpf_attr` for one command (uapi `linux/bpf.h`); the kernel reads
//! that many bytes and treats the rest as zero. Those that carry addresses
//! or fd numbers borrow what they name for as long as they live, and their
//! fields are private to this file, so [`bpf`], the one `unsafe` call, is
//! never handed a dangling address.

use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::program::Insn;

// enum bpf_cmd
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_QUERY: libc::c_long = 16;
// enum bpf_prog_type, enum bpf_attach_type
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
// Attach flags: several programs per cgroup, all of which must allow; and
// swap `replace_bpf_fd` for the new one in place (5.6+).
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
const BPF_F_REPLACE: u32 = 1 << 2;

/// As runc: device programs call no GPL-only helper.
const LICENSE: &[u8] = b"Apache\0";
/// What `bpftool prog` shows.
const NAME: [u8; 16] = *b"berth_devices\0\0\0";
/// The verifier can be interrupted by a signal (EAGAIN, 4.20+); runc retries
/// as often.
const LOAD_TRIES: u32 = 30;
/// The verifier's log of a rejected program: ours have a few hundred
/// instructions at most, whose log fits many times over.
const LOG_SIZE: usize = 64 * 1024;
/// Lines of the log kept in the error: the verdict is at the end.
const LOG_LINES: usize = 12;

/// A `#[repr(C)]` prefix of `union bpf_attr` for command `CMD`, all of
/// whose addresses point at memory it borrows.
trait Attr {
    const CMD: libc::c_long;
}

/// `bpf(cmd, attr, sizeof attr)`: the return value, or the errno.
fn bpf<A: Attr>(attr: &mut A) -> Result<libc::c_long, Errno> {
    let size = std::mem::size_of::<A>() as libc::c_long;
    // SAFETY: `attr` is an initialized #[repr(C)] prefix of union bpf_attr
    // for A::CMD, exclusively borrowed for the call, `size` bytes long; every
    // address in it points at memory it borrows (see the constructors), and
    // the kernel writes only within it (`Query` spans the fields that 6.17+
    // kernels write whatever the size).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, A::CMD, attr as *mut A, size) };
    if rc < 0 { Err(Errno::last()) } else { Ok(rc) }
}

/// Takes ownership of an fd the kernel just returned.
fn owned_fd(rc: libc::c_long) -> Result<OwnedFd, Errno> {
    let fd = RawFd::try_from(rc).map_err(|_| Errno::EBADF)?;
    // SAFETY: `fd` was just created by the kernel for this call; nothing
    // else in the process knows it, so this is its one owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_number(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).expect("an open fd is not negative")
}

fn address<T>(p: *const T) -> u64 {
    p as usize as u64
}

#[repr(C)]
struct ProgLoad<'a> {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    _borrows: PhantomData<(&'a [Insn], &'a mut [u8])>,
}

impl Attr for ProgLoad<'_> {
    const CMD: libc::c_long = BPF_PROG_LOAD;
}

impl<'a> ProgLoad<'a> {
    fn new(insns: &'a [Insn], log: Option<&'a mut [u8]>) -> Result<ProgLoad<'a>, Errno> {
        let insn_cnt = u32::try_from(insns.len()).map_err(|_| Errno::E2BIG)?;
        let (log_level, log_size, log_buf) = match log {
            Some(buf) => (
                1,
                u32::try_from(buf.len()).map_err(|_| Errno::E2BIG)?,
                address(buf.as_mut_ptr()),
            ),
            None => (0, 0, 0),
        };
        Ok(ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt,
            insns: address(insns.as_ptr()),
            license: address(LICENSE.as_ptr()),
            log_level,
            log_size,
            log_buf,
            kern_version: 0,
            prog_flags: 0,
            prog_name: NAME,
            _borrows: PhantomData,
        })
    }
}

#[repr(C)]
struct ProgAttach<'a> {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _borrows: PhantomData<BorrowedFd<'a>>,
}

impl Attr for ProgAttach<'_> {
    const CMD: libc::c_long = BPF_PROG_ATTACH;
}

impl<'a> ProgAttach<'a> {
    fn new(
        cgroup: BorrowedFd<'a>,
        program: BorrowedFd<'a>,
        replace: Option<BorrowedFd<'a>>,
    ) -> ProgAttach<'a> {
        ProgAttach {
            target_fd: fd_number(cgroup),
            attach_bpf_fd: fd_number(program),
            attach_type: BPF_CGROUP_DEVICE,
            attach_flags: BPF_F_ALLOW_MULTI | replace.map_or(0, |_| BPF_F_REPLACE),
            replace_bpf_fd: replace.map_or(0, fd_number),
            _borrows: PhantomData,
        }
    }
}

#[repr(C)]
struct ProgDetach<'a> {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    _borrows: PhantomData<BorrowedFd<'a>>,
}

impl Attr for ProgDetach<'_> {
    const CMD: libc::c_long = BPF_PROG_DETACH;
}

impl<'a> ProgDetach<'a> {
    fn new(cgroup: BorrowedFd<'a>, program: BorrowedFd<'a>) -> ProgDetach<'a> {
        ProgDetach {
            target_fd: fd_number(cgroup),
            attach_bpf_fd: fd_number(program),
            attach_type: BPF_CGROUP_DEVICE,
            attach_flags: 0,
            _borrows: PhantomData,
        }
    }
}

#[repr(C)]
struct ProgQuery<'a> {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    // Unused, but 6.17+ kernels write `revision` whatever size they are
    // given (fixed upstream later, see runc's ebpf_linux.go): the struct
    // must reach it.
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
    _borrows: PhantomData<(BorrowedFd<'a>, &'a mut [u32])>,
}

impl Attr for ProgQuery<'_> {
    const CMD: libc::c_long = BPF_PROG_QUERY;
}

impl<'a> ProgQuery<'a> {
    fn new(cgroup: BorrowedFd<'a>, ids: &'a mut [u32]) -> Result<ProgQuery<'a>, Errno> {
        Ok(ProgQuery {
            target_fd: fd_number(cgroup),
            attach_type: BPF_CGROUP_DEVICE,
            query_flags: 0,
            attach_flags: 0,
            prog_cnt: u32::try_from(ids.len()).map_err(|_| Errno::E2BIG)?,
            prog_ids: address(ids.as_mut_ptr()),
            _pad: 0,
            prog_attach_flags: 0,
            link_ids: 0,
            link_attach_flags: 0,
            revision: 0,
            _borrows: PhantomData,
        })
    }
}

#[repr(C)]
struct ProgGetFdById {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

impl Attr for ProgGetFdById {
    const CMD: libc::c_long = BPF_PROG_GET_FD_BY_ID;
}

/// Loads a device program. On failure, the errno and the verifier's log
/// (empty when the verifier did not reject it).
pub fn load(insns: &[Insn]) -> Result<OwnedFd, (Errno, String)> {
    let first = match load_once(insns, None) {
        // Kernels before 5.11 charge programs to RLIMIT_MEMLOCK.
        Err(Errno::EPERM) => {
            with_memlock_raised(|| load_once(insns, None)).unwrap_or(Err(Errno::EPERM))
        }
        other => other,
    };
    let errno = match first {
        Ok(fd) => return Ok(fd),
        Err(errno) => errno,
    };
    // Again with the log, to say why: the fast path goes without it.
    let mut log = vec![0u8; LOG_SIZE];
    match load_once(insns, Some(&mut log)) {
        Ok(fd) => {
            tracing::warn!("device filter program loaded on a second try after {errno}");
            Ok(fd)
        }
        // ENOSPC: the log did not fit; what did is still worth showing.
        Err(again) => Err((again, log_tail(&log))),
    }
}

fn load_once(insns: &[Insn], mut log: Option<&mut [u8]>) -> Result<OwnedFd, Errno> {
    for _ in 0..LOAD_TRIES {
        let mut attr = ProgLoad::new(insns, log.as_deref_mut())?;
        match bpf(&mut attr) {
            Ok(rc) => return owned_fd(rc),
            Err(Errno::EAGAIN) => continue,
            Err(errno) => return Err(errno),
        }
    }
    Err(Errno::EAGAIN)
}

/// Runs `f` with RLIMIT_MEMLOCK unlimited and puts the old limit back, so
/// that processes started later do not inherit it (one the daemon starts
/// meanwhile would). `None` when the limit was unlimited already or cannot
/// be raised: then it is not what failed.
fn with_memlock_raised<T>(f: impl FnOnce() -> T) -> Option<T> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).ok()?;
    if soft == RLIM_INFINITY {
        return None;
    }
    setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).ok()?;
    let out = f();
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, soft, hard) {
        tracing::warn!("restore RLIMIT_MEMLOCK after loading a device filter: {e}");
    }
    Some(out)
}

/// The last lines of a NUL-terminated log, on one line.
fn log_tail(log: &[u8]) -> String {
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(LOG_LINES)..].join("; ")
}

/// Attaches `program` to `cgroup` next to the programs there, or in place
/// of `replace`.
pub fn attach(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
    replace: Option<BorrowedFd<'_>>,
) -> Result<(), Errno> {
    bpf(&mut ProgAttach::new(cgroup, program, replace)).map(drop)
}

pub fn detach(cgroup: BorrowedFd<'_>, program: BorrowedFd<'_>) -> Result<(), Errno> {
    bpf(&mut ProgDetach::new(cgroup, program)).map(drop)
}

/// The ids of the device programs attached to `cgroup` itself.
pub fn query(cgroup: BorrowedFd<'_>) -> Result<Vec<u32>, Errno> {
    // 64 is the most a cgroup held per attach type before 6.6; a later
    // kernel says how many there are with ENOSPC.
    let mut ids = vec![0u32; 64];
    for _ in 0..4 {
        let mut attr = ProgQuery::new(cgroup, &mut ids)?;
        let result = bpf(&mut attr);
        let count = usize::try_from(attr.prog_cnt).map_err(|_| Errno::E2BIG)?;
        match result {
            Ok(_) => {
                ids.truncate(count);
                return Ok(ids);
            }
            Err(Errno::ENOSPC) => ids.resize(count.max(ids.len() * 2), 0),
            Err(errno) => return Err(errno),
        }
    }
    Err(Errno::ENOSPC)
}

/// An fd for the program with `id` (needs CAP_SYS_ADMIN).
pub fn program_by_id(id: u32) -> Result<OwnedFd, Errno> {
    let mut attr = ProgGetFdById {
        prog_id: id,
        next_id: 0,
        open_flags: 0,
    };
    owned_fd(bpf(&mut attr)?)
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn attrs_match_the_kernel_layout() {
        assert_eq!(size_of::<Insn>(), 8);
        assert_eq!(offset_of!(ProgLoad<'_>, insns), 8);
        assert_eq!(offset_of!(ProgLoad<'_>, log_buf), 32);
        assert_eq!(offset_of!(ProgLoad<'_>, prog_name), 48);
        assert_eq!(size_of::<ProgLoad<'_>>(), 64);
        assert_eq!(offset_of!(ProgAttach<'_>, replace_bpf_fd), 16);
        assert_eq!(size_of::<ProgAttach<'_>>(), 20);
        assert_eq!(offset_of!(ProgQuery<'_>, prog_ids), 16);
        assert_eq!(offset_of!(ProgQuery<'_>, prog_cnt), 24);
        assert_eq!(offset_of!(ProgQuery<'_>, prog_attach_flags), 32);
        assert_eq!(offset_of!(ProgQuery<'_>, revision), 56);
        assert_eq!(size_of::<ProgQuery<'_>>(), 64);
    }

    /// Needs root and a kernel with bpf: a program that exits without
    /// setting r0 is rejected, and the error says why.
    #[test]
    fn rejected_program_comes_with_the_verifier_log() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to load bpf programs");
            return;
        }
        let exit = Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        };
        match load(&[exit]) {
            Ok(_) => panic!("the verifier took a program that returns nothing"),
            Err((Errno::ENOSYS, _)) => eprintln!("skipped: this kernel has no bpf"),
            Err((errno, log)) => {
                assert_eq!(errno, Errno::EACCES, "{log}");
                assert!(log.contains("R0 !read_ok"), "{log}");
                eprintln!("verifier: {log}");
            }
        }
    }

    /// Needs root: every shape of block the assembler makes passes the
    /// verifier, for allow-lists and deny-lists.
    #[test]
    fn kernel_accepts_allow_and_deny_lists() {
        use super::super::{Access, DeviceRule, DeviceType, Filter, Program};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to load bpf programs");
            return;
        }
        let rule = |allow, typ, major, minor, access: &str| DeviceRule {
            allow,
            typ,
            major,
            minor,
            access: Access::parse(access).expect("access"),
        };
        let lists = [
            vec![rule(false, DeviceType::All, None, None, "")],
            vec![
                rule(false, DeviceType::All, None, None, ""),
                rule(true, DeviceType::Char, None, None, "m"),
                rule(true, DeviceType::Block, Some(8), None, "r"),
                rule(true, DeviceType::Char, Some(1), Some(3), "rwm"),
                rule(true, DeviceType::Char, None, Some(7), "rw"),
                rule(true, DeviceType::Char, Some(u32::MAX), Some(u32::MAX), "w"),
            ],
            vec![
                rule(true, DeviceType::All, None, None, ""),
                rule(false, DeviceType::Block, None, None, "w"),
                rule(false, DeviceType::Char, Some(10), Some(200), "rwm"),
                rule(false, DeviceType::Char, Some(1), None, "m"),
            ],
        ];
        for rules in lists {
            let filter = Filter::from_rules(&rules).expect("filter");
            let program = Program::build(&filter);
            if let Err((errno, log)) = load(program.insns()) {
                panic!("{filter}: {errno}: {log}");
            }
        }
    }

    #[test]
    fn log_tail_keeps_the_verdict_on_one_line() {
        let mut log = b"0: (b4) w0 = 2\n1: (95) exit\nAt program exit the register R0 has value (0x2; 0x0) should have been in (0x0; 0x1)\nprocessed 2 insns\n".to_vec();
        log.extend([0u8; 16]);
        let tail = log_tail(&log);
        assert!(
            tail.starts_with("0: (b4) w0 = 2; 1: (95) exit; At program exit"),
            "{tail}"
        );
        assert!(tail.ends_with("processed 2 insns"), "{tail}");
        let long: String = (0..40).map(|i| format!("line {i}\n")).collect();
        assert_eq!(log_tail(long.as_bytes()).split("; ").count(), LOG_LINES);
    }
}
