//! Usage read back from a cgroup, in the units CRI and cadvisor use: CPU in
//! nanoseconds, memory in bytes. The working set is usage minus inactive
//! file pages, as cadvisor computes it (kubelet evicts on it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::CgroupError;
use super::resources::{Controller, Version};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// `None` when the host has no cpu accounting controller.
    pub cpu: Option<CpuStats>,
    /// `None` when the host has no memory controller.
    pub memory: Option<MemoryStats>,
    /// `None` when the host has no pids controller.
    pub pids: Option<PidsStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuStats {
    pub usage_ns: u64,
    pub user_ns: u64,
    pub system_ns: u64,
    /// `None` when the kernel keeps no CFS bandwidth counters for the
    /// cgroup: no v1 cpu controller, or v2 without `cpu` enabled in the
    /// parent's `cgroup.subtree_control` (`cpu.stat` then has only the
    /// usage lines).
    pub throttling: Option<CpuThrottling>,
}

/// CFS bandwidth counters: periods elapsed, periods throttled, time
/// throttled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuThrottling {
    pub periods: u64,
    pub throttled_periods: u64,
    pub throttled_ns: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub usage_bytes: u64,
    /// `usage - inactive_file`, never below 0.
    pub working_set_bytes: u64,
    /// Anonymous memory: v1 `total_rss`, v2 `anon`.
    pub rss_bytes: u64,
    /// Page cache: v1 `total_cache`, v2 `file`.
    pub cache_bytes: u64,
    /// Page cache mapped into processes: v1 `total_mapped_file`, v2
    /// `file_mapped`; `None` if the kernel's `memory.stat` lacks the line.
    pub mapped_file_bytes: Option<u64>,
    pub page_faults: u64,
    pub major_page_faults: u64,
    /// `None` when swap accounting is off.
    pub swap_bytes: Option<u64>,
    /// `None` when unlimited.
    pub limit_bytes: Option<u64>,
}

