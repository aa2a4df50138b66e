//! Field-by-field tests of the CRI → OCI translation, each against what
//! containerd 2 produces for the same request.

use super::*;
use k8s_cri::v1::{
    Capability as CriCapability, ContainerMetadata, Device, HugepageLimit, IdMapping, ImageSpec,
    KeyValue, LinuxContainerConfig, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    Mount as CriMount, NamespaceOption, PodSandboxMetadata, UserNamespace,
};
use tempfile::TempDir;

struct Fx {
    dir: TempDir,
    config: ContainerConfig,
    sandbox: PodSandboxConfig,
    image: ImageConfigFile,
    host: HostInfo,
    ns: PodNamespaces,
    files: PodFiles,
    user: ResolvedUser,
    pids: Option<i64>,
    image_volumes: HashMap<usize, PathBuf>,
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::tempdir().expect("tempdir");
        let pod = dir.path().join("pod");
        std::fs::create_dir_all(pod.join("shm")).expect("pod dir");
        std::fs::create_dir_all(dir.path().join("rootfs")).expect("rootfs");
        std::fs::create_dir_all(dir.path().join("dev")).expect("dev");
        std::fs::write(pod.join("hostname"), "pod-host\n").expect("hostname");
        std::fs::write(pod.join("resolv.conf"), "nameserver 10.0.0.10\n").expect("resolv");
        let root = dir.path().display().to_string();
        // The temp dir lives on a shared mount and a slave mount below it.
        std::fs::write(
            dir.path().join("mountinfo"),
            format!(
                "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                 30 22 0:40 / {root}/slave rw master:7 - tmpfs tmpfs rw\n\
                 31 22 0:41 / {root}/private rw - tmpfs tmpfs rw\n\
                 32 22 0:42 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
            ),
        )
        .expect("mountinfo");
        std::fs::write(
            dir.path().join("apparmor-profiles"),
            "my-profile (enforce)\nother (complain)\n",
        )
        .expect("profiles");
        let host = HostInfo {
            cgroup_v2: true,
            swap_controller: true,
            hugetlb_controller: true,
            apparmor: false,
            hostname: "node-1".into(),
            last_cap: 40,
            current_caps: None,
            arch: "amd64".into(),
            kernel: (6, 1),
            cgroup_mount_options: vec!["nsdelegate".into(), "memory_recursiveprot".into()],
            mountinfo: dir.path().join("mountinfo"),
            apparmor_profiles: dir.path().join("apparmor-profiles"),
            dev_dir: dir.path().join("dev"),
        };
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "web".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: "docker.io/library/busybox:latest".into(),
                ..ImageSpec::default()
            }),
            ..ContainerConfig::default()
        };
        let sandbox = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "pod".into(),
                uid: "uid-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "pod-host".into(),
            ..PodSandboxConfig::default()
        };
        let mut image = ImageConfigFile::default();
        image.config.cmd = Some(vec!["sh".into()]);
        let ns = PodNamespaces {
            net: Some(pod.join("ns/net")),
            ipc: Some(pod.join("ns/ipc")),
            uts: Some(pod.join("ns/uts")),
            pid: None,
            target_pid: None,
            user: None,
        };
        let files = PodFiles {
            hostname: pod.join("hostname"),
            resolv_conf: pod.join("resolv.conf"),
            shm: Some(pod.join("shm")),
        };
        Fx {
            dir,
            config,
            sandbox,
            image,
            host,
            ns,
            files,
            user: ResolvedUser::default(),
            pids: None,
            image_volumes: HashMap::new(),
        }
    }

    fn build(&self) -> Result<Spec, SpecError> {
        let rootfs = self.dir.path().join("rootfs");
        let volumes = self.dir.path().join("volumes");
        build(&SpecInput {
            container_id: "c1",
            sandbox_id: "p1",
            config: &self.config,
            sandbox: &self.sandbox,
            pod_namespaces: self.ns.clone(),
            pod_files: self.files.clone(),
            image: &self.image,
            rootfs: &rootfs,
            cgroups_path: "/kubepods/pod1/c1".into(),
            user: self.user.clone(),
            host: &self.host,
            volumes_dir: &volumes,
            image_volumes: &self.image_volumes,
            pids_limit: self.pids,
        })
    }

    fn spec(&self) -> Spec {
        self.build().expect("spec")
    }

    fn err(&self) -> String {
        self.build().expect_err("an error").to_string()
    }

    fn sc(&mut self) -> &mut LinuxContainerSecurityContext {
        self.config
            .linux
            .get_or_insert_with(LinuxContainerConfig::default)
            .security_context
            .get_or_insert_with(LinuxContainerSecurityContext::default)
    }

    fn res(&mut self) -> &mut LinuxContainerResources {
        self.config
            .linux
            .get_or_insert_with(LinuxContainerConfig::default)
            .resources
            .get_or_insert_with(LinuxContainerResources::default)
    }

    fn privileged_pod(&mut self) {
        self.sandbox.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                privileged: true,
                ..LinuxSandboxSecurityContext::default()
            }),
            ..LinuxPodSandboxConfig::default()
        });
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

fn args(spec: &Spec) -> Vec<String> {
    spec.process()
        .as_ref()
        .expect("process")
        .args()
        .clone()
        .expect("args")
}

fn env(spec: &Spec) -> Vec<String> {
    spec.process()
        .as_ref()
        .expect("process")
        .env()
        .clone()
        .expect("env")
}

fn caps(spec: &Spec) -> Vec<String> {
    let c = spec
        .process()
        .as_ref()
        .expect("process")
        .capabilities()
        .clone()
        .expect("caps");
    let mut out: Vec<String> = c
        .bounding()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .expect("cap")
                .as_str()
                .expect("str")
                .to_string()
        })
        .collect();
    assert_eq!(c.effective(), c.bounding());
    assert_eq!(c.permitted(), c.bounding());
    assert!(c.inheritable().as_ref().is_none_or(|i| i.is_empty()));
    assert!(c.ambient().as_ref().is_none_or(|a| a.is_empty()));
    out.sort();
    out
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

fn linux(spec: &Spec) -> &oci_spec::runtime::Linux {
    spec.linux().as_ref().expect("linux")
}

fn mount_at<'a>(spec: &'a Spec, dst: &str) -> Option<&'a Mount> {
    spec.mounts()
        .as_ref()
        .expect("mounts")
        .iter()
        .find(|m| m.destination() == Path::new(dst))
}

fn options(m: &Mount) -> Vec<String> {
    m.options().clone().unwrap_or_default()
}

fn namespaces(spec: &Spec) -> Vec<(LinuxNamespaceType, Option<PathBuf>)> {
    linux(spec)
        .namespaces()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|n| (n.typ(), n.path().clone()))
        .collect()
}

fn seccomp_names(spec: &Spec) -> Vec<String> {
    linux(spec)
        .seccomp()
        .as_ref()
        .expect("seccomp")
        .syscalls()
        .clone()
        .unwrap_or_default()
        .iter()
        .filter(|s| {
            s.action() == LinuxSeccompAction::ScmpActAllow
                && s.args().as_ref().is_none_or(|a| a.is_empty())
        })
        .flat_map(|s| s.names().clone())
        .collect()
}

