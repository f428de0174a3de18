//! Rate-limited warnings: a problem that repeats on every report or request (an unknown
//! `collector_cluster`, a collector refusing the reports, mismatched correlation
//! stores) is logged the first time, then at most once per [`INTERVAL_MS`] with how
//! often it happened since the last line: never one line per request, never silence.

/// Minimum time between two lines of one warning.
pub const INTERVAL_MS: u64 = 60_000;

/// One warning's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Warning {
    /// When it was last logged (None: never).
    last_ms: Option<u64>,
    /// Occurrences not logged yet.
    pending: u64,
}

impl Warning {
    /// Notes `n` occurrences at `now_ms`; returns the count to log now, if a line is due.
    pub fn note(&mut self, n: u64, now_ms: u64) -> Option<u64> {
        self.add(n);
        self.due(now_ms)
    }

    /// Notes `n` occurrences without asking whether a line is due (call [`Warning::due`]).
    pub fn add(&mut self, n: u64) {
        self.pending = self.pending.saturating_add(n);
    }

    /// The count to log now, if occurrences are pending and the first line or
    /// [`INTERVAL_MS`] since the last one is due (called on the tick too, so the count
    /// of a burst is told even when nothing happens afterwards).
    pub fn due(&mut self, now_ms: u64) -> Option<u64> {
        if self.pending == 0 {
            return None;
        }
        let due = match self.last_ms {
            None => true,
            Some(t) => now_ms.saturating_sub(t) >= INTERVAL_MS,
        };
        if !due {
            return None;
        }
        self.last_ms = Some(now_ms);
        Some(std::mem::take(&mut self.pending))
    }

    /// Occurrences not logged yet.
    pub fn pending(&self) -> u64 {
        self.pending
    }
}
