//! Conditional requests (RFC 9110 §13): If-Match, If-Unmodified-Since, If-None-Match,
//! If-Modified-Since and If-Range, evaluated in the order of §13.2.2.
//!
//! Deliberate choices:
//! - A malformed `If-Match` / `If-None-Match` (not `*` and not a list of entity tags) is ignored as
//!   if absent. RFC 9110 does not say what to do with one; for the GET and HEAD we serve, ignoring
//!   it costs at most a full 200 response where a 304 or 412 might have been meant.
//! - A date field with more than one line, or one that is not an HTTP-date, is ignored
//!   (§13.1.3, §13.1.4 require this).
//! - The origin serves only GET and HEAD, so a failing If-None-Match always yields 304 here; the
//!   412 branch for other methods is kept for completeness.

use std::time::SystemTime;

use http::header::{IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE};
use http::{HeaderMap, HeaderName, Method};

use crate::validator::{TagList, Validators, truncate_to_secs};

/// What the preconditions decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// No precondition failed: perform the method (possibly honouring a Range).
    Proceed,
    /// 304 Not Modified (§15.4.5): the client's cached copy is current.
    NotModified,
    /// 412 Precondition Failed (§15.5.13).
    Failed,
}

/// Evaluates the preconditions of a request for an existing file (RFC 9110 §13.2.2).
pub fn evaluate(method: &Method, headers: &HeaderMap, current: &Validators) -> Precondition {
    let etag = current.etag.as_ref();
    let get_or_head = method == Method::GET || method == Method::HEAD;

    // Step 1: If-Match, strong comparison (§13.1.1).
    if let Some(list) = TagList::parse(headers.get_all(IF_MATCH)) {
        if !list.matches_strong(etag) {
            return Precondition::Failed;
        }
    } else if let (Some(since), Some(modified)) = (
        single_date(headers, IF_UNMODIFIED_SINCE),
        current.last_modified,
    ) {
        // Step 2: If-Unmodified-Since, only without If-Match (§13.1.4). A resource without a
        // modification date ignores it (allowed by §13.1.4).
        if modified > since {
            return Precondition::Failed;
        }
    }

    // Step 3: If-None-Match, weak comparison (§13.1.2).
    if let Some(list) = TagList::parse(headers.get_all(IF_NONE_MATCH)) {
        if list.matches_weak(etag) {
            return if get_or_head {
                Precondition::NotModified
            } else {
                Precondition::Failed
            };
        }
    } else if get_or_head
        && let (Some(since), Some(modified)) = (
            single_date(headers, IF_MODIFIED_SINCE),
            current.last_modified,
        )
    {
        // Step 4: If-Modified-Since, only for GET/HEAD and only without If-None-Match (§13.1.3).
        if modified <= since {
            return Precondition::NotModified;
        }
    }

    Precondition::Proceed
}

/// Step 5 of §13.2.2: true when a Range header may be honoured (no If-Range, or If-Range holds).
///
/// If-Range (§13.1.5) holds when it carries an entity tag that is a strong match for the current
/// one, or an HTTP-date exactly equal to the Last-Modified date. Anything else (a weak tag, an
/// unparseable value, an earlier date) means "send the whole representation".
pub fn range_allowed(headers: &HeaderMap, current: &Validators) -> bool {
    let mut lines = headers.get_all(IF_RANGE).iter();
    let (Some(value), None) = (lines.next(), lines.next()) else {
        // Absent: nothing to check. Several lines: not a valid If-Range, so the condition is false.
        return headers.get(IF_RANGE).is_none();
    };
    let bytes = value.as_bytes();
    let trimmed = bytes.trim_ascii();
    if trimmed.starts_with(b"\"") || trimmed.starts_with(b"W/") {
        return match TagList::parse([value]) {
            Some(TagList::Tags(tags)) if tags.len() == 1 => current
                .etag
                .as_ref()
                .is_some_and(|cur| tags[0].strong_eq(cur)),
            _ => false,
        };
    }
    match (
        value
            .to_str()
            .ok()
            .and_then(|s| httpdate::parse_http_date(s.trim()).ok()),
        current.last_modified,
    ) {
        (Some(date), Some(modified)) => truncate_to_secs(date) == modified,
        _ => false,
    }
}

