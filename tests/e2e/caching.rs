//! HTTP caching by the edge (`outpost-edge`): a real `EdgeServer` on 127.0.0.1:0 in front of
//! the programmable test origin (`tests/support/test_origin.rs`), driven by reqwest (HTTP/1.1 and h2c)
//! and, for malformed traffic, by raw TCP.
//!
//! Hits are proved by counting origin requests. Time that matters to caching moves through the
//! edge's manual clock (`Clock::advance`), never by sleeping; every wait is a bounded poll.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use outpost_edge::EdgeConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::support::edge::{Clock, Edge, loopback_config};
use crate::support::files::{bytes_under, files_under, pattern, rewrite_in_place};
use crate::support::http::{get, get_hit, raw_exchange, send};
use crate::support::test_origin::{Gate, Reply, TestOrigin};
use crate::support::{client_within, eventually, h2c_client};

/// Upper bound of every poll loop and client request.
const WAIT: Duration = Duration::from_secs(20);

const LAST_MODIFIED: &str = "Tue, 01 Jul 2025 10:00:00 GMT";

/// The cache key includes the Host: tests that restart the edge (on a new port) send this one.
const HOST: (&str, &str) = ("host", "cdn.example.test");

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

fn base_config(origin: SocketAddr) -> EdgeConfig {
    let mut cfg = loopback_config("edge-test.toml", origin, "");
    cfg.memory = 64 << 20;
    cfg.drain_timeout = Duration::from_secs(5);
    cfg.upstream_connect_timeout = Duration::from_secs(3);
    cfg.upstream_first_byte_timeout = Duration::from_secs(15);
    cfg
}

/// An edge with a manual clock and no disk tier.
async fn start_edge(origin: &TestOrigin) -> Edge {
    start_edge_with(origin.addr(), |_| {}).await
}

/// An edge with a manual clock whose config `tweak` adjusts (cache_dir, sizes, limits).
async fn start_edge_with(origin: SocketAddr, tweak: impl FnOnce(&mut EdgeConfig)) -> Edge {
    let mut cfg = base_config(origin);
    tweak(&mut cfg);
    Edge::start_with_clock(cfg, Clock::manual()).await
}

fn client() -> reqwest::Client {
    client_within(WAIT)
}

fn cacheable(body: impl Into<Bytes>, cc: &str) -> Reply {
    Reply::ok(body)
        .header("content-type", "application/octet-stream")
        .header("cache-control", cc)
}

/// Settings of an edge on `dir` whose memory tier holds objects up to 128 KiB (memory/8): a
/// larger one streams from disk.
fn streams_from_disk(dir: &Path) -> impl Fn(&mut EdgeConfig) + Copy + '_ {
    move |c: &mut EdgeConfig| {
        c.cache_dir = Some(dir.to_path_buf());
        c.memory = 1 << 20;
    }
}

/// Overwrites every cached body under `<cache_dir>/content/content-v2/` with garbage of the
/// same length; returns how many files it damaged.
fn corrupt_content(cache_dir: &Path) -> usize {
    let files = files_under(&cache_dir.join("content").join("content-v2"));
    for f in &files {
        let len = std::fs::metadata(f).expect("content file").len() as usize;
        rewrite_in_place(f, &vec![b'#'; len]);
    }
    files.len()
}

// ---------------------------------------------------------------------------------------------
// Freshness and revalidation
// ---------------------------------------------------------------------------------------------

/// Fresh → HIT with no origin request; after max-age → conditional request upstream carrying
/// If-None-Match and If-Modified-Since → 304 → REVALIDATED with the stored body and the headers
/// updated per RFC 9111 §4.3.4; the next request is a HIT with the updated headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_hit_then_304_revalidation_updates_stored_headers() {
    let origin = TestOrigin::start().await;
    origin.route_seq(
        "/page",
        vec![
            cacheable("stored body v1", "max-age=10")
                .header("etag", "\"v1\"")
                .header("last-modified", LAST_MODIFIED)
                .header("x-old", "kept"),
            Reply::not_modified()
                .header("cache-control", "max-age=100")
                .header("etag", "\"v1\"")
                .header("x-new", "from-304"),
        ],
    );
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/page");

    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(r.text(), "stored body v1");

    let r = get_hit(&c, &url, &[]).await;
    assert_eq!(r.x_cache(), "HIT", "fresh object: {r:?}");
    assert_eq!(r.text(), "stored body v1");
    assert_eq!(
        origin.hits("/page"),
        1,
        "a fresh hit must not reach the origin"
    );
    assert!(
        r.header("cache-status").is_some_and(|v| v.contains("hit")),
        "{r:?}"
    );

    edge.advance(11);
    let r = get(&c, &url, &[]).await;
    assert_eq!(
        origin.hits("/page"),
        2,
        "a stale object is revalidated upstream"
    );
    let cond = origin.last_request("/page").unwrap();
    assert_eq!(cond.method, "GET");
    assert_eq!(cond.header("if-none-match"), Some("\"v1\""), "{cond:?}");
    assert_eq!(
        cond.header("if-modified-since"),
        Some(LAST_MODIFIED),
        "{cond:?}"
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "REVALIDATED", "{r:?}");
    assert_eq!(r.text(), "stored body v1", "the stored body answers a 304");
    assert_eq!(
        r.header("x-new"),
        Some("from-304"),
        "a new header from the 304 appears"
    );
    assert_eq!(
        r.header("x-old"),
        Some("kept"),
        "headers the 304 lacks are kept"
    );
    let cc: Vec<_> = r.headers.get_all("cache-control").iter().collect();
    assert_eq!(
        cc,
        ["max-age=100"],
        "Cache-Control is replaced by the 304's"
    );

    let r = get_hit(&c, &url, &[]).await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(r.text(), "stored body v1");
    assert_eq!(
        r.header("x-new"),
        Some("from-304"),
        "updated headers are stored"
    );
    assert_eq!(r.header("cache-control"), Some("max-age=100"));
    assert_eq!(origin.hits("/page"), 2);
}

/// A new 200 on revalidation replaces the stored object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidation_answered_with_200_replaces_the_object() {
    let origin = TestOrigin::start().await;
    origin.route_seq(
        "/doc",
        vec![
            cacheable("version one", "max-age=10").header("etag", "\"one\""),
            cacheable("version two, longer", "max-age=100").header("etag", "\"two\""),
        ],
    );
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/doc");
    assert_eq!(get(&c, &url, &[]).await.text(), "version one");
    assert_eq!(get_hit(&c, &url, &[]).await.x_cache(), "HIT");

    edge.advance(11);
    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "version two, longer");
    assert_eq!(r.header("etag"), Some("\"two\""));
    assert_eq!(
        origin.last_request("/doc").unwrap().header("if-none-match"),
        Some("\"one\"")
    );

    let r = get_hit(&c, &url, &[]).await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(
        r.text(),
        "version two, longer",
        "the new 200 replaced the object"
    );
    assert_eq!(r.header("etag"), Some("\"two\""));
    assert_eq!(origin.hits("/doc"), 2);
}

