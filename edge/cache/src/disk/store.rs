//! The disk tier's index: one redb database (`index.redb`) with every object's metadata, written
//! by one thread in group commits.
//!
//! Tables, all keyed by the 32-byte key hash:
//! - `objects`: the record a hit needs: a blake3 checksum of the rest, the JSON's length, the
//!   JSON of the content hash, size and stored response's metadata, then the body itself when
//!   it is kept inline (see the tier's `INLINE_MAX`); read on a lookup whose metadata is not
//!   held in memory, and for an inline body.
//! - `entries`: a compact record per object (inline or not, size, purge sequence, content
//!   hash, key text, Vary names), all that the start-up load needs: it never reads the larger `objects` records.
//! - `vary`: primary key → the Vary names its responses nominate, so a request that arrives
//!   before the load reached its variants still finds them.
//! - `state`: the largest purge sequence any stored object recorded.
//!
//! Writes: every put and delete goes to the writer thread (`outpost-disk-index`), which takes
//! whatever has queued up and commits it in one transaction (group commit), durably
//! (`Durability::Immediate`: synced, with quick repair so that opening after a crash does not
//! walk the tree), at most one commit per [`GATHER`] while writes keep coming. Until its
//! transaction commits, a write is visible to this process through [`Store::pending`]. A
//! put's caller waits for its commit before the object counts as stored, so an object counted
//! as stored survives a kill -9. What a kill -9 can lose: the objects whose commit had not
//! ended, that is, those whose bodies were complete within the last [`GATHER`] plus one
//! commit (a sync: well under a millisecond on an SSD, some on a spinning disk). They are
//! misses after the restart, and their content files, unreferenced, are swept. Deletes are
//! not waited for: an object removed just before a kill -9 (evicted, invalidated by an unsafe
//! method, or found damaged) can be back after the restart. Purges cannot: the purge log,
//! written before a purge answers, still covers the object, and the first lookup removes it.
//! Puts and deletes can be conditional on the content the key holds when they commit, so a
//! 304's metadata update or an eviction never lands on a newer copy.
//!
//! Why redb: candidates measured on this project's 2-core machine (2026-12-05; 100,000 objects
//! of 1.5 KB metadata plus an 80 B entry, transactions of 64; then 1,000,000 entries):
//!
//! | | heed (LMDB, `NO_SYNC`) | fjall 3 (journal to OS buffers) | redb 5 | a file per object |
//! |---|---|---|---|---|
//! | write, CPU per object | 17-20 µs | 14 µs (plus 2 compaction threads) | 29-31 µs unsynced, 39-52 µs synced | 47-53 µs |
//! | point read | 0.7-1.0 µs | 4.0-4.4 µs | 4.6-5.2 µs | 7.5 µs |
//! | read beside a busy writer | 1.1 µs | 24 µs | 7.5-9.7 µs | 14-24 µs |
//! | anonymous memory | 1-3 MiB (the file is mapped: RSS grows to its size) | 65-153 MiB with 16 MiB of caches configured | ~20 MiB with a 16 MiB cache | - |
//! | iterate 1M entries, page cache dropped | 0.19-0.31 s | 0.5 s | 1.5-2.2 s | - |
//!
//! heed is faster on every line, but it builds C, opens with `unsafe`, needs a fixed map size,
//! and its resident set grows with the database. fjall's memory could not be held to a budget,
//! and it runs threads of its own. redb is pure Rust, stays within its cache, has no threads,
//! costs less per write than the file per object it replaces, and never blocks readers. Its
//! slow cold iteration matters little: the load runs in the background.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;
use tracing::warn;

use crate::key::{KeyHash, KeyHasher};

const OBJECTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("objects");
const ENTRIES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("entries");
const VARY: TableDefinition<&[u8; 32], &str> = TableDefinition::new("vary");
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
const MAX_PURGE_SEQ: &str = "max_purge_seq";

/// Writes committed in one transaction at most.
const BATCH_MAX: usize = 4096;

/// Commits are at least this far apart while writes keep coming, so that each carries a
/// batch: a commit rewrites the tree's upper pages and syncs, whatever its size.
const GATHER: Duration = Duration::from_millis(5);

/// A write not yet committed.
#[derive(Clone)]
pub(super) enum Pending {
    Put(Arc<[u8]>),
    Delete,
}

/// What the start-up load learns about one object.
pub(super) struct EntryRecord {
    /// The body is in the record (not in cacache).
    pub inline: bool,
    pub size: u64,
    pub purge_seq: u64,
    pub integrity: String,
    pub key_text: String,
    pub vary: String,
}

