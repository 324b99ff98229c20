//! Topology: edges in front of shields in front of the origin (issue "Topology").
//! Real sockets on 127.0.0.1, ports picked by the OS.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::client_within;
use crate::support::edge::Edge;
use crate::support::ports::refused_addr;
use crate::support::test_origin::{Reply, TestOrigin};

/// A node to put in a `[[shields]]` table: its data address and its admin address, if any.
trait Shield {
    fn data(&self) -> SocketAddr;
    fn admin(&self) -> Option<SocketAddr>;
}

impl Shield for Edge {
    fn data(&self) -> SocketAddr {
        self.addr
    }
    fn admin(&self) -> Option<SocketAddr> {
        self.admin
    }
}

/// A shield that is not there.
impl Shield for SocketAddr {
    fn data(&self) -> SocketAddr {
        *self
    }
    fn admin(&self) -> Option<SocketAddr> {
        None
    }
}

async fn node(text: &str) -> Edge {
    Edge::from_toml(text).await
}

async fn shield(name: &str, origin: &str) -> Edge {
    node(&format!(
        "role = \"shield\"\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\norigin = \"{origin}\"\n"
    ))
    .await
}

async fn edge(name: &str, origin: &str, shields: &[(&str, &dyn Shield)]) -> Edge {
    let mut text = format!(
        "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\norigin = \"{origin}\"\nshield_health_interval = \"200ms\"\n"
    );
    for (n, s) in shields {
        text.push_str(&format!(
            "[[shields]]\nname = \"{n}\"\nurl = \"http://{}\"\n",
            s.data()
        ));
        if let Some(a) = s.admin() {
            text.push_str(&format!("admin = \"{a}\"\n"));
        }
    }
    node(&text).await
}

fn client() -> reqwest::Client {
    client_within(Duration::from_secs(10))
}

async fn get(c: &reqwest::Client, node: &Edge, path: &str) -> (u16, String, String, String) {
    // Every edge serves one site: clients name it in Host, whichever edge they reach (in
    // production through the selector or DNS), so edges and shields agree on cache keys.
    let r = c
        .get(format!("http://{}{path}", node.addr))
        .header("host", "www.example.test")
        .send()
        .await
        .expect("request");
    let h = |n: &str| {
        r.headers()
            .get_all(n)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (status, via, cs) = (r.status().as_u16(), h("via"), h("cache-status"));
    (status, via, cs, r.text().await.unwrap())
}

#[tokio::test]
async fn second_edge_is_served_by_the_shield_without_a_new_origin_request() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/obj",
        Reply::ok("shielded bytes").header("cache-control", "public, max-age=600"),
    );
    let s = shield("shield-a", &origin.base_url()).await;
    let a = edge("edge-a", &origin.base_url(), &[("shield-a", &s)]).await;
    let b = edge("edge-b", &origin.base_url(), &[("shield-a", &s)]).await;
    let c = client();

    let (st, via, cs, body) = get(&c, &a, "/obj").await;
    assert_eq!((st, body.as_str()), (200, "shielded bytes"));
    assert!(
        via.contains("1.1 shield-a") && via.contains("1.1 edge-a"),
        "via: {via}"
    );
    assert!(cs.starts_with("shield-a; fwd=miss"), "cache-status: {cs}");
    assert!(cs.contains("edge-a; fwd=miss"), "cache-status: {cs}");

    let (st, _, cs, body) = get(&c, &b, "/obj").await;
    assert_eq!((st, body.as_str()), (200, "shielded bytes"));
    // One entry per hop, the shield's first (RFC 9211 list order).
    assert!(cs.starts_with("shield-a; hit"), "cache-status: {cs}");
    assert!(cs.contains("edge-b; fwd=miss"), "cache-status: {cs}");
    assert_eq!(origin.hits("/obj"), 1, "the shield protected the origin");
}

#[tokio::test]
async fn edges_fall_back_to_the_origin_when_every_shield_is_down() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/x",
        Reply::ok("direct").header("cache-control", "max-age=60"),
    );
    // A shield address with nothing listening.
    let dead = refused_addr();
    let e = edge("edge-a", &origin.base_url(), &[("ghost", &dead.addr)]).await;
    let (st, _, cs, body) = get(&client(), &e, "/x").await;
    assert_eq!((st, body.as_str()), (200, "direct"));
    assert!(cs.starts_with("edge-a; fwd=miss"), "{cs}");
    assert_eq!(origin.hits("/x"), 1);
}

