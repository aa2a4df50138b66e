//! `runtime.v1.RuntimeService`: runtime-wide RPCs answered here; pod,
//! container, stats, metrics and streaming RPCs handed to the file of
//! their group.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use k8s_cri::v1::runtime_service_server::RuntimeService;
use k8s_cri::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::error::invalid;
use super::list::Lists;
use super::{container, metrics, sandbox, stats, streaming};

use crate::config::CgroupDriver as ConfigCgroupDriver;
use crate::daemon::Daemon;
use crate::network::Readiness;

/// The CRI API version berth speaks, as kubelet's `Version` call expects.
const KUBE_API_VERSION: &str = "0.1.0";
const RUNTIME_NAME: &str = "berth";
const RUNTIME_API_VERSION: &str = "v1";

pub struct Runtime {
    daemon: Arc<Daemon>,
    lists: Arc<Lists>,
}

impl Runtime {
    pub fn new(daemon: Arc<Daemon>, lists: Arc<Lists>) -> Self {
        Runtime { daemon, lists }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

fn condition(kind: &str, readiness: Readiness) -> RuntimeCondition {
    RuntimeCondition {
        r#type: kind.to_string(),
        status: readiness.ready,
        reason: readiness.reason,
        message: readiness.message,
    }
}

#[tonic::async_trait]
impl RuntimeService for Runtime {
    async fn version(
        &self,
        _request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: KUBE_API_VERSION.to_string(),
            runtime_name: RUNTIME_NAME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
            runtime_api_version: RUNTIME_API_VERSION.to_string(),
        }))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let daemon = self.daemon.clone();
        // Readiness reads directories (CNI configs, plugins): off the runtime.
        let (runtime_ready, network_ready) = tokio::task::spawn_blocking(move || {
            (daemon.runtime_readiness(), daemon.network_readiness())
        })
        .await
        .map_err(|e| Status::internal(format!("readiness check: {e}")))?;
        let mut info = HashMap::new();
        if request.get_ref().verbose {
            let config = serde_json::to_string(&self.daemon.config)
                .map_err(|e| Status::internal(format!("render config: {e}")))?;
            info.insert("config".to_string(), config);
            let cidrs = self.daemon.pod_cidrs();
            let cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
            info.insert(
                "podCIDRs".to_string(),
                serde_json::to_string(&cidrs)
                    .map_err(|e| Status::internal(format!("render pod CIDRs: {e}")))?,
            );
            info.insert(
                "streamingURL".to_string(),
                self.daemon.streaming.base_url().to_string(),
            );
        }
        Ok(Response::new(StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![
                    condition("RuntimeReady", runtime_ready),
                    condition("NetworkReady", network_ready),
                ],
            }),
            info,
            // The default handler only. Recursive read-only mounts
            // (mount_setattr), pod user namespaces and the Strict
            // supplemental-groups policy are built; user namespaces are
            // claimed where they work (`Daemon::user_namespaces`).
            runtime_handlers: vec![RuntimeHandler {
                name: String::new(),
                features: Some(RuntimeHandlerFeatures {
                    recursive_read_only_mounts: true,
                    user_namespaces: self.daemon.user_namespaces,
                }),
            }],
            features: Some(RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
        }))
    }

    async fn runtime_config(
        &self,
        _request: Request<RuntimeConfigRequest>,
    ) -> Result<Response<RuntimeConfigResponse>, Status> {
        let driver = match self.daemon.config.cgroup_driver {
            ConfigCgroupDriver::Cgroupfs => CgroupDriver::Cgroupfs,
            ConfigCgroupDriver::Systemd => CgroupDriver::Systemd,
        };
        Ok(Response::new(RuntimeConfigResponse {
            linux: Some(LinuxRuntimeConfiguration {
                cgroup_driver: driver as i32,
            }),
        }))
    }

    async fn update_runtime_config(
        &self,
        request: Request<UpdateRuntimeConfigRequest>,
    ) -> Result<Response<UpdateRuntimeConfigResponse>, Status> {
        let pod_cidr = request
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        // kubelet sends nothing until the node has a pod CIDR; an empty value
        // leaves the current one as it is, as containerd does.
        if pod_cidr.trim().is_empty() {
            return Ok(Response::new(UpdateRuntimeConfigResponse {}));
        }
        let cidrs = parse_pod_cidrs(&pod_cidr)?;
        let daemon = self.daemon.clone();
        tokio::task::spawn_blocking(move || daemon.set_pod_cidrs(cidrs))
            .await
            .map_err(|e| Status::internal(format!("update pod CIDRs: {e}")))??;
        Ok(Response::new(UpdateRuntimeConfigResponse {}))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<RunPodSandboxRequest>,
    ) -> Result<Response<RunPodSandboxResponse>, Status> {
        Ok(Response::new(
            sandbox::run(&self.daemon.sandboxes, request.into_inner()).await?,
        ))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<StopPodSandboxRequest>,
    ) -> Result<Response<StopPodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        if id.is_empty() {
            return Err(invalid("pod_sandbox_id", "an id is required"));
        }
        // The pod's containers go first: kubelet has already given them
        // their grace period, so what still runs is killed.
        match self.daemon.sandboxes.get(&id).await {
            Ok(pod) => self.daemon.containers.for_pod(&pod.id, false).await?,
            Err(crate::sandbox::SandboxError::NotFound(_)) => {
                return Ok(Response::new(StopPodSandboxResponse {}));
            }
            Err(e) => return Err(e.into()),
        }
        self.daemon.sandboxes.stop(&id).await?;
        Ok(Response::new(StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<RemovePodSandboxRequest>,
    ) -> Result<Response<RemovePodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        if id.is_empty() {
            return Err(invalid("pod_sandbox_id", "an id is required"));
        }
        match self.daemon.sandboxes.get(&id).await {
            Ok(pod) => self.daemon.containers.for_pod(&pod.id, true).await?,
            Err(crate::sandbox::SandboxError::NotFound(_)) => {
                return Ok(Response::new(RemovePodSandboxResponse {}));
            }
            Err(e) => return Err(e.into()),
        }
        self.daemon.sandboxes.remove(&id).await?;
        Ok(Response::new(RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<PodSandboxStatusRequest>,
    ) -> Result<Response<PodSandboxStatusResponse>, Status> {
        let request = request.into_inner();
        let pod = self.daemon.sandboxes.get(&request.pod_sandbox_id).await?;
        Ok(Response::new(sandbox::status(
            &self.daemon.sandboxes,
            &pod,
            request.verbose,
        )?))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<ListPodSandboxRequest>,
    ) -> Result<Response<ListPodSandboxResponse>, Status> {
        // Served by `RuntimeServer` in front of this service; this is the
        // same answer as the generated type.
        let filter = request.into_inner().filter;
        Ok(Response::new(self.lists.pods_decoded(filter).await?))
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let request = request.into_inner();
        let config = request
            .config
            .ok_or_else(|| invalid("config", "a container config is required"))?;
        if request.pod_sandbox_id.is_empty() {
            return Err(invalid("pod_sandbox_id", "an id is required"));
        }
        let created = self
            .daemon
            .containers
            .create(&request.pod_sandbox_id, config)
            .await?;
        Ok(Response::new(CreateContainerResponse {
            container_id: created.id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        self.daemon.containers.start_container(&id).await?;
        Ok(Response::new(StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        let request = request.into_inner();
        if request.container_id.is_empty() {
            return Err(invalid("container_id", "an id is required"));
        }
        self.daemon
            .containers
            .stop(&request.container_id, request.timeout)
            .await?;
        Ok(Response::new(StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        if id.is_empty() {
            return Err(invalid("container_id", "an id is required"));
        }
        self.daemon.containers.remove(&id).await?;
        Ok(Response::new(RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        // Served by `RuntimeServer` in front of this service; this is the
        // same answer as the generated type.
        let filter = request.into_inner().filter;
        Ok(Response::new(self.lists.containers_decoded(filter).await?))
    }

    async fn container_status(
        &self,
        request: Request<ContainerStatusRequest>,
    ) -> Result<Response<ContainerStatusResponse>, Status> {
        let request = request.into_inner();
        let found = self.daemon.containers.get(&request.container_id).await?;
        Ok(Response::new(container::status(&found, request.verbose)))
    }

    async fn update_container_resources(
        &self,
        request: Request<UpdateContainerResourcesRequest>,
    ) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
        let request = request.into_inner();
        let resources = request
            .linux
            .ok_or_else(|| invalid("linux", "linux resources are required on this node"))?;
        self.daemon
            .containers
            .update_resources(&request.container_id, resources)
            .await?;
        Ok(Response::new(UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<ReopenContainerLogRequest>,
    ) -> Result<Response<ReopenContainerLogResponse>, Status> {
        let id = request.into_inner().container_id;
        self.daemon.containers.reopen_log(&id).await?;
        Ok(Response::new(ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<ExecSyncRequest>,
    ) -> Result<Response<ExecSyncResponse>, Status> {
        let request = request.into_inner();
        let output = self
            .daemon
            .containers
            .exec_sync(
                &request.container_id,
                &request.cmd,
                std::time::Duration::from_secs(u64::try_from(request.timeout).unwrap_or(0)),
            )
            .await?;
        Ok(Response::new(ExecSyncResponse {
            stdout: output.stdout,
            stderr: output.stderr,
            exit_code: output.exit_code,
        }))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        let response = streaming::exec(&self.daemon, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        let response = streaming::attach(&self.daemon, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn port_forward(
        &self,
        request: Request<PortForwardRequest>,
    ) -> Result<Response<PortForwardResponse>, Status> {
        let response = streaming::port_forward(&self.daemon, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn container_stats(
        &self,
        request: Request<ContainerStatsRequest>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        let id = request.into_inner().container_id;
        let found = self.daemon.containers.get(&id).await?;
        let stats = stats::container(&self.daemon.containers, &found).await?;
        Ok(Response::new(ContainerStatsResponse { stats: Some(stats) }))
    }

    async fn list_container_stats(
        &self,
        request: Request<ListContainerStatsRequest>,
    ) -> Result<Response<ListContainerStatsResponse>, Status> {
        let stats =
            stats::list_containers(&self.daemon.containers, request.into_inner().filter).await?;
        Ok(Response::new(ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<PodSandboxStatsRequest>,
    ) -> Result<Response<PodSandboxStatsResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let pod = self.daemon.sandboxes.get(&id).await?;
        let running = stats::running_by_pod(&self.daemon.containers)
            .await?
            .remove(&pod.id)
            .unwrap_or_default();
        let stats = stats::pod(&self.daemon, &pod, &running).await?;
        Ok(Response::new(PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<ListPodSandboxStatsRequest>,
    ) -> Result<Response<ListPodSandboxStatsResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let mut stats = Vec::new();
        let running = stats::running_by_pod(&self.daemon.containers).await?;
        for pod in self.daemon.sandboxes.all().await? {
            if pod.state != crate::sandbox::PodState::Ready
                || (!filter.id.is_empty() && !pod.id.starts_with(&filter.id))
                || !crate::sandbox::labels_match(&pod.config.labels, &filter.label_selector)
            {
                continue;
            }
            let containers = running.get(&pod.id).map_or(&[][..], Vec::as_slice);
            stats.push(stats::pod(&self.daemon, &pod, containers).await?);
        }
        Ok(Response::new(ListPodSandboxStatsResponse { stats }))
    }

    async fn checkpoint_container(
        &self,
        _request: Request<CheckpointContainerRequest>,
    ) -> Result<Response<CheckpointContainerResponse>, Status> {
        Err(Status::unimplemented(
            "CheckpointContainer is not supported by berth: container checkpoint/restore is not part of its runtime",
        ))
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _request: Request<GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let mut events = self.daemon.containers.events().subscribe();
        let daemon = self.daemon.clone();
        let stream = async_stream(move |tx| async move {
            while let Some(event) = events.next().await {
                let response = event_response(&daemon, event).await;
                if tx.send(Ok(response)).await.is_err() {
                    break; // the subscriber went away
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<ListMetricDescriptorsRequest>,
    ) -> Result<Response<ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(ListMetricDescriptorsResponse {
            descriptors: metrics::descriptors(),
        }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<ListPodSandboxMetricsRequest>,
    ) -> Result<Response<ListPodSandboxMetricsResponse>, Status> {
        Ok(Response::new(ListPodSandboxMetricsResponse {
            pod_metrics: metrics::list(&self.daemon).await?,
        }))
    }
}

/// A stream fed by a task; a full channel (slow reader) holds the task,
/// which in turn lets the broadcast drop that subscriber's oldest events.
fn async_stream<F, Fut>(produce: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<ContainerEventResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn event_response(daemon: &Daemon, event: crate::events::Event) -> ContainerEventResponse {
    use crate::events::EventKind;
    let kind = match event.kind {
        EventKind::Created => ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => ContainerEventType::ContainerDeletedEvent,
    };
    let pod_sandbox_status = match daemon.sandboxes.get(&event.pod_id).await {
        Ok(pod) => sandbox::status(&daemon.sandboxes, &pod, false)
            .ok()
            .and_then(|r| r.status),
        Err(_) => None,
    };
    let containers_statuses = match daemon.containers.listed().await {
        Ok(all) => all
            .iter()
            .filter(|c| c.pod_id == event.pod_id)
            .filter_map(|c| container::status(c, false).status)
            .collect(),
        Err(_) => Vec::new(),
    };
    ContainerEventResponse {
        container_id: event.container_id,
        container_event_type: kind as i32,
        created_at: event.at,
        pod_sandbox_status,
        containers_statuses,
    }
}

/// kubelet sends one CIDR, or two separated by a comma on dual-stack nodes.
fn parse_pod_cidrs(value: &str) -> Result<Vec<ipnet::IpNet>, Status> {
    const FIELD: &str = "runtime_config.network_config.pod_cidr";
    if value.len() > 256 {
        return Err(invalid(FIELD, "longer than 256 bytes"));
    }
    let cidrs: Vec<ipnet::IpNet> = value
        .split(',')
        .map(|part| {
            let part = part.trim();
            part.parse::<ipnet::IpNet>()
                .map_err(|e| invalid(FIELD, format!("{part:?} is not a CIDR: {e}")))
        })
        .collect::<Result<_, _>>()?;
    if cidrs.len() > 2 {
        return Err(invalid(
            FIELD,
            "at most one IPv4 and one IPv6 CIDR are allowed",
        ));
    }
    if cidrs.len() == 2 && cidrs[0].addr().is_ipv4() == cidrs[1].addr().is_ipv4() {
        return Err(invalid(FIELD, "two CIDRs must be one IPv4 and one IPv6"));
    }
    Ok(cidrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidr_accepts_single_and_dual_stack() {
        assert_eq!(parse_pod_cidrs("10.1.0.0/24").expect("v4").len(), 1);
        assert_eq!(
            parse_pod_cidrs("10.1.0.0/24, fd00::/64")
                .expect("dual")
                .len(),
            2
        );
    }

    #[test]
    fn pod_cidr_rejects_garbage_and_two_of_a_family() {
        for bad in [
            "10.1.0.0",
            "nonsense",
            "10.0.0.0/24,10.1.0.0/24",
            "1.0.0.0/8,fd00::/64,2.0.0.0/8",
        ] {
            let status = parse_pod_cidrs(bad).expect_err(bad);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(
                status.message().contains("pod_cidr"),
                "{bad}: {}",
                status.message()
            );
        }
    }
}
