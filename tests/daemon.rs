//! The daemon as an operator meets it: start, runtime-wide RPCs, config
//! errors, locks, shutdown.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Options, TestDaemon, run_berth};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use nix::sys::signal::Signal;
use tonic::transport::Channel;

#[tokio::test]
async fn version_names_berth_and_cri_v1() {
    let daemon = TestDaemon::start();
    let version = daemon
        .runtime()
        .await
        .version(VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(version.runtime_name, "berth");
    assert_eq!(version.runtime_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.runtime_api_version, "v1");
    assert_eq!(version.version, "0.1.0");
}

/// KiB of the daemon's executable that its read-only mappings (code,
/// constants) hold in memory, from `/proc/PID/smaps`.
fn own_code_in_memory_kib(pid: nix::unistd::Pid) -> u64 {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("daemon exe");
    let exe = exe.to_string_lossy().into_owned();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("daemon smaps");
    let mut counting = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            // A mapping's header: range perms offset dev inode [path]
            counting = fields.get(1).is_some_and(|perms| !perms.contains('w'))
                && fields.get(5) == Some(&exe.as_str());
        } else if counting && fields.first() == Some(&"Rss:") {
            kib += fields
                .get(1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib
}

async fn some_calls(runtime: &mut RuntimeServiceClient<Channel>) {
    runtime
        .version(VersionRequest::default())
        .await
        .expect("Version");
    runtime
        .status(StatusRequest { verbose: true })
        .await
        .expect("Status");
    runtime
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox");
}

#[tokio::test]
async fn a_quiet_daemon_gives_back_its_code_and_serves_on() {
    let daemon = TestDaemon::start();
    let mut runtime = daemon.runtime().await;
    some_calls(&mut runtime).await;
    let busy = own_code_in_memory_kib(daemon.pid());
    assert!(busy > 0, "the daemon runs code of its executable");
    // The daemon releases once no call came for 15 s (src/idle.rs); a
    // loaded machine may make that later, so allow a minute.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = own_code_in_memory_kib(daemon.pid());
        if now < busy {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no release in a minute: {now} KiB of code in memory, {busy} KiB after the calls"
        );
    }
    // What it gave back is faulted in again as the calls need it.
    some_calls(&mut runtime).await;
    let mut again = daemon.runtime().await;
    some_calls(&mut again).await;
}

#[tokio::test]
async fn status_reports_both_conditions_and_verbose_config() {
    let daemon = TestDaemon::start_with(Options {
        // A CNI dir of its own, so the host's CNI setup cannot change the answer.
        config_toml:
            "[network]\nmode = \"cni\"\ncni_conf_dir = \"/nonexistent/berth-test/net.d\"\n".into(),
        ..Options::default()
    });
    let status = daemon
        .runtime()
        .await
        .status(StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    let conditions = status.status.expect("status").conditions;
    let runtime = conditions
        .iter()
        .find(|c| c.r#type == "RuntimeReady")
        .expect("RuntimeReady");
    assert!(runtime.status, "{runtime:?}");
    let network = conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("NetworkReady");
    assert!(!network.status);
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(
        network.message.contains("/nonexistent/berth-test/net.d"),
        "{}",
        network.message
    );

    let config: serde_json::Value =
        serde_json::from_str(status.info.get("config").expect("config in info"))
            .expect("config is JSON");
    assert_eq!(config["root"], daemon.root.display().to_string());
    assert_eq!(config["network"]["mode"], "cni");

    let terse = daemon
        .runtime()
        .await
        .status(StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner();
    assert!(terse.info.is_empty(), "{:?}", terse.info);
}

#[tokio::test]
async fn status_network_ready_with_a_cni_config_and_its_plugins() {
    let daemon_dir = tempfile::tempdir().expect("tempdir");
    let conf = daemon_dir.path().join("net.d");
    let bin = daemon_dir.path().join("bin");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::write(
        conf.join("10-test.conflist"),
        r#"{"cniVersion":"1.0.0","name":"test","plugins":[{"type":"bridge"}]}"#,
    )
    .expect("write conflist");
    let plugin = bin.join("bridge");
    std::fs::write(&plugin, "#!/bin/sh\nexit 1\n").expect("write plugin");
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let daemon = TestDaemon::start_with(Options {
        config_toml: format!(
            "[network]\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"{}\"]\n",
            conf.display(),
            bin.display()
        ),
        ..Options::default()
    });
    let status = daemon
        .runtime()
        .await
        .status(StatusRequest::default())
        .await
        .expect("Status")
        .into_inner();
    let network = status
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("NetworkReady");
    assert!(network.status, "{network:?}");
}

#[tokio::test]
async fn runtime_config_reports_the_configured_cgroup_driver() {
    for (driver, expected) in [
        ("cgroupfs", CgroupDriver::Cgroupfs),
        ("systemd", CgroupDriver::Systemd),
    ] {
        let daemon = TestDaemon::start_with(Options {
            config_toml: format!("cgroup_driver = \"{driver}\"\n"),
            ..Options::default()
        });
        let config = daemon
            .runtime()
            .await
            .runtime_config(RuntimeConfigRequest::default())
            .await
            .expect("RuntimeConfig")
            .into_inner();
        assert_eq!(
            config.linux.expect("linux").cgroup_driver,
            expected as i32,
            "{driver}"
        );
    }
}

fn cidr_request(cidr: &str) -> UpdateRuntimeConfigRequest {
    UpdateRuntimeConfigRequest {
        runtime_config: Some(RuntimeConfig {
            network_config: Some(NetworkConfig {
                pod_cidr: cidr.to_string(),
            }),
        }),
    }
}

async fn reported_pod_cidrs(daemon: &TestDaemon) -> Vec<String> {
    let status = daemon
        .runtime()
        .await
        .status(StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    serde_json::from_str(status.info.get("podCIDRs").expect("podCIDRs in info")).expect("JSON list")
}

#[tokio::test]
async fn update_runtime_config_keeps_the_pod_cidr_across_restarts() {
    let mut daemon = TestDaemon::start();
    assert_eq!(reported_pod_cidrs(&daemon).await, vec!["10.88.0.0/16"]);
    let mut client = daemon.runtime().await;
    client
        .update_runtime_config(cidr_request("10.244.1.0/24,fd00:1::/64"))
        .await
        .expect("UpdateRuntimeConfig");
    assert_eq!(
        reported_pod_cidrs(&daemon).await,
        vec!["10.244.1.0/24", "fd00:1::/64"]
    );

    // Empty keeps what was set; garbage is refused and changes nothing.
    client
        .update_runtime_config(cidr_request(""))
        .await
        .expect("empty");
    let err = client
        .update_runtime_config(cidr_request("10.244.1.0"))
        .await
        .expect_err("not a CIDR");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("pod_cidr"), "{}", err.message());
    assert_eq!(
        reported_pod_cidrs(&daemon).await,
        vec!["10.244.1.0/24", "fd00:1::/64"]
    );

    assert!(daemon.stop().success());
    let restarted = TestDaemon::start_with(Options {
        root: Some(daemon.root.clone()),
        state: Some(daemon.state.clone()),
        ..Options::default()
    });
    assert_eq!(
        reported_pod_cidrs(&restarted).await,
        vec!["10.244.1.0/24", "fd00:1::/64"]
    );
}

/// Unmounts the test's tmpfs, also when the test fails.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn a_full_disk_fails_writes_only_while_it_is_full() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root dir");
    nix::mount::mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m"),
    )
    .expect("mount a small tmpfs");
    let _tmpfs = Tmpfs(root.clone());
    let mut daemon = TestDaemon::start_with(Options {
        root: Some(root.clone()),
        ..Options::default()
    });
    let mut client = daemon.runtime().await;

    // Fill what is left, then write.
    let filler = root.join("filler");
    let mut file = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 64 << 10];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    drop(file);
    let err = client
        .update_runtime_config(cidr_request("10.244.7.0/24"))
        .await
        .expect_err("no space left");
    assert!(err.message().contains("metadata.redb"), "{}", err.message());

    // redb refuses every transaction after an I/O error until reopened:
    // the daemon must do that itself once there is room again.
    std::fs::remove_file(&filler).expect("remove filler");
    client
        .update_runtime_config(cidr_request("10.244.8.0/24"))
        .await
        .expect("a write after space came back");
    assert_eq!(reported_pod_cidrs(&daemon).await, vec!["10.244.8.0/24"]);
    assert!(daemon.stop().success());
}

#[tokio::test]
async fn checkpoint_container_answers_unimplemented_with_a_sentence() {
    let daemon = TestDaemon::start();
    let mut runtime = daemon.runtime().await;
    let err = runtime
        .checkpoint_container(CheckpointContainerRequest::default())
        .await
        .expect_err("CheckpointContainer");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    assert!(
        err.message().contains("berth"),
        "a sentence, not a bare code: {err:?}"
    );
}

#[tokio::test]
async fn metric_descriptors_are_listed_and_no_pods_means_no_metrics() {
    let daemon = TestDaemon::start();
    let mut runtime = daemon.runtime().await;
    let descriptors = runtime
        .list_metric_descriptors(ListMetricDescriptorsRequest::default())
        .await
        .expect("ListMetricDescriptors")
        .into_inner()
        .descriptors;
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_network_receive_bytes_total",
    ] {
        let d = descriptors
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no descriptor {name}: {descriptors:?}"));
        assert_eq!(
            d.label_keys[..5],
            ["id", "image", "namespace", "pod", "container"],
            "{name}"
        );
    }
    let pods = runtime
        .list_pod_sandbox_metrics(ListPodSandboxMetricsRequest::default())
        .await
        .expect("ListPodSandboxMetrics")
        .into_inner()
        .pod_metrics;
    assert!(pods.is_empty(), "{pods:?}");
}

