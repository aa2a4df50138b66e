//! AppArmor on the real kernel: the daemon's default profile is loaded
//! through `container::apparmor`, and a container and an exec into it run
//! confined by it. Only where AppArmor is enabled (this is what
//! `hack/apparmor-vm.sh` boots a kernel for); elsewhere each test prints why
//! it is skipped.
//!
//! Like the executor's own tests (`container/tests.rs`), each test re-runs
//! the test binary for just itself with one thread, so that the executor's
//! forks never happen beside another test's threads.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use oci_spec::runtime::{LinuxIdMapping, Process, Spec};
use serde_json::{Value, json};

use crate::container::apparmor::ensure_default_profile;
use crate::container::exec::exec_process;
use crate::container::spec::APPARMOR_DEFAULT_PROFILE;
use crate::executor::test_support::{self, Rootfs, Running, pipe_stdio};
use crate::executor::{CreateOptions, JoinTarget, create, exec, kill};

const PROFILES: &str = "/sys/kernel/security/apparmor/profiles";

/// Runs `body` in a single-threaded re-exec of this test binary, where the
/// kernel has AppArmor.
fn isolated(name: &str, body: impl FnOnce()) {
    let skip = (!super::apparmor_enabled()).then(|| {
        "apparmor is not enabled on this kernel (hack/apparmor-vm.sh boots one)".to_string()
    });
    test_support::isolated(module_path!(), name, skip, body)
}

/// What the confined shell reports: its label both ways, then whether a
/// mount (it holds CAP_SYS_ADMIN, so only the profile can refuse it) and a
/// write to `/proc/sysrq-trigger` (not read-only here: only the profile
/// can refuse it) went through. `h` only prints the sysrq help.
const PROBE: &str = "echo current=$(cat /proc/self/attr/current); \
     echo aa-current=$(cat /proc/self/attr/apparmor/current); \
     if mount -t tmpfs probe /mnt; then echo mount=allowed; else echo mount=denied; fi; \
     if echo h > /proc/sysrq-trigger; then echo sysrq=allowed; else echo sysrq=denied; fi; \
     echo probe=done";

/// runc's defaults with CAP_SYS_ADMIN, and no read-only /proc paths, so
/// that what the probe is refused is refused by AppArmor.
fn spec(rootfs: &Path, args: &[&str], profile: &str) -> Spec {
    let caps = json!(["CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_KILL"]);
    let v: Value = json!({
        "ociVersion": "1.0.2",
        "root": { "path": rootfs },
        "hostname": "berth-lsm-test",
        "process": {
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": { "uid": 0, "gid": 0 },
            "apparmorProfile": profile,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            }
        },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "mount" }
            ]
        }
    });
    serde_json::from_value(v).unwrap()
}

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name}= in output:\n{out}"))
}

/// Creates, starts and waits for the container; returns its output.
fn run_to_exit(spec: &Spec) -> String {
    let (mut out, stdio) = pipe_stdio();
    let created = create(CreateOptions {
        spec,
        stdio,
        cgroup_procs: &[],
        cgroup_mounts: None,
    })
    .unwrap();
    let container = Running(Some(created.start().unwrap()));
    let mut text = String::new();
    out.read_to_string(&mut text).unwrap();
    assert!(
        matches!(container.wait(), WaitStatus::Exited(_, 0)),
        "{text}"
    );
    text
}

/// Asserts the probe ran confined by `profile` and was refused both.
fn assert_confined(out: &str, profile: &str) {
    let want = format!("{profile} (enforce)");
    assert_eq!(field(out, "current"), want, "{out}");
    assert_eq!(field(out, "aa-current"), want, "{out}");
    assert_eq!(field(out, "mount"), "denied", "{out}");
    assert_eq!(field(out, "sysrq"), "denied", "{out}");
}

#[test]
fn apparmor_default_profile_confines_the_container_and_its_exec() {
    isolated(
        "apparmor_default_profile_confines_the_container_and_its_exec",
        || {
            // Twice: the second finds it loaded.
            ensure_default_profile(APPARMOR_DEFAULT_PROFILE, Path::new(PROFILES)).unwrap();
            ensure_default_profile(APPARMOR_DEFAULT_PROFILE, Path::new(PROFILES)).unwrap();
            let loaded = std::fs::read_to_string(PROFILES).unwrap();
            assert!(
                loaded
                    .lines()
                    .any(|l| l == format!("{APPARMOR_DEFAULT_PROFILE} (enforce)")),
                "{loaded}"
            );

            let dir = Rootfs::new();
            let script = format!("{PROBE}; exec sleep 1000");
            let spec = spec(
                &dir.path(),
                &["sh", "-c", &script],
                APPARMOR_DEFAULT_PROFILE,
            );
            let (out, stdio) = pipe_stdio();
            let created = create(CreateOptions {
                spec: &spec,
                stdio,
                cgroup_procs: &[],
                cgroup_mounts: None,
            })
            .unwrap();
            let pid = created.start().unwrap();
            let container = Running(Some(pid));
            // The container keeps its end of the pipe open: read up to the
            // probe's last line.
            let mut text = String::new();
            for line in BufReader::new(out).lines() {
                let line = line.unwrap();
                text.push_str(&line);
                text.push('\n');
                if line == "probe=done" {
                    break;
                }
            }
            println!("container:\n{text}");
            assert_confined(&text, APPARMOR_DEFAULT_PROFILE);
            // And as the host sees it.
            let host_view = std::fs::read_to_string(format!("/proc/{pid}/attr/current")).unwrap();
            assert_eq!(
                host_view.trim_end_matches(['\n', '\0']),
                format!("{APPARMOR_DEFAULT_PROFILE} (enforce)")
            );

            // The daemon's exec (the container's process with the command
            // replaced, so the same profile), with no_new_privs as
            // allowPrivilegeEscalation: false sets it, enters the profile too.
            let cmd = ["sh".to_string(), "-c".to_string(), PROBE.to_string()];
            let mut process = exec_process(&spec, &cmd, false).unwrap();
            assert_eq!(
                process.apparmor_profile().as_deref(),
                Some(APPARMOR_DEFAULT_PROFILE)
            );
            process.set_no_new_privileges(Some(true));
            let (out, stdio) = pipe_stdio();
            let target = JoinTarget { pid, spec: &spec };
            let spawned = exec(&target, &process, stdio, &[]).unwrap();
            let exec_proc = Running(Some(spawned.pid));
            let mut text = String::new();
            let mut out = out;
            out.read_to_string(&mut text).unwrap();
            println!("exec:\n{text}");
            assert!(
                matches!(exec_proc.wait(), WaitStatus::Exited(_, 0)),
                "{text}"
            );
            assert_confined(&text, APPARMOR_DEFAULT_PROFILE);

            // The profile lets unconfined processes (berth's monitor) signal
            // the container.
            kill(pid, Signal::SIGKILL).unwrap();
            assert!(matches!(
                container.wait(),
                WaitStatus::Signaled(_, Signal::SIGKILL, _)
            ));
        },
    );
}

