//! The disk tier's index: one redb database (`index.redb`) with every object's metadata, written
//! by one thread in group commits.
//!
//! Tables:
//! - `records`, keyed by a sequence number the writer gives each record as it commits: the
//!   record a hit needs: a checksum of the rest (see the tier's `checked_record`), the
//!   metadata's length, the metadata (content hash, size and stored response; MessagePack, see
//!   the tier's `encode_record`), then the body
//!   itself when it is kept inline (see the tier's `INLINE_MAX`); read on a lookup whose
//!   metadata is not held in memory, and for an inline body. Sequential keys make every new record an append to the
//!   tree's rightmost leaf: a commit rewrites one path of the tree, not a random leaf per
//!   record (see the numbers below). A 304's metadata update rewrites its record in place.
//! - `entries`, keyed by the 32-byte key hash: a compact entry per object (its record's
//!   sequence number, inline or not, size, purge sequence, content hash, key text, Vary
//!   names), all that the start-up load needs: it never reads the larger records. Brought up
//!   to date by folds of the journal, not by each write.
//! - `journal`, keyed by the key's range (see below), then in the order of the writes: what
//!   became of each key since its last fold
//!   (its new entry, its removal, or the removal of one copy: see [`Tail`]), one word per key
//!   (a new word replaces the key's earlier one). A write appends to it, as a record does to
//!   `records`: an entry written to `entries` with each put was a random leaf per object, half
//!   of a miss's index cost. When it holds `journal_max` words (an eighth of the index's
//!   memory share at ~160 bytes each: 1,024 at least, ~52,000 at the default `--memory`,
//!   1,048,576 at most), a fold applies the words on one sixteenth of the key space to
//!   `entries`, in key order, in one transaction, and takes them out ([`FOLD_SLICES`]).
//! - `vary`: primary key → the Vary names its responses nominate, so a request that arrives
//!   before the load reached its variants still finds them.
//! - `state`: the largest purge sequence any stored object recorded, and the next record's
//!   sequence number (never handed out twice, not even across restarts; only those of commits
//!   a kill -9 undid, which nothing durable names, may come again).
//! - `objects`: records of the previous layout, keyed by key hash (entries of format 2, whose
//!   sequence number reads as 0); read until their objects are updated, stored anew or
//!   removed, which moves them to `records`.
//!
//! The journal's last word on each key is also held in memory (the `tail`), read before the
//! store serves: a lookup of a key the start-up load has not reached reads it before `entries`, and the
//! writer decides from it, without a lookup, which record a put replaces (a copy the journal
//! does not name is in `entries`; its record goes with the fold). The load hands over the
//! journal's objects first, the newest, then those of `entries` the journal left standing.
//! A fold makes puts wait, not reads. Folded whole, a journal of 53,000 words took 0.1 s into
//! 50,000 entries, 0.3 s into 250,000 and 0.95 s into 1,000,000 (1.4 KB records, commits of
//! 1,024): it rewrites most of the table's leaves. A sixteenth of the key space at a time
//! rewrites a sixteenth of them, at the same cost per word; the journal is keyed by range
//! first, so its words come from one stretch of the journal too (keyed in write order alone,
//! each range's fold rewrote most of the journal's leaves: +4-5 µs per miss in `disk_miss`).
//! The cost per word falls as the journal grows against the table (more words share a leaf),
//! hence a journal sized by the memory the operator gives the index, which also sizes how many
//! objects it holds. The disk queue's budget bounds what waits meanwhile (a fill past it gives
//! up its disk copy, counted as `queue_full`), and a streamed object's fill stays in the fill
//! map until its put commits. In the edge at `--memory 1792MiB` (a journal of up to ~367,000
//! words), a miss's CPU at 1,280,000 objects was 0-7% above its CPU at ~170,000 (medians of
//! rounds, `benches/disk_miss.rs`; 17-32% while folds removed the journal's words one by one,
//! and 27-55% with the journal capped at 65,536 words and folded whole).
//!
//! The price of a long journal is the opening: reading it, with the page cache dropped, took
//! ~1.6 s of a restart at 1,000,000 objects on a fresh fill (`benches/restart.rs`: the first
//! HIT at 1.57-1.61 s, against 41 ms with no journal; 1.7-1.9 s for a fill by the version
//! before this one, 0.9-1.1 s for a fill restarted many times), ~0.27 s warm: ~21,000 page
//! reads, one at a time. The opening now reads the sixteen key ranges at once, a thread each
//! ([`read_tail_slice`]): 0.42-0.52 s on the same fill, where the one reader took 1.53-1.63 s
//! in alternating runs. Serving before the tail is read needs
//! lookups that never find a copy the journal replaced: records of replaced copies removed
//! when they are replaced (the tier's index knows them once loaded; a lookup before), not at
//! the fold. Not done.
//!
//! Writes: every put and delete goes to the writer thread (`outpost-disk-index`), which takes
//! whatever has queued up and commits it in one transaction (group commit), at most one commit
//! per [`GATHER`] while writes keep coming. A commit is visible to this process at once; it is
//! made durable (`Durability::Immediate`: synced, with quick repair so that opening after a
//! crash does not walk the tree) every [`SYNC_EVERY`] while writes keep coming, and at once
//! when they stop; those in between are left to the OS (`Durability::None`), which a kill -9
//! undoes and the next durable commit keeps. Until its transaction commits, a write is known to
//! this process through [`Store::pending`] (reads of an indexed entry see a pending put's
//! record; a key not indexed yet is a miss until its put commits and indexes it). A put's copy
//! is indexed right after its commit, on the writer thread (a [`Completion`], so copies of one
//! key are indexed in commit order); the object counts as stored, and its caller is told, only
//! once that commit is durable: an object counted as stored survives a kill -9. What a kill -9
//! can lose: the objects not yet counted as stored, that is, those whose bodies were complete
//! within the last [`SYNC_EVERY`] plus one commit (a sync: well under a millisecond on an SSD,
//! some on a spinning disk). They are misses after the restart, and their content files,
//! unreferenced, are swept. A 304's metadata update ([`Store::put`]) is told once visible: lost,
//! the restart serves the metadata before it, and revalidates. Deletes are not waited for: an
//! object removed just before a kill -9 (evicted, invalidated by an unsafe method, or found
//! damaged) can be back after the restart. Purges cannot: the purge log, written before a purge
//! answers, still covers the object, and the first lookup removes it.
//! After an I/O error (a full disk, a failed read, write or sync) redb refuses every operation
//! until the database is opened again. The writer notices (at a failed commit, or by looking
//! every [`REOPEN_EVERY`]) and opens it again, at most once per [`REOPEN_EVERY`]; what the last
//! durable commit held is there, the commits since are gone as after a kill -9 (the puts
//! waiting for a durable commit are told they failed: the tier drops their copies and puts
//! back those they replaced, see the tier's `commit_entry`), and the deletes since are applied
//! again ([`Writer::reopen`]). The tier's start-up load reads the index again if it was
//! interrupted.
//! Puts and deletes can be conditional on the content the key holds when they commit, so a
//! 304's metadata update or an eviction never lands on a newer copy.
//!
//! Sequential record keys, measured in the same scratch harness (60,000 puts of a 1.4 KB record
//! and a 150 B entry, synced commits): a record keyed by its key hash cost 57 µs of CPU per
//! object in commits of 35 and 44 µs in commits of 350; keyed by sequence number, 30 and 18 µs.
//! The journal, in a harness of 300,000 puts, 60 per commit: entries by key hash in each
//! commit, 27.3 µs per object; journaled, folded every 65,536 puts, 14.2 µs. In the store
//! itself, 1,000,000 puts in commits of 1,024: 23.6 µs per put (38 s) with entries in each
//! commit, 19.6 µs (26 s) with the journal.
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
//!
//! What a miss still costs here (perf, 1 KiB objects, `benches/disk_miss.rs`): ~15 µs of the
//! writer thread per object, inserts ~6.6 (the record ~4.4, the journal word ~2.2) and the
//! commit ~4.8 (page writes, checksums, allocator; the sync ~0.7). Records in an append-only
//! log of their own (as ATS keeps objects) would save at most what the record's insert costs:
//! skipping it took the writer from 15-17 to 9-11 µs per miss, the miss from 1.36-1.47x to
//! 1.14-1.36x the memory-only miss (target 1.2x); five more alternating runs (session 21),
//! from 12-16 to 7-9 µs and from 1.31-1.54x to 1.19-1.29x. Not done: it would not reliably
//! meet the target, and a log needs its own space reclamation (see `benches/disk_miss.rs`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use dashmap::DashMap;
use redb::ReadableTableMetadata;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::key::{KeyHash, KeyHasher};

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Records of the previous layout, keyed by key hash (see the module docs).
const LEGACY_OBJECTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("objects");
const ENTRIES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("entries");
/// What became of keys since the last fold, in order (see the module docs).
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
const VARY: TableDefinition<&[u8; 32], &str> = TableDefinition::new("vary");
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
const MAX_PURGE_SEQ: &str = "max_purge_seq";
/// The sequence number the next new record gets: numbers are never handed out twice, not even
/// across restarts (a conditional write names a copy by its number), except those of commits
/// a kill -9 undid: no durable record or word names them.
const NEXT_SEQ: &str = "next_seq";

/// Writes committed in one transaction at most.
#[cfg(not(test))]
const BATCH_MAX: usize = 4096;
/// Tests reach a batch's end with few writes.
#[cfg(test)]
const BATCH_MAX: usize = 64;

/// Commits are at least this far apart while writes keep coming, so that each carries a
/// batch: a commit rewrites the tree's upper pages, whatever its size.
const GATHER: Duration = Duration::from_millis(5);

