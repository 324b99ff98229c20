//! The access log (`[access_log]`): one line per request, to a file or stdout, in Apache's
//! `combined` format (plus Outpost's fields) or as JSON lines.
//!
//! - **Never blocks a request.** A request hands its entry to a bounded queue and goes on; one
//!   writer thread formats and writes. A full queue drops the entry and counts it
//!   (`outpost_access_log_lines_total{result="dropped"}`), as a slow disk must not slow the
//!   cache down.
//! - **Taken only when wanted, and owned.** With an access log (or an `outpost log` follower),
//!   a request copies its method, target and a few header values into the entry: copies, not
//!   slices of hyper's read buffer, so a queued line never keeps a connection's buffer
//!   alive. The line is formatted on the writer thread.
//! - **Sampling.** `sample = 0.1` logs one request in ten; responses with a 5xx status are
//!   always logged.
//! - **logrotate.** `SIGUSR1` makes the writer reopen the file by its path before its next
//!   line, so `postrotate kill -USR1` works as with nginx.
//! - **Request ids.** With `request_id_header` (default `x-request-id`), a request that carries
//!   a usable id keeps it; any other gets a new one, which the origin receives in that header
//!   and the log line shows.
//!
//! `combined`, with Outpost's fields appended after Apache's:
//!
//! ```text
//! 127.0.0.1 - - [05/Dec/2026:06:10:00 +0000] "GET /a?b=1 HTTP/1.1" 200 777 "-" "curl/8.5.0" cache=HIT tier=memory upstream_ms=- total_ms=0.041 host=www.example.test rid=9f2c…
//! ```
//!
//! Times are UTC.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Version};

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Combined,
    Json,
}

/// `[access_log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub target: Target,
    pub format: Format,
    /// Share of requests logged, in (0, 1]; 5xx responses are always logged.
    pub sample: f64,
    /// The field a request id is taken from and sent to the origin in; `None`: no ids.
    pub request_id_header: Option<HeaderName>,
    /// Lines waiting for the writer; more are dropped and counted.
    pub queue: usize,
}

/// The request's side of a line, taken when the request arrives.
#[derive(Debug, Clone)]
pub struct RequestFields {
    method: Method,
    /// Path and query.
    target: Box<str>,
    /// The request target's authority (absolute form, h2 `:authority`).
    authority: Option<Box<str>>,
    version: Version,
    host: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
}

impl RequestFields {
    /// The fields of a request, with its id (if any) as given.
    pub fn of<B>(req: &Request<B>, request_id: Option<HeaderValue>) -> RequestFields {
        let h = req.headers();
        // Copies: hyper's values are slices of the connection's read buffer.
        let copy = |v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).ok();
        RequestFields {
            method: req.method().clone(),
            target: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .into(),
            authority: req.uri().authority().map(|a| a.as_str().into()),
            version: req.version(),
            host: h.get(header::HOST).and_then(copy),
            user_agent: h.get(header::USER_AGENT).and_then(copy),
            referer: h.get(header::REFERER).and_then(copy),
            request_id: request_id.as_ref().and_then(copy),
        }
    }

    /// The request's path (no query).
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("/")
    }
}

/// One line's worth.
#[derive(Debug, Clone)]
pub struct Entry {
    pub time: SystemTime,
    pub client: IpAddr,
    pub request: RequestFields,
    pub status: u16,
    /// Body bytes sent; `None` when not known (written `-`).
    pub bytes: Option<u64>,
    pub cache: &'static str,
    pub tier: &'static str,
    pub upstream: Option<Duration>,
    pub total: Duration,
}

/// The running access log of one node.
pub struct AccessLog {
    tx: SyncSender<Entry>,
    /// The share of requests logged, in millionths (1_000_000: all).
    sample_ppm: u64,
    seen: AtomicU64,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
    request_id_header: Option<HeaderName>,
    id_prefix: u64,
    next_id: AtomicU64,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("sample_ppm", &self.sample_ppm)
            .finish_non_exhaustive()
    }
}

/// Writes what the writer holds at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

