//! Against the real kernel: need root and cgroup v1 controllers (the v2
//! paths are covered by the fake trees), except the device filter tests,
//! which need root and any v2 hierarchy (a hybrid host's empty one will
//! do). Each test works under its own top-level cgroup, removed by a guard
//! also when the test fails.

use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources,
    LinuxResourcesBuilder,
};

use super::*;

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// The host's manager, or `None` (with the reason printed) when this host
/// cannot run these tests.
fn host(driver: CgroupDriver) -> Option<CgroupManager> {
    if !is_root() {
        eprintln!("skipped: needs root to create cgroups");
        return None;
    }
    let manager = match CgroupManager::detect(driver) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: {e}");
            return None;
        }
    };
    let needed = ["cpu", "cpuacct", "memory", "pids", "cpuset"];
    if manager.layout().mode == CgroupMode::Unified
        || needed.iter().any(|c| !manager.layout().v1.contains_key(*c))
    {
        eprintln!(
            "skipped: needs cgroup v1 with {needed:?}; this host runs {}",
            manager.layout().mode
        );
        return None;
    }
    Some(manager)
}

/// The test's top-level cgroup: everything below it is killed and removed
/// on drop.
struct TestRoot {
    manager: CgroupManager,
    path: CgroupPath,
}

impl TestRoot {
    fn new(manager: &CgroupManager, name: &str) -> TestRoot {
        let path = CgroupPath::parse(&format!("berth-test-{}-{name}", std::process::id()))
            .expect("test path");
        TestRoot {
            manager: manager.clone(),
            path,
        }
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        let cgroup = self.manager.open(&self.path);
        if let Err(e) = cgroup.kill_all(Duration::from_secs(5)) {
            eprintln!("cleanup: {e}");
        }
        if let Err(e) = cgroup.delete() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(dir: &std::path::Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
        .trim()
        .to_string()
}

#[test]
fn host_limits_processes_kill_and_delete() {
    let Some(manager) = host(CgroupDriver::Cgroupfs) else {
        return;
    };
    let root = TestRoot::new(&manager, "limits");
    let parent = format!("/{}/burstable/pod1", root.path.as_str());
    let path = manager.container_path(&parent, "c1").expect("path");
    let r = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(64i64 << 20)
                .build()
                .expect("memory"),
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(32i64)
                .build()
                .expect("pids"),
        )
        .cpu(
            LinuxCpuBuilder::default()
                .shares(512u64)
                .quota(50_000i64)
                .period(100_000u64)
                .build()
                .expect("cpu"),
        )
        .build()
        .expect("resources");
    let start = Instant::now();
    let cgroup = manager.create(&path, Some(&r)).expect("create");
    eprintln!(
        "create in {} hierarchies took {:?}",
        cgroup.dirs().len(),
        start.elapsed()
    );
    let dir = |c: &str| path.under(&manager.layout().v1[c]);
    assert_eq!(read(&dir("memory"), "memory.limit_in_bytes"), "67108864");
    assert_eq!(read(&dir("pids"), "pids.max"), "32");
    assert_eq!(read(&dir("cpu"), "cpu.cfs_quota_us"), "50000");
    assert_eq!(read(&dir("cpu"), "cpu.cfs_period_us"), "100000");
    assert_eq!(read(&dir("cpu"), "cpu.shares"), "512");
    assert!(
        dir("cpuacct").is_dir(),
        "split cpuacct hierarchy has the cgroup too"
    );
    assert!(
        !read(&dir("cpuset"), "cpuset.cpus").is_empty(),
        "cpuset inherited"
    );

    let child = Proc(
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep"),
    );
    let pid = i32::try_from(child.0.id()).expect("pid fits");
    cgroup.add_pid(pid).expect("add pid");
    for file in cgroup.procs_files() {
        let procs = std::fs::read_to_string(&file).expect("procs");
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "{pid} not in {}",
            file.display()
        );
    }
    assert_eq!(cgroup.pids().expect("pids"), vec![pid]);
    let stats = cgroup.stats().expect("stats");
    assert_eq!(stats.pids.as_ref().map(|p| p.current), Some(1));
    assert_eq!(stats.pids.as_ref().and_then(|p| p.limit), Some(32));
    let memory = stats.memory.expect("memory stats");
    // v1 does not move a process's charges with it: usage may still be 0.
    assert!(memory.working_set_bytes <= memory.usage_bytes);
    assert_eq!(memory.limit_bytes, Some(64 << 20));
    assert!(stats.cpu.is_some());

