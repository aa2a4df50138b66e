//! The pod sandbox RPCs of `runtime.v1.RuntimeService`: translation between
//! CRI messages and the sandbox manager.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1::*;
use tonic::Status;

use super::error::invalid;
use crate::sandbox::{PodRecord, PodState, SandboxManager, labels_match};

fn state_of(pod: &PodRecord) -> PodSandboxState {
    match pod.state {
        PodState::Ready => PodSandboxState::SandboxReady,
        PodState::Creating | PodState::NotReady => PodSandboxState::SandboxNotready,
    }
}

fn namespace_options(pod: &PodRecord) -> NamespaceOption {
    pod.config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default()
}

pub async fn run(
    manager: &Arc<SandboxManager>,
    request: RunPodSandboxRequest,
) -> Result<RunPodSandboxResponse, Status> {
    let config = request
        .config
        .ok_or_else(|| invalid("config", "a pod sandbox config is required"))?;
    let pod = manager.run(config, &request.runtime_handler).await?;
    Ok(RunPodSandboxResponse {
        pod_sandbox_id: pod.id,
    })
}

pub fn status(
    sandboxes: &SandboxManager,
    pod: &PodRecord,
    verbose: bool,
) -> Result<PodSandboxStatusResponse, Status> {
    let network = pod.network.as_ref().map(|n| {
        let mut ips = n.ips.iter().map(ToString::to_string);
        PodSandboxNetworkStatus {
            ip: ips.next().unwrap_or_default(),
            additional_ips: ips.map(|ip| PodIp { ip }).collect(),
        }
    });
    let mut info = HashMap::new();
    if verbose {
        let details = serde_json::json!({
            "netns": sandboxes.namespace_path(pod, "net"),
            "ipcns": sandboxes.namespace_path(pod, "ipc"),
            "utsns": sandboxes.namespace_path(pod, "uts"),
            "cniResult": pod.network.as_ref().map(|n| &n.result),
            "runtimeHandler": pod.runtime_handler,
            "config": pod.config,
        });
        info.insert("info".to_string(), details.to_string());
    }
    Ok(PodSandboxStatusResponse {
        status: Some(PodSandboxStatus {
            id: pod.id.clone(),
            metadata: pod.config.metadata.clone(),
            state: state_of(pod) as i32,
            created_at: pod.created_at,
            network: Some(network.unwrap_or_default()),
            linux: Some(LinuxPodSandboxStatus {
                namespaces: Some(Namespace {
                    options: Some(namespace_options(pod)),
                }),
            }),
            labels: pod.config.labels.clone(),
            annotations: pod.config.annotations.clone(),
            runtime_handler: pod.runtime_handler.clone(),
        }),
        info,
        containers_statuses: Vec::new(),
        timestamp: crate::ids::now_ns(),
    })
}

/// The pods ListPodSandbox answers with `filter`, in id order.
pub async fn list(
    manager: &SandboxManager,
    filter: Option<PodSandboxFilter>,
) -> Result<Vec<Arc<PodRecord>>, Status> {
    let filter = filter.unwrap_or_default();
    let mut listed = manager.all().await?;
    if filter == PodSandboxFilter::default() {
        // kubelet's relist: nothing to test, and no record to read.
        return Ok(listed);
    }
    listed.retain(|pod| {
        (filter.id.is_empty() || pod.id.starts_with(&filter.id))
            && filter.state.is_none_or(|s| s.state == state_of(pod) as i32)
            && labels_match(&pod.config.labels, &filter.label_selector)
    });
    Ok(listed)
}

/// A pod as ListPodSandbox shows it.
pub fn to_cri(pod: &PodRecord) -> PodSandbox {
    PodSandbox {
        state: state_of(pod) as i32,
        id: pod.id.clone(),
        metadata: pod.config.metadata.clone(),
        created_at: pod.created_at,
        labels: pod.config.labels.clone(),
        annotations: pod.config.annotations.clone(),
        runtime_handler: pod.runtime_handler.clone(),
    }
}
