//! Edge metrics: plain atomics on the request path (pre-resolved by index: no lock, no
//! allocation, no label lookup), encoded as Prometheus/OpenMetrics text by a prometheus-client
//! collector at scrape time. Each node owns its own registry, so several nodes in one process
//! (tests, `outpost demo`) never share counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::histogram::{AtomicHistogram, HistogramSnapshot};
use crate::cache::Engine;
use crate::cache::status::{CacheStatus, DiskAdmission, Tier};
use crate::cache::upstream::UpstreamError;

/// Cache results in label order (the cache vocabulary's, [`CacheStatus::LABELS`]).
pub const CACHE_LABELS: [&str; 6] = CacheStatus::LABELS;
/// Tiers in label order ([`Tier::LABELS`]).
pub const TIER_LABELS: [&str; 3] = Tier::LABELS;
/// Upstream failure kinds in label order ([`UpstreamError::ORIGIN_KINDS`]).
pub const ORIGIN_ERROR_LABELS: [&str; 5] = UpstreamError::ORIGIN_KINDS;
/// Purge kinds and modes in label order.
pub const PURGE_KINDS: [&str; 4] = ["url", "prefix", "tag", "all"];
pub const PURGE_MODES: [&str; 2] = ["hard", "soft"];
/// Status classes in label order.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The counters every request touches. Each worker thread adds to its own shard (its own
/// cache lines), so answering requests on many cores never contends on one counter; a scrape
/// sums the shards.
#[derive(Debug, Default)]
#[repr(align(128))]
struct RequestShard {
    requests: [[AtomicU64; 3]; 6],
    /// Responses by status class (1xx to 5xx).
    classes: [AtomicU64; 5],
    response_bytes: [AtomicU64; 6],
    durations: [AtomicHistogram; 6],
}

/// Shards per node: enough that worker threads rarely share one.
const SHARDS: usize = 16;

/// This thread's shard index: threads are numbered as they first record something.
fn shard_index() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// Every counter of one edge node.
#[derive(Debug)]
pub struct EdgeMetrics {
    shards: Box<[RequestShard]>,
    pub origin_duration: AtomicHistogram,
    /// Origin responses by status code (index = code, 0..=599).
    pub origin_status: Vec<AtomicU64>,
    pub origin_errors: [AtomicU64; 5],
    pub purges: [[AtomicU64; 2]; 4],
    compression: std::sync::OnceLock<Arc<crate::compress::CompressionStats>>,
    /// The compression share of memory, read at scrape time.
    compression_memory: std::sync::OnceLock<Arc<crate::cache::coalesce::Budget>>,
    pub started: Instant,
    pub node: String,
    engine: std::sync::OnceLock<Weak<Engine>>,
    /// Most missed URLs; touched on the miss path only.
    missed: std::sync::Mutex<TopMissed>,
    /// Fleet mode's state, read at scrape time.
    fleet: std::sync::OnceLock<Arc<outpost_fleet::Fleet>>,
    /// The upstreams' failures and how long they have lasted.
    pub upstreams: super::upstreams::Upstreams,
    /// The data listener's connection slots (open = capacity - available), read at scrape time.
    connections: std::sync::OnceLock<(Arc<tokio::sync::Semaphore>, usize)>,
    /// The HTTPS listener's handshake counters, read at scrape time.
    tls: std::sync::OnceLock<Arc<crate::tls::TlsState>>,
    /// The access log's written and dropped lines, read at scrape time.
    access_log: std::sync::OnceLock<Arc<super::access_log::AccessLog>>,
    /// Connections closed for their idle or send timeout, on the data listeners (plain and
    /// TLS) and on the admin listener.
    pub closes: Arc<outpost_net::Closes>,
    pub admin_closes: Arc<outpost_net::Closes>,
}

/// The commit the binary was built from, for `outpost_build_info` (set once by the binary).
static BUILD_COMMIT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Names the commit this process was built from (`outpost_build_info{commit}`); a process that
/// never says (an embedding, a test) reports `unknown`.
pub fn set_build_commit(commit: &'static str) {
    let _ = BUILD_COMMIT.set(commit);
}

