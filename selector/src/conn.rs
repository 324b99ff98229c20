//! What bounds a connection on the selector's two listeners, in time and in count; the pieces
//! every role shares (first bytes, activity, the idle ticker, accept warnings) are in
//! `outpost-net`.
//!
//! - **Count**: each listener holds a semaphore of connection slots (`limits.max_connections`,
//!   `limits.admin_max_connections`). The accept loop takes a slot *before* it accepts, so past
//!   the cap new clients wait in the kernel's listen backlog instead of costing descriptors.
//! - **Spliced connections** ([`splice`]): closed once no byte has moved in either direction for
//!   `limits.idle_timeout`, so a half-open or stalled client (or node) cannot hold its two
//!   descriptors forever. The connect to the node is bounded by `limits.connect_timeout`.
//! - **Admin connections**: [`outpost_net::opening`] reads the first bytes within the header
//!   timeout and decides HTTP/1 or HTTP/2 itself: hyper-util's protocol detection has no
//!   timeout, and hyper's HTTP/1 header timer only starts once HTTP/1 is chosen, so a client
//!   that sends nothing, or a prefix of the HTTP/2 preface, would otherwise keep its slot for
//!   good. Then [`outpost_net::serve_http`] shuts a connection down once no request has been in
//!   flight for `limits.admin_idle_timeout` (HTTP/2 clients that answer PINGs included), and
//!   drops one whose client takes no byte of a response for as long.
//! - **Accept failures** (EMFILE at the descriptor limit and friends) are logged by
//!   [`outpost_net::AcceptWarnings`] at most once per 10 s, with the count of the ones folded in.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use outpost_net::Quiet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    let mut quiet = Quiet::new(idle);
    tokio::select! {
        r = copy => match r {
            Ok((to_node, to_client)) => Spliced::Closed { to_node, to_client },
            Err(e) => Spliced::Failed(e),
        },
        // Never busy: idle once no byte has moved for the timeout.
        () = quiet.expired(|| (moved.load(Ordering::Relaxed), false)) => Spliced::Idle,
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
