//! The container service through the CRI socket: lifecycle and exit
//! reasons, CRI logs, ExecSync, stop and remove semantics, the image's USER
//! and the security context as a process inside sees them, bind mounts,
//! cgroup limits and OOM, env/args/working dir against the image config,
//! list filters, name conflicts, and containers outliving a daemon killed
//! with SIGKILL.
//!
//! Every test has its own daemon, and its pods are hostNetwork (the network
//! is not under test here) with their own cgroup parent. A [`Rig`] removes
//! what the test made through the CRI when the test ends, also when it
//! panics, and `Rig::finish` then checks that no monitor, mount or cgroup of
//! the test is left.

mod common;
#[allow(dead_code)] // this file serves one image; pull_bad_input uses the rest
#[path = "fake_registry/mod.rs"]
mod fake_registry;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{LOOPBACK_REGISTRY_CONFIG, Options, TestDaemon, TestImages};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use nix::sys::signal::Signal;
use tonic::transport::Channel;

/// Bound on one CRI call: a call that hangs fails the test instead of the run.
const RPC_LIMIT: Duration = Duration::from_secs(90);
/// Bound on a container reaching a state it is expected to reach.
const STATE_LIMIT: Duration = Duration::from_secs(30);

/// A process that lives until it is killed. `sleep` as PID 1 has no handler
/// for SIGTERM, so tests stop it with timeout 0 (straight to SIGKILL).
const SLEEPER: &[&str] = &["sleep", "100000"];

static NEXT_RIG: AtomicU32 = AtomicU32::new(0);

fn root_or_skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: containers need root (namespaces, mounts, cgroups)");
        return false;
    }
    true
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
async fn within<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not return within {limit:?}"),
    }
}

