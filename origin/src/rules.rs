//! Per-path response rules: which `Cache-Control` and `Surrogate-Key` a file is served with.
//!
//! A rules file is TOML:
//!
//! ```toml
//! default_cache_control = "public, max-age=60"   # optional; this is the default
//!
//! [[rule]]
//! path = "/assets/**"
//! cache_control = "public, max-age=31536000, immutable"
//! surrogate_key = "assets static"                # optional, space-separated keys
//!
//! [[rule]]
//! path = "/**/*.html"
//! cache_control = "public, max-age=60, stale-while-revalidate=30"
//! surrogate_key = "html"
//! ```
//!
//! Rules are tried in file order and the **first match wins**; a file no rule matches gets
//! `default_cache_control` and no Surrogate-Key. A rule without `cache_control` uses the default but
//! still stops the search (handy to tag a path without changing its freshness).
//!
//! Patterns are [globset] globs matched against the decoded path of the file actually served,
//! starting with `/` (a directory request is matched as its `…/index.html`). They are compiled with
//! `literal_separator(true)`: `*` and `?` never cross a `/`, while `**` spans any number of
//! directories, including none. So `/*.html` matches `/about.html` but not `/docs/guide.html`, and
//! `/**/*.html` matches both (and `/index.html`). `{a,b}` alternatives and `[abc]` classes work;
//! matching is case-sensitive, like the file system.
//!
//! Rule fields in errors are named `rule[N].field`, counting `[[rule]]` tables from 1.

use std::path::Path;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use http::HeaderValue;
use outpost_config::{ConfigErrors, Diagnostics, Setting, Source};
use serde::Deserialize;

/// The Cache-Control sent when no rule matches and the file sets no default.
pub const DEFAULT_CACHE_CONTROL: &str = "public, max-age=60";

/// Compiled rules: the default Cache-Control and the ordered rules.
#[derive(Debug, Clone)]
pub struct Rules {
    default_cache_control: HeaderValue,
    rules: Vec<Rule>,
    set: GlobSet,
}

#[derive(Debug, Clone)]
struct Rule {
    pattern: String,
    cache_control: Option<HeaderValue>,
    surrogate_key: Option<HeaderValue>,
}

/// The headers a rule gives one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy<'a> {
    pub cache_control: &'a HeaderValue,
    pub surrogate_key: Option<&'a HeaderValue>,
    /// The pattern of the matching rule, `None` for the default.
    pub pattern: Option<&'a str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    default_cache_control: Option<Setting<String>>,
    #[serde(default)]
    rule: Vec<Setting<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    path: Option<Setting<String>>,
    cache_control: Option<Setting<String>>,
    surrogate_key: Option<Setting<String>>,
}

impl Rules {
    /// No rules: every file gets `public, max-age=60` and no Surrogate-Key.
    pub fn builtin() -> Rules {
        Rules {
            default_cache_control: HeaderValue::from_static(DEFAULT_CACHE_CONTROL),
            rules: Vec::new(),
            set: GlobSet::empty(),
        }
    }

    /// Reads and parses a rules file.
    pub fn load(path: &Path) -> Result<Rules, ConfigErrors> {
        Rules::from_source(&Source::read(path)?)
    }

