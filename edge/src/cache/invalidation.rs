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
//! The state persists in `<cache_dir>/purges.json`, written atomically before a purge is
//! acknowledged, so a purged object never comes back after a restart.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

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

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    seq: u64,
    all: Gen,
    prefixes: BTreeMap<String, Gen>,
    tags: BTreeMap<String, Gen>,
    #[serde(default)]
    exact: BTreeMap<String, Gen>,
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

pub struct Generations {
    seq: AtomicU64,
    all: std::sync::RwLock<Gen>,
    all_max: AtomicU64,
    prefixes: DashMap<String, Gen>,
    prefix_max: AtomicU64,
    tags: DashMap<String, Gen>,
    tag_max: AtomicU64,
    exact: DashMap<String, Gen>,
    exact_max: AtomicU64,
    persister: Option<Persister>,
    write: Mutex<()>,
}

type Reply = tokio::sync::oneshot::Sender<Result<(), (io::ErrorKind, String)>>;
type Done = tokio::sync::oneshot::Receiver<Result<(), (io::ErrorKind, String)>>;

/// Writes `purges.json` on a thread of its own, so a purge is never queued behind cache I/O
/// on the blocking pool. Each write is synced before it is acknowledged; purges that arrive
/// while a write is under way are written together by the next one, which writes the newest
/// state among them (each state includes every earlier purge).
struct Persister {
    tx: std::sync::mpsc::Sender<(u64, Vec<u8>, Reply)>,
}

impl Persister {
    fn start(file: PathBuf) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Vec<u8>, Reply)>();
        std::thread::Builder::new()
            .name("outpost-purges".into())
            .spawn(move || {
                while let Ok((seq, data, reply)) = rx.recv() {
                    let mut newest = (seq, data);
                    let mut replies = vec![reply];
                    while let Ok((seq, data, reply)) = rx.try_recv() {
                        if seq > newest.0 {
                            newest = (seq, data);
                        }
                        replies.push(reply);
                    }
                    let result =
                        write_synced(&file, &newest.1).map_err(|e| (e.kind(), e.to_string()));
                    for reply in replies {
                        let _ = reply.send(result.clone());
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Queues the state of purge `seq`; the receiver resolves once a state at least that new
    /// is on disk.
    fn submit(&self, seq: u64, data: Vec<u8>) -> io::Result<Done> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.tx
            .send((seq, data, reply))
            .map_err(|_| io::Error::other("the purge-state writer has stopped"))?;
        Ok(done)
    }
}

async fn written(done: Done) -> io::Result<()> {
    match done.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err((kind, msg))) => Err(io::Error::new(kind, msg)),
        Err(_) => Err(io::Error::other("the purge-state writer has stopped")),
    }
}

/// Replaces `file` atomically and durably: a temporary file, fsync, rename, fsync of the
/// directory.
fn write_synced(file: &std::path::Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = file.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Generations {
    /// Loads the persisted state (or starts empty). `file` is None for a memory-only node.
    pub fn load(file: Option<PathBuf>) -> io::Result<Self> {
        let persisted = match &file {
            Some(f) => match std::fs::read(f) {
                Ok(data) => serde_json::from_slice::<Persisted>(&data).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: unreadable purge state: {e}", f.display()),
                    )
                })?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Persisted::default(),
                Err(e) => return Err(e),
            },
            None => Persisted::default(),
        };
        let prefix_max = persisted
            .prefixes
            .values()
            .map(|g| g.max())
            .max()
            .unwrap_or(0);
        let tag_max = persisted.tags.values().map(|g| g.max()).max().unwrap_or(0);
        let exact_max = persisted.exact.values().map(|g| g.max()).max().unwrap_or(0);
        Ok(Self {
            seq: AtomicU64::new(persisted.seq),
            all_max: AtomicU64::new(persisted.all.max()),
            all: std::sync::RwLock::new(persisted.all),
            prefixes: persisted.prefixes.into_iter().collect(),
            prefix_max: AtomicU64::new(prefix_max),
            tags: persisted.tags.into_iter().collect(),
            tag_max: AtomicU64::new(tag_max),
            exact: persisted.exact.into_iter().collect(),
            exact_max: AtomicU64::new(exact_max),
            persister: file.map(Persister::start).transpose()?,
            write: Mutex::new(()),
        })
    }

    /// The sequence an object stored now records.
    pub fn current(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Records a purge of several scopes under one new sequence number and persists it before
    /// returning. O(number of scopes), independent of the number of cached objects.
    pub async fn purge(&self, scopes: &[Scope], soft: bool) -> io::Result<u64> {
        let guard = self.write.lock().await;
        let seq = self.seq.load(Ordering::Acquire) + 1;
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
        // Publish the sequence last: an object stored concurrently records an older sequence
        // and is therefore covered by this purge.
        self.seq.store(seq, Ordering::Release);
        let Some(persister) = &self.persister else {
            return Ok(seq);
        };
        // The state is taken and queued under the lock; the write is awaited outside it, so
        // concurrent purges share one write.
        let done = persister.submit(seq, self.state_json()?)?;
        drop(guard);
        written(done).await?;
        Ok(seq)
    }

    fn state_json(&self) -> io::Result<Vec<u8>> {
        let state = Persisted {
            seq: self.seq.load(Ordering::Acquire),
            all: *self.all.read().unwrap_or_else(|p| p.into_inner()),
            prefixes: self
                .prefixes
                .iter()
                .map(|e| (e.key().clone(), *e.value()))
                .collect(),
            tags: self
                .tags
                .iter()
                .map(|e| (e.key().clone(), *e.value()))
                .collect(),
            exact: self
                .exact
                .iter()
                .map(|e| (e.key().clone(), *e.value()))
                .collect(),
        };
        serde_json::to_vec(&state).map_err(io::Error::other)
    }

    /// Is an object (key text `host/path?query`, its tags, the sequence it was stored at)
    /// still valid?
    pub fn check(&self, key: &str, tags: &[String], stored: u64) -> Verdict {
        let mut v = Verdict::Valid;
        if self.all_max.load(Ordering::Acquire) > stored {
            v = self
                .all
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .verdict(stored);
            if v == Verdict::Gone {
                return v;
            }
        }
        if self.prefix_max.load(Ordering::Acquire) > stored {
            let path_start = key.find('/').unwrap_or(key.len());
            // Every prefix of the key text, and every prefix of the path part.
            for (i, _) in key.char_indices().skip(1) {
                if let Some(g) = self.prefixes.get(&key[..i]) {
                    v = worst(v, g.verdict(stored));
                }
                if i > path_start
                    && let Some(g) = self.prefixes.get(&key[path_start..i])
                {
                    v = worst(v, g.verdict(stored));
                }
            }
            if let Some(g) = self.prefixes.get(key) {
                v = worst(v, g.verdict(stored));
            }
            if let Some(g) = self.prefixes.get(&key[path_start..]) {
                v = worst(v, g.verdict(stored));
            }
            if v == Verdict::Gone {
                return v;
            }
        }
        if self.exact_max.load(Ordering::Acquire) > stored {
            let path_start = key.find('/').unwrap_or(key.len());
            for k in [key, &key[path_start..]] {
                if let Some(g) = self.exact.get(k) {
                    v = worst(v, g.verdict(stored));
                }
            }
            if v == Verdict::Gone {
                return v;
            }
        }
        if self.tag_max.load(Ordering::Acquire) > stored {
            for t in tags {
                if let Some(g) = self.tags.get(t) {
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
}
