//! Coalescing: one upstream fetch per key, shared by every request that arrives while it runs.
//!
//! A [`Fill`] is owned by a spawned task, not by any client, so a client that disconnects does
//! not abort a fill others wait on. The task publishes a [`FillResult`] once upstream answers,
//! then appends body chunks; each reader follows with its own cursor and receives bytes as they
//! arrive, not when the fill ends. Chunks are shared `Bytes` (no copy per reader).
//!
//! Memory: a fill that will enter the memory tier keeps every chunk (they become the cached
//! body; the engine's budget bounds them). Any other fill drops chunks once every current reader
//! has passed them, and reads upstream no further than [`FILL_WINDOW`] bytes ahead of its
//! slowest reader ([`Fill::wait_for_room`]): a client that reads slowly, or not at all, cannot
//! make the fill hold a large body in memory. A reader that takes nothing for the send timeout
//! while the fill waits for it is dropped (its response is cut), as nginx's `send_timeout`
//! closes such a client, so it cannot hold the fill (and its upstream connection) either. A
//! request arriving after chunks were dropped cannot join; it fetches on its own.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::Stream;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use tokio::sync::watch;

use dashmap::DashMap;

use super::key::{KeyHash, KeyHasher};
use super::meta::CachedMeta;
use super::status::PassReason;
use super::upstream::UpstreamError;

/// How far a fill that is not kept for the memory tier reads ahead of its slowest reader.
pub const FILL_WINDOW: usize = 2 << 20;

/// Bytes that fills hold beyond what the tiers count, bounded for the whole engine: the body a
/// fill keeps for the memory tier while it arrives (and the copy made at its end), and the
/// chunks queued for the disk writer. Without a bound, every concurrent fill of a large object
/// adds its whole body to the process's memory, outside `--memory`.
#[derive(Debug)]
pub struct Budget {
    used: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            used: std::sync::atomic::AtomicU64::new(0),
            limit,
        })
    }

    /// Takes `n` bytes of the budget, or `None` when they do not fit now.
    pub fn take(self: &Arc<Self>, n: u64) -> Option<Charge> {
        self.reserve(n).then(|| Charge {
            budget: self.clone(),
            n,
        })
    }

    /// Adds `n` to what is used if it fits.
    fn reserve(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// The most that may be taken at once.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes taken now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    n: u64,
}

impl Charge {
    /// Takes `n` more bytes into this charge; false, and nothing taken, when they do not fit
    /// now.
    pub fn grow(&mut self, n: u64) -> bool {
        let grown = self.budget.reserve(n);
        if grown {
            self.n += n;
        }
        grown
    }

    /// Gives back all but `n` bytes of this charge (nothing when it holds `n` or fewer).
    pub fn shrink_to(&mut self, n: u64) {
        if n < self.n {
            self.budget
                .used
                .fetch_sub(self.n - n, std::sync::atomic::Ordering::AcqRel);
            self.n = n;
        }
    }

    /// `data` as a body (its spare capacity freed) that holds as much of this charge as its
    /// size until the last of it is dropped; the rest of the charge is given back now.
    pub fn into_bytes(mut self, mut data: Vec<u8>) -> Bytes {
        data.shrink_to_fit();
        self.shrink_to(data.capacity() as u64);
        Bytes::from_owner(Charged {
            data,
            _charge: self,
        })
    }
}

