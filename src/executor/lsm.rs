//! Linux security modules the spec may name: AppArmor and SELinux. berth
//! applies neither profile yet; what it guarantees is that a spec asking for
//! AppArmor on a host without it fails clearly, and that an SELinux label on a
//! host without SELinux is ignored with a warning (as containerd does).

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LsmError {
    #[error("apparmor profile {profile:?} requested but this host has no apparmor enabled")]
    NoAppArmor { profile: String },
    #[error(
        "apparmor profile {profile:?} requested: applying apparmor profiles is not supported yet"
    )]
    AppArmorUnsupported { profile: String },
}

fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .map(|s| s.trim_start().starts_with('Y'))
        .unwrap_or(false)
}

fn selinux_enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

/// Checks the process's LSM settings before anything is forked.
pub fn check(apparmor_profile: Option<&str>, selinux_label: Option<&str>) -> Result<(), LsmError> {
    if let Some(profile) = apparmor_profile.filter(|p| !p.is_empty() && *p != "unconfined") {
        if !apparmor_enabled() {
            return Err(LsmError::NoAppArmor {
                profile: profile.to_owned(),
            });
        }
        return Err(LsmError::AppArmorUnsupported {
            profile: profile.to_owned(),
        });
    }
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
    Ok(())
}
