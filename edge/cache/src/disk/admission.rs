//! Admission to a full disk tier: the doorkeeper.
//!
//! Once the tier is full, every object written makes another go, and most objects a CDN is
//! asked for are asked once (the long tail). The index (quick_cache, a CLOCK-Pro policy) lets
//! a new entry that is not asked again go first, so a full tier under such requests wrote
//! each object, then deleted it soon after: two index writes and a content file's life for
//! nothing, and every one a write the disk wears for. At 1.1M objects in
//! `benches/disk_miss.rs` (every URL new), a miss cost 29% more CPU with the tier full than
//! under its capacity, all of it the index writer's (the new record, then the evicted one's
//! delete).
//!
//! So a full tier writes an object on the key's second miss within the doorkeeper's memory,
//! not its first (nginx's `proxy_cache_min_uses 2`, TinyLFU's doorkeeper), unless a copy of
//! the key is stored already (a refetch of a stale copy is not a first request). A first miss
//! is counted as `rejected` in `outpost_disk_admissions`. While the tier has room, every
//! storable miss is written, as before; `[cache] disk_admission = "always"` turns the
//! doorkeeper off. The memory tier is not concerned: it admits by its own policy.
//!
//! The doorkeeper remembers the keys of recent first misses in a table of fingerprints, one
//! per slot, the slot chosen by the key: a first miss writes its key's fingerprint into its
//! slot, overwriting whichever key was there. A key is remembered until as many other first
//! misses have come as the table has slots, give or take (collisions forget early; two keys
//! taking each other for the other would need 63 equal bits), and the slot is chosen by a hash
//! keyed per process. No lock: one atomic swap per decision. A key whose stored copy is
//! removed (a purge, an invalidation, damage; not an eviction) is remembered too, so a hard
//! purge of a popular object does not cost it a second trip to the origin. Its memory (8 bytes a slot) comes out of the index's share: see
//! [`doorkeeper_bytes`].

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::key::KeyHash;

/// Which storable misses the disk tier writes (`[cache] disk_admission`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Every one while the tier has room; once it is full, those whose key missed before,
    /// lately (`"second_miss_when_full"`, the default; see the module docs).
    #[default]
    SecondMissWhenFull,
    /// Every one (`"always"`): a full tier evicts for each.
    Always,
}

impl Policy {
    /// The setting's value for this policy.
    pub const fn as_str(self) -> &'static str {
        match self {
            Policy::SecondMissWhenFull => "second_miss_when_full",
            Policy::Always => "always",
        }
    }

    /// The policy a setting's value names.
    pub fn parse(value: &str) -> Option<Self> {
        [Policy::SecondMissWhenFull, Policy::Always]
            .into_iter()
            .find(|p| p.as_str() == value)
    }
}

/// Share of the index's memory that goes to the doorkeeper: a 64th (8 bytes a slot, so a slot
/// for every 512 bytes of index: ~0.6 keys remembered per object the index can hold, at ~320
/// bytes an entry).
const DOORKEEPER_SHARE: u64 = 64;

/// The fewest and the most slots.
const MIN_SLOTS: u64 = 1 << 10;
const MAX_SLOTS: u64 = 1 << 20;

/// Slots of the doorkeeper of an index that may use `index_budget` bytes: a power of two.
fn slots(index_budget: u64) -> u64 {
    let want = (index_budget / DOORKEEPER_SHARE / 8).clamp(MIN_SLOTS, MAX_SLOTS);
    // Rounded down to a power of two, so the share is not exceeded (but at the minimum).
    1 << (63 - want.leading_zeros())
}

/// Memory the doorkeeper of an index that may use `index_budget` bytes takes (8 KiB to 8 MiB;
/// an index bounded by its disk only gets the least).
pub fn doorkeeper_bytes(index_budget: u64) -> u64 {
    if index_budget == u64::MAX {
        return MIN_SLOTS * 8;
    }
    slots(index_budget) * 8
}

/// Fingerprints of keys whose first miss a full tier turned away (see the module docs).
pub(super) struct Doorkeeper {
    slots: Box<[AtomicU64]>,
    /// Picks a key's slot: keyed per process, so no one can choose URLs that share a slot
    /// with another URL to make it forgotten (keys are unkeyed blake3 of the URL).
    slot_of: RandomState,
}

impl Doorkeeper {
    pub(super) fn new(index_budget: u64) -> Self {
        let n = doorkeeper_bytes(index_budget) / 8;
        Self {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            slot_of: RandomState::new(),
        }
    }

    /// Whether `key` missed before, lately; if not, it is remembered from now on. Never true
    /// twice in a row for a key it had forgotten.
    pub(super) fn seen_again(&self, key: &KeyHash) -> bool {
        let (slot, print) = self.place(key);
        slot.swap(print, Ordering::Relaxed) == print
    }

    /// Remembers `key` as if it had missed: a key whose copy was removed (purged, say) is not
    /// a first request when it comes back.
    pub(super) fn remember(&self, key: &KeyHash) {
        let (slot, print) = self.place(key);
        slot.store(print, Ordering::Relaxed);
    }

    /// `key`'s slot and fingerprint (never 0, the empty slot's value).
    fn place(&self, key: &KeyHash) -> (&AtomicU64, u64) {
        let mut word = [0u8; 8];
        word.copy_from_slice(&key.0[8..16]);
        let print = u64::from_le_bytes(word) | 1;
        let mask = self.slots.len() as u64 - 1;
        let slot = self.slot_of.hash_one(&key.0[..8]) & mask;
        (&self.slots[slot as usize], print)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> KeyHash {
        KeyHash(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    #[test]
    fn a_key_is_let_in_on_its_second_miss() {
        let d = Doorkeeper::new(1 << 20);
        assert!(!d.seen_again(&key(1)));
        assert!(!d.seen_again(&key(2)));
        assert!(d.seen_again(&key(1)));
        assert!(d.seen_again(&key(2)));
        assert!(d.seen_again(&key(1)), "it stays remembered");
        d.remember(&key(3));
        assert!(d.seen_again(&key(3)), "remembered without a miss");
    }

    #[test]
    fn it_remembers_about_as_many_keys_as_it_has_slots() {
        let d = Doorkeeper::new(64 << 20);
        let n = d.slots.len() as u64;
        assert_eq!(n, 1 << 17);
        // Half as many keys as slots: most are remembered (a key is lost only to a later key
        // in its slot: 1 - e^-0.5 of them at most, ~39%).
        for i in 0..n / 2 {
            assert!(!d.seen_again(&key(i)));
        }
        let remembered = (0..n / 2).filter(|i| d.seen_again(&key(*i))).count() as u64;
        assert!(remembered > n / 2 * 55 / 100, "{remembered} of {}", n / 2);
        // Four times as many later first misses: nearly all of them are forgotten.
        for i in n..5 * n {
            d.seen_again(&key(i));
        }
        let remembered = (0..n / 2).filter(|i| d.seen_again(&key(*i))).count() as u64;
        assert!(remembered < n / 2 / 20, "{remembered} of {}", n / 2);
    }

    #[test]
    fn its_memory_is_a_share_of_the_index() {
        assert_eq!(doorkeeper_bytes(64 << 20), 1 << 20);
        assert_eq!(doorkeeper_bytes(1 << 20), 16 << 10);
        assert_eq!(doorkeeper_bytes(100 << 30), MAX_SLOTS * 8);
        assert_eq!(doorkeeper_bytes(u64::MAX), MIN_SLOTS * 8);
        // Rounded down to a power of two.
        assert_eq!(doorkeeper_bytes(96 << 20), 1 << 20);
    }
}
