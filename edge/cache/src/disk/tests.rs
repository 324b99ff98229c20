//! Unit tests of the disk tier: held metadata, checked reads.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};

use super::reader::{Checked, Checking, OpenFiles, STREAM_READ, is_damage, read_checked};
use super::*;
use crate::policy::{self, Admission, AdmitOptions};

/// A read budget that never runs out.
fn unbounded() -> Arc<Budget> {
    Budget::new(u64::MAX)
}

fn meta(etag: &str) -> Arc<CachedMeta> {
    let req = Request::get("http://example.test/a")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let resp = Response::builder()
        .header("cache-control", "max-age=60")
        .header("etag", etag)
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let opts = AdmitOptions {
        surrogate: "edge".into(),
        default_ttl: None,
        targeted: crate::default_targeted_cache_control(),
        stale_on_error: std::time::Duration::ZERO,
        negative: Default::default(),
    };
    match policy::admit(&req, &resp, "example.test/a", SystemTime::now(), &opts) {
        Admission::Store(m) => Arc::new(*m),
        Admission::Pass(r) => panic!("not admitted: {}", r.as_str()),
    }
}

/// The metadata `key`'s copy was stored with.
async fn stored_meta(tier: &DiskTier, key: &KeyHash) -> Arc<CachedMeta> {
    tier.peek(key).await.expect("a stored copy").meta
}

/// A tier of 1 GiB in a fresh directory (kept alive by the returned guard).
async fn tier() -> (tempfile::TempDir, Arc<DiskTier>) {
    let dir = tempfile::tempdir().unwrap();
    let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    (dir, tier)
}

async fn store(tier: &Arc<DiskTier>, key: KeyHash, body: &[u8], meta: &Arc<CachedMeta>) {
    let mut w = tier.begin_write(key);
    w.write(Bytes::copy_from_slice(body)).await.unwrap();
    w.commit(meta).await.unwrap();
}

async fn etag_of(tier: &DiskTier, key: &KeyHash) -> Option<String> {
    let hit = tier.get(key).await?;
    Some(hit.meta.etag().unwrap_or_default().to_string())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A 304 rewrites the metadata file: later hits answer the new metadata, even when a
/// lookup that read the old file holds it after the update, and so does a restart.
#[tokio::test]
async fn update_replaces_held_metadata() {
    let (dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, b"body", &meta("\"a\"")).await;
    assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"a\""));
    let late = tier
        .held
        .get(&key)
        .expect("held after the commit and the hit");

    tier.update_meta(&key, &meta("\"b\""), &*stored_meta(&tier, &key).await)
        .await
        .unwrap();
    assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"b\""));
    tier.held.insert(key, late);
    assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"b\""));
    let hit = tier.get(&key).await.unwrap();
    assert_eq!(&tier.read_all(&key, &hit).await.unwrap()[..], b"body");

    // One tier per directory at a time: the database is locked while open.
    drop(tier);
    let (reopened, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    assert_eq!(etag_of(&reopened, &key).await.as_deref(), Some("\"b\""));
}

/// Header values that are not visible ASCII (obs-text: a UTF-8 file name, Latin-1 bytes) are
/// stored as they came, byte for byte, and a hit after a restart answers them so: none is
/// dropped or altered on the way through the record.
#[tokio::test]
async fn header_values_of_any_bytes_survive_the_record() {
    let (dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    let mut m = (*meta("\"a\"")).clone();
    let values: [&[u8]; 3] = [
        b"attachment; filename=\"caf\xc3\xa9.pdf\"",
        b"latin-1 \xe9t\xe9",
        b"tab\there",
    ];
    for v in values {
        m.headers
            .append("x-any", http::HeaderValue::from_bytes(v).unwrap());
    }
    store(&tier, key, b"body", &Arc::new(m)).await;
    drop(tier);
    let (reopened, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    let hit = reopened.get(&key).await.expect("stored");
    let got: Vec<&[u8]> = hit
        .meta
        .headers
        .get_all("x-any")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    assert_eq!(got, values);
}

/// Metadata held for an entry that a new commit has replaced (a lookup racing the commit
/// holds it late) is never paired with the new body.
#[tokio::test]
async fn metadata_held_for_a_replaced_entry_is_not_used() {
    let (_dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, b"old body", &meta("\"old\"")).await;
    tier.get(&key).await.unwrap();
    let late = tier
        .held
        .get(&key)
        .expect("held after the commit and the hit");

    store(&tier, key, b"new body", &meta("\"new\"")).await;
    tier.held.insert(key, late);
    let hit = tier.get(&key).await.unwrap();
    assert_eq!(hit.meta.etag(), Some("\"new\""));
    assert_eq!(&tier.read_all(&key, &hit).await.unwrap()[..], b"new body");
}

/// Holding the metadata skips no integrity check: a body damaged on disk after it was
/// written and hit fails its read and the entry is gone.
#[tokio::test]
async fn damaged_body_with_held_metadata_is_removed() {
    let (dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, &body(), &meta("\"a\"")).await;
    let hit = tier.get(&key).await.unwrap();
    assert!(tier.read_all(&key, &hit).await.is_ok());

    let files = files_under(&dir.path().join("content").join("content-v2"));
    assert!(!files.is_empty(), "no content file to damage");
    for f in &files {
        damage_in_place(f);
    }
    let hit = tier.get(&key).await.expect("metadata is held");
    assert!(tier.read_all(&key, &hit).await.is_err());
    assert!(
        tier.get(&key).await.is_none(),
        "the damaged entry is removed"
    );
}

/// A metadata record that names other content than the index entry (a commit between its
/// store commit and its index insert) is a miss, never another object's metadata.
#[tokio::test]
async fn metadata_record_of_other_content_is_a_miss() {
    let (_dir, tier) = tier().await;
    let (one, two) = (KeyHash::of("example.test/1"), KeyHash::of("example.test/2"));
    store(&tier, one, b"body one", &meta("\"1\"")).await;
    store(&tier, two, b"body two", &meta("\"2\"")).await;
    let record = tier.store.get(&two).unwrap().unwrap().1;
    tier.store.put_raw(one, &record);
    tier.held.invalidate(&one);
    assert!(tier.get(&one).await.is_none());
    assert_eq!(etag_of(&tier, &two).await.as_deref(), Some("\"2\""));
}

/// Sweeps (`peek`) read metadata without holding it; hits (`get`) hold it.
#[tokio::test]
async fn peek_does_not_hold_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyHash::of("example.test/a");
    {
        let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
            .await
            .unwrap();
        store(&tier, key, b"body", &meta("\"a\"")).await;
    }
    let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    assert!(tier.peek(&key).await.is_some());
    tier.run_pending_tasks();
    assert_eq!(tier.held.entry_count(), 0);
    assert!(tier.get(&key).await.is_some());
    tier.run_pending_tasks();
    assert_eq!(tier.held.entry_count(), 1);
}

/// Overwrites a file in place (same inode) with `#` bytes of the same length.
fn damage_in_place(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len() as usize;
    rewrite_in_place(path, &vec![b'#'; len]);
}

/// Writes `bytes` over the file at `path`, the same inode (cacache's files are read-only).
fn rewrite_in_place(path: &Path, bytes: &[u8]) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A body too large to be kept inline: `the body` repeated.
fn body() -> Vec<u8> {
    b"the body".repeat(INLINE_MAX as usize / 8 + 1)
}

/// A tier holding one body, [`body`]: (guard, tier, its entry, its content file, the
/// cacache directory).
async fn one_body() -> (
    tempfile::TempDir,
    Arc<DiskTier>,
    Arc<DiskEntry>,
    PathBuf,
    PathBuf,
) {
    let (dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, &body(), &meta("\"a\"")).await;
    let entry = tier.get(&key).await.unwrap().entry;
    let path = tier.content_path(&entry.sri());
    let content = dir.path().join("content");
    (dir, tier, entry, path, content)
}

/// A whole read skips the hash only for the file whose bytes last matched it, unchanged;
/// a file replaced under the same name (a new inode) is hashed again and fails.
#[tokio::test]
async fn unchanged_file_skips_the_hash_replaced_file_does_not() {
    let (dir, _tier, entry, path, content) = one_body().await;
    assert!(
        path.is_file(),
        "cacache's content layout moved: {}",
        path.display()
    );
    // Seconds later, once the file's times have settled.
    let later = SystemTime::now() + STAMP_SETTLE * 2;

    let (data, how) = read_checked(&path, &content, &entry, later).unwrap();
    assert_eq!((&data[..], how), (&body()[..], Checked::Hashed));
    let (data, how) = read_checked(&path, &content, &entry, later).unwrap();
    assert_eq!((&data[..], how), (&body()[..], Checked::Unchanged));

    let replacement = dir.path().join("replacement");
    std::fs::write(&replacement, vec![b'#'; body().len()]).unwrap();
    std::fs::rename(&replacement, &path).unwrap();
    assert!(read_checked(&path, &content, &entry, later).is_err());
}

/// A file whose times are too recent to trust (a change in the same timestamp tick would
/// keep them) is hashed on every read, so damage in place is still caught.
#[tokio::test]
async fn recent_file_is_hashed_on_every_read() {
    let (_dir, _tier, entry, path, content) = one_body().await;

    let (_, how) = read_checked(&path, &content, &entry, SystemTime::now()).unwrap();
    assert_eq!(how, Checked::Hashed);
    assert_eq!(
        *entry
            .content_file(|| unreachable!("read above"))
            .checked
            .lock()
            .unwrap(),
        None
    );
    damage_in_place(&path);
    assert!(read_checked(&path, &content, &entry, SystemTime::now()).is_err());
}

/// A content file longer or shorter than its entry says is refused by a whole read, even when
/// what it starts with still matches the hash, and even once its stamp was trusted.
#[tokio::test]
async fn content_of_another_length_is_not_read_whole() {
    let (_dir, _tier, entry, path, content) = one_body().await;
    let later = SystemTime::now() + STAMP_SETTLE * 2;
    read_checked(&path, &content, &entry, later).unwrap();
    let (_, how) = read_checked(&path, &content, &entry, later).unwrap();
    assert_eq!(how, Checked::Unchanged);

    let mut longer = body().to_vec();
    longer.extend_from_slice(b"tail");
    rewrite_in_place(&path, &longer);
    let err = read_checked(&path, &content, &entry, later).unwrap_err();
    assert!(err.to_string().contains("the index says"), "{err}");

    rewrite_in_place(&path, &body()[..body().len() - 1]);
    let err = read_checked(&path, &content, &entry, later).unwrap_err();
    assert!(err.to_string().contains("the index says"), "{err}");
}

/// A read that fails without finding the body damaged (here, a directory of the content
/// path is briefly a file: ENOTDIR, as out of file descriptors would be EMFILE) leaves the
/// object stored, for whole reads and for the check ahead of a stream; damage removes it.
#[tokio::test]
async fn a_passing_read_failure_keeps_the_object() {
    let (dir, tier, entry, path, _content) = one_body().await;
    let key = KeyHash::of("example.test/a");
    let parent = path.parent().unwrap().to_path_buf();
    let aside = dir.path().join("aside");
    let hit = tier.get(&key).await.unwrap();
    assert_eq!(tier.read_all(&key, &hit).await.unwrap(), body());
    std::fs::rename(&parent, &aside).unwrap();
    std::fs::write(&parent, b"not a directory").unwrap();
    let err = tier.read_all(&key, &hit).await.unwrap_err();
    assert!(!is_damage(&err), "{err}");
    assert!(!tier.verify(&key, &hit).await);
    std::fs::remove_file(&parent).unwrap();
    std::fs::rename(&aside, &parent).unwrap();
    let hit = tier.get(&key).await.expect("still stored");
    assert!(Arc::ptr_eq(&hit.entry, &entry));
    assert_eq!(tier.read_all(&key, &hit).await.unwrap(), body());
    assert!(tier.verify(&key, &hit).await);

    rewrite_in_place(&path, &body()[1..]);
    assert!(!tier.verify(&key, &hit).await);
    assert!(tier.get(&key).await.is_none(), "damage removes it");
}

/// Where the content is not at the expected place, cacache's own checked read finds it.
#[tokio::test]
async fn content_elsewhere_falls_back_to_cacache() {
    let (dir, _tier, entry, _path, content) = one_body().await;
    let nowhere = dir.path().join("nowhere");
    let (data, how) = read_checked(&nowhere, &content, &entry, SystemTime::now()).unwrap();
    assert_eq!((&data[..], how), (&body()[..], Checked::Hashed));
}

/// Edits the metadata of a record in place (as JSON, for the edit's convenience), keeping its
/// checksum (now stale), as a hand edit or damage would.
fn tamper(tier: &DiskTier, key: KeyHash, edit: impl FnOnce(&mut serde_json::Value)) {
    let data = tier.store.get(&key).unwrap().unwrap().1;
    let len = u32::from_le_bytes(data[32..36].try_into().unwrap()) as usize;
    let file = read_msgpack(&data[36..36 + len]).unwrap();
    let mut v = serde_json::to_value(MetaFileOut::of(&file)).unwrap();
    edit(&mut v);
    let file: MetaFile = serde_json::from_value(v).unwrap();
    let mut meta = Vec::new();
    write_msgpack(&mut meta, &MetaFileOut::of(&file)).unwrap();
    let mut out = data[..32].to_vec();
    out.extend_from_slice(&u32::try_from(meta.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&data[36 + len..]);
    tier.store.put_raw(key, &out);
}

impl MetaFileOut<'_> {
    fn of(file: &MetaFile) -> MetaFileOut<'_> {
        MetaFileOut {
            integrity: file.integrity.clone(),
            size: file.size,
            inline: file.inline,
            meta: &file.meta,
        }
    }
}

