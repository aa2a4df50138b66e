//! The HTTP side: listen (plain or TLS), route `/exec|attach|portforward/
//! <token>`, negotiate the protocol and upgrade, then hand the connection to
//! the protocol layer with the idle timeout and the concurrency limit on it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::io::{Activity, Watched};
use super::tokens::{Pending, TokenError, Tokens};
use super::{Runtime, portforward, remotecommand, websocket};
use crate::config::StreamingConfig;

/// exec and attach over SPDY, preferred first (kubelet's list).
pub const SPDY_REMOTE_COMMAND_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
pub const SPDY_PORT_FORWARD_PROTOCOLS: &[&str] = &["portforward.k8s.io"];

const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
const ACCEPTED_PROTOCOLS_HEADER: &str = "x-accepted-stream-protocol-versions";

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    #[error("streaming server: listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("streaming server: read {path}: {source}")]
    ReadTls {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("streaming server: {path}: {message}")]
    Tls { path: PathBuf, message: String },
    #[error("streaming server: already serving")]
    AlreadyServing,
}

pub struct StreamingServer {
    listener: Mutex<Option<std::net::TcpListener>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    address: SocketAddr,
    base_url: String,
    tokens: Arc<Tokens>,
    config: StreamingConfig,
}

impl StreamingServer {
    /// Binds the listener (port 0 picks one) and loads the TLS key pair;
    /// nothing is served before [`Self::serve`].
    pub fn bind(config: &StreamingConfig) -> Result<Self, StreamingError> {
        let listen_err = |source| StreamingError::Listen {
            address: config.address.clone(),
            source,
        };
        let listener = std::net::TcpListener::bind(&config.address).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let address = listener.local_addr().map_err(listen_err)?;
        let tls = if config.tls_cert.as_os_str().is_empty() {
            None
        } else {
            Some(tls_acceptor(&config.tls_cert, &config.tls_key)?)
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(StreamingServer {
            listener: Mutex::new(Some(listener)),
            tls,
            address,
            base_url: format!("{scheme}://{address}"),
            tokens: Arc::new(Tokens::new()),
            config: config.clone(),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The URL a client opens for `request`, valid once for a minute.
    pub fn url_for(&self, request: Pending) -> Result<String, TokenError> {
        let endpoint = Endpoint::of(&request).path();
        let token = self.tokens.insert(request)?;
        Ok(format!("{}/{endpoint}/{token}", self.base_url))
    }

    /// Starts serving on the runtime of the caller.
    pub fn serve(&self, runtime: Arc<dyn Runtime>) -> Result<(), StreamingError> {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(StreamingError::AlreadyServing)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| {
            StreamingError::Listen {
                address: self.address.to_string(),
                source,
            }
        })?;
        let shared = Arc::new(Shared {
            tokens: self.tokens.clone(),
            runtime,
            sessions: Arc::new(Semaphore::new(self.config.max_concurrent_streams)),
            idle_timeout: Duration::from_secs(self.config.idle_timeout_secs),
            creation_timeout: Duration::from_secs(self.config.stream_creation_timeout_secs),
        });
        let tls = self.tls.clone();
        info!(url = %self.base_url, "streaming server listening");
        tokio::spawn(accept_loop(listener, tls, shared));
        Ok(())
    }
}

struct Shared {
    tokens: Arc<Tokens>,
    runtime: Arc<dyn Runtime>,
    sessions: Arc<Semaphore>,
    idle_timeout: Duration,
    creation_timeout: Duration,
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends pass; don't spin on them.
                warn!("streaming server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(tcp, shared).await,
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, shared).await,
                        Ok(Err(e)) => debug!(%peer, "streaming server: TLS handshake: {e}"),
                        Err(_) => debug!(%peer, "streaming server: TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<S>(stream: S, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| handle(shared.clone(), request));
    let connection = hyper::server::conn::http1::Builder::new()
        .max_buf_size(64 * 1024)
        .header_read_timeout(Duration::from_secs(30))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        debug!("streaming server: connection: {e}");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Exec,
    Attach,
    PortForward,
}

impl Endpoint {
    fn of(request: &Pending) -> Endpoint {
        match request {
            Pending::Exec { .. } => Endpoint::Exec,
            Pending::Attach { .. } => Endpoint::Attach,
            Pending::PortForward { .. } => Endpoint::PortForward,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Endpoint::Exec => "exec",
            Endpoint::Attach => "attach",
            Endpoint::PortForward => "portforward",
        }
    }

    fn parse(path: &str) -> Option<(Endpoint, &str)> {
        let (endpoint, token) = path.strip_prefix('/')?.split_once('/')?;
        let endpoint = match endpoint {
            "exec" => Endpoint::Exec,
            "attach" => Endpoint::Attach,
            "portforward" => Endpoint::PortForward,
            _ => return None,
        };
        (!token.is_empty() && !token.contains('/')).then_some((endpoint, token))
    }
}

/// The protocol a client was upgraded to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    Spdy(String),
    WebSocket(String),
}

type Body = Full<Bytes>;

fn plain(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut text = text.into();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn handle(
    shared: Arc<Shared>,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let Some((endpoint, token)) = Endpoint::parse(request.uri().path()) else {
        return Ok(plain(StatusCode::NOT_FOUND, "404 page not found"));
    };
    if request.method() != Method::GET && request.method() != Method::POST {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "405: Method Not Allowed",
        ));
    }
    let pending = match shared.tokens.consume(token) {
        Some(pending) if Endpoint::of(&pending) == endpoint => pending,
        _ => return Ok(plain(StatusCode::NOT_FOUND, "404 page not found")),
    };
    let Ok(permit) = shared.sessions.clone().try_acquire_owned() else {
        return Ok(plain(
            StatusCode::TOO_MANY_REQUESTS,
            "too many streaming sessions",
        ));
    };
    let negotiated = if is_websocket(request.headers()) {
        websocket_handshake(request.headers(), endpoint)
    } else {
        spdy_handshake(request.headers(), endpoint)
    };
    let (response, upgrade) = match negotiated {
        Ok(done) => done,
        Err(refusal) => return Ok(*refusal),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => session(shared, TokioIo::new(upgraded), upgrade, pending, permit).await,
            Err(e) => debug!("streaming server: upgrade: {e}"),
        }
    });
    Ok(response)
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("upgrade"))
}

