//! A programmable HTTP/1.1 origin for end-to-end tests of the edge.
//!
//! It is written on raw tokio sockets (the root package does not depend on hyper): it reads a
//! request head up to `\r\n\r\n`, a body framed by `Content-Length` or chunked encoding, records
//! the request, and answers with whatever the test scripted for that path: status, headers, body,
//! a delay before the head, a slow chunked body, or a connection closed mid-body. Connections are
//! kept alive unless the request or the reply says otherwise.
//!
//! Every request is counted per path (atomically) and recorded with its headers, so tests prove
//! hits by counting origin requests and assert what the edge sent (conditional requests,
//! missing `Range`, pass-through bodies). [`TestOrigin::stop`] closes the listener and every open
//! connection (a dead origin).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// A gate a reply can wait on before sending its head: lets a test hold the origin's answer
/// until it has observed what the edge does meanwhile (no timing assumptions).
#[derive(Clone, Debug)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    pub fn new() -> Gate {
        Gate(Arc::new(watch::channel(false).0))
    }

    pub fn open(&self) {
        self.0.send_replace(true);
    }

    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Wait this long before sending the status line and headers.
    pub head_delay: Duration,
    /// Send the body in pieces of this size (0: in one write).
    pub chunk_size: usize,
    /// Wait this long before every piece after the first.
    pub chunk_delay: Duration,
    /// Close the connection after this many body bytes (the head still announces the whole
    /// length): an upstream that dies mid-body.
    pub close_after: Option<usize>,
    /// Frame the body with `Content-Length` (default) or with chunked transfer coding.
    pub content_length: bool,
    /// Add `Connection: close` and close after the answer.
    pub close: bool,
    /// Wait until this gate opens before sending the head.
    pub gate: Option<Gate>,
}

impl Reply {
    pub fn new(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            head_delay: Duration::ZERO,
            chunk_size: 0,
            chunk_delay: Duration::ZERO,
            close_after: None,
            content_length: true,
            close: false,
            gate: None,
        }
    }

    /// A 200 with this body.
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Reply::new(200).body(body)
    }

    /// A 304 with no body.
    pub fn not_modified() -> Self {
        Reply::new(304)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    pub fn head_delay(mut self, d: Duration) -> Self {
        self.head_delay = d;
        self
    }

    /// Streams the body in `size`-byte pieces, `delay` apart.
    pub fn slow_body(mut self, size: usize, delay: Duration) -> Self {
        self.chunk_size = size;
        self.chunk_delay = delay;
        self
    }

    pub fn close_after(mut self, bytes: usize) -> Self {
        self.close_after = Some(bytes);
        self
    }

    pub fn gated(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }
}

/// A request as the origin received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    /// The path without the query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Computes the answer for a request; the second argument is how many earlier requests this
/// path received (0 for the first).
pub type Handler = Arc<dyn Fn(&Recorded, usize) -> Reply + Send + Sync>;

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, Handler>>,
    counts: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    total: AtomicUsize,
    log: Mutex<Vec<Recorded>>,
}

