//! `berth check`: can this host run pods? One line per requirement, what is
//! missing and what to do about it. Hard requirements make the exit status
//! non-zero; optional ones only inform.

use std::fmt;
use std::path::Path;

use crate::config::Config;
use crate::executor::cgroups::{CgroupLayout, CgroupMode, REQUIRED_CONTROLLERS};
use crate::network::cni_config;

/// Below this much free space under `root`, images cannot be pulled.
const MIN_FREE_BYTES: u64 = 512 << 20;
/// Below this much, pulls of ordinary images will soon fail.
const LOW_FREE_BYTES: u64 = 5 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A hard requirement is not met: berth cannot run pods.
    Missing,
    /// An optional feature is absent; what needs it is refused clearly.
    Optional,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Ok => "ok",
            Outcome::Missing => "missing",
            Outcome::Optional => "optional",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub outcome: Outcome,
    pub name: String,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<9}{:<18}{}",
            self.outcome.to_string(),
            self.name,
            self.detail
        )
    }
}

fn finding(outcome: Outcome, name: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding {
        outcome,
        name: name.into(),
        detail: detail.into(),
    }
}

/// Runs every check against the live host.
pub fn run(config: &Config) -> Vec<Finding> {
    let mut findings = vec![privileges(), overlayfs()];
    findings.extend(namespaces());
    findings.push(pod_user_namespaces_finding(&config.root));
    findings.extend(cgroups());
    findings.push(seccomp());
    findings.push(apparmor());
    findings.push(cni(config));
    findings.push(free_space(&config.root));
    findings
}

fn privileges() -> Finding {
    if nix::unistd::geteuid().is_root() {
        finding(Outcome::Ok, "root", "running as root")
    } else {
        finding(
            Outcome::Missing,
            "root",
            "berth must run as root to create namespaces, mounts and cgroups",
        )
    }
}

fn overlayfs() -> Finding {
    match std::fs::read_to_string("/proc/filesystems") {
        Ok(text)
            if text
                .lines()
                .any(|l| l.split_whitespace().last() == Some("overlay")) =>
        {
            finding(Outcome::Ok, "overlayfs", "overlay filesystem available")
        }
        Ok(_) => finding(
            Outcome::Missing,
            "overlayfs",
            "overlay is not in /proc/filesystems: load it with `modprobe overlay`",
        ),
        Err(e) => finding(
            Outcome::Missing,
            "overlayfs",
            format!("read /proc/filesystems: {e}"),
        ),
    }
}

fn namespaces() -> Vec<Finding> {
    let mut findings: Vec<Finding> = ["mnt", "uts", "ipc", "pid", "net", "cgroup"]
        .iter()
        .map(|ns| {
            let name = format!("namespace {ns}");
            if Path::new("/proc/self/ns").join(ns).exists() {
                finding(Outcome::Ok, name, "supported")
            } else {
                finding(
                    Outcome::Missing,
                    name,
                    format!("kernel lacks CONFIG_{}_NS", ns.to_uppercase()),
                )
            }
        })
        .collect();
    let user = match (
        Path::new("/proc/self/ns/user").exists(),
        max_user_namespaces(),
    ) {
        (true, Some(n)) if n > 0 => finding(
            Outcome::Ok,
            "namespace user",
            format!("supported (max {n})"),
        ),
        (true, _) => finding(
            Outcome::Optional,
            "namespace user",
            "disabled: set user.max_user_namespaces > 0 for pods with hostUsers: false",
        ),
        (false, _) => finding(
            Outcome::Optional,
            "namespace user",
            "kernel lacks CONFIG_USER_NS: pods with hostUsers: false cannot run",
        ),
    };
    findings.push(user);
    findings
}

