//! Purges by prefix, tag or everything in O(1): a purge records a generation (a monotonically
//! increasing sequence number) under its scope; an object remembers the sequence current when it
//! was stored, and a lookup compares. Nothing walks the cache.
//!
//! - Hard purge: a newer hard generation on any scope that matches the object makes it a miss.
//! - Soft purge: a newer soft generation makes it stale (served STALE while it revalidates).
//!
//! Fast path: the largest sequence ever recorded per kind of scope is kept in an atomic, so an
//! object stored after the last purge is checked with three integer comparisons and no map
//! lookups. Prefix checks otherwise probe every prefix of the object's path (bounded by its
//! length), tag checks probe each of its tags.
//!
//! The state persists in `<cache_dir>/purges.json`, written atomically and synced before a purge
//! takes effect or is acknowledged, so a purged object never comes back after a restart, and a
//! purge that could not be written is refused without changing anything (issue 13, item 7). At
//! start-up the engine raises the sequence to the largest one found in stored metadata
//! ([`Generations::raise_floor`]), so it never goes backwards even if the file lags behind.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

/// What an invalidation check says about one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    /// Soft-purged: serve stale while revalidating.
    Stale,
    /// Hard-purged: gone.
    Gone,
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Gen {
    hard: u64,
    soft: u64,
}

impl Gen {
    fn verdict(self, stored: u64) -> Verdict {
        if self.hard > stored {
            Verdict::Gone
        } else if self.soft > stored {
            Verdict::Stale
        } else {
            Verdict::Valid
        }
    }

    fn bump(&mut self, seq: u64, soft: bool) {
        if soft {
            self.soft = self.soft.max(seq);
        } else {
            self.hard = self.hard.max(seq);
        }
    }

    fn max(self) -> u64 {
        self.hard.max(self.soft)
    }
}

