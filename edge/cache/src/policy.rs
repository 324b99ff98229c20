//! The only place that calls http-cache-semantics (shared-cache mode). Every function takes
//! `now` as an argument and returns our own types.
//!
//! On top of the crate we add what it does not do:
//! - `stale-while-revalidate` and `stale-if-error` windows (RFC 5861);
//! - `Vary: *` and `Set-Cookie` without `public` are never stored (RFC 9111 §4.1; our choice for
//!   cookies, as nginx and Varnish do);
//! - the request stored in the policy keeps only `host`, `cache-control`, `pragma`, the headers
//!   the response varies on and the *presence* of `authorization`: no Cookie or credential value
//!   is ever persisted;
//! - the response stored in the policy keeps only the fields the crate decides on
//!   ([`POLICY_FIELDS`]) and the *presence* of `Set-Cookie`: the served headers are the
//!   metadata's own, so a second copy of every header would only double each record on disk
//!   and each object's metadata in memory, and would persist a public response's cookie;
//! - 304 header merging per RFC 9111 §3.2 / §4.3.4 (the crate drops repeated fields);
//! - everything stored (the metadata's headers, the policy's request and response) owns its
//!   bytes ([`owned_headers`]): hyper's header values and URIs are slices of the connection's
//!   read buffer, and one kept value would keep that whole buffer (up to hundreds of KiB, body
//!   bytes included) alive for as long as the object is cached.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri, request, response};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy};

use super::cache_control::Directives;
use super::meta::{CachedMeta, META_VERSION};
use super::status::PassReason;
use outpost_http::headers::{is_hop_by_hop, strip_hop_by_hop};

/// What to do with a response from upstream.
#[derive(Debug)]
pub enum Admission {
    /// Store it with this metadata (`body_len` still to be filled in).
    Store(Box<CachedMeta>),
    /// Do not store it.
    Pass(PassReason),
}

/// How a stored response relates to a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it as is.
    Fresh,
    /// Stale for this request: validate upstream first (or serve within a stale window).
    Stale,
    /// It cannot answer this request at all (other variant, credentials): go upstream.
    Unusable,
}

fn options() -> CacheOptions {
    CacheOptions {
        shared: true,
        ..Default::default()
    }
}

/// The request as stored inside a policy: no cookies, no credential values.
fn policy_request(req: &request::Parts, vary: &[HeaderName]) -> request::Parts {
    let mut headers = HeaderMap::new();
    for name in [header::HOST, header::CACHE_CONTROL, header::PRAGMA] {
        for v in req.headers.get_all(&name) {
            headers.append(name.clone(), v.clone());
        }
    }
    if req.headers.contains_key(header::AUTHORIZATION) {
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("redacted"));
    }
    for name in vary {
        if name == header::AUTHORIZATION || name == header::COOKIE {
            // Varying on credentials: keep a digest, never the value.
            if let Some(v) = req.headers.get(name) {
                let digest = blake3::hash(v.as_bytes()).to_hex();
                if let Ok(v) = HeaderValue::from_str(&digest[..32]) {
                    headers.insert(name.clone(), v);
                }
            }
            continue;
        }
        for v in req.headers.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    let mut out = http::Request::builder()
        .method(req.method.clone())
        .uri(owned_uri(&req.uri))
        .body(())
        .expect("method and uri come from a valid request")
        .into_parts()
        .0;
    out.headers = owned_headers(&headers);
    out
}

/// A copy of `map` that shares no bytes with it: the values are copied into one new buffer of
/// exactly their total length (one allocation for all of them), each value a slice of it.
/// Names are shared: standard names are static, and hyper and h2 copy every other name into
/// an allocation of its own.
///
/// Every header map kept beyond a request goes through this. hyper hands out header values
/// that are slices of the connection's read buffer, which also holds the body bytes read with
/// the head; a stored value would keep that whole buffer (up to ~400 KiB) alive as long as the
/// object stays cached, outside anything the tiers count.
pub fn owned_headers(map: &HeaderMap) -> HeaderMap {
    let total = map.iter().map(|(_, v)| v.len()).sum();
    let mut buf = BytesMut::with_capacity(total);
    for (_, v) in map {
        buf.extend_from_slice(v.as_bytes());
    }
    let buf: Bytes = buf.freeze();
    let mut out = HeaderMap::with_capacity(map.keys_len());
    let mut at = 0;
    for (name, v) in map {
        let end = at + v.len();
        // The bytes were a valid value already; the fallback cannot happen.
        let mut copy =
            HeaderValue::from_maybe_shared(buf.slice(at..end)).unwrap_or_else(|_| v.clone());
        copy.set_sensitive(v.is_sensitive());
        out.append(name.clone(), copy);
        at = end;
    }
    out
}

/// A copy of `uri` in a new allocation of its own (hyper's request URIs are slices of the
/// read buffer, like its header values: see [`owned_headers`]).
pub fn owned_uri(uri: &Uri) -> Uri {
    Uri::try_from(uri.to_string()).unwrap_or_else(|_| uri.clone())
}

/// The response fields http-cache-semantics (3.0) decides from, of the response it keeps:
/// storability, freshness lifetime (heuristic included), age and Vary matching come from these
/// alone, and `Set-Cookie`'s presence. The rest of the response it only copies into what this
/// crate builds itself: `BeforeRequest::Fresh`'s headers and `Stale`'s revalidation request
/// (ETag, Last-Modified) are not used, and a 304 is merged by [`apply_not_modified`].
/// `a_policy_decides_the_same_from_the_fields_it_keeps` holds this list to the crate's
/// behaviour. Records written before this list keep their policy's full copy (a public
/// response's Set-Cookie value included) until the object is stored again or revalidated.
static POLICY_FIELDS: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::PRAGMA,
    header::EXPIRES,
    header::VARY,
    header::DATE,
    header::AGE,
    header::LAST_MODIFIED,
];

/// The fields of `headers` a stored policy keeps a copy of ([`POLICY_FIELDS`]).
pub fn policy_fields(headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    POLICY_FIELDS
        .iter()
        .flat_map(move |name| headers.get_all(name).iter().map(move |v| (name, v)))
}

