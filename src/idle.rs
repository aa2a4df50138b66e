//! The daemon gives back memory once it is quiet.
//!
//! Most of what a running daemon holds is not data but this binary's code:
//! every CRI call runs code spread over the 15 MiB text, and the kernel maps
//! it in 64 KiB around each page fault, so that after one pod's lifecycle
//! the daemon maps some 15 MiB of its own file. Those are clean page-cache
//! pages: dropping them from the daemon's page tables loses nothing, and the
//! next call faults in the little it runs from the page cache again (minor
//! faults, no disk). The same goes for what start-up ran (argument and
//! config parsing, the store's open, recovery), which is never needed again.
//!
//! So the daemon releases (`monitor::footprint::release_idle`) once when it
//! is up, and again each time it has been quiet for [`QUIET`]: no CRI call
//! started in that time and none still running. A burst of calls is never
//! interrupted; a daemon that went quiet after a burst of pods gives back
//! what the burst used. Under kubelet, which calls every second or so, the
//! daemon is never quiet that long: there it releases at most every
//! [`PERIOD`], at a moment no call runs, so that what a burst used is given
//! back within minutes and the polls fault in again only what they run.
//!
//! Before changing it: the release must stay off the path of calls. It runs
//! on a blocking thread, never while a call is in flight, and only when a
//! call ran since the last one (an untouched daemon never wakes up for it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::monitor::footprint;

/// How long the daemon must be quiet before it releases. Longer than the
/// gaps between the calls of one pod's start or a bench run, so that a
/// burst is never slowed down by refaults in its middle; and longer than
/// the 10 s tokio keeps an unused blocking thread, so that their memory is
/// free by then.
pub const QUIET: Duration = Duration::from_secs(15);

/// The longest a daemon that is called all the time keeps what it mapped.
/// A release takes a few milliseconds of a blocking thread (2.6 ms under
/// strace), and the calls after it fault their code in again (about 200
/// minor faults for a pod's lifecycle), which at this period is lost in
/// the noise.
pub const PERIOD: Duration = Duration::from_secs(300);

/// How often a due release looks again whether the calls in flight ended.
const RETRY: Duration = Duration::from_secs(1);

/// Counts the CRI calls: how many started, how many are running.
#[derive(Clone, Default)]
pub struct Activity {
    shared: Arc<Shared>,
}

struct Shared {
    started: AtomicU64,
    running: AtomicUsize,
    /// When a call last started or ended, in milliseconds since `epoch`.
    last_change_ms: AtomicU64,
    epoch: Instant,
    /// Wakes the releaser after a release, when calls come again.
    woken: Notify,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            started: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            woken: Notify::new(),
        }
    }
}

impl Shared {
    fn changed_now(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_change_ms.store(ms, Ordering::SeqCst);
    }

    fn last_change(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_change_ms.load(Ordering::SeqCst))
    }
}

impl Activity {
    /// The tower layer that counts the calls of the service it wraps.
    pub fn layer(&self) -> ActivityLayer {
        ActivityLayer {
            activity: self.clone(),
        }
    }

    /// Marks a call as running until the returned guard is dropped.
    fn begin(&self) -> Running {
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        self.shared.started.fetch_add(1, Ordering::SeqCst);
        self.shared.changed_now();
        self.shared.woken.notify_one();
        Running {
            shared: self.shared.clone(),
        }
    }

    fn started(&self) -> u64 {
        self.shared.started.load(Ordering::SeqCst)
    }

    fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }
}