fn worst(a: Verdict, b: Verdict) -> Verdict {
    match (a, b) {
        (Verdict::Gone, _) | (_, Verdict::Gone) => Verdict::Gone,
        (Verdict::Stale, _) | (_, Verdict::Stale) => Verdict::Stale,
        _ => Verdict::Valid,
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Persisted {
    seq: u64,
    all: Gen,
    prefixes: BTreeMap<String, Gen>,
    tags: BTreeMap<String, Gen>,
    #[serde(default)]
    exact: BTreeMap<String, Gen>,
}

impl Persisted {
    /// Records one purge of `scopes` under `seq`.
    fn apply(&mut self, scopes: &[Scope], soft: bool, seq: u64) {
        self.seq = self.seq.max(seq);
        for scope in scopes {
            match scope {
                Scope::All => self.all.bump(seq, soft),
                Scope::Prefix(p) => self.prefixes.entry(p.clone()).or_default().bump(seq, soft),
                Scope::Tag(t) => self.tags.entry(t.clone()).or_default().bump(seq, soft),
                Scope::Exact(k) => self.exact.entry(k.clone()).or_default().bump(seq, soft),
            }
        }
    }
}

/// Which objects a purge covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    /// A path prefix (`/static/`) or a key prefix (`host/static/`).
    Prefix(String),
    Tag(String),
    /// One URL: a key (`host/path?query`) or a bare path (`/path?query`, any host).
    Exact(String),
}

/// The generations every lookup reads, lock-free on the fast path. Only purges that were
/// recorded (persisted, on a node with a disk) are ever applied here.
struct Live {
    seq: AtomicU64,
    all: std::sync::RwLock<Gen>,
    all_max: AtomicU64,
    prefixes: DashMap<String, Gen>,
    prefix_max: AtomicU64,
    tags: DashMap<String, Gen>,
    tag_max: AtomicU64,
    exact: DashMap<String, Gen>,
    exact_max: AtomicU64,
}

impl Live {
    fn new(p: &Persisted) -> Self {
        let max = |m: &BTreeMap<String, Gen>| m.values().map(|g| g.max()).max().unwrap_or(0);
        let map = |m: &BTreeMap<String, Gen>| -> DashMap<String, Gen> {
            m.iter().map(|(k, g)| (k.clone(), *g)).collect()
        };
        Self {
            seq: AtomicU64::new(p.seq),
            all: std::sync::RwLock::new(p.all),
            all_max: AtomicU64::new(p.all.max()),
            prefixes: map(&p.prefixes),
            prefix_max: AtomicU64::new(max(&p.prefixes)),
            tags: map(&p.tags),
            tag_max: AtomicU64::new(max(&p.tags)),
            exact: map(&p.exact),
            exact_max: AtomicU64::new(max(&p.exact)),
        }
    }

    /// Applies one recorded purge to the maps. The sequence is published separately, after
    /// the maps: an object stored meanwhile records an older sequence and is covered.
    fn apply(&self, scopes: &[Scope], soft: bool, seq: u64) {
        for scope in scopes {
            match scope {
                Scope::All => {
                    self.all
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .bump(seq, soft);
                    self.all_max.fetch_max(seq, Ordering::AcqRel);
                }
                Scope::Prefix(p) => {
                    self.prefixes.entry(p.clone()).or_default().bump(seq, soft);
                    self.prefix_max.fetch_max(seq, Ordering::AcqRel);
                }
                Scope::Tag(t) => {
                    self.tags.entry(t.clone()).or_default().bump(seq, soft);
                    self.tag_max.fetch_max(seq, Ordering::AcqRel);
                }
                Scope::Exact(k) => {
                    self.exact.entry(k.clone()).or_default().bump(seq, soft);
                    self.exact_max.fetch_max(seq, Ordering::AcqRel);
                }
            }
        }
    }

    fn publish(&self, seq: u64) {
        self.seq.fetch_max(seq, Ordering::AcqRel);
    }
}

pub struct Generations {
    live: Arc<Live>,
    recorder: Recorder,
}

/// How a purge is recorded before it takes effect.
enum Recorder {
    /// A memory-only node: nothing to persist; the lock gives each purge its own sequence.
    Memory(std::sync::Mutex<()>),
    Disk(Persister),
}

type Failure = (io::ErrorKind, String);
type Reply = tokio::sync::oneshot::Sender<Result<u64, Failure>>;
type Done = tokio::sync::oneshot::Receiver<Result<u64, Failure>>;

enum Msg {
    Purge {
        scopes: Vec<Scope>,
        soft: bool,
        reply: Reply,
    },
    /// Sequence numbers up to this one are in use (found in stored metadata at start-up).
    Floor(u64),
}

/// Records purges in `purges.json` on a thread of its own, so a purge is never queued behind
/// cache I/O on the blocking pool, and is the only writer of the live generations. A purge
/// takes effect only once a state that contains it is synced to disk; if the write fails, the
/// purge is refused and nothing changes (neither the live state nor the sequence), so a
/// refused purge can never take effect later, before or after a restart. Purges that arrive
/// while a write is under way are written together by the next one.
struct Persister {
    tx: std::sync::mpsc::Sender<Msg>,
}

impl Persister {
    fn start(file: PathBuf, mut state: Persisted, live: Arc<Live>) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("outpost-purges".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut msgs = vec![first];
                    msgs.extend(rx.try_iter());
                    let mut next: Option<Persisted> = None;
                    let mut batch = Vec::new();
                    for msg in msgs {
                        match msg {
                            Msg::Floor(n) => {
                                state.seq = state.seq.max(n);
                                if let Some(next) = &mut next {
                                    next.seq = next.seq.max(n);
                                }
                            }
                            Msg::Purge {
                                scopes,
                                soft,
                                reply,
                            } => {
                                let next = next.get_or_insert_with(|| state.clone());
                                let seq = next.seq + 1;
                                next.apply(&scopes, soft, seq);
                                batch.push((scopes, soft, seq, reply));
                            }
                        }
                    }
                    let Some(next) = next else { continue };
                    let written = match serde_json::to_vec(&next) {
                        Ok(data) => write_synced(&file, &data),
                        Err(e) => Err((io::Error::other(e), false)),
                    };
                    match written {
                        Ok(()) => {
                            for (scopes, soft, seq, _) in &batch {
                                live.apply(scopes, *soft, *seq);
                            }
                            live.publish(next.seq);
                            state = next;
                            for (_, _, seq, reply) in batch {
                                let _ = reply.send(Ok(seq));
                            }
                        }
                        Err((e, renamed)) => {
                            warn!(file = %file.display(), error = %e, purges = batch.len(), "purge state not written; purges refused");
                            if renamed {
                                // The new state is in place but its directory entry is not
                                // known to be durable: put the last acknowledged state back,
                                // so the refused purges cannot come into force at a restart.
                                let restored = serde_json::to_vec(&state)
                                    .map_err(|e| (io::Error::other(e), false))
                                    .and_then(|data| write_synced(&file, &data));
                                if let Err((e, _)) = restored {
                                    error!(file = %file.display(), error = %e, "purge state could not be restored; refused purges may apply after a restart");
                                }
                            }
                            for (_, _, _, reply) in batch {
                                let _ = reply.send(Err((e.kind(), e.to_string())));
                            }
                        }
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Queues a purge; the receiver resolves with its sequence once it is on disk (and
    /// applied), or with the write's error (and nothing applied).
    fn submit(&self, scopes: Vec<Scope>, soft: bool) -> io::Result<Done> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::Purge {
                scopes,
                soft,
                reply,
            })
            .map_err(|_| io::Error::other("the purge-state writer has stopped"))?;
        Ok(done)
    }
}

async fn recorded(done: Done) -> io::Result<u64> {
    match done.await {
        Ok(Ok(seq)) => Ok(seq),
        Ok(Err((kind, msg))) => Err(io::Error::new(kind, msg)),
        Err(_) => Err(io::Error::other("the purge-state writer has stopped")),
    }
}

/// The temporary file a write of `file` goes through.
fn tmp_path(file: &Path) -> PathBuf {
    file.with_extension("json.tmp")
}

/// Replaces `file` atomically and durably: a temporary file, fsync, rename, fsync of the
/// directory. A failed write removes its temporary file (a full disk must not leave one); the
/// error says whether the rename had happened (only the directory sync failed).
fn write_synced(file: &Path, data: &[u8]) -> Result<(), (io::Error, bool)> {
    use std::io::Write;
    let tmp = tmp_path(file);
    let staged = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, file)
    })();
    if let Err(e) = staged {
        let _ = std::fs::remove_file(&tmp);
        return Err((e, false));
    }
    match file.parent() {
        Some(dir) if dir.as_os_str().is_empty() => std::fs::File::open(".")
            .and_then(|d| d.sync_all())
            .map_err(|e| (e, true)),
        Some(dir) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| (e, true)),
        None => Ok(()),
    }
}