fn cri_mount(container: &str, host: &Path) -> CriMount {
    CriMount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        ..CriMount::default()
    }
}

// ------------------------------------------------------------ command/args

#[test]
fn image_entrypoint_and_cmd_are_used_without_command_or_args() {
    let mut fx = Fx::new();
    fx.image.config.entrypoint = Some(vec!["/entry".into()]);
    fx.image.config.cmd = Some(vec!["a".into(), "b".into()]);
    assert_eq!(args(&fx.spec()), ["/entry", "a", "b"]);
}

#[test]
fn command_replaces_entrypoint_and_drops_image_cmd() {
    let mut fx = Fx::new();
    fx.image.config.entrypoint = Some(vec!["/entry".into()]);
    fx.image.config.cmd = Some(vec!["a".into()]);
    fx.config.command = vec!["/bin/sleep".into()];
    assert_eq!(args(&fx.spec()), ["/bin/sleep"]);
}

#[test]
fn args_replace_cmd_and_keep_entrypoint() {
    let mut fx = Fx::new();
    fx.image.config.entrypoint = Some(vec!["/entry".into()]);
    fx.image.config.cmd = Some(vec!["a".into()]);
    fx.config.args = vec!["x".into()];
    assert_eq!(args(&fx.spec()), ["/entry", "x"]);
}

#[test]
fn command_and_args_replace_both() {
    let mut fx = Fx::new();
    fx.image.config.entrypoint = Some(vec!["/entry".into()]);
    fx.config.command = vec!["sh".into(), "-c".into()];
    fx.config.args = vec!["echo hi".into()];
    assert_eq!(args(&fx.spec()), ["sh", "-c", "echo hi"]);
}

#[test]
fn an_empty_string_entrypoint_means_none() {
    let mut fx = Fx::new();
    fx.image.config.entrypoint = Some(vec![String::new()]);
    fx.image.config.cmd = Some(vec!["top".into()]);
    assert_eq!(args(&fx.spec()), ["top"]);
}

#[test]
fn no_command_anywhere_is_an_error() {
    let mut fx = Fx::new();
    fx.image.config.cmd = None;
    assert!(fx.err().contains("no command specified"), "{}", fx.err());
}

// ------------------------------------------------------------------ env

#[test]
fn env_merges_image_and_cri_with_cri_winning_and_a_default_path() {
    let mut fx = Fx::new();
    fx.image.config.env = Some(vec!["A=image".into(), "B=image".into()]);
    fx.config.envs = vec![KeyValue {
        key: "B".into(),
        value: "cri".into(),
    }];
    assert_eq!(
        env(&fx.spec()),
        [
            DEFAULT_PATH_ENV,
            "HOSTNAME=pod-host",
            "A=image",
            "B=cri",
            "HOME=/"
        ]
    );
}

#[test]
fn image_path_replaces_the_default_path_in_place() {
    let mut fx = Fx::new();
    fx.image.config.env = Some(vec!["PATH=/opt/bin".into(), "UNSET_ME".into()]);
    let e = env(&fx.spec());
    assert_eq!(e[0], "PATH=/opt/bin");
    assert!(!e.iter().any(|v| v.starts_with("UNSET_ME")));
}

#[test]
fn home_comes_from_passwd_unless_set() {
    let mut fx = Fx::new();
    fx.user.home = Some("/home/app".into());
    assert!(env(&fx.spec()).contains(&"HOME=/home/app".to_string()));
    fx.config.envs = vec![KeyValue {
        key: "HOME".into(),
        value: "/custom".into(),
    }];
    let e = env(&fx.spec());
    assert!(
        e.contains(&"HOME=/custom".to_string())
            && e.iter().filter(|v| v.starts_with("HOME=")).count() == 1
    );
}

#[test]
fn host_network_pods_get_the_node_hostname_in_env() {
    let mut fx = Fx::new();
    fx.sandbox.hostname.clear();
    assert!(env(&fx.spec()).contains(&"HOSTNAME=node-1".to_string()));
}

#[test]
fn tty_sets_terminal_and_term() {
    let mut fx = Fx::new();
    fx.config.tty = true;
    let spec = fx.spec();
    assert_eq!(spec.process().as_ref().expect("p").terminal(), Some(true));
    assert!(env(&spec).contains(&"TERM=xterm".to_string()));
}

// ------------------------------------------------------------ cwd, user

#[test]
fn working_dir_from_cri_then_image_then_root() {
    let mut fx = Fx::new();
    let cwd = |fx: &Fx| fx.spec().process().as_ref().expect("p").cwd().clone();
    assert_eq!(cwd(&fx), PathBuf::from("/"));
    fx.image.config.working_dir = "/srv".into();
    assert_eq!(cwd(&fx), PathBuf::from("/srv"));
    fx.config.working_dir = "/work".into();
    assert_eq!(cwd(&fx), PathBuf::from("/work"));
    fx.config.working_dir = "relative".into();
    assert!(fx.err().contains("working_dir"));
}

#[test]
fn resolved_user_goes_into_the_process() {
    let mut fx = Fx::new();
    fx.user = ResolvedUser {
        uid: 1000,
        gid: 1000,
        additional_gids: vec![1000, 1234],
        ..ResolvedUser::default()
    };
    let spec = fx.spec();
    let user = spec.process().as_ref().expect("p").user();
    assert_eq!((user.uid(), user.gid()), (1000, 1000));
    assert_eq!(user.additional_gids().clone(), Some(vec![1000, 1234]));
}

#[test]
fn stop_signal_defaults_to_sigterm() {
    let mut image = ImageConfigFile::default();
    assert_eq!(stop_signal(&image), "SIGTERM");
    image.config.stop_signal = "SIGQUIT".into();
    assert_eq!(stop_signal(&image), "SIGQUIT");
}

// ---------------------------------------------------------------- mounts

#[test]
fn default_mounts_are_containerds() {
    let spec = Fx::new().spec();
    let proc_ = mount_at(&spec, "/proc").expect("proc");
    assert_eq!(proc_.typ().as_deref(), Some("proc"));
    let pts = mount_at(&spec, "/dev/pts").expect("devpts");
    assert_eq!(
        options(pts),
        [
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
            "gid=5"
        ]
    );
    assert_eq!(
        mount_at(&spec, "/dev").expect("dev").typ().as_deref(),
        Some("tmpfs")
    );
    assert_eq!(
        mount_at(&spec, "/dev/mqueue")
            .expect("mqueue")
            .typ()
            .as_deref(),
        Some("mqueue")
    );
    assert!(options(mount_at(&spec, "/sys").expect("sys")).contains(&"ro".to_string()));
    let cg = mount_at(&spec, "/sys/fs/cgroup").expect("cgroup");
    // With its own cgroup namespace the host's superblock options stay out.
    assert_eq!(options(cg), ["nosuid", "noexec", "nodev", "relatime", "ro"]);
    assert!(mount_at(&spec, "/run").is_none());
}

