//! Linux namespaces: which ones a container gets new, which it joins by path,
//! and in which order. The order is runc's: join existing namespaces first
//! (the user namespace before the others, the mount namespace last), then
//! create a new user namespace (the parent writes its id maps), then create
//! the rest. A new pid namespace only applies to children, which is why the
//! executor forks once more after this step.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::Pid;
use oci_spec::runtime::{Linux, LinuxIdMapping, LinuxNamespaceType};

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("open {kind} namespace {path}: {source}")]
    Open {
        kind: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("join {kind} namespace {path}: {errno}")]
    Join {
        kind: &'static str,
        path: PathBuf,
        errno: Errno,
    },
    #[error("create namespaces ({flags}): {errno}")]
    Unshare { flags: String, errno: Errno },
    #[error("write {path}: {source}")]
    IdMap {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A namespace the process joins: its kind and an open fd of it.
#[derive(Debug)]
pub struct Join {
    pub kind: LinuxNamespaceType,
    pub path: PathBuf,
    pub fd: OwnedFd,
}

/// What the container's namespaces are, resolved in the parent so that a
/// wrong path fails before anything is forked.
#[derive(Debug)]
pub struct NamespacePlan {
    /// Ordered: user first, mount last.
    pub join: Vec<Join>,
    pub new_user: bool,
    /// New namespaces other than user.
    pub new: CloneFlags,
    pub uid_map: Option<String>,
    pub gid_map: Option<String>,
}

impl Default for NamespacePlan {
    fn default() -> Self {
        NamespacePlan {
            join: Vec::new(),
            new_user: false,
            new: CloneFlags::empty(),
            uid_map: None,
            gid_map: None,
        }
    }
}

/// The order in which namespaces are joined: user first so that the others
/// (owned by it) can be joined with its capabilities; mount last because
/// joining it changes root and cwd.
const JOIN_ORDER: [LinuxNamespaceType; 8] = [
    LinuxNamespaceType::User,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Network,
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Cgroup,
    LinuxNamespaceType::Time,
    LinuxNamespaceType::Mount,
];

pub fn kind_name(kind: LinuxNamespaceType) -> &'static str {
    match kind {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

fn clone_flag(kind: LinuxNamespaceType) -> CloneFlags {
    match kind {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        // CLONE_NEWTIME (0x80) has no nix constant.
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    }
}

fn open_ns(kind: LinuxNamespaceType, path: &Path) -> Result<OwnedFd, NamespaceError> {
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|source| NamespaceError::Open {
            kind: kind_name(kind),
            path: path.to_owned(),
            source,
        })
}

fn id_map(maps: Option<&Vec<LinuxIdMapping>>) -> Option<String> {
    let maps = maps.filter(|m| !m.is_empty())?;
    Some(
        maps.iter()
            .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
            .collect(),
    )
}

impl NamespacePlan {
    /// The plan for a new container from `linux.namespaces`.
    pub fn for_create(linux: Option<&Linux>) -> Result<NamespacePlan, NamespaceError> {
        let mut plan = NamespacePlan::default();
        let Some(linux) = linux else {
            return Ok(plan);
        };
        let namespaces = linux.namespaces().as_deref().unwrap_or_default();
        for kind in JOIN_ORDER {
            let mut entries = namespaces.iter().filter(|n| n.typ() == kind);
            let Some(ns) = entries.next() else { continue };
            if entries.next().is_some() {
                return Err(NamespaceError::Invalid(format!(
                    "{} namespace listed twice",
                    kind_name(kind)
                )));
            }
            match ns.path() {
                Some(path) => plan.join.push(Join {
                    kind,
                    path: path.clone(),
                    fd: open_ns(kind, path)?,
                }),
                None if kind == LinuxNamespaceType::User => plan.new_user = true,
                None => plan.new |= clone_flag(kind),
            }
        }
        if plan.new_user {
            plan.uid_map = id_map(linux.uid_mappings().as_ref());
            plan.gid_map = id_map(linux.gid_mappings().as_ref());
            if plan.uid_map.is_none() || plan.gid_map.is_none() {
                return Err(NamespaceError::Invalid(
                    "a new user namespace needs uidMappings and gidMappings".into(),
                ));
            }
        }
        Ok(plan)
    }

    /// The plan for a process joining the running container `pid`: every
    /// namespace kind the container's spec lists, taken from
    /// `/proc/<pid>/ns/*`, except those the caller already shares.
    pub fn for_exec(pid: Pid, linux: Option<&Linux>) -> Result<NamespacePlan, NamespaceError> {
        let mut plan = NamespacePlan::default();
        let namespaces = linux
            .and_then(|l| l.namespaces().as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for kind in JOIN_ORDER {
            if !namespaces.iter().any(|n| n.typ() == kind) {
                continue;
            }
            let name = kind_name(kind);
            let path = PathBuf::from(format!("/proc/{pid}/ns/{name}"));
            let fd = open_ns(kind, &path)?;
            // Joining one's own user namespace is EINVAL; joining any other
            // namespace one is already in is a harmless no-op, skip it too.
            let ours = Path::new("/proc/self/ns").join(name);
            let same = match (
                std::fs::metadata(&ours),
                File::from(fd.try_clone().map_err(|source| NamespaceError::Open {
                    kind: name,
                    path: path.clone(),
                    source,
                })?)
                .metadata(),
            ) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                plan.join.push(Join { kind, path, fd });
            }
        }
        Ok(plan)
    }

    /// Whether the container process must be a child of a process that
    /// entered its namespaces first: a user namespace (made, with id maps
    /// written from outside, or joined), or a joined pid or a new time
    /// namespace, which apply to children only.
    pub fn needs_intermediate(&self) -> bool {
        self.new_user
            || self
                .new
                .contains(CloneFlags::from_bits_retain(libc::CLONE_NEWTIME))
            || self.join.iter().any(|j| {
                matches!(
                    j.kind,
                    LinuxNamespaceType::User | LinuxNamespaceType::Pid | LinuxNamespaceType::Time
                )
            })
    }

    pub fn creates(&self, flag: CloneFlags) -> bool {
        self.new.contains(flag)
    }

    pub fn joins(&self, kind: LinuxNamespaceType) -> bool {
        self.join.iter().any(|j| j.kind == kind)
    }

    /// Joins the namespaces given by path, in order.
    pub fn join_all(&self) -> Result<(), NamespaceError> {
        for j in &self.join {
            setns(j.fd.as_fd(), clone_flag(j.kind)).map_err(|errno| NamespaceError::Join {
                kind: kind_name(j.kind),
                path: j.path.clone(),
                errno,
            })?;
        }
        Ok(())
    }

    pub fn unshare_user(&self) -> Result<(), NamespaceError> {
        if self.new_user {
            unshare_flags(CloneFlags::CLONE_NEWUSER)?;
        }
        Ok(())
    }

    pub fn unshare_rest(&self) -> Result<(), NamespaceError> {
        if !self.new.is_empty() {
            unshare_flags(self.new)?;
        }
        Ok(())
    }

    /// The new namespaces but `already`: those a clone made (see
    /// `container::launch_direct`).
    pub fn unshare_rest_except(&self, already: CloneFlags) -> Result<(), NamespaceError> {
        let rest = self.new - already;
        if !rest.is_empty() {
            unshare_flags(rest)?;
        }
        Ok(())
    }

    /// Parent side: writes the id maps of the new user namespace of `pid`.
    pub fn write_id_maps(&self, pid: Pid) -> Result<(), NamespaceError> {
        if !self.new_user {
            return Ok(());
        }
        for (file, map) in [("uid_map", &self.uid_map), ("gid_map", &self.gid_map)] {
            if let Some(map) = map {
                let path = PathBuf::from(format!("/proc/{pid}/{file}"));
                std::fs::write(&path, map.as_bytes())
                    .map_err(|source| NamespaceError::IdMap { path, source })?;
            }
        }
        Ok(())
    }
}

fn unshare_flags(flags: CloneFlags) -> Result<(), NamespaceError> {
    unshare(flags).map_err(|errno| NamespaceError::Unshare {
        flags: flag_names(flags),
        errno,
    })
}

fn flag_names(flags: CloneFlags) -> String {
    const NAMES: [(CloneFlags, &str); 7] = [
        (CloneFlags::CLONE_NEWUSER, "user"),
        (CloneFlags::CLONE_NEWNS, "mnt"),
        (CloneFlags::CLONE_NEWPID, "pid"),
        (CloneFlags::CLONE_NEWNET, "net"),
        (CloneFlags::CLONE_NEWIPC, "ipc"),
        (CloneFlags::CLONE_NEWUTS, "uts"),
        (CloneFlags::CLONE_NEWCGROUP, "cgroup"),
    ];
    let mut names: Vec<&str> = NAMES
        .iter()
        .filter(|(f, _)| flags.contains(*f))
        .map(|(_, n)| *n)
        .collect();
    if flags.bits() & libc::CLONE_NEWTIME != 0 {
        names.push("time");
    }
    names.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxIdMappingBuilder, LinuxNamespaceBuilder};

    fn plan(namespaces: &[(LinuxNamespaceType, Option<&str>)]) -> NamespacePlan {
        let map = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(100_000u32)
            .size(65_536u32)
            .build()
            .unwrap();
        let linux = LinuxBuilder::default()
            .namespaces(
                namespaces
                    .iter()
                    .map(|(kind, path)| {
                        let b = LinuxNamespaceBuilder::default().typ(*kind);
                        match path {
                            Some(p) => b.path(*p),
                            None => b,
                        }
                        .build()
                        .unwrap()
                    })
                    .collect::<Vec<_>>(),
            )
            .uid_mappings(vec![map])
            .gid_mappings(vec![map])
            .build()
            .unwrap();
        NamespacePlan::for_create(Some(&linux)).unwrap()
    }

    #[test]
    fn only_user_joined_pid_and_time_namespaces_need_the_intermediate_process() {
        use LinuxNamespaceType::*;
        let own = [(Pid, None), (Mount, None), (Uts, None), (Ipc, None)];
        assert!(!plan(&own).needs_intermediate());
        // A kubelet pod's container: the pod's network, ipc and uts joined.
        let pod = [
            (Pid, None),
            (Mount, None),
            (Network, Some("/proc/self/ns/net")),
            (Ipc, Some("/proc/self/ns/ipc")),
            (Uts, Some("/proc/self/ns/uts")),
        ];
        assert!(!plan(&pod).needs_intermediate());
        assert!(plan(&[(Mount, None), (User, None)]).needs_intermediate());
        assert!(plan(&[(Mount, None), (User, Some("/proc/self/ns/user"))]).needs_intermediate());
        assert!(plan(&[(Mount, None), (Pid, Some("/proc/self/ns/pid"))]).needs_intermediate());
        assert!(plan(&[(Mount, None), (Time, None)]).needs_intermediate());
    }
}
