//! Pod sandboxes: the namespaces, cgroup, files and network a pod's
//! containers share. No pause image and no process: namespaces are pinned
//! by bind mounts, in a mount namespace of their own (`pin_ns`).
//!
//! The record is written before anything is made (state `Creating`) so a
//! crash at any step is undone on the next start; every step of
//! RunPodSandbox registers its undo, and a failed run leaves nothing, not
//! even the name reservation.

pub mod files;
pub mod infra;
pub mod namespaces;
pub mod pin_ns;
pub mod resources;
pub mod userns;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_cri::v1::{
    IdMapping, NamespaceMode, NamespaceOption, PodSandboxConfig, PortMapping as CriPortMapping,
    Protocol as CriProtocol,
};
use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

use crate::executor::cgroups::{CgroupError, CgroupManager};
use crate::ids::{Lookup, now_ns};
use crate::locks::KeyedLocks;
use crate::network::{
    Bandwidth, Network, NetworkError, PodNetworkRequest, PodNetworkStatus, PortMapping, Protocol,
    bandwidth,
};
use crate::store::{Cached, Kind, Store, StoreError};
use files::{Dns, FilesError};
use namespaces::{PinError, PinRequest, UserNamespaceMaps};
use pin_ns::PinNamespace;

/// Runtime handler names that mean berth's own executor.
pub const HANDLERS: &[&str] = &["", "berth"];
const MAX_NAME_BYTES: usize = 253;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("pod sandbox {name} already exists with id {id}")]
    NameTaken { name: String, id: String },
    #[error("pod sandbox {0} not found")]
    NotFound(String),
    #[error("pod sandbox id prefix {prefix:?} matches several pods: {ids}")]
    Ambiguous { prefix: String, ids: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Infra(#[from] infra::InfraError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox task failed: {0}")]
    Task(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    /// Being made; undone on restart if the daemon died meanwhile.
    Creating,
    Ready,
    NotReady,
}

/// What the metadata store keeps of a pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    /// kubelet's config as sent; containers read labels, log dir, DNS and
    /// security settings from it.
    pub config: PodSandboxConfig,
    pub runtime_handler: String,
    pub state: PodState,
    pub created_at: i64,
    pub dir: PathBuf,
    pub namespaces: PinRecord,
    /// The pins are in the pins' own mount namespace (`pin_ns`). Pods made
    /// by berth before it have theirs under `dir/ns` in the daemon's.
    #[serde(default)]
    pub pins_apart: bool,
    pub network: Option<NetworkRecord>,
    /// The pod cgroup, when berth made it (kubelet usually has). Only such
    /// a cgroup gets the request's resources and overhead ([`resources`]).
    pub created_cgroup: Option<String>,
    pub shm: Option<PathBuf>,
    /// The infra process holding a PID namespace the pod's containers
    /// share (`namespace_options.pid = POD`).
    #[serde(default)]
    pub infra_pid: Option<u32>,
    /// The infra process's own cgroup under the pod cgroup (the cgroup
    /// parent it was made under), as containerd's pause container has one.
    #[serde(default)]
    pub infra_cgroup: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PinRecord {
    pub net: bool,
    pub ipc: bool,
    pub uts: bool,
    /// The pod has a user namespace of its own (`hostUsers: false`).
    #[serde(default)]
    pub user: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub ips: Vec<IpAddr>,
    pub interface: String,
    pub result: serde_json::Value,
}

impl PodRecord {
    pub fn name_key(&self) -> String {
        name_key(&self.config)
    }

    /// kubelet's cgroup parent for the pod (empty when it gave none).
    pub fn cgroup_parent(&self) -> String {
        self.config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default()
    }

    /// The host uid and gid of root in the pod's own user namespace, if it
    /// has one (RunPodSandbox took one range each, from container id 0).
    pub fn user_namespace_root(&self) -> Option<(u32, u32)> {
        if !self.namespaces.user {
            return None;
        }
        let userns = self
            .config
            .linux
            .as_ref()?
            .security_context
            .as_ref()?
            .namespace_options
            .as_ref()?
            .userns_options
            .as_ref()?;
        Some((userns.uids.first()?.host_id, userns.gids.first()?.host_id))
    }

    fn pin_request(&self) -> PinRequest {
        PinRequest {
            net: self.namespaces.net,
            ipc: self.namespaces.ipc,
            uts: self.namespaces.uts,
            // Only which pins there are matters here.
            user: self.namespaces.user.then(Default::default),
            ..PinRequest::default()
        }
    }
}

fn name_key(config: &PodSandboxConfig) -> String {
    let m = config.metadata.clone().unwrap_or_default();
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

pub struct SandboxManager {
    /// Every pod record, written through to the metadata store.
    records: Cached<PodRecord>,
    pods_dir: PathBuf,
    state_dir: PathBuf,
    network: Arc<Network>,
    cgroups: Option<CgroupManager>,
    locks: KeyedLocks,
    /// The size of each pod's `/dev/shm` (`[sandbox] shm_size_bytes`).
    shm_bytes: u64,
    /// The binary infra containers run as `/pause` (`infra::install_pause`).
    pause: PathBuf,
    pins: Arc<PinNamespace>,
}

/// containerd's `DefaultSandboxCPUshares`: the pause process only reaps.
const INFRA_CPU_SHARES: u64 = 2;

/// A fresh pod id.
fn new_pod_id() -> Result<String, SandboxError> {
    crate::ids::new_id().map_err(|source| SandboxError::Io {
        op: "read",
        path: PathBuf::from("/dev/urandom"),
        source,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SandboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SandboxError::Task(e.to_string()))
}

fn mode(value: i32) -> NamespaceMode {
    NamespaceMode::try_from(value).unwrap_or(NamespaceMode::Pod)
}

impl SandboxManager {
    pub fn new(
        store: Store,
        state: &Path,
        network: Arc<Network>,
        cgroups: Option<CgroupManager>,
        shm_bytes: u64,
        pause: PathBuf,
        pins: PinNamespace,
    ) -> Self {
        SandboxManager {
            shm_bytes,
            pause,
            pins: Arc::new(pins),
            records: Cached::new(store, Kind::Pod),
            pods_dir: state.join("pods"),
            state_dir: state.to_path_buf(),
            network,
            cgroups,
            locks: KeyedLocks::default(),
        }
    }

    /// Undoes pods whose creation a crash interrupted.
    pub async fn recover(self: &Arc<Self>) -> Result<(), SandboxError> {
        for pod in self.all().await? {
            if pod.state == PodState::Creating {
                tracing::warn!(pod = %pod.id, "undoing a pod sandbox whose creation was interrupted");
                self.teardown(&pod).await?;
                self.records.delete(&pod.id).await?;
            }
        }
        Ok(())
    }

    /// Every pod, from the in-memory copy of the store.
    pub async fn all(&self) -> Result<Vec<Arc<PodRecord>>, SandboxError> {
        Ok(self.records.all().await?)
    }

    /// The pod with `id` or a unique prefix of it.
    pub async fn get(&self, id: &str) -> Result<PodRecord, SandboxError> {
        if id.is_empty() {
            return Err(SandboxError::Invalid {
                field: "pod_sandbox_id",
                message: "an id is required".into(),
            });
        }
        match self.records.find(id).await? {
            Lookup::Found(pod) => Ok(PodRecord::clone(&pod)),
            Lookup::NotFound => Err(SandboxError::NotFound(id.to_string())),
            Lookup::Ambiguous(ids) => Err(SandboxError::Ambiguous {
                prefix: id.to_string(),
                ids,
            }),
        }
    }

    async fn put(&self, pod: &PodRecord) -> Result<(), SandboxError> {
        Ok(self.records.put(&pod.id, pod).await?)
    }

    /// The pinned namespace file of `kind` (`net`, `ipc`, `uts`, `user`), if
    /// the pod has its own, or its infra process's `pid` namespace.
    pub fn namespace_path(&self, pod: &PodRecord, kind: &str) -> Option<PathBuf> {
        if kind == "pid" {
            return pod
                .infra_pid
                .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/pid")));
        }
        let own = match kind {
            "net" => pod.namespaces.net,
            "ipc" => pod.namespaces.ipc,
            "uts" => pod.namespaces.uts,
            "user" => pod.namespaces.user,
            _ => false,
        };
        let dir = if pod.pins_apart {
            self.pins.pod_dir(&pod.id)
        } else {
            pod.dir.join("ns")
        };
        own.then(|| dir.join(kind))
    }

    /// The pod's network namespace pin (pods on the host's network have
    /// none and never ask).
    fn netns(&self, pod: &PodRecord) -> PathBuf {
        self.namespace_path(pod, "net").unwrap_or_default()
    }

    /// Releases the pins' mount namespace when no pod is left: for a
    /// daemon that stops.
    pub async fn release_pins_if_unused(&self) -> Result<(), SandboxError> {
        if self.all().await?.is_empty() {
            self.pins.release()?;
        }
        Ok(())
    }

    /// RunPodSandbox.
    pub async fn run(
        self: &Arc<Self>,
        config: PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<PodRecord, SandboxError> {
        let pins = validate(&config, runtime_handler)?;
        let limits = resources::pod_limits(config.linux.as_ref())?;
        let shaping = pod_bandwidth(&config, pins.net)?;
        let id = new_pod_id()?;
        let mut pod = PodRecord {
            id: id.clone(),
            runtime_handler: runtime_handler.to_string(),
            state: PodState::Creating,
            created_at: now_ns(),
            dir: self.pods_dir.join(&id),
            namespaces: PinRecord {
                net: pins.net,
                ipc: pins.ipc,
                uts: pins.uts,
                user: pins.user.is_some(),
            },
            pins_apart: true,
            network: None,
            created_cgroup: None,
            shm: None,
            infra_pid: None,
            infra_cgroup: None,
            config,
        };
        self.reserve_name(&pod).await?;
        let _lock = self.locks.lock(&id).await;
        match self.make(&mut pod, pins, limits, shaping).await {
            Ok(()) => {
                pod.state = PodState::Ready;
                self.put(&pod).await?;
                Ok(pod)
            }
            Err(e) => {
                tracing::info!(pod = %id, "RunPodSandbox failed, undoing: {e}");
                if let Err(undo) = self.teardown(&pod).await {
                    tracing::error!(pod = %id, "undo of a failed RunPodSandbox: {undo}");
                }
                self.records.delete(&id).await?;
                Err(e)
            }
        }
    }

    /// Persists the record as `Creating`, refusing a name in use.
    async fn reserve_name(&self, pod: &PodRecord) -> Result<(), SandboxError> {
        // Checked and written under the records' write lock: two runs of
        // one name cannot both pass.
        let mut records = self.records.write().await?;
        let key = pod.name_key();
        if let Some(other) = records.records().values().find(|o| o.name_key() == key) {
            return Err(SandboxError::NameTaken {
                name: key,
                id: other.id.clone(),
            });
        }
        Ok(records.put(&pod.id, pod).await?)
    }

    /// The steps of RunPodSandbox; `pod` records each as it is done so that
    /// `teardown` undoes exactly those. `limits` are the pod cgroup's, from
    /// [`resources::pod_limits`]; `shaping` its network's, from
    /// [`pod_bandwidth`].
    async fn make(
        &self,
        pod: &mut PodRecord,
        pins: PinRequest,
        limits: Option<LinuxResources>,
        shaping: Option<Bandwidth>,
    ) -> Result<(), SandboxError> {
        let dir = pod.dir.clone();
        blocking({
            let dir = dir.clone();
            move || {
                std::fs::create_dir_all(&dir).map_err(|source| SandboxError::Io {
                    op: "create",
                    path: dir.clone(),
                    source,
                })
            }
        })
        .await??;

        let (pin_ns, id) = (self.pins.clone(), pod.id.clone());
        blocking(move || pin_ns.pin(&id, &pins)).await??;

        if let Some(cgroups) = &self.cgroups {
            let parent = pod.cgroup_parent();
            if !parent.is_empty() {
                let path = cgroups.pod_path(&parent)?;
                let exists = cgroups.open(&path).dirs().iter().any(|d| d.is_dir());
                if exists {
                    if limits.is_some() {
                        // kubelet made it and wrote its limits, overhead
                        // included; containerd and CRI-O leave it too.
                        tracing::debug!(pod = %pod.id, cgroup = %path, "pod cgroup is kubelet's: its resources and overhead are kubelet's to apply");
                    }
                } else {
                    // Recorded first: a crash while it is made still has
                    // the restart remove it.
                    pod.created_cgroup = Some(parent);
                    self.put(pod).await?;
                    let limits = limits.map(|l| tolerate_missing_hugetlb(cgroups, &pod.id, l));
                    let cgroups = cgroups.clone();
                    blocking(move || cgroups.create(&path, limits.as_ref()))
                        .await?
                        .map_err(|e| pod_cgroup_error(e, &pod.config))?;
                }
            }
        }

        let dns = pod.config.dns_config.as_ref().map(|d| Dns {
            servers: d.servers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        });
        let hostname = pod.config.hostname.clone();
        let shared_ipc = !pod.namespaces.ipc;
        let shm_bytes = self.shm_bytes;
        let shm = blocking({
            let dir = dir.clone();
            move || -> Result<Option<PathBuf>, SandboxError> {
                files::write_files(&dir, &hostname, dns.as_ref())?;
                // A pod on the host's IPC namespace uses the host's /dev/shm.
                if shared_ipc {
                    return Ok(None);
                }
                Ok(Some(files::mount_shm(&dir, shm_bytes)?))
            }
        })
        .await??;
        pod.shm = shm;
        self.put(pod).await?;

        if shares_pid(&pod.config) {
            let pins: Vec<(&str, PathBuf)> = ["user", "net", "ipc", "uts"]
                .into_iter()
                .filter_map(|kind| self.namespace_path(pod, kind).map(|p| (kind, p)))
                .collect();
            let procs = self.infra_cgroup(pod).await?;
            let paths = infra::InfraPaths::new(&dir, &self.state_dir, &pod.id);
            let owner = pod.user_namespace_root();
            pod.infra_pid =
                Some(infra::start(&paths, &self.pause, &pod.id, &pins, procs, owner).await?);
            self.put(pod).await?;
        }

        if pod.namespaces.net {
            let request = PodNetworkRequest {
                bandwidth: shaping,
                ..network_request(pod, self.netns(pod))
            };
            let status = self.network.attach(&request).await?;
            pod.network = Some(record_of(status));
        }
        Ok(())
    }

    /// Undoes everything a pod may have: network, shm, pins, dir, cgroup.
    /// Each step tolerates what is already gone, so this is idempotent.
    async fn teardown(&self, pod: &PodRecord) -> Result<(), SandboxError> {
        infra::stop(&infra::InfraPaths::new(&pod.dir, &self.state_dir, &pod.id)).await;
        if pod.namespaces.net {
            self.network
                .detach(&network_request(pod, self.netns(pod)))
                .await?;
        }
        let (dir, pins) = (pod.dir.clone(), pod.pin_request());
        let (pin_ns, id, apart) = (self.pins.clone(), pod.id.clone(), pod.pins_apart);
        blocking(move || -> Result<(), SandboxError> {
            files::unmount_shm(&dir)?;
            if apart {
                pin_ns.unpin(&id, &pins)?;
            } else {
                namespaces::unpin(&dir.join("ns"), &pins)?;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(SandboxError::Io {
                    op: "remove",
                    path: dir,
                    source,
                }),
            }
        })
        .await??;
        if let (Some(cgroups), Some(parent)) = (&self.cgroups, &pod.infra_cgroup) {
            let path = cgroups.container_path(parent, &pod.id)?;
            cgroups.open(&path).delete()?;
        }
        if let (Some(cgroups), Some(parent)) = (&self.cgroups, &pod.created_cgroup) {
            let path = cgroups.pod_path(parent)?;
            cgroups.open(&path).delete()?;
        }
        Ok(())
    }

    /// StopPodSandbox: network down, shm unmounted, record kept. Unknown
    /// ids succeed: kubelet retries stops of pods it lost track of.
    pub async fn stop(&self, id: &str) -> Result<(), SandboxError> {
        let pod = match self.get(id).await {
            Ok(pod) => pod,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _lock = self.locks.lock(&pod.id).await;
        let mut pod = self.get(&pod.id).await?;
        infra::stop(&infra::InfraPaths::new(&pod.dir, &self.state_dir, &pod.id)).await;
        if pod.namespaces.net {
            self.network
                .detach(&network_request(&pod, self.netns(&pod)))
                .await?;
        }
        let dir = pod.dir.clone();
        blocking(move || files::unmount_shm(&dir)).await??;
        pod.state = PodState::NotReady;
        self.put(&pod).await
    }

    /// RemovePodSandbox: everything the pod had, and its record.
    pub async fn remove(&self, id: &str) -> Result<(), SandboxError> {
        let pod = match self.get(id).await {
            Ok(pod) => pod,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _lock = self.locks.lock(&pod.id).await;
        self.teardown(&pod).await?;
        self.records.delete(&pod.id).await?;
        Ok(())
    }

    /// Makes the infra process's cgroup, `<pod cgroup>/<pod id>`, and
    /// returns its `cgroup.procs` files (none when the pod has no cgroup).
    /// Not the pod cgroup itself: on cgroup v2 a cgroup with processes of
    /// its own cannot enable controllers for its children, so the
    /// containers' cgroups under it would get no limits. Its CPU shares are
    /// containerd's for the pause container (2): it only reaps.
    async fn infra_cgroup(&self, pod: &mut PodRecord) -> Result<Vec<PathBuf>, SandboxError> {
        let parent = pod.cgroup_parent();
        let Some(cgroups) = self.cgroups.clone() else {
            return Ok(Vec::new());
        };
        if parent.is_empty() {
            return Ok(Vec::new());
        }
        let path = cgroups.container_path(&parent, &pod.id)?;
        // Recorded first: a crash while it is made still has teardown
        // remove it.
        pod.infra_cgroup = Some(parent);
        self.put(pod).await?;
        let shares = oci_spec::runtime::LinuxResourcesBuilder::default()
            .cpu(
                oci_spec::runtime::LinuxCpuBuilder::default()
                    .shares(INFRA_CPU_SHARES)
                    .build()
                    .expect("a shares-only cpu block is valid"),
            )
            .build()
            .expect("a cpu-only resources block is valid");
        let cgroup = blocking(move || cgroups.create(&path, Some(&shares)))
            .await?
            .map_err(|e| pod_cgroup_error(e, &pod.config))?;
        Ok(cgroup
            .procs_files()
            .into_iter()
            .filter(|f| f.exists())
            .collect())
    }

    pub fn network(&self) -> &Arc<Network> {
        &self.network
    }
}

/// containerd's default `tolerate_missing_hugetlb_controller`, as for
/// containers: without the controller, huge page limits are dropped.
fn tolerate_missing_hugetlb(
    cgroups: &CgroupManager,
    pod_id: &str,
    mut limits: LinuxResources,
) -> LinuxResources {
    if limits.hugepage_limits().is_some() && cgroups.layout().controller_mount("hugetlb").is_none()
    {
        tracing::warn!(
            pod = pod_id,
            "hugetlb cgroup controller is absent: the pod's huge page limits are skipped"
        );
        limits.set_hugepage_limits(None);
    }
    limits
}

/// Unified keys on a host without cgroup v2 are the request's mistake for
/// this node, not berth's: the field is named as for an invalid value.
fn pod_cgroup_error(e: CgroupError, config: &PodSandboxConfig) -> SandboxError {
    match e {
        CgroupError::UnifiedNeedsV2 { .. } => {
            let in_resources = config
                .linux
                .as_ref()
                .and_then(|l| l.resources.as_ref())
                .is_some_and(|r| !r.unified.is_empty());
            SandboxError::Invalid {
                field: if in_resources {
                    "config.linux.resources.unified"
                } else {
                    "config.linux.overhead.unified"
                },
                message: e.to_string(),
            }
        }
        other => SandboxError::Cgroup(other),
    }
}

fn record_of(status: PodNetworkStatus) -> NetworkRecord {
    NetworkRecord {
        ips: status.ips,
        interface: status.interface,
        result: status.result,
    }
}

fn network_request(pod: &PodRecord, netns: PathBuf) -> PodNetworkRequest {
    let metadata = pod.config.metadata.clone().unwrap_or_default();
    PodNetworkRequest {
        pod_id: pod.id.clone(),
        name: metadata.name,
        namespace: metadata.namespace,
        uid: metadata.uid,
        netns,
        port_mappings: pod
            .config
            .port_mappings
            .iter()
            .filter_map(port_mapping)
            .collect(),
        dns: pod
            .config
            .dns_config
            .as_ref()
            .map(|d| crate::network::DnsConfig {
                servers: d.servers.clone(),
                searches: d.searches.clone(),
                options: d.options.clone(),
            }),
        // Only attach uses it ([`pod_bandwidth`]): CNI DEL runs from the
        // cached ADD, the built-in network from its record.
        bandwidth: None,
        cgroup_parent: pod.cgroup_parent(),
    }
}

/// The pod's traffic shaping from kubelet's bandwidth annotations. As
/// containerd, only for a pod with a network of its own: a host-network pod
/// has nothing to shape, and its annotations are not read.
fn pod_bandwidth(
    config: &PodSandboxConfig,
    own_network: bool,
) -> Result<Option<Bandwidth>, SandboxError> {
    if !own_network {
        return Ok(None);
    }
    bandwidth::from_annotations(&config.annotations).map_err(|e| SandboxError::Invalid {
        field: e.annotation,
        message: format!("{:?} {}", e.value, e.reason),
    })
}

fn port_mapping(p: &CriPortMapping) -> Option<PortMapping> {
    let protocol = match CriProtocol::try_from(p.protocol).ok()? {
        CriProtocol::Tcp => Protocol::Tcp,
        CriProtocol::Udp => Protocol::Udp,
        CriProtocol::Sctp => Protocol::Sctp,
    };
    Some(PortMapping {
        protocol,
        container_port: u16::try_from(p.container_port).ok()?,
        host_port: u16::try_from(p.host_port).ok()?,
        host_ip: p.host_ip.clone(),
    })
}

/// Checks a RunPodSandbox request before anything is made, and says which
/// namespaces the pod gets of its own.
pub fn validate(
    config: &PodSandboxConfig,
    runtime_handler: &str,
) -> Result<PinRequest, SandboxError> {
    let invalid = |field: &'static str, message: String| SandboxError::Invalid { field, message };
    if !HANDLERS.contains(&runtime_handler) {
        return Err(invalid(
            "runtime_handler",
            format!(
                "{runtime_handler:?} is not a runtime handler of this node (known: \"\", \"berth\")"
            ),
        ));
    }
    let metadata = config
        .metadata
        .as_ref()
        .ok_or_else(|| invalid("config.metadata", "is required".into()))?;
    for (field, value) in [
        ("config.metadata.name", &metadata.name),
        ("config.metadata.namespace", &metadata.namespace),
        ("config.metadata.uid", &metadata.uid),
    ] {
        if value.is_empty() {
            return Err(invalid(field, "is required".into()));
        }
        if value.len() > MAX_NAME_BYTES || value.contains(['/', '\0']) {
            return Err(invalid(field, format!("{value:?} is not a valid name")));
        }
    }
    if config.hostname.len() > 64 || config.hostname.contains(['/', '\0', ' ']) {
        return Err(invalid(
            "config.hostname",
            format!("{:?} is not a valid hostname", config.hostname),
        ));
    }
    if let Some(dns) = &config.dns_config {
        Dns {
            servers: dns.servers.clone(),
            searches: dns.searches.clone(),
            options: dns.options.clone(),
        }
        .validate()?;
    }
    let linux = config.linux.clone().unwrap_or_default();
    let options = linux
        .security_context
        .as_ref()
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let host_network = mode(options.network) == NamespaceMode::Node;
    let host_ipc = mode(options.ipc) == NamespaceMode::Node;
    let mut sysctls: Vec<(String, String)> = linux.sysctls.clone().into_iter().collect();
    sysctls.sort();
    let user = pod_user_namespace(&options)?;
    if user.is_some() && (host_network || host_ipc || mode(options.pid) == NamespaceMode::Node) {
        return Err(invalid(
            "config.linux.security_context.namespace_options.userns_options",
            "a pod with a user namespace of its own cannot share the host's network, IPC or PID namespace".into(),
        ));
    }
    let pins = PinRequest {
        net: !host_network,
        ipc: !host_ipc,
        // kubelet gives hostNetwork pods the node's hostname: its UTS.
        uts: !host_network,
        hostname: config.hostname.clone(),
        sysctls,
        user,
    };
    pins.check_sysctls()
        .map_err(|e| invalid("config.linux.sysctls", e.to_string()))?;
    for mapping in &config.port_mappings {
        if port_mapping(mapping).is_none() || mapping.container_port <= 0 {
            return Err(invalid(
                "config.port_mappings",
                format!(
                    "container port {} / host port {} / protocol {} is not a valid mapping",
                    mapping.container_port, mapping.host_port, mapping.protocol
                ),
            ));
        }
    }
    Ok(pins)
}

/// The id maps of the pod's own user namespace (`userns_options` mode
/// POD, kubelet's `hostUsers: false`), or `None` for the host's (mode NODE
/// or no options). As kubelet asks and containerd accepts: one uid and one
/// gid range, each mapping container id 0.
fn pod_user_namespace(
    options: &NamespaceOption,
) -> Result<Option<UserNamespaceMaps>, SandboxError> {
    const FIELD: &str = "config.linux.security_context.namespace_options.userns_options";
    let invalid = |message: String| SandboxError::Invalid {
        field: FIELD,
        message,
    };
    let Some(userns) = &options.userns_options else {
        return Ok(None);
    };
    match NamespaceMode::try_from(userns.mode) {
        Ok(NamespaceMode::Node) => {
            if userns.uids.is_empty() && userns.gids.is_empty() {
                Ok(None)
            } else {
                Err(invalid("mode NODE takes no uid or gid mappings".into()))
            }
        }
        Ok(NamespaceMode::Pod) => {
            let map = |kind: &str, mappings: &[IdMapping]| -> Result<String, SandboxError> {
                let [m] = mappings else {
                    return Err(invalid(format!(
                        "a pod's user namespace takes exactly one {kind} mapping, not {}",
                        mappings.len()
                    )));
                };
                if m.container_id != 0 {
                    return Err(invalid(format!(
                        "the {kind} mapping must start at container id 0, not {}",
                        m.container_id
                    )));
                }
                if m.length == 0 || m.host_id.checked_add(m.length).is_none() {
                    return Err(invalid(format!(
                        "{kind} mapping of {} ids from host id {} is not a valid range",
                        m.length, m.host_id
                    )));
                }
                Ok(format!("{} {} {}\n", m.container_id, m.host_id, m.length))
            };
            Ok(Some(UserNamespaceMaps {
                uid_map: map("uid", &userns.uids)?,
                gid_map: map("gid", &userns.gids)?,
            }))
        }
        Ok(other) => Err(invalid(format!(
            "mode {} is not supported for user namespaces (POD or NODE)",
            other.as_str_name()
        ))),
        Err(_) => Err(invalid(format!("unknown mode {}", userns.mode))),
    }
}

/// Whether the pod's containers share one PID namespace (CRI's default
/// mode, and kubelet's for `shareProcessNamespace: true`).
pub fn shares_pid(config: &PodSandboxConfig) -> bool {
    let options = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    mode(options.pid) == NamespaceMode::Pod
}

/// Labels match a selector when every selector pair is present.
pub fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{
        LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption, PodSandboxMetadata,
    };

    fn config() -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web".into(),
                uid: "uid-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "web".into(),
            ..PodSandboxConfig::default()
        }
    }

    #[test]
    fn records_of_pods_from_before_the_pins_namespace_keep_their_pins_in_place() {
        let pod = PodRecord {
            id: "p1".into(),
            config: config(),
            runtime_handler: String::new(),
            state: PodState::Ready,
            created_at: 1,
            dir: PathBuf::from("/run/berth/pods/p1"),
            namespaces: PinRecord {
                net: true,
                ipc: true,
                uts: true,
                user: false,
            },
            pins_apart: true,
            network: None,
            created_cgroup: None,
            shm: None,
            infra_pid: None,
            infra_cgroup: None,
        };
        let mut stored = serde_json::to_value(&pod).expect("encode");
        assert_eq!(stored["pins_apart"], true);
        // Written by berth before `pin_ns`: no such field, nor a user pin.
        stored
            .as_object_mut()
            .expect("a record is an object")
            .remove("pins_apart");
        stored["namespaces"]
            .as_object_mut()
            .expect("namespaces are an object")
            .remove("user");
        let old: PodRecord = serde_json::from_value(stored).expect("decode an older record");
        assert!(
            !old.pins_apart,
            "its pins are under dir/ns, where it made them"
        );
        assert!(!old.namespaces.user, "the host's user namespace");
        assert_eq!(old.user_namespace_root(), None);
    }

    #[test]
    fn pod_namespaces_follow_the_namespace_options() {
        let pins = validate(&config(), "").expect("valid");
        assert!(pins.net && pins.ipc && pins.uts);
        let mut host = config();
        host.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ipc: NamespaceMode::Node as i32,
                    ..NamespaceOption::default()
                }),
                ..LinuxSandboxSecurityContext::default()
            }),
            ..LinuxPodSandboxConfig::default()
        });
        let pins = validate(&host, "berth").expect("valid");
        assert!(!pins.net && !pins.ipc && !pins.uts);
    }

    fn with_userns(
        uids: Vec<IdMapping>,
        gids: Vec<IdMapping>,
        mode: NamespaceMode,
    ) -> PodSandboxConfig {
        let mut c = config();
        c.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    userns_options: Some(k8s_cri::v1::UserNamespace {
                        mode: mode as i32,
                        uids,
                        gids,
                    }),
                    ..NamespaceOption::default()
                }),
                ..LinuxSandboxSecurityContext::default()
            }),
            ..LinuxPodSandboxConfig::default()
        });
        c
    }

    fn range(container_id: u32, host_id: u32, length: u32) -> IdMapping {
        IdMapping {
            container_id,
            host_id,
            length,
        }
    }

    #[test]
    fn a_pods_user_namespace_takes_one_range_from_container_id_0() {
        let one = vec![range(0, 200_000, 65536)];
        let pins = validate(
            &with_userns(one.clone(), one.clone(), NamespaceMode::Pod),
            "",
        )
        .expect("kubelet's request");
        let maps = pins.user.clone().expect("a user namespace");
        assert_eq!(maps.uid_map, "0 200000 65536\n");
        assert_eq!(maps.gid_map, "0 200000 65536\n");
        assert!(
            pins.pins(Path::new("/p"))
                .contains(&("user", PathBuf::from("/p/user")))
        );

        let refused = |c: PodSandboxConfig, why: &str| {
            let err = validate(&c, "").expect_err(why);
            assert!(err.to_string().contains("userns_options"), "{why}: {err}");
        };
        let two = vec![range(0, 1000, 100_000), range(0, 2000, 100_000)];
        refused(
            with_userns(two.clone(), two, NamespaceMode::Pod),
            "two ranges",
        );
        let from_1 = vec![range(1, 1000, 100_000)];
        refused(
            with_userns(from_1.clone(), from_1, NamespaceMode::Pod),
            "0 not mapped",
        );
        refused(
            with_userns(one.clone(), vec![], NamespaceMode::Pod),
            "no gid range",
        );
        let empty = vec![range(0, 1000, 0)];
        refused(
            with_userns(empty.clone(), empty, NamespaceMode::Pod),
            "empty range",
        );
        let wraps = vec![range(0, u32::MAX - 10, 100)];
        refused(
            with_userns(wraps.clone(), wraps, NamespaceMode::Pod),
            "past the last id",
        );
        refused(
            with_userns(vec![], vec![], NamespaceMode::Container),
            "CONTAINER",
        );
        refused(with_userns(vec![], vec![], NamespaceMode::Target), "TARGET");
        refused(
            with_userns(one.clone(), one.clone(), NamespaceMode::Node),
            "NODE with maps",
        );
        let mut host_net = with_userns(one.clone(), one, NamespaceMode::Pod);
        if let Some(o) = host_net
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
        {
            o.network = NamespaceMode::Node as i32;
        }
        refused(host_net, "host network");

        let node = validate(&with_userns(vec![], vec![], NamespaceMode::Node), "").expect("NODE");
        assert_eq!(node.user, None);
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_made() {
        assert!(validate(&config(), "runc").is_err(), "unknown handler");
        let mut c = config();
        c.metadata = None;
        assert!(validate(&c, "").is_err());
        let mut c = config();
        if let Some(m) = c.metadata.as_mut() {
            m.uid.clear();
        }
        assert!(validate(&c, "").is_err());
        let mut c = config();
        c.linux = Some(LinuxPodSandboxConfig {
            sysctls: [("kernel.panic".to_string(), "1".to_string())].into(),
            ..LinuxPodSandboxConfig::default()
        });
        let err = validate(&c, "").expect_err("host-wide sysctl");
        assert!(err.to_string().contains("kernel.panic"), "{err}");
        let mut c = config();
        c.port_mappings = vec![CriPortMapping {
            protocol: 0,
            container_port: 70000,
            host_port: 0,
            host_ip: String::new(),
        }];
        assert!(validate(&c, "").is_err(), "port out of range");
    }

    #[test]
    fn label_selector_needs_every_pair() {
        let labels: HashMap<String, String> = [
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]
        .into();
        assert!(labels_match(&labels, &HashMap::new()));
        assert!(labels_match(
            &labels,
            &[("a".to_string(), "1".to_string())].into()
        ));
        assert!(!labels_match(
            &labels,
            &[("a".to_string(), "2".to_string())].into()
        ));
        assert!(!labels_match(
            &labels,
            &[("c".to_string(), "1".to_string())].into()
        ));
    }
}
