//! The selector's one error type: which side failed, and whether another node may do better.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

/// Who is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A node (edge) did not answer as it should.
    Node,
    /// The selector itself: no node could take the connection.
    Selector,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Node => "node",
            Side::Selector => "selector",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no node could take the connection ({tried} tried, {nodes} configured)")]
    NoNode { tried: usize, nodes: usize },
    #[error("cannot connect to node {node} at {addr}: {source}")]
    Connect {
        node: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to node {node} at {addr} timed out after {after:?}")]
    ConnectTimeout {
        node: String,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("probe of {addr} failed: {reason}")]
    Probe { addr: SocketAddr, reason: String },
    #[error("probe of {addr} timed out after {after:?}")]
    ProbeTimeout { addr: SocketAddr, after: Duration },
    #[error("probe of {addr}: /readyz answered {status}")]
    ProbeStatus {
        addr: SocketAddr,
        status: StatusCode,
    },
}

impl Error {
    pub fn side(&self) -> Side {
        match self {
            Error::NoNode { .. } => Side::Selector,
            _ => Side::Node,
        }
    }

    /// True when trying the next node may succeed: a connect failure says nothing about the
    /// other nodes, and no byte has reached the client yet, so retrying is invisible to it.
    pub fn try_next_node(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::ConnectTimeout { .. })
    }
}
