//! Coalescing storm: N concurrent GETs for one cold key through the edge, while the origin
//! waits 50 ms before its response head and then streams 256 KiB (16 KiB chunks). Reports the
//! origin requests per storm (must be 1), time to first byte and to the last byte for the
//! waiters, and the storm's total time.
//!
//! Run: `cargo bench --bench coalesce` (release; ~3 s). Settings: OUTPOST_BENCH_STORM (storm
//! sizes, `200,1000`), OUTPOST_BENCH_ROUNDS (storms per size, 5), OUTPOST_BENCH_SERVER_THREADS
//! (cores), OUTPOST_BENCH_CLIENT_THREADS (2). `cargo test --benches` or
//! `cargo bench --bench coalesce -- --test` only does one storm of 20.
//!
//! Setup: one process, two tokio runtimes (edge; clients). The N keep-alive connections are
//! opened and used once on a cached key first, so accept and connection set-up are not
//! measured. Then all N tasks are released by one barrier and each sends `GET /storm/<n>/<round>`
//! (a new cold key every storm). TTFB and last byte are per request, from its own send; total is
//! from the barrier to the last body byte of the last request. The origin is in-process (an
//! `Upstream` implementation, no socket); the edge has 256 MiB of memory and a disk tier.
//! Baseline: the origin's own 50 ms delay is the floor of every TTFB.
//!
//! Last numbers: 2 cores / 24 GiB, shared with other builds (load average 3), 2026-11-21, tree at
//! d6869e5 plus uncommitted edge work; median of 3 runs (each over 5 storms per size):
//!
//! | storm | origin req | TTFB p50 | TTFB p99 | TTFB max | last byte p50 | last byte p99 |  total |
//! |------:|-----------:|---------:|---------:|---------:|--------------:|--------------:|-------:|
//! |   200 |  1 a storm |  53.8 ms |  67.3 ms |  68.7 ms |       71.4 ms |       76.7 ms |  72 ms |
//! |  1000 |  1 a storm |  62.9 ms |   112 ms |   117 ms |        126 ms |        157 ms | 144 ms |
//!
//! "last byte" is per request, from its send to its last body byte; "total" is per storm.

mod support;

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::client::{Conn, Reply, XCache, get_request};
use support::servers::{BenchOrigin, Bodies, start_edge};
use support::{Latencies, Runtimes, env_list, env_u64, fmt_dur, median, micros};
use tokio::sync::Barrier;

const BODY: usize = 256 * 1024;
const CHUNK: usize = 16 * 1024;
const ORIGIN_DELAY: Duration = Duration::from_millis(50);

/// What one storm produced.
struct Storm {
    origin_requests: u64,
    coalesced: u64,
    misses: usize,
    hits: usize,
    first_byte: Vec<u32>,
    last_byte: Vec<u32>,
    total: Duration,
}

