//! Cache keys: one normalised form of a request, and a stable hash of it.
//!
//! HTTP/1 sends `GET /a` with `Host: x`, HTTP/2 sends `:authority x` and `:path /a`; both must
//! land on one entry. The key is `host + path + ? + sorted query` with the host lower-cased and a
//! default port dropped. [`KeyHash`] is blake3 of that text: the same on every machine, across
//! restarts and builds (never `DefaultHasher`), so the memory tier, the disk tier and (later) the
//! shield ring all agree.

use std::fmt;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, request};

/// Fixed-size stable hash of a cache key (or of a key plus its Vary values).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

/// Maps keyed by `KeyHash` (the tiers' indexes, Vary, coalescing) hash only its first eight
/// bytes: they are already uniformly distributed (blake3), and the maps' own keyed hasher
/// ([`KeyHasher`]) still mixes them, so hashing all 32 would only cost time on every lookup.
impl std::hash::Hash for KeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.first_u64());
    }
}

impl KeyHash {
    /// The first eight bytes: already uniformly distributed (see the `Hash` impl).
    pub fn first_u64(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
    }

    pub fn of(text: &str) -> Self {
        Self(*blake3::hash(text.as_bytes()).as_bytes())
    }

    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hi = (chunk[0] as char).to_digit(16)?;
            let lo = (chunk[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }

    /// The secondary key of one Vary variant: this primary hash plus the request's values of
    /// the nominated headers (RFC 9111 §4.1). Values are compared after trimming and joining
    /// repeated fields with ", ", the normalisation §4.1 allows.
    pub fn variant(&self, names: &[HeaderName], headers: &HeaderMap) -> KeyHash {
        let mut h = blake3::Hasher::new();
        h.update(&self.0);
        for name in names {
            h.update(name.as_str().as_bytes());
            h.update(b":");
            if name == header::ACCEPT_ENCODING {
                // Browsers send dozens of spellings; they all fall in three buckets.
                h.update(Coding::negotiate(headers).as_str().as_bytes());
                h.update(b"\n");
                continue;
            }
            let mut first = true;
            for v in headers.get_all(name) {
                if !first {
                    h.update(b", ");
                }
                first = false;
                h.update(v.as_bytes().trim_ascii());
            }
            h.update(b"\n");
        }
        KeyHash(*h.finalize().as_bytes())
    }
}

/// The hasher of maps keyed by [`KeyHash`]: a few instructions for one `u64`, and seeded per
/// process, so request URLs cannot be ground into colliding buckets.
pub type KeyHasher = foldhash::fast::RandomState;

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", &self.hex()[..16])
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex()[..16])
    }
}

/// The content codings Outpost serves, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    Br,
    Gzip,
    Identity,
}

impl Coding {
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Gzip => "gzip",
            Coding::Identity => "identity",
        }
    }

    /// The coding a name from `Accept-Encoding` or `Content-Encoding` names (any case;
    /// `x-gzip` is gzip).
    pub fn named(name: &str) -> Option<Coding> {
        if name.eq_ignore_ascii_case("br") {
            Some(Coding::Br)
        } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
            Some(Coding::Gzip)
        } else if name.eq_ignore_ascii_case("identity") {
            Some(Coding::Identity)
        } else {
            None
        }
    }

    /// Picks the coding for a request from `Accept-Encoding` ([`Accepted::negotiate`]).
    pub fn negotiate(headers: &HeaderMap) -> Coding {
        Accepted::parse(headers).negotiate()
    }
}

/// A request's `Accept-Encoding`, parsed once (RFC 9110 §12.5.3): the q-value of each coding
/// Outpost serves and of `*`. The one parser of the field: the cache key's bucket
/// ([`Accepted::negotiate`]) and the compression phase's checks ([`Accepted::accepts`]) read it
/// the same way.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accepted {
    br: Option<f32>,
    gzip: Option<f32>,
    star: Option<f32>,
    /// The field lists at least one coding.
    any: bool,
}

