//! Pushed objects: served as hits for their path ahead of the cache, deleted, kept across a
//! restart, covered by purges.

use super::*;
use crate::PurgeSpec;
use crate::push_store::{PushError, PushSpec, PushedInfo};

/// Pushes `body` for `path` (in two chunks) with these tags.
async fn push(
    rig: &Rig,
    path: &str,
    body: &str,
    tags: &[&str],
) -> Result<(PushedInfo, bool), PushError> {
    let spec = PushSpec {
        path: path.into(),
        content_type: "text/javascript".into(),
        cache_control: "max-age=60".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        content_length: Some(body.len() as u64),
    };
    let (a, b) = body.split_at(body.len() / 2);
    let chunks = [a, b].map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c.as_bytes())));
    rig.engine
        .push(spec, futures_util::stream::iter(chunks))
        .await
}

/// A disk rig with `/app.js` pushed as `pushed`, and the origin serving `from origin` there.
async fn pushed() -> Rig {
    let rig = Rig::disk().await;
    rig.origin.fresh("/app.js", "from origin");
    let (info, created) = push(&rig, "/app.js", "pushed", &["js"])
        .await
        .expect("push");
    assert!(created);
    assert_eq!((info.path.as_str(), info.size), ("/app.js", 6));
    rig
}

#[tokio::test]
async fn a_pushed_object_is_a_hit_for_its_path_and_nothing_is_asked() {
    let rig = pushed().await;
    for _ in 0..2 {
        let hit = rig.check("/app.js", Hit, "pushed").await;
        assert_eq!(hit.headers["content-type"], "text/javascript");
        assert!(hit.headers.contains_key("etag"), "{hit:?}");
    }
    assert_eq!(rig.origin.calls("/app.js"), 0);
}

#[tokio::test]
async fn pushed_count_counts_pushed_objects_after_housekeeping() {
    let rig = pushed().await;
    rig.engine.run_pending_tasks().await;
    assert_eq!(rig.engine.pushed_count(), 1, "after a push");
    let rig = rig.reopen().await;
    rig.engine.run_pending_tasks().await;
    assert_eq!(rig.engine.pushed_count(), 1, "after reopening");
}

#[tokio::test]
async fn deleting_a_pushed_object_sends_its_path_to_the_origin() {
    let rig = pushed().await;
    rig.check("/app.js", Hit, "pushed").await;
    assert!(rig.engine.delete_pushed("/app.js").await);
    assert!(!rig.engine.delete_pushed("/app.js").await, "deleted once");
    rig.check("/app.js", Miss, "from origin").await;
    assert_eq!(rig.origin.calls("/app.js"), 1);
    assert!(rig.engine.list_pushed("/").await.is_empty());
}

#[tokio::test]
async fn a_new_push_replaces_the_object_served() {
    let rig = pushed().await;
    // Served once, so memory holds a copy too.
    rig.check("/app.js", Hit, "pushed").await;
    let (_, created) = push(&rig, "/app.js", "pushed again", &[])
        .await
        .expect("push");
    assert!(!created);
    rig.check("/app.js", Hit, "pushed again").await;
    assert_eq!(rig.origin.calls("/app.js"), 0);
}

#[tokio::test]
async fn a_pushed_object_survives_reopening() {
    let rig = pushed().await.reopen().await;
    rig.check("/app.js", Hit, "pushed").await;
    let listed = rig.engine.list_pushed("/").await;
    assert_eq!(
        listed.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(),
        ["/app.js"]
    );
    assert_eq!(rig.origin.calls("/app.js"), 0);
}

#[tokio::test]
async fn a_hard_purge_of_its_tag_removes_a_pushed_object() {
    let rig = pushed().await;
    let purge = PurgeSpec {
        tags: vec!["js".into()],
        ..PurgeSpec::default()
    };
    rig.engine.purge(&purge).await.expect("purge");
    rig.check("/app.js", Miss, "from origin").await;
    assert!(rig.engine.list_pushed("/").await.is_empty());
    assert_eq!(rig.origin.calls("/app.js"), 1);
}

#[tokio::test]
async fn pushing_needs_a_disk_tier() {
    let rig = Rig::memory().await;
    let refused = push(&rig, "/app.js", "pushed", &[]).await;
    assert!(matches!(refused, Err(PushError::Storage(_))), "{refused:?}");
    assert_eq!(rig.engine.pushed_count(), 0);
}

/// A read of the pushed object that a new push overtakes does not put the old copy into
/// memory: the promotion looks, after inserting, whether the store still holds what it read.
#[tokio::test]
async fn a_promotion_that_a_push_overtakes_leaves_the_new_push_served() {
    // Reopened, so the lookup reads the record, body included: the read needs no more I/O.
    let rig = pushed().await.reopen().await;
    let pinned = rig.engine.pinned.as_ref().expect("pinned store");
    let hit = pinned.get("/app.js").await.expect("pushed");
    push(&rig, "/app.js", "pushed again", &[])
        .await
        .expect("push");
    let key = crate::push_store::pinned_key("/app.js");
    rig.engine
        .body_of(key, &crate::Stored::Pinned(hit))
        .await
        .expect("the old copy read");
    rig.check("/app.js", Hit, "pushed again").await;
}
