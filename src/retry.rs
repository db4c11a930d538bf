//! Exponential backoff with full jitter: attempt n waits a uniform time in
//! `[0, min(max, initial * 2^n)]`, so many processes retrying together spread out.

use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2f64.powi(attempt.min(30) as i32);
        Duration::from_secs_f64((self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64()))
    }

    pub fn delay(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(fastrand::f64())
    }

    /// A server's `Retry-After` wins over our own guess, within `max`.
    pub fn delay_with_hint(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        match hint {
            Some(h) => h.min(self.max),
            None => self.delay(attempt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(400));
        assert_eq!(b.ceiling(10), Duration::from_secs(1));
        for n in 0..20 {
            assert!(b.delay(n) <= b.ceiling(n));
        }
        assert_eq!(
            b.delay_with_hint(0, Some(Duration::from_secs(5))),
            Duration::from_secs(1)
        );
    }
}
