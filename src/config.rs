//! The daemon's configuration: TOML in `/etc/berth/config.toml`, then the
//! drop-ins of `/etc/berth/config.d/*.toml` in lexical order, then command
//! line flags. Every key has a default, so no file is needed at all.
//!
//! Files are merged key by key before the result is checked, and each key
//! remembers the file that set it last, so that an error can always name the
//! file and the key an operator has to fix.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/config.toml";
const DEFAULT_ROOT: &str = "/var/lib/berth";
const DEFAULT_STATE: &str = "/run/berth";
const SOCKET_NAME: &str = "berth.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config {origin}: key `{key}`: {message}")]
    Key {
        origin: String,
        key: String,
        message: String,
    },
}

/// The effective configuration. `Serialize` renders it for `berth config`
/// and for the verbose `Status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Persistent data: content store, snapshots, metadata database.
    pub root: PathBuf,
    /// Runtime state that is gone after a reboot: sockets, namespace pins.
    pub state: PathBuf,
    /// The CRI socket. Empty means `<state>/berth.sock`.
    pub socket: PathBuf,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub cgroup_driver: CgroupDriver,
    pub network: NetworkConfig,
    pub image: ImageConfig,
    pub streaming: StreamingConfig,
    pub sandbox: SandboxConfig,
    /// Per-registry settings and mirrors, as `[[registry]]` tables with the
    /// semantics of containers-registries.conf v2.
    #[serde(rename = "registry")]
    pub registries: Vec<RegistryConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            state: PathBuf::from(DEFAULT_STATE),
            socket: PathBuf::new(),
            log_level: LogLevel::Info,
            log_format: LogFormat::Text,
            cgroup_driver: CgroupDriver::Cgroupfs,
            network: NetworkConfig::default(),
            image: ImageConfig::default(),
            streaming: StreamingConfig::default(),
            sandbox: SandboxConfig::default(),
            registries: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// How pod cgroups are named: plain paths (`/kubepods/burstable/pod<uid>`)
/// or systemd slices (`kubepods-burstable-pod<uid>.slice`). It must match
/// kubelet's `--cgroup-driver`, which kubelet reads from `RuntimeConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub mode: NetworkMode,
    /// Where CNI network configurations are looked for.
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugin binaries are looked for, in order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// The built-in network's pod CIDR, used until kubelet sends one with
    /// `UpdateRuntimeConfig`.
    pub pod_cidr: ipnet::IpNet,
    /// A CNI plugin that runs longer than this is killed and its call fails.
    pub plugin_timeout_secs: u64,
    /// The built-in network's Linux bridge.
    pub bridge: String,
    /// The nftables table (family `inet`) berth owns for the built-in
    /// network's hostPorts and masquerade.
    pub nft_table: String,
    /// Masquerade the built-in network's traffic leaving the pod CIDR.
    pub masquerade: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: NetworkMode::Auto,
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            pod_cidr: ipnet::IpNet::V4(
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 88, 0, 0), 16)
                    .expect("10.88.0.0/16 is a valid network"),
            ),
            plugin_timeout_secs: 30,
            bridge: "berth0".to_string(),
            nft_table: "berth".to_string(),
            masquerade: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    /// A docker-style `auth.json` (`{"auths": {"host": {"auth": "..."}}}`)
    /// with registry credentials. Empty means none.
    pub auth_file: PathBuf,
    /// Layers downloaded at once for one pull.
    pub max_concurrent_downloads: usize,
    /// A pull that receives no bytes for this long is cancelled, as
    /// containerd's `image_pull_progress_timeout`.
    pub pull_progress_timeout_secs: u64,
    /// Talk plain HTTP to registries on loopback addresses (`localhost`,
    /// `127.0.0.0/8`, `[::1]`). Other registries need `insecure = true`.
    pub insecure_loopback: bool,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            auth_file: PathBuf::new(),
            max_concurrent_downloads: 3,
            pull_progress_timeout_secs: 300,
            insecure_loopback: false,
        }
    }
}

/// Pod sandboxes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Size of each pod's `/dev/shm` tmpfs, in bytes (containerd's and
    /// CRI-O's default is 64 MiB).
    pub shm_size_bytes: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            shm_size_bytes: 64 << 20,
        }
    }
}

