//! `berth serve`: the daemon's life from start to exit.
//!
//! Start-up is synchronous and happens before the tokio runtime exists:
//! directories, the two locks (root and socket), the metadata store, the
//! socket. Only then are the CRI services served. On SIGTERM or SIGINT the
//! daemon stops accepting, lets in-flight calls finish for a bounded time and
//! exits 0. It never stops containers on the way out: they belong to their
//! monitors, not to the daemon.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nix::sys::socket::sockopt;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::container::{ContainerError, ContainerManager};
use crate::executor::cgroups::CgroupManager;
use crate::idle::{self, Activity};
use crate::image::snapshot::Snapshots;
use crate::image::store::{ImageError, ImageStore};
use crate::monitor::footprint;
use crate::network::{Network, NetworkError, Readiness};
use crate::sandbox::namespaces::PinError;
use crate::sandbox::pin_ns::PinNamespace;
use crate::sandbox::{SandboxError, SandboxManager};
use crate::store::{Kind, Store, StoreError};
use crate::streaming::{StreamingError, StreamingServer};

/// How long in-flight calls may run after a shutdown signal. kubelet and
/// systemd expect a runtime to be gone within 2 s of SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open lock file {path}: {source}")]
    LockOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another berth daemon is using {what} {path} (lock {lock} is held); stop it first or pass other --root/--state/--socket"
    )]
    Locked {
        what: &'static str,
        path: PathBuf,
        lock: PathBuf,
    },
    #[error("lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "socket {path}: another process is listening on it; stop it first or pass another --socket"
    )]
    SocketInUse { path: PathBuf },
    #[error("socket {path}: exists and is not a socket; remove it or pass another --socket")]
    NotASocket { path: PathBuf },
    #[error("socket {path}: {action}: {source}")]
    Socket {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Streaming(#[from] StreamingError),
    #[error("image store: {0}")]
    Images(#[from] ImageError),
    #[error("pod network: {0}")]
    Network(#[from] NetworkError),
    #[error("pod namespace pins: {0}")]
    Pins(#[from] PinError),
    #[error("recover pod sandboxes: {0}")]
    Sandboxes(#[from] SandboxError),
    #[error("containers: {0}")]
    Containers(#[from] ContainerError),
    #[error("start async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("serve CRI: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// What every RPC handler shares: the configuration and the domain state.
pub struct Daemon {
    pub config: Config,
    pub store: Store,
    pub images: Arc<ImageStore>,
    pub network: Arc<Network>,
    pub sandboxes: Arc<SandboxManager>,
    pub containers: Arc<ContainerManager>,
    /// Where Exec, Attach and PortForward URLs point.
    pub streaming: StreamingServer,
    /// The pod CIDRs kubelet gave with `UpdateRuntimeConfig`, if any.
    pod_cidrs: RwLock<Vec<ipnet::IpNet>>,
    /// Pods may have user namespaces of their own (`hostUsers: false`):
    /// the kernel allows user namespaces and the layers' filesystem takes
    /// idmapped mounts. Found at start; `Status` says it.
    pub user_namespaces: bool,
}

/// The store key of the pod CIDRs kubelet sent.
const POD_CIDRS_KEY: &str = "pod_cidrs";

fn pod_cidrs_of(store: &Store) -> Result<Vec<ipnet::IpNet>, StoreError> {
    Ok(store.get(Kind::Runtime, POD_CIDRS_KEY)?.unwrap_or_default())
}

impl Daemon {
    /// Builds the daemon's state from the config and what the store kept
    /// from earlier runs.
    pub fn new(config: Config, store: Store) -> Result<Self, DaemonError> {
        let pod_cidrs = pod_cidrs_of(&store)?;
        let images = ImageStore::open(
            &config.root,
            store.clone(),
            config.registries.clone(),
            config.image.clone(),
        )?;
        let network = Arc::new(Network::new(
            &config.network,
            &config.root,
            &config.state,
            store.clone(),
        )?);
        if !pod_cidrs.is_empty() {
            network.set_pod_cidrs(pod_cidrs.clone());
        }
        let cgroups = match CgroupManager::detect(config.cgroup_driver) {
            Ok(cgroups) => Some(cgroups),
            Err(e) => {
                warn!("no cgroup hierarchy usable for pod cgroups: {e}");
                None
            }
        };
        let pause = match crate::sandbox::infra::install_pause(&config.root) {
            Ok(path) => path,
            Err(e) => {
                // Pods with a shared PID namespace then fail once the
                // binary at that path is replaced or removed.
                let path =
                    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
                warn!(binary = %path.display(), "{e}: infra containers bind the binary's path instead");
                path
            }
        };
        let user_namespaces = user_namespaces_work(images.layers().dir());
        let sandboxes = Arc::new(SandboxManager::new(
            store.clone(),
            &config.state,
            network.clone(),
            cgroups.clone(),
            config.sandbox.shm_size_bytes,
            pause,
            PinNamespace::open(&config.state)?,
        ));
        let containers = ContainerManager::new(
            store.clone(),
            &config.state,
            images.clone(),
            sandboxes.clone(),
            Snapshots::new(&config.root, images.layers()),
            cgroups,
        )?;
        let streaming = StreamingServer::bind(&config.streaming)?;
        Ok(Daemon {
            config,
            store,
            images,
            network,
            sandboxes,
            containers,
            streaming,
            pod_cidrs: RwLock::new(pod_cidrs),
            user_namespaces,
        })
    }

    /// kubelet's pod CIDRs, or the configured one until kubelet sends any.
    pub fn pod_cidrs(&self) -> Vec<ipnet::IpNet> {
        let cidrs = self
            .pod_cidrs
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if cidrs.is_empty() {
            vec![self.config.network.pod_cidr]
        } else {
            cidrs.clone()
        }
    }

    /// Keeps kubelet's pod CIDRs, also across restarts: the built-in
    /// network allocates from them. Blocking (a store commit).
    pub fn set_pod_cidrs(&self, cidrs: Vec<ipnet::IpNet>) -> Result<(), StoreError> {
        let mut current = self
            .pod_cidrs
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *current != cidrs {
            self.store.put(Kind::Runtime, POD_CIDRS_KEY, &cidrs)?;
            self.network.set_pod_cidrs(cidrs.clone());
            info!(?cidrs, "pod CIDRs updated");
            *current = cidrs;
        }
        Ok(())
    }

    /// The runtime is ready when its state can be written: the store is
    /// open (it is, or the daemon would not have started) and the state
    /// directory is still there.
    pub fn runtime_readiness(&self) -> Readiness {
        match std::fs::metadata(&self.config.state) {
            Ok(meta) if meta.is_dir() => Readiness::ready(),
            Ok(_) => Readiness::not_ready(
                "RuntimeStateMissing",
                format!("state {} is not a directory", self.config.state.display()),
            ),
            Err(e) => Readiness::not_ready(
                "RuntimeStateMissing",
                format!("state {}: {e}", self.config.state.display()),
            ),
        }
    }

    pub fn network_readiness(&self) -> Readiness {
        self.network.readiness()
    }
}

/// Runs the daemon until a shutdown signal. Returns after a clean shutdown.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Before the runtime's threads exist.
    footprint::tune_daemon_allocator();
    // Others may pass through the root, not list it: the containers of
    // pods with user namespaces are not the host's root, and their init
    // reaches its rootfs (`<root>/containers/<id>/rootfs`) and `/pause`
    // through it. What is private below it is 0700 itself (content,
    // layers). Set on every start, for roots made 0700 before.
    create_dir(&config.root, 0o711)?;
    set_mode(&config.root, 0o711)?;
    create_dir(&config.state, 0o711)?;
    let socket = config.socket_path();
    if let Some(parent) = socket.parent() {
        create_dir(parent, 0o711)?;
    }
    let _root_lock = lock(&config.root.join("berth.lock"), "root", &config.root)?;
    let socket_lock_path = PathBuf::from(format!("{}.lock", socket.display()));
    let _socket_lock = lock(&socket_lock_path, "socket", &socket)?;
    remove_stale_socket(&socket)?;

    // One TLS provider for every registry connection; a second install
    // (never happens in one process) would keep the first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let store = Store::open(&config.root)?;
    let daemon = Arc::new(Daemon::new(config, store)?);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth-serve")
        .build()
        .map_err(DaemonError::Runtime)?;
    let result = runtime.block_on(serve(daemon, &socket));
    // Whatever happened, the socket must not outlive the daemon: a client
    // would otherwise connect to nothing and wait.
    if let Err(e) = std::fs::remove_file(&socket)
        && e.kind() != ErrorKind::NotFound
    {
        warn!(socket = %socket.display(), "remove socket: {e}");
    }
    // In-flight blocking work (fsync, unpack) is not waited for past the
    // grace period; its state is crash-safe by construction.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

/// The send buffer of a client's connection. kubelet's relist at 1000
/// containers is a ~450 KB ListContainers answer; with the default (~208
/// KiB) the daemon writes it in pieces, each waiting for the client to read,
/// which took ~15% of the call (docs/performance.md). The kernel doubles the
/// value and caps it at net.core.wmem_max; memory is only used while data
/// waits for the client.
const CLIENT_SNDBUF: usize = 1 << 20;

async fn serve(daemon: Arc<Daemon>, socket: &Path) -> Result<(), DaemonError> {
    let socket_err = |action, source| DaemonError::Socket {
        path: socket.to_path_buf(),
        action,
        source,
    };
    // Before the socket exists: a client that sees it may signal at once,
    // and the default action would end the daemon without its clean-up.
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let listener = UnixListener::bind(socket).map_err(|e| socket_err("bind", e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| socket_err("chmod 0660", e))?;
    // Pods a crash left half-made are undone before anyone can see them.
    daemon.sandboxes.recover().await?;
    daemon.containers.start().await?;
    daemon
        .streaming
        .serve(Arc::new(crate::streaming::runtime::DaemonRuntime::new(
            daemon.containers.clone(),
            daemon.sandboxes.clone(),
        )))?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let activity = Activity::default();
    let router = crate::server::router(daemon.clone(), &activity);
    let connections = UnixListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|conn| {
            if let Err(e) = nix::sys::socket::setsockopt(conn, sockopt::SndBuf, &CLIENT_SNDBUF) {
                debug!("set SO_SNDBUF on a client connection: {e}");
            }
        })
    });
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(connections, async {
        let _ = stop_rx.await;
    }));
    info!(
        socket = %socket.display(),
        root = %daemon.config.root.display(),
        state = %daemon.config.state.display(),
        version = env!("CARGO_PKG_VERSION"),
        "berth serving CRI"
    );
    // Start-up's code, its parse of the config and the store, and its
    // stack are never needed again (see `idle`). This runs on the main
    // thread, outside the runtime's workers, so it also drops the stack
    // start-up used; from now on the daemon releases whenever it is quiet.
    footprint::release_idle();
    tokio::spawn(idle::release_when_quiet(activity, true));

    let signal_name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        result = &mut server => {
            // The server stopped on its own: that is an error, never a shutdown.
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(DaemonError::Serve(e)),
                Err(join) => Err(DaemonError::Runtime(std::io::Error::other(join))),
            };
        }
    };
    info!("{signal_name}: shutting down, containers keep running");
    let _ = stop_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(Ok(Ok(()))) => info!("all calls finished"),
        Ok(Ok(Err(e))) => warn!("server ended with an error during shutdown: {e}"),
        Ok(Err(join)) => warn!("server task failed during shutdown: {join}"),
        Err(_) => {
            // Long-lived streams (events, logs) do not end by themselves.
            warn!("calls still open after {SHUTDOWN_GRACE:?}; closing them");
            server.abort();
        }
    }
    // Pods outlive the daemon, and their pins with them; with no pod left
    // the pins' namespace goes too, so a stopped daemon leaves no mount.
    if let Err(e) = daemon.sandboxes.release_pins_if_unused().await {
        warn!("release the pins' mount namespace: {e}");
    }
    Ok(())
}

fn create_dir(path: &Path, mode: u32) -> Result<(), DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| DaemonError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether pods may have user namespaces of their own here (see
/// `Daemon::user_namespaces`); says why not in the log.
fn user_namespaces_work(layers: &Path) -> bool {
    match crate::check::pod_user_namespaces(layers) {
        Ok(()) => true,
        Err(why) => {
            info!(
                "pods with user namespaces of their own (hostUsers: false) are not offered: {why}"
            );
            false
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), DaemonError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        DaemonError::CreateDir {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Takes an exclusive `flock` that the kernel releases when the process dies,
/// so that a crashed daemon never leaves a lock behind.
fn lock(lock_path: &Path, what: &'static str, path: &Path) -> Result<File, DaemonError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .map_err(|source| DaemonError::LockOpen {
            path: lock_path.to_path_buf(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DaemonError::Locked {
            what,
            path: path.to_path_buf(),
            lock: lock_path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(DaemonError::Lock {
            path: lock_path.to_path_buf(),
            source,
        }),
    }
}

/// A socket file left by a daemon that died is replaced; one that something
/// still listens on is not (that may be another runtime, not a berth).
fn remove_stale_socket(socket: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(DaemonError::Socket {
                path: socket.to_path_buf(),
                action: "stat",
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(DaemonError::NotASocket {
            path: socket.to_path_buf(),
        });
    }
    if UnixStream::connect(socket).is_ok() {
        return Err(DaemonError::SocketInUse {
            path: socket.to_path_buf(),
        });
    }
    info!(socket = %socket.display(), "replacing stale socket");
    std::fs::remove_file(socket).map_err(|source| DaemonError::Socket {
        path: socket.to_path_buf(),
        action: "remove stale",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("berth.lock");
        let _first = lock(&path, "root", dir.path()).expect("first lock");
        let err = lock(&path, "root", dir.path()).expect_err("second lock");
        assert!(matches!(err, DaemonError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another berth daemon"), "{err}");
    }

    #[test]
    fn stale_socket_is_replaced_but_a_live_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let err = remove_stale_socket(&path).expect_err("live socket");
        assert!(matches!(err, DaemonError::SocketInUse { .. }), "{err}");
        drop(listener);
        remove_stale_socket(&path).expect("stale socket removed");
        assert!(!path.exists());
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_not_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        std::fs::write(&path, b"data").expect("write");
        let err = remove_stale_socket(&path).expect_err("not a socket");
        assert!(matches!(err, DaemonError::NotASocket { .. }), "{err}");
        assert!(path.exists());
    }
}
