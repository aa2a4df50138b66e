//! The user a container runs as: the CRI security context's `run_as_*`
//! fields or the image's `USER`, resolved against the container rootfs's
//! `/etc/passwd` and `/etc/group`, plus its supplementary groups.
//!
//! The rootfs belongs to the image, so its files are read with
//! `openat2(RESOLVE_IN_ROOT)`: a symlinked `/etc/passwd -> /etc/shadow` (or
//! `../../host/file`) resolves inside the rootfs, never on the host. The
//! rules are containerd's (`oci.WithUser`, `WithUserID`, `WithUsername`,
//! `WithAdditionalGIDs`, `opts.WithSupplementalGroups`).

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use k8s_cri::v1::{LinuxContainerSecurityContext, SupplementalGroupsPolicy};
use rustix::fs::{Mode, OFlags, ResolveFlags};

/// passwd and group files of real images are a few KiB.
const MAX_USER_FILE_BYTES: u64 = 4 << 20;
/// runc refuses ids above this; containerd follows it.
const MAX_ID: i64 = i32::MAX as i64;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("{field}: user {name:?} is not in the image's /etc/passwd")]
    UnknownUser { field: &'static str, name: String },
    #[error("{field}: user {name:?} cannot be looked up: the image has no /etc/passwd")]
    NoPasswd { field: &'static str, name: String },
    #[error("{field}: group {name:?} is not in the image's /etc/group")]
    UnknownGroup { field: &'static str, name: String },
    #[error("{field}: group {name:?} cannot be looked up: the image has no /etc/group")]
    NoGroupFile { field: &'static str, name: String },
    #[error("{field}: {value:?} is not a valid user: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "security_context.run_as_group is set without run_as_user or run_as_username: a group needs a user"
    )]
    GroupWithoutUser,
    #[error("security_context.supplemental_groups: {0} is not a valid group id")]
    BadSupplementalGroup(i64),
    #[error("security_context.supplemental_groups_policy: unknown policy {0}")]
    BadPolicy(i32),
    #[error("read {path} in the container rootfs {rootfs}: {source}")]
    Read {
        rootfs: PathBuf,
        path: &'static str,
        source: std::io::Error,
    },
}

/// Who the container's process is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Sorted and deduplicated; includes the primary group as containerd
    /// reports it (ContainerStatus' `supplemental_groups`).
    pub additional_gids: Vec<u32>,
    /// The passwd name of the user, when it has an entry.
    pub username: Option<String>,
    /// The passwd home directory, used for `HOME` when the env has none
    /// (what runc's init does).
    pub home: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// The user and groups for a container whose rootfs is mounted at `rootfs`.
/// `image_user` is the image config's `User`.
pub fn resolve(
    rootfs: &Path,
    image_user: &str,
    sc: Option<&LinuxContainerSecurityContext>,
) -> Result<ResolvedUser, UserError> {
    let files = RootFiles::open(rootfs)?;
    let default_sc = LinuxContainerSecurityContext::default();
    let sc = sc.unwrap_or(&default_sc);

    // containerd's GenerateUserString: username beats uid; a group needs one
    // of them; then the image's USER (with its group) if the CRI gave none.
    let cri_user = if !sc.run_as_username.is_empty() {
        Some(sc.run_as_username.clone())
    } else {
        sc.run_as_user.as_ref().map(|u| u.value.to_string())
    };
    let (user_string, field) = match (&cri_user, &sc.run_as_group) {
        (None, Some(_)) => return Err(UserError::GroupWithoutUser),
        (Some(user), Some(group)) => (
            format!("{user}:{}", group.value),
            "security_context.run_as_user/run_as_group",
        ),
        (Some(user), None) => (user.clone(), "security_context.run_as_user"),
        (None, None) => (image_user.to_string(), "image config User"),
    };
    if let Some(u) = &sc.run_as_user {
        check_id(u.value, "security_context.run_as_user", "uid out of range")?;
    }
    if let Some(g) = &sc.run_as_group {
        check_id(g.value, "security_context.run_as_group", "gid out of range")?;
    }

    let mut user = if user_string.is_empty() {
        // Root, with the defaults of a spec that names no user.
        let entry = files
            .passwd()?
            .and_then(|p| p.into_iter().find(|e| e.uid == 0));
        ResolvedUser {
            username: entry.as_ref().map(|e| e.name.clone()),
            home: entry.map(|e| e.home),
            ..ResolvedUser::default()
        }
    } else {
        let mut user = parse_user(&files, &user_string, field)?;
        // WithUser makes the primary group one of the additional ones.
        user.additional_gids = vec![user.gid];
        user
    };

    let policy = SupplementalGroupsPolicy::try_from(sc.supplemental_groups_policy)
        .map_err(|_| UserError::BadPolicy(sc.supplemental_groups_policy))?;
    if policy == SupplementalGroupsPolicy::Merge {
        // Membership is looked up for the user part only: "0" when nothing
        // names a user (containerd's runtime default).
        let member = match &cri_user {
            Some(u) => u.clone(),
            None if !image_user.is_empty() => {
                image_user.split(':').next().unwrap_or_default().to_string()
            }
            None => "0".to_string(),
        };
        let groups = membership(&files, &member)?;
        user.additional_gids.extend(groups);
        if !user.additional_gids.contains(&user.gid) {
            user.additional_gids.push(user.gid);
        }
    }
    for &g in &sc.supplemental_groups {
        if !(0..=MAX_ID).contains(&g) {
            return Err(UserError::BadSupplementalGroup(g));
        }
        user.additional_gids.push(g as u32);
    }
    user.additional_gids.sort_unstable();
    user.additional_gids.dedup();
    Ok(user)
}

fn check_id(value: i64, field: &'static str, reason: &'static str) -> Result<u32, UserError> {
    if (0..=MAX_ID).contains(&value) {
        Ok(value as u32)
    } else {
        Err(UserError::Invalid {
            field,
            value: value.to_string(),
            reason,
        })
    }
}

/// A numeric id as containerd parses one: `Some` for a number (in range),
/// `None` for a name.
fn numeric(
    part: &str,
    field: &'static str,
    whole: &str,
    reason: &'static str,
) -> Result<Option<u32>, UserError> {
    if part.is_empty()
        || !part
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'-' || b == b'+')
    {
        return Ok(None);
    }
    match part.parse::<i64>() {
        Ok(v) => check_id(v, field, reason)
            .map(Some)
            .map_err(|_| UserError::Invalid {
                field,
                value: whole.to_string(),
                reason,
            }),
        Err(_) if part.bytes().all(|b| b.is_ascii_digit()) => Err(UserError::Invalid {
            field,
            value: whole.to_string(),
            reason,
        }),
        Err(_) => Ok(None),
    }
}