fn strs(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn sh(script: &str) -> [&str; 3] {
    ["sh", "-c", script]
}

/// One test's daemon, pods and images, removed when it ends.
struct Rig {
    daemon: TestDaemon,
    /// Daemons this rig killed: kept so that their directories (which the
    /// running daemon reuses) stay until the end.
    retired: Vec<TestDaemon>,
    config_toml: String,
    images: Option<TestImages>,
    client: RuntimeServiceClient<Channel>,
    image_client: ImageServiceClient<Channel>,
    /// Unique per rig: names pods, cgroup parents, bridge and nft table.
    tag: String,
    pods: HashMap<String, PodSandboxConfig>,
    cgroup_parents: Vec<String>,
    /// Set once the test's objects were removed through the CRI.
    clean: bool,
    /// The running daemon's pid; `None` between a kill and a restart.
    daemon_pid: Option<i32>,
}

impl Rig {
    /// A daemon for a test that uses the rig's registry images; `None`
    /// (with the reason printed) where this machine cannot run it.
    async fn start() -> Option<Rig> {
        let images = TestImages::load()?;
        Self::start_with(Some(images)).await
    }

    /// A daemon for a test that brings its own images.
    async fn start_with(images: Option<TestImages>) -> Option<Rig> {
        if !root_or_skip() {
            return None;
        }
        let n = NEXT_RIG.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}x{n}", std::process::id() % 100_000);
        // The built-in network is never used by these hostNetwork pods;
        // its names are still this rig's own, so nothing can meet another
        // test's network if it were.
        let config_toml = format!(
            "{LOOPBACK_REGISTRY_CONFIG}[network]\nmode = \"builtin\"\nbridge = \"bct{tag}\"\nnft_table = \"berth_ct{tag}\"\nmasquerade = false\n"
        );
        let daemon = TestDaemon::start_with(Options {
            config_toml: config_toml.clone(),
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

    fn images(&self) -> &TestImages {
        self.images.as_ref().expect("this rig has the test images")
    }

    /// Where everything of the test's daemon lives (root, state, logs).
    fn base(&self) -> PathBuf {
        self.retired
            .first()
            .unwrap_or(&self.daemon)
            .dir
            .path()
            .to_path_buf()
    }

    fn rt(&self) -> RuntimeServiceClient<Channel> {
        self.client.clone()
    }

    /// Pulls a rig image by key; returns its reference.
    async fn pull(&self, key: &str) -> String {
        let reference = self.images().reference(key);
        self.pull_reference(&reference).await;
        reference
    }

    async fn pull_reference(&self, reference: &str) {
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
    fn pod_config(&mut self, name: &str) -> PodSandboxConfig {
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

    async fn pod(&mut self, name: &str) -> String {
        let config = self.pod_config(name);
        self.run_pod(config).await
    }

    async fn run_pod(&mut self, config: PodSandboxConfig) -> String {
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

    fn log_dir(&self, pod: &str) -> PathBuf {
        PathBuf::from(&self.pods[pod].log_directory)
    }

    async fn try_create(
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

    async fn create(&self, pod: &str, config: ContainerConfig) -> String {
        let name = config.metadata.clone().unwrap_or_default().name;
        self.try_create(pod, config)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
    }

    async fn try_start(&self, id: &str) -> Result<(), tonic::Status> {
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

    async fn start_container(&self, id: &str) {
        self.try_start(id)
            .await
            .unwrap_or_else(|e| panic!("StartContainer {id}: {e}"));
    }

    /// Create + start.
    async fn run(&self, pod: &str, config: ContainerConfig) -> String {
        let id = self.create(pod, config).await;
        self.start_container(&id).await;
        id
    }

    async fn try_stop(&self, id: &str, timeout: i64) -> Result<(), tonic::Status> {
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

    async fn stop(&self, id: &str, timeout: i64) {
        self.try_stop(id, timeout)
            .await
            .unwrap_or_else(|e| panic!("StopContainer {id}: {e}"));
    }

    async fn remove(&self, id: &str) {
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

    async fn try_status(&self, id: &str) -> Result<ContainerStatusResponse, tonic::Status> {
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

    async fn status(&self, id: &str) -> ContainerStatus {
        self.try_status(id)
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
            .status
            .expect("ContainerStatus has a status")
    }

    /// The verbose info of ContainerStatus (pid, runtimeSpec, …).
    async fn info(&self, id: &str) -> serde_json::Value {
        let response = self
            .try_status(id)
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"));
        serde_json::from_str(response.info.get("info").expect("verbose info"))
            .expect("info is JSON")
    }

    /// The container's init pid as the host sees it.
    async fn pid(&self, id: &str) -> i32 {
        let pid = self.info(id).await["pid"].as_i64().expect("pid in info");
        i32::try_from(pid).expect("pid fits i32")
    }

    /// The container's cgroup, from the OCI spec in the verbose info.
    async fn cgroup(&self, id: &str) -> String {
        self.info(id).await["runtimeSpec"]["linux"]["cgroupsPath"]
            .as_str()
            .expect("runtimeSpec.linux.cgroupsPath")
            .to_string()
    }

    async fn wait_state(&self, id: &str, state: ContainerState) -> ContainerStatus {
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

    async fn wait_exited(&self, id: &str) -> ContainerStatus {
        self.wait_state(id, ContainerState::ContainerExited).await
    }

    async fn try_exec(
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
    async fn exec(&self, id: &str, cmd: &[&str]) -> (i32, String, String) {
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
    async fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let (code, stdout, stderr) = self.exec(id, cmd).await;
        assert_eq!(
            code, 0,
            "{cmd:?} in {id}: stdout {stdout:?} stderr {stderr:?}"
        );
        stdout
    }

    async fn list(&self, filter: ContainerFilter) -> Vec<String> {
        let mut client = self.rt();
        let mut ids: Vec<String> = within(
            "ListContainers",
            RPC_LIMIT,
            client.list_containers(ListContainersRequest {
                filter: Some(filter),
            }),
        )
        .await
        .expect("ListContainers")
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
        ids.sort();
        ids
    }

    /// SIGKILLs the daemon; `restart_daemon` starts another.
    fn kill_daemon(&mut self) {
        self.daemon.signal(Signal::SIGKILL);
        self.daemon
            .wait_exit(Duration::from_secs(10))
            .expect("daemon dies of SIGKILL");
        self.daemon_pid = None;
    }

    /// Starts a daemon on the directories of the one `kill_daemon` killed.
    async fn restart_daemon(&mut self) {
        let restarted = TestDaemon::start_with(Options {
            config_toml: self.config_toml.clone(),
            socket: Some(self.daemon.socket.clone()),
            root: Some(self.daemon.root.clone()),
            state: Some(self.daemon.state.clone()),
        });
        self.daemon_pid = Some(restarted.pid().as_raw());
        let old = std::mem::replace(&mut self.daemon, restarted);
        self.retired.push(old);
        self.client = self.daemon.runtime().await;
        self.image_client = self.daemon.images().await;
    }

    /// Removes everything through the CRI and checks that no process,
    /// mount or cgroup of the test is left.
    async fn finish(mut self) {
        let errors = remove_everything(&self.daemon.socket).await;
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
        let socket = self.daemon.socket.clone();
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(120), remove_everything(&socket)).await
            })
        })
        .join();
        match outcome {
            Ok(Ok(errors)) if errors.is_empty() => {}
            other => eprintln!("cleanup through the CRI failed: {other:?}"),
        }
        // What the daemon could not remove goes by force, so that a failed
        // test leaves nothing on the machine either.
        let leftovers = leftovers(&self.base(), &self.cgroup_parents, self.daemon_pid);
        if !leftovers.is_empty() {
            eprintln!("removing by force: {leftovers:#?}");
            force_cleanup(&self.base(), &self.cgroup_parents, self.daemon_pid);
        }
    }
}

/// Removes every container, pod and image of the daemon at `socket` (each
/// test has its own daemon, so all of them are the test's). The errors.
async fn remove_everything(socket: &Path) -> Vec<String> {
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
struct Proc {
    pid: i32,
    ppid: i32,
    state: char,
    cmdline: String,
}

fn processes() -> Vec<Proc> {
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
fn alive(pid: i32) -> bool {
    processes()
        .iter()
        .any(|p| p.pid == pid && p.state != 'Z' && p.state != 'X')
}

/// Waits up to 10 s for `pid` to be gone.
async fn wait_gone(pid: i32) -> bool {
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
fn berth_processes(base: &Path, daemon_pid: Option<i32>) -> Vec<Proc> {
    let base = base.display().to_string();
    processes()
        .into_iter()
        .filter(|p| Some(p.pid) == daemon_pid || p.cmdline.contains(&base))
        .collect()
}

/// Zombies among the descendants of this test's berth processes.
fn zombies_under(roots: &[i32]) -> Vec<Proc> {
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

fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The directories of cgroup `path` in every hierarchy that has it.
fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
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
fn cgroup_file(path: &str, controller: &str, v1: &str, v2: &str) -> String {
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
fn cgroup_members(path: &str) -> Vec<(PathBuf, Vec<i32>)> {
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
fn mounts_under(base: &Path) -> Vec<PathBuf> {
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
fn leftovers(base: &Path, parents: &[String], daemon_pid: Option<i32>) -> Vec<String> {
    let mut left: Vec<String> = berth_processes(base, daemon_pid)
        .into_iter()
        .filter(|p| Some(p.pid) != daemon_pid && p.state != 'Z')
        .map(|p| format!("process {} {}", p.pid, p.cmdline))
        .collect();
    left.extend(
        mounts_under(base)
            .into_iter()
            .map(|m| format!("mount {}", m.display())),
    );
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
async fn poll_leftovers(base: &Path, parents: &[String], daemon_pid: Option<i32>) -> Vec<String> {
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
fn force_cleanup(base: &Path, parents: &[String], daemon_pid: Option<i32>) {
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
fn walkdir_post_order(dir: &Path) -> Vec<PathBuf> {
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
fn namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..NamespaceOption::default()
    }
}

/// A container config: `image`, `command`, log at `<name>.log`.
fn container(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
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
fn with_security(
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

fn with_resources(
    mut config: ContainerConfig,
    resources: LinuxContainerResources,
) -> ContainerConfig {
    config.linux.get_or_insert_with(Default::default).resources = Some(resources);
    config
}

fn seccomp(profile: security_profile::ProfileType) -> Option<SecurityProfile> {
    Some(SecurityProfile {
        profile_type: profile as i32,
        localhost_ref: String::new(),
    })
}

/// The records of a CRI log file: (stream, tag, message).
fn cri_log(path: &Path) -> Vec<(String, String, String)> {
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
async fn wait_log_line(path: &Path, message: &str) {
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
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
        .to_string()
}

fn cap_mask(caps: &[u32]) -> String {
    format!("{:016x}", caps.iter().fold(0u64, |m, c| m | 1 << c))
}

/// The mount options of `point` in a mountinfo text.
fn mount_options(mountinfo: &str, point: &str) -> Option<String> {
    mountinfo.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        (fields.get(4) == Some(&point)).then(|| fields.get(5).unwrap_or(&"").to_string())
    })
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn container_goes_created_running_exited_with_times_and_reasons() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("life").await;

    let sleeper = rig
        .create(&pod, container("sleeper", &busybox, SLEEPER))
        .await;
    let created = rig.status(&sleeper).await;
    assert_eq!(created.state, ContainerState::ContainerCreated as i32);
    assert!(created.created_at > 0, "{created:?}");
    assert_eq!((created.started_at, created.finished_at), (0, 0));
    assert_eq!(
        created.metadata.as_ref().map(|m| m.name.as_str()),
        Some("sleeper")
    );
    assert_eq!(
        created.image.as_ref().map(|i| i.image.as_str()),
        Some(busybox.as_str())
    );
    assert_eq!(created.image_id, rig.images().str("busybox", "image_id"));
    assert_eq!(
        created.image_ref,
        rig.images().str("busybox", "repo_digest")
    );
    assert_eq!(
        PathBuf::from(&created.log_path),
        rig.log_dir(&pod).join("sleeper.log")
    );
    assert_eq!(
        created.labels.get("name").map(String::as_str),
        Some("sleeper")
    );

    rig.start_container(&sleeper).await;
    let running = rig.status(&sleeper).await;
    assert_eq!(running.state, ContainerState::ContainerRunning as i32);
    assert!(running.started_at >= running.created_at, "{running:?}");
    assert_eq!(running.finished_at, 0);
    let again = rig.try_start(&sleeper).await.expect_err("second start");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    assert!(again.message().contains("running"), "{}", again.message());

    let failing = rig
        .run(
            &pod,
            container("failing", &busybox, &sh("echo out; echo err >&2; exit 3")),
        )
        .await;
    let exited = rig.wait_exited(&failing).await;
    assert_eq!(exited.exit_code, 3);
    assert_eq!(exited.reason, "Error");
    assert!(exited.started_at > 0, "{exited:?}");
    assert!(exited.finished_at >= exited.started_at, "{exited:?}");

    let ok = rig
        .run(&pod, container("succeeding", &busybox, &sh("exit 0")))
        .await;
    let completed = rig.wait_exited(&ok).await;
    assert_eq!(completed.exit_code, 0);
    assert_eq!(completed.reason, "Completed");
    assert!(completed.finished_at >= completed.started_at);
    let restart = rig
        .try_start(&ok)
        .await
        .expect_err("start of an exited container");
    assert_eq!(
        restart.code(),
        tonic::Code::FailedPrecondition,
        "{restart:?}"
    );
    assert!(
        restart.message().contains("exited"),
        "{}",
        restart.message()
    );

    rig.finish().await;
}

#[tokio::test]
async fn containers_that_exit_at_once_are_all_reported_exited() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("quick").await;
    let mut ids = Vec::new();
    for n in 0..24 {
        ids.push(
            rig.create(&pod, container(&format!("quick{n}"), &busybox, &["true"]))
                .await,
        );
    }
    // Started from several clients at once: each exit races the start's
    // own record of RUNNING, and must win.
    let mut starters = Vec::new();
    for chunk in ids.chunks(4) {
        let mut client = rig.rt();
        let chunk = chunk.to_vec();
        starters.push(tokio::spawn(async move {
            for id in chunk {
                within(
                    "StartContainer",
                    RPC_LIMIT,
                    client.start_container(StartContainerRequest { container_id: id }),
                )
                .await
                .expect("StartContainer");
            }
        }));
    }
    for s in starters {
        s.await.expect("starter");
    }
    for id in &ids {
        let status = rig.wait_exited(id).await;
        assert_eq!((status.exit_code, status.reason.as_str()), (0, "Completed"));
    }

    rig.finish().await;
}

#[tokio::test]
async fn logs_are_written_in_cri_format_at_the_path_kubelet_gave() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("logs").await;
    // kubelet makes the container's directory under the pod's log directory.
    std::fs::create_dir_all(rig.log_dir(&pod).join("talker")).expect("mkdir");
    let mut config = container(
        "talker",
        &busybox,
        &sh("echo out1; echo err1 >&2; echo out2"),
    );
    config.log_path = "talker/0.log".to_string();
    let id = rig.run(&pod, config).await;
    let status = rig.wait_exited(&id).await;
    let path = rig.log_dir(&pod).join("talker/0.log");
    assert_eq!(PathBuf::from(&status.log_path), path);

    let records = cri_log(&path);
    let stdout: Vec<&str> = records
        .iter()
        .filter(|(s, _, _)| s == "stdout")
        .map(|(_, _, m)| m.as_str())
        .collect();
    let stderr: Vec<&str> = records
        .iter()
        .filter(|(s, _, _)| s == "stderr")
        .map(|(_, _, m)| m.as_str())
        .collect();
    assert_eq!(stdout, ["out1", "out2"], "{records:?}");
    assert_eq!(stderr, ["err1"], "{records:?}");
    assert!(records.iter().all(|(_, tag, _)| tag == "F"), "{records:?}");

    // crictl gives paths like `name/0.log` in a directory nobody made:
    // the runtime makes it, as containerd does.
    let mut config = container("crictl", &busybox, &sh("echo made"));
    config.log_path = "crictl/0.log".to_string();
    let id = rig.run(&pod, config).await;
    rig.wait_exited(&id).await;
    let records = cri_log(&rig.log_dir(&pod).join("crictl/0.log"));
    assert_eq!(
        records,
        [("stdout".to_string(), "F".to_string(), "made".to_string())]
    );

    rig.finish().await;
}

#[tokio::test]
async fn exec_sync_returns_output_and_exit_code_and_fails_for_missing_binaries() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("exec").await;
    let id = rig.run(&pod, container("target", &busybox, SLEEPER)).await;

    let (code, stdout, stderr) = rig
        .exec(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"])
        .await;
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (7, "out\n", "err\n")
    );
    // A hostNetwork pod has the node's UTS namespace, so its hostname.
    let node = nix::unistd::gethostname().expect("hostname");
    assert_eq!(
        rig.exec_ok(&id, &["hostname"]).await.trim(),
        node.to_string_lossy()
    );

    let missing = rig
        .try_exec(&id, &["/no/such/binary"], 10)
        .await
        .expect_err("exec of a missing binary is an error");
    assert!(
        missing.message().contains("/no/such/binary"),
        "the error names the binary: {missing:?}"
    );

    let created = rig
        .create(&pod, container("parked", &busybox, SLEEPER))
        .await;
    let not_running = rig
        .try_exec(&created, &["true"], 10)
        .await
        .expect_err("exec in a created container");
    assert_eq!(not_running.code(), tonic::Code::FailedPrecondition);

    rig.finish().await;
}

#[tokio::test]
async fn exec_sync_past_its_timeout_is_deadline_exceeded_and_the_process_is_gone() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("exectimeout").await;
    let id = rig.run(&pod, container("target", &busybox, SLEEPER)).await;
    let init = rig.pid(&id).await;
    let cgroup = rig.cgroup(&id).await;

    let err = rig
        .try_exec(&id, &["sleep", "4321"], 1)
        .await
        .expect_err("a command past its timeout");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<Proc> = processes()
            .into_iter()
            .filter(|p| p.cmdline.trim() == "sleep 4321" && p.state != 'Z')
            .collect();
        let members = cgroup_members(&cgroup);
        let only_init = members.iter().all(|(_, pids)| pids == &[init]);
        if left.is_empty() && only_init {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the timed-out command is still there: {left:?}, cgroup {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The container itself is untouched.
    assert_eq!(
        rig.status(&id).await.state,
        ContainerState::ContainerRunning as i32
    );
    rig.exec_ok(&id, &["true"]).await;

    rig.finish().await;
}

#[tokio::test]
async fn two_hundred_exec_syncs_leave_no_zombie_and_nothing_but_init_in_the_cgroup() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("execmany").await;
    let id = rig.run(&pod, container("target", &busybox, SLEEPER)).await;
    let init = rig.pid(&id).await;
    let cgroup = rig.cgroup(&id).await;
    assert!(
        !cgroup_members(&cgroup).is_empty(),
        "the container has a cgroup at {cgroup}"
    );

    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut client = rig.rt();
        let id = id.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..50 {
                let out = within(
                    "ExecSync",
                    RPC_LIMIT,
                    client.exec_sync(ExecSyncRequest {
                        container_id: id.clone(),
                        cmd: strs(&["true"]),
                        timeout: 30,
                    }),
                )
                .await
                .expect("ExecSync true")
                .into_inner();
                assert_eq!(out.exit_code, 0, "{out:?}");
            }
        }));
    }
    for w in workers {
        w.await.expect("exec worker");
    }

    // A process that just exited may be a zombie for a moment; one that
    // stays one was never reaped.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut roots: Vec<i32> = berth_processes(&rig.base(), rig.daemon_pid)
            .iter()
            .map(|p| p.pid)
            .collect();
        roots.push(init);
        let zombies = zombies_under(&roots);
        let members = cgroup_members(&cgroup);
        let only_init = members.iter().all(|(_, pids)| pids == &[init]);
        if zombies.is_empty() && only_init {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 200 execs: zombies {zombies:?}, cgroup {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        rig.status(&id).await.state,
        ContainerState::ContainerRunning as i32
    );

    rig.finish().await;
}

#[tokio::test]
async fn stop_kills_a_process_that_ignores_sigterm_once_the_timeout_passes() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("stubborn").await;
    let id = rig
        .run(
            &pod,
            container(
                "stubborn",
                &busybox,
                &sh("trap '' TERM; echo ready; while true; do sleep 1; done"),
            ),
        )
        .await;
    wait_log_line(&rig.log_dir(&pod).join("stubborn.log"), "ready").await;
    let pid = rig.pid(&id).await;
    rig.stop(&id, 2).await;
    let status = rig.status(&id).await;
    assert_eq!(status.state, ContainerState::ContainerExited as i32);
    assert_eq!(status.exit_code, 137, "SIGKILLed: {status:?}");
    assert!(!alive(pid), "the process is gone when stop returns");

    rig.finish().await;
}

#[tokio::test]
async fn stop_sends_sigterm_to_a_process_that_exits_on_it() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("polite").await;
    let id = rig
        .run(
            &pod,
            container(
                "polite",
                &busybox,
                &sh("trap 'exit 0' TERM; echo ready; while true; do sleep 1 & wait; done"),
            ),
        )
        .await;
    wait_log_line(&rig.log_dir(&pod).join("polite.log"), "ready").await;
    // A generous timeout: exit code 0 says SIGTERM ended it, not SIGKILL.
    rig.stop(&id, 60).await;
    let status = rig.status(&id).await;
    assert_eq!(status.state, ContainerState::ContainerExited as i32);
    assert_eq!((status.exit_code, status.reason.as_str()), (0, "Completed"));

    rig.finish().await;
}

#[tokio::test]
async fn stop_is_idempotent_and_succeeds_for_unknown_and_never_started_containers() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("stopidem").await;
    let id = rig.run(&pod, container("victim", &busybox, SLEEPER)).await;
    rig.stop(&id, 0).await;
    let first = rig.status(&id).await;
    assert_eq!(first.state, ContainerState::ContainerExited as i32);
    assert_eq!(first.exit_code, 137);
    rig.stop(&id, 0).await;
    rig.stop(&id, 10).await;
    let second = rig.status(&id).await;
    assert_eq!(
        (second.state, second.exit_code, second.finished_at),
        (first.state, first.exit_code, first.finished_at),
        "a second stop changes nothing"
    );

    rig.stop("0123456789abcdef0123", 0).await;

    // Never started: as containerd, stop leaves it created; remove then
    // takes its parked process.
    let parked = rig
        .create(&pod, container("parked", &busybox, SLEEPER))
        .await;
    let parked_pid = rig.pid(&parked).await;
    assert!(
        alive(parked_pid),
        "a created container has a parked process"
    );
    rig.stop(&parked, 0).await;
    let status = rig.status(&parked).await;
    assert!(
        status.state == ContainerState::ContainerCreated as i32
            || status.state == ContainerState::ContainerExited as i32,
        "{status:?}"
    );
    rig.remove(&parked).await;
    assert!(
        wait_gone(parked_pid).await,
        "the parked process is gone after remove"
    );

    rig.finish().await;
}

#[tokio::test]
async fn remove_keeps_the_log_is_idempotent_and_forgets_the_container() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("rmlog").await;
    let id = rig
        .run(&pod, container("logger", &busybox, &sh("echo kept")))
        .await;
    rig.wait_exited(&id).await;
    let log = rig.log_dir(&pod).join("logger.log");
    let bundle = rig.daemon.state.join("containers").join(&id);
    assert!(bundle.exists(), "bundle at {}", bundle.display());

    rig.remove(&id).await;
    rig.remove(&id).await;
    let err = rig.try_status(&id).await.expect_err("removed");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(!bundle.exists(), "bundle removed");
    let records = cri_log(&log);
    assert!(
        records.iter().any(|(s, _, m)| s == "stdout" && m == "kept"),
        "log kept after remove: {records:?}"
    );
    assert!(rig.list(ContainerFilter::default()).await.is_empty());

    rig.finish().await;
}

#[tokio::test]
async fn remove_of_a_running_container_kills_it_first() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("rmrun").await;
    let id = rig.run(&pod, container("runner", &busybox, SLEEPER)).await;
    let pid = rig.pid(&id).await;
    let cgroup = rig.cgroup(&id).await;
    rig.remove(&id).await;
    assert!(wait_gone(pid).await, "the process is gone after remove");
    assert_eq!(
        rig.try_status(&id).await.expect_err("removed").code(),
        tonic::Code::NotFound
    );
    assert!(cgroup_dirs(&cgroup).is_empty(), "cgroup {cgroup} removed");

    rig.finish().await;
}

/// `Uid:`/`Gid:` (effective) and `Groups:` of a /proc status.
fn ids_of(status: &str) -> (u32, u32, Vec<u32>) {
    let second = |key: &str| {
        status_field(status, key)
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {status}"))
    };
    let groups = status_field(status, "Groups")
        .split_whitespace()
        .map(|g| g.parse().expect("gid"))
        .collect();
    (second("Uid"), second("Gid"), groups)
}

fn reported_user(status: &ContainerStatus) -> (i64, i64, Vec<i64>) {
    let linux = status
        .user
        .as_ref()
        .and_then(|u| u.linux.clone())
        .expect("ContainerStatus.user.linux");
    (linux.uid, linux.gid, linux.supplemental_groups)
}

#[tokio::test]
async fn image_user_and_run_as_fields_decide_the_process_ids() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let nonroot = rig.pull("nonroot").await;
    let nonroot_uid = rig.pull("nonroot-uid").await;
    let pod = rig.pod("users").await;

    // Image USER "berth": 1000:1000 and group extra (1001) from /etc/group.
    let id = rig.run(&pod, container("named", &nonroot, SLEEPER)).await;
    let out = rig.exec_ok(&id, &["id"]).await;
    assert!(
        out.contains("uid=1000") && out.contains("gid=1000"),
        "exec id: {out}"
    );
    let groups = out.split("groups=").nth(1).unwrap_or_default();
    assert!(groups.contains("1001"), "supplementary group extra: {out}");
    let (uid, gid, groups) = ids_of(&rig.exec_ok(&id, &["cat", "/proc/1/status"]).await);
    assert_eq!((uid, gid), (1000, 1000));
    assert!(groups.contains(&1001), "init's groups {groups:?}");
    let (uid, gid, supplemental) = reported_user(&rig.status(&id).await);
    assert_eq!((uid, gid), (1000, 1000));
    assert!(supplemental.contains(&1001), "{supplemental:?}");

    // Image USER "1000:1000": the same ids, groups still from /etc/group.
    let identity = rig.images().image("nonroot-uid")["identity"].clone();
    let id = rig
        .run(&pod, container("numeric", &nonroot_uid, SLEEPER))
        .await;
    let (uid, gid, groups) = ids_of(&rig.exec_ok(&id, &["cat", "/proc/1/status"]).await);
    assert_eq!(u64::from(uid), identity["uid"].as_u64().expect("uid"));
    assert_eq!(u64::from(gid), identity["gid"].as_u64().expect("gid"));
    for extra in identity["extra_gids"].as_array().expect("extra_gids") {
        let extra = u32::try_from(extra.as_u64().expect("gid")).expect("gid");
        assert!(groups.contains(&extra), "{groups:?} lacks {extra}");
    }

    // run_as_user overrides the image's user.
    let config = with_security(
        container("as2000", &nonroot, SLEEPER),
        LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value { value: 2000 }),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, config).await;
    assert_eq!(rig.exec_ok(&id, &["id", "-u"]).await.trim(), "2000");
    let (uid, _, _) = ids_of(&rig.exec_ok(&id, &["cat", "/proc/1/status"]).await);
    assert_eq!(uid, 2000);
    assert_eq!(reported_user(&rig.status(&id).await).0, 2000);

    // run_as_group and supplemental_groups as well.
    let config = with_security(
        container("as2000g3000", &nonroot, SLEEPER),
        LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value { value: 2000 }),
            run_as_group: Some(Int64Value { value: 3000 }),
            supplemental_groups: vec![4000],
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, config).await;
    assert_eq!(rig.exec_ok(&id, &["id", "-u"]).await.trim(), "2000");
    assert_eq!(rig.exec_ok(&id, &["id", "-g"]).await.trim(), "3000");
    let exec_groups = rig.exec_ok(&id, &["id", "-G"]).await;
    assert!(
        exec_groups.split_whitespace().any(|g| g == "4000"),
        "exec groups {exec_groups}"
    );
    let (uid, gid, groups) = ids_of(&rig.exec_ok(&id, &["cat", "/proc/1/status"]).await);
    assert_eq!((uid, gid), (2000, 3000));
    assert!(groups.contains(&4000), "init's groups {groups:?}");
    let (uid, gid, supplemental) = reported_user(&rig.status(&id).await);
    assert_eq!((uid, gid), (2000, 3000));
    assert!(supplemental.contains(&4000), "{supplemental:?}");

    // run_as_username is looked up in the image's /etc/passwd.
    let config = with_security(
        container("byname", &nonroot, SLEEPER),
        LinuxContainerSecurityContext {
            run_as_username: "berth".into(),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, config).await;
    let (uid, gid, _) = ids_of(&rig.exec_ok(&id, &["cat", "/proc/1/status"]).await);
    assert_eq!((uid, gid), (1000, 1000));

    // Strict: the groups asked for, not the image's /etc/group membership.
    let config = with_security(
        container("strict", &nonroot, SLEEPER),
        LinuxContainerSecurityContext {
            supplemental_groups: vec![4000],
            supplemental_groups_policy: SupplementalGroupsPolicy::Strict as i32,
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, config).await;
    let (uid, _, groups) = ids_of(&rig.exec_ok(&id, &["cat", "/proc/1/status"]).await);
    assert_eq!(uid, 1000);
    assert!(groups.contains(&4000), "{groups:?}");
    assert!(
        !groups.contains(&1001),
        "Strict ignores /etc/group: {groups:?}"
    );
    let (_, _, supplemental) = reported_user(&rig.status(&id).await);
    assert!(!supplemental.contains(&1001), "{supplemental:?}");

    // A group without a user is refused (containerd does the same).
    let config = with_security(
        container("grouponly", &nonroot, SLEEPER),
        LinuxContainerSecurityContext {
            run_as_group: Some(Int64Value { value: 3000 }),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let err = rig.try_create(&pod, config).await.expect_err("group only");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    rig.finish().await;
}

/// containerd's default capability set, by number.
const DEFAULT_CAPS: &[u32] = &[0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];
const CAP_NET_ADMIN: u32 = 12;

#[tokio::test]
async fn capabilities_follow_defaults_drop_all_add_and_privileged() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("caps").await;
    let cap_eff = |status: &str| status_field(status, "CapEff");

    let id = rig.run(&pod, container("default", &busybox, SLEEPER)).await;
    for who in ["/proc/1/status", "/proc/self/status"] {
        let status = rig.exec_ok(&id, &["cat", who]).await;
        assert_eq!(cap_eff(&status), cap_mask(DEFAULT_CAPS), "{who}");
    }

    let dropped = with_security(
        container("dropall", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                drop_capabilities: strs(&["ALL"]),
                ..Capability::default()
            }),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, dropped).await;
    for who in ["/proc/1/status", "/proc/self/status"] {
        let status = rig.exec_ok(&id, &["cat", who]).await;
        assert_eq!(cap_eff(&status), "0000000000000000", "{who}");
        assert_eq!(status_field(&status, "CapBnd"), "0000000000000000", "{who}");
    }

    let added = with_security(
        container("netadmin", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                drop_capabilities: strs(&["ALL"]),
                add_capabilities: strs(&["NET_ADMIN"]),
                ..Capability::default()
            }),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, added).await;
    let status = rig.exec_ok(&id, &["cat", "/proc/1/status"]).await;
    assert_eq!(cap_eff(&status), cap_mask(&[CAP_NET_ADMIN]));

    // Privileged needs a privileged pod; it gets every capability the
    // kernel has and no seccomp filter.
    let mut config = rig.pod_config("privileged");
    config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("security context")
        .privileged = true;
    let privileged_pod = rig.run_pod(config).await;
    let privileged = with_security(
        container("privileged", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            privileged: true,
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&privileged_pod, privileged).await;
    // Every capability the daemon has (containerd's
    // WithAllCurrentCapabilities): this test runs with the daemon's.
    let ours = std::fs::read_to_string("/proc/self/status").expect("own status");
    for who in ["/proc/1/status", "/proc/self/status"] {
        let status = rig.exec_ok(&id, &["cat", who]).await;
        assert_eq!(cap_eff(&status), cap_eff(&ours), "{who}");
        assert_eq!(status_field(&status, "Seccomp"), "0", "{who}");
    }
    // …and no masked or read-only /proc paths.
    let mountinfo = rig.exec_ok(&id, &["cat", "/proc/self/mountinfo"]).await;
    assert_eq!(mount_options(&mountinfo, "/proc/keys"), None, "{mountinfo}");
    assert!(
        mount_options(&mountinfo, "/proc/sys").is_none_or(|o| o.split(',').any(|x| x == "rw")),
        "{mountinfo}"
    );

    rig.finish().await;
}

#[tokio::test]
async fn no_new_privs_is_set_only_when_asked() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("nnp").await;
    let plain = rig.run(&pod, container("plain", &busybox, SLEEPER)).await;
    let status = rig.exec_ok(&plain, &["cat", "/proc/1/status"]).await;
    assert_eq!(status_field(&status, "NoNewPrivs"), "0");

    let config = with_security(
        container("nnp", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            no_new_privs: true,
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, config).await;
    for who in ["/proc/1/status", "/proc/self/status"] {
        let status = rig.exec_ok(&id, &["cat", who]).await;
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{who}");
    }

    rig.finish().await;
}

#[tokio::test]
async fn readonly_rootfs_refuses_writes_to_the_root() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("rorootfs").await;
    let writable = rig
        .run(&pod, container("writable", &busybox, SLEEPER))
        .await;
    rig.exec_ok(&writable, &["touch", "/written"]).await;

    let config = with_security(
        container("readonly", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            readonly_rootfs: true,
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, config).await;
    let (code, _, stderr) = rig.exec(&id, &["touch", "/written"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("Read-only file system"), "{stderr}");

    rig.finish().await;
}

#[tokio::test]
async fn runtime_default_seccomp_blocks_unshare_and_unconfined_does_not() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("seccomp").await;
    // unshare(CLONE_NEWUSER) needs no capability, so only the filter stops
    // it (the default profile allows unshare only with CAP_SYS_ADMIN).
    let confined = with_security(
        container("confined", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            seccomp: seccomp(security_profile::ProfileType::RuntimeDefault),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, confined).await;
    for who in ["/proc/1/status", "/proc/self/status"] {
        let status = rig.exec_ok(&id, &["cat", who]).await;
        assert_eq!(status_field(&status, "Seccomp"), "2", "{who}: filter mode");
    }
    let (code, _, stderr) = rig.exec(&id, &["unshare", "-U", "true"]).await;
    assert_ne!(code, 0, "unshare under RuntimeDefault");
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    // The init runs under the filter too, not only exec'd processes.
    let init_check = with_security(
        container(
            "confined-init",
            &busybox,
            &sh("unshare -U true; echo rc=$?"),
        ),
        LinuxContainerSecurityContext {
            seccomp: seccomp(security_profile::ProfileType::RuntimeDefault),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let init_id = rig.run(&pod, init_check).await;
    rig.wait_exited(&init_id).await;
    let records = cri_log(&rig.log_dir(&pod).join("confined-init.log"));
    assert!(
        records.iter().any(|(_, _, m)| m == "rc=1"),
        "unshare in the init under RuntimeDefault: {records:?}"
    );

    let unconfined = with_security(
        container("unconfined", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            seccomp: seccomp(security_profile::ProfileType::Unconfined),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, unconfined).await;
    let status = rig.exec_ok(&id, &["cat", "/proc/1/status"]).await;
    assert_eq!(status_field(&status, "Seccomp"), "0");
    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .is_ok_and(|n| n.trim() != "0");
    if userns {
        let (code, _, stderr) = rig.exec(&id, &["unshare", "-U", "true"]).await;
        assert_eq!(code, 0, "unshare -U without a filter: {stderr}");
    } else {
        eprintln!("skipping the Unconfined unshare check: user namespaces are off on this host");
    }

    rig.finish().await;
}

#[tokio::test]
async fn default_masked_and_readonly_paths_and_custom_masked_paths() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("masked").await;
    let id = rig.run(&pod, container("default", &busybox, SLEEPER)).await;
    let mountinfo = rig.exec_ok(&id, &["cat", "/proc/self/mountinfo"]).await;
    // Only paths this kernel has can be masked (many kernels lack kcore).
    let masked_here: Vec<&str> = ["/proc/kcore", "/proc/keys", "/proc/timer_list"]
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .collect();
    assert!(
        !masked_here.is_empty(),
        "no default masked /proc file on this host"
    );
    for masked in masked_here {
        assert!(
            mount_options(&mountinfo, masked).is_some(),
            "{masked} is masked by a mount: {mountinfo}"
        );
    }
    assert_eq!(rig.exec_ok(&id, &["cat", "/proc/keys"]).await, "");
    let sys = mount_options(&mountinfo, "/proc/sys").expect("/proc/sys is a mount");
    assert!(sys.split(',').any(|o| o == "ro"), "/proc/sys options {sys}");

    let config = with_security(
        container("custom", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            masked_paths: strs(&["/proc/cpuinfo"]),
            readonly_paths: strs(&["/proc/sys"]),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let id = rig.run(&pod, config).await;
    assert_eq!(rig.exec_ok(&id, &["cat", "/proc/cpuinfo"]).await, "");

    rig.finish().await;
}

#[tokio::test]
async fn host_directories_are_bind_mounted_read_write_and_read_only() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("mounts").await;
    let host = rig.base().join("host-data");
    std::fs::create_dir_all(&host).expect("mkdir");
    std::fs::write(host.join("hello"), "from the host\n").expect("write");
    let mut config = container("mounter", &busybox, SLEEPER);
    config.mounts = vec![
        Mount {
            container_path: "/data/rw".into(),
            host_path: host.display().to_string(),
            ..Mount::default()
        },
        Mount {
            container_path: "/data/ro".into(),
            host_path: host.display().to_string(),
            readonly: true,
            ..Mount::default()
        },
    ];
    let id = rig.run(&pod, config).await;
    for dir in ["/data/rw", "/data/ro"] {
        assert_eq!(
            rig.exec_ok(&id, &["cat", &format!("{dir}/hello")]).await,
            "from the host\n"
        );
    }
    rig.exec_ok(&id, &["sh", "-c", "echo from the container > /data/rw/new"])
        .await;
    assert_eq!(
        std::fs::read_to_string(host.join("new")).expect("written through the rw mount"),
        "from the container\n"
    );
    let (code, _, stderr) = rig
        .exec(&id, &["sh", "-c", "echo no > /data/ro/refused"])
        .await;
    assert_ne!(code, 0);
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert!(!host.join("refused").exists());
    let reported: Vec<(String, bool)> = rig
        .status(&id)
        .await
        .mounts
        .into_iter()
        .map(|m| (m.container_path, m.readonly))
        .collect();
    assert_eq!(
        reported,
        [
            ("/data/rw".to_string(), false),
            ("/data/ro".to_string(), true)
        ]
    );

    rig.finish().await;
}

#[tokio::test]
async fn memory_and_cpu_limits_reach_the_container_cgroup() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("limits").await;
    let limit = 64 << 20;
    let config = with_resources(
        container("limited", &busybox, SLEEPER),
        LinuxContainerResources {
            memory_limit_in_bytes: limit,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            ..LinuxContainerResources::default()
        },
    );
    let id = rig.run(&pod, config).await;
    let cgroup = rig.cgroup(&id).await;
    assert!(
        cgroup.starts_with(&format!("/berth-ct-{}-limits/", rig.tag)),
        "the container's cgroup is under the pod's parent: {cgroup}"
    );
    let pid = rig.pid(&id).await;
    for (dir, pids) in cgroup_members(&cgroup) {
        assert_eq!(pids, [pid], "{}", dir.display());
    }
    assert_eq!(
        cgroup_file(&cgroup, "memory", "memory.limit_in_bytes", "memory.max"),
        limit.to_string()
    );
    if cgroup_v2() {
        assert_eq!(cgroup_file(&cgroup, "cpu", "", "cpu.max"), "50000 100000");
    } else {
        assert_eq!(cgroup_file(&cgroup, "cpu", "cpu.cfs_quota_us", ""), "50000");
        assert_eq!(
            cgroup_file(&cgroup, "cpu", "cpu.cfs_period_us", ""),
            "100000"
        );
        assert_eq!(cgroup_file(&cgroup, "cpu", "cpu.shares", ""), "512");
    }
    let reported = rig
        .status(&id)
        .await
        .resources
        .and_then(|r| r.linux)
        .expect("ContainerStatus.resources.linux");
    assert_eq!(reported.memory_limit_in_bytes, limit);
    assert_eq!(reported.cpu_quota, 50_000);

    rig.finish().await;
}

#[tokio::test]
async fn a_container_over_its_memory_limit_is_reported_oom_killed() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("oom").await;
    // dd fills a 64 MiB buffer from /dev/zero: four times the limit.
    let config = with_resources(
        container(
            "hog",
            &busybox,
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        ),
        LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..LinuxContainerResources::default()
        },
    );
    let id = rig.run(&pod, config).await;
    let status = rig.wait_exited(&id).await;
    assert_eq!(status.reason, "OOMKilled", "{status:?}");
    assert_eq!(status.exit_code, 137, "{status:?}");

    rig.finish().await;
}

// --------------------------------------- an image with Entrypoint and more

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A one-layer busybox image whose config sets what the rig's images do
/// not: Entrypoint, Cmd, Env, WorkingDir and StopSignal. Served by a fake
/// registry; returns its reference.
fn serve_config_image(registry: &fake_registry::FakeRegistry) -> String {
    use std::io::Write;
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
    let mut tar = tar::Builder::new(Vec::new());
    let dir = |path: &str, tar: &mut tar::Builder<Vec<u8>>| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, path, std::io::empty())
            .expect("tar dir");
    };
    for path in ["bin/", "etc/", "tmp/"] {
        dir(path, &mut tar);
    }
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o755);
    header.set_size(busybox.len() as u64);
    header.set_mtime(1_700_000_000);
    header.set_uid(0);
    header.set_gid(0);
    tar.append_data(&mut header, "bin/busybox", busybox.as_slice())
        .expect("tar busybox");
    for applet in ["sh", "echo", "env", "pwd", "sleep", "cat", "true"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_link(&mut header, format!("bin/{applet}"), "busybox")
            .expect("tar symlink");
    }
    let layer = tar.into_inner().expect("tar");
    let diff_id = fake_registry::sha256(&layer);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).expect("gzip");
    let gz = gz.finish().expect("gzip");

    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/echo", "entry"],
            "Cmd": ["from-cmd"],
            "Env": ["PATH=/usr/bin:/bin", "IMG_ONLY=img", "BOTH=img"],
            "WorkingDir": "/etc",
            "StopSignal": "SIGUSR1",
            "Labels": {"berth.test.image": "container-config"}
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config = serde_json::to_vec(&config).expect("config JSON");
    let name = "berth-test/config";
    let layer_digest = registry.put_blob(name, &gz);
    let config_digest = registry.put_blob(name, &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": TAR_GZIP, "digest": layer_digest, "size": gz.len()}],
    });
    registry.put_manifest(
        name,
        "latest",
        OCI_MANIFEST,
        &serde_json::to_vec(&manifest).expect("manifest JSON"),
    );
    registry.reference(name, "latest")
}

/// The message of the container's first stdout record.
fn first_stdout(path: &Path) -> String {
    cri_log(path)
        .into_iter()
        .find(|(s, _, _)| s == "stdout")
        .map(|(_, _, m)| m)
        .unwrap_or_else(|| panic!("no stdout in {}", path.display()))
}

#[tokio::test]
async fn command_args_env_working_dir_and_stop_signal_merge_with_the_image_config() {
    if !Path::new("/bin/busybox").exists() {
        eprintln!("skipping: the image is built from /bin/busybox (busybox-static), absent");
        return;
    }
    let Some(mut rig) = Rig::start_with(None).await else {
        return;
    };
    let registry = fake_registry::FakeRegistry::start().await;
    let image = serve_config_image(&registry);
    rig.pull_reference(&image).await;
    let pod = rig.pod("config").await;

    // kubelet's rule: command replaces Entrypoint, args replace Cmd.
    let cases: [(&str, &[&str], &[&str], &str); 4] = [
        ("image", &[], &[], "entry from-cmd"),
        ("args", &[], &["given"], "entry given"),
        ("command", &["/bin/echo", "cmd"], &[], "cmd"),
        ("both", &["/bin/echo", "cmd"], &["given"], "cmd given"),
    ];
    let mut ids = Vec::new();
    for (name, command, args, _) in cases {
        let mut config = container(name, &image, command);
        config.args = strs(args);
        ids.push(rig.run(&pod, config).await);
    }
    for ((name, _, _, expected), id) in cases.iter().zip(&ids) {
        rig.wait_exited(id).await;
        assert_eq!(
            first_stdout(&rig.log_dir(&pod).join(format!("{name}.log"))),
            *expected,
            "{name}"
        );
    }

    // Env: the image's, with the CRI's winning; the image's WorkingDir.
    let mut config = container("env", &image, &["/bin/sh", "-c", "env; echo pwd=$(pwd)"]);
    config.envs = vec![
        KeyValue {
            key: "BOTH".into(),
            value: "cri".into(),
        },
        KeyValue {
            key: "CRI_ONLY".into(),
            value: "cri".into(),
        },
    ];
    let id = rig.run(&pod, config).await;
    rig.wait_exited(&id).await;
    let lines: HashSet<String> = cri_log(&rig.log_dir(&pod).join("env.log"))
        .into_iter()
        .filter(|(s, _, _)| s == "stdout")
        .map(|(_, _, m)| m)
        .collect();
    for expected in [
        "PATH=/usr/bin:/bin",
        "IMG_ONLY=img",
        "BOTH=cri",
        "CRI_ONLY=cri",
        "pwd=/etc",
    ] {
        assert!(lines.contains(expected), "{expected} in {lines:?}");
    }
    assert!(!lines.contains("BOTH=img"), "{lines:?}");

    // working_dir replaces the image's.
    let mut config = container("workdir", &image, &["/bin/sh", "-c", "pwd"]);
    config.working_dir = "/tmp".into();
    let id = rig.run(&pod, config).await;
    rig.wait_exited(&id).await;
    assert_eq!(first_stdout(&rig.log_dir(&pod).join("workdir.log")), "/tmp");

    // StopContainer sends the image's StopSignal (SIGUSR1), not SIGTERM.
    let id = rig
        .run(
            &pod,
            container(
                "stopsignal",
                &image,
                &[
                    "/bin/sh",
                    "-c",
                    "trap 'exit 7' USR1; trap 'exit 8' TERM; echo ready; while true; do sleep 1 & wait; done",
                ],
            ),
        )
        .await;
    wait_log_line(&rig.log_dir(&pod).join("stopsignal.log"), "ready").await;
    rig.stop(&id, 60).await;
    assert_eq!(rig.status(&id).await.exit_code, 7, "stopped by SIGUSR1");

    rig.finish().await;
    drop(registry);
}

#[tokio::test]
async fn list_containers_filters_by_id_prefix_pod_state_and_labels() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod_a = rig.pod("lista").await;
    let pod_b = rig.pod("listb").await;
    let labelled = |name: &str, app: &str| {
        let mut config = container(name, &busybox, SLEEPER);
        config.labels.insert("app".into(), app.into());
        config
    };
    let a1 = rig.run(&pod_a, labelled("a1", "one")).await;
    let a2 = rig.create(&pod_a, labelled("a2", "two")).await;
    let b1 = rig.run(&pod_b, labelled("b1", "one")).await;
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };

    assert_eq!(
        rig.list(ContainerFilter::default()).await,
        sorted(vec![a1.clone(), a2.clone(), b1.clone()])
    );
    assert_eq!(
        rig.list(ContainerFilter {
            id: a1[..12].to_string(),
            ..ContainerFilter::default()
        })
        .await,
        vec![a1.clone()]
    );
    assert_eq!(
        rig.list(ContainerFilter {
            pod_sandbox_id: pod_a.clone(),
            ..ContainerFilter::default()
        })
        .await,
        sorted(vec![a1.clone(), a2.clone()])
    );
    let state = |state: ContainerState| ContainerFilter {
        state: Some(ContainerStateValue {
            state: state as i32,
        }),
        ..ContainerFilter::default()
    };
    assert_eq!(
        rig.list(state(ContainerState::ContainerRunning)).await,
        sorted(vec![a1.clone(), b1.clone()])
    );
    assert_eq!(
        rig.list(state(ContainerState::ContainerCreated)).await,
        vec![a2.clone()]
    );
    assert!(
        rig.list(state(ContainerState::ContainerExited))
            .await
            .is_empty()
    );
    assert_eq!(
        rig.list(ContainerFilter {
            label_selector: [("app".to_string(), "one".to_string())].into(),
            ..ContainerFilter::default()
        })
        .await,
        sorted(vec![a1.clone(), b1.clone()])
    );
    assert_eq!(
        rig.list(ContainerFilter {
            pod_sandbox_id: pod_b.clone(),
            label_selector: [("app".to_string(), "one".to_string())].into(),
            ..ContainerFilter::default()
        })
        .await,
        vec![b1.clone()]
    );
    assert!(
        rig.list(ContainerFilter {
            label_selector: [("app".to_string(), "three".to_string())].into(),
            ..ContainerFilter::default()
        })
        .await
        .is_empty()
    );

    let unknown = rig
        .try_status("0123456789abcdef0123")
        .await
        .expect_err("unknown container");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert_eq!(rig.status(&a1[..12]).await.id, a1, "status by id prefix");

    rig.finish().await;
}

