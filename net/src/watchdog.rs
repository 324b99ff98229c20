//! The clocks that bound a served HTTP connection once it is open: idle, send, and the grace
//! of a shutdown; and [`serve_http`], which drives a connection under them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;

use crate::{Activity, Quiet};

/// After a connection is told to shut down for being idle, how long it may take to end (at
/// most; never longer than its idle timeout).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A connection's timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// No progress and nothing busy for this long: the connection is shut down gracefully.
    pub idle: Duration,
    /// Something (a response's chunk, a write) waiting on the client for this long: the
    /// connection is dropped (see [`crate::Sending`]).
    pub send: Duration,
}

/// What a [`Watchdog`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Idle: shut the connection down gracefully (it has [`SHUTDOWN_GRACE`] to end).
    Idle,
    /// Drop the connection now: something (a response's chunk, a write) has waited on the
    /// client for the send timeout. Over HTTP/2 that drops the connection's other streams too:
    /// hyper does not ask a stream's body for more while its window is shut, so a stalled
    /// stream cannot be told from a stream with nothing to send, and cannot be reset alone.
    Stalled,
    /// Drop the connection now: it did not end within the grace of an idle shutdown.
    Lingered,
}

impl Verdict {
    /// Whether the connection goes now (else it is shut down gracefully).
    pub fn drops(self) -> bool {
        self != Verdict::Idle
    }
}

/// Connections closed by their [`Watchdog`]s, by verdict: for a role's metrics.
#[derive(Debug, Default)]
pub struct Closes([AtomicU64; 3]);

impl Closes {
    /// The verdicts' labels, in the order of [`Closes::counts`].
    pub const LABELS: [&'static str; 3] = ["idle", "send_timeout", "shutdown_grace"];

    fn count(&self, v: Verdict) {
        self.0[v as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// A connection's idle clock (a [`Quiet`] over its [`Activity`]), its send clock (a ticker, a
/// quarter of the send timeout, that ages what waits on the client: see
/// [`Activity::next_send_tick`]), and the grace of an idle shutdown. Polled from the
/// connection's own task, so it reads no clock per request.
pub struct Watchdog {
    idle: Quiet,
    send_step: Duration,
    send_tick: Pin<Box<tokio::time::Sleep>>,
    grace: Duration,
    /// Set at an idle shutdown: the connection must have ended by then.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    closes: Option<Arc<Closes>>,
}

impl Watchdog {
    pub fn new(t: Timeouts) -> Self {
        let send_step = (t.send / 4).max(Duration::from_millis(1));
        Self {
            idle: Quiet::new(t.idle),
            send_step,
            send_tick: Box::pin(tokio::time::sleep(send_step)),
            grace: t.idle.min(SHUTDOWN_GRACE),
            deadline: None,
            closes: None,
        }
    }

    /// Counts each verdict in `closes`.
    pub fn counted(mut self, closes: Arc<Closes>) -> Self {
        self.closes = Some(closes);
        self
    }

    /// Ready with [`Verdict::Idle`] once, when the connection turns idle, and with a verdict
    /// that [drops](Verdict::drops) it when it must go now. The send clock runs whatever else
    /// happens (a drain's graceful shutdown waits for responses, and a stalled one would never
    /// end).
    pub fn poll(&mut self, cx: &mut Context<'_>, activity: &Activity) -> Poll<Verdict> {
        let verdict = self.decide(cx, activity);
        if let (Poll::Ready(v), Some(closes)) = (verdict, &self.closes) {
            closes.count(v);
        }
        verdict
    }

    fn decide(&mut self, cx: &mut Context<'_>, activity: &Activity) -> Poll<Verdict> {
        while self.send_tick.as_mut().poll(cx).is_ready() {
            if activity.next_send_tick() {
                return Poll::Ready(Verdict::Stalled);
            }
            let next = tokio::time::Instant::now() + self.send_step;
            self.send_tick.as_mut().reset(next);
        }
        if self.deadline.is_none() {
            if self
                .idle
                .poll_expired(cx, || activity.snapshot())
                .is_pending()
            {
                return Poll::Pending;
            }
            let mut deadline = Box::pin(tokio::time::sleep(self.grace));
            // Registers this task with the new timer.
            let _ = deadline.as_mut().poll(cx);
            self.deadline = Some(deadline);
            return Poll::Ready(Verdict::Idle);
        }
        match self.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Verdict::Lingered),
            _ => Poll::Pending,
        }
    }
}

/// Drives an HTTP connection to its end under its [`Watchdog`]: shut down gracefully when
/// `stop` resolves or when it turns idle, dropped when the client stalls a response for the
/// send timeout or an idle shutdown outlasts its grace.
pub async fn serve_http<C: GracefulConnection>(
    conn: C,
    activity: &Activity,
    timeouts: Timeouts,
    stop: impl Future<Output = ()>,
) -> Result<(), C::Error> {
    tokio::pin!(conn);
    tokio::pin!(stop);
    let mut dog = Watchdog::new(timeouts);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            () = &mut stop, if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            v = std::future::poll_fn(|cx| dog.poll(cx, activity)) => {
                if v.drops() {
                    return Ok(());
                }
                if !stopping {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
