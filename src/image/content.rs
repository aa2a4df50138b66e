//! The content store: blobs (manifests, configs, layers) named by their
//! sha256 digest under `<root>/content/sha256/<hex>`.
//!
//! The one thing to know before changing it: a file appears under `sha256/`
//! only after its bytes were hashed and counted on the way in and matched the
//! digest (and size) they were asked for. Everything is written to a unique
//! file in `<root>/content/ingest/` first, fsynced, then renamed into place,
//! so a reader never sees a partial or unverified blob, and a crash leaves
//! at most garbage in `ingest/`, which `open` clears.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::image::digest::{Digest, SHA256_PREFIX};
use crate::image::direct::{self, DirectWriter};

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("blob {expected}: content hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest}: larger than the limit of {limit} bytes")]
    TooLarge { digest: Digest, limit: u64 },
    #[error("blob {digest} not found in the content store")]
    NotFound { digest: Digest },
}

impl ContentError {
    /// Wraps the error for `io::Write`, keeping the kind of the underlying
    /// failure so that callers of `write_all` or `io::copy` can still tell
    /// a full disk from a refused stream, and can downcast to get this back.
    fn into_io(self) -> io::Error {
        let kind = match &self {
            ContentError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ContentError {
    let path = path.to_path_buf();
    move |source| ContentError::Io { op, path, source }
}

/// Disk use of the content store, for image filesystem statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Total length of the files, committed blobs and in-flight ingests.
    /// Apparent size rather than allocated blocks: blobs are written
    /// sequentially and never sparse, so the two agree to a block, and the
    /// apparent size is the one an operator can check against manifests.
    pub bytes: u64,
    /// Number of those files.
    pub inodes: u64,
}

/// Handle to the content store. Cloning is cheap and clones share the store.
#[derive(Debug, Clone)]
pub struct ContentStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    blobs: PathBuf,
    ingest: PathBuf,
}

/// Makes ingest file names unique within the process; the pid makes them
/// unique across daemon restarts, even though `open` clears old ones.
static INGEST_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Only the owner (the daemon, root) needs to read blobs: images from
/// private registries may hold secrets, and unpacking runs in the daemon.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

impl ContentStore {
    /// Opens (creating if needed) the store at `<root>/content` and removes
    /// whatever a previous run left in `ingest/`. That is safe only because
    /// the daemon, which holds the root lock, is the store's only writer.
    pub fn open(root: &Path) -> Result<ContentStore, ContentError> {
        fs::create_dir_all(root).map_err(io_error("create directory", root))?;
        let content = root.join("content");
        let blobs = content.join("sha256");
        let ingest = content.join("ingest");
        for dir in [&blobs, &ingest] {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(io_error("create directory", dir))?;
        }
        // A blob renamed into a directory whose own entry was never synced
        // could vanish with it in a crash; this runs once per daemon start.
        for dir in [&content, root] {
            sync_dir(dir)?;
        }
        clear_ingest(&ingest)?;
        Ok(ContentStore {
            inner: Arc::new(Inner { blobs, ingest }),
        })
    }

    /// Where the blob `digest` lives (or would live). The digest type only
    /// holds 64 lowercase hex characters, so this never leaves `sha256/`.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.inner.blobs.join(digest.hex())
    }

