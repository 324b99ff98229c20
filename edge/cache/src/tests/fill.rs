//! The fill task: what it stores, where, and what it refuses to store.

use super::*;
use crate::disk::admission;
use crate::status::{DiskAdmission, PassReason};

#[tokio::test]
async fn a_fill_stores_the_object_in_both_tiers() {
    let rig = Rig::disk().await;
    let body = "x".repeat(100_000);
    rig.origin.fresh("/big", &body);
    rig.check("/big", Miss, &body).await;
    rig.settle().await;
    assert_eq!(rig.objects().await, (1, 1));
    let fills = rig
        .engine
        .stats
        .fills
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(fills, 1);
    rig.check("/big", Hit, &body).await;
}

/// Twice: the answer passes with `reason`, and nothing is stored.
async fn passes_and_is_not_stored(
    request: Fields<'_>,
    response: Fields<'_>,
    body: &str,
    reason: PassReason,
) {
    let rig = Rig::memory().await;
    rig.origin.serve("/p", response, body);
    for round in 1..=2 {
        rig.check_with("/p", request, CacheStatus::Pass(reason), body)
            .await;
        assert_eq!(rig.origin.calls("/p"), round, "{response:?}");
    }
    assert_eq!(rig.objects().await, (0, 0));
}

#[tokio::test]
async fn an_uncacheable_response_passes_and_is_not_stored() {
    for response in [
        &[("cache-control", "no-store")][..],
        &[("cache-control", "private, max-age=60")],
        &[FRESH_60[0], ("vary", "*")],
        &[FRESH_60[0], ("set-cookie", "id=1")],
    ] {
        passes_and_is_not_stored(&[], response, "mine", PassReason::Uncacheable).await;
    }
}

#[tokio::test]
async fn an_object_over_max_object_size_passes_as_too_large() {
    let body = "x".repeat(MAX_OBJECT as usize + 1);
    passes_and_is_not_stored(&[], FRESH_60, &body, PassReason::TooLarge).await;
}

#[tokio::test]
async fn a_request_with_no_store_passes_as_request_no_store() {
    let no_store = &[("cache-control", "no-store")];
    passes_and_is_not_stored(no_store, FRESH_60, "mine", PassReason::RequestNoStore).await;
}

#[tokio::test]
async fn an_object_over_max_object_size_is_not_stored() {
    let rig = Rig::memory().await;
    let body = "x".repeat(MAX_OBJECT as usize + 1);
    rig.origin.fresh("/huge", &body);
    for round in 1..=2 {
        let a = rig.get("/huge").await;
        assert!(matches!(a.cache, CacheStatus::Pass(_)), "{a:?}");
        assert_eq!(a.body.len(), body.len());
        assert_eq!(rig.origin.calls("/huge"), round);
    }
}

#[tokio::test]
async fn set_cookie_goes_only_to_the_request_that_caused_the_fill() {
    let rig = Rig::memory().await;
    let fields = &[
        ("cache-control", "public, max-age=60"),
        ("set-cookie", "id=1"),
    ];
    rig.origin.serve("/c", fields, "shared");
    let first = rig.check("/c", Miss, "shared").await;
    assert_eq!(first.headers["set-cookie"], "id=1");
    let second = rig.check("/c", Hit, "shared").await;
    assert!(second.headers.get("set-cookie").is_none(), "{second:?}");
}

#[tokio::test]
async fn a_body_cut_short_fails_its_reader_and_is_not_stored() {
    let rig = Rig::disk().await;
    rig.origin
        .script("/cut", |_| cut_short(FRESH_60, b"part", 100));
    let cut = rig.get("/cut").await;
    assert_eq!((cut.cache, &cut.body[..]), (Miss, &b"part"[..]));
    assert!(cut.body_error.is_some(), "{cut:?}");
    rig.settle().await;
    assert_eq!(rig.objects().await, (0, 0));
    rig.origin.fresh("/cut", "whole");
    rig.check("/cut", Miss, "whole").await;
    assert_eq!(rig.origin.calls("/cut"), 2);
}

