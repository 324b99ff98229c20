//! Handler tests over in-memory bodies and an in-memory backend (no sockets).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};

use super::*;
use crate::auth::Token;
use crate::digest::{sha256, strong_etag, to_hex};
use crate::wire::{PurgeReceipt, PushReceipt, PushedObject};

#[derive(Default)]
struct Store {
    objects: BTreeMap<String, (Bytes, PushSpec)>,
    purges: Vec<PurgeRequest>,
    pushes_started: usize,
}

#[derive(Default, Clone)]
struct MemBackend(Arc<Mutex<Store>>);

impl MemBackend {
    fn get(&self, path: &str) -> Option<(Bytes, PushSpec)> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }
}

impl AdminBackend for MemBackend {
    fn purge(&self, req: PurgeRequest) -> BoxFuture<'static, Result<PurgeReceipt, AdminError>> {
        let mut s = self.0.lock().unwrap();
        s.purges.push(req.clone());
        let seq = s.purges.len() as u64;
        async move {
            Ok(PurgeReceipt {
                id: format!("p{seq}"),
                seq,
                soft: req.soft,
                kinds: req.kinds(),
                matched: None,
                nodes: vec![],
                fleet_seq: None,
            })
        }
        .boxed()
    }

    fn push(
        &self,
        spec: PushSpec,
        mut body: BoxStream<'static, Result<Bytes, AdminError>>,
    ) -> BoxFuture<'static, Result<PushReceipt, AdminError>> {
        let store = self.0.clone();
        store.lock().unwrap().pushes_started += 1;
        async move {
            let mut buf = Vec::new();
            while let Some(chunk) = body.next().await {
                buf.extend_from_slice(&chunk?);
            }
            let etag = strong_etag(&sha256(&buf));
            let size = buf.len() as u64;
            let path = spec.path.clone();
            let created = store
                .lock()
                .unwrap()
                .objects
                .insert(path.clone(), (Bytes::from(buf), spec))
                .is_none();
            Ok(PushReceipt {
                path,
                size,
                etag,
                created,
            })
        }
        .boxed()
    }

    fn delete_object(&self, path: String) -> BoxFuture<'static, Result<bool, AdminError>> {
        let removed = self.0.lock().unwrap().objects.remove(&path).is_some();
        async move { Ok(removed) }.boxed()
    }

    fn list_objects(
        &self,
        prefix: String,
    ) -> BoxFuture<'static, Result<Vec<PushedObject>, AdminError>> {
        let list = self
            .0
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix))
            .map(|(p, (b, spec))| PushedObject {
                path: p.clone(),
                size: b.len() as u64,
                etag: strong_etag(&sha256(b)),
                content_type: spec.content_type.clone(),
                pushed_at_ms: 0,
            })
            .collect();
        async move { Ok(list) }.boxed()
    }
}

fn auth() -> Auth {
    Auth::new([
        Token::admin("root"),
        Token::new("purger", [Scope::Purge]),
        Token::new("reader", [Scope::Read]),
    ])
    .unwrap()
}

fn req(method: &str, uri: &str, token: Option<&str>, body: &'static [u8]) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.header("content-length", body.len())
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

async fn call<B>(backend: &MemBackend, limits: &AdminLimits, r: Request<B>) -> Response<RespBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    handle(r, backend, &auth(), limits)
        .await
        .expect("an admin route")
}

