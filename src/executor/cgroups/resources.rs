//! OCI `LinuxResources` → the control files to write, per controller and per
//! cgroup version. Pure: validation happens here, before any directory is
//! made, and the plan is a list of steps that [`super::Cgroup::apply`]
//! executes in order: control-file writes, and on v2 the device filter
//! program.
//!
//! Conversions follow what kubelet and runc do, so that a pod gets the same
//! numbers under berth as under containerd: cpu shares → `cpu.weight` with
//! kubelet's linear formula, OCI swap (memory+swap) → v2 `memory.swap.max`
//! as runc, blkio weight → `io.weight` as runc.

use std::collections::BTreeMap;
use std::fmt;

use oci_spec::runtime::LinuxResources;

use super::devices::{DeviceRule, Filter};
use super::{CgroupError, CgroupMode};

/// A controller as berth uses it; named after v1 where the names differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Cpu,
    CpuAcct,
    Cpuset,
    Memory,
    Pids,
    Hugetlb,
    /// `blkio` on v1, `io` on v2.
    Io,
    /// v1 only: on v2 device access is an eBPF program.
    Devices,
    /// v1 only: on v2 freezing is `cgroup.freeze`, part of every cgroup.
    Freezer,
}

impl Controller {
    pub const ALL: [Controller; 9] = [
        Controller::Cpu,
        Controller::CpuAcct,
        Controller::Cpuset,
        Controller::Memory,
        Controller::Pids,
        Controller::Hugetlb,
        Controller::Io,
        Controller::Devices,
        Controller::Freezer,
    ];

    /// The name in a v1 mount's options.
    pub fn v1_name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::CpuAcct => "cpuacct",
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Hugetlb => "hugetlb",
            Controller::Io => "blkio",
            Controller::Devices => "devices",
            Controller::Freezer => "freezer",
        }
    }

    /// The name in v2's `cgroup.controllers`, if v2 has such a controller.
    pub fn v2_name(self) -> Option<&'static str> {
        match self {
            Controller::Cpu | Controller::CpuAcct => Some("cpu"),
            Controller::Cpuset => Some("cpuset"),
            Controller::Memory => Some("memory"),
            Controller::Pids => Some("pids"),
            Controller::Hugetlb => Some("hugetlb"),
            Controller::Io => Some("io"),
            Controller::Devices | Controller::Freezer => None,
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.v1_name())
    }
}

/// Which cgroup version a controller is on, on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Where a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Controller(Controller),
    /// The cgroup's directory in the v2 hierarchy, whatever the controller
    /// (`unified` keys).
    V2Dir,
}

/// One control-file write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub target: Target,
    /// `(file, value)` candidates: the first whose file exists is written.
    pub choices: Vec<(String, String)>,
    /// When no candidate exists: `None` fails, `Some(reason)` skips with a
    /// debug log saying why that is fine.
    pub skip_if_missing: Option<&'static str>,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Write(Write),
    /// The device rules as a v2 device filter program, attached to the
    /// cgroup's v2 directory in place of the one there (see
    /// [`super::devices::install`]).
    DeviceFilter(Filter),
}

impl Write {
    fn one(target: Controller, file: impl Into<String>, value: impl ToString) -> Write {
        Write {
            target: Target::Controller(target),
            choices: vec![(file.into(), value.to_string())],
            skip_if_missing: None,
        }
    }

    fn optional(mut self, reason: &'static str) -> Write {
        self.skip_if_missing = Some(reason);
        self
    }
}

/// What the plan needs to know about the host and the cgroup.
pub struct Host {
    /// The version each mounted controller is on.
    pub versions: BTreeMap<Controller, Version>,
    /// Whether the cgroup has a directory on a v2 hierarchy.
    pub has_v2_dir: bool,
    /// The host's cgroup mode, for messages.
    pub mode: CgroupMode,
    /// v1 `memory.limit_in_bytes` now, to order the memory and memsw writes.
    pub current_memory_limit: Option<i64>,
}

impl Host {
    fn version(&self, c: Controller) -> Option<Version> {
        self.versions.get(&c).copied()
    }
}

const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;
const MIN_QUOTA_US: i64 = 1_000;
const PERIOD_US: std::ops::RangeInclusive<u64> = 1_000..=1_000_000;

impl Host {
    /// A host with every controller on `version`, for checks that must not
    /// depend on the real one.
    fn with_every_controller(version: Version) -> Host {
        Host {
            versions: Controller::ALL
                .into_iter()
                .filter(|c| version == Version::V1 || c.v2_name().is_some())
                .map(|c| (c, version))
                .collect(),
            has_v2_dir: version == Version::V2,
            mode: match version {
                Version::V1 => CgroupMode::Legacy,
                Version::V2 => CgroupMode::Unified,
            },
            current_memory_limit: None,
        }
    }
}

