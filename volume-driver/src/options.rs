//! Per-volume replication options: the types live with the control API
//! ([`control_api::options`]); the daemon parses a [`OptionsChange`]'s strings here, so
//! every client gets the same errors, and formats rates for humans.

use crate::units::{format_size, parse_size};

pub use control_api::options::{OptionsChange, VolumeOptions};

/// `base` with `change` applied; errors name the option and the accepted values.
pub fn apply_change(change: &OptionsChange, base: VolumeOptions) -> Result<VolumeOptions, String> {
    let mut out = base;
    if let Some(p) = &change.protocol {
        out.protocol = p.parse().map_err(|e| format!("--protocol: {e}"))?;
    }
    if let Some(q) = &change.on_no_quorum {
        out.on_no_quorum = q.parse().map_err(|e| format!("--on-no-quorum: {e}"))?;
    }
    if let Some(s) = &change.after_split_brain {
        out.after_split_brain = s.parse().map_err(|e| format!("--after-split-brain: {e}"))?;
    }
    if let Some(r) = &change.resync_rate {
        out.resync_rate_bytes = parse_rate(r).map_err(|e| format!("--resync-rate: {e}"))?;
    }
    if let Some(read_only) = change.read_only {
        out.read_only = read_only;
    }
    Ok(out)
}

/// Parse a rate such as `100M` (per second; an optional `/s` suffix is accepted).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let trimmed = text.trim().trim_end_matches("/s");
    let rate = parse_size(trimmed).map_err(|e| e.to_string())?;
    if rate == 0 {
        return Err("rate must be greater than 0".into());
    }
    Ok(rate)
}

/// A rate for humans, e.g. `100 MiB/s`.
pub fn format_rate(bytes_per_sec: u64) -> String {
    format!("{}/s", format_size(bytes_per_sec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::role::Protocol;
    use replication::sync_decision::AfterSplitBrain;

    #[test]
    fn a_change_applies_only_what_it_names_and_names_bad_options() {
        let change = OptionsChange {
            after_split_brain: Some("discard-least-changes".into()),
            resync_rate: Some("50M".into()),
            ..Default::default()
        };
        let out = apply_change(&change, VolumeOptions::default()).unwrap();
        assert_eq!(out.protocol, Protocol::C);
        assert_eq!(out.after_split_brain, AfterSplitBrain::DiscardLeastChanges);
        assert_eq!(out.resync_rate_bytes, 50 << 20);
        let bad = OptionsChange {
            on_no_quorum: Some("panic".into()),
            ..Default::default()
        };
        assert!(apply_change(&bad, VolumeOptions::default())
            .unwrap_err()
            .starts_with("--on-no-quorum:"));
        assert_eq!(parse_rate("10M/s").unwrap(), 10 << 20);
        assert!(parse_rate("0").is_err());
    }
}
