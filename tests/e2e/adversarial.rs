//! The edge under hostile input (issue 13): raw bytes over HTTP/1 and HTTP/2 against a real
//! `EdgeServer` on 127.0.0.1, with a real origin behind it: the programmable test origin, or,
//! where an attack needs an origin that frames requests the way nginx does, [`StrictOrigin`], a
//! keep-alive origin that honours a GET's Content-Length.
//!
//! Each test is a regression test of one class of attack: request smuggling through a GET
//! body, host confusion, unkeyed forwarding fields, anonymous purges, connections that never
//! finish or never end, origins that stall or fail, and imprecise statuses.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outpost_config::Source;
use outpost_edge::{EdgeConfig, EdgeOverrides};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::client_within;
use crate::support::edge::{Edge, loopback_config};
use crate::support::http::{Resp, closed_within, raw_exchange as raw, status_of};
use crate::support::ports::refused_addr;
use crate::support::proc::Spawn;
use crate::support::test_origin::{Reply, TestOrigin};

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(20);

const HOST: &str = "site.test";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// An edge in front of `origin` with `extra_toml` appended to its config, then `tweak`ed.
async fn start_edge(
    origin: SocketAddr,
    extra_toml: &str,
    tweak: impl FnOnce(&mut EdgeConfig),
) -> Edge {
    let mut cfg = loopback_config("adversarial.toml", origin, extra_toml);
    cfg.memory = 64 << 20;
    cfg.drain_timeout = Duration::from_secs(2);
    cfg.upstream_first_byte_timeout = Duration::from_secs(10);
    tweak(&mut cfg);
    Edge::start(cfg).await
}

fn client() -> reqwest::Client {
    client_within(WAIT)
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    crate::support::http::get(&client(), url, headers).await
}

fn cacheable(body: &'static str) -> Reply {
    Reply::ok(body).header("cache-control", "max-age=300")
}

// ---------------------------------------------------------------------------------------------
// A strict keep-alive origin (frames requests as nginx does)
// ---------------------------------------------------------------------------------------------

/// One request as the strict origin read it.
#[derive(Debug, Clone)]
struct Seen {
    target: String,
    headers: Vec<(String, String)>,
}

/// A keep-alive HTTP/1.1 origin that reads a request's body by its Content-Length, whatever
/// the method (as nginx does), and answers `/<name>` with the body `<name>` and max-age=300.
struct StrictOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl StrictOrigin {
    async fn start() -> StrictOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(Self::serve(tcp, log.clone()));
            }
        });
        StrictOrigin { addr, seen }
    }

    async fn serve(mut tcp: TcpStream, log: Arc<Mutex<Vec<Seen>>>) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let target = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("/")
                .to_string();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            buf.drain(..end);
            // The body, by Content-Length, from this connection's next bytes.
            while buf.len() < len {
                let mut chunk = [0u8; 4096];
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..len);
            log.lock().expect("log").push(Seen {
                target: target.clone(),
                headers,
            });
            let body = target.trim_start_matches('/').to_string();
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncache-control: max-age=300\r\ncontent-type: text/plain\r\n\r\n{body}",
                body.len()
            );
            if tcp.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Smuggling through a GET body
// ---------------------------------------------------------------------------------------------

/// The review's repro: a GET with a Content-Length and a body, then a GET whose header carries
/// a request line. Before the fix the edge forwarded the Content-Length without the body, the
/// origin read the second request as the first one's body, and `/secret.txt`'s bytes were
/// cached as `/b2.txt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_body_cannot_smuggle_a_request_into_the_cache() {
    let origin = StrictOrigin::start().await;
    let edge = start_edge(origin.addr, "", |c| c.upstream_max_connections = 1).await;
    let body = "x".repeat(29);
    let smuggle =
        format!("GET /a2.txt HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 29\r\n\r\n{body}");
    let (out, _) = raw(edge.addr, smuggle.as_bytes()).await;
    assert_eq!(status_of(&out), 400, "a GET with a body is refused: {out}");
    let pad = format!(
        "GET /b2.txt HTTP/1.1\r\nhost: {HOST}\r\nx-pad: GET /secret.txt HTTP/1.1\r\nconnection: close\r\n\r\n"
    );
    let (out, _) = raw(edge.addr, pad.as_bytes()).await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(
        out.ends_with("b2.txt"),
        "b2 answered with its own body: {out}"
    );
    let clean = get(&edge.url("/b2.txt"), &[("host", HOST)]).await;
    assert_eq!(clean.body, "b2.txt", "the cache holds b2's own bytes");
    // The origin read exactly the requests the edge meant to send.
    let seen = origin.seen();
    assert!(
        seen.iter().all(|s| s.target != "/secret.txt"),
        "no smuggled request reached the origin: {seen:?}"
    );
}