fn cgroups() -> Vec<Finding> {
    let layout = match CgroupLayout::detect() {
        Ok(Some(layout)) => layout,
        Ok(None) => {
            return vec![finding(
                Outcome::Missing,
                "cgroups",
                "no cgroup hierarchy is mounted: mount cgroup2 on /sys/fs/cgroup",
            )];
        }
        Err(e) => {
            return vec![finding(
                Outcome::Missing,
                "cgroups",
                format!("read /proc/self/mountinfo: {e}"),
            )];
        }
    };
    let mut detail = layout.mode.to_string();
    if let Some(v2) = &layout.v2_mount {
        let controllers = if layout.v2_controllers.is_empty() {
            "no controllers".to_string()
        } else {
            layout.v2_controllers.join(" ")
        };
        detail.push_str(&format!("; v2 at {} with {controllers}", v2.display()));
    }
    if layout.mode != CgroupMode::Unified {
        detail.push_str(&format!("; {} v1 controllers", layout.v1.len()));
    }
    let mut findings = vec![finding(Outcome::Ok, "cgroups", detail)];
    let mut wanted: Vec<&str> = REQUIRED_CONTROLLERS.to_vec();
    // v1 enforces device rules with a controller; v2 with eBPF.
    if layout.mode != CgroupMode::Unified {
        wanted.push("devices");
    }
    for controller in wanted {
        let name = format!("cgroup {controller}");
        findings.push(match layout.controller_mount(controller) {
            Some(mount) => finding(Outcome::Ok, name, mount.display().to_string()),
            None => finding(
                Outcome::Missing,
                name,
                format!("controller not mounted or not enabled: enable {controller} in the kernel and mount it"),
            ),
        });
    }
    for controller in ["cpuset", "hugetlb", "blkio", "io"] {
        let name = format!("cgroup {controller}");
        // blkio is v1's name for v2's io; only the one that fits the mode is reported.
        let fits = match controller {
            "blkio" => layout.mode != CgroupMode::Unified,
            "io" => layout.mode == CgroupMode::Unified,
            _ => true,
        };
        if !fits {
            continue;
        }
        findings.push(match layout.controller_mount(controller) {
            Some(mount) => finding(Outcome::Ok, name, mount.display().to_string()),
            None => finding(
                Outcome::Optional,
                name,
                "not available: its resource settings are ignored",
            ),
        });
    }
    findings
}

fn seccomp() -> Finding {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let has_field = status.lines().any(|l| l.starts_with("Seccomp:"));
    if has_field && Path::new("/proc/sys/kernel/seccomp/actions_avail").exists() {
        finding(Outcome::Ok, "seccomp", "filter mode available")
    } else {
        finding(
            Outcome::Missing,
            "seccomp",
            "kernel lacks CONFIG_SECCOMP_FILTER: RuntimeDefault profiles cannot be applied",
        )
    }
}

/// With AppArmor on, every unprivileged container gets berth's default
/// profile, which berth loads with apparmor_parser: without the parser no
/// such container can be created.
fn apparmor() -> Finding {
    if !crate::executor::lsm::apparmor_enabled() {
        return finding(
            Outcome::Optional,
            "apparmor",
            "not enabled: pods that ask for an AppArmor profile are refused",
        );
    }
    if which("apparmor_parser").is_some() {
        finding(Outcome::Ok, "apparmor", "enabled; apparmor_parser found")
    } else {
        finding(
            Outcome::Missing,
            "apparmor",
            "enabled, but apparmor_parser is missing: containers need the default profile loaded; install the apparmor package",
        )
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn cni(config: &Config) -> Finding {
    let net = &config.network;
    let (networks, skipped) = match cni_config::discover(&net.cni_conf_dir) {
        Ok(found) => found,
        Err(e) => return finding(Outcome::Optional, "cni", e.to_string()),
    };
    let Some(network) = networks.first() else {
        let mut detail = format!(
            "no valid CNI configuration in {}: the built-in network is used",
            net.cni_conf_dir.display()
        );
        if let Some(first) = skipped.first() {
            detail.push_str(&format!(" (skipped {first})"));
        }
        return finding(Outcome::Optional, "cni", detail);
    };
    let missing = network.missing_plugins(&net.cni_bin_dirs);
    if missing.is_empty() {
        finding(
            Outcome::Ok,
            "cni",
            format!(
                "network {:?} (cniVersion {}) from {}, plugins {}",
                network.name,
                network.cni_version,
                network.path.display(),
                network.plugin_types.join(", ")
            ),
        )
    } else {
        finding(
            Outcome::Missing,
            "cni",
            format!(
                "network {:?} from {} needs plugins missing from the plugin dirs: {}",
                network.name,
                network.path.display(),
                missing.join(", ")
            ),
        )
    }
}

/// `path` or, if it does not exist yet (a root before the first start),
/// its nearest existing ancestor: the same filesystem.
fn existing(path: &Path) -> &Path {
    let mut probe = path;
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent,
            None => break,
        }
    }
    probe
}