/// Commits are made durable (synced, with the allocator's state for quick repair) at least
/// this often while writes keep coming, and at once when they stop; those in between are
/// visible to this process at once, but a kill -9 undoes them. A synced commit cost ~300 µs
/// more than one left to the OS, and redb writes its allocator's whole state with each: that
/// grows with the database (one 512 KiB write per sync at a million objects, besides the
/// two syncs). Syncing every 250 ms instead cut the bytes written per miss behind
/// a real `outpost edge` (unique 1 KiB misses; /proc/PID/io, socket writes included) from
/// 5.1-5.3 KB to 4.1-4.2 KB, and from 6.9 KB to 4.7-5.0 KB at a million objects, and the
/// writer's CPU per miss by ~2-3 µs in `disk_miss`; but in its flat case (folds at 1.2M
/// objects) the writer took 28.3 and 28.5 µs per miss against 19.9 and 25.8 µs at 50 ms: the
/// pages a commit frees that the last durable commit still names are reused only after the
/// next durable one, so a fold's freed leaves waited longer and new pages came from colder
/// places. Not taken; a kill -9 loses less this way.
const SYNC_EVERY: Duration = Duration::from_millis(50);

/// How often the writer tries to open the database again while it cannot (see
/// [`Writer::reopen`]).
#[cfg(not(test))]
const REOPEN_EVERY: Duration = Duration::from_secs(5);
#[cfg(test)]
const REOPEN_EVERY: Duration = Duration::from_millis(50);

/// Deletes kept for a reopening to apply again (see [`Writer::reopen`]), one unconditional
/// delete per key: far more than [`SYNC_EVERY`] sees, ~2 MiB at most, and ~5 MiB more while a
/// reopening applies them in one commit. Past it, the rest are lost as a kill -9 would lose
/// them (their objects can be back after a restart; purges cannot: the purge log covers them).
const REPLAY_MAX: usize = 16_384;

/// A write not yet committed.
#[derive(Clone)]
pub(super) enum Pending {
    Put(Bytes),
    Delete,
}

/// What the start-up load learns about one object.
pub(super) struct EntryRecord {
    /// The record's key in `records` (0: in the previous layout's `objects`, by key hash).
    pub seq: u64,
    /// The body is in the record (not in cacache).
    pub inline: bool,
    pub size: u64,
    pub purge_seq: u64,
    pub integrity: String,
    pub key_text: String,
    pub vary: String,
}

impl EntryRecord {
    /// The entry as a journal's put of `key` records it.
    fn journal_put(&self, key: &KeyHash) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            33 + 2 + 24 + 12 + self.integrity.len() + self.key_text.len() + self.vary.len(),
        );
        out.extend_from_slice(&key.0);
        out.push(J_PUT);
        self.encode_into(&mut out);
        out
    }

    /// The record's sequence number of an encoded entry, without decoding the rest.
    fn peek_seq(data: &[u8]) -> Option<u64> {
        match data {
            [3, _, seq @ ..] => Some(u64::from_le_bytes(*seq.first_chunk::<8>()?)),
            [2, ..] => Some(0),
            _ => None,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(3);
        out.push(u8::from(self.inline));
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.purge_seq.to_le_bytes());
        for s in [&self.integrity, &self.key_text, &self.vary] {
            // Strings longer than 4 GiB cannot occur: keys and headers are bounded far below.
            let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }

    fn decode(data: &[u8]) -> Option<Self> {
        let (&version, rest) = data.split_first()?;
        if !(2..=3).contains(&version) {
            return None;
        }
        let (&flags, mut rest) = rest.split_first()?;
        let u64_at = |rest: &mut &[u8]| -> Option<u64> {
            let (n, tail) = rest.split_first_chunk::<8>()?;
            *rest = tail;
            Some(u64::from_le_bytes(*n))
        };
        // Format 2 had no sequence number: its record is in the previous layout's table.
        let seq = if version == 3 { u64_at(&mut rest)? } else { 0 };
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
            seq,
            inline: flags & 1 == 1,
            size,
            purge_seq,
            integrity: text()?,
            key_text: text()?,
            vary: text()?,
        })
    }
}

/// One stored copy of a key, as a conditional write names it: its record's sequence number,
/// never given to another copy. A record of the previous layout (number 0) is named by its
/// content hash as well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StoredCopy {
    pub seq: u64,
    pub integrity: String,
}

impl StoredCopy {
    /// The key's copy is this one: its record is at `seq` (`integrity`: its content hash, for
    /// a record of the previous layout).
    fn is(&self, seq: u64, integrity: Option<&str>) -> bool {
        seq == self.seq && (seq != 0 || integrity == Some(self.integrity.as_str()))
    }
}

/// What the journal says of a key since the last fold: its last word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// The key's copy is the record at this sequence number.
    Put(u64),
    /// The key holds nothing.
    Gone,
    /// The copy at this sequence number went (an eviction of a key the journal had not
    /// named): if the folded entry is another copy, that one stands.
    GoneIf(u64),
}

impl Tail {
    /// Whether the folded entry of a key, naming the copy at `folded`, stands under the
    /// journal's `word` on the key (none: it does, whatever it is).
    fn stands(word: Option<Tail>, folded: Option<u64>) -> bool {
        match word {
            None => true,
            Some(Tail::GoneIf(gone)) => folded.is_some_and(|seq| seq != gone),
            Some(Tail::Put(_) | Tail::Gone) => false,
        }
    }
}

/// Journal records: the key hash, one of these, then the entry (a put) or the sequence number
/// (a conditional removal).
const J_PUT: u8 = 1;
const J_GONE: u8 = 2;
const J_GONE_IF: u8 = 3;

/// A removal as the journal records it.
fn journal_gone(key: &KeyHash, only: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(41);
    out.extend_from_slice(&key.0);
    match only {
        Some(seq) => {
            out.push(J_GONE_IF);
            out.extend_from_slice(&seq.to_le_bytes());
        }
        None => out.push(J_GONE),
    }
    out
}

/// A journal record's key, what it says of it, and a put's encoded entry.
fn read_journal(data: &[u8]) -> Option<(KeyHash, Tail, &[u8])> {
    let (key, rest) = data.split_first_chunk::<32>()?;
    let (&op, rest) = rest.split_first()?;
    let tail = match op {
        J_PUT => Tail::Put(EntryRecord::peek_seq(rest)?),
        J_GONE => Tail::Gone,
        J_GONE_IF => Tail::GoneIf(u64::from_le_bytes(*rest.first_chunk::<8>()?)),
        _ => return None,
    };
    Some((KeyHash(*key), tail, rest))
}

/// What a journal record (one per key) costs in memory until it is folded into the entries: its
/// key's word in [`Store`]'s `tail`, and its place in a fold's order. The journal gets an eighth
/// of the index's memory: 1,024 records at least, 1,048,576 at most.
pub(super) const JOURNAL_ENTRY_BYTES: u64 = 160;

/// How many journal records a store whose index may use `index_budget` bytes keeps before it
/// folds them (see [`JOURNAL_ENTRY_BYTES`]).
pub(super) fn journal_max(index_budget: u64) -> u64 {
    if index_budget == u64::MAX {
        // An index bounded by its disk only (pushed objects): as at the default `--memory`.
        return 65_536;
    }
    (index_budget / 8 / JOURNAL_ENTRY_BYTES).clamp(1024, 1 << 20)
}

/// A put: the record a lookup reads, the entry the start-up load reads.
pub(super) struct Put {
    pub key: KeyHash,
    /// Applied only if the key still holds this copy (a 304's metadata update must not land
    /// on a copy a newer fill stored, even one of the same body); `None`: always.
    pub expect: Option<StoredCopy>,
    pub record: Bytes,
    pub entry: EntryRecord,
    /// (primary key, names) when the object varies.
    pub vary: Option<(KeyHash, String)>,
}

/// What a put's caller learns: the record's sequence number, or `None` when its
/// [`Put::expect`] did not hold (nothing was written).
pub(super) type PutResult = io::Result<Option<u64>>;

/// How a put's caller learns its outcome (see [`PutResult`]).
enum Reply {
    /// A task waits for it: told once the commit is visible (durable by the next sync).
    Wait(oneshot::Sender<PutResult>),
    /// Called on the writer thread: no task to wake.
    Call(Completion),
}

/// A put's outcome handlers, run on the writer thread: `visible` right after the commit that
/// makes the put visible to this process (with the record's sequence number; `None`: its
/// condition did not hold), `done` once that commit is durable, or with the error that kept it
/// from being either. Dropped uncalled (the writer stopped first), `done` is called with an
/// error.
pub(super) struct Completion {
    visible: Option<Box<dyn FnOnce(Option<u64>) + Send>>,
    done: Option<Box<dyn FnOnce(PutResult) + Send>>,
}

impl Completion {
    pub fn new(
        visible: impl FnOnce(Option<u64>) + Send + 'static,
        done: impl FnOnce(PutResult) + Send + 'static,
    ) -> Self {
        Self {
            visible: Some(Box::new(visible)),
            done: Some(Box::new(done)),
        }
    }

    fn visible(&mut self, applied: Option<u64>) {
        if let Some(f) = self.visible.take() {
            f(applied);
        }
    }

