//! CNI plugin execution (spec 0.3.x, 0.4.0, 1.0.0, 1.1.0) and the result
//! cache, as libcni does them for containerd and CRI-O.
//!
//! The cache file (`<cache>/results/<network>-<pod id>-eth0`, libcni's
//! `cniCacheV1` format) owns what the plugins made: it is written with the
//! network configuration *before* ADD runs, completed with the result after
//! it, and removed only after DEL succeeded. DEL always runs from it, so a
//! daemon restart, a crash in the middle of ADD or a changed configuration
//! never leaks a pod's addresses or rules; no cache file means nothing to
//! delete.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cni_config::{self, CniConfigError, NetworkList};
use super::{POD_INTERFACE, PodNetworkRequest, PodNetworkStatus};

/// Plugin stderr kept in an error; the rest is cut.
const MAX_STDERR: usize = 4096;
/// A result is a few KiB; a plugin printing far more is broken.
const MAX_STDOUT: u64 = 4 << 20;
const CACHE_KIND: &str = "cniCacheV1";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error(transparent)]
    Config(#[from] CniConfigError),
    #[error("CNI network {network}: plugin {plugin:?} not found in {dirs}")]
    PluginMissing {
        network: String,
        plugin: String,
        dirs: String,
    },
    #[error("CNI plugin {plugin} {command}: start {path}: {error}")]
    Spawn {
        plugin: String,
        command: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("CNI plugin {plugin} {command}: {error}")]
    Io {
        plugin: String,
        command: &'static str,
        error: std::io::Error,
    },
    #[error("CNI plugin {plugin} {command} failed: {message}")]
    Failed {
        plugin: String,
        command: &'static str,
        /// The spec's error code, when the plugin printed an error object.
        code: Option<u64>,
        message: String,
    },
    #[error("CNI plugin {plugin} {command} timed out after {}s and was killed", timeout.as_secs())]
    Timeout {
        plugin: String,
        command: &'static str,
        timeout: Duration,
    },
    #[error("CNI plugin {plugin} {command}: invalid result: {message}")]
    BadResult {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("CNI result cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
    #[error("CNI ADD failed: {add}; and the DEL that undoes it failed too: {del}")]
    AddAndDel {
        add: Box<CniError>,
        del: Box<CniError>,
    },
}

/// The `runtimeConfig` values berth can give; each plugin gets those its
/// `capabilities` ask for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CapabilityArgs(pub BTreeMap<String, Value>);

impl CapabilityArgs {
    pub fn new(req: &PodNetworkRequest, pod_cidrs: &[ipnet::IpNet]) -> Self {
        let mut args = BTreeMap::new();
        let ports: Vec<Value> = req
            .port_mappings
            .iter()
            .filter(|m| m.host_port != 0)
            .map(|m| {
                json!({
                    "hostPort": m.host_port,
                    "containerPort": m.container_port,
                    "protocol": m.protocol.as_str(),
                    "hostIP": m.host_ip,
                })
            })
            .collect();
        if !ports.is_empty() {
            args.insert("portMappings".to_string(), Value::Array(ports));
        }
        if let Some(bw) = &req.bandwidth {
            args.insert(
                "bandwidth".to_string(),
                json!({
                    "ingressRate": bw.ingress_rate,
                    "ingressBurst": bw.ingress_burst,
                    "egressRate": bw.egress_rate,
                    "egressBurst": bw.egress_burst,
                }),
            );
        }
        if !pod_cidrs.is_empty() {
            // One range set per CIDR: host-local then gives one address of
            // each family (dual-stack), as containerd passes them.
            let ranges: Vec<Value> = pod_cidrs
                .iter()
                .map(|c| json!([{ "subnet": c.to_string() }]))
                .collect();
            args.insert("ipRanges".to_string(), Value::Array(ranges));
        }
        if let Some(dns) = &req.dns {
            args.insert(
                "dns".to_string(),
                json!({ "servers": dns.servers, "searches": dns.searches, "options": dns.options }),
            );
        }
        if !req.cgroup_parent.is_empty() {
            args.insert("cgroupPath".to_string(), json!(req.cgroup_parent));
        }
        CapabilityArgs(args)
    }
}

/// The `CNI_ARGS` pairs kubelet's runtimes pass.
pub fn cni_args(req: &PodNetworkRequest) -> Vec<(String, String)> {
    vec![
        ("IgnoreUnknown".to_string(), "1".to_string()),
        ("K8S_POD_NAMESPACE".to_string(), req.namespace.clone()),
        ("K8S_POD_NAME".to_string(), req.name.clone()),
        ("K8S_POD_INFRA_CONTAINER_ID".to_string(), req.pod_id.clone()),
        ("K8S_POD_UID".to_string(), req.uid.clone()),
    ]
}

/// `K=V;K=V`, as `CNI_ARGS` wants it.
pub fn cni_args_string(args: &[(String, String)]) -> String {
    args.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// One plugin call's environment (added to the daemon's, from which any
/// inherited `CNI_*` is removed).
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub command: &'static str,
    pub container_id: String,
    /// Empty when the namespace is gone (DEL only).
    pub netns: PathBuf,
    pub ifname: String,
    pub args: Vec<(String, String)>,
    pub bin_dirs: Vec<PathBuf>,
}

impl Invocation {
    pub fn env(&self) -> Vec<(String, String)> {
        let path = self
            .bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        vec![
            ("CNI_COMMAND".to_string(), self.command.to_string()),
            ("CNI_CONTAINERID".to_string(), self.container_id.clone()),
            ("CNI_NETNS".to_string(), self.netns.display().to_string()),
            ("CNI_IFNAME".to_string(), self.ifname.clone()),
            ("CNI_ARGS".to_string(), cni_args_string(&self.args)),
            ("CNI_PATH".to_string(), path),
        ]
    }
}

/// The stdin of one plugin of the chain (libcni's `buildOneConfig`): its
/// own configuration with the network's name and version, the previous
/// plugin's result, and the `runtimeConfig` keys its `capabilities` ask for.
pub fn plugin_stdin(
    plugin: &Value,
    name: &str,
    cni_version: &str,
    prev_result: Option<&Value>,
    capabilities: &CapabilityArgs,
) -> Value {
    let mut conf = match plugin {
        Value::Object(map) => map.clone(),
        _ => serde_json::Map::new(),
    };
    conf.insert("name".to_string(), json!(name));
    conf.insert("cniVersion".to_string(), json!(cni_version));
    match prev_result {
        Some(prev) => {
            conf.insert("prevResult".to_string(), prev.clone());
        }
        None => {
            conf.remove("prevResult");
        }
    }
    let wanted: Vec<&String> = match plugin.get("capabilities") {
        Some(Value::Object(caps)) => caps
            .iter()
            .filter(|(_, on)| on.as_bool() == Some(true))
            .map(|(k, _)| k)
            .collect(),
        _ => Vec::new(),
    };
    let mut runtime = serde_json::Map::new();
    for key in wanted {
        if let Some(value) = capabilities.0.get(key) {
            runtime.insert(key.clone(), value.clone());
        }
    }
    if runtime.is_empty() {
        conf.remove("runtimeConfig");
    } else {
        conf.insert("runtimeConfig".to_string(), Value::Object(runtime));
    }
    Value::Object(conf)
}

/// Whether DEL gets `prevResult` (spec 0.4.0 and later).
fn del_takes_prev_result(version: &str) -> bool {
    !matches!(version, "0.1.0" | "0.2.0" | "0.3.0" | "0.3.1")
}

/// The pod's IPs in a CNI result of any supported version: the addresses of
/// the sandbox interface `ifname` (all addresses when the result names no
/// interfaces), IPv4 first as containerd orders them.
pub fn result_ips(result: &Value, ifname: &str) -> Result<Vec<IpAddr>, String> {
    let interfaces = result
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ips = result
        .get("ips")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut found = Vec::new();
    let mut all = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let address = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("ips[{i}] has no address"))?;
        let net: ipnet::IpNet = address
            .parse()
            .map_err(|e| format!("ips[{i}].address {address:?}: {e}"))?;
        all.push(net.addr());
        let iface = ip
            .get("interface")
            .and_then(Value::as_u64)
            .and_then(|n| interfaces.get(usize::try_from(n).ok()?));
        if let Some(iface) = iface {
            let name = iface.get("name").and_then(Value::as_str).unwrap_or("");
            let sandbox = iface.get("sandbox").and_then(Value::as_str).unwrap_or("");
            if name == ifname && !sandbox.is_empty() {
                found.push(net.addr());
            }
        }
    }
    let mut ips = if found.is_empty() { all } else { found };
    ips.sort_by_key(|ip| !ip.is_ipv4());
    Ok(ips)
}

