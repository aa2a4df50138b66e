//! The container tests' rig: one daemon per test, pods and containers made
//! through the CRI, removed when the test ends (also when it panics), and the
//! host checked for leftovers (processes, mounts, cgroups). Shared by the
//! test binaries that run containers (`container`, `streaming`).
#![allow(dead_code)] // each test binary uses part of it

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::common::{self, LOOPBACK_REGISTRY_CONFIG, Options, TestDaemon, TestImages};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use nix::sys::signal::Signal;
use tonic::transport::Channel;

/// Bound on one CRI call: a call that hangs fails the test instead of the run.
pub const RPC_LIMIT: Duration = Duration::from_secs(90);
/// Bound on a container reaching a state it is expected to reach.
pub const STATE_LIMIT: Duration = Duration::from_secs(30);

/// A process that lives until it is killed. `sleep` as PID 1 has no handler
/// for SIGTERM, so tests stop it with timeout 0 (straight to SIGKILL).
pub const SLEEPER: &[&str] = &["sleep", "100000"];

pub static NEXT_RIG: AtomicU32 = AtomicU32::new(0);

pub fn root_or_skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: containers need root (namespaces, mounts, cgroups)");
        return false;
    }
    true
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub async fn within<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not return within {limit:?}"),
    }
}

