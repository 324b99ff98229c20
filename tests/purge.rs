//! End-to-end tests of "Purge and push" on a real edge: `EdgeServer` in-process over real
//! sockets on 127.0.0.1 (data port and admin port picked by the OS, a disk tier in a tempdir, a
//! few admin tokens), in front of the programmable test origin, which counts every request. A
//! few tests run the real `outpost` binary (`edge` with debug logs, `push`, `purge`).
//!
//! - purge by URL, prefix, tag and all, hard (next request MISS) and soft (next request STALE,
//!   exactly one background revalidation reaches the origin), with the origin's request counts;
//!   tags from `Surrogate-Key` / `Cache-Tag`, never shown to clients;
//! - purges survive a restart on the same cache directory;
//! - the data port's `PURGE` method and the admin API's auth (401, 403, secrets never logged);
//! - push: HIT with identical bytes and a SHA-256 ETag, Range, HEAD, replace, restart, limits,
//!   digest mismatch, traversal, DELETE, listing, eviction pressure;
//! - versioned URLs and ignored query parameters;
//! - `outpost push` of a directory and `outpost purge --tag`.
//!
//! Every wait is bounded ([`WAIT`]); nothing asserts on speed.

#[path = "support/test_origin.rs"]
mod test_origin;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use outpost_config::Source;
use outpost_edge::cache::Engine;
use outpost_edge::{EdgeConfig, EdgeServer};
use outpost_purge_api::digest;
use serde_json::{Value, json};
use test_origin::{Gate, Reply, TestOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(30);

/// Every data-port request names this site, so keys survive a restart on new ports.
const HOST: &str = "cdn.example.test";

/// Every scope.
const ROOT: &str = "root-7f3c9a1e5b2d4c6a";
/// `read` only.
const READER: &str = "reader-0b8e4f2a9c1d";
/// `push` only.
const PUSHER: &str = "pusher-5d1a7c3e9b0f";
/// `purge` only.
const PURGER: &str = "purger-2c9f6e0a4b8d";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// An edge running in this process.
struct Edge {
    addr: SocketAddr,
    admin: SocketAddr,
    engine: Option<Arc<Engine>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Extra settings for the `[cache]` and `[admin]` sections.
#[derive(Default, Clone, Copy)]
struct Extra<'a> {
    cache: &'a str,
    admin: &'a str,
}

fn config_text(origin: &str, dir: &Path, extra: Extra<'_>) -> String {
    format!(
        r#"name = "edge-t"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
origin = "{origin}"

[cache]
dir = "{dir}"
{cache}

[limits]
drain_timeout = "2s"

[admin]
tokens = [
  {{ secret = "{ROOT}", scopes = ["purge", "push", "read"] }},
  {{ secret = "{READER}", scopes = ["read"] }},
  {{ secret = "{PUSHER}", scopes = ["push"] }},
  {{ secret = "{PURGER}", scopes = ["purge"] }},
]
{admin}
"#,
        dir = dir.display(),
        cache = extra.cache,
        admin = extra.admin,
    )
}

impl Edge {
    async fn start(origin: &TestOrigin, dir: &Path, extra: Extra<'_>) -> Edge {
        let text = config_text(&origin.base_url(), dir, extra);
        let cfg = EdgeConfig::from_source(&Source::inline("edge.toml", text), Default::default())
            .unwrap_or_else(|e| panic!("invalid edge config: {e}"));
        let server = EdgeServer::bind(cfg).await.expect("bind the edge");
        let addr = server.local_addr();
        let admin = server.admin_addr().expect("admin listener");
        let engine = server.engine();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Edge {
            addr,
            admin,
            engine: Some(engine),
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the edge and waits (bounded) until it has drained.
    async fn stop(mut self) {
        self.engine = None;
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the edge did not stop within the drain bound")
                .expect("the edge task panicked");
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    fn engine(&self) -> &Arc<Engine> {
        self.engine.as_ref().expect("running edge")
    }

    /// Waits (bounded) until the disk tier holds at least `n` objects, so a restart finds them.
    async fn wait_disk_objects(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.engine().run_pending_tasks().await;
            let disk = self.engine().usage()[1].1;
            if disk >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the disk tier never held {n} objects (has {disk})"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Waits until the fills of the `n` objects fetched so far have finished: a fill stays
/// registered (joinable) until its disk copy is committed, and a request that joins a fill
/// started before a purge gets the pre-purge answer (see
/// `a_request_after_a_purge_does_not_join_a_fetch_started_before_it`). Tests that are not about
/// that race purge only once the disk tier holds every object.
async fn settled(edge: &Edge, n: u64) {
    edge.wait_disk_objects(n).await;
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("reqwest client")
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    /// Asserts that no tag header reaches the client.
    fn assert_no_tags(&self) {
        assert!(
            self.header("surrogate-key").is_none() && self.header("cache-tag").is_none(),
            "a tag header reached the client: {:?}",
            self.headers
        );
    }
}

async fn send(
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
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: body: {e}"));
    Resp {
        status,
        headers,
        body,
    }
}

/// GET on the data port with the site's Host.
async fn get(c: &reqwest::Client, edge: &Edge, path: &str) -> Resp {
    get_with(c, edge, path, &[]).await
}

async fn get_with(c: &reqwest::Client, edge: &Edge, path: &str, extra: &[(&str, &str)]) -> Resp {
    let mut h = vec![("host", HOST)];
    h.extend_from_slice(extra);
    send(c, "GET", &edge.url(path), &h, None).await
}

/// GETs until the answer comes from cache (bounded). A request arriving just after a fill
/// streamed its last byte may still join that fill (MISS without an origin request); callers
/// prove the hit with the origin's count.
async fn get_hit(c: &reqwest::Client, edge: &Edge, path: &str) -> Resp {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = get(c, edge, path).await;
        if r.x_cache() == "HIT" || tokio::time::Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `POST /purge` with the root token.
async fn purge(c: &reqwest::Client, edge: &Edge, body: Value) -> Value {
    let r = purge_as(c, edge, Some(ROOT), body.clone()).await;
    assert_eq!(r.status, 200, "POST /purge {body}: {}", r.text());
    r.json()
}

async fn purge_as(c: &reqwest::Client, edge: &Edge, token: Option<&str>, body: Value) -> Resp {
    let auth = token.map(bearer);
    let mut h = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        h.push(("authorization", a.as_str()));
    }
    send(
        c,
        "POST",
        &edge.admin_url("/purge"),
        &h,
        Some(body.to_string().into()),
    )
    .await
}

/// `PUT /objects/<path>` with the root token.
async fn push(
    c: &reqwest::Client,
    edge: &Edge,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Resp {
    push_as(c, edge, ROOT, path, body, headers).await
}

async fn push_as(
    c: &reqwest::Client,
    edge: &Edge,
    token: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Resp {
    let auth = bearer(token);
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(headers);
    send(
        c,
        "PUT",
        &edge.admin_url(&format!("/objects{path}")),
        &h,
        Some(body.to_vec().into()),
    )
    .await
}

/// `GET /objects?prefix=` with the reader token.
async fn list(c: &reqwest::Client, edge: &Edge, prefix: &str) -> Vec<Value> {
    let auth = bearer(READER);
    let r = send(
        c,
        "GET",
        &edge.admin_url(&format!("/objects?prefix={prefix}")),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "GET /objects?prefix={prefix}: {}", r.text());
    r.json().as_array().expect("a JSON array").clone()
}

fn sha256_hex(data: &[u8]) -> String {
    digest::to_hex(&digest::sha256(data))
}

/// Deterministic, incompressible-looking bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends raw HTTP/1.1 bytes (clients normalise `..` away) and returns (status, whole answer).
async fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the answer did not end")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

/// A cacheable origin object whose n-th answer is `"<path> v<n>"` with ETag `"<n>"`. From the
/// second request on, answers wait for `gate` (the test decides when a revalidation lands).
fn versioned_route(origin: &TestOrigin, path: &'static str, tag: (&str, &str), gate: &Gate) {
    let (tag_name, tag_value) = (tag.0.to_string(), tag.1.to_string());
    let gate = gate.clone();
    origin.route_fn(path, move |_, n| {
        let r = Reply::ok(format!("{path} v{n}"))
            .header("cache-control", "public, max-age=600")
            .header("etag", &format!("\"{n}\""))
            .header("content-type", "text/plain")
            .header(&tag_name, &tag_value);
        if n == 0 { r } else { r.gated(&gate) }
    });
}

// ---------------------------------------------------------------------------------------------
// Purge by URL, prefix, tag, all; hard and soft
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Url,
    Prefix,
    Tag,
    All,
}

const SHOP_A: &str = "/shop/a.css";
const SHOP_B: &str = "/shop/b.js";
const BLOG_C: &str = "/blog/c.html";
const BLOG_D: &str = "/blog/d.png";
const PATHS: [&str; 4] = [SHOP_A, SHOP_B, BLOG_C, BLOG_D];

/// Four cached objects, one purge, then the expected MISS (hard) or STALE plus exactly one
/// background revalidation (soft) on the matched ones, HITs on the others, and origin counts.
async fn purge_scenario(kind: Kind, soft: bool) {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    if !soft {
        // Hard purges refetch at once: nothing to hold.
        gate.open();
    }
    // Tags: Surrogate-Key is space-separated, Cache-Tag comma-separated.
    versioned_route(&origin, SHOP_A, ("surrogate-key", "shop css"), &gate);
    versioned_route(&origin, SHOP_B, ("cache-tag", "shop,js"), &gate);
    versioned_route(&origin, BLOG_C, ("surrogate-key", "blog html"), &gate);
    versioned_route(&origin, BLOG_D, ("cache-tag", "img, blog"), &gate);
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();

    for p in PATHS {
        let r = get(&c, &edge, p).await;
        assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{p}: {r:?}");
        assert_eq!(r.text(), format!("{p} v0"));
        r.assert_no_tags();
        let r = get_hit(&c, &edge, p).await;
        assert_eq!(r.x_cache(), "HIT", "{p}: {r:?}");
        r.assert_no_tags();
        assert_eq!(origin.hits(p), 1, "{p}");
    }
    // Every fill has finished (see `settled`).
    settled(&edge, 4).await;

    let (request, matched): (Value, Vec<&str>) = match kind {
        Kind::Url => (json!({ "urls": [SHOP_A] }), vec![SHOP_A]),
        Kind::Prefix => (json!({ "prefixes": ["/shop/"] }), vec![SHOP_A, SHOP_B]),
        // `blog` is in c's Surrogate-Key and in d's Cache-Tag.
        Kind::Tag => (json!({ "tags": ["blog"] }), vec![BLOG_C, BLOG_D]),
        Kind::All => (json!({ "all": true }), PATHS.to_vec()),
    };
    let mut request = request;
    request["soft"] = json!(soft);
    let receipt = purge(&c, &edge, request.clone()).await;
    assert!(receipt["seq"].as_u64().is_some_and(|s| s >= 1), "{receipt}");
    assert!(
        receipt["id"].as_str().is_some_and(|s| !s.is_empty()),
        "{receipt}"
    );
    assert_eq!(receipt["soft"], json!(soft), "{receipt}");
    let kind_name = format!("{kind:?}").to_lowercase();
    assert_eq!(receipt["kinds"], json!([kind_name]), "{receipt}");
    assert_eq!(receipt["nodes"][0]["ok"], json!(true), "{receipt}");
    if kind == Kind::Url && !soft {
        assert_eq!(receipt["matched"], json!(1), "{receipt}");
    }

    // Objects the purge did not select are untouched.
    for p in PATHS.iter().filter(|p| !matched.contains(p)) {
        let r = get(&c, &edge, p).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("HIT", format!("{p} v0")),
            "{p} was not selected by {request}: {r:?}"
        );
        r.assert_no_tags();
    }

    if !soft {
        for p in &matched {
            let r = get(&c, &edge, p).await;
            assert_eq!(
                (r.status, r.x_cache(), r.text()),
                (200, "MISS", format!("{p} v1")),
                "{p} after hard purge {request}: {r:?}"
            );
            r.assert_no_tags();
            assert_eq!(origin.hits(p), 2, "{p}");
            let r = get_hit(&c, &edge, p).await;
            assert_eq!((r.x_cache(), r.text()), ("HIT", format!("{p} v1")), "{p}");
            assert_eq!(origin.hits(p), 2, "{p}");
        }
    } else {
        for p in &matched {
            let r = get(&c, &edge, p).await;
            assert_eq!(
                (r.status, r.x_cache(), r.text()),
                (200, "STALE", format!("{p} v0")),
                "{p} after soft purge {request}: {r:?}"
            );
            r.assert_no_tags();
            // One background revalidation reaches the origin (held there by the gate) ...
            assert_eq!(
                origin.wait_hits(p, 2, WAIT).await,
                2,
                "{p}: no revalidation"
            );
            let reval = origin.last_request(p).unwrap();
            assert_eq!(
                reval.header("if-none-match"),
                Some("\"0\""),
                "{p}: {reval:?}"
            );
            // ... and while it runs, further requests are served stale without another one.
            for _ in 0..3 {
                let r = get(&c, &edge, p).await;
                assert_eq!(
                    (r.x_cache(), r.text()),
                    ("STALE", format!("{p} v0")),
                    "{p} while revalidating: {r:?}"
                );
            }
            assert_eq!(origin.hits(p), 2, "{p}: more than one revalidation");
        }
        gate.open();
        for p in &matched {
            let deadline = tokio::time::Instant::now() + WAIT;
            let r = loop {
                let r = get(&c, &edge, p).await;
                match r.x_cache() {
                    "HIT" => break r,
                    "STALE" => assert_eq!(r.text(), format!("{p} v0"), "{p}"),
                    other => panic!("{p}: {other} while the revalidation lands: {r:?}"),
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{p}: the revalidated object never became a HIT"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            assert_eq!(r.text(), format!("{p} v1"), "{p}: revalidated content");
            r.assert_no_tags();
            assert_eq!(origin.hits(p), 2, "{p}: exactly one revalidation");
        }
    }
    for p in PATHS.iter().filter(|p| !matched.contains(p)) {
        assert_eq!(
            origin.hits(p),
            1,
            "{p} was not selected but reached the origin"
        );
    }
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purge_by_url() {
    purge_scenario(Kind::Url, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_by_url() {
    purge_scenario(Kind::Url, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purge_by_prefix() {
    purge_scenario(Kind::Prefix, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_by_prefix() {
    purge_scenario(Kind::Prefix, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purge_by_tag() {
    purge_scenario(Kind::Tag, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_by_tag() {
    purge_scenario(Kind::Tag, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purge_all() {
    purge_scenario(Kind::All, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_all() {
    purge_scenario(Kind::All, true).await;
}

/// A soft purge whose revalidation gets a 304: the old body is valid again (HIT, one origin
/// request for the revalidation, none after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_revalidated_by_304_becomes_a_hit_again() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/r.txt", |req, _| {
        if req.header("if-none-match") == Some("\"r1\"") {
            Reply::not_modified()
                .header("etag", "\"r1\"")
                .header("cache-control", "public, max-age=600")
        } else {
            Reply::ok("revalidate me")
                .header("etag", "\"r1\"")
                .header("cache-control", "public, max-age=600")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    assert_eq!(get(&c, &edge, "/r.txt").await.x_cache(), "MISS");
    assert_eq!(get_hit(&c, &edge, "/r.txt").await.x_cache(), "HIT");
    settled(&edge, 1).await;
    purge(&c, &edge, json!({ "urls": ["/r.txt"], "soft": true })).await;
    let r = get(&c, &edge, "/r.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "revalidate me"),
        "{r:?}"
    );
    assert_eq!(origin.wait_hits("/r.txt", 2, WAIT).await, 2);
    let r = get_hit(&c, &edge, "/r.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "revalidate me"),
        "{r:?}"
    );
    assert_eq!(origin.hits("/r.txt"), 2, "one revalidation, then hits");
    edge.stop().await;
}

/// An exact-URL purge removes every Vary variant; a query string is part of the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_url_covers_vary_variants_and_respects_the_query() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/v", |req, n| {
        Reply::ok(format!(
            "{} {n}",
            req.header("accept-language").unwrap_or("none")
        ))
        .header("vary", "Accept-Language")
        .header("cache-control", "max-age=600")
    });
    origin.route_fn("/q", |req, _| {
        Reply::ok(req.target.clone()).header("cache-control", "max-age=600")
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for lang in ["en", "de"] {
        let r = get_with(&c, &edge, "/v", &[("accept-language", lang)]).await;
        assert_eq!(r.x_cache(), "MISS", "{lang}: {r:?}");
    }
    for q in ["/q?a=1", "/q?a=2"] {
        assert_eq!(get(&c, &edge, q).await.x_cache(), "MISS", "{q}");
        assert_eq!(get_hit(&c, &edge, q).await.x_cache(), "HIT", "{q}");
    }
    assert_eq!((origin.hits("/v"), origin.hits("/q")), (2, 2));
    settled(&edge, 4).await;

    purge(&c, &edge, json!({ "urls": ["/v", "/q?a=1"] })).await;
    for lang in ["en", "de"] {
        let r = get_with(&c, &edge, "/v", &[("accept-language", lang)]).await;
        assert_eq!(
            r.x_cache(),
            "MISS",
            "variant {lang} after the URL purge: {r:?}"
        );
    }
    assert_eq!(origin.hits("/v"), 4);
    assert_eq!(get(&c, &edge, "/q?a=1").await.x_cache(), "MISS");
    let r = get(&c, &edge, "/q?a=2").await;
    assert_eq!(r.x_cache(), "HIT", "/q?a=2 was not purged: {r:?}");
    assert_eq!(origin.hits("/q"), 3);
    edge.stop().await;
}

/// An absolute URL purges that host's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_absolute_url() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/abs",
        Reply::ok("abs").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    assert_eq!(get(&c, &edge, "/abs").await.x_cache(), "MISS");
    assert_eq!(get_hit(&c, &edge, "/abs").await.x_cache(), "HIT");
    settled(&edge, 1).await;
    let receipt = purge(&c, &edge, json!({ "urls": [format!("http://{HOST}/abs")] })).await;
    assert_eq!(receipt["matched"], json!(1), "{receipt}");
    assert_eq!(get(&c, &edge, "/abs").await.x_cache(), "MISS");
    assert_eq!(origin.hits("/abs"), 2);
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_purge_requests_are_400_with_a_message() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let auth = bearer(ROOT);
    for (body, want) in [
        ("{}", "empty purge request"),
        (r#"{"soft": true}"#, "empty purge request"),
        (r#"{"url": ["/a"]}"#, "url"),
        ("not json", "invalid purge request"),
        (r#"{"prefixes": ["img/"]}"#, "prefixes[0]"),
    ] {
        let r = send(
            &c,
            "POST",
            &edge.admin_url("/purge"),
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            Some(body.to_string().into()),
        )
        .await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            msg.contains(want),
            "{body}: {msg:?} should mention {want:?}"
        );
    }
    // Sequence numbers increase.
    let a = purge(&c, &edge, json!({ "tags": ["x"] })).await["seq"]
        .as_u64()
        .unwrap();
    let b = purge(&c, &edge, json!({ "all": true })).await["seq"]
        .as_u64()
        .unwrap();
    assert!(b > a, "seq {a} then {b}");
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Purges survive a restart
// ---------------------------------------------------------------------------------------------

fn cacheable(origin: &TestOrigin, path: &'static str, tags: &str) {
    let tags = tags.to_string();
    origin.route_fn(path, move |_, n| {
        let r = Reply::ok(format!("{path} v{n}"))
            .header("cache-control", "public, max-age=600")
            .header("etag", &format!("\"{n}\""));
        if tags.is_empty() {
            r
        } else {
            r.header("surrogate-key", &tags)
        }
    });
}

/// URL, prefix and tag purges, then a restart on the same cache dir: the purged objects stay
/// gone (MISS), the untouched one is still a HIT, and sequence numbers keep increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_objects_stay_gone_after_a_restart() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/keep.txt", "k");
    cacheable(&origin, "/gone-url.txt", "u");
    cacheable(&origin, "/old/gone-prefix.txt", "p");
    cacheable(&origin, "/gone-tag.txt", "doomed");
    let all = [
        "/keep.txt",
        "/gone-url.txt",
        "/old/gone-prefix.txt",
        "/gone-tag.txt",
    ];
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in all {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS", "{p}");
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT", "{p}");
    }
    edge.wait_disk_objects(4).await;
    purge(&c, &edge, json!({ "urls": ["/gone-url.txt"] })).await;
    purge(&c, &edge, json!({ "prefixes": ["/old/"] })).await;
    let before = purge(&c, &edge, json!({ "tags": ["doomed"] })).await["seq"]
        .as_u64()
        .unwrap();
    edge.stop().await;

    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let r = get(&c, &edge, "/keep.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "/keep.txt v0"),
        "an untouched object survives the restart: {r:?}"
    );
    for p in &all[1..] {
        let r = get(&c, &edge, p).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("MISS", format!("{p} v1")),
            "{p} was purged before the restart: {r:?}"
        );
        // Stored after the purge: a HIT (the persisted purge does not cover new copies).
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT", "{p}");
        assert_eq!(origin.hits(p), 2, "{p}");
    }
    assert_eq!(origin.hits("/keep.txt"), 1);
    let after = purge(&c, &edge, json!({ "urls": ["/nothing"] })).await["seq"]
        .as_u64()
        .unwrap();
    assert!(
        after > before,
        "seq went from {before} to {after} across a restart"
    );
    edge.stop().await;
}

/// A purge-all (hard) before a restart stays in force; objects stored after the restart are
/// valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_all_stays_in_force_after_a_restart() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/a.txt", "");
    cacheable(&origin, "/b/c.txt", "");
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in ["/a.txt", "/b/c.txt"] {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS");
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT");
    }
    edge.wait_disk_objects(2).await;
    purge(&c, &edge, json!({ "all": true })).await;
    edge.stop().await;

    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    for p in ["/a.txt", "/b/c.txt"] {
        let r = get(&c, &edge, p).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("MISS", format!("{p} v1")),
            "{p}: purge-all before the restart: {r:?}"
        );
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT", "{p}");
        assert_eq!(origin.hits(p), 2);
    }
    edge.stop().await;
}

/// A soft purge-all before a restart still marks the (still stored) objects stale after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_all_stays_in_force_after_a_restart() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/s.txt", "");
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    assert_eq!(get(&c, &edge, "/s.txt").await.x_cache(), "MISS");
    assert_eq!(get_hit(&c, &edge, "/s.txt").await.x_cache(), "HIT");
    edge.wait_disk_objects(1).await;
    purge(&c, &edge, json!({ "all": true, "soft": true })).await;
    edge.stop().await;

    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let r = get(&c, &edge, "/s.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "/s.txt v0"),
        "soft purge-all before the restart: {r:?}"
    );
    assert_eq!(origin.wait_hits("/s.txt", 2, WAIT).await, 2);
    let r = get_hit(&c, &edge, "/s.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "/s.txt v1"));
    assert_eq!(origin.hits("/s.txt"), 2);
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The PURGE method on the data port
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_method_on_the_data_port() {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    versioned_route(&origin, "/pm/hard.txt", ("surrogate-key", "pm"), &gate);
    versioned_route(&origin, "/pm/soft.txt", ("surrogate-key", "pm"), &gate);
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in ["/pm/hard.txt", "/pm/soft.txt"] {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS");
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT");
    }
    settled(&edge, 2).await;
    let url = edge.url("/pm/hard.txt");

    // No token: 401 with a challenge, and nothing is purged.
    let r = send(&c, "PURGE", &url, &[("host", HOST)], None).await;
    assert_eq!(r.status, 401, "{r:?}");
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "WWW-Authenticate: {challenge:?}"
    );
    // An unknown token: 401.
    let r = send(
        &c,
        "PURGE",
        &url,
        &[("host", HOST), ("authorization", "Bearer not-a-token")],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.header("www-authenticate").is_some(), "{r:?}");
    // Known tokens without the purge scope: 403.
    for t in [READER, PUSHER] {
        let auth = bearer(t);
        let r = send(
            &c,
            "PURGE",
            &url,
            &[("host", HOST), ("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(r.status, 403, "{t}: {r:?}");
    }
    let r = get(&c, &edge, "/pm/hard.txt").await;
    assert_eq!(r.x_cache(), "HIT", "refused PURGEs must not purge: {r:?}");
    assert_eq!(origin.hits("/pm/hard.txt"), 1);

    // The purge-only token: hard by default.
    gate.open();
    let auth = bearer(PURGER);
    let r = send(
        &c,
        "PURGE",
        &url,
        &[("host", HOST), ("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let receipt = r.json();
    assert_eq!(receipt["soft"], json!(false), "{receipt}");
    assert!(receipt["seq"].as_u64().is_some_and(|s| s >= 1), "{receipt}");
    let r = get(&c, &edge, "/pm/hard.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("MISS", "/pm/hard.txt v1"),
        "{r:?}"
    );
    assert_eq!(origin.hits("/pm/hard.txt"), 2);
    // The other object was not touched.
    assert_eq!(get(&c, &edge, "/pm/soft.txt").await.x_cache(), "HIT");

    // Soft-Purge: 1 → STALE, one revalidation, then HIT.
    let auth = bearer(ROOT);
    let r = send(
        &c,
        "PURGE",
        &edge.url("/pm/soft.txt"),
        &[
            ("host", HOST),
            ("authorization", auth.as_str()),
            ("soft-purge", "1"),
        ],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["soft"], json!(true));
    let r = get(&c, &edge, "/pm/soft.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "/pm/soft.txt v0"),
        "{r:?}"
    );
    assert_eq!(origin.wait_hits("/pm/soft.txt", 2, WAIT).await, 2);
    let r = get_hit(&c, &edge, "/pm/soft.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "/pm/soft.txt v1"),
        "{r:?}"
    );
    assert_eq!(origin.hits("/pm/soft.txt"), 2);
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Auth on the admin API
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_a_token_with_the_right_scope() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let purge_body = json!({ "all": true });

    // Missing token: 401 + challenge.
    let r = purge_as(&c, &edge, None, purge_body.clone()).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"outpost\""),
        "{r:?}"
    );
    // A malformed or unknown token: 401.
    let r = send(
        &c,
        "POST",
        &edge.admin_url("/purge"),
        &[("authorization", &format!("Basic {ROOT}"))],
        Some(purge_body.to_string().into()),
    )
    .await;
    assert_eq!(r.status, 401, "Basic scheme: {r:?}");
    let r = purge_as(&c, &edge, Some("wrong-token-1234"), purge_body.clone()).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.contains("invalid_token")),
        "{r:?}"
    );
    // Wrong scope: 403 naming the scope.
    for t in [READER, PUSHER] {
        let r = purge_as(&c, &edge, Some(t), purge_body.clone()).await;
        assert_eq!(r.status, 403, "{t}: {r:?}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.contains("insufficient_scope") && v.contains("purge")),
            "{r:?}"
        );
    }
    assert_eq!(
        purge_as(&c, &edge, Some(PURGER), purge_body.clone())
            .await
            .status,
        200
    );

    // Push needs `push`.
    let r = send(
        &c,
        "PUT",
        &edge.admin_url("/objects/x.txt"),
        &[],
        Some("x".into()),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.header("www-authenticate").is_some());
    for t in [READER, PURGER] {
        let r = push_as(&c, &edge, t, "/x.txt", b"x", &[]).await;
        assert_eq!(r.status, 403, "{t}: {r:?}");
    }
    assert!(
        list(&c, &edge, "/").await.is_empty(),
        "refused pushes stored nothing"
    );
    let r = push_as(&c, &edge, PUSHER, "/x.txt", b"x", &[]).await;
    assert_eq!(r.status, 201, "{r:?}");

    // Delete needs `push`.
    let r = send(&c, "DELETE", &edge.admin_url("/objects/x.txt"), &[], None).await;
    assert_eq!(r.status, 401, "{r:?}");
    let auth = bearer(READER);
    let r = send(
        &c,
        "DELETE",
        &edge.admin_url("/objects/x.txt"),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        list(&c, &edge, "/").await.len(),
        1,
        "a refused DELETE removed it"
    );

    // Listing needs `read`.
    let r = send(&c, "GET", &edge.admin_url("/objects?prefix=/"), &[], None).await;
    assert_eq!(r.status, 401, "{r:?}");
    for t in [PUSHER, PURGER] {
        let auth = bearer(t);
        let r = send(
            &c,
            "GET",
            &edge.admin_url("/objects?prefix=/"),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(r.status, 403, "{t}: {r:?}");
    }
    edge.stop().await;
}

/// `public_metrics = false`: `/metrics`, `/stats` and `/usage` need the read scope; `/healthz`
/// never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_metrics_need_the_read_scope() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        admin: "public_metrics = false",
        ..Default::default()
    };
    let edge = Edge::start(&origin, dir.path(), extra).await;
    let c = client();
    assert_eq!(
        send(&c, "GET", &edge.admin_url("/healthz"), &[], None)
            .await
            .status,
        200
    );
    for p in ["/metrics", "/stats", "/usage"] {
        let r = send(&c, "GET", &edge.admin_url(p), &[], None).await;
        assert_eq!(r.status, 401, "{p}: {r:?}");
        let auth = bearer(PURGER);
        let r = send(
            &c,
            "GET",
            &edge.admin_url(p),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(r.status, 403, "{p}: {r:?}");
        let auth = bearer(READER);
        let r = send(
            &c,
            "GET",
            &edge.admin_url(p),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{p}: {r:?}");
    }
    edge.stop().await;
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// The real binary with `RUST_LOG=debug`: requests with a right and a wrong token on the admin
/// port and with the data port's `PURGE`; after a clean stop, neither secret is in its logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs() {
    const RIGHT: &str = "logcheck-right-Q7w9Zk2mX4";
    const WRONG: &str = "logcheck-wrong-P3v8Hn6tY1";
    let origin = TestOrigin::start().await;
    origin.route(
        "/logged.txt",
        Reply::ok("logged").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let addr = free_addr();
    let mut admin = free_addr();
    while admin == addr {
        admin = free_addr();
    }
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\nadmin_listen = \"{admin}\"\norigin = \"{}\"\n[cache]\ndir = \"{}\"\n[admin]\ntokens = [{{ secret = \"{RIGHT}\", scopes = [\"purge\", \"push\", \"read\"] }}]\n",
            origin.base_url(),
            cache.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["edge", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .env_remove("OUTPOST_LOG_FORMAT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn outpost edge");
    let c = client();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "outpost edge exited early ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let up = c
            .get(format!("http://{admin}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up && TcpStream::connect(addr).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outpost edge did not come up:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let admin_url = |p: &str| format!("http://{admin}{p}");
    let data_url = |p: &str| format!("http://{addr}{p}");
    let right = bearer(RIGHT);
    let wrong = bearer(WRONG);
    let purge_body = || {
        Some(reqwest::Body::from(
            json!({ "urls": ["/logged.txt"] }).to_string(),
        ))
    };
    // Admin port.
    let r = send(
        &c,
        "POST",
        &admin_url("/purge"),
        &[("authorization", right.as_str())],
        purge_body(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        &c,
        "POST",
        &admin_url("/purge"),
        &[("authorization", wrong.as_str())],
        purge_body(),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = send(
        &c,
        "PUT",
        &admin_url("/objects/logged/a.txt"),
        &[("authorization", right.as_str())],
        Some("a".into()),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = send(
        &c,
        "PUT",
        &admin_url("/objects/logged/b.txt"),
        &[("authorization", wrong.as_str())],
        Some("b".into()),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = send(
        &c,
        "GET",
        &admin_url("/objects?prefix=/"),
        &[("authorization", wrong.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    // Data port.
    let r = send(&c, "GET", &data_url("/logged.txt"), &[("host", HOST)], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        &c,
        "PURGE",
        &data_url("/logged.txt"),
        &[("host", HOST), ("authorization", right.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        &c,
        "PURGE",
        &data_url("/logged.txt"),
        &[("host", HOST), ("authorization", wrong.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");

    // Stop it cleanly (SIGTERM) so every log line is written.
    let pid = child.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("run kill -TERM");
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the edge did not exit after SIGTERM")
        .expect("wait");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status}; log:\n{text}");
    // The logs are on (so the check means something) ...
    assert!(text.contains("purge applied"), "no purge log line:\n{text}");
    assert!(
        text.contains("admin request"),
        "no debug admin log line:\n{text}"
    );
    // ... and hold neither secret.
    for secret in [RIGHT, WRONG] {
        assert!(
            !text.contains(secret),
            "the token {secret:?} appears in the edge's logs:\n{}",
            text.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Push
// ---------------------------------------------------------------------------------------------

#[test]
fn the_sha256_helper_matches_a_known_vector() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// PUT → 201 with size and SHA-256 ETag; GET on the data port is a HIT with identical bytes and
/// no origin request; Range, HEAD and If-None-Match work; a second PUT replaces (200); after a
/// restart it is still a HIT with the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_object_is_served_as_a_hit_and_survives_a_restart() {
    let origin = TestOrigin::start().await;
    origin.route("/app/main.js", Reply::ok("from the origin"));
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let v1: Vec<u8> = (0..3000u32)
        .flat_map(|i| format!("console.log({i});\n").into_bytes())
        .take(3000)
        .collect();
    let etag1 = format!("\"{}\"", sha256_hex(&v1));

    let r = push(&c, &edge, "/app/main.js", &v1, &[]).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("etag"), Some(etag1.as_str()), "{r:?}");
    let receipt = r.json();
    assert_eq!(receipt["path"], json!("/app/main.js"), "{receipt}");
    assert_eq!(receipt["size"], json!(v1.len()), "{receipt}");
    assert_eq!(receipt["etag"], json!(etag1), "{receipt}");
    assert_eq!(receipt["created"], json!(true), "{receipt}");

    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!((r.status, r.x_cache()), (200, "HIT"), "{r:?}");
    assert_eq!(r.body.as_ref(), v1.as_slice(), "pushed bytes");
    assert_eq!(r.header("etag"), Some(etag1.as_str()));
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.contains("javascript")),
        "guessed Content-Type: {r:?}"
    );
    assert!(r.header("last-modified").is_some(), "{r:?}");
    // Again (now possibly from memory).
    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!((r.x_cache(), r.body.as_ref()), ("HIT", v1.as_slice()));

    // Range.
    let r = get_with(&c, &edge, "/app/main.js", &[("range", "bytes=10-19")]).await;
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(r.body.as_ref(), &v1[10..20]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 10-19/{}", v1.len()).as_str())
    );
    // HEAD.
    let r = send(
        &c,
        "HEAD",
        &edge.url("/app/main.js"),
        &[("host", HOST)],
        None,
    )
    .await;
    assert_eq!((r.status, r.x_cache()), (200, "HIT"), "{r:?}");
    assert!(r.body.is_empty());
    assert_eq!(
        r.header("content-length"),
        Some(v1.len().to_string().as_str())
    );
    assert_eq!(r.header("etag"), Some(etag1.as_str()));
    // Its own validators.
    let r = get_with(&c, &edge, "/app/main.js", &[("if-none-match", &etag1)]).await;
    assert_eq!(r.status, 304, "{r:?}");
    assert_eq!(
        origin.hits("/app/main.js"),
        0,
        "a pushed object never goes to the origin"
    );

    // Replace.
    let v2 = pattern(5000, 2);
    let etag2 = format!("\"{}\"", sha256_hex(&v2));
    let r = push(
        &c,
        &edge,
        "/app/main.js",
        &v2,
        &[("content-type", "application/javascript")],
    )
    .await;
    assert_eq!(r.status, 200, "replace: {r:?}");
    assert_eq!(r.json()["created"], json!(false));
    assert_eq!(r.header("etag"), Some(etag2.as_str()));
    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(r.body.as_ref(), v2.as_slice(), "the replacement is served");
    assert_eq!(r.header("etag"), Some(etag2.as_str()));
    edge.stop().await;

    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!(
        (r.status, r.x_cache()),
        (200, "HIT"),
        "after restart: {r:?}"
    );
    assert_eq!(r.body.as_ref(), v2.as_slice(), "after restart");
    assert_eq!(r.header("etag"), Some(etag2.as_str()));
    let listed = list(&c, &edge, "/app/").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["etag"], json!(etag2));
    assert_eq!(origin.hits("/app/main.js"), 0);
    edge.stop().await;
}

/// `max_push_size = "1KiB"`: a larger body (declared or streamed) gets 413 and nothing is
/// stored; exactly the limit is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_over_the_limit_is_413_and_stores_nothing() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/big.bin",
        Reply::ok("origin big").header("cache-control", "max-age=600"),
    );
    origin.route(
        "/streamed.bin",
        Reply::ok("origin streamed").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        admin: "max_push_size = \"1KiB\"",
        ..Default::default()
    };
    let edge = Edge::start(&origin, dir.path(), extra).await;
    let c = client();

    let r = push(&c, &edge, "/big.bin", &pattern(2048, 1), &[]).await;
    assert_eq!(r.status, 413, "declared length over the limit: {r:?}");
    // Without Content-Length (chunked): the limit holds while streaming.
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..4)
        .map(|i| Ok(Bytes::from(pattern(512, 10 + i))))
        .collect();
    let auth = bearer(ROOT);
    let r = send(
        &c,
        "PUT",
        &edge.admin_url("/objects/streamed.bin"),
        &[("authorization", auth.as_str())],
        Some(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        ))),
    )
    .await;
    assert_eq!(r.status, 413, "streamed body over the limit: {r:?}");

    assert!(list(&c, &edge, "/").await.is_empty(), "nothing stored");
    for (p, body) in [
        ("/big.bin", "origin big"),
        ("/streamed.bin", "origin streamed"),
    ] {
        let r = get(&c, &edge, p).await;
        assert_eq!(r.text(), body, "{p} must come from the origin: {r:?}");
        assert_ne!(r.x_cache(), "HIT", "{p}: {r:?}");
        assert_eq!(origin.hits(p), 1, "{p}");
    }
    // Exactly the limit is accepted.
    let r = push(&c, &edge, "/exact.bin", &pattern(1024, 3), &[]).await;
    assert_eq!(r.status, 201, "{r:?}");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_with_a_sha256_mismatch_is_400_and_stores_nothing() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/sum.txt",
        Reply::ok("origin sum").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let body = b"the real body".to_vec();
    let other = sha256_hex(b"something else");
    let r = push(&c, &edge, "/sum.txt", &body, &[("content-sha256", &other)]).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text().contains("SHA"), "{r:?}");
    let r = push(
        &c,
        &edge,
        "/sum.txt",
        &body,
        &[("content-sha256", "not-hex")],
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(list(&c, &edge, "/").await.is_empty(), "nothing stored");
    let r = get(&c, &edge, "/sum.txt").await;
    assert_eq!(r.text(), "origin sum", "{r:?}");
    assert_eq!(origin.hits("/sum.txt"), 1);
    // The right digest is accepted.
    let good = sha256_hex(&body);
    let r = push(&c, &edge, "/sum.txt", &body, &[("content-sha256", &good)]).await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = get(&c, &edge, "/sum.txt").await;
    assert_eq!((r.x_cache(), r.body.as_ref()), ("HIT", body.as_slice()));
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_with_traversal_or_bad_encoding_is_400() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for target in [
        "/objects/../x",
        "/objects/a/../../x",
        "/objects/a/%2e%2e/x",
        "/objects/./x",
        "/objects/a%00b",
        "/objects/a%2",
        "/objects/%ff.txt",
        "/objects/a//b",
    ] {
        let req = format!(
            "PUT {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ROOT}\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
            edge.admin
        );
        let (status, text) = raw(edge.admin, &req).await;
        assert_eq!(status, 400, "PUT {target}: {text}");
    }
    assert!(list(&c, &edge, "/").await.is_empty(), "nothing stored");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_list_pushed_objects() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/app/main.js",
        Reply::ok("origin main").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let objects: [(&str, Vec<u8>); 3] = [
        ("/app/main.js", b"main()".to_vec()),
        ("/app/css/site.css", b"body{}".to_vec()),
        ("/other/x.txt", b"x".to_vec()),
    ];
    for (p, body) in &objects {
        let r = push(&c, &edge, p, body, &[]).await;
        assert_eq!(r.status, 201, "{p}: {r:?}");
    }
    let listed = list(&c, &edge, "/app/").await;
    let paths: Vec<&str> = listed.iter().map(|o| o["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/app/css/site.css", "/app/main.js"], "{listed:?}");
    for o in &listed {
        let (_, body) = objects
            .iter()
            .find(|(p, _)| *p == o["path"].as_str().unwrap())
            .unwrap();
        assert_eq!(o["size"], json!(body.len()), "{o}");
        assert_eq!(o["etag"], json!(format!("\"{}\"", sha256_hex(body))), "{o}");
        assert!(o["pushed_at_ms"].as_u64().is_some_and(|t| t > 0), "{o}");
    }
    assert_eq!(list(&c, &edge, "/").await.len(), 3);

    let auth = bearer(ROOT);
    let r = send(
        &c,
        "DELETE",
        &edge.admin_url("/objects/app/main.js"),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = send(
        &c,
        "DELETE",
        &edge.admin_url("/objects/app/main.js"),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 404, "second DELETE: {r:?}");

    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!(
        r.text(),
        "origin main",
        "after DELETE the origin answers: {r:?}"
    );
    assert_eq!(r.x_cache(), "MISS", "{r:?}");
    assert_eq!(origin.hits("/app/main.js"), 1);
    let listed = list(&c, &edge, "/app/").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["path"], json!("/app/css/site.css"));
    // The others are still served.
    let r = get(&c, &edge, "/other/x.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "x"));
    edge.stop().await;
}

/// A hard purge that matches a pushed object removes it; a soft one serves it STALE while the
/// origin is asked, then the origin's version is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_apply_to_pushed_objects() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/p/hard.js",
        Reply::ok("origin hard").header("cache-control", "max-age=600"),
    );
    origin.route(
        "/p/soft.js",
        Reply::ok("origin soft").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let r = push(
        &c,
        &edge,
        "/p/hard.js",
        b"pushed hard",
        &[("surrogate-key", "release-1")],
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = push(&c, &edge, "/p/soft.js", b"pushed soft", &[]).await;
    assert_eq!(r.status, 201, "{r:?}");
    for p in ["/p/hard.js", "/p/soft.js"] {
        let r = get(&c, &edge, p).await;
        assert_eq!(r.x_cache(), "HIT", "{p}: {r:?}");
        r.assert_no_tags();
    }

    purge(&c, &edge, json!({ "tags": ["release-1"] })).await;
    let r = get(&c, &edge, "/p/hard.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("MISS", "origin hard"),
        "hard tag purge of a pushed object: {r:?}"
    );
    assert_eq!(origin.hits("/p/hard.js"), 1);
    let listed = list(&c, &edge, "/p/").await;
    assert_eq!(
        listed.len(),
        1,
        "the purged pushed object is no longer listed: {listed:?}"
    );

    purge(&c, &edge, json!({ "urls": ["/p/soft.js"], "soft": true })).await;
    let r = get(&c, &edge, "/p/soft.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "pushed soft"),
        "soft purge of a pushed object: {r:?}"
    );
    assert_eq!(origin.wait_hits("/p/soft.js", 1, WAIT).await, 1);
    let r = get_hit(&c, &edge, "/p/soft.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "origin soft"),
        "after the revalidation, the origin's version: {r:?}"
    );
    assert_eq!(origin.hits("/p/soft.js"), 1);
    edge.stop().await;
}

/// A soft purge of a pushed object that the origin answers with 304 (its file has not changed
/// since the push): the pushed object is current again, a HIT with no further origin request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purged_pushed_object_confirmed_by_304_is_a_hit_again() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/p/same.js", |req, _| {
        if req.header("if-modified-since").is_some() || req.header("if-none-match").is_some() {
            Reply::not_modified()
        } else {
            Reply::ok("origin copy").header("cache-control", "max-age=600")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let r = push(&c, &edge, "/p/same.js", b"pushed copy", &[]).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(get(&c, &edge, "/p/same.js").await.x_cache(), "HIT");

    purge(&c, &edge, json!({ "urls": ["/p/same.js"], "soft": true })).await;
    let r = get(&c, &edge, "/p/same.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "pushed copy"),
        "{r:?}"
    );
    assert_eq!(origin.wait_hits("/p/same.js", 1, WAIT).await, 1);
    let asked = origin.last_request("/p/same.js").expect("revalidation");
    assert!(
        asked.header("if-modified-since").is_some(),
        "the revalidation is conditional: {asked:?}"
    );
    let r = get_hit(&c, &edge, "/p/same.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "pushed copy"),
        "{r:?}"
    );
    for _ in 0..3 {
        assert_eq!(get(&c, &edge, "/p/same.js").await.x_cache(), "HIT");
    }
    assert_eq!(origin.hits("/p/same.js"), 1, "one revalidation, then hits");
    assert_eq!(
        list(&c, &edge, "/p/").await.len(),
        1,
        "still a pushed object"
    );
    edge.stop().await;
}

/// A small memory tier and disk tier under pressure from ~40 pulled objects of 32 KiB: pulled
/// objects are evicted, pushed ones never are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_pressure_never_evicts_pushed_objects() {
    let origin = TestOrigin::start().await;
    for i in 0..40u64 {
        let body = Bytes::from(pattern(32 * 1024, 100 + i));
        origin.route(
            &format!("/pull/{i}"),
            Reply::ok(body)
                .header("cache-control", "public, max-age=600")
                .header("content-type", "application/octet-stream"),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        cache: "memory = \"64KiB\"\ndisk = \"256KiB\"",
        ..Default::default()
    };
    let edge = Edge::start(&origin, dir.path(), extra).await;
    let c = client();
    // Small (fits the memory tier), medium, and larger than a pulled object.
    let pushed: Vec<(String, Vec<u8>)> = [(4 * 1024, 1u64), (24 * 1024, 2), (100 * 1024, 3)]
        .into_iter()
        .map(|(len, seed)| (format!("/pinned/{seed}.bin"), pattern(len, seed)))
        .collect();
    for (p, body) in &pushed {
        let r = push(&c, &edge, p, body, &[]).await;
        assert_eq!(r.status, 201, "{p}: {r:?}");
        let r = get(&c, &edge, p).await;
        assert_eq!(r.x_cache(), "HIT", "{p}: {r:?}");
    }
    for i in 0..40 {
        let r = get(&c, &edge, &format!("/pull/{i}")).await;
        assert_eq!((r.status, r.body.len()), (200, 32 * 1024), "/pull/{i}");
    }
    // The tiers really were under pressure: wait until the disk tier is back within its
    // bound after evicting.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        edge.engine().run_pending_tasks().await;
        let (_, disk_evictions) = edge.engine().evictions();
        let disk_bytes = edge.engine().usage()[1].2;
        if disk_evictions > 0 && disk_bytes <= 256 * 1024 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no disk eviction after 40 x 32 KiB into 256 KiB (usage {:?})",
            edge.engine().usage()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = get(&c, &edge, "/pull/0").await;
    assert_eq!(
        r.x_cache(),
        "MISS",
        "the oldest pulled object was evicted: {r:?}"
    );
    assert_eq!(origin.hits("/pull/0"), 2);

    for (p, body) in &pushed {
        for round in 0..2 {
            let r = get(&c, &edge, p).await;
            assert_eq!(
                (r.status, r.x_cache()),
                (200, "HIT"),
                "{p} round {round}: {r:?}"
            );
            assert_eq!(r.body.as_ref(), body.as_slice(), "{p} round {round}: bytes");
        }
        assert_eq!(origin.hits(p), 0, "{p} reached the origin");
    }
    assert_eq!(list(&c, &edge, "/pinned/").await.len(), 3);
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Versioned URLs and normalised query strings
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_urls_are_distinct_objects() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/app.js", |req, _| {
        Reply::ok(format!("served {}", req.target)).header("cache-control", "max-age=600")
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for v in ["3", "4"] {
        let r = get(&c, &edge, &format!("/app.js?v={v}")).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("MISS", format!("served /app.js?v={v}")),
            "{r:?}"
        );
    }
    assert_eq!(
        origin.hits("/app.js"),
        2,
        "two versions, two origin requests"
    );
    for v in ["3", "4"] {
        let r = get_hit(&c, &edge, &format!("/app.js?v={v}")).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("HIT", format!("served /app.js?v={v}")),
            "{r:?}"
        );
    }
    assert_eq!(origin.hits("/app.js"), 2);
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_and_reordered_query_params_collapse_to_one_key() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/p", |_, n| {
        Reply::ok(format!("p {n}")).header("cache-control", "max-age=600")
    });
    origin.route_fn("/q", |_, n| {
        Reply::ok(format!("q {n}")).header("cache-control", "max-age=600")
    });
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        cache: "ignore_query_params = [\"utm_source\"]",
        ..Default::default()
    };
    let edge = Edge::start(&origin, dir.path(), extra).await;
    let c = client();
    let r = get(&c, &edge, "/p?utm_source=a").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "p 0"));
    let r = get_hit(&c, &edge, "/p?utm_source=b").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "p 0"), "{r:?}");
    let r = get_hit(&c, &edge, "/p").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "p 0"), "{r:?}");
    assert_eq!(origin.hits("/p"), 1, "utm_source is not part of the key");
    // A parameter that is not ignored still is.
    let r = get(&c, &edge, "/p?utm_source=a&id=2").await;
    assert_eq!(r.x_cache(), "MISS", "{r:?}");
    assert_eq!(origin.hits("/p"), 2);
    // Order does not matter.
    assert_eq!(get(&c, &edge, "/q?a=1&b=2").await.x_cache(), "MISS");
    let r = get_hit(&c, &edge, "/q?b=2&a=1").await;
    assert_eq!(r.x_cache(), "HIT", "sorted parameters: {r:?}");
    assert_eq!(origin.hits("/q"), 1);
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_version_param_hides_it_from_the_origin() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/app.js", |req, n| {
        Reply::ok(format!("current {n} for {}", req.target)).header("cache-control", "max-age=600")
    });
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        cache: "strip_version_param = true",
        ..Default::default()
    };
    let edge = Edge::start(&origin, dir.path(), extra).await;
    let c = client();
    let r = get(&c, &edge, "/app.js?v=3").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("MISS", "current 0 for /app.js")
    );
    assert_eq!(origin.last_request("/app.js").unwrap().target, "/app.js");
    let r = get(&c, &edge, "/app.js?v=4&lang=en").await;
    assert_eq!(r.x_cache(), "MISS", "still a distinct object: {r:?}");
    assert_eq!(
        origin.last_request("/app.js").unwrap().target,
        "/app.js?lang=en",
        "only the version parameter is stripped"
    );
    let r = get_hit(&c, &edge, "/app.js?v=3").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "current 0 for /app.js")
    );
    assert_eq!(origin.hits("/app.js"), 2);
    edge.stop().await;
}

/// A versioned response without explicit freshness is cached thanks to `versioned_ttl`; the
/// same response without a version, or a versioned one with its own freshness, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_ttl_applies_to_versioned_responses_without_freshness() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/lib.js", |_, n| {
        Reply::ok(format!("lib {n}")).header("content-type", "application/javascript")
    });
    origin.route_fn("/own.js", |_, n| {
        Reply::ok(format!("own {n}")).header("cache-control", "max-age=0")
    });
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        cache: "versioned_ttl = \"30days\"",
        ..Default::default()
    };
    let edge = Edge::start(&origin, dir.path(), extra).await;
    let c = client();
    let r = get(&c, &edge, "/lib.js?v=7").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "lib 0"));
    let r = get_hit(&c, &edge, "/lib.js?v=7").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "lib 0"),
        "versioned_ttl: {r:?}"
    );
    assert_eq!(origin.hits("/lib.js"), 1);
    // The unversioned URL has no freshness: not served from cache as fresh.
    get(&c, &edge, "/lib.js").await;
    let r = get(&c, &edge, "/lib.js").await;
    assert_ne!(r.x_cache(), "HIT", "no version, no freshness: {r:?}");
    assert_eq!(origin.hits("/lib.js"), 3);
    // Explicit freshness wins over versioned_ttl.
    get(&c, &edge, "/own.js?v=1").await;
    let r = get(&c, &edge, "/own.js?v=1").await;
    assert_ne!(r.x_cache(), "HIT", "max-age=0 is explicit freshness: {r:?}");
    assert_eq!(origin.hits("/own.js"), 2);
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The CLI: `outpost push` and `outpost purge`
// ---------------------------------------------------------------------------------------------

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

async fn outpost(args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT * 2, run)
        .await
        .unwrap_or_else(|_| panic!("outpost {args:?} did not finish"))
        .expect("run outpost")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_push_of_a_directory_then_served_as_hits() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let site = tempfile::tempdir().unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("index.html", b"<h1>hi</h1>".to_vec()),
        ("css/site.css", b"body { color: red }".to_vec()),
        ("js/lib/app.js", b"console.log('app')".to_vec()),
        ("img/deep/er/logo.bin", pattern(70_000, 9)),
    ];
    for (rel, data) in &files {
        write(&site.path().join(rel), data);
    }
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let out = outpost(&[
        "push",
        "--admin",
        &format!("http://{}", edge.admin),
        "--token",
        PUSHER,
        "--prefix",
        "/static/",
        site.path().to_str().unwrap(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "outpost push failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("pushed 4 files"), "summary: {stdout}");
    for (rel, data) in &files {
        let p = format!("/static/{rel}");
        let r = get(&c, &edge, &p).await;
        assert_eq!((r.status, r.x_cache()), (200, "HIT"), "{p}: {r:?}");
        assert_eq!(r.body.as_ref(), data.as_slice(), "{p}: bytes");
        assert_eq!(
            r.header("etag"),
            Some(format!("\"{}\"", sha256_hex(data)).as_str()),
            "{p}"
        );
    }
    assert_eq!(origin.total_hits(), 0, "everything came from the push");
    assert_eq!(list(&c, &edge, "/static/").await.len(), files.len());

    // A token without the push scope: non-zero exit, nothing more stored.
    write(&site.path().join("new.txt"), b"new");
    let out = outpost(&[
        "push",
        "--admin",
        &format!("http://{}", edge.admin),
        "--token",
        READER,
        site.path().join("new.txt").to_str().unwrap(),
    ])
    .await;
    assert!(
        !out.status.success(),
        "push with a read-only token succeeded"
    );
    assert!(list(&c, &edge, "/new.txt").await.is_empty());
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_purge_by_tag_prints_a_receipt() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/t/one.txt", "t other");
    cacheable(&origin, "/t/two.txt", "other");
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in ["/t/one.txt", "/t/two.txt"] {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS");
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT");
    }
    settled(&edge, 2).await;
    let out = outpost(&[
        "purge",
        "--admin",
        &format!("http://{}", edge.admin),
        "--token",
        PURGER,
        "--tag",
        "t",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "outpost purge failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let receipt: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the receipt is not JSON ({e}): {stdout}"));
    assert!(receipt["seq"].as_u64().is_some_and(|s| s >= 1), "{receipt}");
    assert_eq!(receipt["kinds"], json!(["tag"]), "{receipt}");
    assert_eq!(receipt["soft"], json!(false), "{receipt}");
    let r = get(&c, &edge, "/t/one.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "/t/one.txt v1"));
    assert_eq!(get(&c, &edge, "/t/two.txt").await.x_cache(), "HIT");

    // A token without the purge scope: non-zero exit.
    let out = outpost(&[
        "purge",
        "--admin",
        &format!("http://{}", edge.admin),
        "--token",
        READER,
        "--all",
    ])
    .await;
    assert!(
        !out.status.success(),
        "purge with a read-only token succeeded"
    );
    assert_eq!(get(&c, &edge, "/t/two.txt").await.x_cache(), "HIT");
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// More of the issue: in-flight fills, hosts, reclaim, open admin, env token, large pushes
// ---------------------------------------------------------------------------------------------

/// A purge that lands while the object is being fetched covers what that fetch stores: the
/// next request after the fill is a MISS with the new content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_during_a_fill_covers_the_object_being_fetched() {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    for path in ["/inflight/url.txt", "/inflight/tag.txt"] {
        let gate = gate.clone();
        origin.route_fn(path, move |_, n| {
            let r = Reply::ok(format!("{path} v{n}"))
                .header("cache-control", "public, max-age=600")
                .header("surrogate-key", "inflight");
            if n == 0 { r.gated(&gate) } else { r }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let url = edge.url("/inflight/url.txt");
    let tag = edge.url("/inflight/tag.txt");
    let (c1, c2) = (c.clone(), c.clone());
    let first_url =
        tokio::spawn(async move { send(&c1, "GET", &url, &[("host", HOST)], None).await });
    let first_tag =
        tokio::spawn(async move { send(&c2, "GET", &tag, &[("host", HOST)], None).await });
    assert_eq!(origin.wait_hits("/inflight/url.txt", 1, WAIT).await, 1);
    assert_eq!(origin.wait_hits("/inflight/tag.txt", 1, WAIT).await, 1);
    purge(&c, &edge, json!({ "urls": ["/inflight/url.txt"] })).await;
    purge(&c, &edge, json!({ "tags": ["inflight"] })).await;
    gate.open();
    for (first, p) in [
        (first_url, "/inflight/url.txt"),
        (first_tag, "/inflight/tag.txt"),
    ] {
        let r = first.await.unwrap();
        assert_eq!((r.status, r.text()), (200, format!("{p} v0")), "{r:?}");
    }
    // Let the fills finish: the exact-URL purge cancelled its fill (nothing of it stays
    // stored); the tag-purged one is stored, but with a purge sequence the purge covers.
    edge.wait_disk_objects(1).await;
    for p in ["/inflight/url.txt", "/inflight/tag.txt"] {
        let r = get(&c, &edge, p).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("MISS", format!("{p} v1")),
            "{p}: fetched before the purge, stored after it: {r:?}"
        );
        assert_eq!(origin.hits(p), 2, "{p}");
    }
    edge.stop().await;
}

/// `http://host/...` purges one host's copies; a bare path or prefix purges every host's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_urls_and_prefixes_are_per_host() {
    const A: &str = "a.example.test";
    const B: &str = "b.example.test";
    let origin = TestOrigin::start().await;
    for p in ["/h1/x.txt", "/h2/x.txt", "/h3/x.txt"] {
        origin.route_fn(p, |req, n| {
            Reply::ok(format!("{} {n}", req.header("host").unwrap_or("?")))
                .header("cache-control", "max-age=600")
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let get_on = |host: &'static str, path: &'static str| {
        let c = c.clone();
        let url = edge.url(path);
        async move { send(&c, "GET", &url, &[("host", host)], None).await }
    };
    for p in ["/h1/x.txt", "/h2/x.txt", "/h3/x.txt"] {
        for h in [A, B] {
            assert_eq!(get_on(h, p).await.x_cache(), "MISS", "{h}{p}");
        }
        assert_eq!(origin.hits(p), 2, "{p}: one object per host");
    }
    settled(&edge, 6).await;
    for p in ["/h1/x.txt", "/h2/x.txt", "/h3/x.txt"] {
        for h in [A, B] {
            assert_eq!(get_on(h, p).await.x_cache(), "HIT", "{h}{p}");
        }
    }

    purge(
        &c,
        &edge,
        json!({ "urls": [format!("http://{A}/h1/x.txt")] }),
    )
    .await;
    assert_eq!(get_on(A, "/h1/x.txt").await.x_cache(), "MISS");
    assert_eq!(
        get_on(B, "/h1/x.txt").await.x_cache(),
        "HIT",
        "another host's copy"
    );
    assert_eq!(origin.hits("/h1/x.txt"), 3);

    purge(
        &c,
        &edge,
        json!({ "prefixes": [format!("http://{B}/h2/")] }),
    )
    .await;
    assert_eq!(get_on(B, "/h2/x.txt").await.x_cache(), "MISS");
    assert_eq!(
        get_on(A, "/h2/x.txt").await.x_cache(),
        "HIT",
        "another host's copy"
    );
    assert_eq!(origin.hits("/h2/x.txt"), 3);

    purge(&c, &edge, json!({ "prefixes": ["/h3/"] })).await;
    for h in [A, B] {
        assert_eq!(
            get_on(h, "/h3/x.txt").await.x_cache(),
            "MISS",
            "a bare prefix covers {h}"
        );
    }
    assert_eq!(origin.hits("/h3/x.txt"), 4);
    edge.stop().await;
}

/// A request that arrives after a hard purge was acknowledged is not answered from an origin
/// fetch that started before the purge (that is the purged version): it fetches anew. Whoever
/// was already waiting on the old fetch gets the old answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_a_purge_does_not_join_a_fetch_started_before_it() {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    for path in ["/join/url.txt", "/join/tag.txt"] {
        let gate = gate.clone();
        origin.route_fn(path, move |_, n| {
            let r = Reply::ok(format!("{path} v{n}"))
                .header("cache-control", "public, max-age=600")
                .header("surrogate-key", "joined");
            if n == 0 { r.gated(&gate) } else { r }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    // Requests held at the origin must outlive the waits below.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT * 3)
        .build()
        .unwrap();
    let spawn_get = |path: &'static str| {
        let c = c.clone();
        let url = edge.url(path);
        tokio::spawn(async move { send(&c, "GET", &url, &[("host", HOST)], None).await })
    };
    // Fetches in flight (held at the origin).
    let before_url = spawn_get("/join/url.txt");
    let before_tag = spawn_get("/join/tag.txt");
    assert_eq!(origin.wait_hits("/join/url.txt", 1, WAIT).await, 1);
    assert_eq!(origin.wait_hits("/join/tag.txt", 1, WAIT).await, 1);
    purge(&c, &edge, json!({ "urls": ["/join/url.txt"] })).await;
    purge(&c, &edge, json!({ "tags": ["joined"] })).await;
    // Requests after the purges.
    let after_url = spawn_get("/join/url.txt");
    let after_tag = spawn_get("/join/tag.txt");
    // Both should reach the origin while the old fetches are still held (one bounded wait,
    // shorter than the edge's 30 s first-byte timeout on the held fetches).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (origin.hits("/join/url.txt") < 2 || origin.hits("/join/tag.txt") < 2)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (fetched_url, fetched_tag) = (origin.hits("/join/url.txt"), origin.hits("/join/tag.txt"));
    gate.open();
    for (h, p, fetched) in [
        (after_url, "/join/url.txt", fetched_url),
        (after_tag, "/join/tag.txt", fetched_tag),
    ] {
        let r = h.await.unwrap();
        assert_eq!(
            (r.x_cache(), r.text(), fetched),
            ("MISS", format!("{p} v1"), 2),
            "{p}: a request sent after the purge got the pre-purge fetch (origin requests: \
             {fetched}): {r:?}"
        );
    }
    for (h, p) in [(before_url, "/join/url.txt"), (before_tag, "/join/tag.txt")] {
        assert_eq!(
            h.await.unwrap().text(),
            format!("{p} v0"),
            "{p}: in flight before"
        );
    }
    edge.stop().await;
}

/// Objects a hard tag or prefix purge made unreachable leave the disk tier without any request
/// for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purges_are_reclaimed_from_disk_in_the_background() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/rc/1.txt", "reclaim");
    cacheable(&origin, "/rc/2.txt", "reclaim");
    cacheable(&origin, "/rc/3.txt", "");
    cacheable(&origin, "/keep/4.txt", "");
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in ["/rc/1.txt", "/rc/2.txt", "/rc/3.txt", "/keep/4.txt"] {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS");
    }
    settled(&edge, 4).await;
    purge(&c, &edge, json!({ "tags": ["reclaim"] })).await;
    purge(&c, &edge, json!({ "prefixes": ["/rc/"] })).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        edge.engine().run_pending_tasks().await;
        let disk = edge.engine().usage()[1].1;
        if disk == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the disk tier still holds {disk} objects; 3 of 4 were hard-purged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&c, &edge, "/keep/4.txt").await.x_cache(), "HIT");
    edge.stop().await;
}

/// Without any token, the admin API may only listen on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_admin_api_refuses_a_non_loopback_address() {
    if std::env::var_os("OUTPOST_ADMIN_TOKEN").is_some() {
        eprintln!("skipped: OUTPOST_ADMIN_TOKEN is set in this environment");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = |admin: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"{admin}\"\norigin = \"http://127.0.0.1:9\"\n[cache]\ndir = \"{}\"\n",
            dir.path().display()
        )
    };
    let cfg = EdgeConfig::from_source(
        &Source::inline("e.toml", text("0.0.0.0:0")),
        Default::default(),
    )
    .unwrap();
    match EdgeServer::bind(cfg).await {
        Err(e) => assert!(e.to_string().contains("without a token"), "{e}"),
        Ok(_) => panic!("an admin API without a token started on 0.0.0.0"),
    }
    let cfg = EdgeConfig::from_source(
        &Source::inline("e.toml", text("127.0.0.1:0")),
        Default::default(),
    )
    .unwrap();
    assert!(
        EdgeServer::bind(cfg).await.is_ok(),
        "loopback without a token is allowed"
    );
}

/// The binary takes its admin token from `OUTPOST_ADMIN_TOKEN` (edge and CLI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_can_come_from_the_environment() {
    const ENV_TOKEN: &str = "env-token-9Kq2Lm5Xz8";
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/env.txt", "env");
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut admin = free_addr();
    while admin == addr {
        admin = free_addr();
    }
    let log = dir.path().join("stderr.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args([
            "edge",
            "--origin",
            &origin.base_url(),
            "--listen",
            &addr.to_string(),
        ])
        .args(["--admin-listen", &admin.to_string(), "--cache-dir"])
        .arg(dir.path().join("cache"))
        .env("OUTPOST_ADMIN_TOKEN", ENV_TOKEN)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn outpost edge");
    let c = client();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "outpost edge exited early ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let up = c
            .get(format!("http://{admin}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up && TcpStream::connect(addr).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outpost edge did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let data = |p: &str| format!("http://{addr}{p}");
    let r = send(&c, "GET", &data("/env.txt"), &[("host", HOST)], None).await;
    assert_eq!(r.x_cache(), "MISS");
    // Without a token: 401 (a configured env token closes the API).
    let r = send(
        &c,
        "POST",
        &format!("http://{admin}/purge"),
        &[],
        Some(json!({ "all": true }).to_string().into()),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    // The CLI reads the same variable.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args([
            "purge",
            "--admin",
            &format!("http://{admin}"),
            "--tag",
            "env",
        ])
        .env("OUTPOST_ADMIN_TOKEN", ENV_TOKEN)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "outpost purge with the env token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = send(&c, "GET", &data("/env.txt"), &[("host", HOST)], None).await;
    assert_eq!(r.x_cache(), "MISS", "purged with the env token: {r:?}");
    assert_eq!(origin.hits("/env.txt"), 2);
    drop(child);
}

/// A large push streamed in chunks (no Content-Length) is stored whole and served back
/// byte-identical, Range included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_streamed_push_is_served_back_identical() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let data = Bytes::from(pattern(12 << 20, 77));
    let sum = sha256_hex(&data);
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(256 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let auth = bearer(ROOT);
    let r = send(
        &c,
        "PUT",
        &edge.admin_url("/objects/big/blob.bin"),
        &[
            ("authorization", auth.as_str()),
            ("content-sha256", sum.as_str()),
        ],
        Some(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        ))),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["size"], json!(data.len()));
    let r = get(&c, &edge, "/big/blob.bin").await;
    assert_eq!((r.status, r.x_cache()), (200, "HIT"));
    assert_eq!(r.body.len(), data.len());
    assert!(r.body == data, "the streamed push came back different");
    let last = data.len() - 1;
    let r = get_with(&c, &edge, "/big/blob.bin", &[("range", "bytes=-100")]).await;
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(r.body.as_ref(), &data[last - 99..]);
    assert_eq!(origin.total_hits(), 0);
    edge.stop().await;
}
