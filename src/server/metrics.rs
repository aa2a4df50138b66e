//! ListMetricDescriptors and ListPodSandboxMetrics: the usage berth already
//! reads for ContainerStats and PodSandboxStats (cgroup counters, OOM kills,
//! writable layer, pod interface counters), as the cadvisor-named metrics
//! kubelet serves on `/metrics/cadvisor` when its `PodAndContainerStatsFromCRI`
//! feature is on. Names, help texts, label keys, units and kinds are CRI-O's
//! (`internal/lib/statsserver`), which are cadvisor's.
//!
//! The one thing to know before changing this: kubelet turns the descriptor
//! list into Prometheus descriptors once, when it starts
//! (`pkg/kubelet/metrics/collectors/cri_metrics.go`), and then drops every
//! metric whose name it did not get there or whose label values differ in
//! number from the descriptor's keys. So every metric is built from its
//! [`Def`], which is also what its descriptor is made of, and the label
//! values are the base ones ([`BASE_LABEL_KEYS`]) followed by the def's own.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_cri::v1::MetricType::{self, Counter, Gauge};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetrics, LinuxContainerResources, Metric, MetricDescriptor,
    PodSandboxMetadata, PodSandboxMetrics, UInt64Value,
};
use tonic::Status;

use crate::container::{ContainerRecord, ContainerState, ContainerUsage};
use crate::daemon::Daemon;
use crate::network::InterfaceStats;
use crate::sandbox::{PodRecord, PodState};

/// The labels every metric starts with: the runtime's (`id`, `image`) and
/// Kubernetes' (`namespace`, `pod`, `container`), as CRI-O sends them since
/// it dropped cadvisor's `name`. kubelet adds no labels of its own.
const BASE_LABEL_KEYS: [&str; 5] = ["id", "image", "namespace", "pod", "container"];

/// What cadvisor and CRI-O call the pod-level subject of network metrics.
const POD_CONTAINER_LABEL: &str = "POD";

/// Pods whose usage is read at the same time: each read is a blocking
/// task or a thread in the pod's netns, so a node with hundreds of pods
/// does not wait for them one by one, nor start them all at once.
const PODS_IN_FLIGHT: usize = 8;

/// One metric family: its descriptor, and the kind and label keys its
/// metrics are built with.
struct Def {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    /// Keys after [`BASE_LABEL_KEYS`].
    labels: &'static [&'static str],
}

const fn def(
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
) -> Def {
    Def {
        name,
        help,
        kind,
        labels,
    }
}

const NO_LABELS: &[&str] = &[];
const NETWORK_LABELS: &[&str] = &["interface"];

