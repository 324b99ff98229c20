//! The durable outbox: a purge is written here (synced) before it is published, and removed
//! once JetStream has acknowledged it. A purge accepted while NATS is unreachable, or by a node
//! killed between the two steps, is published when the connection is back, after a restart
//! too. A purge published twice (acknowledged, then the node died before removing it) is one
//! message: JetStream drops the second by its message id (the purge id) within the stream's
//! duplicate window.
//!
//! One file per purge, `<sequence, 20 digits>.json`, so the directory lists in the order the
//! purges were accepted. Written to a temporary name, synced, renamed, and the directory
//! synced: a file that exists is whole.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Outgoing;

pub(crate) struct Outbox {
    dir: PathBuf,
    next: AtomicU64,
    /// Serialises writers of the directory (file creation and removal).
    lock: Mutex<()>,
}

/// One purge waiting in the outbox.
pub(crate) struct Waiting {
    pub file: PathBuf,
    pub message: Outgoing,
}

impl Outbox {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut last = 0;
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_suffix(".json")
                .and_then(|n| n.parse::<u64>().ok())
            {
                last = last.max(n);
            } else if name.ends_with(".tmp") {
                // An unfinished write: never acknowledged to anyone.
                let _ = std::fs::remove_file(dir.join(&*name));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            next: AtomicU64::new(last + 1),
            lock: Mutex::new(()),
        })
    }

    /// Writes `purge` durably; returns its file.
    pub fn add(&self, message: &Outgoing) -> io::Result<PathBuf> {
        let data = serde_json::to_vec(message).map_err(io::Error::other)?;
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let file = self.dir.join(format!("{n:020}.json"));
        let tmp = self.dir.join(format!("{n:020}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &file)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(file)
    }

    /// Removes a published purge (a file already gone is fine: two publishers raced).
    pub fn remove(&self, file: &Path) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        match std::fs::remove_file(file) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "fleet outbox: a published purge could not be removed; it will be published again (JetStream drops the duplicate)")
            }
        }
    }

    /// Sets an entry aside (`.bad`): it can never be published.
    pub fn set_aside(&self, file: &Path) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = std::fs::rename(file, file.with_extension("bad"));
    }

    /// Everything waiting, oldest first. A file that does not parse is set aside
    /// (`.bad`), with a warning: it can never be published.
    pub fn waiting(&self) -> Vec<Waiting> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect(),
            Err(_) => return Vec::new(),
        };
        files.sort();
        files
            .into_iter()
            .filter_map(|file| {
                let data = std::fs::read(&file).ok()?;
                match serde_json::from_slice(&data) {
                    Ok(message) => Some(Waiting { file, message }),
                    Err(e) => {
                        tracing::warn!(file = %file.display(), error = %e, "fleet outbox: unreadable purge set aside");
                        let _ = std::fs::rename(&file, file.with_extension("bad"));
                        None
                    }
                }
            })
            .collect()
    }

    /// How many purges wait.
    pub fn depth(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count() as u64
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FleetPurge;
    use outpost_purge_api::PurgeRequest;

    fn purge(id: &str) -> Outgoing {
        Outgoing::Purge(FleetPurge {
            id: id.into(),
            origin: "a".into(),
            at_ms: 1,
            request: PurgeRequest {
                urls: vec![format!("/{id}")],
                ..Default::default()
            },
        })
    }

    fn id(m: &Outgoing) -> &str {
        match m {
            Outgoing::Purge(p) => &p.id,
            Outgoing::Push { id, .. } | Outgoing::Delete { id, .. } => id,
        }
    }

    #[test]
    fn purges_survive_a_reopen_in_order_and_leave_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = Outbox::open(dir.path()).unwrap();
        for id in ["p1", "p2", "p3"] {
            out.add(&purge(id)).unwrap();
        }
        // A write that never finished is not a purge.
        std::fs::write(dir.path().join("00000000000000000099.tmp"), b"{").unwrap();
        drop(out);
        let out = Outbox::open(dir.path()).unwrap();
        let w = out.waiting();
        let ids: Vec<_> = w.iter().map(|w| id(&w.message)).collect();
        assert_eq!(ids, ["p1", "p2", "p3"]);
        assert_eq!(out.depth(), 3);
        out.remove(&w[1].file);
        out.remove(&w[1].file);
        // New purges go after the old ones.
        out.add(&purge("p4")).unwrap();
        out.add(&Outgoing::Push {
            id: "p5".into(),
            path: "/x.css".into(),
        })
        .unwrap();
        let w = out.waiting();
        let ids: Vec<_> = w.iter().map(|w| id(&w.message)).collect();
        assert_eq!(ids, ["p1", "p3", "p4", "p5"]);
        assert!(!dir.path().join("00000000000000000099.tmp").exists());
    }

    #[test]
    fn a_damaged_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let out = Outbox::open(dir.path()).unwrap();
        out.add(&purge("p1")).unwrap();
        std::fs::write(dir.path().join("00000000000000000007.json"), b"not json").unwrap();
        let w = out.waiting();
        let ids: Vec<_> = w.iter().map(|w| id(&w.message)).collect();
        assert_eq!(ids, ["p1"]);
        assert!(dir.path().join("00000000000000000007.bad").exists());
    }
}