/// A plugin's error object (spec: `code`, `msg`, `details`).
fn error_message(
    stdout: &[u8],
    stderr: &[u8],
    status: std::process::ExitStatus,
) -> (Option<u64>, String) {
    let mut message = String::new();
    let mut code = None;
    if let Ok(err) = serde_json::from_slice::<Value>(stdout) {
        code = err.get("code").and_then(Value::as_u64);
        let msg = err.get("msg").and_then(Value::as_str).unwrap_or("");
        let details = err.get("details").and_then(Value::as_str).unwrap_or("");
        if let Some(code) = code {
            message.push_str(&format!("code {code}: "));
        }
        message.push_str(msg);
        if !details.is_empty() {
            message.push_str(&format!(" ({details})"));
        }
    } else if !stdout.is_empty() {
        message.push_str(String::from_utf8_lossy(stdout).trim());
    }
    if message.is_empty() {
        message = format!("exited with {status}");
    }
    let stderr = String::from_utf8_lossy(&stderr[..stderr.len().min(MAX_STDERR)]);
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        message.push_str(&format!("; stderr: {}", stderr.replace('\n', " | ")));
    }
    (code, message)
}

/// libcni's cache record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheEntry {
    pub kind: String,
    pub container_id: String,
    /// The network as a `.conflist` document, base64 as Go encodes bytes.
    pub config: String,
    pub if_name: String,
    pub network_name: String,
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub cni_args: Vec<(String, String)>,
    #[serde(default)]
    pub capability_args: CapabilityArgs,
    /// Absent while ADD runs (or after it failed midway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

