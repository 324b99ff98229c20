//! A small `Cache-Control` parser for the directives http-cache-semantics does not act on:
//! `stale-while-revalidate` and `stale-if-error` (RFC 5861), and the request directives
//! `only-if-cached` and `no-store` that change what the proxy does (RFC 9111 §5.2.1).
//!
//! Unknown directives are ignored (RFC 9111 §5.2.3): `nothing-to-see-here` is not `no-cache`.

use std::time::Duration;

use http::HeaderMap;
use http::header::CACHE_CONTROL;

/// The directives of all `Cache-Control` fields of one message.
#[derive(Debug, Default, Clone)]
pub struct Directives {
    items: Vec<(String, Option<String>)>,
}

impl Directives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut items = Vec::new();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for part in split_directives(value) {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                let (name, arg) = match part.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"').to_string())),
                    None => (part, None),
                };
                items.push((name.to_ascii_lowercase(), arg));
            }
        }
        Self { items }
    }

    /// Parses `Surrogate-Control` (Edge Architecture 1.0): directives may carry a `;target`
    /// suffix; only untargeted ones and those aimed at `target` apply. `None` when no directive
    /// applies.
    pub fn parse_surrogate(headers: &HeaderMap, target: &str) -> Option<Self> {
        let mut items = Vec::new();
        for value in headers.get_all("surrogate-control") {
            let Ok(value) = value.to_str() else { continue };
            for part in split_directives(value) {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                let (directive, aimed) = match part.rsplit_once(';') {
                    Some((d, t)) => (d.trim(), Some(t.trim())),
                    None => (part, None),
                };
                if aimed.is_some_and(|t| !t.eq_ignore_ascii_case(target)) {
                    continue;
                }
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n, Some(a.trim_matches('"').to_string())),
                    None => (directive, None),
                };
                items.push((name.to_ascii_lowercase(), arg));
            }
        }
        (!items.is_empty()).then_some(Self { items })
    }

    /// The raw argument of a directive (`max-age=abc` gives `Some("abc")`).
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, a)| a.as_deref())
    }

    /// Re-serialises with lower-case names, for the policy crate (which matches names
    /// case-sensitively).
    pub fn to_header(&self) -> String {
        self.items
            .iter()
            .map(|(n, a)| match a {
                Some(a) if a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
                    format!("{n}={a}")
                }
                Some(a) => format!("{n}=\"{a}\""),
                None => n.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Drops a directive.
    pub fn remove(&mut self, name: &str) {
        self.items.retain(|(n, _)| n != name);
    }

    pub fn has(&self, name: &str) -> bool {
        self.items.iter().any(|(n, _)| n == name)
    }

    /// A delta-seconds argument (RFC 9111 §1.2.2). An invalid value gives `None`.
    pub fn seconds(&self, name: &str) -> Option<Duration> {
        self.items
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, a)| a.as_deref())
            .and_then(|a| a.parse::<u64>().ok())
            .map(Duration::from_secs)
    }
}

/// Splits on commas that are not inside a quoted string (`private="a, b"` is one directive).
fn split_directives(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cc(v: &str) -> Directives {
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        Directives::parse(&h)
    }

    #[test]
    fn parses_arguments_and_ignores_unknown() {
        let d = cc("public, max-age=60, stale-while-revalidate=30, nothing-to-see-here");
        assert!(d.has("public"));
        assert!(!d.has("no-cache"));
        assert_eq!(
            d.seconds("stale-while-revalidate"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(d.seconds("stale-if-error"), None);
    }

    #[test]
    fn quoted_commas_and_case() {
        let d = cc("Private=\"set-cookie, x\", MAX-AGE=\"5\"");
        assert!(d.has("private"));
        assert_eq!(d.seconds("max-age"), Some(Duration::from_secs(5)));
        assert!(!d.has("x\""));
    }

    #[test]
    fn bad_numbers_are_none() {
        assert_eq!(cc("stale-if-error=abc").seconds("stale-if-error"), None);
        assert_eq!(cc("stale-if-error=-1").seconds("stale-if-error"), None);
    }
}
