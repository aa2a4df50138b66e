//! `berth bench`: one CRI scenario run against one or two endpoints side by
//! side, timing every RPC and sampling the memory of each runtime's
//! processes from `/proc`.
//!
//! It is a CRI client and nothing else: it never reaches into berth's code
//! or state, so it measures containerd (or any CRI runtime) the same way.
//! With `--compare`, the endpoints take turns iteration by iteration (and
//! swap who goes first every other iteration), so that both see the same
//! machine: a page cache warmed by one helps the other on the next turn, not
//! for a whole run. Whatever the bench creates is labelled with the run ID and
//! removed at the end, also after an error or Ctrl-C.

mod churn;
mod client;
mod density;
mod exec;
mod idle;
mod lifecycle;
mod pods;
mod procfs;
mod pull;
mod relist;
mod report;
pub mod stats;
mod table;
mod target;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use self::client::{Cleanup, Conn};
use self::pods::Naming;
use self::procfs::Flavor;
use self::report::Report;
use self::target::Target;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("endpoint {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    // The cause is printed by the caller's error chain (`{:#}`).
    #[error("connect to {}", path.display())]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Usage(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One pod at a time through every lifecycle RPC.
    Lifecycle,
    /// Cold pulls of --image (RemoveImage, then PullImage).
    Pull,
    /// --pods pods with a sleeping container each: memory per pod, List* at N.
    Density,
    /// --clients concurrent clients creating and deleting pods.
    Churn,
    /// ExecSync `true` into one running container, --iterations times.
    Exec,
    /// kubelet's periodic calls on a node without pods, --iterations
    /// rounds: the daemon's memory at the end is its idle memory.
    Idle,
    /// kubelet's relist on the pods the endpoints already hold, --iterations
    /// rounds; nothing is made.
    Relist,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Lifecycle => "lifecycle",
            Scenario::Pull => "pull",
            Scenario::Density => "density",
            Scenario::Churn => "churn",
            Scenario::Exec => "exec",
            Scenario::Idle => "idle",
            Scenario::Relist => "relist",
        }
    }

    fn default_iterations(self) -> u32 {
        match self {
            Scenario::Lifecycle => 20,
            Scenario::Pull => 3,
            Scenario::Density => 20,
            Scenario::Churn => 5,
            Scenario::Exec => 200,
            Scenario::Idle => 60,
            Scenario::Relist => 300,
        }
    }

    /// Pulls the image and runs warm-up pods first.
    pub fn makes_pods(self) -> bool {
        !matches!(self, Scenario::Pull | Scenario::Idle | Scenario::Relist)
    }

    fn uses_image(self) -> bool {
        !matches!(self, Scenario::Idle | Scenario::Relist)
    }
}

