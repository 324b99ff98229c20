//! Selector configuration: `configs/selector.toml`, overridden by `--listen` and
//! `--admin-listen`, validated into a typed [`SelectorConfig`] with every error reported
//! together (see `outpost-config`). `place` validates regions, client prefixes and locations;
//! `nodes` validates the `[[nodes]]` tables.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! admin_listen = "127.0.0.1:9090"
//! policy = "nearest"        # latency | weighted-round-robin | least-connections | hash
//! [health]                  # probe_interval, probe_timeout, rise, fall
//! [limits]                  # connect_timeout, drain_timeout, max_connections, idle_timeout,
//!                           # admin_max_connections, admin_header_read_timeout, admin_idle_timeout
//! [regions]
//! eu = { lat = 48.8566, lon = 2.3522 }
//! [clients]
//! default = { region = "eu" }
//! [[clients.prefix]]
//! cidr = "10.0.0.0/8"
//! region = "eu"             # or lat = .., lon = ..
//! [[nodes]]
//! name = "edge-eu"
//! address = "127.0.0.1:8081"
//! admin = "127.0.0.1:9081"  # probed with GET /readyz
//! region = "eu"             # and/or lat, lon
//! weight = 1
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use outpost_config::{ConfigErrors, Diagnostics, RawDuration, Setting, Source};
use serde::Deserialize;

use crate::health::HealthConfig;
use crate::locate::{ClientMap, Location};
use crate::policy::PolicyKind;

mod nodes;
mod place;
#[cfg(test)]
mod tests;

use nodes::RawNode;
use place::{RawClients, RawRegion, Regions};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Setting<String>>,
    admin_listen: Option<Setting<String>>,
    policy: Option<Setting<String>>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    regions: BTreeMap<String, Setting<RawRegion>>,
    #[serde(default)]
    clients: RawClients,
    #[serde(default)]
    nodes: Vec<Setting<RawNode>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    probe_interval: Option<Setting<RawDuration>>,
    probe_timeout: Option<Setting<RawDuration>>,
    rise: Option<Setting<i64>>,
    fall: Option<Setting<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    connect_timeout: Option<Setting<RawDuration>>,
    drain_timeout: Option<Setting<RawDuration>>,
    max_connections: Option<Setting<i64>>,
    idle_timeout: Option<Setting<RawDuration>>,
    admin_max_connections: Option<Setting<i64>>,
    admin_header_read_timeout: Option<Setting<RawDuration>>,
    admin_idle_timeout: Option<Setting<RawDuration>>,
}

/// Command-line flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct SelectorOverrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
}

/// One edge the selector may send connections to.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// Unique; names the node in logs, metrics and `/nodes`, and feeds the `hash` policy (so
    /// renaming a node moves its clients, readdressing it does not).
    pub name: String,
    /// Data address: client connections are spliced here.
    pub address: SocketAddr,
    /// Admin address: health probes `GET /readyz` here.
    pub admin: SocketAddr,
    /// Where the node is, for the `nearest` policy.
    pub location: Option<Location>,
    /// Relative share for `weighted-round-robin`, `least-connections` and `hash`; at least 1.
    pub weight: u32,
    /// Open each spliced connection with a PROXY protocol v2 header naming the client (the
    /// node must trust this selector's address: `[proxy_protocol] from` on the edge).
    pub proxy_protocol: bool,
}

impl NodeSpec {
    /// A node of weight 1 with no location.
    pub fn new(name: impl Into<String>, address: SocketAddr, admin: SocketAddr) -> Self {
        Self {
            name: name.into(),
            address,
            admin,
            location: None,
            weight: 1,
            proxy_protocol: false,
        }
    }

