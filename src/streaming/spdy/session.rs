//! The server side of one SPDY/3.1 connection: the peer (kubectl, the API
//! server) opens streams, we answer each with SYN_REPLY and hand it to the
//! streaming server as an `AsyncRead` half and an `AsyncWrite` half.
//!
//! Before changing this file, know how spdystream (the only peer we meet)
//! treats flow control: it never sends WINDOW_UPDATE or SETTINGS, and the
//! WINDOW_UPDATEs it receives fall through its frame handler as "unhandled
//! frame type" (connection.go, `frameHandler`). So:
//! - we never wait for send window: enforcing the SPDY/3.1 64 KiB initial
//!   window would stall every stream after 64 KiB;
//! - we send no WINDOW_UPDATE either, exactly like kubelet's spdystream
//!   server; they would only occupy slots in spdystream's bounded frame
//!   queues;
//! - inbound backpressure is the one spdystream itself uses: when a stream's
//!   buffer (or all streams' buffers together) is over its cap, the
//!   connection task stops reading the socket until the application drains
//!   it, and TCP pushes back on the peer. Like spdystream, that stalls every
//!   stream of the connection while one reader lags; a reader that is
//!   dropped never stalls anything, its data is discarded.
//!
//! One spawned task per connection runs three futures: the reader (decodes
//! frames, feeds streams), the writer (the only owner of the socket's write
//! half and of the header compressor, fed by one queue whose memory is
//! bounded by a byte budget) and a timer (idle timeout, close deadline).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{AcquireError, Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;

use super::frame::{
    Codec, Frame, FrameDecoder, FrameEncoder, FrameError, FrameLimits, GoAwayStatus, Headers,
    RstStatus,
};

/// What one connection may cost. The defaults suit kubectl exec/attach/
/// port-forward; every wait they imply is bounded.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Streams the peer may have open at once; more are refused with
    /// RST_STREAM REFUSED_STREAM (spdystream's CreateStream then fails).
    pub max_streams: usize,
    /// Frame and header-block caps; a peer exceeding them loses the
    /// connection.
    pub frame: FrameLimits,
    /// Bytes buffered for one stream before the connection stops reading the
    /// socket. A single frame may overshoot it once.
    pub stream_buffer: usize,
    /// Bytes buffered for all streams together before the connection stops
    /// reading the socket.
    pub connection_buffer: usize,
    /// Bytes of outgoing frames queued for the writer before writers wait.
    pub write_buffer: usize,
    /// Largest DATA frame we send; longer writes are split.
    pub max_write_frame: usize,
    /// Close the connection (GOAWAY) after this long without a frame either
    /// way. kubelet's default stream idle timeout is 4 hours.
    pub idle_timeout: Option<Duration>,
    /// How long a closing connection may take to flush GOAWAY before the
    /// socket is dropped.
    pub close_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_streams: 1024,
            frame: FrameLimits::default(),
            stream_buffer: 256 * 1024,
            connection_buffer: 4 * 1024 * 1024,
            write_buffer: 256 * 1024,
            max_write_frame: 32 * 1024,
            idle_timeout: Some(Duration::from_secs(4 * 60 * 60)),
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a connection ended abnormally (see [`Session::closed`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("read from the spdy peer: {0}")]
    Read(#[source] Arc<io::Error>),
    #[error("write to the spdy peer: {0}")]
    Write(#[source] Arc<io::Error>),
    #[error("spdy peer sent a bad frame: {0}")]
    BadFrame(#[source] FrameError),
    #[error("spdy peer broke the protocol: {reason}")]
    Protocol { reason: String },
    #[error("encode a spdy frame for the peer: {0}")]
    Encode(#[source] FrameError),
    #[error("spdy connection idle for {0:?}, closed")]
    IdleTimeout(Duration),
    #[error("spdy peer did not take the goaway within {0:?}, connection dropped")]
    CloseTimeout(Duration),
}

/// Cost charged against the write budget for a control frame.
const CONTROL_COST: u32 = 32;
/// Read at least this much from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Coalesce queued frames into writes of about this size.
const WRITE_BATCH: usize = 64 * 1024;

/// Starts serving `io` as the server side of a SPDY/3.1 connection: one task
/// is spawned (so this must run inside a tokio runtime). It lives until the
/// peer disconnects, a protocol error, [`Session::close`], the idle timeout,
/// or until the `Session`, the `Incoming` and every stream half are dropped.
pub fn serve<IO>(io: IO, limits: Limits) -> (Session, Incoming)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut limits = limits;
    limits.max_write_frame = limits
        .max_write_frame
        .clamp(1, super::frame::MAX_FRAME_LENGTH);
    // A writer must always be able to get a whole chunk's worth of budget.
    limits.write_buffer = limits
        .write_buffer
        .max(limits.max_write_frame)
        .max(CONTROL_COST as usize)
        .min(u32::MAX as usize);

    let (out, out_rx) = mpsc::unbounded_channel();
    let (accept_tx, accept_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        budget: Arc::new(Semaphore::new(limits.write_buffer)),
        limits,
        state: Mutex::new(ConnState::default()),
        out,
        inbound: AtomicUsize::new(0),
        drained: Notify::new(),
        closing_flag: AtomicBool::new(false),
        closing: watch::Sender::new(false),
        shutdown: watch::Sender::new(false),
        closed: watch::Sender::new(false),
        epoch: Instant::now(),
        last_activity_ms: AtomicU64::new(0),
    });
    let guard = Arc::new(Guard(shared.clone()));
    let codec = Codec::new(shared.limits.frame);
    let weak_guard = Arc::downgrade(&guard);

    let task_shared = shared.clone();
    tokio::spawn(async move {
        let shared = task_shared;
        match codec {
            Ok(codec) => {
                let (decoder, encoder) = codec.split();
                run(&shared, io, decoder, encoder, out_rx, accept_tx, weak_guard).await;
            }
            Err(e) => shared.fail(SessionError::Encode(e)),
        }
        shared.mark_dead();
        shared.closed.send_replace(true);
    });

    (
        Session {
            guard: guard.clone(),
        },
        Incoming {
            rx: accept_rx,
            _guard: guard,
        },
    )
}

async fn run<IO>(
    shared: &Arc<Shared>,
    io: IO,
    decoder: FrameDecoder,
    encoder: FrameEncoder,
    out_rx: mpsc::UnboundedReceiver<Outgoing>,
    accept: mpsc::UnboundedSender<Stream>,
    guard: Weak<Guard>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let read = async {
        let mut reader = ReadLoop {
            shared,
            decoder,
            accept: Some(accept),
            guard,
        };
        match reader.run(rd).await {
            ReadEnd::Eof => {
                tracing::debug!("spdy peer closed the connection");
                shared.trigger_shutdown();
            }
            ReadEnd::Failed(e) => {
                tracing::debug!(error = %e, "spdy connection read failed");
                shared.fail(e);
                shared.trigger_shutdown();
            }
            ReadEnd::Protocol(e) => {
                tracing::warn!(error = %e, "closing spdy connection");
                shared.fail(e);
                shared.start_close(GoAwayStatus::PROTOCOL_ERROR);
            }
            ReadEnd::Stopped => {}
        }
        // No more inbound data can arrive: wake every reader now rather than
        // when the GOAWAY is flushed.
        shared.mark_dead();
    };
    let write = async {
        if let Err(e) = write_loop(shared, wr, encoder, out_rx).await {
            tracing::debug!(error = %e, "spdy connection write failed");
            shared.fail(e);
        }
        shared.trigger_shutdown();
    };
    tokio::join!(read, write, supervise(shared));
}

/// Keeps the connection alive while any user handle exists; the last one
/// dropped closes it (GOAWAY) so that dropping everything frees everything.
struct Guard(Arc<Shared>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.start_close(GoAwayStatus::OK);
    }
}

/// Handle to the connection as a whole.
pub struct Session {
    guard: Arc<Guard>,
}

impl Session {
    /// Sends GOAWAY (after every frame already queued), shuts the socket down
    /// and waits until the connection task has ended, at most about
    /// `Limits::close_timeout`. Open streams see their reads and writes fail.
    pub async fn close(&self) {
        self.guard.0.start_close(GoAwayStatus::OK);
        let _ = self.closed().await;
    }

    /// Resolves when the connection has ended, however it ended: `Ok` for a
    /// clean end (peer hung up, GOAWAY either way), the first error
    /// otherwise.
    pub async fn closed(&self) -> Result<(), SessionError> {
        let shared = &self.guard.0;
        let mut rx = shared.closed.subscribe();
        // The sender lives in `shared`, which we hold: this cannot fail.
        let _ = rx.wait_for(|done| *done).await;
        match shared.lock().error.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        *self.guard.0.closed.borrow()
    }
}

/// The streams the peer opens, in order.
pub struct Incoming {
    rx: mpsc::UnboundedReceiver<Stream>,
    _guard: Arc<Guard>,
}

impl Incoming {
    /// The next stream the peer opened; SYN_REPLY has already been queued for
    /// it. `None` once the peer sent GOAWAY or the connection ended. Dropping
    /// `Incoming` refuses later streams.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.rx.recv().await
    }
}

