//! The byte stream under the tar parser: decompression, the diffID hash,
//! and the size limit that stops a decompression bomb.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use super::{Compression, UnpackError};
use crate::image::digest::Digest;

/// The decoder for `compression` over `reader`.
pub(super) fn decoder<'a>(
    reader: impl Read + 'a,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, UnpackError> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        // Multi-member, like Go's gzip reader that containerd uses: a layer
        // written by a parallel compressor may be several gzip members.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(reader)
                .map_err(|error| UnpackError::Decompress { error })?,
        ),
    })
}

/// Hashes and counts the decompressed bytes as the tar parser pulls them,
/// and refuses to produce more than the limit. It also remembers what went
/// wrong underneath, because the tar parser reports every failure as an
/// `io::Error` of its own, and the operator needs to know whether the layer
/// was too big, corrupt as a compressed stream, or a bad tar archive.
pub(super) struct Meter<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    limit: u64,
    over_limit: bool,
    eof: bool,
    read_error: Option<io::Error>,
}

impl<R: Read> Meter<R> {
    pub(super) fn new(inner: R, limit: u64) -> Meter<R> {
        Meter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            limit,
            over_limit: false,
            eof: false,
            read_error: None,
        }
    }

    /// Whether a read has reached the end of the stream.
    pub(super) fn at_eof(&self) -> bool {
        self.eof
    }

    /// Reads the rest of the stream (the tar end-of-archive blocks, record
    /// padding, anything after), so that the diffID covers all of it.
    pub(super) fn drain(&mut self) -> Result<(), UnpackError> {
        io::copy(self, &mut io::sink())
            .map(|_| ())
            .map_err(|error| UnpackError::Read { error })
    }

    /// Replaces `error` by the underlying cause when there is one: the size
    /// limit, or a failure of the decoder or of the reader it wraps.
    pub(super) fn explain(&mut self, error: UnpackError, compression: Compression) -> UnpackError {
        if self.over_limit {
            return UnpackError::TooLarge { limit: self.limit };
        }
        match self.read_error.take() {
            Some(error) if compression == Compression::None => UnpackError::Read { error },
            Some(error) => UnpackError::Decompress { error },
            None => error,
        }
    }

    /// The diffID and the number of uncompressed bytes.
    pub(super) fn finish(self) -> (Digest, u64) {
        (Digest::from_hasher(self.hasher), self.bytes)
    }
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.over_limit {
            return Err(limit_error());
        }
        // Ask for at most one byte past the limit: enough to know the layer
        // is too big without decompressing any more of it.
        let room = self.limit.saturating_sub(self.bytes).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => return Err(error),
            Err(error) => {
                let copy = io::Error::new(error.kind(), error.to_string());
                self.read_error.get_or_insert(error);
                return Err(copy);
            }
        };
        if n == 0 && want > 0 {
            self.eof = true;
        }
        self.bytes += n as u64;
        if self.bytes > self.limit {
            self.over_limit = true;
            return Err(limit_error());
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn limit_error() -> io::Error {
    io::Error::other("layer size limit exceeded")
}

/// A byte count as an operator writes it in a config file: `10 GiB` when it
/// is a whole number of a binary unit, plain bytes otherwise.
pub(super) struct HumanSize(pub(super) u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        let n = self.0;
        for (size, unit) in UNITS {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{} {unit}", n / size);
            }
        }
        write!(f, "{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_size_uses_whole_binary_units() {
        assert_eq!(HumanSize(10 << 30).to_string(), "10 GiB");
        assert_eq!(HumanSize(1 << 20).to_string(), "1 MiB");
        assert_eq!(HumanSize(3 << 40).to_string(), "3 TiB");
        assert_eq!(HumanSize(3 << 10).to_string(), "3 KiB");
        assert_eq!(HumanSize(1536).to_string(), "1536 bytes");
        assert_eq!(HumanSize(1000).to_string(), "1000 bytes");
        assert_eq!(HumanSize(0).to_string(), "0 bytes");
    }

    #[test]
    fn meter_hashes_counts_and_stops_one_byte_past_the_limit() {
        let data = vec![7u8; 100];
        let mut meter = Meter::new(&data[..], 100);
        let mut out = Vec::new();
        meter
            .read_to_end(&mut out)
            .expect("exactly at the limit is fine");
        assert!(meter.at_eof());
        let (digest, size) = meter.finish();
        assert_eq!((digest, size), (Digest::of(&data), 100));

        let mut meter = Meter::new(&data[..], 99);
        let error = meter
            .read_to_end(&mut Vec::new())
            .expect_err("over the limit");
        assert_eq!(error.to_string(), "layer size limit exceeded");
        let explained = meter.explain(UnpackError::Read { error }, Compression::None);
        assert_eq!(explained.to_string(), "layer exceeds 99 bytes uncompressed");
    }
}
