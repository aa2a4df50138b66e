//! Command-line interface: parses arguments and calls the module that does
//! the work.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{self, Config, LogFormat, LogLevel, Overrides};

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "A Kubernetes node runtime serving the CRI v1 API"
)]
pub struct Cli {
    /// Configuration file; its drop-ins are read from `config.d/` beside it.
    /// Without this flag a missing /etc/berth/config.toml means all defaults.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CRI API on a unix socket.
    Serve(DirFlags),
    /// Check that this host can run pods, one line per requirement.
    Check(DirFlags),
    /// Print the effective configuration as TOML.
    Config(DirFlags),
    /// Print berth's version and the CRI API version it speaks.
    Version,
    /// Run a CRI scenario against one or two endpoints and compare them.
    Bench(crate::bench::BenchArgs),
    /// Internal: supervise one container (started by the daemon with
    /// `--config <bundle>/monitor.json`).
    #[command(hide = true)]
    Monitor {
        /// Serve the daemon as its monitor zygote (on stdin).
        #[arg(long)]
        zygote: bool,
    },
    /// Internal: run a command in a running container (run by the daemon
    /// for ExecSync).
    #[command(hide = true)]
    ExecHelper(ExecHelperArgs),
    /// Internal: a pod's infra process (PID 1 of a shared PID namespace).
    #[command(hide = true)]
    Pause,
}

#[derive(Debug, clap::Args)]
struct ExecHelperArgs {
    /// The container's init process.
    #[arg(long)]
    pid: i32,
    /// The container's OCI spec.
    #[arg(long)]
    spec: PathBuf,
    /// The OCI process to run, as JSON.
    #[arg(long)]
    process: String,
    #[arg(long)]
    cgroup_procs: Vec<PathBuf>,
    /// Give this process's stdin to the command.
    #[arg(long, conflicts_with = "tty")]
    stdin: bool,
    /// Run the command on a pty; stdin is a unix socket that gets the
    /// master.
    #[arg(long)]
    tty: bool,
}

/// Flags that override the configuration files, so that scripts and tests
/// can run daemons side by side.
#[derive(Debug, clap::Args)]
struct DirFlags {
    /// The CRI socket (default: <state>/berth.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Persistent data directory (default: /var/lib/berth).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Runtime state directory, gone after reboot (default: /run/berth).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<LogLevel>,
    /// Log one JSON object a line instead of text.
    #[arg(long)]
    log_json: bool,
}

impl Cli {
    fn load_config(&self, flags: &DirFlags) -> anyhow::Result<Config> {
        let (path, required) = match &self.config {
            Some(path) => (path.clone(), true),
            None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
        };
        let overrides = Overrides {
            socket: flags.socket.clone(),
            root: flags.root.clone(),
            state: flags.state.clone(),
            log_level: flags.log_level,
        };
        let mut config = Config::load(&path, required, &overrides)?;
        if flags.log_json {
            config.log_format = LogFormat::Json;
        }
        Ok(config)
    }
}