/// A stream the peer opened. Dropping it unsplit resets it (RST_STREAM
/// CANCEL), which is how a stream is rejected; if the peer had already
/// finished sending, it is half-closed (FIN) instead, like dropping the two
/// halves.
pub struct Stream {
    headers: Headers,
    reader: StreamReader,
    writer: StreamWriter,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.reader.inner.id
    }

    /// The SYN_STREAM headers (`streamtype`, `port`, `requestid`, ...).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The two halves, usable from different tasks.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }

    /// Aborts the stream with RST_STREAM CANCEL.
    pub fn reset(self) {
        self.writer.reset();
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// What the peer sends on a stream. Reads return buffered DATA payloads,
/// then EOF after the peer's FIN. A RST_STREAM from the peer or the end of
/// the connection before FIN is an error (after the buffered bytes).
/// Dropping the reader discards whatever the peer sends later.
pub struct StreamReader {
    inner: Arc<StreamShared>,
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
}

impl StreamReader {
    pub fn id(&self) -> u32 {
        self.inner.id
    }
}

impl AsyncRead for StreamReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut st = self.inner.lock();
        if let Some(front) = st.buf.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                st.buf.pop_front();
            }
            st.buffered -= n;
            drop(st);
            self.shared.inbound.fetch_sub(n, Ordering::AcqRel);
            self.shared.drained.notify_one();
            return Poll::Ready(Ok(()));
        }
        if let Some(reset) = st.reset {
            return Poll::Ready(Err(reset.to_io(self.inner.id)));
        }
        if st.remote_fin {
            return Poll::Ready(Ok(()));
        }
        if st.conn_gone {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "spdy connection ended before stream {} was finished",
                    self.inner.id
                ),
            )));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.inner.release(&self.shared, Side::Reader);
    }
}

type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send + Sync>>;

/// What we send on a stream. Each write becomes DATA frames of at most
/// `Limits::max_write_frame` bytes, queued to the connection's writer (a
/// write waits only for queue space, never for a peer window). Flush returns
/// at once: queued frames go out as fast as the socket takes them, in order.
/// Shutdown sends an empty DATA frame with FIN (half-close, what spdystream's
/// `Stream.Close` does). Dropping the writer without shutdown half-closes the
/// same way, or resets the stream if the reader is gone too and the peer is
/// still sending.
pub struct StreamWriter {
    inner: Arc<StreamShared>,
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
    acquire: Option<(Acquire, u32)>,
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// Aborts the stream in both directions with RST_STREAM CANCEL (what
    /// spdystream's `Stream.Reset` sends). Reads on the other half fail.
    pub fn reset(self) {
        let frame = {
            let mut st = self.inner.lock();
            let frame = (st.reset.is_none() && !st.conn_gone && !(st.local_fin && st.remote_fin))
                .then_some(Frame::RstStream {
                    stream_id: self.inner.id,
                    status: RstStatus::CANCEL,
                });
            if st.reset.is_none() {
                st.reset = Some(ResetBy::Local);
            }
            let dropped = st.discard();
            drop(st);
            self.shared.inbound.fetch_sub(dropped, Ordering::AcqRel);
            frame
        };
        self.shared.drained.notify_one();
        if let Some(frame) = frame {
            self.shared.send_unbudgeted(frame);
        }
        self.shared.forget(self.inner.id);
    }

    /// Gets write budget for `want` bytes, reusing a pending request.
    fn poll_budget(
        &mut self,
        cx: &mut Context<'_>,
        want: u32,
    ) -> Poll<io::Result<(OwnedSemaphorePermit, u32)>> {
        let (fut, n) = self.acquire.get_or_insert_with(|| {
            let fut: Acquire = Box::pin(self.shared.budget.clone().acquire_many_owned(want));
            (fut, want)
        });
        let n = *n;
        let result = ready!(fut.as_mut().poll(cx));
        self.acquire = None;
        match result {
            Ok(permit) => Poll::Ready(Ok((permit, n))),
            Err(_) => Poll::Ready(Err(conn_closed())),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        let st = self.inner.lock();
        if let Some(reset) = st.reset {
            return Err(reset.to_io(self.inner.id));
        }
        if st.local_fin {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("write on spdy stream {} after it was closed", self.inner.id),
            ));
        }
        if st.conn_gone || self.shared.closing_flag.load(Ordering::Acquire) {
            return Err(conn_closed());
        }
        Ok(())
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.check_writable()?;
        let want = buf.len().min(self.shared.limits.max_write_frame) as u32;
        let (permit, granted) = ready!(self.poll_budget(cx, want))?;
        // The stream may have been reset while we waited for budget.
        self.check_writable()?;
        let n = buf.len().min(granted as usize);
        self.shared.send(
            Frame::Data {
                stream_id: self.inner.id,
                fin: false,
                data: Bytes::copy_from_slice(&buf[..n]),
            },
            Some(permit),
        )?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let st = self.inner.lock();
            if st.local_fin && st.reset.is_none() {
                return Poll::Ready(Ok(()));
            }
        }
        self.check_writable()?;
        let (permit, _) = ready!(self.poll_budget(cx, CONTROL_COST))?;
        let fully_closed = {
            let mut st = self.inner.lock();
            if let Some(reset) = st.reset {
                return Poll::Ready(Err(reset.to_io(self.inner.id)));
            }
            if st.local_fin {
                return Poll::Ready(Ok(()));
            }
            st.local_fin = true;
            st.remote_fin
        };
        self.shared.send(
            Frame::Data {
                stream_id: self.inner.id,
                fin: true,
                data: Bytes::new(),
            },
            Some(permit),
        )?;
        if fully_closed {
            self.shared.forget(self.inner.id);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        self.inner.release(&self.shared, Side::Writer);
    }
}

