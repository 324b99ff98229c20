//! Closed-loop load: `conns` keep-alive connections, each sending its next request as soon as
//! the previous response is read completely. A warm-up phase is run and thrown away, then the
//! requests that complete inside the measurement window count (completions, so no bias at the
//! window's edges).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::{Conn, XCache, get_request};
use super::{Latencies, micros};

pub struct LoadSpec {
    pub addr: SocketAddr,
    pub path: String,
    pub conns: usize,
    pub warmup: Duration,
    pub measure: Duration,
    /// Every response must be a 200 with exactly this many body bytes.
    pub body_len: u64,
}

pub struct LoadResult {
    /// Requests completed in the measurement window.
    pub requests: u64,
    /// Requests completed in the whole run, warm-up included.
    pub all_requests: u64,
    pub window: Duration,
    pub latency: Latencies,
    /// Responses whose `X-Cache` said anything but `HIT` (the plain server sends none).
    pub not_hits: u64,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }

    /// Body throughput in MiB/s.
    pub fn mib_per_sec(&self, body_len: u64) -> f64 {
        self.rps() * body_len as f64 / (1024.0 * 1024.0)
    }
}

/// Runs the load on the current runtime. Any failed or unexpected response fails the run.
pub async fn run(spec: LoadSpec) -> io::Result<LoadResult> {
    let mut conns = Vec::with_capacity(spec.conns);
    for _ in 0..spec.conns {
        conns.push(Conn::connect(spec.addr).await?);
    }
    let spec = Arc::new(spec);
    let request: Arc<[u8]> = get_request(&spec.path).into();
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.measure;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let spec = spec.clone();
            let request = request.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let mut not_hits = 0u64;
                let mut count = 0u64;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let reply = conn.send(&request).await?;
                    if reply.status != 200 || reply.body_len != spec.body_len {
                        return Err(io::Error::other(format!(
                            "{}: got status {} with {} bytes, expected 200 with {}",
                            spec.path, reply.status, reply.body_len, spec.body_len
                        )));
                    }
                    count += 1;
                    let done = sent + reply.total;
                    if done >= measure_from && done <= end {
                        lat.push(micros(reply.total));
                        if !matches!(reply.x_cache, XCache::Hit | XCache::Absent) {
                            not_hits += 1;
                        }
                    }
                }
                Ok::<_, io::Error>((lat, not_hits, count))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut not_hits = 0;
    let mut all_requests = 0;
    for t in tasks {
        let (lat, n, count) = t.await.map_err(io::Error::other)??;
        all.extend(lat);
        not_hits += n;
        all_requests += count;
    }
    Ok(LoadResult {
        requests: all.len() as u64,
        all_requests,
        window: spec.measure,
        latency: Latencies::new(all),
        not_hits,
    })
}
