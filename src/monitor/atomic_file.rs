//! Write-to-temp, rename: a reader sees the old file or the whole new one,
//! also when the writer dies half way.
//!
//! No fsync, on purpose: these files live in the state directory, which
//! describes processes of the current boot only (`/run` is a tmpfs on most
//! nodes). The page cache outlives any process crash, and after a machine
//! crash every process such a file names is gone, so flushing buys nothing
//! and cost two disk flushes per file on the path of every create and exit.
//! Readers after a reboot must treat an empty or torn file as "gone".

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(fail)
}
