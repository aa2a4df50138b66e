//! Applying tar entries to the layer directory. Every operation is relative
//! to a directory fd: an entry's parent is opened with `openat2` scoped to
//! the layer root (`RESOLVE_IN_ROOT`), and the last component is then made
//! or changed with an `*at` call that does not follow it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps,
    XattrFlags,
};
use rustix::io::Errno;
use tar::EntryType;

use super::meta::{Meta, Xattr};
use super::path::{EntryPath, NameError};
use super::{UnpackError, os_errno};
use crate::image::direct::{self, DirectWriter};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// AUFS' own bookkeeping files (`.wh..wh.plnk`, `.wh..wh.aufs`, ...) start
/// with this; they mean nothing to overlayfs.
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Scoped resolution: symlinks and `..` met while resolving an entry's
/// parent are interpreted with the layer root as `/`, so they can never
/// lead out of it. No magic links (`/proc/self/fd/...` cannot occur in a
/// layer, and must not be followed if one ever did) and no mount crossings.
const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// `openat2` with `RESOLVE_IN_ROOT` fails with EAGAIN when a rename raced
/// with the resolution; nothing else writes into a layer being unpacked,
/// so a few retries are plenty.
const OPENAT2_RETRIES: usize = 8;

/// As the kernel's MAXSYMLINKS: how many dangling symlinks `make_dirs`
/// follows for one path before calling it a loop.
const MAX_SYMLINK_HOPS: u32 = 40;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

/// The layer directory being filled.
pub(super) struct LayerDir {
    root: OwnedFd,
    /// Directory modification times, set at the end because creating a
    /// directory's children changes them.
    dir_times: Vec<(EntryPath, Timespec)>,
}

impl LayerDir {
    pub(super) fn open(dest: &Path) -> Result<LayerDir, UnpackError> {
        let root =
            rfs::open(dest, DIR_FLAGS, Mode::empty()).map_err(|errno| UnpackError::OpenDest {
                path: dest.to_path_buf(),
                errno: os_errno(errno),
            })?;
        Ok(LayerDir {
            root,
            dir_times: Vec::new(),
        })
    }

