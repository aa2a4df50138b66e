//! PullImage against a registry that serves bad input: content that does
//! not match its digest or size, short streams, decompression bombs, tar
//! entries that climb out of the layer, missing platforms, unknown media
//! types, wrong diffIDs, refusals and oversized manifests. Each pull must
//! fail with an error that names the image and the cause, leave nothing in
//! the content or layer stores, and leave the daemon able to pull.
//!
//! A real registry verifies what is pushed to it, so the images here come
//! from `fake_registry`, which serves whatever a test puts in it.

mod common;
#[path = "fake_registry/mod.rs"]
mod fake_registry;

use std::io::Write;
use std::path::PathBuf;

use base64::Engine as _;
use common::{LOOPBACK_REGISTRY_CONFIG, Options, TestDaemon};
use fake_registry::{FakeRegistry, Fault, Served, TOKEN_SERVICE, TokenPolicy, hex_digest, sha256};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// berth's bound on a layer's uncompressed size: this many times the
/// compressed size, plus the slack below (src/image/pull.rs).
const MAX_EXPANSION: u64 = 1100;
const EXPANSION_SLACK: u64 = 64 << 20;
/// The largest manifest berth reads (src/image/manifest.rs).
const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Where a pull writes; a failed pull must leave every one of them empty.
const STORE_DIRS: [&str; 4] = ["content/sha256", "content/ingest", "layers", "layers-tmp"];

fn daemon_with(extra_config: &str) -> TestDaemon {
    TestDaemon::start_with(Options {
        config_toml: format!("{LOOPBACK_REGISTRY_CONFIG}{extra_config}"),
        ..Options::default()
    })
}

/// A daemon whose `auth_file` (an auth.json in the returned temp dir) holds
/// `entry` for `registry`.
fn daemon_with_auth_file(
    registry: &FakeRegistry,
    entry: serde_json::Value,
) -> (TestDaemon, tempfile::TempDir) {
    let config_dir = tempfile::tempdir().expect("tempdir");
    let auth_file = config_dir.path().join("auth.json");
    let auths = serde_json::json!({ "auths": { registry.address.clone(): entry } });
    std::fs::write(&auth_file, auths.to_string()).expect("write auth.json");
    let daemon = daemon_with(&format!(
        "auth_file = {}\n",
        toml::Value::String(auth_file.display().to_string())
    ));
    (daemon, config_dir)
}

fn daemon() -> TestDaemon {
    daemon_with("")
}

async fn pull(
    client: &mut ImageServiceClient<Channel>,
    reference: &str,
) -> Result<String, tonic::Status> {
    pull_with_auth(client, reference, None).await
}

async fn pull_with_auth(
    client: &mut ImageServiceClient<Channel>,
    reference: &str,
    auth: Option<AuthConfig>,
) -> Result<String, tonic::Status> {
    client
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: reference.to_string(),
                ..ImageSpec::default()
            }),
            auth,
            ..PullImageRequest::default()
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

/// Pulls `reference`, which must fail as kubelet's ErrImagePull (code
/// Unknown, as containerd answers) with a message naming the image and
/// every one of `causes`.
async fn pull_fails(daemon: &TestDaemon, reference: &str, causes: &[&str]) -> tonic::Status {
    let mut client = daemon.images().await;
    let err = pull(&mut client, reference)
        .await
        .expect_err("the pull must fail");
    assert_eq!(err.code(), tonic::Code::Unknown, "{err:?}");
    for needle in std::iter::once(&reference).chain(causes) {
        assert!(
            err.message().contains(needle),
            "the error should name {needle:?}: {}",
            err.message()
        );
    }
    err
}

/// Pulls `reference` with `auth`, which the registry must refuse with
/// `code`, in a message that names the image, the registry and every one of
/// `causes`, and none of `secrets`.
async fn pull_refused(
    daemon: &TestDaemon,
    registry: &FakeRegistry,
    reference: &str,
    auth: Option<AuthConfig>,
    code: tonic::Code,
    causes: &[&str],
    secrets: &[&str],
) -> tonic::Status {
    let mut client = daemon.images().await;
    let err = pull_with_auth(&mut client, reference, auth)
        .await
        .expect_err("the registry refuses the pull");
    assert_eq!(err.code(), code, "{err:?}");
    for needle in [reference, registry.address.as_str()].iter().chain(causes) {
        assert!(
            err.message().contains(needle),
            "the error should name {needle:?}: {}",
            err.message()
        );
    }
    for secret in secrets {
        assert!(
            !err.message().contains(secret),
            "a secret is never printed: {}",
            err.message()
        );
    }
    err
}

