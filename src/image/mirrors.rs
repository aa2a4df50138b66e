//! Where to pull an image from: the `[[registry]]` table whose prefix
//! matches the image best, its mirrors in order, then its location, with the
//! semantics of containers-registries.conf v2.
//!
//! The image keeps its own name whichever endpoint serves it: endpoints only
//! say where the bytes come from.

use crate::config::{PullFromMirror, RegistryConfig};
use crate::image::reference::Reference;

/// One place to try: a registry host and the repository path on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` as written in the reference or the config.
    pub host: String,
    /// The repository on that host, e.g. `library/busybox`.
    pub repository: String,
    /// Plain HTTP instead of HTTPS.
    pub insecure: bool,
    pub is_mirror: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MirrorError {
    #[error("image {image}: registry {prefix} is blocked and none of its mirrors serves this pull")]
    Blocked { image: String, prefix: String },
    #[error("image {image}: location {location:?} of registry {prefix} is not host[:port][/path]")]
    BadLocation {
        image: String,
        prefix: String,
        location: String,
    },
}

/// The endpoints for `image`, in the order to try them.
pub fn endpoints(
    image: &Reference,
    registries: &[RegistryConfig],
    insecure_loopback: bool,
) -> Result<Vec<Endpoint>, MirrorError> {
    let name = image.repository();
    let Some((registry, matched)) = best_match(&name, registries) else {
        return Ok(vec![Endpoint {
            host: image.api_host().to_string(),
            repository: image.path().to_string(),
            insecure: insecure_loopback && is_loopback(image.domain()),
            is_mirror: false,
        }]);
    };
    let rest = &name[matched.len()..];
    let by_digest = image.digest().is_some();
    let mut out = Vec::new();
    for mirror in &registry.mirror {
        let serves = match mirror.pull_from_mirror {
            PullFromMirror::All => true,
            PullFromMirror::DigestOnly => by_digest,
            PullFromMirror::TagOnly => !by_digest,
        };
        if serves {
            let mut endpoint = endpoint_at(&mirror.location, rest, image, registry)?;
            endpoint.insecure =
                mirror.insecure || (insecure_loopback && is_loopback(&endpoint.host));
            endpoint.is_mirror = true;
            out.push(endpoint);
        }
    }
    if !registry.blocked {
        // Without a location the upstream is what the prefix matched (for
        // `*.example.com`, the image's own host).
        let location = if registry.location.is_empty() {
            matched
        } else {
            &registry.location
        };
        let mut endpoint = endpoint_at(location, rest, image, registry)?;
        endpoint.insecure = registry.insecure || (insecure_loopback && is_loopback(&endpoint.host));
        out.push(endpoint);
    }
    if out.is_empty() {
        return Err(MirrorError::Blocked {
            image: image.to_string(),
            prefix: prefix_of(registry).to_string(),
        });
    }
    Ok(out)
}

fn prefix_of(registry: &RegistryConfig) -> &str {
    if registry.prefix.is_empty() {
        &registry.location
    } else {
        &registry.prefix
    }
}

/// The table with the longest prefix matching `name` at a component
/// boundary, and the part of `name` that matched.
fn best_match<'a>(
    name: &'a str,
    registries: &'a [RegistryConfig],
) -> Option<(&'a RegistryConfig, &'a str)> {
    registries
        .iter()
        .filter_map(|r| matched_prefix(name, prefix_of(r)).map(|m| (r, m)))
        .max_by_key(|(_, m)| m.len())
}

fn matched_prefix<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    if let Some(domain_suffix) = prefix.strip_prefix("*.") {
        // `*.example.com` matches any subdomain host, and nothing more.
        let host = name.split('/').next().unwrap_or_default();
        let host_name = host.split(':').next().unwrap_or_default();
        return host_name
            .strip_suffix(domain_suffix)
            .filter(|sub| sub.ends_with('.') && sub.len() > 1)
            .map(|_| host);
    }
    let rest = name.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then(|| &name[..prefix.len()])
}

fn endpoint_at(
    location: &str,
    rest: &str,
    image: &Reference,
    registry: &RegistryConfig,
) -> Result<Endpoint, MirrorError> {
    let bad = || MirrorError::BadLocation {
        image: image.to_string(),
        prefix: prefix_of(registry).to_string(),
        location: location.to_string(),
    };
    let full = format!("{location}{rest}");
    let (host, repository) = full.split_once('/').ok_or_else(bad)?;
    if host.is_empty() || repository.is_empty() {
        return Err(bad());
    }
    // Docker Hub's API lives on another host than its name; `docker.io/x`
    // also needs `library/` for official images, which the normalized
    // reference already has.
    let host = if host == "docker.io" || host == "index.docker.io" {
        "registry-1.docker.io"
    } else {
        host
    };
    Ok(Endpoint {
        host: host.to_string(),
        repository: repository.to_string(),
        insecure: false,
        is_mirror: false,
    })
}

