//! One node's live state: its health, its smoothed probe RTT and its connection counters.
//!
//! The counters are the node's Prometheus handles ([`NodeMetrics`]), so `/metrics` and `/nodes`
//! always show the same numbers. The mutex guards a few words and is never held across an
//! `.await`.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tracing::info;

use crate::config::NodeSpec;
use crate::error::Error;
use crate::health::{Health, HealthConfig, HealthState, Observation, ProbeResult};
use crate::metrics::NodeMetrics;

#[derive(Debug)]
pub(crate) struct Node {
    pub spec: NodeSpec,
    pub metrics: NodeMetrics,
    live: Mutex<Live>,
}

#[derive(Debug)]
struct Live {
    health: Health,
    srtt: Option<Duration>,
    /// Why the node last left the `up` state.
    reason: Option<String>,
}

impl Node {
    pub fn new(spec: NodeSpec, health: &HealthConfig, metrics: NodeMetrics) -> Self {
        metrics.up.set(1);
        Self {
            spec,
            metrics,
            live: Mutex::new(Live {
                health: Health::new(health.rise, health.fall),
                srtt: None,
                reason: None,
            }),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        // A panic elsewhere cannot leave these few fields inconsistent; keep serving.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> HealthState {
        self.live().health.state()
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.live().srtt
    }

    pub fn reason(&self) -> Option<String> {
        self.live().reason.clone()
    }

    pub fn weight(&self) -> u32 {
        self.spec.weight.max(1)
    }

    pub fn active(&self) -> u64 {
        self.metrics.active.get().max(0) as u64
    }

    pub fn total(&self) -> u64 {
        self.metrics.connections.get()
    }

    /// Applies a probe result: the RTT sample, then the health observation.
    pub fn record_probe(&self, r: ProbeResult) {
        if let Some(sample) = r.rtt {
            let srtt = {
                let mut live = self.live();
                let srtt = smooth(live.srtt, sample);
                live.srtt = Some(srtt);
                srtt
            };
            self.metrics.probe_rtt.set(srtt.as_secs_f64());
        }
        let reason = match r.observation {
            Observation::ProbeDraining => Some("/readyz answered 503 (draining)".to_string()),
            _ => r.error.map(|e| e.to_string()),
        };
        self.observe(r.observation, reason);
    }

    /// Passive check: a client connection could not reach the node.
    pub fn connect_failed(&self, err: &Error) {
        self.metrics.connect_failures.inc();
        self.observe(Observation::ConnectFailed, Some(err.to_string()));
    }

    /// Counts a connection as active until the returned guard drops.
    pub fn open(&self) -> ActiveConn {
        self.metrics.active.inc();
        ActiveConn(self.metrics.active.clone())
    }

    fn observe(&self, obs: Observation, reason: Option<String>) {
        let (from, to) = {
            let mut live = self.live();
            let Some(from) = live.health.observe(obs) else {
                return;
            };
            let to = live.health.state();
            live.reason = if to == HealthState::Up { None } else { reason };
            (from, to)
        };
        self.metrics.up.set(i64::from(to == HealthState::Up));
        let reason = self.reason();
        // Lifecycle event: info. Operators read these to see a node leave and come back.
        info!(
            node = %self.spec.name,
            address = %self.spec.address,
            from = from.as_str(),
            to = to.as_str(),
            reason = reason.as_deref().unwrap_or(""),
            "node health changed"
        );
    }
}

/// The smoothed RTT estimator of TCP (RFC 6298 §2.3): `srtt = 7/8 srtt + 1/8 sample`, and the
/// first sample taken as is. One slow probe moves it by an eighth, so the `latency` policy does
/// not flap on noise.
fn smooth(srtt: Option<Duration>, sample: Duration) -> Duration {
    match srtt {
        None => sample,
        Some(s) => s.mul_f64(7.0 / 8.0) + sample.mul_f64(1.0 / 8.0),
    }
}

/// An active spliced connection; dropping it decrements the node's active count.
#[derive(Debug)]
pub(crate) struct ActiveConn(Gauge);

impl Drop for ActiveConn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn node() -> Node {
        let spec = NodeSpec::new(
            "a",
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        Node::new(spec, &HealthConfig::default(), Metrics::new().node("a"))
    }

    #[test]
    fn srtt_is_an_ewma_with_gain_one_eighth() {
        let ms = Duration::from_millis;
        assert_eq!(smooth(None, ms(8)), ms(8));
        assert_eq!(smooth(Some(ms(8)), ms(16)), ms(9));
        let mut s = None;
        for _ in 0..100 {
            s = Some(smooth(s, ms(4)));
        }
        assert_eq!(s, Some(ms(4)));
    }

    #[test]
    fn probes_update_rtt_health_and_gauges() {
        let n = node();
        assert_eq!(n.metrics.up.get(), 1);
        n.record_probe(ProbeResult {
            observation: Observation::ProbeReady,
            rtt: Some(Duration::from_millis(2)),
            error: None,
        });
        assert_eq!(n.srtt(), Some(Duration::from_millis(2)));
        n.record_probe(ProbeResult {
            observation: Observation::ProbeDraining,
            rtt: Some(Duration::from_millis(2)),
            error: None,
        });
        assert_eq!(n.state(), HealthState::Draining);
        assert_eq!(n.metrics.up.get(), 0);
        assert!(n.reason().unwrap().contains("503"));
    }

    #[test]
    fn connect_failure_counts_and_takes_down() {
        let n = node();
        n.connect_failed(&Error::ConnectTimeout {
            node: "a".into(),
            addr: n.spec.address,
            after: Duration::from_secs(1),
        });
        assert_eq!(n.state(), HealthState::Down);
        assert_eq!(n.metrics.connect_failures.get(), 1);
        assert!(n.reason().unwrap().contains("timed out"));
    }

    #[test]
    fn active_guard_counts() {
        let n = node();
        let a = n.open();
        let b = n.open();
        assert_eq!(n.active(), 2);
        drop(a);
        drop(b);
        assert_eq!(n.active(), 0);
    }
}