impl State {
    fn counter(&self, path: &str) -> Arc<AtomicUsize> {
        self.counts
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default()
            .clone()
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A running (or stopped) programmable origin.
pub struct TestOrigin {
    addr: SocketAddr,
    state: Arc<State>,
    running: Option<Running>,
}

impl TestOrigin {
    /// Listens on 127.0.0.1 on a free port.
    pub async fn start() -> TestOrigin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test origin on 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State::default());
        let running = Some(spawn(listener, state.clone()));
        TestOrigin {
            addr,
            state,
            running,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`, what the edge's `origin` setting takes.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request for `path` gets `reply`.
    pub fn route(&self, path: &str, reply: Reply) {
        self.route_fn(path, move |_, _| reply.clone());
    }

    /// The n-th request for `path` gets `replies[n]`; the last one repeats.
    pub fn route_seq(&self, path: &str, replies: Vec<Reply>) {
        assert!(!replies.is_empty(), "route_seq needs at least one reply");
        self.route_fn(path, move |_, n| replies[n.min(replies.len() - 1)].clone());
    }

    /// The answer is computed from the request and its index.
    pub fn route_fn(
        &self,
        path: &str,
        f: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.to_string(), Arc::new(f));
    }

    /// Requests received for `path` (any method, any query).
    pub fn hits(&self, path: &str) -> usize {
        self.state.counter(path).load(Ordering::SeqCst)
    }

    /// Requests received in all.
    pub fn total_hits(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    /// The recorded requests for `path`, oldest first.
    pub fn requests(&self, path: &str) -> Vec<Recorded> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    pub fn last_request(&self, path: &str) -> Option<Recorded> {
        self.requests(path).pop()
    }

    /// Waits (bounded) until `path` has received at least `n` requests; returns the count.
    pub async fn wait_hits(&self, path: &str, n: usize, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.hits(path);
            if got >= n || tokio::time::Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Listens again on the address it had before [`TestOrigin::stop`], with its routes and
    /// counts.
    pub async fn restart(&mut self) {
        assert!(self.running.is_none(), "restart a stopped origin");
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("bind the test origin's old address again");
        self.running = Some(spawn(listener, self.state.clone()));
    }

    /// Stops listening and closes every open connection: the origin is dead from then on.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(10), r.task).await;
        }
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.task.abort();
        }
    }
}

fn spawn(listener: TcpListener, state: Arc<State>) -> Running {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => {
                    if let Ok((tcp, _)) = accepted {
                        let _ = tcp.set_nodelay(true);
                        conns.spawn(serve_connection(tcp, state.clone()));
                    }
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        conns.shutdown().await;
    });
    Running { stop, task }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads more bytes into `buf`; false at EOF or on error.
async fn fill_buf(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut tmp = [0u8; 16 * 1024];
    match tcp.read(&mut tmp).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
    }
}

/// Reads one CRLF-terminated line (without the CRLF).
async fn read_line(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(pos) = find(buf, b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
            buf.drain(..pos + 2);
            return Some(line);
        }
        if !fill_buf(tcp, buf).await {
            return None;
        }
    }
}

async fn read_exact_buf(tcp: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<Vec<u8>> {
    while buf.len() < n {
        if !fill_buf(tcp, buf).await {
            return None;
        }
    }
    Some(buf.drain(..n).collect())
}

/// Reads one request; `None` when the peer closed or sent something unparsable.
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Recorded> {
    let head_end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > 1 << 20 || !fill_buf(tcp, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let target = request_line.next()?.to_string();
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
        let value = HeaderValue::from_str(value.trim()).ok()?;
        headers.append(name, value);
    }
    let chunked = headers
        .get("transfer-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let line = read_line(tcp, buf).await?;
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(tcp, buf).await?.is_empty() {}
                break;
            }
            body.extend(read_exact_buf(tcp, buf, size).await?);
            read_exact_buf(tcp, buf, 2).await?;
        }
        Bytes::from(body)
    } else {
        let len = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        Bytes::from(read_exact_buf(tcp, buf, len).await?)
    };
    let path = target.split('?').next().unwrap_or("").to_string();
    Some(Recorded {
        method,
        target,
        path,
        headers,
        body,
    })
}

async fn serve_connection(mut tcp: TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut tcp, &mut buf).await else {
            return;
        };
        let n = state.counter(&req.path).fetch_add(1, Ordering::SeqCst);
        state.total.fetch_add(1, Ordering::SeqCst);
        state.log.lock().unwrap().push(req.clone());
        let handler = state.routes.lock().unwrap().get(&req.path).cloned();
        let reply = match handler {
            Some(h) => h(&req, n),
            None => Reply::new(404)
                .header("content-type", "text/plain")
                .body(format!("test origin: no route for {}\n", req.path)),
        };
        let client_close = req
            .header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"));
        let keep = write_reply(&mut tcp, &req, &reply).await;
        if !keep || client_close || reply.close {
            let _ = tcp.shutdown().await;
            return;
        }
    }
}

/// Writes one answer; false when the connection must (or did) end.
async fn write_reply(tcp: &mut TcpStream, req: &Recorded, reply: &Reply) -> bool {
    if let Some(gate) = &reply.gate {
        gate.wait().await;
    }
    if !reply.head_delay.is_zero() {
        tokio::time::sleep(reply.head_delay).await;
    }
    let reason = http::StatusCode::from_u16(reply.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let has_body = !(reply.status < 200 || reply.status == 204 || reply.status == 304);
    let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason);
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let scripted_length = reply
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    if has_body && !scripted_length {
        if reply.content_length {
            head.push_str(&format!("content-length: {}\r\n", reply.body.len()));
        } else {
            head.push_str("transfer-encoding: chunked\r\n");
        }
    }
    if reply.close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    if tcp.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    if !has_body || req.method == "HEAD" {
        return tcp.flush().await.is_ok();
    }
    let body = &reply.body;
    let limit = reply.close_after.unwrap_or(body.len()).min(body.len());
    let piece = if reply.chunk_size == 0 {
        body.len().max(1)
    } else {
        reply.chunk_size
    };
    let mut sent = 0;
    let mut first = true;
    while sent < limit {
        if !first && !reply.chunk_delay.is_zero() {
            tokio::time::sleep(reply.chunk_delay).await;
        }
        first = false;
        let end = (sent + piece).min(limit);
        let data = &body[sent..end];
        let ok = if reply.content_length {
            tcp.write_all(data).await.is_ok()
        } else {
            let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
            framed.extend_from_slice(data);
            framed.extend_from_slice(b"\r\n");
            tcp.write_all(&framed).await.is_ok()
        };
        if !ok {
            return false;
        }
        sent = end;
    }
    if reply.close_after.is_some() {
        // Die mid-body: flush what was sent and drop the connection.
        let _ = tcp.flush().await;
        return false;
    }
    if !reply.content_length && tcp.write_all(b"0\r\n\r\n").await.is_err() {
        return false;
    }
    tcp.flush().await.is_ok()
}
