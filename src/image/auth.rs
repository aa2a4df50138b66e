//! Registry credentials: the CRI `AuthConfig` kubelet sends with a pull, and
//! a docker-style `auth.json` from the config for everything else.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// `auth.json` is small; a huge one is a mistake, not credentials.
const MAX_AUTH_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth for {registry}: `auth` is not base64 of \"user:password\"")]
    BadAuthField { registry: String },
    #[error(
        "auth for {registry}: identity tokens (OAuth refresh tokens) are not supported yet; pass username/password or a registry token"
    )]
    IdentityToken { registry: String },
    #[error("auth file {path}: {message}")]
    File { path: String, message: String },
}

/// Credentials as a CRI client gives them, free of protobuf types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// base64 of `user:password`, as in docker's config.
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl Credentials {
    pub fn is_empty(&self) -> bool {
        self == &Credentials::default()
    }

    /// The credentials as the registry client takes them.
    pub fn to_registry_auth(&self, registry: &str) -> Result<RegistryAuth, AuthError> {
        if !self.registry_token.is_empty() {
            return Ok(RegistryAuth::Bearer(self.registry_token.clone()));
        }
        if !self.username.is_empty() || !self.password.is_empty() {
            return Ok(RegistryAuth::Basic(
                self.username.clone(),
                self.password.clone(),
            ));
        }
        if !self.auth.is_empty() {
            let bad = || AuthError::BadAuthField {
                registry: registry.to_string(),
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .map_err(|_| bad())?;
            let text = String::from_utf8(decoded).map_err(|_| bad())?;
            let (user, password) = text.split_once(':').ok_or_else(bad)?;
            return Ok(RegistryAuth::Basic(user.to_string(), password.to_string()));
        }
        if !self.identity_token.is_empty() {
            return Err(AuthError::IdentityToken {
                registry: registry.to_string(),
            });
        }
        Ok(RegistryAuth::Anonymous)
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

    #[test]
    fn cri_credentials_map_to_the_registry_flows() {
        let token = Credentials {
            registry_token: "t".into(),
            ..Credentials::default()
        };
        assert!(matches!(token.to_registry_auth("r"), Ok(RegistryAuth::Bearer(t)) if t == "t"));
        let basic = Credentials {
            username: "u".into(),
            password: "p".into(),
            ..Credentials::default()
        };
        assert!(
            matches!(basic.to_registry_auth("r"), Ok(RegistryAuth::Basic(u, p)) if u == "u" && p == "p")
        );
        let auth = Credentials {
            auth: base64::engine::general_purpose::STANDARD.encode("me:secret:with:colons"),
            ..Credentials::default()
        };
        assert!(
            matches!(auth.to_registry_auth("r"), Ok(RegistryAuth::Basic(u, p)) if u == "me" && p == "secret:with:colons")
        );
        let bad = Credentials {
            auth: "!!!".into(),
            ..Credentials::default()
        };
        assert!(matches!(
            bad.to_registry_auth("r"),
            Err(AuthError::BadAuthField { .. })
        ));
        assert!(matches!(
            Credentials::default().to_registry_auth("r"),
            Ok(RegistryAuth::Anonymous)
        ));
        let identity = Credentials {
            identity_token: "x".into(),
            ..Credentials::default()
        };
        assert!(matches!(
            identity.to_registry_auth("r"),
            Err(AuthError::IdentityToken { .. })
        ));
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
