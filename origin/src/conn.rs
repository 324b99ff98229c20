//! What bounds a client connection, in time and in count.
//!
//! - **Opening**: [`opening`] reads a new connection's first bytes within the header read
//!   timeout and decides HTTP/1 or HTTP/2 itself. hyper-util's protocol detection has no
//!   timeout of its own, and hyper's HTTP/1 header timer only starts once HTTP/1 is chosen, so
//!   a client that connects and sends nothing, or a prefix of the HTTP/2 preface
//!   (`PRI * HTTP/2.0\r\n`) and then stalls, would otherwise keep its task and descriptor for
//!   good. The bytes read are put back in front of the stream ([`Replay`]).
//! - **Idle**: [`Activity`] tracks a connection's requests and the chunks its response bodies
//!   yield. [`serve_http`] shuts a connection down once it has made no progress for
//!   `idle_timeout`: no request handled, started or ended, no body chunk taken by the client.
//!   That covers idle HTTP/2 clients that answer PINGs and clients that stopped reading a
//!   response; an HTTP/1 keep-alive connection is also bounded by the header read timeout.
//! - **Count**: the accept loop takes one of `max_connections` slots before it accepts, so past
//!   the cap new clients wait in the kernel's listen backlog.
//! - **Accept failures** (EMFILE at the descriptor limit and friends) are logged by
//!   [`AcceptWarnings`] at most once per 10 s, with the count of the ones folded in.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{Interval, MissedTickBehavior};
use tracing::warn;

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// After an idle connection is told to shut down, how long it may take to do so (at most).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Reads a new HTTP connection's first bytes within `limit`: enough to tell HTTP/1 (any byte
/// off the HTTP/2 preface) from HTTP/2 (the whole preface). `None` when the client closed,
/// failed, or did not get that far in time; otherwise the stream with those bytes put back.
pub async fn opening<S: AsyncRead + Unpin>(mut io: S, limit: Duration) -> Option<Replay<S>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut head = Vec::with_capacity(1024);
    loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut head)).await {
            Ok(Ok(n)) if n > 0 => {}
            // EOF (a half-close after a prefix of the preface included), error, or too late.
            _ => return None,
        }
        let n = head.len().min(H2_PREFACE.len());
        if head[..n] != H2_PREFACE[..n] || n == H2_PREFACE.len() {
            return Some(Replay {
                head: Bytes::from(head),
                io,
            });
        }
    }
}

/// A stream with the bytes already read from it put back in front.
pub struct Replay<S> {
    head: Bytes,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.head.has_remaining() {
            let n = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head[..n]);
            this.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Tells when something has made no progress for a timeout, to within a quarter of it: it
/// ticks every quarter and expires after four ticks in a row that saw no progress.
struct Quiet {
    tick: Interval,
    /// Ticks in a row without progress.
    still: u8,
    last: u64,
}

impl Quiet {
    fn new(timeout: Duration) -> Self {
        let quarter = (timeout / 4).max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + quarter, quarter);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            tick,
            still: 0,
            last: 0,
        }
    }

    async fn next(&mut self) {
        self.tick.tick().await;
    }

    /// After a tick: `progress` is a count that moves with activity, `None` while busy. True
    /// once it has not moved for the whole timeout.
    fn expired(&mut self, progress: Option<u64>) -> bool {
        match progress {
            Some(p) if p == self.last => {
                self.still += 1;
                self.still >= 4
            }
            _ => {
                self.still = 0;
                self.last = progress.unwrap_or(self.last);
                false
            }
        }
    }
}

/// What one HTTP connection is doing, for its idle timeout: requests being handled (their
/// response head not ready yet), and a count that moves whenever a request starts or ends
/// and whenever a response body yields a chunk (that is, whenever the client takes one).
#[derive(Debug, Default)]
pub struct Activity {
    progress: AtomicU64,
    handling: AtomicU32,
}

impl Activity {
    /// A request starts; it is being handled while the guard lives.
    pub fn begin(self: &Arc<Self>) -> Handling {
        self.progress.fetch_add(1, Ordering::Relaxed);
        self.handling.fetch_add(1, Ordering::Relaxed);
        Handling(self.clone())
    }

    fn moved(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// The progress count; `None` while a request is being handled.
    fn progress(&self) -> Option<u64> {
        (self.handling.load(Ordering::Relaxed) == 0).then(|| self.progress.load(Ordering::Relaxed))
    }
}

/// A request being handled ([`Activity::begin`]).
pub struct Handling(Arc<Activity>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
        self.0.moved();
    }
}

/// A response body that counts as progress on its connection each chunk it yields, and once
/// more when it ends or is dropped. A download the client keeps reading is not idle; one the
/// client stopped reading (hyper cannot write, so asks for no more chunks) is, and its
/// connection is closed after the idle timeout.
pub struct ProgressBody<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> ProgressBody<B> {
    pub fn new(body: B, activity: Arc<Activity>) -> Self {
        Self { body, activity }
    }
}

