//! Request-target sanitising: turns the path of a request URI into safe segments under the root.
//!
//! The path is taken from the URI alone, so a query string never influences which file is served
//! (RFC 9110 §4.2.2 lets the origin decide what a query means; a static site ignores it). Each
//! `/`-separated segment is percent-decoded exactly once (RFC 3986 §2.1). A request is refused with
//! 400 when a segment:
//!
//! - is `..` (written plainly or percent-encoded as `%2e%2e`): a well-behaved client removes dot
//!   segments before sending (RFC 3986 §5.2.4), so one that arrives is an attempt to climb out of the
//!   root, not a link;
//! - decodes to something containing `/` (`%2f`), `\` (raw or `%5c`), NUL or any other control
//!   character: such a segment would name a different path on disk than the one in the URI;
//! - is not valid UTF-8 after decoding.
//!
//! Empty segments (`//`) and `.` segments are dropped, so `/a//./b` names the same file as `/a/b`.
//! Decoding happens once: `%252e%252e` is the literal file name `%2e%2e`, not a parent directory.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use percent_encoding::percent_decode_str;

/// A sanitised request path: decoded segments that are each a plain file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    segments: Vec<String>,
    trailing_slash: bool,
}

/// Why a request path was refused. Each one is answered with 400 Bad Request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// The path does not start with `/` (for example the asterisk form `*`).
    NotAbsolute,
    /// A `..` segment, plain or percent-encoded.
    DotDot,
    /// A segment decodes to `/` or `\`.
    EncodedSeparator,
    /// A segment contains NUL or another control character.
    ControlCharacter,
    /// A segment is not UTF-8 after percent-decoding.
    NotUtf8,
}

impl BadPath {
    /// Short explanation sent to the client as the 400 body.
    pub fn reason(self) -> &'static str {
        match self {
            BadPath::NotAbsolute => "request path must start with '/'",
            BadPath::DotDot => "request path must not contain '..' segments",
            BadPath::EncodedSeparator => "request path must not contain encoded '/' or '\\'",
            BadPath::ControlCharacter => "request path must not contain control characters",
            BadPath::NotUtf8 => "request path must be UTF-8 after percent-decoding",
        }
    }
}

impl fmt::Display for BadPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl RequestPath {
    /// Sanitises the path component of a request URI (without the query).
    pub fn parse(raw: &str) -> Result<RequestPath, BadPath> {
        let rest = raw.strip_prefix('/').ok_or(BadPath::NotAbsolute)?;
        // A raw backslash is not a separator in a URI, but it is one to some file systems and to
        // many tools downstream; refusing it keeps "the path in the URI" and "the path on disk" equal.
        if rest.contains('\\') {
            return Err(BadPath::EncodedSeparator);
        }
        let mut segments = Vec::new();
        for raw_segment in rest.split('/') {
            let decoded: Vec<u8> = percent_decode_str(raw_segment).collect();
            if decoded.iter().any(|&b| b == b'/' || b == b'\\') {
                return Err(BadPath::EncodedSeparator);
            }
            if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) {
                return Err(BadPath::ControlCharacter);
            }
            let segment = String::from_utf8(decoded).map_err(|_| BadPath::NotUtf8)?;
            match segment.as_str() {
                "" | "." => continue,
                ".." => return Err(BadPath::DotDot),
                _ => {}
            }
            // Defence in depth: after the checks above every segment must be a single normal
            // path component, never a root, prefix or parent reference.
            let mut components = Path::new(&segment).components();
            match (components.next(), components.next()) {
                (Some(Component::Normal(_)), None) => {}
                _ => return Err(BadPath::EncodedSeparator),
            }
            segments.push(segment);
        }
        Ok(RequestPath {
            segments,
            trailing_slash: raw.len() > 1 && raw.ends_with('/'),
        })
    }

    /// The decoded segments, each a plain file name.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// True when the URI path ended with `/` (so it can only name a directory).
    pub fn trailing_slash(&self) -> bool {
        self.trailing_slash
    }

    /// The path relative to the site root, for joining onto it.
    pub fn relative(&self) -> PathBuf {
        self.segments.iter().collect()
    }

    /// The normalised decoded path, `/` followed by the segments (`/` for the root).
    pub fn logical(&self) -> String {
        let mut s =
            String::with_capacity(1 + self.segments.iter().map(|x| x.len() + 1).sum::<usize>());
        for seg in &self.segments {
            s.push('/');
            s.push_str(seg);
        }
        if s.is_empty() {
            s.push('/');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> RequestPath {
        RequestPath::parse(raw).unwrap_or_else(|e| panic!("{raw:?} refused: {e}"))
    }

    #[test]
    fn plain_paths() {
        assert_eq!(ok("/").segments(), &[] as &[String]);
        assert_eq!(ok("/").logical(), "/");
        assert!(!ok("/").trailing_slash());
        let p = ok("/assets/css/style.css");
        assert_eq!(p.segments(), ["assets", "css", "style.css"]);
        assert_eq!(p.relative(), PathBuf::from("assets/css/style.css"));
        assert_eq!(p.logical(), "/assets/css/style.css");
        assert!(!p.trailing_slash());
        assert!(ok("/docs/").trailing_slash());
    }

    #[test]
    fn decodes_once_and_normalises_empty_and_dot_segments() {
        assert_eq!(ok("/a%20b/c%2Ehtml").logical(), "/a b/c.html");
        assert_eq!(ok("/a//./b").logical(), "/a/b");
        assert_eq!(ok("/%2e/b").logical(), "/b");
        // Double encoding is a literal name, never a parent directory.
        assert_eq!(ok("/%252e%252e/x").segments(), ["%2e%2e", "x"]);
        assert_eq!(ok("/caf%C3%A9").logical(), "/café");
        assert_eq!(ok("/...").segments(), ["..."]);
        assert_eq!(ok("/..a/b..").segments(), ["..a", "b.."]);
    }

    #[test]
    fn refuses_traversal() {
        for raw in [
            "/..",
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/%2e%2e/etc/passwd",
            "/assets/%2e%2e/%2e%2e/x",
            "/%2E%2E/x",
            "/.%2e/x",
            "/%2e./x",
        ] {
            assert_eq!(RequestPath::parse(raw), Err(BadPath::DotDot), "{raw}");
        }
    }

    #[test]
    fn refuses_separators_controls_and_garbage() {
        assert_eq!(RequestPath::parse("/a%2fb"), Err(BadPath::EncodedSeparator));
        assert_eq!(RequestPath::parse("/a%2Fb"), Err(BadPath::EncodedSeparator));
        assert_eq!(RequestPath::parse("/a%5cb"), Err(BadPath::EncodedSeparator));
        assert_eq!(RequestPath::parse("/a\\b"), Err(BadPath::EncodedSeparator));
        assert_eq!(RequestPath::parse("/..\\x"), Err(BadPath::EncodedSeparator));
        assert_eq!(RequestPath::parse("/a%00b"), Err(BadPath::ControlCharacter));
        assert_eq!(RequestPath::parse("/a%0ab"), Err(BadPath::ControlCharacter));
        assert_eq!(RequestPath::parse("/a%7fb"), Err(BadPath::ControlCharacter));
        assert_eq!(RequestPath::parse("/%ff"), Err(BadPath::NotUtf8));
        assert_eq!(RequestPath::parse("*"), Err(BadPath::NotAbsolute));
        assert_eq!(RequestPath::parse(""), Err(BadPath::NotAbsolute));
    }
}