#[test]
fn host_cgroupns_keeps_the_hosts_cgroup2_options() {
    let mut fx = Fx::new();
    fx.host.cgroup_v2 = false;
    let spec = fx.spec();
    let cg = options(mount_at(&spec, "/sys/fs/cgroup").expect("cgroup"));
    assert!(cg.contains(&"nsdelegate".to_string()), "{cg:?}");
}

#[test]
fn pod_files_are_bind_mounted_read_only_with_a_read_only_rootfs() {
    let mut fx = Fx::new();
    let spec = fx.spec();
    let hostname = mount_at(&spec, "/etc/hostname").expect("hostname");
    assert_eq!(hostname.typ().as_deref(), Some("bind"));
    assert_eq!(hostname.source().clone(), Some(fx.path("pod/hostname")));
    assert_eq!(options(hostname), ["rbind", "rprivate", "rw"]);
    assert!(mount_at(&spec, "/etc/resolv.conf").is_some());
    assert!(
        mount_at(&spec, "/etc/hosts").is_none(),
        "hosts only as kubelet's CRI mount"
    );
    fx.sc().readonly_rootfs = true;
    let spec = fx.spec();
    assert_eq!(
        options(mount_at(&spec, "/etc/resolv.conf").expect("resolv")),
        ["rbind", "rprivate", "ro"]
    );
    assert_eq!(spec.root().as_ref().expect("root").readonly(), Some(true));
}

#[test]
fn pod_shm_replaces_the_default_shm_tmpfs() {
    let fx = Fx::new();
    let spec = fx.spec();
    let shm: Vec<&Mount> = spec
        .mounts()
        .as_ref()
        .expect("mounts")
        .iter()
        .filter(|m| m.destination() == Path::new("/dev/shm"))
        .collect();
    assert_eq!(shm.len(), 1);
    assert_eq!(shm[0].source().clone(), Some(fx.path("pod/shm")));
    assert_eq!(options(shm[0]), ["rbind", "rprivate", "rw"]);
}

#[test]
fn host_ipc_gets_the_hosts_dev_shm() {
    let mut fx = Fx::new();
    fx.ns.ipc = None;
    fx.files.shm = None;
    let spec = fx.spec();
    let shm = mount_at(&spec, "/dev/shm").expect("shm");
    assert_eq!(shm.source().clone(), std::fs::canonicalize("/dev/shm").ok());
}

#[test]
fn cri_mount_propagation_private_is_rprivate() {
    let mut fx = Fx::new();
    let src = fx.path("data");
    fx.config.mounts = vec![cri_mount("/data", &src)];
    let spec = fx.spec();
    let m = mount_at(&spec, "/data").expect("data");
    assert_eq!(options(m), ["rbind", "rprivate", "rw"]);
    assert!(
        src.is_dir(),
        "a missing host path is created as a directory"
    );
    assert_eq!(linux(&spec).rootfs_propagation().clone(), None);
}

#[test]
fn cri_mount_host_to_container_is_rslave_on_a_slave_or_shared_mount() {
    let mut fx = Fx::new();
    let src = fx.path("slave/dir");
    fx.config.mounts = vec![CriMount {
        propagation: MountPropagation::PropagationHostToContainer as i32,
        ..cri_mount("/data", &src)
    }];
    let spec = fx.spec();
    assert_eq!(
        options(mount_at(&spec, "/data").expect("data")),
        ["rbind", "rslave", "rw"]
    );
    assert_eq!(linux(&spec).rootfs_propagation().as_deref(), Some("rslave"));
    fx.config.mounts[0].host_path = fx.path("private/dir").display().to_string();
    assert!(
        fx.err().contains("not a shared or slave mount"),
        "{}",
        fx.err()
    );
}

#[test]
fn cri_mount_bidirectional_is_rshared_and_needs_a_shared_mount() {
    let mut fx = Fx::new();
    let src = fx.path("shared");
    fx.config.mounts = vec![CriMount {
        propagation: MountPropagation::PropagationBidirectional as i32,
        ..cri_mount("/data", &src)
    }];
    let spec = fx.spec();
    assert_eq!(
        options(mount_at(&spec, "/data").expect("data")),
        ["rbind", "rshared", "rw"]
    );
    assert_eq!(
        linux(&spec).rootfs_propagation().as_deref(),
        Some("rshared")
    );
    fx.config.mounts[0].host_path = fx.path("slave/x").display().to_string();
    assert!(fx.err().contains("not a shared mount"), "{}", fx.err());
}

#[test]
fn readonly_and_recursive_read_only_mounts() {
    let mut fx = Fx::new();
    let src = fx.path("ro");
    fx.config.mounts = vec![CriMount {
        readonly: true,
        ..cri_mount("/ro", &src)
    }];
    assert_eq!(
        options(mount_at(&fx.spec(), "/ro").expect("ro")),
        ["rbind", "rprivate", "ro"]
    );
    fx.config.mounts[0].recursive_read_only = true;
    assert_eq!(
        options(mount_at(&fx.spec(), "/ro").expect("ro")),
        ["rbind", "rprivate", "rro"]
    );
    fx.config.mounts[0].readonly = false;
    assert!(
        fx.err().contains("mounts[0].recursive_read_only"),
        "{}",
        fx.err()
    );
    fx.config.mounts[0].readonly = true;
    fx.config.mounts[0].propagation = MountPropagation::PropagationHostToContainer as i32;
    fx.config.mounts[0].host_path = fx.path("slave/ro").display().to_string();
    assert!(
        fx.err().contains("needs private propagation"),
        "{}",
        fx.err()
    );
}

#[test]
fn an_image_volume_binds_its_mounted_image_read_only() {
    let mut fx = Fx::new();
    fx.config.mounts = vec![CriMount {
        container_path: "/models".into(),
        // kubelet asks for it read-write: an image volume is read-only all
        // the same.
        readonly: false,
        image: Some(ImageSpec {
            image: "registry/models:1".into(),
            ..ImageSpec::default()
        }),
        ..CriMount::default()
    }];
    // Not mounted by the caller: refused, not bound from nowhere.
    assert!(fx.err().contains("mounts[0].image"), "{}", fx.err());

    let mounted = fx.path("image-volumes/0");
    std::fs::create_dir_all(&mounted).expect("mounted image");
    fx.image_volumes.insert(0, mounted.clone());
    let spec = fx.spec();
    let m = spec
        .mounts()
        .as_ref()
        .expect("mounts")
        .iter()
        .find(|m| m.destination() == Path::new("/models"))
        .expect("the image volume");
    assert_eq!(m.source().as_deref(), Some(mounted.as_path()));
    let options = m.options().clone().unwrap_or_default();
    assert!(options.contains(&"ro".to_string()), "{options:?}");

    // The image and a host path exclude each other.
    fx.config.mounts[0].host_path = fx.path("elsewhere").display().to_string();
    assert!(fx.err().contains("mounts[0].host_path"), "{}", fx.err());
}