/// The cache file of a pod's network.
pub fn cache_path(cache_dir: &Path, network: &str, pod_id: &str, ifname: &str) -> PathBuf {
    cache_dir
        .join("results")
        .join(format!("{network}-{pod_id}-{ifname}"))
}

/// The pod's cache files, whatever network wrote them.
pub fn cache_files(cache_dir: &Path, pod_id: &str, ifname: &str) -> Vec<PathBuf> {
    let suffix = format!("-{pod_id}-{ifname}");
    let Ok(entries) = std::fs::read_dir(cache_dir.join("results")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(&suffix)))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// Writes `entry` crash-safely (temp file, fsync, rename).
fn write_cache(path: &Path, entry: &CacheEntry) -> Result<(), CniError> {
    use std::io::Write as _;
    let fail = |message: String| CniError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let dir = path
        .parent()
        .ok_or_else(|| fail("no parent directory".to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("create directory: {e}")))?;
    let bytes = serde_json::to_vec(entry).map_err(|e| fail(format!("encode: {e}")))?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| fail(format!("create: {e}")))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| fail(format!("write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| fail(format!("rename: {e}")))?;
    Ok(())
}

fn read_cache(path: &Path) -> Result<CacheEntry, CniError> {
    let fail = |message: String| CniError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(format!("read: {e}")))?;
    let entry: CacheEntry =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("decode: {e}")))?;
    if entry.kind != CACHE_KIND {
        return Err(fail(format!("unknown kind {:?}", entry.kind)));
    }
    Ok(entry)
}

fn remove_cache(path: &Path) -> Result<(), CniError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::Cache {
            path: path.to_path_buf(),
            message: format!("remove: {e}"),
        }),
    }
}

/// The CNI driver: plugin directories, cache and timeout.
pub(crate) struct Cni {
    cache_dir: PathBuf,
    bin_dirs: Vec<PathBuf>,
    timeout: Duration,
}

