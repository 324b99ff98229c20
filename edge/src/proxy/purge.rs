//! `PURGE /path` on the data port (the Varnish / Squid convention): an admin operation,
//! decided before anything else is prepared ([`super::request::Dispatch::Purge`]).

use http::Response;

use super::Proxy;
use crate::cache::key::NormalizedRequest;
use crate::error::EdgeError;
use outpost_http::body::{RespBody, json};

impl Proxy {
    /// `PURGE /path` (Varnish / Squid convention): the admin token with the purge scope is
    /// required, always (a node without admin tokens refuses PURGE on its data port); hard by
    /// default, soft with `Soft-Purge: 1`. Applied and forwarded exactly as `outpost purge`
    /// does through the admin API: to this node's shields and sibling peers.
    pub(super) async fn purge(
        &self,
        headers: &http::HeaderMap,
        norm: &NormalizedRequest,
    ) -> Response<RespBody> {
        use outpost_purge_api::AdminError;
        let Some((operator, auth)) = self.operator.get() else {
            return self.error(&EdgeError::Admin(AdminError::MethodNotAllowed {
                path: "this node's data port",
                allow: "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
            }));
        };
        let auth = auth.load();
        if auth.is_open() {
            return self.error(&EdgeError::Admin(AdminError::Forbidden(
                "PURGE on the data port needs an admin token: configure [admin] tokens (or OUTPOST_ADMIN_TOKEN) and send it as a Bearer token".into(),
            )));
        }
        if let Err(e) = auth.check(headers, outpost_purge_api::Scope::Purge) {
            return self.error(&EdgeError::Admin(AdminError::Auth(e)));
        }
        let soft = headers
            .get("soft-purge")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
        // The absolute URL of the key (its host and target), as `outpost purge` sends it, so
        // shields and peers read it the same way.
        let req = outpost_purge_api::PurgeRequest {
            urls: vec![format!("http://{}", norm.key.target())],
            soft,
            ..Default::default()
        };
        match outpost_purge_api::AdminBackend::purge(operator, req).await {
            Ok(receipt) => json(&receipt),
            Err(e) => self.error(&EdgeError::Admin(e)),
        }
    }
}