#[test]
fn cri_mounts_override_defaults_and_pod_files_and_sort_by_depth() {
    let mut fx = Fx::new();
    let hosts = fx.path("etc-hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("hosts");
    fx.config.mounts = vec![
        cri_mount("/a/b/c", &fx.path("abc")),
        cri_mount("/etc/hosts", &hosts),
        cri_mount("/etc/hostname", &fx.path("my-hostname-dir")),
        cri_mount("/a", &fx.path("a")),
    ];
    let spec = fx.spec();
    let dsts: Vec<PathBuf> = spec
        .mounts()
        .as_ref()
        .expect("m")
        .iter()
        .map(|m| m.destination().clone())
        .collect();
    let pos = |d: &str| dsts.iter().position(|x| x == Path::new(d)).expect(d);
    assert!(pos("/a") < pos("/a/b/c"));
    assert_eq!(
        dsts.iter()
            .filter(|d| *d == Path::new("/etc/hostname"))
            .count(),
        1
    );
    assert_eq!(
        mount_at(&spec, "/etc/hostname")
            .expect("h")
            .source()
            .clone(),
        Some(fx.path("my-hostname-dir"))
    );
    assert!(mount_at(&spec, "/etc/hosts").is_some());
}

#[test]
fn a_dev_mount_replaces_every_default_under_dev() {
    let mut fx = Fx::new();
    fx.config.mounts = vec![cri_mount("/dev", &fx.path("mydev"))];
    let spec = fx.spec();
    assert!(mount_at(&spec, "/dev/pts").is_none());
    assert!(mount_at(&spec, "/dev/mqueue").is_none());
    assert_eq!(
        mount_at(&spec, "/dev").expect("dev").typ().as_deref(),
        Some("bind")
    );
}

#[test]
fn symlinked_host_paths_are_resolved() {
    let mut fx = Fx::new();
    std::fs::create_dir_all(fx.path("real")).expect("real");
    std::os::unix::fs::symlink(fx.path("real"), fx.path("link")).expect("link");
    fx.config.mounts = vec![cri_mount("/data", &fx.path("link"))];
    assert_eq!(
        mount_at(&fx.spec(), "/data").expect("d").source().clone(),
        Some(fx.path("real"))
    );
    fx.config.mounts[0].host_path = "relative/path".into();
    assert!(fx.err().contains("mounts[0].host_path"), "{}", fx.err());
}

#[test]
fn image_volumes_get_an_empty_dir_each_unless_a_cri_mount_covers_them() {
    let mut fx = Fx::new();
    fx.image.config.volumes = Some(
        [
            ("/var/lib/data", serde_json::json!({})),
            ("/cache", serde_json::json!({})),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    );
    fx.config.mounts = vec![cri_mount("/cache", &fx.path("cache"))];
    let spec = fx.spec();
    let vol = mount_at(&spec, "/var/lib/data").expect("volume");
    let src = vol.source().clone().expect("source");
    assert!(
        src.starts_with(fx.path("volumes")) && src.is_dir(),
        "{src:?}"
    );
    assert_eq!(options(vol), ["rbind", "rprivate", "rw"]);
    assert_eq!(
        mount_at(&spec, "/cache").expect("cache").source().clone(),
        Some(fx.path("cache"))
    );
}

// --------------------------------------------------------------- devices

#[test]
fn default_device_rules_deny_all_then_allow_the_standard_nodes() {
    let spec = Fx::new().spec();
    let rules = linux(&spec)
        .resources()
        .as_ref()
        .expect("r")
        .devices()
        .clone()
        .expect("rules");
    assert_eq!(rules.len(), 12);
    assert!(
        !rules[0].allow()
            && rules[0].access().as_deref() == Some("rwm")
            && rules[0].typ().is_none()
    );
    assert!(rules.iter().any(|r| r.allow()
        && r.typ() == Some(LinuxDeviceType::C)
        && r.major().is_none()
        && r.access().as_deref() == Some("m")));
    assert!(
        rules
            .iter()
            .any(|r| r.allow() && r.major() == Some(1) && r.minor() == Some(3))
    );
    assert!(
        rules
            .iter()
            .any(|r| r.allow() && r.major() == Some(136) && r.minor().is_none())
    );
    assert!(
        linux(&spec).devices().is_none(),
        "the executor makes the default nodes"
    );
}

/// What a cgroup v2 host enforces for them: the rules as one filter.
#[test]
fn default_device_rules_make_a_v2_device_filter() {
    use crate::executor::cgroups::devices::{DeviceRule, Filter};
    let rules: Vec<DeviceRule> = default_device_rules()
        .iter()
        .map(|r| DeviceRule::parse(r).expect("rule"))
        .collect();
    assert_eq!(
        Filter::from_rules(&rules).expect("filter").to_string(),
        "deny all but b *:* m, c *:* m, c 1:3 rwm, c 1:5 rwm, c 1:7 rwm, c 1:8 rwm, c 1:9 rwm, c 5:0 rwm, c 5:1 rwm, c 5:2 rwm, c 136:* rwm"
    );
}

#[test]
fn cri_devices_become_spec_devices_and_allow_rules() {
    let mut fx = Fx::new();
    fx.config.devices = vec![Device {
        container_path: "/dev/mynull".into(),
        host_path: "/dev/null".into(),
        permissions: "rw".into(),
    }];
    let spec = fx.spec();
    let devs = linux(&spec).devices().clone().expect("devices");
    assert_eq!(devs.len(), 1);
    assert_eq!(devs[0].path(), Path::new("/dev/mynull"));
    assert_eq!(
        (devs[0].typ(), devs[0].major(), devs[0].minor()),
        (LinuxDeviceType::C, 1, 3)
    );
    assert_eq!(devs[0].file_mode().map(|m| m & 0o777), Some(0o666));
    let rules = linux(&spec)
        .resources()
        .as_ref()
        .expect("r")
        .devices()
        .clone()
        .expect("rules");
    let last = rules.last().expect("rule");
    assert!(last.allow() && last.major() == Some(1) && last.minor() == Some(3));
    assert_eq!(last.access().as_deref(), Some("rw"));
}

#[test]
fn bad_devices_are_refused_naming_the_field() {
    let mut fx = Fx::new();
    fx.config.devices = vec![Device {
        container_path: "/dev/x".into(),
        host_path: "/dev/null".into(),
        permissions: "rwx".into(),
    }];
    assert!(fx.err().contains("devices[0].permissions"), "{}", fx.err());
    fx.config.devices[0].permissions = "rwm".into();
    fx.config.devices[0].host_path = "/nonexistent/device".into();
    assert!(fx.err().contains("devices[0].host_path"), "{}", fx.err());
    let file = fx.path("regular");
    std::fs::write(&file, "x").expect("file");
    fx.config.devices[0].host_path = file.display().to_string();
    assert!(fx.err().contains("is not a device node"), "{}", fx.err());
}

// ---------------------------------------------------------- capabilities

#[test]
fn default_capabilities_are_containerds() {
    assert_eq!(caps(&Fx::new().spec()), sorted(DEFAULT_CAPABILITIES));
}

#[test]
fn capabilities_are_added_and_dropped_with_or_without_prefix() {
    let mut fx = Fx::new();
    fx.sc().capabilities = Some(CriCapability {
        add_capabilities: vec!["NET_ADMIN".into(), "cap_sys_time".into()],
        drop_capabilities: vec!["CAP_CHOWN".into(), "kill".into()],
        ..CriCapability::default()
    });
    let got = caps(&fx.spec());
    assert!(got.contains(&"CAP_NET_ADMIN".into()) && got.contains(&"CAP_SYS_TIME".into()));
    assert!(!got.contains(&"CAP_CHOWN".into()) && !got.contains(&"CAP_KILL".into()));
    assert_eq!(got.len(), DEFAULT_CAPABILITIES.len());
}

#[test]
fn add_all_gives_every_capability_minus_drops() {
    let mut fx = Fx::new();
    fx.sc().capabilities = Some(CriCapability {
        add_capabilities: vec!["ALL".into()],
        drop_capabilities: vec!["SYS_ADMIN".into()],
        ..CriCapability::default()
    });
    let got = caps(&fx.spec());
    assert_eq!(got.len(), 40);
    assert!(!got.contains(&"CAP_SYS_ADMIN".into()));
}

#[test]
fn drop_all_then_add_leaves_only_the_added() {
    let mut fx = Fx::new();
    fx.sc().capabilities = Some(CriCapability {
        add_capabilities: vec!["NET_BIND_SERVICE".into()],
        drop_capabilities: vec!["all".into()],
        ..CriCapability::default()
    });
    assert_eq!(caps(&fx.spec()), ["CAP_NET_BIND_SERVICE"]);
}

#[test]
fn unknown_capabilities_are_refused() {
    let mut fx = Fx::new();
    fx.sc().capabilities = Some(CriCapability {
        add_capabilities: vec!["FLY".into()],
        ..CriCapability::default()
    });
    assert!(
        fx.err()
            .contains("add_capabilities: unknown capability \"CAP_FLY\""),
        "{}",
        fx.err()
    );
}

#[test]
fn all_capabilities_stop_at_the_kernels_last_cap() {
    let mut fx = Fx::new();
    fx.host.last_cap = 37;
    fx.sc().capabilities = Some(CriCapability {
        add_capabilities: vec!["ALL".into()],
        ..CriCapability::default()
    });
    let got = caps(&fx.spec());
    assert_eq!(got.len(), 38);
    assert!(!got.contains(&"CAP_BPF".into()));
}

#[test]
fn all_capabilities_are_only_those_the_daemon_has() {
    let mut fx = Fx::new();
    // A daemon without CAP_SYS_RESOURCE (24), as in a sandbox.
    fx.host.current_caps = Some(((1u64 << 41) - 1) & !(1 << 24));
    fx.sc().capabilities = Some(CriCapability {
        add_capabilities: vec!["ALL".into()],
        ..CriCapability::default()
    });
    let got = caps(&fx.spec());
    assert_eq!(got.len(), 40);
    assert!(!got.contains(&"CAP_SYS_RESOURCE".into()));
}

// ------------------------------------------------------------ privileged

#[test]
fn privileged_needs_a_privileged_pod() {
    let mut fx = Fx::new();
    fx.sc().privileged = true;
    assert!(fx.err().contains("privileged pod sandbox"), "{}", fx.err());
}

#[test]
fn privileged_gets_everything() {
    let mut fx = Fx::new();
    fx.privileged_pod();
    fx.sc().privileged = true;
    fx.sc().seccomp = Some(SecurityProfile::default());
    fx.sc().masked_paths = vec!["/proc/kcore".into()];
    // One host device in the fake /dev; directories like pts are skipped.
    rustix::fs::symlink("/dev/null", fx.path("dev/null-link")).expect("link");
    std::fs::create_dir_all(fx.path("dev/pts")).expect("pts");
    let spec = fx.spec();
    assert_eq!(caps(&spec).len(), 41);
    let l = linux(&spec);
    assert_eq!(l.masked_paths().clone(), Some(vec![]));
    assert_eq!(l.readonly_paths().clone(), Some(vec![]));
    assert!(l.seccomp().is_none());
    let rules = l
        .resources()
        .as_ref()
        .expect("r")
        .devices()
        .clone()
        .expect("rules");
    assert_eq!(rules.len(), 1);
    assert!(
        rules[0].allow() && rules[0].typ().is_none() && rules[0].access().as_deref() == Some("rwm")
    );
    assert!(options(mount_at(&spec, "/sys").expect("sys")).contains(&"rw".to_string()));
    assert!(options(mount_at(&spec, "/sys/fs/cgroup").expect("cg")).contains(&"rw".to_string()));
    assert!(
        !namespaces(&spec)
            .iter()
            .any(|(t, _)| *t == LinuxNamespaceType::Cgroup)
    );
}

#[test]
fn privileged_gets_the_hosts_devices() {
    let mut fx = Fx::new();
    fx.privileged_pod();
    fx.sc().privileged = true;
    fx.host.dev_dir = PathBuf::from("/dev");
    let spec = fx.spec();
    let devs = linux(&spec).devices().clone().unwrap_or_default();
    assert!(
        devs.iter().any(|d| d.path() == Path::new("/dev/null")),
        "{devs:?}"
    );
    assert!(!devs.iter().any(|d| d.path().starts_with("/dev/pts")));
}

// ------------------------------------------------- masked/readonly paths

#[test]
fn masked_and_readonly_paths_default_to_containerds_lists() {
    let spec = Fx::new().spec();
    let l = linux(&spec);
    assert_eq!(
        l.masked_paths().clone().expect("masked"),
        DEFAULT_MASKED_PATHS
    );
    assert_eq!(
        l.readonly_paths().clone().expect("ro"),
        DEFAULT_READONLY_PATHS
    );
}

#[test]
fn masked_and_readonly_paths_from_cri_replace_the_defaults() {
    let mut fx = Fx::new();
    fx.sc().masked_paths = vec!["/bin/ls".into()];
    fx.sc().readonly_paths = vec!["/tmp".into()];
    let spec = fx.spec();
    assert_eq!(
        linux(&spec).masked_paths().clone(),
        Some(vec!["/bin/ls".to_string()])
    );
    assert_eq!(
        linux(&spec).readonly_paths().clone(),
        Some(vec!["/tmp".to_string()])
    );
}

// ------------------------------------------------ readonly, no_new_privs

#[test]
fn readonly_rootfs_and_no_new_privs() {
    let mut fx = Fx::new();
    let spec = fx.spec();
    assert_eq!(spec.root().as_ref().expect("root").readonly(), Some(false));
    assert_eq!(
        spec.root().as_ref().expect("root").path(),
        &fx.path("rootfs")
    );
    assert_eq!(
        spec.process().as_ref().expect("p").no_new_privileges(),
        Some(false)
    );
    fx.sc().readonly_rootfs = true;
    fx.sc().no_new_privs = true;
    let spec = fx.spec();
    assert_eq!(spec.root().as_ref().expect("root").readonly(), Some(true));
    assert_eq!(
        spec.process().as_ref().expect("p").no_new_privileges(),
        Some(true)
    );
}

// ---------------------------------------------------------------- seccomp

#[test]
fn no_seccomp_profile_is_unconfined() {
    assert!(linux(&Fx::new().spec()).seccomp().is_none());
}

#[test]
fn unconfined_seccomp_is_none() {
    let mut fx = Fx::new();
    fx.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    });
    assert!(linux(&fx.spec()).seccomp().is_none());
}