/// An edit of a metadata file's JSON.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

/// The three edits of issue 13, item 9: the size, a byte of Content-Type, the status.
fn edits() -> Vec<(&'static str, Edit)> {
    vec![
        (
            "size",
            Box::new(|v| {
                let n = v["size"].as_u64().unwrap();
                v["size"] = (n - 3).into();
                v["meta"]["body_len"] = (n - 3).into();
            }),
        ),
        (
            "content-type",
            Box::new(|v| v["meta"]["headers"]["content-type"] = "text/htmm".into()),
        ),
        ("status", Box::new(|v| v["meta"]["status"] = 404.into())),
    ]
}

fn meta_with_type(etag: &str) -> Arc<CachedMeta> {
    let mut m = (*meta(etag)).clone();
    m.headers
        .insert("content-type", http::HeaderValue::from_static("text/html"));
    Arc::new(m)
}

/// Issue 13, item 9: metadata edited on disk is a miss (its entry removed and counted), both
/// at start-up and when a running tier reads the file; never served as edited.
#[tokio::test]
async fn tampered_metadata_is_a_miss() {
    for (what, edit) in edits() {
        for reopen in [true, false] {
            let (dir, tier) = tier().await;
            let key = KeyHash::of("example.test/a");
            store(&tier, key, b"the whole body", &meta_with_type("\"a\"")).await;
            tier.flush().await;
            tamper(&tier, key, &edit);
            let tier = if reopen {
                drop(tier);
                DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
                    .await
                    .unwrap()
                    .0
            } else {
                tier.held.invalidate(&key);
                tier
            };
            assert!(tier.get(&key).await.is_none(), "{what} (reopen: {reopen})");
            assert_eq!(tier.rejected_metadata(), 1, "{what} (reopen: {reopen})");
            tier.flush().await;
            assert!(
                tier.store.get(&key).unwrap().is_none(),
                "{what}: the tampered record stays"
            );
            assert!(!tier.contains(&key));
        }
    }
}

/// Metadata files of the previous design (one checksummed JSON file per object) are imported
/// at start-up; one that fails its check is dropped and counted, never misread.
#[tokio::test]
async fn metadata_files_of_the_previous_design_are_imported() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (KeyHash::of("example.test/a"), KeyHash::of("example.test/b"));
    let sri = {
        let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
            .await
            .unwrap();
        store(&tier, good, b"body", &meta("\"a\"")).await;
        let hit = tier.get(&good).await.unwrap();
        tier.flush().await;
        hit.entry.sri().to_string()
    };
    // The database goes; the content stays, as an upgrade from files would find it.
    std::fs::remove_file(dir.path().join("index.redb")).unwrap();
    let legacy = |m: &CachedMeta, version: u32| {
        let mut m = m.clone();
        m.version = version;
        let json = serde_json::to_vec(&MetaFileOut {
            integrity: sri.clone(),
            size: 4,
            inline: false,
            meta: &m,
        })
        .unwrap();
        let mut out = META_FILE_TAG.to_vec();
        out.extend_from_slice(blake3::hash(&json).to_hex().as_bytes());
        out.push(b'\n');
        out.extend_from_slice(&json);
        out
    };
    for (key, version) in [(good, crate::meta::META_VERSION), (bad, 999)] {
        let hex = key.hex();
        let shard = dir.path().join("meta").join(&hex[..2]);
        std::fs::create_dir_all(&shard).unwrap();
        std::fs::write(
            shard.join(format!("{hex}.json")),
            legacy(&meta("\"a\""), version),
        )
        .unwrap();
    }
    let (tier, loaded) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].key, good);
    assert_eq!(etag_of(&tier, &good).await.as_deref(), Some("\"a\""));
    assert!(tier.get(&bad).await.is_none());
    assert_eq!(tier.rejected_metadata(), 1);
    assert!(
        !dir.path().join("meta").exists(),
        "imported files are removed"
    );
}

/// Issue 13, item 9: before a stream, the content file must have the recorded length; a
/// body grown or cut on disk is a miss, even for an entry already checked in this run.
#[tokio::test]
async fn content_of_another_length_is_not_streamed() {
    for grow in [true, false] {
        let (_dir, tier) = tier().await;
        let key = KeyHash::of("example.test/a");
        let body = vec![b'x'; 300 * 1024];
        store(&tier, key, &body, &meta("\"a\"")).await;
        let hit = tier.get(&key).await.unwrap();
        assert!(tier.verify(&key, &hit).await);
        let path = tier.content_path(&hit.entry.sri());
        damage_in_place(&path);
        let mut data = std::fs::read(&path).unwrap();
        if grow {
            data.extend_from_slice(b"more");
        } else {
            data.truncate(data.len() - 1000);
        }
        std::fs::write(&path, data).unwrap();
        assert!(!tier.verify(&key, &hit).await, "grow: {grow}");
        assert!(tier.get(&key).await.is_none(), "grow: {grow}");
    }
}

/// Sets a file's modification time an hour back (before any start-up in the test).
fn age(path: &Path) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - std::time::Duration::from_secs(3600))
        .unwrap();
}

/// Issue 13, item 15: at start-up, content no index entry references (a crash between the
/// content commit and the metadata rename) is removed in the background and counted; content
/// that is referenced stays.
#[tokio::test]
async fn unreferenced_content_is_swept_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyHash::of("example.test/a");
    let content = dir.path().join("content");
    let orphan_path = {
        let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
            .await
            .unwrap();
        store(&tier, key, b"kept body", &meta("\"a\"")).await;
        // A body committed without its metadata file, as a crash before the rename leaves it.
        let orphan = cacache::write_hash(&content, b"orphan body").await.unwrap();
        tier.content_path(&orphan)
    };
    assert!(orphan_path.is_file(), "{}", orphan_path.display());
    for f in files_under(&content.join("content-v2")) {
        age(&f);
    }
    // Written just now: it could be a fill of the new run between its content commit and its
    // metadata file, so the sweep leaves it.
    let fresh = cacache::write_hash(&content, b"a fill in progress")
        .await
        .unwrap();
    let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !tier.swept().1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweep never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(tier.swept(), (1, true));
    assert!(!orphan_path.exists(), "the unreferenced body stays");
    assert!(
        tier.content_path(&fresh).is_file(),
        "a body of this run went"
    );
    let hit = tier.get(&key).await.unwrap();
    assert_eq!(&tier.read_all(&key, &hit).await.unwrap()[..], b"kept body");
}

