//! Daemon logs: `tracing` to stderr, as text or as one JSON object a line.
//! `RUST_LOG`, when set, refines the configured level per module.
//!
//! The monitor logs the same text lines, but builds the formatter only when
//! the first event passes the filter (see [`init_monitor`]).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogLevel};

pub fn init(level: LogLevel, format: LogFormat) {
    let builder = text_builder().with_env_filter(env_filter(level));
    // A second init (tests, or a subcommand that already logged) keeps the
    // first subscriber; that is harmless, so the error is ignored.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Logging for `berth monitor`: the daemon's text format at `info` (refined
/// by `RUST_LOG`), to stderr. The formatter's span registry alone takes
/// 32 KiB, and a monitor that logs nothing (most of them) never needs it:
/// it is built with the first event the filter lets through.
pub fn init_monitor() {
    let formatter = || -> Box<dyn Subscriber + Send + Sync> {
        Box::new(
            text_builder()
                .with_max_level(tracing::Level::TRACE)
                .finish(),
        )
    };
    let _ = env_filter(LogLevel::Info)
        .with_subscriber(LazySubscriber::new(formatter))
        .try_init();
}

fn env_filter(level: LogLevel) -> EnvFilter {
    EnvFilter::builder()
        .with_default_directive(level_filter(level).into())
        .from_env_lossy()
}

fn text_builder() -> tracing_subscriber::fmt::SubscriberBuilder<
    tracing_subscriber::fmt::format::DefaultFields,
    tracing_subscriber::fmt::format::Format,
    tracing::level_filters::LevelFilter,
    fn() -> std::io::Stderr,
> {
    // Colour only for a person at a terminal: log files and journald get
    // plain text.
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr as fn() -> std::io::Stderr)
}

fn level_filter(level: LogLevel) -> tracing::level_filters::LevelFilter {
    use tracing::level_filters::LevelFilter;
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

type MakeSubscriber = Box<dyn Fn() -> Box<dyn Subscriber + Send + Sync> + Send + Sync>;

/// A subscriber that builds the real one the first time it is needed (an
/// event or a span), and forwards everything to it from then on. Filtering
/// is the job of the layer above it: it takes whatever reaches it. It does
/// not answer `current_span` (the monitor makes no spans).
struct LazySubscriber {
    make: MakeSubscriber,
    inner: OnceLock<Box<dyn Subscriber + Send + Sync>>,
}

impl LazySubscriber {
    fn new(make: impl Fn() -> Box<dyn Subscriber + Send + Sync> + Send + Sync + 'static) -> Self {
        Self {
            make: Box::new(make),
            inner: OnceLock::new(),
        }
    }

    fn inner(&self) -> &(dyn Subscriber + Send + Sync) {
        self.inner.get_or_init(|| (self.make)()).as_ref()
    }
}

impl Subscriber for LazySubscriber {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::always()
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.inner().new_span(span)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        self.inner().record(span, values);
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.inner().record_follows_from(span, follows);
    }

    fn event(&self, event: &Event<'_>) {
        self.inner().event(event);
    }

    fn enter(&self, span: &Id) {
        self.inner().enter(span);
    }

    fn exit(&self, span: &Id) {
        self.inner().exit(span);
    }

    fn clone_span(&self, id: &Id) -> Id {
        self.inner().clone_span(id)
    }

    fn try_close(&self, id: Id) -> bool {
        self.inner().try_close(id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer for the formatter that keeps what it gets.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// The lines without their timestamps.
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(|l| l.split_once(' ').unwrap().1.to_string())
                .collect()
        }
    }

    fn formatter(out: Captured) -> Box<dyn Subscriber + Send + Sync> {
        Box::new(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::TRACE)
                .with_writer(move || out.clone())
                .finish(),
        )
    }

    fn emit() {
        let errno = nix::errno::Errno::EPIPE;
        tracing::debug!("not at info");
        tracing::warn!(%errno, path = "/x", n = 3, "attacher too slow");
        tracing::error!(error = %"boom", "monitor failed");
    }

    #[test]
    fn lazy_monitor_logging_writes_what_the_formatter_writes() {
        let direct = Captured::default();
        let filtered = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer({
                let out = direct.clone();
                move || out.clone()
            })
            .with_env_filter(EnvFilter::new("info"))
            .finish();
        tracing::subscriber::with_default(filtered, emit);

        let lazy = Captured::default();
        let subscriber = EnvFilter::new("info").with_subscriber(LazySubscriber::new({
            let out = lazy.clone();
            move || formatter(out.clone())
        }));
        tracing::subscriber::with_default(subscriber, emit);

        assert_eq!(direct.lines().len(), 2, "{:?}", direct.lines());
        assert_eq!(lazy.lines(), direct.lines());
    }

    #[test]
    fn nothing_is_built_until_an_event_passes_the_filter() {
        let built = Arc::new(Mutex::new(0));
        let subscriber = EnvFilter::new("info").with_subscriber(LazySubscriber::new({
            let built = built.clone();
            move || {
                *built.lock().unwrap() += 1;
                formatter(Captured::default())
            }
        }));
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("filtered out");
            tracing::trace!(n = 1, "filtered out too");
            assert_eq!(*built.lock().unwrap(), 0);
            tracing::info!("this one builds it");
            tracing::warn!("and this one reuses it");
        });
        assert_eq!(*built.lock().unwrap(), 1);
    }
}
