//! The disk tier's index in memory stays within `--memory` (issue 15, "index memory"): every
//! stored object costs the index some bytes in memory, and before this test the number of
//! objects was bounded only by `--disk`, so a stream of unique cacheable URLs grew the process
//! far past `--memory`. The heap is measured by a counting allocator (this test binary's own).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::BodyExt;
use outpost_cache::clock::Clock;
use outpost_cache::key::{KeyOptions, NormalizedRequest};
use outpost_cache::upstream::{Upstream, UpstreamBody, UpstreamError};
use outpost_cache::{CacheRequest, Engine, EngineConfig, ServedBody};

#[global_allocator]
static ALLOCATOR: outpost_alloc::Counted = outpost_alloc::Counted;

/// The heap is one count for the whole binary: its tests take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn heap() -> i64 {
    outpost_alloc::counted_bytes()
}

/// Answers any path with `size` bytes (the path's, then a fixed pattern), cacheable for an
/// hour, never compressible.
struct Origin {
    size: usize,
}

impl Upstream for Origin {
    fn fetch(
        &self,
        req: Request<UpstreamBody>,
    ) -> BoxFuture<'static, Result<Response<UpstreamBody>, UpstreamError>> {
        let mut body = req.uri().path().as_bytes().to_vec();
        body.resize(self.size, b'#');
        let resp = Response::builder()
            .header(header::CACHE_CONTROL, "public, max-age=3600")
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, self.size)
            .body(
                http_body_util::Full::new(Bytes::from(body))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .expect("response");
        async move { Ok(resp) }.boxed()
    }
}

fn request(path: &str) -> CacheRequest {
    let uri: Uri = path.parse().expect("path");
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("site.test"));
    let norm = NormalizedRequest::new(&Method::GET, &uri, &headers, &KeyOptions::default())
        .expect("normalised");
    let mut upstream = Request::new(());
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = headers;
    CacheRequest {
        norm,
        method: Method::GET,
        upstream: upstream.into_parts().0,
        default_ttl: None,
    }
}

async fn open(dir: &std::path::Path, memory: u64, size: usize) -> Arc<Engine> {
    Engine::open(
        EngineConfig {
            memory_bytes: memory,
            disk: Some((dir.to_path_buf(), 4 << 30)),
            max_object_size: 8 << 20,
            surrogate_name: "outpost".into(),
            targeted_cache_control: outpost_cache::default_targeted_cache_control(),
            stale_on_error: Duration::ZERO,
            revalidations_per_sec: 10,
            stale_if_error_wait: Duration::ZERO,
            send_timeout: Duration::from_secs(60),
            negative_ttl: Default::default(),
            prefresh: 0.0,
            // Every miss written, so a full index evicts for each: the bound under churn.
            disk_admission: outpost_cache::disk::admission::Policy::Always,
        },
        Arc::new(Origin { size }),
        Clock::system(),
    )
    .await
    .expect("engine")
}

