//! Reconnect delays: capped exponential backoff with jitter. Pure.

use std::time::Duration;

/// Capped exponential backoff with "equal jitter": the n-th delay is drawn
/// uniformly from `[d/2, d]` where `d = min(cap, base * 2^n)`, so devices
/// that fail together do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// `seed` picks the jitter sequence (e.g. a hash of the device id).
    pub(crate) fn new(base: Duration, cap: Duration, seed: u64) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
            // xorshift must not start at zero
            rng: seed | 1,
        }
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The delay before the next attempt; each call doubles the ceiling.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let ceil_us = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        let half = ceil_us / 2;
        let jitter = self.next_rand() % (ceil_us - half + 1);
        Duration::from_micros(half + jitter)
    }

    /// After a success: the next failure starts from `base` again.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_jittered_and_resets() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        let mut b = Backoff::new(base, cap, 42);
        let mut ceiling = base;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} not in [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(cap);
        }
        b.reset();
        assert!(b.next_delay() <= base);
        // two seeds give different sequences
        let mut x = Backoff::new(base, cap, 1);
        let mut y = Backoff::new(base, cap, 2);
        let xs: Vec<_> = (0..5).map(|_| x.next_delay()).collect();
        let ys: Vec<_> = (0..5).map(|_| y.next_delay()).collect();
        assert_ne!(xs, ys);
    }
}