fn conn_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "spdy connection closed")
}

#[derive(Debug, Clone, Copy)]
enum ResetBy {
    Peer(RstStatus),
    Local,
}

impl ResetBy {
    fn to_io(self, id: u32) -> io::Error {
        match self {
            ResetBy::Peer(status) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("spdy stream {id} reset by the peer: {status}"),
            ),
            ResetBy::Local => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("spdy stream {id} was reset"),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Reader,
    Writer,
}

struct StreamShared {
    id: u32,
    state: Mutex<StreamState>,
}

struct StreamState {
    buf: VecDeque<Bytes>,
    buffered: usize,
    /// The peer sent FIN: no more data.
    remote_fin: bool,
    /// We sent FIN (or the stream is unidirectional): no more writes.
    local_fin: bool,
    reset: Option<ResetBy>,
    /// The connection ended; set only on streams still open then.
    conn_gone: bool,
    read_waker: Option<Waker>,
    reader_alive: bool,
    writer_alive: bool,
}

impl StreamShared {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        // Nothing panics while holding this lock; if something did, the state
        // is still a plain value worth reading.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One half went away: half-close, reset or just forget, so that a
    /// stream nobody holds never stalls the connection or leaks.
    fn release(&self, shared: &Shared, side: Side) {
        let mut st = self.lock();
        let mut dropped = 0;
        match side {
            Side::Reader => {
                st.reader_alive = false;
                dropped = st.discard();
            }
            Side::Writer => st.writer_alive = false,
        }
        let both_gone = !st.reader_alive && !st.writer_alive;
        let mut frame = None;
        if st.reset.is_none() && !st.conn_gone {
            if both_gone && !st.remote_fin {
                // Nobody will read what the peer still sends: tell it.
                st.reset = Some(ResetBy::Local);
                frame = Some(Frame::RstStream {
                    stream_id: self.id,
                    status: RstStatus::CANCEL,
                });
            } else if side == Side::Writer && !st.local_fin {
                st.local_fin = true;
                frame = Some(Frame::Data {
                    stream_id: self.id,
                    fin: true,
                    data: Bytes::new(),
                });
            }
        }
        let forget = both_gone || st.reset.is_some() || (st.local_fin && st.remote_fin);
        drop(st);
        if dropped > 0 {
            shared.inbound.fetch_sub(dropped, Ordering::AcqRel);
        }
        shared.drained.notify_one();
        if let Some(frame) = frame {
            shared.send_unbudgeted(frame);
        }
        if forget {
            shared.forget(self.id);
        }
    }
}

impl StreamState {
    /// Drops buffered data, returning how many bytes that freed.
    fn discard(&mut self) -> usize {
        self.buf.clear();
        std::mem::take(&mut self.buffered)
    }

    fn wake_reader(&mut self) {
        if let Some(waker) = self.read_waker.take() {
            waker.wake();
        }
    }
}

enum Outgoing {
    /// A frame to encode; the permit returns its budget once it is written.
    Frame {
        frame: Frame,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Follows the GOAWAY: flush, shut the write side down, stop.
    Close,
}

#[derive(Default)]
struct ConnState {
    streams: HashMap<u32, Arc<StreamShared>>,
    /// Highest stream id the peer used; ids must grow (SPDY/3 2.3.2).
    last_peer_id: u32,
    /// Highest stream id we replied to, for GOAWAY.
    last_accepted: u32,
    goaway_received: bool,
    closing: bool,
    dead: bool,
    error: Option<SessionError>,
}

struct Shared {
    limits: Limits,
    state: Mutex<ConnState>,
    /// Every outgoing frame, in order. Unbounded as a channel, bounded in
    /// memory by `budget`: only frames that must be sent from `Drop` (at
    /// most one FIN or RST per stream) and the GOAWAY skip the budget.
    out: mpsc::UnboundedSender<Outgoing>,
    budget: Arc<Semaphore>,
    /// Bytes buffered in all streams.
    inbound: AtomicUsize,
    /// A reader consumed or went away; the read loop may be waiting on it.
    drained: Notify,
    closing_flag: AtomicBool,
    /// GOAWAY queued: stop reading, flush, stop.
    closing: watch::Sender<bool>,
    /// Stop everything now.
    shutdown: watch::Sender<bool>,
    /// The connection task has ended.
    closed: watch::Sender<bool>,
    epoch: Instant,
    last_activity_ms: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    fn send(&self, frame: Frame, permit: Option<OwnedSemaphorePermit>) -> io::Result<()> {
        self.out
            .send(Outgoing::Frame { frame, permit })
            .map_err(|_| conn_closed())
    }

    fn send_unbudgeted(&self, frame: Frame) {
        // If the writer is gone the connection is over and so is the frame's
        // purpose.
        let _ = self.send(frame, None);
    }

    fn forget(&self, id: u32) {
        self.lock().streams.remove(&id);
    }

    /// Records the first error; later ones are consequences.
    fn fail(&self, error: SessionError) {
        let mut st = self.lock();
        if st.error.is_none() {
            st.error = Some(error);
        }
    }

    /// Queues GOAWAY behind everything already queued, then the writer
    /// closes the socket. Idempotent.
    fn start_close(&self, status: GoAwayStatus) {
        let last_good_stream_id = {
            let mut st = self.lock();
            if st.closing || st.dead {
                return;
            }
            st.closing = true;
            st.last_accepted
        };
        self.closing_flag.store(true, Ordering::Release);
        self.send_unbudgeted(Frame::GoAway {
            last_good_stream_id,
            status,
        });
        let _ = self.out.send(Outgoing::Close);
        self.closing.send_replace(true);
    }

