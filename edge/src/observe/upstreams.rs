//! How each upstream (the origin, or a shield) is doing, as an operator sees it: its failures
//! in the log, and how long it has failed without answering (`/readyz`, `/stats`, `/metrics`).
//!
//! - The first failure of each kind (connect, timeout, protocol, overloaded, breaker_open) is
//!   logged at once, as a WARN line naming the upstream, the kind and the error. Later ones of
//!   that kind are counted and reported in one line per [`REPORT_EVERY`], with their count, so
//!   an origin that is down for an hour costs a line per kind every ten seconds, not one per
//!   request.
//! - The first answer after failures is logged (INFO) with how many requests failed and for how
//!   long, and the next failure is reported at once again.
//! - A response with an error status is an answer: the origin is up, and its statuses count in
//!   `outpost_origin_requests` (nginx logs upstream connection errors, not statuses, too).
//!
//! An answer costs the request path one relaxed atomic load while the upstream answers, and
//! takes no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cache::upstream::UpstreamError;

/// At most one log line per failure kind and upstream in this time.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

const KINDS: [&str; 5] = UpstreamError::ORIGIN_KINDS;

#[derive(Debug, Default)]
struct KindLog {
    /// Failures not reported in a log line yet.
    unreported: AtomicU64,
    /// Milliseconds (see [`UpstreamHealth::now_ms`]) before which no line is written.
    next_report: AtomicU64,
}

/// One upstream's failures and how long they have lasted.
#[derive(Debug)]
pub struct UpstreamHealth {
    /// The upstream's authority (`host:port`), as logs and metrics name it.
    pub name: String,
    epoch: Instant,
    /// Milliseconds since `epoch` (plus one) of the first failure since the last answer; 0
    /// while it answers.
    failing_since: AtomicU64,
    /// Failures since the last answer.
    failures: AtomicU64,
    kinds: [KindLog; 5],
}

impl UpstreamHealth {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            epoch: Instant::now(),
            failing_since: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            kinds: Default::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// A request to this upstream failed before a response head. `overloaded` (this node's
    /// own connection budget was full) is logged, but says nothing about the upstream's
    /// health.
    pub fn failed(&self, e: &UpstreamError) {
        let now = self.now_ms();
        if !matches!(e, UpstreamError::Overloaded) {
            let _ =
                self.failing_since
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let Some(k) = KINDS.iter().position(|k| *k == e.kind()) else {
            return;
        };
        let log = &self.kinds[k];
        log.unreported.fetch_add(1, Ordering::AcqRel);
        let next = log.next_report.load(Ordering::Acquire);
        if now < next
            || log
                .next_report
                .compare_exchange(
                    next,
                    now + REPORT_EVERY.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return;
        }
        let n = log.unreported.swap(0, Ordering::AcqRel);
        let failing_for = match self.failing_since() {
            0 => Duration::ZERO,
            since => Duration::from_millis(now.saturating_sub(since)),
        };
        warn!(
            upstream = %self.name,
            kind = e.kind(),
            failures = n,
            failing_for_s = failing_for.as_secs(),
            error = %e.detail(),
            "upstream requests failing ({n} {} since the last report)",
            e.kind()
        );
    }

    /// This upstream answered (any status).
    pub fn answered(&self) {
        // The common case: one relaxed load.
        if self.failing_since.load(Ordering::Relaxed) == 0 {
            return;
        }
        let since = self.failing_since.swap(0, Ordering::AcqRel);
        if since == 0 {
            return;
        }
        let n = self.failures.swap(0, Ordering::AcqRel);
        for k in &self.kinds {
            k.unreported.store(0, Ordering::Release);
            k.next_report.store(0, Ordering::Release);
        }
        let failed_for = Duration::from_millis(self.now_ms().saturating_sub(since));
        info!(
            upstream = %self.name,
            failures = n,
            failed_for_s = failed_for.as_secs(),
            "upstream answering again after {n} failed requests"
        );
    }

    fn failing_since(&self) -> u64 {
        self.failing_since.load(Ordering::Acquire)
    }

    /// How long it has failed without an answer; `None` while it answers.
    pub fn failing_for(&self) -> Option<Duration> {
        match self.failing_since() {
            0 => None,
            since => Some(Duration::from_millis(self.now_ms().saturating_sub(since))),
        }
    }

    /// Failures since its last answer.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The upstreams of one node.
#[derive(Debug, Default)]
pub struct Upstreams {
    list: std::sync::Mutex<Vec<std::sync::Arc<UpstreamHealth>>>,
    /// The origins of a group with failover, in order (empty with one origin).
    pub origins: std::sync::Mutex<Vec<std::sync::Arc<OriginMember>>>,
}

/// One upstream's state, for `/stats`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct UpstreamState {
    pub upstream: String,
    /// Seconds it has failed without an answer (0 while it answers).
    pub failing_seconds: f64,
    /// Failures since its last answer.
    pub failures: u64,
}

impl Upstreams {
    /// Adds an upstream; its health is reported from now on.
    pub fn register(&self, name: &str) -> std::sync::Arc<UpstreamHealth> {
        let h = std::sync::Arc::new(UpstreamHealth::new(name));
        self.lock().push(h.clone());
        h
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<std::sync::Arc<UpstreamHealth>>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each origin of a failover group (`/origins`).
    pub fn origin_reports(&self) -> Vec<OriginReport> {
        self.origins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|o| o.report())
            .collect()
    }

