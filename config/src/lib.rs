//! Two-stage configuration loading shared by every Outpost role.
//!
//! Stage one deserialises TOML into a *raw* struct (`deny_unknown_fields`, every value wrapped in
//! [`toml::Spanned`] so we know where it came from). Stage two validates the raw struct into a typed
//! config (socket addresses, durations, byte sizes, paths) through a [`Diagnostics`] collector, which
//! gathers *every* problem instead of stopping at the first one. Each [`ConfigError`] names the file,
//! the field and the line, so an operator can fix a file in one pass.
//!
//! Command-line flags override file values: a role applies them to its raw struct as
//! [`Setting::from_flag`] values before validation, so a bad flag is reported the same way (with the
//! flag named instead of a line).
//!
//! Nothing here touches the network: loading a config has no side effects beyond reading the file.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// Process exit code for a bad configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the value came from: a file path, or `command line`.
    pub origin: String,
    /// Dotted field path, for example `cache.memory`; or the flag, for example `--listen`.
    pub field: String,
    /// 1-based line in the file, when the value came from a file.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(
                f,
                "{}:{}: field `{}`: {}",
                self.origin, line, self.field, self.message
            ),
            None => write!(f, "{}: `{}`: {}", self.origin, self.field, self.message),
        }
    }
}

/// Every problem found while loading one configuration. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn single(err: ConfigError) -> Self {
        Self(vec![err])
    }

    /// True if some error names this field (used by tests and by callers that want to hint).
    pub fn mentions(&self, field: &str) -> bool {
        self.0.iter().any(|e| e.field == field)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "invalid configuration ({n} error{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// The text of one configuration file, kept for line numbers.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
}

impl Source {
    /// Reads a file. An unreadable file is a config error naming the file.
    pub fn read(path: &Path) -> Result<Self, ConfigErrors> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self {
                name: path.display().to_string(),
                text,
            }),
            Err(e) => Err(ConfigErrors::single(ConfigError {
                origin: path.display().to_string(),
                field: "(file)".into(),
                line: None,
                message: format!("cannot read config file: {e}"),
            })),
        }
    }

    /// A source held in memory (tests, built-in defaults).
    pub fn inline(name: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            text: text.into(),
        }
    }

    /// An empty source, used when a role runs from flags only.
    pub fn empty() -> Self {
        Self::inline("command line", "")
    }

    /// 1-based line number of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// Stage one: parse TOML into the raw struct. A syntax error, an unknown field or a wrong
    /// type stops here (serde cannot continue past it) and is reported with its line and field.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigErrors> {
        toml::from_str::<T>(&self.text).map_err(|e| {
            let line = e.span().map(|s| self.line_of(s.start));
            let field = e
                .span()
                .and_then(|s| self.key_at(s))
                .unwrap_or_else(|| "(document)".to_string());
            ConfigErrors::single(ConfigError {
                origin: self.name.clone(),
                field,
                line,
                message: e.message().trim().to_string(),
            })
        })
    }

    /// Best effort: the key written on the line where a span starts (`key = value`), or the
    /// table header (`[table]`) for errors that point at a whole table.
    fn key_at(&self, span: Range<usize>) -> Option<String> {
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[line_start..].lines().next()?.trim();
        if let Some(inner) = line.strip_prefix('[') {
            let inner = inner.trim_start_matches('[');
            let name = inner.split(']').next()?.trim();
            return (!name.is_empty()).then(|| name.to_string());
        }
        let (key, _) = line.split_once('=')?;
        let key = key.trim().trim_matches('"');
        (!key.is_empty()).then(|| key.to_string())
    }
}

/// A raw value with the place it came from: a span in a file, or a command-line flag.
#[derive(Debug, Clone)]
pub struct Setting<T> {
    pub value: T,
    pub place: Place,
}

