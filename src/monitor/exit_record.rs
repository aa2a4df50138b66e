//! The exit record: how the container ended, written once by the monitor
//! (atomically, after the log is complete) and read by the daemon.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::MonitorError;
use super::atomic_file::write_atomic;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub container_id: String,
    pub pid: u32,
    /// The exit status; for a process killed by a signal, 128 + signal (as
    /// containerd reports it).
    pub exit_code: i32,
    /// The signal that killed the process, if one did.
    pub signal: Option<i32>,
    /// Nanoseconds since the epoch; 0 when the container never started.
    pub started_at: i64,
    pub finished_at: i64,
    pub oom_killed: bool,
    /// The CRI reason: `Completed`, `Error`, `OOMKilled` or `StartError`.
    pub reason: String,
    /// Details for the CRI message, e.g. why the start failed.
    #[serde(default)]
    pub message: String,
    /// Log records dropped because the log file could not be written.
    #[serde(default)]
    pub log_dropped_records: u64,
}

impl ExitRecord {
    pub fn write(&self, path: &Path) -> Result<(), MonitorError> {
        let data = serde_json::to_vec(self).map_err(|source| MonitorError::ParseExitRecord {
            path: path.to_path_buf(),
            source,
        })?;
        write_atomic(path, &data)
    }
}

pub fn read_exit_record(path: &Path) -> Result<ExitRecord, MonitorError> {
    let data = std::fs::read(path).map_err(|source| MonitorError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&data).map_err(|source| MonitorError::ParseExitRecord {
        path: path.to_path_buf(),
        source,
    })
}

/// The CRI reason for an exit, as containerd derives it.
pub fn reason(exit_code: i32, oom_killed: bool) -> &'static str {
    if oom_killed {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// Reads the `oom_kill N` line of a cgroup v2 `memory.events` or v1
/// `memory.oom_control` file.
pub fn read_oom_kill_count(path: &Path) -> Result<u64, MonitorError> {
    let text = std::fs::read_to_string(path).map_err(|source| MonitorError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse_oom_kill_count(&text).ok_or_else(|| MonitorError::NoOomKillCount {
        path: PathBuf::from(path),
    })
}

fn parse_oom_kill_count(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("oom_kill"), Some(n)) => n.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_count_from_v1_and_v2_files() {
        let v2 = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill_count(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n";
        assert_eq!(parse_oom_kill_count(v1), Some(7));
        assert_eq!(parse_oom_kill_count("oom 1\n"), None);
    }

    #[test]
    fn record_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        let record = ExitRecord {
            container_id: "abc".into(),
            pid: 42,
            exit_code: 137,
            signal: Some(9),
            started_at: 1,
            finished_at: 2,
            oom_killed: true,
            reason: reason(137, true).into(),
            message: String::new(),
            log_dropped_records: 0,
        };
        record.write(&path).unwrap();
        assert_eq!(read_exit_record(&path).unwrap(), record);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("abc")]);
    }
}
