//! berth's built-in pod network: a Linux bridge whose address is the
//! gateway (first address of each pod CIDR), one veth pair per pod (host
//! end on the bridge, pod end `eth0` in the pod's namespace with the pod's
//! address and a default route via the gateway), hostPorts and masquerade
//! in berth's nftables table, addresses allocated in the store.
//!
//! A pod with bandwidth annotations gets a TBF qdisc ([`super::tbf`]) on the
//! host end of its veth, which limits what enters the pod, and one on its
//! `eth0`, which limits what it sends. Shaping egress inside the pod needs
//! no extra device, filter or kernel module; the price is that a pod with
//! `CAP_NET_ADMIN` (none has it by default) could remove its own egress
//! limit, which the CNI bandwidth plugin avoids with an IFB device on the
//! host.
//!
//! Ownership: the pod's store record (`Kind::Ipam`, keyed by pod ID) is
//! written before anything is made and names everything made for the pod:
//! its addresses, its host veth (deleting it deletes the pod end too, and
//! the qdiscs of both), its nftables chain. Detach removes those, then the
//! record. The bridge, the table's base chains and the sysctls are the
//! node's, shared by all pods, and stay.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::Mutex;

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::tbf::Tbf;
use super::{
    Bandwidth, NetworkError, POD_INTERFACE, PodNetworkRequest, PodNetworkStatus, PortMapping, ipam,
    netns, nft,
};
use crate::config::NetworkConfig;
use crate::store::{Kind, Store};

/// What the built-in network made for one pod; the owner of it all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub pod_id: String,
    pub bridge: String,
    pub host_veth: String,
    pub nft_table: String,
    /// The pod's addresses with the prefix length of their CIDR.
    pub addresses: Vec<IpNet>,
    pub port_mappings: Vec<PortMapping>,
    /// The pod's shaping, when it has bandwidth annotations.
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
}

impl Attachment {
    fn ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.addresses.iter().map(IpNet::addr).collect();
        ips.sort_by_key(|ip| !ip.is_ipv4());
        ips
    }

    fn describe(&self) -> serde_json::Value {
        let mut description = json!({
            "type": "berth-builtin",
            "bridge": self.bridge,
            "interface": POD_INTERFACE,
            "hostInterface": self.host_veth,
            "ips": self.addresses.iter().map(|a| json!({
                "address": a.to_string(),
                "gateway": ipam::gateway(&a.trunc()).to_string(),
            })).collect::<Vec<_>>(),
        });
        if let Some(bw) = &self.bandwidth {
            description["bandwidth"] = json!({
                "ingressRate": bw.ingress_rate,
                "ingressBurst": bw.ingress_burst,
                "egressRate": bw.egress_rate,
                "egressBurst": bw.egress_burst,
            });
        }
        description
    }

    /// The shaping of each direction, checked before anything is made.
    fn shaping(&self) -> Result<(Option<Tbf>, Option<Tbf>), NetworkError> {
        let Some(bw) = self.bandwidth else {
            return Ok((None, None));
        };
        let tbf = |rate: u64, burst: u64, direction: &str| {
            if rate == 0 {
                return Ok(None);
            }
            Tbf::from_bits(rate, burst)
                .map(Some)
                .map_err(|message| NetworkError::InvalidRequest {
                    pod_id: self.pod_id.clone(),
                    message: format!("{direction} bandwidth: {message}"),
                })
        };
        Ok((
            tbf(bw.ingress_rate, bw.ingress_burst, "ingress")?,
            tbf(bw.egress_rate, bw.egress_burst, "egress")?,
        ))
    }
}

/// The host end of a pod's veth: derived from the pod ID, 14 bytes.
pub fn host_veth_name(pod_id: &str) -> String {
    format!("bv{}", nft::short_hash(pod_id))
}