#[tokio::test]
async fn a_404_with_freshness_is_stored_like_any_answer() {
    let rig = Rig::memory().await;
    rig.origin
        .script("/gone", |_| reply(404, FRESH_60, "not here"));
    for cache in [Miss, Hit] {
        let a = rig.check("/gone", cache, "not here").await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(rig.origin.calls("/gone"), 1);
}

/// `outpost_disk_admissions`: what became of each storable response on its way to disk.
fn admissions(rig: &Rig) -> [u64; DiskAdmission::ALL.len()] {
    rig.engine.stats.disk_admissions()
}

/// A rig whose disk tier (4 MiB) fills up with ~20 bodies of 200 KiB, which its memory tier
/// (of `--memory 1MiB`) never takes, filled until the tier is full: every miss until then is
/// written. Returns the rig, the body and how many objects it took.
async fn full_disk_tier(policy: admission::Policy) -> (Rig, String, u64) {
    let rig = Rig::disk_with(|c| {
        c.memory_bytes = 1 << 20;
        c.disk = c.disk.take().map(|(dir, _)| (dir, 4 << 20));
        c.disk_admission = policy;
    })
    .await;
    let disk = rig.engine.disk.clone().expect("a disk tier");
    let body = "x".repeat(200 << 10);
    let mut n = 0;
    while disk.has_room_for(Some(body.len() as u64)) {
        assert!(n < 40, "the disk tier never filled: {:?}", admissions(&rig));
        let path = format!("/o{n}");
        rig.origin.fresh(&path, &body);
        rig.check(&path, Miss, &body).await;
        rig.settle().await;
        n += 1;
    }
    eventually("every miss is counted", || {
        admissions(&rig).iter().sum::<u64>() == n
    })
    .await;
    assert_eq!(
        admissions(&rig),
        [n, 0, 0, 0, 0, 0, 0],
        "all written until full"
    );
    (rig, body, n)
}

/// (stored, rejected) of `outpost_disk_admissions`, once `n` storable responses are counted.
async fn stored_and_rejected(rig: &Rig, n: u64) -> (u64, u64) {
    eventually("every miss is counted", || {
        admissions(rig).iter().sum::<u64>() == n
    })
    .await;
    let a = admissions(rig);
    (
        a[DiskAdmission::Stored.index()],
        a[DiskAdmission::Rejected.index()],
    )
}

/// The key of `path` (its primary key, as the engine hashes it).
fn key_of(path: &str) -> crate::key::KeyHash {
    request(path, &[]).norm.key.hash()
}

/// Serves `body` at `path` and asks for it once (a MISS), until every fill has settled.
async fn first_miss(rig: &Rig, path: &str, body: &str) {
    rig.origin.fresh(path, body);
    rig.check(path, Miss, body).await;
    rig.settle().await;
}

/// One of the `n` objects [`full_disk_tier`] stored that the disk tier still holds.
fn stored_path(rig: &Rig, n: u64) -> String {
    let disk = rig.engine.disk.as_ref().unwrap();
    (0..n)
        .map(|i| format!("/o{i}"))
        .find(|p| disk.copy_of(&key_of(p)).is_some())
        .expect("objects still stored")
}

/// Once the disk tier is full, a key's first miss is not written, only counted (`rejected`),
/// so an object asked once evicts nothing; its second miss is written, and then it is a HIT.
/// A stale copy's refetch is no first miss: written at once.
#[tokio::test]
async fn a_full_disk_tier_writes_a_new_key_on_its_second_miss() {
    let (rig, body, n) = full_disk_tier(admission::Policy::SecondMissWhenFull).await;
    first_miss(&rig, "/new", &body).await;
    assert_eq!(stored_and_rejected(&rig, n + 1).await, (n, 1));
    assert_eq!(rig.objects().await.1, n, "nothing evicted for it");
    assert_eq!(rig.engine.disk.as_ref().unwrap().evictions(), 0);
    rig.check("/new", Miss, &body).await;
    rig.settle().await;
    assert_eq!(stored_and_rejected(&rig, n + 2).await, (n + 1, 1));
    rig.check("/new", Hit, &body).await;
    assert_eq!(rig.origin.calls("/new"), 2);

    // Every copy goes stale; one still stored is fetched again and written at once.
    rig.advance(61);
    let path = stored_path(&rig, n);
    let refetched = rig.get(&path).await;
    assert_eq!(refetched.body, body.as_bytes());
    rig.settle().await;
    assert_eq!(stored_and_rejected(&rig, n + 3).await, (n + 2, 1));
}

/// A URL whose disk copy a hard purge removed is no first request when it comes back: a full
/// tier writes it at once, rather than costing a popular object a second trip to the origin.
#[tokio::test]
async fn a_full_disk_tier_writes_a_purged_url_again_at_once() {
    let (rig, body, n) = full_disk_tier(admission::Policy::SecondMissWhenFull).await;
    let disk = rig.engine.disk.clone().unwrap();
    let path = stored_path(&rig, n);
    let purge = crate::purge::PurgeSpec {
        urls: vec![path.clone()],
        ..Default::default()
    };
    rig.engine.purge(&purge).await.expect("purge");
    // Filled up again by another object (written: the purge made room), so the purged one
    // finds no room.
    first_miss(&rig, "/filler", &body).await;
    assert_eq!(stored_and_rejected(&rig, n + 1).await, (n + 1, 0));
    assert!(!disk.has_room_for(Some(body.len() as u64)));
    rig.check(&path, Miss, &body).await;
    rig.settle().await;
    assert_eq!(stored_and_rejected(&rig, n + 2).await, (n + 2, 0));
    assert!(disk.copy_of(&key_of(&path)).is_some(), "stored again");
}

/// A full tier stores no compressed variant of an object it turned away (it would evict
/// another for it), and still stores those of objects it holds.
#[tokio::test]
async fn a_full_disk_tier_stores_variants_of_the_objects_it_holds_only() {
    let (rig, body, n) = full_disk_tier(admission::Policy::SecondMissWhenFull).await;
    let disk = rig.engine.disk.clone().unwrap();
    first_miss(&rig, "/new", &body).await;
    assert_eq!(stored_and_rejected(&rig, n + 1).await, (n, 1));
    let held = stored_path(&rig, n);
    let meta = disk.peek(&key_of(&held)).await.expect("a copy").meta;
    for path in ["/new", held.as_str()] {
        let meta = (*meta).clone();
        rig.engine
            .put_encoded(key_of(path), "gzip", meta, Bytes::from_static(b"zipped"))
            .await;
    }
    rig.settle().await;
    let variant = |path: &str| crate::encoded::encoded_key(key_of(path), "gzip");
    eventually("the held object's variant is on disk", || {
        disk.copy_of(&variant(&held)).is_some()
    })
    .await;
    assert!(disk.copy_of(&variant("/new")).is_none());
}

/// `disk_admission = "always"`: a full disk tier writes every storable miss, evicting for it.
#[tokio::test]
async fn a_full_disk_tier_writes_every_miss_when_told_to() {
    let (rig, body, n) = full_disk_tier(admission::Policy::Always).await;
    first_miss(&rig, "/new", &body).await;
    assert_eq!(stored_and_rejected(&rig, n + 1).await, (n + 1, 0));
    rig.check("/new", Hit, &body).await;
    eventually("an object was evicted for it", || {
        rig.engine.disk.as_ref().unwrap().evictions() > 0
    })
    .await;
}

/// Every storable response of an engine with a disk tier ends in exactly one admission
/// outcome: nothing reaches the disk, or fails to, without being counted.
#[tokio::test]
async fn every_storable_response_ends_in_one_disk_admission() {
    let rig = Rig::disk().await;
    for i in 0..5 {
        let path = format!("/o{i}");
        rig.origin.fresh(&path, "body");
        rig.check(&path, Miss, "body").await;
    }
    // No Content-Length, and more than max_object_size: given up while it streams.
    rig.origin.script("/big", |_| {
        let frames = (0..=MAX_OBJECT as usize / CHUNK)
            .map(|_| Ok(Bytes::from(vec![b'x'; CHUNK])))
            .collect();
        response(StatusCode::OK, fields(FRESH_60), frames)
    });
    let big = rig.get("/big").await;
    assert!(big.body.len() as u64 > MAX_OBJECT, "{big:?}");
    // The upstream fails mid-body.
    rig.origin
        .script("/cut", |_| cut_short(FRESH_60, b"abc", 10));
    assert!(rig.get("/cut").await.body_error.is_some());
    rig.settle().await;
    eventually("every disk write has ended", || {
        admissions(&rig).iter().sum::<u64>() == 7
    })
    .await;
    // stored, queue_full, too_large, error, incomplete, superseded
    assert_eq!(admissions(&rig), [5, 0, 1, 0, 1, 0, 0]);
    assert_eq!(rig.objects().await.1, 5);
}

/// A disk that fails for a while (full, say) does not end the disk tier until a restart: a
/// miss during the failure is counted as `error` and not stored; once the index works again,
/// misses are stored and, after a restart, are disk HITs, and the one during the failure is a
/// MISS. Before, nothing was stored again until the restart.
#[tokio::test]
async fn the_disk_tier_stores_again_after_its_disk_failed() {
    let mut switch = None;
    let rig = Rig::disk_with(|c| {
        let (dir, _) = c.disk.as_ref().expect("a disk tier");
        switch = Some(crate::disk::faults::switch(&dir.join("index.redb")));
    })
    .await;
    let failing = switch.unwrap();
    let error = DiskAdmission::Error.index();
    let stored = DiskAdmission::Stored.index();
    first_miss(&rig, "/before", "before").await;
    failing
        .writes
        .store(true, std::sync::atomic::Ordering::Release);
    first_miss(&rig, "/during", "during").await;
    eventually("the miss during the failure is counted", || {
        admissions(&rig)[error] == 1
    })
    .await;
    failing
        .writes
        .store(false, std::sync::atomic::Ordering::Release);
    let mut n = 0;
    loop {
        // Each a new key: a fill that fails is not retried.
        let path = format!("/after{n}");
        first_miss(&rig, &path, "after").await;
        n += 1;
        eventually("every miss is counted", || {
            admissions(&rig).iter().sum::<u64>() == n + 2
        })
        .await;
        if admissions(&rig)[stored] == 2 {
            break;
        }
        assert!(n < 200, "never stored again: {:?}", admissions(&rig));
    }
    let (open, reopens) = rig.engine.disk_index_health().unwrap();
    assert!(
        open && reopens >= 1,
        "open {open}, reopened {reopens} times"
    );
    let rig = rig.reopen().await;
    assert_eq!(rig.engine.disk_index_health(), Some((true, 0)));
    rig.check("/before", Hit, "before").await;
    rig.check(&format!("/after{}", n - 1), Hit, "after").await;
    rig.check("/during", Miss, "during").await;
    assert_eq!(rig.origin.calls("/during"), 2);
}

/// A disk hit's read that an invalidation (RFC 9111 §4.4, not in the purge log) overtakes
/// does not put the old copy back into memory to be served as fresh.
#[tokio::test]
async fn a_promotion_that_an_invalidation_overtakes_is_not_served() {
    let rig = Rig::disk().await;
    first_miss(&rig, "/a", "v1").await;
    let key = key_of("/a");
    // Out of memory, as after an eviction: the next read comes from disk.
    rig.engine.memory.remove(&key).await;
    let disk = rig.engine.disk.as_ref().expect("disk tier");
    let hit = disk.get(&key).await.expect("on disk");
    rig.engine.invalidate(key).await;
    rig.engine
        .body_of(key, &crate::Stored::Disk(hit))
        .await
        .expect("the old copy read");
    rig.origin.fresh("/a", "v2");
    rig.check("/a", Miss, "v2").await;
}
