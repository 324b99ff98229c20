//! Byte ranges served from whole stored (or streaming) objects (RFC 9110 §14).

use std::io;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use super::stream_body;
use crate::cache::ServedBody;
use outpost_http::body::{RespBody, full};

pub(super) fn partial(
    mut headers: HeaderMap,
    body: ServedBody,
    start: u64,
    end: u64,
    total: u64,
) -> Response<RespBody> {
    let len = end - start + 1;
    if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{total}")) {
        headers.insert(header::CONTENT_RANGE, v);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let body = match body {
        ServedBody::Full(b) => full(b.slice(start as usize..=end as usize)),
        ServedBody::Empty => full(Bytes::new()),
        // A disk body is read from the range's start; any other is cut from its stream.
        ServedBody::Stream {
            range: Some(range), ..
        } => stream_body(range(start, len)),
        ServedBody::Stream { stream, .. } => stream_body(slice_stream(stream, start, len)),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    *resp.headers_mut() = headers;
    resp
}

/// Skips `start` bytes and yields `len` bytes of a chunk stream, slicing (not copying) chunks.
/// It ends once the range is sent, without asking the stream for more: HTTP/2 reads a body
/// until it ends, and a range of a large disk object would otherwise read the whole file.
/// An error ends it too.
fn slice_stream(
    stream: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    start: u64,
    len: u64,
) -> futures_util::stream::BoxStream<'static, io::Result<Bytes>> {
    let end = start + len;
    futures_util::stream::unfold((stream, 0u64), move |(mut stream, mut pos)| async move {
        loop {
            if pos >= end {
                return None;
            }
            match stream.next().await? {
                Err(e) => return Some((Err(e), (stream, end))),
                Ok(chunk) => {
                    let c_start = pos;
                    pos += chunk.len() as u64;
                    if pos <= start || chunk.is_empty() {
                        continue;
                    }
                    let from = start.saturating_sub(c_start) as usize;
                    let to = (end.min(pos) - c_start) as usize;
                    return Some((Ok(chunk.slice(from..to)), (stream, pos)));
                }
            }
        }
    })
    .boxed()
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeSpec {
    Satisfiable(u64, u64),
    Unsatisfiable,
    /// Not a single byte range we serve: send the whole representation (RFC 9110 §14.2).
    Ignore,
}

/// Parses a single `bytes=` range. Multiple ranges are answered with the full object.
pub(crate) fn parse_range(value: &[u8], total: u64) -> RangeSpec {
    let Ok(s) = std::str::from_utf8(value) else {
        return RangeSpec::Ignore;
    };
    let Some(spec) = s.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return RangeSpec::Ignore;
        };
        if n == 0 || total == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Satisfiable(total.saturating_sub(n), total - 1);
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeSpec::Ignore;
    };
    let end = if b.is_empty() {
        total.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(total.saturating_sub(1)),
            _ => return RangeSpec::Ignore,
        }
    };
    if start >= total {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Satisfiable(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    /// A range ends once it is sent: the stream is not asked for more (here it would never
    /// answer), and the bytes are the range's, across chunks.
    #[tokio::test]
    async fn a_sliced_stream_ends_with_its_range() {
        let chunks = || {
            [&b"0123456789"[..], b"abcdefghij", b"ABCDEFGHIJ"]
                .map(|c| Ok::<_, io::Error>(Bytes::from_static(c)))
        };
        for (start, len, want) in [
            (5, 10, &b"56789abcde"[..]),
            (0, 1, b"0"),
            (10, 10, b"abcdefghij"),
            (19, 2, b"jA"),
        ] {
            let inner = futures_util::stream::iter(chunks())
                .chain(futures_util::stream::pending())
                .boxed();
            let got: Vec<Bytes> = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                slice_stream(inner, start, len)
                    .map(|c| c.unwrap())
                    .collect(),
            )
            .await
            .expect("the range ends without asking for more");
            assert_eq!(got.concat(), want, "{start}+{len}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(b"bytes=0-9", 100), RangeSpec::Satisfiable(0, 9));
        assert_eq!(
            parse_range(b"bytes=90-", 100),
            RangeSpec::Satisfiable(90, 99)
        );
        assert_eq!(
            parse_range(b"bytes=-10", 100),
            RangeSpec::Satisfiable(90, 99)
        );
        assert_eq!(
            parse_range(b"bytes=95-200", 100),
            RangeSpec::Satisfiable(95, 99)
        );
        assert_eq!(parse_range(b"bytes=100-", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-0", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=5-1", 100), RangeSpec::Ignore);
        assert_eq!(parse_range(b"bytes=0-1,5-6", 100), RangeSpec::Ignore);
        assert_eq!(parse_range(b"items=0-1", 100), RangeSpec::Ignore);
    }

    #[tokio::test]
    async fn slicing_a_stream_across_chunks() {
        let chunks: Vec<io::Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"0123")),
            Ok(Bytes::from_static(b"4567")),
            Ok(Bytes::from_static(b"89")),
        ];
        let s = futures_util::stream::iter(chunks).boxed();
        let out: Vec<Bytes> = slice_stream(s, 3, 5).try_collect().await.unwrap();
        assert_eq!(out.concat(), b"34567");
    }
}
