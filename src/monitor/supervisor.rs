//! The monitor's life after it detached: create the container, then one
//! blocking `poll(2)` loop over the SIGCHLD signalfd, the container's
//! output, its stdin, the control socket and its connections, until the
//! container exits; then drain, log, write the exit record, leave.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::atomic_file::write_atomic;
use super::child_reaper::{self, ChildReaper};
use super::config::MonitorConfig;
use super::control::Conn;
use super::exit_record::{self, ExitRecord};
use super::footprint;
use super::stdio::{self, MonitorStdio, ReadOutcome};
use super::{MonitorError, now_ns};
use crate::executor::{self, CreateOptions, Created};
use crate::logs::LogWriter;

/// One read of container output; also the largest attach output frame.
const READ_CHUNK: usize = 32 * 1024;

/// How long after creating or starting the container the monitor gives
/// back what that took (see `footprint`). Not at once: the daemon is still
/// answering the request then (committing the container's new state), and
/// on a small node the release would take the CPU from it. Start usually
/// follows create within this time, so one release serves both.
const RELEASE_DELAY: Duration = Duration::from_millis(20);

/// After the container exited, how long to wait for more output on a
/// stream whose write end someone (an orphaned descendant) still holds.
const DRAIN_GRACE_MS: u16 = 50;

pub struct Supervisor {
    pub(super) config: MonitorConfig,
    /// None: the container has no log (see `MonitorConfig::log_path`).
    pub(super) log: Option<LogWriter>,
    pub(super) listener: UnixListener,
    pub(super) conns: Vec<Conn>,
    pub(super) stdio: MonitorStdio,
    pub(super) reaper: ChildReaper,
    /// The parked container, until Start.
    pub(super) created: Option<Created>,
    pub(super) pid: Pid,
    pub(super) created_at: i64,
    pub(super) started_at: i64,
    /// Why Start failed, for the exit record.
    pub(super) start_error: Option<String>,
    /// The container's end: its wait status, or the one `start` sets
    /// when the executor reaped the process itself.
    pub(super) exit: Option<WaitStatus>,
    /// When to give back what setup or start used (the executor's code,
    /// the request's handling), if still to do.
    release_at: Option<Instant>,
    pub(super) buf: Box<[u8]>,
}

enum Slot {
    Reaper,
    Listener,
    Output(usize),
    Stdin,
    Conn(usize),
}

impl Supervisor {
    /// Everything up to a parked container with its pid file written. On
    /// error nothing is left running.
    pub fn create(config: MonitorConfig) -> Result<Self, MonitorError> {
        let spec = load_spec(&config.spec_path, &config.bundle)?;
        let log = config
            .log_path
            .as_deref()
            .map(LogWriter::open)
            .transpose()?;
        let listener = bind_control_socket(&config.control_socket)?;
        let unbind = |e: MonitorError| {
            let _ = std::fs::remove_file(&config.control_socket);
            e
        };
        let (executor_stdio, pipes) = if config.tty {
            (executor::Stdio::Terminal, None)
        } else {
            let (theirs, ours) = stdio::pipes(config.stdin).map_err(unbind)?;
            (theirs, Some(ours))
        };
        let mut created = executor::create(CreateOptions {
            spec: &spec,
            stdio: executor_stdio,
            cgroup_procs: &config.cgroup_procs,
            cgroup_mounts: config.cgroup_mounts.as_deref(),
        })
        .map_err(|e| unbind(e.into()))?;
        let pid = created.pid();
        // From here on a failure must not leave the parked process behind.
        let undo = |e: MonitorError| {
            child_reaper::kill_and_reap(pid);
            let _ = std::fs::remove_file(&config.control_socket);
            e
        };
        let stdio = match pipes {
            Some(ours) => ours,
            None => {
                let master = created
                    .take_pty_master()
                    .ok_or(MonitorError::NoPtyMaster)
                    .map_err(undo)?;
                stdio::from_pty_master(master, config.stdin).map_err(undo)?
            }
        };
        let reaper = ChildReaper::new().map_err(undo)?;
        write_atomic(&config.pid_file, format!("{pid}\n").as_bytes()).map_err(undo)?;
        Ok(Self {
            config,
            log,
            listener,
            conns: Vec::new(),
            stdio,
            reaper,
            created: Some(created),
            pid,
            created_at: now_ns(),
            started_at: 0,
            start_error: None,
            exit: None,
            release_at: Some(Instant::now() + RELEASE_DELAY),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
        })
    }

