//! Several origins for one site (`origin`, then `fallback_origins` in order): a request goes to
//! the first usable origin; a connect error, a timeout, an open breaker, or an answer in
//! `[origin_health] failover_statuses` (502, 503, 504 by default) sends an idempotent request
//! on to the next one. Nothing has reached the client then: the engine sees only the answer it
//! keeps. A request with a body goes to the first usable origin only.
//!
//! With `origin_weights`, requests are spread over the usable origins in those proportions
//! (smooth weighted round-robin); each still fails over to the others in order.
//!
//! Health ([`OriginMember`]): `fall` failures in a row (requests, or active probes of
//! `GET <path>` every `interval`) take an origin out; `rise` good probes bring it back.
//! Without a probe path, an origin taken out is tried again after `interval`. With every
//! origin out, the first is tried anyway.

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response};

use super::http_client::{HyperUpstream, UpstreamConfig};
use crate::cache::upstream::{Upstream, UpstreamBody, UpstreamError};
use crate::config::OriginFailover;
use crate::observe::upstreams::OriginMember;

struct Member {
    state: Arc<OriginMember>,
    client: HyperUpstream,
}

pub struct OriginGroup {
    members: Vec<Member>,
    failover: OriginFailover,
    /// With `origin_weights`: one round of origin indices, each as often as its weight,
    /// interleaved (smooth weighted round-robin), and the requests taken so far.
    schedule: Vec<usize>,
    turn: std::sync::atomic::AtomicUsize,
}

/// One round of smooth weighted round-robin: `[3, 1]` gives `[0, 0, 1, 0]`.
fn schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, &w) in current.iter_mut().zip(weights) {
                *c += i64::from(w);
            }
            let best = (0..weights.len())
                .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
                .expect("at least one origin");
            current[best] -= total;
            best
        })
        .collect()
}

impl OriginGroup {
    /// The group of `origin` (its URL is the primary) and the fallbacks, with active probes
    /// when a path is set.
    pub fn start(origin: &UpstreamConfig, failover: OriginFailover) -> Arc<Self> {
        let urls = std::iter::once(origin.origin.clone()).chain(failover.fallbacks.clone());
        let members: Vec<Member> = urls
            .enumerate()
            .map(|(rank, url)| {
                let state = Arc::new(OriginMember::new(url.to_string(), rank));
                if let Some(m) = &origin.metrics {
                    m.upstreams
                        .origins
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(state.clone());
                }
                Member {
                    state,
                    client: HyperUpstream::new(&UpstreamConfig {
                        origin: url,
                        ..origin.clone()
                    }),
                }
            })
            .collect();
        let this = Arc::new(Self {
            members,
            schedule: schedule(&failover.weights),
            failover,
            turn: Default::default(),
        });
        if let Some(path) = this.failover.probe_path.clone() {
            let weak = Arc::downgrade(&this);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(
                    weak.upgrade()
                        .map_or(std::time::Duration::from_secs(2), |t| t.failover.interval),
                );
                loop {
                    tick.tick().await;
                    let Some(this) = weak.upgrade() else { break };
                    for m in &this.members {
                        let ok = m.client.probe(&path, this.failover.interval).await;
                        if ok {
                            m.state.passed(this.failover.rise);
                        } else {
                            m.state.failed(this.failover.fall, None);
                        }
                    }
                }
            });
        }
        this
    }

    /// Without active probes, a downed origin is tried again after the interval.
    fn retry_after(&self) -> Option<std::time::Duration> {
        self.failover
            .probe_path
            .is_none()
            .then_some(self.failover.interval)
    }

    /// Usable origins in order (with weights, this request's origin first); the first one
    /// when none is.
    fn order(&self) -> Vec<usize> {
        let mut usable: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].state.usable())
            .collect();
        if !self.schedule.is_empty() {
            let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let pick = self.schedule[turn % self.schedule.len()];
            if let Some(p) = usable.iter().position(|&i| i == pick) {
                let chosen = usable.remove(p);
                usable.insert(0, chosen);
            }
        }
        if usable.is_empty() { vec![0] } else { usable }
    }
}

impl Upstream for OriginGroup {
    fn fetch(
        &self,
        req: Request<UpstreamBody>,
    ) -> BoxFuture<'static, Result<Response<UpstreamBody>, UpstreamError>> {
        let order = self.order();
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return self.members[order[0]].client.fetch(req);
        }
        let (parts, _empty) = req.into_parts();
        let attempts: Vec<(Arc<OriginMember>, BoxFuture<'static, _>)> = order
            .iter()
            .map(|&i| {
                let m = &self.members[i];
                (
                    m.state.clone(),
                    m.client.fetch(super::shield::rebuild(&parts)),
                )
            })
            .collect();
        let (statuses, rise, fall, retry) = (
            self.failover.statuses.clone(),
            self.failover.rise,
            self.failover.fall,
            self.retry_after(),
        );
        async move {
            let last = attempts.len() - 1;
            let mut result = Err(UpstreamError::Unavailable);
            for (n, (state, fut)) in attempts.into_iter().enumerate() {
                result = fut.await;
                let failed = match &result {
                    Ok(r) => statuses.contains(&r.status().as_u16()),
                    Err(
                        UpstreamError::Connect(_)
                        | UpstreamError::Timeout(_)
                        | UpstreamError::Unavailable,
                    ) => true,
                    Err(_) => false,
                };
                if !failed {
                    state.passed(rise);
                    return result;
                }
                state.failed(fall, retry);
                if n == last {
                    break;
                }
            }
            result
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn weights_interleave() {
        assert_eq!(super::schedule(&[3, 1]), [0, 0, 1, 0]);
        assert_eq!(super::schedule(&[1, 1]), [0, 1]);
        let s = super::schedule(&[5, 2, 1]);
        assert_eq!(s.len(), 8);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(s.iter().filter(|&&i| i == 2).count(), 1);
        assert!(super::schedule(&[]).is_empty());
    }
}
