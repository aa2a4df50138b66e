//! Containers: from kubelet's ContainerConfig to a supervised process and
//! back. A container is a record in the metadata store, a bundle under
//! `<state>/containers/<id>/` (spec, monitor config, pid), a snapshot
//! (writable layer over the image), a cgroup, and a `berth monitor` that
//! owns the process. The daemon learns of exits from exit records the
//! monitors write, through an inotify watcher.

pub mod apparmor;
pub mod exec;
pub mod spec;
pub mod user;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1::ContainerConfig;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::events::EventKind;
use crate::executor::cgroups::{CgroupError, CgroupManager};
use crate::ids::{Lookup, now_ns};
use crate::image::snapshot::{IdmappedRootfs, SnapshotError, Snapshots};
use crate::image::store::{ImageError, ImageRecord, ImageStore};
use crate::locks::KeyedLocks;
use crate::monitor::{self, ExitRecord, ExitWatcher, MonitorClient, MonitorConfig, MonitorError};
use crate::sandbox::{PodRecord, PodState, SandboxError, SandboxManager};
use crate::store::{Cached, Kind, Store, StoreError};

/// How long a stop waits for a SIGKILLed process to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(10);
const MAX_NAME_BYTES: usize = 253;
/// A file in the bundle naming the container's cgroup, written before the
/// cgroup is made, so that a create the daemon died in can be undone.
const CGROUP_MARKER: &str = "cgroup";
/// The file in the bundle where the monitor writes the container's pid.
const PID_FILE: &str = "pid";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("container {name} already exists with id {id}")]
    NameTaken { name: String, id: String },
    #[error("container {0} not found")]
    NotFound(String),
    #[error("container id prefix {prefix:?} matches several containers: {ids}")]
    Ambiguous { prefix: String, ids: String },
    #[error("container {id} is {state}: {action} needs a {needed} container")]
    WrongState {
        id: String,
        state: &'static str,
        action: &'static str,
        needed: &'static str,
    },
    #[error("image {0:?} is not present on this node: pull it first")]
    ImageNotFound(String),
    #[error("pod sandbox {0} is not ready")]
    PodNotReady(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    User(#[from] user::UserError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Exec(#[from] exec::ExecError),
    #[error(transparent)]
    AppArmor(#[from] apparmor::AppArmorError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("container task failed: {0}")]
    Task(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// Being made; undone on restart if the daemon died meanwhile.
    Creating,
    Created,
    Running,
    Exited,
    /// The monitor is gone without an exit record.
    Unknown,
}

impl ContainerState {
    fn name(self) -> &'static str {
        match self {
            ContainerState::Creating => "being created",
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Exited => "exited",
            ContainerState::Unknown => "in an unknown state",
        }
    }
}

/// What the metadata store keeps of a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    pub config: ContainerConfig,
    /// The image ID; the image store refuses to remove an image a container
    /// record names here.
    pub image_id: String,
    /// The digest reference the image was pulled by, or its ID.
    pub image_ref: String,
    /// The IDs of the images mounted as image volumes; in use, like
    /// `image_id`, while the record exists.
    #[serde(default)]
    pub volume_image_ids: Vec<String>,
    pub state: ContainerState,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub pid: u32,
    pub bundle: PathBuf,
    /// Empty when no log was asked for (no log directory or log path).
    pub log_path: PathBuf,
    pub cgroup_path: Option<String>,
    pub stop_signal: String,
    /// The effective user, as ContainerStatus reports it.
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

impl ContainerRecord {
    fn name_key(&self, pod: &PodRecord) -> String {
        let pod_meta = pod.config.metadata.clone().unwrap_or_default();
        let meta = self.config.metadata.clone().unwrap_or_default();
        format!(
            "{}_{}_{}_{}_{}",
            meta.name, pod_meta.name, pod_meta.namespace, pod_meta.uid, meta.attempt
        )
    }

    /// A record of only what teardown needs (and state `Creating`): the
    /// start of every record, and all the daemon knows of a container whose
    /// create it died in.
    fn bare(id: &str, bundle: PathBuf, cgroup_path: Option<String>) -> ContainerRecord {
        ContainerRecord {
            id: id.to_string(),
            pod_id: String::new(),
            config: ContainerConfig::default(),
            image_id: String::new(),
            image_ref: String::new(),
            volume_image_ids: Vec::new(),
            state: ContainerState::Creating,
            created_at: 0,
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            pid: 0,
            bundle,
            log_path: PathBuf::new(),
            cgroup_path,
            stop_signal: String::new(),
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
        }
    }

    pub fn control_socket(&self, state: &Path) -> PathBuf {
        // Kept short: a unix socket path has 108 bytes.
        state.join("s").join(&self.id)
    }

    pub fn exit_record(&self, state: &Path) -> PathBuf {
        state.join("exits").join(&self.id)
    }
}

pub struct ContainerManager {
    /// Every container record, written through to the metadata store.
    records: Cached<ContainerRecord>,
    state_dir: PathBuf,
    images: Arc<ImageStore>,
    sandboxes: Arc<SandboxManager>,
    snapshots: Snapshots,
    cgroups: Option<CgroupManager>,
    locks: KeyedLocks,
    exits: broadcast::Sender<String>,
    /// The last CPU sample per container: (ns timestamp, usage ns), to turn
    /// cumulative usage into nano-cores as cadvisor does.
    cpu_samples: std::sync::Mutex<HashMap<String, (i64, u64)>>,
    events: crate::events::Events,
    /// Creates under way: their names are reserved here, not in the store,
    /// until their records are saved.
    creating: std::sync::Mutex<Vec<InFlight>>,
}

/// A create under way (see [`ContainerManager::reserve_name`]).
struct InFlight {
    id: String,
    pod_id: String,
    name_key: String,
}

/// A name reserved by [`ContainerManager::reserve_name`]; released on drop.
struct Reservation<'a> {
    manager: &'a ContainerManager,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.manager.in_flight().retain(|c| c.id != self.id);
    }
}

