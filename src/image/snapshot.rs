//! Container root filesystems: an overlay of the image's unpacked layers
//! (read-only lowers) and a per-container writable layer under
//! `<root>/containers/<id>/` (`upper/`, `work/`, mounted at `rootfs/`).
//!
//! The overlay is mounted with the new mount API and one `lowerdir+` per
//! layer, so an image with hundreds of layers is not limited by the single
//! page of mount(2) options; kernels before 6.8 lack `lowerdir+` and get
//! mount(2) with the classic option string.
//!
//! A container in a pod with a user namespace of its own sees the layers
//! through an idmapped mount of the layer store (one for all layers, as
//! containerd makes), attached at `<id>/lower` only while the overlay is
//! mounted: the overlay keeps its own references to its layers.

use std::os::fd::AsFd;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};

use crate::image::digest::Digest;
use crate::image::layers::LayerStore;
use crate::image::store::DiskUsage;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("container id {0:?} is not a valid snapshot name")]
    BadId(String),
    #[error("layer {chain_id} of the image is not unpacked; pull the image again")]
    MissingLayer { chain_id: Digest },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount overlay on {target}: {op}: {errno}")]
    Mount {
        target: PathBuf,
        op: &'static str,
        errno: rustix::io::Errno,
    },
    #[error("idmapped layers for {target}: {source}")]
    Idmap {
        target: PathBuf,
        source: crate::executor::mounts::MountError,
    },
}

/// Where a container's image volumes are mounted, under its directory.
const IMAGE_VOLUMES: &str = "image-volumes";

/// The user namespace whose root owns a container's rootfs: its pod's own
/// (`hostUsers: false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdmappedRootfs {
    /// The namespace (an nsfs file).
    pub userns: PathBuf,
    /// The host ids of the namespace's uid 0 and gid 0: the owner of the
    /// writable layer's top directory.
    pub root_uid: u32,
    pub root_gid: u32,
}

/// Where a container's root filesystem comes from and goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    /// Lower dirs, top layer first (overlay's order).
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// The mount point: the rootfs the executor is given.
    pub target: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Snapshots {
    dir: PathBuf,
    layers: LayerStore,
}

impl Snapshots {
    pub fn new(root: &Path, layers: LayerStore) -> Snapshots {
        Snapshots {
            dir: root.join("containers"),
            layers,
        }
    }

    fn container_dir(&self, id: &str) -> Result<PathBuf, SnapshotError> {
        let valid = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && id != "."
            && id != "..";
        if !valid {
            return Err(SnapshotError::BadId(id.to_string()));
        }
        Ok(self.dir.join(id))
    }

    /// Where the containers' writable layers are, one directory per id.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the container's writable layer over the image's layers
    /// (`chain_ids` bottom first, as images list them) and mounts it; with
    /// `idmap`, owned by that user namespace's root. Blocking.
    pub fn prepare(
        &self,
        id: &str,
        chain_ids: &[Digest],
        idmap: Option<&IdmappedRootfs>,
    ) -> Result<RootfsMount, SnapshotError> {
        let dir = self.container_dir(id)?;
        let lower = self.lower_dirs(chain_ids)?;
        let mount = RootfsMount {
            lower,
            upper: dir.join("upper"),
            work: dir.join("work"),
            target: dir.join("rootfs"),
        };
        for path in [&mount.upper, &mount.work, &mount.target] {
            std::fs::create_dir_all(path).map_err(|source| SnapshotError::Io {
                op: "create",
                path: path.clone(),
                source,
            })?;
        }
        let mounted = match idmap {
            None => mount_overlay(&mount.overlay()),
            Some(idmap) => chown(&mount.upper, Some(idmap.root_uid), Some(idmap.root_gid))
                .map_err(|source| SnapshotError::Io {
                    op: "chown",
                    path: mount.upper.clone(),
                    source,
                })
                .and_then(|()| {
                    self.with_idmapped_layers(&dir, &mount.lower, idmap, &mount.target, |lower| {
                        mount_overlay(&Overlay {
                            lower,
                            ..mount.overlay()
                        })
                    })
                }),
        };
        if let Err(e) = mounted {
            let _ = self.remove(id);
            return Err(e);
        }
        Ok(mount)
    }

