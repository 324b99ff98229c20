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

    /// Stage one on its own: the raw struct, or every problem stage one finds (see
    /// [`Diagnostics::parse`], which lets stage two report its problems in the same run).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigErrors> {
        let mut d = Diagnostics::new(self);
        let raw = d.parse()?;
        d.finish(|| raw)
    }

    /// The error toml reports, located: its line and the dotted key it points at.
    fn located(&self, e: &toml::de::Error) -> ConfigError {
        ConfigError {
            origin: self.name.clone(),
            field: e
                .span()
                .and_then(|s| self.key_at(s))
                .unwrap_or_else(|| "(document)".to_string()),
            line: e.span().map(|s| self.line_of(s.start)),
            message: with_suggestion(e.message().trim()),
        }
    }

    /// Best effort: the dotted key written on the line where a span starts (`key = value`,
    /// prefixed by the table it is in), or the table header (`[table]`) for errors that point
    /// at a whole table.
    fn key_at(&self, span: Range<usize>) -> Option<String> {
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[line_start..].lines().next()?.trim();
        if let Some(name) = header_name(line) {
            return Some(name);
        }
        let (key, _) = line.split_once('=')?;
        let key = key.trim().trim_matches('"');
        if key.is_empty() {
            return None;
        }
        let table = self.text[..line_start]
            .lines()
            .rev()
            .find_map(|l| header_name(l.trim()));
        Some(match table {
            Some(t) => format!("{t}.{key}"),
            None => key.to_string(),
        })
    }
}

/// serde's "unknown field `memroy`, expected one of `dir`, `memory`, ..." with the closest
/// expected name put first: "unknown field `memroy` (did you mean `memory`?), expected ...".
fn with_suggestion(message: &str) -> String {
    let names = |s: &str| -> Vec<String> {
        s.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let Some((head, rest)) = message
        .split_once(", expected one of ")
        .or_else(|| message.split_once(", expected "))
    else {
        return message.to_string();
    };
    let (Some(unknown), candidates) = (names(head).pop(), names(rest)) else {
        return message.to_string();
    };
    if !head.starts_with("unknown field") {
        return message.to_string();
    }
    let best = candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(&unknown, c), c))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, name)) if score >= 0.8 => {
            let expected = &message[head.len()..];
            format!("{head} (did you mean `{name}`?){expected}")
        }
        _ => message.to_string(),
    }
}

/// `cache` for a `[cache]` line, `shields` for `[[shields]]`; `None` for any other line.
fn header_name(line: &str) -> Option<String> {
    let inner = line.strip_prefix('[')?.trim_start_matches('[');
    let name = inner.split(']').next()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// `text` with the line at byte `at` made blank, and with it what belongs to it: the whole
/// table for a `[table]` header, the continuation lines of a value spread over several lines.
/// Line breaks stay, so later errors keep their line numbers. `None` when nothing changed.
fn blank_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let first = text[start..].lines().next().unwrap_or("");
    let is_header = header_name(first.trim()).is_some();
    let mut end = start + first.len();
    // What follows belongs to this line until the next header, or (for a key) the next
    // `key = ...` line, or a blank or comment line.
    for line in text[end..].split_inclusive('\n').skip(1) {
        let t = line.trim();
        let next_item = header_name(t).is_some()
            || (!is_header && (t.is_empty() || t.starts_with('#') || looks_like_key(t)));
        if next_item {
            break;
        }
        end += line.len();
    }
    let end = end.min(text.len());
    // Byte for byte, so every later offset still points where it did in the original text
    // (errors are located against it), and the result stays UTF-8.
    let blanked: String = text.as_bytes()[start..end]
        .iter()
        .map(|&b| if b == b'\n' { '\n' } else { ' ' })
        .collect();
    if blanked == text[start..end] {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..start]);
    out.push_str(&blanked);
    out.push_str(&text[end..]);
    Some(out)
}

