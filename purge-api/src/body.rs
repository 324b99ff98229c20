//! The guard around a pushed body: it counts bytes against the limit and the declared
//! `Content-Length`, and checks `Content-SHA256` before it lets the stream end. A violation is
//! yielded as one `Err` in place of the next chunk (or of the end), so a backend that commits
//! only on a clean end never stores a partial or corrupt object. The outcome is also recorded
//! in a shared [`Outcome`], so the handler answers with the real reason whatever the backend
//! returns.
//!
//! A body refused before its end is not simply dropped: [`linger`] keeps reading and discarding
//! it for a short while (like nginx's lingering close). Dropping it makes hyper close the
//! connection while the client is still sending, the kernel answers with a reset, and the
//! client sees "broken pipe" instead of our 413 or 401.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};

use crate::digest::{ContentHasher, to_hex};
use crate::error::{AdminError, BoxError};

/// How long, and how much, a refused body is read and discarded before the connection closes.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 16 << 20;

/// Reads and discards the rest of a refused body in the background (bounded by
/// [`LINGER_TIME`] and [`LINGER_BYTES`]), so the client reads our answer before the
/// connection closes. Without a tokio runtime the body is just dropped.
pub(crate) fn linger(mut body: BoxStream<'static, Result<Bytes, BoxError>>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let drain = async {
            let mut n = 0u64;
            while let Some(Ok(chunk)) = body.next().await {
                n += chunk.len() as u64;
                if n > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

/// What happened to the body, read by the handler once the backend has returned.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The error the stream yielded, if any.
    pub aborted: Option<AdminError>,
    /// The stream reached a clean end.
    pub completed: bool,
}

pub(crate) struct Guard {
    inner: BoxStream<'static, Result<Bytes, BoxError>>,
    limit: u64,
    declared: Option<u64>,
    expected: Option<[u8; 32]>,
    hasher: ContentHasher,
    seen: u64,
    /// This stream has ended (cleanly or with its one error).
    done: bool,
    /// The client's body has ended (or failed): nothing is left to read.
    inner_done: bool,
    outcome: Arc<Mutex<Outcome>>,
}

impl Guard {
    pub(crate) fn new(
        inner: BoxStream<'static, Result<Bytes, BoxError>>,
        limit: u64,
        declared: Option<u64>,
        expected: Option<[u8; 32]>,
    ) -> (Self, Arc<Mutex<Outcome>>) {
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let guard = Self {
            inner,
            limit,
            declared,
            expected,
            hasher: ContentHasher::new(),
            seen: 0,
            done: false,
            inner_done: false,
            outcome: outcome.clone(),
        };
        (guard, outcome)
    }

    fn abort(&mut self, e: AdminError) -> Poll<Option<Result<Bytes, AdminError>>> {
        self.done = true;
        if let Ok(mut o) = self.outcome.lock() {
            o.aborted = Some(e.clone());
        }
        Poll::Ready(Some(Err(e)))
    }

    /// Checks at the end of the body; `Ok` lets the stream end.
    fn finish(&mut self) -> Result<(), AdminError> {
        if let Some(d) = self.declared
            && self.seen != d
        {
            return Err(AdminError::BadRequest(format!(
                "body ended after {} bytes but Content-Length said {d}",
                self.seen
            )));
        }
        if let Some(want) = self.expected {
            let got = std::mem::take(&mut self.hasher).finish();
            if got != want {
                return Err(AdminError::BadRequest(format!(
                    "Content-SHA256 mismatch: the header says {} but the body hashes to {}",
                    to_hex(&want),
                    to_hex(&got)
                )));
            }
        }
        Ok(())
    }
}

impl Stream for Guard {
    type Item = Result<Bytes, AdminError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                this.seen += chunk.len() as u64;
                if this.seen > this.limit {
                    return this.abort(AdminError::TooLarge { limit: this.limit });
                }
                if let Some(d) = this.declared
                    && this.seen > d
                {
                    return this.abort(AdminError::BadRequest(format!(
                        "body is longer than its Content-Length ({d})"
                    )));
                }
                if this.expected.is_some() {
                    this.hasher.update(&chunk);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner_done = true;
                this.abort(AdminError::BadRequest(format!(
                    "reading the request body failed: {e}"
                )))
            }
            Poll::Ready(None) => {
                this.inner_done = true;
                match this.finish() {
                    Ok(()) => {
                        this.done = true;
                        if let Ok(mut o) = this.outcome.lock() {
                            o.completed = true;
                        }
                        Poll::Ready(None)
                    }
                    Err(e) => this.abort(e),
                }
            }
        }
    }
}

impl Drop for Guard {
    /// Refused (too large) or abandoned by the backend before its end: linger on the rest.
    fn drop(&mut self) {
        if !self.inner_done {
            linger(std::mem::replace(
                &mut self.inner,
                futures_util::stream::empty().boxed(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::digest::sha256;

    fn chunks(parts: &[&'static str]) -> BoxStream<'static, Result<Bytes, BoxError>> {
        let v: Vec<Result<Bytes, BoxError>> = parts
            .iter()
            .map(|p| Ok(Bytes::from_static(p.as_bytes())))
            .collect();
        futures_util::stream::iter(v).boxed()
    }

    async fn drain(g: Guard) -> Vec<Result<Bytes, AdminError>> {
        g.collect().await
    }

    #[tokio::test]
    async fn a_clean_body_passes_through_and_completes() {
        let (g, o) = Guard::new(chunks(&["ab", "c"]), 10, Some(3), Some(sha256(b"abc")));
        let out = drain(g).await;
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(Result::is_ok));
        let o = o.lock().unwrap();
        assert!(o.completed && o.aborted.is_none());
    }

    #[tokio::test]
    async fn a_sha_mismatch_replaces_the_end_with_an_error() {
        let (g, o) = Guard::new(chunks(&["ab", "c"]), 10, None, Some(sha256(b"abd")));
        let out = drain(g).await;
        assert_eq!(
            out.len(),
            3,
            "two chunks, then the error instead of the end"
        );
        let e = out[2].as_ref().unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().starts_with("Content-SHA256 mismatch"), "{e}");
        let o = o.lock().unwrap();
        assert!(!o.completed && o.aborted.is_some());
    }

    #[tokio::test]
    async fn the_limit_stops_the_stream() {
        let (g, o) = Guard::new(chunks(&["aaaa", "bbbb", "cccc"]), 6, None, None);
        let out = drain(g).await;
        assert_eq!(out.len(), 2, "one chunk, then the error; nothing after it");
        assert_eq!(out[1], Err(AdminError::TooLarge { limit: 6 }));
        assert!(!o.lock().unwrap().completed);
    }

    #[tokio::test]
    async fn content_length_is_enforced_both_ways() {
        let (g, _) = Guard::new(chunks(&["abcd"]), 100, Some(3), None);
        assert!(drain(g).await[0].is_err());
        let (g, _) = Guard::new(chunks(&["ab"]), 100, Some(3), None);
        let out = drain(g).await;
        assert!(
            out[1]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("Content-Length")
        );
    }

    #[tokio::test]
    async fn a_failing_client_body_is_an_error() {
        let v: Vec<Result<Bytes, BoxError>> =
            vec![Ok(Bytes::from_static(b"a")), Err("reset".into())];
        let (g, o) = Guard::new(futures_util::stream::iter(v).boxed(), 100, None, None);
        let out = drain(g).await;
        assert!(out[1].is_err());
        assert!(o.lock().unwrap().aborted.is_some());
    }
}
