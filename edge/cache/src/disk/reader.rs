//! Reading bodies: whole (one blocking call, checked by hash or by an unchanged file stamp),
//! verified ahead of a first stream, or streamed with the hash checked before the last chunk.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cacache::Integrity;
use futures_util::Stream;
use tokio::io::AsyncReadExt;
use tracing::warn;

use super::{DiskEntry, DiskHit, DiskTier};
use crate::key::KeyHash;

/// Bodies up to this size are read whole in one blocking call rather than streamed: a stream
/// holds up to two 64 KiB chunks per request anyway, and each chunk of a stream is a separate
/// trip to the blocking pool.
pub const WHOLE_READ_MAX: u64 = 128 * 1024;

/// A content file as the file system describes it. A write, truncation or replacement changes
/// at least one field, provided the times were taken a timestamp tick after the previous change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
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
        })
    }

    #[cfg(not(unix))]
    fn of(_: &std::fs::Metadata) -> Option<Self> {
        None
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
            warn!(key = %key, error = %e, "reading a disk entry failed; it is kept");
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
    /// is removed.
    pub async fn read_all(&self, key: &KeyHash, hit: &DiskHit) -> io::Result<Bytes> {
        if hit.entry.inline {
            return self.inline_body(key, hit).await;
        }
        let entry = hit.entry.clone();
        entry.content_file(|| self.content_path(&entry.sri()));
        let read = if entry.hot() {
            let path = &entry.content_file(PathBuf::new).path;
            read_checked(path, &self.content, &entry, SystemTime::now())
        } else {
            let content = self.content.clone();
            tokio::task::spawn_blocking(move || {
                let path = &entry.content_file(PathBuf::new).path;
                read_checked(path, &content, &entry, SystemTime::now())
            })
            .await
            .map_err(io::Error::other)?
        };
        match read {
            Ok((data, _)) => {
                hit.entry.verified.store(true, Ordering::Release);
                hit.entry.mark_read();
                Ok(Bytes::from(data))
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
        let wrong_length = |len: u64| {
            (len != size).then(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("content is {len} bytes, the index says {size}"),
                )
            })
        };
        let failed = if hit.entry.verified.load(Ordering::Acquire) {
            let path = &hit
                .entry
                .content_file(|| self.content_path(&hit.entry.sri()))
                .path;
            match tokio::fs::metadata(path).await {
                Ok(md) => wrong_length(md.len()),
                // Not where cacache's layout puts it: the stream's own checks decide.
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => Some(e),
            }
        } else {
            let read = async {
                let mut r = cacache::Reader::open_hash(&self.content, hit.entry.sri())
                    .await
                    .map_err(cacache_error)?;
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match r.read(&mut buf).await? {
                        0 => break,
                        n => total += n as u64,
                    }
                }
                r.check().map_err(cacache_error)?;
                Ok::<_, io::Error>(total)
            }
            .await;
            match read {
                Ok(total) => wrong_length(total),
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

    /// Streams a body in chunks. The last chunk is held back until the integrity check at the
    /// end has passed and the length matched the recorded one: on a mismatch the stream ends
    /// with an error *before* the final bytes, so a client never receives a damaged or
    /// truncated body presented as complete, and the entry is removed.
    pub fn stream(
        self: &Arc<Self>,
        key: KeyHash,
        hit: &DiskHit,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        struct St {
            tier: Arc<DiskTier>,
            /// An inline body: read from its record, in one piece.
            inline: Option<DiskHit>,
            /// Keeps the content file referenced while it streams.
            entry: Arc<DiskEntry>,
            sri: Integrity,
            reader: Option<cacache::Reader>,
            pending: Option<Bytes>,
            done: bool,
            /// Bytes read so far, and the recorded length.
            read: u64,
            size: u64,
        }
        let st = St {
            tier: Arc::clone(self),
            inline: hit.entry.inline.then(|| hit.clone()),
            entry: Arc::clone(&hit.entry),
            sri: hit.entry.sri(),
            reader: None,
            pending: None,
            done: false,
            read: 0,
            size: hit.entry.size,
        };
        futures_util::stream::unfold(st, move |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                if let Some(hit) = st.inline.take() {
                    st.done = true;
                    let body = st.tier.inline_body(&key, &hit).await;
                    return Some((body, st));
                }
                if st.reader.is_none() {
                    match cacache::Reader::open_hash(&st.tier.content, st.sri.clone()).await {
                        Ok(r) => st.reader = Some(r),
                        Err(e) => {
                            let e = cacache_error(e);
                            st.tier.drop_if_damaged(&key, &st.entry, &e);
                            st.done = true;
                            return Some((Err(io::Error::other(e.to_string())), st));
                        }
                    }
                }
                let reader = st.reader.as_mut().expect("opened above");
                let mut buf = vec![0u8; 64 * 1024];
                match reader.read(&mut buf).await {
                    Ok(0) => {
                        st.done = true;
                        let reader = st.reader.take().expect("opened above");
                        return match reader.check() {
                            Ok(_) if st.read == st.size => {
                                st.pending.take().map(|last| (Ok(last), st))
                            }
                            Ok(_) => {
                                warn!(key = %key, read = st.read, size = st.size, "disk entry is not the recorded length, dropping it");
                                st.tier.remove_copy(&key, &st.entry);
                                st.pending = None;
                                Some((Err(io::Error::other("content length mismatch")), st))
                            }
                            Err(e) => {
                                warn!(key = %key, error = %e, "disk entry failed its integrity check, dropping it");
                                st.tier.remove_copy(&key, &st.entry);
                                st.pending = None;
                                Some((Err(io::Error::other("integrity check failed")), st))
                            }
                        };
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        st.read += n as u64;
                        if st.read > st.size {
                            warn!(key = %key, size = st.size, "disk entry is longer than recorded, dropping it");
                            st.tier.remove_copy(&key, &st.entry);
                            st.done = true;
                            st.pending = None;
                            return Some((Err(io::Error::other("content length mismatch")), st));
                        }
                        if let Some(prev) = st.pending.replace(Bytes::from(buf)) {
                            return Some((Ok(prev), st));
                        }
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
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
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        match rustix::io::read(&*file, rustix::buffer::spare_capacity(&mut data)) {
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

/// Reads the body at `path` whole, checked: hashed, unless the file is the one whose bytes last
/// matched the hash, unchanged (same stamp before and after this read, settled at `now`). A
/// successful hash of a settled, stable file records its stamp. A file of another length is
/// damaged: its stamp says so before any read, and then exactly `entry.size` bytes are read,
/// in one call (without a stamp, `entry.size + 1`, to find out; see [`read_exactly`]).
pub(super) fn read_checked(
    path: &Path,
    cache: &Path,
    entry: &DiskEntry,
    now: SystemTime,
) -> io::Result<(Vec<u8>, Checked)> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let data = cacache::read_hash_sync(cache, &entry.sri()).map_err(cacache_error)?;
            return Ok((data, Checked::Hashed));
        }
        Err(e) => return Err(e),
    };
    let before = FileStamp::of(&file.metadata()?);
    let wrong_length = |len: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("content is {len} bytes, the index says {}", entry.size),
        )
    };
    let size = usize::try_from(entry.size).map_err(io::Error::other)?;
    let data = if let Some(stamp) = before {
        if stamp.len != entry.size {
            return Err(wrong_length(&stamp.len));
        }
        let data = read_exactly(&mut file, size)?;
        if data.len() != size {
            return Err(wrong_length(&data.len()));
        }
        data
    } else {
        let mut data = Vec::with_capacity(size);
        (&mut file).take(entry.size + 1).read_to_end(&mut data)?;
        if data.len() != size {
            return Err(wrong_length(&data.len()));
        }
        data
    };
    let after = FileStamp::of(&file.metadata()?);
    let stable = before.is_some() && before == after;
    let checked = &entry.content_file(|| path.to_path_buf()).checked;
    if stable && *checked.lock().unwrap_or_else(PoisonError::into_inner) == before {
        return Ok((data, Checked::Unchanged));
    }
    entry
        .sri()
        .check(&data)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if stable && before.is_some_and(|s| s.settled(now)) {
        *checked.lock().unwrap_or_else(PoisonError::into_inner) = before;
    }
    Ok((data, Checked::Hashed))
}
