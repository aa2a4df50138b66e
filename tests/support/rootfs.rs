//! A busybox container for integration tests, built the way the executor's
//! own tests build theirs (`src/executor/container/tests.rs`): the host's
//! static busybox copied into a temp rootfs with its applets as symlinks,
//! and a minimal OCI spec with runc's default namespaces (no user, no
//! cgroup namespace) and mounts, no seccomp.
//!
//! The bundle's temp dir is checked on drop: nothing may stay mounted under
//! it. A leaked mount is detached before the directory is removed (so that
//! removing it can never reach into a mounted filesystem), then reported.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub const BUSYBOX: &str = "/bin/busybox";

/// The applets the tests call, linked to the copied busybox.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "sleep", "stty", "id", "true", "false", "head", "tr", "ls", "grep",
    "printf", "wc", "tty", "kill", "yes", "seq",
];

/// Why this machine cannot run container tests, if it cannot.
pub fn missing_requirement() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (namespaces, mounts, cgroups)".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("needs {BUSYBOX} (Debian package busybox-static)"));
    }
    None
}

/// A temp dir holding `bundle/rootfs` (busybox) and whatever else a test
/// keeps beside it (logs, sockets, exit records).
pub struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    pub fn new(prefix: &str) -> Bundle {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create temp dir");
        let root = dir.path().join("bundle/rootfs");
        for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "root"] {
            std::fs::create_dir_all(root.join(d)).expect("create rootfs dir");
        }
        std::fs::set_permissions(
            root.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .expect("chmod /tmp");
        crate::common::copy_executable(Path::new(BUSYBOX), &root.join("bin/busybox"));
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                .expect("link applet");
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
            .expect("write /etc/passwd");
        std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("write /etc/group");
        Bundle { dir }
    }

    /// The temp dir everything of this container lives in.
    pub fn base(&self) -> &Path {
        self.dir.path()
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    pub fn rootfs(&self) -> PathBuf {
        self.bundle().join("rootfs")
    }

    /// Writes `spec` as the bundle's `config.json`; returns its path.
    pub fn write_spec(&self, spec: &Value) -> PathBuf {
        let path = self.bundle().join("config.json");
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(spec).expect("serialize spec"),
        )
        .expect("write config.json");
        path
    }

    /// The lines of `/proc/self/mountinfo` that mention this temp dir.
    pub fn leaked_mounts(&self) -> Vec<String> {
        mounts_under(self.dir.path())
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let leaked = self.leaked_mounts();
        for line in &leaked {
            if let Some(target) = line.split(' ').nth(4) {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if !leaked.is_empty() && !std::thread::panicking() {
            panic!("mounts left behind under the test dir: {leaked:#?}");
        }
    }
}

pub fn mounts_under(dir: &Path) -> Vec<String> {
    let base = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&base))
        .map(str::to_string)
        .collect()
}

/// The spec the tests start from: runc's default namespaces but user and
/// cgroup, its default mounts, a few capabilities, no seccomp. `root.path`
/// is relative to the bundle, as `runc spec` writes it.
pub fn spec(args: &[&str]) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "root": { "path": "rootfs" },
        "hostname": "berth-test",
        "process": {
            "args": args,
            "env": ["PATH=/bin", "HOME=/root", "TERM=xterm"],
            "cwd": "/",
            "user": { "uid": 0, "gid": 0 },
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps
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
              "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" }, { "type": "mount" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "network" }
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}
