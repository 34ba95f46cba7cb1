//! The checker against Tandem's own NBD server (`volume_driver::nbd`) over a deliberately
//! broken [`ExportHandle`]: one that acknowledges but drops every k-th write, one that
//! applies an acknowledged write late, over a newer one. `tandem-check verify` must fail
//! both (exit 1, lost/stale counts) and pass the honest handle. Issue 5 acceptance, with
//! the real server in the loop (tests/checker.rs does the same with a small fake server).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use volume_driver::frontend::{
    ExportHandle, ExportInfo, ExportIoError, Exports, IoErrorKind, OpenError,
};

const CHECK: &str = env!("CARGO_BIN_EXE_tandem-check");
const SIZE: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lie {
    None,
    DropEveryNth(u64),
    ReorderEveryNth(u64),
}

struct LyingHandle {
    lie: Lie,
    data: Mutex<Vec<u8>>,
    writes: AtomicU64,
    held: Mutex<HashMap<u64, Bytes>>,
}

impl LyingHandle {
    fn store(&self, offset: u64, data: &[u8]) {
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
    }
    fn check(&self, offset: u64, len: u64) -> Result<(), ExportIoError> {
        if offset.checked_add(len).is_none_or(|end| end > SIZE) {
            return Err(ExportIoError::new(IoErrorKind::Invalid, "out of range"));
        }
        Ok(())
    }
}

#[async_trait]
impl ExportHandle for LyingHandle {
    fn name(&self) -> &str {
        "vol"
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportIoError> {
        self.check(offset, u64::from(len))?;
        let data = self.data.lock().unwrap();
        Ok(Bytes::copy_from_slice(
            &data[offset as usize..offset as usize + len as usize],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportIoError> {
        self.check(offset, data.len() as u64)?;
        let count = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        match self.lie {
            Lie::DropEveryNth(n) if count.is_multiple_of(n) => {}
            Lie::ReorderEveryNth(n) => {
                let held = self.held.lock().unwrap().remove(&offset);
                if count.is_multiple_of(n) && held.is_none() {
                    self.held.lock().unwrap().insert(offset, data);
                    return Ok(());
                }
                self.store(offset, &data);
                if let Some(older) = held {
                    self.store(offset, &older);
                }
            }
            _ => self.store(offset, &data),
        }
        Ok(())
    }
    async fn flush(&self) -> Result<(), ExportIoError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), ExportIoError> {
        self.write_zeroes(offset, len, true).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_unmap: bool,
    ) -> Result<(), ExportIoError> {
        self.check(offset, len)?;
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

struct OneExport(Arc<LyingHandle>);

#[async_trait]
impl Exports for OneExport {
    fn list(&self) -> Vec<String> {
        vec!["vol".into()]
    }
    async fn describe(&self, name: &str) -> Result<ExportInfo, OpenError> {
        if name == "vol" {
            Ok(ExportInfo {
                size: SIZE,
                read_only: false,
            })
        } else {
            Err(OpenError::NotFound(name.into()))
        }
    }
    async fn open(&self, name: &str, _writable: bool) -> Result<Arc<dyn ExportHandle>, OpenError> {
        if name == "vol" {
            Ok(self.0.clone())
        } else {
            Err(OpenError::NotFound(name.into()))
        }
    }
}

/// Serve one lying export on `socket` with the real NBD server; returns the runtime (drop
/// it to stop).
fn serve(socket: &Path, lie: Lie) -> tokio::runtime::Runtime {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = Arc::new(LyingHandle {
        lie,
        data: Mutex::new(vec![0; SIZE as usize]),
        writes: AtomicU64::new(0),
        held: Mutex::new(HashMap::new()),
    });
    let listener = runtime
        .block_on(async { volume_driver::nbd::bind_unix(socket) })
        .unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    runtime.spawn(async move {
        let _stop = stop;
        volume_driver::nbd::serve_unix(listener, Arc::new(OneExport(handle)), shutdown).await
    });
    runtime
}

fn run_and_verify(lie: Lie) -> (Option<i32>, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let log = dir.path().join("run.log");
    let _server = serve(&socket, lie);
    let (socket, log) = (socket.to_str().unwrap(), log.to_str().unwrap());
    let out = Command::new(CHECK)
        .args([
            "write", "--socket", socket, "--export", "vol", "--blocks", "64", "--log", log,
            "--writes", "2000", "--seed", "3",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(CHECK)
        .args(["verify", "--log", log, "--socket", socket, "--json"])
        .output()
        .unwrap();
    (
        out.status.code(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

#[test]
fn honest_export_passes_through_the_real_server() {
    let (code, report) = run_and_verify(Lie::None);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["writes_acknowledged"], 2000);
}

#[test]
fn export_dropping_acknowledged_writes_fails() {
    let (code, report) = run_and_verify(Lie::DropEveryNth(7));
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report["lost"].as_u64().unwrap() + report["stale"].as_u64().unwrap() > 0,
        "{report}"
    );
}

#[test]
fn export_reordering_acknowledged_writes_fails() {
    let (code, report) = run_and_verify(Lie::ReorderEveryNth(5));
    assert_eq!(code, Some(1), "{report}");
    assert!(report["stale"].as_u64().unwrap() > 0, "{report}");
}
