//! Per-volume replication options: the types live with the control API
//! ([`control_api::options`]); the daemon parses a [`OptionsChange`]'s strings here, so
//! every client gets the same errors, checks the resync controller's bounds, and formats
//! rates for humans.
//!
//! Resync controller keys (DRBD's `c-max-rate`, `c-min-rate`, `c-plan-ahead`):
//! `resync_max_rate` (alias `resync_rate`, its old name), `resync_min_rate` (at most the
//! max; lowering the max below the current min lowers the min with it, unless the same
//! change names the min) and `resync_plan_ahead` ([`PLAN_AHEAD_RANGE`]).

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::engine_config::{format_duration, parse_duration};
use crate::units::{format_size, parse_size};

pub use control_api::options::{OptionsChange, VolumeOptions};

/// Accepted `resync_plan_ahead` (DRBD's `c-plan-ahead` goes up to 30 s).
pub const PLAN_AHEAD_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(30);

/// `base` with `change` applied; errors name the option and the accepted values. On error
/// nothing is applied (the caller keeps `base`).
pub fn apply_change(change: &OptionsChange, base: VolumeOptions) -> Result<VolumeOptions, String> {
    let mut out = apply_fields(change, base)?;
    let max = out.resync_max_rate_bytes;
    if out.resync_min_rate_bytes > max {
        if change.resync_min_rate.is_some() {
            return Err(format!(
                "--resync-min-rate: {} is above the max rate {} (--resync-max-rate)",
                format_rate(out.resync_min_rate_bytes),
                format_rate(max)
            ));
        }
        // Only the cap was lowered: the floor follows it.
        out.resync_min_rate_bytes = max;
    }
    Ok(out)
}

/// Check each value of `change` on its own (a client's check before it sends the change;
/// how the rates compare depends on the volume's current options, which the daemon knows).
pub fn check_change(change: &OptionsChange) -> Result<(), String> {
    apply_fields(change, VolumeOptions::default()).map(|_| ())
}

fn apply_fields(change: &OptionsChange, base: VolumeOptions) -> Result<VolumeOptions, String> {
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
    match (&change.resync_rate, &change.resync_max_rate) {
        (Some(_), Some(_)) => {
            return Err("--resync-rate: it is an alias of --resync-max-rate; give only one".into())
        }
        (Some(r), None) => {
            out.resync_max_rate_bytes = parse_rate(r).map_err(|e| format!("--resync-rate: {e}"))?;
        }
        (None, Some(r)) => {
            out.resync_max_rate_bytes =
                parse_rate(r).map_err(|e| format!("--resync-max-rate: {e}"))?;
        }
        (None, None) => {}
    }
    if let Some(r) = &change.resync_min_rate {
        out.resync_min_rate_bytes = parse_rate(r).map_err(|e| format!("--resync-min-rate: {e}"))?;
    }
    if let Some(p) = &change.resync_plan_ahead {
        let window = parse_plan_ahead(p).map_err(|e| format!("--resync-plan-ahead: {e}"))?;
        out.resync_plan_ahead_ms = window.as_millis() as u64;
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

/// Parse a `resync_plan_ahead` duration within [`PLAN_AHEAD_RANGE`].
fn parse_plan_ahead(text: &str) -> Result<Duration, String> {
    let window = parse_duration(text)?;
    if !PLAN_AHEAD_RANGE.contains(&window) {
        return Err(format!(
            "'{text}' is outside {}..={}",
            format_duration(*PLAN_AHEAD_RANGE.start()),
            format_duration(*PLAN_AHEAD_RANGE.end())
        ));
    }
    Ok(window)
}

/// The controller keys for humans: `max 100 MiB/s, min 10 MiB/s, plan-ahead 2s`.
pub fn format_resync(options: &VolumeOptions) -> String {
    format!(
        "max {}, min {}, plan-ahead {}",
        format_rate(options.resync_max_rate_bytes),
        format_rate(options.resync_min_rate_bytes),
        format_duration(Duration::from_millis(options.resync_plan_ahead_ms))
    )
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
        assert_eq!(out.resync_max_rate_bytes, 50 << 20);
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

    fn change(min: Option<&str>, max: Option<&str>, plan: Option<&str>) -> OptionsChange {
        OptionsChange {
            resync_min_rate: min.map(String::from),
            resync_max_rate: max.map(String::from),
            resync_plan_ahead: plan.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn resync_controller_keys_apply_and_stay_ordered() {
        let base = VolumeOptions::default();
        let out = apply_change(&change(Some("50M"), Some("400M"), Some("2s")), base).unwrap();
        assert_eq!(out.resync_min_rate_bytes, 50 << 20);
        assert_eq!(out.resync_max_rate_bytes, 400 << 20);
        assert_eq!(out.resync_plan_ahead_ms, 2000);
        assert_eq!(
            format_resync(&out),
            "max 400 MiB/s, min 50 MiB/s, plan-ahead 2s"
        );
        // The old name sets the max.
        let alias = OptionsChange {
            resync_rate: Some("1M".into()),
            ..Default::default()
        };
        let out = apply_change(&alias, base).unwrap();
        assert_eq!(out.resync_max_rate_bytes, 1 << 20);
        // ... and a cap below the default floor lowers the floor with it.
        assert_eq!(out.resync_min_rate_bytes, 1 << 20);
        assert_eq!(out.resync_plan_ahead_ms, base.resync_plan_ahead_ms);
    }

    #[test]
    fn bad_resync_controller_keys_get_one_line_naming_the_option() {
        let base = VolumeOptions::default();
        let cases = [
            (
                change(Some("200M"), None, None),
                "--resync-min-rate: 200 MiB/s is above",
            ),
            (change(Some("50M"), Some("10M"), None), "--resync-min-rate:"),
            (
                change(Some("0"), None, None),
                "--resync-min-rate: rate must be",
            ),
            (
                change(None, Some("0"), None),
                "--resync-max-rate: rate must be",
            ),
            (
                change(None, None, Some("50ms")),
                "--resync-plan-ahead: '50ms' is outside 100ms..=30s",
            ),
            (
                change(None, None, Some("31s")),
                "--resync-plan-ahead: '31s' is outside",
            ),
            (
                change(None, None, Some("2")),
                "--resync-plan-ahead: '2' is not a duration",
            ),
        ];
        for (c, want) in cases {
            let e = apply_change(&c, base).unwrap_err();
            assert!(e.starts_with(want), "{c:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let both = OptionsChange {
            resync_rate: Some("1M".into()),
            resync_max_rate: Some("2M".into()),
            ..Default::default()
        };
        assert!(apply_change(&both, base)
            .unwrap_err()
            .contains("alias of --resync-max-rate"));
        // A client cannot judge min against the volume's max; the daemon does.
        assert!(check_change(&change(Some("200M"), None, None)).is_ok());
        assert!(check_change(&change(None, None, Some("1h"))).is_err());
    }
}
