//! What bounds a client connection, in time and in count; the pieces every role shares (first
//! bytes, activity, the idle ticker, accept warnings) are in `outpost-net`.
//!
//! - **Opening**: [`outpost_net::opening`] reads a new connection's first bytes within the
//!   header read timeout and decides HTTP/1 or HTTP/2 itself. hyper-util's protocol detection
//!   has no timeout of its own, and hyper's HTTP/1 header timer only starts once HTTP/1 is
//!   chosen, so a client that connects and sends nothing, or a prefix of the HTTP/2 preface
//!   (`PRI * HTTP/2.0\r\n`) and then stalls, would otherwise keep its task and descriptor for
//!   good. The bytes read are put back in front of the stream ([`outpost_net::Replay`]).
//! - **Idle and send**: an [`Activity`] tracks a connection's requests ([`Handling`]) and what
//!   its responses wait on the client for ([`outpost_net::Sending`] around each body,
//!   [`outpost_net::Metered`] around the stream). [`outpost_net::serve_http`] shuts a
//!   connection down once it has made no progress for `idle_timeout` (no request handled,
//!   started or ended, nothing waiting on the client), which covers idle HTTP/2 clients that
//!   answer PINGs; and it drops one whose client took no byte of a response for as long while
//!   bytes waited on it. An HTTP/1 keep-alive connection is also bounded by the header read
//!   timeout.
//! - **Count**: the accept loop takes one of `max_connections` slots before it accepts, so past
//!   the cap new clients wait in the kernel's listen backlog.
//! - **Accept failures** (EMFILE at the descriptor limit and friends) are logged by
//!   [`outpost_net::AcceptWarnings`] at most once per 10 s, with the count of the ones folded in.

use std::sync::Arc;

use outpost_net::{Activity, InFlight};

/// A request being handled (its response head not ready yet): in flight on its connection's
/// [`Activity`] while it lives, and progress when it ends, so a connection is idle only a
/// whole timeout after its last request was answered.
pub struct Handling(InFlight);

impl Handling {
    pub fn begin(activity: &Arc<Activity>) -> Self {
        Self(activity.begin())
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.activity().touch();
    }
}