    // Live update.
    let update = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(32i64 << 20)
                .build()
                .expect("memory"),
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(16i64)
                .build()
                .expect("pids"),
        )
        .build()
        .expect("update");
    cgroup.apply(&update).expect("update");
    assert_eq!(read(&dir("memory"), "memory.limit_in_bytes"), "33554432");
    assert_eq!(read(&dir("pids"), "pids.max"), "16");

    let mut child = child;
    let start = Instant::now();
    cgroup.kill_all(Duration::from_secs(5)).expect("kill_all");
    eprintln!("kill_all took {:?}", start.elapsed());
    let status = child.0.wait().expect("wait");
    assert_eq!(status.signal(), Some(9));
    assert_eq!(cgroup.pids().expect("pids"), Vec::<i32>::new());
    cgroup.delete().expect("delete");
    for d in cgroup.dirs() {
        assert!(!d.exists(), "{} left", d.display());
    }
    cgroup.delete().expect("delete is idempotent");
}

#[test]
fn host_oom_kill_is_counted() {
    let Some(manager) = host(CgroupDriver::Cgroupfs) else {
        return;
    };
    if !std::path::Path::new("/bin/busybox").exists() {
        eprintln!("skipped: needs /bin/busybox");
        return;
    }
    let root = TestRoot::new(&manager, "oom");
    let path = manager
        .container_path(&format!("/{}", root.path.as_str()), "oom")
        .expect("path");
    let limit = 16i64 << 20;
    let r = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .swap(limit)
                .build()
                .expect("memory"),
        )
        .build()
        .expect("resources");
    let cgroup = manager.create(&path, Some(&r)).expect("create");
    match cgroup.oom_kill_count() {
        Ok(0) => {}
        Ok(n) => panic!("new cgroup has {n} OOM kills"),
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    }
    // Waits on stdin until it is in the cgroup, then doubles a string
    // until the OOM killer takes it.
    let mut child = Proc(
        Command::new("/bin/busybox")
            .args(["sh", "-c", "read go; a=aaaaaaaa; while :; do a=$a$a; done"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn busybox"),
    );
    let pid = i32::try_from(child.0.id()).expect("pid fits");
    cgroup.add_pid(pid).expect("add pid");
    child
        .0
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(b"go\n")
        .expect("release");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not OOM-killed in 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(9), "{status:?}");
    let count = cgroup.oom_kill_count().expect("oom count");
    assert!(count >= 1, "oom_kill {count}");
    eprintln!("OOM-killed after {:?}, oom_kill {count}", start.elapsed());
}

#[test]
fn host_failed_create_leaves_nothing() {
    let Some(manager) = host(CgroupDriver::Cgroupfs) else {
        return;
    };
    if manager.layout().controller_mount("hugetlb").is_none() {
        eprintln!("skipped: no hugetlb controller");
        return;
    }
    let root = TestRoot::new(&manager, "undo");
    let path = manager
        .container_path(&format!("/{}", root.path.as_str()), "c")
        .expect("path");
    // No kernel has 3 MB huge pages: the file is missing.
    let r = LinuxResourcesBuilder::default()
        .pids(
            LinuxPidsBuilder::default()
                .limit(8i64)
                .build()
                .expect("pids"),
        )
        .hugepage_limits(vec![
            LinuxHugepageLimitBuilder::default()
                .page_size("3MB")
                .limit(1i64 << 20)
                .build()
                .expect("hugetlb"),
        ])
        .build()
        .expect("resources");
    let err = manager.create(&path, Some(&r)).expect_err("3MB pages");
    assert!(err.to_string().contains("hugetlb.3MB"), "{err}");
    for d in manager.open(&path).dirs() {
        assert!(!d.exists(), "{} left after a failed create", d.display());
    }
}

#[test]
fn host_systemd_naming_on_cgroupfs() {
    let Some(manager) = host(CgroupDriver::Systemd) else {
        return;
    };
    let slice = format!("berthtest{}", std::process::id());
    let root = TestRoot {
        manager: manager.clone(),
        path: CgroupPath::parse(&format!("{slice}.slice")).expect("root"),
    };
    let path = manager
        .container_path(&format!("{slice}-podab_cd.slice"), "c1")
        .expect("path");
    assert_eq!(
        path.as_str(),
        format!("{slice}.slice/{slice}-podab_cd.slice/cri-berth-c1.scope")
    );
    let cgroup = manager.create(&path, None).expect("create");
    assert!(path.under(&manager.layout().v1["memory"]).is_dir());
    cgroup.delete().expect("delete");
    assert!(!path.under(&manager.layout().v1["memory"]).exists());
    drop(root);
}