const LAST_SEEN: Def = def(
    "container_last_seen",
    "Last time a container was seen by the exporter",
    Gauge,
    NO_LABELS,
);
const CPU_USAGE: Def = def(
    "container_cpu_usage_seconds_total",
    "Cumulative CPU time consumed in seconds.",
    Counter,
    &["cpu"],
);
const CPU_USER: Def = def(
    "container_cpu_user_seconds_total",
    "Cumulative user CPU time consumed in seconds.",
    Counter,
    NO_LABELS,
);
const CPU_SYSTEM: Def = def(
    "container_cpu_system_seconds_total",
    "Cumulative system CPU time consumed in seconds.",
    Counter,
    NO_LABELS,
);
const CFS_PERIODS: Def = def(
    "container_cpu_cfs_periods_total",
    "Number of elapsed enforcement period intervals.",
    Counter,
    NO_LABELS,
);
const CFS_THROTTLED_PERIODS: Def = def(
    "container_cpu_cfs_throttled_periods_total",
    "Number of throttled period intervals.",
    Counter,
    NO_LABELS,
);
const CFS_THROTTLED_SECONDS: Def = def(
    "container_cpu_cfs_throttled_seconds_total",
    "Total time duration the container has been throttled.",
    Counter,
    NO_LABELS,
);
const MEMORY_USAGE: Def = def(
    "container_memory_usage_bytes",
    "Current memory usage in bytes, including all memory regardless of when it was accessed",
    Gauge,
    NO_LABELS,
);
const MEMORY_WORKING_SET: Def = def(
    "container_memory_working_set_bytes",
    "Current working set in bytes.",
    Gauge,
    NO_LABELS,
);
const MEMORY_RSS: Def = def(
    "container_memory_rss",
    "Size of RSS in bytes.",
    Gauge,
    NO_LABELS,
);
const MEMORY_CACHE: Def = def(
    "container_memory_cache",
    "Number of bytes of page cache memory.",
    Gauge,
    NO_LABELS,
);
const MEMORY_MAPPED_FILE: Def = def(
    "container_memory_mapped_file",
    "Size of memory mapped files in bytes.",
    Gauge,
    NO_LABELS,
);
const MEMORY_SWAP: Def = def(
    "container_memory_swap",
    "Container swap usage in bytes.",
    Gauge,
    NO_LABELS,
);
const MEMORY_FAILURES: Def = def(
    "container_memory_failures_total",
    "Cumulative count of memory allocation failures.",
    Counter,
    &["failure_type", "scope"],
);
const OOM_EVENTS: Def = def(
    "container_oom_events_total",
    "Count of out of memory events observed for the container",
    Counter,
    NO_LABELS,
);
const PROCESSES: Def = def(
    "container_processes",
    "Number of processes running inside the container.",
    Gauge,
    NO_LABELS,
);
const FS_USAGE: Def = def(
    "container_fs_usage_bytes",
    "Current filesystem usage in bytes.",
    Gauge,
    NO_LABELS,
);
const SPEC_MEMORY_LIMIT: Def = def(
    "container_spec_memory_limit_bytes",
    "Memory limit for the container in bytes.",
    Gauge,
    NO_LABELS,
);
const SPEC_CPU_SHARES: Def = def(
    "container_spec_cpu_shares",
    "CPU share of the container.",
    Gauge,
    NO_LABELS,
);
const SPEC_CPU_PERIOD: Def = def(
    "container_spec_cpu_period",
    "CPU period of the container.",
    Gauge,
    NO_LABELS,
);
const SPEC_CPU_QUOTA: Def = def(
    "container_spec_cpu_quota",
    "CPU quota of the container.",
    Gauge,
    NO_LABELS,
);
const START_TIME: Def = def(
    "container_start_time_seconds",
    "Start time of the container since unix epoch in seconds.",
    Gauge,
    NO_LABELS,
);
const NET_RX_BYTES: Def = def(
    "container_network_receive_bytes_total",
    "Cumulative count of bytes received",
    Counter,
    NETWORK_LABELS,
);
const NET_RX_PACKETS: Def = def(
    "container_network_receive_packets_total",
    "Cumulative count of packets received",
    Counter,
    NETWORK_LABELS,
);
const NET_RX_DROPPED: Def = def(
    "container_network_receive_packets_dropped_total",
    "Cumulative count of packets dropped while receiving",
    Counter,
    NETWORK_LABELS,
);
const NET_RX_ERRORS: Def = def(
    "container_network_receive_errors_total",
    "Cumulative count of errors encountered while receiving",
    Counter,
    NETWORK_LABELS,
);
const NET_TX_BYTES: Def = def(
    "container_network_transmit_bytes_total",
    "Cumulative count of bytes transmitted",
    Counter,
    NETWORK_LABELS,
);
const NET_TX_PACKETS: Def = def(
    "container_network_transmit_packets_total",
    "Cumulative count of packets transmitted",
    Counter,
    NETWORK_LABELS,
);
const NET_TX_DROPPED: Def = def(
    "container_network_transmit_packets_dropped_total",
    "Cumulative count of packets dropped while transmitting",
    Counter,
    NETWORK_LABELS,
);
const NET_TX_ERRORS: Def = def(
    "container_network_transmit_errors_total",
    "Cumulative count of errors encountered while transmitting",
    Counter,
    NETWORK_LABELS,
);

