//! Fleet mode, end to end, over a real `nats-server -js` on loopback: a purge accepted by one
//! node reaches every node, with a receipt listing each node and the sequence it applied; a
//! purge accepted while NATS is down applies locally at once, waits in the node's outbox
//! (across a restart of that node) and reaches the others when NATS is back; a node that starts
//! is not ready until it has caught up with the stream.
//!
//! The edges run in-process with disk tiers in temp dirs, in front of the counting test
//! origin. Every wait is bounded; nothing asserts on speed.

use std::path::Path;

use serde_json::{Value, json};

use crate::support::admin::{self, Extra, cacheable, get, get_hit, purge};
use crate::support::edge::Edge;
use crate::support::http::send;
use crate::support::nats::Nats;
use crate::support::proc::cli;
use crate::support::test_origin::TestOrigin;
use crate::support::{client, eventually};

const PATH: &str = "/fleet/site.css";

/// The `[fleet]` section (after the `[admin]` lines of `support::admin`), with a receipt wait
/// that bounds how long a purge's answer waits for every node.
fn fleet_section(nats: &Nats, receipt_wait: &str) -> String {
    format!(
        "\n[fleet]\nservers = [\"{}\"]\nreceipt_wait = \"{receipt_wait}\"\nstartup_wait = \"30s\"\n",
        nats.url()
    )
}

async fn node(origin: &TestOrigin, dir: &Path, name: &str, fleet: &str) -> Edge {
    admin::start(
        origin,
        dir,
        Extra {
            name: Some(name),
            admin: fleet,
            ..Default::default()
        },
    )
    .await
}

async fn admin_get(edge: &Edge, path: &str) -> (u16, String) {
    admin_get_url(&edge.admin_url(path)).await
}

/// GET with the root token (a node without tokens ignores it).
async fn admin_get_url(url: &str) -> (u16, String) {
    let bearer = admin::bearer(admin::ROOT);
    let r = send(&client(), "GET", url, &[("authorization", &bearer)], None).await;
    (r.status, r.text())
}