/// A body up to `INLINE_MAX` is kept in its record (no content file), a larger one in
/// cacache; both read back whole, and across a restart.
#[tokio::test]
async fn small_bodies_are_inline_large_ones_in_cacache() {
    let dir = tempfile::tempdir().unwrap();
    let (small, large) = (KeyHash::of("example.test/s"), KeyHash::of("example.test/l"));
    let small_body = vec![b's'; INLINE_MAX as usize];
    {
        let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
            .await
            .unwrap();
        store(&tier, small, &small_body, &meta("\"s\"")).await;
        store(&tier, large, &body(), &meta("\"l\"")).await;
        let files = files_under(&dir.path().join("content").join("content-v2"));
        assert_eq!(
            files.len(),
            1,
            "one content file, for the large body: {files:?}"
        );
        assert!(tier.get(&small).await.unwrap().entry.inline);
        assert!(!tier.get(&large).await.unwrap().entry.inline);
    }
    let (tier, loaded) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    assert_eq!(loaded.len(), 2);
    for (key, want) in [(small, small_body), (large, body())] {
        let hit = tier.get(&key).await.unwrap();
        assert_eq!(tier.read_all(&key, &hit).await.unwrap(), want);
        let streamed: Vec<u8> = futures_util::StreamExt::collect::<Vec<_>>(tier.stream(key, &hit))
            .await
            .into_iter()
            .flat_map(|c| c.unwrap().to_vec())
            .collect();
        assert_eq!(streamed, want);
    }
}

/// An inline body damaged in its record is a miss: the record fails its checksum.
#[tokio::test]
async fn damaged_inline_body_is_a_miss() {
    let (_dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, b"a small body", &meta("\"a\"")).await;
    tier.flush().await;
    let mut record = tier.store.get(&key).unwrap().unwrap().1;
    let last = record.len() - 1;
    record[last] ^= 1;
    tier.store.put_raw(key, &record);
    tier.held.invalidate(&key);
    assert!(tier.get(&key).await.is_none());
    assert_eq!(tier.rejected_metadata(), 1);
}

/// A record as the earlier formats wrote it: JSON metadata, checked with xxh3-128 and
/// [`JSON_XXH3_TAG`], or with blake3 (the first records).
fn json_record(file: &MetaFileOut<'_>, body: &[u8], format: RecordFormat) -> Vec<u8> {
    let json = serde_json::to_vec(file).unwrap();
    let mut out = vec![0; 32];
    out.extend_from_slice(&u32::try_from(json.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(body);
    match format {
        RecordFormat::Json => {
            let sum = xxhash_rust::xxh3::xxh3_128(&out[32..]);
            out[..16].copy_from_slice(&sum.to_le_bytes());
            out[16..32].copy_from_slice(JSON_XXH3_TAG);
        }
        RecordFormat::JsonBlake3 => {
            let hash = blake3::hash(&out[32..]);
            out[..32].copy_from_slice(hash.as_bytes());
        }
        RecordFormat::MsgPack => unreachable!("not an earlier format"),
    }
    out
}

/// Records are written with MessagePack metadata, and records of the earlier formats (JSON
/// metadata, checked with xxh3 or with blake3) are read as they were: their metadata and their
/// inline body. Damaged, each is refused.
#[test]
fn records_of_every_format_are_read() {
    let m = meta("\"a\"");
    let body = b"an inline body";
    let sri = writer::inline_integrity(body);
    let file = MetaFileOut {
        integrity: sri.text(),
        size: body.len() as u64,
        inline: true,
        meta: &m,
    };
    let entry = DiskEntry::inline(sri, body.len() as u64, true);
    let written = encode_record(&file, body).unwrap();
    assert_eq!(&written[16..32], RECORD_TAG);
    for (format, mut record) in [
        (RecordFormat::MsgPack, written),
        (
            RecordFormat::Json,
            json_record(&file, body, RecordFormat::Json),
        ),
        (
            RecordFormat::JsonBlake3,
            json_record(&file, body, RecordFormat::JsonBlake3),
        ),
    ] {
        assert_eq!(checked_record(&record).map(|r| r.0), Some(format));
        let (read, inline) = decode_record(&record).unwrap();
        assert_eq!(
            (read.integrity.as_str(), read.size, read.inline, inline),
            (file.integrity.as_str(), file.size, true, &body[..]),
            "{format:?}"
        );
        assert_eq!(
            serde_json::to_value(&read.meta).unwrap(),
            serde_json::to_value(&*m).unwrap(),
            "{format:?}: the metadata as it was written"
        );
        let range = record_body(&record, &entry).expect("the inline body");
        assert_eq!(&record[range], body);
        let last = record.len() - 1;
        record[last] ^= 1;
        assert!(matches!(decode_record(&record), Err(MetaReject::Checksum)));
        assert!(record_body(&record, &entry).is_none());
    }
}

/// Records hold their metadata as MessagePack arrays: every struct's fields by position, ours
/// and http-cache-semantics' policy's. Should a field be moved, or added anywhere but at the
/// end (with `#[serde(default)]`), or a new version of the crate reorder its own, records
/// written before would be misread (two `u64` times swapped, two header maps) or refused. This
/// pins the layout they were written with; when it fails, the records need a new
/// [`RECORD_TAG`] (or `META_VERSION`).
#[test]
fn the_stored_layout_is_the_one_records_were_written_with() {
    /// A struct's field names in the order it serialises them (as a JSON object), with those
    /// of its `opts` field (the policy's options).
    #[derive(Debug, Default, PartialEq)]
    struct Fields(Vec<String>, Vec<String>);
    impl<'de> Deserialize<'de> for Fields {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Names;
            impl<'de> serde::de::Visitor<'de> for Names {
                type Value = Fields;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a struct")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Fields, A::Error> {
                    let mut out = Fields::default();
                    while let Some(k) = m.next_key::<String>()? {
                        if k == "opts" {
                            out.1 = m.next_value::<Fields>()?.0;
                        } else {
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                        out.0.push(k);
                    }
                    Ok(out)
                }
            }
            d.deserialize_map(Names)
        }
    }
    fn fields_of(value: &impl Serialize) -> Fields {
        serde_json::from_slice(&serde_json::to_vec(value).unwrap()).unwrap()
    }
    let names = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let m = meta("\"a\"");
    let record = MetaFileOut {
        integrity: "sha256-AAAA".into(),
        size: 0,
        inline: false,
        meta: &m,
    };
    assert_eq!(
        fields_of(&record).0,
        names(&["integrity", "size", "inline", "meta"])
    );
    assert_eq!(
        fields_of(&*m).0,
        names(&[
            "version",
            "key",
            "status",
            "headers",
            "policy",
            "stored_at_ms",
            "fresh_until_ms",
            "swr_secs",
            "sie_secs",
            "body_len",
            "vary",
            "tags",
            "purge_seq"
        ])
    );
    assert_eq!(
        fields_of(&m.policy),
        Fields(
            names(&[
                "req",
                "res",
                "uri",
                "status",
                "method",
                "opts",
                "res_cc",
                "req_cc",
                "response_time"
            ]),
            names(&[
                "shared",
                "cache_heuristic",
                "immutable_min_time_to_live",
                "ignore_cargo_cult"
            ])
        )
    );
}

/// An entry keeps a SHA-256 content hash as its 32 bytes and gives back the same integrity;
/// any other algorithm is kept as it is.
#[test]
fn content_hashes_are_kept_compact_and_exact() {
    let sha = Integrity::from(b"some body");
    assert!(matches!(Sri::of(sha.clone()), Sri::Sha256(_)));
    assert_eq!(Sri::of(sha.clone()).integrity(), sha);
    assert_eq!(
        Sri::of(sha.clone()).integrity().to_string(),
        sha.to_string()
    );
    assert_eq!(Sri::of(sha.clone()).text(), sha.to_string());
    // A record's integrity text is recognised without building one.
    let text = sha.to_string();
    assert!(Sri::of(sha.clone()).is_text(text.as_bytes()));
    let another = Integrity::from(b"another body").to_string();
    assert!(!Sri::of(sha.clone()).is_text(another.as_bytes()));
    assert!(!Sri::of(sha.clone()).is_text(&text.as_bytes()[..50]));
    // xxh3-128, as inline bodies are named: 16 bytes.
    let xxh =
        cacache::Integrity::from_hex("00112233445566778899aabbccddeeff", cacache::Algorithm::Xxh3)
            .unwrap();
    assert!(matches!(Sri::of(xxh.clone()), Sri::Xxh3(_)));
    assert_eq!(Sri::of(xxh.clone()).integrity(), xxh);
    assert_eq!(Sri::of(xxh.clone()).text(), xxh.to_string());
    assert!(Sri::of(xxh.clone()).is_text(xxh.to_string().as_bytes()));
    assert!(!Sri::of(xxh.clone()).is_text(text.as_bytes()));
    let other = cacache::Integrity::from_hex("00ff", cacache::Algorithm::Xxh3).unwrap();
    assert!(matches!(Sri::of(other.clone()), Sri::Other(_)));
    assert_eq!(Sri::of(other.clone()).integrity(), other);
    assert_eq!(Sri::of(other.clone()).text(), other.to_string());
    assert!(Sri::of(other.clone()).is_text(other.to_string().as_bytes()));
    assert!(!Sri::of(other).is_text(text.as_bytes()));
}

/// Polls (bounded) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

/// A content file goes with the last entry that names it: two keys storing the same body
/// share one file, which stays while either holds it, and while a stream still reads it.
#[tokio::test]
async fn a_content_file_goes_with_the_last_entry_naming_it() {
    let (dir, tier) = tier().await;
    let (one, two) = (KeyHash::of("example.test/1"), KeyHash::of("example.test/2"));
    store(&tier, one, &body(), &meta("\"1\"")).await;
    store(&tier, two, &body(), &meta("\"2\"")).await;
    let content = dir.path().join("content").join("content-v2");
    assert_eq!(
        files_under(&content).len(),
        1,
        "one file for the shared body"
    );

    tier.remove(&one).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        files_under(&content).len(),
        1,
        "still named by the other key"
    );

    // A stream started before the last removal keeps the file until it ends.
    let hit = tier.get(&two).await.unwrap();
    let stream = tier.stream(two, &hit);
    drop(hit);
    tier.remove(&two).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(files_under(&content).len(), 1, "a stream still reads it");
    let streamed: Vec<u8> = futures_util::StreamExt::collect::<Vec<_>>(stream)
        .await
        .into_iter()
        .flat_map(|c| c.unwrap().to_vec())
        .collect();
    assert_eq!(streamed, body());
    // The held metadata's copy of the entry goes at the tier's next housekeeping.
    until("the unnamed file goes", || {
        tier.run_pending_tasks();
        files_under(&content).is_empty()
    })
    .await;
}

