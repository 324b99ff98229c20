//! Origin protection (issue 18): the origin's request rate and the client error rate through
//! three scenarios, with the edge's defaults (stale on error 60 s, prefresh 0.9, the circuit
//! breaker) and an origin budget of 32 connections.
//!
//! 1. **Outage**: steady load on 100 cached objects with `max-age=1`; the origin is up, then
//!    down (its port refuses connections) for OUTPOST_BENCH_OUTAGE_SECS (60), then up again.
//!    Expected: no client error while the objects are within the stale-on-error window.
//! 2. **Flash crowd**: every connection asks for the same 1,000 cold URLs (`max-age=60`) at
//!    once, each in its own order; the origin takes 20 ms per answer. Expected: one origin
//!    request per URL (coalescing), no client error.
//! 3. **Hot key**: every connection asks for one URL with `max-age=1` for 10 s. Expected:
//!    about one origin request per second (prefresh keeps it from ever missing).
//!
//! Run: `cargo bench --bench origin_protection` (release; ~100 s). Settings:
//! OUTPOST_BENCH_CONNS (client connections, 16), OUTPOST_BENCH_OUTAGE_SECS (60).
//! `cargo test --benches` or `-- --test` does a short smoke run (2 s outage, 100 cold URLs).
//!
//! Setup: one process, two runtimes (edge; clients and the origin). The origin is a hyper
//! HTTP/1 server on 127.0.0.1 answering `/o/<n>`, `/cold/<n>` and `/hot` with 1 KiB; "down"
//! drops its listener, so connects are refused. The edge is the real `EdgeServer` with its
//! HTTP client (no injected upstream), memory tier only. Clients are closed-loop keep-alive
//! connections; an answer that is not a 200 is a client error.
//!
//! Numbers: 2 cores / 24 GiB, nothing else running, 2026-12-05, main at d00a69e + this bench,
//! 16 connections, 60 s outage:
//!
//! | scenario | phase | seconds | client req/s | client errors | HIT share | origin requests | origin req/s |
//! |---|---|---:|---:|---:|---:|---:|---:|
//! | outage | origin up | 5.0 | 103781 | 0 | 100.0% | 600 | 120.0 |
//! | outage | origin down | 60.0 | 40206 | 0 | 2.2% | 0 | 0.0 |
//! | outage | origin back | 5.0 | 97054 | 0 | 96.4% | 580 | 116.0 |
//! | flash crowd | 1000 cold URLs x 16 clients | 19.2 | 835 | 0 | 13.5% | 1000 | 52.2 |
//! | hot key | max-age=1 | 10.0 | 113529 | 0 | 100.0% | 12 | 1.2 |
//!
//! - Outage: no client error in 60 s of outage; every answer is the stale copy (the rest of
//!   the HIT share is STALE), and the origin gets no request at all while down (the breaker
//!   fails them at once, and refused connects are all it could have seen). While up, 100
//!   objects with a 1 s lifetime cost 120 origin requests/s: prefresh revalidates each at 90%
//!   of its lifetime, so none of them ever misses.
//! - Flash crowd: 16,000 requests for 1,000 cold URLs cost exactly 1,000 origin requests
//!   (coalescing). The rate is the origin's 20 ms per answer: 16 closed-loop clients mostly
//!   wait on fills (their joins count as MISS).
//! - Hot key: 1.1 million requests, 12 origin requests in 10 s, every answer a HIT.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::client::{Conn, XCache, get_request};
use support::{Runtimes, env_u64};
use tokio::net::TcpListener;

const BODY: usize = 1024;

/// The origin: up or down, counting the requests it answers.
struct Origin {
    addr: SocketAddr,
    requests: AtomicU64,
    up: AtomicBool,
    delay: Duration,
}

