//! The admin API's authentication: tokens and scopes (401, 403), private metrics, secrets that
//! never reach the logs (the real binary with debug logs), the loopback-only open admin API,
//! and the token from `OUTPOST_ADMIN_TOKEN` (edge and CLI).
//!
//! The edges run in-process on a disk tier in a tempdir with the admin tokens of
//! `support::admin`, in front of the programmable test origin, which counts every request.
//! Every wait is bounded; nothing asserts on speed.

use outpost_config::Source;
use outpost_edge::{EdgeConfig, EdgeServer};
use serde_json::json;

use crate::support::admin::{
    self, Extra, HOST, PURGER, PUSHER, READER, ROOT, bearer, cacheable, list, purge_as, push_as,
};
use crate::support::client;
use crate::support::http::send;
use crate::support::proc::{Spawn, cli_with_env};
use crate::support::test_origin::{Reply, TestOrigin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_a_token_with_the_right_scope() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let purge_body = json!({ "all": true });

    // Missing token: 401 + challenge.
    let r = purge_as(&c, &edge, None, purge_body.clone()).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"outpost\""),
        "{r:?}"
    );
    // A malformed or unknown token: 401.
    let r = send(
        &c,
        "POST",
        &edge.admin_url("/purge"),
        &[("authorization", &format!("Basic {ROOT}"))],
        Some(purge_body.to_string().into()),
    )
    .await;
    assert_eq!(r.status, 401, "Basic scheme: {r:?}");
    let r = purge_as(&c, &edge, Some("wrong-token-1234"), purge_body.clone()).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.contains("invalid_token")),
        "{r:?}"
    );
    // Wrong scope: 403 naming the scope.
    for t in [READER, PUSHER] {
        let r = purge_as(&c, &edge, Some(t), purge_body.clone()).await;
        assert_eq!(r.status, 403, "{t}: {r:?}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.contains("insufficient_scope") && v.contains("purge")),
            "{r:?}"
        );
    }
    assert_eq!(
        purge_as(&c, &edge, Some(PURGER), purge_body.clone())
            .await
            .status,
        200
    );

    // Push needs `push`.
    let r = send(
        &c,
        "PUT",
        &edge.admin_url("/objects/x.txt"),
        &[],
        Some("x".into()),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.header("www-authenticate").is_some());
    for t in [READER, PURGER] {
        let r = push_as(&c, &edge, t, "/x.txt", b"x", &[]).await;
        assert_eq!(r.status, 403, "{t}: {r:?}");
    }
    assert!(
        list(&c, &edge, "/").await.is_empty(),
        "refused pushes stored nothing"
    );
    let r = push_as(&c, &edge, PUSHER, "/x.txt", b"x", &[]).await;
    assert_eq!(r.status, 201, "{r:?}");

    // Delete needs `push`.
    let r = send(&c, "DELETE", &edge.admin_url("/objects/x.txt"), &[], None).await;
    assert_eq!(r.status, 401, "{r:?}");
    let auth = bearer(READER);
    let r = send(
        &c,
        "DELETE",
        &edge.admin_url("/objects/x.txt"),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        list(&c, &edge, "/").await.len(),
        1,
        "a refused DELETE removed it"
    );

    // Listing needs `read`.
    let r = send(&c, "GET", &edge.admin_url("/objects?prefix=/"), &[], None).await;
    assert_eq!(r.status, 401, "{r:?}");
    for t in [PUSHER, PURGER] {
        let auth = bearer(t);
        let r = send(
            &c,
            "GET",
            &edge.admin_url("/objects?prefix=/"),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(r.status, 403, "{t}: {r:?}");
    }

    // The live request stream (`outpost log`) shows full URLs, query strings and all: it needs
    // `read` even though /metrics is public here.
    let r = send(&c, "GET", &edge.admin_url("/log"), &[], None).await;
    assert_eq!(r.status, 401, "{r:?}");
    let auth = bearer(PUSHER);
    let r = send(
        &c,
        "GET",
        &edge.admin_url("/log?status=bogus"),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    let auth = bearer(READER);
    let r = send(
        &c,
        "GET",
        &edge.admin_url("/log?status=bogus"),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 400, "the reader gets as far as the filter: {r:?}");
    edge.stop().await;
}

/// `public_metrics = false`: `/metrics`, `/stats` and `/usage` need the read scope; `/healthz`
/// never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_metrics_need_the_read_scope() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        admin: "public_metrics = false",
        ..Default::default()
    };
    let edge = admin::start(&origin, dir.path(), extra).await;
    let c = client();
    assert_eq!(
        send(&c, "GET", &edge.admin_url("/healthz"), &[], None)
            .await
            .status,
        200
    );
    for p in ["/metrics", "/stats", "/usage"] {
        let r = send(&c, "GET", &edge.admin_url(p), &[], None).await;
        assert_eq!(r.status, 401, "{p}: {r:?}");
        let auth = bearer(PURGER);
        let r = send(
            &c,
            "GET",
            &edge.admin_url(p),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(r.status, 403, "{p}: {r:?}");
        let auth = bearer(READER);
        let r = send(
            &c,
            "GET",
            &edge.admin_url(p),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{p}: {r:?}");
    }
    edge.stop().await;
}

/// The real binary with `RUST_LOG=debug`: requests with a right and a wrong token on the admin
/// port and with the data port's `PURGE`; after a clean stop, neither secret is in its logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs() {
    const RIGHT: &str = "logcheck-right-Q7w9Zk2mX4";
    const WRONG: &str = "logcheck-wrong-P3v8Hn6tY1";
    let origin = TestOrigin::start().await;
    origin.route(
        "/logged.txt",
        Reply::ok("logged").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\norigin = \"{}\"\n[cache]\ndir = \"{}\"\n[admin]\ntokens = [{{ secret = \"{RIGHT}\", scopes = [\"purge\", \"push\", \"read\"] }}]\n",
            origin.base_url(),
            cache.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let config = config.display().to_string();
    let node = Spawn::new(["edge", "--config", &config])
        .env("RUST_LOG", "debug")
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .env_remove("OUTPOST_LOG_FORMAT")
        .start(&log)
        .await;
    let c = client();
    let (addr, admin) = (node.addr, node.admin());

    let admin_url = |p: &str| format!("http://{admin}{p}");
    let data_url = |p: &str| format!("http://{addr}{p}");
    let right = bearer(RIGHT);
    let wrong = bearer(WRONG);
    let purge_body = || {
        Some(reqwest::Body::from(
            json!({ "urls": ["/logged.txt"] }).to_string(),
        ))
    };
    // Admin port.
    let r = send(
        &c,
        "POST",
        &admin_url("/purge"),
        &[("authorization", right.as_str())],
        purge_body(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        &c,
        "POST",
        &admin_url("/purge"),
        &[("authorization", wrong.as_str())],
        purge_body(),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = send(
        &c,
        "PUT",
        &admin_url("/objects/logged/a.txt"),
        &[("authorization", right.as_str())],
        Some("a".into()),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = send(
        &c,
        "PUT",
        &admin_url("/objects/logged/b.txt"),
        &[("authorization", wrong.as_str())],
        Some("b".into()),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = send(
        &c,
        "GET",
        &admin_url("/objects?prefix=/"),
        &[("authorization", wrong.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    // Data port.
    let r = send(&c, "GET", &data_url("/logged.txt"), &[("host", HOST)], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        &c,
        "PURGE",
        &data_url("/logged.txt"),
        &[("host", HOST), ("authorization", right.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        &c,
        "PURGE",
        &data_url("/logged.txt"),
        &[("host", HOST), ("authorization", wrong.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");

    // Stop it cleanly (SIGTERM) so every log line is written.
    let status = node.terminate().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status}; log:\n{text}");
    // The logs are on (so the check means something) ...
    assert!(text.contains("purge applied"), "no purge log line:\n{text}");
    assert!(
        text.contains("admin request"),
        "no debug admin log line:\n{text}"
    );
    // ... and hold neither secret.
    for secret in [RIGHT, WRONG] {
        assert!(
            !text.contains(secret),
            "the token {secret:?} appears in the edge's logs:\n{}",
            text.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Without any token, the admin API may only listen on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_admin_api_refuses_a_non_loopback_address() {
    if std::env::var_os("OUTPOST_ADMIN_TOKEN").is_some() {
        eprintln!("skipped: OUTPOST_ADMIN_TOKEN is set in this environment");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = |admin: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"{admin}\"\norigin = \"http://127.0.0.1:9\"\n[cache]\ndir = \"{}\"\n",
            dir.path().display()
        )
    };
    let cfg = EdgeConfig::from_source(
        &Source::inline("e.toml", text("0.0.0.0:0")),
        Default::default(),
    )
    .unwrap();
    match EdgeServer::bind(cfg).await {
        Err(e) => assert!(e.to_string().contains("without a token"), "{e}"),
        Ok(_) => panic!("an admin API without a token started on 0.0.0.0"),
    }
    let cfg = EdgeConfig::from_source(
        &Source::inline("e.toml", text("127.0.0.1:0")),
        Default::default(),
    )
    .unwrap();
    assert!(
        EdgeServer::bind(cfg).await.is_ok(),
        "loopback without a token is allowed"
    );
}

/// The binary takes its admin token from `OUTPOST_ADMIN_TOKEN` (edge and CLI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_can_come_from_the_environment() {
    const ENV_TOKEN: &str = "env-token-9Kq2Lm5Xz8";
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/env.txt", "env");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let cache = dir.path().join("cache").display().to_string();
    let node = Spawn::edge(&origin.base_url(), &["--cache-dir", &cache])
        .env("OUTPOST_ADMIN_TOKEN", ENV_TOKEN)
        .start(&log)
        .await;
    let c = client();
    let (addr, admin) = (node.addr, node.admin());
    let data = |p: &str| format!("http://{addr}{p}");
    let r = send(&c, "GET", &data("/env.txt"), &[("host", HOST)], None).await;
    assert_eq!(r.x_cache(), "MISS");
    // Without a token: 401 (a configured env token closes the API).
    let r = send(
        &c,
        "POST",
        &format!("http://{admin}/purge"),
        &[],
        Some(json!({ "all": true }).to_string().into()),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    // The CLI reads the same variable.
    let out = cli_with_env(
        &[
            "purge",
            "--admin",
            &format!("http://{admin}"),
            "--tag",
            "env",
        ],
        &[("OUTPOST_ADMIN_TOKEN", ENV_TOKEN)],
    )
    .await;
    assert!(
        out.status.success(),
        "outpost purge with the env token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = send(&c, "GET", &data("/env.txt"), &[("host", HOST)], None).await;
    assert_eq!(r.x_cache(), "MISS", "purged with the env token: {r:?}");
    assert_eq!(origin.hits("/env.txt"), 2);
    drop(node);
}
