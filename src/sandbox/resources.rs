//! The pod cgroup's limits: kubelet's `LinuxPodSandboxConfig.resources` (the
//! sum of the pod's container resources, without overhead) plus `overhead`
//! (the RuntimeClass's pod overhead), applied to the pod cgroup when berth
//! is the one that makes it.
//!
//! What the reference runtimes do, and why berth does this much and no
//! more:
//!
//! - Neither containerd nor CRI-O writes `resources` or `overhead` to any
//!   cgroup. containerd (`internal/cri/server/podsandbox/sandbox_run_linux.go`)
//!   copies `resources` into the pause container's OCI annotations
//!   (`io.kubernetes.cri.sandbox-cpu-{period,quota,shares}`,
//!   `io.kubernetes.cri.sandbox-memory`), which VM runtimes such as Kata
//!   read to size the VM; CRI-O (`setupSandboxResources` in
//!   `server/sandbox_run_linux.go`) keeps both on the sandbox and in
//!   annotations for the same runtimes and for NRI. The pause/infra
//!   container itself gets only `cpu.shares = 2` (containerd's
//!   `WithDefaultSandboxShares`, CRI-O's `PodInfraCPUshares`) in a cgroup
//!   of its own below the pod's.
//! - kubelet writes the pod cgroup's limits itself (`ResourceConfigForPod`,
//!   overhead included) when it manages pod cgroups (`cgroupsPerQOS`, the
//!   default), and makes that cgroup before RunPodSandbox. berth leaves
//!   such a cgroup alone, as the other runtimes do: kubelet's numbers follow
//!   rules the CRI fields do not carry (a CPU or memory limit only when
//!   every container declares one, QoS classes, resizes), so writing the
//!   CRI sum there would throttle pods kubelet means to leave unlimited.
//! - When the pod cgroup does not exist (crictl, critest, another
//!   orchestrator), berth makes it and nobody else will limit it. There the
//!   request's own numbers are the only limits the pod can get, so berth
//!   applies them: this is berth's counterpart of a VM runtime sizing its
//!   VM from the annotations. The pod cgroup and not the infra process's:
//!   berth has no pause container, its infra process (only for a shared PID
//!   namespace) lives in the pod cgroup, and the limits are the whole pod's.
//!
//! How the two add up, as kubelet's pod cgroup would have them: CPU shares
//! add (requests plus overhead); a CFS quota and a memory limit exist only
//! when `resources` has one (a pod whose containers are unlimited stays
//! unlimited; overhead alone never caps it) and then grow by the overhead's;
//! hugepage limits add per page size; cpusets and unified keys are taken
//! from `resources`, else from `overhead`.

use std::collections::{BTreeMap, HashMap};

use k8s_cri::v1::{LinuxContainerResources, LinuxPodSandboxConfig};
use oci_spec::runtime::{LinuxCpu, LinuxHugepageLimit, LinuxMemory, LinuxResources};

use super::SandboxError;
use crate::executor::cgroups::{CgroupError, resources as cgroup_resources};

/// The kernel's CFS period when none is set (100 ms).
const DEFAULT_PERIOD_US: i64 = 100_000;
const MAX_SHARES: i64 = 262_144;

/// Which of the two fields a value came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Resources,
    Overhead,
}

/// `config.linux.<part>.<name>` as a `&'static str`, which
/// [`SandboxError::Invalid`] takes.
macro_rules! field {
    ($part:expr, $name:literal) => {
        match $part {
            Part::Resources => concat!("config.linux.resources.", $name),
            Part::Overhead => concat!("config.linux.overhead.", $name),
        }
    };
}