/// stale-while-revalidate: a stale object is served at once (X-Cache: STALE) while exactly one
/// background revalidation reaches the origin; later requests are HITs with the new content.
/// The origin holds the revalidation's answer until the test has seen the STALE answers, so
/// "served immediately" does not depend on timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_revalidates_once() {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    origin.route_seq(
        "/swr",
        vec![
            cacheable("old content", "max-age=1, stale-while-revalidate=60")
                .header("etag", "\"old\""),
            cacheable("new content", "max-age=600")
                .header("etag", "\"new\"")
                .gated(&gate),
        ],
    );
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/swr");
    assert_eq!(get(&c, &url, &[]).await.text(), "old content");
    assert_eq!(get_hit(&c, &url, &[]).await.x_cache(), "HIT");
    assert_eq!(origin.hits("/swr"), 1);

    edge.advance(5);
    // The origin does not answer the revalidation until the gate opens: these must all be
    // answered from the stale copy.
    for i in 0..5 {
        let r = get(&c, &url, &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "STALE", "request {i}: {r:?}");
        assert_eq!(r.text(), "old content");
    }
    let n = origin.wait_hits("/swr", 2, WAIT).await;
    assert_eq!(n, 2, "exactly one background revalidation");
    assert_eq!(
        origin.last_request("/swr").unwrap().header("if-none-match"),
        Some("\"old\""),
        "the background revalidation is conditional"
    );
    gate.open();

    // Until the revalidation lands, answers are STALE (old) or already HIT (new).
    let deadline = tokio::time::Instant::now() + WAIT;
    let r = loop {
        let r = get(&c, &url, &[]).await;
        match r.x_cache() {
            "HIT" => break r,
            "STALE" => assert_eq!(r.text(), "old content"),
            other => panic!("unexpected X-Cache {other}: {r:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revalidated object never became a HIT"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(r.text(), "new content");
    assert_eq!(r.header("etag"), Some("\"new\""));
    assert_eq!(origin.hits("/swr"), 2, "no second revalidation");
}

/// stale-if-error with a dead origin: STALE with the old body inside the window (repeatedly),
/// then 502 with a short plain-text body naming the failure beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_with_dead_origin_then_502_beyond_window() {
    let mut origin = TestOrigin::start().await;
    origin.route(
        "/sie",
        cacheable("last good body", "max-age=1, stale-if-error=60"),
    );
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/sie");
    assert_eq!(get(&c, &url, &[]).await.x_cache(), "MISS");
    assert_eq!(get_hit(&c, &url, &[]).await.x_cache(), "HIT");

    origin.stop().await;
    edge.advance(5);
    for i in 0..2 {
        let r = get(&c, &url, &[]).await;
        assert_eq!(r.status, 200, "request {i} inside the window: {r:?}");
        assert_eq!(r.x_cache(), "STALE", "request {i}: {r:?}");
        assert_eq!(r.text(), "last good body");
    }

    edge.advance(120);
    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status, 502, "beyond the stale-if-error window: {r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{r:?}"
    );
    assert!(r.body.len() < 1024, "short body: {}", r.text());
    assert!(
        r.text().contains("the origin could not be reached"),
        "the body names the failure, not the internal error chain: {}",
        r.text()
    );
    assert!(!r.text().contains("last good body"));
}

/// stale-if-error with an origin that answers 500: the stale object is served inside the
/// window, and keeps being served for a second error inside the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_with_origin_500() {
    let origin = TestOrigin::start().await;
    origin.route_seq(
        "/sie500",
        vec![
            cacheable("good body", "max-age=1, stale-if-error=60"),
            Reply::new(500)
                .header("content-type", "text/plain")
                .body("origin exploded"),
        ],
    );
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/sie500");
    assert_eq!(get(&c, &url, &[]).await.x_cache(), "MISS");
    assert_eq!(get_hit(&c, &url, &[]).await.x_cache(), "HIT");

    edge.advance(5);
    let r = get(&c, &url, &[]).await;
    assert_eq!(origin.hits("/sie500"), 2);
    assert_eq!(r.status, 200, "first 500 inside the window: {r:?}");
    assert_eq!(r.x_cache(), "STALE");
    assert_eq!(r.text(), "good body");

    let r = get(&c, &url, &[]).await;
    assert_eq!(
        r.status,
        200,
        "a second 500 inside the window must still be answered stale (got {} {:?}: {})",
        r.status,
        r.x_cache(),
        r.text()
    );
    assert_eq!(r.x_cache(), "STALE");
    assert_eq!(r.text(), "good body");
}

/// No stale-if-error and `stale_on_error` off: a dead origin is a 502 (connect error), not a
/// hang, for a cold key and for a stale stored object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_origin_without_stale_if_error_is_502() {
    let mut origin = TestOrigin::start().await;
    origin.route("/plain", cacheable("body", "max-age=1"));
    let edge = start_edge_with(origin.addr(), |c| c.stale_on_error = Duration::ZERO).await;
    let c = client();
    assert_eq!(get(&c, &edge.url("/plain"), &[]).await.x_cache(), "MISS");

    origin.stop().await;
    let r = get(&c, &edge.url("/cold"), &[]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.text().contains("the origin could not be reached"),
        "{}",
        r.text()
    );

    edge.advance(5);
    let r = get(&c, &edge.url("/plain"), &[]).await;
    assert_eq!(r.status, 502, "stale without stale-if-error: {r:?}");
    assert!(
        r.text().contains("the origin could not be reached"),
        "{}",
        r.text()
    );
    assert_ne!(r.text(), "body");
}

/// RFC 9111 §4.2.4, by default: a stale copy stands in for a dead origin for `stale_on_error`
/// (60 s) past its freshness, marked STALE, but never under must-revalidate, and never later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_origin_is_bridged_by_a_stale_copy_for_stale_on_error() {
    let mut origin = TestOrigin::start().await;
    origin.route("/plain", cacheable("body", "max-age=1"));
    origin.route("/strict", cacheable("strict", "max-age=1, must-revalidate"));
    let edge = start_edge(&origin).await;
    let c = client();
    assert_eq!(get(&c, &edge.url("/plain"), &[]).await.x_cache(), "MISS");
    assert_eq!(get(&c, &edge.url("/strict"), &[]).await.x_cache(), "MISS");

    origin.stop().await;
    edge.advance(5);
    let r = get(&c, &edge.url("/plain"), &[]).await;
    assert_eq!((r.status, r.x_cache()), (200, "STALE"), "{r:?}");
    assert_eq!(r.text(), "body");
    let strict = get(&c, &edge.url("/strict"), &[]).await;
    assert_eq!(
        strict.status, 502,
        "must-revalidate forbids stale: {strict:?}"
    );

    edge.advance(120);
    let r = get(&c, &edge.url("/plain"), &[]).await;
    assert_eq!(r.status, 502, "past stale_on_error: {r:?}");
}

// ---------------------------------------------------------------------------------------------
// Vary
// ---------------------------------------------------------------------------------------------