    /// Has what start used given back after [`RELEASE_DELAY`].
    pub(super) fn release_later(&mut self) {
        self.release_at = Some(Instant::now() + RELEASE_DELAY);
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The daemon gave up on us before we could report: undo everything.
    pub fn abandon(self) {
        child_reaper::kill_and_reap(self.pid);
        let _ = std::fs::remove_file(&self.config.control_socket);
        let _ = std::fs::remove_file(&self.config.pid_file);
    }

    /// Serves until the container exits, then finishes; true when the exit
    /// record was written.
    pub fn run(mut self) -> bool {
        // A container that died before the signalfd existed.
        self.exit = child_reaper::reap_all(self.pid);
        while self.exit.is_none() {
            self.poll_once();
            if self.release_at.is_some_and(|at| Instant::now() >= at) {
                self.release_at = None;
                footprint::release_setup();
            }
        }
        self.finish()
    }

    fn poll_once(&mut self) {
        let mut slots = Vec::with_capacity(4 + self.conns.len());
        let mut fds = Vec::with_capacity(4 + self.conns.len());
        fds.push(PollFd::new(self.reaper.fd(), PollFlags::POLLIN));
        slots.push(Slot::Reaper);
        fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
        slots.push(Slot::Listener);
        for (i, out) in self.stdio.outputs.iter().enumerate() {
            fds.push(PollFd::new(out.fd.as_fd(), PollFlags::POLLIN));
            slots.push(Slot::Output(i));
        }
        let stdin_full = match &self.stdio.stdin {
            Some(sink) if !sink.buf.is_empty() => {
                fds.push(PollFd::new(sink.fd.as_fd(), PollFlags::POLLOUT));
                slots.push(Slot::Stdin);
                sink.buf.len() >= stdio::STDIN_LIMIT
            }
            _ => false,
        };
        for (i, conn) in self.conns.iter().enumerate() {
            let mut events = PollFlags::empty();
            if !(stdin_full && conn.sends_stdin()) {
                events |= PollFlags::POLLIN;
            }
            if conn.has_output() {
                events |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(conn.stream.as_fd(), events));
            slots.push(Slot::Conn(i));
        }
        // A deadline only while a release is due: otherwise the monitor
        // sleeps until something happens.
        let timeout = match self.release_at {
            Some(at) => PollTimeout::try_from(at.saturating_duration_since(Instant::now()))
                .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return,
            Err(errno) => {
                tracing::error!(%errno, "poll failed");
                return;
            }
        }
        let ready: Vec<(Slot, PollFlags)> = slots
            .into_iter()
            .zip(
                fds.iter()
                    .map(|fd| fd.revents().unwrap_or(PollFlags::empty())),
            )
            .filter(|(_, revents)| !revents.is_empty())
            .collect();
        drop(fds);

        let mut closed_outputs = Vec::new();
        let mut reap = false;
        for (slot, revents) in ready {
            match slot {
                Slot::Output(i) => {
                    if !self.pump_output(i) {
                        closed_outputs.push(i);
                    }
                }
                Slot::Stdin => self.flush_stdin(),
                Slot::Conn(i) => self.service_conn(i, revents),
                Slot::Listener => self.accept(),
                Slot::Reaper => reap = true,
            }
        }
        for i in closed_outputs.into_iter().rev() {
            let out = self.stdio.outputs.remove(i);
            if let Some(log) = &mut self.log {
                log.finish(out.stream, SystemTime::now());
            }
        }
        self.conns.retain(|c| !c.closed);
        // Reap orphans too, but never overwrite an exit `start` recorded.
        if reap && let Some(status) = self.reaper.reap(self.pid) {
            self.exit = Some(status);
        }
    }

    /// One read from output `i`, logged and sent to attachers; false when
    /// it reached EOF.
    fn pump_output(&mut self, i: usize) -> bool {
        !matches!(self.read_once(i), ReadOutcome::Closed)
    }

    fn read_once(&mut self, i: usize) -> ReadOutcome {
        let out = &self.stdio.outputs[i];
        let stream = out.stream;
        let outcome = stdio::read_output(&out.fd, &mut self.buf);
        if let ReadOutcome::Data(n) = outcome {
            if let Some(log) = &mut self.log {
                log.write(stream, &self.buf[..n], SystemTime::now());
            }
            for conn in &mut self.conns {
                conn.send_output(stream, &self.buf[..n]);
            }
        }
        outcome
    }

    pub(super) fn flush_stdin(&mut self) {
        let Some(sink) = &mut self.stdio.stdin else {
            return;
        };
        match sink.flush() {
            Ok(()) if sink.buf.is_empty() && sink.close_when_flushed => self.stdio.stdin = None,
            Ok(()) => {}
            Err(errno) => {
                tracing::info!(%errno, "container stdin closed; dropping attach input");
                self.stdio.stdin = None;
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => match Conn::new(stream) {
                    Ok(conn) => self.conns.push(conn),
                    Err(e) => tracing::warn!(error = %e, "set up control connection"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accept control connection");
                    break;
                }
            }
        }
    }

    /// The container exited: drain its output, complete the log, write the
    /// exit record, hand attachers what is left, remove the socket.
    fn finish(mut self) -> bool {
        for i in 0..self.stdio.outputs.len() {
            self.drain_output(i);
        }
        if let Some(log) = &mut self.log {
            for out in std::mem::take(&mut self.stdio.outputs) {
                log.finish(out.stream, SystemTime::now());
            }
            if !log.flush() {
                tracing::warn!(path = %log.path().display(), "container log incomplete: write failed at exit");
            }
        }
        let record = self.exit_record();
        let written = match record.write(&self.config.exit_record) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "write exit record");
                false
            }
        };
        let _ = std::fs::remove_file(&self.config.control_socket);
        for conn in &mut self.conns {
            conn.flush_before_close();
        }
        written
    }

    /// Reads output `i` to its end. What the container wrote before it
    /// exited is already in the pipe; only a descendant that still holds
    /// the write end can keep it open, and it gets a short grace.
    fn drain_output(&mut self, i: usize) {
        loop {
            match self.read_once(i) {
                ReadOutcome::Data(_) => {}
                ReadOutcome::Closed => return,
                ReadOutcome::WouldBlock => {
                    let fd = &self.stdio.outputs[i].fd;
                    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                    if !matches!(poll(&mut fds, PollTimeout::from(DRAIN_GRACE_MS)), Ok(n) if n > 0)
                    {
                        return;
                    }
                }
            }
        }
    }

    fn exit_record(&self) -> ExitRecord {
        let status = self.exit.unwrap_or(WaitStatus::StillAlive);
        let (exit_code, signal) = child_reaper::exit_code_and_signal(status);
        let oom_killed = match &self.config.oom_kill_file {
            Some(path) => match exit_record::read_oom_kill_count(path) {
                Ok(count) => count > self.config.oom_kill_initial,
                Err(e) => {
                    tracing::warn!(error = %e, "read oom_kill count");
                    false
                }
            },
            None => false,
        };
        let (reason, message) = match &self.start_error {
            Some(message) => ("StartError", message.clone()),
            None => (exit_record::reason(exit_code, oom_killed), String::new()),
        };
        ExitRecord {
            container_id: self.config.container_id.clone(),
            pid: u32::try_from(self.pid.as_raw()).unwrap_or(0),
            exit_code,
            signal,
            started_at: self.started_at,
            finished_at: now_ns(),
            oom_killed,
            reason: reason.to_string(),
            message,
            log_dropped_records: self.log.as_ref().map_or(0, LogWriter::dropped_records),
        }
    }
}

/// Parses the spec with serde_json directly: oci-spec's own loader hides
/// the parse error ("serde failed").
fn load_spec(path: &Path, bundle: &Path) -> Result<oci_spec::runtime::Spec, MonitorError> {
    let data = std::fs::read(path).map_err(|source| MonitorError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    let mut spec: oci_spec::runtime::Spec =
        serde_json::from_slice(&data).map_err(|e| MonitorError::LoadSpec {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    // The OCI spec allows `root.path` relative to the bundle (`runc spec`
    // writes "rootfs"); the executor wants it absolute, and the monitor
    // runs in "/", not in the bundle as runc does.
    if let Some(root) = spec.root_mut()
        && root.path().is_relative()
    {
        let absolute = bundle.join(root.path());
        root.set_path(absolute);
    }
    Ok(spec)
}

fn bind_control_socket(path: &Path) -> Result<UnixListener, MonitorError> {
    let bind_err = |source| MonitorError::Bind {
        path: path.to_path_buf(),
        source,
    };
    // A socket left by a monitor that died is in the way.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}
