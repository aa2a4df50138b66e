//! Bearer tokens from a registry's token service, by containerd's rules
//! (`core/remotes/docker/authorizer.go` `doBearerAuth`,
//! `core/remotes/docker/auth/fetch.go` `FetchTokenWithOAuth`/`FetchToken`):
//! with a secret, the OAuth2 POST of the distribution spec first (the
//! password grant for a username and password, the refresh-token grant for
//! an identity token), and the GET of the token spec with basic auth only
//! when the service refuses the POST in the ways containerd knows; without
//! a secret, an anonymous GET.
//!
//! Secrets go to the token service and nowhere else: not into a log line,
//! not into an error (a service that echoes one is redacted), and not over
//! plain HTTP when the registry itself is reached over TLS.

use std::time::Duration;

use reqwest::{StatusCode, Url, header};

use crate::image::auth::redact;
use crate::image::http_errors::{Refusal, error_chain, registry_errors};

/// The `client_id` berth gives token services, where containerd gives
/// `containerd-client`. The OAuth2 spec requires one; services use it to
/// tell clients apart, not to authenticate them.
pub const CLIENT_ID: &str = "berth";
/// A token response is a JSON object holding a JWT or two.
const MAX_TOKEN_RESPONSE_BYTES: usize = 1 << 20;
/// Bounds each request of the exchange as a whole: the client's read timeout
/// alone lets a server that trickles bytes hold a pull for ever.
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("auth for {registry}: {message}")]
    Challenge { registry: String, message: String },
    #[error(
        "auth for {registry}: {secret} not sent to token service {realm}: it is plain HTTP, and the registry is reached over HTTPS"
    )]
    InsecureRealm {
        registry: String,
        realm: String,
        secret: &'static str,
    },
    #[error("auth for {registry}: fetch {kind} token from {realm}: {message}")]
    Fetch {
        registry: String,
        realm: String,
        /// `oauth` with a secret, `anonymous` without, as containerd says.
        kind: &'static str,
        message: String,
        /// How the service's last answer turned the request away, if it did.
        refusal: Option<Refusal>,
    },
}

impl TokenError {
    /// Whether the token service refused who berth said it was.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            TokenError::Fetch { refusal, .. } => *refusal,
            TokenError::Challenge { .. } | TokenError::InsecureRealm { .. } => None,
        }
    }
}

/// What a token request proves: containerd's `TokenOptions` username and
/// secret, as the three cases they make.
#[derive(Clone, PartialEq, Eq)]
pub enum Grant {
    Anonymous,
    /// The OAuth2 password grant; the username is never empty.
    Password {
        username: String,
        password: String,
    },
    /// The OAuth2 refresh-token grant: an identity token, no username.
    RefreshToken(String),
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Grant::Anonymous => f.write_str("Anonymous"),
            Grant::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Grant::RefreshToken(_) => f.debug_tuple("RefreshToken").field(&"<redacted>").finish(),
        }
    }
}

impl Grant {
    /// The username and secret of basic auth on the GET, as containerd's
    /// `FetchToken` sets them; `None` for an anonymous request.
    fn basic(&self) -> Option<(&str, &str)> {
        match self {
            Grant::Anonymous => None,
            Grant::Password { username, password } => Some((username, password)),
            Grant::RefreshToken(token) => Some(("", token)),
        }
    }

    /// What a service could echo back of this grant.
    fn secrets(&self) -> Vec<String> {
        use base64::Engine as _;
        match self.basic() {
            None => Vec::new(),
            Some((username, secret)) => vec![
                secret.to_string(),
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{secret}")),
            ],
        }
    }
}

/// A registry's Bearer challenge: where to ask for a token, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerChallenge {
    pub realm: String,
    /// Empty when the challenge names none.
    pub service: String,
    pub scopes: Vec<String>,
}

/// What a registry's `WWW-Authenticate` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer(BearerChallenge),
    Basic,
}

