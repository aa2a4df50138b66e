//! Pod sandboxes through the CRI socket: namespaces, network (built-in and
//! real CNI plugins), hostPort, stop/remove semantics, crash recovery and
//! concurrency. Traffic goes only to loopback and to pods these tests make.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Options, TestDaemon, pin_mounts};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use nix::sys::signal::Signal;
use tonic::transport::Channel;

/// Each test gets its own bridge, nft table and CIDR so tests run in
/// parallel without meeting.
static NEXT_NET: AtomicU32 = AtomicU32::new(0);

struct TestNet {
    bridge: String,
    table: String,
    cidr_prefix: String,
}

impl TestNet {
    fn new() -> TestNet {
        let n = NEXT_NET.fetch_add(1, Ordering::Relaxed) + std::process::id() % 50 * 4;
        TestNet {
            bridge: format!("bsb{}", n % 1000),
            table: format!("berth_sbt{n}"),
            cidr_prefix: format!("10.{}.{}", 180 + n / 250 % 20, n % 250),
        }
    }

    /// A daemon on this network.
    fn daemon(&self) -> TestDaemon {
        TestDaemon::start_with(Options {
            config_toml: self.builtin_config(),
            ..Options::default()
        })
    }

    fn builtin_config(&self) -> String {
        format!(
            "[network]\nmode = \"builtin\"\nbridge = \"{}\"\nnft_table = \"{}\"\nmasquerade = false\npod_cidr = \"{}.0/24\"\n",
            self.bridge, self.table, self.cidr_prefix
        )
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .stderr(Stdio::null())
            .status();
    }
}

fn root_or_skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: pod sandboxes need root");
        return false;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        eprintln!("skipping: nft is not installed (hack/install-deps.sh installs it)");
        return false;
    }
    true
}

fn pod_config(name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: "test".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: "/tmp".to_string(),
        labels: [("app".to_string(), name.to_string())].into(),
        ..PodSandboxConfig::default()
    }
}

async fn runp(
    client: &mut RuntimeServiceClient<Channel>,
    config: PodSandboxConfig,
) -> Result<String, tonic::Status> {
    client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .map(|r| r.into_inner().pod_sandbox_id)
}

async fn status(
    client: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> Result<PodSandboxStatusResponse, tonic::Status> {
    client
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        })
        .await
        .map(|r| r.into_inner())
}

async fn stopp(client: &mut RuntimeServiceClient<Channel>, id: &str) {
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .expect("StopPodSandbox");
}

async fn rmp(client: &mut RuntimeServiceClient<Channel>, id: &str) {
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .expect("RemovePodSandbox");
}

fn ip_of(status: &PodSandboxStatusResponse) -> String {
    status
        .status
        .as_ref()
        .and_then(|s| s.network.as_ref())
        .map(|n| n.ip.clone())
        .unwrap_or_default()
}

fn netns_of(status: &PodSandboxStatusResponse) -> Option<PathBuf> {
    namespace_of(status, "netns")
}

/// A namespace pin of the pod in its verbose info (`netns`, `ipcns`,
/// `utsns`).
fn namespace_of(status: &PodSandboxStatusResponse, key: &str) -> Option<PathBuf> {
    let info: serde_json::Value = serde_json::from_str(status.info.get("info")?).ok()?;
    info[key].as_str().map(PathBuf::from)
}

fn host_interface_of(status: &PodSandboxStatusResponse) -> Option<String> {
    let info: serde_json::Value = serde_json::from_str(status.info.get("info")?).ok()?;
    info["cniResult"]["hostInterface"]
        .as_str()
        .map(str::to_string)
}

/// Runs `busybox` with `args` inside the network namespace pinned at `netns`.
fn in_netns(netns: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns.display()))
        .arg("/bin/busybox")
        .args(args);
    command
}

/// A one-shot TCP server in a pod that answers `reply` to the first client.
struct PodServer(std::process::Child);

