//! Image references (`busybox`, `registry.k8s.io/pause:3.10`,
//! `repo@sha256:…`): parsing and normalization exactly as kubelet and
//! containerd's CRI plugin do it, with `ParseNormalizedNamed` followed by
//! `TagNameOnly` from github.com/distribution/reference v0.6.
//!
//! Before changing a rule here: the normalized string is the name under
//! which images are stored and reported back (RepoTags, RepoDigests), and
//! kubelet compares it with its own normalization of the pod's image. A
//! reference normalized differently from distribution's is an image kubelet
//! pulls again and again, so every rule below mirrors one of
//! distribution's `normalize.go`/`regexp.go`, the odd ones included. The
//! parser is written by hand rather than with regexes: the grammar is
//! small, and each check can then say which part is wrong.
//!
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [ domain "/" ] path
//! domain     := host [ ":" port ]
//! host       := label ( "." label )* | "[" [0-9A-Fa-f:]+ "]"
//! label      := [A-Za-z0-9] | [A-Za-z0-9] [A-Za-z0-9-]* [A-Za-z0-9]
//! port       := [0-9]+
//! path       := component ( "/" component )*
//! component  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest     := "sha256:" [0-9a-f]{64}
//! ```

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::image::digest::{Digest, DigestError};

/// Docker Hub's domain in normalized references.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// Docker Hub's old name, rewritten to [`DEFAULT_DOMAIN`] when parsing.
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
/// Docker Hub serves the registry API here, not on `docker.io`; containerd's
/// default host configuration makes the same substitution.
const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// Docker Hub's namespace of official images: `busybox` is `library/busybox`.
const OFFICIAL_REPO_PREFIX: &str = "library/";
/// The tag added when a reference names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

/// distribution's `RepositoryNameTotalLengthMax`. Since v0.6 it bounds the
/// path alone, without the domain (earlier versions counted both).
const MAX_PATH_LEN: usize = 255;
/// Not a distribution rule: distribution bounds no domain. A host name has
/// at most 253 characters in DNS, so a longer domain could never be
/// contacted; refusing it here changes no pull's outcome and bounds the
/// length of every reference.
const MAX_DOMAIN_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;
/// `sha256:` and 64 hex digits.
const DIGEST_LEN: usize = 71;
/// The longest a valid reference can be, as written or normalized: domain,
/// `/`, path, `:` tag, `@` digest. Longer input is refused before it is
/// examined, which also bounds the size of every error message.
pub const MAX_LEN: usize = MAX_DOMAIN_LEN + 1 + MAX_PATH_LEN + 1 + MAX_TAG_LEN + 1 + DIGEST_LEN;

/// How much of an oversized reference an error message repeats.
const OVERSIZED_SHOWN: usize = 64;

/// The part of a reference an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Domain,
    Path,
    Tag,
}

impl Part {
    /// What the grammar wants in this part, for the error message.
    fn expected(self) -> &'static str {
        match self {
            Part::Domain => {
                "expected a host name, an IPv4 address or a bracketed IPv6 address, \
                 optionally followed by \":\" and a port number"
            }
            Part::Path => {
                "expected components of lowercase letters and digits separated by \
                 \".\", \"_\", \"__\" or dashes, joined by \"/\""
            }
            Part::Tag => {
                "expected 1 to 128 letters, digits, \"_\", \".\" or \"-\", \
                 not starting with \".\" or \"-\""
            }
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Domain => "domain",
            Part::Path => "repository path",
            Part::Tag => "tag",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("parse image reference: the reference is empty")]
    Empty,
    #[error(
        "parse image reference starting {start:?}: {len} characters, more than the {MAX_LEN} \
         a valid reference can have"
    )]
    Oversized { start: String, len: usize },
    #[error(
        "parse image reference {0:?}: a bare 64-character hex string is an image id, \
         not a repository name"
    )]
    ImageId(String),
    #[error("parse image reference {reference:?}: {part} is {len} characters, more than {max}")]
    TooLong {
        reference: String,
        part: Part,
        len: usize,
        max: usize,
    },
    #[error(
        "parse image reference {reference:?}: invalid {part} {value:?}: {expected}",
        expected = .part.expected()
    )]
    Invalid {
        reference: String,
        part: Part,
        value: String,
    },
    #[error("parse image reference {reference:?}: repository path {path:?} must be lowercase")]
    Uppercase { reference: String, path: String },
    #[error("parse image reference {reference:?}: {error}")]
    Digest {
        reference: String,
        error: DigestError,
    },
}