    fn complete(mut self, result: PutResult) {
        if let Some(f) = self.done.take() {
            f(result);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(f) = self.done.take() {
            f(Err(stopped()));
        }
    }
}

// Puts are nearly every op: boxing them would cost an allocation per stored object.
#[allow(clippy::large_enum_variant)]
enum Op {
    /// The caller learns whether it was applied, and where.
    Put(Put, u64, Option<Reply>),
    /// With `Some(copy)`, only if the key still holds that copy (an eviction must not delete
    /// the record of a newer one).
    Delete(KeyHash, u64, Option<StoredCopy>),
    /// Delete the key's folded entry, which does not decode, unless the journal has a word on
    /// the key (a copy stored, or a removal, since the load read the entry).
    DropUndecodable(KeyHash),
    /// Forget the Vary names of these primary keys (the engine found none of their variants
    /// stored).
    ForgetVary(Vec<KeyHash>),
    /// Commit what came before, durably; tell whether it held.
    Flush(oneshot::Sender<bool>),
    /// Tell, once what came before is durable, whether it held: at the next durable commit
    /// the writer makes anyway (it asks for none), at once if none is due (nothing waits to be
    /// synced).
    Synced(oneshot::Sender<bool>),
    /// Make the next commit with writes fail, as a full or failing disk would (tests).
    #[cfg(test)]
    FailNext,
    /// Commit what came before, then fold the journal (tests).
    #[cfg(test)]
    Fold(oneshot::Sender<()>),
    /// Commit what came before (with the ops of its batch, durably or not, as writes would
    /// be), say so, then stop writing until the receiver's sender goes: the file stays as a
    /// kill -9 would leave it (tests; they queue nothing after it until it is held).
    #[cfg(test)]
    Hold(oneshot::Sender<()>, mpsc::Receiver<()>),
    /// Commit what came before, sync, and stop (closing the database).
    Close(oneshot::Sender<()>),
}

impl Op {
    fn is_write(&self) -> bool {
        matches!(
            self,
            Op::Put(..) | Op::Delete(..) | Op::DropUndecodable(_) | Op::ForgetVary(_)
        )
    }

    /// Its commit must be durable.
    fn asks_sync(&self) -> bool {
        match self {
            Op::Put(..)
            | Op::Delete(..)
            | Op::DropUndecodable(_)
            | Op::ForgetVary(_)
            | Op::Synced(_) => false,
            #[cfg(test)]
            Op::Hold(..) | Op::FailNext => false,
            Op::Flush(_) | Op::Close(_) => true,
            #[cfg(test)]
            Op::Fold(_) => true,
        }
    }
}

pub(super) struct Store {
    /// `None` once closed, and while the writer reopens it (see [`Writer::reopen`]).
    db: Arc<ArcSwapOption<Database>>,
    /// Times the writer closed the database after a failure, losing what was not durable.
    reopens: Arc<AtomicU64>,
    tx: mpsc::Sender<Op>,
    /// Writes queued or being committed, with the ticket of the latest for each key.
    pending: Arc<DashMap<KeyHash, (u64, Pending), KeyHasher>>,
    /// The journal's last word on each key it names, and that word's key in the journal:
    /// committed, not folded yet.
    tail: Arc<DashMap<KeyHash, (u64, Tail), KeyHasher>>,
    tickets: AtomicU64,
    /// Transactions committed, and writes that failed, since start.
    pub commits: Arc<AtomicU64>,
    /// Durable commits since start, and a wake-up for those waiting on the next.
    pub errors: Arc<AtomicU64>,
}

fn stopped() -> io::Error {
    db_error("the index writer has stopped")
}

fn db_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("disk index: {e}"))
}

/// Journals of at least this many words are read a range per thread at the opening (see
/// [`read_tail_slice`]); smaller ones on the opening thread alone. The store's own tests read
/// every journal with threads (their journals are small); the e2e tests' small ones without.
#[cfg(not(test))]
const PARALLEL_OPENING_WORDS: usize = 4096;
#[cfg(test)]
const PARALLEL_OPENING_WORDS: usize = 1;

/// Reads the journal's words on one range of keys (see [`FOLD_SLICES`]; the last range runs to
/// the end, so no key is missed) into `tail`: returns the words it found stale (unreadable,
/// or not a key's latest), and the journal sequence after the last.
/// The opening reads the ranges at once, a thread each: with the page cache dropped, the
/// journal of a million-object index was ~21,000 random page reads, ~85 µs each one at a time.
fn read_tail_slice(
    db: &Database,
    slice: u8,
    tail: &DashMap<KeyHash, (u64, Tail), KeyHasher>,
) -> Result<(Vec<u64>, u64), redb::Error> {
    let txn = db.begin_read()?;
    let journal = txn.open_table(JOURNAL)?;
    let start = u64::from(slice) << 56;
    let end = if slice + 1 == FOLD_SLICES {
        u64::MAX
    } else {
        start | JOURNAL_SEQ
    };
    let mut stale = Vec::new();
    let mut next_journal = 1;
    for item in journal.range(start..=end)? {
        let (j, v) = item?;
        let Some((key, word, _)) = read_journal(v.value()) else {
            stale.push(j.value());
            continue;
        };
        // Each key has one word in the journal: an earlier one (left by a version that kept
        // them all, or that keyed the journal by write order alone, whose words all read as
        // the first range) would outlive its key's fold. Sequences are in write order across
        // ranges, so the latest word wins whichever range's reader comes first.
        let seq = j.value() & JOURNAL_SEQ;
        match tail.entry(key) {
            dashmap::Entry::Occupied(mut held) => {
                let earlier = held.get().0;
                if earlier & JOURNAL_SEQ < seq {
                    held.insert((j.value(), word));
                    stale.push(earlier);
                } else {
                    stale.push(j.value());
                }
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert((j.value(), word));
            }
        }
        next_journal = next_journal.max(seq + 1);
    }
    Ok((stale, next_journal))
}

