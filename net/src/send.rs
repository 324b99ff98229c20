//! What a connection's response waits on the client for, so that a client that stops reading
//! is dropped after the send timeout (nginx's `send_timeout`: no byte taken between two writes
//! for that long) instead of holding its connection, its slot and the response's buffers for
//! ever. hyper has no such timeout: a response it cannot write waits as long as the connection
//! lives, and a graceful shutdown waits for that response to end.
//!
//! Two places see the client take bytes, and each counts on the connection's [`Activity`]:
//!
//! - [`Sending`], around every response body over HTTP/2: a chunk handed to hyper waits on the
//!   client until hyper asks for the next one, which it does once the stream's flow-control
//!   window has room for it. A chunk larger than [`SLICE`] is handed out in slices (no copy),
//!   so a large memory hit is asked for piece by piece as the window opens rather than queued
//!   whole in the stream at once, where it would wait on nothing this module sees. Over HTTP/1
//!   a chunk hyper cannot write blocks the socket, which [`Metered`] sees, so there a body
//!   records no waits and is not sliced: hyper asks for the next chunk only once its whole
//!   write queue (up to ~400 KiB) is flushed, too coarse a measure of a slow client, and
//!   slicing cost 10-20% of a 100 KiB or 1 MiB memory hit's throughput. Over both, an open
//!   body keeps its connection busy (see [`Sending`]).
//! - [`Metered`], around the connection's stream: a write or flush the socket did not take
//!   (it returned `Pending`) waits on the client until a later one is taken. That covers the
//!   bytes hyper still holds after a body's last chunk.
//!
//! Bytes the connection writes when it is not waiting (an HTTP/2 PING acknowledgement, say)
//! are not progress: a client that answers PINGs but takes no data is still stalled.
//!
//! A write the socket did not take is retried when the kernel says the socket is writable
//! again, which by default is once a third of its send buffer is free: with the buffer
//! autotuned to megabytes, a slow client would have to take a megabyte within the send
//! timeout to be seen taking anything. [`serve_socket`] sets `TCP_NOTSENT_LOWAT`, so at most
//! [`NOTSENT_LOWAT`] bytes (and the write that crossed it) wait unsent in the kernel and the
//! socket turns writable again once fewer than half of that are: progress is seen at least
//! every 128 KiB or so the client takes, and the kernel holds less for each slow client.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Activity;

/// The largest chunk [`Sending`] hands out at once over HTTP/2: a client reading at 4 KiB/s
/// takes one in 16 s, well within any sensible send timeout.
pub const SLICE: usize = 64 << 10;

/// Unsent bytes the kernel holds for a client connection at most (see the module docs).
pub const NOTSENT_LOWAT: u32 = 128 << 10;

/// Sets up a client connection's socket for serving: `TCP_NODELAY` (responses are written
/// whole, so Nagle's algorithm would only delay their last segment) and `TCP_NOTSENT_LOWAT`.
/// Best effort: a socket that refuses either is served as it is.
pub fn serve_socket(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(NOTSENT_LOWAT);
}

/// A response body whose chunks wait on the client from the moment they are handed out until
/// the next is asked for (see the module docs). While it lives, its connection is busy: the
/// idle timeout does not run under a response that waits on its upstream, the send timeout
/// does under one that waits on its client.
pub struct Sending<B> {
    body: B,
    activity: Arc<Activity>,
    /// What is left of a chunk larger than [`SLICE`] (HTTP/2).
    rest: Bytes,
    /// HTTP/2: chunks are sliced and wait on the client (see the module docs).
    h2: bool,
    /// A chunk is out and the next has not been asked for: the wait's slot.
    handed: Option<u8>,
}

impl<B> Sending<B> {
    /// `body`, the response to a request of `version`: sliced over HTTP/2.
    pub fn new(body: B, activity: Arc<Activity>, version: http::Version) -> Self {
        activity.opened();
        Self {
            body,
            activity,
            rest: Bytes::new(),
            h2: version == http::Version::HTTP_2,
            handed: None,
        }
    }
}

impl<B> Drop for Sending<B> {
    fn drop(&mut self) {
        // The response ended (or was cut): its last chunk waits no more.
        if let Some(slot) = self.handed.take() {
            self.activity.took(slot);
        }
        self.activity.closed();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Sending<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(slot) = this.handed.take() {
            this.activity.took(slot);
        }
        let frame = if this.rest.is_empty() {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        if this.h2 && data.len() > SLICE {
                            this.rest = data.split_off(SLICE);
                        }
                        Frame::data(data)
                    }
                    Err(trailers) => trailers,
                },
                other => return Poll::Ready(other),
            }
        } else {
            let n = this.rest.len().min(SLICE);
            Frame::data(this.rest.split_to(n))
        };
        if this.h2 {
            this.handed = Some(this.activity.wait());
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.body.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(inner.lower() + rest);
        hint
    }
}