/// Every family berth can send. A family berth cannot read on this host
/// (no swap accounting, no OOM counter) keeps its descriptor and simply
/// has no metrics: kubelet asks for descriptors only once, at its start.
const ALL: &[&Def] = &[
    &LAST_SEEN,
    &CPU_USAGE,
    &CPU_USER,
    &CPU_SYSTEM,
    &CFS_PERIODS,
    &CFS_THROTTLED_PERIODS,
    &CFS_THROTTLED_SECONDS,
    &MEMORY_USAGE,
    &MEMORY_WORKING_SET,
    &MEMORY_RSS,
    &MEMORY_CACHE,
    &MEMORY_MAPPED_FILE,
    &MEMORY_SWAP,
    &MEMORY_FAILURES,
    &OOM_EVENTS,
    &PROCESSES,
    &FS_USAGE,
    &SPEC_MEMORY_LIMIT,
    &SPEC_CPU_SHARES,
    &SPEC_CPU_PERIOD,
    &SPEC_CPU_QUOTA,
    &START_TIME,
    &NET_RX_BYTES,
    &NET_RX_PACKETS,
    &NET_RX_DROPPED,
    &NET_RX_ERRORS,
    &NET_TX_BYTES,
    &NET_TX_PACKETS,
    &NET_TX_DROPPED,
    &NET_TX_ERRORS,
];

/// ListMetricDescriptors: every family, label keys in the order their
/// metrics' values come.
pub fn descriptors() -> Vec<MetricDescriptor> {
    ALL.iter()
        .map(|d| MetricDescriptor {
            name: d.name.to_string(),
            help: d.help.to_string(),
            label_keys: BASE_LABEL_KEYS
                .iter()
                .chain(d.labels)
                .map(ToString::to_string)
                .collect(),
        })
        .collect()
}

/// The values of [`BASE_LABEL_KEYS`] for one container, or for the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Subject([String; 5]);

impl Subject {
    fn container(c: &ContainerRecord, pod: &PodRecord) -> Self {
        Self::of_container(&c.id, &c.config, pod.config.metadata.as_ref())
    }

    /// The pod itself: its id, no image, and `POD` for the container, as
    /// cadvisor labels the sandbox and CRI-O the pod's network metrics.
    fn pod(pod: &PodRecord) -> Self {
        Self::of_pod(&pod.id, pod.config.metadata.as_ref())
    }

    fn of_container(id: &str, config: &ContainerConfig, pod: Option<&PodSandboxMetadata>) -> Self {
        let pod = pod.cloned().unwrap_or_default();
        Subject([
            id.to_string(),
            // The image as ContainerStatus reports it, as CRI-O labels it.
            config
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default(),
            pod.namespace,
            pod.name,
            config
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default(),
        ])
    }

    fn of_pod(id: &str, pod: Option<&PodSandboxMetadata>) -> Self {
        let pod = pod.cloned().unwrap_or_default();
        Subject([
            id.to_string(),
            String::new(),
            pod.namespace,
            pod.name,
            POD_CONTAINER_LABEL.to_string(),
        ])
    }
}

/// Metrics of one subject read at one moment.
struct Metrics<'a> {
    subject: &'a Subject,
    /// When the values were read, in ns. The CRI asks for 0 on values
    /// gathered live, but kubelet passes a non-zero timestamp on to
    /// Prometheus, and the reading's own time is what cadvisor exposes
    /// and CRI-O sends.
    timestamp: i64,
    out: Vec<Metric>,
}

impl<'a> Metrics<'a> {
    fn new(subject: &'a Subject, timestamp: i64) -> Self {
        Metrics {
            subject,
            timestamp,
            out: Vec::new(),
        }
    }

    /// Adds one metric of `def`; `labels` are the values of `def.labels`.
    fn push(&mut self, def: &Def, labels: &[&str], value: u64) {
        debug_assert_eq!(labels.len(), def.labels.len(), "{}", def.name);
        self.out.push(Metric {
            name: def.name.to_string(),
            timestamp: self.timestamp,
            metric_type: def.kind as i32,
            label_values: self
                .subject
                .0
                .iter()
                .cloned()
                .chain(labels.iter().map(ToString::to_string))
                .collect(),
            value: Some(UInt64Value { value }),
        });
    }
}