#[test]
fn runtime_default_seccomp_is_the_default_profile() {
    let mut fx = Fx::new();
    fx.sc().seccomp = Some(SecurityProfile::default());
    let spec = fx.spec();
    let s = linux(&spec).seccomp().clone().expect("seccomp");
    assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActErrno);
    assert_eq!(
        s.architectures().clone(),
        Some(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32
        ])
    );
    let names = seccomp_names(&spec);
    for allowed in ["read", "write", "execve", "arch_prctl", "ptrace"] {
        assert!(names.contains(&allowed.to_string()), "{allowed}");
    }
    for blocked in [
        "unshare",
        "keyctl",
        "mount",
        "reboot",
        "setns",
        "init_module",
    ] {
        assert!(!names.contains(&blocked.to_string()), "{blocked}");
    }
    // clone3 answers ENOSYS without CAP_SYS_ADMIN; clone without ns flags.
    let rules = s.syscalls().clone().expect("rules");
    let clone3 = rules
        .iter()
        .find(|r| r.names() == &["clone3".to_string()])
        .expect("clone3");
    assert_eq!(
        (clone3.action(), clone3.errno_ret()),
        (LinuxSeccompAction::ScmpActErrno, Some(38))
    );
    let clone = rules
        .iter()
        .find(|r| r.names() == &["clone".to_string()])
        .expect("clone");
    let arg = clone.args().clone().expect("args")[0];
    assert_eq!(
        (arg.index(), arg.op()),
        (0, LinuxSeccompOperator::ScmpCmpMaskedEq)
    );
}