struct Running {
    shared: Arc<Shared>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.changed_now();
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Gives back memory whenever the daemon has been quiet for [`QUIET`] since
/// a call, or at least every [`PERIOD`] while calls keep coming, forever.
/// `released_at_start` says whether the caller released already (so that a
/// daemon nobody calls does not release twice).
pub async fn release_when_quiet(activity: Activity, released_at_start: bool) {
    run_when_quiet(
        activity,
        QUIET,
        PERIOD,
        released_at_start,
        footprint::release_idle,
    )
    .await
}

/// [`release_when_quiet`] with its timing and the release as parameters,
/// for tests.
async fn run_when_quiet<F>(
    activity: Activity,
    quiet: Duration,
    period: Duration,
    released_at_start: bool,
    release: F,
) where
    F: Fn() + Clone + Send + 'static,
{
    // The count of started calls at the last release, and since when the
    // calls have kept the daemon from being quiet: the later of the last
    // release and the first call after it.
    let mut released_at = released_at_start.then_some(0);
    let mut busy_since = Instant::now();
    loop {
        let seen = activity.started();
        if released_at == Some(seen) {
            // Nothing ran since the last release: wait for a call.
            activity.shared.woken.notified().await;
            busy_since = Instant::now();
            continue;
        }
        let due = (activity.shared.last_change() + quiet).min(busy_since + period);
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
            continue;
        }
        if activity.running() > 0 {
            // A long call (a pull, an ExecSync), or a poll in flight.
            tokio::time::sleep(RETRY).await;
            continue;
        }
        // A call that starts now runs alongside the release, which is
        // safe, only slower for it; the next turn sees it and waits again.
        if let Err(e) = tokio::task::spawn_blocking(release.clone()).await {
            tracing::warn!("memory release failed: {e}");
        }
        released_at = Some(seen);
        busy_since = Instant::now();
    }
}

/// See [`Activity::layer`].
#[derive(Clone)]
pub struct ActivityLayer {
    activity: Activity,
}

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            activity: self.activity.clone(),
        }
    }
}

/// A service whose calls count as activity until their response is ready.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    activity: Activity,
}

impl<S, R> tower::Service<R> for Counted<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let running = self.activity.begin();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            drop(running);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    #[tokio::test]
    async fn a_call_counts_until_its_response_is_ready() {
        let activity = Activity::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
        let inner = tower::service_fn(move |n: u32| {
            let rx = rx.clone();
            async move {
                if let Some(rx) = rx.lock().await.take() {
                    let _ = rx.await;
                }
                Ok::<u32, std::convert::Infallible>(n + 1)
            }
        });
        let mut service = tower::Layer::layer(&activity.layer(), inner);
        assert_eq!((activity.started(), activity.running()), (0, 0));

        let call = service.ready().await.expect("ready").call(1);
        assert_eq!((activity.started(), activity.running()), (1, 1));

        tx.send(()).expect("the call waits");
        assert_eq!(call.await.expect("call"), 2);
        assert_eq!((activity.started(), activity.running()), (1, 0));
    }

    /// Whether no release comes within `secs` (of the paused test clock).
    async fn none_within(
        releases: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
        secs: u64,
    ) -> bool {
        tokio::time::timeout(Duration::from_secs(secs), releases.recv())
            .await
            .is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn release_comes_once_quiet_or_once_a_period_while_calls_keep_coming() {
        let activity = Activity::default();
        let (tx, mut releases) = tokio::sync::mpsc::unbounded_channel::<()>();
        let releaser = tokio::spawn(run_when_quiet(
            activity.clone(),
            Duration::from_secs(15),
            Duration::from_secs(300),
            true,
            move || {
                let _ = tx.send(());
            },
        ));

        // Released at start and no call since: nothing to give back.
        assert!(none_within(&mut releases, 3600).await);

        // One call, then quiet: one release.
        drop(activity.begin());
        releases.recv().await.expect("released after the call");
        assert!(none_within(&mut releases, 3600).await, "only once");

        // Calls 10 s apart keep it off; it comes once they stop.
        for _ in 0..5 {
            drop(activity.begin());
            assert!(none_within(&mut releases, 10).await, "not quiet yet");
        }
        releases.recv().await.expect("released after the calls");
        assert!(none_within(&mut releases, 3600).await, "only once");

        // A call that runs for a minute holds the release off.
        let running = activity.begin();
        assert!(none_within(&mut releases, 60).await, "a call is running");
        drop(running);
        releases.recv().await.expect("released once the call ended");

        // Calls every 5 s, as a kubelet's, are never quiet for 15 s: the
        // release comes once the period is over, between two calls.
        let mut released = 0;
        for _ in 0..(750 / 5) {
            drop(activity.begin());
            if !none_within(&mut releases, 5).await {
                released += 1;
            }
        }
        assert_eq!(released, 2, "once per period of 300 s in 750 s");
        releaser.abort();
    }
}