/// The policy of a response being stored. http-cache-semantics keeps the request's and the
/// response's header maps and the URI as given: `preq` comes from [`policy_request`] (already
/// owned); of the response, only [`POLICY_FIELDS`] are kept (copied: [`owned_headers`]), and
/// `Set-Cookie` as a flag, never its value.
pub(crate) fn stored_policy(
    preq: &request::Parts,
    presp: &response::Parts,
    now: SystemTime,
) -> CachePolicy {
    let mut kept = HeaderMap::new();
    for (name, v) in policy_fields(&presp.headers) {
        kept.append(name.clone(), v.clone());
    }
    if presp.headers.contains_key(header::SET_COOKIE) {
        kept.insert(header::SET_COOKIE, HeaderValue::from_static("redacted"));
    }
    let mut resp = http::Response::builder()
        .status(presp.status)
        .body(())
        .expect("status from a valid response")
        .into_parts()
        .0;
    resp.headers = owned_headers(&kept);
    CachePolicy::new_options(preq, &resp, now, options())
}

/// What the policy crate should see of a response:
/// - `Cache-Control` directive names lower-cased (`No-CaChE` is `no-cache`, RFC 9111 §5.2);
/// - a `Surrogate-Control` (Edge Architecture 1.0) directive aimed at us, or at every
///   surrogate, replaces `Cache-Control` and `Expires` for this cache;
/// - an invalid `Age` (not exactly one non-negative integer) makes the response stale
///   (RFC 9111 §5.1).
///
/// Returns `None` when Surrogate-Control says `no-store`.
/// Per-request options of admission.
#[derive(Debug, Clone, Default)]
pub struct AdmitOptions {
    /// Our `Surrogate-Control` device token (the node name).
    pub surrogate: String,
    /// Freshness for a response that carries none of its own (versioned URLs: `?v=3`).
    pub default_ttl: Option<Duration>,
    /// Targeted cache-control fields (RFC 9213), most specific first: the first one present
    /// and valid replaces Cache-Control for this cache.
    pub targeted: Arc<[HeaderName]>,
    /// How long past freshness a stored response may stand in when the upstream cannot be
    /// reached or answers 5xx, without a `stale-if-error` of its own (RFC 9111 §4.2.4).
    pub stale_on_error: Duration,
    /// Freshness of error responses that carry none of their own (`[cache] negative_ttl`).
    pub negative: Arc<NegativeTtl>,
}

/// Negative caching (`[cache] negative_ttl`, nginx's `proxy_cache_valid 404 1m`): freshness
/// for a 4xx or 5xx response that brings none of its own (no `max-age`, `s-maxage` or
/// `Expires`), so a storm of requests for a missing or failing URL costs the origin one
/// request per period. Never over `no-store`, `no-cache` or `private`, and never longer than
/// configured. Empty by default: error responses are stored only as HTTP allows (a 404 or 410
/// with heuristic freshness).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NegativeTtl {
    /// Exact statuses, then whole classes (`4xx` = 400, `5xx` = 500).
    exact: Vec<(u16, Duration)>,
    classes: Vec<(u16, Duration)>,
}

impl NegativeTtl {
    /// `entries`: (status or class, ttl); a class is given as 400 or 500 with `class = true`.
    pub fn new(entries: impl IntoIterator<Item = (u16, bool, Duration)>) -> Self {
        let mut out = Self::default();
        for (status, class, ttl) in entries {
            if class {
                out.classes.push((status / 100, ttl));
            } else {
                out.exact.push((status, ttl));
            }
        }
        out
    }

    /// The configured freshness for this status, if any.
    pub fn ttl(&self, status: StatusCode) -> Option<Duration> {
        let code = status.as_u16();
        if !(400..600).contains(&code) {
            return None;
        }
        self.exact
            .iter()
            .find(|(s, _)| *s == code)
            .or_else(|| self.classes.iter().find(|(c, _)| *c == code / 100))
            .map(|(_, ttl)| *ttl)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.classes.is_empty()
    }
}

pub fn policy_response(resp: &response::Parts, opts: &AdmitOptions) -> Option<response::Parts> {
    let surrogate = opts.surrogate.as_str();
    let mut headers = resp.headers.clone();
    // RFC 9213 §2.1: a valid targeted field (CDN-Cache-Control) replaces Cache-Control's
    // directives for this cache; an invalid one is ignored.
    if let Some(targeted) = targeted_directives(&resp.headers, &opts.targeted) {
        headers.remove(header::CACHE_CONTROL);
        if !targeted.is_empty()
            && let Ok(v) = HeaderValue::from_str(&targeted)
        {
            headers.insert(header::CACHE_CONTROL, v);
        }
    }
    let mut cc = Directives::parse(&headers);
    // RFC 9111 §5.2.2.3: `must-understand` stores only status codes whose caching rules we
    // know, and for those it overrides `no-store`.
    if cc.has("must-understand") {
        if !status_understood(resp.status.as_u16()) {
            return None;
        }
        cc.remove("no-store");
        headers.remove(header::CACHE_CONTROL);
        if let Ok(v) = HeaderValue::from_str(&cc.to_header()) {
            headers.insert(header::CACHE_CONTROL, v);
        }
    }
    // Freshness the operator gives a response that brings none of its own (and is not
    // forbidden to be stored or reused without asking): a versioned URL names one immutable
    // revision; an error is kept briefly (negative caching). A versioned URL asked for before
    // its deploy must not keep its 404 for the versioned lifetime.
    let own = cc.has("max-age")
        || cc.has("s-maxage")
        || cc.has("no-cache")
        || cc.has("no-store")
        || cc.has("private")
        || headers.contains_key(header::EXPIRES);
    let given = match (opts.default_ttl, opts.negative.ttl(resp.status)) {
        _ if own => None,
        (Some(ttl), _) if resp.status.as_u16() < 400 => {
            Some(format!("max-age={}, immutable", ttl.as_secs()))
        }
        (_, Some(ttl)) => Some(format!("max-age={}", ttl.as_secs())),
        _ => None,
    };
    if let Some(freshness) = given {
        let mut items = cc.to_header();
        if !items.is_empty() {
            items.push_str(", ");
        }
        items.push_str(&freshness);
        if let Ok(v) = HeaderValue::from_str(&items) {
            headers.insert(header::CACHE_CONTROL, v);
        }
    }
    if headers.contains_key(header::CACHE_CONTROL) {
        let current = Directives::parse(&headers);
        headers.remove(header::CACHE_CONTROL);
        if let Ok(v) = HeaderValue::from_str(&current.to_header()) {
            headers.insert(header::CACHE_CONTROL, v);
        }
    }
    if let Some(sc) = Directives::parse_surrogate(&resp.headers, surrogate) {
        if sc.has("no-store") {
            return None;
        }
        if let Some(max_age) = sc.raw("max-age") {
            headers.remove(header::EXPIRES);
            headers.remove(header::PRAGMA);
            let v = match max_age.parse::<u64>() {
                Ok(n) => format!("max-age={n}"),
                Err(_) => "max-age=0".to_string(),
            };
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_str(&v).expect("digits"),
            );
        }
    }
    // RFC 9111 §5.3: an invalid Expires means "already expired". The date parser accepts
    // repeated spaces in the comma forms, which the HTTP-date grammar does not.
    if headers
        .get(header::EXPIRES)
        .is_some_and(|v| !expires_is_well_formed(v.as_bytes()))
    {
        headers.insert(
            header::EXPIRES,
            HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
        );
    }
    // RFC 9111 §5.1: a list-valued Age counts by its first member; an invalid one is ignored.
    match first_age(&resp.headers) {
        Some(age) => {
            headers.insert(header::AGE, age);
        }
        None => {
            headers.remove(header::AGE);
        }
    }
    // RFC 9111 §3: any final status may be stored when the response has explicit freshness.
    // The policy crate only understands a fixed list of codes, so it evaluates such a response
    // as a 200 (its status only matters for heuristics, which explicit freshness excludes);
    // the real status is what we store and serve.
    let effective = Directives::parse(&headers);
    let explicit = effective.has("max-age")
        || effective.has("s-maxage")
        || headers.contains_key(header::EXPIRES);
    let status = if explicit
        && !POLICY_UNDERSTOOD.contains(&resp.status.as_u16())
        && status_may_be_stored(resp.status)
    {
        StatusCode::OK
    } else {
        resp.status
    };
    let mut out = http::Response::builder()
        .status(status)
        .body(())
        .expect("status from a valid response")
        .into_parts()
        .0;
    out.headers = headers;
    Some(out)
}

