//! The one vocabulary of cache outcomes: [`CacheStatus`] and [`Tier`] name every outcome, and
//! their words, labels and indices here feed `Cache-Status`, `X-Cache`, logs and metrics, so
//! all of them always agree. Nothing else spells an outcome.

/// What the cache did for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    /// Served from a fresh stored response.
    Hit,
    /// Not in cache (or not usable); fetched from upstream.
    Miss,
    /// Served a stale stored response (stale-while-revalidate, stale-if-error, max-stale).
    Stale,
    /// A stale stored response was validated upstream (304) and served.
    Revalidated,
    /// The request bypassed the cache.
    Pass(PassReason),
    /// The request could not be answered (upstream failure, only-if-cached miss).
    Error,
}

/// Why a request or response bypassed the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PassReason {
    /// The method is not cacheable (POST, PUT, ...).
    Method,
    /// The response is not storable (no-store, private, Set-Cookie, Vary: *, status, ...).
    Uncacheable,
    /// The request asked not to store (`Cache-Control: no-store`).
    RequestNoStore,
    /// The object is larger than `max_object_size`.
    TooLarge,
    /// A coalesced fill produced a response that may not be shared with this client.
    NotShareable,
}

impl CacheStatus {
    /// Every kind of outcome, in index order (one `Pass` stands for every reason).
    pub const KINDS: [CacheStatus; 6] = [
        CacheStatus::Hit,
        CacheStatus::Miss,
        CacheStatus::Stale,
        CacheStatus::Revalidated,
        CacheStatus::Pass(PassReason::Method),
        CacheStatus::Error,
    ];

    /// The metric labels of [`CacheStatus::KINDS`], in the same order.
    pub const LABELS: [&'static str; 6] = {
        let mut out = [""; 6];
        let mut i = 0;
        while i < 6 {
            out[i] = Self::KINDS[i].label();
            i += 1;
        }
        out
    };

    /// This outcome's position in [`CacheStatus::KINDS`] (metric arrays).
    pub const fn index(self) -> usize {
        match self {
            CacheStatus::Hit => 0,
            CacheStatus::Miss => 1,
            CacheStatus::Stale => 2,
            CacheStatus::Revalidated => 3,
            CacheStatus::Pass(_) => 4,
            CacheStatus::Error => 5,
        }
    }

    /// The short word used by `X-Cache` and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Pass(_) => "PASS",
            CacheStatus::Error => "ERROR",
        }
    }

    /// Lower-case label for metrics (`cache="hit"`).
    pub const fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Pass(_) => "pass",
            CacheStatus::Error => "error",
        }
    }
}

impl PassReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            PassReason::Method => "method",
            PassReason::Uncacheable => "uncacheable",
            PassReason::RequestNoStore => "request-no-store",
            PassReason::TooLarge => "too-large",
            PassReason::NotShareable => "not-shareable",
        }
    }
}

/// What became of a storable response on its way to the disk tier. Every storable response
/// of an engine with a disk tier ends in exactly one of these (`outpost_disk_admissions`), so
/// none is dropped silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskAdmission {
    /// Committed: visible on disk.
    Stored,
    /// The writer fell behind the client (its queue, or all queues together, full).
    QueueFull,
    /// A body of unannounced length passed `max_object_size` while it streamed.
    TooLarge,
    /// The disk refused a write or a commit.
    Error,
    /// The body never completed (the upstream failed, its length was wrong, or every reader
    /// left an object nobody stores).
    Incomplete,
    /// A purge replaced the fill: the copy fetched after the purge is the one kept.
    Superseded,
    /// The tier is full and this was the key's first miss lately: not written, so that an
    /// object asked once evicts nothing (see the disk tier's `admission` module). Its next
    /// miss is written.
    Rejected,
}

impl DiskAdmission {
    /// Every outcome, in index order.
    pub const ALL: [DiskAdmission; 7] = [
        DiskAdmission::Stored,
        DiskAdmission::QueueFull,
        DiskAdmission::TooLarge,
        DiskAdmission::Error,
        DiskAdmission::Incomplete,
        DiskAdmission::Superseded,
        DiskAdmission::Rejected,
    ];

    /// The metric labels of [`DiskAdmission::ALL`], in the same order.
    pub const LABELS: [&'static str; 7] = [
        "stored",
        "queue_full",
        "too_large",
        "error",
        "incomplete",
        "superseded",
        "rejected",
    ];

    pub const fn index(self) -> usize {
        match self {
            DiskAdmission::Stored => 0,
            DiskAdmission::QueueFull => 1,
            DiskAdmission::TooLarge => 2,
            DiskAdmission::Error => 3,
            DiskAdmission::Incomplete => 4,
            DiskAdmission::Superseded => 5,
            DiskAdmission::Rejected => 6,
        }
    }

    pub const fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }

    fn from_index(i: u8) -> Option<Self> {
        Self::ALL.get(usize::from(i)).copied()
    }
}

/// The outcome a fill decided for its disk copy, shared with the disk writer task, which
/// counts it once the write ends (the fill may no longer be able to reach it: a full queue).
#[derive(Debug, Default)]
pub struct DiskVerdict(std::sync::atomic::AtomicU8);

impl DiskVerdict {
    const UNSET: u8 = u8::MAX;

    pub fn new() -> Self {
        Self(std::sync::atomic::AtomicU8::new(Self::UNSET))
    }

    /// The fill gives up the disk copy for `why` (the first reason given stands).
    pub fn abandon(&self, why: DiskAdmission) {
        let _ = self.0.compare_exchange(
            Self::UNSET,
            why.index() as u8,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
    }

    /// Why the fill gave up, if it did.
    pub fn reason(&self) -> Option<DiskAdmission> {
        DiskAdmission::from_index(self.0.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// Which tier answered a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Memory,
    Disk,
    None,
}

impl Tier {
    /// Every tier, in index order.
    pub const ALL: [Tier; 3] = [Tier::Memory, Tier::Disk, Tier::None];

    /// The metric labels of [`Tier::ALL`], in the same order.
    pub const LABELS: [&'static str; 3] = [
        Tier::ALL[0].as_str(),
        Tier::ALL[1].as_str(),
        Tier::ALL[2].as_str(),
    ];

    /// This tier's position in [`Tier::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Tier::Memory => 0,
            Tier::Disk => 1,
            Tier::None => 2,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::None => "none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_labels_and_indices_agree() {
        for (i, k) in CacheStatus::KINDS.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(CacheStatus::LABELS[i], k.label());
            assert_eq!(k.label(), k.as_str().to_ascii_lowercase());
        }
        for (i, a) in DiskAdmission::ALL.iter().enumerate() {
            assert_eq!(a.index(), i);
            assert_eq!(DiskAdmission::from_index(i as u8), Some(*a));
        }
        let v = DiskVerdict::new();
        assert_eq!(v.reason(), None);
        v.abandon(DiskAdmission::QueueFull);
        v.abandon(DiskAdmission::Superseded);
        assert_eq!(
            v.reason(),
            Some(DiskAdmission::QueueFull),
            "the first reason stands"
        );
        for (i, t) in Tier::ALL.iter().enumerate() {
            assert_eq!(t.index(), i);
            assert_eq!(Tier::LABELS[i], t.as_str());
        }
    }
}
