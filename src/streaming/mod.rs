//! The streaming server: the HTTP endpoint that `Exec`, `Attach` and
//! `PortForward` return URLs on, as kubelet's `pkg/cri/streaming`.
//!
//! A CRI call validates the request and stores it behind a single-use token
//! ([`tokens`]); the client (kubelet, crictl) then opens the URL and upgrades
//! the connection to SPDY/3.1 ([`spdy`]) or WebSocket ([`websocket`]). The
//! protocol layer turns streams or channels into a [`io::RemoteIo`]
//! ([`remotecommand`], [`portforward`]), and the [`Runtime`] runs the exec,
//! attach or port connection against it ([`runtime`] is the daemon's).

pub mod io;
pub mod portforward;
pub mod remotecommand;
pub mod runtime;
pub mod server;
pub mod spdy;
pub mod status;
pub mod tokens;
pub mod websocket;

use futures_util::future::BoxFuture;

pub use self::io::{RemoteIo, TerminalSize};
pub use self::server::{StreamingError, StreamingServer};
pub use self::status::Outcome;
pub use self::tokens::{Pending, Stdio, TokenError};

/// What the streaming server runs sessions against.
pub trait Runtime: Send + Sync + 'static {
    /// Runs `cmd` in the container with the client's streams; how it ended.
    fn exec(
        &self,
        container_id: String,
        cmd: Vec<String>,
        io: RemoteIo,
    ) -> BoxFuture<'static, Outcome>;

    /// Attaches the client's streams to the container's stdio until the
    /// container exits or the client leaves.
    fn attach(&self, container_id: String, io: RemoteIo) -> BoxFuture<'static, Outcome>;

    /// A TCP connection to `port` on localhost inside the pod's network
    /// namespace; the error is one line for the client's error stream.
    fn dial(
        &self,
        pod_id: String,
        port: u16,
    ) -> BoxFuture<'static, Result<tokio::net::TcpStream, String>>;
}
