//! `outpost stats --admin URL [--watch]`: fetches a node's `/stats` and prints a compact table.

use std::io::Write as _;
use std::time::Duration;

use crate::admin::Stats;

/// Fetches `/stats` from a node's admin API: `host:port` or `http://host:port`, as every
/// command takes it, with the token (`--token` or `OUTPOST_ADMIN_TOKEN`) when the node wants
/// one for reading.
pub async fn fetch(admin: &str, token: Option<String>) -> Result<Stats, String> {
    let client = outpost_purge_api::client::AdminClient::new(
        admin,
        outpost_purge_api::client::resolve_token(token),
    )
    .map_err(|e| e.to_string())?;
    let body = client.get("/stats").await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&body)
        .map_err(|e| format!("{}/stats: not a stats document: {e}", client.base()))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{:.1}%", v * 100.0))
}

fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// The compact table.
pub fn render(s: &Stats) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{} ({}), up {}s\n",
        s.node, s.role, s.uptime_seconds
    ));
    out.push_str(&format!(
        "{:<8} {:>10} {:>10} {:>10} {:>14}\n",
        "window", "req/s", "hit", "byte hit", "origin p99"
    ));
    for w in &s.windows {
        out.push_str(&format!(
            "{:<8} {:>10.2} {:>10} {:>10} {:>14}\n",
            format!("{}m", w.seconds / 60),
            w.requests_per_sec,
            pct(w.hit_ratio),
            pct(w.byte_hit_ratio),
            w.origin_p99_ms
                .map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms")),
        ));
    }
    out.push_str(&format!(
        "{:<8} {:>10} {:>10} {:>10}\n",
        "total",
        s.requests.values().sum::<u64>(),
        pct(s.hit_ratio),
        pct(s.byte_hit_ratio)
    ));
    for t in &s.tiers {
        out.push_str(&format!(
            "tier {:<7} {:>8} objects {:>12}{}\n",
            t.tier,
            t.objects,
            human(t.bytes),
            t.capacity
                .map_or_else(String::new, |c| format!(" of {}", human(c)))
        ));
    }
    if let Some(i) = &s.disk_index {
        out.push_str(&disk_index(i));
    }
    if !s.disk_admissions.is_empty() {
        out.push_str(&disk_admissions(&s.disk_admissions));
    }
    match s.disk_load {
        Some(l) if l.done => out.push_str(&format!(
            "disk index: {} objects loaded at start-up in {} ms\n",
            l.loaded, l.millis
        )),
        Some(l) => out.push_str(&format!(
            "disk index: loading ({} objects so far; serving meanwhile)\n",
            l.loaded
        )),
        None => {}
    }
    out
}

/// The disk index's memory, and whether it failed.
fn disk_index(i: &crate::admin::DiskIndex) -> String {
    let mut out = format!(
        "disk index memory: {} of {}{}\n",
        human(i.memory_bytes),
        human(i.memory_limit),
        if i.memory_bytes.saturating_add(i.memory_limit / 100) >= i.memory_limit {
            " (full: the disk tier evicts to stay within it; a larger --memory holds more objects)"
        } else {
            ""
        }
    );
    if !i.open {
        out.push_str(
            "disk index: FAILED (an I/O error: a full or failing disk); opened again every 5 s until it can, meanwhile nothing is stored\n",
        );
    }
    if i.reopens > 0 {
        out.push_str(&format!(
            "disk index: failed and was opened again {} time(s) since start (see the WARN lines)\n",
            i.reopens
        ));
    }
    out
}

/// `disk admissions: 7 of 9 stored (queue_full 1, incomplete 1)`: what became of storable
/// responses on their way to disk.
fn disk_admissions(a: &std::collections::BTreeMap<String, u64>) -> String {
    let total: u64 = a.values().sum();
    let stored = a.get("stored").copied().unwrap_or(0);
    let why: Vec<String> = a
        .iter()
        .filter(|(k, v)| k.as_str() != "stored" && **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({})", why.join(", "))
    };
    format!("disk admissions: {stored} of {total} stored{why}\n")
}

/// Prints once, or every second with `watch` (until interrupted).
pub async fn run(admin: &str, token: Option<String>, watch: bool) -> Result<(), String> {
    loop {
        let s = fetch(admin, token.clone()).await?;
        let mut frame = String::new();
        if watch {
            // Clear the screen and go home, then draw.
            frame.push_str("\x1b[2J\x1b[H");
        }
        frame.push_str(&render(&s));
        let mut out = std::io::stdout().lock();
        let written = out.write_all(frame.as_bytes()).and_then(|()| out.flush());
        // A reader that went away (`outpost stats --watch | head`) ends the watch quietly.
        if !watch || written.is_err() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_disk_index_is_said_so() {
        let mut i = crate::admin::DiskIndex {
            memory_bytes: 1 << 20,
            memory_limit: 64 << 20,
            open: true,
            reopens: 0,
        };
        assert!(!super::disk_index(&i).contains("disk index:"));
        i.open = false;
        i.reopens = 2;
        let out = super::disk_index(&i);
        assert!(out.contains("disk index: FAILED"), "{out}");
        assert!(out.contains("opened again 2 time(s)"), "{out}");
    }

    #[test]
    fn disk_admissions_name_what_was_not_stored() {
        let a = [
            ("stored", 7),
            ("queue_full", 1),
            ("incomplete", 1),
            ("error", 0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(
            super::disk_admissions(&a),
            "disk admissions: 7 of 9 stored (incomplete 1, queue_full 1)\n"
        );
    }
}