/// Bytes that hold their [`Charge`] ([`Charge::into_bytes`]).
struct Charged {
    data: Vec<u8>,
    _charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(self.n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The head of a response streaming through a fill.
#[derive(Debug)]
pub struct FillHead {
    pub status: StatusCode,
    /// Headers for every reader (hop-by-hop and, when stored, Set-Cookie removed).
    pub headers: HeaderMap,
    /// Set-Cookie values of a stored response: only the request that caused the fill gets them.
    pub set_cookie: Vec<HeaderValue>,
    /// Present when the response is being stored.
    pub meta: Option<Arc<CachedMeta>>,
    /// Why it is not stored, when it is not (Cache-Status `detail`, metrics).
    pub pass_reason: Option<PassReason>,
    pub content_length: Option<u64>,
    /// May requests other than the leader use this response?
    pub shareable: bool,
    /// Header names the response varies on.
    pub vary: Vec<HeaderName>,
    /// The key the response is stored under (primary, or the leader's variant).
    pub store_key: KeyHash,
}

/// What a fill produced.
#[derive(Debug, Clone)]
pub enum FillResult {
    /// A response is streaming through the fill.
    Streaming(Arc<FillHead>),
    /// Upstream answered 304: the stored object is valid again, with this metadata.
    Revalidated(Arc<CachedMeta>),
    /// Upstream could not be reached or failed before sending a response head.
    Failed(UpstreamError),
}

#[derive(Default)]
struct State {
    result: Option<FillResult>,
    chunks: VecDeque<Bytes>,
    /// Index (in the whole body) of `chunks[0]`.
    base: usize,
    cursors: HashMap<u64, usize>,
    next_reader: u64,
    done: Option<Result<(), String>>,
    keep_all: bool,
    trimmed: bool,
    /// The fill has finished storing (or gave up): a lookup now sees its result.
    settled: bool,
    /// Chunks at the end of `chunks` that readers may not take yet ([`Fill::push_held`]).
    held: usize,
    /// Bytes in `chunks`.
    buffered: usize,
    /// Bytes of the chunks already dropped from the front (`base` counts chunks).
    dropped_bytes: usize,
    /// Readers dropped for taking nothing while the fill waited on them.
    dropped: std::collections::HashSet<u64>,
}

/// The fills in flight, at most one per key, and the budgets their bodies draw on: the
/// engine's coalescing state. A fill enters when a request starts it and leaves when its task
/// ends ([`Fills::ended`]), when a request replaces it (a fill from before a purge, or a
/// finished one a request may not reuse), or when its key is invalidated ([`Fills::cancel`]).
pub struct Fills {
    map: DashMap<KeyHash, Arc<Fill>, KeyHasher>,
    /// Fill bodies kept for the memory tier ([`crate::MemoryShares::memory_fills`]).
    pub memory: Arc<Budget>,
    /// Chunks queued for disk writers ([`crate::MemoryShares::disk_queue`]).
    pub disk_queue: Arc<Budget>,
}

/// A request's place in a fill, as [`Fills::join_or_start`] found it.
pub enum Place {
    /// It joined a running (or just finished) fill.
    Joined(Arc<Fill>, Option<FillReader>),
    /// It started a new fill: its task is the caller's to spawn.
    Started(Arc<Fill>, Option<FillReader>),
}

impl Fills {
    pub fn new(memory: u64, disk_queue: u64) -> Self {
        Self {
            map: DashMap::with_hasher(KeyHasher::default()),
            memory: Budget::new(memory),
            disk_queue: Budget::new(disk_queue),
        }
    }

    /// Joins the fill of `key` when `joinable` accepts it; otherwise replaces it (or fills the
    /// gap) with a new fill started at purge sequence `purge_seq`. The reader is taken under
    /// the map's shard lock, before the fill can move on.
    pub fn join_or_start(
        &self,
        key: KeyHash,
        purge_seq: u64,
        joinable: impl Fn(&Fill) -> bool,
    ) -> Place {
        use dashmap::mapref::entry::Entry;
        let vacant = loop {
            match self.map.entry(key) {
                Entry::Occupied(e) => {
                    let fill = e.get();
                    if joinable(fill) {
                        let fill = fill.clone();
                        let reader = fill.reader();
                        return Place::Joined(fill, reader);
                    }
                    // Replace it: removed under the shard lock, then look again (another
                    // request may have started a current fill meanwhile; that one is joinable).
                    e.remove();
                }
                Entry::Vacant(v) => break v,
            }
        };
        let fill = Fill::started_at(key, purge_seq);
        let reader = fill.reader();
        vacant.insert(fill.clone());
        Place::Started(fill, reader)
    }

    /// Whether `fill` is still the fill of its key: a purge (or a request after one) replaces
    /// it, and then what it fetched must neither replace nor remove the copy the newer fill
    /// stores.
    pub fn is_current(&self, fill: &Arc<Fill>) -> bool {
        self.map
            .get(&fill.key)
            .is_some_and(|f| Arc::ptr_eq(f.value(), fill))
    }

    /// The task of `fill` ended: it leaves the map, unless a newer fill took its key.
    pub fn ended(&self, fill: &Arc<Fill>) {
        self.map.remove_if(&fill.key, |_, f| Arc::ptr_eq(f, fill));
    }

    /// Takes the fill of `key` out and cancels it: the key was invalidated, so what it
    /// stores is removed again (see `fill.rs`).
    pub fn cancel(&self, key: &KeyHash) {
        if let Some((_, fill)) = self.map.remove(key) {
            fill.cancel();
        }
    }

    /// The fill of `key`, if one is in the map.
    pub fn get(&self, key: &KeyHash) -> Option<Arc<Fill>> {
        self.map.get(key).map(|f| f.value().clone())
    }

    /// No fill is in the map.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Held by the task that runs a fill: when the task ends, however it ends (returned, panicked,
/// or dropped with its runtime), the fill is concluded, so no reader or waiter waits forever.
/// Waiters hold the fill themselves, so they cannot count on its channel closing.
pub struct Concluding(pub Arc<Fill>);

impl Drop for Concluding {
    fn drop(&mut self) {
        self.0.conclude();
    }
}

pub struct Fill {
    pub key: KeyHash,
    /// The purge sequence when the fill started: after any later purge, nobody joins it.
    pub purge_seq: u64,
    /// Set when the key was invalidated while the fill ran: what it stores is removed again.
    cancelled: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    version: watch::Sender<u64>,
    /// Woken when readers free chunks ([`Fill::wait_for_room`]).
    drained: tokio::sync::Notify,
    /// Time the upstream took to answer (nanoseconds; 0 until it did).
    upstream_nanos: std::sync::atomic::AtomicU64,
}

impl Fill {
    pub fn new(key: KeyHash) -> Arc<Self> {
        Self::started_at(key, 0)
    }

    /// A fill that started at purge sequence `purge_seq`.
    pub fn started_at(key: KeyHash, purge_seq: u64) -> Arc<Self> {
        Arc::new(Self {
            key,
            purge_seq,
            cancelled: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State {
                keep_all: true,
                ..State::default()
            }),
            version: watch::channel(0).0,
            drained: tokio::sync::Notify::new(),
            upstream_nanos: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Waits until the fill may read on: it keeps every chunk (the memory tier's budget bounds
    /// it), or its readers are less than `window` bytes behind. A reader that frees nothing for
    /// `stall` while the fill waits on it is dropped (its response fails; it no longer holds
    /// chunks). Returns how many readers were dropped.
    pub async fn wait_for_room(&self, window: usize, stall: std::time::Duration) -> usize {
        let mut dropped = 0;
        loop {
            let freed = self.drained.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let st = self.lock();
                if st.keep_all || st.buffered <= window {
                    return dropped;
                }
            }
            if tokio::time::timeout(stall, freed).await.is_err() {
                dropped += self.drop_slowest();
            }
        }
    }

    /// Drops the readers furthest behind (see [`Fill::wait_for_room`]).
    fn drop_slowest(&self) -> usize {
        let n = {
            let mut st = self.lock();
            let Some(min) = st.cursors.values().copied().min() else {
                return 0;
            };
            let slow: Vec<u64> = st
                .cursors
                .iter()
                .filter(|(_, c)| **c == min)
                .map(|(id, _)| *id)
                .collect();
            for id in &slow {
                st.cursors.remove(id);
                st.dropped.insert(*id);
            }
            trim(&mut st);
            slow.len()
        };
        self.bump();
        n
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // matters more than losing the fill, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Marks the fill as overtaken by an invalidation of its key.
    pub fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// True when the fill is storing its response (its head said so).
    pub fn stores(&self) -> bool {
        matches!(&self.lock().result, Some(FillResult::Streaming(h)) if h.meta.is_some())
    }

    /// Records how long upstream took to answer.
    pub fn set_upstream_time(&self, d: std::time::Duration) {
        self.upstream_nanos.store(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn upstream_time(&self) -> Option<std::time::Duration> {
        match self
            .upstream_nanos
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            n => Some(std::time::Duration::from_nanos(n)),
        }
    }

    pub fn publish(&self, result: FillResult) {
        self.lock().result = Some(result);
        self.bump();
    }

    /// Appends a body chunk.
    pub fn push(&self, chunk: Bytes) {
        {
            let mut st = self.lock();
            st.buffered += chunk.len();
            st.chunks.push_back(chunk);
            trim(&mut st);
        }
        self.bump();
    }

    /// Appends a chunk without waking readers yet: the last chunk of a body that is about to be
    /// stored is held until the stored copy is visible ([`Fill::release`]).
    /// Readers do not see it, even one that happens to be polling right now, until
    /// [`Fill::release`].
    pub fn push_held(&self, chunk: Bytes) {
        let mut st = self.lock();
        st.buffered += chunk.len();
        st.chunks.push_back(chunk);
        st.held += 1;
        trim(&mut st);
    }

    /// Shows readers the chunks appended with [`Fill::push_held`], and wakes them.
    pub fn release(&self) {
        self.lock().held = 0;
        self.bump();
    }

    pub fn finish(&self, outcome: Result<(), String>) {
        self.lock().done = Some(outcome);
        self.bump();
    }

    /// Whether chunks must be kept for the memory tier. Turning it off trims at once.
    pub fn set_keep_all(&self, keep: bool) {
        let mut st = self.lock();
        st.keep_all = keep;
        trim(&mut st);
    }

    /// Ends the fill for everyone still waiting on it: whatever it stored is now visible to
    /// lookups (it is settled), and a fill that never got an answer or a whole body says so.
    fn conclude(&self) {
        {
            let mut st = self.lock();
            if st.result.is_none() {
                st.result = Some(FillResult::Failed(UpstreamError::Protocol(
                    "the fill ended without an answer".into(),
                )));
            }
            if st.done.is_none() {
                st.done = Some(Err("the fill ended before the body did".into()));
            }
            st.held = 0;
            st.settled = true;
        }
        self.bump();
    }

    /// True once the body was received completely.
    pub fn completed(&self) -> bool {
        matches!(self.lock().done, Some(Ok(())))
    }

    /// Every byte of a body of `len` bytes has arrived: the fill completes as soon as its task
    /// runs again (the client that started it may already have the whole body).
    pub fn has_all_of(&self, len: u64) -> bool {
        let st = self.lock();
        (st.dropped_bytes + st.buffered) as u64 >= len
    }

    /// Waits until the task running the fill has ended ([`Concluding`]).
    pub async fn settled(&self) {
        let mut rx = self.version.subscribe();
        loop {
            rx.borrow_and_update();
            if self.lock().settled {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn reader_count(&self) -> usize {
        self.lock().cursors.len()
    }

    /// The whole body, if every chunk was kept: one copy, once per fill, into an allocation of
    /// exactly its length, even for a single chunk. Chunks from hyper are slices of its read
    /// buffers, which can be much larger than the slice (a 1 KiB body read with a 400 KiB
    /// buffer); the memory tier charges the body's length, so it must hold no more than that.
    ///
    /// The kept chunks are then replaced by slices of the copy, at the same offsets: readers
    /// still behind get the same bytes, and the fill no longer holds a second copy of the body
    /// (nor the read buffers the chunks came from).
    pub fn assembled(&self) -> Option<Bytes> {
        let mut st = self.lock();
        if st.trimmed || !st.keep_all {
            return None;
        }
        let out = super::buffer::compact(st.chunks.iter().map(|c| c.as_ref()));
        let mut at = 0;
        for c in st.chunks.iter_mut() {
            let end = at + c.len();
            *c = out.slice(at..end);
            at = end;
        }
        Some(out)
    }

    /// Waits for the fill's result.
    pub async fn result(&self) -> FillResult {
        let mut rx = self.version.subscribe();
        loop {
            rx.borrow_and_update();
            if let Some(r) = self.lock().result.clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return FillResult::Failed(UpstreamError::Protocol("fill abandoned".into()));
            }
        }
    }

    /// A reader from the first byte, or `None` if the start was already dropped.
    pub fn reader(self: &Arc<Self>) -> Option<FillReader> {
        let mut st = self.lock();
        if st.trimmed {
            return None;
        }
        let id = st.next_reader;
        st.next_reader += 1;
        let start = st.base;
        st.cursors.insert(id, start);
        Some(FillReader {
            fill: Arc::clone(self),
            id,
            cursor: start,
        })
    }
}

fn trim(st: &mut State) {
    if st.keep_all {
        return;
    }
    let min = st.cursors.values().copied().min().unwrap_or(usize::MAX);
    while st.base < min
        && let Some(c) = st.chunks.pop_front()
    {
        st.buffered -= c.len();
        st.dropped_bytes += c.len();
        st.base += 1;
        st.trimmed = true;
    }
}

/// One reader's position in a fill.
pub struct FillReader {
    fill: Arc<Fill>,
    id: u64,
    cursor: usize,
}

enum Next {
    Chunk(Bytes),
    End,
    Error(String),
    Wait,
}

impl FillReader {
    fn next_now(&mut self) -> Next {
        let mut st = self.fill.lock();
        if st.dropped.contains(&self.id) {
            return Next::Error("the client took nothing for the send timeout".into());
        }
        let idx = self.cursor - st.base.min(self.cursor);
        let visible = st.chunks.len() - st.held;
        if self.cursor >= st.base
            && idx < visible
            && let Some(c) = st.chunks.get(idx).cloned()
        {
            self.cursor += 1;
            st.cursors.insert(self.id, self.cursor);
            let before = st.buffered;
            trim(&mut st);
            if st.buffered < before {
                self.fill.drained.notify_waiters();
            }
            return Next::Chunk(c);
        }
        match &st.done {
            Some(Ok(())) => Next::End,
            Some(Err(e)) => Next::Error(e.clone()),
            None => Next::Wait,
        }
    }

    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        let mut rx = self.fill.version.subscribe();
        loop {
            rx.borrow_and_update();
            match self.next_now() {
                Next::Chunk(c) => return Some(Ok(c)),
                Next::End => return None,
                Next::Error(e) => return Some(Err(io::Error::other(e))),
                Next::Wait => {
                    if rx.changed().await.is_err() {
                        return Some(Err(io::Error::other("fill abandoned")));
                    }
                }
            }
        }
    }

    pub fn into_stream(self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures_util::stream::unfold(Some(self), |reader| async move {
            let mut reader = reader?;
            match reader.next().await {
                Some(Ok(c)) => Some((Ok(c), Some(reader))),
                Some(Err(e)) => Some((Err(e), None)),
                None => None,
            }
        })
    }
}

impl Drop for FillReader {
    fn drop(&mut self) {
        let mut st = self.fill.lock();
        st.cursors.remove(&self.id);
        st.dropped.remove(&self.id);
        trim(&mut st);
        self.fill.drained.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn readers_get_bytes_as_they_arrive_and_late_join_after_trim_fails() {
        let fill = Fill::new(KeyHash::of("k"));
        fill.set_keep_all(false);
        let r1 = fill.reader().unwrap();
        let mut s1 = Box::pin(r1.into_stream());
        fill.push(Bytes::from_static(b"ab"));
        assert_eq!(s1.next().await.unwrap().unwrap(), "ab");
        // Everyone passed chunk 0, so it is gone and a new reader cannot start from byte 0.
        fill.push(Bytes::from_static(b"cd"));
        assert!(fill.reader().is_none());
        fill.finish(Ok(()));
        assert_eq!(s1.next().await.unwrap().unwrap(), "cd");
        assert!(s1.next().await.is_none());
    }

    /// A streaming fill reads no further than the window ahead of its slowest reader, and a
    /// reader that takes nothing for the stall time while the fill waits is dropped: memory
    /// stays bounded and the fill goes on for the others.
    #[tokio::test]
    async fn a_slow_reader_holds_back_the_fill_then_is_dropped() {
        let fill = Fill::new(KeyHash::of("k"));
        fill.set_keep_all(false);
        let slow = fill.reader().unwrap();
        let fast = fill.reader().unwrap();
        let mut fast = Box::pin(fast.into_stream());
        let mut slow = Box::pin(slow.into_stream());
        let pusher = tokio::spawn({
            let fill = fill.clone();
            async move {
                let mut dropped = 0;
                for _ in 0..64 {
                    dropped += fill.wait_for_room(4096, Duration::from_secs(1)).await;
                    fill.push(Bytes::from(vec![0u8; 1024]));
                }
                fill.finish(Ok(()));
                dropped
            }
        });
        // The fast reader keeps up; the slow one reads nothing.
        let mut got = 0;
        for _ in 0..5 {
            got += fast.next().await.unwrap().unwrap().len();
        }
        // Well within the stall time, the fill is held back.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !pusher.is_finished(),
            "the fill ran ahead of the slow reader"
        );
        assert!(
            fill.lock().buffered <= 4096 + 1024,
            "{}",
            fill.lock().buffered
        );
        // Past the stall time the slow reader is dropped and the fill completes.
        while let Some(c) = fast.next().await {
            got += c.unwrap().len();
        }
        assert_eq!(got, 64 * 1024);
        assert_eq!(pusher.await.unwrap(), 1);
        assert!(
            slow.next().await.unwrap().is_err(),
            "the slow reader's body fails"
        );
    }

    /// A fill whose readers took (and so dropped) its first chunks still knows it has every
    /// byte: `has_all_of` counts the bytes dropped, not the chunks (it counted chunks, so a
    /// request right after a large MISS fetched on its own while the copy was being stored).
    #[tokio::test]
    async fn a_trimmed_fill_still_knows_it_has_every_byte() {
        let fill = Fill::new(KeyHash::of("k"));
        fill.set_keep_all(false);
        let mut reader = Box::pin(fill.reader().unwrap().into_stream());
        for _ in 0..8 {
            fill.push(Bytes::from(vec![0u8; 1024]));
        }
        for _ in 0..6 {
            reader.next().await.unwrap().unwrap();
        }
        // The next push trims what the reader has taken.
        fill.push(Bytes::from(vec![0u8; 1024]));
        assert!(fill.reader().is_none(), "the first chunks are dropped");
        assert!(fill.has_all_of(9 * 1024));
        assert!(!fill.has_all_of(9 * 1024 + 1));
    }

    /// Waiters hold the fill, so its channel never closes under them: the end of the task
    /// that runs it must wake them, however that task ends.
    #[tokio::test]
    async fn the_end_of_the_fill_task_wakes_every_waiter() {
        let fill = Fill::new(KeyHash::of("k"));
        let settled = tokio::spawn({
            let f = fill.clone();
            async move { f.settled().await }
        });
        let result = tokio::spawn({
            let f = fill.clone();
            async move { f.result().await }
        });
        let reader = fill.reader().unwrap();
        let task = tokio::spawn({
            let f = fill.clone();
            async move {
                let _conclude = Concluding(f);
                tokio::task::yield_now().await;
                panic!("the fill task dies before any answer");
            }
        });
        assert!(task.await.is_err());
        let wait = Duration::from_secs(10);
        tokio::time::timeout(wait, settled).await.unwrap().unwrap();
        let r = tokio::time::timeout(wait, result).await.unwrap().unwrap();
        assert!(matches!(r, FillResult::Failed(_)), "{r:?}");
        let s: Vec<_> = tokio::time::timeout(wait, reader.into_stream().collect::<Vec<_>>())
            .await
            .unwrap();
        assert!(matches!(s.as_slice(), [Err(_)]), "{s:?}");
    }

    /// A held chunk is invisible to readers, even to one polling while it is appended, until
    /// it is released: the stored copy must be visible before a client can have the whole body.
    #[tokio::test]
    async fn held_chunks_are_invisible_until_released() {
        let fill = Fill::new(KeyHash::of("k"));
        let mut reader = fill.reader().unwrap();
        fill.push(Bytes::from_static(b"ab"));
        fill.push_held(Bytes::from_static(b"cd"));
        assert!(matches!(reader.next_now(), Next::Chunk(c) if c == "ab"));
        assert!(matches!(reader.next_now(), Next::Wait));
        assert_eq!(
            fill.assembled().unwrap(),
            "abcd",
            "the stored copy has every chunk"
        );
        fill.release();
        assert!(matches!(reader.next_now(), Next::Chunk(c) if c == "cd"));
        fill.finish(Ok(()));
        assert!(matches!(reader.next_now(), Next::End));
    }

    #[tokio::test]
    async fn keep_all_allows_late_readers_and_assembles() {
        let fill = Fill::new(KeyHash::of("k"));
        fill.push(Bytes::from_static(b"ab"));
        fill.push(Bytes::from_static(b"cd"));
        fill.finish(Ok(()));
        let s: Vec<_> = fill.reader().unwrap().into_stream().collect().await;
        assert_eq!(s.len(), 2);
        assert_eq!(fill.assembled().unwrap(), "abcd");
    }

    #[test]
    fn budget_bounds_what_is_held_at_once() {
        let b = Budget::new(100);
        let a = b.take(60).unwrap();
        assert!(b.take(41).is_none(), "over the limit");
        let c = b.take(40).unwrap();
        assert_eq!(b.used(), 100);
        drop(a);
        assert_eq!(b.used(), 40);
        assert!(b.take(60).is_some());
        drop(c);
        assert_eq!(b.used(), 0);
    }

    /// The stored copy replaces the kept chunks: the fill holds one copy of the body, and a
    /// reader still behind reads the same bytes.
    #[tokio::test]
    async fn assembling_replaces_the_chunks_with_slices_of_the_copy() {
        let fill = Fill::new(KeyHash::of("k"));
        let mut reader = fill.reader().unwrap();
        let buf = Bytes::from(vec![7u8; 1000]);
        fill.push(buf.slice(0..2));
        fill.push(buf.slice(10..13));
        fill.finish(Ok(()));
        let body = fill.assembled().unwrap();
        assert_eq!(body.len(), 5);
        assert!(buf.is_unique(), "no chunk holds the read buffer any more");
        assert!(matches!(reader.next_now(), Next::Chunk(c) if c.len() == 2));
        assert!(matches!(reader.next_now(), Next::Chunk(c) if c.len() == 3));
        assert!(matches!(reader.next_now(), Next::End));
    }

    #[tokio::test]
    async fn errors_reach_readers() {
        let fill = Fill::new(KeyHash::of("k"));
        let r = fill.reader().unwrap();
        fill.finish(Err("upstream reset".into()));
        let mut s = Box::pin(r.into_stream());
        assert!(s.next().await.unwrap().is_err());
    }
}
