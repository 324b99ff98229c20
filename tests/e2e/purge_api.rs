//! End-to-end tests of the operator API ("Purge and push"): `outpost_purge_api::serve` over a
//! real socket on 127.0.0.1, an in-memory `AdminBackend`, reqwest and the crate's own client
//! (`run_purge`, `run_push`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use outpost_purge_api::futures_util::{FutureExt, StreamExt};
use outpost_purge_api::{
    AdminBackend, AdminError, AdminLimits, Auth, BoxFuture, BoxStream, PurgeArgs, PurgeReceipt,
    PurgeRequest, PushArgs, PushReceipt, PushSpec, PushedObject, Scope, Token, digest, run_purge,
    run_push,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::support::files::write;
use crate::support::http::raw_request;
use crate::support::{Serving, WAIT, client};

const ROOT: &str = "root-token";
const READER: &str = "reader-token";
const PURGER: &str = "purger-token";

#[derive(Clone)]
struct Stored {
    body: Bytes,
    spec: PushSpec,
}

/// A HashMap-backed node: it buffers a push and commits only when the body ends cleanly.
#[derive(Default, Clone)]
struct MemBackend {
    objects: Arc<Mutex<BTreeMap<String, Stored>>>,
    purges: Arc<Mutex<Vec<PurgeRequest>>>,
}

impl MemBackend {
    fn get(&self, path: &str) -> Option<Stored> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    fn len(&self) -> usize {
        self.objects.lock().unwrap().len()
    }
}

impl AdminBackend for MemBackend {
    fn purge(&self, req: PurgeRequest) -> BoxFuture<'static, Result<PurgeReceipt, AdminError>> {
        let purges = self.purges.clone();
        async move {
            let mut p = purges.lock().unwrap();
            p.push(req.clone());
            Ok(PurgeReceipt {
                id: format!("purge-{}", p.len()),
                seq: p.len() as u64,
                soft: req.soft,
                kinds: req.kinds(),
                matched: Some(0),
                nodes: vec![outpost_purge_api::NodeResult::applied("test")],
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
        let objects = self.objects.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(chunk) = body.next().await {
                // An error drops `buf`: nothing partial is stored.
                buf.extend_from_slice(&chunk?);
            }
            let receipt = PushReceipt {
                path: spec.path.clone(),
                size: buf.len() as u64,
                etag: digest::strong_etag(&digest::sha256(&buf)),
                created: false,
            };
            let created = objects
                .lock()
                .unwrap()
                .insert(
                    spec.path.clone(),
                    Stored {
                        body: Bytes::from(buf),
                        spec,
                    },
                )
                .is_none();
            Ok(PushReceipt { created, ..receipt })
        }
        .boxed()
    }

    fn delete_object(&self, path: String) -> BoxFuture<'static, Result<bool, AdminError>> {
        let removed = self.objects.lock().unwrap().remove(&path).is_some();
        async move { Ok(removed) }.boxed()
    }

    fn list_objects(
        &self,
        prefix: String,
    ) -> BoxFuture<'static, Result<Vec<PushedObject>, AdminError>> {
        let list = self
            .objects
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix))
            .map(|(p, s)| PushedObject {
                path: p.clone(),
                size: s.body.len() as u64,
                etag: digest::strong_etag(&digest::sha256(&s.body)),
                content_type: s.spec.content_type.clone(),
                pushed_at_ms: 0,
            })
            .collect();
        async move { Ok(list) }.boxed()
    }
}

struct Node {
    addr: SocketAddr,
    backend: MemBackend,
    _server: Serving,
}

impl Node {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn start(limits: AdminLimits) -> Node {
    let auth = Auth::new([
        Token::admin(ROOT),
        Token::new(READER, [Scope::Read]),
        Token::new(PURGER, [Scope::Purge]),
    ])
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = MemBackend::default();
    let served = Arc::new(backend.clone());
    Node {
        addr,
        backend,
        _server: Serving::spawn(|stopped| {
            outpost_purge_api::serve(listener, served, Arc::new(auth), limits, stopped)
        }),
    }
}

/// The JSON body of an answer (reqwest is built without its `json` feature).
macro_rules! json_of {
    ($r:expr) => {
        serde_json::from_slice(&$r.bytes().await.unwrap()).unwrap()
    };
}

async fn error_text(r: reqwest::Response) -> String {
    let v: Value = json_of!(r);
    v["error"].as_str().unwrap().to_string()
}

/// Sends raw HTTP/1.1 bytes (reqwest normalises `..` and `%2e%2e` away) and returns the status.
async fn raw_status(addr: SocketAddr, request_line: &str) -> u16 {
    let req = format!(
        "{request_line}\r\nHost: {addr}\r\nAuthorization: Bearer {ROOT}\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
    );
    raw_request(addr, &req, WAIT).await.0
}

#[tokio::test]
async fn tokens_are_required_and_scoped() {
    let node = start(AdminLimits::default()).await;
    let c = client();
    let purge = json!({"all": true});

    let r = c
        .post(node.url("/purge"))
        .body(purge.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"outpost\"");

    let r = c
        .post(node.url("/purge"))
        .bearer_auth("not-a-token")
        .body(purge.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_text(r).await, "invalid token");

    let r = c
        .post(node.url("/purge"))
        .bearer_auth(READER)
        .body(purge.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_text(r).await, "the token lacks the `purge` scope");

    let r = c
        .put(node.url("/objects/a.txt"))
        .bearer_auth(PURGER)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(node.backend.purges.lock().unwrap().is_empty());
    assert_eq!(node.backend.len(), 0);

    let r = c.get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 404, "serve() answers 404 outside the API");
}