/// The value of a date precondition, if it is exactly one valid HTTP-date.
fn single_date(headers: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    let mut lines = headers.get_all(name).iter();
    let (Some(value), None) = (lines.next(), lines.next()) else {
        return None;
    };
    let text = value.to_str().ok()?.trim();
    httpdate::parse_http_date(text).ok()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use http::HeaderValue;

    use super::*;

    const MTIME: u64 = 1_700_000_000;

    fn current() -> Validators {
        Validators::new(
            100,
            Some(Duration::new(MTIME, 5)),
            UNIX_EPOCH + Duration::from_secs(MTIME + 3600),
        )
    }

    fn etag() -> String {
        current().etag.unwrap().to_string()
    }

    fn date(secs: u64) -> String {
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
    }

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn eval(pairs: &[(HeaderName, &str)]) -> Precondition {
        evaluate(&Method::GET, &headers(pairs), &current())
    }

    #[test]
    fn no_preconditions_proceed() {
        assert_eq!(eval(&[]), Precondition::Proceed);
    }

    #[test]
    fn if_none_match() {
        let tag = etag();
        assert_eq!(eval(&[(IF_NONE_MATCH, &tag)]), Precondition::NotModified);
        assert_eq!(eval(&[(IF_NONE_MATCH, "*")]), Precondition::NotModified);
        assert_eq!(
            eval(&[(IF_NONE_MATCH, &format!("\"nope\", W/{tag}"))]),
            Precondition::NotModified,
            "weak comparison for GET"
        );
        assert_eq!(eval(&[(IF_NONE_MATCH, "\"nope\"")]), Precondition::Proceed);
        assert_eq!(
            evaluate(
                &Method::POST,
                &headers(&[(IF_NONE_MATCH, &tag)]),
                &current()
            ),
            Precondition::Failed
        );
    }

    #[test]
    fn if_none_match_takes_precedence_over_if_modified_since() {
        // §13.1.3: If-Modified-Since is ignored when If-None-Match is present.
        assert_eq!(
            eval(&[
                (IF_NONE_MATCH, "\"other\""),
                (IF_MODIFIED_SINCE, &date(MTIME + 10))
            ]),
            Precondition::Proceed
        );
    }

    #[test]
    fn if_modified_since() {
        assert_eq!(
            eval(&[(IF_MODIFIED_SINCE, &date(MTIME))]),
            Precondition::NotModified
        );
        assert_eq!(
            eval(&[(IF_MODIFIED_SINCE, &date(MTIME + 1))]),
            Precondition::NotModified
        );
        assert_eq!(
            eval(&[(IF_MODIFIED_SINCE, &date(MTIME - 1))]),
            Precondition::Proceed
        );
        assert_eq!(
            eval(&[(IF_MODIFIED_SINCE, "yesterday")]),
            Precondition::Proceed
        );
        // Only for GET and HEAD.
        assert_eq!(
            evaluate(
                &Method::HEAD,
                &headers(&[(IF_MODIFIED_SINCE, &date(MTIME))]),
                &current()
            ),
            Precondition::NotModified
        );
        assert_eq!(
            evaluate(
                &Method::DELETE,
                &headers(&[(IF_MODIFIED_SINCE, &date(MTIME))]),
                &current()
            ),
            Precondition::Proceed
        );
        // Two lines are not one valid HTTP-date.
        assert_eq!(
            eval(&[
                (IF_MODIFIED_SINCE, &date(MTIME)),
                (IF_MODIFIED_SINCE, &date(MTIME))
            ]),
            Precondition::Proceed
        );
    }

    #[test]
    fn if_match_and_if_unmodified_since() {
        let tag = etag();
        assert_eq!(eval(&[(IF_MATCH, &tag)]), Precondition::Proceed);
        assert_eq!(eval(&[(IF_MATCH, "*")]), Precondition::Proceed);
        assert_eq!(eval(&[(IF_MATCH, "\"other\"")]), Precondition::Failed);
        assert_eq!(
            eval(&[(IF_MATCH, &format!("W/{tag}"))]),
            Precondition::Failed,
            "strong comparison"
        );
        assert_eq!(
            eval(&[(IF_UNMODIFIED_SINCE, &date(MTIME - 1))]),
            Precondition::Failed
        );
        assert_eq!(
            eval(&[(IF_UNMODIFIED_SINCE, &date(MTIME))]),
            Precondition::Proceed
        );
        // If-Unmodified-Since is ignored when If-Match is present (§13.1.4).
        assert_eq!(
            eval(&[(IF_MATCH, &tag), (IF_UNMODIFIED_SINCE, &date(MTIME - 1))]),
            Precondition::Proceed
        );
        // If-Match failing wins over a matching If-None-Match (step 1 before step 3).
        assert_eq!(
            eval(&[(IF_MATCH, "\"other\""), (IF_NONE_MATCH, &tag)]),
            Precondition::Failed
        );
    }

    #[test]
    fn if_range() {
        let cur = current();
        let check = |v: &str| range_allowed(&headers(&[(IF_RANGE, v)]), &cur);
        assert!(range_allowed(&HeaderMap::new(), &cur));
        assert!(check(&etag()));
        assert!(!check(&format!("W/{}", etag())), "weak tags never match");
        assert!(!check("\"other\""));
        assert!(check(&date(MTIME)));
        assert!(!check(&date(MTIME - 1)));
        assert!(!check(&date(MTIME + 1)), "the date must match exactly");
        assert!(!check("garbage"));
        assert!(!range_allowed(
            &headers(&[(IF_RANGE, &etag()), (IF_RANGE, &etag())]),
            &cur
        ));
    }
}
