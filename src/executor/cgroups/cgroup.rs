//! A container's (or pod's) cgroup across every hierarchy of the host, and
//! the manager that names and makes them.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use super::devices::{self, Filter};
use super::resources::{self, Controller, Host, Step, Target, Version, Write};
use super::stats::{self, CgroupStats};
use super::{CgroupDriver, CgroupError, CgroupLayout, CgroupMode, CgroupPath, path};

/// How often `delete` retries `rmdir` on EBUSY (processes still exiting),
/// with the wait between tries growing to 16 ms: about 200 ms in all.
const RMDIR_TRIES: u32 = 16;

/// Attaches a device filter to a cgroup's v2 directory: [`devices::install`],
/// or in tests a stand-in that records it in the fake tree.
type InstallDeviceFilter = fn(&Path, &Filter) -> Result<(), CgroupError>;

fn install_device_filter(dir: &Path, filter: &Filter) -> Result<(), CgroupError> {
    tracing::debug!("device filter of {}: {filter}", dir.display());
    Ok(devices::install(dir, filter)?)
}

/// Names and makes cgroups on one host.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    layout: CgroupLayout,
    driver: CgroupDriver,
    install_device_filter: InstallDeviceFilter,
}

impl CgroupManager {
    /// `layout` from [`CgroupLayout::detect`], or a fake one whose mounts are
    /// temporary directories.
    pub fn new(layout: CgroupLayout, driver: CgroupDriver) -> Self {
        CgroupManager {
            layout,
            driver,
            install_device_filter,
        }
    }

    /// Fake trees are no cgroups: the kernel would refuse a program there.
    #[cfg(test)]
    pub(crate) fn with_device_filter_installer(mut self, install: InstallDeviceFilter) -> Self {
        self.install_device_filter = install;
        self
    }

    /// The manager for this host.
    pub fn detect(driver: CgroupDriver) -> Result<Self, CgroupError> {
        let layout = CgroupLayout::detect()
            .map_err(CgroupError::Detect)?
            .ok_or(CgroupError::NotMounted)?;
        Ok(Self::new(layout, driver))
    }

    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    pub fn driver(&self) -> CgroupDriver {
        self.driver
    }

    /// The pod's cgroup from kubelet's `cgroup_parent`.
    pub fn pod_path(&self, parent: &str) -> Result<CgroupPath, CgroupError> {
        path::pod_path(self.driver, parent)
    }

    /// A container's cgroup under kubelet's `cgroup_parent`.
    pub fn container_path(&self, parent: &str, id: &str) -> Result<CgroupPath, CgroupError> {
        path::container_path(self.driver, parent, id)
    }

    /// Makes the cgroup in every hierarchy (missing parents too; on v2 the
    /// controllers berth uses are enabled in each parent's
    /// `cgroup.subtree_control`), then applies `resources`. Invalid resources
    /// are refused before anything is made; if applying fails, the leaf
    /// directories this call made are removed again. Parents it made are
    /// left: they belong to the pod.
    pub fn create(
        &self,
        path: &CgroupPath,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup, CgroupError> {
        let cgroup = self.open(path);
        let steps = match resources {
            Some(r) => resources::plan(r, &cgroup.host(None))?,
            None => Vec::new(),
        };
        let mut created = Vec::new();
        let made = cgroup
            .make_dirs(&mut created)
            .and_then(|()| steps.iter().try_for_each(|s| cgroup.execute(s)));
        if let Err(e) = made {
            for dir in created.iter().rev() {
                if let Err(undo) = std::fs::remove_dir(dir) {
                    tracing::warn!("undo cgroup {}: {undo}", dir.display());
                }
            }
            return Err(e);
        }
        Ok(cgroup)
    }

    /// A cgroup that exists already (daemon restart, exec): no I/O.
    pub fn open(&self, path: &CgroupPath) -> Cgroup {
        let mut controllers = BTreeMap::new();
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        let mut v2_enable: Vec<&'static str> = Vec::new();
        let mut add = |mount: &Path, version: Version| {
            if !hierarchies.iter().any(|h| h.mount == mount) {
                hierarchies.push(Hierarchy {
                    mount: mount.to_path_buf(),
                    version,
                    v1_cpuset: false,
                });
            }
        };
        for c in Controller::ALL {
            if let Some(mount) = self.layout.v1.get(c.v1_name()) {
                controllers.insert(c, (path.under(mount), Version::V1));
                add(mount, Version::V1);
            } else if let (Some(mount), Some(name)) = (&self.layout.v2_mount, c.v2_name())
                && self.layout.v2_controllers.iter().any(|n| n == name)
            {
                controllers.insert(c, (path.under(mount), Version::V2));
                if !v2_enable.contains(&name) {
                    v2_enable.push(name);
                }
            }
        }
        // The v2 hierarchy on a hybrid host too, as runc: processes are
        // tracked there, and some controllers (hugetlb) may live there.
        let v2_dir = self.layout.v2_mount.as_deref().map(|mount| {
            add(mount, Version::V2);
            path.under(mount)
        });
        if let Some(mount) = self.layout.v1.get(Controller::Cpuset.v1_name())
            && let Some(h) = hierarchies.iter_mut().find(|h| &h.mount == mount)
        {
            h.v1_cpuset = true;
        }
        Cgroup {
            path: path.clone(),
            mode: self.layout.mode,
            hierarchies,
            controllers,
            v2_dir,
            v2_enable,
            install_device_filter: self.install_device_filter,
        }
    }
}

#[derive(Debug, Clone)]
struct Hierarchy {
    mount: PathBuf,
    version: Version,
    /// v1 cpuset: a new cgroup starts with empty cpus and mems, and no task
    /// can join it until they are filled in.
    v1_cpuset: bool,
}

/// One cgroup in every hierarchy of the host. Dropping it does nothing;
/// [`Cgroup::guard`] makes an owner that removes it.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: CgroupPath,
    mode: CgroupMode,
    hierarchies: Vec<Hierarchy>,
    /// Controller → its directory for this cgroup and its version.
    controllers: BTreeMap<Controller, (PathBuf, Version)>,
    v2_dir: Option<PathBuf>,
    /// v2 controllers to enable in the parents' `cgroup.subtree_control`.
    v2_enable: Vec<&'static str>,
    install_device_filter: InstallDeviceFilter,
}