/// The pod cgroup's limits from the request, or `None` when it asks for
/// none. Each field is checked on its own first, so that an error names the
/// one that is wrong; nothing here depends on the host.
pub fn pod_limits(
    linux: Option<&LinuxPodSandboxConfig>,
) -> Result<Option<LinuxResources>, SandboxError> {
    let resources = linux.and_then(|l| l.resources.as_ref());
    let overhead = linux.and_then(|l| l.overhead.as_ref());
    for (part, r) in [(Part::Resources, resources), (Part::Overhead, overhead)] {
        if let Some(r) = r {
            check(part, r)?;
        }
    }
    let default = LinuxContainerResources::default();
    let sum = combine(resources.unwrap_or(&default), overhead.unwrap_or(&default));
    let limits = to_oci(Part::Resources, &sum)?;
    // The parts were valid; a sum that is not would be berth's own bug, but
    // it is refused all the same rather than half written.
    cgroup_resources::validate(&limits).map_err(|e| SandboxError::Invalid {
        field: "config.linux.resources",
        message: format!("with the overhead added: {e}"),
    })?;
    Ok((limits != LinuxResources::default()).then_some(limits))
}

/// `resources` plus `overhead`, as the module doc says.
fn combine(r: &LinuxContainerResources, o: &LinuxContainerResources) -> LinuxContainerResources {
    let period = if r.cpu_period > 0 {
        r.cpu_period
    } else {
        o.cpu_period
    };
    let cpu_quota = if r.cpu_quota > 0 && o.cpu_quota > 0 {
        // The overhead's quota is per its own period; the pod has one.
        let own = |p: i64| if p > 0 { p } else { DEFAULT_PERIOD_US };
        let scaled =
            i128::from(o.cpu_quota) * i128::from(own(period)) / i128::from(own(o.cpu_period));
        r.cpu_quota
            .saturating_add(i64::try_from(scaled).unwrap_or(i64::MAX))
    } else {
        r.cpu_quota
    };
    let cpu_shares = match (r.cpu_shares, o.cpu_shares) {
        (0, s) | (s, 0) => s,
        (a, b) => a.saturating_add(b).min(MAX_SHARES),
    };
    let memory_limit_in_bytes = if r.memory_limit_in_bytes > 0 && o.memory_limit_in_bytes > 0 {
        r.memory_limit_in_bytes
            .saturating_add(o.memory_limit_in_bytes)
    } else {
        r.memory_limit_in_bytes
    };
    // CRI swap is memory+swap: the overhead adds its own memory+swap, which
    // is its memory limit when it names no swap.
    let memory_swap_limit_in_bytes = if r.memory_swap_limit_in_bytes > 0 {
        let extra = if o.memory_swap_limit_in_bytes > 0 {
            o.memory_swap_limit_in_bytes
        } else {
            o.memory_limit_in_bytes.max(0)
        };
        r.memory_swap_limit_in_bytes.saturating_add(extra)
    } else {
        r.memory_swap_limit_in_bytes
    };
    let or = |a: &String, b: &String| if a.is_empty() { b.clone() } else { a.clone() };
    let mut hugepages: BTreeMap<String, u64> = BTreeMap::new();
    for h in r.hugepage_limits.iter().chain(&o.hugepage_limits) {
        let total = hugepages.entry(h.page_size.clone()).or_default();
        *total = total.saturating_add(h.limit);
    }
    let mut unified: HashMap<String, String> = o.unified.clone();
    unified.extend(r.unified.clone());
    LinuxContainerResources {
        cpu_period: period,
        cpu_quota,
        cpu_shares,
        memory_limit_in_bytes,
        memory_swap_limit_in_bytes,
        // Not a cgroup setting: the pod's processes have their own.
        oom_score_adj: 0,
        cpuset_cpus: or(&r.cpuset_cpus, &o.cpuset_cpus),
        cpuset_mems: or(&r.cpuset_mems, &o.cpuset_mems),
        hugepage_limits: hugepages
            .into_iter()
            .map(|(page_size, limit)| k8s_cri::v1::HugepageLimit { page_size, limit })
            .collect(),
        unified,
    }
}

