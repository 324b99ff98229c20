//! Reading bodies: whole (one blocking call), verified ahead of a first stream, or streamed
//! with the check done before the last chunk; each checked by hash or by an unchanged file
//! stamp ([`Checking`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cacache::Integrity;
use futures_util::Stream;
use ssri::IntegrityChecker;
use tokio::io::AsyncReadExt;
use tracing::warn;

use super::{DiskEntry, DiskHit, DiskTier, Lane, Throttle};
use crate::coalesce::{Budget, Charge};
use crate::key::KeyHash;

/// What a body read from disk counts against until its last reference goes (when the client
/// has it). Held for its drop, which gives it back.
pub(super) enum Share {
    /// A share of the read budget.
    Charged(#[allow(dead_code)] Charge),
    /// One of a stream's [`SMALL_CHUNKS`] small chunks, read past the budget.
    Small(#[allow(dead_code)] SmallChunk),
}

/// A body read from disk with its [`Share`].
struct Counted {
    data: Vec<u8>,
    _share: Share,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// `data` as a body, counted by `share` until it is dropped.
pub(super) fn charged(data: Vec<u8>, share: Share) -> Bytes {
    Bytes::from_owner(Counted {
        data,
        _share: share,
    })
}

/// How many [`STREAM_READ_SMALL`] chunks a stream may have read and not yet seen dropped: the
/// one it holds back and two its consumer has: the one being sent, and the one a consumer
/// holds while it asks for the next (tokio-util's `StreamReader` keeps the chunk it has read
/// through until the next comes, and a copy into one buffer its first chunk). A consumer must
/// not need the chunk after the next before it lets go of the ones it has, or the stream waits
/// for ever: hyper's connections free theirs by writing them to the socket (HTTP/1 flushes its
/// queue when the body makes it wait; HTTP/2 frees a frame once written), whose write queue
/// (HTTP/1: 16 buffers, up to `max_header_size`) and send buffer (HTTP/2: 400 KiB a stream)
/// would otherwise take more. A client that stops reading parks its own connection only.
const SMALL_CHUNKS: usize = 3;

/// A stream's small chunks alive, and a wake-up when one goes.
pub(super) struct SmallChunks {
    alive: AtomicUsize,
    released: tokio::sync::Notify,
}

/// One of a stream's small chunks alive: counted from when it is granted (before the read) to
/// when it is dropped, whatever becomes of the read.
pub(super) struct SmallChunk(Arc<SmallChunks>);

impl Drop for SmallChunk {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::AcqRel);
        self.0.released.notify_one();
    }
}

/// Why a whole read did not happen: the read budget had no room for it (the body streams
/// instead; see [`is_over_budget`]).
#[derive(Debug)]
struct OverBudget;

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the disk read budget has no room for a whole read")
    }
}

impl std::error::Error for OverBudget {}

fn over_budget() -> io::Error {
    io::Error::other(OverBudget)
}

/// Whether a whole read failed only because the read budget had no room for it.
pub fn is_over_budget(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|e| e.is::<OverBudget>())
}

/// Bodies up to this size are read whole in one blocking call rather than streamed: a stream
/// has up to three 64 KiB chunks alive per request anyway, and each chunk of a stream is a
/// separate trip to the blocking pool.
pub const WHOLE_READ_MAX: u64 = 128 * 1024;

/// The chunks a stream reads.
pub(super) const STREAM_READ: usize = 64 * 1024;

/// The chunks a stream reads when the read budget has no room for [`STREAM_READ`] (see
/// [`read_budget`](super::read_budget)): three at most alive per stream (see
/// [`SMALL_CHUNKS`]).
pub const STREAM_READ_SMALL: usize = 16 * 1024;

/// Streams of bodies up to this size read on the async worker when hot (see
/// [`DiskEntry::hot`]); larger ones always on the blocking pool, whose threads may wait on the
/// disk: the page cache may keep only part of a large body, and a stream to a slow client
/// lasts long after the read that made it hot.
const HOT_STREAM_MAX: u64 = 4 << 20;

/// Whole reads of bodies up to this size run on the async worker when hot; a larger one (a
/// body read to be promoted into the memory tier can be an eighth of it) is one copy long
/// enough to stall the worker's other tasks, so it goes to the blocking pool.
const HOT_WHOLE_MAX: u64 = WHOLE_READ_MAX;

/// The fewest streams a tier lets have a file open at once (see [`stream_slots`]).
const STREAM_SLOTS_MIN: u64 = 64;

/// How long a stream waits for a slot (see [`stream_slots`]) before it ends with an error.
#[cfg(not(test))]
const STREAM_SLOT_WAIT: Duration = Duration::from_secs(10);
#[cfg(test)]
const STREAM_SLOT_WAIT: Duration = Duration::from_millis(300);

