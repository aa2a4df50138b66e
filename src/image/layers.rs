//! Unpacked layers: `<root>/layers/<chain-id hex>/` is one layer's files,
//! used as an overlay lower dir. A layer is unpacked into a temporary
//! directory and renamed into place only when complete and verified, so a
//! directory under its chain ID is always a whole layer.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use crate::image::digest::Digest;
use crate::image::store::{DiskUsage, disk_usage};
use crate::image::unpack::{self, Compression, Limits, UnpackError};

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("layer {digest}: {source}")]
    Unpack { digest: Digest, source: UnpackError },
    #[error(
        "layer {digest}: uncompressed content hashes to {actual}, the image config says {expected}"
    )]
    DiffId {
        digest: Digest,
        expected: Digest,
        actual: Digest,
    },
}

/// The three names of one layer: its compressed blob, its uncompressed
/// content, and the content with everything beneath it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerIds {
    pub digest: Digest,
    pub diff_id: Digest,
    pub chain_id: Digest,
}

#[derive(Debug, Clone)]
pub struct LayerStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    tmp: PathBuf,
    counter: AtomicU64,
    /// The usage of each layer walked so far: a layer never changes once
    /// unpacked, and its chain ID names its content.
    usage: Mutex<HashMap<Digest, DiskUsage>>,
}

