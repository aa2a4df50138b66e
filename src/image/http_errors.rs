//! How a remote HTTP failure reads in berth's errors: what a registry or a
//! token service said in its error body, and a transport error with its
//! causes. Shared by the pull and the token exchange so that both quote a
//! server the same way.

/// How a registry or its token service turned a pull away, as far as its
/// status says: the one thing about an HTTP failure the gRPC code reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 401: who the client is (nobody, or the credentials sent) is not
    /// accepted.
    Unauthenticated,
    /// 403: the client is known and may not pull this.
    Denied,
}

impl Refusal {
    pub fn of_status(status: u16) -> Option<Refusal> {
        match status {
            401 => Some(Refusal::Unauthenticated),
            403 => Some(Refusal::Denied),
            _ => None,
        }
    }
}

/// The messages of an error body, or the start of the body. Registries
/// answer `{"errors":[{"code","message"}]}` (distribution spec); OAuth2
/// token services `{"error","error_description"}` (RFC 6749 §5.2).
pub fn registry_errors(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    #[derive(serde::Deserialize)]
    struct OAuthError {
        error: String,
        #[serde(default)]
        error_description: String,
    }
    if let Ok(errors) = serde_json::from_slice::<Errors>(body)
        && !errors.errors.is_empty()
    {
        return errors
            .errors
            .iter()
            .map(|e| format!("{} ({})", e.message, e.code))
            .collect::<Vec<_>>()
            .join("; ");
    }
    if let Ok(oauth) = serde_json::from_slice::<OAuthError>(body) {
        return if oauth.error_description.is_empty() {
            oauth.error
        } else {
            format!("{} ({})", oauth.error_description, oauth.error)
        };
    }
    String::from_utf8_lossy(&body[..body.len().min(256)])
        .trim()
        .to_string()
}

/// An error with its causes, so "error sending request" says why.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_401_and_403_are_refusals() {
        assert_eq!(Refusal::of_status(401), Some(Refusal::Unauthenticated));
        assert_eq!(Refusal::of_status(403), Some(Refusal::Denied));
        for status in [200, 400, 404, 405, 429, 500] {
            assert_eq!(Refusal::of_status(status), None, "{status}");
        }
    }

    #[test]
    fn error_bodies_of_registries_and_token_services_are_quoted() {
        assert_eq!(
            registry_errors(
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"},{"code":"DENIED","message":"no"}]}"#
            ),
            "authentication required (UNAUTHORIZED); no (DENIED)"
        );
        assert_eq!(
            registry_errors(br#"{"error":"invalid_grant","error_description":"token expired"}"#),
            "token expired (invalid_grant)"
        );
        assert_eq!(
            registry_errors(br#"{"error":"invalid_request"}"#),
            "invalid_request"
        );
        assert_eq!(registry_errors(b"  plain text\n"), "plain text");
        assert_eq!(registry_errors(&[b'x'; 1000]).len(), 256);
    }
}
