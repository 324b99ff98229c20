//! A minimal HTTP/1.1 keep-alive client over a raw `TcpStream`: one request at a time (no
//! pipelining), responses framed by `Content-Length` only. It costs less CPU per request than a
//! hyper client, which matters when client and server share two cores, and it costs the same
//! for every server under test.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Read buffer growth per read.
const READ_CHUNK: usize = 64 * 1024;

/// The bytes of `GET path` for host `bench` (built once, sent many times).
pub fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: bench\r\nuser-agent: outpost-bench\r\n\r\n").into_bytes()
}

/// `X-Cache` of a response (the edge's outcome), without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XCache {
    /// No `X-Cache` header (the plain server).
    Absent,
    Hit,
    Miss,
    Other,
}

/// What one request produced.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub status: u16,
    pub body_len: u64,
    pub x_cache: XCache,
    /// From sending the request to the first response byte.
    pub first_byte: Duration,
    /// From sending the request to the last body byte.
    pub total: Duration,
}

pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
        })
    }

    /// Sends one request (see [`get_request`]) and reads the whole response.
    pub async fn send(&mut self, request: &[u8]) -> io::Result<Reply> {
        let start = Instant::now();
        self.stream.write_all(request).await?;
        let mut first_byte = if self.buf.is_empty() {
            None
        } else {
            Some(Duration::ZERO)
        };
        let mut scanned = 0;
        let head_len = loop {
            if let Some(i) = find_head_end(&self.buf, scanned) {
                break i;
            }
            scanned = self.buf.len().saturating_sub(3);
            if self.buf.len() > MAX_HEAD {
                return Err(bad("response head too large"));
            }
            self.fill().await?;
            first_byte.get_or_insert_with(|| start.elapsed());
        };
        let head = parse_head(&self.buf[..head_len])?;
        self.buf.advance(head_len);

        let mut remaining = head.content_length;
        let take = remaining.min(self.buf.len() as u64);
        self.buf.advance(take as usize);
        remaining -= take;
        while remaining > 0 {
            // Every buffered byte belonged to the body: start over at the front.
            self.buf.clear();
            let n = self.fill().await? as u64;
            let take = remaining.min(n);
            self.buf.advance(take as usize);
            remaining -= take;
        }
        Ok(Reply {
            status: head.status,
            body_len: head.content_length,
            x_cache: head.x_cache,
            first_byte: first_byte.unwrap_or_default(),
            total: start.elapsed(),
        })
    }

    async fn fill(&mut self) -> io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        match self.stream.read_buf(&mut self.buf).await? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            )),
            n => Ok(n),
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Index just past `\r\n\r\n`, searching from `from`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i + 4)
}

struct Head {
    status: u16,
    content_length: u64,
    x_cache: XCache,
}

fn parse_head(head: &[u8]) -> io::Result<Head> {
    let mut lines = head.split(|&b| b == b'\n').map(<[u8]>::trim_ascii);
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status = status_line
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("not an HTTP/1.1 status line"))?;
    let mut content_length = None;
    let mut x_cache = XCache::Absent;
    for line in lines.filter(|l| !l.is_empty()) {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| bad("header line without a colon"))?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("bad content-length"))?;
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(bad(
                "chunked responses are not supported by the bench client",
            ));
        } else if name.eq_ignore_ascii_case(b"x-cache") {
            x_cache = match value {
                b"HIT" => XCache::Hit,
                b"MISS" => XCache::Miss,
                _ => XCache::Other,
            };
        }
    }
    Ok(Head {
        status,
        content_length: content_length.ok_or_else(|| bad("response without content-length"))?,
        x_cache,
    })
}