impl PodServer {
    fn start(netns: &Path, port: u16, reply: &str) -> PodServer {
        let child = in_netns(
            netns,
            &[
                "sh",
                "-c",
                &format!("echo {reply} | busybox nc -l -p {port}"),
            ],
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("start nc listener in the pod");
        std::thread::sleep(Duration::from_millis(200));
        PodServer(child)
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn builtin_network_pod_is_ready_with_its_namespaces_and_files() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let daemon = TestDaemon::start_with(Options {
        config_toml: format!(
            "{}[sandbox]\nshm_size_bytes = 8388608\n",
            net.builtin_config()
        ),
        ..Options::default()
    });
    let mut client = daemon.runtime().await;
    let mut config = pod_config("files");
    config.dns_config = Some(DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["test.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    config.linux = Some(LinuxPodSandboxConfig {
        sysctls: [(
            "net.ipv4.ip_unprivileged_port_start".to_string(),
            "53".to_string(),
        )]
        .into(),
        ..LinuxPodSandboxConfig::default()
    });
    let id = runp(&mut client, config).await.expect("RunPodSandbox");
    let st = status(&mut client, &id[..12])
        .await
        .expect("status by id prefix");
    let sandbox = st.status.clone().expect("status");
    assert_eq!(sandbox.id, id);
    assert_eq!(sandbox.state, PodSandboxState::SandboxReady as i32);
    assert!(sandbox.created_at > 0);
    assert!(ip_of(&st).starts_with(&net.cidr_prefix), "{}", ip_of(&st));

    let pod_dir = daemon.state.join("pods").join(&id);
    assert_eq!(
        std::fs::read_to_string(pod_dir.join("hostname")).expect("hostname"),
        "files\n"
    );
    let resolv = std::fs::read_to_string(pod_dir.join("resolv.conf")).expect("resolv.conf");
    assert!(
        resolv.contains("nameserver 10.96.0.10") && resolv.contains("options ndots:5"),
        "{resolv}"
    );
    let uts = Command::new("nsenter")
        .arg(format!(
            "--uts={}",
            namespace_of(&st, "utsns").expect("utsns").display()
        ))
        .arg("hostname")
        .output()
        .expect("nsenter");
    assert_eq!(String::from_utf8_lossy(&uts.stdout).trim(), "files");
    // The pod's /dev/shm has the configured size (8 MiB here).
    let shm = pod_dir.join("shm").display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let shm_line = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(shm.as_str()))
        .expect("the pod's shm is mounted");
    assert!(shm_line.contains("size=8192k"), "{shm_line}");
    let netns = netns_of(&st).expect("netns in verbose info");
    let sysctl = in_netns(
        &netns,
        &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
    )
    .output()
    .expect("read sysctl");
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "53");

    stopp(&mut client, &id).await;
    rmp(&mut client, &id).await;
    assert!(!pod_dir.exists());
}

#[tokio::test]
async fn two_pods_talk_over_tcp_and_host_port_reaches_a_pod() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let host_port =
        20000 + (NEXT_NET.fetch_add(1, Ordering::Relaxed) + std::process::id() % 1000) as i32;
    let mut server_config = pod_config("server");
    server_config.port_mappings = vec![PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: 8080,
        host_port,
        host_ip: String::new(),
    }];
    let server = runp(&mut client, server_config).await.expect("server pod");
    let client_pod = runp(&mut client, pod_config("client"))
        .await
        .expect("client pod");
    let server_status = status(&mut client, &server).await.expect("status");
    let client_status = status(&mut client, &client_pod).await.expect("status");
    let server_ip = ip_of(&server_status);

    let _listener = PodServer::start(
        &netns_of(&server_status).expect("netns"),
        8080,
        "pod-to-pod",
    );
    let out = in_netns(
        &netns_of(&client_status).expect("netns"),
        &["nc", "-w", "3", &server_ip, "8080"],
    )
    .output()
    .expect("nc");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pod-to-pod");

    let _listener = PodServer::start(
        &netns_of(&server_status).expect("netns"),
        8080,
        "via-host-port",
    );
    let out = Command::new("/bin/busybox")
        .args(["nc", "-w", "3", "127.0.0.1", &host_port.to_string()])
        .output()
        .expect("nc");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-host-port");

    for id in [&server, &client_pod] {
        stopp(&mut client, id).await;
        rmp(&mut client, id).await;
    }
    let rules = Command::new("nft")
        .args(["list", "table", "inet", &net.table])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains(&host_port.to_string()),
        "hostPort rule left after remove"
    );
}