impl Origin {
    /// Serves while up; when it goes down the listener is dropped (connects are refused) and
    /// it binds the same port again when it comes back.
    async fn start(delay: Duration) -> Arc<Origin> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let origin = Arc::new(Origin {
            addr: listener.local_addr().expect("addr"),
            requests: AtomicU64::new(0),
            up: AtomicBool::new(true),
            delay,
        });
        let o = origin.clone();
        tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                match (&listener, o.up.load(Ordering::Acquire)) {
                    (Some(l), true) => {
                        let accepted =
                            tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
                        if let Ok(Ok((tcp, _))) = accepted {
                            tokio::spawn(o.clone().serve(tcp));
                        }
                    }
                    (Some(_), false) => listener = None,
                    (None, true) => listener = TcpListener::bind(o.addr).await.ok(),
                    (None, false) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        origin
    }

    async fn serve(self: Arc<Self>, tcp: tokio::net::TcpStream) {
        let o = self.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let o = o.clone();
            async move {
                o.requests.fetch_add(1, Ordering::Relaxed);
                if !o.delay.is_zero() {
                    tokio::time::sleep(o.delay).await;
                }
                let cc = if req.uri().path().starts_with("/cold/") {
                    "public, max-age=60"
                } else {
                    "public, max-age=1"
                };
                let mut r = Response::new(Full::new(Bytes::from(vec![b'o'; BODY])));
                r.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static(cc));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                Ok::<_, Infallible>(r)
            }
        });
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
        tokio::pin!(conn);
        // A connection of a down origin is cut, as a crashed process's would be.
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if !self.up.load(Ordering::Acquire) {
                        return;
                    }
                }
            }
        }
    }
}

/// The real `EdgeServer` (its own HTTP client to the origin), memory tier only, with an
/// origin budget of 32 connections; it serves until dropped.
async fn start_edge(origin: SocketAddr) -> support::disk::InProcessEdge {
    support::disk::InProcessEdge::from_toml(format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\norigin = \"http://{origin}\"\n[cache]\nmemory = \"256MiB\"\n[limits]\nupstream_max_connections = 32\n"
    ))
    .await
}

/// What the clients saw in one phase.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    errors: AtomicU64,
    hits: AtomicU64,
    other: AtomicU64,
}

/// Closed-loop clients over `paths(conn, i)` until `stop`; reconnects after a closed
/// connection (an error answer may close it).
async fn clients(
    edge: SocketAddr,
    conns: usize,
    paths: Arc<dyn Fn(usize, u64) -> Option<String> + Send + Sync>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut all = tokio::task::JoinSet::new();
    for c in 0..conns {
        let (paths, tally, stop) = (paths.clone(), tally.clone(), stop.clone());
        all.spawn(async move {
            let mut conn = Conn::connect(edge).await.expect("connect to the edge");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Some(path) = paths(c, i) else { break };
                i += 1;
                match conn.send(&get_request(&path)).await {
                    Ok(r) => {
                        tally.requests.fetch_add(1, Ordering::Relaxed);
                        if r.status != 200 {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                        } else if r.x_cache == XCache::Hit {
                            tally.hits.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        tally.requests.fetch_add(1, Ordering::Relaxed);
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        conn = Conn::connect(edge).await.expect("reconnect to the edge");
                    }
                }
            }
        });
    }
    while all.join_next().await.is_some() {}
}

struct Row {
    scenario: &'static str,
    phase: String,
    secs: f64,
    client_rps: f64,
    errors: u64,
    hit_share: f64,
    origin_requests: u64,
}

