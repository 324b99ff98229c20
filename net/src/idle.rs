//! A connection's activity and the ticker that tells when it has been idle for a timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// Slots of the ring of waits by send tick (see [`Activity::next_send_tick`]): the four ticks
/// of a send timeout, the one it expires in, and the current one.
const WAIT_SLOTS: usize = 6;

/// One connection's activity, for its idle and send timeouts: a count that moves with progress
/// (each request started, and whatever else a role counts, see [`Activity::touch`]), the
/// requests in flight and response bodies open, and what waits on the client to take bytes,
/// by the send tick each wait began in. Written by the connection's own requests; relaxed
/// atomics on lines no other connection touches.
#[derive(Debug, Default)]
pub struct Activity {
    /// Moves with every request started and every [`Activity::touch`].
    progress: AtomicU64,
    /// Requests whose response is not ready yet, and response bodies not dropped yet
    /// ([`crate::Sending`]).
    in_flight: AtomicU32,
    /// What waits on the client to take bytes, by the send tick it began in (a ring indexed by
    /// tick): response bodies with a chunk handed out and not asked for the next
    /// ([`crate::Sending`]), and a write the socket did not take ([`crate::Metered`]).
    waits: [AtomicU32; WAIT_SLOTS],
    /// The send clock's current tick, modulo the ring's size ([`Activity::next_send_tick`]);
    /// only the connection's watchdog moves it.
    tick: AtomicU32,
}

