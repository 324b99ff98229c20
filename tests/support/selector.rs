//! A `Selector` running in this process, on 127.0.0.1:0 (data and admin).

use std::net::SocketAddr;
use std::time::Duration;

use outpost_config::Source;
use outpost_selector::{NodesReport, Selector, SelectorConfig, SelectorOverrides};

use super::{Serving, client_within, eventually_within};

/// The bound of the selector's admin requests and state waits.
pub const SELECTOR_WAIT: Duration = Duration::from_secs(10);

/// A running selector; dropping it stops it.
pub struct RunningSelector {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    server: Serving,
}

impl RunningSelector {
    /// Starts a selector from a config file body; listen and admin_listen are set here.
    pub async fn start(body: &str) -> RunningSelector {
        let text = format!("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{body}");
        let cfg = SelectorConfig::from_source(
            &Source::inline("test-selector.toml", text),
            SelectorOverrides::default(),
        )
        .unwrap_or_else(|e| panic!("test config: {e}"));
        let selector = Selector::bind(cfg).await.expect("bind 127.0.0.1:0");
        let addr = selector.local_addr();
        let admin = selector.admin_addr().expect("admin listener");
        RunningSelector {
            addr,
            admin,
            server: Serving::spawn(|stopped| selector.run(stopped)),
        }
    }

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        client_within(SELECTOR_WAIT)
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap()
    }

    /// `/metrics` as Prometheus scrapes it: OpenMetrics text.
    pub async fn openmetrics(&self) -> reqwest::Response {
        client_within(SELECTOR_WAIT)
            .get(format!("http://{}/metrics", self.admin))
            .header("accept", crate::support::exposition::PROMETHEUS_ACCEPT)
            .send()
            .await
            .unwrap()
    }

    pub async fn nodes(&self) -> NodesReport {
        let text = self.admin_get("/nodes").await.text().await.unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("/nodes: {e}\n{text}"))
    }

    pub async fn node_state(&self, name: &str) -> String {
        let report = self.nodes().await;
        let node = report.nodes.into_iter().find(|n| n.name == name).unwrap();
        node.state
    }

    /// Waits (bounded) until the selector reports `name` in `state`.
    pub async fn wait_state(&self, name: &str, state: &str) {
        eventually_within(SELECTOR_WAIT, &format!("{name} is {state}"), async || {
            self.node_state(name).await == state
        })
        .await;
    }

    /// Stops it and waits (bounded) until it has.
    pub async fn shutdown(self) {
        self.server.stop_within(SELECTOR_WAIT).await;
    }
}
