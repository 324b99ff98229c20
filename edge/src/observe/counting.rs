//! A response body that counts the bytes it sends, for streams whose length is not known up
//! front (a hit with a known length is counted from its Content-Length instead).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::metrics::EdgeMetrics;
use crate::cache::status::CacheStatus;

pin_project! {
    pub struct CountingBody<B> {
        #[pin]
        inner: B,
        metrics: Arc<EdgeMetrics>,
        cache: CacheStatus,
    }
}

impl<B> CountingBody<B> {
    pub fn new(inner: B, metrics: Arc<EdgeMetrics>, cache: CacheStatus) -> Self {
        Self {
            inner,
            metrics,
            cache,
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
