//! Cgroup names: kubelet's `cgroup_parent` plus a container ID become one
//! relative path, the same in every hierarchy.
//!
//! kubelet sends the parent in the form of its `--cgroup-driver`:
//! `/kubepods/burstable/pod<uid>` for cgroupfs, `kubepods-burstable-pod<uid>.slice`
//! for systemd. berth has no systemd to talk to, so the systemd driver only
//! borrows systemd's naming (a slice name expands to its nested directories,
//! containers are `cri-berth-<id>.scope`) and writes cgroupfs directly: nothing
//! is registered over D-Bus, and on a host where systemd is PID 1 systemd does
//! not know these units.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{CgroupDriver, CgroupError};

/// Prefix of a container's scope under the systemd driver, as containerd's
/// `cri-containerd-<id>.scope`.
const SCOPE_PREFIX: &str = "cri-berth-";

/// Where pods go when kubelet gives no parent (crictl without one).
const DEFAULT_CGROUPFS_PARENT: &str = "/berth";
const DEFAULT_SYSTEMD_PARENT: &str = "berth.slice";

/// A cgroup path relative to the root of every hierarchy: no leading `/`,
/// no `.` or `..` components, no empty components. Only [`CgroupPath::parse`]
/// and the naming functions below make one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// A plain cgroupfs path: `/a/b/c` or `a/b/c`. Repeated slashes are
    /// collapsed; `.` and `..` are refused so that the path cannot leave the
    /// hierarchy it is joined to.
    pub fn parse(path: &str) -> Result<CgroupPath, CgroupError> {
        let invalid = |reason: &str| CgroupError::InvalidPath {
            path: path.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = Vec::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            check_component(part).map_err(invalid)?;
            parts.push(part);
        }
        if parts.is_empty() {
            return Err(invalid("it names the root cgroup"));
        }
        Ok(CgroupPath(parts.join("/")))
    }

    /// The path below a hierarchy's mount point.
    pub fn under(&self, mount: &Path) -> PathBuf {
        mount.join(&self.0)
    }

    /// The relative path, without a leading `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    fn child(&self, name: &str) -> CgroupPath {
        CgroupPath(format!("{}/{name}", self.0))
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0)
    }
}

/// The pod's cgroup from kubelet's `cgroup_parent`.
pub fn pod_path(driver: CgroupDriver, parent: &str) -> Result<CgroupPath, CgroupError> {
    match driver {
        CgroupDriver::Cgroupfs => CgroupPath::parse(if parent.is_empty() {
            DEFAULT_CGROUPFS_PARENT
        } else {
            parent
        }),
        CgroupDriver::Systemd => expand_slice(if parent.is_empty() {
            DEFAULT_SYSTEMD_PARENT
        } else {
            parent
        }),
    }
}

/// A container's cgroup: `<parent>/<id>` (cgroupfs) or
/// `<expanded slice>/cri-berth-<id>.scope` (systemd).
pub fn container_path(
    driver: CgroupDriver,
    parent: &str,
    id: &str,
) -> Result<CgroupPath, CgroupError> {
    check_component(id).map_err(|reason| CgroupError::InvalidId {
        id: id.to_string(),
        reason: reason.to_string(),
    })?;
    let pod = pod_path(driver, parent)?;
    Ok(match driver {
        CgroupDriver::Cgroupfs => pod.child(id),
        CgroupDriver::Systemd => pod.child(&format!("{SCOPE_PREFIX}{id}.scope")),
    })
}

/// systemd's slice naming: `a-b-c.slice` lives at
/// `a.slice/a-b.slice/a-b-c.slice`; `-.slice` is the root slice. The same
/// rules as systemd's `unit_name_is_valid` for slices and runc's
/// `ExpandSlice`.
fn expand_slice(slice: &str) -> Result<CgroupPath, CgroupError> {
    let invalid = |reason: &str| CgroupError::InvalidPath {
        path: slice.to_string(),
        reason: reason.to_string(),
    };
    let Some(name) = slice.strip_suffix(".slice") else {
        return Err(invalid(
            "the systemd cgroup driver needs a slice name such as kubepods-burstable-pod<uid>.slice",
        ));
    };
    if slice.contains('/') {
        return Err(invalid("a systemd slice name has no '/'"));
    }
    if name == "-" {
        return Err(invalid("it names the root slice"));
    }
    if name.is_empty() || name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err(invalid("empty part in the slice name"));
    }
    check_component(slice).map_err(invalid)?;
    let mut dirs: Vec<String> = Vec::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        dirs.push(format!("{prefix}.slice"));
    }
    Ok(CgroupPath(dirs.join("/")))
}