/// A node's `/fleet` document (`None` while it does not answer one).
async fn fleet_status_at(admin_url: &str) -> Option<Value> {
    let (status, body) = admin_get_url(admin_url).await;
    (status == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

async fn fleet_status(edge: &Edge) -> Option<Value> {
    fleet_status_at(&edge.admin_url("/fleet")).await
}

/// `n` cacheable origin paths `/<dir>/<i>.css`.
fn cacheable_paths(origin: &TestOrigin, dir: &str, n: usize) -> Vec<&'static str> {
    let paths: Vec<&'static str> = (0..n)
        .map(|i| &*Box::leak(format!("/{dir}/{i}.css").into_boxed_str()))
        .collect();
    for p in &paths {
        cacheable(origin, p, "");
    }
    paths
}

async fn ready(edge: &Edge) {
    eventually("the node is ready (caught up with the fleet)", async || {
        admin_get(edge, "/readyz").await.0 == 200
    })
    .await;
}

/// Waits until `edge`'s `/fleet` lists `n` nodes.
async fn sees_nodes(edge: &Edge, n: usize) {
    eventually("the node sees every node of the fleet", async || {
        fleet_status(edge)
            .await
            .and_then(|v| v["nodes"].as_array().map(Vec::len))
            == Some(n)
    })
    .await;
}

/// Caches PATH on `edge` (a MISS, then HITs).
async fn cached(edge: &Edge) {
    let c = client();
    let r = get(&c, edge, PATH).await;
    assert_eq!(r.status, 200);
    admin::settled(edge, 1).await;
    get_hit(&c, edge, PATH).await;
}

#[tokio::test]
async fn a_purge_on_one_node_reaches_every_node_with_a_receipt() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let origin = TestOrigin::start().await;
    cacheable(&origin, PATH, "");
    let fleet = fleet_section(&nats, "10s");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (dir, name) in dirs.iter().zip(["edge-a", "edge-b", "edge-c"]) {
        nodes.push(node(&origin, dir.path(), name, &fleet).await);
    }
    for n in &nodes {
        ready(n).await;
        cached(n).await;
    }
    assert_eq!(origin.hits(PATH), 3, "each node fetched once");
    sees_nodes(&nodes[0], 3).await;

    let receipt = purge(&client(), &nodes[0], json!({ "urls": [PATH] })).await;
    let seq = receipt["fleet_seq"].as_u64().expect("a fleet sequence");
    let listed = receipt["nodes"].as_array().unwrap();
    let mut names: Vec<_> = listed.iter().map(|n| n["node"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["edge-a", "edge-b", "edge-c"], "{receipt}");
    for n in listed {
        assert_eq!(n["ok"], true, "{receipt}");
        assert!(n["applied_seq"].as_u64().unwrap() >= seq, "{receipt}");
        assert!(n.get("pending").is_none(), "{receipt}");
    }
    // Every node now misses: the origin is asked once more by each.
    let c = client();
    for n in &nodes {
        let r = get(&c, n, PATH).await;
        assert_eq!(r.x_cache(), "MISS", "after the fleet purge");
    }
    assert_eq!(origin.hits(PATH), 6);
    // `outpost purge --wait` prints the same kind of receipt and exits 0 when every node
    // confirmed.
    let out = cli(&[
        "purge",
        "--admin",
        &format!("http://{}", nodes[1].admin()),
        "--token",
        admin::ROOT,
        "--wait",
        "10s",
        PATH,
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let receipt: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(receipt["nodes"].as_array().unwrap().len(), 3, "{receipt}");

    // The metrics say who published and who applied.
    let metric = async |edge: &Edge, name: &str| -> f64 {
        let (_, body) = admin_get(edge, "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics:\n{body}"))
    };
    assert!(metric(&nodes[0], "outpost_fleet_purges_published_total").await >= 1.0);
    assert_eq!(metric(&nodes[0], "outpost_fleet_connected").await, 1.0);
    assert!(metric(&nodes[2], "outpost_fleet_purges_applied_total").await >= 2.0);
    assert_eq!(metric(&nodes[2], "outpost_fleet_outbox_purges").await, 0.0);
}

#[tokio::test]
async fn purges_made_while_nats_is_down_wait_in_the_outbox_across_a_restart() {
    let Some(mut nats) = Nats::start().await else {
        return;
    };
    let origin = TestOrigin::start().await;
    cacheable(&origin, PATH, "");
    let fleet = fleet_section(&nats, "10s");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&origin, dir_a.path(), "edge-a", &fleet).await;
    let b = node(&origin, dir_b.path(), "edge-b", &fleet).await;
    for n in [&a, &b] {
        ready(n).await;
        cached(n).await;
    }

    nats.stop().await;
    let receipt = purge(&client(), &a, json!({ "urls": [PATH] })).await;
    assert!(receipt.get("fleet_seq").is_none(), "{receipt}");
    assert_eq!(receipt["nodes"][0]["pending"], true, "{receipt}");
    assert!(
        receipt["nodes"][0]["error"]
            .as_str()
            .unwrap()
            .starts_with("fleet delivery pending"),
        "{receipt}"
    );
    // Applied on A at once.
    assert_eq!(get(&client(), &a, PATH).await.x_cache(), "MISS");
    // B still has it: nothing reached it.
    assert_eq!(get(&client(), &b, PATH).await.x_cache(), "HIT");

    // A restarts with NATS still down: the outbox is on disk.
    a.stop().await;
    assert_eq!(
        std::fs::read_dir(dir_a.path().join("fleet/outbox"))
            .unwrap()
            .count(),
        1,
        "one purge waits in the outbox"
    );
    let a = node(&origin, dir_a.path(), "edge-a", &fleet).await;
    nats.restart().await;
    let c = client();
    eventually("B applies the purge once NATS is back", async || {
        get(&c, &b, PATH).await.x_cache() == "MISS"
    })
    .await;
    eventually("A's outbox is empty", async || {
        fleet_status(&a).await.is_some_and(|v| v["outbox"] == 0)
    })
    .await;
}

#[tokio::test]
async fn a_node_that_was_down_catches_up_before_it_is_ready() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let origin = TestOrigin::start().await;
    let paths = cacheable_paths(&origin, "fleet/o", 20);
    let fleet = fleet_section(&nats, "10s");
    let (dir_a, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&origin, dir_a.path(), "edge-a", &fleet).await;
    let c_node = node(&origin, dir_c.path(), "edge-c", &fleet).await;
    ready(&a).await;
    ready(&c_node).await;
    let c = client();
    for p in &paths {
        get(&c, &c_node, p).await;
    }
    admin::settled(&c_node, paths.len() as u64).await;
    sees_nodes(&a, 2).await;
    c_node.stop().await;

    // 20 purges while C is away: each receipt lists C as pending.
    for p in &paths {
        // C is away: each receipt waits 300 ms for it.
        let receipt = purge(&client(), &a, json!({ "urls": [p], "wait_ms": 300 })).await;
        let c_entry = receipt["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "edge-c")
            .cloned()
            .unwrap_or_else(|| panic!("edge-c listed: {receipt}"));
        assert_eq!(c_entry["pending"], true, "{receipt}");
        assert_eq!(c_entry["ok"], false, "{receipt}");
    }
    // `outpost purge --wait` exits non-zero: C has not confirmed.
    let out = cli(&[
        "purge",
        "--admin",
        &format!("http://{}", a.admin()),
        "--token",
        admin::ROOT,
        "--wait",
        "200ms",
        paths[0],
    ])
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("some nodes did not apply the purge"),
        "{stderr}"
    );

    let c_node = node(&origin, dir_c.path(), "edge-c", &fleet).await;
    ready(&c_node).await;
    let status = fleet_status(&c_node).await.expect("/fleet");
    assert!(
        status["applied"].as_u64().unwrap() >= status["last_seq"].as_u64().unwrap(),
        "{status}"
    );
    // The 20 purges and the CLI's, all before ready.
    assert!(
        status["replayed"].as_u64() >= Some(paths.len() as u64 + 1),
        "{status}"
    );
    for p in &paths {
        assert_eq!(
            get(&c, &c_node, p).await.x_cache(),
            "MISS",
            "{p} after the replay"
        );
    }
}