/// A normalized image reference: always a domain and a path, and a tag, a
/// digest or both (a reference written with neither gets [`DEFAULT_TAG`]).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalizes `s` as kubelet and containerd do:
    /// `busybox` → `docker.io/library/busybox:latest`,
    /// `index.docker.io/user/repo@sha256:…` → `docker.io/user/repo@sha256:…`.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(ReferenceError::Oversized {
                start: s.chars().take(OVERSIZED_SHOWN).collect(),
                len: s.len(),
            });
        }
        // Read as a name, an image ID would become docker.io/library/<id>,
        // which is never what was meant; distribution refuses it outright.
        if is_image_id(s) {
            return Err(ReferenceError::ImageId(s.to_string()));
        }
        let invalid = |part, value: &str| ReferenceError::Invalid {
            reference: s.to_string(),
            part,
            value: value.to_string(),
        };
        let too_long = |part, len, max| ReferenceError::TooLong {
            reference: s.to_string(),
            part,
            len,
            max,
        };

        let (domain, remainder) = split_domain(s);
        // The path can hold neither ':' nor '@', so the first of them ends it.
        let (path, suffix) =
            remainder.split_at(remainder.find([':', '@']).unwrap_or(remainder.len()));
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase {
                reference: s.to_string(),
                path: path.to_string(),
            });
        }

        // A first component that split_domain took for a domain but that
        // breaks the domain grammar is still accepted by distribution when
        // it is a valid path component (a dotted name with '_', such as
        // `my_registry.example.com/app`): its regex then reads the whole
        // name as a path with an empty domain. The normalized string is the
        // same either way, and containerd's resolver contacts that first
        // component as the host, so it is kept as the domain here; only
        // distribution's length rule, which then counts it, is carried over.
        let grammatical = is_domain(domain);
        if !grammatical && !is_path_component(domain) {
            return Err(invalid(Part::Domain, domain));
        }
        if domain.len() > MAX_DOMAIN_LEN {
            return Err(too_long(Part::Domain, domain.len(), MAX_DOMAIN_LEN));
        }
        if !path.split('/').all(is_path_component) {
            return Err(invalid(Part::Path, path));
        }
        let counted = if grammatical {
            path.len()
        } else {
            domain.len() + 1 + path.len()
        };
        if counted > MAX_PATH_LEN {
            return Err(too_long(Part::Path, counted, MAX_PATH_LEN));
        }

        let (tag, digest) = match suffix.strip_prefix(':') {
            Some(rest) => match rest.split_once('@') {
                Some((tag, digest)) => (Some(tag), Some(digest)),
                None => (Some(rest), None),
            },
            None => (None, suffix.strip_prefix('@')),
        };
        if let Some(tag) = tag
            && !is_tag(tag)
        {
            return Err(invalid(Part::Tag, tag));
        }
        let digest = digest
            .map(str::parse::<Digest>)
            .transpose()
            .map_err(|error| ReferenceError::Digest {
                reference: s.to_string(),
                error,
            })?;
        // TagNameOnly: a name alone means its latest tag.
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG),
            (tag, _) => tag,
        };

        Ok(Reference {
            domain: domain.to_string(),
            path: path.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The registry's name as written in references: `docker.io`,
    /// `registry.k8s.io`, `localhost:5000`, `[::1]:5000`. This is also the
    /// key for per-registry configuration (mirrors, credentials).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository within the registry, as used in registry API URLs:
    /// `library/busybox`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Domain and path without tag or digest: `docker.io/library/busybox`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The host whose registry API serves this reference: the domain,
    /// except for Docker Hub, whose API is on `registry-1.docker.io`.
    pub fn api_host(&self) -> &str {
        if self.domain == DEFAULT_DOMAIN {
            DOCKER_HUB_API_HOST
        } else {
            &self.domain
        }
    }

    /// The same repository at `digest`, without a tag: the form CRI reports
    /// in RepoDigests.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            domain: self.domain.clone(),
            path: self.path.clone(),
            tag: None,
            digest: Some(digest),
        }
    }

    /// The reference containerd's CRI plugin pulls and records for this one
    /// (distribution's `ParseDockerRef`): when both a tag and a digest are
    /// given, only the digest is kept, since it alone decides what is pulled.
    pub fn docker_ref(&self) -> Reference {
        match &self.digest {
            Some(digest) if self.tag.is_some() => self.with_digest(digest.clone()),
            _ => self.clone(),
        }
    }

    /// The short form Docker shows (`busybox:latest`, `user/app:v1`): the
    /// `docker.io` domain and the `library/` namespace dropped. For display
    /// only; it does not always parse back to the same reference
    /// (`docker.io/localhost/app` becomes `localhost/app`).
    pub fn familiar(&self) -> String {
        let mut out = String::new();
        if self.domain == DEFAULT_DOMAIN {
            // Only a single component after library/ is an official image.
            match self.path.strip_prefix(OFFICIAL_REPO_PREFIX) {
                Some(name) if !name.contains('/') => out.push_str(name),
                _ => out.push_str(&self.path),
            }
        } else {
            out.push_str(&self.repository());
        }
        self.push_suffix(&mut out);
        out
    }

    fn push_suffix(&self, out: &mut String) {
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(&digest.to_string());
        }
    }
}