/// Directives an integer must carry in a targeted field (RFC 9213 §2.1: "a cache MUST
/// ignore the field" when a directive has a value of the wrong type).
const INTEGER_DIRECTIVES: [&str; 4] = [
    "max-age",
    "s-maxage",
    "stale-while-revalidate",
    "stale-if-error",
];

/// The first of `names` present in `headers` whose field lines parse together as a Structured
/// Field Dictionary (RFC 9651) with the right value types, as Cache-Control text. `None` when
/// no targeted field is present and valid (Cache-Control then applies as usual).
fn targeted_directives(headers: &HeaderMap, names: &[HeaderName]) -> Option<String> {
    names.iter().find_map(|name| {
        let lines: Vec<&[u8]> = headers
            .get_all(name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if lines.is_empty() {
            return None;
        }
        let field = lines.join(&b","[..]);
        let dict: sfv::Dictionary = sfv::Parser::new(&field).parse_dictionary().ok()?;
        let mut out: Vec<String> = Vec::with_capacity(dict.len());
        for (key, entry) in &dict {
            let key = key.as_str();
            let sfv::ListEntry::Item(item) = entry else {
                return None;
            };
            match &item.bare_item {
                sfv::BareItem::Integer(n) => {
                    let n = i64::from(*n);
                    if n < 0 {
                        return None;
                    }
                    out.push(format!("{key}={n}"));
                }
                _ if INTEGER_DIRECTIVES.contains(&key) => return None,
                sfv::BareItem::Boolean(false) => {}
                // A flag, or a qualified directive (`private="set-cookie"`) kept unqualified:
                // the stricter reading.
                _ => out.push(key.to_string()),
            }
        }
        Some(out.join(", "))
    })
}

/// Spacing per the HTTP-date grammar (RFC 9110 §5.6.7): IMF-fixdate and the obsolete RFC 850
/// form (the ones with a comma) separate their parts with exactly one space; only asctime
/// pads a one-digit day with a second one. The rest of the date is the parser's to judge.
fn expires_is_well_formed(v: &[u8]) -> bool {
    !(v.contains(&b',') && v.windows(2).any(|w| w == b"  "))
}

/// The Age a cache uses (RFC 9111 §5.1): "a cache encountering a message with a list-based Age
/// field value SHOULD use the first member of the field value, discarding subsequent ones", and
/// one that is then not a non-negative integer is ignored (`None`, as when there is no Age).
fn first_age(headers: &HeaderMap) -> Option<HeaderValue> {
    let first = headers.get(header::AGE)?.to_str().ok()?;
    let member = first.split(',').next().unwrap_or("").trim();
    if member.is_empty() || !member.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    HeaderValue::from_str(member).ok()
}

/// Header names listed in Vary (lower-case), sorted. `None` for `Vary: *`, which never matches.
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for v in headers.get_all(header::VARY) {
        let Ok(v) = v.to_str() else { continue };
        for n in v.split(',') {
            let n = n.trim();
            if n.is_empty() {
                continue;
            }
            if n == "*" {
                return None;
            }
            if let Ok(name) = HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Some(names)
}

/// Decides whether a response may be stored, and builds its metadata.
pub fn admit(
    req: &request::Parts,
    resp: &response::Parts,
    key: &str,
    now: SystemTime,
    opts: &AdmitOptions,
) -> Admission {
    let req_cc = Directives::parse(&req.headers);
    if req_cc.has("no-store") {
        return Admission::Pass(PassReason::RequestNoStore);
    }
    let Some(vary) = vary_names(&resp.headers) else {
        return Admission::Pass(PassReason::Uncacheable);
    };
    let Some(presp) = policy_response(resp, opts) else {
        return Admission::Pass(PassReason::Uncacheable);
    };
    let resp_cc = Directives::parse(&presp.headers);
    if resp.headers.contains_key(header::SET_COOKIE) && !resp_cc.has("public") {
        return Admission::Pass(PassReason::Uncacheable);
    }
    let preq = policy_request(req, &vary);
    let policy = stored_policy(&preq, &presp, now);
    if !policy.is_storable() {
        return Admission::Pass(PassReason::Uncacheable);
    }
    let ttl = policy.time_to_live(now);
    let (swr, sie) = stale_windows(&resp_cc);
    let mut headers = resp.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::SET_COOKIE);
    // RFC 9110 §6.6.1: a response cached without Date gets the time it was received.
    if !headers.contains_key(header::DATE)
        && let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(now))
    {
        headers.insert(header::DATE, date);
    }
    let has_validator =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    if ttl.is_zero() && !has_validator && swr.is_zero() && sie.is_zero() {
        // Nothing could ever be reused without a full fetch: storing would only churn.
        return Admission::Pass(PassReason::Uncacheable);
    }
    let mut meta = CachedMeta {
        version: META_VERSION,
        key: key.to_string(),
        status: resp.status,
        headers: owned_headers(&headers),
        policy,
        stored_at_ms: 0,
        fresh_until_ms: 0,
        swr_secs: swr.as_secs(),
        sie_secs: error_window(&resp_cc, sie, opts.stale_on_error).as_secs(),
        body_len: 0,
        vary: vary.iter().map(|n| n.as_str().to_string()).collect(),
        tags: super::meta::tags_of(&resp.headers),
        purge_seq: 0,
    };
    meta.set_stored_now(now, ttl);
    Admission::Store(Box::new(meta))
}

