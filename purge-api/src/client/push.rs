//! `outpost push`: walk the given files and directories, then upload each file, streamed from
//! disk with its SHA-256, a few at a time, retrying transient failures.
//!
//! Object paths: a file given by name goes to `<prefix><file name>`; a directory's contents go
//! under `<prefix>` (the directory's own name is not part of the path), so
//! `outpost push --prefix / site` puts `site/css/a.css` at `/css/a.css`. Symbolic links are
//! followed (loops are reported as failures); hidden files are pushed like any other.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use walkdir::WalkDir;

use super::{AdminClient, ClientError, RETRY, resolve_token, with_retry};
use crate::digest::ContentHasher;
use crate::path::{encode_object_path, object_path};
use crate::wire::PushReceipt;

/// The arguments of `outpost push`. `Debug` redacts the token.
#[derive(Clone)]
pub struct PushArgs {
    /// The node's admin address, `host:port` or `http://host:port`.
    pub admin: String,
    /// Bearer token; `None` falls back to `OUTPOST_ADMIN_TOKEN`.
    pub token: Option<String>,
    /// Where the objects go, starting with `/` (default `/`).
    pub prefix: String,
    /// Files and directories to push.
    pub paths: Vec<PathBuf>,
    /// Uploads in flight at once (default 4; 0 counts as 1).
    pub concurrency: usize,
    /// Show a progress bar (bytes and files) on stderr; hidden when stderr is not a terminal.
    pub progress: bool,
}

impl Default for PushArgs {
    fn default() -> Self {
        Self {
            admin: String::new(),
            token: None,
            prefix: "/".to_string(),
            paths: Vec::new(),
            concurrency: 4,
            progress: false,
        }
    }
}

impl fmt::Debug for PushArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushArgs")
            .field("admin", &self.admin)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("prefix", &self.prefix)
            .field("paths", &self.paths)
            .field("concurrency", &self.concurrency)
            .field("progress", &self.progress)
            .finish()
    }
}

/// What a push run did.
#[derive(Debug, Clone)]
pub struct PushSummary {
    /// One receipt per uploaded file, in completion order.
    pub pushed: Vec<PushReceipt>,
    /// Files that were not pushed, with the reason.
    pub failed: Vec<PushFailure>,
    /// Bytes uploaded (sum of the pushed objects' sizes).
    pub bytes: u64,
    pub elapsed: Duration,
}

impl PushSummary {
    pub fn files_ok(&self) -> usize {
        self.pushed.len()
    }

    /// How many pushed objects were new (the rest replaced an object).
    pub fn created(&self) -> usize {
        self.pushed.iter().filter(|r| r.created).count()
    }

    /// True when every file was pushed.
    pub fn is_success(&self) -> bool {
        self.failed.is_empty()
    }
}

/// A file that was not pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushFailure {
    pub file: PathBuf,
    /// The object path it would have had, when it got that far.
    pub object: Option<String>,
    pub reason: String,
}

/// One file to upload.
#[derive(Debug, Clone)]
struct Upload {
    file: PathBuf,
    object: String,
    size: u64,
}