    /// Mounts an image's layers (`chain_ids` bottom first) read-only at
    /// `<id>/image-volumes/<n>`, for the container's `n`th image volume (a
    /// CRI mount of an image, kubelet's image volume source); with `idmap`,
    /// seen through that user namespace. Removed with the container's
    /// writable layer. Blocking.
    pub fn mount_image_volume(
        &self,
        id: &str,
        n: usize,
        chain_ids: &[Digest],
        idmap: Option<&IdmappedRootfs>,
    ) -> Result<PathBuf, SnapshotError> {
        let dir = self.container_dir(id)?;
        let volumes = dir.join(IMAGE_VOLUMES);
        let target = volumes.join(n.to_string());
        // Without an upper dir, overlay wants two lowers at least: an empty
        // one goes at the bottom.
        let empty = volumes.join("empty");
        let lower = self.lower_dirs(chain_ids)?;
        for path in [&target, &empty] {
            std::fs::create_dir_all(path).map_err(|source| SnapshotError::Io {
                op: "create",
                path: path.clone(),
                source,
            })?;
        }
        let mount = |mut lower: Vec<PathBuf>| {
            lower.push(empty.clone());
            mount_overlay(&Overlay {
                lower,
                upper: None,
                target: &target,
            })
        };
        match idmap {
            None => mount(lower)?,
            Some(idmap) => self.with_idmapped_layers(&dir, &lower, idmap, &target, mount)?,
        }
        Ok(target)
    }

    /// The layer dirs of `chain_ids` (bottom first), top first as overlay
    /// takes them.
    fn lower_dirs(&self, chain_ids: &[Digest]) -> Result<Vec<PathBuf>, SnapshotError> {
        chain_ids
            .iter()
            .rev()
            .map(|chain_id| {
                if self.layers.contains(chain_id) {
                    Ok(self.layers.path(chain_id))
                } else {
                    Err(SnapshotError::MissingLayer {
                        chain_id: chain_id.clone(),
                    })
                }
            })
            .collect()
    }

    /// Runs `mount` with `lower` (layer dirs) seen through an idmapped view
    /// of the layer store, attached at `dir/lower` for as long as the mount
    /// takes: overlay keeps its own references to its layers.
    fn with_idmapped_layers(
        &self,
        dir: &Path,
        lower: &[PathBuf],
        idmap: &IdmappedRootfs,
        target: &Path,
        mount: impl FnOnce(Vec<PathBuf>) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        use rustix::mount::{MoveMountFlags, move_mount};
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { op, path, source }
        };
        let userns = std::fs::File::open(&idmap.userns).map_err(io("open", &idmap.userns))?;
        let layers = self.layers.dir();
        let tree = crate::executor::mounts::idmapped_tree(
            layers,
            false,
            userns.as_fd(),
            libc::MOUNT_ATTR_RDONLY,
        )
        .map_err(|source| SnapshotError::Idmap {
            target: target.to_path_buf(),
            source,
        })?;
        let view = dir.join("lower");
        std::fs::create_dir_all(&view).map_err(io("create", &view))?;
        move_mount(
            tree.as_fd(),
            "",
            rustix::fs::CWD,
            &view,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|errno| SnapshotError::Mount {
            target: target.to_path_buf(),
            op: "attach the idmapped layers",
            errno,
        })?;
        let seen = lower
            .iter()
            .map(|l| view.join(l.strip_prefix(layers).unwrap_or(l)))
            .collect();
        let mounted = mount(seen);
        let detached = detach_layers_view(dir);
        mounted?;
        detached
    }

    /// Takes the container's rootfs out of this mount namespace. Once the
    /// container's init has pivoted into it, the overlay lives on in the
    /// container's own namespace and goes when that does; the copy here is
    /// only weight, since every new container's namespace copies this
    /// namespace's whole mount table. Not mounted (again, or never) is not
    /// an error. Blocking.
    pub fn detach(&self, id: &str) -> Result<(), SnapshotError> {
        let dir = self.container_dir(id)?;
        let mut targets = vec![dir.join("rootfs")];
        // The image volumes too: the container's mount namespace holds its
        // own copies.
        if let Ok(entries) = std::fs::read_dir(dir.join(IMAGE_VOLUMES)) {
            targets.extend(entries.flatten().map(|e| e.path()));
        }
        for target in targets {
            detach_mount(target, "unmount")?;
        }
        Ok(())
    }

    /// Unmounts and deletes the container's writable layer; a container
    /// without one is not an error. Blocking.
    pub fn remove(&self, id: &str) -> Result<(), SnapshotError> {
        let dir = self.container_dir(id)?;
        self.detach(id)?;
        // A crash between attaching the layers' idmapped view and
        // detaching it leaves it here: it must go before anything is
        // deleted below it (it is read-only too).
        detach_layers_view(&dir)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SnapshotError::Io {
                op: "remove",
                path: dir,
                source,
            }),
        }
    }

    /// Bytes and inodes of the container's writable layer.
    pub fn usage(&self, id: &str) -> Result<DiskUsage, SnapshotError> {
        Ok(crate::image::store::disk_usage(
            &self.container_dir(id)?.join("upper"),
        ))
    }
}