    pub fn states(&self) -> Vec<UpstreamState> {
        self.lock()
            .iter()
            .map(|h| UpstreamState {
                upstream: h.name.clone(),
                failing_seconds: h.failing_for().map_or(0.0, |d| d.as_secs_f64()),
                failures: h.failures(),
            })
            .collect()
    }

    /// How long every upstream has been failing (the shortest of them): `None` while any
    /// answers, or when there is none.
    pub fn all_failing_for(&self) -> Option<Duration> {
        let list = self.lock();
        let mut shortest: Option<Duration> = None;
        for h in list.iter() {
            let d = h.failing_for()?;
            shortest = Some(shortest.map_or(d, |s| s.min(d)));
        }
        shortest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_until_an_answer_and_every_upstream_counts() {
        let ups = Upstreams::default();
        assert_eq!(ups.all_failing_for(), None, "no upstream, nothing failing");
        let a = ups.register("a:80");
        let b = ups.register("b:80");
        a.failed(&UpstreamError::Connect("refused".into()));
        a.failed(&UpstreamError::Connect("refused".into()));
        assert!(a.failing_for().is_some());
        assert_eq!(a.failures(), 2);
        assert_eq!(ups.all_failing_for(), None, "b still answers");
        b.failed(&UpstreamError::Timeout(Duration::from_secs(1)));
        assert!(ups.all_failing_for().is_some());
        a.answered();
        assert_eq!(a.failing_for(), None);
        assert_eq!(a.failures(), 0);
        assert_eq!(ups.all_failing_for(), None);
        let states = ups.states();
        assert_eq!(states.len(), 2);
        assert_eq!(states[1].failures, 1);
    }

    #[test]
    fn one_report_per_kind_then_counted_until_the_next() {
        let h = UpstreamHealth::new("o:80");
        for _ in 0..5 {
            h.failed(&UpstreamError::Connect("refused".into()));
        }
        let connect = &h.kinds[0];
        assert_ne!(connect.next_report.load(Ordering::Relaxed), 0);
        assert_eq!(
            connect.unreported.load(Ordering::Relaxed),
            4,
            "the first was reported, four wait for the next line"
        );
        h.answered();
        assert_eq!(connect.unreported.load(Ordering::Relaxed), 0);
        assert_eq!(
            connect.next_report.load(Ordering::Relaxed),
            0,
            "after an answer, the next failure is reported at once"
        );
    }
}

/// One origin of a group with failover (`fallback_origins`): up or down, by active probes and
/// by the requests it fails (`[origin_health]` rise and fall).
#[derive(Debug)]
pub struct OriginMember {
    pub url: String,
    /// Its place: 0 is the primary, then the fallbacks in order.
    pub rank: usize,
    up: std::sync::atomic::AtomicBool,
    fails: std::sync::atomic::AtomicU32,
    passes: std::sync::atomic::AtomicU32,
    /// Milliseconds (since `epoch`) when a passively downed origin may be tried again; 0: not
    /// waiting.
    retry_at: AtomicU64,
    epoch: Instant,
}

/// An origin's state, for `/origins`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct OriginReport {
    pub url: String,
    /// `primary` or `fallback`.
    pub role: String,
    pub up: bool,
    /// Failures (requests or probes) in a row.
    pub failures: u32,
}

impl OriginMember {
    pub fn new(url: String, rank: usize) -> Self {
        Self {
            url,
            rank,
            up: std::sync::atomic::AtomicBool::new(true),
            fails: Default::default(),
            passes: Default::default(),
            retry_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Up, or down without active probes and due for another try (`retry_after`).
    pub fn usable(&self) -> bool {
        if self.up.load(Ordering::Acquire) {
            return true;
        }
        let at = self.retry_at.load(Ordering::Acquire);
        at != 0 && self.now_ms() >= at
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// A request or a probe failed; `fall` in a row take it out. Without active probes it is
    /// tried again after `retry_after`.
    pub fn failed(&self, fall: u32, retry_after: Option<std::time::Duration>) {
        self.passes.store(0, Ordering::Release);
        let n = self.fails.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(after) = retry_after {
            self.retry_at
                .store(self.now_ms() + after.as_millis() as u64, Ordering::Release);
        }
        if n >= fall && self.up.swap(false, Ordering::AcqRel) {
            warn!(origin = %self.url, failures = n, "origin down; requests go to the next origin");
        }
    }

    /// A request or a probe succeeded: `rise` in a row bring a down origin back (a request
    /// that succeeded on a down origin was a retry: one is enough without probes).
    pub fn passed(&self, rise: u32) {
        self.fails.store(0, Ordering::Release);
        let n = self.passes.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= rise && !self.up.swap(true, Ordering::AcqRel) {
            self.retry_at.store(0, Ordering::Release);
            info!(origin = %self.url, passes = n, "origin up again");
        }
    }

    pub fn report(&self) -> OriginReport {
        OriginReport {
            url: self.url.clone(),
            role: if self.rank == 0 {
                "primary"
            } else {
                "fallback"
            }
            .into(),
            up: self.is_up(),
            failures: self.fails.load(Ordering::Acquire),
        }
    }
}
