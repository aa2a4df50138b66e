//! CNI network configuration discovery, as libcni does it for containerd and
//! CRI-O: the lexically first valid `.conflist`, `.conf` or `.json` file in
//! the configuration directory is the pod network.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// CNI spec versions berth can drive.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const EXTENSIONS: &[&str] = &["conflist", "conf", "json"];
/// A network configuration is a few KiB; anything far larger is not one.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CniConfigError {
    #[error("read CNI config dir {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One network: a `.conflist`, or a single-plugin `.conf` made into a list.
#[derive(Debug, Clone)]
pub struct NetworkList {
    pub path: PathBuf,
    pub name: String,
    pub cni_version: String,
    /// The plugin types, in chain order, for finding their binaries.
    pub plugin_types: Vec<String>,
    /// The plugin configurations, in chain order, as the file has them.
    pub plugins: Vec<serde_json::Value>,
    /// The network as a `.conflist` document (a single-plugin `.conf` made
    /// into one, as libcni does): what the result cache keeps, so that DEL
    /// uses the configuration of the ADD.
    pub bytes: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawList {
    cni_version: Option<String>,
    name: Option<String>,
    plugins: Option<Vec<serde_json::Value>>,
    #[serde(rename = "type")]
    single_type: Option<String>,
}

/// The networks of `dir` in the order they are considered: valid ones only,
/// with the reasons the invalid ones were skipped.
pub fn discover(dir: &Path) -> Result<(Vec<NetworkList>, Vec<CniConfigError>), CniConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(source) => {
            return Err(CniConfigError::ReadDir {
                dir: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e))
        })
        .collect();
    paths.sort();
    let mut valid = Vec::new();
    let mut skipped = Vec::new();
    for path in paths {
        match load(&path) {
            Ok(list) => valid.push(list),
            Err(e) => skipped.push(e),
        }
    }
    Ok((valid, skipped))
}

/// Reads and checks one configuration file.
pub fn load(path: &Path) -> Result<NetworkList, CniConfigError> {
    let invalid = |message: String| CniConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| invalid(format!("stat: {e}")))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(invalid(format!("larger than {MAX_CONFIG_BYTES} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| invalid(format!("read: {e}")))?;
    parse(path, &bytes)
}

/// Checks one configuration document; `path` names it in errors and says by
/// its extension whether it is a list.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<NetworkList, CniConfigError> {
    parse_as(
        path,
        bytes,
        path.extension().is_some_and(|e| e == "conflist"),
    )
}

/// Checks a `.conflist` document that `origin` (a cache file) holds.
pub fn parse_list(origin: &Path, bytes: &[u8]) -> Result<NetworkList, CniConfigError> {
    parse_as(origin, bytes, true)
}

fn parse_as(path: &Path, bytes: &[u8], is_list: bool) -> Result<NetworkList, CniConfigError> {
    let invalid = |message: String| CniConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let raw: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let parsed: RawList = serde_json::from_value(raw.clone())
        .map_err(|e| invalid(format!("not a CNI configuration: {e}")))?;
    let name = parsed
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("no network `name`".to_string()))?;
    let cni_version = parsed.cni_version.unwrap_or_else(|| "0.1.0".to_string());
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(invalid(format!(
            "cniVersion {cni_version} is not supported (supported: {})",
            SUPPORTED_VERSIONS.join(", ")
        )));
    }
    let plugins = if is_list {
        parsed
            .plugins
            .filter(|p| !p.is_empty())
            .ok_or_else(|| invalid("a .conflist needs a non-empty `plugins` list".to_string()))?
    } else {
        if parsed.single_type.is_none() {
            return Err(invalid("a single-plugin config needs a `type`".to_string()));
        }
        vec![raw.clone()]
    };
    let plugin_types = plugins
        .iter()
        .enumerate()
        .map(|(i, plugin)| {
            plugin
                .get("type")
                .and_then(|t| t.as_str())
                .filter(|t| is_plain_name(t))
                .map(str::to_string)
                .ok_or_else(|| invalid(format!("plugin {i} has no valid `type`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = if is_list {
        bytes.to_vec()
    } else {
        serde_json::to_vec(&serde_json::json!({
            "cniVersion": cni_version,
            "name": name,
            "plugins": plugins,
        }))
        .map_err(|e| invalid(format!("encode as a list: {e}")))?
    };
    Ok(NetworkList {
        path: path.to_path_buf(),
        name,
        cni_version,
        plugin_types,
        plugins,
        bytes,
    })
}

/// A plugin type names a binary in a plugin directory; it must not be a path.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

impl NetworkList {
    /// The plugin types of the chain that no plugin directory holds.
    pub fn missing_plugins(&self, bin_dirs: &[PathBuf]) -> Vec<&str> {
        self.plugin_types
            .iter()
            .filter(|t| find_plugin(t, bin_dirs).is_none())
            .map(String::as_str)
            .collect()
    }
}

/// The plugin binary for `plugin_type`, from the first directory holding it.
pub fn find_plugin(plugin_type: &str, bin_dirs: &[PathBuf]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    bin_dirs
        .iter()
        .map(|dir| dir.join(plugin_type))
        .find(|path| {
            std::fs::metadata(path)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write");
    }

    #[test]
    fn first_valid_config_in_lexical_order_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "05-broken.conflist", "{not json");
        write(
            dir.path(),
            "10-b.conflist",
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        );
        write(
            dir.path(),
            "20-a.conf",
            r#"{"cniVersion":"0.4.0","name":"a","type":"ptp"}"#,
        );
        write(
            dir.path(),
            "00-ignored.txt",
            r#"{"cniVersion":"0.4.0","name":"x","type":"ptp"}"#,
        );
        let (valid, skipped) = discover(dir.path()).expect("discover");
        assert_eq!(valid.len(), 2);
        assert_eq!(valid[0].name, "b");
        assert_eq!(valid[0].plugin_types, vec!["bridge", "portmap"]);
        assert_eq!(valid[1].plugin_types, vec!["ptp"]);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].to_string().contains("05-broken.conflist"));
    }

    #[test]
    fn invalid_configs_say_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text, why) in [
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "non-empty",
            ),
            (
                "b.conflist",
                r#"{"cniVersion":"9.9.9","name":"n","plugins":[{"type":"x"}]}"#,
                "9.9.9",
            ),
            ("c.conf", r#"{"cniVersion":"1.0.0","name":"n"}"#, "type"),
            (
                "d.conflist",
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#,
                "name",
            ),
            (
                "e.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../sh"}]}"#,
                "type",
            ),
        ] {
            write(dir.path(), name, text);
            let err = load(&dir.path().join(name)).expect_err(name);
            assert!(err.to_string().contains(why), "{name}: {err}");
        }
    }

    #[test]
    fn missing_dir_has_no_networks() {
        let (valid, skipped) = discover(Path::new("/nonexistent/berth/cni")).expect("discover");
        assert!(valid.is_empty() && skipped.is_empty());
    }

    #[test]
    fn plugins_are_found_in_bin_dirs_in_order() {
        use std::os::unix::fs::PermissionsExt;
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        for dir in [a.path(), b.path()] {
            let path = dir.join("bridge");
            std::fs::write(&path, b"#!/bin/sh\n").expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::write(a.path().join("noexec"), b"").expect("write");
        let dirs = vec![a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(find_plugin("bridge", &dirs), Some(a.path().join("bridge")));
        assert_eq!(find_plugin("noexec", &dirs), None);
        assert_eq!(find_plugin("missing", &dirs), None);
    }
}