#[tokio::test]
async fn real_cni_bridge_plugins_give_the_pod_an_address() {
    if !root_or_skip() {
        return;
    }
    if !Path::new("/usr/lib/cni/bridge").exists() {
        eprintln!("skipping: Debian's containernetworking-plugins are not installed");
        return;
    }
    let net = TestNet::new();
    let conf = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        conf.path().join("10-test.conflist"),
        format!(
            r#"{{"cniVersion":"1.0.0","name":"berth-test","plugins":[
                {{"type":"bridge","bridge":"{}","isGateway":true,"ipMasq":false,
                  "ipam":{{"type":"host-local","ranges":[[{{"subnet":"{}.0/24"}}]],"dataDir":"{}/ipam"}}}},
                {{"type":"loopback"}}]}}"#,
            net.bridge,
            net.cidr_prefix,
            conf.path().display()
        ),
    )
    .expect("write conflist");
    let daemon = TestDaemon::start_with(Options {
        config_toml: format!(
            "[network]\nmode = \"cni\"\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n",
            conf.path().display()
        ),
        ..Options::default()
    });
    let mut client = daemon.runtime().await;
    let ready = client
        .status(StatusRequest::default())
        .await
        .expect("Status")
        .into_inner()
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("NetworkReady");
    assert!(ready.status, "{ready:?}");
    let id = runp(&mut client, pod_config("cni"))
        .await
        .expect("RunPodSandbox with CNI");
    let st = status(&mut client, &id).await.expect("status");
    assert!(ip_of(&st).starts_with(&net.cidr_prefix), "{}", ip_of(&st));
    stopp(&mut client, &id).await;
    rmp(&mut client, &id).await;
    let leases: Vec<_> = std::fs::read_dir(conf.path().join("ipam/berth-test"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leases
            .iter()
            .all(|l| !l.to_string_lossy().starts_with(&net.cidr_prefix)),
        "host-local lease left: {leases:?}"
    );
}

#[tokio::test]
async fn host_network_pod_gets_no_network_namespace() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let mut config = pod_config("hostnet");
    config.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(NamespaceOption {
                network: NamespaceMode::Node as i32,
                ..NamespaceOption::default()
            }),
            ..LinuxSandboxSecurityContext::default()
        }),
        ..LinuxPodSandboxConfig::default()
    });
    let id = runp(&mut client, config).await.expect("RunPodSandbox");
    let st = status(&mut client, &id).await.expect("status");
    assert_eq!(ip_of(&st), "");
    assert_eq!(netns_of(&st), None);
    let pins = pin_mounts(daemon.pid().as_raw().unsigned_abs());
    assert!(
        pins.iter().all(|p| !p.ends_with("net")),
        "a host-network pod has no netns pin: {pins:?}"
    );
    rmp(&mut client, &id).await;
}

#[tokio::test]
async fn stop_and_remove_are_idempotent_and_leave_nothing() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let id = runp(&mut client, pod_config("idem"))
        .await
        .expect("RunPodSandbox");
    let st = status(&mut client, &id).await.expect("status");
    let veth = host_interface_of(&st).expect("host veth");
    let netns = netns_of(&st).expect("netns");
    assert!(link_exists(&veth));

    stopp(&mut client, &id).await;
    stopp(&mut client, &id).await;
    let stopped = status(&mut client, &id).await.expect("status after stop");
    assert_eq!(
        stopped.status.expect("status").state,
        PodSandboxState::SandboxNotready as i32
    );
    assert!(!link_exists(&veth), "veth removed at stop");
    rmp(&mut client, &id).await;
    rmp(&mut client, &id).await;
    stopp(&mut client, "0123456789ab").await;
    rmp(&mut client, "0123456789ab").await;

    let err = status(&mut client, &id).await.expect_err("removed pod");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(!netns.exists(), "netns pin removed");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&id), "mount of the pod left: {id}");
    let pins = pin_mounts(daemon.pid().as_raw().unsigned_abs());
    assert!(pins.is_empty(), "pins of the pod left: {pins:?}");
}

#[tokio::test]
async fn name_conflicts_name_the_holder_and_failed_runs_free_the_name() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let id = runp(&mut client, pod_config("dup")).await.expect("first");
    let err = runp(&mut client, pod_config("dup"))
        .await
        .expect_err("second");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(err.message().contains(&id), "{}", err.message());
    rmp(&mut client, &id).await;

    // A host-wide sysctl fails the run before anything is made...
    let mut bad = pod_config("freed");
    bad.linux = Some(LinuxPodSandboxConfig {
        sysctls: [("kernel.panic".to_string(), "1".to_string())].into(),
        ..LinuxPodSandboxConfig::default()
    });
    let err = runp(&mut client, bad).await.expect_err("host-wide sysctl");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // ...and a port clash fails it after the network is half made.
    let mut first = pod_config("port-a");
    let clash = PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: 80,
        host_port: 21000 + (std::process::id() % 1000) as i32,
        host_ip: String::new(),
    };
    first.port_mappings = vec![clash.clone()];
    let a = runp(&mut client, first).await.expect("port-a");
    let mut second = pod_config("freed");
    second.port_mappings = vec![clash];
    runp(&mut client, second)
        .await
        .expect_err("host port taken");
    let listed = client
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1, "the failed pod left no record: {listed:?}");
    rmp(&mut client, &a).await;
    let id = runp(&mut client, pod_config("freed"))
        .await
        .expect("the name is free again");
    rmp(&mut client, &id).await;
    let pods = std::fs::read_dir(daemon.state.join("pods"))
        .expect("pods dir")
        .count();
    assert_eq!(pods, 0);
}