/// Detaches the mount at `target`; nothing mounted there (EINVAL), or no
/// `target` at all, is not an error.
fn detach_mount(target: PathBuf, op: &'static str) -> Result<(), SnapshotError> {
    match rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => Ok(()),
        Err(errno) => Err(SnapshotError::Mount { target, op, errno }),
    }
}

/// Detaches and removes `dir/lower`, the idmapped view of the layers;
/// none there is not an error.
fn detach_layers_view(dir: &Path) -> Result<(), SnapshotError> {
    let view = dir.join("lower");
    detach_mount(view.clone(), "detach the idmapped layers")?;
    match std::fs::remove_dir(&view) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SnapshotError::Io {
            op: "remove",
            path: view,
            source,
        }),
    }
}

/// An overlay to mount: lower dirs (top first), and an upper and work dir
/// unless it is read-only.
struct Overlay<'a> {
    lower: Vec<PathBuf>,
    upper: Option<(&'a Path, &'a Path)>,
    target: &'a Path,
}

impl RootfsMount {
    fn overlay(&self) -> Overlay<'_> {
        Overlay {
            lower: self.lower.clone(),
            upper: Some((&self.upper, &self.work)),
            target: &self.target,
        }
    }
}

fn mount_overlay(m: &Overlay<'_>) -> Result<(), SnapshotError> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, fsconfig_create,
        fsconfig_set_string, fsmount, fsopen, move_mount,
    };
    let err = |op: &'static str| {
        move |errno| SnapshotError::Mount {
            target: m.target.to_path_buf(),
            op,
            errno,
        }
    };
    let fs = match fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fs) => fs,
        Err(rustix::io::Errno::NOSYS) => return mount_overlay_legacy(m),
        Err(errno) => return Err(err("fsopen")(errno)),
    };
    for lower in &m.lower {
        match fsconfig_set_string(fs.as_fd(), "lowerdir+", lower) {
            Ok(()) => {}
            // No `lowerdir+` before 6.8.
            Err(rustix::io::Errno::INVAL) if lower == &m.lower[0] => {
                return mount_overlay_legacy(m);
            }
            Err(errno) => return Err(err("fsconfig lowerdir+")(errno)),
        }
    }
    let attrs = match m.upper {
        Some((upper, work)) => {
            fsconfig_set_string(fs.as_fd(), "upperdir", upper).map_err(err("fsconfig upperdir"))?;
            fsconfig_set_string(fs.as_fd(), "workdir", work).map_err(err("fsconfig workdir"))?;
            MountAttrFlags::empty()
        }
        None => MountAttrFlags::MOUNT_ATTR_RDONLY,
    };
    fsconfig_create(fs.as_fd()).map_err(err("fsconfig create"))?;
    let mnt = fsmount(fs.as_fd(), FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(err("fsmount"))?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        m.target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(err("move_mount"))
}