fn is_websocket(headers: &HeaderMap) -> bool {
    header_str(headers, header::UPGRADE).eq_ignore_ascii_case("websocket") && is_upgrade(headers)
}

/// The protocols a client offers in every `name` header, comma-separated,
/// in its order of preference.
fn offered_protocols(headers: &HeaderMap, name: impl header::AsHeaderName) -> Vec<&str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// The first protocol the client offers (in its order) that the server
/// supports, as kubelet's `negotiateProtocol` and the Go websocket server.
fn first_supported<'a>(offered: &[&str], supported: &[&'a str]) -> Option<&'a str> {
    offered
        .iter()
        .find_map(|o| supported.iter().find(|s| *s == o).copied())
}

/// kubelet's `httpstream.Handshake` and the SPDY response upgrader.
fn spdy_handshake(
    headers: &HeaderMap,
    endpoint: Endpoint,
) -> Result<(Response<Body>, Upgrade), Box<Response<Body>>> {
    let supported = match endpoint {
        Endpoint::PortForward => SPDY_PORT_FORWARD_PROTOCOLS,
        Endpoint::Exec | Endpoint::Attach => SPDY_REMOTE_COMMAND_PROTOCOLS,
    };
    let offered = offered_protocols(headers, PROTOCOL_HEADER);
    if offered.is_empty() {
        return Err(Box::new(plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: header X-Stream-Protocol-Version does not exist in request or has no valid protocols",
        )));
    }
    let Some(protocol) = first_supported(&offered, supported) else {
        let mut refusal = plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {supported:?}"
            ),
        );
        for p in supported {
            refusal
                .headers_mut()
                .append(ACCEPTED_PROTOCOLS_HEADER, HeaderValue::from_static(p));
        }
        return Err(Box::new(refusal));
    };
    if !is_upgrade(headers)
        || !header_str(headers, header::UPGRADE)
            .to_ascii_lowercase()
            .contains("spdy/3.1")
    {
        return Err(Box::new(plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request",
        )));
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(PROTOCOL_HEADER, HeaderValue::from_static(protocol));
    Ok((response, Upgrade::Spdy(protocol.to_string())))
}