/// `Vary: Accept-Language`: en and de are cached separately (two origin requests, then HITs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_variants_are_cached_separately() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/greeting", |req, _| {
        let lang = req.header("accept-language").unwrap_or("none").to_string();
        cacheable(format!("hello in {lang}"), "max-age=600").header("vary", "Accept-Language")
    });
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/greeting");
    let en = [("accept-language", "en")];
    let de = [("accept-language", "de")];

    let r = get(&c, &url, &en).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "hello in en"));
    let r = get_hit(&c, &url, &en).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "hello in en"));
    let r = get(&c, &url, &de).await;
    assert_eq!(r.text(), "hello in de", "another variant is not served en");
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(origin.hits("/greeting"), 2);

    let r = get_hit(&c, &url, &de).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "hello in de"));
    let r = get_hit(&c, &url, &en).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "hello in en"));
    assert_eq!(origin.hits("/greeting"), 2);
}

/// `Vary: *` is never served from cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_star_is_never_served_from_cache() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/star", |_, n| {
        cacheable(format!("answer {n}"), "max-age=600").header("vary", "*")
    });
    let edge = start_edge(&origin).await;
    let c = client();
    for i in 0..3 {
        let r = get(&c, &edge.url("/star"), &[]).await;
        assert_eq!(r.text(), format!("answer {i}"));
        assert_ne!(r.x_cache(), "HIT");
    }
    assert_eq!(origin.hits("/star"), 3);
}

// ---------------------------------------------------------------------------------------------
// Range and HEAD
// ---------------------------------------------------------------------------------------------

/// Range on a cached object → 206 with the right bytes and Content-Range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_on_cached_object_is_206() {
    let body = pattern(100_000, 1);
    let origin = TestOrigin::start().await;
    origin.route("/bin", cacheable(body.clone(), "max-age=600"));
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/bin");
    assert_eq!(get(&c, &url, &[]).await.body, body);
    assert_eq!(get_hit(&c, &url, &[]).await.x_cache(), "HIT");

    let r = get(&c, &url, &[("range", "bytes=1000-1999")]).await;
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(r.header("content-range"), Some("bytes 1000-1999/100000"));
    assert_eq!(r.header("content-length"), Some("1000"));
    assert_eq!(r.body, body.slice(1000..2000));

    let r = get(&c, &url, &[("range", "bytes=-500")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 99500-99999/100000"));
    assert_eq!(r.body, body.slice(99_500..));

    let r = get(&c, &url, &[("range", "bytes=99990-")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, body.slice(99_990..));
    assert_eq!(origin.hits("/bin"), 1);
}

/// Range on a miss: the origin gets a request WITHOUT Range (whole object fetched once), the
/// client gets 206; the whole object is then a HIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_on_miss_fetches_whole_object_once() {
    let body = pattern(200_000, 2);
    let origin = TestOrigin::start().await;
    origin.route(
        "/bin",
        cacheable(body.clone(), "max-age=600").slow_body(16 * 1024, Duration::from_millis(2)),
    );
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/bin");

    let r = get(&c, &url, &[("range", "bytes=50000-50099")]).await;
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(r.header("content-range"), Some("bytes 50000-50099/200000"));
    assert_eq!(r.body, body.slice(50_000..50_100));
    let up = origin.last_request("/bin").unwrap();
    assert!(
        up.header("range").is_none(),
        "the edge fetches the whole object: {up:?}"
    );

    let r = get_hit(&c, &url, &[]).await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(r.body, body);
    assert_eq!(origin.hits("/bin"), 1, "the whole object was fetched once");
}

/// An unsatisfiable range → 416 with `Content-Range: bytes */len`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_range_is_416() {
    let origin = TestOrigin::start().await;
    origin.route("/small", cacheable("0123456789", "max-age=600"));
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/small");
    assert_eq!(get(&c, &url, &[]).await.text(), "0123456789");
    let r = get(&c, &url, &[("range", "bytes=100-200")]).await;
    assert_eq!(r.status, 416, "{r:?}");
    assert_eq!(r.header("content-range"), Some("bytes */10"));
    assert!(!r.text().contains("0123456789"));
    assert_eq!(origin.hits("/small"), 1);
}

/// HEAD is answered from a stored GET: no origin request, no body, Content-Length present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_answered_from_stored_get() {
    let origin = TestOrigin::start().await;
    origin.route("/h", cacheable(pattern(4321, 3), "max-age=600"));
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/h");
    assert_eq!(get(&c, &url, &[]).await.body.len(), 4321);
    assert_eq!(get_hit(&c, &url, &[]).await.x_cache(), "HIT");

    let r = send(&c, "HEAD", &url, &[], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("4321"), "{r:?}");
    assert_eq!(origin.hits("/h"), 1);
}

/// HEAD on a miss fills the cache (the origin sees a GET); the next GET is a HIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_miss_fills_the_cache() {
    let body = pattern(5000, 4);
    let origin = TestOrigin::start().await;
    origin.route("/h", cacheable(body.clone(), "max-age=600"));
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/h");

    let r = send(&c, "HEAD", &url, &[], None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("5000"), "{r:?}");
    assert_eq!(origin.hits("/h"), 1);
    assert_eq!(origin.last_request("/h").unwrap().method, "GET");

    let r = get_hit(&c, &url, &[]).await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(r.body, body);
    assert_eq!(origin.hits("/h"), 1);
}

// ---------------------------------------------------------------------------------------------
// Coalescing
// ---------------------------------------------------------------------------------------------

/// 200 concurrent requests for one cold key whose origin is slow (300 ms before the head, a
/// 256 KiB body in chunks): exactly one origin request, every client gets identical bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_storm_makes_one_origin_request() {
    let body = pattern(256 * 1024, 5);
    let origin = TestOrigin::start().await;
    origin.route(
        "/hot",
        cacheable(body.clone(), "max-age=600")
            .head_delay(Duration::from_millis(300))
            .slow_body(16 * 1024, Duration::from_millis(5)),
    );
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/hot");
    let mut set = JoinSet::new();
    for _ in 0..200 {
        let c = c.clone();
        let url = url.clone();
        set.spawn(async move { get(&c, &url, &[]).await });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        let r = r.expect("client task");
        assert_eq!(r.status, 200);
        assert!(
            r.body == body,
            "client got different bytes ({} bytes)",
            r.body.len()
        );
        n += 1;
    }
    assert_eq!(n, 200);
    assert_eq!(origin.hits("/hot"), 1, "one origin request for the storm");
}

/// An uncacheable response (no-store, then private) met while coalescing: every client gets
/// its own correct answer, never another client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_response_while_coalescing_is_not_shared() {
    for cc in ["no-store", "private, max-age=600"] {
        let origin = TestOrigin::start().await;
        origin.route_fn("/me", move |req, _| {
            let who = req.header("x-client").unwrap_or("nobody").to_string();
            Reply::ok(format!("personal answer for {who}"))
                .header("cache-control", cc)
                .head_delay(Duration::from_millis(300))
        });
        let edge = start_edge(&origin).await;
        let c = client();
        let url = edge.url("/me");
        const N: usize = 20;
        let mut set = JoinSet::new();
        for i in 0..N {
            let c = c.clone();
            let url = url.clone();
            set.spawn(async move {
                let id = format!("client-{i}");
                let r = get(&c, &url, &[("x-client", &id)]).await;
                (id, r)
            });
        }
        while let Some(res) = set.join_next().await {
            let (id, r) = res.expect("client task");
            assert_eq!(r.status, 200, "{cc}: {r:?}");
            assert_eq!(
                r.text(),
                format!("personal answer for {id}"),
                "{cc}: a client was served another's response"
            );
            assert_ne!(r.x_cache(), "HIT", "{cc}");
        }
        assert_eq!(origin.hits("/me"), N, "{cc}: each client's own request");
    }
}