    /// Applies one entry. Its contents, if it has any we use, are read here;
    /// the tar parser skips whatever is left.
    pub(super) fn apply<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let mut kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            tracing::debug!(entry = shown, "ignoring pax global header");
            return Ok(());
        }
        // Old tar wrote directories as NUL-typed entries ending in '/'; Go's
        // archive/tar (and so containerd) reads them the same way.
        if entry.header().as_bytes()[156] == 0 && raw.ends_with(b"/") {
            kind = EntryType::Directory;
        }
        let path = EntryPath::parse(&raw).map_err(|error| name_error(&shown, error))?;
        let meta = Meta::read(entry, &shown)?;

        let Some((parent, name)) = path.split() else {
            if !kind.is_dir() {
                return Err(invalid(
                    &shown,
                    "names the layer root but is not a directory",
                ));
            }
            return self.root_dir(&path, &meta, &shown);
        };

        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            if name.as_bytes() == OPAQUE_MARKER {
                return self.opaque(parent, &shown);
            }
            if name.as_bytes().starts_with(AUFS_META_PREFIX) {
                tracing::debug!(entry = shown, "ignoring aufs metadata entry");
                return Ok(());
            }
            return self.whiteout(parent, OsStr::from_bytes(hidden), &meta, &shown);
        }

        let dir = self.ensure_dir(parent, &shown)?;
        match kind {
            EntryType::Directory => self.directory(&dir, name, &path, &meta, &shown),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                regular(&dir, name, &meta, entry, &shown)
            }
            EntryType::Symlink => symlink(&dir, name, &meta, entry, &shown),
            EntryType::Link => self.hardlink(&dir, name, &path, entry, &shown),
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                special(&dir, name, kind, &meta, entry, &shown)
            }
            other => Err(invalid(
                &shown,
                &format!("unsupported entry type {:?}", char::from(other.as_byte())),
            )),
        }
    }

    /// Sets the directory modification times, now that nothing will be
    /// created inside them any more.
    pub(super) fn finish(self) -> Result<(), UnpackError> {
        for (path, mtime) in &self.dir_times {
            let times = timestamps(*mtime);
            let shown = path.as_path().to_string_lossy();
            let Some((parent, name)) = path.split() else {
                rfs::futimens(&self.root, &times).map_err(sys(&shown, "set modification time"))?;
                continue;
            };
            // A later entry may have removed or replaced the directory.
            let dir = match self.open_dir(parent) {
                Ok(dir) => dir,
                Err(Errno::NOENT | Errno::NOTDIR) => continue,
                Err(errno) => return Err(sys(&shown, "open parent directory")(errno)),
            };
            match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
                    rfs::utimensat(&dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(sys(&shown, "set modification time"))?;
                }
                Ok(_) | Err(Errno::NOENT) => {}
                Err(errno) => return Err(sys(&shown, "inspect directory")(errno)),
            }
        }
        Ok(())
    }

    fn root_dir(&mut self, path: &EntryPath, meta: &Meta, shown: &str) -> Result<(), UnpackError> {
        set_owner_mode_fd(self.root.as_fd(), meta, shown)?;
        set_xattrs(Target::Fd(self.root.as_fd()), &meta.xattrs, shown)?;
        self.dir_times.push((path.clone(), meta.mtime));
        Ok(())
    }

    fn directory(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        path: &EntryPath,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        // A directory that exists already keeps its contents and takes the
        // new entry's metadata, as tar does when merging.
        if !clear(dir, name, true, shown)? {
            rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700)).map_err(sys(shown, "mkdir"))?;
        }
        let fd = rfs::openat(dir, name, DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty())
            .map_err(sys(shown, "open directory"))?;
        set_owner_mode_fd(fd.as_fd(), meta, shown)?;
        set_xattrs(Target::Fd(fd.as_fd()), &meta.xattrs, shown)?;
        self.dir_times.push((path.clone(), meta.mtime));
        Ok(())
    }

    fn hardlink<R: Read>(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        path: &EntryPath,
        entry: &tar::Entry<'_, R>,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let Some(raw_target) = entry.link_name_bytes() else {
            return Err(invalid(shown, "hardlink without a target"));
        };
        let target = EntryPath::parse(&raw_target).map_err(|error| match error {
            NameError::Escape => UnpackError::LinkEscape {
                entry: shown.to_string(),
                target: String::from_utf8_lossy(&raw_target).into_owned(),
            },
            NameError::Nul => invalid(shown, "hardlink target contains a NUL byte"),
        })?;
        let Some((target_parent, target_name)) = target.split() else {
            return Err(invalid(shown, "hardlink to the layer root"));
        };
        if target == *path {
            return Err(invalid(shown, "hardlink to itself"));
        }
        let missing = || {
            invalid(
                shown,
                &format!(
                    "hardlink target {:?} does not exist in the layer",
                    target.as_path()
                ),
            )
        };
        // The target is resolved in the layer root like every entry path: a
        // hardlink can only ever share an inode that is already in the layer.
        let target_dir = match self.open_dir(target_parent) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(missing()),
            Err(errno) => return Err(sys(shown, "open hardlink target directory")(errno)),
        };
        clear(dir, name, false, shown)?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        match rfs::linkat(&target_dir, target_name, dir, name, AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(missing()),
            Err(errno) => Err(sys(shown, "link")(errno)),
        }
    }

    /// `.wh..wh..opq`: the directory that holds it hides everything lower
    /// layers have in it.
    fn opaque(&self, parent: &Path, shown: &str) -> Result<(), UnpackError> {
        let dir = self.ensure_dir(parent, shown)?;
        rfs::fsetxattr(&dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
            .map_err(sys(shown, "set trusted.overlay.opaque"))
    }

    /// `.wh.<name>`: an overlay whiteout, a 0/0 character device named
    /// `<name>`, hides `<name>` of lower layers.
    fn whiteout(
        &self,
        parent: &Path,
        hidden: &OsStr,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        match hidden.as_bytes() {
            b"" | b"." => return Err(invalid(shown, "whiteout names no file")),
            b".." => {
                return Err(UnpackError::Escape {
                    entry: shown.to_string(),
                });
            }
            _ => {}
        }
        let dir = self.ensure_dir(parent, shown)?;
        clear(&dir, hidden, false, shown)?;
        rfs::mknodat(
            &dir,
            hidden,
            FileType::CharacterDevice,
            Mode::empty(),
            rfs::makedev(0, 0),
        )
        .map_err(sys(shown, "create whiteout"))?;
        rfs::chownat(
            &dir,
            hidden,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(sys(shown, "chown whiteout"))
    }

    /// Opens directory `rel` of the layer, resolved in the layer root.
    fn open_dir(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        for _ in 0..OPENAT2_RETRIES {
            match rfs::openat2(&self.root, rel, DIR_FLAGS, Mode::empty(), RESOLVE) {
                Err(Errno::AGAIN) => continue,
                result => return result,
            }
        }
        Err(Errno::AGAIN)
    }

    /// Opens directory `rel`, creating what is missing of it (root-owned,
    /// 0755) as tar does for entries that come before their parents.
    fn ensure_dir(&self, rel: &Path, shown: &str) -> Result<OwnedFd, UnpackError> {
        match self.open_dir(rel) {
            Err(Errno::NOENT) => {}
            result => return result.map_err(sys(shown, "open parent directory")),
        }
        let mut hops = 0;
        self.make_dirs(rel, &mut hops)
            .map_err(|(op, errno)| sys(shown, op)(errno))
    }

    /// Creates the missing directories of `path`, which is resolved in the
    /// root like any other. A dangling symlink on the way gets its target
    /// made, so the path then resolves through it, as containerd's scoped
    /// `MkdirAll` does; its target is again scoped to the layer root.
    fn make_dirs(&self, path: &Path, hops: &mut u32) -> Result<OwnedFd, (&'static str, Errno)> {
        let mut done = PathBuf::new();
        let mut dir = self
            .open_dir(&done)
            .map_err(|errno| ("open layer root", errno))?;
        for component in path.components() {
            done.push(component);
            dir = match self.open_dir(&done) {
                Ok(next) => next,
                Err(Errno::NOENT) => {
                    // `dir` is `done`'s parent as resolved in the root, and
                    // the component is a plain name: only such a name can be
                    // missing.
                    let name = component.as_os_str();
                    match rfs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {
                            let next = rfs::openat(
                                &dir,
                                name,
                                DIR_FLAGS | OFlags::NOFOLLOW,
                                Mode::empty(),
                            )
                            .map_err(|errno| ("open parent directory", errno))?;
                            // The umask must not decide the mode.
                            rfs::fchmod(&next, Mode::from_raw_mode(0o755))
                                .map_err(|errno| ("chmod parent directory", errno))?;
                            next
                        }
                        // Missing yet present: a dangling symlink.
                        Err(Errno::EXIST) => {
                            *hops += 1;
                            if *hops > MAX_SYMLINK_HOPS {
                                return Err(("create parent directory", Errno::LOOP));
                            }
                            let target = rfs::readlinkat(&dir, name, Vec::new())
                                .map_err(|errno| ("read symlink in parent path", errno))?;
                            let base = done.parent().unwrap_or(Path::new(""));
                            self.make_dirs(&base.join(OsStr::from_bytes(target.as_bytes())), hops)?
                        }
                        Err(errno) => return Err(("create parent directory", errno)),
                    }
                }
                Err(errno) => return Err(("open parent directory", errno)),
            };
        }
        Ok(dir)
    }
}