pub(crate) struct Builtin {
    bridge: String,
    table: String,
    masquerade: bool,
    store: Store,
    /// The last address handed out per CIDR, for round-robin allocation.
    cursor: Mutex<HashMap<IpNet, IpAddr>>,
    /// The pod CIDRs the table's base rules were last written for. A pod
    /// without hostPorts adds no rule of its own, so while the CIDRs stay
    /// the same its attach and detach need no `nft` run (a few ms each).
    /// Empty at start: the first pod of a daemon rewrites the base.
    base_applied_for: Mutex<Option<Vec<IpNet>>>,
}

impl Builtin {
    pub(crate) fn new(config: &NetworkConfig, store: Store) -> Self {
        Builtin {
            bridge: config.bridge.clone(),
            table: config.nft_table.clone(),
            masquerade: config.masquerade,
            store,
            cursor: Mutex::new(HashMap::new()),
            base_applied_for: Mutex::new(None),
        }
    }

    pub(crate) async fn attach(
        &self,
        req: &PodNetworkRequest,
        cidrs: &[IpNet],
    ) -> Result<PodNetworkStatus, NetworkError> {
        let nft_bin = nft::find_binary().ok_or_else(|| {
            NetworkError::Builtin(
                "the `nft` binary (Debian package nftables) is not installed".to_string(),
            )
        })?;
        let record = self.reserve(req, cidrs).await?;
        if let Err(error) = self.plumb(req, &record, cidrs, nft_bin).await {
            if let Err(undo) = self.detach(&req.pod_id).await {
                tracing::warn!(pod = %req.pod_id, error = %undo, "undo a failed built-in network attach");
            }
            return Err(error);
        }
        Ok(PodNetworkStatus {
            ips: record.ips(),
            interface: POD_INTERFACE.to_string(),
            result: record.describe(),
        })
    }

    /// Allocates the pod's addresses and persists its record, before any
    /// kernel object exists. A record already there (a retried attach) is
    /// reused as it is.
    async fn reserve(
        &self,
        req: &PodNetworkRequest,
        cidrs: &[IpNet],
    ) -> Result<Attachment, NetworkError> {
        let store = self.store.clone();
        let cursor: HashMap<IpNet, IpAddr> = self
            .cursor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let template = Attachment {
            pod_id: req.pod_id.clone(),
            bridge: self.bridge.clone(),
            host_veth: host_veth_name(&req.pod_id),
            nft_table: self.table.clone(),
            addresses: Vec::new(),
            port_mappings: req.port_mappings.clone(),
            bandwidth: req.bandwidth,
        };
        let cidrs = cidrs.to_vec();
        let record = blocking(move || {
            store.write(|batch| {
                if let Some(existing) = batch.get::<Attachment>(Kind::Ipam, &template.pod_id)? {
                    return Ok(Ok(existing));
                }
                let used: HashSet<IpAddr> = batch
                    .list::<Attachment>(Kind::Ipam)?
                    .iter()
                    .flat_map(|(_, a)| a.addresses.iter().map(IpNet::addr))
                    .collect();
                let mut record = template.clone();
                for cidr in &cidrs {
                    let cidr = cidr.trunc();
                    let Some(ip) = ipam::allocate(&cidr, &used, cursor.get(&cidr).copied()) else {
                        return Ok(Err(NetworkError::Exhausted { cidr }));
                    };
                    let address = IpNet::new(ip, cidr.prefix_len())
                        .expect("the prefix length comes from a valid CIDR");
                    record.addresses.push(address);
                }
                batch.put(Kind::Ipam, &record.pod_id, &record)?;
                Ok(Ok(record))
            })
        })
        .await???;
        let mut cursor = self
            .cursor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for address in &record.addresses {
            cursor.insert(address.trunc(), address.addr());
        }
        Ok(record)
    }