fn main() {
    let smoke = support::smoke_mode();
    let (sizes, rounds) = if smoke {
        (vec![20], 1)
    } else {
        (
            env_list("OUTPOST_BENCH_STORM", &[200, 1000]),
            env_u64("OUTPOST_BENCH_ROUNDS", 5).max(1),
        )
    };
    let rts = Runtimes::new();

    let storm_path = |n: u64, round: u64| format!("/storm/{n}/{round}");
    let mut paths = vec![("/warm".to_string(), 1024)];
    for &n in &sizes {
        for round in 0..rounds {
            paths.push((storm_path(n, round), BODY));
        }
    }
    let origin = BenchOrigin::new(Bodies::new(paths), ORIGIN_DELAY, CHUNK);
    let edge = rts.server.block_on(start_edge(origin.clone(), 256 << 20));

    println!(
        "coalesce{}: origin waits {} then streams {} KiB in {} KiB chunks",
        if smoke { " (smoke run)" } else { "" },
        fmt_dur(ORIGIN_DELAY),
        BODY / 1024,
        CHUNK / 1024
    );
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for &n in &sizes {
        let mut conns = rts
            .client
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(60), open(edge.addr, n as usize)).await
            })
            .unwrap_or_else(|_| panic!("opening {n} connections: no answer within 60 s"))
            .unwrap_or_else(|e| panic!("opening {n} connections: {e}"));
        let mut storms = Vec::new();
        for round in 0..rounds {
            let path = storm_path(n, round);
            let before = (
                origin.requests(),
                edge.engine.stats.coalesced.load(Ordering::Relaxed),
            );
            let (back, storm) = rts
                .client
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(60), run_storm(conns, &path)).await
                })
                .unwrap_or_else(|_| panic!("storm {path}: no answer within 60 s"))
                .unwrap_or_else(|e| panic!("storm {path}: {e}"));
            conns = back;
            let storm = Storm {
                origin_requests: origin.requests() - before.0,
                coalesced: edge.engine.stats.coalesced.load(Ordering::Relaxed) - before.1,
                ..storm
            };
            let ttfb = Latencies::new(storm.first_byte.clone());
            println!(
                "  storm {n} round {}/{rounds}: origin requests {}, coalesced {}, MISS {} HIT {}, \
                 TTFB p50 {} p99 {}, total {}",
                round + 1,
                storm.origin_requests,
                storm.coalesced,
                storm.misses,
                storm.hits,
                fmt_dur(ttfb.pct(50.0)),
                fmt_dur(ttfb.pct(99.0)),
                fmt_dur(storm.total)
            );
            if storm.origin_requests != 1 {
                failures.push(format!(
                    "storm of {n}, round {}: {} origin requests (expected 1)",
                    round + 1,
                    storm.origin_requests
                ));
            }
            storms.push(storm);
        }
        summary.push((n, storms));
    }

    println!();
    println!(
        "{:>6} {:>16} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9}",
        "storm",
        "origin req/storm",
        "TTFB p50",
        "TTFB p99",
        "TTFB max",
        "last p50",
        "last p99",
        "total"
    );
    for (n, storms) in &summary {
        let origin_reqs: Vec<String> = storms
            .iter()
            .map(|s| s.origin_requests.to_string())
            .collect();
        let ttfb = Latencies::new(storms.iter().flat_map(|s| s.first_byte.clone()).collect());
        let last = Latencies::new(storms.iter().flat_map(|s| s.last_byte.clone()).collect());
        let total = median(storms.iter().map(|s| s.total.as_secs_f64()).collect());
        println!(
            "{:>6} {:>16} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9}",
            n,
            origin_reqs.join(","),
            fmt_dur(ttfb.pct(50.0)),
            fmt_dur(ttfb.pct(99.0)),
            fmt_dur(ttfb.max()),
            fmt_dur(last.pct(50.0)),
            fmt_dur(last.pct(99.0)),
            fmt_dur(Duration::from_secs_f64(total)),
        );
    }
    drop(rts);
    drop(edge);
    assert!(failures.is_empty(), "coalescing failed: {failures:?}");
}

/// Opens `n` connections and uses each once on a cached key, so the edge has accepted them all
/// before a storm starts.
async fn open(addr: std::net::SocketAddr, n: usize) -> io::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(Conn::connect(addr).await?);
    }
    // The first request fills /warm (one origin fetch); every other is a hit.
    let warm = get_request("/warm");
    conns[0].send(&warm).await?;
    let (conns, _) = all_send(conns, &warm, None).await?;
    Ok(conns)
}

/// Every connection sends `path` at once; returns the connections for the next storm.
async fn run_storm(conns: Vec<Conn>, path: &str) -> io::Result<(Vec<Conn>, Storm)> {
    let barrier = Arc::new(Barrier::new(conns.len() + 1));
    let (conns, results) = all_send(conns, &get_request(path), Some(barrier)).await?;
    let t0 = results.start;
    let mut storm = Storm {
        origin_requests: 0,
        coalesced: 0,
        misses: 0,
        hits: 0,
        first_byte: Vec::with_capacity(conns.len()),
        last_byte: Vec::with_capacity(conns.len()),
        total: Duration::ZERO,
    };
    for (reply, done) in results.replies {
        if reply.status != 200 || reply.body_len != BODY as u64 {
            return Err(io::Error::other(format!(
                "{path}: status {} with {} bytes",
                reply.status, reply.body_len
            )));
        }
        match reply.x_cache {
            XCache::Miss => storm.misses += 1,
            XCache::Hit => storm.hits += 1,
            _ => {}
        }
        storm.first_byte.push(micros(reply.first_byte));
        storm.last_byte.push(micros(reply.total));
        storm.total = storm.total.max(done.saturating_duration_since(t0));
    }
    Ok((conns, storm))
}

struct Sent {
    /// When the barrier released the requests.
    start: Instant,
    replies: Vec<(Reply, Instant)>,
}

/// Sends `request` on every connection concurrently (after `barrier`, if any).
async fn all_send(
    conns: Vec<Conn>,
    request: &[u8],
    barrier: Option<Arc<Barrier>>,
) -> io::Result<(Vec<Conn>, Sent)> {
    let request: Arc<[u8]> = request.into();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let request = request.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                if let Some(b) = barrier {
                    b.wait().await;
                }
                let reply = conn.send(&request).await;
                (conn, reply.map(|r| (r, Instant::now())))
            })
        })
        .collect();
    if let Some(b) = &barrier {
        b.wait().await;
    }
    let start = Instant::now();
    let mut conns = Vec::with_capacity(tasks.len());
    let mut replies = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (conn, reply) = t.await.map_err(io::Error::other)?;
        conns.push(conn);
        replies.push(reply?);
    }
    Ok((conns, Sent { start, replies }))
}
