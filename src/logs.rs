//! The CRI container log format, as kubelet parses it: one record a line,
//! `2016-10-06T00:17:09.669794202Z stdout F message`.
//!
//! The framing matches containerd's `internal/cri/io/logger.go` byte for
//! byte, because that is what kubelet and every log shipper are tested
//! against: a line ends at `\n` (one `\r` before it is dropped too), it is
//! tagged `F` (full); a line longer than [`MAX_LINE`] is cut into `P`
//! (partial) records of exactly `MAX_LINE` bytes followed by the rest as
//! `F`; output that ends without a newline is written as `P` when its stream
//! reaches EOF. So concatenating the messages of a stream's records, with a
//! `\n` after each `F`, gives back the stream with `\r\n` turned into `\n`.
//!
//! [`LogWriter`] never blocks or fails the container: a record that cannot be
//! written is kept in a bounded buffer and retried, and dropped (counted and
//! logged) once the buffer is full.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The longest message of one record; longer lines are split (kubelet's and
/// containerd's default `max_container_log_line_size`).
pub const MAX_LINE: usize = 16 * 1024;

/// How many encoded bytes [`LogWriter`] keeps while the file cannot be
/// written, before it drops records.
pub const DEFAULT_PENDING_LIMIT: usize = 128 * 1024;

/// What a record adds to its message: timestamp, stream, tag, three spaces
/// and the newline.
const RECORD_OVERHEAD: usize = TIMESTAMP_LEN + 1 + "stdout".len() + 3 + 1;

/// While the file takes writes, [`LogWriter`] writes its records out before
/// they would exceed this many bytes (and at the end of every `write`): one
/// record of the longest line. One read of short lines encodes to several
/// times its size (each line gets a timestamp, stream and tag), and the
/// buffer stays allocated for the writer's life (one per container monitor):
/// writing in batches keeps it at this size, allocated once.
pub const WRITE_BATCH: usize = MAX_LINE + RECORD_OVERHEAD;

/// Length of the timestamp we write: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const TIMESTAMP_LEN: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("open container log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// `P`: the line continues in the next record of the same stream.
    Partial,
    /// `F`: the record ends a line.
    Full,
}

impl Tag {
    pub fn as_str(self) -> &'static str {
        match self {
            Tag::Partial => "P",
            Tag::Full => "F",
        }
    }
}

/// Cuts one stream's bytes into records. It holds at most `MAX_LINE + 2`
/// bytes of an unfinished line, whatever the input.
#[derive(Debug, Default)]
pub struct LineFramer {
    line: Vec<u8>,
}

impl LineFramer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes read from the stream; `emit` gets every finished record.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(Tag, &[u8])) {
        while !data.is_empty() {
            let (content, newline) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            self.append(content, &mut emit);
            data = &data[content.len()..];
            if newline {
                data = &data[1..];
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                emit(Tag::Full, &self.line);
                self.line.clear();
            }
        }
    }

    /// The stream reached EOF: an unterminated line is written as `P`, as
    /// containerd does.
    pub fn finish(&mut self, mut emit: impl FnMut(Tag, &[u8])) {
        // The line holds at most MAX_LINE bytes plus a `\r` that no `\n`
        // followed: that `\r` is content now, and may need a record of its own.
        for chunk in self.line.chunks(MAX_LINE) {
            emit(Tag::Partial, chunk);
        }
        self.line.clear();
    }

    /// Whether bytes of an unfinished line are held.
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty()
    }

    /// Appends line content in pieces, so that the buffer never holds more
    /// than `MAX_LINE + 2` bytes, cutting `P` records as it goes.
    fn append(&mut self, mut content: &[u8], emit: &mut impl FnMut(Tag, &[u8])) {
        while !content.is_empty() {
            let room = (MAX_LINE + 2).saturating_sub(self.line.len()).max(1);
            let take = room.min(content.len());
            self.line.extend_from_slice(&content[..take]);
            content = &content[take..];
            self.cut_overflow(emit);
        }
    }

    /// Emits `P` records while the line is longer than `MAX_LINE`. A
    /// trailing `\r` does not count: if `\n` follows, containerd drops it
    /// before measuring.
    fn cut_overflow(&mut self, emit: &mut impl FnMut(Tag, &[u8])) {
        let effective = self.line.len() - usize::from(self.line.last() == Some(&b'\r'));
        let mut start = 0;
        while effective - start > MAX_LINE {
            emit(Tag::Partial, &self.line[start..start + MAX_LINE]);
            start += MAX_LINE;
        }
        if start > 0 {
            self.line.drain(..start);
        }
    }
}

