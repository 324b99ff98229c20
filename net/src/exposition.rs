//! `/metrics` on every admin port: OpenMetrics for scrapers that ask for it (Prometheus does),
//! the classic Prometheus text format (0.0.4) for everyone else, so `promtool check metrics`
//! and `curl` see what they expect.

/// OpenMetrics 1.0 text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The body and content type for a scrape with these `Accept` values, from the OpenMetrics
/// text every role encodes.
pub fn negotiate<'a>(
    accept: impl IntoIterator<Item = &'a str>,
    openmetrics: String,
) -> (String, &'static str) {
    if accept
        .into_iter()
        .any(|v| v.contains("application/openmetrics-text"))
    {
        (openmetrics, OPENMETRICS)
    } else {
        (to_classic(&openmetrics), CLASSIC)
    }
}

/// OpenMetrics text as the classic format: a counter family's `HELP` and `TYPE` name its
/// samples (`x_total`, where OpenMetrics names the family `x`), and `UNIT` and `EOF` lines go
/// (the classic format has neither). The samples are the same in both.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + counters.len() * 16);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(kind);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{a=\"b\"} 3\n# HELP x_bytes Bytes.\n# TYPE x_bytes gauge\n# UNIT x_bytes bytes\nx_bytes 1.5\n# EOF\n";

    #[test]
    fn counters_are_named_by_their_samples_and_eof_goes() {
        assert_eq!(
            to_classic(OM),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 3\n# HELP x_bytes Bytes.\n# TYPE x_bytes gauge\nx_bytes 1.5\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let (body, ct) = negotiate(
            ["application/openmetrics-text;version=1.0.0,text/plain;q=0.5"],
            OM.into(),
        );
        assert_eq!((body.as_str(), ct), (OM, OPENMETRICS));
        let (body, ct) = negotiate(["*/*"], OM.into());
        assert_eq!(ct, CLASSIC);
        assert!(!body.contains("# EOF"));
        assert_eq!(negotiate([], OM.into()).1, CLASSIC);
    }
}