#[tokio::test]
async fn an_object_pushed_on_one_node_is_a_hit_on_the_others_and_its_delete_follows() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let origin = TestOrigin::start().await;
    let fleet = fleet_section(&nats, "10s");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&origin, dir_a.path(), "edge-a", &fleet).await;
    let b = node(&origin, dir_b.path(), "edge-b", &fleet).await;
    ready(&a).await;
    ready(&b).await;

    // 300 KB: more than one of the object store's chunks.
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let path = "/fleet/pushed/app.js";
    let r = admin::push(
        &client(),
        &a,
        path,
        &body,
        &[
            ("content-type", "text/javascript"),
            ("surrogate-key", "release-9"),
        ],
    )
    .await;
    assert!(r.status == 201, "{}", r.text());
    let c = client();
    // B lists it like an object pushed to it (asked on the admin port: a GET on the data port
    // before it arrives would go to the origin).
    eventually("the object pushed on A reaches B", async || {
        admin::list(&c, &b, "/fleet/").await.len() == 1
    })
    .await;
    let listed = admin::list(&c, &b, "/fleet/").await;
    assert_eq!(listed[0]["path"], path);
    let r = get(&c, &b, path).await;
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(r.body.as_ref(), body.as_slice(), "the exact bytes");
    assert_eq!(r.header("content-type"), Some("text/javascript"));
    assert_eq!(origin.hits(path), 0, "never fetched from the origin");

    // A delete on A reaches B.
    let r = send(
        &c,
        "DELETE",
        &a.admin_url(&format!("/objects{path}")),
        &[("authorization", &admin::bearer(admin::ROOT))],
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    eventually("the delete reaches B", async || {
        admin::list(&c, &b, "/fleet/").await.is_empty()
    })
    .await;
    assert_ne!(get(&c, &b, path).await.x_cache(), "HIT");
}

