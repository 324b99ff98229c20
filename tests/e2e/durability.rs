//! Durability of the disk tier and the purge state, end to end on a real edge: `EdgeServer`
//! in-process over real sockets on 127.0.0.1 (data and admin ports picked by the OS, a disk tier
//! in a tempdir), in front of the programmable test origin, which counts every request. Each
//! test restarts the edge on the same cache directory, with files changed in between as a full
//! disk, a crash or a hand edit would leave them (issue 13, items 7, 9 and 15).
//!
//! - a purge whose state cannot be written is refused (500) and changes nothing, before and
//!   after a restart, and leaves no `purges.json.tmp`; the purge sequence never goes backwards,
//!   even when `purges.json` is lost;
//! - metadata edited on disk (size, Content-Type, status) is a MISS refetched from the origin,
//!   never the edited response;
//! - content no metadata references and a stale `purges.json.tmp` are removed at start-up.
//!
//! The tests may run as root, where a read-only directory does not stop a write: a failing
//! write is made by putting a directory where `purges.json` goes, so the rename onto it fails.
//! Every wait is bounded (`WAIT`); nothing asserts on speed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::{Value, json};

use crate::support::admin::{self, Extra, ROOT, get, get_hit, purge_as};
use crate::support::edge::Edge;
use crate::support::eventually;
use crate::support::files::files_under;
use crate::support::test_origin::{Reply, TestOrigin};
use crate::support::{WAIT, client};

// ---------------------------------------------------------------------------------------------
// Harness (the admin edge of the purge tests)
// ---------------------------------------------------------------------------------------------

/// Starts an edge on `dir` with 1 MiB of memory: objects above 128 KiB stream from disk.
async fn start_edge(origin: &TestOrigin, dir: &Path) -> Edge {
    let extra = Extra {
        name: Some("edge-d"),
        cache: "memory = \"1MiB\"",
        ..Extra::default()
    };
    admin::start(origin, dir, extra).await
}

/// Waits (bounded) until the disk tier holds exactly `n` objects, so a restart finds them.
async fn wait_disk_exactly(edge: &Edge, n: u64) {
    eventually(
        &format!("the disk tier holds exactly {n} objects"),
        async || edge.disk_objects().await == n,
    )
    .await;
}

/// `POST /purge` on the admin API with the root token: (status, body).
async fn purge(c: &reqwest::Client, edge: &Edge, body: Value) -> (u16, Value) {
    let r = purge_as(c, edge, Some(ROOT), body).await;
    (r.status, r.json_or_text())
}

/// A purge the edge must acknowledge; returns its sequence number.
async fn purged(c: &reqwest::Client, edge: &Edge, body: Value) -> u64 {
    let (status, answer) = purge(c, edge, body.clone()).await;
    assert_eq!(status, 200, "POST /purge {body}: {answer}");
    answer["seq"].as_u64().expect("a sequence number")
}

/// `path` answers `<path> v<n>` (n counts the origin's requests), fresh for 10 minutes.
fn cacheable(origin: &TestOrigin, path: &'static str) {
    origin.route_fn(path, move |_, n| {
        Reply::ok(format!("{path} v{n}"))
            .header("cache-control", "public, max-age=600")
            .header("content-type", "text/plain")
    });
}

/// The disk index's tables (its on-disk format), opened while the edge is stopped: `records`
/// maps a sequence number to a metadata record (a 32-byte checksum of the rest, the
/// metadata's length as a little-endian u32, the metadata as MessagePack, an inline body). An object's compact entry, whose bytes 2..10
/// are its record's sequence number (a little-endian u64, format 3), is in `entries` under its
/// key hash, unless the `journal` has a later word on the key: its records, in key order, are
/// the key hash, then 1 and the entry (a put), 2 (a removal), or 3 and a sequence number (the
/// removal of that copy).
const RECORDS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("records");
const ENTRIES: redb::TableDefinition<&[u8; 32], &[u8]> = redb::TableDefinition::new("entries");
const JOURNAL: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("journal");

