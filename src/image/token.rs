//! Identity tokens: an OAuth2 refresh token (CRI `AuthConfig.identity_token`,
//! `identitytoken` in a docker `auth.json`) traded for an access token at the
//! registry's token service, by containerd's rules
//! (`core/remotes/docker/authorizer.go` `doBearerAuth`,
//! `core/remotes/docker/auth/fetch.go` `FetchTokenWithOAuth`/`FetchToken`).
//!
//! oci-client fetches bearer tokens only with the GET of the token spec, a
//! password in basic auth; a refresh token belongs in the POST form of the
//! distribution OAuth2 spec. So berth reads the registry's challenge and
//! fetches the access token here, and oci-client gets that as a bearer
//! token. The identity token goes nowhere else: not to oci-client, not into
//! a log line, not into an error (a token service that echoes it is
//! redacted).

use std::time::Duration;

use reqwest::{StatusCode, Url, header};

use crate::image::http_errors::{error_chain, registry_errors};
use crate::image::mirrors::Endpoint;

/// The `client_id` berth gives token services, where containerd gives
/// `containerd-client`. The OAuth2 spec requires one; services use it to
/// tell clients apart, not to authenticate them.
pub const CLIENT_ID: &str = "berth";
/// A token response is a JSON object holding a JWT or two.
const MAX_TOKEN_RESPONSE_BYTES: usize = 1 << 20;
/// Bounds each request of the exchange as a whole: the client's read timeout
/// alone lets a server that trickles bytes hold a pull for ever.
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));
const BASIC_ONLY: &str = "the registry asks for basic auth, which an identity token cannot answer (it needs a bearer token service)";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("auth for {registry}: ping {url}: {message}")]
    Ping {
        registry: String,
        url: String,
        message: String,
    },
    #[error("auth for {registry}: {message}")]
    Challenge { registry: String, message: String },
    #[error(
        "auth for {registry}: identity token not sent to token service {realm}: it is plain HTTP, and the registry is reached over HTTPS"
    )]
    InsecureRealm { registry: String, realm: String },
    #[error("auth for {registry}: fetch oauth token from {realm}: {message}")]
    Fetch {
        registry: String,
        realm: String,
        message: String,
    },
}

/// An access token for pulling from `endpoint`, traded for
/// `identity_token`. `None` when the registry's `/v2/` asks for no auth:
/// containerd sends credentials only when challenged, and so does berth.
pub async fn access_token(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    identity_token: &str,
) -> Result<Option<String>, TokenError> {
    let registry = endpoint.host.clone();
    let scheme = if endpoint.insecure { "http" } else { "https" };
    // oci-client learns the challenge from `/v2/` too; the pull's first
    // request then carries the token.
    let url = format!("{scheme}://{}/v2/", endpoint.host);
    let ping = http
        .get(&url)
        .header(header::USER_AGENT, USER_AGENT)
        .timeout(TOKEN_REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| TokenError::Ping {
            registry: registry.clone(),
            url: url.clone(),
            message: error_chain(&e),
        })?;
    let headers: Vec<String> = ping
        .headers()
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::to_string)
        .collect();
    drop(ping);
    let challenge_err = |message: String| TokenError::Challenge {
        registry: registry.clone(),
        message,
    };
    let (realm, service, challenge_scopes) =
        match parse_challenges(headers.iter().map(String::as_str)).map_err(challenge_err)? {
            None => return Ok(None),
            // containerd answers basic with the username and secret, and
            // refuses an empty username: an identity token has none.
            Some(Challenge::Basic) => return Err(challenge_err(BASIC_ONLY.to_string())),
            Some(Challenge::Bearer {
                realm,
                service,
                scopes,
            }) => (realm, service, scopes),
        };
    let realm = check_realm(&realm, endpoint.insecure).map_err(|e| match e {
        RealmError::Invalid(message) => challenge_err(message),
        RealmError::Insecure => TokenError::InsecureRealm {
            registry: registry.clone(),
            realm: realm.clone(),
        },
    })?;
    let request = TokenRequest {
        realm,
        service,
        scopes: token_scopes(&endpoint.repository, &challenge_scopes),
        identity_token: identity_token.to_string(),
    };
    let token = fetch(http, &request)
        .await
        .map_err(|message| TokenError::Fetch {
            registry: registry.clone(),
            realm: request.realm.to_string(),
            message,
        })?;
    tracing::debug!(registry = %registry, realm = %request.realm, "identity token traded for an access token");
    Ok(Some(token))
}