/// RFC 6455's server handshake with kubelet's subprotocol choice.
fn websocket_handshake(
    headers: &HeaderMap,
    endpoint: Endpoint,
) -> Result<(Response<Body>, Upgrade), Box<Response<Body>>> {
    let supported = match endpoint {
        Endpoint::PortForward => websocket::PORT_FORWARD_PROTOCOLS,
        Endpoint::Exec | Endpoint::Attach => websocket::REMOTE_COMMAND_PROTOCOLS,
    };
    let key = header_str(headers, header::SEC_WEBSOCKET_KEY);
    if key.is_empty() || header_str(headers, header::SEC_WEBSOCKET_VERSION) != "13" {
        return Err(Box::new(plain(
            StatusCode::BAD_REQUEST,
            "websocket: missing Sec-WebSocket-Key or unsupported Sec-WebSocket-Version",
        )));
    }
    let offered = offered_protocols(headers, header::SEC_WEBSOCKET_PROTOCOL);
    // A client that offers none gets the binary protocol without a name
    // (pre-v4 status), as the Go websocket handshake does.
    let protocol = if offered.is_empty() {
        Some("")
    } else {
        first_supported(&offered, supported)
    };
    let Some(protocol) = protocol else {
        return Err(Box::new(plain(
            StatusCode::BAD_REQUEST,
            format!(
                "websocket: requested protocol(s) are not supported: {offered:?}; supports {supported:?}"
            ),
        )));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if !protocol.is_empty() {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
    }
    Ok((response, Upgrade::WebSocket(protocol.to_string())))
}

/// One upgraded connection, from the first stream to the last byte.
async fn session<S>(
    shared: Arc<Shared>,
    io: S,
    upgrade: Upgrade,
    pending: Pending,
    _permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let io = Watched::new(io, activity.clone());
    let runtime = shared.runtime.clone();
    let creation_timeout = shared.creation_timeout;
    let work = async move {
        match pending {
            Pending::Exec {
                container_id,
                cmd,
                stdio,
            } => {
                remotecommand::serve(io, &upgrade, stdio, creation_timeout, move |remote| {
                    runtime.exec(container_id, cmd, remote)
                })
                .await
            }
            Pending::Attach {
                container_id,
                stdio,
            } => {
                remotecommand::serve(io, &upgrade, stdio, creation_timeout, move |remote| {
                    runtime.attach(container_id, remote)
                })
                .await
            }
            Pending::PortForward { pod_id, ports } => {
                portforward::serve(io, &upgrade, runtime, pod_id, ports, creation_timeout).await
            }
        }
    };
    tokio::select! {
        () = work => {}
        () = activity.idle(shared.idle_timeout) => {
            debug!(timeout = ?shared.idle_timeout, "streaming session idle: closed");
        }
    }
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, StreamingError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| StreamingError::ReadTls {
            path: path.to_path_buf(),
            source,
        })
    };
    let tls_err = |path: &Path, message: String| StreamingError::Tls {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(cert, format!("parse certificates: {e}")))?;
    if certs.is_empty() {
        return Err(tls_err(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| tls_err(key, format!("parse private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| tls_err(cert, e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streaming::{Outcome, RemoteIo, Stdio};
    use futures_util::future::BoxFuture;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Exec never ends; attach and dial are not used here.
    struct Stuck;

    impl Runtime for Stuck {
        fn exec(&self, _: String, _: Vec<String>, _: RemoteIo) -> BoxFuture<'static, Outcome> {
            Box::pin(std::future::pending())
        }
        fn attach(&self, _: String, _: RemoteIo) -> BoxFuture<'static, Outcome> {
            Box::pin(std::future::pending())
        }
        fn dial(
            &self,
            _: String,
            _: u16,
        ) -> BoxFuture<'static, Result<tokio::net::TcpStream, String>> {
            Box::pin(async { Err("no pods here".to_string()) })
        }
    }

    fn exec_request() -> Pending {
        Pending::Exec {
            container_id: "c".into(),
            cmd: vec!["true".into()],
            stdio: Stdio {
                stdout: true,
                ..Stdio::default()
            },
        }
    }

    /// Sends a WebSocket upgrade for `url` on a plain connection; the
    /// status line of the answer and the connection (open on success).
    async fn upgrade(url: &str) -> (String, tokio::net::TcpStream) {
        let rest = url.strip_prefix("http://").expect("http url");
        let (host, path) = rest.split_once('/').expect("path");
        let mut tcp = tokio::net::TcpStream::connect(host).await.expect("connect");
        let request = format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.expect("send");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n") {
            if tcp.read(&mut byte).await.expect("read") == 0 {
                break;
            }
            head.push(byte[0]);
        }
        (String::from_utf8_lossy(&head).trim().to_string(), tcp)
    }

    #[tokio::test]
    async fn sessions_beyond_the_limit_are_refused_with_429_until_one_ends() {
        let config = StreamingConfig {
            max_concurrent_streams: 1,
            ..StreamingConfig::default()
        };
        let server = StreamingServer::bind(&config).expect("bind");
        server.serve(Arc::new(Stuck)).expect("serve");
        let (first, held) = upgrade(&server.url_for(exec_request()).expect("url")).await;
        assert!(first.starts_with("HTTP/1.1 101"), "{first}");
        // The upgraded session holds the only slot until its client leaves.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (second, _) = upgrade(&server.url_for(exec_request()).expect("url")).await;
        assert!(second.starts_with("HTTP/1.1 429"), "{second}");
        drop(held);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (again, _conn) = upgrade(&server.url_for(exec_request()).expect("url")).await;
            if again.starts_with("HTTP/1.1 101") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the slot never came back: {again}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_websocket_message_beyond_the_bound_closes_the_connection() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
        let server = StreamingServer::bind(&StreamingConfig::default()).expect("bind");
        server.serve(Arc::new(Stuck)).expect("serve");
        let url = server.url_for(exec_request()).expect("url");
        let mut request = url
            .replacen("http://", "ws://", 1)
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("v5.channel.k8s.io"),
        );
        let tcp = tokio::net::TcpStream::connect(server.address())
            .await
            .expect("connect");
        let (mut ws, _) = tokio_tungstenite::client_async(request, tcp)
            .await
            .expect("upgrade");
        let mut huge = vec![0u8; websocket::MAX_MESSAGE + 1024];
        huge[0] = 0; // stdin
        let _ = ws.send(Message::binary(huge)).await;
        // The server drops the connection: the stream ends (or errors)
        // instead of waiting for the stuck exec.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        assert!(ended.is_ok(), "the connection stayed open");
    }

    #[tokio::test]
    async fn tls_config_serves_https_urls_over_tls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (ca, cert, key) = (d.join("ca.pem"), d.join("cert.pem"), d.join("key.pem"));
        std::fs::write(
            d.join("ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("extensions file");
        // A throwaway CA, and a server certificate for 127.0.0.1 it signs.
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=berth-test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "ext",
                "-out",
                "cert.pem",
            ],
        ];
        for args in steps {
            let made = std::process::Command::new("openssl")
                .args(args)
                .current_dir(d)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            if !made.is_ok_and(|s| s.success()) {
                eprintln!(
                    "skipping: openssl could not make a key pair (hack/install-deps.sh installs it)"
                );
                return;
            }
        }
        let config = StreamingConfig {
            tls_cert: cert.clone(),
            tls_key: key,
            ..StreamingConfig::default()
        };
        let server = StreamingServer::bind(&config).expect("bind with TLS");
        server.serve(Arc::new(Stuck)).expect("serve");
        let url = server.url_for(exec_request()).expect("url");
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");

        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(&ca).expect("read CA") {
            roots.add(c.expect("cert")).expect("trust the test cert");
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(server.address())
            .await
            .expect("connect");
        let name =
            rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .expect("TLS handshake against the configured certificate");
        tls.write_all(b"GET /exec/AAAAAAAA HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut answer = String::new();
        let _ = tls.read_to_string(&mut answer).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn routes_take_one_token_segment() {
        assert_eq!(Endpoint::parse("/exec/abc"), Some((Endpoint::Exec, "abc")));
        assert_eq!(
            Endpoint::parse("/portforward/x_-1"),
            Some((Endpoint::PortForward, "x_-1"))
        );
        assert_eq!(Endpoint::parse("/exec/"), None);
        assert_eq!(Endpoint::parse("/exec/a/b"), None);
        assert_eq!(Endpoint::parse("/logs/a"), None);
        assert_eq!(Endpoint::parse("exec/a"), None);
    }

    #[test]
    fn negotiation_follows_the_clients_order() {
        assert_eq!(
            first_supported(
                &["v4.channel.k8s.io", "v5.channel.k8s.io"],
                websocket::REMOTE_COMMAND_PROTOCOLS
            ),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(
            first_supported(&["foo"], websocket::REMOTE_COMMAND_PROTOCOLS),
            None
        );
        assert_eq!(
            first_supported(&["v5.channel.k8s.io"], websocket::PORT_FORWARD_PROTOCOLS),
            None
        );
        let split = headers(&[
            ("x-stream-protocol-version", "a, b"),
            ("x-stream-protocol-version", " c ,,"),
        ]);
        assert_eq!(offered_protocols(&split, PROTOCOL_HEADER), ["a", "b", "c"]);
    }

    #[test]
    fn spdy_negotiation_follows_kubelet() {
        let ok = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "v5.channel.k8s.io"),
            (
                "x-stream-protocol-version",
                "v4.channel.k8s.io, v3.channel.k8s.io",
            ),
        ]);
        let (response, upgrade) = spdy_handshake(&ok, Endpoint::Exec).expect("upgrade");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(upgrade, Upgrade::Spdy("v4.channel.k8s.io".into()));
        assert_eq!(
            response.headers()[PROTOCOL_HEADER],
            HeaderValue::from_static("v4.channel.k8s.io")
        );

        let none = headers(&[("connection", "Upgrade"), ("upgrade", "SPDY/3.1")]);
        let refused = spdy_handshake(&none, Endpoint::Exec).expect_err("no protocol");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);

        let wrong = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
        ]);
        let refused = spdy_handshake(&wrong, Endpoint::PortForward).expect_err("mismatch");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            refused.headers()[ACCEPTED_PROTOCOLS_HEADER],
            HeaderValue::from_static("portforward.k8s.io")
        );

        let not_upgrade = headers(&[("x-stream-protocol-version", "portforward.k8s.io")]);
        let refused =
            spdy_handshake(&not_upgrade, Endpoint::PortForward).expect_err("no upgrade headers");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn websocket_handshake_answers_rfc6455_and_picks_a_subprotocol() {
        let request = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            (
                "sec-websocket-protocol",
                "v5.channel.k8s.io, v4.channel.k8s.io",
            ),
        ]);
        assert!(is_websocket(&request));
        let (response, upgrade) = websocket_handshake(&request, Endpoint::Exec).expect("upgrade");
        assert_eq!(
            response.headers()[header::SEC_WEBSOCKET_ACCEPT],
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert_eq!(upgrade, Upgrade::WebSocket("v5.channel.k8s.io".into()));
        let (_, upgrade) =
            websocket_handshake(&request, Endpoint::PortForward).expect("v4 port-forward");
        assert_eq!(upgrade, Upgrade::WebSocket("v4.channel.k8s.io".into()));
        let mut v5_only = request.clone();
        v5_only.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v5.channel.k8s.io"),
        );
        let refused = websocket_handshake(&v5_only, Endpoint::PortForward)
            .expect_err("v5 is not port-forward");
        let mut unnamed = request.clone();
        unnamed.remove(header::SEC_WEBSOCKET_PROTOCOL);
        let (_, upgrade) = websocket_handshake(&unnamed, Endpoint::Exec).expect("no protocol");
        assert_eq!(upgrade, Upgrade::WebSocket(String::new()));
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }
}
