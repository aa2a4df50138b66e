//! The spec's `mounts`: options parsed into flags in the parent, targets
//! resolved and mounted in the child.
//!
//! The one thing to know: a mount target is never a path string handed to
//! mount(2). It is resolved inside the rootfs with `openat2(RESOLVE_IN_ROOT)`
//! (symlinks, absolute or `..`, stay inside the rootfs), missing directories
//! and files are created relative to already-resolved directory fds, and the
//! mount goes onto `/proc/self/fd/N` of an `O_PATH` fd of the target. An
//! image with `/etc -> /` or a target symlinked to `/host` therefore lands
//! inside the rootfs, never on the host.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::statvfs::{FsFlags, fstatvfs};
use oci_spec::runtime::{LinuxIdMapping, Mount};
use rustix::fs::{Mode, OFlags, ResolveFlags};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount destination {0:?} is not a clean absolute path: \"..\" components are refused")]
    DotDot(PathBuf),
    #[error("mount {destination:?}: option {option:?} is not supported")]
    Unsupported {
        destination: PathBuf,
        option: String,
    },
    #[error("mount {destination:?}: {message}")]
    BadIdmap {
        destination: PathBuf,
        message: &'static str,
    },
    #[error("idmapped mount of {source_path:?}: open_tree: {errno}")]
    OpenTree { source_path: PathBuf, errno: Errno },
    #[error("resolve {path:?} inside the container rootfs: {errno}")]
    Resolve { path: PathBuf, errno: Errno },
    #[error("create {path:?} inside the container rootfs: {errno}")]
    Create { path: PathBuf, errno: Errno },
    #[error("mount {source_path} on {target:?} (type {fstype}): {errno}")]
    Mount {
        source_path: String,
        target: PathBuf,
        fstype: String,
        errno: Errno,
    },
    #[error("remount {target:?} with {flags:?}: {errno}")]
    Remount {
        target: PathBuf,
        flags: MsFlags,
        errno: Errno,
    },
    #[error("set propagation {flags:?} on {target:?}: {errno}")]
    Propagation {
        target: PathBuf,
        flags: MsFlags,
        errno: Errno,
    },
    #[error("set recursive mount attributes on {target:?}: {errno}")]
    SetAttr { target: PathBuf, errno: Errno },
    #[error("idmap the mount of {target:?}: {errno}")]
    Idmap { target: PathBuf, errno: Errno },
    #[error("read /proc/self/mountinfo: {0}")]
    MountInfo(std::io::Error),
}

/// Recursive mount attributes (`rro`, `rnosuid`, ...) set with
/// `mount_setattr(AT_RECURSIVE)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecursiveAttrs {
    pub set: u64,
    pub clear: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    Bind {
        recursive: bool,
    },
    /// `type: cgroup`/`cgroup2`: the container's own cgroups bind-mounted
    /// from the host hierarchies (v1: a tmpfs with one directory per
    /// hierarchy; v2: the one directory).
    Cgroup,
    Filesystem,
}

/// One spec mount, parsed.
#[derive(Debug, Clone)]
pub struct MountPlan {
    /// Destination inside the container, absolute and without `..`.
    pub destination: PathBuf,
    pub source: String,
    pub fstype: String,
    pub kind: MountKind,
    pub flags: MsFlags,
    /// Flags the options explicitly clear (`rw`, `suid`, ...): never added
    /// back from the source's locked flags.
    pub cleared: MsFlags,
    pub propagation: Vec<MsFlags>,
    pub data: String,
    pub recursive: RecursiveAttrs,
    /// A bind seen through id maps (the spec's `uidMappings`).
    pub idmap: Option<IdmapPlan>,
}

/// The id maps of an idmapped bind and, once the caller has made it (see
/// [`MountPlan::make_idmapped`]), the detached tree the container's init
/// attaches.
#[derive(Debug, Clone)]
pub struct IdmapPlan {
    pub uid_mappings: Vec<LinuxIdMapping>,
    pub gid_mappings: Vec<LinuxIdMapping>,
    pub tree: Option<Arc<OwnedFd>>,
}