/// Everything under the store directories, by path relative to the root.
fn leftovers(daemon: &TestDaemon) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in STORE_DIRS {
        let entries = match std::fs::read_dir(daemon.root.join(dir)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("read {dir}: {e}"),
        };
        for entry in entries {
            found.push(PathBuf::from(dir).join(entry.expect("dir entry").file_name()));
        }
    }
    found
}

fn assert_nothing_left(daemon: &TestDaemon) {
    assert_eq!(
        leftovers(daemon),
        Vec::<PathBuf>::new(),
        "a failed pull leaves nothing behind"
    );
}

/// A pull of a good image from the same registry and daemon works.
async fn assert_good_pull_works(daemon: &TestDaemon, registry: &FakeRegistry) {
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("hello", b"hello\n")]))]);
    let good = image.publish(registry, "good/image", "1");
    let mut client = daemon.images().await;
    let id = pull(&mut client, &good.reference)
        .await
        .expect("a good pull after a bad one");
    assert_eq!(id, good.config_digest);
}

/// A tar of regular files, written byte for byte: names are not checked,
/// so that an archive can hold what no honest builder writes.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        let raw = name.as_bytes();
        header.as_old_mut().name[..raw.len()].copy_from_slice(raw);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder.append(&header, *data).expect("append to tar");
    }
    builder.into_inner().expect("finish tar")
}

/// gzip of `bytes`; the header's mtime makes equal content compress to
/// different blobs.
fn gzip(bytes: &[u8], mtime: u32) -> Vec<u8> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(mtime)
        .write(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// Bytes gzip cannot shrink, so that half a blob is half the layer.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A layer as a manifest describes it, and the blob the registry serves.
struct Layer {
    media_type: String,
    blob: Vec<u8>,
    digest: String,
    size: u64,
    diff_id: String,
}

impl Layer {
    fn gzip(tar: &[u8]) -> Layer {
        Layer::new(TAR_GZIP, gzip(tar, 0), sha256(tar))
    }

    fn new(media_type: &str, blob: Vec<u8>, diff_id: String) -> Layer {
        Layer {
            media_type: media_type.to_string(),
            digest: sha256(&blob),
            size: blob.len() as u64,
            blob,
            diff_id,
        }
    }
}

/// An image to publish: its config (diff_ids filled from the layers, to be
/// edited by a test) and its layers.
struct Image {
    config: serde_json::Value,
    layers: Vec<Layer>,
}

/// What a test needs to know of a published image.
struct Published {
    reference: String,
    config_digest: String,
}

impl Image {
    fn new(layers: Vec<Layer>) -> Image {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": ["/hello"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        Image { config, layers }
    }

    fn manifest(&self, config: &[u8]) -> serde_json::Value {
        let layers: Vec<serde_json::Value> = self
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "mediaType": l.media_type,
                    "digest": l.digest,
                    "size": l.size,
                })
            })
            .collect();
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": sha256(config),
                "size": config.len(),
            },
            "layers": layers,
        })
    }

    /// Puts the config, the layers (each under its descriptor's digest) and
    /// the manifest in `registry` as `<name>:<tag>`.
    fn publish(&self, registry: &FakeRegistry, name: &str, tag: &str) -> Published {
        let config = serde_json::to_vec(&self.config).expect("config JSON");
        let manifest = serde_json::to_vec(&self.manifest(&config)).expect("manifest JSON");
        self.publish_with(registry, name, tag, &manifest)
    }

    fn publish_with(
        &self,
        registry: &FakeRegistry,
        name: &str,
        tag: &str,
        manifest: &[u8],
    ) -> Published {
        let config = serde_json::to_vec(&self.config).expect("config JSON");
        let config_digest = registry.put_blob(name, &config);
        for layer in &self.layers {
            registry.put_blob_as(name, &layer.digest, &layer.blob);
        }
        registry.put_manifest(name, tag, OCI_MANIFEST, manifest);
        Published {
            reference: registry.reference(name, tag),
            config_digest,
        }
    }
}

#[tokio::test]
async fn pull_rejects_layer_with_wrong_digest() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let tar = tar_of(&[("etc/motd", b"served as something else\n")]);
    let image = Image::new(vec![Layer::gzip(&tar)]);
    let published = image.publish(&registry, "bad/digest", "1");
    // The same files compressed differently: the diffID would pass, only
    // the blob's digest can tell.
    let served = gzip(&tar, 1);
    let layer = &image.layers[0];
    registry.put_blob_as("bad/digest", &layer.digest, &served);

    pull_fails(
        &daemon,
        &published.reference,
        &[&layer.digest, &sha256(&served)],
    )
    .await;
    assert_nothing_left(&daemon);
    assert_good_pull_works(&daemon, &registry).await;
}

