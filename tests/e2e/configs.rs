//! Every file in `configs/` parses and validates, and the binary rejects bad config with exit
//! code 64 and a message naming the field, before binding anything.

use std::path::PathBuf;

use crate::support::proc::outpost;
use crate::support::repo;

fn configs_dir() -> PathBuf {
    repo().join("configs")
}

#[test]
fn every_shipped_config_file_parses() {
    let mut seen = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let result: Result<(), String> = match name.as_str() {
            "origin.toml" => outpost_origin::OriginConfig::load(Some(&path), Default::default())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            "origin-rules.toml" => outpost_origin::Rules::load(&path)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            "edge.toml" | "edge-fleet.toml" => {
                outpost_edge::EdgeConfig::load(Some(&path), Default::default())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            "selector.toml" => {
                outpost_selector::SelectorConfig::load(Some(&path), Default::default())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            other => Err(format!(
                "no parser registered for configs/{other}: add it to tests/e2e/configs.rs"
            )),
        };
        if let Err(e) = result {
            panic!("configs/{name} does not load:\n{e}");
        }
        seen += 1;
    }
    assert!(seen >= 3, "expected at least 3 config files, saw {seen}");
}

/// The three-server NATS cluster of `configs/nats/` is valid for `nats-server -t` (skipped,
/// loudly, where nats-server is not installed).
#[test]
fn nats_cluster_example_is_valid() {
    let Some(nats) = crate::support::nats::binary() else {
        eprintln!("SKIPPED: nats-server is not installed");
        return;
    };
    let mut seen = 0;
    for entry in std::fs::read_dir(configs_dir().join("nats")).unwrap() {
        let path = entry.unwrap().path();
        let out = std::process::Command::new(&nats)
            .arg("-c")
            .arg(&path)
            .arg("-t")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        seen += 1;
    }
    assert_eq!(seen, 3, "a three-server cluster");
}

#[test]
fn monitoring_examples_are_well_formed() {
    let dir = configs_dir().join("monitoring");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap())
            .expect("grafana-dashboard.json is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    // Role and instance variables, from the target labels prometheus.yml sets: a request that
    // misses at an edge is counted again by its shield, so the edges alone are the default.
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    for name in ["role", "instance"] {
        let var = vars
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name:?}"));
        assert_eq!(var["type"], "query", "{name}");
        assert!(
            var["query"].to_string().contains("outpost_build_info"),
            "{name}: {}",
            var["query"]
        );
        assert_eq!(var["multi"], true, "{name}");
        assert_eq!(var["includeAll"], true, "{name}");
    }
    let role = vars.iter().find(|v| v["name"] == "role").unwrap();
    assert!(
        role["current"]["value"].to_string().contains("\"edge\""),
        "the role variable defaults to edge: {}",
        role["current"]
    );
    // Every query names metrics the edge exports, and every selector filters on the role and
    // instance variables (a ratio's both halves too), so no panel adds shields to edges.
    let metrics = [
        "outpost_requests_total",
        "outpost_responses_total",
        "outpost_response_bytes_total",
        "outpost_request_duration_seconds_bucket",
        "outpost_origin_request_duration_seconds_bucket",
        "outpost_origin_requests_total",
        "outpost_origin_errors_total",
        "outpost_upstream_failing_seconds",
        "outpost_coalesced_requests_total",
        "outpost_connections_open",
        "outpost_tls_handshakes_total",
        "outpost_access_log_lines_total",
        "outpost_cache_bytes",
        "outpost_cache_evictions_total",
        "outpost_purges_total",
        "outpost_compression_input_bytes_total",
        "outpost_compression_output_bytes_total",
        "outpost_build_info",
    ];
    let filters = ["role=~\"$role\"", "instance=~\"$instance\""];
    let mut used = std::collections::HashSet::new();
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for f in ["$role", "$instance"] {
                assert!(expr.contains(f), "{expr} does not filter on {f}");
            }
            let mut selectors = 0;
            for rest in expr.split("outpost_").skip(1) {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let metric = format!("outpost_{}", &rest[..end]);
                assert!(
                    metrics.contains(&metric.as_str()),
                    "unknown metric {metric} in {expr}"
                );
                used.insert(metric.clone());
                let matchers = rest[end..]
                    .strip_prefix('{')
                    .and_then(|m| m.split_once('}'))
                    .map(|(m, _)| m)
                    .unwrap_or_else(|| panic!("{metric} has no label matchers in {expr}"));
                for f in filters {
                    assert!(matchers.contains(f), "{metric} lacks {f} in {expr}");
                }
                selectors += 1;
            }
            assert!(selectors > 0, "no outpost metric in {expr}");
        }
    }
    for m in [
        "outpost_responses_total",
        "outpost_upstream_failing_seconds",
        "outpost_connections_open",
    ] {
        assert!(used.contains(m), "no panel shows {m}");
    }
    // Panels have their own ids and do not overlap on the 24-column grid.
    let mut ids = std::collections::HashSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
    }
    let rect = |p: &serde_json::Value| {
        ["x", "y", "w", "h"].map(|k| p["gridPos"][k].as_u64().expect("gridPos"))
    };
    for (i, a) in panels.iter().enumerate() {
        let [ax, ay, aw, ah] = rect(a);
        assert!(ax + aw <= 24, "panel {} is wider than the grid", a["id"]);
        for b in &panels[i + 1..] {
            let [bx, by, bw, bh] = rect(b);
            assert!(
                ax + aw <= bx || bx + bw <= ax || ay + ah <= by || by + bh <= ay,
                "panels {} and {} overlap",
                a["id"],
                b["id"]
            );
        }
    }
    let prom = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    assert!(prom.contains("metrics_path: /metrics"));
    // The role the dashboard filters on is a target label: edges and shields both get one.
    for role in ["edge", "shield"] {
        assert!(
            prom.lines().any(|l| l.trim() == format!("role: {role}")),
            "prometheus.yml labels no target with role: {role}"
        );
    }
}