/// What the options say, option by option (the table runc uses).
fn parse_option(opt: &str) -> Option<(bool, MsFlags)> {
    Some(match opt {
        "ro" => (false, MsFlags::MS_RDONLY),
        "rw" => (true, MsFlags::MS_RDONLY),
        "nosuid" => (false, MsFlags::MS_NOSUID),
        "suid" => (true, MsFlags::MS_NOSUID),
        "nodev" => (false, MsFlags::MS_NODEV),
        "dev" => (true, MsFlags::MS_NODEV),
        "noexec" => (false, MsFlags::MS_NOEXEC),
        "exec" => (true, MsFlags::MS_NOEXEC),
        "sync" => (false, MsFlags::MS_SYNCHRONOUS),
        "async" => (true, MsFlags::MS_SYNCHRONOUS),
        "dirsync" => (false, MsFlags::MS_DIRSYNC),
        "mand" => (false, MsFlags::MS_MANDLOCK),
        "nomand" => (true, MsFlags::MS_MANDLOCK),
        "noatime" => (false, MsFlags::MS_NOATIME),
        "atime" => (true, MsFlags::MS_NOATIME),
        "nodiratime" => (false, MsFlags::MS_NODIRATIME),
        "diratime" => (true, MsFlags::MS_NODIRATIME),
        "relatime" => (false, MsFlags::MS_RELATIME),
        "norelatime" => (true, MsFlags::MS_RELATIME),
        "strictatime" => (false, MsFlags::MS_STRICTATIME),
        "nostrictatime" => (true, MsFlags::MS_STRICTATIME),
        "remount" => (false, MsFlags::MS_REMOUNT),
        _ => return None,
    })
}

fn parse_propagation(opt: &str) -> Option<MsFlags> {
    Some(match opt {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

fn parse_recursive(opt: &str) -> Option<(bool, u64)> {
    Some(match opt {
        "rro" => (false, libc::MOUNT_ATTR_RDONLY),
        "rrw" => (true, libc::MOUNT_ATTR_RDONLY),
        "rnosuid" => (false, libc::MOUNT_ATTR_NOSUID),
        "rsuid" => (true, libc::MOUNT_ATTR_NOSUID),
        "rnodev" => (false, libc::MOUNT_ATTR_NODEV),
        "rdev" => (true, libc::MOUNT_ATTR_NODEV),
        "rnoexec" => (false, libc::MOUNT_ATTR_NOEXEC),
        "rexec" => (true, libc::MOUNT_ATTR_NOEXEC),
        "rnodiratime" => (false, libc::MOUNT_ATTR_NODIRATIME),
        "rdiratime" => (true, libc::MOUNT_ATTR_NODIRATIME),
        "rnoatime" => (false, libc::MOUNT_ATTR_NOATIME),
        "rrelatime" => (false, libc::MOUNT_ATTR_RELATIME),
        "rstrictatime" => (false, libc::MOUNT_ATTR_STRICTATIME),
        _ => return None,
    })
}

/// Checks that a destination is absolute-able and has no `..`; a relative
/// destination is taken relative to `/` (runc's behaviour).
pub fn clean_destination(dest: &Path) -> Result<PathBuf, MountError> {
    let mut out = PathBuf::from("/");
    for c in dest.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(MountError::DotDot(dest.to_owned()));
            }
        }
    }
    Ok(out)
}

impl MountPlan {
    pub fn from_spec(m: &Mount) -> Result<MountPlan, MountError> {
        let destination = clean_destination(m.destination())?;
        let fstype = m.typ().clone().unwrap_or_default();
        let mut flags = MsFlags::empty();
        let mut cleared = MsFlags::empty();
        let mut propagation = Vec::new();
        let mut data = Vec::new();
        let mut recursive = RecursiveAttrs::default();
        let mut bind = None;
        for opt in m.options().as_deref().unwrap_or_default() {
            let opt = opt.as_str();
            if opt == "bind" {
                bind.get_or_insert(false);
            } else if opt == "rbind" {
                bind = Some(true);
            } else if let Some((clear, f)) = parse_option(opt) {
                if clear {
                    flags.remove(f);
                    cleared.insert(f);
                } else {
                    flags.insert(f);
                    cleared.remove(f);
                }
            } else if let Some(p) = parse_propagation(opt) {
                propagation.push(p);
            } else if let Some((clear, a)) = parse_recursive(opt) {
                if clear {
                    recursive.clear |= a;
                } else {
                    recursive.set |= a;
                }
            } else if matches!(opt, "idmap" | "ridmap") && m.uid_mappings().is_some() {
                // Implied by the maps; the whole tree is mapped either way.
            } else if matches!(opt, "idmap" | "ridmap" | "tmpcopyup") {
                return Err(MountError::Unsupported {
                    destination,
                    option: opt.to_owned(),
                });
            } else {
                data.push(opt.to_owned());
            }
        }
        let kind = if fstype == "bind" || bind.is_some() {
            MountKind::Bind {
                recursive: bind.unwrap_or(false),
            }
        } else if fstype == "cgroup" || fstype == "cgroup2" {
            MountKind::Cgroup
        } else {
            MountKind::Filesystem
        };
        let source = m
            .source()
            .as_ref()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| fstype.clone());
        let idmap = match (m.uid_mappings(), m.gid_mappings()) {
            (None, None) => None,
            (Some(uid), Some(gid)) if matches!(kind, MountKind::Bind { .. }) => Some(IdmapPlan {
                uid_mappings: uid.clone(),
                gid_mappings: gid.clone(),
                tree: None,
            }),
            (Some(_), Some(_)) => {
                return Err(MountError::BadIdmap {
                    destination,
                    message: "only bind mounts can be idmapped",
                });
            }
            _ => {
                return Err(MountError::BadIdmap {
                    destination,
                    message: "uidMappings and gidMappings go together",
                });
            }
        };
        Ok(MountPlan {
            destination,
            source,
            fstype,
            kind,
            flags,
            cleared,
            propagation,
            data: data.join(","),
            recursive,
            idmap,
        })
    }

    /// A plain filesystem mount the executor adds itself (e.g. `/dev/pts`).
    pub fn filesystem(destination: &str, fstype: &str, flags: MsFlags, data: &str) -> MountPlan {
        MountPlan {
            destination: PathBuf::from(destination),
            source: fstype.to_owned(),
            fstype: fstype.to_owned(),
            kind: MountKind::Filesystem,
            flags,
            cleared: MsFlags::empty(),
            propagation: Vec::new(),
            data: data.to_owned(),
            recursive: RecursiveAttrs::default(),
            idmap: None,
        }
    }

    /// Makes the detached, idmapped tree of an idmapped bind, seen through
    /// `userns` (whose maps the caller checked to be the mount's), with the
    /// mount's flags. Done by the caller, privileged on the host: an
    /// idmapped mount needs privilege over the filesystem, which the
    /// container's init in its user namespace has not. A mount without id
    /// maps is left as it is.
    pub fn make_idmapped(&mut self, userns: BorrowedFd<'_>) -> Result<(), MountError> {
        let Some(idmap) = &mut self.idmap else {
            return Ok(());
        };
        let recursive = matches!(self.kind, MountKind::Bind { recursive: true });
        let tree = idmapped_tree(
            Path::new(&self.source),
            recursive,
            userns,
            mount_attrs(self.flags),
        )?;
        idmap.tree = Some(Arc::new(tree));
        Ok(())
    }

    /// The destination relative to the rootfs, for `openat2`.
    pub fn relative(&self) -> &Path {
        self.destination
            .strip_prefix("/")
            .unwrap_or(&self.destination)
    }
}