    /// Parses a rules file held in memory, reporting every bad value with its field and line.
    pub fn from_source(src: &Source) -> Result<Rules, ConfigErrors> {
        let mut d = Diagnostics::new(src);
        let raw: RawRules = d.parse()?;

        let default_cache_control = match &raw.default_cache_control {
            Some(s) => header_value(&mut d, "default_cache_control", s),
            None => Some(HeaderValue::from_static(DEFAULT_CACHE_CONTROL)),
        };

        let mut rules = Vec::with_capacity(raw.rule.len());
        let mut globs = Vec::with_capacity(raw.rule.len());
        for (i, table) in raw.rule.iter().enumerate() {
            let n = i + 1;
            let rule = &table.value;
            let glob = match &rule.path {
                Some(p) => glob(&mut d, &format!("rule[{n}].path"), p),
                None => {
                    d.error(
                        &format!("rule[{n}].path"),
                        table,
                        "is required (a glob such as \"/assets/**\")",
                    );
                    None
                }
            };
            let cache_control = rule
                .cache_control
                .as_ref()
                .map(|s| header_value(&mut d, &format!("rule[{n}].cache_control"), s));
            let surrogate_key = rule
                .surrogate_key
                .as_ref()
                .map(|s| surrogate_key(&mut d, &format!("rule[{n}].surrogate_key"), s));
            if let (Some(glob), Some(path)) = (glob, &rule.path) {
                globs.push(glob);
                rules.push(Rule {
                    pattern: path.value.clone(),
                    cache_control: cache_control.flatten(),
                    surrogate_key: surrogate_key.flatten(),
                });
            }
        }

        let set = if d.has_errors() {
            None
        } else {
            let mut builder = GlobSetBuilder::new();
            for g in globs {
                builder.add(g);
            }
            match builder.build() {
                Ok(set) => Some(set),
                Err(e) => {
                    // Each glob compiled on its own; a failure here is a size limit of the
                    // combined matcher.
                    let first = raw.rule.first().and_then(|r| r.value.path.as_ref());
                    if let Some(s) = first {
                        d.error("rule", s, format!("cannot combine the rule globs: {e}"));
                    }
                    None
                }
            }
        };
        d.finish(|| Rules {
            default_cache_control: default_cache_control
                .unwrap_or_else(|| HeaderValue::from_static(DEFAULT_CACHE_CONTROL)),
            rules,
            set: set.unwrap_or_else(GlobSet::empty),
        })
    }

    /// The policy for the decoded path of the file being served: the first matching rule, else
    /// the default.
    pub fn lookup(&self, path: &str) -> Policy<'_> {
        match self.set.matches(path).into_iter().min() {
            Some(i) => {
                let rule = &self.rules[i];
                Policy {
                    cache_control: rule
                        .cache_control
                        .as_ref()
                        .unwrap_or(&self.default_cache_control),
                    surrogate_key: rule.surrogate_key.as_ref(),
                    pattern: Some(&rule.pattern),
                }
            }
            None => Policy {
                cache_control: &self.default_cache_control,
                surrogate_key: None,
                pattern: None,
            },
        }
    }

    /// Number of rules (not counting the default).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

impl Default for Rules {
    fn default() -> Rules {
        Rules::builtin()
    }
}

fn glob(d: &mut Diagnostics<'_>, field: &str, s: &Setting<String>) -> Option<Glob> {
    if !s.value.starts_with('/') {
        d.error(
            field,
            s,
            format!(
                "glob {:?} must start with '/' (it is matched against the request path, for example \"/assets/**\")",
                s.value
            ),
        );
        return None;
    }
    match GlobBuilder::new(&s.value)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
    {
        Ok(g) => Some(g),
        Err(e) => {
            d.error(
                field,
                s,
                format!("invalid glob {:?}: {}", s.value, e.kind()),
            );
            None
        }
    }
}

fn header_value(d: &mut Diagnostics<'_>, field: &str, s: &Setting<String>) -> Option<HeaderValue> {
    let v = s.value.trim();
    if v.is_empty() {
        d.error(
            field,
            s,
            "must not be empty (for example \"public, max-age=60\")",
        );
        return None;
    }
    match HeaderValue::from_str(v) {
        Ok(h) => Some(h),
        Err(_) => {
            d.error(
                field,
                s,
                format!("{v:?} is not a valid header value (use printable ASCII only)"),
            );
            None
        }
    }
}

