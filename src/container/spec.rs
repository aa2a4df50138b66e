//! CRI ContainerConfig + the pod's config + the image config → the OCI
//! runtime spec the executor runs.
//!
//! containerd 2's CRI plugin is the reference, field by field
//! (`internal/cri/server/container_create*.go`, `internal/cri/opts`,
//! `pkg/oci`): when kubelet sends the same request to berth and to
//! containerd, the process should see the same command, env, user, mounts,
//! capabilities, seccomp filter and cgroup limits. Deviations are listed on
//! the items that make them. Everything here is computed from the inputs
//! except what only the host can say: the host side of bind mounts (made if
//! missing, symlinks resolved, propagation checked), device numbers, a
//! Localhost seccomp profile, and the facts in [`HostInfo`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use k8s_cri::v1::{
    ContainerConfig, IdMapping, LinuxContainerResources, LinuxContainerSecurityContext,
    MountPropagation, NamespaceMode, PodSandboxConfig, SecurityProfile,
    security_profile::ProfileType,
};
use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Arch, Capability, LinuxBuilder, LinuxCapabilities, LinuxCpu, LinuxDevice, LinuxDeviceCgroup,
    LinuxDeviceType, LinuxHugepageLimit, LinuxIdMapping, LinuxIdMappingBuilder, LinuxMemory,
    LinuxNamespace, LinuxNamespaceType, LinuxPids, LinuxResources, LinuxSeccomp,
    LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder, LinuxSeccompOperator,
    LinuxSyscall, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, User,
};
use serde::Deserialize;

pub use super::user::ResolvedUser;
use crate::image::manifest::ImageConfigFile;

/// What kubelet documents for a container whose image sets no PATH.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The AppArmor profile a container gets for `runtime/default`
/// (containerd's is `cri-containerd.apparmor.d`). Loading it is the
/// executor's job.
pub const APPARMOR_DEFAULT_PROFILE: &str = "berth-default";
/// containerd's (and Docker's) default seccomp profile, as data.
pub const SECCOMP_DEFAULT_PROFILE: &str = include_str!("seccomp_default.json");

/// containerd's `defaultUnixCaps`.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Capabilities by number; a privileged container gets those up to the
/// kernel's `cap_last_cap`.
const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// `pkg/oci` `populateDefaultUnixSpec`; kubelet sends the same list for
/// `procMount: Default`.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const ANNOTATION_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const ANNOTATION_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const ANNOTATION_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
const ANNOTATION_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
const ANNOTATION_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{field}: {op} {path}: {source}")]
    Io {
        field: String,
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("build the OCI spec: {0}")]
    Oci(String),
}

impl From<OciSpecError> for SpecError {
    fn from(e: OciSpecError) -> Self {
        SpecError::Oci(e.to_string())
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Paths of the pod's namespaces. `None` for net/ipc/uts means the host's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNamespaces {
    pub net: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    /// The pod's shared pid namespace (its infra process's
    /// `/proc/<pid>/ns/pid`), for `NamespaceMode::Pod`.
    pub pid: Option<PathBuf>,
    /// The target container's pid namespace, for `NamespaceMode::Target`.
    pub target_pid: Option<PathBuf>,
    /// The pod's own user namespace (`userns_options` mode POD).
    pub user: Option<PathBuf>,
}

/// The files the sandbox made for its containers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFiles {
    pub hostname: PathBuf,
    pub resolv_conf: PathBuf,
    /// The pod's `/dev/shm`; `None` when the pod uses the host's IPC
    /// namespace, which gets the host's `/dev/shm`.
    pub shm: Option<PathBuf>,
}

/// Facts about the node that change what the spec says. Detected once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// `/sys/fs/cgroup` is cgroup2: containers get a cgroup namespace.
    pub cgroup_v2: bool,
    /// Swap can be limited (containerd's `SwapControllerAvailable`).
    pub swap_controller: bool,
    pub hugetlb_controller: bool,
    pub apparmor: bool,
    /// For `HOSTNAME` in host-network pods, whose config has no hostname.
    pub hostname: String,
    /// `/proc/sys/kernel/cap_last_cap`.
    pub last_cap: usize,
    /// The daemon's own effective capabilities (`CapEff` of
    /// /proc/self/status), `None` if unknown. Fix: "all capabilities"
    /// (privileged, add ALL) is bounded by this, as containerd's
    /// `WithAllCurrentCapabilities`: a daemon that itself lacks one (run
    /// in a container or a sandbox without CAP_SYS_RESOURCE, say) failed
    /// every privileged container with "capset failure: Operation not
    /// permitted".
    pub current_caps: Option<u64>,
    /// Go's name of the node architecture (`amd64`, `arm64`, ...), which
    /// the seccomp profile's `arches` use.
    pub arch: String,
    /// (major, minor) of the running kernel.
    pub kernel: (u32, u32),
    /// `nsdelegate`/`memory_recursiveprot` of the host's cgroup2 mount,
    /// kept on a container's `/sys/fs/cgroup` when it shares the host's
    /// cgroup namespace (the superblock is shared).
    pub cgroup_mount_options: Vec<String>,
    /// Where mount propagation of bind sources is looked up.
    pub mountinfo: PathBuf,
    /// Where loaded AppArmor profiles are listed.
    pub apparmor_profiles: PathBuf,
    /// The host's `/dev`, which privileged containers get in full.
    pub dev_dir: PathBuf,
}

impl HostInfo {
    /// The node's facts, read on first use.
    pub fn get() -> &'static HostInfo {
        static HOST: OnceLock<HostInfo> = OnceLock::new();
        HOST.get_or_init(HostInfo::detect)
    }

    pub fn detect() -> HostInfo {
        let cgroup_v2 = crate::executor::is_cgroup2(std::path::Path::new("/sys/fs/cgroup"));
        let swap_controller = if cgroup_v2 {
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            own.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| Path::new("/sys/fs/cgroup").join(p.trim_start_matches('/')))
                .is_some_and(|dir| dir.join("memory.swap.max").exists())
        } else {
            Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
        };
        let hugetlb_controller = if cgroup_v2 {
            std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "hugetlb"))
        } else {
            Path::new("/sys/fs/cgroup/hugetlb").is_dir()
        };
        let uname = rustix::system::uname();
        let kernel = kernel_release();
        let mountinfo = PathBuf::from("/proc/self/mountinfo");
        let cgroup_mount_options = std::fs::read_to_string(&mountinfo)
            .ok()
            .and_then(|text| {
                parse_mountinfo(&text)
                    .into_iter()
                    .find(|m| m.mount_point == Path::new("/sys/fs/cgroup"))
            })
            .map(|m| {
                m.super_options
                    .into_iter()
                    .filter(|o| o == "nsdelegate" || o == "memory_recursiveprot")
                    .collect()
            })
            .unwrap_or_default();
        HostInfo {
            cgroup_v2,
            swap_controller,
            hugetlb_controller,
            apparmor: crate::executor::lsm::apparmor_enabled(),
            hostname: uname.nodename().to_string_lossy().into_owned(),
            last_cap: std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(ALL_CAPABILITIES.len() - 1),
            current_caps: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("CapEff:"))
                        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                }),
            arch: go_arch().to_string(),
            kernel,
            cgroup_mount_options,
            mountinfo,
            apparmor_profiles: PathBuf::from("/sys/kernel/security/apparmor/profiles"),
            dev_dir: PathBuf::from("/dev"),
        }
    }
}

