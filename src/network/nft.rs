//! The built-in network's nftables rules: hostPort DNAT and masquerade, in
//! one `inet` table that berth owns (`network.nft_table`, default `berth`).
//!
//! Rules go through the `nft` binary (Debian's `nftables`), one atomic
//! transaction per call (`nft -f -`), as kube-proxy's nftables mode and the
//! CNI portmap plugin's nftables backend (both through knftables) do: the
//! ruleset stays readable (`nft list table inet berth`), the kernel's
//! netlink batch semantics come for free, and no unmaintained netlink
//! nftables crate or C library binding is needed.
//!
//! Layout: base chains `prerouting`/`output` (nat) send local-address
//! traffic through the verdict map `hostports` (`proto . port : goto
//! pod_<hash>`); each pod with host ports has its own chain `pod_<hash>`
//! with its DNAT rules, owned by the pod's store record. The base chains
//! and sets are rewritten in each transaction, so they always match the
//! current config. Connections DNAT-ed by berth are marked (0x2000, as
//! portmap does) and masqueraded when they come from loopback (hostPort on
//! 127.0.0.1, which also needs `route_localnet` on the bridge) or from a pod
//! (hairpin); external clients keep their source address.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::Value;

use super::{NetworkError, PortMapping};

/// Where `nft` is looked for.
pub const SEARCH_PATH: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];
const MARK: &str = "0x00002000";

/// The `nft` binary, if installed.
pub fn find_binary() -> Option<PathBuf> {
    SEARCH_PATH
        .iter()
        .map(|dir| Path::new(dir).join("nft"))
        .find(|p| p.is_file())
}

/// The pod's chain: derived from its ID so that detach finds it without
/// any other state.
pub fn pod_chain(pod_id: &str) -> String {
    format!("pod_{}", short_hash(pod_id))
}

