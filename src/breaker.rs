//! A circuit breaker counted in consecutive failed rounds: open after `threshold`, stay
//! open for a while, then let one probe through (half-open). The first opening of an
//! outage lasts an eighth of `cooldown` and each further one twice the last, up to
//! `cooldown`: a short outage is over within seconds, a long one costs the store one
//! attempt per `cooldown`.

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
    /// Openings since the breaker was last closed.
    openings: u32,
    state: State,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            openings: 0,
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
        self.openings = 0;
        self.state = State::Closed;
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.state == State::HalfOpen || self.failures >= self.threshold {
            let halvings = 3u32.saturating_sub(self.openings);
            self.openings = self.openings.saturating_add(1);
            self.state = State::Open {
                until: now + self.cooldown / 2u32.pow(halvings),
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
    fn opens_after_threshold_probes_sooner_first_then_every_cooldown() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Breaker::new(3, s(16));
        for _ in 0..2 {
            assert!(b.allow(t0));
            b.failure(t0);
        }
        assert_eq!(b.name(), "closed");
        b.failure(t0);
        assert_eq!(b.name(), "open");
        // Openings of one outage: 2 s, 4 s, 8 s, then 16 s each.
        let mut t = t0;
        for wait in [2, 4, 8, 16, 16] {
            assert!(!b.allow(t + s(wait) - Duration::from_millis(1)));
            t += s(wait);
            assert!(b.allow(t));
            assert_eq!(b.name(), "half_open");
            b.failure(t);
            assert_eq!(b.name(), "open");
        }
        assert!(b.allow(t + s(16)));
        b.success();
        assert_eq!(b.name(), "closed");
        // The next outage starts short again.
        for _ in 0..3 {
            b.failure(t);
        }
        assert!(b.allow(t + s(2)));
    }
}