/// Go's GOARCH for the architecture this binary runs on.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Everything a container's spec is made of.
pub struct SpecInput<'a> {
    pub container_id: &'a str,
    pub sandbox_id: &'a str,
    pub config: &'a ContainerConfig,
    pub sandbox: &'a PodSandboxConfig,
    pub pod_namespaces: PodNamespaces,
    pub pod_files: PodFiles,
    pub image: &'a ImageConfigFile,
    /// The mounted rootfs (spec.root.path).
    pub rootfs: &'a Path,
    /// As the cgroup manager wants it; empty for none.
    pub cgroups_path: String,
    /// From [`super::user::resolve`].
    pub user: ResolvedUser,
    pub host: &'a HostInfo,
    /// Image VOLUMEs get an empty directory each under here.
    pub volumes_dir: &'a Path,
    /// The mounted images of the config's image volumes (CRI mounts of an
    /// image), by the mount's index.
    pub image_volumes: &'a HashMap<usize, PathBuf>,
    /// From berth's config (kubelet sends none).
    pub pids_limit: Option<i64>,
}

/// The running kernel's (major, minor) version; (0, 0) if unreadable.
pub fn kernel_release() -> (u32, u32) {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// The signal StopContainer sends first: the image's `StopSignal`, else
/// SIGTERM.
pub fn stop_signal(image: &ImageConfigFile) -> String {
    let s = image.config.stop_signal.trim();
    if s.is_empty() {
        "SIGTERM".to_string()
    } else {
        s.to_string()
    }
}

/// The OCI spec for a container.
pub fn build(input: &SpecInput) -> Result<Spec, SpecError> {
    let config = input.config;
    let default_sc = LinuxContainerSecurityContext::default();
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .unwrap_or(&default_sc);
    let privileged = sc.privileged;
    if privileged && !pod_privileged(input.sandbox) {
        return Err(invalid(
            "linux.security_context.privileged",
            "a privileged container needs a privileged pod sandbox",
        ));
    }

    let capabilities = capabilities(sc, input.host)?;
    let namespaces = namespaces(input, sc)?;
    let resources = cgroup_resources(
        input.container_id,
        config,
        input.sandbox,
        input.host,
        input.pids_limit,
    )?;
    let (devices, _) = devices(config, input.host, privileged)?;
    let seccomp = seccomp(sc, privileged, &capabilities, input.host)?;
    let apparmor = apparmor(sc, privileged, input.host)?;
    let (masked, readonly) = if privileged {
        (Vec::new(), Vec::new())
    } else {
        (
            paths_or_default(&sc.masked_paths, DEFAULT_MASKED_PATHS),
            paths_or_default(&sc.readonly_paths, DEFAULT_READONLY_PATHS),
        )
    };
    let userns = user_namespace_mappings(sc)?;
    let (mounts, rootfs_propagation) = mounts(input, sc, &namespaces, userns.as_ref())?;

    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources)
        .masked_paths(masked)
        .readonly_paths(readonly)
        .build()?;
    if !devices.is_empty() {
        linux.set_devices(Some(devices));
    }
    if !input.cgroups_path.is_empty() {
        linux.set_cgroups_path(Some(PathBuf::from(&input.cgroups_path)));
    }
    linux.set_seccomp(seccomp);
    linux.set_rootfs_propagation(rootfs_propagation);
    if let Some((uids, gids)) = userns {
        // Joined by path, so the maps are for the reader (`crictl inspect`,
        // as containerd shows them).
        linux.set_uid_mappings(Some(uids));
        linux.set_gid_mappings(Some(gids));
    }

    let mut spec = Spec::default();
    spec.set_version("1.2.0".to_string());
    spec.set_root(Some(
        RootBuilder::default()
            .path(input.rootfs)
            .readonly(sc.readonly_rootfs)
            .build()?,
    ));
    spec.set_mounts(Some(mounts));
    spec.set_process(Some(process(input, sc, &capabilities, apparmor)?));
    spec.set_hostname(None);
    spec.set_hooks(None);
    spec.set_annotations(Some(annotations(input)));
    spec.set_linux(Some(linux));
    Ok(spec)
}

fn pod_privileged(sandbox: &PodSandboxConfig) -> bool {
    sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|s| s.privileged)
}

fn paths_or_default(given: &[String], default: &[&str]) -> Vec<String> {
    if given.is_empty() {
        default.iter().map(|p| p.to_string()).collect()
    } else {
        given.to_vec()
    }
}

// ---------------------------------------------------------------- process

/// kubelet's rule (containerd's `WithProcessArgs`, from Docker): `command`
/// replaces the Entrypoint, `args` replace the Cmd; the image's Cmd is used
/// only when neither is given, and an Entrypoint of `[""]` means none.
pub fn process_args(
    config: &ContainerConfig,
    image: &ImageConfigFile,
) -> Result<Vec<String>, SpecError> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.config.cmd.clone().unwrap_or_default();
        }
        let entrypoint = image.config.entrypoint.clone().unwrap_or_default();
        if !(entrypoint.len() == 1 && entrypoint[0].is_empty()) {
            command = entrypoint;
        }
    }
    command.extend(args);
    if command.is_empty() {
        return Err(invalid(
            "command",
            "no command specified: neither the container config nor the image has a command or entrypoint",
        ));
    }
    Ok(command)
}

/// The environment: the default PATH, TERM for a tty, HOSTNAME, then the
/// image's env and the CRI envs, later ones replacing earlier ones by key
/// (an image entry without `=` unsets). HOME from passwd when unset, as
/// runc's init does.
fn environment(input: &SpecInput) -> Vec<String> {
    let hostname = if input.sandbox.hostname.is_empty() {
        input.host.hostname.clone()
    } else {
        input.sandbox.hostname.clone()
    };
    let mut env: Vec<String> = vec![DEFAULT_PATH_ENV.to_string()];
    if input.config.tty {
        env.push("TERM=xterm".to_string());
    }
    let mut overrides = vec![format!("HOSTNAME={hostname}")];
    overrides.extend(input.image.config.env.clone().unwrap_or_default());
    overrides.extend(
        input
            .config
            .envs
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value)),
    );
    env = merge_env(env, &overrides);
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!(
            "HOME={}",
            input
                .user
                .home
                .as_deref()
                .filter(|h| !h.is_empty())
                .unwrap_or("/")
        ));
    }
    env
}

