//! SPDY/3 frames and the codec that turns them into bytes and back.
//!
//! The one thing to know before changing this file: header blocks are
//! compressed with ONE zlib stream per direction for the whole connection
//! (primed with the SPDY/3 dictionary, SYNC_FLUSH after each block). A frame
//! carrying headers that is decoded out of order, skipped, or decoded by a
//! second decoder corrupts every later header block. That is why the decoder
//! fully decodes every SYN_STREAM/SYN_REPLY/HEADERS it sees, even for streams
//! the session is going to ignore, and why any error leaves the connection
//! unusable.
//!
//! The wire format matches github.com/moby/spdystream's `spdy` package (the
//! peer behind kubectl, the API server and kubelet): version 3, 32-bit
//! header counts and lengths, lower-case names, multiple values joined by NUL.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::HEADER_DICTIONARY;

/// The only protocol version spoken; spdystream sends nothing else.
pub const VERSION: u16 = 3;
/// The largest length a frame header can carry (24 bits).
pub const MAX_FRAME_LENGTH: usize = (1 << 24) - 1;

const HEADER_LEN: usize = 8;
const CONTROL_BIT: u32 = 0x8000_0000;
const STREAM_ID_MASK: u32 = 0x7fff_ffff;
const FLAG_FIN: u8 = 0x01;
const FLAG_UNIDIRECTIONAL: u8 = 0x02;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// Why a frame could not be decoded or encoded. Every decode error is fatal
/// for the connection: the header decompressor's state can no longer be
/// trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("spdy control frame has version {version}, only version 3 is spoken")]
    UnsupportedVersion { version: u16 },
    #[error("spdy data frame on stream {stream_id} is {length} bytes, the limit is {limit}")]
    DataTooLarge {
        stream_id: u32,
        length: usize,
        limit: usize,
    },
    #[error("spdy control frame of type {frame_type} is {length} bytes, the limit is {limit}")]
    ControlTooLarge {
        frame_type: u16,
        length: usize,
        limit: usize,
    },
    #[error("malformed spdy {frame} frame: {reason}")]
    Malformed { frame: &'static str, reason: String },
    #[error("spdy {frame} frame names stream 0")]
    ZeroStreamId { frame: &'static str },
    #[error("spdy header block decompresses to more than {limit} bytes")]
    HeaderBlockTooLarge { limit: usize },
    #[error("spdy header block has {count} headers, the limit is {limit}")]
    TooManyHeaders { count: u64, limit: usize },
    #[error("invalid spdy header block: {reason}")]
    InvalidHeaders { reason: String },
    #[error("decompress spdy header block: {reason}")]
    Decompress { reason: String },
    #[error("compress spdy header block: {reason}")]
    Compress { reason: String },
    #[error("encode spdy {frame} frame: {reason}")]
    Encode { frame: &'static str, reason: String },
}

/// Caps on what a peer can make the decoder hold. The defaults accept
/// everything spdystream sends (it writes one DATA frame per `Write` call,
/// up to the 24-bit maximum) while keeping control frames and header blocks,
/// which nothing legitimate makes large, small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest DATA payload accepted.
    pub max_data_frame: usize,
    /// Largest control frame payload (compressed, for header frames).
    pub max_control_frame: usize,
    /// Largest decompressed header block.
    pub max_header_block: usize,
    /// Most header names in one block.
    pub max_headers: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_data_frame: MAX_FRAME_LENGTH,
            max_control_frame: 256 * 1024,
            max_header_block: 256 * 1024,
            max_headers: 256,
        }
    }
}

impl FrameLimits {
    /// The most bytes the decoder may need buffered before it can return the
    /// next frame or an error: callers never need to hold more than this.
    pub fn max_frame_bytes(&self) -> usize {
        HEADER_LEN
            + self
                .max_data_frame
                .max(self.max_control_frame)
                .min(MAX_FRAME_LENGTH)
    }
}

/// RST_STREAM status codes (SPDY/3 section 2.6.3). Unknown codes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RstStatus(pub u32);

impl RstStatus {
    pub const PROTOCOL_ERROR: Self = Self(1);
    pub const INVALID_STREAM: Self = Self(2);
    pub const REFUSED_STREAM: Self = Self(3);
    pub const UNSUPPORTED_VERSION: Self = Self(4);
    pub const CANCEL: Self = Self(5);
    pub const INTERNAL_ERROR: Self = Self(6);
    pub const FLOW_CONTROL_ERROR: Self = Self(7);
    pub const STREAM_IN_USE: Self = Self(8);
    pub const STREAM_ALREADY_CLOSED: Self = Self(9);
    pub const INVALID_CREDENTIALS: Self = Self(10);
    pub const FRAME_TOO_LARGE: Self = Self(11);
}

impl std::fmt::Display for RstStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match *self {
            Self::PROTOCOL_ERROR => "protocol error",
            Self::INVALID_STREAM => "invalid stream",
            Self::REFUSED_STREAM => "refused stream",
            Self::UNSUPPORTED_VERSION => "unsupported version",
            Self::CANCEL => "cancel",
            Self::INTERNAL_ERROR => "internal error",
            Self::FLOW_CONTROL_ERROR => "flow control error",
            Self::STREAM_IN_USE => "stream in use",
            Self::STREAM_ALREADY_CLOSED => "stream already closed",
            Self::INVALID_CREDENTIALS => "invalid credentials",
            Self::FRAME_TOO_LARGE => "frame too large",
            _ => return write!(f, "status {}", self.0),
        };
        f.write_str(name)
    }
}

/// GOAWAY status codes (SPDY/3 section 2.6.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GoAwayStatus(pub u32);

impl GoAwayStatus {
    pub const OK: Self = Self(0);
    pub const PROTOCOL_ERROR: Self = Self(1);
    /// The spec's value; spdystream's constant says 2, but it neither sends
    /// nor interprets it, so only the spec matters.
    pub const INTERNAL_ERROR: Self = Self(11);
}

/// One SETTINGS entry. The id is 24 bits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub id: u32,
    pub flags: u8,
    pub value: u32,
}

