//! The whole path from `LinuxResources` to control files, against fake
//! cgroupfs trees in temporary directories: a hybrid v1 host with `cpu` and
//! `cpuacct` split and hugetlb on the v2 hierarchy (this project's CI host),
//! and a pure v2 host. The fake trees hold the files the kernel would create
//! with each directory; the v2 device filter, which only a real cgroup can
//! take, is recorded in a file by a stand-in installer (the real one is in
//! `host_tests`). The fake hosts are also used by the sandbox's tests of
//! the pod cgroup.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::{
    LinuxBlockIoBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources,
    LinuxResourcesBuilder,
};

use super::*;

const POD: &str = "/kubepods/burstable/pod0b4ba1c4";
const UNLIMITED_V1: &str = "9223372036854771712";

pub(crate) struct Fake {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pub(crate) layout: CgroupLayout,
}

impl Fake {
    pub(crate) fn mount(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub(crate) fn read(&self, mount: &str, path: &CgroupPath, file: &str) -> String {
        let p = path.under(&self.mount(mount)).join(file);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }
}

fn put(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (name, value) in files {
        std::fs::write(dir.join(name), value).expect("write fixture");
    }
}

/// Puts `level` files in every directory below the mount down to `path`,
/// and `leaf` files in `path` itself.
fn put_path(mount: &Path, path: &CgroupPath, level: &[(&str, &str)], leaf: &[(&str, &str)]) {
    let mut dir = mount.to_path_buf();
    for part in path.components() {
        dir.push(part);
        put(&dir, level);
    }
    put(&dir, leaf);
}

const V1_MOUNTS: [&str; 8] = [
    "cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer",
];

/// This host: v1 with split cpu and cpuacct, hugetlb on the v2 hierarchy.
pub(crate) fn hybrid() -> Fake {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let v1: BTreeMap<String, PathBuf> = V1_MOUNTS
        .iter()
        .map(|c| (c.to_string(), root.join(c)))
        .collect();
    for mount in v1.values() {
        put(mount, &[("cgroup.procs", "")]);
    }
    put(
        &root.join("cpuset"),
        &[("cpuset.cpus", "0-1"), ("cpuset.mems", "0")],
    );
    put(
        &root.join("unified"),
        &[
            ("cgroup.controllers", "hugetlb\n"),
            ("cgroup.subtree_control", ""),
        ],
    );
    Fake {
        layout: CgroupLayout {
            mode: CgroupMode::Hybrid,
            v1,
            v2_mount: Some(root.join("unified")),
            v2_controllers: vec!["hugetlb".to_string()],
            mounts: Vec::new(),
        },
        root,
        _dir: dir,
    }
}

/// The kernel's files of a hybrid container cgroup (swap accounting off,
/// no BFQ: neither memsw nor blkio weight files).
pub(crate) fn populate_hybrid(fake: &Fake, path: &CgroupPath) {
    let m = |name: &str| fake.mount(name);
    put_path(
        &m("cpu"),
        path,
        &[],
        &[
            ("cpu.shares", "1024"),
            ("cpu.cfs_period_us", "100000"),
            ("cpu.cfs_quota_us", "-1"),
            (
                "cpu.stat",
                "nr_periods 10\nnr_throttled 3\nthrottled_time 4500000\n",
            ),
        ],
    );
    put_path(
        &m("cpuacct"),
        path,
        &[],
        &[
            ("cpuacct.usage", "5000000000\n"),
            ("cpuacct.usage_user", "4000000000\n"),
            ("cpuacct.usage_sys", "1000000000\n"),
        ],
    );
    put_path(
        &m("cpuset"),
        path,
        &[("cpuset.cpus", ""), ("cpuset.mems", "")],
        &[],
    );
    put_path(
        &m("memory"),
        path,
        &[],
        &[
            ("memory.limit_in_bytes", UNLIMITED_V1),
            ("memory.soft_limit_in_bytes", UNLIMITED_V1),
            ("memory.usage_in_bytes", "1118208\n"),
            (
                "memory.stat",
                "total_cache 405504\ntotal_rss 548864\ntotal_inactive_file 270336\ntotal_pgfault 1683\ntotal_pgmajfault 2\n",
            ),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
            ),
        ],
    );
    put_path(
        &m("pids"),
        path,
        &[],
        &[("pids.max", "max"), ("pids.current", "3\n")],
    );
    put_path(&m("blkio"), path, &[], &[]);
    put_path(
        &m("devices"),
        path,
        &[],
        &[("devices.allow", ""), ("devices.deny", "")],
    );
    put_path(&m("freezer"), path, &[], &[("freezer.state", "THAWED")]);
    put_path(
        &m("unified"),
        path,
        &[
            ("cgroup.controllers", "hugetlb\n"),
            ("cgroup.subtree_control", ""),
        ],
        &[("hugetlb.2MB.max", "max")],
    );
}

