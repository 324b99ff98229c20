//! What bounds a client connection on every listener (data, TLS, admin), before and between
//! requests:
//!
//! - **Opening**: [`opening`] reads a new connection's first bytes within the header timeout
//!   and decides its protocol itself. hyper-util's detection has no timeout of its own and
//!   hyper's header timer starts only once HTTP/1 is chosen, so a client that connects and
//!   sends nothing, or a prefix of the HTTP/2 preface, would otherwise hold its slot forever.
//!   An HTTP/1 request line longer than the target limit gets 414 here (past hyper's buffer it
//!   would be a 431). The bytes read are replayed to the server ([`Prefixed`]).
//! - **Idle**: [`Activity`] counts a connection's requests; a connection with no request in
//!   flight and none started for the idle timeout is shut down gracefully (HTTP/2 clients that
//!   answer PINGs included). See [`crate::drain::Watcher::watch`].
//! - **Count**: each listener holds a semaphore of connection slots; the accept loop takes a
//!   slot before it accepts, so past the cap new connections wait in the kernel's backlog.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::warn;

/// The HTTP/2 connection preface; a client that sends a prefix of it and stalls is h2.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a new connection opened.
pub enum Opening<S> {
    /// Serve it: the bytes read so far are put back in front.
    Serve(Prefixed<S>),
    /// Closed, failed or silent past the limit: drop it.
    Gone,
}

/// Reads a new connection's first bytes within `limit` (see the module docs). `max_line`: the
/// longest HTTP/1 request line accepted; a longer one is answered 414 and closed.
pub async fn opening<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    limit: Duration,
    max_line: usize,
) -> Opening<S> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = Vec::with_capacity(2048);
    loop {
        if tokio::time::Instant::now() >= deadline {
            return Opening::Gone;
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Opening::Gone,
            Ok(Ok(_)) => {}
        }
        let n = buf.len().min(H2_PREFACE.len());
        let h2_so_far = buf[..n] == H2_PREFACE[..n];
        if h2_so_far && buf.len() < H2_PREFACE.len() {
            continue;
        }
        // HTTP/1: wait for the end of the request line, or until it is too long to accept.
        if !h2_so_far && !buf.contains(&b'\n') {
            if buf.len() <= max_line {
                if buf.capacity() == buf.len() {
                    buf.reserve(buf.len());
                }
                continue;
            }
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                io.write_all(
                    b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 32\r\nconnection: close\r\n\r\nthe request target is too long\r\n",
                ),
            )
            .await;
            return Opening::Gone;
        }
        return Opening::Serve(Prefixed {
            prefix: buf,
            pos: 0,
            inner: io,
        });
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One connection's requests, for its idle timeout. Written only by the connection's own
/// task; relaxed atomics on a line no other connection touches.
#[derive(Default)]
pub struct Activity {
    /// Requests started on this connection.
    started: AtomicU64,
    /// Requests whose response is not ready yet.
    in_flight: AtomicU32,
}

impl Activity {
    /// A request answered at once (a fresh memory hit).
    #[inline]
    pub fn answered(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// A request still being answered; in flight while the guard lives.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The requests started so far, and whether any is in flight.
    pub fn snapshot(&self) -> (u64, bool) {
        (
            self.started.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed) > 0,
        )
    }
}

/// A request in flight on its connection ([`Activity::begin`]).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A warning for accept failures (EMFILE and friends), written at most once per interval with
/// the count of the ones it stood for.
pub struct AcceptWarnings {
    last: Option<Instant>,
    suppressed: u64,
    what: &'static str,
}

impl AcceptWarnings {
    const EVERY: Duration = Duration::from_secs(10);

    pub fn new(what: &'static str) -> Self {
        Self {
            last: None,
            suppressed: 0,
            what,
        }
    }

    /// Records a failure; true when it was written (not folded into the next warning).
    pub fn failed(&mut self, e: &std::io::Error) -> bool {
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.suppressed += 1;
            return false;
        }
        warn!(
            listener = self.what,
            error = %e,
            repeated = self.suppressed,
            "accept failed; raise the open-files limit (ulimit -n) if this repeats"
        );
        self.last = Some(Instant::now());
        self.suppressed = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        (l.accept().await.expect("accept").0, c)
    }

    #[test]
    fn accept_failures_are_written_once_per_interval() {
        let mut w = AcceptWarnings::new("test");
        let e = std::io::Error::from_raw_os_error(24); // EMFILE
        let written = (0..500).filter(|_| w.failed(&e)).count();
        assert_eq!(written, 1, "500 failures in a burst, one warning");
        assert_eq!(w.suppressed, 499);
    }

    #[tokio::test]
    async fn a_stalled_or_closed_h2_preface_prefix_is_dropped() {
        // Stalls after a prefix of the preface: gone at the limit.
        let (server, mut client) = pair().await;
        client
            .write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .expect("write");
        let t = Instant::now();
        let o = opening(server, Duration::from_millis(300), 8192).await;
        assert!(matches!(o, Opening::Gone));
        assert!(t.elapsed() < Duration::from_secs(5));
        // Closes after the prefix: gone at once.
        let (server, mut client) = pair().await;
        client
            .write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .expect("write");
        drop(client);
        let o = opening(server, Duration::from_secs(30), 8192).await;
        assert!(matches!(o, Opening::Gone));
    }

    #[tokio::test]
    async fn a_long_request_line_gets_414_and_a_normal_one_is_replayed() {
        let (server, mut client) = pair().await;
        let line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(20_000));
        let writer = tokio::spawn(async move {
            let _ = client.write_all(line.as_bytes()).await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        });
        let o = opening(server, Duration::from_secs(5), 8192).await;
        assert!(matches!(o, Opening::Gone));
        let out = writer.await.expect("join");
        assert!(
            out.starts_with(b"HTTP/1.1 414 "),
            "{:?}",
            String::from_utf8_lossy(&out)
        );

        let (server, mut client) = pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
            .await
            .expect("write");
        let Opening::Serve(mut io) = opening(server, Duration::from_secs(5), 8192).await else {
            panic!("not served");
        };
        let mut got = vec![0u8; 27];
        io.read_exact(&mut got).await.expect("replayed");
        assert_eq!(&got, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n");
    }
}