/// A decoded SPDY/3 frame. Stream ids are 31-bit; CREDENTIAL and unknown
/// control frames never appear here (the decoder skips them, as the spec
/// asks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        /// 0 (highest) to 7.
        priority: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: RstStatus,
    },
    Settings {
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: GoAwayStatus,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
}

/// An ordered header list with lower-case names. A name may repeat; on the
/// wire its values are joined with NUL into one entry (SPDY forbids
/// duplicate names), and a received NUL-joined value comes back as separate
/// entries, which is what spdystream does with `http.Header`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a value; the name is lower-cased because SPDY/3 requires it
    /// (spdystream rejects a block with an upper-case name).
    pub fn append(&mut self, name: &str, value: impl Into<String>) {
        self.entries.push((name.to_ascii_lowercase(), value.into()));
    }

    /// The first value of `name`, compared case-insensitively so callers can
    /// use Go's canonical spelling (`streamType`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of (name, value) entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<N: AsRef<str>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        for (name, value) in iter {
            headers.append(name.as_ref(), value);
        }
        headers
    }
}

/// Both halves of a connection's framing: the decoder for what the peer
/// sends and the encoder for what we send, each with its own persistent zlib
/// context. Split it when reading and writing happen in different places.
pub struct Codec {
    pub decoder: FrameDecoder,
    pub encoder: FrameEncoder,
}

impl Codec {
    pub fn new(limits: FrameLimits) -> Result<Self, FrameError> {
        Ok(Self {
            decoder: FrameDecoder::new(limits),
            encoder: FrameEncoder::new()?,
        })
    }

    /// See [`FrameDecoder::decode`].
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        self.decoder.decode(src)
    }

    /// See [`FrameEncoder::encode`].
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encoder.encode(frame, dst)
    }

    pub fn split(self) -> (FrameDecoder, FrameEncoder) {
        (self.decoder, self.encoder)
    }
}

/// Decodes frames from a byte buffer, owning the connection's header
/// decompressor.
pub struct FrameDecoder {
    inflate: Decompress,
    limits: FrameLimits,
}

impl FrameDecoder {
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            // zlib framing: spdystream's zlib.NewWriterLevelDict writes the
            // zlib header naming the dictionary, then we get "need dictionary".
            inflate: Decompress::new(true),
            limits,
        }
    }

    pub fn limits(&self) -> &FrameLimits {
        &self.limits
    }

    /// Takes the next frame off the front of `src`. `Ok(None)` means more
    /// bytes are needed (nothing is consumed); `src` never needs to hold more
    /// than [`FrameLimits::max_frame_bytes`] for this to make progress, and
    /// nothing is allocated ahead of bytes actually received. Unknown control
    /// frames are consumed and skipped.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            if src.len() < HEADER_LEN {
                return Ok(None);
            }
            let word = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
            let flags = src[4];
            let length = u32::from_be_bytes([0, src[5], src[6], src[7]]) as usize;

            if word & CONTROL_BIT == 0 {
                let stream_id = word & STREAM_ID_MASK;
                if length > self.limits.max_data_frame {
                    return Err(FrameError::DataTooLarge {
                        stream_id,
                        length,
                        limit: self.limits.max_data_frame,
                    });
                }
                if stream_id == 0 {
                    return Err(FrameError::ZeroStreamId { frame: "data" });
                }
                if src.len() < HEADER_LEN + length {
                    return Ok(None);
                }
                src.advance(HEADER_LEN);
                let data = src.split_to(length).freeze();
                // Flag 0x02 (COMPRESS) was dropped in SPDY/3; other bits are
                // undefined and ignored, as spdystream does.
                return Ok(Some(Frame::Data {
                    stream_id,
                    fin: flags & FLAG_FIN != 0,
                    data,
                }));
            }

            let version = ((word >> 16) & 0x7fff) as u16;
            let frame_type = (word & 0xffff) as u16;
            if version != VERSION {
                return Err(FrameError::UnsupportedVersion { version });
            }
            if length > self.limits.max_control_frame {
                return Err(FrameError::ControlTooLarge {
                    frame_type,
                    length,
                    limit: self.limits.max_control_frame,
                });
            }
            if src.len() < HEADER_LEN + length {
                return Ok(None);
            }
            let frame = src.split_to(HEADER_LEN + length);
            if let Some(frame) = self.decode_control(frame_type, flags, &frame[HEADER_LEN..])? {
                return Ok(Some(frame));
            }
            // Unknown type (CREDENTIAL included): "MUST ignore" (SPDY/3 2.2.1).
        }
    }

    fn decode_control(
        &mut self,
        frame_type: u16,
        flags: u8,
        mut p: &[u8],
    ) -> Result<Option<Frame>, FrameError> {
        let fin = flags & FLAG_FIN != 0;
        let frame = match frame_type {
            TYPE_SYN_STREAM => {
                need_at_least("syn_stream", p, 10)?;
                let stream_id = p.get_u32() & STREAM_ID_MASK;
                let associated_to = p.get_u32() & STREAM_ID_MASK;
                let priority = p.get_u8() >> 5;
                let _credential_slot = p.get_u8();
                // Decompress before validating the id: the zlib stream must
                // advance past this block whatever happens to the frame.
                let headers = self.decode_headers(p)?;
                nonzero("syn_stream", stream_id)?;
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                let name = if frame_type == TYPE_SYN_REPLY {
                    "syn_reply"
                } else {
                    "headers"
                };
                need_at_least(name, p, 4)?;
                let stream_id = p.get_u32() & STREAM_ID_MASK;
                let headers = self.decode_headers(p)?;
                nonzero(name, stream_id)?;
                if frame_type == TYPE_SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                }
            }
            TYPE_RST_STREAM => {
                need_exactly("rst_stream", p, 8)?;
                let stream_id = p.get_u32() & STREAM_ID_MASK;
                let status = p.get_u32();
                nonzero("rst_stream", stream_id)?;
                if status == 0 {
                    // spdystream rejects it too: 0 is not a status.
                    return Err(malformed("rst_stream", "status 0".into()));
                }
                Frame::RstStream {
                    stream_id,
                    status: RstStatus(status),
                }
            }
            TYPE_SETTINGS => {
                need_at_least("settings", p, 4)?;
                let count = p.get_u32() as usize;
                if count.checked_mul(8) != Some(p.len()) {
                    return Err(malformed(
                        "settings",
                        format!("{count} entries in {} bytes", p.len()),
                    ));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let word = p.get_u32();
                    entries.push(Setting {
                        flags: (word >> 24) as u8,
                        id: word & 0x00ff_ffff,
                        value: p.get_u32(),
                    });
                }
                Frame::Settings { entries }
            }
            TYPE_PING => {
                need_exactly("ping", p, 4)?;
                Frame::Ping { id: p.get_u32() }
            }
            TYPE_GOAWAY => {
                need_exactly("goaway", p, 8)?;
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & STREAM_ID_MASK,
                    status: GoAwayStatus(p.get_u32()),
                }
            }
            TYPE_WINDOW_UPDATE => {
                need_exactly("window_update", p, 8)?;
                // Stream 0 is the SPDY/3.1 session window, so 0 is allowed.
                Frame::WindowUpdate {
                    stream_id: p.get_u32() & STREAM_ID_MASK,
                    delta: p.get_u32() & STREAM_ID_MASK,
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(frame))
    }

    fn decode_headers(&mut self, compressed: &[u8]) -> Result<Headers, FrameError> {
        let block = self.inflate_block(compressed)?;
        parse_header_block(&block, self.limits.max_headers)
    }

    /// Inflates one header block. The peer ends each block with a SYNC_FLUSH,
    /// so all of it comes out once all input is in and output space is left.
    fn inflate_block(&mut self, input: &[u8]) -> Result<Vec<u8>, FrameError> {
        let limit = self.limits.max_header_block;
        let mut out: Vec<u8> = Vec::with_capacity(limit.min(input.len().saturating_mul(4).max(64)));
        let mut consumed = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= limit {
                    return Err(FrameError::HeaderBlockTooLarge { limit });
                }
                let grow = out.len().max(256).min(limit - out.len());
                out.reserve_exact(grow);
            }
            let in_before = self.inflate.total_in();
            let out_before = out.len();
            let result =
                self.inflate
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - in_before) as usize;
            consumed += used;
            match result {
                Ok(Status::StreamEnd) => {
                    // The peer ended its zlib stream. This block may still be
                    // whole; the next one will fail to inflate.
                    if consumed != input.len() {
                        return Err(FrameError::Decompress {
                            reason: "bytes after the end of the zlib stream".into(),
                        });
                    }
                    return Ok(out);
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&HEADER_DICTIONARY)
                        .map_err(|e| FrameError::Decompress {
                            reason: format!("set the spdy dictionary: {e}"),
                        })?;
                    continue;
                }
                Err(e) => {
                    return Err(FrameError::Decompress {
                        reason: e.to_string(),
                    });
                }
            }
            if consumed == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if used == 0 && out.len() == out_before && out.len() < out.capacity() {
                // Input left, room to write, yet zlib did nothing.
                return Err(FrameError::Decompress {
                    reason: "header block is truncated or corrupt".into(),
                });
            }
        }
    }
}

