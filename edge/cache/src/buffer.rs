//! Bodies the memory tier keeps: one compact allocation each, never a slice of something
//! larger, and large ones in an anonymous mapping of their own.
//!
//! A large body (a 5 MB image, say) lives in the memory tier until it is evicted, usually on
//! another thread than the one that filled it. From the allocator, a block of that size freed
//! on another thread stays resident for a while (mimalloc keeps the pages of its thread-local
//! heaps and purges them later), so a churn of large objects held the process well above
//! `--memory`. A body at or above [`OWN_MAPPING`] gets its own `mmap`: it is returned to the
//! kernel by the `munmap` of its last reference, at once, whatever thread drops it.

use bytes::{Bytes, BytesMut};

/// Bodies of this size or more get a mapping of their own. Below it the allocator's memory is
/// faster to serve from (a 100 KiB hit cost ~3 µs more CPU from 4 KiB pages than from the
/// allocator's huge-page-backed arenas, `benches/hit_path.rs`), and small blocks are reused
/// soon enough.
pub const OWN_MAPPING: usize = 1 << 20;

/// One compact copy of the concatenated `parts`.
pub fn compact<'a>(parts: impl IntoIterator<Item = &'a [u8]> + Clone) -> Bytes {
    let len: usize = parts.clone().into_iter().map(<[u8]>::len).sum();
    if len >= OWN_MAPPING
        && let Ok(mut map) = memmap2::MmapMut::map_anon(len)
    {
        let mut at = 0;
        for p in parts.clone() {
            map[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        if let Ok(map) = map.make_read_only() {
            return Bytes::from_owner(map);
        }
    }
    let mut out = BytesMut::with_capacity(len);
    for p in parts {
        out.extend_from_slice(p);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_exact_and_large_ones_are_mapped() {
        let a = vec![1u8; OWN_MAPPING];
        let b = vec![2u8; 10];
        let big = compact([a.as_slice(), b.as_slice()]);
        assert_eq!(big.len(), OWN_MAPPING + 10);
        assert_eq!(&big[OWN_MAPPING - 1..OWN_MAPPING + 1], &[1, 2]);
        // Not a slice of either input.
        let r = big.as_ptr() as usize;
        for src in [&a[..], &b[..]] {
            let s = src.as_ptr() as usize;
            assert!(r + big.len() <= s || s + src.len() <= r);
        }
        let small = compact([b.as_slice()]);
        assert_eq!(&small[..], &b[..]);
    }
}
