//! Sysctls a container may set: only those the kernel scopes to a namespace
//! the container owns (the list Kubernetes and runc use). Anything else would
//! change the host and is refused before the container is created.

use std::collections::HashMap;
use std::path::PathBuf;

use nix::sched::CloneFlags;

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl {key:?} is not namespaced and would change the host: refused")]
    NotNamespaced { key: String },
    #[error("sysctl {key:?} needs a new {ns} namespace, the container shares the host's")]
    SharedNamespace { key: String, ns: &'static str },
    #[error("sysctl {key:?} is not a valid name")]
    BadName { key: String },
    #[error("set sysctl {key} to {value:?} (write {path}): {source}")]
    Write {
        key: String,
        value: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The namespace that scopes `key`, or `None` when the key is host-wide.
fn namespace_of(key: &str) -> Option<(CloneFlags, &'static str)> {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        Some((CloneFlags::CLONE_NEWIPC, "ipc"))
    } else if key.starts_with("net.") {
        Some((CloneFlags::CLONE_NEWNET, "net"))
    } else if key == "kernel.hostname" || key == "kernel.domainname" {
        Some((CloneFlags::CLONE_NEWUTS, "uts"))
    } else {
        None
    }
}

/// Validates the spec's sysctls against the namespaces the container gets
/// (`owned`: the new or joined namespaces; a joined one is a pod's, not the
/// host's) and returns them as (key, value, /proc/sys path).
pub fn plan(
    sysctls: Option<&HashMap<String, String>>,
    owned: CloneFlags,
) -> Result<Vec<(String, String, PathBuf)>, SysctlError> {
    let mut out = Vec::new();
    let Some(sysctls) = sysctls else {
        return Ok(out);
    };
    let mut keys: Vec<&String> = sysctls.keys().collect();
    keys.sort();
    for key in keys {
        let value = &sysctls[key];
        // Keys may use '/' as separator (sysctl(8) accepts both).
        let normalized = key.replace('/', ".");
        if normalized.is_empty()
            || normalized
                .split('.')
                .any(|c| c.is_empty() || c == ".." || c.contains('\0'))
        {
            return Err(SysctlError::BadName { key: key.clone() });
        }
        let Some((flag, ns)) = namespace_of(&normalized) else {
            return Err(SysctlError::NotNamespaced { key: key.clone() });
        };
        if !owned.contains(flag) {
            return Err(SysctlError::SharedNamespace {
                key: key.clone(),
                ns,
            });
        }
        let path = PathBuf::from("/proc/sys").join(normalized.replace('.', "/"));
        out.push((key.clone(), value.clone(), path));
    }
    Ok(out)
}

/// Writes the sysctls; runs in the container after pivot_root, so
/// `/proc/sys` is the container's.
pub fn apply(sysctls: &[(String, String, PathBuf)]) -> Result<(), SysctlError> {
    for (key, value, path) in sysctls {
        std::fs::write(path, value.as_bytes()).map_err(|source| SysctlError::Write {
            key: key.clone(),
            value: value.clone(),
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn namespaced_sysctls_are_accepted() {
        let all = CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC;
        let s = map(&[
            ("net.ipv4.ip_forward", "1"),
            ("kernel.shmmax", "1000"),
            ("fs.mqueue.msg_max", "20"),
        ]);
        let plan = plan(Some(&s), all).unwrap();
        assert_eq!(plan.len(), 3);
        assert!(
            plan.iter()
                .any(|(_, _, p)| p == &PathBuf::from("/proc/sys/net/ipv4/ip_forward"))
        );
    }

    #[test]
    fn host_sysctls_are_refused() {
        let s = map(&[("kernel.panic", "1")]);
        let err = plan(Some(&s), CloneFlags::all()).unwrap_err();
        assert!(err.to_string().contains("not namespaced"), "{err}");
        let s = map(&[("vm.overcommit_memory", "1")]);
        assert!(plan(Some(&s), CloneFlags::all()).is_err());
    }

    #[test]
    fn net_sysctl_in_host_network_is_refused() {
        let s = map(&[("net.ipv4.ip_forward", "1")]);
        let err = plan(Some(&s), CloneFlags::CLONE_NEWIPC).unwrap_err();
        assert!(err.to_string().contains("net namespace"), "{err}");
    }

    #[test]
    fn dotdot_names_are_refused() {
        let s = map(&[("net/../../kernel/panic", "1")]);
        assert!(plan(Some(&s), CloneFlags::all()).is_err());
    }
}
