//! The files a pod's containers share, under `<state>/pods/<id>/`:
//! `hostname`, `resolv.conf` and the `/dev/shm` tmpfs.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount pod /dev/shm on {path}: {errno}")]
    Mount {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("dns_config: {0}")]
    Dns(String),
}

/// What a pod's `resolv.conf` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl Dns {
    /// Checks the values can't break the file's line format.
    pub fn validate(&self) -> Result<(), FilesError> {
        for value in self
            .servers
            .iter()
            .chain(&self.searches)
            .chain(&self.options)
        {
            if value.is_empty()
                || value.len() > 253
                || value.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(FilesError::Dns(format!("{value:?} is not a valid entry")));
            }
        }
        for server in &self.servers {
            server
                .parse::<std::net::IpAddr>()
                .map_err(|_| FilesError::Dns(format!("server {server:?} is not an IP address")))?;
        }
        Ok(())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for server in &self.servers {
            out.push_str(&format!("nameserver {server}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

fn write(path: &Path, contents: &[u8]) -> Result<(), FilesError> {
    std::fs::write(path, contents).map_err(|source| FilesError::Io {
        op: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `hostname` and `resolv.conf` into the pod dir. With no DNS
/// config, the host's resolv.conf is copied, as containerd does.
pub fn write_files(dir: &Path, hostname: &str, dns: Option<&Dns>) -> Result<(), FilesError> {
    write(&dir.join("hostname"), format!("{hostname}\n").as_bytes())?;
    let resolv = match dns {
        Some(dns) => dns.render().into_bytes(),
        None => match std::fs::read(HOST_RESOLV_CONF) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(FilesError::Io {
                    op: "read",
                    path: PathBuf::from(HOST_RESOLV_CONF),
                    source,
                });
            }
        },
    };
    write(&dir.join("resolv.conf"), &resolv)
}

/// Mounts the pod's `/dev/shm` tmpfs at `<dir>/shm`.
pub fn mount_shm(dir: &Path, size: u64) -> Result<PathBuf, FilesError> {
    let path = dir.join("shm");
    std::fs::create_dir_all(&path).map_err(|source| FilesError::Io {
        op: "create",
        path: path.clone(),
        source,
    })?;
    let options = format!("mode=1777,size={size}");
    nix::mount::mount(
        Some("shm"),
        &path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .map_err(|errno| FilesError::Mount {
        path: path.clone(),
        errno,
    })?;
    Ok(path)
}

/// Unmounts the pod's shm; an unmounted or missing one is fine.
pub fn unmount_shm(dir: &Path) -> Result<(), FilesError> {
    let path = dir.join("shm");
    match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(errno) => Err(FilesError::Mount { path, errno }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_dns_config() {
        let dns = Dns {
            servers: vec!["10.96.0.10".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        dns.validate().expect("valid");
        assert_eq!(
            dns.render(),
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn dns_values_that_break_the_format_are_refused() {
        for dns in [
            Dns {
                servers: vec!["not-an-ip".into()],
                ..Dns::default()
            },
            Dns {
                searches: vec!["a b".into()],
                ..Dns::default()
            },
            Dns {
                options: vec!["x\nnameserver 1.1.1.1".into()],
                ..Dns::default()
            },
        ] {
            assert!(dns.validate().is_err(), "{dns:?}");
        }
    }

    #[test]
    fn files_and_shm_are_made_and_unmade() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_files(dir.path(), "pod-a", None).expect("files");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("hostname")).expect("read"),
            "pod-a\n"
        );
        assert!(dir.path().join("resolv.conf").exists());
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping shm: mounting tmpfs needs root");
            return;
        }
        let shm = mount_shm(dir.path(), 1 << 20).expect("shm");
        let stat = nix::sys::statvfs::statvfs(&shm).expect("statvfs");
        assert_eq!(stat.blocks() * stat.fragment_size(), 1 << 20);
        unmount_shm(dir.path()).expect("unmount");
        unmount_shm(dir.path()).expect("unmount again");
    }
}