async fn body_string(r: Response<RespBody>) -> String {
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

async fn error_of(r: Response<RespBody>) -> String {
    let v: serde_json::Value = serde_json::from_str(&body_string(r).await).unwrap();
    v["error"].as_str().unwrap().to_string()
}

#[test]
fn the_handler_future_is_send() {
    fn is_send<T: Send>(_: &T) {}
    let b = MemBackend::default();
    let (a, l) = (auth(), AdminLimits::default());
    let fut = handle(req("GET", "/objects", None, b""), &b, &a, &l);
    is_send(&fut);
}

#[tokio::test]
async fn other_paths_are_left_to_the_caller() {
    let b = MemBackend::default();
    for p in ["/healthz", "/purge/", "/objectsx", "/"] {
        let r = handle(
            req("GET", p, None, b""),
            &b,
            &auth(),
            &AdminLimits::default(),
        )
        .await;
        assert!(r.is_none(), "{p}");
    }
}

#[tokio::test]
async fn wrong_methods_get_405_with_allow() {
    let b = MemBackend::default();
    let l = AdminLimits::default();
    let r = call(&b, &l, req("GET", "/purge", Some("root"), b"")).await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = call(&b, &l, req("POST", "/objects/a", Some("root"), b"")).await;
    assert_eq!(r.headers()["allow"], "PUT, DELETE");
}

#[tokio::test]
async fn tokens_and_scopes() {
    let b = MemBackend::default();
    let l = AdminLimits::default();
    let r = call(&b, &l, req("POST", "/purge", None, br#"{"all":true}"#)).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"outpost\"");
    let r = call(
        &b,
        &l,
        req("POST", "/purge", Some("wrong"), br#"{"all":true}"#),
    )
    .await;
    assert_eq!(r.status(), 401);
    let r = call(&b, &l, req("PUT", "/objects/a.txt", Some("purger"), b"x")).await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_of(r).await, "the token lacks the `push` scope");
    let r = call(&b, &l, req("GET", "/objects", Some("purger"), b"")).await;
    assert_eq!(r.status(), 403);
    assert_eq!(b.0.lock().unwrap().pushes_started, 0);
    assert!(b.0.lock().unwrap().purges.is_empty());
}

#[tokio::test]
async fn purge_parses_validates_and_answers_the_receipt() {
    let b = MemBackend::default();
    let l = AdminLimits::default();
    let r = call(
        &b,
        &l,
        req(
            "POST",
            "/purge",
            Some("purger"),
            br#"{"tags":["t1"],"soft":true}"#,
        ),
    )
    .await;
    assert_eq!(r.status(), 200);
    let receipt: PurgeReceipt = serde_json::from_str(&body_string(r).await).unwrap();
    assert_eq!(receipt.seq, 1);
    assert!(receipt.soft);

    let r = call(
        &b,
        &l,
        req("POST", "/purge", Some("purger"), br#"{"urls": ["/a"]"#),
    )
    .await;
    assert_eq!(r.status(), 400);
    let e = error_of(r).await;
    assert!(
        e.starts_with("invalid purge request: EOF while parsing"),
        "{e}"
    );

    let r = call(
        &b,
        &l,
        req("POST", "/purge", Some("purger"), br#"{"tag":["x"]}"#),
    )
    .await;
    assert!(error_of(r).await.contains("unknown field `tag`"));

    let r = call(&b, &l, req("POST", "/purge", Some("purger"), b"{}")).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        error_of(r).await,
        "empty purge request: give urls, prefixes, tags or all"
    );
    assert_eq!(b.0.lock().unwrap().purges.len(), 1);
}

#[tokio::test]
async fn purge_bodies_are_capped() {
    let b = MemBackend::default();
    let l = AdminLimits {
        max_purge_body: 16,
        ..Default::default()
    };
    let big = br#"{"urls":["/aaaaaaaaaaaaaaaaaaaa"]}"#;
    let r = call(&b, &l, req("POST", "/purge", Some("root"), big)).await;
    assert_eq!(r.status(), 413, "declared too large");
    // Without Content-Length, the cap applies while reading.
    let chunked = Request::post("/purge")
        .header("authorization", "Bearer root")
        .body(stream_body(&[&big[..10], &big[10..]]))
        .unwrap();
    let r = call(&b, &l, chunked).await;
    assert_eq!(r.status(), 413);
    assert!(b.0.lock().unwrap().purges.is_empty());
}

type TestBody = StreamBody<BoxStream<'static, Result<http_body::Frame<Bytes>, Infallible>>>;

fn stream_body(parts: &[&'static [u8]]) -> TestBody {
    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = parts
        .iter()
        .map(|p| Ok(http_body::Frame::data(Bytes::from_static(p))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames).boxed())
}

#[tokio::test]
async fn push_creates_then_replaces_with_headers_applied() {
    let b = MemBackend::default();
    let l = AdminLimits::default();
    let r = call(
        &b,
        &l,
        req("PUT", "/objects/css/a%20b.css", Some("root"), b"body{}"),
    )
    .await;
    assert_eq!(r.status(), 201);
    let etag = strong_etag(&sha256(b"body{}"));
    assert_eq!(r.headers()["etag"], etag.as_str());
    let receipt: PushReceipt = serde_json::from_str(&body_string(r).await).unwrap();
    assert_eq!(
        receipt,
        PushReceipt {
            path: "/css/a b.css".into(),
            size: 6,
            etag,
            created: true
        }
    );
    let (_, spec) = b.get("/css/a b.css").unwrap();
    assert_eq!(spec.content_type, "text/css; charset=utf-8");
    assert_eq!(spec.cache_control, DEFAULT_PUSH_CACHE_CONTROL);

    let mut r2 = req("PUT", "/objects/css/a%20b.css", Some("root"), b"p{}");
    let h = r2.headers_mut();
    h.insert("content-type", HeaderValue::from_static("text/x-custom"));
    h.insert("cache-control", HeaderValue::from_static("max-age=60"));
    h.insert("surrogate-key", HeaderValue::from_static("css  site css"));
    h.insert(
        "content-sha256",
        HeaderValue::from_str(&to_hex(&sha256(b"p{}")).to_uppercase()).unwrap(),
    );
    let r = call(&b, &l, r2).await;
    assert_eq!(r.status(), 200, "replaced");
    let (body, spec) = b.get("/css/a b.css").unwrap();
    assert_eq!(&body[..], b"p{}");
    assert_eq!(spec.content_type, "text/x-custom");
    assert_eq!(spec.cache_control, "max-age=60");
    assert_eq!(spec.surrogate_keys, vec!["css", "site"]);
    assert_eq!(spec.content_length, Some(3));
}

#[tokio::test]
async fn a_sha_mismatch_is_400_and_stores_nothing() {
    let b = MemBackend::default();
    let l = AdminLimits::default();
    let mut r = req("PUT", "/objects/a.txt", Some("root"), b"hello");
    r.headers_mut().insert(
        "content-sha256",
        HeaderValue::from_str(&to_hex(&sha256(b"hellO"))).unwrap(),
    );
    let r = call(&b, &l, r).await;
    assert_eq!(r.status(), 400);
    assert!(error_of(r).await.starts_with("Content-SHA256 mismatch"));
    assert!(b.get("/a.txt").is_none());

    let mut r = req("PUT", "/objects/a.txt", Some("root"), b"hello");
    r.headers_mut()
        .insert("content-sha256", HeaderValue::from_static("abc"));
    let r = call(&b, &l, r).await;
    assert_eq!(r.status(), 400);
    assert!(error_of(r).await.contains("64 hex digits"));
    assert_eq!(
        b.0.lock().unwrap().pushes_started,
        1,
        "bad header: backend not called"
    );
}

#[tokio::test]
async fn oversized_pushes_are_413_and_store_nothing() {
    let b = MemBackend::default();
    let l = AdminLimits {
        max_push_bytes: 8,
        ..Default::default()
    };
    let r = call(
        &b,
        &l,
        req("PUT", "/objects/big.bin", Some("root"), b"0123456789"),
    )
    .await;
    assert_eq!(r.status(), 413, "refused from Content-Length");
    assert_eq!(b.0.lock().unwrap().pushes_started, 0);
    let chunked = Request::put("/objects/big.bin")
        .header("authorization", "Bearer root")
        .body(stream_body(&[b"0123", b"4567", b"89"]))
        .unwrap();
    let r = call(&b, &l, chunked).await;
    assert_eq!(r.status(), 413, "refused while streaming");
    assert_eq!(error_of(r).await, "body too large: the limit is 8 bytes");
    assert!(b.get("/big.bin").is_none());
    let exact = Request::put("/objects/ok.bin")
        .header("authorization", "Bearer root")
        .body(stream_body(&[b"0123", b"4567"]))
        .unwrap();
    assert_eq!(
        call(&b, &l, exact).await.status(),
        201,
        "the limit itself is fine"
    );
}

#[tokio::test]
async fn traversal_and_bad_paths_are_400() {
    let b = MemBackend::default();
    let l = AdminLimits::default();
    for uri in [
        "/objects/../etc/passwd",
        "/objects/%2e%2e/etc/passwd",
        "/objects/a/%2E%2E/b",
        "/objects/a%00",
        "/objects/a%5cb",
        "/objects/a%zz",
        "/objects/%ff",
        "/objects/",
        "/objects/a?x=1",
    ] {
        let r = call(&b, &l, req("PUT", uri, Some("root"), b"x")).await;
        assert_eq!(r.status(), 400, "{uri}");
        let r = call(&b, &l, req("DELETE", uri, Some("root"), b"")).await;
        assert_ne!(r.status(), 204, "{uri}");
    }
    assert_eq!(b.0.lock().unwrap().pushes_started, 0);
}

#[tokio::test]
async fn delete_and_list() {
    let b = MemBackend::default();
    let l = AdminLimits::default();
    for p in [
        "/objects/css/a.css",
        "/objects/css/b.css",
        "/objects/index.html",
    ] {
        assert_eq!(
            call(&b, &l, req("PUT", p, Some("root"), b"x"))
                .await
                .status(),
            201
        );
    }
    let r = call(
        &b,
        &l,
        req("GET", "/objects?prefix=/css/", Some("reader"), b""),
    )
    .await;
    assert_eq!(r.status(), 200);
    let list: Vec<PushedObject> = serde_json::from_str(&body_string(r).await).unwrap();
    let paths: Vec<_> = list.iter().map(|o| o.path.as_str()).collect();
    assert_eq!(paths, ["/css/a.css", "/css/b.css"]);
    let r = call(&b, &l, req("GET", "/objects", Some("reader"), b"")).await;
    let list: Vec<PushedObject> = serde_json::from_str(&body_string(r).await).unwrap();
    assert_eq!(list.len(), 3);
    let r = call(
        &b,
        &l,
        req("GET", "/objects?prefix=css", Some("reader"), b""),
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = call(&b, &l, req("GET", "/objects?prefx=/", Some("reader"), b"")).await;
    assert_eq!(r.status(), 400);

    let r = call(
        &b,
        &l,
        req("DELETE", "/objects/css/a.css", Some("root"), b""),
    )
    .await;
    assert_eq!(r.status(), 204);
    let r = call(
        &b,
        &l,
        req("DELETE", "/objects/css/a.css", Some("root"), b""),
    )
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        error_of(r).await,
        "not found: no pushed object at /css/a.css"
    );
    let r = call(
        &b,
        &l,
        req("DELETE", "/objects/index.html", Some("reader"), b""),
    )
    .await;
    assert_eq!(r.status(), 403);
}

/// A backend that breaks the contract by committing without reading the body.
struct Hasty;

impl AdminBackend for Hasty {
    fn purge(&self, _: PurgeRequest) -> BoxFuture<'static, Result<PurgeReceipt, AdminError>> {
        async { Err(AdminError::Unavailable("draining".into())) }.boxed()
    }
    fn push(
        &self,
        spec: PushSpec,
        _body: BoxStream<'static, Result<Bytes, AdminError>>,
    ) -> BoxFuture<'static, Result<PushReceipt, AdminError>> {
        async move {
            Ok(PushReceipt {
                path: spec.path,
                size: 0,
                etag: "\"x\"".into(),
                created: true,
            })
        }
        .boxed()
    }
    fn delete_object(&self, _: String) -> BoxFuture<'static, Result<bool, AdminError>> {
        async { Err(AdminError::internal("disk gone")) }.boxed()
    }
    fn list_objects(&self, _: String) -> BoxFuture<'static, Result<Vec<PushedObject>, AdminError>> {
        async { Ok(vec![]) }.boxed()
    }
}

#[tokio::test]
async fn backend_errors_and_contract_breaches_are_reported() {
    let a = auth();
    let l = AdminLimits::default();
    let r = handle(
        req("PUT", "/objects/a", Some("root"), b"abc"),
        &Hasty,
        &a,
        &l,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 500);
    let r = handle(
        req("POST", "/purge", Some("root"), br#"{"all":true}"#),
        &Hasty,
        &a,
        &l,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 503);
    let r = handle(
        req("DELETE", "/objects/a", Some("root"), b""),
        &Hasty,
        &a,
        &l,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(error_of(r).await, "internal error: disk gone");
}

#[tokio::test]
async fn an_open_api_lets_everything_through() {
    let b = MemBackend::default();
    let r = handle(
        req("PUT", "/objects/x.json", None, b"{}"),
        &b,
        &Auth::open(),
        &AdminLimits::default(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        b.get("/x.json").unwrap().1.content_type,
        "application/json; charset=utf-8"
    );
}

#[tokio::test]
async fn a_refused_body_is_drained_not_dropped() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let polled = Arc::new(AtomicUsize::new(0));
    let counter = polled.clone();
    let frames = futures_util::stream::unfold(0, move |i| {
        let counter = counter.clone();
        async move {
            (i < 3).then(|| {
                counter.fetch_add(1, Ordering::SeqCst);
                let f: Result<http_body::Frame<Bytes>, Infallible> =
                    Ok(http_body::Frame::data(Bytes::from_static(b"chunk")));
                (f, i + 1)
            })
        }
    });
    let r = Request::put("/objects/a.bin")
        .body(StreamBody::new(frames.boxed()))
        .unwrap();
    let b = MemBackend::default();
    let resp = call(&b, &AdminLimits::default(), r).await;
    assert_eq!(resp.status(), 401);
    // The rest of the body is read in the background so the client sees the 401.
    for _ in 0..100 {
        if polled.load(Ordering::SeqCst) == 3 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("the refused body was not drained");
}
