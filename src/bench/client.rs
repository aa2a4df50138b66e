//! The bench's CRI client: one connection to one endpoint, each RPC timed
//! with `Instant` around the call alone, and a record of everything the bench
//! made there so that it can all be removed again.

use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, CreateContainerRequest, ExecSyncRequest, Image, ImageFsInfoRequest, ImageSpec,
    ImageStatusRequest, ListContainersRequest, ListContainersResponse, ListImagesRequest,
    ListPodSandboxRequest, ListPodSandboxResponse, PodSandboxConfig, PodSandboxFilter,
    PodSandboxStatusRequest, PullImageRequest, RemoveContainerRequest, RemoveImageRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StatusRequest,
    StopContainerRequest, StopPodSandboxRequest, VersionRequest, VersionResponse,
};
use prost::Message;
use serde::Serialize;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_prost::ProstEncoder;

use super::BenchError;

/// The path of a `unix://` endpoint (a bare absolute path is accepted too).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, BenchError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.is_empty() || !path.starts_with('/') {
        return Err(BenchError::Endpoint {
            endpoint: endpoint.to_string(),
            reason: "expected unix:///absolute/path.sock".to_string(),
        });
    }
    Ok(PathBuf::from(path))
}

/// A gRPC channel over the unix socket at `path`.
pub async fn connect(path: &Path) -> Result<Channel, BenchError> {
    let socket = path.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|source| BenchError::Connect {
            path: path.to_path_buf(),
            source,
        })
}

/// Why an endpoint stopped taking part: the first RPC that failed.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub op: String,
    /// The gRPC code (`Unimplemented`, `Unknown`, ...) or `DeadlineExceeded`
    /// for the bench's own timeout.
    pub code: String,
    pub message: String,
}

impl Failure {
    fn from_status(op: &str, status: &tonic::Status) -> Failure {
        Failure {
            op: op.to_string(),
            code: format!("{:?}", status.code()),
            message: status.message().to_string(),
        }
    }

    fn timeout(op: &str, limit: Duration) -> Failure {
        Failure {
            op: op.to_string(),
            code: "DeadlineExceeded".to_string(),
            message: format!("no answer within {}s (--timeout)", limit.as_secs()),
        }
    }

    pub fn other(op: &str, message: String) -> Failure {
        Failure {
            op: op.to_string(),
            code: "Unknown".to_string(),
            message,
        }
    }

    /// The runtime does not implement this RPC yet: a fact to report, not
    /// an error of the run.
    pub fn is_unimplemented(&self) -> bool {
        self.code == "Unimplemented"
    }

    fn is_not_found(&self) -> bool {
        self.code == "NotFound"
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.op, self.code, self.message)
    }
}

/// What the bench made on one endpoint and has not removed yet.
#[derive(Debug, Default)]
pub struct Tracker {
    pub pods: BTreeSet<String>,
    /// Container ID → its pod's ID.
    pub containers: BTreeMap<String, String>,
}

/// One connection to one endpoint. Cheap to clone: clones share the
/// HTTP/2 connection and the tracker.
#[derive(Clone)]
pub struct Conn {
    channel: Channel,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    timeout: Duration,
    pub tracker: Arc<Mutex<Tracker>>,
}

const LIST_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/ListPodSandbox";
const LIST_CONTAINERS: &str = "/runtime.v1.RuntimeService/ListContainers";

/// The largest list answer the bench takes (the generated client's default,
/// 4 MiB, is ~9000 containers).
const MAX_LIST_BYTES: usize = 256 << 20;

/// A list call's answer: its length, and the time to its last byte and to
/// its decoded message.
pub struct Listed {
    pub count: usize,
    pub received: Duration,
    pub decoded: Duration,
}

/// `ListContainers` of `/runtime.v1.RuntimeService/ListContainers`.
fn op_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Encodes requests with prost and keeps answers encoded.
struct RawCodec<Q>(PhantomData<Q>);

impl<Q> Default for RawCodec<Q> {
    fn default() -> Self {
        RawCodec(PhantomData)
    }
}