/// distribution's `splitDockerDomain`: the first component is the domain
/// when it contains '.' or ':', is `localhost`, or has an uppercase letter
/// (path components cannot); otherwise the reference is on Docker Hub, and
/// a Docker Hub name of one component is in `library/`.
fn split_domain(s: &str) -> (&str, Cow<'_, str>) {
    let (domain, remainder) = match s.split_once('/') {
        // A single component is always a Docker Hub name, even one that
        // looks like a host: `localhost:5000` is library/localhost, tag 5000.
        None => (DEFAULT_DOMAIN, s),
        Some((first, rest)) if first == LEGACY_DEFAULT_DOMAIN => (DEFAULT_DOMAIN, rest),
        Some((first, rest))
            if first == "localhost"
                || first.contains(['.', ':'])
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        Some(_) => (DEFAULT_DOMAIN, s),
    };
    if domain == DEFAULT_DOMAIN && !remainder.contains('/') {
        (
            domain,
            Cow::Owned(format!("{OFFICIAL_REPO_PREFIX}{remainder}")),
        )
    } else {
        (domain, Cow::Borrowed(remainder))
    }
}

fn is_image_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_domain(domain: &str) -> bool {
    let (host_ok, port) = match domain.strip_prefix('[') {
        // IPv6 without zone identifiers or embedded IPv4, as distribution.
        Some(bracketed) => match bracketed.split_once(']') {
            Some((address, port)) => (
                !address.is_empty() && address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':'),
                port,
            ),
            None => return false,
        },
        None => {
            let (host, port) = domain.split_at(domain.find(':').unwrap_or(domain.len()));
            (host.split('.').all(is_domain_label), port)
        }
    };
    host_ok
        && (port.is_empty()
            || port.strip_prefix(':').is_some_and(|digits| {
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            }))
}

fn is_domain_label(label: &str) -> bool {
    !label.is_empty()
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn is_path_component(component: &str) -> bool {
    let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    component.starts_with(alphanumeric)
        && component.ends_with(alphanumeric)
        && component
            .split(alphanumeric)
            .filter(|separator| !separator.is_empty())
            .all(|separator| {
                matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-')
            })
}

fn is_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    tag.len() <= MAX_TAG_LEN
        && tag.bytes().next().is_some_and(word)
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-')
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(s)
    }
}

