//! Test data and what is on disk.

use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Deterministic, incompressible-looking bytes (distinct per seed).
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Every regular file under `dir`, recursively (none if `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

/// The bytes of every file under `dir`.
pub fn bytes_under(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Writes `data` to `path`, creating its directories.
pub fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("a parent directory")).expect("create dirs");
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Writes `data` over the file at `path`, the same inode (cacache's files are read-only).
pub fn rewrite_in_place(path: &Path, data: &[u8]) {
    let mut perms = std::fs::metadata(path).expect("stat").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).expect("make writable");
    std::fs::write(path, data).unwrap_or_else(|e| panic!("rewrite {}: {e}", path.display()));
}

/// [`pattern`] as a `Vec`.
pub fn pattern_vec(len: usize, seed: u64) -> Vec<u8> {
    pattern(len, seed).to_vec()
}
