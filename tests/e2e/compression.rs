//! End-to-end tests of compression (issue "Compression: gzip and brotli negotiated per request,
//! compressed variants cached once"): a real `EdgeServer` on 127.0.0.1:0 in front of either the
//! repo's `site/` served by `OriginServer` (text files, strong ETags) or a tiny in-test origin
//! for the cases a static site cannot produce (precompressed bodies, a zip bomb, no-transform,
//! a body without Content-Length).
//!
//! The reqwest client is built without automatic decompression (its gzip/brotli features are
//! off), so the raw bytes arrive and every test decodes them itself with flate2 / brotli.
//! "No compression happened" is proved with the edge's `CompressionStats` counters.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG,
    HeaderMap, HeaderValue, IF_NONE_MATCH, RANGE, VARY,
};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::support::edge::{self, CompressionSnapshot, CompressionStats, PurgeSpec, config};
use crate::support::files::{files_under, rewrite_in_place};
use crate::support::site::SiteOrigin;
use crate::support::{client_within, repo};

/// Upper bound of every poll loop.
const WAIT: Duration = Duration::from_secs(20);

fn site_file(path: &str) -> Vec<u8> {
    std::fs::read(repo().join("site").join(path.trim_start_matches('/')))
        .unwrap_or_else(|e| panic!("site file {path}: {e}"))
}