fn device(
    allow: bool,
    typ: LinuxDeviceType,
    major: Option<i64>,
    minor: Option<i64>,
) -> oci_spec::runtime::LinuxDeviceCgroup {
    let mut b = LinuxDeviceCgroupBuilder::default()
        .allow(allow)
        .typ(typ)
        .access("rwm");
    if let Some(m) = major {
        b = b.major(m);
    }
    if let Some(m) = minor {
        b = b.minor(m);
    }
    b.build().expect("device rule")
}

fn full_resources(devices: bool) -> LinuxResources {
    let mut r = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .shares(512u64)
                .quota(20_000i64)
                .period(100_000u64)
                .cpus("1")
                .build()
                .expect("cpu"),
        )
        .memory(
            LinuxMemoryBuilder::default()
                .limit(64i64 << 20)
                .swap(128i64 << 20)
                .reservation(32i64 << 20)
                .build()
                .expect("memory"),
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(32i64)
                .build()
                .expect("pids"),
        )
        .hugepage_limits(vec![
            LinuxHugepageLimitBuilder::default()
                .page_size("2MB")
                .limit(4i64 << 20)
                .build()
                .expect("hugetlb"),
        ])
        .block_io(
            LinuxBlockIoBuilder::default()
                .weight(500u16)
                .build()
                .expect("blkio"),
        )
        .build()
        .expect("resources");
    if devices {
        r.set_devices(Some(vec![
            device(false, LinuxDeviceType::A, None, None),
            device(true, LinuxDeviceType::C, Some(1), Some(3)),
        ]));
    }
    r
}

#[test]
fn hybrid_host_writes_each_file_in_its_own_hierarchy() {
    let fake = hybrid();
    let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs);
    let path = manager.container_path(POD, "c1").expect("path");
    populate_hybrid(&fake, &path);
    let cgroup = manager
        .create(&path, Some(&full_resources(true)))
        .expect("create");

    assert_eq!(fake.read("cpu", &path, "cpu.shares"), "512");
    assert_eq!(fake.read("cpu", &path, "cpu.cfs_period_us"), "100000");
    assert_eq!(fake.read("cpu", &path, "cpu.cfs_quota_us"), "20000");
    // cpuset: the spec's cpus, the parent's mems, and every level filled.
    assert_eq!(fake.read("cpuset", &path, "cpuset.cpus"), "1");
    assert_eq!(fake.read("cpuset", &path, "cpuset.mems"), "0");
    let pod = manager.pod_path(POD).expect("pod");
    assert_eq!(fake.read("cpuset", &pod, "cpuset.cpus"), "0-1");
    assert_eq!(
        fake.read("memory", &path, "memory.limit_in_bytes"),
        "67108864"
    );
    assert_eq!(
        fake.read("memory", &path, "memory.soft_limit_in_bytes"),
        "33554432"
    );
    assert!(
        !path
            .under(&fake.mount("memory"))
            .join("memory.memsw.limit_in_bytes")
            .exists(),
        "swap accounting off: memsw skipped, never created"
    );
    assert_eq!(fake.read("pids", &path, "pids.max"), "32");
    assert!(
        !path
            .under(&fake.mount("blkio"))
            .join("blkio.weight")
            .exists()
    );
    assert_eq!(fake.read("devices", &path, "devices.deny"), "a *:* rwm");
    assert_eq!(fake.read("devices", &path, "devices.allow"), "c 1:3 rwm");
    // hugetlb lives on the v2 hierarchy here: v2 file name, and enabled in
    // every parent's subtree_control but not in the leaf's.
    assert_eq!(fake.read("unified", &path, "hugetlb.2MB.max"), "4194304");
    assert_eq!(
        std::fs::read_to_string(fake.mount("unified").join("cgroup.subtree_control"))
            .expect("root subtree_control"),
        "+hugetlb"
    );
    assert_eq!(
        fake.read("unified", &pod, "cgroup.subtree_control"),
        "+hugetlb"
    );
    assert_eq!(fake.read("unified", &path, "cgroup.subtree_control"), "");

    let procs = cgroup.procs_files();
    assert_eq!(procs.len(), 9, "8 v1 hierarchies and the v2 one: {procs:?}");
    assert!(procs.contains(&path.under(&fake.mount("cpuacct")).join("cgroup.procs")));
    assert!(procs.contains(&path.under(&fake.mount("unified")).join("cgroup.procs")));

    let stats = cgroup.stats().expect("stats");
    let cpu = stats.cpu.expect("cpu");
    assert_eq!(
        (cpu.usage_ns, cpu.user_ns, cpu.system_ns),
        (5_000_000_000, 4_000_000_000, 1_000_000_000)
    );
    assert_eq!(
        cpu.throttling,
        Some(CpuThrottling {
            periods: 10,
            throttled_periods: 3,
            throttled_ns: 4_500_000,
        })
    );
    let memory = stats.memory.expect("memory");
    assert_eq!(memory.working_set_bytes, 1_118_208 - 270_336);
    assert_eq!(memory.rss_bytes, 548_864);
    assert_eq!(memory.swap_bytes, None);
    assert_eq!(memory.limit_bytes, Some(64 << 20));
    assert_eq!(
        stats.pids,
        Some(PidsStats {
            current: 3,
            limit: Some(32)
        })
    );
    assert_eq!(cgroup.oom_kill_count().expect("oom"), 1);
}

