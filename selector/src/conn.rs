//! What bounds a connection on the selector's two listeners, in time and in count.
//!
//! - **Count**: each listener holds a semaphore of connection slots (`limits.max_connections`,
//!   `limits.admin_max_connections`). The accept loop takes a slot *before* it accepts, so past
//!   the cap new clients wait in the kernel's listen backlog instead of costing descriptors.
//! - **Spliced connections** ([`splice`]): closed once no byte has moved in either direction for
//!   `limits.idle_timeout`, so a half-open or stalled client (or node) cannot hold its two
//!   descriptors forever. The connect to the node is bounded by `limits.connect_timeout`.
//! - **Admin connections**: [`opening`] reads the first bytes within the header timeout and
//!   decides HTTP/1 or HTTP/2 itself: hyper-util's protocol detection has no timeout, and
//!   hyper's HTTP/1 header timer only starts once HTTP/1 is chosen, so a client that sends
//!   nothing, or a prefix of the HTTP/2 preface, would otherwise keep its slot for good. Then
//!   [`serve_http`] shuts a connection down once no request has been in flight for
//!   `limits.admin_idle_timeout` (HTTP/2 clients that answer PINGs included).
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

/// After an idle connection is told to shut down, how long it may take to do so.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Reads a new HTTP connection's first bytes within `limit`: enough to tell HTTP/1 (any byte
/// off the HTTP/2 preface) from HTTP/2 (the whole preface). `None` when the client closed,
/// failed, or did not get that far in time; otherwise the stream with those bytes put back.
pub(crate) async fn opening<S: AsyncRead + Unpin>(mut io: S, limit: Duration) -> Option<Replay<S>> {
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
pub(crate) struct Replay<S> {
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

/// How a spliced connection ended.
#[derive(Debug)]
pub(crate) enum Spliced {
    /// Both sides closed; bytes sent to the node and to the client.
    Closed { to_node: u64, to_client: u64 },
    /// No byte either way for the idle timeout: both sides dropped.
    Idle,
    /// A reset or another error on either side.
    Failed(io::Error),
}

/// Copies bytes both ways until both sides close, one fails, or nothing has moved for `idle`.
pub(crate) async fn splice<A, B>(client: &mut A, node: &mut B, idle: Duration) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Bytes read from either side; each one read is also written to the other side, so a
    // peer that stops reading stops the count too (the copy's buffer fills up).
    let moved = AtomicU64::new(0);
    let mut a = Counted {
        io: client,
        moved: &moved,
    };
    let mut b = Counted {
        io: node,
        moved: &moved,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let mut quiet = Quiet::new(idle);
    loop {
        tokio::select! {
            r = &mut copy => {
                return match r {
                    Ok((to_node, to_client)) => Spliced::Closed { to_node, to_client },
                    Err(e) => Spliced::Failed(e),
                };
            }
            () = quiet.next() => {
                if quiet.expired(Some(moved.load(Ordering::Relaxed))) {
                    return Spliced::Idle;
                }
            }
        }
    }
}

/// A stream that adds the bytes read from it to a counter.
struct Counted<'a, S> {
    io: &'a mut S,
    moved: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.moved.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// One HTTP connection's requests, for its idle timeout.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Requests started on the connection.
    started: AtomicU64,
    /// Requests not answered yet.
    in_flight: AtomicU32,
}

impl Activity {
    /// A request starts; it is in flight while the guard lives.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Requests started so far; `None` while one is in flight.
    fn progress(&self) -> Option<u64> {
        (self.in_flight.load(Ordering::Relaxed) == 0).then(|| self.started.load(Ordering::Relaxed))
    }
}

/// A request in flight ([`Activity::begin`]).
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Drives an HTTP connection to its end. It is shut down gracefully when `stop` resolves, or
/// once no request has been in flight for `idle`; an idle connection that does not finish its
/// shutdown within a few seconds (an HTTP/2 peer that never acknowledges it) is dropped.
pub(crate) async fn serve_http<C: GracefulConnection>(
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
                    return tokio::time::timeout(SHUTDOWN_GRACE, conn)
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
pub(crate) struct AcceptWarnings {
    listener: &'static str,
    every: Duration,
    last: Option<Instant>,
    /// Failures since the last warning written.
    folded: u64,
}

impl AcceptWarnings {
    pub(crate) fn new(listener: &'static str) -> Self {
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
    pub(crate) fn failed(&mut self, e: &io::Error) -> bool {
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
