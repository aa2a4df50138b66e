//! Pod networking. For now: whether the node's pod network is ready, which
//! kubelet reads from `Status` to decide whether the node may run pods.

pub mod cni_config;

use crate::config::{NetworkConfig, NetworkMode};

/// A CRI runtime condition's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

impl Readiness {
    pub fn ready() -> Self {
        Readiness {
            ready: true,
            reason: String::new(),
            message: String::new(),
        }
    }

    pub fn not_ready(reason: &str, message: String) -> Self {
        Readiness {
            ready: false,
            reason: reason.to_string(),
            message,
        }
    }
}

/// The reason kubelet knows for a network that is not ready.
const NOT_READY: &str = "NetworkPluginNotReady";

/// Whether pods can get a network: a valid CNI configuration whose plugins
/// are all installed, or the built-in network.
pub fn readiness(config: &NetworkConfig) -> Readiness {
    let (networks, skipped) = match cni_config::discover(&config.cni_conf_dir) {
        Ok(found) => found,
        Err(e) => return Readiness::not_ready(NOT_READY, e.to_string()),
    };
    let use_cni = match config.mode {
        NetworkMode::Cni => true,
        NetworkMode::Builtin => false,
        NetworkMode::Auto => !networks.is_empty(),
    };
    if !use_cni {
        return Readiness::not_ready(
            NOT_READY,
            format!(
                "berth's built-in pod network is not implemented yet and no CNI configuration was found in {}",
                config.cni_conf_dir.display()
            ),
        );
    }
    let Some(network) = networks.first() else {
        let mut message = format!(
            "no valid CNI configuration in {}",
            config.cni_conf_dir.display()
        );
        if let Some(first) = skipped.first() {
            message.push_str(&format!(" ({first})"));
        }
        return Readiness::not_ready(NOT_READY, message);
    };
    let missing = network.missing_plugins(&config.cni_bin_dirs);
    if !missing.is_empty() {
        let dirs: Vec<String> = config
            .cni_bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        return Readiness::not_ready(
            NOT_READY,
            format!(
                "CNI network {:?} ({}) needs plugins not found in {}: {}",
                network.name,
                network.path.display(),
                dirs.join(", "),
                missing.join(", ")
            ),
        );
    }
    Readiness::ready()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(conf: &std::path::Path, bin: &std::path::Path, mode: NetworkMode) -> NetworkConfig {
        NetworkConfig {
            mode,
            cni_conf_dir: conf.to_path_buf(),
            cni_bin_dirs: vec![bin.to_path_buf()],
            ..NetworkConfig::default()
        }
    }

    #[test]
    fn cni_network_is_ready_only_with_all_its_plugins() {
        let conf = tempfile::tempdir().expect("tempdir");
        let bin = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            conf.path().join("10-pods.conflist"),
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .expect("write");
        let bridge = bin.path().join("bridge");
        std::fs::write(&bridge, b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&bridge, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        let state = readiness(&config(conf.path(), bin.path(), NetworkMode::Auto));
        assert!(!state.ready);
        assert_eq!(state.reason, NOT_READY);
        assert!(state.message.contains("portmap"), "{}", state.message);

        let portmap = bin.path().join("portmap");
        std::fs::copy(&bridge, &portmap).expect("copy");
        assert!(readiness(&config(conf.path(), bin.path(), NetworkMode::Auto)).ready);
        assert!(readiness(&config(conf.path(), bin.path(), NetworkMode::Cni)).ready);
    }

    #[test]
    fn cni_mode_without_config_is_not_ready() {
        let conf = tempfile::tempdir().expect("tempdir");
        let state = readiness(&config(conf.path(), conf.path(), NetworkMode::Cni));
        assert!(!state.ready);
        assert!(
            state.message.contains("no valid CNI configuration"),
            "{}",
            state.message
        );
    }

    #[test]
    fn builtin_network_is_not_claimed_before_it_exists() {
        let conf = tempfile::tempdir().expect("tempdir");
        let state = readiness(&config(conf.path(), conf.path(), NetworkMode::Builtin));
        assert!(!state.ready);
        assert!(state.message.contains("built-in"), "{}", state.message);
    }
}
