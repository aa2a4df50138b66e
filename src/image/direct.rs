//! Writing large files of a pull around the page cache (`O_DIRECT`): the
//! compressed layer blobs and the large files inside layers.
//!
//! Neither is read again soon: a blob was unpacked while it streamed, and a
//! layer's files wait for a container to start. Through the page cache each
//! byte was copied once more into a page allocated for it, then written
//! back by the kernel, which the commit's fsync or syncfs waited for: a
//! fifth of the daemon's CPU in a pull of large layers, besides the
//! kernel's writeback, and a large pull pushed the running containers'
//! files out of the cache.
//!
//! The one thing to know before changing it: a direct write must be whole
//! blocks, from an aligned buffer, at an aligned offset. Bytes therefore
//! wait in the writer's buffer until they fill it, and the tail of a file,
//! which is rarely whole blocks, goes through the page cache. A filesystem
//! that refuses `O_DIRECT` gets every byte through the page cache, never an
//! error.

use std::fs::File;
use std::io::{self, Write};

use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};

/// Bytes of one direct write: large enough that the device, not the
/// syscall, sets the pace. Files smaller than this are not worth it.
pub const CHUNK: usize = 1 << 20;
/// The alignment of buffer, length and offset: the device's logical block
/// size, which is never larger than a page.
const ALIGN: usize = 4096;

/// A file in `O_DIRECT` mode and the bytes waiting to be written to it.
pub struct DirectWriter {
    storage: Vec<u8>,
    /// Offset of the first aligned byte of `storage`.
    start: usize,
    len: usize,
}

impl DirectWriter {
    /// Switches `file`, positioned at offset 0, to `O_DIRECT`; `None` where
    /// the filesystem does not support it (the caller writes as usual).
    pub fn new(file: &File) -> Option<DirectWriter> {
        let storage = vec![0u8; CHUNK + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        if start >= ALIGN {
            return None;
        }
        let flags = fcntl_getfl(file).ok()?;
        match fcntl_setfl(file, flags | OFlags::DIRECT) {
            Ok(()) => Some(DirectWriter {
                storage,
                start,
                len: 0,
            }),
            Err(errno) => {
                tracing::debug!("O_DIRECT refused, writing through the page cache: {errno}");
                None
            }
        }
    }

    /// Copies what fits of `bytes` into the buffer and writes it out when
    /// it is full. Returns how many bytes were taken, never 0 for non-empty
    /// `bytes`. After an error the file is not what was pushed: give it up.
    pub fn push(&mut self, file: &File, bytes: &[u8]) -> io::Result<usize> {
        let spare = self.spare();
        let n = bytes.len().min(spare.len());
        spare[..n].copy_from_slice(&bytes[..n]);
        self.filled(file, n)?;
        Ok(n)
    }

    /// The free part of the buffer, to read into; never empty.
    pub fn spare(&mut self) -> &mut [u8] {
        let from = self.start + self.len;
        &mut self.storage[from..self.start + CHUNK]
    }

    /// Takes `n` bytes just put into [`spare`](Self::spare), and writes the
    /// buffer out if that filled it.
    pub fn filled(&mut self, file: &File, n: usize) -> io::Result<()> {
        debug_assert!(n <= CHUNK - self.len, "filled more than was spare");
        self.len = (self.len + n).min(CHUNK);
        if self.len < CHUNK {
            return Ok(());
        }
        self.len = 0;
        write_all(file, &self.storage[self.start..self.start + CHUNK])
    }

    /// Writes what is buffered (whole blocks directly, the tail through the
    /// page cache) and takes the file out of `O_DIRECT` mode.
    pub fn finish(self, file: &File) -> io::Result<()> {
        let waiting = &self.storage[self.start..self.start + self.len];
        let whole = waiting.len() - waiting.len() % ALIGN;
        write_all(file, &waiting[..whole])?;
        leave_direct_mode(file)?;
        write_all(file, &waiting[whole..])
    }
}

/// Writes all of `bytes` to `file`. Should the filesystem refuse a direct
/// write after all (`EINVAL`: an alignment it did not announce, or a short
/// write that left the offset unaligned), the file leaves `O_DIRECT` mode
/// and the rest goes through the page cache.
fn write_all(file: &File, mut bytes: &[u8]) -> io::Result<()> {
    let mut out = file;
    while !bytes.is_empty() {
        match out.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                if !fcntl_getfl(file)?.contains(OFlags::DIRECT) {
                    return Err(err);
                }
                tracing::debug!("direct write refused, writing through the page cache: {err}");
                leave_direct_mode(file)?;
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn leave_direct_mode(file: &File) -> io::Result<()> {
    let flags = fcntl_getfl(file)?;
    Ok(fcntl_setfl(file, flags.difference(OFlags::DIRECT))?)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn written_with(
        dir: &std::path::Path,
        data: &[u8],
        piece: usize,
        use_spare: bool,
    ) -> (Vec<u8>, bool) {
        let path = dir.join(format!("f-{piece}-{use_spare}"));
        let file = File::create(&path).expect("create");
        let Some(mut direct) = DirectWriter::new(&file) else {
            return (Vec::new(), false);
        };
        for part in data.chunks(piece) {
            let mut part = part;
            while !part.is_empty() {
                let n = if use_spare {
                    let spare = direct.spare();
                    let n = part.len().min(spare.len());
                    spare[..n].copy_from_slice(&part[..n]);
                    direct.filled(&file, n).expect("filled");
                    n
                } else {
                    direct.push(&file, part).expect("push")
                };
                assert!(n > 0);
                part = &part[n..];
            }
        }
        direct.finish(&file).expect("finish");
        assert!(!fcntl_getfl(&file).expect("flags").contains(OFlags::DIRECT));
        let mut back = Vec::new();
        File::open(&path)
            .expect("open")
            .read_to_end(&mut back)
            .expect("read");
        (back, true)
    }

    #[test]
    fn every_byte_arrives_in_order_whatever_the_pieces() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Whole chunks, a tail of whole blocks, a ragged tail, less than a
        // block, nothing.
        for len in [2 * CHUNK, CHUNK + 3 * ALIGN, CHUNK + 1234, 100, 0] {
            let data = pattern(len);
            for piece in [1000, 65536, CHUNK + 7] {
                for use_spare in [false, true] {
                    let (back, direct) = written_with(dir.path(), &data, piece, use_spare);
                    if !direct {
                        eprintln!(
                            "skipping: {} does not support O_DIRECT",
                            dir.path().display()
                        );
                        return;
                    }
                    assert_eq!(back.len(), len, "len {len} piece {piece}");
                    assert!(back == data, "content differs: len {len} piece {piece}");
                }
            }
        }
    }
}
