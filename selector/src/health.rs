//! Node health: the up/down state machine (rise and fall thresholds, passive failures) and the
//! active probe of each node's `GET /readyz` over HTTP/1.1.
//!
//! The state machine is pure (observations in, transitions out) so tests drive it without
//! sockets or clocks. The probe loop (`run_probes`) feeds it, as does the proxy when a connect
//! fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{Instrument, debug, debug_span};

use crate::error::Error;
use crate::node::Node;

/// Health settings (config table `[health]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between two probes of one node.
    pub probe_interval: Duration,
    /// A probe that takes longer has failed. At most `probe_interval`.
    pub probe_timeout: Duration,
    /// Consecutive good probes that bring a down node back.
    pub rise: u32,
    /// Consecutive failed probes that take an up node down.
    pub fall: u32,
}

impl Default for HealthConfig {
    /// One probe a second; one failure withdraws a node (so a dead node is out within one
    /// interval), two successes in a row bring it back (so a flapping node does not get
    /// traffic on every other probe). HAProxy defaults to rise 2, fall 3; we fall faster
    /// because the proxy retries on the next node anyway.
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            rise: 2,
            fall: 1,
        }
    }
}

/// Where a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Takes new connections.
    Up,
    /// Failed probes or a failed connect: no new connections.
    Down,
    /// Its `/readyz` answers 503: it is shutting down on purpose, no new connections.
    Draining,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Up => "up",
            HealthState::Down => "down",
            HealthState::Draining => "draining",
        }
    }
}

/// One piece of evidence about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observation {
    /// `/readyz` answered 2xx.
    ProbeReady,
    /// `/readyz` answered 503.
    ProbeDraining,
    /// The probe could not connect, timed out, or got another status.
    ProbeFailed,
    /// A client connection could not connect to the node's data address (passive check).
    ConnectFailed,
}

/// The state machine of one node.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    state: HealthState,
    ok_streak: u32,
    fail_streak: u32,
    rise: u32,
    fall: u32,
}

impl Health {
    /// A new node starts up: optimistic, like HAProxy, so a freshly started selector serves at
    /// once. A node that is in fact dead costs one failed connect, which is retried on the next
    /// node and takes the dead one down.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            state: HealthState::Up,
            ok_streak: 0,
            fail_streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Applies an observation; returns the old state when it changed.
    pub fn observe(&mut self, obs: Observation) -> Option<HealthState> {
        let before = self.state;
        match obs {
            Observation::ProbeReady => {
                self.fail_streak = 0;
                self.ok_streak = self.ok_streak.saturating_add(1);
                if self.state != HealthState::Up && self.ok_streak >= self.rise {
                    self.state = HealthState::Up;
                }
            }
            Observation::ProbeDraining => {
                // The node asked to be left alone; believe it at once, whatever `fall` says.
                self.ok_streak = 0;
                self.fail_streak = 0;
                self.state = HealthState::Draining;
            }
            Observation::ProbeFailed => {
                self.ok_streak = 0;
                self.fail_streak = self.fail_streak.saturating_add(1);
                match self.state {
                    HealthState::Up if self.fail_streak >= self.fall => {
                        self.state = HealthState::Down;
                    }
                    // A draining node that stops answering has exited.
                    HealthState::Draining => self.state = HealthState::Down,
                    _ => {}
                }
            }
            Observation::ConnectFailed => {
                // Passive failure: the data port refused a real client, which is stronger
                // evidence than a probe, so no `fall` threshold. The probes bring it back.
                self.ok_streak = 0;
                if self.state == HealthState::Up {
                    self.state = HealthState::Down;
                }
            }
        }
        (self.state != before).then_some(before)
    }
}

/// What one probe found, with its round-trip time when the node answered.
#[derive(Debug)]
pub(crate) struct ProbeResult {
    pub observation: Observation,
    pub rtt: Option<Duration>,
    pub error: Option<Error>,
}

/// One probe: `GET /readyz` on a fresh HTTP/1.1 connection, bounded by `timeout`. The RTT
/// runs from the connect to the response head, so it includes the TCP handshake: one real
/// network round trip plus the node's time to answer, which is what a client pays too.
pub(crate) async fn probe(admin: SocketAddr, timeout: Duration) -> ProbeResult {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, readyz(admin)).await;
    let rtt = started.elapsed();
    let (observation, error) = match outcome {
        Err(_) => (
            Observation::ProbeFailed,
            Some(Error::ProbeTimeout {
                addr: admin,
                after: timeout,
            }),
        ),
        Ok(Err(e)) => (Observation::ProbeFailed, Some(e)),
        Ok(Ok(status)) if status.is_success() => (Observation::ProbeReady, None),
        Ok(Ok(StatusCode::SERVICE_UNAVAILABLE)) => (Observation::ProbeDraining, None),
        Ok(Ok(status)) => (
            Observation::ProbeFailed,
            Some(Error::ProbeStatus {
                addr: admin,
                status,
            }),
        ),
    };
    ProbeResult {
        rtt: (observation != Observation::ProbeFailed).then_some(rtt),
        observation,
        error,
    }
}

