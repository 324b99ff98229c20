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
        for (i, t) in Tier::ALL.iter().enumerate() {
            assert_eq!(t.index(), i);
            assert_eq!(Tier::LABELS[i], t.as_str());
        }
    }
}
