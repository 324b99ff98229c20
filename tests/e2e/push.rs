//! Push, end to end: a pushed object is a HIT with identical bytes and a SHA-256 ETag; Range,
//! HEAD, replace, restart, limits, digest mismatch, traversal, DELETE, listing, purges of
//! pushed objects, eviction pressure, and large streamed pushes.
//!
//! The edges run in-process on a disk tier in a tempdir with the admin tokens of
//! `support::admin`, in front of the programmable test origin, which counts every request.
//! Every wait is bounded; nothing asserts on speed.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::support::admin::{
    self, Extra, HOST, ROOT, bearer, get, get_hit, get_with, list, purge, push, sha256_hex,
};
use crate::support::files::{files_under, pattern_vec as pattern};
use crate::support::http::{raw_request, send};
use crate::support::test_origin::{Reply, TestOrigin};
use crate::support::{WAIT, client};

#[test]
fn the_sha256_helper_matches_a_known_vector() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// PUT → 201 with size and SHA-256 ETag; GET on the data port is a HIT with identical bytes and
/// no origin request; Range, HEAD and If-None-Match work; a second PUT replaces (200); after a
/// restart it is still a HIT with the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_object_is_served_as_a_hit_and_survives_a_restart() {
    let origin = TestOrigin::start().await;
    origin.route("/app/main.js", Reply::ok("from the origin"));
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let v1: Vec<u8> = (0..3000u32)
        .flat_map(|i| format!("console.log({i});\n").into_bytes())
        .take(3000)
        .collect();
    let etag1 = format!("\"{}\"", sha256_hex(&v1));

    let r = push(&c, &edge, "/app/main.js", &v1, &[]).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("etag"), Some(etag1.as_str()), "{r:?}");
    let receipt = r.json();
    assert_eq!(receipt["path"], json!("/app/main.js"), "{receipt}");
    assert_eq!(receipt["size"], json!(v1.len()), "{receipt}");
    assert_eq!(receipt["etag"], json!(etag1), "{receipt}");
    assert_eq!(receipt["created"], json!(true), "{receipt}");

    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!((r.status, r.x_cache()), (200, "HIT"), "{r:?}");
    assert_eq!(r.body.as_ref(), v1.as_slice(), "pushed bytes");
    assert_eq!(r.header("etag"), Some(etag1.as_str()));
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.contains("javascript")),
        "guessed Content-Type: {r:?}"
    );
    assert!(r.header("last-modified").is_some(), "{r:?}");
    // Again (now possibly from memory).
    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!((r.x_cache(), r.body.as_ref()), ("HIT", v1.as_slice()));

    // Range.
    let r = get_with(&c, &edge, "/app/main.js", &[("range", "bytes=10-19")]).await;
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(r.body.as_ref(), &v1[10..20]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 10-19/{}", v1.len()).as_str())
    );
    // HEAD.
    let r = send(
        &c,
        "HEAD",
        &edge.url("/app/main.js"),
        &[("host", HOST)],
        None,
    )
    .await;
    assert_eq!((r.status, r.x_cache()), (200, "HIT"), "{r:?}");
    assert!(r.body.is_empty());
    assert_eq!(
        r.header("content-length"),
        Some(v1.len().to_string().as_str())
    );
    assert_eq!(r.header("etag"), Some(etag1.as_str()));
    // Its own validators.
    let r = get_with(&c, &edge, "/app/main.js", &[("if-none-match", &etag1)]).await;
    assert_eq!(r.status, 304, "{r:?}");
    assert_eq!(
        origin.hits("/app/main.js"),
        0,
        "a pushed object never goes to the origin"
    );

    // Replace.
    let v2 = pattern(5000, 2);
    let etag2 = format!("\"{}\"", sha256_hex(&v2));
    let r = push(
        &c,
        &edge,
        "/app/main.js",
        &v2,
        &[("content-type", "application/javascript")],
    )
    .await;
    assert_eq!(r.status, 200, "replace: {r:?}");
    assert_eq!(r.json()["created"], json!(false));
    assert_eq!(r.header("etag"), Some(etag2.as_str()));
    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!(r.x_cache(), "HIT", "{r:?}");
    assert_eq!(r.body.as_ref(), v2.as_slice(), "the replacement is served");
    assert_eq!(r.header("etag"), Some(etag2.as_str()));
    // Fresh until deleted: Cache-Status says hit and gives no ttl (it used to give ~2^63).
    let status = r.header("cache-status").unwrap_or_default();
    assert!(
        status.contains("; hit") && !status.contains("ttl="),
        "{status}"
    );
    edge.stop().await;

    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!(
        (r.status, r.x_cache()),
        (200, "HIT"),
        "after restart: {r:?}"
    );
    assert_eq!(r.body.as_ref(), v2.as_slice(), "after restart");
    assert_eq!(r.header("etag"), Some(etag2.as_str()));
    let listed = list(&c, &edge, "/app/").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["etag"], json!(etag2));
    assert_eq!(origin.hits("/app/main.js"), 0);
    edge.stop().await;
}

