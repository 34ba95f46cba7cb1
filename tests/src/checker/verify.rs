//! The acknowledged-write rule, applied to what a replica holds.
//!
//! For each block the log mentions, let `required` be its last acknowledged version (with
//! `--durable-only`: its last version made durable by FUA or a later FLUSH). The block must
//! hold `required`, or a version attempted after it (a write whose outcome was unknown or
//! failed may have landed). Everything else is a violation:
//!
//! | block holds                                   | verdict                          |
//! |-----------------------------------------------|----------------------------------|
//! | `required` or a later attempted version        | ok                               |
//! | nothing required, zeroes or any attempted one  | ok                               |
//! | an older version of this run                   | **stale** (an ack was undone)    |
//! | zeroes or another run's data, yet `required`   | **lost**                         |
//! | bad checksum, wrong block index, unknown version | **garbage**                    |
//! | bad checksum, but an unacknowledged attempt came after `required` | torn (tolerated: NBD leaves a failed write's range undefined) |
//!
//! When the writer died with its host ([`History::writer_crashed`]), the log may have lost
//! its last lines: a version of this run newer than every logged attempt of the block is
//! then accepted and counted as *unlogged*; everything else is judged as above.

use serde_json::json;

use super::block::{decode, Decoded, BLOCK_SIZE};
use super::log::{BlockHistory, History};

/// What verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub blocks_checked: u64,
    pub writes_attempted: u64,
    pub writes_acknowledged: u64,
    pub writes_failed: u64,
    pub ok: u64,
    pub lost: u64,
    pub stale: u64,
    pub garbage: u64,
    pub torn_tolerated: u64,
    /// Newer versions than the log knows, accepted because the writer crashed.
    pub unlogged: u64,
    /// Human descriptions of the first violations (at most 20).
    pub violations: Vec<String>,
}

impl VerifyReport {
    /// No acknowledged write lost, none undone, no garbage.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.stale == 0 && self.garbage == 0
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "passed": self.passed(),
            "blocks_checked": self.blocks_checked,
            "writes_attempted": self.writes_attempted,
            "writes_acknowledged": self.writes_acknowledged,
            "writes_failed": self.writes_failed,
            "ok": self.ok,
            "lost": self.lost,
            "stale": self.stale,
            "garbage": self.garbage,
            "torn_tolerated": self.torn_tolerated,
            "unlogged": self.unlogged,
            "violations": self.violations,
        })
    }

    fn violation(&mut self, text: String) {
        if self.violations.len() < 20 {
            self.violations.push(text);
        }
    }
}

/// The verdict for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Lost,
    Stale,
    Garbage,
    TornTolerated,
}

/// Judge one block's content against its history.
pub fn judge_block(
    run_id: u64,
    block: u64,
    history: &BlockHistory,
    durable_only: bool,
    data: &[u8],
) -> (Verdict, String) {
    let required = if durable_only {
        history.last_durable
    } else {
        history.last_acked
    };
    // A write after the required one whose outcome is unknown, failed, or (durable-only)
    // not yet durable: it may have landed torn.
    let later_attempt = history.attempted.iter().any(|v| Some(*v) > required);
    let describe = |what: &str| {
        format!(
            "block {block}: {what} (required version {}, attempted {:?})",
            required.map_or("none".to_string(), |v| v.to_string()),
            history.attempted
        )
    };
    match decode(data) {
        Decoded::Zero if required.is_some() => (Verdict::Lost, describe("reads as zeroes")),
        Decoded::Zero => (Verdict::Ok, String::new()),
        Decoded::Garbage(why) if later_attempt => (Verdict::TornTolerated, describe(&why)),
        Decoded::Garbage(why) => (Verdict::Garbage, describe(&why)),
        Decoded::Tagged(tag) if tag.block != block => (
            Verdict::Garbage,
            describe(&format!(
                "holds block {}'s data (misdirected write)",
                tag.block
            )),
        ),
        Decoded::Tagged(tag) if tag.run_id != run_id => {
            if required.is_some() {
                (
                    Verdict::Lost,
                    describe(&format!("holds data of another run {:016x}", tag.run_id)),
                )
            } else {
                (Verdict::Ok, String::new())
            }
        }
        Decoded::Tagged(tag) => {
            let attempted = history.attempted.contains(&tag.version);
            match required {
                Some(req) if tag.version < req => (
                    Verdict::Stale,
                    describe(&format!("holds older version {}", tag.version)),
                ),
                _ if attempted => (Verdict::Ok, String::new()),
                _ => (
                    Verdict::Garbage,
                    describe(&format!(
                        "holds version {} that was never written",
                        tag.version
                    )),
                ),
            }
        }
    }
}

