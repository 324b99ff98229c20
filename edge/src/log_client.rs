//! `outpost log --admin URL [--status 5xx] [--cache MISS] [--url-prefix /assets/] [--json]`:
//! follows a node's live request stream (`GET /log`), like `varnishlog`. The node filters, so
//! only the matching requests cross the network; each is printed as one line (or as the JSON
//! the node sends, with `--json`).

use std::io::Write as _;

use http_body_util::BodyExt;

/// What to follow.
#[derive(Debug, Clone, Default)]
pub struct LogArgs {
    pub admin: String,
    pub token: Option<String>,
    pub status: Option<String>,
    pub cache: Option<String>,
    pub url_prefix: Option<String>,
    pub json: bool,
}

/// Follows the stream until the node closes it, the reader of stdout goes away, or an error.
pub async fn run(args: LogArgs) -> Result<(), String> {
    let client = outpost_purge_api::client::AdminClient::new(
        &args.admin,
        outpost_purge_api::client::resolve_token(args.token.clone()),
    )
    .map_err(|e| e.to_string())?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("status", &args.status),
        ("cache", &args.cache),
        ("url_prefix", &args.url_prefix),
    ] {
        if let Some(v) = v {
            query.append_pair(k, v);
        }
    }
    let query = query.finish();
    let path = if query.is_empty() {
        "/log".to_string()
    } else {
        format!("/log?{query}")
    };
    let mut body = client.get_stream(&path).await.map_err(|e| e.to_string())?;
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{}/log: the stream broke: {e}", client.base()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]);
            if line.trim().is_empty() {
                continue; // the node's heartbeat
            }
            let Some(out) = render(&line, args.json) else {
                continue;
            };
            let mut stdout = std::io::stdout().lock();
            if writeln!(stdout, "{out}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return Ok(()); // `outpost log | head`
            }
        }
    }
    Err(format!("{}/log: the node closed the stream", client.base()))
}

/// One printed line for one streamed line; `None` for what is not printed (a skipped count
/// goes to stderr).
fn render(line: &str, json: bool) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if let Some(n) = v.get("skipped").and_then(|n| n.as_u64()) {
        let _ = writeln!(
            std::io::stderr(),
            "outpost log: {n} requests skipped (this reader fell behind the node)"
        );
        return None;
    }
    if json {
        return Some(line.to_string());
    }
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-");
    let n = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .map_or_else(|| "-".to_string(), |x| format!("{x}"))
    };
    Some(format!(
        "{} {} {} {:<11} {} {}{} {}B {}ms {}",
        s("time"),
        s("client"),
        n("status"),
        s("cache"),
        s("method"),
        v.get("host").and_then(|x| x.as_str()).unwrap_or(""),
        s("url"),
        n("bytes"),
        v.get("total_ms")
            .and_then(|x| x.as_f64())
            .map_or_else(|| "-".into(), |x| format!("{x:.3}")),
        s("request_id"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_render_compactly_and_json_passes_through() {
        let line = r#"{"time":"2026-12-05T06:00:00Z","client":"127.0.0.1","method":"GET","host":"my-site.test","url":"/a?b=1","protocol":"HTTP/1.1","status":503,"bytes":12,"cache":"ERROR","tier":"none","upstream_ms":null,"total_ms":1.25,"user_agent":null,"referer":null,"request_id":null}"#;
        assert_eq!(
            render(line, false).unwrap(),
            "2026-12-05T06:00:00Z 127.0.0.1 503 ERROR       GET my-site.test/a?b=1 12B 1.250ms -"
        );
        assert_eq!(render(line, true).unwrap(), line);
        assert_eq!(render(r#"{"skipped":3}"#, false), None);
    }
}
