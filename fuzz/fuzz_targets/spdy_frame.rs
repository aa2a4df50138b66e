//! Feeds arbitrary bytes to the SPDY frame decoder, in pieces whose sizes
//! come from the input, with small limits so the caps are reached. The
//! decoder must never panic, never ask for more than the limits allow, and
//! everything it accepts must encode and decode back to itself.
#![no_main]

use berth::streaming::spdy::{FrameDecoder, FrameEncoder, FrameLimits};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, data)) = input.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let limits = FrameLimits {
        max_data_frame: 4096,
        max_control_frame: 4096,
        max_header_block: 8192,
        max_headers: 32,
    };
    let mut decoder = FrameDecoder::new(limits);
    let mut encoder = FrameEncoder::new().expect("dictionary fits");
    let mut echo = FrameDecoder::new(limits);
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Err(_) => return,
                Ok(None) => {
                    assert!(buf.len() < limits.max_frame_bytes());
                    break;
                }
                Ok(Some(frame)) => {
                    // One encoder and one decoder for the whole run: this also
                    // exercises the persistent zlib contexts.
                    let mut wire = BytesMut::new();
                    encoder
                        .encode(&frame, &mut wire)
                        .expect("decoded frames encode");
                    let back = echo.decode(&mut wire).expect("our frames decode");
                    assert_eq!(back.as_ref(), Some(&frame));
                    assert!(wire.is_empty());
                }
            }
        }
    }
});