impl Cgroup {
    pub fn path(&self) -> &CgroupPath {
        &self.path
    }

    /// The cgroup's directory in each hierarchy.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| self.path.under(&h.mount))
            .collect()
    }

    /// `cgroup.procs` in every hierarchy: a process joins the cgroup by
    /// having its pid written to each. The v2 one comes first: the executor
    /// forks straight into it and then need not probe the others.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let mut hierarchies: Vec<&Hierarchy> = self.hierarchies.iter().collect();
        hierarchies.sort_by_key(|h| h.version != Version::V2);
        hierarchies
            .into_iter()
            .map(|h| self.path.under(&h.mount).join("cgroup.procs"))
            .collect()
    }

    /// Moves `pid` (and later its children) into the cgroup.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            write_value(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// Makes the cgroup's limits match `resources`; fields that are absent
    /// are left as they are, so this is also the live update of
    /// UpdateContainerResources. Device rules given replace the cgroup's
    /// device filter on v2 (its program is swapped, see
    /// [`devices::install`]).
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        for step in self.plan(resources)? {
            self.execute(&step)?;
        }
        Ok(())
    }

    /// What [`Cgroup::apply`] would do, in order; reads the current v1
    /// memory limit, which decides the order of the memory writes.
    pub fn plan(&self, resources: &LinuxResources) -> Result<Vec<Step>, CgroupError> {
        let current = match self.controllers.get(&Controller::Memory) {
            Some((dir, Version::V1)) => std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            _ => None,
        };
        resources::plan(resources, &self.host(current))
    }

    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        stats::collect(&self.controllers)
    }

    /// How many processes the kernel's OOM killer killed in this cgroup.
    pub fn oom_kill_count(&self) -> Result<u64, CgroupError> {
        let (dir, version) =
            self.controllers
                .get(&Controller::Memory)
                .ok_or(CgroupError::MissingController {
                    controller: "memory",
                    what: "the oom_kill counter".to_string(),
                })?;
        stats::oom_kill_count(dir, *version)
    }

    /// The processes in the cgroup, from every hierarchy; empty when the
    /// cgroup does not exist.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        for file in self.procs_files() {
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(errno) => return Err(CgroupError::Read { path: file, errno }),
            };
            for line in text.lines().filter(|l| !l.is_empty()) {
                let pid = line.trim().parse().map_err(|_| CgroupError::Parse {
                    path: file.clone(),
                    reason: format!("{line:?} is not a pid"),
                })?;
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// SIGKILLs every process in the cgroup and waits, at most `timeout`,
    /// until none is left. v2 (and the v2 hierarchy of a hybrid host) uses
    /// `cgroup.kill` where the kernel has it (5.14+); otherwise the cgroup is
    /// frozen (v1 freezer) so that nothing forks while the pids are killed
    /// one by one, as runc does.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let killed_by_kernel = match &self.v2_dir {
            Some(dir) => write_optional(&dir.join("cgroup.kill"), "1").unwrap_or_else(|e| {
                tracing::debug!("{e}; killing one by one");
                false
            }),
            None => false,
        };
        let mut frozen = !killed_by_kernel && self.freeze(timeout / 4);
        let mut wait = Duration::from_millis(1);
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                break;
            }
            for &pid in &pids {
                match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(errno) => {
                        self.thaw_if(frozen);
                        return Err(CgroupError::Kill {
                            pid,
                            cgroup: self.path.clone(),
                            errno,
                        });
                    }
                }
            }
            // Frozen tasks die only once thawed.
            frozen = self.thaw_if(frozen);
            if start.elapsed() >= timeout {
                return Err(CgroupError::KillTimeout {
                    cgroup: self.path.clone(),
                    pids,
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(20));
        }
        self.thaw_if(frozen);
        Ok(())
    }

    /// Removes the cgroup (and any cgroups the container made below it) in
    /// every hierarchy. Missing directories are fine: deleting twice is not
    /// an error. Its processes must be gone (see [`Cgroup::kill_all`]);
    /// EBUSY while they finish exiting is retried for about 200 ms.
    pub fn delete(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            let mut wait = Duration::from_millis(1);
            let mut tries = 0;
            loop {
                match remove_tree(&dir) {
                    Ok(()) => break,
                    Err((_, e))
                        if e.kind() == std::io::ErrorKind::ResourceBusy && tries < RMDIR_TRIES =>
                    {
                        tries += 1;
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_millis(16));
                    }
                    Err((path, errno)) => return Err(CgroupError::Rmdir { path, errno }),
                }
            }
        }
        Ok(())
    }

    /// An owner that kills and removes the cgroup when dropped, unless
    /// [`CgroupGuard::keep`] is called.
    pub fn guard(self) -> CgroupGuard {
        CgroupGuard {
            cgroup: self,
            armed: true,
        }
    }

    fn host(&self, current_memory_limit: Option<i64>) -> Host {
        Host {
            versions: self
                .controllers
                .iter()
                .map(|(c, (_, v))| (*c, *v))
                .collect(),
            has_v2_dir: self.v2_dir.is_some(),
            mode: self.mode,
            current_memory_limit,
        }
    }

    /// Makes the directories, recording the leaves it made in `created`.
    fn make_dirs(&self, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        let depth = self.path.components().count();
        for h in &self.hierarchies {
            let mut dir = h.mount.clone();
            for (i, part) in self.path.components().enumerate() {
                if h.version == Version::V2 && !self.v2_enable.is_empty() {
                    enable_controllers(&dir, &self.v2_enable)?;
                }
                dir.push(part);
                match std::fs::create_dir(&dir) {
                    Ok(()) if i + 1 == depth => created.push(dir.clone()),
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(errno) => return Err(CgroupError::Mkdir { path: dir, errno }),
                }
                if h.v1_cpuset {
                    inherit_cpuset(&dir)?;
                }
            }
        }
        Ok(())
    }

    fn execute(&self, step: &Step) -> Result<(), CgroupError> {
        match step {
            Step::Write(w) => self.write(w),
            Step::DeviceFilter(filter) => {
                let Some(dir) = &self.v2_dir else {
                    // The plan checked this, as for a write.
                    return Err(CgroupError::MissingController {
                        controller: "v2 hierarchy",
                        what: "device rules".to_string(),
                    });
                };
                (self.install_device_filter)(dir, filter)
            }
        }
    }

    fn write(&self, w: &Write) -> Result<(), CgroupError> {
        let dir = match w.target {
            Target::Controller(c) => self.controllers.get(&c).map(|(dir, _)| dir),
            Target::V2Dir => self.v2_dir.as_ref(),
        };
        let Some(dir) = dir else {
            // The plan checked this; only a layout change in between gets here.
            return Err(CgroupError::MissingController {
                controller: match w.target {
                    Target::Controller(c) => c.v1_name(),
                    Target::V2Dir => "v2 hierarchy",
                },
                what: w.choices.first().map(|c| c.0.clone()).unwrap_or_default(),
            });
        };
        for (file, value) in &w.choices {
            if write_optional(&dir.join(file), value)? {
                return Ok(());
            }
        }
        let (file, value) = w.choices.first().cloned().unwrap_or_default();
        match w.skip_if_missing {
            Some(reason) => {
                tracing::debug!("{file} not in {}: {reason}; skipped", dir.display());
                Ok(())
            }
            None => Err(CgroupError::Write {
                path: dir.join(file),
                value,
                errno: std::io::Error::from(nix::errno::Errno::ENOENT),
            }),
        }
    }

    /// v1 freezer: true when the cgroup reached FROZEN within `timeout`.
    fn freeze(&self, timeout: Duration) -> bool {
        let Some((dir, Version::V1)) = self.controllers.get(&Controller::Freezer) else {
            return false;
        };
        let state = dir.join("freezer.state");
        if std::fs::write(&state, "FROZEN").is_err() {
            return false;
        }
        let start = Instant::now();
        loop {
            match std::fs::read_to_string(&state) {
                Ok(s) if s.trim() == "FROZEN" => return true,
                Ok(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(1)),
                _ => {
                    // Not frozen in time: kill what is there anyway.
                    let _ = std::fs::write(&state, "THAWED");
                    return false;
                }
            }
        }
    }

    /// Thaws when `frozen`; returns the new frozen state (false).
    fn thaw_if(&self, frozen: bool) -> bool {
        if frozen && let Some((dir, _)) = self.controllers.get(&Controller::Freezer) {
            let state = dir.join("freezer.state");
            if let Err(e) = std::fs::write(&state, "THAWED") {
                tracing::warn!("thaw {}: {e}", state.display());
            }
        }
        false
    }
}

