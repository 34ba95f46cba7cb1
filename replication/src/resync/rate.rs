//! Resync rate control: a pacing token bucket whose rate follows the application's write
//! rate between `min` and `max` (DRBD's `c-max-rate` / `c-min-rate`, simplified).
//!
//! ```text
//! effective rate = clamp(min(max - app, max x BUSY_SHARE), min, max)   (app busy)
//!                = clamp(max - app, min, max)                        (app below BUSY_FLOOR)
//!                = max                                              (no application here)
//! (app = the application's smoothed write rate, on the source when it is the Primary)
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

/// While the application writes, the resync takes at most this share of `max`. The
/// application's measured rate only shows the demand it gets served: when the hosts
/// deliver less than `max` (a link or disks slower than `max`, CPUs shared with other
/// work), "max minus what the application wrote" would hand the resync what the
/// application was kept from writing. A fixed share leaves it that headroom (DRBD's guide
/// suggests about 30% of the bandwidth for a fixed resync rate).
pub const BUSY_SHARE: f64 = 0.3;
/// The application counts as busy above this share of `max` (below it, noise such as a
/// guest's periodic metadata writes does not halve the resync).
pub const BUSY_FLOOR: f64 = 0.01;

/// Default reaction window (DRBD's `c-plan-ahead` default of 2 s).
pub const PLAN_AHEAD: Duration = Duration::from_secs(2);

/// Bounds of the controller: bytes/s and the reaction window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub min: u64,
    pub max: u64,
    pub plan_ahead: Duration,
}

/// The last measurement of the application's write rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: Instant,
    pub app_bytes: u64,
    /// Smoothed application write rate, bytes/s.
    pub app_rate: f64,
}

/// The pure decision: given the previous sample, the time and the application byte
/// counter, the new sample and the resync rate (bytes/s, `max > 0`). The application rate
/// is re-measured at most every [`SAMPLE_INTERVAL`] and smoothed over `plan_ahead` (a
/// longer window adapts more slowly); the resync gets what the application leaves of
/// `max`, at most [`BUSY_SHARE`] of it while the application is busy, never less than
/// `min`.
pub fn decide(prev: Option<Sample>, now: Instant, app_bytes: u64, l: Limits) -> (Sample, u64) {
    let sample = match prev {
        None => Sample {
            at: now,
            app_bytes,
            app_rate: 0.0,
        },
        Some(p) if now.saturating_duration_since(p.at) >= SAMPLE_INTERVAL => {
            let dt = now.saturating_duration_since(p.at).as_secs_f64();
            let measured = app_bytes.saturating_sub(p.app_bytes) as f64 / dt;
            let window = l.plan_ahead.as_secs_f64();
            let alpha = if window <= dt { 1.0 } else { dt / window };
            Sample {
                at: now,
                app_bytes,
                app_rate: p.app_rate + alpha * (measured - p.app_rate),
            }
        }
        Some(p) => p,
    };
    let max = l.max as f64;
    let mut room = (max - sample.app_rate).max(0.0);
    if sample.app_rate > max * BUSY_FLOOR {
        room = room.min(max * BUSY_SHARE);
    }
    let room = room as u64;
    (sample, room.clamp(l.min.min(l.max).max(1), l.max))
}

/// Paces resync/verify chunks.
#[derive(Debug)]
pub struct RateController {
    limits: Limits,
    next: Instant,
    sample: Option<Sample>,
}

impl RateController {
    /// A controller between `min` and `max` bytes/s (`max == 0`: unlimited).
    pub fn new(max: u64, min: u64) -> RateController {
        RateController {
            limits: Limits {
                max,
                min: min.min(max),
                plan_ahead: PLAN_AHEAD,
            },
            next: Instant::now(),
            sample: None,
        }
    }

    /// The same controller reacting over `window` instead of [`PLAN_AHEAD`].
    pub fn plan_ahead(mut self, window: Duration) -> RateController {
        self.limits.plan_ahead = window;
        self
    }

    /// New bounds for the chunks still to come (a live `volume set`); the measured
    /// application rate is kept.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = Limits {
            min: limits.min.min(limits.max),
            ..limits
        };
    }

    /// The rate in force, given the latest application byte counter (if the source is
    /// the Primary).
    pub fn effective_rate(&mut self, app_bytes: Option<u64>) -> u64 {
        if self.limits.max == 0 {
            return 0;
        }
        let Some(app) = app_bytes else {
            return self.limits.max;
        };
        let (sample, rate) = decide(self.sample, Instant::now(), app, self.limits);
        self.sample = Some(sample);
        rate
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

    #[test]
    fn decide_table() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let l = |plan| Limits {
            min: 100,
            max: 1000,
            plan_ahead: Duration::from_millis(plan),
        };
        let s = |at, app_bytes, app_rate| {
            Some(Sample {
                at,
                app_bytes,
                app_rate,
            })
        };
        // (previous sample, now, app counter, limits, expected app_rate, expected rate)
        let table = [
            (None, t0, 0, l(2000), 0.0, 1000), // first call: idle, full max
            (s(t0, 0, 0.0), ms(1000), 0, l(1000), 0.0, 1000), // idle stays at max
            (s(t0, 0, 0.0), ms(1000), 800, l(1000), 800.0, 200), // busy: the rest of max
            (s(t0, 0, 0.0), ms(1000), 5000, l(1000), 5000.0, 100), // saturated: min
            (s(t0, 0, 0.0), ms(1000), 600, l(2000), 300.0, 300), // longer window: half way; busy share
            (s(t0, 0, 0.0), ms(1000), 200, l(1000), 200.0, 300), // busy: at most the busy share
            (s(t0, 0, 0.0), ms(1000), 5, l(1000), 5.0, 995),     // below the busy floor: the rest
            (s(t0, 0, 800.0), ms(100), 600, l(1000), 800.0, 200), // too soon: no re-measure
            (s(t0, 0, 800.0), ms(1000), 0, l(1000), 0.0, 1000),  // application went idle
        ];
        for (i, (prev, now, app, lim, want_app, want_rate)) in table.into_iter().enumerate() {
            let (got, rate) = decide(prev, now, app, lim);
            assert!((got.app_rate - want_app).abs() < 1e-6, "row {i}: {got:?}");
            assert_eq!(rate, want_rate, "row {i}");
        }
    }

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
        let busy = |app_rate| {
            Some(Sample {
                at: Instant::now(),
                app_bytes: 0,
                app_rate,
            })
        };
        rc.sample = busy(80.0);
        assert_eq!(rc.effective_rate(Some(0)), 20);
        rc.sample = busy(500.0);
        assert_eq!(rc.effective_rate(Some(0)), 10);
        let mut unlimited = RateController::new(0, 10);
        assert_eq!(unlimited.effective_rate(Some(5)), 0);
    }

    #[test]
    fn new_limits_apply_to_the_next_chunk_and_keep_the_measurement() {
        let mut rc = RateController::new(100, 10);
        rc.sample = Some(Sample {
            at: Instant::now(),
            app_bytes: 0,
            app_rate: 60.0,
        });
        rc.set_limits(Limits {
            min: 50,
            max: 400,
            plan_ahead: PLAN_AHEAD,
        });
        // 400 - 60 = 340, but the application is busy: at most 30% of 400.
        assert_eq!(rc.effective_rate(Some(0)), 120);
        assert_eq!(rc.effective_rate(None), 400);
        // A floor above the cap is clamped to it.
        rc.set_limits(Limits {
            min: 500,
            max: 40,
            plan_ahead: PLAN_AHEAD,
        });
        assert_eq!(rc.effective_rate(Some(0)), 40);
    }
}
