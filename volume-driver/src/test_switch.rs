//! TEST ONLY: a switch that breaks durability on purpose, so that the failover drill
//! (`scripts/lab drill`, issue 21) can prove it notices lost writes. Never set it on a host
//! whose data matters.
//!
//! With `TANDEM_TEST_UNSAFE_DROP_FLUSH=1` in tandemd's environment, every replicated
//! volume's backing device ignores flushes and FUA: a flush returns at once and a FUA write
//! is a plain write. Every replica still acknowledges as its protocol says, but on a pool
//! with `cache = "writeback"` (the lab's drill sets it with the switch) its data sits in
//! the kernel's page cache, so a power cut of the host loses writes that were acknowledged
//! as durable. Under `cache = "none"` only what the device itself caches is lost (on a
//! thin pool, block mappings not yet committed). tandemd logs an error at start while the
//! switch is on.

use std::sync::Arc;

use replication::device::{BackingDevice, DeviceError};

/// The environment variable of the switch (test only).
pub const DROP_FLUSH_ENV: &str = "TANDEM_TEST_UNSAFE_DROP_FLUSH";

/// True when the switch is set to `1`.
pub fn drop_flush_requested() -> bool {
    std::env::var(DROP_FLUSH_ENV).is_ok_and(|v| v == "1")
}

/// `device`, or a wrapper that drops its flushes when the switch is set.
pub fn wrap(device: Arc<dyn BackingDevice>) -> Arc<dyn BackingDevice> {
    if drop_flush_requested() {
        Arc::new(DropFlush(device))
    } else {
        device
    }
}

/// A backing device whose flushes do nothing (see the module doc).
struct DropFlush(Arc<dyn BackingDevice>);

impl BackingDevice for DropFlush {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.0.write_at(buf, offset)
    }
    fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DeviceError> {
        self.0.write_zeroes(offset, len, may_unmap)
    }
    fn set_size(&self, size: u64) {
        self.0.set_size(size)
    }
    fn cached_writes(&self) -> bool {
        self.0.cached_writes()
    }
}
