//! Validators of a file (RFC 9110 §8.8): a strong entity tag and a Last-Modified date.
//!
//! The entity tag follows nginx: it is derived from the file's size and modification time, here with
//! nanosecond precision, `"<mtime-nanos-hex>-<size-hex>"`. It is *strong* (§8.8.1): we serve the
//! file's bytes unchanged (no compression or transformation), and any write that changes the bytes
//! changes the size or the mtime. The residual risk is a rewrite of the same size within one mtime
//! tick, which nanosecond timestamps make negligible on every modern file system.

use std::fmt;
use std::fs::Metadata;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;

/// An entity tag (RFC 9110 §8.8.3): an opaque quoted string, optionally marked weak (`W/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityTag {
    weak: bool,
    /// The characters between the quotes.
    opaque: Vec<u8>,
}

impl EntityTag {
    pub fn strong(opaque: impl Into<Vec<u8>>) -> EntityTag {
        EntityTag {
            weak: false,
            opaque: opaque.into(),
        }
    }

    pub fn weak(opaque: impl Into<Vec<u8>>) -> EntityTag {
        EntityTag {
            weak: true,
            opaque: opaque.into(),
        }
    }

    pub fn is_weak(&self) -> bool {
        self.weak
    }

    /// Strong comparison (RFC 9110 §8.8.3.2): both strong and the opaque tags equal.
    pub fn strong_eq(&self, other: &EntityTag) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }

    /// Weak comparison (RFC 9110 §8.8.3.2): the opaque tags equal, whatever the weakness flags.
    pub fn weak_eq(&self, other: &EntityTag) -> bool {
        self.opaque == other.opaque
    }

    pub fn to_header_value(&self) -> HeaderValue {
        let mut v = Vec::with_capacity(self.opaque.len() + 4);
        if self.weak {
            v.extend_from_slice(b"W/");
        }
        v.push(b'"');
        v.extend_from_slice(&self.opaque);
        v.push(b'"');
        // The opaque part only ever holds etagc bytes (parsed or generated as hex), all of which
        // are valid in a header value.
        HeaderValue::from_bytes(&v).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
    }

    /// Parses one entity tag at the start of `input`; returns it and the rest of the input.
    ///
    /// `entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE`, `etagc = %x21 / %x23-7E / obs-text`. Note that a
    /// comma is a valid etagc, so a list cannot be split on commas before parsing.
    fn parse_prefix(input: &[u8]) -> Option<(EntityTag, &[u8])> {
        let (weak, rest) = match input.strip_prefix(b"W/") {
            Some(rest) => (true, rest),
            None => (false, input),
        };
        let rest = rest.strip_prefix(b"\"")?;
        let end = rest.iter().position(|&b| b == b'"')?;
        let opaque = &rest[..end];
        if opaque.iter().any(|&b| b < 0x21 || b == 0x7f) {
            return None;
        }
        Some((
            EntityTag {
                weak,
                opaque: opaque.to_vec(),
            },
            &rest[end + 1..],
        ))
    }
}

impl fmt::Display for EntityTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weak {
            f.write_str("W/")?;
        }
        write!(f, "\"{}\"", String::from_utf8_lossy(&self.opaque))
    }
}

/// The value of `If-Match` or `If-None-Match` (RFC 9110 §13.1.1, §13.1.2): `*` or a list of tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagList {
    Any,
    Tags(Vec<EntityTag>),
}

impl TagList {
    /// Parses every line of the field (a list may be split across lines, RFC 9110 §5.3).
    /// Returns `None` when the field is absent or malformed; callers then ignore the precondition.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a HeaderValue>) -> Option<TagList> {
        let mut tags = Vec::new();
        let mut seen_line = false;
        for line in lines {
            seen_line = true;
            let bytes = trim_ows(line.as_bytes());
            if bytes == b"*" {
                return Some(TagList::Any);
            }
            let mut rest = bytes;
            loop {
                // Empty list elements are allowed and ignored (RFC 9110 §5.6.1.2).
                rest = trim_ows(rest);
                while let Some(r) = rest.strip_prefix(b",") {
                    rest = trim_ows(r);
                }
                if rest.is_empty() {
                    break;
                }
                let (tag, after) = EntityTag::parse_prefix(rest)?;
                tags.push(tag);
                let after = trim_ows(after);
                if !(after.is_empty() || after.starts_with(b",")) {
                    return None;
                }
                rest = after;
            }
        }
        (seen_line && !tags.is_empty()).then_some(TagList::Tags(tags))
    }

    /// True when the list matches the current tag under strong comparison (`If-Match`).
    pub fn matches_strong(&self, current: Option<&EntityTag>) -> bool {
        match (self, current) {
            (TagList::Any, _) => true,
            (TagList::Tags(tags), Some(cur)) => tags.iter().any(|t| t.strong_eq(cur)),
            (TagList::Tags(_), None) => false,
        }
    }

    /// True when the list matches the current tag under weak comparison (`If-None-Match`).
    pub fn matches_weak(&self, current: Option<&EntityTag>) -> bool {
        match (self, current) {
            (TagList::Any, _) => true,
            (TagList::Tags(tags), Some(cur)) => tags.iter().any(|t| t.weak_eq(cur)),
            (TagList::Tags(_), None) => false,
        }
    }
}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// The validators sent with a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<EntityTag>,
    /// Whole seconds (the resolution of an HTTP-date), never later than the response's Date.
    pub last_modified: Option<SystemTime>,
}

