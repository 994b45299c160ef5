//! Period jitter of a control loop: how late each tick ran, over a window of
//! recent ticks, with percentiles on demand.

use std::time::Duration;

/// Lateness samples of the most recent ticks (a ring), plus lifetime count
/// and maximum.
#[derive(Debug, Clone)]
pub struct JitterWindow {
    ring: Vec<u64>,
    next: usize,
    cap: usize,
    count: u64,
    max_us: u64,
}

/// Percentiles of the recent window, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JitterStats {
    /// Ticks recorded since the loop started.
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Largest lateness since the loop started.
    pub max_us: u64,
}

impl JitterWindow {
    /// A window of the last `cap` ticks (at least 1).
    pub fn new(cap: usize) -> Self {
        JitterWindow {
            ring: Vec::with_capacity(cap.max(1)),
            next: 0,
            cap: cap.max(1),
            count: 0,
            max_us: 0,
        }
    }

    /// Record how late one tick ran.
    pub fn record(&mut self, lateness: Duration) {
        let us = u64::try_from(lateness.as_micros()).unwrap_or(u64::MAX);
        if self.ring.len() < self.cap {
            self.ring.push(us);
        } else {
            self.ring[self.next] = us;
        }
        self.next = (self.next + 1) % self.cap;
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    /// Percentiles over the window; `None` before the first tick.
    pub fn stats(&self) -> Option<JitterStats> {
        if self.ring.is_empty() {
            return None;
        }
        let mut v = self.ring.clone();
        v.sort_unstable();
        let pick = |q: f64| {
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            v[i.min(v.len() - 1)]
        };
        Some(JitterStats {
            count: self.count,
            p50_us: pick(0.50),
            p99_us: pick(0.99),
            max_us: self.max_us,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_a_sliding_window() {
        let mut w = JitterWindow::new(100);
        assert!(w.stats().is_none());
        for i in 1..=100u64 {
            w.record(Duration::from_micros(i));
        }
        let s = w.stats().unwrap();
        assert_eq!((s.count, s.p50_us, s.p99_us, s.max_us), (100, 51, 99, 100));
        // The window slides: 100 more ticks of 1 ms replace the old ones,
        // the lifetime max stays.
        for _ in 0..100 {
            w.record(Duration::from_millis(1));
        }
        let s = w.stats().unwrap();
        assert_eq!(
            (s.count, s.p50_us, s.p99_us, s.max_us),
            (200, 1000, 1000, 1000)
        );
    }
}
