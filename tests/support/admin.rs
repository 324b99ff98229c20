//! An edge with a disk tier and admin tokens (the purge, push, admin auth, versioned URL, CLI
//! and durability tests), and the admin API calls they make.
//!
//! Data-port requests name [`HOST`], so cache keys survive a restart on new ports.

use std::path::Path;

use outpost_purge_api::digest;
use serde_json::Value;

use super::edge::{Edge, config};
use super::http::{Resp, get_hit as get_hit_url, send};
use super::test_origin::{Gate, Reply, TestOrigin};

/// The site every data-port request names.
pub const HOST: &str = "cdn.example.test";

/// Every scope.
pub const ROOT: &str = "root-7f3c9a1e5b2d4c6a";
/// `read` only.
pub const READER: &str = "reader-0b8e4f2a9c1d";
/// `push` only.
pub const PUSHER: &str = "pusher-5d1a7c3e9b0f";
/// `purge` only.
pub const PURGER: &str = "purger-2c9f6e0a4b8d";

/// Extra settings: the node's name (default `edge-t`) and lines for the `[cache]` and
/// `[admin]` sections.
#[derive(Default, Clone, Copy)]
pub struct Extra<'a> {
    pub name: Option<&'a str>,
    pub cache: &'a str,
    pub admin: &'a str,
}

/// The config of an edge in front of `origin` with its disk tier in `dir`, a 2 s drain and the
/// four tokens above.
pub fn config_text(origin: &str, dir: &Path, extra: Extra<'_>) -> String {
    format!(
        r#"name = "{name}"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
origin = "{origin}"

[cache]
dir = "{dir}"
{cache}

[limits]
drain_timeout = "2s"

[admin]
tokens = [
  {{ secret = "{ROOT}", scopes = ["purge", "push", "read"] }},
  {{ secret = "{READER}", scopes = ["read"] }},
  {{ secret = "{PUSHER}", scopes = ["push"] }},
  {{ secret = "{PURGER}", scopes = ["purge"] }},
]
{admin}
"#,
        name = extra.name.unwrap_or("edge-t"),
        dir = dir.display(),
        cache = extra.cache,
        admin = extra.admin,
    )
}

/// Starts such an edge.
pub async fn start(origin: &TestOrigin, dir: &Path, extra: Extra<'_>) -> Edge {
    Edge::start(config(
        "edge.toml",
        config_text(&origin.base_url(), dir, extra),
    ))
    .await
}

/// Waits until the fills of the `n` objects fetched so far have finished: a fill stays
/// registered (joinable) until its disk copy is committed, and a request that joins a fill
/// started before a purge gets the pre-purge answer (see
/// `a_request_after_a_purge_does_not_join_a_fetch_started_before_it`). Tests that are not about
/// that race purge only once the disk tier holds every object.
pub async fn settled(edge: &Edge, n: u64) {
    edge.wait_disk_objects(n).await;
}

/// GET on the data port with the site's Host.
pub async fn get(c: &reqwest::Client, edge: &Edge, path: &str) -> Resp {
    get_with(c, edge, path, &[]).await
}

pub async fn get_with(
    c: &reqwest::Client,
    edge: &Edge,
    path: &str,
    extra: &[(&str, &str)],
) -> Resp {
    let mut h = vec![("host", HOST)];
    h.extend_from_slice(extra);
    send(c, "GET", &edge.url(path), &h, None).await
}

/// GETs with the site's Host until the answer comes from cache (bounded); callers prove the
/// hit with the origin's count.
pub async fn get_hit(c: &reqwest::Client, edge: &Edge, path: &str) -> Resp {
    get_hit_url(c, &edge.url(path), &[("host", HOST)]).await
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `POST /purge` with the root token; asserts a 200 and returns its JSON.
pub async fn purge(c: &reqwest::Client, edge: &Edge, body: Value) -> Value {
    let r = purge_as(c, edge, Some(ROOT), body.clone()).await;
    assert_eq!(r.status, 200, "POST /purge {body}: {}", r.text());
    r.json()
}

/// `POST /purge` with this token (or none).
pub async fn purge_as(c: &reqwest::Client, edge: &Edge, token: Option<&str>, body: Value) -> Resp {
    let auth = token.map(bearer);
    let mut h = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        h.push(("authorization", a.as_str()));
    }
    send(
        c,
        "POST",
        &edge.admin_url("/purge"),
        &h,
        Some(body.to_string().into()),
    )
    .await
}

/// `PUT /objects/<path>` with the root token.
pub async fn push(
    c: &reqwest::Client,
    edge: &Edge,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Resp {
    push_as(c, edge, ROOT, path, body, headers).await
}

pub async fn push_as(
    c: &reqwest::Client,
    edge: &Edge,
    token: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Resp {
    let auth = bearer(token);
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(headers);
    send(
        c,
        "PUT",
        &edge.admin_url(&format!("/objects{path}")),
        &h,
        Some(body.to_vec().into()),
    )
    .await
}

/// `GET /objects?prefix=` with the reader token.
pub async fn list(c: &reqwest::Client, edge: &Edge, prefix: &str) -> Vec<Value> {
    let auth = bearer(READER);
    let r = send(
        c,
        "GET",
        &edge.admin_url(&format!("/objects?prefix={prefix}")),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "GET /objects?prefix={prefix}: {}", r.text());
    r.json().as_array().expect("a JSON array").clone()
}

pub fn sha256_hex(data: &[u8]) -> String {
    digest::to_hex(&digest::sha256(data))
}

/// `path` answers `"<path> v<n>"` with ETag `"<n>"` (n counts the origin's requests), fresh for
/// 10 minutes, tagged with `Surrogate-Key: <tags>` unless `tags` is empty.
pub fn cacheable(origin: &TestOrigin, path: &'static str, tags: &str) {
    let tags = tags.to_string();
    origin.route_fn(path, move |_, n| {
        let r = Reply::ok(format!("{path} v{n}"))
            .header("cache-control", "public, max-age=600")
            .header("etag", &format!("\"{n}\""));
        if tags.is_empty() {
            r
        } else {
            r.header("surrogate-key", &tags)
        }
    });
}

/// A cacheable origin object whose n-th answer is `"<path> v<n>"` with ETag `"<n>"`. From the
/// second request on, answers wait for `gate` (the test decides when a revalidation lands).
pub fn versioned_route(origin: &TestOrigin, path: &'static str, tag: (&str, &str), gate: &Gate) {
    let (tag_name, tag_value) = (tag.0.to_string(), tag.1.to_string());
    let gate = gate.clone();
    origin.route_fn(path, move |_, n| {
        let r = Reply::ok(format!("{path} v{n}"))
            .header("cache-control", "public, max-age=600")
            .header("etag", &format!("\"{n}\""))
            .header("content-type", "text/plain")
            .header(&tag_name, &tag_value);
        if n == 0 { r } else { r.gated(&gate) }
    });
}