/// A replaced copy's content file is unlinked only once the commit that replaced it is
/// durable: a kill -9 before then leaves a database file that still names the old copy, whose
/// body must still be there (else the restart finds a damaged object).
#[tokio::test]
async fn a_replaced_content_file_stays_until_the_replacing_commit_is_durable() {
    let (dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, &body(), &meta("\"1\"")).await;
    let content = dir.path().join("content").join("content-v2");
    let old = files_under(&content);
    let old_sri = Integrity::from(&body()[..]);
    assert_eq!(old, [tier.content_path(&old_sri)]);

    let mut w = tier.begin_write(key);
    let mut new = body();
    new[0] ^= 1;
    w.write(Bytes::from(new)).await.unwrap();
    let durable = w.commit_visible(&meta("\"2\"")).await.unwrap();
    // No sync from here until the release (at most one came between the commit and the hold).
    let release = tier.store.hold().await;
    // The held metadata's copy of the old entry goes at the tier's housekeeping.
    for _ in 0..3 {
        tier.run_pending_tasks();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tier.index.get(&key).is_some_and(|e| e.sri() != old_sri),
        "the new copy is indexed"
    );
    assert!(
        tier.refs.is_referenced(&old_sri.to_string()),
        "the replaced copy stays referenced while the put replacing it may still be lost"
    );
    assert!(
        old[0].is_file(),
        "the replaced copy's file went before the commit replacing it was durable"
    );
    drop(release);
    durable.wait().await.unwrap();
    until("the replaced copy's file goes", || {
        tier.run_pending_tasks();
        !old[0].exists()
    })
    .await;
    assert_eq!(files_under(&content).len(), 1);
}

/// An index file that is not a database (damage, a stray file) does not stop the tier: it is
/// moved aside, and the tier starts empty and stores again.
#[tokio::test]
async fn an_index_that_is_not_a_database_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("index.redb"),
        b"not a database at all, just bytes",
    )
    .unwrap();
    let (tier, loaded) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    assert!(loaded.is_empty());
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("index.redb.damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept aside");
    let key = KeyHash::of("example.test/a");
    store(&tier, key, b"body", &meta("\"a\"")).await;
    assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"a\""));
}

/// A start-up load that did not finish (the tier closed under it) sweeps nothing: the bodies
/// of records it had not reached would look unreferenced.
#[tokio::test]
async fn an_unfinished_load_sweeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
            .await
            .unwrap();
        for i in 0..3 {
            let mut big = body();
            big.push(i);
            store(
                &tier,
                KeyHash::of(&format!("example.test/{i}")),
                &big,
                &meta("\"a\""),
            )
            .await;
        }
        tier.close().await;
    }
    let content = dir.path().join("content").join("content-v2");
    let files = files_under(&content);
    assert_eq!(files.len(), 3);
    // Written long before this start, as after any real restart.
    files.iter().for_each(|f| age(f));
    let gate = crate::disk::load_gate::hold(dir.path());
    let (tier, _rx) = DiskTier::open(dir.path(), 1 << 30, 4 << 20).await.unwrap();
    tier.close().await;
    drop(gate);
    until("the load ends", || tier.load_state().done).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        files_under(&content).len(),
        3,
        "referenced bodies were swept"
    );
    assert_eq!(tier.swept(), (0, false));
}

/// An eviction deletes the evicted copy's record only: a newer copy whose record committed
/// before the eviction was handled, but which the index does not show yet (its commit has
/// just returned), keeps its record.
#[tokio::test]
async fn an_eviction_never_deletes_a_newer_copy() {
    let (_dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, b"old body", &meta("\"old\"")).await;
    let old = tier.get(&key).await.unwrap().entry;
    // quick_cache evicts the old copy for space...
    tier.index.remove(&key);
    // ...while a fill commits a new copy's record, not yet in the index...
    let new_meta = meta("\"new\"");
    let new = Integrity::from(&b"new body"[..]);
    let put = MetaFileOut {
        integrity: new.to_string(),
        size: 8,
        inline: true,
        meta: &new_meta,
    }
    .put(key, b"new body")
    .unwrap();
    assert!(tier.store.put(put).await.unwrap().is_some());
    // ...and only then is the eviction handled.
    tier.evicted(Deletion { key, entry: old });
    tier.flush().await;
    let record = tier
        .store
        .get(&key)
        .unwrap()
        .expect("the new copy's record stays");
    assert_eq!(
        decode_record(&record.1).unwrap().0.integrity,
        new.to_string()
    );
}

/// A 304's metadata update made for a copy that a new fill has replaced meanwhile is not
/// written, even when the new copy has the same body: the new copy keeps its own metadata.
#[tokio::test]
async fn a_metadata_update_never_lands_on_another_copy() {
    for new_body in [&b"new body"[..], b"old body"] {
        let (_dir, tier) = tier().await;
        let key = KeyHash::of("example.test/a");
        store(&tier, key, b"old body", &meta("\"old\"")).await;
        let old = tier.get(&key).await.unwrap().entry;
        // The update was prepared for the old copy, and lands after a new one.
        let refreshed = meta("\"old-refreshed\"");
        let mut put = MetaFileOut {
            integrity: old.sri().to_string(),
            size: old.size,
            inline: old.inline,
            meta: &refreshed,
        }
        .put(key, b"old body")
        .unwrap();
        put.expect = Some(old.copy());
        store(&tier, key, new_body, &meta("\"new\"")).await;
        assert!(tier.store.put(put).await.unwrap().is_none(), "not applied");
        tier.held.invalidate(&key);
        assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"new\""));
    }
}

/// Removing an unreferenced content file and taking a reference to a just-committed one
/// exclude each other: the removal never runs while a reference is held, and a reference
/// taken after a removal finds the file gone (its write then fails, storing nothing) and
/// leaves no count behind.
#[tokio::test]
async fn content_removal_and_new_references_exclude_each_other() {
    let (dir, tier) = tier().await;
    let path = dir.path().join("content-file");
    std::fs::write(&path, b"x").unwrap();
    let sri = Integrity::from(&b"x"[..]);
    let key = sri.to_string();

    let held = tier
        .refs
        .take_committed(&sri, &path)
        .expect("the file is there");
    assert!(
        tier.refs
            .remove_if_unreferenced(&key, || std::fs::remove_file(&path))
            .is_none(),
        "referenced: not removed"
    );
    assert!(path.is_file());
    drop(held);
    assert!(
        !tier.refs.is_referenced(&key),
        "the count falls back on drop"
    );
    assert!(matches!(
        tier.refs
            .remove_if_unreferenced(&key, || std::fs::remove_file(&path)),
        Some(Ok(()))
    ));
    assert!(
        tier.refs.take_committed(&sri, &path).is_none(),
        "the file is gone"
    );
    assert!(!tier.refs.is_referenced(&key), "no count left behind");
}

/// A database of the previous layout (records keyed by key hash, entries without a sequence
/// number) keeps serving its objects: inline and content-file bodies are hits, and a 304's
/// update or a new copy moves the object to the sequential layout, leaving nothing of the old
/// one behind. Across restarts.
#[tokio::test]
async fn records_of_the_previous_layout_are_served_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let open = || DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded());
    let small = KeyHash::of("example.test/small");
    let large = KeyHash::of("example.test/large");
    let (tier, _) = open().await.unwrap();
    store(&tier, small, b"small body", &meta("\"s1\"")).await;
    store(&tier, large, &body(), &meta("\"l1\"")).await;
    tier.store.downgrade().await;
    tier.close().await;
    drop(tier);

    let (tier, _) = open().await.unwrap();
    assert_eq!(tier.index.get(&small).unwrap().record_seq(), 0);
    for (key, expected, etag) in [
        (small, &b"small body"[..], "\"s1\""),
        (large, &body()[..], "\"l1\""),
    ] {
        let hit = tier
            .get(&key)
            .await
            .expect("a hit on a record of the previous layout");
        assert_eq!(hit.meta.etag(), Some(etag));
        assert_eq!(&tier.read_all(&key, &hit).await.unwrap()[..], expected);
    }
    tier.update_meta(&small, &meta("\"s2\""), &*stored_meta(&tier, &small).await)
        .await
        .unwrap();
    assert_ne!(
        tier.index.get(&small).unwrap().record_seq(),
        0,
        "its update moves the record to `records`"
    );
    tier.flush().await;
    assert_eq!(tier.store.legacy_records(), 1, "the large one's is left");
    store(&tier, large, b"new large", &meta("\"l2\"")).await;
    assert_ne!(
        tier.index.get(&large).unwrap().record_seq(),
        0,
        "stored anew, in `records`"
    );
    tier.close().await;
    drop(tier);

    let (tier, _) = open().await.unwrap();
    assert_eq!(etag_of(&tier, &small).await.as_deref(), Some("\"s2\""));
    let hit = tier.get(&small).await.unwrap();
    assert_eq!(
        &tier.read_all(&small, &hit).await.unwrap()[..],
        b"small body"
    );
    assert_eq!(etag_of(&tier, &large).await.as_deref(), Some("\"l2\""));
    let hit = tier.get(&large).await.unwrap();
    assert_eq!(
        &tier.read_all(&large, &hit).await.unwrap()[..],
        b"new large"
    );
    tier.remove(&small).await;
    // The large one's went with the fold: the journal had not named it.
    tier.store.fold_now().await;
    assert_eq!(
        tier.store.legacy_records(),
        0,
        "the old copies' records are gone"
    );
}

/// A 304's metadata goes only onto a copy of the version it confirmed: a copy of another
/// version (another validator or length) keeps its own, and is handed back to the caller.
#[tokio::test]
async fn a_304_for_another_version_leaves_the_copy_as_it_is() {
    let (_dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, b"body", &meta("\"a\"")).await;
    let stored = stored_meta(&tier, &key).await;
    let mut longer = (*stored).clone();
    longer.body_len += 1;
    for other in [meta("\"other\""), Arc::new(longer)] {
        let update = tier.update_meta(&key, &meta("\"b\""), &other).await;
        assert!(
            matches!(update, Ok(MetaUpdate::OtherVersion(_))),
            "{update:?}"
        );
        assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"a\""));
    }
    // The version it confirmed gets the new metadata.
    let update = tier.update_meta(&key, &meta("\"b\""), &stored).await;
    assert!(matches!(update, Ok(MetaUpdate::Updated)), "{update:?}");
    assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"b\""));
}

