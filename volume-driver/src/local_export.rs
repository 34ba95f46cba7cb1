//! An [`ExportHandle`] over one local [`BackingDevice`]: the I/O path of a volume that has no
//! peer to replicate to. Aligned reads, writes and flushes the device can do asynchronously
//! (io_uring under `O_DIRECT`) wait for the disk on the runtime; other device calls block,
//! so each runs on tokio's blocking pool, except small cached writes ([`write_is_inline`]),
//! as on a replicated volume. Requests are recorded in the volume's [`IoStats`] as the engine records
//! a replicated volume's (local latency only: there is no peer).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use replication::datapath::write_is_inline;
use replication::device::{BackingDevice, DeviceError};
use replication::stats::{hold, IoStats, OpLatency};

use crate::frontend::{ExportHandle, ExportIoError, IoErrorKind};

/// A volume served straight from its local disk.
pub struct LocalExport {
    name: String,
    device: Arc<dyn BackingDevice>,
    read_only: bool,
    stats: Arc<IoStats>,
}

impl LocalExport {
    /// The export of `device`, recording into `stats` (the caller counts the device's
    /// calls in `stats.pending_lower` if it wants them, see `replication::stats`).
    pub fn new(
        name: impl Into<String>,
        device: Arc<dyn BackingDevice>,
        read_only: bool,
        stats: Arc<IoStats>,
    ) -> Self {
        LocalExport {
            name: name.into(),
            device,
            read_only,
            stats,
        }
    }

    /// Run `request`, counted as pending; a success is timed into `latency` (if any) and
    /// adds `bytes` to `counter` (if any).
    async fn recorded<T>(
        &self,
        latency: Option<&OpLatency>,
        counter: Option<(&std::sync::atomic::AtomicU64, u64)>,
        request: impl std::future::Future<Output = Result<T, ExportIoError>>,
    ) -> Result<T, ExportIoError> {
        let _pending = hold(&self.stats.pending_upper, 1);
        let started = Instant::now();
        let result = request.await;
        if result.is_ok() {
            if let Some(latency) = latency {
                latency.observe(started.elapsed(), None);
            }
            if let Some((counter, bytes)) = counter {
                IoStats::add(counter, bytes);
            }
        }
        result
    }

    async fn run<T, F>(&self, op: F) -> Result<T, ExportIoError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn BackingDevice) -> Result<T, DeviceError> + Send + 'static,
    {
        let device = Arc::clone(&self.device);
        match tokio::task::spawn_blocking(move || op(device.as_ref())).await {
            Ok(result) => result.map_err(|e| device_error(&self.name, e)),
            Err(join) => Err(ExportIoError::new(
                IoErrorKind::Io,
                format!("{}: I/O task failed: {join}", self.name),
            )),
        }
    }

    fn check_writable(&self) -> Result<(), ExportIoError> {
        if self.read_only {
            Err(ExportIoError::new(
                IoErrorKind::ReadOnly,
                format!("{} is open read-only", self.name),
            ))
        } else {
            Ok(())
        }
    }
}

/// Map a device failure to the frontend's error classes, keeping the whole cause chain in
/// the message.
pub fn device_error(volume: &str, error: DeviceError) -> ExportIoError {
    let kind = match &error {
        DeviceError::OutOfRange { .. } => IoErrorKind::Invalid,
        _ if error.errno() == libc::ENOSPC => IoErrorKind::NoSpace,
        _ => IoErrorKind::Io,
    };
    let mut message = format!("{volume}: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    ExportIoError::new(kind, message)
}

#[async_trait]
impl ExportHandle for LocalExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.device.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportIoError> {
        let read = async {
            if let Some(read) = self.device.read_async(offset, len as usize) {
                return read.await.map_err(|e| device_error(&self.name, e));
            }
            self.run(move |dev| dev.read_owned(offset, len as usize))
                .await
        };
        let bytes = (&self.stats.read_bytes, u64::from(len));
        self.recorded(Some(&self.stats.read), Some(bytes), read)
            .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportIoError> {
        self.check_writable()?;
        let bytes = (&self.stats.written_bytes, data.len() as u64);
        let write = async {
            if write_is_inline(self.device.as_ref(), offset, data.len(), fua) {
                return self
                    .device
                    .write_at(&data, offset)
                    .map_err(|e| device_error(&self.name, e));
            }
            if let Some(write) = self.device.write_async(offset, &data, fua) {
                return write.await.map_err(|e| device_error(&self.name, e));
            }
            self.run(move |dev| {
                if fua {
                    dev.write_at_durable(&data, offset)
                } else {
                    dev.write_at(&data, offset)
                }
            })
            .await
        };
        self.recorded(Some(&self.stats.write), Some(bytes), write)
            .await
    }

    async fn flush(&self) -> Result<(), ExportIoError> {
        let flush = async {
            match self.device.flush_async() {
                Some(flush) => flush.await.map_err(|e| device_error(&self.name, e)),
                None => self.run(|dev| dev.flush()).await,
            }
        };
        self.recorded(Some(&self.stats.flush), None, flush).await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), ExportIoError> {
        self.check_writable()?;
        let trim = self.run(move |dev| dev.discard(offset, len));
        let bytes = (&self.stats.written_bytes, len);
        self.recorded(None, Some(bytes), trim).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), ExportIoError> {
        self.check_writable()?;
        let zeroes = self.run(move |dev| dev.write_zeroes(offset, len, may_unmap));
        let bytes = (&self.stats.written_bytes, len);
        self.recorded(None, Some(bytes), zeroes).await
    }
}