impl Accepted {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut a = Accepted::default();
        for v in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(v) = v.to_str() else { continue };
            for item in v.split(',') {
                let mut parts = item.split(';');
                // Compared without case and without allocating: hits negotiate per request.
                let name = parts.next().unwrap_or("").trim();
                if name.is_empty() {
                    continue;
                }
                a.any = true;
                // The last q parameter counts; one that does not parse refuses (q=0).
                let mut q = 1.0f32;
                for p in parts {
                    if let Some(val) = p
                        .trim()
                        .strip_prefix("q=")
                        .or_else(|| p.trim().strip_prefix("Q="))
                    {
                        q = val.trim().parse().unwrap_or(0.0);
                    }
                }
                if name == "*" {
                    a.star = Some(q);
                } else {
                    match Coding::named(name) {
                        Some(Coding::Br) => a.br = Some(q),
                        Some(Coding::Gzip) => a.gzip = Some(q),
                        _ => {}
                    }
                }
            }
        }
        a
    }

    /// The q-value of `coding`: its own entry, else `*`'s; unlisted is 0.
    fn q(&self, coding: Coding) -> f32 {
        let own = match coding {
            Coding::Br => self.br,
            Coding::Gzip => self.gzip,
            Coding::Identity => return 1.0,
        };
        own.or(self.star).unwrap_or(0.0)
    }

    /// Whether `coding` may be sent: q > 0 for it, or for `*` when it is not listed. Identity
    /// always may (see [`Accepted::negotiate`]); without Accept-Encoding nothing else may.
    pub fn accepts(&self, coding: Coding) -> bool {
        self.q(coding) > 0.0
    }

    /// The coding for the request: br, then gzip, then identity. `q=0` refuses a coding; `*`
    /// covers codings not listed. Identity is chosen when nothing else is acceptable, even if
    /// the client refused it: a server may send identity rather than 406, and a cache answering
    /// 406 for a cacheable resource would help nobody. Without the field (or with an empty
    /// one), identity.
    pub fn negotiate(&self) -> Coding {
        if !self.any {
            return Coding::Identity;
        }
        let br = self.q(Coding::Br);
        let gz = self.q(Coding::Gzip);
        if br > 0.0 && br >= gz {
            Coding::Br
        } else if gz > 0.0 {
            Coding::Gzip
        } else {
            Coding::Identity
        }
    }
}

/// A normalised cache key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheKey {
    text: Arc<str>,
    hash: KeyHash,
}

impl CacheKey {
    pub fn new(text: impl Into<Arc<str>>) -> Self {
        let text = text.into();
        let hash = KeyHash::of(&text);
        Self { text, hash }
    }

    /// `host/path?query`, for logs and purge matching.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn hash(&self) -> KeyHash {
        self.hash
    }

    /// The key's host and request target (`host/path?query`), without keyed request fields.
    pub fn target(&self) -> &str {
        target_of(&self.text)
    }

    /// The path part of the key (`/a/b?x=1` without the host).
    pub fn path(&self) -> &str {
        self.text.find('/').map(|i| &self.text[i..]).unwrap_or("/")
    }
}

/// Why a request could not be normalised (answered 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("request has no Host header and no authority")]
    MissingHost,
    #[error("invalid Host header")]
    BadHost,
    #[error("request target must be an absolute path")]
    BadPath,
}

/// Key-building options from config.
#[derive(Debug, Clone, Default)]
pub struct KeyOptions {
    /// Query parameters left out of the key (for example tracking parameters); an entry
    /// ending in `*` matches every name with that prefix (`utm_*`).
    pub ignore_query_params: Vec<String>,
    /// Request fields forwarded upstream although they can change what the origin serves
    /// (`[upstream] forward_headers`): each one present is part of the key, after a `#`
    /// (never part of a request target) as `#name=value`.
    pub keyed_headers: Vec<HeaderName>,
}

/// A request in the one normalised form used for the key and for every policy call.
#[derive(Debug)]
pub struct NormalizedRequest {
    pub key: CacheKey,
    /// GET (HEAD is looked up as GET), absolute `http://host/path?query` URI, the request's
    /// end-to-end headers with `host` set. Used for `before_request` and Vary matching.
    pub parts: request::Parts,
}

impl NormalizedRequest {
    /// Normalises a request. HEAD becomes GET, because a HEAD is answered from a stored GET.
    pub fn new(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        opts: &KeyOptions,
    ) -> Result<Self, KeyError> {
        Self::with_key(
            method,
            headers,
            CacheKey::new(key_text(uri, headers, opts)?),
        )
    }

