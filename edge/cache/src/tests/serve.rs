//! Answering a request: hit, miss, stale, only-if-cached, Vary variants.

use super::*;

#[tokio::test]
async fn a_miss_is_fetched_and_stored_then_hits_from_memory() {
    let rig = Rig::memory().await;
    rig.origin.fresh("/a", "alpha");
    let miss = rig.check("/a", Miss, "alpha").await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_eq!(miss.headers["cache-control"], "max-age=60");
    rig.advance(30);
    assert_eq!(rig.check("/a", Hit, "alpha").await.tier, Tier::Memory);
    assert_eq!(rig.origin.calls("/a"), 1);
}

#[tokio::test]
async fn each_url_is_its_own_object() {
    let rig = Rig::memory().await;
    rig.origin.fresh("/a", "alpha");
    rig.origin.fresh("/a?v=2", "alpha two");
    rig.check("/a", Miss, "alpha").await;
    rig.check("/a?v=2", Miss, "alpha two").await;
    rig.check("/a?v=2", Hit, "alpha two").await;
    rig.check("/a", Hit, "alpha").await;
    assert_eq!((rig.origin.calls("/a"), rig.origin.calls("/a?v=2")), (1, 1));
}

#[tokio::test]
async fn a_copy_past_its_freshness_is_fetched_again() {
    let rig = Rig::memory().await;
    rig.origin.fresh("/a", "one");
    rig.check("/a", Miss, "one").await;
    rig.origin.fresh("/a", "two");
    rig.advance(59);
    rig.check("/a", Hit, "one").await;
    rig.advance(2);
    rig.check("/a", Miss, "two").await;
    rig.check("/a", Hit, "two").await;
    assert_eq!(rig.origin.calls("/a"), 2);
}

#[tokio::test]
async fn stale_if_error_serves_the_stale_copy_when_upstream_fails() {
    let rig = Rig::memory().await;
    let cc = &[("cache-control", "max-age=10, stale-if-error=60")];
    rig.origin.serve("/a", cc, "kept");
    rig.check("/a", Miss, "kept").await;
    rig.origin.fail("/a");
    rig.advance(11);
    let stale = rig.check("/a", Stale, "kept").await;
    assert_eq!(stale.upstream_error, Some(refused()));
    // Past the window the failure is the answer.
    rig.advance(60);
    rig.get("/a")
        .await
        .expect_failure(Failure::Upstream(refused()));
    assert_eq!(rig.origin.calls("/a"), 3);
}

