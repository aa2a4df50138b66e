//! Registry credentials: the CRI `AuthConfig` kubelet sends with a pull, and
//! a docker-style `auth.json` from the config for everything else. Which
//! field wins follows containerd's CRI `ParseAuth`; what is sent, and when,
//! is `authorizer.rs`'s business.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

/// `auth.json` is small; a huge one is a mistake, not credentials.
const MAX_AUTH_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth for {registry}: `auth` is not base64 of \"user:password\"")]
    BadAuthField { registry: String },
    #[error("auth for {registry}: a password was given without a username")]
    PasswordWithoutUsername { registry: String },
    #[error("auth for {registry}: the registry token has characters no HTTP header may carry")]
    BadRegistryToken { registry: String },
    #[error("auth file {path}: {message}")]
    File { path: String, message: String },
}

/// Credentials as a CRI client gives them, free of protobuf types.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// base64 of `user:password`, as in docker's config.
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

/// Secrets stay out of logs and panics: only which fields are set shows.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |field: &String| if field.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &set(&self.password))
            .field("auth", &set(&self.auth))
            .field("identity_token", &set(&self.identity_token))
            .field("registry_token", &set(&self.registry_token))
            .finish()
    }
}

/// How a pull authenticates, before any exchange with the registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Login {
    Anonymous,
    /// Basic auth when the registry asks for it, the OAuth2 password grant
    /// (or the token GET with basic auth) when it names a token service.
    /// The username is never empty.
    Password {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token, traded for an access token at the
    /// registry's token service.
    IdentityToken(String),
    /// A bearer token for the registry itself, sent as it is.
    RegistryToken(String),
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Login::Anonymous => f.write_str("Anonymous"),
            Login::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Login::IdentityToken(_) => f.debug_tuple("IdentityToken").field(&"<redacted>").finish(),
            Login::RegistryToken(_) => f.debug_tuple("RegistryToken").field(&"<redacted>").finish(),
        }
    }
}

impl Login {
    /// The secrets in this login, as they could show up in an answer that
    /// quotes a request: each one, and basic auth's base64 of both.
    pub fn secrets(&self) -> Vec<String> {
        match self {
            Login::Anonymous => Vec::new(),
            Login::Password { username, password } if !password.is_empty() => vec![
                password.clone(),
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}")),
            ],
            Login::Password { .. } => Vec::new(),
            Login::IdentityToken(token) => vec![
                token.clone(),
                base64::engine::general_purpose::STANDARD.encode(format!(":{token}")),
            ],
            Login::RegistryToken(token) => vec![token.clone()],
        }
    }
}

/// `text` with every one of `secrets` replaced: a server may quote what it
/// was sent.
pub fn redact(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .fold(text.to_string(), |text, secret| {
            text.replace(secret.as_str(), "<redacted>")
        })
}

impl Credentials {
    pub fn is_empty(&self) -> bool {
        self == &Credentials::default()
    }

