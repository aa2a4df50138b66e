//! A fake OCI registry for tests: it serves exactly what a test put in it,
//! including what no real registry would serve (bytes that do not match
//! their digest, short bodies, refusals, silence), so that the pull's
//! defences can be driven from outside the daemon.
//!
//! The HTTP is the minimum a registry client needs: one request per
//! connection, read up to the end of its head, answered with a
//! `Content-Length` and `Connection: close`. Stops when dropped, also the
//! connections it is holding open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Request heads larger than this are not from a registry client.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// `sha256:<hex>` of `bytes`, as registries name content.
pub fn sha256(bytes: &[u8]) -> String {
    hex_digest(Sha256::new_with_prefix(bytes))
}

/// `sha256:<hex>` of what `hasher` was fed.
pub fn hex_digest(hasher: Sha256) -> String {
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// How a path misbehaves instead of serving its content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Fault {
    /// Serve the content as it is.
    #[default]
    None,
    /// Answer with this status and an OCI error body. 401 comes with
    /// `WWW-Authenticate: Basic realm="x"`, as a registry that wants a login.
    Status(u16),
    /// Declare a `Content-Length` of `declared` (more than the body), send
    /// the body, and close the connection: a stream cut short.
    Truncated { declared: usize },
    /// Read the request and never answer (the connection stays open).
    Hang,
    /// Serve the content, but only after this long.
    Delay(std::time::Duration),
}

#[derive(Debug, Clone, Default)]
struct Route {
    body: Arc<Vec<u8>>,
    content_type: Option<String>,
    docker_digest: Option<String>,
    fault: Fault,
}

type Routes = Arc<Mutex<HashMap<String, Route>>>;

pub struct FakeRegistry {
    /// `127.0.0.1:<port>`: the registry host of the images it serves.
    pub address: String,
    routes: Routes,
    task: JoinHandle<()>,
}

impl FakeRegistry {
    pub async fn start() -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake registry");
        let address = listener
            .local_addr()
            .expect("fake registry address")
            .to_string();
        let routes: Routes = Arc::default();
        let served = routes.clone();
        let task = tokio::spawn(async move {
            // Owned here so that aborting this task also ends connections
            // that hang on purpose.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                connections.spawn(serve(stream, served.clone()));
            }
        });
        FakeRegistry {
            address,
            routes,
            task,
        }
    }

    /// `<address>/<name>:<tag>`, the reference berth is asked to pull.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.address)
    }

    pub fn manifest_path(name: &str, reference: &str) -> String {
        format!("/v2/{name}/manifests/{reference}")
    }

    pub fn blob_path(name: &str, digest: &str) -> String {
        format!("/v2/{name}/blobs/{digest}")
    }

    /// Serves `bytes` as a blob of repository `name`; returns its digest.
    pub fn put_blob(&self, name: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        self.put_blob_as(name, &digest, bytes);
        digest
    }

    /// Serves `bytes` under `digest`, whether or not they hash to it.
    pub fn put_blob_as(&self, name: &str, digest: &str, bytes: &[u8]) {
        self.put(
            Self::blob_path(name, digest),
            Route {
                body: Arc::new(bytes.to_vec()),
                content_type: Some("application/octet-stream".to_string()),
                docker_digest: Some(digest.to_string()),
                fault: Fault::None,
            },
        );
    }

    /// Serves a manifest (or index) under `tag` and under its digest, with
    /// its media type and digest in the headers; returns the digest.
    pub fn put_manifest(&self, name: &str, tag: &str, media_type: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let route = Route {
            body: Arc::new(bytes.to_vec()),
            content_type: Some(media_type.to_string()),
            docker_digest: Some(digest.clone()),
            fault: Fault::None,
        };
        self.put(Self::manifest_path(name, &digest), route.clone());
        self.put(Self::manifest_path(name, tag), route);
        digest
    }

    /// Makes `path` misbehave (`/v2/` included), whether or not it has
    /// content.
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.routes
            .lock()
            .expect("routes")
            .entry(path.to_string())
            .or_default()
            .fault = fault;
    }

    fn put(&self, path: String, mut route: Route) {
        let mut routes = self.routes.lock().expect("routes");
        // A fault set earlier on the path survives new content.
        if let Some(old) = routes.get(&path) {
            route.fault = old.fault.clone();
        }
        routes.insert(path, route);
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, routes: Routes) {
    let Some((method, path)) = read_request(&mut stream).await else {
        return;
    };
    let route = routes.lock().expect("routes").get(&path).cloned();
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(&mut stream, 405, &[], &[], None, false).await;
        return;
    }
    let route = match route {
        Some(route) => route,
        None if path == "/v2/" || path == "/v2" => Route {
            body: Arc::new(b"{}".to_vec()),
            content_type: Some("application/json".to_string()),
            ..Route::default()
        },
        None => {
            let code = if path.contains("/manifests/") {
                "MANIFEST_UNKNOWN"
            } else if path.contains("/blobs/") {
                "BLOB_UNKNOWN"
            } else {
                "NAME_UNKNOWN"
            };
            let _ = error(&mut stream, 404, code, head_only).await;
            return;
        }
    };
    let mut headers = vec![(
        "Docker-Distribution-API-Version",
        "registry/2.0".to_string(),
    )];
    if let Some(content_type) = &route.content_type {
        headers.push(("Content-Type", content_type.clone()));
    }
    if let Some(digest) = &route.docker_digest {
        headers.push(("Docker-Content-Digest", digest.clone()));
    }
    let _ = match route.fault {
        Fault::None => respond(&mut stream, 200, &headers, &route.body, None, head_only).await,
        Fault::Delay(delay) => {
            tokio::time::sleep(delay).await;
            respond(&mut stream, 200, &headers, &route.body, None, head_only).await
        }
        Fault::Truncated { declared } => {
            respond(
                &mut stream,
                200,
                &headers,
                &route.body,
                Some(declared),
                head_only,
            )
            .await
        }
        Fault::Status(401) => {
            let body =
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            let headers = [
                ("WWW-Authenticate", r#"Basic realm="x""#.to_string()),
                ("Content-Type", "application/json".to_string()),
            ];
            respond(&mut stream, 401, &headers, body, None, head_only).await
        }
        Fault::Status(404) => {
            let code = if path.contains("/blobs/") {
                "BLOB_UNKNOWN"
            } else {
                "MANIFEST_UNKNOWN"
            };
            error(&mut stream, 404, code, head_only).await
        }
        Fault::Status(status) => error(&mut stream, status, "UNKNOWN", head_only).await,
        Fault::Hang => {
            std::future::pending::<()>().await;
            Ok(())
        }
    };
}

/// The method and path of the request on `stream`; `None` if it closed
/// or sent something that is not an HTTP request head.
async fn read_request(stream: &mut TcpStream) -> Option<(String, String)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return None;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut request_line = text.lines().next()?.split(' ');
    let method = request_line.next()?.to_string();
    let target = request_line.next()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    Some((method, path))
}

async fn error(
    stream: &mut TcpStream,
    status: u16,
    code: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let message = code.to_lowercase().replace('_', " ");
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#);
    let headers = [("Content-Type", "application/json".to_string())];
    respond(stream, status, &headers, body.as_bytes(), None, head_only).await
}

/// Writes a response whose `Content-Length` is `declared` (the body's own
/// length when `None`), then closes the connection.
async fn respond(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
    declared: Option<usize>,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        declared.unwrap_or(body.len())
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body).await?;
    }
    stream.flush().await?;
    stream.shutdown().await
}
