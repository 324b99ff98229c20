//! The response body every layer answers with, and the two small answers built on it: plain
//! text and JSON.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use crate::BoxError;

/// A response body: a whole body in one piece, as every memory hit and generated response
/// has (no allocation and no dynamic dispatch per response), or any other body, boxed
/// (streams from fills and disk are `Send` but not `Sync`).
pub struct RespBody(BodyKind);

enum BodyKind {
    Full(Full<Bytes>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl RespBody {
    /// Boxes any body.
    pub fn boxed<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self(BodyKind::Boxed(body.map_err(Into::into).boxed_unsync()))
    }
}

impl http_body::Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            BodyKind::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            BodyKind::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyKind::Full(b) => b.is_end_stream(),
            BodyKind::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            BodyKind::Full(b) => b.size_hint(),
            BodyKind::Boxed(b) => b.size_hint(),
        }
    }
}

pub fn full(b: Bytes) -> RespBody {
    RespBody(BodyKind::Full(Full::new(b)))
}

/// A short plain-text response, used for every error the edge generates.
pub fn plain(status: StatusCode, msg: &str) -> Response<RespBody> {
    let mut r = Response::new(full(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A JSON response (`no-store`).
pub fn json<T: Serialize>(v: &T) -> Response<RespBody> {
    match serde_json::to_vec(v) {
        Ok(b) => {
            let mut r = Response::new(full(Bytes::from(b)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("internal error: encoding JSON: {e}"),
        ),
    }
}