/// One part checked alone: the CRI's own types first, then what no kernel
/// takes (the cgroup table's host-independent checks).
fn check(part: Part, r: &LinuxContainerResources) -> Result<(), SandboxError> {
    let oci = to_oci(part, r)?;
    cgroup_resources::validate(&oci).map_err(|e| match e {
        CgroupError::InvalidResource { what, reason } => SandboxError::Invalid {
            field: field_of(part, &what),
            message: format!("{what}: {reason}"),
        },
        other => SandboxError::Invalid {
            field: match part {
                Part::Resources => "config.linux.resources",
                Part::Overhead => "config.linux.overhead",
            },
            message: other.to_string(),
        },
    })
}

/// The CRI field behind a name of the cgroup table's messages.
fn field_of(part: Part, what: &str) -> &'static str {
    match what {
        "cpu.shares" => field!(part, "cpu_shares"),
        "cpu.quota" => field!(part, "cpu_quota"),
        "cpu.period" => field!(part, "cpu_period"),
        "cpuset.cpus" => field!(part, "cpuset_cpus"),
        "cpuset.mems" => field!(part, "cpuset_mems"),
        "memory.limit" => field!(part, "memory_limit_in_bytes"),
        "memory.swap" => field!(part, "memory_swap_limit_in_bytes"),
        w if w.starts_with("huge") => field!(part, "hugepage_limits"),
        w if w.starts_with("unified") => field!(part, "unified"),
        _ => match part {
            Part::Resources => "config.linux.resources",
            Part::Overhead => "config.linux.overhead",
        },
    }
}