/// Metadata read for a copy removed meanwhile is not held: held, it would keep the copy's
/// entry (and content file) alive past its removal.
#[tokio::test]
async fn metadata_of_a_copy_removed_meanwhile_is_not_held() {
    let (_dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, &body(), &meta("\"a\"")).await;
    tier.held.invalidate(&key);
    let entry = tier.index.get(&key).unwrap();
    let (file, body, _) = tier.read_record(&key, Some(&entry)).await.unwrap();
    tier.remove(&key).await;
    tier.hit(&key, entry.clone(), 0, file, body, true);
    assert!(tier.held.get(&key).is_none());
}

/// A removal made after the load ended, while a lookup that saw it running is still
/// installing what it read, is not undone by that lookup.
#[tokio::test]
async fn a_removal_beside_a_late_unloaded_lookup_stands() {
    let (_dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    store(&tier, key, b"body", &meta("\"a\"")).await;
    let entry = tier.index.get(&key).unwrap();
    let late = DiskEntry::inline(entry.sri.clone(), entry.size, false);
    late.set_record(entry.record_seq());
    // The lookup counted itself in before the load ended, and has read the record; the load
    // has ended, and waits for it.
    tier.unloaded_lookups.fetch_add(1, Ordering::SeqCst);
    tier.load_settling.store(true, Ordering::SeqCst);
    tier.remove(&key).await;
    assert!(tier.install(key, late).is_none(), "the removal stands");
    tier.unloaded_lookups.fetch_sub(1, Ordering::SeqCst);
    assert!(!tier.contains(&key));
}

/// Identical bodies share a content file: one key's removal while the start-up load has not
/// reached the other does not remove the file the other still names.
#[tokio::test]
async fn a_body_shared_with_a_key_not_loaded_yet_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (KeyHash::of("example.test/1"), KeyHash::of("example.test/2"));
    {
        let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
            .await
            .unwrap();
        store(&tier, one, &body(), &meta("\"a\"")).await;
        store(&tier, two, &body(), &meta("\"a\"")).await;
        tier.close().await;
    }
    let gate = load_gate::hold(dir.path());
    let (tier, mut loaded) = DiskTier::open(dir.path(), 1 << 30, 4 << 20).await.unwrap();
    let drain = tokio::spawn(async move { while loaded.recv().await.is_some() {} });
    let hit = tier
        .get(&one)
        .await
        .expect("found before the load reaches it");
    // The same file as `two`'s (which must not be looked up: that would count it).
    let file = tier.content_path(&hit.entry.sri());
    drop(hit);
    tier.remove(&one).await;
    tier.flush().await;
    // The held metadata lets its entry go (moka drops removed values in its housekeeping),
    // and the remover has time to act, were it to: the file is watched for a while.
    tier.run_pending_tasks();
    for _ in 0..40 {
        if !file.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    drop(gate);
    drain.await.unwrap();
    let hit = tier.get(&two).await.expect("loaded");
    assert_eq!(tier.read_all(&two, &hit).await.unwrap(), body());
}

/// Storing a key again replaces its record, and removing it removes the record: none is left
/// behind for the store to carry forever.
#[tokio::test]
async fn replaced_and_removed_objects_leave_no_record() {
    let (_dir, tier) = tier().await;
    let (a, b) = (KeyHash::of("example.test/a"), KeyHash::of("example.test/b"));
    store(&tier, a, b"one", &meta("\"1\"")).await;
    store(&tier, b, b"other", &meta("\"o\"")).await;
    store(&tier, a, b"two", &meta("\"2\"")).await;
    tier.update_meta(&a, &meta("\"3\""), &*stored_meta(&tier, &a).await)
        .await
        .unwrap();
    tier.flush().await;
    assert_eq!(tier.store.record_count(), 2);
    tier.remove(&a).await;
    tier.flush().await;
    assert_eq!(tier.store.record_count(), 1);
    assert_eq!(etag_of(&tier, &b).await.as_deref(), Some("\"o\""));
}

/// Copies of one key are indexed in the order their records commit: a streamed copy queued
/// first and a whole copy queued right after it (one group commit) leave the whole copy
/// indexed, the one whose record the key holds. Before, the first copy's task indexed its
/// entry when it woke, after the second copy's completion had indexed the newer one.
#[tokio::test]
async fn copies_of_one_key_are_indexed_in_commit_order() {
    let (_dir, tier) = tier().await;
    let key = KeyHash::of("example.test/a");
    let mut first = tier.begin_write(key);
    first.write(Bytes::from_static(b"first")).await.unwrap();
    let first_meta = meta("\"first\"");
    let mut first = Box::pin(first.commit(&first_meta));
    // Polled once: its put is queued, and it waits for the commit.
    assert!(futures_util::FutureExt::now_or_never(&mut first).is_none());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tier.store_whole(
        key,
        &Bytes::from_static(b"second"),
        &meta("\"second\""),
        || {},
        move |r| {
            let _ = tx.send(r);
        },
    );
    first.await.unwrap();
    rx.await.unwrap().unwrap();
    tier.flush().await;
    let hit = tier.get(&key).await.expect("stored");
    assert_eq!(hit.meta.etag(), Some("\"second\""));
    assert_eq!(&tier.read_all(&key, &hit).await.unwrap()[..], b"second");
}

/// A key stored again with the same body (a refetch after expiry that brought back the same
/// bytes) keeps its new copy, in memory and across a restart. The index hands the copy it
/// replaced to the deleter like an eviction; its removal used to be conditional on the
/// content hash, which the new copy shares, so it deleted the new record: the object was gone
/// after the next restart, and counted as an eviction. The tier's usage counts one copy
/// throughout, and nothing once it is removed.
#[tokio::test]
async fn an_identical_copy_survives_the_copy_it_replaced() {
    for body in [&b"small body"[..], &[7u8; 40 << 10][..]] {
        let (dir, tier) = tier().await;
        let key = KeyHash::of("example.test/a");
        store(&tier, key, body, &meta("\"1\"")).await;
        let one = (tier.stored_bytes(), tier.index_memory().0);
        let first = Arc::downgrade(&tier.index.get(&key).expect("indexed"));
        store(&tier, key, body, &meta("\"2\"")).await;
        // The deleter has run once the replaced entry is dropped; then its removal (if any)
        // is queued, and the flush commits it.
        for _ in 0..500 {
            tier.held.invalidate(&key);
            tier.held.run_pending_tasks();
            if first.upgrade().is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert!(
            first.upgrade().is_none(),
            "the replaced entry reached the deleter"
        );
        tier.flush().await;
        assert_eq!(tier.evictions(), 0, "a replaced copy is not an eviction");
        assert_eq!((tier.stored_bytes(), tier.index_memory().0), one);
        assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"2\""));
        drop(tier);
        let (reopened, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
            .await
            .unwrap();
        assert_eq!(
            etag_of(&reopened, &key).await.as_deref(),
            Some("\"2\""),
            "the new copy survives a restart ({} bytes)",
            body.len()
        );
        let hit = reopened.get(&key).await.unwrap();
        assert_eq!(&reopened.read_all(&key, &hit).await.unwrap()[..], body);
        assert_eq!((reopened.stored_bytes(), reopened.index_memory().0), one);
        reopened.remove(&key).await;
        let set_aside = reopened.indexed.set_aside;
        assert_eq!(
            (reopened.stored_bytes(), reopened.index_memory().0),
            (0, set_aside),
            "only the journal's and the doorkeeper's shares are left"
        );
    }
}

/// An inline body's name is ssri's own xxh3-128 integrity of it (the same string), built
/// without its hex and base64 round trips.
#[test]
fn inline_bodies_are_named_as_ssri_names_xxh3() {
    let body = b"an inline body";
    let hex = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(body));
    let expected = cacache::Integrity::from_hex(hex, cacache::Algorithm::Xxh3).unwrap();
    assert_eq!(writer::inline_integrity(body).integrity(), expected);
    assert_eq!(writer::inline_integrity(body).text(), expected.to_string());
}

/// A large body stored and its stamp recorded by a settled read (as a whole read of a file
/// whose times are seconds old records it): (guard, tier, key, body, content file).
async fn streamed_body() -> (tempfile::TempDir, Arc<DiskTier>, KeyHash, Vec<u8>, PathBuf) {
    let (dir, tier) = tier().await;
    let key = KeyHash::of("example.test/large");
    let body: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    store(&tier, key, &body, &meta("\"l\"")).await;
    let hit = tier.get(&key).await.unwrap();
    let path = tier.content_path(&hit.entry.sri());
    let later = SystemTime::now() + STAMP_SETTLE * 2;
    let content = dir.path().join("content");
    let (_, how) = read_checked(&path, &content, &hit.entry, later).unwrap();
    assert_eq!(how, Checked::Hashed);
    (dir, tier, key, body, path)
}

/// A stream's chunks, each as it came.
async fn chunks(tier: &Arc<DiskTier>, key: KeyHash) -> Vec<io::Result<Bytes>> {
    let hit = tier.get(&key).await.unwrap();
    futures_util::StreamExt::collect(tier.stream(key, &hit)).await
}

/// A stream's body, every chunk of it arrived.
fn whole(chunks: Vec<io::Result<Bytes>>) -> Vec<u8> {
    chunks
        .into_iter()
        .flat_map(|c| c.unwrap().to_vec())
        .collect()
}

/// The bytes a stream sent before the error that ended it.
fn sent_before_error(chunks: &[io::Result<Bytes>]) -> usize {
    let (last, sent) = chunks.split_last().unwrap();
    assert!(last.is_err(), "the stream ends with an error");
    sent.iter().map(|c| c.as_ref().unwrap().len()).sum()
}

/// Whether a read of the content file at `path` hashes it (rather than its stamp vouching).
fn hashes(path: &Path, entry: &DiskEntry) -> bool {
    Checking::open(path, entry, SystemTime::now())
        .unwrap()
        .unwrap()
        .hashes()
}

