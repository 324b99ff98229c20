//! The status page (`GET /` on the admin port) in a real browser: headless Debian Chromium loads
//! it, its script polls `/stats`, fills the figures and draws the canvas chart; the test reads the
//! rendered DOM (`--dump-dom`) and checks the drawn flag, the node name and the hit ratio.
//!
//! `scripts/test.sh` installs the `chromium` package when it is missing; when it still cannot be
//! found, this test prints a loud message and skips.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::support::client_within;
use crate::support::edge::Edge;
use crate::support::http::x_cache;
use crate::support::test_origin::{Reply, TestOrigin};

/// Upper bound of every wait (the browser gets twice this, it starts slowly on a busy machine).
const WAIT: Duration = Duration::from_secs(45);
const NODE: &str = "status-edge-7";

fn client() -> reqwest::Client {
    client_within(WAIT)
}

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// The text content of the element with this id (up to its first child tag).
fn text_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')?;
    Some(rest[start..start + end].trim())
}

/// The value of an attribute of the element with this id.
fn attr_of<'a>(dom: &'a str, id: &str, attr: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let tag_start = dom[..at].rfind('<')?;
    let tag_end = at + dom[at..].find('>')?;
    let tag = &dom[tag_start..tag_end];
    let key = format!("{attr}=\"");
    let v = tag.find(&key)? + key.len();
    let len = tag[v..].find('"')?;
    Some(&tag[v..v + len])
}

/// The `<body>` start tag.
fn body_tag(dom: &str) -> &str {
    let start = dom.find("<body").unwrap_or(0);
    let end = dom[start..].find('>').map_or(dom.len(), |e| start + e + 1);
    &dom[start..end]
}

async fn start_node(origin: &TestOrigin) -> Edge {
    Edge::from_toml(&format!(
        "name = \"{NODE}\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\norigin = \"{}\"\n[limits]\nupstream_first_byte_timeout = \"300ms\"\n",
        origin.base_url()
    ))
    .await
}