/// Asks for `/o/{from}` .. `/o/{to}` (each a miss), 16 at a time, and waits until the disk
/// tier has decided on every one.
async fn fill(engine: &Arc<Engine>, from: usize, to: usize) {
    let decided = |e: &Engine| e.stats.disk_admissions().iter().sum::<u64>();
    let want = decided(engine) + (to - from) as u64;
    ask(engine, from, to).await;
    for _ in 0..2000 {
        if decided(engine) >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(decided(engine) >= want, "the disk tier never decided");
    engine.run_pending_tasks().await;
}

const CLIENTS: usize = 1;

async fn ask(engine: &Arc<Engine>, from: usize, to: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(from));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (engine, next) = (engine.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return;
                }
                let served = engine.serve(request(&format!("/o/{i}"))).await;
                if let ServedBody::Stream { mut stream, .. } = served.body {
                    use futures_util::StreamExt;
                    while let Some(chunk) = stream.next().await {
                        chunk.expect("body");
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
}

/// Opens an engine on `dir` and waits for its disk index load; returns it with the heap it
/// added.
async fn open_measured(dir: &std::path::Path, memory: u64, size: usize) -> (Arc<Engine>, i64) {
    settle().await;
    let before = heap();
    let engine = open(dir, memory, size).await;
    for _ in 0..1000 {
        if engine.disk_load().is_some_and(|l| l.done) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        engine.disk_load().is_some_and(|l| l.done),
        "the load never ended"
    );
    engine.run_pending_tasks().await;
    settle().await;
    let added = heap() - before;
    (engine, added)
}

/// Waits until the disk tier's deleter has taken every evicted entry (each stored object is
/// then either indexed or counted as evicted: the URLs are unique, nothing is replaced).
async fn evictions_done(engine: &Arc<Engine>) {
    let done = |e: &Engine| {
        let stored = e.stats.disk_admissions()[0];
        e.usage()[1].1 + e.evictions().1 >= stored
    };
    for _ in 0..2000 {
        if done(engine) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(done(engine), "the deleter never caught up");
    engine.run_pending_tasks().await;
    settle().await;
}

/// Lets background tasks that free memory (dropped engines, evictions) run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn close(engine: Arc<Engine>) {
    engine.close().await;
    drop(engine);
    settle().await;
}

/// With `--memory 8MiB` (a 2 MiB index), a stream of unique 1 KiB objects fills the disk
/// index to its budget and no further: the heap stays within 1 MiB while 16,000 more objects
/// come (it grew by ~255 bytes per object, 2.2 MB for 8,500, before the index counted against
/// `--memory`). And an
/// index loaded at start-up costs at most [`INDEX_ENTRY_BYTES`] per object, beside the
/// database's page cache (a share of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_index_stays_within_its_share_of_memory() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let memory = 8 << 20;
    let budget = outpost_cache::MemoryShares::of(memory, true).disk_index;
    let most = outpost_cache::disk::entries_budget(budget) / outpost_cache::disk::INDEX_ENTRY_BYTES;
    let engine = open(dir.path(), memory, 1024).await;
    fill(&engine, 0, 16_000).await;
    evictions_done(&engine).await;
    let (h1, n1) = (heap(), engine.usage()[1].1);
    assert!(
        n1 * 10 >= most * 9,
        "the index filled up: {n1} objects of at most {most} ({:?})",
        engine.stats.disk_admissions()
    );
    fill(&engine, 16_000, 32_000).await;
    evictions_done(&engine).await;
    let (h2, n2) = (heap(), engine.usage()[1].1);
    eprintln!(
        "heap {h1} -> {h2}, objects {n1} -> {n2} (at most {most}), admissions {:?}",
        engine.stats.disk_admissions()
    );
    assert!(
        n2 <= most,
        "{n2} objects, more than the {most} the index budget allows"
    );
    assert!(
        h2 - h1 < 1 << 20,
        "the heap grew by {} bytes over 16,000 more objects ({n1} -> {n2} on disk)",
        h2 - h1
    );
    close(engine).await;

    let empty = tempfile::tempdir().unwrap();
    let (engine, base) = open_measured(empty.path(), memory, 1024).await;
    close(engine).await;
    let (engine, loaded) = open_measured(dir.path(), memory, 1024).await;
    let n = engine.usage()[1].1;
    // The database's page cache, filled by the load, has its own share of `--memory`.
    let page_cache = outpost_cache::MemoryShares::of(memory, true).held_meta as i64;
    let per_object = (loaded - base - page_cache) / i64::try_from(n.max(1)).unwrap();
    eprintln!(
        "loaded {n} objects: {loaded} - {base} - {page_cache} bytes, {per_object} per object"
    );
    assert!(n * 10 >= n2 * 9, "the load found {n} of {n2} objects");
    assert!(
        per_object <= outpost_cache::disk::INDEX_ENTRY_BYTES as i64,
        "the loaded index costs {per_object} bytes per object"
    );
    close(engine).await;
}

/// Objects kept in content files (20 KiB: not inline) cost the index at most
/// [`INDEX_ENTRY_BYTES`] plus [`INDEX_FILE_ENTRY_EXTRA`] each, loaded and then read whole once
/// (which keeps the file's path and stamp); the database's page cache, which the load fills,
/// is counted in a share of its own. `--memory 1MiB` leaves the memory tier nothing,
/// so reads only add what the disk tier keeps: that, and held metadata, which its budget
/// bounds: the first half of the reads fills it, so the second half's cost is the entries'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_content_files_cost_what_they_are_charged() {
    use outpost_cache::disk::{INDEX_ENTRY_BYTES, INDEX_FILE_ENTRY_EXTRA};
    const OBJECTS: usize = 896;
    let _turn = ONE_AT_A_TIME.lock().await;
    // Content files kept open for whole reads are a cache of their own, fixed in size (at most
    // 1,024 per tier, an eighth of `ulimit -n`): with few descriptors it keeps few, so what
    // is measured is the entries' own cost, not that cache filling up alongside them.
    few_open_files();
    let dir = tempfile::tempdir().unwrap();
    let memory = 1 << 20;
    let size = 20 << 10;
    let engine = open(dir.path(), memory, size).await;
    // In small batches, so the disk writers keep up (a writer that falls behind gives its
    // copy up).
    for from in (0..OBJECTS).step_by(8) {
        fill(&engine, from, from + 8).await;
    }
    close(engine).await;
    let empty = tempfile::tempdir().unwrap();
    let (engine, base) = open_measured(empty.path(), memory, size).await;
    close(engine).await;
    let (engine, loaded) = open_measured(dir.path(), memory, size).await;
    let n = engine.usage()[1].1;
    assert!(
        n as usize * 10 >= OBJECTS * 9,
        "only {n} of {OBJECTS} objects were stored"
    );
    ask(&engine, 0, OBJECTS / 2).await;
    engine.run_pending_tasks().await;
    settle().await;
    let before = heap();
    ask(&engine, OBJECTS / 2, OBJECTS).await;
    engine.run_pending_tasks().await;
    settle().await;
    assert_eq!(engine.usage()[0].1, 0, "the memory tier took nothing");
    let read = (heap() - before) / i64::try_from(OBJECTS / 2).unwrap();
    // The database's page cache, filled by the load, has its own share of `--memory`.
    let page_cache = outpost_cache::MemoryShares::of(memory, true).held_meta as i64;
    let loaded = (loaded - base - page_cache) / i64::try_from(n).unwrap();
    eprintln!("{n} objects: loaded {loaded} bytes per object, a first whole read adds {read}");
    assert!(
        loaded + read <= (INDEX_ENTRY_BYTES + INDEX_FILE_ENTRY_EXTRA) as i64,
        "an entry with a content file costs {} bytes",
        loaded + read
    );
    close(engine).await;
}