fn mount_overlay_legacy(m: &Overlay<'_>) -> Result<(), SnapshotError> {
    let invalid = |source: std::ffi::NulError| SnapshotError::Io {
        op: "mount options for",
        path: m.target.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, source),
    };
    let lower: Vec<String> = m.lower.iter().map(|p| p.display().to_string()).collect();
    let mut options = format!("lowerdir={}", lower.join(":"));
    let mut flags = rustix::mount::MountFlags::RDONLY;
    if let Some((upper, work)) = m.upper {
        options.push_str(&format!(
            ",upperdir={},workdir={}",
            upper.display(),
            work.display()
        ));
        flags = rustix::mount::MountFlags::empty();
    }
    rustix::mount::mount(
        "overlay",
        m.target,
        "overlay",
        flags,
        std::ffi::CString::new(options).map_err(invalid)?.as_c_str(),
    )
    .map_err(|errno| SnapshotError::Mount {
        target: m.target.to_path_buf(),
        op: "mount",
        errno,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layers::LayerIds;
    use crate::image::unpack::{Compression, Limits};

    fn layer(store: &LayerStore, name: &str, content: &[u8], parent: Option<&Digest>) -> Digest {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, name, content)
            .expect("append");
        let tar = builder.into_inner().expect("tar");
        let diff_id = Digest::of(&tar);
        let chain_id = match parent {
            None => diff_id.clone(),
            Some(p) => Digest::of(format!("{p} {diff_id}").as_bytes()),
        };
        let ids = LayerIds {
            digest: diff_id.clone(),
            diff_id,
            chain_id: chain_id.clone(),
        };
        let limits = Limits {
            max_uncompressed_bytes: 1 << 20,
            max_entries: 10,
        };
        store
            .unpack(&tar[..], Compression::None, &ids, &limits, || Ok(()))
            .expect("unpack");
        chain_id
    }

    #[test]
    fn in_a_user_namespace_the_layers_are_its_roots() {
        if !crate::executor::test_support::root_or_skip("overlayfs, idmapped mounts") {
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().expect("tempdir");
        let layers = LayerStore::open(root.path()).expect("layers");
        let bottom = layer(&layers, "a", b"bottom", None);
        let snapshots = Snapshots::new(root.path(), layers);
        let userns = crate::sandbox::userns::Holder::start(
            nix::sched::CloneFlags::empty(),
            &crate::sandbox::namespaces::UserNamespaceMaps::one_range(200_000, 65536),
        )
        .expect("a user namespace");
        let idmap = IdmappedRootfs {
            userns: userns.namespace("user"),
            root_uid: 200_000,
            root_gid: 200_000,
        };
        let mount = snapshots
            .prepare("c1", &[bottom], Some(&idmap))
            .expect("prepare");
        let guard = scopeguard(&snapshots, "c1");
        // The layer's root-owned file is the namespace's root's, seen from
        // the host; so is the writable top.
        let file = std::fs::metadata(mount.target.join("a")).expect("stat");
        assert_eq!((file.uid(), file.gid()), (200_000, 200_000));
        let top = std::fs::metadata(&mount.target).expect("stat /");
        assert_eq!((top.uid(), top.gid()), (200_000, 200_000));
        assert_eq!(
            std::fs::read(mount.target.join("a")).expect("read"),
            b"bottom"
        );
        // The layers' view went once the overlay held them.
        assert!(!root.path().join("containers/c1/lower").exists());
        let layer_dir = std::fs::metadata(root.path().join("layers")).expect("layers");
        assert_eq!(layer_dir.uid(), 0, "the layers themselves are untouched");
        drop(guard);
        assert!(!root.path().join("containers/c1").exists());
    }

    #[test]
    fn an_image_volume_is_its_layers_read_only_and_goes_with_the_container() {
        if !crate::executor::test_support::root_or_skip("overlayfs") {
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let layers = LayerStore::open(root.path()).expect("layers");
        let bottom = layer(&layers, "a", b"bottom", None);
        let top = layer(&layers, "b", b"top", Some(&bottom));
        let snapshots = Snapshots::new(root.path(), layers);
        let guard = scopeguard(&snapshots, "c1");
        // One layer (overlay then needs the empty one below) and two.
        let one = snapshots
            .mount_image_volume("c1", 0, std::slice::from_ref(&bottom), None)
            .expect("one layer");
        let two = snapshots
            .mount_image_volume("c1", 1, &[bottom, top], None)
            .expect("two layers");
        assert_eq!(std::fs::read(one.join("a")).expect("read"), b"bottom");
        assert!(!one.join("b").exists());
        assert_eq!(std::fs::read(two.join("b")).expect("read"), b"top");
        let write = std::fs::write(two.join("new"), b"x").expect_err("read-only");
        assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");
        drop(guard);
        assert!(!root.path().join("containers/c1").exists());
        assert!(
            root.path()
                .join("layers")
                .read_dir()
                .expect("layers")
                .count()
                >= 2
        );
    }

    #[test]
    fn prepare_mounts_layers_with_a_writable_top_and_remove_cleans_up() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: mounting overlayfs needs root");
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let layers = LayerStore::open(root.path()).expect("layers");
        let bottom = layer(&layers, "a", b"bottom", None);
        let top = layer(&layers, "a", b"top", Some(&bottom));
        let snapshots = Snapshots::new(root.path(), layers);
        let mount = snapshots
            .prepare("c1", &[bottom, top], None)
            .expect("prepare");
        let guard = scopeguard(&snapshots, "c1");
        assert_eq!(std::fs::read(mount.target.join("a")).expect("read"), b"top");
        std::fs::write(mount.target.join("new"), b"w").expect("write to rootfs");
        assert!(
            mount.upper.join("new").exists(),
            "writes land in the upper dir"
        );
        assert!(snapshots.usage("c1").expect("usage").inodes >= 1);
        drop(guard);
        assert!(!root.path().join("containers/c1").exists());
        snapshots.remove("c1").expect("remove is idempotent");

        // The mount(2) fallback for kernels without `lowerdir+`.
        let legacy = RootfsMount {
            target: root.path().join("containers/c3/rootfs"),
            upper: root.path().join("containers/c3/upper"),
            work: root.path().join("containers/c3/work"),
            lower: mount.lower.clone(),
        };
        for dir in [&legacy.target, &legacy.upper, &legacy.work] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        mount_overlay_legacy(&legacy.overlay()).expect("legacy mount");
        let guard = scopeguard(&snapshots, "c3");
        assert_eq!(
            std::fs::read(legacy.target.join("a")).expect("read"),
            b"top"
        );
        drop(guard);
        assert!(!root.path().join("containers/c3").exists());
    }

    #[test]
    fn bad_ids_and_missing_layers_are_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let layers = LayerStore::open(root.path()).expect("layers");
        let snapshots = Snapshots::new(root.path(), layers);
        for bad in ["", "..", "a/b", "../x"] {
            assert!(
                matches!(
                    snapshots.prepare(bad, &[], None),
                    Err(SnapshotError::BadId(_))
                ),
                "{bad:?}"
            );
        }
        let missing = Digest::of(b"nope");
        assert!(matches!(
            snapshots.prepare("c2", &[missing], None),
            Err(SnapshotError::MissingLayer { .. })
        ));
        assert!(!root.path().join("containers/c2").exists());
    }

    struct Guard<'a>(&'a Snapshots, &'a str);

    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let _ = self.0.remove(self.1);
        }
    }

    fn scopeguard<'a>(s: &'a Snapshots, id: &'a str) -> Guard<'a> {
        Guard(s, id)
    }
}
