//! The agent's settings: the cluster from `/etc/tandem/tandem.toml` (nodes, management
//! addresses, state/run dirs, shared secret) plus its own small optional file
//! `/etc/tandem/ha.toml` (`--ha-config`, `TANDEM_HA_CONFIG`). A separate file because
//! tandemd's config refuses unknown sections; a missing `ha.toml` means all defaults.
//!
//! ```toml
//! port = 7701                 # agent port on each node's management (control) IP
//! heartbeat_interval_ms = 500
//! dead_after_ms = 3000        # silent this long on the management network = dead there
//! tick_ms = 250               # how often the agent decides
//! start_backoff_ms = 5000     # after a failed start (e.g. lost the promotion race)
//! start_timeout_ms = 60000    # a start hung this long stops claiming the VM (> fence_timeout_ms)
//! libvirt_uri = "qemu:///system"
//! fence_command = "ipmitool -H {node}-ipmi chassis power off"  # optional, run before a takeover
//! fence_timeout_ms = 20000
//! soft_watchdog_ms = 10000    # 0 = off; see crate::watchdog
//! metrics_listen = "127.0.0.1:9943"  # Prometheus /metrics; "" = off
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use volume_driver::config::Config;

/// Where the agent's metrics are served by default (tandemd uses 9942).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9943";

/// Default location of the agent's own file.
pub const DEFAULT_HA_CONFIG_PATH: &str = "/etc/tandem/ha.toml";
/// Environment override of the agent's file.
pub const HA_CONFIG_ENV: &str = "TANDEM_HA_CONFIG";

/// `ha.toml` as written (every key optional).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HaSettings {
    pub port: u16,
    pub heartbeat_interval_ms: u64,
    pub dead_after_ms: u64,
    pub tick_ms: u64,
    pub start_backoff_ms: u64,
    /// A start still running after this long is given up on in the heartbeats: the node
    /// stops saying it is starting the VM or could start it, so another one takes over.
    pub start_timeout_ms: u64,
    pub libvirt_uri: String,
    pub fence_command: Option<String>,
    pub fence_timeout_ms: u64,
    pub soft_watchdog_ms: u64,
    /// Where `/metrics` is served; empty turns it off.
    pub metrics_listen: String,
}

impl Default for HaSettings {
    fn default() -> Self {
        HaSettings {
            port: 7701,
            heartbeat_interval_ms: 500,
            dead_after_ms: 3000,
            tick_ms: 250,
            start_backoff_ms: 5000,
            start_timeout_ms: 60_000,
            libvirt_uri: "qemu:///system".into(),
            fence_command: None,
            fence_timeout_ms: 20_000,
            soft_watchdog_ms: 10_000,
            metrics_listen: DEFAULT_METRICS_LISTEN.into(),
        }
    }
}

/// Errors loading the agent's settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Cluster(#[from] volume_driver::config::ConfigError),
}

impl HaSettings {
    /// Load `path`; a missing file at the default location gives the defaults, a missing
    /// file that was asked for explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<HaSettings, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(HaSettings::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let settings: HaSettings = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().trim().to_string(),
        })?;
        settings.validate(path)
    }

    fn validate(self, path: &Path) -> Result<HaSettings, ConfigError> {
        let invalid = |message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: message.to_string(),
        };
        if self.heartbeat_interval_ms == 0 || self.tick_ms == 0 || self.start_timeout_ms == 0 {
            return Err(invalid(
                "heartbeat_interval_ms, tick_ms and start_timeout_ms must be > 0",
            ));
        }
        if self.start_timeout_ms <= self.fence_timeout_ms {
            return Err(invalid(
                "start_timeout_ms must be longer than fence_timeout_ms (a start includes fencing the dead host)",
            ));
        }
        if self.dead_after_ms < 3 * self.heartbeat_interval_ms {
            return Err(invalid(
                "dead_after_ms must be at least 3 heartbeat intervals (one lost packet must not kill a host)",
            ));
        }
        if self.metrics_addr().is_err() {
            return Err(invalid(&format!(
                "metrics_listen: '{}' is not an address:port (\"\" turns metrics off)",
                self.metrics_listen
            )));
        }
        Ok(self)
    }

    /// `metrics_listen` parsed; `None` when turned off.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, std::net::AddrParseError> {
        match self.metrics_listen.trim() {
            "" => Ok(None),
            addr => addr.parse().map(Some),
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn dead_after(&self) -> Duration {
        Duration::from_millis(self.dead_after_ms)
    }
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }
    pub fn start_backoff(&self) -> Duration {
        Duration::from_millis(self.start_backoff_ms)
    }
    pub fn start_timeout(&self) -> Duration {
        Duration::from_millis(self.start_timeout_ms)
    }
}

/// The agent's resolved settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub cluster: Config,
    pub ha: HaSettings,
}

impl AgentConfig {
    /// The config path of the agent's own file: explicit, else the environment, else default.
    pub fn ha_path(explicit: Option<&Path>) -> (PathBuf, bool) {
        if let Some(p) = explicit {
            return (p.to_path_buf(), true);
        }
        match std::env::var_os(HA_CONFIG_ENV) {
            Some(p) if !p.is_empty() => (PathBuf::from(p), true),
            _ => (PathBuf::from(DEFAULT_HA_CONFIG_PATH), false),
        }
    }

    pub fn load(
        config: Option<&Path>,
        ha_config: Option<&Path>,
    ) -> Result<AgentConfig, ConfigError> {
        let cluster = Config::load(&volume_driver::config::resolve_path(config))?;
        let (path, explicit) = AgentConfig::ha_path(ha_config);
        let ha = HaSettings::load(&path, explicit)?;
        Ok(AgentConfig { cluster, ha })
    }

    /// This node's name.
    pub fn here(&self) -> &str {
        &self.cluster.node
    }

    /// Where the agent of `node` listens: its management (control) IP, the agent port.
    pub fn agent_addr(&self, node: &str) -> Option<SocketAddr> {
        self.cluster
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| SocketAddr::new(n.control.ip(), self.ha.port))
    }

    /// Every node name in config order.
    pub fn node_order(&self) -> Vec<String> {
        self.cluster.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// `<state_dir>/ha`.
    pub fn ha_dir(&self) -> PathBuf {
        self.cluster.state_dir.join("ha")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ha.toml");
        assert_eq!(
            HaSettings::load(&missing, false).unwrap(),
            HaSettings::default()
        );
        assert!(HaSettings::load(&missing, true).is_err());
        std::fs::write(&missing, "dead_after_ms = 1000\n").unwrap();
        let err = HaSettings::load(&missing, false).unwrap_err().to_string();
        assert!(err.contains("at least 3 heartbeat intervals"), "{err}");
        std::fs::write(&missing, "dead_after_ms = 2000\nfence_command = \"true\"\n").unwrap();
        let s = HaSettings::load(&missing, false).unwrap();
        assert_eq!(s.dead_after(), Duration::from_secs(2));
        std::fs::write(&missing, "deadafter = 1\n").unwrap();
        assert!(HaSettings::load(&missing, false).is_err());
    }
}
