//! How the daemon learns of exits: inotify on the exit-record directory,
//! driven by tokio. Records are renamed into place (`IN_MOVED_TO`), so a
//! name seen is a complete record; temp files (dot names) are ignored.
//!
//! After creating the watcher, the daemon lists the directory once
//! ([`list_exit_records`]) for exits that happened while it was down. An id
//! may be yielded more than once (the listing races the watch, and an
//! inotify queue overflow is answered by listing again): treat it
//! idempotently.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::MonitorError;

pub struct ExitWatcher {
    dir: PathBuf,
    inotify: AsyncFd<InotifyFd>,
    ready: VecDeque<String>,
}

/// `AsyncFd` wants `AsRawFd`; nix's `Inotify` only offers `AsFd`.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl ExitWatcher {
    /// Watches `dir` (which must exist). Must be called within a tokio
    /// runtime.
    pub fn new(dir: &Path) -> Result<Self, MonitorError> {
        let watch_err = |errno| MonitorError::Watch {
            path: dir.to_path_buf(),
            errno,
        };
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(watch_err)?;
        inotify
            .add_watch(
                dir,
                AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_ONLYDIR,
            )
            .map_err(watch_err)?;
        let inotify = register(InotifyFd(inotify)).map_err(|e| watch_err(io_errno(&e)))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            inotify,
            ready: VecDeque::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The id (file name) of the next exit record that appeared.
    pub async fn next(&mut self) -> Result<String, MonitorError> {
        loop {
            if let Some(id) = self.ready.pop_front() {
                return Ok(id);
            }
            let mut guard = self
                .inotify
                .readable()
                .await
                .map_err(|e| MonitorError::Watch {
                    path: self.dir.clone(),
                    errno: io_errno(&e),
                })?;
            match guard.get_inner().0.read_events() {
                Ok(events) => {
                    for event in events {
                        if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            tracing::warn!(dir = %self.dir.display(), "inotify queue overflow; listing exit records");
                            self.ready.extend(list_exit_records(&self.dir)?);
                            continue;
                        }
                        if let Some(name) = event.name.as_ref().and_then(|n| n.to_str())
                            && is_record_name(name)
                        {
                            self.ready.push_back(name.to_string());
                        }
                    }
                }
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(errno) => {
                    return Err(MonitorError::Watch {
                        path: self.dir.clone(),
                        errno,
                    });
                }
            }
        }
    }
}

#[allow(unsafe_code)]
fn register(fd: InotifyFd) -> std::io::Result<AsyncFd<InotifyFd>> {
    // SAFETY: `InotifyFd` owns its fd (nix's `Inotify` wraps an `OwnedFd`)
    // until it is dropped with the `AsyncFd`, and `as_raw_fd` returns that
    // same fd every time.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(std::io::Error::from)
}

/// The ids of the exit records in `dir`.
pub fn list_exit_records(dir: &Path) -> Result<Vec<String>, MonitorError> {
    let read_err = |source| MonitorError::ReadFile {
        path: dir.to_path_buf(),
        source,
    };
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if let Some(name) = entry.file_name().to_str()
            && is_record_name(name)
        {
            ids.push(name.to_string());
        }
    }
    Ok(ids)
}

fn is_record_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.')
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(0))
}
