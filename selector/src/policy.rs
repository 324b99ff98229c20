//! How the selector ranks the eligible nodes for one connection, best first.
//!
//! Every policy returns a full ranking, not one winner: the proxy tries the first node and, when
//! its connect fails, the next one, so a node that died between two probes costs the client a
//! retry instead of an error. The rankings are pure functions of a snapshot of the nodes
//! (`Candidate`) and the client, except smooth weighted round robin, which keeps one counter
//! per node.

use std::cmp::{Ordering, Reverse};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::locate::{Coords, Location};

/// The configured selection policy (config field `policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Shortest great-circle distance from the client's location; ties go to the lowest
    /// smoothed probe RTT. What anycast approximates, and the default.
    Nearest,
    /// Lowest smoothed probe RTT (EWMA).
    Latency,
    /// Smooth weighted round robin, as nginx does it.
    WeightedRoundRobin,
    /// Fewest active spliced connections relative to weight.
    LeastConnections,
    /// Rendezvous hashing of the client address: a client keeps its node while that node is up.
    Hash,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Nearest,
        PolicyKind::Latency,
        PolicyKind::WeightedRoundRobin,
        PolicyKind::LeastConnections,
        PolicyKind::Hash,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Nearest => "nearest",
            PolicyKind::Latency => "latency",
            PolicyKind::WeightedRoundRobin => "weighted-round-robin",
            PolicyKind::LeastConnections => "least-connections",
            PolicyKind::Hash => "hash",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// A snapshot of one eligible node, taken for one connection.
#[derive(Debug, Clone)]
pub(crate) struct Candidate<'a> {
    /// Position of the node in the configuration; also the final tie-break, so every
    /// ranking is a total order and deterministic.
    pub index: usize,
    pub name: &'a str,
    /// At least 1.
    pub weight: u32,
    pub coords: Option<Coords>,
    pub srtt: Option<Duration>,
    pub active: u64,
    pub total: u64,
}

/// What the policies know about the client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Client<'a> {
    pub ip: IpAddr,
    pub location: Option<&'a Location>,
}

/// A policy with its state.
#[derive(Debug)]
pub(crate) struct Policy {
    kind: PolicyKind,
    /// Smooth WRR "current weight" of each node, by node index.
    wrr: Mutex<Vec<i64>>,
}

impl Policy {
    pub fn new(kind: PolicyKind, nodes: usize) -> Self {
        Self {
            kind,
            wrr: Mutex::new(vec![0; nodes]),
        }
    }

    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// Node indices, best first. Empty only when `candidates` is.
    pub fn rank(&self, client: &Client<'_>, candidates: &[Candidate<'_>]) -> Vec<usize> {
        let mut c = candidates.to_vec();
        match self.kind {
            PolicyKind::Nearest => {
                c.sort_by_key(|n| (distance_bucket(client, n), rtt_key(n), n.index));
            }
            PolicyKind::Latency => c.sort_by_key(|n| (rtt_key(n), n.index)),
            PolicyKind::LeastConnections => c.sort_by(least_connections),
            PolicyKind::Hash => {
                let ip = client.ip.to_canonical();
                c.sort_by(|a, b| {
                    hrw_score(ip, b)
                        .total_cmp(&hrw_score(ip, a))
                        .then(a.index.cmp(&b.index))
                });
            }
            PolicyKind::WeightedRoundRobin => return self.smooth_wrr(c),
        }
        c.into_iter().map(|n| n.index).collect()
    }

    /// Smooth weighted round robin (nginx `ngx_http_upstream_get_peer`): every pick, each
    /// candidate's current weight grows by its weight, the largest wins and pays back the sum
    /// of weights. Over any window of sum(weights) picks each node gets exactly its weight,
    /// interleaved (5,1,1 gives a a b a c a a, not a a a a a b c). The runners-up are ranked by
    /// their current weight: the nodes the next picks would choose.
    fn smooth_wrr(&self, mut c: Vec<Candidate<'_>>) -> Vec<usize> {
        if c.is_empty() {
            return Vec::new();
        }
        let mut current = self.wrr.lock().unwrap_or_else(|p| p.into_inner());
        let total: i64 = c.iter().map(|n| i64::from(n.weight)).sum();
        for n in &c {
            current[n.index] += i64::from(n.weight);
        }
        c.sort_by_key(|n| (Reverse(current[n.index]), n.index));
        current[c[0].index] -= total;
        let best = c.remove(0).index;
        c.sort_by_key(|n| (Reverse(current[n.index]), n.index));
        std::iter::once(best)
            .chain(c.into_iter().map(|n| n.index))
            .collect()
    }
}

