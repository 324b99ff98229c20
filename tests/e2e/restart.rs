//! Process-level restart tests of the real `outpost edge` binary (`CARGO_BIN_EXE_outpost`) with a
//! disk tier (`--cache-dir`), in front of the programmable test origin.
//!
//! - A `kill -9` in the middle of a large fill never leaves a truncated object behind: after a
//!   restart on the same cache directory the next GET is a MISS with the complete object.
//! - A committed object survives a SIGTERM restart and a `kill -9` restart (the test waits until
//!   the admin port's `/stats` counts it as stored on disk before stopping the process).
//!
//! Each restart uses new ports, so every request carries the same `Host` (the cache key's host).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use crate::support::files::pattern;
use crate::support::proc::{NodeProc, Spawn};
use crate::support::test_origin::{Reply, TestOrigin};
use crate::support::{client, http};

const HOST: &str = "cdn.example.test";

/// Starts `outpost edge --cache-dir <cache_dir>` in front of `origin`, its log in
/// `<logs>/<name>.log`.
async fn spawn_edge(origin: &TestOrigin, cache_dir: &Path, logs: &Path, name: &str) -> NodeProc {
    let cache_dir = cache_dir.display().to_string();
    Spawn::edge(&origin.base_url(), &["--cache-dir", &cache_dir])
        .start(&logs.join(format!("{name}.log")))
        .await
}

impl NodeProc {
    /// (memory objects, disk objects) from the admin port's /usage.
    async fn usage(&self) -> (u64, u64) {
        let text = self.admin_text("/usage").await;
        let objects = |tier: &str| {
            text.lines()
                .find(|l| l.starts_with(tier))
                .and_then(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("objects="))
                })
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {tier} line in /usage: {text:?}"))
        };
        (objects("memory"), objects("disk"))
    }
}

/// GET with the fixed Host; returns (status, X-Cache, body).
async fn get(c: &reqwest::Client, url: &str) -> (u16, String, Bytes) {
    let r = http::get(c, url, &[("host", HOST)]).await;
    (r.status, r.x_cache().to_string(), r.body)
}

/// A `kill -9` during a large fill (8 MiB streamed slowly in 64 KiB chunks, 20 ms apart): after
/// a restart on the same cache directory the object is fetched again (MISS) and complete, never
/// a truncated copy; once committed it is a HIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_large_fill_never_leaves_a_truncated_object() {
    let cache = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let body = pattern(8 << 20, 11);
    let origin = TestOrigin::start().await;
    origin.route_seq(
        "/large.bin",
        vec![
            Reply::ok(body.clone())
                .header("cache-control", "max-age=3600")
                .header("etag", "\"large\"")
                .slow_body(64 * 1024, Duration::from_millis(20)),
            Reply::ok(body.clone())
                .header("cache-control", "max-age=3600")
                .header("etag", "\"large\""),
        ],
    );

    let edge = spawn_edge(&origin, cache.path(), logs.path(), "edge-1").await;
    let c = client();
    let mut resp = c
        .get(edge.url("/large.bin"))
        .header("host", HOST)
        .send()
        .await
        .expect("start the large GET");
    assert_eq!(resp.status().as_u16(), 200);
    let mut got = 0usize;
    while got < 512 * 1024 {
        let chunk = resp
            .chunk()
            .await
            .expect("read the large body")
            .expect("the body ended before the kill");
        got += chunk.len();
    }
    assert!(got < body.len(), "the whole body arrived before the kill");
    edge.kill9();
    drop(resp);

    let edge = spawn_edge(&origin, cache.path(), logs.path(), "edge-2").await;
    assert_eq!(
        edge.usage().await.1,
        0,
        "an interrupted fill must not be on disk after a restart"
    );
    let c = client();
    let (status, x_cache, got) = get(&c, &edge.url("/large.bin")).await;
    assert_eq!(status, 200);
    assert_eq!(got.len(), body.len(), "complete object after the restart");
    assert!(got == body, "wrong bytes after the restart");
    assert_eq!(x_cache, "MISS");
    assert_eq!(origin.hits("/large.bin"), 2);

    edge.wait_disk_stored(1).await;
    let (status, x_cache, got) = get(&c, &edge.url("/large.bin")).await;
    assert_eq!((status, x_cache.as_str()), (200, "HIT"));
    assert!(got == body);
    assert_eq!(origin.hits("/large.bin"), 2);
}