    /// [`NormalizedRequest::new`] with the key already built ([`key_text`]) from this request
    /// under the same options: the hit fast path builds it, and a request it hands on to the
    /// full path is not keyed twice.
    pub fn with_key(method: &Method, headers: &HeaderMap, key: CacheKey) -> Result<Self, KeyError> {
        let text = key.as_str();
        let host = &text[..text.find('/').unwrap_or(text.len())];
        let abs_uri: Uri = format!("http://{}", target_of(text))
            .parse()
            .map_err(|_| KeyError::BadPath)?;
        let host_value = HeaderValue::from_str(host).map_err(|_| KeyError::BadHost)?;
        let cache_method = if method == Method::HEAD {
            Method::GET
        } else {
            method.clone()
        };
        let mut builder = http::Request::builder().method(cache_method).uri(abs_uri);
        if let Some(h) = builder.headers_mut() {
            *h = headers.clone();
            h.insert(header::HOST, host_value);
            // One spelling per coding bucket, so Vary: Accept-Encoding matches across browsers.
            if h.contains_key(header::ACCEPT_ENCODING) {
                let bucket = Coding::negotiate(h).as_str();
                h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(bucket));
            }
        }
        let (parts, ()) = builder
            .body(())
            .map_err(|_| KeyError::BadPath)?
            .into_parts();
        Ok(Self { key, parts })
    }
}

/// A key text without its keyed request fields (after `#`, see [`KeyOptions::keyed_headers`]).
fn target_of(text: &str) -> &str {
    &text[..text.find('#').unwrap_or(text.len())]
}

