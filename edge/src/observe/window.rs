//! Rolling windows for `/stats`: a sampler snapshots the counters once a second into a ring of
//! the last 15 minutes, so the last 1, 5 and 15 minutes are differences of two snapshots. Also a
//! bounded "most missed URLs" sketch (space-saving top-k), fed on the miss path only.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::histogram::HistogramSnapshot;
use super::metrics::{EdgeMetrics, hit_ratio};

const KEEP: usize = 15 * 60 + 1;

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    totals: [u64; 6],
    bytes: [u64; 6],
    origin: HistogramSnapshot,
}

/// Figures over one window.
#[derive(Debug, Serialize, serde::Deserialize, Clone)]
pub struct WindowStats {
    pub seconds: u64,
    pub requests: u64,
    pub requests_per_sec: f64,
    pub hit_ratio: Option<f64>,
    pub byte_hit_ratio: Option<f64>,
    pub origin_p50_ms: Option<f64>,
    pub origin_p99_ms: Option<f64>,
}

/// One point of the live chart (per second).
#[derive(Debug, Serialize, serde::Deserialize, Clone)]
pub struct Point {
    /// Seconds ago (0 = now).
    pub ago: u64,
    pub requests_per_sec: f64,
    pub hit_ratio: Option<f64>,
}

pub struct Windows {
    metrics: Arc<EdgeMetrics>,
    ring: Mutex<VecDeque<Sample>>,
}

impl Windows {
    /// Starts sampling every second for as long as the returned value lives.
    pub fn start(metrics: Arc<EdgeMetrics>) -> Arc<Self> {
        let w = Arc::new(Self {
            metrics,
            ring: Mutex::new(VecDeque::with_capacity(KEEP)),
        });
        w.sample();
        let weak = Arc::downgrade(&w);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(w) = weak.upgrade() else { break };
                w.sample();
            }
        });
        w
    }

    fn sample(&self) {
        let s = Sample {
            at: Instant::now(),
            totals: self.metrics.totals(),
            bytes: self.metrics.bytes(),
            origin: self.metrics.origin_latency(),
        };
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == KEEP {
            ring.pop_front();
        }
        ring.push_back(s);
    }

    fn now_sample(&self) -> Sample {
        Sample {
            at: Instant::now(),
            totals: self.metrics.totals(),
            bytes: self.metrics.bytes(),
            origin: self.metrics.origin_latency(),
        }
    }

    /// Stats over the last `secs` seconds (or since start, if younger).
    pub fn window(&self, secs: u64) -> WindowStats {
        let now = self.now_sample();
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let base = ring
            .iter()
            .find(|s| now.at.duration_since(s.at) <= Duration::from_secs(secs))
            .copied()
            .unwrap_or(now);
        drop(ring);
        let totals: [u64; 6] =
            std::array::from_fn(|i| now.totals[i].saturating_sub(base.totals[i]));
        let bytes: [u64; 6] = std::array::from_fn(|i| now.bytes[i].saturating_sub(base.bytes[i]));
        let origin = now.origin.since(&base.origin);
        let span = now.at.duration_since(base.at).as_secs_f64().max(1.0);
        let requests: u64 = totals.iter().sum();
        WindowStats {
            seconds: secs,
            requests,
            requests_per_sec: requests as f64 / span,
            hit_ratio: hit_ratio(&totals),
            byte_hit_ratio: hit_ratio(&bytes),
            origin_p50_ms: origin.quantile(0.5).map(|s| s * 1000.0),
            origin_p99_ms: origin.quantile(0.99).map(|s| s * 1000.0),
        }
    }

    /// Per-second requests and hit ratio over the last 15 minutes, oldest first.
    pub fn series(&self) -> Vec<Point> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        ring.iter()
            .zip(ring.iter().skip(1))
            .map(|(a, b)| {
                let d: [u64; 6] = std::array::from_fn(|i| b.totals[i].saturating_sub(a.totals[i]));
                let span = b.at.duration_since(a.at).as_secs_f64().max(0.001);
                Point {
                    ago: now.duration_since(b.at).as_secs(),
                    requests_per_sec: d.iter().sum::<u64>() as f64 / span,
                    hit_ratio: hit_ratio(&d),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::status::{CacheStatus, Tier};

    #[tokio::test]
    async fn windows_and_top_missed() {
        let m = EdgeMetrics::new("t");
        let w = Windows::start(m.clone());
        m.record_request(
            CacheStatus::Miss,
            Tier::None,
            200,
            Some(100),
            Duration::from_millis(1),
        );
        for _ in 0..3 {
            m.record_request(
                CacheStatus::Hit,
                Tier::Memory,
                200,
                Some(100),
                Duration::from_millis(1),
            );
        }
        let s = w.window(60);
        assert_eq!(s.requests, 4);
        assert_eq!(s.hit_ratio, Some(0.75));
        assert_eq!(s.byte_hit_ratio, Some(0.75));
        m.record_miss("/a");
        m.record_miss("/b");
        m.record_miss("/a");
        assert_eq!(m.top_missed(1), vec![("/a".to_string(), 2)]);
        // Query strings (signatures, tokens) are never kept.
        m.record_miss("/signed?sig=s3cr3t&exp=1");
        m.record_miss("/signed?sig=other");
        m.record_miss("/signed?sig=third");
        let top = m.top_missed(1);
        assert_eq!(top, vec![("/signed?…".to_string(), 3)]);
        // A flood of unique URLs keeps the tracked set bounded and the often missed URL on top,
        // its count never understated.
        for i in 0..20_000 {
            m.record_miss(&format!("/unique/{i}"));
            if i % 50 == 0 {
                m.record_miss("/hot");
            }
        }
        let top = m.top_missed(2);
        assert_eq!(top[0].0, "/hot", "{top:?}");
        assert!(top[0].1 >= 400, "{top:?}");
        // Bounded, and never emptied by the ties a flood makes.
        let tracked = m.top_missed(10_000).len();
        assert!((384..=512).contains(&tracked), "{tracked}");
    }
}