impl AccessLog {
    /// Opens the file (so a path that cannot be written fails at start-up, not later) and
    /// starts the writer thread.
    pub fn open(cfg: &AccessLogConfig) -> std::io::Result<Arc<Self>> {
        let out = Output::open(&cfg.target)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue.max(1));
        let written = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rx,
            out,
            format: cfg.format,
            written: written.clone(),
            reopen: reopen.clone(),
            buf: Vec::with_capacity(64 << 10),
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run())?;
        let sample_ppm = (cfg.sample.clamp(0.0, 1.0) * 1_000_000.0).round() as u64;
        Ok(Arc::new(Self {
            tx,
            sample_ppm,
            seen: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            written,
            reopen,
            request_id_header: cfg.request_id_header.clone(),
            id_prefix: random_u64(),
            next_id: AtomicU64::new(1),
        }))
    }

    /// The request's fields, and its id: the one it carries when usable, otherwise a new one,
    /// set on the request (so the origin gets it) when `set` is true.
    pub fn request_fields<B>(&self, req: &mut Request<B>, set: bool) -> RequestFields {
        let request_id = self.request_id_header.as_ref().map(|name| {
            match req.headers().get(name).filter(|v| usable_id(v)) {
                Some(v) => v.clone(),
                None => {
                    let id = self.new_id();
                    if set {
                        req.headers_mut().insert(name.clone(), id.clone());
                    }
                    id
                }
            }
        });
        RequestFields::of(req, request_id)
    }

    fn new_id(&self) -> HeaderValue {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let text = format!("{:016x}{n:016x}", self.id_prefix);
        HeaderValue::from_str(&text).expect("hex is a valid header value")
    }

    /// Queues a line, unless sampling leaves this request out. Never waits.
    pub fn log(&self, entry: Entry) {
        if entry.status < 500 && !self.sampled() {
            return;
        }
        match self.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether this request is in the sample: request n is when the running count of
    /// `sample × n` passes a whole number, so `sample = 0.25` logs exactly every fourth.
    fn sampled(&self) -> bool {
        const ALL: u64 = 1_000_000;
        if self.sample_ppm >= ALL {
            return true;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        (n + 1) * self.sample_ppm / ALL != n * self.sample_ppm / ALL
    }

    /// The file is reopened by its path before the next line (SIGUSR1, after logrotate).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
    }

    /// Lines written and dropped since start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// A client's id is kept when it is 1 to 128 visible ASCII characters (no spaces or quotes,
/// which would break the line).
fn usable_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic() && *c != b'"')
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

enum Output {
    Stdout,
    File { path: PathBuf, file: std::fs::File },
}