/// Check every block in `history` with `read_block(index)` returning its `BLOCK_SIZE` bytes.
pub fn verify<E: std::fmt::Display>(
    history: &History,
    durable_only: bool,
    mut read_block: impl FnMut(u64) -> Result<Vec<u8>, E>,
) -> Result<VerifyReport, String> {
    let mut report = VerifyReport {
        writes_attempted: history.writes_attempted,
        writes_acknowledged: history.writes_acknowledged,
        writes_failed: history.writes_failed,
        ..VerifyReport::default()
    };
    for (block, block_history) in &history.blocks {
        let data = read_block(*block).map_err(|e| format!("reading block {block}: {e}"))?;
        if data.len() != BLOCK_SIZE {
            return Err(format!("reading block {block}: got {} bytes", data.len()));
        }
        report.blocks_checked += 1;
        if history.writer_crashed
            && is_unlogged_later_version(history, *block, block_history, &data)
        {
            report.unlogged += 1;
            continue;
        }
        let (verdict, text) = judge_block(
            history.header.run_id,
            *block,
            block_history,
            durable_only,
            &data,
        );
        match verdict {
            Verdict::Ok => report.ok += 1,
            Verdict::TornTolerated => report.torn_tolerated += 1,
            Verdict::Lost => {
                report.lost += 1;
                report.violation(format!("LOST {text}"));
            }
            Verdict::Stale => {
                report.stale += 1;
                report.violation(format!("STALE {text}"));
            }
            Verdict::Garbage => {
                report.garbage += 1;
                report.violation(format!("GARBAGE {text}"));
            }
        }
    }
    Ok(report)
}

/// This run's data for this block, at a version above every logged attempt of the block.
fn is_unlogged_later_version(
    history: &History,
    block: u64,
    block_history: &BlockHistory,
    data: &[u8],
) -> bool {
    let newest = block_history.attempted.iter().max().copied().unwrap_or(0);
    matches!(decode(data), Decoded::Tagged(tag)
        if tag.run_id == history.header.run_id && tag.block == block && tag.version > newest)
}

#[cfg(test)]
mod tests {
    use super::super::block::{encode, BlockTag};
    use super::*;

    fn hist(attempted: &[u64], acked: Option<u64>) -> BlockHistory {
        BlockHistory {
            attempted: attempted.to_vec(),
            last_acked: acked,
            last_durable: None,
        }
    }

    fn data(version: u64) -> Vec<u8> {
        encode(&BlockTag {
            run_id: 1,
            block: 5,
            version,
        })
    }

    #[test]
    fn verdicts_follow_the_rule_table() {
        let h = hist(&[1, 2, 3], Some(2));
        assert_eq!(judge_block(1, 5, &h, false, &data(2)).0, Verdict::Ok);
        assert_eq!(judge_block(1, 5, &h, false, &data(3)).0, Verdict::Ok);
        assert_eq!(judge_block(1, 5, &h, false, &data(1)).0, Verdict::Stale);
        assert_eq!(judge_block(1, 5, &h, false, &data(4)).0, Verdict::Garbage);
        assert_eq!(
            judge_block(1, 5, &h, false, &[0; BLOCK_SIZE]).0,
            Verdict::Lost
        );
        assert_eq!(judge_block(2, 5, &h, false, &data(2)).0, Verdict::Lost);
        assert_eq!(judge_block(1, 6, &h, false, &data(2)).0, Verdict::Garbage);
        let mut torn = data(3);
        torn[3000..].copy_from_slice(&data(2)[3000..]);
        assert_eq!(
            judge_block(1, 5, &h, false, &torn).0,
            Verdict::TornTolerated
        );
        // Last attempt acknowledged: a torn block is garbage.
        let h = hist(&[1, 2], Some(2));
        assert_eq!(judge_block(1, 5, &h, false, &torn).0, Verdict::Garbage);
        // Nothing acknowledged: zeroes are fine.
        let h = hist(&[1], None);
        assert_eq!(
            judge_block(1, 5, &h, false, &[0; BLOCK_SIZE]).0,
            Verdict::Ok
        );
        // Durable-only: an unflushed ack is not required.
        let h = BlockHistory {
            attempted: vec![1, 2],
            last_acked: Some(2),
            last_durable: Some(1),
        };
        assert_eq!(judge_block(1, 5, &h, true, &data(1)).0, Verdict::Ok);
        assert_eq!(judge_block(1, 5, &h, false, &data(1)).0, Verdict::Stale);
    }

    #[test]
    fn a_crashed_writer_allows_versions_newer_than_its_log() {
        use super::super::log::LogHeader;
        let mut history = History {
            header: LogHeader {
                run_id: 1,
                export: "v".into(),
                blocks: 8,
                seed: 0,
            },
            blocks: [(5, hist(&[1, 2], Some(2)))].into_iter().collect(),
            writes_attempted: 2,
            writes_acknowledged: 1,
            writes_failed: 0,
            flushes: 0,
            writer_crashed: false,
        };
        let read = |_| Ok::<_, String>(data(7));
        let report = verify(&history, false, read).unwrap();
        assert_eq!((report.garbage, report.unlogged), (1, 0));
        history.writer_crashed = true;
        let report = verify(&history, false, read).unwrap();
        assert!(report.passed(), "{report:?}");
        assert_eq!(report.unlogged, 1);
        // Older than required stays a violation.
        let report = verify(&history, false, |_| Ok::<_, String>(data(1))).unwrap();
        assert_eq!(report.stale, 1);
    }
}