/// The checks of [`plan`] that hold on every host: values no kernel takes,
/// whatever its controllers and cgroup version. For a caller that must refuse
/// a request before it makes anything (RunPodSandbox); [`plan`] repeats them
/// and adds the host's own (a missing controller, unified keys without v2).
pub fn validate(r: &LinuxResources) -> Result<(), CgroupError> {
    // Every controller on v1 checks everything but the unified keys, which
    // only a v2 cgroup plans; those are checked on a v2 host of their own.
    // Nothing is missing on either, so only invalid values fail.
    let mut rest = r.clone();
    let unified = rest.unified().clone();
    rest.set_unified(None);
    plan(&rest, &Host::with_every_controller(Version::V1))?;
    let mut only_unified = LinuxResources::default();
    only_unified.set_unified(unified);
    plan(&only_unified, &Host::with_every_controller(Version::V2))?;
    Ok(())
}

/// The steps that make the cgroup match `r`, or the first invalid value.
pub fn plan(r: &LinuxResources, host: &Host) -> Result<Vec<Step>, CgroupError> {
    let mut writes = Vec::new();
    cpu(r, host, &mut writes)?;
    memory(r, host, &mut writes)?;
    pids(r, host, &mut writes)?;
    hugetlb(r, host, &mut writes)?;
    block_io(r, host, &mut writes)?;
    let filter = devices(r, host, &mut writes)?;
    unified(r, host, &mut writes)?;
    let mut steps: Vec<Step> = writes.into_iter().map(Step::Write).collect();
    steps.extend(filter.map(Step::DeviceFilter));
    Ok(steps)
}

fn invalid(what: &str, reason: impl Into<String>) -> CgroupError {
    CgroupError::InvalidResource {
        what: what.to_string(),
        reason: reason.into(),
    }
}

fn need(host: &Host, c: Controller, what: &str) -> Result<Version, CgroupError> {
    host.version(c)
        .ok_or_else(|| CgroupError::MissingController {
            controller: c.v1_name(),
            what: what.to_string(),
        })
}

/// kubelet's `CpuSharesToCpuWeight` (pkg/kubelet/cm): maps [2, 262144] onto
/// [1, 10000] linearly, 1024 → 39.
pub fn shares_to_weight(shares: u64) -> u64 {
    1 + ((shares - MIN_SHARES) * 9999) / (MAX_SHARES - MIN_SHARES)
}

/// runc's `ConvertBlkIOToIOWeightValue`: [10, 1000] onto [1, 10000].
pub fn blkio_to_io_weight(weight: u16) -> u64 {
    1 + (u64::from(weight) - 10) * 9999 / 990
}

fn limit_str(value: i64) -> String {
    if value == -1 {
        "max".to_string()
    } else {
        value.to_string()
    }
}

fn cpu(r: &LinuxResources, host: &Host, out: &mut Vec<Write>) -> Result<(), CgroupError> {
    let Some(cpu) = r.cpu() else { return Ok(()) };
    let shares = cpu.shares().filter(|s| *s != 0);
    let quota = cpu.quota().filter(|q| *q != 0);
    let period = cpu.period().filter(|p| *p != 0);
    if let Some(s) = shares
        && !(MIN_SHARES..=MAX_SHARES).contains(&s)
    {
        return Err(invalid(
            "cpu.shares",
            format!("{s} is outside {MIN_SHARES}..={MAX_SHARES}"),
        ));
    }
    match quota {
        Some(q) if q < -1 => return Err(invalid("cpu.quota", format!("{q} is negative"))),
        Some(q) if q != -1 && q < MIN_QUOTA_US => {
            return Err(invalid(
                "cpu.quota",
                format!("{q}us is below the kernel's minimum of {MIN_QUOTA_US}us"),
            ));
        }
        _ => {}
    }
    if let Some(p) = period
        && !PERIOD_US.contains(&p)
    {
        return Err(invalid(
            "cpu.period",
            format!("{p}us is outside 1000us..=1000000us"),
        ));
    }
    if shares.is_some() || quota.is_some() || period.is_some() {
        match need(host, Controller::Cpu, "cpu shares and quota")? {
            Version::V1 => {
                if let Some(s) = shares {
                    out.push(Write::one(Controller::Cpu, "cpu.shares", s));
                }
                // The period first: the kernel checks the quota against it.
                if let Some(p) = period {
                    out.push(Write::one(Controller::Cpu, "cpu.cfs_period_us", p));
                }
                if let Some(q) = quota {
                    out.push(Write::one(Controller::Cpu, "cpu.cfs_quota_us", q));
                }
            }
            Version::V2 => {
                if let Some(s) = shares {
                    out.push(Write::one(
                        Controller::Cpu,
                        "cpu.weight",
                        shares_to_weight(s),
                    ));
                }
                // As runc: "max" unless a positive quota, the period only
                // when given (the kernel keeps the old one otherwise).
                if quota.is_some() || period.is_some() {
                    let mut max = match quota {
                        Some(q) if q > 0 => q.to_string(),
                        _ => "max".to_string(),
                    };
                    if let Some(p) = period {
                        max = format!("{max} {p}");
                    }
                    out.push(Write::one(Controller::Cpu, "cpu.max", max));
                }
            }
        }
    }
    for (file, value) in [("cpuset.cpus", cpu.cpus()), ("cpuset.mems", cpu.mems())] {
        let Some(value) = value.as_deref().map(str::trim).filter(|v| !v.is_empty()) else {
            continue;
        };
        if !value
            .chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == '-')
        {
            return Err(invalid(file, format!("{value:?} is not a list like 0-3,5")));
        }
        need(host, Controller::Cpuset, file)?;
        out.push(Write::one(Controller::Cpuset, file, value));
    }
    if cpu.realtime_runtime().is_some() || cpu.realtime_period().is_some() {
        tracing::warn!("cpu realtime runtime and period are not supported; ignored");
    }
    Ok(())
}