#[tokio::test]
async fn pull_rejects_layer_larger_than_its_descriptor_says() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let mut layer = Layer::gzip(&tar_of(&[("data", &noise(64 << 10))]));
    layer.size -= 1;
    let declared = layer.size;
    let digest = layer.digest.clone();
    let published = Image::new(vec![layer]).publish(&registry, "bad/size-small", "1");

    pull_fails(
        &daemon,
        &published.reference,
        &[
            &digest,
            &format!("larger than the limit of {declared} bytes"),
        ],
    )
    .await;
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_rejects_layer_smaller_than_its_descriptor_says() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let mut layer = Layer::gzip(&tar_of(&[("data", &noise(64 << 10))]));
    let actual = layer.size;
    layer.size += 1;
    let digest = layer.digest.clone();
    let published = Image::new(vec![layer]).publish(&registry, "bad/size-large", "1");

    pull_fails(
        &daemon,
        &published.reference,
        &[
            &digest,
            &format!("expected {} bytes, got {actual}", actual + 1),
        ],
    )
    .await;
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_rejects_truncated_layer_stream() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let layer = Layer::gzip(&tar_of(&[("data", &noise(256 << 10))]));
    let (digest, whole) = (layer.digest.clone(), layer.blob.clone());
    let published = Image::new(vec![layer]).publish(&registry, "bad/truncated", "1");
    registry.put_blob_as("bad/truncated", &digest, &whole[..whole.len() / 2]);
    registry.set_fault(
        &FakeRegistry::blob_path("bad/truncated", &digest),
        Fault::Truncated {
            declared: whole.len(),
        },
    );

    pull_fails(&daemon, &published.reference, &[&digest]).await;
    assert_nothing_left(&daemon);
    assert_good_pull_works(&daemon, &registry).await;
}

/// A zstd layer of a tar holding one file of `mib` MiB of zeros, and its
/// diffID. Built from repeated frames (a zstd stream may hold many), so
/// that nothing that size is ever in memory or compressed.
fn zstd_zeros(mib: u64) -> Layer {
    let mut header = tar::Header::new_gnu();
    header.set_path("zeros").expect("tar name");
    header.set_size(mib << 20);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    let zeros = vec![0u8; 1 << 20];
    let zeros_frame = zstd::encode_all(&zeros[..], 3).expect("zstd");
    let mut blob = zstd::encode_all(header.as_bytes().as_slice(), 3).expect("zstd");
    let mut diff_id = Sha256::new_with_prefix(header.as_bytes());
    for _ in 0..mib {
        blob.extend_from_slice(&zeros_frame);
        diff_id.update(&zeros);
    }
    // The end-of-archive marker: two zero blocks.
    let end = [0u8; 1024];
    blob.extend(zstd::encode_all(&end[..], 3).expect("zstd"));
    diff_id.update(end);
    Layer::new(TAR_ZSTD, blob, hex_digest(diff_id))
}

#[tokio::test]
async fn pull_refuses_zstd_bomb_beyond_the_expansion_limit() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let layer = zstd_zeros(200);
    let limit = layer.size * MAX_EXPANSION + EXPANSION_SLACK;
    assert!(
        layer.size < 64 << 10 && limit < 200 << 20,
        "a bomb: {} bytes compressed",
        layer.size
    );
    // Not a whole KiB, so berth prints the limit in bytes.
    assert_ne!(limit % 1024, 0, "pick another size");
    let digest = layer.digest.clone();
    let published = Image::new(vec![layer]).publish(&registry, "bad/bomb", "1");

    pull_fails(
        &daemon,
        &published.reference,
        &[&digest, &format!("exceeds {limit} bytes uncompressed")],
    )
    .await;
    assert_nothing_left(&daemon);
    assert_good_pull_works(&daemon, &registry).await;
}

#[tokio::test]
async fn pull_refuses_layer_entry_that_escapes_with_dot_dot() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let layer = Layer::gzip(&tar_of(&[
        ("inside", b"fine\n"),
        ("../escape", b"outside the layer\n"),
    ]));
    let digest = layer.digest.clone();
    let published = Image::new(vec![layer]).publish(&registry, "bad/escape", "1");

    pull_fails(
        &daemon,
        &published.reference,
        &[&digest, "\"../escape\"", "escapes the layer"],
    )
    .await;
    assert_nothing_left(&daemon);
    // Where `..` from a layer's temporary directory, from the layer
    // directory or from the root would land.
    for dir in [
        daemon.root.join("layers-tmp"),
        daemon.root.join("layers"),
        daemon.root.clone(),
        daemon.dir.path().to_path_buf(),
    ] {
        assert!(
            !dir.join("escape").exists(),
            "{} written outside the layer",
            dir.join("escape").display()
        );
    }
    assert_good_pull_works(&daemon, &registry).await;
}

