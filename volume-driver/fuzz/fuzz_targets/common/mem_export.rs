//! The in-memory export the connection fuzz targets serve: volume "m" (64 KiB), "r"
//! (refused on open), anything else not found.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use volume_driver::frontend::{
    ExportHandle, ExportInfo, ExportIoError, Exports, IoErrorKind, OpenError,
};

pub struct Mem {
    data: Mutex<Vec<u8>>,
}

fn check(len: usize, offset: u64, n: u64) -> Result<std::ops::Range<usize>, ExportIoError> {
    match offset.checked_add(n) {
        Some(end) if end <= len as u64 => Ok(offset as usize..end as usize),
        _ => Err(ExportIoError::new(IoErrorKind::Invalid, "out of range")),
    }
}

#[async_trait]
impl ExportHandle for Mem {
    fn name(&self) -> &str {
        "m"
    }
    fn size(&self) -> u64 {
        64 << 10
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportIoError> {
        let d = self.data.lock().unwrap();
        let r = check(d.len(), offset, u64::from(len))?;
        Ok(Bytes::copy_from_slice(&d[r]))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportIoError> {
        let mut d = self.data.lock().unwrap();
        let r = check(d.len(), offset, data.len() as u64)?;
        d[r].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), ExportIoError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), ExportIoError> {
        self.write_zeroes(offset, len, true).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<(), ExportIoError> {
        let mut d = self.data.lock().unwrap();
        let r = check(d.len(), offset, len)?;
        d[r].fill(0);
        Ok(())
    }
}

pub struct One;

#[async_trait]
impl Exports for One {
    fn list(&self) -> Vec<String> {
        vec!["m".into()]
    }
    async fn describe(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let handle = self.open(name, false).await?;
        Ok(ExportInfo {
            size: handle.size(),
            read_only: handle.read_only(),
        })
    }
    async fn open(&self, name: &str, _w: bool) -> Result<Arc<dyn ExportHandle>, OpenError> {
        match name {
            "m" => Ok(Arc::new(Mem {
                data: Mutex::new(vec![0; 64 << 10]),
            })),
            "r" => Err(OpenError::Refused("no".into())),
            _ => Err(OpenError::NotFound(name.into())),
        }
    }
}