/// The HTTP server that Exec, Attach and PortForward URLs point to, as
/// kubelet's `pkg/cri/streaming` server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    /// `host:port` to listen on; port 0 picks a free one at start.
    pub address: String,
    /// PEM certificate chain and key: both set serves HTTPS.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// A stream with no traffic for this long is closed (kubelet's
    /// `--streaming-connection-idle-timeout`, 4 h by default).
    pub idle_timeout_secs: u64,
    /// How long a client has to open its streams after the upgrade.
    pub stream_creation_timeout_secs: u64,
    /// Exec, attach and port-forward sessions served at once; more are
    /// answered 429.
    pub max_concurrent_streams: usize,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: "127.0.0.1:0".to_string(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            idle_timeout_secs: 4 * 3600,
            stream_creation_timeout_secs: 30,
            max_concurrent_streams: 256,
        }
    }
}

/// One `[[registry]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Which images this table is for: a host (`docker.io`), a host and
    /// repository prefix (`docker.io/library`), or `*.example.com`. Empty
    /// means the same as `location`.
    #[serde(default)]
    pub prefix: String,
    /// Where those images really are; the matched prefix is replaced by it.
    #[serde(default)]
    pub location: String,
    /// Speak plain HTTP to the location instead of verified HTTPS.
    #[serde(default)]
    pub insecure: bool,
    /// Refuse to pull from the upstream location; mirrors are still used.
    #[serde(default)]
    pub blocked: bool,
    /// Tried in order before the upstream location.
    #[serde(default)]
    pub mirror: Vec<MirrorConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub location: String,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default, rename = "pull-from-mirror")]
    pub pull_from_mirror: PullFromMirror,
}

/// Which pulls a mirror serves: every one, only by digest (the content is
/// then verified whoever serves it), or only by tag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullFromMirror {
    #[default]
    All,
    DigestOnly,
    TagOnly,
}

/// `auto` uses CNI when a CNI configuration exists and the built-in network
/// otherwise, as a fresh node with nothing installed expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    Auto,
    Cni,
    Builtin,
}

/// Command-line values that override the files.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub root: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub log_level: Option<LogLevel>,
}

/// Which file set each dotted key last; keys no file set are defaults.
#[derive(Debug, Default)]
struct Origins(BTreeMap<String, PathBuf>);

impl Origins {
    fn of(&self, key: &str) -> String {
        // A key inside a table set by a file is owned by the longest prefix
        // some file set.
        let mut probe = key;
        loop {
            if let Some(path) = self.0.get(probe) {
                return path.display().to_string();
            }
            match probe.rfind(['.', '[']) {
                Some(dot) => probe = &probe[..dot],
                None => return "(defaults and flags)".to_string(),
            }
        }
    }
}

