//! Cache busting with versioned URLs and normalised query strings: versions are distinct
//! objects, ignored and reordered parameters collapse to one key, `strip_version_param` and
//! `versioned_ttl`.
//!
//! The edges run in-process on a disk tier in a tempdir with the admin tokens of
//! `support::admin`, in front of the programmable test origin, which counts every request.
//! Every wait is bounded; nothing asserts on speed.

use crate::support::admin::{self, Extra, get, get_hit};
use crate::support::client;
use crate::support::test_origin::{Reply, TestOrigin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_urls_are_distinct_objects() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/app.js", |req, _| {
        Reply::ok(format!("served {}", req.target)).header("cache-control", "max-age=600")
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for v in ["3", "4"] {
        let r = get(&c, &edge, &format!("/app.js?v={v}")).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("MISS", format!("served /app.js?v={v}")),
            "{r:?}"
        );
    }
    assert_eq!(
        origin.hits("/app.js"),
        2,
        "two versions, two origin requests"
    );
    for v in ["3", "4"] {
        let r = get_hit(&c, &edge, &format!("/app.js?v={v}")).await;
        assert_eq!(
            (r.x_cache(), r.text()),
            ("HIT", format!("served /app.js?v={v}")),
            "{r:?}"
        );
    }
    assert_eq!(origin.hits("/app.js"), 2);
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_and_reordered_query_params_collapse_to_one_key() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/p", |_, n| {
        Reply::ok(format!("p {n}")).header("cache-control", "max-age=600")
    });
    origin.route_fn("/q", |_, n| {
        Reply::ok(format!("q {n}")).header("cache-control", "max-age=600")
    });
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        cache: "ignore_query_params = [\"utm_source\"]",
        ..Default::default()
    };
    let edge = admin::start(&origin, dir.path(), extra).await;
    let c = client();
    let r = get(&c, &edge, "/p?utm_source=a").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "p 0"));
    let r = get_hit(&c, &edge, "/p?utm_source=b").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "p 0"), "{r:?}");
    let r = get_hit(&c, &edge, "/p").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "p 0"), "{r:?}");
    assert_eq!(origin.hits("/p"), 1, "utm_source is not part of the key");
    // A parameter that is not ignored still is.
    let r = get(&c, &edge, "/p?utm_source=a&id=2").await;
    assert_eq!(r.x_cache(), "MISS", "{r:?}");
    assert_eq!(origin.hits("/p"), 2);
    // Order does not matter.
    assert_eq!(get(&c, &edge, "/q?a=1&b=2").await.x_cache(), "MISS");
    let r = get_hit(&c, &edge, "/q?b=2&a=1").await;
    assert_eq!(r.x_cache(), "HIT", "sorted parameters: {r:?}");
    assert_eq!(origin.hits("/q"), 1);
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_version_param_hides_it_from_the_origin() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/app.js", |req, n| {
        Reply::ok(format!("current {n} for {}", req.target)).header("cache-control", "max-age=600")
    });
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        cache: "strip_version_param = true",
        ..Default::default()
    };
    let edge = admin::start(&origin, dir.path(), extra).await;
    let c = client();
    let r = get(&c, &edge, "/app.js?v=3").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("MISS", "current 0 for /app.js")
    );
    assert_eq!(origin.last_request("/app.js").unwrap().target, "/app.js");
    let r = get(&c, &edge, "/app.js?v=4&lang=en").await;
    assert_eq!(r.x_cache(), "MISS", "still a distinct object: {r:?}");
    assert_eq!(
        origin.last_request("/app.js").unwrap().target,
        "/app.js?lang=en",
        "only the version parameter is stripped"
    );
    let r = get_hit(&c, &edge, "/app.js?v=3").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "current 0 for /app.js")
    );
    assert_eq!(origin.hits("/app.js"), 2);
    edge.stop().await;
}

/// A versioned response without explicit freshness is cached thanks to `versioned_ttl`; the
/// same response without a version, or a versioned one with its own freshness, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_ttl_applies_to_versioned_responses_without_freshness() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/lib.js", |_, n| {
        Reply::ok(format!("lib {n}")).header("content-type", "application/javascript")
    });
    origin.route_fn("/own.js", |_, n| {
        Reply::ok(format!("own {n}")).header("cache-control", "max-age=0")
    });
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        cache: "versioned_ttl = \"30days\"",
        ..Default::default()
    };
    let edge = admin::start(&origin, dir.path(), extra).await;
    let c = client();
    let r = get(&c, &edge, "/lib.js?v=7").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "lib 0"));
    let r = get_hit(&c, &edge, "/lib.js?v=7").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "lib 0"),
        "versioned_ttl: {r:?}"
    );
    assert_eq!(origin.hits("/lib.js"), 1);
    // The unversioned URL has no freshness: not served from cache as fresh.
    get(&c, &edge, "/lib.js").await;
    let r = get(&c, &edge, "/lib.js").await;
    assert_ne!(r.x_cache(), "HIT", "no version, no freshness: {r:?}");
    assert_eq!(origin.hits("/lib.js"), 3);
    // Explicit freshness wins over versioned_ttl.
    get(&c, &edge, "/own.js?v=1").await;
    let r = get(&c, &edge, "/own.js?v=1").await;
    assert_ne!(r.x_cache(), "HIT", "max-age=0 is explicit freshness: {r:?}");
    assert_eq!(origin.hits("/own.js"), 2);
    edge.stop().await;
}