// ---- resolution inside the rootfs ----

/// `/proc/self/fd/N`: how mount(2) is pointed at an already-resolved fd.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn to_errno(e: rustix::io::Errno) -> Errno {
    Errno::from_raw(e.raw_os_error())
}

/// Opens `rel` inside `root` (an `O_PATH` fd), resolving every symlink as if
/// `root` were `/`.
pub fn open_in_root(root: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(
            root,
            rel,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            // EAGAIN: a concurrent rename somewhere on the host; retry.
            Err(rustix::io::Errno::AGAIN) if tries < 16 => tries += 1,
            Err(rustix::io::Errno::INTR) => {}
            other => return other.map_err(to_errno),
        }
    }
}

/// Splits `rel` into (parent, name); `None` for a path ending in `..`/`.`.
fn split(rel: &Path) -> Option<(&Path, &OsStr)> {
    Some((rel.parent().unwrap_or(Path::new("")), rel.file_name()?))
}

/// Where a dangling symlink `parent/name` points, as a path relative to the
/// root (absolute targets are rooted at the rootfs).
fn symlink_target(dir: BorrowedFd<'_>, parent: &Path, name: &OsStr) -> Result<PathBuf, Errno> {
    let target = rustix::fs::readlinkat(dir, name, Vec::new()).map_err(to_errno)?;
    let target = PathBuf::from(OsStr::new(
        std::str::from_utf8(target.as_bytes()).map_err(|_| Errno::EINVAL)?,
    ));
    Ok(match target.strip_prefix("/") {
        Ok(abs) => abs.to_owned(),
        Err(_) => parent.join(target),
    })
}

const MAX_SYMLINKS: u32 = 40;

/// `mkdir -p` inside the root: returns an `O_PATH` fd of the directory.
/// Dangling symlinks on the way are followed (inside the root) and their
/// targets created, like securejoin's MkdirAll.
pub fn mkdir_all(root: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, MountError> {
    mkdir_all_depth(root, rel, 0).map_err(|errno| MountError::Create {
        path: Path::new("/").join(rel),
        errno,
    })
}

fn mkdir_all_depth(root: BorrowedFd<'_>, rel: &Path, depth: u32) -> Result<OwnedFd, Errno> {
    if depth > MAX_SYMLINKS {
        return Err(Errno::ELOOP);
    }
    match open_in_root(root, rel, OFlags::PATH | OFlags::DIRECTORY) {
        Err(Errno::ENOENT) => {}
        other => return other,
    }
    let (parent, name) = split(rel).ok_or(Errno::ENOENT)?;
    let dir = mkdir_all_depth(root, parent, depth + 1)?;
    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
        Ok(()) => open_in_root(root, rel, OFlags::PATH | OFlags::DIRECTORY),
        Err(rustix::io::Errno::EXIST) => {
            let next = symlink_target(dir.as_fd(), parent, name)?;
            mkdir_all_depth(root, &next, depth + 1)
        }
        Err(e) => Err(to_errno(e)),
    }
}

