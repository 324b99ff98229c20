//! Origin configuration: an optional TOML file, overridden by command-line flags, validated in one
//! pass that reports every problem (see `outpost_config`).
//!
//! ```toml
//! listen = "127.0.0.1:9000"        # default 127.0.0.1:9000
//! root = "../site"                 # required; relative to this file's directory
//! rules = "origin-rules.toml"      # optional; relative to this file's directory
//! header_read_timeout = "10s"      # optional; first bytes, then each HTTP/1 request head
//! idle_timeout = "60s"             # optional; a connection making no progress is closed
//! max_connections = 1024           # optional; more clients wait in the listen backlog
//! drain_timeout = "10s"            # optional; how long shutdown waits for open connections
//! ```
//!
//! Flags (`--listen`, `--root`, `--rules`) replace the file's values; their relative paths are
//! relative to the working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_config::{ConfigErrors, Diagnostics, RawDuration, Setting, Source};
use serde::Deserialize;

use crate::rules::Rules;

/// `listen` when neither the file nor `--listen` sets it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9000";
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Above this a connection cap is surely a typo (and tokio's semaphore has a limit).
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

/// Command-line flags of `outpost origin`; each replaces the file's value when set.
#[derive(Debug, Clone, Default)]
pub struct OriginOverrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--root`
    pub root: Option<String>,
    /// `--rules`
    pub rules: Option<String>,
}

/// Validated origin configuration.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    pub listen: SocketAddr,
    /// The site root, canonicalised (absolute, symlinks resolved).
    pub root: PathBuf,
    pub rules: Rules,
    /// Time allowed for a new connection's first bytes (before HTTP/1 or HTTP/2 is known),
    /// then for each HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// A connection that makes no progress for this long is shut down: no request handled,
    /// started or ended, no response body chunk taken by the client.
    pub idle_timeout: Duration,
    /// Client connections open at once; more wait in the kernel's listen backlog.
    pub max_connections: usize,
    /// Time shutdown waits for open connections before closing them.
    pub drain_timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOriginConfig {
    listen: Option<Setting<String>>,
    root: Option<Setting<String>>,
    rules: Option<Setting<String>>,
    header_read_timeout: Option<Setting<RawDuration>>,
    idle_timeout: Option<Setting<RawDuration>>,
    max_connections: Option<Setting<i64>>,
    drain_timeout: Option<Setting<RawDuration>>,
}

impl OriginConfig {
    /// Loads the optional config file, applies the flags, and validates everything together.
    ///
    /// `root` must be an existing directory, `listen` a socket address, and `rules` (if given) a
    /// readable, valid rules file. Errors in the rules file are reported with the rules file's name
    /// and line.
    pub fn load(
        config_file: Option<&Path>,
        overrides: OriginOverrides,
    ) -> Result<OriginConfig, ConfigErrors> {
        let source = match config_file {
            Some(path) => Source::read(path)?,
            None => Source::empty(),
        };
        OriginConfig::from_source(&source, overrides)
    }

    /// Like [`OriginConfig::load`], for a config held in memory (relative paths in it are relative
    /// to the directory of `source.name`).
    pub fn from_source(
        source: &Source,
        overrides: OriginOverrides,
    ) -> Result<OriginConfig, ConfigErrors> {
        let mut d = Diagnostics::new(source);
        let mut raw: RawOriginConfig = d.parse()?;
        if let Some(v) = overrides.listen {
            raw.listen = Some(Setting::from_flag("--listen", v));
        }
        if let Some(v) = overrides.root {
            raw.root = Some(Setting::from_flag("--root", v));
        }
        if let Some(v) = overrides.rules {
            raw.rules = Some(Setting::from_flag("--rules", v));
        }

        let listen_setting = raw
            .listen
            .unwrap_or_else(|| Setting::default_value(DEFAULT_LISTEN.to_string()));
        let listen = d.socket_addr("listen", &listen_setting);

        let root = match &raw.root {
            Some(s) => d
                .existing_dir("root", s)
                .and_then(|dir| match dir.canonicalize() {
                    Ok(c) => Some(c),
                    Err(e) => {
                        d.error("root", s, format!("cannot resolve {}: {e}", dir.display()));
                        None
                    }
                }),
            None => {
                d.missing(
                    "root",
                    "the directory to serve: `root = \"site\"` or --root",
                );
                None
            }
        };

        // Errors inside the rules file name that file; they are appended after ours.
        let mut rule_errors = Vec::new();
        let rules = match &raw.rules {
            Some(s) => {
                let path = d.path(s);
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => match Rules::load(&path) {
                        Ok(r) => Some(r),
                        Err(e) => {
                            rule_errors = e.0;
                            None
                        }
                    },
                    Ok(_) => {
                        d.error("rules", s, format!("{} is not a file", path.display()));
                        None
                    }
                    Err(e) => {
                        d.error("rules", s, format!("cannot open {}: {e}", path.display()));
                        None
                    }
                }
            }
            None => Some(Rules::builtin()),
        };

        let header_read_timeout = positive_duration(
            &mut d,
            "header_read_timeout",
            raw.header_read_timeout.as_ref(),
            DEFAULT_HEADER_READ_TIMEOUT,
        );
        let idle_timeout = positive_duration(
            &mut d,
            "idle_timeout",
            raw.idle_timeout.as_ref(),
            DEFAULT_IDLE_TIMEOUT,
        );
        let max_connections = match &raw.max_connections {
            None => Some(DEFAULT_MAX_CONNECTIONS),
            Some(s) => match usize::try_from(s.value) {
                Ok(n) if (1..=MAX_CONNECTIONS_LIMIT).contains(&n) => Some(n),
                _ => {
                    d.error(
                        "max_connections",
                        s,
                        format!(
                            "must be between 1 and {MAX_CONNECTIONS_LIMIT}, not {}",
                            s.value
                        ),
                    );
                    None
                }
            },
        };
        let drain_timeout = positive_duration(
            &mut d,
            "drain_timeout",
            raw.drain_timeout.as_ref(),
            DEFAULT_DRAIN_TIMEOUT,
        );

        let result = d.finish(|| {
            (
                listen,
                root,
                header_read_timeout,
                idle_timeout,
                max_connections,
                drain_timeout,
            )
        });
        match result {
            Ok((
                Some(listen),
                Some(root),
                Some(header_read_timeout),
                Some(idle_timeout),
                Some(max_connections),
                Some(drain_timeout),
            )) if rule_errors.is_empty() => Ok(OriginConfig {
                listen,
                root,
                rules: rules.unwrap_or_default(),
                header_read_timeout,
                idle_timeout,
                max_connections,
                drain_timeout,
            }),
            Ok(_) => Err(ConfigErrors(rule_errors)),
            Err(mut errors) => {
                errors.0.extend(rule_errors);
                Err(errors)
            }
        }
    }
}

