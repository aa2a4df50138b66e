//! Pulling an image: endpoints in order (mirrors, then the registry), the
//! manifest (an index resolved to this node's platform), the config, and the
//! layers, fetched in parallel and unpacked while they stream.
//!
//! Integrity: every manifest, config and layer blob is checked against the
//! digest and size its parent names, and every layer's uncompressed content
//! against the config's diffID, before anything becomes visible.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, FuturesUnordered};
use oci_client::Reference as OciReference;
use reqwest::{StatusCode, header};
use tokio::sync::{Semaphore, mpsc};

use crate::config::{ImageConfig, RegistryConfig};
use crate::image::auth::{AuthError, AuthStore, Credentials, Login};
use crate::image::authorizer::Authorizer;
use crate::image::content::{BlobWriter, ContentError, ContentStore};
use crate::image::digest::Digest;
use crate::image::http_errors::{Refusal, error_chain, registry_errors};
use crate::image::layers::{LayerError, LayerIds, LayerStore};
use crate::image::manifest::{
    self, Descriptor, Fetched, ImageConfigFile, ImageManifest, ManifestError, Platform,
};
use crate::image::mirrors::{self, Endpoint, MirrorError};
use crate::image::reference::Reference;
use crate::image::token::{self, TokenError};
use crate::image::unpack::{Compression, Limits, UnpackError};
use crate::locks::KeyedLocks;

/// gzip cannot expand more than ~1032:1; a layer that claims more is a bomb.
const MAX_EXPANSION: u64 = 1100;
/// Room for tiny layers whose tar padding dwarfs their compressed size.
const EXPANSION_SLACK: u64 = 64 << 20;
const MAX_LAYER_ENTRIES: u64 = 10_000_000;
/// Chunks buffered between the download and the unpacker.
const CHUNKS_IN_FLIGHT: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Of an error answer, enough to quote what the registry said.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Mirrors(#[from] MirrorError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{endpoint}: {message}")]
    Registry { endpoint: String, message: String },
    /// The registry turned the credentials (or their absence) away.
    #[error("{endpoint}: {what}: {message}")]
    Refused {
        endpoint: String,
        what: String,
        refusal: Refusal,
        message: String,
    },
    #[error("{endpoint}: {source}")]
    Manifest {
        endpoint: String,
        source: ManifestError,
    },
    #[error("{endpoint}: served {what} {actual}, expected {expected}")]
    Mismatch {
        endpoint: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("{endpoint}: layer {digest}: {source}")]
    MediaType {
        endpoint: String,
        digest: String,
        source: UnpackError,
    },
    #[error("{endpoint}: no bytes received for {secs} s (image_pull_progress_timeout)")]
    Stalled { endpoint: String, secs: u64 },
    #[error("pull image {image}: {}", join(attempts))]
    Failed {
        image: String,
        /// Each endpoint's failure, in the order tried: mirrors, then the
        /// registry itself.
        attempts: Vec<PullError>,
    },
    #[error("layer {digest}: not fetched, another layer of the image failed")]
    Cancelled { digest: String },
    #[error("unpack task failed: {0}")]
    Task(String),
}

impl PullError {
    /// Whether a registry or its token service refused the pull's
    /// credentials. Of several endpoints, the last one that refused
    /// answers: the image's own registry comes after its mirrors.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            PullError::Refused { refusal, .. } => Some(*refusal),
            PullError::Token(e) => e.refusal(),
            PullError::Failed { attempts, .. } => attempts.iter().rev().find_map(Self::refusal),
            _ => None,
        }
    }
}

