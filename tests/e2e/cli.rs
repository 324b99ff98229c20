//! The CLI against a running edge: `outpost push` of a directory and `outpost purge --tag`.
//!
//! The edges run in-process on a disk tier in a tempdir with the admin tokens of
//! `support::admin`, in front of the programmable test origin, which counts every request.
//! Every wait is bounded; nothing asserts on speed.

use serde_json::{Value, json};

use crate::support::admin::{
    self, Extra, PURGER, PUSHER, READER, cacheable, get, get_hit, list, settled, sha256_hex,
};
use crate::support::client;
use crate::support::files::{pattern_vec as pattern, write};
use crate::support::proc::cli;
use crate::support::test_origin::TestOrigin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_push_of_a_directory_then_served_as_hits() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let site = tempfile::tempdir().unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("index.html", b"<h1>hi</h1>".to_vec()),
        ("css/site.css", b"body { color: red }".to_vec()),
        ("js/lib/app.js", b"console.log('app')".to_vec()),
        ("img/deep/er/logo.bin", pattern(70_000, 9)),
    ];
    for (rel, data) in &files {
        write(&site.path().join(rel), data);
    }
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    let out = cli(&[
        "push",
        "--admin",
        &format!("http://{}", edge.admin()),
        "--token",
        PUSHER,
        "--prefix",
        "/static/",
        site.path().to_str().unwrap(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "outpost push failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("pushed 4 files"), "summary: {stdout}");
    for (rel, data) in &files {
        let p = format!("/static/{rel}");
        let r = get(&c, &edge, &p).await;
        assert_eq!((r.status, r.x_cache()), (200, "HIT"), "{p}: {r:?}");
        assert_eq!(r.body.as_ref(), data.as_slice(), "{p}: bytes");
        assert_eq!(
            r.header("etag"),
            Some(format!("\"{}\"", sha256_hex(data)).as_str()),
            "{p}"
        );
    }
    assert_eq!(origin.total_hits(), 0, "everything came from the push");
    assert_eq!(list(&c, &edge, "/static/").await.len(), files.len());

    // A token without the push scope: non-zero exit, nothing more stored.
    write(&site.path().join("new.txt"), b"new");
    let out = cli(&[
        "push",
        "--admin",
        &format!("http://{}", edge.admin()),
        "--token",
        READER,
        site.path().join("new.txt").to_str().unwrap(),
    ])
    .await;
    assert!(
        !out.status.success(),
        "push with a read-only token succeeded"
    );
    assert!(list(&c, &edge, "/new.txt").await.is_empty());
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_purge_by_tag_prints_a_receipt() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/t/one.txt", "t other");
    cacheable(&origin, "/t/two.txt", "other");
    let dir = tempfile::tempdir().unwrap();
    let edge = admin::start(&origin, dir.path(), Extra::default()).await;
    let c = client();
    for p in ["/t/one.txt", "/t/two.txt"] {
        assert_eq!(get(&c, &edge, p).await.x_cache(), "MISS");
        assert_eq!(get_hit(&c, &edge, p).await.x_cache(), "HIT");
    }
    settled(&edge, 2).await;
    let out = cli(&[
        "purge",
        "--admin",
        &format!("http://{}", edge.admin()),
        "--token",
        PURGER,
        "--tag",
        "t",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "outpost purge failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let receipt: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the receipt is not JSON ({e}): {stdout}"));
    assert!(receipt["seq"].as_u64().is_some_and(|s| s >= 1), "{receipt}");
    assert_eq!(receipt["kinds"], json!(["tag"]), "{receipt}");
    assert_eq!(receipt["soft"], json!(false), "{receipt}");
    let r = get(&c, &edge, "/t/one.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "/t/one.txt v1"));
    assert_eq!(get(&c, &edge, "/t/two.txt").await.x_cache(), "HIT");

    // A token without the purge scope: non-zero exit.
    let out = cli(&[
        "purge",
        "--admin",
        &format!("http://{}", edge.admin()),
        "--token",
        READER,
        "--all",
    ])
    .await;
    assert!(
        !out.status.success(),
        "purge with a read-only token succeeded"
    );
    assert_eq!(get(&c, &edge, "/t/two.txt").await.x_cache(), "HIT");

    // A URL purge that matched nothing: still exit 0 (a later request is a miss either way),
    // with a hint that the URL may be mistyped.
    let out = cli(&[
        "purge",
        "--admin",
        &format!("http://{}", edge.admin()),
        "--token",
        PURGER,
        "/t/never-cached.txt",
    ])
    .await;
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing matched"), "{stderr}");
    edge.stop().await;
}

/// `outpost push` to an admin port nobody listens on (issue 19): one clear message and a
/// non-zero exit, before any file is tried, not a failure line per file after retries.
#[tokio::test]
async fn push_to_an_unreachable_admin_fails_fast_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..20 {
        write(&dir.path().join(format!("f{i}.txt")), b"x");
    }
    let dead = crate::support::ports::refused_addr();
    let out = cli(&[
        "push",
        "--admin",
        &format!("http://{}", dead.addr),
        "--token",
        PUSHER,
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains(&dead.addr.to_string())
            && lines[0].contains("nothing was pushed")
            && !lines[0].contains("client error"),
        "{stderr}"
    );
}

/// A busy address: every role says which address and which flag changes it, once, and exits
/// non-zero.
#[tokio::test]
async fn a_busy_address_is_named_once() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let site = crate::support::repo().join("site");
    let site = site.to_str().unwrap();
    let runs = [
        vec!["origin", "--listen", addr.as_str(), "--root", site],
        vec![
            "edge",
            "--listen",
            addr.as_str(),
            "--origin",
            "http://127.0.0.1:9",
        ],
    ];
    for args in runs {
        let out = cli(&args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert_eq!(
            stderr.matches(addr.as_str()).count(),
            1,
            "{args:?}: once\n{stderr}"
        );
        assert!(
            stderr.contains("listen"),
            "{args:?}: names the setting\n{stderr}"
        );
    }
    // The demo takes every port from --base-port: its message says so (the origin, at P+1,
    // finds its port taken).
    let port = held.local_addr().unwrap().port();
    let cache = tempfile::tempdir().unwrap();
    let out = cli(&[
        "demo",
        "--base-port",
        &(port - 1).to_string(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("in use") && stderr.contains("--base-port"),
        "the demo names --base-port:\n{stderr}"
    );
    drop(held);
}

/// `outpost --version` names the commit the binary was built from, as `/metrics` does
/// (`outpost_build_info`).
#[tokio::test]
async fn version_names_the_commit() {
    let out = cli(&["--version"]).await;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success(), "{text}");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(crate::support::repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let want = format!("outpost {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want), "{text}");
    if let Some(head) = head {
        // The commit built from (a build from a changed tree says so with -dirty).
        assert!(text.contains(&head), "{text} should name {head}");
    }
}
