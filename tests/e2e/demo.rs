//! `outpost demo` starts the whole topology, serves the sample site through the selector, and
//! stops cleanly on SIGTERM; with `--tls` it serves HTTPS with the CA it prints.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::https_client;
use crate::support::ports::free_demo_base;
use crate::support::proc::BIN;
use crate::support::repo;

/// Starts `outpost demo <args> --base-port P --cache-dir <dir>` in the repo on a base port
/// whose `offsets` were free, and reads its stdout until a line contains `until` (bounded);
/// returns the process, what it printed and the base port. The ports are probed, not held, so a demo that
/// exits before printing `until` (another process took a port) is started again on another
/// base, a few times.
fn start_demo(args: &[&str], offsets: &[u16], dir: &Path, until: &str) -> (Child, String, u16) {
    let mut failures = String::new();
    for _ in 0..5 {
        let base = free_demo_base(offsets);
        match try_start_demo(args, &base.to_string(), dir, until) {
            Ok((child, table)) => return (child, table, base),
            Err(e) => failures.push_str(&format!("--base-port {base}: {e}\n")),
        }
    }
    panic!("outpost demo did not start:\n{failures}");
}

fn try_start_demo(
    args: &[&str],
    base: &str,
    dir: &Path,
    until: &str,
) -> Result<(Child, String), String> {
    let mut child = Command::new(BIN)
        .current_dir(repo())
        .arg("demo")
        .args(args)
        .args(["--base-port", base])
        .arg("--cache-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start outpost demo");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Wait for the table.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut table = String::new();
    while !table.contains(until) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                table.push_str(&l);
                table.push('\n');
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = stderr.read_to_string(&mut err);
                }
                let why = match e {
                    std::sync::mpsc::RecvTimeoutError::Timeout => "printed no table in time",
                    std::sync::mpsc::RecvTimeoutError::Disconnected => "exited",
                };
                return Err(format!("{why}:\n{table}\nstderr:\n{err}"));
            }
        }
    }
    Ok((child, table))
}

fn site_index() -> String {
    std::fs::read_to_string(repo().join("site/index.html")).unwrap()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: demo.test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn demo_serves_the_site_through_the_selector_and_stops_on_signal() {
    // The whole layout with two edges: P..P+5 and P+1000..P+1005.
    let dir = tempfile::tempdir().unwrap();
    let (mut child, table, base) = start_demo(
        &["--edges", "2"],
        &[0, 1, 2, 3, 4, 5, 1000, 1001, 1002, 1003, 1004, 1005],
        dir.path(),
        "Try:",
    );
    assert!(table.contains(&format!("127.0.0.1:{base}")), "{table}");
    assert!(table.contains("edge-2"), "{table}");

    let first = http_get(base, "/").expect("GET / through the selector");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("x-cache: MISS"), "{first}");
    let index = site_index();
    assert!(
        first.ends_with(&index),
        "body is the sample site's index.html"
    );
    let second = http_get(base, "/").unwrap();
    assert!(second.contains("x-cache: HIT"), "{second}");
    let nodes = http_get(base + 1000, "/nodes").unwrap();
    assert!(
        nodes.contains("edge-1") && nodes.contains("\"healthy\": true"),
        "{nodes}"
    );

    // SIGTERM: everything stops and the process exits 0.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "demo exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        TcpStream::connect(("127.0.0.1", base)).is_err(),
        "selector still listening"
    );
}

#[tokio::test]
async fn demo_with_tls_serves_https_with_the_printed_ca() {
    // The layout with one edge and --tls: P..P+3, P+1000..P+1003, and HTTPS on the shield and
    // the edge (P+2002, P+2003).
    let dir = tempfile::tempdir().unwrap();
    let (mut child, table, base) = start_demo(
        &["--tls", "--edges", "1"],
        &[0, 1, 2, 3, 1000, 1001, 1002, 1003, 2002, 2003],
        dir.path(),
        "cache directories",
    );
    let ca = table
        .lines()
        .find_map(|l| l.strip_prefix("CA certificate (for curl --cacert): "))
        .unwrap_or_else(|| panic!("no CA path in:\n{table}"))
        .to_string();
    let https_port = base + 3 + 2000;
    assert!(
        table.contains(&format!("https://localhost:{https_port}")),
        "{table}"
    );
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let client = https_client(&ca_pem, Duration::from_secs(20))
        .build()
        .unwrap();
    let result = async {
        let mut last = String::new();
        for _ in 0..50 {
            match client
                .get(format!("https://localhost:{https_port}/"))
                .send()
                .await
            {
                Ok(r) => return Ok((r.status(), r.version(), r.text().await.unwrap_or_default())),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last)
    }
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap();
    let (code, version, body) = result.unwrap_or_else(|e| panic!("GET over TLS: {e}"));
    assert_eq!(code, 200);
    assert_eq!(version, reqwest::Version::HTTP_2);
    let index = site_index();
    assert_eq!(
        body, index,
        "the sample site through edge-1 over https and the https shield"
    );
    assert!(status.unwrap().success());
}

/// `outpost demo --fleet` starts nats-server and every node joins the fleet: an edge's `/fleet`
/// lists the shield and both edges, connected. Skipped, loudly, without nats-server.
#[test]
fn demo_with_fleet_joins_every_node_to_nats() {
    if crate::support::nats::binary().is_none() {
        eprintln!("SKIPPED: nats-server is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, table, base) = start_demo(
        &["--edges", "2", "--fleet"],
        &[0, 1, 2, 3, 4, 900, 1000, 1001, 1002, 1003, 1004],
        dir.path(),
        "Fleet:",
    );
    assert!(
        table.contains(&format!("127.0.0.1:{}", base + 900)),
        "{table}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fleet = http_get(base + 1003, "/fleet").unwrap_or_default();
        if [
            "\"shield\"",
            "\"edge-1\"",
            "\"edge-2\"",
            "\"connected\":true",
        ]
        .iter()
        .all(|n| fleet.contains(n))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the fleet never formed: {fleet}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM: the demo stops its nodes, then its nats-server.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let nats = format!("127.0.0.1:{}", base + 900);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(&nats).is_ok() {
        assert!(Instant::now() < deadline, "nats-server outlived the demo");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `outpost demo | head -1`, then Ctrl-C: the reader is gone when the demo says it is
/// stopping. It must not panic on the closed pipe (exit 101, nothing drained): it stops and
/// exits 0.
#[test]
fn demo_with_a_closed_stdout_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_demo_base(&[0, 1, 2, 3, 1000, 1001, 1002, 1003]);
    let mut child = Command::new(BIN)
        .current_dir(repo())
        .args(["demo", "--edges", "1", "--base-port", &base.to_string()])
        .arg("--cache-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start outpost demo");
    let stdout = child.stdout.take().unwrap();
    // Read until the table is out, then close the pipe (as `head` does).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let started = lines.any(|l| l.is_ok_and(|l| l.contains("Try:")));
        let _ = tx.send(started);
        // `lines` (the read end) is dropped here.
    });
    let started = rx.recv_timeout(Duration::from_secs(30)).unwrap_or(false);
    if !started {
        let _ = child.kill();
        panic!("the demo did not start on --base-port {base}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "demo exit status {status} with a closed stdout"
    );
}