#[tokio::test]
async fn a_name_taken_in_a_pod_is_refused_naming_the_holder_until_it_is_removed() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("names").await;
    let other_pod = rig.pod("names2").await;
    let first = rig.create(&pod, container("dup", &busybox, SLEEPER)).await;

    let err = rig
        .try_create(&pod, container("dup", &busybox, SLEEPER))
        .await
        .expect_err("same name in the same pod");
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains(&first),
        "names the holder: {}",
        err.message()
    );
    assert_eq!(
        rig.list(ContainerFilter::default()).await,
        vec![first.clone()]
    );

    // Another attempt, or another pod, is another name.
    let mut retry = container("dup", &busybox, SLEEPER);
    retry.metadata.as_mut().expect("metadata").attempt = 1;
    let attempt1 = rig.create(&pod, retry).await;
    let elsewhere = rig
        .create(&other_pod, container("dup", &busybox, SLEEPER))
        .await;

    // A create that fails after the name was reserved gives it back.
    let bad = with_security(
        container("freed", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            seccomp: Some(SecurityProfile {
                profile_type: security_profile::ProfileType::Localhost as i32,
                localhost_ref: "/nonexistent/berth-test-profile.json".into(),
            }),
            ..LinuxContainerSecurityContext::default()
        },
    );
    let err = rig
        .try_create(&pod, bad)
        .await
        .expect_err("missing profile");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("/nonexistent/berth-test-profile.json"),
        "{}",
        err.message()
    );
    let freed = rig
        .create(&pod, container("freed", &busybox, SLEEPER))
        .await;

    rig.remove(&first).await;
    let again = rig.create(&pod, container("dup", &busybox, SLEEPER)).await;
    assert_ne!(again, first);
    let mut expected = vec![attempt1, elsewhere, freed, again];
    expected.sort();
    assert_eq!(rig.list(ContainerFilter::default()).await, expected);

    rig.finish().await;
}