impl Output {
    fn open(target: &Target) -> std::io::Result<Self> {
        Ok(match target {
            Target::Stdout => Output::Stdout,
            Target::File(path) => Output::File {
                file: open_append(path)?,
                path: path.clone(),
            },
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Output::File { file, .. } => file.write_all(bytes),
        }
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

struct Writer {
    rx: Receiver<Entry>,
    out: Output,
    format: Format,
    written: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        loop {
            match self.rx.recv_timeout(FLUSH_EVERY) {
                Ok(e) => {
                    self.add(&e);
                    // Whatever else is waiting goes out in the same write.
                    while self.buf.len() < (64 << 10)
                        && let Ok(e) = self.rx.try_recv()
                    {
                        self.add(&e);
                    }
                    self.flush();
                }
                Err(RecvTimeoutError::Timeout) => self.flush(),
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            }
        }
    }

    fn add(&mut self, e: &Entry) {
        match self.format {
            Format::Combined => combined(&mut self.buf, e),
            Format::Json => json(&mut self.buf, e),
        }
        self.buf.push(b'\n');
        self.written.fetch_add(1, Ordering::Relaxed);
    }

    fn flush(&mut self) {
        if self.reopen.swap(false, Ordering::AcqRel)
            && let Output::File { path, file } = &mut self.out
        {
            match open_append(path) {
                Ok(f) => *file = f,
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "access log: cannot reopen; still writing to the old file"
                ),
            }
        }
        if self.buf.is_empty() {
            return;
        }
        if let Err(e) = self.out.write_all(&self.buf) {
            tracing::warn!(error = %e, "access log: write failed; lines lost");
        }
        self.buf.clear();
    }
}

/// A header's value as text (bytes that are not UTF-8 replaced), or `-`.
fn text(v: &Option<HeaderValue>) -> std::borrow::Cow<'_, str> {
    match v.as_ref().map(|v| v.as_bytes()) {
        Some(b) if !b.is_empty() => String::from_utf8_lossy(b),
        _ => "-".into(),
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `"` and `\` escaped, control bytes as `\xNN` (nginx's escaping), so a field cannot end its
/// quotes or the line.
fn quoted(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' | b'\\' => {
                out.push(b'\\');
                out.push(b);
            }
            0..=0x1f | 0x7f => {
                let _ = write!(out, "\\x{b:02X}");
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

fn combined(out: &mut Vec<u8>, e: &Entry) {
    let time = time::OffsetDateTime::from(e.time);
    let clf = time::macros::format_description!(
        "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
    );
    let r = &e.request;
    let _ = write!(
        out,
        "{} - - [{}] ",
        e.client,
        time.format(&clf).unwrap_or_default()
    );
    quoted(out, &format!("{} {} {:?}", r.method, r.target, r.version));
    let _ = write!(out, " {} ", e.status);
    match e.bytes {
        Some(b) => {
            let _ = write!(out, "{b}");
        }
        None => out.push(b'-'),
    }
    out.push(b' ');
    quoted(out, &text(&r.referer));
    out.push(b' ');
    quoted(out, &text(&r.user_agent));
    let _ = write!(out, " cache={} tier={} upstream_ms=", e.cache, e.tier);
    match e.upstream {
        Some(d) => {
            let _ = write!(out, "{:.3}", millis(d));
        }
        None => out.push(b'-'),
    }
    let _ = write!(out, " total_ms={:.3} host=", millis(e.total));
    let host = r
        .host
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| r.authority.as_deref().map(str::to_string))
        .unwrap_or_else(|| "-".into());
    for &b in host.as_bytes() {
        out.push(if b.is_ascii_graphic() && b != b'"' {
            b
        } else {
            b'_'
        });
    }
    let _ = write!(out, " rid={}", text(&r.request_id));
}

/// One JSON line's object (without its newline); `outpost log` streams the same.
pub(crate) fn json(out: &mut Vec<u8>, e: &Entry) {
    let r = &e.request;
    let time = time::OffsetDateTime::from(e.time)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let opt = |v: &Option<HeaderValue>| {
        v.as_ref()
            .map(|v| serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into()))
            .unwrap_or(serde_json::Value::Null)
    };
    let line = serde_json::json!({
        "time": time,
        "client": e.client.to_string(),
        "method": r.method.as_str(),
        "host": opt(&r.host),
        "url": &*r.target,
        "protocol": format!("{:?}", r.version),
        "status": e.status,
        "bytes": e.bytes,
        "cache": e.cache,
        "tier": e.tier,
        "upstream_ms": e.upstream.map(millis),
        "total_ms": millis(e.total),
        "user_agent": opt(&r.user_agent),
        "referer": opt(&r.referer),
        "request_id": opt(&r.request_id),
    });
    let _ = serde_json::to_writer(&mut *out, &line);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: u16) -> Entry {
        let mut req = Request::get("http://h.test/a?b=1")
            .header("host", "h.test")
            .body(())
            .unwrap();
        *req.version_mut() = Version::HTTP_11;
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 365),
            client: "127.0.0.1".parse().unwrap(),
            request: RequestFields {
                user_agent: HeaderValue::from_bytes(b"ua \"quoted\"\t\xff").ok(),
                ..RequestFields::of(&req, Some(HeaderValue::from_static("abc")))
            },
            status,
            bytes: Some(777),
            cache: "HIT",
            tier: "memory",
            upstream: None,
            total: Duration::from_micros(41),
        }
    }

    #[test]
    fn combined_lines_escape_what_would_break_them() {
        let mut out = Vec::new();
        combined(&mut out, &entry(200));
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "127.0.0.1 - - [01/Jan/1971:00:00:00 +0000] \"GET /a?b=1 HTTP/1.1\" 200 777 \"-\" \"ua \\\"quoted\\\"\\x09\u{fffd}\" cache=HIT tier=memory upstream_ms=- total_ms=0.041 host=h.test rid=abc"
        );
    }

    #[test]
    fn json_lines_parse_back() {
        let mut out = Vec::new();
        json(&mut out, &entry(503));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["status"], 503);
        assert_eq!(v["url"], "/a?b=1");
        assert_eq!(v["time"], "1971-01-01T00:00:00Z");
        assert_eq!(v["upstream_ms"], serde_json::Value::Null);
    }

    #[test]
    fn sampling_keeps_the_configured_share() {
        for (sample, expect) in [(1.0, 1000), (0.75, 750), (0.25, 250), (0.001, 1)] {
            let log = AccessLog::open(&AccessLogConfig {
                target: Target::Stdout,
                format: Format::Json,
                sample,
                request_id_header: None,
                queue: 1,
            })
            .unwrap();
            let kept = (0..1000).filter(|_| log.sampled()).count();
            assert_eq!(kept, expect, "sample {sample}");
        }
    }

    #[test]
    fn only_usable_ids_are_kept() {
        assert!(usable_id(&HeaderValue::from_static("abc-123")));
        assert!(!usable_id(&HeaderValue::from_static("a b")));
        assert!(!usable_id(&HeaderValue::from_static("")));
        assert!(!usable_id(
            &HeaderValue::from_str(&"x".repeat(129)).unwrap()
        ));
    }
}