#[test]
fn live_update_changes_only_what_it_names() {
    let fake = hybrid();
    let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs);
    let path = manager.container_path(POD, "c2").expect("path");
    populate_hybrid(&fake, &path);
    let cgroup = manager
        .create(&path, Some(&full_resources(false)))
        .expect("create");
    let update = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(32i64 << 20)
                .build()
                .expect("memory"),
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(-1i64)
                .build()
                .expect("pids"),
        )
        .cpu(
            LinuxCpuBuilder::default()
                .quota(-1i64)
                .build()
                .expect("cpu"),
        )
        .build()
        .expect("update");
    cgroup.apply(&update).expect("apply");
    assert_eq!(
        fake.read("memory", &path, "memory.limit_in_bytes"),
        "33554432"
    );
    assert_eq!(
        fake.read("memory", &path, "memory.soft_limit_in_bytes"),
        "33554432"
    );
    assert_eq!(fake.read("pids", &path, "pids.max"), "max");
    assert_eq!(fake.read("cpu", &path, "cpu.cfs_quota_us"), "-1");
    assert_eq!(fake.read("cpu", &path, "cpu.shares"), "512");
    let bad = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .quota(10i64)
                .build()
                .expect("cpu"),
        )
        .build()
        .expect("bad");
    let err = cgroup.apply(&bad).expect_err("quota below 1ms");
    assert!(err.to_string().contains("cpu.quota"), "{err}");
    assert_eq!(fake.read("cpu", &path, "cpu.cfs_quota_us"), "-1");
}

/// A v2 host with every controller berth uses.
pub(crate) fn unified() -> Fake {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let controllers = "cpuset cpu io memory hugetlb pids rdma misc\n";
    put(
        &root.join("cgroup"),
        &[
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", ""),
        ],
    );
    Fake {
        layout: CgroupLayout {
            mode: CgroupMode::Unified,
            v1: BTreeMap::new(),
            v2_mount: Some(root.join("cgroup")),
            v2_controllers: controllers.split_whitespace().map(str::to_string).collect(),
            mounts: Vec::new(),
        },
        root,
        _dir: dir,
    }
}

pub(crate) fn populate_unified(fake: &Fake, path: &CgroupPath) {
    put_path(
        &fake.mount("cgroup"),
        path,
        &[
            ("cgroup.controllers", "cpuset cpu io memory hugetlb pids\n"),
            ("cgroup.subtree_control", ""),
        ],
        &[
            ("cgroup.procs", ""),
            ("cgroup.kill", ""),
            ("cpu.weight", "100"),
            ("cpu.max", "max 100000"),
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\nthrottled_usec 20\n",
            ),
            ("cpuset.cpus", ""),
            ("cpuset.mems", ""),
            ("memory.max", "max"),
            ("memory.swap.max", "max"),
            ("memory.low", "0"),
            ("memory.high", "max"),
            ("memory.current", "7340032\n"),
            ("memory.swap.current", "0\n"),
            (
                "memory.stat",
                "anon 5177344\nfile 1617920\ninactive_file 1081344\npgfault 3388\npgmajfault 7\n",
            ),
            ("memory.events", "low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\n"),
            ("pids.max", "max"),
            ("pids.current", "1\n"),
            ("hugetlb.2MB.max", "max"),
            // No io.weight: a BFQ-only kernel.
            ("io.bfq.weight", "default 100"),
        ],
    );
}