/// Surrogate keys are space-separated tokens (the Fastly / Varnish convention); runs of whitespace
/// are normalised to one space.
fn surrogate_key(d: &mut Diagnostics<'_>, field: &str, s: &Setting<String>) -> Option<HeaderValue> {
    let keys: Vec<&str> = s.value.split_whitespace().collect();
    if keys.is_empty() {
        d.error(
            field,
            s,
            "must name at least one key (space-separated, for example \"assets css\")",
        );
        return None;
    }
    if let Some(bad) = keys
        .iter()
        .find(|k| !k.bytes().all(|b| b.is_ascii_graphic()))
    {
        d.error(
            field,
            s,
            format!("key {bad:?} must be printable ASCII without spaces"),
        );
        return None;
    }
    HeaderValue::from_str(&keys.join(" ")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"default_cache_control = "public, max-age=60"

[[rule]]
path = "/assets/**"
cache_control = "public, max-age=31536000, immutable"
surrogate_key = "assets   static"

[[rule]]
path = "/**/*.html"
cache_control = "public, max-age=60, stale-while-revalidate=30"
surrogate_key = "html"

[[rule]]
path = "/*.txt"
surrogate_key = "text"
"#;

    fn rules(text: &str) -> Result<Rules, ConfigErrors> {
        Rules::from_source(&Source::inline("rules.toml", text))
    }

    #[test]
    fn first_match_wins_and_default_applies() {
        let r = rules(SAMPLE).unwrap();
        assert_eq!(r.len(), 3);
        let p = r.lookup("/assets/css/style.css");
        assert_eq!(p.cache_control, "public, max-age=31536000, immutable");
        assert_eq!(p.surrogate_key.unwrap(), "assets static");
        assert_eq!(p.pattern, Some("/assets/**"));
        // An HTML file under /assets/ is caught by the first rule.
        assert_eq!(r.lookup("/assets/x.html").pattern, Some("/assets/**"));
        let p = r.lookup("/docs/guide.html");
        assert_eq!(p.surrogate_key.unwrap(), "html");
        let p = r.lookup("/robots.txt");
        assert_eq!(p.cache_control, DEFAULT_CACHE_CONTROL);
        assert_eq!(p.surrogate_key.unwrap(), "text");
        let p = r.lookup("/favicon.ico");
        assert_eq!(p.cache_control, DEFAULT_CACHE_CONTROL);
        assert_eq!(p.surrogate_key, None);
        assert_eq!(p.pattern, None);
    }

    #[test]
    fn star_stays_in_one_directory_double_star_crosses() {
        let r = rules(SAMPLE).unwrap();
        assert_eq!(r.lookup("/index.html").pattern, Some("/**/*.html"));
        assert_eq!(r.lookup("/a/b/c/d.html").pattern, Some("/**/*.html"));
        assert_eq!(r.lookup("/robots.txt").pattern, Some("/*.txt"));
        assert_eq!(r.lookup("/docs/notes.txt").pattern, None);
        assert_eq!(r.lookup("/assets").pattern, None);
        let r = rules("[[rule]]\npath = \"/*.html\"\ncache_control = \"no-cache\"\n").unwrap();
        assert_eq!(r.lookup("/about.html").cache_control, "no-cache");
        assert_eq!(r.lookup("/docs/guide.html").pattern, None);
    }

    #[test]
    fn builtin_has_only_the_default() {
        let r = Rules::builtin();
        assert!(r.is_empty());
        let p = r.lookup("/anything");
        assert_eq!(p.cache_control, "public, max-age=60");
        assert_eq!(p.surrogate_key, None);
        assert_eq!(
            rules("").unwrap().lookup("/").cache_control,
            "public, max-age=60"
        );
    }

    #[test]
    fn bad_glob_names_field_and_line() {
        let err = rules(
            "[[rule]]\npath = \"/ok/**\"\ncache_control = \"x\"\n\n[[rule]]\npath = \"/a/[b\"\ncache_control = \"y\"\n",
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].field, "rule[2].path");
        assert_eq!(err.0[0].line, Some(6));
        assert!(err.0[0].message.contains("invalid glob"), "{err}");
    }

    #[test]
    fn every_bad_value_is_reported() {
        let err = rules(
            "default_cache_control = \"\"\n[[rule]]\npath = \"assets/**\"\ncache_control = \"bad\\u0007\"\nsurrogate_key = \"  \"\n",
        )
        .unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "default_cache_control",
                "rule[1].path",
                "rule[1].cache_control",
                "rule[1].surrogate_key"
            ],
            "{err}"
        );
        assert_eq!(err.0[0].line, Some(1));
        assert_eq!(err.0[1].line, Some(3));
    }

    #[test]
    fn missing_path_names_the_rule() {
        let err = rules("[[rule]]\ncache_control = \"x\"\n\n[[rule]]\ncache_control = \"y\"\n")
            .unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert_eq!(err.0[0].field, "rule[1].path");
        assert_eq!(err.0[1].field, "rule[2].path");
        assert!(err.0[1].line.is_some_and(|l| l >= 4), "{err}");
        assert!(err.to_string().contains("is required"));
    }

    #[test]
    fn unknown_field_names_the_field_and_line() {
        let err = rules("[[rule]]\npath = \"/x\"\ncache_contol = \"x\"\n").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].field, "rule.cache_contol", "{err}");
        assert_eq!(err.0[0].line, Some(3));
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = rules("cache = 1\n").unwrap_err();
        assert_eq!(err.0[0].field, "cache");
    }
}
