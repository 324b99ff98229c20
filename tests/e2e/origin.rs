//! End-to-end tests of `outpost-origin`: a real `OriginServer` on 127.0.0.1:0, serving the repo's
//! `site/` (or a temporary directory), driven by reqwest and, where reqwest would normalise the
//! URL, by raw HTTP/1.1 over a TCP socket.
//!
//! `site/assets/media/sample.bin` is 2 MiB of incompressible bytes, generated with
//! `python3 -c "import random; random.seed(42); open('sample.bin','wb').write(random.randbytes(2*1024*1024))"`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{
    ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, DATE, ETAG,
    IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED,
    RANGE, SERVER,
};
use outpost_origin::{OriginConfig, OriginOverrides, Rules};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::http::{closed_within, raw_request as raw_exchange};
use crate::support::site::SiteOrigin as Origin;
use crate::support::{client_within, h2c_client as h2c_client_within, repo};

const SAMPLE_LEN: usize = 2 * 1024 * 1024;

fn site() -> PathBuf {
    repo().join("site")
}

/// Every request of these tests is bounded by a minute (none of them waits on purpose).
const REQUEST_BOUND: Duration = Duration::from_secs(60);

fn client() -> reqwest::Client {
    client_within(REQUEST_BOUND)
}

fn h2c_client() -> reqwest::Client {
    h2c_client_within(REQUEST_BOUND)
}

fn header(resp: &reqwest::Response, name: http::HeaderName) -> &str {
    resp.headers()
        .get(&name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
}

/// Sends one raw HTTP/1.1 request and returns the status and the whole response text.
async fn raw_request(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    let req =
        format!("{method} {target} HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n");
    raw_exchange(addr, &req, Duration::from_secs(10)).await
}

#[tokio::test]
async fn serves_a_page_with_validators_and_rule_headers() {
    let origin = Origin::sample_site().await;
    let resp = client()
        .get(origin.url("/about.html"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, CONTENT_TYPE), "text/html; charset=utf-8");
    assert_eq!(header(&resp, SERVER), "outpost-origin");
    assert_eq!(header(&resp, ACCEPT_RANGES), "bytes");
    assert_eq!(
        header(&resp, CACHE_CONTROL),
        "public, max-age=60, stale-while-revalidate=30"
    );
    assert_eq!(header(&resp, "surrogate-key".parse().unwrap()), "html");
    let etag = header(&resp, ETAG);
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong ETag: {etag}"
    );
    assert!(header(&resp, LAST_MODIFIED).ends_with(" GMT"));
    assert_eq!(resp.headers().get_all(DATE).iter().count(), 1);
    let expected = std::fs::read(site().join("about.html")).unwrap();
    assert_eq!(header(&resp, CONTENT_LENGTH), expected.len().to_string());
    assert_eq!(resp.bytes().await.unwrap(), Bytes::from(expected));
}

#[tokio::test]
async fn serves_the_large_file_intact_over_h1_and_h2c() {
    let origin = Origin::sample_site().await;
    let expected = std::fs::read(site().join("assets/media/sample.bin")).unwrap();
    assert_eq!(expected.len(), SAMPLE_LEN);
    for client in [client(), h2c_client()] {
        let resp = client
            .get(origin.url("/assets/media/sample.bin"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, CONTENT_TYPE), "application/octet-stream");
        assert_eq!(header(&resp, CONTENT_LENGTH), SAMPLE_LEN.to_string());
        assert_eq!(
            header(&resp, CACHE_CONTROL),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(
            header(&resp, "surrogate-key".parse().unwrap()),
            "assets static"
        );
        let body = resp.bytes().await.unwrap();
        assert!(body == expected[..], "2 MiB body differs from the file");
    }
    let resp = h2c_client().get(origin.url("/")).send().await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
}

#[tokio::test]
async fn rules_apply_by_glob_and_default_otherwise() {
    let origin = Origin::sample_site().await;
    let c = client();
    let cases = [
        (
            "/assets/css/style.css",
            "public, max-age=31536000, immutable",
            Some("assets static"),
            "text/css; charset=utf-8",
        ),
        (
            "/assets/js/app.js",
            "public, max-age=31536000, immutable",
            Some("assets static"),
            "text/javascript; charset=utf-8",
        ),
        (
            "/assets/img/logo.svg",
            "public, max-age=31536000, immutable",
            Some("assets static"),
            "image/svg+xml; charset=utf-8",
        ),
        (
            "/index.html",
            "public, max-age=60, stale-while-revalidate=30",
            Some("html"),
            "text/html; charset=utf-8",
        ),
        (
            "/docs/guide.html",
            "public, max-age=60, stale-while-revalidate=30",
            Some("html"),
            "text/html; charset=utf-8",
        ),
        // A directory is matched as its index.html.
        (
            "/docs/",
            "public, max-age=60, stale-while-revalidate=30",
            Some("html"),
            "text/html; charset=utf-8",
        ),
    ];
    for (path, cc, key, ctype) in cases {
        let resp = c.get(origin.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&resp, CACHE_CONTROL), cc, "{path}");
        assert_eq!(header(&resp, CONTENT_TYPE), ctype, "{path}");
        assert_eq!(
            resp.headers()
                .get("surrogate-key")
                .map(|v| v.to_str().unwrap()),
            key,
            "{path}"
        );
    }

    // No rule matches: the default Cache-Control and no Surrogate-Key.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("robots.txt"), "User-agent: *\n").unwrap();
    let origin = Origin::start(dir.path(), Some(&repo().join("configs/origin-rules.toml"))).await;
    let resp = c.get(origin.url("/robots.txt")).send().await.unwrap();
    assert_eq!(header(&resp, CACHE_CONTROL), "public, max-age=60");
    assert!(resp.headers().get("surrogate-key").is_none());
    assert_eq!(header(&resp, CONTENT_TYPE), "text/plain; charset=utf-8");
}