#[test]
fn sigterm_and_sigint_exit_zero_and_remove_the_socket() {
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut daemon = TestDaemon::start();
        daemon.signal(signal);
        // The daemon bounds its own shutdown (SHUTDOWN_GRACE, 1.5 s, plus
        // 0.2 s for the runtime); the wait here only catches a hang, with
        // room for a loaded CI machine, where a 2 s wall clock failed.
        let status = daemon.wait_exit(Duration::from_secs(10));
        let status = status
            .unwrap_or_else(|| panic!("still running 10 s after {signal}:\n{}", daemon.log()));
        assert!(status.success(), "{signal}: {status}\n{}", daemon.log());
        assert!(!daemon.socket.exists(), "socket left behind after {signal}");
    }
}

#[test]
fn socket_is_created_with_mode_0660_in_created_parent_dirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("a/b/berth.sock");
    let daemon = TestDaemon::start_with(Options {
        socket: Some(socket.clone()),
        ..Options::default()
    });
    let mode = std::fs::metadata(&daemon.socket)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}

#[test]
fn second_daemon_on_the_same_socket_refuses_to_start() {
    let first = TestDaemon::start();
    let mut second = TestDaemon::spawn(Options {
        socket: Some(first.socket.clone()),
        ..Options::default()
    });
    let status = second
        .wait_exit(Duration::from_secs(10))
        .expect("second daemon exits");
    assert!(!status.success());
    let log = second.log();
    assert!(
        log.contains("another berth daemon") && log.contains(&first.socket.display().to_string()),
        "{log}"
    );
    // The first one still serves.
    assert!(std::os::unix::net::UnixStream::connect(&first.socket).is_ok());
}