fn regular<R: Read>(
    dir: &OwnedFd,
    name: &OsStr,
    meta: &Meta,
    entry: &mut tar::Entry<'_, R>,
    shown: &str,
) -> Result<(), UnpackError> {
    clear(dir, name, false, shown)?;
    let fd = rfs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(sys(shown, "create file"))?;
    let mut file = File::from(fd);
    let expected = entry.size();
    let written = copy_contents(entry, &mut file, shown)?;
    if written != expected {
        return Err(UnpackError::TruncatedEntry {
            entry: shown.to_string(),
            expected,
            actual: written,
        });
    }
    // chown clears setuid/setgid and file capabilities, so it comes first,
    // then the mode, then the xattrs (security.capability among them).
    set_owner_mode_fd(file.as_fd(), meta, shown)?;
    set_xattrs(Target::Fd(file.as_fd()), &meta.xattrs, shown)?;
    rfs::futimens(&file, &timestamps(meta.mtime)).map_err(sys(shown, "set modification time"))
}

fn symlink<R: Read>(
    dir: &OwnedFd,
    name: &OsStr,
    meta: &Meta,
    entry: &tar::Entry<'_, R>,
    shown: &str,
) -> Result<(), UnpackError> {
    // Stored verbatim: the target is interpreted later, inside the
    // container's root, and we never follow it while unpacking.
    let target = match entry.link_name_bytes() {
        Some(target) if !target.is_empty() => target,
        _ => return Err(invalid(shown, "symlink without a target")),
    };
    if target.contains(&0) {
        return Err(invalid(shown, "symlink target contains a NUL byte"));
    }
    clear(dir, name, false, shown)?;
    rfs::symlinkat(OsStr::from_bytes(&target), dir, name).map_err(sys(shown, "symlink"))?;
    rfs::chownat(
        dir,
        name,
        Some(meta.uid),
        Some(meta.gid),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(sys(shown, "lchown"))?;
    set_xattrs(Target::At(dir.as_fd(), name), &meta.xattrs, shown)?;
    rfs::utimensat(
        dir,
        name,
        &timestamps(meta.mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(sys(shown, "set modification time"))
}

/// Character and block devices and fifos.
fn special<R: Read>(
    dir: &OwnedFd,
    name: &OsStr,
    kind: EntryType,
    meta: &Meta,
    entry: &tar::Entry<'_, R>,
    shown: &str,
) -> Result<(), UnpackError> {
    let header = entry.header();
    let number = |value: io::Result<Option<u32>>, what: &str| {
        value
            .map(Option::unwrap_or_default)
            .map_err(|error| invalid(shown, &format!("bad device {what} number: {error}")))
    };
    let major = number(header.device_major(), "major")?;
    let minor = number(header.device_minor(), "minor")?;
    let (file_type, dev) = match kind {
        EntryType::Char => (FileType::CharacterDevice, rfs::makedev(major, minor)),
        EntryType::Block => (FileType::BlockDevice, rfs::makedev(major, minor)),
        _ => (FileType::Fifo, 0),
    };
    clear(dir, name, false, shown)?;
    rfs::mknodat(dir, name, file_type, Mode::from_raw_mode(0o600), dev)
        .map_err(sys(shown, "mknod"))?;
    rfs::chownat(
        dir,
        name,
        Some(meta.uid),
        Some(meta.gid),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(sys(shown, "chown"))?;
    // There is no fd to fchmod (opening a fifo blocks, a device may do
    // anything) and fchmodat cannot refuse symlinks on older kernels. The
    // name is the node made just above, in a directory only we write to.
    rfs::chmodat(dir, name, meta.mode, AtFlags::empty()).map_err(sys(shown, "chmod"))?;
    set_xattrs(Target::At(dir.as_fd(), name), &meta.xattrs, shown)?;
    rfs::utimensat(
        dir,
        name,
        &timestamps(meta.mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(sys(shown, "set modification time"))
}

/// Makes room for an entry at `name`: an earlier entry of the same layer
/// there is replaced. With `keep_dir`, an existing directory stays (and
/// `true` is returned) so a directory entry can merge into it.
fn clear(dir: &OwnedFd, name: &OsStr, keep_dir: bool, shown: &str) -> Result<bool, UnpackError> {
    let stat = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(false),
        Err(errno) => return Err(sys(shown, "inspect existing file")(errno)),
    };
    if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
        if keep_dir {
            return Ok(true);
        }
        remove_tree(dir.as_fd(), name).map_err(sys(shown, "remove existing directory"))?;
    } else {
        rfs::unlinkat(dir, name, AtFlags::empty()).map_err(sys(shown, "remove existing file"))?;
    }
    Ok(false)
}

/// Removes directory `name` in `dir` and everything below it, never
/// following a symlink.
fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    let fd = rfs::openat(dir, name, DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty())?;
    // Listed first, removed after: unlinking while reading a directory
    // leaves it to the filesystem whether entries are skipped.
    let mut children = Vec::new();
    for child in Dir::read_from(&fd)? {
        let child = child?;
        let child_name = child.file_name().to_bytes();
        if child_name != b"." && child_name != b".." {
            children.push((OsString::from_vec(child_name.to_vec()), child.file_type()));
        }
    }
    for (child, file_type) in children {
        let file_type = match file_type {
            FileType::Unknown => FileType::from_raw_mode(
                rfs::statat(&fd, &child, AtFlags::SYMLINK_NOFOLLOW)?.st_mode,
            ),
            known => known,
        };
        if file_type == FileType::Directory {
            remove_tree(fd.as_fd(), &child)?;
        } else {
            rfs::unlinkat(&fd, &child, AtFlags::empty())?;
        }
    }
    rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

fn copy_contents<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    file: &mut File,
    shown: &str,
) -> Result<u64, UnpackError> {
    let read_error = |error| UnpackError::Io {
        entry: shown.to_string(),
        op: "read contents",
        error,
    };
    let write_error = |error| UnpackError::Io {
        entry: shown.to_string(),
        op: "write contents",
        error,
    };
    // Large files go around the page cache (see `direct`), read straight
    // into the direct writer's buffer.
    let direct = (entry.size() >= direct::CHUNK as u64)
        .then(|| DirectWriter::new(file))
        .flatten();
    if let Some(mut direct) = direct {
        let mut total = 0u64;
        loop {
            match entry.read(direct.spare()) {
                Ok(0) => break,
                Ok(n) => {
                    direct.filled(file, n).map_err(write_error)?;
                    total += n as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(read_error(error)),
            }
        }
        direct.finish(file).map_err(write_error)?;
        return Ok(total);
    }
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(read_error(error)),
        };
        file.write_all(&buf[..n]).map_err(write_error)?;
        total += n as u64;
    }
}

/// Owner first, then mode: chown clears the setuid and setgid bits.
fn set_owner_mode_fd(fd: BorrowedFd<'_>, meta: &Meta, shown: &str) -> Result<(), UnpackError> {
    rfs::fchown(fd, Some(meta.uid), Some(meta.gid)).map_err(sys(shown, "chown"))?;
    rfs::fchmod(fd, meta.mode).map_err(sys(shown, "chmod"))
}

/// Where xattrs go: an open fd, or a name in a directory for the files we
/// cannot open (symlinks, devices, fifos).
enum Target<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a OsStr),
}

