//! What the requests of one pull carry in `Authorization` to one endpoint,
//! and how that changes when the registry answers 401: containerd's
//! `dockerAuthorizer` (`core/remotes/docker/authorizer.go`) with the
//! 401-retry of its resolver and fetcher (`resolver.go` `retryRequest`).
//!
//! Nothing is sent before the registry asks for it (a registry token
//! aside, which is all there is to send): the first request goes out bare
//! and its 401 names the scheme, Basic or Bearer with its token service. A
//! 401 to a request that carried a token means the token expired or was
//! revoked during the pull: a new one is fetched and the request is sent
//! again. One fetch serves every request that met the same 401; a 401 to a
//! token already replaced is answered by the replacement.

use base64::Engine as _;
use reqwest::header::HeaderValue;

use crate::image::auth::{Login, redact};
use crate::image::mirrors::Endpoint;
use crate::image::token::{self, Challenge, Grant, TokenError};

const BASIC_ONLY: &str = "the registry asks for basic auth, which an identity token cannot answer (it needs a bearer token service)";

pub struct Authorizer {
    http: reqwest::Client,
    registry: String,
    repository: String,
    insecure: bool,
    login: Login,
    /// Held across a token fetch, so that requests that meet the same 401
    /// wait for one fetch instead of making their own.
    state: tokio::sync::Mutex<State>,
    /// Every token fetched, for redaction; never held across an await.
    fetched: std::sync::Mutex<Vec<String>>,
}

struct State {
    header: Option<HeaderValue>,
    /// Changes with `header`: a 401 to an older one is already answered.
    generation: u64,
}

/// The `Authorization` one request is sent with, to report its 401 against.
#[derive(Debug, Clone)]
pub struct Sent {
    pub header: Option<HeaderValue>,
    generation: u64,
}

impl Authorizer {
    pub fn new(http: reqwest::Client, endpoint: &Endpoint, login: Login) -> Authorizer {
        let header = match &login {
            // `Credentials::login` let only a valid header value through.
            Login::RegistryToken(token) => bearer(token),
            _ => None,
        };
        Authorizer {
            http,
            registry: endpoint.host.clone(),
            repository: endpoint.repository.clone(),
            insecure: endpoint.insecure,
            login,
            state: tokio::sync::Mutex::new(State {
                header,
                generation: 0,
            }),
            fetched: std::sync::Mutex::default(),
        }
    }

    /// What the next request carries.
    pub async fn authorization(&self) -> Sent {
        let state = self.state.lock().await;
        Sent {
            header: state.header.clone(),
            generation: state.generation,
        }
    }

    /// The registry answered a request sent with `sent` by 401, with these
    /// `WWW-Authenticate` values. `Ok(true)`: send it again with
    /// [`Self::authorization`]. `Ok(false)`: nothing berth holds would
    /// change the answer (no credentials, or the ones just sent).
    pub async fn unauthorized(
        &self,
        sent: &Sent,
        challenges: &[String],
    ) -> Result<bool, TokenError> {
        let mut state = self.state.lock().await;
        if state.generation != sent.generation {
            return Ok(true);
        }
        let challenge_err = |message: String| TokenError::Challenge {
            registry: self.registry.clone(),
            message,
        };
        let challenge = token::parse_challenges(challenges.iter().map(String::as_str))
            .map_err(challenge_err)?;
        let header = match challenge {
            None => return Ok(false),
            Some(Challenge::Basic) => match &self.login {
                // containerd refuses basic auth without both.
                Login::Password { username, password } if !password.is_empty() => {
                    basic(username, password)
                }
                Login::IdentityToken(_) => return Err(challenge_err(BASIC_ONLY.to_string())),
                Login::Password { .. } | Login::Anonymous | Login::RegistryToken(_) => {
                    return Ok(false);
                }
            },
            Some(Challenge::Bearer(challenge)) => {
                let grant = match &self.login {
                    // containerd asks for an anonymous token when there is
                    // no secret, also for a username without a password.
                    Login::Anonymous => Grant::Anonymous,
                    Login::Password { password, .. } if password.is_empty() => Grant::Anonymous,
                    Login::Password { username, password } => Grant::Password {
                        username: username.clone(),
                        password: password.clone(),
                    },
                    Login::IdentityToken(token) => Grant::RefreshToken(token.clone()),
                    // Sent from the first request on; there is no other.
                    Login::RegistryToken(_) => return Ok(false),
                };
                let token = token::fetch_token(
                    &self.http,
                    &self.registry,
                    self.insecure,
                    &self.repository,
                    &challenge,
                    &grant,
                )
                .await?;
                self.fetched
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(token.clone());
                bearer(&token).ok_or_else(|| {
                    challenge_err(format!(
                        "the token service {} answered with a token that is not a valid header value",
                        challenge.realm
                    ))
                })?
            }
        };
        // The very answer the registry just refused: sending it again
        // would be refused again.
        if sent.header.as_ref() == Some(&header) {
            return Ok(false);
        }
        state.header = Some(header);
        state.generation += 1;
        Ok(true)
    }

