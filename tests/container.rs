//! The container service through the CRI socket: lifecycle and exit
//! reasons, CRI logs, ExecSync, stop and remove semantics, the image's USER
//! and the security context as a process inside sees them, bind mounts,
//! cgroup limits and OOM, env/args/working dir against the image config,
//! list filters, stats and ImageFsInfo's writable layers, name conflicts,
//! and containers outliving a daemon killed with SIGKILL.
//!
//! Every test has its own daemon, and its pods are hostNetwork (the network
//! is not under test here; a pod with a user namespace of its own cannot
//! be, and gets the rig's built-in network) with their own cgroup parent. A [`Rig`] removes
//! what the test made through the CRI when the test ends, also when it
//! panics, and `Rig::finish` then checks that no monitor, mount or cgroup of
//! the test is left.

mod common;
#[allow(dead_code)] // this file serves one image; pull_bad_input uses the rest
#[path = "fake_registry/mod.rs"]
mod fake_registry;

#[path = "support/rig.rs"]
mod rig;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use nix::sys::signal::Signal;
use rig::*;

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
    // Listed, its image_ref is the image ID, and image_id is empty: kubelet
    // then takes image_ref as the image ID, as it does with containerd.
    let listed = rig.listed(None).await;
    let listed = listed.iter().find(|c| c.id == sleeper).expect("listed");
    assert_eq!(listed.image_ref, rig.images().str("busybox", "image_id"));
    assert_eq!(listed.image_id, "");
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
async fn a_daemon_whose_binary_was_replaced_still_runs_pods_containers_and_execs() {
    // A package upgrade replaces the binary under a running daemon: the
    // path it was started from then names another file, or none.
    let Some(images) = common::TestImages::load() else {
        return;
    };
    let copy_dir = tempfile::tempdir().expect("tempdir");
    let copy = copy_dir.path().join("berth");
    common::copy_executable(Path::new(common::berth_bin()), &copy);
    let Some(mut rig) = Rig::start_from(Some(images), Some(copy.clone())).await else {
        return;
    };
    std::fs::remove_file(&copy).expect("remove the copy");

    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("upgraded").await;
    let id = rig.run(&pod, container("target", &busybox, SLEEPER)).await;
    assert_eq!(rig.exec_ok(&id, &["echo", "still"]).await, "still\n");

    // A shared PID namespace has berth's pause as PID 1, bound from the
    // daemon's own binary, not from the path it was started from.
    let shared = NamespaceOption {
        pid: NamespaceMode::Pod as i32,
        ..namespaces()
    };
    let mut config = rig.pod_config("shared");
    if let Some(sc) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.namespace_options = Some(shared.clone());
    }
    let pod = rig.run_pod(config).await;
    let mut sharing = container("sharing", &busybox, SLEEPER);
    if let Some(sc) = sharing
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.namespace_options = Some(shared);
    }
    let id = rig.run(&pod, sharing).await;
    assert_eq!(
        rig.exec_ok(&id, &["cat", "/proc/1/cmdline"]).await,
        "/pause\0pause\0"
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
async fn rootfs_leaves_the_daemons_mount_table_once_the_container_holds_it() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("detached").await;
    let id = rig
        .create(&pod, container("detached", &busybox, SLEEPER))
        .await;
    let snapshot = rig.base().join("root/containers").join(&id);
    let rootfs = snapshot.join("rootfs");
    within(
        "the daemon's rootfs mount to go",
        Duration::from_secs(10),
        async {
            while mounts_under(&snapshot).contains(&rootfs) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;

    // Only the daemon's copy went: the container starts on its rootfs,
    // reads the image's files and writes to its own writable layer.
    rig.start_container(&id).await;
    let passwd = rig.exec_ok(&id, &["cat", "/etc/passwd"]).await;
    assert!(passwd.starts_with("root:"), "{passwd}");
    rig.exec_ok(&id, &["sh", "-c", "echo kept > /written"])
        .await;
    assert_eq!(
        std::fs::read_to_string(snapshot.join("upper/written")).expect("upper/written"),
        "kept\n"
    );
    let mountinfo = rig.exec_ok(&id, &["cat", "/proc/self/mountinfo"]).await;
    let root = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap_or_default();
    assert!(root.contains(" - overlay "), "{mountinfo}");

    rig.stop(&id, 0).await;
    rig.remove(&id).await;
    assert!(!snapshot.exists(), "{snapshot:?} is left");
    rig.finish().await;
}

#[tokio::test]
async fn without_a_log_directory_the_output_is_read_and_dropped() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let mut config = rig.pod_config("nolog");
    config.log_directory = String::new();
    let pod = rig.run_pod(config).await;
    let talker = container(
        "talker",
        &busybox,
        &sh("while :; do echo talk talk talk talk; done"),
    );
    let id = rig.run(&pod, talker).await;
    assert_eq!(rig.status(&id).await.log_path, "");
    rig.rt()
        .reopen_container_log(ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .expect("ReopenContainerLog of a container without a log");
    // Read and dropped: the container is not blocked on a full pipe, and
    // nothing of its output is kept anywhere.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.exec_ok(&id, &["echo", "alive"]).await.trim(), "alive");
    // (berth kept it under the container's state directory once, in /run.)
    let kept: Vec<PathBuf> = walkdir_post_order(&rig.base().join("state"))
        .into_iter()
        .filter(|p| p.is_file() && std::fs::metadata(p).is_ok_and(|m| m.len() > 64 << 10))
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
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
async fn stats_list_each_pods_running_containers_and_image_fs_counts_writable_layers_only() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod_a = rig.pod("statsa").await;
    let pod_b = rig.pod("statsb").await;
    let a1 = rig.run(&pod_a, container("a1", &busybox, SLEEPER)).await;
    let _a2 = rig.create(&pod_a, container("a2", &busybox, SLEEPER)).await;
    let b1 = rig.run(&pod_b, container("b1", &busybox, SLEEPER)).await;
    let ids = |stats: &[ContainerStats]| {
        let mut ids: Vec<String> = stats
            .iter()
            .filter_map(|s| s.attributes.as_ref().map(|a| a.id.clone()))
            .collect();
        ids.sort();
        ids
    };
    let pod_containers = |stats: &PodSandboxStats| {
        let linux = stats.linux.as_ref().expect("linux pod stats");
        assert!(linux.memory.is_some(), "pod memory");
        ids(&linux.containers)
    };

    let mut listed = rig
        .rt()
        .list_pod_sandbox_stats(ListPodSandboxStatsRequest::default())
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats;
    listed.sort_by_key(|s| s.attributes.as_ref().map(|a| a.id.clone()));
    let by_pod: Vec<(String, Vec<String>)> = listed
        .iter()
        .map(|s| {
            let id = s.attributes.as_ref().expect("attributes").id.clone();
            (id, pod_containers(s))
        })
        .collect();
    let mut expected = vec![
        (pod_a.clone(), vec![a1.clone()]),
        (pod_b.clone(), vec![b1.clone()]),
    ];
    expected.sort();
    assert_eq!(by_pod, expected, "only running containers, each in its pod");
    let one = rig
        .rt()
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod_a.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .expect("stats");
    assert_eq!(pod_containers(&one), vec![a1.clone()]);
    let containers = rig
        .rt()
        .list_container_stats(ListContainerStatsRequest::default())
        .await
        .expect("ListContainerStats")
        .into_inner()
        .stats;
    let mut running = vec![a1.clone(), b1.clone()];
    running.sort();
    assert_eq!(ids(&containers), running);

    // Walked into, a rootfs mount would count the image's files again
    // (the daemon detaches its copies once containers hold them, and the
    // walk does not cross mounts either; see `disk_usage`'s unit test).
    let image_size = rig
        .image_client
        .clone()
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: busybox.clone(),
                ..ImageSpec::default()
            }),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
        .image
        .expect("image")
        .size;
    let info = rig
        .image_client
        .clone()
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo")
        .into_inner();
    let writable = info.container_filesystems[0]
        .used_bytes
        .as_ref()
        .expect("used bytes")
        .value;
    assert!(
        writable < image_size,
        "three writable layers take {writable} bytes, less than the image's {image_size}"
    );

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
    let parked_pid = rig.pid(&parked).await;
    assert!(parked_pid > 0);

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
    // Its pid, not saved with its record, is found in its bundle.
    assert_eq!(
        rig.status(&parked).await.state,
        ContainerState::ContainerCreated as i32
    );
    assert_eq!(rig.pid(&parked).await, parked_pid);
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

#[tokio::test]
async fn a_torn_exit_record_after_a_crash_makes_the_container_unknown_not_the_daemon_fail() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("torn").await;
    let torn = rig.run(&pod, container("torn", &busybox, SLEEPER)).await;
    let pid = rig.pid(&torn).await;

    rig.kill_daemon();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)
        .expect("kill the container's init");
    assert!(wait_gone(pid).await);
    // Exit records are not flushed to disk: after a machine crash one may
    // be empty. Make it so.
    let record = rig.daemon.state.join("exits").join(&torn);
    within("the exit record", Duration::from_secs(10), async {
        while !record.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    std::fs::write(&record, b"").expect("truncate the exit record");
    rig.restart_daemon().await;

    let status = rig.status(&torn).await;
    assert_eq!(
        status.state,
        ContainerState::ContainerUnknown as i32,
        "{status:?}"
    );
    assert!(status.message.contains("exit record"), "{status:?}");
    rig.remove(&torn).await;

    rig.finish().await;
}

/// CreateContainer saves its record once, while the monitor sets the
/// container up; a daemon that dies before the save leaves a bundle, a
/// snapshot, a cgroup and a parked process with no record. The next daemon
/// finds and undoes them.
#[tokio::test]
async fn a_create_the_daemon_died_in_is_undone_at_restart() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("orphan").await;
    let orphan = rig
        .create(&pod, container("orphan", &busybox, SLEEPER))
        .await;
    let pid = rig.pid(&orphan).await;
    let cgroup = rig.cgroup(&orphan).await;
    let bundle = rig.daemon.state.join("containers").join(&orphan);
    let snapshot = rig.daemon.root.join("containers").join(&orphan);
    assert!(bundle.is_dir() && snapshot.is_dir());
    assert!(!cgroup_dirs(&cgroup).is_empty());

    rig.kill_daemon();
    // As if the daemon had died before the record was saved.
    let store = berth::store::Store::open(&rig.daemon.root).expect("open the store");
    assert!(
        store
            .delete(berth::store::Kind::Container, &orphan)
            .expect("delete the record")
    );
    drop(store);
    rig.restart_daemon().await;
    // Fix: the daemon listens before its start-up undoes the create, so
    // the checks raced it (a bundle was seen left once). It answers a call
    // only after.
    let listed = rig.listed(None).await;

    assert!(wait_gone(pid).await, "the parked process was left running");
    assert!(!bundle.exists(), "bundle left: {}", bundle.display());
    assert!(!snapshot.exists(), "snapshot left: {}", snapshot.display());
    assert_eq!(cgroup_dirs(&cgroup), Vec::<PathBuf>::new());
    assert!(listed.iter().all(|c| c.id != orphan), "{listed:?}");
    // Its name is free again.
    let again = rig
        .create(&pod, container("orphan", &busybox, SLEEPER))
        .await;
    assert_ne!(again, orphan);

    rig.finish().await;
}

