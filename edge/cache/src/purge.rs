//! Removing objects: purges (exact URL, prefix, tag, all; hard or soft), RFC 9111 §4.4
//! invalidation, and the background reclamation of purged objects from the tiers.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use tracing::debug;

use super::key::KeyHash;
use super::{Engine, STORED_CODINGS, encoded_key, purge_log};

/// Hosts remembered for purges of a bare path (a bound: hosts come from requests).
const MAX_TRACKED_HOSTS: usize = 1024;

/// What a purge covers (exact URLs are `host/path?query` keys or bare paths).
#[derive(Debug, Clone, Default)]
pub struct PurgeSpec {
    pub urls: Vec<String>,
    pub prefixes: Vec<String>,
    pub tags: Vec<String>,
    pub all: bool,
    pub soft: bool,
}

/// The result of a purge.
#[derive(Debug, Clone)]
pub struct PurgeOutcome {
    pub seq: u64,
    /// Objects removed or marked right away (exact URLs); `None` where counting would mean
    /// walking the cache (prefix, tag, all), and while the disk index loads.
    pub matched: Option<u64>,
}

/// The engine's purge state: the durable purge log (generations), the hosts seen (so a purge
/// of a bare path reaches every host's copy; bounded), and the single-flight state of the
/// background reclamation of purged objects.
pub(super) struct Purges {
    pub(super) log: purge_log::Generations,
    hosts: DashMap<String, ()>,
    /// 0 idle, 1 running, 2 running and asked to run again.
    pub(super) reclaim: AtomicU64,
}

impl Purges {
    pub(super) fn new(log: purge_log::Generations) -> Self {
        Self {
            log,
            hosts: DashMap::new(),
            reclaim: AtomicU64::new(0),
        }
    }

    /// Remembers the host of a key text (`host/path?query`), up to [`MAX_TRACKED_HOSTS`].
    pub(super) fn track_host(&self, key_text: &str) {
        if self.hosts.len() < MAX_TRACKED_HOSTS
            && let Some(host) = key_text.split('/').next()
            && !self.hosts.contains_key(host)
        {
            self.hosts.insert(host.to_string(), ());
        }
    }

    /// `host/path` stays; a bare `/path` means that path on every host seen.
    fn expand_hosts(&self, key: &str) -> Vec<String> {
        if key.starts_with('/') {
            self.hosts
                .iter()
                .map(|h| format!("{}{key}", h.key()))
                .collect()
        } else {
            vec![key.to_string()]
        }
    }
}

impl Engine {
    /// Purges by exact URL, prefix, tag or everything, hard or soft. Prefix, tag and all are
    /// O(1) in the number of cached objects (a generation is recorded and persisted); exact
    /// URLs are also removed from both tiers right away (hard) with every Vary variant.
    pub async fn purge(self: &Arc<Self>, spec: &PurgeSpec) -> io::Result<PurgeOutcome> {
        use purge_log::Scope;
        let mut scopes: Vec<Scope> = Vec::new();
        if spec.all {
            scopes.push(Scope::All);
        }
        scopes.extend(spec.prefixes.iter().map(|p| Scope::Prefix(key_form(p))));
        scopes.extend(spec.tags.iter().map(|t| Scope::Tag(t.clone())));
        // Exact URLs are recorded as exact scopes too, so that a soft purge works for them and
        // a hard purge survives a restart even before the objects are reclaimed.
        let exact: Vec<String> = spec.urls.iter().map(|u| key_form(u)).collect();
        scopes.extend(exact.iter().map(|k| Scope::Exact(k.clone())));
        let seq = self.purges.log.purge(&scopes, spec.soft).await?;
        let mut matched = None;
        // While the disk index loads, objects it has not reached are not known to be held,
        // nor are the hosts a bare path could mean: a count would understate (and tell the
        // operator a stored URL matched nothing), so there is none.
        let loading = !self.disk_indexed.load(Ordering::Acquire);
        if !exact.is_empty() && !spec.soft {
            let mut n = 0;
            for k in &exact {
                for key in self.purges.expand_hosts(k) {
                    let primary = KeyHash::of(&key);
                    if self.holds(primary).await {
                        n += 1;
                    }
                    self.invalidate(primary).await;
                }
            }
            matched = (!loading).then_some(n);
        }
        if !spec.soft && (spec.all || !spec.prefixes.is_empty() || !spec.tags.is_empty()) {
            self.spawn_reclaim();
        }
        Ok(PurgeOutcome { seq, matched })
    }

    async fn holds(&self, primary: KeyHash) -> bool {
        self.vary.contains(primary)
            || self.memory.get(&primary).await.is_some()
            || self.disk.as_ref().is_some_and(|d| d.contains(&primary))
    }