/// What a registry's `WWW-Authenticate` asks for, as far as an identity
/// token is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Bearer {
        realm: String,
        /// Empty when the challenge names none.
        service: String,
        scopes: Vec<String>,
    },
    Basic,
}

/// The first Bearer or Basic challenge among every `WWW-Authenticate`
/// value, in order, as containerd's `AddResponses` takes it. `Ok(None)`:
/// the registry asked for nothing.
fn parse_challenges<'a>(
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
            return Ok(Some(Challenge::Bearer {
                realm,
                service: param("service").unwrap_or_default(),
                scopes,
            }));
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

#[derive(Debug, PartialEq, Eq)]
enum RealmError {
    Invalid(String),
    Insecure,
}

/// The realm as a URL the identity token may go to. containerd sends it to
/// whatever the registry names; berth also refuses to send a long-lived
/// secret in clear text when the registry itself is reached over TLS.
fn check_realm(realm: &str, registry_insecure: bool) -> Result<Url, RealmError> {
    let url = Url::parse(realm).map_err(|e| {
        RealmError::Invalid(format!("invalid token auth challenge realm {realm:?}: {e}"))
    })?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if registry_insecure => Ok(url),
        "http" => Err(RealmError::Insecure),
        other => Err(RealmError::Invalid(format!(
            "token auth challenge realm {realm:?} has scheme {other:?}, not http or https"
        ))),
    }
}

/// One token request: containerd's `TokenOptions` with the identity token
/// as the secret and no username, which is what makes it a refresh-token
/// grant (containerd's CRI `ParseAuth` gives `("", identity_token)`).
#[derive(Clone, PartialEq, Eq)]
struct TokenRequest {
    realm: Url,
    service: String,
    scopes: Vec<String>,
    identity_token: String,
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequest")
            .field("realm", &self.realm.as_str())
            .field("service", &self.service)
            .field("scopes", &self.scopes)
            .field("identity_token", &"<redacted>")
            .finish()
    }
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

/// The form of the OAuth2 POST, as `FetchTokenWithOAuth` with an empty
/// username. `access_type=offline` asks for a refresh token back; berth has
/// nowhere to keep one (kubelet owns the credentials), so it never asks.
fn oauth_form(request: &TokenRequest) -> Vec<(&'static str, String)> {
    let mut form = Vec::new();
    if !request.scopes.is_empty() {
        form.push(("scope", request.scopes.join(" ")));
    }
    form.push(("service", request.service.clone()));
    form.push(("client_id", CLIENT_ID.to_string()));
    form.push(("grant_type", "refresh_token".to_string()));
    form.push(("refresh_token", request.identity_token.clone()));
    form
}

/// The query of the GET fallback, as `FetchToken`: the service only when
/// named, one `scope` parameter per scope.
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
/// (ACR). It also retries on 405 when a username is set (the password
/// grant); an identity token has none, so there 405 is final.
fn falls_back_to_get(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 401 | 404)
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

/// containerd's `doBearerAuth` with a secret: the OAuth2 POST, then the GET
/// of the token spec when the POST is refused as [`falls_back_to_get`]
/// says. When both fail the error has both answers (containerd keeps only
/// the GET's, which hides why the POST was refused).
async fn fetch(http: &reqwest::Client, request: &TokenRequest) -> Result<String, String> {
    let secret = request.identity_token.as_str();
    let post = http.post(request.realm.clone()).form(&oauth_form(request));
    let post_failure = match send(post, "POST", secret).await {
        Ok(body) => return access_token_of_post(&body),
        Err(failure) => failure,
    };
    match &post_failure {
        Failure::Status { status, .. } if falls_back_to_get(*status) => {}
        _ => return Err(post_failure.to_string()),
    }
    let get = http
        .get(request.realm.clone())
        .query(&get_query(request))
        .basic_auth("", Some(secret));
    match send(get, "GET", secret).await {
        Ok(body) => token_of_get(&body),
        Err(get_failure) => Err(format!("{post_failure}; then {get_failure}")),
    }
}

