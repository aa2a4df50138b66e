//! Integration tests of the executor on the real kernel, as root, with a
//! busybox rootfs made from the host's busybox-static.
//!
//! The test harness is multi-threaded and the executor forks, so every test
//! that creates a container re-executes the test binary to run just itself
//! (`--exact`, one test thread) and checks the child's result: forks never
//! happen next to another test's threads, and fds of one test never leak
//! into another test's container. Each test cleans up through guards: the
//! container is SIGKILLed and reaped, the temp dir removed, and at the end
//! `/proc/self/mountinfo` must show nothing under the temp dir.

use std::io::Read;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use oci_spec::runtime::{Process, Spec};
use serde_json::{Value, json};

use super::{CreateOptions, Stdio, create, kill};
use crate::executor::exec::{JoinTarget, exec};
use crate::executor::test_support::{self, Rootfs, Running, pipe_stdio, read_all};

/// Runs `body` in a single-threaded re-exec of this test binary.
fn isolated(name: &str, body: impl FnOnce()) {
    test_support::isolated(module_path!(), name, None, body)
}

/// The spec the tests start from: runc's defaults (all namespaces but
/// user, the usual mounts, masked and read-only paths).
fn spec(rootfs: &Path, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": { "path": rootfs },
        "hostname": "berth-test",
        "process": {
            "args": args,
            "env": ["PATH=/bin", "HOME=/root"],
            "cwd": "/",
            "user": { "uid": 0, "gid": 0 },
            "noNewPrivileges": true,
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            }
        },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
              "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] }
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "mount" }, { "type": "cgroup" }
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/acpi", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn to_spec(v: Value) -> Spec {
    serde_json::from_value(v).unwrap()
}

/// Creates, starts, waits; returns (exit status, output).
fn run(spec: &Spec) -> (WaitStatus, String) {
    let (out, stdio) = pipe_stdio();
    let created = create(CreateOptions {
        spec,
        stdio,
        cgroup_procs: &[],
        cgroup_mounts: None,
    })
    .unwrap();
    let pid = created.start().unwrap();
    let running = Running(Some(pid));
    let output = read_all(out);
    (running.wait(), output)
}

fn status_field<'a>(out: &'a str, field: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(field).map(str::trim))
        .unwrap_or_else(|| panic!("no {field} in output:\n{out}"))
}

