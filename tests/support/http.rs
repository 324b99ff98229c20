//! Whole responses, and raw HTTP/1.1 exchanges for what a client library would refuse or
//! normalise (`..` in a target, malformed framing, smuggling attempts).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// A whole response.
pub struct Resp {
    pub status: u16,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Bodies can be large and binary: show their length and a prefix only.
        let prefix = String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned();
        f.debug_struct("Resp")
            .field("status", &self.status)
            .field("version", &self.version)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("body_prefix", &prefix)
            .finish()
    }
}

impl Resp {
    /// Reads the whole response.
    pub async fn read(r: reqwest::Response) -> Resp {
        let status = r.status().as_u16();
        let version = r.version();
        let headers = r.headers().clone();
        let url = r.url().clone();
        let body = r
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{url}: response body failed: {e}"));
        Resp {
            status,
            version,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The header's value, "" when absent.
    pub fn header_or_empty(&self, name: &str) -> &str {
        self.header(name).unwrap_or("")
    }

    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("(none)")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    /// The body as JSON, or as a JSON string when it is not JSON.
    pub fn json_or_text(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| Value::String(self.text()))
    }

    /// Asserts that no tag header reaches the client.
    pub fn assert_no_tags(&self) {
        assert!(
            self.header("surrogate-key").is_none() && self.header("cache-tag").is_none(),
            "a tag header reached the client: {:?}",
            self.headers
        );
    }
}

/// Sends one request and reads the whole response; panics if either fails.
pub async fn send(
    c: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<reqwest::Body>,
) -> Resp {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut rb = c.request(method.clone(), url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.body(b);
    }
    let r = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    Resp::read(r).await
}

pub async fn get(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Resp {
    send(c, "GET", url, headers, None).await
}

/// GETs until the answer comes from cache (bounded by [`WAIT`]), and returns the last answer.
/// A request that arrives just after a fill finished streaming may still join that fill
/// (X-Cache MISS, no origin request): callers prove the hit by the origin's count.
pub async fn get_hit(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Resp {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = get(c, url, headers).await;
        if r.x_cache() == "HIT" || tokio::time::Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Writes `request` on a new connection and reads until the peer closes it or [`WAIT`]
/// passes. Returns what was read and whether the peer closed the connection.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (String, bool) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = tcp.into_split();
    // Read concurrently: a server that refuses a request may close before we finish writing.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        let closed = loop {
            match tokio::time::timeout(WAIT, rd.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        (String::from_utf8_lossy(&got).into_owned(), closed)
    });
    let _ = wr.write_all(request).await;
    let _ = wr.flush().await;
    let out = reader.await.expect("reader task");
    drop(wr);
    out
}

/// The status code of the first response in raw output (0 if there is none).
pub fn status_of(raw: &str) -> u16 {
    raw.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sends one raw request and reads the answer to its end (bounded by `within`); returns
/// (status, whole answer). Panics when there is no status line.
pub async fn raw_request(addr: SocketAddr, request: &str, within: Duration) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut out))
        .await
        .expect("the answer did not end in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

/// Reads until EOF: the time the peer took to close, or `None` if it was still open after
/// `within`.
pub async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + within),
            tcp.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// The value of X-Cache on a response (`<none>` when absent).
pub fn x_cache(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<none>")
        .to_string()
}