impl EntryRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            2 + 16 + 12 + self.integrity.len() + self.key_text.len() + self.vary.len(),
        );
        out.push(2);
        out.push(u8::from(self.inline));
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.purge_seq.to_le_bytes());
        for s in [&self.integrity, &self.key_text, &self.vary] {
            // Strings longer than 4 GiB cannot occur: keys and headers are bounded far below.
            let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    fn decode(data: &[u8]) -> Option<Self> {
        let (&version, rest) = data.split_first()?;
        if version != 2 {
            return None;
        }
        let (&flags, mut rest) = rest.split_first()?;
        let u64_at = |rest: &mut &[u8]| -> Option<u64> {
            let (n, tail) = rest.split_first_chunk::<8>()?;
            *rest = tail;
            Some(u64::from_le_bytes(*n))
        };
        let size = u64_at(&mut rest)?;
        let purge_seq = u64_at(&mut rest)?;
        let mut text = || -> Option<String> {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
            let s = std::str::from_utf8(tail.get(..len)?).ok()?.to_string();
            rest = &tail[len..];
            Some(s)
        };
        Some(Self {
            inline: flags & 1 == 1,
            size,
            purge_seq,
            integrity: text()?,
            key_text: text()?,
            vary: text()?,
        })
    }
}

/// A put: the record a lookup reads, the entry the start-up load reads.
pub(super) struct Put {
    pub key: KeyHash,
    /// Applied only if the object stored under the key now has this content hash (a 304's
    /// metadata update must not land on a body a newer fill replaced); `None`: always.
    pub expect: Option<String>,
    pub record: Arc<[u8]>,
    pub entry: EntryRecord,
    /// (primary key, names) when the object varies.
    pub vary: Option<(KeyHash, String)>,
}

enum Op {
    /// The sender learns whether it was applied (see [`Put::expect`]).
    Put(Put, u64, Option<oneshot::Sender<io::Result<bool>>>),
    /// With `Some(hash)`, only if the object stored under the key still has that content
    /// hash (an eviction must not delete the record of a newer copy).
    Delete(KeyHash, u64, Option<String>),
    Flush(oneshot::Sender<()>),
    /// Commit what came before, sync, and stop (closing the database).
    Close(oneshot::Sender<()>),
}

pub(super) struct Store {
    /// `None` once closed.
    db: ArcSwapOption<Database>,
    tx: mpsc::Sender<Op>,
    /// Writes queued or being committed, with the ticket of the latest for each key.
    pending: Arc<DashMap<KeyHash, (u64, Pending), KeyHasher>>,
    tickets: AtomicU64,
    /// Transactions committed, and writes that failed, since start.
    pub commits: Arc<AtomicU64>,
    pub errors: Arc<AtomicU64>,
}

fn stopped() -> io::Error {
    db_error("the index writer has stopped")
}

fn db_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("disk index: {e}"))
}

