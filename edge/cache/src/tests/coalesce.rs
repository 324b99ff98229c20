//! Coalescing: concurrent misses for one key share one upstream fetch.

use super::*;
use crate::status::PassReason;

/// Starts `n` concurrent GETs for `path` while its answer is held, and waits until the first
/// one's fetch is asked and the others have joined it.
async fn held_requests(rig: &Rig, path: &str, n: usize) -> (Gate, Vec<JoinHandle<Answer>>) {
    let gate = rig.origin.hold(path);
    let tasks = (0..n).map(|_| rig.spawn_get(path, &[])).collect();
    eventually("every request joined the fill", || {
        rig.origin.calls(path) == 1 && rig.coalesced() == n as u64 - 1
    })
    .await;
    (gate, tasks)
}

#[tokio::test]
async fn concurrent_misses_make_one_fetch_and_all_get_the_whole_body() {
    let rig = Rig::memory().await;
    // Several chunks, each different.
    let body: String = (0..40_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    rig.origin.fresh("/a", &body);
    let (gate, tasks) = held_requests(&rig, "/a", 8).await;
    gate.open();
    for a in answers(tasks).await {
        a.expect(Miss, &body);
    }
    rig.check("/a", Hit, &body).await;
    assert_eq!(rig.origin.calls("/a"), 1);
}

#[tokio::test]
async fn a_failed_fetch_fails_every_waiter_and_is_not_remembered() {
    let rig = Rig::memory().await;
    rig.origin.fail("/a");
    let (gate, tasks) = held_requests(&rig, "/a", 8).await;
    gate.open();
    for a in answers(tasks).await {
        a.expect_failure(Failure::Upstream(refused()));
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(rig.origin.calls("/a"), 1);
    rig.origin.fresh("/a", "back");
    rig.check("/a", Miss, "back").await;
    assert_eq!(rig.origin.calls("/a"), 2);
}

#[tokio::test]
async fn a_leader_that_goes_away_does_not_abort_the_fill() {
    let rig = Rig::memory().await;
    rig.origin.fresh("/a", "survives");
    let (gate, mut tasks) = held_requests(&rig, "/a", 2).await;
    let leader = tasks.remove(0);
    leader.abort();
    assert!(guard(leader).await.is_err_and(|e| e.is_cancelled()));
    gate.open();
    answers(tasks).await[0].expect(Miss, "survives");
    rig.check("/a", Hit, "survives").await;
    assert_eq!(rig.origin.calls("/a"), 1);
}

#[tokio::test]
async fn a_fill_nobody_waits_for_any_more_still_stores() {
    let rig = Rig::disk().await;
    rig.origin.fresh("/a", "stored anyway");
    let (gate, tasks) = held_requests(&rig, "/a", 1).await;
    tasks[0].abort();
    gate.open();
    rig.settle().await;
    assert_eq!(rig.objects().await, (1, 1));
    rig.check("/a", Hit, "stored anyway").await;
    assert_eq!(rig.origin.calls("/a"), 1);
}

#[tokio::test]
async fn a_joiner_wanting_another_variant_fetches_its_own() {
    let rig = Rig::memory().await;
    rig.origin.greet_by_language("/v");
    let gate = rig.origin.hold("/v");
    let en = rig.spawn_get("/v", &[("accept-language", "en")]);
    eventually("the first fetch is asked", || rig.origin.calls("/v") == 1).await;
    let fr = rig.spawn_get("/v", &[("accept-language", "fr")]);
    eventually("the second request joined", || rig.coalesced() == 1).await;
    gate.open();
    let answers = answers(vec![en, fr]).await;
    answers[0].expect(Miss, "hello in en");
    answers[1].expect(CacheStatus::Pass(PassReason::NotShareable), "hello in fr");
    assert_eq!(rig.origin.calls("/v"), 2);
}