fn index_db(cache_dir: &Path) -> redb::Database {
    redb::Database::open(cache_dir.join("index.redb")).expect("open the disk index")
}

/// The sequence number of an entry's record.
fn record_seq(entry: &[u8]) -> u64 {
    assert_eq!(entry[0], 3, "entry format");
    u64::from_le_bytes(entry[2..10].try_into().unwrap())
}

/// Every object's record's sequence number: the entries, with the journal applied.
fn objects(txn: &redb::ReadTransaction) -> std::collections::BTreeMap<[u8; 32], u64> {
    use redb::ReadableTable;
    let entries = txn.open_table(ENTRIES).unwrap();
    let mut all: std::collections::BTreeMap<[u8; 32], u64> = entries
        .range(..)
        .unwrap()
        .map(|r| {
            let (k, v) = r.unwrap();
            (*k.value(), record_seq(v.value()))
        })
        .collect();
    let journal = txn.open_table(JOURNAL).unwrap();
    for r in journal.range(..).unwrap() {
        let (_, v) = r.unwrap();
        let v = v.value();
        let key: [u8; 32] = v[..32].try_into().unwrap();
        match v[32] {
            1 => {
                all.insert(key, record_seq(&v[33..]));
            }
            2 => {
                all.remove(&key);
            }
            3 => {
                let gone = u64::from_le_bytes(v[33..41].try_into().unwrap());
                if all.get(&key) == Some(&gone) {
                    all.remove(&key);
                }
            }
            op => panic!("journal record of kind {op}"),
        }
    }
    all
}

/// Every metadata record: (key hash, record).
fn records(cache_dir: &Path) -> Vec<([u8; 32], Vec<u8>)> {
    use redb::{ReadableDatabase, ReadableTable};
    let db = index_db(cache_dir);
    let txn = db.begin_read().unwrap();
    let records = txn.open_table(RECORDS).unwrap();
    objects(&txn)
        .into_iter()
        .map(|(k, seq)| {
            let record = records.get(seq).unwrap().unwrap();
            (k, record.value().to_vec())
        })
        .collect()
}