/// The full normalized form: `docker.io/library/busybox:latest`,
/// `docker.io/library/busybox@sha256:…`, `…:tag@sha256:…`.
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl Serialize for Reference {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Deserializing normalizes, like [`Reference::parse`]: `"busybox"` reads as
/// `docker.io/library/busybox:latest`.
impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Reference, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const HEX: &str = "86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";

    fn parse(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn normalizes_like_parse_normalized_named_and_tag_name_only() {
        let long_path = "a".repeat(255);
        let nested = format!("{}a", "a/".repeat(127));
        let cases: Vec<(String, String)> = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("user/repo", "docker.io/user/repo:latest"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox:latest",
            ),
            (
                "index.docker.io/busybox",
                "docker.io/library/busybox:latest",
            ),
            ("index.docker.io/user/repo:v1", "docker.io/user/repo:v1"),
            (
                "docker.io/library/foo/bar",
                "docker.io/library/foo/bar:latest",
            ),
            ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
            ("localhost/x", "localhost/x:latest"),
            ("localhost:5000/x:y", "localhost:5000/x:y"),
            ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b:latest"),
            ("[::1]:5000/a", "[::1]:5000/a:latest"),
            ("[::1]/a", "[::1]/a:latest"),
            (
                "[2001:db8:1:2:3:4:5:6]/repo:tag",
                "[2001:db8:1:2:3:4:5:6]/repo:tag",
            ),
            (
                "example.com:8000/private/moonbase",
                "example.com:8000/private/moonbase:latest",
            ),
            (
                "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
                "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
            ),
            (
                "xn--n3h.com/myimage:xn--n3h.com",
                "xn--n3h.com/myimage:xn--n3h.com",
            ),
            (
                "b.gcr.io/test.example.com/my-app:test.example.com",
                "b.gcr.io/test.example.com/my-app:test.example.com",
            ),
            (
                "docker---rules/docker",
                "docker.io/docker---rules/docker:latest",
            ),
            ("dock__er/docker", "docker.io/dock__er/docker:latest"),
            (
                "ubuntu-12.04-base",
                "docker.io/library/ubuntu-12.04-base:latest",
            ),
            (
                "lowercase:Uppercase",
                "docker.io/library/lowercase:Uppercase",
            ),
            ("busybox:_x.y-z", "docker.io/library/busybox:_x.y-z"),
            // An uppercase first component is a domain, as in distribution.
            ("Foo/bar", "Foo/bar:latest"),
            ("LOCALDOMAIN/debian", "LOCALDOMAIN/debian:latest"),
            ("Docker.io/busybox", "Docker.io/busybox:latest"),
            // A single component is a Docker Hub name, whatever it looks like.
            ("localhost", "docker.io/library/localhost:latest"),
            ("localhost:5000", "docker.io/library/localhost:5000"),
            ("example.com", "docker.io/library/example.com:latest"),
            ("192.168.0.1:80", "docker.io/library/192.168.0.1:80"),
            ("sha256:8e", "docker.io/library/sha256:8e"),
            // Dotted first component with '_': distribution reads the whole
            // name as a path; the normalized string is the same.
            (
                "my_registry.example.com/app",
                "my_registry.example.com/app:latest",
            ),
            // The port is not range-checked by distribution either.
            ("localhost:99999/x", "localhost:99999/x:latest"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .chain([
            (
                format!("busybox@sha256:{HEX}"),
                format!("docker.io/library/busybox@sha256:{HEX}"),
            ),
            (
                format!("busybox:1.36@sha256:{HEX}"),
                format!("docker.io/library/busybox:1.36@sha256:{HEX}"),
            ),
            (
                format!("[2001:db8::1]:5000/repo:tag@sha256:{HEX}"),
                format!("[2001:db8::1]:5000/repo:tag@sha256:{HEX}"),
            ),
            (
                format!("sha256:{HEX}"),
                format!("docker.io/library/sha256:{HEX}"),
            ),
            (
                format!("docker.io/{HEX}"),
                format!("docker.io/library/{HEX}:latest"),
            ),
            (
                format!("{HEX}:latest"),
                format!("docker.io/library/{HEX}:latest"),
            ),
            (
                format!("example.com/{long_path}:tag"),
                format!("example.com/{long_path}:tag"),
            ),
            (
                format!("{nested}:tag-puts-this-over-max"),
                format!("docker.io/{nested}:tag-puts-this-over-max"),
            ),
            (
                format!("busybox:{}", "t".repeat(128)),
                format!("docker.io/library/busybox:{}", "t".repeat(128)),
            ),
        ])
        .collect();
        for (input, expected) in cases {
            let reference = parse(&input);
            assert_eq!(reference.to_string(), expected, "{input}");
            assert_eq!(parse(&expected), reference, "{expected} parses to the same");
        }
    }

    #[test]
    fn refuses_bad_references_with_the_part_at_fault() {
        use Part::{Domain, Path, Tag};
        let kind = |e: &ReferenceError| match e {
            ReferenceError::Empty => "empty".to_string(),
            ReferenceError::Oversized { .. } => "oversized".to_string(),
            ReferenceError::ImageId(_) => "image id".to_string(),
            ReferenceError::TooLong { part, .. } => format!("long {part}"),
            ReferenceError::Invalid { part, .. } => format!("invalid {part}"),
            ReferenceError::Uppercase { .. } => "uppercase".to_string(),
            ReferenceError::Digest { .. } => "digest".to_string(),
        };
        let long = |part: Part| format!("long {part}");
        let invalid = |part: Part| format!("invalid {part}");
        let cases: Vec<(String, String)> = [
            ("", "empty".to_string()),
            (HEX, "image id".to_string()),
            ("Busybox", "uppercase".to_string()),
            ("Uppercase:tag", "uppercase".to_string()),
            ("docker/Docker", "uppercase".to_string()),
            ("docker.io/docker/Docker", "uppercase".to_string()),
            ("test:5000/Uppercase/lowercase:tag", "uppercase".to_string()),
            ("-docker", invalid(Path)),
            ("-docker/docker", invalid(Path)),
            ("docker-/docker", invalid(Path)),
            ("docker///docker", invalid(Path)),
            ("docker.io/docker///docker", invalid(Path)),
            ("docker/", invalid(Path)),
            ("/busybox", invalid(Path)),
            ("____/____", invalid(Path)),
            ("_docker/_docker", invalid(Path)),
            ("aa/asdf$$^/aa", invalid(Path)),
            ("busy box", invalid(Path)),
            ("é/foo", invalid(Path)),
            (":justtag", invalid(Path)),
            ("[fc00::1]", invalid(Path)),
            ("[fc00::1]:5000", invalid(Path)),
            ("-docker.io/docker/docker", invalid(Domain)),
            ("dock..er/docker", invalid(Domain)),
            ("dock-.er/docker", invalid(Domain)),
            ("https://github.com/docker/docker", invalid(Domain)),
            ("fc00::1:5000/debian", invalid(Domain)),
            ("[fe80::1%eth0]:5000/debian", invalid(Domain)),
            ("[2001:db8:3:4::192.0.2.33]:5000/debian", invalid(Domain)),
            ("[]/x", invalid(Path)),
            ("[]:5000/x", invalid(Domain)),
            ("[::1/x", invalid(Domain)),
            ("[::1]x/y", invalid(Domain)),
            ("localhost:/x", invalid(Domain)),
            ("a_b.com:5000/foo", invalid(Domain)),
            ("busybox:", invalid(Tag)),
            ("busybox:-x", invalid(Tag)),
            ("busybox:.x", invalid(Tag)),
            ("busybox:a:b", invalid(Tag)),
            ("busybox:a/b", invalid(Domain)),
            ("busybox@", "digest".to_string()),
            ("busybox:tag@", "digest".to_string()),
            (
                "repo@sha256:ffffffffffffffffffffffffffffffffff",
                "digest".to_string(),
            ),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b))
        .chain([
            (format!("busybox:{}", "t".repeat(129)), invalid(Tag)),
            (format!("@sha256:{HEX}"), invalid(Path)),
            (format!("repo@sha512:{HEX}{HEX}"), "digest".to_string()),
            (format!("repo@SHA256:{HEX}"), "digest".to_string()),
            (
                format!("repo@sha256:{}", HEX.to_uppercase()),
                "digest".to_string(),
            ),
            (
                format!("repo@sha256:{HEX}@sha256:{HEX}"),
                "digest".to_string(),
            ),
            (HEX.to_uppercase(), "uppercase".to_string()),
            (format!("domain/{}:tag", "a".repeat(256)), long(Path)),
            // library/ counts: a 248-character official name is 256 long.
            ("a".repeat(248), long(Path)),
            (
                format!("my_registry.example.com/{}", "a".repeat(240)),
                long(Path),
            ),
            (format!("{}com/x", "a.".repeat(127)), long(Domain)),
            ("x".repeat(MAX_LEN + 1), "oversized".to_string()),
        ])
        .collect();
        for (input, expected) in cases {
            match Reference::parse(&input) {
                Ok(reference) => panic!("{input:?} parsed as {reference}, expected {expected}"),
                Err(error) => assert_eq!(kind(&error), expected, "{input:?}: {error}"),
            }
        }
    }

    #[test]
    fn error_messages_name_the_reference_and_the_fault() {
        let message = |s: &str| {
            Reference::parse(s)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            message("docker/Docker"),
            "parse image reference \"docker/Docker\": \
             repository path \"docker/Docker\" must be lowercase"
        );
        assert!(
            message("busybox:-x")
                .starts_with("parse image reference \"busybox:-x\": invalid tag \"-x\": expected")
        );
        assert_eq!(
            message("busybox@sha256:ab"),
            "parse image reference \"busybox@sha256:ab\": digest \"sha256:ab\": \
             expected 64 lowercase hex characters after \"sha256:\""
        );
        let oversized = message(&"x".repeat(10_000));
        assert!(oversized.len() < 200, "{oversized}");
    }

    #[test]
    fn accessors_split_the_normalized_reference() {
        let reference = parse(&format!("busybox:1.36@sha256:{HEX}"));
        assert_eq!(reference.domain(), "docker.io");
        assert_eq!(reference.path(), "library/busybox");
        assert_eq!(reference.tag(), Some("1.36"));
        assert_eq!(reference.digest().map(Digest::hex), Some(HEX));
        assert_eq!(reference.repository(), "docker.io/library/busybox");
        assert_eq!(reference.api_host(), "registry-1.docker.io");
        assert_eq!(reference.familiar(), format!("busybox:1.36@sha256:{HEX}"));

        let local = parse("localhost:5000/team/app");
        assert_eq!(local.domain(), "localhost:5000");
        assert_eq!(local.api_host(), "localhost:5000");
        assert_eq!(local.path(), "team/app");
        assert_eq!(local.tag(), Some("latest"));
        assert_eq!(local.digest(), None);
        assert_eq!(local.familiar(), "localhost:5000/team/app:latest");
    }

    #[test]
    fn familiar_drops_docker_hub_and_official_namespace_only() {
        for (input, familiar) in [
            ("busybox", "busybox:latest"),
            ("docker.io/user/app:v1", "user/app:v1"),
            ("docker.io/library/foo/bar", "library/foo/bar:latest"),
            ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
            ("Foo/bar", "Foo/bar:latest"),
        ] {
            assert_eq!(parse(input).familiar(), familiar, "{input}");
        }
    }

    #[test]
    fn with_digest_and_docker_ref_drop_the_tag() {
        let digest: Digest = format!("sha256:{HEX}").parse().expect("valid digest");
        let tagged = parse("registry.k8s.io/pause:3.10");
        assert_eq!(
            tagged.with_digest(digest.clone()).to_string(),
            format!("registry.k8s.io/pause@sha256:{HEX}")
        );
        assert_eq!(tagged.docker_ref(), tagged);
        let both = parse(&format!("pause:3.10@sha256:{HEX}"));
        assert_eq!(
            both.docker_ref().to_string(),
            format!("docker.io/library/pause@sha256:{HEX}")
        );
        assert_eq!(both.docker_ref(), both.with_digest(digest));
    }

    #[test]
    fn serde_uses_the_normalized_string() {
        let reference = parse("busybox");
        let json = serde_json::to_string(&reference).expect("serialize");
        assert_eq!(json, "\"docker.io/library/busybox:latest\"");
        assert_eq!(
            serde_json::from_str::<Reference>(&json).expect("deserialize"),
            reference
        );
        assert_eq!(
            serde_json::from_str::<Reference>("\"busybox\"").expect("deserialize"),
            reference
        );
        assert!(serde_json::from_str::<Reference>("\"Busybox\"").is_err());
    }

    /// Valid references as a user could write them, from every branch of
    /// the grammar: no domain, Docker Hub's two names, localhost, host
    /// names, IPv4, IPv6, uppercase and underscore domains, ports, nested
    /// paths, tags, digests.
    fn valid_reference() -> impl Strategy<Value = String> {
        let label = "[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?";
        let host = prop_oneof![
            Just("localhost".to_string()),
            Just("docker.io".to_string()),
            Just("index.docker.io".to_string()),
            proptest::string::string_regex(&format!("{label}(\\.{label}){{1,3}}")).expect("regex"),
            "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
            // Without a ':' (or '.', or an uppercase letter) a bracketed
            // first component is not taken for a domain at all.
            "\\[[0-9a-fA-F]{0,4}:[0-9a-fA-F:]{0,20}\\]",
            "[A-Z][A-Za-z0-9]{0,6}",
            "[a-z0-9]{1,4}(_|__)[a-z0-9]{1,4}\\.[a-z]{2,4}",
        ];
        let port = proptest::option::of("[0-9]{1,5}");
        let domain = proptest::option::of((host, port)).prop_map(|d| match d {
            // No port after an underscore name: that is outside the grammar.
            Some((host, Some(port))) if !host.contains('_') => Some(format!("{host}:{port}")),
            Some((host, _)) => Some(host),
            None => None,
        });
        let component = "[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,6}){0,3}";
        let path = prop::collection::vec(component, 1..5).prop_map(|c| c.join("/"));
        let tag = proptest::option::of(prop_oneof![
            "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
            "[A-Za-z0-9_][A-Za-z0-9_.-]{127}"
        ]);
        let digest = proptest::option::of("[0-9a-f]{64}");
        (domain, path, tag, digest).prop_map(|(domain, path, tag, digest)| {
            let mut s = domain.map(|d| format!("{d}/")).unwrap_or_default();
            s.push_str(&path);
            if let Some(tag) = tag {
                s.push(':');
                s.push_str(&tag);
            }
            if let Some(digest) = digest {
                s.push_str("@sha256:");
                s.push_str(&digest);
            }
            s
        })
    }

    /// Valid references with a few characters inserted, replaced or
    /// removed, from an alphabet of the characters that matter to the
    /// grammar: the inputs most likely to reach a parser's corner cases.
    fn near_valid_reference() -> impl Strategy<Value = String> {
        let edit = (
            any::<prop::sample::Index>(),
            0..3u8,
            prop::sample::select(b"aZ09._-:/@[]A%".to_vec()),
        );
        (valid_reference(), prop::collection::vec(edit, 0..4)).prop_map(|(s, edits)| {
            let mut bytes = s.into_bytes();
            for (at, op, c) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 => bytes.insert(i, c),
                    1 if i < bytes.len() => bytes[i] = c,
                    _ if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => {}
                }
            }
            String::from_utf8(bytes).expect("edits keep ASCII")
        })
    }

    fn assert_well_formed(input: &str, reference: &Reference) -> Result<(), TestCaseError> {
        let shown = reference.to_string();
        prop_assert!(
            shown.len() <= MAX_LEN,
            "{input:?} → {shown} is {} long",
            shown.len()
        );
        prop_assert!(reference.tag.is_some() || reference.digest.is_some());
        let again = Reference::parse(&shown);
        prop_assert_eq!(again.as_ref(), Ok(reference), "{:?} → {}", input, shown);
        prop_assert_eq!(again.map(|r| r.to_string()), Ok(shown));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn normalization_is_idempotent(input in valid_reference()) {
            let reference =
                Reference::parse(&input).map_err(|e| TestCaseError::fail(e.to_string()))?;
            assert_well_formed(&input, &reference)?;
            if !input.contains(':') && !input.contains('@') {
                prop_assert_eq!(reference.tag(), Some(DEFAULT_TAG));
            }
        }

        #[test]
        fn parse_never_panics(input in any::<String>()) {
            let _ = Reference::parse(&input);
        }

        #[test]
        fn parse_never_panics_on_grammar_characters(input in "[a-zA-Z0-9._:/@\\[\\]%é-]{0,300}") {
            let _ = Reference::parse(&input);
        }

        #[test]
        fn whatever_parses_displays_in_the_grammar(input in near_valid_reference()) {
            if let Ok(reference) = Reference::parse(&input) {
                assert_well_formed(&input, &reference)?;
            }
        }
    }
}
