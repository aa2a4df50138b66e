//! One endpoint under test: its connection, its daemon process, the timings
//! and memory samples taken from it, and why it stopped if it did.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::client::{Conn, Failure};
use super::procfs::{self, Flavor, Group, ProcMemory};

/// Memory of one endpoint's processes at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Snapshot {
    pub daemon: Option<ProcMemory>,
    /// Per-container helpers: berth monitors or containerd shims.
    pub helpers: Group,
    /// Pod infra processes the runtime reported (containerd's pause), when
    /// they were looked up.
    pub infra: Group,
}

impl Snapshot {
    pub fn total_rss_kib(&self) -> u64 {
        self.daemon.map_or(0, |d| d.rss_kib) + self.helpers.rss_kib + self.infra.rss_kib
    }

    pub fn total_pss_kib(&self) -> u64 {
        self.daemon.and_then(|d| d.pss_kib).unwrap_or(0) + self.helpers.pss_kib + self.infra.pss_kib
    }
}

/// Per-pod memory overhead from the density scenario.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DensityMemory {
    pub pods: usize,
    pub before: Snapshot,
    pub after: Snapshot,
    /// (daemon + helpers + infra RSS growth) / pods.
    pub per_pod_rss_kib: f64,
    /// The same with PSS.
    pub per_pod_pss_kib: f64,
}

impl DensityMemory {
    pub fn new(pods: usize, before: Snapshot, after: Snapshot) -> DensityMemory {
        let per = |a: u64, b: u64| (a as f64 - b as f64) / pods.max(1) as f64;
        DensityMemory {
            pods,
            before,
            after,
            per_pod_rss_kib: per(after.total_rss_kib(), before.total_rss_kib()),
            per_pod_pss_kib: per(after.total_pss_kib(), before.total_pss_kib()),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct MemoryReport {
    /// What the per-container helpers are (`berth monitor`, `containerd-shim`).
    pub helper: &'static str,
    pub start: Snapshot,
    pub end: Snapshot,
    /// Highest daemon RSS seen by a 50 ms sampler during the scenario.
    pub daemon_peak_rss_kib: Option<u64>,
    /// Lifecycle: with one pod and its container running.
    pub one_pod: Option<Snapshot>,
    pub density: Option<DensityMemory>,
}

pub struct Target {
    /// 0 for --endpoint, 1 for --compare.
    pub index: usize,
    pub url: String,
    pub socket: PathBuf,
    pub conn: Conn,
    pub runtime_name: String,
    pub runtime_version: String,
    pub daemon_pid: Option<i32>,
    /// The daemon's binary (`/proc/<pid>/exe`), which berth's monitors share.
    daemon_exe: Option<PathBuf>,
    /// How the daemon was found: `socket owner`, `--daemon-pid`, `not found`.
    pub daemon_found_by: &'static str,
    pub flavor: Flavor,
    pub failure: Option<Failure>,
    /// RPCs this endpoint answered Unimplemented that the scenario can do
    /// without (containers, ExecSync): later cycles skip them.
    pub skipped: Vec<Failure>,
    /// Timings per operation, in the order operations were first seen.
    pub ops: Vec<(String, Vec<Duration>)>,
    pub memory: MemoryReport,
    /// Pull: the image's size as this endpoint reports it.
    pub image_size: Option<u64>,
    /// Whether the image was there before the bench (then it stays).
    pub image_was_present: Option<bool>,
    pub notes: Vec<String>,
    seq: u64,
    peak: Option<(Arc<AtomicU64>, tokio::task::JoinHandle<()>)>,
}

impl Target {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        url: String,
        socket: PathBuf,
        conn: Conn,
        daemon_pid: Option<i32>,
        daemon_found_by: &'static str,
        flavor: Flavor,
    ) -> Target {
        Target {
            index,
            url,
            socket,
            conn,
            runtime_name: String::new(),
            runtime_version: String::new(),
            daemon_pid,
            daemon_exe: daemon_pid.and_then(procfs::exe),
            daemon_found_by,
            flavor,
            failure: None,
            skipped: Vec::new(),
            ops: Vec::new(),
            memory: MemoryReport::default(),
            image_size: None,
            image_was_present: None,
            notes: Vec::new(),
            seq: 0,
            peak: None,
        }
    }

    /// Short name for tables: the runtime's name, else A or B.
    pub fn name(&self) -> String {
        if self.runtime_name.is_empty() {
            ["A", "B"].get(self.index).unwrap_or(&"?").to_string()
        } else {
            self.runtime_name.clone()
        }
    }

    pub fn active(&self) -> bool {
        self.failure.is_none()
    }

    /// Stops this endpoint's part in the scenario (the first failure wins).
    pub fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
    }

    /// False once `op` answered Unimplemented (see `skip`).
    pub fn implements(&self, op: &str) -> bool {
        !self.skipped.iter().any(|f| f.op == op)
    }

    /// Pods can get a running container here.
    pub fn with_containers(&self) -> bool {
        self.implements("CreateContainer") && self.implements("StartContainer")
    }

    /// Remembers an Unimplemented RPC that the scenario goes on without.
    pub fn skip(&mut self, failure: Failure) {
        if self.implements(&failure.op) {
            self.skipped.push(failure);
        }
    }

    /// Records `d` unless this is a warm-up.
    pub fn keep(&mut self, record: bool, op: &str, d: Duration) {
        if record {
            self.record(op, d);
        }
    }

    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub fn record(&mut self, op: &str, d: Duration) {
        match self.ops.iter_mut().find(|(name, _)| name == op) {
            Some((_, samples)) => samples.push(d),
            None => self.ops.push((op.to_string(), vec![d])),
        }
    }

    /// Daemon and helpers now (no infra: that needs the runtime's answer).
    pub fn snapshot(&self) -> Snapshot {
        // berth's daemon comes with its monitor zygote: one process more
        // for the daemon's share, whatever the number of containers.
        let daemon = self.daemon_pid.and_then(procfs::memory).map(|d| {
            match self.daemon_pid.and_then(procfs::zygote_of) {
                Some(z) => d.plus(&z),
                None => d,
            }
        });
        Snapshot {
            daemon,
            helpers: Group::of(&procfs::helpers(
                &self.flavor,
                self.daemon_pid,
                self.daemon_exe.as_deref(),
            )),
            infra: Group::default(),
        }
    }

    /// The same, plus the infra processes of `pods` as the runtime reports them.
    pub async fn snapshot_with_infra(&mut self, pods: &[String]) -> Snapshot {
        let mut infra = Vec::new();
        for pod in pods {
            if let Some(pid) = self.conn.pod_infra_pid(pod).await
                && let Some(m) = procfs::memory(pid)
            {
                infra.push(m);
            }
        }
        Snapshot {
            infra: Group::of(&infra),
            ..self.snapshot()
        }
    }

    /// Starts sampling the daemon's RSS every 50 ms for its peak.
    pub fn start_peak_sampler(&mut self) {
        let Some(pid) = self.daemon_pid else {
            return;
        };
        let peak = Arc::new(AtomicU64::new(0));
        let seen = peak.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                if let Some(rss) = procfs::rss_kib(pid) {
                    seen.fetch_max(rss, Ordering::Relaxed);
                }
            }
        });
        self.peak = Some((peak, task));
    }

    pub fn stop_peak_sampler(&mut self) {
        if let Some((peak, task)) = self.peak.take() {
            task.abort();
            let value = peak.load(Ordering::Relaxed);
            self.memory.daemon_peak_rss_kib = (value > 0).then_some(value);
        }
    }
}
