//! What the bench reads from `/proc`: which process owns a CRI socket (the
//! daemon), the per-container helper processes that daemon runs (berth's
//! monitors, containerd's shims), and their memory.
//!
//! The daemon is found without asking it: `/proc/net/unix` maps the socket
//! path to the inodes of the sockets bound there, and the process holding the
//! listening one in `/proc/<pid>/fd` is the daemon. That needs root (or the
//! daemon's user); `--daemon-pid` covers the rest.

use std::path::{Path, PathBuf};

use crate::monitor::SPARE_NAME;

use serde::Serialize;

/// `__SO_ACCEPTCON` in the Flags column of `/proc/net/unix`: a listening socket.
const SO_ACCEPTCON: u64 = 0x0001_0000;

/// Memory of one process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProcMemory {
    pub pid: i32,
    /// Resident set size (`VmRSS`).
    pub rss_kib: u64,
    /// Proportional set size (`Pss` of `smaps_rollup`): shared pages divided
    /// among their users, so that N shims of one binary do not count its
    /// text N times.
    pub pss_kib: Option<u64>,
    /// Pages no other process maps (`Private_Clean` + `Private_Dirty` of
    /// `smaps_rollup`): what the process costs whatever else runs.
    pub private_kib: Option<u64>,
}

/// A set of processes, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Group {
    pub count: usize,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub private_kib: u64,
}

impl Group {
    pub fn of(members: &[ProcMemory]) -> Group {
        Group {
            count: members.len(),
            rss_kib: members.iter().map(|m| m.rss_kib).sum(),
            pss_kib: members.iter().filter_map(|m| m.pss_kib).sum(),
            private_kib: members.iter().filter_map(|m| m.private_kib).sum(),
        }
    }

    /// The mean of a sum over the members; None without members.
    pub fn per_member(&self, sum_kib: u64) -> Option<f64> {
        (self.count > 0).then(|| sum_kib as f64 / self.count as f64)
    }
}

/// Which runtime a daemon is, by what its per-container helpers look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavor {
    /// `berth monitor --config <bundle>/monitor.json` (argv[0] is
    /// `/proc/self/exe` when the daemon started it); with the daemon's
    /// `--state` (when its command line has one), only monitors whose
    /// config lies under it.
    Berth {
        state: Option<PathBuf>,
    },
    /// `containerd-shim-* ... -address <socket>`.
    Containerd {
        socket: PathBuf,
    },
    Unknown,
}

impl Flavor {
    /// What its helpers are called in reports.
    pub fn helper_name(&self) -> &'static str {
        match self {
            Flavor::Berth { .. } => "berth monitor",
            Flavor::Containerd { .. } => "containerd-shim",
            Flavor::Unknown => "(unknown)",
        }
    }
}

fn basename(arg0: &str) -> &str {
    arg0.rsplit('/').next().unwrap_or(arg0)
}

/// The flavor of a daemon from its command line; `socket` is the CRI socket
/// it serves (containerd's shims name it).
pub fn flavor_of(cmdline: &[String], socket: &Path) -> Flavor {
    let Some(arg0) = cmdline.first() else {
        return Flavor::Unknown;
    };
    let name = basename(arg0);
    if name.starts_with("berth") {
        Flavor::Berth {
            state: flag_value(cmdline, "--state").map(PathBuf::from),
        }
    } else if name.starts_with("containerd") {
        Flavor::Containerd {
            socket: socket.to_path_buf(),
        }
    } else {
        Flavor::Unknown
    }
}

/// The value of `--flag VALUE` or `--flag=VALUE`.
fn flag_value<'a>(cmdline: &'a [String], flag: &str) -> Option<&'a str> {
    let mut args = cmdline.iter();
    while let Some(arg) = args.next() {
        if arg == flag {
            return args.next().map(String::as_str);
        }
        if let Some(value) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(value);
        }
    }
    None
}