/// Replaces a record (`Some`), or removes an object's record and every word on it, as if it
/// had never been written (`None`).
fn set_record(cache_dir: &Path, key: &[u8; 32], record: Option<&[u8]>) {
    use redb::{ReadableDatabase, ReadableTable};
    let db = index_db(cache_dir);
    let seq = objects(&db.begin_read().unwrap())[key];
    let txn = db.begin_write().unwrap();
    {
        let mut records = txn.open_table(RECORDS).unwrap();
        match record {
            Some(r) => {
                records.insert(seq, r).unwrap();
            }
            None => {
                records.remove(seq).unwrap();
                txn.open_table(ENTRIES).unwrap().remove(key).unwrap();
                let mut journal = txn.open_table(JOURNAL).unwrap();
                let words: Vec<u64> = journal
                    .range(..)
                    .unwrap()
                    .map(|r| r.unwrap())
                    .filter(|(_, v)| v.value()[..32] == key[..])
                    .map(|(j, _)| j.value())
                    .collect();
                for j in words {
                    journal.remove(j).unwrap();
                }
            }
        }
    }
    txn.commit().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Item 7: a purge counts only once it is durable
// ---------------------------------------------------------------------------------------------

/// Issue 13, item 7. A purge-all whose state cannot be written answers 500 and does not take
/// effect (the object stays a HIT, before and after a restart) and leaves no temporary file;
/// the next acknowledged purge follows the last acknowledged sequence. Then `purges.json` is
/// lost altogether: after the restart the sequence continues above every stored object's, so
/// a purge-all still covers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_purge_changes_nothing_and_the_sequence_never_goes_backwards() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/a.txt");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("purges.json");
    let c = client();

    let edge = start_edge(&origin, dir.path()).await;
    assert_eq!(get(&c, &edge, "/a.txt").await.x_cache(), "MISS");
    wait_disk_exactly(&edge, 1).await;
    let first = purged(&c, &edge, json!({ "all": true })).await;
    let r = get(&c, &edge, "/a.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "/a.txt v1"));
    assert_eq!(get_hit(&c, &edge, "/a.txt").await.x_cache(), "HIT");
    wait_disk_exactly(&edge, 1).await;

    // The disk refuses the next write of the purge state.
    std::fs::rename(&state, dir.path().join("saved.json")).unwrap();
    std::fs::create_dir(&state).unwrap();
    let (status, answer) = purge(&c, &edge, json!({ "all": true })).await;
    assert_eq!(status, 500, "{answer}");
    let (status, answer) = purge(&c, &edge, json!({ "urls": ["/a.txt"] })).await;
    assert_eq!(status, 500, "{answer}");
    assert!(
        !dir.path().join("purges.json.tmp").exists(),
        "a failed write left purges.json.tmp"
    );
    let r = get(&c, &edge, "/a.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT", "/a.txt v1"),
        "a refused purge took effect: {r:?}"
    );
    edge.stop().await;

    // The disk is fixed; the refused purges stay refused across the restart.
    std::fs::remove_dir(&state).unwrap();
    std::fs::rename(dir.path().join("saved.json"), &state).unwrap();
    let edge = start_edge(&origin, dir.path()).await;
    let r = get(&c, &edge, "/a.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "/a.txt v1"));
    let second = purged(&c, &edge, json!({ "all": true })).await;
    assert_eq!(
        second,
        first + 1,
        "the refused purges used sequence numbers"
    );
    let r = get(&c, &edge, "/a.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "/a.txt v2"));
    assert_eq!(get_hit(&c, &edge, "/a.txt").await.x_cache(), "HIT");
    wait_disk_exactly(&edge, 1).await;
    edge.stop().await;

    // The purge state is lost; the stored object recorded sequence `second`.
    std::fs::remove_file(&state).unwrap();
    let edge = start_edge(&origin, dir.path()).await;
    assert_eq!(get(&c, &edge, "/a.txt").await.x_cache(), "HIT");
    let third = purged(&c, &edge, json!({ "all": true })).await;
    assert!(
        third > second,
        "the sequence went back from {second} to {third}"
    );
    let r = get(&c, &edge, "/a.txt").await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("MISS", "/a.txt v3"),
        "a purge-all after the restart missed an object stored before it: {r:?}"
    );
    assert_eq!(origin.hits("/a.txt"), 4);
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 9: metadata on disk is checked
// ---------------------------------------------------------------------------------------------

/// A record's metadata: MessagePack, structs as arrays of their fields in order. The record's
/// fields: integrity, size, inline, meta; the metadata's (`CachedMeta`): version, key, status,
/// headers, policy, stored_at_ms, fresh_until_ms, swr_secs, sie_secs, body_len, ….
const SIZE: usize = 1;
const META: usize = 3;
const STATUS: usize = 2;
const HEADERS: usize = 3;
const BODY_LEN: usize = 9;

/// Edits the metadata of a record, keeping its checksum (now stale), as a hand edit or damage
/// would.
fn tamper(cache_dir: &Path, key: &[u8; 32], record: &[u8], edit: &dyn Fn(&mut Vec<rmpv::Value>)) {
    let len = u32::from_le_bytes(record[32..36].try_into().unwrap()) as usize;
    let mut v = rmpv::decode::read_value(&mut &record[36..36 + len]).expect("MessagePack metadata");
    let rmpv::Value::Array(fields) = &mut v else {
        panic!("a record's metadata is an array: {v}");
    };
    edit(fields);
    let mut meta = Vec::new();
    rmpv::encode::write_value(&mut meta, &v).unwrap();
    let mut out = record[..32].to_vec();
    out.extend_from_slice(&u32::try_from(meta.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&record[36 + len..]);
    set_record(cache_dir, key, Some(&out));
}

/// The stored metadata's fields (see [`tamper`]).
fn meta_fields(record: &mut [rmpv::Value]) -> &mut Vec<rmpv::Value> {
    match &mut record[META] {
        rmpv::Value::Array(fields) => fields,
        other => panic!("metadata: {other}"),
    }
}

/// Issue 13, item 9. A 400 KB object (streamed from disk: memory is 1 MiB) is stored, the edge
/// stops, its metadata record is edited (the size 1000 bytes short, one byte of Content-Type,
/// the status 200 → 404), and the edge starts again: the next GET is a MISS answered by the
/// origin in full, never the edited response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_metadata_is_a_miss_refetched_from_the_origin() {
    type Edit = Box<dyn Fn(&mut Vec<rmpv::Value>)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "size",
            Box::new(|v| {
                let n = v[SIZE].as_u64().expect("size");
                v[SIZE] = (n - 1000).into();
                meta_fields(v)[BODY_LEN] = (n - 1000).into();
            }),
        ),
        (
            "content-type",
            Box::new(|v| {
                let rmpv::Value::Map(headers) = &mut meta_fields(v)[HEADERS] else {
                    panic!("headers are a map");
                };
                let (_, t) = headers
                    .iter_mut()
                    .find(|(k, _)| k.as_str() == Some("content-type"))
                    .expect("content-type");
                // Its values: a list of strings (bytes for values that are not visible ASCII).
                let rmpv::Value::Array(values) = t else {
                    panic!("content-type's values: {t}");
                };
                let flipped = values[0].as_str().expect("text").replace("plain", "plaim");
                values[0] = flipped.into();
            }),
        ),
        ("status", Box::new(|v| meta_fields(v)[STATUS] = 404.into())),
    ];
    let body: Bytes = (0..400_000u32)
        .map(|i| b'a' + (i % 26) as u8)
        .collect::<Vec<u8>>()
        .into();
    for (what, edit) in edits {
        let origin = TestOrigin::start().await;
        let b = body.clone();
        origin.route_fn("/big.bin", move |_, _| {
            Reply::ok(b.clone())
                .header("cache-control", "public, max-age=600")
                .header("content-type", "text/plain")
        });
        let dir = tempfile::tempdir().unwrap();
        let c = client();
        let edge = start_edge(&origin, dir.path()).await;
        let r = get(&c, &edge, "/big.bin").await;
        assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{what}");
        wait_disk_exactly(&edge, 1).await;
        edge.stop().await;

        let stored = records(dir.path());
        assert_eq!(stored.len(), 1, "{what}");
        tamper(dir.path(), &stored[0].0, &stored[0].1, &edit);

        let edge = start_edge(&origin, dir.path()).await;
        let r = get(&c, &edge, "/big.bin").await;
        assert_eq!(
            (r.status, r.x_cache(), r.header("content-type")),
            (200, "MISS", Some("text/plain")),
            "{what}: the edited metadata was served"
        );
        assert!(
            r.body == body,
            "{what}: {} bytes, not the object",
            r.body.len()
        );
        assert_eq!(origin.hits("/big.bin"), 2, "{what}");
        // The refetched copy is stored afresh and served whole.
        let r = get_hit(&c, &edge, "/big.bin").await;
        assert_eq!((r.status, r.x_cache()), (200, "HIT"), "{what}");
        assert!(r.body == body, "{what}: the new copy is not the object");
        edge.stop().await;
    }
}