fn positive_duration(
    d: &mut Diagnostics<'_>,
    field: &str,
    setting: Option<&Setting<RawDuration>>,
    default: Duration,
) -> Option<Duration> {
    let Some(s) = setting else {
        return Some(default);
    };
    let value = d.duration(field, s)?;
    if value.is_zero() {
        d.error(field, s, "must be greater than zero");
        return None;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("site")).unwrap();
        std::fs::write(
            dir.path().join("rules.toml"),
            "[[rule]]\npath = \"/assets/**\"\ncache_control = \"public, max-age=600\"\n",
        )
        .unwrap();
        dir
    }

    fn load_text(dir: &Path, text: &str, o: OriginOverrides) -> Result<OriginConfig, ConfigErrors> {
        let path = dir.join("origin.toml");
        std::fs::write(&path, text).unwrap();
        OriginConfig::load(Some(&path), o)
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let dir = site_dir();
        let cfg = load_text(
            dir.path(),
            "listen = \"127.0.0.1:0\"\nroot = \"site\"\nrules = \"rules.toml\"\ndrain_timeout = \"2s\"\n",
            OriginOverrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 0);
        assert_eq!(cfg.root, dir.path().join("site").canonicalize().unwrap());
        assert_eq!(cfg.rules.len(), 1);
        assert_eq!(cfg.drain_timeout, Duration::from_secs(2));
        assert_eq!(cfg.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        assert_eq!(cfg.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(cfg.max_connections, DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn connection_bounds_parse_and_are_checked() {
        let dir = site_dir();
        let cfg = load_text(
            dir.path(),
            "root = \"site\"\nidle_timeout = \"90s\"\nmax_connections = 7\n",
            OriginOverrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.idle_timeout, Duration::from_secs(90));
        assert_eq!(cfg.max_connections, 7);
        let err = load_text(
            dir.path(),
            "root = \"site\"\nidle_timeout = \"0s\"\nmax_connections = 0\n",
            OriginOverrides::default(),
        )
        .unwrap_err();
        let found: Vec<_> = err.0.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [("idle_timeout", Some(2)), ("max_connections", Some(3))],
            "{err}"
        );
        let err = load_text(
            dir.path(),
            "root = \"site\"\nmax_connections = 99999999999\n",
            OriginOverrides::default(),
        )
        .unwrap_err();
        assert!(err.mentions("max_connections"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = site_dir();
        let cfg = load_text(
            dir.path(),
            "listen = \"nonsense\"\nroot = \"missing\"\n",
            OriginOverrides {
                listen: Some("[::1]:8081".into()),
                root: Some(dir.path().join("site").display().to_string()),
                rules: None,
            },
        )
        .unwrap();
        assert_eq!(cfg.listen, "[::1]:8081".parse().unwrap());
        assert!(cfg.rules.is_empty());
    }

    #[test]
    fn flags_only_needs_a_root() {
        let dir = site_dir();
        let cfg = OriginConfig::load(
            None,
            OriginOverrides {
                root: Some(dir.path().join("site").display().to_string()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.listen, DEFAULT_LISTEN.parse().unwrap());
        let err = OriginConfig::load(None, OriginOverrides::default()).unwrap_err();
        assert!(err.mentions("root"), "{err}");
        let err = OriginConfig::load(
            None,
            OriginOverrides {
                listen: Some("localhost".into()),
                root: Some(dir.path().join("site").display().to_string()),
                rules: Some("/no/such/rules.toml".into()),
            },
        )
        .unwrap_err();
        assert!(err.mentions("--listen") && err.mentions("--rules"), "{err}");
    }

    #[test]
    fn every_error_is_reported_together() {
        let dir = site_dir();
        std::fs::write(
            dir.path().join("bad-rules.toml"),
            "[[rule]]\npath = \"/x/[\"\ncache_control = \"a\"\n",
        )
        .unwrap();
        let err = load_text(
            dir.path(),
            "listen = \"127.0.0.1\"\nroot = \"nowhere\"\nrules = \"bad-rules.toml\"\ndrain_timeout = \"0s\"\n",
            OriginOverrides::default(),
        )
        .unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["listen", "root", "drain_timeout", "rule[1].path"],
            "{err}"
        );
        assert_eq!(err.0[0].line, Some(1));
        assert_eq!(err.0[1].line, Some(2));
        assert!(err.0[3].origin.ends_with("bad-rules.toml"), "{err}");
        assert_eq!(err.0[3].line, Some(2));
    }

    #[test]
    fn rule_errors_alone_fail_the_load() {
        let dir = site_dir();
        std::fs::write(
            dir.path().join("bad-rules.toml"),
            "[[rule]]\npaht = \"/x\"\n",
        )
        .unwrap();
        let err = load_text(
            dir.path(),
            "root = \"site\"\nrules = \"bad-rules.toml\"\n",
            OriginOverrides::default(),
        )
        .unwrap_err();
        // The typo, and the rule's path, which it left missing.
        assert_eq!(err.0.len(), 2, "{err}");
        assert_eq!(err.0[0].field, "rule.paht");
        assert_eq!(err.0[1].field, "rule[1].path");
    }

    #[test]
    fn unknown_field_and_unreadable_file() {
        let dir = site_dir();
        let err = load_text(
            dir.path(),
            "root = \"site\"\nlsten = \"x\"\n",
            OriginOverrides::default(),
        )
        .unwrap_err();
        assert_eq!(err.0[0].field, "lsten");
        assert_eq!(err.0[0].line, Some(2));
        let err = OriginConfig::load(
            Some(&dir.path().join("absent.toml")),
            OriginOverrides::default(),
        )
        .unwrap_err();
        assert_eq!(err.0[0].field, "(file)");
    }
}
