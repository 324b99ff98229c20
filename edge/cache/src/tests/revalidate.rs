//! Revalidation: conditional requests for stale copies, 304 refreshes, stale-while-revalidate.

use super::*;

/// `path` answers `body` fresh for 10 s with the validator `(name, value)`; a request
/// whose `conditional` field carries the same value gets a 304 (fresh for 10 s again).
fn validated(
    rig: &Rig,
    path: &str,
    validator: (&'static str, &'static str),
    conditional: &'static str,
    body: &str,
) {
    let (name, value) = validator;
    let body = Bytes::copy_from_slice(body.as_bytes());
    let fresh_10 = ("cache-control", "max-age=10");
    rig.origin.script(path, move |req| {
        if req.get(conditional).is_some_and(|v| v == value) {
            reply(304, &[fresh_10], "")
        } else {
            ok(&[fresh_10, (name, value)], body.clone())
        }
    });
}

#[tokio::test]
async fn a_stale_copy_is_revalidated_with_its_validator_and_a_304_refreshes_it() {
    let cases = [
        (("etag", "\"v1\""), "if-none-match"),
        (
            ("last-modified", "Tue, 01 Jul 2025 10:00:00 GMT"),
            "if-modified-since",
        ),
    ];
    for (validator, conditional) in cases {
        let rig = Rig::memory().await;
        validated(&rig, "/r", validator, conditional, "original");
        rig.check("/r", Miss, "original").await;
        rig.advance(11);
        rig.check("/r", Revalidated, "original").await;
        let asked = rig.origin.requests("/r");
        assert_eq!(asked.len(), 2, "{validator:?}");
        assert!(asked[0].get(conditional).is_none(), "{validator:?}");
        assert_eq!(asked[1][conditional], validator.1);
        // Fresh again for the 304's max-age.
        rig.advance(9);
        rig.check("/r", Hit, "original").await;
        assert_eq!(rig.origin.calls("/r"), 2, "{validator:?}");
    }
}

#[tokio::test]
async fn a_changed_object_replaces_the_stale_copy() {
    let rig = Rig::memory().await;
    let fresh_10 = ("cache-control", "max-age=10");
    rig.origin
        .serve("/r", &[fresh_10, ("etag", "\"v1\"")], "one");
    rig.check("/r", Miss, "one").await;
    rig.origin
        .serve("/r", &[fresh_10, ("etag", "\"v2\"")], "two");
    rig.advance(11);
    rig.check("/r", Miss, "two").await;
    assert_eq!(rig.origin.requests("/r")[1]["if-none-match"], "\"v1\"");
    rig.check("/r", Hit, "two").await;
    assert_eq!(rig.origin.calls("/r"), 2);
}

/// A copy revalidated (by a 304) is fresh again after a restart. With `race`, the copy goes
/// stale before its disk write has finished (a large body keeps that write busy).
async fn a_304_refresh_is_kept_on_disk(race: bool) {
    let rig = Rig::disk().await;
    let body = "original".repeat(64 * 1024);
    validated(&rig, "/r", ("etag", "\"v1\""), "if-none-match", &body);
    rig.check("/r", Miss, &body).await;
    if !race {
        rig.settle().await;
    }
    rig.advance(11);
    rig.check("/r", Revalidated, &body).await;
    let rig = rig.reopen().await;
    assert_eq!(rig.check("/r", Hit, &body).await.tier, Tier::Disk);
    assert_eq!(rig.origin.calls("/r"), 2);
}

#[tokio::test]
async fn a_304_refresh_is_kept_on_disk_across_reopening() {
    a_304_refresh_is_kept_on_disk(false).await;
}

#[tokio::test]
async fn a_304_refresh_racing_the_disk_write_is_kept_on_disk() {
    a_304_refresh_is_kept_on_disk(true).await;
}