#[tokio::test]
async fn purge_returns_a_receipt_and_bad_json_is_named() {
    let node = start(AdminLimits::default()).await;
    let c = client();
    let r = c
        .post(node.url("/purge"))
        .bearer_auth(PURGER)
        .body(json!({"prefixes": ["/img/"], "tags": ["t"], "soft": true}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let receipt: PurgeReceipt = json_of!(r);
    assert_eq!(receipt.seq, 1);
    assert!(receipt.soft && receipt.all_ok());
    assert_eq!(
        node.backend.purges.lock().unwrap()[0].prefixes,
        vec!["/img/".to_string()]
    );

    let r = c
        .post(node.url("/purge"))
        .bearer_auth(PURGER)
        .body(r#"{"urls": 5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e = error_text(r).await;
    assert!(
        e.starts_with("invalid purge request: invalid type: integer `5`, expected a sequence"),
        "{e}"
    );

    let r = c
        .post(node.url("/purge"))
        .bearer_auth(PURGER)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        error_text(r).await,
        "empty purge request: give urls, prefixes, tags or all"
    );
    assert_eq!(node.backend.purges.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn push_creates_then_replaces_lists_and_deletes() {
    let node = start(AdminLimits::default()).await;
    let c = client();
    let r = c
        .put(node.url("/objects/css/site.css"))
        .bearer_auth(ROOT)
        .header("surrogate-key", "css site")
        .body("body{color:red}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let etag = digest::strong_etag(&digest::sha256(b"body{color:red}"));
    assert_eq!(r.headers()["etag"], etag.as_str());
    let receipt: PushReceipt = json_of!(r);
    assert_eq!(receipt.path, "/css/site.css");
    assert!(receipt.created);
    let stored = node.backend.get("/css/site.css").unwrap();
    assert_eq!(stored.spec.content_type, "text/css; charset=utf-8");
    assert_eq!(stored.spec.surrogate_keys, ["css", "site"]);

    let body = "body{color:blue}";
    let r = c
        .put(node.url("/objects/css/site.css"))
        .bearer_auth(ROOT)
        .header(
            "content-sha256",
            digest::to_hex(&digest::sha256(body.as_bytes())),
        )
        .header("cache-control", "public, max-age=31536000, immutable")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a replace is 200");
    let receipt: PushReceipt = json_of!(r);
    assert!(!receipt.created);
    let stored = node.backend.get("/css/site.css").unwrap();
    assert_eq!(&stored.body[..], body.as_bytes());
    assert_eq!(
        stored.spec.cache_control,
        "public, max-age=31536000, immutable"
    );

    c.put(node.url("/objects/index.html"))
        .bearer_auth(ROOT)
        .body("<h1>hi</h1>")
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let r = c
        .get(node.url("/objects?prefix=/css/"))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Vec<PushedObject> = json_of!(r);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].path, "/css/site.css");
    assert_eq!(list[0].size, body.len() as u64);

    let r = c
        .delete(node.url("/objects/css/site.css"))
        .bearer_auth(ROOT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .delete(node.url("/objects/css/site.css"))
        .bearer_auth(ROOT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .get(node.url("/objects"))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    let list: Vec<PushedObject> = json_of!(r);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].path, "/index.html");
}

#[tokio::test]
async fn a_sha_mismatch_is_400_and_nothing_is_stored() {
    let node = start(AdminLimits::default()).await;
    let r = client()
        .put(node.url("/objects/app.js"))
        .bearer_auth(ROOT)
        .header("content-sha256", digest::to_hex(&digest::sha256(b"other")))
        .body("console.log(1)")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e = error_text(r).await;
    assert!(e.starts_with("Content-SHA256 mismatch"), "{e}");
    assert!(node.backend.get("/app.js").is_none());
}

#[tokio::test]
async fn oversized_pushes_are_413_and_nothing_is_stored() {
    let node = start(AdminLimits {
        max_push_bytes: 1000,
        ..Default::default()
    })
    .await;
    let c = client();
    let r = c
        .put(node.url("/objects/big.bin"))
        .bearer_auth(ROOT)
        .body(vec![7u8; 4000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "refused from Content-Length");

    // Chunked: no Content-Length, so the limit is enforced while streaming.
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        (0..4).map(|_| Ok(Bytes::from(vec![7u8; 400]))).collect();
    let r = c
        .put(node.url("/objects/big.bin"))
        .bearer_auth(ROOT)
        .body(reqwest::Body::wrap_stream(
            outpost_purge_api::futures_util::stream::iter(chunks),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "refused while streaming");
    assert_eq!(
        error_text(r).await,
        "body too large: the limit is 1000 bytes"
    );
    assert_eq!(node.backend.len(), 0);
}

#[tokio::test]
async fn traversal_is_400() {
    let node = start(AdminLimits::default()).await;
    for line in [
        "PUT /objects/../etc/passwd HTTP/1.1",
        "PUT /objects/%2e%2e/etc/passwd HTTP/1.1",
        "PUT /objects/a/%2E%2E/%2E%2E/b HTTP/1.1",
        "PUT /objects/a%00b HTTP/1.1",
        "PUT /objects/a%5Cb HTTP/1.1",
        "PUT /objects/a%zz HTTP/1.1",
        "PUT /objects/%C3%28 HTTP/1.1",
        "DELETE /objects/%2e%2e/x HTTP/1.1",
    ] {
        assert_eq!(raw_status(node.addr, line).await, 400, "{line}");
    }
    assert_eq!(node.backend.len(), 0);
}

#[tokio::test]
async fn run_push_uploads_a_directory_tree() {
    let node = start(AdminLimits {
        max_push_bytes: 300_000,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    write(&site.join("index.html"), b"<h1>home</h1>");
    write(&site.join("css/site.css"), b"body{}");
    write(&site.join("img/icons/a b.svg"), b"<svg/>");
    write(&site.join("assets/big.bin"), &big);
    write(&site.join("assets/too-big.bin"), &vec![0u8; 400_000]);

    let args = PushArgs {
        admin: node.addr.to_string(),
        token: Some(ROOT.into()),
        prefix: "/v2".into(),
        paths: vec![site.clone()],
        concurrency: 2,
        progress: false,
    };
    let summary = run_push(args.clone()).await.unwrap();
    assert_eq!(summary.files_ok(), 4, "{summary:?}");
    assert_eq!(summary.created(), 4);
    assert_eq!(summary.failed.len(), 1);
    let f = &summary.failed[0];
    assert_eq!(f.object.as_deref(), Some("/v2/assets/too-big.bin"));
    assert!(f.reason.contains("413"), "{}", f.reason);
    assert_eq!(summary.bytes, 13 + 6 + 6 + 200_000);

    assert_eq!(
        &node.backend.get("/v2/assets/big.bin").unwrap().body[..],
        &big[..]
    );
    assert_eq!(
        &node.backend.get("/v2/img/icons/a b.svg").unwrap().body[..],
        b"<svg/>"
    );
    assert_eq!(
        node.backend
            .get("/v2/index.html")
            .unwrap()
            .spec
            .content_type,
        "text/html; charset=utf-8"
    );
    assert!(node.backend.get("/v2/assets/too-big.bin").is_none());

    std::fs::remove_file(site.join("assets/too-big.bin")).unwrap();
    let again = run_push(args).await.unwrap();
    assert!(again.is_success(), "{again:?}");
    assert_eq!(again.created(), 0, "the second run replaces");

    let wrong = run_push(PushArgs {
        admin: node.addr.to_string(),
        token: Some(READER.into()),
        paths: vec![site],
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(wrong.status(), Some(403), "{wrong}");
}

#[tokio::test]
async fn run_purge_sends_and_returns_the_receipt() {
    let node = start(AdminLimits::default()).await;
    let receipt = run_purge(PurgeArgs {
        admin: format!("http://{}/", node.addr),
        token: Some(PURGER.into()),
        soft: false,
        urls: vec!["/a.html".into()],
        tags: vec!["product-1".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(receipt.id, "purge-1");
    assert_eq!(
        receipt.kinds,
        [
            outpost_purge_api::PurgeKind::Url,
            outpost_purge_api::PurgeKind::Tag
        ]
    );
    let sent = node.backend.purges.lock().unwrap()[0].clone();
    assert_eq!(sent.urls, ["/a.html"]);

    let e = run_purge(PurgeArgs {
        admin: node.addr.to_string(),
        token: Some("wrong".into()),
        all: true,
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
}