impl Cni {
    pub(crate) fn new(cache_dir: PathBuf, bin_dirs: Vec<PathBuf>, timeout: Duration) -> Self {
        Cni {
            cache_dir,
            bin_dirs,
            timeout,
        }
    }

    /// ADD through the chain; on failure, DEL through it and drop the cache.
    pub(crate) async fn add(
        &self,
        list: &NetworkList,
        req: &PodNetworkRequest,
        capabilities: &CapabilityArgs,
    ) -> Result<PodNetworkStatus, super::NetworkError> {
        if !is_plain(&list.name) {
            return Err(CniError::Cache {
                path: self.cache_dir.clone(),
                message: format!("network name {:?} cannot name a cache file", list.name),
            }
            .into());
        }
        let path = cache_path(&self.cache_dir, &list.name, &req.pod_id, POD_INTERFACE);
        let mut entry = CacheEntry {
            kind: CACHE_KIND.to_string(),
            container_id: req.pod_id.clone(),
            config: base64::engine::general_purpose::STANDARD.encode(&list.bytes),
            if_name: POD_INTERFACE.to_string(),
            network_name: list.name.clone(),
            netns: req.netns.display().to_string(),
            cni_args: cni_args(req),
            capability_args: capabilities.clone(),
            result: None,
        };
        let cache = path.clone();
        let pending = entry.clone();
        blocking(move || write_cache(&cache, &pending)).await?;
        let result = match self.add_chain(list, &entry).await {
            Ok(result) => result,
            Err(add) => {
                return Err(match self.del_entry(&path, &entry).await {
                    Ok(()) => add.into(),
                    Err(del) => CniError::AddAndDel {
                        add: Box::new(add),
                        del: Box::new(del),
                    }
                    .into(),
                });
            }
        };
        let ips = match result_ips(&result, POD_INTERFACE) {
            Ok(ips) if !ips.is_empty() => ips,
            outcome => {
                let message = match outcome {
                    Err(message) => message,
                    Ok(_) => "no IP address for the pod".to_string(),
                };
                let plugin = list.plugin_types.last().cloned().unwrap_or_default();
                let add = CniError::BadResult {
                    plugin,
                    command: "ADD",
                    message,
                };
                return Err(match self.del_entry(&path, &entry).await {
                    Ok(()) => add.into(),
                    Err(del) => CniError::AddAndDel {
                        add: Box::new(add),
                        del: Box::new(del),
                    }
                    .into(),
                });
            }
        };
        entry.result = Some(result.clone());
        let cache = path.clone();
        blocking(move || write_cache(&cache, &entry)).await?;
        Ok(PodNetworkStatus {
            ips,
            interface: POD_INTERFACE.to_string(),
            result,
        })
    }

    /// DEL from every cache file of the pod; no file, nothing to do.
    pub(crate) async fn del(&self, req: &PodNetworkRequest) -> Result<(), CniError> {
        let dir = self.cache_dir.clone();
        let id = req.pod_id.clone();
        let files = blocking(move || Ok(cache_files(&dir, &id, POD_INTERFACE))).await?;
        for path in files {
            let read = path.clone();
            let entry = blocking(move || read_cache(&read)).await?;
            self.del_entry(&path, &entry).await?;
        }
        Ok(())
    }