/// Streams a tier lets have a content file open at once. Each holds a file descriptor for as
/// long as its client takes, and up to [`SMALL_CHUNKS`] chunks past the read budget: without a
/// bound, many slow streams (HTTP/2 multiplies them by a connection's streams) ran the process
/// out of file descriptors, so that it could neither accept connections nor reach the origin,
/// and held memory past `--memory`. So: as many as the read budget would hold at three small
/// chunks each (its share of memory a second time over: 320-340 at the default `--memory`, 1,365
/// at most), at least [`STREAM_SLOTS_MIN`], at most a quarter of the soft `ulimit -n`. A
/// stream past them waits [`STREAM_SLOT_WAIT`] for one, then ends with an error (its client
/// sees the response cut short, never a body presented as complete).
pub(super) fn stream_slots(read_budget: u64) -> usize {
    let by_memory = read_budget / (SMALL_CHUNKS * STREAM_READ_SMALL) as u64;
    let by_files = (soft_nofile() / 4).max(STREAM_SLOTS_MIN);
    usize::try_from(by_memory.clamp(STREAM_SLOTS_MIN, by_files)).unwrap_or(usize::MAX)
}

/// The soft limit of open files (`ulimit -n`), `u64::MAX` where there is none to read.
fn soft_nofile() -> u64 {
    #[cfg(unix)]
    return rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    #[cfg(not(unix))]
    u64::MAX
}

/// The chunks a check of a whole body reads (see [`DiskTier::verify`]).
const VERIFY_READ: usize = 256 * 1024;

/// A content file as the file system describes it. A write, truncation or replacement changes
/// at least one field, provided the times were taken a timestamp tick after the previous change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    /// Hard links: 0 once the file was unlinked (see [`FileStamp::unlinked_since`]).
    nlink: u64,
}

/// How much older than a read a file's times must be before its stamp may stand in for the
/// hash: file systems with coarse timestamps (ticks of milliseconds, on some up to 2 s) give a
/// change made in the same tick as the file's last one the same times. Git's "racily clean"
/// index entries are the same problem.
pub const STAMP_SETTLE: Duration = Duration::from_secs(3);

impl FileStamp {
    #[cfg(unix)]
    fn of(md: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        Some(Self {
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            nlink: md.nlink(),
        })
    }

    #[cfg(not(unix))]
    fn of(_: &std::fs::Metadata) -> Option<Self> {
        None
    }

    /// `after` is this file, unlinked since and otherwise unchanged: only its ctime and link
    /// count moved. cacache stores an identical body by renaming a new file over the path,
    /// which unlinks the file a read may have open; its bytes stay as they were. Any other
    /// change (a write, or one whose mtime was set back, which moves the ctime) is not this.
    fn unlinked_since(&self, after: &Self) -> bool {
        (self.dev, self.ino, self.len, self.mtime) == (after.dev, after.ino, after.len, after.mtime)
            && self.nlink > 0
            && after.nlink == 0
    }

    /// Both times lie at least [`STAMP_SETTLE`] before `now`.
    fn settled(&self, now: SystemTime) -> bool {
        let Some(limit) = now
            .checked_sub(STAMP_SETTLE)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        else {
            return false;
        };
        let limit = (
            i64::try_from(limit.as_secs()).unwrap_or(i64::MAX),
            i64::from(limit.subsec_nanos()),
        );
        self.mtime < limit && self.ctime < limit
    }
}

/// How a whole read made sure of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checked {
    /// Hashed and compared with the integrity.
    Hashed,
    /// The file is the one whose bytes last matched the hash, unchanged.
    Unchanged,
}

/// Whether a failed read found the body damaged (another length, another hash, or gone),
/// rather than failed to read it: out of file descriptors or memory, an I/O error, a task
/// cancelled at shutdown. Only damage removes an object; a passing failure leaves it for the
/// next request, and a pushed object (which no origin can give back) is never lost to one.
pub(super) fn is_damage(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof
    )
}

/// A cacache error as an I/O error of the kind [`is_damage`] reads: content that fails its
/// hash or length is invalid data, content that is not there is not found.
fn cacache_error(e: cacache::Error) -> io::Error {
    match e {
        cacache::Error::IntegrityError(_) | cacache::Error::SizeMismatch(..) => {
            io::Error::new(io::ErrorKind::InvalidData, e.to_string())
        }
        cacache::Error::EntryNotFound(..) => io::Error::new(io::ErrorKind::NotFound, e.to_string()),
        cacache::Error::IoError(io, _) => io,
        other => io::Error::other(other.to_string()),
    }
}

impl DiskTier {
    /// Removes `hit`'s copy of `key` after a read that failed with `e`, if `e` says the body is
    /// damaged (see [`is_damage`]).
    fn drop_if_damaged(&self, key: &KeyHash, hit: &Arc<DiskEntry>, e: &io::Error) {
        if is_damage(e) {
            warn!(key = %key, error = %e, "disk entry's body is damaged or gone, dropping it");
            self.remove_copy(key, hit);
        } else {
            static FAILED: super::Throttle = super::Throttle::new();
            if let Some(occurrences) = FAILED.pass() {
                warn!(key = %key, error = %e, occurrences, "reading a disk entry failed; it is kept (one line per 10 s at most)");
            }
        }
    }

