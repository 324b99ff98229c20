//! `outpost purge`: build a [`PurgeRequest`] from the arguments, check it locally, send it.

use std::fmt;

use super::{AdminClient, ClientError, RETRY, resolve_token, with_retry};
use crate::wire::{PurgeReceipt, PurgeRequest};

/// The arguments of `outpost purge`. `Debug` redacts the token.
#[derive(Clone, Default)]
pub struct PurgeArgs {
    /// The node's admin address, `host:port` or `http://host:port`.
    pub admin: String,
    /// Bearer token; `None` falls back to `OUTPOST_ADMIN_TOKEN`.
    pub token: Option<String>,
    pub soft: bool,
    pub urls: Vec<String>,
    pub prefixes: Vec<String>,
    pub tags: Vec<String>,
    pub all: bool,
    /// Fleet mode: how long the node waits for every node to confirm before it answers.
    pub wait: Option<std::time::Duration>,
}

impl fmt::Debug for PurgeArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PurgeArgs")
            .field("admin", &self.admin)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("soft", &self.soft)
            .field("urls", &self.urls)
            .field("prefixes", &self.prefixes)
            .field("tags", &self.tags)
            .field("all", &self.all)
            .field("wait", &self.wait)
            .finish()
    }
}

/// Sends one purge and returns the node's receipt. Prints nothing. An invalid request is a
/// [`ClientError::Usage`] before anything is sent; transient failures (connect errors, 5xx)
/// are retried up to 3 attempts (a purge is idempotent).
pub async fn run_purge(args: PurgeArgs) -> Result<PurgeReceipt, ClientError> {
    let req = PurgeRequest {
        urls: args.urls,
        prefixes: args.prefixes,
        tags: args.tags,
        all: args.all,
        soft: args.soft,
        local: false,
        wait_ms: args
            .wait
            .map(|w| w.as_millis().min(u128::from(u64::MAX)) as u64),
    };
    req.validate()
        .map_err(|e| ClientError::Usage(e.to_string()))?;
    let client = AdminClient::new(&args.admin, resolve_token(args.token))?;
    with_retry(RETRY, || client.purge(&req)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_empty_purge_is_a_usage_error_and_sends_nothing() {
        let e = run_purge(PurgeArgs {
            admin: "127.0.0.1:1".into(),
            soft: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(e.is_usage(), "{e}");
        assert_eq!(
            e.to_string(),
            "empty purge request: give urls, prefixes, tags or all"
        );
        let e = run_purge(PurgeArgs {
            admin: "127.0.0.1:1".into(),
            prefixes: vec!["no-slash".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(
            e.is_usage() && e.to_string().starts_with("prefixes[0]"),
            "{e}"
        );
    }

    #[test]
    fn debug_redacts_the_token() {
        let a = PurgeArgs {
            token: Some("s3cret".into()),
            ..Default::default()
        };
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}
