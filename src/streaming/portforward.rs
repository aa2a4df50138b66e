//! Port forwarding, as kubelet's `portforward` package: over SPDY the client
//! opens a data and an error stream per connection, paired by `requestID`
//! and naming the `port`; over WebSocket each requested port has a data
//! channel (2n) and an error channel (2n+1), each starting with the port
//! number (2 bytes, little-endian). Every connection is dialled inside the
//! pod's network namespace by the runtime.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::debug;

use super::Runtime;
use super::io::{BoxRead, BoxWrite};
use super::server::Upgrade;
use super::spdy;
use super::websocket::{self, Kind};

/// How long the other direction may go on once one has ended (containerd).
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(1);

pub async fn serve<S>(
    io: S,
    upgrade: &Upgrade,
    runtime: Arc<dyn Runtime>,
    pod_id: String,
    ports: Vec<u16>,
    creation_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match upgrade {
        Upgrade::Spdy(_) => serve_spdy(io, runtime, pod_id, creation_timeout).await,
        Upgrade::WebSocket(protocol) => serve_websocket(io, protocol, runtime, pod_id, ports).await,
    }
}

/// One forwarded connection: the client's data and error streams.
struct Forward {
    port: u16,
    data_in: BoxRead,
    data_out: BoxWrite,
    error: BoxWrite,
}

async fn forward(runtime: Arc<dyn Runtime>, pod_id: String, mut f: Forward) {
    let conn = match runtime.dial(pod_id.clone(), f.port).await {
        Ok(conn) => conn,
        Err(e) => {
            let message = format!(
                "error forwarding port {} to pod {pod_id}, uid : {e}",
                f.port
            );
            debug!("{message}");
            let _ = f.error.write_all(message.as_bytes()).await;
            let _ = f.error.shutdown().await;
            let _ = f.data_out.shutdown().await;
            return;
        }
    };
    let (mut conn_in, mut conn_out) = conn.into_split();
    let mut data_in = f.data_in;
    let mut data_out = f.data_out;
    let mut to_pod = tokio::spawn(async move {
        let copied = tokio::io::copy(&mut data_in, &mut conn_out).await;
        let _ = conn_out.shutdown().await;
        copied
    });
    let mut to_client = tokio::spawn(async move {
        let copied = tokio::io::copy(&mut conn_in, &mut data_out).await;
        let _ = data_out.shutdown().await;
        copied
    });
    tokio::select! {
        _ = &mut to_pod => {
            if tokio::time::timeout(HALF_CLOSE_GRACE, &mut to_client).await.is_err() {
                to_client.abort();
            }
        }
        _ = &mut to_client => {
            if tokio::time::timeout(HALF_CLOSE_GRACE, &mut to_pod).await.is_err() {
                to_pod.abort();
            }
        }
    }
    let _ = f.error.shutdown().await;
}

#[derive(Default)]
struct Pair {
    data: Option<spdy::Stream>,
    error: Option<spdy::Stream>,
}

async fn serve_spdy<S>(io: S, runtime: Arc<dyn Runtime>, pod_id: String, creation_timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (session, mut incoming) = spdy::serve(io, spdy::Limits::default());
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let (expired_tx, mut expired_rx) = mpsc::unbounded_channel::<String>();
    loop {
        let stream = tokio::select! {
            stream = incoming.accept() => match stream {
                Some(stream) => stream,
                None => break,
            },
            Some(request_id) = expired_rx.recv() => {
                if let Some(pair) = pairs.remove(&request_id)
                    && let Some(error) = pair.error
                {
                    let (_, mut writer) = error.split();
                    let message = format!("timed out waiting for streams of request {request_id}");
                    let _ = writer.write_all(message.as_bytes()).await;
                    let _ = writer.shutdown().await;
                }
                continue;
            }
        };
        let headers = stream.headers();
        let port = headers
            .get("port")
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p > 0);
        let kind = headers.get("streamtype").unwrap_or("").to_string();
        let Some(port) = port else {
            debug!("port-forward stream without a valid port header: reset");
            stream.split().1.reset();
            continue;
        };
        let request_id = match headers.get("requestid") {
            Some(id) if !id.is_empty() => id.to_string(),
            // Clients before requestID: the error stream comes first, the
            // data stream two stream ids later.
            _ => match kind.as_str() {
                "error" => stream.id().to_string(),
                _ => stream.id().saturating_sub(2).to_string(),
            },
        };
        let pair = pairs.entry(request_id.clone()).or_insert_with(|| {
            let expired = expired_tx.clone();
            let id = request_id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(creation_timeout).await;
                let _ = expired.send(id);
            });
            Pair::default()
        });
        let slot = match kind.as_str() {
            "data" => &mut pair.data,
            "error" => &mut pair.error,
            other => {
                debug!(
                    stream_type = other,
                    "invalid port-forward stream type: reset"
                );
                stream.split().1.reset();
                continue;
            }
        };
        if slot.is_some() {
            debug!(request_id, kind, "duplicate port-forward stream: reset");
            stream.split().1.reset();
            continue;
        }
        *slot = Some(stream);
        if pair.data.is_some() && pair.error.is_some() {
            let Some(Pair {
                data: Some(data),
                error: Some(error),
            }) = pairs.remove(&request_id)
            else {
                continue;
            };
            let (data_in, data_out) = data.split();
            let (_, error) = error.split();
            tokio::spawn(forward(
                runtime.clone(),
                pod_id.clone(),
                Forward {
                    port,
                    data_in: Box::new(data_in),
                    data_out: Box::new(data_out),
                    error: Box::new(error),
                },
            ));
        }
    }
    session.close().await;
}

async fn serve_websocket<S>(
    io: S,
    protocol: &str,
    runtime: Arc<dyn Runtime>,
    pod_id: String,
    ports: Vec<u16>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let kinds: Vec<Kind> = ports
        .iter()
        .flat_map(|_| [Kind::ReadWrite, Kind::Write])
        .collect();
    let first = ports
        .iter()
        .enumerate()
        .flat_map(|(i, port)| {
            let channel = u8::try_from(i * 2).unwrap_or(u8::MAX - 1);
            let bytes = port.to_le_bytes().to_vec();
            [(channel, bytes.clone()), (channel + 1, bytes)]
        })
        .collect();
    let mut channels =
        websocket::open(io, websocket::Codec::for_protocol(protocol), &kinds, first).await;
    let mut forwards = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let data_in = channels.readers.get_mut(2 * i).and_then(Option::take);
        let data_out = channels.writers.get_mut(2 * i).and_then(Option::take);
        let error = channels.writers.get_mut(2 * i + 1).and_then(Option::take);
        if let (Some(data_in), Some(data_out), Some(error)) = (data_in, data_out, error) {
            forwards.push(tokio::spawn(forward(
                runtime.clone(),
                pod_id.clone(),
                Forward {
                    port: *port,
                    data_in,
                    data_out,
                    error,
                },
            )));
        }
    }
    for f in forwards {
        let _ = f.await;
    }
}