#[derive(Debug, Clone)]
pub enum Place {
    File(Range<usize>),
    Flag(&'static str),
    Default,
}

impl<T> Setting<T> {
    pub fn from_flag(flag: &'static str, value: T) -> Self {
        Self {
            value,
            place: Place::Flag(flag),
        }
    }

    pub fn default_value(value: T) -> Self {
        Self {
            value,
            place: Place::Default,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Setting<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = toml::Spanned::<T>::deserialize(d)?;
        let span = spanned.span();
        Ok(Self {
            value: spanned.into_inner(),
            place: Place::File(span),
        })
    }
}

/// A byte size in TOML: an integer number of bytes, or a string such as `"256MiB"` or `"10 GB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

/// A duration in TOML: an integer number of seconds, or a string such as `"30s"` or `"5m 30s"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Seconds(u64),
    Text(String),
}

/// Collects validation errors for one source, then either yields the typed config or all errors.
pub struct Diagnostics<'a> {
    source: &'a Source,
    errors: Vec<ConfigError>,
}

impl<'a> Diagnostics<'a> {
    pub fn new(source: &'a Source) -> Self {
        Self {
            source,
            errors: Vec::new(),
        }
    }

    pub fn source(&self) -> &Source {
        self.source
    }

    /// Records an error about `field`, located by the setting's place.
    pub fn error<T>(&mut self, field: &str, setting: &Setting<T>, message: impl Into<String>) {
        let (origin, field, line) = match &setting.place {
            Place::File(span) => (
                self.source.name.clone(),
                field.to_string(),
                Some(self.source.line_of(span.start)),
            ),
            Place::Flag(flag) => ("command line".to_string(), (*flag).to_string(), None),
            Place::Default => ("built-in default".to_string(), field.to_string(), None),
        };
        self.errors.push(ConfigError {
            origin,
            field,
            line,
            message: message.into(),
        });
    }

    /// Records an error about a field that is missing altogether.
    pub fn missing(&mut self, field: &str, hint: &str) {
        self.errors.push(ConfigError {
            origin: self.source.name.clone(),
            field: field.to_string(),
            line: None,
            message: format!("is required ({hint})"),
        });
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Ends validation. `build` runs only when no error was recorded, so it may unwrap the
    /// `Option`s that the checks produced.
    pub fn finish<T>(self, build: impl FnOnce() -> T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(build())
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    pub fn socket_addr(&mut self, field: &str, s: &Setting<String>) -> Option<SocketAddr> {
        match s.value.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    field,
                    s,
                    format!(
                        "invalid socket address {:?} (expected IP:PORT, for example \"127.0.0.1:8080\" or \"[::1]:8080\")",
                        s.value
                    ),
                );
                None
            }
        }
    }

    pub fn byte_size(&mut self, field: &str, s: &Setting<RawSize>) -> Option<u64> {
        match &s.value {
            RawSize::Bytes(n) => Some(*n),
            RawSize::Text(t) => match parse_byte_size(t) {
                Ok(n) => Some(n),
                Err(msg) => {
                    self.error(field, s, msg);
                    None
                }
            },
        }
    }

    pub fn duration(&mut self, field: &str, s: &Setting<RawDuration>) -> Option<Duration> {
        match &s.value {
            RawDuration::Seconds(n) => Some(Duration::from_secs(*n)),
            RawDuration::Text(t) => match humantime::parse_duration(t.trim()) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.error(
                        field,
                        s,
                        format!(
                            "invalid duration {t:?}: {e} (expected for example \"30s\", \"5m\" or \"1h 30m\")"
                        ),
                    );
                    None
                }
            },
        }
    }

    /// A path relative to the config file's directory (absolute paths stay as they are).
    pub fn path(&self, s: &Setting<String>) -> PathBuf {
        let p = PathBuf::from(&s.value);
        match (&s.place, p.is_absolute()) {
            (Place::File(_), false) => Path::new(&self.source.name)
                .parent()
                .map(|dir| dir.join(&p))
                .unwrap_or(p),
            _ => p,
        }
    }

    /// A directory that must exist.
    pub fn existing_dir(&mut self, field: &str, s: &Setting<String>) -> Option<PathBuf> {
        let p = self.path(s);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => Some(p),
            Ok(_) => {
                self.error(field, s, format!("{} is not a directory", p.display()));
                None
            }
            Err(e) => {
                self.error(field, s, format!("cannot open {}: {e}", p.display()));
                None
            }
        }
    }
}