async fn readyz(admin: SocketAddr) -> Result<StatusCode, Error> {
    let failed = |reason: String| Error::Probe {
        addr: admin,
        reason,
    };
    let tcp = TcpStream::connect(admin)
        .await
        .map_err(|e| failed(format!("connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| failed(format!("handshake: {e}")))?;
    // The connection task ends with the response (Connection: close) or when aborted below,
    // so a probe never leaves anything behind, even when its timeout drops this future.
    let conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = Request::get("/readyz")
        .header(header::HOST, admin.to_string())
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, "outpost-selector")
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| failed(format!("request: {e}")))?;
    drop(conn);
    Ok(resp.status())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Probes one node every `probe_interval` until `stop` changes or its sender is dropped.
pub(crate) async fn run_probes(
    node: Arc<Node>,
    cfg: HealthConfig,
    mut stop: watch::Receiver<bool>,
) {
    let span = debug_span!("probe", node = %node.spec.name, admin = %node.spec.admin);
    async move {
        let mut tick = tokio::time::interval(cfg.probe_interval);
        // A slow probe delays the next one instead of firing a burst to catch up.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let result = tokio::select! {
                r = probe(node.spec.admin, cfg.probe_timeout) => r,
                _ = stop.changed() => return,
            };
            debug!(
                observation = ?result.observation,
                rtt_ms = result.rtt.map(|d| d.as_secs_f64() * 1e3),
                error = result.error.as_ref().map(tracing::field::display),
                "probe"
            );
            node.record_probe(result);
        }
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation::*;

    #[test]
    fn starts_up_and_falls_after_fall_failures() {
        let mut h = Health::new(2, 2);
        assert_eq!(h.state(), HealthState::Up);
        assert_eq!(h.observe(ProbeFailed), None);
        assert_eq!(h.observe(ProbeReady), None, "a success resets the streak");
        assert_eq!(h.observe(ProbeFailed), None);
        assert_eq!(h.observe(ProbeFailed), Some(HealthState::Up));
        assert_eq!(h.state(), HealthState::Down);
    }

    #[test]
    fn rises_after_rise_consecutive_successes() {
        let mut h = Health::new(2, 1);
        h.observe(ProbeFailed);
        assert_eq!(h.state(), HealthState::Down);
        assert_eq!(h.observe(ProbeReady), None);
        assert_eq!(h.observe(ProbeFailed), None);
        assert_eq!(h.observe(ProbeReady), None);
        assert_eq!(h.observe(ProbeReady), Some(HealthState::Down));
        assert_eq!(h.state(), HealthState::Up);
    }

    #[test]
    fn draining_is_immediate_and_needs_rise_to_return() {
        let mut h = Health::new(2, 3);
        assert_eq!(h.observe(ProbeDraining), Some(HealthState::Up));
        assert_eq!(h.state(), HealthState::Draining);
        assert_eq!(h.observe(ProbeReady), None);
        assert_eq!(h.observe(ProbeReady), Some(HealthState::Draining));
        // A draining node that stops answering is down.
        h.observe(ProbeDraining);
        assert_eq!(h.observe(ProbeFailed), Some(HealthState::Draining));
        assert_eq!(h.state(), HealthState::Down);
    }

    #[test]
    fn a_failed_connect_takes_a_node_down_at_once() {
        let mut h = Health::new(2, 3);
        assert_eq!(h.observe(ConnectFailed), Some(HealthState::Up));
        assert_eq!(h.observe(ConnectFailed), None);
        h.observe(ProbeReady);
        assert_eq!(h.observe(ProbeReady), Some(HealthState::Down));
    }

    #[test]
    fn zero_thresholds_mean_one() {
        let mut h = Health::new(0, 0);
        h.observe(ProbeFailed);
        assert_eq!(h.state(), HealthState::Down);
        h.observe(ProbeReady);
        assert_eq!(h.state(), HealthState::Up);
    }

    #[tokio::test]
    async fn probe_of_a_closed_port_fails_without_rtt() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let r = probe(addr, Duration::from_secs(2)).await;
        assert_eq!(r.observation, ProbeFailed);
        assert!(r.rtt.is_none());
        assert!(r.error.is_some());
    }

    #[tokio::test]
    async fn probe_reads_the_status() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (status, want) in [
            ("200 OK", ProbeReady),
            ("503 Service Unavailable", ProbeDraining),
            ("500 Internal Server Error", ProbeFailed),
        ] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                s.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                head
            });
            let r = probe(addr, Duration::from_secs(5)).await;
            assert_eq!(r.observation, want, "{status}");
            assert_eq!(r.rtt.is_some(), want != ProbeFailed);
            let head = server.await.unwrap();
            assert!(head.starts_with("GET /readyz HTTP/1.1\r\n"), "{head}");
        }
    }

    #[tokio::test]
    async fn probe_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // Accepts (the kernel does) but never answers.
        let r = probe(addr, Duration::from_millis(100)).await;
        assert_eq!(r.observation, ProbeFailed);
        assert!(matches!(r.error, Some(Error::ProbeTimeout { .. })));
        drop(l);
    }
}