impl Store {
    /// Opens (or creates) the database under `dir`. A database that cannot be opened (damaged
    /// below redb's own crash safety) is moved aside and replaced by an empty one: its objects
    /// become misses, and their content is swept as unreferenced.
    /// `cache`: memory redb may use to cache the pages it read (its default is 1 GiB).
    /// `journal_max`: journal records kept before a fold (see [`journal_max`]).
    pub fn open(dir: &Path, cache: u64, journal_max: u64) -> io::Result<Self> {
        let path = dir.join("index.redb");
        let cache = usize::try_from(cache).unwrap_or(usize::MAX);
        let db = Arc::new(open_database(&path, cache)?);
        let tail = DashMap::with_hasher(KeyHasher::default());
        let (next_seq, next_journal) = read_tail(&db, &tail)?;
        let tail = Arc::new(tail);
        let (tx, rx) = mpsc::channel();
        let pending = Arc::new(DashMap::with_hasher(KeyHasher::default()));
        let commits = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(ArcSwapOption::from(Some(Arc::clone(&db))));
        let reopens = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            db: Some(db),
            shared: Arc::clone(&shared),
            path,
            cache,
            deletes: UnsyncedDeletes::default(),
            replay: Vec::new(),
            reopen_at: Instant::now(),
            last_reopen: None,
            last_look: Instant::now(),
            reopens: Arc::clone(&reopens),
            last_commit: Instant::now(),
            last_sync: Instant::now(),
            unsynced: false,
            held: Vec::new(),
            waiting_sync: Vec::new(),
            sync_failed: false,
            #[cfg(test)]
            fail_next: false,
            next_seq,
            next_journal,
            journal_max: journal_max.max(1),
            fold_at: journal_max.max(1),
            next_slice: 0,
            pending: Arc::clone(&pending),
            tail: Arc::clone(&tail),
            commits: Arc::clone(&commits),
            errors: Arc::clone(&errors),
        };
        std::thread::Builder::new()
            .name("outpost-disk-index".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            db: shared,
            reopens,
            tx,
            pending,
            tail,
            tickets: AtomicU64::new(1),
            commits,
            errors,
        })
    }

    /// A write to `key` not yet committed: `Some(Put)` or `Some(Delete)`.
    pub fn pending(&self, key: &KeyHash) -> Option<Pending> {
        self.pending.get(key).map(|p| p.1.clone())
    }

    /// The latest write to `key` not yet committed is a removal.
    pub fn pending_delete(&self, key: &KeyHash) -> bool {
        self.pending
            .get(key)
            .is_some_and(|p| matches!(p.1, Pending::Delete))
    }

    /// Queues a put; the receiver tells when it has committed.
    fn enqueue(&self, put: Put) -> io::Result<oneshot::Receiver<PutResult>> {
        let (done, wait) = oneshot::channel();
        self.enqueue_with(put, Reply::Wait(done))?;
        Ok(wait)
    }

    fn enqueue_with(&self, put: Put, reply: Reply) -> io::Result<()> {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.pending
            .insert(put.key, (ticket, Pending::Put(put.record.clone())));
        let key = put.key;
        if self.tx.send(Op::Put(put, ticket, Some(reply))).is_err() {
            self.pending.remove_if(&key, |_, p| p.0 == ticket);
            return Err(stopped());
        }
        Ok(())
    }

    /// Queues a put whose [`Completion`] runs on the writer thread: its `visible` stage right
    /// after the commit, its `done` once the commit is durable (or with an error, if the
    /// commit fails or the writer stops first).
    pub fn put_then(&self, put: Put, done: Completion) {
        // Unsent, the op is dropped with its completion, which then reports the error.
        let _ = self.enqueue_with(put, Reply::Call(done));
    }

    /// Queues a put and waits until its commit is visible (durable by the next sync).
    pub async fn put(&self, put: Put) -> PutResult {
        let record = put.record.clone();
        let result = self.enqueue(put)?.await.unwrap_or_else(|_| Err(stopped()));
        drop(record);
        result
    }

    /// Queues puts and waits until they are durable, blocking (not on an async worker).
    /// Returns how many committed; 0 if they could not be made durable.
    pub fn put_all_blocking(&self, puts: Vec<Put>) -> u64 {
        // A reopening after a failure loses commits that were visible: these were not kept.
        let reopens = self.reopens.load(Ordering::Acquire);
        let waits: Vec<_> = puts
            .into_iter()
            .filter_map(|p| self.enqueue(p).ok())
            .collect();
        let committed = waits
            .into_iter()
            .map(|w| u64::from(matches!(w.blocking_recv(), Ok(Ok(Some(_))))))
            .sum();
        let (done, synced) = oneshot::channel();
        match self.tx.send(Op::Flush(done)).is_ok()
            && synced.blocking_recv() == Ok(true)
            && self.reopens.load(Ordering::Acquire) == reopens
        {
            true => committed,
            false => 0,
        }
    }

    /// Queues a delete (not waited for: until it commits, lookups see it as pending).
    pub fn delete(&self, key: KeyHash) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.pending.insert(key, (ticket, Pending::Delete));
        let _ = self.tx.send(Op::Delete(key, ticket, None));
    }

    /// Queues a delete of the record only if the key still holds `copy` (an evicted or
    /// damaged one); a newer copy's record stays, whatever its body. Not shown as pending: it
    /// may not apply.
    pub fn delete_if(&self, key: KeyHash, copy: StoredCopy) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Op::Delete(key, ticket, Some(copy)));
    }

    /// Queues the removal of these primary keys' Vary names.
    pub fn forget_vary(&self, primaries: Vec<KeyHash>) {
        if !primaries.is_empty() {
            let _ = self.tx.send(Op::ForgetVary(primaries));
        }
    }

    /// Up to `limit` primary keys with Vary names, in key order after `after` (blocking).
    pub fn vary_keys(&self, after: Option<&KeyHash>, limit: usize) -> io::Result<Vec<KeyHash>> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(VARY).map_err(db_error)?;
        let from = after.map_or([0; 32], |k| k.0);
        table
            .range(&from..)
            .map_err(db_error)?
            .filter(|row| {
                !row.as_ref()
                    .is_ok_and(|(k, _)| Some(k.value()) == after.map(|a| &a.0))
            })
            .take(limit)
            .map(|row| row.map(|(k, _)| KeyHash(*k.value())).map_err(db_error))
            .collect()
    }

    /// Waits until every write queued before this call has committed durably.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Op::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Waits until every write queued before this call is durable, as [`Store::flush`] does,
    /// but on the syncs the writer makes anyway (at most [`SYNC_EVERY`] apart while writes
    /// keep coming). Tells whether the commit that made them durable held (a write in an
    /// earlier commit that failed is lost without a trace: that is not known here).
    pub async fn synced(&self) -> bool {
        let (done, wait) = oneshot::channel();
        self.tx.send(Op::Synced(done)).is_ok() && wait.await == Ok(true)
    }

    /// Waits until every write queued before this call has committed (durably or not), then
    /// stops the writer until the returned sender is dropped.
    #[cfg(test)]
    pub async fn hold(&self) -> mpsc::Sender<()> {
        let (held, wait) = oneshot::channel();
        let (release, hold) = mpsc::channel();
        self.tx.send(Op::Hold(held, hold)).unwrap();
        wait.await.unwrap();
        release
    }

    /// Waits until every write queued before this call has committed, then folds the journal.
    #[cfg(test)]
    pub async fn fold_now(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Op::Fold(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Times the database was closed after a failure (and opened again, or tried).
    pub fn reopens(&self) -> u64 {
        self.reopens.load(Ordering::Acquire)
    }

    /// The database is open: not closed, nor failed and not open again yet.
    pub fn is_open(&self) -> bool {
        self.db.load().is_some()
    }

    /// After a read that failed: whether the failure was the database's (the writer closes it,
    /// or has closed it, after a failure: `reopens` was [`Store::reopens`] before the read; it
    /// looks at least every [`REOPEN_EVERY`]) and it is open again within `patience`. False
    /// otherwise, or once `stop` is set. Blocking.
    pub fn reopened_since(
        &self,
        reopens: u64,
        patience: Duration,
        stop: &std::sync::atomic::AtomicBool,
    ) -> bool {
        let noticed = Instant::now() + 2 * REOPEN_EVERY;
        while self.reopens() == reopens && self.db.load().is_some() {
            if Instant::now() >= noticed || stop.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let deadline = Instant::now() + patience;
        while self.db.load().is_none() {
            if Instant::now() >= deadline || stop.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
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

    /// Reads the committed record at `seq` (0: the previous layout's, under `key`). Blocking:
    /// call off the async workers, or for a record whose pages are surely cached.
    pub fn get_at(&self, seq: u64, key: &KeyHash) -> io::Result<Option<Vec<u8>>> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        read_record(&txn, seq, key)
    }

    /// Reads the committed record of `key`, with its sequence number (blocking): the one the
    /// journal names, else the folded entry's.
    pub fn get(&self, key: &KeyHash) -> io::Result<Option<(u64, Vec<u8>)>> {
        // The database, the journal's word, then the transaction. A write committed between
        // the word and the transaction is seen whole or not at all (a copy it replaced reads
        // as gone, or as it was). A reopening publishes its database only once the tail is
        // rebuilt; one that begins meanwhile empties the tail under this read, which the
        // check after the reads catches.
        let db = self.db()?;
        let word = self.tail.get(key).map(|w| w.1);
        let txn = db.begin_read().map_err(db_error)?;
        let folded = || -> io::Result<Option<u64>> {
            let entries = txn.open_table(ENTRIES).map_err(db_error)?;
            let seq = entries
                .get(&key.0)
                .map_err(db_error)?
                .and_then(|v| EntryRecord::peek_seq(v.value()));
            Ok(seq)
        };
        let seq = match word {
            Some(Tail::Put(seq)) => Some(seq),
            Some(Tail::Gone) => None,
            _ => folded()?.filter(|&seq| Tail::stands(word, Some(seq))),
        };
        let record = match seq {
            Some(seq) => read_record(&txn, seq, key)?.map(|r| (seq, r)),
            None => None,
        };
        match self.db.load().as_ref() {
            Some(now) if Arc::ptr_eq(now, &db) => Ok(record),
            _ => Err(db_error("the index is being opened again")),
        }
    }

    /// Replaces a record as it is, checksum and all (tests edit records as damage would).
    #[cfg(test)]
    pub fn put_raw(&self, key: KeyHash, record: &[u8]) {
        let (seq, _) = self.get(&key).unwrap().expect("a stored record");
        let txn = self.db().unwrap().begin_write().unwrap();
        txn.open_table(RECORDS)
            .unwrap()
            .insert(seq, record)
            .unwrap();
        txn.commit().unwrap();
    }

    /// Rewrites the database in the previous layout (records keyed by key hash in `objects`,
    /// entries of format 2), as an earlier version left it.
    #[cfg(test)]
    pub async fn downgrade(&self) {
        self.fold_now().await;
        let txn = self.db().unwrap().begin_write().unwrap();
        {
            let mut records = txn.open_table(RECORDS).unwrap();
            let mut legacy = txn.open_table(LEGACY_OBJECTS).unwrap();
            let mut entries = txn.open_table(ENTRIES).unwrap();
            let all: Vec<([u8; 32], Vec<u8>)> = entries
                .range(..)
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (*k.value(), v.value().to_vec())
                })
                .collect();
            for (key, entry) in all {
                let seq = EntryRecord::decode(&entry).unwrap().seq;
                let record = records.remove(seq).unwrap().unwrap().value().to_vec();
                legacy.insert(&key, record.as_slice()).unwrap();
                // Format 2: the same fields without the sequence number.
                let mut old = vec![2, entry[1]];
                old.extend_from_slice(&entry[10..]);
                entries.insert(&key, old.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    /// Records in the `records` table.
    #[cfg(test)]
    pub fn record_count(&self) -> u64 {
        let txn = self.db().unwrap().begin_read().unwrap();
        ReadableTableMetadata::len(&txn.open_table(RECORDS).unwrap()).unwrap()
    }

    /// Records left in the previous layout's table.
    #[cfg(test)]
    pub fn legacy_records(&self) -> u64 {
        let txn = self.db().unwrap().begin_read().unwrap();
        ReadableTableMetadata::len(&txn.open_table(LEGACY_OBJECTS).unwrap()).unwrap()
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
    /// returns false: the journal's puts first (the newest objects), then the folded entries
    /// the journal left standing. Entries that do not decode are deleted. Returns how many
    /// were read, and whether that was all of them.
    pub fn load(
        &self,
        batch: usize,
        f: impl FnMut(Vec<(KeyHash, EntryRecord)>) -> bool,
    ) -> io::Result<(u64, bool)> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let journal = txn.open_table(JOURNAL).map_err(db_error)?;
        let entries = txn.open_table(ENTRIES).map_err(db_error)?;
        // The journal's last word on each key, and the record that says it, in this snapshot.
        let mut last: std::collections::HashMap<KeyHash, (u64, Tail), KeyHasher> =
            std::collections::HashMap::default();
        for item in journal.range(..).map_err(db_error)? {
            let (j, v) = item.map_err(db_error)?;
            if let Some((key, word, _)) = read_journal(v.value()) {
                last.insert(key, (j.value(), word));
            }
        }
        let mut batches = Batches::new(batch, f);
        for item in journal.range(..).map_err(db_error)? {
            let (j, v) = item.map_err(db_error)?;
            let Some((key, Tail::Put(_), entry)) = read_journal(v.value()) else {
                continue;
            };
            if last.get(&key).is_some_and(|&(at, _)| at == j.value())
                && let Some(e) = EntryRecord::decode(entry)
                && !batches.push(key, e)
            {
                return Ok((batches.total, false));
            }
        }
        for item in entries.range(..).map_err(db_error)? {
            let (k, v) = item.map_err(db_error)?;
            let key = KeyHash(*k.value());
            let folded = EntryRecord::peek_seq(v.value());
            if !Tail::stands(last.get(&key).map(|w| w.1), folded) {
                continue;
            }
            // An entry that does not decode goes, unless the journal has the key's copy; only
            // that copy (a fill may store a new one while the load runs).
            let Some(e) = EntryRecord::decode(v.value()) else {
                match folded {
                    Some(seq) if seq != 0 => self.delete_if(
                        key,
                        StoredCopy {
                            seq,
                            integrity: String::new(),
                        },
                    ),
                    _ => {
                        let _ = self.tx.send(Op::DropUndecodable(key));
                    }
                }
                continue;
            };
            if !batches.push(key, e) {
                return Ok((batches.total, false));
            }
        }
        Ok((batches.total, batches.finish()))
    }
}

/// Hands entries to a load's consumer in batches.
struct Batches<F> {
    size: usize,
    out: Vec<(KeyHash, EntryRecord)>,
    total: u64,
    f: F,
}

impl<F: FnMut(Vec<(KeyHash, EntryRecord)>) -> bool> Batches<F> {
    fn new(size: usize, f: F) -> Self {
        Self {
            size,
            out: Vec::with_capacity(size),
            total: 0,
            f,
        }
    }

    /// Adds one; false when the consumer wants no more.
    fn push(&mut self, key: KeyHash, e: EntryRecord) -> bool {
        self.out.push((key, e));
        self.total += 1;
        self.out.len() < self.size || self.flush()
    }

    fn flush(&mut self) -> bool {
        let batch = std::mem::replace(&mut self.out, Vec::with_capacity(self.size));
        (self.f)(batch)
    }

    /// Hands over the last batch; false when the consumer wanted no more.
    fn finish(mut self) -> bool {
        self.out.is_empty() || self.flush()
    }
}

/// The record at `seq` (0: the previous layout's, under `key`), in a read transaction.
fn read_record(
    txn: &redb::ReadTransaction,
    seq: u64,
    key: &KeyHash,
) -> io::Result<Option<Vec<u8>>> {
    let value = if seq == 0 {
        let table = txn.open_table(LEGACY_OBJECTS).map_err(db_error)?;
        table
            .get(&key.0)
            .map_err(db_error)?
            .map(|v| v.value().to_vec())
    } else {
        let table = txn.open_table(RECORDS).map_err(db_error)?;
        table
            .get(seq)
            .map_err(db_error)?
            .map(|v| v.value().to_vec())
    };
    Ok(value)
}

/// Opens (or creates) the database at `path`, with every table. One that cannot be opened
/// (damaged below redb's own crash safety) is moved aside and replaced by an empty one: its
/// objects become misses, and their content is swept as unreferenced.
fn open_database(path: &Path, cache: usize) -> io::Result<Database> {
    let db = match open_db(path, cache) {
        Ok(db) => db,
        Err(e) if damaged(&e) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(
                ".damaged-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
            ));
            let aside = PathBuf::from(aside);
            warn!(error = %e, file = %path.display(), moved_to = %aside.display(),
                "disk index is damaged; starting with an empty one (its objects are misses)");
            std::fs::rename(path, &aside)?;
            open_db(path, cache).map_err(db_error)?
        }
        Err(e) => return Err(db_error(e)),
    };
    // The tables exist from the start, so readers never meet a missing one.
    let mut txn = db.begin_write().map_err(db_error)?;
    // Every commit records the allocator state, so opening after a crash does not walk the
    // whole tree.
    txn.set_quick_repair(true);
    txn.open_table(RECORDS).map_err(db_error)?;
    txn.open_table(LEGACY_OBJECTS).map_err(db_error)?;
    txn.open_table(ENTRIES).map_err(db_error)?;
    txn.open_table(JOURNAL).map_err(db_error)?;
    txn.open_table(VARY).map_err(db_error)?;
    txn.open_table(STATE).map_err(db_error)?;
    txn.commit().map_err(db_error)?;
    Ok(db)
}

/// Reads the journal's last word on each key into `tail` (empty), before anything is served:
/// a lookup of a key the load has not reached must not find a copy the journal replaced.
/// Words found stale are taken out. Returns the sequence numbers of the next record and of
/// the next journal word.
fn read_tail(
    db: &Database,
    tail: &DashMap<KeyHash, (u64, Tail), KeyHasher>,
) -> io::Result<(u64, u64)> {
    let (stale, next_seq, next_journal) = {
        let txn = db.begin_read().map_err(db_error)?;
        let records = txn.open_table(RECORDS).map_err(db_error)?;
        let state = txn.open_table(STATE).map_err(db_error)?;
        let next_seq = records
            .last()
            .map_err(db_error)?
            .map_or(1, |(k, _)| k.value() + 1)
            .max(
                state
                    .get(NEXT_SEQ)
                    .map_err(db_error)?
                    .map_or(1, |v| v.value()),
            );
        let journal = txn.open_table(JOURNAL).map_err(db_error)?;
        let words = usize::try_from(journal.len().map_err(db_error)?).unwrap_or(0);
        // A small journal is read here; a large one a range per thread, as the disk answers
        // many reads at once far sooner than one after another. A range whose thread could
        // not be started is read here, in its turn.
        let threaded = words >= PARALLEL_OPENING_WORDS;
        let reads: Vec<io::Result<(Vec<u64>, u64)>> = std::thread::scope(|scope| {
            let readers: Vec<_> = (0..FOLD_SLICES)
                .map(|slice| {
                    let spawned = threaded.then(|| {
                        std::thread::Builder::new()
                            .name("outpost-disk-open".into())
                            .spawn_scoped(scope, move || read_tail_slice(db, slice, tail))
                    });
                    (slice, spawned)
                })
                .collect();
            // Every reader is joined before any error is returned.
            readers
                .into_iter()
                .map(|(slice, spawned)| match spawned {
                    Some(Ok(thread)) => thread
                        .join()
                        .map_err(|_| io::Error::other("disk index: a journal reader panicked"))?
                        .map_err(db_error),
                    _ => read_tail_slice(db, slice, tail).map_err(db_error),
                })
                .collect()
        });
        let mut stale = Vec::new();
        let mut next_journal = 1;
        for read in reads {
            let (slice_stale, slice_next) = read?;
            stale.extend(slice_stale);
            next_journal = next_journal.max(slice_next);
        }
        (stale, next_seq, next_journal)
    };
    if !stale.is_empty() {
        let txn = db.begin_write().map_err(db_error)?;
        {
            let mut journal = txn.open_table(JOURNAL).map_err(db_error)?;
            for j in stale {
                journal.remove(j).map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)?;
    }
    Ok((next_seq, next_journal))
}

/// Opens the database. Another instance in this process that is closing it (a restart in
/// place) holds its lock for a moment: that is waited for, up to a few seconds.
fn open_db(path: &Path, cache: usize) -> Result<Database, redb::DatabaseError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        #[cfg(test)]
        let opened = faults::open(path, cache);
        #[cfg(not(test))]
        let opened = Database::builder().set_cache_size(cache).create(path);
        match opened {
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
    /// `None` while a reopening has not succeeded (see [`Writer::reopen`]).
    db: Option<Arc<Database>>,
    /// The readers' handle on the database ([`Store`]'s).
    shared: Arc<ArcSwapOption<Database>>,
    path: PathBuf,
    cache: usize,
    /// Deletes committed, or tried, since the last durable commit.
    deletes: UnsyncedDeletes,
    /// Ops the next commit applies first: the deletes a reopening gives back.
    replay: Vec<Op>,
    /// While the database is not open: when the next attempt is due.
    reopen_at: Instant,
    /// The last attempt to open the database again.
    last_reopen: Option<Instant>,
    /// The last look at whether the database is latched.
    last_look: Instant,
    /// Times the database was closed after a failure ([`Store`]'s).
    reopens: Arc<AtomicU64>,
    last_commit: Instant,
    /// The last durable commit (or the start).
    last_sync: Instant,
    /// Commits since then, which a kill -9 would undo.
    unsynced: bool,
    /// Completions of puts whose commits wait for the next durable one.
    held: Vec<(Completion, Option<u64>)>,
    /// [`Op::Synced`] replies waiting for the next durable commit.
    waiting_sync: Vec<oneshot::Sender<bool>>,
    /// The last durable commit failed: the next is tried [`SYNC_EVERY`] later, not at the next
    /// pause.
    sync_failed: bool,
    /// [`Op::FailNext`] was seen.
    #[cfg(test)]
    fail_next: bool,
    /// The sequence number of the next new record.
    next_seq: u64,
    /// The key of the next journal record.
    next_journal: u64,
    /// The journal is folded into the entries when it holds this many records (one per key).
    journal_max: u64,
    /// The journal's length that starts the next fold: `journal_max`, or further after a fold
    /// failed (not retried after every commit).
    fold_at: u64,
    /// The range of keys the next fold takes (see [`FOLD_SLICES`]).
    next_slice: u8,
    pending: Arc<DashMap<KeyHash, (u64, Pending), KeyHasher>>,
    tail: Arc<DashMap<KeyHash, (u64, Tail), KeyHasher>>,
    commits: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

/// Deletes committed, or tried, since the last durable commit: a reopening after a failure
/// undoes those commits, so it applies them again (see [`Writer::reopen`]).
#[derive(Default)]
struct UnsyncedDeletes {
    /// At most [`REPLAY_MAX`].
    list: Vec<(KeyHash, Option<StoredCopy>)>,
    /// The keys of the unconditional deletes in `list`.
    unconditional: std::collections::HashSet<KeyHash, KeyHasher>,
    /// Deletes past [`REPLAY_MAX`].
    dropped: u64,
}

impl UnsyncedDeletes {
    fn note(&mut self, key: &KeyHash, copy: &Option<StoredCopy>) {
        // A key's unconditional delete once is enough (every request with an unsafe method
        // deletes the keys it names, mostly holding nothing).
        if copy.is_none() && self.unconditional.contains(key) {
            return;
        }
        if self.list.len() >= REPLAY_MAX {
            self.dropped += 1;
            return;
        }
        self.list.push((*key, copy.clone()));
        if copy.is_none() {
            self.unconditional.insert(*key);
        }
    }
}

/// A fold takes the journal's words on one of this many ranges of keys (by the key hash's
/// first 4 bits), in turn: it rewrites the entries' leaves of that range only, so each fold
/// makes puts wait a sixteenth as long as a fold of the whole journal would, at the same cost
/// per word (a range's words are as dense in its leaves as the journal's in the table).
const FOLD_SLICES: u8 = 16;

fn slice_of(key: &KeyHash) -> u8 {
    key.0[0] >> 4
}

/// A journal record's key: the key's range ([`slice_of`]) in the top 8 bits, then the write's
/// sequence number (these bits).
const JOURNAL_SEQ: u64 = (1 << 56) - 1;

/// This transaction's words, for its later writes, and for the tail once it has committed.
type Words = std::collections::HashMap<KeyHash, (u64, Tail), KeyHasher>;

/// The tables a commit writes.
struct Tables<'t> {
    records: redb::Table<'t, u64, &'static [u8]>,
    legacy: redb::Table<'t, &'static [u8; 32], &'static [u8]>,
    entries: redb::Table<'t, &'static [u8; 32], &'static [u8]>,
    journal: redb::Table<'t, u64, &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            records: txn.open_table(RECORDS)?,
            legacy: txn.open_table(LEGACY_OBJECTS)?,
            entries: txn.open_table(ENTRIES)?,
            journal: txn.open_table(JOURNAL)?,
        })
    }

    /// The folded entry of `key`: its record's sequence number, and the content hash of a
    /// record of the previous layout (the only kind a copy is named by it as well).
    fn folded(&self, key: &KeyHash) -> Result<Option<(u64, Option<String>)>, redb::Error> {
        let Some(v) = self.entries.get(&key.0)? else {
            return Ok(None);
        };
        Ok(match EntryRecord::peek_seq(v.value()) {
            Some(0) => EntryRecord::decode(v.value()).map(|e| (0, Some(e.integrity))),
            seq => seq.map(|seq| (seq, None)),
        })
    }

    /// Removes the record at `seq` (0: the previous layout's, under `key`).
    fn remove_record(&mut self, seq: u64, key: &KeyHash) -> Result<(), redb::Error> {
        if seq == 0 {
            self.legacy.remove(&key.0)?;
        } else {
            self.records.remove(seq)?;
        }
        Ok(())
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        loop {
            // Unsynced commits are made durable once writes pause for a GATHER, or when
            // SYNC_EVERY has passed since the last sync (only that, after a failed one).
            // Without a database (a reopening failed), the next attempt is due then. Idle, the
            // database is looked at every REOPEN_EVERY: a read that failed may have latched it.
            let due = SYNC_EVERY.saturating_sub(self.last_sync.elapsed());
            let wait = if self.db.is_none() {
                self.reopen_at.saturating_duration_since(Instant::now())
            } else if !self.unsynced {
                REOPEN_EVERY
            } else if self.sync_failed {
                due
            } else {
                due.min(GATHER)
            };
            let first = match rx.recv_timeout(wait) {
                Ok(op) => Some(op),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if self.unsynced {
                        self.commit_and_reply(Vec::new());
                    }
                    break;
                }
            };
            // A read that failed may have latched the database, with no write to find out.
            if self.db.is_some() && self.last_look.elapsed() >= REOPEN_EVERY {
                self.last_look = Instant::now();
                if self.latched() {
                    self.after_latch();
                }
            }
            if first.is_none() && self.db.is_some() && !self.unsynced {
                continue;
            }
            let mut ops = Vec::new();
            if let Some(first) = first {
                // Let a batch gather: one commit per GATHER at most while writes keep coming.
                if let Some(wait) = GATHER.checked_sub(self.last_commit.elapsed()) {
                    std::thread::sleep(wait);
                }
                ops.push(first);
                while ops.len() < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(op) => ops.push(op),
                        Err(_) => break,
                    }
                }
            }
            let (committed, closing) = self.commit_and_reply(ops);
            if !closing.is_empty() {
                drop(self);
                for done in closing {
                    let _ = done.send(());
                }
                return;
            }
            if !committed || (self.tail.len() as u64) < self.fold_at {
                continue;
            }
            // Ranges in turn until the journal is within its bound again (one usually does),
            // after the replies, and after a sync: no put waits for the folds to be counted
            // as stored.
            if !self.held.is_empty() || !self.waiting_sync.is_empty() {
                self.commit_and_reply(Vec::new());
            }
            let mut folds = 0;
            while self.tail.len() as u64 >= self.fold_at && folds < FOLD_SLICES {
                self.fold_slice();
                folds += 1;
            }
        }
    }

    /// Commits `ops` (durably if a sync is due or an op asks for one; with none, only makes
    /// the commits before durable) and replies. Returns whether the commit held, and the
    /// replies of `Close` ops.
    fn commit_and_reply(&mut self, mut ops: Vec<Op>) -> (bool, Vec<oneshot::Sender<()>>) {
        if self.db.is_none() && Instant::now() >= self.reopen_at {
            self.reopen();
        }
        // The deletes a reopening gives back go first, and are made durable at once.
        let replaying = self.db.is_some() && !self.replay.is_empty();
        if replaying {
            let mut first = std::mem::take(&mut self.replay);
            first.append(&mut ops);
            ops = first;
        }
        let durable = replaying
            || ops.is_empty()
            || ops.iter().any(Op::asks_sync)
            || self.last_sync.elapsed() >= SYNC_EVERY;
        for op in &ops {
            if let Op::Delete(key, _, copy) = op {
                self.deletes.note(key, copy);
            }
        }
        let mut applied = vec![None; ops.len()];
        let result = self.commit(&mut ops, &mut applied, durable);
        if durable {
            self.sync_failed = result.is_err();
            // Without a database, nothing was committed (a failed reopening).
            if result.is_ok() && self.db.is_some() {
                self.deletes = UnsyncedDeletes::default();
            }
        }
        if let Err(e) = &result {
            self.errors.fetch_add(1, Ordering::Relaxed);
            // Without a database, the failed reopening said so (once per attempt).
            if self.db.is_some() {
                warn!(error = %e, writes = ops.len(), durable, "disk index commit failed; those objects are not stored");
            }
        } else {
            self.commits.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = |applied: Option<u64>| match &result {
            Ok(()) => Ok(applied),
            Err(e) => Err(db_error(e)),
        };
        if durable {
            // What waited for this sync: stored if it holds; if not, they may be lost at the
            // next start (this process still sees them).
            for (done, applied) in std::mem::take(&mut self.held) {
                done.complete(outcome(applied));
            }
            for done in std::mem::take(&mut self.waiting_sync) {
                let _ = done.send(result.is_ok());
            }
        }
        let mut closing: Vec<oneshot::Sender<()>> = Vec::new();
        for (op, applied) in ops.into_iter().zip(applied) {
            match op {
                Op::Put(put, ticket, done) => {
                    self.pending.remove_if(&put.key, |_, p| p.0 == ticket);
                    // Before telling the caller: its copy of the record is then the last,
                    // freed by the thread that allocated it (cheaper than from here).
                    drop(put);
                    match done {
                        None => {}
                        Some(Reply::Wait(done)) => {
                            let _ = done.send(outcome(applied));
                        }
                        Some(Reply::Call(mut done)) => {
                            if result.is_ok() {
                                done.visible(applied);
                            }
                            if durable || result.is_err() {
                                done.complete(outcome(applied));
                            } else {
                                self.held.push((done, applied));
                            }
                        }
                    }
                }
                Op::Delete(key, ticket, _) => {
                    self.pending.remove_if(&key, |_, p| p.0 == ticket);
                }
                Op::DropUndecodable(_) | Op::ForgetVary(_) => {}
                Op::Flush(done) => {
                    let _ = done.send(result.is_ok() && self.intact());
                }
                // What came before is durable (this commit, or nothing left unsynced), or
                // failed to commit; else it waits for the next durable commit.
                Op::Synced(done) => {
                    if durable || result.is_err() || !self.unsynced {
                        let _ = done.send(result.is_ok() && self.intact());
                    } else {
                        self.waiting_sync.push(done);
                    }
                }
                #[cfg(test)]
                Op::Fold(done) => {
                    for _ in 0..FOLD_SLICES {
                        self.fold_slice();
                    }
                    let _ = done.send(());
                }
                #[cfg(test)]
                Op::FailNext => self.fail_next = true,
                #[cfg(test)]
                Op::Hold(held, release) => {
                    let _ = held.send(());
                    let _ = release.recv();
                }
                Op::Close(done) => closing.push(done),
            }
        }
        if closing.is_empty() && result.is_err() && self.latched() {
            self.after_latch();
        }
        (result.is_ok(), closing)
    }

    /// Closes the database redb latched, and opens it again now if the last attempt was
    /// [`REOPEN_EVERY`] ago, else then: a full disk lets the reopened file take a few commits
    /// (in the pages of those it lost), then fails again.
    fn after_latch(&mut self) {
        self.drop_database();
        self.reopen_at = self
            .last_reopen
            .map_or_else(Instant::now, |at| at + REOPEN_EVERY);
        if Instant::now() >= self.reopen_at {
            self.reopen();
        }
    }

    /// The database holds every write this process was told is durable, and nothing waits to
    /// be applied again: a reply that says so may say yes.
    fn intact(&self) -> bool {
        self.db.is_some() && self.replay.is_empty()
    }

    /// Closes the database after redb latched a failure (see [`Writer::reopen`]): the commits
    /// since the last durable one are lost; the puts waiting for it are told they failed.
    fn drop_database(&mut self) {
        self.shared.store(None);
        self.db = None;
        self.reopens.fetch_add(1, Ordering::AcqRel);
        for (done, _) in std::mem::take(&mut self.held) {
            done.complete(Err(db_error(
                "the index failed before this object was synced",
            )));
        }
        for done in std::mem::take(&mut self.waiting_sync) {
            let _ = done.send(false);
        }
        self.unsynced = false;
        self.tail.clear();
    }

    /// The database fails every operation: redb latches an I/O error (a full disk, a failed
    /// write or sync, a failed read) until it is opened again.
    fn latched(&self) -> bool {
        self.db.as_ref().is_some_and(|db| db.begin_write().is_err())
    }

    /// Opens the database again after a failure that redb latches ([`Writer::latched`]):
    /// without it, a disk that was full or failing for a moment would end the disk tier until
    /// a restart. The file holds what its last durable commit held; the commits since, which
    /// this process saw, are gone, as a kill -9 would leave them:
    /// - the puts waiting for a durable commit are told they failed (none counted as stored
    ///   yet), and the tier drops the copies it indexed; a put told only that it was visible
    ///   (a 304's metadata update) is lost as after a kill -9 (the restart revalidates);
    /// - their deletes are applied again, first thing ([`Writer::replay`]);
    /// - record and journal numbers go on from where this process was, never back: its
    ///   copies still name the lost ones.
    ///
    /// Readers find no database meanwhile (what needs the index is a miss). At most one attempt
    /// per [`REOPEN_EVERY`]: if the file cannot be opened, or fails again at once (a full disk
    /// lets the reopened file take a few commits, in the pages of those it lost), the writer
    /// fails every write until the next attempt. A file found damaged is moved aside as at the
    /// opening (see [`open_database`]): every object this process indexed is then a miss at its
    /// next lookup.
    fn reopen(&mut self) {
        self.last_reopen = Some(Instant::now());
        let opened = open_database(&self.path, self.cache)
            .and_then(|db| read_tail(&db, &self.tail).map(|next| (db, next)));
        let (db, (next_seq, next_journal)) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                self.tail.clear();
                self.reopen_at = Instant::now() + REOPEN_EVERY;
                warn!(error = %e, retry_in = ?REOPEN_EVERY,
                    "disk index failed and could not be opened again; the disk tier stores nothing and finds nothing until it is");
                return;
            }
        };
        self.next_seq = self.next_seq.max(next_seq);
        self.next_journal = self.next_journal.max(next_journal);
        self.fold_at = self.journal_max;
        self.sync_failed = false;
        self.last_sync = Instant::now();
        let db = Arc::new(db);
        self.db = Some(Arc::clone(&db));
        self.shared.store(Some(db));
        let deletes = std::mem::take(&mut self.deletes);
        if deletes.dropped > 0 {
            warn!(
                lost = deletes.dropped,
                "disk index: deletes beyond the replay bound are lost; those objects may be back after a restart (purges are not: the purge log covers them)"
            );
        }
        self.replay = deletes
            .list
            .into_iter()
            .map(|(key, copy)| Op::Delete(key, 0, copy))
            .collect();
        // The loop commits them without waiting for a new write.
        self.unsynced = !self.replay.is_empty();
        warn!(
            deletes = self.replay.len(),
            "disk index failed and was opened again; objects stored since its last sync are misses"
        );
    }

    /// A write transaction: synced at its commit, with the allocator's state saved so that
    /// opening after a crash needs no full repair, or left to the next synced one.
    fn begin_write(&self, durable: bool) -> Result<redb::WriteTransaction, redb::Error> {
        let mut txn = self
            .db
            .as_ref()
            .ok_or(redb::Error::DatabaseClosed)?
            .begin_write()?;
        let durability = if durable {
            txn.set_quick_repair(true);
            Durability::Immediate
        } else {
            Durability::None
        };
        txn.set_durability(durability)
            .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
        Ok(txn)
    }

    /// The journal's last word on `key`: this transaction's, else the committed one's.
    fn word(&self, txn_words: &Words, key: &KeyHash) -> Option<Tail> {
        self.word_at(txn_words, key).map(|w| w.1)
    }

    /// [`Writer::word`], with its key in the journal.
    fn word_at(&self, txn_words: &Words, key: &KeyHash) -> Option<(u64, Tail)> {
        txn_words
            .get(key)
            .copied()
            .or_else(|| self.tail.get(key).map(|w| *w))
    }

    /// Journals `word` on `key` (its record: `record`), in place of the key's earlier one.
    fn journal(
        &self,
        t: &mut Tables<'_>,
        txn_words: &mut Words,
        next_journal: &mut u64,
        key: KeyHash,
        record: &[u8],
        word: Tail,
    ) -> Result<(), redb::Error> {
        if let Some((earlier, _)) = self.word_at(txn_words, &key) {
            t.journal.remove(earlier)?;
        }
        // Keyed by the key's range first: a fold takes its words from one stretch of the
        // journal's leaves, not from all of them.
        let at = (u64::from(slice_of(&key)) << 56) | (*next_journal & JOURNAL_SEQ);
        t.journal.insert(at, record)?;
        txn_words.insert(key, (at, word));
        *next_journal += 1;
        Ok(())
    }

    /// The copy `key` holds (see [`Tables::folded`]): the journal's, else the folded entry's.
    fn current(
        &self,
        t: &Tables<'_>,
        txn_words: &Words,
        key: &KeyHash,
    ) -> Result<Option<(u64, Option<String>)>, redb::Error> {
        let word = self.word(txn_words, key);
        Ok(match word {
            Some(Tail::Put(seq)) => Some((seq, None)),
            Some(Tail::Gone) => None,
            _ => t
                .folded(key)?
                .filter(|(seq, _)| Tail::stands(word, Some(*seq))),
        })
    }

    /// Commits `ops` in one transaction; `applied[i]` is the sequence number of put `i`'s
    /// record, `None` for a conditional op whose condition did not hold. Each write adds a
    /// record to the journal, keyed in order; the entries, keyed by key hash, are brought up
    /// to date by [`Writer::fold_slice`].
    fn commit(
        &mut self,
        ops: &mut [Op],
        applied: &mut [Option<u64>],
        durable: bool,
    ) -> Result<(), redb::Error> {
        let writes = ops.iter().any(Op::is_write);
        if !(writes || durable && self.unsynced) {
            return Ok(());
        }
        #[cfg(test)]
        if writes && std::mem::take(&mut self.fail_next) {
            return Err(redb::Error::Corrupted(
                "a failure the test asked for".into(),
            ));
        }
        if durable {
            // Tried again after SYNC_EVERY if it fails, not at once.
            self.last_sync = Instant::now();
        }
        let txn = self.begin_write(durable)?;
        let mut words = Words::default();
        let mut next_journal = self.next_journal;
        {
            let mut t = Tables::open(&txn)?;
            let mut vary = txn.open_table(VARY)?;
            let mut state = txn.open_table(STATE)?;
            let mut max_seq = state.get(MAX_PURGE_SEQ)?.map_or(0, |v| v.value());
            let seq_before = max_seq;
            let mut next = self.next_seq;
            for (op, applied) in ops.iter_mut().zip(applied.iter_mut()) {
                match op {
                    Op::Put(put, _, _) => {
                        // A journal the folds cannot bring down (they keep failing) takes no
                        // more objects rather than grow without bound: their puts fail.
                        if (self.tail.len() + words.len()) as u64
                            >= 2 * self.journal_max + BATCH_MAX as u64
                        {
                            continue;
                        }
                        // The copy it replaces, when the journal names it (no lookup): its
                        // record goes now. One in the folded entries goes with the fold.
                        let replaced = match self.word(&words, &put.key) {
                            Some(Tail::Put(seq)) => Some(seq),
                            _ => None,
                        };
                        let seq = match &put.expect {
                            // A metadata update: onto the copy it was made for (this
                            // transaction's earlier writes included), in place; a record of
                            // the previous layout moves to `records`.
                            Some(expect) => match self.current(&t, &words, &put.key)? {
                                Some((seq, integrity)) if expect.is(seq, integrity.as_deref()) => {
                                    if seq == 0 {
                                        t.remove_record(0, &put.key)?;
                                        next += 1;
                                        next - 1
                                    } else {
                                        seq
                                    }
                                }
                                _ => continue,
                            },
                            None => {
                                next += 1;
                                next - 1
                            }
                        };
                        t.records.insert(seq, &*put.record)?;
                        if let Some(old) = replaced.filter(|&old| old != seq) {
                            t.remove_record(old, &put.key)?;
                        }
                        put.entry.seq = seq;
                        let record = put.entry.journal_put(&put.key);
                        self.journal(
                            &mut t,
                            &mut words,
                            &mut next_journal,
                            put.key,
                            &record,
                            Tail::Put(seq),
                        )?;
                        if let Some((primary, names)) = &put.vary {
                            vary.insert(&primary.0, names.as_str())?;
                        }
                        max_seq = max_seq.max(put.entry.purge_seq);
                        *applied = Some(seq);
                    }
                    Op::Delete(key, _, expect) => {
                        let word = match (&*expect, self.word(&words, key)) {
                            // An eviction of a key the journal does not name: its record goes
                            // now, and the folded entry with the fold if it is still that
                            // copy's (a record replaced in the entries went when it was).
                            (Some(copy), None) if copy.seq != 0 => {
                                t.records.remove(copy.seq)?;
                                Tail::GoneIf(copy.seq)
                            }
                            _ => {
                                let cur = self.current(&t, &words, key)?;
                                if let Some(copy) = &*expect
                                    && !cur.as_ref().is_some_and(|(seq, integrity)| {
                                        copy.is(*seq, integrity.as_deref())
                                    })
                                {
                                    continue;
                                }
                                match cur {
                                    Some((seq, _)) => t.remove_record(seq, key)?,
                                    // A key that holds nothing keeps the word it has: a Gone
                                    // would change nothing, and every request with an unsafe
                                    // method deletes the keys it names, mostly not stored. An
                                    // entry that does not decode is not nothing: the fold takes
                                    // it out on a Gone.
                                    None if self.word(&words, key).is_some()
                                        || t.entries.get(&key.0)?.is_none() =>
                                    {
                                        continue;
                                    }
                                    None => {}
                                }
                                Tail::Gone
                            }
                        };
                        let only = match word {
                            Tail::GoneIf(seq) => Some(seq),
                            _ => None,
                        };
                        let record = journal_gone(key, only);
                        self.journal(&mut t, &mut words, &mut next_journal, *key, &record, word)?;
                    }
                    Op::DropUndecodable(key) => {
                        // Not if a copy was stored since the load read it: journaled, or
                        // folded into the entry by now.
                        let nothing_to_drop = t
                            .entries
                            .get(&key.0)?
                            .is_none_or(|v| EntryRecord::decode(v.value()).is_some());
                        if self.word(&words, key).is_some() || nothing_to_drop {
                            continue;
                        }
                        // A record of the previous layout goes with its entry; one in
                        // `records`, whose number the entry no longer gives, stays.
                        t.legacy.remove(&key.0)?;
                        let record = journal_gone(key, None);
                        self.journal(
                            &mut t,
                            &mut words,
                            &mut next_journal,
                            *key,
                            &record,
                            Tail::Gone,
                        )?;
                    }
                    Op::ForgetVary(primaries) => {
                        for primary in primaries.iter() {
                            vary.remove(&primary.0)?;
                        }
                    }
                    _ => {}
                }
            }
            if max_seq != seq_before {
                state.insert(MAX_PURGE_SEQ, max_seq)?;
            }
            if next != self.next_seq {
                state.insert(NEXT_SEQ, next)?;
            }
            self.next_seq = next;
        }
        // Numbers handed out stay handed out if the commit fails (part of it may have reached
        // the file); a write that failed before it returned aborts the transaction unwritten.
        self.next_journal = next_journal;
        txn.commit()?;
        self.unsynced = !durable;
        self.last_commit = Instant::now();
        for (key, word) in words {
            self.tail.insert(key, word);
        }
        Ok(())
    }

    /// Folds the journal's words on the next range of keys (see [`FOLD_SLICES`]) into the
    /// entries, in one transaction, and takes them out of the journal. Keys whose entries are
    /// rewritten together share the tree's pages, so this costs far less per object than an
    /// entry written with each put (numbers in the module docs). Puts wait meanwhile; reads do
    /// not.
    fn fold_slice(&mut self) {
        let slice = self.next_slice;
        self.next_slice = (slice + 1) % FOLD_SLICES;
        let t0 = Instant::now();
        // Made durable with the next sync, as puts are.
        let result = (|| -> Result<Vec<(KeyHash, u64)>, redb::Error> {
            let txn = self.begin_write(false)?;
            let folded = fold(&txn, slice, &self.tail)?;
            txn.commit()?;
            Ok(folded)
        })();
        match result {
            Ok(folded) => {
                self.unsynced = true;
                // Those words are in the entries now: lookups read them there.
                for (key, j) in &folded {
                    self.tail.remove_if(key, |_, w| w.0 == *j);
                }
                self.fold_at = self.journal_max;
                self.last_commit = Instant::now();
                debug!(
                    words = folded.len(),
                    millis = t0.elapsed().as_millis(),
                    "disk index journal folded"
                );
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let journal = self.tail.len() as u64;
                self.fold_at = journal + self.journal_max / 8;
                warn!(error = %e, journal, "disk index journal fold failed; it is tried again after more writes");
            }
        }
    }
}

