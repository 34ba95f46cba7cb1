//! Test double for the vhost-user-blk unit tests: an in-memory [`Exports`] whose volumes
//! behave by name. `refused*` refuses every open with a reason, `stuck*` blocks in `open`
//! until [`DummyExports::unstick`], reads of a `held*` one wait until
//! [`DummyExports::release_reads`] (counted in [`DummyExports::reads_started`]), anything
//! else opens a 1 MiB volume whose byte `i` is
//! `i % 251`; closing a `slow*` one takes [`SLOW_CLOSE`] (as a demotion may). The list of
//! volumes is set by the test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use crate::frontend::{ExportHandle, ExportInfo, ExportIoError, Exports, IoErrorKind, OpenError};

/// Size of every dummy volume.
pub const SIZE: u64 = 1 << 20;
/// How long dropping the handle of a `slow*` volume takes.
pub const SLOW_CLOSE: std::time::Duration = std::time::Duration::from_millis(500);

pub struct DummyExports {
    listed: Mutex<Vec<String>>,
    opens: Mutex<HashMap<String, usize>>,
    unstuck: tokio::sync::watch::Sender<bool>,
    released: tokio::sync::watch::Sender<bool>,
    reads_started: Arc<AtomicUsize>,
}

impl DummyExports {
    pub fn new(listed: &[&str]) -> Arc<DummyExports> {
        Arc::new(DummyExports {
            listed: Mutex::new(listed.iter().map(|s| s.to_string()).collect()),
            opens: Mutex::default(),
            unstuck: tokio::sync::watch::channel(false).0,
            released: tokio::sync::watch::channel(false).0,
            reads_started: Arc::default(),
        })
    }

    /// Replace the volume list.
    pub fn set_list(&self, listed: &[&str]) {
        *self.listed.lock().unwrap() = listed.iter().map(|s| s.to_string()).collect();
    }

    /// How many times `name` was opened (or the open started).
    pub fn opens(&self, name: &str) -> usize {
        self.opens.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    /// Let the reads of `held*` volumes finish.
    pub fn release_reads(&self) {
        self.released.send_replace(true);
    }

    /// Reads of `held*` volumes started so far.
    pub fn reads_started(&self) -> usize {
        self.reads_started.load(Ordering::SeqCst)
    }

    /// Let every stuck open finish (refused).
    pub fn unstick(&self) {
        self.unstuck.send_replace(true);
    }
}

#[async_trait]
impl Exports for DummyExports {
    fn list(&self) -> Vec<String> {
        self.listed.lock().unwrap().clone()
    }

    async fn describe(&self, _name: &str) -> Result<ExportInfo, OpenError> {
        Ok(ExportInfo {
            size: SIZE,
            read_only: false,
        })
    }

    async fn open(&self, name: &str, _writable: bool) -> Result<Arc<dyn ExportHandle>, OpenError> {
        *self
            .opens
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default() += 1;
        if name.starts_with("refused") {
            return Err(OpenError::Refused(format!("{name} is Primary on hv9")));
        }
        if name.starts_with("stuck") {
            let mut unstuck = self.unstuck.subscribe();
            let _ = unstuck.wait_for(|done| *done).await;
            return Err(OpenError::Refused(format!("{name} was stuck")));
        }
        let data = (0..SIZE).map(|i| (i % 251) as u8).collect();
        let held = name
            .starts_with("held")
            .then(|| (self.released.subscribe(), Arc::clone(&self.reads_started)));
        Ok(Arc::new(DummyVolume {
            name: name.to_string(),
            data: Mutex::new(data),
            held,
        }))
    }
}

struct DummyVolume {
    name: String,
    data: Mutex<Vec<u8>>,
    /// `held*`: reads wait for this to turn true, counted in the counter.
    held: Option<(tokio::sync::watch::Receiver<bool>, Arc<AtomicUsize>)>,
}

impl Drop for DummyVolume {
    fn drop(&mut self) {
        if self.name.starts_with("slow") {
            std::thread::sleep(SLOW_CLOSE);
        }
    }
}

fn range(offset: u64, len: u64) -> Result<std::ops::Range<usize>, ExportIoError> {
    match offset.checked_add(len) {
        Some(end) if end <= SIZE => Ok(offset as usize..end as usize),
        _ => Err(ExportIoError::new(IoErrorKind::Invalid, "out of range")),
    }
}

#[async_trait]
impl ExportHandle for DummyVolume {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportIoError> {
        if let Some((released, started)) = &self.held {
            started.fetch_add(1, Ordering::SeqCst);
            let _ = released.clone().wait_for(|done| *done).await;
        }
        let r = range(offset, u64::from(len))?;
        Ok(Bytes::copy_from_slice(&self.data.lock().unwrap()[r]))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportIoError> {
        let r = range(offset, data.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), ExportIoError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), ExportIoError> {
        self.write_zeroes(offset, len, true).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<(), ExportIoError> {
        let r = range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
}