    /// Where cacache keeps a body (its `content-v2` layout). Should that layout change, whole
    /// reads find nothing here and fall back to cacache's own checked read.
    pub(super) fn content_path(&self, sri: &Integrity) -> PathBuf {
        let (algorithm, hex) = sri.to_hex();
        self.content
            .join("content-v2")
            .join(algorithm.to_string())
            .join(&hex[..2])
            .join(&hex[2..4])
            .join(&hex[4..])
    }

    /// Reads a whole body and checks it (see the module docs on integrity), in one trip to the
    /// blocking pool: open, read and hash happen there, off the async workers. A damaged body
    /// is removed. The body counts against the read budget until it is dropped; without room
    /// there, nothing is read ([`is_over_budget`]).
    pub async fn read_all(&self, key: &KeyHash, hit: &DiskHit) -> io::Result<Bytes> {
        self.read_all_within(key, hit, &self.reads, hit.entry.size)
            .await
    }

    /// [`DiskTier::read_all`], the body counting `n` bytes against `budget` rather than the read
    /// budget: a body on its way into the memory tier counts as a fill's does.
    pub async fn read_all_within(
        &self,
        key: &KeyHash,
        hit: &DiskHit,
        budget: &Arc<Budget>,
        n: u64,
    ) -> io::Result<Bytes> {
        if hit.entry.inline {
            return self.inline_body(key, hit).await;
        }
        let Some(charge) = budget.take(n) else {
            return Err(over_budget());
        };
        let entry = hit.entry.clone();
        entry.content_file(|| self.content_path(&entry.sri()));
        let (read, charge) = if entry.hot() && entry.size <= HOT_WHOLE_MAX {
            let path = &entry.content_file(PathBuf::new).path;
            let read = self
                .open_files
                .read_checked(path, &self.content, &entry, SystemTime::now());
            (read, charge)
        } else {
            let content = self.content.clone();
            let open_files = Arc::clone(&self.open_files);
            let lane = match entry.size <= WHOLE_READ_MAX {
                true => Lane::Read,
                false => Lane::Whole,
            };
            // The charge goes with the job: what it reads counts until it ends, even if the
            // request has gone meanwhile.
            self.job(lane, move || {
                let path = &entry.content_file(PathBuf::new).path;
                let read = open_files.read_checked(path, &content, &entry, SystemTime::now());
                (read, charge)
            })
            .await?
        };
        match read {
            Ok((data, _)) => {
                hit.entry.verified.store(true, Ordering::Release);
                hit.entry.mark_read();
                Ok(charged(data, Share::Charged(charge)))
            }
            Err(e) => {
                self.drop_if_damaged(key, &hit.entry, &e);
                Err(io::Error::new(e.kind(), e.to_string()))
            }
        }
    }

    /// Makes sure a stored body can be streamed as the complete response its length
    /// announces. Before the first stream of an object loaded from a previous run, it reads
    /// the body through once (without keeping it), checking its hash and its length; later,
    /// the content file's length is compared with the recorded one (one `stat`). A mismatch
    /// removes the entry, so the request is a miss rather than a truncated or damaged response
    /// presented as complete (issue 13, item 9).
    pub async fn verify(&self, key: &KeyHash, hit: &DiskHit) -> bool {
        if hit.entry.inline {
            // Checked with its record, as it is read.
            return true;
        }
        let size = hit.entry.size;
        let path = hit
            .entry
            .content_file(|| self.content_path(&hit.entry.sri()))
            .path
            .clone();
        let failed = if hit.entry.verified.load(Ordering::Acquire) {
            let stat = path.clone();
            match self
                .job(Lane::Read, move || std::fs::metadata(stat))
                .await
                .and_then(|r| r)
            {
                Ok(md) => (md.len() != size).then(|| wrong_length(md.len(), size)),
                // Not where cacache's layout puts it: the stream's own checks decide.
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => Some(e),
            }
        } else {
            let entry = Arc::clone(&hit.entry);
            match self
                .job(Lane::Check, move || read_through(&path, &entry))
                .await
                .and_then(|r| r)
            {
                Ok(Some(true)) => None,
                Ok(Some(false)) => Some(io::Error::other(
                    "the content file changed while it was read",
                )),
                Ok(None) => self.read_through_cacache(&hit.entry).await.err(),
                Err(e) => Some(e),
            }
        };
        match failed {
            None => {
                hit.entry.verified.store(true, Ordering::Release);
                true
            }
            Some(e) => {
                self.drop_if_damaged(key, &hit.entry, &e);
                false
            }
        }
    }

