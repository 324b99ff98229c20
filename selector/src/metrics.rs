//! The selector's Prometheus metrics, one registry per selector, rendered on the admin port's
//! `/metrics` in the OpenMetrics text format (which Prometheus scrapes natively).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

/// The registry and the metric families.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    connections: Family<NodeLabel, Counter>,
    active: Family<NodeLabel, Gauge>,
    connect_failures: Family<NodeLabel, Counter>,
    up: Family<NodeLabel, Gauge>,
    probe_rtt: Family<NodeLabel, Gauge<f64, AtomicU64>>,
    pub unroutable: Counter,
    pub idle_closed: Counter,
}

/// One node's handles into the families. They share their atomics with the registry, so the
/// node updates them directly and `/nodes` reads the same numbers `/metrics` shows.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeMetrics {
    pub connections: Counter,
    pub active: Gauge,
    pub connect_failures: Counter,
    pub up: Gauge,
    pub probe_rtt: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outpost_selector");
        let connections = Family::<NodeLabel, Counter>::default();
        let active = Family::<NodeLabel, Gauge>::default();
        let connect_failures = Family::<NodeLabel, Counter>::default();
        let up = Family::<NodeLabel, Gauge>::default();
        let probe_rtt = Family::<NodeLabel, Gauge<f64, AtomicU64>>::default();
        let unroutable = Counter::default();
        let idle_closed = Counter::default();
        registry.register(
            "connections",
            "Client connections spliced to each node",
            connections.clone(),
        );
        registry.register(
            "active_connections",
            "Client connections currently spliced to each node",
            active.clone(),
        );
        registry.register(
            "connect_failures",
            "Failed connects to each node's data address (each one marks the node down)",
            connect_failures.clone(),
        );
        registry.register(
            "node_up",
            "1 when the node takes new connections, 0 when it is down or draining",
            up.clone(),
        );
        registry.register_with_unit(
            "probe_rtt",
            "Smoothed round-trip time of the node's health probes",
            Unit::Seconds,
            probe_rtt.clone(),
        );
        registry.register(
            "unroutable_connections",
            "Client connections closed because no node could take them",
            unroutable.clone(),
        );
        registry.register(
            "idle_closed_connections",
            "Spliced connections closed after limits.idle_timeout with no byte either way",
            idle_closed.clone(),
        );
        Self {
            registry,
            connections,
            active,
            connect_failures,
            up,
            probe_rtt,
            unroutable,
            idle_closed,
        }
    }

    /// The handles of one node; call once per node at start.
    pub fn node(&self, name: &str) -> NodeMetrics {
        let label = NodeLabel {
            node: name.to_string(),
        };
        NodeMetrics {
            connections: self.connections.get_or_create_owned(&label),
            active: self.active.get_or_create_owned(&label),
            connect_failures: self.connect_failures.get_or_create_owned(&label),
            up: self.up.get_or_create_owned(&label),
            probe_rtt: self.probe_rtt.get_or_create_owned(&label),
        }
    }

    /// The whole exposition, `# EOF` included.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_node_labels() {
        let m = Metrics::new();
        let a = m.node("edge-a");
        a.connections.inc();
        a.up.set(1);
        a.probe_rtt.set(0.0015);
        m.unroutable.inc();
        m.idle_closed.inc();
        let text = m.render();
        for needle in [
            "outpost_selector_connections_total{node=\"edge-a\"} 1",
            "outpost_selector_active_connections{node=\"edge-a\"} 0",
            "outpost_selector_connect_failures_total{node=\"edge-a\"} 0",
            "outpost_selector_node_up{node=\"edge-a\"} 1",
            "outpost_selector_probe_rtt_seconds{node=\"edge-a\"} 0.0015",
            "outpost_selector_unroutable_connections_total 1",
            "outpost_selector_idle_closed_connections_total 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // The same atomics: a second handle sees the first one's count.
        assert_eq!(m.node("edge-a").connections.get(), 1);
    }
}