#[tokio::test]
async fn pull_of_index_without_this_platform_lists_what_is_available() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    // Entries for platforms no test machine runs; their manifests need not
    // exist, since none may be fetched.
    let entry = |os: &str, architecture: &str, variant: Option<&str>, content: &[u8]| {
        let mut platform = serde_json::json!({ "os": os, "architecture": architecture });
        if let Some(variant) = variant {
            platform["variant"] = variant.into();
        }
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": sha256(content),
            "size": content.len(),
            "platform": platform,
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            entry("linux", "arm", Some("v7"), b"arm"),
            entry("linux", "ppc64le", None, b"ppc64le"),
            entry("windows", "amd64", None, b"windows"),
        ],
    });
    let index = serde_json::to_vec(&index).expect("index JSON");
    registry.put_manifest("bad/platforms", "1", OCI_INDEX, &index);
    let reference = registry.reference("bad/platforms", "1");

    let err = pull_fails(
        &daemon,
        &reference,
        &[
            &sha256(&index),
            "available: linux/arm/v7, linux/ppc64le, windows/amd64",
        ],
    )
    .await;
    if cfg!(target_arch = "x86_64") {
        assert!(
            err.message().contains("no manifest for linux/amd64"),
            "{err:?}"
        );
    }
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_rejects_unknown_layer_media_type() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let bzip2 = "application/vnd.oci.image.layer.v1.tar+bzip2";
    let mut layer = Layer::gzip(&tar_of(&[("file", b"x")]));
    layer.media_type = bzip2.to_string();
    let digest = layer.digest.clone();
    let published = Image::new(vec![layer]).publish(&registry, "bad/media-type", "1");

    pull_fails(
        &daemon,
        &published.reference,
        &[&digest, &format!("unsupported layer media type {bzip2:?}")],
    )
    .await;
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_rejects_layer_whose_diff_id_does_not_match_the_config() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let layer = Layer::gzip(&tar_of(&[("file", b"what the layer holds\n")]));
    let (digest, actual) = (layer.digest.clone(), layer.diff_id.clone());
    let claimed = sha256(b"what the config claims");
    let mut image = Image::new(vec![layer]);
    image.config["rootfs"]["diff_ids"] = serde_json::json!([claimed]);
    let published = image.publish(&registry, "bad/diff-id", "1");

    pull_fails(
        &daemon,
        &published.reference,
        &[
            &digest,
            &format!("uncompressed content hashes to {actual}, the image config says {claimed}"),
        ],
    )
    .await;
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_without_credentials_from_registry_that_wants_them_is_unauthorized() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let published = image.publish(&registry, "private/app", "1");
    for path in ["/v2/", &FakeRegistry::manifest_path("private/app", "1")] {
        registry.set_fault(path, Fault::Status(401));
    }

    pull_refused(
        &daemon,
        &registry,
        &published.reference,
        None,
        tonic::Code::Unauthenticated,
        &[
            "fetch manifest",
            "requires credentials and none were given",
            "HTTP 401 Unauthorized",
            "authentication required (UNAUTHORIZED)",
        ],
        &[],
    )
    .await;
    assert_nothing_left(&daemon);
}

const IDENTITY_TOKEN: &str = "idt-7f3a91-refresh";

/// A token service that takes `IDENTITY_TOKEN` in the refresh-token grant.
fn identity_token_policy() -> TokenPolicy {
    TokenPolicy {
        identity_token: Some(IDENTITY_TOKEN.to_string()),
        ..TokenPolicy::default()
    }
}

/// CRI credentials holding only an identity token.
fn identity_token_auth(token: &str) -> Option<AuthConfig> {
    Some(AuthConfig {
        identity_token: token.to_string(),
        ..AuthConfig::default()
    })
}

/// The POSTs the token endpoint received: there must be exactly one, the
/// OAuth2 refresh-token grant for pulling `name` with `IDENTITY_TOKEN`.
fn assert_one_refresh_grant(registry: &FakeRegistry, name: &str) {
    let posts: Vec<_> = registry
        .token_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1, "one token request per pull: {posts:?}");
    let post = &posts[0];
    let mut fields: Vec<(&str, &str)> = post
        .form
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    fields.sort();
    let scope = format!("repository:{name}:pull");
    assert_eq!(
        fields,
        vec![
            ("client_id", "berth"),
            ("grant_type", "refresh_token"),
            ("refresh_token", IDENTITY_TOKEN),
            ("scope", scope.as_str()),
            ("service", TOKEN_SERVICE),
        ],
        "no access_type: berth asks for no refresh token back"
    );
    assert_eq!(post.authorization, None, "the token is in the form only");
}