pub fn run() -> ExitCode {
    match monitor_invocation(std::env::args_os()) {
        Some(MonitorInvocation::Config(config)) => return run_monitor(&config),
        Some(MonitorInvocation::Zygote) => return run_zygote(),
        None => {}
    }
    let cli = Cli::parse();
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            // One line an operator can act on: the chain of causes, joined.
            eprintln!("berth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum MonitorInvocation {
    /// `monitor --config PATH`: one monitor.
    Config(PathBuf),
    /// `monitor --zygote`: the daemon's monitor zygote.
    Zygote,
}

/// The monitor's arguments when they are exactly `monitor --config PATH` or
/// `monitor --zygote`, as `monitor::spawn` and the zygote start them. Those
/// commands run once per container (or live as long as the daemon) and
/// must stay small, so they skip clap: building the parser for every
/// subcommand (`bench` included) costs a monitor heap, stack and code pages
/// it keeps for its whole life. Any other spelling goes through clap and
/// reaches the same functions.
fn monitor_invocation(mut args: impl Iterator<Item = OsString>) -> Option<MonitorInvocation> {
    let _argv0 = args.next()?;
    let (Some(command), Some(flag)) = (args.next(), args.next()) else {
        return None;
    };
    if command != "monitor" {
        return None;
    }
    match (flag.to_str(), args.next(), args.next()) {
        (Some("--zygote"), None, None) => Some(MonitorInvocation::Zygote),
        (Some("--config"), Some(path), None) if !path.is_empty() => {
            Some(MonitorInvocation::Config(PathBuf::from(path)))
        }
        _ => None,
    }
}

fn run_monitor(config: &Path) -> ExitCode {
    // Logs go to the monitor's stderr (its own log file); the subscriber
    // starts no thread, so the monitor stays single-threaded.
    crate::logging::init_monitor();
    crate::monitor::run(config)
}

fn run_zygote() -> ExitCode {
    // The subscriber (no thread) is inherited by every forked monitor and
    // writes to its stderr, which the fork makes the monitor's log.
    crate::logging::init_monitor();
    match crate::monitor::serve_zygote() {
        Ok(Some(forked)) => crate::monitor::run_forked(&forked.config_path),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "monitor zygote failed");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Serve(flags) => {
            let config = cli.load_config(flags)?;
            crate::logging::init(config.log_level, config.log_format);
            crate::daemon::run(config).context("serve")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(flags) => {
            let config = cli.load_config(flags)?;
            let findings = crate::check::run(&config);
            let mut failed = false;
            for finding in &findings {
                println!("{finding}");
                failed |= finding.outcome == crate::check::Outcome::Missing;
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Config(flags) => {
            let config = cli.load_config(flags)?;
            print!("{}", config.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Monitor { zygote: true } => Ok(run_zygote()),
        Command::Monitor { zygote: false } => {
            let path = cli
                .config
                .as_deref()
                .context("monitor needs --config <bundle>/monitor.json")?;
            Ok(run_monitor(path))
        }
        Command::ExecHelper(args) => {
            let code = crate::container::exec::helper_main(
                args.pid,
                &args.spec,
                &args.process,
                &args.cgroup_procs,
                if args.tty {
                    crate::container::exec::HelperInput::PtySocket
                } else if args.stdin {
                    crate::container::exec::HelperInput::Stdin
                } else {
                    crate::container::exec::HelperInput::None
                },
            );
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
        }
        Command::Pause => Ok(crate::sandbox::infra::pause()),
        Command::Bench(args) => Ok(if crate::bench::run(args)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Command::Version => {
            println!("berth {}", env!("CARGO_PKG_VERSION"));
            println!("CRI API v1");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> std::vec::IntoIter<OsString> {
        list.iter()
            .map(OsString::from)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn monitor_skips_clap_only_in_the_form_spawn_uses() {
        assert_eq!(
            monitor_invocation(args(&[
                "/proc/self/exe",
                "monitor",
                "--config",
                "/b/m.json"
            ])),
            Some(MonitorInvocation::Config(PathBuf::from("/b/m.json")))
        );
        assert_eq!(
            monitor_invocation(args(&["/proc/self/exe", "monitor", "--zygote"])),
            Some(MonitorInvocation::Zygote)
        );
        for other in [
            &["berth", "monitor", "--zygote", "x"][..],
            &["berth", "monitor", "--zygote=true"],
            &["berth", "--config", "/b/m.json", "monitor"],
            &["berth", "monitor", "--config=/b/m.json"],
            &["berth", "monitor", "--config", "/b/m.json", "--help"],
            &["berth", "monitor", "--config", ""],
            &["berth", "monitor"],
            &["berth", "serve", "--config", "/etc/berth/config.toml"],
            &[],
        ] {
            assert_eq!(monitor_invocation(args(other)), None, "{other:?}");
        }
    }

    #[test]
    fn clap_still_parses_every_monitor_form() {
        for form in [
            &["berth", "monitor", "--config", "/b/m.json"][..],
            &["berth", "--config", "/b/m.json", "monitor"],
            &["berth", "monitor", "--config=/b/m.json"],
        ] {
            let cli = Cli::try_parse_from(form).expect("parses");
            assert!(
                matches!(cli.command, Command::Monitor { zygote: false }),
                "{form:?}"
            );
            assert_eq!(cli.config, Some(PathBuf::from("/b/m.json")));
        }
    }
}