impl Store {
    /// Opens (or creates) the database under `dir`. A database that cannot be opened (damaged
    /// below redb's own crash safety) is moved aside and replaced by an empty one: its objects
    /// become misses, and their content is swept as unreferenced.
    /// `cache`: memory redb may use to cache the pages it read (its default is 1 GiB).
    pub fn open(dir: &Path, cache: u64) -> io::Result<Self> {
        let path = dir.join("index.redb");
        let cache = usize::try_from(cache).unwrap_or(usize::MAX);
        let db = match open_db(&path, cache) {
            Ok(db) => db,
            Err(e) if damaged(&e) => {
                let aside = dir.join(format!(
                    "index.redb.damaged-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs()
                ));
                warn!(error = %e, file = %path.display(), moved_to = %aside.display(),
                    "disk index is damaged; starting with an empty one (its objects are misses)");
                std::fs::rename(&path, &aside)?;
                open_db(&path, cache).map_err(db_error)?
            }
            Err(e) => return Err(db_error(e)),
        };
        let db = Arc::new(db);
        // The tables exist from the start, so readers never meet a missing one.
        {
            let mut txn = db.begin_write().map_err(db_error)?;
            // Every commit records the allocator state, so opening after a crash does not
            // walk the whole tree.
            txn.set_quick_repair(true);
            txn.open_table(OBJECTS).map_err(db_error)?;
            txn.open_table(ENTRIES).map_err(db_error)?;
            txn.open_table(VARY).map_err(db_error)?;
            txn.open_table(STATE).map_err(db_error)?;
            txn.commit().map_err(db_error)?;
        }
        let (tx, rx) = mpsc::channel();
        let pending = Arc::new(DashMap::with_hasher(KeyHasher::default()));
        let commits = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            db: Arc::clone(&db),
            last_commit: Instant::now(),
            pending: Arc::clone(&pending),
            commits: Arc::clone(&commits),
            errors: Arc::clone(&errors),
        };
        std::thread::Builder::new()
            .name("outpost-disk-index".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            db: ArcSwapOption::from(Some(db)),
            tx,
            pending,
            tickets: AtomicU64::new(1),
            commits,
            errors,
        })
    }

    /// A write to `key` not yet committed: `Some(Put)` or `Some(Delete)`.
    pub fn pending(&self, key: &KeyHash) -> Option<Pending> {
        self.pending.get(key).map(|p| p.1.clone())
    }

    /// Queues a put; the receiver tells when it has committed.
    fn enqueue(&self, put: Put) -> io::Result<oneshot::Receiver<io::Result<bool>>> {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.pending
            .insert(put.key, (ticket, Pending::Put(Arc::clone(&put.record))));
        let (done, wait) = oneshot::channel();
        let key = put.key;
        if self.tx.send(Op::Put(put, ticket, Some(done))).is_err() {
            self.pending.remove_if(&key, |_, p| p.0 == ticket);
            return Err(stopped());
        }
        Ok(wait)
    }

    /// Queues a put and waits for its commit; false when its [`Put::expect`] did not hold
    /// (nothing was written).
    pub async fn put(&self, put: Put) -> io::Result<bool> {
        self.enqueue(put)?.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Queues puts and waits for their commits, blocking (not on an async worker). Returns
    /// how many committed.
    pub fn put_all_blocking(&self, puts: Vec<Put>) -> u64 {
        let waits: Vec<_> = puts
            .into_iter()
            .filter_map(|p| self.enqueue(p).ok())
            .collect();
        waits
            .into_iter()
            .map(|w| u64::from(matches!(w.blocking_recv(), Ok(Ok(true)))))
            .sum()
    }

    /// Queues a delete (not waited for: until it commits, lookups see it as pending).
    pub fn delete(&self, key: KeyHash) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.pending.insert(key, (ticket, Pending::Delete));
        let _ = self.tx.send(Op::Delete(key, ticket, None));
    }

    /// Queues a delete of the record only if it still names content `integrity` (an evicted
    /// copy); a newer copy's record stays. Not shown as pending: it may not apply.
    pub fn delete_if(&self, key: KeyHash, integrity: String) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Op::Delete(key, ticket, Some(integrity)));
    }

    /// Waits until every write queued before this call has committed durably.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Op::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }

    fn db(&self) -> io::Result<Arc<Database>> {
        self.db.load_full().ok_or_else(|| db_error("closed"))
    }

    /// Commits and syncs every write queued so far, then closes the database (its lock is
    /// released for the next process, or the next tier in this one). Later reads and writes
    /// fail, as misses and errors.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Op::Close(done)).is_ok() {
            let _ = wait.await;
        }
        self.db.store(None);
    }

    /// Reads a committed record (blocking: call off the async workers).
    pub fn get(&self, key: &KeyHash) -> io::Result<Option<Vec<u8>>> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(OBJECTS).map_err(db_error)?;
        Ok(table
            .get(&key.0)
            .map_err(db_error)?
            .map(|v| v.value().to_vec()))
    }

    /// Replaces a record as it is, checksum and all (tests edit records as damage would).
    #[cfg(test)]
    pub fn put_raw(&self, key: KeyHash, record: &[u8]) {
        let txn = self.db().unwrap().begin_write().unwrap();
        txn.open_table(OBJECTS)
            .unwrap()
            .insert(&key.0, record)
            .unwrap();
        txn.commit().unwrap();
    }

    /// The Vary names stored for a primary key (blocking).
    pub fn vary(&self, primary: &KeyHash) -> io::Result<Option<String>> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(VARY).map_err(db_error)?;
        Ok(table
            .get(&primary.0)
            .map_err(db_error)?
            .map(|v| v.value().to_string()))
    }

    /// The largest purge sequence a stored object recorded.
    pub fn max_purge_seq(&self) -> io::Result<u64> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(STATE).map_err(db_error)?;
        Ok(table
            .get(MAX_PURGE_SEQ)
            .map_err(db_error)?
            .map_or(0, |v| v.value()))
    }

    /// Reads every entry (blocking), handing them to `f` in batches of up to `batch`, until `f`
    /// returns false. Entries that do not decode are deleted. Returns how many were read, and
    /// whether that was all of them.
    pub fn load(
        &self,
        batch: usize,
        mut f: impl FnMut(Vec<(KeyHash, EntryRecord)>) -> bool,
    ) -> io::Result<(u64, bool)> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(ENTRIES).map_err(db_error)?;
        let mut out = Vec::with_capacity(batch);
        let mut total = 0;
        for item in table.range(..).map_err(db_error)? {
            let (k, v) = item.map_err(db_error)?;
            let key = KeyHash(*k.value());
            match EntryRecord::decode(v.value()) {
                Some(e) => out.push((key, e)),
                None => self.delete(key),
            }
            if out.len() >= batch {
                total += out.len() as u64;
                if !f(std::mem::replace(&mut out, Vec::with_capacity(batch))) {
                    return Ok((total, false));
                }
            }
        }
        total += out.len() as u64;
        if !out.is_empty() && !f(out) {
            return Ok((total, false));
        }
        Ok((total, true))
    }
}

