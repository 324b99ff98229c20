//! The store against a model: puts, metadata updates, removals and evictions (conditional
//! removals, some naming copies long replaced), in group commits, across journal folds,
//! reopenings and crashes. Every key reads as the model says, the load finds exactly the
//! model's objects, and after a fold no record is left of a copy that went. A crash (the file
//! as a kill -9 leaves it) loses at most the writes not yet told done, and only whole commits
//! from the end: what it leaves is the model after some of the writes, in order.

use std::collections::BTreeMap;
use std::sync::mpsc as std_mpsc;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Step {
    /// A new copy of key `k`.
    Put(u8),
    /// A metadata update of the `age`-th latest copy of `k` the test has seen committed.
    Update(u8, u8),
    /// An unconditional removal of `k`.
    Delete(u8),
    /// An eviction of the `age`-th latest copy of `k` seen committed.
    Evict(u8, u8),
    /// Wait for the commits and check.
    Check,
    Fold,
    Reopen,
    /// Copy the file as a kill -9 would leave it, and go on with the copy.
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..6).prop_map(Step::Put),
        2 => (0u8..6, 0u8..3).prop_map(|(k, a)| Step::Update(k, a)),
        1 => (0u8..6).prop_map(Step::Delete),
        3 => (0u8..6, 0u8..3).prop_map(|(k, a)| Step::Evict(k, a)),
        3 => Just(Step::Check),
        1 => Just(Step::Fold),
        1 => Just(Step::Reopen),
        1 => Just(Step::Crash),
    ]
}

fn key(k: u8) -> KeyHash {
    KeyHash::of(&format!("example.test/{k}"))
}

fn put(k: u8, record: &str, expect: Option<StoredCopy>) -> Put {
    Put {
        key: key(k),
        expect,
        record: Bytes::from(record.to_string()),
        entry: EntryRecord {
            seq: 0,
            inline: true,
            size: record.len() as u64,
            purge_seq: 0,
            integrity: "sha256-AAAA".into(),
            key_text: format!("example.test/{k}"),
            vary: String::new(),
        },
        vary: None,
    }
}

/// Writes `bytes` as key `k`'s folded entry, as damage would.
fn overwrite_entry(store: &Store, k: u8, bytes: &[u8]) {
    let txn = store.db().unwrap().begin_write().unwrap();
    txn.open_table(ENTRIES)
        .unwrap()
        .insert(&key(k).0, bytes)
        .unwrap();
    txn.commit().unwrap();
}

fn copy(seq: u64) -> StoredCopy {
    StoredCopy {
        seq,
        integrity: "sha256-AAAA".into(),
    }
}

/// Journal records kept before a fold: a few, so that the steps fold often.
const JOURNAL_MAX: u64 = 3;

enum Queued {
    /// Key, record, the copy it updates, and its outcome.
    Put(u8, String, Option<u64>, Outcome),
    Delete(u8),
    /// Key, and the copy evicted.
    Evict(u8, u64),
}

/// Where a put's outcome arrives (once its commit is durable), and the outcome once seen.
struct Outcome(std_mpsc::Receiver<PutResult>, Option<PutResult>);

impl Outcome {
    /// The put was told done.
    fn arrived(&mut self) -> bool {
        if self.1.is_none() {
            self.1 = self.0.try_recv().ok();
        }
        self.1.is_some()
    }

    fn wait(self) -> PutResult {
        match self.1 {
            Some(r) => r,
            None => self.0.recv().unwrap(),
        }
    }
}

/// What the store should hold: per key, its copy's sequence number and record.
type Model = BTreeMap<u8, (u64, String)>;

struct Run {
    dir: tempfile::TempDir,
    store: Store,
    model: Model,
    /// Per key, the sequence numbers of its copies seen committed, latest last.
    seen: BTreeMap<u8, Vec<u64>>,
    /// Writes queued since the last check, in order (they commit in that order, often several
    /// in one transaction).
    queued: Vec<Queued>,
    writes: u64,
}

impl Run {
    fn open(dir: &Path) -> Store {
        Store::open(dir, 1 << 20, JOURNAL_MAX).unwrap()
    }