/// A real `outpost edge` process, killed with SIGKILL while 500 purges are made on another
/// node, replays all of them before its `/readyz` says ready, and then serves none of them
/// from its disk tier.
#[tokio::test]
async fn a_node_killed_with_sigkill_replays_500_purges_before_it_is_ready() {
    use crate::support::admin::HOST;
    use crate::support::proc::Spawn;
    let Some(nats) = Nats::start().await else {
        return;
    };
    let origin = TestOrigin::start().await;
    let paths = cacheable_paths(&origin, "k", 500);
    let fleet = fleet_section(&nats, "10s");
    let (dir_a, dir_c, logs) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = node(&origin, dir_a.path(), "edge-a", &fleet).await;
    let c_dir = dir_c.path().display().to_string();
    let nats_url = nats.url();
    let spawn_c = || {
        Spawn::edge(
            &origin.base_url(),
            &[
                "--name",
                "edge-c",
                "--cache-dir",
                &c_dir,
                "--fleet-servers",
                &nats_url,
            ],
        )
    };
    let mut c_node = spawn_c().start(&logs.path().join("c1.log")).await;
    let http = client();
    let get_c = async |node: &crate::support::proc::NodeProc, p: &str| {
        send(&http, "GET", &node.url(p), &[("host", HOST)], None).await
    };
    for p in &paths {
        assert_eq!(get_c(&c_node, p).await.status, 200);
    }
    // Durable, so the restart after the kill has all 500 to replay the purges on.
    c_node.wait_disk_stored(500).await;
    assert_eq!(get_c(&c_node, paths[0]).await.x_cache(), "HIT");

    c_node.signal("KILL");
    c_node.wait_exit().await;
    for p in &paths {
        // Receipts without waiting for C (it is down).
        purge(&client(), &a, json!({ "urls": [p], "wait_ms": 0 })).await;
    }
    let c_node = spawn_c().start(&logs.path().join("c2.log")).await;
    eventually("C is ready again", async || {
        admin_get_url(&c_node.admin_url("/readyz")).await.0 == 200
    })
    .await;
    let status = fleet_status_at(&c_node.admin_url("/fleet"))
        .await
        .expect("/fleet");
    assert!(
        status["replayed"].as_u64() >= Some(500),
        "all replayed before ready: {status}"
    );
    assert!(
        status["applied"].as_u64() >= status["last_seq"].as_u64(),
        "{status}"
    );
    for p in &paths {
        assert_ne!(get_c(&c_node, p).await.x_cache(), "HIT", "{p} was purged");
    }
}

/// A node away for longer than the stream keeps purges cannot know what it missed: it clears
/// its whole cache when it comes back.
#[tokio::test]
async fn a_node_away_longer_than_max_age_clears_its_cache() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let origin = TestOrigin::start().await;
    cacheable(&origin, PATH, "");
    cacheable(&origin, "/fleet/other.css", "");
    let fleet = format!(
        "\n[fleet]\nservers = [\"{}\"]\nreceipt_wait = \"2s\"\nmax_age = \"1s\"\n",
        nats.url()
    );
    let (dir_a, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&origin, dir_a.path(), "edge-a", &fleet).await;
    let c_node = node(&origin, dir_c.path(), "edge-c", &fleet).await;
    ready(&a).await;
    ready(&c_node).await;
    let c = client();
    for p in [PATH, "/fleet/other.css"] {
        get(&c, &c_node, p).await;
    }
    admin::settled(&c_node, 2).await;
    c_node.stop().await;
    purge(&client(), &a, json!({ "urls": [PATH] })).await;
    // The purge expires from the stream while C is away.
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;

    let c_node = node(&origin, dir_c.path(), "edge-c", &fleet).await;
    ready(&c_node).await;
    let status = fleet_status(&c_node).await.expect("/fleet");
    assert_eq!(status["cleared"], 1, "{status}");
    for p in [PATH, "/fleet/other.css"] {
        assert_eq!(
            get(&c, &c_node, p).await.x_cache(),
            "MISS",
            "{p}: the cache was cleared"
        );
    }
}