#[tokio::test]
async fn keys_spread_over_shields_and_a_dead_shield_is_skipped() {
    let origin = TestOrigin::start().await;
    for i in 0..24 {
        origin.route(
            &format!("/k{i}"),
            Reply::ok(format!("v{i}")).header("cache-control", "max-age=600"),
        );
    }
    let s1 = shield("s1", &origin.base_url()).await;
    let s2 = shield("s2", &origin.base_url()).await;
    let s3 = shield("s3", &origin.base_url()).await;
    let e = edge(
        "edge",
        &origin.base_url(),
        &[("s1", &s1), ("s2", &s2), ("s3", &s3)],
    )
    .await;
    let c = client();
    let mut owner = Vec::new();
    for i in 0..24 {
        let (_, _, cs, body) = get(&c, &e, &format!("/k{i}")).await;
        assert_eq!(body, format!("v{i}"));
        owner.push(cs.split(';').next().unwrap().to_string());
    }
    for s in ["s1", "s2", "s3"] {
        assert!(owner.iter().any(|o| o == s), "{s} got no key: {owner:?}");
    }
    // A second edge with the same shields agrees on every key's shield.
    let e2 = edge(
        "edge2",
        &origin.base_url(),
        &[("s1", &s1), ("s2", &s2), ("s3", &s3)],
    )
    .await;
    for (i, o) in owner.iter().enumerate() {
        let (_, _, cs, _) = get(&c, &e2, &format!("/k{i}")).await;
        assert!(cs.starts_with(&format!("{o}; hit")), "key {i}: {cs}");
    }
    assert_eq!(origin.total_hits(), 24);

    // Stop s2: its keys move to the next shield in their order, the others stay.
    let s2_keys: Vec<usize> = (0..24).filter(|i| owner[*i] == "s2").collect();
    drop(s2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e3 = edge(
        "edge3",
        &origin.base_url(),
        &[
            ("s1", &s1),
            ("s2", &"127.0.0.1:9".parse::<SocketAddr>().unwrap()),
            ("s3", &s3),
        ],
    )
    .await;
    for (i, was) in owner.iter().enumerate() {
        let (st, _, cs, body) = get(&c, &e3, &format!("/k{i}")).await;
        assert_eq!((st, body), (200, format!("v{i}")));
        if !s2_keys.contains(&i) {
            assert!(
                cs.starts_with(&format!("{was}; hit")),
                "key {i} moved: {cs}"
            );
        } else {
            assert!(!cs.starts_with("s2"), "key {i} still on s2: {cs}");
        }
    }
}

const TOKEN: &str = "topology-secret";

async fn with_admin(text: String) -> Edge {
    node(&format!(
        "admin_listen = \"127.0.0.1:0\"\n{text}[cache]\ndir = \"{}\"\n[admin]\ntokens = [{{ secret = \"{TOKEN}\", scopes = [\"purge\", \"push\", \"read\"] }}]\n",
        tempfile::tempdir().unwrap().keep().display()
    ))
    .await
}

#[tokio::test]
async fn purges_and_pushes_sent_to_an_edge_reach_its_shield() {
    let origin = TestOrigin::start().await;
    origin.route_fn("/p", |_, n| {
        Reply::ok(format!("p v{n}")).header("cache-control", "max-age=600")
    });
    let shield = with_admin(format!(
        "role = \"shield\"\nname = \"shield-a\"\nlisten = \"127.0.0.1:0\"\norigin = \"{}\"\n",
        origin.base_url()
    ))
    .await;
    let edge = with_admin(format!(
        "name = \"edge-a\"\nlisten = \"127.0.0.1:0\"\norigin = \"{}\"\n[[shields]]\nname = \"shield-a\"\nurl = \"http://{}\"\nadmin = \"{}\"\n",
        origin.base_url(),
        shield.addr,
        shield.admin.unwrap()
    ))
    .await;
    let c = client();
    let (_, _, _, body) = get(&c, &edge, "/p").await;
    assert_eq!(body, "p v0");
    let (_, _, cs, _) = get(&c, &shield, "/p").await;
    assert!(cs.starts_with("shield-a; hit"), "{cs}");

    // A purge on the edge's admin API reaches the shield; the receipt names both nodes.
    let receipt: serde_json::Value = serde_json::from_slice(
        &c.post(format!("http://{}/purge", edge.admin.unwrap()))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(r#"{"urls": ["/p"]}"#)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let nodes = receipt["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{receipt}");
    assert!(nodes.iter().all(|n| n["ok"] == true), "{receipt}");
    let (_, _, cs, body) = get(&c, &shield, "/p").await;
    assert!(
        cs.starts_with("shield-a; fwd=miss"),
        "shield still had it: {cs}"
    );
    assert_eq!(body, "p v1");

    // A push on the edge is forwarded to the shield.
    let r = c
        .put(format!(
            "http://{}/objects/pushed/app.js",
            edge.admin.unwrap()
        ))
        .bearer_auth(TOKEN)
        .header("content-type", "text/javascript")
        .body("console.log('pushed')")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let listed: serde_json::Value = serde_json::from_slice(
        &c.get(format!(
            "http://{}/objects?prefix=/pushed/",
            shield.admin.unwrap()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap(),
    )
    .unwrap();
    assert_eq!(listed[0]["path"], "/pushed/app.js", "{listed}");
    let (st, _, cs, body) = get(&c, &shield, "/pushed/app.js").await;
    assert_eq!((st, body.as_str()), (200, "console.log('pushed')"));
    assert!(cs.starts_with("shield-a; hit"), "{cs}");
}

impl Shield for TestOrigin {
    fn data(&self) -> SocketAddr {
        self.addr()
    }
    fn admin(&self) -> Option<SocketAddr> {
        None
    }
}

/// Issue 18, shields with bounded load (`shield_balance_factor`, 1.25 by default): with one
/// slow shield, 40 misses in steady traffic send it far less than its rendezvous share (the
/// control run, factor 0), because a shield already carrying more than 1.25 times the mean of
/// requests in flight is skipped for the next key.
#[tokio::test]
async fn a_slow_shield_takes_less_than_its_rendezvous_share() {
    let slow = TestOrigin::start().await;
    let fast = TestOrigin::start().await;
    let paths: Vec<String> = (0..40).map(|i| format!("/k{i}")).collect();
    for p in &paths {
        let cc = "max-age=60";
        slow.route(
            p,
            Reply::ok("slow")
                .header("cache-control", cc)
                .head_delay(Duration::from_millis(400)),
        );
        fast.route(p, Reply::ok("fast").header("cache-control", cc));
    }
    let origin = refused_addr();
    let c = client();
    let mut shares = Vec::new();
    for factor in ["0", "1.25"] {
        let text = format!(
            "name = \"edge-{factor}\"\nlisten = \"127.0.0.1:0\"\norigin = \"http://{}\"\nshield_balance_factor = {factor}\n[[shields]]\nname = \"slow\"\nurl = \"http://{}\"\n[[shields]]\nname = \"fast\"\nurl = \"http://{}\"\n",
            origin.addr,
            slow.data(),
            fast.data()
        );
        let node = Edge::from_toml(&text).await;
        let (before_slow, before_fast) = (slow.total_hits(), fast.total_hits());
        // Steady traffic (a request every 10 ms, the slow shield answering after 400 ms):
        // requests pile up on the slow shield while the fast one keeps up.
        let mut all = tokio::task::JoinSet::new();
        for p in &paths {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let (c, url) = (c.clone(), node.url(p));
            all.spawn(async move {
                let r = c
                    .get(url)
                    .header("host", "site.test")
                    .send()
                    .await
                    .expect("GET");
                (r.status().as_u16(), r.text().await.expect("body"))
            });
        }
        while let Some(r) = all.join_next().await {
            let (status, body) = r.expect("task");
            assert_eq!(status, 200);
            assert!(body == "slow" || body == "fast", "{body}");
        }
        let (s, f) = (
            slow.total_hits() - before_slow,
            fast.total_hits() - before_fast,
        );
        assert_eq!(s + f, 40, "every miss went to one shield once");
        shares.push(s);
    }
    let (plain, bounded) = (shares[0], shares[1]);
    eprintln!("slow shield's share of 40 misses: {plain} plain, {bounded} bounded");
    assert!(
        plain >= 10,
        "rendezvous gives the slow shield its share of the keys: {plain}"
    );
    assert!(
        bounded * 2 <= plain,
        "bounded load sends the slow shield at most half of it: {bounded} of {plain}"
    );
}
