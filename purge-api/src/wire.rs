//! The JSON bodies of the admin API: purge requests and receipts, push receipts and object
//! listings. Every field of a request has a default, and unknown fields are rejected so a typo
//! (`"url"` for `"urls"`) is a 400 naming the field, not a silent no-op.

use serde::{Deserialize, Serialize};

use crate::error::AdminError;

/// `POST /purge`. At least one of `urls`, `prefixes`, `tags` or `all` must be given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PurgeRequest {
    /// Exact URLs: a path (`/a/b.css`, query included) or an absolute `http(s)://` URL.
    pub urls: Vec<String>,
    /// Everything under these: a path starting with `/` or an absolute `http(s)://` URL.
    pub prefixes: Vec<String>,
    /// Surrogate keys (cache tags), as sent by the origin in `Surrogate-Key`.
    pub tags: Vec<String>,
    /// Everything the node holds.
    pub all: bool,
    /// Mark matching objects stale (they may still serve stale-while-revalidate and
    /// stale-if-error) instead of removing them.
    pub soft: bool,
    /// Apply on the receiving node only. A node that forwards a purge to its peers sets it,
    /// so a purge travels one hop and never loops.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// Fleet mode: how long the receipt waits for every node to confirm, in milliseconds
    /// (default: the node's `fleet.receipt_wait`; at most [`MAX_WAIT_MS`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// The longest a purge's receipt may wait for the fleet.
pub const MAX_WAIT_MS: u64 = 60_000;

/// What a purge selected, for receipts and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PurgeKind {
    All,
    Url,
    Prefix,
    Tag,
}

impl PurgeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PurgeKind::All => "all",
            PurgeKind::Url => "url",
            PurgeKind::Prefix => "prefix",
            PurgeKind::Tag => "tag",
        }
    }
}

impl PurgeRequest {
    /// Checks what serde cannot: something is selected, and every entry is well formed.
    /// The message names the offending field and entry.
    pub fn validate(&self) -> Result<(), AdminError> {
        if self.urls.is_empty() && self.prefixes.is_empty() && self.tags.is_empty() && !self.all {
            return Err(AdminError::bad_request(
                "empty purge request: give urls, prefixes, tags or all",
            ));
        }
        if let Some(w) = self.wait_ms
            && w > MAX_WAIT_MS
        {
            return Err(AdminError::BadRequest(format!(
                "wait_ms: at most {MAX_WAIT_MS} (a minute), got {w}"
            )));
        }
        for (field, list) in [("urls", &self.urls), ("prefixes", &self.prefixes)] {
            for (i, u) in list.iter().enumerate() {
                check_target(u).map_err(|why| {
                    AdminError::BadRequest(format!("{field}[{i}]: {why}, got {u:?}"))
                })?;
            }
        }
        for (i, t) in self.tags.iter().enumerate() {
            if t.is_empty() {
                return Err(AdminError::BadRequest(format!("tags[{i}]: empty tag")));
            }
            if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(AdminError::BadRequest(format!(
                    "tags[{i}]: a tag holds no spaces or control characters, got {t:?}"
                )));
            }
        }
        Ok(())
    }

    /// The kinds of selector present, in a fixed order (all, url, prefix, tag).
    pub fn kinds(&self) -> Vec<PurgeKind> {
        let mut k = Vec::new();
        if self.all {
            k.push(PurgeKind::All);
        }
        if !self.urls.is_empty() {
            k.push(PurgeKind::Url);
        }
        if !self.prefixes.is_empty() {
            k.push(PurgeKind::Prefix);
        }
        if !self.tags.is_empty() {
            k.push(PurgeKind::Tag);
        }
        k
    }
}

/// A URL or prefix: `/path...` or `http(s)://host/...`, no whitespace or control characters.
fn check_target(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty entry");
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("spaces and control characters are not allowed");
    }
    if s.starts_with('/') {
        return Ok(());
    }
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(()),
        Some(_) => Err("the URL has no host"),
        None => Err("must be a path starting with '/' or an absolute http(s) URL"),
    }
}

/// The answer to a purge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReceipt {
    /// Unique id of this purge (for logs and fleet propagation).
    pub id: String,
    /// The node's invalidation sequence number after this purge.
    pub seq: u64,
    pub soft: bool,
    /// What the purge selected ([`PurgeRequest::kinds`]).
    pub kinds: Vec<PurgeKind>,
    /// How many stored objects matched, when the node knows (generation-based purges of
    /// prefixes and tags do not count, nor does a node whose disk index is still loading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<u64>,
    /// Per-node outcome: one entry on a single node, one per node in fleet mode.
    #[serde(default)]
    pub nodes: Vec<NodeResult>,
    /// Fleet mode: the purge's sequence in the fleet's stream; absent when it is not in the
    /// stream yet (NATS unreachable: it waits in the node's outbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_seq: Option<u64>,
}

