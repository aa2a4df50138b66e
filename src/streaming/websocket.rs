//! Channels over one WebSocket, as kubelet's `wsstream`: every message is
//! one channel byte and its data (binary), or, for the `base64.` protocols,
//! the channel as an ASCII digit and the data in base64 (text). With
//! `v5.channel.k8s.io` the client closes a channel it writes with the
//! message `[255, channel]`.

use std::collections::VecDeque;

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::io::{BoxRead, BoxWrite};

/// The largest message accepted from a client.
pub const MAX_MESSAGE: usize = 1 << 20;
/// What one output channel buffers before its writer waits.
const CHANNEL_BUFFER: usize = 64 * 1024;
const STREAM_CLOSE: u8 = 255;

/// The subprotocols of exec and attach, preferred first; `""` is a client
/// that asked for none (binary, pre-v4 status).
pub const REMOTE_COMMAND_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

pub const PORT_FORWARD_PROTOCOLS: &[&str] = &["v4.channel.k8s.io", "v4.base64.channel.k8s.io"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Data from the client is dropped; nothing is sent.
    Ignore,
    /// The client writes it.
    Read,
    /// The server writes it.
    Write,
    ReadWrite,
}

impl Kind {
    fn readable(self) -> bool {
        matches!(self, Kind::Read | Kind::ReadWrite)
    }
    fn writable(self) -> bool {
        matches!(self, Kind::Write | Kind::ReadWrite)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub base64: bool,
    /// `v5.channel.k8s.io`: the client may close a channel.
    pub stream_close: bool,
}

impl Codec {
    pub fn for_protocol(protocol: &str) -> Codec {
        Codec {
            base64: protocol.contains("base64"),
            stream_close: protocol == "v5.channel.k8s.io",
        }
    }

    fn encode(self, channel: u8, data: &[u8]) -> Message {
        if self.base64 {
            let mut text = String::with_capacity(1 + data.len().div_ceil(3) * 4);
            text.push(char::from(b'0' + channel));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
            Message::text(text)
        } else {
            let mut frame = Vec::with_capacity(1 + data.len());
            frame.push(channel);
            frame.extend_from_slice(data);
            Message::binary(frame)
        }
    }

    /// `(channel, data)` of a client message; None for one to skip.
    fn decode(self, message: &[u8]) -> Option<Decoded> {
        let (&first, rest) = message.split_first()?;
        if self.stream_close && first == STREAM_CLOSE {
            return match rest {
                [channel] => Some(Decoded::Close(*channel)),
                _ => Some(Decoded::ProtocolError),
            };
        }
        if self.base64 {
            let channel = first.checked_sub(b'0')?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            Some(Decoded::Data(channel, data))
        } else {
            Some(Decoded::Data(first, rest.to_vec()))
        }
    }
}

enum Decoded {
    Data(u8, Vec<u8>),
    Close(u8),
    ProtocolError,
}

pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// The server's ends of the channels of one connection.
pub struct Channels {
    /// Per channel: what the client sent on it (readable channels).
    pub readers: Vec<Option<BoxRead>>,
    /// Per channel: what to send on it (writable channels). The connection
    /// is closed once every writer is dropped or shut down.
    pub writers: Vec<Option<BoxWrite>>,
    /// Becomes true when the client is gone (closed or disconnected).
    pub closed: tokio::sync::watch::Receiver<bool>,
}

/// Serves channels of `kinds` on an upgraded connection. `first` messages
/// go out before anything else (kubelet's empty "ready" message, the port
/// numbers of port-forward).
pub async fn open<S>(io: S, codec: Codec, kinds: &[Kind], first: Vec<(u8, Vec<u8>)>) -> Channels
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await;
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Bytes)>(16);

    let mut readers = Vec::with_capacity(kinds.len());
    let mut inputs: Vec<Option<DuplexStream>> = Vec::with_capacity(kinds.len());
    let mut writers = Vec::with_capacity(kinds.len());
    for (channel, kind) in kinds.iter().enumerate() {
        let channel = u8::try_from(channel).unwrap_or(u8::MAX);
        if kind.readable() {
            let (server_end, client_end) = tokio::io::duplex(CHANNEL_BUFFER);
            readers.push(Some(Box::new(server_end) as BoxRead));
            inputs.push(Some(client_end));
        } else {
            readers.push(None);
            inputs.push(None);
        }
        if kind.writable() {
            let (server_end, mut pump_end) = tokio::io::duplex(CHANNEL_BUFFER);
            writers.push(Some(Box::new(server_end) as BoxWrite));
            let out = out_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                while let Ok(n) = pump_end.read(&mut buf).await {
                    if n == 0
                        || out
                            .send((channel, Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            });
        } else {
            writers.push(None);
        }
    }
    drop(out_tx);

    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let payload: Bytes = match message {
                Message::Binary(data) => data,
                Message::Text(text) => Bytes::from(text),
                Message::Close(_) => break,
                _ => continue,
            };
            match codec.decode(&payload) {
                Some(Decoded::Data(channel, data)) => {
                    if let Some(Some(input)) = inputs.get_mut(usize::from(channel))
                        && input.write_all(&data).await.is_err()
                    {
                        inputs[usize::from(channel)] = None;
                    }
                }
                Some(Decoded::Close(channel)) => {
                    if let Some(input) = inputs.get_mut(usize::from(channel)) {
                        *input = None;
                    } else {
                        break;
                    }
                }
                Some(Decoded::ProtocolError) => break,
                None => {}
            }
        }
        // Readers see EOF when the client is gone.
        let _ = closed_tx.send(true);
    });

    let mut first: VecDeque<(u8, Vec<u8>)> = first.into();
    tokio::spawn(async move {
        while let Some((channel, data)) = first.pop_front() {
            if sink.send(codec.encode(channel, &data)).await.is_err() {
                reader.abort();
                return;
            }
        }
        while let Some((channel, data)) = out_rx.recv().await {
            if sink.send(codec.encode(channel, &data)).await.is_err() {
                break;
            }
        }
        // A normal close (1000): Go clients take a close without a status
        // as an error.
        let normal = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(normal))).await;
        let _ = sink.close().await;
        // The client answers the close; give it a moment, then stop reading.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while !reader.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        reader.abort();
    });

    Channels {
        readers,
        writers,
        closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_frames_carry_the_channel_as_a_digit() {
        let codec = Codec::for_protocol("v4.base64.channel.k8s.io");
        let Message::Text(text) = codec.encode(1, b"hi") else {
            panic!("base64 is text");
        };
        assert_eq!(text.as_str(), "1aGk=");
        match codec.decode(b"0aGk=") {
            Some(Decoded::Data(0, data)) => assert_eq!(data, b"hi"),
            _ => panic!("decode"),
        }
        assert!(codec.decode(b"0!!").is_none(), "bad base64 is skipped");
    }

    #[test]
    fn only_v5_has_the_close_signal() {
        let v5 = Codec::for_protocol("v5.channel.k8s.io");
        assert!(matches!(v5.decode(&[255, 0]), Some(Decoded::Close(0))));
        assert!(matches!(
            v5.decode(&[255, 0, 1]),
            Some(Decoded::ProtocolError)
        ));
        let v4 = Codec::for_protocol("v4.channel.k8s.io");
        assert!(matches!(v4.decode(&[255, 0]), Some(Decoded::Data(255, _))));
    }
}
