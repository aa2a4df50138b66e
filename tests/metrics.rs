//! ListMetricDescriptors and ListPodSandboxMetrics through the CRI socket,
//! checked the way kubelet's CRI metrics collector uses them
//! (`pkg/kubelet/metrics/collectors/cri_metrics.go`): every metric needs a
//! descriptor of its name and as many label values as the descriptor has
//! keys, or kubelet drops it. A pod with a network namespace of its own
//! running a container that burns CPU and holds memory, and a hostNetwork
//! pod beside it.

mod common;
#[path = "support/rig.rs"]
mod rig;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_cri::v1::*;
use rig::*;

/// Bound on the busy container having used a whole second of CPU: the
/// metric counts whole seconds, and two cores are shared with other tests.
const CPU_LIMIT: Duration = Duration::from_secs(60);

/// Bytes the busy container keeps in a shell variable.
const HELD_BYTES: u64 = 8_000_000;

async fn descriptors(rig: &Rig) -> HashMap<String, MetricDescriptor> {
    let mut client = rig.rt();
    within(
        "ListMetricDescriptors",
        RPC_LIMIT,
        client.list_metric_descriptors(ListMetricDescriptorsRequest::default()),
    )
    .await
    .expect("ListMetricDescriptors")
    .into_inner()
    .descriptors
    .into_iter()
    .map(|d| (d.name.clone(), d))
    .collect()
}

async fn pod_metrics(rig: &Rig) -> Vec<PodSandboxMetrics> {
    let mut client = rig.rt();
    within(
        "ListPodSandboxMetrics",
        RPC_LIMIT,
        client.list_pod_sandbox_metrics(ListPodSandboxMetricsRequest::default()),
    )
    .await
    .expect("ListPodSandboxMetrics")
    .into_inner()
    .pod_metrics
}

/// The metric `name` whose label values end with `extra`.
fn find<'a>(metrics: &'a [Metric], name: &str, extra: &[&str]) -> Option<&'a Metric> {
    metrics
        .iter()
        .find(|m| m.name == name && m.label_values.ends_with(&strs(extra)))
}

fn value(m: &Metric) -> u64 {
    m.value.as_ref().expect("a metric has a value").value
}

fn now_ns() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_nanos()).expect("ns fit i64")
}

/// What kubelet would refuse: a name without descriptor, a label count
/// other than the descriptor's, or a type that is neither counter nor gauge.
fn check_against_descriptors(
    descriptors: &HashMap<String, MetricDescriptor>,
    metrics: &[Metric],
    before: i64,
) {
    for m in metrics {
        let d = descriptors
            .get(&m.name)
            .unwrap_or_else(|| panic!("{} has no descriptor", m.name));
        assert_eq!(
            m.label_values.len(),
            d.label_keys.len(),
            "{m:?} against keys {:?}",
            d.label_keys
        );
        assert!(
            MetricType::try_from(m.metric_type).is_ok(),
            "{}: type {}",
            m.name,
            m.metric_type
        );
        assert!(
            m.timestamp >= before && m.timestamp <= now_ns(),
            "{}: timestamp {} is not the time of the call (ns)",
            m.name,
            m.timestamp
        );
    }
}