const NS_PER_SECOND: u64 = 1_000_000_000;

/// The CRI's value is an unsigned integer, so seconds are whole: truncated,
/// as CRI-O sends them, which keeps a counter monotonic.
fn seconds(ns: u64) -> u64 {
    ns / NS_PER_SECOND
}

/// The metrics of one running container from its usage, the resources
/// kubelet last gave it and when it was created (ns). What the host could
/// not read (no swap accounting, no CFS counters, no OOM counter, no pids
/// controller) is left out.
fn container_metrics(
    subject: &Subject,
    usage: &ContainerUsage,
    resources: Option<&LinuxContainerResources>,
    created_at: i64,
) -> Vec<Metric> {
    let mut m = Metrics::new(subject, usage.timestamp);
    if let Ok(now) = u64::try_from(usage.timestamp) {
        m.push(&LAST_SEEN, &[], seconds(now));
    }
    let stats = usage.cgroup.as_ref();
    if let Some(cpu) = stats.and_then(|s| s.cpu.as_ref()) {
        // One series for all CPUs, as kubelet's cadvisor sends (it does
        // not enable per-CPU usage).
        m.push(&CPU_USAGE, &["total"], seconds(cpu.usage_ns));
        m.push(&CPU_USER, &[], seconds(cpu.user_ns));
        m.push(&CPU_SYSTEM, &[], seconds(cpu.system_ns));
        if let Some(t) = &cpu.throttling {
            m.push(&CFS_PERIODS, &[], t.periods);
            m.push(&CFS_THROTTLED_PERIODS, &[], t.throttled_periods);
            m.push(&CFS_THROTTLED_SECONDS, &[], seconds(t.throttled_ns));
        }
    }
    if let Some(memory) = stats.and_then(|s| s.memory.as_ref()) {
        m.push(&MEMORY_USAGE, &[], memory.usage_bytes);
        m.push(&MEMORY_WORKING_SET, &[], memory.working_set_bytes);
        m.push(&MEMORY_RSS, &[], memory.rss_bytes);
        m.push(&MEMORY_CACHE, &[], memory.cache_bytes);
        if let Some(mapped) = memory.mapped_file_bytes {
            m.push(&MEMORY_MAPPED_FILE, &[], mapped);
        }
        if let Some(swap) = memory.swap_bytes {
            m.push(&MEMORY_SWAP, &[], swap);
        }
        // Both scopes carry the hierarchical count, as CRI-O sends them: a
        // container's cgroup has no children of its own (and v2's
        // memory.stat is hierarchical only).
        for scope in ["container", "hierarchy"] {
            m.push(&MEMORY_FAILURES, &["pgfault", scope], memory.page_faults);
            m.push(
                &MEMORY_FAILURES,
                &["pgmajfault", scope],
                memory.major_page_faults,
            );
        }
    }
    if let Some(count) = usage.oom_kills {
        m.push(&OOM_EVENTS, &[], count);
    }
    if let Some(pids) = stats.and_then(|s| s.pids.as_ref()) {
        m.push(&PROCESSES, &[], pids.current);
    }
    m.push(&FS_USAGE, &[], usage.writable_layer.bytes);
    spec(&mut m, resources);
    if let Ok(created) = u64::try_from(created_at) {
        m.push(&START_TIME, &[], seconds(created));
    }
    m.out
}

/// What kubelet asked for (updated by UpdateContainerResources), as
/// CRI-O reports it. A memory limit of 0 is "none", cadvisor's way of
/// saying unlimited; CPU settings kubelet did not give are left out.
fn spec(m: &mut Metrics<'_>, resources: Option<&LinuxContainerResources>) {
    let r = resources.cloned().unwrap_or_default();
    m.push(
        &SPEC_MEMORY_LIMIT,
        &[],
        u64::try_from(r.memory_limit_in_bytes).unwrap_or(0),
    );
    for (def, value) in [
        (&SPEC_CPU_SHARES, r.cpu_shares),
        (&SPEC_CPU_PERIOD, r.cpu_period),
        (&SPEC_CPU_QUOTA, r.cpu_quota),
    ] {
        if let Ok(value @ 1..) = u64::try_from(value) {
            m.push(def, &[], value);
        }
    }
}