    /// Reads a body through cacache (which checks its hash), keeping nothing: for a body not
    /// where cacache's layout puts it.
    async fn read_through_cacache(&self, entry: &DiskEntry) -> io::Result<()> {
        let mut r = cacache::Reader::open_hash(&self.content, entry.sri())
            .await
            .map_err(cacache_error)?;
        let mut buf = vec![0u8; VERIFY_READ];
        let mut total = 0u64;
        loop {
            match r.read(&mut buf).await? {
                0 => break,
                n => total += n as u64,
            }
        }
        r.check().map_err(cacache_error)?;
        match total == entry.size {
            true => Ok(()),
            false => Err(wrong_length(total, entry.size)),
        }
    }

    /// Streams a body in chunks of [`STREAM_READ`], each read on the blocking pool unless the
    /// body is hot (read within [`HOT_FOR`](super::HOT_FOR), as whole reads decide) and at most
    /// [`HOT_STREAM_MAX`]. The last chunk is held back until the check at the end has passed
    /// (see [`Checking`]: the hash, or the file's unchanged stamp) and the length matched the
    /// recorded one: on a mismatch the stream ends with an error *before* the final bytes, so
    /// a client never receives a damaged or truncated body presented as complete, and a
    /// damaged entry is removed.
    pub fn stream(
        self: &Arc<Self>,
        key: KeyHash,
        hit: &DiskHit,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        self.stream_part(key, hit, 0, hit.entry.size)
    }

    /// [`DiskTier::stream`] of the `len` bytes from `start` (a Range request's): a content file
    /// whose stamp vouches for it is read from there, only those bytes, and its stamp compared
    /// at the end; one that must be hashed is read whole (the hash needs every byte), only the
    /// range sent, its last bytes held back until the hash matched.
    pub fn stream_range(
        self: &Arc<Self>,
        key: KeyHash,
        hit: &DiskHit,
        start: u64,
        len: u64,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let size = hit.entry.size;
        let start = start.min(size);
        self.stream_part(key, hit, start, start.saturating_add(len).min(size))
    }