/// containerd's `oci.WithUser`: `uid`, `name`, `uid:gid`, `name:gid`,
/// `uid:group`, `name:group`.
fn parse_user(files: &RootFiles, s: &str, field: &'static str) -> Result<ResolvedUser, UserError> {
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        [user] => match numeric(user, field, s, "uid out of range")? {
            // A uid need not be in passwd: then its group is 0.
            Some(uid) => {
                let entry = files
                    .passwd()?
                    .and_then(|p| p.into_iter().find(|e| e.uid == uid));
                Ok(match entry {
                    Some(e) => ResolvedUser {
                        uid,
                        gid: e.gid,
                        username: Some(e.name),
                        home: Some(e.home),
                        ..ResolvedUser::default()
                    },
                    None => ResolvedUser {
                        uid,
                        ..ResolvedUser::default()
                    },
                })
            }
            None => {
                let e = lookup_name(files, user, field)?;
                Ok(ResolvedUser {
                    uid: e.uid,
                    gid: e.gid,
                    username: Some(e.name),
                    home: Some(e.home),
                    ..ResolvedUser::default()
                })
            }
        },
        [user, group] => {
            let mut out = ResolvedUser::default();
            match numeric(user, field, s, "uid out of range")? {
                Some(uid) => {
                    out.uid = uid;
                    // Only for HOME and the name; the uid stands as given.
                    if let Some(e) = files
                        .passwd()?
                        .and_then(|p| p.into_iter().find(|e| e.uid == uid))
                    {
                        out.username = Some(e.name);
                        out.home = Some(e.home);
                    }
                }
                None => {
                    let e = lookup_name(files, user, field)?;
                    out.uid = e.uid;
                    out.username = Some(e.name);
                    out.home = Some(e.home);
                }
            }
            out.gid = match numeric(group, field, s, "gid out of range")? {
                Some(gid) => gid,
                None => {
                    let Some(groups) = files.group()? else {
                        return Err(UserError::NoGroupFile {
                            field,
                            name: group.to_string(),
                        });
                    };
                    groups
                        .into_iter()
                        .find(|g| g.name == *group)
                        .ok_or_else(|| UserError::UnknownGroup {
                            field,
                            name: group.to_string(),
                        })?
                        .gid
                }
            };
            Ok(out)
        }
        _ => Err(UserError::Invalid {
            field,
            value: s.to_string(),
            reason: "expected user, uid, user:group or uid:gid",
        }),
    }
}

