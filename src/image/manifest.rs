//! Image manifests, indexes and configs as registries serve them: OCI and
//! Docker v2 schema 2, which share one JSON shape. Only the fields berth uses
//! are read; unknown ones are ignored so that newer images still parse.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::image::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What a pull asks a registry for, most specific first. Without the OCI
/// types some registries answer 404 for OCI images; without the Docker
/// types some convert to schema 1 on the fly.
pub const ACCEPT: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Manifests and indexes are a few KiB; 4 MiB is what containerd allows.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Image configs carry history and env; 8 MiB is far above any real one.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest {digest}: {size} bytes is larger than the {limit}-byte limit")]
    TooLarge {
        digest: String,
        size: u64,
        limit: u64,
    },
    #[error("manifest {digest}: not valid JSON of a manifest or index: {message}")]
    Parse { digest: String, message: String },
    #[error(
        "manifest {digest}: schema 1 manifests are not supported; push the image with a current client"
    )]
    SchemaOne { digest: String },
    #[error("manifest {digest}: unsupported media type {media_type:?}")]
    MediaType { digest: String, media_type: String },
    #[error("manifest {digest}: descriptor digest {value:?} is not a sha256 digest")]
    BadDigest { digest: String, value: String },
    #[error("image index {digest}: no manifest for {platform} (available: {available})")]
    NoPlatform {
        digest: String,
        platform: String,
        available: String,
    },
    #[error("image config {digest}: {message}")]
    Config { digest: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn digest(&self, context: &str) -> Result<Digest, ManifestError> {
        self.digest.parse().map_err(|_| ManifestError::BadDigest {
            digest: context.to_string(),
            value: self.digest.clone(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// What a manifest fetch returned.
#[derive(Debug, Clone)]
pub enum Fetched {
    Index(Vec<Descriptor>),
    Image(ImageManifest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Parses what a registry served for `digest` (named in errors).
pub fn parse(digest: &str, bytes: &[u8]) -> Result<Fetched, ManifestError> {
    let size = bytes.len() as u64;
    if size > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            digest: digest.to_string(),
            size,
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let parse_err = |e: serde_json::Error| ManifestError::Parse {
        digest: digest.to_string(),
        message: e.to_string(),
    };
    let probe: Probe = serde_json::from_slice(bytes).map_err(parse_err)?;
    if probe.schema_version == 1 {
        return Err(ManifestError::SchemaOne {
            digest: digest.to_string(),
        });
    }
    let media_type_err = |media_type: &str| ManifestError::MediaType {
        digest: digest.to_string(),
        media_type: media_type.to_string(),
    };
    // OCI allows an empty mediaType; then the shape decides.
    match (probe.media_type.as_str(), probe.manifests) {
        (OCI_INDEX | DOCKER_LIST | "", Some(manifests)) => Ok(Fetched::Index(manifests)),
        (OCI_MANIFEST | DOCKER_MANIFEST | "", None) => {
            let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(parse_err)?;
            match manifest.config.media_type.as_str() {
                OCI_CONFIG | DOCKER_CONFIG => Ok(Fetched::Image(manifest)),
                other => Err(media_type_err(other)),
            }
        }
        (other, _) => Err(media_type_err(other)),
    }
}

/// The platform this node runs, in OCI terms.
pub fn node_platform() -> Platform {
    let (architecture, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", ""),
        "aarch64" => ("arm64", "v8"),
        "arm" => ("arm", "v7"),
        "x86" => ("386", ""),
        "powerpc64" => ("ppc64le", ""),
        "s390x" => ("s390x", ""),
        "riscv64" => ("riscv64", ""),
        other => (other, ""),
    };
    Platform {
        architecture: architecture.to_string(),
        os: "linux".to_string(),
        variant: variant.to_string(),
    }
}

/// The index entry for `platform`, as containerd's platform matcher picks
/// it: same os and architecture; a variant must match when both name one
/// (arm64's `v8` and an empty variant are the same thing).
pub fn select<'a>(
    digest: &str,
    manifests: &'a [Descriptor],
    platform: &Platform,
) -> Result<&'a Descriptor, ManifestError> {
    let normalize = |arch: &str, variant: &str| -> String {
        if arch == "arm64" && variant == "v8" {
            String::new()
        } else {
            variant.to_string()
        }
    };
    let wanted_variant = normalize(&platform.architecture, &platform.variant);
    let candidates = manifests.iter().filter(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == platform.os
                && p.architecture == platform.architecture
                && (p.variant.is_empty()
                    || wanted_variant.is_empty()
                    || normalize(&p.architecture, &p.variant) == wanted_variant)
        })
    });
    // An exact variant match beats an entry that names no variant.
    let mut best: Option<&Descriptor> = None;
    for candidate in candidates {
        let exact = candidate
            .platform
            .as_ref()
            .is_some_and(|p| normalize(&p.architecture, &p.variant) == wanted_variant);
        if best.is_none() || exact {
            best = Some(candidate);
            if exact {
                break;
            }
        }
    }
    best.ok_or_else(|| ManifestError::NoPlatform {
        digest: digest.to_string(),
        platform: platform.to_string(),
        available: manifests
            .iter()
            .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The image config: what the container module needs to run the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default)]
    pub config: ContainerConfig,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Parses an image config and checks it fits the manifest's layer count.
pub fn parse_config(
    digest: &Digest,
    bytes: &[u8],
    layers: usize,
) -> Result<(ImageConfigFile, Vec<Digest>), ManifestError> {
    let config_err = |message: String| ManifestError::Config {
        digest: digest.to_string(),
        message,
    };
    let config: ImageConfigFile =
        serde_json::from_slice(bytes).map_err(|e| config_err(format!("not valid JSON: {e}")))?;
    if config.rootfs.diff_ids.len() != layers {
        return Err(config_err(format!(
            "{} diff_ids for {layers} layers in the manifest",
            config.rootfs.diff_ids.len()
        )));
    }
    let diff_ids = config
        .rootfs
        .diff_ids
        .iter()
        .map(|d| {
            d.parse()
                .map_err(|_| config_err(format!("diff_id {d:?} is not a sha256 digest")))
        })
        .collect::<Result<Vec<Digest>, _>>()?;
    Ok((config, diff_ids))
}

/// Chain IDs name an unpacked layer by everything beneath it:
/// `chain(0) = diff(0)`, `chain(n) = sha256(chain(n-1) + " " + diff(n))`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => Digest::of(format!("{parent} {diff}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn entry(arch: &str, variant: &str, d: char) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.to_string(),
            digest: digest(d),
            size: 10,
            platform: Some(Platform {
                architecture: arch.to_string(),
                os: "linux".to_string(),
                variant: variant.to_string(),
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn parses_oci_and_docker_manifests_and_indexes() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{}","size":3}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{}","size":5}}]}}"#,
            digest('a'),
            digest('b')
        );
        match parse("m", manifest.as_bytes()).expect("docker manifest") {
            Fetched::Image(m) => assert_eq!(m.layers.len(), 1),
            other => panic!("{other:?}"),
        }
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":3,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            digest('c')
        );
        assert!(matches!(parse("i", index.as_bytes()), Ok(Fetched::Index(m)) if m.len() == 1));
    }

    #[test]
    fn refuses_schema_one_unknown_types_and_oversized_bodies() {
        assert!(matches!(
            parse("m", br#"{"schemaVersion":1,"name":"x"}"#),
            Err(ManifestError::SchemaOne { .. })
        ));
        assert!(matches!(
            parse(
                "m",
                br#"{"schemaVersion":2,"mediaType":"application/x-weird","manifests":[]}"#
            ),
            Err(ManifestError::MediaType { .. })
        ));
        let artifact = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{}","size":1}},"layers":[]}}"#,
            digest('d')
        );
        assert!(matches!(
            parse("m", artifact.as_bytes()),
            Err(ManifestError::MediaType { .. })
        ));
        let huge = vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize];
        assert!(matches!(
            parse("m", &huge),
            Err(ManifestError::TooLarge { .. })
        ));
        assert!(matches!(
            parse("m", b"not json"),
            Err(ManifestError::Parse { .. })
        ));
    }

    #[test]
    fn platform_selection_prefers_exact_variants() {
        let amd64 = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: String::new(),
        };
        let arm64 = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: "v8".into(),
        };
        let list = vec![
            entry("arm", "v7", 'a'),
            entry("arm64", "", 'b'),
            entry("amd64", "", 'c'),
        ];
        assert_eq!(
            select("i", &list, &amd64).expect("amd64").digest,
            digest('c')
        );
        assert_eq!(
            select("i", &list, &arm64)
                .expect("arm64 without variant")
                .digest,
            digest('b')
        );
        let arm_v7 = Platform {
            architecture: "arm".into(),
            os: "linux".into(),
            variant: "v7".into(),
        };
        let list = vec![entry("arm", "", 'b'), entry("arm", "v7", 'e')];
        assert_eq!(
            select("i", &list, &arm_v7).expect("exact").digest,
            digest('e')
        );
        let err = select("i", &[entry("s390x", "", 'f')], &amd64).expect_err("none");
        assert!(
            err.to_string().contains("linux/amd64") && err.to_string().contains("linux/s390x"),
            "{err}"
        );
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a: Digest = digest('a').parse().expect("digest");
        let b: Digest = digest('b').parse().expect("digest");
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], Digest::of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn config_must_list_one_diff_id_per_layer() {
        let d = Digest::of(b"c");
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"User":"1000","Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            digest('a')
        );
        let (parsed, diffs) = parse_config(&d, config.as_bytes(), 1).expect("config");
        assert_eq!(parsed.config.user, "1000");
        assert_eq!(parsed.config.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(diffs.len(), 1);
        assert!(parse_config(&d, config.as_bytes(), 2).is_err());
    }
}
