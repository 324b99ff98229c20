//! Purge cost against a full cache: a purge by tag or of everything records one generation and
//! never walks the cache, so it costs the same with 1 000 or 1 000 000 objects. This bench fills
//! the engine (no sockets: an in-process `Upstream`) with N objects carrying tags, then times
//! `Engine::purge` by tag, by prefix and of everything, and a lookup after the purge.
//!
//! Run: `cargo bench --bench purge` (release; N = OUTPOST_BENCH_OBJECTS, default 1 000 000; the
//! fill takes most of the time). `cargo test --benches` / `-- --test` runs N = 2 000.
//!
//! Last numbers: 2 cores (shared with other builds and tests), 24 GiB, 2026-11-21,
//! N = 1 000 000 objects in the memory tier (each with one of 1 000 tags), purge state persisted
//! to a temp dir (purges.json written before each purge returns):
//!
//! | operation | time |
//! |---|---:|
//! | fill 1 000 000 objects through the engine | 213 s |
//! | purge by tag (1 of 1 000 tags, covers 1 000 objects) | 0.26 ms |
//! | purge by prefix (`/objects/1`, covers 111 112 objects) | 0.39 ms |
//! | purge all | 0.42 ms |
//! | a GET of a purged object (a MISS, up to and including the refetch) | 501 µs median |
//!
//! A first run measured the tag purge at 10 s: the fill had queued a million disk writes on
//! tokio's blocking pool, and persisting purges.json waited behind them.
//!
//! Since eda7274 purges.json is written by a thread of its own, and synced (file and
//! directory) before a purge returns. 2026-11-22, N = 200 000 (the purge cost does not depend
//! on N), same machine, otherwise idle:
//!
//! | operation | time |
//! |---|---:|
//! | fill 200 000 objects | 40.5 s (+6.0 s for the blocking pool's disk backlog to drain) |
//! | purge by tag, timed right after the fill, behind that backlog | 1.08 ms |
//! | purge by tag | 0.89 ms |
//! | purge by prefix | 0.56 ms |
//! | purge all | 0.51 ms |
//! | a GET of a purged object (a MISS, up to and including the refetch) | 312 µs median |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use outpost_edge::cache::clock::Clock;
use outpost_edge::cache::key::{KeyOptions, NormalizedRequest};
use outpost_edge::cache::upstream::{BoxError, Upstream, UpstreamBody, UpstreamError};
use outpost_edge::cache::{CacheRequest, Engine, EngineConfig, PurgeSpec};

/// An origin in the same process: every path is a small cacheable object with a tag.
struct Origin {
    requests: AtomicU64,
}

impl Upstream for Origin {
    fn fetch(
        &self,
        req: Request<UpstreamBody>,
    ) -> BoxFuture<'static, Result<Response<UpstreamBody>, UpstreamError>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let n: u64 = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        async move {
            Ok(Response::builder()
                .header("cache-control", "public, max-age=86400")
                .header("surrogate-key", format!("t{}", n % 1000))
                .header("content-length", "16")
                .body(
                    Full::new(Bytes::from_static(b"0123456789abcdef"))
                        .map_err(|never| -> BoxError { match never {} })
                        .boxed(),
                )
                .expect("valid response"))
        }
        .boxed()
    }
}

fn request(i: u64) -> CacheRequest {
    let uri: http::Uri = format!("/objects/{i}").parse().expect("uri");
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::HOST,
        http::HeaderValue::from_static("bench.test"),
    );
    let norm = NormalizedRequest::new(&http::Method::GET, &uri, &headers, &KeyOptions::default())
        .expect("normalised");
    let mut upstream = Request::builder()
        .uri(uri)
        .body(())
        .expect("request")
        .into_parts()
        .0;
    upstream.headers = headers;
    CacheRequest {
        norm,
        method: http::Method::GET,
        upstream,
        default_ttl: None,
    }
}

