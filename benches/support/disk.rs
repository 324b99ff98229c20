//! Pieces of the disk-tier benches (`disk_miss`, `restart`), built on the edge's public
//! interfaces only (`EdgeServer`, `EdgeConfig`, the admin port's `/stats`, the `X-Cache`
//! header), so they keep working while the disk tier's internals change:
//!
//! - [`Origin`]: a hyper HTTP/1 origin on 127.0.0.1 answering any path with a body of its own
//!   (distinct bytes per URL, so content-addressed storage cannot share them), counting requests.
//! - [`InProcessEdge`]: an `EdgeServer` in this process in front of an origin on a socket (the
//!   edge's real upstream client, keep-alive), with an admin port, stopped cleanly.
//! - [`unique_misses`]: closed-loop load of never-repeated URLs that must all be 200 MISS.
//! - [`disk_state`] and [`wait_settled`]: the disk admission counters from `/stats`.
//! - [`http_get`]: a one-shot blocking GET (admin requests, start-up probes).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use outpost_config::Source;
use outpost_edge::{EdgeConfig, EdgeOverrides, EdgeServer};
use tokio::net::TcpListener;

use super::client::{Conn, XCache, get_request};
use super::{Latencies, micros};

/// How long the origin's answers stay fresh: a year, so that a fill kept between runs of the
/// restart bench is still served from disk, not revalidated, hours later.
pub const MAX_AGE_SECS: u64 = 365 * 24 * 3600;