#[test]
fn bad_edge_config_exits_64_naming_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.toml");
    // Take a port, so that we can show nothing gets bound: the listener stays ours.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    drop(held);
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:{port}\"\norigin = \"http://127.0.0.1:1\"\n[cache]\nmemory = \"lots\"\ndisk = \"12 parsecs\"\n"
        ),
    )
    .unwrap();
    let out = outpost(&[
        "edge",
        "--config",
        file.to_str().unwrap(),
        "--admin-listen",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "cache.memory",
        "cache.disk",
        "--admin-listen",
        "edge.toml:4",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
    // Nothing was bound: the port is still free.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port still free");
}

#[test]
fn unknown_field_exits_64_with_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\norigin = \"http://127.0.0.1:1\"\nbogus = 1\n",
    )
    .unwrap();
    let out = outpost(&["edge", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("edge.toml:3") && err.contains("bogus"),
        "{err}"
    );
}

/// `outpost check --config` (issue 19): every shipped file is valid, with its role told from
/// its keys, and a file with a typo, a bad value and a missing field gets all three in one run,
/// exactly as `outpost edge` reports them at start-up (the same loader).
#[test]
fn check_reports_a_typo_a_bad_value_and_a_missing_field_together() {
    for (name, role) in [
        ("edge.toml", "edge"),
        ("edge-fleet.toml", "edge"),
        ("origin.toml", "origin"),
        ("origin-rules.toml", "origin rules"),
        ("selector.toml", "selector"),
    ] {
        let path = configs_dir().join(name);
        let out = outpost(&["check", "--config", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("is a valid {role} configuration")),
            "{name}: {stdout}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\n[cache]\nmemroy = \"1GiB\"\n[limits]\ndrain_timeout = \"forever\"\n",
    )
    .unwrap();
    let check = outpost(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(64));
    let err = String::from_utf8_lossy(&check.stderr);
    for needle in [
        "invalid configuration (3 errors)",
        "edge.toml:3: field `cache.memroy`: unknown field `memroy` (did you mean `memory`?)",
        "edge.toml:5: field `limits.drain_timeout`: invalid duration \"forever\"",
        "`origin`: is required",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
    let start = outpost(&["edge", "--config", file.to_str().unwrap()]);
    assert_eq!(start.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&start.stderr),
        err,
        "start-up reports what check reports"
    );

    // The other roles too: two problems each, one run.
    let selector = dir.path().join("selector.toml");
    std::fs::write(
        &selector,
        "listen = \"127.0.0.1:0\"\npolicy = \"fastest\"\nnodez = []\n",
    )
    .unwrap();
    let out = outpost(&["check", "--config", selector.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy") && err.contains("nodez"), "{err}");
    let origin = dir.path().join("origin.toml");
    std::fs::write(
        &origin,
        "listen = \"here\"\nroot = \"/definitely/not/here\"\nrulez = 1\n",
    )
    .unwrap();
    let out = outpost(&["check", "--config", origin.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rulez") && err.contains("listen") && err.contains("root"),
        "{err}"
    );
}

#[test]
fn bad_origin_flags_exit_64() {
    let out = outpost(&[
        "origin",
        "--root",
        "/definitely/not/here",
        "--listen",
        "localhost",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--root") && err.contains("--listen"), "{err}");
}

#[test]
fn bad_selector_config_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("selector.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\npolicy = \"fastest\"\n").unwrap();
    let out = outpost(&["selector", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy"), "{err}");
}

#[test]
fn every_subcommand_has_help() {
    for cmd in [
        "edge", "origin", "selector", "demo", "purge", "push", "stats", "check",
    ] {
        let help = outpost(&[cmd, "--help"]);
        assert!(help.status.success(), "{cmd} --help");
    }
    // A purge that names nothing to purge is a usage error.
    let out = outpost(&["purge", "--admin", "http://127.0.0.1:9"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installing like real software (issue 19): shell completions and a man page from the CLI's
/// own definition, a LICENSE that matches `Cargo.toml`, and a hardened systemd unit that
/// `systemd-analyze verify` accepts without a warning (skipped, loudly, without systemd).
#[test]
fn completions_man_page_license_and_systemd_unit() {
    for shell in ["bash", "zsh", "fish"] {
        let out = outpost(&["completions", shell]);
        assert!(out.status.success(), "completions {shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        for word in ["outpost", "check", "purge", "admin-listen"] {
            assert!(text.contains(word), "{shell} completion lacks {word:?}");
        }
    }
    let man = outpost(&["man"]);
    assert!(man.status.success());
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.contains(".TH outpost 1"), "{page}");
    for sub in ["edge", "check", "completions"] {
        assert!(page.contains(sub), "the man page lists {sub}");
    }

    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"Apache-2.0\""));
    let license = std::fs::read_to_string(repo().join("LICENSE")).expect("a LICENSE file");
    assert!(
        license.contains("Apache License") && license.contains("Version 2.0, January 2004"),
        "LICENSE is the Apache License 2.0 that Cargo.toml names"
    );

    let unit = std::fs::read_to_string(configs_dir().join("outpost-edge.service")).unwrap();
    for line in [
        "DynamicUser=yes",
        "StateDirectory=outpost",
        "ProtectSystem=strict",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStartPre=/usr/local/bin/outpost check --config /etc/outpost/edge.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit has {line:?}");
    }
    let Some(analyze) = crate::support::on_path("systemd-analyze") else {
        eprintln!("SKIPPED: systemd-analyze is not installed; the unit was not verified");
        return;
    };
    // Verified with this build's binary in place of /usr/local/bin/outpost (verify checks
    // that the command exists).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("outpost-edge.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/outpost", crate::support::proc::BIN),
    )
    .unwrap();
    let out = std::process::Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}
