//! Outpost's anycast-style node selector: it listens on one address and splices each TCP
//! connection to the best healthy edge.
//!
//! Anycast gives many nodes one address and lets routing pick the nearest healthy one. On one
//! machine we simulate that: clients are placed by source prefix, nodes by region or
//! coordinates, a policy ranks the nodes, and health probes withdraw the ones that fail or
//! drain, as a BGP speaker withdraws a route.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | `configs/selector.toml` validated into [`SelectorConfig`], every error with field and line |
//! | [`locate`] | where a client is: the source-prefix table and great-circle distance |
//! | [`policy`] | how the eligible nodes are ranked for one connection |
//! | [`health`] | the up/down state machine (rise, fall, passive failures) and the `/readyz` probe |
//! | `node` | one node's live state: health, smoothed RTT, connection counters |
//! | `pool` | all nodes, and the ranked choice for one connection (fail-open when none is up) |
//! | `proxy` | one connection: choose, connect with retry on the next node, splice |
//! | `conn` | what bounds every connection in time and count, on `outpost-net`: the idle splice, the admin port's idle shutdown |
//! | `metrics` | the Prometheus registry behind `/metrics` |
//! | [`admin`] | the admin port: `/metrics`, `/nodes`, `/healthz`, `/readyz` |
//! | [`server`] | [`Selector`]: bind, accept loop, shutdown |
//! | [`error`] | the crate's one error type |
//!
//! The path of one connection is drawn in the `proxy` module.

pub mod admin;
pub mod config;
mod conn;
pub mod error;
pub mod health;
pub mod locate;
mod metrics;
mod node;
pub mod policy;
mod pool;
mod proxy;
pub mod server;

pub use admin::{NodeStatus, NodesReport};
pub use config::{NodeSpec, SelectorConfig, SelectorOverrides};
pub use error::Error;
pub use health::{HealthConfig, HealthState};
pub use ipnet::IpNet;
pub use locate::{ClientMap, Coords, Location};
pub use policy::PolicyKind;
pub use server::Selector;