/// A node that left for good holds up every receipt as pending until an operator forgets it
/// (`DELETE /fleet/nodes/<name>`, purge scope); a node still running comes back by itself.
#[tokio::test]
async fn a_node_that_left_is_forgotten_and_a_running_one_comes_back() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let origin = TestOrigin::start().await;
    let fleet = fleet_section(&nats, "10s");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(&origin, dirs[0].path(), "edge-a", &fleet).await;
    let b = node(&origin, dirs[1].path(), "edge-b", &fleet).await;
    let gone = node(&origin, dirs[2].path(), "edge-gone", &fleet).await;
    for n in [&a, &b, &gone] {
        ready(n).await;
    }
    sees_nodes(&a, 3).await;
    gone.stop().await;
    let r = purge(&client(), &a, json!({ "all": true, "wait_ms": 200 })).await;
    assert!(
        !r["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["ok"] == true),
        "{r}"
    );

    let forget = async |target: &Edge, name: &str, token: &str| {
        send(
            &client(),
            "DELETE",
            &target.admin_url(&format!("/fleet/nodes/{name}")),
            &[("authorization", &admin::bearer(token))],
            None,
        )
        .await
    };
    // The purge scope is needed; unknown nodes and the node itself are refused.
    assert_eq!(forget(&a, "edge-gone", admin::READER).await.status, 403);
    assert_eq!(forget(&a, "edge-nobody", admin::ROOT).await.status, 404);
    assert_eq!(forget(&a, "edge-a", admin::ROOT).await.status, 400);
    let r = forget(&a, "edge-gone", admin::ROOT).await;
    assert_eq!(r.status, 200, "{}", r.text());
    sees_nodes(&a, 2).await;
    let r = purge(&client(), &a, json!({ "all": true })).await;
    assert_eq!(r["nodes"].as_array().unwrap().len(), 2, "{r}");
    assert!(
        r["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["ok"] == true),
        "{r}"
    );

    // Forgetting a node that still runs: it reports again (after the tombstone) and is back.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert_eq!(forget(&a, "edge-b", admin::ROOT).await.status, 200);
    eventually("edge-b reports again", async || {
        fleet_status(&a).await.is_some_and(|v| {
            v["nodes"].as_array().is_some_and(|nodes| {
                nodes
                    .iter()
                    .any(|n| n["node"] == "edge-b" && n["reported_at_ms"].as_u64() >= Some(before))
            })
        })
    })
    .await;
}

/// A changed `fleet.max_age` reaches the stream the fleet already made.
#[tokio::test]
async fn a_changed_max_age_updates_the_stream() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let max_age_of = async |edge: &Edge| fleet_status(edge).await?["max_age_secs"].as_u64();
    for (max_age, secs) in [("1h", 3600), ("2h", 7200)] {
        let fleet = format!(
            "\n[fleet]\nservers = [\"{}\"]\nmax_age = \"{max_age}\"\n",
            nats.url()
        );
        let a = node(&origin, dir.path(), "edge-a", &fleet).await;
        ready(&a).await;
        eventually("the stream keeps purges as configured", async || {
            max_age_of(&a).await == Some(secs)
        })
        .await;
        a.stop().await;
    }
}