/// Deterministic, compressible text of `len` bytes.
fn text(len: usize) -> Vec<u8> {
    let words = [
        "edge ", "cache ", "origin ", "vary ", "fresh ", "stale ", "purge ",
    ];
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0usize;
    while out.len() < len {
        out.extend_from_slice(words[(i * 5 + i / 7) % words.len()].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// `len` pseudo-random lowercase letters: text that compresses poorly.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn brotli(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let params = brotli::enc::BrotliEncoderParams {
        quality: 5,
        ..Default::default()
    };
    brotli::BrotliCompress(&mut &data[..], &mut out, &params).unwrap();
    out
}

/// Decodes a response body by its Content-Encoding (none: as is).
fn decode(headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match headers.get(CONTENT_ENCODING).map(|v| v.to_str().unwrap()) {
        None => out.extend_from_slice(body),
        Some("gzip") => {
            flate2::read::MultiGzDecoder::new(body)
                .read_to_end(&mut out)
                .expect("valid gzip");
        }
        Some("br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .expect("valid brotli");
        }
        Some(other) => panic!("unexpected Content-Encoding {other}"),
    }
    out
}

fn header(h: &HeaderMap, name: impl http::header::AsHeaderName) -> Option<&str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

fn varies_on_accept_encoding(h: &HeaderMap) -> bool {
    h.get_all(VARY)
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .any(|n| n.trim().eq_ignore_ascii_case("accept-encoding"))
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// The repo's site/ with configs/origin-rules.toml; dropping the origin stops it.
async fn site_origin() -> (SocketAddr, SiteOrigin) {
    let origin = SiteOrigin::sample_site().await;
    (origin.addr, origin)
}

const BOMB_LEN: usize = 32 << 20;
const PRE_NOISE_LEN: usize = 300 << 10;

/// A tiny origin for what a static site cannot send. Every response is cacheable text.
/// - `/nt.txt`: 8 KiB with `Cache-Control: no-transform`
/// - `/pre.txt`, `/pre-br.txt`: 8 KiB sent gzip / br encoded, with `Vary: Accept-Encoding`
/// - `/pre-noise.txt`: [`PRE_NOISE_LEN`] of random letters sent gzip encoded, without Vary
///   (one stored copy for every client): over 128 KiB encoded, so the disk tier streams it,
///   and under the stream threshold, so an identity-only client's copy is decoded whole
/// - `/bomb.txt`: 32 MiB of zeros, gzip encoded (about 32 KiB on the wire)
/// - `/chunked.txt`: 64 KiB without Content-Length; `/large.txt`: the same with one
/// - `/noise.txt`: 4 MiB of random letters, above the stream threshold, so it streams through
///   an encoder, and its encoded form is nearly as large (it does not fit socket buffers)
/// - `/wide-br.txt`: 64 KiB sent br encoded with brotli's largest window (16 MiB);
///   `/large-window-br.txt`: the same with the large-window extension (not a br coding)
async fn tiny_origin() -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let bomb = Bytes::from(gzip(&vec![0u8; BOMB_LEN]));
    let (stop, mut stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = &mut stopped => break,
                r = listener.accept() => match r {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
            };
            let bomb = bomb.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let resp = tiny_response(req.uri().path(), &bomb);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, stop)
}

type TinyBody = BoxBody<Bytes, std::io::Error>;

fn tiny_response(path: &str, bomb: &Bytes) -> Response<TinyBody> {
    let full = |b: Vec<u8>| -> TinyBody {
        Full::new(Bytes::from(b))
            .map_err(|never| match never {})
            .boxed()
    };
    let mut cache_control = "public, max-age=600";
    let mut encoding = None;
    let mut vary = true;
    let body = match path {
        "/nt.txt" => {
            cache_control = "public, max-age=600, no-transform";
            full(text(8 << 10))
        }
        "/pre.txt" => {
            encoding = Some("gzip");
            full(gzip(&text(8 << 10)))
        }
        "/pre-br.txt" => {
            encoding = Some("br");
            full(brotli(&text(8 << 10)))
        }
        "/pre-noise.txt" => {
            encoding = Some("gzip");
            vary = false;
            full(gzip(&noise(PRE_NOISE_LEN)))
        }
        "/bomb.txt" => {
            encoding = Some("gzip");
            Full::new(bomb.clone())
                .map_err(|never| match never {})
                .boxed()
        }
        "/large.txt" => full(text(64 << 10)),
        "/noise.txt" => full(noise(4 << 20)),
        "/wide-br.txt" | "/large-window-br.txt" => {
            encoding = Some("br");
            let params = brotli::enc::BrotliEncoderParams {
                quality: 5,
                lgwin: 24,
                large_window: path == "/large-window-br.txt",
                ..Default::default()
            };
            let mut out = Vec::new();
            brotli::BrotliCompress(&mut &text(64 << 10)[..], &mut out, &params).unwrap();
            full(out)
        }
        "/chunked.txt" => {
            let data = Bytes::from(text(64 << 10));
            let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..data.len())
                .step_by(4096)
                .map(|at| Ok(Frame::data(data.slice(at..data.len().min(at + 4096)))))
                .collect();
            BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)))
        }
        _ => {
            let mut r = Response::new(full(b"not found\n".to_vec()));
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static(cache_control));
    h.insert(ETAG, HeaderValue::from_static("\"tiny-1\""));
    if let Some(e) = encoding {
        h.insert(CONTENT_ENCODING, HeaderValue::from_static(e));
        if vary {
            h.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        }
    }
    r
}

/// A running edge and its compression counters; dropping it stops the server.
struct Edge {
    inner: edge::Edge,
    stats: Arc<CompressionStats>,
    _dir: Option<tempfile::TempDir>,
}

impl std::ops::Deref for Edge {
    type Target = edge::Edge;
    fn deref(&self) -> &edge::Edge {
        &self.inner
    }
}

impl Edge {
    /// An edge in front of `origin`; `extra` is appended to its edge.toml (sections).
    async fn start(origin: SocketAddr, extra: &str) -> Edge {
        Edge::start_with(origin, extra, None).await
    }

