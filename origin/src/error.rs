//! Everything that stops a request from being answered with the file: one enum, one status each.
//!
//! The response for an error is built in exactly one place, [`crate::respond::error`].

use std::io;

use http::{Method, StatusCode};

use crate::path::BadPath;

/// Which side a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request asked for something we do not serve; the client must change the request.
    Client,
    /// The site on disk or the machine failed; the operator must act.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("method {0} not allowed (only GET and HEAD)")]
    MethodNotAllowed(Method),
    #[error("bad request path: {0}")]
    BadPath(BadPath),
    #[error("no such file")]
    NotFound,
    /// A symlink (at any component of the path) resolves outside the site root.
    #[error("path resolves outside the site root through a symlink")]
    OutsideRoot,
    /// The file exists but the origin process may not read it.
    #[error("permission denied")]
    PermissionDenied,
    /// RFC 9110 §15.5.13.
    #[error("precondition failed")]
    PreconditionFailed,
    /// RFC 9110 §15.5.17; carries the file length for `Content-Range: bytes */len`.
    #[error("range not satisfiable (file is {len} bytes)")]
    RangeNotSatisfiable { len: u64 },
    #[error("i/o error: {0}")]
    Io(#[source] io::Error),
}

impl OriginError {
    pub fn status(&self) -> StatusCode {
        match self {
            OriginError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            OriginError::BadPath(_) => StatusCode::BAD_REQUEST,
            OriginError::NotFound => StatusCode::NOT_FOUND,
            OriginError::OutsideRoot | OriginError::PermissionDenied => StatusCode::FORBIDDEN,
            OriginError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            OriginError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            OriginError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Who has to act. A forbidden file is the operator's business (a symlink or permission in
    /// the site), even though the client sees 403.
    pub fn side(&self) -> Side {
        match self {
            OriginError::OutsideRoot | OriginError::PermissionDenied | OriginError::Io(_) => {
                Side::Internal
            }
            _ => Side::Client,
        }
    }

    /// Whether the same request may succeed if retried unchanged (only transient I/O failures).
    pub fn retryable(&self) -> bool {
        matches!(self, OriginError::Io(_))
    }

    /// Classifies an error from opening or inspecting a file below the root.
    pub fn from_fs(e: io::Error) -> OriginError {
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => OriginError::NotFound,
            io::ErrorKind::PermissionDenied => OriginError::PermissionDenied,
            // ENAMETOOLONG and ELOOP are properties of the request or the site, not transient.
            io::ErrorKind::InvalidFilename => OriginError::NotFound,
            _ if e.raw_os_error() == Some(ELOOP) => OriginError::NotFound,
            _ => OriginError::Io(e),
        }
    }
}

/// `ELOOP` on Linux and the BSDs differ; both are "too many symlinks", which we answer with 404.
#[cfg(target_os = "linux")]
const ELOOP: i32 = 40;
#[cfg(not(target_os = "linux"))]
const ELOOP: i32 = 62;

impl From<BadPath> for OriginError {
    fn from(e: BadPath) -> OriginError {
        OriginError::BadPath(e)
    }
}
