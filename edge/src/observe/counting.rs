//! A response body that counts the bytes it sends, for streams whose length is not known up
//! front (a hit with a known length is counted from its Content-Length instead), and writes
//! the request's access log line when it ends or is dropped (a client that left mid-body is
//! logged with the bytes it got).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::access_log::{AccessLog, Entry};
use super::metrics::EdgeMetrics;
use crate::cache::status::CacheStatus;

/// An access log line waiting for its body: the log, the entry, when the request started.
pub type PendingLine = (Arc<AccessLog>, Entry, std::time::Instant);

pin_project! {
    pub struct CountingBody<B> {
        #[pin]
        inner: B,
        metrics: Arc<EdgeMetrics>,
        cache: CacheStatus,
        sent: u64,
        line: Option<PendingLine>,
    }

    impl<B> PinnedDrop for CountingBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((log, mut entry, started)) = this.line.take() {
                entry.bytes = Some(*this.sent);
                entry.total = started.elapsed();
                log.log(entry);
            }
        }
    }
}

impl<B> CountingBody<B> {
    pub fn new(
        inner: B,
        metrics: Arc<EdgeMetrics>,
        cache: CacheStatus,
        line: Option<PendingLine>,
    ) -> Self {
        Self {
            inner,
            metrics,
            cache,
            sent: 0,
            line,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for CountingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(d) = frame.data_ref()
        {
            this.metrics.add_bytes(*this.cache, d.len() as u64);
            *this.sent += d.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