impl<B> Drop for ProgressBody<B> {
    fn drop(&mut self) {
        self.activity.moved();
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for ProgressBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_ready() {
            this.activity.moved();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Drives an HTTP connection to its end. It is shut down gracefully when `stop` resolves, or
/// once its [`Activity`] has made no progress for `idle`; an idle connection that does not
/// finish its shutdown within a short grace (`idle`, at most 5 s: an HTTP/2 peer that never
/// acknowledges it, a response the client stopped reading) is dropped.
pub async fn serve_http<C: GracefulConnection>(
    conn: C,
    activity: &Activity,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> Result<(), C::Error> {
    tokio::pin!(conn);
    tokio::pin!(stop);
    let mut quiet = Quiet::new(idle);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            () = &mut stop, if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = quiet.next(), if !stopping => {
                if quiet.expired(activity.progress()) {
                    conn.as_mut().graceful_shutdown();
                    return tokio::time::timeout(idle.min(SHUTDOWN_GRACE), conn)
                        .await
                        .unwrap_or(Ok(()));
                }
            }
        }
    }
}

/// Warnings for accept failures, written at most once per interval with the number of
/// failures each one stands for. At the descriptor limit `accept` fails on every try; one
/// line per try would flood the log.
pub struct AcceptWarnings {
    listener: &'static str,
    every: Duration,
    last: Option<Instant>,
    /// Failures since the last warning written.
    folded: u64,
}

impl AcceptWarnings {
    pub fn new(listener: &'static str) -> Self {
        Self::every(listener, Duration::from_secs(10))
    }

    fn every(listener: &'static str, every: Duration) -> Self {
        Self {
            listener,
            every,
            last: None,
            folded: 0,
        }
    }

    /// Records one failure; true when a warning was written for it.
    pub fn failed(&mut self, e: &io::Error) -> bool {
        self.folded += 1;
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            return false;
        }
        warn!(
            listener = self.listener,
            error = %e,
            failures = self.folded,
            "accept failed; raise the open-files limit (ulimit -n) if this repeats"
        );
        self.last = Some(Instant::now());
        self.folded = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (l.accept().await.unwrap().0, c)
    }

    #[test]
    fn accept_failures_are_warned_once_per_interval() {
        let e = io::Error::from_raw_os_error(24); // EMFILE
        let mut w = AcceptWarnings::new("test");
        assert_eq!((0..1000).filter(|_| w.failed(&e)).count(), 1);
        assert_eq!(w.folded, 999);
        // Past the interval the next one is written, with the count it stands for.
        let mut w = AcceptWarnings::every("test", Duration::from_millis(1));
        assert!(w.failed(&e));
        w.failed(&e);
        std::thread::sleep(Duration::from_millis(5));
        assert!(w.failed(&e));
        assert_eq!(w.folded, 0);
    }

    #[tokio::test]
    async fn quiet_expires_after_four_still_ticks() {
        let mut q = Quiet {
            tick: tokio::time::interval(Duration::from_secs(1)),
            still: 0,
            last: 0,
        };
        assert!(!q.expired(Some(0)));
        assert!(!q.expired(None)); // busy
        assert!(!q.expired(Some(0)));
        assert!(!q.expired(Some(0)));
        assert!(!q.expired(Some(0)));
        assert!(!q.expired(Some(7))); // progress
        for _ in 0..3 {
            assert!(!q.expired(Some(7)));
        }
        assert!(q.expired(Some(7)));
    }

    #[tokio::test]
    async fn opening_drops_silent_and_preface_prefix_clients() {
        let limit = Duration::from_millis(200);
        // Nothing at all.
        let (server, _client) = pair().await;
        assert!(opening(server, limit).await.is_none());
        // A prefix of the h2 preface, then silence.
        let (server, mut client) = pair().await;
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert!(opening(server, limit).await.is_none());
        // A prefix, then a half-close: dropped at once, whatever the limit.
        let (server, mut client) = pair().await;
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let gone = tokio::time::timeout(
            Duration::from_secs(10),
            opening(server, Duration::from_secs(3600)),
        );
        assert!(gone.await.expect("not waiting for the limit").is_none());
    }

    #[tokio::test]
    async fn opening_replays_what_it_read() {
        for sent in [&b"GET / HTTP/1.1\r\n\r\n"[..], H2_PREFACE] {
            let (server, mut client) = pair().await;
            client.write_all(sent).await.unwrap();
            let mut io = opening(server, Duration::from_secs(10))
                .await
                .expect("served");
            let mut got = vec![0; sent.len()];
            io.read_exact(&mut got).await.unwrap();
            assert_eq!(got, sent);
        }
    }
}