/// `berth bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The CRI endpoint to measure (unix:///path.sock).
    #[arg(long, value_name = "URL")]
    pub endpoint: String,
    /// A second endpoint to run the same scenario against, interleaved; the
    /// ratios are endpoint/compare.
    #[arg(long, value_name = "URL")]
    pub compare: Option<String>,
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Timed iterations [default: lifecycle 20, pull 3, density 20 list
    /// calls, churn 5 rounds, exec 200 calls, idle 60 rounds, relist 300 rounds].
    #[arg(long, value_name = "N")]
    pub iterations: Option<u32>,
    /// The image to pull (pull) or to run `sleep` and `true` from (the
    /// others but idle and relist); it must be pullable by every endpoint under this
    /// name.
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// density: how many pods.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub pods: u32,
    /// churn: how many concurrent clients.
    #[arg(long, value_name = "K", default_value_t = 4)]
    pub clients: u32,
    /// density: containers that log continuously (a trickle of lines and a
    /// 66 KB burst every second, to a log file in a temporary directory)
    /// instead of sleeping, for the memory of helpers that stream logs.
    #[arg(long)]
    pub chatty: bool,
    /// density: time the list calls again this many seconds after the
    /// first round, in rows of their own: right after N pods were made a
    /// runtime may still be busy with them (containerd is, for minutes),
    /// later it is what kubelet's relist meets most of the time.
    #[arg(long, value_name = "SECONDS")]
    pub relist_after: Option<u64>,
    /// Untimed pod lifecycles per endpoint before timing starts (pulls the
    /// image, and a pause image where the runtime uses one).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warmup: u32,
    /// The endpoint's daemon, when it cannot be found from the socket.
    #[arg(long, value_name = "PID")]
    pub daemon_pid: Option<i32>,
    /// The compare endpoint's daemon, when it cannot be found from the socket.
    #[arg(long, value_name = "PID")]
    pub compare_pid: Option<i32>,
    /// Deadline of every RPC, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub timeout: u64,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// What every scenario needs to know.
pub struct Ctx {
    pub naming: Naming,
    pub image: String,
    pub iterations: u32,
    pub warmup: u32,
    pub pods: u32,
    pub clients: u32,
    /// density: chatty containers, logging under `log_dir`.
    pub chatty: bool,
    /// density: the list calls timed again after this long.
    pub relist_after: Option<Duration>,
    /// Where the pods of a chatty run keep their logs, one directory per
    /// endpoint; removed at the end.
    pub log_dir: PathBuf,
}

impl Ctx {
    /// The log directory of endpoint `index`'s pod `name`.
    pub fn pod_log_dir(&self, index: usize, name: &str) -> PathBuf {
        self.log_dir.join(index.to_string()).join(name)
    }
}

/// The order in which the endpoints take iteration `i`: alternating who goes
/// first, so that neither always runs on a cache the other just warmed.
pub fn order(i: u32, endpoints: usize) -> Vec<usize> {
    match endpoints {
        0 => Vec::new(),
        1 => vec![0],
        _ if i.is_multiple_of(2) => vec![0, 1],
        _ => vec![1, 0],
    }
}

/// Runs the bench and prints its report on stdout; true if it ran clean
/// (every failure an RPC not implemented yet, nothing left behind).
pub fn run(args: &BenchArgs) -> Result<bool, BenchError> {
    if args.iterations == Some(0) || (args.scenario == Scenario::Density && args.pods == 0) {
        return Err(BenchError::Usage(
            "--iterations and --pods must be at least 1".to_string(),
        ));
    }
    if args.image.is_none() && args.scenario.uses_image() {
        return Err(BenchError::Usage(format!(
            "--image is needed for the {} scenario",
            args.scenario.name()
        )));
    }
    if args.chatty && args.scenario != Scenario::Density {
        return Err(BenchError::Usage(
            "--chatty is for the density scenario".to_string(),
        ));
    }
    if args.relist_after.is_some() && args.scenario != Scenario::Density {
        return Err(BenchError::Usage(
            "--relist-after is for the density scenario".to_string(),
        ));
    }
    // Before the runtime starts its threads.
    crate::monitor::footprint::tune_bench_allocator();
    // One thread: the client's half of a call (its h2 connection task and
    // the caller) stays on one CPU instead of waking a second one for each
    // answer. On two cores the second thread added 20-100 us to every call
    // of either runtime and competed with the daemons for CPU
    // (docs/performance.md, session 9). Concurrent clients (churn) are
    // futures joined in one task either way.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    let report = runtime.block_on(bench(args))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(report.clean())
}

async fn bench(args: &BenchArgs) -> Result<Report, BenchError> {
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let run_id = pods::run_id();
    let ctx = Ctx {
        log_dir: std::env::temp_dir().join(format!("berth-bench-{run_id}")),
        naming: Naming {
            scenario: args.scenario.name(),
            run_id,
        },
        image: args.image.clone().unwrap_or_default(),
        iterations: args
            .iterations
            .unwrap_or_else(|| args.scenario.default_iterations()),
        warmup: args.warmup,
        pods: args.pods,
        clients: args.clients,
        chatty: args.chatty,
        relist_after: args.relist_after.map(Duration::from_secs),
    };
    let timeout = Duration::from_secs(args.timeout.max(1));

    let mut endpoints = vec![(args.endpoint.clone(), args.daemon_pid)];
    if let Some(compare) = &args.compare {
        endpoints.push((compare.clone(), args.compare_pid));
    }
    let mut targets = Vec::new();
    for (index, (url, pid)) in endpoints.into_iter().enumerate() {
        targets.push(open(index, url, pid, timeout).await?);
    }

    for target in &mut targets {
        target.memory.start = target.snapshot();
        target.start_peak_sampler();
    }
    let interrupted = tokio::select! {
        () = scenario(&mut targets, &ctx, args.scenario) => false,
        () = interrupt() => true,
    };
    for target in &mut targets {
        target.stop_peak_sampler();
        target.memory.end = target.snapshot();
    }

    let mut cleanups = Vec::new();
    for target in &mut targets {
        cleanups.push(clean_up(target, &ctx).await);
    }
    // Each endpoint's logs went with its clean-up; the directory is empty.
    let _ = std::fs::remove_dir(&ctx.log_dir);
    Ok(Report::new(
        &ctx,
        args.scenario,
        started_unix,
        interrupted,
        targets,
        cleanups,
    ))
}

/// Connects to one endpoint, asks who it is and finds its daemon.
async fn open(
    index: usize,
    url: String,
    pid_flag: Option<i32>,
    timeout: Duration,
) -> Result<Target, BenchError> {
    let socket = client::socket_path(&url)?;
    let channel = client::connect(&socket).await?;
    let mut conn = Conn::new(channel, timeout);
    let version = conn.version().await;

    let (daemon_pid, found_by) = match pid_flag {
        Some(pid) => (
            Some(pid),
            if index == 0 {
                "--daemon-pid"
            } else {
                "--compare-pid"
            },
        ),
        None => match procfs::socket_owner(&socket) {
            Some(pid) => (Some(pid), "socket owner"),
            None => (None, "not found"),
        },
    };
    let mut flavor = daemon_pid
        .and_then(procfs::cmdline)
        .map_or(Flavor::Unknown, |c| procfs::flavor_of(&c, &socket));
    if flavor == Flavor::Unknown
        && let Ok((name, _)) = &version
    {
        flavor = match name.as_str() {
            "berth" => Flavor::Berth { state: None },
            "containerd" => Flavor::Containerd {
                socket: socket.clone(),
            },
            _ => Flavor::Unknown,
        };
    }
    let mut target = Target::new(index, url, socket, conn, daemon_pid, found_by, flavor);
    target.memory.helper = target.flavor.helper_name();
    match version {
        Ok((name, version)) => {
            target.runtime_name = name;
            target.runtime_version = version;
        }
        Err(f) => target.notes.push(format!("no runtime name: {f}")),
    }
    Ok(target)
}

async fn scenario(targets: &mut [Target], ctx: &Ctx, scenario: Scenario) {
    prepare(targets, ctx, scenario).await;
    match scenario {
        Scenario::Lifecycle => lifecycle::run(targets, ctx).await,
        Scenario::Pull => pull::run(targets, ctx).await,
        Scenario::Density => density::run(targets, ctx).await,
        Scenario::Churn => churn::run(targets, ctx).await,
        Scenario::Exec => exec::run(targets, ctx).await,
        Scenario::Idle => idle::run(targets, ctx).await,
        Scenario::Relist => relist::run(targets, ctx).await,
    }
}

/// Untimed: note whether the image is there (so that clean-up restores
/// that), pull it for pod scenarios, and run the warm-up pods.
async fn prepare(targets: &mut [Target], ctx: &Ctx, scenario: Scenario) {
    if !scenario.uses_image() {
        return;
    }
    for target in targets.iter_mut() {
        match target.conn.image_status(&ctx.image).await {
            Ok(status) => target.image_was_present = Some(status.is_some()),
            Err(f) => {
                target.fail(f);
                continue;
            }
        }
        if scenario.makes_pods()
            && target.image_was_present == Some(false)
            && let Err(f) = target.conn.pull(&ctx.image).await
        {
            target.fail(f);
        }
    }
    if !scenario.makes_pods() {
        return;
    }
    for w in 0..ctx.warmup {
        for t in order(w, targets.len()) {
            let target = &mut targets[t];
            if target.active()
                && let Err(f) = lifecycle::cycle(target, ctx, false, false).await
            {
                target.fail(f);
            }
        }
    }
}

/// Removes what the run made on this endpoint, best effort: pods and
/// containers, and the image if it was not there before.
async fn clean_up(target: &mut Target, ctx: &Ctx) -> Cleanup {
    let mut cleanup = target
        .conn
        .clean_up((pods::RUN_LABEL, &ctx.naming.run_id))
        .await;
    if ctx.chatty {
        // The pods are gone, and their logs with them from the runtime's view.
        let dir = ctx.log_dir.join(target.index.to_string());
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => cleanup
                .errors
                .push(format!("container logs {}: {e}", dir.display())),
        }
    }
    if target.image_was_present == Some(false) {
        match target.conn.image_status(&ctx.image).await {
            Ok(Some(_)) => match target.conn.remove_image(&ctx.image).await {
                Ok(_) => cleanup.image_removed = true,
                Err(f) => cleanup.errors.push(format!("image {}: {f}", ctx.image)),
            },
            Ok(None) => {}
            Err(f) => cleanup.errors.push(format!("image {}: {f}", ctx.image)),
        }
    }
    cleanup
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupt() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_alternate_who_goes_first() {
        assert_eq!(order(0, 2), vec![0, 1]);
        assert_eq!(order(1, 2), vec![1, 0]);
        assert_eq!(order(2, 2), vec![0, 1]);
        assert_eq!(order(7, 1), vec![0]);
        assert!(order(0, 0).is_empty());
    }

    #[test]
    fn every_scenario_has_iterations_by_default() {
        for s in [
            Scenario::Lifecycle,
            Scenario::Pull,
            Scenario::Density,
            Scenario::Churn,
            Scenario::Exec,
            Scenario::Idle,
            Scenario::Relist,
        ] {
            assert!(s.default_iterations() > 0, "{}", s.name());
        }
    }
}