impl MemoryStats {
    /// What kubelet calls available: limit minus working set, when limited.
    pub fn available_bytes(&self) -> Option<u64> {
        self.limit_bytes
            .map(|l| l.saturating_sub(self.working_set_bytes))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PidsStats {
    pub current: u64,
    /// `None` when unlimited.
    pub limit: Option<u64>,
}

/// v1 reports "no limit" as the largest page-aligned i64; anything this big
/// is unlimited.
const V1_UNLIMITED: u64 = 1 << 62;

/// Nanoseconds per USER_HZ tick: USER_HZ is 100 on every architecture
/// Kubernetes runs on.
const NS_PER_TICK: u64 = 10_000_000;

pub(super) type Dirs<'a> = &'a BTreeMap<Controller, (PathBuf, Version)>;

pub(super) fn collect(dirs: Dirs<'_>) -> Result<CgroupStats, CgroupError> {
    Ok(CgroupStats {
        cpu: cpu(dirs)?,
        memory: memory(dirs)?,
        pids: pids(dirs)?,
    })
}

fn cpu(dirs: Dirs<'_>) -> Result<Option<CpuStats>, CgroupError> {
    let mut stats = match dirs.get(&Controller::CpuAcct) {
        Some((dir, Version::V1)) => {
            let usage_ns = read_u64(&dir.join("cpuacct.usage"))?;
            // cpuacct.usage_user/_sys (4.7+) are in ns; cpuacct.stat in ticks.
            let (user_ns, system_ns) = match read_optional(&dir.join("cpuacct.usage_user"))? {
                Some(user) => (
                    parse_u64(&dir.join("cpuacct.usage_user"), &user)?,
                    read_u64(&dir.join("cpuacct.usage_sys"))?,
                ),
                None => {
                    let path = dir.join("cpuacct.stat");
                    let text = read_file(&path)?;
                    let kv = flat_keyed(&text);
                    (
                        kv.get("user").copied().unwrap_or(0) * NS_PER_TICK,
                        kv.get("system").copied().unwrap_or(0) * NS_PER_TICK,
                    )
                }
            };
            CpuStats {
                usage_ns,
                user_ns,
                system_ns,
                ..CpuStats::default()
            }
        }
        Some((dir, Version::V2)) => {
            let kv = cpu_stat_v2(&read_file(&dir.join("cpu.stat"))?);
            return Ok(Some(kv));
        }
        None => return Ok(None),
    };
    if let Some((dir, Version::V1)) = dirs.get(&Controller::Cpu) {
        // v1 `throttled_time` is in nanoseconds already.
        stats.throttling = throttling(&read_file(&dir.join("cpu.stat"))?, "throttled_time", 1);
    }
    Ok(Some(stats))
}

/// The CFS counters of a `cpu.stat`, if it has them; `time_key` is in
/// units of `ns_per_unit` nanoseconds.
fn throttling(text: &str, time_key: &str, ns_per_unit: u64) -> Option<CpuThrottling> {
    let kv = flat_keyed(text);
    Some(CpuThrottling {
        periods: *kv.get("nr_periods")?,
        throttled_periods: kv.get("nr_throttled").copied().unwrap_or(0),
        throttled_ns: kv.get(time_key).copied().unwrap_or(0) * ns_per_unit,
    })
}

/// v2 `cpu.stat`: everything in microseconds.
pub fn cpu_stat_v2(text: &str) -> CpuStats {
    let kv = flat_keyed(text);
    let get = |k: &str| kv.get(k).copied().unwrap_or(0);
    CpuStats {
        usage_ns: get("usage_usec") * 1000,
        user_ns: get("user_usec") * 1000,
        system_ns: get("system_usec") * 1000,
        throttling: throttling(text, "throttled_usec", 1000),
    }
}

fn memory(dirs: Dirs<'_>) -> Result<Option<MemoryStats>, CgroupError> {
    let Some((dir, version)) = dirs.get(&Controller::Memory) else {
        return Ok(None);
    };
    let stat = read_file(&dir.join("memory.stat"))?;
    Ok(Some(match version {
        Version::V1 => {
            let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
            let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
            memory_v1(usage, limit, &stat)
        }
        Version::V2 => {
            let usage = read_u64(&dir.join("memory.current"))?;
            let limit_path = dir.join("memory.max");
            let limit = parse_max(&limit_path, &read_file(&limit_path)?)?;
            let swap_path = dir.join("memory.swap.current");
            let swap = match read_optional(&swap_path)? {
                Some(text) => Some(parse_u64(&swap_path, &text)?),
                None => None,
            };
            memory_v2(usage, limit, swap, &stat)
        }
    }))
}

/// v1: the `total_*` keys of `memory.stat` include descendants.
pub fn memory_v1(usage: u64, limit: u64, stat: &str) -> MemoryStats {
    let kv = flat_keyed(stat);
    let get = |k: &str| kv.get(k).copied().unwrap_or(0);
    MemoryStats {
        usage_bytes: usage,
        working_set_bytes: usage.saturating_sub(get("total_inactive_file")),
        rss_bytes: get("total_rss"),
        cache_bytes: get("total_cache"),
        mapped_file_bytes: kv.get("total_mapped_file").copied(),
        page_faults: get("total_pgfault"),
        major_page_faults: get("total_pgmajfault"),
        // Present only with swap accounting.
        swap_bytes: kv.get("total_swap").copied(),
        limit_bytes: (limit < V1_UNLIMITED).then_some(limit),
    }
}

/// v2: `memory.stat` is always hierarchical.
pub fn memory_v2(usage: u64, limit: Option<u64>, swap: Option<u64>, stat: &str) -> MemoryStats {
    let kv = flat_keyed(stat);
    let get = |k: &str| kv.get(k).copied().unwrap_or(0);
    MemoryStats {
        usage_bytes: usage,
        working_set_bytes: usage.saturating_sub(get("inactive_file")),
        rss_bytes: get("anon"),
        cache_bytes: get("file"),
        mapped_file_bytes: kv.get("file_mapped").copied(),
        page_faults: get("pgfault"),
        major_page_faults: get("pgmajfault"),
        swap_bytes: swap,
        limit_bytes: limit,
    }
}

fn pids(dirs: Dirs<'_>) -> Result<Option<PidsStats>, CgroupError> {
    let Some((dir, _)) = dirs.get(&Controller::Pids) else {
        return Ok(None);
    };
    let max_path = dir.join("pids.max");
    Ok(Some(PidsStats {
        current: read_u64(&dir.join("pids.current"))?,
        limit: parse_max(&max_path, &read_file(&max_path)?)?,
    }))
}

/// The `oom_kill` counter: v1 `memory.oom_control`, v2 `memory.events`.
pub(super) fn oom_kill_count(dir: &Path, version: Version) -> Result<u64, CgroupError> {
    let path = dir.join(match version {
        Version::V1 => "memory.oom_control",
        Version::V2 => "memory.events",
    });
    flat_keyed(&read_file(&path)?)
        .get("oom_kill")
        .copied()
        .ok_or(CgroupError::NoOomKillCounter { path })
}

/// `key value` lines; lines whose value is not a number are left out.
pub fn flat_keyed(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

pub(super) fn read_file(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|errno| CgroupError::Read {
        path: path.to_path_buf(),
        errno,
    })
}

/// `None` when the file does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(errno) => Err(CgroupError::Read {
            path: path.to_path_buf(),
            errno,
        }),
    }
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    parse_u64(path, &read_file(path)?)
}

fn parse_u64(path: &Path, text: &str) -> Result<u64, CgroupError> {
    text.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        reason: format!("{:?} is not a number", text.trim()),
    })
}

