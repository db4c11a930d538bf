//! A circuit breaker counted in consecutive failed batches: open after `threshold`,
//! stay open for `cooldown`, then let one probe batch through (half-open).

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    state: State,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            state: State::Closed,
        }
    }

    /// Whether a batch may be attempted now; moves an expired open breaker to half-open.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed | State::HalfOpen => true,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen;
                true
            }
            State::Open { .. } => false,
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.state = State::Closed;
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.state == State::HalfOpen || self.failures >= self.threshold {
            self.state = State::Open {
                until: now + self.cooldown,
            };
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn name(&self) -> &'static str {
        match self.state {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(b.allow(t0));
            b.failure(t0);
        }
        assert_eq!(b.name(), "closed");
        b.failure(t0);
        assert_eq!(b.name(), "open");
        assert!(!b.allow(t0 + Duration::from_secs(9)));
        assert!(b.allow(t0 + Duration::from_secs(10)));
        assert_eq!(b.name(), "half_open");
        b.failure(t0 + Duration::from_secs(10));
        assert_eq!(b.name(), "open");
        assert!(b.allow(t0 + Duration::from_secs(21)));
        b.success();
        assert_eq!(b.name(), "closed");
    }
}