impl Validators {
    /// Validators of an opened file. `now` is the response's Date.
    ///
    /// Both are omitted when the platform gives no modification time (or one before 1970): an
    /// entity tag from the size alone would claim a strength it does not have.
    pub fn from_metadata(meta: &Metadata, now: SystemTime) -> Validators {
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        Validators::new(meta.len(), mtime, now)
    }

    /// `mtime` is the modification time since the Unix epoch.
    pub fn new(size: u64, mtime: Option<Duration>, now: SystemTime) -> Validators {
        let Some(mtime) = mtime else {
            return Validators {
                etag: None,
                last_modified: None,
            };
        };
        let etag = EntityTag::strong(format!("{:x}-{:x}", mtime.as_nanos(), size));
        let modified = UNIX_EPOCH + Duration::from_secs(mtime.as_secs());
        // RFC 9110 §8.8.2.1: a Last-Modified later than the message's Date (a file stamped in the
        // future, or clock skew) must be replaced by the Date.
        let now_secs = truncate_to_secs(now);
        Validators {
            etag: Some(etag),
            last_modified: Some(modified.min(now_secs)),
        }
    }
}

/// Rounds a time down to whole seconds, the resolution of an HTTP-date.
pub fn truncate_to_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(lines: &[&str]) -> Option<TagList> {
        let values: Vec<HeaderValue> = lines
            .iter()
            .map(|l| HeaderValue::from_str(l).unwrap())
            .collect();
        TagList::parse(&values)
    }

    #[test]
    fn parses_lists_star_and_weak_tags() {
        assert_eq!(list(&["*"]), Some(TagList::Any));
        assert_eq!(list(&[" * "]), Some(TagList::Any));
        assert_eq!(
            list(&["\"a\", W/\"b\"", "\"c,d\""]),
            Some(TagList::Tags(vec![
                EntityTag::strong("a"),
                EntityTag::weak("b"),
                EntityTag::strong("c,d"),
            ]))
        );
        assert_eq!(
            list(&[", \"a\" ,,"]),
            Some(TagList::Tags(vec![EntityTag::strong("a")]))
        );
        assert_eq!(
            list(&["\"\""]),
            Some(TagList::Tags(vec![EntityTag::strong("")]))
        );
    }

    #[test]
    fn malformed_lists_are_ignored() {
        assert_eq!(list(&[]), None);
        assert_eq!(list(&[""]), None);
        assert_eq!(list(&["abc"]), None);
        assert_eq!(list(&["\"abc"]), None);
        assert_eq!(list(&["\"a\" \"b\""]), None);
        assert_eq!(list(&["w/\"a\""]), None);
        assert_eq!(list(&["\"a b\""]), None);
    }

    #[test]
    fn weak_and_strong_comparison() {
        // The table from RFC 9110 §8.8.3.2.
        let (w1, w2, s1) = (
            EntityTag::weak("1"),
            EntityTag::weak("2"),
            EntityTag::strong("1"),
        );
        assert!(!w1.strong_eq(&w1) && w1.weak_eq(&w1));
        assert!(!w1.strong_eq(&w2) && !w1.weak_eq(&w2));
        assert!(!w1.strong_eq(&s1) && w1.weak_eq(&s1));
        assert!(s1.strong_eq(&s1) && s1.weak_eq(&s1));
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let cur = EntityTag::strong("abc");
        assert!(list(&["W/\"abc\""]).unwrap().matches_weak(Some(&cur)));
        assert!(list(&["\"x\", \"abc\""]).unwrap().matches_weak(Some(&cur)));
        assert!(!list(&["\"abcd\""]).unwrap().matches_weak(Some(&cur)));
        assert!(list(&["*"]).unwrap().matches_weak(Some(&cur)));
        assert!(!list(&["\"abc\""]).unwrap().matches_weak(None));
        // If-Match uses strong comparison: a weak tag never matches.
        assert!(!list(&["W/\"abc\""]).unwrap().matches_strong(Some(&cur)));
        assert!(list(&["\"abc\""]).unwrap().matches_strong(Some(&cur)));
    }

    #[test]
    fn validators_from_size_and_mtime() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let mtime = Duration::new(1_700_000_000, 123_456_789);
        let v = Validators::new(2048, Some(mtime), now);
        let etag = v.etag.unwrap();
        assert!(!etag.is_weak());
        assert_eq!(etag.to_string(), format!("\"{:x}-800\"", mtime.as_nanos()));
        assert_eq!(etag.to_header_value(), etag.to_string().as_str());
        assert_eq!(
            v.last_modified,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        // Same size, other mtime: another tag.
        let other = Validators::new(2048, Some(mtime + Duration::from_nanos(1)), now);
        assert_ne!(other.etag.unwrap().to_string(), etag.to_string());
    }

    #[test]
    fn last_modified_never_after_date() {
        let now = UNIX_EPOCH + Duration::new(1_000, 900_000_000);
        let v = Validators::new(1, Some(Duration::from_secs(5_000)), now);
        assert_eq!(
            v.last_modified,
            Some(UNIX_EPOCH + Duration::from_secs(1_000))
        );
        let none = Validators::new(1, None, now);
        assert_eq!(none.etag, None);
        assert_eq!(none.last_modified, None);
    }
}
