//! The names berth gives pods and containers, how clients may shorten them,
//! and the clock CRI timestamps use.

use std::io::Read;

/// Nanoseconds since the epoch, as CRI timestamps are.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// 64 random hex characters, as container runtimes name things.
pub fn new_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What an id or id prefix names among `items`.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    NotFound,
    /// The prefix names several; their ids, comma-separated.
    Ambiguous(String),
}

/// The item whose id is `id`, or the only one whose id starts with it
/// (crictl and kubelet users type short ids).
pub fn find_by_prefix<T: Clone>(items: &[T], id: &str, id_of: impl Fn(&T) -> &str) -> Lookup<T> {
    if let Some(exact) = items.iter().find(|i| id_of(i) == id) {
        return Lookup::Found(exact.clone());
    }
    let matches: Vec<&T> = items.iter().filter(|i| id_of(i).starts_with(id)).collect();
    match matches.as_slice() {
        [] => Lookup::NotFound,
        [one] => Lookup::Found((*one).clone()),
        many => Lookup::Ambiguous(many.iter().map(|i| id_of(i)).collect::<Vec<_>>().join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_hex_and_differ() {
        let (a, b) = (new_id().expect("id"), new_id().expect("id"));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn prefixes_find_one_or_say_why_not() {
        let items = vec!["abc1".to_string(), "abc2".to_string(), "def".to_string()];
        assert_eq!(
            find_by_prefix(&items, "d", String::as_str),
            Lookup::Found("def".to_string())
        );
        assert_eq!(
            find_by_prefix(&items, "abc1", String::as_str),
            Lookup::Found("abc1".to_string())
        );
        assert_eq!(
            find_by_prefix(&items, "x", String::as_str),
            Lookup::NotFound
        );
        assert_eq!(
            find_by_prefix(&items, "abc", String::as_str),
            Lookup::Ambiguous("abc1, abc2".to_string())
        );
    }
}