#[tokio::test]
async fn list_filters_by_id_prefix_state_and_labels() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let a = runp(&mut client, pod_config("list-a")).await.expect("a");
    let b = runp(&mut client, pod_config("list-b")).await.expect("b");
    stopp(&mut client, &b).await;
    let list = |filter: PodSandboxFilter| {
        let mut client = client.clone();
        async move {
            let mut ids: Vec<String> = client
                .list_pod_sandbox(ListPodSandboxRequest {
                    filter: Some(filter),
                })
                .await
                .expect("list")
                .into_inner()
                .items
                .into_iter()
                .map(|p| p.id)
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(
        list(PodSandboxFilter {
            id: a[..10].to_string(),
            ..PodSandboxFilter::default()
        })
        .await,
        vec![a.clone()]
    );
    assert_eq!(
        list(PodSandboxFilter {
            state: Some(PodSandboxStateValue {
                state: PodSandboxState::SandboxReady as i32
            }),
            ..PodSandboxFilter::default()
        })
        .await,
        vec![a.clone()]
    );
    assert_eq!(
        list(PodSandboxFilter {
            label_selector: [("app".to_string(), "list-b".to_string())].into(),
            ..PodSandboxFilter::default()
        })
        .await,
        vec![b.clone()]
    );
    for id in [&a, &b] {
        rmp(&mut client, id).await;
    }
}

#[tokio::test]
async fn pods_survive_a_daemon_killed_with_sigkill_and_are_cleaned_up_after() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let mut daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let id = runp(&mut client, pod_config("crash"))
        .await
        .expect("RunPodSandbox");
    let st = status(&mut client, &id).await.expect("status");
    let veth = host_interface_of(&st).expect("veth");
    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10)).expect("killed");

    let restarted = TestDaemon::start_with(Options {
        config_toml: net.builtin_config(),
        socket: Some(daemon.socket.clone()),
        root: Some(daemon.root.clone()),
        state: Some(daemon.state.clone()),
        ..Options::default()
    });
    let mut client = restarted.runtime().await;
    let st = status(&mut client, &id).await.expect("pod still known");
    assert_eq!(
        st.status.expect("status").state,
        PodSandboxState::SandboxReady as i32
    );
    assert!(link_exists(&veth), "the pod's network survived the daemon");
    stopp(&mut client, &id).await;
    rmp(&mut client, &id).await;
    assert!(!link_exists(&veth));
}

/// nsfs mounts under `dir` in the host's mount table.
fn host_nsfs_mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(" - nsfs "))
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect()
}

#[tokio::test]
async fn pins_stay_out_of_the_hosts_mount_table_and_their_namespace_goes_with_the_daemon() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let mut daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let id = runp(&mut client, pod_config("apart"))
        .await
        .expect("RunPodSandbox");
    let st = status(&mut client, &id).await.expect("status");

    // The host's table has one pin of berth's: the pins' mount namespace.
    let pin_of_pins = daemon.state.join(common::PINS);
    assert_eq!(
        host_nsfs_mounts_under(&daemon.state),
        vec![pin_of_pins.clone()]
    );
    let pid = daemon.pid().as_raw().unsigned_abs();
    let mut pins = pin_mounts(pid);
    pins.sort();
    let expected: Vec<PathBuf> = ["ipc", "net", "uts"]
        .iter()
        .map(|kind| Path::new("/").join(&id).join(kind))
        .collect();
    assert_eq!(pins, expected);
    // Every process reaches them through the daemon's thread in there.
    let netns = netns_of(&st).expect("netns");
    assert!(netns.starts_with(format!("/proc/{pid}/task/")), "{netns:?}");
    let ip = in_netns(&netns, &["ip", "-o", "addr"])
        .output()
        .expect("nsenter");
    assert!(
        String::from_utf8_lossy(&ip.stdout).contains(&ip_of(&st)),
        "{}",
        String::from_utf8_lossy(&ip.stdout)
    );

    stopp(&mut client, &id).await;
    rmp(&mut client, &id).await;
    assert!(pin_mounts(pid).is_empty(), "{:?}", pin_mounts(pid));
    // With no pod left, a daemon that stops takes the namespace with it.
    assert!(daemon.stop().success());
    assert!(host_nsfs_mounts_under(&daemon.state).is_empty());
    assert!(!pin_of_pins.exists());
}