/// A response header whose value is not visible ASCII (a UTF-8 file name, as browsers accept
/// in `Content-Disposition`) is answered byte for byte from disk after a restart, as on the
/// miss: the stored metadata neither drops nor alters it (it used to drop it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_that_are_not_ascii_survive_a_restart() {
    const DISPOSITION: &str = "attachment; filename=\"café – menu.pdf\"";
    let origin = TestOrigin::start().await;
    origin.route_fn("/menu.pdf", |_, _| {
        Reply::ok("%PDF-1.7 a menu")
            .header("cache-control", "public, max-age=600")
            .header("content-type", "application/pdf")
            .header("content-disposition", DISPOSITION)
    });
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let edge = start_edge(&origin, dir.path()).await;
    let r = get(&c, &edge, "/menu.pdf").await;
    let disposition = |r: &crate::support::http::Resp| {
        r.headers
            .get("content-disposition")
            .map(|v| v.as_bytes().to_vec())
    };
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(disposition(&r).as_deref(), Some(DISPOSITION.as_bytes()));
    wait_disk_exactly(&edge, 1).await;
    edge.stop().await;

    let edge = start_edge(&origin, dir.path()).await;
    let r = get(&c, &edge, "/menu.pdf").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "%PDF-1.7 a menu"));
    assert_eq!(
        disposition(&r).as_deref(),
        Some(DISPOSITION.as_bytes()),
        "the header as the origin sent it"
    );
    assert_eq!(origin.hits("/menu.pdf"), 1);
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 15: leftovers are cleaned up at start-up
// ---------------------------------------------------------------------------------------------