    fn copy_of(&self, k: u8, age: u8) -> Option<u64> {
        let seen = self.seen.get(&k)?;
        seen.iter().rev().nth(usize::from(age)).copied()
    }

    fn queue(&mut self, k: u8, expect: Option<u64>) {
        self.writes += 1;
        let record = format!("{k}-{}", self.writes);
        let (tx, rx) = std_mpsc::channel();
        self.store.put_then(
            put(k, &record, expect.map(copy)),
            Completion::new(drop, move |r| {
                let _ = tx.send(r);
            }),
        );
        self.queued
            .push(Queued::Put(k, record, expect, Outcome(rx, None)));
    }

    async fn apply(&mut self, step: Step) {
        match step {
            Step::Put(k) => self.queue(k, None),
            Step::Update(k, age) => {
                if let Some(seq) = self.copy_of(k, age) {
                    self.queue(k, Some(seq));
                }
            }
            Step::Delete(k) => {
                self.store.delete(key(k));
                self.queued.push(Queued::Delete(k));
            }
            Step::Evict(k, age) => {
                if let Some(seq) = self.copy_of(k, age) {
                    self.store.delete_if(key(k), copy(seq));
                    self.queued.push(Queued::Evict(k, seq));
                }
            }
            Step::Check => {
                self.settle().await;
                self.store.flush().await;
                self.check();
                // Folded after each commit until it is within its bound again. The flush's own
                // commit may start folds (a store reopened after a crash can begin over its
                // bound): a second flush waits for them.
                self.store.flush().await;
                assert!(
                    self.store.tail.len() < JOURNAL_MAX as usize,
                    "the journal outgrew its bound"
                );
            }
            Step::Fold => {
                self.settle().await;
                self.store.fold_now().await;
                self.check();
                let live = self.model.len() as u64;
                assert_eq!(self.store.record_count(), live, "records left after a fold");
            }
            Step::Reopen => {
                self.settle().await;
                self.store.close().await;
                self.store = Self::open(self.dir.path());
                self.check();
                self.check_load();
            }
            Step::Crash => self.crash().await,
        }
    }

    /// Takes the file as a kill -9 leaves it, with the writes queued since the last check
    /// committed but not all of them durable, and goes on with that copy. It must hold the
    /// model after some of those writes, in order, and at least after every one already told
    /// done.
    async fn crash(&mut self) {
        let release = self.store.hold().await;
        let told = self
            .queued
            .iter_mut()
            .rposition(|q| match q {
                Queued::Put(.., outcome) => outcome.arrived(),
                _ => false,
            })
            .map_or(0, |i| i + 1);
        let killed = tempfile::tempdir().unwrap();
        std::fs::copy(
            self.dir.path().join("index.redb"),
            killed.path().join("index.redb"),
        )
        .unwrap();
        drop(release);
        let states = self.settle().await;
        self.store.close().await;
        self.dir = killed;
        self.store = Self::open(self.dir.path());
        let left: Model = (0..6)
            .filter_map(|k| {
                let (seq, record) = self.store.get(&key(k)).unwrap()?;
                Some((k, (seq, String::from_utf8(record).unwrap())))
            })
            .collect();
        let after = states.iter().rposition(|state| *state == left);
        assert!(
            after.is_some_and(|n| n >= told),
            "after a crash the store holds {left:?}: not the model after {told} or more of the \
             writes queued ({states:?})"
        );
        self.model = left;
        // Copies seen before are named by nothing after a restart (their numbers may come
        // again): updates and evictions name those the store holds now.
        self.seen = self
            .model
            .iter()
            .map(|(k, (seq, _))| (*k, vec![*seq]))
            .collect();
        self.check_load();
    }

    /// Waits for the queued writes and brings the model up to date with each, in queue order
    /// (the order they commit in). Returns the model before them and after each of them.
    async fn settle(&mut self) -> Vec<Model> {
        let mut states = vec![self.model.clone()];
        if self.queued.is_empty() {
            return states;
        }
        self.store.flush().await;
        for queued in std::mem::take(&mut self.queued) {
            self.apply_queued(queued);
            states.push(self.model.clone());
        }
        states
    }