/// A connection's stream whose writes that the socket did not take wait on the client until a
/// later one is taken (see the module docs). Reads pass through.
pub struct Metered<S> {
    io: S,
    activity: Arc<Activity>,
    /// A write or flush was not taken: the wait's slot.
    blocked: Option<u8>,
}

impl<S> Metered<S> {
    pub fn new(io: S, activity: Arc<Activity>) -> Self {
        Self {
            io,
            activity,
            blocked: None,
        }
    }

    fn track<T>(&mut self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match (&r, self.blocked) {
            (Poll::Pending, None) => self.blocked = Some(self.activity.wait()),
            (Poll::Ready(_), Some(slot)) => {
                self.blocked = None;
                self.activity.took(slot);
            }
            _ => {}
        }
        r
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        if let Some(slot) = self.blocked.take() {
            self.activity.took(slot);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.track(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.track(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.track(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.track(r)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;

    #[tokio::test]
    async fn a_large_chunk_is_handed_out_in_slices_each_waiting_until_the_next_is_asked() {
        let activity = Arc::new(Activity::default());
        let body: Vec<u8> = (0..SLICE * 2 + 100).map(|i| i as u8).collect();
        let full = Full::new(Bytes::from(body.clone()));
        let mut sending = Sending::new(full, activity.clone(), http::Version::HTTP_2);
        assert_eq!(sending.size_hint().exact(), Some(body.len() as u64));
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while let Some(frame) = sending.frame().await {
            let data = frame.expect("frame").into_data().expect("data");
            // The chunk now waits on the client until the next is asked for.
            assert_eq!(activity.waiting(), 1);
            assert!(activity.snapshot().1);
            sizes.push(data.len());
            got.extend_from_slice(&data);
            assert_eq!(
                sending.size_hint().exact(),
                Some((body.len() - got.len()) as u64)
            );
        }
        assert_eq!(sizes, [SLICE, SLICE, 100]);
        assert_eq!(got, body);
        assert!(sending.is_end_stream());
        // Asked for more after the last: nothing waits, and each ask was progress; the body
        // keeps its connection busy until it is dropped.
        assert_eq!(activity.waiting(), 0);
        assert_eq!(activity.snapshot(), (3, true));
        drop(sending);
        assert_eq!(activity.snapshot(), (4, false));
    }

    #[tokio::test]
    async fn over_http_1_a_large_chunk_goes_out_whole_and_waits_on_nothing() {
        let activity = Arc::new(Activity::default());
        let body = Bytes::from(vec![7u8; SLICE * 3]);
        let full = Full::new(body.clone());
        let mut sending = Sending::new(full, activity.clone(), http::Version::HTTP_11);
        let data = sending.frame().await.expect("frame").expect("ok");
        assert_eq!(data.into_data().expect("data"), body);
        assert!(sending.is_end_stream());
        assert_eq!(activity.waiting(), 0);
        // Open, so busy, until dropped.
        assert!(activity.snapshot().1);
        drop(sending);
        assert!(!activity.snapshot().1);
    }

    #[tokio::test]
    async fn a_body_dropped_with_a_chunk_out_waits_no_more() {
        let activity = Arc::new(Activity::default());
        let full = Full::new(Bytes::from_static(b"x"));
        let mut sending = Sending::new(full, activity.clone(), http::Version::HTTP_2);
        sending.frame().await.expect("frame").expect("ok");
        assert_eq!(activity.waiting(), 1);
        drop(sending);
        assert_eq!(activity.waiting(), 0);
        assert_eq!(activity.snapshot(), (2, false));
    }

    #[tokio::test]
    async fn a_write_the_socket_does_not_take_waits_until_one_is_taken() {
        use tokio::io::AsyncWriteExt;
        let activity = Arc::new(Activity::default());
        let (client, server) = tokio::io::duplex(16);
        let mut io = Metered::new(server, activity.clone());
        io.write_all(&[1; 16]).await.expect("fits");
        assert_eq!(activity.waiting(), 0);
        // The pipe is full: this write waits on the client.
        let pending = futures_poll_once(io.write(&[2; 8])).await;
        assert!(pending.is_none());
        assert_eq!(activity.snapshot(), (0, true));
        let mut client = client;
        let mut buf = [0; 16];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut buf)
            .await
            .expect("read");
        io.write_all(&[2; 8]).await.expect("taken");
        assert_eq!(activity.snapshot(), (1, false));
    }

    /// Polls `f` once: its output if ready.
    async fn futures_poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(Some(out)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }
}