    async fn del_entry(&self, path: &Path, entry: &CacheEntry) -> Result<(), CniError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&entry.config)
            .map_err(|e| CniError::Cache {
                path: path.to_path_buf(),
                message: format!("config is not base64: {e}"),
            })?;
        let list = cni_config::parse_list(path, &bytes)?;
        self.del_chain(&list, entry).await?;
        let path = path.to_path_buf();
        blocking(move || remove_cache(&path)).await
    }

    async fn add_chain(&self, list: &NetworkList, entry: &CacheEntry) -> Result<Value, CniError> {
        let invocation = self.invocation("ADD", entry, false);
        let mut prev: Option<Value> = None;
        for (plugin, plugin_type) in list.plugins.iter().zip(&list.plugin_types) {
            let stdin = plugin_stdin(
                plugin,
                &list.name,
                &list.cni_version,
                prev.as_ref(),
                &entry.capability_args,
            );
            let out = self.exec(list, plugin_type, &invocation, &stdin).await?;
            let result: Value = serde_json::from_slice(&out).map_err(|e| CniError::BadResult {
                plugin: plugin_type.clone(),
                command: "ADD",
                message: format!("not JSON: {e}"),
            })?;
            prev = Some(result);
        }
        prev.ok_or_else(|| CniError::BadResult {
            plugin: String::new(),
            command: "ADD",
            message: "the network has no plugins".to_string(),
        })
    }

    async fn del_chain(&self, list: &NetworkList, entry: &CacheEntry) -> Result<(), CniError> {
        let invocation = self.invocation("DEL", entry, true);
        let prev = if del_takes_prev_result(&list.cni_version) {
            entry.result.as_ref()
        } else {
            None
        };
        for (plugin, plugin_type) in list.plugins.iter().zip(&list.plugin_types).rev() {
            let stdin = plugin_stdin(
                plugin,
                &list.name,
                &list.cni_version,
                prev,
                &entry.capability_args,
            );
            self.exec(list, plugin_type, &invocation, &stdin).await?;
        }
        Ok(())
    }

    fn invocation(&self, command: &'static str, entry: &CacheEntry, del: bool) -> Invocation {
        let mut netns = PathBuf::from(&entry.netns);
        // The spec lets DEL run without a namespace; plugins then clean up
        // what lives outside it (IPAM, host rules).
        if del && !netns.exists() {
            netns = PathBuf::new();
        }
        Invocation {
            command,
            container_id: entry.container_id.clone(),
            netns,
            ifname: entry.if_name.clone(),
            args: entry.cni_args.clone(),
            bin_dirs: self.bin_dirs.clone(),
        }
    }

    async fn exec(
        &self,
        list: &NetworkList,
        plugin_type: &str,
        invocation: &Invocation,
        stdin: &Value,
    ) -> Result<Vec<u8>, CniError> {
        let command = invocation.command;
        let plugin = plugin_type.to_string();
        let path = cni_config::find_plugin(plugin_type, &self.bin_dirs).ok_or_else(|| {
            CniError::PluginMissing {
                network: list.name.clone(),
                plugin: plugin.clone(),
                dirs: self
                    .bin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?;
        let io = |error: std::io::Error| CniError::Io {
            plugin: plugin.clone(),
            command,
            error,
        };
        let input = serde_json::to_vec(stdin).map_err(|e| io(std::io::Error::other(e)))?;
        let mut cmd = tokio::process::Command::new(&path);
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("CNI_")) {
                cmd.env_remove(key);
            }
        }
        cmd.envs(invocation.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout kills whatever the
            // plugin started too.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|error| CniError::Spawn {
            plugin: plugin.clone(),
            command,
            path: path.clone(),
            error,
        })?;
        let pid = child.id();
        let mut child_stdin = child.stdin.take();
        let mut child_stdout = child.stdout.take();
        let mut child_stderr = child.stderr.take();
        let run = async {
            let write = async {
                if let Some(mut s) = child_stdin.take() {
                    // A plugin may exit without reading its input.
                    let _ = s.write_all(&input).await;
                }
                Ok::<(), std::io::Error>(())
            };
            let read_out = async {
                let mut buf = Vec::new();
                if let Some(s) = child_stdout.take() {
                    s.take(MAX_STDOUT).read_to_end(&mut buf).await?;
                }
                Ok::<Vec<u8>, std::io::Error>(buf)
            };
            let read_err = async {
                let mut buf = Vec::new();
                if let Some(s) = child_stderr.take() {
                    s.take(MAX_STDOUT).read_to_end(&mut buf).await?;
                }
                Ok::<Vec<u8>, std::io::Error>(buf)
            };
            let ((), out, err) = tokio::try_join!(write, read_out, read_err)?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out, err))
        };
        let outcome = tokio::time::timeout(self.timeout, run).await;
        let (status, out, err) = match outcome {
            Ok(done) => done.map_err(io)?,
            Err(_) => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    // The group may already be gone; that is the goal.
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill().await;
                return Err(CniError::Timeout {
                    plugin,
                    command,
                    timeout: self.timeout,
                });
            }
        };
        if !status.success() {
            let (code, message) = error_message(&out, &err, status);
            return Err(CniError::Failed {
                plugin,
                command,
                code,
                message,
            });
        }
        if !err.is_empty() {
            tracing::debug!(plugin = %plugin, command, stderr = %String::from_utf8_lossy(&err), "CNI plugin stderr");
        }
        Ok(out)
    }
}

