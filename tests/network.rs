//! The network module against the real kernel, through its library API: CNI
//! with Debian's containernetworking-plugins (bridge, host-local, portmap,
//! loopback), the built-in network, and failing or hanging plugins.
//!
//! Needs root. Traffic goes only to 127.0.0.1 and to pod addresses inside
//! network namespaces the test makes. Every test uses its own bridge,
//! nftables table, CIDR and temp dirs, and removes them with guards, also
//! when it fails.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

mod common;

use berth::config::{NetworkConfig, NetworkMode};
use berth::network::{Network, PodNetworkRequest, PortMapping, Protocol};
use berth::store::{Kind, Store};

const CNI_BIN: &str = "/usr/lib/cni";

/// Returns why the test cannot run here, if it cannot.
fn missing_prerequisite(needs_cni: bool) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".to_string());
    }
    if needs_cni {
        for plugin in ["bridge", "host-local", "portmap", "loopback"] {
            if !Path::new(CNI_BIN).join(plugin).exists() {
                return Some(format!(
                    "needs {CNI_BIN}/{plugin} (Debian package containernetworking-plugins)"
                ));
            }
        }
    }
    if berth::network::nft::find_binary().is_none() {
        return Some("needs nft (Debian package nftables)".to_string());
    }
    None
}

macro_rules! require {
    ($needs_cni:expr) => {
        if let Some(why) = missing_prerequisite($needs_cni) {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// A per-test number for unique names, CIDRs and ports.
fn unique() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    ((std::process::id() as u16)
        .wrapping_mul(7)
        .wrapping_add(n * 31))
        % 200
        + 20
}

/// A network namespace pinned by a bind mount, removed on drop.
struct NetnsPin {
    path: PathBuf,
}

impl NetnsPin {
    fn create(dir: &Path, name: &str) -> NetnsPin {
        let path = dir.join(name);
        std::fs::File::create(&path).expect("create pin file");
        let target = path.clone();
        // The thread that unshares is never reused: it exits right after.
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare net");
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("bind netns");
        })
        .join()
        .expect("netns thread");
        NetnsPin { path }
    }
}