/// `/s` stored as `one` (fresh for 10 s, then stale-while-revalidate for 60 s), the origin
/// now answering `two`, and the clock `secs` later.
async fn stale_while_revalidate(secs: u64) -> Rig {
    let rig = Rig::memory().await;
    let cc = ("cache-control", "max-age=10, stale-while-revalidate=60");
    rig.origin.serve("/s", &[cc], "one");
    rig.check("/s", Miss, "one").await;
    rig.origin.serve("/s", &[cc], "two");
    rig.advance(secs);
    rig
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_at_once_and_refreshes_in_the_background() {
    let rig = stale_while_revalidate(11).await;
    // The origin does not answer yet: the stale copy is served without waiting for it.
    let gate = rig.origin.hold("/s");
    for _ in 0..5 {
        rig.check("/s", Stale, "one").await;
    }
    eventually("the background revalidation is asked", || {
        rig.origin.calls("/s") == 2
    })
    .await;
    gate.open();
    rig.settle().await;
    rig.check("/s", Hit, "two").await;
    assert_eq!(
        rig.origin.calls("/s"),
        2,
        "one revalidation for five stale answers"
    );
}

#[tokio::test]
async fn past_the_stale_while_revalidate_window_a_request_waits_for_upstream() {
    let rig = stale_while_revalidate(71).await;
    rig.check("/s", Miss, "two").await;
    rig.check("/s", Hit, "two").await;
    assert_eq!(rig.origin.calls("/s"), 2);
}

/// Takes all of the engine's disk queue until dropped: a fill meanwhile gives its disk copy up.
fn fill_the_disk_queue(rig: &Rig) -> Vec<crate::coalesce::Charge> {
    let queue = &rig.engine.fills.disk_queue;
    let mut held = Vec::new();
    let mut n = 1u64 << 40;
    while n > 0 {
        match queue.take(n) {
            Some(charge) => held.push(charge),
            None => n /= 2,
        }
    }
    held
}

/// A new version whose disk copy is given up (here, its queue full) leaves no older version
/// on disk: a 304 for the new version never puts its metadata on the old body, and the old
/// body is never served again, before or after a restart.
#[tokio::test]
async fn a_new_version_that_misses_the_disk_leaves_no_old_version_there() {
    let rig = Rig::disk().await;
    validated(&rig, "/r", ("etag", "\"v1\""), "if-none-match", "one");
    rig.check("/r", Miss, "one").await;
    rig.settle().await;
    let full = fill_the_disk_queue(&rig);
    validated(&rig, "/r", ("etag", "\"v2\""), "if-none-match", "two");
    rig.advance(11);
    rig.check("/r", Miss, "two").await;
    rig.settle().await;
    assert_eq!(rig.objects().await, (1, 0), "v2 in memory, nothing on disk");
    drop(full);
    // The memory copy (v2) goes stale and the origin confirms it.
    rig.advance(11);
    rig.check("/r", Revalidated, "two").await;
    let rig = rig.reopen().await;
    rig.check("/r", Miss, "two").await;
    rig.check("/r", Hit, "two").await;
}

/// A new version that memory does not take (no Content-Length: it is not kept whole) replaces
/// the old version there too: the disk's new copy answers, not the memory's stale old one.
#[tokio::test]
async fn a_new_version_that_misses_memory_leaves_no_old_version_there() {
    let rig = Rig::disk().await;
    let fresh_10 = ("cache-control", "max-age=10");
    rig.origin
        .serve("/r", &[fresh_10, ("etag", "\"v1\"")], "one");
    rig.check("/r", Miss, "one").await;
    rig.origin.script("/r", move |_| {
        let headers = fields(&[fresh_10, ("etag", "\"v2\"")]);
        response(
            StatusCode::OK,
            headers,
            vec![Ok(Bytes::from_static(b"two"))],
        )
    });
    rig.advance(11);
    rig.check("/r", Miss, "two").await;
    rig.settle().await;
    assert_eq!(rig.check("/r", Hit, "two").await.tier, Tier::Disk);
    assert_eq!(rig.origin.calls("/r"), 2);
}

/// A new version whose body never completes leaves the old copy on disk, for stale-if-error:
/// the old copy goes only once the new one is known not to reach the disk.
#[tokio::test]
async fn a_new_version_cut_short_leaves_the_old_copy_for_stale_if_error() {
    let rig = Rig::disk().await;
    let cc = ("cache-control", "max-age=10, stale-if-error=600");
    rig.origin.serve("/r", &[cc, ("etag", "\"v1\"")], "one");
    rig.check("/r", Miss, "one").await;
    // Only the disk holds it now.
    let rig = rig.reopen().await;
    rig.origin.script("/r", move |_| {
        cut_short(&[cc, ("etag", "\"v2\"")], b"tw", 3)
    });
    rig.advance(11);
    let cut = rig.get("/r").await;
    assert!(cut.body_error.is_some() || cut.cache == Stale, "{cut:?}");
    rig.settle().await;
    rig.origin.fail("/r");
    let stale = rig.check("/r", Stale, "one").await;
    assert_eq!(stale.tier, Tier::Disk);
}

/// The same for a streamed copy (a body past the inline size) given up before the body
/// failed: its disk queue full, the copy is given up at the first chunk, but the old copy
/// stays until the body is known to be complete.
#[tokio::test]
async fn a_streamed_copy_given_up_then_cut_short_leaves_the_old_copy() {
    let rig = Rig::disk().await;
    let cc = ("cache-control", "max-age=10, stale-if-error=600");
    let old = "one".repeat(10_000);
    rig.origin.serve("/r", &[cc, ("etag", "\"v1\"")], &old);
    rig.check("/r", Miss, &old).await;
    let rig = rig.reopen().await;
    let first: &'static [u8] = Box::leak(vec![b'x'; 20_000].into_boxed_slice());
    rig.origin.script("/r", move |_| {
        cut_short(&[cc, ("etag", "\"v2\"")], first, 40_000)
    });
    let full = fill_the_disk_queue(&rig);
    rig.advance(11);
    let cut = rig.get("/r").await;
    assert!(cut.body_error.is_some() || cut.cache == Stale, "{cut:?}");
    rig.settle().await;
    drop(full);
    rig.origin.fail("/r");
    let stale = rig.check("/r", Stale, &old).await;
    assert_eq!(stale.tier, Tier::Disk);
}