#[tokio::test]
async fn pull_with_identity_token_trades_it_for_an_access_token() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let published = image.publish(&registry, "private/app", "1");
    registry.require_token(identity_token_policy());
    let mut client = daemon.images().await;

    // The registry does want a token: without credentials the pull fails,
    // the token service refusing an anonymous one.
    pull_refused(
        &daemon,
        &registry,
        &published.reference,
        None,
        tonic::Code::Unauthenticated,
        &["fetch anonymous token from"],
        &[],
    )
    .await;
    assert_nothing_left(&daemon);

    let id = pull_with_auth(
        &mut client,
        &published.reference,
        identity_token_auth(IDENTITY_TOKEN),
    )
    .await
    .expect("pull with an identity token");
    assert_eq!(id, published.config_digest);
    assert_one_refresh_grant(&registry, "private/app");
}

#[tokio::test]
async fn pull_with_wrong_identity_token_fails_without_repeating_it() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let published = image.publish(&registry, "private/app", "1");
    registry.require_token(identity_token_policy());
    let wrong = "idt-wrong-5e21c0";
    let mut client = daemon.images().await;

    let err = pull_with_auth(
        &mut client,
        &published.reference,
        identity_token_auth(wrong),
    )
    .await
    .expect_err("a wrong identity token");
    // As a wrong password: the token service's 401.
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let message = err.message();
    for needle in [
        published.reference.as_str(),
        &format!("auth for {}", registry.address),
        "fetch oauth token from",
        // The POST's refusal, the service quoting the token redacted...
        "POST answered HTTP 401 Unauthorized: refresh token <redacted> is not valid (invalid_grant)",
        // ...and the GET fallback containerd makes after a 401.
        "then GET answered HTTP 401 Unauthorized: only the oauth2 refresh token grant is accepted",
    ] {
        assert!(message.contains(needle), "should say {needle:?}: {message}");
    }
    assert!(
        !message.contains(wrong),
        "the token is never printed: {message}"
    );
    let methods: Vec<String> = registry
        .token_requests()
        .into_iter()
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, ["POST", "GET"]);
    let get = &registry.token_requests()[1];
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(":{wrong}"));
    assert_eq!(get.authorization, Some(format!("Basic {basic}")));
    assert_eq!(
        get.query,
        [
            ("service".to_string(), TOKEN_SERVICE.to_string()),
            (
                "scope".to_string(),
                "repository:private/app:pull".to_string()
            ),
        ]
    );
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_with_identity_token_from_the_auth_file() {
    let registry = FakeRegistry::start().await;
    // What `docker login` writes for a token service: the identity token
    // beside an `auth` of "<user>:" without a password.
    let user_only =
        base64::engine::general_purpose::STANDARD.encode("00000000-0000-0000-0000-000000000000:");
    let (daemon, _config_dir) = daemon_with_auth_file(
        &registry,
        serde_json::json!({ "auth": user_only, "identitytoken": IDENTITY_TOKEN }),
    );
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let published = image.publish(&registry, "team/private", "2");
    registry.require_token(identity_token_policy());

    let mut client = daemon.images().await;
    let id = pull(&mut client, &published.reference)
        .await
        .expect("pull with the auth file's identity token");
    assert_eq!(id, published.config_digest);
    assert_one_refresh_grant(&registry, "team/private");
}

const USERNAME: &str = "alice";
const PASSWORD: &str = "pw-93be0d-secret";

/// A token service that takes `USERNAME` and `PASSWORD`, in the OAuth2
/// password grant and in the GET with basic auth.
fn password_policy() -> TokenPolicy {
    TokenPolicy {
        password: Some((USERNAME.to_string(), PASSWORD.to_string())),
        ..TokenPolicy::default()
    }
}

/// CRI credentials as kubelet sends them from a docker-registry secret.
fn password_auth(username: &str, password: &str) -> Option<AuthConfig> {
    Some(AuthConfig {
        username: username.to_string(),
        password: password.to_string(),
        ..AuthConfig::default()
    })
}

/// CRI credentials holding only `auth`, base64 of "user:password".
fn auth_field(username: &str, password: &str) -> Option<AuthConfig> {
    Some(AuthConfig {
        auth: base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}")),
        ..AuthConfig::default()
    })
}

