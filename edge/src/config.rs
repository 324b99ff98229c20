//! Edge configuration: `configs/edge.toml`, overridden by command-line flags, validated into a
//! typed [`EdgeConfig`] with every error reported together (see `outpost-config`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use outpost_cache::disk::admission::Policy as DiskAdmission;
use outpost_config::{ConfigErrors, Diagnostics, RawDuration, RawSize, Setting, Source};
use serde::Deserialize;

use crate::compress::{CompressionConfig, MediaPattern};

/// How shields share load (see `proxy::shield`): a shield whose requests in flight would pass
/// `factor` times the healthy shields' mean is skipped (`shield_balance_factor`, 0: plain
/// rendezvous), and one back from down reaches its full share over `ramp_up`
/// (`shield_ramp_up`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShieldBalance {
    pub factor: f64,
    pub ramp_up: Duration,
}

/// The origins after the first, and how their health is judged (`fallback_origins`,
/// `[origin_health]`).
#[derive(Debug, Clone, PartialEq)]
pub struct OriginFailover {
    /// Tried in order when the ones before fail.
    pub fallbacks: Vec<Uri>,
    /// `GET` this path on each origin every `interval`; `None`: passive checks only (a down
    /// origin is tried again after `interval`).
    pub probe_path: Option<String>,
    pub interval: Duration,
    /// Good probes in a row that bring an origin back.
    pub rise: u32,
    /// Failures in a row (probes or requests) that take it out.
    pub fall: u32,
    /// Answers that make an idempotent request try the next origin.
    pub statuses: Vec<u16>,
    /// `origin_weights`: requests spread over the origins in these proportions (each still
    /// fails over to the others); empty: the first usable origin takes them all.
    pub weights: Vec<u32>,
}

/// One shield as configured.
#[derive(Debug, Clone)]
pub struct ShieldSpec {
    pub name: String,
    /// Data port, e.g. `http://127.0.0.1:8090`.
    pub url: http::Uri,
    /// Admin address for active health checks (`/healthz`); without it only passive checks.
    pub admin: Option<std::net::SocketAddr>,
}

