//! The SyncSource's loop: walk the target's bitmap in block order, chunk by chunk, and
//! hand each chunk to the target (data, or digests first), clearing bits on acknowledgement.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::task::JoinSet;

use super::proto::{self, ResyncMsg};
use super::rate::RateController;
use super::{
    PeerChannel, ResyncBitmap, ResyncConfig, ResyncError, ResyncOutcome, ResyncProgress, Session,
    SourceIo,
};
use crate::bitmap::BLOCK_SIZE;
use crate::failure_log::error_chain;

/// A pass that leaves bits set starts another; after this many the resync gives up (the
/// target keeps failing writes, or something keeps dirtying its bitmap).
pub const MAX_PASSES: u32 = 16;

struct Ctx {
    io: SourceIo,
    session: Session,
    bitmap: Arc<dyn ResyncBitmap>,
    progress: Arc<ResyncProgress>,
    checksums: bool,
}

/// Resync the target at the other end of `peer` from this replica: every range set in
/// `bitmap` (the target's out-of-sync bits, already merged with the target's own) is sent
/// and cleared once the target acknowledged it; then the target is told the resync is
/// done and `Ok` means it made everything durable and recorded the end (see the module
/// doc for what the engine does before and after). On `Err` the bitmap still holds what
/// was not transferred (persisted, best effort), so calling this again resumes.
pub async fn run_resync_source(
    io: SourceIo,
    peer: PeerChannel,
    bitmap: Arc<dyn ResyncBitmap>,
    cfg: &ResyncConfig,
    progress: Arc<ResyncProgress>,
) -> Result<ResyncOutcome, ResyncError> {
    let ctx = Arc::new(Ctx {
        io,
        session: Session::new(peer, cfg.reply_timeout),
        bitmap,
        progress,
        checksums: cfg.checksums,
    });
    let result = walk(&ctx, cfg).await;
    if result.is_err() {
        if let Err(e) = persist(&ctx.bitmap).await {
            tracing::warn!(error = %error_chain(&e), "could not persist resync progress after a failure");
        }
    }
    let outcome = result?;
    persist(&ctx.bitmap).await?;
    let reply = ctx
        .session
        .finish(ResyncMsg::Done {
            sent_bytes: outcome.sent_bytes,
            skipped_bytes: outcome.skipped_bytes,
        })
        .await?;
    match reply {
        ResyncMsg::DoneAck { ok: true, .. } => {}
        ResyncMsg::DoneAck { ok: false, message } => {
            return Err(ResyncError::TargetFinish(message));
        }
        other => return Err(unexpected("resync end", &other)),
    }
    tracing::info!(
        total = outcome.total_bytes,
        sent = outcome.sent_bytes,
        skipped = outcome.skipped_bytes,
        passes = outcome.passes,
        "resync finished"
    );
    Ok(outcome)
}

async fn walk(ctx: &Arc<Ctx>, cfg: &ResyncConfig) -> Result<ResyncOutcome, ResyncError> {
    let chunk = cfg.chunk();
    let max_inflight = cfg.max_inflight_chunks.max(1);
    let mut rate = RateController::new(cfg.max_rate_bytes_per_sec, cfg.min_rate_bytes_per_sec)
        .plan_ahead(cfg.plan_ahead);
    let mut outcome = ResyncOutcome {
        total_bytes: ctx.bitmap.dirty_bytes(),
        ..ResyncOutcome::default()
    };
    ctx.progress.start(outcome.total_bytes);
    let mut last_persist = Instant::now();
    loop {
        outcome.passes += 1;
        let mut cursor = 0;
        let mut tasks: JoinSet<Result<ChunkDone, ResyncError>> = JoinSet::new();
        while let Some(&(offset, len)) = ctx.bitmap.runs_from(cursor, chunk, 1).first() {
            cursor = offset + len;
            while tasks.len() >= max_inflight {
                if let Some(r) = tasks.join_next().await {
                    account(&mut outcome, r)?;
                }
            }
            if let Some(limits) = ctx.progress.take_limits() {
                rate.set_limits(limits);
            }
            rate.acquire(len, ctx.io.app_bytes()).await;
            tasks.spawn(resync_chunk(ctx.clone(), offset, len));
            if last_persist.elapsed() >= cfg.persist_interval {
                persist(&ctx.bitmap).await?;
                last_persist = Instant::now();
            }
        }
        while let Some(r) = tasks.join_next().await {
            account(&mut outcome, r)?;
        }
        let remaining = ctx.bitmap.dirty_bytes();
        if remaining == 0 {
            return Ok(outcome);
        }
        if outcome.passes >= MAX_PASSES {
            return Err(ResyncError::NotConverging {
                remaining_bytes: remaining,
                passes: outcome.passes,
            });
        }
        tracing::debug!(remaining, "bits were set during the pass; another pass");
        ctx.progress.add_total(remaining);
        outcome.total_bytes += remaining;
    }
}

struct ChunkDone {
    len: u64,
    sent: u64,
    skipped: u64,
    zeroes: u64,
}

fn account(
    outcome: &mut ResyncOutcome,
    r: Result<Result<ChunkDone, ResyncError>, tokio::task::JoinError>,
) -> Result<(), ResyncError> {
    let done = r.map_err(ResyncError::LocalTask)??;
    outcome.done_bytes += done.len;
    outcome.sent_bytes += done.sent;
    outcome.skipped_bytes += done.skipped;
    outcome.zero_bytes += done.zeroes;
    Ok(())
}