/// A request must be the OAuth2 password grant for pulling `name` with
/// `USERNAME` and `PASSWORD`, and carry them in its form only.
fn assert_password_grant(request: &fake_registry::TokenRequest, name: &str) {
    assert_eq!(request.method, "POST", "{request:?}");
    let mut fields: Vec<(&str, &str)> = request
        .form
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    fields.sort();
    let scope = format!("repository:{name}:pull");
    assert_eq!(
        fields,
        vec![
            ("client_id", "berth"),
            ("grant_type", "password"),
            ("password", PASSWORD),
            ("scope", scope.as_str()),
            ("service", TOKEN_SERVICE),
            ("username", USERNAME),
        ]
    );
    assert_eq!(
        request.authorization, None,
        "the password is in the form only"
    );
}

#[tokio::test]
async fn pull_with_username_and_password_posts_the_oauth2_password_grant() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let by_password = image.publish(&registry, "private/app", "1");
    let by_auth = Image::new(vec![Layer::gzip(&tar_of(&[("other", b"o")]))]).publish(
        &registry,
        "private/other",
        "1",
    );
    registry.require_token(password_policy());
    let mut client = daemon.images().await;

    let id = pull_with_auth(
        &mut client,
        &by_password.reference,
        password_auth(USERNAME, PASSWORD),
    )
    .await
    .expect("pull with username and password");
    assert_eq!(id, by_password.config_digest);
    // The same grant from the CRI `auth` field.
    let id = pull_with_auth(
        &mut client,
        &by_auth.reference,
        auth_field(USERNAME, PASSWORD),
    )
    .await
    .expect("pull with `auth`");
    assert_eq!(id, by_auth.config_digest);

    let requests = registry.token_requests();
    assert_eq!(
        requests.len(),
        2,
        "one grant per pull, no GET: {requests:?}"
    );
    assert_password_grant(&requests[0], "private/app");
    assert_password_grant(&requests[1], "private/other");
}

#[tokio::test]
async fn pull_with_password_from_the_auth_file() {
    let registry = FakeRegistry::start().await;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{PASSWORD}"));
    let (daemon, _config_dir) =
        daemon_with_auth_file(&registry, serde_json::json!({ "auth": auth }));
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let published = image.publish(&registry, "team/private", "3");
    registry.require_token(password_policy());

    let mut client = daemon.images().await;
    let id = pull(&mut client, &published.reference)
        .await
        .expect("pull with the auth file's password");
    assert_eq!(id, published.config_digest);
    let requests = registry.token_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_password_grant(&requests[0], "team/private");
}

#[tokio::test]
async fn pull_falls_back_to_the_token_get_when_the_service_has_no_oauth_post() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let published = image.publish(&registry, "private/app", "1");
    // As GCR: the POST is answered 404, tokens come by GET.
    registry.require_token(TokenPolicy {
        no_oauth_post: true,
        ..password_policy()
    });
    let mut client = daemon.images().await;

    let id = pull_with_auth(
        &mut client,
        &published.reference,
        password_auth(USERNAME, PASSWORD),
    )
    .await
    .expect("pull with the GET fallback");
    assert_eq!(id, published.config_digest);
    let requests = registry.token_requests();
    let methods: Vec<&str> = requests.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["POST", "GET"]);
    let get = &requests[1];
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{PASSWORD}"));
    assert_eq!(get.authorization, Some(format!("Basic {basic}")));
    assert_eq!(
        get.query,
        [
            ("service".to_string(), TOKEN_SERVICE.to_string()),
            (
                "scope".to_string(),
                "repository:private/app:pull".to_string()
            ),
        ]
    );
}