    /// The stream of bytes `from..to` of the body (see [`DiskTier::stream_range`]).
    fn stream_part(
        self: &Arc<Self>,
        key: KeyHash,
        hit: &DiskHit,
        from: u64,
        to: u64,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        /// Where the bytes come from.
        enum Source {
            /// The content file, read directly.
            File(Checking),
            /// cacache's reader, which checks the hash itself: no file where cacache's layout
            /// puts it.
            Cacache(cacache::Reader),
        }
        struct St {
            tier: Arc<DiskTier>,
            /// An inline body: read from its record, in one piece.
            inline: Option<DiskHit>,
            /// Keeps the content file referenced while it streams.
            entry: Arc<DiskEntry>,
            source: Option<Source>,
            /// Read on the async worker (see [`DiskEntry::hot`]), not on the blocking pool.
            hot: bool,
            pending: Option<Bytes>,
            done: bool,
            /// Where the next read starts, and the recorded length.
            read: u64,
            size: u64,
            /// The part of the body it sends.
            from: u64,
            to: u64,
            /// Where its reads end: the part's end, or the body's when the source checks a
            /// hash (it needs every byte).
            stop: u64,
            /// Its chunks read past the read budget.
            small: Arc<SmallChunks>,
            /// Its slot among the tier's streams, from its first read (see [`stream_slots`]).
            slot: Option<tokio::sync::OwnedSemaphorePermit>,
        }
        impl St {
            /// Ends the stream with `e`, removing the copy if `e` is damage.
            fn fail(mut self, key: &KeyHash, e: io::Error) -> Option<(io::Result<Bytes>, Self)> {
                self.tier.drop_if_damaged(key, &self.entry, &e);
                self.done = true;
                self.pending = None;
                Some((Err(io::Error::new(e.kind(), e.to_string())), self))
            }

            /// Where cacache's layout puts the body.
            fn path(&self) -> PathBuf {
                let tier = &self.tier;
                let entry = &self.entry;
                entry
                    .content_file(|| tier.content_path(&entry.sri()))
                    .path
                    .clone()
            }

            /// Counts `chunk` (read at `read`) as read and holds back its bytes within the
            /// part, giving the ones held before.
            fn hold(&mut self, chunk: Vec<u8>, share: Share) -> Option<Bytes> {
                let at = self.read;
                self.read += chunk.len() as u64;
                let (from, to) = (self.from.max(at), self.to.min(self.read));
                if from >= to {
                    return None;
                }
                let bytes = charged(chunk, share);
                let part = match (from, to) == (at, self.read) {
                    true => bytes,
                    false => bytes.slice((from - at) as usize..(to - at) as usize),
                };
                self.pending.replace(part)
            }

            /// The next chunk's size and what it counts against: [`STREAM_READ`] from the read
            /// budget if it has room, else [`STREAM_READ_SMALL`], once fewer than
            /// [`SMALL_CHUNKS`] of this stream's are alive (waiting until one goes).
            async fn next_chunk(&self) -> (usize, Share) {
                let left = usize::try_from(self.stop - self.read).unwrap_or(usize::MAX);
                loop {
                    if let Some(charge) = self.tier.reads.take(left.min(STREAM_READ) as u64) {
                        return (left.min(STREAM_READ), Share::Charged(charge));
                    }
                    // Made before the count is read: a chunk dropped after it wakes it (tokio
                    // keeps a `notify_one` that found no waiter for the next one).
                    let released = self.small.released.notified();
                    if self.small.alive.load(Ordering::Acquire) < SMALL_CHUNKS {
                        // Only this stream adds to its count.
                        self.small.alive.fetch_add(1, Ordering::AcqRel);
                        let grant = SmallChunk(Arc::clone(&self.small));
                        return (left.min(STREAM_READ_SMALL), Share::Small(grant));
                    }
                    released.await;
                }
            }
        }
        let st = St {
            tier: Arc::clone(self),
            inline: hit.entry.inline.then(|| hit.clone()),
            entry: Arc::clone(&hit.entry),
            source: None,
            hot: hit.entry.hot() && hit.entry.size <= HOT_STREAM_MAX,
            pending: None,
            done: false,
            read: 0,
            size: hit.entry.size,
            from,
            to,
            stop: hit.entry.size,
            small: Arc::new(SmallChunks {
                alive: AtomicUsize::new(0),
                released: tokio::sync::Notify::new(),
            }),
            slot: None,
        };
        futures_util::stream::unfold(st, move |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                if let Some(hit) = st.inline.take() {
                    st.done = true;
                    let body = st.tier.inline_body(&key, &hit).await.map(|b| {
                        let end = usize::try_from(st.to).unwrap_or(usize::MAX).min(b.len());
                        b.slice(usize::try_from(st.from).unwrap_or(end).min(end)..end)
                    });
                    return Some((body, st));
                }
                match st.source.take() {
                    None => {
                        let slots = Arc::clone(&st.tier.streams);
                        match tokio::time::timeout(STREAM_SLOT_WAIT, slots.acquire_owned()).await {
                            Ok(Ok(slot)) => st.slot = Some(slot),
                            _ => {
                                static BUSY: Throttle = Throttle::new();
                                if let Some(occurrences) = BUSY.pass() {
                                    warn!(
                                        occurrences,
                                        "every disk stream slot is taken: a stream gave up (one line per 10 s at most)"
                                    );
                                }
                                let e = io::Error::other("no disk stream slot came free");
                                return st.fail(&key, e);
                            }
                        }
                        let (path, entry, from) = (st.path(), Arc::clone(&st.entry), st.from);
                        let opened = st
                            .tier
                            .here_or_job(st.hot, Lane::Read, move || {
                                let mut opened = Checking::open(&path, &entry, SystemTime::now());
                                // A file vouched for by its stamp is read from the part's start.
                                if let Ok(Some(file)) = &mut opened
                                    && !file.hashes()
                                {
                                    file.seek_to(from)?;
                                }
                                opened
                            })
                            .await;
                        st.source = match opened {
                            Ok(Some(file)) => {
                                if !file.hashes() {
                                    (st.read, st.stop) = (st.from, st.to);
                                }
                                Some(Source::File(file))
                            }
                            Ok(None) => {
                                match cacache::Reader::open_hash(&st.tier.content, st.entry.sri())
                                    .await
                                {
                                    Ok(r) => Some(Source::Cacache(r)),
                                    Err(e) => return st.fail(&key, cacache_error(e)),
                                }
                            }
                            Err(e) => return st.fail(&key, e),
                        };
                    }
                    Some(Source::File(mut file)) if st.read == st.stop => {
                        st.done = true;
                        match file.finish(&st.path(), &st.entry) {
                            Ok(true) => {
                                st.entry.mark_read();
                                return st.pending.take().map(|last| (Ok(last), st));
                            }
                            Ok(false) => {
                                let e =
                                    io::Error::other("the content file changed while it was read");
                                return st.fail(&key, e);
                            }
                            Err(e) => return st.fail(&key, e),
                        }
                    }
                    Some(Source::File(mut file)) => {
                        let (want, share) = st.next_chunk().await;
                        let read = st
                            .tier
                            .here_or_job(st.hot, Lane::Read, move || {
                                file.read(want).map(|c| (file, c))
                            })
                            .await;
                        match read {
                            Ok((_, chunk)) if chunk.len() < want => {
                                let e = io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    format!(
                                        "content ends at {} bytes, the index says {}",
                                        st.read + chunk.len() as u64,
                                        st.size
                                    ),
                                );
                                return st.fail(&key, e);
                            }
                            Ok((file, chunk)) => {
                                st.source = Some(Source::File(file));
                                if let Some(prev) = st.hold(chunk, share) {
                                    return Some((Ok(prev), st));
                                }
                            }
                            // Not damage (a passing failure): the copy stays.
                            Err(e) => return st.fail(&key, e),
                        }
                    }
                    Some(Source::Cacache(mut reader)) => {
                        let (want, share) = st.next_chunk().await;
                        // One byte more than is left, so that a longer body shows.
                        let mut buf = vec![0u8; want + 1];
                        match reader.read(&mut buf).await {
                            Ok(0) => {
                                st.done = true;
                                return match reader.check() {
                                    Ok(_) if st.read == st.size => {
                                        st.pending.take().map(|last| (Ok(last), st))
                                    }
                                    Ok(_) => {
                                        let e = wrong_length(st.read, st.size);
                                        st.fail(&key, e)
                                    }
                                    Err(e) => st.fail(&key, cacache_error(e)),
                                };
                            }
                            Ok(n) => {
                                buf.truncate(n);
                                if st.read + n as u64 > st.size {
                                    let e = wrong_length(format!("over {}", st.size), st.size);
                                    return st.fail(&key, e);
                                }
                                st.source = Some(Source::Cacache(reader));
                                if let Some(prev) = st.hold(buf, share) {
                                    return Some((Ok(prev), st));
                                }
                            }
                            Err(e) => return st.fail(&key, e),
                        }
                    }
                }
            }
        })
    }
}

