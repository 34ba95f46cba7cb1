//! The floor of the `frontends` bench: a [`Client`] on a volume's backing device itself, in
//! this process, making the calls `tandemd`'s `LocalExport` makes for a 4 KiB aligned
//! request: `read_async` / `write_async` (io_uring under `O_DIRECT`, awaited on the runtime
//! without a thread hand-off), a small cached write inline (`write_is_inline`), or else the
//! blocking call on tokio's blocking pool. The caller opens the device as the daemon does
//! (`FileDevice::open_with` with the pool's `DeviceOptions`). The runtime is a
//! current-thread one, run only while [`Client::complete`] waits, so a request crosses no
//! thread unless the device sends it to the blocking pool.

use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use replication::datapath::write_is_inline;
use replication::device::{BackingDevice, DeviceError};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use crate::load::{Client, Op, BLOCK};

type Finished = (usize, Result<Option<Bytes>>);

/// The device with `qd` request slots.
pub struct DeviceClient {
    runtime: Runtime,
    device: Arc<dyn BackingDevice>,
    tasks: JoinSet<Finished>,
    /// Per slot: what a write writes.
    write_data: Vec<Bytes>,
    /// Per slot: what the last read returned.
    read_data: Vec<Bytes>,
}

impl DeviceClient {
    pub fn new(device: Arc<dyn BackingDevice>, qd: usize) -> Result<DeviceClient> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the floor's tokio runtime")?;
        Ok(DeviceClient {
            runtime,
            device,
            tasks: JoinSet::new(),
            write_data: vec![Bytes::from(vec![0u8; BLOCK]); qd],
            read_data: vec![Bytes::from(vec![0u8; BLOCK]); qd],
        })
    }
}

impl Client for DeviceClient {
    fn submit(&mut self, slot: usize, op: Op, offset: u64) -> Result<()> {
        let _runtime = self.runtime.enter();
        let device = Arc::clone(&self.device);
        match op {
            Op::Read => {
                let read = device.read_async(offset, BLOCK);
                self.tasks.spawn(async move {
                    let result = match read {
                        Some(read) => read.await.map_err(anyhow::Error::from),
                        None => blocking(move || device.read_owned(offset, BLOCK)).await,
                    };
                    (slot, result.map(Some))
                });
            }
            Op::Write => {
                let data = self.write_data[slot].clone();
                if write_is_inline(device.as_ref(), offset, BLOCK, false) {
                    let result = device.write_at(&data, offset).map(|()| None);
                    let result = result.map_err(anyhow::Error::from);
                    self.tasks.spawn(async move { (slot, result) });
                    return Ok(());
                }
                let write = device.write_async(offset, &data, false);
                self.tasks.spawn(async move {
                    let result = match write {
                        Some(write) => write.await.map_err(anyhow::Error::from),
                        None => blocking(move || device.write_at(&data, offset)).await,
                    };
                    (slot, result.map(|()| None))
                });
            }
        }
        Ok(())
    }

    fn complete(&mut self, done: &mut Vec<usize>) -> Result<()> {
        let first = self
            .runtime
            .block_on(self.tasks.join_next())
            .context("nothing in flight on the device")?;
        let mut finished = vec![first];
        while let Some(more) = self.tasks.try_join_next() {
            finished.push(more);
        }
        for joined in finished {
            let (slot, result) = joined.context("a device request's task failed")?;
            if let Some(data) = result.context("device request")? {
                self.read_data[slot] = data;
            }
            done.push(slot);
        }
        Ok(())
    }

    fn data(&self, slot: usize) -> &[u8] {
        &self.read_data[slot]
    }

    fn set_data(&mut self, slot: usize, data: &[u8]) {
        self.write_data[slot] = Bytes::copy_from_slice(data);
    }
}

/// Run a blocking device call on the runtime's blocking pool.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, DeviceError> + Send + 'static,
) -> Result<T> {
    Ok(tokio::task::spawn_blocking(call).await??)
}