/// A stream of `key` (its stamp vouching for its file) with `change` made after its first
/// chunk: every chunk, the first included.
async fn stream_changed_midway(
    tier: &Arc<DiskTier>,
    key: KeyHash,
    body: &[u8],
    path: &Path,
    change: impl AsyncFnOnce(),
) -> Vec<io::Result<Bytes>> {
    let hit = tier.get(&key).await.unwrap();
    assert!(!hashes(path, &hit.entry), "the stamp vouches for it");
    let mut stream = std::pin::pin!(tier.stream(key, &hit));
    let first = futures_util::StreamExt::next(&mut stream).await.unwrap();
    assert_eq!(&first.as_ref().unwrap()[..], &body[..STREAM_READ]);
    change().await;
    let mut all = vec![first];
    all.extend(futures_util::StreamExt::collect::<Vec<_>>(stream).await);
    all
}

/// A stream's check skips the hash for the file whose bytes last matched it, unchanged
/// ([`Checking::hashes`]), and the stream gives the whole body; a file changed in place since
/// is hashed again: its damage withholds the last chunk and removes the object. Read on the
/// blocking pool, or on the worker once the body is hot.
#[tokio::test]
async fn a_stream_hashes_a_file_not_known_unchanged() {
    for hot in [false, true] {
        stream_hashes_a_file_not_known_unchanged(hot).await;
    }
}

async fn stream_hashes_a_file_not_known_unchanged(hot: bool) {
    let (_dir, tier, key, body, path) = streamed_body().await;
    let hit = tier.get(&key).await.unwrap();
    if hot {
        assert_eq!(tier.read_all(&key, &hit).await.unwrap(), body);
    }
    assert_eq!(hit.entry.hot(), hot);
    assert!(
        !hashes(&path, &hit.entry),
        "the recorded stamp vouches for it"
    );
    assert_eq!(whole(chunks(&tier, key).await), body);

    damage_in_place(&path);
    assert!(hashes(&path, &hit.entry));
    let sent = sent_before_error(&chunks(&tier, key).await);
    assert!(sent < body.len(), "the last bytes are held back");
    assert!(
        tier.get(&key).await.is_none(),
        "the damaged object is removed"
    );
}

/// A file that changes while a stream vouches for it by its stamp (touched, not damaged) ends
/// that stream before its last bytes, but is not taken for damage: the object stays, and the
/// next stream hashes it.
#[tokio::test]
async fn a_file_touched_during_a_stream_is_not_vouched_for() {
    let (_dir, tier, key, body, path) = streamed_body().await;
    let got = stream_changed_midway(&tier, key, &body, &path, async || age(&path)).await;
    assert!(sent_before_error(&got) < body.len());
    let hit = tier.get(&key).await;
    assert!(hit.is_some(), "not damage: the object stays");
    assert!(hashes(&path, &hit.unwrap().entry));
    assert_eq!(whole(chunks(&tier, key).await), body);
}

/// cacache stores an identical body by renaming a new file over its path, which unlinks the
/// file a stream is reading: its ctime moves, its bytes do not. A stream the file's stamp
/// vouches for completes.
#[tokio::test]
async fn a_stream_outlives_its_body_stored_again() {
    use std::os::unix::fs::MetadataExt;
    let (_dir, tier, key, body, path) = streamed_body().await;
    let inode = std::fs::metadata(&path).unwrap().ino();
    let again = async || {
        store(
            &tier,
            KeyHash::of("example.test/again"),
            &body,
            &meta("\"l\""),
        )
        .await
    };
    let got = stream_changed_midway(&tier, key, &body, &path, again).await;
    assert_ne!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "a new file was renamed over the path"
    );
    assert_eq!(whole(got), body);
}

/// A file written in place during a stream its stamp vouches for, its mtime then set back (as
/// `cp -p` or `rsync -t` leave it), is not vouched for at the end: only its ctime moved, and
/// it was not unlinked. The stream ends before its last bytes.
#[tokio::test]
async fn a_file_rewritten_with_its_mtime_set_back_is_not_vouched_for() {
    let (_dir, tier, key, body, path) = streamed_body().await;
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let rewrite = async || {
        let mut changed = body.clone();
        changed[body.len() - 1] ^= 1;
        rewrite_in_place(&path, &changed);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    };
    let got = stream_changed_midway(&tier, key, &body, &path, rewrite).await;
    assert!(
        sent_before_error(&got) < body.len(),
        "the last bytes are not vouched for"
    );
}

/// Bodies read from disk count against the read budget until they are dropped: a whole read
/// takes its size, a stream takes [`STREAM_READ`] a chunk while the budget has room and reads
/// [`STREAM_READ_SMALL`] chunks, uncharged, when it has not; a whole read with no room is
/// refused (the caller streams it). Everything taken comes back.
#[tokio::test]
async fn reads_take_the_read_budget_until_their_bodies_are_dropped() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let budget = Budget::new(100 << 10);
    let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, budget.clone())
        .await
        .unwrap();
    let (big, small) = (KeyHash::of("big"), KeyHash::of("small"));
    let big_body: Vec<u8> = (0..(1 << 20) as u32).map(|i| i as u8).collect();
    let small_body = vec![7u8; 80 << 10];
    store(&tier, big, &big_body, &meta("\"b\"")).await;
    store(&tier, small, &small_body, &meta("\"s\"")).await;

    let hit = tier.get(&small).await.unwrap();
    let whole = tier.read_all(&small, &hit).await.unwrap();
    assert_eq!(&whole[..], &small_body[..]);
    assert_eq!(budget.used(), 80 << 10);
    let refused = tier.read_all(&small, &hit).await.unwrap_err();
    assert!(is_over_budget(&refused), "{refused}");
    drop(whole);
    assert_eq!(budget.used(), 0);

    let hit = tier.get(&big).await.unwrap();
    let mut stream = std::pin::pin!(tier.stream(big, &hit));
    let first = stream.next().await.unwrap().unwrap();
    // The first chunk (sent) and the second (held back) took 64 KiB each: the budget had
    // room for the first only.
    assert_eq!(first.len(), STREAM_READ);
    assert_eq!(budget.used(), STREAM_READ as u64);
    let second = stream.next().await.unwrap().unwrap();
    assert_eq!(second.len(), STREAM_READ_SMALL);
    let mut got = [first.to_vec(), second.to_vec()].concat();
    drop((first, second));
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, big_body);
    assert_eq!(budget.used(), 0, "every chunk gave its share back");
}

/// Past the read budget, a stream has three small chunks alive at most: the one it holds back
/// and two its consumer has. While its consumer holds those, the stream waits rather than read
/// on (HTTP/1's write queue and HTTP/2's send buffer would take more). A consumer that keeps
/// one chunk while it asks for the next (tokio-util's `StreamReader`, under the encoders) gets
/// the whole body.
#[tokio::test]
async fn a_stream_past_the_budget_keeps_three_small_chunks_alive_at_most() {
    tokio::time::timeout(Duration::from_secs(30), three_small_chunks())
        .await
        .expect("a stream waited for a chunk its consumer still needed");
}

async fn three_small_chunks() {
    use futures_util::{StreamExt, TryStreamExt};
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, Budget::new(0))
        .await
        .unwrap();
    let key = KeyHash::of("big");
    let body: Vec<u8> = (0..(96 << 10) as u32).map(|i| (i % 251) as u8).collect();
    store(&tier, key, &body, &meta("\"b\"")).await;
    let hit = tier.get(&key).await.unwrap();

    let mut stream = std::pin::pin!(tier.stream(key, &hit));
    let first = stream.next().await.unwrap().unwrap();
    let second = stream.next().await.unwrap().unwrap();
    assert_eq!(
        (first.len(), second.len()),
        (STREAM_READ_SMALL, STREAM_READ_SMALL)
    );
    let mut third = std::pin::pin!(stream.next());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut third)
            .await
            .is_err(),
        "a fourth chunk was read while three were alive"
    );
    let mut got = [first.to_vec(), second.to_vec()].concat();
    drop(first);
    got.extend_from_slice(&third.await.unwrap().unwrap());
    drop(second);
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, body);

    let mut read = Vec::new();
    let mut reader =
        tokio_util::io::StreamReader::new(tier.stream(key, &hit).map_err(io::Error::other).boxed());
    reader.read_to_end(&mut read).await.unwrap();
    assert_eq!(read, body);
}

/// The tier stores again after its index failed for a while (a full disk; redb fails every
/// operation after an I/O error until the database is opened again): an object stored before
/// is still a hit with its bytes, one whose commit failed is not stored (a miss, not a broken
/// hit), and a new one is stored, across a restart too. Before, nothing was stored again
/// until a restart.
#[tokio::test]
async fn the_tier_stores_again_after_its_index_failed() {
    let dir = tempfile::tempdir().unwrap();
    let failing = store::faults::switch(&dir.path().join("index.redb"));
    let open = || DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded());
    let (tier, _) = open().await.unwrap();
    let m = meta("\"a\"");
    let [a, b, c] = ["a", "b", "c"].map(|k| KeyHash::of(&format!("example.test/{k}")));
    store(&tier, a, b"before", &m).await;
    failing.writes.store(true, Ordering::Release);
    let mut w = tier.begin_write(b);
    w.write(Bytes::from_static(b"during")).await.unwrap();
    assert!(
        w.commit(&m).await.is_err(),
        "its commit cannot be made durable"
    );
    assert!(
        tier.index.get(&b).is_none(),
        "not left indexed, holding its share"
    );
    failing.writes.store(false, Ordering::Release);
    stores_again(&tier, c, &m).await;
    let body = async |tier: &Arc<DiskTier>, key: &KeyHash| match tier.get(key).await {
        Some(hit) => tier.read_all(key, &hit).await.ok(),
        None => None,
    };
    assert_eq!(body(&tier, &a).await.as_deref(), Some(&b"before"[..]));
    assert_eq!(body(&tier, &b).await, None);
    assert_eq!(body(&tier, &c).await.as_deref(), Some(&b"after"[..]));
    tier.close().await;
    let (tier, _) = open().await.unwrap();
    assert_eq!(body(&tier, &a).await.as_deref(), Some(&b"before"[..]));
    assert_eq!(body(&tier, &b).await, None);
    assert_eq!(body(&tier, &c).await.as_deref(), Some(&b"after"[..]));
}