impl Config {
    /// Loads `main` (when it exists, or always when `required`) and the
    /// drop-ins in `<main's dir>/config.d/`, then applies `overrides`.
    pub fn load(main: &Path, required: bool, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut files = Vec::new();
        match std::fs::metadata(main) {
            Ok(_) => files.push(main.to_path_buf()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
            Err(source) => {
                return Err(ConfigError::Read {
                    path: main.to_path_buf(),
                    source,
                });
            }
        }
        let dropin_dir = main.parent().unwrap_or(Path::new("/")).join("config.d");
        files.extend(dropins(&dropin_dir)?);

        let mut merged = toml::Table::new();
        let mut origins = Origins::default();
        for file in &files {
            let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            let table: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: file.clone(),
                        message: one_line(&syntax_message(&text, &e)),
                    })?;
            // Checked alone first so that a wrong key or type names its own
            // file, not the merge.
            decode(table.clone(), |_| file.display().to_string())?;
            merge(&mut merged, table, "", file, &mut origins);
        }
        let mut config = decode(merged, |key| origins.of(key))?;
        config.apply(overrides);
        config.validate(&origins)?;
        Ok(config)
    }

    fn apply(&mut self, overrides: &Overrides) {
        if let Some(root) = &overrides.root {
            self.root = root.clone();
        }
        if let Some(state) = &overrides.state {
            self.state = state.clone();
        }
        if let Some(socket) = &overrides.socket {
            self.socket = socket.clone();
        }
        if let Some(level) = overrides.log_level {
            self.log_level = level;
        }
    }

    fn validate_streaming(&self, origins: &Origins) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Key {
            origin: origins.of(key),
            key: key.to_string(),
            message,
        };
        let s = &self.streaming;
        if s.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "streaming.address",
                format!("{:?} is not an ip:port address", s.address),
            ));
        }
        if s.tls_cert.as_os_str().is_empty() != s.tls_key.as_os_str().is_empty() {
            return Err(invalid(
                "streaming.tls_key",
                "tls_cert and tls_key must be set together".to_string(),
            ));
        }
        for (key, path) in [
            ("streaming.tls_cert", &s.tls_cert),
            ("streaming.tls_key", &s.tls_key),
        ] {
            if !path.as_os_str().is_empty() && !path.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        for (key, value) in [
            ("streaming.idle_timeout_secs", s.idle_timeout_secs),
            (
                "streaming.stream_creation_timeout_secs",
                s.stream_creation_timeout_secs,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".to_string()));
            }
        }
        if s.max_concurrent_streams == 0 {
            return Err(invalid(
                "streaming.max_concurrent_streams",
                "must be at least 1".to_string(),
            ));
        }
        Ok(())
    }

    fn validate(&self, origins: &Origins) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Key {
            origin: origins.of(key),
            key: key.to_string(),
            message,
        };
        for (key, path) in [("root", &self.root), ("state", &self.state)] {
            if !path.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        if self.root == self.state {
            return Err(invalid(
                "state",
                "must differ from `root`: state is wiped at reboot, root is not".to_string(),
            ));
        }
        if !self.socket.as_os_str().is_empty() && !self.socket.is_absolute() {
            return Err(invalid(
                "socket",
                format!("{} is not an absolute path", self.socket.display()),
            ));
        }
        if !self.network.cni_conf_dir.is_absolute() {
            return Err(invalid(
                "network.cni_conf_dir",
                format!(
                    "{} is not an absolute path",
                    self.network.cni_conf_dir.display()
                ),
            ));
        }
        if let Some(dir) = self.network.cni_bin_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(invalid(
                "network.cni_bin_dirs",
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        if self.image.max_concurrent_downloads == 0 || self.image.max_concurrent_downloads > 64 {
            return Err(invalid(
                "image.max_concurrent_downloads",
                format!(
                    "{} is not between 1 and 64",
                    self.image.max_concurrent_downloads
                ),
            ));
        }
        if self.image.pull_progress_timeout_secs == 0 {
            return Err(invalid(
                "image.pull_progress_timeout_secs",
                "must be at least 1".to_string(),
            ));
        }
        if !self.image.auth_file.as_os_str().is_empty() && !self.image.auth_file.is_absolute() {
            return Err(invalid(
                "image.auth_file",
                format!("{} is not an absolute path", self.image.auth_file.display()),
            ));
        }
        self.validate_streaming(origins)?;
        if self.sandbox.shm_size_bytes < 4096 {
            return Err(invalid(
                "sandbox.shm_size_bytes",
                format!(
                    "{} is less than one page (4096)",
                    self.sandbox.shm_size_bytes
                ),
            ));
        }
        for (i, registry) in self.registries.iter().enumerate() {
            if registry.prefix.is_empty() && registry.location.is_empty() {
                return Err(invalid(
                    &format!("registry[{i}]"),
                    "needs a `prefix` or a `location`".to_string(),
                ));
            }
            let bad_location =
                |l: &str| l.contains("://") || l.starts_with('/') || l.ends_with('/');
            if bad_location(&registry.location) {
                return Err(invalid(
                    &format!("registry[{i}].location"),
                    format!(
                        "{:?} must be host[:port][/path], without a scheme",
                        registry.location
                    ),
                ));
            }
            for (j, mirror) in registry.mirror.iter().enumerate() {
                if mirror.location.is_empty() || bad_location(&mirror.location) {
                    return Err(invalid(
                        &format!("registry[{i}].mirror[{j}].location"),
                        format!(
                            "{:?} must be host[:port][/path], without a scheme",
                            mirror.location
                        ),
                    ));
                }
            }
        }
        if self.network.plugin_timeout_secs == 0 || self.network.plugin_timeout_secs > 3600 {
            return Err(invalid(
                "network.plugin_timeout_secs",
                format!(
                    "{} is not between 1 and 3600",
                    self.network.plugin_timeout_secs
                ),
            ));
        }
        let bridge = &self.network.bridge;
        if bridge.is_empty()
            || bridge.len() > 15
            || !bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(invalid(
                "network.bridge",
                format!(
                    "{bridge:?} is not an interface name (1 to 15 letters, digits, '-', '_', '.')"
                ),
            ));
        }
        let table = &self.network.nft_table;
        if table.is_empty()
            || table.len() > 64
            || !table.starts_with(|c: char| c.is_ascii_alphabetic())
            || !table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(invalid(
                "network.nft_table",
                format!(
                    "{table:?} is not a table name (a letter, then up to 63 letters, digits or '_')"
                ),
            ));
        }
        if self.network.pod_cidr.prefix_len() + 2 > self.network.pod_cidr.max_prefix_len() {
            return Err(invalid(
                "network.pod_cidr",
                format!("{} is too small to hold pods", self.network.pod_cidr),
            ));
        }
        Ok(())
    }

    /// The CRI socket path: the configured one or `<state>/berth.sock`.
    pub fn socket_path(&self) -> PathBuf {
        if self.socket.as_os_str().is_empty() {
            self.state.join(SOCKET_NAME)
        } else {
            self.socket.clone()
        }
    }

    /// The effective configuration as TOML, as `berth config` prints it.
    pub fn to_toml(&self) -> String {
        let mut effective = self.clone();
        effective.socket = self.socket_path();
        toml::to_string_pretty(&effective).expect("the config is plain data and always serializes")
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetworkMode::Auto => "auto",
            NetworkMode::Cni => "cni",
            NetworkMode::Builtin => "builtin",
        })
    }
}