/// The first Bearer or Basic challenge among every `WWW-Authenticate`
/// value, in order, as containerd's `AddResponses` takes it. `Ok(None)`:
/// the registry asked for nothing.
pub fn parse_challenges<'a>(
    headers: impl IntoIterator<Item = &'a str>,
) -> Result<Option<Challenge>, String> {
    let mut seen = Vec::new();
    for value in headers {
        seen.push(value);
        // A syntax error ends that header's challenges, as in oci-client.
        for challenge in http_auth::ChallengeParser::new(value).map_while(Result::ok) {
            if challenge.scheme.eq_ignore_ascii_case("basic") {
                return Ok(Some(Challenge::Basic));
            }
            if !challenge.scheme.eq_ignore_ascii_case("bearer") {
                continue;
            }
            // Parameter names are case-insensitive (RFC 9110 §11.2).
            let param = |name: &str| {
                challenge
                    .params
                    .iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case(name))
                    .map(|(_, value)| value.to_unescaped())
            };
            let realm = param("realm")
                .ok_or_else(|| "no realm specified for token auth challenge".to_string())?;
            let scopes = param("scope")
                .map(|scope| {
                    scope
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            return Ok(Some(Challenge::Bearer(BearerChallenge {
                realm,
                service: param("service").unwrap_or_default(),
                scopes,
            })));
        }
    }
    if seen.is_empty() {
        return Ok(None);
    }
    Err(format!(
        "no supported auth scheme (Bearer or Basic) in WWW-Authenticate {:?}",
        seen.join(", ")
    ))
}

/// A token for pulling `repository` from `registry`, asked of the token
/// service `challenge` names, proving `grant`.
pub async fn fetch_token(
    http: &reqwest::Client,
    registry: &str,
    registry_insecure: bool,
    repository: &str,
    challenge: &BearerChallenge,
    grant: &Grant,
) -> Result<String, TokenError> {
    let secret = match grant {
        Grant::Anonymous => None,
        Grant::Password { .. } => Some("password"),
        Grant::RefreshToken(_) => Some("identity token"),
    };
    // Insecure only comes with a secret: without one, plain HTTP is fine.
    let realm = check_realm(&challenge.realm, registry_insecure || secret.is_none()).map_err(
        |e| match e {
            RealmError::Insecure => TokenError::InsecureRealm {
                registry: registry.to_string(),
                realm: challenge.realm.clone(),
                secret: secret.unwrap_or("secret"),
            },
            RealmError::Invalid(message) => TokenError::Challenge {
                registry: registry.to_string(),
                message,
            },
        },
    )?;
    let request = TokenRequest {
        realm,
        service: challenge.service.clone(),
        scopes: token_scopes(repository, &challenge.scopes),
        grant: grant.clone(),
    };
    let token = fetch(http, &request)
        .await
        .map_err(|failure| TokenError::Fetch {
            registry: registry.to_string(),
            realm: request.realm.to_string(),
            kind: if secret.is_some() {
                "oauth"
            } else {
                "anonymous"
            },
            refusal: failure
                .status
                .and_then(|status| Refusal::of_status(status.as_u16())),
            message: failure.message,
        })?;
    tracing::debug!(registry = %registry, realm = %request.realm, grant = ?request.grant, "bearer token fetched");
    Ok(token)
}

#[derive(Debug, PartialEq, Eq)]
enum RealmError {
    Invalid(String),
    Insecure,
}

/// The realm as a URL a secret may go to. containerd sends it to whatever
/// the registry names; berth also refuses to send a secret in clear text
/// when the registry itself is reached over TLS (`plain_http_ok` is false).
fn check_realm(realm: &str, plain_http_ok: bool) -> Result<Url, RealmError> {
    let url = Url::parse(realm).map_err(|e| {
        RealmError::Invalid(format!("invalid token auth challenge realm {realm:?}: {e}"))
    })?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if plain_http_ok => Ok(url),
        "http" => Err(RealmError::Insecure),
        other => Err(RealmError::Invalid(format!(
            "token auth challenge realm {realm:?} has scheme {other:?}, not http or https"
        ))),
    }
}

/// One token request: containerd's `TokenOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenRequest {
    realm: Url,
    service: String,
    scopes: Vec<String>,
    grant: Grant,
}

