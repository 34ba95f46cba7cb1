//! Per-volume replication options as they cross the API: the [`VolumeOptions`] a volume
//! has (also the config's `[replication]` defaults and a stored definition's `options`) and
//! the [`OptionsChange`] `tandem volume set` asks for.
//!
//! Values are spelled as DRBD spells them (`C`, `suspend-io`, `discard-zero-changes`), in
//! TOML and JSON alike; parsing reuses the engine's `FromStr` so the spellings cannot drift.

use std::fmt::Display;
use std::str::FromStr;

use replication::quorum::OnNoQuorum;
use replication::role::Protocol;
use replication::sync_decision::AfterSplitBrain;
use serde::{Deserialize, Serialize};

/// Default resync rate cap (`resync_max_rate`): 100 MiB/s, room left for application
/// I/O on an NVMe link.
pub const DEFAULT_RESYNC_RATE: u64 = 100 << 20;

fn default_protocol() -> Protocol {
    Protocol::C
}
fn default_resync_rate() -> u64 {
    DEFAULT_RESYNC_RATE
}
/// Default `resync_min_rate`: the engine's (10 MiB/s).
fn default_resync_min_rate() -> u64 {
    replication::resync::default_min_rate()
}
/// Default `resync_plan_ahead`: the engine's (2 s, DRBD's `c-plan-ahead` default).
fn default_resync_plan_ahead_ms() -> u64 {
    replication::resync::rate::PLAN_AHEAD.as_millis() as u64
}

/// The options of one replicated volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeOptions {
    /// Replication protocol (`A`, `B` or `C`; default `C`).
    #[serde(with = "spelled", default = "default_protocol")]
    pub protocol: Protocol,
    /// What a Primary does without quorum (`suspend-io` default, or `io-error`).
    #[serde(with = "spelled", default)]
    pub on_no_quorum: OnNoQuorum,
    /// Automatic split-brain recovery policy (default `disconnect`: never automatic).
    #[serde(with = "spelled", default)]
    pub after_split_brain: AfterSplitBrain,
    /// Resync rate cap in bytes per second (`resync_max_rate`, DRBD's `c-max-rate`): the
    /// rate of a resync while the volume's application I/O is idle. Stored and printed as
    /// `resync_rate_bytes`, its name before `resync_min_rate` existed.
    #[serde(rename = "resync_rate_bytes", default = "default_resync_rate")]
    pub resync_max_rate_bytes: u64,
    /// Resync rate floor in bytes per second (`resync_min_rate`, DRBD's `c-min-rate`):
    /// application writes never slow a resync below this. At most the cap.
    #[serde(default = "default_resync_min_rate")]
    pub resync_min_rate_bytes: u64,
    /// How long the resync controller averages the application write rate before the
    /// resync rate follows it (`resync_plan_ahead`, DRBD's `c-plan-ahead`), milliseconds.
    #[serde(default = "default_resync_plan_ahead_ms")]
    pub resync_plan_ahead_ms: u64,
    /// A template (base volume): opens for writing are refused, linked clones are made
    /// from it (`tandem volume set NAME --read-only`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            protocol: default_protocol(),
            on_no_quorum: OnNoQuorum::default(),
            after_split_brain: AfterSplitBrain::default(),
            resync_max_rate_bytes: DEFAULT_RESYNC_RATE,
            resync_min_rate_bytes: default_resync_min_rate(),
            resync_plan_ahead_ms: default_resync_plan_ahead_ms(),
            read_only: false,
        }
    }
}

/// A change requested by `tandem volume set`: absent fields keep their value. Strings are
/// parsed by the daemon (`volume_driver::options::apply_change`) so every client gets the
/// same errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionsChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_no_quorum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_split_brain: Option<String>,
    /// Old name of `resync_max_rate` (an alias; giving both is an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_rate: Option<String>,
    /// A size per second, e.g. `50M` (binary units) or plain bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_max_rate: Option<String>,
    /// A size per second, e.g. `50M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_min_rate: Option<String>,
    /// A duration, e.g. `2s` or `500ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_plan_ahead: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

impl OptionsChange {
    /// True when nothing would change.
    pub fn is_empty(&self) -> bool {
        self == &OptionsChange::default()
    }
}

/// serde through `Display`/`FromStr` (the engine's option types carry no serde derive).
mod spelled {
    use super::*;
    use serde::de::Error as _;
    use serde::{Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip_in_drbd_spelling() {
        let options = VolumeOptions {
            protocol: Protocol::A,
            on_no_quorum: OnNoQuorum::IoError,
            after_split_brain: AfterSplitBrain::DiscardZeroChanges,
            resync_max_rate_bytes: 1 << 20,
            resync_min_rate_bytes: 1 << 19,
            resync_plan_ahead_ms: 500,
            read_only: false,
        };
        let json = serde_json::to_string(&options).unwrap();
        assert_eq!(
            json,
            r#"{"protocol":"A","on_no_quorum":"io-error","after_split_brain":"discard-zero-changes","resync_rate_bytes":1048576,"resync_min_rate_bytes":524288,"resync_plan_ahead_ms":500}"#
        );
        assert_eq!(
            serde_json::from_str::<VolumeOptions>(&json).unwrap(),
            options
        );
        assert_eq!(
            serde_json::from_str::<VolumeOptions>("{}").unwrap(),
            VolumeOptions::default()
        );
        // A definition stored before the controller keys existed loads with their defaults.
        let old: VolumeOptions =
            serde_json::from_str(r#"{"protocol":"A","resync_rate_bytes":1048576}"#).unwrap();
        assert_eq!(old.resync_max_rate_bytes, 1 << 20);
        assert_eq!(old.resync_min_rate_bytes, 10 << 20);
        assert_eq!(old.resync_plan_ahead_ms, 2000);
        let e = serde_json::from_str::<VolumeOptions>(r#"{"protocol":"D"}"#).unwrap_err();
        assert!(e.to_string().contains("protocol"), "{e}");
        assert!(OptionsChange::default().is_empty());
    }
}