/// A committed object survives a SIGTERM restart and then a `kill -9` restart: each new process
/// answers it as a HIT with no origin request.
async fn survives_sigterm_and_kill9(size: usize, seed: u64) {
    let cache = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let body = pattern(size, seed);
    let origin = TestOrigin::start().await;
    origin.route(
        "/kept.bin",
        Reply::ok(body.clone())
            .header("content-type", "application/octet-stream")
            .header("cache-control", "max-age=3600"),
    );

    let edge = spawn_edge(&origin, cache.path(), logs.path(), "edge-1").await;
    let c = client();
    let (status, x_cache, got) = get(&c, &edge.url("/kept.bin")).await;
    assert_eq!((status, x_cache.as_str()), (200, "MISS"));
    assert!(got == body);
    edge.wait_disk_stored(1).await;
    let status = edge.terminate().await;
    assert!(status.success(), "SIGTERM exit status: {status}");

    let edge = spawn_edge(&origin, cache.path(), logs.path(), "edge-2").await;
    assert_eq!(
        edge.usage().await.1,
        1,
        "the disk index after a SIGTERM restart"
    );
    let c = client();
    let (status, x_cache, got) = get(&c, &edge.url("/kept.bin")).await;
    assert_eq!(
        (status, x_cache.as_str()),
        (200, "HIT"),
        "after a SIGTERM restart"
    );
    assert!(got == body, "wrong bytes after a SIGTERM restart");
    assert_eq!(origin.hits("/kept.bin"), 1);
    edge.kill9();

    let edge = spawn_edge(&origin, cache.path(), logs.path(), "edge-3").await;
    let c = client();
    let (status, x_cache, got) = get(&c, &edge.url("/kept.bin")).await;
    assert_eq!(
        (status, x_cache.as_str()),
        (200, "HIT"),
        "after a kill -9 restart"
    );
    assert!(got == body, "wrong bytes after a kill -9 restart");
    assert_eq!(origin.hits("/kept.bin"), 1);
}

/// Restart persistence through the binary for an object of 100 KiB (the usual size of a page
/// or an image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_object_survives_sigterm_and_kill9_restarts() {
    survives_sigterm_and_kill9(100 * 1024, 21).await;
}

/// Restart persistence through the binary for an object of 3 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_object_survives_sigterm_and_kill9_restarts() {
    survives_sigterm_and_kill9(3 << 20, 22).await;
}

/// The body of object `i` of the many-object fill: mostly small (kept in the disk index's
/// records), every 25th one 40 KB (a content file of its own).
fn object(i: usize) -> Bytes {
    let len = if i.is_multiple_of(25) {
        40_000
    } else {
        200 + (i * 37) % 6000
    };
    pattern(len, 1000 + i as u64)
}

/// Issue 15: a `kill -9` in the middle of a fill of 10,000 objects (32 clients asking for them
/// at once), then a restart on the same cache directory: every object answers either a HIT with
/// the origin's exact bytes or a MISS (fetched again, exact bytes). Nothing partial, nothing
/// corrupt, and objects stored before the kill are hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_10000_object_fill_leaves_only_whole_objects() {
    const OBJECTS: usize = 10_000;
    let cache = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    for i in 0..OBJECTS {
        let body = object(i);
        origin.route_fn(&format!("/o/{i}"), move |_, _| {
            Reply::ok(body.clone()).header("cache-control", "max-age=3600")
        });
    }
    let edge = spawn_edge(&origin, cache.path(), logs.path(), "edge-1").await;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (next, base) = (next.clone(), edge.url(""));
        clients.push(tokio::spawn(async move {
            let c = client();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= OBJECTS {
                    return;
                }
                let sent = c
                    .get(format!("{base}/o/{i}"))
                    .header("host", HOST)
                    .send()
                    .await;
                // Until the kill: then every request fails, and the client stops.
                match sent {
                    Ok(r) => {
                        if r.bytes().await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Killed once a good part is on disk, with the rest of the fill in flight.
    edge.wait_disk_stored(2_000).await;
    edge.kill9();
    for c in clients {
        c.await.unwrap();
    }
    let asked_before = origin.total_hits();
    assert!(
        asked_before < OBJECTS,
        "the fill ended before the kill ({asked_before} objects asked)"
    );

    let edge = spawn_edge(&origin, cache.path(), logs.path(), "edge-2").await;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut checkers = Vec::new();
    for _ in 0..16 {
        let (next, base) = (next.clone(), edge.url(""));
        checkers.push(tokio::spawn(async move {
            let c = client();
            let mut hits = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= OBJECTS {
                    return hits;
                }
                let (status, x_cache, body) = get(&c, &format!("{base}/o/{i}")).await;
                assert_eq!(status, 200, "/o/{i}");
                assert!(
                    x_cache == "HIT" || x_cache == "MISS",
                    "/o/{i}: X-Cache {x_cache}"
                );
                assert!(
                    body == object(i),
                    "/o/{i} ({x_cache}): {} bytes, not the object's {}",
                    body.len(),
                    object(i).len()
                );
                hits += usize::from(x_cache == "HIT");
            }
        }));
    }
    let mut hits = 0;
    for c in checkers {
        hits += c.await.expect("a check failed");
    }
    // Every object the origin was asked for once and no more was a HIT after the restart.
    assert!(hits >= 2_000, "only {hits} hits after the restart");
    assert_eq!(
        origin.total_hits(),
        asked_before + (OBJECTS - hits),
        "a HIT or a MISS per object, nothing else asked"
    );
}
