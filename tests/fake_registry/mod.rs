//! A fake OCI registry for tests: it serves exactly what a test put in it,
//! including what no real registry would serve (bytes that do not match
//! their digest, short bodies, refusals, silence), so that the pull's
//! defences can be driven from outside the daemon.
//!
//! It can also stand behind a token service ([`FakeRegistry::require_token`]):
//! every `/v2/` request then needs a bearer token, which the service hands
//! out for what its [`TokenPolicy`] accepts (the OAuth2 refresh-token and
//! password grants, the GET of the token spec with basic auth, anonymous
//! GETs), and which can expire after a number of requests. Or it can want
//! basic auth itself ([`FakeRegistry::require_basic`]).
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

/// What the token service in front of the registry accepts, and how long
/// its tokens last. Every token it hands out is new (`token-1`, `token-2`,
/// ...); every `/v2/` request must carry a live one.
#[derive(Debug, Clone, Default)]
pub struct TokenPolicy {
    /// The refresh token of the OAuth2 refresh-token grant (POST only).
    pub identity_token: Option<String>,
    /// The username and password of the OAuth2 password grant, and of the
    /// GET with basic auth.
    pub password: Option<(String, String)>,
    /// A GET without credentials gets a token, as on Docker Hub.
    pub anonymous: bool,
    /// The POST is answered 404, as GCR does: tokens come by GET only.
    pub no_oauth_post: bool,
    /// A token serves this many registry requests; the next one is
    /// answered 401 with a fresh challenge (`error="invalid_token"`), as
    /// a token that expired. `None`: tokens last.
    pub uses_per_token: Option<usize>,
}

/// A token handed out, and how many requests it still serves.
#[derive(Debug, Clone)]
struct Issued {
    uses_left: Option<usize>,
}