impl<Q: prost::Message + Send + 'static> Codec for RawCodec<Q> {
    type Encode = Q;
    type Decode = Bytes;
    type Encoder = ProstEncoder<Q>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> ProstEncoder<Q> {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// Awaits one RPC with the bench's timeout; the duration is of the call alone.
async fn timed<T>(
    op: &str,
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<(T, Duration), Failure> {
    let start = Instant::now();
    let result = tokio::time::timeout(limit, call).await;
    let elapsed = start.elapsed();
    match result {
        Ok(Ok(response)) => Ok((response.into_inner(), elapsed)),
        Ok(Err(status)) => Err(Failure::from_status(op, &status)),
        Err(_) => Err(Failure::timeout(op, limit)),
    }
}

fn request<T>(message: T, limit: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(limit);
    request
}

fn image_spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

impl Conn {
    pub fn new(channel: Channel, timeout: Duration) -> Conn {
        Conn {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel.clone()),
            channel,
            timeout,
            tracker: Arc::new(Mutex::new(Tracker::default())),
        }
    }

    /// The same tracker on another connection (for concurrent clients).
    pub fn with_channel(&self, channel: Channel) -> Conn {
        Conn {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel.clone()),
            channel,
            timeout: self.timeout,
            tracker: self.tracker.clone(),
        }
    }

    fn track(&self, f: impl FnOnce(&mut Tracker)) {
        f(&mut self.tracker.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// (runtime name, runtime version).
    pub async fn version(&mut self) -> Result<(String, String), Failure> {
        let (v, _) = self.version_answer().await?;
        Ok((v.runtime_name, v.runtime_version))
    }

    /// Version, timed.
    pub async fn version_timed(&mut self) -> Result<Duration, Failure> {
        Ok(self.version_answer().await?.1)
    }

    async fn version_answer(&mut self) -> Result<(VersionResponse, Duration), Failure> {
        let call = self.runtime.version(request(
            VersionRequest {
                version: "v1".to_string(),
            },
            self.timeout,
        ));
        timed("Version", self.timeout, call).await
    }

    /// Status without verbose, as kubelet asks it.
    pub async fn status(&mut self) -> Result<Duration, Failure> {
        let call = self
            .runtime
            .status(request(StatusRequest { verbose: false }, self.timeout));
        Ok(timed("Status", self.timeout, call).await?.1)
    }

    pub async fn list_images(&mut self) -> Result<Duration, Failure> {
        let call = self
            .images
            .list_images(request(ListImagesRequest { filter: None }, self.timeout));
        Ok(timed("ListImages", self.timeout, call).await?.1)
    }

    pub async fn image_fs_info(&mut self) -> Result<Duration, Failure> {
        let call = self
            .images
            .image_fs_info(request(ImageFsInfoRequest {}, self.timeout));
        Ok(timed("ImageFsInfo", self.timeout, call).await?.1)
    }

    pub async fn run_pod(
        &mut self,
        config: &PodSandboxConfig,
    ) -> Result<(String, Duration), Failure> {
        let call = self.runtime.run_pod_sandbox(request(
            RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            },
            self.timeout,
        ));
        let (r, d) = timed("RunPodSandbox", self.timeout, call).await?;
        self.track(|t| {
            t.pods.insert(r.pod_sandbox_id.clone());
        });
        Ok((r.pod_sandbox_id, d))
    }

    pub async fn create_container(
        &mut self,
        pod: &str,
        config: &ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> Result<(String, Duration), Failure> {
        let call = self.runtime.create_container(request(
            CreateContainerRequest {
                pod_sandbox_id: pod.to_string(),
                config: Some(config.clone()),
                sandbox_config: Some(sandbox.clone()),
            },
            self.timeout,
        ));
        let (r, d) = timed("CreateContainer", self.timeout, call).await?;
        self.track(|t| {
            t.containers.insert(r.container_id.clone(), pod.to_string());
        });
        Ok((r.container_id, d))
    }

    pub async fn start_container(&mut self, id: &str) -> Result<Duration, Failure> {
        let call = self.runtime.start_container(request(
            StartContainerRequest {
                container_id: id.to_string(),
            },
            self.timeout,
        ));
        Ok(timed("StartContainer", self.timeout, call).await?.1)
    }

    /// ExecSync; a non-zero exit is a failure (the command is `true`).
    pub async fn exec_sync(&mut self, id: &str, cmd: &[&str]) -> Result<Duration, Failure> {
        let call = self.runtime.exec_sync(request(
            ExecSyncRequest {
                container_id: id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 10,
            },
            self.timeout,
        ));
        let (r, d) = timed("ExecSync", self.timeout, call).await?;
        if r.exit_code != 0 {
            return Err(Failure::other(
                "ExecSync",
                format!(
                    "{cmd:?} exited with {}: {}",
                    r.exit_code,
                    String::from_utf8_lossy(&r.stderr).trim()
                ),
            ));
        }
        Ok(d)
    }

    pub async fn stop_container(&mut self, id: &str, timeout_s: i64) -> Result<Duration, Failure> {
        let call = self.runtime.stop_container(request(
            StopContainerRequest {
                container_id: id.to_string(),
                timeout: timeout_s,
            },
            self.timeout,
        ));
        Ok(timed("StopContainer", self.timeout, call).await?.1)
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<Duration, Failure> {
        let call = self.runtime.remove_container(request(
            RemoveContainerRequest {
                container_id: id.to_string(),
            },
            self.timeout,
        ));
        let (_, d) = timed("RemoveContainer", self.timeout, call).await?;
        self.track(|t| {
            t.containers.remove(id);
        });
        Ok(d)
    }

    pub async fn stop_pod(&mut self, id: &str) -> Result<Duration, Failure> {
        let call = self.runtime.stop_pod_sandbox(request(
            StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            },
            self.timeout,
        ));
        Ok(timed("StopPodSandbox", self.timeout, call).await?.1)
    }

    /// RemovePodSandbox; it removes the pod's containers too (CRI).
    pub async fn remove_pod(&mut self, id: &str) -> Result<Duration, Failure> {
        let call = self.runtime.remove_pod_sandbox(request(
            RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            },
            self.timeout,
        ));
        let (_, d) = timed("RemovePodSandbox", self.timeout, call).await?;
        self.track(|t| {
            t.pods.remove(id);
            t.containers.retain(|_, pod| pod != id);
        });
        Ok(d)
    }

    /// ListPodSandbox without a filter (as kubelet's relist does).
    pub async fn list_pods(&mut self) -> Result<Listed, Failure> {
        let request = ListPodSandboxRequest { filter: None };
        self.list(LIST_POD_SANDBOX, request, |b| {
            ListPodSandboxResponse::decode(b).map(|r| r.items.len())
        })
        .await
    }

    /// ListContainers without a filter (as kubelet's relist does).
    pub async fn list_containers(&mut self) -> Result<Listed, Failure> {
        let request = ListContainersRequest { filter: None };
        self.list(LIST_CONTAINERS, request, |b| {
            ListContainersResponse::decode(b).map(|r| r.containers.len())
        })
        .await
    }

    /// A list call, timed to its answer's last byte and again with `count`
    /// decoding the answer.
    async fn list<Q: prost::Message + Send + Sync + 'static>(
        &self,
        path: &'static str,
        request: Q,
        count: impl FnOnce(&[u8]) -> Result<usize, prost::DecodeError>,
    ) -> Result<Listed, Failure> {
        let (encoded, received) = self.unary_raw(path, request).await?;
        let start = Instant::now();
        let count =
            count(&encoded).map_err(|e| Failure::other(op_name(path), format!("decode: {e}")))?;
        Ok(Listed {
            count,
            received,
            decoded: received + start.elapsed(),
        })
    }

    /// A unary call whose answer is kept as the bytes it came in, timed to
    /// its last byte: a list's decoding is the client's work, the same for
    /// every endpoint, and at 1000 containers it is larger than the
    /// runtime's part (docs/performance.md, session 6).
    async fn unary_raw<Q: prost::Message + Send + Sync + 'static>(
        &self,
        path: &'static str,
        message: Q,
    ) -> Result<(Bytes, Duration), Failure> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(MAX_LIST_BYTES);
        let limit = self.timeout;
        let call = async move {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
            grpc.unary(
                request(message, limit),
                PathAndQuery::from_static(path),
                RawCodec::<Q>::default(),
            )
            .await
        };
        timed(op_name(path), limit, call).await
    }

    /// IDs of the pods carrying `label=value`.
    pub async fn pods_labelled(
        &mut self,
        label: &str,
        value: &str,
    ) -> Result<Vec<String>, Failure> {
        let filter = PodSandboxFilter {
            label_selector: [(label.to_string(), value.to_string())].into(),
            ..Default::default()
        };
        let call = self.runtime.list_pod_sandbox(request(
            ListPodSandboxRequest {
                filter: Some(filter),
            },
            self.timeout,
        ));
        let (r, _) = timed("ListPodSandbox", self.timeout, call).await?;
        Ok(r.items.into_iter().map(|p| p.id).collect())
    }

    /// The pid of the pod's infra process, where the runtime reports one in
    /// its verbose status (containerd's pause: `info.pid`).
    pub async fn pod_infra_pid(&mut self, id: &str) -> Option<i32> {
        let call = self.runtime.pod_sandbox_status(request(
            PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: true,
            },
            self.timeout,
        ));
        let (r, _) = timed("PodSandboxStatus", self.timeout, call).await.ok()?;
        let info: serde_json::Value = serde_json::from_str(r.info.get("info")?).ok()?;
        let pid = info.get("pid")?.as_i64()?;
        i32::try_from(pid).ok().filter(|&p| p > 0)
    }

    pub async fn pull(&mut self, image: &str) -> Result<Duration, Failure> {
        let call = self.images.pull_image(request(
            PullImageRequest {
                image: image_spec(image),
                ..Default::default()
            },
            self.timeout,
        ));
        Ok(timed("PullImage", self.timeout, call).await?.1)
    }

    /// RemoveImage; an image that is not there is no error.
    pub async fn remove_image(&mut self, image: &str) -> Result<Duration, Failure> {
        let call = self.images.remove_image(request(
            RemoveImageRequest {
                image: image_spec(image),
            },
            self.timeout,
        ));
        match timed("RemoveImage", self.timeout, call).await {
            Ok((_, d)) => Ok(d),
            Err(f) if f.is_not_found() => Ok(Duration::ZERO),
            Err(f) => Err(f),
        }
    }

    pub async fn image_status(&mut self, image: &str) -> Result<Option<Image>, Failure> {
        let call = self.images.image_status(request(
            ImageStatusRequest {
                image: image_spec(image),
                verbose: false,
            },
            self.timeout,
        ));
        Ok(timed("ImageStatus", self.timeout, call).await?.0.image)
    }

    /// Best-effort removal of everything the tracker holds and of any pod
    /// labelled with this run (one whose RunPodSandbox answer was lost).
    pub async fn clean_up(&mut self, run_label: (&str, &str)) -> Cleanup {
        let mut report = Cleanup::default();
        let (containers, mut pods): (Vec<String>, BTreeSet<String>) = {
            let t = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
            (t.containers.keys().cloned().collect(), t.pods.clone())
        };
        for id in containers {
            let _ = self.stop_container(&id, 0).await;
            match self.remove_container(&id).await {
                Ok(_) => report.containers += 1,
                Err(f) if f.is_not_found() => self.track(|t| {
                    t.containers.remove(&id);
                }),
                Err(f) => report.errors.push(format!("container {id}: {f}")),
            }
        }
        match self.pods_labelled(run_label.0, run_label.1).await {
            Ok(found) => pods.extend(found),
            Err(f) if f.is_unimplemented() => {}
            Err(f) => report.errors.push(format!("list this run's pods: {f}")),
        }
        for id in pods {
            if let Err(f) = self.stop_pod(&id).await
                && !f.is_not_found()
            {
                report.errors.push(format!("pod {id}: {f}"));
            }
            match self.remove_pod(&id).await {
                Ok(_) => report.pods += 1,
                Err(f) if f.is_not_found() => self.track(|t| {
                    t.pods.remove(&id);
                }),
                Err(f) => report.errors.push(format!("pod {id}: {f}")),
            }
        }
        report
    }
}

/// What the final clean-up removed and what it could not.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Cleanup {
    pub pods: usize,
    pub containers: usize,
    pub image_removed: bool,
    pub errors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_unix_urls_or_absolute_paths() {
        assert_eq!(
            socket_path("unix:///run/berth/berth.sock").expect("url"),
            PathBuf::from("/run/berth/berth.sock")
        );
        assert_eq!(
            socket_path("/tmp/x.sock").expect("path"),
            PathBuf::from("/tmp/x.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1234").is_err());
        assert!(socket_path("unix://relative.sock").is_err());
        assert!(socket_path("").is_err());
    }

    #[test]
    fn unimplemented_is_told_apart() {
        let f = Failure::from_status("RunPodSandbox", &tonic::Status::unimplemented("later"));
        assert!(f.is_unimplemented());
        assert_eq!(f.to_string(), "RunPodSandbox: Unimplemented: later");
        let f = Failure::from_status("RunPodSandbox", &tonic::Status::internal("boom"));
        assert!(!f.is_unimplemented());
    }
}