fn lookup_name(
    files: &RootFiles,
    name: &str,
    field: &'static str,
) -> Result<PasswdEntry, UserError> {
    let Some(passwd) = files.passwd()? else {
        return Err(UserError::NoPasswd {
            field,
            name: name.to_string(),
        });
    };
    passwd
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| UserError::UnknownUser {
            field,
            name: name.to_string(),
        })
}

/// containerd's `WithAdditionalGIDs`: the groups of /etc/group that list the
/// user as a member, except the one named like the user. A uid without a
/// passwd entry, or an image without the files, has none.
fn membership(files: &RootFiles, user: &str) -> Result<Vec<u32>, UserError> {
    let name = match user.parse::<i64>() {
        Ok(uid) => {
            let found = files
                .passwd()?
                .and_then(|p| p.into_iter().find(|e| i64::from(e.uid) == uid));
            match found {
                Some(e) => e.name,
                None => return Ok(Vec::new()),
            }
        }
        Err(_) => user.to_string(),
    };
    Ok(files
        .group()?
        .unwrap_or_default()
        .into_iter()
        .filter(|g| g.name != name && g.members.contains(&name))
        .map(|g| g.gid)
        .collect())
}

/// The rootfs, opened once; its user files are read on demand.
struct RootFiles {
    root: OwnedFd,
    path: PathBuf,
}

impl RootFiles {
    fn open(rootfs: &Path) -> Result<Self, UserError> {
        let root = rustix::fs::open(
            rootfs,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| UserError::Read {
            rootfs: rootfs.to_path_buf(),
            path: "/",
            source: e.into(),
        })?;
        Ok(RootFiles {
            root,
            path: rootfs.to_path_buf(),
        })
    }

    fn passwd(&self) -> Result<Option<Vec<PasswdEntry>>, UserError> {
        Ok(self.read("/etc/passwd")?.map(|t| parse_passwd(&t)))
    }

    fn group(&self) -> Result<Option<Vec<GroupEntry>>, UserError> {
        Ok(self.read("/etc/group")?.map(|t| parse_group(&t)))
    }

    /// The file's text, `None` when it does not exist. Symlinks resolve
    /// inside the rootfs; a non-regular file (a FIFO would block, a device
    /// would read the host's) is refused.
    fn read(&self, path: &'static str) -> Result<Option<String>, UserError> {
        let err = |source: std::io::Error| UserError::Read {
            rootfs: self.path.clone(),
            path,
            source,
        };
        let fd = match rustix::fs::openat2(
            &self.root,
            path,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(err(e.into())),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| err(e.into()))?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a regular file",
            )));
        }
        let mut text = String::new();
        std::fs::File::from(fd)
            .take(MAX_USER_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(err)?;
        if text.len() as u64 > MAX_USER_FILE_BYTES {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {MAX_USER_FILE_BYTES} bytes"),
            )));
        }
        Ok(Some(text))
    }
}

fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
}

