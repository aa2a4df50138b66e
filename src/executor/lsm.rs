//! Linux security modules the spec may name: AppArmor and SELinux.
//!
//! AppArmor: the profile must already be loaded (the daemon loads its
//! default one, `container::apparmor`); the container's process asks the
//! kernel to enter it at its next `execve`, as runc's `ApplyProfile` does,
//! while it still runs as root with all capabilities. A spec that names a
//! profile on a host without AppArmor fails before anything is forked.
//! SELinux: a label on a host without SELinux is ignored with a warning (as
//! containerd does); berth does not apply SELinux labels.

use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LsmError {
    #[error("apparmor profile {profile:?} requested but this host has no apparmor enabled")]
    NoAppArmor { profile: String },
    #[error(
        "apparmor profile {profile:?} is not loaded in the kernel (load it with apparmor_parser)"
    )]
    NotLoaded { profile: String },
    #[error("apply apparmor profile {profile:?} (write {path}): {source}")]
    Apply {
        profile: String,
        path: &'static str,
        source: std::io::Error,
    },
}

/// Where a process sets the profile of its next `execve`: the per-LSM file
/// (Linux 5.8 and later, works beside other LSMs), then the shared one.
const EXEC_ATTR_PATHS: [&str; 2] = [
    "/proc/thread-self/attr/apparmor/exec",
    "/proc/self/attr/exec",
];

pub fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .map(|s| s.trim_start().starts_with('Y'))
        .unwrap_or(false)
}

fn selinux_enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

/// Checks the process's LSM settings before anything is forked. Returns
/// the AppArmor profile the process must enter, if any.
pub fn check(
    apparmor_profile: Option<&str>,
    selinux_label: Option<&str>,
) -> Result<Option<String>, LsmError> {
    let profile = apparmor_to_apply(apparmor_profile, apparmor_enabled())?;
    if let Some(label) = selinux_label.filter(|l| !l.is_empty()) {
        if selinux_enabled() {
            tracing::warn!(
                label,
                "selinux label requested: berth does not apply selinux labels yet"
            );
        } else {
            tracing::warn!(label, "selinux label ignored: this host has no selinux");
        }
    }
    Ok(profile)
}

fn apparmor_to_apply(profile: Option<&str>, enabled: bool) -> Result<Option<String>, LsmError> {
    let Some(profile) = profile.filter(|p| !p.is_empty() && *p != "unconfined") else {
        return Ok(None);
    };
    if !enabled {
        return Err(LsmError::NoAppArmor {
            profile: profile.to_owned(),
        });
    }
    Ok(Some(profile.to_owned()))
}

/// What the kernel expects in the exec attribute to change profile on exec.
fn exec_attr_value(profile: &str) -> String {
    format!("exec {profile}")
}

/// Makes this process enter `profile` at its next `execve`. Runs in the
/// container's process, where `/proc` is the container's own.
pub fn apply_apparmor_on_exec(profile: &str) -> Result<(), LsmError> {
    let value = exec_attr_value(profile);
    let mut missing = None;
    for path in EXEC_ATTR_PATHS {
        // Only a missing file sends us to the next path: the kernel answers
        // a write naming a profile it does not have with ENOENT too.
        let mut file = match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing = Some((path, e));
                continue;
            }
            Err(source) => return Err(apply_error(profile, path, source)),
        };
        return file
            .write_all(value.as_bytes())
            .map_err(|source| apply_error(profile, path, source));
    }
    let (path, source) = missing.unwrap_or((
        EXEC_ATTR_PATHS[1],
        std::io::Error::from(std::io::ErrorKind::NotFound),
    ));
    Err(LsmError::Apply {
        profile: profile.to_owned(),
        path,
        source,
    })
}

/// The error for a failed write of `path`: ENOENT from the write itself
/// means the kernel has no profile of that name.
fn apply_error(profile: &str, path: &'static str, source: std::io::Error) -> LsmError {
    if source.kind() == std::io::ErrorKind::NotFound {
        LsmError::NotLoaded {
            profile: profile.to_owned(),
        }
    } else {
        LsmError::Apply {
            profile: profile.to_owned(),
            path,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_profile_and_unconfined_need_nothing_even_without_apparmor() {
        for p in [None, Some(""), Some("unconfined")] {
            assert_eq!(apparmor_to_apply(p, false).unwrap(), None, "{p:?}");
            assert_eq!(apparmor_to_apply(p, true).unwrap(), None, "{p:?}");
        }
    }

    #[test]
    fn a_profile_is_applied_with_apparmor_and_refused_without() {
        assert_eq!(
            apparmor_to_apply(Some("berth-default"), true).unwrap(),
            Some("berth-default".to_string())
        );
        let err = apparmor_to_apply(Some("berth-default"), false).unwrap_err();
        assert!(err.to_string().contains("no apparmor enabled"), "{err}");
    }

    #[test]
    fn enoent_from_the_write_means_the_profile_is_not_loaded() {
        let err = apply_error(
            "p1",
            EXEC_ATTR_PATHS[0],
            std::io::Error::from_raw_os_error(2),
        );
        assert_eq!(
            err.to_string(),
            r#"apparmor profile "p1" is not loaded in the kernel (load it with apparmor_parser)"#
        );
        let err = apply_error(
            "p1",
            EXEC_ATTR_PATHS[0],
            std::io::Error::from_raw_os_error(1),
        );
        assert!(
            err.to_string().starts_with(
                r#"apply apparmor profile "p1" (write /proc/thread-self/attr/apparmor/exec): "#
            ),
            "{err}"
        );
    }

    #[test]
    fn the_exec_attribute_names_the_profile_after_exec() {
        assert_eq!(exec_attr_value("berth-default"), "exec berth-default");
    }
}

#[cfg(test)]
#[path = "lsm/kernel_tests.rs"]
mod kernel_tests;
