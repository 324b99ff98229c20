//! What bounds a client connection, in time and in count; the pieces every role shares (first
//! bytes, activity, the idle ticker, accept warnings) are in `outpost-net`.
//!
//! - **Opening**: [`outpost_net::opening`] reads a new connection's first bytes within the
//!   header read timeout and decides HTTP/1 or HTTP/2 itself. hyper-util's protocol detection
//!   has no timeout of its own, and hyper's HTTP/1 header timer only starts once HTTP/1 is
//!   chosen, so a client that connects and sends nothing, or a prefix of the HTTP/2 preface
//!   (`PRI * HTTP/2.0\r\n`) and then stalls, would otherwise keep its task and descriptor for
//!   good. The bytes read are put back in front of the stream ([`outpost_net::Replay`]).
//! - **Idle**: an [`Activity`] tracks a connection's requests ([`Handling`]) and the chunks its
//!   response bodies yield ([`ProgressBody`]). [`serve_http`] shuts a connection down once it
//!   has made no progress for `idle_timeout`: no request handled, started or ended, no body
//!   chunk taken by the client. That covers idle HTTP/2 clients that answer PINGs and clients
//!   that stopped reading a response; an HTTP/1 keep-alive connection is also bounded by the
//!   header read timeout.
//! - **Count**: the accept loop takes one of `max_connections` slots before it accepts, so past
//!   the cap new clients wait in the kernel's listen backlog.
//! - **Accept failures** (EMFILE at the descriptor limit and friends) are logged by
//!   [`outpost_net::AcceptWarnings`] at most once per 10 s, with the count of the ones folded in.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use outpost_net::{Activity, InFlight, Quiet};

/// After an idle connection is told to shut down, how long it may take to do so (at most).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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

/// A response body that counts as progress on its connection each chunk it yields, and once
/// more when it ends or is dropped. A download the client keeps reading is not idle; one the
/// client stopped reading (hyper cannot write, so asks for no more chunks) is, and its
/// connection is closed after the idle timeout.
pub struct ProgressBody<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> ProgressBody<B> {
    pub fn new(body: B, activity: Arc<Activity>) -> Self {
        Self { body, activity }
    }
}

impl<B> Drop for ProgressBody<B> {
    fn drop(&mut self) {
        self.activity.touch();
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for ProgressBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_ready() {
            this.activity.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Drives an HTTP connection to its end. It is shut down gracefully when `stop` resolves, or
/// once its [`Activity`] has made no progress for `idle`; an idle connection that does not
/// finish its shutdown within a short grace (`idle`, at most 5 s: an HTTP/2 peer that never
/// acknowledges it, a response the client stopped reading) is dropped.
pub async fn serve_http<C: GracefulConnection>(
    conn: C,
    activity: &Activity,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> Result<(), C::Error> {
    tokio::pin!(conn);
    tokio::pin!(stop);
    let mut quiet = Quiet::new(idle);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            () = &mut stop, if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = quiet.expired(|| activity.snapshot()), if !stopping => {
                conn.as_mut().graceful_shutdown();
                return tokio::time::timeout(idle.min(SHUTDOWN_GRACE), conn)
                    .await
                    .unwrap_or(Ok(()));
            }
        }
    }
}