#[test]
fn unified_host_writes_v2_files() {
    let fake = unified();
    let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs);
    let path = manager.container_path(POD, "c1").expect("path");
    populate_unified(&fake, &path);
    let mut r = full_resources(false);
    r.set_unified(Some(HashMap::from([(
        "memory.high".to_string(),
        "50331648".to_string(),
    )])));
    let cgroup = manager.create(&path, Some(&r)).expect("create");

    let read = |file: &str| fake.read("cgroup", &path, file);
    assert_eq!(read("cpu.weight"), "20");
    assert_eq!(read("cpu.max"), "20000 100000");
    assert_eq!(read("cpuset.cpus"), "1");
    assert_eq!(read("cpuset.mems"), "", "v2 needs no copy from the parent");
    assert_eq!(read("memory.max"), "67108864");
    assert_eq!(
        read("memory.swap.max"),
        "67108864",
        "memsw 128 MiB - memory 64 MiB"
    );
    assert_eq!(read("memory.low"), "33554432");
    assert_eq!(read("memory.high"), "50331648");
    assert_eq!(read("pids.max"), "32");
    assert_eq!(read("hugetlb.2MB.max"), "4194304");
    assert_eq!(read("io.bfq.weight"), "500");
    assert!(!path.under(&fake.mount("cgroup")).join("io.weight").exists());
    let enabled = "+cpu +cpuset +memory +pids +hugetlb +io";
    assert_eq!(
        std::fs::read_to_string(fake.mount("cgroup").join("cgroup.subtree_control")).expect("root"),
        enabled
    );
    assert_eq!(
        fake.read(
            "cgroup",
            &manager.pod_path(POD).expect("pod"),
            "cgroup.subtree_control"
        ),
        enabled
    );
    assert_eq!(read("cgroup.subtree_control"), "");
    assert_eq!(
        cgroup.procs_files(),
        vec![path.under(&fake.mount("cgroup")).join("cgroup.procs")]
    );

    let stats = cgroup.stats().expect("stats");
    let cpu = stats.cpu.expect("cpu");
    assert_eq!(
        (cpu.usage_ns, cpu.user_ns, cpu.system_ns),
        (1_500_000, 1_000_000, 500_000)
    );
    assert_eq!(
        cpu.throttling,
        Some(CpuThrottling {
            periods: 4,
            throttled_periods: 1,
            throttled_ns: 20_000,
        }),
        "v2 throttled_usec is in microseconds"
    );
    let memory = stats.memory.expect("memory");
    assert_eq!(memory.working_set_bytes, 7_340_032 - 1_081_344);
    assert_eq!(memory.rss_bytes, 5_177_344);
    assert_eq!(memory.swap_bytes, Some(0));
    assert_eq!(memory.limit_bytes, Some(64 << 20));
    assert_eq!(
        stats.pids,
        Some(PidsStats {
            current: 1,
            limit: Some(32)
        })
    );
    assert_eq!(cgroup.oom_kill_count().expect("oom"), 2);

    // An empty cgroup: cgroup.kill is written and nothing is waited for.
    cgroup.kill_all(Duration::from_millis(100)).expect("kill");
    assert_eq!(read("cgroup.kill"), "1");
}

/// Stands in for the kernel: the fake leaf records the filter it was given.
const FILTER_RECORD: &str = "device-filter.test";

fn record_filter(dir: &Path, filter: &devices::Filter) -> Result<(), CgroupError> {
    let path = dir.join(FILTER_RECORD);
    std::fs::write(&path, filter.to_string()).map_err(|errno| CgroupError::Write {
        path,
        value: filter.to_string(),
        errno,
    })
}

fn refuse_filter(dir: &Path, _: &devices::Filter) -> Result<(), CgroupError> {
    Err(devices::DeviceFilterError::Attach {
        path: dir.to_path_buf(),
        errno: nix::errno::Errno::EPERM,
    }
    .into())
}