#[test]
fn host_v1_kill_freezes_and_kills_every_process() {
    let Some(manager) = host(CgroupDriver::Cgroupfs) else {
        return;
    };
    if !manager.layout().v1.contains_key("freezer")
        || !std::path::Path::new("/bin/busybox").exists()
    {
        eprintln!("skipped: needs the v1 freezer and /bin/busybox");
        return;
    }
    // Without the v2 hierarchy there is no cgroup.kill: the v1 path.
    let mut layout = manager.layout().clone();
    layout.mode = CgroupMode::Legacy;
    layout.v2_mount = None;
    layout.v2_controllers.clear();
    let manager = CgroupManager::new(layout, CgroupDriver::Cgroupfs);
    let root = TestRoot::new(&manager, "v1kill");
    let path = manager
        .container_path(&format!("/{}", root.path.as_str()), "c")
        .expect("path");
    let cgroup = manager.create(&path, None).expect("create");
    let mut child = Proc(
        Command::new("/bin/busybox")
            .args([
                "sh",
                "-c",
                "read go; /bin/busybox sleep 30 & /bin/busybox sleep 30 & wait",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn busybox"),
    );
    let pid = i32::try_from(child.0.id()).expect("pid fits");
    cgroup.add_pid(pid).expect("add pid");
    child
        .0
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(b"go\n")
        .expect("release");
    let start = Instant::now();
    while cgroup.pids().expect("pids").len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "children did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    cgroup.kill_all(Duration::from_secs(5)).expect("kill_all");
    eprintln!("v1 kill_all of 3 processes took {:?}", start.elapsed());
    assert_eq!(child.0.wait().expect("wait").signal(), Some(9));
    let freezer = path.under(&manager.layout().v1["freezer"]);
    assert_eq!(read(&freezer, "freezer.state"), "THAWED");
    cgroup.delete().expect("delete");
}

/// The host's layout if it has a v2 hierarchy and we may attach programs
/// there, or `None` with the reason printed.
fn v2_layout() -> Option<CgroupLayout> {
    if !is_root() {
        eprintln!("skipped: needs root to attach device filter programs");
        return None;
    }
    let layout = match CgroupLayout::detect() {
        Ok(Some(layout)) => layout,
        Ok(None) => {
            eprintln!("skipped: no cgroup hierarchy is mounted");
            return None;
        }
        Err(e) => {
            eprintln!("skipped: read /proc/self/mountinfo: {e}");
            return None;
        }
    };
    if layout.v2_mount.is_none() {
        eprintln!(
            "skipped: needs a cgroup v2 hierarchy; this host runs {}",
            layout.mode
        );
        return None;
    }
    Some(layout)
}

fn device(allow: bool, typ: LinuxDeviceType, major: i64, minor: i64) -> LinuxDeviceCgroup {
    let mut b = LinuxDeviceCgroupBuilder::default()
        .allow(allow)
        .typ(typ)
        .access("rwm");
    if major >= 0 {
        b = b.major(major);
    }
    if minor >= 0 {
        b = b.minor(minor);
    }
    b.build().expect("device rule")
}

/// `deny a *:* rwm`, then allow each char device `(major, minor)` rwm.
fn allow_only(chars: &[(i64, i64)]) -> LinuxResources {
    let mut rules = vec![device(false, LinuxDeviceType::A, -1, -1)];
    rules.extend(
        chars
            .iter()
            .map(|&(major, minor)| device(true, LinuxDeviceType::C, major, minor)),
    );
    LinuxResourcesBuilder::default()
        .devices(rules)
        .build()
        .expect("resources")
}

fn filter_of(r: &LinuxResources) -> devices::Filter {
    let rules: Vec<devices::DeviceRule> = r
        .devices()
        .iter()
        .flatten()
        .map(|d| devices::DeviceRule::parse(d).expect("rule"))
        .collect();
    devices::Filter::from_rules(&rules).expect("filter")
}

/// Opens `device` read-write from a shell that has joined the cgroup first:
/// through `procs` (one `cgroup.procs`), or, when `None`, through
/// `cgroup.add_pid` while the shell waits on stdin. `Err` holds its stderr.
fn open_in(cgroup: &Cgroup, procs: Option<&std::path::Path>, device: &str) -> Result<(), String> {
    let mut cmd = Command::new("/bin/sh");
    match procs {
        Some(procs) => cmd
            .args(["-c", "echo $$ > \"$1\" && exec 3<>\"$2\"", "sh"])
            .arg(procs)
            .arg(device)
            .stdin(Stdio::null()),
        None => cmd
            .args(["-c", "read go && exec 3<>\"$1\"", "sh", device])
            .stdin(Stdio::piped()),
    };
    let mut child = Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh"),
    );
    if procs.is_none() {
        let pid = i32::try_from(child.0.id()).expect("pid fits");
        cgroup.add_pid(pid).expect("add pid");
        child
            .0
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(b"go\n")
            .expect("release");
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().expect("piped stderr"), &mut stderr)
        .expect("read stderr");
    let status = child.0.wait().expect("wait");
    if status.success() {
        Ok(())
    } else {
        Err(format!("{status}: {}", stderr.trim()))
    }
}

fn assert_denied(result: Result<(), String>, device: &str) {
    match result {
        Ok(()) => panic!("{device} opened through the filter"),
        Err(e) => {
            assert!(e.contains("not permitted"), "{device}: {e}");
            eprintln!("{device} denied: {e}");
        }
    }
}

#[test]
fn host_device_filter_is_enforced_and_replaced() {
    let Some(mut layout) = v2_layout() else {
        return;
    };
    // Only the v2 hierarchy: the filter is all this test is about.
    layout.v1.clear();
    layout.v2_controllers.clear();
    let manager = CgroupManager::new(layout, CgroupDriver::Cgroupfs);
    let root = TestRoot::new(&manager, "devfilter");
    let cgroup = manager.create(&root.path, None).expect("create");
    let dir = cgroup.dirs().remove(0);
    let procs = dir.join("cgroup.procs");
    let attached = || devices::attached(&dir).expect("query");

    // deny a *:* rwm; allow c 1:3 rwm (/dev/null)
    let null_only = filter_of(&allow_only(&[(1, 3)]));
    devices::install(&dir, &null_only).expect("install");
    let first = attached();
    assert_eq!(first.len(), 1, "{first:?}");
    open_in(&cgroup, Some(&procs), "/dev/null").expect("/dev/null");
    assert_denied(open_in(&cgroup, Some(&procs), "/dev/zero"), "/dev/zero");

    // Update: one program swapped for another in place.
    let with_zero = filter_of(&allow_only(&[(1, 3), (1, 5)]));
    let start = Instant::now();
    devices::install(&dir, &with_zero).expect("replace");
    eprintln!("replace took {:?}", start.elapsed());
    let second = attached();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(first, second, "a new program");
    open_in(&cgroup, Some(&procs), "/dev/zero").expect("/dev/zero after the update");
    assert_denied(open_in(&cgroup, Some(&procs), "/dev/full"), "/dev/full");

    // Someone added a second program: all must allow, and the next install
    // attaches first, then detaches both.
    devices::attach_another(&dir, &devices::Filter::deny_all()).expect("another");
    assert_eq!(attached().len(), 2);
    assert_denied(open_in(&cgroup, Some(&procs), "/dev/null"), "/dev/null");
    devices::install(&dir, &with_zero).expect("install over two");
    assert_eq!(attached().len(), 1);
    open_in(&cgroup, Some(&procs), "/dev/null").expect("/dev/null again");

    // Allow-all is no program.
    let allow_all = filter_of(
        &LinuxResourcesBuilder::default()
            .devices(vec![device(true, LinuxDeviceType::A, -1, -1)])
            .build()
            .expect("resources"),
    );
    devices::install(&dir, &allow_all).expect("allow all");
    assert_eq!(attached(), Vec::<u32>::new());
    open_in(&cgroup, Some(&procs), "/dev/full").expect("/dev/full with no filter");
}

#[test]
fn host_manager_attaches_device_filter_on_the_v2_hierarchy() {
    let Some(mut layout) = v2_layout() else {
        return;
    };
    // Devices as on a v2 host: no v1 controller for them, so the plan's
    // step is the program on the cgroup's v2 directory.
    layout.v1.remove("devices");
    let manager = CgroupManager::new(layout, CgroupDriver::Cgroupfs);
    let root = TestRoot::new(&manager, "devmanager");
    let path = manager
        .container_path(&format!("/{}", root.path.as_str()), "c")
        .expect("path");
    let mut r = allow_only(&[(1, 3)]);
    r.set_pids(Some(
        LinuxPidsBuilder::default()
            .limit(16i64)
            .build()
            .expect("pids"),
    ));
    let cgroup = manager.create(&path, Some(&r)).expect("create");
    let v2 = path.under(manager.layout().v2_mount.as_deref().expect("v2 mount"));
    assert_eq!(devices::attached(&v2).expect("query").len(), 1);
    open_in(&cgroup, None, "/dev/null").expect("/dev/null");
    assert_denied(open_in(&cgroup, None, "/dev/zero"), "/dev/zero");

    cgroup
        .apply(&allow_only(&[(1, 3), (1, 5)]))
        .expect("update");
    assert_eq!(devices::attached(&v2).expect("query").len(), 1);
    open_in(&cgroup, None, "/dev/zero").expect("/dev/zero after the update");
    // An update without devices leaves the filter as it is.
    cgroup
        .apply(
            &LinuxResourcesBuilder::default()
                .pids(
                    LinuxPidsBuilder::default()
                        .limit(8i64)
                        .build()
                        .expect("pids"),
                )
                .build()
                .expect("resources"),
        )
        .expect("pids update");
    assert_denied(open_in(&cgroup, None, "/dev/full"), "/dev/full");
}
