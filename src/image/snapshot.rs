//! Container root filesystems: an overlay of the image's unpacked layers
//! (read-only lowers) and a per-container writable layer under
//! `<root>/containers/<id>/` (`upper/`, `work/`, mounted at `rootfs/`).
//!
//! The overlay is mounted with the new mount API and one `lowerdir+` per
//! layer, so an image with hundreds of layers is not limited by the single
//! page of mount(2) options; kernels before 6.8 lack `lowerdir+` and get
//! mount(2) with the classic option string.

use std::os::fd::AsFd;
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
    /// (`chain_ids` bottom first, as images list them) and mounts it.
    /// Blocking.
    pub fn prepare(&self, id: &str, chain_ids: &[Digest]) -> Result<RootfsMount, SnapshotError> {
        let dir = self.container_dir(id)?;
        let mut lower = Vec::with_capacity(chain_ids.len());
        for chain_id in chain_ids.iter().rev() {
            if !self.layers.contains(chain_id) {
                return Err(SnapshotError::MissingLayer {
                    chain_id: chain_id.clone(),
                });
            }
            lower.push(self.layers.path(chain_id));
        }
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
        if let Err(e) = mount_overlay(&mount) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(mount)
    }

    /// Takes the container's rootfs out of this mount namespace. Once the
    /// container's init has pivoted into it, the overlay lives on in the
    /// container's own namespace and goes when that does; the copy here is
    /// only weight, since every new container's namespace copies this
    /// namespace's whole mount table. Not mounted (again, or never) is not
    /// an error. Blocking.
    pub fn detach(&self, id: &str) -> Result<(), SnapshotError> {
        let target = self.container_dir(id)?.join("rootfs");
        match rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => Ok(()),
            Err(errno) => Err(SnapshotError::Mount {
                target,
                op: "unmount",
                errno,
            }),
        }
    }

    /// Unmounts and deletes the container's writable layer; a container
    /// without one is not an error. Blocking.
    pub fn remove(&self, id: &str) -> Result<(), SnapshotError> {
        let dir = self.container_dir(id)?;
        self.detach(id)?;
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

fn mount_overlay(m: &RootfsMount) -> Result<(), SnapshotError> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, fsconfig_create,
        fsconfig_set_string, fsmount, fsopen, move_mount,
    };
    let err = |op: &'static str| {
        move |errno| SnapshotError::Mount {
            target: m.target.clone(),
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
    fsconfig_set_string(fs.as_fd(), "upperdir", &m.upper).map_err(err("fsconfig upperdir"))?;
    fsconfig_set_string(fs.as_fd(), "workdir", &m.work).map_err(err("fsconfig workdir"))?;
    fsconfig_create(fs.as_fd()).map_err(err("fsconfig create"))?;
    let mnt = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::empty(),
    )
    .map_err(err("fsmount"))?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        &m.target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(err("move_mount"))
}

fn mount_overlay_legacy(m: &RootfsMount) -> Result<(), SnapshotError> {
    let invalid = |source: std::ffi::NulError| SnapshotError::Io {
        op: "mount options for",
        path: m.target.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, source),
    };
    let lower: Vec<String> = m.lower.iter().map(|p| p.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        m.upper.display(),
        m.work.display()
    );
    rustix::mount::mount(
        "overlay",
        &m.target,
        "overlay",
        rustix::mount::MountFlags::empty(),
        std::ffi::CString::new(options).map_err(invalid)?.as_c_str(),
    )
    .map_err(|errno| SnapshotError::Mount {
        target: m.target.clone(),
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
        let mount = snapshots.prepare("c1", &[bottom, top]).expect("prepare");
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
        mount_overlay_legacy(&legacy).expect("legacy mount");
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
                matches!(snapshots.prepare(bad, &[]), Err(SnapshotError::BadId(_))),
                "{bad:?}"
            );
        }
        let missing = Digest::of(b"nope");
        assert!(matches!(
            snapshots.prepare("c2", &[missing]),
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