/// `name:password:uid:gid:gecos:home:shell`; lines with bad ids are skipped.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    records(text)
        .filter_map(|f| {
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).map(|h| h.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// `name:password:gid:member,member`.
fn parse_group(text: &str) -> Vec<GroupEntry> {
    records(text)
        .filter_map(|f| {
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|m| !m.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::Int64Value;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        daemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        broken:x:notanumber:1::/:\n";
    const GROUP: &str = "root:x:0:\n\
        wheel:x:10:root,app\n\
        app:x:1000:app\n\
        extra:x:50000:app\n\
        staff:x:50:\n";

    fn rootfs(passwd: Option<&str>, group: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc")).expect("etc");
        if let Some(p) = passwd {
            std::fs::write(dir.path().join("etc/passwd"), p).expect("passwd");
        }
        if let Some(g) = group {
            std::fs::write(dir.path().join("etc/group"), g).expect("group");
        }
        dir
    }

    fn ctx() -> LinuxContainerSecurityContext {
        LinuxContainerSecurityContext::default()
    }

    fn id(v: i64) -> Option<Int64Value> {
        Some(Int64Value { value: v })
    }

    #[test]
    fn no_user_anywhere_is_root_with_roots_memberships() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let u = resolve(root.path(), "", None).expect("resolve");
        assert_eq!((u.uid, u.gid), (0, 0));
        // root is listed in wheel; its own group "root" does not count.
        assert_eq!(u.additional_gids, vec![0, 10]);
        assert_eq!(u.home.as_deref(), Some("/root"));
        assert_eq!(u.username.as_deref(), Some("root"));
    }

    #[test]
    fn image_user_by_name_takes_uid_and_gid_from_passwd() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let u = resolve(root.path(), "app", None).expect("resolve");
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![10, 1000, 50000]);
        assert_eq!(u.home.as_deref(), Some("/home/app"));
    }

    #[test]
    fn image_user_by_uid_in_passwd_takes_its_gid() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let u = resolve(root.path(), "1000", None).expect("resolve");
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.username.as_deref(), Some("app"));
    }

    #[test]
    fn unknown_uid_gets_group_zero() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let u = resolve(root.path(), "4242", None).expect("resolve");
        assert_eq!((u.uid, u.gid), (4242, 0));
        assert_eq!(u.additional_gids, vec![0]);
        assert_eq!(u.username, None);
    }

    #[test]
    fn numeric_user_without_passwd_file_is_fine() {
        let root = rootfs(None, None);
        let u = resolve(root.path(), "123", None).expect("resolve");
        assert_eq!((u.uid, u.gid, u.additional_gids.clone()), (123, 0, vec![0]));
        let u = resolve(root.path(), "123:456", None).expect("resolve");
        assert_eq!((u.uid, u.gid), (123, 456));
    }

    #[test]
    fn named_user_without_passwd_file_is_an_error_naming_it() {
        let root = rootfs(None, None);
        let err = resolve(root.path(), "nginx", None).expect_err("no passwd");
        assert!(matches!(err, UserError::NoPasswd { .. }), "{err}");
        assert!(err.to_string().contains("\"nginx\""), "{err}");
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let err = resolve(root.path(), "nginx", None).expect_err("unknown");
        assert!(err.to_string().contains("image config User"), "{err}");
    }

    #[test]
    fn name_colon_group_resolves_both() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let u = resolve(root.path(), "app:staff", None).expect("resolve");
        assert_eq!((u.uid, u.gid), (1000, 50));
        let u = resolve(root.path(), "app:77", None).expect("resolve");
        assert_eq!((u.uid, u.gid), (1000, 77));
        let u = resolve(root.path(), "1000:staff", None).expect("resolve");
        assert_eq!((u.uid, u.gid), (1000, 50));
        let err = resolve(root.path(), "app:nogroup", None).expect_err("unknown group");
        assert!(matches!(err, UserError::UnknownGroup { .. }), "{err}");
    }

    #[test]
    fn uid_colon_gid_is_taken_as_is() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let u = resolve(root.path(), "1000:3", None).expect("resolve");
        assert_eq!((u.uid, u.gid), (1000, 3));
        // Membership still comes from the user's name.
        assert_eq!(u.additional_gids, vec![3, 10, 50000]);
    }

    #[test]
    fn malformed_user_strings_are_refused() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        for bad in ["a:b:c", "99999999999", "-1"] {
            let err = resolve(root.path(), bad, None).expect_err(bad);
            assert!(matches!(err, UserError::Invalid { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn run_as_user_overrides_the_image_user_and_its_group() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let sc = LinuxContainerSecurityContext {
            run_as_user: id(1),
            ..ctx()
        };
        let u = resolve(root.path(), "app:staff", Some(&sc)).expect("resolve");
        assert_eq!((u.uid, u.gid), (1, 1));
    }

    #[test]
    fn run_as_group_sets_the_primary_group() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let sc = LinuxContainerSecurityContext {
            run_as_user: id(1000),
            run_as_group: id(2000),
            ..ctx()
        };
        let u = resolve(root.path(), "", Some(&sc)).expect("resolve");
        assert_eq!((u.uid, u.gid), (1000, 2000));
        assert_eq!(u.additional_gids, vec![10, 2000, 50000]);
    }

    #[test]
    fn run_as_group_without_a_user_is_refused() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let sc = LinuxContainerSecurityContext {
            run_as_group: id(5),
            ..ctx()
        };
        let err = resolve(root.path(), "app", Some(&sc)).expect_err("group alone");
        assert!(matches!(err, UserError::GroupWithoutUser));
    }

    #[test]
    fn run_as_username_beats_run_as_user() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let sc = LinuxContainerSecurityContext {
            run_as_user: id(1),
            run_as_username: "app".into(),
            ..ctx()
        };
        let u = resolve(root.path(), "", Some(&sc)).expect("resolve");
        assert_eq!((u.uid, u.gid), (1000, 1000));
        let sc = LinuxContainerSecurityContext {
            run_as_username: "ghost".into(),
            ..sc
        };
        let err = resolve(root.path(), "", Some(&sc)).expect_err("ghost");
        assert!(err.to_string().contains("run_as_user"), "{err}");
    }

    #[test]
    fn out_of_range_run_as_user_is_refused() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let sc = LinuxContainerSecurityContext {
            run_as_user: id(-5),
            ..ctx()
        };
        let err = resolve(root.path(), "", Some(&sc)).expect_err("negative");
        assert!(
            err.to_string().contains("security_context.run_as_user"),
            "{err}"
        );
    }

    #[test]
    fn merge_policy_adds_image_memberships_to_supplemental_groups() {
        // cri-tools' SupplementalGroupsPolicy=Merge case.
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let sc = LinuxContainerSecurityContext {
            run_as_user: id(1000),
            supplemental_groups: vec![1234],
            ..ctx()
        };
        let u = resolve(root.path(), "", Some(&sc)).expect("resolve");
        assert_eq!(u.additional_gids, vec![10, 1000, 1234, 50000]);
    }

    #[test]
    fn strict_policy_uses_only_supplemental_groups() {
        // cri-tools' SupplementalGroupsPolicy=Strict case.
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let sc = LinuxContainerSecurityContext {
            run_as_user: id(1000),
            supplemental_groups: vec![1234],
            supplemental_groups_policy: SupplementalGroupsPolicy::Strict as i32,
            ..ctx()
        };
        let u = resolve(root.path(), "", Some(&sc)).expect("resolve");
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![1000, 1234]);
    }

    #[test]
    fn bad_supplemental_groups_and_policies_are_refused() {
        let root = rootfs(Some(PASSWD), Some(GROUP));
        let sc = LinuxContainerSecurityContext {
            supplemental_groups: vec![-1],
            ..ctx()
        };
        assert!(matches!(
            resolve(root.path(), "", Some(&sc)),
            Err(UserError::BadSupplementalGroup(-1))
        ));
        let sc = LinuxContainerSecurityContext {
            supplemental_groups_policy: 7,
            ..ctx()
        };
        assert!(matches!(
            resolve(root.path(), "", Some(&sc)),
            Err(UserError::BadPolicy(7))
        ));
    }

    #[test]
    fn symlinked_passwd_resolves_inside_the_rootfs_not_on_the_host() {
        let host = tempfile::tempdir().expect("host dir");
        let host_file = host.path().join("host-passwd");
        std::fs::write(&host_file, "evil:x:0:0::/:/bin/sh\n").expect("host file");
        let root = rootfs(None, Some(GROUP));
        // An absolute link: followed inside the rootfs, where it does not exist.
        std::os::unix::fs::symlink(&host_file, root.path().join("etc/passwd")).expect("symlink");
        let err = resolve(root.path(), "evil", None).expect_err("escape");
        assert!(matches!(err, UserError::NoPasswd { .. }), "{err}");
        // A relative link climbing out is clamped at the rootfs too.
        std::fs::remove_file(root.path().join("etc/passwd")).expect("rm");
        let climb = format!("../../../../../../..{}", host_file.display());
        std::os::unix::fs::symlink(&climb, root.path().join("etc/passwd")).expect("symlink");
        let err = resolve(root.path(), "evil", None).expect_err("escape");
        assert!(matches!(err, UserError::NoPasswd { .. }), "{err}");
        // A link that stays inside works.
        std::fs::remove_file(root.path().join("etc/passwd")).expect("rm");
        std::fs::write(root.path().join("etc/real-passwd"), PASSWD).expect("real");
        std::os::unix::fs::symlink("/etc/real-passwd", root.path().join("etc/passwd"))
            .expect("symlink");
        assert_eq!(resolve(root.path(), "app", None).expect("inside").uid, 1000);
    }

    #[test]
    fn a_fifo_in_place_of_passwd_is_refused_without_blocking() {
        let root = rootfs(None, None);
        let path = root.path().join("etc/passwd");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo");
        let err = resolve(root.path(), "app", None).expect_err("fifo");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