#[test]
fn seccomp_rules_gated_by_capabilities_follow_the_bounding_set() {
    let mut fx = Fx::new();
    fx.sc().seccomp = Some(SecurityProfile::default());
    fx.sc().capabilities = Some(CriCapability {
        add_capabilities: vec!["SYS_ADMIN".into(), "SYS_TIME".into()],
        drop_capabilities: vec!["SYS_CHROOT".into()],
        ..CriCapability::default()
    });
    let spec = fx.spec();
    let names = seccomp_names(&spec);
    for allowed in ["mount", "unshare", "setns", "clone3", "settimeofday"] {
        assert!(names.contains(&allowed.to_string()), "{allowed}");
    }
    assert!(!names.contains(&"chroot".to_string()));
    let rules = linux(&spec)
        .seccomp()
        .clone()
        .expect("s")
        .syscalls()
        .clone()
        .expect("r");
    assert!(
        !rules
            .iter()
            .any(|r| r.action() == LinuxSeccompAction::ScmpActErrno),
        "no clone3 ENOSYS with SYS_ADMIN"
    );
}

#[test]
fn seccomp_arch_rules_follow_the_node_arch() {
    let caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    let arm = default_seccomp(&caps, "arm64", (6, 1)).expect("arm64");
    assert_eq!(
        arm.architectures().clone(),
        Some(vec![Arch::ScmpArchArm, Arch::ScmpArchAarch64])
    );
    let names: Vec<String> = arm
        .syscalls()
        .clone()
        .unwrap_or_default()
        .iter()
        .flat_map(|s| s.names().clone())
        .collect();
    assert!(names.contains(&"set_tls".to_string()) && !names.contains(&"arch_prctl".to_string()));
    let s390 = default_seccomp(&caps, "s390x", (6, 1)).expect("s390x");
    let clone = s390
        .syscalls()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|r| r.names() == &["clone".to_string()])
        .expect("clone");
    assert_eq!(clone.args().clone().expect("args")[0].index(), 1);
    // Before 4.8 ptrace stays out.
    let old = default_seccomp(&caps, "amd64", (4, 4)).expect("old");
    assert!(
        !old.syscalls()
            .clone()
            .unwrap_or_default()
            .iter()
            .any(|s| s.names().contains(&"ptrace".to_string()))
    );
}

#[test]
fn localhost_seccomp_reads_an_oci_profile() {
    let mut fx = Fx::new();
    let path = fx.path("block-chmod.json");
    std::fs::write(
        &path,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chmod","fchmodat"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .expect("profile");
    fx.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: path.display().to_string(),
    });
    let spec = fx.spec();
    let s = linux(&spec).seccomp().clone().expect("seccomp");
    assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActAllow);
    assert_eq!(
        s.syscalls().clone().expect("r")[0].names(),
        &["chmod", "fchmodat"]
    );
    fx.sc().seccomp.as_mut().expect("p").localhost_ref =
        fx.path("missing.json").display().to_string();
    assert!(fx.err().contains("seccomp.localhost_ref"), "{}", fx.err());
    std::fs::write(&path, "not json").expect("bad");
    fx.sc().seccomp.as_mut().expect("p").localhost_ref = path.display().to_string();
    assert!(
        fx.err().contains("not a valid OCI seccomp profile"),
        "{}",
        fx.err()
    );
}

#[test]
#[allow(deprecated)]
fn deprecated_seccomp_profile_path_is_understood() {
    let mut fx = Fx::new();
    fx.sc().seccomp_profile_path = "runtime/default".into();
    assert!(linux(&fx.spec()).seccomp().is_some());
    fx.sc().seccomp_profile_path = "unconfined".into();
    assert!(linux(&fx.spec()).seccomp().is_none());
    fx.sc().seccomp_profile_path = "bogus".into();
    assert!(fx.err().contains("seccomp_profile_path"), "{}", fx.err());
}

#[test]
fn localhost_ref_without_localhost_type_is_refused() {
    let mut fx = Fx::new();
    fx.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: "/x.json".into(),
    });
    assert!(fx.err().contains("must only be set"), "{}", fx.err());
}

// --------------------------------------------------------------- apparmor

#[test]
fn apparmor_without_host_support_errors_unless_unconfined_or_unset() {
    let mut fx = Fx::new();
    assert!(
        fx.spec()
            .process()
            .as_ref()
            .expect("p")
            .apparmor_profile()
            .is_none()
    );
    fx.sc().apparmor = Some(SecurityProfile {
        profile_type: ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    });
    assert!(fx.build().is_ok());
    fx.sc().apparmor = Some(SecurityProfile::default());
    assert!(fx.err().contains("apparmor is not enabled"), "{}", fx.err());
}

#[test]
fn apparmor_with_host_support_defaults_to_runtime_default() {
    let mut fx = Fx::new();
    fx.host.apparmor = true;
    let profile = |fx: &Fx| {
        fx.spec()
            .process()
            .as_ref()
            .expect("p")
            .apparmor_profile()
            .clone()
    };
    assert_eq!(profile(&fx).as_deref(), Some(APPARMOR_DEFAULT_PROFILE));
    fx.privileged_pod();
    fx.sc().privileged = true;
    assert_eq!(profile(&fx), None);
}