/// Role of a node: an edge faces clients; a shield sits between edges and the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Edge,
    Shield,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    role: Option<Setting<Role>>,
    name: Option<Setting<String>>,
    listen: Option<Setting<String>>,
    admin_listen: Option<Setting<String>>,
    origin: Option<Setting<String>>,
    #[serde(default)]
    cache: RawCache,
    /// Shields this edge sends misses to (instead of the origin).
    #[serde(default)]
    shields: Vec<RawShield>,
    /// Sibling nodes a purge sent to this node is forwarded to (their admin addresses).
    #[serde(default)]
    peers: Vec<RawPeer>,
    shield_health_interval: Option<Setting<RawDuration>>,
    /// Bounded-load rendezvous: a shield over this many times the mean load is skipped.
    shield_balance_factor: Option<Setting<f64>>,
    /// How long a shield back from down takes to reach its full share.
    shield_ramp_up: Option<Setting<RawDuration>>,
    /// Origins tried in order when `origin` (and the ones before) fail.
    #[serde(default)]
    fallback_origins: Vec<Setting<String>>,
    /// Spread requests over `origin` and `fallback_origins` by these weights (one each).
    origin_weights: Option<Vec<Setting<u64>>>,
    /// Health checks and failover of the origins.
    #[serde(default)]
    origin_health: RawOriginHealth,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    compression: RawCompression,
    #[serde(default)]
    admin: RawAdmin,
    /// `[tls]`: the HTTPS listener (absent: no HTTPS).
    tls: Option<RawTls>,
    /// `[upstream]`: how https origins and shields are verified.
    #[serde(default)]
    upstream: RawUpstream,
    /// `[fleet]`: purges through NATS JetStream (absent: this node alone, as before).
    fleet: Option<RawFleet>,
    /// `[access_log]` (absent: no access log).
    access_log: Option<RawAccessLog>,
    /// `[proxy_protocol]`: sources whose connections open with a PROXY v2 header.
    #[serde(default)]
    proxy_protocol: RawProxyProtocol,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxyProtocol {
    /// Networks (CIDR) whose connections must start with a PROXY v2 header.
    #[serde(default)]
    from: Vec<Setting<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOriginHealth {
    /// Active probe: `GET <path>` on each origin (absent: passive checks only).
    path: Option<Setting<String>>,
    interval: Option<Setting<RawDuration>>,
    rise: Option<Setting<u64>>,
    fall: Option<Setting<u64>>,
    /// Statuses that make a request try the next origin.
    failover_statuses: Option<Vec<Setting<u16>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    /// A file (appended to; relative to the config file), or `stdout`.
    path: Option<Setting<String>>,
    /// `combined` or `json`.
    format: Option<Setting<String>>,
    sample: Option<Setting<f64>>,
    /// `""` turns request ids off.
    request_id_header: Option<Setting<String>>,
    queue: Option<Setting<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    /// NATS server URLs.
    servers: Option<Vec<Setting<String>>>,
    stream: Option<Setting<String>>,
    token: Option<Setting<String>>,
    user: Option<Setting<String>>,
    password: Option<Setting<String>>,
    creds_file: Option<Setting<String>>,
    nkey_seed: Option<Setting<String>>,
    tls_ca_file: Option<Setting<String>>,
    tls_required: Option<bool>,
    receipt_wait: Option<Setting<RawDuration>>,
    max_age: Option<Setting<RawDuration>>,
    replicas: Option<Setting<u64>>,
    startup_wait: Option<Setting<RawDuration>>,
    state_dir: Option<Setting<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Option<Setting<String>>,
    handshake_timeout: Option<Setting<RawDuration>>,
    #[serde(default)]
    certs: Vec<RawCert>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    cert: Setting<String>,
    key: Setting<String>,
    default: Option<Setting<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    ca_file: Option<Setting<String>>,
    sni: Option<Setting<String>>,
    insecure_skip_verify: Option<Setting<bool>>,
    forward_headers: Option<Vec<Setting<String>>>,
    strip_headers: Option<Vec<Setting<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    tokens: Option<Setting<Vec<outpost_purge_api::Token>>>,
    public_metrics: Option<bool>,
    max_push_size: Option<Setting<RawSize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Setting<String>,
    admin: Setting<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShield {
    name: Setting<String>,
    url: Setting<String>,
    admin: Option<Setting<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    dir: Option<Setting<String>>,
    memory: Option<Setting<RawSize>>,
    disk: Option<Setting<RawSize>>,
    max_object_size: Option<Setting<RawSize>>,
    ignore_query_params: Option<Vec<String>>,
    version_param: Option<Setting<String>>,
    strip_version_param: Option<bool>,
    strip_tag_headers: Option<bool>,
    versioned_ttl: Option<Setting<RawDuration>>,
    targeted_cache_control: Option<Vec<Setting<String>>>,
    stale_on_error: Option<Setting<RawDuration>>,
    /// `{ "404" = "30s", "5xx" = "2s" }`: negative caching.
    negative_ttl: Option<std::collections::BTreeMap<String, Setting<RawDuration>>>,
    /// Share of a lifetime after which a requested object is revalidated in the background.
    prefresh: Option<Setting<f64>>,
    /// Which storable misses the disk tier writes: "second_miss_when_full" or "always".
    disk_admission: Option<Setting<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    header_read_timeout: Option<Setting<RawDuration>>,
    max_header_size: Option<Setting<RawSize>>,
    upstream_connect_timeout: Option<Setting<RawDuration>>,
    upstream_first_byte_timeout: Option<Setting<RawDuration>>,
    upstream_max_connections: Option<Setting<u64>>,
    upstream_queue_wait: Option<Setting<RawDuration>>,
    upstream_body_timeout: Option<Setting<RawDuration>>,
    stale_if_error_wait: Option<Setting<RawDuration>>,
    origin_breaker_failures: Option<Setting<u64>>,
    origin_breaker_cooldown: Option<Setting<RawDuration>>,
    degraded_after: Option<Setting<RawDuration>>,
    drain_timeout: Option<Setting<RawDuration>>,
    idle_timeout: Option<Setting<RawDuration>>,
    send_timeout: Option<Setting<RawDuration>>,
    max_connections: Option<Setting<u64>>,
    admin_max_connections: Option<Setting<u64>>,
    max_uri_size: Option<Setting<RawSize>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompression {
    enabled: Option<bool>,
    min_size: Option<Setting<RawSize>>,
    types: Option<Vec<Setting<String>>>,
    gzip_level: Option<Setting<u64>>,
    brotli_quality: Option<Setting<u64>>,
    stream_threshold: Option<Setting<RawSize>>,
    max_decompressed_size: Option<Setting<RawSize>>,
}

/// Command-line flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct EdgeOverrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub origin: Option<String>,
    pub cache_dir: Option<String>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    /// `--tls-listen`: address of the HTTPS listener.
    pub tls_listen: Option<String>,
    /// `--tls-cert` and `--tls-key`: one certificate pair; replaces `[[tls.certs]]`.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// `--name`: the node's name (in Via, Cache-Status and the fleet).
    pub name: Option<String>,
    /// `--fleet-servers`: NATS URLs, comma-separated; joins the fleet (a `[fleet]` section with
    /// its defaults when the file has none).
    pub fleet_servers: Option<String>,
}

/// The validated edge configuration.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub role: Role,
    pub name: String,
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub origin: Uri,
    /// Shields in front of the origin (empty: go to the origin directly).
    pub shields: Vec<ShieldSpec>,
    pub shield_health_interval: Duration,
    /// `shield_balance_factor` and `shield_ramp_up`: how shields share load.
    pub shield_balance: ShieldBalance,
    /// `fallback_origins` and `[origin_health]`.
    pub failover: OriginFailover,
    /// Sibling nodes (name, admin address) a purge is forwarded to.
    pub peers: Vec<(String, SocketAddr)>,
    pub cache_dir: Option<PathBuf>,
    pub memory: u64,
    pub disk: u64,
    pub max_object_size: u64,
    pub ignore_query_params: Vec<String>,
    /// Query parameter that names a version (`/app.js?v=3`); empty disables.
    pub version_param: String,
    /// Remove the version parameter from the upstream request.
    pub strip_version_param: bool,
    /// Freshness of a versioned response that carries none of its own.
    pub versioned_ttl: Duration,
    /// Remove `Surrogate-Key` / `Cache-Tag` from responses to clients (edge role).
    pub strip_tag_headers: bool,
    pub header_read_timeout: Duration,
    pub max_header_size: u64,
    pub upstream_connect_timeout: Duration,
    pub upstream_first_byte_timeout: Duration,
    pub upstream_max_connections: usize,
    /// How long a request over `upstream_max_connections` waits for one (at most as many
    /// requests wait as there are connections); then stale if allowed, else 503.
    pub upstream_queue_wait: Duration,
    /// Longest pause between two pieces of an upstream body: the fill is abandoned and the
    /// upstream connection closed past it.
    pub upstream_body_timeout: Duration,
    /// How long a client waits on a failing origin before a `stale-if-error` copy is served.
    pub stale_if_error_wait: Duration,
    /// Consecutive connect failures or timeouts that open an origin's circuit breaker (0: off).
    pub origin_breaker_failures: u32,
    /// How long an open breaker fails requests at once before one probe goes through.
    pub origin_breaker_cooldown: Duration,
    /// `/readyz` says "degraded" (still 200: the node serves what it holds) once every
    /// upstream has failed, with no answer, for this long (0: never).
    pub degraded_after: Duration,
    pub drain_timeout: Duration,
    /// A connection with no request in flight and no response waiting on its client for this
    /// long is closed (HTTP/1 keep-alive is bounded by `header_read_timeout` too).
    pub idle_timeout: Duration,
    /// A client that takes no byte of a response for this long while the response waits on it
    /// is dropped with its connection (nginx's `send_timeout`; see `outpost_net::Sending`), and
    /// one that takes none of a streaming response while the fill it reads from waits on it is
    /// dropped from that fill.
    pub send_timeout: Duration,
    /// Open client connections per listener (data, TLS); more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Open connections on the admin listener.
    pub admin_max_connections: usize,
    /// Longest request target: 414 above.
    pub max_uri_size: u64,
    /// `[upstream] forward_headers`: forwarding fields sent upstream although they can change
    /// the response; each is part of the cache key.
    pub forward_headers: Vec<http::HeaderName>,
    /// `[upstream] strip_headers`: request fields never sent upstream.
    pub strip_headers: Vec<http::HeaderName>,
    /// `[cache] targeted_cache_control`: targeted cache-control fields (RFC 9213), most
    /// specific first; the first one present and valid replaces Cache-Control for this node.
    pub targeted_cache_control: Vec<http::HeaderName>,
    /// `[cache] stale_on_error`: how long past freshness a stored copy stands in for an
    /// unreachable or failing (5xx) upstream when the response has no `stale-if-error`.
    pub stale_on_error: std::time::Duration,
    /// `[cache] negative_ttl`: freshness for error responses that carry none of their own.
    pub negative_ttl: outpost_cache::policy::NegativeTtl,
    /// `[cache] prefresh`: share of a lifetime after which a requested object is revalidated
    /// in the background (0: off).
    pub prefresh: f64,
    /// `[cache] disk_admission`: which storable misses the disk tier writes (by default all
    /// until it is full, then those whose key missed before, lately).
    pub disk_admission: DiskAdmission,
    /// `[compression]`: br / gzip negotiation and encoded variants.
    pub compression: CompressionConfig,
    /// Admin API tokens (plus `OUTPOST_ADMIN_TOKEN`, added at start-up).
    pub admin_tokens: Vec<outpost_purge_api::Token>,
    /// `/metrics`, `/stats` and the status page readable without a token.
    pub public_metrics: bool,
    /// Largest pushed object (413 above).
    pub max_push_size: u64,
    /// `[tls]`: the HTTPS listener with its certificates already loaded and checked.
    pub tls: Option<crate::tls::TlsConfig>,
    /// `[upstream]`: verification of https origins and shields.
    pub upstream_tls: crate::tls::UpstreamTlsConfig,
    /// `[fleet]`: purges carried to every node through NATS JetStream.
    pub fleet: Option<outpost_fleet::FleetConfig>,
    /// `[access_log]`.
    pub access_log: Option<crate::observe::access_log::AccessLogConfig>,
    /// `[proxy_protocol] from`: connections from these networks open with a PROXY v2 header
    /// (the selector's), which names the client; from anywhere else, one is refused as
    /// malformed HTTP.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

impl EdgeConfig {
    /// Loads an optional file, applies flags, validates.
    pub fn load(file: Option<&Path>, flags: EdgeOverrides) -> Result<Self, ConfigErrors> {
        let src = match file {
            Some(p) => Source::read(p)?,
            None => Source::empty(),
        };
        Self::from_source(&src, flags)
    }

    pub fn from_source(src: &Source, flags: EdgeOverrides) -> Result<Self, ConfigErrors> {
        let mut d = Diagnostics::new(src);
        let mut raw: RawConfig = d.parse()?;
        let flag = |f: &'static str, v: Option<String>| v.map(|v| Setting::from_flag(f, v));
        if let Some(s) = flag("--listen", flags.listen) {
            raw.listen = Some(s);
        }
        if let Some(s) = flag("--admin-listen", flags.admin_listen) {
            raw.admin_listen = Some(s);
        }
        if let Some(s) = flag("--origin", flags.origin) {
            raw.origin = Some(s);
        }
        if let Some(s) = flag("--cache-dir", flags.cache_dir) {
            raw.cache.dir = Some(s);
        }
        if let Some(v) = flags.memory {
            raw.cache.memory = Some(Setting::from_flag("--memory", RawSize::Text(v)));
        }
        if let Some(v) = flags.disk {
            raw.cache.disk = Some(Setting::from_flag("--disk", RawSize::Text(v)));
        }
        if let Some(s) = flag("--name", flags.name) {
            raw.name = Some(s);
        }
        if let Some(v) = flags.fleet_servers {
            raw.fleet.get_or_insert_default().servers = Some(
                v.split(',')
                    .map(|u| Setting::from_flag("--fleet-servers", u.trim().to_string()))
                    .collect(),
            );
        }
        if let Some(s) = flag("--tls-listen", flags.tls_listen) {
            raw.tls.get_or_insert_default().listen = Some(s);
        }
        let lone_tls_flag = match (flags.tls_cert, flags.tls_key) {
            (Some(cert), Some(key)) => {
                raw.tls.get_or_insert_default().certs = vec![RawCert {
                    cert: Setting::from_flag("--tls-cert", cert),
                    key: Setting::from_flag("--tls-key", key),
                    default: None,
                }];
                None
            }
            (Some(v), None) => Some(Setting::from_flag("--tls-cert", v)),
            (None, Some(v)) => Some(Setting::from_flag("--tls-key", v)),
            (None, None) => None,
        };

        if let Some(s) = &lone_tls_flag {
            d.error(
                "tls",
                s,
                "--tls-cert and --tls-key go together (a certificate and its private key)",
            );
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
        let origin = match &raw.origin {
            Some(s) => parse_origin(&mut d, s, "origin"),
            None => {
                d.missing(
                    "origin",
                    "set `origin` or pass --origin, for example http://127.0.0.1:9000",
                );
                None
            }
        };
        let failover = origin_failover(&mut d, &raw.fallback_origins, &raw.origin_health)
            .and_then(|f| origin_weights(&mut d, raw.origin_weights.as_deref(), f));
        let cache_dir = raw.cache.dir.as_ref().map(|s| d.path(s));
        let mut peers = Vec::new();
        for (i, p) in raw.peers.iter().enumerate() {
            if let Some(a) = d.socket_addr(&format!("peers[{i}].admin"), &p.admin) {
                peers.push((p.name.value.clone(), a));
            }
        }
        let mut shields = Vec::new();
        for (i, sh) in raw.shields.iter().enumerate() {
            let url = parse_origin(&mut d, &sh.url, &format!("shields[{i}].url"));
            let admin = sh
                .admin
                .as_ref()
                .and_then(|a| d.socket_addr(&format!("shields[{i}].admin"), a));
            if sh.name.value.trim().is_empty() {
                d.error(&format!("shields[{i}].name"), &sh.name, "must not be empty");
            } else if raw.shields[..i]
                .iter()
                .any(|o| o.name.value == sh.name.value)
            {
                d.error(
                    &format!("shields[{i}].name"),
                    &sh.name,
                    format!("duplicate shield name {:?}", sh.name.value),
                );
            }
            if let Some(url) = url {
                shields.push(ShieldSpec {
                    name: sh.name.value.clone(),
                    url,
                    admin,
                });
            }
        }
        let size =
            |d: &mut Diagnostics, field: &str, s: &Option<Setting<RawSize>>, default: u64| {
                s.as_ref().map_or(Some(default), |s| d.byte_size(field, s))
            };
        let dur =
            |d: &mut Diagnostics, field: &str, s: &Option<Setting<RawDuration>>, default: u64| {
                s.as_ref()
                    .map_or(Some(Duration::from_secs(default)), |s| d.duration(field, s))
            };
        let memory = size(&mut d, "cache.memory", &raw.cache.memory, 256 << 20);
        let shield_health_interval = dur(
            &mut d,
            "shield_health_interval",
            &raw.shield_health_interval,
            1,
        );
        let shield_ramp_up = dur(&mut d, "shield_ramp_up", &raw.shield_ramp_up, 10);
        let shield_factor = match &raw.shield_balance_factor {
            None => Some(1.25),
            Some(s) if s.value == 0.0 || (1.0..=100.0).contains(&s.value) => Some(s.value),
            Some(s) => {
                d.error(
                    "shield_balance_factor",
                    s,
                    "must be 0 (plain rendezvous) or from 1 to 100, e.g. 1.25 (a shield may carry 25% more than the mean)",
                );
                None
            }
        };
        let versioned_ttl = dur(
            &mut d,
            "cache.versioned_ttl",
            &raw.cache.versioned_ttl,
            365 * 24 * 3600,
        );
        // RFC 9111 §4.2.4 lets a cache serve stale when the origin cannot be reached; a
        // minute bridges a restart or a blip without hiding an outage for long.
        let stale_on_error = dur(
            &mut d,
            "cache.stale_on_error",
            &raw.cache.stale_on_error,
            60,
        );
        let disk = size(&mut d, "cache.disk", &raw.cache.disk, 10 << 30);
        let max_object_size = size(
            &mut d,
            "cache.max_object_size",
            &raw.cache.max_object_size,
            1 << 30,
        );
        let header_read_timeout = dur(
            &mut d,
            "limits.header_read_timeout",
            &raw.limits.header_read_timeout,
            10,
        );
        let max_header_size = size(
            &mut d,
            "limits.max_header_size",
            &raw.limits.max_header_size,
            64 << 10,
        );
        let connect = dur(
            &mut d,
            "limits.upstream_connect_timeout",
            &raw.limits.upstream_connect_timeout,
            3,
        );
        let first_byte = dur(
            &mut d,
            "limits.upstream_first_byte_timeout",
            &raw.limits.upstream_first_byte_timeout,
            30,
        );
        let max_push_size = size(
            &mut d,
            "admin.max_push_size",
            &raw.admin.max_push_size,
            1 << 30,
        );
        let admin_tokens = match &raw.admin.tokens {
            Some(t) => match outpost_purge_api::Auth::new(t.value.clone()) {
                Ok(_) => t.value.clone(),
                Err(e) => {
                    d.error("admin.tokens", t, e.to_string());
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let queue_wait = dur(
            &mut d,
            "limits.upstream_queue_wait",
            &raw.limits.upstream_queue_wait,
            1,
        );
        let degraded_after = dur(
            &mut d,
            "limits.degraded_after",
            &raw.limits.degraded_after,
            30,
        );
        let drain = dur(
            &mut d,
            "limits.drain_timeout",
            &raw.limits.drain_timeout,
            10,
        );
        let body_timeout = dur(
            &mut d,
            "limits.upstream_body_timeout",
            &raw.limits.upstream_body_timeout,
            30,
        );
        let sie_wait = dur(
            &mut d,
            "limits.stale_if_error_wait",
            &raw.limits.stale_if_error_wait,
            2,
        );
        let breaker_cooldown = dur(
            &mut d,
            "limits.origin_breaker_cooldown",
            &raw.limits.origin_breaker_cooldown,
            2,
        );
        // 0 would close every connection at once (idle) or drop every response (send).
        let mut positive =
            |field: &str, s: &Option<Setting<RawDuration>>| match (dur(&mut d, field, s, 60), s) {
                (Some(t), Some(s)) if t.is_zero() => {
                    d.error(field, s, "must be greater than zero");
                    None
                }
                (t, _) => t,
            };
        let idle_timeout = positive("limits.idle_timeout", &raw.limits.idle_timeout);
        let send_timeout = positive("limits.send_timeout", &raw.limits.send_timeout);
        let max_uri_size = size(
            &mut d,
            "limits.max_uri_size",
            &raw.limits.max_uri_size,
            8 << 10,
        );
        let mut count = |field: &str, s: &Option<Setting<u64>>, default: u64, min: u64| {
            s.as_ref().map_or(Some(default), |s| {
                if s.value < min {
                    d.error(field, s, format!("must be at least {min}"));
                    None
                } else {
                    Some(s.value)
                }
            })
        };
        let breaker_failures = count(
            "limits.origin_breaker_failures",
            &raw.limits.origin_breaker_failures,
            5,
            0,
        );
        let max_connections = count(
            "limits.max_connections",
            &raw.limits.max_connections,
            8192,
            1,
        );
        let admin_max_connections = count(
            "limits.admin_max_connections",
            &raw.limits.admin_max_connections,
            128,
            1,
        );
        let forward_headers = header_names(
            &mut d,
            "upstream.forward_headers",
            raw.upstream.forward_headers.as_deref(),
            true,
        );
        let strip_headers = header_names(
            &mut d,
            "upstream.strip_headers",
            raw.upstream.strip_headers.as_deref(),
            false,
        );
        // RFC 9213 §2.1: CDN-Cache-Control, unless the operator names the fields (for example
        // a field of this CDN's own first, or none at all: `[]`).
        let targeted_cache_control = match raw.cache.targeted_cache_control.as_deref() {
            None => vec![http::HeaderName::from_static("cdn-cache-control")],
            Some(names) => header_names(&mut d, "cache.targeted_cache_control", Some(names), false),
        };
        if let Some(m) = &raw.cache.memory
            && memory == Some(0)
        {
            d.error("cache.memory", m, "must be greater than zero");
        }
        if let Some(s) = &raw.limits.max_header_size
            && max_header_size.is_some_and(|n| n < 8192)
        {
            d.error("limits.max_header_size", s, "must be at least 8KiB");
        }
        let max_conns = raw
            .limits
            .upstream_max_connections
            .as_ref()
            .map_or(Some(256), |s| {
                if s.value == 0 {
                    d.error("limits.upstream_max_connections", s, "must be at least 1");
                    None
                } else {
                    Some(s.value as usize)
                }
            });
        let role = raw.role.as_ref().map_or(Role::Edge, |s| s.value);
        let name = raw
            .name
            .as_ref()
            .map(|s| s.value.clone())
            .unwrap_or_else(|| "outpost".to_string());
        if let Some(n) = &raw.name
            && (n.value.is_empty()
                || !n
                    .value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'))
        {
            d.error(
                "name",
                n,
                "must be a non-empty token of letters, digits, '-', '_' or '.'",
            );
        }
        let compression = compression_config(&mut d, &raw.compression);
        let tls = tls_config(&mut d, raw.tls.as_ref(), listen, admin_listen.flatten());
        let upstream_tls = upstream_tls_config(&mut d, &raw.upstream);
        let fleet = raw
            .fleet
            .as_ref()
            .and_then(|f| fleet_config(&mut d, f, raw.name.as_ref(), cache_dir.as_deref()));
        let negative_ttl = negative_ttl_config(&mut d, raw.cache.negative_ttl.as_ref());
        let prefresh = match &raw.cache.prefresh {
            None => Some(0.9),
            Some(s) if s.value == 0.0 || (s.value >= 0.5 && s.value < 1.0) => Some(s.value),
            Some(s) => {
                d.error(
                    "cache.prefresh",
                    s,
                    "must be 0 (off), or a share of the lifetime from 0.5 to below 1, e.g. 0.9",
                );
                None
            }
        };
        let disk_admission = match &raw.cache.disk_admission {
            None => Some(DiskAdmission::default()),
            Some(s) => DiskAdmission::parse(&s.value).or_else(|| {
                d.error(
                    "cache.disk_admission",
                    s,
                    format!(
                        "unknown policy {:?} (expected \"second_miss_when_full\" or \"always\")",
                        s.value
                    ),
                );
                None
            }),
        };
        let mut proxy_protocol_from = Vec::new();
        for (i, n) in raw.proxy_protocol.from.iter().enumerate() {
            match n.value.trim().parse::<ipnet::IpNet>().or_else(|_| {
                n.value
                    .trim()
                    .parse::<std::net::IpAddr>()
                    .map(ipnet::IpNet::from)
            }) {
                Ok(net) => proxy_protocol_from.push(net),
                Err(_) => d.error(
                    &format!("proxy_protocol.from[{i}]"),
                    n,
                    format!(
                        "{:?} is not a network (expected for example \"10.0.0.0/8\")",
                        n.value
                    ),
                ),
            }
        }
        let access_log = raw
            .access_log
            .as_ref()
            .and_then(|a| access_log_config(&mut d, a));
        d.finish(|| EdgeConfig {
            role,
            name,
            listen: listen.expect("checked"),
            admin_listen: admin_listen.flatten(),
            origin: origin.expect("checked"),
            shields,
            peers,
            shield_health_interval: shield_health_interval.expect("checked"),
            failover: failover.expect("checked"),
            shield_balance: ShieldBalance {
                factor: shield_factor.expect("checked"),
                ramp_up: shield_ramp_up.expect("checked"),
            },
            cache_dir,
            memory: memory.expect("checked"),
            disk: disk.expect("checked"),
            max_object_size: max_object_size.expect("checked"),
            ignore_query_params: raw.cache.ignore_query_params.clone().unwrap_or_default(),
            version_param: raw
                .cache
                .version_param
                .as_ref()
                .map_or_else(|| "v".to_string(), |s| s.value.clone()),
            strip_version_param: raw.cache.strip_version_param.unwrap_or(false),
            strip_tag_headers: raw.cache.strip_tag_headers.unwrap_or(true),
            versioned_ttl: versioned_ttl.expect("checked"),
            header_read_timeout: header_read_timeout.expect("checked"),
            max_header_size: max_header_size.expect("checked"),
            upstream_connect_timeout: connect.expect("checked"),
            upstream_first_byte_timeout: first_byte.expect("checked"),
            upstream_max_connections: max_conns.expect("checked"),
            upstream_queue_wait: queue_wait.expect("checked"),
            degraded_after: degraded_after.expect("checked"),
            drain_timeout: drain.expect("checked"),
            upstream_body_timeout: body_timeout.expect("checked"),
            stale_if_error_wait: sie_wait.expect("checked"),
            origin_breaker_failures: breaker_failures.expect("checked").min(u32::MAX as u64) as u32,
            origin_breaker_cooldown: breaker_cooldown.expect("checked"),
            idle_timeout: idle_timeout.expect("checked"),
            send_timeout: send_timeout.expect("checked"),
            max_connections: max_connections.expect("checked") as usize,
            admin_max_connections: admin_max_connections.expect("checked") as usize,
            max_uri_size: max_uri_size.expect("checked"),
            forward_headers,
            strip_headers,
            targeted_cache_control,
            stale_on_error: stale_on_error.expect("checked"),
            negative_ttl,
            prefresh: prefresh.expect("checked"),
            disk_admission: disk_admission.expect("checked"),
            admin_tokens,
            public_metrics: raw.admin.public_metrics.unwrap_or(true),
            max_push_size: max_push_size.expect("checked"),
            compression,
            tls,
            upstream_tls,
            fleet,
            access_log,
            proxy_protocol_from,
        })
    }
}

/// `origin_weights`: one per origin (`origin`, then each fallback), 1 to 1000.
fn origin_weights(
    d: &mut Diagnostics,
    raw: Option<&[Setting<u64>]>,
    mut failover: OriginFailover,
) -> Option<OriginFailover> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Some(failover);
    };
    let origins = 1 + failover.fallbacks.len();
    let mut ok = true;
    if raw.len() != origins {
        ok = false;
        d.error(
            "origin_weights",
            &raw[0],
            format!(
                "needs one weight per origin: {origins} (origin and fallback_origins), got {}",
                raw.len()
            ),
        );
    }
    for (i, w) in raw.iter().enumerate() {
        if !(1..=1000).contains(&w.value) {
            ok = false;
            d.error(&format!("origin_weights[{i}]"), w, "must be from 1 to 1000");
        }
    }
    failover.weights = raw.iter().map(|w| w.value as u32).collect();
    ok.then_some(failover)
}

/// `fallback_origins` and `[origin_health]`.
fn origin_failover(
    d: &mut Diagnostics,
    fallbacks: &[Setting<String>],
    raw: &RawOriginHealth,
) -> Option<OriginFailover> {
    let fallbacks: Vec<Option<Uri>> = fallbacks
        .iter()
        .enumerate()
        .map(|(i, f)| parse_origin(d, f, &format!("fallback_origins[{i}]")))
        .collect();
    let interval = raw
        .interval
        .as_ref()
        .map_or(Some(Duration::from_secs(2)), |s| {
            d.duration("origin_health.interval", s)
        });
    let mut count = |field: &str, s: &Option<Setting<u64>>, default: u32| match s {
        None => Some(default),
        Some(v) if (1..=100).contains(&v.value) => Some(v.value as u32),
        Some(v) => {
            d.error(field, v, "must be from 1 to 100");
            None
        }
    };
    let rise = count("origin_health.rise", &raw.rise, 2);
    let fall = count("origin_health.fall", &raw.fall, 3);
    let mut statuses = Vec::new();
    for (i, s) in raw.failover_statuses.iter().flatten().enumerate() {
        if (500..=599).contains(&s.value) || s.value == 429 {
            statuses.push(s.value);
        } else {
            d.error(
                &format!("origin_health.failover_statuses[{i}]"),
                s,
                "must be 429 or a 5xx status",
            );
        }
    }
    if raw.failover_statuses.is_none() {
        statuses = vec![502, 503, 504];
    }
    let probe_path = match &raw.path {
        Some(p) if !p.value.starts_with('/') => {
            d.error(
                "origin_health.path",
                p,
                "must start with /, e.g. \"/healthz\"",
            );
            None
        }
        p => Some(p.as_ref().map(|p| p.value.clone())),
    };
    Some(OriginFailover {
        fallbacks: fallbacks.into_iter().collect::<Option<Vec<_>>>()?,
        probe_path: probe_path?,
        interval: interval?,
        rise: rise?,
        fall: fall?,
        statuses,
        weights: Vec::new(),
    })
}

/// `[cache] negative_ttl`: keys are statuses from 400 to 599 or the classes `4xx` and `5xx`,
/// values durations of at least a second (freshness counts whole seconds).
fn negative_ttl_config(
    d: &mut Diagnostics,
    raw: Option<&std::collections::BTreeMap<String, Setting<RawDuration>>>,
) -> outpost_cache::policy::NegativeTtl {
    let mut entries = Vec::new();
    for (key, value) in raw.into_iter().flatten() {
        let field = format!("cache.negative_ttl.{key}");
        let status = match key.to_ascii_lowercase().as_str() {
            "4xx" => Some((400, true)),
            "5xx" => Some((500, true)),
            k => k
                .parse::<u16>()
                .ok()
                .filter(|s| (400..600).contains(s))
                .map(|s| (s, false)),
        };
        let Some((status, class)) = status else {
            d.error(
                &field,
                value,
                format!("{key:?} is not an error status: use 400 to 599, \"4xx\" or \"5xx\""),
            );
            continue;
        };
        match d.duration(&field, value) {
            Some(ttl) if ttl >= std::time::Duration::from_secs(1) => {
                entries.push((status, class, ttl));
            }
            Some(_) => d.error(&field, value, "must be at least 1s"),
            None => {}
        }
    }
    outpost_cache::policy::NegativeTtl::new(entries)
}

/// `[access_log]`: `path` is required (a file, or `stdout`).
fn access_log_config(
    d: &mut Diagnostics,
    raw: &RawAccessLog,
) -> Option<crate::observe::access_log::AccessLogConfig> {
    use crate::observe::access_log::{AccessLogConfig, Format, Target};
    let target = match &raw.path {
        None => {
            d.missing(
                "access_log.path",
                "a file to append to, or \"stdout\", for example path = \"/var/log/outpost/access.log\"",
            );
            None
        }
        Some(p) if p.value.trim().is_empty() => {
            d.error("access_log.path", p, "must not be empty");
            None
        }
        Some(p) if p.value == "stdout" => Some(Target::Stdout),
        Some(p) => Some(Target::File(d.path(p))),
    };
    let format = match raw.format.as_ref().map(|f| (f, f.value.as_str())) {
        None | Some((_, "combined")) => Some(Format::Combined),
        Some((_, "json")) => Some(Format::Json),
        Some((f, other)) => {
            d.error(
                "access_log.format",
                f,
                format!("unknown format {other:?} (expected \"combined\" or \"json\")"),
            );
            None
        }
    };
    let sample = match &raw.sample {
        None => Some(1.0),
        Some(s) if s.value > 0.0 && s.value <= 1.0 => Some(s.value),
        Some(s) => {
            d.error(
                "access_log.sample",
                s,
                "must be above 0 and at most 1 (the share of requests logged)",
            );
            None
        }
    };
    let request_id_header = match &raw.request_id_header {
        None => Some(Some(http::HeaderName::from_static("x-request-id"))),
        Some(h) if h.value.is_empty() => Some(None),
        Some(h) => match http::HeaderName::from_bytes(h.value.as_bytes()) {
            Ok(n) => Some(Some(n)),
            Err(_) => {
                d.error(
                    "access_log.request_id_header",
                    h,
                    format!("{:?} is not a header field name", h.value),
                );
                None
            }
        },
    };
    let queue = match &raw.queue {
        None => Some(8192),
        Some(q) if q.value >= 1 && q.value <= 1 << 20 => Some(q.value as usize),
        Some(q) => {
            d.error("access_log.queue", q, "must be between 1 and 1048576 lines");
            None
        }
    };
    Some(AccessLogConfig {
        target: target?,
        format: format?,
        sample: sample?,
        request_id_header: request_id_header?,
        queue: queue?,
    })
}

/// `[fleet]`. The node's name must be a NATS key (letters, digits, `-`, `_`): `.` would split
/// it. The state (outbox, applied sequence) needs a directory: `state_dir`, or `fleet/` in the
/// cache directory.
fn fleet_config(
    d: &mut Diagnostics,
    raw: &RawFleet,
    name: Option<&Setting<String>>,
    cache_dir: Option<&Path>,
) -> Option<outpost_fleet::FleetConfig> {
    use outpost_fleet::FleetAuth;
    let before = d.has_errors();
    let servers: Vec<String> = raw
        .servers
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, s)| match s.value.parse::<async_nats::ServerAddr>() {
            Ok(_) => Some(s.value.clone()),
            Err(e) => {
                d.error(
                    &format!("fleet.servers[{i}]"),
                    s,
                    format!("not a NATS URL ({e}), for example nats://127.0.0.1:4222"),
                );
                None
            }
        })
        .collect();
    if raw.servers.as_ref().is_none_or(Vec::is_empty) {
        d.missing(
            "fleet.servers",
            "list the NATS servers, for example servers = [\"nats://127.0.0.1:4222\"]",
        );
    }
    let key_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    // Each node's own name: two nodes under one name would share a consumer, and neither
    // would apply the other's purges.
    let node = match name {
        Some(n) if key_ok(&n.value) => n.value.clone(),
        Some(n) => {
            d.error(
                "name",
                n,
                "fleet mode names each node in NATS: use letters, digits, '-' and '_' only",
            );
            String::new()
        }
        None => {
            d.missing(
                "name",
                "fleet mode needs each node's own name: set `name` or pass --name",
            );
            String::new()
        }
    };
    let stream = raw
        .stream
        .as_ref()
        .map_or_else(|| "OUTPOST".to_string(), |s| s.value.clone());
    if let Some(s) = &raw.stream
        && !key_ok(&s.value)
    {
        d.error(
            "fleet.stream",
            s,
            "a stream name holds letters, digits, '-' and '_' only",
        );
    }
    let auth = match (
        &raw.token,
        &raw.user,
        &raw.password,
        &raw.creds_file,
        &raw.nkey_seed,
    ) {
        (None, None, None, None, None) => FleetAuth::None,
        (Some(t), None, None, None, None) => FleetAuth::Token(t.value.clone()),
        (None, Some(u), Some(p), None, None) => {
            FleetAuth::UserPassword(u.value.clone(), p.value.clone())
        }
        (None, None, None, Some(f), None) => FleetAuth::CredsFile(d.path(f)),
        (None, None, None, None, Some(k)) => FleetAuth::Nkey(k.value.clone()),
        (None, Some(s), None, None, None) | (None, None, Some(s), None, None) => {
            d.error("fleet.user", s, "user and password go together");
            FleetAuth::None
        }
        _ => {
            d.missing(
                "fleet",
                "give one kind of NATS credentials: token, user and password, creds_file or nkey_seed",
            );
            FleetAuth::None
        }
    };
    let dur = |d: &mut Diagnostics, field: &str, s: &Option<Setting<RawDuration>>, default| {
        s.as_ref().map_or(Some(default), |s| d.duration(field, s))
    };
    let receipt_wait = dur(
        d,
        "fleet.receipt_wait",
        &raw.receipt_wait,
        Duration::from_secs(1),
    );
    let max_age = dur(
        d,
        "fleet.max_age",
        &raw.max_age,
        Duration::from_secs(7 * 24 * 3600),
    );
    let startup_wait = dur(
        d,
        "fleet.startup_wait",
        &raw.startup_wait,
        Duration::from_secs(10),
    );
    let replicas = match &raw.replicas {
        None => 1,
        Some(r) if (1..=5).contains(&r.value) => r.value as usize,
        Some(r) => {
            d.error(
                "fleet.replicas",
                r,
                "JetStream keeps 1 to 5 copies of a stream",
            );
            1
        }
    };
    let state_dir = match (&raw.state_dir, cache_dir) {
        (Some(s), _) => Some(d.path(s)),
        (None, Some(c)) => Some(c.join("fleet")),
        (None, None) => {
            d.missing(
                "fleet.state_dir",
                "fleet mode keeps an outbox of purges on disk: set fleet.state_dir or cache.dir",
            );
            None
        }
    };
    if d.has_errors() && !before {
        return None;
    }
    Some(outpost_fleet::FleetConfig {
        servers,
        node,
        stream,
        auth,
        tls_ca_file: raw.tls_ca_file.as_ref().map(|s| d.path(s)),
        tls_required: raw.tls_required.unwrap_or(false),
        receipt_wait: receipt_wait?,
        max_age: max_age?,
        replicas,
        startup_wait: startup_wait?,
        state_dir: state_dir?,
    })
}

fn parse_origin(d: &mut Diagnostics, s: &Setting<String>, field: &str) -> Option<Uri> {
    let uri = match s.value.trim().trim_end_matches('/').parse::<Uri>() {
        Ok(u) => u,
        Err(e) => {
            d.error(field, s, format!("invalid URL {:?}: {e}", s.value));
            return None;
        }
    };
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            d.error(
                field,
                s,
                format!("{:?} must start with http:// or https://", s.value),
            );
            return None;
        }
    }
    if uri.authority().is_none() {
        d.error(
            field,
            s,
            "must include a host, for example http://127.0.0.1:9000",
        );
        return None;
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        d.error(
            "origin",
            s,
            "must not have a path (only scheme, host and port)",
        );
        return None;
    }
    Some(uri)
}

/// Validates `[tls]` and loads its certificates (each problem names the file).
fn tls_config(
    d: &mut Diagnostics,
    raw: Option<&RawTls>,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
) -> Option<crate::tls::TlsConfig> {
    let raw = raw?;
    let tls_listen = match &raw.listen {
        Some(s) => {
            let addr = d.socket_addr("tls.listen", s);
            if let Some(a) = addr
                && a.port() != 0
                && (Some(a) == listen || Some(a) == admin_listen)
            {
                d.error(
                    "tls.listen",
                    s,
                    format!("{a} is already the plain data or admin address"),
                );
            }
            addr
        }
        None => {
            d.missing(
                "tls.listen",
                "set [tls] listen or pass --tls-listen, for example 127.0.0.1:8443",
            );
            None
        }
    };
    let handshake_timeout = match &raw.handshake_timeout {
        None => Some(Duration::from_secs(10)),
        Some(s) => match d.duration("tls.handshake_timeout", s) {
            Some(t) if t.is_zero() => {
                d.error("tls.handshake_timeout", s, "must be greater than zero");
                None
            }
            t => t,
        },
    };
    if raw.certs.is_empty() {
        d.missing(
            "tls.certs",
            "add a [[tls.certs]] entry with cert and key PEM files, or pass --tls-cert and --tls-key",
        );
    }
    let mut certs = Vec::new();
    let mut defaults = 0;
    for (i, c) in raw.certs.iter().enumerate() {
        let spec = crate::tls::CertSpec {
            cert: d.path(&c.cert),
            key: d.path(&c.key),
            default: c.default.as_ref().is_some_and(|s| s.value),
        };
        if let Some(s) = c.default.as_ref().filter(|s| s.value) {
            defaults += 1;
            if defaults > 1 {
                d.error(
                    &format!("tls.certs[{i}].default"),
                    s,
                    "only one certificate can be the default",
                );
            }
        }
        match crate::tls::LoadedCert::load(&spec) {
            Ok(loaded) => certs.push(loaded),
            Err(e) => {
                let (field, setting) = match e.file {
                    crate::tls::CertFile::Cert => ("cert", &c.cert),
                    crate::tls::CertFile::Key => ("key", &c.key),
                };
                d.error(&format!("tls.certs[{i}].{field}"), setting, e.message);
            }
        }
    }
    if d.has_errors() {
        return None;
    }
    Some(crate::tls::TlsConfig {
        listen: tls_listen?,
        handshake_timeout: handshake_timeout?,
        certs,
    })
}

/// Validates `[upstream]` (reads `ca_file`).
/// Header names of `[upstream] forward_headers` / `strip_headers`. `dangerous_only`: every
/// name must be one of the forwarding fields stripped by default (any other is forwarded
/// anyway, so listing it would mislead).
fn header_names(
    d: &mut Diagnostics,
    field: &str,
    raw: Option<&[Setting<String>]>,
    dangerous_only: bool,
) -> Vec<http::HeaderName> {
    let mut out = Vec::new();
    for s in raw.unwrap_or_default() {
        let lower = s.value.trim().to_ascii_lowercase();
        match http::HeaderName::from_bytes(lower.as_bytes()) {
            Ok(name) => {
                if dangerous_only
                    && !outpost_http::headers::DANGEROUS_FORWARDING.contains(&name.as_str())
                {
                    d.error(
                        field,
                        s,
                        format!(
                            "{:?} is forwarded already; list only fields stripped by default: {}",
                            s.value,
                            outpost_http::headers::DANGEROUS_FORWARDING.join(", ")
                        ),
                    );
                } else if outpost_http::headers::is_hop_by_hop(&name)
                    || name == http::header::HOST
                    || name == http::header::CONTENT_LENGTH
                {
                    d.error(field, s, format!("{:?} is managed by Outpost", s.value));
                } else {
                    out.push(name);
                }
            }
            Err(_) => d.error(field, s, format!("{:?} is not a header name", s.value)),
        }
    }
    out
}

fn upstream_tls_config(d: &mut Diagnostics, raw: &RawUpstream) -> crate::tls::UpstreamTlsConfig {
    let mut c = crate::tls::UpstreamTlsConfig::default();
    if let Some(s) = &raw.ca_file {
        let path = d.path(s);
        match crate::tls::load_ca_file(&path) {
            Ok(certs) => {
                c.ca_certs = certs;
                c.ca_file = Some(path);
            }
            Err(e) => d.error("upstream.ca_file", s, e),
        }
    }
    if let Some(s) = &raw.sni {
        match rustls::pki_types::ServerName::try_from(s.value.trim().to_string()) {
            Ok(name) => c.sni = Some(name),
            Err(e) => d.error(
                "upstream.sni",
                s,
                format!("{:?} is not a valid server name: {e}", s.value),
            ),
        }
    }
    if let Some(s) = &raw.insecure_skip_verify {
        c.insecure_skip_verify = s.value;
        if s.value && raw.ca_file.is_some() {
            d.error(
                "upstream.insecure_skip_verify",
                s,
                "set ca_file or insecure_skip_verify, not both",
            );
        }
    }
    c
}

/// Validates `[compression]`; fields left out keep [`CompressionConfig::default`].
fn compression_config(d: &mut Diagnostics, raw: &RawCompression) -> CompressionConfig {
    let mut c = CompressionConfig::default();
    if let Some(v) = raw.enabled {
        c.enabled = v;
    }
    let sizes = [
        ("compression.min_size", &raw.min_size, &mut c.min_size),
        (
            "compression.stream_threshold",
            &raw.stream_threshold,
            &mut c.stream_threshold,
        ),
        (
            "compression.max_decompressed_size",
            &raw.max_decompressed_size,
            &mut c.max_decompressed_size,
        ),
    ];
    for (field, setting, out) in sizes {
        if let Some(s) = setting
            && let Some(n) = d.byte_size(field, s)
        {
            *out = n;
        }
    }
    if let Some(s) = &raw.max_decompressed_size
        && c.max_decompressed_size == 0
    {
        d.error(
            "compression.max_decompressed_size",
            s,
            "must be greater than zero",
        );
    }
    if let Some(s) = &raw.gzip_level {
        match u32::try_from(s.value) {
            Ok(n @ 1..=9) => c.gzip_level = n,
            _ => d.error(
                "compression.gzip_level",
                s,
                "must be 1 to 9 (6 is a good default)",
            ),
        }
    }
    if let Some(s) = &raw.brotli_quality {
        match u32::try_from(s.value) {
            Ok(n @ 0..=11) => c.brotli_quality = n,
            _ => d.error(
                "compression.brotli_quality",
                s,
                "must be 0 to 11 (4 on the fly; 11 runs at about 0.5 MB/s)",
            ),
        }
    }
    if let Some(types) = &raw.types {
        c.types = types
            .iter()
            .filter_map(|t| match MediaPattern::parse(&t.value) {
                Ok(p) => Some(p),
                Err(e) => {
                    d.error("compression.types", t, e);
                    None
                }
            })
            .collect();
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<EdgeConfig, ConfigErrors> {
        EdgeConfig::from_source(&Source::inline("edge.toml", text), EdgeOverrides::default())
    }

    #[test]
    fn minimal_and_defaults() {
        let c = load("listen = \"127.0.0.1:8080\"\norigin = \"http://127.0.0.1:9000\"\n").unwrap();
        assert_eq!(c.memory, 256 << 20);
        assert_eq!(c.role, Role::Edge);
        assert!(c.cache_dir.is_none());
    }

    #[test]
    fn fleet_section_defaults_and_errors() {
        let base =
            "name = \"edge-a\"\nlisten = \"127.0.0.1:8080\"\norigin = \"http://127.0.0.1:9000\"\n";
        let c = load(&format!(
            "{base}[cache]\ndir = \"/var/cache/outpost\"\n[fleet]\nservers = [\"nats://10.0.0.1:4222\", \"nats://10.0.0.2:4222\"]\ntoken = \"s3cret\"\n"
        ))
        .unwrap();
        let f = c.fleet.expect("a fleet");
        assert_eq!(f.node, "edge-a");
        assert_eq!(f.stream, "OUTPOST");
        assert_eq!(f.servers.len(), 2);
        assert_eq!(f.auth, outpost_fleet::FleetAuth::Token("s3cret".into()));
        assert_eq!(f.receipt_wait, Duration::from_secs(1));
        assert_eq!(f.state_dir, PathBuf::from("/var/cache/outpost/fleet"));
        // Without [fleet], no fleet.
        assert!(load(base).unwrap().fleet.is_none());
        // Fleet mode needs each node's own name: the default would be shared.
        let e = load(
            "listen = \"127.0.0.1:8080\"\norigin = \"http://127.0.0.1:9000\"\n[fleet]\nservers = [\"nats://a:4222\"]\nstate_dir = \"/tmp/f\"\n",
        )
        .unwrap_err();
        assert!(e.mentions("name"), "{e}");

        // Every mistake at once: no servers, a dotted node name, a bad stream name, two kinds
        // of credentials, a bad wait, and nowhere to keep the outbox.
        let e = load(
            "name = \"edge.a\"\nlisten = \"127.0.0.1:8080\"\norigin = \"http://127.0.0.1:9000\"\n[fleet]\nstream = \"a.b\"\ntoken = \"t\"\nuser = \"u\"\nreceipt_wait = \"soon\"\n",
        )
        .unwrap_err();
        for field in [
            "fleet.servers",
            "name",
            "fleet.stream",
            "fleet",
            "fleet.receipt_wait",
            "fleet.state_dir",
        ] {
            assert!(e.mentions(field), "{field} missing from {e}");
        }
        let e = load(&format!(
            "{base}[fleet]\nservers = [\"not a url at all\"]\nstate_dir = \"/tmp/x\"\npasword = \"typo\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("pasword"), "{e}");
        let e = load(&format!(
            "{base}[fleet]\nservers = [\"nats://ok:4222\", \"http://[::1\"]\nstate_dir = \"/tmp/x\"\n"
        ))
        .unwrap_err();
        assert!(e.mentions("fleet.servers[1]"), "{e}");

        // Flags: --fleet-servers makes a [fleet] with its defaults; --name names the node.
        let c = EdgeConfig::from_source(
            &Source::inline("edge.toml", format!("{base}[cache]\ndir = \"/c\"\n")),
            EdgeOverrides {
                name: Some("edge-b".into()),
                fleet_servers: Some("nats://a:4222, nats://b:4222".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let f = c.fleet.expect("a fleet from the flag");
        assert_eq!(f.servers, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!((c.name.as_str(), f.node.as_str()), ("edge-b", "edge-b"));
    }

    #[test]
    fn negative_ttl_statuses_classes_and_errors() {
        let base = "listen = \"127.0.0.1:8080\"\norigin = \"http://127.0.0.1:9000\"\n";
        let c = load(&format!(
            "{base}[cache.negative_ttl]\n\"404\" = \"30s\"\n\"5xx\" = 2\n"
        ))
        .unwrap();
        let ttl = |s: u16| c.negative_ttl.ttl(http::StatusCode::from_u16(s).unwrap());
        assert_eq!(ttl(404), Some(Duration::from_secs(30)));
        assert_eq!(ttl(503), Some(Duration::from_secs(2)));
        assert_eq!(ttl(410), None);
        assert!(
            load(base).unwrap().negative_ttl.is_empty(),
            "off by default"
        );
        assert_eq!(load(base).unwrap().prefresh, 0.9, "prefresh on by default");
        assert_eq!(
            load(base).unwrap().disk_admission,
            DiskAdmission::SecondMissWhenFull
        );
        let always = load(&format!("{base}[cache]\ndisk_admission = \"always\"\n")).unwrap();
        assert_eq!(always.disk_admission, DiskAdmission::Always);
        let e = load(&format!("{base}[cache]\ndisk_admission = \"sometimes\"\n")).unwrap_err();
        assert!(e.mentions("cache.disk_admission"), "{e}");
        assert!(e.to_string().contains("\"always\""), "{e}");
        let e = load(&format!("{base}[cache]\nprefresh = 1.5\n")).unwrap_err();
        assert!(e.mentions("cache.prefresh"), "{e}");
        let e = load(&format!(
            "{base}[cache.negative_ttl]\n\"200\" = \"1m\"\n\"404\" = \"10ms\"\n\"410\" = \"soon\"\n"
        ))
        .unwrap_err();
        for f in [
            "cache.negative_ttl.200",
            "cache.negative_ttl.404",
            "cache.negative_ttl.410",
        ] {
            assert!(e.mentions(f), "{f}: {e}");
        }
    }

    #[test]
    fn fallback_origins_and_their_health() {
        let base = "listen = \"127.0.0.1:8080\"\norigin = \"http://127.0.0.1:9000\"\n";
        let c = load(base).unwrap();
        assert!(c.failover.fallbacks.is_empty(), "one origin by default");
        assert_eq!(c.failover.statuses, [502, 503, 504]);
        let c = load(&format!(
            "{base}fallback_origins = [\"http://127.0.0.1:9001\"]\n[origin_health]\npath = \"/healthz\"\nrise = 3\nfailover_statuses = [429, 500]\n"
        ))
        .unwrap();
        assert_eq!(c.failover.fallbacks.len(), 1);
        assert_eq!(c.failover.probe_path.as_deref(), Some("/healthz"));
        assert_eq!((c.failover.rise, c.failover.fall), (3, 3));
        assert_eq!(c.failover.statuses, [429, 500]);
        assert!(
            c.failover.weights.is_empty(),
            "order, not weights, by default"
        );
        let c = load(&format!(
            "{base}fallback_origins = [\"http://127.0.0.1:9001\"]\norigin_weights = [3, 1]\n"
        ))
        .unwrap();
        assert_eq!(c.failover.weights, [3, 1]);
        let e = load(&format!(
            "{base}fallback_origins = [\"http://127.0.0.1:9001\"]\norigin_weights = [3]\n"
        ))
        .unwrap_err();
        assert!(e.mentions("origin_weights"), "{e}");
        let e = load(&format!(
            "{base}fallback_origins = [\"ftp://x\"]\n[origin_health]\npath = \"healthz\"\nfall = 0\nfailover_statuses = [404]\n"
        ))
        .unwrap_err();
        for f in [
            "fallback_origins[0]",
            "origin_health.path",
            "origin_health.fall",
            "origin_health.failover_statuses[0]",
        ] {
            assert!(e.mentions(f), "{f}: {e}");
        }
    }

    #[test]
    fn proxy_protocol_networks() {
        let base = "listen = \"127.0.0.1:8080\"\norigin = \"http://127.0.0.1:9000\"\n";
        assert!(
            load(base).unwrap().proxy_protocol_from.is_empty(),
            "off by default"
        );
        let c = load(&format!(
            "{base}[proxy_protocol]\nfrom = [\"10.0.0.0/8\", \"192.0.2.1\"]\n"
        ))
        .unwrap();
        assert_eq!(c.proxy_protocol_from.len(), 2);
        assert!(
            c.proxy_protocol_from[1].contains(&"192.0.2.1".parse::<std::net::IpAddr>().unwrap())
        );
        let e = load(&format!("{base}[proxy_protocol]\nfrom = [\"selector\"]\n")).unwrap_err();
        assert!(e.mentions("proxy_protocol.from[0]"), "{e}");
    }

    #[test]
    fn all_errors_together() {
        let e = load(
            "listen = \"nowhere\"\norigin = \"ftp://x\"\n[cache]\nmemory = \"lots\"\n[limits]\ndrain_timeout = \"forever\"\n",
        )
        .unwrap_err();
        for f in ["listen", "origin", "cache.memory", "limits.drain_timeout"] {
            assert!(e.mentions(f), "{f} missing from {e}");
        }
        assert_eq!(e.0[0].line, Some(1));
    }

    #[test]
    fn flags_override_and_are_named() {
        let src = Source::inline(
            "edge.toml",
            "listen = \"127.0.0.1:1\"\norigin = \"http://a:1\"\n",
        );
        let c = EdgeConfig::from_source(
            &src,
            EdgeOverrides {
                listen: Some("127.0.0.1:2".into()),
                memory: Some("1MiB".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.memory, 1 << 20);
        let e = EdgeConfig::from_source(
            &src,
            EdgeOverrides {
                disk: Some("huge".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.mentions("--disk"), "{e}");
    }

    #[test]
    fn compression_section() {
        let base = "listen = \"127.0.0.1:1\"\norigin = \"http://a:1\"\n";
        let c = load(base).unwrap();
        assert!(c.compression.enabled);
        assert_eq!(c.compression.min_size, 1024);
        assert_eq!(
            (c.compression.gzip_level, c.compression.brotli_quality),
            (6, 4)
        );
        let c = load(&format!(
            "{base}[compression]\nenabled = false\nmin_size = \"2KiB\"\ntypes = [\"text/*\"]\ngzip_level = 4\nbrotli_quality = 5\nstream_threshold = \"256KiB\"\nmax_decompressed_size = \"8MiB\"\n"
        ))
        .unwrap();
        let z = &c.compression;
        assert!(!z.enabled);
        assert_eq!((z.min_size, z.gzip_level, z.brotli_quality), (2048, 4, 5));
        assert_eq!(
            (z.stream_threshold, z.max_decompressed_size),
            (256 << 10, 8 << 20)
        );
        assert_eq!(z.types.len(), 1);
        let e = load(&format!(
            "{base}[compression]\ngzip_level = 10\nbrotli_quality = 12\ntypes = [\"text\"]\nmax_decompressed_size = 0\n"
        ))
        .unwrap_err();
        for f in [
            "compression.gzip_level",
            "compression.brotli_quality",
            "compression.types",
            "compression.max_decompressed_size",
        ] {
            assert!(e.mentions(f), "{f} missing from {e}");
        }
        let gzip = e.0.iter().find(|x| x.field == "compression.gzip_level");
        assert_eq!(gzip.and_then(|x| x.line), Some(4), "{e}");
        let e = load(&format!("{base}[compression]\nlevel = 3\n")).unwrap_err();
        assert!(e.to_string().contains("level"), "{e}");
    }

    #[test]
    fn idle_and_send_timeouts_must_be_positive() {
        let e = load(
            "listen = \"127.0.0.1:1\"\norigin = \"http://a:1\"\n[limits]\nidle_timeout = 0\nsend_timeout = \"0s\"\n",
        )
        .unwrap_err();
        for f in ["limits.idle_timeout", "limits.send_timeout"] {
            assert!(e.mentions(f), "{f} missing from {e}");
        }
        assert!(e.to_string().contains("greater than zero"), "{e}");
    }

    #[test]
    fn unknown_field() {
        let e = load("listen = \"127.0.0.1:1\"\norigin = \"http://a:1\"\n[cache]\nsize = 1\n")
            .unwrap_err();
        assert_eq!(e.0[0].line, Some(4), "{e}");
        assert!(e.to_string().contains("size"), "{e}");
    }

    #[test]
    fn tls_and_upstream_sections() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("a.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("a.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("other.key"), other.serialize_pem()).unwrap();
        let p = |f: &str| dir.path().join(f).display().to_string();
        let base = "listen = \"127.0.0.1:1\"\norigin = \"https://a:1\"\n";
        let c = load(&format!(
            "{base}[tls]\nlisten = \"127.0.0.1:8443\"\n[[tls.certs]]\ncert = {:?}\nkey = {:?}\n[upstream]\nca_file = {:?}\nsni = \"origin.test\"\n",
            p("a.pem"),
            p("a.key"),
            p("a.pem")
        ))
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.listen.port(), 8443);
        assert_eq!(tls.handshake_timeout, Duration::from_secs(10));
        assert_eq!(tls.certs[0].names, vec!["a.test".to_string()]);
        assert_eq!(c.upstream_tls.ca_certs.len(), 1);
        assert!(c.upstream_tls.sni.is_some());

        let e = load(&format!(
            "{base}[tls]\nlisten = \"127.0.0.1:8443\"\nhandshake_timeout = 0\n[[tls.certs]]\ncert = {:?}\nkey = {:?}\n[[tls.certs]]\ncert = {:?}\nkey = {:?}\n[upstream]\nsni = \"bad name!\"\n",
            p("a.pem"),
            p("other.key"),
            p("missing.pem"),
            p("a.key"),
        ))
        .unwrap_err();
        for f in [
            "tls.handshake_timeout",
            "tls.certs[0].key",
            "tls.certs[1].cert",
            "upstream.sni",
        ] {
            assert!(e.mentions(f), "{f} missing from {e}");
        }
        let text = e.to_string();
        assert!(
            text.contains(&p("other.key")) && text.contains(&p("missing.pem")),
            "{text}"
        );

        let e = EdgeConfig::from_source(
            &Source::inline("edge.toml", base),
            EdgeOverrides {
                tls_listen: Some("127.0.0.1:8443".into()),
                tls_cert: Some(p("a.pem")),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.mentions("--tls-cert"), "{e}");
        let c = EdgeConfig::from_source(
            &Source::inline("edge.toml", base),
            EdgeOverrides {
                tls_listen: Some("127.0.0.1:8443".into()),
                tls_cert: Some(p("a.pem")),
                tls_key: Some(p("a.key")),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.tls.unwrap().certs.len(), 1);
        let e = load(&format!("{base}[tls]\nlisten = \"127.0.0.1:8443\"\n")).unwrap_err();
        assert!(e.mentions("tls.certs"), "{e}");
    }
}
