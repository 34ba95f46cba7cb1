//! Online verify (`tandem volume verify`): compare this replica with a connected peer
//! while the volume is in use, block by block, without repairing anything (ref `drbd.md`
//! §3 "Online verify").
//!
//! ```text
//!  source (run_verify)                                   peer (datapath::run_secondary)
//!   for each chunk of the volume, in order, rate-limited:
//!    lock_range (Primary) + read, sha256 per 4 KiB block
//!    Digest{id,off,len,digests} -----------------------> ordered item: read, compare
//!    <------------------------------------------------- DigestReply{id, differing mask}
//!    unlock; differing blocks -> bitmap.set (out of sync, repaired by the next resync)
//! ```
//!
//! **No false differences under concurrent writes.** A block written during the compare
//! must not be reported as differing. The chunk is read and compared under the Primary's
//! range gate ([`crate::datapath::Primary::lock_range`]), and the peer hashes its copy as
//! an ordered item of its apply pipeline (after every write the Primary issued before the
//! digest, in epoch order): both sides hash the same point of the write history, exactly
//! as for a resync chunk (see [`crate::resync`]). With [`SourceIo::Device`] the engine
//! must run verify only where no application writes reach either side (no Primary), or
//! results may include false differences.
//!
//! Marking: differing blocks are set in `bitmap` (this node's bitmap for the peer), so the
//! next resync from this side repairs them (after a disconnect/reconnect, or when the
//! engine starts one; DRBD's `invalidate-remote --reset-bitmap=no`). Nothing is cleared:
//! a verify never hides a difference found earlier.

use std::sync::Arc;

use tokio::task::JoinSet;

use crate::resync::rate::RateController;
use crate::resync::source::{compare_with_peer, mask_runs};
use crate::resync::{
    PeerChannel, ResyncBitmap, ResyncConfig, ResyncError, ResyncProgress, Session, SourceIo,
};

/// What a verify found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Bytes compared (the whole volume when the verify completed).
    pub checked_bytes: u64,
    /// 4 KiB blocks that differ.
    pub differing_blocks: u64,
    /// Bytes of those blocks (the last block of the volume may be partial).
    pub differing_bytes: u64,
}

/// Compare the whole volume with the peer at the other end of `peer`; mark differing
/// blocks out of sync in `bitmap` and count them. `progress` shows checked/total bytes
/// for status. Errors are those of resync ([`ResyncError`]): the same session machinery.
pub async fn run_verify(
    io: SourceIo,
    peer: PeerChannel,
    bitmap: Arc<dyn ResyncBitmap>,
    cfg: &ResyncConfig,
    progress: Arc<ResyncProgress>,
) -> Result<VerifyReport, ResyncError> {
    let session = Arc::new(Session::new(peer, cfg.reply_timeout));
    let size = io.device().size();
    let chunk = cfg.chunk();
    let max_inflight = cfg.max_inflight_chunks.max(1);
    let mut rate = RateController::new(cfg.max_rate_bytes_per_sec, cfg.min_rate_bytes_per_sec)
        .plan_ahead(cfg.plan_ahead);
    progress.start(size);
    let mut report = VerifyReport::default();
    let mut tasks: JoinSet<Result<VerifyReport, ResyncError>> = JoinSet::new();
    let mut offset = 0;
    while offset < size {
        let len = chunk.min(size - offset);
        while tasks.len() >= max_inflight {
            if let Some(r) = tasks.join_next().await {
                add(&mut report, r)?;
            }
        }
        rate.acquire(len, io.app_bytes()).await;
        let (io, session, bitmap, progress) = (
            io.clone(),
            session.clone(),
            bitmap.clone(),
            progress.clone(),
        );
        tasks.spawn(async move {
            let mask = compare_with_peer(&io, &session, offset, len).await?;
            let mut found = VerifyReport {
                checked_bytes: len,
                ..VerifyReport::default()
            };
            for (run_off, run_len) in mask_runs(&mask, len) {
                tracing::warn!(
                    offset = offset + run_off,
                    len = run_len,
                    "online verify: blocks differ from the peer; marked out of sync"
                );
                bitmap.set(offset + run_off, run_len);
                found.differing_blocks += run_len.div_ceil(crate::bitmap::BLOCK_SIZE);
                found.differing_bytes += run_len;
            }
            progress.add_done(len, 0, 0);
            Ok(found)
        });
        offset += len;
    }
    while let Some(r) = tasks.join_next().await {
        add(&mut report, r)?;
    }
    let bm = bitmap.clone();
    tokio::task::spawn_blocking(move || bm.persist())
        .await
        .map_err(ResyncError::LocalTask)?
        .map_err(ResyncError::Persist)?;
    tracing::info!(
        checked = report.checked_bytes,
        differing_blocks = report.differing_blocks,
        "online verify finished"
    );
    Ok(report)
}

fn add(
    report: &mut VerifyReport,
    r: Result<Result<VerifyReport, ResyncError>, tokio::task::JoinError>,
) -> Result<(), ResyncError> {
    let found = r.map_err(ResyncError::LocalTask)??;
    report.checked_bytes += found.checked_bytes;
    report.differing_blocks += found.differing_blocks;
    report.differing_bytes += found.differing_bytes;
    Ok(())
}