/// Kills and removes its cgroup when dropped: the one owner of a cgroup
/// between its creation and the moment its container owns it.
#[derive(Debug)]
pub struct CgroupGuard {
    cgroup: Cgroup,
    armed: bool,
}

impl CgroupGuard {
    /// Success: the caller owns the cgroup now.
    pub fn keep(mut self) -> Cgroup {
        self.armed = false;
        self.cgroup.clone()
    }
}

impl std::ops::Deref for CgroupGuard {
    type Target = Cgroup;
    fn deref(&self) -> &Cgroup {
        &self.cgroup
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = self.cgroup.kill_all(Duration::from_secs(2)) {
            tracing::warn!("{e}");
        }
        if let Err(e) = self.cgroup.delete() {
            tracing::warn!("{e}");
        }
    }
}

/// One `write(2)` of the whole value to an existing control file.
fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    if write_optional(path, value)? {
        Ok(())
    } else {
        Err(CgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_string(),
            errno: std::io::Error::from(nix::errno::Errno::ENOENT),
        })
    }
}

/// Like [`write_value`], but `Ok(false)` when the file does not exist.
fn write_optional(path: &Path, value: &str) -> Result<bool, CgroupError> {
    let result = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(errno) => Err(CgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_string(),
            errno,
        }),
    }
}