/// The class: no GET or HEAD the edge sends upstream carries framing, whatever the client sent
/// (an empty body with `Content-Length: 0` is accepted and not forwarded as such).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_fields_never_go_upstream_on_cacheable_requests() {
    let origin = StrictOrigin::start().await;
    let edge = start_edge(origin.addr, "", |_| {}).await;
    for (i, method) in ["GET", "HEAD"].iter().enumerate() {
        let req = format!(
            "{method} /f{i} HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let (out, _) = raw(edge.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 200, "{out}");
    }
    let chunked = format!(
        "GET /f9 HTTP/1.1\r\nhost: {HOST}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let (out, closed) = raw(edge.addr, chunked.as_bytes()).await;
    assert_eq!(status_of(&out), 400, "a chunked GET body is refused: {out}");
    assert!(
        closed,
        "and the connection closed, so its body is never read as a request"
    );
    for s in origin.seen() {
        for (n, _) in &s.headers {
            assert!(
                n != "content-length" && n != "transfer-encoding",
                "{n} forwarded on {s:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Host confusion
// ---------------------------------------------------------------------------------------------

/// The origin receives exactly the authority the key was built from; ambiguous authorities get
/// 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_receives_the_authority_the_key_was_built_from() {
    let origin = TestOrigin::start().await;
    origin.route("/h", cacheable("page"));
    let edge = start_edge(origin.addr(), "", |_| {}).await;

    // Absolute form with another Host: the target's authority wins, upstream and in the key.
    let req =
        format!("GET http://{HOST}/h HTTP/1.1\r\nhost: evil.test\r\nconnection: close\r\n\r\n");
    let (out, _) = raw(edge.addr, req.as_bytes()).await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert_eq!(
        origin.last_request("/h").expect("fetched").header("host"),
        Some(HOST)
    );
    let clean = get(&edge.url("/h"), &[("host", HOST)]).await;
    assert_eq!(
        clean.header_or_empty("x-cache"),
        "HIT",
        "same key as the absolute form"
    );
    let evil = get(&edge.url("/h"), &[("host", "evil.test")]).await;
    assert_eq!(
        evil.header_or_empty("x-cache"),
        "MISS",
        "evil.test is its own key"
    );
    assert_eq!(
        origin.last_request("/h").expect("fetched").header("host"),
        Some("evil.test")
    );

    // Spellings of one host: the origin gets the normalised one the key holds.
    for spelling in ["Site.Test.", "site.test:80"] {
        origin.route("/n", cacheable("n"));
        let req = format!(
            "GET /n?s={spelling} HTTP/1.1\r\nhost: {spelling}\r\nconnection: close\r\n\r\n"
        );
        let (out, _) = raw(edge.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 200, "{out}");
        let seen = origin.last_request("/n").expect("fetched");
        assert_eq!(seen.header("host"), Some(HOST), "for Host: {spelling}");
        assert_eq!(seen.headers.get_all("host").iter().count(), 1);
    }

    // Ambiguous: refused before anything is looked up or sent.
    let before = origin.total_hits();
    for req in [
        format!("GET /h HTTP/1.1\r\nhost: {HOST}\r\nhost: evil.test\r\nconnection: close\r\n\r\n"),
        format!("GET /h HTTP/1.1\r\nhost: user@{HOST}\r\nconnection: close\r\n\r\n"),
        format!("GET http://user@{HOST}/h HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n"),
        format!("GET ftp://{HOST}/h HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n"),
    ] {
        let (out, _) = raw(edge.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 400, "{req:?} -> {out}");
    }
    assert_eq!(
        origin.total_hits(),
        before,
        "nothing refused reached the origin"
    );
}

/// HTTP/2: a `host` field that disagrees with `:authority` is malformed (RFC 9113 §8.3.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_and_host_must_agree() {
    let origin = TestOrigin::start().await;
    origin.route("/h2", cacheable("h2 page"));
    let edge = start_edge(origin.addr(), "", |_| {}).await;
    let tcp = TcpStream::connect(edge.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut send = async |host: Option<&str>| {
        let mut b = http::Request::get(format!("http://{HOST}/h2"));
        if let Some(h) = host {
            b = b.header("host", h);
        }
        let req = b
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        resp.status().as_u16()
    };
    assert_eq!(send(Some("evil.test")).await, 400);
    assert_eq!(origin.hits("/h2"), 0, "refused before the origin");
    assert_eq!(send(Some(HOST)).await, 200);
    assert_eq!(send(None).await, 200);
    assert_eq!(
        origin.last_request("/h2").expect("fetched").header("host"),
        Some(HOST)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Unkeyed forwarding fields
// ---------------------------------------------------------------------------------------------

const DANGEROUS: [(&str, &str); 9] = [
    ("x-forwarded-host", "evil.test"),
    ("x-original-url", "/admin"),
    ("x-rewrite-url", "/admin"),
    ("forwarded", "host=evil.test;proto=https"),
    ("x-http-method-override", "DELETE"),
    ("x-forwarded-scheme", "nothttp"),
    ("x-forwarded-port", "1"),
    ("x-forwarded-prefix", "/evil"),
    ("x-host", "evil.test"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_fields_that_rewrite_requests_are_stripped_by_default() {
    let origin = TestOrigin::start().await;
    origin.route("/p", cacheable("p"));
    let edge = start_edge(
        origin.addr(),
        "[upstream]\nstrip_headers = [\"X-Debug\"]\n",
        |_| {},
    )
    .await;
    let mut headers = DANGEROUS.to_vec();
    headers.push(("host", HOST));
    headers.push(("x-debug", "1"));
    headers.push(("x-kept", "yes"));
    let r = get(&edge.url("/p"), &headers).await;
    assert_eq!(r.status, 200);
    let seen = origin.last_request("/p").expect("fetched");
    for (name, _) in DANGEROUS.iter().chain([&("x-debug", "")]) {
        assert_eq!(seen.header(name), None, "{name} reached the origin");
    }
    assert_eq!(seen.header("x-kept"), Some("yes"));
}

/// An operator may forward one of them; then it is part of the key, so one client's value is
/// never served to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_rewriting_field_is_keyed() {
    let origin = TestOrigin::start().await;
    origin.route("/k", cacheable("k"));
    let edge = start_edge(
        origin.addr(),
        "[upstream]\nforward_headers = [\"X-Forwarded-Host\"]\n",
        |_| {},
    )
    .await;
    let attacker = get(
        &edge.url("/k"),
        &[("host", HOST), ("x-forwarded-host", "evil.test")],
    )
    .await;
    assert_eq!(attacker.header_or_empty("x-cache"), "MISS");
    assert_eq!(
        origin
            .last_request("/k")
            .expect("fetched")
            .header("x-forwarded-host"),
        Some("evil.test")
    );
    let victim = get(&edge.url("/k"), &[("host", HOST)]).await;
    assert_eq!(
        victim.header_or_empty("x-cache"),
        "MISS",
        "the attacker's variant is not served"
    );
    assert_eq!(origin.hits("/k"), 2);
    let again = get(
        &edge.url("/k"),
        &[("host", HOST), ("x-forwarded-host", "evil.test")],
    )
    .await;
    assert_eq!(again.header_or_empty("x-cache"), "HIT");
}

#[test]
fn forward_headers_accepts_only_fields_stripped_by_default() {
    let text = "listen = \"127.0.0.1:0\"\norigin = \"http://127.0.0.1:1\"\n[upstream]\nforward_headers = [\"accept\"]\nstrip_headers = [\"content-length\"]\n";
    let err = EdgeConfig::from_source(&Source::inline("bad.toml", text), EdgeOverrides::default())
        .expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("upstream.forward_headers"), "{msg}");
    assert!(msg.contains("upstream.strip_headers"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// 4. PURGE on the data port
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_on_the_data_port_needs_a_token_even_without_admin_tokens() {
    let origin = TestOrigin::start().await;
    origin.route("/pp", cacheable("pp"));
    let edge = start_edge(origin.addr(), "", |_| {}).await;
    get(&edge.url("/pp"), &[("host", HOST)]).await;
    let r = client()
        .request(
            reqwest::Method::from_bytes(b"PURGE").expect("method"),
            edge.url("/pp"),
        )
        .header("host", HOST)
        .send()
        .await
        .expect("purge");
    assert_eq!(r.status().as_u16(), 403);
    let after = get(&edge.url("/pp"), &[("host", HOST)]).await;
    assert_eq!(
        after.header_or_empty("x-cache"),
        "HIT",
        "an anonymous PURGE purges nothing"
    );
}

/// A PURGE on an edge's data port reaches its shield, as `outpost purge` does: the shield does
/// not refill the edge with the purged copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_on_the_data_port_is_forwarded_to_shields() {
    const TOKEN: &str = "purge-token-7f3a";
    let origin = TestOrigin::start().await;
    origin.route_seq(
        "/sp",
        vec![cacheable("v1"), cacheable("v2"), cacheable("v3")],
    );
    let tokens = format!("[admin]\ntokens = [{{ secret = \"{TOKEN}\", scopes = [\"purge\"] }}]\n");
    let shield = start_edge(
        origin.addr(),
        &format!("role = \"shield\"\nname = \"shield-a\"\n{tokens}"),
        |_| {},
    )
    .await;
    let edge_toml = format!(
        "name = \"edge-a\"\n{tokens}[[shields]]\nname = \"shield-a\"\nurl = \"http://{}\"\nadmin = \"{}\"\n",
        shield.addr,
        shield.admin.expect("shield admin")
    );
    let edge = start_edge(origin.addr(), &edge_toml, |_| {}).await;
    assert_eq!(get(&edge.url("/sp"), &[("host", HOST)]).await.body, "v1");
    assert_eq!(origin.hits("/sp"), 1);
    let r = client()
        .request(
            reqwest::Method::from_bytes(b"PURGE").expect("method"),
            edge.url("/sp"),
        )
        .header("host", HOST)
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("purge");
    assert_eq!(r.status().as_u16(), 200);
    let receipt: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.expect("receipt")).expect("json");
    let nodes = receipt["nodes"].as_array().expect("nodes");
    assert!(
        nodes
            .iter()
            .any(|n| n["node"] == "shield-a" && n["ok"] == true),
        "{receipt}"
    );
    let after = get(&edge.url("/sp"), &[("host", HOST)]).await;
    assert_eq!(
        after.body, "v2",
        "the shield refetched instead of refilling v1"
    );
    assert_eq!(origin.hits("/sp"), 2);
}

// ---------------------------------------------------------------------------------------------
// 5. Connections bounded in time and count
// ---------------------------------------------------------------------------------------------

/// A prefix of the HTTP/2 preface, then a stall or a half-close: closed within the header
/// timeout (before the fix, never closed, and polled every 5 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_h2_preface_is_closed_within_the_header_timeout() {
    let origin = TestOrigin::start().await;
    let edge = start_edge(origin.addr(), "", |c| {
        c.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let mut stalled = TcpStream::connect(edge.addr).await.expect("connect");
    stalled
        .write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("write");
    let mut half = TcpStream::connect(edge.addr).await.expect("connect");
    half.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
    half.shutdown().await.expect("half-close");
    assert!(
        closed_within(&mut half, WAIT).await.is_some(),
        "half-closed preface connection left open"
    );
    assert!(
        closed_within(&mut stalled, WAIT).await.is_some(),
        "stalled preface connection left open"
    );
}

/// GETs `path` over an HTTP/2 connection whose client answers PINGs and sends its own every
/// 200 ms. Returns the connection's task (it ends when the edge closes the connection; keep
/// the sender, or the client closes it itself), its sender, and the response, its body not
/// read.
async fn pinging_h2_get(
    edge: SocketAddr,
    path: &str,
) -> (
    tokio::task::JoinHandle<hyper::Result<()>>,
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    http::Response<hyper::body::Incoming>,
) {
    let tcp = TcpStream::connect(edge).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let conn_task = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{HOST}{path}"))
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    (conn_task, sender, resp)
}

/// An idle HTTP/2 connection is closed after the idle timeout, although its client answers
/// every PING (hyper's client does); an idle HTTP/1 keep-alive connection too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let origin = TestOrigin::start().await;
    origin.route("/i", cacheable("i"));
    let edge = start_edge(origin.addr(), "", |c| {
        c.idle_timeout = Duration::from_secs(1);
        c.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let (conn_task, _sender, resp) = pinging_h2_get(edge.addr, "/i").await;
    assert_eq!(resp.status(), 200);
    let ended = tokio::time::timeout(WAIT, conn_task).await;
    assert!(ended.is_ok(), "the idle h2 connection was never closed");
    assert!(closed_count(&edge, "data", "idle").await >= 1);

    let mut h1 = TcpStream::connect(edge.addr).await.expect("connect");
    h1.write_all(format!("GET /i HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    assert!(
        closed_within(&mut h1, WAIT).await.is_some(),
        "the idle HTTP/1 keep-alive connection was never closed"
    );
}

/// With every connection slot held by clients that send nothing, a new client waits (in the
/// backlog) rather than taking the node past its cap, and is served once the silent ones are
/// closed by their header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_and_a_canary_is_served_after_the_silent_ones_go() {
    let origin = TestOrigin::start().await;
    origin.route("/c", cacheable("canary"));
    let edge = start_edge(origin.addr(), "", |c| {
        c.max_connections = 3;
        c.header_read_timeout = Duration::from_secs(2);
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(edge.addr).await.expect("connect"));
    }
    // Give the accept loop time to take all three slots.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let canary = tokio::spawn({
        let url = edge.url("/c");
        async move { get(&url, &[("host", HOST)]).await.status }
    });
    // Well before the silent ones' header timeout (2 s), the canary still waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !canary.is_finished(),
        "the canary was served while every slot was held"
    );
    for s in &mut silent {
        assert!(
            closed_within(s, WAIT).await.is_some(),
            "silent connection kept"
        );
    }
    assert_eq!(canary.await.expect("canary"), 200);
}

/// The admin listener bounds its connections as the data port does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_closes_slow_and_silent_connections() {
    let origin = TestOrigin::start().await;
    let edge = start_edge(origin.addr(), "", |c| {
        c.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let admin = edge.admin.expect("admin");
    let mut silent = TcpStream::connect(admin).await.expect("connect");
    let mut slow = TcpStream::connect(admin).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(&mut silent, WAIT).await.is_some(),
        "silent admin connection kept"
    );
    assert!(
        closed_within(&mut slow, WAIT).await.is_some(),
        "slowloris admin connection kept"
    );
}

// ---------------------------------------------------------------------------------------------
// 8, 11. Origins that stall or fail
// ---------------------------------------------------------------------------------------------

/// An origin that sends the head and half the body, then stalls: the client's response is cut
/// within the body timeout (never presented as complete), nothing is stored, and the upstream
/// permit comes back, so the next miss is served (before the fix: 503 for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_origin_body_times_out_and_frees_its_permit() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/stall",
        Reply::ok(vec![b'x'; 4096])
            .header("cache-control", "max-age=300")
            .slow_body(2048, Duration::from_secs(3600)),
    );
    origin.route("/next", cacheable("next"));
    let edge = start_edge(origin.addr(), "", |c| {
        c.upstream_max_connections = 1;
        c.upstream_body_timeout = Duration::from_secs(1);
    })
    .await;
    let r = client()
        .get(edge.url("/stall"))
        .header("host", HOST)
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "a cut body is never complete");
    let next = get(&edge.url("/next"), &[("host", HOST)]).await;
    assert_eq!(next.status, 200, "the permit came back");
    assert_eq!(next.body, "next");
    let again = client()
        .get(edge.url("/stall"))
        .header("host", HOST)
        .send()
        .await
        .expect("head");
    assert_ne!(
        again.headers().get("x-cache").and_then(|v| v.to_str().ok()),
        Some("HIT"),
        "a cut body is never stored"
    );
}

/// After repeated failures the origin is left alone for the cooldown: requests fail at once
/// (503) instead of each opening a connection (before: thousands of attempts a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_origin_trips_the_circuit_breaker() {
    // An origin that accepts and never answers: each request is a first-byte timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let edge = start_edge(addr, "", |c| {
        c.upstream_first_byte_timeout = Duration::from_millis(300);
        c.origin_breaker_failures = 3;
        c.origin_breaker_cooldown = Duration::from_secs(600);
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(
            get(&edge.url(&format!("/b{i}")), &[("host", HOST)])
                .await
                .status,
        );
    }
    assert_eq!(&statuses[..3], &[504, 504, 504], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 503), "{statuses:?}");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "no connection while the breaker is open"
    );
}

