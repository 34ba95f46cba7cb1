//! Replica comparison: all UpToDate replicas of a volume must hold identical bytes. Reads
//! each source in 1 MiB chunks, prints a crc32c per source and the first differing 4 KiB
//! block.

use serde_json::json;

use super::block::BLOCK_SIZE;

const CHUNK: usize = 1 << 20;

/// A replica's content, read sequentially.
pub trait ReplicaSource {
    /// Human name (path or socket:export).
    fn name(&self) -> String;
    fn size(&self) -> u64;
    /// Read `len` bytes at `offset` (within `size`).
    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, String>;
}

/// What comparison found.
#[derive(Debug, Clone)]
pub struct CompareReport {
    pub names: Vec<String>,
    pub sizes: Vec<u64>,
    pub checksums: Vec<u32>,
    /// Offset of the first 4 KiB block that differs between any two sources.
    pub first_difference: Option<u64>,
    pub differing_blocks: u64,
}

impl CompareReport {
    pub fn identical(&self) -> bool {
        self.first_difference.is_none() && self.sizes.windows(2).all(|w| w[0] == w[1])
    }
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "identical": self.identical(),
            "replicas": self.names.iter().zip(&self.sizes).zip(&self.checksums).map(|((n, s), c)| json!({
                "name": n, "size_bytes": s, "crc32c": format!("{c:08x}"),
            })).collect::<Vec<_>>(),
            "first_difference": self.first_difference,
            "differing_blocks": self.differing_blocks,
        })
    }
}

/// Compare sources over the smallest size (a size difference is itself a difference).
pub fn compare(sources: &mut [Box<dyn ReplicaSource>]) -> Result<CompareReport, String> {
    let sizes: Vec<u64> = sources.iter().map(|s| s.size()).collect();
    let names: Vec<String> = sources.iter().map(|s| s.name()).collect();
    let common = sizes.iter().copied().min().unwrap_or(0);
    let mut checksums = vec![0u32; sources.len()];
    let mut first_difference = None;
    let mut differing_blocks = 0;
    let mut offset = 0u64;
    while offset < common {
        let len = CHUNK.min((common - offset) as usize);
        let mut chunks = Vec::with_capacity(sources.len());
        for (i, source) in sources.iter_mut().enumerate() {
            let data = source.read_at(offset, len)?;
            if data.len() != len {
                return Err(format!("{}: short read at {offset}", names[i]));
            }
            checksums[i] = crc32c::crc32c_append(checksums[i], &data);
            chunks.push(data);
        }
        for start in (0..len).step_by(BLOCK_SIZE) {
            let end = (start + BLOCK_SIZE).min(len);
            let first = &chunks[0][start..end];
            if chunks[1..].iter().any(|c| &c[start..end] != first) {
                differing_blocks += 1;
                first_difference.get_or_insert(offset + start as u64);
            }
        }
        offset += len as u64;
    }
    Ok(CompareReport {
        names,
        sizes,
        checksums,
        first_difference,
        differing_blocks,
    })
}

/// A backing file read directly.
pub struct FileSource {
    pub path: std::path::PathBuf,
    file: std::fs::File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &std::path::Path) -> Result<FileSource, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let size = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        Ok(FileSource {
            path: path.to_path_buf(),
            file,
            size,
        })
    }
}

impl ReplicaSource for FileSource {
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| format!("{}: read at {offset}: {e}", self.path.display()))?;
        Ok(buf)
    }
}

/// An export read over NBD.
pub struct NbdSource {
    pub label: String,
    pub client: crate::nbd_client::NbdClient,
}

impl ReplicaSource for NbdSource {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn size(&self) -> u64 {
        self.client.size()
    }
    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        self.client
            .read(offset, len as u32)
            .map_err(|e| format!("{}: {}", self.label, super::workload::error_chain(&e)))
    }
}