// ---------------------------------------------------------------------------------------------
// Set-Cookie, request directives, unsafe methods
// ---------------------------------------------------------------------------------------------

/// `Cache-Control: public, max-age=60` + Set-Cookie: stored, and a second client gets the body
/// without the cookie. Without `public`: not stored, both requests reach the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_is_never_shared() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/public",
        cacheable("with cookie", "public, max-age=60").header("set-cookie", "sid=secret-1"),
    );
    origin.route(
        "/nonpublic",
        cacheable("with cookie", "max-age=60").header("set-cookie", "sid=secret-2"),
    );
    let edge = start_edge(&origin).await;
    let c = client();

    let r = get(&c, &edge.url("/public"), &[]).await;
    assert_eq!(
        r.header("set-cookie"),
        Some("sid=secret-1"),
        "the filler gets it"
    );
    let r = get_hit(&c, &edge.url("/public"), &[]).await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(r.text(), "with cookie");
    assert!(
        r.header("set-cookie").is_none(),
        "a stored Set-Cookie was served to another client: {r:?}"
    );
    assert_eq!(origin.hits("/public"), 1);

    for _ in 0..2 {
        let r = get(&c, &edge.url("/nonpublic"), &[]).await;
        assert_eq!(r.text(), "with cookie");
        assert_ne!(r.x_cache(), "HIT");
        assert_eq!(r.header("set-cookie"), Some("sid=secret-2"));
    }
    assert_eq!(origin.hits("/nonpublic"), 2, "not stored without public");
}

/// Request `Cache-Control: only-if-cached` on a miss → 504, nothing sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_only_if_cached_on_miss_is_504() {
    let origin = TestOrigin::start().await;
    origin.route("/x", cacheable("x", "max-age=600"));
    let edge = start_edge(&origin).await;
    let c = client();
    let r = get(&c, &edge.url("/x"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(origin.hits("/x"), 0);
    // Once stored, only-if-cached is answered.
    get(&c, &edge.url("/x"), &[]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = get(&c, &edge.url("/x"), &[("cache-control", "only-if-cached")]).await;
        if r.status == 200 {
            assert_eq!(r.text(), "x");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(origin.hits("/x"), 1);
}

/// Request `Cache-Control: no-cache` → the fresh stored object is revalidated upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_no_cache_revalidates_upstream() {
    let origin = TestOrigin::start().await;
    origin.route_seq(
        "/nc",
        vec![
            cacheable("stored", "max-age=600").header("etag", "\"nc\""),
            Reply::not_modified()
                .header("etag", "\"nc\"")
                .header("cache-control", "max-age=600"),
        ],
    );
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/nc");
    get(&c, &url, &[]).await;
    assert_eq!(get_hit(&c, &url, &[]).await.x_cache(), "HIT");

    let r = get(&c, &url, &[("cache-control", "no-cache")]).await;
    assert_eq!(origin.hits("/nc"), 2, "no-cache goes upstream");
    assert_eq!(
        origin.last_request("/nc").unwrap().header("if-none-match"),
        Some("\"nc\"")
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "REVALIDATED", "{r:?}");
    assert_eq!(r.text(), "stored");
}

/// Request `Cache-Control: no-store` → the response is not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_no_store_is_not_stored() {
    let origin = TestOrigin::start().await;
    origin.route("/ns", cacheable("body", "max-age=600"));
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/ns");
    let r = get(&c, &url, &[("cache-control", "no-store")]).await;
    assert_eq!(r.text(), "body");
    assert_ne!(r.x_cache(), "HIT");
    let r = get(&c, &url, &[]).await;
    assert_eq!(r.x_cache(), "MISS", "nothing was stored: {r:?}");
    assert_eq!(origin.hits("/ns"), 2);
    assert_eq!(get_hit(&c, &url, &[]).await.x_cache(), "HIT");
    assert_eq!(origin.hits("/ns"), 2);
}

/// A client that has just read a whole MISS and asks again gets a HIT: the memory copy is
/// visible before the body's last bytes are released to readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_right_after_a_miss_is_a_hit() {
    let origin = TestOrigin::start().await;
    for i in 0..40 {
        origin.route(
            &format!("/again/{i}"),
            cacheable(pattern(3000 + i, i as u64), "max-age=600"),
        );
    }
    let edge = start_edge(&origin).await;
    let c = client();
    for i in 0..40 {
        let url = edge.url(&format!("/again/{i}"));
        let first = get(&c, &url, &[]).await;
        assert_eq!(first.x_cache(), "MISS", "{i}");
        let again = get(&c, &url, &[]).await;
        assert_eq!(
            again.x_cache(),
            "HIT",
            "request {i} right after its MISS: {again:?}"
        );
        assert_eq!(again.body, first.body);
    }
    assert_eq!(origin.hits("/again/0"), 1);
}

/// The same for an object that only the disk tier keeps: a request that arrives after the fill
/// finished but before its disk copy is committed waits for the commit, then is a HIT. (Such a
/// request once waited forever: nothing woke it when the commit landed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_right_after_a_disk_only_miss_is_a_hit() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    for i in 0..30 {
        origin.route(
            &format!("/big/{i}"),
            cacheable(pattern(200 * 1024 + i, i as u64), "max-age=600"),
        );
    }
    let edge = start_edge_with(origin.addr(), |c| {
        c.cache_dir = Some(dir.path().to_path_buf());
        // Memory objects are at most memory/8 = 128 KiB: these are kept on disk only.
        c.memory = 1 << 20;
    })
    .await;
    let c = client();
    for i in 0..30 {
        let url = edge.url(&format!("/big/{i}"));
        let first = get(&c, &url, &[]).await;
        assert_eq!(first.x_cache(), "MISS", "{i}");
        let again = tokio::time::timeout(Duration::from_secs(10), get(&c, &url, &[]))
            .await
            .unwrap_or_else(|_| panic!("request {i} right after its MISS hung"));
        assert_eq!(again.x_cache(), "HIT", "request {i}: {again:?}");
        assert_eq!(again.body, first.body);
        assert_eq!(origin.hits(&format!("/big/{i}")), 1);
    }
}