#[test]
fn second_daemon_on_the_same_root_refuses_to_start() {
    let first = TestDaemon::start();
    let mut second = TestDaemon::spawn(Options {
        root: Some(first.root.clone()),
        ..Options::default()
    });
    let status = second
        .wait_exit(Duration::from_secs(10))
        .expect("second daemon exits");
    assert!(!status.success());
    let log = second.log();
    assert!(
        log.contains("another berth daemon") && log.contains(&first.root.display().to_string()),
        "{log}"
    );
}

#[test]
fn stale_socket_left_by_a_killed_daemon_is_replaced() {
    let mut first = TestDaemon::start();
    first.signal(Signal::SIGKILL);
    first
        .wait_exit(Duration::from_secs(10))
        .expect("killed daemon exits");
    assert!(first.socket.exists(), "SIGKILL leaves the socket file");
    let second = TestDaemon::start_with(Options {
        socket: Some(first.socket.clone()),
        root: Some(first.root.clone()),
        state: Some(first.state.clone()),
        ..Options::default()
    });
    assert!(std::os::unix::net::UnixStream::connect(&second.socket).is_ok());
}

#[test]
fn bad_config_makes_serve_exit_nonzero_with_one_line_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "config.toml",
            "root = \"/tmp/x\"\nbogus_key = 1\n",
            "`bogus_key`",
        ),
        (
            "config.toml",
            "[network]\npod_cidr = \"banana\"\n",
            "`network.pod_cidr`",
        ),
        ("config.toml", "log_level = \"loud\"\n", "`log_level`"),
    ];
    for (name, text, key) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        let socket = dir.path().join("never.sock");
        let (status, stdout, stderr) = run_berth(&[
            "--config",
            path.to_str().expect("utf-8 path"),
            "serve",
            "--socket",
            socket.to_str().expect("utf-8 path"),
        ]);
        assert!(!status.success(), "{text}");
        assert!(stdout.is_empty(), "{stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(
            lines[0].contains(&path.display().to_string()) && lines[0].contains(key),
            "{stderr}"
        );
        assert!(!socket.exists(), "a refused config starts nothing");
    }
}

