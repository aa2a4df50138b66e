//! Pod networking: a pod's network namespace gets its interface, addresses
//! and routes either from the node's CNI network (plugins executed as the
//! CNI spec says, results cached on disk as libcni does) or from berth's
//! built-in bridge network (netlink, nftables, IPAM in the store).
//!
//! What a reader must know before changing it: the daemon's tokio workers
//! stay in the host's network namespace. Work inside a pod's namespace runs
//! on a dedicated thread that `setns`-es there and exits ([`netns`]); never
//! call `setns` on a runtime thread.
//!
//! Ownership: the CNI result cache file owns what the plugins made for a pod
//! (DEL runs from it); the built-in network's store record owns the pod's
//! veth, addresses and nftables chain. Both are written before the objects
//! are made, and removed only after the objects are gone.

pub mod bandwidth;
mod builtin;
pub mod cni;
pub mod cni_config;
pub mod ipam;
pub mod netns;
pub mod nft;
mod tbf;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{NetworkConfig, NetworkMode};
use crate::store::{Store, StoreError};

pub use builtin::host_veth_name as builtin_host_veth_name;
pub use cni::CniError;

/// The interface name a pod's network gets inside its namespace.
pub const POD_INTERFACE: &str = "eth0";

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

/// What the sandbox module asks for one pod.
#[derive(Debug, Clone, Default)]
pub struct PodNetworkRequest {
    /// The sandbox ID (`CNI_CONTAINERID`, `K8S_POD_INFRA_CONTAINER_ID`).
    pub pod_id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The bind-mounted pin of the pod's network namespace.
    pub netns: PathBuf,
    pub port_mappings: Vec<PortMapping>,
    pub dns: Option<DnsConfig>,
    pub bandwidth: Option<Bandwidth>,
    /// As kubelet passed it; given to CNI plugins as the `cgroupPath`
    /// capability.
    pub cgroup_parent: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One `hostPort` of the pod. A `host_port` of 0 means none (kubelet sends
/// container ports without a host port too); such mappings are skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub protocol: Protocol,
    pub container_port: u16,
    pub host_port: u16,
    /// Empty (or `0.0.0.0`, `::`) means every address of the host.
    #[serde(default)]
    pub host_ip: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// Traffic shaping of the pod, in bits per second and bits (the CNI
/// `bandwidth` capability's units; see [`bandwidth`]). A rate of 0 leaves
/// that direction alone. CNI plugins that ask for the capability apply it;
/// the built-in network applies it with TBF qdiscs ([`tbf`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bandwidth {
    pub ingress_rate: u64,
    pub ingress_burst: u64,
    pub egress_rate: u64,
    pub egress_burst: u64,
}

/// What a pod got.
#[derive(Debug, Clone, PartialEq)]
pub struct PodNetworkStatus {
    /// The primary IP first (IPv4 when there is one), then the others.
    pub ips: Vec<IpAddr>,
    pub interface: String,
    /// The CNI result, or a description of the built-in attachment, for
    /// `PodSandboxStatus` verbose info.
    pub result: serde_json::Value,
}

/// Counters of one interface in a pod's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceStats {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error("pod network for {pod_id}: {message}")]
    InvalidRequest { pod_id: String, message: String },
    #[error("no valid CNI configuration in {dir}{detail}")]
    NoCniConfig { dir: PathBuf, detail: String },
    #[error("{op}: netlink: {error}")]
    Netlink { op: String, error: rtnetlink::Error },
    #[error("{op} in network namespace {path}: {error}")]
    Netns {
        op: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("nftables table {table}: {message}")]
    Nft { table: String, message: String },
    #[error("write sysctl {path}: {error}")]
    Sysctl {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("built-in network IPAM: no free address left in {cidr}")]
    Exhausted { cidr: ipnet::IpNet },
    #[error("built-in network IPAM: {0}")]
    Store(#[from] StoreError),
    #[error("built-in network: {0}")]
    Builtin(String),
}

/// The reason kubelet knows for a network that is not ready.
const NOT_READY: &str = "NetworkPluginNotReady";

/// The node's pod network, shared by all pods (`Arc<Network>`).
pub struct Network {
    config: NetworkConfig,
    cni: cni::Cni,
    builtin: builtin::Builtin,
    /// kubelet's pod CIDRs (`UpdateRuntimeConfig`); empty until it sends
    /// some, and the configured `pod_cidr` is used meanwhile.
    pod_cidrs: RwLock<Vec<ipnet::IpNet>>,
    /// The CNI network in use, reloaded when its directory or file changes.
    cni_state: Mutex<CniConfigState>,
}

#[derive(Default)]
struct CniConfigState {
    dir_mtime: Option<SystemTime>,
    file_mtime: Option<SystemTime>,
    list: Option<cni_config::NetworkList>,
    detail: String,
}

impl Network {
    /// `root` holds the CNI result cache (`<root>/cni/results`, which must
    /// survive daemon restarts); `state` is the daemon's run directory;
    /// `store` keeps the built-in network's address allocations.
    pub fn new(
        config: &NetworkConfig,
        root: &Path,
        _state: &Path,
        store: Store,
    ) -> Result<Network, NetworkError> {
        let cni = cni::Cni::new(
            root.join("cni"),
            config.cni_bin_dirs.clone(),
            Duration::from_secs(config.plugin_timeout_secs),
        );
        let builtin = builtin::Builtin::new(config, store);
        Ok(Network {
            config: config.clone(),
            cni,
            builtin,
            pod_cidrs: RwLock::new(Vec::new()),
            cni_state: Mutex::new(CniConfigState::default()),
        })
    }