/// Upstream requests name the client (X-Forwarded-For, appended) and the scheme it used
/// (X-Forwarded-Proto: set by an edge, whatever the client claimed; kept by a shield, which
/// hears it from an edge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_name_the_client_and_its_scheme() {
    let origin = TestOrigin::start().await;
    origin.route("/fwd", cacheable("x", "no-store"));
    let spoofed = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-for", "10.0.0.1"),
    ];
    let edge = start_edge(&origin).await;
    get(&client(), &edge.url("/fwd"), &spoofed).await;
    let seen = origin.last_request("/fwd").expect("origin request");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"), "{seen:?}");
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("10.0.0.1, 127.0.0.1"),
        "{seen:?}"
    );

    let shield = start_edge_with(origin.addr(), |cfg| cfg.role = outpost_edge::Role::Shield).await;
    get(&client(), &shield.url("/fwd"), &spoofed).await;
    let seen = origin.last_request("/fwd").expect("origin request");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{seen:?}");
    get(&client(), &shield.url("/fwd"), &[]).await;
    let seen = origin.last_request("/fwd").expect("origin request");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"), "{seen:?}");
}

/// POST to a cached URL passes through (the origin sees the POST and its body) and invalidates
/// the stored GET: the next GET is a MISS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_passes_through_and_invalidates() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/item", |req, n| {
        if req.method == "POST" {
            Reply::new(200)
                .header("content-type", "text/plain")
                .body("posted")
        } else {
            cacheable(format!("item version {n}"), "max-age=600")
        }
    });
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/item");
    assert_eq!(get(&c, &url, &[]).await.text(), "item version 0");
    let r = get_hit(&c, &url, &[]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "item version 0"));

    let r = send(
        &c,
        "POST",
        &url,
        &[("content-type", "text/plain")],
        Some("payload".into()),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "posted");
    let post = origin.last_request("/item").unwrap();
    assert_eq!(post.method, "POST");
    assert_eq!(&post.body[..], b"payload");

    let r = get(&c, &url, &[]).await;
    assert_eq!(
        r.x_cache(),
        "MISS",
        "the POST invalidated the stored GET: {r:?}"
    );
    assert_eq!(r.text(), "item version 2");
    let gets = origin
        .requests("/item")
        .iter()
        .filter(|r| r.method == "GET")
        .count();
    assert_eq!(gets, 2);
}

/// HTTP/1.1 and h2c requests for one URL hit the same entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_and_h2c_share_one_entry() {
    let origin = TestOrigin::start().await;
    origin.route("/a", cacheable("shared a", "max-age=600"));
    origin.route("/b", cacheable("shared b", "max-age=600"));
    let edge = start_edge(&origin).await;
    let h1 = client();
    let h2 = h2c_client(WAIT);

    let r = get(&h1, &edge.url("/a"), &[]).await;
    assert_eq!((r.version, r.x_cache()), (http::Version::HTTP_11, "MISS"));
    let r = get_hit(&h2, &edge.url("/a"), &[]).await;
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "shared a"));

    let r = get(&h2, &edge.url("/b"), &[]).await;
    assert_eq!((r.version, r.x_cache()), (http::Version::HTTP_2, "MISS"));
    let r = get_hit(&h1, &edge.url("/b"), &[]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "shared b"));
    assert_eq!((origin.hits("/a"), origin.hits("/b")), (1, 1));
}

/// An upstream that dies mid-body: the client's response fails (never a short body presented
/// as complete) and nothing is stored; the next request fetches the whole object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_mid_body_is_not_stored() {
    let body = pattern(128 * 1024, 6);
    let origin = TestOrigin::start().await;
    origin.route_seq(
        "/trunc",
        vec![
            cacheable(body.clone(), "max-age=600").close_after(40 * 1024),
            cacheable(body.clone(), "max-age=600"),
        ],
    );
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/trunc");
    let first = async {
        let r = c.get(&url).send().await?;
        r.bytes().await
    }
    .await;
    if let Ok(b) = first {
        panic!(
            "a truncated upstream body was presented as complete ({} of {} bytes)",
            b.len(),
            body.len()
        );
    }
    let r = get(&c, &url, &[]).await;
    assert_eq!(
        r.x_cache(),
        "MISS",
        "the truncated object was not stored: {r:?}"
    );
    assert_eq!(r.body, body);
    assert_eq!(origin.hits("/trunc"), 2);
}

// ---------------------------------------------------------------------------------------------
// Disk tier
// ---------------------------------------------------------------------------------------------

/// Restart persistence: an object on disk survives a shutdown; a new EdgeServer on the same
/// cache_dir answers it as a HIT without an origin request (disk, then promoted to memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_disk_objects() {
    let dir = tempfile::tempdir().unwrap();
    let body = pattern(20_000, 7);
    let origin = TestOrigin::start().await;
    origin.route("/keep", cacheable(body.clone(), "max-age=3600"));
    let with_disk = |c: &mut EdgeConfig| c.cache_dir = Some(dir.path().to_path_buf());

    let edge = start_edge_with(origin.addr(), with_disk).await;
    let c = client();
    assert_eq!(get(&c, &edge.url("/keep"), &[HOST]).await.x_cache(), "MISS");
    edge.wait_disk_objects(1).await;
    edge.stop_within(WAIT).await;

    let edge = start_edge_with(origin.addr(), with_disk).await;
    assert_eq!(edge.tier_usage(1).await.0, 1, "the disk index was rebuilt");
    assert_eq!(edge.tier_usage(0).await.0, 0);
    let c = client();
    let r = get(&c, &edge.url("/keep"), &[HOST]).await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert!(
        r.header("cache-status").is_some_and(|v| v.contains("hit")),
        "{r:?}"
    );
    assert_eq!(r.body, body);
    assert_eq!(
        origin.hits("/keep"),
        1,
        "no origin request after the restart"
    );
    eventually("the disk hit is promoted to memory", async || {
        edge.tier_usage(0).await.0 >= 1
    })
    .await;
    let r = get(&c, &edge.url("/keep"), &[HOST]).await;
    assert_eq!((r.x_cache(), r.body.clone()), ("HIT", body));
    assert_eq!(origin.hits("/keep"), 1);
}

/// A corrupted disk entry (small enough to be read whole) becomes a MISS: correct bytes from
/// the origin, no garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_disk_entry_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let body = pattern(30_000, 8);
    let origin = TestOrigin::start().await;
    origin.route("/c", cacheable(body.clone(), "max-age=3600"));
    let with_disk = |c: &mut EdgeConfig| c.cache_dir = Some(dir.path().to_path_buf());

    let edge = start_edge_with(origin.addr(), with_disk).await;
    let c = client();
    assert_eq!(get(&c, &edge.url("/c"), &[HOST]).await.body, body);
    edge.wait_disk_objects(1).await;
    edge.stop_within(WAIT).await;

    let edge = start_edge_with(origin.addr(), with_disk).await;
    assert!(
        corrupt_content(dir.path()) >= 1,
        "no content file to corrupt"
    );
    let c = client();
    let r = get(&c, &edge.url("/c"), &[HOST]).await;
    assert_eq!(r.status, 200);
    assert!(r.body == body, "garbage or wrong bytes served");
    assert_eq!(r.x_cache(), "MISS", "{r:?}");
    assert_eq!(origin.hits("/c"), 2);
}