fn need_at_least(frame: &'static str, p: &[u8], n: usize) -> Result<(), FrameError> {
    if p.len() < n {
        return Err(malformed(
            frame,
            format!("{} bytes, need at least {n}", p.len()),
        ));
    }
    Ok(())
}

fn need_exactly(frame: &'static str, p: &[u8], n: usize) -> Result<(), FrameError> {
    if p.len() != n {
        return Err(malformed(frame, format!("{} bytes, want {n}", p.len())));
    }
    Ok(())
}

fn nonzero(frame: &'static str, stream_id: u32) -> Result<(), FrameError> {
    if stream_id == 0 {
        return Err(FrameError::ZeroStreamId { frame });
    }
    Ok(())
}

fn malformed(frame: &'static str, reason: String) -> FrameError {
    FrameError::Malformed { frame, reason }
}

fn invalid_headers(reason: impl Into<String>) -> FrameError {
    FrameError::InvalidHeaders {
        reason: reason.into(),
    }
}

/// Parses a decompressed block: u32 count, then per header u32 name length,
/// name, u32 value length, NUL-separated values. Rejects what spdystream
/// rejects (upper-case and duplicate names) plus empty names, which the spec
/// forbids, and anything left over.
fn parse_header_block(mut block: &[u8], max_headers: usize) -> Result<Headers, FrameError> {
    if block.len() < 4 {
        return Err(invalid_headers("block shorter than its header count"));
    }
    let count = block.get_u32() as usize;
    // Each header takes at least 8 bytes of lengths: a cheap bound before
    // anything is allocated from an untrusted count.
    if count > max_headers {
        return Err(FrameError::TooManyHeaders {
            count: count as u64,
            limit: max_headers,
        });
    }
    if count.saturating_mul(8) > block.len() {
        return Err(invalid_headers(format!(
            "{count} headers cannot fit in {} bytes",
            block.len()
        )));
    }
    let mut headers = Headers {
        entries: Vec::with_capacity(count),
    };
    for _ in 0..count {
        let name = take_string(&mut block, "name")?;
        if name.is_empty() {
            return Err(invalid_headers("empty header name"));
        }
        if name.contains('\0') {
            return Err(invalid_headers("header name contains NUL"));
        }
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid_headers(format!(
                "header name {name:?} is not lower-case"
            )));
        }
        if headers.entries.iter().any(|(n, _)| *n == name) {
            return Err(invalid_headers(format!("header {name:?} appears twice")));
        }
        let value = take_string(&mut block, "value")?;
        for v in value.split('\0') {
            headers.entries.push((name.clone(), v.to_owned()));
        }
    }
    if !block.is_empty() {
        return Err(invalid_headers(format!(
            "{} bytes after the last header",
            block.len()
        )));
    }
    Ok(headers)
}