impl Drop for NetnsPin {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs `f` on a fresh thread inside the namespace.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(netns).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// A TCP echo server inside the namespace for `connections` connections;
/// returns once it listens.
fn echo_server(netns: &Path, port: u16, connections: usize) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = in_netns(netns, move || {
        let listener = TcpListener::bind(("0.0.0.0", port)).expect("listen");
        ready_tx.send(()).expect("ready");
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            let n = stream.read(&mut buf).expect("read");
            stream.write_all(&buf[..n]).expect("echo");
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server listens");
    handle
}

fn echo(addr: SocketAddr, message: &str) -> Result<String, std::io::Error> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(message.as_bytes())?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Removes the bridge and nftables table of a test, also on failure.
struct HostGuard {
    bridge: String,
    nft_table: Option<String>,
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
        if let Some(table) = &self.nft_table {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", table])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Detaches the pods when a test fails midway.
struct DetachGuard<'a> {
    network: &'a Network,
    pods: Vec<PodNetworkRequest>,
}

impl Drop for DetachGuard<'_> {
    fn drop(&mut self) {
        if self.pods.is_empty() {
            return;
        }
        common::block_on_own_thread(async {
            for pod in &self.pods {
                let _ = self.network.detach(pod).await;
            }
        });
    }
}

fn request(id: &str, netns: &Path, port_mappings: Vec<PortMapping>) -> PodNetworkRequest {
    PodNetworkRequest {
        pod_id: id.to_string(),
        name: format!("pod-{id}"),
        namespace: "default".to_string(),
        uid: format!("uid-{id}"),
        netns: netns.to_path_buf(),
        port_mappings,
        ..PodNetworkRequest::default()
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The ports of a bridge.
fn bridge_ports(bridge: &str) -> Vec<String> {
    std::fs::read_dir(Path::new("/sys/class/net").join(bridge).join("brif"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn command_output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ipv4(ips: &[IpAddr]) -> IpAddr {
    *ips.iter().find(|ip| ip.is_ipv4()).expect("an IPv4 address")
}

/// The built-in network on a test's bridge, nftables table and pod CIDR,
/// with its store and files under `dir`.
fn builtin_network(dir: &Path, cidr: &str, bridge: &str, table: &str) -> (Store, Network) {
    let config = NetworkConfig {
        mode: NetworkMode::Builtin,
        cni_conf_dir: dir.join("net.d"),
        pod_cidr: cidr.parse().expect("cidr"),
        bridge: bridge.to_string(),
        nft_table: table.to_string(),
        masquerade: false,
        ..NetworkConfig::default()
    };
    let store = Store::open(&dir.join("root")).expect("store");
    let network = Network::new(&config, &dir.join("root"), dir, store.clone()).expect("network");
    (store, network)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_pods_talk_and_host_port_on_loopback_then_detach_leaves_nothing() {
    require!(false);
    let n = unique();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bridge = format!("btb{n}");
    let table = format!("berth_test_{n}");
    let _host = HostGuard {
        bridge: bridge.clone(),
        nft_table: Some(table.clone()),
    };
    let (store, network) =
        builtin_network(tmp.path(), &format!("10.231.{n}.0/24"), &bridge, &table);
    assert!(network.readiness().ready, "{:?}", network.readiness());

    let a_ns = NetnsPin::create(tmp.path(), "a");
    let b_ns = NetnsPin::create(tmp.path(), "b");
    let host_port = 30000 + n * 10;
    let a = request(
        &format!("builtin-a-{n}"),
        &a_ns.path,
        vec![PortMapping {
            protocol: Protocol::Tcp,
            container_port: 8080,
            host_port,
            host_ip: String::new(),
        }],
    );
    let b = request(&format!("builtin-b-{n}"), &b_ns.path, Vec::new());
    let mut guard = DetachGuard {
        network: &network,
        pods: vec![a.clone(), b.clone()],
    };

    let started = Instant::now();
    let a_status = network.attach(&a).await.expect("attach a");
    let attach_time = started.elapsed();
    let b_status = network.attach(&b).await.expect("attach b");
    let a_ip = ipv4(&a_status.ips);
    assert_eq!(a_status.interface, "eth0");
    assert_ne!(a_ip, ipv4(&b_status.ips));
    assert_eq!(a_status.result["bridge"], bridge.as_str());
    eprintln!("builtin attach took {attach_time:?}");

    // Pod b → pod a over the bridge, and host 127.0.0.1:hostPort → pod a.
    let server = echo_server(&a_ns.path, 8080, 2);
    let target = SocketAddr::new(a_ip, 8080);
    let reply = in_netns(&b_ns.path, move || echo(target, "from b"))
        .join()
        .expect("client thread")
        .expect("b reaches a");
    assert_eq!(reply, "from b");
    let reply = echo(SocketAddr::from(([127, 0, 0, 1], host_port)), "from host")
        .expect("hostPort on 127.0.0.1 reaches a");
    assert_eq!(reply, "from host");
    server.join().expect("server");

    let stats = network.stats(&a_ns.path).await.expect("stats");
    let eth0 = stats.iter().find(|s| s.name == "eth0").expect("eth0 stats");
    assert!(eth0.rx_bytes > 0 && eth0.tx_bytes > 0, "{eth0:?}");

    let veth_a = a_status.result["hostInterface"]
        .as_str()
        .expect("host veth")
        .to_string();
    assert!(link_exists(&veth_a));
    let rules = command_output("nft", &["list", "table", "inet", &table]);
    assert!(rules.contains("dnat ip to"), "{rules}");

    // A host port another pod holds: the attach fails and undoes itself.
    let c_ns = NetnsPin::create(tmp.path(), "c");
    let c = request(
        &format!("builtin-c-{n}"),
        &c_ns.path,
        a.port_mappings.clone(),
    );
    guard.pods.push(c.clone());
    let err = network.attach(&c).await.expect_err("host port taken");
    assert!(err.to_string().contains("nftables"), "{err}");
    assert!(!link_exists(&berth::network::builtin_host_veth_name(
        &c.pod_id
    )));
    let ipam: Vec<(String, serde_json::Value)> = store.list(Kind::Ipam).expect("list ipam");
    assert_eq!(ipam.len(), 2, "{ipam:?}");

    for _ in 0..2 {
        network.detach(&a).await.expect("detach a");
        network.detach(&b).await.expect("detach b");
    }
    guard.pods.clear();
    assert!(!link_exists(&veth_a), "veth {veth_a} left");
    assert!(
        bridge_ports(&bridge).is_empty(),
        "{:?}",
        bridge_ports(&bridge)
    );
    let rules = command_output("nft", &["list", "table", "inet", &table]);
    assert!(
        !rules.contains("dnat") && !rules.contains("pod_"),
        "{rules}"
    );
    let ipam: Vec<(String, serde_json::Value)> = store.list(Kind::Ipam).expect("list ipam");
    assert!(ipam.is_empty(), "{ipam:?}");
    // A detached pod's address is free again (the CIDR is not exhausted).
    let again = network.attach(&a).await.expect("attach again");
    network.detach(&a).await.expect("detach again");
    assert!(!again.ips.is_empty());
}

/// Runs `script` with `ip -force -batch -`; true if every line worked.
fn ip_batch(script: &str) -> bool {
    let Ok(mut child) = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let written = child
        .stdin
        .take()
        .is_some_and(|mut stdin| stdin.write_all(script.as_bytes()).is_ok());
    child.wait().is_ok_and(|status| status.success()) && written
}

#[tokio::test]
async fn builtin_attach_to_a_full_bridge_says_so_and_leaves_nothing() {
    require!(false);
    let n = unique();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bridge = format!("btf{n}");
    let table = format!("berth_test_{n}");
    let _host = HostGuard {
        bridge: bridge.clone(),
        nft_table: Some(table.clone()),
    };
    // A Linux bridge takes 1023 ports (port numbers below the kernel's
    // BR_MAX_PORTS, 1024, but 0). veth pairs fill it (the test kernel has
    // no dummy links), down and carrying nothing. Their other ends are in a
    // namespace of the test's, whose end takes all of them at once (deleted
    // one by one, they took 17 s).
    let ports_ns = NetnsPin::create(tmp.path(), "ports");
    let mut script = format!("link add {bridge} type bridge\n");
    for i in 0..1023 {
        script.push_str(&format!(
            "link add bfv{n}x{i} master {bridge} type veth peer name p{i} netns {}\n",
            ports_ns.path.display()
        ));
    }
    assert!(ip_batch(&script), "make a bridge with 1023 ports");
    assert_eq!(bridge_ports(&bridge).len(), 1023);
    let (store, network) =
        builtin_network(tmp.path(), &format!("10.232.{n}.0/24"), &bridge, &table);
    let ns = NetnsPin::create(tmp.path(), "full");
    let pod = request(&format!("full-{n}"), &ns.path, Vec::new());
    let mut guard = DetachGuard {
        network: &network,
        pods: vec![pod.clone()],
    };

    let err = network.attach(&pod).await.expect_err("the bridge is full");
    assert!(err.to_string().contains("has 1023 ports"), "{err}");
    assert!(!link_exists(&berth::network::builtin_host_veth_name(
        &pod.pod_id
    )));
    let ipam: Vec<(String, serde_json::Value)> = store.list(Kind::Ipam).expect("list ipam");
    assert!(ipam.is_empty(), "the address is given back: {ipam:?}");
    guard.pods.clear();
}

/// A conflist for Debian's plugins with this test's bridge, subnet and
/// host-local data dir.
fn bridge_conflist(bridge: &str, subnet: &str, data_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("net-{bridge}"),
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "dataDir": data_dir,
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            {"type": "loopback"}
        ]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_bridge_pods_talk_and_host_port_on_loopback_then_detach_leaves_nothing() {
    require!(true);
    let n = unique();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bridge = format!("btc{n}");
    let _host = HostGuard {
        bridge: bridge.clone(),
        nft_table: None,
    };
    let conf_dir = tmp.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    let data_dir = tmp.path().join("host-local");
    std::fs::write(
        conf_dir.join("10-test.conflist"),
        bridge_conflist(&bridge, &format!("10.232.{n}.0/24"), &data_dir),
    )
    .expect("write conflist");
    let root = tmp.path().join("root");
    let config = NetworkConfig {
        mode: NetworkMode::Cni,
        cni_conf_dir: conf_dir.clone(),
        cni_bin_dirs: vec![PathBuf::from(CNI_BIN)],
        ..NetworkConfig::default()
    };
    let store = Store::open(&root).expect("store");
    let network = Network::new(&config, &root, tmp.path(), store).expect("network");
    assert!(network.readiness().ready, "{:?}", network.readiness());

    let a_ns = NetnsPin::create(tmp.path(), "a");
    let b_ns = NetnsPin::create(tmp.path(), "b");
    let host_port = 30000 + n * 10 + 1;
    let a = request(
        &format!("cnia{n}"),
        &a_ns.path,
        vec![PortMapping {
            protocol: Protocol::Tcp,
            container_port: 8080,
            host_port,
            host_ip: String::new(),
        }],
    );
    let b = request(&format!("cnib{n}"), &b_ns.path, Vec::new());
    let mut guard = DetachGuard {
        network: &network,
        pods: vec![a.clone(), b.clone()],
    };

    let started = Instant::now();
    let a_status = network.attach(&a).await.expect("attach a");
    eprintln!("CNI bridge attach took {:?}", started.elapsed());
    let b_status = network.attach(&b).await.expect("attach b");
    let a_ip = ipv4(&a_status.ips);
    assert_ne!(a_ip, ipv4(&b_status.ips));
    assert_eq!(a_status.result["cniVersion"], "1.0.0");
    let cache = root
        .join("cni/results")
        .join(format!("net-{bridge}-{}-eth0", a.pod_id));
    assert!(cache.exists(), "no cache file {}", cache.display());

    // lo is up in the pod although the conflist has no loopback plugin:
    // port-forward and the pod's own containers dial localhost.
    let local = echo_server(&a_ns.path, 8079, 1);
    let reply = in_netns(&a_ns.path, || {
        echo(SocketAddr::from(([127, 0, 0, 1], 8079)), "over lo")
    })
    .join()
    .expect("lo client thread")
    .expect("the pod reaches its own localhost");
    assert_eq!(reply, "over lo");
    local.join().expect("lo server");

    let server = echo_server(&a_ns.path, 8080, 2);
    let target = SocketAddr::new(a_ip, 8080);
    let reply = in_netns(&b_ns.path, move || echo(target, "from b"))
        .join()
        .expect("client thread")
        .expect("b reaches a");
    assert_eq!(reply, "from b");
    let reply = echo(SocketAddr::from(([127, 0, 0, 1], host_port)), "from host")
        .expect("hostPort on 127.0.0.1 reaches a (portmap)");
    assert_eq!(reply, "from host");
    server.join().expect("server");
    assert_eq!(bridge_ports(&bridge).len(), 2);

    // A config change does not matter to DEL: it uses the cached config.
    std::fs::remove_file(conf_dir.join("10-test.conflist")).expect("remove conflist");
    for _ in 0..2 {
        network.detach(&a).await.expect("detach a");
        network.detach(&b).await.expect("detach b");
    }
    guard.pods.clear();
    assert!(
        bridge_ports(&bridge).is_empty(),
        "{:?}",
        bridge_ports(&bridge)
    );
    assert!(!cache.exists(), "cache file left");
    let results: Vec<_> = std::fs::read_dir(root.join("cni/results"))
        .expect("results dir")
        .collect();
    assert!(results.is_empty(), "{results:?}");
    let leases: Vec<String> = std::fs::read_dir(data_dir.join(format!("net-{bridge}")))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.parse::<IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(leases.is_empty(), "host-local leases left: {leases:?}");
    let nat = command_output("iptables-save", &["-t", "nat"]);
    assert!(!nat.contains(&a.pod_id), "portmap rules left: {nat}");
}

/// A plugin that logs each command, then fails or hangs on ADD.
fn fake_plugin(dir: &Path, name: &str, add_behaviour: &str) {
    let log = dir.join(format!("{name}.log"));
    let script = format!(
        "#!/bin/sh\necho \"$CNI_COMMAND $CNI_CONTAINERID\" >> {log}\ncat > /dev/null\nif [ \"$CNI_COMMAND\" = ADD ]; then\n{add_behaviour}\nfi\nexit 0\n",
        log = log.display()
    );
    let path = dir.join(name);
    std::fs::write(&path, script).expect("write plugin");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn plugin_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_hanging_plugins_give_clear_errors_and_leave_nothing() {
    require!(false);
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = tmp.path().join("bin");
    let conf_dir = tmp.path().join("net.d");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    fake_plugin(
        &bin,
        "failing",
        "echo '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"fake failure for the test\",\"details\":\"no such thing\"}'\necho 'plugin trace' >&2\nexit 1",
    );
    fake_plugin(&bin, "hanging", "exec sleep 30");
    let root = tmp.path().join("root");
    let store = Store::open(&root).expect("store");
    let ns = NetnsPin::create(tmp.path(), "pod");

    for (plugin, expected) in [
        (
            "failing",
            "code 11: fake failure for the test (no such thing); stderr: plugin trace",
        ),
        ("hanging", "timed out after 1s"),
    ] {
        std::fs::write(
            conf_dir.join("10-fake.conflist"),
            format!(r#"{{"cniVersion":"1.0.0","name":"fake","plugins":[{{"type":"{plugin}"}}]}}"#),
        )
        .expect("write conflist");
        let config = NetworkConfig {
            mode: NetworkMode::Cni,
            cni_conf_dir: conf_dir.clone(),
            cni_bin_dirs: vec![bin.clone()],
            plugin_timeout_secs: 1,
            ..NetworkConfig::default()
        };
        let network = Network::new(&config, &root, tmp.path(), store.clone()).expect("network");
        let req = request(&format!("fake-{plugin}"), &ns.path, Vec::new());
        let started = Instant::now();
        let err = network.attach(&req).await.expect_err("ADD fails");
        let elapsed = started.elapsed();
        let text = err.to_string();
        assert!(text.contains(expected), "{plugin}: {text}");
        assert!(text.contains(&format!("CNI plugin {plugin} ADD")), "{text}");
        assert!(
            elapsed < Duration::from_secs(5),
            "{plugin} took {elapsed:?}"
        );
        // The failed ADD was undone with DEL, and left no cache file.
        let log = plugin_log(&bin, plugin);
        assert_eq!(
            log,
            format!("ADD {id}\nDEL {id}\n", id = req.pod_id),
            "{plugin}"
        );
        assert!(
            berth::network::cni::cache_files(&root.join("cni"), &req.pod_id, "eth0").is_empty()
        );
        // Nothing to undo any more: detach does not call the plugin.
        network.detach(&req).await.expect("detach");
        assert_eq!(plugin_log(&bin, plugin).lines().count(), 2);
    }
    // No sleep left running from the hanging plugin's process group.
    let ps = command_output("ps", &["-eo", "args"]);
    assert!(!ps.lines().any(|l| l.trim() == "sleep 30"), "{ps}");
}
