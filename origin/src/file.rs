//! Mapping a sanitised request path to an open regular file inside the site root.
//!
//! The root is canonicalised once at config load. Each request path is joined onto it and
//! canonicalised again, which resolves every symlink at every component; the result must still
//! start with the root, otherwise the file is refused with 403 (a symlink pointing outside the site
//! is never followed). Symlinks that stay inside the root are followed.
//!
//! A directory maps to its `index.html`, served directly (no redirect to the slash form, unlike
//! nginx: relative links inside such a page resolve against the parent, so the sample site uses
//! absolute links). A directory without `index.html` is 404; there are no listings. Anything that
//! is not a regular file (FIFO, socket, device) is 404 and never opened, since opening a FIFO
//! would block.
//!
//! Residual race, accepted: between the canonicalisation and the `open`, someone with write access
//! to the site could swap a directory for a symlink. Closing it needs `openat2(RESOLVE_BENEATH)`,
//! which std does not expose; anyone able to do that can already change what the site serves.

use std::fs::Metadata;
use std::path::{Path, PathBuf};

use tokio::fs::File;

use crate::error::OriginError;
use crate::path::RequestPath;

/// The index file served for a directory.
pub const INDEX: &str = "index.html";

/// A regular file opened for reading.
#[derive(Debug)]
pub struct OpenFile {
    pub file: File,
    /// Metadata of the opened file itself (`fstat`), so size and mtime match what is read.
    pub meta: Metadata,
    /// The decoded URI path of the served file (`/docs/index.html` for `/docs/`); rules and the
    /// Content-Type are derived from it, not from a symlink target's name.
    pub logical: String,
}

/// Resolves `path` under `root` (which must be canonical) and opens the file.
///
/// The whole resolution (canonicalise, stat, open, fstat) is blocking file-system work, so it runs
/// as one job on tokio's blocking pool instead of one pool round trip per system call.
pub async fn open(root: &Path, path: &RequestPath) -> Result<OpenFile, OriginError> {
    let (root, path) = (root.to_path_buf(), path.clone());
    let (file, meta, logical) = tokio::task::spawn_blocking(move || open_blocking(&root, &path))
        .await
        .map_err(|e| OriginError::Io(std::io::Error::other(e)))??;
    Ok(OpenFile {
        file: File::from_std(file),
        meta,
        logical,
    })
}

fn open_blocking(
    root: &Path,
    path: &RequestPath,
) -> Result<(std::fs::File, Metadata, String), OriginError> {
    let mut logical = path.logical();
    let mut target = contained(root, &root.join(path.relative()))?;
    let mut meta = std::fs::metadata(&target).map_err(OriginError::from_fs)?;
    if meta.is_dir() {
        target = contained(root, &target.join(INDEX))?;
        meta = std::fs::metadata(&target).map_err(OriginError::from_fs)?;
        if !logical.ends_with('/') {
            logical.push('/');
        }
        logical.push_str(INDEX);
    } else if path.trailing_slash() {
        // `/about.html/` names a directory that does not exist.
        return Err(OriginError::NotFound);
    }
    if !meta.is_file() {
        return Err(OriginError::NotFound);
    }
    let file = std::fs::File::open(&target).map_err(OriginError::from_fs)?;
    // Size and mtime of what was opened, even if the path changed since the stat above.
    let meta = file.metadata().map_err(OriginError::from_fs)?;
    if !meta.is_file() {
        return Err(OriginError::NotFound);
    }
    Ok((file, meta, logical))
}

/// Canonicalises `path` and checks that it is inside `root`.
fn contained(root: &Path, path: &Path) -> Result<PathBuf, OriginError> {
    let canonical = std::fs::canonicalize(path).map_err(OriginError::from_fs)?;
    if canonical.starts_with(root) {
        Ok(canonical)
    } else {
        Err(OriginError::OutsideRoot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open_str(root: &Path, p: &str) -> Result<OpenFile, OriginError> {
        open(root, &RequestPath::parse(p).unwrap()).await
    }

    #[tokio::test]
    async fn maps_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("index.html"), "home").unwrap();
        std::fs::write(root.join("a.txt"), "a").unwrap();
        std::fs::create_dir(root.join("docs")).unwrap();
        std::fs::write(root.join("docs/index.html"), "docs").unwrap();
        std::fs::create_dir(root.join("empty")).unwrap();

        assert_eq!(open_str(&root, "/").await.unwrap().logical, "/index.html");
        assert_eq!(open_str(&root, "/a.txt").await.unwrap().meta.len(), 1);
        assert_eq!(
            open_str(&root, "/docs").await.unwrap().logical,
            "/docs/index.html"
        );
        assert_eq!(
            open_str(&root, "/docs/").await.unwrap().logical,
            "/docs/index.html"
        );
        assert!(matches!(
            open_str(&root, "/empty/").await,
            Err(OriginError::NotFound)
        ));
        assert!(matches!(
            open_str(&root, "/missing").await,
            Err(OriginError::NotFound)
        ));
        assert!(matches!(
            open_str(&root, "/a.txt/").await,
            Err(OriginError::NotFound)
        ));
        assert!(matches!(
            open_str(&root, "/a.txt/b").await,
            Err(OriginError::NotFound)
        ));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinks_outside_the_root_are_refused() {
        use std::os::unix::fs::symlink;
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("real.txt"), "ok").unwrap();
        symlink(outside.path().join("secret"), root.join("leak")).unwrap();
        symlink(outside.path(), root.join("outdir")).unwrap();
        symlink(root.join("real.txt"), root.join("inside")).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        symlink(outside.path().join("secret"), root.join("sub/index.html")).unwrap();

        assert!(matches!(
            open_str(&root, "/leak").await,
            Err(OriginError::OutsideRoot)
        ));
        assert!(matches!(
            open_str(&root, "/outdir/secret").await,
            Err(OriginError::OutsideRoot)
        ));
        assert!(matches!(
            open_str(&root, "/sub/").await,
            Err(OriginError::OutsideRoot)
        ));
        let inside = open_str(&root, "/inside").await.unwrap();
        assert_eq!(inside.meta.len(), 2);
        assert_eq!(inside.logical, "/inside");
    }
}
