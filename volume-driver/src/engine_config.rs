//! The config's optional `[engine]` table: the replication engine's tunables (DRBD's
//! `ping-int`, `timeout`, `ko-count` and `al-extents`), parsed from the strings operators
//! write (`"500ms"`, `"2s"`) and checked against each other.

use std::time::Duration;

use replication::activity_log::{MAX_AL_EXTENTS, MIN_AL_EXTENTS};
use replication::link::{default_dead_after, default_ping_interval, LinkConfig};
use replication::replica::EngineTunables;
use serde::Deserialize;

/// `[engine]` as written; every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEngine {
    pub ping_interval: Option<String>,
    pub ping_timeout: Option<String>,
    pub peer_ack_timeout: Option<String>,
    pub reconnect_grace: Option<String>,
    pub reconnect_interval: Option<String>,
    pub al_extents: Option<usize>,
}

/// The validated `[engine]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// How often a replication link sends a ping.
    pub ping_interval: Duration,
    /// A replication link that receives nothing for this long is down.
    pub ping_timeout: Duration,
    /// The engine's per-volume tunables.
    pub tunables: EngineTunables,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            ping_interval: default_ping_interval(),
            ping_timeout: default_dead_after(),
            tunables: EngineTunables::default(),
        }
    }
}

impl EngineConfig {
    /// The link settings these tunables give.
    pub fn link(&self) -> LinkConfig {
        LinkConfig {
            ping_interval: self.ping_interval,
            dead_after: self.ping_timeout,
            ..LinkConfig::default()
        }
    }
}

impl RawEngine {
    /// Parse and check; an error is (key, message).
    pub fn validate(self) -> Result<EngineConfig, (&'static str, String)> {
        let defaults = EngineConfig::default();
        let duration = |key, text: Option<String>, default| match text {
            None => Ok(default),
            Some(text) => parse_duration(&text).map_err(|e| (key, e)),
        };
        let ping_interval = duration("ping_interval", self.ping_interval, defaults.ping_interval)?;
        let ping_timeout = duration("ping_timeout", self.ping_timeout, defaults.ping_timeout)?;
        let t = defaults.tunables;
        let peer_ack_timeout = duration(
            "peer_ack_timeout",
            self.peer_ack_timeout,
            t.peer_ack_timeout,
        )?;
        let reconnect_grace = duration("reconnect_grace", self.reconnect_grace, t.reconnect_grace)?;
        let reconnect_interval = duration(
            "reconnect_interval",
            self.reconnect_interval,
            t.reconnect_interval,
        )?;
        let al_extents = self.al_extents.unwrap_or(t.al_extents);
        if ping_timeout <= ping_interval {
            return Err((
                "ping_timeout",
                format!(
                    "{} must be longer than ping_interval ({}), or every quiet link would \
                     be declared dead",
                    format_duration(ping_timeout),
                    format_duration(ping_interval)
                ),
            ));
        }
        if peer_ack_timeout <= ping_timeout {
            return Err((
                "peer_ack_timeout",
                format!(
                    "{} must be longer than ping_timeout ({}): a slow peer is then \
                     disconnected only when it answers pings but not requests",
                    format_duration(peer_ack_timeout),
                    format_duration(ping_timeout)
                ),
            ));
        }
        if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&al_extents) {
            return Err((
                "al_extents",
                format!("{al_extents} is outside {MIN_AL_EXTENTS}..={MAX_AL_EXTENTS}"),
            ));
        }
        Ok(EngineConfig {
            ping_interval,
            ping_timeout,
            tunables: EngineTunables {
                peer_ack_timeout,
                reconnect_grace,
                reconnect_interval,
                al_extents,
            },
        })
    }
}

/// Parse a duration: a whole number with a unit `ms`, `s`, `m` or `h` (`"500ms"`, `"30s"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let expected =
        || format!("'{text}' is not a duration; write e.g. \"500ms\", \"30s\" or \"2m\"");
    let number: u64 = t[..digits].parse().map_err(|_| expected())?;
    let millis = match t[digits..].trim() {
        "ms" => Some(number),
        "s" => number.checked_mul(1000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => return Err(expected()),
    };
    match millis {
        Some(0) => Err(format!("'{text}' must be longer than zero")),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Err(format!("'{text}' is too long")),
    }
}

/// A duration as [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_written_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1.5s").unwrap_err().contains("e.g."));
        assert!(parse_duration("30").unwrap_err().contains("e.g."));
        assert!(parse_duration("0s")
            .unwrap_err()
            .contains("longer than zero"));
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn defaults_are_the_engines_and_keys_are_checked_against_each_other() {
        assert_eq!(RawEngine::default().validate(), Ok(EngineConfig::default()));
        let raw = RawEngine {
            ping_interval: Some("1s".into()),
            ping_timeout: Some("1s".into()),
            ..RawEngine::default()
        };
        assert_eq!(raw.validate().unwrap_err().0, "ping_timeout");
        let raw = RawEngine {
            peer_ack_timeout: Some("1s".into()),
            ..RawEngine::default()
        };
        assert_eq!(raw.validate().unwrap_err().0, "peer_ack_timeout");
        let raw = RawEngine {
            al_extents: Some(3),
            ..RawEngine::default()
        };
        assert_eq!(raw.validate().unwrap_err().0, "al_extents");
        let raw = RawEngine {
            ping_interval: Some("200ms".into()),
            ping_timeout: Some("1s".into()),
            peer_ack_timeout: Some("10s".into()),
            reconnect_grace: Some("1s".into()),
            reconnect_interval: Some("500ms".into()),
            al_extents: Some(257),
        };
        let cfg = raw.validate().unwrap();
        assert_eq!(cfg.link().dead_after, Duration::from_secs(1));
        assert_eq!(cfg.tunables.peer_ack_timeout, Duration::from_secs(10));
        assert_eq!(cfg.tunables.al_extents, 257);
        assert_eq!(cfg.tunables.reconnect_interval, Duration::from_millis(500));
    }
}