    async fn start_with(origin: SocketAddr, extra: &str, dir: Option<tempfile::TempDir>) -> Edge {
        let text = format!(
            "listen = \"127.0.0.1:0\"\norigin = \"http://{origin}\"\n{cache}{extra}",
            cache = match &dir {
                Some(d) => format!(
                    "[cache]\ndir = {:?}\nmemory = \"4KiB\"\n",
                    d.path().display().to_string()
                ),
                None => String::new(),
            }
        );
        let cfg = config("edge-compression.toml", text);
        let stats = cfg.compression.stats.clone();
        Edge {
            inner: edge::Edge::start(cfg).await,
            stats,
            _dir: dir,
        }
    }

    fn stats(&self) -> CompressionSnapshot {
        self.stats.snapshot()
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&CompressionSnapshot) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(&self.stats()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// No proxy from the environment (as every client here), and automatic decompression is off
/// (reqwest is built without its gzip / brotli features).
fn client() -> reqwest::Client {
    client_within(WAIT)
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Got {
    fn decoded(&self) -> Vec<u8> {
        decode(&self.headers, &self.body)
    }

    fn coding(&self) -> Option<&str> {
        header(&self.headers, CONTENT_ENCODING)
    }

    fn x_cache(&self) -> &str {
        header(&self.headers, "x-cache").unwrap_or("-")
    }
}

async fn send(req: reqwest::RequestBuilder) -> Got {
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("body");
    Got {
        status,
        headers,
        body,
    }
}

async fn get(c: &reqwest::Client, url: &str, ae: Option<&str>) -> Got {
    let mut req = c.get(url);
    if let Some(ae) = ae {
        req = req.header(ACCEPT_ENCODING, ae);
    }
    send(req).await
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn br_gzip_and_identity_decode_to_the_origin_bytes() {
    let (origin, _o) = site_origin().await;
    let edge = Edge::start(origin, "").await;
    let c = client();
    for path in ["/index.html", "/assets/css/style.css", "/about.html"] {
        let want = site_file(path);
        for (ae, coding) in [
            (Some("br"), Some("br")),
            (Some("gzip"), Some("gzip")),
            (None, None),
            (Some("gzip, deflate, br, zstd"), Some("br")),
        ] {
            for round in 0..2 {
                let got = get(&c, &edge.url(path), ae).await;
                assert_eq!(got.status, StatusCode::OK, "{path} {ae:?}");
                assert_eq!(got.coding(), coding, "{path} {ae:?} round {round}");
                assert_eq!(got.decoded(), want, "{path} {ae:?} round {round}");
                assert!(varies_on_accept_encoding(&got.headers), "{path} {ae:?}");
                assert_eq!(
                    header(&got.headers, CONTENT_LENGTH),
                    Some(got.body.len().to_string().as_str()),
                    "{path} {ae:?}: buffered bodies carry their length"
                );
                if coding.is_some() {
                    assert!(got.body.len() < want.len(), "{path} {ae:?} is smaller");
                }
            }
        }
    }
    let s = edge.stats();
    assert!(s.bytes_out < s.bytes_in, "{s:?}");
    // Each path compressed once per coding; every other encoded answer was a variant hit.
    assert_eq!((s.compressed_br, s.compressed_gzip), (3, 3), "{s:?}");
}

#[tokio::test]
async fn q_values_choose_the_coding() {
    let (origin, _o) = site_origin().await;
    let edge = Edge::start(origin, "").await;
    let c = client();
    let want = site_file("/index.html");
    // RFC 9110 §12.5.3: q=0 refuses a coding, `*` covers the unlisted ones. `identity;q=0`
    // with nothing else acceptable still gets identity (a server may send identity rather
    // than 406; see Coding::negotiate and the compress module docs).
    for (ae, coding) in [
        ("gzip;q=0, br", Some("br")),
        ("br;q=0, gzip", Some("gzip")),
        ("br;q=0.5, gzip;q=0.8", Some("gzip")),
        ("br;q=0.9, gzip;q=0.8", Some("br")),
        ("*", Some("br")),
        ("*;q=0", None),
        ("identity;q=0", None),
        ("deflate", None),
        ("identity", None),
    ] {
        let got = get(&c, &edge.url("/index.html"), Some(ae)).await;
        assert_eq!(got.coding(), coding, "Accept-Encoding: {ae}");
        assert_eq!(got.decoded(), want, "Accept-Encoding: {ae}");
    }
}

#[tokio::test]
async fn second_request_is_a_hit_on_the_encoded_variant() {
    let (origin, _o) = site_origin().await;
    let edge = Edge::start(origin, "").await;
    let c = client();
    let url = edge.url("/assets/css/style.css");

    let first = get(&c, &url, Some("br")).await;
    assert_eq!((first.x_cache(), first.coding()), ("MISS", Some("br")));
    assert_eq!(edge.stats().compressed_br, 1);
    edge.wait_for("the br variant stored", |s| s.variants_stored == 1)
        .await;

    // Another spelling of the same bucket, then the same one: both hit the stored variant.
    for ae in ["br", "gzip, deflate, br"] {
        let again = get(&c, &url, Some(ae)).await;
        assert_eq!(
            (again.x_cache(), again.coding()),
            ("HIT", Some("br")),
            "{ae}"
        );
        assert_eq!(
            again.body, first.body,
            "the stored bytes, not a new compression"
        );
    }
    let s = edge.stats();
    assert_eq!(
        s.compressions(),
        1,
        "no new compression on a variant hit: {s:?}"
    );
    assert_eq!(s.variant_hits, 2, "{s:?}");

    // gzip is its own variant: compressed once, then hit.
    let gz = get(&c, &url, Some("gzip")).await;
    assert_eq!((gz.x_cache(), gz.coding()), ("HIT", Some("gzip")));
    edge.wait_for("the gzip variant stored", |s| s.variants_stored == 2)
        .await;
    let gz2 = get(&c, &url, Some("gzip")).await;
    assert_eq!(gz2.body, gz.body);
    let s = edge.stats();
    assert_eq!(
        (s.compressed_br, s.compressed_gzip, s.variant_hits),
        (1, 1, 3),
        "{s:?}"
    );
    assert_eq!(gz2.decoded(), site_file("/assets/css/style.css"));
}

#[tokio::test]
async fn etags_are_weak_on_variants_and_304s_work_for_either() {
    let (origin, _o) = site_origin().await;
    let edge = Edge::start(origin, "").await;
    let c = client();
    let url = edge.url("/index.html");

    // A conditional request that ends as a 304 costs no compression (it is done lazily).
    let identity = get(&c, &url, None).await;
    let strong = header(&identity.headers, ETAG)
        .expect("origin ETag")
        .to_string();
    assert!(
        strong.starts_with('"'),
        "the identity object keeps the strong tag: {strong}"
    );
    let conditional = send(
        c.get(&url)
            .header(ACCEPT_ENCODING, "br")
            .header(IF_NONE_MATCH, &strong),
    )
    .await;
    assert_eq!(conditional.status, StatusCode::NOT_MODIFIED);
    assert_eq!(edge.stats().compressions(), 0);

    let br = get(&c, &url, Some("br")).await;
    let weak = header(&br.headers, ETAG).unwrap().to_string();
    assert_eq!(weak, format!("W/{strong}"));
    let gz = get(&c, &url, Some("gzip")).await;
    assert_eq!(header(&gz.headers, ETAG), Some(weak.as_str()));

    for (ae, tag) in [
        (Some("br"), weak.as_str()),
        (Some("br"), strong.as_str()),
        (Some("gzip"), weak.as_str()),
        (None, weak.as_str()),
        (None, strong.as_str()),
    ] {
        let mut req = c.get(&url).header(IF_NONE_MATCH, tag);
        if let Some(ae) = ae {
            req = req.header(ACCEPT_ENCODING, ae);
        }
        let got = send(req).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED, "{ae:?} {tag}");
        assert!(got.body.is_empty());
        assert!(varies_on_accept_encoding(&got.headers), "{ae:?} {tag}");
        let expect = if ae.is_some() { &weak } else { &strong };
        assert_eq!(
            header(&got.headers, ETAG),
            Some(expect.as_str()),
            "{ae:?} {tag}"
        );
    }
    let other = send(
        c.get(&url)
            .header(ACCEPT_ENCODING, "br")
            .header(IF_NONE_MATCH, "\"something-else\""),
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.decoded(), site_file("/index.html"));
}

#[tokio::test]
async fn ranges_come_from_the_identity_object_and_head_never_compresses() {
    let (origin, _o) = site_origin().await;
    let edge = Edge::start(origin, "").await;
    let c = client();
    let url = edge.url("/index.html");
    let want = site_file("/index.html");

    // HEAD on a miss: identity headers, no compression.
    let head = send(c.head(&url).header(ACCEPT_ENCODING, "br")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.coding(), None);
    assert_eq!(edge.stats().compressions(), 0);

    let ranged = send(
        c.get(&url)
            .header(ACCEPT_ENCODING, "br, gzip")
            .header(RANGE, "bytes=10-109"),
    )
    .await;
    assert_eq!(ranged.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(ranged.coding(), None);
    assert_eq!(&ranged.body[..], &want[10..110]);
    assert_eq!(edge.stats().compressions(), 0);

    // Once the br variant is stored, HEAD gets its headers (still without compressing).
    let br = get(&c, &url, Some("br")).await;
    edge.wait_for("the br variant stored", |s| s.variants_stored == 1)
        .await;
    let head = send(c.head(&url).header(ACCEPT_ENCODING, "br")).await;
    assert_eq!(head.coding(), Some("br"));
    assert_eq!(
        header(&head.headers, CONTENT_LENGTH),
        Some(br.body.len().to_string().as_str())
    );
    assert!(head.body.is_empty());
    assert_eq!(edge.stats().compressions(), 1);
}

#[tokio::test]
async fn no_transform_is_respected() {
    let (origin, _o) = tiny_origin().await;
    let edge = Edge::start(origin, "").await;
    let c = client();
    for _ in 0..2 {
        let got = get(&c, &edge.url("/nt.txt"), Some("br, gzip")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.coding(), None);
        assert_eq!(got.body.as_ref(), text(8 << 10).as_slice());
        assert!(!varies_on_accept_encoding(&got.headers));
    }
    // The request's own no-transform (RFC 9111 §5.2.1.6) is honoured too.
    let got = send(
        c.get(edge.url("/chunked.txt"))
            .header(ACCEPT_ENCODING, "br")
            .header(CACHE_CONTROL, "no-transform"),
    )
    .await;
    assert_eq!(got.coding(), None);
    assert_eq!(got.body.as_ref(), text(64 << 10).as_slice());
    assert_eq!(edge.stats().compressions(), 0);
}

#[tokio::test]
async fn precompressed_origin_bodies_are_never_compressed_twice() {
    let (origin, _o) = tiny_origin().await;
    let edge = Edge::start(origin, "").await;
    let c = client();
    let plain = text(8 << 10);
    let sent_gzip = gzip(&plain);
    let sent_br = brotli(&plain);

    for _ in 0..2 {
        let got = get(&c, &edge.url("/pre.txt"), Some("gzip")).await;
        assert_eq!(got.coding(), Some("gzip"));
        assert_eq!(got.headers.get_all(CONTENT_ENCODING).iter().count(), 1);
        assert_eq!(
            got.body.as_ref(),
            sent_gzip.as_slice(),
            "the origin's bytes as is"
        );
        assert_eq!(header(&got.headers, ETAG), Some("\"tiny-1\""));
    }
    let got = get(&c, &edge.url("/pre-br.txt"), Some("gzip, br")).await;
    assert_eq!(got.coding(), Some("br"));
    assert_eq!(got.body.as_ref(), sent_br.as_slice());

    // Clients that do not accept the origin's coding get it decoded, with a weak tag.
    for ae in [None, Some("br, gzip;q=0")] {
        let got = get(&c, &edge.url("/pre.txt"), ae).await;
        assert_eq!(got.status, StatusCode::OK, "{ae:?}");
        assert_eq!(got.coding(), None, "{ae:?}");
        assert_eq!(got.body.as_ref(), plain.as_slice(), "{ae:?}");
        assert_eq!(header(&got.headers, ETAG), Some("W/\"tiny-1\""));
        assert!(varies_on_accept_encoding(&got.headers));
    }
    let s = edge.stats();
    assert_eq!(s.compressions(), 0, "{s:?}");
    assert_eq!((s.precompressed_served, s.decompressed), (3, 2), "{s:?}");
}

#[tokio::test]
async fn a_zip_bomb_from_the_origin_is_capped() {
    let (origin, _o) = tiny_origin().await;
    // Decoded whole (the bomb is ~32 KiB on the wire, below the stream threshold): a 502.
    let edge = Edge::start(origin, "[compression]\nmax_decompressed_size = \"1MiB\"\n").await;
    let c = client();
    let got = get(&c, &edge.url("/bomb.txt"), None).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(got.body.len() < 4096);
    assert_eq!(edge.stats().decompress_refused, 1);
    // A client that accepts gzip gets the origin's bytes; the edge is unharmed.
    let got = get(&c, &edge.url("/bomb.txt"), Some("gzip")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.coding(), Some("gzip"));
    assert_eq!(got.body.as_ref(), gzip(&vec![0u8; BOMB_LEN]).as_slice());

    // Decoded as a stream: the body stops at the cap.
    let edge = Edge::start(
        origin,
        "[compression]\nmax_decompressed_size = \"1MiB\"\nstream_threshold = \"1KiB\"\n",
    )
    .await;
    let resp = c.get(edge.url("/bomb.txt")).send().await.expect("head");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get(CONTENT_ENCODING).is_none());
    match resp.bytes().await {
        Err(_) => {}
        Ok(b) => assert!(b.len() <= 1 << 20, "{} bytes passed the cap", b.len()),
    }
    edge.wait_for("the refusal counted", |s| s.decompress_refused == 1)
        .await;
    let ok = get(&c, &edge.url("/pre.txt"), None).await;
    assert_eq!(ok.body.as_ref(), text(8 << 10).as_slice());
}

#[tokio::test]
async fn large_and_unknown_length_bodies_stream_through_the_encoder() {
    let (origin, _o) = tiny_origin().await;
    let edge = Edge::start(origin, "[compression]\nstream_threshold = \"16KiB\"\n").await;
    let c = client();
    let want = text(64 << 10);

    // Unknown length: compressed as it streams.
    let chunked = get(&c, &edge.url("/chunked.txt"), Some("br")).await;
    assert_eq!(chunked.coding(), Some("br"));
    assert!(chunked.headers.get(CONTENT_LENGTH).is_none(), "streamed");
    assert_eq!(chunked.decoded(), want);

    // Above the threshold: streamed too, and the variant is stored when the stream ends.
    let first = get(&c, &edge.url("/large.txt"), Some("gzip")).await;
    assert_eq!(first.coding(), Some("gzip"));
    assert!(first.headers.get(CONTENT_LENGTH).is_none(), "streamed");
    assert_eq!(first.decoded(), want);
    edge.wait_for("the streamed variant stored", |s| s.variants_stored >= 2)
        .await;
    let second = get(&c, &edge.url("/large.txt"), Some("gzip")).await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.body, first.body);
    assert_eq!(
        header(&second.headers, CONTENT_LENGTH),
        Some(first.body.len().to_string().as_str())
    );
    let s = edge.stats();
    assert_eq!(
        (s.compressed_br, s.compressed_gzip, s.variant_hits),
        (1, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.bytes_in, 2 * want.len() as u64);
    assert_eq!(s.bytes_out, (chunked.body.len() + first.body.len()) as u64);
}

#[tokio::test]
async fn variants_live_on_disk_and_a_purge_removes_every_variant() {
    let (origin, _o) = site_origin().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // A 4 KiB memory tier holds no body: every variant is read from the disk tier.
    let edge = Edge::start_with(origin, "", Some(dir)).await;
    let c = client();
    let url = edge.url("/index.html");
    let want = site_file("/index.html");
    let disk_objects = |e: &Edge| e.engine().usage()[1].1;

    let first = get(&c, &url, Some("br")).await;
    assert_eq!(first.decoded(), want);
    let deadline = tokio::time::Instant::now() + WAIT;
    while disk_objects(&edge) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "identity + br on disk"
        );
        edge.engine().run_pending_tasks().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hit = get(&c, &url, Some("br")).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.body, first.body);
    assert_eq!(edge.stats().compressions(), 1);

    edge.engine()
        .purge(&PurgeSpec {
            urls: vec!["/index.html".into()],
            ..Default::default()
        })
        .await
        .expect("purge");
    edge.engine().run_pending_tasks().await;
    assert_eq!(disk_objects(&edge), 0, "identity and br variant both gone");
    let after = get(&c, &url, Some("br")).await;
    assert_eq!(after.x_cache(), "MISS");
    assert_eq!(after.decoded(), want);
    assert_eq!(edge.stats().compressions(), 2);
}

/// A client that asks for `/noise.txt` in brotli and reads nothing: its response's encoder
/// (~10 MiB, estimated) is held until it goes. Returns once the encoder has started.
async fn stalled_brotli_client(edge: &Edge, started: u64) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut tcp = sock.connect(edge.addr).await.expect("connect");
    tcp.write_all(b"GET /noise.txt HTTP/1.1\r\nhost: t\r\naccept-encoding: br\r\n\r\n")
        .await
        .expect("write");
    edge.wait_for("the stalled client's encoder", |s| {
        s.compressed_br == started + 1
    })
    .await;
    tcp
}