#[test]
fn apparmor_localhost_profile_must_be_loaded() {
    let mut fx = Fx::new();
    fx.host.apparmor = true;
    fx.sc().apparmor = Some(SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: "localhost/my-profile".into(),
    });
    assert_eq!(
        fx.spec()
            .process()
            .as_ref()
            .expect("p")
            .apparmor_profile()
            .as_deref(),
        Some("my-profile")
    );
    fx.sc().apparmor.as_mut().expect("p").localhost_ref = "missing".into();
    assert!(
        fx.err().contains("\"missing\" is not loaded"),
        "{}",
        fx.err()
    );
}

// ------------------------------------------------------------- namespaces

#[test]
fn pod_namespaces_are_joined_and_mount_cgroup_are_new() {
    let fx = Fx::new();
    let spec = fx.spec();
    let got = namespaces(&spec);
    assert!(got.contains(&(LinuxNamespaceType::Network, Some(fx.path("pod/ns/net")))));
    assert!(got.contains(&(LinuxNamespaceType::Ipc, Some(fx.path("pod/ns/ipc")))));
    assert!(got.contains(&(LinuxNamespaceType::Uts, Some(fx.path("pod/ns/uts")))));
    assert!(got.contains(&(LinuxNamespaceType::Mount, None)));
    assert!(got.contains(&(LinuxNamespaceType::Cgroup, None)));
    assert!(spec.hostname().is_none());
}

#[test]
fn host_namespaces_are_left_out() {
    let mut fx = Fx::new();
    fx.ns.net = None;
    fx.ns.uts = None;
    fx.ns.ipc = None;
    fx.files.shm = None;
    let types: Vec<LinuxNamespaceType> =
        namespaces(&fx.spec()).into_iter().map(|(t, _)| t).collect();
    assert!(!types.contains(&LinuxNamespaceType::Network));
    assert!(!types.contains(&LinuxNamespaceType::Uts));
    assert!(!types.contains(&LinuxNamespaceType::Ipc));
}

#[test]
fn no_cgroup_namespace_on_cgroup_v1() {
    let mut fx = Fx::new();
    fx.host.cgroup_v2 = false;
    assert!(
        !namespaces(&fx.spec())
            .iter()
            .any(|(t, _)| *t == LinuxNamespaceType::Cgroup)
    );
}

fn set_pid_mode(fx: &mut Fx, mode: NamespaceMode) {
    fx.sc().namespace_options = Some(NamespaceOption {
        pid: mode as i32,
        target_id: "target".into(),
        ..NamespaceOption::default()
    });
}

fn pid_ns(fx: &Fx) -> Option<Option<PathBuf>> {
    namespaces(&fx.spec())
        .into_iter()
        .find(|(t, _)| *t == LinuxNamespaceType::Pid)
        .map(|(_, p)| p)
}

#[test]
fn pid_container_mode_is_a_new_namespace() {
    let mut fx = Fx::new();
    set_pid_mode(&mut fx, NamespaceMode::Container);
    assert_eq!(pid_ns(&fx), Some(None));
}

#[test]
fn pid_pod_mode_joins_the_pods_namespace() {
    let mut fx = Fx::new();
    set_pid_mode(&mut fx, NamespaceMode::Pod);
    assert_eq!(pid_ns(&fx), Some(None), "no pod pid namespace: a new one");
    fx.ns.pid = Some(PathBuf::from("/proc/42/ns/pid"));
    assert_eq!(pid_ns(&fx), Some(Some(PathBuf::from("/proc/42/ns/pid"))));
}

#[test]
fn pid_node_mode_is_the_hosts() {
    let mut fx = Fx::new();
    set_pid_mode(&mut fx, NamespaceMode::Node);
    assert_eq!(pid_ns(&fx), None);
}

#[test]
fn pid_target_mode_joins_the_target() {
    let mut fx = Fx::new();
    set_pid_mode(&mut fx, NamespaceMode::Target);
    assert!(fx.err().contains("target_id"), "{}", fx.err());
    fx.ns.target_pid = Some(PathBuf::from("/proc/7/ns/pid"));
    assert_eq!(pid_ns(&fx), Some(Some(PathBuf::from("/proc/7/ns/pid"))));
}

fn pod_userns(host_id: u32) -> UserNamespace {
    let mapping = vec![IdMapping {
        container_id: 0,
        host_id,
        length: 65536,
    }];
    UserNamespace {
        mode: NamespaceMode::Pod as i32,
        uids: mapping.clone(),
        gids: mapping,
    }
}

/// The pod (sandbox config and pinned namespace) and the container both
/// ask for `userns`.
fn set_userns(fx: &mut Fx, userns: Option<UserNamespace>) {
    fx.sandbox
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(Default::default)
        .userns_options = userns.clone();
    fx.sc()
        .namespace_options
        .get_or_insert_with(Default::default)
        .userns_options = userns.clone();
    fx.ns.user = userns
        .filter(|u| u.mode == NamespaceMode::Pod as i32)
        .map(|_| fx.dir.path().join("pod/ns/user"));
}

#[test]
fn node_mode_is_the_hosts_user_namespace() {
    let mut fx = Fx::new();
    set_userns(
        &mut fx,
        Some(UserNamespace {
            mode: NamespaceMode::Node as i32,
            ..UserNamespace::default()
        }),
    );
    let spec = fx.spec();
    let linux = linux(&spec);
    assert!(
        !namespaces(&spec)
            .iter()
            .any(|(t, _)| *t == LinuxNamespaceType::User)
    );
    assert!(linux.uid_mappings().is_none());
}

#[test]
fn a_pods_user_namespace_is_joined_first_with_its_maps_shown() {
    let mut fx = Fx::new();
    set_userns(&mut fx, Some(pod_userns(200_000)));
    let spec = fx.spec();
    let first = namespaces(&spec).first().cloned().expect("namespaces");
    assert_eq!(
        first,
        (
            LinuxNamespaceType::User,
            Some(fx.dir.path().join("pod/ns/user"))
        )
    );
    let map = linux(&spec).uid_mappings().clone().expect("uid maps");
    assert_eq!(
        (map[0].container_id(), map[0].host_id(), map[0].size()),
        (0, 200_000, 65536)
    );
    assert!(linux(&spec).gid_mappings().is_some());
}

#[test]
fn a_containers_user_namespace_must_be_its_pods() {
    let mut fx = Fx::new();
    set_userns(&mut fx, Some(pod_userns(200_000)));
    // Other maps than the pod's.
    fx.sc()
        .namespace_options
        .as_mut()
        .expect("options")
        .userns_options = Some(pod_userns(300_000));
    assert!(fx.err().contains("must be the pod's"), "{}", fx.err());
    // None where the pod has one.
    fx.sc()
        .namespace_options
        .as_mut()
        .expect("options")
        .userns_options = None;
    assert!(fx.err().contains("must be the pod's"), "{}", fx.err());
    // POD mode, but no pinned namespace (a pod made without one).
    set_userns(&mut fx, Some(pod_userns(200_000)));
    fx.ns.user = None;
    assert!(fx.err().contains("no user namespace"), "{}", fx.err());
}