fn join(attempts: &[PullError]) -> String {
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A pulled image as the image store records it.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The digest of what the reference resolved to (index or manifest):
    /// the image's repo digest.
    pub repo_digest: Digest,
    /// The config digest: the image ID.
    pub config_digest: Digest,
    pub config: ImageConfigFile,
    pub layers: Vec<LayerIds>,
    /// Manifest, config and compressed layer sizes, as containerd reports.
    pub size: u64,
    /// Every blob the image needs kept: index, manifest, config, layers.
    pub blobs: Vec<Digest>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

pub struct Puller {
    content: ContentStore,
    layers: LayerStore,
    registries: Vec<RegistryConfig>,
    config: ImageConfig,
    auth_file: AuthStore,
    platform: Platform,
    locks: KeyedLocks,
}

/// One endpoint's client and names for one pull.
struct Session<'a> {
    endpoint: &'a Endpoint,
    name: String,
    /// Every request of the pull, manifests and blobs, with what
    /// `authorizer` says.
    http: reqwest::Client,
    authorizer: Authorizer,
}

impl Session<'_> {
    fn reference_for(&self, image: &Reference) -> OciReference {
        let (host, repo) = (self.endpoint.host.clone(), self.endpoint.repository.clone());
        match (image.digest(), image.tag()) {
            (Some(digest), _) => OciReference::with_digest(host, repo, digest.to_string()),
            (None, Some(tag)) => OciReference::with_tag(host, repo, tag.to_string()),
            (None, None) => OciReference::with_tag(host, repo, "latest".to_string()),
        }
    }

    fn reference_by_digest(&self, digest: &Digest) -> OciReference {
        OciReference::with_digest(
            self.endpoint.host.clone(),
            self.endpoint.repository.clone(),
            digest.to_string(),
        )
    }

    fn registry_err(&self, e: impl std::fmt::Display) -> PullError {
        PullError::Registry {
            endpoint: self.name.clone(),
            message: e.to_string(),
        }
    }
}

impl Puller {
    pub fn new(
        content: ContentStore,
        layers: LayerStore,
        registries: Vec<RegistryConfig>,
        config: ImageConfig,
    ) -> Result<Puller, AuthError> {
        let auth_file = AuthStore::load(&config.auth_file)?;
        Ok(Puller {
            content,
            layers,
            registries,
            config,
            auth_file,
            platform: manifest::node_platform(),
            locks: KeyedLocks::default(),
        })
    }

    /// Pulls `image`, trying each endpoint in turn; the error names every
    /// endpoint tried and why it failed.
    pub async fn pull(
        &self,
        image: &Reference,
        credentials: &Credentials,
    ) -> Result<Pulled, PullError> {
        let endpoints = mirrors::endpoints(image, &self.registries, self.config.insecure_loopback)?;
        let mut attempts = Vec::new();
        for endpoint in &endpoints {
            let attempt = async {
                let session = self.session(image, endpoint, credentials)?;
                self.pull_from(image, &session).await
            };
            match attempt.await {
                Ok(pulled) => return Ok(pulled),
                Err(e) => {
                    tracing::info!(image = %image, endpoint = %endpoint.host, "pull attempt failed: {e}");
                    attempts.push(e);
                }
            }
        }
        Err(PullError::Failed {
            image: image.to_string(),
            attempts,
        })
    }