/// `stale-while-revalidate` / `stale-if-error` windows, unless the response forbids serving
/// stale (`must-revalidate`, `proxy-revalidate`, `no-cache`: RFC 9111 §5.2.2).
/// The stale-if-error window stored with a response: its own `stale-if-error`, or the node's
/// `stale_on_error` when that is longer. RFC 9111 §4.2.4: never when a directive forbids
/// serving stale (no-cache, must-revalidate, proxy-revalidate, or s-maxage, which carries
/// proxy-revalidate's meaning for a shared cache, §5.2.2.10).
fn error_window(cc: &Directives, own: Duration, node: Duration) -> Duration {
    if cc.has("no-cache")
        || cc.has("must-revalidate")
        || cc.has("proxy-revalidate")
        || cc.has("s-maxage")
    {
        return own;
    }
    own.max(node)
}

fn stale_windows(cc: &Directives) -> (Duration, Duration) {
    if cc.has("must-revalidate") || cc.has("proxy-revalidate") || cc.has("no-cache") {
        return (Duration::ZERO, Duration::ZERO);
    }
    (
        cc.seconds("stale-while-revalidate").unwrap_or_default(),
        cc.seconds("stale-if-error").unwrap_or_default(),
    )
}

/// Is the stored response usable for this (normalised) request at `now`?
pub fn freshness(meta: &CachedMeta, req: &request::Parts, now: SystemTime) -> Freshness {
    // RFC 9111 §3.5: a shared cache must not reuse a response for a request with credentials
    // unless the response explicitly allows it.
    if req.headers.contains_key(header::AUTHORIZATION) {
        let cc = Directives::parse(&meta.headers);
        if !(cc.has("public") || cc.has("s-maxage") || cc.has("must-revalidate")) {
            return Freshness::Unusable;
        }
    }
    // Fast path for the common hit: a request without directives of its own (no
    // Cache-Control, Pragma or credentials) against a response still inside the freshness
    // lifetime computed when it was stored. Vary was already matched by the variant key. The
    // full evaluation below builds and discards a response on every call.
    if super::clock::unix_ms(now) < meta.fresh_until_ms
        && !req.headers.contains_key(header::CACHE_CONTROL)
        && !req.headers.contains_key(header::PRAGMA)
        && !req.headers.contains_key(header::AUTHORIZATION)
    {
        return Freshness::Fresh;
    }
    match meta.policy.before_request(req, now) {
        BeforeRequest::Fresh(_) => Freshness::Fresh,
        BeforeRequest::Stale { matches: true, .. } => Freshness::Stale,
        BeforeRequest::Stale { matches: false, .. } => Freshness::Unusable,
    }
}

/// May a stale object be served now while it is revalidated in the background?
/// Not when the client asked for a validated or fresher answer.
pub fn within_swr(meta: &CachedMeta, req_headers: &HeaderMap, now: SystemTime) -> bool {
    if meta.swr_secs == 0 {
        return false;
    }
    let cc = Directives::parse(req_headers);
    if cc.has("no-cache") || cc.has("max-age") || cc.has("min-fresh") {
        return false;
    }
    if req_headers
        .get(header::PRAGMA)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-cache"))
    {
        return false;
    }
    meta.staleness(now) <= Duration::from_secs(meta.swr_secs)
}

/// May a stale object be served because upstream failed? The response's `stale-if-error`
/// window, or the request's own `stale-if-error` (RFC 5861 §4).
pub fn within_sie(meta: &CachedMeta, req_headers: &HeaderMap, now: SystemTime) -> bool {
    let resp_cc = Directives::parse(&meta.headers);
    if resp_cc.has("must-revalidate") || resp_cc.has("proxy-revalidate") {
        return false;
    }
    let window = Directives::parse(req_headers)
        .seconds("stale-if-error")
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .max(meta.sie_secs);
    window > 0 && meta.staleness(now) <= Duration::from_secs(window)
}

/// Current age of a stored response (RFC 9111 §4.2.3), for the `Age` header.
pub fn age(meta: &CachedMeta, now: SystemTime) -> Duration {
    meta.policy.age(now)
}

/// Remaining freshness, for `Cache-Status: ttl=`.
pub fn ttl(meta: &CachedMeta, now: SystemTime) -> Duration {
    // Whole milliseconds on both sides, as stored.
    Duration::from_millis(
        meta.fresh_until_ms
            .saturating_sub(super::clock::unix_ms(now)),
    )
}

/// Fields a 304 never changes in a stored response: they describe the stored body (its length,
/// coding, digest, range and validator), which the 304 does not replace (RFC 9111 §3.2).
/// Set-Cookie is never stored at all.
const NOT_UPDATED_BY_304: [&str; 7] = [
    "content-length",
    "content-encoding",
    "content-md5",
    "content-range",
    "etag",
    "set-cookie",
    "transfer-encoding",
];

/// Applies a 304 to a stored response (RFC 9111 §3.2, §4.3.4): every header of the 304
/// replaces all stored instances of that field, except the fields that describe the stored
/// body (`NOT_UPDATED_BY_304`) and hop-by-hop fields. Returns the updated metadata with a
/// fresh policy, or `None` if the merged response can no longer be stored (it now says
/// `Vary: *` or Surrogate-Control `no-store`).
pub fn apply_not_modified(
    meta: &CachedMeta,
    req: &request::Parts,
    not_modified: &response::Parts,
    now: SystemTime,
    opts: &AdmitOptions,
) -> Option<CachedMeta> {
    let mut headers = meta.headers.clone();
    let mut replaced: Vec<HeaderName> = Vec::new();
    for (name, value) in not_modified.headers.iter() {
        if is_hop_by_hop(name) || NOT_UPDATED_BY_304.contains(&name.as_str()) {
            continue;
        }
        if !replaced.contains(name) {
            headers.remove(name);
            replaced.push(name.clone());
        }
        headers.append(name.clone(), value.clone());
    }
    // A 304 without Date was received now (RFC 9110 §6.6.1): the stored Date must not keep
    // the first response's time, or an Expires lifetime would be counted from it.
    if !not_modified.headers.contains_key(header::DATE)
        && let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(now))
    {
        headers.insert(header::DATE, date);
    }
    let vary = vary_names(&headers)?;
    let mut parts = http::Response::builder()
        .status(meta.status)
        .body(())
        .ok()?
        .into_parts()
        .0;
    parts.headers = headers.clone();
    let presp = policy_response(&parts, opts)?;
    let preq = policy_request(req, &vary);
    let policy = stored_policy(&preq, &presp, now);
    let resp_cc = Directives::parse(&presp.headers);
    let (swr, sie) = stale_windows(&resp_cc);
    let ttl = policy.time_to_live(now);
    let tags = super::meta::tags_of(&headers);
    let mut updated = CachedMeta {
        headers: owned_headers(&headers),
        policy,
        swr_secs: swr.as_secs(),
        sie_secs: error_window(&resp_cc, sie, opts.stale_on_error).as_secs(),
        vary: vary.iter().map(|n| n.as_str().to_string()).collect(),
        tags,
        ..meta.clone()
    };
    updated.set_stored_now(now, ttl);
    Some(updated)
}

