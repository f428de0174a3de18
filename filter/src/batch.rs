//! Per-worker report queue and batching policy.
//!
//! Hops queue in the root context of each worker. A batch is taken on the tick, or as
//! soon as `batch_size` hops are queued, provided fewer than `max_in_flight` report
//! calls are outstanding. The queue is bounded: a hop arriving at a full queue is
//! dropped and counted; a batch whose dispatch or call fails is dropped and counted.
//! Drops not yet told to the collector ride on the next batch
//! (`ReportRequest.dropped_since_last_batch`). Calls whose answer never comes are
//! expired after a deadline so the in-flight slots cannot leak.

use std::collections::VecDeque;

use hopwatch_proto::v1::Hop;

/// Outcome of [`Batcher::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued; `flush_now` when a full batch is waiting.
    Queued {
        /// A full batch is ready: flush without waiting for the tick.
        flush_now: bool,
    },
    /// The queue was full: the hop was dropped (and counted).
    Dropped,
}

#[derive(Debug, Clone)]
struct InFlight {
    token: u32,
    hops: usize,
    dropped_reported: u64,
    deadline_ms: u64,
}

/// A batch ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Hops of the batch.
    pub hops: Vec<Hop>,
    /// Drops to report with it.
    pub dropped: u64,
}

/// The bounded queue and the in-flight bookkeeping of one worker.
#[derive(Debug)]
pub struct Batcher {
    queue: VecDeque<Hop>,
    queue_limit: usize,
    batch_size: usize,
    max_in_flight: usize,
    in_flight: Vec<InFlight>,
    dropped_unreported: u64,
    dropped_total: u64,
    sent_total: u64,
}

impl Batcher {
    /// A new empty batcher.
    pub fn new(queue_limit: usize, batch_size: usize, max_in_flight: usize) -> Self {
        Batcher {
            queue: VecDeque::new(),
            queue_limit: queue_limit.max(1),
            batch_size: batch_size.max(1),
            max_in_flight: max_in_flight.max(1),
            in_flight: Vec::new(),
            dropped_unreported: 0,
            dropped_total: 0,
            sent_total: 0,
        }
    }

    /// Queues a hop, or drops it when the queue is full.
    pub fn push(&mut self, hop: Hop) -> Push {
        if self.queue.len() >= self.queue_limit {
            self.drop_n(1);
            return Push::Dropped;
        }
        self.queue.push_back(hop);
        Push::Queued {
            flush_now: self.queue.len() >= self.batch_size && self.can_send(),
        }
    }

    fn can_send(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }

    fn drop_n(&mut self, n: u64) {
        self.dropped_unreported = self.dropped_unreported.saturating_add(n);
        self.dropped_total = self.dropped_total.saturating_add(n);
    }

    /// Takes the next batch (at most `batch_size` hops) if something is queued and an
    /// in-flight slot is free. Must be followed by [`Batcher::dispatched`] or
    /// [`Batcher::dispatch_failed`].
    pub fn take(&mut self) -> Option<Batch> {
        if self.queue.is_empty() || !self.can_send() {
            return None;
        }
        let n = self.queue.len().min(self.batch_size);
        let hops: Vec<Hop> = self.queue.drain(..n).collect();
        Some(Batch {
            hops,
            dropped: self.dropped_unreported,
        })
    }

    /// A batch of `hops` hops, reporting `dropped` drops, was handed to the host as
    /// call `token`.
    pub fn dispatched(
        &mut self,
        token: u32,
        hops: usize,
        dropped: u64,
        now_ms: u64,
        timeout_ms: u64,
    ) {
        self.in_flight.push(InFlight {
            token,
            hops,
            dropped_reported: dropped,
            deadline_ms: now_ms.saturating_add(timeout_ms.saturating_mul(2)),
        });
    }

    /// The host refused the call for a batch of `hops` hops: it is dropped. Returns the
    /// hops dropped.
    pub fn dispatch_failed(&mut self, hops: usize) -> u64 {
        let n = hops as u64;
        self.drop_n(n);
        n
    }

    /// The answer to call `token` arrived. `ok`: gRPC status 0. Returns the hops dropped
    /// because of it (0 on success or unknown token).
    pub fn completed(&mut self, token: u32, ok: bool) -> u64 {
        let Some(pos) = self.in_flight.iter().position(|f| f.token == token) else {
            return 0;
        };
        let f = self.in_flight.swap_remove(pos);
        if ok {
            self.dropped_unreported = self.dropped_unreported.saturating_sub(f.dropped_reported);
            self.sent_total = self.sent_total.saturating_add(f.hops as u64);
            0
        } else {
            self.drop_n(f.hops as u64);
            f.hops as u64
        }
    }

    /// Expires calls past their deadline (counted as failed). Returns the hops dropped.
    pub fn expire(&mut self, now_ms: u64) -> u64 {
        let mut dropped = 0u64;
        let mut i = 0;
        while let Some(f) = self.in_flight.get(i) {
            if f.deadline_ms <= now_ms {
                let hops = f.hops as u64;
                self.in_flight.swap_remove(i);
                self.drop_n(hops);
                dropped = dropped.saturating_add(hops);
            } else {
                i += 1;
            }
        }
        dropped
    }

    /// Hops waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
    /// Calls outstanding.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
    /// Drops not yet acknowledged by the collector.
    pub fn dropped_unreported(&self) -> u64 {
        self.dropped_unreported
    }
    /// All drops so far.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }
    /// Hops acknowledged by the collector.
    pub fn sent_total(&self) -> u64 {
        self.sent_total
    }
}