/// A number or `max`.
fn parse_max(path: &Path, text: &str) -> Result<Option<u64>, CgroupError> {
    if text.trim() == "max" {
        Ok(None)
    } else {
        parse_u64(path, text).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // From a busybox container on a 6.x v1 host (trimmed).
    const MEMORY_STAT_V1: &str = "\
cache 405504
rss 548864
rss_huge 0
shmem 0
mapped_file 0
pgpgin 1201
pgpgout 968
pgfault 1683
pgmajfault 2
inactive_anon 540672
active_anon 8192
inactive_file 270336
active_file 135168
unevictable 0
hierarchical_memory_limit 67108864
hierarchical_memsw_limit 134217728
total_cache 405504
total_rss 548864
total_swap 4096
total_pgfault 1683
total_pgmajfault 2
total_inactive_anon 540672
total_active_anon 8192
total_inactive_file 270336
total_active_file 135168
";

    // From a pod on a 6.x v2 host (trimmed).
    const MEMORY_STAT_V2: &str = "\
anon 5177344
file 1617920
kernel 446464
kernel_stack 49152
pagetables 90112
sock 0
shmem 0
file_mapped 933888
file_dirty 0
inactive_anon 5160960
active_anon 16384
inactive_file 1081344
active_file 536576
unevictable 0
pgfault 3388
pgmajfault 7
workingset_refault_anon 0
";

    const CPU_STAT_V2: &str = "\
usage_usec 1234567
user_usec 1000000
system_usec 234567
core_sched.force_idle_usec 0
nr_periods 120
nr_throttled 14
throttled_usec 700500
nr_bursts 0
burst_usec 0
";

    #[test]
    fn v1_memory_working_set_is_usage_minus_inactive_file() {
        let m = memory_v1(1_118_208, 67_108_864, MEMORY_STAT_V1);
        assert_eq!(m.working_set_bytes, 1_118_208 - 270_336);
        assert_eq!(m.rss_bytes, 548_864);
        assert_eq!(m.cache_bytes, 405_504);
        assert_eq!((m.page_faults, m.major_page_faults), (1683, 2));
        assert_eq!(m.swap_bytes, Some(4096));
        assert_eq!(m.limit_bytes, Some(67_108_864));
        assert_eq!(
            m.available_bytes(),
            Some(67_108_864 - (1_118_208 - 270_336))
        );
        let unlimited = memory_v1(100, 9_223_372_036_854_771_712, "total_inactive_file 400\n");
        assert_eq!(unlimited.limit_bytes, None);
        assert_eq!(unlimited.working_set_bytes, 0, "never below zero");
        assert_eq!(unlimited.swap_bytes, None);
    }

    #[test]
    fn v2_memory_uses_anon_and_inactive_file() {
        let m = memory_v2(7_340_032, None, Some(0), MEMORY_STAT_V2);
        assert_eq!(m.working_set_bytes, 7_340_032 - 1_081_344);
        assert_eq!(m.rss_bytes, 5_177_344);
        assert_eq!(m.cache_bytes, 1_617_920);
        assert_eq!((m.page_faults, m.major_page_faults), (3388, 7));
        assert_eq!(m.available_bytes(), None);
    }

    #[test]
    fn v2_cpu_stat_is_microseconds() {
        let c = cpu_stat_v2(CPU_STAT_V2);
        assert_eq!(c.usage_ns, 1_234_567_000);
        assert_eq!(c.user_ns, 1_000_000_000);
        assert_eq!(c.system_ns, 234_567_000);
        assert_eq!(
            c.throttling,
            Some(CpuThrottling {
                periods: 120,
                throttled_periods: 14,
                throttled_ns: 700_500_000,
            })
        );
    }

    #[test]
    fn v2_cpu_stat_without_the_cpu_controller_has_no_throttling() {
        // What a cgroup whose parent does not enable `cpu` shows.
        let c = cpu_stat_v2("usage_usec 2000\nuser_usec 1500\nsystem_usec 500\n");
        assert_eq!(c.usage_ns, 2_000_000);
        assert_eq!(c.throttling, None, "absent, not zero");
    }

    #[test]
    fn mapped_file_is_read_where_the_kernel_reports_it() {
        let v1 = memory_v1(1_118_208, 67_108_864, "total_mapped_file 135168\n");
        assert_eq!(v1.mapped_file_bytes, Some(135_168));
        assert_eq!(
            memory_v2(7_340_032, None, None, MEMORY_STAT_V2).mapped_file_bytes,
            Some(933_888)
        );
        assert_eq!(memory_v2(1, None, None, "anon 1\n").mapped_file_bytes, None);
    }

    #[test]
    fn oom_control_and_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n",
        )
        .expect("write");
        assert_eq!(oom_kill_count(dir.path(), Version::V1).expect("v1"), 3);
        assert_eq!(oom_kill_count(dir.path(), Version::V2).expect("v2"), 2);
        std::fs::write(
            dir.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\n",
        )
        .expect("write");
        let err = oom_kill_count(dir.path(), Version::V1).expect_err("old kernel");
        assert!(err.to_string().contains("4.13"), "{err}");
    }
}
