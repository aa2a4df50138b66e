//! The images a node has: one record per image ID (config digest) with its
//! tags and repo digests, kept in the metadata store; lookup by ID, ID
//! prefix, tag or digest as kubelet and crictl name images; removal and
//! garbage collection of blobs and layers no image needs.
//!
//! Pulls hold the collector's lock shared and a collection holds it
//! exclusively, so nothing a pull is writing is ever collected.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::config::{ImageConfig, RegistryConfig};
use crate::image::auth::{AuthError, Credentials};
use crate::image::content::{ContentError, ContentStore};
use crate::image::digest::Digest;
use crate::image::layers::{LayerError, LayerIds, LayerStore};
use crate::image::manifest::ImageConfigFile;
use crate::image::pull::{PullError, Puller};
use crate::image::reference::{Reference, ReferenceError};
use crate::store::{Kind, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("image name {name:?} matches several images: {ids}")]
    Ambiguous { name: String, ids: String },
    #[error("image {id} is used by container {container}; remove the container first")]
    InUse { id: String, container: String },
    #[error("image store task failed: {0}")]
    Task(String),
}

/// What the metadata store keeps of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: Digest,
    /// Normalized names with tag: `docker.io/library/busybox:latest`.
    pub repo_tags: Vec<String>,
    /// Normalized names with digest: `docker.io/library/busybox@sha256:…`.
    pub repo_digests: Vec<String>,
    /// Manifest, config and compressed layers, as containerd reports.
    pub size: u64,
    pub config: ImageConfigFile,
    pub layers: Vec<LayerIds>,
    /// Every blob the image keeps in the content store.
    pub blobs: Vec<Digest>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub pinned: bool,
}

impl ImageRecord {
    /// The image's user as CRI reports it: a numeric uid, or a name.
    pub fn user(&self) -> (Option<i64>, String) {
        let user = self
            .config
            .config
            .user
            .split(':')
            .next()
            .unwrap_or_default();
        match user.parse::<i64>() {
            Ok(uid) => (Some(uid), String::new()),
            Err(_) => (None, user.to_string()),
        }
    }
}

/// Bytes and inodes used under a directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub bytes: u64,
    pub inodes: u64,
}

pub struct ImageStore {
    store: Store,
    content: ContentStore,
    layers: LayerStore,
    puller: Puller,
    root: PathBuf,
    collector: RwLock<()>,
    writable: Mutex<Option<Measured>>,
}

/// The containers' writable layers' usage, and when it was measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    at: Instant,
    usage: DiskUsage,
}

/// How long a measure of the writable layers answers ImageFsInfo. Their
/// walk took ~50 ms at 1000 containers (docs/performance.md, session 12),
/// and kubelet asks several times in 10 s (eviction manager, summary API,
/// image GC). containerd answers from the usage its snapshotter collects
/// every 10 s. The image filesystem's usage is cheap (one listing of the
/// blobs, the layers' sizes kept) and always current, so a pull or a removal
/// shows at once.
const WRITABLE_USAGE_MAX_AGE: Duration = Duration::from_secs(10);

impl Measured {
    fn current(this: Option<Measured>, now: Instant) -> Option<DiskUsage> {
        this.filter(|m| now.saturating_duration_since(m.at) < WRITABLE_USAGE_MAX_AGE)
            .map(|m| m.usage)
    }
}

impl ImageStore {
    pub fn open(
        root: &Path,
        store: Store,
        registries: Vec<RegistryConfig>,
        config: ImageConfig,
    ) -> Result<Arc<ImageStore>, ImageError> {
        let content = ContentStore::open(root)?;
        let layers = LayerStore::open(root)?;
        let puller = Puller::new(content.clone(), layers.clone(), registries, config)?;
        Ok(Arc::new(ImageStore {
            store,
            content,
            layers,
            puller,
            root: root.to_path_buf(),
            collector: RwLock::new(()),
            writable: Mutex::new(None),
        }))
    }

