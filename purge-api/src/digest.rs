//! SHA-256 helpers shared by the handlers, backends and the client: incremental hashing, hex
//! for the `Content-SHA256` header, and the strong ETag of pushed objects.

use sha2::{Digest, Sha256};

/// The request header carrying the hex SHA-256 of a pushed body.
pub const CONTENT_SHA256: &str = "content-sha256";

/// Incremental SHA-256 of a body that arrives in chunks.
#[derive(Debug, Clone, Default)]
pub struct ContentHasher {
    inner: Sha256,
    len: u64,
}

impl ContentHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.inner.update(chunk);
        self.len += chunk.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> [u8; 32] {
        self.inner.finalize().into()
    }
}

/// The SHA-256 of `data` in one go.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Lowercase hex of a digest.
pub fn to_hex(digest: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parses 64 hex digits (either case) into a digest.
pub fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The strong ETag of a pushed object: its SHA-256 in hex, quoted (RFC 9110 §8.8.3).
pub fn strong_etag(digest: &[u8; 32]) -> String {
    format!("\"{}\"", to_hex(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_etag() {
        let d = sha256(b"abc");
        let hex = to_hex(&d);
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_hex(&hex.to_uppercase()), Some(d));
        assert_eq!(parse_hex(&hex[1..]), None);
        assert_eq!(parse_hex(&format!("{}zz", &hex[2..])), None);
        assert_eq!(strong_etag(&d), format!("\"{hex}\""));
    }

    #[test]
    fn incremental_equals_one_shot() {
        let mut h = ContentHasher::new();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.len(), 3);
        assert_eq!(h.finish(), sha256(b"abc"));
    }
}