// ---------------------------------------------------------------------------------------------
// 12. Precise statuses, no internal errors
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_statuses() {
    let origin = TestOrigin::start().await;
    origin.route("/s", cacheable("s"));
    origin.route("/post", Reply::ok("posted"));
    let edge = start_edge(origin.addr(), "", |_| {}).await;

    let long = format!(
        "GET /{} HTTP/1.1\r\nhost: {HOST}\r\n\r\n",
        "a".repeat(100_000)
    );
    let (out, _) = raw(edge.addr, long.as_bytes()).await;
    assert_eq!(status_of(&out), 414, "{}", &out[..out.len().min(200)]);

    let expect =
        format!("GET /s HTTP/1.1\r\nhost: {HOST}\r\nexpect: bogus\r\nconnection: close\r\n\r\n");
    assert_eq!(status_of(&raw(edge.addr, expect.as_bytes()).await.0), 417);

    let trace = format!("TRACE /s HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
    assert_eq!(status_of(&raw(edge.addr, trace.as_bytes()).await.0), 405);
    assert_eq!(origin.hits("/s"), 0, "TRACE is never forwarded");

    let bad_chunks = format!(
        "POST /post HTTP/1.1\r\nhost: {HOST}\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    );
    let (out, _) = raw(edge.addr, bad_chunks.as_bytes()).await;
    assert_eq!(
        status_of(&out),
        400,
        "a malformed request body is the client's: {out}"
    );
    // No internal error text: not in the body, and Proxy-Status (RFC 9209) names only the
    // error type and the client-safe message.
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(!body.contains("error"), "no internal error text: {out}");
    assert!(
        head.contains(
            "proxy-status: outpost; error=http_request_error; details=\"the request body is malformed or was cut short\""
        ),
        "{out}"
    );
    // ... and never counted as an origin error.
    let metrics = metrics_text(&edge).await;
    let origin_errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("outpost_origin_errors"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(origin_errors, 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_failures_never_show_internal_error_chains() {
    let dead = refused_addr();
    let addr = dead.addr;
    let edge = start_edge(addr, "", |_| {}).await;
    let r = get(&edge.url("/x"), &[("host", HOST)]).await;
    assert_eq!(r.status, 502);
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(body.trim(), "the origin could not be reached");
    let post = client()
        .post(edge.url("/x"))
        .header("host", HOST)
        .body("data")
        .send()
        .await
        .expect("post");
    assert_eq!(post.status().as_u16(), 502);
    let body = post.text().await.expect("body");
    assert!(!body.contains("tcp") && !body.contains("Connect"), "{body}");
}

// ---------------------------------------------------------------------------------------------
// 10. stale-if-error with a hung origin
// ---------------------------------------------------------------------------------------------

/// A stale copy that `stale-if-error` allows is served after `stale_if_error_wait`, not after
/// the upstream's first-byte timeout: the origin here would answer in a minute, past the
/// client's own 20 s limit (before the fix the client waited the full 30 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_origin_costs_a_stale_if_error_client_only_the_short_wait() {
    let origin = TestOrigin::start().await;
    origin.route_seq(
        "/sie",
        vec![
            Reply::ok("old copy").header("cache-control", "max-age=1, stale-if-error=600"),
            Reply::ok("too late").head_delay(Duration::from_secs(60)),
        ],
    );
    let edge = start_edge(origin.addr(), "", |c| {
        c.upstream_first_byte_timeout = Duration::from_secs(120);
        c.stale_if_error_wait = Duration::from_millis(300);
    })
    .await;
    assert_eq!(
        get(&edge.url("/sie"), &[("host", HOST)]).await.body,
        "old copy"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = get(&edge.url("/sie"), &[("host", HOST)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header_or_empty("x-cache"), "STALE");
    assert_eq!(r.body, "old copy");
}

// ---------------------------------------------------------------------------------------------
// 6. A client that does not read cannot make a fill hold a large body
// ---------------------------------------------------------------------------------------------

/// A client asks for a large object (too large for the memory tier, so it streams) and reads
/// nothing. The fill stops reading upstream a window ahead of it instead of buffering the whole
/// body in memory, and after the send timeout the client is dropped; a second client of the
/// same object, which reads, gets the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_dropped_after_the_send_timeout() {
    let origin = TestOrigin::start().await;
    let big = 48 << 20;
    origin.route(
        "/big",
        Reply::ok(vec![b'b'; big])
            .header("cache-control", "max-age=300")
            .slow_body(64 << 10, Duration::ZERO),
    );
    let edge = start_edge(origin.addr(), "", |c| {
        c.send_timeout = Duration::from_secs(1);
    })
    .await;
    let mut stalled = TcpStream::connect(edge.addr).await.expect("connect");
    stalled
        .write_all(format!("GET /big HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    // Reads nothing; the edge gives up on it after the send timeout.
    let dropped = async {
        for _ in 0..200 {
            if edge
                .engine()
                .stats
                .slow_readers_dropped
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(
        dropped.await,
        "the client that reads nothing was never dropped"
    );
    let metrics = metrics_text(&edge).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("outpost_slow_readers_dropped") && !l.ends_with(" 0")),
        "{metrics}"
    );
    let r = get(&edge.url("/big"), &[("host", HOST)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big);
    drop(stalled);
}

/// The edge's `/metrics` text.
async fn metrics_text(edge: &Edge) -> String {
    client()
        .get(format!("http://{}/metrics", edge.admin.expect("admin")))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// `outpost_connections_closed_total` for one listener and reason, from `/metrics`.
async fn closed_count(edge: &Edge, listener: &str, reason: &str) -> u64 {
    let text = metrics_text(edge).await;
    let series =
        format!("outpost_connections_closed_total{{listener=\"{listener}\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .trim()
        .parse()
        .expect("a count")
}

/// An origin serving `/big` (`size` patterned bytes, cacheable) and an edge in front of it
/// whose memory tier takes it, with these send and idle timeouts; and the body.
async fn big_object_edge(
    size: usize,
    send_timeout: Duration,
    idle_timeout: Duration,
    tweak: impl FnOnce(&mut EdgeConfig),
) -> (TestOrigin, Edge, Vec<u8>) {
    let origin = TestOrigin::start().await;
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    origin.route(
        "/big",
        Reply::ok(body.clone()).header("cache-control", "max-age=300"),
    );
    let edge = start_edge(origin.addr(), "", |c| {
        c.memory = 256 << 20;
        c.send_timeout = send_timeout;
        c.idle_timeout = idle_timeout;
        tweak(c);
    })
    .await;
    (origin, edge, body)
}

/// A client that asks for a large memory hit and never reads it holds its connection slot
/// only for the send timeout: with every slot taken by such clients over HTTP/1, a canary is
/// served once they are dropped (before the fix, hyper waited for ever to write the body and
/// the slots were never given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_a_memory_hit_give_back_their_slots() {
    let big = 12 << 20;
    let second = Duration::from_secs(1);
    let (origin, edge, _) = big_object_edge(big, second, second, |c| c.max_connections = 2).await;
    origin.route("/c", cacheable("canary"));
    // Fill the memory tier.
    let r = get(&edge.url("/big"), &[("host", HOST)]).await;
    assert_eq!((r.status, r.body.len()), (200, big));
    assert_eq!(r.header("x-cache"), Some("MISS"));
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut tcp = sock.connect(edge.addr).await.expect("connect");
        tcp.write_all(format!("GET /big HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes())
            .await
            .expect("write");
        stalled.push(tcp);
    }
    let canary = tokio::spawn({
        let url = edge.url("/c");
        async move { get(&url, &[("host", HOST)]).await.status }
    });
    let served = tokio::time::timeout(WAIT, canary).await;
    assert_eq!(
        served
            .expect("the canary waited for ever behind clients that read nothing")
            .expect("canary"),
        200
    );
    // The canary needs one slot: the second stalled client may be dropped a moment after it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let dropped = closed_count(&edge, "data", "send_timeout").await;
        if dropped >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dropped} connections dropped for the send timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stalled);
}

/// HTTP/2: a client that keeps its connection alive (it answers PINGs) but never takes a
/// large response's data leaves the stream stalled on flow control; the connection is closed
/// after the send timeout rather than kept for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_stalled_on_flow_control_is_closed() {
    let second = Duration::from_secs(1);
    let (_origin, edge, _) = big_object_edge(12 << 20, second, second, |_| {}).await;
    for round in ["fill", "memory hit"] {
        let (conn_task, _sender, resp) = pinging_h2_get(edge.addr, "/big").await;
        assert_eq!(resp.status(), 200);
        // The body is never polled: its window is never given back.
        let ended = tokio::time::timeout(WAIT, conn_task).await;
        assert!(
            ended.is_ok(),
            "{round}: the stalled h2 connection was never closed"
        );
        drop(resp);
    }
    // The memory hit's at least (the fill's reader may go first, dropped by its fill).
    assert!(closed_count(&edge, "data", "send_timeout").await >= 1);
}

/// The other side of the send timeout: a client that reads a large response slowly, pausing
/// now and then for longer than the idle timeout (and its shutdown grace) but shorter than the
/// send timeout, gets every byte, over HTTP/1 and HTTP/2. Over HTTP/1 the pauses also fall
/// after the body's last chunk went to hyper, while hyper and the kernel still hold its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_that_keeps_reading_is_never_cut() {
    let big = 1 << 20;
    // A send timeout with room for what a wait may span: the pause, and the reading around it
    // until the kernel wakes the writer (a loaded machine's scheduling included).
    let (_origin, edge, body) =
        big_object_edge(big, Duration::from_secs(8), Duration::from_secs(1), |_| {}).await;
    // Past the idle timeout and its grace (at most 1.25 s and 1 s), within the send timeout.
    let pause = Duration::from_millis(2500);
    for round in ["fill", "memory hit"] {
        let got = slow_h1_read(edge.addr, "/big", 256 << 10, pause).await;
        assert_eq!(got.len(), big, "{round}: HTTP/1 body cut");
        assert!(got == body, "{round}: HTTP/1 body differs");
    }
    // HTTP/2, a memory hit: the client takes a frame, and pauses the same way. Its windows are
    // small, so flow control holds the response back, not the socket.
    let tcp = TcpStream::connect(edge.addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(64 << 10)
            .initial_connection_window_size(64 << 10)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{HOST}/big"))
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    // Shorter pauses: the end of a body held back by flow control, once the body has ended,
    // waits on nothing the edge can see, so it has the idle timeout and grace to be taken.
    let pause = Duration::from_millis(500);
    let mut body_in = resp.into_body();
    let mut got = Vec::new();
    let mut since_pause = 0;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body_in).await {
        let Ok(data) = frame.expect("HTTP/2 body cut").into_data() else {
            continue;
        };
        got.extend_from_slice(&data);
        since_pause += data.len();
        if since_pause >= 256 << 10 {
            since_pause = 0;
            tokio::time::sleep(pause).await;
        }
    }
    assert_eq!(got.len(), big, "HTTP/2 body cut");
    assert!(got == body, "HTTP/2 body differs");
}

/// GETs `path` over HTTP/1 through a small receive buffer, taking `burst` bytes at a time and
/// pausing for `pause` after each; the body (whatever arrived before the edge closed).
async fn slow_h1_read(edge: SocketAddr, path: &str, burst: usize, pause: Duration) -> Vec<u8> {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut tcp = sock.connect(edge).await.expect("connect");
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    let mut since_pause = 0;
    loop {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("a read in time")
            .expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        since_pause += n;
        if since_pause >= burst {
            since_pause = 0;
            tokio::time::sleep(pause).await;
        }
    }
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    got.split_off(head_end)
}

/// A client reading a steady ~512 KB/s (128 KiB, then a 250 ms pause) is seen taking bytes
/// within a 1 s send timeout. The kernel wakes a blocked writer once its unsent bytes fall to
/// half of `TCP_NOTSENT_LOWAT` (at most ~128 KiB of reading: one burst here); without it, once
/// a third of a send buffer autotuned to megabytes is free, which took this client longer than
/// the timeout (the fill was cut at 2,950,927 of 3,145,728 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_slow_reader_is_seen_within_a_short_send_timeout() {
    let big = 3 << 20;
    let (_origin, edge, body) =
        big_object_edge(big, Duration::from_secs(1), Duration::from_secs(1), |_| {}).await;
    for round in ["fill", "memory hit"] {
        let got = slow_h1_read(edge.addr, "/big", 128 << 10, Duration::from_millis(250)).await;
        assert_eq!(got.len(), big, "{round}: cut");
        assert!(got == body, "{round}: body differs");
    }
}

/// A response waiting on its origin is not idle: an origin that pauses for longer than the
/// idle timeout and its grace (but within the upstream body timeout) costs a client that reads
/// at full speed nothing (before, the idle shutdown's grace cut it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_waiting_on_its_origin_is_not_idle() {
    let origin = TestOrigin::start().await;
    let body: Vec<u8> = (0..128 << 10).map(|i| (i % 251) as u8).collect();
    origin.route(
        "/paused",
        Reply::ok(body.clone())
            .header("cache-control", "max-age=300")
            .slow_body(64 << 10, Duration::from_secs(3)),
    );
    let edge = start_edge(origin.addr(), "", |c| {
        c.idle_timeout = Duration::from_secs(1);
        c.send_timeout = Duration::from_secs(1);
    })
    .await;
    let r = get(&edge.url("/paused"), &[("host", HOST)]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body == body,
        "cut at {} of {} bytes",
        r.body.len(),
        body.len()
    );
}

/// HTTP/2: one stream stalled on flow control is dropped after the send timeout although the
/// client keeps the connection busy with other requests, which it reads (before, any progress
/// on the connection reset the send clock, so the stalled stream was held for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_stalled_among_busy_ones_is_dropped() {
    let second = Duration::from_secs(1);
    let (origin, edge, _) = big_object_edge(1 << 20, second, Duration::from_secs(30), |_| {}).await;
    origin.route("/c", cacheable("canary"));
    // Fill the memory tier.
    assert_eq!(get(&edge.url("/big"), &[("host", HOST)]).await.status, 200);
    let tcp = TcpStream::connect(edge.addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(16 << 10)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let conn_task = tokio::spawn(conn);
    let get_on = |path: &str| {
        http::Request::get(format!("http://{HOST}{path}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request")
    };
    // Never read: its window shuts after 16 KiB.
    let stalled = sender.send_request(get_on("/big")).await.expect("response");
    assert_eq!(stalled.status(), 200);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut served = 0;
    while !conn_task.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled stream's connection was kept ({served} other requests served)"
        );
        if let Ok(r) = sender.send_request(get_on("/c")).await {
            let _ = http_body_util::BodyExt::collect(r.into_body()).await;
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served >= 3, "only {served} requests before the drop");
    assert!(closed_count(&edge, "data", "send_timeout").await >= 1);
    drop(stalled);
}

/// Item 6, the process side: the `outpost` binary runs without transparent huge pages unless
/// the operator allows them (`MIMALLOC_ALLOW_THP`). mimalloc advises huge pages on its arenas,
/// and a 2 MiB page goes back to the kernel only when all of it is free; with the memory tier
/// freeing bodies in eviction order, `benches/memory.rs` peaked at 126-133 MiB for a bound of
/// 128.25 MiB with them, 102-107 MiB without.
#[tokio::test]
async fn the_edge_process_runs_without_transparent_huge_pages() {
    let thp_enabled = |pid: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(|v| v.trim().to_string())
    };
    if thp_enabled("self").is_none() {
        eprintln!("skipped: this kernel reports no THP_enabled in /proc/<pid>/status");
        return;
    }
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Spawn::edge(&origin.base_url(), &[])
        .env_remove("MIMALLOC_ALLOW_THP")
        .start(&dir.path().join("edge.log"))
        .await;
    assert_eq!(thp_enabled(&node.pid()).as_deref(), Some("0"));
    drop(node);

    let node = Spawn::edge(&origin.base_url(), &[])
        .env("MIMALLOC_ALLOW_THP", "1")
        .start(&dir.path().join("edge-thp.log"))
        .await;
    assert_eq!(
        thp_enabled(&node.pid()).as_deref(),
        Some("1"),
        "an operator's MIMALLOC_ALLOW_THP wins"
    );
}

/// An HTTP/2 client may open at most 128 streams at once on one connection, as the edge's
/// SETTINGS frame announces (hyper's default was 200): what one connection can hold (disk
/// streams, fills, compression jobs) is bounded by that many requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_announce_a_bound_on_their_streams() {
    let origin = TestOrigin::start().await;
    let edge = start_edge(origin.addr(), "", |_| {}).await;
    let mut tcp = TcpStream::connect(edge.addr).await.expect("connect");
    // The client preface, then an empty SETTINGS frame.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let settings = tokio::time::timeout(WAIT, async {
        loop {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await.expect("frame head");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.expect("frame payload");
            // SETTINGS, not its ACK.
            if head[3] == 4 && head[4] & 1 == 0 {
                break payload;
            }
        }
    })
    .await
    .expect("the edge's SETTINGS");
    let max_streams = settings.chunks_exact(6).find_map(|s| {
        (u16::from_be_bytes([s[0], s[1]]) == 3)
            .then(|| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
    });
    assert_eq!(max_streams, Some(128), "SETTINGS_MAX_CONCURRENT_STREAMS");
}
