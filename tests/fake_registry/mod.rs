//! A fake OCI registry for tests: it serves exactly what a test put in it,
//! including what no real registry would serve (bytes that do not match
//! their digest, short bodies, refusals, silence), so that the pull's
//! defences can be driven from outside the daemon.
//!
//! It can also stand behind a token service ([`FakeRegistry::require_token`]):
//! every `/v2/` request then needs a bearer token, which only the OAuth2
//! refresh-token grant of the distribution spec hands out.
//!
//! The HTTP is the minimum a registry client needs: one request per
//! connection, its head and a `Content-Length` body read, answered with a
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
/// Only token requests have a body, a short form.
const MAX_REQUEST_BODY: usize = 64 * 1024;
/// The `service` of the token challenge, which token requests must name.
pub const TOKEN_SERVICE: &str = "fake-registry";

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

/// The token service in front of the registry: it trades `identity_token`
/// for `access_token`, which every `/v2/` request must then carry.
#[derive(Debug, Clone)]
struct TokenService {
    identity_token: String,
    access_token: String,
}

/// A request to the token endpoint `/token`, as received.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub method: String,
    /// The query's pairs, decoded, in order.
    pub query: Vec<(String, String)>,
    /// The form body's pairs, decoded, in order.
    pub form: Vec<(String, String)>,
    pub authorization: Option<String>,
}

impl TokenRequest {
    /// The value of form field `name`, if sent.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    token_service: Option<TokenService>,
    token_requests: Vec<TokenRequest>,
}

type Shared = Arc<Mutex<State>>;

