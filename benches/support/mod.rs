//! Shared pieces of the load-test benches (`hit_path`, `coalesce`): run mode and settings from
//! the environment, two tokio runtimes, latency summaries.
//!
//! - [`client`]: a minimal keep-alive HTTP/1.1 client over a raw `TcpStream`.
//! - [`loadgen`]: the closed-loop load generator built on it.
//! - [`servers`]: the in-process origin, the plain hyper baseline server and an edge.
//! - [`disk`]: an origin on a socket with a body per URL, an in-process edge with an admin
//!   port, unique misses, `/stats` disk admissions (`disk_miss`, `restart`).

// Each bench binary uses only part of this module.
#![allow(dead_code)]

pub mod client;
pub mod disk;
pub mod loadgen;
pub mod servers;

use std::time::Duration;

/// `cargo bench` passes `--bench` to a `harness = false` binary; `cargo test --benches` does
/// not, and `cargo bench -- --test` adds `--test`. Without `--bench`, or with `--test`, the
/// benches do a tiny smoke run so they cannot rot.
pub fn smoke_mode() -> bool {
    // Logs of the servers under test, when asked for (`RUST_LOG=outpost_edge=debug`).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench")
}

/// Positional arguments (`cargo bench --bench hit_path -- memory`): case-name filters.
pub fn filters() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect()
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

pub fn env_secs(name: &str, default: f64) -> Duration {
    match std::env::var(name) {
        Ok(v) => Duration::from_secs_f64(
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number of seconds")),
        ),
        Err(_) => Duration::from_secs_f64(default),
    }
}

pub fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a list like 200,1000"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// The servers run on one runtime and the load generator on another, so the client never
/// steals work from the server's worker threads (as an external load generator would not).
/// `OUTPOST_BENCH_SERVER_THREADS` (default: one per core) and `OUTPOST_BENCH_CLIENT_THREADS`
/// (default 2) size them.
pub struct Runtimes {
    pub server: tokio::runtime::Runtime,
    pub client: tokio::runtime::Runtime,
}

impl Runtimes {
    /// Thread name prefix of the server runtime (see [`threads_cpu`]).
    pub const SERVER_THREADS: &'static str = "bench-server";

    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
        let build = |name: &str, threads: u64| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1) as usize)
                .thread_name(name)
                // Blocking threads stay for the whole run: [`threads_cpu`] reads live threads
                // only, so one that exited during a case took its CPU out of that case's sum
                // (after streams of large disk hits, the next case's CPU read as half its own).
                .thread_keep_alive(Duration::from_secs(24 * 3600))
                .enable_all()
                .build()
                .expect("tokio runtime")
        };
        Self {
            server: build(
                Self::SERVER_THREADS,
                env_u64("OUTPOST_BENCH_SERVER_THREADS", cores),
            ),
            client: build("bench-client", env_u64("OUTPOST_BENCH_CLIENT_THREADS", 2)),
        }
    }
}

impl Default for Runtimes {
    fn default() -> Self {
        Self::new()
    }
}

/// CPU time used so far by this process's threads whose name starts with `prefix` (Linux
/// `/proc/self/task/*/schedstat`, nanosecond resolution). `None` where that is unavailable.
/// Unlike requests per second, CPU per request barely moves when other jobs share the machine.
pub fn threads_cpu(prefix: &str) -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = task.path();
        // A thread may exit between the listing and the reads: skip it.
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// Latencies in microseconds, sorted once.
pub struct Latencies(Vec<u32>);

impl Latencies {
    pub fn new(mut micros: Vec<u32>) -> Self {
        micros.sort_unstable();
        Self(micros)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Every value, sorted.
    pub fn values(&self) -> &[u32] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `p`-th percentile (0..=100), nearest rank.
    pub fn pct(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.0.len()) - 1;
        Duration::from_micros(u64::from(self.0[i]))
    }

    pub fn max(&self) -> Duration {
        Duration::from_micros(u64::from(self.0.last().copied().unwrap_or(0)))
    }
}

pub fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// `1.23 ms` or `456 µs`.
pub fn fmt_dur(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else if d >= Duration::from_millis(1) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{} µs", d.as_micros())
    }
}

/// The median of a few runs' values (for repeated rounds).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