fn dropins(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Deserializes a merged table into a `Config`, naming the offending key.
fn decode(table: toml::Table, origin_of: impl Fn(&str) -> String) -> Result<Config, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        // The path includes an unknown key itself, so it always names the
        // key to fix.
        let key = e.path().to_string();
        let message = one_line(&e.inner().to_string());
        ConfigError::Key {
            origin: origin_of(&key),
            key,
            message,
        }
    })
}

fn merge(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    file: &Path,
    origins: &mut Origins,
) {
    for (key, value) in from {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(table)) => {
                merge(existing, table, &dotted, file, origins);
            }
            (_, value) => {
                origins.0.insert(dotted, file.to_path_buf());
                into.insert(key, value);
            }
        }
    }
}

fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn defaults_need_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::load(
            &dir.path().join("config.toml"),
            false,
            &Overrides::default(),
        )
        .expect("defaults load");
        assert_eq!(config, Config::default());
        assert_eq!(config.socket_path(), PathBuf::from("/run/berth/berth.sock"));
    }

    #[test]
    fn required_file_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Config::load(&dir.path().join("nope.toml"), true, &Overrides::default())
            .expect_err("missing file is an error");
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn dropins_apply_in_lexical_order_over_the_main_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = write(
            dir.path(),
            "config.toml",
            "root = \"/a\"\n[network]\nmode = \"cni\"\n",
        );
        write(dir.path(), "config.d/20-late.toml", "root = \"/c\"\n");
        write(
            dir.path(),
            "config.d/10-early.toml",
            "root = \"/b\"\nlog_level = \"debug\"\n",
        );
        write(dir.path(), "config.d/ignored.conf", "this is not toml");
        let config = Config::load(&main, true, &Overrides::default()).expect("loads");
        assert_eq!(config.root, PathBuf::from("/c"));
        assert_eq!(config.log_level, LogLevel::Debug);
        // A drop-in that sets nothing under [network] keeps the main file's keys.
        assert_eq!(config.network.mode, NetworkMode::Cni);
    }

    #[test]
    fn flags_override_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = write(dir.path(), "config.toml", "root = \"/a\"\nstate = \"/s\"\n");
        let overrides = Overrides {
            root: Some(PathBuf::from("/flag-root")),
            socket: Some(PathBuf::from("/tmp/x.sock")),
            ..Overrides::default()
        };
        let config = Config::load(&main, true, &overrides).expect("loads");
        assert_eq!(config.root, PathBuf::from("/flag-root"));
        assert_eq!(config.state, PathBuf::from("/s"));
        assert_eq!(config.socket_path(), PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = write(dir.path(), "config.toml", "root = \"/a\"\n");
        let dropin = write(dir.path(), "config.d/10.toml", "[network]\nbogus = 1\n");
        let err = Config::load(&main, true, &Overrides::default()).expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains(&dropin.display().to_string()), "{text}");
        assert!(text.contains("`network.bogus`"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn wrong_type_names_file_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = write(dir.path(), "config.toml", "log_level = 3\n");
        let err = Config::load(&main, true, &Overrides::default()).expect_err("wrong type");
        let text = err.to_string();
        assert!(text.contains("config.toml"), "{text}");
        assert!(text.contains("`log_level`"), "{text}");
    }

    #[test]
    fn unknown_enum_value_lists_what_is_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = write(dir.path(), "config.toml", "cgroup_driver = \"cgroupv3\"\n");
        let text = Config::load(&main, true, &Overrides::default())
            .expect_err("bad value")
            .to_string();
        assert!(text.contains("`cgroup_driver`"), "{text}");
        assert!(
            text.contains("cgroupfs") && text.contains("systemd"),
            "{text}"
        );
    }

    #[test]
    fn impossible_values_name_the_file_that_set_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = write(dir.path(), "config.toml", "root = \"relative/dir\"\n");
        let text = Config::load(&main, true, &Overrides::default())
            .expect_err("relative root")
            .to_string();
        assert!(
            text.contains("config.toml") && text.contains("`root`"),
            "{text}"
        );

        let main = write(
            dir.path(),
            "config.toml",
            "[network]\npod_cidr = \"10.0.0.0/31\"\n",
        );
        let text = Config::load(&main, true, &Overrides::default())
            .expect_err("tiny cidr")
            .to_string();
        assert!(
            text.contains("config.toml") && text.contains("`network.pod_cidr`"),
            "{text}"
        );

        let main = write(
            dir.path(),
            "config.toml",
            "[network]\npod_cidr = \"10.0.0.0/40\"\n",
        );
        let text = Config::load(&main, true, &Overrides::default())
            .expect_err("bad cidr")
            .to_string();
        assert!(text.contains("`network.pod_cidr`"), "{text}");
    }

    #[test]
    fn builtin_network_keys_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (toml, key) in [
            ("bridge = \"a-bridge-name-too-long\"", "network.bridge"),
            ("bridge = \"br/0\"", "network.bridge"),
            ("nft_table = \"9table\"", "network.nft_table"),
            ("plugin_timeout_secs = 0", "network.plugin_timeout_secs"),
        ] {
            let main = write(dir.path(), "config.toml", &format!("[network]\n{toml}\n"));
            let text = Config::load(&main, true, &Overrides::default())
                .expect_err(toml)
                .to_string();
            assert!(text.contains(&format!("`{key}`")), "{toml}: {text}");
        }
        let main = write(
            dir.path(),
            "config.toml",
            "[network]\nbridge = \"cni-test0\"\nnft_table = \"berth_t1\"\nmasquerade = false\nplugin_timeout_secs = 5\n",
        );
        let config = Config::load(&main, true, &Overrides::default()).expect("valid keys");
        assert_eq!(config.network.bridge, "cni-test0");
        assert!(!config.network.masquerade);
    }

    #[test]
    fn registry_tables_parse_and_bad_mirrors_name_their_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = write(
            dir.path(),
            "config.toml",
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\
             [[registry.mirror]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n\
             pull-from-mirror = \"digest-only\"\n",
        );
        let config = Config::load(&main, true, &Overrides::default()).expect("loads");
        assert_eq!(config.registries.len(), 1);
        assert_eq!(
            config.registries[0].mirror[0].pull_from_mirror,
            PullFromMirror::DigestOnly
        );

        let main = write(
            dir.path(),
            "config.toml",
            "[[registry]]\nprefix = \"docker.io\"\n[[registry.mirror]]\nlocation = \"https://m\"\n",
        );
        let text = Config::load(&main, true, &Overrides::default())
            .expect_err("scheme in mirror")
            .to_string();
        assert!(
            text.contains("config.toml") && text.contains("`registry[0].mirror[0].location`"),
            "{text}"
        );
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = write(dir.path(), "config.toml", "root = \"/a\"\nstate = \n");
        let text = Config::load(&main, true, &Overrides::default())
            .expect_err("syntax")
            .to_string();
        assert!(
            text.contains("config.toml") && text.contains("line 2"),
            "{text}"
        );
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn printed_config_loads_back_to_the_same_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            cgroup_driver: CgroupDriver::Systemd,
            network: NetworkConfig {
                mode: NetworkMode::Builtin,
                ..NetworkConfig::default()
            },
            ..Config::default()
        };
        let main = write(dir.path(), "config.toml", &config.to_toml());
        let loaded = Config::load(&main, true, &Overrides::default()).expect("round trip");
        assert_eq!(loaded.cgroup_driver, CgroupDriver::Systemd);
        assert_eq!(loaded.network, config.network);
        assert_eq!(loaded.socket_path(), config.socket_path());
    }
}
