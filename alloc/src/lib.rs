//! The process allocator: mimalloc, told to give freed memory back to the kernel at once.
//!
//! mimalloc keeps the pages it frees for a while (its purge delay, 1 s in v3) and purges them
//! only when the owning thread next allocates. An edge churning large objects through its
//! memory tier frees them on whatever thread evicts them, so freed pages piled up above
//! `--memory`: `benches/memory.rs` measured the memory-only case at 139 MiB for a bound of
//! 128 MiB, and 125 MiB with a purge delay of 0 (the disk case: 168 → 134 MiB). A delay of 0
//! makes the `free` that empties a page hand it back itself.
//!
//! Transparent huge pages are off for the process. mimalloc asks the kernel for huge pages on
//! its arenas (`madvise(MADV_HUGEPAGE)`, honoured under the common `madvise` THP setting and
//! under `always`), and a 2 MiB huge page goes back to the kernel only when all of it is free.
//! A cache frees its bodies in eviction order, scattered over the arena, so nearly every huge
//! page kept a live block: the same bench peaked at 126-133 MiB (bound 128.25 MiB), and at
//! 97-100 MiB with huge pages off. The hit path costs the same either way
//! (`benches/hit_path.rs`). The arena mimalloc maps before `main` is covered too, because the
//! kernel checks the process's flag at each page fault.
//!
//! This crate is the workspace's one place for `unsafe`: [`tune`] sets one integer in
//! mimalloc's option table, and [`Counted`] forwards to mimalloc while it counts. The workspace
//! lints forbid `unsafe` everywhere else.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicI64, Ordering};

pub use mimalloc::MiMalloc;

/// mimalloc, counting the bytes it has handed out and not got back ([`counted_bytes`]): the
/// allocator of tests that bound what a component keeps in memory. Counts what was asked for,
/// not the allocator's rounding or its own bookkeeping.
pub struct Counted;

static COUNTED: AtomicI64 = AtomicI64::new(0);

/// Bytes allocated through [`Counted`] and not freed yet.
pub fn counted_bytes() -> i64 {
    COUNTED.load(Ordering::Relaxed)
}

fn size_of(layout: &Layout) -> i64 {
    i64::try_from(layout.size()).unwrap_or(i64::MAX)
}

#[allow(unsafe_code)]
// SAFETY: every method forwards its arguments unchanged to mimalloc's and returns its result;
// the count is a relaxed atomic add on the side, made only when the call succeeded.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller's contract.
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            COUNTED.fetch_add(size_of(&layout), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller's contract.
        let p = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            COUNTED.fetch_add(size_of(&layout), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        COUNTED.fetch_sub(size_of(&layout), Ordering::Relaxed);
        // SAFETY: as the caller's contract.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as the caller's contract.
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        // On failure the old block stays, and so does its count.
        if !p.is_null() {
            let grown = i64::try_from(new_size).unwrap_or(i64::MAX) - size_of(&layout);
            COUNTED.fetch_add(grown, Ordering::Relaxed);
        }
        p
    }
}

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, v3: the 16th option, index 15).
/// libmimalloc-sys does not export it; the test below checks the index against its default.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The environment variable that sets the purge delay; an operator's value wins over [`tune`].
pub const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// The environment variable that allows transparent huge pages (mimalloc's own): when an
/// operator sets it, [`tune`] leaves huge pages as mimalloc set them up.
pub const ALLOW_THP_ENV: &str = "MIMALLOC_ALLOW_THP";

/// Makes freed memory go back to the kernel when its page empties, unless the operator set
/// `MIMALLOC_PURGE_DELAY` (mimalloc read it at start-up), and turns transparent huge pages off
/// for the process unless the operator set `MIMALLOC_ALLOW_THP`. Call once, early in `main`.
pub fn tune() {
    if std::env::var_os(PURGE_DELAY_ENV).is_none() {
        set_purge_delay(0);
    }
    if std::env::var_os(ALLOW_THP_ENV).is_none() {
        // Best effort: a kernel without THP (or without this prctl) has no huge pages to keep.
        #[cfg(target_os = "linux")]
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
}

/// Whether transparent huge pages are off for this process.
pub fn huge_pages_disabled() -> bool {
    #[cfg(target_os = "linux")]
    return rustix::thread::transparent_huge_pages_are_disabled().unwrap_or(false);
    #[cfg(not(target_os = "linux"))]
    false
}

/// The purge delay in effect, in milliseconds.
pub fn purge_delay() -> i64 {
    #[allow(unsafe_code)]
    // SAFETY: reads one integer of mimalloc's option table; callable from any thread, any time.
    let v = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
    #[allow(clippy::useless_conversion)] // c_long is i32 on some targets
    i64::from(v)
}

fn set_purge_delay(ms: i64) {
    #[allow(unsafe_code)]
    // SAFETY: stores one integer in mimalloc's option table (a relaxed atomic store in
    // options.c); callable from any thread, any time, and read by mimalloc at each purge.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, ms as _)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static GLOBAL: MiMalloc = MiMalloc;

    #[test]
    fn tune_sets_the_purge_delay_option() {
        if std::env::var_os(PURGE_DELAY_ENV).is_some() {
            tune();
            assert_eq!(
                purge_delay().to_string(),
                std::env::var(PURGE_DELAY_ENV).unwrap(),
                "an operator's MIMALLOC_PURGE_DELAY wins"
            );
            return;
        }
        // v3's default purge delay is 1000 ms, and no neighbouring option has that default:
        // this is the check that index 15 is `mi_option_purge_delay`.
        assert_eq!(purge_delay(), 1000);
        tune();
        assert_eq!(purge_delay(), 0);
        assert_eq!(
            huge_pages_disabled(),
            std::env::var_os(ALLOW_THP_ENV).is_none(),
            "huge pages are off unless the operator allowed them"
        );
        let v: Vec<u8> = vec![7; 10 << 20];
        drop(v);
    }
}