/// A corrupted disk entry too large for memory (so it streams from disk) must not be served
/// either: the request is a MISS with correct bytes, not garbage followed by an abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_large_disk_entry_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let body = pattern(512 * 1024, 9);
    let origin = TestOrigin::start().await;
    origin.route("/big", cacheable(body.clone(), "max-age=3600"));
    let tweak = streams_from_disk(dir.path());
    let edge = start_edge_with(origin.addr(), tweak).await;
    let c = client();
    assert_eq!(get(&c, &edge.url("/big"), &[HOST]).await.body, body);
    edge.wait_disk_objects(1).await;
    edge.stop_within(WAIT).await;

    let edge = start_edge_with(origin.addr(), tweak).await;
    assert!(
        corrupt_content(dir.path()) >= 1,
        "no content file to corrupt"
    );
    let c = client();
    let res = async {
        let r = c
            .get(edge.url("/big"))
            .header(HOST.0, HOST.1)
            .send()
            .await?;
        let x_cache = r
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok::<_, reqwest::Error>((x_cache, r.bytes().await?))
    }
    .await;
    match res {
        Ok((x_cache, got)) => {
            assert!(got == body, "wrong bytes served (X-Cache {x_cache})");
            assert_eq!(x_cache, "MISS");
            assert_eq!(origin.hits("/big"), 2);
        }
        Err(e) => panic!(
            "a corrupted disk entry was served (then aborted) instead of a miss: {e}; \
             origin requests: {}",
            origin.hits("/big")
        ),
    }
}

/// Disk eviction keeps usage under the bound: disk 1 MiB, memory too small for the objects,
/// 40 objects of 64 KiB; after housekeeping the files under `<cache_dir>/content/` total at
/// most the bound plus 10%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_eviction_keeps_usage_under_the_bound() {
    const DISK: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bodies: Vec<Bytes> = (0..40).map(|i| pattern(64 * 1024, 100 + i)).collect();
    for (i, b) in bodies.iter().enumerate() {
        origin.route(&format!("/obj/{i}"), cacheable(b.clone(), "max-age=3600"));
    }
    let edge = start_edge_with(origin.addr(), |c| {
        c.cache_dir = Some(dir.path().to_path_buf());
        c.disk = DISK;
        c.memory = 256 << 10;
        // Every miss written, so the full tier evicts (a first miss is not, by default).
        c.disk_admission = outpost_edge::cache::disk::admission::Policy::Always;
    })
    .await;
    let c = client();
    for (i, b) in bodies.iter().enumerate() {
        let r = get(&c, &edge.url(&format!("/obj/{i}")), &[]).await;
        assert!(r.body == *b, "object {i}");
    }
    let content = dir.path().join("content");
    let limit = DISK + DISK / 10;
    // Deletions run in the background: wait until every content file belongs to an indexed
    // object (all bodies differ) and the total is under the bound.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (objects, weighted, on_disk, files) = loop {
        let (objects, weighted) = edge.tier_usage(1).await;
        let files = files_under(&content.join("content-v2")).len() as u64;
        let on_disk = bytes_under(&content);
        let settled = on_disk <= limit && objects > 0 && files == objects;
        if settled || tokio::time::Instant::now() >= deadline {
            break (objects, weighted, on_disk, files);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(objects > 0, "some objects stay on disk");
    // 40 objects of 64 KiB were offered to a 1 MiB tier: it must have filled up (so eviction
    // really ran), not stayed small because objects never reached the disk.
    assert!(
        weighted >= DISK / 2,
        "only {objects} objects ({weighted} bytes) reached the disk tier out of 40 x 64 KiB"
    );
    assert!(weighted <= DISK, "index weight {weighted} > {DISK}");
    assert!(
        on_disk <= limit,
        "{on_disk} bytes under content/ with a {DISK}-byte disk tier ({objects} objects indexed)"
    );
    assert_eq!(
        files, objects,
        "content files that no indexed object references"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad requests and slow clients
// ---------------------------------------------------------------------------------------------

/// A malformed request line over raw TCP → 400, nothing sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_line_is_400() {
    let origin = TestOrigin::start().await;
    let edge = start_edge(&origin).await;
    let (resp, _) = raw_exchange(edge.addr, b"BROKEN REQUEST LINE\r\nHost: x\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "got {resp:?}");
    let (resp, _) = raw_exchange(edge.addr, b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "got {resp:?}");
    assert_eq!(origin.total_hits(), 0);
}

/// A header block larger than limits.max_header_size (8 KiB; 20 KiB sent) → 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_block_is_431() {
    let origin = TestOrigin::start().await;
    origin.route("/", cacheable("root", "max-age=60"));
    let edge = start_edge_with(origin.addr(), |c| c.max_header_size = 8 << 10).await;
    let mut req = b"GET / HTTP/1.1\r\nHost: example.test\r\n".to_vec();
    for i in 0..20 {
        req.extend_from_slice(format!("x-pad-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let (resp, _) = raw_exchange(edge.addr, &req).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "got {resp:?}");
    assert_eq!(origin.total_hits(), 0);
    // A normal request still works.
    assert_eq!(get(&client(), &edge.url("/"), &[]).await.text(), "root");
}

/// A slowloris connection that trickles header lines and never finishes its head is closed
/// after header_read_timeout (1 s), while other connections keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_after_header_read_timeout() {
    let origin = TestOrigin::start().await;
    origin.route("/ok", cacheable("still serving", "max-age=60"));
    let edge = start_edge_with(origin.addr(), |c| {
        c.header_read_timeout = Duration::from_secs(1)
    })
    .await;
    let tcp = TcpStream::connect(edge.addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    wr.write_all(b"GET /ok HTTP/1.1\r\nHost: example.test\r\n")
        .await
        .unwrap();
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 may precede the close
            }
        }
    });
    let trickle = tokio::spawn(async move {
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr
                .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // Meanwhile, another client is served.
    let r = get(&client(), &edge.url("/ok"), &[]).await;
    assert_eq!(r.text(), "still serving");
    tokio::time::timeout(WAIT, closed)
        .await
        .expect("the slowloris connection was not closed")
        .unwrap();
    trickle.abort();
    let r = get(&client(), &edge.url("/ok"), &[]).await;
    assert_eq!(r.text(), "still serving");
}

/// A connection that opens and sends nothing at all is closed after header_read_timeout too
/// (otherwise idle sockets exhaust file descriptors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_after_header_read_timeout() {
    let origin = TestOrigin::start().await;
    origin.route("/ok", cacheable("still serving", "max-age=60"));
    let edge = start_edge_with(origin.addr(), |c| {
        c.header_read_timeout = Duration::from_secs(1)
    })
    .await;
    let mut tcp = TcpStream::connect(edge.addr).await.unwrap();
    let r = get(&client(), &edge.url("/ok"), &[]).await;
    assert_eq!(r.text(), "still serving");
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection that sent nothing was still open 10 s after a 1 s header_read_timeout"
    );
}

