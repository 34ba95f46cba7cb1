//! Per-volume I/O statistics the data path records and a metrics exporter reads: latency
//! histograms and byte and write counters, atomics only (no lock, no allocation), so that
//! recording costs a request a few relaxed atomic adds.
//!
//! ```text
//! Replica::read/write/flush ── IoStats::{read,write,flush}.{local,peer}.observe(d)
//!                                 └── LatencyHistogram: [AtomicU64; buckets], count, sum
//! tandemd /metrics ─────────── IoStats::*.snapshot() -> HistogramSnapshot (cumulative)
//! ```
//!
//! "local" is the time from the request's start until the local disk completed it; "peer"
//! is the time from the start until every connected peer acknowledged it at the protocol's
//! point (recorded only when the request waited for at least one peer). Counters only grow;
//! a reader may see a histogram's count and its buckets from slightly different instants,
//! which Prometheus tolerates (it never reads them as one transaction either).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds (the last, +Inf, is implicit).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// The same bounds in nanoseconds, for the recording side.
const BUCKET_NANOS: [u64; 14] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// A latency histogram with fixed buckets ([`LATENCY_BUCKETS`]), recorded with atomics.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per-bucket (non-cumulative) counts; the last slot is +Inf.
    buckets: [AtomicU64; BUCKET_NANOS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A point-in-time copy of a [`LatencyHistogram`], cumulative as Prometheus wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations at or below it), without +Inf.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl LatencyHistogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let slot = BUCKET_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(BUCKET_NANOS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative buckets, count and sum. The count is the +Inf bucket, so the text is
    /// always consistent (count >= every bucket).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
        for (bound, slot) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            running += slot.load(Ordering::Relaxed);
            buckets.push((*bound, running));
        }
        let count = running + self.buckets[BUCKET_NANOS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The two parts of a request's latency (see the module doc).
#[derive(Debug, Default)]
pub struct OpLatency {
    pub local: LatencyHistogram,
    pub peer: LatencyHistogram,
}

impl OpLatency {
    /// Record a request that took `local` on this disk and, if it waited for peers,
    /// `peer` until the last acknowledgement.
    pub fn observe(&self, local: Duration, peer: Option<Duration>) {
        self.local.observe(local);
        if let Some(peer) = peer {
            self.peer.observe(peer);
        }
    }
}

/// One volume's I/O statistics on this node.
#[derive(Debug, Default)]
pub struct IoStats {
    pub read: OpLatency,
    pub write: OpLatency,
    pub flush: OpLatency,
    /// Bytes read by the application.
    pub read_bytes: AtomicU64,
    /// Bytes written by the application (writes, trims and write-zeroes).
    pub written_bytes: AtomicU64,
    /// Activity-log transactions made durable.
    pub al_writes: AtomicU64,
    /// Bitmap flushes made durable.
    pub bitmap_writes: AtomicU64,
}

impl IoStats {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(40)); // <= 50 us
        h.observe(Duration::from_micros(100)); // exactly 100 us: that bucket
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(9)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.000_05, 1));
        assert_eq!(s.buckets[1], (0.000_1, 2));
        assert_eq!(s.buckets[5], (0.002_5, 2));
        assert_eq!(s.buckets[6], (0.005, 3));
        assert_eq!(s.buckets.last().map(|b| b.1), Some(3));
        let expected = 0.000_04 + 0.000_1 + 0.003 + 9.0;
        assert!((s.sum_seconds - expected).abs() < 1e-9, "{}", s.sum_seconds);
    }

    #[test]
    fn bounds_in_seconds_and_nanoseconds_agree() {
        for (s, n) in LATENCY_BUCKETS.iter().zip(BUCKET_NANOS) {
            assert_eq!((s * 1e9).round() as u64, n);
        }
    }

    #[test]
    fn peer_latency_is_recorded_only_when_a_peer_was_waited_for() {
        let op = OpLatency::default();
        op.observe(Duration::from_micros(10), None);
        op.observe(Duration::from_micros(10), Some(Duration::from_micros(90)));
        assert_eq!(op.local.snapshot().count, 2);
        assert_eq!(op.peer.snapshot().count, 1);
    }
}