/// Retries `path` until its answer passes `done` (the share came back), or fails the test.
async fn eventually_got(
    edge: &Edge,
    c: &reqwest::Client,
    path: &str,
    ae: Option<&str>,
    done: impl Fn(&Got) -> bool,
) -> Got {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = get(c, &edge.url(path), ae).await;
        if done(&got) {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the share never came back: {:?}",
            edge.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Compression holds at most its share of `cache.memory` (16 MiB at the default 256 MiB): a
/// brotli stream's encoder is held while its client does not read, so a second client asking
/// for a brotli stream then gets gzip if it takes it (its encoder is a tenth of brotli's), else
/// identity, counted; once the first client goes, brotli again. Before the share, every client
/// got an encoder of its own.
#[tokio::test]
async fn compression_holds_at_most_its_share_of_memory() {
    let (origin, _o) = tiny_origin().await;
    let edge = Edge::start(origin, "").await;
    let c = client();
    let want = noise(4 << 20);
    let stalled = stalled_brotli_client(&edge, 0).await;
    let got = get(&c, &edge.url("/noise.txt"), Some("br")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.coding(), None, "no room for a second brotli stream");
    assert!(varies_on_accept_encoding(&got.headers));
    assert_eq!(got.body.as_ref(), want.as_slice());
    let s = edge.stats();
    assert_eq!((s.compressed_br, s.skipped_memory), (1, 1), "{s:?}");
    let got = get(&c, &edge.url("/noise.txt"), Some("br, gzip")).await;
    assert_eq!(
        got.coding(),
        Some("gzip"),
        "gzip fits where brotli does not"
    );
    assert_eq!(got.decoded(), want);
    // Its client gone, the stream's encoder is dropped and its share given back.
    drop(stalled);
    let got = eventually_got(&edge, &c, "/noise.txt", Some("br"), |g| {
        g.coding() == Some("br")
    })
    .await;
    assert_eq!(got.decoded(), want);
}

/// A decoding that does not fit what is left of the share gets 503 with a message that says
/// why, and is decoded once there is room: a brotli body declaring brotli's largest window (16
/// MiB, more than the whole share: it runs alone) for a client that does not take br, while a
/// stalled client holds a brotli stream. A large-window brotli body is not a br coding: 502.
#[tokio::test]
async fn a_decoding_that_does_not_fit_the_share_gets_503() {
    let (origin, _o) = tiny_origin().await;
    let edge = Edge::start(origin, "").await;
    let c = client();
    let stalled = stalled_brotli_client(&edge, 0).await;
    let got = get(&c, &edge.url("/wide-br.txt"), Some("gzip")).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&got.body);
    assert!(body.contains("no memory to spare for decoding"), "{body}");
    assert_eq!(edge.stats().decompress_busy, 1);
    let got = get(&c, &edge.url("/wide-br.txt"), Some("br")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.coding(), Some("br"));
    assert_eq!(got.decoded(), text(64 << 10));
    drop(stalled);
    let got = eventually_got(&edge, &c, "/wide-br.txt", Some("gzip"), |g| {
        g.status == StatusCode::OK
    })
    .await;
    assert_eq!(got.coding(), None);
    assert_eq!(got.body.as_ref(), text(64 << 10).as_slice());
    let got = get(&c, &edge.url("/large-window-br.txt"), Some("gzip")).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let body = String::from_utf8_lossy(&got.body);
    assert!(body.contains("large-window"), "{body}");
}

/// A stored body that fails as it is read for decoding (its content file changed in place
/// after it was checked) answers a fixed message, never the failure's own text (the cache
/// directory's paths, hashes, OS errors), and the damaged copy is gone: the retry is a MISS
/// with the origin's bytes.
#[tokio::test]
async fn a_stored_body_that_fails_before_decoding_tells_the_client_nothing_internal() {
    let (origin, _stop) = tiny_origin().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    let edge = Edge::start_with(origin, "", Some(dir)).await;
    let c = client();
    let url = edge.url("/pre-noise.txt");
    let want = noise(PRE_NOISE_LEN);

    let first = get(&c, &url, Some("gzip")).await;
    assert_eq!((first.x_cache(), first.coding()), ("MISS", Some("gzip")));
    let deadline = tokio::time::Instant::now() + WAIT;
    while edge.engine().usage()[1].1 < 1 {
        assert!(tokio::time::Instant::now() < deadline, "stored on disk");
        edge.engine().run_pending_tasks().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Read through once from disk: checked, so later streams trust its unchanged length.
    let hit = get(&c, &url, Some("gzip")).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.decoded(), want);

    // One byte of its content file changed in place: same length, another stamp.
    let files = files_under(&root.join("content").join("content-v2"));
    assert_eq!(files.len(), 1, "{files:?}");
    let mut data = std::fs::read(&files[0]).expect("read content file");
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    rewrite_in_place(&files[0], &data);

    let bad = get(&c, &url, None).await;
    assert_eq!(bad.status, StatusCode::BAD_GATEWAY, "{}", bad.x_cache());
    assert_eq!(
        std::str::from_utf8(&bad.body).expect("text"),
        "the response body failed before it could be sent; retry\n"
    );
    let status = header(&bad.headers, "proxy-status").expect("Proxy-Status");
    assert!(
        status.contains("error=http_response_incomplete"),
        "{status}"
    );
    assert!(
        status.ends_with("details=\"the response body failed before it could be sent; retry\""),
        "{status}"
    );

    let again = get(&c, &url, None).await;
    assert_eq!((again.status, again.x_cache()), (StatusCode::OK, "MISS"));
    assert_eq!(again.decoded(), want);
}