/// Issue 18, negative caching (`[cache] negative_ttl`): a storm of 200 concurrent requests for
/// a missing URL costs the origin one request (coalesced, then stored for the configured
/// time), the 404 expires on time, a 404 with its own freshness keeps it, `no-store` is obeyed,
/// and a 5xx never replaces a stored copy that stale-if-error may still serve.
#[tokio::test]
async fn negative_caching_turns_a_404_storm_into_one_origin_request() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/missing",
        Reply::new(404)
            .body("not here")
            .head_delay(Duration::from_millis(300)),
    );
    origin.route(
        "/own",
        Reply::new(404).header("cache-control", "max-age=60"),
    );
    origin.route(
        "/secret-miss",
        Reply::new(404).header("cache-control", "no-store"),
    );
    origin.route_seq(
        "/flaky",
        vec![
            cacheable("good", "max-age=10"),
            Reply::new(503).body("down"),
        ],
    );
    let edge = start_edge_with(origin.addr(), |cfg| {
        // Only negative caching here: no prefresh near the 404's end.
        cfg.prefresh = 0.0;
        cfg.negative_ttl = outpost_edge::cache::policy::NegativeTtl::new([
            (404, false, Duration::from_secs(30)),
            (500, true, Duration::from_secs(5)),
        ]);
    })
    .await;
    let c = client();
    let url = edge.url("/missing");
    let mut storm = JoinSet::new();
    for _ in 0..200 {
        let (c, url) = (c.clone(), url.clone());
        storm.spawn(async move { get(&c, &url, &[]).await });
    }
    while let Some(r) = storm.join_next().await {
        let r = r.expect("request task");
        assert_eq!((r.status, r.text().as_str()), (404, "not here"));
    }
    assert_eq!(
        origin.hits("/missing"),
        1,
        "the storm cost one origin request"
    );
    assert_eq!(get(&c, &url, &[]).await.x_cache(), "HIT");
    edge.advance(29);
    assert_eq!(get(&c, &url, &[]).await.x_cache(), "HIT");
    assert_eq!(origin.hits("/missing"), 1);
    edge.advance(2);
    assert_eq!(
        get(&c, &url, &[]).await.x_cache(),
        "MISS",
        "expired after 30 s"
    );
    assert_eq!(origin.hits("/missing"), 2);

    // Its own freshness wins over the configured time; no-store is never stored.
    let own = edge.url("/own");
    assert_eq!(get(&c, &own, &[]).await.status, 404);
    edge.advance(45);
    assert_eq!(get(&c, &own, &[]).await.x_cache(), "HIT");
    for _ in 0..2 {
        assert_eq!(get(&c, &edge.url("/secret-miss"), &[]).await.status, 404);
    }
    assert_eq!(origin.hits("/secret-miss"), 2);

    // A stored 200 past its freshness, then the origin fails: the 503 is not stored over the
    // copy, which stale-on-error serves, and each request asks the origin again.
    let flaky = edge.url("/flaky");
    assert_eq!(get(&c, &flaky, &[]).await.text(), "good");
    edge.advance(11);
    for n in 2..4 {
        let r = get(&c, &flaky, &[]).await;
        assert_eq!((r.status, r.x_cache()), (200, "STALE"), "{r:?}");
        assert_eq!(origin.hits("/flaky"), n);
    }
}

/// Issue 18, prefresh (`[cache] prefresh`, 0.9 by default): a steadily requested object with
/// a 4 s lifetime is revalidated in the background once 90% of it has passed, so over 20 s of
/// requests every 200 ms none after the first is a miss (or stale), and the origin sees about
/// one request per 3.6 s.
#[tokio::test]
async fn prefresh_keeps_a_steadily_requested_object_from_ever_missing() {
    let origin = TestOrigin::start().await;
    origin.route("/hot", cacheable("hot", "max-age=4"));
    let edge = start_edge(&origin).await;
    let c = client();
    let url = edge.url("/hot");
    assert_eq!(get(&c, &url, &[]).await.x_cache(), "MISS");
    let mut seen = Vec::new();
    for _ in 0..100 {
        edge.advance_ms(200);
        let r = get(&c, &url, &[]).await;
        assert_eq!((r.status, r.text().as_str()), (200, "hot"));
        seen.push(r.x_cache().to_string());
        // Real time for a background refresh to land (the manual clock does not wait).
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert!(seen.iter().all(|x| x == "HIT"), "{seen:?}");
    let hits = origin.hits("/hot");
    assert!(
        (5..=7).contains(&hits),
        "about one origin request per 3.6 s over 20 s: {hits}"
    );
    let stats = &edge.engine().stats;
    assert!(
        stats.prefreshes[0].load(std::sync::atomic::Ordering::Relaxed) >= 4,
        "refreshed prefreshes counted"
    );

    // Off: the same object becomes a miss at its end.
    let origin2 = TestOrigin::start().await;
    origin2.route("/hot", cacheable("hot", "max-age=4"));
    let edge2 = start_edge_with(origin2.addr(), |cfg| cfg.prefresh = 0.0).await;
    let url2 = edge2.url("/hot");
    assert_eq!(get(&c, &url2, &[]).await.x_cache(), "MISS");
    edge2.advance_ms(3800);
    assert_eq!(get(&c, &url2, &[]).await.x_cache(), "HIT");
    edge2.advance_ms(400);
    assert_ne!(get(&c, &url2, &[]).await.x_cache(), "HIT");
}

/// Issue 18, the origin budget (`limits.upstream_max_connections` and
/// `limits.upstream_queue_wait`): a request over the budget waits briefly, then gets the stale
/// copy stale-on-error allows, or a 503 with `Proxy-Status: ...; error=connection_limit_reached`
/// instead of piling onto the origin. The budget being full does not mark the origin failing.
#[tokio::test]
async fn requests_over_the_origin_budget_wait_briefly_then_get_stale_or_503() {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    origin.route("/slow", cacheable("slow", "no-store").gated(&gate));
    origin.route("/kept", cacheable("kept", "max-age=1"));
    origin.route("/other", cacheable("other", "max-age=60"));
    let edge = start_edge_with(origin.addr(), |cfg| {
        cfg.upstream_max_connections = 1;
        cfg.upstream_queue_wait = Duration::from_millis(200);
        // The queue's wait, not the first-byte timeout, bounds a request over the budget (it
        // used to wait this long; the client would give up first).
        cfg.upstream_first_byte_timeout = Duration::from_secs(600);
        cfg.prefresh = 0.0;
    })
    .await;
    let c = client();
    assert_eq!(get(&c, &edge.url("/kept"), &[]).await.text(), "kept");
    edge.advance(2); // /kept is stale now; stale-on-error allows it for 60 s

    // The one connection is taken by a request the origin holds.
    let slow = {
        let (c, url) = (c.clone(), edge.url("/slow"));
        tokio::spawn(async move { get(&c, &url, &[]).await })
    };
    eventually("the origin holds /slow", async || origin.hits("/slow") == 1).await;

    let r = get(&c, &edge.url("/other"), &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.header("proxy-status")
            .is_some_and(|v| v.contains("connection_limit_reached")),
        "{r:?}"
    );
    assert_eq!(origin.hits("/other"), 0, "nothing piled onto the origin");
    let r = get(&c, &edge.url("/kept"), &[]).await;
    assert_eq!(
        (r.status, r.x_cache(), r.text().as_str()),
        (200, "STALE", "kept")
    );
    assert_eq!(origin.hits("/kept"), 1);
    let stats: serde_json::Value =
        serde_json::from_str(&get(&c, &edge.admin_url("/stats"), &[]).await.text())
            .expect("/stats");
    assert_eq!(
        stats["upstreams"][0]["failing_seconds"], 0.0,
        "a full budget is not the origin failing: {stats}"
    );

    gate.open();
    assert_eq!(slow.await.expect("task").text(), "slow");
    assert_eq!(get(&c, &edge.url("/other"), &[]).await.text(), "other");
}

/// Issue 18, failover origins (`fallback_origins`, `[origin_health]`): the primary answers 503,
/// then dies: the same requests are answered by the fallback, with no error for the client;
/// `/origins` shows the primary down; once it is back, `rise` good probes of its health path
/// bring it back into use.
#[tokio::test]
async fn a_failing_primary_fails_over_and_comes_back_after_good_probes() {
    let mut primary = TestOrigin::start().await;
    let backup = TestOrigin::start().await;
    for (o, body) in [(&primary, "primary"), (&backup, "backup")] {
        o.route("/a", cacheable(body, "no-store"));
        o.route("/health", Reply::ok("ok"));
    }
    let fallback: http::Uri = backup.base_url().parse().expect("uri");
    let edge = start_edge_with(primary.addr(), move |cfg| {
        cfg.failover = outpost_edge::config::OriginFailover {
            fallbacks: vec![fallback],
            probe_path: Some("/health".into()),
            interval: Duration::from_millis(100),
            rise: 2,
            fall: 1,
            statuses: vec![502, 503, 504],
            weights: Vec::new(),
        };
    })
    .await;
    let c = client();
    let a = edge.url("/a");
    assert_eq!(get(&c, &a, &[]).await.text(), "primary");

    // The primary answers 503: the request is answered by the fallback.
    primary.route("/a", Reply::new(503).body("down"));
    let r = get(&c, &a, &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "backup"), "{r:?}");

    // The primary dies: every request is answered by the fallback.
    primary.stop().await;
    for _ in 0..5 {
        let r = get(&c, &a, &[]).await;
        assert_eq!((r.status, r.text().as_str()), (200, "backup"), "{r:?}");
    }
    let origins = || async {
        let v: serde_json::Value =
            serde_json::from_str(&get(&c, &edge.admin_url("/origins"), &[]).await.text())
                .expect("/origins JSON");
        v
    };
    eventually("/origins shows the primary down", async || {
        origins().await[0]["up"] == false
    })
    .await;
    let o = origins().await;
    assert_eq!(o[0]["role"], "primary", "{o}");
    assert_eq!(o[1]["role"], "fallback", "{o}");
    assert_eq!(o[1]["up"], true, "{o}");
    let stats: serde_json::Value =
        serde_json::from_str(&get(&c, &edge.admin_url("/stats"), &[]).await.text())
            .expect("/stats");
    // The status page's source shows them too (failure counts move with every probe).
    for i in 0..2 {
        for f in ["url", "role"] {
            assert_eq!(stats["origins"][i][f], o[i][f], "{stats}");
        }
    }
    assert_eq!(stats["origins"][1]["up"], true, "{stats}");

    // Back and healthy: two good probes later it answers again.
    primary.route("/a", cacheable("primary", "no-store"));
    primary.restart().await;
    eventually("the primary answers again", async || {
        get(&c, &a, &[]).await.text() == "primary"
    })
    .await;
    assert_eq!(origins().await[0]["up"], true);
}