/// Creates an empty file at `rel` inside the root if nothing is there
/// (following dangling symlinks inside the root); returns an `O_PATH` fd.
pub fn ensure_file(root: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, MountError> {
    ensure_file_depth(root, rel, 0).map_err(|errno| MountError::Create {
        path: Path::new("/").join(rel),
        errno,
    })
}

fn ensure_file_depth(root: BorrowedFd<'_>, rel: &Path, depth: u32) -> Result<OwnedFd, Errno> {
    if depth > MAX_SYMLINKS {
        return Err(Errno::ELOOP);
    }
    match open_in_root(root, rel, OFlags::PATH) {
        Err(Errno::ENOENT) => {}
        other => return other,
    }
    let (parent, name) = split(rel).ok_or(Errno::ENOENT)?;
    let dir = mkdir_all_depth(root, parent, 0)?;
    match rustix::fs::openat(
        &dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    ) {
        Ok(_) => open_in_root(root, rel, OFlags::PATH),
        Err(rustix::io::Errno::EXIST) => {
            let next = symlink_target(dir.as_fd(), parent, name)?;
            ensure_file_depth(root, &next, depth + 1)
        }
        Err(e) => Err(to_errno(e)),
    }
}

// ---- mounting ----

/// The flags a bind remount must keep: those the source mount has locked
/// (in a user namespace the kernel refuses to drop them), minus the ones the
/// spec explicitly clears.
fn locked_flags(fd: BorrowedFd<'_>, cleared: MsFlags) -> MsFlags {
    let Ok(st) = fstatvfs(fd) else {
        return MsFlags::empty();
    };
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs) && !cleared.contains(ms) {
            out.insert(ms);
        }
    }
    out
}

/// Remounts the bind mount at `fd` with `flags` (keeping locked flags).
pub fn remount_bind(
    fd: BorrowedFd<'_>,
    shown: &Path,
    flags: MsFlags,
    cleared: MsFlags,
) -> Result<(), MountError> {
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags | locked_flags(fd, cleared);
    mount(
        None::<&str>,
        &fd_path(fd),
        None::<&str>,
        flags,
        None::<&str>,
    )
    .map_err(|errno| MountError::Remount {
        target: shown.to_owned(),
        flags,
        errno,
    })
}