#[tokio::test]
async fn pull_renews_a_token_that_expires_between_blobs() {
    let registry = FakeRegistry::start().await;
    // One download at a time, so that which request meets an expired token
    // does not depend on timing.
    let daemon = daemon_with("max_concurrent_downloads = 1\n");
    let layers: Vec<Layer> = (0..4u8)
        .map(|i| {
            Layer::gzip(&tar_of(&[(
                &format!("layer-{i}"),
                &noise(32 << 10 | i as usize),
            )]))
        })
        .collect();
    let blobs: Vec<(String, Vec<u8>)> = layers
        .iter()
        .map(|l| (l.digest.clone(), l.blob.clone()))
        .collect();
    let published = Image::new(layers).publish(&registry, "private/layers", "1");
    let uses_per_token = 2;
    registry.require_token(TokenPolicy {
        uses_per_token: Some(uses_per_token),
        ..password_policy()
    });
    let mut client = daemon.images().await;

    let id = pull_with_auth(
        &mut client,
        &published.reference,
        password_auth(USERNAME, PASSWORD),
    )
    .await
    .expect("a pull that outlives its tokens");
    assert_eq!(id, published.config_digest);

    // The manifest's first request has no token; each token then serves
    // `uses_per_token` requests of the manifest, config and 4 layers.
    let served = registry.served();
    let granted = served.iter().filter(|s| s.status == 200).count();
    assert_eq!(granted, 6, "{served:?}");
    let requests = registry.token_requests();
    assert_eq!(
        requests.len(),
        granted.div_ceil(uses_per_token),
        "one grant per expiry: {requests:?}"
    );
    for request in &requests {
        assert_password_grant(request, "private/layers");
    }
    // Every 401 is followed by the same request, answered: a blob met an
    // expired token, and was fetched again from its start.
    let blob_paths: Vec<String> = blobs
        .iter()
        .map(|(digest, _)| FakeRegistry::blob_path("private/layers", digest))
        .collect();
    let mut renewed_blobs = 0;
    for (i, answer) in served.iter().enumerate() {
        if answer.status == 401 {
            assert_eq!(
                served.get(i + 1),
                Some(&Served {
                    status: 200,
                    ..answer.clone()
                }),
                "{served:?}"
            );
            renewed_blobs += usize::from(blob_paths.contains(&answer.path));
        }
    }
    assert_eq!(renewed_blobs, 2, "{served:?}");
    // What the content store holds is each blob once, not a retried one
    // doubled.
    for (digest, blob) in &blobs {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let stored = std::fs::read(daemon.root.join("content/sha256").join(hex)).expect("blob");
        assert!(stored == *blob, "blob {digest} stored as served");
    }
}

#[tokio::test]
async fn pull_with_wrong_password_is_unauthenticated_and_names_the_registry() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let published = image.publish(&registry, "private/app", "1");
    registry.require_token(password_policy());
    let wrong = "pw-wrong-71c2aa";
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{wrong}"));

    pull_refused(
        &daemon,
        &registry,
        &published.reference,
        password_auth(USERNAME, wrong),
        tonic::Code::Unauthenticated,
        &[
            "fetch oauth token from",
            // The service quotes the password; berth does not.
            "POST answered HTTP 401 Unauthorized: password <redacted> is not valid for alice (invalid_grant)",
            "then GET answered HTTP 401 Unauthorized: password <redacted> is not valid for alice (UNAUTHORIZED)",
        ],
        &[wrong, &basic],
    )
    .await;
    let methods: Vec<String> = registry
        .token_requests()
        .into_iter()
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, ["POST", "GET"], "the GET fallback after a 401");
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_of_a_repository_the_credentials_may_not_read_is_permission_denied() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let published = image.publish(&registry, "private/denied", "1");
    registry.require_token(password_policy());
    registry.deny("private/denied");

    pull_refused(
        &daemon,
        &registry,
        &published.reference,
        password_auth(USERNAME, PASSWORD),
        tonic::Code::PermissionDenied,
        &[
            "fetch manifest",
            "denied access",
            "HTTP 403 Forbidden",
            "denied (DENIED)",
        ],
        &[PASSWORD],
    )
    .await;
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_from_a_basic_auth_registry_sends_the_password_it_asks_for() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("secret", b"s")]))]);
    let published = image.publish(&registry, "private/app", "1");
    registry.require_basic(USERNAME, PASSWORD);
    let wrong = "pw-wrong-0d9e4f";

    pull_refused(
        &daemon,
        &registry,
        &published.reference,
        password_auth(USERNAME, wrong),
        tonic::Code::Unauthenticated,
        &["refused the credentials", "HTTP 401 Unauthorized"],
        &[wrong],
    )
    .await;
    assert_nothing_left(&daemon);

    let mut client = daemon.images().await;
    let id = pull_with_auth(
        &mut client,
        &published.reference,
        password_auth(USERNAME, PASSWORD),
    )
    .await
    .expect("pull with basic auth");
    assert_eq!(id, published.config_digest);
    assert!(registry.token_requests().is_empty(), "no token service");
}

#[tokio::test]
async fn pull_without_credentials_takes_an_anonymous_token() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("public", b"p")]))]);
    let published = image.publish(&registry, "library/public", "1");
    // As Docker Hub's public images: a token for anyone, by GET.
    registry.require_token(TokenPolicy {
        anonymous: true,
        ..TokenPolicy::default()
    });

    let mut client = daemon.images().await;
    let id = pull(&mut client, &published.reference)
        .await
        .expect("pull with an anonymous token");
    assert_eq!(id, published.config_digest);
    let requests = registry.token_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].authorization, None);
}