#[test]
fn container_sees_its_own_pid_hostname_user_caps_and_security() {
    isolated(
        "container_sees_its_own_pid_hostname_user_caps_and_security",
        || {
            let rootfs = Rootfs::new();
            let mut v = spec(
                &rootfs.path(),
                &[
                    "sh",
                    "-c",
                    "echo pid=$$; id; hostname; cat /proc/self/status; ls /; \
                 echo kcore=$(wc -c < /proc/kcore) keys=$(wc -c < /proc/keys); \
                 cat /proc/self/mountinfo; \
                 mkdir /tmp/denied || echo mkdir-failed; cat /proc/self/limits",
                ],
            );
            v["process"]["user"] = json!({ "uid": 1000, "gid": 1000, "additionalGids": [2000] });
            // A non-root process keeps capabilities across execve only through
            // the ambient set (kernel rule; runc behaves the same).
            let caps = json!(["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
            v["process"]["capabilities"]["inheritable"] = caps.clone();
            v["process"]["capabilities"]["ambient"] = caps;
            v["linux"]["seccomp"] = json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
                "syscalls": [
                    { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 18 },
                    { "names": ["no_such_syscall_at_all"], "action": "SCMP_ACT_ERRNO" }
                ]
            });
            let (status, out) = run(&to_spec(v));
            assert_eq!(status, WaitStatus::Exited(status_pid(&status), 0), "{out}");
            assert!(out.contains("pid=1\n"), "{out}");
            assert!(out.contains("uid=1000 gid=1000 groups=2000"), "{out}");
            assert!(out.lines().any(|l| l == "berth-test"), "{out}");
            // CAP_CHOWN (0), CAP_KILL (5), CAP_NET_BIND_SERVICE (10).
            for field in ["CapEff:", "CapPrm:", "CapBnd:", "CapInh:", "CapAmb:"] {
                assert_eq!(
                    status_field(&out, field),
                    "0000000000000421",
                    "{field}\n{out}"
                );
            }
            assert_eq!(status_field(&out, "Seccomp:"), "2");
            assert_eq!(status_field(&out, "NoNewPrivs:"), "1");
            // Masked: /proc/kcore where this kernel has it (not on every VM
            // kernel), /proc/keys always; both read empty.
            if Path::new("/proc/kcore").exists() {
                assert!(out.contains("kcore=0 "), "{out}");
            }
            assert!(out.contains(" keys=0\n"), "{out}");
            let proc_sys = out
                .lines()
                .find(|l| l.split(' ').nth(4) == Some("/proc/sys"))
                .unwrap_or_else(|| panic!("/proc/sys not a mount:\n{out}"));
            assert!(
                proc_sys.split(' ').nth(5).unwrap().starts_with("ro"),
                "{proc_sys}"
            );
            let cgroup = out
                .lines()
                .find(|l| l.split(' ').nth(4) == Some("/sys/fs/cgroup/memory"))
                .unwrap_or_else(|| panic!("no memory cgroup mount:\n{out}"));
            assert!(
                cgroup.split(' ').nth(5).unwrap().starts_with("ro"),
                "{cgroup}"
            );
            // The seccomp rule's errno (EXDEV), not a permission error.
            assert!(out.contains("Invalid cross-device link"), "{out}");
            assert!(out.contains("mkdir-failed"), "{out}");
            let nofile = out
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .unwrap();
            assert_eq!(nofile.split_whitespace().nth(3), Some("1024"), "{nofile}");
            assert!(out.contains("bin\n"), "{out}");
        },
    );
}

fn status_pid(status: &WaitStatus) -> Pid {
    status.pid().expect("a pid")
}