fn memory(r: &LinuxResources, host: &Host, out: &mut Vec<Write>) -> Result<(), CgroupError> {
    let Some(mem) = r.memory() else { return Ok(()) };
    let check = |what: &str, v: Option<i64>| match v {
        Some(v) if v < -1 => Err(invalid(what, format!("{v} is negative"))),
        Some(0) | None => Ok(None),
        Some(v) => Ok(Some(v)),
    };
    let limit = check("memory.limit", mem.limit())?;
    let swap = check("memory.swap", mem.swap())?;
    let reservation = check("memory.reservation", mem.reservation())?;
    if let (Some(l), Some(s)) = (limit, swap)
        && l > 0
        && s > 0
        && s < l
    {
        return Err(invalid(
            "memory.swap",
            format!("memory+swap limit {s} is below the memory limit {l}"),
        ));
    }
    let swappiness = mem.swappiness();
    if let Some(s) = swappiness
        && s > 100
    {
        return Err(invalid("memory.swappiness", format!("{s} is above 100")));
    }
    if mem.kernel().is_some() || mem.kernel_tcp().is_some() {
        tracing::debug!("kernel memory limits are deprecated by the kernel; ignored");
    }
    if limit.is_none() && swap.is_none() && reservation.is_none() && swappiness.is_none() {
        return Ok(());
    }
    const NO_SWAP_ACCOUNTING: &str = "swap accounting is off in this kernel";
    match need(host, Controller::Memory, "memory limits")? {
        Version::V1 => {
            // Unlimited memory with swap unset means unlimited swap too, or
            // the kernel refuses a limit above memsw (runc does the same).
            let swap = match (limit, swap) {
                (Some(-1), None) => Some(-1),
                (_, s) => s,
            };
            let limit_w = limit.map(|l| Write::one(Controller::Memory, "memory.limit_in_bytes", l));
            let swap_w = swap.map(|s| {
                Write::one(Controller::Memory, "memory.memsw.limit_in_bytes", s)
                    .optional(NO_SWAP_ACCOUNTING)
            });
            // memory.limit <= memsw.limit at every moment: raise memsw first,
            // lower the limit first.
            let current = host.current_memory_limit.unwrap_or(i64::MAX);
            let swap_first = matches!(swap, Some(s) if s == -1 || (current != -1 && current < s));
            if swap_first {
                out.extend(swap_w);
                out.extend(limit_w);
            } else {
                out.extend(limit_w);
                out.extend(swap_w);
            }
            if let Some(r) = reservation {
                out.push(Write::one(
                    Controller::Memory,
                    "memory.soft_limit_in_bytes",
                    r,
                ));
            }
            if let Some(s) = swappiness {
                out.push(Write::one(Controller::Memory, "memory.swappiness", s));
            }
        }
        Version::V2 => {
            // runc's ConvertMemorySwapToCgroupV2Value: v2 swap excludes memory.
            let swap_max = match (limit, swap) {
                (Some(-1), None) | (_, Some(-1)) => Some("max".to_string()),
                (_, None) => None,
                (Some(l), Some(s)) if l > 0 => Some((s - l).to_string()),
                (_, Some(_)) => {
                    return Err(invalid(
                        "memory.swap",
                        "a swap limit needs a memory limit on cgroup v2",
                    ));
                }
            };
            if let Some(s) = swap_max {
                out.push(
                    Write::one(Controller::Memory, "memory.swap.max", s)
                        .optional(NO_SWAP_ACCOUNTING),
                );
            }
            if let Some(l) = limit {
                out.push(Write::one(Controller::Memory, "memory.max", limit_str(l)));
            }
            if let Some(r) = reservation {
                out.push(Write::one(Controller::Memory, "memory.low", limit_str(r)));
            }
            if swappiness.is_some() {
                tracing::debug!("cgroup v2 has no per-cgroup swappiness; ignored");
            }
        }
    }
    Ok(())
}