    async fn plumb(
        &self,
        req: &PodNetworkRequest,
        record: &Attachment,
        cidrs: &[IpNet],
        nft_bin: PathBuf,
    ) -> Result<(), NetworkError> {
        let gateways: Vec<IpNet> = record
            .addresses
            .iter()
            .map(|a| {
                IpNet::new(ipam::gateway(&a.trunc()), a.prefix_len())
                    .expect("the prefix length comes from a valid CIDR")
            })
            .collect();
        let (ingress, egress) = record.shaping()?;
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|error| NetworkError::Netns {
                op: "open netlink socket".to_string(),
                path: PathBuf::from("/proc/self/ns/net"),
                error,
            })?;
        let task = tokio::spawn(connection);
        let host = async {
            let bridge = ensure_bridge(&handle, &record.bridge, &gateways).await?;
            if let Some(stale) = link_index(&handle, &record.host_veth).await? {
                handle
                    .link()
                    .del(stale)
                    .execute()
                    .await
                    .map_err(netlink(format!("delete stale veth {}", record.host_veth)))?;
            }
            let netns_file =
                std::fs::File::open(&req.netns).map_err(|error| NetworkError::Netns {
                    op: "open".to_string(),
                    path: req.netns.clone(),
                    error,
                })?;
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(POD_INTERFACE)
                .setns_by_fd(netns_file.as_raw_fd())
                .build();
            let veth = LinkVeth::new(&record.host_veth, POD_INTERFACE)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .controller(bridge)
                .up()
                .build();
            handle
                .link()
                .add(veth)
                .execute()
                .await
                .map_err(|e| match errno(&e) {
                    // Port numbers are below the kernel's BR_MAX_PORTS (1024)
                    // and not 0; the kernel's own words are
                    // "Exchange full".
                    Some(libc::EXFULL) => NetworkError::Builtin(format!(
                        "bridge {} has 1023 ports, the most a Linux bridge takes: \
                         the built-in network holds at most 1023 pods on a node",
                        record.bridge
                    )),
                    _ => netlink(format!(
                        "create veth {} with {POD_INTERFACE} in {}",
                        record.host_veth,
                        req.netns.display()
                    ))(e),
                })?;
            if let Some(tbf) = &ingress {
                // What leaves the host end enters the pod.
                let index = link_index(&handle, &record.host_veth)
                    .await?
                    .ok_or_else(|| {
                        NetworkError::Builtin(format!(
                            "veth {} vanished after it was created",
                            record.host_veth
                        ))
                    })?;
                tbf.replace_root(&handle, index)
                    .await
                    .map_err(netlink(format!(
                        "add a tbf qdisc of {} bytes/s to {} (the pod's ingress)",
                        tbf.rate_bytes, record.host_veth
                    )))?;
            }
            Ok::<(), NetworkError>(())
        }
        .await;
        task.abort();
        host?;

        let addresses = record.addresses.clone();
        netns::netlink_in(&req.netns, "configure pod interface", move |h| async move {
            configure_pod(&h, &addresses, egress.as_ref()).await
        })
        .await?;