/// The control: the same probe, unconfined, is allowed both, so what the
/// confined one is refused is refused by the profile.
#[test]
fn apparmor_unconfined_container_may_do_what_the_profile_denies() {
    isolated(
        "apparmor_unconfined_container_may_do_what_the_profile_denies",
        || {
            let dir = Rootfs::new();
            let spec = spec(&dir.path(), &["sh", "-c", PROBE], "unconfined");
            let text = run_to_exit(&spec);
            println!("unconfined container:\n{text}");
            assert_eq!(field(&text, "current"), "unconfined", "{text}");
            assert_eq!(field(&text, "mount"), "allowed", "{text}");
            assert_eq!(field(&text, "sysrq"), "allowed", "{text}");
        },
    );
}

/// In a user namespace the process writes its exec attribute as the
/// namespace's root, not the host's.
#[test]
fn apparmor_profile_applies_in_a_user_namespace() {
    isolated("apparmor_profile_applies_in_a_user_namespace", || {
        ensure_default_profile(APPARMOR_DEFAULT_PROFILE, Path::new(PROFILES)).unwrap();
        let dir = Rootfs::new();
        let mut spec = spec(&dir.path(), &["sh", "-c", PROBE], APPARMOR_DEFAULT_PROFILE);
        let mapping: Vec<LinuxIdMapping> = serde_json::from_value(json!([
            { "containerID": 0, "hostID": 100000, "size": 65536 }
        ]))
        .unwrap();
        let mut linux = spec.linux().clone().unwrap();
        let mut namespaces = linux.namespaces().clone().unwrap();
        namespaces.push(serde_json::from_value(json!({ "type": "user" })).unwrap());
        linux
            .set_namespaces(Some(namespaces))
            .set_uid_mappings(Some(mapping.clone()))
            .set_gid_mappings(Some(mapping));
        spec.set_linux(Some(linux));
        let text = run_to_exit(&spec);
        println!("user namespace container:\n{text}");
        let want = format!("{APPARMOR_DEFAULT_PROFILE} (enforce)");
        assert_eq!(field(&text, "current"), want, "{text}");
        // CAP_SYS_ADMIN in its own user namespace would allow a tmpfs.
        assert_eq!(field(&text, "mount"), "denied", "{text}");
    });
}

/// A profile the kernel does not have: the process must not start, and
/// the error must name the profile, never run unconfined.
#[test]
fn apparmor_profile_not_loaded_fails_create_and_exec_clearly() {
    isolated(
        "apparmor_profile_not_loaded_fails_create_and_exec_clearly",
        || {
            let missing = "berth-test-no-such-profile";
            let dir = Rootfs::new();
            let root: PathBuf = dir.path();
            let (_out, stdio) = pipe_stdio();
            let bad = spec(&root, &["true"], missing);
            let err = create(CreateOptions {
                spec: &bad,
                stdio,
                cgroup_procs: &[],
                cgroup_mounts: None,
            })
            .map(|c| c.pid())
            .unwrap_err()
            .to_string();
            println!("create: {err}");
            assert!(
                err.contains(&format!("apparmor profile {missing:?} is not loaded")),
                "{err}"
            );

            // An exec into an unconfined container, asking for it.
            let spec = spec(&root, &["sleep", "1000"], "unconfined");
            let (_out, stdio) = pipe_stdio();
            let created = create(CreateOptions {
                spec: &spec,
                stdio,
                cgroup_procs: &[],
                cgroup_mounts: None,
            })
            .unwrap();
            let pid = created.start().unwrap();
            let _container = Running(Some(pid));
            let process: Process = serde_json::from_value(json!({
                "args": ["true"],
                "env": ["PATH=/bin"],
                "cwd": "/",
                "user": { "uid": 0, "gid": 0 },
                "apparmorProfile": missing,
            }))
            .unwrap();
            let (_out, stdio) = pipe_stdio();
            let err = exec(&JoinTarget { pid, spec: &spec }, &process, stdio, &[])
                .map(|s| s.pid)
                .unwrap_err()
                .to_string();
            println!("exec: {err}");
            assert!(
                err.contains(&format!("apparmor profile {missing:?} is not loaded")),
                "{err}"
            );
        },
    );
}
