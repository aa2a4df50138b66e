//! The metadata of one tar entry as we apply it: permission bits, owner,
//! modification time and extended attributes, gathered from the header and
//! its PAX records, with image-supplied values we refuse filtered out.

use std::io::Read;

use rustix::fs::{Gid, Mode, Timespec, Uid};

use super::UnpackError;

const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
const PAX_SPARSE_PREFIX: &[u8] = b"GNU.sparse.";

/// Xattr namespaces that overlayfs reads as instructions (whiteouts,
/// opaque dirs, redirects, metacopy). Only berth may write them: an image
/// that carries them could hide or redirect files of lower layers in ways
/// the layer's own entries do not show. `user.overlay.` is what overlayfs
/// uses when mounted with `userxattr`.
const OVERLAY_XATTR_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

/// One extended attribute to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Xattr {
    pub(super) name: Vec<u8>,
    pub(super) value: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct Meta {
    pub(super) mode: Mode,
    pub(super) uid: Uid,
    pub(super) gid: Gid,
    pub(super) mtime: Timespec,
    pub(super) xattrs: Vec<Xattr>,
}

impl Meta {
    /// Reads the metadata of `entry`; `shown` is its name for messages.
    pub(super) fn read<R: Read>(
        entry: &mut tar::Entry<'_, R>,
        shown: &str,
    ) -> Result<Meta, UnpackError> {
        let header = entry.header();
        let invalid = |what: &str, error: std::io::Error| UnpackError::Invalid {
            entry: shown.to_string(),
            reason: format!("bad {what} in header: {error}"),
        };
        let mode = header.mode().map_err(|e| invalid("mode", e))? & 0o7777;
        let uid = owner_id(header.uid().map_err(|e| invalid("uid", e))?, "uid", shown)?;
        let gid = owner_id(header.gid().map_err(|e| invalid("gid", e))?, "gid", shown)?;
        let seconds = header.mtime().map_err(|e| invalid("mtime", e))?;
        let mut mtime = Timespec {
            tv_sec: i64::try_from(seconds).unwrap_or(i64::MAX),
            tv_nsec: 0,
        };

        // The tar crate applies PAX path, linkpath, size, uid and gid; the
        // rest is ours to read.
        let mut xattrs = Vec::new();
        let pax = entry
            .pax_extensions()
            .map_err(|error| UnpackError::Invalid {
                entry: shown.to_string(),
                reason: format!("bad pax header: {error}"),
            })?;
        for record in pax.into_iter().flatten() {
            let record = record.map_err(|error| UnpackError::Invalid {
                entry: shown.to_string(),
                reason: format!("bad pax record: {error}"),
            })?;
            let key = record.key_bytes();
            if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if is_overlay_xattr(name) {
                    tracing::warn!(
                        entry = shown,
                        xattr = %String::from_utf8_lossy(name),
                        "layer entry carries an overlayfs xattr; not applied"
                    );
                    continue;
                }
                xattrs.push(Xattr {
                    name: name.to_vec(),
                    value: record.value_bytes().to_vec(),
                });
            } else if key == b"mtime" {
                match parse_pax_time(record.value_bytes()) {
                    Some(time) => mtime = time,
                    None => tracing::warn!(
                        entry = shown,
                        value = %String::from_utf8_lossy(record.value_bytes()),
                        "layer entry has an unparsable pax mtime; using the header's"
                    ),
                }
            } else if key.starts_with(PAX_SPARSE_PREFIX) {
                // The tar crate reads only GNU (old) sparse headers; taking a
                // PAX sparse file as a plain one would write its sparse map
                // as file contents under a mangled name.
                return Err(UnpackError::Invalid {
                    entry: shown.to_string(),
                    reason: "pax sparse files are not supported".to_string(),
                });
            }
        }

        Ok(Meta {
            mode: Mode::from_raw_mode(mode),
            uid: Uid::from_raw_unchecked(uid),
            gid: Gid::from_raw_unchecked(gid),
            mtime,
            xattrs,
        })
    }
}

/// An owner ID from the header: `u32::MAX` is refused because to `chown` it
/// means "leave unchanged", which would silently keep the file root-owned.
fn owner_id(id: u64, what: &str, shown: &str) -> Result<u32, UnpackError> {
    match u32::try_from(id) {
        Ok(id) if id != u32::MAX => Ok(id),
        _ => Err(UnpackError::Invalid {
            entry: shown.to_string(),
            reason: format!("{what} {id} is out of range"),
        }),
    }
}

pub(super) fn is_overlay_xattr(name: &[u8]) -> bool {
    OVERLAY_XATTR_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// Parses a PAX time: decimal seconds since the epoch, optionally negative,
/// with an optional fraction (any number of digits, cut to nanoseconds).
pub(super) fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: i64 = whole.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in fraction.bytes().take(9).enumerate() {
        nanos += i64::from(digit - b'0') * 10_i64.pow(8 - i as u32);
    }
    Some(if !negative {
        Timespec {
            tv_sec: seconds,
            tv_nsec: nanos,
        }
    } else if nanos == 0 {
        Timespec {
            tv_sec: -seconds,
            tv_nsec: 0,
        }
    } else {
        // -1.25 s is 2 s before the epoch plus 0.75 s.
        Timespec {
            tv_sec: -seconds - 1,
            tv_nsec: 1_000_000_000 - nanos,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(value: &str) -> Option<(i64, i64)> {
        parse_pax_time(value.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec))
    }

    #[test]
    fn pax_times_parse_with_and_without_fractions() {
        assert_eq!(time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(time("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(time("1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(time("0.000000001"), Some((0, 1)));
        assert_eq!(time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(time("-3"), Some((-3, 0)));
        assert_eq!(time("12."), Some((12, 0)));
    }

    #[test]
    fn bad_pax_times_are_refused() {
        for bad in [
            "",
            "-",
            ".5",
            "1e9",
            "1.2.3",
            "abc",
            "1.x",
            "99999999999999999999",
        ] {
            assert_eq!(time(bad), None, "{bad}");
        }
    }

    #[test]
    fn overlay_xattrs_are_recognized() {
        assert!(is_overlay_xattr(b"trusted.overlay.opaque"));
        assert!(is_overlay_xattr(b"trusted.overlay.redirect"));
        assert!(is_overlay_xattr(b"user.overlay.whiteout"));
        assert!(!is_overlay_xattr(b"security.capability"));
        assert!(!is_overlay_xattr(b"user.mime_type"));
        assert!(!is_overlay_xattr(b"trusted.other"));
    }

    #[test]
    fn owner_ids_must_fit_and_not_mean_unchanged() {
        assert_eq!(owner_id(1000, "uid", "f").ok(), Some(1000));
        assert!(owner_id(u64::from(u32::MAX), "uid", "f").is_err());
        assert!(owner_id(1 << 40, "gid", "f").is_err());
    }
}
