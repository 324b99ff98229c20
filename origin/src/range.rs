//! Byte ranges (RFC 9110 §14): parsing `Range: bytes=…` and resolving it against a file length.
//!
//! Only a single range is served. Deliberate choices, all allowed because a server MAY ignore the
//! Range header field (RFC 9110 §14.2):
//! - a syntactically invalid Range, a range unit other than `bytes`, or a header sent on several
//!   lines is ignored, and the full representation is sent with 200;
//! - a multi-range request (`bytes=0-1,5-6`) is ignored the same way, instead of answering with
//!   `multipart/byteranges`;
//! - a zero-length file ignores Range, because no `Content-Range` can describe a part of nothing.
//!
//! A valid single range that does not overlap the file (`first-pos >= length`, or a zero suffix
//! length) is unsatisfiable: 416 with `Content-Range: bytes */length` (§15.5.17).

use http::HeaderMap;
use http::header::RANGE;

/// One parsed byte-range-spec (RFC 9110 §14.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `first-last` (last clamped to the end of the file) or `first-` (`last` is `None`).
    FromTo { first: u64, last: Option<u64> },
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// A satisfiable range: inclusive `first..=last` within the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub first: u64,
    pub last: u64,
}

impl ByteRange {
    /// Number of bytes in the range (at least one).
    #[expect(
        clippy::len_without_is_empty,
        reason = "a satisfiable range always holds at least one byte"
    )]
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }
}

/// The range does not overlap the file: answer 416.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// The Range of a request, if it has exactly one line holding exactly one valid `bytes` range.
pub fn from_headers(headers: &HeaderMap) -> Option<RangeSpec> {
    let mut lines = headers.get_all(RANGE).iter();
    match (lines.next(), lines.next()) {
        (Some(value), None) => parse(value.to_str().ok()?),
        _ => None,
    }
}

/// Parses a Range field value. `None` means "ignore the Range header".
pub fn parse(value: &str) -> Option<RangeSpec> {
    let (unit, set) = value.trim().split_once('=')?;
    // Range units are case-insensitive (§14.1).
    if !unit.trim_end().eq_ignore_ascii_case("bytes") {
        return None;
    }
    // Empty list elements are allowed (§5.6.1.2): "bytes=0-1," is one range.
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return None;
    };
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim_end(), last.trim_start());
    if first.is_empty() {
        return Some(RangeSpec::Suffix(number(last)?));
    }
    let first = number(first)?;
    if last.is_empty() {
        return Some(RangeSpec::FromTo { first, last: None });
    }
    let last = number(last)?;
    // §14.1.1: a byte-range-spec with last-pos < first-pos is invalid.
    if last < first {
        return None;
    }
    Some(RangeSpec::FromTo {
        first,
        last: Some(last),
    })
}

/// `1*DIGIT`. A number too large for u64 saturates: it is still a valid position, just beyond
/// any file, so `first` becomes unsatisfiable and `last` or a suffix means "to the end".
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX))
}

impl RangeSpec {
    /// Resolves the range against a file of `len` bytes (`len > 0`; see the module docs).
    pub fn resolve(self, len: u64) -> Result<ByteRange, Unsatisfiable> {
        if len == 0 {
            return Err(Unsatisfiable);
        }
        match self {
            RangeSpec::FromTo { first, last } => {
                if first >= len {
                    return Err(Unsatisfiable);
                }
                let last = last.map_or(len - 1, |l| l.min(len - 1));
                Ok(ByteRange { first, last })
            }
            // §14.1.2: a suffix longer than the representation selects all of it; a zero suffix
            // selects nothing and is unsatisfiable.
            RangeSpec::Suffix(0) => Err(Unsatisfiable),
            RangeSpec::Suffix(n) => Ok(ByteRange {
                first: len.saturating_sub(n),
                last: len - 1,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_to(first: u64, last: Option<u64>) -> Option<RangeSpec> {
        Some(RangeSpec::FromTo { first, last })
    }

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(parse("bytes=0-499"), from_to(0, Some(499)));
        assert_eq!(parse("bytes=500-"), from_to(500, None));
        assert_eq!(parse("bytes=-500"), Some(RangeSpec::Suffix(500)));
        assert_eq!(parse("bytes=5-5"), from_to(5, Some(5)));
        assert_eq!(parse(" Bytes = 1 - 2 "), from_to(1, Some(2)));
        assert_eq!(parse("bytes=1-2,"), from_to(1, Some(2)));
        assert_eq!(
            parse("bytes=0-99999999999999999999999"),
            from_to(0, Some(u64::MAX))
        );
    }

    #[test]
    fn invalid_or_multiple_ranges_are_ignored() {
        for v in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=+1-2",
            "bytes=1-2-3",
            "bytes=0x10-",
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=0-1, -5",
            "bytes 0-1",
        ] {
            assert_eq!(parse(v), None, "{v:?}");
        }
    }

    #[test]
    fn resolves_against_the_length() {
        let len = 1000;
        let r = |s: &str| parse(s).unwrap().resolve(len);
        assert_eq!(
            r("bytes=0-499"),
            Ok(ByteRange {
                first: 0,
                last: 499
            })
        );
        assert_eq!(r("bytes=0-499").unwrap().len(), 500);
        assert_eq!(
            r("bytes=900-5000"),
            Ok(ByteRange {
                first: 900,
                last: 999
            })
        );
        assert_eq!(
            r("bytes=999-"),
            Ok(ByteRange {
                first: 999,
                last: 999
            })
        );
        assert_eq!(
            r("bytes=-100"),
            Ok(ByteRange {
                first: 900,
                last: 999
            })
        );
        assert_eq!(
            r("bytes=-5000"),
            Ok(ByteRange {
                first: 0,
                last: 999
            })
        );
        assert_eq!(r("bytes=1000-"), Err(Unsatisfiable));
        assert_eq!(r("bytes=1000-2000"), Err(Unsatisfiable));
        assert_eq!(r("bytes=-0"), Err(Unsatisfiable));
        assert_eq!(
            parse("bytes=99999999999999999999999-")
                .unwrap()
                .resolve(len),
            Err(Unsatisfiable)
        );
        assert_eq!(parse("bytes=0-").unwrap().resolve(0), Err(Unsatisfiable));
    }

    #[test]
    fn header_on_several_lines_is_ignored() {
        let mut h = HeaderMap::new();
        assert_eq!(from_headers(&h), None);
        h.append(RANGE, "bytes=0-1".parse().unwrap());
        assert_eq!(from_headers(&h), from_to(0, Some(1)));
        h.append(RANGE, "bytes=2-3".parse().unwrap());
        assert_eq!(from_headers(&h), None);
    }
}