fn pids(r: &LinuxResources, host: &Host, out: &mut Vec<Write>) -> Result<(), CgroupError> {
    // As runc: 0 leaves the limit alone, negative is unlimited.
    let Some(limit) = r.pids().map(|p| p.limit()).filter(|l| *l != 0) else {
        return Ok(());
    };
    need(host, Controller::Pids, "the pids limit")?;
    let value = if limit > 0 {
        limit.to_string()
    } else {
        "max".to_string()
    };
    out.push(Write::one(Controller::Pids, "pids.max", value));
    Ok(())
}

fn hugetlb(r: &LinuxResources, host: &Host, out: &mut Vec<Write>) -> Result<(), CgroupError> {
    for h in r.hugepage_limits().iter().flatten() {
        let size = h.page_size();
        let well_formed = size
            .strip_suffix('B')
            .and_then(|s| s.strip_suffix(['K', 'M', 'G']))
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if !well_formed {
            return Err(invalid(
                "hugepage size",
                format!("{size:?} is not a size like 2MB or 1GB"),
            ));
        }
        if h.limit() < 0 {
            return Err(invalid(
                &format!("hugetlb.{size}"),
                format!("{} is negative", h.limit()),
            ));
        }
        let file = match need(host, Controller::Hugetlb, "hugepage limits")? {
            Version::V1 => format!("hugetlb.{size}.limit_in_bytes"),
            Version::V2 => format!("hugetlb.{size}.max"),
        };
        out.push(Write::one(Controller::Hugetlb, file, h.limit()));
    }
    Ok(())
}

fn block_io(r: &LinuxResources, host: &Host, out: &mut Vec<Write>) -> Result<(), CgroupError> {
    let Some(bio) = r.block_io() else {
        return Ok(());
    };
    if bio.leaf_weight().is_some()
        || bio.weight_device().is_some()
        || bio.throttle_read_bps_device().is_some()
        || bio.throttle_write_bps_device().is_some()
        || bio.throttle_read_iops_device().is_some()
        || bio.throttle_write_iops_device().is_some()
    {
        return Err(invalid(
            "blockIO",
            "only the weight is supported, not leaf weights, per-device weights or throttles",
        ));
    }
    let Some(weight) = bio.weight().filter(|w| *w != 0) else {
        return Ok(());
    };
    if !(10..=1000).contains(&weight) {
        return Err(invalid(
            "blockIO.weight",
            format!("{weight} is outside 10..=1000"),
        ));
    }
    const NO_WEIGHT: &str = "the kernel has no proportional block I/O weight (no BFQ)";
    let Some(version) = host.version(Controller::Io) else {
        tracing::debug!("block I/O controller not mounted; blockIO.weight ignored");
        return Ok(());
    };
    let choices = match version {
        Version::V1 => vec![
            ("blkio.weight".to_string(), weight.to_string()),
            ("blkio.bfq.weight".to_string(), weight.to_string()),
        ],
        Version::V2 => vec![
            (
                "io.weight".to_string(),
                blkio_to_io_weight(weight).to_string(),
            ),
            ("io.bfq.weight".to_string(), weight.to_string()),
        ],
    };
    out.push(Write {
        target: Target::Controller(Controller::Io),
        choices,
        skip_if_missing: Some(NO_WEIGHT),
    });
    Ok(())
}

/// v1: each rule is a line written to `devices.allow` or `devices.deny`, in
/// order, the kernel keeping the list. v2 has no devices controller: the
/// rules are emulated into a [`Filter`] and enforced by an eBPF program on
/// the cgroup's v2 directory, which any v2 hierarchy offers (also the empty
/// one of a hybrid host, where processes are tracked too). The step is
/// there for allow-all as well: on an update it removes the program an
/// earlier, stricter set of rules attached.
fn devices(
    r: &LinuxResources,
    host: &Host,
    out: &mut Vec<Write>,
) -> Result<Option<Filter>, CgroupError> {
    let Some(rules) = r.devices().as_ref().filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    let rules = rules
        .iter()
        .map(DeviceRule::parse)
        .collect::<Result<Vec<_>, _>>()?;
    if host.version(Controller::Devices) == Some(Version::V1) {
        for rule in rules {
            let file = if rule.allow {
                "devices.allow"
            } else {
                "devices.deny"
            };
            out.push(Write::one(Controller::Devices, file, rule));
        }
        return Ok(None);
    }
    let filter = Filter::from_rules(&rules)?;
    if host.has_v2_dir {
        return Ok(Some(filter));
    }
    if filter.is_allow_all() {
        tracing::debug!("no devices controller and no v2 hierarchy: allow-all needs neither");
        return Ok(None);
    }
    Err(CgroupError::MissingController {
        controller: "devices",
        what: "device rules".to_string(),
    })
}