async fn persist(bitmap: &Arc<dyn ResyncBitmap>) -> Result<(), ResyncError> {
    let bm = bitmap.clone();
    tokio::task::spawn_blocking(move || bm.persist())
        .await
        .map_err(ResyncError::LocalTask)?
        .map_err(ResyncError::Persist)
}

/// One chunk, atomic against overlapping application writes on a Primary source: the
/// range lock is held from the read until the target answered and the bits are cleared.
async fn resync_chunk(ctx: Arc<Ctx>, offset: u64, len: u64) -> Result<ChunkDone, ResyncError> {
    let (_range, data) = ctx.io.lock_and_read(offset, len).await?;
    let (sent, skipped, zeroes) = if ctx.checksums {
        let mask = compare_data(&ctx.session, offset, data.clone()).await?;
        let (mut sent, mut zeroes) = (0, 0);
        for (run_off, run_len) in mask_runs(&mask, len) {
            let start = run_off as usize;
            let piece = data.slice(start..start + run_len as usize);
            zeroes += send_data(&ctx, offset + run_off, piece).await?;
            sent += run_len;
        }
        (sent, len - sent, zeroes)
    } else {
        let zeroes = send_data(&ctx, offset, data).await?;
        (len, 0, zeroes)
    };
    ctx.bitmap.clear(offset, len);
    ctx.progress.add_done(len, sent, skipped);
    Ok(ChunkDone {
        len,
        sent,
        skipped,
        zeroes,
    })
}

/// Send one range to the target; a range of zeroes goes as Zeroes (no data on the link,
/// and a thin target stays thin). Returns the bytes sent as zeroes.
async fn send_data(ctx: &Ctx, offset: u64, data: Bytes) -> Result<u64, ResyncError> {
    let len = data.len() as u64;
    let id = ctx.session.next_id();
    let zeroes = data.iter().all(|&b| b == 0);
    let msg = if zeroes {
        ResyncMsg::Zeroes { id, offset, len }
    } else {
        ResyncMsg::Data { id, offset, data }
    };
    // In flight on the link until the target answers (or the request fails).
    let _in_flight = crate::stats::hold(&ctx.session.in_flight().resync, len);
    let reply = ctx.session.request(id, msg, "resync write", offset).await?;
    match reply {
        ResyncMsg::DataAck { written: true, .. } => Ok(if zeroes { len } else { 0 }),
        ResyncMsg::DataAck { written: false, .. } => Err(ResyncError::PeerWrite { offset, len }),
        other => Err(unexpected("resync write", &other)),
    }
}

/// Send the per-block digests of `data` (read at `offset`) and return the target's mask
/// of differing blocks. Shared with online verify.
pub(crate) async fn compare_with_peer(
    io: &SourceIo,
    session: &Session,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, ResyncError> {
    let (_range, data) = io.lock_and_read(offset, len).await?;
    compare_data(session, offset, data).await
}

async fn compare_data(session: &Session, offset: u64, data: Bytes) -> Result<Vec<u8>, ResyncError> {
    let len = data.len() as u64;
    let digests = tokio::task::spawn_blocking(move || proto::block_digests(&data))
        .await
        .map_err(ResyncError::LocalTask)?;
    let id = session.next_id();
    let msg = ResyncMsg::Digest {
        id,
        offset,
        len: u32::try_from(len).unwrap_or(u32::MAX),
        digests: Bytes::from(digests),
    };
    match session.request(id, msg, "block compare", offset).await? {
        ResyncMsg::DigestReply { ok: true, mask, .. } => {
            if mask.len() != proto::blocks_in(len).div_ceil(8) {
                return Err(ResyncError::Unexpected(format!(
                    "compare reply for {len} bytes has a {}-byte mask",
                    mask.len()
                )));
            }
            Ok(mask.to_vec())
        }
        ResyncMsg::DigestReply { ok: false, .. } => Err(ResyncError::PeerRead { offset, len }),
        other => Err(unexpected("block compare", &other)),
    }
}

/// Runs `(offset within the range, len)` of differing blocks in a range of `len` bytes.
pub(crate) fn mask_runs(mask: &[u8], len: u64) -> Vec<(u64, u64)> {
    let blocks = proto::blocks_in(len);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in 0..blocks {
        if !proto::mask_bit(mask, i) {
            continue;
        }
        let start = i as u64 * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(len);
        match runs.last_mut() {
            Some((o, l)) if *o + *l == start => *l = end - *o,
            _ => runs.push((start, end - start)),
        }
    }
    runs
}

fn unexpected(op: &str, m: &ResyncMsg) -> ResyncError {
    let what = match m {
        ResyncMsg::Data { .. } => "Data",
        ResyncMsg::DataAck { .. } => "DataAck",
        ResyncMsg::Digest { .. } => "Digest",
        ResyncMsg::DigestReply { .. } => "DigestReply",
        ResyncMsg::Done { .. } => "Done",
        ResyncMsg::DoneAck { .. } => "DoneAck",
        ResyncMsg::Zeroes { .. } => "Zeroes",
    };
    ResyncError::Unexpected(format!("{what} in answer to a {op}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_runs_merge_adjacent_blocks_and_clip_the_last() {
        // blocks 0,1 and 3 of a 3.5-block range
        let mask = [0b1011u8];
        assert_eq!(
            mask_runs(&mask, 3 * 4096 + 2048),
            vec![(0, 8192), (3 * 4096, 2048)]
        );
        assert!(mask_runs(&[0], 4096).is_empty());
    }
}