impl Activity {
    /// A request answered at once (a fresh memory hit): progress, never in flight.
    #[inline]
    pub fn answered(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// A request still being answered: progress, and in flight while the guard lives.
    #[inline]
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.progress.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Progress that is not a request starting (a response body chunk the client took, say).
    #[inline]
    pub fn touch(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// A response body opened: busy until [`Activity::closed`].
    #[inline]
    pub(crate) fn opened(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A response body ended or was dropped: progress.
    #[inline]
    pub(crate) fn closed(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Something now waits on the client to take bytes; the returned slot is for
    /// [`Activity::took`].
    #[inline]
    pub(crate) fn wait(&self) -> u8 {
        let slot = self.tick.load(Ordering::Relaxed) as usize % WAIT_SLOTS;
        self.waits[slot].fetch_add(1, Ordering::Relaxed);
        slot as u8
    }

    /// The client took bytes something waited on since `slot`'s tick: progress, and that wait
    /// is over.
    #[inline]
    pub(crate) fn took(&self, slot: u8) {
        self.progress.fetch_add(1, Ordering::Relaxed);
        self.waits[usize::from(slot)].fetch_sub(1, Ordering::Relaxed);
    }

    /// Waits on the client now, however old.
    pub(crate) fn waiting(&self) -> u32 {
        self.waits.iter().map(|w| w.load(Ordering::Relaxed)).sum()
    }

    /// Starts the send clock's next tick (a quarter of the send timeout after the last). True
    /// when something has waited on the client since five ticks ago, that is for between one
    /// and one and a quarter send timeouts: the client took nothing of it, whatever else moved
    /// on the connection (other HTTP/2 streams, new requests, PINGs).
    pub(crate) fn next_send_tick(&self) -> bool {
        let now = (self.tick.load(Ordering::Relaxed) as usize + 1) % WAIT_SLOTS;
        self.tick.store(now as u32, Ordering::Relaxed);
        // The slot of the tick five before this one, which the next tick reuses.
        self.waits[(now + 1) % WAIT_SLOTS].load(Ordering::Relaxed) > 0
    }

    /// The progress count so far, and whether the connection is busy (a request in flight, a
    /// response body open, or bytes waiting on the client): what the idle [`Quiet`] samples.
    #[inline]
    pub fn snapshot(&self) -> (u64, bool) {
        (
            self.progress.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed) > 0 || self.waiting() > 0,
        )
    }
}

/// A request in flight on its connection ([`Activity::begin`]).
pub struct InFlight(Arc<Activity>);

impl InFlight {
    /// The connection's activity.
    pub fn activity(&self) -> &Activity {
        &self.0
    }
}

impl Drop for InFlight {
    #[inline]
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ticks per timeout.
const TICKS: u32 = 4;

/// Tells when something has made no progress for a timeout, to within a quarter of it, with no
/// clock read per request. It ticks four times per timeout and samples a progress count
/// and a busy flag at each tick (an [`Activity::snapshot`], or a count of bytes moved that is
/// never busy); a tick is quiet when nothing is busy and the count is the one the last tick
/// saw. It expires at the fourth quiet tick in a row, a timeout after the last tick that saw
/// progress or something busy: between 1 and 1.25 timeouts after the last progress, and
/// between 0.75 and 1 after the end of the last request in flight (1 to 1.25 where the end of
/// a request counts as progress, as it does for the origin).
pub struct Quiet {
    step: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The count at the last tick.
    seen: u64,
    /// Quiet ticks in a row.
    still: u32,
}

impl Quiet {
    pub fn new(timeout: Duration) -> Self {
        let step = (timeout / TICKS).max(Duration::from_millis(1));
        Self {
            step,
            sleep: Box::pin(tokio::time::sleep(step)),
            seen: 0,
            still: 0,
        }
    }

    /// Polls the ticker, sampling `sample` (the count, and whether busy) at each tick that is
    /// due; ready once it has expired. For a connection future's own `poll`.
    #[inline]
    pub fn poll_expired(
        &mut self,
        cx: &mut Context<'_>,
        mut sample: impl FnMut() -> (u64, bool),
    ) -> Poll<()> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            if self.still_after(sample()) {
                return Poll::Ready(());
            }
            let next = tokio::time::Instant::now() + self.step;
            self.sleep.as_mut().reset(next);
        }
        Poll::Pending
    }

    /// Resolves once it has expired ([`Quiet::poll_expired`]). Dropping the future loses
    /// nothing: the ticks so far are kept here.
    pub async fn expired(&mut self, mut sample: impl FnMut() -> (u64, bool)) {
        std::future::poll_fn(|cx| self.poll_expired(cx, &mut sample)).await;
    }

    /// One tick's sample; true once a whole timeout's worth of ticks in a row were quiet.
    fn still_after(&mut self, (count, busy): (u64, bool)) -> bool {
        if busy || count != self.seen {
            self.still = 0;
        } else {
            self.still += 1;
            if self.still >= TICKS {
                return true;
            }
        }
        self.seen = count;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn quiet_expires_after_four_still_ticks() {
        let mut q = Quiet::new(Duration::from_secs(1));
        assert!(!q.still_after((0, false)));
        assert!(!q.still_after((0, true))); // busy
        assert!(!q.still_after((0, false)));
        assert!(!q.still_after((0, false)));
        assert!(!q.still_after((0, false)));
        assert!(!q.still_after((7, false))); // progress
        for _ in 0..3 {
            assert!(!q.still_after((7, false)));
        }
        assert!(q.still_after((7, false)));
    }

    #[test]
    fn activity_counts_progress_and_requests_in_flight() {
        let a = Arc::new(Activity::default());
        a.answered();
        assert_eq!(a.snapshot(), (1, false));
        let first = a.begin();
        let second = a.begin();
        assert_eq!(a.snapshot(), (3, true));
        drop(first);
        assert_eq!(a.snapshot(), (3, true));
        second.activity().touch();
        drop(second);
        assert_eq!(a.snapshot(), (4, false));
    }

    #[test]
    fn a_wait_is_stalled_five_send_ticks_after_it_began_whatever_else_moves() {
        let a = Activity::default();
        let old = a.wait();
        let mut fresh = a.wait();
        for tick in 1..=4 {
            assert!(!a.next_send_tick(), "tick {tick}");
            // Another stream keeps taking chunks: progress, new waits.
            a.took(fresh);
            fresh = a.wait();
            a.touch();
        }
        assert!(a.next_send_tick(), "the old wait is stalled");
        // Taken in time, it would not have been.
        let b = Activity::default();
        let w = b.wait();
        for _ in 1..=4 {
            assert!(!b.next_send_tick());
        }
        b.took(w);
        for _ in 0..12 {
            assert!(!b.next_send_tick());
        }
        assert_eq!(b.waiting(), 0);
        let _ = old;
    }

    #[tokio::test]
    async fn quiet_expires_a_timeout_after_the_last_busy_tick() {
        let a = Arc::new(Activity::default());
        let mut q = Quiet::new(Duration::from_millis(200));
        let in_flight = a.begin();
        // Busy at every tick: not idle, however long.
        let busy = tokio::time::timeout(Duration::from_millis(300), q.expired(|| a.snapshot()));
        assert!(busy.await.is_err());
        drop(in_flight);
        let ended = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), q.expired(|| a.snapshot()))
            .await
            .expect("idle in time");
        // Four quiet ticks, the first of them possibly due as the request ended.
        let took = ended.elapsed();
        assert!(took >= Duration::from_millis(150), "{took:?}");
    }
}
