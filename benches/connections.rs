//! Connection bounds under abuse (issue 13, item 5): 2,000 connections that never finish a
//! request or never end, while a canary client keeps asking for a page. Reports, per kind, how
//! long the edge took to close them against the timeout that bounds them, the canary's
//! latency and failures throughout, and the edge's CPU while it holds them, against the same
//! edge idle for as long (the reference; before the fix, 1,900 stalled h2 prefaces burned 114%
//! of a core and were never closed).
//!
//! Run: `cargo bench --bench connections` (release; ~15 s). Settings: OUTPOST_BENCH_CONNS
//! (total, 2000; split evenly over the five kinds). `cargo test --benches` does a smoke run of
//! 20. Needs `ulimit -n` above twice the total (client and server ends live in one process).
//!
//! Kinds: `silent` (connects, sends nothing), `preface-stall` (sends `PRI * HTTP/2.0\r\n`, then
//! nothing), `preface-halfclose` (the same, then shuts its write side), `h1-idle` (one GET, then
//! keep-alive and nothing), `h2-idle-ping` (HTTP/2, one GET, then idle while its client PINGs
//! every 500 ms and answers the server's PINGs). The edge runs with header_read_timeout = 2 s
//! and idle_timeout = 3 s.
//!
//! Last numbers: 2 cores / 24 GiB shared with two builds, 2026-12-04, tree of the issue 13 edge
//! work, one run (`cargo bench --bench connections`):
//!
//! | kind              | conns | closed | bound | p50 close | max close |
//! |-------------------|------:|-------:|------:|----------:|----------:|
//! | silent            |   400 |    400 |   2 s |   2.00 s  |   2.02 s  |
//! | preface-stall     |   400 |    400 |   2 s |   2.00 s  |   2.02 s  |
//! | preface-halfclose |   400 |    400 |   2 s |   5.7 ms  |  80.6 ms  |
//! | h1-idle           |   400 |    400 |   2 s |   1.99 s  |   2.00 s  |
//! | h2-idle-ping      |   400 |    400 |   3 s |   3.72 s  |   3.76 s  |
//!
//! Canary (a new connection and a GET every 50 ms, throughout): 92 requests, 0 failed, p50
//! 346 µs, max 67.3 ms. Edge CPU while holding and closing the 2,000: 0.17 s over 4.9 s (3.5%
//! of a core); the reference, the same edge idle for 7 s: 0.00 s. Before this work the
//! `preface-stall` and `preface-halfclose` kinds were never closed (and spun), and
//! `h2-idle-ping` was never closed.
//!
//! The idle timer ticks four times per `idle_timeout`, so an idle connection closes between 1x
//! and 1.25x `idle_timeout` after its last request. HTTP/1 keep-alive connections wait for a
//! request head, so `header_read_timeout` bounds them first.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_config::Source;
use outpost_edge::cache::clock::Clock;
use outpost_edge::{EdgeConfig, EdgeOverrides, EdgeServer};
use support::servers::{BenchOrigin, Bodies};
use support::{Latencies, Runtimes, env_u64, fmt_dur, micros, smoke_mode, threads_cpu};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
const KINDS: [&str; 5] = [
    "silent",
    "preface-stall",
    "preface-halfclose",
    "h1-idle",
    "h2-idle-ping",
];

fn main() {
    let smoke = smoke_mode();
    let total = if smoke {
        20
    } else {
        env_u64("OUTPOST_BENCH_CONNS", 2000)
    };
    let per_kind = (total / KINDS.len() as u64).max(1) as usize;
    let rt = Runtimes::new();
    let origin = BenchOrigin::new(
        Bodies::new([("/canary".to_string(), 1024)]),
        Duration::ZERO,
        0,
    );
    let addr = rt.server.block_on(start(origin));
    // Reference: the same edge, idle, for as long as the abuse will take.
    let window = IDLE_TIMEOUT * 2 + Duration::from_secs(1);
    let cpu0 = threads_cpu(Runtimes::SERVER_THREADS).unwrap_or_default();
    std::thread::sleep(window);
    let idle_cpu = threads_cpu(Runtimes::SERVER_THREADS).unwrap_or_default() - cpu0;

    let result = rt.client.block_on(async move {
        let canary_done = Arc::new(AtomicU64::new(0));
        let canary = tokio::spawn(canary(addr, canary_done.clone()));
        let cpu0 = threads_cpu(Runtimes::SERVER_THREADS).unwrap_or_default();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for kind in KINDS {
            for _ in 0..per_kind {
                tasks.push(tokio::spawn(hold(addr, kind)));
            }
        }
        let mut closes: Vec<(&str, Option<Duration>)> = Vec::new();
        for t in tasks {
            closes.push(t.await.expect("connection task"));
        }
        let held = started.elapsed();
        let cpu = threads_cpu(Runtimes::SERVER_THREADS).unwrap_or_default() - cpu0;
        canary_done.store(1, Ordering::Relaxed);
        let (lat, failed) = canary.await.expect("canary");
        (closes, held, cpu, lat, failed)
    });
    let (closes, held, cpu, lat, failed) = result;
    println!("| kind              | conns | closed | bound | p50 close | max close |");
    println!("|-------------------|------:|-------:|------:|----------:|----------:|");
    for kind in KINDS {
        // HTTP/1 keep-alive waits for the next request head: the header timeout bounds it.
        let bound = if kind == "h2-idle-ping" {
            IDLE_TIMEOUT
        } else {
            HEADER_TIMEOUT
        };
        let mut times: Vec<u32> = closes
            .iter()
            .filter(|(k, _)| *k == kind)
            .filter_map(|(_, t)| t.map(micros))
            .collect();
        let n = closes.iter().filter(|(k, _)| *k == kind).count();
        let closed = times.len();
        times.sort_unstable();
        let l = Latencies::new(times);
        println!(
            "| {kind:<17} | {n:>5} | {closed:>6} | {:>5} | {:>9} | {:>9} |",
            format!("{} s", bound.as_secs()),
            if l.is_empty() {
                "-".into()
            } else {
                fmt_dur(l.pct(50.0))
            },
            if l.is_empty() {
                "-".into()
            } else {
                fmt_dur(l.max())
            },
        );
        assert_eq!(closed, n, "{kind}: connections left open");
    }
    println!(
        "canary: {} requests, {failed} failed, p50 {}, max {}",
        lat.len(),
        fmt_dur(lat.pct(50.0)),
        fmt_dur(lat.max())
    );
    println!(
        "edge CPU while holding and closing {total}: {:.2} s over {:.1} s ({:.1}% of a core); idle reference: {:.2} s over {:.1} s",
        cpu.as_secs_f64(),
        held.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / held.as_secs_f64(),
        idle_cpu.as_secs_f64(),
        window.as_secs_f64(),
    );
    assert_eq!(
        failed, 0,
        "the canary was refused while the edge held the abusive connections"
    );
}