    /// Reclaims purged objects from the tiers in the background (a purge itself never walks
    /// the cache).
    /// Single-flight: a purge during a running sweep asks for one more sweep instead of
    /// starting a second walk of the disk.
    fn spawn_reclaim(self: &Arc<Self>) {
        if self
            .purges
            .reclaim
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some((s + 1).min(2))
            })
            .unwrap_or(0)
            != 0
        {
            return;
        }
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(e) = engine.upgrade() else { return };
                e.reclaim_once().await;
                // 2 → 1: another purge came in meanwhile, sweep again; 1 → 0: done.
                if e.purges.reclaim.fetch_sub(1, Ordering::AcqRel) == 1 {
                    return;
                }
            }
        });
    }

    /// Removes the purged copies from the disk tiers (the cache's and the pushed objects'), and
    /// the memory copies of their keys that are purged too. Only the copy found purged goes: a
    /// fill or a push may store a new copy of the key between the look and the removal, and
    /// that one stays (removing by key took it too: the next request was a second miss).
    async fn reclaim_once(self: &Arc<Self>) {
        let tiers = self
            .disk
            .iter()
            .chain(self.pinned.as_ref().map(|p| p.tier()));
        let mut removed = 0u64;
        for disk in tiers {
            for key in disk.keys() {
                if let Some(hit) = disk.peek(&key).await
                    && self.purged(&hit.meta)
                {
                    #[cfg(test)]
                    reclaim_gate::wait(disk.root()).await;
                    disk.remove_copy(&key, &hit.entry);
                    removed += 1;
                }
                // A memory copy of the key goes if it is a purged one too (the lookup that
                // would meet it may never come: a pushed path whose disk copy is gone).
                if let Some(m) = self.memory.get(&key).await
                    && self.purged(&m.meta)
                {
                    self.memory.remove_copy(&key, &m).await;
                }
            }
        }
        if removed > 0 {
            debug!(removed, "reclaimed purged objects from disk");
        }
    }

    /// Removes every stored variant of a key from both tiers (RFC 9111 §4.4 invalidation,
    /// exact-URL purge).
    pub async fn invalidate(&self, primary: KeyHash) {
        // While the disk index loads, variants it has not handed over are not in the Vary
        // index: noted first, so that the handover, if it comes after the Vary index is read
        // below, finds the note (see `index_loaded`), and a lookup meanwhile too (`lookup`).
        if !self.disk_indexed.load(Ordering::Acquire) {
            let now = crate::clock::unix_ms(self.clock.now());
            self.invalidated_loading.insert(primary, now);
        }
        let variants = self.vary.remove(primary);
        for k in std::iter::once(primary).chain(variants.iter().copied()) {
            // A fetch still running for the key must not bring the old answer back.
            self.fills.cancel(&k);
            self.remove_object(k).await;
        }
    }

    /// Removes an object and its encoded variants from both tiers: the disk's copy first, so
    /// a disk hit promoting its copy meanwhile finds it gone (see `body_of`).
    pub(super) async fn remove_object(&self, key: KeyHash) {
        for k in std::iter::once(key).chain(STORED_CODINGS.iter().map(|c| encoded_key(key, c))) {
            if let Some(d) = &self.disk {
                d.remove(&k).await;
            }
            self.memory.remove(&k).await;
        }
    }
}

/// The key form of a purge target: `http://host/p?q` → `host/p?q`; `/p` stays a path.
fn key_form(target: &str) -> String {
    let t = target.trim();
    let t = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .unwrap_or(t);
    if t.starts_with('/') {
        t.to_string()
    } else {
        match t.split_once('/') {
            Some((host, rest)) => format!("{}/{rest}", host.to_ascii_lowercase()),
            None => format!("{}/", t.to_ascii_lowercase()),
        }
    }
}

/// Test hook: holds a reclaim of the disk tier at a root between finding a purged copy and
/// removing it.
#[cfg(test)]
pub(crate) mod reclaim_gate {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use tokio::sync::oneshot;

    type Gate = (PathBuf, oneshot::Sender<()>, oneshot::Receiver<()>);

    static GATES: Mutex<Vec<Gate>> = Mutex::new(Vec::new());

    /// Holds the next reclaim of `root` at its first purged copy: the first receiver hears
    /// when it got there, and it goes on when the sender sends or is dropped.
    pub(crate) fn hold(root: &Path) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        GATES
            .lock()
            .unwrap()
            .push((root.to_path_buf(), reached_tx, release_rx));
        (reached_rx, release_tx)
    }

    pub(super) async fn wait(root: &Path) {
        let gate = {
            let mut gates = GATES.lock().unwrap();
            let at = gates.iter().position(|(p, _, _)| p == root);
            at.map(|i| gates.swap_remove(i))
        };
        if let Some((_, reached, release)) = gate {
            let _ = reached.send(());
            let _ = release.await;
        }
    }
}
