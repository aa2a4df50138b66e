//! Tar entry names turned into paths relative to the layer root. Pure logic:
//! nothing here touches the filesystem, so every rule is unit-tested.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Why an entry name (or hardlink target) cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NameError {
    /// A `..` component: refused outright rather than clamped, because no
    /// image builder writes one and its only use is to reach outside.
    Escape,
    /// A NUL byte, which the kernel would silently cut the name at.
    Nul,
}

/// A normalized entry name: no leading `/` or `./`, no `.` or empty
/// components, no `..`. The empty path is the layer root itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EntryPath(PathBuf);

impl EntryPath {
    /// Normalizes a name as written in the tar header. Absolute names are
    /// taken relative to the layer root, as every container runtime does:
    /// the layer is the container's `/`.
    pub(super) fn parse(raw: &[u8]) -> Result<EntryPath, NameError> {
        if raw.contains(&0) {
            return Err(NameError::Nul);
        }
        let mut path = PathBuf::new();
        for component in raw.split(|b| *b == b'/') {
            match component {
                b"" | b"." => {}
                b".." => return Err(NameError::Escape),
                name => path.push(OsStr::from_bytes(name)),
            }
        }
        Ok(EntryPath(path))
    }

    pub(super) fn as_path(&self) -> &Path {
        &self.0
    }

    /// The parent directory (relative, empty for the root) and the last
    /// component; `None` for the root, which has no name in a parent.
    pub(super) fn split(&self) -> Option<(&Path, &OsStr)> {
        let name = self.0.file_name()?;
        let parent = self.0.parent().unwrap_or(Path::new(""));
        Some((parent, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> Result<String, NameError> {
        EntryPath::parse(raw.as_bytes()).map(|p| p.as_path().to_string_lossy().into_owned())
    }

    #[test]
    fn leading_slashes_and_dots_are_stripped() {
        assert_eq!(parsed("./etc/passwd"), Ok("etc/passwd".to_string()));
        assert_eq!(parsed("/etc/passwd"), Ok("etc/passwd".to_string()));
        assert_eq!(parsed("///././/etc//./x/"), Ok("etc/x".to_string()));
        assert_eq!(parsed("usr/bin/"), Ok("usr/bin".to_string()));
    }

    #[test]
    fn root_forms_are_the_empty_path() {
        for raw in ["", ".", "./", "/", "/./", ".//."] {
            let path = EntryPath::parse(raw.as_bytes()).expect(raw);
            assert!(path.as_path().as_os_str().is_empty(), "{raw}");
            assert_eq!(path.split(), None, "{raw}");
        }
    }

    #[test]
    fn dot_dot_anywhere_is_an_escape() {
        for raw in [
            "..",
            "../etc/passwd",
            "a/../../b",
            "a/..",
            "/..",
            "./a/b/../c",
        ] {
            assert_eq!(parsed(raw), Err(NameError::Escape), "{raw}");
        }
        // Names that merely contain dots are ordinary names.
        assert_eq!(parsed("a/..b/c.."), Ok("a/..b/c..".to_string()));
        assert_eq!(parsed("..."), Ok("...".to_string()));
    }

    #[test]
    fn nul_is_refused() {
        assert_eq!(parsed("a\0b"), Err(NameError::Nul));
    }

    #[test]
    fn split_gives_parent_and_name() {
        let path = EntryPath::parse(b"a/b/c").expect("valid");
        assert_eq!(path.split(), Some((Path::new("a/b"), OsStr::new("c"))));
        let path = EntryPath::parse(b"/top").expect("valid");
        assert_eq!(path.split(), Some((Path::new(""), OsStr::new("top"))));
    }

    #[test]
    fn non_utf8_names_are_kept_byte_for_byte() {
        let path = EntryPath::parse(b"dir/\xff\xfe").expect("valid");
        assert_eq!(path.as_path().as_os_str().as_bytes(), b"dir/\xff\xfe");
    }
}
