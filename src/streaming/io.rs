//! What a streaming protocol hands to exec and attach, whatever it was
//! (SPDY streams or WebSocket channels): the client's stdin, stdout and
//! stderr, terminal resizes, and the error stream that says how it ended.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

use super::status::Outcome;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A terminal size in character cells, as kubelet's `TerminalSize` JSON
/// (`{"Width":80,"Height":24}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Resize events are few; a client that floods them loses the oldest.
pub const RESIZE_QUEUE: usize = 16;

/// The client's side of an exec or attach.
pub struct RemoteIo {
    pub stdin: Option<BoxRead>,
    pub stdout: Option<BoxWrite>,
    pub stderr: Option<BoxWrite>,
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
    pub tty: bool,
}

/// The error stream, in the format the negotiated protocol wants.
pub struct StatusWriter {
    pub writer: Option<BoxWrite>,
    /// v4 and later: `metav1.Status` JSON; before: the bare message.
    pub json: bool,
}

impl StatusWriter {
    pub async fn write(&mut self, outcome: &Outcome) {
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        let payload = if self.json {
            outcome.to_json()
        } else {
            outcome.to_text()
        };
        if !payload.is_empty() && writer.write_all(&payload).await.is_err() {
            return;
        }
        let _ = writer.shutdown().await;
    }
}

/// Reads a stream of resize JSON objects (kubelet's `handleResizeEvents`)
/// into a channel; ends at EOF or on the first malformed object.
pub fn resize_events(mut stream: BoxRead) -> mpsc::Receiver<TerminalSize> {
    use tokio::io::AsyncReadExt;
    let (tx, rx) = mpsc::channel(RESIZE_QUEUE);
    tokio::spawn(async move {
        let mut pending = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            let mut events = serde_json::Deserializer::from_slice(&pending).into_iter();
            let mut consumed = 0;
            loop {
                match events.next() {
                    Some(Ok(size)) => {
                        consumed = events.byte_offset();
                        if tx.send(size).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(_)) => return,
                    None => break,
                }
            }
            pending.drain(..consumed);
            // One size is a few dozen bytes; anything this long is not one.
            if pending.len() > 4096 {
                return;
            }
        }
    });
    rx
}

/// The last time bytes moved on a connection, for the idle timeout.
#[derive(Clone)]
pub struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once nothing has moved for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }
}

/// An IO that records [`Activity`] on every read and write.
pub struct Watched<T> {
    inner: T,
    activity: Activity,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        activity.touch();
        Watched { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resize_events_are_read_across_reads_and_end_on_garbage() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut rx = resize_events(Box::new(server));
        client
            .write_all(br#"{"Width":80,"Height":24}{"Width":1"#)
            .await
            .expect("write");
        assert_eq!(
            rx.recv().await,
            Some(TerminalSize {
                width: 80,
                height: 24
            })
        );
        client
            .write_all(br#"00,"Height":50} "#)
            .await
            .expect("write");
        assert_eq!(
            rx.recv().await,
            Some(TerminalSize {
                width: 100,
                height: 50
            })
        );
        client.write_all(b"not json").await.expect("write");
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_resolves_only_after_the_timeout_without_traffic() {
        let activity = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut watched = Watched::new(a, activity.clone());
        let timeout = Duration::from_secs(10);
        tokio::time::sleep(Duration::from_secs(6)).await;
        watched.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut byte)
            .await
            .expect("read");
        let started = tokio::time::Instant::now();
        activity.idle(timeout).await;
        assert!(started.elapsed() >= Duration::from_secs(9));
    }
}