const TOP_CAPACITY: usize = 512;

/// The most missed URLs, space-saving style: at most [`TOP_CAPACITY`] tracked. When it is full,
/// a new URL first drops the least missed quarter in one pass, rather than each new URL scanning for the least missed: a stream of unique
/// URLs paid that scan on every miss, under the lock. A newcomer starts just above the highest
/// count dropped, so a tracked URL's count may overstate its misses by that much, never
/// understate them.
#[derive(Debug, Default)]
struct TopMissed {
    counts: std::collections::HashMap<String, u64>,
    /// The highest count dropped so far.
    floor: u64,
}

impl TopMissed {
    fn record(&mut self, url: &str) {
        if let Some(c) = self.counts.get_mut(url) {
            *c += 1;
            return;
        }
        if self.counts.len() >= TOP_CAPACITY {
            // A quarter exactly: those below the cut, then as many tied with it as it takes
            // (a flood of unique URLs ties most entries; dropping every tie emptied the table).
            let quarter = TOP_CAPACITY / 4;
            let mut counts: Vec<u64> = self.counts.values().copied().collect();
            let cut = *counts.select_nth_unstable(quarter - 1).1;
            let below = self.counts.values().filter(|c| **c < cut).count();
            let mut ties = quarter.saturating_sub(below);
            self.counts.retain(|_, c| match (*c).cmp(&cut) {
                std::cmp::Ordering::Less => false,
                std::cmp::Ordering::Equal if ties > 0 => {
                    ties -= 1;
                    false
                }
                _ => true,
            });
            self.floor = self.floor.max(cut);
        }
        self.counts.insert(url.to_string(), self.floor + 1);
    }
}