/// The `MOUNT_ATTR_*` bits of the per-mount flags among `flags`.
fn mount_attrs(flags: MsFlags) -> u64 {
    [
        (MsFlags::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, libc::MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, libc::MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
    ]
    .into_iter()
    .filter(|(flag, _)| flags.contains(*flag))
    .fold(0, |attrs, (_, attr)| attrs | attr)
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, attr)`: rustix has
/// no wrapper yet.
pub fn mount_setattr_recursive(
    fd: BorrowedFd<'_>,
    shown: &Path,
    attrs: RecursiveAttrs,
) -> Result<(), MountError> {
    let attr = libc::mount_attr {
        attr_set: attrs.set,
        attr_clr: attrs.clear,
        propagation: 0,
        userns_fd: 0,
    };
    mount_setattr(fd, &attr).map_err(|errno| MountError::SetAttr {
        target: shown.to_owned(),
        errno,
    })
}

/// A detached copy of the tree at `source` (with the mounts below it when
/// `recursive`) that shows its files' owners through the id maps of the
/// user namespace `userns`, with the `MOUNT_ATTR_*` bits `attrs` too: an
/// idmapped mount, to attach with `move_mount`. Needs privilege over the
/// filesystem of `source`.
pub fn idmapped_tree(
    source: &Path,
    recursive: bool,
    userns: BorrowedFd<'_>,
    attrs: u64,
) -> Result<OwnedFd, MountError> {
    use rustix::mount::{OpenTreeFlags, open_tree};
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = open_tree(rustix::fs::CWD, source, flags).map_err(|errno| MountError::OpenTree {
        source_path: source.to_owned(),
        errno: Errno::from_raw(errno.raw_os_error()),
    })?;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    mount_setattr(tree.as_fd(), &attr).map_err(|errno| MountError::Idmap {
        target: source.to_owned(),
        errno,
    })?;
    Ok(tree)
}

fn mount_setattr(fd: BorrowedFd<'_>, attr: &libc::mount_attr) -> Result<(), Errno> {
    // SAFETY: `fd` is a live fd, the path is a NUL-terminated empty string,
    // and `attr` is a valid `mount_attr` whose size we pass; the kernel only
    // reads it.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

fn set_propagation(fd: BorrowedFd<'_>, shown: &Path, flags: MsFlags) -> Result<(), MountError> {
    mount(
        None::<&str>,
        &fd_path(fd),
        None::<&str>,
        flags,
        None::<&str>,
    )
    .map_err(|errno| MountError::Propagation {
        target: shown.to_owned(),
        flags,
        errno,
    })
}

fn mount_err(m: &MountPlan, errno: Errno) -> MountError {
    MountError::Mount {
        source_path: m.source.clone(),
        target: m.destination.clone(),
        fstype: if m.fstype.is_empty() {
            "bind".into()
        } else {
            m.fstype.clone()
        },
        errno,
    }
}

fn resolve_err(m: &MountPlan) -> impl Fn(Errno) -> MountError + '_ {
    move |errno| MountError::Resolve {
        path: m.destination.clone(),
        errno,
    }
}

/// Mounts one spec mount inside the rootfs (`root`: `O_PATH` fd of it).
pub fn mount_in_root(
    root: BorrowedFd<'_>,
    m: &MountPlan,
    cgroups: &[CgroupBind],
) -> Result<(), MountError> {
    let rel = m.relative();
    match &m.kind {
        MountKind::Bind { recursive } => {
            let source_is_dir =
                std::fs::metadata(&m.source)
                    .map(|md| md.is_dir())
                    .map_err(|e| {
                        mount_err(m, Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
                    })?;
            let target = if source_is_dir {
                mkdir_all(root, rel)?
            } else {
                ensure_file(root, rel)?
            };
            if let Some(tree) = m.idmap.as_ref().and_then(|i| i.tree.as_ref()) {
                // Made with the mount's flags (`make_idmapped`): attached
                // as it is.
                rustix::mount::move_mount(
                    tree.as_fd(),
                    "",
                    target.as_fd(),
                    "",
                    rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH
                        | rustix::mount::MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
                )
                .map_err(|errno| mount_err(m, Errno::from_raw(errno.raw_os_error())))?;
                let mounted = open_in_root(root, rel, OFlags::PATH).map_err(resolve_err(m))?;
                return finish(mounted.as_fd(), m);
            }
            let mut flags = MsFlags::MS_BIND;
            if *recursive {
                flags |= MsFlags::MS_REC;
            }
            mount(
                Some(m.source.as_str()),
                &fd_path(target.as_fd()),
                None::<&str>,
                flags,
                None::<&str>,
            )
            .map_err(|errno| mount_err(m, errno))?;
            let mounted = open_in_root(root, rel, OFlags::PATH).map_err(resolve_err(m))?;
            let extra = m.flags - (MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_REC);
            if !extra.is_empty() {
                remount_bind(mounted.as_fd(), &m.destination, extra, m.cleared)?;
            }
            finish(mounted.as_fd(), m)
        }
        MountKind::Filesystem => {
            let target = mkdir_all(root, rel)?;
            let data = (!m.data.is_empty()).then_some(m.data.as_str());
            let flags = m.flags - MsFlags::MS_REMOUNT;
            let result = mount(
                Some(m.source.as_str()),
                &fd_path(target.as_fd()),
                Some(m.fstype.as_str()),
                flags,
                data,
            );
            match result {
                Ok(()) => {}
                // sysfs cannot be mounted from a user namespace that does
                // not own the network namespace: bind the host's, as runc.
                Err(Errno::EPERM) if m.fstype == "sysfs" => {
                    mount(
                        Some("/sys"),
                        &fd_path(target.as_fd()),
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        None::<&str>,
                    )
                    .map_err(|errno| mount_err(m, errno))?;
                    let mounted = open_in_root(root, rel, OFlags::PATH).map_err(resolve_err(m))?;
                    remount_bind(mounted.as_fd(), &m.destination, flags, m.cleared)?;
                }
                Err(errno) => return Err(mount_err(m, errno)),
            }
            let mounted = open_in_root(root, rel, OFlags::PATH).map_err(resolve_err(m))?;
            finish(mounted.as_fd(), m)
        }
        MountKind::Cgroup => mount_cgroups(root, m, cgroups),
    }
}

fn finish(mounted: BorrowedFd<'_>, m: &MountPlan) -> Result<(), MountError> {
    for p in &m.propagation {
        set_propagation(mounted, &m.destination, *p)?;
    }
    if m.recursive != RecursiveAttrs::default() {
        mount_setattr_recursive(mounted, &m.destination, m.recursive)?;
    }
    Ok(())
}

// ---- cgroup mounts ----

/// One host cgroup hierarchy as the container should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupBind {
    /// Directory name under the cgroup mount (`cpu`, `systemd`, `unified`);
    /// empty for a v2-only host, where the one hierarchy is the mount.
    pub name: String,
    /// The container's cgroup directory in that hierarchy, on the host.
    pub source: PathBuf,
    /// Other names for the same hierarchy (`cpu` and `cpuacct` for a
    /// `cpu,cpuacct` hierarchy), made symlinks.
    pub aliases: Vec<String>,
}

/// A line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountInfo {
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub super_options: String,
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest
            .get(pos + 1..pos + 4)
            .and_then(|oct| u8::from_str_radix(oct, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            Some(MountInfo {
                root: unescape(pre.get(3)?),
                mount_point: PathBuf::from(unescape(pre.get(4)?)),
                fstype: post.next()?.to_owned(),
                super_options: {
                    let _source = post.next()?;
                    post.next()?.to_owned()
                },
            })
        })
        .collect()
}

pub fn mountinfo() -> Result<Vec<MountInfo>, MountError> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .map_err(MountError::MountInfo)
}

/// The host's cgroup hierarchy mounts among `infos`: what [`cgroup_binds`]
/// needs of mountinfo, small enough to hand to each container's monitor.
pub fn cgroup_mounts(infos: Vec<MountInfo>) -> Vec<MountInfo> {
    infos
        .into_iter()
        .filter(|i| {
            (i.fstype == "cgroup" || i.fstype == "cgroup2")
                && i.mount_point.starts_with("/sys/fs/cgroup")
        })
        .collect()
}

/// The cgroup hierarchies mounted under `/sys/fs/cgroup` and, for each, the
/// container's directory: the parent of the `cgroup.procs` file the caller
/// will put the container in, or else this process's own cgroup (which the
/// container inherits). Computed in the parent.
pub fn cgroup_binds(
    infos: &[MountInfo],
    own_cgroups: &str,
    cgroup_procs: &[PathBuf],
) -> Vec<CgroupBind> {
    let base = Path::new("/sys/fs/cgroup");
    let mut out: Vec<CgroupBind> = Vec::new();
    let mut seen = Vec::new();
    for info in infos {
        if !(info.fstype == "cgroup" || info.fstype == "cgroup2")
            || !info.mount_point.starts_with(base)
        {
            continue;
        }
        // The hierarchy's identity: its controllers (v1) or "" (v2).
        let controllers: Vec<&str> = if info.fstype == "cgroup2" {
            Vec::new()
        } else {
            info.super_options
                .split(',')
                .filter(|o| {
                    !matches!(*o, "rw" | "ro")
                        && !o.starts_with("release_agent")
                        && *o != "xattr"
                        && *o != "noprefix"
                        && *o != "clone_children"
                        && *o != "nsdelegate"
                        && *o != "cpuset_v2_mode"
                        && *o != "memory_recursiveprot"
                        && *o != "favordynmods"
                })
                .collect()
        };
        let key = controllers.join(",");
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        let from_procs = cgroup_procs
            .iter()
            .find(|p| p.starts_with(&info.mount_point))
            .and_then(|p| p.parent())
            .map(Path::to_path_buf);
        let source = from_procs.unwrap_or_else(|| {
            // /proc/self/cgroup: "ID:controllers:path"; v2 has empty controllers.
            let path = own_cgroups
                .lines()
                .filter_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    Some((parts.next()?, parts.next()?, parts.next()?))
                })
                .find(|(_, ctrls, _)| {
                    let mut a: Vec<&str> = ctrls.split(',').filter(|c| !c.is_empty()).collect();
                    let mut b = controllers.clone();
                    a.sort_unstable();
                    b.sort_unstable();
                    a == b
                })
                .map(|(_, _, p)| p.to_owned())
                .unwrap_or_else(|| "/".into());
            // The mount may show a sub-tree (its root field) of the hierarchy.
            let rel = Path::new(&path)
                .strip_prefix(&info.root)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            info.mount_point.join(rel)
        });
        let name = info
            .mount_point
            .strip_prefix(base)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let aliases = controllers
            .iter()
            .map(|c| c.trim_start_matches("name=").to_owned())
            .filter(|c| *c != name && !name.is_empty() && !c.is_empty())
            .collect();
        out.push(CgroupBind {
            name,
            source,
            aliases,
        });
    }
    out
}

fn mount_cgroups(
    root: BorrowedFd<'_>,
    m: &MountPlan,
    cgroups: &[CgroupBind],
) -> Result<(), MountError> {
    let rel = m.relative();
    let target = mkdir_all(root, rel)?;
    let bind_flags = m.flags
        & (MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    // v2 only: the container's cgroup directory is the mount.
    if let [only] = cgroups
        && only.name.is_empty()
    {
        let bind = MountPlan {
            source: only.source.to_string_lossy().into_owned(),
            kind: MountKind::Bind { recursive: false },
            ..m.clone()
        };
        mount(
            Some(&only.source),
            &fd_path(target.as_fd()),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|errno| mount_err(&bind, errno))?;
        let mounted = open_in_root(root, rel, OFlags::PATH).map_err(resolve_err(m))?;
        remount_bind(mounted.as_fd(), &m.destination, bind_flags, m.cleared)?;
        return finish(mounted.as_fd(), m);
    }
    let base_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        &fd_path(target.as_fd()),
        Some("tmpfs"),
        base_flags,
        Some("mode=755"),
    )
    .map_err(|errno| mount_err(m, errno))?;
    let tmpfs =
        open_in_root(root, rel, OFlags::PATH | OFlags::DIRECTORY).map_err(resolve_err(m))?;
    let mut binds = Vec::with_capacity(cgroups.len());
    for cg in cgroups {
        let sub = rel.join(&cg.name);
        let dir = mkdir_all(root, &sub)?;
        let shown = m.destination.join(&cg.name);
        mount(
            Some(&cg.source),
            &fd_path(dir.as_fd()),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|errno| MountError::Mount {
            source_path: cg.source.to_string_lossy().into_owned(),
            target: shown.clone(),
            fstype: "bind".into(),
            errno,
        })?;
        binds.push((sub, shown));
        for alias in &cg.aliases {
            match rustix::fs::symlinkat(cg.name.as_str(), &tmpfs, alias.as_str()) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => {
                    return Err(MountError::Create {
                        path: m.destination.join(alias),
                        errno: to_errno(e),
                    });
                }
            }
        }
    }
    // The tmpfs and every bind on it take the options in one call: a
    // remount per hierarchy (and a statvfs each for its locked flags) was a
    // third of the container's mount work on a v1 host.
    let attrs = RecursiveAttrs {
        set: mount_attrs(bind_flags),
        clear: mount_attrs(m.cleared),
    };
    match mount_setattr_recursive(tmpfs.as_fd(), &m.destination, attrs) {
        Ok(()) => {}
        Err(MountError::SetAttr {
            errno: Errno::ENOSYS,
            ..
        }) => {
            // Before Linux 5.12: one remount each.
            for (sub, shown) in &binds {
                let mounted =
                    open_in_root(root, sub, OFlags::PATH).map_err(|errno| MountError::Resolve {
                        path: shown.clone(),
                        errno,
                    })?;
                remount_bind(mounted.as_fd(), shown, bind_flags, m.cleared)?;
            }
            if m.flags.contains(MsFlags::MS_RDONLY) {
                mount(
                    None::<&str>,
                    &fd_path(tmpfs.as_fd()),
                    None::<&str>,
                    MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | base_flags,
                    Some("mode=755"),
                )
                .map_err(|errno| MountError::Remount {
                    target: m.destination.clone(),
                    flags: MsFlags::MS_RDONLY,
                    errno,
                })?;
            }
        }
        Err(e) => return Err(e),
    }
    finish(tmpfs.as_fd(), m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_mount(json: &str) -> Mount {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn bind_options_are_parsed() {
        let m = MountPlan::from_spec(&spec_mount(
            r#"{"destination":"/data","type":"bind","source":"/src","options":["rbind","ro","nosuid","rslave","rro"]}"#,
        ))
        .unwrap();
        assert_eq!(m.kind, MountKind::Bind { recursive: true });
        assert!(m.flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID));
        assert_eq!(m.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
        assert_eq!(m.recursive.set, libc::MOUNT_ATTR_RDONLY);
    }

    #[test]
    fn id_maps_make_a_bind_idmapped() {
        let maps = r#""uidMappings":[{"containerID":0,"hostID":200000,"size":65536}],"gidMappings":[{"containerID":0,"hostID":200000,"size":65536}]"#;
        let m = MountPlan::from_spec(&spec_mount(&format!(
            r#"{{"destination":"/data","type":"bind","source":"/src","options":["rbind","idmap"],{maps}}}"#
        )))
        .unwrap();
        let idmap = m.idmap.expect("idmapped");
        assert_eq!(idmap.uid_mappings[0].host_id(), 200_000);
        assert!(idmap.tree.is_none(), "made by the caller, later");

        let refused = |json: String, why: &str| match MountPlan::from_spec(&spec_mount(&json)) {
            Err(MountError::BadIdmap { .. } | MountError::Unsupported { .. }) => {}
            other => panic!("{why}: {other:?}"),
        };
        refused(
            format!(r#"{{"destination":"/t","type":"tmpfs","source":"tmpfs",{maps}}}"#),
            "not a bind",
        );
        refused(
            r#"{"destination":"/d","type":"bind","source":"/s","options":["bind"],"uidMappings":[{"containerID":0,"hostID":1,"size":1}]}"#.into(),
            "uid maps without gid maps",
        );
        refused(
            r#"{"destination":"/d","type":"bind","source":"/s","options":["bind","idmap"]}"#.into(),
            "idmap without maps",
        );
    }

    #[test]
    fn an_idmapped_tree_shows_the_owners_through_the_namespace() {
        if !crate::executor::test_support::root_or_skip("idmapped mounts") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        for d in [&src, &dst] {
            std::fs::create_dir(d).expect("dir");
        }
        std::fs::write(src.join("f"), b"x").expect("file");
        std::os::unix::fs::chown(src.join("f"), Some(5), Some(7)).expect("chown");
        let userns = crate::sandbox::userns::Holder::start(
            nix::sched::CloneFlags::empty(),
            &crate::sandbox::namespaces::UserNamespaceMaps::one_range(200_000, 65536),
        )
        .expect("a user namespace");
        let ns = std::fs::File::open(userns.namespace("user")).expect("open userns");
        let mut m = MountPlan::from_spec(&spec_mount(&format!(
            r#"{{"destination":"/data","type":"bind","source":"{}","options":["rbind","ro"],"uidMappings":[{{"containerID":0,"hostID":200000,"size":65536}}],"gidMappings":[{{"containerID":0,"hostID":200000,"size":65536}}]}}"#,
            src.display()
        )))
        .unwrap();
        m.make_idmapped(ns.as_fd()).expect("idmapped tree");
        let tree = m.idmap.as_ref().and_then(|i| i.tree.clone()).expect("tree");
        rustix::mount::move_mount(
            tree.as_fd(),
            "",
            rustix::fs::CWD,
            &dst,
            rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .expect("attach");
        let seen = std::fs::metadata(dst.join("f"));
        let written = std::fs::write(dst.join("g"), b"y");
        nix::mount::umount2(&dst, nix::mount::MntFlags::MNT_DETACH).expect("detach");
        // Owned 5:7 on disk: through the namespace's maps (0.. to
        // 200000..) the host sees 200005:200007, the ids a container in
        // that namespace knows as 5:7.
        use std::os::unix::fs::MetadataExt;
        let seen = seen.expect("stat through the mount");
        assert_eq!((seen.uid(), seen.gid()), (200_005, 200_007));
        assert!(written.is_err(), "made read-only with the mount's flags");
    }

    #[test]
    fn filesystem_data_options_pass_through() {
        let m = MountPlan::from_spec(&spec_mount(
            r#"{"destination":"/dev/shm","type":"tmpfs","source":"shm","options":["nosuid","noexec","nodev","mode=1777","size=65536k"]}"#,
        ))
        .unwrap();
        assert_eq!(m.kind, MountKind::Filesystem);
        assert_eq!(m.data, "mode=1777,size=65536k");
    }

    #[test]
    fn dotdot_destination_is_refused() {
        let err = MountPlan::from_spec(&spec_mount(
            r#"{"destination":"/../../tmp/x","type":"tmpfs","source":"tmpfs"}"#,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("\"..\""), "{err}");
        assert_eq!(
            clean_destination(Path::new("data/x")).unwrap(),
            PathBuf::from("/data/x")
        );
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/bad\\9"), "/bad\\9");
        assert_eq!(unescape("/end\\040"), "/end ");
        assert_eq!(unescape("/caf\u{e9}"), "/caf\u{e9}");
    }

    #[test]
    fn the_cgroup_mounts_alone_give_the_binds_all_of_mountinfo_gives() {
        let infos = mountinfo().unwrap();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let procs = [PathBuf::from("/sys/fs/cgroup/pids/berth/c1/cgroup.procs")];
        let kept = cgroup_mounts(infos.clone());
        assert!(kept.iter().all(|i| i.fstype.starts_with("cgroup")));
        assert!(kept.len() < infos.len());
        assert_eq!(
            cgroup_binds(&kept, &own, &procs),
            cgroup_binds(&infos, &own, &procs)
        );
        // What the daemon hands a monitor survives the trip through JSON.
        let json = serde_json::to_string(&kept).unwrap();
        assert_eq!(serde_json::from_str::<Vec<MountInfo>>(&json).unwrap(), kept);
    }

    #[test]
    fn cgroup_v1_hierarchies_map_to_the_container_cgroup() {
        let mi = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let own = "12:cpu:/mon\n11:cpu,cpuacct:/mon2\n1:name=systemd:/sys\n0::/u\n";
        let procs = [PathBuf::from("/sys/fs/cgroup/cpu/berth/c1/cgroup.procs")];
        let binds = cgroup_binds(&parse_mountinfo(mi), own, &procs);
        assert_eq!(
            binds[0].source,
            PathBuf::from("/sys/fs/cgroup/cpu/berth/c1")
        );
        assert_eq!(
            binds[1].source,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/mon2")
        );
        assert_eq!(
            binds[1].aliases,
            vec!["cpu".to_string(), "cpuacct".to_string()]
        );
        assert_eq!(binds[2].source, PathBuf::from("/sys/fs/cgroup/systemd/sys"));
        assert_eq!(binds[2].aliases, Vec::<String>::new());
        assert_eq!(binds[3].name, "unified");
        assert_eq!(binds[3].source, PathBuf::from("/sys/fs/cgroup/unified/u"));
    }

    #[test]
    fn cgroup_v2_only_host_is_one_bind() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let binds = cgroup_binds(&parse_mountinfo(mi), "0::/kubepods/x\n", &[]);
        assert_eq!(binds.len(), 1);
        assert_eq!(binds[0].name, "");
        assert_eq!(binds[0].source, PathBuf::from("/sys/fs/cgroup/kubepods/x"));
    }
}