/// Reads `size` bytes from `file`'s current position (fewer at the end of the file), in one
/// read where the kernel allows, straight into the spare capacity of a new buffer. A buffer
/// zeroed first (`vec![0; size]`, then `read_exact`) spent over a quarter of the read's CPU
/// on the zeroing: at 100 KiB, a disk hit cost 29.9 and 27.3 µs of CPU this way against 31.4
/// and 32.7 µs zeroed (`benches/hit_path.rs`, alternating runs; memory hits 19-22 µs). std's
/// `read_to_end` also leaves the buffer unzeroed, but through `Take` reads 8 KiB, then
/// doubles: five calls for 100 KiB.
#[cfg(unix)]
fn read_exactly(file: &mut std::fs::File, size: usize) -> io::Result<Vec<u8>> {
    read_into_new(size, |spare| rustix::io::read(&*file, spare))
}

/// [`read_exactly`] from the start of `file`, whatever its position (`pread`: one kept-open
/// file serves concurrent reads).
#[cfg(unix)]
fn read_exactly_at(file: &std::fs::File, size: usize) -> io::Result<Vec<u8>> {
    let mut at = 0;
    read_into_new(size, |spare| {
        let n = rustix::io::pread(file, spare, at)?;
        at += n as u64;
        Ok(n)
    })
}

/// Up to `size` bytes (fewer at the end of the file) into the spare capacity of a new buffer,
/// by as many calls of `read` as it takes.
#[cfg(unix)]
fn read_into_new(
    size: usize,
    mut read: impl FnMut(rustix::buffer::SpareCapacity<'_, u8>) -> rustix::io::Result<usize>,
) -> io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        match read(rustix::buffer::spare_capacity(&mut data)) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(data)
}

/// [`read_exactly`] by std's `read_to_end`: reads of 8 KiB, then doubling.
#[cfg(not(unix))]
fn read_exactly(file: &mut std::fs::File, size: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::with_capacity(size);
    file.take(size as u64).read_to_end(&mut data)?;
    Ok(data)
}

#[cfg(not(unix))]
fn read_exactly_at(_: &std::fs::File, _: usize) -> io::Result<Vec<u8>> {
    Err(io::Error::other("kept-open files read with pread"))
}

/// A content file being read, checked as it goes: hashed, unless it is the file whose bytes
/// last matched the hash, unchanged since (its stamp, taken at the opening, is compared again
/// at the end instead).
pub(super) struct Checking {
    file: std::fs::File,
    /// The file's stamp at the opening (`None` where the platform gives none).
    before: Option<FileStamp>,
    /// When it was opened: the stamp is recorded only if the file's times were settled then.
    opened: SystemTime,
    hasher: Option<IntegrityChecker>,
}

