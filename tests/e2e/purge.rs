//! Purge, end to end: by URL, prefix, tag and all, hard (next request MISS) and soft (next
//! request STALE, exactly one background revalidation reaches the origin), with the origin's
//! request counts; tags from `Surrogate-Key` / `Cache-Tag`, never shown to clients; purges that
//! survive a restart on the same cache directory; the data port's `PURGE` method; purges that
//! meet in-flight fills; per-host absolute URLs and prefixes; reclaiming disk space.
//!
//! The edges run in-process on a disk tier in a tempdir with the admin tokens of
//! `support::admin`, in front of the programmable test origin, which counts every request.
//! Every wait is bounded; nothing asserts on speed.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::admin::{
    self, Extra, HOST, PURGER, PUSHER, READER, ROOT, bearer, cacheable, get, get_hit, get_with,
    purge, settled, versioned_route,
};
use crate::support::http::send;
use crate::support::test_origin::{Gate, Reply, TestOrigin};
use crate::support::{WAIT, client};

// ---------------------------------------------------------------------------------------------
// Purge by URL, prefix, tag, all; hard and soft
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Url,
    Prefix,
    Tag,
    All,
}

const SHOP_A: &str = "/shop/a.css";
const SHOP_B: &str = "/shop/b.js";
const BLOG_C: &str = "/blog/c.html";
const BLOG_D: &str = "/blog/d.png";
const PATHS: [&str; 4] = [SHOP_A, SHOP_B, BLOG_C, BLOG_D];

