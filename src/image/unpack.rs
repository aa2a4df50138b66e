//! Layer unpack: applies one OCI image layer (a tar stream, possibly gzip
//! or zstd compressed) to an empty directory that becomes an overlayfs lower
//! dir, turning AUFS-style whiteouts into overlay ones on the way, and
//! computing the layer's diffID from the same bytes.
//!
//! The one thing to know before changing it: image content is untrusted,
//! and no path from the archive is ever joined onto the destination path.
//! Everything goes through a directory fd of the layer dir: each entry's
//! parent is opened with `openat2(RESOLVE_IN_ROOT)`, and the last component
//! is made or changed with an `*at` call that does not follow it.
//!
//! `RESOLVE_IN_ROOT` (scoped) rather than `RESOLVE_BENEATH` (refuse): a
//! symlink met on the way is read as if the layer dir were `/`, so an entry
//! `etc/passwd` after a symlink `etc -> /` lands in `<layer>/passwd`, never
//! outside. This is what containerd does (`fs.RootPath`) and what image
//! builders expect, since absolute symlinks inside images are normal
//! (`/etc/alternatives`, `/usr/lib` merges); `BENEATH` would fail such
//! layers with EXDEV although nothing escapes. Likewise, a missing parent
//! behind a dangling symlink is created where the symlink points, inside
//! the layer, as containerd's scoped `MkdirAll` does.
//!
//! Entry names with a `..` component are refused rather than clamped, and
//! absolute names are taken relative to the layer root. The function is
//! blocking: call it from a blocking thread.

mod apply;
mod meta;
mod path;
mod stream;
#[cfg(test)]
mod tests;

use std::io::Read;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::image::digest::Digest;
use apply::LayerDir;
use stream::{HumanSize, Meter};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer of this OCI or Docker media type.
    pub fn from_media_type(media_type: &str) -> Result<Compression, UnpackError> {
        Ok(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
            other => return Err(UnpackError::MediaType(other.to_string())),
        })
    }
}

/// Bounds on what one layer may unpack to, against decompression bombs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the uncompressed tar stream, headers and padding included.
    pub max_uncompressed_bytes: u64,
    /// Tar entries, counting whiteouts and ignored entries.
    pub max_entries: u64,
}

/// What unpacking a layer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackResult {
    /// sha256 of the whole uncompressed tar stream: to be checked against
    /// the image config's `rootfs.diff_ids`.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar stream.
    pub size: u64,
    /// Tar entries applied (PAX and GNU extension headers not counted).
    pub entries: u64,
}

/// Errors of layer unpacking. Each displays as one line naming the entry
/// and what was being done to it; the cause is part of the message rather
/// than a separate `source()`, so it is printed exactly once.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("unsupported layer media type {0:?}")]
    MediaType(String),
    #[error("open layer directory {}: {errno}", path.display())]
    OpenDest { path: PathBuf, errno: Errno },
    #[error("decompress layer: {error}")]
    Decompress { error: std::io::Error },
    #[error("read layer: {error}")]
    Read { error: std::io::Error },
    #[error("read layer tar stream: {error}")]
    Tar { error: std::io::Error },
    #[error("layer exceeds {} uncompressed", HumanSize(*limit))]
    TooLarge { limit: u64 },
    #[error("layer has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("layer tar stream ends without an end-of-archive marker (truncated layer)")]
    Truncated,
    #[error(
        "layer entry {entry:?}: stream ends inside the contents, after {actual} of {expected} bytes (truncated layer)"
    )]
    TruncatedEntry {
        entry: String,
        expected: u64,
        actual: u64,
    },
    #[error("layer entry {entry:?}: path escapes the layer")]
    Escape { entry: String },
    #[error("layer entry {entry:?}: hardlink target {target:?} escapes the layer")]
    LinkEscape { entry: String, target: String },
    #[error("layer entry {entry:?}: {reason}")]
    Invalid { entry: String, reason: String },
    #[error("layer entry {entry:?}: {op}: {errno}")]
    Sys {
        entry: String,
        op: &'static str,
        errno: Errno,
    },
    #[error("layer entry {entry:?}: {op}: {error}")]
    Io {
        entry: String,
        op: &'static str,
        error: std::io::Error,
    },
    #[error("layer entry {entry:?}: set xattr {name}: {errno}")]
    Xattr {
        entry: String,
        name: String,
        errno: Errno,
    },
}

/// Unpacks the layer read from `reader` into `dest`, an empty directory.
/// The whole stream is read, up to its end, so the diffID covers it all.
/// On error `dest` holds part of the layer: the caller removes it.
pub fn unpack_layer(
    reader: impl Read,
    compression: Compression,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackResult, UnpackError> {
    let mut layer = LayerDir::open(dest)?;
    let mut meter = Meter::new(
        stream::decoder(reader, compression)?,
        limits.max_uncompressed_bytes,
    );
    let applied = apply_entries(&mut meter, &mut layer, limits).and_then(|entries| {
        meter.drain()?;
        Ok(entries)
    });
    let entries = applied.map_err(|error| meter.explain(error, compression))?;
    layer.finish()?;
    let (diff_id, size) = meter.finish();
    Ok(UnpackResult {
        diff_id,
        size,
        entries,
    })
}

fn apply_entries<R: Read>(
    meter: &mut Meter<R>,
    layer: &mut LayerDir,
    limits: &Limits,
) -> Result<u64, UnpackError> {
    let mut archive = tar::Archive::new(&mut *meter);
    let mut count = 0u64;
    for entry in archive
        .entries()
        .map_err(|error| UnpackError::Tar { error })?
    {
        let mut entry = entry.map_err(|error| UnpackError::Tar { error })?;
        count += 1;
        if count > limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        layer.apply(&mut entry)?;
    }
    // The tar reader stops at the first zero block, or quietly at EOF on a
    // block boundary. The second is a stream cut between two entries: a
    // truncated layer, whose diffID would still describe a valid tar.
    if archive.into_inner().at_eof() {
        return Err(UnpackError::Truncated);
    }
    Ok(count)
}

/// rustix reports errno as its own type; ours display as `EPERM: ...`.
fn os_errno(errno: rustix::io::Errno) -> Errno {
    Errno::from_raw(errno.raw_os_error())
}

#[cfg(test)]
mod media_type_tests {
    use super::*;

    #[test]
    fn oci_and_docker_media_types_map_to_their_compression() {
        for (media_type, expected) in [
            ("application/vnd.oci.image.layer.v1.tar", Compression::None),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                Compression::None,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                Compression::None,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.zstd",
                Compression::Zstd,
            ),
        ] {
            assert_eq!(
                Compression::from_media_type(media_type).ok(),
                Some(expected),
                "{media_type}"
            );
        }
    }

    #[test]
    fn unknown_media_type_is_an_error_naming_it() {
        let error = Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+bzip2")
            .expect_err("unknown");
        assert_eq!(
            error.to_string(),
            "unsupported layer media type \"application/vnd.oci.image.layer.v1.tar+bzip2\""
        );
        assert!(Compression::from_media_type("application/vnd.oci.image.config.v1+json").is_err());
    }
}