/// containerd's `replaceOrAppendEnvValues`.
fn merge_env(defaults: Vec<String>, overrides: &[String]) -> Vec<String> {
    let mut out: Vec<Option<String>> = defaults.into_iter().map(Some).collect();
    let key_of = |e: &str| {
        e.split_once('=')
            .map(|(k, _)| k.to_string())
            .unwrap_or_else(|| e.to_string())
    };
    for value in overrides {
        let key = key_of(value);
        let existing = out
            .iter()
            .position(|e| e.as_deref().is_some_and(|e| key_of(e) == key));
        match (value.contains('='), existing) {
            (false, Some(i)) => out[i] = None,
            (false, None) => {}
            (true, Some(i)) => out[i] = Some(value.clone()),
            (true, None) => out.push(Some(value.clone())),
        }
    }
    out.into_iter().flatten().collect()
}

fn process(
    input: &SpecInput,
    sc: &LinuxContainerSecurityContext,
    caps: &[String],
    apparmor: Option<String>,
) -> Result<oci_spec::runtime::Process, SpecError> {
    let config = input.config;
    let cwd = if !config.working_dir.is_empty() {
        config.working_dir.clone()
    } else if !input.image.config.working_dir.is_empty() {
        input.image.config.working_dir.clone()
    } else {
        "/".to_string()
    };
    if !cwd.starts_with('/') {
        return Err(invalid(
            "working_dir",
            format!("{cwd:?} is not an absolute path"),
        ));
    }
    let mut user = User::default();
    user.set_uid(input.user.uid);
    user.set_gid(input.user.gid);
    if !input.user.additional_gids.is_empty() {
        user.set_additional_gids(Some(input.user.additional_gids.clone()));
    }
    let set: HashSet<Capability> = caps
        .iter()
        .map(|c| parse_capability(c, "linux.security_context.capabilities"))
        .collect::<Result<_, _>>()?;
    let mut capabilities = LinuxCapabilities::default();
    capabilities.set_bounding(Some(set.clone()));
    capabilities.set_effective(Some(set.clone()));
    capabilities.set_permitted(Some(set));
    // Docker's and containerd's choice: nothing inheritable, no ambient
    // capabilities (kubernetes/kubernetes#56374).
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);

    let mut builder = ProcessBuilder::default()
        .terminal(config.tty)
        .user(user)
        .args(process_args(config, input.image)?)
        .env(environment(input))
        .cwd(cwd)
        .capabilities(capabilities)
        .no_new_privileges(sc.no_new_privs);
    if let Some(profile) = apparmor {
        builder = builder.apparmor_profile(profile);
    }
    if let Some(adj) = config
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref())
        .map(|r| r.oom_score_adj)
    {
        // The kernel's range; kubelet never sends more.
        builder = builder.oom_score_adj(adj.clamp(-1000, 1000) as i32);
    }
    let mut process = builder.build()?;
    process.set_rlimits(None);
    Ok(process)
}

// ----------------------------------------------------------- capabilities

fn normalize_cap(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

fn parse_capability(name: &str, field: &str) -> Result<Capability, SpecError> {
    if !ALL_CAPABILITIES.contains(&name) {
        return Err(invalid(field, format!("unknown capability {name:?}")));
    }
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| invalid(field, format!("unknown capability {name:?}")))
}

/// containerd's `WithCapabilities`: the default set; `ALL` in add gives
/// every capability, `ALL` in drop removes every one, and the named ones
/// are added and dropped after that. Names are taken with or without
/// `CAP_` (containerd always prefixes; `CAP_CAP_X` would fail there).
/// Privileged containers get every capability the kernel knows.
pub fn capabilities(
    sc: &LinuxContainerSecurityContext,
    host: &HostInfo,
) -> Result<Vec<String>, SpecError> {
    let all: Vec<String> = ALL_CAPABILITIES
        .iter()
        .take(host.last_cap.saturating_add(1))
        .enumerate()
        // Only what the daemon has (see HostInfo::current_caps).
        .filter(|(n, _)| host.current_caps.is_none_or(|m| m & (1u64 << n) != 0))
        .map(|(_, c)| c.to_string())
        .collect();
    if sc.privileged {
        return Ok(all);
    }
    let mut caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    let Some(requested) = &sc.capabilities else {
        return Ok(caps);
    };
    let is_all = |c: &String| c.trim().eq_ignore_ascii_case("ALL");
    if requested.add_capabilities.iter().any(is_all) {
        caps = all.clone();
    }
    if requested.drop_capabilities.iter().any(is_all) {
        caps.clear();
    }
    for c in requested.add_capabilities.iter().filter(|c| !is_all(c)) {
        let name = normalize_cap(c);
        parse_capability(
            &name,
            "linux.security_context.capabilities.add_capabilities",
        )?;
        if !caps.contains(&name) {
            caps.push(name);
        }
    }
    for c in requested.drop_capabilities.iter().filter(|c| !is_all(c)) {
        let name = normalize_cap(c);
        parse_capability(
            &name,
            "linux.security_context.capabilities.drop_capabilities",
        )?;
        caps.retain(|have| *have != name);
    }
    Ok(caps)
}

// ------------------------------------------------------------- namespaces

fn ns(typ: LinuxNamespaceType, path: Option<&Path>) -> LinuxNamespace {
    let mut n = LinuxNamespace::default();
    n.set_typ(typ);
    n.set_path(path.map(Path::to_path_buf));
    n
}

fn namespace_mode(value: i32, field: &str) -> Result<NamespaceMode, SpecError> {
    NamespaceMode::try_from(value)
        .map_err(|_| invalid(field, format!("unknown namespace mode {value}")))
}