/// One directory name inside a hierarchy.
fn check_component(part: &str) -> Result<(), &'static str> {
    if part.is_empty() {
        Err("empty name")
    } else if part == "." || part == ".." {
        Err("'.' and '..' are not allowed")
    } else if part.contains('/') {
        Err("'/' is not allowed in a name")
    } else if part.contains('\0') || part.contains('\n') {
        Err("control characters are not allowed")
    } else if part.len() > 255 {
        Err("name longer than 255 bytes")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b4ba1c4-8f3e-4f59-9e5e-6c8c2f0c6b1d";
    const UID_SYSTEMD: &str = "0b4ba1c4_8f3e_4f59_9e5e_6c8c2f0c6b1d";

    #[test]
    fn cgroupfs_parent_from_kubelet_is_a_plain_path() {
        let parent = format!("/kubepods/burstable/pod{UID}");
        let pod = pod_path(CgroupDriver::Cgroupfs, &parent).expect("pod");
        assert_eq!(pod.as_str(), format!("kubepods/burstable/pod{UID}"));
        assert_eq!(pod.to_string(), parent);
        let ctr = container_path(CgroupDriver::Cgroupfs, &parent, "abc123").expect("ctr");
        assert_eq!(ctr.as_str(), format!("kubepods/burstable/pod{UID}/abc123"));
        // Guaranteed pods sit directly under kubepods.
        let ctr = container_path(CgroupDriver::Cgroupfs, &format!("/kubepods/pod{UID}"), "c")
            .expect("guaranteed");
        assert_eq!(ctr.as_str(), format!("kubepods/pod{UID}/c"));
        assert_eq!(
            ctr.under(Path::new("/sys/fs/cgroup/memory")),
            PathBuf::from(format!("/sys/fs/cgroup/memory/kubepods/pod{UID}/c"))
        );
    }

    #[test]
    fn cgroupfs_collapses_slashes_and_accepts_relative_parents() {
        let pod = pod_path(CgroupDriver::Cgroupfs, "kubepods//besteffort/").expect("pod");
        assert_eq!(pod.as_str(), "kubepods/besteffort");
    }

    #[test]
    fn systemd_slice_expands_to_nested_slices_and_a_scope() {
        let parent = format!("kubepods-burstable-pod{UID_SYSTEMD}.slice");
        let pod = pod_path(CgroupDriver::Systemd, &parent).expect("pod");
        assert_eq!(
            pod.as_str(),
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
            )
        );
        let ctr = container_path(CgroupDriver::Systemd, &parent, "abc123").expect("ctr");
        assert_eq!(
            ctr.as_str(),
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-berth-abc123.scope"
            )
        );
        let guaranteed = pod_path(
            CgroupDriver::Systemd,
            &format!("kubepods-pod{UID_SYSTEMD}.slice"),
        )
        .expect("guaranteed");
        assert_eq!(
            guaranteed.as_str(),
            format!("kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice")
        );
        assert_eq!(
            pod_path(CgroupDriver::Systemd, "kubepods.slice")
                .expect("top")
                .as_str(),
            "kubepods.slice"
        );
    }

    #[test]
    fn empty_parent_uses_the_default() {
        assert_eq!(
            container_path(CgroupDriver::Cgroupfs, "", "c")
                .expect("c")
                .as_str(),
            "berth/c"
        );
        assert_eq!(
            container_path(CgroupDriver::Systemd, "", "c")
                .expect("c")
                .as_str(),
            "berth.slice/cri-berth-c.scope"
        );
    }

    #[test]
    fn escapes_are_refused() {
        for parent in ["/kubepods/../../etc", "..", "/kubepods/./x", "/", "a/\0b"] {
            let err = pod_path(CgroupDriver::Cgroupfs, parent).expect_err(parent);
            assert!(err.to_string().contains("invalid cgroup path"), "{err}");
        }
        for id in ["..", ".", "a/b", "", "../../x"] {
            let err = container_path(CgroupDriver::Cgroupfs, "/kubepods", id).expect_err(id);
            assert!(err.to_string().contains("container id"), "{err}");
        }
    }

    #[test]
    fn malformed_slices_are_refused() {
        for parent in [
            "/kubepods/burstable",
            "kubepods.slice/x.slice",
            "kubepods--x.slice",
            "-kubepods.slice",
            "kubepods-.slice",
            "-.slice",
            ".slice",
        ] {
            let err = pod_path(CgroupDriver::Systemd, parent).expect_err(parent);
            assert!(err.to_string().contains(parent), "{err}");
        }
    }
}