/// Slow clients of disk hits hold no more than the read budget: 64 requests for a 100 KiB
/// object that only the disk tier holds (`--memory 1MiB`: a 1 MiB read budget, no memory tier
/// to speak of), each answer taken and left unread, as a client that does not read leaves it
/// with the server. Whole reads take the budget until it is spent; the rest stream, holding two
/// small chunks each. Before the budget, every answer held its whole body: 6.4 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_disk_hits_hold_at_most_the_read_budget() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let memory = 1 << 20;
    let size = 100 << 10;
    let engine = open(dir.path(), memory, size).await;
    fill(&engine, 0, 1).await;
    settle().await;
    let budget = outpost_cache::MemoryShares::of(memory, true).disk_reads;
    /// An answer as a client that stopped reading leaves it.
    #[allow(dead_code)] // held, never read
    enum Held {
        Whole(Bytes),
        Streamed(
            futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
            Bytes,
        ),
    }
    let before = heap();
    let mut held = Vec::new();
    let (mut whole, mut streamed) = (0, 0);
    for _ in 0..64 {
        let served = engine.serve(request("/o/0")).await;
        match served.body {
            ServedBody::Full(body) => {
                assert_eq!(body.len(), size);
                whole += 1;
                held.push(Held::Whole(body));
            }
            ServedBody::Stream { mut stream, .. } => {
                // A client that read the first chunk and stopped: the stream has read ahead.
                use futures_util::StreamExt;
                let first = stream.next().await.expect("a chunk").expect("body");
                assert!(first.len() <= outpost_cache::disk::STREAM_READ_SMALL);
                streamed += 1;
                held.push(Held::Streamed(stream, first));
            }
            other => panic!("not a body: {:?}", std::mem::discriminant(&other)),
        }
    }
    let grown = heap() - before;
    eprintln!("64 held answers: {whole} whole, {streamed} streamed, heap +{grown} bytes");
    assert!(
        whole >= 1 && streamed >= 1,
        "{whole} whole, {streamed} streamed"
    );
    let per_stream = 2 * outpost_cache::disk::STREAM_READ_SMALL as i64 + (8 << 10);
    assert!(
        grown <= budget as i64 + 64 * per_stream,
        "64 unread answers hold {grown} bytes: more than the read budget ({budget}) and two \
         small chunks per stream"
    );
    drop(held);
    close(engine).await;
}

/// Lowers this process's soft limit of open files to 256 (a fresh shell has 1,024).
fn few_open_files() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = Some(limit.current.unwrap_or(u64::MAX).min(256));
    setrlimit(Resource::Nofile, limit).expect("lower the open files limit");
}
