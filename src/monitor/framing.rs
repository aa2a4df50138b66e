//! Length-delimited prost messages (a varint length, then the message) over
//! non-blocking fds, for the monitor side. The client side reads the same
//! frames with tokio in `client.rs`.

use prost::Message;

/// The largest frame the client accepts (output chunks are at most one read
/// of container output).
pub const MAX_FRAME: usize = 1 << 20;

/// The largest frame the monitor accepts: control messages are tiny and the
/// client sends stdin in chunks of at most `STDIN_CHUNK`; a small bound keeps
/// the monitor small.
pub const MAX_INBOUND_FRAME: usize = 64 * 1024;

/// The client's stdin chunk size.
pub const STDIN_CHUNK: usize = 32 * 1024;

/// Appends `msg` as one frame.
pub fn encode_frame(msg: &impl Message, out: &mut Vec<u8>) {
    // Encoding into a Vec cannot fail: it grows as needed.
    let _ = msg.encode_length_delimited(out);
}

/// The frame length at the start of `buf`: `Ok(None)` while the varint is
/// incomplete, `Err` when it is malformed or over `MAX_FRAME`.
pub fn frame_header(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, String> {
    let mut len: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let len = usize::try_from(len).map_err(|_| "frame length overflows".to_string())?;
            if len > max {
                return Err(format!("frame of {len} bytes exceeds {max}"));
            }
            return Ok(Some((i + 1, len)));
        }
    }
    if buf.len() >= 10 {
        return Err("malformed frame length".into());
    }
    Ok(None)
}

/// Takes the first complete frame off `buf` and decodes it.
pub fn take_frame<M: Message + Default>(
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<M>, String> {
    let Some((header, len)) = frame_header(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < header + len {
        return Ok(None);
    }
    let msg = M::decode(&buf[header..header + len]).map_err(|e| format!("decode message: {e}"))?;
    buf.drain(..header + len);
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::proto::{AttachInput, attach_input};

    #[test]
    fn frames_split_anywhere_decode_once_complete() {
        let msg = AttachInput {
            kind: Some(attach_input::Kind::Stdin(vec![7; 300])),
        };
        let mut encoded = Vec::new();
        encode_frame(&msg, &mut encoded);
        encode_frame(&msg, &mut encoded);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for &b in &encoded {
            buf.push(b);
            while let Some(m) = take_frame::<AttachInput>(&mut buf, MAX_INBOUND_FRAME).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![msg.clone(), msg]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_or_malformed_frames_are_refused() {
        let mut buf = Vec::new();
        prost::encode_length_delimiter(MAX_FRAME + 1, &mut buf).unwrap();
        assert!(frame_header(&buf, MAX_FRAME).is_err());
        assert!(frame_header(&[0xff; 10], MAX_FRAME).is_err());
        assert_eq!(frame_header(&[0x80], MAX_FRAME).unwrap(), None);
    }
}
