//! Property tests of the parsers that read hostile input: the request normaliser and cache
//! key, the request phase's checks and upstream head, Cache-Control and Surrogate-Key, Range,
//! and the config loader. Each runs a bounded number of cases (CI included) and fails with a
//! shrunk counter-example.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};
use proptest::prelude::*;

use crate::cache::cache_control::Directives;
use crate::cache::key::{KeyOptions, NormalizedRequest, key_text};
use crate::proxy::forward::{self, ForwardPolicy, Hop};
use crate::proxy::request::{self, RequestLimits};
use crate::proxy::respond::{RangeSpec, parse_range};
use outpost_http::headers::DANGEROUS_FORWARDING;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A host name of DNS labels.
fn host() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", 1..4).prop_map(|l| l.join("."))
}

/// Query parameters `name=value`.
fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec(("[a-z]{1,5}", "[a-zA-Z0-9%]{0,6}"), 0..6)
}

fn headers_of(pairs: &[(String, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(n, v);
        }
    }
    h
}

proptest! {
    #![proptest_config(config())]

    /// Spellings of one host (case, a trailing dot, the default port) and any order of the
    /// query's parameters give one key; the normalised Host is the key's host.
    #[test]
    fn one_key_per_resource(
        host in host(),
        path in "(/[a-zA-Z0-9._~-]{0,8}){1,4}",
        params in params(),
        upper in any::<bool>(),
        dot in any::<bool>(),
        port in any::<bool>(),
    ) {
        let q: Vec<String> = params.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let mut shuffled = q.clone();
        shuffled.sort_by(|a, b| b.split('=').next().cmp(&a.split('=').next()));
        let target = |q: &[String]| {
            if q.is_empty() { path.clone() } else { format!("{path}?{}", q.join("&")) }
        };
        let mut spelled = if upper { host.to_ascii_uppercase() } else { host.clone() };
        if dot { spelled.push('.'); }
        if port { spelled.push_str(":80"); }
        let key = |h: &str, t: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::HOST, HeaderValue::from_str(h).unwrap());
            NormalizedRequest::new(&Method::GET, &t.parse::<Uri>().unwrap(), &headers, &KeyOptions::default())
        };
        let a = key(&host, &target(&q)).unwrap();
        let b = key(&spelled, &target(&shuffled)).unwrap();
        prop_assert_eq!(&a.key, &b.key);
        prop_assert_eq!(a.parts.headers.get(http::header::HOST).unwrap().to_str().unwrap(), host.as_str());
        let prefix = format!("{host}/");
        prop_assert!(a.key.as_str().starts_with(&prefix));
    }

    /// Whatever the Host field holds, the key is built or refused (never a panic), and a key
    /// never carries userinfo, whitespace or a port-less trailing dot.
    #[test]
    fn any_host_is_keyed_or_refused(raw in proptest::collection::vec(any::<u8>(), 0..40)) {
        let Ok(v) = HeaderValue::from_bytes(&raw) else { return Ok(()) };
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, v);
        if let Ok(text) = key_text(&Uri::from_static("/"), &h, &KeyOptions::default()) {
            let host = &text[..text.find('/').unwrap()];
            prop_assert!(!host.contains('@'));
            prop_assert!(!host.bytes().any(|b| b.is_ascii_whitespace()));
            prop_assert!(!host.ends_with('.'));
            prop_assert!(!host.is_empty());
        }
    }

    /// The upstream head carries exactly one Host, the key's; no framing, hop-by-hop or
    /// rewriting field; and every other client field unchanged.
    #[test]
    fn upstream_heads_carry_only_chosen_fields(
        host in host(),
        fields in proptest::collection::vec(
            (prop_oneof![
                Just("content-length".to_string()),
                Just("transfer-encoding".to_string()),
                Just("connection".to_string()),
                Just("keep-alive".to_string()),
                Just("te".to_string()),
                Just("upgrade".to_string()),
                Just("host".to_string()),
                Just("expect".to_string()),
                proptest::sample::select(DANGEROUS_FORWARDING.to_vec()).prop_map(str::to_string),
                "x-[a-z]{1,8}",
                Just("accept".to_string()),
            ], "[a-zA-Z0-9 ,=/-]{0,12}"),
            0..12,
        ),
    ) {
        let client_headers = headers_of(&fields);
        let mut b = http::Request::builder().method("GET").uri(format!("http://{host}/p"));
        *b.headers_mut().unwrap() = client_headers.clone();
        let (parts, ()) = b.body(()).unwrap().into_parts();
        let norm = NormalizedRequest::new(&parts.method, &parts.uri, &parts.headers, &KeyOptions::default()).unwrap();
        let via = HeaderValue::from_static("1.1 t");
        let hop = Hop {
            via: &via,
            surrogate_capability: &via,
            client: crate::proxy::Client { addr: "127.0.0.1:1".parse().unwrap(), tls: false },
            sets_forwarded_proto: true,
        };
        let up = forward::upstream_head(&parts, &norm, &ForwardPolicy::new(&[], &[]), &hop);
        prop_assert_eq!(up.headers.get_all(http::header::HOST).iter().count(), 1);
        prop_assert_eq!(up.headers.get(http::header::HOST).unwrap().to_str().unwrap(), host.as_str());
        let named: Vec<String> = client_headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        for (name, _) in &up.headers {
            let n = name.as_str();
            prop_assert!(!matches!(n, "content-length" | "transfer-encoding" | "connection" | "keep-alive" | "te" | "upgrade" | "expect"), "{} forwarded", n);
            prop_assert!(!DANGEROUS_FORWARDING.contains(&n), "{} forwarded", n);
            prop_assert!(!named.iter().any(|m| m == n) || n == "host", "{} named by Connection but forwarded", n);
        }
        for (name, value) in &client_headers {
            let n = name.as_str();
            if n.starts_with("x-") && !DANGEROUS_FORWARDING.contains(&n) && !named.iter().any(|m| m == n)
                && n != "x-forwarded-for" && n != "x-forwarded-proto" {
                prop_assert!(up.headers.get_all(name).iter().any(|v| v == value), "{} dropped", n);
            }
        }
    }

    /// The request checks never panic, and anything accepted has at most one Host.
    #[test]
    fn request_checks_are_total(
        method in prop_oneof![Just("GET"), Just("HEAD"), Just("POST"), Just("TRACE"), Just("PURGE")],
        h2 in any::<bool>(),
        body in any::<bool>(),
        hosts in proptest::collection::vec("[a-zA-Z0-9.:@-]{0,12}", 0..3),
        expect in proptest::option::of("[a-z0-9-]{0,14}"),
    ) {
        let mut b = http::Request::builder()
            .method(method)
            .uri(if h2 { "http://a.test/x" } else { "/x" })
            .version(if h2 { Version::HTTP_2 } else { Version::HTTP_11 });
        for h in &hosts {
            b = b.header("host", h.as_str());
        }
        if let Some(e) = &expect {
            b = b.header("expect", e.as_str());
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        if request::check(&parts, body, RequestLimits::default()).is_ok() {
            prop_assert!(hosts.len() <= 1);
            prop_assert!(method != "TRACE");
            prop_assert!(!(body && (method == "GET" || method == "HEAD")));
            prop_assert!(expect.as_deref().is_none_or(|e| e == "100-continue"));
        }
    }

    /// Cache-Control: any field value parses; delta-seconds come back as written.
    #[test]
    fn cache_control_parses_anything(raw in "[ -~]{0,60}", secs in 0u64..1_000_000_000) {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&raw) {
            h.append(http::header::CACHE_CONTROL, v);
        }
        h.append(http::header::CACHE_CONTROL, HeaderValue::from_str(&format!("stale-if-error={secs}")).unwrap());
        let d = Directives::parse(&h);
        let _ = d.to_header();
        prop_assert!(d.has("stale-if-error"));
        if !raw.to_ascii_lowercase().contains("stale-if-error") {
            prop_assert_eq!(d.seconds("stale-if-error"), Some(std::time::Duration::from_secs(secs)));
        }
    }

    /// Surrogate-Key / Cache-Tag: tags are non-empty, unique, sorted, and hold no separator.
    #[test]
    fn tags_are_clean(sk in "[ -~]{0,60}", ct in "[ -~]{0,60}") {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&sk) { h.insert("surrogate-key", v); }
        if let Ok(v) = HeaderValue::from_str(&ct) { h.insert("cache-tag", v); }
        let tags = crate::cache::meta::tags_of(&h);
        for w in tags.windows(2) {
            prop_assert!(w[0] < w[1]);
        }
        for t in &tags {
            prop_assert!(!t.is_empty());
            prop_assert!(!t.contains(' '));
            prop_assert!(!t.starts_with(',') || sk.contains(t.as_str()));
        }
    }

    /// Range: a satisfiable range lies inside the representation; nothing panics.
    #[test]
    fn ranges_stay_inside(raw in "(bytes|items)=[0-9]{0,20}-[0-9]{0,20}(,[0-9]{0,3}-[0-9]{0,3})?", total in 0u64..u64::MAX) {
        if let RangeSpec::Satisfiable(first, last) = parse_range(raw.as_bytes(), total) {
            prop_assert!(first <= last);
            prop_assert!(last < total);
        }
    }

    /// The config loader answers any value of any [limits] field with a config or a list of
    /// errors naming the field, never a panic.
    #[test]
    fn config_values_are_checked(
        field in proptest::sample::select(vec![
            "header_read_timeout", "max_header_size", "upstream_max_connections",
            "idle_timeout", "max_connections", "max_uri_size", "upstream_body_timeout",
            "origin_breaker_failures", "stale_if_error_wait",
        ]),
        value in prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            "\"[0-9a-zA-Z .]{0,10}\"",
            Just("true".to_string()),
        ],
    ) {
        let text = format!("listen = \"127.0.0.1:0\"\norigin = \"http://127.0.0.1:1\"\n[limits]\n{field} = {value}\n");
        let src = outpost_config::Source::inline("prop.toml", text);
        if let Err(e) = crate::EdgeConfig::from_source(&src, crate::EdgeOverrides::default()) {
            let msg = e.to_string();
            prop_assert!(msg.contains(field) || msg.contains("prop.toml"), "{}", msg);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// `--memory` is shared out, never exceeded, and the fill budget takes the largest object
    /// the memory tier accepts twice over (up to its cap). The memory tier gets half of it, or
    /// a quarter beside a disk tier (whose index takes a quarter, its held metadata and page
    /// caches another, and the floors of its shares more at small sizes: 8 MiB is the worst).
    #[test]
    fn memory_shares_stay_within_memory(memory in (8u64 << 20)..(1u64 << 40), disk in any::<bool>()) {
        let s = crate::cache::MemoryShares::of(memory, disk);
        let total = s.tier
            + s.disk_index
            + 4 * s.held_meta
            + s.memory_fills
            + s.disk_queue
            + s.disk_reads;
        prop_assert!(total <= memory, "{:?} sums to {} for {}", s, total, memory);
        prop_assert!(s.memory_fills >= (2 * (s.tier / 8)).min(256 << 20), "{:?}", s);
        prop_assert!(s.tier >= memory / if disk { 4 } else { 2 }, "{:?}", s);
        prop_assert_eq!(s.disk_index > 0, disk);
    }
}
