//! The real `outpost-origin` server in this process, on 127.0.0.1:0.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use outpost_origin::{OriginConfig, OriginOverrides, OriginServer};

use super::{Serving, repo};

/// A running origin; dropping it shuts the server down.
pub struct SiteOrigin {
    pub addr: SocketAddr,
    server: Serving<std::io::Result<()>>,
}

impl SiteOrigin {
    /// Serves `root` with the rules file `rules` (none: built-in rules).
    pub async fn start(root: &Path, rules: Option<&Path>) -> SiteOrigin {
        SiteOrigin::start_tuned(root, rules, |_| {}).await
    }

    /// Like [`SiteOrigin::start`], with `tune` applied to the configuration first.
    pub async fn start_tuned(
        root: &Path,
        rules: Option<&Path>,
        tune: impl FnOnce(&mut OriginConfig),
    ) -> SiteOrigin {
        let mut cfg = OriginConfig::load(
            None,
            OriginOverrides {
                listen: Some("127.0.0.1:0".into()),
                root: Some(root.display().to_string()),
                rules: rules.map(|r| r.display().to_string()),
            },
        )
        .unwrap_or_else(|e| panic!("test config: {e}"));
        tune(&mut cfg);
        let server = OriginServer::bind(cfg).await.expect("bind 127.0.0.1:0");
        let addr = server.local_addr();
        SiteOrigin {
            addr,
            server: Serving::spawn(|stopped| server.run(stopped)),
        }
    }

    /// The repo's `site/` with `configs/origin-rules.toml`.
    pub async fn sample_site() -> SiteOrigin {
        SiteOrigin::start(
            &repo().join("site"),
            Some(&repo().join("configs/origin-rules.toml")),
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops accepting, drains, and returns what `run` returned.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.server.stop_within(Duration::from_secs(15)).await
    }
}
