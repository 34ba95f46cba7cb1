//! Resync rate control: a pacing token bucket whose rate follows the application's write
//! rate between `min` and `max` (DRBD's `c-max-rate` / `c-min-rate`, simplified).
//!
//! ```text
//! effective rate = clamp(max - application write rate, min, max)   (source is the Primary)
//!                = max                                            (no application here)
//! acquire(n): the next chunk may start n/rate seconds after the previous one; up to
//!             BURST of unused time is credited (an idle period does not bank unlimited bytes)
//! ```
//!
//! The application rate is sampled from `Primary::application_bytes` at most every
//! [`SAMPLE_INTERVAL`]. A rate of 0 means unlimited.

use std::time::Duration;

use tokio::time::Instant;

/// Unused time credited at most (bounds the burst after an idle period).
pub const BURST: Duration = Duration::from_millis(100);
/// How often the application write rate is re-measured.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(200);

/// Paces resync/verify chunks.
#[derive(Debug)]
pub struct RateController {
    max: u64,
    min: u64,
    next: Instant,
    sample: Option<(Instant, u64)>,
    app_rate: f64,
}

impl RateController {
    /// A controller between `min` and `max` bytes/s (`max == 0`: unlimited).
    pub fn new(max: u64, min: u64) -> RateController {
        RateController {
            max,
            min: min.min(max),
            next: Instant::now(),
            sample: None,
            app_rate: 0.0,
        }
    }

    /// The rate in force, given the latest application byte counter (if the source is
    /// the Primary).
    pub fn effective_rate(&mut self, app_bytes: Option<u64>) -> u64 {
        if self.max == 0 {
            return 0;
        }
        let Some(app) = app_bytes else {
            return self.max;
        };
        let now = Instant::now();
        match self.sample {
            None => self.sample = Some((now, app)),
            Some((t, b)) if now.duration_since(t) >= SAMPLE_INTERVAL => {
                let dt = now.duration_since(t).as_secs_f64();
                self.app_rate = app.saturating_sub(b) as f64 / dt;
                self.sample = Some((now, app));
            }
            Some(_) => {}
        }
        let room = (self.max as f64 - self.app_rate).max(0.0) as u64;
        room.clamp(self.min.max(1), self.max)
    }

    /// Wait until `bytes` more may be transferred.
    pub async fn acquire(&mut self, bytes: u64, app_bytes: Option<u64>) {
        let rate = self.effective_rate(app_bytes);
        if rate == 0 {
            return;
        }
        let now = Instant::now();
        if self.next + BURST < now {
            self.next = now - BURST;
        }
        self.next += Duration::from_secs_f64(bytes as f64 / rate as f64);
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pacing_holds_the_rate() {
        let mut rc = RateController::new(1 << 20, 0);
        let start = Instant::now();
        for _ in 0..8 {
            rc.acquire(64 << 10, None).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        // 512 KiB at 1 MiB/s, minus at most the burst credit.
        assert!(elapsed >= 0.5 - BURST.as_secs_f64() - 0.01, "{elapsed}");
    }

    #[test]
    fn application_writes_lower_the_rate_down_to_min() {
        let mut rc = RateController::new(100, 10);
        assert_eq!(rc.effective_rate(None), 100);
        rc.app_rate = 60.0;
        rc.sample = Some((Instant::now(), 0));
        assert_eq!(rc.effective_rate(Some(0)), 40);
        rc.app_rate = 500.0;
        assert_eq!(rc.effective_rate(Some(0)), 10);
        let mut unlimited = RateController::new(0, 10);
        assert_eq!(unlimited.effective_rate(Some(5)), 0);
    }
}