/// Enables `wanted` v2 controllers in `dir`'s `cgroup.subtree_control` where
/// `dir` offers them and they are not enabled yet. One write for all; if the
/// kernel refuses it, one per controller, and those still refused are
/// logged: a limit that needs one fails later, naming its file.
fn enable_controllers(dir: &Path, wanted: &[&str]) -> Result<(), CgroupError> {
    let available = stats::read_file(&dir.join("cgroup.controllers"))?;
    let subtree = dir.join("cgroup.subtree_control");
    let enabled = stats::read_file(&subtree)?;
    let enabled: Vec<&str> = enabled
        .split_whitespace()
        .map(|c| c.trim_start_matches('+'))
        .collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c) && !enabled.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() || write_value(&subtree, &missing.join(" ")).is_ok() {
        return Ok(());
    }
    for c in &missing {
        if let Err(e) = write_value(&subtree, c) {
            tracing::warn!("{e}");
        }
    }
    Ok(())
}

/// v1 cpuset: fills empty `cpuset.cpus`/`cpuset.mems` from the parent.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        if stats::read_file(&dir.join(file))?.trim().is_empty() {
            let value = stats::read_file(&parent.join(file))?;
            let value = value.trim();
            if !value.is_empty() {
                write_value(&dir.join(file), value)?;
            }
        }
    }
    Ok(())
}

/// rmdir of `dir` after its sub-cgroups, deepest first; missing is fine.
/// On error, the directory that failed.
fn remove_tree(dir: &Path) -> Result<(), (PathBuf, std::io::Error)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err((dir.to_path_buf(), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| (dir.to_path_buf(), e))?;
        if entry.file_type().map_err(|e| (entry.path(), e))?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err((dir.to_path_buf(), e)),
    }
}
