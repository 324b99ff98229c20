//! The request path of the origin, one phase per module:
//!
//! ```text
//!  request
//!    │  method      GET / HEAD, else 405 + Allow                         (here)
//!    │  path        sanitise the URI path, else 400                       path.rs
//!    │  file        map to a regular file under the root: 404 / 403       file.rs
//!    │  validators  ETag + Last-Modified from size and mtime              validator.rs
//!    │  rules       Cache-Control + Surrogate-Key by glob                 rules.rs
//!    │  conditional If-Match … If-Modified-Since: 412 / 304               conditional.rs
//!    │  range       If-Range, then Range: 206 / 416 / whole file          range.rs
//!    ▼  respond     headers + streamed body; every error in one place     respond.rs
//!  response  ──►  one access-log line (server.rs)
//! ```

use std::path::PathBuf;
use std::time::SystemTime;

use http::{HeaderMap, Method, Request, Response, Uri};
use tracing::{error, warn};

use crate::conditional::{self, Precondition};
use crate::error::OriginError;
use crate::file;
use crate::path::RequestPath;
use crate::range;
use crate::respond::{self, Body, Representation};
use crate::rules::Rules;
use crate::validator::Validators;

/// What every request needs: the canonical root and the rules.
#[derive(Debug)]
pub struct Site {
    pub root: PathBuf,
    pub rules: Rules,
}

impl Site {
    /// Answers one request. Never fails: errors become responses here.
    pub async fn handle<B>(&self, req: &Request<B>) -> Response<Body> {
        let now = SystemTime::now();
        let head = req.method() == Method::HEAD;
        match self
            .serve(req.method(), req.uri(), req.headers(), now)
            .await
        {
            Ok(resp) => resp,
            Err(err) => {
                log_error(&err, req.uri());
                respond::error(&err, head, now)
            }
        }
    }

    async fn serve(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Result<Response<Body>, OriginError> {
        let head = match *method {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Err(OriginError::MethodNotAllowed(method.clone())),
        };
        // `Uri::path` excludes the query: query strings never select a file.
        let path = RequestPath::parse(uri.path())?;
        let opened = file::open(&self.root, &path).await?;
        let validators = Validators::from_metadata(&opened.meta, now);
        let policy = self.rules.lookup(&opened.logical);

        match conditional::evaluate(method, headers, &validators) {
            Precondition::Proceed => {}
            Precondition::NotModified => {
                return Ok(respond::not_modified(&validators, &policy, now));
            }
            Precondition::Failed => return Err(OriginError::PreconditionFailed),
        }

        let len = opened.meta.len();
        // RFC 9110 §14.2: Range is defined for GET only, so HEAD ignores it. An empty file has no
        // byte to select (see range.rs).
        let spec = if head || len == 0 || !conditional::range_allowed(headers, &validators) {
            None
        } else {
            range::from_headers(headers)
        };
        let range = match spec {
            Some(spec) => Some(
                spec.resolve(len)
                    .map_err(|_| OriginError::RangeNotSatisfiable { len })?,
            ),
            None => None,
        };

        let rep = Representation {
            validators: &validators,
            policy,
            content_type: respond::content_type(&opened.logical),
            len,
        };
        respond::file(&rep, opened.file, range, head, now).await
    }
}

/// Errors the operator has to act on are logged with what to do; client mistakes are not (the
/// access log already records them).
fn log_error(err: &OriginError, uri: &Uri) {
    match err {
        OriginError::OutsideRoot => warn!(
            path = %uri.path(),
            "refused a symlink that resolves outside the site root; move its target inside the root or replace the link with a copy"
        ),
        OriginError::PermissionDenied => warn!(
            path = %uri.path(),
            "file exists but the origin process cannot read it; fix its permissions"
        ),
        OriginError::Io(e) => error!(
            path = %uri.path(),
            error = %e,
            "cannot read a file under the site root; check the disk and the file, the request may succeed if retried"
        ),
        _ => {}
    }
}