/// `max_push_size = "1KiB"`: a larger body (declared or streamed) gets 413 and nothing is
/// stored; exactly the limit is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_over_the_limit_is_413_and_stores_nothing() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/big.bin",
        Reply::ok("origin big").header("cache-control", "max-age=600"),
    );
    origin.route(
        "/streamed.bin",
        Reply::ok("origin streamed").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        admin: "max_push_size = \"1KiB\"",
        ..Default::default()
    };
    let edge = admin::start(&origin, dir.path(), extra).await;
    let c = client();

    let r = push(&c, &edge, "/big.bin", &pattern(2048, 1), &[]).await;
    assert_eq!(r.status, 413, "declared length over the limit: {r:?}");
    // Without Content-Length (chunked): the limit holds while streaming.
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..4)
        .map(|i| Ok(Bytes::from(pattern(512, 10 + i))))
        .collect();
    let auth = bearer(ROOT);
    let r = send(
        &c,
        "PUT",
        &edge.admin_url("/objects/streamed.bin"),
        &[("authorization", auth.as_str())],
        Some(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        ))),
    )
    .await;
    assert_eq!(r.status, 413, "streamed body over the limit: {r:?}");

    assert!(list(&c, &edge, "/").await.is_empty(), "nothing stored");
    for (p, body) in [
        ("/big.bin", "origin big"),
        ("/streamed.bin", "origin streamed"),
    ] {
        let r = get(&c, &edge, p).await;
        assert_eq!(r.text(), body, "{p} must come from the origin: {r:?}");
        assert_ne!(r.x_cache(), "HIT", "{p}: {r:?}");
        assert_eq!(origin.hits(p), 1, "{p}");
    }
    // Exactly the limit is accepted.
    let r = push(&c, &edge, "/exact.bin", &pattern(1024, 3), &[]).await;
    assert_eq!(r.status, 201, "{r:?}");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_with_a_sha256_mismatch_is_400_and_stores_nothing() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/sum.txt",
        Reply::ok("origin sum").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let body = b"the real body".to_vec();
    let other = sha256_hex(b"something else");
    let r = push(&c, &edge, "/sum.txt", &body, &[("content-sha256", &other)]).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text().contains("SHA"), "{r:?}");
    let r = push(
        &c,
        &edge,
        "/sum.txt",
        &body,
        &[("content-sha256", "not-hex")],
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(list(&c, &edge, "/").await.is_empty(), "nothing stored");
    let r = get(&c, &edge, "/sum.txt").await;
    assert_eq!(r.text(), "origin sum", "{r:?}");
    assert_eq!(origin.hits("/sum.txt"), 1);
    // The right digest is accepted.
    let good = sha256_hex(&body);
    let r = push(&c, &edge, "/sum.txt", &body, &[("content-sha256", &good)]).await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = get(&c, &edge, "/sum.txt").await;
    assert_eq!((r.x_cache(), r.body.as_ref()), ("HIT", body.as_slice()));
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_with_traversal_or_bad_encoding_is_400() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for target in [
        "/objects/../x",
        "/objects/a/../../x",
        "/objects/a/%2e%2e/x",
        "/objects/./x",
        "/objects/a%00b",
        "/objects/a%2",
        "/objects/%ff.txt",
        "/objects/a//b",
    ] {
        let req = format!(
            "PUT {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ROOT}\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
            edge.admin()
        );
        let (status, text) = raw_request(edge.admin(), &req, WAIT).await;
        assert_eq!(status, 400, "PUT {target}: {text}");
    }
    assert!(list(&c, &edge, "/").await.is_empty(), "nothing stored");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_list_pushed_objects() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/app/main.js",
        Reply::ok("origin main").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let objects: [(&str, Vec<u8>); 3] = [
        ("/app/main.js", b"main()".to_vec()),
        ("/app/css/site.css", b"body{}".to_vec()),
        ("/other/x.txt", b"x".to_vec()),
    ];
    for (p, body) in &objects {
        let r = push(&c, &edge, p, body, &[]).await;
        assert_eq!(r.status, 201, "{p}: {r:?}");
    }
    let listed = list(&c, &edge, "/app/").await;
    let paths: Vec<&str> = listed.iter().map(|o| o["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/app/css/site.css", "/app/main.js"], "{listed:?}");
    for o in &listed {
        let (_, body) = objects
            .iter()
            .find(|(p, _)| *p == o["path"].as_str().unwrap())
            .unwrap();
        assert_eq!(o["size"], json!(body.len()), "{o}");
        assert_eq!(o["etag"], json!(format!("\"{}\"", sha256_hex(body))), "{o}");
        assert!(o["pushed_at_ms"].as_u64().is_some_and(|t| t > 0), "{o}");
    }
    assert_eq!(list(&c, &edge, "/").await.len(), 3);

    let auth = bearer(ROOT);
    let r = send(
        &c,
        "DELETE",
        &edge.admin_url("/objects/app/main.js"),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = send(
        &c,
        "DELETE",
        &edge.admin_url("/objects/app/main.js"),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 404, "second DELETE: {r:?}");

    let r = get(&c, &edge, "/app/main.js").await;
    assert_eq!(
        r.text(),
        "origin main",
        "after DELETE the origin answers: {r:?}"
    );
    assert_eq!(r.x_cache(), "MISS", "{r:?}");
    assert_eq!(origin.hits("/app/main.js"), 1);
    let listed = list(&c, &edge, "/app/").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["path"], json!("/app/css/site.css"));
    // The others are still served.
    let r = get(&c, &edge, "/other/x.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "x"));
    edge.stop().await;
}

/// A hard purge that matches a pushed object removes it; a soft one serves it STALE while the
/// origin is asked, then the origin's version is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_apply_to_pushed_objects() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/p/hard.js",
        Reply::ok("origin hard").header("cache-control", "max-age=600"),
    );
    origin.route(
        "/p/soft.js",
        Reply::ok("origin soft").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let r = push(
        &c,
        &edge,
        "/p/hard.js",
        b"pushed hard",
        &[("surrogate-key", "release-1")],
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = push(&c, &edge, "/p/soft.js", b"pushed soft", &[]).await;
    assert_eq!(r.status, 201, "{r:?}");
    for p in ["/p/hard.js", "/p/soft.js"] {
        let r = get(&c, &edge, p).await;
        assert_eq!(r.x_cache(), "HIT", "{p}: {r:?}");
        r.assert_no_tags();
    }

    purge(&c, &edge, json!({ "tags": ["release-1"] })).await;
    let r = get(&c, &edge, "/p/hard.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("MISS", "origin hard"),
        "hard tag purge of a pushed object: {r:?}"
    );
    assert_eq!(origin.hits("/p/hard.js"), 1);
    let listed = list(&c, &edge, "/p/").await;
    assert_eq!(
        listed.len(),
        1,
        "the purged pushed object is no longer listed: {listed:?}"
    );

    purge(&c, &edge, json!({ "urls": ["/p/soft.js"], "soft": true })).await;
    let r = get(&c, &edge, "/p/soft.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "pushed soft"),
        "soft purge of a pushed object: {r:?}"
    );
    assert_eq!(origin.wait_hits("/p/soft.js", 1, WAIT).await, 1);
    let r = get_hit(&c, &edge, "/p/soft.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "origin soft"),
        "after the revalidation, the origin's version: {r:?}"
    );
    assert_eq!(origin.hits("/p/soft.js"), 1);
    edge.stop().await;
}

/// A soft purge of a pushed object that the origin answers with 304 (its file has not changed
/// since the push): the pushed object is current again, a HIT with no further origin request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purged_pushed_object_confirmed_by_304_is_a_hit_again() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/p/same.js", |req, _| {
        if req.header("if-modified-since").is_some() || req.header("if-none-match").is_some() {
            Reply::not_modified()
        } else {
            Reply::ok("origin copy").header("cache-control", "max-age=600")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let r = push(&c, &edge, "/p/same.js", b"pushed copy", &[]).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(get(&c, &edge, "/p/same.js").await.x_cache(), "HIT");

    purge(&c, &edge, json!({ "urls": ["/p/same.js"], "soft": true })).await;
    let r = get(&c, &edge, "/p/same.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "pushed copy"),
        "{r:?}"
    );
    assert_eq!(origin.wait_hits("/p/same.js", 1, WAIT).await, 1);
    let asked = origin.last_request("/p/same.js").expect("revalidation");
    assert!(
        asked.header("if-modified-since").is_some(),
        "the revalidation is conditional: {asked:?}"
    );
    let r = get_hit(&c, &edge, "/p/same.js").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "pushed copy"),
        "{r:?}"
    );
    for _ in 0..3 {
        assert_eq!(get(&c, &edge, "/p/same.js").await.x_cache(), "HIT");
    }
    assert_eq!(origin.hits("/p/same.js"), 1, "one revalidation, then hits");
    assert_eq!(
        list(&c, &edge, "/p/").await.len(),
        1,
        "still a pushed object"
    );
    edge.stop().await;
}

