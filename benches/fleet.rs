//! Fleet purges: how long a purge takes to be applied on every node of a fleet (issue 17).
//! Target: p99 < 100 ms from the API call to "applied on all 5 nodes".
//!
//! Run: `cargo bench --bench fleet` (release; needs `nats-server`, Debian's package; ~1 min).
//! Settings: OUTPOST_BENCH_NODES (5), OUTPOST_BENCH_PURGES (1000), OUTPOST_BENCH_SECS (seconds
//! of the throughput phase, 10), OUTPOST_BENCH_CONNS (hit load connections per node, 4),
//! OUTPOST_BENCH_PURGERS (concurrent purge clients in the throughput phase, 8). `cargo test
//! --benches` or `-- --test` does a smoke run (2 nodes, 20 purges, 1 s).
//!
//! Setup: one `nats-server -js` on loopback (store in a temp dir), and N edges in this process
//! (`EdgeServer`, each with a disk tier in a temp dir and `[fleet]` pointing at that server,
//! `receipt_wait = 5s`), in front of one origin on a socket. A purge's receipt is written when
//! every node reports it applied (or the wait ends), so the time from sending `POST /purge` to
//! its answer is the time until the purge was applied on all N nodes, plus the reports' trip
//! back. Every receipt must list N nodes, all confirmed, or the bench fails.
//! - Latency: purges one at a time, each by URL, sent to the nodes in turn; p50, p99 and max of
//!   the API call.
//! - Throughput: OUTPOST_BENCH_PURGERS clients purge as fast as their receipts come back, while
//!   closed-loop clients request a cached object (memory hits) on every node; purges per second,
//!   hits per second, and the latency of those purges.
//!
//! Numbers: 2 cores / 24 GiB, nothing else running, 2026-12-05, nats-server 2.9.10 (Debian),
//! 5 nodes, 1000 purges, 10 s of 8 purge clients beside 4 hit connections per node; two runs:
//!
//! | phase | run | purges | p50 | p99 | max | purges/s | hits/s (all nodes) |
//! |---|---|---:|---:|---:|---:|---:|---:|
//! | one at a time | 1 | 1000 | 4.15 ms | 7.22 ms | 15.4 ms | | |
//! | one at a time | 2 | 1000 | 5.23 ms | 9.45 ms | 11.5 ms | | |
//! | 8 clients, beside hits | 1 | 1958 | 40.0 ms | 64.9 ms | 73.2 ms | 196 | 18 339 |
//! | 8 clients, beside hits | 2 | 1687 | 46.5 ms | 75.5 ms | 100.7 ms | 169 | 15 596 |
//!
//!
//! After the review fixes (one purge in flight per node consumer, one sender per node,
//! reports spaced while a backlog is applied), same machine and settings, one run:
//!
//! | phase | purges | p50 | p99 | max | purges/s | hits/s (all nodes) |
//! |---|---:|---:|---:|---:|---:|---:|
//! | one at a time | 1000 | 5.34 ms | 9.42 ms | 13.9 ms | | |
//! | 8 clients, beside hits | 1652 | 48.0 ms | 69.9 ms | 83.2 ms | 165 | 15 868 |
//!
//! Target met: p99 7-9 ms one at a time (the API call includes the receipt's wait for the
//! slowest node's report). Under a sustained stream of purges, each node's own purge log (synced
//! to disk before a purge counts) and the reports of all five nodes share the two cores with the
//! hit load: ~170-200 fully confirmed purges per second, p99 65-76 ms.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::disk::{InProcessEdge, Origin, http_get, temp_dir};
use support::loadgen::{LoadSpec, run as load};
use support::{Latencies, env_u64, fmt_dur, micros, smoke_mode};

const BODY: usize = 1024;

