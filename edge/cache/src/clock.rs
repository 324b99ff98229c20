//! Time is an input: freshness code asks a [`Clock`] for `now`, so tests can jump hours ahead
//! without sleeping (`tokio::time::pause` does not move `SystemTime`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Source of wall-clock time for caching decisions.
#[derive(Clone, Default)]
pub struct Clock {
    offset: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The real system clock.
    pub fn system() -> Self {
        Self { offset: None }
    }

    /// A clock that runs with the system clock plus an offset that tests can advance.
    pub fn manual() -> Self {
        Self {
            offset: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    pub fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        match &self.offset {
            Some(off) => now + Duration::from_millis(off.load(Ordering::Relaxed)),
            None => now,
        }
    }

    /// Moves a manual clock forward. Does nothing on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(off) = &self.offset {
            off.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.offset {
            Some(o) => write!(f, "Clock(manual +{}ms)", o.load(Ordering::Relaxed)),
            None => f.write_str("Clock(system)"),
        }
    }
}

/// Milliseconds since the Unix epoch (what metadata stores).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}