fn main() {
    let smoke = support::smoke_mode();
    let conns = env_u64("OUTPOST_BENCH_CONNS", 16) as usize;
    let outage = if smoke {
        2
    } else {
        env_u64("OUTPOST_BENCH_OUTAGE_SECS", 60)
    };
    let cold = if smoke { 100 } else { 1000 };
    let hot_secs = if smoke { 2 } else { 10 };
    let rts = Runtimes::new();
    let mut rows = Vec::new();

    // 1. Outage.
    let origin = rts.client.block_on(Origin::start(Duration::ZERO));
    let edge = rts.server.block_on(start_edge(origin.addr));
    let edge_addr = edge.addr;
    let paths: Arc<dyn Fn(usize, u64) -> Option<String> + Send + Sync> =
        Arc::new(|c, i| Some(format!("/o/{}", (c as u64 * 7 + i * 13) % 100)));
    for (phase, secs, up) in [
        ("origin up", 5, true),
        ("origin down", outage, false),
        ("origin back", 5, true),
    ] {
        origin.up.store(up, Ordering::Release);
        rows.push(phase_run(
            &rts,
            edge_addr,
            conns,
            paths.clone(),
            "outage",
            phase,
            Duration::from_secs(secs),
            &origin,
        ));
    }

    // 2. Flash crowd.
    let origin = rts
        .client
        .block_on(Origin::start(Duration::from_millis(20)));
    let edge = rts.server.block_on(start_edge(origin.addr));
    let edge_addr = edge.addr;
    let n = cold;
    let paths: Arc<dyn Fn(usize, u64) -> Option<String> + Send + Sync> = Arc::new(move |c, i| {
        (i < n).then(|| format!("/cold/{}", (i * 7919 + c as u64 * 104_729) % n))
    });
    rows.push(phase_run(
        &rts,
        edge_addr,
        conns,
        paths,
        "flash crowd",
        &format!("{n} cold URLs x {conns} clients"),
        Duration::from_secs(600),
        &origin,
    ));

    // 3. Hot key.
    let origin = rts.client.block_on(Origin::start(Duration::ZERO));
    let edge = rts.server.block_on(start_edge(origin.addr));
    let edge_addr = edge.addr;
    let paths: Arc<dyn Fn(usize, u64) -> Option<String> + Send + Sync> =
        Arc::new(|_, _| Some("/hot".to_string()));
    rows.push(phase_run(
        &rts,
        edge_addr,
        conns,
        paths,
        "hot key",
        "max-age=1",
        Duration::from_secs(hot_secs),
        &origin,
    ));

    println!(
        "origin_protection{}: {conns} connections",
        if smoke { " (smoke run)" } else { "" }
    );
    println!(
        "| scenario | phase | seconds | client req/s | client errors | HIT share | origin requests | origin req/s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut failures = BTreeMap::new();
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.0} | {} | {:.1}% | {} | {:.1} |",
            r.scenario,
            r.phase,
            r.secs,
            r.client_rps,
            r.errors,
            r.hit_share * 100.0,
            r.origin_requests,
            r.origin_requests as f64 / r.secs
        );
        if r.errors > 0 || r.client_rps == 0.0 {
            failures.insert(format!("{} / {}", r.scenario, r.phase), r.errors);
        }
    }
    let crowd = &rows[3];
    if crowd.origin_requests > cold {
        failures.insert(
            "flash crowd: origin requests over one per URL".into(),
            crowd.origin_requests,
        );
    }
    if !failures.is_empty() {
        eprintln!("origin_protection: {failures:?}");
        std::process::exit(1);
    }
}

#[allow(clippy::too_many_arguments)]
fn phase_run(
    rts: &Runtimes,
    edge: SocketAddr,
    conns: usize,
    paths: Arc<dyn Fn(usize, u64) -> Option<String> + Send + Sync>,
    scenario: &'static str,
    phase: &str,
    most: Duration,
    origin: &Origin,
) -> Row {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let before = origin.requests.load(Ordering::Relaxed);
    let started = Instant::now();
    let timer = {
        let stop = stop.clone();
        rts.client.spawn(async move {
            tokio::time::sleep(most).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    rts.client
        .block_on(clients(edge, conns, paths, tally.clone(), stop));
    timer.abort();
    let secs = started.elapsed().as_secs_f64();
    let requests = tally.requests.load(Ordering::Relaxed);
    Row {
        scenario,
        phase: phase.to_string(),
        secs,
        client_rps: requests as f64 / secs,
        errors: tally.errors.load(Ordering::Relaxed),
        hit_share: tally.hits.load(Ordering::Relaxed) as f64 / requests.max(1) as f64,
        origin_requests: origin.requests.load(Ordering::Relaxed) - before,
    }
}