/// A small memory tier and disk tier under pressure from ~40 pulled objects of 32 KiB: pulled
/// objects are evicted, pushed ones never are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_pressure_never_evicts_pushed_objects() {
    let origin = TestOrigin::start().await;
    for i in 0..40u64 {
        let body = Bytes::from(pattern(32 * 1024, 100 + i));
        origin.route(
            &format!("/pull/{i}"),
            Reply::ok(body)
                .header("cache-control", "public, max-age=600")
                .header("content-type", "application/octet-stream"),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        // Every miss written, so the full tier evicts (a first miss is not, by default).
        cache: "memory = \"64KiB\"\ndisk = \"256KiB\"\ndisk_admission = \"always\"",
        ..Default::default()
    };
    let edge = admin::start(&origin, dir.path(), extra).await;
    let c = client();
    // Small (fits the memory tier), medium, and larger than a pulled object.
    let pushed: Vec<(String, Vec<u8>)> = [(4 * 1024, 1u64), (24 * 1024, 2), (100 * 1024, 3)]
        .into_iter()
        .map(|(len, seed)| (format!("/pinned/{seed}.bin"), pattern(len, seed)))
        .collect();
    for (p, body) in &pushed {
        let r = push(&c, &edge, p, body, &[]).await;
        assert_eq!(r.status, 201, "{p}: {r:?}");
        let r = get(&c, &edge, p).await;
        assert_eq!(r.x_cache(), "HIT", "{p}: {r:?}");
    }
    for i in 0..40 {
        let r = get(&c, &edge, &format!("/pull/{i}")).await;
        assert_eq!((r.status, r.body.len()), (200, 32 * 1024), "/pull/{i}");
    }
    // The tiers really were under pressure: wait until the disk tier is back within its
    // bound after evicting.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        edge.engine().run_pending_tasks().await;
        let (_, disk_evictions) = edge.engine().evictions();
        let disk_bytes = edge.engine().usage()[1].2;
        if disk_evictions > 0 && disk_bytes <= 256 * 1024 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no disk eviction after 40 x 32 KiB into 256 KiB (usage {:?})",
            edge.engine().usage()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = get(&c, &edge, "/pull/0").await;
    assert_eq!(
        r.x_cache(),
        "MISS",
        "the oldest pulled object was evicted: {r:?}"
    );
    assert_eq!(origin.hits("/pull/0"), 2);

    for (p, body) in &pushed {
        for round in 0..2 {
            let r = get(&c, &edge, p).await;
            assert_eq!(
                (r.status, r.x_cache()),
                (200, "HIT"),
                "{p} round {round}: {r:?}"
            );
            assert_eq!(r.body.as_ref(), body.as_slice(), "{p} round {round}: bytes");
        }
        assert_eq!(origin.hits(p), 0, "{p} reached the origin");
    }
    assert_eq!(list(&c, &edge, "/pinned/").await.len(), 3);
    edge.stop().await;
}