#[test]
fn in_a_pods_user_namespace_volumes_and_pod_files_are_idmapped() {
    let mut fx = Fx::new();
    set_userns(&mut fx, Some(pod_userns(200_000)));
    let volume = fx.dir.path().join("vol");
    std::fs::create_dir_all(&volume).expect("volume");
    let maps = pod_userns(200_000);
    fx.config.mounts = vec![CriMount {
        container_path: "/data".into(),
        host_path: volume.display().to_string(),
        uid_mappings: maps.uids.clone(),
        gid_mappings: maps.gids.clone(),
        ..CriMount::default()
    }];
    let spec = fx.spec();
    let mapped = |dst: &str| {
        let m = spec
            .mounts()
            .as_ref()
            .expect("mounts")
            .iter()
            .find(|m| m.destination() == Path::new(dst))
            .unwrap_or_else(|| panic!("no mount on {dst}"));
        m.uid_mappings()
            .as_ref()
            .map(|u| (u[0].container_id(), u[0].host_id(), u[0].size()))
    };
    for dst in ["/data", "/etc/hostname", "/etc/resolv.conf"] {
        assert_eq!(mapped(dst), Some((0, 200_000, 65536)), "{dst}");
    }
    // tmpfs has idmapped mounts only since Linux 6.3 (containerd too).
    assert_eq!(mapped("/dev/shm"), None);

    // A volume's maps must be the pod's: berth maps through its namespace.
    fx.config.mounts[0].uid_mappings = pod_userns(300_000).uids;
    assert!(fx.err().contains("uid_mappings"), "{}", fx.err());
    // And without a user namespace there is nothing to map through.
    set_userns(&mut fx, None);
    fx.config.mounts[0].uid_mappings = maps.uids;
    assert!(fx.err().contains("uid_mappings"), "{}", fx.err());
}

// -------------------------------------------------------------- resources

#[test]
fn cpu_resources() {
    let mut fx = Fx::new();
    *fx.res() = LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 512,
        cpuset_cpus: "0-1".into(),
        cpuset_mems: "0".into(),
        ..LinuxContainerResources::default()
    };
    let spec = fx.spec();
    let cpu = linux(&spec)
        .resources()
        .as_ref()
        .expect("r")
        .cpu()
        .clone()
        .expect("cpu");
    assert_eq!(
        (cpu.period(), cpu.quota(), cpu.shares()),
        (Some(100_000), Some(50_000), Some(512))
    );
    assert_eq!(
        (cpu.cpus().as_deref(), cpu.mems().as_deref()),
        (Some("0-1"), Some("0"))
    );
    fx.res().cpu_shares = -1;
    assert!(
        fx.err().contains("linux.resources.cpu_shares"),
        "{}",
        fx.err()
    );
}

#[test]
fn memory_limit_sets_swap_to_the_limit_when_swap_is_controllable() {
    let mut fx = Fx::new();
    fx.res().memory_limit_in_bytes = 64 << 20;
    let mem = |fx: &Fx| {
        linux(&fx.spec())
            .resources()
            .as_ref()
            .expect("r")
            .memory()
            .expect("mem")
    };
    assert_eq!(
        (mem(&fx).limit(), mem(&fx).swap()),
        (Some(64 << 20), Some(64 << 20))
    );
    fx.res().memory_swap_limit_in_bytes = 128 << 20;
    assert_eq!(mem(&fx).swap(), Some(128 << 20));
    fx.host.swap_controller = false;
    assert_eq!(mem(&fx).swap(), None);
}

#[test]
fn hugepages_unified_oom_score_and_pids() {
    let mut fx = Fx::new();
    *fx.res() = LinuxContainerResources {
        hugepage_limits: vec![HugepageLimit {
            page_size: "2MB".into(),
            limit: 4 << 20,
        }],
        unified: [("memory.high".to_string(), "1000000".to_string())]
            .into_iter()
            .collect(),
        oom_score_adj: 2000,
        ..LinuxContainerResources::default()
    };
    fx.pids = Some(100);
    let spec = fx.spec();
    let r = linux(&spec).resources().clone().expect("r");
    let huge = r.hugepage_limits().clone().expect("huge");
    assert_eq!(
        (huge[0].page_size().as_str(), huge[0].limit()),
        ("2MB", 4 << 20)
    );
    assert_eq!(
        r.unified().clone().expect("unified")["memory.high"],
        "1000000"
    );
    assert_eq!(r.pids().expect("pids").limit(), 100);
    assert_eq!(
        spec.process().as_ref().expect("p").oom_score_adj(),
        Some(1000)
    );
    assert_eq!(
        linux(&spec).cgroups_path().clone(),
        Some(PathBuf::from("/kubepods/pod1/c1"))
    );
    fx.host.hugetlb_controller = false;
    assert!(
        fx.spec()
            .linux()
            .as_ref()
            .expect("l")
            .resources()
            .as_ref()
            .expect("r")
            .hugepage_limits()
            .is_none()
    );
}

#[test]
fn sysctls_stay_with_the_pod_namespaces() {
    // containerd sets the pod's sysctls on the sandbox only; berth's pod
    // pins apply them when the namespaces are made.
    let mut fx = Fx::new();
    fx.sandbox.linux = Some(LinuxPodSandboxConfig {
        sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())]
            .into_iter()
            .collect(),
        ..LinuxPodSandboxConfig::default()
    });
    assert!(linux(&fx.spec()).sysctl().is_none());
}

// ------------------------------------------------------------ annotations

#[test]
fn annotations_carry_containerds_cri_set_and_the_cri_ones() {
    let mut fx = Fx::new();
    fx.config.annotations = [
        (
            "io.kubernetes.container.hash".to_string(),
            "abc".to_string(),
        ),
        (ANNOTATION_SANDBOX_ID.to_string(), "spoofed".to_string()),
    ]
    .into_iter()
    .collect();
    let spec = fx.spec();
    let a = spec.annotations().clone().expect("annotations");
    assert_eq!(a[ANNOTATION_CONTAINER_TYPE], "container");
    assert_eq!(a[ANNOTATION_SANDBOX_ID], "p1");
    assert_eq!(a[ANNOTATION_CONTAINER_NAME], "web");
    assert_eq!(a[ANNOTATION_IMAGE_NAME], "docker.io/library/busybox:latest");
    assert_eq!(a[ANNOTATION_SANDBOX_NAME], "pod");
    assert_eq!(a[ANNOTATION_SANDBOX_NAMESPACE], "default");
    assert_eq!(a[ANNOTATION_SANDBOX_UID], "uid-1");
    assert_eq!(a["io.kubernetes.container.hash"], "abc");
}

#[test]
fn the_spec_round_trips_through_json() {
    let mut fx = Fx::new();
    fx.sc().seccomp = Some(SecurityProfile::default());
    let spec = fx.spec();
    let json = serde_json::to_string(&spec).expect("encode");
    let back: Spec = serde_json::from_str(&json).expect("decode");
    assert_eq!(back, spec);
}

#[test]
fn mountinfo_parsing_reads_optional_fields_and_escapes() {
    let m = parse_mountinfo(
        "36 35 98:0 /mnt1 /mnt\\040x rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n",
    );
    assert_eq!(m[0].mount_point, PathBuf::from("/mnt x"));
    assert_eq!(m[0].optional, ["master:1", "shared:2"]);
    assert_eq!(m[0].super_options, ["rw", "errors=continue"]);
}