impl Generations {
    /// Loads the persisted state (or starts empty). `file` is None for a memory-only node. A
    /// temporary file left by an interrupted write is removed (the state it held was never
    /// acknowledged).
    pub fn load(file: Option<PathBuf>) -> io::Result<Self> {
        let persisted = match &file {
            Some(f) => {
                match std::fs::remove_file(tmp_path(f)) {
                    Ok(()) => {
                        info!(file = %tmp_path(f).display(), "removed an unfinished purge-state write")
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        warn!(file = %tmp_path(f).display(), error = %e, "cannot remove an unfinished purge-state write")
                    }
                }
                match std::fs::read(f) {
                    Ok(data) => serde_json::from_slice::<Persisted>(&data).map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{}: unreadable purge state: {e}", f.display()),
                        )
                    })?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Persisted::default(),
                    Err(e) => return Err(e),
                }
            }
            None => Persisted::default(),
        };
        let live = Arc::new(Live::new(&persisted));
        let recorder = match file {
            Some(f) => Recorder::Disk(Persister::start(f, persisted, live.clone())?),
            None => Recorder::Memory(std::sync::Mutex::new(())),
        };
        Ok(Self { live, recorder })
    }

    /// The sequence an object stored now records.
    pub fn current(&self) -> u64 {
        self.live.seq.load(Ordering::Acquire)
    }

    /// Declares sequence numbers up to `seq` used: objects stored by an earlier run recorded
    /// them (the persisted state can lag behind, if `purges.json` was lost or restored from a
    /// backup). The next purge gets a larger number, so it covers every stored object and the
    /// sequence never goes backwards across a restart.
    pub fn raise_floor(&self, seq: u64) {
        if seq <= self.current() {
            return;
        }
        info!(
            persisted = self.current(),
            stored = seq,
            "stored objects carry a newer purge sequence than the purge state; continuing from it"
        );
        self.live.publish(seq);
        if let Recorder::Disk(p) = &self.recorder {
            // The writer thread orders it before any later purge.
            let _ = p.tx.send(Msg::Floor(seq));
        }
    }

    /// Records a purge of several scopes under one new sequence number. On a node with a disk
    /// it takes effect only once persisted: an error means it was refused and changed nothing.
    /// O(number of scopes), independent of the number of cached objects.
    pub async fn purge(&self, scopes: &[Scope], soft: bool) -> io::Result<u64> {
        match &self.recorder {
            Recorder::Memory(lock) => {
                let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                let seq = self.current() + 1;
                self.live.apply(scopes, soft, seq);
                self.live.publish(seq);
                Ok(seq)
            }
            Recorder::Disk(p) => recorded(p.submit(scopes.to_vec(), soft)?).await,
        }
    }

    /// Is an object (key text `host/path?query`, its tags, the sequence it was stored at)
    /// still valid?
    pub fn check(&self, key: &str, tags: &[String], stored: u64) -> Verdict {
        let mut v = Verdict::Valid;
        if self.live.all_max.load(Ordering::Acquire) > stored {
            v = self
                .live
                .all
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .verdict(stored);
            if v == Verdict::Gone {
                return v;
            }
        }
        if self.live.prefix_max.load(Ordering::Acquire) > stored {
            let path_start = key.find('/').unwrap_or(key.len());
            // Every prefix of the key text, and every prefix of the path part.
            for (i, _) in key.char_indices().skip(1) {
                if let Some(g) = self.live.prefixes.get(&key[..i]) {
                    v = worst(v, g.verdict(stored));
                }
                if i > path_start
                    && let Some(g) = self.live.prefixes.get(&key[path_start..i])
                {
                    v = worst(v, g.verdict(stored));
                }
            }
            if let Some(g) = self.live.prefixes.get(key) {
                v = worst(v, g.verdict(stored));
            }
            if let Some(g) = self.live.prefixes.get(&key[path_start..]) {
                v = worst(v, g.verdict(stored));
            }
            if v == Verdict::Gone {
                return v;
            }
        }
        if self.live.exact_max.load(Ordering::Acquire) > stored {
            let path_start = key.find('/').unwrap_or(key.len());
            for k in [key, &key[path_start..]] {
                if let Some(g) = self.live.exact.get(k) {
                    v = worst(v, g.verdict(stored));
                }
            }
            if v == Verdict::Gone {
                return v;
            }
        }
        if self.live.tag_max.load(Ordering::Acquire) > stored {
            for t in tags {
                if let Some(g) = self.live.tags.get(t) {
                    v = worst(v, g.verdict(stored));
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn scopes_and_modes() {
        let g = Generations::load(None).unwrap();
        let s0 = g.current();
        assert_eq!(g.check("h/a/b.js", &[], s0), Verdict::Valid);
        g.purge(&[Scope::Prefix("/a/".into())], true).await.unwrap();
        assert_eq!(g.check("h/a/b.js", &[], s0), Verdict::Stale);
        assert_eq!(g.check("h/b/a.js", &[], s0), Verdict::Valid);
        // Stored after the purge: valid.
        assert_eq!(g.check("h/a/b.js", &[], g.current()), Verdict::Valid);
        g.purge(&[Scope::Prefix("h/a/b".into())], false)
            .await
            .unwrap();
        assert_eq!(g.check("h/a/b.js", &[], s0), Verdict::Gone);
        g.purge(&[Scope::Tag("css".into())], false).await.unwrap();
        assert_eq!(g.check("h/x", &tags(&["js", "css"]), s0), Verdict::Gone);
        assert_eq!(g.check("h/x", &tags(&["js"]), s0), Verdict::Valid);
        g.purge(&[Scope::Exact("/q?x=1".into())], true)
            .await
            .unwrap();
        assert_eq!(g.check("h/q?x=1", &[], s0), Verdict::Stale);
        assert_eq!(g.check("h/q?x=2", &[], s0), Verdict::Valid);
        let before_all = g.current();
        g.purge(&[Scope::All], true).await.unwrap();
        assert_eq!(g.check("h/x", &[], before_all), Verdict::Stale);
    }

    #[tokio::test]
    async fn survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("purges.json");
        let g = Generations::load(Some(f.clone())).unwrap();
        let stored = g.current();
        g.purge(&[Scope::Tag("t".into()), Scope::All], false)
            .await
            .unwrap();
        drop(g);
        let g = Generations::load(Some(f)).unwrap();
        assert!(g.current() > stored);
        assert_eq!(g.check("h/x", &[], stored), Verdict::Gone);
        assert_eq!(g.check("h/x", &[], g.current()), Verdict::Valid);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_purges_are_all_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("purges.json");
        let g = std::sync::Arc::new(Generations::load(Some(f.clone())).unwrap());
        let stored = g.current();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let g = g.clone();
            tasks.spawn(async move { g.purge(&[Scope::Tag(format!("t{i}"))], false).await });
        }
        let mut seqs: Vec<u64> = tasks
            .join_all()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 40, "one sequence number per purge");
        drop(g);
        // Every purge that returned is on disk, whichever write carried it.
        let g = Generations::load(Some(f)).unwrap();
        for i in 0..40 {
            assert_eq!(
                g.check("h/x", &tags(&[&format!("t{i}")]), stored),
                Verdict::Gone,
                "t{i}"
            );
        }
        assert!(!dir.path().join("purges.json.tmp").exists());
    }

    #[tokio::test]
    async fn a_purge_that_cannot_be_persisted_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("gone").join("purges.json");
        let g = Generations::load(Some(f)).unwrap();
        let err = g.purge(&[Scope::All], false).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    /// Issue 13, item 7: a purge whose state cannot be written (here the rename onto
    /// `purges.json` fails, as a directory stands there; chmod does not stop root) is refused
    /// and changes nothing: not the sequence, not any verdict, not after a restart; and its
    /// temporary file is removed.
    #[tokio::test]
    async fn a_refused_purge_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("purges.json");
        let g = Generations::load(Some(f.clone())).unwrap();
        let first = g.purge(&[Scope::Tag("a".into())], false).await.unwrap();
        let stored = g.current();
        std::fs::rename(&f, dir.path().join("saved.json")).unwrap();
        std::fs::create_dir(&f).unwrap();

        assert!(g.purge(&[Scope::All], false).await.is_err());
        assert!(g.purge(&[Scope::Tag("b".into())], true).await.is_err());
        assert_eq!(g.current(), stored, "a refused purge advanced the sequence");
        assert_eq!(g.check("h/x", &tags(&["b"]), stored), Verdict::Valid);
        assert_eq!(g.check("h/x", &[], stored), Verdict::Valid);
        assert!(
            !dir.path().join("purges.json.tmp").exists(),
            "a failed write left its temporary file"
        );

        // The disk is fixed: the next purge follows the last acknowledged one.
        std::fs::remove_dir(&f).unwrap();
        std::fs::rename(dir.path().join("saved.json"), &f).unwrap();
        let next = g.purge(&[Scope::Exact("/y".into())], false).await.unwrap();
        assert_eq!(next, first + 1);
        drop(g);
        let g = Generations::load(Some(f)).unwrap();
        assert_eq!(g.current(), next);
        assert_eq!(
            g.check("h/x", &[], stored),
            Verdict::Valid,
            "the refused purge-all"
        );
        assert_eq!(g.check("h/y", &[], stored), Verdict::Gone);
    }

    /// Issue 13, items 7 and 15: the sequence continues from the largest one stored objects
    /// carry when the file lags behind, and a temporary file left by a crash is removed.
    #[tokio::test]
    async fn sequence_never_goes_backwards_and_leftovers_go() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("purges.json");
        std::fs::write(dir.path().join("purges.json.tmp"), b"").unwrap();
        let g = Generations::load(Some(f.clone())).unwrap();
        assert!(!dir.path().join("purges.json.tmp").exists());
        assert_eq!(g.current(), 0);
        g.raise_floor(7);
        assert_eq!(g.current(), 7);
        g.raise_floor(3);
        assert_eq!(g.current(), 7);
        let seq = g.purge(&[Scope::All], false).await.unwrap();
        assert_eq!(seq, 8);
        assert_eq!(g.check("h/x", &[], 7), Verdict::Gone);
        drop(g);
        assert_eq!(Generations::load(Some(f)).unwrap().current(), 8);

        let m = Generations::load(None).unwrap();
        m.raise_floor(4);
        assert_eq!(m.purge(&[Scope::All], false).await.unwrap(), 5);
    }
}