/// Issue 13, item 15. A content file no metadata references (a crash between the content
/// commit and the metadata commit leaves one) and an empty `purges.json.tmp` (a full disk) are
/// gone after a restart, while the stored object is still a HIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreferenced_content_and_a_stale_purge_state_tmp_are_removed_at_start_up() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/kept.txt");
    // Large enough for a content file of its own (smaller bodies are kept in their record).
    origin.route_fn("/lost.txt", |_, n| {
        Reply::ok(format!("/lost.txt v{n} {}", "x".repeat(20_000)))
            .header("cache-control", "public, max-age=600")
            .header("content-type", "text/plain")
    });
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let edge = start_edge(&origin, dir.path()).await;
    assert_eq!(get(&c, &edge, "/kept.txt").await.x_cache(), "MISS");
    wait_disk_exactly(&edge, 1).await;
    let content = dir.path().join("content").join("content-v2");
    let kept_content = files_under(&content);
    assert_eq!(get(&c, &edge, "/lost.txt").await.x_cache(), "MISS");
    wait_disk_exactly(&edge, 2).await;
    edge.stop().await;

    // A crash after /lost.txt's content was committed, before its metadata was.
    let lost: Vec<[u8; 32]> = records(dir.path())
        .into_iter()
        .filter(|(_, r)| String::from_utf8_lossy(r).contains("/lost.txt"))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(lost.len(), 1);
    set_record(dir.path(), &lost[0], None);
    let orphans: Vec<PathBuf> = files_under(&content)
        .into_iter()
        .filter(|p| !kept_content.contains(p))
        .collect();
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    // A leftover of another crash, under a made-up hash.
    let planted = content
        .join("sha256")
        .join("0f")
        .join("1e")
        .join("2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0");
    std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
    std::fs::write(&planted, b"leaked").unwrap();
    // Both were written before the restart (the sweep spares files of the new run).
    for f in orphans.iter().chain([&planted]) {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }
    let tmp = dir.path().join("purges.json.tmp");
    std::fs::write(&tmp, b"").unwrap();

    let edge = start_edge(&origin, dir.path()).await;
    assert!(!tmp.exists(), "purges.json.tmp survived the start");
    let deadline = tokio::time::Instant::now() + WAIT;
    while orphans.iter().chain([&planted]).any(|p| p.exists()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "unreferenced content was not removed at start-up"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        kept_content.iter().all(|p| p.exists()),
        "referenced content went"
    );
    let r = get(&c, &edge, "/kept.txt").await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "/kept.txt v0"));
    assert_eq!(origin.hits("/kept.txt"), 1);
    edge.stop().await;
}