    /// Pulls `name` and records it under its tag and repo digest. A tag that
    /// pointed at another image moves to this one.
    pub async fn pull(
        self: &Arc<Self>,
        name: &str,
        credentials: &Credentials,
    ) -> Result<ImageRecord, ImageError> {
        let requested = Reference::parse(name)?;
        // containerd keeps only the digest of `name:tag@digest`.
        let image = requested.docker_ref();
        let pulling = self.collector.read().await;
        let pulled = match self.puller.pull(&image, credentials).await {
            Ok(pulled) => pulled,
            Err(e) => {
                // What the failed pull stored (layers that did arrive) is
                // collected once no other pull is running.
                drop(pulling);
                let _collecting = self.collector.write().await;
                let this = self.clone();
                if let Err(gc) = blocking(move || this.collect_garbage()).await? {
                    tracing::warn!("collect after failed pull: {gc}");
                }
                return Err(e.into());
            }
        };
        let tag = image.digest().is_none().then(|| image.to_string());
        let repo_digest = image.with_digest(pulled.repo_digest.clone()).to_string();
        let this = self.clone();
        blocking(move || {
            this.store.write(|batch| {
                let id = pulled.config_digest.to_string();
                let mut record: ImageRecord =
                    batch.get(Kind::Image, &id)?.unwrap_or_else(|| ImageRecord {
                        id: pulled.config_digest.clone(),
                        repo_tags: Vec::new(),
                        repo_digests: Vec::new(),
                        size: pulled.size,
                        config: pulled.config.clone(),
                        layers: pulled.layers.clone(),
                        blobs: Vec::new(),
                        annotations: pulled.annotations.clone(),
                        pinned: false,
                    });
                if let Some(tag) = &tag {
                    for (other_id, mut other) in batch.list::<ImageRecord>(Kind::Image)? {
                        if other_id != id && other.repo_tags.contains(tag) {
                            other.repo_tags.retain(|t| t != tag);
                            batch.put(Kind::Image, &other_id, &other)?;
                        }
                    }
                    push_unique(&mut record.repo_tags, tag.clone());
                }
                push_unique(&mut record.repo_digests, repo_digest.clone());
                for blob in &pulled.blobs {
                    if !record.blobs.contains(blob) {
                        record.blobs.push(blob.clone());
                    }
                }
                batch.put(Kind::Image, &id, &record)?;
                Ok(record)
            })
        })
        .await?
        .map_err(ImageError::from)
    }

    pub async fn list(self: &Arc<Self>) -> Result<Vec<ImageRecord>, ImageError> {
        let this = self.clone();
        let records = blocking(move || this.store.list::<ImageRecord>(Kind::Image)).await??;
        Ok(records.into_iter().map(|(_, r)| r).collect())
    }

    /// The image `name` refers to: an ID (with or without `sha256:`), a
    /// reference by tag or digest, or a unique ID prefix.
    pub async fn resolve(self: &Arc<Self>, name: &str) -> Result<Option<ImageRecord>, ImageError> {
        let records = self.list().await?;
        resolve_in(&records, name)
    }

    /// Removes `name`: by ID the whole image; by tag or digest only that
    /// name, and the image with its last name. Unknown names are not an
    /// error (CRI: RemoveImage is idempotent).
    pub async fn remove(self: &Arc<Self>, name: &str) -> Result<(), ImageError> {
        let _collecting = self.collector.write().await;
        let Some(record) = self.resolve(name).await? else {
            return Ok(());
        };
        let by_id = is_id_name(&record, name);
        let this = self.clone();
        let name = name.to_string();
        blocking(move || -> Result<(), ImageError> {
            let id = record.id.to_string();
            let removed = this.store.write(|batch| {
                let Some(mut current) = batch.get::<ImageRecord>(Kind::Image, &id)? else {
                    return Ok(None);
                };
                // A tag goes alone while the image has others; the last tag,
                // a digest or the ID take the whole image.
                if !by_id
                    && let Ok(reference) = Reference::parse(&name)
                    && reference.digest().is_none()
                {
                    let tag = reference.to_string();
                    current.repo_tags.retain(|t| *t != tag);
                    if !current.repo_tags.is_empty() {
                        batch.put(Kind::Image, &id, &current)?;
                        return Ok(None);
                    }
                }
                if let Some(container) = user_of(batch, &id)? {
                    return Ok(Some(Err(container)));
                }
                batch.delete(Kind::Image, &id)?;
                Ok(Some(Ok(())))
            })?;
            match removed {
                Some(Err(container)) => Err(ImageError::InUse { id, container }),
                Some(Ok(())) => this.collect_garbage(),
                None => Ok(()),
            }
        })
        .await?
    }

    /// Deletes blobs and layers that no recorded image references.
    fn collect_garbage(&self) -> Result<(), ImageError> {
        let records = self.store.list::<ImageRecord>(Kind::Image)?;
        let mut blobs = BTreeSet::new();
        let mut layers = BTreeSet::new();
        for (_, record) in &records {
            blobs.extend(record.blobs.iter().cloned());
            blobs.insert(record.id.clone());
            layers.extend(record.layers.iter().map(|l| l.chain_id.clone()));
        }
        for digest in self.content.list()? {
            if !blobs.contains(&digest) {
                self.content.delete(&digest)?;
            }
        }
        for chain_id in self.layers.list()? {
            if !layers.contains(&chain_id) {
                self.layers.delete(&chain_id)?;
            }
        }
        Ok(())
    }