#[tokio::test]
async fn containers_outlive_a_daemon_killed_with_sigkill_and_exits_are_recorded_after() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("crash").await;
    let survivor = rig
        .run(&pod, container("survivor", &busybox, SLEEPER))
        .await;
    let dies = rig.run(&pod, container("dies", &busybox, SLEEPER)).await;
    let parked = rig
        .create(&pod, container("parked", &busybox, SLEEPER))
        .await;
    let survivor_pid = rig.pid(&survivor).await;
    let dies_pid = rig.pid(&dies).await;

    rig.kill_daemon();
    // One container ends while no daemon is there to see it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dies_pid), Signal::SIGKILL)
        .expect("kill a container's init");
    assert!(wait_gone(dies_pid).await);
    assert!(alive(survivor_pid), "the container outlives the daemon");
    rig.restart_daemon().await;

    let status = rig.status(&survivor).await;
    assert_eq!(
        status.state,
        ContainerState::ContainerRunning as i32,
        "{status:?}"
    );
    assert_eq!(rig.pid(&survivor).await, survivor_pid);
    rig.exec_ok(&survivor, &["true"]).await;
    let status = rig.wait_exited(&dies).await;
    assert_eq!(status.exit_code, 137, "{status:?}");
    // A container created before the crash can still be started after it.
    assert_eq!(
        rig.status(&parked).await.state,
        ContainerState::ContainerCreated as i32
    );
    rig.start_container(&parked).await;
    rig.exec_ok(&parked, &["true"]).await;

    rig.stop(&survivor, 0).await;
    let status = rig.status(&survivor).await;
    assert_eq!(
        status.state,
        ContainerState::ContainerExited as i32,
        "{status:?}"
    );
    assert_eq!(status.exit_code, 137);
    assert!(!alive(survivor_pid));

    rig.finish().await;
}
