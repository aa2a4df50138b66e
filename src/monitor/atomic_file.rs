//! Write-to-temp, fsync, rename: a reader sees the old file or the whole new
//! one, also after a crash.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::MonitorError;

/// The temp file is `.<name>.tmp` beside `path`: a dot name, which
/// `ExitWatcher` ignores.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), MonitorError> {
    let name = path.file_name().ok_or_else(|| MonitorError::WriteFile {
        path: path.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let fail = |source| MonitorError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(fail)
}

/// fsync the directory so that the rename itself survives a crash.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(dir)?.sync_all()
}