/// The pod's network metrics: one series per interface of its network
/// namespace (`lo` is not among them, as cadvisor leaves it out).
fn network_metrics(
    subject: &Subject,
    interfaces: &[InterfaceStats],
    timestamp: i64,
) -> Vec<Metric> {
    let mut m = Metrics::new(subject, timestamp);
    for i in interfaces {
        let name = [i.name.as_str()];
        for (def, value) in [
            (&NET_RX_BYTES, i.rx_bytes),
            (&NET_RX_PACKETS, i.rx_packets),
            (&NET_RX_DROPPED, i.rx_dropped),
            (&NET_RX_ERRORS, i.rx_errors),
            (&NET_TX_BYTES, i.tx_bytes),
            (&NET_TX_PACKETS, i.tx_packets),
            (&NET_TX_DROPPED, i.tx_dropped),
            (&NET_TX_ERRORS, i.tx_errors),
        ] {
            m.push(def, &name, value);
        }
    }
    m.out
}

/// ListPodSandboxMetrics: every ready pod, with its network metrics when
/// it has a network namespace of its own, and its running containers'.
/// A pod or container whose usage cannot be read now (it is being torn
/// down, say) is logged and left out, so that one pod never costs kubelet
/// the whole scrape; only the records themselves failing fails the call.
pub async fn list(daemon: &Daemon) -> Result<Vec<PodSandboxMetrics>, Status> {
    let pods = daemon.sandboxes.all().await?;
    let mut containers: HashMap<String, Vec<Arc<ContainerRecord>>> = HashMap::new();
    for c in daemon.containers.all().await? {
        // Running ones only, as ListContainerStats reports them.
        if c.state == ContainerState::Running {
            containers.entry(c.pod_id.clone()).or_default().push(c);
        }
    }
    let pods: Vec<_> = pods
        .into_iter()
        .filter(|p| p.state == PodState::Ready)
        .map(|p| {
            let own = containers.remove(&p.id).unwrap_or_default();
            (p, own)
        })
        .collect();
    Ok(futures_util::stream::iter(pods)
        .map(|(pod, own)| pod_sandbox(daemon, pod, own))
        .buffered(PODS_IN_FLIGHT)
        .collect()
        .await)
}

