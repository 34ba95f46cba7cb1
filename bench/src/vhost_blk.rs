//! A vhost-user-blk [`Client`] on the host, without a VM: libblkio's Rust implementation
//! (crate `blkio`, driver `virtio-blk-vhost-user`) connects to the socket as QEMU would,
//! shares its request buffers with the backend (one memfd region), and drives one
//! virtqueue: requests go into the ring, one kick per batch, and the client sleeps on the
//! queue's completion eventfd (an interrupt-driven queue, not a busy-polling one).

use std::mem::MaybeUninit;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use crate::load::{Client, Op, BLOCK};

/// One vhost-user-blk connection with `qd` request slots on one queue.
pub struct VhostBlk {
    queue: Blkioq,
    /// The connection; dropping it unmaps and frees `region`.
    _blkio: Blkio,
    /// `qd` buffers of [`BLOCK`] bytes, shared with the backend.
    region: MemoryRegion,
    capacity: u64,
    completions: Vec<MaybeUninit<Completion>>,
    in_flight: Vec<bool>,
}

fn blkio_err(what: &'static str) -> impl FnOnce(blkio::Error) -> anyhow::Error {
    move |e| anyhow!("{what}: {e}")
}

impl VhostBlk {
    /// Connect to the vhost-user-blk socket `path` for `qd` requests in flight.
    pub fn connect(path: &Path, qd: usize) -> Result<VhostBlk> {
        let path_str = path
            .to_str()
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        let mut blkio =
            Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("creating the blkio driver"))?;
        blkio
            .set_str("path", path_str)
            .map_err(blkio_err("setting path"))?;
        blkio
            .connect()
            .map_err(|e| anyhow!("connecting to {}: {e}", path.display()))?;
        blkio
            .set_i32("num-queues", 1)
            .map_err(blkio_err("setting num-queues"))?;
        let mut started = blkio.start().map_err(blkio_err("starting the device"))?;
        let queue = started.queues.pop().context("blkio started no queue")?;
        let capacity = blkio
            .get_u64("capacity")
            .map_err(blkio_err("reading the capacity"))?;
        let align = blkio
            .get_u64("mem-region-alignment")
            .map_err(blkio_err("reading mem-region-alignment"))?
            .max(1) as usize;
        let len = (qd * BLOCK).div_ceil(align) * align;
        let region = blkio
            .alloc_mem_region(len)
            .map_err(blkio_err("allocating the buffers"))?;
        blkio
            .map_mem_region(&region)
            .map_err(blkio_err("sharing the buffers with the backend"))?;
        Ok(VhostBlk {
            queue,
            _blkio: blkio,
            region,
            capacity,
            completions: (0..qd).map(|_| MaybeUninit::uninit()).collect(),
            in_flight: vec![false; qd],
        })
    }

    /// The device's size in bytes, from its config space.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn buffer(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.in_flight.len(), "slot {slot} out of range");
        (self.region.addr + slot * BLOCK) as *mut u8
    }
}

impl Client for VhostBlk {
    fn submit(&mut self, slot: usize, op: Op, offset: u64) -> Result<()> {
        if offset + BLOCK as u64 > self.capacity {
            bail!(
                "offset {offset} is past the device's end ({})",
                self.capacity
            );
        }
        let buf = self.buffer(slot);
        match op {
            Op::Read => self.queue.read(offset, buf, BLOCK, slot, ReqFlags::empty()),
            Op::Write => self
                .queue
                .write(offset, buf, BLOCK, slot, ReqFlags::empty()),
        }
        self.in_flight[slot] = true;
        Ok(())
    }

    fn complete(&mut self, done: &mut Vec<usize>) -> Result<()> {
        let n = self
            .queue
            .do_io(&mut self.completions, 1, None, None)
            .map_err(blkio_err("waiting for vhost-user-blk completions"))?;
        for c in &self.completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            let slot = c.user_data;
            if !self.in_flight.get(slot).copied().unwrap_or(false) {
                bail!("vhost-user-blk completion for slot {slot}, which is not in flight");
            }
            self.in_flight[slot] = false;
            if c.ret != 0 {
                bail!(
                    "vhost-user-blk request failed: {}",
                    std::io::Error::from_raw_os_error(-c.ret)
                );
            }
            done.push(slot);
        }
        Ok(())
    }

    fn data(&self, slot: usize) -> &[u8] {
        // SAFETY: the slot's BLOCK bytes lie inside the region, which lives as long as
        // `self`; no request of the slot is in flight when the caller looks at it.
        unsafe { std::slice::from_raw_parts(self.buffer(slot), BLOCK) }
    }

    fn set_data(&mut self, slot: usize, data: &[u8]) {
        // SAFETY: as in `data`, and `&mut self` makes this the only reference.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.buffer(slot), BLOCK) };
        buf.copy_from_slice(data);
    }
}
