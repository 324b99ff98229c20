//! `/metrics` as tools read it: the classic Prometheus text format that `promtool check
//! metrics` (and `curl`) get, and the `Accept` value Prometheus scrapes with.

/// What Prometheus sends when it scrapes (it prefers OpenMetrics).
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Checks classic-format text: `promtool check metrics` accepts it without a word when
/// promtool is installed (Debian's `prometheus` package; `scripts/test.sh` installs it), and,
/// always, each counter family is named by its samples and no OpenMetrics-only line is left.
pub fn assert_classic(text: &str) {
    assert!(!text.contains("# EOF"), "no # EOF in the classic format");
    assert!(!text.contains("# UNIT"), "no # UNIT in the classic format");
    for line in text.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|l| l.strip_suffix(" counter"))
        {
            assert!(name.ends_with("_total"), "counter family {name}");
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{name} "))
                        || l.starts_with(&format!("{name}{{"))),
                "the samples of {name} carry its name"
            );
        }
    }
    let Some(promtool) = crate::support::on_path("promtool") else {
        eprintln!("SKIPPED: promtool is not installed; /metrics was checked structurally only");
        return;
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("feed promtool");
    }
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}",
        out.status
    );
}