#[tokio::test]
async fn status_page_renders_and_draws_in_headless_chromium() {
    let Some(chromium) = find_chromium() else {
        eprintln!(
            "\n\
             ******************************************************************************\n\
             *** SKIPPED status_page_renders_and_draws_in_headless_chromium:            ***\n\
             *** no chromium on PATH (install Debian's `chromium`; scripts/test.sh does) ***\n\
             ******************************************************************************\n"
        );
        return;
    };
    let origin = TestOrigin::start().await;
    origin.route(
        "/obj",
        Reply::ok(vec![b'o'; 1000]).header("cache-control", "public, max-age=600"),
    );
    origin.route(
        "/nostore",
        Reply::ok(vec![b'n'; 300]).header("cache-control", "no-store"),
    );
    let node = start_node(&origin).await;
    let c = client();
    // 1 miss, 9 hits, 2 passes: hit ratio 9 / 12 = 75.0%.
    for i in 0..10 {
        let r = c
            .get(format!("http://{}/obj", node.addr))
            .send()
            .await
            .expect("GET /obj");
        assert_eq!(x_cache(&r), if i == 0 { "MISS" } else { "HIT" });
        let _ = r.bytes().await;
    }
    for _ in 0..2 {
        let r = c
            .get(format!("http://{}/nostore", node.addr))
            .send()
            .await
            .expect("GET /nostore");
        assert_eq!(x_cache(&r), "PASS");
        let _ = r.bytes().await;
    }
    // One origin failure (a head later than the first-byte timeout): a 5xx for the client, an
    // origin error of kind timeout, and the origin failing since (the errors panel). Errors
    // are left out of the hit ratio.
    origin.route(
        "/slow",
        Reply::ok("late").head_delay(Duration::from_secs(5)),
    );
    let r = c
        .get(format!("http://{}/slow", node.addr))
        .send()
        .await
        .expect("GET /slow");
    assert_eq!(r.status(), 504);
    // Wait (bounded) until the chart has at least one point: the sampler ticks every second.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s: serde_json::Value = serde_json::from_slice(
            &c.get(format!("http://{}/stats", node.admin()))
                .send()
                .await
                .expect("GET /stats")
                .bytes()
                .await
                .expect("/stats body"),
        )
        .expect("/stats JSON");
        assert_eq!(s["hit_ratio"].as_f64(), Some(0.75), "{s}");
        if s["series"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/stats series stays empty: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The page is self-contained: no asset from the internet.
    let html = c
        .get(format!("http://{}/", node.admin()))
        .send()
        .await
        .expect("GET /")
        .text()
        .await
        .expect("page");
    for needle in ["http://", "https://", "//cdn", "src=\"//"] {
        assert!(!html.contains(needle), "the page references {needle:?}");
    }

    let profile = tempfile::tempdir().expect("tempdir");
    let url = format!("http://{}/", node.admin());
    let run = |budget_ms: u64| {
        let mut cmd = tokio::process::Command::new(&chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()));
        // Virtual time lets the page's fetch of /stats and a few of its 1 s timer ticks run
        // before the DOM is dumped (the browser waits for pending fetches while it advances).
        // Without it, --dump-dom fires at the load event, before the first fetch has answered.
        cmd.arg(format!("--virtual-time-budget={budget_ms}"));
        cmd.args(["--dump-dom", &url])
            .env("HOME", profile.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        async move {
            let child = cmd.spawn().expect("spawn chromium");
            match tokio::time::timeout(WAIT * 2, child.wait_with_output()).await {
                Ok(out) => {
                    let out = out.expect("chromium output");
                    (
                        String::from_utf8_lossy(&out.stdout).into_owned(),
                        format!("{}\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
                    )
                }
                // Dropping the future kills the browser (kill_on_drop).
                Err(_) => (String::new(), "timed out (killed)".to_string()),
            }
        }
    };
    let drawn = |dom: &str| body_tag(dom).contains("data-drawn=\"yes\"");
    let (mut dom, mut diag) = run(5_000).await;
    if !drawn(&dom) {
        eprintln!(
            "NOTE: with --virtual-time-budget=5000 the chart was not drawn; retrying with 20000\n{diag}"
        );
        (dom, diag) = run(20_000).await;
    }
    assert!(
        drawn(&dom),
        "the page's script drew the chart (body data-drawn=\"yes\")\nchromium: {diag}\nDOM:\n{dom}"
    );
    assert_eq!(text_of(&dom, "node"), Some(NODE), "node name\n{dom}");
    assert_eq!(text_of(&dom, "role"), Some("edge"), "role\n{dom}");
    assert_eq!(
        text_of(&dom, "hit-ratio"),
        Some("75.0%"),
        "hit ratio\n{dom}"
    );
    assert_eq!(text_of(&dom, "error"), Some(""), "no fetch error\n{dom}");
    let points = attr_of(&dom, "chart", "data-points")
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("canvas#chart carries data-points\n{dom}"));
    assert!(points >= 1, "the chart has points: {points}");
    let counters = dom
        .find("id=\"counters\"")
        .map(|i| &dom[i..])
        .and_then(|s| s.find("</table>").map(|e| &s[..e]))
        .unwrap_or_else(|| panic!("counters table\n{dom}"));
    assert!(
        counters.contains("<td>hit</td><td class=\"n\">9</td>"),
        "counters show 9 hits: {counters}"
    );
    // The errors panel: responses by class, the failing origin, its errors by kind.
    let errors = dom
        .find("id=\"errors-panel\"")
        .map(|i| &dom[i..])
        .and_then(|s| s.find("</section>").map(|e| &s[..e]))
        .unwrap_or_else(|| panic!("errors panel\n{dom}"));
    for needle in [
        "2xx responses</td><td class=\"n\">12</td>",
        "5xx responses</td><td class=\"n\">1</td>",
        "origin errors: timeout</span><b>1</b>",
        &format!("{}</span><b>failing for", origin.addr()),
    ] {
        assert!(
            errors.contains(needle),
            "{needle:?} in the errors panel: {errors}"
        );
    }
    assert!(
        text_of(&dom, "conns").is_some_and(|n| n.parse::<u64>().is_ok()),
        "open connections shown\n{errors}"
    );
    // Not in a fleet: the fleet panel stays hidden.
    assert!(
        dom.contains("id=\"fleet-panel\" hidden") || dom.contains("hidden=\"\" id=\"fleet-panel\""),
        "the fleet panel is hidden without [fleet]\n{dom}"
    );
}
