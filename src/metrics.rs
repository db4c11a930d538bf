//! Counters of one destination. They live inside the queue's lock, so a snapshot always
//! satisfies `accepted == written + dropped + spilled + in_flight`.

use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    QueueFull,
    Failed,
    Invalid,
    Closed,
    /// Held at close with a spill directory configured, but the directory was at
    /// `spill_max_bytes`.
    SpillFull,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::QueueFull,
        DropReason::Failed,
        DropReason::Invalid,
        DropReason::Closed,
        DropReason::SpillFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Failed => "failed",
            DropReason::Invalid => "invalid",
            DropReason::Closed => "closed",
            DropReason::SpillFull => "spill_full",
        }
    }
}

const LATENCY_WINDOW: usize = 1024;

#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub accepted: u64,
    pub written: u64,
    pub dropped: [u64; 5],
    /// Records written to the spill directory at close instead of being dropped: settled
    /// for this process, delivered by the next one.
    pub spilled: u64,
    /// Records read back from the spill directory and queued (also counted in `accepted`).
    pub replayed: u64,
    /// Lines of spill files that could not be read back as records (truncated, garbage).
    pub spill_bad_lines: u64,
    pub retries: u64,
    pub batches: u64,
    pub last_error: Option<String>,
    /// Seconds each of the last batches took from dequeue to resolution, newest overwriting oldest.
    latencies: Vec<f64>,
    next_latency: usize,
}

impl Counters {
    pub fn drop(&mut self, reason: DropReason, n: u64) {
        self.dropped[reason as usize] += n;
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    pub fn resolved(&self) -> u64 {
        self.written + self.dropped_total() + self.spilled
    }

    pub fn record_latency(&mut self, secs: f64) {
        if self.latencies.len() < LATENCY_WINDOW {
            self.latencies.push(secs);
        } else {
            self.latencies[self.next_latency] = secs;
        }
        self.next_latency = (self.next_latency + 1) % LATENCY_WINDOW;
    }

    /// p50/p95/p99/max of recent batch latencies in milliseconds (nearest rank).
    pub fn latency_percentiles(&self) -> BTreeMap<&'static str, f64> {
        let mut out = BTreeMap::new();
        if self.latencies.is_empty() {
            return out;
        }
        let mut v = self.latencies.clone();
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            (v[rank - 1] * 1e6).round() / 1e3
        };
        out.insert("p50", pick(0.50));
        out.insert("p95", pick(0.95));
        out.insert("p99", pick(0.99));
        out.insert("max", pick(1.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut c = Counters::default();
        for i in 1..=100 {
            c.record_latency(i as f64 / 1000.0);
        }
        let p = c.latency_percentiles();
        assert_eq!(p["p50"], 50.0);
        assert_eq!(p["p99"], 99.0);
        assert_eq!(p["max"], 100.0);
    }

    #[test]
    fn latency_window_is_bounded() {
        let mut c = Counters::default();
        for i in 0..5000 {
            c.record_latency(i as f64);
        }
        assert_eq!(c.latencies.len(), LATENCY_WINDOW);
        assert_eq!(c.latency_percentiles()["max"], 4999.0 * 1000.0);
    }
}