impl LayerStore {
    /// Opens `<root>/layers`, removing half-unpacked layers a crash left.
    /// Only root may enter it: the root above is open to be passed through
    /// (see `daemon::run`).
    pub fn open(root: &Path) -> Result<LayerStore, LayerError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = root.join("layers");
        let tmp = root.join("layers-tmp");
        for path in [&dir, &tmp] {
            let io = |op| {
                move |source| LayerError::Io {
                    op,
                    path: path.clone(),
                    source,
                }
            };
            std::fs::create_dir_all(path).map_err(io("create"))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .map_err(io("chmod"))?;
        }
        let entries = std::fs::read_dir(&tmp).map_err(|source| LayerError::Io {
            op: "read",
            path: tmp.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if let Err(source) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), "remove stale layer: {source}");
            }
        }
        Ok(LayerStore {
            inner: Arc::new(Inner {
                dir,
                tmp,
                counter: AtomicU64::new(0),
                usage: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The directory the layers are in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The directory of the layer with `chain_id` (which may not exist).
    pub fn path(&self, chain_id: &Digest) -> PathBuf {
        self.inner.dir.join(chain_id.hex())
    }

    pub fn contains(&self, chain_id: &Digest) -> bool {
        self.path(chain_id).is_dir()
    }

    /// Unpacks a layer stream and moves it under `chain_id` once its diffID
    /// is checked. `verify` runs after the stream is consumed and before the
    /// layer becomes visible (the caller checks the compressed digest there).
    /// Blocking: call from a blocking thread.
    pub fn unpack(
        &self,
        reader: impl Read,
        compression: Compression,
        ids: &LayerIds,
        limits: &Limits,
        verify: impl FnOnce() -> Result<(), LayerError>,
    ) -> Result<u64, LayerError> {
        let LayerIds {
            digest,
            diff_id,
            chain_id,
        } = ids;
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = TempDir(self.inner.tmp.join(format!(
            "{}-{}-{n}",
            chain_id.hex(),
            std::process::id()
        )));
        std::fs::create_dir(&tmp.0).map_err(|source| LayerError::Io {
            op: "create",
            path: tmp.0.clone(),
            source,
        })?;
        let result =
            unpack::unpack_layer(reader, compression, &tmp.0, limits).map_err(|source| {
                LayerError::Unpack {
                    digest: digest.clone(),
                    source,
                }
            })?;
        if &result.diff_id != diff_id {
            return Err(LayerError::DiffId {
                digest: digest.clone(),
                expected: diff_id.clone(),
                actual: result.diff_id,
            });
        }
        verify()?;
        let synced = sync_layer(&tmp.0)?;
        tracing::debug!(chain_id = %chain_id, ?synced, "layer synced");
        let final_path = self.path(chain_id);
        match std::fs::rename(&tmp.0, &final_path) {
            Ok(()) => {}
            // Another pull finished the same layer first: theirs is as good.
            Err(e) if final_path.is_dir() => {
                tracing::debug!(chain_id = %chain_id, "layer already unpacked: {e}");
            }
            Err(source) => {
                return Err(LayerError::Io {
                    op: "rename",
                    path: final_path,
                    source,
                });
            }
        }
        Ok(result.size)
    }

    /// Removes the layer; a missing one is not an error.
    pub fn delete(&self, chain_id: &Digest) -> Result<(), LayerError> {
        let path = self.path(chain_id);
        // Renamed away first so that a half-deleted layer is never mistaken
        // for a whole one.
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        let doomed = self
            .inner
            .tmp
            .join(format!("delete-{}-{n}", chain_id.hex()));
        match std::fs::rename(&path, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(LayerError::Io {
                    op: "rename",
                    path,
                    source,
                });
            }
        }
        std::fs::remove_dir_all(&doomed).map_err(|source| LayerError::Io {
            op: "remove",
            path: doomed,
            source,
        })
    }

    /// Chain IDs of every unpacked layer.
    pub fn list(&self) -> Result<Vec<Digest>, LayerError> {
        let entries = std::fs::read_dir(&self.inner.dir).map_err(|source| LayerError::Io {
            op: "read",
            path: self.inner.dir.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .filter_map(|e| {
                format!("sha256:{}", e.file_name().to_string_lossy())
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// Bytes and inodes of every unpacked layer, each layer's directory
    /// included. Each layer is walked once, the first time it is counted:
    /// walking them all on every ImageFsInfo, which kubelet asks every few
    /// seconds, costs ~2 us per file (`du -s` walks /usr's 148 418 inodes in
    /// 0.33 s here), and a node's images hold hundreds of thousands.
    /// Blocking.
    pub fn usage(&self) -> Result<DiskUsage, LayerError> {
        let present: HashSet<Digest> = self.list()?.into_iter().collect();
        let mut known = self
            .inner
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        known.retain(|chain_id, _| present.contains(chain_id));
        let mut total = DiskUsage::default();
        for chain_id in present {
            let layer = match known.get(&chain_id) {
                Some(layer) => *layer,
                None => match layer_usage(&self.path(&chain_id)) {
                    Some(layer) => *known.entry(chain_id).or_insert(layer),
                    None => continue,
                },
            };
            total.bytes += layer.bytes;
            total.inodes += layer.inodes;
        }
        Ok(total)
    }
}

/// A layer's files and its directory; `None` if it was deleted before the
/// walk ended (what was counted is not kept then).
fn layer_usage(dir: &Path) -> Option<DiskUsage> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).ok()?;
    let mut usage = disk_usage(dir);
    usage.bytes += meta.blocks() * 512;
    usage.inodes += 1;
    dir.is_dir().then_some(usage)
}

/// Removed on drop unless it was renamed away.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.0)
        {
            tracing::warn!(path = %self.0.display(), "remove unfinished layer: {e}");
        }
    }
}

/// Layers of at most this many entries are synced one fsync per file and
/// directory; larger ones with one syncfs. An fsync costs about 0.15 ms, a
/// syncfs 20 ms on a quiet filesystem and much more on a busy one.
const FSYNC_MAX_ENTRIES: usize = 128;

/// How a layer was made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Synced {
    /// fsync of every regular file and directory.
    EachFile,
    /// syncfs of the filesystem holding it.
    Filesystem,
}

/// The unpacked files must be on disk before the rename publishes them.
///
/// syncfs does that in one call however many files a layer has, but it
/// also writes out, and waits for, every dirty page of the filesystem: on a
/// busy node, or right after another runtime's pull, hundreds of MB that
/// are not ours, paid by the first layer that commits. A small layer is
/// made durable the way POSIX promises instead, an fsync of each regular
/// file and of each directory (which holds its symlinks, devices and
/// whiteouts). Nothing is followed or opened but regular files and
/// directories, so a fifo or a symlink in the layer is harmless.
fn sync_layer(path: &Path) -> Result<Synced, LayerError> {
    let io_err = |op: &'static str| {
        move |e: rustix::io::Errno| LayerError::Io {
            op,
            path: path.to_path_buf(),
            source: e.into(),
        }
    };
    let root = rustix::fs::open(path, DIR_FLAGS, Mode::empty()).map_err(io_err("open"))?;
    let Some(files) = small_tree(&root, FSYNC_MAX_ENTRIES).map_err(io_err("list"))? else {
        rustix::fs::syncfs(&root).map_err(io_err("syncfs"))?;
        return Ok(Synced::Filesystem);
    };
    for fd in files.iter().chain(std::iter::once(&root)) {
        rustix::fs::fsync(fd).map_err(io_err("fsync"))?;
    }
    Ok(Synced::EachFile)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Open fds of every regular file and directory below `root`, or `None`
/// when the tree has more than `max` entries of any kind.
fn small_tree(root: &OwnedFd, max: usize) -> Result<Option<Vec<OwnedFd>>, rustix::io::Errno> {
    let mut found = Vec::new();
    let mut entries = 0usize;
    // Indexes into `found` of the directories still to list; the root is
    // listed first.
    let mut pending: Vec<Option<usize>> = vec![None];
    while let Some(next) = pending.pop() {
        let dir = match next {
            Some(index) => &found[index],
            None => root,
        };
        let mut children = Vec::new();
        for child in Dir::read_from(dir)? {
            let child = child?;
            let name = child.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            entries += 1;
            if entries > max {
                return Ok(None);
            }
            let kind = match child.file_type() {
                FileType::Unknown => FileType::from_raw_mode(
                    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?.st_mode,
                ),
                known => known,
            };
            let flags = match kind {
                FileType::Directory => DIR_FLAGS,
                FileType::RegularFile => OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                _ => continue,
            };
            children.push((rustix::fs::openat(dir, name, flags, Mode::empty())?, kind));
        }
        for (fd, kind) in children {
            if kind == FileType::Directory {
                pending.push(Some(found.len()));
            }
            found.push(fd);
        }
    }
    Ok(Some(found))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_cksum();
            builder
                .append_data(&mut header, name, *data)
                .expect("append");
        }
        builder.into_inner().expect("finish")
    }

    fn ids(digest: &Digest, diff_id: &Digest) -> LayerIds {
        LayerIds {
            digest: digest.clone(),
            diff_id: diff_id.clone(),
            chain_id: diff_id.clone(),
        }
    }

    fn limits() -> Limits {
        Limits {
            max_uncompressed_bytes: 1 << 30,
            max_entries: 1000,
        }
    }

    /// A layer of `files`, unpacked and verified: its chain ID, the size
    /// `unpack` gave and the tar's length.
    fn unpacked(store: &LayerStore, files: &[(&str, &[u8])]) -> (Digest, u64, u64) {
        let tar = tar_of(files);
        let diff = Digest::of(&tar);
        let size = store
            .unpack(
                &tar[..],
                Compression::None,
                &ids(&diff, &diff),
                &limits(),
                || Ok(()),
            )
            .expect("unpack");
        (diff, size, tar.len() as u64)
    }

    #[test]
    fn verified_layer_appears_under_its_chain_id() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: unpacking layers needs root (ownership, devices)");
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::open(root.path()).expect("open");
        let (diff, size, tar_len) = unpacked(&store, &[("etc/hello", b"hi")]);
        assert_eq!(size, tar_len);
        assert_eq!(
            std::fs::read(store.path(&diff).join("etc/hello")).expect("read"),
            b"hi"
        );
        assert_eq!(store.list().expect("list"), vec![diff.clone()]);
        store.delete(&diff).expect("delete");
        store.delete(&diff).expect("delete again");
        assert!(!store.contains(&diff));
    }

    #[test]
    fn usage_walks_each_layer_once_and_forgets_deleted_ones() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: unpacking layers needs root (ownership, devices)");
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::open(root.path()).expect("open");
        let unpack = |files: &[(&str, &[u8])]| unpacked(&store, files).0;
        assert_eq!(store.usage().expect("usage"), DiskUsage::default());
        let a = unpack(&[("etc/a", &[1u8; 8192])]);
        let one = store.usage().expect("usage");
        // The layer's directory, etc and etc/a.
        assert_eq!(one.inodes, 3, "{one:?}");
        assert_eq!(one, disk_usage(store.inner.dir.as_path()));

        // Kept, not walked again: a file added behind the store's back
        // (layers never change) is not seen.
        std::fs::write(store.path(&a).join("etc/b"), [1u8; 8192]).expect("write");
        assert_eq!(store.usage().expect("usage"), one);

        let b = unpack(&[("usr/b", &[2u8; 4096])]);
        let two = store.usage().expect("usage");
        assert_eq!(two.inodes, one.inodes + 3, "{two:?}");
        store.delete(&a).expect("delete");
        let left = store.usage().expect("usage");
        assert_eq!(left.inodes, 3, "{left:?}");
        assert_eq!(left, disk_usage(store.inner.dir.as_path()));
        store.delete(&b).expect("delete");
        assert_eq!(store.usage().expect("usage"), DiskUsage::default());
    }

    #[test]
    fn small_layers_are_synced_file_by_file_without_opening_anything_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("etc/deep/er")).expect("dirs");
        std::fs::write(layer.join("etc/deep/er/file"), b"data").expect("file");
        // Opening either fifo would block: only files and directories are
        // opened, and symlinks are not followed.
        let outside = dir.path().join("outside-fifo");
        for fifo in [&outside, &layer.join("etc/fifo")] {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                fifo,
                FileType::Fifo,
                Mode::from_raw_mode(0o600),
                0,
            )
            .expect("mkfifo");
        }
        std::os::unix::fs::symlink(&outside, layer.join("etc/link")).expect("symlink");
        assert_eq!(sync_layer(&layer).expect("sync"), Synced::EachFile);

        for i in 0..FSYNC_MAX_ENTRIES {
            std::fs::write(layer.join(format!("f{i}")), b"x").expect("file");
        }
        assert_eq!(sync_layer(&layer).expect("sync"), Synced::Filesystem);
    }

    #[test]
    fn wrong_diff_id_or_failed_verification_leaves_nothing() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: unpacking layers needs root (ownership, devices)");
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::open(root.path()).expect("open");
        let tar = tar_of(&[("a", b"1")]);
        let diff = Digest::of(&tar);
        let wrong = Digest::of(b"other");
        let err = store
            .unpack(
                &tar[..],
                Compression::None,
                &ids(&diff, &wrong),
                &limits(),
                || Ok(()),
            )
            .expect_err("diff id");
        assert!(matches!(err, LayerError::DiffId { .. }), "{err}");
        let err = store
            .unpack(
                &tar[..],
                Compression::None,
                &ids(&diff, &diff),
                &limits(),
                || {
                    Err(LayerError::Io {
                        op: "verify",
                        path: PathBuf::from("/x"),
                        source: std::io::Error::other("digest mismatch"),
                    })
                },
            )
            .expect_err("verify");
        assert!(err.to_string().contains("digest mismatch"));
        assert!(store.list().expect("list").is_empty());
        assert_eq!(
            std::fs::read_dir(root.path().join("layers-tmp"))
                .expect("tmp")
                .count(),
            0
        );
    }
}