impl PurgeReceipt {
    /// True when every node applied the purge.
    pub fn all_ok(&self) -> bool {
        self.nodes.iter().all(|n| n.ok)
    }
}

/// One node's outcome of a purge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResult {
    pub node: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Fleet mode: the last stream sequence the node reports applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_seq: Option<u64>,
    /// Fleet mode: the node had not confirmed the purge when the receipt was written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

impl NodeResult {
    /// A node that applied the purge.
    pub fn applied(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            ok: true,
            error: None,
            applied_seq: None,
            pending: false,
        }
    }

    /// A node that did not, and why.
    pub fn failed(node: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            ..Self::applied(node)
        }
    }
}

/// The answer to `PUT /objects/<path>` (201 when created, 200 when replaced).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReceipt {
    /// The decoded object path, e.g. `/css/site.css`.
    pub path: String,
    pub size: u64,
    /// Strong ETag from the SHA-256 of the body, quoted: `"<64 hex digits>"`
    /// ([`crate::digest::strong_etag`]).
    pub etag: String,
    pub created: bool,
}

/// One entry of `GET /objects?prefix=`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedObject {
    pub path: String,
    pub size: u64,
    pub etag: String,
    pub content_type: String,
    /// When the object was pushed, in milliseconds since the Unix epoch.
    pub pushed_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<PurgeRequest, String> {
        serde_json::from_str::<PurgeRequest>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let r = parse(r#"{"urls":["/a"]}"#).unwrap();
        assert!(!r.all && !r.soft && r.tags.is_empty());
        let e = parse(r#"{"url":["/a"]}"#).unwrap_err();
        assert!(e.contains("unknown field `url`"), "{e}");
        let e = parse(r#"{"urls":"/a"}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn an_empty_purge_is_refused() {
        let e = PurgeRequest::default().validate().unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(
            e.to_string(),
            "empty purge request: give urls, prefixes, tags or all"
        );
        let soft_only = PurgeRequest {
            soft: true,
            ..Default::default()
        };
        assert!(soft_only.validate().is_err());
        let all = PurgeRequest {
            all: true,
            ..Default::default()
        };
        assert!(all.validate().is_ok());
        assert_eq!(all.kinds(), vec![PurgeKind::All]);
    }

    #[test]
    fn entries_are_checked_and_named() {
        let ok = PurgeRequest {
            urls: vec!["/a?b=1".into(), "https://example.com/x".into()],
            prefixes: vec!["/img/".into(), "http://example.com/".into()],
            tags: vec!["product-42".into()],
            ..Default::default()
        };
        ok.validate().unwrap();
        assert_eq!(
            ok.kinds(),
            vec![PurgeKind::Url, PurgeKind::Prefix, PurgeKind::Tag]
        );
        let cases = [
            (
                PurgeRequest {
                    urls: vec!["/ok".into(), "".into()],
                    ..Default::default()
                },
                "urls[1]: empty entry",
            ),
            (
                PurgeRequest {
                    prefixes: vec!["img/".into()],
                    ..Default::default()
                },
                "prefixes[0]: must be a path starting with '/'",
            ),
            (
                PurgeRequest {
                    prefixes: vec!["https:///x".into()],
                    ..Default::default()
                },
                "prefixes[0]: the URL has no host",
            ),
            (
                PurgeRequest {
                    tags: vec!["".into()],
                    ..Default::default()
                },
                "tags[0]: empty tag",
            ),
            (
                PurgeRequest {
                    tags: vec!["a b".into()],
                    ..Default::default()
                },
                "tags[0]: a tag holds no spaces",
            ),
            (
                PurgeRequest {
                    urls: vec!["/a\nb".into()],
                    ..Default::default()
                },
                "urls[0]: spaces and control",
            ),
            (
                PurgeRequest {
                    all: true,
                    wait_ms: Some(MAX_WAIT_MS + 1),
                    ..Default::default()
                },
                "wait_ms: at most 60000",
            ),
        ];
        for (req, want) in cases {
            let e = req.validate().unwrap_err().to_string();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn receipts_round_trip() {
        let r = PurgeReceipt {
            id: "p-1".into(),
            seq: 7,
            soft: false,
            kinds: vec![PurgeKind::Tag],
            matched: None,
            nodes: vec![NodeResult::applied("edge-a")],
            fleet_seq: None,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("matched") && json.contains(r#""kinds":["tag"]"#));
        assert_eq!(serde_json::from_str::<PurgeReceipt>(&json).unwrap(), r);
        assert!(r.all_ok());
    }
}