/// Opens the database. Another instance in this process that is closing it (a restart in
/// place) holds its lock for a moment: that is waited for, up to a few seconds.
fn open_db(path: &PathBuf, cache: usize) -> Result<Database, redb::DatabaseError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Database::builder().set_cache_size(cache).create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Errors that mean the file itself is unusable (rather than, say, unreadable): damaged, not
/// a redb database at all, or of a format this version cannot read.
fn damaged(e: &redb::DatabaseError) -> bool {
    match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_))
        | redb::DatabaseError::UpgradeRequired(_)
        | redb::DatabaseError::RepairAborted => true,
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
            io.kind() == io::ErrorKind::InvalidData
        }
        _ => false,
    }
}

/// The writer thread's side.
struct Writer {
    db: Arc<Database>,
    last_commit: Instant,
    pending: Arc<DashMap<KeyHash, (u64, Pending), KeyHasher>>,
    commits: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        loop {
            let Ok(first) = rx.recv() else { break };
            // Let a batch gather: one commit per GATHER at most while writes keep coming.
            if let Some(wait) = GATHER.checked_sub(self.last_commit.elapsed()) {
                std::thread::sleep(wait);
            }
            let mut ops = vec![first];
            while ops.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let mut applied = vec![true; ops.len()];
            let result = self.commit(&ops, &mut applied);
            if let Err(e) = &result {
                self.errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, writes = ops.len(), "disk index commit failed; those objects are not stored");
            } else {
                self.commits.fetch_add(1, Ordering::Relaxed);
            }
            let mut closing: Vec<oneshot::Sender<()>> = Vec::new();
            for (op, applied) in ops.into_iter().zip(applied) {
                match op {
                    Op::Put(put, ticket, done) => {
                        self.pending.remove_if(&put.key, |_, p| p.0 == ticket);
                        if let Some(done) = done {
                            let _ = done.send(match &result {
                                Ok(()) => Ok(applied),
                                Err(e) => Err(db_error(e)),
                            });
                        }
                    }
                    Op::Delete(key, ticket, _) => {
                        self.pending.remove_if(&key, |_, p| p.0 == ticket);
                    }
                    Op::Flush(done) => {
                        let _ = done.send(());
                    }
                    Op::Close(done) => closing.push(done),
                }
            }
            if !closing.is_empty() {
                drop(self);
                for done in closing {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    /// Commits `ops` in one transaction; `applied[i]` is set false for a conditional op whose
    /// condition did not hold.
    fn commit(&mut self, ops: &[Op], applied: &mut [bool]) -> Result<(), redb::Error> {
        if ops
            .iter()
            .all(|op| matches!(op, Op::Flush(_) | Op::Close(_)))
        {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
        txn.set_quick_repair(true);
        {
            let mut objects = txn.open_table(OBJECTS)?;
            let mut entries = txn.open_table(ENTRIES)?;
            let mut vary = txn.open_table(VARY)?;
            let mut state = txn.open_table(STATE)?;
            let mut max_seq = state.get(MAX_PURGE_SEQ)?.map_or(0, |v| v.value());
            let seq_before = max_seq;
            // The content hash the object stored under `key` has now (this transaction's
            // earlier writes included).
            let current = |entries: &redb::Table<&[u8; 32], &[u8]>, key: &KeyHash| {
                entries
                    .get(&key.0)
                    .ok()
                    .flatten()
                    .and_then(|v| EntryRecord::decode(v.value()))
                    .map(|e| e.integrity)
            };
            for (op, applied) in ops.iter().zip(applied.iter_mut()) {
                match op {
                    Op::Put(put, _, _) => {
                        if let Some(expect) = &put.expect
                            && current(&entries, &put.key).as_ref() != Some(expect)
                        {
                            *applied = false;
                            continue;
                        }
                        objects.insert(&put.key.0, &*put.record)?;
                        entries.insert(&put.key.0, put.entry.encode().as_slice())?;
                        if let Some((primary, names)) = &put.vary {
                            vary.insert(&primary.0, names.as_str())?;
                        }
                        max_seq = max_seq.max(put.entry.purge_seq);
                    }
                    Op::Delete(key, _, expect) => {
                        if let Some(expect) = expect
                            && current(&entries, key).as_ref() != Some(expect)
                        {
                            *applied = false;
                            continue;
                        }
                        objects.remove(&key.0)?;
                        entries.remove(&key.0)?;
                    }
                    Op::Flush(_) | Op::Close(_) => {}
                }
            }
            if max_seq != seq_before {
                state.insert(MAX_PURGE_SEQ, max_seq)?;
            }
        }
        txn.commit()?;
        self.last_commit = Instant::now();
        Ok(())
    }
}