/// Stores `after` under `key` until a commit is durable again (the index, failed, opened
/// again), within 10 s.
async fn stores_again(tier: &Arc<DiskTier>, key: KeyHash, m: &Arc<CachedMeta>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut w = tier.begin_write(key);
        w.write(Bytes::from_static(b"after")).await.unwrap();
        match w.commit(m).await {
            Ok(()) => return,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the tier never stored again: {e}"),
        }
    }
}

/// The start-up load survives the index failing under it (a read error latches the database,
/// and the writer opens it again): it reads the index again, and every object is indexed and
/// handed over once. Before, the load ended there, and the objects it had not reached were
/// misses until a restart.
#[tokio::test]
async fn the_load_reads_again_after_the_index_failed_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let failing = store::faults::switch(&dir.path().join("index.redb"));
    let keys: Vec<KeyHash> = (0..20)
        .map(|k| KeyHash::of(&format!("example.test/{k}")))
        .collect();
    {
        let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 0, unbounded())
            .await
            .unwrap();
        for key in &keys {
            store(&tier, *key, b"body", &meta("\"a\"")).await;
        }
        tier.close().await;
    }
    let gate = load_gate::hold(dir.path());
    // Without a page cache of its own (no held budget), the load's reads go to the file.
    let (tier, mut loaded) = DiskTier::open(dir.path(), 1 << 30, 0).await.unwrap();
    failing.reads.store(true, Ordering::Release);
    drop(gate);
    tokio::time::sleep(Duration::from_millis(300)).await;
    failing.reads.store(false, Ordering::Release);
    let mut handed = 0;
    while let Some(batch) = loaded.recv().await {
        handed += batch.len();
    }
    assert_eq!(handed, keys.len());
    assert_eq!(tier.load_state().loaded, keys.len() as u64);
    for key in &keys {
        assert!(tier.get(key).await.is_some(), "{key} was not loaded");
    }
}

/// Whether a file descriptor of this process has the file at `path` open, or the file that
/// was there before it was removed.
fn is_open(path: &Path) -> bool {
    let mut deleted = path.as_os_str().to_owned();
    deleted.push(" (deleted)");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == path || p == deleted))
}

/// A whole read whose file's stamp then vouches for it keeps the file open, and later reads go
/// through it: with its directory moved away (the path gone, the file itself untouched) the
/// body is still read, unchanged, where a read by path fails.
#[tokio::test]
async fn a_vouched_content_file_is_kept_open_and_read_through() {
    let (dir, _tier, entry, path, content) = one_body().await;
    let later = SystemTime::now() + STAMP_SETTLE * 2;
    let files = OpenFiles::new(4);
    let (data, how) = files.read_checked(&path, &content, &entry, later).unwrap();
    assert_eq!((&data[..], how), (&body()[..], Checked::Hashed));
    assert_eq!(files.len(), 1);
    assert!(is_open(&path));
    let parent = path.parent().unwrap();
    let moved = dir.path().join("moved");
    std::fs::rename(parent, &moved).unwrap();
    assert!(read_checked(&path, &content, &entry, later).is_err());
    let (data, how) = files.read_checked(&path, &content, &entry, later).unwrap();
    assert_eq!((&data[..], how), (&body()[..], Checked::Unchanged));
    std::fs::rename(&moved, parent).unwrap();
}

/// A file whose times are too recent to vouch for it is not kept (it is hashed on every read
/// until they settle).
#[tokio::test]
async fn a_recent_content_file_is_not_kept_open() {
    let (_dir, _tier, entry, path, content) = one_body().await;
    let files = OpenFiles::new(4);
    for _ in 0..2 {
        let (_, how) = files
            .read_checked(&path, &content, &entry, SystemTime::now())
            .unwrap();
        assert_eq!(how, Checked::Hashed);
    }
    assert_eq!(files.len(), 0);
}

/// A kept-open file written in place is not read through: the read opens and hashes the file
/// again, finds the damage, and lets the kept file go.
#[tokio::test]
async fn a_kept_file_changed_in_place_is_not_read_through() {
    let (_dir, _tier, entry, path, content) = one_body().await;
    let later = SystemTime::now() + STAMP_SETTLE * 2;
    let files = OpenFiles::new(4);
    files.read_checked(&path, &content, &entry, later).unwrap();
    assert_eq!(files.len(), 1);
    damage_in_place(&path);
    let Err(err) = files.read_checked(&path, &content, &entry, later) else {
        panic!("the damaged bytes were read");
    };
    assert!(is_damage(&err), "{err}");
    assert_eq!(files.len(), 0);
    assert!(!is_open(&path));
}

/// The tier keeps open the file of a body it reads whole once the file's times have settled,
/// and lets it go when the object is removed (a kept file would hold its disk space).
#[tokio::test]
async fn the_tier_lets_go_of_a_kept_file_when_its_object_goes() {
    let (_dir, tier, entry, path, _content) = one_body().await;
    let key = KeyHash::of("example.test/a");
    tokio::time::sleep(STAMP_SETTLE + Duration::from_millis(500)).await;
    let hit = tier.get(&key).await.unwrap();
    assert!(Arc::ptr_eq(&hit.entry, &entry));
    for _ in 0..2 {
        assert_eq!(&tier.read_all(&key, &hit).await.unwrap()[..], &body()[..]);
    }
    assert_eq!(tier.open_files.len(), 1);
    assert!(is_open(&path));
    drop((hit, entry));
    tier.remove(&key).await;
    // The held metadata's cache lets go of its copy of the entry at its next maintenance.
    tier.held.run_pending_tasks();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while path.exists() || is_open(&path) {
        assert!(
            std::time::Instant::now() < deadline,
            "the file stays: exists {}, open {}",
            path.exists(),
            is_open(&path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tier.open_files.len(), 0);
}

/// At most as many files are kept open as the bound says.
#[tokio::test]
async fn kept_open_files_are_bounded() {
    let (dir, tier) = tier().await;
    let later = SystemTime::now() + STAMP_SETTLE * 2;
    let content = dir.path().join("content");
    let files = OpenFiles::new(2);
    for k in 0..6u8 {
        let key = KeyHash::of(&format!("example.test/{k}"));
        let mut b = body();
        b[0] = k;
        store(&tier, key, &b, &meta("\"a\"")).await;
        let entry = tier.get(&key).await.unwrap().entry;
        let path = tier.content_path(&entry.sri());
        files.read_checked(&path, &content, &entry, later).unwrap();
    }
    assert!(files.len() <= 2, "{} kept", files.len());
}

/// A read failure that comes back at every reading of the index by the load (a damaged page
/// only it reads) ends the load after a few readings, as a failed load did before: it does not
/// read, and reopen the index, for ever, with the tier loading (its content never swept).
#[tokio::test]
async fn a_load_that_fails_at_every_reading_ends() {
    let dir = tempfile::tempdir().unwrap();
    let failing = store::faults::switch(&dir.path().join("index.redb"));
    {
        let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 0, unbounded())
            .await
            .unwrap();
        store(
            &tier,
            KeyHash::of("example.test/a"),
            b"body",
            &meta("\"a\""),
        )
        .await;
        tier.close().await;
    }
    failing.load_reads.store(true, Ordering::Release);
    let (tier, mut loaded) = DiskTier::open(dir.path(), 1 << 30, 0).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while loaded.recv().await.is_some() {}
    })
    .await;
    failing.load_reads.store(false, Ordering::Release);
    assert!(ended.is_ok(), "the load never ended");
    assert!(tier.load_state().done);
}

/// A body stored again, identical, replaces its content file (cacache renames the new one
/// over it): a kept-open copy of the old file is let go at once rather than hold its disk
/// space until the next read.
#[tokio::test]
async fn a_kept_file_replaced_by_an_identical_body_is_let_go() {
    let (_dir, tier, entry, path, content) = one_body().await;
    let later = SystemTime::now() + STAMP_SETTLE * 2;
    tier.open_files
        .read_checked(&path, &content, &entry, later)
        .unwrap();
    assert_eq!(tier.open_files.len(), 1);
    store(
        &tier,
        KeyHash::of("example.test/b"),
        &body(),
        &meta("\"b\""),
    )
    .await;
    assert_eq!(tier.open_files.len(), 0);
    assert!(!is_open(&path), "the replaced file is still open");
}

/// A warning that fires on every request while the disk fails is written once per interval,
/// standing for the occurrences folded into it, whatever thread they come from.
#[test]
fn a_throttled_warning_is_written_once_per_interval() {
    let throttle = Throttle::new();
    let written: usize = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|_| s.spawn(|| (0..1000).filter(|_| throttle.pass().is_some()).count()))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    assert_eq!(written, 1, "one line for a burst from four threads");
    // Past the interval, the next line stands for everything folded in meanwhile.
    throttle.next.store(0, Ordering::Release);
    assert_eq!(throttle.pass(), Some(4000));
    assert_eq!(throttle.pass(), None);
}

/// Checks of whole bodies ahead of a first stream (every object loaded from an earlier run
/// starts unchecked) run at most [`CHECK_JOBS`] at a time, and one whose request went before
/// its turn never runs: a burst of requests for large objects, each reset at once, used to
/// queue a read of every body on the blocking pool, uncancellable, ahead of every other disk
/// read (a hostile review). A check that ran records the file's stamp; counted after the
/// burst is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_of_whole_bodies_are_bounded_and_dropped_ones_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let n: u8 = 16;
    let key = |i: u8| KeyHash::of(&format!("example.test/{i}"));
    {
        let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
            .await
            .unwrap();
        for i in 0..n {
            store(&tier, key(i), &vec![i; 4 << 20], &meta("\"a\"")).await;
        }
        tier.close().await;
    }
    // Old enough for a check to record their stamps (both times: the ctime cannot be set).
    tokio::time::sleep(STAMP_SETTLE + Duration::from_millis(100)).await;
    let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    let mut hits = Vec::new();
    for i in 0..n {
        hits.push((key(i), tier.get(&key(i)).await.expect("stored")));
    }
    let tasks: Vec<_> = hits
        .iter()
        .cloned()
        .map(|(key, hit)| {
            let tier = Arc::clone(&tier);
            tokio::spawn(async move { tier.verify(&key, &hit).await })
        })
        .collect();
    // Every task starts (asks for its check), then every request goes.
    tokio::time::sleep(Duration::from_millis(5)).await;
    for t in &tasks {
        t.abort();
    }
    // What did run has ended well within this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let checked = hits
        .iter()
        .filter(|(_, hit)| {
            let file = hit.entry.content_file(PathBuf::new);
            file.checked.lock().unwrap().is_some()
        })
        .count();
    assert!(
        checked <= 2 * CHECK_JOBS,
        "{checked} of {n} bodies were read through for requests that had gone"
    );
    assert!(checked >= 1, "the checks that had their turn ran");
    assert_eq!(tier.jobs_started(Lane::Check) as usize, checked);
}

