//! berth's own SPDY/3.1, the multiplexing under kubelet-style Exec, Attach
//! and PortForward streaming (`k8s.io/kubelet/pkg/cri/streaming`): the frame
//! codec and the server side of a session.
//!
//! The peer is always github.com/moby/spdystream (kubectl, the API server's
//! stream translator, kubelet's proxy), so its behaviour is the contract, not
//! the SPDY draft where they differ: no flow control in either direction, an
//! empty SYN_REPLY for every accepted stream, half-close as an empty DATA
//! frame with FIN, abort as RST_STREAM CANCEL. `session` explains what that
//! means for backpressure.
//!
//! ```no_run
//! # async fn demo(io: tokio::net::TcpStream) {
//! use berth::streaming::spdy::{serve, Limits};
//! let (session, mut incoming) = serve(io, Limits::default());
//! while let Some(stream) = incoming.accept().await {
//!     let kind = stream.headers().get("streamtype").unwrap_or("").to_owned();
//!     let (mut rd, mut wr) = stream.split();
//!     tokio::spawn(async move {
//!         let _ = tokio::io::copy(&mut rd, &mut wr).await;
//!         let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
//!     });
//! #   let _ = kind;
//! }
//! session.close().await;
//! # }
//! ```

mod dictionary;
pub mod frame;
pub mod session;

pub use frame::{
    Codec, Frame, FrameDecoder, FrameEncoder, FrameError, FrameLimits, GoAwayStatus, Headers,
    RstStatus, Setting,
};
pub use session::{
    Incoming, Limits, Session, SessionError, Stream, StreamReader, StreamWriter, serve,
};