    /// Brings the model up to date with one committed write.
    fn apply_queued(&mut self, queued: Queued) {
        let (k, record, expect, outcome) = match queued {
            Queued::Put(k, record, expect, outcome) => (k, record, expect, outcome),
            Queued::Delete(k) => {
                self.model.remove(&k);
                return;
            }
            Queued::Evict(k, seq) => {
                if self.model.get(&k).is_some_and(|(cur, _)| *cur == seq) {
                    self.model.remove(&k);
                }
                return;
            }
        };
        let outcome = outcome.wait().unwrap();
        let holds = self.model.get(&k).map(|(seq, _)| *seq);
        match expect {
            None => {
                let seq = outcome.expect("an unconditional put applies");
                self.seen.entry(k).or_default().push(seq);
                self.model.insert(k, (seq, record));
            }
            Some(want) if holds == Some(want) => {
                assert_eq!(outcome, Some(want), "an update applies in place");
                self.model.insert(k, (want, record));
            }
            Some(_) => assert_eq!(outcome, None, "an update of a copy gone applies"),
        }
    }

    fn check(&self) {
        for k in 0..6 {
            let got = self.store.get(&key(k)).unwrap();
            let want = self
                .model
                .get(&k)
                .map(|(seq, r)| (*seq, r.as_bytes().to_vec()));
            assert_eq!(got, want, "key {k}");
        }
    }

