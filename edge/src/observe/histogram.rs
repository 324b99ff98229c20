//! A lock-free histogram: fixed buckets of atomics. prometheus-client's own histogram takes a
//! mutex per observation, which the hit path must not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds in seconds, shared by every latency histogram.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default)]
pub struct AtomicHistogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A copy of a histogram's state at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub counts: [u64; BUCKETS.len() + 1],
    pub sum_nanos: u64,
}

impl AtomicHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[idx].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::default();
        for (i, c) in self.counts.iter().enumerate() {
            s.counts[i] = c.load(Ordering::Relaxed);
        }
        s.sum_nanos = self.sum_nanos.load(Ordering::Relaxed);
        s
    }
}

impl HistogramSnapshot {
    /// Adds another snapshot's counts (shards of one histogram).
    pub fn add(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum_nanos += other.sum_nanos;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum_nanos as f64 / 1e9
    }

    /// Per-bucket `(upper bound, count)` pairs, +Inf last, as prometheus-client's encoder takes
    /// them (it accumulates).
    pub fn per_bucket(&self) -> Vec<(f64, u64)> {
        BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts)
            .collect()
    }

    /// Cumulative `(upper bound, count)` pairs as Prometheus wants them (the +Inf bucket is
    /// added by the encoder from `count`).
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        let mut out = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, b) in BUCKETS.iter().enumerate() {
            acc += self.counts[i];
            out.push((*b, acc));
        }
        acc += self.counts[BUCKETS.len()];
        out.push((f64::INFINITY, acc));
        out
    }

    /// The difference of two snapshots (later minus earlier).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        let mut d = HistogramSnapshot::default();
        for i in 0..self.counts.len() {
            d.counts[i] = self.counts[i].saturating_sub(earlier.counts[i]);
        }
        d.sum_nanos = self.sum_nanos.saturating_sub(earlier.sum_nanos);
        d
    }

    /// Estimated quantile in seconds (linear within the bucket), `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            if *c == 0 {
                continue;
            }
            if acc + c >= rank {
                let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                let upper = BUCKETS.get(i).copied().unwrap_or(lower * 2.0);
                let within = (rank - acc) as f64 / *c as f64;
                return Some(lower + (upper - lower) * within);
            }
            acc += c;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_quantiles_and_deltas() {
        let h = AtomicHistogram::default();
        let before = h.snapshot();
        for _ in 0..99 {
            h.observe(Duration::from_micros(300));
        }
        h.observe(Duration::from_millis(800));
        let s = h.snapshot().since(&before);
        assert_eq!(s.count(), 100);
        assert!(s.quantile(0.5).unwrap() <= 0.0005);
        assert!(s.quantile(0.999).unwrap() > 0.5);
        let cum = s.cumulative();
        assert_eq!(cum[0], (0.0005, 99));
        assert_eq!(cum.last().unwrap().1, 100);
        assert!((s.sum_secs() - (0.0297 + 0.8)).abs() < 1e-6);
    }
}
