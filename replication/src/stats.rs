//! Per-volume I/O statistics the data path records and a metrics exporter reads: latency
//! histograms, byte and write counters and pending-request gauges, atomics only (no lock,
//! no allocation), so that recording costs a request a few relaxed atomic adds.
//!
//! ```text
//! Replica::read/write/flush ── IoStats::{read,write,flush}.{local,peer}.observe(d)
//!                                 └── LatencyHistogram: [AtomicU64; buckets], count, sum
//! Replica::read/write/...  ─── hold(&pending_upper, 1)   (application requests in the engine)
//! PendingDevice::*         ─── hold(&pending_lower, 1)   (calls on the local disk)
//! tandemd /metrics ─────────── IoStats::*.snapshot() -> HistogramSnapshot (cumulative)
//! ```
//!
//! "local" is the time from the request's start until the local disk completed it; "peer"
//! is the time from the start until every connected peer acknowledged it at the protocol's
//! point (recorded only when the request waited for at least one peer). Counters only grow;
//! a reader may see a histogram's count and its buckets from slightly different instants,
//! which Prometheus tolerates (it never reads them as one transaction either).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::device::{BackingDevice, DeviceError, DeviceFuture};

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
    /// Application requests in the engine, from their arrival until they complete,
    /// waits included (DRBD's upper pending). A gauge.
    pub pending_upper: AtomicU64,
    /// Calls on the local disk in progress, whoever made them: the application's
    /// requests, a peer's replicated writes, resync (DRBD's lower pending). A gauge.
    pub pending_lower: AtomicU64,
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

/// `n` added to a gauge until dropped (a request pending, bytes in flight).
#[must_use = "the gauge goes down when this is dropped"]
pub struct Held<'a> {
    gauge: &'a AtomicU64,
    n: u64,
}

/// Add `n` to `gauge` until the returned [`Held`] is dropped.
pub fn hold(gauge: &AtomicU64, n: u64) -> Held<'_> {
    gauge.fetch_add(n, Ordering::Relaxed);
    Held { gauge, n }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// A [`BackingDevice`] that counts its calls in progress in
/// [`IoStats::pending_lower`]; everything else is the inner device's.
pub struct PendingDevice {
    inner: Arc<dyn BackingDevice>,
    stats: Arc<IoStats>,
}

impl PendingDevice {
    pub fn new(inner: Arc<dyn BackingDevice>, stats: Arc<IoStats>) -> Self {
        PendingDevice { inner, stats }
    }

    fn pending(&self) -> Held<'_> {
        hold(&self.stats.pending_lower, 1)
    }

    /// An asynchronous call, counted from its start until its future completes or is
    /// dropped.
    fn pending_async<T: Send + 'static>(
        &self,
        call: Option<DeviceFuture<T>>,
    ) -> Option<DeviceFuture<T>> {
        /// One pending call on an owned [`IoStats`].
        struct Pending(Arc<IoStats>);
        impl Drop for Pending {
            fn drop(&mut self) {
                self.0.pending_lower.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let call = call?;
        self.stats.pending_lower.fetch_add(1, Ordering::Relaxed);
        let pending = Pending(Arc::clone(&self.stats));
        Some(Box::pin(async move {
            let _pending = pending;
            call.await
        }))
    }
}

impl BackingDevice for PendingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let _pending = self.pending();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let _pending = self.pending();
        self.inner.write_at(buf, offset)
    }
    fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let _pending = self.pending();
        self.inner.write_at_durable(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        let _pending = self.pending();
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _pending = self.pending();
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DeviceError> {
        let _pending = self.pending();
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn set_size(&self, size: u64) {
        self.inner.set_size(size)
    }
    fn cached_writes(&self) -> bool {
        self.inner.cached_writes()
    }
    fn read_owned(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        let _pending = self.pending();
        self.inner.read_owned(offset, len)
    }
    fn read_async(&self, offset: u64, len: usize) -> Option<DeviceFuture<Bytes>> {
        self.pending_async(self.inner.read_async(offset, len))
    }
    fn write_async(&self, offset: u64, data: &Bytes, fua: bool) -> Option<DeviceFuture<()>> {
        self.pending_async(self.inner.write_async(offset, data, fua))
    }
    fn flush_async(&self) -> Option<DeviceFuture<()>> {
        self.pending_async(self.inner.flush_async())
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
    fn a_held_gauge_goes_back_down_when_dropped() {
        let stats = IoStats::default();
        let a = hold(&stats.pending_upper, 1);
        let b = hold(&stats.pending_upper, 1);
        assert_eq!(IoStats::get(&stats.pending_upper), 2);
        drop(a);
        assert_eq!(IoStats::get(&stats.pending_upper), 1);
        drop(b);
        assert_eq!(IoStats::get(&stats.pending_upper), 0);
    }

    /// A device whose writes block until told to finish.
    struct GatedDevice(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

    impl BackingDevice for GatedDevice {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<(), DeviceError> {
            let _ = self.0.lock().unwrap().recv();
            Ok(())
        }
        fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
            self.write_at(buf, offset)
        }
        fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn set_size(&self, _: u64) {}
    }

    #[test]
    fn a_device_call_is_pending_lower_while_it_runs() {
        let (finish, gate) = std::sync::mpsc::channel();
        let stats = Arc::new(IoStats::default());
        let device = Arc::new(PendingDevice::new(
            Arc::new(GatedDevice(std::sync::Mutex::new(gate))),
            stats.clone(),
        ));
        let d = device.clone();
        let write = std::thread::spawn(move || d.write_at(&[1; 512], 0));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while IoStats::get(&stats.pending_lower) == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(IoStats::get(&stats.pending_lower), 1);
        finish.send(()).unwrap();
        write.join().unwrap().unwrap();
        assert_eq!(IoStats::get(&stats.pending_lower), 0);
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