struct Nats(Child);

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (probed: bound, then released for nats-server).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_nats(store: &std::path::Path) -> (Nats, u16) {
    let bin = outpost_fleet::nats_server_binary().unwrap_or_else(|| {
        eprintln!("fleet bench: nats-server is not installed (apt install nats-server)");
        std::process::exit(2);
    });
    let port = free_port();
    let child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    let nats = Nats(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (nats, port)
}

/// `GET` on an admin port: (status, body).
fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    match http_get(admin, path, Duration::from_secs(5)) {
        Ok(g) => (g.status, String::from_utf8_lossy(&g.body).into_owned()),
        Err(_) => (0, String::new()),
    }
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "not within 60 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One purge by URL through `admin`; its duration. Fails the bench unless `nodes` confirmed.
async fn purge(c: &reqwest::Client, admin: SocketAddr, path: &str, nodes: usize) -> Duration {
    let started = Instant::now();
    let r = c
        .post(format!("http://{admin}/purge"))
        .header("content-type", "application/json")
        .body(format!("{{\"urls\":[\"{path}\"]}}"))
        .send()
        .await
        .expect("POST /purge");
    let status = r.status();
    let body = r.bytes().await.expect("a receipt");
    let receipt: serde_json::Value = serde_json::from_slice(&body).expect("a JSON receipt");
    let took = started.elapsed();
    assert_eq!(status, 200, "{receipt}");
    let listed = receipt["nodes"].as_array().expect("nodes");
    assert!(
        listed.len() == nodes && listed.iter().all(|n| n["ok"] == true),
        "every node confirms: {receipt}"
    );
    took
}

fn summary(label: &str, l: &Latencies) {
    println!(
        "{label:<34} {:>6} purges  p50 {:>9}  p99 {:>9}  max {:>9}",
        l.len(),
        fmt_dur(l.pct(50.0)),
        fmt_dur(l.pct(99.0)),
        fmt_dur(l.max())
    );
}

fn main() {
    let smoke = smoke_mode();
    let n = if smoke {
        2
    } else {
        env_u64("OUTPOST_BENCH_NODES", 5) as usize
    };
    let purges = if smoke {
        20
    } else {
        env_u64("OUTPOST_BENCH_PURGES", 1000)
    };
    let secs = if smoke {
        1
    } else {
        env_u64("OUTPOST_BENCH_SECS", 10)
    };
    let conns = env_u64("OUTPOST_BENCH_CONNS", 4) as usize;
    let purgers = env_u64("OUTPOST_BENCH_PURGERS", 8) as usize;
    if smoke && outpost_fleet::nats_server_binary().is_none() {
        eprintln!("fleet bench: skipped (nats-server is not installed)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = temp_dir();
        let (_nats, port) = start_nats(store.path()).await;
        let origin = Origin::start(BODY).await;
        let dirs: Vec<_> = (0..n).map(|_| temp_dir()).collect();
        let mut edges = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let text = format!(
                "name = \"edge-{i}\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 origin = \"http://{}\"\n[cache]\ndir = {:?}\nmemory = \"64MiB\"\n\
                 [fleet]\nservers = [\"nats://127.0.0.1:{port}\"]\nreceipt_wait = \"5s\"\n",
                origin.addr,
                dir.path().display().to_string()
            );
            edges.push(InProcessEdge::from_toml(text).await);
        }
        for e in &edges {
            wait_for("every node is ready", || admin_get(e.admin, "/readyz").0 == 200).await;
            // The hot object for the hit load, cached on every node.
            http_get(e.addr, "/hot", Duration::from_secs(5)).expect("warm /hot");
        }
        wait_for("the first node sees every node", || {
            let (_, body) = admin_get(edges[0].admin, "/fleet");
            serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["nodes"].as_array().map(Vec::len))
                == Some(n)
        })
        .await;
        println!(
            "fleet: {n} nodes, nats-server on 127.0.0.1:{port}, {purges} purges one at a time, then {secs} s of {purgers} purge clients beside {conns} hit connections per node"
        );
        // reqwest is built without a TLS provider of its own: the workspace's one.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let c = reqwest::Client::new();

        // Latency, one purge at a time.
        let mut took = Vec::with_capacity(purges as usize);
        for i in 0..purges {
            let admin = edges[i as usize % n].admin;
            took.push(micros(purge(&c, admin, &format!("/p/{i}"), n).await));
        }
        let sequential = Latencies::new(took);
        summary("one at a time", &sequential);

        // Throughput, with hits on every node.
        let window = Duration::from_secs(secs);
        let hit_loads: Vec<_> = edges
            .iter()
            .map(|e| {
                tokio::spawn(load(LoadSpec {
                    addr: e.addr,
                    path: "/hot".into(),
                    conns,
                    warmup: Duration::ZERO,
                    measure: window,
                    body_len: BODY as u64,
                }))
            })
            .collect();
        let next = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + window;
        let admins: Arc<Vec<SocketAddr>> = Arc::new(edges.iter().map(|e| e.admin).collect());
        let clients: Vec<_> = (0..purgers)
            .map(|_| {
                let (c, next, admins) = (c.clone(), next.clone(), admins.clone());
                tokio::spawn(async move {
                    let mut took = Vec::new();
                    while Instant::now() < deadline {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let admin = admins[i as usize % admins.len()];
                        took.push(micros(purge(&c, admin, &format!("/q/{i}"), admins.len()).await));
                    }
                    took
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in clients {
            all.extend(t.await.expect("a purge client"));
        }
        let mut hits = 0.0;
        for h in hit_loads {
            let r = h.await.expect("a hit load").expect("hits");
            assert_eq!(r.not_hits, 0, "every hit-load answer is a HIT");
            hits += r.rps();
        }
        let concurrent = Latencies::new(all);
        summary("concurrent, beside hits", &concurrent);
        println!(
            "throughput: {:.0} purges/s (each confirmed by all {n} nodes), {hits:.0} hits/s across the nodes",
            concurrent.len() as f64 / window.as_secs_f64()
        );
        let target = sequential.pct(99.0) < Duration::from_millis(100);
        println!(
            "target p99 < 100 ms (one at a time): {}",
            if target { "met" } else { "NOT met" }
        );
        for e in edges {
            e.stop().await;
        }
    });
}