/// One request the registry (not its token service) answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub status: u16,
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
    token_service: Option<TokenPolicy>,
    issued: HashMap<String, Issued>,
    token_requests: Vec<TokenRequest>,
    basic: Option<(String, String)>,
    /// Repositories whose pulls the registry refuses with 403 to anyone
    /// who got past authentication.
    denied: Vec<String>,
    served: Vec<Served>,
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
    /// <token>` with a live token of the service at
    /// `http://<address>/token`, and is otherwise answered 401 with a
    /// Bearer challenge naming it. The service hands out tokens for what
    /// `policy` accepts, and only for the service [`TOKEN_SERVICE`] and a
    /// pull scope (and, by POST, a client id).
    pub fn require_token(&self, policy: TokenPolicy) {
        self.shared.lock().expect("state").token_service = Some(policy);
    }

    /// From now on every `/v2/` request needs basic auth with `username`
    /// and `password`, and is otherwise answered 401 with a Basic
    /// challenge.
    pub fn require_basic(&self, username: &str, password: &str) {
        self.shared.lock().expect("state").basic =
            Some((username.to_string(), password.to_string()));
    }

    /// Pulls from repository `name` are refused with 403 DENIED, once past
    /// authentication.
    pub fn deny(&self, name: &str) {
        self.shared
            .lock()
            .expect("state")
            .denied
            .push(name.to_string());
    }

    /// Every registry request answered, in order, with its status.
    pub fn served(&self) -> Vec<Served> {
        self.shared.lock().expect("state").served.clone()
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
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        record(&shared, &request, 405);
        let _ = respond(&mut stream, 405, &[], &[], None, false).await;
        return;
    }
    let (route, verdict) = {
        let mut state = shared.lock().expect("state");
        (
            state.routes.get(&path).cloned(),
            authenticate(&mut state, &request),
        )
    };
    match verdict {
        Verdict::Pass => {}
        Verdict::Bearer { expired } => {
            record(&shared, &request, 401);
            let _ = bearer_challenge(&mut stream, &realm, &path, expired, head_only).await;
            return;
        }
        Verdict::Basic => {
            record(&shared, &request, 401);
            let body =
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            let headers = [
                (
                    "WWW-Authenticate",
                    r#"Basic realm="fake-registry""#.to_string(),
                ),
                ("Content-Type", "application/json".to_string()),
            ];
            let _ = respond(&mut stream, 401, &headers, body, None, head_only).await;
            return;
        }
    }
    let denied = repository_of(&path).is_some_and(|name| {
        shared
            .lock()
            .expect("state")
            .denied
            .iter()
            .any(|d| d == name)
    });
    if denied {
        record(&shared, &request, 403);
        let _ = error(&mut stream, 403, "DENIED", head_only).await;
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
            record(&shared, &request, 404);
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
    record(
        &shared,
        &request,
        match route.fault {
            Fault::Status(status) => status,
            _ => 200,
        },
    );
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

fn record(shared: &Shared, request: &Request, status: u16) {
    shared.lock().expect("state").served.push(Served {
        method: request.method.clone(),
        path: request.path.clone(),
        status,
    });
}

/// Whether a registry request may pass, as far as authentication goes.
enum Verdict {
    Pass,
    /// No live token: a Bearer challenge, saying the token is invalid if
    /// one was sent.
    Bearer {
        expired: bool,
    },
    Basic,
}

fn authenticate(state: &mut State, request: &Request) -> Verdict {
    let authorization = request.header("authorization").cloned().unwrap_or_default();
    if let Some((username, password)) = &state.basic
        && basic_credentials(&authorization).as_ref() != Some(&(username.clone(), password.clone()))
    {
        return Verdict::Basic;
    }
    if state.token_service.is_none() {
        return Verdict::Pass;
    }
    let Some(token) = authorization.strip_prefix("Bearer ") else {
        return Verdict::Bearer { expired: false };
    };
    match state.issued.get_mut(token) {
        Some(Issued { uses_left: Some(0) }) | None => Verdict::Bearer { expired: true },
        Some(Issued {
            uses_left: Some(left),
        }) => {
            *left -= 1;
            Verdict::Pass
        }
        Some(Issued { uses_left: None }) => Verdict::Pass,
    }
}

/// The username and password of a `Basic` authorization.
fn basic_credentials(authorization: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let encoded = authorization.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (username, password) = text.split_once(':')?;
    Some((username.to_string(), password.to_string()))
}

/// `name` of `/v2/<name>/manifests/…` or `/v2/<name>/blobs/…`.
fn repository_of(path: &str) -> Option<&str> {
    path.strip_prefix("/v2/").and_then(|rest| {
        rest.rsplit_once("/manifests/")
            .or_else(|| rest.rsplit_once("/blobs/"))
            .map(|(name, _)| name)
    })
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
/// the service, for a repository's paths the scope that would do, and
/// `error="invalid_token"` when the token sent is not (or no longer) good.
async fn bearer_challenge(
    stream: &mut TcpStream,
    realm: &str,
    path: &str,
    expired: bool,
    head_only: bool,
) -> std::io::Result<()> {
    let mut challenge = format!(r#"Bearer realm="{realm}",service="{TOKEN_SERVICE}""#);
    if let Some(name) = repository_of(path) {
        challenge.push_str(&format!(r#",scope="repository:{name}:pull""#));
    }
    if expired {
        challenge.push_str(r#",error="invalid_token""#);
    }
    let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
    let headers = [
        ("WWW-Authenticate", challenge),
        ("Content-Type", "application/json".to_string()),
    ];
    respond(stream, 401, &headers, body, None, head_only).await
}

/// The token service: what its [`TokenPolicy`] accepts. Wrong secrets are
/// quoted back in the error, as a careless service might, so that tests
/// can see berth never repeats them.
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
    let policy = {
        let mut state = shared.lock().expect("state");
        state.token_requests.push(recorded.clone());
        state.token_service.clone()
    };
    let json = [("Content-Type", "application/json".to_string())];
    let Some(policy) = policy else {
        return error(stream, 404, "NAME_UNKNOWN", false).await;
    };
    let oauth_error = |error: &str, description: String| {
        serde_json::json!({ "error": error, "error_description": description }).to_string()
    };
    let (service, scope) = if request.method == "POST" {
        (
            recorded.field("service").map(str::to_string),
            recorded.field("scope").unwrap_or_default().to_string(),
        )
    } else {
        let query = |name: &str| {
            recorded
                .query
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        (
            query("service").into_iter().next(),
            query("scope").join(" "),
        )
    };
    let pull_scope = scope
        .split(' ')
        .any(|s| s.starts_with("repository:") && s.ends_with(":pull"));
    let refuse = |status: u16, body: String| (status, body);
    let verdict: Result<(), (u16, String)> = if request.method == "POST" {
        if policy.no_oauth_post {
            Err(refuse(404, "404 page not found".to_string()))
        } else {
            match recorded.field("grant_type") {
                Some("refresh_token") => {
                    let given = recorded.field("refresh_token").unwrap_or_default();
                    if policy.identity_token.as_deref() == Some(given) {
                        Ok(())
                    } else {
                        Err(refuse(
                            401,
                            oauth_error(
                                "invalid_grant",
                                format!("refresh token {given} is not valid"),
                            ),
                        ))
                    }
                }
                Some("password") => {
                    let username = recorded.field("username").unwrap_or_default();
                    let password = recorded.field("password").unwrap_or_default();
                    if policy.password == Some((username.to_string(), password.to_string())) {
                        Ok(())
                    } else {
                        Err(refuse(
                            401,
                            oauth_error(
                                "invalid_grant",
                                format!("password {password} is not valid for {username}"),
                            ),
                        ))
                    }
                }
                _ => Err(refuse(
                    400,
                    oauth_error(
                        "unsupported_grant_type",
                        "only refresh_token and password".to_string(),
                    ),
                )),
            }
        }
    } else {
        match basic_credentials(recorded.authorization.as_deref().unwrap_or_default()) {
            Some(credentials) if policy.password.as_ref() == Some(&credentials) => Ok(()),
            None if recorded.authorization.is_none() && policy.anonymous => Ok(()),
            given => {
                let message = match (&policy.password, given) {
                    (Some(_), Some((username, password))) => {
                        format!("password {password} is not valid for {username}")
                    }
                    _ => "only the oauth2 refresh token grant is accepted".to_string(),
                };
                let body = serde_json::json!({
                    "errors": [{ "code": "UNAUTHORIZED", "message": message }]
                });
                Err(refuse(401, body.to_string()))
            }
        }
    };
    if let Err((status, body)) = verdict {
        return respond(stream, status, &json, body.as_bytes(), None, false).await;
    }
    if service.as_deref() != Some(TOKEN_SERVICE)
        || (request.method == "POST" && recorded.field("client_id").unwrap_or_default().is_empty())
        || !pull_scope
    {
        let body = oauth_error(
            "invalid_request",
            "service, client_id and a pull scope are required".to_string(),
        );
        return respond(stream, 400, &json, body.as_bytes(), None, false).await;
    }
    let token = {
        let mut state = shared.lock().expect("state");
        let token = format!("token-{}", state.issued.len() + 1);
        state.issued.insert(
            token.clone(),
            Issued {
                uses_left: policy.uses_per_token,
            },
        );
        token
    };
    // The OAuth2 answer names it `access_token`, the token spec `token`.
    let name = if request.method == "POST" {
        "access_token"
    } else {
        "token"
    };
    let body = serde_json::json!({ name: token, "expires_in": 300, "scope": scope }).to_string();
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
        403 => "Forbidden",
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