#[tokio::test]
async fn pod_metrics_have_descriptors_cpu_memory_and_the_pods_network() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;

    let mut pod_config = rig.pod_config("metrics");
    let own_network = NamespaceOption {
        network: NamespaceMode::Pod as i32,
        ..namespaces()
    };
    if let Some(linux) = pod_config.linux.as_mut()
        && let Some(sc) = linux.security_context.as_mut()
    {
        sc.namespace_options = Some(own_network.clone());
    }
    let pod = rig.run_pod(pod_config).await;
    // Holds HELD_BYTES in the shell's memory, then spins.
    let mut config = container(
        "busy",
        &busybox,
        &sh(&format!(
            "x=$(head -c {HELD_BYTES} /dev/zero | tr '\\0' a); echo held; while :; do :; done"
        )),
    );
    if let Some(linux) = config.linux.as_mut()
        && let Some(sc) = linux.security_context.as_mut()
    {
        sc.namespace_options = Some(own_network);
    }
    let busy = rig.run(&pod, config).await;

    // A hostNetwork pod: its containers have metrics, the pod has no
    // interfaces of its own to report.
    let host_pod = rig.pod("metrics-host").await;
    let sleeper = rig
        .run(&host_pod, container("sleeper", &busybox, SLEEPER))
        .await;

    let descriptors = descriptors(&rig).await;
    let deadline = Instant::now() + CPU_LIMIT;
    let (pods, before) = loop {
        let before = now_ns();
        let pods = pod_metrics(&rig).await;
        let cpu = pods
            .iter()
            .flat_map(|p| &p.container_metrics)
            .filter(|c| c.container_id == busy)
            .find_map(|c| find(&c.metrics, "container_cpu_usage_seconds_total", &["total"]))
            .map(value);
        if cpu.is_some_and(|s| s >= 1) {
            break (pods, before);
        }
        assert!(
            Instant::now() < deadline,
            "the busy container has not used a second of CPU within {CPU_LIMIT:?}: {cpu:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for p in &pods {
        check_against_descriptors(&descriptors, &p.metrics, before);
        for c in &p.container_metrics {
            check_against_descriptors(&descriptors, &c.metrics, before);
        }
    }

    // The pod with its own network: eth0 of the built-in network.
    let ours = pods
        .iter()
        .find(|p| p.pod_sandbox_id == pod)
        .unwrap_or_else(|| panic!("pod {pod} missing from {pods:#?}"));
    let rx = find(
        &ours.metrics,
        "container_network_receive_bytes_total",
        &["eth0"],
    )
    .unwrap_or_else(|| panic!("no eth0 receive bytes: {:#?}", ours.metrics));
    assert_eq!(
        rx.label_values,
        strs(&[&pod, "", "container-test", "metrics", "POD", "eth0"])
    );
    assert_eq!(rx.metric_type, MetricType::Counter as i32);
    for name in [
        "container_network_receive_packets_total",
        "container_network_receive_packets_dropped_total",
        "container_network_receive_errors_total",
        "container_network_transmit_bytes_total",
        "container_network_transmit_packets_total",
        "container_network_transmit_packets_dropped_total",
        "container_network_transmit_errors_total",
    ] {
        assert!(find(&ours.metrics, name, &["eth0"]).is_some(), "{name}");
    }
    assert!(
        ours.metrics
            .iter()
            .all(|m| !m.label_values.contains(&"lo".to_string())),
        "lo is not the pod's network"
    );

    assert_eq!(ours.container_metrics.len(), 1);
    let metrics = &ours.container_metrics[0];
    assert_eq!(metrics.container_id, busy);
    let m = &metrics.metrics;
    let cpu = find(m, "container_cpu_usage_seconds_total", &["total"]).expect("cpu usage");
    assert_eq!(
        cpu.label_values,
        strs(&[
            &busy,
            &busybox,
            "container-test",
            "metrics",
            "busy",
            "total"
        ])
    );
    assert_eq!(cpu.metric_type, MetricType::Counter as i32);
    assert!(value(cpu) >= 1);
    let working_set = find(m, "container_memory_working_set_bytes", &[]).expect("working set");
    assert_eq!(working_set.metric_type, MetricType::Gauge as i32);
    assert!(
        value(working_set) >= HELD_BYTES,
        "working set {} holds the {HELD_BYTES} bytes the shell keeps",
        value(working_set)
    );
    let usage = find(m, "container_memory_usage_bytes", &[]).expect("usage");
    assert!(value(usage) >= value(working_set));
    for name in [
        "container_last_seen",
        "container_cpu_user_seconds_total",
        "container_cpu_system_seconds_total",
        "container_memory_rss",
        "container_memory_cache",
        "container_fs_usage_bytes",
        "container_spec_memory_limit_bytes",
        "container_start_time_seconds",
    ] {
        assert!(find(m, name, &[]).is_some(), "{name} missing: {m:#?}");
    }
    for scope in ["container", "hierarchy"] {
        let faults =
            find(m, "container_memory_failures_total", &["pgfault", scope]).expect("page faults");
        assert!(value(faults) > 0, "{faults:?}");
    }
    // Host-dependent readings: when there, they are right.
    if let Some(processes) = find(m, "container_processes", &[]) {
        assert!(value(processes) >= 1, "{processes:?}");
    }
    if let Some(oom) = find(m, "container_oom_events_total", &[]) {
        assert_eq!(value(oom), 0, "nothing was OOM-killed");
    }

    let host = pods
        .iter()
        .find(|p| p.pod_sandbox_id == host_pod)
        .unwrap_or_else(|| panic!("pod {host_pod} missing from {pods:#?}"));
    assert!(
        host.metrics.is_empty(),
        "a hostNetwork pod has no network of its own: {:#?}",
        host.metrics
    );
    assert_eq!(host.container_metrics.len(), 1);
    assert_eq!(host.container_metrics[0].container_id, sleeper);
    assert!(
        find(
            &host.container_metrics[0].metrics,
            "container_memory_working_set_bytes",
            &[]
        )
        .is_some()
    );

    // A stopped container is no longer reported.
    rig.stop(&sleeper, 0).await;
    let pods = pod_metrics(&rig).await;
    let host = pods
        .iter()
        .find(|p| p.pod_sandbox_id == host_pod)
        .expect("the host pod is still ready");
    assert!(host.container_metrics.is_empty(), "{host:#?}");
    rig.finish().await;
}
