//! `hopwatch watch`'s printing policy: the current findings first, then each new finding
//! at once and each changed one at most once per interval (a finding that keeps occurring
//! under load is printed again when the interval has passed, with its latest count, not
//! once per occurrence). Pure: the CLI feeds it what the collector sends and a clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hopwatch_proto::v1::Break;

#[derive(Debug)]
struct Seen {
    /// When it was last printed.
    printed_at: Instant,
    /// What was printed then (count, severity, flags): a repeat of it is not a change.
    printed: (u64, i32, Vec<String>),
    /// A newer state waiting for the interval to pass.
    pending: Option<Break>,
}

/// Whether a line is a first sighting or an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    New,
    Changed,
}

/// Rate-limits what `watch` prints, per finding id.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    seen: HashMap<String, Seen>,
}

fn state(b: &Break) -> (u64, i32, Vec<String>) {
    (b.count, b.severity, b.flags.clone())
}

impl Throttle {
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            seen: HashMap::new(),
        }
    }

    /// A finding from the collector (listed or streamed). Returns it when it is to be
    /// printed now; otherwise it is kept for [`Throttle::due`].
    pub fn offer(&mut self, b: Break, now: Instant) -> Option<(Event, Break)> {
        match self.seen.get_mut(&b.id) {
            None => {
                self.seen.insert(
                    b.id.clone(),
                    Seen {
                        printed_at: now,
                        printed: state(&b),
                        pending: None,
                    },
                );
                Some((Event::New, b))
            }
            Some(s) if s.printed == state(&b) => {
                s.pending = None;
                None
            }
            Some(s) if now.duration_since(s.printed_at) >= self.interval => {
                s.printed_at = now;
                s.printed = state(&b);
                s.pending = None;
                Some((Event::Changed, b))
            }
            Some(s) => {
                s.pending = Some(b);
                None
            }
        }
    }

    /// Held-back updates whose interval has passed (to print now).
    pub fn due(&mut self, now: Instant) -> Vec<Break> {
        let mut out = Vec::new();
        for s in self.seen.values_mut() {
            if s.pending.is_some() && now.duration_since(s.printed_at) >= self.interval {
                if let Some(b) = s.pending.take() {
                    s.printed_at = now;
                    s.printed = state(&b);
                    out.push(b);
                }
            }
        }
        out.sort_by_key(|b| b.last_seen_unix_ms);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, count: u64) -> Break {
        Break {
            id: id.into(),
            count,
            ..Default::default()
        }
    }

    #[test]
    fn new_at_once_changes_at_most_once_per_interval() {
        let t0 = Instant::now();
        let iv = Duration::from_secs(10);
        let mut t = Throttle::new(iv);
        assert_eq!(t.offer(b("a", 1), t0).map(|x| x.0), Some(Event::New));
        assert_eq!(t.offer(b("b", 1), t0).map(|x| x.0), Some(Event::New));
        // A flood of occurrences within the interval: nothing printed...
        for n in 2..50 {
            assert!(t.offer(b("a", n), t0 + Duration::from_secs(1)).is_none());
        }
        assert!(t.due(t0 + Duration::from_secs(5)).is_empty());
        // ...then the latest state, once.
        let due = t.due(t0 + iv);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 49);
        assert!(t.due(t0 + iv * 2).is_empty());
        // The same state again (a relisting after a reconnect) is no change.
        assert!(t.offer(b("a", 49), t0 + iv * 3).is_none());
        assert!(t.due(t0 + iv * 4).is_empty());
        // A change after the interval prints at once.
        assert_eq!(
            t.offer(b("a", 50), t0 + iv * 5).map(|x| x.0),
            Some(Event::Changed)
        );
    }
}