    fn session<'a>(
        &self,
        image: &Reference,
        endpoint: &'a Endpoint,
        credentials: &Credentials,
    ) -> Result<Session<'a>, PullError> {
        let scheme = if endpoint.insecure { "http" } else { "https" };
        let name = format!("{scheme}://{}/{}", endpoint.host, endpoint.repository);
        // kubelet's credentials are for the image's own registry; mirrors
        // and everything else get theirs from the auth file.
        let login = if !endpoint.is_mirror && !credentials.is_empty() {
            credentials.login(image.domain())?
        } else {
            let file_entry = self.auth_file.get(&endpoint.host).or_else(|| {
                (!endpoint.is_mirror)
                    .then(|| self.auth_file.get(image.domain()))
                    .flatten()
            });
            match file_entry {
                Some(creds) => creds.login(&endpoint.host)?,
                None => Login::Anonymous,
            }
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(self.progress_timeout())
            .user_agent(token::USER_AGENT)
            .build()
            .map_err(|e| PullError::Registry {
                endpoint: name.clone(),
                message: format!("HTTP client: {e}"),
            })?;
        // One per endpoint and pull: a token is scoped to one repository.
        let authorizer = Authorizer::new(http.clone(), endpoint, login);
        Ok(Session {
            endpoint,
            name,
            http,
            authorizer,
        })
    }

    fn progress_timeout(&self) -> Duration {
        Duration::from_secs(self.config.pull_progress_timeout_secs)
    }

    async fn pull_from(
        &self,
        image: &Reference,
        session: &Session<'_>,
    ) -> Result<Pulled, PullError> {
        let top = self
            .fetch_manifest(session, &session.reference_for(image), None)
            .await?;
        if let Some(wanted) = image.digest()
            && wanted != &top.0
        {
            return Err(PullError::Mismatch {
                endpoint: session.name.clone(),
                what: "manifest",
                expected: wanted.to_string(),
                actual: top.0.to_string(),
            });
        }
        let repo_digest = top.0.clone();
        let mut manifests = vec![top.clone()];
        let manifest: ImageManifest =
            match manifest::parse(&top.0.to_string(), &top.1).map_err(|source| {
                PullError::Manifest {
                    endpoint: session.name.clone(),
                    source,
                }
            })? {
                Fetched::Image(m) => m,
                Fetched::Index(entries) => {
                    let entry = manifest::select(&top.0.to_string(), &entries, &self.platform)
                        .map_err(|source| PullError::Manifest {
                            endpoint: session.name.clone(),
                            source,
                        })?;
                    let digest =
                        entry
                            .digest(&top.0.to_string())
                            .map_err(|source| PullError::Manifest {
                                endpoint: session.name.clone(),
                                source,
                            })?;
                    let child = self
                        .fetch_manifest(session, &session.reference_by_digest(&digest), Some(entry))
                        .await?;
                    let parsed =
                        manifest::parse(&digest.to_string(), &child.1).map_err(|source| {
                            PullError::Manifest {
                                endpoint: session.name.clone(),
                                source,
                            }
                        })?;
                    manifests.push(child);
                    match parsed {
                        Fetched::Image(m) => m,
                        Fetched::Index(_) => {
                            return Err(session.registry_err(format!(
                                "index {digest} names another index for this platform"
                            )));
                        }
                    }
                }
            };

        let config_digest =
            manifest
                .config
                .digest("config")
                .map_err(|source| PullError::Manifest {
                    endpoint: session.name.clone(),
                    source,
                })?;
        let config_bytes = self
            .fetch_config(session, &manifest.config, &config_digest)
            .await?;
        let (config, diff_ids) =
            manifest::parse_config(&config_digest, &config_bytes, manifest.layers.len()).map_err(
                |source| PullError::Manifest {
                    endpoint: session.name.clone(),
                    source,
                },
            )?;
        let chain_ids = manifest::chain_ids(&diff_ids);

        let mut layers = Vec::with_capacity(manifest.layers.len());
        for ((descriptor, diff_id), chain_id) in manifest.layers.iter().zip(diff_ids).zip(chain_ids)
        {
            let digest = descriptor
                .digest("layer")
                .map_err(|source| PullError::Manifest {
                    endpoint: session.name.clone(),
                    source,
                })?;
            layers.push((
                descriptor,
                LayerIds {
                    digest,
                    diff_id,
                    chain_id,
                },
            ));
        }
        // Every layer job is waited for, also after one fails (the others
        // are told to stop), so that nothing of this pull is still being
        // written when PullImage answers.
        let permits = Semaphore::new(self.config.max_concurrent_downloads);
        let cancel = AtomicBool::new(false);
        let mut jobs: FuturesUnordered<_> = layers
            .iter()
            .map(|(descriptor, ids)| self.ensure_layer(session, descriptor, ids, &permits, &cancel))
            .collect();
        let mut first_error = None;
        while let Some(result) = jobs.next().await {
            if let Err(e) = result {
                cancel.store(true, Ordering::Relaxed);
                first_error.get_or_insert(e);
            }
        }
        drop(jobs);
        if let Some(e) = first_error {
            return Err(e);
        }

        // Config and manifests go in last: a manifest in the store means its
        // image is whole.
        self.content.write_bytes(&config_digest, &config_bytes)?;
        for (digest, bytes) in &manifests {
            self.content.write_bytes(digest, bytes)?;
        }
        let size = manifests.last().map_or(0, |(_, b)| b.len() as u64)
            + config_bytes.len() as u64
            + manifest.layers.iter().map(|l| l.size).sum::<u64>();
        let mut blobs: Vec<Digest> = manifests.iter().map(|(d, _)| d.clone()).collect();
        blobs.push(config_digest.clone());
        blobs.extend(layers.iter().map(|(_, ids)| ids.digest.clone()));
        Ok(Pulled {
            repo_digest,
            config_digest,
            config,
            layers: layers.into_iter().map(|(_, ids)| ids).collect(),
            size,
            blobs,
            annotations: manifest.annotations,
        })
    }

    /// Fetches a manifest; when a descriptor names it, its digest and size
    /// must match.
    async fn fetch_manifest(
        &self,
        session: &Session<'_>,
        reference: &OciReference,
        expected: Option<&Descriptor>,
    ) -> Result<(Digest, Bytes), PullError> {
        let bytes = fetch_bounded_manifest(session, reference).await?;
        let digest = Digest::of(&bytes);
        if let Some(descriptor) = expected {
            if descriptor.digest != digest.to_string() {
                return Err(PullError::Mismatch {
                    endpoint: session.name.clone(),
                    what: "manifest",
                    expected: descriptor.digest.clone(),
                    actual: digest.to_string(),
                });
            }
            if descriptor.size != bytes.len() as u64 {
                return Err(PullError::Mismatch {
                    endpoint: session.name.clone(),
                    what: "manifest size",
                    expected: descriptor.size.to_string(),
                    actual: bytes.len().to_string(),
                });
            }
        }
        Ok((digest, bytes))
    }

    async fn fetch_config(
        &self,
        session: &Session<'_>,
        descriptor: &Descriptor,
        digest: &Digest,
    ) -> Result<Vec<u8>, PullError> {
        if descriptor.size > manifest::MAX_CONFIG_BYTES {
            return Err(PullError::Content(ContentError::TooLarge {
                digest: digest.clone(),
                limit: manifest::MAX_CONFIG_BYTES,
            }));
        }
        if self.content.contains(digest) {
            return Ok(self.content.read(digest, manifest::MAX_CONFIG_BYTES)?);
        }
        let mut stream = fetch_blob(session, digest, "config").await?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| session.registry_err(format!("fetch config {digest}: {e}")))?;
            if (bytes.len() + chunk.len()) as u64 > descriptor.size {
                return Err(PullError::Content(ContentError::TooLarge {
                    digest: digest.clone(),
                    limit: descriptor.size,
                }));
            }
            bytes.extend_from_slice(&chunk);
        }
        // Verified here, stored only once the whole image is: a pull that
        // fails later must not leave its config behind.
        let actual = Digest::of(&bytes);
        if &actual != digest || bytes.len() as u64 != descriptor.size {
            return Err(PullError::Mismatch {
                endpoint: session.name.clone(),
                what: "config",
                expected: format!("{digest} ({} bytes)", descriptor.size),
                actual: format!("{actual} ({} bytes)", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Makes sure the layer is unpacked: from the content store if its blob
    /// is there, else streamed from the registry into both the content store
    /// and the unpacker at once.
    async fn ensure_layer(
        &self,
        session: &Session<'_>,
        descriptor: &Descriptor,
        ids: &LayerIds,
        permits: &Semaphore,
        cancel: &AtomicBool,
    ) -> Result<(), PullError> {
        let _single_flight = self.locks.lock(ids.chain_id.hex()).await;
        if self.layers.contains(&ids.chain_id) {
            return Ok(());
        }
        let cancelled = || PullError::Cancelled {
            digest: ids.digest.to_string(),
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        let compression =
            Compression::from_media_type(&descriptor.media_type).map_err(|source| {
                PullError::MediaType {
                    endpoint: session.name.clone(),
                    digest: descriptor.digest.clone(),
                    source,
                }
            })?;
        let permit = permits
            .acquire()
            .await
            .map_err(|e| PullError::Task(format!("download permits: {e}")))?;
        let limits = Limits {
            max_uncompressed_bytes: descriptor
                .size
                .saturating_mul(MAX_EXPANSION)
                .saturating_add(EXPANSION_SLACK),
            max_entries: MAX_LAYER_ENTRIES,
        };

        if self.content.contains(&ids.digest) {
            let file = self.content.open_blob(&ids.digest)?;
            let (layers, ids) = (self.layers.clone(), ids.clone());
            tokio::task::spawn_blocking(move || {
                layers.unpack(
                    std::io::BufReader::new(file),
                    compression,
                    &ids,
                    &limits,
                    || Ok(()),
                )
            })
            .await
            .map_err(|e| PullError::Task(e.to_string()))??;
            return Ok(());
        }

        let mut stream = fetch_blob(session, &ids.digest, "layer").await?;
        let writer = self.content.writer(&ids.digest, Some(descriptor.size))?;
        let (tx, rx) = mpsc::channel::<std::io::Result<Option<Bytes>>>(CHUNKS_IN_FLIGHT);
        let tee = Arc::new(Mutex::new(Tee {
            rx,
            current: Bytes::new(),
            ended: false,
            writer: Some(writer),
        }));
        let (layers, blocking_ids, reader_tee) = (self.layers.clone(), ids.clone(), tee.clone());
        let unpacker = tokio::task::spawn_blocking(move || {
            let reader = TeeReader(reader_tee);
            layers.unpack(reader, compression, &blocking_ids, &limits, move || {
                commit_tee(&tee)
            })
        });

        let timeout = self.progress_timeout();
        let mut stalled = false;
        let mut aborted = false;
        loop {
            if cancel.load(Ordering::Relaxed) {
                // No end marker: the unpacker fails and removes its work.
                aborted = true;
                break;
            }
            match tokio::time::timeout(timeout, stream.next()).await {
                Ok(Some(chunk)) => {
                    let failed = chunk.is_err();
                    if tx.send(chunk.map(Some)).await.is_err() || failed {
                        break; // the unpacker stopped (and says why) or the stream broke
                    }
                }
                Ok(None) => {
                    let _ = tx.send(Ok(None)).await;
                    break;
                }
                Err(_) => {
                    stalled = true;
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "download stalled",
                        )))
                        .await;
                    break;
                }
            }
        }
        drop(tx);
        // The permit bounds downloads: the next layer's request goes out
        // while this one's last chunks are unpacked and it is synced, which
        // kept a core idle between layers.
        drop(permit);
        let result = unpacker.await.map_err(|e| PullError::Task(e.to_string()))?;
        if aborted {
            return Err(cancelled());
        }
        if stalled {
            return Err(PullError::Stalled {
                endpoint: session.name.clone(),
                secs: timeout.as_secs(),
            });
        }
        result.map(|_| ()).map_err(|e| match e {
            LayerError::Unpack {
                source: UnpackError::Read { .. } | UnpackError::Decompress { .. },
                ..
            } => session.registry_err(format!("fetch layer {}: {e}", ids.digest)),
            other => PullError::Layer(other),
        })
    }
}

/// GETs a manifest and refuses it as soon as it is larger than
/// [`manifest::MAX_MANIFEST_BYTES`], declared or streamed: a registry cannot
/// make the daemon buffer more than that.
async fn fetch_bounded_manifest(
    session: &Session<'_>,
    reference: &OciReference,
) -> Result<Bytes, PullError> {
    let what = reference.whole();
    let fail = |message: String| session.registry_err(format!("fetch manifest {what}: {message}"));
    let too_large = |size: u64| PullError::Manifest {
        endpoint: session.name.clone(),
        source: ManifestError::TooLarge {
            digest: what.clone(),
            size,
            limit: manifest::MAX_MANIFEST_BYTES,
        },
    };
    let scheme = if session.endpoint.insecure {
        "http"
    } else {
        "https"
    };
    let target = reference
        .digest()
        .or_else(|| reference.tag())
        .unwrap_or("latest");
    let url = format!(
        "{scheme}://{}/v2/{}/manifests/{target}",
        session.endpoint.host, session.endpoint.repository
    );
    let accept = manifest::ACCEPT.join(", ");
    let response = send_authorized(
        session,
        &url,
        Some(&accept),
        &format!("fetch manifest {what}"),
    )
    .await?;
    let status = response.status();
    if let Some(declared) = response.content_length()
        && declared > manifest::MAX_MANIFEST_BYTES
    {
        return Err(too_large(declared));
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| fail(error_chain(&e)))?;
        if (body.len() + chunk.len()) as u64 > manifest::MAX_MANIFEST_BYTES {
            return Err(too_large((body.len() + chunk.len()) as u64));
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        return Err(fail(format!(
            "HTTP {status}: {}",
            session.authorizer.redact(&registry_errors(&body))
        )));
    }
    Ok(Bytes::from(body))
}

/// Opens blob `digest` of the session's repository (`what` it is, for
/// errors) as a stream of its bytes.
async fn fetch_blob(
    session: &Session<'_>,
    digest: &Digest,
    what: &str,
) -> Result<BoxStream<'static, std::io::Result<Bytes>>, PullError> {
    let scheme = if session.endpoint.insecure {
        "http"
    } else {
        "https"
    };
    let url = format!(
        "{scheme}://{}/v2/{}/blobs/{digest}",
        session.endpoint.host, session.endpoint.repository
    );
    let what = format!("fetch {what} {digest}");
    let response = send_authorized(session, &url, None, &what).await?;
    let status = response.status();
    if !status.is_success() {
        let body = error_body(response).await;
        return Err(session.registry_err(format!(
            "{what}: HTTP {status}: {}",
            session.authorizer.redact(&registry_errors(&body))
        )));
    }
    Ok(response
        .bytes_stream()
        .map(|chunk| chunk.map_err(|e| std::io::Error::other(error_chain(&e))))
        .boxed())
}

