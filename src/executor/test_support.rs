//! What the executor's real-kernel tests share. Each test re-runs the test
//! binary for just itself with one thread ([`isolated`]), so that the
//! executor's forks never happen beside another test's threads; containers
//! run from a busybox rootfs in a temp dir ([`Rootfs`]).

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use super::Stdio;

/// Names the test a re-exec of the binary is for.
const CHILD_ENV: &str = "BERTH_ISOLATED_TEST";
pub(crate) const BUSYBOX: &str = "/bin/busybox";

/// Runs `body` in a single-threaded re-exec of this test binary, or says
/// why it cannot run here: not root, no busybox, or `skip` (a reason of the
/// caller's). `module` is the caller's `module_path!()`.
pub(crate) fn isolated(module: &str, name: &str, skip: Option<String>, body: impl FnOnce()) {
    let full = format!(
        "{}::{name}",
        module.split_once("::").map(|(_, rest)| rest).unwrap_or(""),
    );
    if std::env::var(CHILD_ENV).as_deref() == Ok(full.as_str()) {
        body();
        return;
    }
    let skip = if !nix::unistd::geteuid().is_root() {
        Some("needs root (namespaces, mounts)".to_string())
    } else if !Path::new(BUSYBOX).exists() {
        Some(format!("needs {BUSYBOX} (Debian package busybox-static)"))
    } else {
        skip
    };
    if let Some(reason) = skip {
        eprintln!("skipped {full}: {reason}");
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([
            full.as_str(),
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &full)
        .output()
        .expect("re-exec the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Captured by the harness unless --nocapture.
    print!("{stdout}");
    assert!(
        out.status.success(),
        "{full} failed in its subprocess:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "{full} did not run in its subprocess:\n{stdout}\n{stderr}"
    );
}

/// A busybox rootfs in a temp dir; checks on drop that no mount is left
/// under it.
pub(crate) struct Rootfs {
    dir: tempfile::TempDir,
}

impl Rootfs {
    pub(crate) fn new() -> Rootfs {
        let dir = tempfile::Builder::new()
            .prefix("berth-exec-test")
            .tempdir()
            .unwrap();
        let root = dir.path().join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "root", "mnt"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::set_permissions(
            root.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        // `cp` writes the copy, not this process: a fork on another test's
        // thread would inherit our write descriptor until its exec, and
        // running the copy meanwhile fails with ETXTBSY.
        let copied = std::process::Command::new("cp")
            .arg(BUSYBOX)
            .arg(root.join("bin/busybox"))
            .status()
            .unwrap();
        assert!(copied.success(), "cp busybox: {copied}");
        for applet in [
            "sh", "id", "hostname", "cat", "ls", "sleep", "mount", "echo", "true", "mkdir",
            "touch", "wc", "readlink", "grep", "tty", "stat",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        Rootfs { dir }
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// The temp dir around the rootfs, for files a test binds in.
    pub(crate) fn base(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let base = self.dir.path().to_string_lossy().into_owned();
        let leaked: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&base)).collect();
        if !std::thread::panicking() {
            assert!(leaked.is_empty(), "mounts left behind: {leaked:#?}");
        }
    }
}

/// Kills and reaps the process on drop (also on panic).
pub(crate) struct Running(pub(crate) Option<Pid>);

impl Running {
    pub(crate) fn wait(mut self) -> WaitStatus {
        let pid = self.0.take().expect("running");
        waitpid(pid, None).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

/// A pipe for the process's stdout and stderr: (read end, stdio).
pub(crate) fn pipe_stdio() -> (std::fs::File, Stdio) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let w2: OwnedFd = w.try_clone().unwrap();
    (
        std::fs::File::from(r),
        Stdio::Pipes {
            stdin: None,
            stdout: w,
            stderr: w2,
        },
    )
}

/// Everything the read end gives until every writer is gone.
pub(crate) fn read_all(mut f: std::fs::File) -> String {
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    s
}

/// True when this test runs as root; otherwise says the test is skipped
/// and why (`needs`: what root is needed for).
pub(crate) fn root_or_skip(needs: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipping: needs root ({needs})");
    }
    root
}