pub struct FakeRegistry {
    /// `127.0.0.1:<port>`: the registry host of the images it serves.
    pub address: String,
    shared: Shared,
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
        let shared: Shared = Arc::default();
        let served = shared.clone();
        let realm = format!("http://{address}/token");
        let task = tokio::spawn(async move {
            // Owned here so that aborting this task also ends connections
            // that hang on purpose.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                connections.spawn(serve(stream, served.clone(), realm.clone()));
            }
        });
        FakeRegistry {
            address,
            shared,
            task,
        }
    }

    /// From now on every `/v2/` request needs `Authorization: Bearer
    /// <access_token>`, and is otherwise answered 401 with a Bearer
    /// challenge naming `http://<address>/token`. That endpoint answers only
    /// a POST of the OAuth2 refresh-token grant with `identity_token`, the
    /// service [`TOKEN_SERVICE`], a client id and a pull scope; a GET is
    /// refused 401, as a token service without the password flow.
    pub fn require_token(&self, identity_token: &str, access_token: &str) {
        self.shared.lock().expect("state").token_service = Some(TokenService {
            identity_token: identity_token.to_string(),
            access_token: access_token.to_string(),
        });
    }

    /// Every request the token endpoint received, in order.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.shared.lock().expect("state").token_requests.clone()
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
        self.shared
            .lock()
            .expect("state")
            .routes
            .entry(path.to_string())
            .or_default()
            .fault = fault;
    }

    fn put(&self, path: String, mut route: Route) {
        let routes = &mut self.shared.lock().expect("state").routes;
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

async fn serve(mut stream: TcpStream, shared: Shared, realm: String) {
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    if request.path == "/token" {
        let _ = token_endpoint(&mut stream, &shared, request).await;
        return;
    }
    let (method, path) = (request.method.as_str(), request.path.clone());
    let (route, token_service) = {
        let state = shared.lock().expect("state");
        (
            state.routes.get(&path).cloned(),
            state.token_service.clone(),
        )
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(&mut stream, 405, &[], &[], None, false).await;
        return;
    }
    if let Some(service) = token_service
        && request.header("authorization") != Some(&format!("Bearer {}", service.access_token))
    {
        let _ = bearer_challenge(&mut stream, &realm, &path, head_only).await;
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

/// One request as the registry reads it.
struct Request {
    method: String,
    path: String,
    query: String,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&String> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// The request on `stream`; `None` if it closed or sent something that is
/// not an HTTP request.
async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if data.len() > MAX_REQUEST_HEAD {
            return None;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let text = String::from_utf8_lossy(&data[..head_end]).to_string();
    let mut lines = text.lines();
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let target = request_line.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(Some(0), |(_, v)| v.parse().ok())?;
    if length > MAX_REQUEST_BODY {
        return None;
    }
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    }
    Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body: data[head_end..head_end + length].to_vec(),
    })
}

/// `a=1&b=2`, form- or query-encoded, as decoded pairs.
fn decode_pairs(encoded: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{encoded}"))
        .map(|url| url.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

/// 401 with the Bearer challenge a distribution registry sends: the realm,
/// the service, and for a repository's paths the scope that would do.
async fn bearer_challenge(
    stream: &mut TcpStream,
    realm: &str,
    path: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut challenge = format!(r#"Bearer realm="{realm}",service="{TOKEN_SERVICE}""#);
    let repository = path.strip_prefix("/v2/").and_then(|rest| {
        rest.rsplit_once("/manifests/")
            .or_else(|| rest.rsplit_once("/blobs/"))
            .map(|(name, _)| name)
    });
    if let Some(name) = repository {
        challenge.push_str(&format!(r#",scope="repository:{name}:pull""#));
    }
    let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
    let headers = [
        ("WWW-Authenticate", challenge),
        ("Content-Type", "application/json".to_string()),
    ];
    respond(stream, 401, &headers, body, None, head_only).await
}

/// The token service: the OAuth2 refresh-token grant by POST, nothing else.
/// A wrong refresh token is quoted back in the error, as a careless
/// service might, so that tests can see berth never repeats it.
async fn token_endpoint(
    stream: &mut TcpStream,
    shared: &Shared,
    request: Request,
) -> std::io::Result<()> {
    let recorded = TokenRequest {
        method: request.method.clone(),
        query: decode_pairs(&request.query),
        form: decode_pairs(&String::from_utf8_lossy(&request.body)),
        authorization: request.header("authorization").cloned(),
    };
    let service = {
        let mut state = shared.lock().expect("state");
        state.token_requests.push(recorded.clone());
        state.token_service.clone()
    };
    let json = [("Content-Type", "application/json".to_string())];
    let Some(service) = service else {
        return error(stream, 404, "NAME_UNKNOWN", false).await;
    };
    if request.method != "POST" {
        let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"only the oauth2 refresh token grant is accepted"}]}"#;
        return respond(stream, 401, &json, body, None, false).await;
    }
    let oauth_error = |error: &str, description: String| {
        serde_json::json!({ "error": error, "error_description": description }).to_string()
    };
    if recorded.field("grant_type") != Some("refresh_token") {
        let body = oauth_error("unsupported_grant_type", "only refresh_token".to_string());
        return respond(stream, 400, &json, body.as_bytes(), None, false).await;
    }
    let given = recorded.field("refresh_token").unwrap_or_default();
    if given != service.identity_token {
        let body = oauth_error(
            "invalid_grant",
            format!("refresh token {given} is not valid"),
        );
        return respond(stream, 401, &json, body.as_bytes(), None, false).await;
    }
    let scope = recorded.field("scope").unwrap_or_default();
    let pull_scope = scope
        .split(' ')
        .any(|s| s.starts_with("repository:") && s.ends_with(":pull"));
    if recorded.field("service") != Some(TOKEN_SERVICE)
        || recorded.field("client_id").unwrap_or_default().is_empty()
        || !pull_scope
    {
        let body = oauth_error(
            "invalid_request",
            "service, client_id and a pull scope are required".to_string(),
        );
        return respond(stream, 400, &json, body.as_bytes(), None, false).await;
    }
    let body = serde_json::json!({
        "access_token": service.access_token,
        "expires_in": 300,
        "scope": scope,
    })
    .to_string();
    respond(stream, 200, &json, body.as_bytes(), None, false).await
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
        400 => "Bad Request",
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