#[test]
fn drop_in_errors_name_the_drop_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("config.toml");
    std::fs::write(&main, "log_level = \"debug\"\n").expect("write");
    std::fs::create_dir(dir.path().join("config.d")).expect("mkdir");
    let dropin = dir.path().join("config.d/50-bad.toml");
    std::fs::write(&dropin, "cgroup_driver = 7\n").expect("write");
    let (status, _, stderr) = run_berth(&["--config", main.to_str().expect("utf-8"), "config"]);
    assert!(!status.success());
    assert!(
        stderr.contains(&dropin.display().to_string()) && stderr.contains("`cgroup_driver`"),
        "{stderr}"
    );
}

#[test]
fn config_command_prints_the_effective_config_with_flags_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("config.toml");
    std::fs::write(&main, "cgroup_driver = \"systemd\"\n").expect("write");
    let (status, stdout, stderr) = run_berth(&[
        "--config",
        main.to_str().expect("utf-8"),
        "config",
        "--root",
        "/srv/berth",
        "--state",
        "/run/berth-test",
    ]);
    assert!(status.success(), "{stderr}");
    let printed: toml::Table = stdout.parse().expect("prints TOML");
    assert_eq!(printed["root"].as_str(), Some("/srv/berth"));
    assert_eq!(
        printed["socket"].as_str(),
        Some("/run/berth-test/berth.sock")
    );
    assert_eq!(printed["cgroup_driver"].as_str(), Some("systemd"));
    assert!(printed["network"]["pod_cidr"].is_str());
}

#[test]
fn check_prints_a_line_per_requirement_and_fails_only_on_missing_ones() {
    let (status, stdout, _) = run_berth(&["check", "--root", "/nonexistent/berth-check"]);
    let lines: Vec<&str> = stdout.lines().collect();
    for name in [
        "overlayfs",
        "namespace user",
        "cgroups",
        "seccomp",
        "apparmor",
        "cni",
        "disk space",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(name)),
            "{name} missing from:\n{stdout}"
        );
    }
    for line in &lines {
        let word = line.split_whitespace().next().unwrap_or_default();
        assert!(["ok", "missing", "optional"].contains(&word), "{line}");
    }
    let any_missing = lines.iter().any(|l| l.starts_with("missing"));
    assert_eq!(status.success(), !any_missing, "{stdout}");
}

#[test]
fn version_command_prints_the_version() {
    let (status, stdout, _) = run_berth(&["version"]);
    assert!(status.success());
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
}

#[test]
fn bench_idle_makes_kubelets_periodic_calls_and_reads_the_daemons_memory() {
    // 120 rounds: more than the 100 empty DATA frames after which an h2
    // client closes the connection, which empty lists once sent.
    let daemon = TestDaemon::start();
    let endpoint = format!("unix://{}", daemon.socket.display());
    let (status, stdout, stderr) = run_berth(&[
        "bench",
        "--endpoint",
        &endpoint,
        "--scenario",
        "idle",
        "--iterations",
        "120",
        "--json",
    ]);
    assert!(status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    let berth = &report["endpoints"][0];
    assert_eq!(berth["runtime_name"], "berth", "{stdout}");
    assert_eq!(berth["daemon_pid"], daemon.pid().as_raw(), "{stdout}");
    let mut ops: Vec<(String, u64)> = berth["operations"]
        .as_array()
        .expect("operations")
        .iter()
        .map(|o| {
            (
                o["op"].as_str().unwrap_or("").to_string(),
                o["n"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    ops.sort();
    let expected: Vec<(String, u64)> = [
        "ImageFsInfo",
        "ListContainers",
        "ListImages",
        "ListPodSandbox",
        "Status",
        "Version",
    ]
    .iter()
    .map(|op| (op.to_string(), 120))
    .collect();
    assert_eq!(ops, expected, "{stdout}");
    let rss = &berth["memory"]["end"]["daemon"]["rss_kib"];
    assert!(rss.as_u64().is_some_and(|kib| kib > 0), "{stdout}");
    assert!(berth["failure"].is_null(), "{stdout}");
}