fn device_rules(rules: Vec<oci_spec::runtime::LinuxDeviceCgroup>) -> LinuxResources {
    let mut r = LinuxResources::default();
    r.set_devices(Some(rules));
    r
}

#[test]
fn unified_host_plans_and_attaches_a_device_filter() {
    let fake = unified();
    let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs)
        .with_device_filter_installer(record_filter);
    let path = manager.container_path(POD, "c1").expect("path");
    populate_unified(&fake, &path);
    let r = full_resources(true);
    let steps = manager.open(&path).plan(&r).expect("plan");
    let filters: Vec<String> = steps
        .iter()
        .filter_map(|s| match s {
            resources::Step::DeviceFilter(f) => Some(f.to_string()),
            resources::Step::Write(_) => None,
        })
        .collect();
    assert_eq!(filters, ["deny all but c 1:3 rwm"]);
    assert!(matches!(
        steps.last(),
        Some(resources::Step::DeviceFilter(_))
    ));
    assert!(!steps.iter().any(|s| matches!(
        s,
        resources::Step::Write(w) if w.target == resources::Target::Controller(resources::Controller::Devices)
    )));

    let cgroup = manager.create(&path, Some(&r)).expect("create");
    assert_eq!(fake.read("cgroup", &path, "memory.max"), "67108864");
    assert_eq!(
        fake.read("cgroup", &path, FILTER_RECORD),
        "deny all but c 1:3 rwm"
    );
    // Update: the rules given replace the filter; none given leave it.
    cgroup
        .apply(&device_rules(vec![
            device(false, LinuxDeviceType::A, None, None),
            device(true, LinuxDeviceType::C, Some(1), Some(3)),
            device(true, LinuxDeviceType::C, Some(1), Some(5)),
        ]))
        .expect("update");
    assert_eq!(
        fake.read("cgroup", &path, FILTER_RECORD),
        "deny all but c 1:3 rwm, c 1:5 rwm"
    );
    cgroup.apply(&full_resources(false)).expect("no devices");
    assert_eq!(
        fake.read("cgroup", &path, FILTER_RECORD),
        "deny all but c 1:3 rwm, c 1:5 rwm"
    );
    // The privileged allow-all is a filter too: it takes the program away.
    cgroup
        .apply(&device_rules(vec![device(
            true,
            LinuxDeviceType::A,
            None,
            None,
        )]))
        .expect("allow-all");
    assert_eq!(fake.read("cgroup", &path, FILTER_RECORD), "allow all");
}

#[test]
fn hybrid_host_keeps_v1_device_files() {
    let fake = hybrid();
    let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs)
        .with_device_filter_installer(refuse_filter);
    let path = manager.container_path(POD, "c1").expect("path");
    let steps = manager
        .open(&path)
        .plan(&full_resources(true))
        .expect("plan");
    let devices: Vec<(String, String)> = steps
        .iter()
        .map(|s| match s {
            resources::Step::Write(w) => w,
            resources::Step::DeviceFilter(f) => panic!("v1 devices, yet a filter: {f}"),
        })
        .filter(|w| w.target == resources::Target::Controller(resources::Controller::Devices))
        .map(|w| w.choices[0].clone())
        .collect();
    assert_eq!(
        devices,
        [
            ("devices.deny".to_string(), "a *:* rwm".to_string()),
            ("devices.allow".to_string(), "c 1:3 rwm".to_string()),
        ]
    );
}

#[test]
fn device_rules_are_checked_before_anything_is_made() {
    let fake = unified();
    let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs)
        .with_device_filter_installer(record_filter);
    let path = manager.container_path(POD, "c1").expect("path");
    let r = device_rules(vec![
        device(false, LinuxDeviceType::A, None, None),
        device(true, LinuxDeviceType::C, None, None),
        device(false, LinuxDeviceType::C, Some(1), Some(3)),
    ]);
    let err = manager
        .create(&path, Some(&r))
        .expect_err("hole in a wildcard");
    assert!(err.to_string().contains("cut a hole"), "{err}");
    assert!(
        !manager
            .pod_path(POD)
            .expect("pod")
            .under(&fake.mount("cgroup"))
            .exists()
    );
}