fn take_string(block: &mut &[u8], what: &str) -> Result<String, FrameError> {
    if block.len() < 4 {
        return Err(invalid_headers(format!("truncated header {what} length")));
    }
    let len = block.get_u32() as usize;
    if len > block.len() {
        return Err(invalid_headers(format!(
            "header {what} of {len} bytes, only {} left",
            block.len()
        )));
    }
    let (bytes, rest) = block.split_at(len);
    *block = rest;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| invalid_headers(format!("header {what} is not utf-8")))
}

/// Encodes frames into a byte buffer, owning the connection's header
/// compressor.
pub struct FrameEncoder {
    deflate: Compress,
}

impl FrameEncoder {
    pub fn new() -> Result<Self, FrameError> {
        // spdystream compresses with BestCompression; the level only changes
        // the bytes, not what the peer can read. Header blocks here are tiny
        // (kubelet replies with none), so the default level is plenty.
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(&HEADER_DICTIONARY)
            .map_err(|e| FrameError::Compress {
                reason: format!("set the spdy dictionary: {e}"),
            })?;
        Ok(Self { deflate })
    }

    /// Appends `frame` to `dst`. On error `dst` is left as it was, but the
    /// compressor may have advanced: treat the encoder as unusable.
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        let result = self.encode_inner(frame, dst);
        if result.is_err() {
            dst.truncate(start);
        }
        result
    }

    fn encode_inner(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                check_stream_id("data", *stream_id)?;
                if data.len() > MAX_FRAME_LENGTH {
                    return Err(FrameError::Encode {
                        frame: "data",
                        reason: format!("{} bytes do not fit in a frame", data.len()),
                    });
                }
                dst.reserve(HEADER_LEN + data.len());
                dst.put_u32(*stream_id);
                dst.put_u32(flags_and_length(u8::from(*fin), data.len()));
                dst.put_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                fin,
                unidirectional,
                headers,
            } => {
                check_stream_id("syn_stream", *stream_id)?;
                if *associated_to > STREAM_ID_MASK || *priority > 7 {
                    return Err(FrameError::Encode {
                        frame: "syn_stream",
                        reason: format!(
                            "associated stream {associated_to} or priority {priority} out of range"
                        ),
                    });
                }
                let block = self.deflate_headers(headers)?;
                let mut flags = u8::from(*fin);
                if *unidirectional {
                    flags |= FLAG_UNIDIRECTIONAL;
                }
                let mut p = BytesMut::with_capacity(10 + block.len());
                p.put_u32(*stream_id);
                p.put_u32(*associated_to);
                p.put_u8(priority << 5);
                p.put_u8(0);
                p.put_slice(&block);
                put_control(dst, "syn_stream", TYPE_SYN_STREAM, flags, &p)?;
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            }
            | Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                let (name, frame_type) = if matches!(frame, Frame::SynReply { .. }) {
                    ("syn_reply", TYPE_SYN_REPLY)
                } else {
                    ("headers", TYPE_HEADERS)
                };
                check_stream_id(name, *stream_id)?;
                let block = self.deflate_headers(headers)?;
                let mut p = BytesMut::with_capacity(4 + block.len());
                p.put_u32(*stream_id);
                p.put_slice(&block);
                put_control(dst, name, frame_type, u8::from(*fin), &p)?;
            }
            Frame::RstStream { stream_id, status } => {
                check_stream_id("rst_stream", *stream_id)?;
                let mut p = [0u8; 8];
                p[..4].copy_from_slice(&stream_id.to_be_bytes());
                p[4..].copy_from_slice(&status.0.to_be_bytes());
                put_control(dst, "rst_stream", TYPE_RST_STREAM, 0, &p)?;
            }
            Frame::Settings { entries } => {
                let mut p = BytesMut::with_capacity(4 + 8 * entries.len());
                p.put_u32(
                    u32::try_from(entries.len()).map_err(|_| FrameError::Encode {
                        frame: "settings",
                        reason: "too many entries".into(),
                    })?,
                );
                for e in entries {
                    if e.id > 0x00ff_ffff {
                        return Err(FrameError::Encode {
                            frame: "settings",
                            reason: format!("id {} does not fit in 24 bits", e.id),
                        });
                    }
                    p.put_u32(u32::from(e.flags) << 24 | e.id);
                    p.put_u32(e.value);
                }
                put_control(dst, "settings", TYPE_SETTINGS, 0, &p)?;
            }
            Frame::Ping { id } => {
                put_control(dst, "ping", TYPE_PING, 0, &id.to_be_bytes())?;
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                if *last_good_stream_id > STREAM_ID_MASK {
                    return Err(FrameError::Encode {
                        frame: "goaway",
                        reason: format!("stream id {last_good_stream_id} exceeds 31 bits"),
                    });
                }
                let mut p = [0u8; 8];
                p[..4].copy_from_slice(&last_good_stream_id.to_be_bytes());
                p[4..].copy_from_slice(&status.0.to_be_bytes());
                put_control(dst, "goaway", TYPE_GOAWAY, 0, &p)?;
            }
            Frame::WindowUpdate { stream_id, delta } => {
                if *stream_id > STREAM_ID_MASK || *delta > STREAM_ID_MASK {
                    return Err(FrameError::Encode {
                        frame: "window_update",
                        reason: format!("stream {stream_id} or delta {delta} exceeds 31 bits"),
                    });
                }
                let mut p = [0u8; 8];
                p[..4].copy_from_slice(&stream_id.to_be_bytes());
                p[4..].copy_from_slice(&delta.to_be_bytes());
                put_control(dst, "window_update", TYPE_WINDOW_UPDATE, 0, &p)?;
            }
        }
        Ok(())
    }

    fn deflate_headers(&mut self, headers: &Headers) -> Result<Vec<u8>, FrameError> {
        let block = build_header_block(headers)?;
        self.deflate_block(&block)
    }

    /// Compresses one serialised header block and ends it with a SYNC_FLUSH,
    /// as spdystream's framer does, so the peer can inflate it whole.
    fn deflate_block(&mut self, block: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut out: Vec<u8> = Vec::with_capacity(block.len() / 2 + 64);
        let mut consumed = 0;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.len().max(64));
            }
            let in_before = self.deflate.total_in();
            self.deflate
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| FrameError::Compress {
                    reason: e.to_string(),
                })?;
            consumed += (self.deflate.total_in() - in_before) as usize;
            // With output space left over after a SYNC_FLUSH, all is out.
            if consumed == block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// Serialises headers, joining the values of a repeated name with NUL (the