impl Checking {
    /// Opens the content file of `entry` at `path`, at `now`: `Ok(None)` if nothing is there.
    /// A file of another length is damaged: its stamp says so before any read.
    pub(super) fn open(
        path: &Path,
        entry: &DiskEntry,
        now: SystemTime,
    ) -> io::Result<Option<Self>> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let before = FileStamp::of(&file.metadata()?);
        if let Some(stamp) = before
            && stamp.len != entry.size
        {
            return Err(wrong_length(stamp.len, entry.size));
        }
        let checked = &entry.content_file(|| path.to_path_buf()).checked;
        let unchanged =
            before.is_some() && *checked.lock().unwrap_or_else(PoisonError::into_inner) == before;
        Ok(Some(Self {
            file,
            before,
            opened: now,
            hasher: (!unchanged).then(|| IntegrityChecker::new(entry.sri())),
        }))
    }

    /// Whether its bytes are hashed (rather than vouched for by the file's unchanged stamp).
    /// Moves to `offset`, for a part of the file: only one it does not hash (the hash needs
    /// every byte, from the first).
    fn seek_to(&mut self, offset: u64) -> io::Result<()> {
        use std::io::Seek;
        debug_assert!(self.hasher.is_none());
        self.file.seek(io::SeekFrom::Start(offset)).map(drop)
    }

    pub(super) fn hashes(&self) -> bool {
        self.hasher.is_some()
    }

    /// The next `want` bytes (fewer at the end of the file), hashed if it hashes.
    fn read(&mut self, want: usize) -> io::Result<Vec<u8>> {
        let data = read_exactly(&mut self.file, want)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.input(&data);
        }
        Ok(data)
    }

    /// Once `entry.size` bytes were read: whether they are the stored body. A hash that matched
    /// records the file's stamp, if the file did not change during the read and its times had
    /// settled when it was opened. `Ok(false)`: not hashed, and the file's bytes may have
    /// changed meanwhile (not vouched for, nor known to be damaged; the stamp is forgotten, so
    /// the next read hashes).
    fn finish(&mut self, path: &Path, entry: &DiskEntry) -> io::Result<bool> {
        let after = FileStamp::of(&self.file.metadata()?);
        if let Some(stamp) = after
            && stamp.len != entry.size
        {
            return Err(wrong_length(stamp.len, entry.size));
        }
        let stable = self.before.is_some() && self.before == after;
        let checked = &entry.content_file(|| path.to_path_buf()).checked;
        let mut checked = checked.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(hasher) = self.hasher.take() else {
            let unlinked = self
                .before
                .zip(after)
                .is_some_and(|(before, after)| before.unlinked_since(&after));
            if !stable {
                *checked = None;
            }
            return Ok(stable || unlinked);
        };
        hasher
            .result()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if stable && self.before.is_some_and(|s| s.settled(self.opened)) {
            *checked = self.before;
        }
        Ok(true)
    }

    /// The file, once [`Checking::finish`]ed, if its stamp at the opening is the one that now
    /// vouches for `entry`'s body.
    fn vouched(self, entry: &DiskEntry) -> Option<OpenContent> {
        let stamp = self.before?;
        let file = entry.file.get()?;
        (*file.checked.lock().unwrap_or_else(PoisonError::into_inner) == Some(stamp)).then_some(
            OpenContent {
                file: self.file,
                stamp,
            },
        )
    }
}

/// A content file kept open, with its stamp when it was opened.
pub(super) struct OpenContent {
    file: std::fs::File,
    stamp: FileStamp,
}

/// Content files kept open for whole reads (nginx's `open_file_cache`): a body read whole again
/// costs one `pread` and one `fstat` instead of resolving its path, opening, two `fstat`s and a
/// close. At 100 KiB that was a sixth of a disk hit's CPU (`benches/hit_path.rs`). Only a file
/// whose stamp vouched for its bytes when it was opened is kept, and it is used only while
/// that stamp still vouches for the entry and is still the file's after the read (so a file
/// written in place, or replaced, is read the usual way again, and let go). Up to
/// [`OPEN_FILES_MAX`] files per tier, and an eighth of the process's file descriptor limit; the
/// least used go first. A content file removed from the cache, or renamed over by an identical
/// body stored anew, is let go here too, so it does not hold its disk space open. On a network
/// file system (NFS), an `fstat` of a file kept open can answer from cached attributes where an
/// `open` would have asked the server: a change made there by another client can go unseen for
/// as long as those are cached (`acregmax`); keep the cache directory on a local disk.
pub(super) struct OpenFiles {
    files: Option<quick_cache::sync::Cache<[u8; 32], Arc<OpenContent>>>,
}

/// At most this many content files kept open (see [`OpenFiles`]).
pub(super) const OPEN_FILES_MAX: usize = 1024;

impl OpenFiles {
    /// Up to `max` files (none: keeps nothing).
    pub(super) fn new(max: usize) -> Self {
        Self {
            files: (max > 0).then(|| quick_cache::sync::Cache::new(max)),
        }
    }

    /// [`OPEN_FILES_MAX`], or an eighth of the soft limit on open files if that is less.
    pub(super) fn for_this_process() -> Self {
        #[cfg(unix)]
        let limit = usize::try_from(soft_nofile() / 8).unwrap_or(usize::MAX);
        #[cfg(not(unix))]
        let limit = 0;
        Self::new(OPEN_FILES_MAX.min(limit))
    }

