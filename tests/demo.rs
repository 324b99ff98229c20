//! `outpost demo` starts the whole topology, serves the sample site through the selector, and
//! stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A base port whose whole layout (P..P+5 and P+1000..P+1005) is free right now.
fn free_base() -> u16 {
    for attempt in 0..200u32 {
        let base = 20000 + ((std::process::id() * 7919 + attempt * 104729) % 30000) as u16;
        let ports = (0..6).flat_map(|i| [base + i, base + 1000 + i]);
        if ports
            .clone()
            .all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return base;
        }
    }
    panic!("no free port range for the demo");
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
    let base = free_base();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "demo",
            "--edges",
            "2",
            "--base-port",
            &base.to_string(),
            "--cache-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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
    while !table.contains("Try:") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                table.push_str(&l);
                table.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                panic!("demo printed no table in time:\n{table}");
            }
        }
    }
    assert!(table.contains(&format!("127.0.0.1:{base}")), "{table}");
    assert!(table.contains("edge-2"), "{table}");

    let first = http_get(base, "/").expect("GET / through the selector");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("x-cache: MISS"), "{first}");
    let index =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/site/index.html")).unwrap();
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