/// The pull scope of `repository` and the challenge's own scopes, sorted
/// and without repeats, as containerd's `GetTokenScopes`.
fn token_scopes(repository: &str, challenge_scopes: &[String]) -> Vec<String> {
    let mut scopes = vec![format!("repository:{repository}:pull")];
    scopes.extend(challenge_scopes.iter().cloned());
    scopes.sort();
    scopes.dedup();
    scopes
}

/// The form of the OAuth2 POST, as `FetchTokenWithOAuth`; `None` for an
/// anonymous request, which containerd never POSTs. `access_type=offline`
/// asks for a refresh token back; berth has nowhere to keep one (kubelet
/// owns the credentials), so it never asks.
fn oauth_form(request: &TokenRequest) -> Option<Vec<(&'static str, String)>> {
    let mut form = Vec::new();
    if !request.scopes.is_empty() {
        form.push(("scope", request.scopes.join(" ")));
    }
    form.push(("service", request.service.clone()));
    form.push(("client_id", CLIENT_ID.to_string()));
    match &request.grant {
        Grant::Anonymous => return None,
        Grant::Password { username, password } => {
            form.push(("grant_type", "password".to_string()));
            form.push(("username", username.clone()));
            form.push(("password", password.clone()));
        }
        Grant::RefreshToken(token) => {
            form.push(("grant_type", "refresh_token".to_string()));
            form.push(("refresh_token", token.clone()));
        }
    }
    Some(form)
}

/// The query of the GET, as `FetchToken`: the service only when named, one
/// `scope` parameter per scope.
fn get_query(request: &TokenRequest) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if !request.service.is_empty() {
        query.push(("service", request.service.clone()));
    }
    for scope in &request.scopes {
        query.push(("scope", scope.clone()));
    }
    query
}

/// Whether a refused POST is retried as a GET. containerd's rule, from the
/// registries that answer the POST so: 404 (GCR), 401 (Artifactory), 400
/// (ACR), and 405 when a username is set (the password grant).
fn falls_back_to_get(status: StatusCode, grant: &Grant) -> bool {
    match status.as_u16() {
        400 | 401 | 404 => true,
        405 => matches!(grant, Grant::Password { .. }),
        _ => false,
    }
}

/// How one request to the token service failed.
enum Failure {
    Status {
        method: &'static str,
        status: StatusCode,
        message: String,
    },
    Other(String),
}

impl Failure {
    fn status(&self) -> Option<StatusCode> {
        match self {
            Failure::Status { status, .. } => Some(*status),
            Failure::Other(_) => None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status {
                method,
                status,
                message,
            } => write!(f, "{method} answered HTTP {status}: {message}"),
            Failure::Other(message) => f.write_str(message),
        }
    }
}

/// Why no token came: what the service said, and the status of its last
/// answer, which says whether it refused the grant.
#[derive(Debug)]
struct FetchFailure {
    message: String,
    status: Option<StatusCode>,
}

impl From<Failure> for FetchFailure {
    fn from(failure: Failure) -> Self {
        FetchFailure {
            status: failure.status(),
            message: failure.to_string(),
        }
    }
}

impl FetchFailure {
    fn other(message: String) -> Self {
        FetchFailure {
            message,
            status: None,
        }
    }
}

/// containerd's `doBearerAuth`: with a secret, the OAuth2 POST, then the
/// GET of the token spec when the POST is refused as [`falls_back_to_get`]
/// says; without one, the GET alone. When both fail the error has both
/// answers (containerd keeps only the GET's, which hides why the POST was
/// refused).
async fn fetch(http: &reqwest::Client, request: &TokenRequest) -> Result<String, FetchFailure> {
    let secrets = request.grant.secrets();
    let get = || {
        let get = http.get(request.realm.clone()).query(&get_query(request));
        match request.grant.basic() {
            Some((username, secret)) => get.basic_auth(username, Some(secret)),
            None => get,
        }
    };
    let Some(form) = oauth_form(request) else {
        let body = send(get(), "GET", &secrets).await?;
        return token_of_get(&body).map_err(FetchFailure::other);
    };
    let post = http.post(request.realm.clone()).form(&form);
    let post_failure = match send(post, "POST", &secrets).await {
        Ok(body) => return access_token_of_post(&body).map_err(FetchFailure::other),
        Err(failure) => failure,
    };
    match &post_failure {
        Failure::Status { status, .. } if falls_back_to_get(*status, &request.grant) => {}
        _ => return Err(post_failure.into()),
    }
    match send(get(), "GET", &secrets).await {
        Ok(body) => token_of_get(&body).map_err(FetchFailure::other),
        Err(get_failure) => Err(FetchFailure {
            status: get_failure.status(),
            message: format!("{post_failure}; then {get_failure}"),
        }),
    }
}

