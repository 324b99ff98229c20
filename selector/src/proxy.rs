//! One client connection: choose, connect (retrying on the next node), splice.
//!
//! ```text
//! accept ─► locate client (source prefix) ─► rank up nodes (policy) ─► connect to the best
//!             ▲                                                            │ refused / timed out:
//!             └─────── next node in the ranking, node marked down ◄────────┘ (passive check)
//! connected ─► splice bytes both ways until both sides close, or until no byte has moved
//!              either way for `limits.idle_timeout` (then both are dropped)
//! ```
//!
//! The selector works at L4: it never parses what flows through, so TLS passes untouched and
//! it keeps no per-request state. Retrying a failed connect is safe because no byte has been
//! read from the client yet; once spliced, a connection belongs to its node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::conn::{self, Spliced};
use crate::error::Error;
use crate::health::HealthState;
use crate::node::Node;
use crate::pool::Pool;

/// Serves one accepted client connection to its end.
pub(crate) async fn serve(
    pool: Arc<Pool>,
    mut client: TcpStream,
    peer: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
) {
    let choice = pool.choose(peer.ip());
    let mut tried = 0;
    for index in choice.order {
        let node = &pool.nodes[index];
        // Another connection may have found this node dead since the ranking was made.
        if !choice.fail_open && node.state() != HealthState::Up {
            continue;
        }
        tried += 1;
        // Counted as active from now, so least-connections sees it before the connect ends.
        let active = node.open();
        match connect(node, connect_timeout).await {
            Ok(mut upstream) => {
                if node.spec.proxy_protocol {
                    use tokio::io::AsyncWriteExt as _;
                    let local = client.local_addr().unwrap_or(peer);
                    let header = outpost_net::proxy_protocol::header(peer, local);
                    if let Err(e) = upstream.write_all(&header).await {
                        debug!(node = %node.spec.name, error = %e, "connection ended");
                        drop(active);
                        return;
                    }
                }
                node.metrics.connections.inc();
                debug!(node = %node.spec.name, retries = tried - 1, "spliced");
                match conn::splice(&mut client, &mut upstream, idle_timeout).await {
                    Spliced::Closed { to_node, to_client } => {
                        debug!(node = %node.spec.name, to_node, to_client, "connection closed");
                    }
                    Spliced::Idle => {
                        pool.metrics.idle_closed.inc();
                        debug!(node = %node.spec.name, ?idle_timeout, "idle connection closed");
                    }
                    // Resets and timeouts from either side end the connection; they are
                    // the client's or the node's business, not a selector failure.
                    Spliced::Failed(e) => {
                        debug!(node = %node.spec.name, error = %e, "connection ended");
                    }
                }
                drop(active);
                return;
            }
            Err(e) => {
                drop(active);
                debug!(node = %node.spec.name, error = %e, "connect failed; trying the next node");
                node.connect_failed(&e);
            }
        }
    }
    pool.metrics.unroutable.inc();
    let e = Error::NoNode {
        tried,
        nodes: pool.nodes.len(),
    };
    // Every node down or draining: an operator must look.
    warn!(side = e.side().as_str(), error = %e, "connection refused");
}

async fn connect(node: &Node, timeout: Duration) -> Result<TcpStream, Error> {
    let addr = node.spec.address;
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(source)) => Err(Error::Connect {
            node: node.spec.name.clone(),
            addr,
            source,
        }),
        Err(_) => Err(Error::ConnectTimeout {
            node: node.spec.name.clone(),
            addr,
            after: timeout,
        }),
    }
}
