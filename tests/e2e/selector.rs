//! End-to-end tests of `outpost-selector` (issue "Topology", selector part): a real `Selector` on
//! 127.0.0.1:0 in front of stand-in edges, driven by raw HTTP/1.1 clients (one TCP connection
//! per request, from a chosen source address) and reqwest for the admin port.
//!
//! A stand-in edge is two tokio listeners: a data port that answers every request with the
//! edge's name, and an admin port whose `/readyz` answers 200 or 503 as the test says. Every
//! wait is bounded; nothing asserts on speed.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outpost_selector::{SelectorConfig, SelectorOverrides};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::support::eventually_within;
use crate::support::http::closed_within;
use crate::support::selector::{RunningSelector as Running, SELECTOR_WAIT};

const WAIT: Duration = SELECTOR_WAIT;

// ---------------------------------------------------------------------------------------------
// Stand-in edges

/// A stand-in edge. Dropping it stops its listeners.
struct Edge {
    name: &'static str,
    addr: SocketAddr,
    admin: SocketAddr,
    ready: Arc<AtomicBool>,
    accept_loops: Vec<JoinHandle<()>>,
}

impl Edge {
    async fn start(name: &'static str) -> Edge {
        let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ready = Arc::new(AtomicBool::new(true));
        let (addr, admin_addr) = (data.local_addr().unwrap(), admin.local_addr().unwrap());
        let answer_name = move |_: &str| (200, name.to_string());
        let r = ready.clone();
        let answer_ready = move |path: &str| match (path, r.load(Ordering::SeqCst)) {
            ("/readyz", true) => (200, "ready".to_string()),
            ("/readyz", false) => (503, "draining".to_string()),
            _ => (404, "not found".to_string()),
        };
        Edge {
            name,
            addr,
            admin: admin_addr,
            ready,
            accept_loops: vec![
                tokio::spawn(accept_loop(data, answer_name)),
                tokio::spawn(accept_loop(admin, answer_ready)),
            ],
        }
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Closes both listeners: new connections are refused from the moment this returns.
    /// Connections already accepted finish their response, as a process that exits after
    /// closing its listeners would.
    async fn kill(&mut self) {
        for task in self.accept_loops.drain(..) {
            task.abort();
            let _ = task.await; // the listener is dropped once this returns
        }
    }

    /// The `[[nodes]]` table of this edge.
    fn node(&self, extra: &str) -> String {
        format!(
            "[[nodes]]\nname = \"{}\"\naddress = \"{}\"\nadmin = \"{}\"\n{extra}\n",
            self.name, self.addr, self.admin
        )
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

async fn accept_loop<F>(listener: TcpListener, answer: F)
where
    F: Fn(&str) -> (u16, String) + Clone + Send + Sync + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(respond_loop(stream, answer.clone()));
    }
}

/// A minimal HTTP/1.1 responder: answers each request head with `answer(path)`, keeps the
/// connection open unless the client asked to close it.
async fn respond_loop<F: Fn(&str) -> (u16, String)>(mut stream: TcpStream, answer: F) {
    let mut buf = Vec::new();
    while let Ok(Some(head)) = read_head(&mut stream, &mut buf).await {
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let close = head.to_ascii_lowercase().contains("connection: close");
        let (status, body) = answer(&path);
        let reason = match status {
            200 => "OK",
            503 => "Service Unavailable",
            _ => "Not Found",
        };
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        if stream.write_all(resp.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

/// Reads one message head (through the blank line) into a string; `None` on a clean EOF.
/// Bytes after the head stay in `buf`.
async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Option<String>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated head",
                ))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Reads one response (status and body by content-length) from a connection.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<(u16, String)> {
    let head = read_head(s, buf)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a response"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "truncated body",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[..len]).to_string();
    buf.drain(..len);
    Ok((status, body))
}

/// Opens a connection from `from` (any address of 127.0.0.0/8 works on loopback).
async fn connect(addr: SocketAddr, from: IpAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// One request on a new connection: the name of the edge that answered.
async fn which_edge_from(addr: SocketAddr, from: IpAddr) -> io::Result<String> {
    let attempt = async {
        let mut s = connect(addr, from).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: outpost.test\r\nconnection: close\r\n\r\n")
            .await?;
        let (status, body) = read_response(&mut s, &mut Vec::new()).await?;
        if status != 200 {
            return Err(io::Error::other(format!("status {status}")));
        }
        Ok(body)
    };
    tokio::time::timeout(WAIT, attempt)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")))
}

async fn which_edge(addr: SocketAddr) -> io::Result<String> {
    which_edge_from(addr, ip("127.0.0.1")).await
}

/// A connection kept open after one request, and the edge that answered it.
async fn hold(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = connect(addr, ip("127.0.0.1")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: outpost.test\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = tokio::time::timeout(WAIT, read_response(&mut s, &mut Vec::new()))
        .await
        .expect("response in time")
        .unwrap();
    assert_eq!(status, 200);
    (s, body)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn count(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        *seen.entry(which_edge(addr).await.unwrap()).or_insert(0) += 1;
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// The selector (`support::selector`)

async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually_within(WAIT, what, check).await;
}

/// For tests about health: probes every 100 ms. `fall = 2` keeps one probe that a loaded
/// machine answers late from withdrawing a node; a 503 withdraws at once anyway.
const FAST_PROBES: &str =
    "[health]\nprobe_interval = \"100ms\"\nprobe_timeout = \"100ms\"\nfall = 2\n";

/// For tests about policies, where a spurious withdrawal would skew the counts.
const CALM_PROBES: &str =
    "[health]\nprobe_interval = \"500ms\"\nprobe_timeout = \"500ms\"\nfall = 2\n";

// ---------------------------------------------------------------------------------------------
// Policies

#[tokio::test]
async fn nearest_sends_each_client_to_its_region() {
    let eu_a = Edge::start("eu-a").await;
    let eu_b = Edge::start("eu-b").await;
    let us = Edge::start("us").await;
    let sel = Running::start(&format!(
        "policy = \"nearest\"\n{CALM_PROBES}
[regions]
eu = {{ lat = 48.8566, lon = 2.3522 }}
us = {{ lat = 39.0438, lon = -77.4874 }}
[clients]
default = {{ region = \"us\" }}
[[clients.prefix]]
cidr = \"127.0.0.1/32\"
region = \"eu\"
{}{}{}",
        eu_a.node("region = \"eu\""),
        eu_b.node("region = \"eu\""),
        us.node("region = \"us\""),
    ))
    .await;
    // 127.0.0.1 is in Paris: one of the two eu nodes (the tie goes to the lower latency).
    for _ in 0..10 {
        let got = which_edge_from(sel.addr, ip("127.0.0.1")).await.unwrap();
        assert!(got.starts_with("eu-"), "127.0.0.1 reached {got}");
    }
    // Everyone else is in Virginia.
    for _ in 0..10 {
        assert_eq!(
            which_edge_from(sel.addr, ip("127.0.0.2")).await.unwrap(),
            "us"
        );
    }
    // With the us node draining, Virginia falls back to the next nearest: Paris.
    us.set_ready(false);
    sel.wait_state("us", "draining").await;
    for _ in 0..5 {
        let got = which_edge_from(sel.addr, ip("127.0.0.2")).await.unwrap();
        assert!(got.starts_with("eu-"), "127.0.0.2 reached {got}");
    }
    let report = sel.nodes().await;
    assert_eq!(report.policy, "nearest");
    assert_eq!(report.nodes[2].region.as_deref(), Some("us"));
    sel.shutdown().await;
}

#[tokio::test]
async fn weighted_round_robin_shares_follow_weights() {
    let a = Edge::start("a").await;
    let b = Edge::start("b").await;
    let sel = Running::start(&format!(
        "policy = \"weighted-round-robin\"\n{CALM_PROBES}{}{}",
        a.node("weight = 1"),
        b.node("weight = 3")
    ))
    .await;
    let seen = count(sel.addr, 100).await;
    let (na, nb) = (
        seen.get("a").copied().unwrap_or(0),
        seen.get("b").copied().unwrap_or(0),
    );
    assert_eq!(na + nb, 100, "{seen:?}");
    // Smooth WRR gives exactly 25/75 while both stay up; allow slack for a probe hiccup.
    assert!((20..=30).contains(&na), "{seen:?}");
    let report = sel.nodes().await;
    let share_b = report.nodes[1].share;
    assert!((0.70..=0.80).contains(&share_b), "share of b: {share_b}");
    assert_eq!(report.nodes[0].total + report.nodes[1].total, 100);
    sel.shutdown().await;
}

#[tokio::test]
async fn least_connections_fills_nodes_by_weight() {
    let a = Edge::start("a").await;
    let b = Edge::start("b").await;
    let sel = Running::start(&format!(
        "policy = \"least-connections\"\n{CALM_PROBES}{}{}",
        a.node("weight = 1"),
        b.node("weight = 3")
    ))
    .await;
    // Eight long-lived connections, opened one after another: each goes where active/weight
    // is lowest, so a holds 2 and b holds 6.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(hold(sel.addr).await);
    }
    let on = |name: &str| held.iter().filter(|(_, n)| n == name).count();
    assert_eq!((on("a"), on("b")), (2, 6));
    let report = sel.nodes().await;
    assert_eq!((report.nodes[0].active, report.nodes[1].active), (2, 6));
    // Closing b's connections makes b the least loaded again.
    held.retain(|(_, n)| n == "a");
    eventually("b has no active connection", || async {
        sel.nodes().await.nodes[1].active == 0
    })
    .await;
    assert_eq!(which_edge(sel.addr).await.unwrap(), "b");
    drop(held);
    eventually("no active connection", || async {
        sel.nodes().await.nodes.iter().all(|n| n.active == 0)
    })
    .await;
    sel.shutdown().await;
}

#[tokio::test]
async fn hash_keeps_each_client_on_one_node() {
    let edges = [
        Edge::start("h1").await,
        Edge::start("h2").await,
        Edge::start("h3").await,
    ];
    let sel = Running::start(&format!(
        "policy = \"hash\"\n{CALM_PROBES}{}{}{}",
        edges[0].node(""),
        edges[1].node(""),
        edges[2].node("")
    ))
    .await;
    let mut home = BTreeMap::new();
    for last in 1..=12u8 {
        let from = IpAddr::from([127, 0, 0, last]);
        let first = which_edge_from(sel.addr, from).await.unwrap();
        for _ in 0..4 {
            assert_eq!(
                which_edge_from(sel.addr, from).await.unwrap(),
                first,
                "{from} moved"
            );
        }
        home.insert(from, first);
    }
    let used: std::collections::BTreeSet<_> = home.values().cloned().collect();
    assert!(used.len() >= 2, "12 clients all on one node: {home:?}");
    // Withdrawing one node moves its clients only (rendezvous hashing).
    let gone = home[&ip("127.0.0.1")].clone();
    edges
        .iter()
        .find(|e| e.name == gone)
        .unwrap()
        .set_ready(false);
    sel.wait_state(&gone, "draining").await;
    for (from, was) in &home {
        let now = which_edge_from(sel.addr, *from).await.unwrap();
        if *was == gone {
            assert_ne!(now, gone, "{from} still on the draining node");
        } else {
            assert_eq!(&now, was, "{from} moved although its node stayed up");
        }
    }
    sel.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Health

#[tokio::test]
async fn a_draining_node_gets_no_new_connections() {
    let a = Edge::start("a").await;
    let b = Edge::start("b").await;
    let sel = Running::start(&format!(
        "policy = \"weighted-round-robin\"\n{FAST_PROBES}{}{}",
        a.node(""),
        b.node("")
    ))
    .await;
    assert_eq!(count(sel.addr, 10).await.len(), 2, "both nodes serve");

    // /readyz turns 503: withdrawn after the next probe.
    a.set_ready(false);
    sel.wait_state("a", "draining").await;
    let seen = count(sel.addr, 20).await;
    assert_eq!(seen.get("b"), Some(&20), "{seen:?}");
    let status = sel.nodes().await.nodes[0].clone();
    assert!(!status.healthy);
    assert!(status.reason.unwrap().contains("503"));

    // Back to 200: up again after `rise` (2) good probes, and it gets traffic again.
    a.set_ready(true);
    sel.wait_state("a", "up").await;
    assert_eq!(count(sel.addr, 10).await.len(), 2, "a serves again");

    // Nobody ready: the selector's own /readyz says so, and a connection is closed unanswered.
    a.set_ready(false);
    b.set_ready(false);
    sel.wait_state("a", "draining").await;
    sel.wait_state("b", "draining").await;
    assert_eq!(sel.admin_get("/readyz").await.status(), 503);
    assert!(which_edge(sel.addr).await.is_err());
    let metrics = sel.admin_get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("outpost_selector_unroutable_connections_total 1"),
        "{metrics}"
    );
    sel.shutdown().await;
}

/// The case the retry exists for: a node dies between two probes. The probe interval is long
/// so that only a client connection can find the dead node; that connection must still be
/// answered, by the next node.
#[tokio::test]
async fn a_node_killed_between_probes_costs_no_failed_request() {
    let a = Edge::start("a").await;
    let mut b = Edge::start("b").await;
    let c = Edge::start("c").await;
    let sel = Running::start(&format!(
        "policy = \"weighted-round-robin\"\n[health]\nprobe_interval = \"30s\"\nprobe_timeout = \"1s\"\n{}{}{}",
        a.node(""),
        b.node(""),
        c.node("")
    ))
    .await;

    // The client loop runs in its own task: 500 requests, a new connection each, every one
    // bounded by WAIT. At request 150 it asks for b to be killed and goes on once it is; the
    // kill happens between two requests so no request is in flight on b (a request already
    // spliced to a node that then dies is lost whatever the selector does).
    let (kill_tx, mut kill_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
    let addr = sel.addr;
    let client = tokio::spawn(async move {
        let mut failed = Vec::new();
        let mut after_kill = BTreeMap::new();
        for i in 0..500 {
            if i == 150 {
                let (done_tx, done_rx) = oneshot::channel();
                kill_tx.send(done_tx).await.unwrap();
                done_rx.await.unwrap();
            }
            match which_edge(addr).await {
                Ok(name) if i >= 150 => *after_kill.entry(name).or_insert(0) += 1,
                Ok(_) => {}
                Err(e) => failed.push((i, e.to_string())),
            }
        }
        (failed, after_kill)
    });
    let done = kill_rx.recv().await.unwrap();
    b.kill().await;
    done.send(()).unwrap();

    let (failed, after_kill) = tokio::time::timeout(Duration::from_secs(120), client)
        .await
        .expect("client loop ends")
        .unwrap();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert_eq!(after_kill.get("b"), None, "{after_kill:?}");
    assert_eq!(after_kill.values().sum::<usize>(), 350);

    let report = sel.nodes().await;
    let b_status = &report.nodes[1];
    assert_eq!(b_status.name, "b");
    assert!(!b_status.healthy, "{b_status:?}");
    assert_eq!(b_status.state, "down");
    // Found by a client connect (the passive check), not by a probe.
    assert!(b_status.connect_failures >= 1, "{b_status:?}");
    assert!(report.nodes[0].healthy && report.nodes[2].healthy);
    sel.shutdown().await;
}

#[tokio::test]
async fn probes_withdraw_a_dead_node_without_traffic() {
    let a = Edge::start("a").await;
    let mut b = Edge::start("b").await;
    let sel = Running::start(&format!(
        "policy = \"latency\"\n{FAST_PROBES}{}{}",
        a.node(""),
        b.node("")
    ))
    .await;
    eventually("both nodes have a measured latency", || async {
        sel.nodes()
            .await
            .nodes
            .iter()
            .all(|n| n.latency_ms.is_some())
    })
    .await;
    b.kill().await;
    sel.wait_state("b", "down").await;
    let report = sel.nodes().await;
    assert_eq!(
        report.nodes[1].connect_failures, 0,
        "no client was sent there"
    );
    assert!(
        report.nodes[1]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("probe")
    );
    for _ in 0..10 {
        assert_eq!(which_edge(sel.addr).await.unwrap(), "a");
    }
    sel.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Admin port

#[tokio::test]
async fn metrics_parse_as_prometheus_text() {
    let a = Edge::start("a").await;
    let b = Edge::start("b").await;
    let sel = Running::start(&format!(
        "policy = \"weighted-round-robin\"\n{CALM_PROBES}{}{}",
        a.node(""),
        b.node("")
    ))
    .await;
    count(sel.addr, 6).await;
    let classic = sel.admin_get("/metrics").await.text().await.unwrap();
    crate::support::exposition::assert_classic(&classic);
    let resp = sel.openmetrics().await;
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().await.unwrap();

    let samples = parse_exposition(&text);
    let get = |name: &str, node: &str| {
        samples
            .iter()
            .find(|(n, labels, _)| {
                n == name && labels.get("node").map(String::as_str) == Some(node)
            })
            .map(|s| s.2)
            .unwrap_or_else(|| panic!("{name}{{node={node}}} missing from\n{text}"))
    };
    assert_eq!(get("outpost_selector_connections_total", "a"), 3.0);
    assert_eq!(get("outpost_selector_connections_total", "b"), 3.0);
    assert_eq!(get("outpost_selector_node_up", "a"), 1.0);
    assert_eq!(get("outpost_selector_connect_failures_total", "b"), 0.0);
    get("outpost_selector_active_connections", "a");
    get("outpost_selector_probe_rtt_seconds", "a");
    sel.shutdown().await;
}

/// A strict-enough reader of the Prometheus / OpenMetrics text format: `# HELP`, `# TYPE`,
/// `# UNIT` and `# EOF` comments, and samples `name{label="value",...} value`. Panics on any
/// other line. Returns (name, labels, value) per sample.
fn parse_exposition(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut samples = Vec::new();
    let mut typed = std::collections::BTreeSet::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "exposition must end with # EOF"
    );
    for line in &lines {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            match kind {
                "EOF" => continue,
                "HELP" | "TYPE" | "UNIT" => {
                    let name = parts.next().expect("metric name");
                    assert!(valid_name(name), "bad name in {line:?}");
                    if kind == "TYPE" {
                        let t = parts.next().expect("type");
                        assert!(
                            [
                                "counter",
                                "gauge",
                                "histogram",
                                "summary",
                                "unknown",
                                "info"
                            ]
                            .contains(&t),
                            "{line:?}"
                        );
                        typed.insert(name.to_string());
                    }
                }
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line:?}"));
                let labels = body
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or_else(|| panic!("unquoted label in {line:?}"));
                        assert!(valid_name(k), "{line:?}");
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(valid_name(name), "bad name in {line:?}");
        // Every sample belongs to a declared family (counters add `_total`).
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            typed.contains(family) || typed.contains(name),
            "sample {name} without # TYPE"
        );
        samples.push((name.to_string(), labels, value));
    }
    samples
}

#[tokio::test]
async fn admin_port_answers_health_and_rejects_unknown_paths() {
    let a = Edge::start("a").await;
    let sel = Running::start(&format!("policy = \"hash\"\n{CALM_PROBES}{}", a.node(""))).await;
    assert_eq!(sel.admin_get("/healthz").await.status(), 200);
    assert_eq!(sel.admin_get("/readyz").await.status(), 200);
    assert_eq!(sel.admin_get("/nope").await.status(), 404);
    let resp = sel.admin_get("/nodes").await;
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    let node = &v["nodes"][0];
    for field in [
        "name",
        "address",
        "healthy",
        "latency_ms",
        "active",
        "total",
        "share",
    ] {
        assert!(node.get(field).is_some(), "/nodes lacks {field}: {v}");
    }
    sel.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let a = Edge::start("a").await;
    let sel = Running::start(&format!("policy = \"hash\"\n{CALM_PROBES}{}", a.node(""))).await;
    let addr = sel.addr;
    assert_eq!(which_edge(addr).await.unwrap(), "a");
    sel.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

// ---------------------------------------------------------------------------------------------
// Bounds (issue 13, item 5): every connection on both listeners bounded in time and count

/// True when the peer closes `s` (EOF or reset) within [`WAIT`]; what it sends first is
/// ignored.
async fn closed_within_wait(s: &mut TcpStream) -> bool {
    closed_within(s, WAIT).await.is_some()
}

/// The selector's `/metrics` value of an unlabelled counter.
async fn counter(sel: &Running, name: &str) -> f64 {
    let text = sel.openmetrics().await.text().await.unwrap();
    parse_exposition(&text)
        .into_iter()
        .find(|(n, labels, _)| n == name && labels.is_empty())
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

#[tokio::test]
async fn idle_spliced_connections_are_closed_and_busy_ones_kept() {
    let a = Edge::start("a").await;
    let sel = Running::start(&format!(
        "policy = \"hash\"\n{CALM_PROBES}[limits]\nidle_timeout = \"600ms\"\n{}",
        a.node("")
    ))
    .await;

    // A client that connects and never sends a byte: the node waits for a request, the
    // client for a response. Without an idle timeout both descriptors stay for good.
    let mut silent = connect(sel.addr, ip("127.0.0.1")).await.unwrap();
    // A client that got its answer and keeps the connection open, then stalls.
    let (mut done, edge) = hold(sel.addr).await;
    assert_eq!(edge, "a");
    // A client that half-closes after a partial request (this stand-in node then closes too;
    // the timeout is for a node that would not).
    let mut half = connect(sel.addr, ip("127.0.0.1")).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    half.shutdown().await.unwrap();

    // A busy connection is kept past the timeout: a request every 100 ms for 2 s.
    let (mut busy, _) = hold(sel.addr).await;
    let mut buf = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        busy.write_all(b"GET / HTTP/1.1\r\nhost: outpost.test\r\n\r\n")
            .await
            .unwrap();
        let (status, body) = tokio::time::timeout(WAIT, read_response(&mut busy, &mut buf))
            .await
            .expect("response in time")
            .expect("a busy connection stays open");
        assert_eq!((status, body.as_str()), (200, "a"));
    }

    assert!(closed_within_wait(&mut silent).await, "silent client kept");
    assert!(closed_within_wait(&mut done).await, "stalled client kept");
    assert!(
        closed_within_wait(&mut half).await,
        "half-closed client kept"
    );
    assert!(
        closed_within_wait(&mut busy).await,
        "busy client kept once idle"
    );
    eventually("three idle closes counted", || async {
        counter(&sel, "outpost_selector_idle_closed_connections_total").await >= 3.0
    })
    .await;
    sel.shutdown().await;
}

#[tokio::test]
async fn spliced_connections_past_the_cap_wait_for_a_slot() {
    let a = Edge::start("a").await;
    let sel = Running::start(&format!(
        "policy = \"hash\"\n{CALM_PROBES}[limits]\nmax_connections = 2\n{}",
        a.node("")
    ))
    .await;
    let (first, _) = hold(sel.addr).await;
    let (second, _) = hold(sel.addr).await;
    // The third connects (the kernel's backlog takes it) but is not served while both slots
    // are taken.
    let mut third = connect(sel.addr, ip("127.0.0.1")).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nhost: outpost.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let early = tokio::time::timeout(
        Duration::from_millis(500),
        read_response(&mut third, &mut buf),
    )
    .await;
    assert!(early.is_err(), "served past the cap: {early:?}");
    // A slot frees up: the waiting client is served.
    drop(first);
    let (status, body) = tokio::time::timeout(WAIT, read_response(&mut third, &mut buf))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "a"));
    drop((second, third));
    sel.shutdown().await;
}

#[tokio::test]
async fn admin_connections_are_bounded_in_time() {
    let a = Edge::start("a").await;
    let sel = Running::start(&format!(
        "policy = \"hash\"\n{CALM_PROBES}[limits]\nadmin_header_read_timeout = \"300ms\"\nadmin_idle_timeout = \"600ms\"\n{}",
        a.node("")
    ))
    .await;
    // Nothing sent; a prefix of the HTTP/2 preface then silence; the same prefix then a
    // half-close; half an HTTP/1 head then silence. Each is closed.
    let mut silent = TcpStream::connect(sel.admin).await.unwrap();
    let mut prefix = TcpStream::connect(sel.admin).await.unwrap();
    prefix.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut half = TcpStream::connect(sel.admin).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    half.shutdown().await.unwrap();
    let mut slow = TcpStream::connect(sel.admin).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    for (what, s) in [
        ("silent", &mut silent),
        ("h2 preface prefix", &mut prefix),
        ("half-closed prefix", &mut half),
        ("slow head", &mut slow),
    ] {
        assert!(closed_within_wait(s).await, "{what} connection kept");
    }

    // An HTTP/2 client that made a request and keeps the connection (answering PINGs):
    // closed once idle.
    let tcp = TcpStream::connect(sel.admin).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/healthz", sel.admin))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("idle h2 connection closed")
        .unwrap()
        .expect("closed cleanly (GOAWAY)");
    // The admin port still answers.
    assert_eq!(sel.admin_get("/healthz").await.status(), 200);
    sel.shutdown().await;
}

#[tokio::test]
async fn admin_connections_past_the_cap_wait_for_a_slot() {
    let a = Edge::start("a").await;
    let sel = Running::start(&format!(
        "policy = \"hash\"\n{CALM_PROBES}[limits]\nadmin_max_connections = 1\nadmin_header_read_timeout = \"2s\"\n{}",
        a.node("")
    ))
    .await;
    let hog = TcpStream::connect(sel.admin).await.unwrap();
    // The slot is taken by a silent client: a request waits in the backlog...
    let mut waiting = TcpStream::connect(sel.admin).await.unwrap();
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let early = tokio::time::timeout(
        Duration::from_millis(500),
        read_response(&mut waiting, &mut buf),
    )
    .await;
    assert!(early.is_err(), "served past the cap: {early:?}");
    // ...until the silent one is closed at its header timeout.
    let (status, body) = tokio::time::timeout(WAIT, read_response(&mut waiting, &mut buf))
        .await
        .expect("served once the slot is free")
        .unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    drop(hog);
    sel.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Config

#[test]
fn shipped_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/selector.toml");
    let cfg = SelectorConfig::load(Some(&path), SelectorOverrides::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(cfg.nodes.len(), 2);
    let eu = cfg.clients.locate(ip("127.0.0.1")).unwrap();
    assert_eq!(eu.region.as_deref(), Some("eu"));
    let us = cfg.clients.locate(ip("192.0.2.1")).unwrap();
    assert_eq!(us.region.as_deref(), Some("us"));
}

#[test]
fn bad_config_names_every_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("selector.toml");
    std::fs::write(
        &file,
        r#"listen = "127.0.0.1:8080"
policy = "fastest"
[clients]
default = { lat = 10, lon = 20 }
[[clients.prefix]]
cidr = "10.0.0.0/40"
lat = 1
lon = 2
[[nodes]]
name = "a"
address = "127.0.0.1:8081"
admin = "127.0.0.1:9081"
lat = 1
lon = 2
[[nodes]]
name = "a"
address = "127.0.0.1:80811"
admin = "127.0.0.1:9082"
lat = 1
lon = 2
"#,
    )
    .unwrap();
    let e = SelectorConfig::load(Some(&file), SelectorOverrides::default()).unwrap_err();
    let text = e.to_string();
    for (field, line) in [
        ("policy", 2),
        ("clients.prefix[0].cidr", 6),
        ("nodes[1].name", 16),
        ("nodes[1].address", 17),
    ] {
        assert!(e.mentions(field), "{field} missing from\n{text}");
        assert!(
            text.contains(&format!("selector.toml:{line}: field `{field}`")),
            "{field} not on line {line}:\n{text}"
        );
    }
    // No nodes at all.
    std::fs::write(&file, "listen = \"127.0.0.1:8080\"\n").unwrap();
    let e = SelectorConfig::load(Some(&file), SelectorOverrides::default()).unwrap_err();
    assert!(e.mentions("nodes"), "{e}");
    // An unknown field stops at parsing, with its line.
    std::fs::write(&file, "listen = \"127.0.0.1:8080\"\n\nbackends = []\n").unwrap();
    let e = SelectorConfig::load(Some(&file), SelectorOverrides::default()).unwrap_err();
    assert!(e.to_string().contains("selector.toml:3"), "{e}");
    assert!(e.to_string().contains("backends"), "{e}");
    // A flag is named as such.
    let e = SelectorConfig::load(
        None,
        SelectorOverrides {
            listen: Some("here".into()),
            admin_listen: None,
        },
    )
    .unwrap_err();
    assert!(e.mentions("--listen"), "{e}");
}

/// Issue 18, real client addresses: the selector opens each spliced connection to an edge with
/// a PROXY protocol v2 header (`proxy_protocol = true` on the node), and the edge, trusting the
/// selector's network (`[proxy_protocol] from`), forwards the client's address in
/// `X-Forwarded-For` (not the selector's). A source the edge does not trust cannot slip a
/// header in, and a trusted source without one is closed.
#[tokio::test]
async fn proxy_protocol_carries_the_client_address_through_the_selector() {
    use crate::support::test_origin::{Reply, TestOrigin};
    let origin = TestOrigin::start().await;
    origin.route("/who", Reply::ok("x").header("cache-control", "no-store"));
    let edge = crate::support::edge::Edge::from_toml(&format!(
        "name = \"pp-edge\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\norigin = \"{}\"\n[proxy_protocol]\nfrom = [\"127.0.0.1/32\"]\n",
        origin.base_url()
    ))
    .await;
    let sel = Running::start(&format!(
        "policy = \"weighted-round-robin\"\n{CALM_PROBES}[[nodes]]\nname = \"pp\"\naddress = \"{}\"\nadmin = \"{}\"\nproxy_protocol = true\n",
        edge.addr,
        edge.admin()
    ))
    .await;
    sel.wait_state("pp", "up").await;

    // A client on 127.0.0.2 (loopback is a /8) through the selector, which connects from
    // 127.0.0.1.
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 2], 0)))
        .expect("bind 127.0.0.2");
    let mut tcp = socket.connect(sel.addr).await.expect("connect");
    tcp.write_all(b"GET /who HTTP/1.1\r\nhost: site.test\r\nconnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await;
    drop(tcp);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let xff = origin
        .last_request("/who")
        .and_then(|r| r.header("x-forwarded-for").map(str::to_string))
        .expect("the origin got X-Forwarded-For");
    assert_eq!(xff, "127.0.0.2", "the client's address, not the selector's");

    // From the trusted network without a header: closed, nothing forwarded.
    let mut direct = TcpStream::connect(edge.addr).await.expect("connect");
    direct
        .write_all(b"GET /who HTTP/1.1\r\nhost: site.test\r\n\r\n")
        .await
        .expect("send");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, direct.read_to_end(&mut got)).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert_eq!(origin.hits("/who"), 1);

    // An edge that trusts another network: a header from here is not honoured.
    let strict = crate::support::edge::Edge::from_toml(&format!(
        "name = \"strict-edge\"\nlisten = \"127.0.0.1:0\"\norigin = \"{}\"\n[proxy_protocol]\nfrom = [\"10.9.9.9/32\"]\n",
        origin.base_url()
    ))
    .await;
    let mut forged = TcpStream::connect(strict.addr).await.expect("connect");
    let mut bytes =
        outpost_net::proxy_protocol::header("203.0.113.9:4000".parse().unwrap(), strict.addr);
    bytes.extend_from_slice(b"GET /who HTTP/1.1\r\nhost: site.test\r\n\r\n");
    forged.write_all(&bytes).await.expect("send");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, forged.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(!got.contains(" 200 "), "a forged header is refused: {got}");
    assert_eq!(origin.hits("/who"), 1, "nothing reached the origin");
    sel.shutdown().await;
}