/// A tier lets only so many streams have a content file open at once (64 at its least): one
/// past them waits for a slot, ends with an error if none comes free, and gets one as soon as
/// another stream goes (a hostile review: slow HTTP/2 streams of large objects, 200 to a
/// connection, ran the process out of file descriptors and held memory past `--memory`).
#[tokio::test]
async fn streams_past_their_slots_wait_then_fail_and_get_one_when_another_goes() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, Budget::new(64 << 10))
        .await
        .unwrap();
    let key = KeyHash::of("example.test/big");
    store(&tier, key, &vec![7u8; 200 << 10], &meta("\"a\"")).await;
    let hit = tier.get(&key).await.unwrap();
    let slots = super::reader::stream_slots(64 << 10);
    assert_eq!(slots, 64);
    let mut open = Vec::new();
    for _ in 0..slots {
        let mut s = Box::pin(tier.stream(key, &hit));
        s.next().await.expect("a chunk").expect("read");
        open.push(s);
    }
    let mut late = Box::pin(tier.stream(key, &hit));
    let Some(Err(e)) = late.next().await else {
        panic!("a stream past the slots read its body");
    };
    assert!(!is_damage(&e), "{e}");
    open.pop();
    let mut next = Box::pin(tier.stream(key, &hit));
    next.next()
        .await
        .expect("a chunk")
        .expect("read once a slot came free");
    assert!(tier.get(&key).await.is_some(), "still stored");
}

/// A body of `len` bytes no two neighbours of which are equal over 251 bytes.
fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A tier holding a 4 MiB body whose content file a check has vouched for (its times settled
/// first): (guard, tier, key, body, content file).
async fn vouched_body() -> (tempfile::TempDir, Arc<DiskTier>, KeyHash, Vec<u8>, PathBuf) {
    let (dir, tier) = tier().await;
    let key = KeyHash::of("example.test/range");
    let body = patterned(4 << 20);
    store(&tier, key, &body, &meta("\"r\"")).await;
    tier.close().await;
    drop(tier);
    tokio::time::sleep(STAMP_SETTLE + Duration::from_millis(100)).await;
    // Loaded from an earlier run: checked (read through) before its first stream.
    let (tier, _) = DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded())
        .await
        .unwrap();
    let hit = tier.get(&key).await.unwrap();
    assert!(tier.verify(&key, &hit).await);
    let path = tier.content_path(&hit.entry.sri());
    (dir, tier, key, body, path)
}

async fn range_of(
    tier: &Arc<DiskTier>,
    key: KeyHash,
    start: u64,
    len: u64,
) -> Vec<io::Result<Bytes>> {
    let hit = tier.get(&key).await.expect("stored");
    futures_util::StreamExt::collect(tier.stream_range(key, &hit, start, len)).await
}

/// A range of a content file its stamp vouches for is read from the range's start: the last
/// 10 bytes of 4 MiB take one read, not the 64 chunks before them (a hostile review:
/// `Range: bytes=-1` read a whole large body, waiting on the disk meanwhile).
#[tokio::test]
async fn a_range_of_a_vouched_file_reads_only_its_bytes() {
    let (_dir, tier, key, body, _) = vouched_body().await;
    for (start, len) in [(body.len() as u64 - 10, 10), (1_000_000, 300_000), (0, 5)] {
        let before = tier.jobs_started(Lane::Read);
        let got: Vec<u8> = range_of(&tier, key, start, len)
            .await
            .into_iter()
            .flat_map(|c| c.expect("read").to_vec())
            .collect();
        assert!(
            got == body[start as usize..(start + len) as usize],
            "bytes {start}+{len}"
        );
        // Its opening and its chunks, on the blocking pool until a read makes the file hot
        // (then on this thread: the first range's are counted).
        let reads = tier.jobs_started(Lane::Read) - before;
        let chunks = len.div_ceil(STREAM_READ as u64) + 1;
        let least = u64::from(start == body.len() as u64 - 10);
        assert!(
            (least..=chunks).contains(&reads),
            "{reads} reads for {len} bytes from {start}"
        );
    }
}

/// A range of a content file changed in place since it was vouched for is hashed whole and
/// ends with an error before its last bytes (a hostile review: a 206 cut from the start of a
/// stream never reached the check at its end, so changed bytes went out as complete); the
/// damaged copy is removed.
#[tokio::test]
async fn a_range_of_a_file_changed_in_place_ends_before_its_last_bytes() {
    let (_dir, tier, key, body, path) = vouched_body().await;
    let mut changed = body.clone();
    changed[500] ^= 0xff;
    rewrite_in_place(&path, &changed);
    let got = range_of(&tier, key, 0, 1000).await;
    let sent: usize = got
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .map(|b| b.len())
        .sum();
    assert!(got.last().is_some_and(|c| c.is_err()), "ends with an error");
    assert!(sent < 1000, "{sent} of 1000 bytes sent");
    assert!(
        tier.get(&key).await.is_none(),
        "the damaged copy is removed"
    );
}

/// A copy that a put replaced comes back when that put is lost (made visible, then the index
/// failed and opened again without it): the reopened index names the old copy, and so does
/// the tier's again, its content file kept meanwhile. Before, the tier had let the old copy
/// go when the new one became visible and its file was removed; a failed re-push made the
/// pushed object before it vanish, for good after a restart (a hostile review).
#[tokio::test]
async fn a_copy_a_lost_put_replaced_is_served_again() {
    let dir = tempfile::tempdir().unwrap();
    let failing = store::faults::switch(&dir.path().join("index.redb"));
    let open = || DiskTier::open_loaded(dir.path(), 1 << 30, 4 << 20, unbounded());
    let (tier, _) = open().await.unwrap();
    let [a, c] = ["a", "c"].map(|k| KeyHash::of(&format!("example.test/{k}")));
    store(&tier, a, &body(), &meta("\"1\"")).await;
    let old_file = tier.content_path(&Integrity::from(&body()[..]));
    assert!(old_file.is_file());

    failing.writes.store(true, Ordering::Release);
    let mut new = body();
    new[0] ^= 1;
    let mut w = tier.begin_write(a);
    w.write(Bytes::from(new)).await.unwrap();
    assert!(
        w.commit(&meta("\"2\"")).await.is_err(),
        "its commit cannot be made durable"
    );
    failing.writes.store(false, Ordering::Release);
    stores_again(&tier, c, &meta("\"c\"")).await;
    for _ in 0..3 {
        tier.run_pending_tasks();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old_body = async |tier: &Arc<DiskTier>| {
        let hit = tier.get(&a).await.expect("the old copy is indexed again");
        assert_eq!(hit.meta.etag(), Some("\"1\""));
        tier.read_all(&a, &hit).await.expect("its body is there")
    };
    assert!(old_body(&tier).await == body());
    assert!(old_file.is_file(), "its content file stays");
    tier.close().await;
    drop(tier);
    let (tier, _) = open().await.unwrap();
    assert!(old_body(&tier).await == body(), "after a restart");
}

/// A whole read of a body over 128 KiB takes the Whole lane: neither behind the checks of
/// whole bodies (the Check lane's two slots, which a request for a large object never checked
/// since the start can hold for as long as its file takes to read), nor among the short reads
/// it would crowd (a hostile review, twice).
#[tokio::test]
async fn a_whole_read_of_a_mid_size_body_takes_its_own_lane() {
    let (_dir, tier) = tier().await;
    let key = KeyHash::of("example.test/mid");
    let body = patterned(200 << 10);
    store(&tier, key, &body, &meta("\"m\"")).await;
    let hit = tier.get(&key).await.unwrap();
    let lanes = || [Lane::Read, Lane::Whole, Lane::Check].map(|l| tier.jobs_started(l));
    let before = lanes();
    assert!(tier.read_all(&key, &hit).await.unwrap() == body);
    assert_eq!(lanes(), [before[0], before[1] + 1, before[2]]);
}

/// Two puts of a key lost in a row (both visible, neither durable): the copy before both comes
/// back, not the first lost one (whose record the reopened index does not have), and a copy
/// put back is a new entry, so the index handing the old one over as replaced deletes no
/// record (a review of this session's fix).
#[tokio::test]
async fn after_two_lost_puts_the_durable_copy_before_them_comes_back() {
    let (_dir, tier) = tier().await;
    let a = KeyHash::of("example.test/a");
    store(&tier, a, &body(), &meta("\"1\"")).await;
    let new_entry = |byte: u8| {
        let mut b = body();
        b[0] = byte;
        let e = DiskEntry::new(
            Integrity::from(&b[..]),
            b.len() as u64,
            true,
            false,
            &tier.refs,
        );
        e.durable.store(false, Ordering::Release);
        e
    };
    let (p, q) = (new_entry(b'p'), new_entry(b'q'));
    // Indexed in commit order, each keeping the copy it replaced.
    p.supersede(tier.index_entry(a, Arc::clone(&p)));
    q.supersede(tier.index_entry(a, Arc::clone(&q)));
    // Lost, told in commit order.
    tier.lost(&a, &p);
    tier.lost(&a, &q);
    for _ in 0..3 {
        tier.run_pending_tasks();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tier.flush().await;
    let hit = tier
        .get(&a)
        .await
        .expect("the durable copy is indexed again");
    assert_eq!(hit.meta.etag(), Some("\"1\""));
    assert!(tier.read_all(&a, &hit).await.unwrap() == body());
}