#[test]
fn failed_device_filter_removes_the_leaf_it_made() {
    let fake = unified();
    let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs)
        .with_device_filter_installer(refuse_filter);
    let path = manager.container_path(POD, "c1").expect("path");
    let pod = manager.pod_path(POD).expect("pod");
    put_path(
        &fake.mount("cgroup"),
        &pod,
        &[("cgroup.controllers", ""), ("cgroup.subtree_control", "")],
        &[],
    );
    let r = device_rules(vec![device(false, LinuxDeviceType::A, None, None)]);
    let err = manager.create(&path, Some(&r)).expect_err("refused");
    assert_eq!(
        err.to_string(),
        format!(
            "attach the device filter program to {}: EPERM: Operation not permitted",
            path.under(&fake.mount("cgroup")).display()
        )
    );
    assert!(!path.under(&fake.mount("cgroup")).exists(), "leaf removed");
    assert!(pod.under(&fake.mount("cgroup")).exists());
}

#[test]
fn failed_apply_removes_the_leaf_it_made() {
    let fake = unified();
    let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs);
    let path = manager.container_path(POD, "c1").expect("path");
    let pod = manager.pod_path(POD).expect("pod");
    put_path(
        &fake.mount("cgroup"),
        &pod,
        &[
            ("cgroup.controllers", "pids\n"),
            ("cgroup.subtree_control", ""),
        ],
        &[],
    );
    let r = LinuxResourcesBuilder::default()
        .pids(
            LinuxPidsBuilder::default()
                .limit(5i64)
                .build()
                .expect("pids"),
        )
        .build()
        .expect("resources");
    // The fake leaf has no pids.max, as if the controller were not enabled.
    let err = manager.create(&path, Some(&r)).expect_err("no pids.max");
    let text = err.to_string();
    assert!(
        text.starts_with("write \"5\" to ") && text.contains("pids.max: No such file"),
        "{text}"
    );
    assert!(!path.under(&fake.mount("cgroup")).exists(), "leaf removed");
    assert!(
        pod.under(&fake.mount("cgroup")).exists(),
        "the pod's cgroup stays"
    );
}

#[test]
fn delete_is_idempotent_and_recursive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let layout = CgroupLayout {
        mode: CgroupMode::Legacy,
        v1: ["memory", "pids", "cpu", "cpuacct"]
            .iter()
            .map(|c| (c.to_string(), root.join(c)))
            .collect(),
        v2_mount: None,
        v2_controllers: vec![],
        mounts: Vec::new(),
    };
    for c in layout.v1.values() {
        put(c, &[]);
    }
    let manager = CgroupManager::new(layout, CgroupDriver::Systemd);
    let path = manager
        .container_path("kubepods-besteffort-pod12_34.slice", "abc")
        .expect("path");
    assert_eq!(
        path.as_str(),
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_34.slice/cri-berth-abc.scope"
    );
    let cgroup = manager.create(&path, None).expect("create");
    for c in ["memory", "pids", "cpu", "cpuacct"] {
        assert!(path.under(&root.join(c)).is_dir(), "{c}");
    }
    // A cgroup the container made for itself goes too.
    std::fs::create_dir(path.under(&root.join("memory")).join("nested")).expect("nested");
    cgroup.delete().expect("delete");
    for c in ["memory", "pids", "cpu", "cpuacct"] {
        assert!(!path.under(&root.join(c)).exists(), "{c}");
        assert!(path.under(&root.join(c)).parent().is_some_and(Path::is_dir));
    }
    cgroup.delete().expect("second delete");
    assert_eq!(
        cgroup.pids().expect("pids of a deleted cgroup"),
        Vec::<i32>::new()
    );
}

#[test]
fn guard_removes_unless_kept() {
    let fake = unified();
    let manager = CgroupManager::new(fake.layout.clone(), CgroupDriver::Cgroupfs);
    let pod = manager.pod_path(POD).expect("pod");
    put_path(
        &fake.mount("cgroup"),
        &pod,
        &[("cgroup.controllers", ""), ("cgroup.subtree_control", "")],
        &[],
    );
    let a = manager.container_path(POD, "a").expect("a");
    let b = manager.container_path(POD, "b").expect("b");
    drop(manager.create(&a, None).expect("a").guard());
    assert!(!a.under(&fake.mount("cgroup")).exists());
    let kept = manager.create(&b, None).expect("b").guard().keep();
    assert!(kept.dirs()[0].is_dir());
}