#[tokio::test]
async fn fifty_pods_from_eight_clients_get_distinct_addresses_and_leave_nothing() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let daemon = net.daemon();
    let mut workers = Vec::new();
    for worker in 0..8 {
        let mut client = daemon.runtime().await;
        workers.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for n in (worker..50).step_by(8) {
                let id = runp(&mut client, pod_config(&format!("many-{n}")))
                    .await
                    .expect("RunPodSandbox");
                let ip = ip_of(&status(&mut client, &id).await.expect("status"));
                made.push((id, ip));
            }
            made
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    assert_eq!(all.len(), 50);
    let ips: HashSet<&String> = all.iter().map(|(_, ip)| ip).collect();
    assert_eq!(ips.len(), 50, "every pod has its own address");
    let mut removers = Vec::new();
    for chunk in all.chunks(7) {
        let mut client = daemon.runtime().await;
        let ids: Vec<String> = chunk.iter().map(|(id, _)| id.clone()).collect();
        removers.push(tokio::spawn(async move {
            for id in ids {
                stopp(&mut client, &id).await;
                rmp(&mut client, &id).await;
            }
        }));
    }
    for r in removers {
        r.await.expect("remover");
    }
    let left = std::fs::read_dir(daemon.state.join("pods"))
        .expect("pods")
        .count();
    assert_eq!(left, 0);
    let bridge_ports = Command::new("ip")
        .args(["link", "show", "master", &net.bridge])
        .output()
        .expect("ip link");
    assert_eq!(
        String::from_utf8_lossy(&bridge_ports.stdout).trim(),
        "",
        "veths left on the bridge"
    );
}

// ------------------------------------------------- pod cgroup limits

/// Removes the pods it tracks through the daemon when dropped, so that a
/// failing test leaves no namespaces, veths or cgroups behind (removal is
/// idempotent, so a test that removed them already loses nothing). Made
/// after the daemon, so it is dropped before the daemon is killed.
struct PodsGuard {
    socket: PathBuf,
    ids: Vec<String>,
}

impl PodsGuard {
    fn new(daemon: &TestDaemon) -> PodsGuard {
        PodsGuard {
            socket: daemon.socket.clone(),
            ids: Vec::new(),
        }
    }

    fn track(&mut self, id: &str) -> String {
        self.ids.push(id.to_string());
        id.to_string()
    }

    /// RunPodSandbox that must fail; a pod made all the same is tracked
    /// before the test fails.
    async fn refused(
        &mut self,
        client: &mut RuntimeServiceClient<Channel>,
        config: PodSandboxConfig,
        why: &str,
    ) -> tonic::Status {
        match runp(client, config).await {
            Ok(id) => {
                self.track(&id);
                panic!("{why}: the pod was made ({id})");
            }
            Err(err) => err,
        }
    }
}

impl Drop for PodsGuard {
    fn drop(&mut self) {
        let (socket, ids) = (self.socket.clone(), std::mem::take(&mut self.ids));
        if ids.is_empty() {
            return;
        }
        // Drop runs on a runtime thread: the removal gets its own.
        common::block_on_own_thread(async {
            let mut client = RuntimeServiceClient::new(common::connect(&socket).await);
            for id in ids {
                let _ = client
                    .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await;
            }
        });
    }
}

/// A pod cgroup path of this test, removed from every hierarchy on drop
/// (deepest first), also when the test fails.
struct PodCgroup {
    path: String,
}

impl PodCgroup {
    fn new(name: &str) -> PodCgroup {
        PodCgroup {
            path: format!("/berth-it-{}-{name}", std::process::id()),
        }
    }

    /// The directory in each mounted hierarchy (v1 controllers and the
    /// v2 one, whether it is `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
    fn dirs(&self) -> Vec<PathBuf> {
        let relative = self.path.trim_start_matches('/');
        if cgroup_v2_only() {
            return vec![Path::new("/sys/fs/cgroup").join(relative)];
        }
        std::fs::read_dir("/sys/fs/cgroup")
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().join("cgroup.procs").exists())
                    .map(|e| e.path().join(relative))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn existing(&self) -> Vec<PathBuf> {
        self.dirs().into_iter().filter(|d| d.is_dir()).collect()
    }