async fn drain(served: outpost_edge::cache::Served) -> String {
    let cache = served.cache.as_str().to_string();
    if let outpost_edge::cache::ServedBody::Stream { mut stream, .. } = served.body {
        use futures_util::StreamExt;
        while stream.next().await.is_some() {}
    }
    cache
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let smoke = std::env::args().any(|a| a == "--test");
    let n: u64 = if smoke {
        2_000
    } else {
        std::env::var("OUTPOST_BENCH_OBJECTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let origin = Arc::new(Origin {
            requests: AtomicU64::new(0),
        });
        // Memory only for the objects (a disk tier would make the fill take minutes), but the
        // purge state still goes to disk: purges.json lives in the cache dir, so use a
        // disk tier with a tiny bound and a memory tier big enough for every object.
        let engine = Engine::open(
            EngineConfig {
                memory_bytes: 8 << 30,
                disk: Some((dir.path().to_path_buf(), 1 << 20)),
                max_object_size: 1 << 20,
                surrogate_name: "bench".into(),
                targeted_cache_control: outpost_edge::cache::default_targeted_cache_control(),
                stale_on_error: std::time::Duration::ZERO,
                revalidations_per_sec: 100,
            stale_if_error_wait: std::time::Duration::from_secs(2),
            send_timeout: std::time::Duration::from_secs(60),
                negative_ttl: Default::default(),
                prefresh: 0.0,
                disk_admission: Default::default(),
            },
            origin.clone(),
            Clock::system(),
        )
        .await
        .expect("engine");
        let started = Instant::now();
        let batch = 256;
        let mut i = 0;
        while i < n {
            let tasks: Vec<_> = (i..(i + batch).min(n))
                .map(|k| {
                    let e = engine.clone();
                    tokio::spawn(async move { drain(e.serve(request(k)).await).await })
                })
                .collect();
            for t in tasks {
                t.await.expect("fill");
            }
            i += batch;
        }
        engine.run_pending_tasks().await;
        let fill = started.elapsed();
        let time = |spec: PurgeSpec| {
            let e = engine.clone();
            async move {
                let t = Instant::now();
                e.purge(&spec).await.expect("purge");
                t.elapsed()
            }
        };
        // Every fill also queued a disk write on tokio's blocking pool. The purge state is
        // written by a thread of its own, so a purge now does not wait behind that backlog.
        let under_backlog = time(PurgeSpec {
            tags: vec!["t9".into()],
            ..Default::default()
        })
        .await;
        // Then let the backlog drain (a probe write is quick again) and time the rest on a
        // quiet disk.
        let probe = dir.path().join("probe");
        loop {
            let t = Instant::now();
            tokio::fs::write(&probe, b"x").await.expect("probe write");
            if t.elapsed() < Duration::from_millis(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let drained = started.elapsed() - fill;
        let (_, objects, _) = engine.usage()[0];
        assert_eq!(drain(engine.serve(request(7)).await).await, "HIT");

        let tag = time(PurgeSpec {
            tags: vec!["t7".into()],
            ..Default::default()
        })
        .await;
        assert_eq!(drain(engine.serve(request(7)).await).await, "MISS");
        let prefix = time(PurgeSpec {
            prefixes: vec!["/objects/1".into()],
            ..Default::default()
        })
        .await;
        let all = time(PurgeSpec {
            all: true,
            ..Default::default()
        })
        .await;
        let mut lookups: Vec<Duration> = Vec::with_capacity(1000);
        for j in 0..1000u64 {
            let k = (j * 997 + 11) % n;
            let t = Instant::now();
            let s = engine.serve(request(k)).await;
            lookups.push(t.elapsed());
            assert_eq!(drain(s).await, "MISS", "purged object {k} must be a miss");
        }
        lookups.sort();
        println!(
            "fill {n} objects ({objects} in memory): {:.1} s (+{:.1} s for the disk backlog to drain); purge tag under that backlog: {}; purge tag: {}; purge prefix: {}; purge all: {}; lookup of a purged object (median of 1000, miss path up to the upstream call): {:.1} µs",
            fill.as_secs_f64(),
            drained.as_secs_f64(),
            ms(under_backlog),
            ms(tag),
            ms(prefix),
            ms(all),
            lookups[lookups.len() / 2].as_secs_f64() * 1e6
        );
        if !smoke && all > Duration::from_millis(1) {
            eprintln!("NOTE: purge-all took more than 1 ms on this (shared) machine");
        }
    });
}