    /// Usage of the image filesystem (content store and layers) and of the
    /// containers' writable layers, the latter as measured at most
    /// [`WRITABLE_USAGE_MAX_AGE`] ago.
    pub async fn usage(self: &Arc<Self>) -> Result<(DiskUsage, DiskUsage), ImageError> {
        let this = self.clone();
        blocking(move || {
            let content = this.content.usage()?;
            let layers = this.layers.usage()?;
            let containers = this.writable_usage();
            Ok((
                DiskUsage {
                    bytes: content.bytes + layers.bytes,
                    inodes: content.inodes + layers.inodes,
                },
                containers,
            ))
        })
        .await?
    }

    /// The writable layers' usage, measured again when the last measure is
    /// too old. Two callers may both measure; the later one is kept.
    fn writable_usage(&self) -> DiskUsage {
        let kept = *self.writable.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(usage) = Measured::current(kept, Instant::now()) {
            return usage;
        }
        let usage = disk_usage(&self.root.join("containers"));
        *self.writable.lock().unwrap_or_else(PoisonError::into_inner) = Some(Measured {
            at: Instant::now(),
            usage,
        });
        usage
    }

    /// The unpacked layers, for container snapshots.
    pub fn layers(&self) -> LayerStore {
        self.layers.clone()
    }

    /// The directory image and container filesystems live under.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn push_unique(list: &mut Vec<String>, value: String) {
    if !list.contains(&value) {
        list.push(value);
    }
}

/// Containers record the image they run as `image_id`; one that does keeps
/// its image from being removed.
/// A container whose image, or one of whose image volumes, is image `id`.
fn user_of(batch: &crate::store::Batch<'_>, id: &str) -> Result<Option<String>, StoreError> {
    let uses = |c: &serde_json::Value| {
        c.get("image_id").and_then(|v| v.as_str()) == Some(id)
            || c.get("volume_image_ids")
                .and_then(|v| v.as_array())
                .is_some_and(|ids| ids.iter().any(|v| v.as_str() == Some(id)))
    };
    Ok(batch
        .list::<serde_json::Value>(Kind::Container)?
        .into_iter()
        .find(|(_, c)| uses(c))
        .map(|(key, _)| key))
}

fn is_id_name(record: &ImageRecord, name: &str) -> bool {
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    record.id.hex().starts_with(hex)
        && !hex.is_empty()
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

fn resolve_in(records: &[ImageRecord], name: &str) -> Result<Option<ImageRecord>, ImageError> {
    let name = name.trim();
    if name.is_empty() {
        return Ok(None);
    }
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if let Some(record) = records.iter().find(|r| r.id.hex() == hex) {
        return Ok(Some(record.clone()));
    }
    if let Ok(reference) = Reference::parse(name) {
        let full = reference.docker_ref().to_string();
        if let Some(record) = records
            .iter()
            .find(|r| r.repo_tags.contains(&full) || r.repo_digests.contains(&full))
        {
            return Ok(Some(record.clone()));
        }
    }
    // A truncated ID, as `crictl images` prints them.
    if hex.len() >= 3
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        let matches: Vec<&ImageRecord> = records
            .iter()
            .filter(|r| r.id.hex().starts_with(hex))
            .collect();
        return match matches.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one).clone())),
            many => Err(ImageError::Ambiguous {
                name: name.to_string(),
                ids: many
                    .iter()
                    .map(|r| r.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        };
    }
    Ok(None)
}