    pub fn with_location(mut self, location: Location) -> Self {
        self.location = Some(location);
        self
    }

    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// The validated selector configuration. Fields are public so tests and `outpost demo` can
/// build one in code: start from [`SelectorConfig::new`] and change what you need.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectorConfig {
    pub listen: SocketAddr,
    /// `/metrics`, `/nodes`, `/healthz`, `/readyz`; none when unset.
    pub admin_listen: Option<SocketAddr>,
    pub policy: PolicyKind,
    pub nodes: Vec<NodeSpec>,
    pub clients: ClientMap,
    pub health: HealthConfig,
    /// Bound on one connect to a node's data address; then the next node is tried.
    pub connect_timeout: Duration,
    /// On shutdown, how long spliced connections may go on before they are closed.
    pub drain_timeout: Duration,
    /// Spliced connections open at once (each holds two descriptors). Past it, new clients
    /// wait in the kernel's listen backlog until one closes.
    pub max_connections: usize,
    /// A spliced connection with no byte in either direction for this long is closed: a
    /// half-open or stalled client cannot hold its descriptors forever.
    pub idle_timeout: Duration,
    /// Connections open at once on the admin listener; more wait in the backlog.
    pub admin_max_connections: usize,
    /// Time an admin client gets to send its first bytes, and then each request head.
    pub admin_header_read_timeout: Duration,
    /// An admin connection with no request in flight for this long is closed.
    pub admin_idle_timeout: Duration,
}

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_CONNECTIONS: usize = 4096;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
const DEFAULT_ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Above this a connection cap is surely a typo (and tokio's semaphore has a limit).
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

impl SelectorConfig {
    /// Defaults everywhere: policy `nearest`, no admin listener, no client table, probes every
    /// second.
    pub fn new(listen: SocketAddr, nodes: Vec<NodeSpec>) -> Self {
        Self {
            listen,
            admin_listen: None,
            policy: PolicyKind::Nearest,
            nodes,
            clients: ClientMap::default(),
            health: HealthConfig::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            admin_max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            admin_header_read_timeout: DEFAULT_ADMIN_HEADER_READ_TIMEOUT,
            admin_idle_timeout: DEFAULT_ADMIN_IDLE_TIMEOUT,
        }
    }

    /// Loads an optional file, applies flags, validates.
    pub fn load(file: Option<&Path>, flags: SelectorOverrides) -> Result<Self, ConfigErrors> {
        let src = match file {
            Some(p) => Source::read(p)?,
            None => Source::empty(),
        };
        Self::from_source(&src, flags)
    }

    pub fn from_source(src: &Source, flags: SelectorOverrides) -> Result<Self, ConfigErrors> {
        let mut d = Diagnostics::new(src);
        let mut raw: RawConfig = d.parse()?;
        if let Some(v) = flags.listen {
            raw.listen = Some(Setting::from_flag("--listen", v));
        }
        if let Some(v) = flags.admin_listen {
            raw.admin_listen = Some(Setting::from_flag("--admin-listen", v));
        }

        let listen = match &raw.listen {
            Some(s) => d.socket_addr("listen", s),
            None => {
                d.missing(
                    "listen",
                    "set `listen` or pass --listen, for example 127.0.0.1:8080",
                );
                None
            }
        };
        let admin_listen = raw
            .admin_listen
            .as_ref()
            .map(|s| d.socket_addr("admin_listen", s));
        if let (Some(s), Some(Some(a)), Some(l)) = (&raw.admin_listen, admin_listen, listen)
            && a == l
            && l.port() != 0
        {
            d.error("admin_listen", s, "must differ from `listen`");
        }
        let policy = match &raw.policy {
            None => Some(PolicyKind::Nearest),
            Some(s) => PolicyKind::parse(s.value.trim()).or_else(|| {
                let names: Vec<_> = PolicyKind::ALL.iter().map(|p| p.as_str()).collect();
                d.error(
                    "policy",
                    s,
                    format!(
                        "unknown policy {:?} (expected one of: {})",
                        s.value,
                        names.join(", ")
                    ),
                );
                None
            }),
        };
        let health = health(&mut d, &raw.health);
        let dur = |d: &mut Diagnostics, field: &str, s: &Option<Setting<RawDuration>>, default| {
            s.as_ref().map_or(Some(default), |s| positive(d, field, s))
        };
        let connect_timeout = dur(
            &mut d,
            "limits.connect_timeout",
            &raw.limits.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        );
        let drain_timeout = dur(
            &mut d,
            "limits.drain_timeout",
            &raw.limits.drain_timeout,
            DEFAULT_DRAIN_TIMEOUT,
        );
        let idle_timeout = dur(
            &mut d,
            "limits.idle_timeout",
            &raw.limits.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
        );
        let admin_header_read_timeout = dur(
            &mut d,
            "limits.admin_header_read_timeout",
            &raw.limits.admin_header_read_timeout,
            DEFAULT_ADMIN_HEADER_READ_TIMEOUT,
        );
        let admin_idle_timeout = dur(
            &mut d,
            "limits.admin_idle_timeout",
            &raw.limits.admin_idle_timeout,
            DEFAULT_ADMIN_IDLE_TIMEOUT,
        );
        let max_connections = connections(
            &mut d,
            "limits.max_connections",
            &raw.limits.max_connections,
            DEFAULT_MAX_CONNECTIONS,
        );
        let admin_max_connections = connections(
            &mut d,
            "limits.admin_max_connections",
            &raw.limits.admin_max_connections,
            DEFAULT_ADMIN_MAX_CONNECTIONS,
        );

        let regions = Regions::validate(&mut d, &raw.regions);
        let clients = place::clients(&mut d, &raw.clients, &regions);
        let nodes = nodes::validate(&mut d, &raw.nodes, &regions, listen, policy);

        d.finish(|| SelectorConfig {
            listen: listen.expect("checked"),
            admin_listen: admin_listen.flatten(),
            policy: policy.expect("checked"),
            nodes,
            clients,
            health: health.expect("checked"),
            connect_timeout: connect_timeout.expect("checked"),
            drain_timeout: drain_timeout.expect("checked"),
            max_connections: max_connections.expect("checked"),
            idle_timeout: idle_timeout.expect("checked"),
            admin_max_connections: admin_max_connections.expect("checked"),
            admin_header_read_timeout: admin_header_read_timeout.expect("checked"),
            admin_idle_timeout: admin_idle_timeout.expect("checked"),
        })
    }
}

/// A connection cap: 1 to [`MAX_CONNECTIONS_LIMIT`].
fn connections(
    d: &mut Diagnostics,
    field: &str,
    s: &Option<Setting<i64>>,
    default: usize,
) -> Option<usize> {
    let Some(s) = s else {
        return Some(default);
    };
    match usize::try_from(s.value) {
        Ok(n) if (1..=MAX_CONNECTIONS_LIMIT).contains(&n) => Some(n),
        _ => {
            d.error(
                field,
                s,
                format!(
                    "must be between 1 and {MAX_CONNECTIONS_LIMIT}, not {}",
                    s.value
                ),
            );
            None
        }
    }
}

/// A duration that must be more than zero.
fn positive(d: &mut Diagnostics, field: &str, s: &Setting<RawDuration>) -> Option<Duration> {
    let v = d.duration(field, s)?;
    if v.is_zero() {
        d.error(field, s, "must be greater than zero");
        return None;
    }
    Some(v)
}

fn threshold(
    d: &mut Diagnostics,
    field: &str,
    s: &Option<Setting<i64>>,
    default: u32,
) -> Option<u32> {
    let Some(s) = s else {
        return Some(default);
    };
    match u32::try_from(s.value) {
        Ok(n) if (1..=100).contains(&n) => Some(n),
        _ => {
            d.error(
                field,
                s,
                format!("must be between 1 and 100, not {}", s.value),
            );
            None
        }
    }
}

fn health(d: &mut Diagnostics, raw: &RawHealth) -> Option<HealthConfig> {
    let defaults = HealthConfig::default();
    let interval = raw
        .probe_interval
        .as_ref()
        .map_or(Some(defaults.probe_interval), |s| {
            positive(d, "health.probe_interval", s)
        });
    let timeout = match &raw.probe_timeout {
        Some(s) => {
            let t = positive(d, "health.probe_timeout", s);
            // A probe that outlives its interval would delay the next one, and a dead node
            // would stay in rotation for longer than one interval.
            if let (Some(t), Some(i)) = (t, interval)
                && t > i
            {
                d.error(
                    "health.probe_timeout",
                    s,
                    format!("must not exceed health.probe_interval ({i:?})"),
                );
                None
            } else {
                t
            }
        }
        None => interval.map(|i| i.min(defaults.probe_timeout)),
    };
    let rise = threshold(d, "health.rise", &raw.rise, defaults.rise);
    let fall = threshold(d, "health.fall", &raw.fall, defaults.fall);
    Some(HealthConfig {
        probe_interval: interval?,
        probe_timeout: timeout?,
        rise: rise?,
        fall: fall?,
    })
}