    fn trigger_shutdown(&self) {
        self.closing_flag.store(true, Ordering::Release);
        self.shutdown.send_replace(true);
    }

    /// No more inbound data: readers get EOF or an error, writers an error.
    fn mark_dead(&self) {
        let streams = {
            let mut st = self.lock();
            st.dead = true;
            std::mem::take(&mut st.streams)
        };
        self.closing_flag.store(true, Ordering::Release);
        self.budget.close();
        for stream in streams.values() {
            let mut st = stream.lock();
            st.conn_gone = true;
            st.wake_reader();
        }
    }
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens when the
    // connection is being torn down: same answer.
    let _ = rx.wait_for(|v| *v).await;
}

enum ReadEnd {
    Eof,
    Failed(SessionError),
    Protocol(SessionError),
    Stopped,
}

struct ReadLoop<'a> {
    shared: &'a Arc<Shared>,
    decoder: FrameDecoder,
    /// Dropped on GOAWAY from the peer, which ends `Incoming::accept`.
    accept: Option<mpsc::UnboundedSender<Stream>>,
    guard: Weak<Guard>,
}

impl ReadLoop<'_> {
    async fn run<R: AsyncRead + Unpin>(&mut self, mut rd: R) -> ReadEnd {
        let mut closing = self.shared.closing.subscribe();
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            match self.decoder.decode(&mut buf) {
                Err(e) => return ReadEnd::Protocol(SessionError::BadFrame(e)),
                Ok(Some(frame)) => {
                    self.shared.touch();
                    if let Err(end) = self.handle(frame, &mut closing, &mut shutdown).await {
                        return end;
                    }
                    continue;
                }
                Ok(None) => {}
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 2 {
                buf.reserve(READ_CHUNK);
            }
            let read = tokio::select! {
                biased;
                _ = wait_true(&mut shutdown) => return ReadEnd::Stopped,
                _ = wait_true(&mut closing) => return ReadEnd::Stopped,
                read = rd.read_buf(&mut buf) => read,
            };
            match read {
                Ok(0) => return ReadEnd::Eof,
                Ok(_) => {}
                Err(e) => return ReadEnd::Failed(SessionError::Read(Arc::new(e))),
            }
        }
    }