/// `origin_weights`: requests spread over the origins in proportion (3 to 1 here, exactly,
/// by smooth weighted round-robin), and each still fails over: with the first origin dead,
/// the second answers them all.
#[tokio::test]
async fn origin_weights_spread_requests_and_still_fail_over() {
    let mut first = TestOrigin::start().await;
    let second = TestOrigin::start().await;
    for o in [&first, &second] {
        o.route("/w", cacheable("w", "no-store"));
    }
    let fallback: http::Uri = second.base_url().parse().expect("uri");
    let edge = start_edge_with(first.addr(), move |cfg| {
        cfg.failover = outpost_edge::config::OriginFailover {
            fallbacks: vec![fallback],
            probe_path: None,
            interval: Duration::from_secs(60),
            rise: 1,
            fall: 1,
            statuses: vec![502, 503, 504],
            weights: vec![3, 1],
        };
    })
    .await;
    let c = client();
    for _ in 0..40 {
        assert_eq!(get(&c, &edge.url("/w"), &[]).await.status, 200);
    }
    assert_eq!((first.hits("/w"), second.hits("/w")), (30, 10));
    first.stop().await;
    for _ in 0..8 {
        assert_eq!(get(&c, &edge.url("/w"), &[]).await.status, 200);
    }
    assert_eq!(second.hits("/w"), 18, "the second answered every one");
}

/// A Range request for a large disk object whose content file changed in place after it was
/// checked never gets the changed bytes as a complete 206: its response is cut before its
/// last bytes and the damaged copy goes, so the retry is a MISS with the origin's bytes. (Its
/// range used to be cut from the body's stream, which then never reached the check at its
/// end: the changed bytes went out as a complete 206.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_a_large_disk_entry_changed_in_place_is_never_served_as_complete() {
    let dir = tempfile::tempdir().unwrap();
    let body = pattern(512 * 1024, 10);
    let origin = TestOrigin::start().await;
    origin.route("/big", cacheable(body.clone(), "max-age=3600"));
    let tweak = streams_from_disk(dir.path());
    let edge = start_edge_with(origin.addr(), tweak).await;
    let c = client();
    assert!(get(&c, &edge.url("/big"), &[HOST]).await.body == body);
    edge.wait_disk_objects(1).await;
    edge.stop_within(WAIT).await;
    // Its times settled, a restart's first stream reads it through and vouches for it.
    tokio::time::sleep(outpost_edge::cache::disk::STAMP_SETTLE + Duration::from_millis(100)).await;
    let edge = start_edge_with(origin.addr(), tweak).await;
    let r = get(&c, &edge.url("/big"), &[HOST, ("range", "bytes=0-999")]).await;
    assert_eq!((r.status, r.x_cache()), (206, "HIT"), "{r:?}");
    assert!(r.body == body.slice(..1000));

    // One byte in the range changed, same length.
    let files = files_under(&dir.path().join("content").join("content-v2"));
    assert_eq!(files.len(), 1, "{files:?}");
    let mut changed = body.to_vec();
    changed[500] ^= 0xff;
    rewrite_in_place(&files[0], &changed);

    let cut = async {
        let r = c
            .get(edge.url("/big"))
            .header(HOST.0, HOST.1)
            .header("range", "bytes=0-999")
            .send()
            .await?;
        r.bytes().await
    }
    .await;
    if let Ok(b) = cut {
        panic!(
            "{} bytes served as a complete 206 of a changed file",
            b.len()
        );
    }
    let r = get(&c, &edge.url("/big"), &[HOST, ("range", "bytes=0-999")]).await;
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(r.x_cache(), "MISS", "the damaged copy went");
    assert!(r.body == body.slice(..1000));
}