/// Pushes every file under `args.paths` and reports what happened. Prints nothing but the
/// optional progress bar.
///
/// Returns `Err` only when nothing useful can happen: bad arguments or admin address, a named
/// path that does not exist, or a 401/403 (the token is wrong for every file; remaining
/// uploads are cancelled). Everything else is per file, in [`PushSummary::failed`].
pub async fn run_push(args: PushArgs) -> Result<PushSummary, ClientError> {
    let started = Instant::now();
    if args.paths.is_empty() {
        return Err(ClientError::Usage(
            "nothing to push: give files or directories".into(),
        ));
    }
    let prefix = normalise_prefix(&args.prefix)?;
    let client = AdminClient::new(&args.admin, resolve_token(args.token))?;
    let paths = args.paths;
    let (uploads, mut failed) = tokio::task::spawn_blocking(move || collect(&paths, &prefix))
        .await
        .map_err(|e| ClientError::Usage(format!("walking the paths failed: {e}")))??;

    let files = uploads.len();
    // Fail fast: a wrong or dead address is one message, not one per file.
    if !uploads.is_empty() {
        client.probe().await.map_err(|e| match e {
            ClientError::Connect { admin, reason } => ClientError::Connect {
                admin,
                reason: format!("{reason} (nothing was pushed; is --admin the node's admin port?)"),
            },
            e => e,
        })?;
    }
    let progress = args
        .progress
        .then(|| progress_bar(uploads.iter().map(|u| u.size).sum(), files));
    let mut pushed = Vec::with_capacity(files);
    let mut bytes = 0;
    let mut results = futures_util::stream::iter(uploads)
        .map(|u| {
            let client = &client;
            async move {
                let r = push_one(client, &u).await;
                (u, r)
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    while let Some((u, r)) = results.next().await {
        match r {
            Ok(receipt) => {
                bytes += receipt.size;
                // The bar counts what the node acknowledged, not what was sent.
                if let Some(pb) = &progress {
                    pb.inc(u.size);
                    pb.set_message(format!("{}/{files} files", pushed.len() + 1));
                }
                pushed.push(receipt);
            }
            Err(e) if e.is_auth() => {
                if let Some(pb) = &progress {
                    pb.finish_and_clear();
                }
                return Err(e);
            }
            // The node went away (after retries): every other file would fail the same way.
            Err(ClientError::Connect { admin, reason }) => {
                if let Some(pb) = &progress {
                    pb.finish_and_clear();
                }
                return Err(ClientError::Connect {
                    admin,
                    reason: format!(
                        "{reason} ({} of {files} files were confirmed before it, {} had failed; the others are not confirmed: push again to be sure)",
                        pushed.len(),
                        failed.len()
                    ),
                });
            }
            Err(e) => failed.push(PushFailure {
                file: u.file,
                object: Some(u.object),
                reason: e.to_string(),
            }),
        }
    }
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    Ok(PushSummary {
        pushed,
        failed,
        bytes,
        elapsed: started.elapsed(),
    })
}

/// Hashes the file, then uploads it with up to 3 attempts.
async fn push_one(client: &AdminClient, u: &Upload) -> Result<PushReceipt, ClientError> {
    let file = u.file.clone();
    let sha = tokio::task::spawn_blocking(move || hash_file(&file))
        .await
        .map_err(|e| ClientError::Io {
            path: u.file.clone(),
            source: std::io::Error::other(e),
        })??;
    with_retry(RETRY, || client.upload(&u.file, &u.object, &sha)).await
}

/// SHA-256 of a file, read in chunks (never whole into memory).
pub(super) fn hash_file(path: &Path) -> Result<[u8; 32], ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = ContentHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// `/`-terminated prefix starting with `/`, whose paths the server will accept.
fn normalise_prefix(p: &str) -> Result<String, ClientError> {
    let p = p.trim();
    let mut s = if p.is_empty() { "/" } else { p }.to_string();
    if !s.starts_with('/') {
        return Err(ClientError::Usage(format!(
            "the prefix must start with '/', got {p:?}"
        )));
    }
    if !s.ends_with('/') {
        s.push('/');
    }
    if s != "/" {
        object_path(&encode_object_path(&format!("{s}x")))
            .map_err(|e| ClientError::Usage(format!("invalid prefix {p:?}: {e}")))?;
    }
    Ok(s)
}

/// Walks the inputs into uploads (sorted by path within each input) and per-file failures.
fn collect(
    paths: &[PathBuf],
    prefix: &str,
) -> Result<(Vec<Upload>, Vec<PushFailure>), ClientError> {
    let mut uploads = Vec::new();
    let mut failed = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut add = |file: PathBuf, object: String, size: u64| {
        if let Err(e) = object_path(&encode_object_path(&object)) {
            failed.push(PushFailure {
                file,
                object: Some(object),
                reason: e.to_string(),
            });
        } else if let Some(first) = seen.get(&object) {
            failed.push(PushFailure {
                reason: format!("{object} is already pushed from {}", first.display()),
                file,
                object: Some(object),
            });
        } else {
            seen.insert(object.clone(), file.clone());
            uploads.push(Upload { file, object, size });
        }
    };
    let mut walk_failures = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| ClientError::Io {
            path: p.clone(),
            source,
        })?;
        if meta.is_file() {
            match p.file_name().and_then(|n| n.to_str()) {
                Some(name) => add(p.clone(), format!("{prefix}{name}"), meta.len()),
                None => walk_failures.push(not_utf8(p)),
            }
            continue;
        }
        if !meta.is_dir() {
            walk_failures.push(PushFailure {
                file: p.clone(),
                object: None,
                reason: "not a regular file or directory".into(),
            });
            continue;
        }
        for entry in WalkDir::new(p).follow_links(true).sort_by_file_name() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    walk_failures.push(PushFailure {
                        file: e.path().unwrap_or(p).to_path_buf(),
                        object: None,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            if !entry.file_type().is_file() {
                continue;
            }
            let Some(rel) = relative_object(p, entry.path()) else {
                walk_failures.push(not_utf8(entry.path()));
                continue;
            };
            match entry.metadata() {
                Ok(m) => add(
                    entry.path().to_path_buf(),
                    format!("{prefix}{rel}"),
                    m.len(),
                ),
                Err(e) => walk_failures.push(PushFailure {
                    file: entry.path().to_path_buf(),
                    object: None,
                    reason: e.to_string(),
                }),
            }
        }
    }
    failed.extend(walk_failures);
    Ok((uploads, failed))
}

/// `a/b/c.css` for `<root>/a/b/c.css`; `None` when a component is not UTF-8.
fn relative_object(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).ok()?;
    let mut segs = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(s) => segs.push(s.to_str()?),
            _ => return None,
        }
    }
    Some(segs.join("/"))
}