pub fn strs(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn sh(script: &str) -> [&str; 3] {
    ["sh", "-c", script]
}

/// One test's daemon, pods and images, removed when it ends.
pub struct Rig {
    pub daemon: TestDaemon,
    /// Daemons this rig killed: kept so that their directories (which the
    /// running daemon reuses) stay until the end.
    pub retired: Vec<TestDaemon>,
    pub config_toml: String,
    pub images: Option<TestImages>,
    pub client: RuntimeServiceClient<Channel>,
    pub image_client: ImageServiceClient<Channel>,
    /// Unique per rig: names pods, cgroup parents, bridge and nft table.
    pub tag: String,
    pub pods: HashMap<String, PodSandboxConfig>,
    pub cgroup_parents: Vec<String>,
    /// Set once the test's objects were removed through the CRI.
    pub clean: bool,
    /// The running daemon's pid; `None` between a kill and a restart.
    pub daemon_pid: Option<i32>,
}

impl Rig {
    /// A daemon for a test that uses the rig's registry images; `None`
    /// (with the reason printed) where this machine cannot run it.
    pub async fn start() -> Option<Rig> {
        let images = TestImages::load()?;
        Self::start_with(Some(images)).await
    }

    /// A daemon for a test that brings its own images.
    pub async fn start_with(images: Option<TestImages>) -> Option<Rig> {
        Self::start_from(images, None).await
    }

    /// A daemon run from `binary` (a copy of berth) instead of cargo's.
    pub async fn start_from(images: Option<TestImages>, binary: Option<PathBuf>) -> Option<Rig> {
        if !root_or_skip() {
            return None;
        }
        let n = NEXT_RIG.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}x{n}", std::process::id() % 100_000);
        // The built-in network is never used by these hostNetwork pods;
        // its names are still this rig's own, so nothing can meet another
        // test's network if it were.
        let config_toml = format!(
            "{LOOPBACK_REGISTRY_CONFIG}[network]\nmode = \"builtin\"\nbridge = \"bct{tag}\"\nnft_table = \"berth_ct{tag}\"\nmasquerade = false\npod_cidr = \"10.213.{}.0/24\"\n",
            n % 250
        );
        let daemon = TestDaemon::start_with(Options {
            config_toml: config_toml.clone(),
            binary,
            ..Options::default()
        });
        let client = daemon.runtime().await;
        let image_client = daemon.images().await;
        Some(Rig {
            retired: Vec::new(),
            config_toml,
            images,
            client,
            image_client,
            tag,
            pods: HashMap::new(),
            cgroup_parents: Vec::new(),
            clean: false,
            daemon_pid: Some(daemon.pid().as_raw()),
            daemon,
        })
    }

    pub fn images(&self) -> &TestImages {
        self.images.as_ref().expect("this rig has the test images")
    }

    /// Where everything of the test's daemon lives (root, state, logs).
    pub fn base(&self) -> PathBuf {
        self.retired
            .first()
            .unwrap_or(&self.daemon)
            .dir
            .path()
            .to_path_buf()
    }

    pub fn rt(&self) -> RuntimeServiceClient<Channel> {
        self.client.clone()
    }

    /// Pulls a rig image by key; returns its reference.
    pub async fn pull(&self, key: &str) -> String {
        let reference = self.images().reference(key);
        self.pull_reference(&reference).await;
        reference
    }

    pub async fn pull_reference(&self, reference: &str) {
        let mut client = self.image_client.clone();
        within(
            "PullImage",
            RPC_LIMIT,
            client.pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: reference.to_string(),
                    ..ImageSpec::default()
                }),
                ..PullImageRequest::default()
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("pull {reference}: {e}"));
    }

    /// A hostNetwork pod config with its own log directory and cgroup parent.
    pub fn pod_config(&mut self, name: &str) -> PodSandboxConfig {
        let log_directory = self.base().join("logs").join(name);
        std::fs::create_dir_all(&log_directory).expect("create pod log dir");
        let cgroup_parent = format!("/berth-ct-{}-{name}", self.tag);
        self.cgroup_parents.push(cgroup_parent.clone());
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: format!("uid-{}-{name}", self.tag),
                namespace: "container-test".to_string(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: log_directory.display().to_string(),
            labels: [("pod".to_string(), name.to_string())].into(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent,
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces()),
                    ..LinuxSandboxSecurityContext::default()
                }),
                ..LinuxPodSandboxConfig::default()
            }),
            ..PodSandboxConfig::default()
        }
    }

    pub async fn pod(&mut self, name: &str) -> String {
        let config = self.pod_config(name);
        self.run_pod(config).await
    }

    pub async fn run_pod(&mut self, config: PodSandboxConfig) -> String {
        let mut client = self.rt();
        let id = within(
            "RunPodSandbox",
            RPC_LIMIT,
            client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }),
        )
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
        self.pods.insert(id.clone(), config);
        id
    }

    pub fn log_dir(&self, pod: &str) -> PathBuf {
        PathBuf::from(&self.pods[pod].log_directory)
    }

    pub async fn try_create(
        &self,
        pod: &str,
        config: ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let mut client = self.rt();
        within(
            "CreateContainer",
            RPC_LIMIT,
            client.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.to_string(),
                config: Some(config),
                sandbox_config: self.pods.get(pod).cloned(),
            }),
        )
        .await
        .map(|r| r.into_inner().container_id)
    }

    pub async fn create(&self, pod: &str, config: ContainerConfig) -> String {
        let name = config.metadata.clone().unwrap_or_default().name;
        self.try_create(pod, config)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
    }

    pub async fn try_start(&self, id: &str) -> Result<(), tonic::Status> {
        let mut client = self.rt();
        within(
            "StartContainer",
            RPC_LIMIT,
            client.start_container(StartContainerRequest {
                container_id: id.to_string(),
            }),
        )
        .await
        .map(|_| ())
    }

    pub async fn start_container(&self, id: &str) {
        self.try_start(id)
            .await
            .unwrap_or_else(|e| panic!("StartContainer {id}: {e}"));
    }

    /// Create + start.
    pub async fn run(&self, pod: &str, config: ContainerConfig) -> String {
        let id = self.create(pod, config).await;
        self.start_container(&id).await;
        id
    }

    pub async fn try_stop(&self, id: &str, timeout: i64) -> Result<(), tonic::Status> {
        let mut client = self.rt();
        within(
            "StopContainer",
            RPC_LIMIT,
            client.stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout,
            }),
        )
        .await
        .map(|_| ())
    }

    pub async fn stop(&self, id: &str, timeout: i64) {
        self.try_stop(id, timeout)
            .await
            .unwrap_or_else(|e| panic!("StopContainer {id}: {e}"));
    }

    pub async fn remove(&self, id: &str) {
        let mut client = self.rt();
        within(
            "RemoveContainer",
            RPC_LIMIT,
            client.remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e}"));
    }

    pub async fn try_status(&self, id: &str) -> Result<ContainerStatusResponse, tonic::Status> {
        let mut client = self.rt();
        within(
            "ContainerStatus",
            RPC_LIMIT,
            client.container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: true,
            }),
        )
        .await
        .map(|r| r.into_inner())
    }

    pub async fn status(&self, id: &str) -> ContainerStatus {
        self.try_status(id)
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
            .status
            .expect("ContainerStatus has a status")
    }

    /// The verbose info of ContainerStatus (pid, runtimeSpec, …).
    pub async fn info(&self, id: &str) -> serde_json::Value {
        let response = self
            .try_status(id)
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"));
        serde_json::from_str(response.info.get("info").expect("verbose info"))
            .expect("info is JSON")
    }

    /// The container's init pid as the host sees it.
    pub async fn pid(&self, id: &str) -> i32 {
        let pid = self.info(id).await["pid"].as_i64().expect("pid in info");
        i32::try_from(pid).expect("pid fits i32")
    }

    /// The container's cgroup, from the OCI spec in the verbose info.
    pub async fn cgroup(&self, id: &str) -> String {
        self.info(id).await["runtimeSpec"]["linux"]["cgroupsPath"]
            .as_str()
            .expect("runtimeSpec.linux.cgroupsPath")
            .to_string()
    }

    pub async fn wait_state(&self, id: &str, state: ContainerState) -> ContainerStatus {
        let deadline = Instant::now() + STATE_LIMIT;
        loop {
            let status = self.status(id).await;
            if status.state == state as i32 {
                return status;
            }
            if Instant::now() >= deadline {
                let state_dir = &self.daemon.state;
                let record = state_dir.join("exits").join(&status.id);
                let monitor_log = state_dir
                    .join("containers")
                    .join(&status.id)
                    .join("monitor.log");
                panic!(
                    "container {id} not {state:?} within {STATE_LIMIT:?}: {status:?}\nexit record: {:?}\nmonitor log: {}\n{}",
                    std::fs::read_to_string(&record).ok(),
                    std::fs::read_to_string(&monitor_log).unwrap_or_default(),
                    self.daemon.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_exited(&self, id: &str) -> ContainerStatus {
        self.wait_state(id, ContainerState::ContainerExited).await
    }

    pub async fn try_exec(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<ExecSyncResponse, tonic::Status> {
        let mut client = self.rt();
        within(
            "ExecSync",
            RPC_LIMIT,
            client.exec_sync(ExecSyncRequest {
                container_id: id.to_string(),
                cmd: strs(cmd),
                timeout,
            }),
        )
        .await
        .map(|r| r.into_inner())
    }

    /// ExecSync that must succeed as a call: (exit code, stdout, stderr).
    pub async fn exec(&self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let out = self
            .try_exec(id, cmd, 30)
            .await
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"));
        (
            out.exit_code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// ExecSync of a command that must exit 0; its stdout.
    pub async fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let (code, stdout, stderr) = self.exec(id, cmd).await;
        assert_eq!(
            code, 0,
            "{cmd:?} in {id}: stdout {stdout:?} stderr {stderr:?}"
        );
        stdout
    }

    /// The containers ListContainers answers with `filter`, as they come.
    pub async fn listed(&self, filter: Option<ContainerFilter>) -> Vec<Container> {
        let mut client = self.rt();
        within(
            "ListContainers",
            RPC_LIMIT,
            client.list_containers(ListContainersRequest { filter }),
        )
        .await
        .expect("ListContainers")
        .into_inner()
        .containers
    }

    pub async fn list(&self, filter: ContainerFilter) -> Vec<String> {
        let mut ids: Vec<String> = self
            .listed(Some(filter))
            .await
            .into_iter()
            .map(|c| c.id)
            .collect();
        ids.sort();
        ids
    }

    /// SIGKILLs the daemon; `restart_daemon` starts another.
    pub fn kill_daemon(&mut self) {
        self.daemon.signal(Signal::SIGKILL);
        self.daemon
            .wait_exit(Duration::from_secs(10))
            .expect("daemon dies of SIGKILL");
        self.daemon_pid = None;
    }

    /// Starts a daemon on the directories of the one `kill_daemon` killed.
    pub async fn restart_daemon(&mut self) {
        let restarted = TestDaemon::start_with(Options {
            config_toml: self.config_toml.clone(),
            socket: Some(self.daemon.socket.clone()),
            root: Some(self.daemon.root.clone()),
            state: Some(self.daemon.state.clone()),
            ..Options::default()
        });
        self.daemon_pid = Some(restarted.pid().as_raw());
        let old = std::mem::replace(&mut self.daemon, restarted);
        self.retired.push(old);
        self.client = self.daemon.runtime().await;
        self.image_client = self.daemon.images().await;
    }

    /// The rig's built-in network (made when a pod first has its own
    /// network namespace): bridge and nftables table.
    fn remove_network(&self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &format!("bct{}", self.tag)])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &format!("berth_ct{}", self.tag)])
            .stderr(std::process::Stdio::null())
            .status();
    }

    /// Removes everything through the CRI and checks that no process,
    /// mount or cgroup of the test is left.
    pub async fn finish(mut self) {
        let errors = remove_everything(&self.daemon.socket).await;
        self.remove_network();
        assert!(errors.is_empty(), "cleanup through the CRI: {errors:?}");
        self.clean = true;
        let leftovers = poll_leftovers(&self.base(), &self.cgroup_parents, self.daemon_pid).await;
        if !leftovers.is_empty() {
            force_cleanup(&self.base(), &self.cgroup_parents, self.daemon_pid);
            panic!(
                "left after every container, pod and image was removed: {leftovers:#?}\n{}",
                self.daemon.log()
            );
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.clean {
            return;
        }
        // A failed test: remove what it made through the daemon, from a
        // thread of its own (this one may be inside the test's runtime).
        let socket = &self.daemon.socket;
        let outcome = common::block_on_own_thread(async {
            tokio::time::timeout(Duration::from_secs(120), remove_everything(socket)).await
        });
        match outcome {
            Some(Ok(errors)) if errors.is_empty() => {}
            other => eprintln!("cleanup through the CRI failed: {other:?}"),
        }
        // What the daemon could not remove goes by force, so that a failed
        // test leaves nothing on the machine either.
        let leftovers = leftovers(&self.base(), &self.cgroup_parents, self.daemon_pid);
        if !leftovers.is_empty() {
            eprintln!("removing by force: {leftovers:#?}");
            force_cleanup(&self.base(), &self.cgroup_parents, self.daemon_pid);
        }
        self.remove_network();
    }
}

/// Removes every container, pod and image of the daemon at `socket` (each
/// test has its own daemon, so all of them are the test's). The errors.
pub async fn remove_everything(socket: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    let channel = common::connect(socket).await;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    match rt.list_containers(ListContainersRequest::default()).await {
        Ok(list) => {
            for c in list.into_inner().containers {
                if let Err(e) = rt
                    .remove_container(RemoveContainerRequest {
                        container_id: c.id.clone(),
                    })
                    .await
                {
                    errors.push(format!("remove container {}: {e}", c.id));
                }
            }
        }
        Err(e) => errors.push(format!("list containers: {e}")),
    }
    match rt.list_pod_sandbox(ListPodSandboxRequest::default()).await {
        Ok(list) => {
            for pod in list.into_inner().items {
                let id = pod.id;
                if let Err(e) = rt
                    .stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await
                {
                    errors.push(format!("stop pod {id}: {e}"));
                }
                if let Err(e) = rt
                    .remove_pod_sandbox(RemovePodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await
                {
                    errors.push(format!("remove pod {id}: {e}"));
                }
            }
        }
        Err(e) => errors.push(format!("list pods: {e}")),
    }
    match images.list_images(ListImagesRequest::default()).await {
        Ok(list) => {
            for image in list.into_inner().images {
                if let Err(e) = images
                    .remove_image(RemoveImageRequest {
                        image: Some(ImageSpec {
                            image: image.id.clone(),
                            ..ImageSpec::default()
                        }),
                    })
                    .await
                {
                    errors.push(format!("remove image {}: {e}", image.id));
                }
            }
        }
        Err(e) => errors.push(format!("list images: {e}")),
    }
    errors
}

// ------------------------------------------------------------ host checks

/// One process of /proc.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub cmdline: String,
}

pub fn processes() -> Vec<Proc> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) S ppid …`; comm may hold spaces and parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        found.push(Proc {
            pid,
            ppid,
            state,
            cmdline,
        });
    }
    found
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    processes()
        .iter()
        .any(|p| p.pid == pid && p.state != 'Z' && p.state != 'X')
}

/// Waits up to 10 s for `pid` to be gone.
pub async fn wait_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// The processes that run a berth of this test: the daemon, monitors and
/// exec helpers (their command lines name the test's directories).
pub fn berth_processes(base: &Path, daemon_pid: Option<i32>) -> Vec<Proc> {
    let base = base.display().to_string();
    processes()
        .into_iter()
        .filter(|p| Some(p.pid) == daemon_pid || p.cmdline.contains(&base))
        .collect()
}

/// Zombies among the descendants of this test's berth processes.
pub fn zombies_under(roots: &[i32]) -> Vec<Proc> {
    let all = processes();
    let mut ours: HashSet<i32> = roots.iter().copied().collect();
    loop {
        let before = ours.len();
        for p in &all {
            if ours.contains(&p.ppid) {
                ours.insert(p.pid);
            }
        }
        if ours.len() == before {
            break;
        }
    }
    all.into_iter()
        .filter(|p| p.state == 'Z' && ours.contains(&p.pid))
        .collect()
}

pub fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The directories of cgroup `path` in every hierarchy that has it.
pub fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let relative = path.trim_start_matches('/');
    if cgroup_v2() {
        let dir = Path::new("/sys/fs/cgroup").join(relative);
        return if dir.is_dir() { vec![dir] } else { Vec::new() };
    }
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    hierarchies
        .flatten()
        .map(|h| h.path().join(relative))
        .filter(|d| d.is_dir())
        .collect()
}

/// A controller's file of cgroup `path`: `<controller>/<path>/<v1>` on
/// cgroup v1, `<path>/<v2>` on v2.
pub fn cgroup_file(path: &str, controller: &str, v1: &str, v2: &str) -> String {
    let relative = path.trim_start_matches('/');
    let file = if cgroup_v2() {
        Path::new("/sys/fs/cgroup").join(relative).join(v2)
    } else {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(relative)
            .join(v1)
    };
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("read {}: {e}", file.display()))
        .trim()
        .to_string()
}

/// The pids in cgroup `path`, per hierarchy.
pub fn cgroup_members(path: &str) -> Vec<(PathBuf, Vec<i32>)> {
    cgroup_dirs(path)
        .into_iter()
        .filter_map(|dir| {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
            Some((
                dir,
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect(),
            ))
        })
        .collect()
}

/// Mount points under `base` in this (the host's) mount namespace.
pub fn mounts_under(base: &Path) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(base))
        .collect()
}

/// What a test may have left: berth processes other than the daemon,
/// mounts under its directories, its cgroups.
pub fn leftovers(base: &Path, parents: &[String], daemon_pid: Option<i32>) -> Vec<String> {
    let mut left: Vec<String> = berth_processes(base, daemon_pid)
        .into_iter()
        .filter(|p| Some(p.pid) != daemon_pid && p.state != 'Z')
        .map(|p| format!("process {} {}", p.pid, p.cmdline))
        .collect();
    // The daemon's pin of the pins' mount namespace is there while it runs;
    // the pins in that namespace are the pods'.
    left.extend(
        mounts_under(base)
            .into_iter()
            .filter(|m| !m.ends_with(Path::new("state").join(common::PINS)))
            .map(|m| format!("mount {}", m.display())),
    );
    if let Some(pid) = daemon_pid.and_then(|p| u32::try_from(p).ok()) {
        left.extend(
            common::pin_mounts(pid)
                .into_iter()
                .map(|m| format!("pin {}", m.display())),
        );
    }
    for parent in parents {
        left.extend(
            cgroup_dirs(parent)
                .into_iter()
                .map(|d| format!("cgroup {}", d.display())),
        );
    }
    left
}

/// `leftovers`, given a few seconds: monitors exit just after they wrote
/// the exit record a remove waited for.
pub async fn poll_leftovers(
    base: &Path,
    parents: &[String],
    daemon_pid: Option<i32>,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = leftovers(base, parents, daemon_pid);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills what is in the test's cgroups and its monitors (by pid), detaches
/// its mounts and removes its cgroups. Only for what the daemon failed to
/// remove.
pub fn force_cleanup(base: &Path, parents: &[String], daemon_pid: Option<i32>) {
    let kill = |pid: i32| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    };
    for parent in parents {
        for dir in cgroup_dirs(parent) {
            for entry in walkdir_post_order(&dir) {
                if let Ok(procs) = std::fs::read_to_string(entry.join("cgroup.procs")) {
                    procs.lines().filter_map(|l| l.parse().ok()).for_each(kill);
                }
            }
        }
    }
    for p in berth_processes(base, daemon_pid) {
        if Some(p.pid) != daemon_pid {
            kill(p.pid);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut mounts = mounts_under(base);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    for parent in parents {
        for dir in cgroup_dirs(parent) {
            for entry in walkdir_post_order(&dir) {
                let _ = std::fs::remove_dir(&entry);
            }
        }
    }
}

/// `dir` and the directories below it, deepest first.
pub fn walkdir_post_order(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walkdir_post_order(&e.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

// ------------------------------------------------------------- configs

/// What kubelet sends, for pod and containers alike, for a hostNetwork pod
/// without shareProcessNamespace: each container has its own PID namespace
/// (CRI's default, POD, would put /pause at PID 1 of every container).
pub fn namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..NamespaceOption::default()
    }
}

/// A container config: `image`, `command`, log at `<name>.log`.
pub fn container(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespaces()),
                ..LinuxContainerSecurityContext::default()
            }),
            ..LinuxContainerConfig::default()
        }),
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..ImageSpec::default()
        }),
        command: strs(command),
        log_path: format!("{name}.log"),
        labels: [("name".to_string(), name.to_string())].into(),
        ..ContainerConfig::default()
    }
}

/// `config` with security context `sc`, whose namespace options are
/// kubelet's unless it names its own.
pub fn with_security(
    mut config: ContainerConfig,
    mut sc: LinuxContainerSecurityContext,
) -> ContainerConfig {
    sc.namespace_options.get_or_insert_with(namespaces);
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context = Some(sc);
    config
}

pub fn with_resources(
    mut config: ContainerConfig,
    resources: LinuxContainerResources,
) -> ContainerConfig {
    config.linux.get_or_insert_with(Default::default).resources = Some(resources);
    config
}

pub fn seccomp(profile: security_profile::ProfileType) -> Option<SecurityProfile> {
    Some(SecurityProfile {
        profile_type: profile as i32,
        localhost_ref: String::new(),
    })
}

/// The records of a CRI log file: (stream, tag, message).
pub fn cri_log(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read container log {}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
            else {
                panic!("not a CRI log line: {line:?}");
            };
            assert!(
                time.len() == 30 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
                "RFC 3339 timestamp with nanoseconds in {line:?}"
            );
            (
                stream.to_string(),
                tag.to_string(),
                parts.next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Waits for a line `message` on the container's stdout, in its log.
pub async fn wait_log_line(path: &Path, message: &str) {
    let deadline = Instant::now() + STATE_LIMIT;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|t| {
            t.lines()
                .any(|l| l.ends_with(&format!(" stdout F {message}")))
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{message:?} not logged to {} within {STATE_LIMIT:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `Key:\tvalue` line of a /proc status file.
pub fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
        .to_string()
}

pub fn cap_mask(caps: &[u32]) -> String {
    format!("{:016x}", caps.iter().fold(0u64, |m, c| m | 1 << c))
}

/// The mount options of `point` in a mountinfo text.
pub fn mount_options(mountinfo: &str, point: &str) -> Option<String> {
    mountinfo.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        (fields.get(4) == Some(&point)).then(|| fields.get(5).unwrap_or(&"").to_string())
    })
}