/// GETs `url` of the session's endpoint with what the authorizer says.
/// A 401 is answered once: it is the registry's first challenge, or the
/// token expired during the pull. A second 401, or a 403, is a refusal.
/// Nothing of an answer that is retried has been read as content, so a
/// blob whose request is retried starts again from its first byte.
async fn send_authorized(
    session: &Session<'_>,
    url: &str,
    accept: Option<&str>,
    what: &str,
) -> Result<reqwest::Response, PullError> {
    let mut answered = false;
    loop {
        let sent = session.authorizer.authorization().await;
        let mut request = session.http.get(url);
        if let Some(accept) = accept {
            request = request.header(header::ACCEPT, accept);
        }
        if let Some(authorization) = &sent.header {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        let response = request
            .send()
            .await
            .map_err(|e| session.registry_err(format!("{what}: {}", error_chain(&e))))?;
        let status = response.status();
        let Some(refusal) = Refusal::of_status(status.as_u16()) else {
            return Ok(response);
        };
        // A redirect to storage elsewhere went without Authorization
        // (reqwest drops it across hosts): its 401 or 403 is not about
        // berth's credentials.
        if !same_origin(response.url(), url) {
            return Ok(response);
        }
        let challenges: Vec<String> = response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .map(str::to_string)
            .collect();
        let body = error_body(response).await;
        if status == StatusCode::UNAUTHORIZED
            && !answered
            && session.authorizer.unauthorized(&sent, &challenges).await?
        {
            answered = true;
            continue;
        }
        // Registries that must not tell which repositories exist (Docker
        // Hub) answer 401 for a missing one too, hence containerd's "pull
        // access denied, repository does not exist or may require
        // authorization".
        let host = &session.endpoint.host;
        let verdict = match refusal {
            Refusal::Denied => format!("{host} denied access"),
            Refusal::Unauthenticated if session.authorizer.has_credentials() => {
                format!("{host} refused the credentials (or the repository does not exist)")
            }
            Refusal::Unauthenticated => format!(
                "{host} requires credentials and none were given (or the repository does not exist)"
            ),
        };
        return Err(PullError::Refused {
            endpoint: session.name.clone(),
            what: what.to_string(),
            refusal,
            message: format!(
                "{verdict} (HTTP {status}): {}",
                session.authorizer.redact(&registry_errors(&body))
            ),
        });
    }
}

fn same_origin(answered: &reqwest::Url, asked: &str) -> bool {
    reqwest::Url::parse(asked).is_ok_and(|asked| {
        asked.scheme() == answered.scheme()
            && asked.host_str() == answered.host_str()
            && asked.port_or_known_default() == answered.port_or_known_default()
    })
}

/// The start of an error answer's body; what cannot be read is left out.
async fn error_body(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == MAX_ERROR_BODY_BYTES {
            break;
        }
    }
    body
}

