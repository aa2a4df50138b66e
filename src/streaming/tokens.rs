//! Single-use tokens for streaming URLs, as kubelet's `requestCache`: a
//! token names one cached CRI request, lives for one minute, and is gone
//! once used. At most [`MAX_IN_FLIGHT`] are outstanding.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

pub const TTL: Duration = Duration::from_secs(60);
pub const MAX_IN_FLIGHT: usize = 1000;
/// kubelet's token length: 8 URL-safe base64 characters (48 random bits).
const TOKEN_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("maximum number of in-flight streaming requests exceeded ({MAX_IN_FLIGHT})")]
    TooManyInFlight,
    #[error("generate a streaming token: {0}")]
    Random(String),
}

/// What a token stands for.
#[derive(Debug, Clone, PartialEq)]
pub enum Pending {
    Exec {
        container_id: String,
        cmd: Vec<String>,
        stdio: Stdio,
    },
    Attach {
        container_id: String,
        stdio: Stdio,
    },
    PortForward {
        pod_id: String,
        ports: Vec<u16>,
    },
}

/// The streams a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stdio {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

struct Entry {
    token: String,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    requests: HashMap<String, (Pending, Instant)>,
    /// Insertion order, oldest first, for expiry.
    order: VecDeque<Entry>,
}

#[derive(Default)]
pub struct Tokens {
    inner: Mutex<Inner>,
}

impl Tokens {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, request: Pending) -> Result<String, TokenError> {
        self.insert_at(request, Instant::now())
    }

    /// The request behind `token`, once; None if unknown, used or expired.
    pub fn consume(&self, token: &str) -> Option<Pending> {
        self.consume_at(token, Instant::now())
    }

    fn insert_at(&self, request: Pending, now: Instant) -> Result<String, TokenError> {
        let mut inner = self.lock();
        inner.expire(now);
        if inner.requests.len() >= MAX_IN_FLIGHT {
            return Err(TokenError::TooManyInFlight);
        }
        let token = loop {
            let token = random_token()?;
            if !inner.requests.contains_key(&token) {
                break token;
            }
        };
        let expires = now + TTL;
        inner.requests.insert(token.clone(), (request, expires));
        inner.order.push_back(Entry {
            token: token.clone(),
            expires,
        });
        Ok(token)
    }

    fn consume_at(&self, token: &str, now: Instant) -> Option<Pending> {
        let mut inner = self.lock();
        let (request, expires) = inner.requests.remove(token)?;
        (now <= expires).then_some(request)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves a consistent map.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn expire(&mut self, now: Instant) {
        while let Some(oldest) = self.order.front() {
            if oldest.expires >= now && self.requests.contains_key(&oldest.token) {
                return;
            }
            if let Some(entry) = self.order.pop_front()
                && entry.expires < now
            {
                self.requests.remove(&entry.token);
            }
        }
    }
}

fn random_token() -> Result<String, TokenError> {
    let mut raw = [0u8; TOKEN_LEN * 6 / 8];
    getrandom::fill(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach() -> Pending {
        Pending::Attach {
            container_id: "c".into(),
            stdio: Stdio::default(),
        }
    }

    #[test]
    fn a_token_is_used_once() {
        let tokens = Tokens::new();
        let token = tokens.insert(attach()).expect("insert");
        assert_eq!(token.len(), TOKEN_LEN);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(tokens.consume(&token), Some(attach()));
        assert_eq!(tokens.consume(&token), None);
        assert_eq!(tokens.consume("unknown"), None);
    }

    #[test]
    fn tokens_expire_after_a_minute() {
        let tokens = Tokens::new();
        let now = Instant::now();
        let token = tokens.insert_at(attach(), now).expect("insert");
        assert_eq!(
            tokens.consume_at(&token, now + TTL + Duration::from_secs(1)),
            None
        );
        let token = tokens.insert_at(attach(), now).expect("insert");
        assert!(tokens.consume_at(&token, now + TTL).is_some());
    }

    #[test]
    fn in_flight_tokens_are_bounded_until_they_expire() {
        let tokens = Tokens::new();
        let now = Instant::now();
        for _ in 0..MAX_IN_FLIGHT {
            tokens.insert_at(attach(), now).expect("insert");
        }
        assert!(matches!(
            tokens.insert_at(attach(), now),
            Err(TokenError::TooManyInFlight)
        ));
        let later = now + TTL + Duration::from_secs(1);
        tokens
            .insert_at(attach(), later)
            .expect("expired ones are gone");
        assert_eq!(tokens.lock().requests.len(), 1);
        assert_eq!(tokens.lock().order.len(), 1);
    }

    #[test]
    fn consumed_tokens_free_their_slot() {
        let tokens = Tokens::new();
        let now = Instant::now();
        let first = tokens.insert_at(attach(), now).expect("insert");
        tokens.consume_at(&first, now);
        for _ in 0..MAX_IN_FLIGHT {
            tokens.insert_at(attach(), now).expect("insert");
        }
    }
}