/// names stay in first-seen order).
fn build_header_block(headers: &Headers) -> Result<Vec<u8>, FrameError> {
    let mut names: Vec<&str> = Vec::new();
    for (name, value) in headers.iter() {
        if name.is_empty() || name.contains('\0') {
            return Err(FrameError::Encode {
                frame: "header",
                reason: format!("invalid header name {name:?}"),
            });
        }
        if value.contains('\0') {
            return Err(FrameError::Encode {
                frame: "header",
                reason: format!("value of {name:?} contains NUL"),
            });
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut block = Vec::new();
    block.put_u32(len_u32(names.len())?);
    for name in names {
        let joined = headers.get_all(name).collect::<Vec<_>>().join("\0");
        block.put_u32(len_u32(name.len())?);
        block.put_slice(name.as_bytes());
        block.put_u32(len_u32(joined.len())?);
        block.put_slice(joined.as_bytes());
    }
    Ok(block)
}

fn len_u32(n: usize) -> Result<u32, FrameError> {
    u32::try_from(n).map_err(|_| FrameError::Encode {
        frame: "header",
        reason: format!("length {n} exceeds 32 bits"),
    })
}

fn check_stream_id(frame: &'static str, stream_id: u32) -> Result<(), FrameError> {
    if stream_id == 0 || stream_id > STREAM_ID_MASK {
        return Err(FrameError::Encode {
            frame,
            reason: format!("stream id {stream_id} is not in 1..2^31"),
        });
    }
    Ok(())
}

fn flags_and_length(flags: u8, length: usize) -> u32 {
    u32::from(flags) << 24 | (length as u32 & 0x00ff_ffff)
}

fn put_control(
    dst: &mut BytesMut,
    frame: &'static str,
    frame_type: u16,
    flags: u8,
    payload: &[u8],
) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME_LENGTH {
        return Err(FrameError::Encode {
            frame,
            reason: format!("{} bytes do not fit in a frame", payload.len()),
        });
    }
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_u16(0x8000 | VERSION);
    dst.put_u16(frame_type);
    dst.put_u32(flags_and_length(flags, payload.len()));
    dst.put_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Frames written by spdystream's own framer (see the file's header).
    const GO_FRAMES: &str = include_str!("testdata/go_client_frames.txt");

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("testdata is hex"))
            .collect()
    }

    fn go_frames() -> Vec<(&'static str, Vec<u8>)> {
        GO_FRAMES
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (name, hex) = l.split_once(' ').expect("name and hex");
                (name, unhex(hex.trim()))
            })
            .collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs.iter().copied().collect()
    }

    /// Go's http.Header is a map: header order on the wire is random.
    fn sorted(frame: Frame) -> Frame {
        let sort = |mut h: Headers| {
            h.entries.sort();
            h
        };
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                fin,
                unidirectional,
                headers,
            } => Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                fin,
                unidirectional,
                headers: sort(headers),
            },
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            } => Frame::SynReply {
                stream_id,
                fin,
                headers: sort(headers),
            },
            Frame::Headers {
                stream_id,
                fin,
                headers,
            } => Frame::Headers {
                stream_id,
                fin,
                headers: sort(headers),
            },
            other => other,
        }
    }

    fn syn(stream_id: u32, h: &[(&str, &str)]) -> Frame {
        Frame::SynStream {
            stream_id,
            associated_to: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers: headers(h),
        }
    }

    fn expected_go_frames() -> Vec<(&'static str, Frame)> {
        vec![
            ("syn_stream_error", syn(1, &[("streamtype", "error")])),
            ("syn_stream_stdout", syn(3, &[("streamtype", "stdout")])),
            (
                "syn_stream_portforward_data",
                syn(
                    5,
                    &[("port", "8080"), ("requestid", "0"), ("streamtype", "data")],
                ),
            ),
            (
                "syn_stream_multi_fin_uni",
                Frame::SynStream {
                    stream_id: 7,
                    associated_to: 5,
                    priority: 7,
                    fin: true,
                    unidirectional: true,
                    headers: headers(&[("x-multi", "a"), ("x-multi", "b")]),
                },
            ),
            (
                "data_hello",
                Frame::Data {
                    stream_id: 1,
                    fin: false,
                    data: Bytes::from_static(b"hello"),
                },
            ),
            (
                "data_fin_empty",
                Frame::Data {
                    stream_id: 1,
                    fin: true,
                    data: Bytes::new(),
                },
            ),
            (
                "data_fin_payload",
                Frame::Data {
                    stream_id: 3,
                    fin: true,
                    data: Bytes::from_static(b"bye\n"),
                },
            ),
            ("ping_1", Frame::Ping { id: 1 }),
            (
                "rst_cancel_3",
                Frame::RstStream {
                    stream_id: 3,
                    status: RstStatus::CANCEL,
                },
            ),
            (
                "rst_refused_5",
                Frame::RstStream {
                    stream_id: 5,
                    status: RstStatus::REFUSED_STREAM,
                },
            ),
            (
                "goaway_ok_0",
                Frame::GoAway {
                    last_good_stream_id: 0,
                    status: GoAwayStatus::OK,
                },
            ),
            (
                "goaway_protocol_9",
                Frame::GoAway {
                    last_good_stream_id: 9,
                    status: GoAwayStatus::PROTOCOL_ERROR,
                },
            ),
            (
                "window_update_1",
                Frame::WindowUpdate {
                    stream_id: 1,
                    delta: 65536,
                },
            ),
            (
                "settings_two",
                Frame::Settings {
                    entries: vec![
                        Setting {
                            id: 4,
                            flags: 0,
                            value: 100,
                        },
                        Setting {
                            id: 7,
                            flags: 1,
                            value: 65536,
                        },
                    ],
                },
            ),
            (
                "headers_fin_1",
                Frame::Headers {
                    stream_id: 1,
                    fin: true,
                    headers: headers(&[("streamtype", "resize")]),
                },
            ),
            (
                "syn_reply_empty_3",
                Frame::SynReply {
                    stream_id: 3,
                    fin: false,
                    headers: Headers::new(),
                },
            ),
            ("syn_stream_stdin_again", syn(9, &[("streamtype", "stdin")])),
        ]
    }

    #[test]
    fn go_client_frames_decode_to_expected_values() {
        let mut decoder = FrameDecoder::new(FrameLimits::default());
        let frames = go_frames();
        let expected = expected_go_frames();
        assert_eq!(frames.len(), expected.len());
        for ((name, bytes), (want_name, want)) in frames.into_iter().zip(expected) {
            assert_eq!(name, want_name);
            let mut buf = BytesMut::from(&bytes[..]);
            let got = decoder
                .decode(&mut buf)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .unwrap_or_else(|| panic!("{name}: incomplete"));
            assert!(buf.is_empty(), "{name}: {} bytes left", buf.len());
            assert_eq!(sorted(got), sorted(want), "{name}");
        }
    }

    #[test]
    fn go_client_frames_decode_when_fed_one_byte_at_a_time() {
        let all: Vec<u8> = go_frames().into_iter().flat_map(|(_, b)| b).collect();
        let mut decoder = FrameDecoder::new(FrameLimits::default());
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in all {
            buf.put_u8(byte);
            while let Some(frame) = decoder.decode(&mut buf).expect("valid capture") {
                got.push(sorted(frame));
            }
        }
        let want: Vec<Frame> = expected_go_frames()
            .into_iter()
            .map(|(_, f)| sorted(f))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn go_header_block_needs_the_connections_zlib_context() {
        // The second SYN_STREAM continues the first one's zlib stream: a
        // decoder that missed the first cannot read it. This is what makes
        // the per-connection context observable.
        let frames = go_frames();
        let mut decoder = FrameDecoder::new(FrameLimits::default());
        let mut buf = BytesMut::from(&frames[1].1[..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(FrameError::Decompress { .. })
        ));
    }

    fn round_trip(frames: &[Frame]) -> Vec<Frame> {
        let mut codec = Codec::new(FrameLimits::default()).expect("codec");
        let mut wire = BytesMut::new();
        for frame in frames {
            codec.encode(frame, &mut wire).expect("encode");
        }
        let mut decoder = FrameDecoder::new(FrameLimits::default());
        let mut out = Vec::new();
        while let Some(frame) = decoder.decode(&mut wire).expect("decode") {
            out.push(frame);
        }
        assert!(wire.is_empty());
        out
    }

    #[test]
    fn every_frame_type_round_trips_through_one_context() {
        let mut frames: Vec<Frame> = expected_go_frames().into_iter().map(|(_, f)| f).collect();
        frames.push(Frame::SynReply {
            stream_id: 9,
            fin: true,
            headers: headers(&[("a", ""), ("b", "x"), ("b", "y")]),
        });
        frames.push(Frame::WindowUpdate {
            stream_id: 0,
            delta: 0x7fff_ffff,
        });
        assert_eq!(round_trip(&frames), frames);
    }

    #[test]
    fn headers_are_lower_case_and_looked_up_case_insensitively() {
        let mut h = Headers::new();
        h.append("streamType", "stdout");
        h.append("X-Multi", "a");
        h.append("x-multi", "b");
        assert_eq!(h.get("streamtype"), Some("stdout"));
        assert_eq!(h.get("STREAMTYPE"), Some("stdout"));
        assert_eq!(h.get_all("x-multi").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(h.get("missing"), None);
        assert!(
            h.iter()
                .all(|(n, _)| n.bytes().all(|b| !b.is_ascii_uppercase()))
        );
    }

    #[test]
    fn repeated_names_go_out_as_one_nul_joined_entry() {
        let h = headers(&[("x", "1"), ("y", "2"), ("x", "3")]);
        let block = build_header_block(&h).expect("block");
        let parsed = parse_header_block(&block, 16).expect("parse");
        assert_eq!(parsed, headers(&[("x", "1"), ("x", "3"), ("y", "2")]));
        // count = 2 names, spdystream would reject duplicates.
        assert_eq!(&block[..4], &[0, 0, 0, 2]);
    }

    fn control(frame_type: u16, flags: u8, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        put_control(&mut b, "test", frame_type, flags, payload).expect("frame");
        b
    }

    fn decode_one(bytes: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        FrameDecoder::new(FrameLimits::default()).decode(bytes)
    }

    #[test]
    fn wrong_version_is_an_error() {
        let mut b = control(TYPE_PING, 0, &1u32.to_be_bytes());
        b[1] = 2;
        assert_eq!(
            decode_one(&mut b),
            Err(FrameError::UnsupportedVersion { version: 2 })
        );
    }

    #[test]
    fn oversized_frames_are_errors_before_their_bodies_arrive() {
        let mut b = BytesMut::from(&[0x80, 0x03, 0x00, 0x01, 0x00, 0x04, 0x00, 0x01][..]);
        assert!(matches!(
            decode_one(&mut b),
            Err(FrameError::ControlTooLarge {
                length: 0x40001,
                ..
            })
        ));
        let limits = FrameLimits {
            max_data_frame: 10,
            ..FrameLimits::default()
        };
        let mut b = BytesMut::from(&[0, 0, 0, 1, 0, 0, 0, 11][..]);
        assert!(matches!(
            FrameDecoder::new(limits).decode(&mut b),
            Err(FrameError::DataTooLarge { length: 11, .. })
        ));
    }

    #[test]
    fn incomplete_frames_need_more_bytes_and_consume_nothing() {
        let mut b = BytesMut::from(&[0, 0, 0, 1, 0, 0, 0, 5, b'h', b'e'][..]);
        assert_eq!(decode_one(&mut b), Ok(None));
        assert_eq!(b.len(), 10);
        let mut b = BytesMut::from(&[0x80, 0x03][..]);
        assert_eq!(decode_one(&mut b), Ok(None));
    }

    #[test]
    fn malformed_control_frames_are_errors() {
        let cases: Vec<(&str, BytesMut)> = vec![
            (
                "data on stream 0",
                BytesMut::from(&[0u8, 0, 0, 0, 0, 0, 0, 0][..]),
            ),
            (
                "rst of 12 bytes",
                control(TYPE_RST_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0, 0]),
            ),
            (
                "rst status 0",
                control(TYPE_RST_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0, 0]),
            ),
            (
                "rst stream 0",
                control(TYPE_RST_STREAM, 0, &[0, 0, 0, 0, 0, 0, 0, 5]),
            ),
            ("ping of 8 bytes", control(TYPE_PING, 0, &[0; 8])),
            ("goaway of 4 bytes", control(TYPE_GOAWAY, 0, &[0; 4])),
            (
                "window_update of 4 bytes",
                control(TYPE_WINDOW_UPDATE, 0, &[0; 4]),
            ),
            (
                "settings count mismatch",
                control(TYPE_SETTINGS, 0, &[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1]),
            ),
            (
                "settings count overflow",
                control(TYPE_SETTINGS, 0, &[0xff, 0xff, 0xff, 0xff]),
            ),
            (
                "short syn_stream",
                control(TYPE_SYN_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0, 0, 0]),
            ),
            ("short syn_reply", control(TYPE_SYN_REPLY, 0, &[0, 0, 1])),
            (
                "syn_stream without a header block",
                control(TYPE_SYN_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
            ),
            (
                "garbage header block",
                control(
                    TYPE_SYN_STREAM,
                    0,
                    &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
                ),
            ),
        ];
        for (what, mut bytes) in cases {
            assert!(decode_one(&mut bytes).is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn unknown_control_frames_are_skipped() {
        let mut b = control(10, 0, &[1, 2, 3, 4, 5]); // CREDENTIAL
        b.extend_from_slice(&control(0x7fff, 0xff, &[]));
        b.extend_from_slice(&control(TYPE_PING, 0, &7u32.to_be_bytes()));
        assert_eq!(decode_one(&mut b), Ok(Some(Frame::Ping { id: 7 })));
        assert!(b.is_empty());
    }

    /// A SYN_STREAM carrying `block` as its header block, compressed with a
    /// fresh context (so it decodes with a fresh decoder).
    fn syn_with_block(block: &[u8]) -> BytesMut {
        let mut encoder = FrameEncoder::new().expect("encoder");
        let compressed = encoder.deflate_block(block).expect("deflate");
        let mut p = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&compressed);
        control(TYPE_SYN_STREAM, 0, &p)
    }

    fn block(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u32(entries.len() as u32);
        for (n, v) in entries {
            b.put_u32(n.len() as u32);
            b.put_slice(n);
            b.put_u32(v.len() as u32);
            b.put_slice(v);
        }
        b
    }

    #[test]
    fn bad_header_blocks_are_errors() {
        let mut trailing = block(&[(b"a", b"b")]);
        trailing.push(0);
        let mut overcount = block(&[(b"a", b"b")]);
        overcount[3] = 100;
        let mut many = Vec::new();
        many.put_u32(1000);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("upper-case name", block(&[(b"Streamtype", b"x")])),
            ("duplicate name", block(&[(b"a", b"1"), (b"a", b"2")])),
            ("empty name", block(&[(b"", b"1")])),
            ("nul in name", block(&[(b"a\0b", b"1")])),
            ("non-utf-8 value", block(&[(b"a", &[0xff, 0xfe])])),
            ("trailing bytes", trailing),
            ("count beyond the block", overcount),
            ("too many headers", many),
            ("truncated", vec![0, 0, 0, 1, 0, 0]),
        ];
        for (what, b) in cases {
            let mut frame = syn_with_block(&b);
            assert!(
                matches!(
                    decode_one(&mut frame),
                    Err(FrameError::InvalidHeaders { .. } | FrameError::TooManyHeaders { .. })
                ),
                "{what} was accepted"
            );
        }
    }

    #[test]
    fn header_block_bombs_stop_at_the_limit() {
        // 1 MiB of one byte compresses to about a kilobyte.
        let value = vec![b'a'; 1 << 20];
        let mut frame = syn_with_block(&block(&[(b"a", &value)]));
        assert!(frame.len() < 8 * 1024);
        assert_eq!(
            decode_one(&mut frame),
            Err(FrameError::HeaderBlockTooLarge { limit: 256 * 1024 })
        );
    }

    #[test]
    fn encoding_rejects_what_the_peer_could_not_read() {
        let mut enc = FrameEncoder::new().expect("encoder");
        let mut dst = BytesMut::new();
        let bad = [
            Frame::Data {
                stream_id: 0,
                fin: false,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 0x8000_0000,
                status: RstStatus::CANCEL,
            },
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: headers(&[("a", "x\0y")]),
            },
            Frame::Settings {
                entries: vec![Setting {
                    id: 1 << 24,
                    flags: 0,
                    value: 0,
                }],
            },
        ];
        for frame in bad {
            assert!(enc.encode(&frame, &mut dst).is_err(), "{frame:?} encoded");
            assert!(dst.is_empty());
        }
    }

    fn small_limits() -> FrameLimits {
        FrameLimits {
            max_data_frame: 512,
            max_control_frame: 512,
            max_header_block: 1024,
            max_headers: 8,
        }
    }

    /// Byte sequences shaped like frames (right lengths, random types and
    /// payloads), optionally after a real SYN_STREAM so the inflater is past
    /// its zlib header when the garbage arrives.
    fn frame_shaped() -> impl Strategy<Value = Vec<u8>> {
        let piece = (
            any::<bool>(),
            0u16..12,
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(is_control, frame_type, flags, payload)| {
                let mut b = Vec::new();
                if is_control {
                    b.put_u16(0x8003);
                    b.put_u16(frame_type);
                } else {
                    b.put_u32(u32::from(frame_type) + 1);
                }
                b.put_u32(flags_and_length(flags, payload.len()));
                b.extend_from_slice(&payload);
                b
            });
        (any::<bool>(), proptest::collection::vec(piece, 0..8)).prop_map(|(prefix, pieces)| {
            let mut all = if prefix {
                go_frames()[0].1.clone()
            } else {
                Vec::new()
            };
            for p in pieces {
                all.extend_from_slice(&p);
            }
            all
        })
    }

    /// Whatever the decoder accepts, the encoder can send back unchanged.
    fn reencode(frame: &Frame) -> Frame {
        round_trip(std::slice::from_ref(frame))
            .pop()
            .expect("one frame")
    }

    fn arbitrary_input() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2048),
            frame_shaped()
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The fuzz property: any input ends in frames, an error or a request
        /// for more bytes, never a panic, and nothing it yields or waits for
        /// exceeds the limits.
        #[test]
        fn arbitrary_bytes_never_panic_or_exceed_limits(input in arbitrary_input(), chunk in 1usize..64) {
            let limits = small_limits();
            let mut decoder = FrameDecoder::new(limits);
            let mut buf = BytesMut::new();
            'feed: for piece in input.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match decoder.decode(&mut buf) {
                        Err(_) => break 'feed,
                        Ok(None) => {
                            prop_assert!(buf.len() < limits.max_frame_bytes());
                            break;
                        }
                        Ok(Some(frame)) => {
                            prop_assert_eq!(reencode(&frame), frame.clone());
                            match &frame {
                            Frame::Data { data, .. } => prop_assert!(data.len() <= limits.max_data_frame),
                            Frame::SynStream { headers, .. }
                            | Frame::SynReply { headers, .. }
                            | Frame::Headers { headers, .. } => {
                                let bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
                                prop_assert!(bytes <= limits.max_header_block);
                                prop_assert!(headers.len() <= limits.max_header_block);
                            }
                            Frame::Settings { entries } => prop_assert!(entries.len() * 8 <= limits.max_control_frame),
                            _ => {}
                        }},
                    }
                }
            }
        }

        #[test]
        fn encoded_frames_decode_to_themselves(frames in proptest::collection::vec(arb_frame(), 0..12)) {
            prop_assert_eq!(round_trip(&frames), frames);
        }

        #[test]
        fn decoding_does_not_depend_on_how_bytes_arrive(
            frames in proptest::collection::vec(arb_frame(), 1..8),
            cuts in proptest::collection::vec(1usize..40, 1..20),
        ) {
            let mut codec = Codec::new(FrameLimits::default()).expect("codec");
            let mut wire = BytesMut::new();
            for frame in &frames {
                codec.encode(frame, &mut wire).expect("encode");
            }
            let mut decoder = FrameDecoder::new(FrameLimits::default());
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut cut = cuts.iter().cycle();
            while !wire.is_empty() {
                let n = (*cut.next().expect("cycle")).min(wire.len());
                buf.extend_from_slice(&wire.split_to(n));
                while let Some(frame) = decoder.decode(&mut buf).expect("decode") {
                    got.push(frame);
                }
            }
            prop_assert_eq!(got, frames);
        }
    }

    fn arb_headers() -> impl Strategy<Value = Headers> {
        // Names grouped, so the NUL-joined wire form decodes in the same order.
        proptest::collection::btree_map(
            "[a-z][a-z0-9-]{0,10}",
            proptest::collection::vec("[ -~]{0,12}", 1..3),
            0..5,
        )
        .prop_map(|map| {
            let mut h = Headers::new();
            for (name, values) in map {
                for v in values {
                    h.append(&name, v);
                }
            }
            h
        })
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let id = 1u32..=STREAM_ID_MASK;
        prop_oneof![
            (
                id.clone(),
                0u32..=STREAM_ID_MASK,
                0u8..8,
                any::<bool>(),
                any::<bool>(),
                arb_headers()
            )
                .prop_map(
                    |(stream_id, associated_to, priority, fin, unidirectional, headers)| {
                        Frame::SynStream {
                            stream_id,
                            associated_to,
                            priority,
                            fin,
                            unidirectional,
                            headers,
                        }
                    }
                ),
            (id.clone(), any::<bool>(), arb_headers()).prop_map(|(stream_id, fin, headers)| {
                Frame::SynReply {
                    stream_id,
                    fin,
                    headers,
                }
            }),
            (id.clone(), any::<bool>(), arb_headers()).prop_map(|(stream_id, fin, headers)| {
                Frame::Headers {
                    stream_id,
                    fin,
                    headers,
                }
            }),
            (id.clone(), 1u32..).prop_map(|(stream_id, s)| Frame::RstStream {
                stream_id,
                status: RstStatus(s)
            }),
            proptest::collection::vec((0u32..1 << 24, any::<u8>(), any::<u32>()), 0..4).prop_map(
                |e| {
                    Frame::Settings {
                        entries: e
                            .into_iter()
                            .map(|(id, flags, value)| Setting { id, flags, value })
                            .collect(),
                    }
                }
            ),
            any::<u32>().prop_map(|id| Frame::Ping { id }),
            (0u32..=STREAM_ID_MASK, any::<u32>()).prop_map(|(last_good_stream_id, s)| {
                Frame::GoAway {
                    last_good_stream_id,
                    status: GoAwayStatus(s),
                }
            }),
            (0u32..=STREAM_ID_MASK, 0u32..=STREAM_ID_MASK)
                .prop_map(|(stream_id, delta)| Frame::WindowUpdate { stream_id, delta }),
            (
                id,
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..200)
            )
                .prop_map(|(stream_id, fin, data)| Frame::Data {
                    stream_id,
                    fin,
                    data: Bytes::from(data)
                }),
        ]
    }
}