/// The pod's net/ipc/uts (or the host's), a new mount namespace, pid as
/// the container asks, a new cgroup namespace on cgroup v2 unless
/// privileged (containerd: hides the host's hierarchy; v1 and privileged
/// keep the host's for compatibility).
fn namespaces(
    input: &SpecInput,
    sc: &LinuxContainerSecurityContext,
) -> Result<Vec<LinuxNamespace>, SpecError> {
    let pod = &input.pod_namespaces;
    let options = sc.namespace_options.clone().unwrap_or_default();
    let mut out = Vec::new();
    match namespace_mode(options.pid, "linux.security_context.namespace_options.pid")? {
        NamespaceMode::Container => out.push(ns(LinuxNamespaceType::Pid, None)),
        NamespaceMode::Pod => match &pod.pid {
            Some(path) => out.push(ns(LinuxNamespaceType::Pid, Some(path))),
            None => {
                // A pod without a shared pid namespace (no infra process):
                // the container gets its own, as a pod of one would.
                tracing::debug!(
                    container = input.container_id,
                    "pid mode POD without a pod pid namespace: new one"
                );
                out.push(ns(LinuxNamespaceType::Pid, None));
            }
        },
        NamespaceMode::Node => {}
        NamespaceMode::Target => match &pod.target_pid {
            Some(path) => out.push(ns(LinuxNamespaceType::Pid, Some(path))),
            None => {
                return Err(invalid(
                    "linux.security_context.namespace_options.target_id",
                    format!(
                        "target container {:?} has no pid namespace to join",
                        options.target_id
                    ),
                ));
            }
        },
    }
    if let Some(path) = &pod.ipc {
        out.push(ns(LinuxNamespaceType::Ipc, Some(path)));
    }
    if let Some(path) = &pod.uts {
        out.push(ns(LinuxNamespaceType::Uts, Some(path)));
    }
    out.push(ns(LinuxNamespaceType::Mount, None));
    if let Some(path) = &pod.net {
        out.push(ns(LinuxNamespaceType::Network, Some(path)));
    }
    if input.host.cgroup_v2 && !sc.privileged {
        out.push(ns(LinuxNamespaceType::Cgroup, None));
    }
    let pod_userns = input
        .sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .and_then(|o| o.userns_options.as_ref());
    if options.userns_options.as_ref() != pod_userns {
        return Err(invalid(
            "linux.security_context.namespace_options.userns_options",
            "must be the pod's: a container's user namespace is its pod's",
        ));
    }
    if let Some(userns) = &options.userns_options {
        match namespace_mode(
            userns.mode,
            "linux.security_context.namespace_options.userns_options.mode",
        )? {
            NamespaceMode::Node => {}
            NamespaceMode::Pod => match &pod.user {
                // First in the list, as the executor joins it first anyway.
                Some(path) => out.insert(0, ns(LinuxNamespaceType::User, Some(path))),
                None => {
                    return Err(invalid(
                        "linux.security_context.namespace_options.userns_options",
                        "the pod has no user namespace of its own",
                    ));
                }
            },
            other => {
                return Err(invalid(
                    "linux.security_context.namespace_options.userns_options.mode",
                    format!(
                        "{} is not a valid mode for a user namespace (POD or NODE)",
                        other.as_str_name()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// OCI uid and gid mappings, in that order.
type IdMaps = (Vec<LinuxIdMapping>, Vec<LinuxIdMapping>);

/// The OCI uid and gid mappings of a container in its pod's user namespace.
fn user_namespace_mappings(
    sc: &LinuxContainerSecurityContext,
) -> Result<Option<IdMaps>, SpecError> {
    let Some(userns) = sc
        .namespace_options
        .as_ref()
        .and_then(|o| o.userns_options.as_ref())
        .filter(|u| u.mode == NamespaceMode::Pod as i32)
    else {
        return Ok(None);
    };
    Ok(Some((
        oci_id_mappings(&userns.uids)?,
        oci_id_mappings(&userns.gids)?,
    )))
}

pub(crate) fn oci_id_mappings(mappings: &[IdMapping]) -> Result<Vec<LinuxIdMapping>, SpecError> {
    mappings
        .iter()
        .map(|m| {
            Ok(LinuxIdMappingBuilder::default()
                .container_id(m.container_id)
                .host_id(m.host_id)
                .size(m.length)
                .build()?)
        })
        .collect()
}

// ---------------------------------------------------------------- mounts

fn mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// `pkg/oci` `defaultMounts` less `/run` (containerd's `WithoutRunMount`),
/// plus `/sys/fs/cgroup`. sysfs and cgroup are read-only unless privileged.
fn default_mounts(
    privileged: bool,
    host: &HostInfo,
    cgroupns: bool,
) -> Result<Vec<Mount>, SpecError> {
    let rw = if privileged { "rw" } else { "ro" };
    let mut cgroup_options = vec!["nosuid", "noexec", "nodev", "relatime", rw];
    if !cgroupns {
        cgroup_options.extend(host.cgroup_mount_options.iter().map(String::as_str));
    }
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", rw])?,
        mount("/sys/fs/cgroup", "cgroup", "cgroup", &cgroup_options)?,
    ])
}

/// A bind mount as the CRI describes one (the pod's files and image
/// volumes are made into these too).
#[derive(Debug, Clone)]
struct BindRequest {
    field: String,
    container_path: String,
    host_path: PathBuf,
    readonly: bool,
    recursive_read_only: bool,
    propagation: MountPropagation,
    /// Seen through the id maps of the pod's user namespace.
    idmap: bool,
}

fn clean(path: &str) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// The mounts and the rootfs propagation (`rslave`/`rshared` when a mount
/// needs it). containerd's `WithMounts`: CRI mounts, then the pod's files
/// and image volumes where no CRI mount has the same destination; defaults
/// replaced by any mount on the same destination (and all of `/dev/*` by
/// a `/dev` mount); binds sorted by depth so parents come first. `userns`:
/// the maps of the pod's user namespace, which idmapped binds take.
fn mounts(
    input: &SpecInput,
    sc: &LinuxContainerSecurityContext,
    namespaces: &[LinuxNamespace],
    userns: Option<&IdMaps>,
) -> Result<(Vec<Mount>, Option<String>), SpecError> {
    let config = input.config;
    let mut binds: Vec<BindRequest> = Vec::new();
    for (i, m) in config.mounts.iter().enumerate() {
        let field = format!("mounts[{i}]");
        if m.image.as_ref().is_some_and(|img| !img.image.is_empty()) {
            if !m.host_path.is_empty() {
                return Err(invalid(
                    format!("{field}.host_path"),
                    "must be empty for a mount of an image",
                ));
            }
            let Some(mounted) = input.image_volumes.get(&i) else {
                return Err(invalid(
                    format!("{field}.image"),
                    "the image is not mounted",
                ));
            };
            // An image volume is read-only by definition (KEP 4639), and
            // already seen through the pod's user namespace if it has one.
            binds.push(BindRequest {
                field,
                container_path: m.container_path.clone(),
                host_path: mounted.clone(),
                readonly: true,
                recursive_read_only: false,
                propagation: MountPropagation::PropagationPrivate,
                idmap: false,
            });
            continue;
        }
        if !m.container_path.starts_with('/') {
            return Err(invalid(
                format!("{field}.container_path"),
                format!("{:?} is not an absolute path", m.container_path),
            ));
        }
        if m.host_path.is_empty() {
            return Err(invalid(format!("{field}.host_path"), "is required"));
        }
        let idmap = !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty();
        if idmap {
            // kubelet gives a pod's volumes the pod's maps; berth maps
            // through the pod's user namespace, so no other maps.
            let same = userns.is_some_and(|(uids, gids)| {
                oci_id_mappings(&m.uid_mappings).ok().as_ref() == Some(uids)
                    && oci_id_mappings(&m.gid_mappings).ok().as_ref() == Some(gids)
            });
            if !same {
                return Err(invalid(
                    format!("{field}.uid_mappings"),
                    "an idmapped mount takes the id maps of the pod's user namespace",
                ));
            }
        }
        let propagation = MountPropagation::try_from(m.propagation).map_err(|_| {
            invalid(
                format!("{field}.propagation"),
                format!("unknown propagation {}", m.propagation),
            )
        })?;
        binds.push(BindRequest {
            field,
            container_path: m.container_path.clone(),
            host_path: PathBuf::from(&m.host_path),
            readonly: m.readonly,
            recursive_read_only: m.recursive_read_only,
            propagation,
            idmap,
        });
    }
    let in_cri = |dst: &str| {
        config
            .mounts
            .iter()
            .any(|m| clean(&m.container_path) == clean(dst))
    };

    // containerd's linuxContainerMounts: the pod's files, read-only with a
    // read-only rootfs, and idmapped in a pod's user namespace (but
    // /dev/shm, as containerd: tmpfs has idmapped mounts only since 6.3).
    // /etc/hosts comes from kubelet as a CRI mount.
    let mut extra: Vec<BindRequest> = Vec::new();
    let pod_file = |field: &str, dst: &str, src: &Path, readonly: bool| BindRequest {
        field: field.to_string(),
        container_path: dst.to_string(),
        host_path: src.to_path_buf(),
        readonly,
        recursive_read_only: false,
        propagation: MountPropagation::PropagationPrivate,
        idmap: userns.is_some() && dst != "/dev/shm",
    };
    if !input.pod_files.hostname.as_os_str().is_empty() {
        extra.push(pod_file(
            "pod hostname file",
            "/etc/hostname",
            &input.pod_files.hostname,
            sc.readonly_rootfs,
        ));
    }
    if !input.pod_files.resolv_conf.as_os_str().is_empty() {
        extra.push(pod_file(
            "pod resolv.conf",
            "/etc/resolv.conf",
            &input.pod_files.resolv_conf,
            sc.readonly_rootfs,
        ));
    }
    let host_ipc = input.pod_namespaces.ipc.is_none();
    match (&input.pod_files.shm, host_ipc) {
        (Some(shm), _) => extra.push(pod_file("pod /dev/shm", "/dev/shm", shm, false)),
        (None, true) => extra.push(pod_file(
            "host /dev/shm",
            "/dev/shm",
            Path::new("/dev/shm"),
            false,
        )),
        (None, false) => {}
    }
    // containerd's image_volumes default: an empty directory per VOLUME.
    for (i, dst) in input
        .image
        .config
        .volumes
        .iter()
        .flat_map(|v| v.keys())
        .enumerate()
    {
        let dst = clean(dst).to_string_lossy().into_owned();
        if in_cri(&dst) {
            continue;
        }
        extra.push(BindRequest {
            field: format!("image volume {dst}"),
            container_path: dst,
            host_path: input.volumes_dir.join(i.to_string()),
            readonly: false,
            recursive_read_only: false,
            propagation: MountPropagation::PropagationPrivate,
            idmap: userns.is_some(),
        });
    }
    binds.extend(extra.into_iter().filter(|e| !in_cri(&e.container_path)));
    binds.sort_by_key(|b| clean(&b.container_path).components().count());

    let cgroupns = namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Cgroup);
    let supplied: HashSet<PathBuf> = binds.iter().map(|b| clean(&b.container_path)).collect();
    let dev_supplied = supplied.contains(Path::new("/dev"));
    let mut out: Vec<Mount> = default_mounts(sc.privileged, input.host, cgroupns)?
        .into_iter()
        .filter(|m| {
            let dst = m.destination();
            !(supplied.contains(dst) || (dev_supplied && dst.starts_with("/dev/")))
        })
        .collect();

    let mut rootfs_propagation: Option<String> = None;
    let mut mountinfo: Option<Vec<MountInfo>> = None;
    for b in &binds {
        let source = prepare_host_path(&b.field, &b.host_path)?;
        let mut options = vec!["rbind".to_string()];
        match b.propagation {
            MountPropagation::PropagationPrivate => options.push("rprivate".into()),
            MountPropagation::PropagationBidirectional => {
                check_propagation(&b.field, &source, input.host, &mut mountinfo, true)?;
                options.push("rshared".into());
                rootfs_propagation = Some("rshared".into());
            }
            MountPropagation::PropagationHostToContainer => {
                check_propagation(&b.field, &source, input.host, &mut mountinfo, false)?;
                options.push("rslave".into());
                if rootfs_propagation.as_deref() != Some("rshared") {
                    rootfs_propagation = Some("rslave".into());
                }
            }
        }
        match (b.readonly, b.recursive_read_only) {
            (true, true) => {
                if b.propagation != MountPropagation::PropagationPrivate {
                    return Err(invalid(
                        format!("{}.recursive_read_only", b.field),
                        format!(
                            "needs private propagation, got {}",
                            b.propagation.as_str_name()
                        ),
                    ));
                }
                options.push("rro".into());
            }
            (true, false) => options.push("ro".into()),
            (false, true) => {
                return Err(invalid(
                    format!("{}.recursive_read_only", b.field),
                    "conflicts with a read-write mount (readonly is false)",
                ));
            }
            (false, false) => options.push("rw".into()),
        }
        // selinux_relabel is ignored: berth does not support SELinux labels.
        let mut mount = MountBuilder::default()
            .destination(&b.container_path)
            .typ("bind")
            .source(source)
            .options(options)
            .build()?;
        if let (true, Some((uids, gids))) = (b.idmap, userns) {
            mount.set_uid_mappings(Some(uids.clone()));
            mount.set_gid_mappings(Some(gids.clone()));
        }
        out.push(mount);
    }
    Ok((out, rootfs_propagation))
}

/// containerd creates a missing host path as a directory (0755) and
/// mounts the path its symlinks resolve to.
fn prepare_host_path(field: &str, path: &Path) -> Result<PathBuf, SpecError> {
    let io = |op, source| SpecError::Io {
        field: format!("{field}.host_path"),
        op,
        path: path.to_path_buf(),
        source,
    };
    if !path.is_absolute() {
        return Err(invalid(
            format!("{field}.host_path"),
            format!("{} is not an absolute path", path.display()),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(path)
                .map_err(|e| io("create", e))?;
        }
        Err(e) => return Err(io("stat", e)),
    }
    std::fs::canonicalize(path).map_err(|e| io("resolve", e))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct MountInfo {
    mount_point: PathBuf,
    optional: Vec<String>,
    super_options: Vec<String>,
}

/// /proc/self/mountinfo: `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`.
fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let mount_point = unescape_octal(fields.get(4)?);
            let optional = fields.iter().skip(6).map(|s| s.to_string()).collect();
            let super_options = right
                .split(' ')
                .nth(2)
                .map(|o| o.split(',').map(String::from).collect())
                .unwrap_or_default();
            Some(MountInfo {
                mount_point: PathBuf::from(mount_point),
                optional,
                super_options,
            })
        })
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// containerd's `ensureShared`/`ensureSharedOrSlave`: the mount holding
/// `source` must propagate, or the container would silently not see (or
/// not share) mounts.
fn check_propagation(
    field: &str,
    source: &Path,
    host: &HostInfo,
    cache: &mut Option<Vec<MountInfo>>,
    shared_only: bool,
) -> Result<(), SpecError> {
    if cache.is_none() {
        let text = std::fs::read_to_string(&host.mountinfo).map_err(|e| SpecError::Io {
            field: format!("{field}.propagation"),
            op: "read",
            path: host.mountinfo.clone(),
            source: e,
        })?;
        *cache = Some(parse_mountinfo(&text));
    }
    let mounts = cache.as_deref().unwrap_or_default();
    // The last mount on the longest matching mount point is the visible one.
    let Some(holder) = mounts
        .iter()
        .filter(|m| source.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
    else {
        return Err(invalid(
            format!("{field}.propagation"),
            format!("no mount holds {}", source.display()),
        ));
    };
    let holder = mounts
        .iter()
        .rfind(|m| m.mount_point == holder.mount_point)
        .unwrap_or(holder);
    let shared = holder.optional.iter().any(|o| o.starts_with("shared:"));
    let slave = holder.optional.iter().any(|o| o.starts_with("master:"));
    if shared || (!shared_only && slave) {
        return Ok(());
    }
    Err(invalid(
        format!("{field}.propagation"),
        format!(
            "{} is on mount {} which is not a {} mount",
            source.display(),
            holder.mount_point.display(),
            if shared_only {
                "shared"
            } else {
                "shared or slave"
            }
        ),
    ))
}

// ---------------------------------------------------------------- devices

fn rule(
    allow: bool,
    typ: Option<LinuxDeviceType>,
    major: Option<i64>,
    minor: Option<i64>,
    access: &str,
) -> LinuxDeviceCgroup {
    let mut r = LinuxDeviceCgroup::default();
    r.set_allow(allow);
    r.set_typ(typ);
    r.set_major(major);
    r.set_minor(minor);
    r.set_access(Some(access.to_string()));
    r
}

/// containerd's device cgroup as runc ends up applying it: deny all, mknod
/// of any char/block node, the default nodes (null, random, full, tty, zero,
/// urandom, console, pts, ptmx).
pub fn default_device_rules() -> Vec<LinuxDeviceCgroup> {
    use LinuxDeviceType::{B, C};
    let c = |major, minor: Option<i64>| rule(true, Some(C), Some(major), minor, "rwm");
    vec![
        rule(false, None, None, None, "rwm"),
        rule(true, Some(C), None, None, "m"),
        rule(true, Some(B), None, None, "m"),
        c(1, Some(3)),
        c(1, Some(8)),
        c(1, Some(7)),
        c(5, Some(0)),
        c(1, Some(5)),
        c(1, Some(9)),
        c(5, Some(1)),
        c(136, None),
        c(5, Some(2)),
    ]
}

/// The CRI `devices` (a host directory adds every device under it) and,
/// for a privileged container, all of the host's; with their cgroup rules.
fn devices(
    config: &ContainerConfig,
    host: &HostInfo,
    privileged: bool,
) -> Result<(Vec<LinuxDevice>, Vec<LinuxDeviceCgroup>), SpecError> {
    let mut devices = Vec::new();
    let mut rules = default_device_rules();
    for (i, d) in config.devices.iter().enumerate() {
        let field = format!("devices[{i}]");
        let permissions = if d.permissions.is_empty() {
            "rwm"
        } else {
            d.permissions.as_str()
        };
        if !permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
            return Err(invalid(
                format!("{field}.permissions"),
                format!("{permissions:?} is not made of r, w and m"),
            ));
        }
        if !d.container_path.is_empty() && !d.container_path.starts_with('/') {
            return Err(invalid(
                format!("{field}.container_path"),
                format!("{:?} is not an absolute path", d.container_path),
            ));
        }
        let host = std::fs::canonicalize(&d.host_path).map_err(|e| SpecError::Io {
            field: format!("{field}.host_path"),
            op: "resolve",
            path: PathBuf::from(&d.host_path),
            source: e,
        })?;
        let container_path =
            (!d.container_path.is_empty()).then(|| PathBuf::from(&d.container_path));
        for dev in host_devices(&field, &host, container_path.as_deref(), true)? {
            rules.push(rule(
                true,
                Some(dev.typ()),
                Some(dev.major()),
                Some(dev.minor()),
                permissions,
            ));
            devices.push(dev);
        }
    }
    if privileged {
        devices.extend(host_devices(
            "privileged host devices",
            &host.dev_dir,
            None,
            false,
        )?);
        rules = privileged_device_rules();
    }
    Ok((devices, rules))
}

/// A privileged container may use every device.
fn privileged_device_rules() -> Vec<LinuxDeviceCgroup> {
    vec![rule(true, None, None, None, "rwm")]
}

/// containerd's `getDevices`: a device node, or every node under a
/// directory (skipping pts, shm, fd, mqueue and the like, consoles and
/// fifos). `strict` refuses a path that is not a device.
fn host_devices(
    field: &str,
    path: &Path,
    container_path: Option<&Path>,
    strict: bool,
) -> Result<Vec<LinuxDevice>, SpecError> {
    let io = |op, p: &Path, source| SpecError::Io {
        field: format!("{field}.host_path"),
        op,
        path: p.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| io("stat", path, e))?;
    if !meta.is_dir() {
        return match device_from_path(path).map_err(|e| io("stat", path, e))? {
            Some(mut dev) if dev.typ() != LinuxDeviceType::P || strict => {
                if let Some(cp) = container_path {
                    dev.set_path(cp.to_path_buf());
                }
                Ok(vec![dev])
            }
            _ if strict => Err(invalid(
                format!("{field}.host_path"),
                format!("{} is not a device node", path.display()),
            )),
            _ => Ok(Vec::new()),
        };
    }
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| io("read directory", path, e))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    let mut out = Vec::new();
    for entry in entries {
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        let child = path.join(&name);
        let sub_container = container_path.map(|cp| cp.join(&name));
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            if matches!(
                name_str.as_ref(),
                "pts" | "shm" | "fd" | "mqueue" | ".lxc" | ".lxd-mounts" | ".udev"
            ) {
                continue;
            }
            out.extend(host_devices(
                field,
                &child,
                sub_container.as_deref(),
                false,
            )?);
            continue;
        }
        if name_str == "console" {
            continue;
        }
        match device_from_path(&child) {
            Ok(Some(mut dev)) if dev.typ() != LinuxDeviceType::P => {
                if let Some(cp) = sub_container {
                    dev.set_path(cp);
                }
                out.push(dev);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("stat", &child, e)),
        }
    }
    Ok(out)
}

/// A device node's type, numbers, mode and owner (lstat: a symlink is not
/// a device). `None` when the path is not a device or fifo.
fn device_from_path(path: &Path) -> std::io::Result<Option<LinuxDevice>> {
    let st = rustix::fs::lstat(path)?;
    let typ = match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::BlockDevice => LinuxDeviceType::B,
        rustix::fs::FileType::CharacterDevice => LinuxDeviceType::C,
        rustix::fs::FileType::Fifo => LinuxDeviceType::P,
        _ => return Ok(None),
    };
    let rdev = st.st_rdev;
    let mut dev = LinuxDevice::default();
    dev.set_path(path.to_path_buf());
    dev.set_typ(typ);
    dev.set_major(i64::from(rustix::fs::major(rdev)));
    dev.set_minor(i64::from(rustix::fs::minor(rdev)));
    dev.set_file_mode(Some(st.st_mode & 0o7777));
    dev.set_uid(Some(st.st_uid));
    dev.set_gid(Some(st.st_gid));
    Ok(Some(dev))
}

// -------------------------------------------------------------- resources

/// The spec's `linux.resources`: containerd's `WithResources`, the pids
/// limit and the device rules. Zero means unset, as in the CRI. Memory swap
/// equals the limit when the node can limit swap and kubelet sent no swap
/// limit (no swapping by default). Needs neither the rootfs nor the user,
/// so that CreateContainer can make the cgroup while the rootfs is mounted.
pub fn cgroup_resources(
    container_id: &str,
    config: &ContainerConfig,
    sandbox: &PodSandboxConfig,
    host: &HostInfo,
    pids_limit: Option<i64>,
) -> Result<LinuxResources, SpecError> {
    let default_resources = LinuxContainerResources::default();
    let r = config
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref())
        .unwrap_or(&default_resources);
    let privileged = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|sc| sc.privileged)
        && pod_privileged(sandbox);
    let mut resources = linux_resources(container_id, r, host, pids_limit)?;
    // A privileged container's rule is "all devices": no need to walk the
    // host's /dev for it here (build does, for the device nodes).
    let device_rules = if privileged {
        privileged_device_rules()
    } else {
        devices(config, host, false)?.1
    };
    resources.set_devices(Some(device_rules));
    Ok(resources)
}