#[tokio::test]
async fn directories_serve_their_index_and_queries_are_ignored() {
    let origin = Origin::sample_site().await;
    let c = client();
    let home = std::fs::read(site().join("index.html")).unwrap();
    let docs = std::fs::read(site().join("docs/index.html")).unwrap();
    for (path, expected) in [
        ("/", &home),
        ("/?utm_source=test", &home),
        ("/docs", &docs),
        ("/docs/", &docs),
        ("/docs/?x=1#frag", &docs),
    ] {
        let resp = c.get(origin.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(resp.bytes().await.unwrap(), expected[..], "{path}");
    }
    let resp = c.get(origin.url("/about.html?v=2")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // A directory without index.html is 404 (no listings).
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let origin = Origin::start(dir.path(), None).await;
    assert_eq!(
        c.get(origin.url("/empty/")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(origin.url("/")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn etag_round_trip_gives_304_for_get_and_head() {
    let origin = Origin::sample_site().await;
    let c = client();
    let url = origin.url("/docs/guide.html");
    let first = c.get(&url).send().await.unwrap();
    let etag = header(&first, ETAG).to_string();
    let last_modified = header(&first, LAST_MODIFIED).to_string();

    for method in [http::Method::GET, http::Method::HEAD] {
        for inm in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"nope\", {etag}"),
            "*".into(),
        ] {
            let resp = c
                .request(method.clone(), &url)
                .header(IF_NONE_MATCH, &inm)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::NOT_MODIFIED, "{method} {inm}");
            assert_eq!(header(&resp, ETAG), etag);
            assert_eq!(header(&resp, LAST_MODIFIED), last_modified);
            assert_eq!(
                header(&resp, CACHE_CONTROL),
                "public, max-age=60, stale-while-revalidate=30"
            );
            assert_eq!(header(&resp, "surrogate-key".parse().unwrap()), "html");
            assert!(resp.headers().contains_key(DATE));
            assert!(resp.bytes().await.unwrap().is_empty());
        }
    }

    // A different tag: the full page.
    let resp = c
        .get(&url)
        .header(IF_NONE_MATCH, "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // If-None-Match takes precedence over If-Modified-Since (RFC 9110 §13.1.3).
    let resp = c
        .get(&url)
        .header(IF_NONE_MATCH, "\"something-else\"")
        .header(IF_MODIFIED_SINCE, &last_modified)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn last_modified_round_trip_gives_304_for_get_and_head() {
    let origin = Origin::sample_site().await;
    let c = client();
    let url = origin.url("/assets/css/style.css");
    let first = c.head(&url).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let last_modified = header(&first, LAST_MODIFIED).to_string();

    for method in [http::Method::GET, http::Method::HEAD] {
        let resp = c
            .request(method.clone(), &url)
            .header(IF_MODIFIED_SINCE, &last_modified)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED, "{method}");
        assert_eq!(header(&resp, LAST_MODIFIED), last_modified);
        assert_eq!(
            header(&resp, CACHE_CONTROL),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(
            header(&resp, "surrogate-key".parse().unwrap()),
            "assets static"
        );
        assert!(resp.headers().contains_key(ETAG));
        assert!(resp.bytes().await.unwrap().is_empty());

        let resp = c
            .request(method.clone(), &url)
            .header(IF_MODIFIED_SINCE, "Thu, 01 Jan 1970 00:00:00 GMT")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{method}");
    }
}

#[tokio::test]
async fn head_has_the_get_headers_and_no_body() {
    let origin = Origin::sample_site().await;
    for c in [client(), h2c_client()] {
        let resp = c
            .head(origin.url("/assets/media/sample.bin"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, CONTENT_LENGTH), SAMPLE_LEN.to_string());
        assert!(resp.headers().contains_key(ETAG));
        let etag = header(&resp, ETAG).to_string();
        assert!(resp.bytes().await.unwrap().is_empty());
        // Range is defined for GET only (RFC 9110 §14.2): HEAD ignores it.
        let resp = c
            .head(origin.url("/assets/media/sample.bin"))
            .header(RANGE, "bytes=0-9")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.bytes().await.unwrap().is_empty());
        let resp = c
            .head(origin.url("/assets/media/sample.bin"))
            .header(IF_NONE_MATCH, &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
        // A HEAD error has the GET's headers and no body either.
        let resp = c.head(origin.url("/missing")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(resp.bytes().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn failing_if_match_and_if_unmodified_since_give_412() {
    let origin = Origin::sample_site().await;
    let c = client();
    let url = origin.url("/about.html");
    let first = c.get(&url).send().await.unwrap();
    let etag = header(&first, ETAG).to_string();

    let status = |req: reqwest::RequestBuilder| async move { req.send().await.unwrap().status() };
    assert_eq!(
        status(c.get(&url).header(IF_MATCH, &etag)).await,
        StatusCode::OK
    );
    assert_eq!(
        status(c.get(&url).header(IF_MATCH, "*")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(c.get(&url).header(IF_MATCH, "\"stale\"")).await,
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(
        status(c.get(&url).header(IF_MATCH, format!("W/{etag}"))).await,
        StatusCode::PRECONDITION_FAILED,
        "If-Match uses strong comparison"
    );
    assert_eq!(
        status(
            c.get(&url)
                .header(IF_UNMODIFIED_SINCE, "Thu, 01 Jan 1970 00:00:00 GMT")
        )
        .await,
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(
        status(
            c.get(&url)
                .header(IF_UNMODIFIED_SINCE, "Fri, 01 Jan 2100 00:00:00 GMT")
        )
        .await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn byte_ranges() {
    let origin = Origin::sample_site().await;
    let c = client();
    let url = origin.url("/assets/media/sample.bin");
    let file = std::fs::read(site().join("assets/media/sample.bin")).unwrap();
    let len = file.len();

    let get = |range: &str| c.get(&url).header(RANGE, range.to_string()).send();

    let resp = get("bytes=0-99").await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&resp, CONTENT_RANGE), format!("bytes 0-99/{len}"));
    assert_eq!(header(&resp, CONTENT_LENGTH), "100");
    assert_eq!(
        header(&resp, CACHE_CONTROL),
        "public, max-age=31536000, immutable"
    );
    assert!(resp.headers().contains_key(ETAG));
    assert_eq!(resp.bytes().await.unwrap(), file[..100]);

    // A range across the middle of the file and past the first read chunk.
    let resp = get("bytes=1000000-1200000").await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&resp, CONTENT_RANGE),
        format!("bytes 1000000-1200000/{len}")
    );
    assert_eq!(resp.bytes().await.unwrap(), file[1_000_000..=1_200_000]);

    // Suffix range: the last 500 bytes.
    let resp = get("bytes=-500").await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&resp, CONTENT_RANGE),
        format!("bytes {}-{}/{len}", len - 500, len - 1)
    );
    assert_eq!(header(&resp, CONTENT_LENGTH), "500");
    assert_eq!(resp.bytes().await.unwrap(), file[len - 500..]);

    // Open-ended, and a last position past the end (clamped).
    let resp = get(&format!("bytes={}-", len - 10)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.bytes().await.unwrap(), file[len - 10..]);
    let resp = get(&format!("bytes={}-{}", len - 3, len + 1000))
        .await
        .unwrap();
    assert_eq!(
        header(&resp, CONTENT_RANGE),
        format!("bytes {}-{}/{len}", len - 3, len - 1)
    );

    // Unsatisfiable: 416 with the length.
    for range in [format!("bytes={len}-"), "bytes=-0".to_string()] {
        let resp = get(&range).await.unwrap();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&resp, CONTENT_RANGE), format!("bytes */{len}"));
    }

    // Invalid syntax, another unit, or several ranges: ignored, the whole file (RFC 9110 §14.2).
    for range in ["bytes=abc", "bytes=5-1", "items=0-1", "bytes=0-1,5-6"] {
        let resp = get(range).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{range}");
        assert_eq!(header(&resp, CONTENT_LENGTH), len.to_string(), "{range}");
        assert!(resp.headers().get(CONTENT_RANGE).is_none());
        assert_eq!(resp.bytes().await.unwrap().len(), len);
    }

    // If-Range: a current strong tag or the exact date keeps the range; anything else sends 200.
    let head = c.head(&url).send().await.unwrap();
    let etag = header(&head, ETAG).to_string();
    let last_modified = header(&head, LAST_MODIFIED).to_string();
    for (if_range, status) in [
        (etag.clone(), StatusCode::PARTIAL_CONTENT),
        (last_modified, StatusCode::PARTIAL_CONTENT),
        ("\"old\"".to_string(), StatusCode::OK),
        (format!("W/{etag}"), StatusCode::OK),
        ("Thu, 01 Jan 1970 00:00:00 GMT".to_string(), StatusCode::OK),
    ] {
        let resp = c
            .get(&url)
            .header(RANGE, "bytes=0-9")
            .header(IF_RANGE, &if_range)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "If-Range: {if_range}");
        let want = if status == StatusCode::OK { len } else { 10 };
        assert_eq!(resp.bytes().await.unwrap().len(), want);
    }
}

#[tokio::test]
async fn traversal_attempts_are_refused_with_400() {
    let origin = Origin::sample_site().await;
    for target in [
        "/../etc/passwd",
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/%2E%2E/%2E%2E/etc/passwd",
        "/assets/%2e%2e/%2e%2e/x",
        "/assets/..%2f..%2fetc/passwd",
        "/assets%2f..%2f..%2fetc%2fpasswd",
        "/..%5c..%5cetc%5cpasswd",
        "/about.html%00.txt",
        "/docs/./../../etc/passwd",
    ] {
        let (status, text) = raw_request(origin.addr, "GET", target).await;
        assert_eq!(status, 400, "{target}: {text}");
        assert!(!text.contains("root:"), "{target} leaked a file");
        // Refused by the origin's own sanitiser, not by the HTTP parser.
        assert!(text.contains("server: outpost-origin"), "{target}: {text}");
        assert!(text.contains("request path must"), "{target}: {text}");
        // Only the short plain-text reason, never a file body.
        assert!(text.len() < 1024, "{target}: {text}");
    }
    // HEAD is refused the same way.
    let (status, _) = raw_request(origin.addr, "HEAD", "/%2e%2e/etc/passwd").await;
    assert_eq!(status, 400);
    // A dot segment that stays inside the root is harmless.
    let (status, _) = raw_request(origin.addr, "GET", "/docs/./guide.html").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn missing_files_are_404() {
    let origin = Origin::sample_site().await;
    let c = client();
    for path in [
        "/nope.html",
        "/assets/nope/",
        "/about.html/",
        "/about.html/x",
    ] {
        let resp = c.get(origin.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(header(&resp, CONTENT_TYPE), "text/plain; charset=utf-8");
    }
}

#[tokio::test]
async fn other_methods_are_405_with_allow() {
    let origin = Origin::sample_site().await;
    let c = client();
    for method in [
        http::Method::POST,
        http::Method::PUT,
        http::Method::DELETE,
        http::Method::OPTIONS,
    ] {
        let resp = c
            .request(method.clone(), origin.url("/index.html"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(header(&resp, ALLOW), "GET, HEAD");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn symlinks_outside_the_root_are_not_followed() {
    use std::os::unix::fs::symlink;

    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "TOP-SECRET").unwrap();
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("page.html"), "<p>hello</p>").unwrap();
    symlink(
        outside.path().join("secret.txt"),
        root.path().join("leak.txt"),
    )
    .unwrap();
    symlink(outside.path(), root.path().join("linked-dir")).unwrap();
    symlink(
        root.path().join("page.html"),
        root.path().join("alias.html"),
    )
    .unwrap();

    let origin = Origin::start(root.path(), None).await;
    let c = client();
    for path in ["/leak.txt", "/linked-dir/secret.txt", "/linked-dir/"] {
        let resp = c.get(origin.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(!resp.text().await.unwrap().contains("TOP-SECRET"), "{path}");
    }
    // A symlink that stays inside the root is followed.
    let resp = c.get(origin.url("/alias.html")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "<p>hello</p>");
}

#[tokio::test]
async fn shutdown_drains_and_stops_accepting() {
    let origin = Origin::sample_site().await;
    let addr = origin.addr;
    let resp = client().get(origin.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    origin.shutdown().await.expect("clean shutdown");
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_download_finish() {
    let origin = Origin::sample_site().await;
    let mut resp = client()
        .get(origin.url("/assets/media/sample.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let first = resp.chunk().await.unwrap().expect("first chunk");
    let stopped = tokio::spawn(origin.shutdown());
    let mut received = first.len();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        received += chunk.len();
    }
    assert_eq!(received, SAMPLE_LEN);
    stopped.await.unwrap().expect("clean shutdown");
}

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let origin = Origin::start_tuned(&site(), None, |cfg| {
        cfg.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = origin.addr;

    // Half a request head, then silence: the server must not wait forever (slow loris).
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection still open after the header read timeout"
    );

    origin.shutdown().await.unwrap();
}

// Bounds (issue 13, item 5): every connection bounded in time and count.

const WAIT: Duration = Duration::from_secs(10);

/// True when the server closes `s` (EOF or reset) within [`WAIT`]; what it sends first is
/// ignored.
async fn closed_within_wait(s: &mut TcpStream) -> bool {
    closed_within(s, WAIT).await.is_some()
}

/// Reads one HTTP/1.1 response with a Content-Length from `s`, `pause` between reads of at
/// most 16 KiB. Returns the status and the body length.
async fn read_h1_response(s: &mut TcpStream, pause: Duration) -> (u16, usize) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut got = buf.len() - head_end;
    while got < len {
        tokio::time::sleep(pause).await;
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed after {got} of {len} body bytes");
        got += n;
    }
    (status, got)
}

#[tokio::test]
async fn silent_and_stalled_h2_preface_connections_are_closed_within_the_header_timeout() {
    let origin = Origin::start_tuned(&site(), None, |cfg| {
        cfg.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    // Connects and sends nothing.
    let mut silent = TcpStream::connect(origin.addr).await.unwrap();
    // A prefix of the h2 preface, then silence: hyper-util's protocol detection waits for
    // the rest with no timeout of its own.
    let mut prefix = TcpStream::connect(origin.addr).await.unwrap();
    prefix.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // The same prefix, then a half-close.
    let mut half = TcpStream::connect(origin.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    half.shutdown().await.unwrap();
    // The whole preface, then silence (no SETTINGS, no request).
    let mut preface = TcpStream::connect(origin.addr).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    for (what, s) in [
        ("silent", &mut silent),
        ("preface prefix", &mut prefix),
        ("half-closed preface prefix", &mut half),
    ] {
        assert!(closed_within_wait(s).await, "{what} connection kept");
    }
    // The full preface is bounded by the idle timeout (60 s by default) and h2 PINGs; it is
    // not a detection stall. The server still serves both protocols.
    drop(preface);
    let (status, _) = raw_request(origin.addr, "GET", "/").await;
    assert_eq!(status, 200);
    let resp = h2c_client().get(origin.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn idle_connections_are_closed_and_slow_downloads_are_not() {
    let origin = Origin::start_tuned(&site(), None, |cfg| {
        // Long enough that only the idle timeout can close the connections below.
        cfg.header_read_timeout = Duration::from_secs(60);
        cfg.idle_timeout = Duration::from_millis(300);
    })
    .await;

    // HTTP/2 (h2c): one request, then the connection is kept open and PINGs are answered.
    let tcp = TcpStream::connect(origin.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(origin.url("/"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("idle h2c connection closed")
        .unwrap()
        .expect("closed cleanly (GOAWAY)");

    // HTTP/1.1 keep-alive: one request, then silence.
    let mut h1 = TcpStream::connect(origin.addr).await.unwrap();
    h1.write_all(b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_h1_response(&mut h1, Duration::ZERO).await.0, 200);
    assert!(closed_within_wait(&mut h1).await, "idle keep-alive kept");

    // A download read slowly, for longer than the idle timeout, through a small receive
    // buffer: it is a request in flight, not an idle connection, and arrives whole.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(origin.addr).await.unwrap();
    slow.write_all(b"GET /assets/media/sample.bin HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        .await
        .unwrap();
    let (status, len) = tokio::time::timeout(
        Duration::from_secs(60),
        read_h1_response(&mut slow, Duration::from_millis(5)),
    )
    .await
    .expect("download in time");
    assert_eq!((status, len), (200, SAMPLE_LEN));
}

#[tokio::test]
async fn a_client_that_stops_reading_a_response_is_closed_once_idle() {
    // Larger than what the kernel's socket buffers can hold, so the response stays in flight.
    const BIG: usize = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.bin"), vec![7u8; BIG]).unwrap();
    let origin = Origin::start_tuned(dir.path(), None, |cfg| {
        cfg.header_read_timeout = Duration::from_secs(60);
        cfg.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(origin.addr).await.unwrap();
    s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut first))
        .await
        .expect("response in time")
        .unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200 "));
    // Stop reading: the server can write no more, the body yields no chunk, the connection
    // makes no progress. Well past the idle timeout (and its shutdown grace) it is closed,
    // and draining what is left gets only part of the body.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rest = 0usize;
    let mut chunk = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "connection still open");
    assert!(
        n + rest < BIG,
        "the whole body arrived: the stalled connection was kept"
    );
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_a_slot() {
    let origin = Origin::start_tuned(&site(), None, |cfg| {
        cfg.header_read_timeout = Duration::from_secs(60);
        cfg.max_connections = 2;
    })
    .await;
    let first = TcpStream::connect(origin.addr).await.unwrap();
    let _second = TcpStream::connect(origin.addr).await.unwrap();
    // Both slots are taken by silent clients: the third waits in the kernel's backlog.
    let mut third = TcpStream::connect(origin.addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(
        Duration::from_millis(500),
        read_h1_response(&mut third, Duration::ZERO),
    )
    .await;
    assert!(early.is_err(), "served past the cap: {early:?}");
    drop(first);
    let served = tokio::time::timeout(WAIT, read_h1_response(&mut third, Duration::ZERO)).await;
    assert_eq!(served.expect("served once a slot is free").0, 200);
}

#[test]
fn the_shipped_configs_load() {
    let rules =
        Rules::load(&repo().join("configs/origin-rules.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules.lookup("/assets/css/style.css").cache_control,
        "public, max-age=31536000, immutable"
    );
    let cfg = OriginConfig::load(
        Some(&repo().join("configs/origin.toml")),
        OriginOverrides::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.listen, "127.0.0.1:9000".parse().unwrap());
    assert_eq!(cfg.root, site().canonicalize().unwrap());
    assert_eq!(cfg.rules.len(), 2);
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("site")).unwrap();
    let load = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        OriginConfig::load(Some(&path), OriginOverrides::default())
    };

    let err = load(
        "unknown.toml",
        "root = \"site\"\nlistne = \"127.0.0.1:1\"\n",
    )
    .unwrap_err();
    assert!(err.mentions("listne"), "{err}");
    assert_eq!(err.0[0].line, Some(2));

    let err = load(
        "address.toml",
        "listen = \"localhost:http\"\nroot = \"site\"\n",
    )
    .unwrap_err();
    assert!(err.mentions("listen"), "{err}");
    assert_eq!(err.0[0].line, Some(1));
    assert!(
        err.to_string().contains("address.toml:1: field `listen`"),
        "{err}"
    );

    let err = load("root.toml", "root = \"no-such-dir\"\n").unwrap_err();
    assert!(err.mentions("root"), "{err}");

    std::fs::write(
        dir.path().join("bad-rules.toml"),
        "[[rule]]\npath = \"/assets/**\"\ncache_control = \"public\"\n\n[[rule]]\npath = \"/{a,b\"\ncache_control = \"public\"\n",
    )
    .unwrap();
    let err = load("glob.toml", "root = \"site\"\nrules = \"bad-rules.toml\"\n").unwrap_err();
    assert!(err.mentions("rule[2].path"), "{err}");
    assert_eq!(err.0[0].line, Some(6));
    assert!(err.0[0].origin.ends_with("bad-rules.toml"));

    // Flags are named as flags.
    let err = OriginConfig::load(
        None,
        OriginOverrides {
            listen: Some("nope".into()),
            root: Some(dir.path().join("site").display().to_string()),
            rules: None,
        },
    )
    .unwrap_err();
    assert!(err.mentions("--listen"), "{err}");
}