/// A client that gives up on CreateContainer (its deadline passes, as
/// kubelet's does on a loaded node) does not cut the create short: it
/// finishes, the container is listed, and the client's retry finds the name
/// taken. Dropped halfway, it left a bundle, a snapshot and a cgroup without
/// a record until the next restart.
#[tokio::test]
async fn a_create_the_client_gave_up_on_finishes() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("gave-up").await;
    let mut request = tonic::Request::new(CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(container("gave-up", &busybox, SLEEPER)),
        sandbox_config: rig.pods.get(&pod).cloned(),
    });
    // Far shorter than any create: the daemon drops the call at once.
    request.set_timeout(Duration::from_micros(1));
    let gave_up = rig
        .rt()
        .create_container(request)
        .await
        .expect_err("a create within a microsecond");
    assert!(
        matches!(
            gave_up.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{gave_up:?}"
    );

    let by_pod = ContainerFilter {
        pod_sandbox_id: pod.clone(),
        ..Default::default()
    };
    let start = Instant::now();
    let id = loop {
        if let Some(id) = rig.list(by_pod.clone()).await.pop() {
            break id;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the create the client gave up on was cut short"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        rig.status(&id).await.state(),
        ContainerState::ContainerCreated
    );
    let retry = rig
        .try_create(&pod, container("gave-up", &busybox, SLEEPER))
        .await
        .expect_err("the name is taken");
    assert!(retry.message().contains(&id), "{retry:?}");
    rig.start_container(&id).await;
    rig.wait_state(&id, ContainerState::ContainerRunning).await;

    rig.finish().await;
}

/// Unmounts (detached) what a test mounted on the host, also on failure.
struct HostMounts(Vec<PathBuf>);

impl Drop for HostMounts {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[tokio::test]
async fn mount_propagation_private_host_to_container_and_bidirectional() {
    use nix::mount::{MsFlags, mount};
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let mut config = rig.pod_config("propagation");
    config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("security context")
        .privileged = true;
    let pod = rig.run_pod(config).await;
    let mut host_mounts = HostMounts(Vec::new());
    for (n, propagation) in [
        MountPropagation::PropagationPrivate,
        MountPropagation::PropagationHostToContainer,
        MountPropagation::PropagationBidirectional,
    ]
    .into_iter()
    .enumerate()
    {
        // As critest: an rshared (or rprivate) bind of a host directory.
        let base = rig.base().join(format!("propagation{n}"));
        let shared = base.join("mnt");
        let from_host = shared.join("from-host");
        let source = base.join("source");
        std::fs::create_dir_all(&from_host).expect("mkdir");
        std::fs::create_dir_all(&source).expect("mkdir");
        std::fs::write(source.join("flag"), "").expect("flag file");
        mount(
            Some(&shared),
            &shared,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .expect("bind the shared dir");
        host_mounts.0.push(shared.clone());
        let kind = if propagation == MountPropagation::PropagationPrivate {
            MsFlags::MS_PRIVATE
        } else {
            MsFlags::MS_SHARED
        };
        mount(
            None::<&str>,
            &shared,
            None::<&str>,
            kind | MsFlags::MS_REC,
            None::<&str>,
        )
        .expect("set propagation");
        let mut ctr = with_security(
            container(&format!("prop{n}"), &busybox, SLEEPER),
            LinuxContainerSecurityContext {
                privileged: true,
                ..LinuxContainerSecurityContext::default()
            },
        );
        let path = shared.display().to_string();
        ctr.mounts = vec![Mount {
            host_path: path.clone(),
            container_path: path.clone(),
            propagation: propagation as i32,
            ..Mount::default()
        }];
        let id = rig.run(&pod, ctr).await;

        // Host → container.
        mount(
            Some(&source),
            &from_host,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("mount on the host");
        host_mounts.0.push(from_host.clone());
        let seen = rig
            .exec(&id, &["ls", "-A", &from_host.display().to_string()])
            .await
            .1;
        match propagation {
            MountPropagation::PropagationPrivate => assert_eq!(seen, "", "{propagation:?}"),
            _ => assert_eq!(seen, "flag\n", "{propagation:?}"),
        }

        // Container → host.
        let from_container = shared.join("from-container");
        let script = format!(
            "mkdir -p {0} && mount --bind /etc {0}",
            from_container.display()
        );
        assert_eq!(rig.exec(&id, &["sh", "-c", &script]).await.0, 0);
        host_mounts.0.push(from_container.clone());
        let on_host = std::fs::read_dir(&from_container)
            .map(|d| d.count())
            .unwrap_or(0);
        match propagation {
            MountPropagation::PropagationBidirectional => {
                assert!(on_host > 0, "{propagation:?}: the host sees the mount")
            }
            _ => assert_eq!(on_host, 0, "{propagation:?}: the host must not see it"),
        }
        rig.stop(&id, 0).await;
        rig.remove(&id).await;
    }
    drop(host_mounts);
    rig.finish().await;
}

/// kubelet's `hostUsers: false`: the pod gets a user namespace of its own,
/// here mapping 0..65536 to 300000.., which owns the pod's network, IPC and
/// UTS namespaces (and, through the infra process, its PID namespace). Its
/// containers are root only in it; the image's files and the idmapped
/// volumes kubelet asks for are that root's.
#[tokio::test]
async fn a_pod_with_a_user_namespace_of_its_own_runs_containers_as_root_only_there() {
    const HOST_ID: u32 = 300_000;
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    // Offered: this kernel allows user namespaces and its root filesystem
    // takes idmapped mounts, which the daemon tried at start.
    let status = rig
        .rt()
        .status(StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner();
    let features = status.runtime_handlers[0].features.unwrap_or_default();
    assert!(features.user_namespaces, "{status:?}");
    let busybox = rig.pull("busybox").await;
    let range = vec![IdMapping {
        container_id: 0,
        host_id: HOST_ID,
        length: 65536,
    }];
    let options = NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Pod as i32,
        ipc: NamespaceMode::Pod as i32,
        userns_options: Some(UserNamespace {
            mode: NamespaceMode::Pod as i32,
            uids: range.clone(),
            gids: range.clone(),
        }),
        ..NamespaceOption::default()
    };
    let mut config = rig.pod_config("userns");
    if let Some(linux) = config.linux.as_mut() {
        // Set by the daemon's thread from outside the pod's namespace.
        linux.sysctls = [(
            "net.ipv4.ip_unprivileged_port_start".to_string(),
            "80".to_string(),
        )]
        .into();
        if let Some(sc) = linux.security_context.as_mut() {
            sc.namespace_options = Some(options.clone());
        }
    }
    let pod = rig.run_pod(config).await;

    let volume = rig.base().join("userns-volume");
    std::fs::create_dir_all(&volume).expect("volume");
    std::fs::write(volume.join("f"), b"host's\n").expect("volume file");
    let mut root = with_security(
        container("root", &busybox, SLEEPER),
        LinuxContainerSecurityContext {
            namespace_options: Some(options),
            ..LinuxContainerSecurityContext::default()
        },
    );
    root.mounts = vec![
        Mount {
            container_path: "/data".into(),
            host_path: volume.display().to_string(),
            uid_mappings: range.clone(),
            gid_mappings: range,
            ..Mount::default()
        },
        // An image volume, seen through the namespace as the rootfs is.
        Mount {
            container_path: "/image".into(),
            image: Some(ImageSpec {
                image: busybox.clone(),
                ..ImageSpec::default()
            }),
            readonly: true,
            ..Mount::default()
        },
    ];
    let id = rig.run(&pod, root).await;

    // Root in the namespace, with the pod's maps; 300000 on the host.
    let uid_map = rig.exec_ok(&id, &["cat", "/proc/self/uid_map"]).await;
    assert_eq!(
        uid_map.split_whitespace().collect::<Vec<_>>(),
        ["0", "300000", "65536"]
    );
    assert_eq!(rig.exec_ok(&id, &["id", "-u"]).await.trim(), "0");
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", rig.pid(&id).await)).expect("status");
    let uids = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    assert_eq!(uids.split_whitespace().nth(1), Some("300000"), "{uids}");

    // The image's files are the namespace's root's; what the container
    // writes to its rootfs is that root's on the host.
    for file in ["/bin/busybox", "/image/bin/busybox"] {
        let owner = rig.exec_ok(&id, &["stat", "-c", "%u:%g", file]).await;
        assert_eq!(owner.trim(), "0:0", "{file}");
    }
    rig.exec_ok(&id, &["sh", "-c", "echo mine > /written"])
        .await;
    let upper = rig.base().join("root/containers").join(&id).join("upper");
    let written = std::fs::metadata(upper.join("written")).expect("upper/written");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((written.uid(), written.gid()), (HOST_ID, HOST_ID));

    // The idmapped volume: the host's root files are the container's
    // root's, and what it writes there is the host's root's on disk.
    let seen = rig.exec_ok(&id, &["stat", "-c", "%u", "/data/f"]).await;
    assert_eq!(seen.trim(), "0");
    rig.exec_ok(&id, &["sh", "-c", "echo back > /data/g"]).await;
    let back = std::fs::metadata(volume.join("g")).expect("volume/g");
    assert_eq!((back.uid(), back.gid()), (0, 0));

    // Not the host's user namespace, and the pod's network namespace is
    // the container's.
    let pid = rig.pid(&id).await;
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    assert_ne!(ns(&pid.to_string(), "user"), ns("self", "user"));
    assert_ne!(ns(&pid.to_string(), "net"), ns("self", "net"));
    let hostname = rig.exec_ok(&id, &["hostname"]).await;
    assert_eq!(hostname.trim(), "userns");
    let port_start = rig
        .exec_ok(
            &id,
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
        )
        .await;
    assert_eq!(port_start.trim(), "80");

    // A daemon started again finds the pod's user namespace for its next
    // container.
    rig.kill_daemon();
    rig.restart_daemon().await;
    let mut again = container("again", &busybox, &["cat", "/proc/self/uid_map"]);
    again.linux = rig.pods[&pod].linux.as_ref().map(|l| LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            namespace_options: l
                .security_context
                .as_ref()
                .and_then(|s| s.namespace_options.clone()),
            ..LinuxContainerSecurityContext::default()
        }),
        ..LinuxContainerConfig::default()
    });
    let again = rig.run(&pod, again).await;
    rig.wait_exited(&again).await;
    let log = cri_log(&rig.log_dir(&pod).join("again.log"));
    let mapped: Vec<String> = log.iter().map(|(_, _, line)| line.clone()).collect();
    assert_eq!(
        mapped.concat().split_whitespace().collect::<Vec<_>>(),
        ["0", "300000", "65536"],
        "{log:?}"
    );

    rig.stop(&id, 0).await;
    rig.remove(&id).await;
    rig.finish().await;
}

/// kubelet's image volumes (KEP 4639): a CRI mount of an image is that
/// image's files, read-only, whiteouts applied; the image is in use while
/// the container is, and the daemon keeps no mount of it.
#[tokio::test]
async fn an_image_volume_is_the_images_files_read_only() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let layers = rig.pull("layers").await;
    let pod = rig.pod("imagevolume").await;
    let mut reader = container("reader", &busybox, SLEEPER);
    reader.mounts = vec![Mount {
        container_path: "/volume".into(),
        image: Some(ImageSpec {
            image: layers.clone(),
            ..ImageSpec::default()
        }),
        readonly: true,
        ..Mount::default()
    }];
    let id = rig.run(&pod, reader).await;

    assert_eq!(rig.exec_ok(&id, &["cat", "/volume/data/b"]).await, "b\n");
    assert_eq!(
        rig.exec_ok(&id, &["cat", "/volume/data/dir/z"]).await,
        "z\n"
    );
    let (hidden, _, _) = rig.exec(&id, &["test", "-e", "/volume/data/a"]).await;
    assert_ne!(hidden, 0, "the whiteout of a later layer hides data/a");
    let (code, _, err) = rig.exec(&id, &["touch", "/volume/new"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("Read-only"), "{err}");

    let remove = |image: String| {
        let mut client = rig.image_client.clone();
        async move {
            client
                .remove_image(RemoveImageRequest {
                    image: Some(ImageSpec {
                        image,
                        ..ImageSpec::default()
                    }),
                })
                .await
        }
    };
    let in_use = remove(layers.clone()).await.expect_err("in use");
    assert!(in_use.message().contains(&id), "{in_use:?}");

    let volumes = rig
        .base()
        .join("root/containers")
        .join(&id)
        .join("image-volumes");
    within(
        "the daemon's mounts to go",
        Duration::from_secs(10),
        async {
            while !mounts_under(&volumes).is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    // The container keeps its own.
    assert_eq!(rig.exec_ok(&id, &["cat", "/volume/data/b"]).await, "b\n");

    rig.stop(&id, 0).await;
    rig.remove(&id).await;
    remove(layers)
        .await
        .expect("RemoveImage once no container uses it");
    rig.finish().await;
}