async fn start(origin: Arc<BenchOrigin>) -> SocketAddr {
    let text = format!(
        "listen = \"127.0.0.1:0\"\norigin = \"http://127.0.0.1:9\"\n[limits]\nheader_read_timeout = \"{}s\"\nidle_timeout = \"{}s\"\n",
        HEADER_TIMEOUT.as_secs(),
        IDLE_TIMEOUT.as_secs()
    );
    let cfg = EdgeConfig::from_source(
        &Source::inline("bench-connections.toml", text),
        EdgeOverrides::default(),
    )
    .unwrap_or_else(|e| panic!("bench edge config: {e}"));
    let server = EdgeServer::bind_with(cfg, Clock::system(), Some(origin))
        .await
        .unwrap_or_else(|e| panic!("bench edge: {e}"));
    let addr = server.local_addr();
    tokio::spawn(server.run(std::future::pending()));
    addr
}

/// Opens one abusive connection of `kind` and waits (up to 30 s) for the edge to close it:
/// how long that took after the connection's last byte, or `None` if it stayed open.
async fn hold(addr: SocketAddr, kind: &'static str) -> (&'static str, Option<Duration>) {
    let limit = Duration::from_secs(30);
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return (kind, None);
    };
    match kind {
        "silent" => {}
        "preface-stall" => {
            let _ = tcp.write_all(b"PRI * HTTP/2.0\r\n").await;
        }
        "preface-halfclose" => {
            let _ = tcp.write_all(b"PRI * HTTP/2.0\r\n").await;
            let _ = tcp.shutdown().await;
        }
        "h1-idle" => {
            let _ = tcp
                .write_all(b"GET /canary HTTP/1.1\r\nhost: bench\r\n\r\n")
                .await;
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            // The head and the 1 KiB body.
            while got < 1024 {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return (kind, Some(Duration::ZERO)),
                    Ok(n) => got += n,
                }
            }
        }
        _ => return (kind, h2_idle(tcp, limit).await),
    }
    let since = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((since + limit).into(), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (kind, Some(since.elapsed())),
            Ok(Ok(_)) => continue,
            Err(_) => return (kind, None),
        }
    }
}

/// An HTTP/2 client that sends one GET, then stays idle while PINGing.
async fn h2_idle(tcp: TcpStream, limit: Duration) -> Option<Duration> {
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(500))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .ok()?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://bench/canary")
        .body(http_body_util::Empty::<Bytes>::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    let since = Instant::now();
    let _ = tokio::time::timeout(limit, conn).await.ok()?;
    Some(since.elapsed())
}

/// A new connection and one GET every 50 ms until `done`: latencies and failures.
async fn canary(addr: SocketAddr, done: Arc<AtomicU64>) -> (Latencies, u64) {
    let mut lat = Vec::new();
    let mut failed = 0;
    while done.load(Ordering::Relaxed) == 0 {
        let t = Instant::now();
        let ok = async {
            let mut tcp = TcpStream::connect(addr).await.ok()?;
            tcp.write_all(b"GET /canary HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut out = Vec::new();
            tcp.read_to_end(&mut out).await.ok()?;
            out.starts_with(b"HTTP/1.1 200").then_some(())
        };
        match tokio::time::timeout(Duration::from_secs(5), ok).await {
            Ok(Some(())) => lat.push(micros(t.elapsed())),
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (Latencies::new(lat), failed)
}
