//! Integration-test rig: a real `berth serve` on a temporary socket with
//! temporary root and state directories, and CRI clients connected to it.
//! Everything is torn down when the [`TestDaemon`] is dropped, also when the
//! test panics.

#![allow(dead_code)] // each test binary uses a different part of the rig

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a daemon may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub fn berth_bin() -> &'static str {
    env!("CARGO_BIN_EXE_berth")
}

/// Copies an executable that is about to be run, by `cp` rather than by
/// this process: a fork on another test's thread would inherit our write
/// descriptor until its exec, and running the copy meanwhile fails with
/// ETXTBSY.
pub fn copy_executable(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp {} {}: {status}",
        from.display(),
        to.display()
    );
}

pub struct TestDaemon {
    child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
}

/// What a daemon is started with; `Default` is an empty config file.
#[derive(Default)]
pub struct Options {
    pub config_toml: String,
    /// Use these directories instead of fresh ones (to restart on the same
    /// state, or to collide with another daemon on purpose).
    pub socket: Option<PathBuf>,
    pub root: Option<PathBuf>,
    pub state: Option<PathBuf>,
    /// Run this copy of berth instead of the one cargo built.
    pub binary: Option<PathBuf>,
}

impl TestDaemon {
    pub fn start() -> TestDaemon {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> TestDaemon {
        let mut daemon = Self::spawn(options);
        daemon.wait_ready();
        daemon
    }

    /// Starts the daemon without waiting for it to listen.
    pub fn spawn(options: Options) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("berth-it-")
            .tempdir()
            .expect("create test dir");
        let socket = options
            .socket
            .unwrap_or_else(|| dir.path().join("berth.sock"));
        let root = options.root.unwrap_or_else(|| dir.path().join("root"));
        let state = options.state.unwrap_or_else(|| dir.path().join("state"));
        let config = dir.path().join("etc/config.toml");
        std::fs::create_dir_all(config.parent().expect("config has a parent")).expect("mkdir etc");
        std::fs::write(&config, &options.config_toml).expect("write config");
        let log = dir.path().join("daemon.log");
        let binary = options.binary.unwrap_or_else(|| PathBuf::from(berth_bin()));
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--root")
            .arg(&root)
            .arg("--state")
            .arg(&state)
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("create log"))
            .stderr(File::create(&log).expect("create log"))
            .spawn()
            .expect("spawn berth serve");
        TestDaemon {
            child: Some(child),
            dir,
            socket,
            root,
            state,
            config,
            log,
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child_mut().try_wait().expect("poll daemon") {
                panic!(
                    "berth serve exited with {status} before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "berth serve did not listen within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon is running")
    }

    pub fn pid(&self) -> Pid {
        let id = self.child.as_ref().expect("daemon is running").id();
        Pid::from_raw(i32::try_from(id).expect("pid fits i32"))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal daemon");
    }

    /// Waits up to `limit` for the daemon to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("poll daemon") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit status (SIGKILL if it does not exit in 10 s).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        match self.wait_exit(Duration::from_secs(10)) {
            Some(status) => status,
            None => {
                let _ = self.child_mut().kill();
                panic!("berth serve ignored SIGTERM for 10 s:\n{}", self.log());
            }
        }
    }

    pub async fn channel(&self) -> Channel {
        connect(&self.socket).await
    }

    pub async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel().await)
    }

    pub async fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A daemon that stops cleanly with no pod left releases the pins'
        // mount namespace itself; a killed one leaves it, as it leaves pods.
        let _ = nix::mount::umount2(&self.state.join(PINS), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The pin of the daemon's pins' mount namespace in its state directory
/// (`sandbox::pin_ns`).
pub const PINS: &str = "pins";

/// The mount points in the pins' mount namespace of the daemon `pid`, but
/// its own `/` and `/proc`: the pods' namespace pins. They are read through
/// the daemon's thread in that namespace, `berth-pins`.
pub fn pin_mounts(pid: u32) -> Vec<PathBuf> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "berth-pins" {
            return std::fs::read_to_string(task.path().join("mountinfo"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| !matches!(*m, "/" | "/proc"))
                .map(PathBuf::from)
                .collect();
        }
    }
    Vec::new()
}

/// A gRPC channel over the unix socket at `path`.
pub async fn connect(path: &Path) -> Channel {
    let path = path.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to berth socket")
}

/// Runs `future` on a runtime and thread of its own; `None` if the runtime
/// could not start or the future panicked. For clean-up in `Drop`, which may
/// run inside the test's runtime: a runtime started there panics, and during
/// a failing test's unwinding that aborts the test binary before its other
/// guards run.
pub fn block_on_own_thread<F>(future: F) -> Option<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                Some(runtime.block_on(future))
            })
            .join()
            .ok()
            .flatten()
    })
}

/// Runs `berth` with `args` to completion: (status, stdout, stderr).
pub fn run_berth(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(berth_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run berth");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The test rig's registry and images (hack/test.sh exports where they are).
pub struct TestImages {
    pub registry: String,
    json: serde_json::Value,
}

impl TestImages {
    /// The rig, or `None` with the reason printed: a test without it skips.
    pub fn load() -> Option<TestImages> {
        let (Ok(registry), Ok(path)) = (
            std::env::var("BERTH_TEST_REGISTRY"),
            std::env::var("BERTH_TEST_IMAGES"),
        ) else {
            eprintln!(
                "skipping: no test registry (run through hack/test.sh, which sets BERTH_TEST_REGISTRY and BERTH_TEST_IMAGES)"
            );
            return None;
        };
        let text = std::fs::read_to_string(&path).expect("read BERTH_TEST_IMAGES");
        Some(TestImages {
            registry,
            json: serde_json::from_str(&text).expect("images.json is JSON"),
        })
    }

    /// One image's entry from images.json (`busybox`, `nonroot`, …).
    pub fn image(&self, key: &str) -> &serde_json::Value {
        let image = &self.json["images"][key];
        assert!(image.is_object(), "no image {key} in images.json");
        image
    }

    pub fn reference(&self, key: &str) -> String {
        self.image(key)["reference"]
            .as_str()
            .expect("reference")
            .to_string()
    }

    pub fn str(&self, key: &str, field: &str) -> String {
        self.image(key)[field]
            .as_str()
            .unwrap_or_else(|| panic!("{key}.{field}"))
            .to_string()
    }

    pub fn u64(&self, key: &str, field: &str) -> u64 {
        self.image(key)[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}.{field}"))
    }
}

/// A config that lets berth talk plain HTTP to the loopback test registry.
pub const LOOPBACK_REGISTRY_CONFIG: &str = "[image]\ninsecure_loopback = true\n";

/// A TCP proxy on 127.0.0.1 in front of `upstream` that counts the HTTP
/// requests passing through, by request line. Stops when dropped.
pub struct CountingProxy {
    pub address: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(upstream: &str) -> CountingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let address = listener.local_addr().expect("proxy address").to_string();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let upstream = upstream.to_string();
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // Request lines start a request; bodies of
                            // pulls are empty, so this sees each request.
                            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                                if line.starts_with("GET ") || line.starts_with("HEAD ") {
                                    seen.lock().expect("requests").push(line.to_string());
                                }
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        CountingProxy {
            address,
            requests,
            task,
        }
    }

    /// How many requests had a request line containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.requests
            .lock()
            .expect("requests")
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