/// The key text of a request: `host/path?query`, the host from the URI authority (HTTP/2,
/// absolute-form) or the Host header, lower-cased, with a trailing dot and the default port
/// removed; query parameters sorted, ignored ones dropped. [`KeyHash::of`] this text is the
/// primary key. Both the hit fast path and [`NormalizedRequest`] build keys here.
pub fn key_text(uri: &Uri, headers: &HeaderMap, opts: &KeyOptions) -> Result<String, KeyError> {
    let raw = match uri.authority() {
        Some(a) => a.as_str(),
        None => headers
            .get(header::HOST)
            .ok_or(KeyError::MissingHost)?
            .to_str()
            .map_err(|_| KeyError::BadHost)?,
    };
    // Userinfo (`user@host`) is no part of a host: refused, never stripped.
    if raw.contains('@') {
        return Err(KeyError::BadHost);
    }
    let mut host = raw.trim_ascii();
    if let Some(stripped) = host.strip_suffix(":80") {
        host = stripped;
    }
    if let Some(stripped) = host.strip_suffix('.') {
        host = stripped;
    }
    if host.is_empty() {
        return Err(KeyError::MissingHost);
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_'))
    {
        return Err(KeyError::BadHost);
    }
    let path = uri.path();
    if !path.starts_with('/') {
        return Err(KeyError::BadPath);
    }
    let query = uri.query().filter(|q| !q.is_empty());
    let mut text =
        String::with_capacity(host.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    text.push_str(host);
    text.make_ascii_lowercase();
    text.push_str(path);
    if let Some(q) = query {
        let start = text.len();
        text.push('?');
        push_normalized_query(&mut text, q, &opts.ignore_query_params);
        if text.len() == start + 1 {
            text.truncate(start);
        }
    }
    for name in &opts.keyed_headers {
        for v in headers.get_all(name) {
            text.push('#');
            text.push_str(name.as_str());
            text.push('=');
            text.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
    }
    Ok(text)
}

/// Appends the query's parameters sorted by name (stable for equal names), without the ignored
/// ones.
fn push_normalized_query(out: &mut String, q: &str, ignore: &[String]) {
    fn name_of(p: &str) -> &str {
        p.split('=').next().unwrap_or("")
    }
    let kept = |p: &&str| {
        let name = name_of(p);
        !p.is_empty()
            && !ignore.iter().any(|i| match i.strip_suffix('*') {
                // `utm_*` ignores every parameter starting with `utm_`.
                Some(prefix) => name.starts_with(prefix),
                None => i == name,
            })
    };
    let mut params: Vec<&str> = q.split('&').filter(kept).collect();
    if params.len() > 1 {
        params.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    }
    for (i, p) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(uri: &str, host: Option<&str>) -> Result<NormalizedRequest, KeyError> {
        let mut h = HeaderMap::new();
        if let Some(host) = host {
            h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        NormalizedRequest::new(
            &Method::GET,
            &uri.parse().unwrap(),
            &h,
            &KeyOptions {
                ignore_query_params: vec!["utm_source".into(), "fb*".into()],
                ..Default::default()
            },
        )
    }

    #[test]
    fn h1_and_h2_forms_give_one_key() {
        let a = norm("/a/b?y=2&x=1", Some("Example.COM:80")).unwrap();
        let b = norm("http://example.com/a/b?x=1&y=2", None).unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(a.key.as_str(), "example.com/a/b?x=1&y=2");
        assert_eq!(a.parts.uri, b.parts.uri);
        assert_eq!(a.parts.headers["host"], "example.com");
    }

    #[test]
    fn ignored_params_and_ports() {
        let a = norm("/p?utm_source=x&id=3", Some("h:8080")).unwrap();
        assert_eq!(a.key.as_str(), "h:8080/p?id=3");
        let b = norm("/p?utm_source=y&fbclid=3", Some("h")).unwrap();
        assert_eq!(b.key.as_str(), "h/p");
        assert_eq!(b.key.path(), "/p");
    }

    #[test]
    fn bad_hosts() {
        assert_eq!(norm("/", None).unwrap_err(), KeyError::MissingHost);
        assert_eq!(norm("/", Some("a b")).unwrap_err(), KeyError::BadHost);
        assert_eq!(norm("/", Some("user@h")).unwrap_err(), KeyError::BadHost);
        assert_eq!(norm("http://u@h/", None).unwrap_err(), KeyError::BadHost);
    }

    #[test]
    fn keyed_headers_are_part_of_the_key() {
        let opts = KeyOptions {
            keyed_headers: vec![HeaderName::from_static("x-forwarded-host")],
            ..Default::default()
        };
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("h"));
        let plain = NormalizedRequest::new(&Method::GET, &"/a".parse().unwrap(), &h, &opts);
        h.insert("x-forwarded-host", HeaderValue::from_static("evil"));
        let keyed = NormalizedRequest::new(&Method::GET, &"/a".parse().unwrap(), &h, &opts);
        let (plain, keyed) = (plain.unwrap(), keyed.unwrap());
        assert_ne!(plain.key, keyed.key);
        assert_eq!(keyed.key.as_str(), "h/a#x-forwarded-host=evil");
        assert_eq!(keyed.parts.uri, plain.parts.uri);
    }

    #[test]
    fn hash_is_stable_and_hex_round_trips() {
        let k = CacheKey::new("example.com/");
        // blake3 is specified; this value must never change across builds.
        assert_eq!(KeyHash::from_hex(&k.hash().hex()), Some(k.hash()));
        assert_eq!(k.hash(), KeyHash::of("example.com/"));
    }

    #[test]
    fn accept_encoding_negotiation_and_buckets() {
        let ae = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(Coding::negotiate(&ae("gzip, deflate, br")), Coding::Br);
        assert_eq!(Coding::negotiate(&ae("gzip;q=0, br")), Coding::Br);
        assert_eq!(Coding::negotiate(&ae("br;q=0, gzip")), Coding::Gzip);
        assert_eq!(Coding::negotiate(&ae("br;q=0.5, gzip;q=0.8")), Coding::Gzip);
        assert_eq!(Coding::negotiate(&ae("*")), Coding::Br);
        assert_eq!(Coding::negotiate(&ae("identity;q=0")), Coding::Identity);
        assert_eq!(Coding::negotiate(&HeaderMap::new()), Coding::Identity);
        // Coding names are case-insensitive (RFC 9110 §8.4.1).
        assert_eq!(Coding::negotiate(&ae("GZip, BR;q=0.1")), Coding::Gzip);
        assert_eq!(Coding::negotiate(&ae("X-GZIP")), Coding::Gzip);
        assert_eq!(Coding::negotiate(&ae("deflate, Br")), Coding::Br);
        let p = KeyHash::of("h/");
        let names = vec![header::ACCEPT_ENCODING];
        assert_eq!(
            p.variant(&names, &ae("gzip, deflate, br")),
            p.variant(&names, &ae("br, gzip"))
        );
        assert_ne!(p.variant(&names, &ae("gzip")), p.variant(&names, &ae("br")));
    }

    #[test]
    fn variants_differ_by_nominated_values() {
        let p = KeyHash::of("h/");
        let names = vec![HeaderName::from_static("accept-language")];
        let mut a = HeaderMap::new();
        a.insert("accept-language", HeaderValue::from_static("en"));
        let mut b = HeaderMap::new();
        b.insert("accept-language", HeaderValue::from_static("de"));
        assert_ne!(p.variant(&names, &a), p.variant(&names, &b));
        assert_eq!(p.variant(&names, &a), p.variant(&names, &a.clone()));
        assert_ne!(p.variant(&names, &HeaderMap::new()), p.variant(&names, &a));
    }
}
