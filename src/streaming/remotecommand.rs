//! Exec and attach sessions: the client's streams gathered from SPDY
//! (kubelet's `createHTTPStreamStreams`: one stream per `streamType`, all
//! expected ones within the creation timeout) or WebSocket channels
//! (`createWebSocketStreams`: stdin 0, stdout 1, stderr 2, error 3,
//! resize 4), the runtime run on them, and the outcome on the error stream.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::io::{BoxRead, BoxWrite, RemoteIo, StatusWriter, resize_events};
use super::server::Upgrade;
use super::spdy;
use super::status::Outcome;
use super::tokens::Stdio;
use super::websocket::{self, Kind};

/// Opens the client's streams, runs `run` on them and reports its outcome.
pub async fn serve<S, F>(io: S, upgrade: &Upgrade, stdio: Stdio, creation_timeout: Duration, run: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnOnce(RemoteIo) -> BoxFuture<'static, Outcome>,
{
    match upgrade {
        Upgrade::WebSocket(protocol) => {
            let (remote, mut status, mut closed) = websocket_streams(io, protocol, stdio).await;
            tokio::select! {
                outcome = run(remote) => status.write(&outcome).await,
                // Dropping the run ends the exec (or the attach) with it.
                _ = async { let _ = closed.wait_for(|gone| *gone).await; } => {
                    debug!("the client left mid-stream");
                }
            }
            // Every channel writer is gone now, which closes the socket.
        }
        Upgrade::Spdy(protocol) => {
            let (session, mut incoming) = spdy::serve(io, spdy::Limits::default());
            let gathered = tokio::time::timeout(
                creation_timeout,
                spdy_streams(&mut incoming, protocol, stdio),
            )
            .await;
            let Ok((remote, mut status, _unused_writers)) = gathered else {
                debug!("timed out waiting for the client to create streams");
                session.close().await;
                return;
            };
            tokio::select! {
                outcome = run(remote) => status.write(&outcome).await,
                _ = session.closed() => debug!("the client left mid-stream"),
            }
            session.close().await;
        }
    }
}

fn json_status(protocol: &str) -> bool {
    protocol.starts_with("v4.") || protocol.starts_with("v5.")
}

async fn websocket_streams<S>(
    io: S,
    protocol: &str,
    stdio: Stdio,
) -> (RemoteIo, StatusWriter, tokio::sync::watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let kind = |wanted: bool, kind: Kind| if wanted { kind } else { Kind::Ignore };
    let kinds = [
        kind(stdio.stdin, Kind::Read),
        kind(stdio.stdout, Kind::Write),
        kind(stdio.stderr, Kind::Write),
        Kind::Write,
        kind(stdio.tty, Kind::Read),
    ];
    // kubelet's "ready" message: empty, on the first channel it writes.
    let ready = if stdio.stdout {
        1
    } else if stdio.stderr {
        2
    } else {
        3
    };
    let mut channels = websocket::open(
        io,
        websocket::Codec::for_protocol(protocol),
        &kinds,
        vec![(ready, Vec::new())],
    )
    .await;
    let mut take_reader = |i: usize| channels.readers.get_mut(i).and_then(Option::take);
    let stdin = take_reader(0);
    let resize = take_reader(4).map(resize_events);
    let mut take_writer = |i: usize| channels.writers.get_mut(i).and_then(Option::take);
    let remote = RemoteIo {
        stdin,
        stdout: take_writer(1),
        stderr: take_writer(2),
        resize,
        tty: stdio.tty,
    };
    let status = StatusWriter {
        writer: take_writer(3),
        json: json_status(protocol),
    };
    (remote, status, channels.closed)
}

/// Waits for the streams the client must open: error, one per requested
/// stdio stream, and resize with a tty (v3 and later).
async fn spdy_streams(
    incoming: &mut spdy::Incoming,
    protocol: &str,
    stdio: Stdio,
) -> (RemoteIo, StatusWriter, Vec<BoxWrite>) {
    let resizable = !matches!(protocol, "v2.channel.k8s.io" | "channel.k8s.io");
    let expected = 1
        + usize::from(stdio.stdin)
        + usize::from(stdio.stdout)
        + usize::from(stdio.stderr)
        + usize::from(stdio.tty && resizable);
    let mut remote = RemoteIo {
        stdin: None,
        stdout: None,
        stderr: None,
        resize: None,
        tty: stdio.tty,
    };
    let mut status = StatusWriter {
        writer: None,
        json: json_status(protocol),
    };
    // The server's halves of the streams only the client writes (stdin,
    // resize) stay open until the session ends, as kubelet's do: a FIN on
    // them would tell spdystream the stream is done.
    let mut unused_writers = Vec::new();
    let mut received = 0;
    while received < expected {
        let Some(stream) = incoming.accept().await else {
            break;
        };
        let kind = stream.headers().get("streamtype").unwrap_or("").to_string();
        let (reader, writer) = stream.split();
        let reader: BoxRead = Box::new(reader);
        let writer: BoxWrite = Box::new(writer);
        match kind.as_str() {
            "error" => status.writer = Some(writer),
            "stdin" => {
                remote.stdin = Some(reader);
                unused_writers.push(writer);
            }
            "stdout" => remote.stdout = Some(writer),
            "stderr" => remote.stderr = Some(writer),
            "resize" => {
                remote.resize = Some(resize_events(reader));
                unused_writers.push(writer);
            }
            other => {
                debug!(stream_type = other, "unexpected stream type: ignored");
                continue;
            }
        }
        received += 1;
    }
    // The first protocol closed stdin at once (kubernetes#13394); kept for
    // the clients that still speak it.
    if protocol == "channel.k8s.io" {
        remote.stdin = None;
    }
    (remote, status, unused_writers)
}