/// Writes a container's stdout and stderr to its CRI log file.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: File,
    framers: [LineFramer; 2],
    /// Encoded records not yet written, at most `pending_limit` bytes.
    pending: Vec<u8>,
    pending_limit: usize,
    dropped_records: u64,
    /// Set while writes fail, so that a full disk logs once, not per line.
    failing: bool,
}

impl LogWriter {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        Self::with_pending_limit(path, DEFAULT_PENDING_LIMIT)
    }

    pub fn with_pending_limit(path: &Path, pending_limit: usize) -> Result<Self, LogError> {
        Ok(Self {
            path: path.to_path_buf(),
            file: open_log(path)?,
            framers: [LineFramer::new(), LineFramer::new()],
            pending: Vec::with_capacity(WRITE_BATCH.min(pending_limit)),
            pending_limit,
            dropped_records: 0,
            failing: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records dropped so far because the file could not be written.
    pub fn dropped_records(&self) -> u64 {
        self.dropped_records
    }

    /// Bytes encoded but not yet written (non-zero only while writes fail).
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Logs `data` read from `stream` at `now`. Never blocks on or fails
    /// because of the file: see the module doc.
    pub fn write(&mut self, stream: Stream, data: &[u8], now: SystemTime) {
        let timestamp = format_timestamp(now);
        let mut framer = std::mem::take(&mut self.framers[stream.index()]);
        framer.push(data, |tag, msg| self.record(&timestamp, stream, tag, msg));
        self.framers[stream.index()] = framer;
        self.flush();
    }

    /// `stream` reached EOF: its unterminated line, if any, is logged as `P`.
    pub fn finish(&mut self, stream: Stream, now: SystemTime) {
        let timestamp = format_timestamp(now);
        let mut framer = std::mem::take(&mut self.framers[stream.index()]);
        framer.finish(|tag, msg| self.record(&timestamp, stream, tag, msg));
        self.framers[stream.index()] = framer;
        self.flush();
    }

    /// Reopens the file at its path, for kubelet's log rotation: it renames
    /// the file, then asks for a new one. Records before this call go to the
    /// old file, records after it to the new one; none is lost. On error
    /// the old file stays in use.
    pub fn reopen(&mut self) -> Result<(), LogError> {
        self.flush();
        self.file = open_log(&self.path)?;
        self.flush();
        Ok(())
    }

    /// Tries to write what is pending; true when nothing is left.
    pub fn flush(&mut self) -> bool {
        let mut written = 0;
        while written < self.pending.len() {
            match self.file.write(&self.pending[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if !self.failing {
                        tracing::warn!(path = %self.path.display(), error = %e,
                            "write container log failed; keeping up to {} bytes, then dropping records",
                            self.pending_limit);
                        self.failing = true;
                    }
                    break;
                }
            }
        }
        self.pending.drain(..written);
        if self.pending.is_empty() && self.pending.capacity() > WRITE_BATCH {
            // A failure let it grow towards `pending_limit`: give that back.
            self.pending = Vec::with_capacity(WRITE_BATCH.min(self.pending_limit));
        }
        if self.pending.is_empty() && self.failing {
            tracing::info!(path = %self.path.display(), dropped_records = self.dropped_records,
                "container log writable again");
            self.failing = false;
        }
        self.pending.is_empty()
    }

    fn record(&mut self, timestamp: &[u8], stream: Stream, tag: Tag, msg: &[u8]) {
        let len = timestamp.len() + 1 + stream.as_str().len() + 3 + msg.len() + 1;
        // While the file fails, records only accumulate (one write attempt
        // per `write`, not per record) up to `pending_limit`.
        if !self.failing && !self.pending.is_empty() && self.pending.len() + len > WRITE_BATCH {
            self.flush();
        }
        if self.pending.len() + len > self.pending_limit {
            self.flush();
            if self.pending.len() + len > self.pending_limit {
                // The file is failing and the buffer is full.
                self.dropped_records += 1;
                if self.dropped_records.is_power_of_two() {
                    tracing::warn!(path = %self.path.display(), dropped_records = self.dropped_records,
                        "container log not writable: dropping records");
                }
                return;
            }
        }
        self.pending.extend_from_slice(timestamp);
        self.pending.push(b' ');
        self.pending.extend_from_slice(stream.as_str().as_bytes());
        self.pending.push(b' ');
        self.pending.extend_from_slice(tag.as_str().as_bytes());
        self.pending.push(b' ');
        self.pending.extend_from_slice(msg);
        self.pending.push(b'\n');
    }
}

fn open_log(path: &Path) -> Result<File, LogError> {
    // As containerd: append, so that a rotated-and-recreated file or a
    // restarted writer never truncates what is there.
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// RFC 3339 in UTC with nanoseconds, always nine digits (Go's RFC3339Nano
/// trims trailing zeros; kubelet's parser accepts both, and a fixed width
/// sorts).
pub fn format_timestamp(time: SystemTime) -> [u8; TIMESTAMP_LEN] {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.000000000Z";
    put_digits(&mut out[0..4], year);
    put_digits(&mut out[5..7], month);
    put_digits(&mut out[8..10], day);
    put_digits(&mut out[11..13], rem / 3600);
    put_digits(&mut out[14..16], rem % 3600 / 60);
    put_digits(&mut out[17..19], rem % 60);
    put_digits(&mut out[20..29], u64::from(since.subsec_nanos()));
    out
}

fn put_digits(out: &mut [u8], mut value: u64) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// One parsed record, borrowed from its line (without the `\n`).
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub timestamp: &'a str,
    pub stream: Stream,
    pub tag: Tag,
    pub message: &'a [u8],
}

/// Parses one line of a CRI log as kubelet does (`parseCRILog`).
pub fn parse_record(line: &[u8]) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let timestamp = std::str::from_utf8(parts.next()?).ok()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let tag = match parts.next()? {
        b"P" => Tag::Partial,
        b"F" => Tag::Full,
        _ => return None,
    };
    let message = parts.next()?;
    Some(Record {
        timestamp,
        stream,
        tag,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn frame(input: &[u8], chunk: usize) -> Vec<(Tag, Vec<u8>)> {
        let mut framer = LineFramer::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            framer.push(piece, |t, m| out.push((t, m.to_vec())));
        }
        framer.finish(|t, m| out.push((t, m.to_vec())));
        out
    }

    fn reassemble(records: &[(Tag, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, msg) in records {
            out.extend_from_slice(msg);
            if *tag == Tag::Full {
                out.push(b'\n');
            }
        }
        out
    }

    fn normalize_crlf(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        for (i, &b) in input.iter().enumerate() {
            if b == b'\r' && input.get(i + 1) == Some(&b'\n') {
                continue;
            }
            out.push(b);
        }
        out
    }

    fn read_log(path: &Path) -> Vec<(Stream, Tag, Vec<u8>)> {
        let content = std::fs::read(path).unwrap();
        assert!(content.is_empty() || content.ends_with(b"\n"));
        content
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let r = parse_record(l).unwrap_or_else(|| panic!("bad record {l:?}"));
                assert_eq!(r.timestamp.len(), TIMESTAMP_LEN);
                (r.stream, r.tag, r.message.to_vec())
            })
            .collect()
    }

    #[test]
    fn timestamp_is_rfc3339_nano_utc() {
        let t = UNIX_EPOCH + Duration::new(1_475_713_029, 669_794_202);
        assert_eq!(&format_timestamp(t), b"2016-10-06T00:17:09.669794202Z");
        assert_eq!(
            &format_timestamp(UNIX_EPOCH),
            b"1970-01-01T00:00:00.000000000Z"
        );
        let leap = UNIX_EPOCH + Duration::new(951_782_400, 5); // 2000-02-29
        assert_eq!(&format_timestamp(leap), b"2000-02-29T00:00:00.000000005Z");
        let late = UNIX_EPOCH + Duration::new(4_102_444_799, 999_999_999);
        assert_eq!(&format_timestamp(late), b"2099-12-31T23:59:59.999999999Z");
    }

    #[test]
    fn full_lines_and_partial_at_eof() {
        let records = frame(b"a\n\nbc\r\nd", 3);
        assert_eq!(
            records,
            vec![
                (Tag::Full, b"a".to_vec()),
                (Tag::Full, b"".to_vec()),
                (Tag::Full, b"bc".to_vec()),
                (Tag::Partial, b"d".to_vec()),
            ]
        );
        assert!(frame(b"", 1).is_empty());
    }

    #[test]
    fn long_line_is_split_at_16k() {
        let mut input = vec![b'x'; MAX_LINE * 2 + 5];
        input.push(b'\n');
        let records = frame(&input, 4096);
        let shape: Vec<_> = records.iter().map(|(t, m)| (*t, m.len())).collect();
        assert_eq!(
            shape,
            vec![
                (Tag::Partial, MAX_LINE),
                (Tag::Partial, MAX_LINE),
                (Tag::Full, 5)
            ]
        );
        // Exactly MAX_LINE, with or without \r\n, is one full record.
        let mut exact = vec![b'y'; MAX_LINE];
        exact.extend_from_slice(b"\r\n");
        assert_eq!(frame(&exact, 1000), vec![(Tag::Full, vec![b'y'; MAX_LINE])]);
        // MAX_LINE + 1 splits into P + F of one byte.
        let mut over = vec![b'z'; MAX_LINE + 1];
        over.push(b'\n');
        let shape: Vec<_> = frame(&over, 70_000)
            .iter()
            .map(|(t, m)| (*t, m.len()))
            .collect();
        assert_eq!(shape, vec![(Tag::Partial, MAX_LINE), (Tag::Full, 1)]);
        // MAX_LINE then a lone \r at EOF: the \r is content, in its own P.
        let mut cr = vec![b'c'; MAX_LINE];
        cr.push(b'\r');
        let shape: Vec<_> = frame(&cr, 5000)
            .iter()
            .map(|(t, m)| (*t, m.len()))
            .collect();
        assert_eq!(shape, vec![(Tag::Partial, MAX_LINE), (Tag::Partial, 1)]);
    }

    #[test]
    fn megabyte_line_without_newline_is_all_partial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut writer = LogWriter::open(&path).unwrap();
        let input: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
        for chunk in input.chunks(65_536) {
            writer.write(Stream::Stdout, chunk, SystemTime::now());
        }
        writer.finish(Stream::Stdout, SystemTime::now());
        let records = read_log(&path);
        assert_eq!(records.len(), (1 << 20) / MAX_LINE);
        assert!(
            records
                .iter()
                .all(|(s, t, m)| *s == Stream::Stdout && *t == Tag::Partial && m.len() == MAX_LINE)
        );
        let joined: Vec<u8> = records.into_iter().flat_map(|(_, _, m)| m).collect();
        assert_eq!(joined, input);
    }

    #[test]
    fn streams_interleave_and_keep_their_own_partial_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut writer = LogWriter::open(&path).unwrap();
        let now = SystemTime::now();
        writer.write(Stream::Stdout, b"out-a", now);
        writer.write(Stream::Stderr, b"err-a\nerr", now);
        writer.write(Stream::Stdout, b"-b\n", now);
        writer.write(Stream::Stderr, b"-b", now);
        writer.finish(Stream::Stderr, now);
        writer.finish(Stream::Stdout, now);
        assert_eq!(
            read_log(&path),
            vec![
                (Stream::Stderr, Tag::Full, b"err-a".to_vec()),
                (Stream::Stdout, Tag::Full, b"out-a-b".to_vec()),
                (Stream::Stderr, Tag::Partial, b"err-b".to_vec()),
            ]
        );
    }

    #[test]
    fn hundred_thousand_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut writer = LogWriter::open(&path).unwrap();
        let mut input = Vec::new();
        for i in 0..100_000 {
            input.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        for chunk in input.chunks(32 * 1024) {
            writer.write(Stream::Stdout, chunk, SystemTime::now());
        }
        writer.finish(Stream::Stdout, SystemTime::now());
        let records = read_log(&path);
        assert_eq!(records.len(), 100_000);
        for (i, (_, tag, msg)) in records.iter().enumerate() {
            assert_eq!(*tag, Tag::Full);
            assert_eq!(msg, format!("line {i}").as_bytes());
        }
    }

    #[test]
    fn reopen_while_writing_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut writer = LogWriter::open(&path).unwrap();
        let mut rotated = Vec::new();
        for i in 0..10_000 {
            // A line cut in two by the rotation, as a read can be.
            writer.write(
                Stream::Stdout,
                format!("line {i}").as_bytes(),
                SystemTime::now(),
            );
            if i % 1000 == 999 {
                let old = dir.path().join(format!("c.log.{i}"));
                std::fs::rename(&path, &old).unwrap();
                rotated.push(old);
                writer.reopen().unwrap();
            }
            writer.write(Stream::Stdout, b"\n", SystemTime::now());
        }
        writer.finish(Stream::Stdout, SystemTime::now());
        rotated.push(path);
        let messages: Vec<Vec<u8>> = rotated
            .iter()
            .flat_map(|p| read_log(p))
            .map(|(_, tag, msg)| {
                assert_eq!(tag, Tag::Full);
                msg
            })
            .collect();
        let expected: Vec<Vec<u8>> = (0..10_000)
            .map(|i| format!("line {i}").into_bytes())
            .collect();
        assert_eq!(messages, expected);
    }

    #[test]
    fn a_burst_of_short_lines_is_written_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut writer = LogWriter::open(&path).unwrap();
        // ~110 KiB read, ~1 MiB once every line has its timestamp and tags.
        let burst: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        writer.write(Stream::Stdout, &burst, SystemTime::now());
        assert_eq!(writer.pending_bytes(), 0);
        assert_eq!(writer.pending.capacity(), WRITE_BATCH);
        // The longest record fits a batch exactly.
        writer.write(Stream::Stderr, &[b'x'; MAX_LINE + 1], SystemTime::now());
        assert_eq!(writer.pending.capacity(), WRITE_BATCH);
        let records = read_log(&path);
        assert_eq!(records.len(), 20_001);
        for (i, (stream, tag, msg)) in records.iter().take(20_000).enumerate() {
            assert_eq!((*stream, *tag), (Stream::Stdout, Tag::Full));
            assert_eq!(msg, i.to_string().as_bytes());
        }
        assert_eq!(records[20_000].2.len(), MAX_LINE);
    }

    #[test]
    fn pending_records_shrink_back_once_the_file_recovers() {
        // /dev/full fails every write with ENOSPC, like a full disk.
        let mut writer = LogWriter::open(Path::new("/dev/full")).unwrap();
        for i in 0..2_000 {
            writer.write(
                Stream::Stdout,
                format!("kept {i}\n").as_bytes(),
                SystemTime::now(),
            );
        }
        assert!(writer.pending_bytes() > 2 * WRITE_BATCH);
        // The disk has room again.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        writer.file = open_log(&path).unwrap();
        assert!(writer.flush());
        assert_eq!(writer.pending.capacity(), WRITE_BATCH);
        assert_eq!(read_log(&path).len(), 2_000);
    }

    #[test]
    fn write_failure_drops_records_and_counts_them() {
        // /dev/full fails every write with ENOSPC, like a full disk.
        let mut writer = LogWriter::with_pending_limit(Path::new("/dev/full"), 1024).unwrap();
        for _ in 0..100 {
            writer.write(
                Stream::Stdout,
                b"0123456789012345678901234567890123456789\n",
                SystemTime::now(),
            );
        }
        assert!(writer.pending_bytes() <= 1024);
        assert!(writer.dropped_records() > 0);
        // Kept records plus dropped ones account for every line.
        let record_len = TIMESTAMP_LEN + " stdout F ".len() + 40 + 1;
        assert_eq!(
            writer.pending_bytes() / record_len + writer.dropped_records() as usize,
            100
        );
    }

    #[test]
    fn reopen_error_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("c.log");
        let mut writer = LogWriter::open(&path).unwrap();
        writer.write(Stream::Stdout, b"one\n", SystemTime::now());
        std::fs::rename(&sub, dir.path().join("moved")).unwrap();
        let err = writer.reopen().unwrap_err();
        assert!(err.to_string().starts_with("open container log "), "{err}");
        writer.write(Stream::Stdout, b"two\n", SystemTime::now());
        let records = read_log(&dir.path().join("moved/c.log"));
        assert_eq!(records.len(), 2);
    }

    #[test]
    fn parse_record_rejects_garbage() {
        assert!(parse_record(b"ts stdout X msg").is_none());
        assert!(parse_record(b"ts stdin F msg").is_none());
        assert!(parse_record(b"ts stdout F").is_none());
        let r = parse_record(b"ts stderr P a b").unwrap();
        assert_eq!(r.message, b"a b");
    }

    /// Streams made of segments: a run of one byte (up to 40 000, so lines
    /// cross the 16 KiB split), a few arbitrary bytes, and a terminator that
    /// is `\n`, `\r\n`, a lone `\r` or nothing.
    fn stream_strategy() -> impl Strategy<Value = Vec<u8>> {
        let segment = (
            0usize..40_000,
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            0u8..4,
        );
        proptest::collection::vec(segment, 0..6).prop_map(|segments| {
            let mut input = Vec::new();
            for (run, fill, noise, terminator) in segments {
                input.resize(input.len() + run, fill);
                input.extend_from_slice(&noise);
                input.extend_from_slice(match terminator {
                    0 => &b"\n"[..],
                    1 => b"\r\n",
                    2 => b"\r",
                    _ => b"",
                });
            }
            input
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn framing_reconstructs_the_stream(input in stream_strategy(), chunk in 1usize..20_000) {
            let records = frame(&input, chunk);
            prop_assert_eq!(reassemble(&records), normalize_crlf(&input));
            for (i, (tag, msg)) in records.iter().enumerate() {
                prop_assert!(msg.len() <= MAX_LINE);
                prop_assert!(!msg.contains(&b'\n'));
                // Only the last record may be a short P (unterminated output).
                if *tag == Tag::Partial && i + 1 < records.len() {
                    prop_assert_eq!(msg.len(), MAX_LINE);
                }
            }
            // Chunking never changes the records.
            prop_assert_eq!(frame(&input, input.len() + 1), records);
        }

        #[test]
        fn framing_is_exact_without_carriage_returns(input in stream_strategy(), chunk in 1usize..20_000) {
            let input: Vec<u8> = input.into_iter().filter(|&b| b != b'\r').collect();
            let records = frame(&input, chunk);
            prop_assert_eq!(reassemble(&records), input);
        }
    }
}