/// The download's chunks, written to the content store as they are read.
struct Tee {
    /// `Ok(None)` marks the end of the blob; a channel closed without it is
    /// a download that stopped early.
    rx: mpsc::Receiver<std::io::Result<Option<Bytes>>>,
    current: Bytes,
    ended: bool,
    writer: Option<BlobWriter>,
}

impl Tee {
    /// The next chunk, already in the content store; empty at the end.
    fn next_chunk(&mut self) -> std::io::Result<Bytes> {
        if self.ended {
            return Ok(Bytes::new());
        }
        match self.rx.blocking_recv() {
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "download stopped before the end of the blob",
            )),
            Some(Err(e)) => Err(e),
            Some(Ok(None)) => {
                self.ended = true;
                Ok(Bytes::new())
            }
            Some(Ok(Some(chunk))) => {
                if let Some(writer) = self.writer.as_mut() {
                    writer.write_chunk(&chunk).map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                    })?;
                }
                Ok(chunk)
            }
        }
    }
}

struct TeeReader(Arc<Mutex<Tee>>);

impl Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut tee = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while tee.current.is_empty() {
            let chunk = tee.next_chunk()?;
            if chunk.is_empty() {
                return Ok(0);
            }
            tee.current = chunk;
        }
        let n = buf.len().min(tee.current.len());
        buf[..n].copy_from_slice(&tee.current[..n]);
        tee.current = tee.current.slice(n..);
        Ok(n)
    }
}

/// After the unpacker is done: drains what the decompressor did not need
/// (trailing bytes still belong to the blob) and verifies the blob.
fn commit_tee(tee: &Arc<Mutex<Tee>>) -> Result<(), LayerError> {
    let mut tee = tee.lock().unwrap_or_else(|p| p.into_inner());
    let io_err = |e: std::io::Error| LayerError::Io {
        op: "download",
        path: std::path::PathBuf::from("layer blob"),
        source: e,
    };
    loop {
        let chunk = tee.next_chunk().map_err(io_err)?;
        if chunk.is_empty() {
            break;
        }
    }
    let writer = tee
        .writer
        .take()
        .ok_or_else(|| io_err(std::io::Error::other("blob writer already used")))?;
    writer.commit().map_err(|e| {
        io_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.to_string(),
        ))
    })?;
    Ok(())
}