    fn check_load(&self) {
        let mut found = BTreeMap::new();
        let (n, complete) = self
            .store
            .load(2, |batch| {
                for (key, e) in batch {
                    assert!(found.insert(key, e.seq).is_none(), "loaded twice");
                }
                true
            })
            .unwrap();
        assert!(complete);
        assert_eq!(n, found.len() as u64);
        let want: BTreeMap<KeyHash, u64> = self
            .model
            .iter()
            .map(|(k, (seq, _))| (key(*k), *seq))
            .collect();
        assert_eq!(found, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn the_store_holds_what_its_writes_say(steps in prop::collection::vec(step(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = Run::open(dir.path());
            let mut run = Run {
                dir,
                store,
                model: Model::new(),
                seen: BTreeMap::new(),
                queued: Vec::new(),
                writes: 0,
            };
            for step in steps {
                run.apply(step).await;
            }
            run.apply(Step::Fold).await;
            run.apply(Step::Reopen).await;
        });
    }
}

/// A journal holding more than one word on a key (as the first version of the journal kept
/// them) is read as its last word, and the earlier ones are taken out at the opening: left
/// behind by the key's fold, they would be its word after the next restart.
#[tokio::test]
async fn earlier_words_on_a_key_are_dropped_at_the_opening() {
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    let first = store.put(put(1, "one", None)).await.unwrap().unwrap();
    let second = store.put(put(1, "two", None)).await.unwrap().unwrap();
    store.close().await;
    {
        let db = Database::open(dir.path().join("index.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut journal = txn.open_table(JOURNAL).unwrap();
            let mut entry = put(1, "one", None).entry;
            entry.seq = first;
            journal
                .insert(0, entry.journal_put(&key(1)).as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Run::open(dir.path());
    assert_eq!(
        store.tail.get(&key(1)).map(|w| w.1),
        Some(Tail::Put(second))
    );
    assert_eq!(store.get(&key(1)).unwrap(), Some((second, b"two".to_vec())));
    let txn = store.db().unwrap().begin_read().unwrap();
    let journal = txn.open_table(JOURNAL).unwrap();
    assert_eq!(
        ReadableTableMetadata::len(&journal).unwrap(),
        1,
        "one word per key"
    );
    assert!(journal.get(0).unwrap().is_none(), "the earlier word went");
}

/// The opening reads the journal's ranges at once, a thread each: a key's latest word wins
/// whichever range holds it and whichever reader comes first. No upgrade leaves this layout
/// (words on the first range, from a version that keyed the journal by write order alone, are
/// older than those on a key's own range): it pins that the outcome does not rest on the
/// order in which ranges are read. The loop before read them in key order and kept the last.
#[tokio::test]
async fn the_latest_word_on_a_key_wins_whatever_range_holds_it() {
    let k = (1..=u8::MAX)
        .find(|k| slice_of(&key(*k)) != 0)
        .expect("a key off the first range");
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    let first = store.put(put(k, "one", None)).await.unwrap().unwrap();
    let second = store.put(put(k, "two", None)).await.unwrap().unwrap();
    store.close().await;
    {
        let db = Database::open(dir.path().join("index.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut journal = txn.open_table(JOURNAL).unwrap();
            let words: Vec<(u64, Vec<u8>)> = journal
                .iter()
                .unwrap()
                .map(|w| {
                    let (j, v) = w.unwrap();
                    (j.value(), v.value().to_vec())
                })
                .collect();
            let [(latest, word)] = &words[..] else {
                panic!("one word per key: {words:?}")
            };
            // The latest word moves to the first range, as write order alone keys it; the
            // earlier one goes back on the key's own range, just below it.
            let seq = latest & JOURNAL_SEQ;
            journal.remove(*latest).unwrap();
            journal.insert(seq, word.as_slice()).unwrap();
            let mut entry = put(k, "one", None).entry;
            entry.seq = first;
            let own = (u64::from(slice_of(&key(k))) << 56) | (seq - 1);
            journal
                .insert(own, entry.journal_put(&key(k)).as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Run::open(dir.path());
    assert_eq!(
        store.tail.get(&key(k)).map(|w| w.1),
        Some(Tail::Put(second))
    );
    assert_eq!(store.get(&key(k)).unwrap(), Some((second, b"two".to_vec())));
    let txn = store.db().unwrap().begin_read().unwrap();
    let journal = txn.open_table(JOURNAL).unwrap();
    assert_eq!(
        ReadableTableMetadata::len(&journal).unwrap(),
        1,
        "one word per key"
    );
}

/// An entry that does not decode is removed by the load, unless the journal has the key's
/// copy: that one is loaded and kept. Before, the damaged entry's removal (unconditional)
/// took the journal's copy with it.
#[tokio::test]
async fn a_damaged_entry_does_not_take_the_journals_copy_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    store.put(put(1, "one", None)).await.unwrap().unwrap();
    store.fold_now().await;
    let second = store.put(put(1, "two", None)).await.unwrap().unwrap();
    overwrite_entry(&store, 1, b"damaged");
    let mut found = Vec::new();
    store
        .load(16, |batch| {
            found.extend(batch.into_iter().map(|(k, e)| (k, e.seq)));
            true
        })
        .unwrap();
    assert_eq!(found, vec![(key(1), second)]);
    store.flush().await;
    assert_eq!(store.get(&key(1)).unwrap(), Some((second, b"two".to_vec())));
}

/// A damaged entry the load removes takes only its own copy: a new copy of the key, queued
/// before the load reached the entry, stays.
#[tokio::test]
async fn a_damaged_entry_takes_only_its_own_copy() {
    // Its version and sequence number are readable; the rest is cut off.
    a_new_copy_outlives_the_loads_removal_of(|first| {
        let mut damaged = vec![3, 1];
        damaged.extend_from_slice(&first.to_le_bytes());
        damaged
    })
    .await;
}

/// Stores key 1, folds it, damages its entry with `damage(its sequence number)`, then queues a
/// new copy of key 1 before the load reaches the entry: the new copy stays.
async fn a_new_copy_outlives_the_loads_removal_of(damage: impl FnOnce(u64) -> Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    let first = store.put(put(1, "one", None)).await.unwrap().unwrap();
    store.fold_now().await;
    overwrite_entry(&store, 1, &damage(first));
    let release = store.hold().await;
    let (visible_tx, visible) = std_mpsc::channel();
    store.put_then(
        put(1, "two", None),
        Completion::new(
            move |applied| {
                let _ = visible_tx.send(applied);
            },
            |_| {},
        ),
    );
    store.load(16, |_| true).unwrap();
    drop(release);
    let second = visible.recv().unwrap().expect("applied");
    store.flush().await;
    assert_eq!(store.get(&key(1)).unwrap(), Some((second, b"two".to_vec())));
}

/// A put is told it is done (its object counts as stored) only once its commit is durable: a
/// copy of the database file taken right then, as a kill -9 leaves it (the page cache outlives
/// the process), holds it. Before that, at its commit, it is visible to this process.
#[tokio::test]
async fn a_put_is_done_only_once_its_commit_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    for k in 0..12u8 {
        let record = format!("r{k}");
        let (visible_tx, visible) = std_mpsc::channel();
        let (done_tx, done) = std_mpsc::channel();
        store.put_then(
            put(k, &record, None),
            Completion::new(
                move |applied| {
                    let _ = visible_tx.send(applied);
                },
                move |r| {
                    let _ = done_tx.send(r);
                },
            ),
        );
        let seq = visible
            .recv()
            .unwrap()
            .expect("an unconditional put applies");
        assert_eq!(store.get(&key(k)).unwrap().map(|r| r.0), Some(seq));
        assert_eq!(done.recv().unwrap().unwrap(), Some(seq));
        let killed = tempfile::tempdir().unwrap();
        std::fs::copy(
            dir.path().join("index.redb"),
            killed.path().join("index.redb"),
        )
        .unwrap();
        let reopened = Run::open(killed.path());
        assert_eq!(
            reopened.get(&key(k)).unwrap(),
            Some((seq, record.into_bytes())),
            "put {k}, told it was done, is not in the file"
        );
        reopened.close().await;
    }
}

/// A journal word that does not decode is folded as its key's removal, and the copy it named
/// goes with it: the key is found from the writer's tail, not from the damaged bytes (damage
/// there must not remove another key's entry).
#[tokio::test]
async fn a_damaged_journal_word_leaves_its_key_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    let other = store.put(put(2, "two", None)).await.unwrap().unwrap();
    store.fold_now().await;
    let first = store.put(put(1, "one", None)).await.unwrap().unwrap();
    store.fold_now().await;
    let seq = store.put(put(1, "uno", None)).await.unwrap().unwrap();
    let (j, _) = *store.tail.get(&key(1)).unwrap();
    {
        let txn = store.db().unwrap().begin_write().unwrap();
        let mut damaged = key(2).0.to_vec();
        damaged.push(0xff);
        txn.open_table(JOURNAL)
            .unwrap()
            .insert(j, damaged.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    store.fold_now().await;
    assert_eq!(store.get(&key(1)).unwrap(), None);
    assert_eq!(store.get(&key(2)).unwrap(), Some((other, b"two".to_vec())));
    let txn = store.db().unwrap().begin_read().unwrap();
    let records = txn.open_table(RECORDS).unwrap();
    for gone in [first, seq] {
        assert!(records.get(gone).unwrap().is_none(), "record {gone} left");
    }
}

/// A delete of a key that holds nothing (every request with an unsafe method deletes the keys
/// it names, mostly not stored) writes no journal word; one of a stored key still does, and a
/// delete after it leaves that word as it is.
#[tokio::test]
async fn a_delete_of_nothing_writes_no_word() {
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    store.put(put(1, "one", None)).await.unwrap().unwrap();
    store.delete(key(2));
    store.delete(key(1));
    store.flush().await;
    let (word, tail) = *store.tail.get(&key(1)).unwrap();
    assert_eq!(tail, Tail::Gone);
    store.delete(key(1));
    store.flush().await;
    assert!(
        store.tail.get(&key(2)).is_none(),
        "no word on a key never stored"
    );
    assert_eq!(
        store.tail.get(&key(1)).map(|w| *w),
        Some((word, Tail::Gone))
    );
    let txn = store.db().unwrap().begin_read().unwrap();
    let journal = txn.open_table(JOURNAL).unwrap();
    assert_eq!(ReadableTableMetadata::len(&journal).unwrap(), 1);
    drop(txn);
    store.close().await;
    let store = Run::open(dir.path());
    assert_eq!(store.get(&key(1)).unwrap(), None);
    assert_eq!(store.get(&key(2)).unwrap(), None);
}

/// `synced` returns once every write queued before it is durable, however long the queue: the
/// remover unlinks content files after it, which the index must no longer name after a kill -9.
/// Counting the syncs that passed (as it did) returned after two durable commits of a backlog
/// longer than a batch, the later writes not even committed.
#[tokio::test]
async fn synced_waits_for_every_write_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    let release = store.hold().await;
    // Two full batches, each made durable by a flush at its end, then the last write.
    let mut flushed = Vec::new();
    for b in 0..2 {
        for i in 0..BATCH_MAX - 1 {
            let mut p = put(0, "backlog", None);
            p.key = KeyHash::of(&format!("example.test/backlog/{b}/{i}"));
            store.put_then(p, Completion::new(drop, drop));
        }
        let (done, wait) = oneshot::channel();
        store.tx.send(Op::Flush(done)).unwrap();
        flushed.push(wait);
    }
    store.put_then(put(1, "last", None), Completion::new(drop, drop));
    let mut synced = std::pin::pin!(store.synced());
    assert!(futures_util::poll!(&mut synced).is_pending());
    drop(release);
    assert!(synced.await);
    assert!(store.pending(&key(1)).is_none(), "the last write committed");
    for wait in flushed {
        assert_eq!(wait.await, Ok(true));
    }
    let release = store.hold().await;
    let killed = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("index.redb"),
        killed.path().join("index.redb"),
    )
    .unwrap();
    drop(release);
    let after = Run::open(killed.path());
    assert_eq!(
        after.get(&key(1)).unwrap().map(|r| r.1),
        Some(b"last".to_vec())
    );
}

/// An entry that does not decode is deleted by the load, and that delete takes it out of the
/// table: skipped as a delete of a key holding no copy, it stayed, to be deleted again at
/// every start.
#[tokio::test]
async fn an_undecodable_entry_is_deleted_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    store.put(put(1, "one", None)).await.unwrap().unwrap();
    store.fold_now().await;
    overwrite_entry(&store, 1, &[0xff]);
    store.load(16, |_| true).unwrap();
    store.flush().await;
    assert_eq!(store.tail.get(&key(1)).map(|w| w.1), Some(Tail::Gone));
    store.fold_now().await;
    let txn = store.db().unwrap().begin_read().unwrap();
    let entries = txn.open_table(ENTRIES).unwrap();
    assert!(
        entries.get(&key(1).0).unwrap().is_none(),
        "the fold took it out"
    );
}

/// `synced` says whether the commit that made what came before it durable held: no when it
/// failed (here, the commit carrying the op itself).
#[tokio::test]
async fn synced_says_no_when_the_commit_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = Run::open(dir.path());
    store.put(put(1, "one", None)).await.unwrap().unwrap();
    store.tx.send(Op::FailNext).unwrap();
    store.flush().await;
    let release = store.hold().await;
    store.delete(key(1));
    let mut synced = std::pin::pin!(store.synced());
    assert!(futures_util::poll!(&mut synced).is_pending());
    drop(release);
    assert!(!synced.await, "their commit failed");
    assert!(store.synced().await, "nothing since failed");
}

/// An entry that does not decode at all (no sequence number to name its copy by) goes at the
/// load only if nothing was journaled on its key since: a new copy stored while the load ran
/// stays. The load's delete was unconditional and took the new copy.
#[tokio::test]
async fn an_undecodable_entry_leaves_a_copy_stored_during_the_load() {
    a_new_copy_outlives_the_loads_removal_of(|_| vec![0xff]).await;
}

/// The same when the new copy was folded into the entries before the load's delete came: the
/// journal no longer names it, but the entry now decodes, and stays.
#[tokio::test]
async fn an_undecodable_entry_leaves_a_copy_folded_during_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Run::open(dir.path()));
    // A key the load reaches before key 1 (entries go in key order): the load stops there
    // until the new copy of key 1 is committed and folded.
    let early = (2..=u8::MAX).find(|&k| key(k).0 < key(1).0).unwrap();
    store.put(put(early, "early", None)).await.unwrap().unwrap();
    store.put(put(1, "one", None)).await.unwrap().unwrap();
    store.fold_now().await;
    overwrite_entry(&store, 1, &[0xff]);
    let release = store.hold().await;
    store.put_then(put(1, "two", None), Completion::new(drop, drop));
    let (folded, fold_done) = oneshot::channel();
    store.tx.send(Op::Fold(folded)).unwrap();
    let (held, is_held) = oneshot::channel();
    let (second_release, hold) = mpsc::channel();
    store.tx.send(Op::Hold(held, hold)).unwrap();
    let loading = Arc::clone(&store);
    let mut release = Some(release);
    let mut waits = Some((fold_done, is_held));
    tokio::task::spawn_blocking(move || {
        loading.load(1, |_| {
            drop(release.take());
            if let Some((fold_done, is_held)) = waits.take() {
                fold_done.blocking_recv().unwrap();
                is_held.blocking_recv().unwrap();
            }
            true
        })
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        store.tail.get(&key(1)).is_none(),
        "folded: the journal names it no more"
    );
    drop(second_release);
    store.flush().await;
    store.fold_now().await;
    assert_eq!(
        store.get(&key(1)).unwrap().map(|r| r.1),
        Some(b"two".to_vec())
    );
}

/// What `attempt` gives once it succeeds, tried every 20 ms for up to 10 s; past that, a panic
/// with `what` and the last failure.
async fn within_10s<T>(what: &str, mut attempt: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match attempt().await {
            Ok(got) => return got,
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A disk that fails for a while (full, or a write or sync that failed) does not end the
/// index for the rest of the process: redb fails every operation after an I/O error until the
/// database is opened again, which the writer does once it can. What the last durable commit
/// held is there; the put whose commit failed is not; the delete that failed is applied
/// again; writes after the failure are stored, under numbers never handed out before, and all
/// of it holds after a restart. Before, every later commit failed.
#[tokio::test]
async fn the_index_works_again_after_the_disk_failed() {
    let dir = tempfile::tempdir().unwrap();
    let failing = faults::switch(&dir.path().join("index.redb"));
    let store = Run::open(dir.path());
    store.put(put(1, "one", None)).await.unwrap().unwrap();
    store.put(put(2, "two", None)).await.unwrap().unwrap();
    assert!(store.synced().await);
    failing.writes.store(true, Ordering::Release);
    // Commits left to the OS may not write yet (then it is visible, and lost): the sync fails.
    store.delete(key(1));
    let lost = store.put(put(3, "three", None)).await.ok().flatten();
    assert!(!store.synced().await);
    // While the disk fails, the writer cannot open the database again: writes fail.
    tokio::time::sleep(REOPEN_EVERY * 3).await;
    assert!(store.put(put(5, "five", None)).await.is_err());
    assert!(
        !store.synced().await,
        "nothing is durable without a database"
    );
    failing.writes.store(false, Ordering::Release);
    let four = within_10s("the index never took a write again", async || {
        match store.put(put(4, "four", None)).await {
            Ok(Some(seq)) => Ok(seq),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    if let Some(lost) = lost {
        assert!(four > lost, "{four} was handed out before, to a lost copy");
    }
    assert!(store.synced().await);
    let check = |store: &Store| {
        let record = |k| store.get(&key(k)).unwrap().map(|r| r.1);
        assert_eq!(record(1), None, "the failed delete was applied again");
        assert_eq!(record(2), Some(b"two".to_vec()));
        assert_eq!(record(3), None, "its commit was never made durable");
        assert_eq!(record(4), Some(b"four".to_vec()));
        assert_eq!(record(5), None, "its commit failed");
    };
    check(&store);
    store.close().await;
    let reopened = Run::open(dir.path());
    check(&reopened);
    reopened.close().await;
}

/// A read that fails latches the database as a failed write does; with nothing written after
/// it, the writer still notices (it looks while idle) and opens it again: reads work once the
/// disk does. Before, every later read failed until a write failed too.
#[tokio::test]
async fn the_index_reads_again_after_a_read_failed() {
    let dir = tempfile::tempdir().unwrap();
    let failing = faults::switch(&dir.path().join("index.redb"));
    let store = Run::open(dir.path());
    store.put(put(1, "one", None)).await.unwrap().unwrap();
    assert!(store.synced().await);
    store.close().await;
    // Without a page cache of its own, every read goes to the file.
    let store = Store::open(dir.path(), 0, JOURNAL_MAX).unwrap();
    failing.reads.store(true, Ordering::Release);
    assert!(store.get(&key(1)).is_err());
    failing.reads.store(false, Ordering::Release);
    let record = within_10s("the index never read again", async || {
        match store.get(&key(1)) {
            Ok(Some((_, record))) => Ok(record),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(record, b"one");
    store.close().await;
}