/// CRI resources as the OCI spec and the cgroup manager take them; also
/// what UpdateContainerResources applies to a running container.
pub fn linux_resources(
    container_id: &str,
    r: &LinuxContainerResources,
    host: &HostInfo,
    pids_limit: Option<i64>,
) -> Result<LinuxResources, SpecError> {
    let mut out = LinuxResources::default();
    if let Some(limit) = pids_limit.filter(|l| *l != 0) {
        let mut pids = LinuxPids::default();
        pids.set_limit(limit);
        out.set_pids(Some(pids));
    }
    let field = |name: &str| format!("linux.resources.{name}");
    let mut cpu = LinuxCpu::default();
    if r.cpu_period != 0 {
        let period = u64::try_from(r.cpu_period)
            .map_err(|_| invalid(field("cpu_period"), format!("{} is negative", r.cpu_period)))?;
        cpu.set_period(Some(period));
    }
    if r.cpu_quota != 0 {
        cpu.set_quota(Some(r.cpu_quota));
    }
    if r.cpu_shares != 0 {
        let shares = u64::try_from(r.cpu_shares)
            .map_err(|_| invalid(field("cpu_shares"), format!("{} is negative", r.cpu_shares)))?;
        cpu.set_shares(Some(shares));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.set_cpus(Some(r.cpuset_cpus.clone()));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.set_mems(Some(r.cpuset_mems.clone()));
    }
    if cpu != LinuxCpu::default() {
        out.set_cpu(Some(cpu));
    }
    let mut memory = LinuxMemory::default();
    if r.memory_limit_in_bytes != 0 {
        memory.set_limit(Some(r.memory_limit_in_bytes));
        if r.memory_swap_limit_in_bytes == 0 && host.swap_controller {
            memory.set_swap(Some(r.memory_limit_in_bytes));
        }
    }
    if r.memory_swap_limit_in_bytes != 0 && host.swap_controller {
        memory.set_swap(Some(r.memory_swap_limit_in_bytes));
    }
    if memory != LinuxMemory::default() {
        out.set_memory(Some(memory));
    }
    if !r.hugepage_limits.is_empty() {
        if host.hugetlb_controller {
            let limits = r
                .hugepage_limits
                .iter()
                .map(|h| {
                    let mut l = LinuxHugepageLimit::default();
                    l.set_page_size(h.page_size.clone());
                    l.set_limit(i64::try_from(h.limit).unwrap_or(i64::MAX));
                    l
                })
                .collect();
            out.set_hugepage_limits(Some(limits));
        } else {
            // containerd's default tolerate_missing_hugetlb_controller.
            tracing::warn!(
                container = container_id,
                "hugetlb cgroup controller is absent: huge page limits skipped"
            );
        }
    }
    if !r.unified.is_empty() {
        out.set_unified(Some(
            r.unified.clone().into_iter().collect::<HashMap<_, _>>(),
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------- seccomp

/// containerd's `generateSecurityProfile` for the deprecated string fields.
fn legacy_profile(value: &str, field: &str) -> Result<Option<SecurityProfile>, SpecError> {
    let profile = |t: ProfileType, r: &str| {
        Some(SecurityProfile {
            profile_type: t as i32,
            localhost_ref: r.to_string(),
        })
    };
    Ok(match value {
        "" => None,
        "runtime/default" | "docker/default" => profile(ProfileType::RuntimeDefault, ""),
        "unconfined" => profile(ProfileType::Unconfined, ""),
        other => match other.strip_prefix("localhost/") {
            Some(path) => profile(ProfileType::Localhost, path),
            None => return Err(invalid(field, format!("invalid profile {other:?}"))),
        },
    })
}

fn profile_type(p: &SecurityProfile, field: &str) -> Result<ProfileType, SpecError> {
    let t = ProfileType::try_from(p.profile_type)
        .map_err(|_| invalid(field, format!("unknown profile type {}", p.profile_type)))?;
    if t != ProfileType::Localhost && !p.localhost_ref.is_empty() {
        return Err(invalid(
            format!("{field}.localhost_ref"),
            "must only be set when the profile type is Localhost",
        ));
    }
    Ok(t)
}

/// The seccomp filter: none for privileged containers and for no profile
/// (containerd 2 with kubelet: the pod says RuntimeDefault when it means
/// it), the default profile for RuntimeDefault, a file for Localhost.
#[allow(deprecated)]
fn seccomp(
    sc: &LinuxContainerSecurityContext,
    privileged: bool,
    caps: &[String],
    host: &HostInfo,
) -> Result<Option<LinuxSeccomp>, SpecError> {
    if privileged {
        return Ok(None);
    }
    let field = "linux.security_context.seccomp";
    let profile = match &sc.seccomp {
        Some(p) => Some(p.clone()),
        None => legacy_profile(
            &sc.seccomp_profile_path,
            "linux.security_context.seccomp_profile_path",
        )?,
    };
    let Some(profile) = profile else {
        return Ok(None);
    };
    match profile_type(&profile, field)? {
        ProfileType::Unconfined => Ok(None),
        ProfileType::RuntimeDefault => default_seccomp(caps, &host.arch, host.kernel).map(Some),
        ProfileType::Localhost => {
            let path = profile
                .localhost_ref
                .strip_prefix("localhost/")
                .unwrap_or(&profile.localhost_ref);
            let bytes = std::fs::read(path).map_err(|e| SpecError::Io {
                field: format!("{field}.localhost_ref"),
                op: "read seccomp profile",
                path: PathBuf::from(path),
                source: e,
            })?;
            let parsed: LinuxSeccomp = serde_json::from_slice(&bytes).map_err(|e| {
                invalid(
                    format!("{field}.localhost_ref"),
                    format!("{path}: not a valid OCI seccomp profile: {e}"),
                )
            })?;
            Ok(Some(parsed))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DefaultProfile {
    default_action: LinuxSeccompAction,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    arch_map: Vec<ArchEntry>,
    syscalls: Vec<ProfileRule>,
}

#[derive(Debug, Deserialize)]
struct ArchEntry {
    arch: String,
    architectures: Vec<Arch>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileRule {
    names: Vec<String>,
    action: LinuxSeccompAction,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<ProfileArg>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileArg {
    index: usize,
    value: u64,
    #[serde(default)]
    value_two: Option<u64>,
    op: LinuxSeccompOperator,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<String>,
}

fn kernel_at_least(kernel: (u32, u32), min: &str) -> bool {
    let mut parts = min.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let want = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    kernel >= want
}

/// containerd's `DefaultProfile` for a container with `caps` in its
/// bounding set on `arch` (Go's name) and `kernel`: rules whose
/// `includes` all hold and whose `excludes` none do.
pub fn default_seccomp(
    caps: &[String],
    arch: &str,
    kernel: (u32, u32),
) -> Result<LinuxSeccomp, SpecError> {
    let profile: DefaultProfile = serde_json::from_str(SECCOMP_DEFAULT_PROFILE)
        .map_err(|e| SpecError::Oci(format!("the built-in seccomp profile does not parse: {e}")))?;
    let has = |c: &String| caps.contains(c);
    let mut syscalls = Vec::new();
    for r in profile.syscalls {
        let included = r.includes.caps.iter().all(has)
            && (r.includes.arches.is_empty() || r.includes.arches.iter().any(|a| a == arch))
            && r.includes
                .min_kernel
                .as_deref()
                .is_none_or(|m| kernel_at_least(kernel, m));
        let excluded = r.excludes.caps.iter().any(has)
            || r.excludes.arches.iter().any(|a| a == arch)
            || r.excludes
                .min_kernel
                .as_deref()
                .is_some_and(|m| kernel_at_least(kernel, m));
        if !included || excluded {
            continue;
        }
        let mut s = LinuxSyscall::default();
        s.set_names(r.names);
        s.set_action(r.action);
        s.set_errno_ret(r.errno_ret);
        if !r.args.is_empty() {
            let args = r
                .args
                .into_iter()
                .map(|a| {
                    let arg = LinuxSeccompArgBuilder::default()
                        .index(a.index)
                        .value(a.value)
                        .op(a.op);
                    match a.value_two {
                        Some(two) => arg.value_two(two),
                        None => arg,
                    }
                    .build()
                })
                .collect::<Result<Vec<LinuxSeccompArg>, _>>()?;
            s.set_args(Some(args));
        }
        syscalls.push(s);
    }
    let architectures = profile
        .arch_map
        .into_iter()
        .find(|a| a.arch == arch)
        .map(|a| a.architectures)
        .unwrap_or_default();
    let mut out = LinuxSeccomp::default();
    out.set_default_action(profile.default_action);
    out.set_default_errno_ret(profile.default_errno_ret);
    out.set_architectures(Some(architectures));
    out.set_syscalls(Some(syscalls));
    Ok(out)
}

// --------------------------------------------------------------- apparmor

/// containerd's `GenerateApparmorSpecOpts`: without AppArmor on the host
/// any profile but unconfined is an error; with it, no profile means
/// runtime/default (kubernetes#51746), which privileged containers skip; a
/// localhost profile must be loaded.
#[allow(deprecated)]
fn apparmor(
    sc: &LinuxContainerSecurityContext,
    privileged: bool,
    host: &HostInfo,
) -> Result<Option<String>, SpecError> {
    let field = "linux.security_context.apparmor";
    let profile = match &sc.apparmor {
        Some(p) => Some(p.clone()),
        None => legacy_profile(
            &sc.apparmor_profile,
            "linux.security_context.apparmor_profile",
        )?,
    };
    if !host.apparmor {
        if let Some(p) = &profile
            && profile_type(p, field)? != ProfileType::Unconfined
        {
            return Err(invalid(field, "apparmor is not enabled on this node"));
        }
        return Ok(None);
    }
    let profile = profile.unwrap_or_default();
    match profile_type(&profile, field)? {
        ProfileType::Unconfined => Ok(None),
        ProfileType::RuntimeDefault if privileged => Ok(None),
        ProfileType::RuntimeDefault => Ok(Some(APPARMOR_DEFAULT_PROFILE.to_string())),
        ProfileType::Localhost => {
            let name = profile
                .localhost_ref
                .strip_prefix("localhost/")
                .unwrap_or(&profile.localhost_ref);
            if name.is_empty() {
                return Err(invalid(
                    format!("{field}.localhost_ref"),
                    "names no profile",
                ));
            }
            let loaded =
                std::fs::read_to_string(&host.apparmor_profiles).map_err(|e| SpecError::Io {
                    field: format!("{field}.localhost_ref"),
                    op: "read",
                    path: host.apparmor_profiles.clone(),
                    source: e,
                })?;
            if !loaded.lines().any(|l| l.starts_with(&format!("{name} ("))) {
                return Err(invalid(
                    format!("{field}.localhost_ref"),
                    format!("apparmor profile {name:?} is not loaded"),
                ));
            }
            Ok(Some(name.to_string()))
        }
    }
}

// ------------------------------------------------------------ annotations

/// The CRI annotations, then containerd's `io.kubernetes.cri.*` set, which
/// wins. (containerd passes CRI annotations only when a runtime's
/// `container_annotations` allows them; berth has no such filter.)
fn annotations(input: &SpecInput) -> HashMap<String, String> {
    let mut out: BTreeMap<String, String> = input.config.annotations.clone().into_iter().collect();
    let pod = input.sandbox.metadata.clone().unwrap_or_default();
    let image = input.config.image.clone().unwrap_or_default();
    let image_name = if image.user_specified_image.is_empty() {
        image.image
    } else {
        image.user_specified_image
    };
    let name = input
        .config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    for (k, v) in [
        (ANNOTATION_SANDBOX_ID, input.sandbox_id.to_string()),
        (ANNOTATION_SANDBOX_NAMESPACE, pod.namespace),
        (ANNOTATION_SANDBOX_UID, pod.uid),
        (ANNOTATION_SANDBOX_NAME, pod.name),
        (ANNOTATION_CONTAINER_NAME, name),
        (ANNOTATION_IMAGE_NAME, image_name),
        (ANNOTATION_CONTAINER_TYPE, "container".to_string()),
    ] {
        out.insert(k.to_string(), v);
    }
    out.into_iter().collect()
}

#[cfg(test)]
#[path = "spec/tests.rs"]
mod tests;