#[tokio::test]
async fn only_if_cached_without_a_copy_is_not_cached_and_asks_nobody() {
    let rig = Rig::memory().await;
    rig.origin.fresh("/a", "alpha");
    let only = &[("cache-control", "only-if-cached")];
    let none = rig.get_with("/a", only).await;
    none.expect_failure(Failure::NotCached);
    assert_eq!(none.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(rig.origin.calls("/a"), 0);
    rig.check("/a", Miss, "alpha").await;
    rig.check_with("/a", only, Hit, "alpha").await;
    // A stale copy does not satisfy it either.
    rig.advance(61);
    rig.get_with("/a", only)
        .await
        .expect_failure(Failure::NotCached);
    assert_eq!(rig.origin.calls("/a"), 1);
}

#[tokio::test]
async fn vary_keeps_one_variant_per_request_value() {
    let rig = Rig::memory().await;
    rig.origin.greet_by_language("/v");
    let en: Fields = &[("accept-language", "en")];
    let fr: Fields = &[("accept-language", "fr")];
    for cache in [Miss, Hit] {
        rig.check_with("/v", en, cache, "hello in en").await;
        rig.check_with("/v", fr, cache, "hello in fr").await;
        rig.check("/v", cache, "hello in none").await;
    }
    assert_eq!(rig.origin.calls("/v"), 3);
}

#[tokio::test]
async fn a_copy_on_disk_is_served_after_reopening_then_from_memory() {
    let rig = Rig::disk().await;
    rig.origin.fresh("/a", "durable");
    rig.check("/a", Miss, "durable").await;
    let rig = rig.reopen().await;
    assert_eq!(rig.check("/a", Hit, "durable").await.tier, Tier::Disk);
    assert_eq!(rig.check("/a", Hit, "durable").await.tier, Tier::Memory);
    assert_eq!(rig.origin.calls("/a"), 1);
}

/// Issue 15: after a restart the disk index loads in the background. Objects the load has not
/// reached yet are hits all the same (plain ones and Vary variants), and a purge made
/// meanwhile is not undone when the load reaches the object. Its count of matched objects is
/// left out until the load ends.
#[tokio::test]
async fn stored_objects_are_hits_while_the_index_loads() {
    let rig = Rig::disk().await;
    rig.origin.fresh("/a", "alpha");
    rig.origin.fresh("/gone", "gone");
    rig.origin.greet_by_language("/v");
    let en: Fields = &[("accept-language", "en")];
    rig.check("/a", Miss, "alpha").await;
    rig.check("/gone", Miss, "gone").await;
    rig.check_with("/v", en, Miss, "hello in en").await;
    let dir = rig.dir.as_ref().expect("a disk rig").path().to_path_buf();
    let gate = crate::disk::load_gate::hold(&dir);
    let rig = rig.reopen().await;
    let disk = rig.engine.disk.clone().expect("a disk tier");
    assert!(!disk.load_state().done, "the load is held back");

    assert_eq!(rig.check("/a", Hit, "alpha").await.tier, Tier::Disk);
    assert_eq!(
        rig.check_with("/v", en, Hit, "hello in en").await.tier,
        Tier::Disk
    );
    let mut purge = crate::PurgeSpec::default();
    // With its host: the load has not told the engine which hosts a bare path could mean.
    purge.urls.push(format!("http://{HOST}/gone"));
    let outcome = rig.engine.purge(&purge).await.expect("purge");
    // Held, but not indexed yet: no count rather than a wrong one ("nothing matched").
    assert_eq!(outcome.matched, None, "not counted while the index loads");
    assert!(!disk.load_state().done, "still loading");

    drop(gate);
    eventually("the load ends", || disk.load_state().done).await;
    assert_eq!(disk.load_state().loaded, 2, "all but the purged object");
    rig.check("/a", Hit, "alpha").await;
    rig.check("/gone", Miss, "gone").await;
    assert_eq!(
        (
            rig.origin.calls("/a"),
            rig.origin.calls("/v"),
            rig.origin.calls("/gone")
        ),
        (1, 1, 2)
    );
    // Counted again once what the load found has reached the engine (hosts, Vary).
    eventually("the engine has indexed the load", || {
        rig.engine
            .disk_indexed
            .load(std::sync::atomic::Ordering::Acquire)
    })
    .await;
    let mut purge = crate::PurgeSpec::default();
    purge.urls.push(format!("http://{HOST}/a"));
    let outcome = rig.engine.purge(&purge).await.expect("purge");
    assert_eq!(outcome.matched, Some(1), "counted once the load has ended");
}

/// The Vary index holds the URLs with a stored variant, not every URL with Vary ever asked:
/// once their copies are gone (here purged from memory, as an eviction would) and their
/// registration is old, a pruning pass forgets them; a URL still stored keeps its names.
#[tokio::test]
async fn the_vary_index_forgets_urls_whose_variants_left_the_cache() {
    let rig = Rig::memory().await;
    let en: Fields = &[("accept-language", "en")];
    for i in 0..50 {
        let path = format!("/v?{i}");
        rig.origin.greet_by_language(&path);
        rig.check_with(&path, en, Miss, "hello in en").await;
    }
    assert_eq!(rig.engine.vary.len(), 50);
    for i in 1..50 {
        let req = request(&format!("/v?{i}"), en);
        let variant = rig
            .engine
            .vary
            .variant_of(req.norm.key.hash(), &req.norm.parts.headers);
        rig.engine.memory.remove(&variant).await;
    }
    // Not yet: a registration is left alone for a while.
    rig.engine.prune_vary((0, crate::VARY_PRUNE_TICKS)).await;
    assert_eq!(rig.engine.vary.len(), 50);
    rig.advance(crate::vary::PRUNE_AFTER_MS / 1000 + 1);
    rig.engine.prune_vary((0, crate::VARY_PRUNE_TICKS)).await;
    assert_eq!(rig.engine.vary.len(), 1);
    assert!(
        rig.engine
            .vary
            .contains(request("/v?0", en).norm.key.hash())
    );
    rig.check_with("/v?1", en, Miss, "hello in en").await;
    assert_eq!(rig.engine.vary.len(), 2);
}

/// A URL keeps at most `MAX_VARIANTS` variants: one more sends the oldest out of the cache.
#[tokio::test]
async fn a_url_with_too_many_variants_lets_the_oldest_go() {
    let rig = Rig::disk().await;
    rig.origin.greet_by_language("/v");
    let lang = |i: usize| format!("l{i}");
    for i in 0..=crate::vary::MAX_VARIANTS {
        let l = lang(i);
        rig.check_with(
            "/v",
            &[("accept-language", &l)],
            Miss,
            &format!("hello in {l}"),
        )
        .await;
    }
    rig.settle().await;
    let newest = lang(crate::vary::MAX_VARIANTS);
    rig.check_with(
        "/v",
        &[("accept-language", &newest)],
        Hit,
        &format!("hello in {newest}"),
    )
    .await;
    rig.check_with("/v", &[("accept-language", "l1")], Hit, "hello in l1")
        .await;
    rig.check_with("/v", &[("accept-language", "l0")], Miss, "hello in l0")
        .await;
}

/// The Vary names stored on disk follow the Vary index: a pruning pass forgets them for the
/// URLs it forgets, and after a restart the names of URLs with no variant left go too.
#[tokio::test]
async fn the_disk_forgets_the_vary_names_of_urls_with_no_variant_left() {
    let rig = Rig::disk().await;
    let en: Fields = &[("accept-language", "en")];
    let mut variants = Vec::new();
    for i in 0..10 {
        let path = format!("/v?{i}");
        rig.origin.greet_by_language(&path);
        rig.check_with(&path, en, Miss, "hello in en").await;
        let req = request(&path, en);
        let primary = req.norm.key.hash();
        variants.push((
            primary,
            rig.engine.vary.variant_of(primary, &req.norm.parts.headers),
        ));
    }
    rig.settle().await;
    let disk = rig.engine.disk.clone().expect("a disk tier");
    let names_stored = || async { disk.vary_keys(None, 100).await.unwrap().len() };
    assert_eq!(names_stored().await, 10);
    // 1-4 leave both tiers and are pruned; 5-9 leave the disk behind the index's back (as a
    // node stopped before a pruning pass would leave them).
    for (i, (_, variant)) in variants.iter().enumerate().skip(1) {
        rig.engine.memory.remove(variant).await;
        disk.remove(variant).await;
        if i == 4 {
            rig.advance(crate::vary::PRUNE_AFTER_MS / 1000 + 1);
            rig.engine.prune_vary((0, crate::VARY_PRUNE_TICKS)).await;
        }
    }
    disk.flush().await;
    assert_eq!(names_stored().await, 6);
    drop(disk);
    let rig = rig.reopen().await;
    let disk = rig.engine.disk.clone().expect("a disk tier");
    eventually("the load and its sweep are done", || {
        rig.engine
            .disk_indexed
            .load(std::sync::atomic::Ordering::Acquire)
    })
    .await;
    for _ in 0..500 {
        disk.flush().await;
        if disk.vary_keys(None, 100).await.unwrap() == vec![variants[0].0] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("left: {:?}", disk.vary_keys(None, 100).await.unwrap());
}

/// A disk hit the memory tier takes is promoted even when the read budget is spent: the read
/// counts as a fill's body for the memory tier does, not against the budget of bodies only
/// sent (whose cap, 64 MiB, is below the largest object the memory tier takes once
/// `--memory` passes ~1.3 GiB).
#[tokio::test]
async fn a_disk_hit_is_promoted_when_the_read_budget_is_spent() {
    let rig = Rig::disk().await;
    let body = "p".repeat(100 << 10);
    rig.origin.fresh("/p", &body);
    rig.check("/p", Miss, &body).await;
    rig.settle().await;
    let key = request("/p", &[]).norm.key.hash();
    rig.engine.memory.remove(&key).await;
    let reads = rig.engine.disk.as_ref().unwrap().reads.clone();
    let mut spent = Vec::new();
    for bit in (0..64).rev() {
        while let Some(charge) = reads.take(1 << bit) {
            spent.push(charge);
        }
    }
    assert!(reads.take(1).is_none(), "the read budget is spent");
    let hit = rig.check("/p", Hit, &body).await;
    assert_eq!(hit.tier, Tier::Disk);
    let again = rig.check("/p", Hit, &body).await;
    assert_eq!(again.tier, Tier::Memory, "promoted");
    drop(spent);
}

/// An invalidation (RFC 9111 §4.4, a successful unsafe request: not in the purge log) made
/// while the disk index loads takes the URL's Vary variants the load has not reached as well:
/// neither a lookup meanwhile nor the load brings an old answer back. (The engine's Vary index
/// does not know them yet, so it used to invalidate the URL's primary key alone.)
#[tokio::test]
async fn an_invalidation_while_the_index_loads_takes_the_variants_it_has_not_reached() {
    let rig = Rig::disk().await;
    rig.origin.greet_by_language("/v");
    let en: Fields = &[("accept-language", "en")];
    let de: Fields = &[("accept-language", "de")];
    rig.check_with("/v", en, Miss, "hello in en").await;
    rig.check_with("/v", de, Miss, "hello in de").await;
    let dir = rig.dir.as_ref().expect("a disk rig").path().to_path_buf();
    let gate = crate::disk::load_gate::hold(&dir);
    let rig = rig.reopen().await;
    let disk = rig.engine.disk.clone().expect("a disk tier");
    assert!(!disk.load_state().done, "the load is held back");

    // Found on disk and promoted into memory before the invalidation.
    assert_eq!(
        rig.check_with("/v", de, Hit, "hello in de").await.tier,
        Tier::Disk
    );
    rig.engine
        .invalidate(request("/v", &[]).norm.key.hash())
        .await;
    rig.check_with("/v", de, Miss, "hello in de").await;
    assert_eq!(
        rig.origin.calls("/v"),
        3,
        "the old de answer was not served"
    );

    drop(gate);
    eventually("the engine has indexed the load", || {
        rig.engine
            .disk_indexed
            .load(std::sync::atomic::Ordering::Acquire)
    })
    .await;
    rig.check_with("/v", en, Miss, "hello in en").await;
    rig.check_with("/v", de, Hit, "hello in de").await;
    assert_eq!(
        rig.origin.calls("/v"),
        4,
        "the load brought no old answer back"
    );
}