/// CRI resources as the cgroup table takes them; zero means unset, as in
/// the CRI. No swap is added when none is asked for: kubelet's own pod
/// cgroups have no memory+swap limit either.
fn to_oci(part: Part, r: &LinuxContainerResources) -> Result<LinuxResources, SandboxError> {
    let negative = |field: &'static str, value: i64| SandboxError::Invalid {
        field,
        message: format!("{value} is negative"),
    };
    let mut out = LinuxResources::default();
    let mut cpu = LinuxCpu::default();
    if r.cpu_period != 0 {
        let period = u64::try_from(r.cpu_period)
            .map_err(|_| negative(field!(part, "cpu_period"), r.cpu_period))?;
        cpu.set_period(Some(period));
    }
    if r.cpu_quota != 0 {
        cpu.set_quota(Some(r.cpu_quota));
    }
    if r.cpu_shares != 0 {
        let shares = u64::try_from(r.cpu_shares)
            .map_err(|_| negative(field!(part, "cpu_shares"), r.cpu_shares))?;
        cpu.set_shares(Some(shares));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.set_cpus(Some(r.cpuset_cpus.clone()));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.set_mems(Some(r.cpuset_mems.clone()));
    }
    if cpu != LinuxCpu::default() {
        out.set_cpu(Some(cpu));
    }
    let mut memory = LinuxMemory::default();
    if r.memory_limit_in_bytes != 0 {
        memory.set_limit(Some(r.memory_limit_in_bytes));
    }
    if r.memory_swap_limit_in_bytes != 0 {
        memory.set_swap(Some(r.memory_swap_limit_in_bytes));
    }
    if memory != LinuxMemory::default() {
        out.set_memory(Some(memory));
    }
    if !r.hugepage_limits.is_empty() {
        let mut limits = Vec::new();
        for h in &r.hugepage_limits {
            let limit = i64::try_from(h.limit).map_err(|_| SandboxError::Invalid {
                field: field!(part, "hugepage_limits"),
                message: format!("{} bytes of {} pages is too large", h.limit, h.page_size),
            })?;
            let mut l = LinuxHugepageLimit::default();
            l.set_page_size(h.page_size.clone());
            l.set_limit(limit);
            limits.push(l);
        }
        out.set_hugepage_limits(Some(limits));
    }
    if !r.unified.is_empty() {
        out.set_unified(Some(r.unified.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::HugepageLimit;

    fn linux(
        resources: Option<LinuxContainerResources>,
        overhead: Option<LinuxContainerResources>,
    ) -> LinuxPodSandboxConfig {
        LinuxPodSandboxConfig {
            resources,
            overhead,
            ..LinuxPodSandboxConfig::default()
        }
    }

    /// What kubelet sends for a pod with 500m/1 CPU and 128 MiB (requests
    /// and limits), and for 250m/64 MiB of overhead.
    fn kubelet_pod() -> (LinuxContainerResources, LinuxContainerResources) {
        (
            LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 100_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 128 << 20,
                ..LinuxContainerResources::default()
            },
            LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 25_000,
                cpu_shares: 256,
                memory_limit_in_bytes: 64 << 20,
                ..LinuxContainerResources::default()
            },
        )
    }

    #[test]
    fn overhead_adds_to_the_pods_resources() {
        let (r, o) = kubelet_pod();
        let limits = pod_limits(Some(&linux(Some(r), Some(o))))
            .expect("valid")
            .expect("limits");
        let cpu = limits.cpu().clone().expect("cpu");
        assert_eq!(cpu.shares(), Some(768));
        assert_eq!(cpu.quota(), Some(125_000));
        assert_eq!(cpu.period(), Some(100_000));
        let memory = limits.memory().as_ref().expect("memory");
        assert_eq!(memory.limit(), Some(192 << 20));
        assert_eq!(memory.swap(), None, "kubelet's pod cgroups have no memsw");
    }

    #[test]
    fn overhead_alone_never_caps_an_unlimited_pod() {
        let (_, o) = kubelet_pod();
        // A best-effort pod: kubelet's minimum shares, no quota, no memory.
        let best_effort = LinuxContainerResources {
            cpu_period: 100_000,
            cpu_shares: 2,
            ..LinuxContainerResources::default()
        };
        let limits = pod_limits(Some(&linux(Some(best_effort), Some(o.clone()))))
            .expect("valid")
            .expect("limits");
        let cpu = limits.cpu().clone().expect("cpu");
        assert_eq!(cpu.shares(), Some(258));
        assert_eq!(cpu.quota(), None);
        assert!(limits.memory().is_none());
        // No resources at all: the overhead's shares only.
        let limits = pod_limits(Some(&linux(None, Some(o))))
            .expect("valid")
            .expect("limits");
        assert_eq!(limits.cpu().clone().expect("cpu").shares(), Some(256));
        assert_eq!(limits.cpu().clone().expect("cpu").quota(), None);
        assert!(limits.memory().is_none());
    }

    #[test]
    fn overhead_quota_is_scaled_to_the_pods_period() {
        let r = LinuxContainerResources {
            cpu_period: 50_000,
            cpu_quota: 50_000,
            ..LinuxContainerResources::default()
        };
        // 0.5 CPU of overhead per the default 100 ms period is 25 ms per 50 ms.
        let o = LinuxContainerResources {
            cpu_quota: 50_000,
            ..LinuxContainerResources::default()
        };
        let limits = pod_limits(Some(&linux(Some(r), Some(o))))
            .expect("valid")
            .expect("limits");
        let cpu = limits.cpu().clone().expect("cpu");
        assert_eq!((cpu.quota(), cpu.period()), (Some(75_000), Some(50_000)));
    }

    #[test]
    fn swap_hugepages_cpusets_and_unified_combine() {
        let r = LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            memory_swap_limit_in_bytes: 96 << 20,
            cpuset_cpus: "0-1".into(),
            hugepage_limits: vec![HugepageLimit {
                page_size: "2MB".into(),
                limit: 4 << 20,
            }],
            unified: [("memory.high".to_string(), "50331648".to_string())].into(),
            ..LinuxContainerResources::default()
        };
        let o = LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            cpuset_cpus: "0".into(),
            cpuset_mems: "0".into(),
            hugepage_limits: vec![
                HugepageLimit {
                    page_size: "2MB".into(),
                    limit: 2 << 20,
                },
                HugepageLimit {
                    page_size: "1GB".into(),
                    limit: 1 << 30,
                },
            ],
            unified: [
                ("memory.high".to_string(), "1".to_string()),
                ("cpu.idle".to_string(), "0".to_string()),
            ]
            .into(),
            ..LinuxContainerResources::default()
        };
        let limits = pod_limits(Some(&linux(Some(r), Some(o))))
            .expect("valid")
            .expect("limits");
        let memory = limits.memory().as_ref().expect("memory");
        assert_eq!(memory.limit(), Some(80 << 20));
        assert_eq!(memory.swap(), Some(112 << 20));
        let cpu = limits.cpu().clone().expect("cpu");
        assert_eq!(cpu.cpus().as_deref(), Some("0-1"));
        assert_eq!(cpu.mems().as_deref(), Some("0"));
        let huge: Vec<(String, i64)> = limits
            .hugepage_limits()
            .clone()
            .expect("hugepages")
            .iter()
            .map(|h| (h.page_size().clone(), h.limit()))
            .collect();
        assert_eq!(
            huge,
            vec![("1GB".to_string(), 1 << 30), ("2MB".to_string(), 6 << 20)]
        );
        let unified = limits.unified().clone().expect("unified");
        assert_eq!(unified["memory.high"], "50331648", "resources win");
        assert_eq!(unified["cpu.idle"], "0");
    }

    /// What a pod with overhead and a cpuset and huge pages writes to a pod
    /// cgroup berth makes, on the fake hosts of the cgroup tests.
    fn pod_with_everything() -> LinuxPodSandboxConfig {
        let (mut r, o) = kubelet_pod();
        r.cpuset_cpus = "1".into();
        r.hugepage_limits = vec![HugepageLimit {
            page_size: "2MB".into(),
            limit: 4 << 20,
        }];
        linux(Some(r), Some(o))
    }

    const POD: &str = "/kubepods/burstable/podf00d";

    #[test]
    fn pod_cgroup_files_on_a_v1_host() {
        use crate::executor::cgroups::fake_tree_tests::{hybrid, populate_hybrid};
        use crate::executor::cgroups::{CgroupDriver, CgroupManager};
        let fake = hybrid();
        let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs);
        let path = manager.pod_path(POD).expect("pod path");
        populate_hybrid(&fake, &path);
        let limits = pod_limits(Some(&pod_with_everything()))
            .expect("valid")
            .expect("limits");
        manager.create(&path, Some(&limits)).expect("create");
        assert_eq!(fake.read("cpu", &path, "cpu.shares"), "768");
        assert_eq!(fake.read("cpu", &path, "cpu.cfs_period_us"), "100000");
        assert_eq!(fake.read("cpu", &path, "cpu.cfs_quota_us"), "125000");
        assert_eq!(
            fake.read("memory", &path, "memory.limit_in_bytes"),
            (192u64 << 20).to_string()
        );
        assert_eq!(fake.read("cpuset", &path, "cpuset.cpus"), "1");
        // hugetlb is on the v2 hierarchy of this kind of host.
        assert_eq!(
            fake.read("unified", &path, "hugetlb.2MB.max"),
            (4u64 << 20).to_string()
        );
    }

    #[test]
    fn pod_cgroup_files_on_a_v2_host() {
        use crate::executor::cgroups::fake_tree_tests::{populate_unified, unified};
        use crate::executor::cgroups::resources::shares_to_weight;
        use crate::executor::cgroups::{CgroupDriver, CgroupManager};
        let fake = unified();
        let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs);
        let path = manager.pod_path(POD).expect("pod path");
        populate_unified(&fake, &path);
        let limits = pod_limits(Some(&pod_with_everything()))
            .expect("valid")
            .expect("limits");
        manager.create(&path, Some(&limits)).expect("create");
        let read = |file: &str| fake.read("cgroup", &path, file);
        assert_eq!(read("cpu.weight"), shares_to_weight(768).to_string());
        assert_eq!(read("cpu.max"), "125000 100000");
        assert_eq!(read("memory.max"), (192u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "max", "no swap limit asked");
        assert_eq!(read("cpuset.cpus"), "1");
        assert_eq!(read("hugetlb.2MB.max"), (4u64 << 20).to_string());
    }

    #[test]
    fn nothing_asked_is_no_limits() {
        assert!(pod_limits(None).expect("valid").is_none());
        assert!(
            pod_limits(Some(&linux(
                Some(LinuxContainerResources::default()),
                Some(LinuxContainerResources::default())
            )))
            .expect("valid")
            .is_none()
        );
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases: Vec<(LinuxPodSandboxConfig, &str)> = vec![
            (
                linux(
                    Some(LinuxContainerResources {
                        cpu_shares: 1,
                        ..LinuxContainerResources::default()
                    }),
                    None,
                ),
                "config.linux.resources.cpu_shares",
            ),
            (
                linux(
                    None,
                    Some(LinuxContainerResources {
                        cpu_shares: -4,
                        ..LinuxContainerResources::default()
                    }),
                ),
                "config.linux.overhead.cpu_shares",
            ),
            (
                linux(
                    Some(LinuxContainerResources {
                        cpu_quota: 500,
                        ..LinuxContainerResources::default()
                    }),
                    None,
                ),
                "config.linux.resources.cpu_quota",
            ),
            (
                linux(
                    None,
                    Some(LinuxContainerResources {
                        cpu_period: 10,
                        ..LinuxContainerResources::default()
                    }),
                ),
                "config.linux.overhead.cpu_period",
            ),
            (
                linux(
                    Some(LinuxContainerResources {
                        memory_limit_in_bytes: -2,
                        ..LinuxContainerResources::default()
                    }),
                    None,
                ),
                "config.linux.resources.memory_limit_in_bytes",
            ),
            (
                linux(
                    Some(LinuxContainerResources {
                        memory_limit_in_bytes: 2 << 20,
                        memory_swap_limit_in_bytes: 1 << 20,
                        ..LinuxContainerResources::default()
                    }),
                    None,
                ),
                "config.linux.resources.memory_swap_limit_in_bytes",
            ),
            (
                linux(
                    None,
                    Some(LinuxContainerResources {
                        cpuset_cpus: "0;1".into(),
                        ..LinuxContainerResources::default()
                    }),
                ),
                "config.linux.overhead.cpuset_cpus",
            ),
            (
                linux(
                    Some(LinuxContainerResources {
                        hugepage_limits: vec![HugepageLimit {
                            page_size: "../2MB".into(),
                            limit: 1,
                        }],
                        ..LinuxContainerResources::default()
                    }),
                    None,
                ),
                "config.linux.resources.hugepage_limits",
            ),
            (
                linux(
                    Some(LinuxContainerResources {
                        hugepage_limits: vec![HugepageLimit {
                            page_size: "2MB".into(),
                            limit: u64::MAX,
                        }],
                        ..LinuxContainerResources::default()
                    }),
                    None,
                ),
                "config.linux.resources.hugepage_limits",
            ),
            (
                linux(
                    Some(LinuxContainerResources {
                        unified: [("cgroup.procs".to_string(), "1".to_string())].into(),
                        ..LinuxContainerResources::default()
                    }),
                    None,
                ),
                "config.linux.resources.unified",
            ),
        ];
        for (config, want) in cases {
            match pod_limits(Some(&config)) {
                Err(SandboxError::Invalid { field, message }) => {
                    assert_eq!(field, want, "{message}");
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }
}