impl EdgeMetrics {
    pub fn new(node: &str) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| RequestShard::default()).collect(),
            origin_duration: AtomicHistogram::default(),
            origin_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
            origin_errors: Default::default(),
            purges: Default::default(),
            compression: std::sync::OnceLock::new(),
            compression_memory: std::sync::OnceLock::new(),
            started: Instant::now(),
            node: node.to_string(),
            engine: std::sync::OnceLock::new(),
            missed: std::sync::Mutex::new(TopMissed::default()),
            fleet: std::sync::OnceLock::new(),
            upstreams: Default::default(),
            connections: std::sync::OnceLock::new(),
            tls: std::sync::OnceLock::new(),
            access_log: std::sync::OnceLock::new(),
            closes: Arc::default(),
            admin_closes: Arc::default(),
        })
    }

    /// The access log's line counts come from it at scrape time.
    pub fn attach_access_log(&self, log: Arc<super::access_log::AccessLog>) {
        let _ = self.access_log.set(log);
    }

    /// The data listener's connection slots: `capacity` in all, one held per open connection.
    pub fn attach_connections(&self, slots: Arc<tokio::sync::Semaphore>, capacity: usize) {
        let _ = self.connections.set((slots, capacity));
    }

    /// Connections open on the data listener (plain and TLS). The accept loop holds one slot
    /// while it waits for the next connection: that one is not a connection.
    pub fn open_connections(&self) -> u64 {
        self.connections.get().map_or(0, |(s, cap)| {
            cap.saturating_sub(s.available_permits()).saturating_sub(1) as u64
        })
    }

    /// TLS handshake counters come from the HTTPS listener at scrape time.
    pub fn attach_tls(&self, tls: Arc<crate::tls::TlsState>) {
        let _ = self.tls.set(tls);
    }

    /// TLS handshakes (completed, failed, timed out), when the node serves HTTPS.
    pub fn tls_handshakes(&self) -> Option<crate::tls::HandshakeStats> {
        self.tls.get().map(|t| t.stats())
    }

    /// Fleet counters and each node's lag come from the fleet at scrape time.
    pub fn attach_fleet(&self, fleet: Arc<outpost_fleet::Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// Compression counters live with the compression layer; they are read at scrape time.
    pub fn attach_compression(&self, stats: Arc<crate::compress::CompressionStats>) {
        let _ = self.compression.set(stats);
    }

    /// The compression share of memory, for its gauge.
    pub fn attach_compression_memory(&self, budget: Arc<crate::cache::coalesce::Budget>) {
        let _ = self.compression_memory.set(budget);
    }

    /// Gauges about the tiers come from the engine at scrape time.
    pub fn attach_engine(&self, engine: &Arc<Engine>) {
        let _ = self.engine.set(Arc::downgrade(engine));
    }

    fn engine(&self) -> Option<Arc<Engine>> {
        self.engine.get().and_then(Weak::upgrade)
    }

    /// Records one answered request. Three relaxed atomic adds and a histogram bucket.
    pub fn record_request(
        &self,
        cache: CacheStatus,
        tier: Tier,
        status: u16,
        bytes: Option<u64>,
        elapsed: Duration,
    ) {
        let c = cache.index();
        let shard = self.shard();
        shard.requests[c][tier.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(n) = shard.classes.get(usize::from(status / 100).wrapping_sub(1)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(b) = bytes {
            shard.response_bytes[c].fetch_add(b, Ordering::Relaxed);
        }
        shard.durations[c].observe(elapsed);
    }

    fn shard(&self) -> &RequestShard {
        &self.shards[shard_index()]
    }

    /// Adds body bytes counted while streaming (length unknown up front).
    pub fn add_bytes(&self, cache: CacheStatus, bytes: u64) {
        self.shard().response_bytes[cache.index()].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Responses by status class ([`STATUS_CLASSES`]).
    pub fn classes(&self) -> [u64; 5] {
        let mut out = [0u64; 5];
        for shard in &self.shards {
            for (i, v) in shard.classes.iter().enumerate() {
                out[i] += v.load(Ordering::Relaxed);
            }
        }
        out
    }

    /// Requests answered, by cache result and tier.
    pub fn requests(&self) -> [[u64; 3]; 6] {
        let mut out = [[0u64; 3]; 6];
        for shard in &self.shards {
            for (c, row) in shard.requests.iter().enumerate() {
                for (t, v) in row.iter().enumerate() {
                    out[c][t] += v.load(Ordering::Relaxed);
                }
            }
        }
        out
    }

    /// Time to the response head of requests with cache result `c` (see [`CacheStatus::index`]).
    pub fn durations(&self, c: usize) -> HistogramSnapshot {
        let mut out = HistogramSnapshot::default();
        for shard in &self.shards {
            out.add(&shard.durations[c].snapshot());
        }
        out
    }

    pub fn record_origin(&self, status: Option<u16>, error_kind: Option<&str>, elapsed: Duration) {
        self.origin_duration.observe(elapsed);
        if let Some(s) = status
            && let Some(c) = self.origin_status.get(usize::from(s))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(k) = error_kind
            && let Some(i) = ORIGIN_ERROR_LABELS.iter().position(|l| *l == k)
        {
            self.origin_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn record_purge(&self, kind: &str, soft: bool) {
        if let Some(k) = PURGE_KINDS.iter().position(|l| *l == kind) {
            self.purges[k][usize::from(soft)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a miss for a URL (space-saving: when full, the least counted entry is replaced
    /// and the newcomer inherits its count, which bounds the error).
    ///
    /// Query strings are never kept: they carry signatures and tokens, and `/stats` may be
    /// public. A URL with a query counts as its path followed by `?…`.
    pub fn record_miss(&self, url: &str) {
        let redacted;
        let url = match url.split_once('?') {
            Some((path, _)) => {
                redacted = format!("{path}?…");
                redacted.as_str()
            }
            None => url,
        };
        self.missed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(url);
    }

    /// The most missed URLs, most first.
    pub fn top_missed(&self, n: usize) -> Vec<(String, u64)> {
        let m = self.missed.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, u64)> = m.counts.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// Requests per cache result, summed over tiers.
    pub fn totals(&self) -> [u64; 6] {
        self.requests().map(|row| row.iter().sum())
    }

    pub fn bytes(&self) -> [u64; 6] {
        let mut b = [0u64; 6];
        for shard in &self.shards {
            for (i, c) in shard.response_bytes.iter().enumerate() {
                b[i] += c.load(Ordering::Relaxed);
            }
        }
        b
    }

    pub fn origin_latency(&self) -> HistogramSnapshot {
        self.origin_duration.snapshot()
    }

    /// A registry holding this node's collector.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::default();
        r.register_collector(Box::new(EdgeCollector(self.clone())));
        r
    }

    /// OpenMetrics text for `/metrics`.
    pub fn encode(self: &Arc<Self>) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

/// Hit ratio = (hit + stale) / (hit + stale + miss + revalidated + pass); errors and requests
/// without a cache lookup are left out. `None` before the first such request.
pub fn hit_ratio(t: &[u64; 6]) -> Option<f64> {
    let served = t[0] + t[2];
    let all = served + t[1] + t[3] + t[4];
    (all > 0).then(|| served as f64 / all as f64)
}

/// Encodes the edge's metrics at scrape time (prometheus-client's `Collector`).
#[derive(Debug)]
struct EdgeCollector(Arc<EdgeMetrics>);

/// Label arrays owned by the caller, as the slices [`counter`] and [`gauge`] take.
fn refs<'a, const N: usize, V: Copy>(
    families: &'a [([(&'a str, &'a str); N], V)],
) -> Vec<(&'a [(&'a str, &'a str)], V)> {
    families.iter().map(|(l, v)| (&l[..], *v)).collect()
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    families: &[(&[(&str, &str)], u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    if let [(labels, v)] = families
        && labels.is_empty()
    {
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in families {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    families: &[(&[(&str, &str)], f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, v)] = families
        && labels.is_empty()
    {
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in families {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConstGauge::new(*v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    families: &[(Vec<(String, String)>, HistogramSnapshot)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    if let [(labels, snap)] = families
        && labels.is_empty()
    {
        return m.encode_histogram::<Vec<(String, String)>>(
            snap.sum_secs(),
            snap.count(),
            &snap.per_bucket(),
            None,
        );
    }
    for (labels, snap) in families {
        let fam = m.encode_family(labels)?;
        let mut fam = fam;
        fam.encode_histogram::<Vec<(String, String)>>(
            snap.sum_secs(),
            snap.count(),
            &snap.per_bucket(),
            None,
        )?;
    }
    Ok(())
}

impl Collector for EdgeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let mut req = Vec::new();
        for (c, row) in m.requests().iter().enumerate() {
            for (t, v) in row.iter().enumerate() {
                req.push(([("cache", CACHE_LABELS[c]), ("tier", TIER_LABELS[t])], *v));
            }
        }
        counter(
            &mut enc,
            "outpost_requests",
            "Requests answered, by cache result and by the tier that answered.",
            &refs(&req),
        )?;

        let classes: Vec<([(&str, &str); 1], u64)> = STATUS_CLASSES
            .iter()
            .zip(m.classes())
            .map(|(c, v)| ([("class", *c)], v))
            .collect();
        counter(
            &mut enc,
            "outpost_responses",
            "Responses sent to clients, by status class.",
            &refs(&classes),
        )?;
        gauge(
            &mut enc,
            "outpost_connections_open",
            "Client connections open on the data listener (plain and TLS).",
            &[(&[], m.open_connections() as f64)],
        )?;
        let mut closed = Vec::new();
        for (listener, closes) in [("data", &m.closes), ("admin", &m.admin_closes)] {
            for (reason, n) in outpost_net::Closes::LABELS.iter().zip(closes.counts()) {
                closed.push(([("listener", listener), ("reason", *reason)], n));
            }
        }
        counter(
            &mut enc,
            "outpost_connections_closed",
            "Client connections the node closed by their timeouts (idle: shut down after the idle timeout; send_timeout: dropped, the client took no byte of a response for the send timeout; shutdown_grace: dropped, it had not ended 5 s after an idle shutdown).",
            &refs(&closed),
        )?;
        if let Some(t) = m.tls_handshakes() {
            counter(
                &mut enc,
                "outpost_tls_handshakes",
                "TLS handshakes on the HTTPS listener, by result.",
                &[
                    (&[("result", "completed")], t.completed),
                    (&[("result", "failed")], t.failed),
                    (&[("result", "timed_out")], t.timed_out),
                ],
            )?;
        }
        if let Some(log) = m.access_log.get() {
            let (written, dropped) = log.counts();
            counter(
                &mut enc,
                "outpost_access_log_lines",
                "Access log lines, by result (dropped: the writer's queue was full).",
                &[
                    (&[("result", "written")], written),
                    (&[("result", "dropped")], dropped),
                ],
            )?;
        }
        let ups: Vec<(String, f64)> = m
            .upstreams
            .states()
            .into_iter()
            .map(|u| (u.upstream, u.failing_seconds))
            .collect();
        let ups: Vec<([(&str, &str); 1], f64)> = ups
            .iter()
            .map(|(u, v)| ([("upstream", u.as_str())], *v))
            .collect();
        if !ups.is_empty() {
            gauge(
                &mut enc,
                "outpost_upstream_failing_seconds",
                "How long each upstream has failed without answering (0 while it answers).",
                &refs(&ups),
            )?;
        }

        let bytes = m.bytes();
        let b: Vec<([(&str, &str); 1], u64)> = CACHE_LABELS
            .iter()
            .zip(bytes)
            .map(|(c, v)| ([("cache", *c)], v))
            .collect();
        counter(
            &mut enc,
            "outpost_response_bytes",
            "Response body bytes sent to clients, by cache result.",
            &refs(&b),
        )?;

        let totals = m.totals();
        gauge(
            &mut enc,
            "outpost_cache_hit_ratio",
            "Since start: (hit + stale) / (hit + stale + miss + revalidated + pass). Requests without a cache lookup (errors) are excluded. NaN before the first request.",
            &[(&[], hit_ratio(&totals).unwrap_or(f64::NAN))],
        )?;
        gauge(
            &mut enc,
            "outpost_cache_byte_hit_ratio",
            "Since start: body bytes of (hit + stale) / body bytes of (hit + stale + miss + revalidated + pass). NaN before the first byte.",
            &[(&[], hit_ratio(&bytes).unwrap_or(f64::NAN))],
        )?;

        let durs: Vec<(Vec<(String, String)>, HistogramSnapshot)> = CACHE_LABELS
            .iter()
            .enumerate()
            .map(|(i, label)| {
                (
                    vec![("cache".to_string(), label.to_string())],
                    m.durations(i),
                )
            })
            .collect();
        histogram(
            &mut enc,
            "outpost_request_duration_seconds",
            "Time from request to response head, by cache result.",
            &durs,
        )?;
        histogram(
            &mut enc,
            "outpost_origin_request_duration_seconds",
            "Time from sending a request upstream to its response head (or failure).",
            &[(vec![], m.origin_duration.snapshot())],
        )?;

        let statuses: Vec<(String, u64)> = m
            .origin_status
            .iter()
            .enumerate()
            .filter_map(|(code, c)| {
                let v = c.load(Ordering::Relaxed);
                (v > 0).then(|| (code.to_string(), v))
            })
            .collect();
        let st: Vec<([(&str, &str); 1], u64)> = statuses
            .iter()
            .map(|(c, v)| ([("status", c.as_str())], *v))
            .collect();
        counter(
            &mut enc,
            "outpost_origin_requests",
            "Upstream responses by status code.",
            &refs(&st),
        )?;

        let errs: Vec<([(&str, &str); 1], u64)> = ORIGIN_ERROR_LABELS
            .iter()
            .zip(&m.origin_errors)
            .map(|(k, v)| ([("kind", *k)], v.load(Ordering::Relaxed)))
            .collect();
        counter(
            &mut enc,
            "outpost_origin_errors",
            "Upstream requests that failed before a response, by kind.",
            &refs(&errs),
        )?;

        let mut purges = Vec::new();
        for (k, row) in m.purges.iter().enumerate() {
            for (mode, v) in row.iter().enumerate() {
                purges.push((
                    [("kind", PURGE_KINDS[k]), ("mode", PURGE_MODES[mode])],
                    v.load(Ordering::Relaxed),
                ));
            }
        }
        counter(
            &mut enc,
            "outpost_purges",
            "Purge requests, by kind and mode.",
            &refs(&purges),
        )?;

        if let Some(c) = m.compression.get() {
            let c = c.snapshot();
            counter(
                &mut enc,
                "outpost_compression_input_bytes",
                "Identity bytes fed to the compressors.",
                &[(&[], c.bytes_in)],
            )?;
            counter(
                &mut enc,
                "outpost_compression_output_bytes",
                "Encoded bytes the compressors produced.",
                &[(&[], c.bytes_out)],
            )?;
            counter(
                &mut enc,
                "outpost_compressions",
                "Compressions performed, by codec (a stored variant is compressed once).",
                &[
                    (&[("codec", "br")], c.compressed_br),
                    (&[("codec", "gzip")], c.compressed_gzip),
                ],
            )?;
            counter(
                &mut enc,
                "outpost_compressed_variant_hits",
                "Encoded responses served from a stored variant, without compressing.",
                &[(&[], c.variant_hits)],
            )?;
            counter(
                &mut enc,
                "outpost_decompressions",
                "Origin-encoded bodies decoded for clients that do not accept their coding.",
                &[(&[], c.decompressed)],
            )?;
            counter(
                &mut enc,
                "outpost_decompressions_refused",
                "Decodings stopped at the size cap or on corrupt data.",
                &[(&[], c.decompress_refused)],
            )?;
            counter(
                &mut enc,
                "outpost_compression_skipped",
                "Compressions not done, the response sent as identity (memory: the compression share of cache.memory was in use).",
                &[(&[("reason", "memory")], c.skipped_memory)],
            )?;
            counter(
                &mut enc,
                "outpost_decompressions_busy",
                "Decodings refused with 503: the compression share of cache.memory was in use.",
                &[(&[], c.decompress_busy)],
            )?;
        }
        if let Some(b) = m.compression_memory.get() {
            gauge(
                &mut enc,
                "outpost_compression_memory_bytes",
                "What compression and decoding jobs hold now (used, by their estimates) and may hold at once (limit: the compression share of cache.memory).",
                &[
                    (&[("kind", "used")], b.used() as f64),
                    (&[("kind", "limit")], b.limit() as f64),
                ],
            )?;
        }
        if let Some(engine) = m.engine() {
            counter(
                &mut enc,
                "outpost_coalesced_requests",
                "Requests that joined another request's upstream fetch instead of making their own.",
                &[(&[], engine.stats.coalesced.load(Ordering::Relaxed))],
            )?;
            counter(
                &mut enc,
                "outpost_disk_write_errors",
                "Disk tier writes that failed (the object was served, not stored on disk).",
                &[(&[], engine.stats.disk_write_errors.load(Ordering::Relaxed))],
            )?;
            counter(
                &mut enc,
                "outpost_disk_writes_abandoned",
                "Disk tier writes given up because the disk was slower than the client.",
                &[(
                    &[],
                    engine.stats.disk_writes_abandoned.load(Ordering::Relaxed),
                )],
            )?;
            if engine.has_disk() {
                let counts = engine.stats.disk_admissions();
                let labels: Vec<[(&str, &str); 1]> = DiskAdmission::LABELS
                    .iter()
                    .map(|l| [("result", *l)])
                    .collect();
                let families: Vec<(&[(&str, &str)], u64)> = labels
                    .iter()
                    .zip(counts)
                    .map(|(l, v)| (&l[..], v))
                    .collect();
                counter(
                    &mut enc,
                    "outpost_disk_admissions",
                    "Storable responses by what became of their disk copy: stored, or why not (queue_full: the disk was slower than the client; too_large: passed max_object_size while streaming; error: the disk refused; incomplete: the body never completed; superseded: a purge replaced the fetch; rejected: the tier was full and the key missed for the first time lately, so an object asked once evicts nothing).",
                    &families,
                )?;
            }
            counter(
                &mut enc,
                "outpost_slow_readers_dropped",
                "Clients dropped for taking no byte of a streaming response for the send timeout.",
                &[(
                    &[],
                    engine.stats.slow_readers_dropped.load(Ordering::Relaxed),
                )],
            )?;
            let pre: Vec<([(&str, &str); 1], u64)> = crate::cache::PREFRESH_RESULTS
                .iter()
                .zip(&engine.stats.prefreshes)
                .map(|(r, v)| ([("result", *r)], v.load(Ordering::Relaxed)))
                .collect();
            counter(
                &mut enc,
                "outpost_prefreshes",
                "Background revalidations of fresh objects near their end (prefresh), by result (skipped: the budget was spent).",
                &refs(&pre),
            )?;
            let (rejected, swept) = engine.disk_integrity();
            counter(
                &mut enc,
                "outpost_disk_metadata_rejected",
                "Disk metadata records dropped for failing their checksum or format check (the objects were misses).",
                &[(&[], rejected)],
            )?;
            if let Some(load) = engine.disk_load() {
                gauge(
                    &mut enc,
                    "outpost_disk_index_loading",
                    "1 while the disk tier loads its index at start-up (it serves meanwhile, reading entries not loaded yet directly).",
                    &[(&[], if load.done { 0.0 } else { 1.0 })],
                )?;
                gauge(
                    &mut enc,
                    "outpost_disk_index_loaded_objects",
                    "Objects the start-up load of the disk index has indexed.",
                    &[(&[], load.loaded as f64)],
                )?;
                let (ok, failed) = engine.disk_index_commits();
                counter(
                    &mut enc,
                    "outpost_disk_index_commits",
                    "Group commits of the disk index (each makes a batch of stored objects durable), by result.",
                    &[(&[("result", "ok")], ok), (&[("result", "error")], failed)],
                )?;
                if let Some((open, reopens)) = engine.disk_index_health() {
                    gauge(
                        &mut enc,
                        "outpost_disk_index_open",
                        "0 while the disk index has failed (an I/O error: a full or failing disk) and is not open again yet: the disk tier stores nothing and what needs the index is a miss.",
                        &[(&[], if open { 1.0 } else { 0.0 })],
                    )?;
                    counter(
                        &mut enc,
                        "outpost_disk_index_reopens",
                        "Times the disk index failed (an I/O error) and was closed to be opened again; objects stored in the 50 ms before each are lost, as after a kill -9.",
                        &[(&[], reopens)],
                    )?;
                }
            }
            counter(
                &mut enc,
                "outpost_disk_content_swept",
                "Content files no index entry referenced, removed by the start-up sweep.",
                &[(&[], swept)],
            )?;
            let usage = engine.usage();
            let objs: Vec<([(&str, &str); 1], f64)> = usage
                .iter()
                .map(|(t, n, _)| ([("tier", t.as_str())], *n as f64))
                .collect();
            gauge(
                &mut enc,
                "outpost_cache_objects",
                "Objects held, by tier.",
                &refs(&objs),
            )?;
            let bytes: Vec<([(&str, &str); 1], f64)> = usage
                .iter()
                .map(|(t, _, b)| ([("tier", t.as_str())], *b as f64))
                .collect();
            gauge(
                &mut enc,
                "outpost_cache_bytes",
                "Bytes held, by tier: the memory tier's as weighed for eviction, the disk tier's bodies and ~2 KiB of metadata per object.",
                &refs(&bytes),
            )?;
            if let Some((used, limit)) = engine.disk_index_memory() {
                gauge(
                    &mut enc,
                    "outpost_disk_index_memory_bytes",
                    "Memory the disk tier's index of stored objects takes (used), and its share of --memory (limit): at the limit, the disk tier evicts with disk to spare.",
                    &[
                        (&[("kind", "used")], used as f64),
                        (&[("kind", "limit")], limit as f64),
                    ],
                )?;
            }
            let ev = engine.evictions();
            let evicted: Vec<([(&str, &str); 1], u64)> =
                vec![([("tier", "memory")], ev.0), ([("tier", "disk")], ev.1)];
            counter(
                &mut enc,
                "outpost_cache_evictions",
                "Objects evicted for space, by tier.",
                &refs(&evicted),
            )?;
            gauge(
                &mut enc,
                "outpost_pushed_objects",
                "Pushed (pinned) objects held.",
                &[(&[], engine.pushed_count() as f64)],
            )?;
        }
        if let Some(fleet) = m.fleet.get() {
            fleet_metrics(&mut enc, fleet)?;
        }
        gauge(
            &mut enc,
            "outpost_build_info",
            "Always 1: the version and the commit this node was built from.",
            &[(
                &[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("commit", BUILD_COMMIT.get().copied().unwrap_or("unknown")),
                ],
                1.0,
            )],
        )?;
        gauge(
            &mut enc,
            "outpost_uptime_seconds",
            "Seconds since this node started.",
            &[(&[], m.started.elapsed().as_secs_f64())],
        )?;
        Ok(())
    }
}

/// Fleet mode: purges published, applied and replayed, the outbox, the NATS connection and
/// every node's lag behind the purge stream.
fn fleet_metrics(
    enc: &mut DescriptorEncoder,
    fleet: &outpost_fleet::Fleet,
) -> Result<(), std::fmt::Error> {
    let status = fleet.status();
    let c = &fleet.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, help, v) in [
        (
            "outpost_fleet_purges_published",
            "Purges this node published to the fleet's stream.",
            load(&c.published),
        ),
        (
            "outpost_fleet_purges_applied",
            "Purges from other nodes applied here (replayed ones included).",
            load(&c.applied),
        ),
        (
            "outpost_fleet_purges_replayed",
            "Purges applied while catching up after a start.",
            load(&c.replayed),
        ),
        (
            "outpost_fleet_cache_clears",
            "Whole-cache clears because purges this node missed had expired from the stream.",
            load(&c.cleared),
        ),
        (
            "outpost_fleet_pushes_applied",
            "Objects pushed or deleted on other nodes and applied here.",
            load(&c.pushes_applied),
        ),
        (
            "outpost_fleet_publish_failures",
            "Purges NATS did not acknowledge in time (they wait in the outbox).",
            load(&c.publish_failures),
        ),
    ] {
        counter(enc, name, help, &[(&[], v)])?;
    }
    gauge(
        enc,
        "outpost_fleet_outbox_purges",
        "Purges waiting in this node's outbox for NATS.",
        &[(&[], status.outbox as f64)],
    )?;
    gauge(
        enc,
        "outpost_fleet_connected",
        "1 while this node is connected to NATS.",
        &[(&[], if status.connected { 1.0 } else { 0.0 })],
    )?;
    gauge(
        enc,
        "outpost_fleet_ready",
        "1 once this node has caught up with the purge stream since its start.",
        &[(&[], if status.ready { 1.0 } else { 0.0 })],
    )?;
    let lags: Vec<([(&str, &str); 1], f64)> = status
        .nodes
        .iter()
        .map(|n| ([("node", n.node.as_str())], n.lag as f64))
        .collect();
    gauge(
        enc,
        "outpost_fleet_lag",
        "Purges each node has yet to apply, as this node last saw its report.",
        &refs(&lags),
    )
}
