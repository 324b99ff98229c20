//! Rate-limited warnings for accept failures.

use std::time::{Duration, Instant};

use tracing::warn;

/// Warnings for accept failures (EMFILE and friends), written at most once per interval with
/// the number of failures each one stands for. At the descriptor limit `accept` fails on every
/// try; one line per try would flood the log.
pub struct AcceptWarnings {
    listener: &'static str,
    every: Duration,
    last: Option<Instant>,
    /// Failures since the last warning written.
    folded: u64,
}

impl AcceptWarnings {
    /// Warnings for the listener named `listener` (a log field), at most one per 10 s.
    pub fn new(listener: &'static str) -> Self {
        Self::every(listener, Duration::from_secs(10))
    }

    fn every(listener: &'static str, every: Duration) -> Self {
        Self {
            listener,
            every,
            last: None,
            folded: 0,
        }
    }

    /// Records one failure; true when a warning was written for it (not folded into the next).
    pub fn failed(&mut self, e: &std::io::Error) -> bool {
        self.folded += 1;
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            return false;
        }
        warn!(
            listener = self.listener,
            error = %e,
            failures = self.folded,
            "accept failed; raise the open-files limit (ulimit -n) if this repeats"
        );
        self.last = Some(Instant::now());
        self.folded = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_are_written_once_per_interval() {
        let mut w = AcceptWarnings::new("test");
        let e = std::io::Error::from_raw_os_error(24); // EMFILE
        let written = (0..500).filter(|_| w.failed(&e)).count();
        assert_eq!(written, 1, "500 failures in a burst, one warning");
        assert_eq!(w.folded, 499);
    }

    #[test]
    fn accept_failures_are_warned_once_per_interval() {
        let e = std::io::Error::from_raw_os_error(24); // EMFILE
        let mut w = AcceptWarnings::new("test");
        assert_eq!((0..1000).filter(|_| w.failed(&e)).count(), 1);
        assert_eq!(w.folded, 999);
        // Past the interval the next one is written, with the count it stands for.
        let mut w = AcceptWarnings::every("test", Duration::from_millis(1));
        assert!(w.failed(&e));
        w.failed(&e);
        std::thread::sleep(Duration::from_millis(5));
        assert!(w.failed(&e));
        assert_eq!(w.folded, 0);
    }
}