        let pod_rules = nft::pod_script(
            &self.table,
            &record.pod_id,
            &record.ips(),
            &record.port_mappings,
        );
        let base_current = self
            .base_applied_for
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_deref()
            == Some(cidrs);
        let script = if pod_rules.is_empty() && base_current {
            None
        } else {
            Some(nft::base_script(&self.table, cidrs, self.masquerade) + &pod_rules)
        };
        let table = self.table.clone();
        let bridge = record.bridge.clone();
        let v4 = cidrs.iter().any(|c| matches!(c, IpNet::V4(_)));
        let v6 = cidrs.iter().any(|c| matches!(c, IpNet::V6(_)));
        blocking(move || {
            // hostPort on 127.0.0.1: DNAT-ed loopback traffic must be
            // routable out of the bridge (as CNI portmap sets it).
            if v4 {
                sysctl(&format!("net/ipv4/conf/{bridge}/route_localnet"), "1")?;
                sysctl("net/ipv4/ip_forward", "1")?;
            }
            if v6 {
                sysctl("net/ipv6/conf/all/forwarding", "1")?;
            }
            match script {
                Some(script) => nft::apply(&nft_bin, &table, &script),
                None => Ok(()),
            }
        })
        .await??;
        *self
            .base_applied_for
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(cidrs.to_vec());
        Ok(())
    }

    /// Removes what the pod's record names, then the record. Idempotent.
    pub(crate) async fn detach(&self, pod_id: &str) -> Result<(), NetworkError> {
        let store = self.store.clone();
        let id = pod_id.to_string();
        let record: Option<Attachment> = blocking(move || store.get(Kind::Ipam, &id)).await??;
        let Some(record) = record else {
            return Ok(());
        };
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|error| NetworkError::Netns {
                op: "open netlink socket".to_string(),
                path: PathBuf::from("/proc/self/ns/net"),
                error,
            })?;
        let task = tokio::spawn(connection);
        let veth = async {
            if let Some(index) = link_index(&handle, &record.host_veth).await? {
                match handle.link().del(index).execute().await {
                    Ok(()) => {}
                    // Gone with the pod's namespace meanwhile.
                    Err(e) if errno(&e) == Some(libc::ENODEV) => {}
                    Err(e) => return Err(netlink(format!("delete veth {}", record.host_veth))(e)),
                }
            }
            Ok(())
        }
        .await;
        task.abort();
        veth?;
        // Only a pod with hostPorts has rules of its own to remove.
        let has_rules = record.port_mappings.iter().any(|m| m.host_port != 0);
        if has_rules && let Some(nft_bin) = nft::find_binary() {
            let table = record.nft_table.clone();
            let id = pod_id.to_string();
            blocking(move || nft::remove_pod(&nft_bin, &table, &id)).await??;
        }
        let store = self.store.clone();
        let id = pod_id.to_string();
        blocking(move || store.delete(Kind::Ipam, &id)).await??;
        Ok(())
    }
}

/// Brings `lo` up in the namespace `h` talks to: a new network namespace
/// has it down, and a pod needs localhost (port-forward dials it, and so do
/// the pod's own containers). containerd and CRI-O do the same for every
/// pod, whatever the CNI configuration says.
pub(super) async fn loopback_up(h: &Handle) -> Result<(), NetworkError> {
    let lo = link_index(h, "lo")
        .await?
        .ok_or_else(|| NetworkError::Builtin("the pod's namespace has no lo".to_string()))?;
    h.link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(netlink("set lo up in the pod".to_string()))
}

async fn configure_pod(
    h: &Handle,
    addresses: &[IpNet],
    egress: Option<&Tbf>,
) -> Result<(), NetworkError> {
    loopback_up(h).await?;
    let eth0 = link_index(h, POD_INTERFACE).await?.ok_or_else(|| {
        NetworkError::Builtin(format!(
            "{POD_INTERFACE} did not arrive in the pod's namespace"
        ))
    })?;
    for address in addresses {
        let mut request = h.address().add(eth0, address.addr(), address.prefix_len());
        if address.addr().is_ipv6() {
            // The address is unique by allocation; waiting for duplicate
            // address detection would only delay the pod.
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        ignore_exists(request.execute().await).map_err(netlink(format!(
            "add {address} to {POD_INTERFACE} in the pod"
        )))?;
    }
    if let Some(tbf) = egress {
        // What the pod sends leaves through its eth0.
        tbf.replace_root(h, eth0).await.map_err(netlink(format!(
            "add a tbf qdisc of {} bytes/s to {POD_INTERFACE} in the pod (its egress)",
            tbf.rate_bytes
        )))?;
    }
    h.link()
        .set(LinkUnspec::new_with_index(eth0).up().build())
        .execute()
        .await
        .map_err(netlink(format!("set {POD_INTERFACE} up in the pod")))?;
    for address in addresses {
        let route = match ipam::gateway(&address.trunc()) {
            IpAddr::V4(gw) => RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gw)
                .output_interface(eth0)
                .build(),
            IpAddr::V6(gw) => RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(gw)
                .output_interface(eth0)
                .build(),
        };
        ignore_exists(h.route().add(route).execute().await).map_err(netlink(format!(
            "add the default route via the gateway of {address} in the pod"
        )))?;
    }
    Ok(())
}