/// `localhost`, `127.0.0.0/8` and `[::1]`, with or without a port.
pub fn is_loopback(host: &str) -> bool {
    let without_port = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    if without_port == "localhost" {
        return true;
    }
    without_port
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MirrorConfig;

    fn reference(s: &str) -> Reference {
        Reference::parse(s).expect("valid reference")
    }

    fn mirror(location: &str, pull_from_mirror: PullFromMirror) -> MirrorConfig {
        MirrorConfig {
            location: location.to_string(),
            insecure: true,
            pull_from_mirror,
        }
    }

    fn registry(prefix: &str, location: &str, mirrors: Vec<MirrorConfig>) -> RegistryConfig {
        RegistryConfig {
            prefix: prefix.to_string(),
            location: location.to_string(),
            insecure: false,
            blocked: false,
            mirror: mirrors,
        }
    }

    fn hosts(endpoints: &[Endpoint]) -> Vec<String> {
        endpoints
            .iter()
            .map(|e| format!("{}/{}", e.host, e.repository))
            .collect()
    }

    #[test]
    fn no_table_means_the_image_host_itself() {
        let e = endpoints(&reference("busybox"), &[], false).expect("endpoints");
        assert_eq!(hosts(&e), vec!["registry-1.docker.io/library/busybox"]);
        assert!(!e[0].insecure);
        let e = endpoints(&reference("127.0.0.1:5000/a/b:1"), &[], true).expect("endpoints");
        assert_eq!(hosts(&e), vec!["127.0.0.1:5000/a/b"]);
        assert!(e[0].insecure, "loopback is plain HTTP when allowed");
        let e = endpoints(&reference("127.0.0.1:5000/a/b:1"), &[], false).expect("endpoints");
        assert!(!e[0].insecure, "and HTTPS otherwise");
    }

    #[test]
    fn mirrors_come_first_in_order_then_the_location() {
        let tables = vec![registry(
            "registry.k8s.io",
            "",
            vec![
                mirror("127.0.0.1:5000", PullFromMirror::All),
                mirror("mirror.example.com/k8s", PullFromMirror::All),
            ],
        )];
        let e =
            endpoints(&reference("registry.k8s.io/pause:3.10"), &tables, false).expect("endpoints");
        assert_eq!(
            hosts(&e),
            vec![
                "127.0.0.1:5000/pause",
                "mirror.example.com/k8s/pause",
                "registry.k8s.io/pause"
            ]
        );
        assert!(e[0].is_mirror && e[1].is_mirror && !e[2].is_mirror);
        assert!(e[0].insecure && !e[2].insecure);
    }

    #[test]
    fn longest_prefix_at_a_component_boundary_wins() {
        let tables = vec![
            registry(
                "docker.io",
                "",
                vec![mirror("m1:5000", PullFromMirror::All)],
            ),
            registry(
                "docker.io/library",
                "",
                vec![mirror("m2:5000/lib", PullFromMirror::All)],
            ),
            registry(
                "docker.io/lib",
                "",
                vec![mirror("wrong:1", PullFromMirror::All)],
            ),
        ];
        let e = endpoints(&reference("busybox:1"), &tables, false).expect("endpoints");
        assert_eq!(
            hosts(&e),
            vec![
                "m2:5000/lib/busybox",
                "registry-1.docker.io/library/busybox"
            ]
        );
        let e = endpoints(&reference("user/app"), &tables, false).expect("endpoints");
        assert_eq!(
            hosts(&e),
            vec!["m1:5000/user/app", "registry-1.docker.io/user/app"]
        );
    }

    #[test]
    fn location_redirects_the_upstream() {
        let tables = vec![registry(
            "example.com/team",
            "internal.example.net/mirror/team",
            vec![],
        )];
        let e = endpoints(&reference("example.com/team/app:2"), &tables, false).expect("endpoints");
        assert_eq!(hosts(&e), vec!["internal.example.net/mirror/team/app"]);
    }

    #[test]
    fn pull_from_mirror_filters_by_tag_or_digest() {
        let tables = vec![registry(
            "quay.io",
            "",
            vec![
                mirror("digests:1", PullFromMirror::DigestOnly),
                mirror("tags:1", PullFromMirror::TagOnly),
            ],
        )];
        let by_tag = endpoints(&reference("quay.io/a/b:1"), &tables, false).expect("endpoints");
        assert_eq!(hosts(&by_tag), vec!["tags:1/a/b", "quay.io/a/b"]);
        let digest = format!("quay.io/a/b@sha256:{}", "a".repeat(64));
        let by_digest = endpoints(&reference(&digest), &tables, false).expect("endpoints");
        assert_eq!(hosts(&by_digest), vec!["digests:1/a/b", "quay.io/a/b"]);
    }

    #[test]
    fn blocked_upstream_uses_only_mirrors_and_fails_without_one() {
        let mut table = registry("gcr.io", "", vec![mirror("m:1", PullFromMirror::TagOnly)]);
        table.blocked = true;
        let tables = vec![table];
        let e = endpoints(&reference("gcr.io/x/y:1"), &tables, false).expect("endpoints");
        assert_eq!(hosts(&e), vec!["m:1/x/y"]);
        let digest = format!("gcr.io/x/y@sha256:{}", "b".repeat(64));
        let err = endpoints(&reference(&digest), &tables, false).expect_err("blocked");
        assert!(matches!(err, MirrorError::Blocked { .. }), "{err}");
    }

    #[test]
    fn wildcard_prefix_matches_subdomains_only() {
        let tables = vec![registry(
            "*.example.com",
            "",
            vec![mirror("m:1", PullFromMirror::All)],
        )];
        let e = endpoints(&reference("a.example.com/x:1"), &tables, false).expect("endpoints");
        assert_eq!(hosts(&e), vec!["m:1/x", "a.example.com/x"]);
        let e = endpoints(&reference("example.com/x:1"), &tables, false).expect("endpoints");
        assert_eq!(hosts(&e), vec!["example.com/x"]);
    }

    #[test]
    fn loopback_hosts() {
        for yes in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "example.com",
            "10.0.0.1:5000",
            "[fd00::1]:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }
}
