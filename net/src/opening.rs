//! A new connection's first bytes, read under a time limit and replayed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The HTTP/2 client connection preface; a client that sends a prefix of it and stalls is h2.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a too-long HTTP/1 request line is answered with before the connection is closed.
const URI_TOO_LONG: &[u8] = b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 32\r\nconnection: close\r\n\r\nthe request target is too long\r\n";

/// Reads a new connection's first bytes within `limit`: enough to tell HTTP/1 (any byte off the
/// HTTP/2 preface) from HTTP/2 (the whole preface). With `max_line`, an HTTP/1 connection is
/// read up to the end of its request line, and one whose line grows past `max_line` bytes is
/// answered 414 and closed.
///
/// `None` when the client closed, failed, did not get that far in time, or got a 414; otherwise
/// the stream with the bytes read put back in front.
pub async fn opening<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    limit: Duration,
    max_line: Option<usize>,
) -> Option<Replay<S>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = Vec::with_capacity(2048);
    loop {
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // EOF (a half-close after a prefix of the preface included), error, or too late.
            _ => return None,
        }
        let n = buf.len().min(H2_PREFACE.len());
        let h2_so_far = buf[..n] == H2_PREFACE[..n];
        if h2_so_far && buf.len() < H2_PREFACE.len() {
            continue;
        }
        // HTTP/1: wait for the end of the request line, or until it is too long to accept.
        if let Some(max_line) = max_line
            && !h2_so_far
            && !buf.contains(&b'\n')
        {
            if buf.len() <= max_line {
                if buf.capacity() == buf.len() {
                    buf.reserve(buf.len());
                }
                continue;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(URI_TOO_LONG)).await;
            return None;
        }
        return Some(Replay {
            head: buf,
            pos: 0,
            io,
        });
    }
}

/// A stream with the bytes already read from it put back in front.
pub struct Replay<S> {
    /// Freed once replayed.
    head: Vec<u8>,
    pos: usize,
    io: S,
}

impl<S> Replay<S> {
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.head.len() {
            let n = (this.head.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.head.len() {
                this.head = Vec::new();
                this.pos = 0;
            }
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
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        (l.accept().await.expect("accept").0, c)
    }

    #[tokio::test]
    async fn opening_drops_silent_and_preface_prefix_clients() {
        let limit = Duration::from_millis(200);
        // Nothing at all.
        let (server, _client) = pair().await;
        assert!(opening(server, limit, None).await.is_none());
        // A prefix of the h2 preface, then silence.
        let (server, mut client) = pair().await;
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert!(opening(server, limit, None).await.is_none());
        // A prefix, then a half-close: dropped at once, whatever the limit.
        let (server, mut client) = pair().await;
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let gone = tokio::time::timeout(
            Duration::from_secs(10),
            opening(server, Duration::from_secs(3600), None),
        );
        assert!(gone.await.expect("not waiting for the limit").is_none());
    }

    #[tokio::test]
    async fn opening_replays_what_it_read() {
        for sent in [&b"GET / HTTP/1.1\r\n\r\n"[..], H2_PREFACE] {
            let (server, mut client) = pair().await;
            client.write_all(sent).await.unwrap();
            let mut io = opening(server, Duration::from_secs(10), None)
                .await
                .expect("served");
            let mut got = vec![0; sent.len()];
            io.read_exact(&mut got).await.unwrap();
            assert_eq!(got, sent);
        }
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
        let o = opening(server, Duration::from_millis(300), Some(8192)).await;
        assert!(o.is_none());
        assert!(t.elapsed() < Duration::from_secs(5));
        // Closes after the prefix: gone at once.
        let (server, mut client) = pair().await;
        client
            .write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .expect("write");
        drop(client);
        let o = opening(server, Duration::from_secs(30), Some(8192)).await;
        assert!(o.is_none());
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
        let o = opening(server, Duration::from_secs(5), Some(8192)).await;
        assert!(o.is_none());
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
        let Some(mut io) = opening(server, Duration::from_secs(5), Some(8192)).await else {
            panic!("not served");
        };
        let mut got = vec![0u8; 27];
        io.read_exact(&mut got).await.expect("replayed");
        assert_eq!(&got, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n");
    }

    #[tokio::test]
    async fn without_a_line_limit_a_long_request_line_is_served() {
        let (server, mut client) = pair().await;
        let line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(20_000));
        let writer = tokio::spawn(async move { client.write_all(line.as_bytes()).await });
        let mut io = opening(server, Duration::from_secs(5), None)
            .await
            .expect("served");
        let mut got = [0u8; 5];
        io.read_exact(&mut got).await.expect("replayed");
        assert_eq!(&got, b"GET /");
        drop(io);
        let _ = writer.await;
    }
}