/// Sends one request to the token service and reads its answer, bounded.
/// Statuses outside 200–399 are failures, as in containerd.
async fn send(
    request: reqwest::RequestBuilder,
    method: &'static str,
    secrets: &[String],
) -> Result<Vec<u8>, Failure> {
    let other = |message: String| Failure::Other(redact(&format!("{method}: {message}"), secrets));
    let mut response = request
        .header(header::USER_AGENT, USER_AGENT)
        .timeout(TOKEN_REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| other(error_chain(&e)))?;
    let status = response.status();
    let too_large = || {
        other(format!(
            "answer larger than {MAX_TOKEN_RESPONSE_BYTES} bytes"
        ))
    };
    if response
        .content_length()
        .is_some_and(|len| len > MAX_TOKEN_RESPONSE_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| other(error_chain(&e)))? {
        if body.len() + chunk.len() > MAX_TOKEN_RESPONSE_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    if !(200..400).contains(&status.as_u16()) {
        return Err(Failure::Status {
            method,
            status,
            message: redact(&registry_errors(&body), secrets),
        });
    }
    Ok(body)
}

/// The access token of an OAuth2 answer; containerd reads nothing else of
/// it for a pull.
fn access_token_of_post(body: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct OAuthTokenResponse {
        #[serde(default)]
        access_token: String,
    }
    let answer: OAuthTokenResponse = serde_json::from_slice(body)
        .map_err(|e| format!("POST: unable to decode token response: {e}"))?;
    if answer.access_token.is_empty() {
        return Err("POST: the token service answered without an access token".to_string());
    }
    Ok(answer.access_token)
}

/// The token of a token-spec answer: `access_token` and `token` mean the
/// same, and `access_token` wins when both are there, as in containerd.
fn token_of_get(body: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct FetchTokenResponse {
        #[serde(default)]
        token: String,
        #[serde(default)]
        access_token: String,
    }
    let answer: FetchTokenResponse = serde_json::from_slice(body)
        .map_err(|e| format!("GET: unable to decode token response: {e}"))?;
    let token = if answer.access_token.is_empty() {
        answer.token
    } else {
        answer.access_token
    };
    if token.is_empty() {
        return Err("GET: the token service answered without a token".to_string());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use base64::Engine as _;

    use super::*;
    use crate::image::test_http::{Server, answer, client};

    const SECRET: &str = "idt-0123456789-secret";
    const USER: &str = "alice";
    const PASSWORD: &str = "pw-5f1e9c-secret";

    fn password() -> Grant {
        Grant::Password {
            username: USER.to_string(),
            password: PASSWORD.to_string(),
        }
    }

    fn request_with(realm: &str, scopes: &[&str], grant: Grant) -> TokenRequest {
        TokenRequest {
            realm: Url::parse(realm).expect("realm URL"),
            service: "registry.example".to_string(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            grant,
        }
    }

    /// A request with the identity token.
    fn request(realm: &str, scopes: &[&str]) -> TokenRequest {
        request_with(realm, scopes, Grant::RefreshToken(SECRET.to_string()))
    }

    fn fields(form: &[(&'static str, String)]) -> BTreeMap<&'static str, String> {
        form.iter().cloned().collect()
    }

    fn owned(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn basic(username: &str, secret: &str) -> String {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{secret}"));
        format!("Basic {encoded}")
    }

    #[test]
    fn scopes_are_the_pull_scope_and_the_challenges_sorted_without_repeats() {
        assert_eq!(
            token_scopes("team/app", &[]),
            vec!["repository:team/app:pull"]
        );
        let challenge = vec![
            "repository:team/app:pull".to_string(),
            "registry:catalog:*".to_string(),
        ];
        let scopes = token_scopes("team/app", &challenge);
        assert_eq!(
            scopes,
            vec!["registry:catalog:*", "repository:team/app:pull"]
        );
        let form = oauth_form(&request(
            "https://auth.example/token",
            &["b:x:pull", "a:y:pull"],
        ))
        .expect("a form");
        assert_eq!(form[0], ("scope", "b:x:pull a:y:pull".to_string()));
    }

    #[test]
    fn oauth_form_is_a_refresh_token_grant_with_client_id_and_no_offline_access() {
        let form = oauth_form(&request(
            "https://auth.example/token",
            &["repository:team/app:pull"],
        ))
        .expect("a form");
        assert_eq!(
            fields(&form),
            BTreeMap::from([
                ("client_id", "berth".to_string()),
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", SECRET.to_string()),
                ("scope", "repository:team/app:pull".to_string()),
                ("service", "registry.example".to_string()),
            ])
        );
        // Without scopes there is no scope field; the service is always
        // sent, empty if the challenge named none, as containerd.
        let mut bare = request("https://auth.example/token", &[]);
        bare.service.clear();
        let form = oauth_form(&bare).expect("a form");
        assert!(form.iter().all(|(k, _)| *k != "scope"), "{form:?}");
        assert!(form.contains(&("service", String::new())), "{form:?}");
    }

    #[test]
    fn oauth_form_of_a_password_is_the_password_grant_and_anonymous_has_none() {
        let form = oauth_form(&request_with(
            "https://auth.example/token",
            &["repository:team/app:pull"],
            password(),
        ))
        .expect("a form");
        assert_eq!(
            fields(&form),
            BTreeMap::from([
                ("client_id", "berth".to_string()),
                ("grant_type", "password".to_string()),
                ("password", PASSWORD.to_string()),
                ("scope", "repository:team/app:pull".to_string()),
                ("service", "registry.example".to_string()),
                ("username", USER.to_string()),
            ])
        );
        assert_eq!(
            oauth_form(&request_with("https://a/t", &["s"], Grant::Anonymous)),
            None
        );
    }

    #[test]
    fn get_query_names_the_service_only_when_known_and_repeats_scope() {
        let query = get_query(&request("https://a/t", &["s1", "s2"]));
        assert_eq!(
            query,
            vec![
                ("service", "registry.example".to_string()),
                ("scope", "s1".to_string()),
                ("scope", "s2".to_string()),
            ]
        );
        let mut bare = request("https://a/t", &[]);
        bare.service.clear();
        assert!(get_query(&bare).is_empty());
    }

    #[test]
    fn fallback_to_get_on_400_401_404_and_on_405_with_a_username() {
        let status = |code: u16| StatusCode::from_u16(code).expect("status");
        let refresh = Grant::RefreshToken(SECRET.to_string());
        for code in [400, 401, 404] {
            assert!(falls_back_to_get(status(code), &refresh), "{code}");
            assert!(falls_back_to_get(status(code), &password()), "{code}");
        }
        assert!(falls_back_to_get(status(405), &password()));
        assert!(!falls_back_to_get(status(405), &refresh));
        for code in [403, 429, 500, 502] {
            assert!(!falls_back_to_get(status(code), &refresh), "{code}");
            assert!(!falls_back_to_get(status(code), &password()), "{code}");
        }
    }

    #[test]
    fn challenges_first_bearer_or_basic_wins() {
        let bearer = parse_challenges([
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull repository:b:pull""#,
        ])
        .expect("parse");
        assert_eq!(
            bearer,
            Some(Challenge::Bearer(BearerChallenge {
                realm: "https://auth.example/token".to_string(),
                service: "registry.example".to_string(),
                scopes: vec![
                    "repository:a:pull".to_string(),
                    "repository:b:pull".to_string()
                ],
            }))
        );
        // Names in any case, unknown schemes skipped, first known one wins.
        let mixed = parse_challenges([
            r#"Negotiate abc=def, BEARER REALM="https://a/t""#,
            r#"Basic realm="x""#,
        ])
        .expect("parse");
        assert_eq!(
            mixed,
            Some(Challenge::Bearer(BearerChallenge {
                realm: "https://a/t".to_string(),
                service: String::new(),
                scopes: Vec::new(),
            }))
        );
        let basic = parse_challenges([r#"Basic realm="x""#, r#"Bearer realm="https://a/t""#])
            .expect("parse");
        assert_eq!(basic, Some(Challenge::Basic));
        assert_eq!(parse_challenges([]).expect("none"), None);
        let err = parse_challenges([r#"Bearer service="x""#]).expect_err("no realm");
        assert!(err.contains("no realm"), "{err}");
        let err = parse_challenges([r#"Negotiate a=b"#]).expect_err("unsupported");
        assert!(err.contains("no supported auth scheme"), "{err}");
    }

    #[test]
    fn realm_must_be_http_or_https_and_https_for_a_tls_registry() {
        assert!(check_realm("https://auth.example/token", false).is_ok());
        assert!(check_realm("http://127.0.0.1:5000/token", true).is_ok());
        assert_eq!(
            check_realm("http://auth.example/token", false),
            Err(RealmError::Insecure)
        );
        assert!(matches!(
            check_realm("ftp://auth.example/token", true),
            Err(RealmError::Invalid(_))
        ));
        assert!(matches!(
            check_realm("/token", true),
            Err(RealmError::Invalid(_))
        ));
    }

    #[test]
    fn debug_of_a_request_hides_the_secrets() {
        for grant in [Grant::RefreshToken(SECRET.to_string()), password()] {
            let text = format!("{:?}", request_with("https://a/t", &["s"], grant));
            assert!(!text.contains(SECRET), "{text}");
            assert!(!text.contains(PASSWORD), "{text}");
        }
    }

    #[tokio::test]
    async fn identity_token_is_posted_as_an_oauth2_refresh_token_grant() {
        let server = Server::start().await;
        let realm = server.url("/oauth2/token");
        let served = server.serve(vec![answer(
            200,
            r#"{"access_token":"access-1","expires_in":60,"refresh_token":"ignored","scope":"repository:team/app:pull"}"#,
        )]);
        let token = fetch(&client(), &request(&realm, &["repository:team/app:pull"]))
            .await
            .expect("token");
        assert_eq!(token, "access-1");
        let received = served.await.expect("server");
        assert_eq!(received.len(), 1, "{received:?}");
        let post = &received[0];
        assert_eq!(
            (post.method.as_str(), post.path.as_str()),
            ("POST", "/oauth2/token")
        );
        assert!(
            post.headers["content-type"].starts_with("application/x-www-form-urlencoded"),
            "{post:?}"
        );
        assert!(!post.headers.contains_key("authorization"), "{post:?}");
        assert_eq!(
            post.form,
            owned(&[
                ("client_id", "berth"),
                ("grant_type", "refresh_token"),
                ("refresh_token", SECRET),
                ("scope", "repository:team/app:pull"),
                ("service", "registry.example"),
            ])
        );
    }

    #[tokio::test]
    async fn username_and_password_are_posted_as_an_oauth2_password_grant() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(
            200,
            r#"{"access_token":"access-pw","expires_in":300}"#,
        )]);
        let token = fetch(
            &client(),
            &request_with(&realm, &["repository:team/app:pull"], password()),
        )
        .await
        .expect("token");
        assert_eq!(token, "access-pw");
        let received = served.await.expect("server");
        assert_eq!(received.len(), 1, "no GET after a granted POST");
        let post = &received[0];
        assert_eq!(post.method, "POST");
        assert!(
            !post.headers.contains_key("authorization"),
            "the password is in the form only: {post:?}"
        );
        assert_eq!(
            post.form,
            owned(&[
                ("client_id", "berth"),
                ("grant_type", "password"),
                ("password", PASSWORD),
                ("scope", "repository:team/app:pull"),
                ("service", "registry.example"),
                ("username", USER),
            ])
        );
    }

    #[tokio::test]
    async fn refused_post_falls_back_to_get_with_the_token_as_basic_password() {
        for status in [400, 401, 404] {
            let server = Server::start().await;
            let realm = server.url("/token");
            let served = server.serve(vec![
                answer(
                    status,
                    r#"{"errors":[{"code":"UNSUPPORTED","message":"no oauth"}]}"#,
                ),
                // Both names of the token: `access_token` wins.
                answer(
                    200,
                    r#"{"token":"from-token","access_token":"from-access-token"}"#,
                ),
            ]);
            let token = fetch(&client(), &request(&realm, &["s:a:pull", "s:b:pull"]))
                .await
                .expect("token by GET");
            assert_eq!(token, "from-access-token", "after {status}");
            let received = served.await.expect("server");
            let get = &received[1];
            assert_eq!((get.method.as_str(), get.path.as_str()), ("GET", "/token"));
            assert_eq!(get.query["service"], vec!["registry.example"]);
            assert_eq!(get.query["scope"], vec!["s:a:pull", "s:b:pull"]);
            assert_eq!(get.headers["authorization"], basic("", SECRET));
        }
        // `token` alone serves too.
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(404, "{}"), answer(200, r#"{"token":"t"}"#)]);
        assert_eq!(
            fetch(&client(), &request(&realm, &[]))
                .await
                .expect("token"),
            "t"
        );
        served.await.expect("server");
    }

    #[tokio::test]
    async fn refused_password_grant_falls_back_to_get_with_basic_auth_also_on_405() {
        for status in [400, 401, 404, 405] {
            let server = Server::start().await;
            let realm = server.url("/token");
            let served = server.serve(vec![
                answer(status, "{}"),
                answer(200, r#"{"token":"by-get"}"#),
            ]);
            let token = fetch(&client(), &request_with(&realm, &["s:a:pull"], password()))
                .await
                .expect("token by GET");
            assert_eq!(token, "by-get", "after {status}");
            let received = served.await.expect("server");
            let methods: Vec<&str> = received.iter().map(|r| r.method.as_str()).collect();
            assert_eq!(methods, ["POST", "GET"], "after {status}");
            let get = &received[1];
            assert_eq!(get.headers["authorization"], basic(USER, PASSWORD));
            assert_eq!(get.query["scope"], vec!["s:a:pull"]);
        }
    }

    #[tokio::test]
    async fn anonymous_token_is_a_get_without_authorization() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(200, r#"{"token":"anon"}"#)]);
        let token = fetch(
            &client(),
            &request_with(&realm, &["s:a:pull"], Grant::Anonymous),
        )
        .await
        .expect("token");
        assert_eq!(token, "anon");
        let received = served.await.expect("server");
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].method, "GET");
        assert!(!received[0].headers.contains_key("authorization"));
        assert_eq!(received[0].query["scope"], vec!["s:a:pull"]);
    }

    #[tokio::test]
    async fn other_refusals_are_final_and_quote_the_service_without_the_secret() {
        for (grant, statuses) in [
            (Grant::RefreshToken(SECRET.to_string()), vec![403, 405, 500]),
            (password(), vec![403, 500]),
        ] {
            for status in statuses {
                let server = Server::start().await;
                let realm = server.url("/token");
                let secret = grant.basic().expect("a secret").1.to_string();
                let body = format!(
                    r#"{{"errors":[{{"code":"DENIED","message":"secret {secret} may not pull"}}]}}"#
                );
                let served = server.serve(vec![answer(status, &body)]);
                let err = fetch(&client(), &request_with(&realm, &["s"], grant.clone()))
                    .await
                    .expect_err("refused");
                assert_eq!(err.status.map(|s| s.as_u16()), Some(status));
                let message = err.message;
                assert!(
                    message.starts_with(&format!("POST answered HTTP {status}")),
                    "{message}"
                );
                assert!(
                    message.contains("secret <redacted> may not pull (DENIED)"),
                    "{message}"
                );
                assert!(!message.contains(&secret), "{message}");
                assert_eq!(
                    served.await.expect("server").len(),
                    1,
                    "no GET after {status}"
                );
            }
        }
    }

    #[tokio::test]
    async fn failed_fallback_reports_both_answers_and_the_last_status() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![
            answer(
                401,
                &format!(r#"{{"error":"invalid_grant","error_description":"unknown refresh token {SECRET}"}}"#),
            ),
            answer(
                403,
                r#"{"errors":[{"code":"DENIED","message":"basic auth refused"}]}"#,
            ),
        ]);
        let err = fetch(&client(), &request(&realm, &["s"]))
            .await
            .expect_err("refused twice");
        assert_eq!(
            err.message,
            "POST answered HTTP 401 Unauthorized: unknown refresh token <redacted> (invalid_grant); \
             then GET answered HTTP 403 Forbidden: basic auth refused (DENIED)"
        );
        assert_eq!(err.status, Some(StatusCode::FORBIDDEN));
        served.await.expect("server");
    }

    #[tokio::test]
    async fn answers_without_a_token_are_errors() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(200, r#"{"expires_in":60}"#)]);
        let err = fetch(&client(), &request(&realm, &[]))
            .await
            .expect_err("no token");
        assert!(err.message.contains("without an access token"), "{err:?}");
        assert_eq!(err.status, None);
        served.await.expect("server");

        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(404, "{}"), answer(200, "not json")]);
        let err = fetch(&client(), &request(&realm, &[]))
            .await
            .expect_err("bad JSON");
        assert!(
            err.message.contains("GET: unable to decode token response"),
            "{err:?}"
        );
        served.await.expect("server");
    }

    fn challenge(realm: &str) -> BearerChallenge {
        BearerChallenge {
            realm: realm.to_string(),
            service: "loopback".to_string(),
            scopes: vec!["repository:team/app:pull".to_string()],
        }
    }

    #[tokio::test]
    async fn fetch_token_names_the_registry_and_says_how_it_was_refused() {
        for (status, refusal) in [
            (401, Some(Refusal::Unauthenticated)),
            (403, Some(Refusal::Denied)),
            (500, None),
        ] {
            let server = Server::start().await;
            let realm = server.url("/token");
            // A 401 or 403 to the POST: no fallback for 403 and 500, and
            // the GET after a 401 is refused the same way.
            let served = server.serve(if status == 401 {
                vec![answer(401, "{}"), answer(401, "{}")]
            } else {
                vec![answer(status, "{}")]
            });
            let err = fetch_token(
                &client(),
                "registry.example",
                true,
                "team/app",
                &challenge(&realm),
                &password(),
            )
            .await
            .expect_err("refused");
            assert_eq!(err.refusal(), refusal, "{status}: {err}");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "auth for registry.example: fetch oauth token from {realm}"
                )),
                "{text}"
            );
            served.await.expect("server");
        }
    }

    #[tokio::test]
    async fn secrets_never_go_to_a_plain_http_realm_of_a_tls_registry() {
        for grant in [Grant::RefreshToken(SECRET.to_string()), password()] {
            // Nothing listens there: any request would fail differently.
            let err = fetch_token(
                &client(),
                "registry.example",
                false,
                "team/app",
                &challenge("http://127.0.0.1:9/token"),
                &grant,
            )
            .await
            .expect_err("insecure realm");
            assert!(matches!(err, TokenError::InsecureRealm { .. }), "{err}");
            assert_eq!(err.refusal(), None);
        }
        // No secret, nothing to protect: an anonymous token may come over
        // plain HTTP.
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(200, r#"{"token":"anon"}"#)]);
        let token = fetch_token(
            &client(),
            "registry.example",
            false,
            "team/app",
            &challenge(&realm),
            &Grant::Anonymous,
        )
        .await
        .expect("anonymous token");
        assert_eq!(token, "anon");
        served.await.expect("server");
    }
}