    /// Whether the blob is in the store (as a regular file).
    pub fn contains(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.path(digest)).is_ok_and(|m| m.is_file())
    }

    /// The blob's size, or `None` when the store does not have it.
    pub fn size(&self, digest: &Digest) -> Result<Option<u64>, ContentError> {
        let path = self.path(digest);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Ok(None),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(io_error("stat blob", &path)(err)),
        }
    }

    /// Reads a small blob (manifest, index, config) whole, refusing one
    /// larger than `max_bytes`, and checks it against its digest again: these
    /// bytes are parsed and trusted as the image's identity, and re-hashing a
    /// few KiB turns disk corruption into a clear error instead of a
    /// confusing parse failure.
    pub fn read(&self, digest: &Digest, max_bytes: u64) -> Result<Vec<u8>, ContentError> {
        let path = self.path(digest);
        let file = self.open_blob(digest)?;
        let len = file.metadata().map_err(io_error("stat blob", &path))?.len();
        let too_large = || ContentError::TooLarge {
            digest: digest.clone(),
            limit: max_bytes,
        };
        if len > max_bytes {
            return Err(too_large());
        }
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        // Bounded by the limit, not by the length seen above, in case the
        // file changed in between.
        file.take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io_error("read blob", &path))?;
        if u64::try_from(bytes.len()).map_or(true, |n| n > max_bytes) {
            return Err(too_large());
        }
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(ContentError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Opens the blob for streaming reads (layers).
    pub fn open_blob(&self, digest: &Digest) -> Result<File, ContentError> {
        let path = self.path(digest);
        let not_found = || ContentError::NotFound {
            digest: digest.clone(),
        };
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(err) => return Err(io_error("open blob", &path)(err)),
        };
        // Opening a directory for reading succeeds; it is not a blob.
        if !file
            .metadata()
            .map_err(io_error("stat blob", &path))?
            .is_file()
        {
            return Err(not_found());
        }
        Ok(file)
    }

    /// Removes the blob; `false` when it was not there. Readers that opened
    /// it keep reading the old inode. Not synced: a deleted blob that comes
    /// back after a crash is only garbage for the next collection.
    pub fn delete(&self, digest: &Digest) -> Result<bool, ContentError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(io_error("remove blob", &path)(err)),
        }
    }

    /// The digests of all blobs, sorted. Names that are not 64 hex
    /// characters, and anything that is not a regular file, are skipped.
    pub fn list(&self) -> Result<Vec<Digest>, ContentError> {
        let dir = &self.inner.blobs;
        let mut digests = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error("list directory", dir))? {
            let entry = entry.map_err(io_error("list directory", dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(digest) = format!("{SHA256_PREFIX}{name}").parse() else {
                continue;
            };
            let is_file = entry
                .file_type()
                .map_err(io_error("stat blob", &entry.path()))?
                .is_file();
            if is_file {
                digests.push(digest);
            }
        }
        digests.sort();
        Ok(digests)
    }

    /// Bytes and files used by committed blobs and by writes in progress.
    pub fn usage(&self) -> Result<Usage, ContentError> {
        let mut usage = Usage::default();
        for dir in [&self.inner.blobs, &self.inner.ingest] {
            for entry in fs::read_dir(dir).map_err(io_error("list directory", dir))? {
                let entry = entry.map_err(io_error("list directory", dir))?;
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    // Deleted or committed between the listing and the stat.
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(io_error("stat file", &entry.path())(err)),
                };
                if meta.is_file() {
                    usage.bytes = usage.bytes.saturating_add(meta.len());
                    usage.inodes += 1;
                }
            }
        }
        Ok(usage)
    }

    /// Starts writing the blob `expected`. Bytes go to a private ingest file;
    /// nothing is visible under the digest until `BlobWriter::commit` has
    /// verified them. With `expected_size`, a stream that runs past it is
    /// refused at the write that crosses it, which is what bounds a
    /// malicious or runaway download.
    pub fn writer(
        &self,
        expected: &Digest,
        expected_size: Option<u64>,
    ) -> Result<BlobWriter, ContentError> {
        let n = INGEST_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .inner
            .ingest
            .join(format!("{}-{}-{n}", expected.hex(), std::process::id()));
        // create_new: a name collision must fail, never share a file.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temp)
            .map_err(io_error("create ingest file", &temp))?;
        // Large blobs are layers, which go around the page cache.
        let direct = expected_size
            .filter(|size| *size >= direct::CHUNK as u64)
            .and_then(|_| DirectWriter::new(&file));
        Ok(BlobWriter {
            store: self.clone(),
            expected: expected.clone(),
            expected_size,
            file,
            temp,
            hasher: Sha256::new(),
            written: 0,
            direct,
            broken: false,
            committed: false,
        })
    }

    /// Stores a small blob held in memory (a manifest or config), verified
    /// like any other.
    pub fn write_bytes(&self, expected: &Digest, bytes: &[u8]) -> Result<(), ContentError> {
        let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        // Checked here too so a wrong digest costs no file at all.
        let actual = Digest::of(bytes);
        if actual != *expected {
            return Err(ContentError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        if self.contains(expected) {
            return Ok(());
        }
        let mut writer = self.writer(expected, Some(size))?;
        writer.write_chunk(bytes)?;
        writer.commit()?;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), ContentError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", dir))
}

/// Removes everything in `ingest/`: each entry is a write that a crash or a
/// kill interrupted, and no writer from that run is left to finish it.
fn clear_ingest(ingest: &Path) -> Result<(), ContentError> {
    let mut removed = 0u64;
    for entry in fs::read_dir(ingest).map_err(io_error("list directory", ingest))? {
        let entry = entry.map_err(io_error("list directory", ingest))?;
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(io_error("stat ingest file", &path))?
            .is_dir();
        let result = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(io_error("remove stale ingest file", &path))?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(removed, dir = %ingest.display(), "removed interrupted blob writes");
    }
    Ok(())
}

/// A blob being written: `io::Write` into a private ingest file, hashing
/// and counting as it goes. Blocking; run it on a blocking thread. Dropped
/// without `commit`, it removes its file.
pub struct BlobWriter {
    store: ContentStore,
    expected: Digest,
    expected_size: Option<u64>,
    file: File,
    temp: PathBuf,
    hasher: Sha256,
    written: u64,
    /// Set while the file is in `O_DIRECT` mode.
    direct: Option<DirectWriter>,
    /// Writing out buffered bytes failed: the file is not what was hashed.
    broken: bool,
    committed: bool,
}

impl fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobWriter")
            .field("expected", &self.expected)
            .field("expected_size", &self.expected_size)
            .field("temp", &self.temp)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// Bytes accepted so far, for pull progress.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Writes all of `chunk`, with the store's error type (the `io::Write`
    /// impl gives the same error wrapped in an `io::Error`).
    pub fn write_chunk(&mut self, mut chunk: &[u8]) -> Result<(), ContentError> {
        while !chunk.is_empty() {
            let n = self.write_some(chunk)?;
            if n == 0 {
                return Err(ContentError::Io {
                    op: "write ingest file",
                    path: self.temp.clone(),
                    source: io::ErrorKind::WriteZero.into(),
                });
            }
            chunk = &chunk[n..];
        }
        Ok(())
    }

    /// Writes what the file takes of `buf`. Only bytes the file accepted
    /// are hashed and counted, so after any error the hash still describes
    /// the file exactly and `commit` cannot pass a blob it did not check.
    fn write_some(&mut self, buf: &[u8]) -> Result<usize, ContentError> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.broken {
            return Err(self.broken_error());
        }
        let arriving = self
            .written
            .saturating_add(u64::try_from(buf.len()).unwrap_or(u64::MAX));
        if let Some(limit) = self.expected_size
            && arriving > limit
        {
            return Err(ContentError::TooLarge {
                digest: self.expected.clone(),
                limit,
            });
        }
        let written = match self.direct.as_mut() {
            Some(direct) => direct.push(&self.file, buf),
            None => (&self.file).write(buf),
        };
        let n = written.map_err(|source| {
            // Bytes the direct buffer took may be lost: the file is no
            // longer what was hashed.
            self.broken = self.direct.is_some();
            ContentError::Io {
                op: "write ingest file",
                path: self.temp.clone(),
                source,
            }
        })?;
        self.hasher.update(&buf[..n]);
        self.written += u64::try_from(n).unwrap_or(u64::MAX);
        Ok(n)
    }

    /// Writes out what the direct buffer holds and leaves `O_DIRECT` mode.
    fn finish_direct(&mut self) -> Result<(), ContentError> {
        let Some(direct) = self.direct.take() else {
            return Ok(());
        };
        direct.finish(&self.file).map_err(|source| {
            self.broken = true;
            ContentError::Io {
                op: "write ingest file",
                path: self.temp.clone(),
                source,
            }
        })
    }

    fn broken_error(&self) -> ContentError {
        ContentError::Io {
            op: "write ingest file",
            path: self.temp.clone(),
            source: io::Error::other("an earlier write failed"),
        }
    }

    /// Verifies size and digest, makes the bytes durable and moves them to
    /// `sha256/<hex>`. On a mismatch nothing is stored and the ingest file
    /// is removed. If the blob is already there (another pull won the race),
    /// this copy is discarded: the content is the same by definition.
    pub fn commit(mut self) -> Result<Digest, ContentError> {
        if let Some(expected) = self.expected_size
            && self.written != expected
        {
            return Err(ContentError::SizeMismatch {
                digest: self.expected.clone(),
                expected,
                actual: self.written,
            });
        }
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.expected {
            return Err(ContentError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        if self.store.contains(&self.expected) {
            tracing::debug!(digest = %self.expected, "blob already present, discarding the new copy");
            return Ok(actual);
        }
        if self.broken {
            return Err(self.broken_error());
        }
        self.finish_direct()?;
        self.file
            .sync_all()
            .map_err(io_error("sync ingest file", &self.temp))?;
        let target = self.store.path(&self.expected);
        // Atomic even when a concurrent writer of the same blob renames
        // first: readers see one complete file or the other, both verified.
        fs::rename(&self.temp, &target).map_err(io_error("move verified blob to", &target))?;
        self.committed = true;
        sync_dir(&self.store.inner.blobs)?;
        tracing::debug!(digest = %actual, size = self.written, "blob committed");
        Ok(actual)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_some(buf).map_err(ContentError::into_io)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Durability is commit's job (fsync); this only empties the direct
        // buffer, after which the rest of the blob goes through the cache.
        self.finish_direct().map_err(ContentError::into_io)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Err(err) = fs::remove_file(&self.temp)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.temp.display(), error = %err, "removing abandoned ingest file");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::thread;

    use super::*;

    fn store() -> (tempfile::TempDir, ContentStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open store");
        (dir, store)
    }

    fn ingest_names(store: &ContentStore) -> Vec<String> {
        fs::read_dir(&store.inner.ingest)
            .expect("read ingest")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn blob_files(store: &ContentStore) -> usize {
        fs::read_dir(&store.inner.blobs)
            .expect("read blobs")
            .count()
    }

    fn write_blob(store: &ContentStore, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        let mut writer = store
            .writer(&digest, Some(bytes.len() as u64))
            .expect("writer");
        for chunk in bytes.chunks(7) {
            writer.write_all(chunk).expect("write");
        }
        assert_eq!(writer.bytes_written(), bytes.len() as u64);
        assert_eq!(writer.commit().expect("commit"), digest);
        digest
    }

    #[test]
    fn write_commit_read_round_trip() {
        let (_dir, store) = store();
        let bytes = b"{\"schemaVersion\":2}".repeat(100);
        let digest = write_blob(&store, &bytes);
        assert!(store.contains(&digest));
        assert_eq!(store.size(&digest).expect("size"), Some(bytes.len() as u64));
        assert_eq!(store.read(&digest, 1 << 20).expect("read"), bytes);
        let mut streamed = Vec::new();
        store
            .open_blob(&digest)
            .expect("open blob")
            .read_to_end(&mut streamed)
            .expect("read blob");
        assert_eq!(streamed, bytes);
        assert!(ingest_names(&store).is_empty());
    }

    /// Blobs of a MiB and more are written with O_DIRECT through a buffer:
    /// every byte must arrive, the size bound and the digest still hold.
    #[test]
    fn large_blobs_round_trip_and_are_checked() {
        let (_dir, store) = store();
        let bytes: Vec<u8> = (0..(5 << 20) + 777u32).map(|i| (i % 249) as u8).collect();
        let digest = Digest::of(&bytes);
        let mut writer = store
            .writer(&digest, Some(bytes.len() as u64))
            .expect("writer");
        for chunk in bytes.chunks(70_001) {
            writer.write_all(chunk).expect("write");
        }
        assert_eq!(writer.commit().expect("commit"), digest);
        assert!(store.read(&digest, 8 << 20).expect("read") == bytes);

        let mut tampered = bytes.clone();
        tampered[3 << 20] ^= 1;
        let other = Digest::of(&bytes[..4 << 20]);
        let mut writer = store.writer(&other, Some(4 << 20)).expect("writer");
        writer.write_all(&tampered[..4 << 20]).expect("within size");
        let err = writer
            .write_all(&tampered[4 << 20..])
            .expect_err("past size");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = writer.commit().expect_err("tampered");
        assert!(
            matches!(err, ContentError::DigestMismatch { .. }),
            "{err:?}"
        );
        assert!(!store.contains(&other));
        assert!(ingest_names(&store).is_empty());
    }

    #[test]
    fn writer_without_size_checks_the_digest_only() {
        let (_dir, store) = store();
        let digest = Digest::of(b"abc");
        let mut writer = store.writer(&digest, None).expect("writer");
        writer.write_all(b"abc").expect("write");
        writer.commit().expect("commit");
        assert!(store.contains(&digest));
    }

    #[test]
    fn commit_rejects_wrong_digest_and_leaves_nothing() {
        let (_dir, store) = store();
        let expected = Digest::of(b"good");
        let mut writer = store.writer(&expected, Some(4)).expect("writer");
        writer.write_all(b"evil").expect("write");
        let err = writer.commit().expect_err("digest mismatch");
        match &err {
            ContentError::DigestMismatch {
                expected: e,
                actual,
            } => {
                assert_eq!(*e, expected);
                assert_eq!(*actual, Digest::of(b"evil"));
            }
            other => panic!("unexpected error {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains(&expected.to_string()), "{message}");
        assert!(
            message.contains(&Digest::of(b"evil").to_string()),
            "{message}"
        );
        assert!(!store.contains(&expected));
        assert_eq!(blob_files(&store), 0);
        assert!(ingest_names(&store).is_empty());
    }

    #[test]
    fn commit_rejects_short_stream_and_leaves_nothing() {
        let (_dir, store) = store();
        let bytes = b"0123456789";
        let digest = Digest::of(bytes);
        let mut writer = store.writer(&digest, Some(10)).expect("writer");
        writer.write_all(&bytes[..6]).expect("write");
        let err = writer.commit().expect_err("short");
        assert!(
            matches!(
                err,
                ContentError::SizeMismatch {
                    expected: 10,
                    actual: 6,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(&digest.to_string()));
        assert_eq!(blob_files(&store), 0);
        assert!(ingest_names(&store).is_empty());
    }

    #[test]
    fn commit_rejects_declared_size_smaller_than_content() {
        // The digest is right but the descriptor's size is not: refused at
        // the write that crosses the declared size, and nothing is stored.
        let (_dir, store) = store();
        let bytes = b"0123456789";
        let digest = Digest::of(bytes);
        let mut writer = store.writer(&digest, Some(8)).expect("writer");
        writer.write_all(&bytes[..8]).expect("write within size");
        let err = writer.write_all(&bytes[8..]).expect_err("past size");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = writer.commit().expect_err("digest of the prefix");
        assert!(
            matches!(err, ContentError::DigestMismatch { .. }),
            "{err:?}"
        );
        assert_eq!(blob_files(&store), 0);
        assert!(ingest_names(&store).is_empty());
    }

    #[test]
    fn commit_rejects_declared_size_larger_than_content() {
        let (_dir, store) = store();
        let bytes = b"0123456789";
        let digest = Digest::of(bytes);
        let mut writer = store.writer(&digest, Some(11)).expect("writer");
        writer.write_all(bytes).expect("write");
        let err = writer.commit().expect_err("long size");
        assert!(
            matches!(
                err,
                ContentError::SizeMismatch {
                    expected: 11,
                    actual: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(blob_files(&store), 0);
        assert!(ingest_names(&store).is_empty());
    }

    #[test]
    fn oversized_stream_is_refused_during_write() {
        let (_dir, store) = store();
        let digest = Digest::of(b"whatever");
        let mut writer = store.writer(&digest, Some(1000)).expect("writer");
        let chunk = [0u8; 300];
        for _ in 0..3 {
            writer.write_all(&chunk).expect("within bound");
        }
        let err = writer.write_all(&chunk).expect_err("over bound");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<ContentError>())
            .expect("content error inside");
        assert!(
            matches!(inner, ContentError::TooLarge { limit: 1000, .. }),
            "{inner:?}"
        );
        assert!(err.to_string().contains(&digest.to_string()), "{err}");
        // Nothing past the bound reached the disk.
        assert_eq!(writer.bytes_written(), 900);
        let on_disk = fs::metadata(&writer.temp).expect("temp").len();
        assert_eq!(on_disk, 900);
        let err = writer
            .write_chunk(&chunk)
            .expect_err("still over bound, typed");
        assert!(matches!(err, ContentError::TooLarge { .. }), "{err:?}");
        drop(writer);
        assert!(ingest_names(&store).is_empty());
    }

    #[test]
    fn dropping_a_writer_removes_its_ingest_file() {
        let (_dir, store) = store();
        let digest = Digest::of(b"partial");
        let mut writer = store.writer(&digest, None).expect("writer");
        writer.write_all(b"part").expect("write");
        assert_eq!(ingest_names(&store).len(), 1);
        drop(writer);
        assert!(ingest_names(&store).is_empty());
        assert_eq!(blob_files(&store), 0);
    }

    #[test]
    fn existing_blob_is_not_rewritten() {
        let (_dir, store) = store();
        let bytes = b"layer";
        let digest = write_blob(&store, bytes);
        let before = fs::metadata(store.path(&digest)).expect("stat");
        let inode = std::os::unix::fs::MetadataExt::ino(&before);
        write_blob(&store, bytes);
        store.write_bytes(&digest, bytes).expect("write bytes");
        let after = fs::metadata(store.path(&digest)).expect("stat");
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&after), inode);
        assert!(ingest_names(&store).is_empty());
    }

    #[test]
    fn write_bytes_verifies() {
        let (_dir, store) = store();
        let digest = Digest::of(b"manifest");
        store.write_bytes(&digest, b"manifest").expect("write");
        assert_eq!(store.read(&digest, 100).expect("read"), b"manifest");
        let other = Digest::of(b"other");
        let err = store
            .write_bytes(&other, b"manifest")
            .expect_err("mismatch");
        assert!(
            matches!(err, ContentError::DigestMismatch { .. }),
            "{err:?}"
        );
        assert!(!store.contains(&other));
        assert!(ingest_names(&store).is_empty());
    }

    #[test]
    fn concurrent_writers_of_the_same_blob_both_succeed() {
        let (_dir, store) = store();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&bytes);
        let threads = 4;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let store = store.clone();
                let bytes = bytes.clone();
                let digest = digest.clone();
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    let mut writer = store
                        .writer(&digest, Some(bytes.len() as u64))
                        .expect("writer");
                    barrier.wait();
                    for chunk in bytes.chunks(4096) {
                        writer.write_all(chunk).expect("write");
                    }
                    barrier.wait();
                    writer.commit()
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().expect("thread").expect("commit"), digest);
        }
        assert_eq!(store.read(&digest, 1 << 20).expect("read"), bytes);
        assert_eq!(store.list().expect("list"), vec![digest]);
        assert!(ingest_names(&store).is_empty());
    }

    #[test]
    fn open_removes_stale_ingest_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let digest = Digest::of(b"x");
        let writer = store.writer(&digest, None).expect("writer");
        // A crash: the writer never runs its drop.
        std::mem::forget(writer);
        fs::write(store.inner.ingest.join("junk"), b"partial").expect("junk");
        fs::create_dir(store.inner.ingest.join("junkdir")).expect("junk dir");
        assert_eq!(ingest_names(&store).len(), 3);
        let kept = write_blob(&store, b"kept");
        let store = ContentStore::open(dir.path()).expect("reopen");
        assert!(ingest_names(&store).is_empty());
        assert!(store.contains(&kept));
    }

    #[test]
    fn list_ignores_names_that_are_not_digests() {
        let (_dir, store) = store();
        let a = write_blob(&store, b"a");
        let b = write_blob(&store, b"b");
        let blobs = &store.inner.blobs;
        fs::write(blobs.join("README"), b"x").expect("junk");
        fs::write(blobs.join(a.hex().to_uppercase()), b"x").expect("junk");
        fs::write(blobs.join(format!("{}.tmp", b.hex())), b"x").expect("junk");
        fs::create_dir(blobs.join(Digest::of(b"dir").hex())).expect("dir");
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(store.list().expect("list"), want);
        // A directory under a digest name is not a blob either.
        let dir_digest = Digest::of(b"dir");
        assert!(!store.contains(&dir_digest));
        assert_eq!(store.size(&dir_digest).expect("size"), None);
        assert!(matches!(
            store.open_blob(&dir_digest),
            Err(ContentError::NotFound { .. })
        ));
    }

    #[test]
    fn usage_counts_blobs_and_ingests() {
        let (_dir, store) = store();
        assert_eq!(store.usage().expect("usage"), Usage::default());
        write_blob(&store, &[1u8; 1000]);
        write_blob(&store, &[2u8; 24]);
        assert_eq!(
            store.usage().expect("usage"),
            Usage {
                bytes: 1024,
                inodes: 2
            }
        );
        let mut writer = store.writer(&Digest::of(b"big"), None).expect("writer");
        writer.write_all(&[0u8; 100]).expect("write");
        assert_eq!(
            store.usage().expect("usage"),
            Usage {
                bytes: 1124,
                inodes: 3
            }
        );
        drop(writer);
        assert_eq!(store.usage().expect("usage").inodes, 2);
    }

    #[test]
    fn read_enforces_its_bound() {
        let (_dir, store) = store();
        let bytes = [7u8; 4096];
        let digest = write_blob(&store, &bytes);
        assert_eq!(store.read(&digest, 4096).expect("at bound").len(), 4096);
        let err = store.read(&digest, 4095).expect_err("over bound");
        assert!(
            matches!(err, ContentError::TooLarge { limit: 4095, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&digest.to_string()));
    }

    #[test]
    fn read_detects_corruption_on_disk() {
        let (_dir, store) = store();
        let digest = write_blob(&store, b"config");
        fs::write(store.path(&digest), b"CONFIG").expect("corrupt");
        let err = store.read(&digest, 100).expect_err("corrupt");
        assert!(
            matches!(err, ContentError::DigestMismatch { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn missing_blobs_are_reported_as_not_found() {
        let (_dir, store) = store();
        let digest = Digest::of(b"absent");
        assert!(!store.contains(&digest));
        assert_eq!(store.size(&digest).expect("size"), None);
        assert!(matches!(
            store.read(&digest, 10),
            Err(ContentError::NotFound { .. })
        ));
        let err = store.open_blob(&digest).expect_err("absent");
        assert_eq!(
            err.to_string(),
            format!("blob {digest} not found in the content store")
        );
        assert!(!store.delete(&digest).expect("delete absent"));
    }

    #[test]
    fn delete_removes_the_blob() {
        let (_dir, store) = store();
        let digest = write_blob(&store, b"gone");
        assert!(store.delete(&digest).expect("delete"));
        assert!(!store.contains(&digest));
        assert!(store.list().expect("list").is_empty());
    }

    #[test]
    fn paths_stay_under_the_blob_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let blobs = dir.path().join("content").join("sha256");
        for bytes in [&b""[..], b"a", b"../../etc/passwd"] {
            let digest = Digest::of(bytes);
            let path = store.path(&digest);
            assert_eq!(path.parent(), Some(blobs.as_path()));
            assert_eq!(
                path.file_name().and_then(|n| n.to_str()),
                Some(digest.hex())
            );
            assert!(
                path.components().all(|c| matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::RootDir
                )),
                "{path:?}"
            );
        }
        for bad in [
            "sha256:../../../../../../../../../../../../../../../../../etc/passwd",
            "sha256:/etc/passwd",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn store_and_writer_can_cross_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ContentStore>();
        assert_send_sync::<BlobWriter>();
        assert_send_sync::<ContentError>();
    }
}