    /// `<controller>/<path>/<v1>` on v1, `<path>/<v2>` on v2.
    fn read(&self, controller: &str, v1: &str, v2: &str) -> String {
        let relative = self.path.trim_start_matches('/');
        let file = if cgroup_v2_only() {
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

    /// Makes the cgroup as kubelet would before RunPodSandbox (v1 cpuset
    /// filled in from the root, or nothing could join it).
    fn make_as_kubelet(&self) {
        for dir in self.dirs() {
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let Some(root) = dir.parent().map(|p| p.join(file)) else {
                    continue;
                };
                if !cgroup_v2_only()
                    && let Ok(value) = std::fs::read_to_string(&root)
                {
                    std::fs::write(dir.join(file), value.trim())
                        .unwrap_or_else(|e| panic!("fill {file}: {e}"));
                }
            }
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.existing() {
            remove_cgroup_tree(&dir);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    // Processes left in it (a failed test's infra) are killed first.
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir(dir);
}

fn cgroup_v2_only() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// What kubelet sends for a pod whose containers ask 0.5 CPU (limit and
/// request) and 128 MiB, with a RuntimeClass overhead of 0.1 CPU and 32 MiB.
fn pod_with_limits(name: &str, cgroup: &PodCgroup) -> PodSandboxConfig {
    let mut config = pod_config(name);
    config.linux = Some(LinuxPodSandboxConfig {
        cgroup_parent: cgroup.path.clone(),
        resources: Some(LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 128 << 20,
            ..LinuxContainerResources::default()
        }),
        overhead: Some(LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 10_000,
            cpu_shares: 102,
            memory_limit_in_bytes: 32 << 20,
            ..LinuxContainerResources::default()
        }),
        ..LinuxPodSandboxConfig::default()
    });
    config
}

#[tokio::test]
async fn overhead_and_resources_limit_the_pod_cgroup_berth_makes() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let cgroup = PodCgroup::new("limits");
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let mut pods = PodsGuard::new(&daemon);
    let id = pods.track(
        &runp(&mut client, pod_with_limits("limits", &cgroup))
            .await
            .expect("RunPodSandbox"),
    );
    assert!(!cgroup.existing().is_empty(), "the pod cgroup was made");
    // 0.5 + 0.1 CPU and 128 + 32 MiB: the whole pod's, overhead included.
    if cgroup_v2_only() {
        assert_eq!(cgroup.read("cpu", "", "cpu.max"), "60000 100000");
        assert_eq!(
            cgroup.read("memory", "", "memory.max"),
            (160u64 << 20).to_string()
        );
    } else {
        assert_eq!(cgroup.read("cpu", "cpu.shares", ""), "614");
        assert_eq!(cgroup.read("cpu", "cpu.cfs_period_us", ""), "100000");
        assert_eq!(cgroup.read("cpu", "cpu.cfs_quota_us", ""), "60000");
        assert_eq!(
            cgroup.read("memory", "memory.limit_in_bytes", ""),
            (160u64 << 20).to_string()
        );
    }
    // The infra process (a shared PID namespace) is inside those limits,
    // in a cgroup of its own under the pod's (cgroup v2 allows no processes
    // beside child cgroups that have controllers), with the pause
    // container's CPU shares.
    let infra_procs = format!("{id}/cgroup.procs");
    let procs = cgroup.read("memory", &infra_procs, &infra_procs);
    assert!(
        !procs.trim().is_empty(),
        "the infra process is in its cgroup"
    );
    let pod_procs = cgroup.read("memory", "cgroup.procs", "cgroup.procs");
    assert!(
        pod_procs.trim().is_empty(),
        "nothing in the pod cgroup itself: {pod_procs:?}"
    );
    if !cgroup_v2_only() {
        assert_eq!(cgroup.read("cpu", &format!("{id}/cpu.shares"), ""), "2");
    }

    stopp(&mut client, &id).await;
    rmp(&mut client, &id).await;
    assert!(
        cgroup.existing().is_empty(),
        "pod cgroup left: {:?}",
        cgroup.existing()
    );
}

#[tokio::test]
async fn a_pod_cgroup_kubelet_made_keeps_kubelets_limits() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let cgroup = PodCgroup::new("kubelets");
    cgroup.make_as_kubelet();
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let mut pods = PodsGuard::new(&daemon);
    let before = if cgroup_v2_only() {
        cgroup.read("memory", "", "memory.max")
    } else {
        cgroup.read("memory", "memory.limit_in_bytes", "")
    };
    let id = pods.track(
        &runp(&mut client, pod_with_limits("kubelets", &cgroup))
            .await
            .expect("RunPodSandbox"),
    );
    let after = if cgroup_v2_only() {
        cgroup.read("memory", "", "memory.max")
    } else {
        assert_eq!(cgroup.read("cpu", "cpu.cfs_quota_us", ""), "-1");
        cgroup.read("memory", "memory.limit_in_bytes", "")
    };
    assert_eq!(after, before, "kubelet's cgroup is kubelet's to limit");
    stopp(&mut client, &id).await;
    rmp(&mut client, &id).await;
    assert!(
        !cgroup.existing().is_empty(),
        "kubelet's pod cgroup is not berth's to remove"
    );
}

