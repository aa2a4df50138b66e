//! Container and pod statistics: cgroup counters, CPU rate, writable layer
//! and pod network usage, in the CRI's shapes (cadvisor's meanings).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1::*;
use tonic::Status;

use crate::container::{ContainerManager, ContainerRecord, ContainerUsage, labels_match};
use crate::daemon::Daemon;
use crate::sandbox::PodRecord;

fn value(v: u64) -> Option<UInt64Value> {
    Some(UInt64Value { value: v })
}

fn cpu_and_memory(
    usage: &ContainerUsage,
) -> (Option<CpuUsage>, Option<MemoryUsage>, Option<SwapUsage>) {
    let stats = usage.cgroup.as_ref();
    let cpu = stats.and_then(|s| s.cpu.as_ref()).map(|c| CpuUsage {
        timestamp: usage.timestamp,
        usage_core_nano_seconds: value(c.usage_ns),
        usage_nano_cores: usage.nano_cores.and_then(value),
    });
    let memory = stats.and_then(|s| s.memory.as_ref()).map(|m| MemoryUsage {
        timestamp: usage.timestamp,
        working_set_bytes: value(m.working_set_bytes),
        available_bytes: m.available_bytes().and_then(value),
        usage_bytes: value(m.usage_bytes),
        rss_bytes: value(m.rss_bytes),
        page_faults: value(m.page_faults),
        major_page_faults: value(m.major_page_faults),
    });
    let swap = stats
        .and_then(|s| s.memory.as_ref())
        .and_then(|m| m.swap_bytes)
        .map(|bytes| SwapUsage {
            timestamp: usage.timestamp,
            swap_available_bytes: None,
            swap_usage_bytes: value(bytes),
        });
    (cpu, memory, swap)
}

pub async fn container(
    manager: &ContainerManager,
    c: &ContainerRecord,
) -> Result<ContainerStats, Status> {
    let usage = manager.usage(c).await?;
    let (cpu, memory, swap) = cpu_and_memory(&usage);
    Ok(ContainerStats {
        attributes: Some(ContainerAttributes {
            id: c.id.clone(),
            metadata: c.config.metadata.clone(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
        }),
        cpu,
        memory,
        writable_layer: Some(FilesystemUsage {
            timestamp: usage.timestamp,
            fs_id: Some(FilesystemIdentifier {
                mountpoint: usage.writable_layer_mount.display().to_string(),
            }),
            used_bytes: value(usage.writable_layer.bytes),
            inodes_used: value(usage.writable_layer.inodes),
        }),
        swap,
    })
}

pub async fn list_containers(
    manager: &ContainerManager,
    filter: Option<ContainerStatsFilter>,
) -> Result<Vec<ContainerStats>, Status> {
    let filter = filter.unwrap_or_default();
    let mut out = Vec::new();
    for c in manager.all().await? {
        // Stats are of running containers, as containerd lists them.
        if c.state != crate::container::ContainerState::Running
            || (!filter.id.is_empty() && !c.id.starts_with(&filter.id))
            || (!filter.pod_sandbox_id.is_empty() && !c.pod_id.starts_with(&filter.pod_sandbox_id))
            || !labels_match(&c.config.labels, &filter.label_selector)
        {
            continue;
        }
        out.push(container(manager, &c).await?);
    }
    Ok(out)
}

/// The running containers of each pod, by pod id, from one listing: per
/// pod, a listing of every container made ListPodSandboxStats quadratic.
pub async fn running_by_pod(
    manager: &ContainerManager,
) -> Result<HashMap<String, Vec<Arc<ContainerRecord>>>, Status> {
    let mut by_pod: HashMap<String, Vec<Arc<ContainerRecord>>> = HashMap::new();
    for c in manager.all().await? {
        if c.state == crate::container::ContainerState::Running {
            by_pod.entry(c.pod_id.clone()).or_default().push(c);
        }
    }
    Ok(by_pod)
}

/// The stats of `pod`, whose running containers are `running`.
pub async fn pod(
    daemon: &Daemon,
    pod: &PodRecord,
    running: &[Arc<ContainerRecord>],
) -> Result<PodSandboxStats, Status> {
    let mut containers = Vec::with_capacity(running.len());
    for c in running {
        containers.push(container(&daemon.containers, c).await?);
    }
    let timestamp = crate::ids::now_ns();
    // The pod cgroup holds all its containers: kubelet's or berth's.
    let parent = pod.cgroup_parent();
    let pod_usage = match (daemon.containers.cgroups(), parent.is_empty()) {
        (Some(cgroups), false) => {
            let cgroup = cgroups
                .pod_path(&parent)
                .map(|p| cgroups.open(&p))
                .map_err(|e| Status::internal(e.to_string()))?;
            tokio::task::spawn_blocking(move || cgroup.stats().ok())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
        }
        _ => None,
    };
    let usage = ContainerUsage {
        timestamp,
        cgroup: pod_usage.clone(),
        ..ContainerUsage::default()
    };
    let (cpu, memory, _) = cpu_and_memory(&usage);
    let network = match daemon.sandboxes.namespace_path(pod, "net") {
        Some(netns) => {
            let interfaces: Vec<NetworkInterfaceUsage> = daemon
                .network
                .stats(&netns)
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .into_iter()
                .map(|i| NetworkInterfaceUsage {
                    name: i.name,
                    rx_bytes: value(i.rx_bytes),
                    rx_errors: value(i.rx_errors),
                    tx_bytes: value(i.tx_bytes),
                    tx_errors: value(i.tx_errors),
                })
                .collect();
            Some(NetworkUsage {
                timestamp,
                default_interface: interfaces.iter().find(|i| i.name == "eth0").cloned(),
                interfaces,
            })
        }
        None => None,
    };
    let process = pod_usage
        .as_ref()
        .and_then(|s| s.pids.as_ref())
        .map(|p| ProcessUsage {
            timestamp,
            process_count: value(p.current),
        });
    Ok(PodSandboxStats {
        attributes: Some(PodSandboxAttributes {
            id: pod.id.clone(),
            metadata: pod.config.metadata.clone(),
            labels: pod.config.labels.clone(),
            annotations: pod.config.annotations.clone(),
        }),
        linux: Some(LinuxPodSandboxStats {
            cpu,
            memory,
            network,
            process,
            containers,
        }),
        windows: None,
    })
}
