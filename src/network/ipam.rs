//! Address arithmetic of the built-in network's IPAM: which addresses of a
//! pod CIDR a pod may get, and the next free one. The allocations
//! themselves live in the store (see `builtin`), so that none is handed out
//! twice and they survive restarts.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The bridge's address: the first one of the CIDR.
pub fn gateway(cidr: &IpNet) -> IpAddr {
    from_u128(cidr, to_u128(cidr.network()) + 1)
}

/// The first and last address a pod may get: after the gateway, before the
/// IPv4 broadcast (and, in IPv6, before the all-ones address).
fn pod_range(cidr: &IpNet) -> Option<(u128, u128)> {
    let network = to_u128(cidr.network());
    let last = to_u128(cidr.broadcast());
    let first = network.checked_add(2)?;
    let last = last.checked_sub(1)?;
    (first <= last).then_some((first, last))
}

/// The next free pod address of `cidr` after `after` (round robin, as
/// host-local does, so that a freed address is not reused at once), or
/// `None` when every one is taken.
pub fn allocate(cidr: &IpNet, used: &HashSet<IpAddr>, after: Option<IpAddr>) -> Option<IpAddr> {
    let (first, last) = pod_range(cidr)?;
    let size = last - first + 1;
    let start = match after {
        Some(ip) if cidr.contains(&ip) => {
            let n = to_u128(ip);
            if n >= first && n < last { n + 1 } else { first }
        }
        _ => first,
    };
    // At most used.len() + 1 probes find a free one when there is one.
    let probes = size.min(used.len() as u128 + 1);
    (0..probes)
        .map(|i| {
            let offset = (start - first + i) % size;
            from_u128(cidr, first + offset)
        })
        .find(|ip| !used.contains(ip))
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(cidr: &IpNet, n: u128) -> IpAddr {
    match cidr {
        // Only called with values inside an IPv4 CIDR.
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn gateway_is_the_first_address() {
        assert_eq!(
            gateway(&"10.88.0.0/16".parse().expect("cidr")),
            ip("10.88.0.1")
        );
        assert_eq!(
            gateway(&"fd00:1::/64".parse().expect("cidr")),
            ip("fd00:1::1")
        );
    }

    #[test]
    fn allocation_skips_network_gateway_broadcast_and_used() {
        let cidr: IpNet = "10.0.0.0/29".parse().expect("cidr");
        let mut used = HashSet::new();
        let mut got = Vec::new();
        let mut last = None;
        while let Some(next) = allocate(&cidr, &used, last) {
            used.insert(next);
            got.push(next);
            last = Some(next);
        }
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
                .map(ip)
                .to_vec()
        );
        // Exhausted: nothing more until one is freed.
        assert_eq!(allocate(&cidr, &used, last), None);
        used.remove(&ip("10.0.0.4"));
        assert_eq!(allocate(&cidr, &used, last), Some(ip("10.0.0.4")));
    }

    #[test]
    fn allocation_is_round_robin() {
        let cidr: IpNet = "10.0.0.0/24".parse().expect("cidr");
        let used: HashSet<IpAddr> = [ip("10.0.0.2")].into();
        // 10.0.0.3 was just freed: the next pod gets 10.0.0.4, not it.
        assert_eq!(
            allocate(&cidr, &used, Some(ip("10.0.0.3"))),
            Some(ip("10.0.0.4"))
        );
        // Wraps after the last address.
        assert_eq!(
            allocate(&cidr, &used, Some(ip("10.0.0.254"))),
            Some(ip("10.0.0.3"))
        );
        // A cursor outside the CIDR (it changed) starts over.
        assert_eq!(
            allocate(&cidr, &used, Some(ip("192.0.2.9"))),
            Some(ip("10.0.0.3"))
        );
    }

    #[test]
    fn ipv6_and_tiny_cidrs() {
        let v6: IpNet = "fd00::/120".parse().expect("cidr");
        assert_eq!(allocate(&v6, &HashSet::new(), None), Some(ip("fd00::2")));
        let tiny: IpNet = "10.0.0.0/31".parse().expect("cidr");
        assert_eq!(allocate(&tiny, &HashSet::new(), None), None);
    }
}