    /// Whether the pull presents any credentials, for saying why a
    /// registry refused it.
    pub fn has_credentials(&self) -> bool {
        !matches!(self.login, Login::Anonymous)
    }

    /// `text` without the login's secrets or the tokens fetched with them:
    /// registries may quote requests.
    pub fn redact(&self, text: &str) -> String {
        let mut secrets = self.login.secrets();
        secrets.extend(
            self.fetched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        redact(text, &secrets)
    }
}

/// `None` for a token that cannot be a header value (a control
/// character in it).
fn bearer(token: &str) -> Option<HeaderValue> {
    sensitive(&format!("Bearer {token}"))
}

fn basic(username: &str, password: &str) -> HeaderValue {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    sensitive(&format!("Basic {encoded}")).expect("base64 is a valid header value")
}

/// A header value hyper and reqwest keep out of their debug output.
fn sensitive(value: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(value).ok()?;
    value.set_sensitive(true);
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::http_errors::Refusal;
    use crate::image::test_http::{Server, answer, client};

    const PASSWORD: &str = "pw-3c7d1a-secret";

    fn endpoint() -> Endpoint {
        Endpoint {
            host: "registry.example".to_string(),
            repository: "team/app".to_string(),
            insecure: true,
            is_mirror: false,
        }
    }

    fn password() -> Login {
        Login::Password {
            username: "alice".to_string(),
            password: PASSWORD.to_string(),
        }
    }

    fn bearer_challenge(realm: &str) -> Vec<String> {
        vec![format!(
            r#"Bearer realm="{realm}",service="registry.example",scope="repository:team/app:pull""#
        )]
    }

    fn header(sent: &Sent) -> Option<&str> {
        sent.header
            .as_ref()
            .map(|h| h.to_str().expect("ASCII header"))
    }

    #[tokio::test]
    async fn nothing_is_sent_until_a_challenge_names_a_token_service() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(200, r#"{"access_token":"tok-1"}"#)]);
        let authorizer = Authorizer::new(client(), &endpoint(), password());
        let first = authorizer.authorization().await;
        assert_eq!(header(&first), None);
        let retry = authorizer
            .unauthorized(&first, &bearer_challenge(&realm))
            .await
            .expect("a token");
        assert!(retry);
        assert_eq!(
            header(&authorizer.authorization().await),
            Some("Bearer tok-1")
        );
        let received = served.await.expect("server");
        assert_eq!(received[0].method, "POST");
        assert_eq!(received[0].form["grant_type"], "password");
        assert_eq!(received[0].form["scope"], "repository:team/app:pull");
    }

    #[tokio::test]
    async fn an_expired_token_is_renewed_once_for_every_request_that_met_it() {
        let server = Server::start().await;
        let realm = server.url("/token");
        // Exactly two answers: a third token request would find no server.
        let served = server.serve(vec![
            answer(200, r#"{"access_token":"tok-1"}"#),
            answer(200, r#"{"access_token":"tok-2"}"#),
        ]);
        let authorizer = Authorizer::new(client(), &endpoint(), password());
        let bare = authorizer.authorization().await;
        assert!(
            authorizer
                .unauthorized(&bare, &bearer_challenge(&realm))
                .await
                .expect("first token")
        );
        let expired = authorizer.authorization().await;
        assert_eq!(header(&expired), Some("Bearer tok-1"));
        // Three requests sent with tok-1 meet its expiry at once.
        let challenge = bearer_challenge(&realm);
        let (a, b, c) = tokio::join!(
            authorizer.unauthorized(&expired, &challenge),
            authorizer.unauthorized(&expired, &challenge),
            authorizer.unauthorized(&expired, &challenge),
        );
        for retry in [a, b, c] {
            assert!(retry.expect("renewed"), "each request is sent again");
        }
        assert_eq!(
            header(&authorizer.authorization().await),
            Some("Bearer tok-2")
        );
        let received = served.await.expect("server");
        assert_eq!(received.len(), 2, "one renewal: {received:?}");
        // A 401 to a token already replaced asks for nothing more.
        assert!(
            authorizer
                .unauthorized(&expired, &challenge)
                .await
                .expect("already renewed")
        );
    }

    #[tokio::test]
    async fn the_same_token_again_is_no_answer() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![
            answer(200, r#"{"access_token":"tok-1"}"#),
            answer(200, r#"{"access_token":"tok-1"}"#),
        ]);
        let authorizer = Authorizer::new(client(), &endpoint(), password());
        let bare = authorizer.authorization().await;
        let challenge = bearer_challenge(&realm);
        assert!(
            authorizer
                .unauthorized(&bare, &challenge)
                .await
                .expect("token")
        );
        let sent = authorizer.authorization().await;
        assert!(
            !authorizer
                .unauthorized(&sent, &challenge)
                .await
                .expect("answered"),
            "tok-1 was just refused"
        );
        served.await.expect("server");
    }

    #[tokio::test]
    async fn a_refused_token_request_is_an_error_that_says_so() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![
            answer(
                401,
                &format!(
                    r#"{{"error":"invalid_grant","error_description":"bad password {PASSWORD}"}}"#
                ),
            ),
            answer(
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
            ),
        ]);
        let authorizer = Authorizer::new(client(), &endpoint(), password());
        let bare = authorizer.authorization().await;
        let err = authorizer
            .unauthorized(&bare, &bearer_challenge(&realm))
            .await
            .expect_err("refused");
        assert_eq!(err.refusal(), Some(Refusal::Unauthenticated));
        let text = err.to_string();
        assert!(text.contains("registry.example"), "{text}");
        assert!(text.contains("bad credentials (UNAUTHORIZED)"), "{text}");
        assert!(!text.contains(PASSWORD), "{text}");
        served.await.expect("server");
    }

    #[tokio::test]
    async fn basic_challenge_gets_the_password_once() {
        let authorizer = Authorizer::new(client(), &endpoint(), password());
        let basic_challenge = vec![r#"Basic realm="registry""#.to_string()];
        let bare = authorizer.authorization().await;
        assert!(
            authorizer
                .unauthorized(&bare, &basic_challenge)
                .await
                .expect("basic")
        );
        let sent = authorizer.authorization().await;
        let expected =
            base64::engine::general_purpose::STANDARD.encode(format!("alice:{PASSWORD}"));
        assert_eq!(header(&sent), Some(format!("Basic {expected}").as_str()));
        assert!(
            sent.header.as_ref().is_some_and(HeaderValue::is_sensitive),
            "kept out of debug output"
        );
        assert!(
            !authorizer
                .unauthorized(&sent, &basic_challenge)
                .await
                .expect("refused")
        );
    }

    #[tokio::test]
    async fn what_cannot_answer_a_challenge_asks_for_nothing() {
        let basic_challenge = vec![r#"Basic realm="registry""#.to_string()];
        // Nothing listens on port 9: a token request would be an error.
        let closed = bearer_challenge("http://127.0.0.1:9/token");
        let username_only = Login::Password {
            username: "alice".to_string(),
            password: String::new(),
        };
        for login in [Login::Anonymous, username_only] {
            let authorizer = Authorizer::new(client(), &endpoint(), login);
            let bare = authorizer.authorization().await;
            assert!(
                !authorizer
                    .unauthorized(&bare, &basic_challenge)
                    .await
                    .expect("no")
            );
            assert!(
                !authorizer
                    .unauthorized(&bare, &[])
                    .await
                    .expect("no challenge")
            );
        }
        let registry_token =
            Authorizer::new(client(), &endpoint(), Login::RegistryToken("rt".into()));
        let sent = registry_token.authorization().await;
        assert_eq!(
            header(&sent),
            Some("Bearer rt"),
            "sent before any challenge"
        );
        assert!(
            !registry_token
                .unauthorized(&sent, &closed)
                .await
                .expect("no renewal")
        );

        let identity = Authorizer::new(client(), &endpoint(), Login::IdentityToken("idt".into()));
        let bare = identity.authorization().await;
        let err = identity
            .unauthorized(&bare, &basic_challenge)
            .await
            .expect_err("an identity token is no password");
        assert!(err.to_string().contains("basic auth"), "{err}");
    }

    #[tokio::test]
    async fn anonymous_pulls_get_an_anonymous_token() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(200, r#"{"token":"anon-1"}"#)]);
        let authorizer = Authorizer::new(client(), &endpoint(), Login::Anonymous);
        let bare = authorizer.authorization().await;
        assert!(
            authorizer
                .unauthorized(&bare, &bearer_challenge(&realm))
                .await
                .expect("anonymous token")
        );
        assert_eq!(
            header(&authorizer.authorization().await),
            Some("Bearer anon-1")
        );
        let received = served.await.expect("server");
        assert_eq!(received[0].method, "GET");
        assert!(!received[0].headers.contains_key("authorization"));
    }

    #[tokio::test]
    async fn redaction_covers_the_login_and_the_tokens_fetched() {
        let server = Server::start().await;
        let realm = server.url("/token");
        let served = server.serve(vec![answer(200, r#"{"access_token":"tok-5a1d"}"#)]);
        let authorizer = Authorizer::new(client(), &endpoint(), password());
        let bare = authorizer.authorization().await;
        assert!(
            authorizer
                .unauthorized(&bare, &bearer_challenge(&realm))
                .await
                .expect("token")
        );
        served.await.expect("server");
        assert_eq!(
            authorizer.redact(&format!("no {PASSWORD} here, nor tok-5a1d")),
            "no <redacted> here, nor <redacted>"
        );
        assert!(authorizer.has_credentials());
        assert!(!Authorizer::new(client(), &endpoint(), Login::Anonymous).has_credentials());
    }
}
