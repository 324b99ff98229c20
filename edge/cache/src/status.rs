//! The one enum that names every cache outcome; it feeds `Cache-Status`, `X-Cache`, logs and
//! metrics so the three always agree.

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
    /// The short word used by `X-Cache`, logs and metric labels.
    pub fn as_str(self) -> &'static str {
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
    pub fn label(self) -> &'static str {
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
    pub fn as_str(self) -> &'static str {
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
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::None => "none",
        }
    }
}