async fn pod_sandbox(
    daemon: &Daemon,
    pod: Arc<PodRecord>,
    containers: Vec<Arc<ContainerRecord>>,
) -> PodSandboxMetrics {
    let mut metrics = Vec::new();
    // A hostNetwork pod has no interfaces of its own: the node's are not
    // the pod's, so it has no network metrics.
    if let Some(netns) = daemon.sandboxes.namespace_path(&pod, "net") {
        match daemon.network.stats(&netns).await {
            Ok(interfaces) => {
                let now = crate::ids::now_ns();
                metrics = network_metrics(&Subject::pod(&pod), &interfaces, now);
            }
            Err(e) => tracing::warn!(pod = %pod.id, error = %e, "metrics: pod network counters"),
        }
    }
    let mut per_container = Vec::with_capacity(containers.len());
    for c in containers {
        match daemon.containers.usage(&c).await {
            Ok(usage) => {
                let resources = c.config.linux.as_ref().and_then(|l| l.resources.as_ref());
                per_container.push(ContainerMetrics {
                    container_id: c.id.clone(),
                    metrics: container_metrics(
                        &Subject::container(&c, &pod),
                        &usage,
                        resources,
                        c.created_at,
                    ),
                });
            }
            Err(e) => {
                tracing::warn!(container = %c.id, error = %e, "metrics: container usage");
            }
        }
    }
    PodSandboxMetrics {
        pod_sandbox_id: pod.id.clone(),
        metrics,
        container_metrics: per_container,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use k8s_cri::v1::{ContainerMetadata, ImageSpec};

    use super::*;
    use crate::executor::cgroups::{CgroupStats, CpuStats, CpuThrottling, MemoryStats, PidsStats};
    use crate::image::store::DiskUsage;

    const T: i64 = 1_700_000_123_456_789_000;

    fn subject() -> Subject {
        Subject::of_container(
            "c1",
            &ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".to_string(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: "registry.example/busybox:1.36".to_string(),
                    ..ImageSpec::default()
                }),
                ..ContainerConfig::default()
            },
            Some(&PodSandboxMetadata {
                name: "web".to_string(),
                uid: "u1".to_string(),
                namespace: "shop".to_string(),
                attempt: 0,
            }),
        )
    }

    fn full_usage() -> ContainerUsage {
        ContainerUsage {
            timestamp: T,
            cgroup: Some(CgroupStats {
                cpu: Some(CpuStats {
                    usage_ns: 2_999_999_999,
                    user_ns: 2_100_000_000,
                    system_ns: 900_000_000,
                    throttling: Some(CpuThrottling {
                        periods: 120,
                        throttled_periods: 14,
                        throttled_ns: 3_500_000_000,
                    }),
                }),
                memory: Some(MemoryStats {
                    usage_bytes: 1_118_208,
                    working_set_bytes: 847_872,
                    rss_bytes: 548_864,
                    cache_bytes: 405_504,
                    mapped_file_bytes: Some(135_168),
                    page_faults: 1683,
                    major_page_faults: 2,
                    swap_bytes: Some(4096),
                    limit_bytes: Some(64 << 20),
                }),
                pids: Some(PidsStats {
                    current: 3,
                    limit: None,
                }),
            }),
            oom_kills: Some(1),
            nano_cores: None,
            writable_layer: DiskUsage {
                bytes: 8192,
                inodes: 3,
            },
            writable_layer_mount: "/var/lib/berth".into(),
        }
    }

    fn resources() -> LinuxContainerResources {
        LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_shares: 512,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            ..LinuxContainerResources::default()
        }
    }

    /// name + extra label values → (value, kind), checking on the way
    /// that each metric has a descriptor and as many values as its keys.
    fn index(metrics: &[Metric], base: &Subject) -> BTreeMap<(String, Vec<String>), (u64, i32)> {
        let descriptors: HashMap<String, MetricDescriptor> = descriptors()
            .into_iter()
            .map(|d| (d.name.clone(), d))
            .collect();
        let mut out = BTreeMap::new();
        for m in metrics {
            let d = descriptors
                .get(&m.name)
                .unwrap_or_else(|| panic!("{} has no descriptor", m.name));
            assert_eq!(m.label_values.len(), d.label_keys.len(), "{m:?}");
            assert_eq!(m.label_values[..5], base.0[..], "base labels of {m:?}");
            let extra = m.label_values[5..].to_vec();
            let value = m.value.as_ref().expect("a value").value;
            let old = out.insert((m.name.clone(), extra), (value, m.metric_type));
            assert!(old.is_none(), "{} twice with the same labels", m.name);
        }
        out
    }

    fn get(
        index: &BTreeMap<(String, Vec<String>), (u64, i32)>,
        name: &str,
        extra: &[&str],
    ) -> Option<(u64, MetricType)> {
        let key = (
            name.to_string(),
            extra.iter().map(ToString::to_string).collect(),
        );
        index
            .get(&key)
            .map(|(v, t)| (*v, MetricType::try_from(*t).expect("a known metric type")))
    }

    #[test]
    fn descriptors_are_cadvisor_names_with_base_labels_first() {
        let all = descriptors();
        assert_eq!(all.len(), 30);
        let names: HashSet<&str> = all.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names.len(), all.len(), "names are unique");
        for d in &all {
            assert!(d.name.starts_with("container_"), "{}", d.name);
            assert!(!d.help.is_empty(), "{}", d.name);
            assert_eq!(d.label_keys[..5], BASE_LABEL_KEYS, "{}", d.name);
        }
        let keys = |name: &str| {
            all.iter()
                .find(|d| d.name == name)
                .unwrap_or_else(|| panic!("{name}"))
                .label_keys[5..]
                .to_vec()
        };
        assert_eq!(keys("container_cpu_usage_seconds_total"), ["cpu"]);
        assert!(keys("container_memory_working_set_bytes").is_empty());
        assert_eq!(
            keys("container_memory_failures_total"),
            ["failure_type", "scope"]
        );
        for net in [
            "container_network_receive_bytes_total",
            "container_network_receive_packets_total",
            "container_network_receive_packets_dropped_total",
            "container_network_receive_errors_total",
            "container_network_transmit_bytes_total",
            "container_network_transmit_packets_total",
            "container_network_transmit_packets_dropped_total",
            "container_network_transmit_errors_total",
        ] {
            assert_eq!(keys(net), ["interface"], "{net}");
        }
        // Prometheus' naming rule: counters, and only they, end in _total.
        for d in ALL {
            assert_eq!(
                d.name.ends_with("_total"),
                d.kind == Counter,
                "{} is a {:?}",
                d.name,
                d.kind
            );
        }
    }

    #[test]
    fn container_metrics_carry_values_kinds_labels_and_the_reading_time() {
        let s = subject();
        assert_eq!(
            s.0,
            ["c1", "registry.example/busybox:1.36", "shop", "web", "app"]
        );
        let metrics = container_metrics(&s, &full_usage(), Some(&resources()), T - 5_000_000_000);
        assert!(metrics.iter().all(|m| m.timestamp == T), "{metrics:?}");
        let got = index(&metrics, &s);
        let expect: &[(&str, &[&str], u64, MetricType)] = &[
            ("container_last_seen", &[], 1_700_000_123, Gauge),
            // Whole seconds, truncated: 2.999999999 s is 2.
            ("container_cpu_usage_seconds_total", &["total"], 2, Counter),
            ("container_cpu_user_seconds_total", &[], 2, Counter),
            ("container_cpu_system_seconds_total", &[], 0, Counter),
            ("container_cpu_cfs_periods_total", &[], 120, Counter),
            (
                "container_cpu_cfs_throttled_periods_total",
                &[],
                14,
                Counter,
            ),
            ("container_cpu_cfs_throttled_seconds_total", &[], 3, Counter),
            ("container_memory_usage_bytes", &[], 1_118_208, Gauge),
            ("container_memory_working_set_bytes", &[], 847_872, Gauge),
            ("container_memory_rss", &[], 548_864, Gauge),
            ("container_memory_cache", &[], 405_504, Gauge),
            ("container_memory_mapped_file", &[], 135_168, Gauge),
            ("container_memory_swap", &[], 4096, Gauge),
            (
                "container_memory_failures_total",
                &["pgfault", "container"],
                1683,
                Counter,
            ),
            (
                "container_memory_failures_total",
                &["pgfault", "hierarchy"],
                1683,
                Counter,
            ),
            (
                "container_memory_failures_total",
                &["pgmajfault", "container"],
                2,
                Counter,
            ),
            (
                "container_memory_failures_total",
                &["pgmajfault", "hierarchy"],
                2,
                Counter,
            ),
            ("container_oom_events_total", &[], 1, Counter),
            ("container_processes", &[], 3, Gauge),
            ("container_fs_usage_bytes", &[], 8192, Gauge),
            ("container_spec_memory_limit_bytes", &[], 64 << 20, Gauge),
            ("container_spec_cpu_shares", &[], 512, Gauge),
            ("container_spec_cpu_period", &[], 100_000, Gauge),
            ("container_spec_cpu_quota", &[], 50_000, Gauge),
            ("container_start_time_seconds", &[], 1_700_000_118, Gauge),
        ];
        for (name, extra, value, kind) in expect {
            assert_eq!(
                get(&got, name, extra),
                Some((*value, *kind)),
                "{name} {extra:?}"
            );
        }
        assert_eq!(got.len(), expect.len(), "nothing else: {got:#?}");
    }

    #[test]
    fn what_the_host_cannot_read_is_left_out_not_zero() {
        let s = subject();
        let mut usage = full_usage();
        let stats = usage.cgroup.as_mut().expect("stats");
        stats.cpu.as_mut().expect("cpu").throttling = None;
        let memory = stats.memory.as_mut().expect("memory");
        memory.swap_bytes = None;
        memory.mapped_file_bytes = None;
        stats.pids = None;
        usage.oom_kills = None;
        let got = index(&container_metrics(&s, &usage, None, T), &s);
        for absent in [
            "container_cpu_cfs_periods_total",
            "container_cpu_cfs_throttled_periods_total",
            "container_cpu_cfs_throttled_seconds_total",
            "container_memory_swap",
            "container_memory_mapped_file",
            "container_processes",
            "container_oom_events_total",
            "container_spec_cpu_shares",
            "container_spec_cpu_period",
            "container_spec_cpu_quota",
        ] {
            assert!(
                !got.keys().any(|(name, _)| name == absent),
                "{absent} sent without a reading"
            );
        }
        assert!(get(&got, "container_cpu_usage_seconds_total", &["total"]).is_some());
        // No limit is cadvisor's 0.
        assert_eq!(
            get(&got, "container_spec_memory_limit_bytes", &[]),
            Some((0, Gauge))
        );

        // No cgroup at all (berth runs without cgroups): no usage metrics.
        usage.cgroup = None;
        let got = index(&container_metrics(&s, &usage, None, T), &s);
        let names: HashSet<&str> = got.keys().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            HashSet::from([
                "container_last_seen",
                "container_fs_usage_bytes",
                "container_spec_memory_limit_bytes",
                "container_start_time_seconds",
            ])
        );
    }

    #[test]
    fn network_metrics_are_the_pods_one_series_per_interface() {
        let pod = Subject::of_pod(
            "p1",
            Some(&PodSandboxMetadata {
                name: "web".to_string(),
                uid: "u1".to_string(),
                namespace: "shop".to_string(),
                attempt: 0,
            }),
        );
        assert_eq!(pod.0, ["p1", "", "shop", "web", "POD"]);
        let interfaces = [
            InterfaceStats {
                name: "eth0".to_string(),
                rx_bytes: 5000,
                rx_packets: 40,
                rx_errors: 2,
                rx_dropped: 1,
                tx_bytes: 7000,
                tx_packets: 50,
                tx_errors: 3,
                tx_dropped: 4,
            },
            InterfaceStats {
                name: "net1".to_string(),
                rx_bytes: 9,
                ..InterfaceStats::default()
            },
        ];
        let metrics = network_metrics(&pod, &interfaces, T);
        assert_eq!(metrics.len(), 16);
        assert!(metrics.iter().all(|m| m.timestamp == T));
        assert!(
            metrics.iter().all(|m| m.metric_type == Counter as i32),
            "network counters only"
        );
        assert_eq!(
            metrics[0].label_values,
            ["p1", "", "shop", "web", "POD", "eth0"],
            "the interface comes last, as its key does"
        );
        let got = index(&metrics, &pod);
        for (name, value) in [
            ("container_network_receive_bytes_total", 5000),
            ("container_network_receive_packets_total", 40),
            ("container_network_receive_errors_total", 2),
            ("container_network_receive_packets_dropped_total", 1),
            ("container_network_transmit_bytes_total", 7000),
            ("container_network_transmit_packets_total", 50),
            ("container_network_transmit_errors_total", 3),
            ("container_network_transmit_packets_dropped_total", 4),
        ] {
            assert_eq!(get(&got, name, &["eth0"]), Some((value, Counter)), "{name}");
        }
        assert_eq!(
            get(&got, "container_network_receive_bytes_total", &["net1"]),
            Some((9, Counter))
        );
        assert!(network_metrics(&pod, &[], T).is_empty());
    }

    #[test]
    fn a_subject_without_metadata_has_empty_names_not_fewer_labels() {
        let s = Subject::of_container("c2", &ContainerConfig::default(), None);
        assert_eq!(s.0, ["c2", "", "", "", ""]);
        let got = container_metrics(&s, &full_usage(), None, T);
        assert!(got.iter().all(|m| m.label_values.len() >= 5));
        index(&got, &s);
    }
}