/// Parses "256MiB", "10 GB", "1.5GiB", "4096" (bytes). Units are case-insensitive; both
/// decimal (kB, MB, GB) and binary (KiB, MiB, GiB) prefixes are understood.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty byte size (expected for example \"256MiB\")".into());
    }
    t.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| {
            format!(
                "invalid byte size {text:?} (expected a number with an optional unit, for example \"512KiB\", \"256MiB\" or \"10GB\")"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        listen: Option<Setting<String>>,
        memory: Option<Setting<RawSize>>,
        timeout: Option<Setting<RawDuration>>,
    }

    fn load(text: &str) -> Result<(SocketAddr, u64, Duration), ConfigErrors> {
        let src = Source::inline("t.toml", text);
        let raw: Raw = src.parse()?;
        let mut d = Diagnostics::new(&src);
        let listen = raw.listen.as_ref().and_then(|s| d.socket_addr("listen", s));
        let memory = raw.memory.as_ref().and_then(|s| d.byte_size("memory", s));
        let timeout = raw.timeout.as_ref().and_then(|s| d.duration("timeout", s));
        d.finish(|| (listen.unwrap(), memory.unwrap(), timeout.unwrap()))
    }

    #[test]
    fn parses_typed_values() {
        let (a, m, t) =
            load("listen = \"127.0.0.1:80\"\nmemory = \"256MiB\"\ntimeout = \"1m 5s\"\n").unwrap();
        assert_eq!(a.port(), 80);
        assert_eq!(m, 256 * 1024 * 1024);
        assert_eq!(t, Duration::from_secs(65));
        let (_, m, t) = load("listen = \"[::1]:1\"\nmemory = 4096\ntimeout = 3\n").unwrap();
        assert_eq!((m, t), (4096, Duration::from_secs(3)));
    }

    #[test]
    fn reports_every_validation_error_with_field_and_line() {
        let err =
            load("listen = \"nope\"\nmemory = \"12 parsecs\"\ntimeout = \"soon\"\n").unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert_eq!(err.0[0].field, "listen");
        assert_eq!(err.0[0].line, Some(1));
        assert_eq!(err.0[1].field, "memory");
        assert_eq!(err.0[1].line, Some(2));
        assert_eq!(err.0[2].field, "timeout");
        assert_eq!(err.0[2].line, Some(3));
        let text = err.to_string();
        assert!(text.contains("t.toml:2: field `memory`"), "{text}");
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = load("listen = \"127.0.0.1:1\"\n\nbogus = 1\n").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].line, Some(3), "{err}");
        assert_eq!(err.0[0].field, "bogus");
        assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let src = Source::empty();
        let mut d = Diagnostics::new(&src);
        let s = Setting::from_flag("--listen", "localhost".to_string());
        assert!(d.socket_addr("listen", &s).is_none());
        let err = d.finish(|| ()).unwrap_err();
        assert_eq!(err.0[0].field, "--listen");
        assert!(err.to_string().contains("command line"));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("1KiB").unwrap(), 1024);
        assert_eq!(parse_byte_size("1kb").unwrap(), 1000);
        assert_eq!(parse_byte_size("10 GiB").unwrap(), 10 << 30);
        assert!(parse_byte_size("ten").is_err());
        assert!(parse_byte_size("").is_err());
        assert!(parse_byte_size("-5MB").is_err());
    }
}
