//! The nodes the selector knows, and the ranked choice of nodes for one connection.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::SelectorConfig;
use crate::health::HealthState;
use crate::locate::ClientMap;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::policy::{Candidate, Client, Policy};

#[derive(Debug)]
pub(crate) struct Pool {
    pub nodes: Vec<Arc<Node>>,
    pub policy: Policy,
    pub clients: ClientMap,
    pub metrics: Metrics,
}

/// The nodes to try for one connection, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    pub order: Vec<usize>,
    /// No node was up, so the ranking covers the down ones too (see [`Pool::choose`]).
    pub fail_open: bool,
}

impl Pool {
    pub fn new(cfg: &SelectorConfig) -> Self {
        let metrics = Metrics::new();
        let nodes = cfg
            .nodes
            .iter()
            .map(|spec| {
                Arc::new(Node::new(
                    spec.clone(),
                    &cfg.health,
                    metrics.node(&spec.name),
                ))
            })
            .collect::<Vec<_>>();
        Self {
            policy: Policy::new(cfg.policy, nodes.len()),
            nodes,
            clients: cfg.clients.clone(),
            metrics,
        }
    }

    pub fn any_up(&self) -> bool {
        self.nodes.iter().any(|n| n.state() == HealthState::Up)
    }

    /// Ranks the nodes that are up for a client. When none is up, ranks the ones that are down
    /// but not draining: the probes may be wrong (an admin port broken while the data port
    /// works), and trying costs a refused connect at worst, while refusing costs the client
    /// for sure. Envoy's "panic threshold" makes the same trade. Draining nodes asked for no
    /// new connections and never get one.
    pub fn choose(&self, ip: IpAddr) -> Choice {
        let client = Client {
            ip,
            location: self.clients.locate(ip),
        };
        let candidates = |wanted: HealthState| {
            self.nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.state() == wanted)
                .map(|(index, n)| Candidate {
                    index,
                    name: &n.spec.name,
                    weight: n.weight(),
                    coords: n.spec.location.as_ref().map(|l| l.coords),
                    srtt: n.srtt(),
                    active: n.active(),
                    total: n.total(),
                })
                .collect::<Vec<_>>()
        };
        let up = candidates(HealthState::Up);
        if !up.is_empty() {
            return Choice {
                order: self.policy.rank(&client, &up),
                fail_open: false,
            };
        }
        Choice {
            order: self.policy.rank(&client, &candidates(HealthState::Down)),
            fail_open: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeSpec;
    use crate::error::Error;
    use crate::health::{Observation, ProbeResult};
    use crate::policy::PolicyKind;
    use std::time::Duration;

    fn pool(policy: PolicyKind) -> Pool {
        let spec = |name: &str, port: u16| {
            NodeSpec::new(
                name,
                format!("127.0.0.1:{port}").parse().unwrap(),
                format!("127.0.0.1:{}", port + 1000).parse().unwrap(),
            )
        };
        let mut cfg = SelectorConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            vec![spec("a", 1), spec("b", 2), spec("c", 3)],
        );
        cfg.policy = policy;
        Pool::new(&cfg)
    }

    fn fail(n: &Node) {
        n.connect_failed(&Error::ConnectTimeout {
            node: n.spec.name.clone(),
            addr: n.spec.address,
            after: Duration::from_secs(1),
        });
    }

    fn drain(n: &Node) {
        n.record_probe(ProbeResult {
            observation: Observation::ProbeDraining,
            rtt: None,
            error: None,
        });
    }

    #[test]
    fn only_up_nodes_are_ranked() {
        let p = pool(PolicyKind::Latency);
        let ip = "127.0.0.1".parse().unwrap();
        assert_eq!(p.choose(ip).order, [0, 1, 2]);
        fail(&p.nodes[0]);
        drain(&p.nodes[1]);
        assert_eq!(
            p.choose(ip),
            Choice {
                order: vec![2],
                fail_open: false
            }
        );
    }

    #[test]
    fn fails_open_to_down_nodes_but_never_to_draining_ones() {
        let p = pool(PolicyKind::Latency);
        let ip = "127.0.0.1".parse().unwrap();
        fail(&p.nodes[0]);
        drain(&p.nodes[1]);
        fail(&p.nodes[2]);
        assert!(!p.any_up());
        assert_eq!(
            p.choose(ip),
            Choice {
                order: vec![0, 2],
                fail_open: true
            }
        );
        drain(&p.nodes[0]);
        drain(&p.nodes[2]);
        assert!(p.choose(ip).order.is_empty());
    }
}
