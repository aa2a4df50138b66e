//! The container RPCs of `runtime.v1.RuntimeService`: translation between
//! CRI messages and the container manager.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1::*;

use crate::container::{ContainerManager, ContainerRecord, ContainerState as State, labels_match};

fn state_of(c: &ContainerRecord) -> ContainerState {
    match c.state {
        State::Creating | State::Created => ContainerState::ContainerCreated,
        State::Running => ContainerState::ContainerRunning,
        State::Exited => ContainerState::ContainerExited,
        State::Unknown => ContainerState::ContainerUnknown,
    }
}

fn image_spec(c: &ContainerRecord) -> ImageSpec {
    c.config.image.clone().unwrap_or_default()
}

pub fn to_cri(c: &ContainerRecord) -> Container {
    Container {
        id: c.id.clone(),
        pod_sandbox_id: c.pod_id.clone(),
        metadata: c.config.metadata.clone(),
        image: Some(image_spec(c)),
        // The image ID, as containerd answers here (its ContainerStatus, like
        // ours, gives the digest reference): kubelets before 1.30 have no
        // `image_id` and take a listed container's `image_ref` as its image
        // ID, which image garbage collection matches against ListImages.
        image_ref: c.image_id.clone(),
        state: state_of(c) as i32,
        created_at: c.created_at,
        labels: c.config.labels.clone(),
        annotations: c.config.annotations.clone(),
        // Left empty, as containerd leaves it: kubelet takes `image_ref` as
        // the image ID when `image_id` is empty, and here they would be the
        // same 71 bytes, a sixth of each container in kubelet's relist
        // (docs/performance.md, session 12).
        image_id: String::new(),
    }
}

pub fn status(c: &ContainerRecord, verbose: bool) -> ContainerStatusResponse {
    let mut info = HashMap::new();
    if verbose {
        let spec: Option<serde_json::Value> = std::fs::read(c.bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let details = serde_json::json!({
            "pid": c.pid,
            "sandboxID": c.pod_id,
            "runtimeSpec": spec,
            "logPath": c.log_path,
        });
        info.insert("info".to_string(), details.to_string());
    }
    ContainerStatusResponse {
        status: Some(ContainerStatus {
            id: c.id.clone(),
            metadata: c.config.metadata.clone(),
            state: state_of(c) as i32,
            created_at: c.created_at,
            started_at: c.started_at,
            finished_at: c.finished_at,
            exit_code: c.exit_code,
            image: Some(image_spec(c)),
            image_ref: c.image_ref.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            mounts: c.config.mounts.clone(),
            log_path: c.log_path.display().to_string(),
            resources: c
                .config
                .linux
                .as_ref()
                .and_then(|l| l.resources.clone())
                .map(|r| ContainerResources {
                    linux: Some(r),
                    windows: None,
                }),
            image_id: c.image_id.clone(),
            user: Some(ContainerUser {
                linux: Some(LinuxContainerUser {
                    uid: i64::from(c.uid),
                    gid: i64::from(c.gid),
                    supplemental_groups: c.additional_gids.iter().map(|g| i64::from(*g)).collect(),
                }),
            }),
        }),
        info,
    }
}

/// The containers ListContainers answers with `filter`, in id order.
pub async fn list(
    manager: &ContainerManager,
    filter: Option<ContainerFilter>,
) -> Result<Vec<Arc<ContainerRecord>>, crate::container::ContainerError> {
    let filter = filter.unwrap_or_default();
    let mut listed = manager.listed().await?;
    if filter == ContainerFilter::default() {
        // kubelet's relist: nothing to test, and no record to read.
        return Ok(listed);
    }
    listed.retain(|c| {
        (filter.id.is_empty() || c.id.starts_with(&filter.id))
            && (filter.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&filter.pod_sandbox_id))
            && filter.state.is_none_or(|s| s.state == state_of(c) as i32)
            && labels_match(&c.config.labels, &filter.label_selector)
    });
    Ok(listed)
}