    async fn handle(
        &mut self,
        frame: Frame,
        closing: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ReadEnd> {
        match frame {
            Frame::SynStream {
                stream_id,
                fin,
                unidirectional,
                headers,
                ..
            } => {
                self.open(stream_id, fin, unidirectional, headers, closing, shutdown)
                    .await
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                let Some(stream) = self.shared.lock().streams.get(&stream_id).cloned() else {
                    // Reset or forgotten by us; spdystream drops such data
                    // silently too, and an RST per frame could be a storm.
                    return Ok(());
                };
                self.deliver(&stream, data, fin);
                self.wait_for_room(&stream, closing, shutdown).await
            }
            Frame::Headers {
                stream_id,
                fin: true,
                ..
            } => {
                // Only the FIN matters: kubelet never reads HEADERS either.
                let stream = self.shared.lock().streams.get(&stream_id).cloned();
                if let Some(stream) = stream {
                    self.deliver(&stream, Bytes::new(), true);
                }
                Ok(())
            }
            Frame::RstStream { stream_id, status } => {
                let stream = self.shared.lock().streams.remove(&stream_id);
                if let Some(stream) = stream {
                    let mut st = stream.lock();
                    if st.reset.is_none() {
                        st.reset = Some(ResetBy::Peer(status));
                    }
                    st.wake_reader();
                }
                Ok(())
            }
            Frame::Ping { id } => {
                // Odd ids are the client's (spdystream counts 1, 3, ...);
                // even ones would answer pings we never send.
                if id % 2 == 1 {
                    self.send_control(Frame::Ping { id }, closing, shutdown)
                        .await?;
                }
                Ok(())
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                tracing::debug!(
                    last_good_stream_id,
                    status = status.0,
                    "spdy peer sent goaway"
                );
                self.shared.lock().goaway_received = true;
                self.accept = None;
                Ok(())
            }
            // Flow control is not enforced in either direction (module doc);
            // a reply to a stream we never open means nothing.
            Frame::WindowUpdate { .. }
            | Frame::Settings { .. }
            | Frame::SynReply { .. }
            | Frame::Headers { .. } => Ok(()),
        }
    }

    async fn open(
        &mut self,
        stream_id: u32,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
        closing: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ReadEnd> {
        let accepted = {
            let mut st = self.shared.lock();
            // Client streams are odd and strictly increasing; anything else
            // is a session error (SPDY/3 2.3.2).
            if stream_id.is_multiple_of(2) || stream_id <= st.last_peer_id {
                return Err(ReadEnd::Protocol(SessionError::Protocol {
                    reason: format!(
                        "syn_stream for stream {stream_id} after stream {}",
                        st.last_peer_id
                    ),
                }));
            }
            st.last_peer_id = stream_id;
            let guard = self.guard.upgrade();
            let accepting = self.accept.as_ref().is_some_and(|tx| !tx.is_closed())
                && !st.closing
                && !st.goaway_received
                && st.streams.len() < self.shared.limits.max_streams;
            match guard {
                Some(guard) if accepting => {
                    let inner = Arc::new(StreamShared {
                        id: stream_id,
                        state: Mutex::new(StreamState {
                            buf: VecDeque::new(),
                            buffered: 0,
                            remote_fin: fin,
                            // A unidirectional stream is send-only for its
                            // opener: we may not write on it.
                            local_fin: unidirectional,
                            reset: None,
                            conn_gone: false,
                            read_waker: None,
                            reader_alive: true,
                            writer_alive: true,
                        }),
                    });
                    st.streams.insert(stream_id, inner.clone());
                    st.last_accepted = stream_id;
                    Some((inner, guard))
                }
                _ => None,
            }
        };
        let Some((inner, guard)) = accepted else {
            tracing::debug!(stream_id, "refusing spdy stream");
            return self
                .send_control(
                    Frame::RstStream {
                        stream_id,
                        status: RstStatus::REFUSED_STREAM,
                    },
                    closing,
                    shutdown,
                )
                .await;
        };
        // The reply goes into the queue before the application can write,
        // so it precedes the stream's data; spdystream's CreateStream waits
        // for it (kubelet sends it with empty headers).
        self.send_control(
            Frame::SynReply {
                stream_id,
                fin: false,
                headers: Headers::new(),
            },
            closing,
            shutdown,
        )
        .await?;
        let stream = Stream {
            headers,
            reader: StreamReader {
                inner: inner.clone(),
                shared: self.shared.clone(),
                _guard: guard.clone(),
            },
            writer: StreamWriter {
                inner,
                shared: self.shared.clone(),
                _guard: guard,
                acquire: None,
            },
        };
        if let Some(tx) = &self.accept {
            // If `Incoming` is gone the stream comes back and is dropped,
            // which resets it.
            let _ = tx.send(stream);
        }
        Ok(())
    }

    fn deliver(&self, stream: &StreamShared, data: Bytes, fin: bool) {
        let mut st = stream.lock();
        if st.remote_fin || st.reset.is_some() {
            // Data after FIN or after a reset: ignored, as spdystream does.
            return;
        }
        if st.reader_alive && !data.is_empty() {
            // The decoder's payload shares the read buffer's allocation; a
            // copy keeps a few unread bytes from pinning whole read chunks
            // (which would make `stream_buffer` count far less than is held).
            let data = Bytes::copy_from_slice(&data);
            st.buffered += data.len();
            self.shared.inbound.fetch_add(data.len(), Ordering::AcqRel);
            st.buf.push_back(data);
        }
        if fin {
            st.remote_fin = true;
        }
        st.wake_reader();
        let fully_closed = st.local_fin && st.remote_fin;
        drop(st);
        if fully_closed {
            self.shared.forget(stream.id);
        }
    }

    /// Stops reading the socket while this stream, or all streams together,
    /// hold more than their cap (the module doc says why).
    async fn wait_for_room(
        &self,
        stream: &StreamShared,
        closing: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ReadEnd> {
        let limits = &self.shared.limits;
        loop {
            let drained = self.shared.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            let stream_ok = {
                let st = stream.lock();
                st.buffered <= limits.stream_buffer || !st.reader_alive || st.reset.is_some()
            };
            if stream_ok && self.shared.inbound.load(Ordering::Acquire) <= limits.connection_buffer
            {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = wait_true(shutdown) => return Err(ReadEnd::Stopped),
                _ = wait_true(closing) => return Err(ReadEnd::Stopped),
                _ = drained => {}
            }
        }
    }

    /// Queues a control frame, waiting for write budget: a peer that floods
    /// PINGs but does not read our replies stops being read.
    async fn send_control(
        &self,
        frame: Frame,
        closing: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ReadEnd> {
        let permit = tokio::select! {
            biased;
            _ = wait_true(shutdown) => return Err(ReadEnd::Stopped),
            _ = wait_true(closing) => return Err(ReadEnd::Stopped),
            permit = self.shared.budget.clone().acquire_many_owned(CONTROL_COST) => permit,
        };
        let permit = permit.map_err(|_| ReadEnd::Stopped)?;
        self.shared
            .send(frame, Some(permit))
            .map_err(|_| ReadEnd::Stopped)
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    shared: &Shared,
    mut wr: W,
    mut encoder: FrameEncoder,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> Result<(), SessionError> {
    let mut shutdown = shared.shutdown.subscribe();
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            _ = wait_true(&mut shutdown) => return Ok(()),
            msg = rx.recv() => msg,
        };
        // `shared` holds a sender, so the queue never ends on its own.
        let Some(mut msg) = first else { return Ok(()) };
        // Permits are released only once their frames are on the socket, so
        // the budget bounds everything in flight, not just the queue.
        let mut written = Vec::new();
        let mut close = false;
        loop {
            match msg {
                Outgoing::Frame { frame, permit } => {
                    encoder
                        .encode(&frame, &mut buf)
                        .map_err(SessionError::Encode)?;
                    written.push(permit);
                }
                Outgoing::Close => {
                    close = true;
                    break;
                }
            }
            if buf.len() >= WRITE_BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            let io = async {
                wr.write_all_buf(&mut buf).await?;
                wr.flush().await
            };
            tokio::select! {
                biased;
                _ = wait_true(&mut shutdown) => return Ok(()),
                res = io => res.map_err(|e| SessionError::Write(Arc::new(e)))?,
            }
            shared.touch();
        }
        drop(written);
        if close {
            tokio::select! {
                biased;
                _ = wait_true(&mut shutdown) => {}
                _ = wr.shutdown() => {}
            }
            return Ok(());
        }
    }
}

/// Idle timeout while open; once closing, the deadline for the GOAWAY.
async fn supervise(shared: &Shared) {
    let mut closing = shared.closing.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let idle = async {
            match shared.limits.idle_timeout {
                Some(timeout) => {
                    tokio::time::sleep_until(shared.last_activity() + timeout).await;
                    timeout
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = wait_true(&mut shutdown) => return,
            _ = wait_true(&mut closing) => break,
            timeout = idle => {
                if shared.last_activity() + timeout <= Instant::now() {
                    tracing::debug!(?timeout, "spdy connection idle, closing");
                    shared.fail(SessionError::IdleTimeout(timeout));
                    shared.start_close(GoAwayStatus::OK);
                }
            }
        }
    }
    let timeout = shared.limits.close_timeout;
    tokio::select! {
        biased;
        _ = wait_true(&mut shutdown) => {}
        _ = tokio::time::sleep(timeout) => {
            shared.fail(SessionError::CloseTimeout(timeout));
            shared.trigger_shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::Setting;
    use super::*;
    use tokio::io::{DuplexStream, duplex};
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(10);

    /// A SPDY client made of our own codec, speaking the way spdystream does.
    struct Client {
        io: DuplexStream,
        codec: Codec,
        buf: BytesMut,
    }

    impl Client {
        async fn send(&mut self, frame: Frame) {
            let mut b = BytesMut::new();
            self.codec.encode(&frame, &mut b).expect("encode");
            self.io.write_all(&b).await.expect("client write");
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.expect("client write");
        }

        /// The next frame, or None at EOF.
        async fn recv(&mut self) -> Option<Frame> {
            loop {
                if let Some(frame) = self.codec.decode(&mut self.buf).expect("server frame") {
                    return Some(frame);
                }
                let n = timeout(WAIT, self.io.read_buf(&mut self.buf))
                    .await
                    .expect("server went quiet")
                    .ok()?;
                if n == 0 {
                    return None;
                }
            }
        }

        async fn open(&mut self, stream_id: u32, headers: &[(&str, &str)]) {
            self.send(Frame::SynStream {
                stream_id,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: headers.iter().copied().collect(),
            })
            .await;
            assert_eq!(
                self.recv().await,
                Some(Frame::SynReply {
                    stream_id,
                    fin: false,
                    headers: Headers::new()
                })
            );
        }

        async fn data(&mut self, stream_id: u32, data: &[u8], fin: bool) {
            self.send(Frame::Data {
                stream_id,
                fin,
                data: Bytes::copy_from_slice(data),
            })
            .await;
        }

        /// Collects DATA payload for `stream_id` until its FIN.
        async fn read_to_fin(&mut self, stream_id: u32) -> Vec<u8> {
            let mut out = Vec::new();
            loop {
                match self.recv().await {
                    Some(Frame::Data {
                        stream_id: id,
                        fin,
                        data,
                    }) if id == stream_id => {
                        out.extend_from_slice(&data);
                        if fin {
                            return out;
                        }
                    }
                    other => panic!("expected data on {stream_id}, got {other:?}"),
                }
            }
        }
    }

    fn start(limits: Limits) -> (Session, Incoming, Client) {
        let (server, client) = duplex(64 * 1024);
        let (session, incoming) = serve(server, limits);
        let client = Client {
            io: client,
            codec: Codec::new(FrameLimits::default()).expect("codec"),
            buf: BytesMut::new(),
        };
        (session, incoming, client)
    }

    async fn accept(incoming: &mut Incoming) -> Stream {
        timeout(WAIT, incoming.accept())
            .await
            .expect("no stream")
            .expect("incoming ended")
    }

    async fn read_all(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        timeout(WAIT, r.read_to_end(&mut out))
            .await
            .expect("read hung")?;
        Ok(out)
    }

    #[test]
    fn handles_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Session>();
        send_sync::<Incoming>();
        send_sync::<Stream>();
        send_sync::<StreamReader>();
        send_sync::<StreamWriter>();
    }

    #[tokio::test]
    async fn accepted_stream_gets_an_empty_syn_reply_and_keeps_its_headers() {
        let (_session, mut incoming, mut client) = start(Limits::default());
        client
            .open(
                1,
                &[("streamtype", "data"), ("port", "8080"), ("requestid", "0")],
            )
            .await;
        let stream = accept(&mut incoming).await;
        assert_eq!(stream.id(), 1);
        assert_eq!(stream.headers().get("streamType"), Some("data"));
        assert_eq!(stream.headers().get("port"), Some("8080"));
    }

    #[tokio::test]
    async fn data_flows_both_ways_and_fin_half_closes() {
        let (_session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[("streamtype", "stdin")]).await;
        let (mut rd, mut wr) = accept(&mut incoming).await.split();
        client.data(1, b"hello ", false).await;
        client.data(1, b"world", false).await;
        client.data(1, b"", true).await;
        assert_eq!(read_all(&mut rd).await.expect("read"), b"hello world");

        wr.write_all(b"bye").await.expect("write");
        wr.shutdown().await.expect("shutdown");
        wr.shutdown().await.expect("shutdown is idempotent");
        assert_eq!(client.read_to_fin(1).await, b"bye");
        let err = wr.write_all(b"x").await.expect_err("write after fin");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_transfers_need_no_window_updates() {
        // spdystream never sends WINDOW_UPDATE: 1 MiB each way must flow
        // without one, far past SPDY/3.1's 64 KiB initial window.
        let (_session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        let (mut rd, mut wr) = accept(&mut incoming).await.split();
        let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();

        let expected = payload.clone();
        let server = tokio::spawn(async move {
            let got = read_all(&mut rd).await.expect("read");
            assert_eq!(got, expected);
            wr.write_all(&expected).await.expect("write");
            wr.shutdown().await.expect("shutdown");
        });
        for chunk in payload.chunks(32 * 1024) {
            client.data(1, chunk, false).await;
        }
        client.data(1, b"", true).await;
        // Only DATA may come back: no WINDOW_UPDATE, no SETTINGS.
        assert_eq!(client.read_to_fin(1).await, payload);
        server.await.expect("server task");
    }

    #[tokio::test]
    async fn writes_are_split_into_bounded_data_frames() {
        let limits = Limits {
            max_write_frame: 1000,
            ..Limits::default()
        };
        let (_session, mut incoming, mut client) = start(limits);
        client.open(1, &[]).await;
        let (_rd, mut wr) = accept(&mut incoming).await.split();
        wr.write_all(&[7u8; 2500]).await.expect("write");
        wr.shutdown().await.expect("shutdown");
        let mut sizes = Vec::new();
        loop {
            match client.recv().await {
                Some(Frame::Data { data, fin, .. }) => {
                    sizes.push(data.len());
                    if fin {
                        break;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(sizes, [1000, 1000, 500, 0]);
    }

    #[tokio::test]
    async fn peer_reset_fails_reads_and_writes() {
        let (_session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        let (mut rd, mut wr) = accept(&mut incoming).await.split();
        client.data(1, b"early", false).await;
        client
            .send(Frame::RstStream {
                stream_id: 1,
                status: RstStatus::CANCEL,
            })
            .await;
        // What arrived before the reset is still delivered, then the error.
        let mut buf = [0u8; 5];
        timeout(WAIT, rd.read_exact(&mut buf))
            .await
            .expect("read hung")
            .expect("buffered data");
        assert_eq!(&buf, b"early");
        let err = read_all(&mut rd).await.expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let err = wr.write_all(b"x").await.expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn writer_reset_sends_rst_cancel() {
        let (_session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        let (mut rd, wr) = accept(&mut incoming).await.split();
        wr.reset();
        assert_eq!(
            client.recv().await,
            Some(Frame::RstStream {
                stream_id: 1,
                status: RstStatus::CANCEL
            })
        );
        let err = read_all(&mut rd).await.expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn ping_is_answered() {
        let (_session, _incoming, mut client) = start(Limits::default());
        client.send(Frame::Ping { id: 1 }).await;
        assert_eq!(client.recv().await, Some(Frame::Ping { id: 1 }));
        // An even id would be a reply to our own ping; we never send one.
        client.send(Frame::Ping { id: 2 }).await;
        client.send(Frame::Ping { id: 3 }).await;
        assert_eq!(client.recv().await, Some(Frame::Ping { id: 3 }));
    }

    #[tokio::test]
    async fn settings_window_updates_and_unknown_frames_are_ignored() {
        let (_session, _incoming, mut client) = start(Limits::default());
        client
            .send(Frame::Settings {
                entries: vec![Setting {
                    id: 7,
                    flags: 0,
                    value: 1,
                }],
            })
            .await;
        client
            .send(Frame::WindowUpdate {
                stream_id: 0,
                delta: 1,
            })
            .await;
        client
            .send_raw(&[0x80, 0x03, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x02, 1, 2])
            .await;
        client.data(99, b"nobody's", false).await;
        client.send(Frame::Ping { id: 5 }).await;
        assert_eq!(client.recv().await, Some(Frame::Ping { id: 5 }));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_streams_echo_concurrently() {
        let (_session, mut incoming, client) = start(Limits::default());
        let server = tokio::spawn(async move {
            let mut tasks = Vec::new();
            while let Some(stream) = incoming.accept().await {
                tasks.push(tokio::spawn(async move {
                    let (mut rd, mut wr) = stream.split();
                    tokio::io::copy(&mut rd, &mut wr).await.expect("echo");
                    wr.shutdown().await.expect("shutdown");
                }));
            }
            for t in tasks {
                t.await.expect("echo task");
            }
        });

        // Client: a reader task collects frames per stream while the writer
        // interleaves data over all streams.
        let Client { io, codec, buf } = client;
        let (decoder, mut encoder) = codec.split();
        let (mut crd, mut cwr) = tokio::io::split(io);
        const STREAMS: u32 = 100;
        let collector = tokio::spawn(async move {
            let mut decoder = decoder;
            let mut buf = buf;
            let mut echoes: HashMap<u32, Vec<u8>> = HashMap::new();
            let mut finished = 0;
            while finished < STREAMS {
                while let Some(frame) = decoder.decode(&mut buf).expect("frame") {
                    match frame {
                        Frame::SynReply { .. } => {}
                        Frame::Data {
                            stream_id,
                            fin,
                            data,
                        } => {
                            echoes
                                .entry(stream_id)
                                .or_default()
                                .extend_from_slice(&data);
                            if fin {
                                finished += 1;
                            }
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                if finished == STREAMS {
                    break;
                }
                let n = timeout(WAIT, crd.read_buf(&mut buf))
                    .await
                    .expect("server went quiet")
                    .expect("read");
                assert!(n > 0, "eof before all echoes");
            }
            echoes
        });
        let ids: Vec<u32> = (0..STREAMS).map(|i| 2 * i + 1).collect();
        let mut wire = BytesMut::new();
        for &id in &ids {
            let frame = Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: [("streamtype", "data")].into_iter().collect(),
            };
            encoder.encode(&frame, &mut wire).expect("encode");
        }
        for round in 0..10u32 {
            for &id in &ids {
                let data = Bytes::from(format!("{id}:{round};"));
                encoder
                    .encode(
                        &Frame::Data {
                            stream_id: id,
                            fin: round == 9,
                            data,
                        },
                        &mut wire,
                    )
                    .expect("encode");
            }
        }
        cwr.write_all(&wire).await.expect("client write");
        let echoes = collector.await.expect("collector");
        for &id in &ids {
            let want: String = (0..10).map(|r| format!("{id}:{r};")).collect();
            assert_eq!(echoes[&id], want.as_bytes(), "stream {id}");
        }
        drop(cwr);
        timeout(WAIT, server)
            .await
            .expect("server hung")
            .expect("server");
    }

    #[tokio::test]
    async fn malformed_frame_closes_the_session_with_goaway_protocol_error() {
        let (session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        let (mut rd, mut wr) = accept(&mut incoming).await.split();
        // Version 2 PING.
        client
            .send_raw(&[0x80, 0x02, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 1])
            .await;
        assert_eq!(
            client.recv().await,
            Some(Frame::GoAway {
                last_good_stream_id: 1,
                status: GoAwayStatus::PROTOCOL_ERROR
            })
        );
        assert_eq!(client.recv().await, None, "socket not closed");
        let closed = timeout(WAIT, session.closed()).await.expect("not closed");
        assert!(
            matches!(closed, Err(SessionError::BadFrame(_))),
            "{closed:?}"
        );
        assert_eq!(
            read_all(&mut rd).await.expect_err("dead").kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(wr.write_all(b"x").await.is_err());
        assert!(
            timeout(WAIT, incoming.accept())
                .await
                .expect("hung")
                .is_none()
        );
    }

    #[tokio::test]
    async fn stream_ids_must_be_odd_and_increasing() {
        for ids in [[3u32, 1], [1, 2], [5, 5]] {
            let (session, _incoming, mut client) = start(Limits::default());
            client.open(ids[0], &[]).await;
            client
                .send(Frame::SynStream {
                    stream_id: ids[1],
                    associated_to: 0,
                    priority: 0,
                    fin: false,
                    unidirectional: false,
                    headers: Headers::new(),
                })
                .await;
            assert!(matches!(
                client.recv().await,
                Some(Frame::GoAway {
                    status: GoAwayStatus::PROTOCOL_ERROR,
                    ..
                })
            ));
            let closed = timeout(WAIT, session.closed()).await.expect("not closed");
            assert!(
                matches!(closed, Err(SessionError::Protocol { .. })),
                "{ids:?}"
            );
        }
    }

    #[tokio::test]
    async fn peer_disconnect_mid_stream_fails_readers_and_writers() {
        let (session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        let (mut rd, mut wr) = accept(&mut incoming).await.split();
        client.data(1, b"partial", false).await;
        drop(client);
        let mut buf = [0u8; 7];
        timeout(WAIT, rd.read_exact(&mut buf))
            .await
            .expect("hung")
            .expect("buffered data survives");
        assert_eq!(
            read_all(&mut rd).await.expect_err("no fin").kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(wr.write_all(b"x").await.is_err());
        assert!(wr.shutdown().await.is_err());
        timeout(WAIT, session.closed())
            .await
            .expect("not closed")
            .expect("a hang-up is a clean end");
        assert!(session.is_closed());
        assert!(
            timeout(WAIT, incoming.accept())
                .await
                .expect("hung")
                .is_none()
        );
    }

    #[tokio::test]
    async fn goaway_from_the_peer_ends_accept_but_not_open_streams() {
        let (_session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        client
            .send(Frame::GoAway {
                last_good_stream_id: 0,
                status: GoAwayStatus::OK,
            })
            .await;
        let stream = accept(&mut incoming).await;
        assert!(
            timeout(WAIT, incoming.accept())
                .await
                .expect("hung")
                .is_none()
        );
        let (_rd, mut wr) = stream.split();
        wr.write_all(b"still here").await.expect("write");
        wr.shutdown().await.expect("shutdown");
        assert_eq!(client.read_to_fin(1).await, b"still here");
        // Streams opened after GOAWAY are refused.
        client
            .send(Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: Headers::new(),
            })
            .await;
        assert_eq!(
            client.recv().await,
            Some(Frame::RstStream {
                stream_id: 3,
                status: RstStatus::REFUSED_STREAM
            })
        );
    }

    #[tokio::test]
    async fn close_flushes_queued_data_then_goaway() {
        let (session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        client.open(3, &[]).await;
        let _first = accept(&mut incoming).await;
        let (_rd, mut wr) = accept(&mut incoming).await.split();
        wr.write_all(b"last words").await.expect("write");
        timeout(WAIT, session.close()).await.expect("close hung");
        assert_eq!(
            client.recv().await,
            Some(Frame::Data {
                stream_id: 3,
                fin: false,
                data: Bytes::from_static(b"last words")
            })
        );
        assert_eq!(
            client.recv().await,
            Some(Frame::GoAway {
                last_good_stream_id: 3,
                status: GoAwayStatus::OK
            })
        );
        assert_eq!(client.recv().await, None);
        assert!(session.closed().await.is_ok());
        assert!(wr.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn close_gives_up_on_a_peer_that_does_not_read() {
        let limits = Limits {
            close_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (session, mut incoming, mut client) = start(limits);
        client.open(1, &[]).await;
        let (_rd, mut wr) = accept(&mut incoming).await.split();
        // Fill the 64 KiB pipe and the write budget; the client reads nothing.
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&vec![0u8; 1 << 20]).await;
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        timeout(WAIT, session.close()).await.expect("close hung");
        assert!(matches!(
            session.closed().await,
            Err(SessionError::CloseTimeout(_))
        ));
        timeout(WAIT, writer)
            .await
            .expect("writer hung")
            .expect("writer");
        drop(client);
    }

    #[tokio::test]
    async fn streams_beyond_the_limit_are_refused() {
        let limits = Limits {
            max_streams: 2,
            ..Limits::default()
        };
        let (_session, mut incoming, mut client) = start(limits);
        client.open(1, &[]).await;
        client.open(3, &[]).await;
        client
            .send(Frame::SynStream {
                stream_id: 5,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: Headers::new(),
            })
            .await;
        assert_eq!(
            client.recv().await,
            Some(Frame::RstStream {
                stream_id: 5,
                status: RstStatus::REFUSED_STREAM
            })
        );
        // A finished stream frees its slot.
        let first = accept(&mut incoming).await;
        first.reset();
        assert!(matches!(
            client.recv().await,
            Some(Frame::RstStream { stream_id: 1, .. })
        ));
        client.open(7, &[]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_stream_buffer_stops_reading_until_drained() {
        let limits = Limits {
            stream_buffer: 4096,
            ..Limits::default()
        };
        let (session, mut incoming, mut client) = start(limits);
        client.open(1, &[]).await;
        let (mut rd, _wr) = accept(&mut incoming).await.split();
        let Client { io, codec, buf } = client;
        let (decoder, mut encoder) = codec.split();
        let (crd, mut cwr) = tokio::io::split(io);
        let sender = tokio::spawn(async move {
            let mut wire = BytesMut::new();
            for i in 0..64u32 {
                let data = Bytes::from(vec![i as u8; 1024]);
                encoder
                    .encode(
                        &Frame::Data {
                            stream_id: 1,
                            fin: i == 63,
                            data,
                        },
                        &mut wire,
                    )
                    .expect("encode");
            }
            encoder
                .encode(&Frame::Ping { id: 1 }, &mut wire)
                .expect("encode");
            cwr.write_all(&wire).await.expect("client write");
            (cwr, encoder)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The session holds at most the cap plus one frame, nothing more.
        let held = session.guard.0.inbound.load(Ordering::Acquire);
        assert!(held <= 4096 + 1024, "buffered {held} bytes");
        let got = read_all(&mut rd).await.expect("read");
        assert_eq!(got.len(), 64 * 1024);
        assert!(
            got.chunks(1024)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&b| b == i as u8))
        );
        let (cwr, encoder) = sender.await.expect("sender");
        // Once drained, reading resumed and reached the PING.
        let mut client = Client {
            io: crd.unsplit(cwr),
            codec: Codec { decoder, encoder },
            buf,
        };
        assert_eq!(client.recv().await, Some(Frame::Ping { id: 1 }));
    }

    #[tokio::test]
    async fn a_dropped_reader_never_stalls_the_connection() {
        let limits = Limits {
            stream_buffer: 1024,
            ..Limits::default()
        };
        let (session, mut incoming, mut client) = start(limits);
        client.open(1, &[]).await;
        let (rd, _wr) = accept(&mut incoming).await.split();
        drop(rd);
        for _ in 0..32 {
            client.data(1, &[0u8; 1024], false).await;
        }
        client.send(Frame::Ping { id: 1 }).await;
        assert_eq!(client.recv().await, Some(Frame::Ping { id: 1 }));
        assert_eq!(session.guard.0.inbound.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn dropping_a_stream_resets_it() {
        let (_session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        drop(accept(&mut incoming).await);
        assert_eq!(
            client.recv().await,
            Some(Frame::RstStream {
                stream_id: 1,
                status: RstStatus::CANCEL
            })
        );
    }

    #[tokio::test]
    async fn dropping_the_writer_half_closes_the_stream() {
        let (_session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        let (mut rd, wr) = accept(&mut incoming).await.split();
        drop(wr);
        assert_eq!(client.read_to_fin(1).await, b"");
        // Reading still works: only our side is closed.
        client.data(1, b"in", true).await;
        assert_eq!(read_all(&mut rd).await.expect("read"), b"in");
        drop(rd);
        // Both sides finished: nothing more on the wire (a PING proves it).
        client.send(Frame::Ping { id: 9 }).await;
        assert_eq!(client.recv().await, Some(Frame::Ping { id: 9 }));
    }

    #[tokio::test]
    async fn dropping_every_handle_ends_the_connection_and_frees_it() {
        let (session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        let stream = accept(&mut incoming).await;
        let shared = Arc::downgrade(&session.guard.0);
        drop((session, incoming));
        // A stream keeps the connection up...
        client.send(Frame::Ping { id: 1 }).await;
        assert_eq!(client.recv().await, Some(Frame::Ping { id: 1 }));
        drop(stream);
        // ...and the last handle takes it down: RST, GOAWAY, EOF.
        assert!(matches!(
            client.recv().await,
            Some(Frame::RstStream { stream_id: 1, .. })
        ));
        assert!(matches!(client.recv().await, Some(Frame::GoAway { .. })));
        assert_eq!(client.recv().await, None);
        // The task has ended and dropped everything it held.
        timeout(WAIT, async {
            while shared.upgrade().is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("connection state leaked");
    }

    #[tokio::test]
    async fn fin_on_syn_stream_and_unidirectional_streams() {
        let (_session, mut incoming, mut client) = start(Limits::default());
        client
            .send(Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                fin: true,
                unidirectional: true,
                headers: Headers::new(),
            })
            .await;
        assert!(matches!(
            client.recv().await,
            Some(Frame::SynReply { stream_id: 1, .. })
        ));
        let (mut rd, mut wr) = accept(&mut incoming).await.split();
        assert_eq!(read_all(&mut rd).await.expect("eof"), b"");
        assert!(
            wr.write_all(b"x").await.is_err(),
            "unidirectional stream written"
        );
    }

    #[tokio::test]
    async fn headers_frame_with_fin_ends_the_stream() {
        let (_session, mut incoming, mut client) = start(Limits::default());
        client.open(1, &[]).await;
        let (mut rd, _wr) = accept(&mut incoming).await.split();
        client.data(1, b"x", false).await;
        client
            .send(Frame::Headers {
                stream_id: 1,
                fin: true,
                headers: Headers::new(),
            })
            .await;
        assert_eq!(read_all(&mut rd).await.expect("eof"), b"x");
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let limits = Limits {
            idle_timeout: Some(Duration::from_millis(150)),
            ..Limits::default()
        };
        let (session, _incoming, mut client) = start(limits);
        client.send(Frame::Ping { id: 1 }).await;
        assert_eq!(client.recv().await, Some(Frame::Ping { id: 1 }));
        assert!(matches!(client.recv().await, Some(Frame::GoAway { .. })));
        assert_eq!(client.recv().await, None);
        assert!(matches!(
            session.closed().await,
            Err(SessionError::IdleTimeout(_))
        ));
    }
}