fn set_xattrs(target: Target<'_>, xattrs: &[Xattr], shown: &str) -> Result<(), UnpackError> {
    if xattrs.is_empty() {
        return Ok(());
    }
    for xattr in xattrs {
        let name = OsStr::from_bytes(&xattr.name);
        let result = match &target {
            Target::Fd(fd) => rfs::fsetxattr(fd, name, &xattr.value, XattrFlags::empty()),
            // `lsetxattr` on /proc/self/fd/<dir>/<name>: the magic link is
            // the directory we already resolved safely, and the last
            // component is not followed. (setxattrat(2) does this directly,
            // but only from Linux 6.13.)
            Target::At(dir, file) => {
                let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(file);
                rfs::lsetxattr(&path, name, &xattr.value, XattrFlags::empty())
            }
        };
        match result {
            Ok(()) => {}
            // As containerd: a filesystem without xattr support loses
            // them with a warning rather than failing the pull.
            Err(Errno::NOTSUP) => tracing::warn!(
                entry = shown,
                xattr = %name.to_string_lossy(),
                "filesystem does not support this xattr; not applied"
            ),
            Err(errno) => {
                return Err(UnpackError::Xattr {
                    entry: shown.to_string(),
                    name: name.to_string_lossy().into_owned(),
                    errno: os_errno(errno),
                });
            }
        }
    }
    Ok(())
}

fn timestamps(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

fn sys<'a>(shown: &'a str, op: &'static str) -> impl FnOnce(Errno) -> UnpackError + 'a {
    move |errno| UnpackError::Sys {
        entry: shown.to_string(),
        op,
        errno: os_errno(errno),
    }
}

fn invalid(shown: &str, reason: &str) -> UnpackError {
    UnpackError::Invalid {
        entry: shown.to_string(),
        reason: reason.to_string(),
    }
}

fn name_error(shown: &str, error: NameError) -> UnpackError {
    match error {
        NameError::Escape => UnpackError::Escape {
            entry: shown.to_string(),
        },
        NameError::Nul => invalid(shown, "name contains a NUL byte"),
    }
}