    /// The key of `entry`'s content file: content named by SHA-256 only (every body this
    /// version writes to a content file).
    fn key(entry: &DiskEntry) -> Option<[u8; 32]> {
        match entry.sri {
            super::Sri::Sha256(digest) => Some(digest),
            _ => None,
        }
    }

    /// Reads `entry`'s whole body (`size` bytes) from its content file at `path`, checked as
    /// [`read_checked`] does, through the kept-open file when there is one that still vouches
    /// for it; keeps the file it opened otherwise, if its stamp vouches.
    pub(super) fn read_checked(
        &self,
        path: &Path,
        cache: &Path,
        entry: &DiskEntry,
        now: SystemTime,
    ) -> io::Result<(Vec<u8>, Checked)> {
        let (Some(files), Some(key)) = (&self.files, Self::key(entry)) else {
            return read_checked(path, cache, entry, now);
        };
        if let Some(open) = files.get(&key) {
            if let Some(data) = Self::read_kept(&open, entry) {
                return Ok((data, Checked::Unchanged));
            }
            files.remove(&key);
        }
        let (data, how, kept) = read_checked_keeping(path, cache, entry, now)?;
        if let Some(kept) = kept {
            files.insert(key, Arc::new(kept));
        }
        Ok((data, how))
    }

    /// The body through a kept-open file: `None` unless its stamp vouches for `entry` now and
    /// is still the file's after the read.
    fn read_kept(open: &OpenContent, entry: &DiskEntry) -> Option<Vec<u8>> {
        let checked = &entry.file.get()?.checked;
        if *checked.lock().unwrap_or_else(PoisonError::into_inner) != Some(open.stamp) {
            return None;
        }
        let size = usize::try_from(entry.size).ok()?;
        let data = read_exactly_at(&open.file, size).ok()?;
        let after = FileStamp::of(&open.file.metadata().ok()?)?;
        (data.len() == size && after == open.stamp).then_some(data)
    }

    /// Lets go of the content file named `sri`, if it is kept (it is being removed).
    pub(super) fn forget(&self, sri: &Integrity) {
        let Some(files) = &self.files else { return };
        if let super::Sri::Sha256(digest) = super::Sri::of(sri.clone()) {
            files.remove(&digest);
        }
    }

    /// Files kept open (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.files.as_ref().map_or(0, |f| f.len())
    }
}

/// The error of a content file of `len` bytes where the index says `size`: damage.
fn wrong_length(len: impl std::fmt::Display, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("content is {len} bytes, the index says {size}"),
    )
}

/// Reads the content file of `entry` at `path` through, checked, keeping nothing (none if its
/// unchanged stamp vouches for it): `Ok(None)` if nothing is there, else what
/// [`Checking::finish`] says.
fn read_through(path: &Path, entry: &DiskEntry) -> io::Result<Option<bool>> {
    let Some(mut file) = Checking::open(path, entry, SystemTime::now())? else {
        return Ok(None);
    };
    let mut left = if file.hashes() { entry.size } else { 0 };
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(VERIFY_READ);
        let chunk = file.read(want)?;
        if chunk.len() < want {
            let read = entry.size - left + chunk.len() as u64;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "content ends at {read} bytes, the index says {}",
                    entry.size
                ),
            ));
        }
        left -= want as u64;
    }
    file.finish(path, entry).map(Some)
}

/// Reads the body at `path` whole, checked (see [`Checking`]), in one read (see
/// [`read_exactly`]). Without a file there (cacache's layout moved), cacache reads and checks
/// it.
pub(super) fn read_checked(
    path: &Path,
    cache: &Path,
    entry: &DiskEntry,
    now: SystemTime,
) -> io::Result<(Vec<u8>, Checked)> {
    read_checked_keeping(path, cache, entry, now).map(|(data, how, _)| (data, how))
}

/// [`read_checked`], and the file it read with its stamp when that stamp now vouches for the
/// body (see [`OpenFiles`]).
fn read_checked_keeping(
    path: &Path,
    cache: &Path,
    entry: &DiskEntry,
    now: SystemTime,
) -> io::Result<(Vec<u8>, Checked, Option<OpenContent>)> {
    let Some(mut file) = Checking::open(path, entry, now)? else {
        let data = cacache::read_hash_sync(cache, &entry.sri()).map_err(cacache_error)?;
        return Ok((data, Checked::Hashed, None));
    };
    let how = if file.hashes() {
        Checked::Hashed
    } else {
        Checked::Unchanged
    };
    let size = usize::try_from(entry.size).map_err(io::Error::other)?;
    let data = file.read(size)?;
    if data.len() != size {
        return Err(wrong_length(data.len(), entry.size));
    }
    if file.finish(path, entry)? {
        let kept = file.vouched(entry);
        return Ok((data, how, kept));
    }
    // Changed while it was read: the bytes read are checked themselves.
    entry
        .sri()
        .check(&data)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok((data, Checked::Hashed, None))
}
