//! An NBD [`Client`] that keeps many requests in flight on one unix socket, as QEMU's NBD
//! client does (one connection per disk, requests pipelined, replies in any order): the
//! handshake is `tandem_tests::nbd_client`'s, the transmission phase is here (simple
//! replies; a request's cookie is its slot).
//!
//! Every reply is checked: magic, errno, and a cookie naming a slot that is in flight.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tandem_tests::nbd_client::{
    NbdClient, CMD_DISC, CMD_READ, CMD_WRITE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

use crate::load::{Client, Op, BLOCK};

/// Bytes of a request header.
const HEADER: usize = 28;

/// One NBD connection with `qd` request slots.
pub struct NbdPipeline {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Per slot: the request frame (header, then the data a write sends).
    frames: Vec<Vec<u8>>,
    /// Per slot: the data the last read returned.
    read: Vec<Vec<u8>>,
    /// Per slot: the operation in flight.
    in_flight: Vec<Option<Op>>,
}

impl NbdPipeline {
    /// Connect to `export` on `socket` for `qd` requests in flight.
    pub fn connect(socket: &Path, export: &str, qd: usize) -> Result<NbdPipeline> {
        let client = NbdClient::connect(socket, export, None)
            .with_context(|| format!("opening NBD export {export} on {}", socket.display()))?;
        if client.read_only() {
            bail!("NBD export {export} is read-only");
        }
        let writer = client.into_stream();
        let reader = BufReader::with_capacity(
            qd * (BLOCK + 16),
            writer.try_clone().context("cloning the NBD socket")?,
        );
        Ok(NbdPipeline {
            writer,
            reader,
            frames: vec![vec![0; HEADER + BLOCK]; qd],
            read: vec![vec![0; BLOCK]; qd],
            in_flight: vec![None; qd],
        })
    }
}

impl Client for NbdPipeline {
    fn submit(&mut self, slot: usize, op: Op, offset: u64) -> Result<()> {
        let command = match op {
            Op::Read => CMD_READ,
            Op::Write => CMD_WRITE,
        };
        let frame = &mut self.frames[slot];
        frame[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        frame[4..6].copy_from_slice(&0u16.to_be_bytes());
        frame[6..8].copy_from_slice(&command.to_be_bytes());
        frame[8..16].copy_from_slice(&(slot as u64).to_be_bytes());
        frame[16..24].copy_from_slice(&offset.to_be_bytes());
        frame[24..28].copy_from_slice(&(BLOCK as u32).to_be_bytes());
        let len = if op == Op::Write {
            HEADER + BLOCK
        } else {
            HEADER
        };
        self.writer
            .write_all(&frame[..len])
            .context("sending an NBD request")?;
        self.in_flight[slot] = Some(op);
        Ok(())
    }

    fn complete(&mut self, done: &mut Vec<usize>) -> Result<()> {
        let mut header = [0u8; 16];
        self.reader
            .read_exact(&mut header)
            .context("reading an NBD reply")?;
        let magic = u32::from_be_bytes(header[0..4].try_into()?);
        let errno = u32::from_be_bytes(header[4..8].try_into()?);
        let cookie = u64::from_be_bytes(header[8..16].try_into()?);
        if magic != SIMPLE_REPLY_MAGIC {
            bail!("NBD reply magic {magic:#x}");
        }
        let slot = usize::try_from(cookie)
            .ok()
            .filter(|&s| s < self.in_flight.len())
            .with_context(|| format!("NBD reply for unknown cookie {cookie}"))?;
        let op = self.in_flight[slot]
            .take()
            .with_context(|| format!("NBD reply for cookie {cookie}, which is not in flight"))?;
        if errno != 0 {
            bail!("NBD {op:?} failed with errno {errno}");
        }
        if op == Op::Read {
            self.reader
                .read_exact(&mut self.read[slot])
                .context("reading NBD read data")?;
        }
        done.push(slot);
        Ok(())
    }

    fn data(&self, slot: usize) -> &[u8] {
        &self.read[slot]
    }

    fn set_data(&mut self, slot: usize, data: &[u8]) {
        self.frames[slot][HEADER..].copy_from_slice(data);
    }
}

impl Drop for NbdPipeline {
    fn drop(&mut self) {
        // NBD_CMD_DISC (best effort): the server closes without a reply.
        let mut frame = [0u8; HEADER];
        frame[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        frame[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        let _ = self.writer.write_all(&frame);
    }
}