/// The origin: every path answers 200 with `len` bytes (the path's bytes, then a repeating
/// pattern), `Cache-Control: public, max-age=<MAX_AGE_SECS>`, `application/octet-stream`
/// (never compressed). Runs on the current runtime.
pub struct Origin {
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl Origin {
    pub async fn start(len: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(AtomicU64::new(0));
        let base = super::servers::pattern(len);
        let counter = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (base, counter) = (base.clone(), counter.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let body = unique_body(&base, req.uri().path().as_bytes());
                    async move { Ok::<_, Infallible>(origin_response(body)) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, requests }
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// `base` with its first bytes replaced by `path`: a body no other URL gets.
fn unique_body(base: &Bytes, path: &[u8]) -> Bytes {
    let mut b = BytesMut::from(&base[..]);
    let n = path.len().min(b.len());
    b[..n].copy_from_slice(&path[..n]);
    b.freeze()
}

fn origin_response(body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000"),
    );
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// An `EdgeServer` running in this process on the current runtime, with an admin port (for
/// `/stats`), in front of `origin` through the edge's own upstream client.
pub struct InProcessEdge {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessEdge {
    /// `memory` in bytes; `disk`: the cache directory and the disk tier's size in bytes.
    pub async fn start(origin: SocketAddr, memory: u64, disk: Option<(&Path, u64)>) -> Self {
        let mut text = format!(
            "listen = \"127.0.0.1:0\"\n\
             admin_listen = \"127.0.0.1:0\"\n\
             origin = \"http://{origin}\"\n\
             [cache]\n\
             memory = {memory}\n"
        );
        if let Some((dir, size)) = disk {
            text.push_str(&format!(
                "dir = {:?}\ndisk = {size}\n",
                dir.display().to_string()
            ));
            // `cache.disk_admission`, if the run sets it (else the edge's default).
            if let Ok(policy) = std::env::var("OUTPOST_BENCH_DISK_ADMISSION") {
                text.push_str(&format!("disk_admission = {policy:?}\n"));
            }
        }
        Self::from_toml(text).await
    }

    /// An edge from a whole config (listen addresses included, `127.0.0.1:0` for any port).
    pub async fn from_toml(text: String) -> Self {
        let cfg = EdgeConfig::from_source(
            &Source::inline("bench-edge.toml", text),
            EdgeOverrides::default(),
        )
        .unwrap_or_else(|e| panic!("bench edge config: {e}"));
        let server = EdgeServer::bind(cfg)
            .await
            .unwrap_or_else(|e| panic!("bench edge: {e}"));
        let addr = server.local_addr();
        let admin = server
            .admin_addr()
            .expect("the bench edge has an admin port");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin,
            stop: Some(tx),
            task,
        }
    }

    /// Stops accepting, lets in-flight requests finish, and waits for the server to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// What a run of unique misses produced.
pub struct MissRun {
    /// Requests completed in the measurement window.
    pub requests: u64,
    /// Requests completed in the whole run (warm-up included): every one was a storable miss.
    pub all_requests: u64,
    pub window: Duration,
    pub latency: Latencies,
}

impl MissRun {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// When a run of unique misses ends.
#[derive(Clone, Copy)]
pub enum Until {
    /// Thrown-away warm-up, then a measurement window (closed loop, by completions).
    Time { warmup: Duration, measure: Duration },
    /// Exactly this many requests (the window is the whole run).
    Count(u64),
}

/// Closed-loop GETs of URLs never asked before, `{prefix}{n}` for n = `first`, `first`+1, …,
/// over `conns` keep-alive connections: each sends its next request when the previous answer
/// is read. Every answer must be a 200 `X-Cache: MISS` of `len` bytes, or the run fails.
pub async fn unique_misses(
    addr: SocketAddr,
    prefix: &str,
    first: u64,
    conns: usize,
    until: Until,
    len: u64,
) -> io::Result<MissRun> {
    unique_gets(
        addr,
        prefix,
        first..u64::MAX,
        conns,
        until,
        len,
        XCache::Miss,
    )
    .await
}

/// Like [`unique_misses`], for `{prefix}{n}` with n in `range` (each asked once, the run ends
/// early when the range is used up), every answer a 200 with `X-Cache` as `expect`.
pub async fn unique_gets(
    addr: SocketAddr,
    prefix: &str,
    range: std::ops::Range<u64>,
    conns: usize,
    until: Until,
    len: u64,
    expect: XCache,
) -> io::Result<MissRun> {
    let first = range.start;
    let mut open = Vec::with_capacity(conns);
    for _ in 0..conns.max(1) {
        open.push(Conn::connect(addr).await?);
    }
    let next = Arc::new(AtomicU64::new(first));
    let start = Instant::now();
    let (measure_from, end, limit) = match until {
        Until::Time { warmup, measure } => {
            (start + warmup, Some(start + warmup + measure), range.end)
        }
        Until::Count(n) => (start, None, (first + n).min(range.end)),
    };
    let tasks: Vec<_> = open
        .into_iter()
        .map(|mut conn| {
            let next = next.clone();
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let mut count = 0u64;
                loop {
                    let sent = Instant::now();
                    if end.is_some_and(|end| sent >= end) {
                        break;
                    }
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= limit {
                        break;
                    }
                    let path = format!("{prefix}{n}");
                    let reply = conn.send(&get_request(&path)).await?;
                    if reply.status != 200 || reply.body_len != len || reply.x_cache != expect {
                        return Err(io::Error::other(format!(
                            "{path}: got status {} {:?} with {} bytes, expected a 200 {expect:?} \
                             with {len}",
                            reply.status, reply.x_cache, reply.body_len
                        )));
                    }
                    count += 1;
                    let done = sent + reply.total;
                    if done >= measure_from && end.is_none_or(|end| done <= end) {
                        lat.push(micros(reply.total));
                    }
                }
                Ok::<_, io::Error>((lat, count))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut all_requests = 0;
    for t in tasks {
        let (lat, count) = t.await.map_err(io::Error::other)??;
        all.extend(lat);
        all_requests += count;
    }
    let window = match until {
        // Ended early (the range used up): the part of the window that ran.
        Until::Time { warmup, measure } => start.elapsed().saturating_sub(warmup).min(measure),
        Until::Count(_) => start.elapsed(),
    };
    Ok(MissRun {
        requests: all.len() as u64,
        all_requests,
        window,
        latency: Latencies::new(all),
    })
}

/// A response read by [`http_get`].
pub struct Got {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One GET on a new connection (`Connection: close`, host `bench` as the load's requests), read
/// to the end. Blocking; for admin requests and start-up probes, not for load.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Got> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: bench\r\nuser-agent: outpost-bench\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("GET {path}: no complete response head")))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("GET {path}: bad status line")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        return Err(io::Error::other(format!(
            "GET {path}: chunked responses are not supported here"
        )));
    }
    Ok(Got {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// The disk tier as `/stats` on the admin port reports it.
#[derive(Debug, Clone, Default)]
pub struct DiskState {
    /// `disk_admissions`: what became of each storable response (`stored`, `queue_full`,
    /// `too_large`, `error`, `incomplete`, `superseded`); `None` when `/stats` has no such field.
    pub admissions: Option<BTreeMap<String, u64>>,
    /// `tiers[tier = "disk"].objects`, when reported.
    pub objects: Option<u64>,
}

impl DiskState {
    /// Every admission outcome counted so far.
    pub fn decided(&self) -> Option<u64> {
        self.admissions.as_ref().map(|a| a.values().sum())
    }

    pub fn stored(&self) -> Option<u64> {
        self.admissions
            .as_ref()
            .map(|a| a.get("stored").copied().unwrap_or(0))
    }

    /// `stored 10 + queue_full 2 + … = 12` (non-zero reasons only), or why not.
    pub fn describe(&self) -> String {
        let Some(a) = &self.admissions else {
            return "not exposed by /stats".to_string();
        };
        let parts: Vec<String> = a
            .iter()
            .filter(|(k, v)| **v > 0 || k.as_str() == "stored")
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        format!("{} = {}", parts.join(" + "), a.values().sum::<u64>())
    }
}

/// Reads `/stats` from an admin port.
pub fn disk_state(admin: SocketAddr) -> io::Result<DiskState> {
    let got = http_get(admin, "/stats", Duration::from_secs(10))?;
    if got.status != 200 {
        return Err(io::Error::other(format!("/stats: status {}", got.status)));
    }
    let v: serde_json::Value = serde_json::from_slice(&got.body).map_err(io::Error::other)?;
    let admissions = v
        .get("disk_admissions")
        .and_then(|a| a.as_object())
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        });
    let objects = v.get("tiers").and_then(|t| t.as_array()).and_then(|tiers| {
        tiers
            .iter()
            .find(|t| t.get("tier").and_then(|n| n.as_str()) == Some("disk"))
            .and_then(|t| t.get("objects"))
            .and_then(|n| n.as_u64())
    });
    Ok(DiskState {
        admissions,
        objects,
    })
}

/// Waits until the disk tier has decided on `expected` storable responses (the admission
/// counters add up to it), or, when `/stats` has no counters, until the disk object count
/// stays put for half a second. Gives up after `timeout`; returns the last state, whether it
/// settled, and how long it took.
pub fn wait_settled(
    admin: SocketAddr,
    expected: u64,
    timeout: Duration,
) -> io::Result<(DiskState, bool, Duration)> {
    let start = Instant::now();
    let mut last_objects = None;
    let mut steady_since = Instant::now();
    loop {
        let state = disk_state(admin)?;
        let settled = match state.decided() {
            Some(n) => n >= expected,
            None => {
                if state.objects != last_objects {
                    last_objects = state.objects;
                    steady_since = Instant::now();
                }
                steady_since.elapsed() >= Duration::from_millis(500)
            }
        };
        if settled || start.elapsed() >= timeout {
            return Ok((state, settled, start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cache directory on the same file system as this build (`target/tmp`), or under
/// `OUTPOST_BENCH_TMPDIR`.
pub fn temp_dir() -> tempfile::TempDir {
    match std::env::var_os("OUTPOST_BENCH_TMPDIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => {
            let d = env!("CARGO_TARGET_TMPDIR");
            let _ = std::fs::create_dir_all(d);
            tempfile::tempdir_in(d)
        }
    }
    .expect("temp dir")
}

/// CPU time of the whole process so far (`/proc/self/stat` utime + stime: every thread,
/// exited ones too; in clock ticks of 10 ms, which the kernel scales to the exact run time).
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of the given threads of this process (`/proc/self/task/<tid>/schedstat`).
pub fn tids_cpu(tids: &[u32]) -> Option<Duration> {
    let mut total = 0u64;
    for tid in tids {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// Ids of this process's threads whose name starts with `prefix`.
pub fn tids_named(prefix: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with(prefix))
        })
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect()
}

/// A small xorshift generator (no dependency): picks stored URLs.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        Self(t | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