#[tokio::test]
async fn invalid_pod_resources_and_bandwidth_are_refused_naming_the_field() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let cgroup = PodCgroup::new("invalid");
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let mut pods = PodsGuard::new(&daemon);
    let mut bad = pod_with_limits("invalid", &cgroup);
    if let Some(overhead) = bad.linux.as_mut().and_then(|l| l.overhead.as_mut()) {
        overhead.cpu_quota = 10;
    }
    let err = pods.refused(&mut client, bad, "quota below 1 ms").await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("config.linux.overhead.cpu_quota"),
        "{}",
        err.message()
    );
    let mut bad = pod_config("invalid");
    bad.annotations = [(
        "kubernetes.io/ingress-bandwidth".to_string(),
        "10MB".to_string(),
    )]
    .into();
    let err = pods.refused(&mut client, bad, "bad quantity").await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("kubernetes.io/ingress-bandwidth"),
        "{}",
        err.message()
    );
    let mut bad = pod_config("invalid");
    bad.annotations = [(
        "kubernetes.io/egress-bandwidth".to_string(),
        "2P".to_string(),
    )]
    .into();
    let err = pods.refused(&mut client, bad, "above 1 Pbit/s").await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("unreasonably large"),
        "{}",
        err.message()
    );
    // Nothing was made, and the name is free.
    assert!(cgroup.existing().is_empty());
    let pod_dirs = std::fs::read_dir(daemon.state.join("pods"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pod_dirs, 0);
    let id = pods.track(
        &runp(&mut client, pod_config("invalid"))
            .await
            .expect("the name is free"),
    );
    rmp(&mut client, &id).await;
}