/// True if `cmdline` is one of the per-container helpers of a daemon of
/// this flavor.
pub fn is_helper(flavor: &Flavor, cmdline: &[String]) -> bool {
    let Some(arg0) = cmdline.first() else {
        return false;
    };
    match flavor {
        Flavor::Berth { state } => {
            let is_monitor = (basename(arg0).starts_with("berth") || arg0 == "/proc/self/exe")
                && cmdline.iter().skip(1).any(|a| a == "monitor");
            is_monitor
                && match (state, flag_value(cmdline, "--config")) {
                    (Some(state), Some(config)) => Path::new(config).starts_with(state),
                    _ => true,
                }
        }
        Flavor::Containerd { socket } => {
            basename(arg0).starts_with("containerd-shim")
                && cmdline
                    .windows(2)
                    .any(|w| w[0] == "-address" && Path::new(&w[1]) == socket)
        }
        Flavor::Unknown => false,
    }
}

/// Inodes of the listening sockets bound at `path`, from the text of
/// `/proc/net/unix` (`Num RefCount Protocol Flags Type St Inode Path`).
pub fn listening_inodes(proc_net_unix: &str, path: &Path) -> Vec<u64> {
    proc_net_unix
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (flags, inode, bound) = (fields.get(3)?, fields.get(6)?, fields.get(7)?);
            let flags = u64::from_str_radix(flags, 16).ok()?;
            (flags & SO_ACCEPTCON != 0 && Path::new(bound) == path).then_some(())?;
            inode.parse().ok()
        })
        .collect()
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn status_rss_kib(status: &str) -> Option<u64> {
    kib_field(status, "VmRSS:")
}

/// `Pss` in KiB from the text of `/proc/<pid>/smaps_rollup`.
pub fn rollup_pss_kib(rollup: &str) -> Option<u64> {
    kib_field(rollup, "Pss:")
}

/// `Private_Clean` + `Private_Dirty` in KiB from the text of
/// `/proc/<pid>/smaps_rollup`.
pub fn rollup_private_kib(rollup: &str) -> Option<u64> {
    Some(kib_field(rollup, "Private_Clean:")? + kib_field(rollup, "Private_Dirty:")?)
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The arguments of a process; `None` if it is gone or a kernel thread.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The process listening on the unix socket `socket`, if this user can see it.
pub fn socket_owner(socket: &Path) -> Option<i32> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let mut candidates = vec![socket.to_path_buf()];
    if let Ok(real) = socket.canonicalize()
        && real != socket
    {
        candidates.push(real);
    }
    let inodes: Vec<u64> = candidates
        .iter()
        .flat_map(|path| listening_inodes(&table, path))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut owners: Vec<i32> = pids()
        .into_iter()
        .filter(|pid| {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                return false;
            };
            fds.filter_map(Result::ok).any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
            })
        })
        .collect();
    // A child that inherited the socket has a higher pid than the daemon
    // that bound it, almost always.
    owners.sort_unstable();
    owners.first().copied()
}

/// The memory of a process now; `None` once it is gone.
impl ProcMemory {
    /// Two processes counted as one (under the first one's pid).
    pub fn plus(&self, other: &ProcMemory) -> ProcMemory {
        let add = |a: Option<u64>, b: Option<u64>| Some(a? + b?);
        ProcMemory {
            pid: self.pid,
            rss_kib: self.rss_kib + other.rss_kib,
            pss_kib: add(self.pss_kib, other.pss_kib),
            private_kib: add(self.private_kib, other.private_kib),
        }
    }
}

pub fn memory(pid: i32) -> Option<ProcMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status_rss_kib(&status)?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok();
    Some(ProcMemory {
        pid,
        rss_kib,
        pss_kib: rollup.as_deref().and_then(rollup_pss_kib),
        private_kib: rollup.as_deref().and_then(rollup_private_kib),
    })
}