/// Distance in whole kilometres: nodes within the same kilometre (typically the same region)
/// tie, and the tie goes to latency. Unknown client location: every node ties. Node without a
/// location: last.
fn distance_bucket(client: &Client<'_>, n: &Candidate<'_>) -> u64 {
    match (client.location, n.coords) {
        (None, _) => 0,
        (Some(_), None) => u64::MAX,
        // `as` saturates; distances are finite and below 20,016 km anyway.
        (Some(loc), Some(c)) => loc.coords.distance_km(c).round() as u64,
    }
}

/// Smoothed RTT, unmeasured nodes last.
fn rtt_key(n: &Candidate<'_>) -> u128 {
    n.srtt.map_or(u128::MAX, |d| d.as_nanos())
}

/// Fewest active connections per unit of weight (nginx `least_conn`, which compares
/// `conns * other.weight` the same way to stay in integers). Ties go to the fewest connections
/// so far per unit of weight, which spreads sequential short connections by weight instead of
/// sending them all to the first node.
fn least_connections(a: &Candidate<'_>, b: &Candidate<'_>) -> Ordering {
    let per_weight = |x: u64, wx: u32, y: u64, wy: u32| {
        (u128::from(x) * u128::from(wy)).cmp(&(u128::from(y) * u128::from(wx)))
    };
    per_weight(a.active, a.weight, b.active, b.weight)
        .then_with(|| per_weight(a.total, a.weight, b.total, b.weight))
        .then(a.index.cmp(&b.index))
}