/// 12 hex digits of SHA-256: names for interfaces (15 bytes max) and chains.
pub(crate) fn short_hash(s: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(s.as_bytes());
    digest.iter().take(6).fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The table, sets, map and base chains, for the current pod CIDRs.
pub fn base_script(table: &str, cidrs: &[IpNet], masquerade: bool) -> String {
    let t = format!("inet {table}");
    let mut s = String::new();
    let _ = writeln!(s, "add table {t}");
    let _ = writeln!(
        s,
        "add set {t} podnets4 {{ type ipv4_addr; flags interval; }}"
    );
    let _ = writeln!(
        s,
        "add set {t} podnets6 {{ type ipv6_addr; flags interval; }}"
    );
    let _ = writeln!(
        s,
        "add map {t} hostports {{ type inet_proto . inet_service : verdict; }}"
    );
    let _ = writeln!(
        s,
        "add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}"
    );
    let _ = writeln!(
        s,
        "add chain {t} output {{ type nat hook output priority -100; policy accept; }}"
    );
    let _ = writeln!(
        s,
        "add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"
    );
    for chain in ["prerouting", "output", "postrouting"] {
        let _ = writeln!(s, "flush chain {t} {chain}");
    }
    let _ = writeln!(s, "flush set {t} podnets4");
    let _ = writeln!(s, "flush set {t} podnets6");
    let v4: Vec<String> = cidrs
        .iter()
        .filter(|c| matches!(c, IpNet::V4(_)))
        .map(|c| c.trunc().to_string())
        .collect();
    let v6: Vec<String> = cidrs
        .iter()
        .filter(|c| matches!(c, IpNet::V6(_)))
        .map(|c| c.trunc().to_string())
        .collect();
    if !v4.is_empty() {
        let _ = writeln!(s, "add element {t} podnets4 {{ {} }}", v4.join(", "));
    }
    if !v6.is_empty() {
        let _ = writeln!(s, "add element {t} podnets6 {{ {} }}", v6.join(", "));
    }
    for chain in ["prerouting", "output"] {
        let _ = writeln!(
            s,
            "add rule {t} {chain} fib daddr type local meta l4proto . th dport vmap @hostports"
        );
    }
    let _ = writeln!(
        s,
        "add rule {t} postrouting meta mark & {MARK} == {MARK} ip saddr 127.0.0.0/8 masquerade"
    );
    let _ = writeln!(
        s,
        "add rule {t} postrouting meta mark & {MARK} == {MARK} ip saddr @podnets4 masquerade"
    );
    let _ = writeln!(
        s,
        "add rule {t} postrouting meta mark & {MARK} == {MARK} ip6 saddr @podnets6 masquerade"
    );
    if masquerade {
        let _ = writeln!(
            s,
            "add rule {t} postrouting ip saddr @podnets4 ip daddr != @podnets4 masquerade"
        );
        let _ = writeln!(
            s,
            "add rule {t} postrouting ip6 saddr @podnets6 ip6 daddr != @podnets6 masquerade"
        );
    }
    s
}

/// The pod's chain and map elements for its host ports (nothing when it
/// has none). A port another pod already maps makes the transaction fail.
pub fn pod_script(table: &str, pod_id: &str, ips: &[IpAddr], mappings: &[PortMapping]) -> String {
    let t = format!("inet {table}");
    let chain = pod_chain(pod_id);
    let mappings: Vec<&PortMapping> = mappings.iter().filter(|m| m.host_port != 0).collect();
    let mut s = String::new();
    if mappings.is_empty() {
        return s;
    }
    let _ = writeln!(s, "add chain {t} {chain}");
    let _ = writeln!(s, "flush chain {t} {chain}");
    let mut keys = Vec::new();
    for m in &mappings {
        let host_ip: Option<IpAddr> = m
            .host_ip
            .parse()
            .ok()
            .filter(|ip: &IpAddr| !ip.is_unspecified());
        let proto = m.protocol.as_str();
        for pod_ip in ips {
            let (family, match_daddr, target) = match pod_ip {
                IpAddr::V4(v4) => (
                    "ipv4",
                    "ip daddr",
                    format!("ip to {v4}:{}", m.container_port),
                ),
                IpAddr::V6(v6) => (
                    "ipv6",
                    "ip6 daddr",
                    format!("ip6 to [{v6}]:{}", m.container_port),
                ),
            };
            let daddr = match host_ip {
                Some(h) if h.is_ipv4() != pod_ip.is_ipv4() => continue,
                Some(h) => format!(" {match_daddr} {h}"),
                None => String::new(),
            };
            let _ = writeln!(
                s,
                "add rule {t} {chain} meta nfproto {family}{daddr} meta l4proto {proto} th dport {} meta mark set meta mark | {MARK} dnat {target}",
                m.host_port
            );
        }
        let key = format!("{proto} . {}", m.host_port);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let elements: Vec<String> = keys.iter().map(|k| format!("{k} : goto {chain}")).collect();
    let _ = writeln!(s, "add element {t} hostports {{ {} }}", elements.join(", "));
    s
}

/// What removes the pod's chain and elements, given the table's JSON
/// listing (`nft -j list table`); empty when the pod has none.
pub fn pod_removal_script(table: &str, pod_id: &str, listing: &Value) -> String {
    let t = format!("inet {table}");
    let chain = pod_chain(pod_id);
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut keys = Vec::new();
    let mut has_chain = false;
    for object in &objects {
        if let Some(map) = object
            .get("map")
            .filter(|m| m.get("name") == Some(&Value::from("hostports")))
        {
            for elem in map
                .get("elem")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let target = elem
                    .get(1)
                    .and_then(|v| v.get("goto"))
                    .and_then(|g| g.get("target"));
                if target != Some(&Value::from(chain.as_str())) {
                    continue;
                }
                let concat = elem
                    .get(0)
                    .and_then(|k| k.get("concat"))
                    .and_then(Value::as_array);
                if let Some([proto, port]) = concat.map(Vec::as_slice)
                    && let (Some(proto), Some(port)) = (proto.as_str(), port.as_u64())
                {
                    keys.push(format!("{proto} . {port}"));
                }
            }
        }
        if object.get("chain").and_then(|c| c.get("name")) == Some(&Value::from(chain.as_str())) {
            has_chain = true;
        }
    }
    let mut s = String::new();
    if !keys.is_empty() {
        let _ = writeln!(s, "delete element {t} hostports {{ {} }}", keys.join(", "));
    }
    if has_chain {
        let _ = writeln!(s, "delete chain {t} {chain}");
    }
    s
}

/// Runs `nft` with `args`, `stdin` as its input; its stdout on success.
fn run(nft: &Path, table: &str, args: &[&str], stdin: &str) -> Result<Vec<u8>, NetworkError> {
    let fail = |message: String| NetworkError::Nft {
        table: table.to_string(),
        message,
    };
    let mut child = Command::new(nft)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("run {}: {e}", nft.display())))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .map_err(|e| fail(format!("write to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("wait for nft: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr
            .lines()
            .find(|l| l.contains("Error"))
            .unwrap_or(stderr.trim());
        return Err(fail(format!("nft {}: {}", args.join(" "), first.trim())));
    }
    Ok(out.stdout)
}

/// Applies `script` as one transaction. Blocking.
pub fn apply(nft: &Path, table: &str, script: &str) -> Result<(), NetworkError> {
    if script.is_empty() {
        return Ok(());
    }
    run(nft, table, &["-f", "-"], script).map(drop)
}

/// Removes the pod's chain and map elements if they exist. Blocking.
pub fn remove_pod(nft: &Path, table: &str, pod_id: &str) -> Result<(), NetworkError> {
    let listing = match run(nft, table, &["-j", "list", "table", "inet", table], "") {
        Ok(out) => out,
        // No table, no rules of the pod.
        Err(NetworkError::Nft { message, .. }) if message.contains("No such file or directory") => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let listing: Value = serde_json::from_slice(&listing).map_err(|e| NetworkError::Nft {
        table: table.to_string(),
        message: format!("nft -j list table: not JSON: {e}"),
    })?;
    apply(nft, table, &pod_removal_script(table, pod_id, &listing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Protocol;

    fn mapping(
        protocol: Protocol,
        host_port: u16,
        container_port: u16,
        host_ip: &str,
    ) -> PortMapping {
        PortMapping {
            protocol,
            container_port,
            host_port,
            host_ip: host_ip.to_string(),
        }
    }

    #[test]
    fn base_script_sets_cidrs_and_masquerade() {
        let cidrs = [
            "10.88.0.0/16".parse().expect("cidr"),
            "fd00::/64".parse().expect("cidr"),
        ];
        let s = base_script("berth", &cidrs, false);
        assert!(
            s.contains("add element inet berth podnets4 { 10.88.0.0/16 }"),
            "{s}"
        );
        assert!(
            s.contains("add element inet berth podnets6 { fd00::/64 }"),
            "{s}"
        );
        assert!(s.contains("flush chain inet berth postrouting"), "{s}");
        assert!(!s.contains("daddr != @podnets4"), "{s}");
        assert!(
            base_script("berth", &cidrs, true)
                .contains("ip saddr @podnets4 ip daddr != @podnets4 masquerade")
        );
    }

    #[test]
    fn pod_script_maps_each_host_port_to_the_pod() {
        let ips: Vec<IpAddr> = vec![
            "10.88.0.5".parse().expect("ip"),
            "fd00::5".parse().expect("ip"),
        ];
        let s = pod_script(
            "berth",
            "pod1",
            &ips,
            &[
                mapping(Protocol::Tcp, 8080, 80, ""),
                mapping(Protocol::Udp, 5353, 53, "127.0.0.1"),
                mapping(Protocol::Sctp, 0, 99, ""),
            ],
        );
        let chain = pod_chain("pod1");
        assert!(s.contains(&format!("meta nfproto ipv4 meta l4proto tcp th dport 8080 meta mark set meta mark | {MARK} dnat ip to 10.88.0.5:80")), "{s}");
        assert!(s.contains("dnat ip6 to [fd00::5]:80"), "{s}");
        assert!(
            s.contains("meta nfproto ipv4 ip daddr 127.0.0.1 meta l4proto udp th dport 5353"),
            "{s}"
        );
        // A host IP of one family maps only to the pod address of that family.
        assert!(!s.contains("dnat ip6 to [fd00::5]:53"), "{s}");
        assert!(!s.contains("sctp"), "{s}");
        assert!(s.contains(&format!("add element inet berth hostports {{ tcp . 8080 : goto {chain}, udp . 5353 : goto {chain} }}")), "{s}");
        assert_eq!(pod_script("berth", "pod1", &ips, &[]), "");
    }

    #[test]
    fn removal_finds_the_pods_elements_and_chain_only() {
        let chain = pod_chain("pod1");
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {}},
            {"table": {"family": "inet", "name": "berth"}},
            {"map": {"name": "hostports", "elem": [
                [{"concat": ["udp", 53]}, {"goto": {"target": chain}}],
                [{"concat": ["tcp", 8080]}, {"goto": {"target": "pod_other"}}],
                [{"concat": ["tcp", 9090]}, {"goto": {"target": chain}}]
            ]}},
            {"chain": {"name": chain}},
            {"chain": {"name": "pod_other"}}
        ]});
        assert_eq!(
            pod_removal_script("berth", "pod1", &listing),
            format!(
                "delete element inet berth hostports {{ udp . 53, tcp . 9090 }}\ndelete chain inet berth {chain}\n"
            )
        );
        assert_eq!(pod_removal_script("berth", "pod2", &listing), "");
    }

    #[test]
    fn names_are_short_and_stable() {
        assert_eq!(pod_chain("x"), pod_chain("x"));
        assert_ne!(pod_chain("x"), pod_chain("y"));
        assert_eq!(short_hash("x").len(), 12);
    }
}
