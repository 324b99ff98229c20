//! The live request stream behind `outpost log` (`GET /log` on the admin port), like
//! `varnishlog`: every answered request as a JSON line (the access log's JSON fields), filtered
//! on the node by status, cache result and URL prefix.
//!
//! Bounded cost to the data path:
//! - with nobody watching, a request pays one relaxed atomic load;
//! - with watchers, one entry per request (its fields copied) goes into a bounded broadcast
//!   channel ([`CHANNEL`] entries; sending takes the channel's short lock); a watcher that
//!   reads too slowly skips entries (it is told how many), and no request waits for it;
//! - at most [`MAX_WATCHERS`] streams at once; more get 503.
//!
//! A stream writes an empty line after [`HEARTBEAT`] without entries, so a watcher that went
//! away is noticed and its subscription dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;

use super::access_log::{Entry, json};

/// Entries a watcher may fall behind by before it skips some.
pub const CHANNEL: usize = 1024;
/// Streams at once.
pub const MAX_WATCHERS: usize = 8;
/// An empty line after this long without entries.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// What a watcher asked for (`/log?status=5xx&cache=MISS&url_prefix=/assets/`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `5xx` (a class) or `404` (one status).
    status: Option<(u16, bool)>,
    /// A cache result (`HIT`, `MISS`, `STALE`, `REVALIDATED`, `PASS`, `ERROR`), any case.
    cache: Option<String>,
    /// The URL's path starts with this.
    url_prefix: Option<String>,
}

impl Filter {
    /// Parses a query string; unknown parameters and bad values are errors (a typo must not
    /// silently show everything).
    pub fn parse(query: Option<&str>) -> Result<Filter, String> {
        let mut f = Filter::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "status" => {
                    let v = v.to_ascii_lowercase();
                    f.status = Some(match v.strip_suffix("xx") {
                        Some(c) if matches!(c, "1" | "2" | "3" | "4" | "5") => {
                            (c.parse::<u16>().expect("a digit") * 100, true)
                        }
                        _ => match v.parse::<u16>() {
                            Ok(s) if (100..=599).contains(&s) => (s, false),
                            _ => return Err(format!("status {v:?}: expected 1xx..5xx or a code")),
                        },
                    });
                }
                "cache" => {
                    let v = v.to_ascii_uppercase();
                    if !["HIT", "MISS", "STALE", "REVALIDATED", "PASS", "ERROR"].contains(&&*v) {
                        return Err(format!(
                            "cache {v:?}: expected HIT, MISS, STALE, REVALIDATED, PASS or ERROR"
                        ));
                    }
                    f.cache = Some(v);
                }
                "url_prefix" => f.url_prefix = Some(v.into_owned()),
                other => {
                    return Err(format!(
                        "unknown filter {other:?} (status, cache, url_prefix)"
                    ));
                }
            }
        }
        Ok(f)
    }

    pub fn matches(&self, e: &Entry) -> bool {
        if let Some((s, class)) = self.status {
            let hit = if class {
                e.status / 100 == s / 100
            } else {
                e.status == s
            };
            if !hit {
                return false;
            }
        }
        if let Some(c) = &self.cache
            && c != e.cache
        {
            return false;
        }
        if let Some(p) = &self.url_prefix
            && !e.request.path().starts_with(p.as_str())
        {
            return false;
        }
        true
    }
}

/// The node's live stream: one per proxy.
pub struct LiveLog {
    watchers: AtomicUsize,
    tx: broadcast::Sender<Arc<Entry>>,
}

impl std::fmt::Debug for LiveLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveLog")
            .field("watchers", &self.watchers.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for LiveLog {
    fn default() -> Self {
        Self {
            watchers: AtomicUsize::new(0),
            tx: broadcast::channel(CHANNEL).0,
        }
    }
}

/// Counts a watcher while its stream lives.
struct Watching(Arc<LiveLog>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LiveLog {
    /// Someone is watching: only then does a request build an entry for the stream.
    #[inline]
    pub fn active(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    pub fn publish(&self, e: Arc<Entry>) {
        // No receiver left (the last watcher just went): nothing to do.
        let _ = self.tx.send(e);
    }

    /// A stream of JSON lines for one watcher, or `None` when [`MAX_WATCHERS`] are watching.
    pub fn watch(
        self: &Arc<Self>,
        filter: Filter,
    ) -> Option<impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + use<>>
    {
        self.watchers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_WATCHERS).then_some(n + 1)
            })
            .ok()?;
        let guard = Watching(self.clone());
        let rx = self.tx.subscribe();
        Some(futures_util::stream::unfold(
            (rx, filter, guard),
            |(mut rx, filter, guard)| async move {
                loop {
                    let line = match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
                        Err(_) => Bytes::from_static(b"\n"),
                        Ok(Ok(e)) if filter.matches(&e) => {
                            let mut out = Vec::with_capacity(384);
                            json(&mut out, &e);
                            out.push(b'\n');
                            Bytes::from(out)
                        }
                        Ok(Ok(_)) => continue,
                        Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                            Bytes::from(format!("{{\"skipped\":{n}}}\n"))
                        }
                        Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                    };
                    return Some((Ok(line), (rx, filter, guard)));
                }
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_refuse_typos() {
        let f = Filter::parse(Some("status=5xx&cache=miss&url_prefix=%2Fassets%2F")).unwrap();
        assert_eq!(f.status, Some((500, true)));
        assert_eq!(f.cache.as_deref(), Some("MISS"));
        assert_eq!(f.url_prefix.as_deref(), Some("/assets/"));
        assert_eq!(
            Filter::parse(Some("status=404")).unwrap().status,
            Some((404, false))
        );
        assert!(Filter::parse(Some("status=6xx")).is_err());
        assert!(Filter::parse(Some("cache=hot")).is_err());
        assert!(Filter::parse(Some("stauts=5xx")).is_err());
        assert_eq!(Filter::parse(None).unwrap(), Filter::default());
    }

    #[test]
    fn watchers_are_capped_and_counted() {
        let log = Arc::new(LiveLog::default());
        assert!(!log.active());
        let streams: Vec<_> = (0..MAX_WATCHERS)
            .map(|_| log.watch(Filter::default()).expect("a stream"))
            .collect();
        assert!(log.active());
        assert!(log.watch(Filter::default()).is_none(), "one too many");
        drop(streams);
        assert!(!log.active());
    }
}
