//! berth's default AppArmor profile (`runtime/default`): written out and
//! loaded with `apparmor_parser` the first time a container needs it and
//! the kernel does not have it, as containerd does with its
//! `cri-containerd.apparmor.d`.
//!
//! The rules are those of the default profile Docker, containerd and CRI-O
//! share (moby's `profiles/apparmor` template): everything but mounts,
//! writes to most of `/proc` and `/sys`, and reads of the kernel's secrets;
//! signals and ptrace only among the profile's own processes and from
//! unconfined ones (berth's monitor). ABI 3.0 is named when the host knows
//! it, because from ABI 4.0 on `network,` no longer includes unix sockets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum AppArmorError {
    #[error("read the loaded apparmor profiles from {path}: {source}")]
    ReadLoaded {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "load apparmor profile {profile:?}: apparmor_parser not found (install the apparmor package)"
    )]
    NoParser { profile: String },
    #[error("load apparmor profile {profile:?}: run apparmor_parser: {source}")]
    Run {
        profile: String,
        source: std::io::Error,
    },
    #[error("load apparmor profile {profile:?}: apparmor_parser failed ({status}): {stderr}")]
    Parser {
        profile: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Where the host's profile includes live.
const APPARMOR_D: &str = "/etc/apparmor.d";

/// The profile text for `name`, with the includes that exist under
/// `apparmor_d` (a host without `tunables/global` gets `@{PROC}` defined
/// here, as moby does).
pub fn default_profile(name: &str, apparmor_d: &Path) -> String {
    let has = |include: &str| apparmor_d.join(include).exists();
    let mut out = String::new();
    if has("abi/3.0") {
        out.push_str("abi <abi/3.0>,\n\n");
    }
    if has("tunables/global") {
        out.push_str("#include <tunables/global>\n\n");
    } else {
        out.push_str("@{PROC}=/proc/\n\n");
    }
    out.push_str(&format!(
        "profile {name} flags=(attach_disconnected,mediate_deleted) {{\n"
    ));
    if has("abstractions/base") {
        out.push_str("  #include <abstractions/base>\n\n");
    }
    out.push_str(&format!(
        r#"  network,
  capability,
  file,
  umount,
  # berth's monitor and daemon run unconfined.
  signal (receive) peer=unconfined,
  signal (send,receive) peer={name},
  ptrace (trace,read,tracedby,readby) peer={name},

  # No writes directly in /proc, nor below it outside /proc/<pid> and
  # /proc/sys; of /proc/sys only kernel/shm*.
  deny @{{PROC}}/* w,
  deny @{{PROC}}/{{[^1-9/],[^1-9/][^0-9/],[^1-9s/][^0-9y/][^0-9s/],[^1-9/][^0-9/][^0-9/][^0-9/]*}}/** w,
  deny @{{PROC}}/sys/[^k]** w,
  deny @{{PROC}}/sys/kernel/{{?,??,[^s][^h][^m]**}} w,
  deny @{{PROC}}/sysrq-trigger rwklx,
  deny @{{PROC}}/kcore rwklx,

  deny mount,

  # /sys is read-only but for /sys/fs/cgroup; some of it not even readable.
  deny /sys/[^f]*/** wklx,
  deny /sys/f[^s]*/** wklx,
  deny /sys/fs/[^c]*/** wklx,
  deny /sys/fs/c[^g]*/** wklx,
  deny /sys/fs/cg[^r]*/** wklx,
  deny /sys/firmware/** rwklx,
  deny /sys/devices/virtual/powercap/** rwklx,
  deny /sys/kernel/security/** rwklx,
}}
"#
    ));
    out
}

/// Whether `loaded` (the kernel's profile list: `name (mode)` per line)
/// has `name`.
fn is_loaded(loaded: &str, name: &str) -> bool {
    loaded.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(" ("))
    })
}

/// Loads the default profile `name` unless `profiles` (the kernel's list)
/// already has it. Blocking.
pub fn ensure_default_profile(name: &str, profiles: &Path) -> Result<(), AppArmorError> {
    let loaded = std::fs::read_to_string(profiles).map_err(|source| AppArmorError::ReadLoaded {
        path: profiles.to_path_buf(),
        source,
    })?;
    if is_loaded(&loaded, name) {
        return Ok(());
    }
    let text = default_profile(name, Path::new(APPARMOR_D));
    let run_err = |source| AppArmorError::Run {
        profile: name.to_owned(),
        source,
    };
    // -K: no cache (the profile is written here, not installed); -r: replace.
    let mut child = match Command::new("apparmor_parser")
        .arg("-Kr")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AppArmorError::NoParser {
                profile: name.to_owned(),
            });
        }
        Err(e) => return Err(run_err(e)),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).map_err(run_err)?;
    }
    let out = child.wait_with_output().map_err(run_err)?;
    if !out.status.success() {
        return Err(AppArmorError::Parser {
            profile: name.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_profiles_match_by_whole_name() {
        let loaded = "berth-default (enforce)\nother-berth-default (complain)\n";
        assert!(is_loaded(loaded, "berth-default"));
        assert!(!is_loaded(loaded, "berth"));
        assert!(!is_loaded("berth-default-2 (enforce)\n", "berth-default"));
    }

    #[test]
    fn profile_uses_the_includes_the_host_has() {
        let bare = tempfile::tempdir().unwrap();
        let text = default_profile("berth-default", bare.path());
        assert!(text.starts_with("@{PROC}=/proc/\n"), "{text}");
        assert!(!text.contains("#include"), "{text}");
        assert!(!text.contains("abi <"), "{text}");

        let full = tempfile::tempdir().unwrap();
        for f in ["abi/3.0", "tunables/global", "abstractions/base"] {
            let path = full.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "").unwrap();
        }
        let text = default_profile("berth-default", full.path());
        assert!(text.starts_with("abi <abi/3.0>,\n"), "{text}");
        assert!(text.contains("#include <tunables/global>"), "{text}");
        assert!(text.contains("  #include <abstractions/base>"), "{text}");
        assert!(!text.contains("@{PROC}=/proc/"), "{text}");
    }

    #[test]
    fn profile_confines_its_own_signals_and_denies_mounts() {
        let text = default_profile("p1", Path::new("/nonexistent"));
        assert!(text.contains("profile p1 flags=(attach_disconnected,mediate_deleted) {"));
        assert!(text.contains("signal (send,receive) peer=p1,"));
        assert!(text.contains("  deny mount,\n"));
        assert!(text.contains("deny @{PROC}/kcore rwklx,"));
        // Braces balance: the format escapes did not leak.
        assert_eq!(
            text.matches('{').count(),
            text.matches('}').count(),
            "{text}"
        );
    }

    #[test]
    fn missing_profile_list_is_a_clear_error() {
        let err = ensure_default_profile("p1", Path::new("/nonexistent/profiles")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/profiles"), "{err}");
    }
}