struct ExecTarget {
    bundle: PathBuf,
    pid: u32,
    cgroup_procs: Vec<PathBuf>,
}

/// A container's resource usage at one moment.
#[derive(Debug, Clone, Default)]
pub struct ContainerUsage {
    pub timestamp: i64,
    pub cgroup: Option<crate::executor::cgroups::CgroupStats>,
    /// Processes the kernel's OOM killer killed in the container's cgroup;
    /// `None` where the kernel keeps no count (before 4.13, or no memory
    /// controller).
    pub oom_kills: Option<u64>,
    pub nano_cores: Option<u64>,
    pub writable_layer: crate::image::store::DiskUsage,
    pub writable_layer_mount: PathBuf,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ContainerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ContainerError::Task(e.to_string()))
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ContainerError + 'a {
    move |source| ContainerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl ContainerManager {
    pub fn new(
        store: Store,
        state: &Path,
        images: Arc<ImageStore>,
        sandboxes: Arc<SandboxManager>,
        snapshots: Snapshots,
        cgroups: Option<CgroupManager>,
    ) -> Result<Arc<Self>, ContainerError> {
        for dir in ["containers", "exits", "s"] {
            let path = state.join(dir);
            std::fs::create_dir_all(&path).map_err(io_err("create", &path))?;
        }
        let (exits, _) = broadcast::channel(1024);
        Ok(Arc::new(ContainerManager {
            records: Cached::new(store, Kind::Container),
            state_dir: state.to_path_buf(),
            images,
            sandboxes,
            snapshots,
            cgroups,
            locks: KeyedLocks::default(),
            exits,
            cpu_samples: std::sync::Mutex::new(HashMap::new()),
            events: crate::events::Events::default(),
            creating: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Starts watching exit records and brings the records up to date with
    /// what happened while the daemon was down. Call once, in the runtime,
    /// before serving.
    pub async fn start(self: &Arc<Self>) -> Result<(), ContainerError> {
        let mut watcher = ExitWatcher::new(&self.state_dir.join("exits"))?;
        // Watching first: undoing what a create left behind waits for exits.
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match watcher.next().await {
                    Ok(id) => {
                        // A stop or remove waiting for this exit holds the
                        // container's lock: wake it first (it records the
                        // exit itself), then record under the lock, so the
                        // record and its event never overtake a StartContainer
                        // still saving RUNNING.
                        let _ = this.exits.send(id.clone());
                        let this = this.clone();
                        tokio::spawn(async move {
                            let _lock = this.locks.lock(&id).await;
                            if let Err(e) = this.record_exit(&id).await {
                                tracing::warn!(container = %id, "record exit: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::error!("exit watcher stopped: {e}");
                        break;
                    }
                }
            }
        });
        let all = self.all().await?;
        for container in &all {
            match container.state {
                // Written by versions that saved a reservation first.
                ContainerState::Creating => {
                    tracing::warn!(container = %container.id, "undoing a container whose creation was interrupted");
                    self.teardown(container).await?;
                    self.delete_record(&container.id).await?;
                }
                ContainerState::Created | ContainerState::Running => {
                    self.reconcile(&container.id).await?
                }
                ContainerState::Exited | ContainerState::Unknown => {}
            }
        }
        let known: std::collections::HashSet<&str> = all.iter().map(|c| c.id.as_str()).collect();
        for id in self.leftover_ids(&known)? {
            tracing::warn!(container = %id, "undoing a create the daemon did not finish");
            let cgroup_path = std::fs::read_to_string(self.bundle(&id).join(CGROUP_MARKER)).ok();
            let orphan = ContainerRecord::bare(&id, self.bundle(&id), cgroup_path);
            self.teardown(&orphan).await?;
        }
        Ok(())
    }

    /// Where the containers' bundles are, one directory per id.
    fn bundles_dir(&self) -> PathBuf {
        self.state_dir.join("containers")
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.bundles_dir().join(id)
    }

    /// Ids with a bundle or a snapshot but no record: creates the daemon
    /// died in, between making the first thing and saving the record.
    fn leftover_ids(
        &self,
        known: &std::collections::HashSet<&str>,
    ) -> Result<std::collections::BTreeSet<String>, ContainerError> {
        let bundles = self.bundles_dir();
        let mut ids = std::collections::BTreeSet::new();
        for dir in [bundles.as_path(), self.snapshots.dir()] {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read", dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("read", dir))?;
                if let Some(id) = entry.file_name().to_str()
                    && !known.contains(id)
                {
                    ids.insert(id.to_string());
                }
            }
        }
        Ok(ids)
    }

    /// After a restart: an exit record means the container ended; a live
    /// monitor means it is as recorded; neither means it is gone.
    async fn reconcile(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id).await?;
        if container.exit_record(&self.state_dir).exists() {
            // Exit records are not flushed (see monitor::atomic_file): after
            // a machine crash one may be empty. The container is gone then;
            // an unreadable record must not keep the daemon from starting.
            let Err(e) = self.record_exit(id).await else {
                return Ok(());
            };
            tracing::warn!(container = %id, "unreadable exit record: {e}");
            let mut container = container;
            container.state = ContainerState::Unknown;
            container.reason = "Unknown".into();
            container.message = format!("the container's exit record is unreadable: {e}");
            return self.put(&container).await;
        }
        let client = MonitorClient::new(container.control_socket(&self.state_dir))
            .with_timeout(Duration::from_secs(2));
        if client.status().await.is_err() {
            let mut container = container;
            container.state = ContainerState::Unknown;
            container.reason = "Unknown".into();
            container.message = "the container's monitor is gone and left no exit record".into();
            return self.put(&container).await;
        }
        if container.pid == 0 {
            // Saved while the monitor was still setting it up (see `make`).
            let pid_file = container.bundle.join(PID_FILE);
            match std::fs::read_to_string(&pid_file).map(|p| p.trim().parse::<u32>()) {
                Ok(Ok(pid)) => {
                    let mut container = container;
                    container.pid = pid;
                    self.put(&container).await?;
                }
                other => {
                    tracing::warn!(container = %id, "no pid in {}: {other:?}", pid_file.display())
                }
            }
        }
        Ok(())
    }

    async fn record_exit(&self, id: &str) -> Result<(), ContainerError> {
        let Ok(mut container) = self.get(id).await else {
            return Ok(()); // removed meanwhile
        };
        if container.state == ContainerState::Exited {
            return Ok(()); // the watcher and a stop both saw it
        }
        let path = container.exit_record(&self.state_dir);
        let record: ExitRecord = blocking(move || monitor::read_exit_record(&path)).await??;
        container.state = ContainerState::Exited;
        container.exit_code = record.exit_code;
        container.finished_at = record.finished_at;
        if record.started_at > 0 {
            container.started_at = record.started_at;
        }
        container.reason = if record.reason == "StartError" {
            "ContainerCannotRun".to_string()
        } else {
            record.reason
        };
        container.message = record.message;
        self.put(&container).await?;
        self.events.publish(
            &container.id,
            &container.pod_id,
            EventKind::Stopped,
            container.finished_at,
        );
        Ok(())
    }

    /// Every container, from the in-memory copy of the store.
    pub async fn all(&self) -> Result<Vec<Arc<ContainerRecord>>, ContainerError> {
        Ok(self.records.all().await?)
    }

    /// The container with `id` or a unique prefix of it.
    pub async fn get(&self, id: &str) -> Result<ContainerRecord, ContainerError> {
        if id.is_empty() {
            return Err(ContainerError::Invalid {
                field: "container_id",
                message: "an id is required".into(),
            });
        }
        match self.records.find(id).await? {
            Lookup::Found(container) => Ok(ContainerRecord::clone(&container)),
            Lookup::NotFound => Err(ContainerError::NotFound(id.to_string())),
            Lookup::Ambiguous(ids) => Err(ContainerError::Ambiguous {
                prefix: id.to_string(),
                ids,
            }),
        }
    }

    async fn put(&self, container: &ContainerRecord) -> Result<(), ContainerError> {
        Ok(self.records.put(&container.id, container).await?)
    }

    async fn delete_record(&self, id: &str) -> Result<(), ContainerError> {
        self.records.delete(id).await?;
        Ok(())
    }

    /// CreateContainer.
    pub async fn create(
        self: &Arc<Self>,
        pod_id: &str,
        config: ContainerConfig,
    ) -> Result<ContainerRecord, ContainerError> {
        let pod = self.sandboxes.get(pod_id).await?;
        if pod.state != PodState::Ready {
            return Err(ContainerError::PodNotReady(pod.id));
        }
        let meta = config.metadata.clone().ok_or(ContainerError::Invalid {
            field: "config.metadata",
            message: "is required".into(),
        })?;
        if meta.name.is_empty()
            || meta.name.len() > MAX_NAME_BYTES
            || meta.name.contains(['/', '\0'])
        {
            return Err(ContainerError::Invalid {
                field: "config.metadata.name",
                message: format!("{:?} is not a valid container name", meta.name),
            });
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        if image_name.is_empty() {
            return Err(ContainerError::Invalid {
                field: "config.image.image",
                message: "an image is required".into(),
            });
        }
        let image = self
            .images
            .resolve(&image_name)
            .await?
            .ok_or_else(|| ContainerError::ImageNotFound(image_name.clone()))?;
        // kubelet pulled the images of image volumes before; by index of
        // their mount.
        let mut volume_images = Vec::new();
        for (i, m) in config.mounts.iter().enumerate() {
            if let Some(name) = m.image.as_ref().map(|i| &i.image).filter(|n| !n.is_empty()) {
                let record = self
                    .images
                    .resolve(name)
                    .await?
                    .ok_or_else(|| ContainerError::ImageNotFound(name.clone()))?;
                volume_images.push((i, record));
            }
        }

        let id = crate::ids::new_id().map_err(|source| ContainerError::Io {
            op: "read",
            path: PathBuf::from("/dev/urandom"),
            source,
        })?;
        let bundle = self.bundle(&id);
        let log_path = log_path(&pod, &config)?;
        // Known before anything exists, and saved with the reservation, so
        // that undoing an interrupted create finds the cgroup without a
        // second commit once it is made.
        let cgroup_path = match &self.cgroups {
            Some(cgroups) => Some(cgroups.container_path(&pod.cgroup_parent(), &id)?),
            None => None,
        };
        let mut container = ContainerRecord {
            pod_id: pod.id.clone(),
            image_id: image.id.to_string(),
            image_ref: image
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| image.id.to_string()),
            volume_image_ids: volume_images
                .iter()
                .map(|(_, v)| v.id.to_string())
                .collect(),
            created_at: now_ns(),
            log_path,
            stop_signal: spec::stop_signal(&image.config),
            config,
            ..ContainerRecord::bare(&id, bundle, cgroup_path.as_ref().map(ToString::to_string))
        };
        // The id is new: nobody else can hold its lock. A RemovePodSandbox
        // that finds the create in flight waits for this lock (`for_pod`).
        let _lock = self.locks.lock(&id).await;
        let _reservation = self.reserve_name(&container, &pod).await?;
        match self
            .make(&mut container, &pod, &image, &volume_images)
            .await
        {
            Ok(()) => {
                self.events.publish(
                    &container.id,
                    &container.pod_id,
                    EventKind::Created,
                    container.created_at,
                );
                Ok(container)
            }
            Err(e) => {
                tracing::info!(container = %id, "CreateContainer failed, undoing: {e}");
                if let Err(undo) = self.teardown(&container).await {
                    tracing::error!(container = %id, "undo of a failed CreateContainer: {undo}");
                }
                self.delete_record(&id).await?;
                Err(e)
            }
        }
    }

    /// Reserves the container's name until the create ends: in memory,
    /// not in the store, so that a create saves its record once (see
    /// `make`). The reservation goes in before the records are checked, so
    /// a create of the same name finishing meanwhile is seen in one or the
    /// other: it leaves the in-flight list only once its record is in.
    async fn reserve_name(
        &self,
        container: &ContainerRecord,
        pod: &PodRecord,
    ) -> Result<Reservation<'_>, ContainerError> {
        let key = container.name_key(pod);
        {
            let mut creating = self.in_flight();
            if let Some(other) = creating
                .iter()
                .find(|c| c.pod_id == pod.id && c.name_key == key)
            {
                return Err(ContainerError::NameTaken {
                    name: key,
                    id: other.id.clone(),
                });
            }
            creating.push(InFlight {
                id: container.id.clone(),
                pod_id: pod.id.clone(),
                name_key: key.clone(),
            });
        }
        let reservation = Reservation {
            manager: self,
            id: container.id.clone(),
        };
        let taken = self
            .all()
            .await?
            .into_iter()
            .filter(|other| other.pod_id == pod.id)
            .find(|other| other.name_key(pod) == key);
        if let Some(other) = taken {
            return Err(ContainerError::NameTaken {
                name: key,
                id: other.id.clone(),
            });
        }
        Ok(reservation)
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, Vec<InFlight>> {
        self.creating.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The containers clients see: every record but those of creates still
    /// under way.
    pub async fn listed(&self) -> Result<Vec<Arc<ContainerRecord>>, ContainerError> {
        let mut all = self.all().await?;
        let creating = self.in_flight();
        if !creating.is_empty() {
            all.retain(|c| !creating.iter().any(|f| f.id == c.id));
        }
        Ok(all)
    }

    /// The steps of CreateContainer; `container` records what was made so
    /// that `teardown` undoes exactly that.
    async fn make(
        &self,
        container: &mut ContainerRecord,
        pod: &PodRecord,
        image: &ImageRecord,
        volume_images: &[(usize, ImageRecord)],
    ) -> Result<(), ContainerError> {
        let bundle = container.bundle.clone();
        std::fs::create_dir_all(&bundle).map_err(io_err("create", &bundle))?;
        // Fix: the log's directory is made when nobody has (crictl with a
        // log_path like `name/0.log`), as containerd's openLogFile does;
        // without it the monitor failed CreateContainer with ENOENT.
        if let Some(dir) = container.log_path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        let t0 = std::time::Instant::now();
        let cgroup = match &container.cgroup_path {
            Some(path) => {
                let marker = bundle.join(CGROUP_MARKER);
                std::fs::write(&marker, path).map_err(io_err("write", &marker))?;
                Some(crate::executor::cgroups::CgroupPath::parse(path)?)
            }
            None => None,
        };
        // The cgroup is made while the rootfs is mounted and the spec built:
        // it needs only the CRI config. Always awaited before returning, so
        // that an undo never races it.
        let making_cgroup = match (&self.cgroups, &cgroup) {
            (Some(cgroups), Some(path)) => {
                let resources = spec::cgroup_resources(
                    &container.id,
                    &container.config,
                    &pod.config,
                    spec::HostInfo::get(),
                    None,
                )?;
                let (cgroups, path) = (cgroups.clone(), path.clone());
                // A thread of its own, not the blocking pool: the scheduler
                // places a new thread on an idle CPU, where a pool thread
                // woken by this worker was seen to take the worker's CPU and
                // hold it for the whole cgroup (~0.7 ms of mkdirs on a v1
                // host), which made the two halves run one after the other.
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::Builder::new()
                    .name("berth-cgroup".into())
                    .spawn(move || {
                        let _ = tx.send(cgroups.create(&path, Some(&resources)));
                    })
                    .map_err(io_err("start a thread for", &bundle))?;
                Some(rx)
            }
            _ => None,
        };
        let prepared = self
            .prepare_rootfs_and_spec(
                container,
                pod,
                image,
                volume_images,
                &bundle,
                cgroup.as_ref(),
            )
            .await;
        let made = match making_cgroup {
            Some(task) => Some(task.await.map_err(|e| ContainerError::Io {
                op: "make cgroup",
                path: bundle.clone(),
                source: std::io::Error::other(e),
            })??),
            None => None,
        };
        let (t_rootfs, t_spec, t_written, spec_path) = prepared?;
        let mut procs = Vec::new();
        let mut oom_file = None;
        if let Some(made) = made {
            procs = made.procs_files();
            oom_file = made
                .dirs()
                .into_iter()
                .flat_map(|d| [d.join("memory.events"), d.join("memory.oom_control")])
                .find(|f| f.exists());
        }
        let t_cgroup = t0.elapsed();
        let oom_kill_initial = oom_file
            .as_deref()
            .and_then(|f| monitor::read_oom_kill_count(f).ok())
            .unwrap_or(0);
        let monitor_config = MonitorConfig {
            container_id: container.id.clone(),
            bundle: bundle.clone(),
            spec_path,
            log_path: (!container.log_path.as_os_str().is_empty())
                .then(|| container.log_path.clone()),
            stdin: container.config.stdin,
            stdin_once: container.config.stdin_once,
            tty: container.config.tty,
            cgroup_procs: procs,
            control_socket: container.control_socket(&self.state_dir),
            exit_record: container.exit_record(&self.state_dir),
            pid_file: bundle.join(PID_FILE),
            oom_kill_file: oom_file,
            oom_kill_initial,
            monitor_log: Some(bundle.join("monitor.log")),
            // Read with the layout when the daemon started.
            cgroup_mounts: self.cgroups.as_ref().map(|c| c.layout().mounts.clone()),
        };
        // The record is saved once, while the monitor sets the container
        // up: the commit's fsync is off the critical path. A daemon that
        // dies before both are done leaves a bundle and no record, which
        // `start` undoes.
        container.state = ContainerState::Created;
        let (spawned, saved) = tokio::join!(monitor::spawn(&monitor_config), self.put(container));
        container.pid = spawned?;
        // The init has pivoted into the rootfs: the daemon's mount of it is
        // no longer needed (see `Snapshots::detach`). At 1000 pods those
        // mounts were a fifth of the table each CreateContainer copies. In
        // the background, as the unmount waits for the kernel's RCU grace
        // period; a RemoveContainer meanwhile unmounts the same way.
        let (snapshots, id) = (self.snapshots.clone(), container.id.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = snapshots.detach(&id) {
                tracing::warn!(container = %id, "{e}");
            }
        });
        saved?;
        // The pid is not saved: the monitor writes it to the bundle, where
        // `reconcile` finds it after a restart; StartContainer saves it.
        self.records
            .update_in_memory(&container.id, container)
            .await;
        // Where CreateContainer's time goes, cumulative, for tuning.
        tracing::debug!(
            container = %container.id,
            rootfs_and_user_us = t_rootfs.as_micros() as u64,
            spec_us = t_spec.as_micros() as u64,
            spec_written_us = t_written.as_micros() as u64,
            cgroup_us = t_cgroup.as_micros() as u64,
            monitor_us = t0.elapsed().as_micros() as u64,
            "container made"
        );
        Ok(())
    }

    /// The user namespace that owns the rootfs of the pod's containers: the
    /// pod's own, if it has one.
    fn idmapped_rootfs(&self, pod: &PodRecord) -> Option<IdmappedRootfs> {
        let (root_uid, root_gid) = pod.user_namespace_root()?;
        Some(IdmappedRootfs {
            userns: self.sandboxes.namespace_path(pod, "user")?,
            root_uid,
            root_gid,
        })
    }

    /// The rootfs mounted, the user resolved and the spec written: the part
    /// of `make` that runs while the cgroup is being made. Returns the
    /// times taken (for the debug log) and the spec's path.
    async fn prepare_rootfs_and_spec(
        &self,
        container: &mut ContainerRecord,
        pod: &PodRecord,
        image: &ImageRecord,
        volume_images: &[(usize, ImageRecord)],
        bundle: &Path,
        cgroup: Option<&crate::executor::cgroups::CgroupPath>,
    ) -> Result<(Duration, Duration, Duration, PathBuf), ContainerError> {
        let t0 = std::time::Instant::now();
        let chain_ids = |image: &ImageRecord| -> Vec<_> {
            image.layers.iter().map(|l| l.chain_id.clone()).collect()
        };
        let (snapshots, id) = (self.snapshots.clone(), container.id.clone());
        let rootfs_layers = chain_ids(image);
        let volume_layers: Vec<(usize, Vec<_>)> = volume_images
            .iter()
            .map(|(i, image)| (*i, chain_ids(image)))
            .collect();
        let security = container
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.clone());
        let image_user = image.config.config.user.clone();
        let idmap = self.idmapped_rootfs(pod);
        // One trip to the blocking pool: each costs a thread wake-up both
        // ways, and CreateContainer is on the pod start path.
        let (rootfs, resolved, image_volumes) = blocking(move || -> Result<_, ContainerError> {
            let rootfs = snapshots
                .prepare(&id, &rootfs_layers, idmap.as_ref())?
                .target;
            let resolved = user::resolve(&rootfs, &image_user, security.as_ref())?;
            let mut image_volumes = HashMap::new();
            for (i, layers) in &volume_layers {
                let mounted = snapshots.mount_image_volume(&id, *i, layers, idmap.as_ref())?;
                image_volumes.insert(*i, mounted);
            }
            Ok((rootfs, resolved, image_volumes))
        })
        .await??;
        let t_rootfs = t0.elapsed();
        container.uid = resolved.uid;
        container.gid = resolved.gid;
        container.additional_gids = resolved.additional_gids.clone();

        let volumes_dir = bundle.join("volumes");
        let input = spec::SpecInput {
            container_id: &container.id,
            sandbox_id: &pod.id,
            config: &container.config,
            sandbox: &pod.config,
            pod_namespaces: spec::PodNamespaces {
                net: self.sandboxes.namespace_path(pod, "net"),
                ipc: self.sandboxes.namespace_path(pod, "ipc"),
                uts: self.sandboxes.namespace_path(pod, "uts"),
                pid: self.sandboxes.namespace_path(pod, "pid"),
                target_pid: None,
                user: self.sandboxes.namespace_path(pod, "user"),
            },
            pod_files: spec::PodFiles {
                hostname: pod.dir.join("hostname"),
                resolv_conf: pod.dir.join("resolv.conf"),
                shm: pod.shm.clone(),
            },
            image: &image.config,
            rootfs: &rootfs,
            cgroups_path: cgroup.as_ref().map(ToString::to_string).unwrap_or_default(),
            user: resolved,
            host: spec::HostInfo::get(),
            volumes_dir: &volumes_dir,
            image_volumes: &image_volumes,
            pids_limit: None,
        };
        let spec = spec::build(&input)?;
        if spec
            .process()
            .as_ref()
            .and_then(|p| p.apparmor_profile().as_deref())
            == Some(spec::APPARMOR_DEFAULT_PROFILE)
        {
            let profiles = input.host.apparmor_profiles.clone();
            blocking(move || {
                apparmor::ensure_default_profile(spec::APPARMOR_DEFAULT_PROFILE, &profiles)
            })
            .await??;
        }
        let t_spec = t0.elapsed();
        let spec_path = bundle.join("config.json");
        let spec_json = serde_json::to_vec(&spec).map_err(|e| ContainerError::Io {
            op: "encode spec",
            path: spec_path.clone(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&spec_path, spec_json).map_err(io_err("write", &spec_path))?;

        let t_written = t0.elapsed();
        Ok((t_rootfs, t_spec, t_written, spec_path))
    }

    /// Undoes what a container may have: its process, snapshot, cgroup,
    /// bundle and exit record. Idempotent. The log file stays: kubelet owns it.
    async fn teardown(&self, container: &ContainerRecord) -> Result<(), ContainerError> {
        let running = matches!(
            container.state,
            ContainerState::Created | ContainerState::Running | ContainerState::Creating
        );
        if running {
            self.kill_and_wait(container, Signal::SIGKILL, KILL_WAIT)
                .await;
        }
        let (snapshots, id) = (self.snapshots.clone(), container.id.clone());
        blocking(move || snapshots.remove(&id)).await??;
        if let (Some(cgroups), Some(path)) = (&self.cgroups, &container.cgroup_path) {
            let path = crate::executor::cgroups::CgroupPath::parse(path)?;
            let cgroup = cgroups.open(&path);
            let _ = cgroup.kill_all(Duration::from_secs(2));
            cgroup.delete()?;
        }
        for path in [
            container.control_socket(&self.state_dir),
            container.exit_record(&self.state_dir),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ContainerError::Io {
                        op: "remove",
                        path,
                        source,
                    });
                }
            }
        }
        match std::fs::remove_dir_all(&container.bundle) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ContainerError::Io {
                op: "remove",
                path: container.bundle.clone(),
                source,
            }),
        }
    }

    /// Signals the container through its monitor and waits up to `limit`
    /// for its exit record. True when it exited.
    async fn kill_and_wait(
        &self,
        container: &ContainerRecord,
        signal: Signal,
        limit: Duration,
    ) -> bool {
        let record = container.exit_record(&self.state_dir);
        if record.exists() {
            return true;
        }
        let mut exits = self.exits.subscribe();
        let client = MonitorClient::new(container.control_socket(&self.state_dir));
        if let Err(e) = client.signal(signal).await {
            // A monitor that is gone cannot report an exit either.
            tracing::debug!(container = %container.id, "signal {signal}: {e}");
            return record.exists();
        }
        let wait = async {
            loop {
                match exits.recv().await {
                    Ok(id) if id == container.id => return,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if record.exists() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok() || record.exists()
    }

    /// StartContainer.
    pub async fn start_container(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id).await?;
        let _lock = self.locks.lock(&container.id).await;
        let mut container = self.get(&container.id).await?;
        if container.state != ContainerState::Created {
            return Err(ContainerError::WrongState {
                id: container.id,
                state: container.state.name(),
                action: "start",
                needed: "created",
            });
        }
        let client = MonitorClient::new(container.control_socket(&self.state_dir));
        match client.start().await {
            Ok(_) => {
                container.state = ContainerState::Running;
                container.started_at = now_ns();
                self.put(&container).await?;
                self.events.publish(
                    &container.id,
                    &container.pod_id,
                    EventKind::Started,
                    container.started_at,
                );
                // Fix: a process that exits at once may have had its exit
                // filed by the watcher (which does not take this lock)
                // before the put above, which then overwrote Exited with
                // Running for good. File it again now that Running is
                // stored; an exit recorded after this is the watcher's.
                self.record_exit_if_written(&container).await?;
                Ok(())
            }
            Err(e) => {
                // The monitor wrote a StartError record; the watcher files it.
                Err(ContainerError::Monitor(e))
            }
        }
    }

    /// StopContainer: the stop signal, then SIGKILL after `timeout` seconds.
    /// Returns when the process is gone. Not running is not an error.
    pub async fn stop(&self, id: &str, timeout: i64) -> Result<(), ContainerError> {
        let container = match self.get(id).await {
            Ok(c) => c,
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _lock = self.locks.lock(&container.id).await;
        let container = self.get(&container.id).await?;
        if container.state != ContainerState::Running {
            return Ok(());
        }
        let grace = Duration::from_secs(u64::try_from(timeout).unwrap_or(0));
        let signal = parse_signal(&container.stop_signal).unwrap_or(Signal::SIGTERM);
        if grace.is_zero() || !self.kill_and_wait(&container, signal, grace).await {
            self.kill_and_wait(&container, Signal::SIGKILL, KILL_WAIT)
                .await;
        }
        self.record_exit_if_written(&container).await
    }

    async fn record_exit_if_written(
        &self,
        container: &ContainerRecord,
    ) -> Result<(), ContainerError> {
        if container.exit_record(&self.state_dir).exists() {
            self.record_exit(&container.id).await?;
        }
        Ok(())
    }

    /// RemoveContainer: stops it if needed and removes everything but the log.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let container = match self.get(id).await {
            Ok(c) => c,
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _lock = self.locks.lock(&container.id).await;
        let container = self.get(&container.id).await?;
        self.teardown(&container).await?;
        self.cpu_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&container.id);
        self.delete_record(&container.id).await?;
        self.events.publish(
            &container.id,
            &container.pod_id,
            EventKind::Deleted,
            now_ns(),
        );
        Ok(())
    }

    /// Removes every container of a pod (RemovePodSandbox) or stops them
    /// (StopPodSandbox, with `remove` false).
    pub async fn for_pod(&self, pod_id: &str, remove: bool) -> Result<(), ContainerError> {
        // A create in flight holds its id's lock until it has saved its
        // record or undone itself.
        let in_flight: Vec<String> = self
            .in_flight()
            .iter()
            .filter(|c| c.pod_id == pod_id)
            .map(|c| c.id.clone())
            .collect();
        for id in in_flight {
            drop(self.locks.lock(&id).await);
        }
        for container in self.all().await?.into_iter().filter(|c| c.pod_id == pod_id) {
            if remove {
                self.remove(&container.id).await?;
            } else {
                self.stop(&container.id, 0).await?;
            }
        }
        Ok(())
    }

    /// ExecSync: runs `cmd` in a running container and waits for it.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<exec::ExecOutput, ContainerError> {
        let target = self.exec_target(id).await?;
        Ok(exec::exec_sync(
            &target.bundle,
            target.pid,
            cmd,
            &target.cgroup_procs,
            timeout,
        )
        .await?)
    }

    /// Starts `cmd` in the running container with its stdio wired to the
    /// caller (the streaming server's Exec).
    pub async fn exec_interactive(
        &self,
        id: &str,
        cmd: &[String],
        stdin: bool,
        tty: bool,
    ) -> Result<exec::ExecProcess, ContainerError> {
        let target = self.exec_target(id).await?;
        Ok(exec::exec_interactive(
            &target.bundle,
            target.pid,
            cmd,
            &target.cgroup_procs,
            stdin,
            tty,
        )
        .await?)
    }

    /// What an exec joins: the running container's init and cgroup.
    async fn exec_target(&self, id: &str) -> Result<ExecTarget, ContainerError> {
        let container = self.running(id, "exec").await?;
        let cgroup_procs = match (&self.cgroups, &container.cgroup_path) {
            (Some(cgroups), Some(path)) => cgroups
                .open(&crate::executor::cgroups::CgroupPath::parse(path)?)
                .procs_files(),
            _ => Vec::new(),
        };
        Ok(ExecTarget {
            bundle: container.bundle,
            pid: container.pid,
            cgroup_procs,
        })
    }

    /// The running container `id` (prefix allowed), or why `action` cannot
    /// be done to it.
    pub async fn running(
        &self,
        id: &str,
        action: &'static str,
    ) -> Result<ContainerRecord, ContainerError> {
        let container = self.get(id).await?;
        if container.state != ContainerState::Running {
            return Err(ContainerError::WrongState {
                id: container.id,
                state: container.state.name(),
                action,
                needed: "running",
            });
        }
        Ok(container)
    }

    /// The monitor client of the running container `id` for an attach,
    /// with whether it has a tty.
    pub async fn attach_target(&self, id: &str) -> Result<(MonitorClient, bool), ContainerError> {
        let container = self.running(id, "attach").await?;
        Ok((
            MonitorClient::new(container.control_socket(&self.state_dir)),
            container.config.tty,
        ))
    }

    /// UpdateContainerResources: applied to the live cgroup, then kept in
    /// the record so that ContainerStatus reports them.
    pub async fn update_resources(
        &self,
        id: &str,
        resources: k8s_cri::v1::LinuxContainerResources,
    ) -> Result<(), ContainerError> {
        let container = self.get(id).await?;
        let _lock = self.locks.lock(&container.id).await;
        let mut container = self.get(&container.id).await?;
        if !matches!(
            container.state,
            ContainerState::Created | ContainerState::Running
        ) {
            return Err(ContainerError::WrongState {
                id: container.id,
                state: container.state.name(),
                action: "updating resources",
                needed: "created or running",
            });
        }
        let oci = spec::linux_resources(&container.id, &resources, spec::HostInfo::get(), None)?;
        if let (Some(cgroups), Some(path)) = (&self.cgroups, &container.cgroup_path) {
            let cgroup = cgroups.open(&crate::executor::cgroups::CgroupPath::parse(path)?);
            blocking(move || cgroup.apply(&oci)).await??;
        }
        container
            .config
            .linux
            .get_or_insert_with(Default::default)
            .resources = Some(resources);
        self.put(&container).await
    }

    /// Usage of a container: its cgroup's counters, CPU rate since the last
    /// sample, and its writable layer.
    pub async fn usage(
        &self,
        container: &ContainerRecord,
    ) -> Result<ContainerUsage, ContainerError> {
        let cgroup = match (&self.cgroups, &container.cgroup_path) {
            (Some(cgroups), Some(path)) => {
                Some(cgroups.open(&crate::executor::cgroups::CgroupPath::parse(path)?))
            }
            _ => None,
        };
        let (snapshots, id) = (self.snapshots.clone(), container.id.clone());
        let (read, writable) = blocking(move || {
            let read = cgroup
                .map(|c| Ok::<_, CgroupError>((c.stats()?, oom_kills(&c)?)))
                .transpose();
            (read, snapshots.usage(&id))
        })
        .await?;
        let (stats, oom_kills) = match read? {
            Some((stats, oom_kills)) => (Some(stats), oom_kills),
            None => (None, None),
        };
        let timestamp = now_ns();
        let nano_cores = stats.as_ref().and_then(|s| s.cpu.as_ref()).and_then(|cpu| {
            let mut samples = self.cpu_samples.lock().unwrap_or_else(|p| p.into_inner());
            let previous = samples.insert(container.id.clone(), (timestamp, cpu.usage_ns));
            previous.and_then(|(t, u)| {
                let elapsed = u64::try_from(timestamp - t).ok().filter(|e| *e > 0)?;
                let used = cpu.usage_ns.checked_sub(u)?;
                Some(((u128::from(used) * 1_000_000_000) / u128::from(elapsed)) as u64)
            })
        });
        Ok(ContainerUsage {
            timestamp,
            cgroup: stats,
            oom_kills,
            nano_cores,
            writable_layer: writable.unwrap_or_default(),
            writable_layer_mount: self.images.root().to_path_buf(),
        })
    }

    /// ReopenContainerLog: the monitor reopens the log file kubelet rotated.
    pub async fn reopen_log(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.running(id, "reopening the log").await?;
        MonitorClient::new(container.control_socket(&self.state_dir))
            .reopen_log()
            .await?;
        Ok(())
    }

    pub fn events(&self) -> &crate::events::Events {
        &self.events
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn cgroups(&self) -> Option<&CgroupManager> {
        self.cgroups.as_ref()
    }
}