/// `name = ...` or `"name" = ...` (a dotted key too).
fn looks_like_key(line: &str) -> bool {
    line.split_once('=').is_some_and(|(k, _)| {
        let k = k.trim();
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | ' '))
    })
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

    /// Stage one: parses the TOML into the raw struct. serde stops at the first unknown field
    /// or wrong type, so each such problem is recorded, its line (or table) blanked out, and
    /// the text parsed again: one run reports every problem, typos and bad values alike, and
    /// stage two then checks what is left. `Err` (every problem so far) only when the text
    /// cannot be read as TOML at all.
    pub fn parse<T: DeserializeOwned>(&mut self) -> Result<T, ConfigErrors> {
        let mut text = std::borrow::Cow::Borrowed(self.source.text.as_str());
        let mut found = Vec::new();
        let mut parsed = None;
        // Each pass blanks at least one more line, so the loop ends; the cap bounds the work
        // a hostile file can ask for.
        for _ in 0..256 {
            let e = match toml::from_str::<T>(&text) {
                Ok(raw) => {
                    parsed = Some(raw);
                    break;
                }
                Err(e) => e,
            };
            found.push(self.source.located(&e));
            match e.span().and_then(|s| blank_at(&text, s.start)) {
                Some(t) => text = std::borrow::Cow::Owned(t),
                None => break,
            }
        }
        // In the file's order (serde reports a table's problems before its keys').
        found.sort_by_key(|e| e.line);
        self.errors.extend(found);
        parsed.ok_or_else(|| ConfigErrors(std::mem::take(&mut self.errors)))
    }

    /// Records an error about a field that is missing altogether (unless stage one already
    /// reported a problem with it: a value of the wrong type is left out, not missing).
    pub fn missing(&mut self, field: &str, hint: &str) {
        if self.errors.iter().any(|e| e.field == field) {
            return;
        }
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
        let mut d = Diagnostics::new(&src);
        let raw: Raw = d.parse()?;
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
    fn typos_wrong_types_and_bad_values_are_reported_together() {
        let err = load(
            "listen = \"127.0.0.1:1\"\nmemroy = \"1GiB\"\ntimeout = [\n  1,\n  2,\n]\n\n[extra]\na = 1\nb = 2\n",
        )
        .unwrap_err();
        let fields: Vec<(&str, Option<usize>)> =
            err.0.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            fields,
            [
                ("memroy", Some(2)),
                ("timeout", Some(3)),
                ("extra", Some(8))
            ],
            "{err}"
        );
        // A bad value (stage two) beside a typo (stage one).
        let err = load("listen = \"nope\"\nbogus = 1\n").unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.mentions("bogus") && err.mentions("listen"), "{err}");
    }

    #[test]
    fn nested_keys_are_named_with_their_table() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Outer {
            #[allow(dead_code)]
            cache: Option<Inner>,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Inner {
            #[allow(dead_code)]
            memory: Option<Setting<RawSize>>,
            #[allow(dead_code)]
            disk: Option<Setting<RawSize>>,
        }
        let src = Source::inline("n.toml", "[cache]\nmemory = 1\nmemroy = 2\n");
        let err = src.parse::<Outer>().unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].field, "cache.memroy");
        assert_eq!(err.0[0].line, Some(3));
        assert!(
            err.0[0].message.contains("(did you mean `memory`?)"),
            "{err}"
        );
    }

    #[test]
    fn lines_stay_right_after_blanking_multibyte_text() {
        let err = load("memroy = 1 # €\n# 価格\ncolour = 1\n").unwrap_err();
        let at: Vec<(&str, Option<usize>)> =
            err.0.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(at, [("memroy", Some(1)), ("colour", Some(3))], "{err}");
    }

    #[test]
    fn a_file_that_is_not_toml_stops_with_its_errors() {
        let err = load("listen = \"unterminated\n").unwrap_err();
        assert!(!err.0.is_empty());
        assert_eq!(err.0[0].line, Some(1), "{err}");
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
