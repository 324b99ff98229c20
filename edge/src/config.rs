//! Edge configuration: `configs/edge.toml`, overridden by command-line flags, validated into a
//! typed [`EdgeConfig`] with every error reported together (see `outpost-config`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use outpost_config::{ConfigErrors, Diagnostics, RawDuration, RawSize, Setting, Source};
use serde::Deserialize;

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
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    dir: Option<Setting<String>>,
    memory: Option<Setting<RawSize>>,
    disk: Option<Setting<RawSize>>,
    max_object_size: Option<Setting<RawSize>>,
    ignore_query_params: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    header_read_timeout: Option<Setting<RawDuration>>,
    max_header_size: Option<Setting<RawSize>>,
    upstream_connect_timeout: Option<Setting<RawDuration>>,
    upstream_first_byte_timeout: Option<Setting<RawDuration>>,
    upstream_max_connections: Option<Setting<u64>>,
    drain_timeout: Option<Setting<RawDuration>>,
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
}

/// The validated edge configuration.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub role: Role,
    pub name: String,
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub origin: Uri,
    pub cache_dir: Option<PathBuf>,
    pub memory: u64,
    pub disk: u64,
    pub max_object_size: u64,
    pub ignore_query_params: Vec<String>,
    pub header_read_timeout: Duration,
    pub max_header_size: u64,
    pub upstream_connect_timeout: Duration,
    pub upstream_first_byte_timeout: Duration,
    pub upstream_max_connections: usize,
    pub drain_timeout: Duration,
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
        let mut raw: RawConfig = src.parse()?;
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

        let mut d = Diagnostics::new(src);
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
            Some(s) => parse_origin(&mut d, s),
            None => {
                d.missing(
                    "origin",
                    "set `origin` or pass --origin, for example http://127.0.0.1:9000",
                );
                None
            }
        };
        let cache_dir = raw.cache.dir.as_ref().map(|s| d.path(s));
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
        let drain = dur(
            &mut d,
            "limits.drain_timeout",
            &raw.limits.drain_timeout,
            10,
        );
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
        d.finish(|| EdgeConfig {
            role,
            name,
            listen: listen.expect("checked"),
            admin_listen: admin_listen.flatten(),
            origin: origin.expect("checked"),
            cache_dir,
            memory: memory.expect("checked"),
            disk: disk.expect("checked"),
            max_object_size: max_object_size.expect("checked"),
            ignore_query_params: raw.cache.ignore_query_params.clone().unwrap_or_default(),
            header_read_timeout: header_read_timeout.expect("checked"),
            max_header_size: max_header_size.expect("checked"),
            upstream_connect_timeout: connect.expect("checked"),
            upstream_first_byte_timeout: first_byte.expect("checked"),
            upstream_max_connections: max_conns.expect("checked"),
            drain_timeout: drain.expect("checked"),
        })
    }
}

fn parse_origin(d: &mut Diagnostics, s: &Setting<String>) -> Option<Uri> {
    let uri = match s.value.trim().trim_end_matches('/').parse::<Uri>() {
        Ok(u) => u,
        Err(e) => {
            d.error("origin", s, format!("invalid URL {:?}: {e}", s.value));
            return None;
        }
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            d.error(
                "origin",
                s,
                "https origins are not supported yet (plain http only)",
            );
            return None;
        }
        _ => {
            d.error(
                "origin",
                s,
                format!("{:?} must start with http://", s.value),
            );
            return None;
        }
    }
    if uri.authority().is_none() {
        d.error(
            "origin",
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
    fn unknown_field() {
        let e = load("listen = \"127.0.0.1:1\"\norigin = \"http://a:1\"\n[cache]\nsize = 1\n")
            .unwrap_err();
        assert_eq!(e.0[0].line, Some(4), "{e}");
        assert!(e.to_string().contains("size"), "{e}");
    }
}