/// The cgroup's OOM kill count, or `None` where the kernel keeps none: a
/// count that cannot exist is left out of stats, never reported as 0.
fn oom_kills(cgroup: &crate::executor::cgroups::Cgroup) -> Result<Option<u64>, CgroupError> {
    match cgroup.oom_kill_count() {
        Ok(count) => Ok(Some(count)),
        Err(CgroupError::NoOomKillCounter { .. } | CgroupError::MissingController { .. }) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Where the container's CRI log goes; empty when the pod has no log
/// directory or the container no log path. containerd drops the output
/// then, and so does berth: kept elsewhere, under the state directory in
/// /run, nothing would rotate it (kubelet rotates only the logs it asked
/// for), and a talkative container would fill the node's memory.
fn log_path(pod: &PodRecord, config: &ContainerConfig) -> Result<PathBuf, ContainerError> {
    if config.log_path.is_empty() || pod.config.log_directory.is_empty() {
        return Ok(PathBuf::new());
    }
    let relative = Path::new(&config.log_path);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ContainerError::Invalid {
            field: "config.log_path",
            message: format!(
                "{:?} must be relative to the pod's log directory",
                config.log_path
            ),
        });
    }
    Ok(Path::new(&pod.config.log_directory).join(relative))
}

/// `SIGTERM`, `TERM` or `15`.
pub fn parse_signal(name: &str) -> Option<Signal> {
    use std::str::FromStr;
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    if let Ok(n) = name.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&full).ok()
}

/// Labels match a selector when every selector pair is present.
pub fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    crate::sandbox::labels_match(labels, selector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_parse_in_every_form() {
        assert_eq!(parse_signal("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("quit"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal(""), None);
        assert_eq!(parse_signal("SIGNOPE"), None);
    }

    #[test]
    fn records_from_before_image_volumes_decode_without_them() {
        let mut record = ContainerRecord::bare("c1", PathBuf::from("/b"), None);
        record.volume_image_ids = vec!["sha256:ab".into()];
        let mut stored = serde_json::to_value(&record).expect("encode");
        assert_eq!(stored["volume_image_ids"][0], "sha256:ab");
        stored
            .as_object_mut()
            .expect("a record is an object")
            .remove("volume_image_ids");
        let old: ContainerRecord = serde_json::from_value(stored).expect("decode an older record");
        assert!(old.volume_image_ids.is_empty());
    }
}