/// A network name that can be part of a file name (the spec's own rule).
fn is_plain(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CniError> + Send + 'static,
) -> Result<T, CniError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CniError::Cache {
            path: PathBuf::new(),
            message: format!("blocking task: {e}"),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{Bandwidth, DnsConfig, PortMapping, Protocol};

    fn request() -> PodNetworkRequest {
        PodNetworkRequest {
            pod_id: "abc123".to_string(),
            name: "web".to_string(),
            namespace: "default".to_string(),
            uid: "u-1".to_string(),
            netns: PathBuf::from("/run/berth/netns/abc123"),
            port_mappings: vec![
                PortMapping {
                    protocol: Protocol::Tcp,
                    container_port: 80,
                    host_port: 8080,
                    host_ip: String::new(),
                },
                PortMapping {
                    protocol: Protocol::Udp,
                    container_port: 53,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
            dns: Some(DnsConfig {
                servers: vec!["10.0.0.10".to_string()],
                searches: vec!["svc.local".to_string()],
                options: vec!["ndots:5".to_string()],
            }),
            bandwidth: Some(Bandwidth {
                ingress_rate: 1000,
                ingress_burst: 10,
                egress_rate: 2000,
                egress_burst: 20,
            }),
            cgroup_parent: "/kubepods/podu-1".to_string(),
        }
    }

    #[test]
    fn cni_args_are_what_kubelet_runtimes_pass() {
        assert_eq!(
            cni_args_string(&cni_args(&request())),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1"
        );
    }

    #[test]
    fn env_names_command_netns_ifname_and_path() {
        let inv = Invocation {
            command: "ADD",
            container_id: "abc123".to_string(),
            netns: PathBuf::from("/run/ns"),
            ifname: "eth0".to_string(),
            args: cni_args(&request()),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        };
        let env: BTreeMap<String, String> = inv.env().into_iter().collect();
        assert_eq!(env["CNI_COMMAND"], "ADD");
        assert_eq!(env["CNI_CONTAINERID"], "abc123");
        assert_eq!(env["CNI_NETNS"], "/run/ns");
        assert_eq!(env["CNI_IFNAME"], "eth0");
        assert_eq!(env["CNI_PATH"], "/opt/cni/bin:/usr/lib/cni");
        assert!(env["CNI_ARGS"].starts_with("IgnoreUnknown=1;"));
    }

    #[test]
    fn stdin_gets_name_version_prev_result_and_asked_capabilities_only() {
        let caps = CapabilityArgs::new(&request(), &["10.1.0.0/24".parse().expect("cidr")]);
        let plugin = json!({"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}, "snat": true});
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        let stdin = plugin_stdin(&plugin, "pods", "1.0.0", Some(&prev), &caps);
        assert_eq!(stdin["name"], "pods");
        assert_eq!(stdin["cniVersion"], "1.0.0");
        assert_eq!(stdin["prevResult"], prev);
        assert_eq!(stdin["snat"], true);
        let runtime = stdin["runtimeConfig"].as_object().expect("runtimeConfig");
        assert_eq!(runtime.len(), 1);
        // Container ports without a host port are not mappings.
        assert_eq!(
            runtime["portMappings"],
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}])
        );

        let bridge = json!({"type": "bridge", "ipam": {"type": "host-local", "ranges": []}, "capabilities": {"ipRanges": true, "dns": true, "bandwidth": true, "cgroupPath": true}});
        let stdin = plugin_stdin(&bridge, "pods", "0.4.0", None, &caps);
        assert!(stdin.get("prevResult").is_none());
        assert_eq!(
            stdin["runtimeConfig"]["ipRanges"],
            json!([[{"subnet": "10.1.0.0/24"}]])
        );
        assert_eq!(
            stdin["runtimeConfig"]["dns"]["servers"],
            json!(["10.0.0.10"])
        );
        assert_eq!(stdin["runtimeConfig"]["bandwidth"]["egressRate"], 2000);
        assert_eq!(stdin["runtimeConfig"]["cgroupPath"], "/kubepods/podu-1");

        let plain = json!({"type": "loopback"});
        assert!(
            plugin_stdin(&plain, "pods", "1.1.0", None, &caps)
                .get("runtimeConfig")
                .is_none()
        );
    }

    #[test]
    fn results_of_each_version_give_the_sandbox_ips_ipv4_first() {
        let v040 = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/run/ns"}],
            "ips": [
                {"version": "6", "address": "fd00::5/64", "interface": 2},
                {"version": "4", "address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2},
                {"version": "4", "address": "10.9.0.1/24", "interface": 0}
            ]
        });
        assert_eq!(
            result_ips(&v040, "eth0").expect("ips"),
            vec![
                "10.1.0.5".parse::<IpAddr>().expect("ip"),
                "fd00::5".parse().expect("ip")
            ]
        );
        let v100 = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/ns"}],
            "ips": [{"address": "10.1.0.6/24", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}]
        });
        assert_eq!(
            result_ips(&v100, "eth0").expect("ips"),
            vec!["10.1.0.6".parse::<IpAddr>().expect("ip")]
        );
        // 1.1.0 and plugins that name no interface: every address counts.
        let v110 = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.1.0.7/24"}]});
        assert_eq!(
            result_ips(&v110, "eth0").expect("ips"),
            vec!["10.1.0.7".parse::<IpAddr>().expect("ip")]
        );
        let bad = json!({"cniVersion": "1.0.0", "ips": [{"address": "nope"}]});
        assert!(result_ips(&bad, "eth0").expect_err("bad").contains("nope"));
    }

    #[test]
    fn error_objects_and_stderr_make_the_message() {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::ExitStatus::from_raw(1 << 8);
        let (code, message) = error_message(
            br#"{"cniVersion":"1.0.0","code":7,"msg":"no bridge","details":"cni0 missing"}"#,
            b"trace line\n",
            status,
        );
        assert_eq!(code, Some(7));
        assert_eq!(
            message,
            "code 7: no bridge (cni0 missing); stderr: trace line"
        );
        let (code, message) = error_message(b"", b"", status);
        assert_eq!(code, None);
        assert!(message.contains("exit status: 1"), "{message}");
    }

    #[test]
    fn cache_paths_follow_libcni_and_are_found_by_pod() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = cache_path(dir.path(), "pods", "abc123", "eth0");
        assert_eq!(path, dir.path().join("results/pods-abc123-eth0"));
        let entry = CacheEntry {
            kind: CACHE_KIND.to_string(),
            container_id: "abc123".to_string(),
            config: base64::engine::general_purpose::STANDARD.encode(b"{}"),
            if_name: "eth0".to_string(),
            network_name: "pods".to_string(),
            netns: String::new(),
            cni_args: cni_args(&request()),
            capability_args: CapabilityArgs::default(),
            result: Some(json!({"cniVersion": "1.0.0"})),
        };
        write_cache(&path, &entry).expect("write");
        write_cache(&cache_path(dir.path(), "other", "abc1234", "eth0"), &entry).expect("write");
        assert_eq!(
            cache_files(dir.path(), "abc123", "eth0"),
            vec![path.clone()]
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.contains(r#""kind":"cniCacheV1""#) && text.contains(r#""containerId":"abc123""#),
            "{text}"
        );
        assert_eq!(read_cache(&path).expect("read").result, entry.result);
        remove_cache(&path).expect("remove");
        remove_cache(&path).expect("remove twice");
        assert!(cache_files(dir.path(), "abc123", "eth0").is_empty());
    }

    #[test]
    fn del_gets_prev_result_from_0_4_0_on() {
        assert!(!del_takes_prev_result("0.3.1"));
        assert!(del_takes_prev_result("0.4.0"));
        assert!(del_takes_prev_result("1.1.0"));
    }
}