    /// How to authenticate with these credentials. The order is
    /// containerd's `ParseAuth` (username, identity token, `auth`), with
    /// the registry token, which containerd does not support, first. A
    /// password without a username is refused where containerd drops it
    /// silently: with a token service it would otherwise go out as a
    /// refresh token.
    pub fn login(&self, registry: &str) -> Result<Login, AuthError> {
        if !self.registry_token.is_empty() {
            // A bearer token is token68 (RFC 7235), printable ASCII.
            if !self.registry_token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(AuthError::BadRegistryToken {
                    registry: registry.to_string(),
                });
            }
            return Ok(Login::RegistryToken(self.registry_token.clone()));
        }
        let password = |username: &str, password: &str| {
            if username.is_empty() {
                return Err(AuthError::PasswordWithoutUsername {
                    registry: registry.to_string(),
                });
            }
            Ok(Login::Password {
                username: username.to_string(),
                password: password.to_string(),
            })
        };
        if !self.username.is_empty() || !self.password.is_empty() {
            return password(&self.username, &self.password);
        }
        // Before `auth`: docker writes an identity token beside an `auth`
        // of "<user>:" with no password, which no registry would take.
        if !self.identity_token.is_empty() {
            return Ok(Login::IdentityToken(self.identity_token.clone()));
        }
        if !self.auth.is_empty() {
            let bad = || AuthError::BadAuthField {
                registry: registry.to_string(),
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .map_err(|_| bad())?;
            let text = String::from_utf8(decoded).map_err(|_| bad())?;
            let (user, secret) = text.split_once(':').ok_or_else(bad)?;
            return password(user, secret);
        }
        Ok(Login::Anonymous)
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
    #[serde(default, rename = "registrytoken")]
    registry_token: String,
}

/// The credentials of a docker-style auth file, by registry host.
#[derive(Debug, Clone, Default)]
pub struct AuthStore {
    by_host: BTreeMap<String, Credentials>,
}

impl AuthStore {
    /// Reads `path`; an empty path means no file.
    pub fn load(path: &Path) -> Result<AuthStore, AuthError> {
        if path.as_os_str().is_empty() {
            return Ok(AuthStore::default());
        }
        let file_err = |message: String| AuthError::File {
            path: path.display().to_string(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| file_err(format!("stat: {e}")))?;
        if meta.len() > MAX_AUTH_FILE_BYTES {
            return Err(file_err(format!("larger than {MAX_AUTH_FILE_BYTES} bytes")));
        }
        let bytes = std::fs::read(path).map_err(|e| file_err(format!("read: {e}")))?;
        Self::parse(&bytes).map_err(file_err)
    }

    fn parse(bytes: &[u8]) -> Result<AuthStore, String> {
        let file: AuthFile =
            serde_json::from_slice(bytes).map_err(|e| format!("not an auth.json: {e}"))?;
        let by_host = file
            .auths
            .into_iter()
            .map(|(key, entry)| {
                (
                    normalize_host(&key),
                    Credentials {
                        username: entry.username,
                        password: entry.password,
                        auth: entry.auth,
                        identity_token: entry.identity_token,
                        registry_token: entry.registry_token,
                    },
                )
            })
            .collect();
        Ok(AuthStore { by_host })
    }

    /// The credentials for `host` (a reference's domain or a mirror host).
    pub fn get(&self, host: &str) -> Option<&Credentials> {
        self.by_host.get(&normalize_host(host))
    }
}

/// auth.json keys come as `https://index.docker.io/v1/`, `docker.io`,
/// `quay.io`, `http://localhost:5000`; they all name a host.
fn normalize_host(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password(username: &str, password: &str) -> Login {
        Login::Password {
            username: username.to_string(),
            password: password.to_string(),
        }
    }

    #[test]
    fn cri_credentials_map_to_the_registry_flows() {
        let token = Credentials {
            registry_token: "t".into(),
            ..Credentials::default()
        };
        assert_eq!(
            token.login("r").expect("registry token"),
            Login::RegistryToken("t".into())
        );
        let basic = Credentials {
            username: "u".into(),
            password: "p".into(),
            ..Credentials::default()
        };
        assert_eq!(basic.login("r").expect("password"), password("u", "p"));
        let auth = Credentials {
            auth: base64::engine::general_purpose::STANDARD.encode("me:secret:with:colons"),
            ..Credentials::default()
        };
        assert_eq!(
            auth.login("r").expect("auth"),
            password("me", "secret:with:colons")
        );
        let bad = Credentials {
            auth: "!!!".into(),
            ..Credentials::default()
        };
        assert!(matches!(
            bad.login("r"),
            Err(AuthError::BadAuthField { .. })
        ));
        assert_eq!(
            Credentials::default().login("r").expect("anonymous"),
            Login::Anonymous
        );
        let identity = Credentials {
            identity_token: "x".into(),
            ..Credentials::default()
        };
        assert_eq!(
            identity.login("r").expect("identity token"),
            Login::IdentityToken("x".into())
        );
    }

    #[test]
    fn a_registry_token_must_fit_in_a_header() {
        let broken = Credentials {
            registry_token: "abc\r\nX-Injected: 1".into(),
            ..Credentials::default()
        };
        assert!(matches!(
            broken.login("r"),
            Err(AuthError::BadRegistryToken { .. })
        ));
    }

    #[test]
    fn a_password_needs_a_username() {
        let bare = Credentials {
            password: "p".into(),
            ..Credentials::default()
        };
        let no_user_in_auth = Credentials {
            auth: base64::engine::general_purpose::STANDARD.encode(":p"),
            ..Credentials::default()
        };
        for credentials in [bare, no_user_in_auth] {
            let err = credentials.login("r.example").expect_err("no username");
            assert!(
                matches!(err, AuthError::PasswordWithoutUsername { ref registry } if registry == "r.example"),
                "{err}"
            );
        }
        // A username alone is a login without a secret, as in containerd.
        let user_only = Credentials {
            username: "u".into(),
            ..Credentials::default()
        };
        assert_eq!(user_only.login("r").expect("username"), password("u", ""));
    }

    #[test]
    fn identity_token_wins_over_auth_and_loses_to_a_username_as_in_containerd() {
        // What `docker login` to ACR writes: `auth` is "<user>:" with no
        // password, the identity token is the credential.
        let docker_acr = Credentials {
            auth: base64::engine::general_purpose::STANDARD
                .encode("00000000-0000-0000-0000-000000000000:"),
            identity_token: "refresh".into(),
            ..Credentials::default()
        };
        assert_eq!(
            docker_acr.login("r").expect("login"),
            Login::IdentityToken("refresh".into())
        );
        let with_user = Credentials {
            username: "u".into(),
            password: "p".into(),
            identity_token: "refresh".into(),
            ..Credentials::default()
        };
        assert_eq!(with_user.login("r").expect("login"), password("u", "p"));
    }

    #[test]
    fn redaction_removes_every_secret_of_a_login_and_its_basic_form() {
        let login = password("alice", "hunter2");
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:hunter2");
        let text = format!("got hunter2 in Basic {basic}, twice: hunter2");
        let redacted = redact(&text, &login.secrets());
        assert_eq!(
            redacted,
            "got <redacted> in Basic <redacted>, twice: <redacted>"
        );
        assert_eq!(redact("nothing", &Login::Anonymous.secrets()), "nothing");
        // An empty password is no secret: redacting "" would mangle text.
        assert_eq!(redact("abc", &password("u", "").secrets()), "abc");
    }

    #[test]
    fn debug_output_names_no_secret() {
        let credentials = Credentials {
            username: "user".into(),
            password: "hunter2".into(),
            auth: "YXV0aA==".into(),
            identity_token: "refresh-secret".into(),
            registry_token: "bearer-secret".into(),
        };
        let text = format!(
            "{credentials:?} {:?} {:?} {:?}",
            Login::IdentityToken("refresh-secret".into()),
            Login::RegistryToken("bearer-secret".into()),
            password("user", "hunter2"),
        );
        for secret in ["hunter2", "YXV0aA==", "refresh-secret", "bearer-secret"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(text.contains("user"), "{text}");
    }

    #[test]
    fn auth_file_keys_are_normalized_to_hosts() {
        let store = AuthStore::parse(
            br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"http://localhost:5000":{"username":"a","password":"b"}}}"#,
        )
        .expect("parse");
        assert_eq!(store.get("docker.io").expect("hub").auth, "dTpw");
        assert_eq!(
            store
                .get("registry-1.docker.io")
                .expect("hub api host")
                .auth,
            "dTpw"
        );
        assert_eq!(store.get("localhost:5000").expect("local").username, "a");
        assert!(store.get("quay.io").is_none());
        let acr = AuthStore::parse(
            br#"{"auths":{"example.azurecr.io":{"auth":"MDAwMDAwMDA6","identitytoken":"refresh"}}}"#,
        )
        .expect("parse");
        assert_eq!(
            acr.get("example.azurecr.io")
                .expect("acr")
                .login("example.azurecr.io")
                .expect("login"),
            Login::IdentityToken("refresh".into())
        );
    }

    #[test]
    fn missing_or_broken_auth_files_are_clear_errors() {
        assert!(
            AuthStore::load(Path::new(""))
                .expect("no file")
                .get("x")
                .is_none()
        );
        let err = AuthStore::load(Path::new("/nonexistent/auth.json")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/auth.json"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("auth.json");
        std::fs::write(&path, "[1,2]").expect("write");
        assert!(AuthStore::load(&path).is_err());
    }
}