    /// kubelet's `UpdateRuntimeConfig`: new pods get addresses from these.
    pub fn set_pod_cidrs(&self, cidrs: Vec<ipnet::IpNet>) {
        *self
            .pod_cidrs
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = cidrs;
    }

    /// kubelet's pod CIDRs, or the configured one until kubelet sends any.
    pub fn pod_cidrs(&self) -> Vec<ipnet::IpNet> {
        let cidrs = self
            .pod_cidrs
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if cidrs.is_empty() {
            vec![self.config.pod_cidr]
        } else {
            cidrs.clone()
        }
    }

    pub fn readiness(&self) -> Readiness {
        readiness(&self.config)
    }

    /// Connects the pod: CNI ADD, or the built-in network. A failed ADD is
    /// undone (DEL) before the error is returned.
    pub async fn attach(&self, req: &PodNetworkRequest) -> Result<PodNetworkStatus, NetworkError> {
        check_request(req)?;
        match self.current_cni_network()? {
            Some(list) => {
                netns::netlink_in(&req.netns, "bring up lo", |h| async move {
                    builtin::loopback_up(&h).await
                })
                .await?;
                let capabilities = cni::CapabilityArgs::new(req, &self.pod_cidrs());
                self.cni.add(&list, req, &capabilities).await
            }
            None => self.builtin.attach(req, &self.pod_cidrs()).await,
        }
    }

    /// Disconnects the pod with what attached it, whatever the configuration
    /// says now: the cached CNI config and result, and the built-in
    /// network's record. Idempotent; a netns that is gone is fine.
    pub async fn detach(&self, req: &PodNetworkRequest) -> Result<(), NetworkError> {
        check_request(req)?;
        let cni = self.cni.del(req).await;
        let builtin = self.builtin.detach(&req.pod_id).await;
        cni?;
        builtin
    }

    /// rx/tx counters of every interface but `lo` in the namespace.
    pub async fn stats(&self, netns: &Path) -> Result<Vec<InterfaceStats>, NetworkError> {
        netns::interface_stats(netns).await
    }

    /// The CNI network to use now, or `None` for the built-in network.
    fn current_cni_network(&self) -> Result<Option<cni_config::NetworkList>, NetworkError> {
        if self.config.mode == NetworkMode::Builtin {
            return Ok(None);
        }
        let dir = &self.config.cni_conf_dir;
        let mut state = self
            .cni_state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir_mtime = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
        let file_mtime = state
            .list
            .as_ref()
            .and_then(|l| std::fs::metadata(&l.path).and_then(|m| m.modified()).ok());
        if state.dir_mtime.is_none()
            || dir_mtime != state.dir_mtime
            || file_mtime != state.file_mtime
        {
            let (valid, skipped) = cni_config::discover(dir).map_err(CniError::from)?;
            state.list = valid.into_iter().next();
            state.detail = skipped
                .first()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            state.dir_mtime = dir_mtime;
            state.file_mtime = state
                .list
                .as_ref()
                .and_then(|l| std::fs::metadata(&l.path).and_then(|m| m.modified()).ok());
            if let Some(list) = &state.list {
                tracing::info!(network = %list.name, path = %list.path.display(), "CNI network configuration loaded");
            }
        }
        match (&state.list, self.config.mode) {
            (Some(list), _) => Ok(Some(list.clone())),
            (None, NetworkMode::Cni) => Err(NetworkError::NoCniConfig {
                dir: dir.clone(),
                detail: state.detail.clone(),
            }),
            (None, _) => Ok(None),
        }
    }
}

/// The pod ID names files, interfaces and nftables chains: it must be a
/// plain token.
fn check_request(req: &PodNetworkRequest) -> Result<(), NetworkError> {
    let id = &req.pod_id;
    let plain = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !plain {
        return Err(NetworkError::InvalidRequest {
            pod_id: id.clone(),
            message: "the pod ID must be 1 to 128 letters, digits, '-', '_' or '.'".to_string(),
        });
    }
    Ok(())
}

/// Whether pods can get a network: a valid CNI configuration whose plugins
/// are all installed, or the built-in network (which needs `nft`).
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
        return match nft::find_binary() {
            Some(_) => Readiness::ready(),
            None => Readiness::not_ready(
                NOT_READY,
                format!(
                    "berth's built-in pod network needs the `nft` binary (Debian package nftables), not found in {}",
                    nft::SEARCH_PATH.join(", ")
                ),
            ),
        };
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
    fn builtin_network_is_ready_when_nft_exists() {
        let conf = tempfile::tempdir().expect("tempdir");
        for mode in [NetworkMode::Builtin, NetworkMode::Auto] {
            let state = readiness(&config(conf.path(), conf.path(), mode));
            match nft::find_binary() {
                Some(_) => assert!(state.ready, "{mode}: {state:?}"),
                None => assert!(state.message.contains("nft"), "{}", state.message),
            }
        }
    }

    #[test]
    fn pod_ids_must_be_plain_tokens() {
        for (id, ok) in [
            ("abc123", true),
            ("a-b_c.d", true),
            ("", false),
            ("../x", false),
            (".hidden", false),
            ("a/b", false),
            ("a b", false),
        ] {
            let req = PodNetworkRequest {
                pod_id: id.to_string(),
                ..PodNetworkRequest::default()
            };
            assert_eq!(check_request(&req).is_ok(), ok, "{id:?}");
        }
    }
}
