//! Fuzz a whole connection: the input is everything a client sends (after a valid prefix
//! half of the time), the server runs against an in-memory export. It must never panic
//! and must finish once the client's bytes end.
#![no_main]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use volume_driver::frontend::{
    ExportHandle, ExportInfo, ExportIoError, Exports, IoErrorKind, OpenError,
};
use volume_driver::nbd;

struct Mem {
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

struct One;

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

/// Client flags + NBD_OPT_GO "m": lets the fuzzer spend its time in transmission.
fn valid_prefix() -> Vec<u8> {
    let mut p = 1u32.to_be_bytes().to_vec();
    p.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    p.extend_from_slice(&7u32.to_be_bytes());
    p.extend_from_slice(&7u32.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes());
    p.push(b'm');
    p.extend_from_slice(&0u16.to_be_bytes());
    p
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = if mode & 1 == 1 {
        valid_prefix()
    } else {
        Vec::new()
    };
    input.extend_from_slice(rest);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let conn = tokio::spawn(nbd::serve_connection(
            sr,
            sw,
            Arc::new(One),
            shutdown,
            "fuzz",
        ));
        let drain = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut tokio::io::sink()).await;
        });
        let _ = cw.write_all(&input).await;
        let _ = cw.shutdown().await;
        drop(cw);
        tokio::time::timeout(std::time::Duration::from_secs(10), conn)
            .await
            .expect("connection did not finish after the client's bytes ended")
            .expect("connection task panicked");
        drain.abort();
    });
});