fn not_utf8(p: &Path) -> PushFailure {
    PushFailure {
        file: p.to_path_buf(),
        object: None,
        reason: "the file name is not valid UTF-8, so it cannot be an object path".into(),
    }
}

fn progress_bar(total: u64, files: usize) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {elapsed_precise} [{wide_bar}] {binary_bytes}/{binary_total_bytes} acknowledged, {msg}, {binary_bytes_per_sec}, ETA {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(format!("0/{files} files"));
    pb
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256;

    #[test]
    fn prefixes_are_normalised() {
        assert_eq!(normalise_prefix("").unwrap(), "/");
        assert_eq!(normalise_prefix("/").unwrap(), "/");
        assert_eq!(normalise_prefix("/static").unwrap(), "/static/");
        assert!(normalise_prefix("static").unwrap_err().is_usage());
        assert!(normalise_prefix("/a/../b").is_err());
        assert!(normalise_prefix("//").is_err());
    }

    #[test]
    fn walking_maps_files_to_object_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("site");
        std::fs::create_dir_all(root.join("css/deep")).unwrap();
        std::fs::write(root.join("index.html"), "<h1>hi</h1>").unwrap();
        std::fs::write(root.join("css/a b.css"), "a{}").unwrap();
        std::fs::write(root.join("css/deep/x.js"), "1").unwrap();
        std::fs::write(dir.path().join("extra.txt"), "e").unwrap();
        std::fs::write(dir.path().join("index.html"), "dup").unwrap();
        let (ups, failed) = collect(
            &[
                root.clone(),
                dir.path().join("extra.txt"),
                dir.path().join("index.html"),
            ],
            "/v1/",
        )
        .unwrap();
        let objects: Vec<_> = ups.iter().map(|u| u.object.as_str()).collect();
        assert_eq!(
            objects,
            [
                "/v1/css/a b.css",
                "/v1/css/deep/x.js",
                "/v1/index.html",
                "/v1/extra.txt"
            ]
        );
        assert_eq!(ups[2].size, 11);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].reason.contains("already pushed"));
        let missing = collect(&[dir.path().join("nope")], "/").unwrap_err();
        assert!(matches!(missing, ClientError::Io { .. }));
    }

    #[test]
    fn files_hash_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big.bin");
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&f, &data).unwrap();
        assert_eq!(hash_file(&f).unwrap(), sha256(&data));
    }

    #[tokio::test]
    async fn nothing_to_push_is_a_usage_error() {
        let e = run_push(PushArgs {
            admin: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(e.is_usage());
    }
}