/// Whether pods may have user namespaces of their own (`hostUsers:
/// false`) with a root on the filesystem of `dir`: they need user
/// namespaces, Linux 5.19 (overlayfs over idmapped layers) and idmapped
/// mounts there. Why not, if not. Forks a holder for the try (root only).
pub fn pod_user_namespaces(dir: &Path) -> Result<(), String> {
    if !user_namespaces_enabled() {
        return Err("the kernel allows no user namespaces".into());
    }
    // Not HostInfo::get(): the daemon asks at start, and the rest of
    // HostInfo waits for the first container.
    let kernel = crate::container::spec::kernel_release();
    if kernel < (5, 19) {
        return Err(format!(
            "Linux {}.{}: overlayfs over idmapped layers needs 5.19",
            kernel.0, kernel.1
        ));
    }
    crate::sandbox::userns::idmapped_mounts_work(dir)
        .map_err(|e| format!("no idmapped mounts on {}: {e}", dir.display()))
}

fn pod_user_namespaces_finding(root: &Path) -> Finding {
    let name = "hostUsers: false";
    if !nix::unistd::geteuid().is_root() {
        return finding(Outcome::Optional, name, "not checked: needs root");
    }
    let probe = existing(root);
    match pod_user_namespaces(probe) {
        Ok(()) => finding(
            Outcome::Ok,
            name,
            format!("supported (idmapped mounts work on {})", probe.display()),
        ),
        Err(why) => finding(
            Outcome::Optional,
            name,
            format!("{why}: pods with user namespaces of their own cannot run"),
        ),
    }
}

fn free_space(root: &Path) -> Finding {
    // The root may not exist before the first start; its filesystem is that
    // of its nearest existing ancestor.
    let probe = existing(root);
    let name = "disk space";
    match nix::sys::statvfs::statvfs(probe) {
        Ok(stat) => {
            let free = stat.blocks_available() * stat.fragment_size();
            let human = format!(
                "{:.1} GiB free under {}",
                free as f64 / (1u64 << 30) as f64,
                probe.display()
            );
            if free < MIN_FREE_BYTES {
                finding(
                    Outcome::Missing,
                    name,
                    format!("{human}: free space or choose another root"),
                )
            } else if free < LOW_FREE_BYTES {
                finding(
                    Outcome::Optional,
                    name,
                    format!("{human}: low, pulls may fail"),
                )
            } else {
                finding(Outcome::Ok, name, human)
            }
        }
        Err(e) => finding(
            Outcome::Missing,
            name,
            format!("statvfs {}: {e}", probe.display()),
        ),
    }
}

/// `user.max_user_namespaces`, if the kernel has the knob.
fn max_user_namespaces() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
}

/// The kernel has user namespaces and allows some: the first thing
/// [`pod_user_namespaces`] asks.
fn user_namespaces_enabled() -> bool {
    Path::new("/proc/self/ns/user").exists() && max_user_namespaces().is_some_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_print_as_aligned_lines() {
        let line = finding(Outcome::Missing, "seccomp", "what to do").to_string();
        assert!(line.starts_with("missing  seccomp"), "{line}");
        assert!(line.ends_with("what to do"));
        assert!(!line.contains('\n'));
    }

    #[test]
    fn free_space_of_a_missing_root_uses_its_ancestor() {
        let f = free_space(Path::new("/nonexistent/berth/root"));
        assert!(f.detail.contains("under /"), "{}", f.detail);
    }

    #[test]
    fn live_host_reports_every_requirement_once() {
        let findings = run(&Config::default());
        let names: Vec<&str> = findings.iter().map(|f| f.name.as_str()).collect();
        for required in [
            "root",
            "overlayfs",
            "namespace net",
            "namespace user",
            "hostUsers: false",
            "cgroups",
            "seccomp",
            "apparmor",
            "cni",
            "disk space",
        ] {
            assert_eq!(
                names.iter().filter(|n| **n == required).count(),
                1,
                "{required} in {names:?}"
            );
        }
    }
}