/// Takes the journal's words on the keys of `slice` out of it, in one sweep of its stretch of
/// the journal, and applies them to the entries in key order, in the transaction `txn`.
/// Returns the words applied (key, journal key). Taken out one by one in key order, the words
/// cost three times as much: each removal rebuilt a leaf and its path, most leaves many times
/// over.
/// `tail`: the journal's words as the writer holds them, to tell whose a damaged word is.
fn fold(
    txn: &redb::WriteTransaction,
    slice: u8,
    tail: &DashMap<KeyHash, (u64, Tail), KeyHasher>,
) -> Result<Vec<(KeyHash, u64)>, redb::Error> {
    let mut t = Tables::open(txn)?;
    let start = u64::from(slice) << 56;
    let mut taken = Vec::new();
    for word in t
        .journal
        .extract_if(start..=start | JOURNAL_SEQ, |_, _| true)?
    {
        let (j, data) = word?;
        taken.push((j.value(), data.value().to_vec()));
    }
    let mut words: Vec<(KeyHash, u64, Tail, &[u8])> = Vec::with_capacity(taken.len());
    for (j, data) in &taken {
        if let Some((key, word, entry)) = read_journal(data) {
            words.push((key, *j, word, entry));
            continue;
        }
        // A word that does not decode (damaged below redb's checksums): its key, as the
        // writer knows it, holds nothing, rather than a copy the word may have replaced; the
        // copy the word named goes too. Whose it is, is looked up only then.
        let Some((key, word)) = tail
            .iter()
            .find(|w| w.value().0 == *j)
            .map(|w| (*w.key(), w.value().1))
        else {
            continue;
        };
        if let Tail::Put(seq) = word {
            t.records.remove(seq)?;
        }
        words.push((key, *j, Tail::Gone, &[]));
    }
    // One word per key; stable, so journal order would stand if ever there were more.
    words.sort_by_key(|w| w.0);
    for &(key, _, word, entry) in &words {
        let replaced = match word {
            Tail::Put(_) => t.entries.insert(&key.0, entry)?,
            Tail::Gone => t.entries.remove(&key.0)?,
            Tail::GoneIf(_) => {
                if !Tail::stands(Some(word), t.folded(&key)?.map(|(seq, _)| seq)) {
                    t.entries.remove(&key.0)?;
                }
                continue;
            }
        }
        .and_then(|old| EntryRecord::peek_seq(old.value()));
        // The copy the entry named until now, unless it is the new one (a metadata update):
        // its record went already if the journal had named it; else it goes now.
        if let Some(old) = replaced.filter(|&old| Tail::Put(old) != word) {
            t.remove_record(old, &key)?;
        }
    }
    Ok(words.into_iter().map(|(key, j, ..)| (key, j)).collect())
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

/// Disk failures for tests: a database opened at a path registered here reads and writes its
/// file through a backend that fails every write, resize and sync while its `writes` switch is
/// on, as a full or failing disk does, and every read while its `reads` switch is on.
#[cfg(test)]
pub(crate) mod faults {
    use std::ops::Bound;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use redb::backends::FileBackend;
    use redb::{BackendError, Database, StorageBackend};

    /// What fails, while on.
    #[derive(Debug, Default)]
    pub struct Switches {
        pub writes: AtomicBool,
        pub reads: AtomicBool,
        /// Reads by the tier's start-up load only (a damaged page only it reads).
        pub load_reads: AtomicBool,
    }

    static FAILING: Mutex<Vec<(PathBuf, Arc<Switches>)>> = Mutex::new(Vec::new());

    /// The switches of the database file at `path` (off at first).
    pub fn switch(path: &Path) -> Arc<Switches> {
        let mut failing = FAILING.lock().unwrap();
        if let Some((_, on)) = failing.iter().find(|(p, _)| p == path) {
            return Arc::clone(on);
        }
        let on = Arc::new(Switches::default());
        failing.push((path.to_path_buf(), Arc::clone(&on)));
        on
    }

    pub(super) fn open(path: &Path, cache: usize) -> Result<Database, redb::DatabaseError> {
        let on = FAILING
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, on)| Arc::clone(on));
        let builder = {
            let mut b = Database::builder();
            b.set_cache_size(cache);
            b
        };
        let Some(on) = on else {
            return builder.create(path);
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        builder.create_with_backend(Failing {
            inner: FileBackend::new(file),
            on,
        })
    }

    #[derive(Debug)]
    struct Failing {
        inner: FileBackend,
        on: Arc<Switches>,
    }

    impl Failing {
        fn check(&self) -> Result<(), BackendError> {
            if self.on.writes.load(Ordering::Acquire) {
                return Err(BackendError::Io(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left on device (a test's failure)",
                )));
            }
            Ok(())
        }
    }

    impl StorageBackend for Failing {
        fn len(&self) -> Result<u64, BackendError> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
            let loading = || std::thread::current().name() == Some("outpost-disk-load");
            if self.on.reads.load(Ordering::Acquire)
                || self.on.load_reads.load(Ordering::Acquire) && loading()
            {
                return Err(BackendError::Io(std::io::Error::other(
                    "input/output error (a test's failure)",
                )));
            }
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), BackendError> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), BackendError> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
            self.check()?;
            self.inner.write(offset, data)
        }
        fn close(&self) -> Result<(), BackendError> {
            self.inner.close()
        }
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), BackendError> {
            self.inner.lock_shared_range(start, end)
        }
        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(start, end)
        }
        fn query_lock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.query_lock_range(start, end)
        }
    }
}