#[tokio::test]
async fn a_limit_the_kernel_refuses_undoes_the_pod() {
    if !root_or_skip() {
        return;
    }
    let net = TestNet::new();
    let cgroup = PodCgroup::new("refused");
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let mut pods = PodsGuard::new(&daemon);
    let mut config = pod_with_limits("refused", &cgroup);
    if let Some(resources) = config.linux.as_mut().and_then(|l| l.resources.as_mut()) {
        // Well-formed, but no such CPU: the kernel says EINVAL.
        resources.cpuset_cpus = "4095".to_string();
    }
    let err = pods.refused(&mut client, config, "no CPU 4095").await;
    assert!(err.message().contains("cpuset.cpus"), "{}", err.message());
    assert!(
        cgroup.existing().is_empty(),
        "pod cgroup left: {:?}",
        cgroup.existing()
    );
    let listed = client
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    assert!(listed.is_empty(), "{listed:?}");
    let pod_dirs = std::fs::read_dir(daemon.state.join("pods"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pod_dirs, 0);
}

// -------------------------------------------------------- bandwidth

const MBIT_10_BYTES: u64 = 1_250_000;
const MBIT_5_BYTES: u64 = 625_000;

fn bandwidth_annotations(config: &mut PodSandboxConfig) {
    config.annotations = [
        (
            "kubernetes.io/ingress-bandwidth".to_string(),
            "10M".to_string(),
        ),
        (
            "kubernetes.io/egress-bandwidth".to_string(),
            "5M".to_string(),
        ),
    ]
    .into();
}

/// `tc -j qdisc show dev <dev>`, in the namespace at `netns` when given.
/// Tests only read qdiscs with `tc`; berth itself never runs it.
fn qdiscs(dev: &str, netns: Option<&Path>) -> Vec<serde_json::Value> {
    let mut command = match netns {
        Some(netns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", netns.display())).arg("tc");
            c
        }
        None => Command::new("tc"),
    };
    let out = command
        .args(["-j", "qdisc", "show", "dev", dev])
        .output()
        .expect("run tc");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The rate in bytes/s of the root TBF qdisc of `dev`, if it has one.
fn tbf_rate(dev: &str, netns: Option<&Path>) -> Option<u64> {
    qdiscs(dev, netns)
        .into_iter()
        .find(|q| q["kind"] == "tbf" && q["root"] == true)
        .and_then(|q| q["options"]["rate"].as_u64())
}

fn tc_or_skip() -> bool {
    if Command::new("tc").arg("-V").output().is_err() {
        eprintln!("skipping: the test reads qdiscs with tc (Debian package iproute2)");
        return false;
    }
    true
}

#[tokio::test]
async fn bandwidth_annotations_shape_a_builtin_network_pod() {
    if !root_or_skip() || !tc_or_skip() {
        return;
    }
    let net = TestNet::new();
    let daemon = net.daemon();
    let mut client = daemon.runtime().await;
    let mut pods = PodsGuard::new(&daemon);
    let mut config = pod_config("shaped");
    bandwidth_annotations(&mut config);
    let id = pods.track(&runp(&mut client, config).await.expect("RunPodSandbox"));
    let st = status(&mut client, &id).await.expect("status");
    let veth = host_interface_of(&st).expect("host veth");
    let netns = netns_of(&st).expect("netns");
    // Into the pod through the host end, out of it through its eth0.
    assert_eq!(tbf_rate(&veth, None), Some(MBIT_10_BYTES));
    assert_eq!(tbf_rate("eth0", Some(&netns)), Some(MBIT_5_BYTES));
    let info: serde_json::Value =
        serde_json::from_str(st.info.get("info").expect("info")).expect("info json");
    assert_eq!(info["cniResult"]["bandwidth"]["ingressRate"], 10_000_000);

    // Without annotations: no shaping.
    let plain = pods.track(
        &runp(&mut client, pod_config("unshaped"))
            .await
            .expect("RunPodSandbox"),
    );
    let plain_st = status(&mut client, &plain).await.expect("status");
    let plain_veth = host_interface_of(&plain_st).expect("host veth");
    assert_eq!(tbf_rate(&plain_veth, None), None);
    assert_eq!(
        tbf_rate("eth0", Some(&netns_of(&plain_st).expect("netns"))),
        None
    );

    for id in [&id, &plain] {
        stopp(&mut client, id).await;
        rmp(&mut client, id).await;
    }
    assert!(
        !link_exists(&veth),
        "the veth and its qdiscs went with the pod"
    );
}

#[tokio::test]
async fn bandwidth_annotations_reach_the_cni_bandwidth_plugin() {
    if !root_or_skip() || !tc_or_skip() {
        return;
    }
    for plugin in ["bridge", "host-local", "bandwidth"] {
        if !Path::new("/usr/lib/cni").join(plugin).exists() {
            eprintln!(
                "skipping: needs /usr/lib/cni/{plugin} (Debian's containernetworking-plugins)"
            );
            return;
        }
    }
    let net = TestNet::new();
    let conf = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        conf.path().join("10-test.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "berth-bw-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": net.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("{}.0/24", net.cidr_prefix)}]],
                        "dataDir": conf.path().join("ipam"),
                    }
                },
                {"type": "bandwidth", "capabilities": {"bandwidth": true}}
            ]
        })
        .to_string(),
    )
    .expect("write conflist");
    let daemon = TestDaemon::start_with(Options {
        config_toml: format!(
            "[network]\nmode = \"cni\"\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n",
            conf.path().display()
        ),
        ..Options::default()
    });
    let mut client = daemon.runtime().await;
    let mut pods = PodsGuard::new(&daemon);
    let ifbs_before = ifb_devices();
    let _ifbs = IfbGuard(ifbs_before.clone());
    let mut config = pod_config("cni-shaped");
    bandwidth_annotations(&mut config);
    let id = pods.track(
        &runp(&mut client, config)
            .await
            .expect("RunPodSandbox with the bandwidth plugin"),
    );
    let st = status(&mut client, &id).await.expect("status");
    let info: serde_json::Value =
        serde_json::from_str(st.info.get("info").expect("info")).expect("info json");
    let veth = info["cniResult"]["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i.get("sandbox").is_none() && i["name"] != net.bridge.as_str())
        .and_then(|i| i["name"].as_str())
        .expect("host veth in the CNI result")
        .to_string();
    // The plugin shapes the pod's ingress on the host veth, and its egress
    // on an IFB device the host veth's ingress is redirected to.
    assert_eq!(tbf_rate(&veth, None), Some(MBIT_10_BYTES));
    let new_ifbs: Vec<String> = ifb_devices()
        .into_iter()
        .filter(|d| !ifbs_before.contains(d))
        .collect();
    assert_eq!(new_ifbs.len(), 1, "{new_ifbs:?}");
    assert_eq!(tbf_rate(&new_ifbs[0], None), Some(MBIT_5_BYTES));

    stopp(&mut client, &id).await;
    rmp(&mut client, &id).await;
    assert!(!link_exists(&veth), "veth left");
    assert!(!link_exists(&new_ifbs[0]), "IFB device left");
}

/// The IFB devices of the host.
fn ifb_devices() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-j", "link", "show", "type", "ifb"])
        .output()
        .expect("ip link");
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    links
        .into_iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// Deletes the IFB devices that appeared since it was made (the bandwidth
/// plugin's, when a failed test never ran its DEL). No other test makes any.
struct IfbGuard(Vec<String>);

impl Drop for IfbGuard {
    fn drop(&mut self) {
        for dev in ifb_devices().into_iter().filter(|d| !self.0.contains(d)) {
            let _ = Command::new("ip")
                .args(["link", "del", &dev])
                .stderr(Stdio::null())
                .status();
        }
    }
}