/// Bytes (allocated blocks) and inodes of the files under `dir`, each
/// hard-linked file once and, as `du -x` counts, nothing on another
/// filesystem. A running container's `rootfs` is an overlay mount over the
/// image's layers (counted with the image) and its `upper` directory
/// (counted beside it): walking into the mounts counted each image once per
/// container, and took 1.25 s at 1000 containers for ImageFsInfo, which
/// kubelet asks every few seconds.
pub(crate) fn disk_usage(dir: &Path) -> DiskUsage {
    use std::os::unix::fs::MetadataExt;
    let mut usage = DiskUsage::default();
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return usage;
    };
    let mut seen = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.dev() != top.dev() {
                continue;
            }
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.bytes += meta.blocks() * 512;
            usage.inodes += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    usage
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Task(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: char, tags: &[&str], digests: &[&str]) -> ImageRecord {
        ImageRecord {
            id: format!("sha256:{}", id.to_string().repeat(64))
                .parse()
                .expect("digest"),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: digests.iter().map(|s| s.to_string()).collect(),
            size: 1,
            config: ImageConfigFile::default(),
            layers: Vec::new(),
            blobs: Vec::new(),
            annotations: BTreeMap::new(),
            pinned: false,
        }
    }

    #[test]
    fn names_resolve_by_id_tag_digest_and_unique_prefix() {
        let digest_ref = format!("docker.io/library/busybox@sha256:{}", "9".repeat(64));
        let records = vec![
            record('a', &["docker.io/library/busybox:latest"], &[&digest_ref]),
            record('b', &["registry.k8s.io/pause:3.10"], &[]),
        ];
        let id_of = |name: &str| {
            resolve_in(&records, name)
                .expect("resolve")
                .map(|r| r.id.hex()[..1].to_string())
        };
        assert_eq!(id_of("busybox").as_deref(), Some("a"));
        assert_eq!(
            id_of("docker.io/library/busybox:latest").as_deref(),
            Some("a")
        );
        assert_eq!(
            id_of(&format!("busybox@sha256:{}", "9".repeat(64))).as_deref(),
            Some("a")
        );
        assert_eq!(
            id_of(&format!("sha256:{}", "b".repeat(64))).as_deref(),
            Some("b")
        );
        assert_eq!(id_of(&"b".repeat(64)).as_deref(), Some("b"));
        assert_eq!(id_of("bbbb").as_deref(), Some("b"));
        assert_eq!(id_of("registry.k8s.io/pause:3.10").as_deref(), Some("b"));
        assert_eq!(id_of("busybox:other"), None);
        assert_eq!(id_of("cccc"), None);
        assert_eq!(id_of(""), None);
    }

    #[test]
    fn a_writable_layers_measure_answers_for_its_max_age_only() {
        let at = Instant::now();
        let usage = DiskUsage {
            bytes: 4096,
            inodes: 3,
        };
        let measured = Some(Measured { at, usage });
        assert_eq!(Measured::current(measured, at), Some(usage));
        let almost = at + WRITABLE_USAGE_MAX_AGE - Duration::from_millis(1);
        assert_eq!(Measured::current(measured, almost), Some(usage));
        assert_eq!(
            Measured::current(measured, at + WRITABLE_USAGE_MAX_AGE),
            None
        );
        assert_eq!(Measured::current(None, at), None);
    }

    #[test]
    fn disk_usage_stops_at_mount_points() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: mounting tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("own"), vec![1u8; 8192]).expect("write");
        let mounted = dir.path().join("rootfs");
        std::fs::create_dir(&mounted).expect("mkdir");
        nix::mount::mount(
            Some("tmpfs"),
            &mounted,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount tmpfs");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(&mounted);
        std::fs::write(mounted.join("big"), vec![1u8; 1 << 20]).expect("write");

        let usage = disk_usage(dir.path());
        assert_eq!(usage.inodes, 1, "only `own`: {usage:?}");
        assert!(usage.bytes >= 8192 && usage.bytes < 1 << 20, "{usage:?}");
    }

    #[test]
    fn ambiguous_prefixes_are_refused() {
        let mut a = record('a', &[], &[]);
        let mut b = record('a', &[], &[]);
        a.id = format!("sha256:ab{}", "0".repeat(62))
            .parse()
            .expect("digest");
        b.id = format!("sha256:ab{}", "1".repeat(62))
            .parse()
            .expect("digest");
        let err = resolve_in(&[a, b], "ab0").expect("unique").expect("found");
        assert!(err.id.hex().starts_with("ab0"));
        let records = vec![record('c', &[], &[]), {
            let mut r = record('c', &[], &[]);
            r.id = format!("sha256:ccc{}", "d".repeat(61))
                .parse()
                .expect("digest");
            r
        }];
        assert!(matches!(
            resolve_in(&records, "ccc"),
            Err(ImageError::Ambiguous { .. })
        ));
    }

    #[test]
    fn user_is_a_uid_or_a_name() {
        let mut r = record('a', &[], &[]);
        r.config.config.user = "1000:1000".into();
        assert_eq!(r.user(), (Some(1000), String::new()));
        r.config.config.user = "berth".into();
        assert_eq!(r.user(), (None, "berth".to_string()));
        r.config.config.user = String::new();
        assert_eq!(r.user(), (None, String::new()));
    }
}
