//! The monitor with the real executor, as root: `berth monitor` started
//! through `spawn_with` from the built binary, busybox containers in their
//! own pid, mount, ipc, uts and network namespaces, optionally in a cgroup
//! with limits. Covers logs, exit records, signals, attach, tty, log
//! reopen, survival of the launcher, the exit watcher, OOM kills and the
//! pids limit.
//!
//! Each test owns its container through a [`TestContainer`], which on drop
//! (also on panic) SIGKILLs the container and then its monitor if either is
//! still there, removes its cgroup, checks that nothing is left mounted
//! under its temp dir and removes that. Tests share nothing (own temp dirs,
//! container ids and cgroups), so the harness may run them in parallel: the
//! forks happen in the monitor, never in this multi-threaded process.

mod common;
#[path = "support/rootfs.rs"]
mod rootfs;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::executor::cgroups::{CgroupDriver, CgroupGuard, CgroupManager, CgroupPath};
use berth::logs::{Stream, Tag, parse_record};
use berth::monitor::{
    AttachOptions, ExitRecord, ExitWatcher, MonitorClient, MonitorConfig, State, Zygote,
    list_exit_records, read_exit_record, spawn_with, spawn_with_zygote,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{
    LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};
use rootfs::{Bundle, missing_requirement, spec};
use serde_json::{Value, json};

const MONITOR: &str = env!("CARGO_BIN_EXE_berth");
/// The bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// Returns from the test, saying why, when the machine cannot run it.
macro_rules! require_root_and_busybox {
    ($test:literal) => {
        if let Some(reason) = missing_requirement() {
            eprintln!("skipped {}: {reason}", $test);
            return;
        }
    };
}

/// A process named by pid and start time, so that a pid reused after it
/// exited is never mistaken for it (or killed).
#[derive(Clone, Copy, Debug)]
struct Proc {
    pid: i32,
    start_time: u64,
}

/// Fields of `/proc/<pid>/stat` after the command name: state is [0],
/// ppid [1], start time [19].
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

impl Proc {
    fn of(pid: i32) -> Option<Proc> {
        let fields = stat_fields(pid)?;
        Some(Proc {
            pid,
            start_time: fields.get(19)?.parse().ok()?,
        })
    }

    fn parent(&self) -> Option<Proc> {
        let ppid = stat_fields(self.pid)?.get(1)?.parse().ok()?;
        Proc::of(ppid)
    }

    /// Running (a zombie, whose reaper has not come yet, counts as gone).
    fn alive(&self) -> bool {
        match stat_fields(self.pid) {
            Some(f) => {
                f[0] != "Z" && f.get(19).and_then(|t| t.parse().ok()) == Some(self.start_time)
            }
            None => false,
        }
    }

    fn kill(&self) {
        if self.alive() {
            let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }

    /// Waits, bounded, until the process is gone; false if it is not.
    fn wait_gone(&self, bound: Duration) -> bool {
        let start = Instant::now();
        while self.alive() {
            if start.elapsed() > bound {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// One container and its monitor, with everything they own.
struct TestContainer {
    config: MonitorConfig,
    container: Option<Proc>,
    monitor: Option<Proc>,
    /// Killed and removed after the processes are gone.
    cgroup: Option<CgroupGuard>,
    /// Dropped last: checks for leaked mounts, removes the temp dir.
    bundle: Bundle,
}

impl TestContainer {
    fn new(id: &str, args: &[&str]) -> Self {
        Self::with_spec(id, spec(args))
    }

    fn with_spec(id: &str, spec: Value) -> Self {
        let bundle = Bundle::new(&format!("berth-monitor-test-{id}-"));
        let spec_path = bundle.write_spec(&spec);
        let base = bundle.base().to_path_buf();
        std::fs::create_dir(base.join("exits")).expect("create exits dir");
        let config = MonitorConfig {
            container_id: id.to_string(),
            bundle: bundle.bundle(),
            spec_path,
            log_path: Some(base.join("container.log")),
            stdin: false,
            stdin_once: false,
            tty: spec["process"]["terminal"] == json!(true),
            cgroup_procs: vec![],
            control_socket: base.join("control.sock"),
            exit_record: base.join("exits").join(id),
            pid_file: base.join("pid"),
            oom_kill_file: None,
            oom_kill_initial: 0,
            monitor_log: Some(base.join("monitor.log")),
            cgroup_mounts: None,
        };
        Self {
            config,
            container: None,
            monitor: None,
            cgroup: None,
            bundle,
        }
    }

    /// Puts the container in a new cgroup with `resources` (and has the
    /// monitor watch its OOM kill counter); None, with the reason printed,
    /// when this host lacks the memory controller or `controller`.
    fn in_cgroup(mut self, controller: &str, resources: &LinuxResources) -> Option<Self> {
        let manager = match CgroupManager::detect(CgroupDriver::Cgroupfs) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("no cgroups on this host: {e}");
                return None;
            }
        };
        for needed in ["memory", controller] {
            if manager.layout().controller_mount(needed).is_none() {
                eprintln!("no {needed} cgroup controller on this host");
                return None;
            }
        }
        let path = CgroupPath::parse(&format!(
            "berth-monitor-test-{}-{}",
            std::process::id(),
            self.config.container_id
        ))
        .expect("cgroup path");
        let cgroup = manager
            .create(&path, Some(resources))
            .expect("create the container's cgroup")
            .guard();
        let layout = manager.layout();
        let oom_kill_file = match layout.v1.get("memory") {
            Some(mount) => path.under(mount).join("memory.oom_control"),
            None => path
                .under(layout.v2_mount.as_deref().expect("a v2 hierarchy"))
                .join("memory.events"),
        };
        self.config.cgroup_procs = cgroup.procs_files();
        self.config.oom_kill_file = Some(oom_kill_file);
        self.config.oom_kill_initial = cgroup.oom_kill_count().expect("oom_kill counter");
        self.cgroup = Some(cgroup);
        Some(self)
    }

    fn exits(&self) -> PathBuf {
        self.config
            .exit_record
            .parent()
            .expect("exit records dir")
            .to_path_buf()
    }

    fn client(&self) -> MonitorClient {
        MonitorClient::new(&self.config.control_socket)
    }

    /// Starts the monitor (which creates the container, parked); returns
    /// the container's pid.
    async fn spawn(&mut self) -> u32 {
        // BERTH_MONITOR_EXE: run another build of the monitor (release, to
        // measure it).
        let exe = std::env::var("BERTH_MONITOR_EXE").unwrap_or_else(|_| MONITOR.to_string());
        let pid = spawn_with(Path::new(&exe), &self.config, WAIT)
            .await
            .expect("spawn the monitor");
        self.adopt(pid);
        let pid_file = std::fs::read_to_string(&self.config.pid_file).expect("pid file");
        assert_eq!(pid_file.trim(), pid.to_string());
        pid
    }

    /// Records the container (and its parent, the monitor) for cleanup.
    fn adopt(&mut self, pid: u32) {
        let container = Proc::of(pid as i32).expect("container process exists");
        self.container = Some(container);
        self.monitor = container.parent();
        let monitor = self.monitor.expect("container has a parent");
        assert_ne!(
            monitor.pid,
            std::process::id() as i32,
            "the container is the monitor's child, not ours"
        );
    }

    fn monitor_pid(&self) -> i32 {
        self.monitor.expect("spawned").pid
    }

    async fn wait_exit(&self, watcher: &mut ExitWatcher) -> ExitRecord {
        let id = tokio::time::timeout(WAIT, watcher.next())
            .await
            .expect("exit record within the bound")
            .expect("exit watcher");
        assert_eq!(id, self.config.container_id);
        read_exit_record(&self.config.exit_record).expect("exit record")
    }

    /// The container's CRI log (every test container has one).
    fn log_path(&self) -> &Path {
        self.config.log_path.as_deref().expect("a log path")
    }

    fn log_records(&self) -> Vec<(Stream, Tag, String)> {
        read_log(self.log_path())
    }

    /// Waits until a log line says `text` (the container is ready).
    async fn wait_for_log(&self, text: &str) {
        let start = Instant::now();
        while !std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .contains(text)
        {
            assert!(
                start.elapsed() < WAIT,
                "no {text:?} in the log:\n{:?}",
                self.log_records()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        // The container first: its monitor then records the exit and
        // leaves; a monitor that does not is a bug, and is killed too. A
        // test that failed before it learned the pid (one launched by a
        // helper process) still finds it in the monitor's pid file.
        let container = self.container.or_else(|| {
            let text = std::fs::read_to_string(&self.config.pid_file).ok()?;
            Proc::of(text.trim().parse().ok()?)
        });
        if let Some(container) = container {
            container.kill();
            if !container.wait_gone(Duration::from_secs(5)) {
                problems.push(format!("container {} survived SIGKILL", container.pid));
            }
        }
        if let Some(monitor) = self.monitor
            && !monitor.wait_gone(Duration::from_secs(5))
        {
            problems.push(format!(
                "monitor {} did not leave after its container",
                monitor.pid
            ));
            monitor.kill();
            monitor.wait_gone(Duration::from_secs(5));
        }
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.bundle.base().join("monitor.log"))
        {
            eprintln!("monitor log of {}:\n{log}", self.config.container_id);
        }
        // The guard kills whatever is left in the cgroup and removes it.
        if let Some(cgroup) = self.cgroup.take() {
            let dirs = cgroup.dirs();
            drop(cgroup);
            problems.extend(
                dirs.iter()
                    .filter(|d| d.exists())
                    .map(|d| format!("cgroup {} left behind", d.display())),
            );
        }
        // The bundle (a field, dropped after this) checks for mounts under
        // the temp dir, then removes it.
        if !problems.is_empty() && !std::thread::panicking() {
            panic!("cleanup of {}: {problems:#?}", self.config.container_id);
        }
    }
}

fn read_log(path: &Path) -> Vec<(Stream, Tag, String)> {
    let data = std::fs::read(path).unwrap_or_default();
    data.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let r = parse_record(l)
                .unwrap_or_else(|| panic!("not a CRI log line: {:?}", String::from_utf8_lossy(l)));
            (
                r.stream,
                r.tag,
                String::from_utf8_lossy(r.message).into_owned(),
            )
        })
        .collect()
}

fn messages(records: &[(Stream, Tag, String)], stream: Stream) -> Vec<&str> {
    records
        .iter()
        .filter(|(s, _, _)| *s == stream)
        .map(|(_, _, m)| m.as_str())
        .collect()
}

#[tokio::test]
async fn output_on_stdout_and_stderr_and_exit_code_land_in_log_and_exit_record() {
    require_root_and_busybox!(
        "output_on_stdout_and_stderr_and_exit_code_land_in_log_and_exit_record"
    );
    let mut c = TestContainer::new(
        "c-exit3",
        &["sh", "-c", "echo out; echo err >&2; printf tail; exit 3"],
    );
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    let pid = c.spawn().await;
    let status = c.client().status().await.expect("status");
    assert_eq!(status.state(), State::Created);
    assert_eq!(status.pid, pid);
    let started = c.client().start().await.expect("start");
    assert_eq!(started.state(), State::Running);
    let record = c.wait_exit(&mut watcher).await;
    assert_eq!(record.container_id, "c-exit3");
    assert_eq!(record.pid, pid);
    assert_eq!(record.exit_code, 3);
    assert_eq!(record.signal, None);
    assert!(!record.oom_killed);
    assert_eq!(record.reason, "Error");
    assert!(record.started_at > 0 && record.finished_at >= record.started_at);
    assert_eq!(record.log_dropped_records, 0);
    // Each stream's records in order; the streams' interleaving is the
    // scheduler's.
    let mut records = c.log_records();
    records.sort_by_key(|(s, _, _)| *s == Stream::Stderr);
    assert_eq!(
        records,
        vec![
            (Stream::Stdout, Tag::Full, "out".to_string()),
            (Stream::Stdout, Tag::Partial, "tail".to_string()),
            (Stream::Stderr, Tag::Full, "err".to_string()),
        ]
    );
    // The monitor is gone with its socket.
    assert!(c.client().status().await.is_err());
    assert!(
        c.monitor.expect("spawned").wait_gone(WAIT),
        "monitor stayed"
    );
}

#[tokio::test]
async fn container_process_gets_default_signals_and_only_its_stdio_fds() {
    require_root_and_busybox!("container_process_gets_default_signals_and_only_its_stdio_fds");
    // The programs run as the container's process itself (no shell in
    // between), so they see exactly what the executor left: Rust's ignored
    // SIGPIPE and the monitor's blocked SIGCHLD must not reach them, nor
    // any fd of the monitor.
    let mut c = TestContainer::new("c-sigs", &["cat", "/proc/self/status"]);
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    assert_eq!(c.wait_exit(&mut watcher).await.exit_code, 0);
    let records = c.log_records();
    let status = messages(&records, Stream::Stdout);
    for field in ["SigBlk:", "SigIgn:"] {
        let line = status
            .iter()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in {status:#?}"));
        assert_eq!(
            line.trim_start_matches(field).trim(),
            "0000000000000000",
            "{line}"
        );
    }

    let mut c = TestContainer::new("c-fds", &["ls", "/proc/self/fd"]);
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    assert_eq!(c.wait_exit(&mut watcher).await.exit_code, 0);
    let records = c.log_records();
    // 0-2, and 3: the directory ls is reading.
    let fds: Vec<&str> = messages(&records, Stream::Stdout)
        .iter()
        .flat_map(|l| l.split_whitespace())
        .collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "{records:?}");
}

#[tokio::test]
async fn sigterm_through_the_control_socket_runs_the_containers_handler() {
    require_root_and_busybox!("sigterm_through_the_control_socket_runs_the_containers_handler");
    // pid 1 of a pid namespace gets only the signals it handles.
    let mut c = TestContainer::new(
        "c-sigterm",
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 143' TERM; echo ready; sleep 1000 & wait",
        ],
    );
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    c.wait_for_log("ready").await;
    c.client().signal(Signal::SIGTERM).await.expect("SIGTERM");
    let record = c.wait_exit(&mut watcher).await;
    assert_eq!(record.exit_code, 143);
    assert_eq!(record.signal, None);
    assert_eq!(record.reason, "Error");
    assert_eq!(
        messages(&c.log_records(), Stream::Stdout),
        ["ready", "got TERM"]
    );
}

#[tokio::test]
async fn sigkill_through_the_control_socket_kills_the_container() {
    require_root_and_busybox!("sigkill_through_the_control_socket_kills_the_container");
    let mut c = TestContainer::new("c-sigkill", &["sleep", "1000"]);
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    c.client().signal(Signal::SIGKILL).await.expect("SIGKILL");
    let record = c.wait_exit(&mut watcher).await;
    assert_eq!(record.signal, Some(9));
    assert_eq!(record.exit_code, 128 + 9);
    assert_eq!(record.reason, "Error");
    assert!(
        c.monitor.expect("spawned").wait_gone(WAIT),
        "monitor stayed"
    );
    assert!(c.client().status().await.is_err());
}

#[tokio::test]
async fn create_error_reaches_the_caller_with_the_executors_message() {
    require_root_and_busybox!("create_error_reaches_the_caller_with_the_executors_message");
    let c = TestContainer::new("c-noargs", &[]);
    let err = spawn_with(Path::new(MONITOR), &c.config, WAIT)
        .await
        .expect_err("a spec without args cannot be created");
    assert_eq!(
        err.to_string(),
        "monitor for container c-noargs: create container: process: args must not be empty"
    );
    // The monitor left nothing behind.
    assert!(!c.config.control_socket.exists());
    assert!(!c.config.pid_file.exists());
    assert!(!c.config.exit_record.exists());
}

#[tokio::test]
async fn missing_binary_fails_start_with_the_executors_message_and_a_start_error_record() {
    require_root_and_busybox!(
        "missing_binary_fails_start_with_the_executors_message_and_a_start_error_record"
    );
    for (id, arg0, want) in [
        (
            "c-nobin",
            "/bin/nope",
            r#"exec "/bin/nope": no such file or directory in container rootfs"#,
        ),
        (
            "c-nopath",
            "nope",
            r#"exec "nope": executable file not found in $PATH"#,
        ),
    ] {
        let mut c = TestContainer::new(id, &[arg0]);
        let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
        c.spawn().await;
        let err = c.client().start().await.expect_err("start must fail");
        assert!(err.to_string().ends_with(want), "{err}");
        let record = c.wait_exit(&mut watcher).await;
        assert_eq!(record.reason, "StartError");
        assert_eq!(record.message, want);
        // As containerd reports a failed start.
        assert_eq!(record.exit_code, 128);
        assert_eq!(record.started_at, 0);
        assert!(
            c.monitor.expect("spawned").wait_gone(WAIT),
            "monitor stayed"
        );
    }
}

#[tokio::test]
async fn two_attachers_get_cats_output_and_stdin_reaches_cat() {
    require_root_and_busybox!("two_attachers_get_cats_output_and_stdin_reaches_cat");
    let mut c = TestContainer::new("c-cat", &["cat"]);
    c.config.stdin = true;
    c.config.stdin_once = true;
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    let all = AttachOptions {
        stdin: true,
        stdout: true,
        stderr: true,
    };
    let (mut out1, mut in1) = c.client().attach(all).await.expect("attach").into_split();
    let output_only = AttachOptions {
        stdin: false,
        stdout: true,
        stderr: true,
    };
    let (mut out2, _in2) = c
        .client()
        .attach(output_only)
        .await
        .expect("attach")
        .into_split();
    assert_eq!(c.client().status().await.expect("status").attachers, 2);
    in1.write_stdin(b"hello\n").await.expect("stdin");
    for out in [&mut out1, &mut out2] {
        let (stream, data) = tokio::time::timeout(WAIT, out.next())
            .await
            .expect("output within the bound")
            .expect("attach stream")
            .expect("output, not the end");
        assert_eq!(stream, Stream::Stdout);
        assert_eq!(data, b"hello\n");
    }
    // stdin_once: the first attacher's end of input closes cat's stdin.
    in1.close_stdin().await.expect("close stdin");
    let record = c.wait_exit(&mut watcher).await;
    assert_eq!(record.exit_code, 0);
    assert_eq!(record.reason, "Completed");
    // Both attachers see the end of the stream.
    for out in [&mut out1, &mut out2] {
        let end = tokio::time::timeout(WAIT, out.next())
            .await
            .expect("end within the bound")
            .expect("attach stream");
        assert!(end.is_none(), "{end:?}");
    }
    assert_eq!(
        c.log_records(),
        vec![(Stream::Stdout, Tag::Full, "hello".to_string())]
    );
}

#[tokio::test]
async fn stdin_once_closes_stdin_when_the_first_attacher_leaves() {
    require_root_and_busybox!("stdin_once_closes_stdin_when_the_first_attacher_leaves");
    let mut c = TestContainer::new("c-once", &["cat"]);
    c.config.stdin = true;
    c.config.stdin_once = true;
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    let stdin_only = AttachOptions {
        stdin: true,
        stdout: false,
        stderr: false,
    };
    let (_, mut input) = c
        .client()
        .attach(stdin_only)
        .await
        .expect("attach")
        .into_split();
    input.write_stdin(b"bye").await.expect("stdin");
    drop(input); // the attacher goes away without closing stdin
    let record = c.wait_exit(&mut watcher).await;
    assert_eq!(record.exit_code, 0);
    assert_eq!(
        c.log_records(),
        vec![(Stream::Stdout, Tag::Partial, "bye".to_string())]
    );
}

#[tokio::test]
async fn attach_with_stdin_and_resize_are_refused_without_stdin_and_tty() {
    require_root_and_busybox!("attach_with_stdin_and_resize_are_refused_without_stdin_and_tty");
    let mut c = TestContainer::new("c-nostdin", &["sleep", "1000"]);
    c.spawn().await;
    let err = c
        .client()
        .attach(AttachOptions {
            stdin: true,
            stdout: true,
            stderr: false,
        })
        .await
        .err()
        .expect("attach with stdin must be refused");
    assert!(err.to_string().contains("has no stdin"), "{err}");
    let err = c.client().resize(80, 24).await.expect_err("no tty");
    assert!(err.to_string().contains("no terminal"), "{err}");
}

#[tokio::test]
async fn tty_resize_is_seen_by_stty_in_the_container() {
    require_root_and_busybox!("tty_resize_is_seen_by_stty_in_the_container");
    let mut spec = spec(&["sh", "-c", "read x; stty size; read y; stty size"]);
    spec["process"]["terminal"] = json!(true);
    let mut c = TestContainer::with_spec("c-tty", spec);
    assert!(c.config.tty);
    c.config.stdin = true;
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    let options = AttachOptions {
        stdin: true,
        stdout: true,
        stderr: false,
    };
    let (mut out, mut input) = c
        .client()
        .attach(options)
        .await
        .expect("attach")
        .into_split();
    let mut seen = Vec::new();
    let mut read_until = async |text: &str| {
        while !String::from_utf8_lossy(&seen).contains(text) {
            match tokio::time::timeout(WAIT, out.next())
                .await
                .expect("output within the bound")
                .expect("attach stream")
            {
                Some((stream, data)) => {
                    assert_eq!(stream, Stream::Stdout, "a tty has one stream");
                    seen.extend_from_slice(&data);
                }
                None => panic!(
                    "stream ended before {text:?}: {:?}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
    };
    // Through a control call, then through the attach stream.
    c.client().resize(123, 45).await.expect("resize");
    input.write_stdin(b"go\n").await.expect("stdin");
    read_until("45 123").await;
    input.resize(80, 24).await.expect("resize");
    input.write_stdin(b"\n").await.expect("stdin");
    read_until("24 80").await;
    let record = c.wait_exit(&mut watcher).await;
    assert_eq!(record.exit_code, 0);
    let log = c.log_records();
    assert!(log.iter().all(|(s, _, _)| *s == Stream::Stdout), "{log:?}");
    // The pty's \r\n is logged as a full line without the \r.
    for size in ["45 123", "24 80"] {
        assert!(
            log.contains(&(Stream::Stdout, Tag::Full, size.to_string())),
            "{log:?}"
        );
    }
}

#[tokio::test]
async fn log_reopen_during_30000_lines_loses_nothing() {
    require_root_and_busybox!("log_reopen_during_30000_lines_loses_nothing");
    const LINES: usize = 30_000;
    // The container waits for a line on stdin half-way and at the end, so
    // that however fast it writes (or slow the machine is), rotations
    // happen within and between both halves of its output.
    let script = format!(
        "i=0; while [ $i -lt {LINES} ]; do echo line $i; i=$((i+1)); \
         [ $i -eq {} ] && read go; done; read go",
        LINES / 2
    );
    let mut c = TestContainer::new("c-reopen", &["sh", "-c", &script]);
    c.config.stdin = true;
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    let stdin_only = AttachOptions {
        stdin: true,
        stdout: false,
        stderr: false,
    };
    let (_, mut input) = c
        .client()
        .attach(stdin_only)
        .await
        .expect("attach")
        .into_split();
    let mut files = Vec::new();
    let mut rotations = 0;
    loop {
        tokio::select! {
            id = watcher.next() => {
                assert_eq!(id.expect("exit watcher"), "c-reopen");
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(2)) => {
                // kubelet's rotation: rename, then ask for a reopen.
                let rotated = c.bundle.base().join(format!("container.log.{rotations}"));
                std::fs::rename(c.log_path(), &rotated).expect("rotate");
                files.push(rotated);
                if c.client().reopen_log().await.is_err() {
                    break; // exited meanwhile
                }
                rotations += 1;
                if rotations % 3 == 0 && rotations <= 6 {
                    input.write_stdin(b"\n").await.expect("release the container");
                }
            }
        }
    }
    files.push(c.log_path().to_path_buf());
    let lines: Vec<String> = files
        .iter()
        .filter(|f| f.exists())
        .flat_map(|f| read_log(f))
        .map(|(stream, tag, msg)| {
            assert_eq!((stream, tag), (Stream::Stdout, Tag::Full), "{msg}");
            msg
        })
        .collect();
    assert!(rotations >= 6, "{rotations} rotations");
    assert_eq!(
        lines.len(),
        LINES,
        "lines lost across {rotations} rotations"
    );
    let expected: Vec<String> = (0..LINES).map(|i| format!("line {i}")).collect();
    assert!(
        lines == expected,
        "lines reordered across {rotations} rotations"
    );
    let record = read_exit_record(&c.config.exit_record).expect("exit record");
    assert_eq!(record.exit_code, 0);
    assert_eq!(record.log_dropped_records, 0);
    eprintln!("{rotations} rotations, {LINES} lines intact");
}

/// Run by `container_and_monitor_survive_their_launcher_killed_with_sigkill`
/// in a child process: spawns a monitor, starts the container, writes its
/// pid to `<bundle>/launched`, then waits to be killed.
#[tokio::test]
#[ignore = "helper process for container_and_monitor_survive_their_launcher_killed_with_sigkill"]
async fn launcher_helper() {
    let Ok(config) = std::env::var("BERTH_TEST_LAUNCH_CONFIG") else {
        return;
    };
    let config = MonitorConfig::load(Path::new(&config)).expect("load config");
    let pid = spawn_with(Path::new(MONITOR), &config, WAIT)
        .await
        .expect("spawn the monitor");
    MonitorClient::new(&config.control_socket)
        .start()
        .await
        .expect("start");
    std::fs::write(config.bundle.join("launched"), pid.to_string()).expect("write pid");
    tokio::time::sleep(Duration::from_secs(1000)).await;
}

/// Issue 5, "daemon killed with SIGKILL: the container keeps running".
#[tokio::test]
async fn container_and_monitor_survive_their_launcher_killed_with_sigkill() {
    require_root_and_busybox!("container_and_monitor_survive_their_launcher_killed_with_sigkill");
    let mut c = TestContainer::new("c-orphan", &["sleep", "1000"]);
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    let config_path = c.config.save().expect("save config");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut launcher = KillOnDrop(
        std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "launcher_helper",
                "--exact",
                "--ignored",
                "--test-threads=1",
            ])
            .env("BERTH_TEST_LAUNCH_CONFIG", &config_path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run the launcher"),
    );
    let launched = c.config.bundle.join("launched");
    let start = Instant::now();
    let pid = loop {
        // The helper writes the file in place: it may be seen empty first.
        if let Ok(text) = std::fs::read_to_string(&launched)
            && let Ok(pid) = text.trim().parse::<u32>()
        {
            break pid;
        }
        assert!(
            launcher.0.try_wait().expect("launcher status").is_none(),
            "launcher exited before starting the container"
        );
        assert!(
            start.elapsed() < WAIT,
            "launcher did not start the container"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    c.adopt(pid);
    let monitor = c.monitor.expect("monitor");
    // SIGKILL the launching "daemon".
    let launcher_pid = Pid::from_raw(launcher.0.id() as i32);
    nix::sys::signal::kill(launcher_pid, Signal::SIGKILL).expect("kill launcher");
    launcher.0.wait().expect("reap launcher");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        c.container.expect("container").alive(),
        "container died with its launcher"
    );
    assert!(monitor.alive(), "monitor died with its launcher");
    let status = c.client().status().await.expect("status");
    assert_eq!(status.pid, pid);
    assert_eq!(status.state(), State::Running);
    // Its exit is still recorded after the launcher is gone.
    c.client().signal(Signal::SIGKILL).await.expect("SIGKILL");
    let record = c.wait_exit(&mut watcher).await;
    assert_eq!(record.signal, Some(9));
    assert!(record.started_at > 0);
}

/// The daemon's way: monitors forked by one zygote. They work as executed
/// ones do, the zygote reaps those that end, and when the zygote goes (its
/// daemon's end closed) the others and their containers live on.
#[tokio::test]
async fn monitors_forked_by_the_zygote_outlive_it() {
    require_root_and_busybox!("monitors_forked_by_the_zygote_outlive_it");
    let zygote = Zygote::start(Path::new(MONITOR)).expect("start the zygote");
    let zygote_pid = zygote.pid() as i32;
    let mut short = TestContainer::new("c-zygote-short", &["sh", "-c", "echo from zygote; exit 3"]);
    let mut long = TestContainer::new("c-zygote-long", &["sleep", "1000"]);
    let mut watcher = ExitWatcher::new(&short.exits()).expect("watch exits");
    for c in [&mut short, &mut long] {
        let pid = spawn_with_zygote(&zygote, Path::new(MONITOR), &c.config, WAIT)
            .await
            .expect("spawn through the zygote");
        c.adopt(pid);
        let monitor = c.monitor.expect("monitor");
        assert_eq!(
            monitor.parent().map(|p| p.pid),
            Some(zygote_pid),
            "the zygote forked the monitor"
        );
        c.client().start().await.expect("start");
    }
    let record = short.wait_exit(&mut watcher).await;
    assert_eq!(record.exit_code, 3);
    let lines = read_log(short.log_path());
    assert_eq!(messages(&lines, Stream::Stdout), ["from zygote"]);
    // The zygote reaps the monitor that ended: not even a zombie is left.
    let short_monitor = short.monitor.expect("monitor");
    let start = Instant::now();
    while Proc::of(short_monitor.pid).is_some_and(|p| p.start_time == short_monitor.start_time) {
        assert!(start.elapsed() < WAIT, "the ended monitor was not reaped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A spare monitor waits for the next request, forked ahead of it, and
    // goes on as the monitor of that request.
    let first_spare = wait_for_spare(zygote_pid, None).await;
    let mut handed = TestContainer::new("c-zygote-spare", &["sleep", "1000"]);
    let pid = spawn_with_zygote(&zygote, Path::new(MONITOR), &handed.config, WAIT)
        .await
        .expect("spawn through the spare");
    handed.adopt(pid);
    let handed_monitor = handed.monitor_pid();
    assert_eq!(handed_monitor, first_spare, "the spare took the request");
    for monitor in [handed_monitor, long.monitor_pid()] {
        assert_eq!(comm(monitor), "berth-monitor", "pid {monitor}");
    }
    assert_eq!(comm(zygote_pid), "berth-zygote");
    let spare = wait_for_spare(zygote_pid, Some(first_spare)).await;
    drop(zygote);
    assert!(
        Proc::of(zygote_pid).is_none_or(|p| !p.alive()),
        "the zygote outlived its daemon's end"
    );
    let start = Instant::now();
    while Proc::of(spare).is_some_and(|p| p.alive()) {
        assert!(start.elapsed() < WAIT, "the spare outlived its zygote");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let monitor = long.monitor.expect("monitor");
    assert!(monitor.alive(), "monitor died with the zygote");
    assert!(long.container.expect("container").alive());
    assert_ne!(monitor.parent().map(|p| p.pid), Some(zygote_pid));
    let status = long.client().status().await.expect("status");
    assert_eq!(status.state(), State::Running);
}

/// The zygote's spare monitor, once there is one other than `not`.
async fn wait_for_spare(zygote: i32, not: Option<i32>) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(pid) = spares_of(zygote).into_iter().find(|p| Some(*p) != not) {
            return pid;
        }
        assert!(start.elapsed() < WAIT, "the zygote forked no spare monitor");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The short name of `pid` (`/proc/<pid>/comm`).
fn comm(pid: i32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    comm.trim_end().to_string()
}

/// The zygote's children waiting as spares (`berth-spare`).
fn spares_of(zygote: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            ppid == Some(zygote) && comm(*pid) == "berth-spare"
        })
        .collect()
}

#[tokio::test]
async fn exit_watcher_sees_every_container_exit() {
    require_root_and_busybox!("exit_watcher_sees_every_container_exit");
    let exits = tempfile::Builder::new()
        .prefix("berth-monitor-test-exits-")
        .tempdir()
        .expect("exits dir");
    let mut watcher = ExitWatcher::new(exits.path()).expect("watch exits");
    let mut containers = Vec::new();
    for code in [0, 1, 7] {
        let id = format!("c-watch-{code}");
        let mut c = TestContainer::new(&id, &["sh", "-c", &format!("exit {code}")]);
        c.config.exit_record = exits.path().join(&id);
        c.spawn().await;
        containers.push((id, code, c));
    }
    for (_, _, c) in &containers {
        c.client().start().await.expect("start");
    }
    let want: BTreeSet<String> = containers.iter().map(|(id, _, _)| id.clone()).collect();
    let mut seen = BTreeSet::new();
    while seen != want {
        // An id may come twice; the watcher's contract is "at least once".
        let id = tokio::time::timeout(WAIT, watcher.next())
            .await
            .unwrap_or_else(|_| panic!("only {seen:?} exited within the bound"))
            .expect("exit watcher");
        assert!(want.contains(&id), "unexpected exit record {id}");
        seen.insert(id);
    }
    for (id, code, c) in &containers {
        let record = read_exit_record(&c.config.exit_record).expect("exit record");
        assert_eq!(&record.container_id, id);
        assert_eq!(record.exit_code, *code);
    }
    // What a restarted daemon finds by listing.
    let listed: BTreeSet<String> = list_exit_records(exits.path())
        .expect("list")
        .into_iter()
        .collect();
    assert_eq!(listed, want);
}

fn memory_limit(bytes: i64) -> LinuxResources {
    LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                // No swap beyond the limit, as kubelet sets it.
                .swap(bytes)
                .build()
                .expect("memory"),
        )
        .build()
        .expect("resources")
}

#[tokio::test]
async fn memory_limited_container_is_recorded_oom_killed() {
    require_root_and_busybox!("memory_limited_container_is_recorded_oom_killed");
    // The shell holds 64 MB of command substitution; the cgroup allows 16 MiB.
    let c = TestContainer::new(
        "c-oom",
        &[
            "sh",
            "-c",
            "x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
        ],
    );
    let Some(mut c) = c.in_cgroup("memory", &memory_limit(16 << 20)) else {
        eprintln!("skipped memory_limited_container_is_recorded_oom_killed: no cgroups");
        return;
    };
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    let record = c.wait_exit(&mut watcher).await;
    assert!(record.oom_killed, "{record:?}\nlog: {:?}", c.log_records());
    assert_eq!(record.reason, "OOMKilled");
    // The shell itself, the largest process in the cgroup, was the victim.
    assert_eq!(record.signal, Some(9), "{record:?}");
    assert_eq!(record.exit_code, 137);
    assert!(
        !messages(&c.log_records(), Stream::Stdout)
            .iter()
            .any(|l| l.starts_with("survived")),
        "the allocation was not stopped"
    );
}

#[tokio::test]
async fn pids_limit_bounds_a_fork_bomb() {
    require_root_and_busybox!("pids_limit_bounds_a_fork_bomb");
    // Forks until the kernel refuses: with pids.max 10, the shell and 9
    // children fit; the fork for an 11th process fails.
    let c = TestContainer::new(
        "c-pids",
        &[
            "sh",
            "-c",
            "i=0; while :; do sleep 1000 & i=$((i+1)); echo $i; done",
        ],
    );
    let pids = LinuxResourcesBuilder::default()
        .pids(
            LinuxPidsBuilder::default()
                .limit(10i64)
                .build()
                .expect("pids"),
        )
        .build()
        .expect("resources");
    let Some(mut c) = c.in_cgroup("pids", &pids) else {
        eprintln!("skipped pids_limit_bounds_a_fork_bomb: no cgroups");
        return;
    };
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    let record = c.wait_exit(&mut watcher).await;
    let records = c.log_records();
    assert_ne!(record.exit_code, 0, "{record:?}\n{records:?}");
    let started: Vec<&str> = messages(&records, Stream::Stdout);
    let expected: Vec<String> = (1..=9).map(|i| i.to_string()).collect();
    assert_eq!(started, expected, "{records:?}");
    let errors = messages(&records, Stream::Stderr).join("\n");
    assert!(errors.contains("can't fork"), "{errors}");
    // The kernel counted the refused fork against the limit.
    let cgroup = c.cgroup.as_ref().expect("cgroup");
    let manager = CgroupManager::detect(CgroupDriver::Cgroupfs).expect("cgroups");
    let events = cgroup
        .path()
        .under(
            manager
                .layout()
                .controller_mount("pids")
                .expect("pids controller"),
        )
        .join("pids.events");
    let events = std::fs::read_to_string(&events).expect("pids.events");
    let refused: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("max "))
        .and_then(|n| n.trim().parse().ok())
        .expect("max line in pids.events");
    assert!(refused >= 1, "{events}");
}

/// Prints the monitor's memory while a chatty container logs. Run by hand
/// with `BERTH_MONITOR_EXE=target/release/berth cargo test --test monitor
/// -- --ignored --nocapture measure_`; nothing is asserted.
#[tokio::test]
#[ignore = "measurement, run by hand"]
async fn measure_monitor_memory_with_chatty_container() {
    require_root_and_busybox!("measure_monitor_memory_with_chatty_container");
    let mut c = TestContainer::new(
        "c-chatty",
        &[
            "sh",
            "-c",
            "while :; do echo 'a chatty container writes this line again and again'; done",
        ],
    );
    let mut watcher = ExitWatcher::new(&c.exits()).expect("watch exits");
    c.spawn().await;
    c.client().start().await.expect("start");
    // An attacher too, so that the attach path is part of the picture.
    let (mut out, _in) = c
        .client()
        .attach(AttachOptions {
            stdin: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect("attach")
        .into_split();
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = out.next().await {} });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let monitor = c.monitor_pid();
    let rollup =
        std::fs::read_to_string(format!("/proc/{monitor}/smaps_rollup")).expect("smaps_rollup");
    let log_size = std::fs::metadata(c.log_path()).expect("log").len();
    let exe = std::fs::read_link(format!("/proc/{monitor}/exe")).expect("exe");
    eprintln!(
        "monitor pid {monitor} ({}), log {log_size} bytes after 3 s:",
        exe.display()
    );
    for line in rollup.lines().filter(|l| {
        [
            "Rss:",
            "Pss:",
            "Pss_Anon:",
            "Pss_File:",
            "Private_Clean:",
            "Private_Dirty:",
            "Shared_Clean:",
        ]
        .iter()
        .any(|k| l.starts_with(k))
    }) {
        eprintln!("  {line}");
    }
    c.client().signal(Signal::SIGKILL).await.expect("SIGKILL");
    c.wait_exit(&mut watcher).await;
    let _ = reader.await;
}