/// `VmRSS` alone, cheaply, for the peak sampler.
pub fn rss_kib(pid: i32) -> Option<u64> {
    status_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// What `/proc/<pid>/exe` points to.
pub fn exe(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// The per-container helpers of a daemon of this flavor, with their memory.
/// berth's monitors are the daemon's own binary re-executed, so when the
/// daemon is known (`daemon_exe`) a monitor must run that same file: two
/// berth daemons side by side never count each other's monitors. berth's
/// monitor zygote and its spare (see [`zygote_of`]) are the daemon's, not
/// a container's.
pub fn helpers(
    flavor: &Flavor,
    daemon_pid: Option<i32>,
    daemon_exe: Option<&Path>,
) -> Vec<ProcMemory> {
    if *flavor == Flavor::Unknown {
        return Vec::new();
    }
    let zygote = daemon_pid.and_then(zygote_pid);
    let spares = zygote.map(spare_pids).unwrap_or_default();
    pids()
        .into_iter()
        .filter(|&pid| Some(pid) != zygote && !spares.contains(&pid))
        .filter(|&pid| cmdline(pid).is_some_and(|c| is_helper(flavor, &c)))
        .filter(|&pid| match (flavor, daemon_exe) {
            (Flavor::Berth { .. }, Some(daemon)) => exe(pid).is_some_and(|e| e == daemon),
            _ => true,
        })
        .filter_map(memory)
        .collect()
}

/// The parent pid from `/proc/<pid>/stat`.
fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// berth's monitor zygote: the daemon's child `monitor --zygote`. The
/// monitors it forks carry the same command line, but not the daemon as
/// their parent.
fn zygote_pid(daemon: i32) -> Option<i32> {
    pids().into_iter().find(|&pid| {
        ppid(pid) == Some(daemon) && cmdline(pid).is_some_and(|c| c.iter().any(|a| a == "--zygote"))
    })
}

/// The zygote's spare monitor (see `monitor::zygote`): its child that
/// waits under the name `berth-spare` for the next container.
fn spare_pids(zygote: i32) -> Vec<i32> {
    pids()
        .into_iter()
        .filter(|&pid| {
            ppid(pid) == Some(zygote)
                && comm(pid).is_some_and(|c| c.as_bytes() == SPARE_NAME.to_bytes())
        })
        .collect()
}

/// The short name from `/proc/<pid>/comm`.
fn comm(pid: i32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_string())
}

/// The memory of the daemon's monitor zygote and its spare monitor, if it
/// has them: per-daemon memory, reported with the daemon's.
pub fn zygote_of(daemon: i32) -> Option<ProcMemory> {
    let zygote = zygote_pid(daemon)?;
    let mut total = memory(zygote)?;
    for spare in spare_pids(zygote) {
        if let Some(m) = memory(spare) {
            total = total.plus(&m);
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    const NET_UNIX: &str = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 41234 /run/berth-peer/containerd.sock
0000000000000000: 00000003 00000000 00000000 0001 03 41240 /run/berth-peer/containerd.sock
0000000000000000: 00000002 00000000 00010000 0001 01 51000 /tmp/bb/berth.sock
0000000000000000: 00000003 00000000 00000000 0001 03 51001
0000000000000000: 00000002 00000000 00010000 0005 01 52000 @abstract
";

    #[test]
    fn listening_inode_is_found_by_path_and_connections_are_not() {
        assert_eq!(
            listening_inodes(NET_UNIX, Path::new("/run/berth-peer/containerd.sock")),
            vec![41234]
        );
        assert_eq!(
            listening_inodes(NET_UNIX, Path::new("/tmp/bb/berth.sock")),
            vec![51000]
        );
        assert!(listening_inodes(NET_UNIX, Path::new("/nope.sock")).is_empty());
    }

    #[test]
    fn rss_and_pss_are_read_in_kib() {
        let status = "Name:\tberth\nVmHWM:\t   20000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(status_rss_kib(status), Some(12345));
        assert_eq!(status_rss_kib("Name:\tkthreadd\n"), None);
        let rollup = "55a0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  900 kB\nPss:  321 kB\nPss_Anon: 100 kB\nShared_Clean: 700 kB\nPrivate_Clean: 8 kB\nPrivate_Dirty: 192 kB\n";
        assert_eq!(rollup_pss_kib(rollup), Some(321));
        assert_eq!(rollup_private_kib(rollup), Some(200));
        assert_eq!(rollup_private_kib("Pss: 1 kB\n"), None);
    }

    #[test]
    fn flavor_comes_from_the_daemon_binary() {
        let sock = Path::new("/tmp/bb/berth.sock");
        assert_eq!(
            flavor_of(&args("/usr/bin/berth serve --state /tmp/bb/state"), sock),
            Flavor::Berth {
                state: Some(PathBuf::from("/tmp/bb/state"))
            }
        );
        assert_eq!(
            flavor_of(
                &args("target/release/berth --config c.toml serve --state=/s"),
                sock
            ),
            Flavor::Berth {
                state: Some(PathBuf::from("/s"))
            }
        );
        assert_eq!(
            flavor_of(&args("berth serve"), sock),
            Flavor::Berth { state: None }
        );
        assert_eq!(
            flavor_of(
                &args("containerd --config /run/berth-peer/config.toml"),
                sock
            ),
            Flavor::Containerd {
                socket: sock.to_path_buf()
            }
        );
        assert_eq!(flavor_of(&args("crio"), sock), Flavor::Unknown);
        assert_eq!(flavor_of(&[], sock), Flavor::Unknown);
    }

    #[test]
    fn a_daemon_and_its_zygote_add_up() {
        let daemon = ProcMemory {
            pid: 10,
            rss_kib: 4000,
            pss_kib: Some(2000),
            private_kib: Some(1500),
        };
        let zygote = ProcMemory {
            pid: 11,
            rss_kib: 3000,
            pss_kib: Some(900),
            private_kib: None,
        };
        let both = daemon.plus(&zygote);
        assert_eq!(both.pid, 10);
        assert_eq!(both.rss_kib, 7000);
        assert_eq!(both.pss_kib, Some(2900));
        assert_eq!(both.private_kib, None, "unknown stays unknown");
    }

    #[test]
    fn berth_monitors_are_matched_under_the_daemon_state() {
        let flavor = Flavor::Berth {
            state: Some(PathBuf::from("/tmp/bb/state")),
        };
        assert!(is_helper(
            &flavor,
            &args(
                "/work/main/target/release/berth monitor --config /tmp/bb/state/containers/abc/monitor.json"
            )
        ));
        assert!(!is_helper(
            &flavor,
            &args("/usr/bin/berth monitor --config /run/berth/containers/abc/monitor.json")
        ));
        assert!(!is_helper(
            &flavor,
            &args("/usr/bin/berth serve --state /tmp/bb/state")
        ));
        assert!(is_helper(
            &flavor,
            &args("/proc/self/exe monitor --config /tmp/bb/state/containers/abc/monitor.json")
        ));
        assert!(!is_helper(&flavor, &args("/proc/self/exe init")));
        let any = Flavor::Berth { state: None };
        assert!(is_helper(
            &any,
            &args("/usr/bin/berth monitor --config /run/berth/x/monitor.json")
        ));
    }

    #[test]
    fn containerd_shims_are_matched_by_their_socket() {
        let flavor = Flavor::Containerd {
            socket: PathBuf::from("/run/berth-peer/containerd.sock"),
        };
        assert!(is_helper(
            &flavor,
            &args(
                "/usr/bin/containerd-shim-runc-v2 -namespace k8s.io -id abc -address /run/berth-peer/containerd.sock"
            )
        ));
        assert!(!is_helper(
            &flavor,
            &args(
                "/usr/bin/containerd-shim-runc-v2 -namespace k8s.io -id abc -address /run/containerd/containerd.sock"
            )
        ));
        assert!(!is_helper(&flavor, &args("sleep 3600")));
        assert!(!is_helper(&Flavor::Unknown, &args("containerd-shim")));
    }

    #[test]
    fn groups_sum_their_members() {
        let g = Group::of(&[
            ProcMemory {
                pid: 1,
                rss_kib: 10,
                pss_kib: Some(4),
                private_kib: Some(3),
            },
            ProcMemory {
                pid: 2,
                rss_kib: 20,
                pss_kib: None,
                private_kib: Some(5),
            },
        ]);
        assert_eq!(
            g,
            Group {
                count: 2,
                rss_kib: 30,
                pss_kib: 4,
                private_kib: 8,
            }
        );
        assert_eq!(g.per_member(g.private_kib), Some(4.0));
        assert_eq!(Group::default().per_member(0), None);
    }

    #[test]
    fn this_process_has_memory() {
        let me = memory(std::process::id() as i32).expect("own /proc entry");
        assert!(me.rss_kib > 0);
    }
}