/// Weighted rendezvous (highest random weight) score of a node for a client: every selector
/// computes the same ranking from the client address and node name alone, and when a node
/// leaves only its own clients move (Thaler and Ravishankar 1998). Weights use the logarithmic
/// method, `weight / -ln(u)` with `u` uniform in (0, 1) (Schindelhauer and Schomaker 2005), so a
/// node's share of clients is proportional to its weight. blake3 keeps the hash identical across
/// machines, versions and restarts (never `DefaultHasher`, which is randomly seeded).
fn hrw_score(ip: IpAddr, n: &Candidate<'_>) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(b"outpost-selector hrw v1\0");
    match ip {
        IpAddr::V4(a) => h.update(&a.octets()),
        IpAddr::V6(a) => h.update(&a.octets()),
    };
    h.update(b"\0");
    h.update(n.name.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    let x = u64::from_le_bytes(first);
    // 53 random bits, centred in their interval: u is strictly inside (0, 1), so ln(u) < 0.
    let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(n.weight.max(1)) / -u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EU: Coords = Coords {
        lat: 48.8566,
        lon: 2.3522,
    };
    const US: Coords = Coords {
        lat: 39.0438,
        lon: -77.4874,
    };
    const ASIA: Coords = Coords {
        lat: 35.6762,
        lon: 139.6503,
    };

    fn node(
        index: usize,
        name: &'static str,
        weight: u32,
        coords: Option<Coords>,
    ) -> Candidate<'static> {
        Candidate {
            index,
            name,
            weight,
            coords,
            srtt: None,
            active: 0,
            total: 0,
        }
    }

    fn client<'a>(ip: &str, location: Option<&'a Location>) -> Client<'a> {
        Client {
            ip: ip.parse().unwrap(),
            location,
        }
    }

    fn eu_client() -> Location {
        Location::region("eu", EU.lat, EU.lon)
    }

    #[test]
    fn parse_names() {
        for p in PolicyKind::ALL {
            assert_eq!(PolicyKind::parse(p.as_str()), Some(p));
        }
        assert_eq!(PolicyKind::parse("random"), None);
    }

    #[test]
    fn nearest_ranks_by_distance() {
        let p = Policy::new(PolicyKind::Nearest, 3);
        let nodes = [
            node(0, "us", 1, Some(US)),
            node(1, "asia", 1, Some(ASIA)),
            node(2, "eu", 1, Some(EU)),
        ];
        let eu = eu_client();
        assert_eq!(p.rank(&client("127.0.0.1", Some(&eu)), &nodes), [2, 0, 1]);
        let tokyo = Location::at(35.0, 139.0);
        assert_eq!(p.rank(&client("127.0.0.1", Some(&tokyo)), &nodes)[0], 1);
    }

    #[test]
    fn nearest_breaks_ties_by_latency_then_order() {
        let p = Policy::new(PolicyKind::Nearest, 3);
        let mut a = node(0, "eu-a", 1, Some(EU));
        let mut b = node(1, "eu-b", 1, Some(EU));
        let us = node(2, "us", 1, Some(US));
        let eu = eu_client();
        let c = client("127.0.0.1", Some(&eu));
        assert_eq!(p.rank(&c, &[a.clone(), b.clone(), us.clone()]), [0, 1, 2]);
        a.srtt = Some(Duration::from_millis(9));
        b.srtt = Some(Duration::from_millis(3));
        assert_eq!(p.rank(&c, &[a.clone(), b.clone(), us.clone()]), [1, 0, 2]);
        // A much faster node on the wrong continent still loses to distance.
        let mut fast_us = us;
        fast_us.srtt = Some(Duration::from_micros(1));
        assert_eq!(p.rank(&c, &[a, b, fast_us])[2], 2);
    }

    #[test]
    fn nearest_without_client_location_falls_back_to_latency() {
        let p = Policy::new(PolicyKind::Nearest, 2);
        let mut us = node(0, "us", 1, Some(US));
        let mut eu = node(1, "eu", 1, Some(EU));
        us.srtt = Some(Duration::from_millis(5));
        eu.srtt = Some(Duration::from_millis(2));
        assert_eq!(p.rank(&client("192.0.2.1", None), &[us, eu]), [1, 0]);
    }

    #[test]
    fn nearest_puts_nodes_without_location_last() {
        let p = Policy::new(PolicyKind::Nearest, 2);
        let eu = eu_client();
        let nodes = [node(0, "nowhere", 1, None), node(1, "us", 1, Some(US))];
        assert_eq!(p.rank(&client("127.0.0.1", Some(&eu)), &nodes), [1, 0]);
    }

    #[test]
    fn latency_prefers_lowest_srtt_and_unmeasured_last() {
        let p = Policy::new(PolicyKind::Latency, 3);
        let mut a = node(0, "a", 1, None);
        let mut b = node(1, "b", 1, None);
        let c = node(2, "c", 1, None);
        a.srtt = Some(Duration::from_millis(20));
        b.srtt = Some(Duration::from_millis(4));
        assert_eq!(p.rank(&client("127.0.0.1", None), &[a, b, c]), [1, 0, 2]);
    }

    #[test]
    fn smooth_wrr_follows_weights_interleaved() {
        let p = Policy::new(PolicyKind::WeightedRoundRobin, 3);
        let nodes = [
            node(0, "a", 5, None),
            node(1, "b", 1, None),
            node(2, "c", 1, None),
        ];
        let c = client("127.0.0.1", None);
        let picks: Vec<usize> = (0..7).map(|_| p.rank(&c, &nodes)[0]).collect();
        // nginx's documented sequence for weights 5, 1, 1.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
        let mut counts = [0; 3];
        for _ in 0..700 {
            counts[p.rank(&c, &nodes)[0]] += 1;
        }
        assert_eq!(counts, [500, 100, 100]);
    }

    #[test]
    fn smooth_wrr_ranks_every_candidate_and_skips_absent_ones() {
        let p = Policy::new(PolicyKind::WeightedRoundRobin, 3);
        let c = client("127.0.0.1", None);
        let all = [
            node(0, "a", 1, None),
            node(1, "b", 3, None),
            node(2, "c", 1, None),
        ];
        let mut order = p.rank(&c, &all);
        order.sort_unstable();
        assert_eq!(order, [0, 1, 2]);
        // With b withdrawn, a and c alternate.
        let without_b = [all[0].clone(), all[2].clone()];
        let picks: Vec<usize> = (0..4).map(|_| p.rank(&c, &without_b)[0]).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 2, "{picks:?}");
        assert!(p.rank(&c, &[]).is_empty());
    }

    #[test]
    fn least_connections_is_weight_aware() {
        let p = Policy::new(PolicyKind::LeastConnections, 2);
        let c = client("127.0.0.1", None);
        let mut a = node(0, "a", 1, None);
        let mut b = node(1, "b", 3, None);
        a.active = 1;
        b.active = 2; // 2/3 < 1/1
        assert_eq!(p.rank(&c, &[a.clone(), b.clone()]), [1, 0]);
        b.active = 4; // 4/3 > 1/1
        assert_eq!(p.rank(&c, &[a.clone(), b.clone()]), [0, 1]);
        // Equal load: the node with fewer connections so far per weight.
        a.active = 0;
        b.active = 0;
        a.total = 2;
        b.total = 3;
        assert_eq!(p.rank(&c, &[a, b]), [1, 0]);
    }

    #[test]
    fn least_connections_fills_by_weight() {
        // Simulate 8 long-lived connections arriving one after another.
        let p = Policy::new(PolicyKind::LeastConnections, 2);
        let c = client("127.0.0.1", None);
        let mut nodes = [node(0, "a", 1, None), node(1, "b", 3, None)];
        for _ in 0..8 {
            let best = p.rank(&c, &nodes)[0];
            nodes[best].active += 1;
            nodes[best].total += 1;
        }
        assert_eq!((nodes[0].active, nodes[1].active), (2, 6));
    }

    #[test]
    fn hash_is_sticky_and_stable() {
        let p = Policy::new(PolicyKind::Hash, 3);
        let nodes = [
            node(0, "edge-a", 1, None),
            node(1, "edge-b", 1, None),
            node(2, "edge-c", 1, None),
        ];
        let first = p.rank(&client("198.51.100.7", None), &nodes);
        for _ in 0..10 {
            assert_eq!(p.rank(&client("198.51.100.7", None), &nodes), first);
        }
        // Candidate order in the snapshot does not matter.
        let reversed = [nodes[2].clone(), nodes[1].clone(), nodes[0].clone()];
        assert_eq!(p.rank(&client("198.51.100.7", None), &reversed), first);
        // IPv4-mapped IPv6 is the same client.
        assert_eq!(p.rank(&client("::ffff:198.51.100.7", None), &nodes), first);
        // Pinned: blake3 gives the same ranking on every machine and in every version. If this
        // changes, every client of every deployment moves to another node.
        assert_eq!(first, [0, 2, 1]);
        assert_eq!(p.rank(&client("10.0.0.1", None), &nodes), [1, 0, 2]);
        assert_eq!(p.rank(&client("2001:db8::1", None), &nodes), [1, 0, 2]);
        let score = hrw_score("198.51.100.7".parse().unwrap(), &nodes[0]);
        assert!((score - 7.132987599014093).abs() < 1e-12, "{score}");
    }

    #[test]
    fn hash_moves_only_the_clients_of_a_removed_node() {
        let p = Policy::new(PolicyKind::Hash, 3);
        let all = [
            node(0, "edge-a", 1, None),
            node(1, "edge-b", 1, None),
            node(2, "edge-c", 1, None),
        ];
        let without_b = [all[0].clone(), all[2].clone()];
        let mut per_node = [0; 3];
        for i in 0..=255u8 {
            let ip = format!("10.0.0.{i}");
            let before = p.rank(&client(&ip, None), &all)[0];
            per_node[before] += 1;
            let after = p.rank(&client(&ip, None), &without_b)[0];
            if before != 1 {
                assert_eq!(before, after, "client {ip} moved although its node stayed");
            }
        }
        // Roughly a third each (binomial, n = 256: far more than 40 each).
        assert!(per_node.iter().all(|&n| n > 40), "{per_node:?}");
    }

    #[test]
    fn hash_shares_follow_weights() {
        let p = Policy::new(PolicyKind::Hash, 2);
        let nodes = [node(0, "light", 1, None), node(1, "heavy", 3, None)];
        let mut heavy = 0;
        for i in 0..2000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
            if p.rank(&Client { ip, location: None }, &nodes)[0] == 1 {
                heavy += 1;
            }
        }
        // Expected 1500 of 2000; the standard deviation is about 19.
        assert!((1400..1600).contains(&heavy), "{heavy}");
    }
}
