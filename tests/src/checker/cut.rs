//! Is a snapshot a consistent cut of a write workload? Compares the block versions in an
//! image with two prefixes of the workload log, taken just before the snapshot command
//! started and just after it returned: every write acknowledged before it started must be
//! in the image (or a later version), and no version attempted only after it returned.

use std::collections::BTreeMap;

use super::block::{decode, Decoded};

/// Per block: the last acknowledged (`K`) and the highest attempted (`A`) version in the
/// complete lines of `log[..len]`.
pub fn log_prefix(log: &str, len: usize) -> (BTreeMap<u64, u64>, BTreeMap<u64, u64>) {
    let len = len.min(log.len());
    let complete = &log[..log[..len].rfind('\n').map_or(0, |i| i + 1)];
    let (mut acked, mut attempted) = (BTreeMap::new(), BTreeMap::new());
    for line in complete.lines() {
        let mut words = line.split_whitespace();
        let (kind, block, version) = (words.next(), words.next(), words.next());
        let (Some(block), Some(version)) = (
            block.and_then(|b| b.parse::<u64>().ok()),
            version.and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        let map = match kind {
            Some("K") => &mut acked,
            Some("A") => &mut attempted,
            _ => continue,
        };
        let v = map.entry(block).or_insert(version);
        *v = (*v).max(version);
    }
    (acked, attempted)
}

/// The version of each of the first `blocks` 4 KiB blocks of `image` (never-written blocks
/// are absent); a garbage block or one naming another block is an error.
pub fn versions(image: &[u8], blocks: u64) -> Result<BTreeMap<u64, u64>, String> {
    let mut found = BTreeMap::new();
    for (i, block) in image.chunks(4096).take(blocks as usize).enumerate() {
        match decode(block) {
            Decoded::Zero => {}
            Decoded::Tagged(tag) if tag.block == i as u64 => {
                found.insert(i as u64, tag.version);
            }
            Decoded::Tagged(tag) => return Err(format!("block {i} holds block {}", tag.block)),
            Decoded::Garbage(why) => return Err(format!("block {i} is garbage: {why}")),
        }
    }
    Ok(found)
}

/// Check the cut (see the module doc); returns how many blocks were acknowledged before.
pub fn check_cut(
    image: &[u8],
    blocks: u64,
    log: &str,
    before: usize,
    after: usize,
) -> Result<usize, String> {
    let snap = versions(image, blocks)?;
    let (acked_before, _) = log_prefix(log, before);
    let (_, attempted_by_end) = log_prefix(log, after);
    for (block, acked) in &acked_before {
        let got = snap.get(block).copied().unwrap_or(0);
        if got < *acked {
            return Err(format!(
                "block {block}: snapshot has v{got}, v{acked} was acknowledged before it started"
            ));
        }
    }
    for (block, got) in &snap {
        let limit = attempted_by_end.get(block).copied().unwrap_or(0);
        if *got > limit {
            return Err(format!(
                "block {block}: snapshot has v{got}, only v{limit} was sent before it returned"
            ));
        }
    }
    Ok(acked_before.len())
}

#[cfg(test)]
mod tests {
    use super::super::block::{encode, BlockTag};
    use super::*;

    #[test]
    fn a_cut_needs_what_was_acknowledged_before_and_nothing_sent_after() {
        let log = "# header\nA 0 1\nK 0 1\nA 1 1\nK 1 1\nA 0 2\nK 0 2\nA 1 2\n";
        let before = log.find("A 0 2").unwrap();
        let image = |v0: u64, v1: u64| {
            let mut bytes = encode(&BlockTag {
                run_id: 7,
                block: 0,
                version: v0,
            });
            bytes.extend(encode(&BlockTag {
                run_id: 7,
                block: 1,
                version: v1,
            }));
            bytes
        };
        assert_eq!(check_cut(&image(1, 1), 2, log, before, log.len()), Ok(2));
        assert_eq!(check_cut(&image(2, 2), 2, log, before, log.len()), Ok(2));
        let e = check_cut(&image(1, 1), 2, log, log.len(), log.len()).unwrap_err();
        assert!(
            e.contains("block 0: snapshot has v1, v2 was acknowledged"),
            "{e}"
        );
        let e = check_cut(&image(2, 2), 2, log, before, before).unwrap_err();
        assert!(e.contains("only v1 was sent before it returned"), "{e}");
    }
}