/// Sends one request to the token service and reads its answer, bounded.
/// Statuses outside 200–399 are failures, as in containerd.
async fn send(
    request: reqwest::RequestBuilder,
    method: &'static str,
    secret: &str,
) -> Result<Vec<u8>, Failure> {
    let other = |message: String| Failure::Other(redact(&format!("{method}: {message}"), secret));
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
            message: redact(&registry_errors(&body), secret),
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

/// `text` without `secret` in it: a token service may quote what it was
/// sent.
fn redact(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return text.to_string();
    }
    text.replace(secret, "<redacted>")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use base64::Engine as _;

    use super::*;
    use crate::image::test_http::{Server, answer, client};

    const SECRET: &str = "idt-0123456789-secret";

    fn request(realm: &str, scopes: &[&str]) -> TokenRequest {
        TokenRequest {
            realm: Url::parse(realm).expect("realm URL"),
            service: "registry.example".to_string(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            identity_token: SECRET.to_string(),
        }
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
        ));
        assert_eq!(form[0], ("scope", "b:x:pull a:y:pull".to_string()));
    }

    #[test]
    fn oauth_form_is_a_refresh_token_grant_with_client_id_and_no_offline_access() {
        let form = oauth_form(&request(
            "https://auth.example/token",
            &["repository:team/app:pull"],
        ));
        let fields: BTreeMap<&str, &str> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            fields,
            BTreeMap::from([
                ("client_id", "berth"),
                ("grant_type", "refresh_token"),
                ("refresh_token", SECRET),
                ("scope", "repository:team/app:pull"),
                ("service", "registry.example"),
            ])
        );
        // Without scopes there is no scope field; the service is always
        // sent, empty if the challenge named none, as containerd.
        let mut bare = request("https://auth.example/token", &[]);
        bare.service.clear();
        let form = oauth_form(&bare);
        assert!(form.iter().all(|(k, _)| *k != "scope"), "{form:?}");
        assert!(form.contains(&("service", String::new())), "{form:?}");
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
    fn fallback_to_get_only_on_400_401_404() {
        for code in [400, 401, 404] {
            assert!(
                falls_back_to_get(StatusCode::from_u16(code).expect("status")),
                "{code}"
            );
        }
        for code in [403, 405, 429, 500, 502] {
            assert!(
                !falls_back_to_get(StatusCode::from_u16(code).expect("status")),
                "{code}"
            );
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
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".to_string(),
                service: "registry.example".to_string(),
                scopes: vec![
                    "repository:a:pull".to_string(),
                    "repository:b:pull".to_string()
                ],
            })
        );
        // Names in any case, unknown schemes skipped, first known one wins.
        let mixed = parse_challenges([
            r#"Negotiate abc=def, BEARER REALM="https://a/t""#,
            r#"Basic realm="x""#,
        ])
        .expect("parse");
        assert_eq!(
            mixed,
            Some(Challenge::Bearer {
                realm: "https://a/t".to_string(),
                service: String::new(),
                scopes: Vec::new(),
            })
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
    fn redaction_removes_every_copy_of_the_secret() {
        assert_eq!(
            redact(&format!("bad token {SECRET} ({SECRET})"), SECRET),
            "bad token <redacted> (<redacted>)"
        );
        assert_eq!(redact("nothing", ""), "nothing");
    }

    #[test]
    fn debug_of_a_request_hides_the_identity_token() {
        let text = format!("{:?}", request("https://a/t", &["s"]));
        assert!(!text.contains(SECRET), "{text}");
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
            BTreeMap::from(
                [
                    ("client_id", "berth"),
                    ("grant_type", "refresh_token"),
                    ("refresh_token", SECRET),
                    ("scope", "repository:team/app:pull"),
                    ("service", "registry.example"),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string()))
            )
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
            let basic = base64::engine::general_purpose::STANDARD.encode(format!(":{SECRET}"));
            assert_eq!(get.headers["authorization"], format!("Basic {basic}"));
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
    async fn other_refusals_are_final_and_quote_the_service_without_the_secret() {
        for status in [403, 405, 500] {
            let server = Server::start().await;
            let realm = server.url("/token");
            let body = format!(
                r#"{{"errors":[{{"code":"DENIED","message":"token {SECRET} may not pull"}}]}}"#
            );
            let served = server.serve(vec![answer(status, &body)]);
            let err = fetch(&client(), &request(&realm, &["s"]))
                .await
                .expect_err("refused");
            assert!(
                err.starts_with(&format!("POST answered HTTP {status}")),
                "{err}"
            );
            assert!(
                err.contains("token <redacted> may not pull (DENIED)"),
                "{err}"
            );
            assert!(!err.contains(SECRET), "{err}");
            assert_eq!(
                served.await.expect("server").len(),
                1,
                "no GET after {status}"
            );
        }
    }

    #[tokio::test]
    async fn failed_fallback_reports_both_answers() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![
            answer(
                401,
                &format!(r#"{{"error":"invalid_grant","error_description":"unknown refresh token {SECRET}"}}"#),
            ),
            answer(
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"basic auth refused"}]}"#,
            ),
        ]);
        let err = fetch(&client(), &request(&realm, &["s"]))
            .await
            .expect_err("refused twice");
        assert_eq!(
            err,
            "POST answered HTTP 401 Unauthorized: unknown refresh token <redacted> (invalid_grant); \
             then GET answered HTTP 401 Unauthorized: basic auth refused (UNAUTHORIZED)"
        );
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
        assert!(err.contains("without an access token"), "{err}");
        served.await.expect("server");

        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(404, "{}"), answer(200, "not json")]);
        let err = fetch(&client(), &request(&realm, &[]))
            .await
            .expect_err("bad JSON");
        assert!(
            err.contains("GET: unable to decode token response"),
            "{err}"
        );
        served.await.expect("server");
    }

    #[tokio::test]
    async fn access_token_follows_the_registry_challenge() {
        let server = Server::start().await;
        let challenge = format!(
            r#"Bearer realm="{}",service="loopback""#,
            server.url("/token")
        );
        let endpoint = Endpoint {
            host: server.address.clone(),
            repository: "team/app".to_string(),
            insecure: true,
            is_mirror: false,
        };
        let served = server.serve(vec![
            (401, vec![("WWW-Authenticate", challenge)], "{}".to_string()),
            answer(200, r#"{"access_token":"access-2"}"#),
        ]);
        let token = access_token(&client(), &endpoint, SECRET)
            .await
            .expect("token");
        assert_eq!(token.as_deref(), Some("access-2"));
        let received = served.await.expect("server");
        assert_eq!(received[0].path, "/v2/");
        assert_eq!(received[1].form["scope"], "repository:team/app:pull");
        assert_eq!(received[1].form["service"], "loopback");
    }

    #[tokio::test]
    async fn no_challenge_means_no_token_and_basic_is_refused() {
        let server = Server::start().await;
        let endpoint = Endpoint {
            host: server.address.clone(),
            repository: "team/app".to_string(),
            insecure: true,
            is_mirror: false,
        };
        let served = server.serve(vec![
            answer(200, "{}"),
            (
                401,
                vec![("WWW-Authenticate", r#"Basic realm="x""#.to_string())],
                "{}".to_string(),
            ),
        ]);
        let none = access_token(&client(), &endpoint, SECRET)
            .await
            .expect("open registry");
        assert_eq!(none, None);
        let err = access_token(&client(), &endpoint, SECRET)
            .await
            .expect_err("basic only");
        assert!(matches!(err, TokenError::Challenge { .. }), "{err}");
        assert!(err.to_string().contains("basic auth"), "{err}");
        assert_eq!(served.await.expect("server").len(), 2, "no token request");
    }
}