/// Four cached objects, one purge, then the expected MISS (hard) or STALE plus exactly one
/// background revalidation (soft) on the matched ones, HITs on the others, and origin counts.
async fn purge_scenario(kind: Kind, soft: bool) {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    if !soft {
        // Hard purges refetch at once: nothing to hold.
        gate.open();
    }
    // Tags: Surrogate-Key is space-separated, Cache-Tag comma-separated.
    versioned_route(&origin, SHOP_A, ("surrogate-key", "shop css"), &gate);
    versioned_route(&origin, SHOP_B, ("cache-tag", "shop,js"), &gate);
    versioned_route(&origin, BLOG_C, ("surrogate-key", "blog html"), &gate);
    versioned_route(&origin, BLOG_D, ("cache-tag", "img, blog"), &gate);
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();

    for p in PATHS {
        let r = get(&c, &edge, p).await;
        assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{p}: {r:?}");
        assert_eq!(r.text(), format!("{p} v0"));
        r.assert_no_tags();
        let r = get_hit(&c, &edge, p).await;
        assert_eq!(r.x_cache(), "HIT", "{p}: {r:?}");
        r.assert_no_tags();
        assert_eq!(origin.hits(p), 1, "{p}");
    }
    // Every fill has finished (see `settled`).
    settled(&edge, 4).await;

    let (request, matched): (Value, Vec<&str>) = match kind {
        Kind::Url => (json!({ "urls": [SHOP_A] }), vec![SHOP_A]),
        Kind::Prefix => (json!({ "prefixes": ["/shop/"] }), vec![SHOP_A, SHOP_B]),
        // `blog` is in c's Surrogate-Key and in d's Cache-Tag.
        Kind::Tag => (json!({ "tags": ["blog"] }), vec![BLOG_C, BLOG_D]),
        Kind::All => (json!({ "all": true }), PATHS.to_vec()),
    };
    let mut request = request;
    request["soft"] = json!(soft);
    let receipt = purge(&c, &edge, request.clone()).await;
    assert!(receipt["seq"].as_u64().is_some_and(|s| s >= 1), "{receipt}");
    assert!(
        receipt["id"].as_str().is_some_and(|s| !s.is_empty()),
        "{receipt}"
    );
    assert_eq!(receipt["soft"], json!(soft), "{receipt}");
    let kind_name = format!("{kind:?}").to_lowercase();
    assert_eq!(receipt["kinds"], json!([kind_name]), "{receipt}");
    assert_eq!(receipt["nodes"][0]["ok"], json!(true), "{receipt}");
    if kind == Kind::Url && !soft {
        assert_eq!(receipt["matched"], json!(1), "{receipt}");
    }

    // Objects the purge did not select are untouched.
    for p in PATHS.iter().filter(|p| !matched.contains(p)) {
        let r = get(&c, &edge, p).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("HIT", format!("{p} v0")),
            "{p} was not selected by {request}: {r:?}"
        );
        r.assert_no_tags();
    }

    if !soft {
        for p in &matched {
            let r = get(&c, &edge, p).await;
            assert_eq!(
                (r.status, r.x_cache(), r.text()),
                (200, "MISS", format!("{p} v1")),
                "{p} after hard purge {request}: {r:?}"
            );
            r.assert_no_tags();
            assert_eq!(origin.hits(p), 2, "{p}");
            let r = get_hit(&c, &edge, p).await;
            assert_eq!((r.x_cache(), r.text()), ("HIT", format!("{p} v1")), "{p}");
            assert_eq!(origin.hits(p), 2, "{p}");
        }
    } else {
        for p in &matched {
            let r = get(&c, &edge, p).await;
            assert_eq!(
                (r.status, r.x_cache(), r.text()),
                (200, "STALE", format!("{p} v0")),
                "{p} after soft purge {request}: {r:?}"
            );
            r.assert_no_tags();
            // One background revalidation reaches the origin (held there by the gate) ...
            assert_eq!(
                origin.wait_hits(p, 2, WAIT).await,
                2,
                "{p}: no revalidation"
            );
            let reval = origin.last_request(p).unwrap();
            assert_eq!(
                reval.header("if-none-match"),
                Some("\"0\""),
                "{p}: {reval:?}"
            );
            // ... and while it runs, further requests are served stale without another one.
            for _ in 0..3 {
                let r = get(&c, &edge, p).await;
                assert_eq!(
                    (r.x_cache(), r.text()),
                    ("STALE", format!("{p} v0")),
                    "{p} while revalidating: {r:?}"
                );
            }
            assert_eq!(origin.hits(p), 2, "{p}: more than one revalidation");
        }
        gate.open();
        for p in &matched {
            let deadline = tokio::time::Instant::now() + WAIT;
            let r = loop {
                let r = get(&c, &edge, p).await;
                match r.x_cache() {
                    "HIT" => break r,
                    "STALE" => assert_eq!(r.text(), format!("{p} v0"), "{p}"),
                    other => panic!("{p}: {other} while the revalidation lands: {r:?}"),
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{p}: the revalidated object never became a HIT"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            assert_eq!(r.text(), format!("{p} v1"), "{p}: revalidated content");
            r.assert_no_tags();
            assert_eq!(origin.hits(p), 2, "{p}: exactly one revalidation");
        }
    }
    for p in PATHS.iter().filter(|p| !matched.contains(p)) {
        assert_eq!(
            origin.hits(p),
            1,
            "{p} was not selected but reached the origin"
        );
    }
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purge_by_url() {
    purge_scenario(Kind::Url, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_by_url() {
    purge_scenario(Kind::Url, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purge_by_prefix() {
    purge_scenario(Kind::Prefix, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_by_prefix() {
    purge_scenario(Kind::Prefix, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purge_by_tag() {
    purge_scenario(Kind::Tag, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_by_tag() {
    purge_scenario(Kind::Tag, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purge_all() {
    purge_scenario(Kind::All, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_all() {
    purge_scenario(Kind::All, true).await;
}

/// A soft purge whose revalidation gets a 304: the old body is valid again (HIT, one origin
/// request for the revalidation, none after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_revalidated_by_304_becomes_a_hit_again() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/r.txt", |req, _| {
        if req.header("if-none-match") == Some("\"r1\"") {
            Reply::not_modified()
                .header("etag", "\"r1\"")
                .header("cache-control", "public, max-age=600")
        } else {
            Reply::ok("revalidate me")
                .header("etag", "\"r1\"")
                .header("cache-control", "public, max-age=600")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    assert_eq!(get(&c, &edge, "/r.txt").await.x_cache(), "MISS");
    assert_eq!(get_hit(&c, &edge, "/r.txt").await.x_cache(), "HIT");
    settled(&edge, 1).await;
    purge(&c, &edge, json!({ "urls": ["/r.txt"], "soft": true })).await;
    let r = get(&c, &edge, "/r.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "revalidate me"),
        "{r:?}"
    );
    assert_eq!(origin.wait_hits("/r.txt", 2, WAIT).await, 2);
    let r = get_hit(&c, &edge, "/r.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "revalidate me"),
        "{r:?}"
    );
    assert_eq!(origin.hits("/r.txt"), 2, "one revalidation, then hits");
    edge.stop().await;
}

/// An exact-URL purge removes every Vary variant; a query string is part of the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_url_covers_vary_variants_and_respects_the_query() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/v", |req, n| {
        Reply::ok(format!(
            "{} {n}",
            req.header("accept-language").unwrap_or("none")
        ))
        .header("vary", "Accept-Language")
        .header("cache-control", "max-age=600")
    });
    origin.route_fn("/q", |req, _| {
        Reply::ok(req.target.clone()).header("cache-control", "max-age=600")
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for lang in ["en", "de"] {
        let r = get_with(&c, &edge, "/v", &[("accept-language", lang)]).await;
        assert_eq!(r.x_cache(), "MISS", "{lang}: {r:?}");
    }
    for q in ["/q?a=1", "/q?a=2"] {
        assert_eq!(get(&c, &edge, q).await.x_cache(), "MISS", "{q}");
        assert_eq!(get_hit(&c, &edge, q).await.x_cache(), "HIT", "{q}");
    }
    assert_eq!((origin.hits("/v"), origin.hits("/q")), (2, 2));
    settled(&edge, 4).await;

    purge(&c, &edge, json!({ "urls": ["/v", "/q?a=1"] })).await;
    for lang in ["en", "de"] {
        let r = get_with(&c, &edge, "/v", &[("accept-language", lang)]).await;
        assert_eq!(
            r.x_cache(),
            "MISS",
            "variant {lang} after the URL purge: {r:?}"
        );
    }
    assert_eq!(origin.hits("/v"), 4);
    assert_eq!(get(&c, &edge, "/q?a=1").await.x_cache(), "MISS");
    let r = get(&c, &edge, "/q?a=2").await;
    assert_eq!(r.x_cache(), "HIT", "/q?a=2 was not purged: {r:?}");
    assert_eq!(origin.hits("/q"), 3);
    edge.stop().await;
}

/// An absolute URL purges that host's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_absolute_url() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/abs",
        Reply::ok("abs").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    assert_eq!(get(&c, &edge, "/abs").await.x_cache(), "MISS");
    assert_eq!(get_hit(&c, &edge, "/abs").await.x_cache(), "HIT");
    settled(&edge, 1).await;
    let receipt = purge(&c, &edge, json!({ "urls": [format!("http://{HOST}/abs")] })).await;
    assert_eq!(receipt["matched"], json!(1), "{receipt}");
    assert_eq!(get(&c, &edge, "/abs").await.x_cache(), "MISS");
    assert_eq!(origin.hits("/abs"), 2);
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_purge_requests_are_400_with_a_message() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let auth = bearer(ROOT);
    for (body, want) in [
        ("{}", "empty purge request"),
        (r#"{"soft": true}"#, "empty purge request"),
        (r#"{"url": ["/a"]}"#, "url"),
        ("not json", "invalid purge request"),
        (r#"{"prefixes": ["img/"]}"#, "prefixes[0]"),
    ] {
        let r = send(
            &c,
            "POST",
            &edge.admin_url("/purge"),
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            Some(body.to_string().into()),
        )
        .await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            msg.contains(want),
            "{body}: {msg:?} should mention {want:?}"
        );
    }
    // Sequence numbers increase.
    let a = purge(&c, &edge, json!({ "tags": ["x"] })).await["seq"]
        .as_u64()
        .unwrap();
    let b = purge(&c, &edge, json!({ "all": true })).await["seq"]
        .as_u64()
        .unwrap();
    assert!(b > a, "seq {a} then {b}");
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Purges survive a restart
// ---------------------------------------------------------------------------------------------

/// URL, prefix and tag purges, then a restart on the same cache dir: the purged objects stay
/// gone (MISS), the untouched one is still a HIT, and sequence numbers keep increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_objects_stay_gone_after_a_restart() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/keep.txt", "k");
    cacheable(&origin, "/gone-url.txt", "u");
    cacheable(&origin, "/old/gone-prefix.txt", "p");
    cacheable(&origin, "/gone-tag.txt", "doomed");
    let all = [
        "/keep.txt",
        "/gone-url.txt",
        "/old/gone-prefix.txt",
        "/gone-tag.txt",
    ];
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in all {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS", "{p}");
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT", "{p}");
    }
    edge.wait_disk_objects(4).await;
    purge(&c, &edge, json!({ "urls": ["/gone-url.txt"] })).await;
    purge(&c, &edge, json!({ "prefixes": ["/old/"] })).await;
    let before = purge(&c, &edge, json!({ "tags": ["doomed"] })).await["seq"]
        .as_u64()
        .unwrap();
    edge.stop().await;

    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let r = get(&c, &edge, "/keep.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "/keep.txt v0"),
        "an untouched object survives the restart: {r:?}"
    );
    for p in &all[1..] {
        let r = get(&c, &edge, p).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("MISS", format!("{p} v1")),
            "{p} was purged before the restart: {r:?}"
        );
        // Stored after the purge: a HIT (the persisted purge does not cover new copies).
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT", "{p}");
        assert_eq!(origin.hits(p), 2, "{p}");
    }
    assert_eq!(origin.hits("/keep.txt"), 1);
    let after = purge(&c, &edge, json!({ "urls": ["/nothing"] })).await["seq"]
        .as_u64()
        .unwrap();
    assert!(
        after > before,
        "seq went from {before} to {after} across a restart"
    );
    edge.stop().await;
}

/// A purge-all (hard) before a restart stays in force; objects stored after the restart are
/// valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_all_stays_in_force_after_a_restart() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/a.txt", "");
    cacheable(&origin, "/b/c.txt", "");
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in ["/a.txt", "/b/c.txt"] {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS");
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT");
    }
    edge.wait_disk_objects(2).await;
    purge(&c, &edge, json!({ "all": true })).await;
    edge.stop().await;

    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    for p in ["/a.txt", "/b/c.txt"] {
        let r = get(&c, &edge, p).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("MISS", format!("{p} v1")),
            "{p}: purge-all before the restart: {r:?}"
        );
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT", "{p}");
        assert_eq!(origin.hits(p), 2);
    }
    edge.stop().await;
}

/// A soft purge-all before a restart still marks the (still stored) objects stale after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_all_stays_in_force_after_a_restart() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/s.txt", "");
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    assert_eq!(get(&c, &edge, "/s.txt").await.x_cache(), "MISS");
    assert_eq!(get_hit(&c, &edge, "/s.txt").await.x_cache(), "HIT");
    edge.wait_disk_objects(1).await;
    purge(&c, &edge, json!({ "all": true, "soft": true })).await;
    edge.stop().await;

    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let r = get(&c, &edge, "/s.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "/s.txt v0"),
        "soft purge-all before the restart: {r:?}"
    );
    assert_eq!(origin.wait_hits("/s.txt", 2, WAIT).await, 2);
    let r = get_hit(&c, &edge, "/s.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "/s.txt v1"));
    assert_eq!(origin.hits("/s.txt"), 2);
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The PURGE method on the data port
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_method_on_the_data_port() {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    versioned_route(&origin, "/pm/hard.txt", ("surrogate-key", "pm"), &gate);
    versioned_route(&origin, "/pm/soft.txt", ("surrogate-key", "pm"), &gate);
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in ["/pm/hard.txt", "/pm/soft.txt"] {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS");
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT");
    }
    settled(&edge, 2).await;
    let url = edge.url("/pm/hard.txt");

    // No token: 401 with a challenge, and nothing is purged.
    let r = send(&c, "PURGE", &url, &[("host", HOST)], None).await;
    assert_eq!(r.status, 401, "{r:?}");
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "WWW-Authenticate: {challenge:?}"
    );
    // An unknown token: 401.
    let r = send(
        &c,
        "PURGE",
        &url,
        &[("host", HOST), ("authorization", "Bearer not-a-token")],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.header("www-authenticate").is_some(), "{r:?}");
    // Known tokens without the purge scope: 403.
    for t in [READER, PUSHER] {
        let auth = bearer(t);
        let r = send(
            &c,
            "PURGE",
            &url,
            &[("host", HOST), ("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(r.status, 403, "{t}: {r:?}");
    }
    let r = get(&c, &edge, "/pm/hard.txt").await;
    assert_eq!(r.x_cache(), "HIT", "refused PURGEs must not purge: {r:?}");
    assert_eq!(origin.hits("/pm/hard.txt"), 1);

    // The purge-only token: hard by default.
    gate.open();
    let auth = bearer(PURGER);
    let r = send(
        &c,
        "PURGE",
        &url,
        &[("host", HOST), ("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let receipt = r.json();
    assert_eq!(receipt["soft"], json!(false), "{receipt}");
    assert!(receipt["seq"].as_u64().is_some_and(|s| s >= 1), "{receipt}");
    let r = get(&c, &edge, "/pm/hard.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("MISS", "/pm/hard.txt v1"),
        "{r:?}"
    );
    assert_eq!(origin.hits("/pm/hard.txt"), 2);
    // The other object was not touched.
    assert_eq!(get(&c, &edge, "/pm/soft.txt").await.x_cache(), "HIT");

    // Soft-Purge: 1 → STALE, one revalidation, then HIT.
    let auth = bearer(ROOT);
    let r = send(
        &c,
        "PURGE",
        &edge.url("/pm/soft.txt"),
        &[
            ("host", HOST),
            ("authorization", auth.as_str()),
            ("soft-purge", "1"),
        ],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["soft"], json!(true));
    let r = get(&c, &edge, "/pm/soft.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("STALE", "/pm/soft.txt v0"),
        "{r:?}"
    );
    assert_eq!(origin.wait_hits("/pm/soft.txt", 2, WAIT).await, 2);
    let r = get_hit(&c, &edge, "/pm/soft.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "/pm/soft.txt v1"),
        "{r:?}"
    );
    assert_eq!(origin.hits("/pm/soft.txt"), 2);
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// In-flight fills, hosts, reclaim
// ---------------------------------------------------------------------------------------------

/// A purge that lands while the object is being fetched covers what that fetch stores: the
/// next request after the fill is a MISS with the new content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_during_a_fill_covers_the_object_being_fetched() {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    for path in ["/inflight/url.txt", "/inflight/tag.txt"] {
        let gate = gate.clone();
        origin.route_fn(path, move |_, n| {
            let r = Reply::ok(format!("{path} v{n}"))
                .header("cache-control", "public, max-age=600")
                .header("surrogate-key", "inflight");
            if n == 0 { r.gated(&gate) } else { r }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let url = edge.url("/inflight/url.txt");
    let tag = edge.url("/inflight/tag.txt");
    let (c1, c2) = (c.clone(), c.clone());
    let first_url =
        tokio::spawn(async move { send(&c1, "GET", &url, &[("host", HOST)], None).await });
    let first_tag =
        tokio::spawn(async move { send(&c2, "GET", &tag, &[("host", HOST)], None).await });
    assert_eq!(origin.wait_hits("/inflight/url.txt", 1, WAIT).await, 1);
    assert_eq!(origin.wait_hits("/inflight/tag.txt", 1, WAIT).await, 1);
    purge(&c, &edge, json!({ "urls": ["/inflight/url.txt"] })).await;
    purge(&c, &edge, json!({ "tags": ["inflight"] })).await;
    gate.open();
    for (first, p) in [
        (first_url, "/inflight/url.txt"),
        (first_tag, "/inflight/tag.txt"),
    ] {
        let r = first.await.unwrap();
        assert_eq!((r.status, r.text()), (200, format!("{p} v0")), "{r:?}");
    }
    // Let the fills finish: the exact-URL purge cancelled its fill (nothing of it stays
    // stored); the tag-purged one is stored, but with a purge sequence the purge covers.
    edge.wait_disk_objects(1).await;
    for p in ["/inflight/url.txt", "/inflight/tag.txt"] {
        let r = get(&c, &edge, p).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("MISS", format!("{p} v1")),
            "{p}: fetched before the purge, stored after it: {r:?}"
        );
        assert_eq!(origin.hits(p), 2, "{p}");
    }
    edge.stop().await;
}

/// `http://host/...` purges one host's copies; a bare path or prefix purges every host's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_urls_and_prefixes_are_per_host() {
    const A: &str = "a.example.test";
    const B: &str = "b.example.test";
    let origin = TestOrigin::start().await;
    for p in ["/h1/x.txt", "/h2/x.txt", "/h3/x.txt"] {
        origin.route_fn(p, |req, n| {
            Reply::ok(format!("{} {n}", req.header("host").unwrap_or("?")))
                .header("cache-control", "max-age=600")
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let get_on = |host: &'static str, path: &'static str| {
        let c = c.clone();
        let url = edge.url(path);
        async move { send(&c, "GET", &url, &[("host", host)], None).await }
    };
    for p in ["/h1/x.txt", "/h2/x.txt", "/h3/x.txt"] {
        for h in [A, B] {
            assert_eq!(get_on(h, p).await.x_cache(), "MISS", "{h}{p}");
        }
        assert_eq!(origin.hits(p), 2, "{p}: one object per host");
    }
    settled(&edge, 6).await;
    for p in ["/h1/x.txt", "/h2/x.txt", "/h3/x.txt"] {
        for h in [A, B] {
            assert_eq!(get_on(h, p).await.x_cache(), "HIT", "{h}{p}");
        }
    }

    purge(
        &c,
        &edge,
        json!({ "urls": [format!("http://{A}/h1/x.txt")] }),
    )
    .await;
    assert_eq!(get_on(A, "/h1/x.txt").await.x_cache(), "MISS");
    assert_eq!(
        get_on(B, "/h1/x.txt").await.x_cache(),
        "HIT",
        "another host's copy"
    );
    assert_eq!(origin.hits("/h1/x.txt"), 3);

    purge(
        &c,
        &edge,
        json!({ "prefixes": [format!("http://{B}/h2/")] }),
    )
    .await;
    assert_eq!(get_on(B, "/h2/x.txt").await.x_cache(), "MISS");
    assert_eq!(
        get_on(A, "/h2/x.txt").await.x_cache(),
        "HIT",
        "another host's copy"
    );
    assert_eq!(origin.hits("/h2/x.txt"), 3);

    purge(&c, &edge, json!({ "prefixes": ["/h3/"] })).await;
    for h in [A, B] {
        assert_eq!(
            get_on(h, "/h3/x.txt").await.x_cache(),
            "MISS",
            "a bare prefix covers {h}"
        );
    }
    assert_eq!(origin.hits("/h3/x.txt"), 4);
    edge.stop().await;
}

/// A request that arrives after a hard purge was acknowledged is not answered from an origin
/// fetch that started before the purge (that is the purged version): it fetches anew. Whoever
/// was already waiting on the old fetch gets the old answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_a_purge_does_not_join_a_fetch_started_before_it() {
    let origin = TestOrigin::start().await;
    let gate = Gate::new();
    for path in ["/join/url.txt", "/join/tag.txt"] {
        let gate = gate.clone();
        origin.route_fn(path, move |_, n| {
            let r = Reply::ok(format!("{path} v{n}"))
                .header("cache-control", "public, max-age=600")
                .header("surrogate-key", "joined");
            if n == 0 { r.gated(&gate) } else { r }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    // Requests held at the origin must outlive the waits below.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT * 3)
        .build()
        .unwrap();
    let spawn_get = |path: &'static str| {
        let c = c.clone();
        let url = edge.url(path);
        tokio::spawn(async move { send(&c, "GET", &url, &[("host", HOST)], None).await })
    };
    // Fetches in flight (held at the origin).
    let before_url = spawn_get("/join/url.txt");
    let before_tag = spawn_get("/join/tag.txt");
    assert_eq!(origin.wait_hits("/join/url.txt", 1, WAIT).await, 1);
    assert_eq!(origin.wait_hits("/join/tag.txt", 1, WAIT).await, 1);
    purge(&c, &edge, json!({ "urls": ["/join/url.txt"] })).await;
    purge(&c, &edge, json!({ "tags": ["joined"] })).await;
    // Requests after the purges.
    let after_url = spawn_get("/join/url.txt");
    let after_tag = spawn_get("/join/tag.txt");
    // Both should reach the origin while the old fetches are still held (one bounded wait,
    // shorter than the edge's 30 s first-byte timeout on the held fetches).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (origin.hits("/join/url.txt") < 2 || origin.hits("/join/tag.txt") < 2)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (fetched_url, fetched_tag) = (origin.hits("/join/url.txt"), origin.hits("/join/tag.txt"));
    gate.open();
    for (h, p, fetched) in [
        (after_url, "/join/url.txt", fetched_url),
        (after_tag, "/join/tag.txt", fetched_tag),
    ] {
        let r = h.await.unwrap();
        assert_eq!(
            (r.x_cache(), r.text(), fetched),
            ("MISS", format!("{p} v1"), 2),
            "{p}: a request sent after the purge got the pre-purge fetch (origin requests: \
             {fetched}): {r:?}"
        );
    }
    for (h, p) in [(before_url, "/join/url.txt"), (before_tag, "/join/tag.txt")] {
        assert_eq!(
            h.await.unwrap().text(),
            format!("{p} v0"),
            "{p}: in flight before"
        );
    }
    edge.stop().await;
}

/// Objects a hard tag or prefix purge made unreachable leave the disk tier without any request
/// for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_purges_are_reclaimed_from_disk_in_the_background() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/rc/1.txt", "reclaim");
    cacheable(&origin, "/rc/2.txt", "reclaim");
    cacheable(&origin, "/rc/3.txt", "");
    cacheable(&origin, "/keep/4.txt", "");
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in ["/rc/1.txt", "/rc/2.txt", "/rc/3.txt", "/keep/4.txt"] {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS");
    }
    settled(&edge, 4).await;
    purge(&c, &edge, json!({ "tags": ["reclaim"] })).await;
    purge(&c, &edge, json!({ "prefixes": ["/rc/"] })).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        edge.engine().run_pending_tasks().await;
        let disk = edge.engine().usage()[1].1;
        if disk == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the disk tier still holds {disk} objects; 3 of 4 were hard-purged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&c, &edge, "/keep/4.txt").await.x_cache(), "HIT");
    edge.stop().await;
}