/// Files that are not resources: writing them moves or kills processes or
/// changes the tree's shape.
const UNIFIED_REFUSED: &[&str] = &[
    "cgroup.procs",
    "cgroup.threads",
    "cgroup.kill",
    "cgroup.freeze",
    "cgroup.subtree_control",
    "cgroup.type",
];

fn unified(r: &LinuxResources, host: &Host, out: &mut Vec<Write>) -> Result<(), CgroupError> {
    let Some(map) = r.unified().as_ref().filter(|m| !m.is_empty()) else {
        return Ok(());
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for key in keys {
        let bad = key.is_empty()
            || key.contains('/')
            || key.contains("..")
            || key.contains('\0')
            || key.starts_with('.')
            || !key.contains('.')
            || UNIFIED_REFUSED.contains(&key.as_str());
        if bad {
            return Err(invalid(
                &format!("unified key {key:?}"),
                "not a cgroup v2 control file name",
            ));
        }
        if !host.has_v2_dir {
            return Err(CgroupError::UnifiedNeedsV2 { mode: host.mode });
        }
        out.push(Write {
            target: Target::V2Dir,
            choices: vec![(key.clone(), map[key].clone())],
            skip_if_missing: None,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use oci_spec::runtime::{
        LinuxBlockIoBuilder, LinuxCpuBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder,
        LinuxDeviceType, LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxPidsBuilder,
        LinuxResourcesBuilder,
    };

    use super::*;

    fn host(version: Version) -> BTreeMap<Controller, Version> {
        Controller::ALL
            .into_iter()
            .filter(|c| version == Version::V1 || c.v2_name().is_some())
            .map(|c| (c, version))
            .collect()
    }

    fn run(r: &LinuxResources, version: Version) -> Result<Vec<(String, String)>, CgroupError> {
        let v = host(version);
        let h = Host {
            versions: v,
            has_v2_dir: version == Version::V2,
            mode: if version == Version::V2 {
                CgroupMode::Unified
            } else {
                CgroupMode::Legacy
            },
            current_memory_limit: None,
        };
        Ok(plan(r, &h)?
            .into_iter()
            .map(|step| match step {
                Step::Write(w) => w.choices[0].clone(),
                Step::DeviceFilter(f) => ("device filter".to_string(), f.to_string()),
            })
            .collect())
    }

    /// The plan's writes; a test that calls it expects nothing else.
    fn writes(r: &LinuxResources, h: &Host) -> Vec<Write> {
        plan(r, h)
            .expect("plan")
            .into_iter()
            .map(|step| match step {
                Step::Write(w) => w,
                other => panic!("not a write: {other:?}"),
            })
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn kubelet_shares_to_weight() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(blkio_to_io_weight(10), 1);
        assert_eq!(blkio_to_io_weight(1000), 10_000);
        assert_eq!(blkio_to_io_weight(500), 4950);
    }

    #[test]
    fn cpu_on_both_versions() {
        let r = LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .shares(512u64)
                    .quota(50_000i64)
                    .period(100_000u64)
                    .cpus("0-1")
                    .mems("0")
                    .build()
                    .expect("cpu"),
            )
            .build()
            .expect("resources");
        assert_eq!(
            run(&r, Version::V1).expect("v1"),
            pairs(&[
                ("cpu.shares", "512"),
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "50000"),
                ("cpuset.cpus", "0-1"),
                ("cpuset.mems", "0"),
            ])
        );
        assert_eq!(
            run(&r, Version::V2).expect("v2"),
            pairs(&[
                ("cpu.weight", "20"),
                ("cpu.max", "50000 100000"),
                ("cpuset.cpus", "0-1"),
                ("cpuset.mems", "0"),
            ])
        );
    }

    #[test]
    fn unlimited_quota_is_max_on_v2() {
        let r = LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .quota(-1i64)
                    .build()
                    .expect("cpu"),
            )
            .build()
            .expect("resources");
        assert_eq!(
            run(&r, Version::V2).expect("v2"),
            pairs(&[("cpu.max", "max")])
        );
        assert_eq!(
            run(&r, Version::V1).expect("v1"),
            pairs(&[("cpu.cfs_quota_us", "-1")])
        );
    }

    #[test]
    fn invalid_cpu_values_are_refused() {
        let cases = [
            (
                LinuxCpuBuilder::default().shares(1u64),
                "outside 2..=262144",
            ),
            (LinuxCpuBuilder::default().shares(300_000u64), "outside"),
            (
                LinuxCpuBuilder::default().quota(500i64),
                "below the kernel's minimum",
            ),
            (LinuxCpuBuilder::default().quota(-5i64), "negative"),
            (LinuxCpuBuilder::default().period(100u64), "outside 1000us"),
            (
                LinuxCpuBuilder::default().period(2_000_000u64),
                "outside 1000us",
            ),
            (LinuxCpuBuilder::default().cpus("0-1\n"), "ok"),
            (LinuxCpuBuilder::default().cpus("0;1"), "not a list"),
        ];
        for (cpu, want) in cases {
            let r = LinuxResourcesBuilder::default()
                .cpu(cpu.build().expect("cpu"))
                .build()
                .expect("resources");
            match run(&r, Version::V1) {
                Ok(_) => assert_eq!(want, "ok"),
                Err(e) => assert!(e.to_string().contains(want), "{e} lacks {want}"),
            }
        }
    }

    fn memory(limit: Option<i64>, swap: Option<i64>, reservation: Option<i64>) -> LinuxResources {
        let mut m = LinuxMemoryBuilder::default();
        if let Some(l) = limit {
            m = m.limit(l);
        }
        if let Some(s) = swap {
            m = m.swap(s);
        }
        if let Some(r) = reservation {
            m = m.reservation(r);
        }
        LinuxResourcesBuilder::default()
            .memory(m.build().expect("memory"))
            .build()
            .expect("resources")
    }

    #[test]
    fn memory_v1_orders_limit_and_memsw() {
        let r = memory(Some(1 << 26), Some(1 << 27), Some(1 << 25));
        // A new cgroup is unlimited: lowering, so the limit goes first.
        assert_eq!(
            run(&r, Version::V1).expect("v1"),
            pairs(&[
                ("memory.limit_in_bytes", "67108864"),
                ("memory.memsw.limit_in_bytes", "134217728"),
                ("memory.soft_limit_in_bytes", "33554432"),
            ])
        );
        // Raising from 32 MiB: memsw first.
        let v = host(Version::V1);
        let h = Host {
            versions: v,
            has_v2_dir: false,
            mode: CgroupMode::Legacy,
            current_memory_limit: Some(1 << 25),
        };
        let files: Vec<String> = writes(&r, &h)
            .into_iter()
            .map(|w| w.choices[0].0.clone())
            .collect();
        assert_eq!(files[0], "memory.memsw.limit_in_bytes");
        // Unlimited memory takes unlimited swap along.
        assert_eq!(
            run(&memory(Some(-1), None, None), Version::V1).expect("v1"),
            pairs(&[
                ("memory.memsw.limit_in_bytes", "-1"),
                ("memory.limit_in_bytes", "-1"),
            ])
        );
    }

    #[test]
    fn memsw_is_optional() {
        let r = memory(Some(1 << 26), Some(1 << 27), None);
        let v = host(Version::V1);
        let h = Host {
            versions: v,
            has_v2_dir: false,
            mode: CgroupMode::Legacy,
            current_memory_limit: None,
        };
        let writes = writes(&r, &h);
        assert!(writes[0].skip_if_missing.is_none());
        assert!(writes[1].skip_if_missing.is_some());
    }

    #[test]
    fn memory_v2_converts_swap_as_runc() {
        assert_eq!(
            run(
                &memory(Some(1 << 26), Some(1 << 27), Some(1 << 25)),
                Version::V2
            )
            .expect("v2"),
            pairs(&[
                ("memory.swap.max", "67108864"),
                ("memory.max", "67108864"),
                ("memory.low", "33554432"),
            ])
        );
        // kubelet's "no swap": memory+swap equal to memory.
        assert_eq!(
            run(&memory(Some(1 << 26), Some(1 << 26), None), Version::V2).expect("v2"),
            pairs(&[("memory.swap.max", "0"), ("memory.max", "67108864")])
        );
        assert_eq!(
            run(&memory(Some(-1), None, None), Version::V2).expect("v2"),
            pairs(&[("memory.swap.max", "max"), ("memory.max", "max")])
        );
        let err = run(&memory(None, Some(1 << 26), None), Version::V2).expect_err("no limit");
        assert!(err.to_string().contains("needs a memory limit"), "{err}");
        let err = run(&memory(Some(1 << 27), Some(1 << 26), None), Version::V2).expect_err("small");
        assert!(err.to_string().contains("below the memory limit"), "{err}");
        let err = run(&memory(Some(-7), None, None), Version::V1).expect_err("negative");
        assert!(err.to_string().contains("memory.limit"), "{err}");
    }

    #[test]
    fn pids_and_hugetlb() {
        let r = LinuxResourcesBuilder::default()
            .pids(
                LinuxPidsBuilder::default()
                    .limit(64i64)
                    .build()
                    .expect("pids"),
            )
            .hugepage_limits(vec![
                LinuxHugepageLimitBuilder::default()
                    .page_size("2MB")
                    .limit(4_194_304i64)
                    .build()
                    .expect("huge"),
            ])
            .build()
            .expect("resources");
        assert_eq!(
            run(&r, Version::V1).expect("v1"),
            pairs(&[
                ("pids.max", "64"),
                ("hugetlb.2MB.limit_in_bytes", "4194304")
            ])
        );
        assert_eq!(
            run(&r, Version::V2).expect("v2"),
            pairs(&[("pids.max", "64"), ("hugetlb.2MB.max", "4194304")])
        );
        let unlimited = LinuxResourcesBuilder::default()
            .pids(
                LinuxPidsBuilder::default()
                    .limit(-1i64)
                    .build()
                    .expect("pids"),
            )
            .build()
            .expect("resources");
        assert_eq!(
            run(&unlimited, Version::V2).expect("v2"),
            pairs(&[("pids.max", "max")])
        );
        for size in ["../2MB", "2XB", "MB", "2MB/x", "1G"] {
            let r = LinuxResourcesBuilder::default()
                .hugepage_limits(vec![
                    LinuxHugepageLimitBuilder::default()
                        .page_size(size)
                        .limit(1i64)
                        .build()
                        .expect("huge"),
                ])
                .build()
                .expect("resources");
            let err = run(&r, Version::V1).expect_err(size);
            assert!(err.to_string().contains("hugepage size"), "{err}");
        }
    }

    #[test]
    fn block_io_weight_falls_back() {
        let r = LinuxResourcesBuilder::default()
            .block_io(
                LinuxBlockIoBuilder::default()
                    .weight(500u16)
                    .build()
                    .expect("bio"),
            )
            .build()
            .expect("resources");
        let v = host(Version::V2);
        let h = Host {
            versions: v,
            has_v2_dir: true,
            mode: CgroupMode::Unified,
            current_memory_limit: None,
        };
        let writes = writes(&r, &h);
        assert_eq!(
            writes[0].choices,
            pairs(&[("io.weight", "4950"), ("io.bfq.weight", "500")])
        );
        assert!(writes[0].skip_if_missing.is_some());
        let bad = LinuxResourcesBuilder::default()
            .block_io(
                LinuxBlockIoBuilder::default()
                    .weight(5u16)
                    .build()
                    .expect("bio"),
            )
            .build()
            .expect("resources");
        assert!(run(&bad, Version::V1).is_err());
    }

    fn rule(
        allow: bool,
        typ: LinuxDeviceType,
        major: Option<i64>,
        minor: Option<i64>,
    ) -> LinuxDeviceCgroup {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(allow)
            .typ(typ)
            .access("rwm");
        if let Some(m) = major {
            b = b.major(m);
        }
        if let Some(m) = minor {
            b = b.minor(m);
        }
        b.build().expect("rule")
    }

    #[test]
    fn device_rules_on_v1_and_v2() {
        let r = LinuxResourcesBuilder::default()
            .devices(vec![
                rule(false, LinuxDeviceType::A, None, None),
                rule(true, LinuxDeviceType::C, Some(1), Some(3)),
                rule(true, LinuxDeviceType::C, Some(136), None),
            ])
            .build()
            .expect("resources");
        assert_eq!(
            run(&r, Version::V1).expect("v1"),
            pairs(&[
                ("devices.deny", "a *:* rwm"),
                ("devices.allow", "c 1:3 rwm"),
                ("devices.allow", "c 136:* rwm"),
            ])
        );
        assert_eq!(
            run(&r, Version::V2).expect("v2"),
            pairs(&[("device filter", "deny all but c 1:3 rwm, c 136:* rwm")])
        );
        // Allow-all is a step too: on an update it takes a stricter program away.
        let privileged = LinuxResourcesBuilder::default()
            .devices(vec![rule(true, LinuxDeviceType::A, None, None)])
            .build()
            .expect("resources");
        assert_eq!(
            run(&privileged, Version::V2).expect("allow-all"),
            pairs(&[("device filter", "allow all")])
        );
    }

    #[test]
    fn device_filter_comes_after_the_writes() {
        let mut map = HashMap::new();
        map.insert("memory.high".to_string(), "1048576".to_string());
        let r = LinuxResourcesBuilder::default()
            .devices(vec![
                rule(false, LinuxDeviceType::A, None, None),
                rule(true, LinuxDeviceType::B, Some(8), Some(0)),
            ])
            .pids(
                LinuxPidsBuilder::default()
                    .limit(8i64)
                    .build()
                    .expect("pids"),
            )
            .unified(map)
            .build()
            .expect("resources");
        assert_eq!(
            run(&r, Version::V2).expect("v2"),
            pairs(&[
                ("pids.max", "8"),
                ("memory.high", "1048576"),
                ("device filter", "deny all but b 8:0 rwm"),
            ])
        );
    }

    #[test]
    fn device_rules_without_devices_controller_or_v2() {
        let r = LinuxResourcesBuilder::default()
            .devices(vec![
                rule(false, LinuxDeviceType::A, None, None),
                rule(true, LinuxDeviceType::C, Some(1), Some(3)),
            ])
            .build()
            .expect("resources");
        let h = Host {
            versions: BTreeMap::new(),
            has_v2_dir: false,
            mode: CgroupMode::Legacy,
            current_memory_limit: None,
        };
        let err = plan(&r, &h).expect_err("nothing to enforce with");
        assert!(err.to_string().contains("controller devices"), "{err}");
        let privileged = LinuxResourcesBuilder::default()
            .devices(vec![rule(true, LinuxDeviceType::A, None, None)])
            .build()
            .expect("resources");
        assert_eq!(plan(&privileged, &h).expect("allow-all"), vec![]);
    }

    #[test]
    fn invalid_device_rules_are_refused_on_both_versions() {
        let hole = LinuxResourcesBuilder::default()
            .devices(vec![
                rule(false, LinuxDeviceType::A, None, None),
                rule(true, LinuxDeviceType::C, None, None),
                rule(false, LinuxDeviceType::C, Some(1), Some(3)),
            ])
            .build()
            .expect("resources");
        let err = run(&hole, Version::V2).expect_err("hole");
        assert!(err.to_string().contains("cut a hole"), "{err}");
        // v1 keeps writing what it is given: the kernel ignores the hole.
        assert_eq!(run(&hole, Version::V1).expect("v1").len(), 3);
        let fifo = LinuxResourcesBuilder::default()
            .devices(vec![rule(true, LinuxDeviceType::P, None, None)])
            .build()
            .expect("resources");
        for version in [Version::V1, Version::V2] {
            let err = run(&fifo, version).expect_err("fifo");
            assert!(err.to_string().contains("fifo"), "{err}");
        }
    }

    #[test]
    fn unified_keys_are_checked_and_written_verbatim() {
        let mut map = HashMap::new();
        map.insert("memory.high".to_string(), "1048576".to_string());
        map.insert("cpu.idle".to_string(), "1".to_string());
        let r = LinuxResourcesBuilder::default()
            .unified(map)
            .build()
            .expect("resources");
        assert_eq!(
            run(&r, Version::V2).expect("v2"),
            pairs(&[("cpu.idle", "1"), ("memory.high", "1048576")])
        );
        assert!(matches!(
            run(&r, Version::V1),
            Err(CgroupError::UnifiedNeedsV2 { .. })
        ));
        for key in [
            "../memory.max",
            "a/b.c",
            "memory..max",
            "cgroup.procs",
            "nodot",
            ".hidden",
        ] {
            let mut map = HashMap::new();
            map.insert(key.to_string(), "1".to_string());
            let r = LinuxResourcesBuilder::default()
                .unified(map)
                .build()
                .expect("resources");
            let err = run(&r, Version::V2).expect_err(key);
            assert!(err.to_string().contains("unified key"), "{err}");
        }
    }

    #[test]
    fn validate_refuses_bad_values_whatever_the_host() {
        let fine = LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .shares(1024u64)
                    .quota(50_000i64)
                    .period(100_000u64)
                    .cpus("0-1")
                    .build()
                    .expect("cpu"),
            )
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(1i64 << 26)
                    .build()
                    .expect("memory"),
            )
            .unified(HashMap::from([(
                "memory.high".to_string(),
                "1048576".to_string(),
            )]))
            .build()
            .expect("resources");
        validate(&fine).expect("valid on any host");
        let shares = LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .shares(1u64)
                    .build()
                    .expect("cpu"),
            )
            .build()
            .expect("resources");
        let err = validate(&shares).expect_err("shares");
        assert!(err.to_string().contains("cpu.shares"), "{err}");
        let key = LinuxResourcesBuilder::default()
            .unified(HashMap::from([(
                "cgroup.procs".to_string(),
                "1".to_string(),
            )]))
            .build()
            .expect("resources");
        let err = validate(&key).expect_err("unified key");
        assert!(err.to_string().contains("unified key"), "{err}");
        let swap = memory(Some(1 << 27), Some(1 << 26), None);
        let err = validate(&swap).expect_err("swap below limit");
        assert!(err.to_string().contains("memory.swap"), "{err}");
        // Valid, though v2 refuses it (no limit to subtract from): that is
        // the host's concern, for plan.
        validate(&memory(None, Some(1 << 26), None)).expect("swap without limit");
    }

    #[test]
    fn missing_controller_is_named() {
        let r = LinuxResourcesBuilder::default()
            .pids(
                LinuxPidsBuilder::default()
                    .limit(5i64)
                    .build()
                    .expect("pids"),
            )
            .build()
            .expect("resources");
        let h = Host {
            versions: BTreeMap::new(),
            has_v2_dir: false,
            mode: CgroupMode::Legacy,
            current_memory_limit: None,
        };
        let err = plan(&r, &h).expect_err("no pids");
        assert_eq!(
            err.to_string(),
            "cgroup controller pids is not available on this host (needed for the pids limit)"
        );
    }
}