#[tokio::test]
async fn pull_of_unknown_tag_is_manifest_unknown() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("file", b"x")]))]);
    image.publish(&registry, "some/app", "1");
    let missing = registry.reference("some/app", "no-such-tag");

    pull_fails(&daemon, &missing, &["manifest unknown"]).await;
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_refuses_manifest_larger_than_4_mib() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    let image = Image::new(vec![Layer::gzip(&tar_of(&[("file", b"x")]))]);
    let config = serde_json::to_vec(&image.config).expect("config JSON");
    // A valid manifest in all but its size.
    let mut manifest = image.manifest(&config);
    manifest["annotations"] = serde_json::json!({ "padding": "x".repeat(MAX_MANIFEST_BYTES) });
    let manifest = serde_json::to_vec(&manifest).expect("manifest JSON");
    let published = image.publish_with(&registry, "bad/huge-manifest", "1", &manifest);

    // Refused from its declared length, before it is read: the error names
    // the reference (a digest of a body never read cannot be named).
    pull_fails(
        &daemon,
        &published.reference,
        &[&format!(
            "{} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit",
            manifest.len()
        )],
    )
    .await;
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn pull_of_layer_that_never_arrives_times_out() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon_with("pull_progress_timeout_secs = 1\n");
    let layer = Layer::gzip(&tar_of(&[("file", b"never sent")]));
    let digest = layer.digest.clone();
    let published = Image::new(vec![layer]).publish(&registry, "bad/hangs", "1");
    registry.set_fault(&FakeRegistry::blob_path("bad/hangs", &digest), Fault::Hang);

    pull_fails(&daemon, &published.reference, &[&digest]).await;
    assert_nothing_left(&daemon);
    assert_good_pull_works(&daemon, &registry).await;
}

#[tokio::test]
async fn pull_refuses_oversized_manifest_without_reading_all_of_it() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    // Declares 1 GiB, sends 5 MiB and closes: a bounded reader has refused
    // it by then; one that reads to the end sees a broken body instead.
    let body = vec![b' '; MAX_MANIFEST_BYTES + (1 << 20)];
    registry.put_manifest("bad/endless-manifest", "1", OCI_MANIFEST, &body);
    registry.set_fault(
        &FakeRegistry::manifest_path("bad/endless-manifest", "1"),
        Fault::Truncated { declared: 1 << 30 },
    );
    let reference = registry.reference("bad/endless-manifest", "1");

    pull_fails(&daemon, &reference, &[&MAX_MANIFEST_BYTES.to_string()]).await;
    assert_nothing_left(&daemon);
}

#[tokio::test]
async fn failed_pull_stops_its_other_layers_before_answering() {
    let registry = FakeRegistry::start().await;
    let daemon = daemon();
    // The first layer arrives at once and takes a while to unpack (48 MiB
    // of zeros); the second arrives later and is bad.
    let slow = zstd_zeros(48);
    let bad_tar = tar_of(&[("bad", b"bad\n")]);
    let bad = Layer::gzip(&bad_tar);
    let bad_digest = bad.digest.clone();
    let published = Image::new(vec![slow, bad]).publish(&registry, "bad/second-layer", "1");
    registry.put_blob_as("bad/second-layer", &bad_digest, &gzip(&bad_tar, 1));
    registry.set_fault(
        &FakeRegistry::blob_path("bad/second-layer", &bad_digest),
        Fault::Delay(std::time::Duration::from_millis(200)),
    );

    pull_fails(&daemon, &published.reference, &[&bad_digest]).await;
    let in_flight: Vec<PathBuf> = leftovers(&daemon)
        .into_iter()
        .filter(|p| p.starts_with("content/ingest") || p.starts_with("layers-tmp"))
        .collect();
    assert_eq!(
        in_flight,
        Vec::<PathBuf>::new(),
        "nothing of the failed pull is still being written when it answers"
    );
    // Whatever was left running must not publish a layer later either.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_dir(daemon.root.join("layers-tmp"))
        .expect("layers-tmp")
        .next()
        .is_some()
    {
        assert!(std::time::Instant::now() < deadline, "unpack never ended");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let published_layers: Vec<PathBuf> = leftovers(&daemon)
        .into_iter()
        .filter(|p| p.starts_with("layers"))
        .collect();
    assert_eq!(
        published_layers,
        Vec::<PathBuf>::new(),
        "no layer of a failed pull appears later"
    );
}
