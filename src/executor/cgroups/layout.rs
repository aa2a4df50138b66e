//! Where the host's cgroup controllers are mounted: cgroup v1 (one hierarchy
//! per controller or group of controllers, `cpu` and `cpuacct` possibly on
//! separate ones), v2 (one unified hierarchy), or hybrid (v1 controllers plus
//! an empty v2 hierarchy, usually at `/sys/fs/cgroup/unified`).
//!
//! Read from `/proc/self/mountinfo` rather than guessed from paths: distros
//! and container hosts mount these in different places.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::executor::mounts::{MountInfo, cgroup_mounts, parse_mountinfo};

/// The controllers a Kubernetes node needs for resource limits and stats.
pub const REQUIRED_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v1 only.
    Legacy,
    /// cgroup v1 controllers plus a v2 hierarchy (whose controllers, if any,
    /// are not on v1).
    Hybrid,
    /// cgroup v2 only.
    Unified,
}

impl std::fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupMode::Legacy => "v1",
            CgroupMode::Hybrid => "hybrid (v1 with a v2 hierarchy)",
            CgroupMode::Unified => "v2",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLayout {
    pub mode: CgroupMode,
    /// v1 controller name → mount point of its hierarchy.
    pub v1: BTreeMap<String, PathBuf>,
    /// The v2 hierarchy's mount point, if mounted.
    pub v2_mount: Option<PathBuf>,
    /// Controllers enabled at the v2 root (`cgroup.controllers`).
    pub v2_controllers: Vec<String>,
    /// The hierarchies' mounts under `/sys/fs/cgroup` as mountinfo shows
    /// them: what a container's `/sys/fs/cgroup` is made from, handed to
    /// each monitor so that none reads all of mountinfo.
    pub mounts: Vec<MountInfo>,
}

impl CgroupLayout {
    /// Reads the layout of the running host.
    pub fn detect() -> std::io::Result<Option<CgroupLayout>> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(Self::from_mountinfo(&mountinfo, |mount| {
            std::fs::read_to_string(mount.join("cgroup.controllers")).ok()
        }))
    }

    /// Builds the layout from mountinfo text; `controllers_of` reads a v2
    /// mount's `cgroup.controllers` (a seam so that tests need no host).
    /// `None` when no cgroup hierarchy is mounted at all.
    pub fn from_mountinfo(
        mountinfo: &str,
        controllers_of: impl Fn(&Path) -> Option<String>,
    ) -> Option<CgroupLayout> {
        let infos = parse_mountinfo(mountinfo);
        let mut v1 = BTreeMap::new();
        let mut v2_mount: Option<PathBuf> = None;
        for info in &infos {
            match info.fstype.as_str() {
                "cgroup" => {
                    for opt in info.super_options.split(',') {
                        if is_controller_option(opt) {
                            // The first mount of a hierarchy is the canonical
                            // one; bind mounts of it come later.
                            v1.entry(opt.to_string())
                                .or_insert_with(|| info.mount_point.clone());
                        }
                    }
                }
                "cgroup2" if v2_mount.is_none() => v2_mount = Some(info.mount_point.clone()),
                _ => {}
            }
        }
        let v2_controllers = v2_mount
            .as_deref()
            .and_then(controllers_of)
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mode = match (v1.is_empty(), v2_mount.is_some()) {
            (true, false) => return None,
            (true, true) => CgroupMode::Unified,
            (false, false) => CgroupMode::Legacy,
            (false, true) => CgroupMode::Hybrid,
        };
        Some(CgroupLayout {
            mode,
            v1,
            v2_mount,
            v2_controllers,
            mounts: cgroup_mounts(infos),
        })
    }

    /// Where `controller` lives: its v1 hierarchy, or the v2 hierarchy when
    /// v2 provides it. On v2, `cpuacct` is part of `cpu`.
    pub fn controller_mount(&self, controller: &str) -> Option<&Path> {
        if let Some(path) = self.v1.get(controller) {
            return Some(path);
        }
        let v2_name = if controller == "cpuacct" {
            "cpu"
        } else {
            controller
        };
        if self.v2_controllers.iter().any(|c| c == v2_name) {
            return self.v2_mount.as_deref();
        }
        None
    }
}

/// v1 super options are `rw` plus controller names plus named-hierarchy and
/// flag options that are not controllers.
fn is_controller_option(opt: &str) -> bool {
    !matches!(
        opt,
        "rw" | "ro" | "noprefix" | "clone_children" | "xattr" | ""
    ) && !opt.contains('=')
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:26 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,cpu
29 26 0:27 / /sys/fs/cgroup/cpuacct rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,cpuacct
30 26 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
31 26 0:29 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,pids
32 26 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,xattr,name=systemd
33 26 0:31 / /sys/fs/cgroup/net_cls,net_prio rw shared:15 - cgroup cgroup rw,net_cls,net_prio
";

    const UNIFIED: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_host_with_split_cpu_and_cpuacct() {
        let layout = CgroupLayout::from_mountinfo(HYBRID, |_| Some(String::new())).expect("layout");
        assert_eq!(layout.mode, CgroupMode::Hybrid);
        assert_eq!(
            layout.controller_mount("cpu"),
            Some(Path::new("/sys/fs/cgroup/cpu"))
        );
        assert_eq!(
            layout.controller_mount("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpuacct"))
        );
        assert_eq!(
            layout.controller_mount("net_prio"),
            Some(Path::new("/sys/fs/cgroup/net_cls,net_prio"))
        );
        assert!(!layout.v1.contains_key("name=systemd") && !layout.v1.contains_key("xattr"));
        // What monitors get: the cgroup mounts, not sysfs or the tmpfs.
        assert!(layout.mounts.iter().all(|m| m.fstype.starts_with("cgroup")));
        assert!(
            layout
                .mounts
                .iter()
                .any(|m| m.mount_point == Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            layout.v2_mount.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert!(layout.v2_controllers.is_empty());
    }

    #[test]
    fn unified_host_reads_controllers_from_the_v2_root() {
        let layout = CgroupLayout::from_mountinfo(UNIFIED, |mount| {
            assert_eq!(mount, Path::new("/sys/fs/cgroup"));
            Some("cpuset cpu io memory hugetlb pids\n".to_string())
        })
        .expect("layout");
        assert_eq!(layout.mode, CgroupMode::Unified);
        for c in REQUIRED_CONTROLLERS {
            assert_eq!(
                layout.controller_mount(c),
                Some(Path::new("/sys/fs/cgroup")),
                "{c}"
            );
        }
        assert_eq!(layout.controller_mount("devices"), None);
    }

    #[test]
    fn no_cgroups_mounted_is_none() {
        let mountinfo = "25 30 0:23 / /sys rw - sysfs sysfs rw\n";
        assert_eq!(CgroupLayout::from_mountinfo(mountinfo, |_| None), None);
    }
}