/// A large push streamed in chunks (no Content-Length) is stored whole and served back
/// byte-identical, Range included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_streamed_push_is_served_back_identical() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let data = Bytes::from(pattern(12 << 20, 77));
    let sum = sha256_hex(&data);
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(256 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let auth = bearer(ROOT);
    let r = send(
        &c,
        "PUT",
        &edge.admin_url("/objects/big/blob.bin"),
        &[
            ("authorization", auth.as_str()),
            ("content-sha256", sum.as_str()),
        ],
        Some(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        ))),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["size"], json!(data.len()));
    let r = get(&c, &edge, "/big/blob.bin").await;
    assert_eq!((r.status, r.x_cache()), (200, "HIT"));
    assert_eq!(r.body.len(), data.len());
    assert!(r.body == data, "the streamed push came back different");
    let last = data.len() - 1;
    let r = get_with(&c, &edge, "/big/blob.bin", &[("range", "bytes=-100")]).await;
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(r.body.as_ref(), &data[last - 99..]);
    assert_eq!(origin.total_hits(), 0);
    edge.stop().await;
}

/// A pushed object that cannot be read for a moment, for a reason that is not damage (here a
/// directory of its content path is briefly a file: ENOTDIR, as running out of file
/// descriptors would be EMFILE), is answered from the origin meanwhile and stays pushed:
/// served again once it can be read, listed, and across a restart. The origin's storable
/// answer used to delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_object_that_cannot_be_read_for_a_moment_stays_pushed() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/app.js",
        Reply::ok("from the origin").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let body = pattern(64 << 10, 7);
    let r = push(&c, &edge, "/app.js", &body, &[]).await;
    assert_eq!(r.status, 201, "{r:?}");

    let files: Vec<_> = files_under(dir.path())
        .into_iter()
        .filter(|f| std::fs::metadata(f).is_ok_and(|m| m.len() == body.len() as u64))
        .collect();
    assert_eq!(
        files.len(),
        1,
        "the pushed object's content file: {files:?}"
    );
    let file = &files[0];
    let parent = file.parent().unwrap().to_path_buf();
    let aside = dir.path().join("aside");
    std::fs::rename(&parent, &aside).unwrap();
    std::fs::write(&parent, b"not a directory").unwrap();
    let r = get(&c, &edge, "/app.js").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body.as_ref(), b"from the origin", "the origin meanwhile");
    std::fs::remove_file(&parent).unwrap();
    std::fs::rename(&aside, &parent).unwrap();

    let r = get(&c, &edge, "/app.js").await;
    assert_eq!((r.status, r.x_cache()), (200, "HIT"), "{r:?}");
    assert!(r.body.as_ref() == body.as_slice(), "still the pushed bytes");
    assert_eq!(list(&c, &edge, "/").await.len(), 1, "still listed");
    edge.stop().await;

    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let r = get(&c, &edge, "/app.js").await;
    assert_eq!(
        (r.status, r.x_cache()),
        (200, "HIT"),
        "after restart: {r:?}"
    );
    assert!(r.body.as_ref() == body.as_slice(), "after restart");
    edge.stop().await;
}