/// Final status codes RFC 9110 defines (so their caching rules are known).
fn status_understood(code: u16) -> bool {
    matches!(
        code,
        200..=206 | 300..=305 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 500..=505
    )
}

/// Status codes http-cache-semantics evaluates by themselves.
const POLICY_UNDERSTOOD: [u16; 14] = [
    200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501,
];

/// Status codes a cache may store at all (RFC 9110 §15.1 "heuristically cacheable" plus those
/// cacheable with explicit freshness). 206 is excluded: we store whole objects only.
pub fn status_may_be_stored(status: StatusCode) -> bool {
    !matches!(status.as_u16(), 206 | 304 | 100..=199 | 600..)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> request::Parts {
        let mut b = http::Request::builder()
            .method("GET")
            .uri("http://example.com/a")
            .header("host", "example.com");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> response::Parts {
        let mut b = http::Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn store(r: &request::Parts, p: &response::Parts, now: SystemTime) -> Option<CachedMeta> {
        let opts = AdmitOptions {
            surrogate: "outpost".into(),
            default_ttl: None,
            targeted: crate::default_targeted_cache_control(),
            stale_on_error: Duration::ZERO,
            negative: Default::default(),
        };
        match admit(r, p, "example.com/a", now, &opts) {
            Admission::Store(m) => Some(*m),
            Admission::Pass(_) => None,
        }
    }

    /// RFC 9111 §4.2.4: the node's stale-on-error window applies unless a directive forbids
    /// serving stale; a longer `stale-if-error` of the response's own wins.
    #[test]
    fn stale_on_error_stands_aside_for_directives_that_forbid_stale() {
        let node = Duration::from_secs(60);
        let own = |cc: &str| {
            error_window(
                &Directives::parse(&{
                    let mut h = HeaderMap::new();
                    h.insert(header::CACHE_CONTROL, HeaderValue::from_str(cc).unwrap());
                    h
                }),
                stale_windows(&Directives::parse(&{
                    let mut h = HeaderMap::new();
                    h.insert(header::CACHE_CONTROL, HeaderValue::from_str(cc).unwrap());
                    h
                }))
                .1,
                node,
            )
        };
        assert_eq!(own("max-age=10"), node);
        assert_eq!(
            own("max-age=10, stale-if-error=600"),
            Duration::from_secs(600)
        );
        for forbids in [
            "max-age=10, must-revalidate",
            "max-age=10, proxy-revalidate",
            "no-cache",
            "s-maxage=10",
        ] {
            assert_eq!(own(forbids), Duration::ZERO, "{forbids}");
        }
    }

    /// RFC 9213: a valid CDN-Cache-Control replaces Cache-Control for this cache; an invalid
    /// one (not a Structured Field dictionary, or a directive of the wrong type) is ignored.
    #[test]
    fn cdn_cache_control_replaces_cache_control_when_valid() {
        let now = SystemTime::now();
        let fresh = |h: &[(&str, &str)]| {
            store(&req(&[]), &resp(200, h), now).map(|m| freshness(&m, &req(&[]), now))
        };
        // Stored for the CDN although Cache-Control forbids it, and the reverse.
        let cdn_fresh = [
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=3600"),
        ];
        assert_eq!(fresh(&cdn_fresh), Some(Freshness::Fresh));
        let cdn_private = [
            ("cache-control", "max-age=3600"),
            ("cdn-cache-control", "private"),
        ];
        assert_eq!(fresh(&cdn_private), None);
        let cdn_no_store = [
            ("cache-control", "max-age=3600"),
            ("cdn-cache-control", "no-store"),
        ];
        assert_eq!(fresh(&cdn_no_store), None);
        let cdn_short = [
            ("cache-control", "max-age=3600"),
            ("cdn-cache-control", "max-age=0"),
            ("etag", "\"a\""),
        ];
        assert_eq!(fresh(&cdn_short), Some(Freshness::Stale));
        let unknown = [("cdn-cache-control", "foobar, max-age=3600")];
        assert_eq!(fresh(&unknown), Some(Freshness::Fresh));
        // Invalid: Cache-Control applies (no-store).
        for invalid in [
            "max-age=10000, &&&&&",
            "max-age=\"10000\"",
            "max-age =100",
            "max-age=-1",
        ] {
            let h = [
                ("cache-control", "no-store"),
                ("cdn-cache-control", invalid),
            ];
            assert_eq!(fresh(&h), None, "{invalid}");
        }
    }

    #[test]
    fn s_maxage_beats_max_age_and_age_counts() {
        let now = SystemTime::now();
        let m = store(
            &req(&[]),
            &resp(
                200,
                &[
                    ("cache-control", "max-age=60, s-maxage=300"),
                    ("age", "100"),
                ],
            ),
            now,
        )
        .unwrap();
        assert_eq!(ttl(&m, now), Duration::from_secs(200));
        assert_eq!(freshness(&m, &req(&[]), now), Freshness::Fresh);
        let later = now + Duration::from_secs(201);
        assert_eq!(freshness(&m, &req(&[]), later), Freshness::Stale);
    }

    #[test]
    fn a_response_without_date_is_stored_with_its_receipt_time() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let m = store(
            &req(&[]),
            &resp(200, &[("cache-control", "max-age=60")]),
            now,
        )
        .unwrap();
        assert_eq!(m.headers["date"], "Tue, 14 Nov 2023 22:13:20 GMT");
        let dated = [
            ("cache-control", "max-age=60"),
            ("date", "Mon, 13 Nov 2023 00:00:00 GMT"),
        ];
        let m = store(&req(&[]), &resp(200, &dated), now).unwrap();
        assert_eq!(
            m.headers["date"], "Mon, 13 Nov 2023 00:00:00 GMT",
            "an origin's Date is kept"
        );
    }

    #[test]
    fn not_stored() {
        let now = SystemTime::now();
        for cc in ["no-store", "private", "max-age=0"] {
            assert!(
                store(&req(&[]), &resp(200, &[("cache-control", cc)]), now).is_none(),
                "{cc}"
            );
        }
        assert!(
            store(
                &req(&[]),
                &resp(200, &[("cache-control", "max-age=60"), ("vary", "*")]),
                now
            )
            .is_none()
        );
        assert!(
            store(
                &req(&[]),
                &resp(
                    200,
                    &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]
                ),
                now
            )
            .is_none()
        );
        assert!(
            store(
                &req(&[("authorization", "Bearer x")]),
                &resp(200, &[("cache-control", "max-age=60")]),
                now
            )
            .is_none()
        );
        assert!(
            store(
                &req(&[("cache-control", "no-store")]),
                &resp(200, &[("cache-control", "max-age=60")]),
                now
            )
            .is_none()
        );
    }

    /// A policy built from the response's [`POLICY_FIELDS`] (and Set-Cookie's presence) decides
    /// as one built from the whole response: storability, lifetime, age, and each answer to
    /// `before_request` (fresh, stale, other variant), across the ways a response states its
    /// freshness and requests ask for theirs. Should the crate read another field, a case
    /// here that carries it fails.
    #[test]
    fn a_policy_decides_the_same_from_the_fields_it_keeps() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let date = httpdate::fmt_http_date(t0);
        let day_ago = httpdate::fmt_http_date(t0 - Duration::from_secs(86_400));
        let later = httpdate::fmt_http_date(t0 + Duration::from_secs(600));
        // A Date behind the time the response was received: lifetimes count from it.
        let early = httpdate::fmt_http_date(t0 - Duration::from_secs(300));
        let common: &[(&str, &str)] = &[
            ("content-type", "text/html"),
            ("content-length", "1024"),
            ("server", "origin"),
            ("content-security-policy", "default-src 'self'"),
            ("strict-transport-security", "max-age=63072000"),
            ("warning", "110 - \"stale\""),
            ("www-authenticate", "Basic"),
            ("content-location", "/a.html"),
        ];
        let responses: Vec<(u16, Vec<(&str, &str)>)> = vec![
            (200, vec![("cache-control", "max-age=60")]),
            (
                200,
                vec![("cache-control", "public, s-maxage=30, max-age=5")],
            ),
            (200, vec![("expires", &later), ("date", &date)]),
            (200, vec![("expires", "0"), ("date", &date)]),
            (200, vec![("expires", &later), ("date", &early)]),
            (200, vec![("last-modified", &day_ago), ("date", &early)]),
            (200, vec![("last-modified", &day_ago), ("date", &date)]),
            (200, vec![("last-modified", &day_ago), ("etag", "\"e\"")]),
            (200, vec![("cache-control", "max-age=600"), ("age", "100")]),
            (
                200,
                vec![("cache-control", "max-age=60"), ("vary", "accept-language")],
            ),
            (
                200,
                vec![
                    ("cache-control", "public, max-age=60"),
                    ("set-cookie", "a=b"),
                ],
            ),
            (
                200,
                vec![
                    ("cache-control", "public, immutable"),
                    ("set-cookie", "a=b"),
                ],
            ),
            (
                200,
                vec![("last-modified", &day_ago), ("set-cookie", "a=b")],
            ),
            (
                200,
                vec![("pragma", "no-cache"), ("last-modified", &day_ago)],
            ),
            (200, vec![("cache-control", "no-cache, max-age=60")]),
            (200, vec![("cache-control", "max-age=60, proxy-revalidate")]),
            (200, vec![("cache-control", "max-age=60, must-revalidate")]),
            (404, vec![("date", &date)]),
            (301, vec![("last-modified", &day_ago)]),
            (200, vec![("cache-control", "private, max-age=60")]),
        ];
        let requests: Vec<request::Parts> = vec![
            req(&[]),
            req(&[("cache-control", "max-age=0")]),
            req(&[("cache-control", "max-stale=3600")]),
            req(&[("cache-control", "min-fresh=50")]),
            req(&[("pragma", "no-cache")]),
            req(&[("accept-language", "fr")]),
        ];
        for (status, fields) in &responses {
            let mut all = common.to_vec();
            all.extend(fields.iter().copied());
            let full = resp(*status, &all);
            let preq = policy_request(
                &req(&[("accept-language", "en")]),
                &[HeaderName::from_static("accept-language")],
            );
            let whole = CachePolicy::new_options(&preq, &full, t0, options());
            let kept = stored_policy(&preq, &full, t0);
            let case = format!("{status} {fields:?}");
            assert_eq!(whole.is_storable(), kept.is_storable(), "{case}");
            for after in [0, 20, 40, 100, 1_000, 90_000] {
                let now = t0 + Duration::from_secs(after);
                assert_eq!(
                    whole.time_to_live(now),
                    kept.time_to_live(now),
                    "{case} +{after}s"
                );
                assert_eq!(whole.age(now), kept.age(now), "{case} +{after}s");
                for r in &requests {
                    let decide = |p: &CachePolicy| match p.before_request(r, now) {
                        BeforeRequest::Fresh(_) => "fresh",
                        BeforeRequest::Stale { matches: true, .. } => "stale",
                        BeforeRequest::Stale { matches: false, .. } => "other",
                    };
                    assert_eq!(
                        decide(&whole),
                        decide(&kept),
                        "{case} +{after}s {:?}",
                        r.headers
                    );
                }
            }
        }
    }

    /// The policy keeps one copy of the fields it decides on, not a second copy of every
    /// stored header.
    #[test]
    fn the_policy_keeps_no_second_copy_of_the_headers() {
        let now = SystemTime::now();
        let m = store(
            &req(&[("user-agent", "wrk"), ("accept", "*/*")]),
            &resp(
                200,
                &[
                    ("cache-control", "public, max-age=3600"),
                    ("content-type", "application/x-unusual-type"),
                    (
                        "content-security-policy",
                        "default-src 'self' https://cdn.example",
                    ),
                ],
            ),
            now,
        )
        .unwrap();
        let stored = crate::disk::stored_form(&m);
        let count = |needle: &str| {
            stored
                .windows(needle.len())
                .filter(|w| *w == needle.as_bytes())
                .count()
        };
        assert_eq!(count("application/x-unusual-type"), 1);
        assert_eq!(count("https://cdn.example"), 1);
        assert_eq!(
            count("public, max-age=3600"),
            2,
            "the policy keeps Cache-Control"
        );
    }

    #[test]
    fn stored_with_credentials_when_public_and_no_secrets_persisted() {
        let now = SystemTime::now();
        let m = store(
            &req(&[
                ("authorization", "Bearer secret"),
                ("cookie", "session=secret"),
            ]),
            &resp(
                200,
                &[
                    ("cache-control", "public, max-age=60"),
                    ("set-cookie", "session=secret-cookie"),
                ],
            ),
            now,
        )
        .unwrap();
        let stored = String::from_utf8_lossy(&crate::disk::stored_form(&m)).into_owned();
        assert!(!stored.contains("secret"), "{stored}");
        assert!(!m.headers.contains_key("set-cookie"));
    }

    #[test]
    fn no_cache_is_stored_but_always_stale_and_unknown_directives_ignored() {
        let now = SystemTime::now();
        let m = store(
            &req(&[]),
            &resp(
                200,
                &[("cache-control", "no-cache, max-age=60"), ("etag", "\"a\"")],
            ),
            now,
        )
        .unwrap();
        assert_eq!(freshness(&m, &req(&[]), now), Freshness::Stale);
        let m = store(
            &req(&[]),
            &resp(200, &[("cache-control", "max-age=60, nothing-to-see-here")]),
            now,
        )
        .unwrap();
        assert_eq!(freshness(&m, &req(&[]), now), Freshness::Fresh);
    }

    #[test]
    fn heuristic_freshness_only_for_heuristically_cacheable_codes() {
        let now = SystemTime::now();
        let lm = httpdate::fmt_http_date(now - Duration::from_secs(1000));
        let date = httpdate::fmt_http_date(now);
        let m = store(
            &req(&[]),
            &resp(200, &[("last-modified", &lm), ("date", &date)]),
            now,
        )
        .unwrap();
        let t = ttl(&m, now).as_secs();
        assert!((99..=100).contains(&t), "{t}");
        assert!(store(&req(&[]), &resp(302, &[("last-modified", &lm)]), now).is_none());
    }

    #[test]
    fn an_expires_spaced_against_the_date_grammar_means_expired() {
        let now = SystemTime::now();
        for (expires, expected) in [
            ("Thu, 18  Aug  2050 02:01:18 GMT", Freshness::Stale),
            ("Thu, 18 Aug 2050 02:01:18 GMT", Freshness::Fresh),
            ("THU, 18 Aug 2050 02:01:18 GMT", Freshness::Fresh),
        ] {
            let m = store(
                &req(&[]),
                &resp(200, &[("expires", expires), ("etag", "\"a\"")]),
                now,
            )
            .unwrap();
            assert_eq!(freshness(&m, &req(&[]), now), expected, "{expires}");
        }
    }

    #[test]
    fn age_counts_by_its_first_member_and_directives_are_case_insensitive() {
        let now = SystemTime::now();
        // RFC 9111 §5.1: the first member of a list counts; an invalid Age is ignored (the
        // response is as fresh as its max-age says); a valid old one makes it stale.
        for (age, expected) in [
            ("abc", Freshness::Fresh),
            ("-7200", Freshness::Fresh),
            ("1.5", Freshness::Fresh),
            ("0, 7200", Freshness::Fresh),
            ("7200, 0", Freshness::Stale),
            ("7200", Freshness::Stale),
            ("2147483648", Freshness::Stale),
        ] {
            let m = store(
                &req(&[]),
                &resp(
                    200,
                    &[
                        ("cache-control", "max-age=3600"),
                        ("age", age),
                        ("etag", "\"a\""),
                    ],
                ),
                now,
            )
            .unwrap();
            assert_eq!(freshness(&m, &req(&[]), now), expected, "{age}");
        }
        let m = store(
            &req(&[]),
            &resp(
                200,
                &[
                    ("cache-control", "max-age=10000, No-CaChE"),
                    ("etag", "\"a\""),
                ],
            ),
            now,
        )
        .unwrap();
        assert_eq!(freshness(&m, &req(&[]), now), Freshness::Stale);
    }

    #[test]
    fn surrogate_control_targets_us() {
        let now = SystemTime::now();
        let m = store(
            &req(&[]),
            &resp(
                200,
                &[
                    ("cache-control", "no-store"),
                    ("surrogate-control", "max-age=100;outpost"),
                ],
            ),
            now,
        )
        .unwrap();
        assert_eq!(ttl(&m, now), Duration::from_secs(100));
        assert!(
            store(
                &req(&[]),
                &resp(
                    200,
                    &[
                        ("cache-control", "max-age=100"),
                        ("surrogate-control", "no-store")
                    ]
                ),
                now
            )
            .is_none()
        );
        assert!(
            store(
                &req(&[]),
                &resp(200, &[("surrogate-control", "max-age=100;other")]),
                now
            )
            .is_none()
        );
    }

    #[test]
    fn negative_ttl_only_for_errors_without_their_own_freshness() {
        let opts = AdmitOptions {
            negative: Arc::new(NegativeTtl::new([
                (404, false, Duration::from_secs(30)),
                (500, true, Duration::from_secs(2)),
            ])),
            ..AdmitOptions::default()
        };
        let now = SystemTime::now();
        let admit = |status: u16, cc: Option<&str>| {
            let mut b = http::Response::builder().status(status);
            if let Some(cc) = cc {
                b = b.header("cache-control", cc);
            }
            let resp = b.body(()).unwrap().into_parts().0;
            match admit(&req(&[]), &resp, "k", now, &opts) {
                Admission::Store(m) => Some(m.policy.time_to_live(now).as_secs()),
                Admission::Pass(_) => None,
            }
        };
        assert_eq!(admit(404, None), Some(30));
        assert_eq!(admit(503, None), Some(2));
        assert_eq!(admit(502, Some("public")), Some(2));
        assert_eq!(
            admit(410, None),
            None,
            "not configured: stored only as HTTP allows"
        );
        assert_eq!(
            admit(404, Some("max-age=5")),
            Some(5),
            "its own freshness wins"
        );
        assert_eq!(admit(404, Some("no-store")), None);
        assert_eq!(admit(503, Some("private")), None);
        assert_eq!(admit(200, None), None, "not an error");
        // A versioned URL's lifetime is not given to its 404.
        let versioned = AdmitOptions {
            default_ttl: Some(Duration::from_secs(86400)),
            ..AdmitOptions::default()
        };
        let resp = http::Response::builder()
            .status(404)
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert!(matches!(
            admit_with(&resp, &versioned, now),
            Admission::Pass(_)
        ));
    }

    fn admit_with(resp: &response::Parts, opts: &AdmitOptions, now: SystemTime) -> Admission {
        admit(&req(&[]), resp, "k", now, opts)
    }

    #[test]
    fn versioned_default_ttl_only_without_explicit_freshness() {
        let now = SystemTime::now();
        let opts = AdmitOptions {
            surrogate: "outpost".into(),
            default_ttl: Some(Duration::from_secs(86400)),
            targeted: crate::default_targeted_cache_control(),
            stale_on_error: Duration::ZERO,
            negative: Default::default(),
        };
        let admit_with = |h: &[(&str, &str)]| match admit(&req(&[]), &resp(200, h), "k", now, &opts)
        {
            Admission::Store(m) => Some(ttl(&m, now).as_secs()),
            Admission::Pass(_) => None,
        };
        assert_eq!(admit_with(&[("etag", "\"a\"")]), Some(86400));
        assert_eq!(admit_with(&[("cache-control", "public")]), Some(86400));
        assert_eq!(admit_with(&[("cache-control", "max-age=5")]), Some(5));
        assert_eq!(admit_with(&[("cache-control", "no-store")]), None);
    }

    #[test]
    fn must_understand() {
        let now = SystemTime::now();
        assert!(
            store(
                &req(&[]),
                &resp(599, &[("cache-control", "max-age=60, must-understand")]),
                now
            )
            .is_none()
        );
        assert!(
            store(
                &req(&[]),
                &resp(
                    200,
                    &[("cache-control", "max-age=60, must-understand, no-store")]
                ),
                now
            )
            .is_some()
        );
    }

    #[test]
    fn any_final_status_with_explicit_freshness_is_stored() {
        let now = SystemTime::now();
        for code in [299, 400, 500, 503, 599] {
            let m = store(
                &req(&[]),
                &resp(code, &[("cache-control", "max-age=60")]),
                now,
            )
            .unwrap_or_else(|| panic!("{code} not stored"));
            assert_eq!(m.status.as_u16(), code);
            assert_eq!(freshness(&m, &req(&[]), now), Freshness::Fresh);
        }
        // Without explicit freshness, not.
        assert!(store(&req(&[]), &resp(500, &[("etag", "\"a\"")]), now).is_none());
    }

    #[test]
    fn request_directives() {
        let now = SystemTime::now();
        let m = store(
            &req(&[]),
            &resp(200, &[("cache-control", "max-age=100")]),
            now,
        )
        .unwrap();
        let later = now + Duration::from_secs(50);
        assert_eq!(
            freshness(&m, &req(&[("cache-control", "max-age=10")]), later),
            Freshness::Stale
        );
        assert_eq!(
            freshness(&m, &req(&[("cache-control", "min-fresh=60")]), later),
            Freshness::Stale
        );
        let stale = now + Duration::from_secs(130);
        assert_eq!(
            freshness(&m, &req(&[("cache-control", "max-stale=60")]), stale),
            Freshness::Fresh
        );
        assert_eq!(
            freshness(&m, &req(&[("cache-control", "no-cache")]), now),
            Freshness::Stale
        );
    }

    #[test]
    fn stale_windows_and_must_revalidate() {
        let now = SystemTime::now();
        let m = store(
            &req(&[]),
            &resp(
                200,
                &[(
                    "cache-control",
                    "max-age=10, stale-while-revalidate=30, stale-if-error=300",
                )],
            ),
            now,
        )
        .unwrap();
        let t = now + Duration::from_secs(20);
        assert!(within_swr(&m, &HeaderMap::new(), t));
        assert!(!within_swr(
            &m,
            &HeaderMap::new(),
            now + Duration::from_secs(60)
        ));
        assert!(within_sie(
            &m,
            &HeaderMap::new(),
            now + Duration::from_secs(200)
        ));
        let m = store(
            &req(&[]),
            &resp(
                200,
                &[(
                    "cache-control",
                    "max-age=10, must-revalidate, stale-if-error=300",
                )],
            ),
            now,
        )
        .unwrap();
        assert!(!within_sie(&m, &HeaderMap::new(), t));
    }

    #[test]
    fn not_modified_updates_headers() {
        let now = SystemTime::now();
        let m = store(
            &req(&[]),
            &resp(
                200,
                &[
                    ("cache-control", "max-age=1"),
                    ("etag", "\"v1\""),
                    ("x-a", "1"),
                    ("x-a", "2"),
                    ("content-length", "5"),
                ],
            ),
            now,
        )
        .unwrap();
        let later = now + Duration::from_secs(10);
        let nm = resp(
            304,
            &[
                ("cache-control", "max-age=3600"),
                ("etag", "\"v1\""),
                ("x-b", "new"),
                ("content-length", "0"),
            ],
        );
        let u = apply_not_modified(&m, &req(&[]), &nm, later, &AdmitOptions::default()).unwrap();
        assert_eq!(u.headers["cache-control"], "max-age=3600");
        assert_eq!(u.headers["x-b"], "new");
        assert_eq!(u.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(u.headers["content-length"], "5");
        assert_eq!(u.status, StatusCode::OK);
        assert_eq!(freshness(&u, &req(&[]), later), Freshness::Fresh);
        // A 304 never changes the stored validator.
        let other = resp(304, &[("etag", "\"v2\"")]);
        let u = apply_not_modified(&m, &req(&[]), &other, later, &AdmitOptions::default()).unwrap();
        assert_eq!(u.headers["etag"], "\"v1\"");
    }

    #[test]
    fn a_304_without_date_dates_the_update_and_expires_counts_from_it() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let dated = [
            ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
            ("expires", "Tue, 14 Nov 2023 22:14:20 GMT"),
            ("etag", "\"v1\""),
        ];
        let m = store(&req(&[]), &resp(200, &dated), t0).unwrap();
        assert_eq!(ttl(&m, t0), Duration::from_secs(60));
        // Revalidated two minutes later by a 304 that has no Date and moves Expires on.
        let later = t0 + Duration::from_secs(120);
        let nm = resp(304, &[("expires", "Tue, 14 Nov 2023 22:16:20 GMT")]);
        let u = apply_not_modified(&m, &req(&[]), &nm, later, &AdmitOptions::default()).unwrap();
        assert_eq!(u.headers["date"], "Tue, 14 Nov 2023 22:15:20 GMT");
        assert_eq!(
            ttl(&u, later),
            Duration::from_secs(60),
            "Expires minus the 304's time"
        );
    }
}