#[test]
fn create_parks_the_process_until_start() {
    isolated("create_parks_the_process_until_start", || {
        let rootfs = Rootfs::new();
        let marker = rootfs.path().join("tmp/marker");
        let v = spec(&rootfs.path(), &["sh", "-c", "echo ran > /tmp/marker"]);
        let spec = to_spec(v);
        let (out, stdio) = pipe_stdio();
        let created = create(CreateOptions {
            spec: &spec,
            stdio,
            cgroup_procs: &[],
            cgroup_mounts: None,
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!marker.exists(), "the process ran before start");
        let pid = created.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        let started = created.start().unwrap();
        assert_eq!(started, pid);
        let status = Running(Some(pid)).wait();
        assert_eq!(status, WaitStatus::Exited(pid, 0), "{}", read_all(out));
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ran\n");
    });
}

#[test]
fn dropping_a_created_container_kills_it() {
    isolated("dropping_a_created_container_kills_it", || {
        let rootfs = Rootfs::new();
        let spec = to_spec(spec(&rootfs.path(), &["true"]));
        let (_out, stdio) = pipe_stdio();
        let created = create(CreateOptions {
            spec: &spec,
            stdio,
            cgroup_procs: &[],
            cgroup_mounts: None,
        })
        .unwrap();
        let pid = created.pid();
        drop(created);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    });
}

#[test]
fn missing_binary_fails_start_with_a_precise_error() {
    isolated("missing_binary_fails_start_with_a_precise_error", || {
        let rootfs = Rootfs::new();
        for (args, want) in [
            (
                vec!["/bin/foo"],
                r#"exec "/bin/foo": no such file or directory in container rootfs"#,
            ),
            (
                vec!["foo"],
                r#"exec "foo": executable file not found in $PATH"#,
            ),
            (vec!["/tmp"], r#"exec "/tmp": is a directory"#),
        ] {
            let spec = to_spec(spec(&rootfs.path(), &args));
            let (_out, stdio) = pipe_stdio();
            let created = create(CreateOptions {
                spec: &spec,
                stdio,
                cgroup_procs: &[],
                cgroup_mounts: None,
            })
            .unwrap();
            let err = created.start().unwrap_err();
            assert_eq!(err.to_string(), want);
        }
    });
}

#[test]
fn setup_errors_come_back_precise() {
    isolated("setup_errors_come_back_precise", || {
        let rootfs = Rootfs::new();
        let mut v = spec(&rootfs.path(), &["true"]);
        v["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "destination": "/data", "type": "bind", "source": "/nonexistent/berth-source" }));
        let spec = to_spec(v);
        let (_out, stdio) = pipe_stdio();
        let err = create(CreateOptions {
            spec: &spec,
            stdio,
            cgroup_procs: &[],
            cgroup_mounts: None,
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "mount /nonexistent/berth-source on \"/data\" (type bind): ENOENT: No such file or directory"
        );
    });
}

#[test]
fn mount_targets_cannot_escape_the_rootfs() {
    isolated("mount_targets_cannot_escape_the_rootfs", || {
        let rootfs = Rootfs::new();
        let root = rootfs.path();
        let tag = std::process::id();
        let abs_escape = PathBuf::from(format!("/berth-escape-abs-{tag}"));
        let rel_escape = PathBuf::from(format!("/tmp/berth-escape-rel-{tag}"));
        assert!(!abs_escape.exists() && !rel_escape.exists());
        // The image: /etc -> /, /data -> /berth-escape-abs-N,
        // /rel -> ../../../../../../tmp/berth-escape-rel-N.
        std::fs::remove_dir(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/", root.join("etc")).unwrap();
        std::os::unix::fs::symlink(&abs_escape, root.join("data")).unwrap();
        std::os::unix::fs::symlink(
            format!("../../../../../..{}", rel_escape.display()),
            root.join("rel"),
        )
        .unwrap();
        let hosts = rootfs.base().join("hosts");
        std::fs::write(&hosts, "10.0.0.1 berth\n").unwrap();

        let mut v = spec(&root, &["sh", "-c", "cat /etc/hosts; ls -a /; echo done"]);
        let mounts = v["mounts"].as_array_mut().unwrap();
        mounts.push(json!({ "destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"] }));
        mounts.push(json!({ "destination": "/data", "type": "tmpfs", "source": "tmpfs" }));
        mounts.push(json!({ "destination": "/rel/sub", "type": "tmpfs", "source": "tmpfs" }));
        let (status, out) = run(&to_spec(v));
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{out}");
        assert!(out.contains("10.0.0.1 berth"), "{out}");
        assert!(out.contains("done"), "{out}");
        // Everything landed inside the rootfs, nothing on the host.
        assert!(!Path::new("/hosts").exists());
        assert!(!abs_escape.exists(), "{abs_escape:?} created on the host");
        assert!(!rel_escape.exists(), "{rel_escape:?} created on the host");
        assert!(root.join("hosts").exists());
        assert!(root.join(abs_escape.strip_prefix("/").unwrap()).is_dir());
        assert!(
            root.join(rel_escape.strip_prefix("/").unwrap())
                .join("sub")
                .is_dir()
        );

        // "../" in a destination is refused before anything is forked.
        let mut v = spec(&root, &["true"]);
        v["mounts"].as_array_mut().unwrap().push(
            json!({ "destination": "/../../tmp/berth-dotdot", "type": "tmpfs", "source": "tmpfs" }),
        );
        let spec = to_spec(v);
        let (_out, stdio) = pipe_stdio();
        let err = create(CreateOptions {
            spec: &spec,
            stdio,
            cgroup_procs: &[],
            cgroup_mounts: None,
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"mount destination "/../../tmp/berth-dotdot""#),
            "{err}"
        );
        assert!(!Path::new("/tmp/berth-dotdot").exists());
    });
}

#[test]
fn exec_joins_the_container_namespaces() {
    isolated("exec_joins_the_container_namespaces", || {
        let rootfs = Rootfs::new();
        let spec = to_spec(spec(&rootfs.path(), &["sleep", "100"]));
        let (_out, stdio) = pipe_stdio();
        let created = create(CreateOptions {
            spec: &spec,
            stdio,
            cgroup_procs: &[],
            cgroup_mounts: None,
        })
        .unwrap();
        let pid = created.start().unwrap();
        let container = Running(Some(pid));

        let process: Process = serde_json::from_value(json!({
            "args": ["sh", "-c", "hostname; cat /proc/1/cmdline; echo; readlink /proc/self/ns/pid; id"],
            "env": ["PATH=/bin"],
            "cwd": "/tmp",
            "user": { "uid": 1234, "gid": 1234 },
            "noNewPrivileges": true
        }))
        .unwrap();
        let (out, stdio) = pipe_stdio();
        let target = JoinTarget { pid, spec: &spec };
        let spawned = exec(&target, &process, stdio, &[]).unwrap();
        let exec_proc = Running(Some(spawned.pid));
        let text = read_all(out);
        assert!(
            matches!(exec_proc.wait(), WaitStatus::Exited(_, 0)),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "berth-test", "{text}");
        assert_eq!(lines[1].replace('\0', " ").trim(), "sleep 100", "{text}");
        let container_pidns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
        assert_eq!(lines[2], container_pidns.to_string_lossy(), "{text}");
        assert!(lines[3].starts_with("uid=1234 gid=1234"), "{text}");

        // A missing binary in exec: the same precise error.
        let mut missing = process.clone();
        missing.set_args(Some(vec!["/bin/nope".into()]));
        let (_out, stdio) = pipe_stdio();
        let err = exec(&target, &missing, stdio, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"exec "/bin/nope": no such file or directory in container rootfs"#
        );

        kill(pid, Signal::SIGKILL).unwrap();
        assert!(matches!(
            container.wait(),
            WaitStatus::Signaled(_, Signal::SIGKILL, _)
        ));
    });
}

#[test]
fn kill_delivers_sigterm_and_sigkill() {
    isolated("kill_delivers_sigterm_and_sigkill", || {
        let rootfs = Rootfs::new();
        // pid 1 of a pid namespace only gets signals it handles.
        let spec = to_spec(spec(
            &rootfs.path(),
            &[
                "sh",
                "-c",
                "trap 'exit 42' TERM; echo ready; sleep 100 & wait",
            ],
        ));
        let (mut out, stdio) = pipe_stdio();
        let pid = create(CreateOptions {
            spec: &spec,
            stdio,
            cgroup_procs: &[],
            cgroup_mounts: None,
        })
        .unwrap()
        .start()
        .unwrap();
        let running = Running(Some(pid));
        let mut buf = [0u8; 6];
        out.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ready\n");
        kill(pid, Signal::SIGTERM).unwrap();
        assert_eq!(running.wait(), WaitStatus::Exited(pid, 42));

        let spec = to_spec(self::spec(&rootfs.path(), &["sleep", "100"]));
        let (_out, stdio) = pipe_stdio();
        let pid = create(CreateOptions {
            spec: &spec,
            stdio,
            cgroup_procs: &[],
            cgroup_mounts: None,
        })
        .unwrap()
        .start()
        .unwrap();
        let running = Running(Some(pid));
        kill(pid, Signal::SIGKILL).unwrap();
        assert_eq!(
            running.wait(),
            WaitStatus::Signaled(pid, Signal::SIGKILL, false)
        );
        let err = kill(pid, Signal::SIGKILL).unwrap_err();
        assert!(err.to_string().contains("ESRCH"), "{err}");
    });
}

#[test]
fn terminal_is_a_pty_inside_the_container() {
    isolated("terminal_is_a_pty_inside_the_container", || {
        let rootfs = Rootfs::new();
        let mut v = spec(&rootfs.path(), &["sh", "-c", "tty; echo hi"]);
        v["process"]["terminal"] = json!(true);
        v["process"]["consoleSize"] = json!({ "height": 30, "width": 100 });
        let spec = to_spec(v);
        let mut created = create(CreateOptions {
            spec: &spec,
            stdio: Stdio::Terminal,
            cgroup_procs: &[],
            cgroup_mounts: None,
        })
        .unwrap();
        let master = created.take_pty_master().expect("a pty master");
        let pid = created.start().unwrap();
        let running = Running(Some(pid));
        let mut master = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        // Read until the slave side is gone (EIO).
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let out = String::from_utf8_lossy(&out);
        assert!(matches!(running.wait(), WaitStatus::Exited(_, 0)), "{out}");
        assert!(out.contains("/dev/pts/0"), "{out}");
        assert!(out.contains("hi"), "{out}");
    });
}

#[test]
fn sysctls_oom_score_adj_and_readonly_rootfs() {
    isolated("sysctls_oom_score_adj_and_readonly_rootfs", || {
        let rootfs = Rootfs::new();
        let mut v = spec(
            &rootfs.path(),
            &[
                "sh",
                "-c",
                "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/shmmni /proc/self/oom_score_adj; \
                 touch /x || echo touch-failed",
            ],
        );
        v["linux"]["sysctl"] = json!({ "net.ipv4.ip_forward": "1", "kernel.shmmni": "1234" });
        v["process"]["oomScoreAdj"] = json!(500);
        v["root"]["readonly"] = json!(true);
        let (status, out) = run(&to_spec(v.clone()));
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{out}");
        assert!(out.starts_with("1\n1234\n500\n"), "{out}");
        assert!(out.contains("Read-only file system"), "{out}");

        // Lowering below ours is clamped (no CAP_SYS_RESOURCE needed).
        let ours: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut v = spec(&rootfs.path(), &["cat", "/proc/self/oom_score_adj"]);
        v["process"]["oomScoreAdj"] = json!(-999);
        let (status, out) = run(&to_spec(v));
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{out}");
        let got: i32 = out.trim().parse().unwrap();
        let can_lower = caps::has_cap(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_SYS_RESOURCE,
        )
        .unwrap();
        assert_eq!(got, if can_lower { -999 } else { ours });

        // A host-wide sysctl is refused before anything runs.
        let mut v = spec(&rootfs.path(), &["true"]);
        v["linux"]["sysctl"] = json!({ "kernel.panic": "1" });
        let spec = to_spec(v);
        let (_out, stdio) = pipe_stdio();
        let err = create(CreateOptions {
            spec: &spec,
            stdio,
            cgroup_procs: &[],
            cgroup_mounts: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("not namespaced"), "{err}");
    });
}

#[test]
fn user_namespace_maps_root_to_an_unprivileged_host_uid() {
    isolated(
        "user_namespace_maps_root_to_an_unprivileged_host_uid",
        || {
            let rootfs = Rootfs::new();
            let mut v = spec(
                &rootfs.path(),
                &[
                    "sh",
                    "-c",
                    "id; cat /proc/self/uid_map /proc/self/gid_map; ls /dev",
                ],
            );
            v["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .push(json!({ "type": "user" }));
            v["linux"]["uidMappings"] =
                json!([{ "containerID": 0, "hostID": 100000, "size": 65536 }]);
            v["linux"]["gidMappings"] =
                json!([{ "containerID": 0, "hostID": 100000, "size": 65536 }]);
            let spec = to_spec(v);
            let (out, stdio) = pipe_stdio();
            let created = create(CreateOptions {
                spec: &spec,
                stdio,
                cgroup_procs: &[],
                cgroup_mounts: None,
            })
            .unwrap();
            let host_uid =
                std::fs::read_to_string(format!("/proc/{}/status", created.pid())).unwrap();
            assert_eq!(
                status_field(&host_uid, "Uid:").split_whitespace().next(),
                Some("100000")
            );
            let pid = created.start().unwrap();
            let status = Running(Some(pid)).wait();
            let out = read_all(out);
            assert!(matches!(status, WaitStatus::Exited(_, 0)), "{out}");
            assert!(out.contains("uid=0 gid=0"), "{out}");
            assert!(
                out.lines()
                    .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["0", "100000", "65536"]),
                "{out}"
            );
            assert!(out.contains("null") && out.contains("ptmx"), "{out}");
        },
    );
}

/// Removes the test's (empty) cgroup directories, also when it fails.
struct RemoveCgroups(Vec<PathBuf>);

impl Drop for RemoveCgroups {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[test]
fn cgroup_procs_put_the_container_in_its_cgroup() {
    isolated("cgroup_procs_put_the_container_in_its_cgroup", || {
        let hierarchy = Path::new("/sys/fs/cgroup/pids");
        if !hierarchy.join("cgroup.procs").exists() {
            eprintln!("skipped: no cgroup v1 pids hierarchy at {hierarchy:?}");
            return;
        }
        let cg = hierarchy.join(format!("berth-exec-test-{}", std::process::id()));
        std::fs::create_dir(&cg).unwrap();
        let _cleanup = RemoveCgroups(vec![cg.clone()]);
        let rootfs = Rootfs::new();
        let spec = to_spec(spec(
            &rootfs.path(),
            &[
                "sh",
                "-c",
                "cat /proc/self/cgroup; cat /sys/fs/cgroup/pids/cgroup.procs",
            ],
        ));
        let (out, stdio) = pipe_stdio();
        let procs = [cg.join("cgroup.procs")];
        let created = create(CreateOptions {
            spec: &spec,
            stdio,
            cgroup_procs: &procs,
            cgroup_mounts: None,
        })
        .unwrap();
        let pid = created.pid();
        let members = std::fs::read_to_string(&procs[0]).unwrap();
        assert_eq!(members.trim(), pid.to_string());
        let pid = created.start().unwrap();
        let status = Running(Some(pid)).wait();
        let out = read_all(out);
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{out}");
        // In its cgroup namespace the container's cgroup is "/", and the
        // mounted pids hierarchy is the container's own directory.
        assert!(out.lines().any(|l| l.ends_with(":pids:/")), "{out}");
        assert!(out.lines().any(|l| l.trim() == "1"), "{out}");
    });
}

/// Where this host mounts cgroup v2: `/sys/fs/cgroup` on a v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
fn cgroup2_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| crate::executor::is_cgroup2(p))
}

#[test]
fn the_v2_cgroup_is_joined_at_birth_and_v1_ones_by_the_process_itself() {
    isolated(
        "the_v2_cgroup_is_joined_at_birth_and_v1_ones_by_the_process_itself",
        || {
            let Some(v2) = cgroup2_mount() else {
                eprintln!("skipped: no cgroup v2 hierarchy");
                return;
            };
            let name = format!("berth-clone3-test-{}", std::process::id());
            let mut dirs = vec![v2.join(&name)];
            let v1_pids = Path::new("/sys/fs/cgroup/pids");
            if v1_pids.join("cgroup.procs").exists() {
                dirs.push(v1_pids.join(&name));
            }
            for d in &dirs {
                std::fs::create_dir(d).unwrap();
            }
            let _cleanup = RemoveCgroups(dirs.clone());
            let rootfs = Rootfs::new();
            let spec = to_spec(spec(&rootfs.path(), &["true"]));
            let (_out, stdio) = pipe_stdio();
            let procs: Vec<PathBuf> = dirs.iter().map(|d| d.join("cgroup.procs")).collect();
            let created = create(CreateOptions {
                spec: &spec,
                stdio,
                cgroup_procs: &procs,
                cgroup_mounts: None,
            })
            .unwrap();
            let pid = created.pid();
            for p in &procs {
                let members = std::fs::read_to_string(p).unwrap();
                assert_eq!(members.trim(), pid.to_string(), "{p:?}");
            }
            let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            assert!(own.lines().any(|l| l == format!("0::/{name}")), "{own}");
            let pid = created.start().unwrap();
            assert!(matches!(
                Running(Some(pid)).wait(),
                WaitStatus::Exited(_, 0)
            ));
        },
    );
}

#[test]
fn seccomp_default_errno_profile_with_per_rule_actions() {
    isolated(
        "seccomp_default_errno_profile_with_per_rule_actions",
        || {
            use std::str::FromStr;
            let rootfs = Rootfs::new();
            // Allow every syscall this architecture has except sethostname
            // (falls to the default: ENOSYS) and mkdir/mkdirat (own rule: EXDEV);
            // personality only with arguments 0 or 8 (alternatives on one arg).
            let denied = ["sethostname", "mkdir", "mkdirat", "personality"];
            let allowed: Vec<String> = syscalls::Sysno::iter()
                .map(|s| s.name().to_owned())
                .filter(|n| !denied.contains(&n.as_str()))
                .collect();
            assert!(syscalls::Sysno::from_str("mkdirat").is_ok());
            let mut v = spec(
                &rootfs.path(),
                &["sh", "-c", "hostname other; mkdir /tmp/x; echo reached"],
            );
            v["linux"]["seccomp"] = json!({
                "defaultAction": "SCMP_ACT_ERRNO",
                "defaultErrnoRet": 38,
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
                "syscalls": [
                    { "names": allowed, "action": "SCMP_ACT_ALLOW" },
                    { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 18 },
                    { "names": ["personality"], "action": "SCMP_ACT_ALLOW",
                      "args": [{ "index": 0, "value": 0, "op": "SCMP_CMP_EQ" },
                               { "index": 0, "value": 8, "op": "SCMP_CMP_EQ" }] }
                ]
            });
            v["process"]["capabilities"]["bounding"] = json!(["CAP_SYS_ADMIN"]);
            v["process"]["capabilities"]["effective"] = json!(["CAP_SYS_ADMIN"]);
            v["process"]["capabilities"]["permitted"] = json!(["CAP_SYS_ADMIN"]);
            let (status, out) = run(&to_spec(v));
            assert!(matches!(status, WaitStatus::Exited(_, 0)), "{out}");
            assert!(out.contains("Function not implemented"), "{out}");
            assert!(out.contains("Invalid cross-device link"), "{out}");
            assert!(out.contains("reached"), "{out}");
        },
    );
}

/// Not a test: `cargo test -- --ignored --nocapture bench_` prints the
/// create+start+wait time of busybox `true`.
#[test]
#[ignore]
fn bench_create_start_wait_true() {
    isolated("bench_create_start_wait_true", || {
        let rootfs = Rootfs::new();
        let spec = to_spec(spec(&rootfs.path(), &["true"]));
        let mut create_start = Vec::new();
        let mut full = Vec::new();
        for _ in 0..50 {
            let t0 = std::time::Instant::now();
            let (_out, stdio) = pipe_stdio();
            let pid = create(CreateOptions {
                spec: &spec,
                stdio,
                cgroup_procs: &[],
                cgroup_mounts: None,
            })
            .unwrap()
            .start()
            .unwrap();
            create_start.push(t0.elapsed());
            Running(Some(pid)).wait();
            full.push(t0.elapsed());
        }
        create_start.sort();
        full.sort();
        println!(
            "create+start median {:?}, create+start+wait median {:?}",
            create_start[25], full[25]
        );
    });
}