/// The bridge's index; it is created (up, with the gateway addresses) if
/// missing. Concurrent attaches may race here: EEXIST is fine.
async fn ensure_bridge(h: &Handle, name: &str, gateways: &[IpNet]) -> Result<u32, NetworkError> {
    let index = match link_index(h, name).await? {
        Some(index) => index,
        None => {
            ignore_exists(h.link().add(LinkBridge::new(name).build()).execute().await)
                .map_err(netlink(format!("create bridge {name}")))?;
            link_index(h, name).await?.ok_or_else(|| {
                NetworkError::Builtin(format!("bridge {name} vanished after it was created"))
            })?
        }
    };
    for gateway in gateways {
        ignore_exists(
            h.address()
                .add(index, gateway.addr(), gateway.prefix_len())
                .execute()
                .await,
        )
        .map_err(netlink(format!("add {gateway} to bridge {name}")))?;
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink(format!("set bridge {name} up")))?;
    Ok(index)
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink(format!("look up interface {name}"))(e)),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn ignore_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

fn netlink(op: String) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    move |error| NetworkError::Netlink { op, error }
}

/// Writes a host sysctl under `/proc/sys` if it differs. Blocking; runs on
/// a thread of the host's network namespace.
fn sysctl(key: &str, value: &str) -> Result<(), NetworkError> {
    let path = PathBuf::from("/proc/sys").join(key);
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|error| NetworkError::Sysctl { path, error })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetworkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetworkError::Builtin(format!("blocking task: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_fit_an_interface_name() {
        let name =
            host_veth_name("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
        assert!(name.len() <= 15, "{name}");
        assert_eq!(
            name,
            host_veth_name("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn reserve_never_hands_out_an_address_twice_and_keeps_a_pods_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let config = NetworkConfig {
            pod_cidr: "10.77.0.0/29".parse().expect("cidr"),
            nft_table: "berth_unit_test".to_string(),
            ..NetworkConfig::default()
        };
        let builtin = Builtin::new(&config, store.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let cidrs = vec![config.pod_cidr];
        let req = |id: &str| PodNetworkRequest {
            pod_id: id.to_string(),
            ..PodNetworkRequest::default()
        };
        runtime.block_on(async {
            let mut seen = HashSet::new();
            for id in ["a", "b", "c", "d", "e"] {
                let record = builtin.reserve(&req(id), &cidrs).await.expect("reserve");
                assert!(seen.insert(record.addresses[0].addr()), "{record:?}");
                assert_eq!(record.addresses[0].prefix_len(), 29);
            }
            // Retried attach: same record, no new address.
            let again = builtin.reserve(&req("c"), &cidrs).await.expect("reserve");
            assert!(seen.contains(&again.addresses[0].addr()));
            let err = builtin
                .reserve(&req("f"), &cidrs)
                .await
                .expect_err("exhausted");
            assert!(err.to_string().contains("no free address"), "{err}");
            // Freed by detach (no veth, no nft rules exist for it).
            builtin.detach("b").await.expect("detach");
            builtin.detach("b").await.expect("detach twice");
            let f = builtin
                .reserve(&req("f"), &cidrs)
                .await
                .expect("reserve after free");
            assert!(seen.contains(&f.addresses[0].addr()));
        });
        // Survives a restart: a new Builtin over the same store sees them.
        let builtin = Builtin::new(&config, store);
        runtime.block_on(async {
            let err = builtin
                .reserve(&req("g"), &cidrs)
                .await
                .expect_err("still exhausted");
            assert!(err.to_string().contains("no free address"), "{err}");
        });
    }
}
