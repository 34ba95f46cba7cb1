//! The node configuration, `/etc/tandem/tandem.toml`.
//!
//! Parsing happens in two steps: serde reads the file into plain structs (unknown keys are
//! errors), then [`RawConfig::validate`] checks the cross-field rules (this node is listed,
//! names are unique, each pool has exactly its backend's keys) and yields a [`Config`] whose
//! pools are typed [`PoolSpec`]s. Every error names the file, the key and what is wrong:
//!
//! ```text
//! /etc/tandem/tandem.toml: pools[1].backend: unknown backend 'zfs' (expected 'file' or 'lvm-thin')
//! ```
//!
//! The path is `/etc/tandem/tandem.toml` unless `--config` or `TANDEM_CONFIG` says otherwise.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use replication::auth::{load_secret, Secret, SecretError};
use replication::device::{CacheMode, DeviceOptions, EngineChoice};

use crate::engine_config::{EngineConfig, RawEngine};
use crate::names::validate_volume_name;
use crate::options::{apply_change, OptionsChange, VolumeOptions};

/// One `[[nodes]]` entry: a host of the cluster (or a diskless tiebreaker). Defined with
/// the control API, whose `node_info` reports it.
pub use control_api::NodeConfig;

/// Where the configuration lives unless overridden.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tandem/tandem.toml";
/// Environment variable that overrides the config path (`--config` wins over it).
pub const CONFIG_ENV: &str = "TANDEM_CONFIG";

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/tandem")
}
/// drbd-reactor's Prometheus port: what DRBD users already scrape.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9942";
fn default_metrics_listen() -> String {
    DEFAULT_METRICS_LISTEN.to_string()
}
fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/tandem")
}
fn default_secret_file() -> PathBuf {
    PathBuf::from("/etc/tandem/secret")
}
fn default_max_fill_percent() -> u8 {
    90
}

/// A configuration problem, naming the file and (when known) the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a key of the wrong type or an unknown key.
    #[error("{path}: {location}{message}")]
    Parse {
        path: PathBuf,
        location: String,
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The file as written, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    #[serde(default = "default_secret_file")]
    pub secret_file: PathBuf,
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub pools: Vec<RawPool>,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(default)]
    pub frontends: FrontendsConfig,
    #[serde(default)]
    pub replication: RawReplication,
    #[serde(default)]
    pub engine: RawEngine,
    /// Where `/metrics` is served (Prometheus text format); empty turns it off.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
}

/// The optional `[replication]` table: defaults for new volumes, spelled as DRBD spells
/// them (`protocol = "C"`, `on_no_quorum = "suspend-io"`, `after_split_brain =
/// "disconnect"`, the resync controller's `resync_max_rate = "100M"` (alias `resync_rate`)
/// and `resync_min_rate = "10M"` per second, `resync_plan_ahead = "2s"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplication {
    pub protocol: Option<String>,
    pub resync_rate: Option<String>,
    pub resync_max_rate: Option<String>,
    pub resync_min_rate: Option<String>,
    pub resync_plan_ahead: Option<String>,
    pub on_no_quorum: Option<String>,
    pub after_split_brain: Option<String>,
}

/// The optional `[nbd]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// Also serve NBD on this TCP address (absent: unix socket only).
    #[serde(default)]
    pub tcp_listen: Option<SocketAddr>,
}

fn default_vhost_max_queues() -> u16 {
    4
}

/// Most queues a vhost-user-blk device may have (`vhost_max_queues`).
pub const VHOST_QUEUES_LIMIT: u16 = 64;

/// The optional `[frontends]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendsConfig {
    /// Queues each vhost-user-blk device offers (QEMU's `num-queues` may use fewer),
    /// 1 to 64; each queue is served by its own thread.
    #[serde(default = "default_vhost_max_queues")]
    pub vhost_max_queues: u16,
}

impl Default for FrontendsConfig {
    fn default() -> Self {
        FrontendsConfig {
            vhost_max_queues: default_vhost_max_queues(),
        }
    }
}

/// One `[[pools]]` entry as written: the union of every backend's keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: String,
    pub backend: String,
    pub path: Option<PathBuf>,
    pub vg: Option<String>,
    pub thinpool: Option<String>,
    pub max_fill_percent: Option<u8>,
    /// `none` (default: O_DIRECT) or `writeback` (the host page cache).
    pub cache: Option<String>,
    /// `auto` (default: io_uring where it works), `io_uring` or `thread-pool`.
    pub io_engine: Option<String>,
}

/// A validated pool definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolSpec {
    pub name: String,
    pub backend: BackendSpec,
    /// How the pool's volumes use the host page cache.
    pub cache: CacheMode,
    /// Which I/O engine moves the pool's bytes.
    pub io_engine: EngineChoice,
}

impl PoolSpec {
    /// How to open this pool's volumes.
    pub fn device_options(&self) -> DeviceOptions {
        DeviceOptions {
            cache: self.cache,
            engine: self.io_engine,
        }
    }
}

/// A validated backend with its keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "backend", rename_all = "kebab-case")]
pub enum BackendSpec {
    /// Sparse files `<path>/<volume>.img`.
    File { path: PathBuf },
    /// Thin LVs in `vg/thinpool`.
    LvmThin {
        vg: String,
        thinpool: String,
        max_fill_percent: u8,
    },
}

impl BackendSpec {
    /// The backend's name as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendSpec::File { .. } => "file",
            BackendSpec::LvmThin { .. } => "lvm-thin",
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub node: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub secret_file: PathBuf,
    pub nodes: Vec<NodeConfig>,
    /// The first pool is the default for new volumes. Empty only on a diskless
    /// tiebreaker, which stores nothing.
    pub pools: Vec<PoolSpec>,
    pub nbd: NbdConfig,
    pub frontends: FrontendsConfig,
    /// Options given to new volumes (`[replication]`).
    pub replication: VolumeOptions,
    /// The replication engine's tunables (`[engine]`).
    pub engine: EngineConfig,
    /// `metrics_listen`: the Prometheus endpoint's address, `None` when turned off.
    pub metrics_listen: Option<SocketAddr>,
}

/// Why the peer secret could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{path}: secret_file: the cluster has {nodes} nodes, so peers authenticate with a shared secret")]
pub struct SecretFileError {
    pub path: PathBuf,
    pub nodes: usize,
    #[source]
    pub source: SecretError,
}

impl Config {
    /// The control API socket, `<run_dir>/tandemd.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("tandemd.sock")
    }

    /// The NBD frontend's socket, `<run_dir>/nbd.sock`.
    pub fn nbd_socket(&self) -> PathBuf {
        self.run_dir.join("nbd.sock")
    }

    /// The vhost-user-blk sockets' directory, `<run_dir>/vhost`.
    pub fn vhost_dir(&self) -> PathBuf {
        self.run_dir.join("vhost")
    }

    /// This node's `[[nodes]]` entry (validation guarantees it exists).
    pub fn this_node(&self) -> Option<&NodeConfig> {
        self.node_named(&self.node)
    }

    /// True when this node is a diskless tiebreaker: it votes and stores nothing.
    pub fn is_diskless(&self) -> bool {
        self.this_node().is_some_and(|n| n.diskless)
    }

    /// The `[[nodes]]` entry of `name`.
    pub fn node_named(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// True when other nodes are configured: the daemon then serves the peer control API
    /// and runs the replication listener, and needs the shared secret.
    pub fn is_cluster(&self) -> bool {
        self.nodes.len() > 1
    }

    /// Load the shared secret named by `secret_file` (a regular file, mode 0600 or
    /// stricter). `Ok(None)` for a one-node cluster, which needs none.
    pub fn load_secret(&self) -> Result<Option<Secret>, SecretFileError> {
        if !self.is_cluster() {
            return Ok(None);
        }
        load_secret(&self.secret_file)
            .map(Some)
            .map_err(|source| SecretFileError {
                path: self.path.clone(),
                nodes: self.nodes.len(),
                source,
            })
    }

    /// Read and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parse and validate TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            location: e
                .span()
                .map(|span| {
                    let (line, column) = line_column(text, span.start);
                    format!("line {line} column {column}: ")
                })
                .unwrap_or_default(),
            message: e.message().trim().to_string(),
        })?;
        raw.validate(path)
    }
}

/// The config path to use: the explicit one, else `TANDEM_CONFIG`, else the default.
pub fn resolve_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

impl RawConfig {
    /// Check the cross-field rules and build the typed [`Config`].
    pub fn validate(self, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if self.node.trim().is_empty() {
            return Err(invalid("node".into(), "must not be empty".into()));
        }
        for (key, dir) in [
            ("state_dir", &self.state_dir),
            ("run_dir", &self.run_dir),
            ("secret_file", &self.secret_file),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(
                    key.into(),
                    format!("'{}' must be an absolute path", dir.display()),
                ));
            }
        }
        let mut node_names = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.name.trim().is_empty() {
                return Err(invalid(
                    format!("nodes[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if !node_names.insert(node.name.as_str()) {
                return Err(invalid(
                    format!("nodes[{i}].name"),
                    format!("node '{}' is listed twice", node.name),
                ));
            }
        }
        if !node_names.contains(self.node.as_str()) {
            return Err(invalid(
                "node".into(),
                format!(
                    "this node '{}' is not listed in [[nodes]] (listed: {})",
                    self.node,
                    listed(self.nodes.iter().map(|n| n.name.as_str()))
                ),
            ));
        }
        // A diskless tiebreaker stores nothing, so it needs no pool; a data node does.
        let diskless = self.nodes.iter().any(|n| n.name == self.node && n.diskless);
        if self.pools.is_empty() && !diskless {
            return Err(invalid(
                "pools".into(),
                format!(
                    "node '{}' stores volumes and needs at least one [[pools]] entry \
                     (add one, or set `diskless = true` in its [[nodes]] entry to make it a \
                     tiebreaker)",
                    self.node
                ),
            ));
        }
        let mut pool_names = HashSet::new();
        let mut pools = Vec::with_capacity(self.pools.len());
        for (i, pool) in self.pools.into_iter().enumerate() {
            if !pool_names.insert(pool.name.clone()) {
                return Err(invalid(
                    format!("pools[{i}].name"),
                    format!("pool '{}' is defined twice", pool.name),
                ));
            }
            pools.push(
                pool.validate()
                    .map_err(|(key, message)| invalid(format!("pools[{i}].{key}"), message))?,
            );
        }
        let replication = apply_change(
            &OptionsChange {
                protocol: self.replication.protocol,
                on_no_quorum: self.replication.on_no_quorum,
                after_split_brain: self.replication.after_split_brain,
                read_only: None,
                resync_rate: self.replication.resync_rate,
                resync_max_rate: self.replication.resync_max_rate,
                resync_min_rate: self.replication.resync_min_rate,
                resync_plan_ahead: self.replication.resync_plan_ahead,
            },
            VolumeOptions::default(),
        )
        .map_err(|message| {
            // "--resync-rate: ..." → key "replication.resync_rate".
            let (flag, rest) = message.split_once(": ").unwrap_or(("", &message));
            let key = flag.trim_start_matches("--").replace('-', "_");
            invalid(format!("replication.{key}"), rest.to_string())
        })?;
        let engine = self
            .engine
            .validate()
            .map_err(|(key, message)| invalid(format!("engine.{key}"), message))?;
        if !(1..=VHOST_QUEUES_LIMIT).contains(&self.frontends.vhost_max_queues) {
            return Err(invalid(
                "frontends.vhost_max_queues".into(),
                format!(
                    "{} is out of range: a vhost-user-blk device has 1 to {VHOST_QUEUES_LIMIT} queues",
                    self.frontends.vhost_max_queues
                ),
            ));
        }
        let metrics_listen = match self.metrics_listen.trim() {
            "" => None,
            addr => Some(addr.parse().map_err(|e| {
                invalid(
                    "metrics_listen".into(),
                    format!("'{addr}' is not an address:port ({e}); empty turns metrics off"),
                )
            })?),
        };
        Ok(Config {
            replication,
            engine,
            metrics_listen,
            path: path.to_path_buf(),
            node: self.node,
            state_dir: self.state_dir,
            run_dir: self.run_dir,
            secret_file: self.secret_file,
            nodes: self.nodes,
            pools,
            nbd: self.nbd,
            frontends: self.frontends,
        })
    }
}

fn listed<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<_> = names.map(|n| format!("'{n}'")).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

impl RawPool {
    /// Type-check one pool; errors are `(key, message)` relative to the pool.
    fn validate(self) -> Result<PoolSpec, (&'static str, String)> {
        // A pool name is also a word operators type; hold it to the volume-name rule.
        if let Err(e) = validate_volume_name(&self.name) {
            return Err((
                "name",
                format!("'{}' is not a valid pool name: {e}", self.name),
            ));
        }
        let not_for = |key: &'static str, present: bool| {
            if present {
                Err((key, format!("is not a key of backend '{}'", self.backend)))
            } else {
                Ok(())
            }
        };
        let backend = match self.backend.as_str() {
            "file" => {
                not_for("vg", self.vg.is_some())?;
                not_for("thinpool", self.thinpool.is_some())?;
                not_for("max_fill_percent", self.max_fill_percent.is_some())?;
                let path = self
                    .path
                    .ok_or(("path", "is required for backend 'file'".to_string()))?;
                if !path.is_absolute() {
                    return Err((
                        "path",
                        format!("'{}' must be an absolute path", path.display()),
                    ));
                }
                BackendSpec::File { path }
            }
            "lvm-thin" => {
                not_for("path", self.path.is_some())?;
                let vg = self
                    .vg
                    .ok_or(("vg", "is required for backend 'lvm-thin'".to_string()))?;
                let thinpool = self
                    .thinpool
                    .ok_or(("thinpool", "is required for backend 'lvm-thin'".to_string()))?;
                for (key, value) in [("vg", &vg), ("thinpool", &thinpool)] {
                    if validate_volume_name(value).is_err() {
                        return Err((key, format!("'{value}' is not a valid LVM name")));
                    }
                }
                let max_fill_percent = self
                    .max_fill_percent
                    .unwrap_or_else(default_max_fill_percent);
                if !(1..=100).contains(&max_fill_percent) {
                    return Err((
                        "max_fill_percent",
                        format!("{max_fill_percent} is not between 1 and 100"),
                    ));
                }
                BackendSpec::LvmThin {
                    vg,
                    thinpool,
                    max_fill_percent,
                }
            }
            other => {
                return Err((
                    "backend",
                    format!("unknown backend '{other}' (expected 'file' or 'lvm-thin')"),
                ))
            }
        };
        let cache = match &self.cache {
            Some(word) => word.parse().map_err(|e| ("cache", e))?,
            None => CacheMode::default(),
        };
        let io_engine = match &self.io_engine {
            Some(word) => word.parse().map_err(|e| ("io_engine", e))?,
            None => EngineChoice::default(),
        };
        Ok(PoolSpec {
            name: self.name,
            backend,
            cache,
            io_engine,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::error_chain;
    use std::time::Duration;

    const PATH: &str = "/etc/tandem/tandem.toml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(PATH))
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const NODES: &str = r#"
node = "hv1"
[[nodes]]
name = "hv1"
control = "192.168.1.11:7700"
replication = "10.10.10.11:7788"
"#;

    #[test]
    fn metrics_listen_defaults_to_drbd_reactors_port_and_empty_turns_it_off() {
        let pools = "[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n";
        let default = parse(&format!("{NODES}{pools}")).unwrap();
        assert_eq!(
            default.metrics_listen,
            Some(DEFAULT_METRICS_LISTEN.parse().unwrap())
        );
        let off = parse(&format!("metrics_listen = \"\"\n{NODES}{pools}")).unwrap();
        assert_eq!(off.metrics_listen, None);
        let set = parse(&format!(
            "metrics_listen = \"0.0.0.0:9100\"\n{NODES}{pools}"
        ))
        .unwrap();
        assert_eq!(set.metrics_listen, Some("0.0.0.0:9100".parse().unwrap()));
        let bad = error(&format!("metrics_listen = \"localhost\"\n{NODES}{pools}"));
        assert!(
            bad.contains("metrics_listen: 'localhost' is not an address:port"),
            "{bad}"
        );
    }

    #[test]
    fn the_design_sketch_parses() {
        let text = r#"
node = "hv1"
state_dir = "/var/lib/tandem"
run_dir = "/run/tandem"
secret_file = "/etc/tandem/secret"
[[nodes]]
name = "hv1"
control = "192.168.1.11:7700"
replication = "10.10.10.11:7788"
[[nodes]]
name = "hv2"
control = "192.168.1.12:7700"
replication = "10.10.10.12:7788"
[[nodes]]
name = "witness"
control = "192.168.1.13:7700"
replication = "10.10.10.13:7788"
diskless = true
[[pools]]
name = "nvme"
backend = "lvm-thin"
vg = "vg_nvme"
thinpool = "thin"
[[pools]]
name = "files"
backend = "file"
path = "/var/lib/tandem/images"
[nbd]
tcp_listen = "127.0.0.1:10809"
"#;
        let config = parse(text).unwrap();
        assert_eq!(config.node, "hv1");
        assert_eq!(config.nodes.len(), 3);
        assert!(config.nodes[2].diskless);
        assert_eq!(
            config.pools[0].backend,
            BackendSpec::LvmThin {
                vg: "vg_nvme".into(),
                thinpool: "thin".into(),
                max_fill_percent: 90
            }
        );
        assert_eq!(
            config.pools[1].backend,
            BackendSpec::File {
                path: "/var/lib/tandem/images".into()
            }
        );
        assert_eq!(
            config.nbd.tcp_listen,
            Some("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            config.control_socket(),
            PathBuf::from("/run/tandem/tandemd.sock")
        );
    }

    #[test]
    fn vhost_max_queues_is_read_and_checked() {
        let pools = "[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n";
        let config = parse(&format!(
            "{NODES}{pools}[frontends]\nvhost_max_queues = 8\n"
        ))
        .unwrap();
        assert_eq!(config.frontends.vhost_max_queues, 8);
        let error = parse(&format!(
            "{NODES}{pools}[frontends]\nvhost_max_queues = 0\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("frontends.vhost_max_queues"), "{error}");
    }

    #[test]
    fn defaults_apply() {
        let config = parse(&format!(
            "{NODES}[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n"
        ))
        .unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/tandem"));
        assert_eq!(config.run_dir, PathBuf::from("/run/tandem"));
        assert_eq!(config.secret_file, PathBuf::from("/etc/tandem/secret"));
        assert_eq!(config.nbd.tcp_listen, None);
        assert_eq!(config.frontends.vhost_max_queues, 4);
        assert_eq!(config.vhost_dir(), PathBuf::from("/run/tandem/vhost"));
        assert_eq!(config.pools[0].cache, CacheMode::None);
        assert_eq!(config.pools[0].io_engine, EngineChoice::Auto);
    }

    #[test]
    fn cache_and_io_engine_are_pool_keys() {
        let pool = "[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n";
        let config = parse(&format!(
            "{NODES}{pool}cache = \"writeback\"\nio_engine = \"thread-pool\"\n"
        ))
        .unwrap();
        assert_eq!(config.pools[0].cache, CacheMode::Writeback);
        assert_eq!(config.pools[0].io_engine, EngineChoice::ThreadPool);
        assert!(error(&format!("{NODES}{pool}cache = \"direct\"\n"))
            .contains("pools[0].cache: unknown cache mode 'direct'"));
        assert!(error(&format!("{NODES}{pool}io_engine = \"aio\"\n"))
            .contains("pools[0].io_engine: unknown I/O engine 'aio'"));
    }

    #[test]
    fn unknown_backend_names_file_key_and_choices() {
        let text = format!(
            "{NODES}[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n\
             [[pools]]\nname = \"z\"\nbackend = \"zfs\"\n"
        );
        assert_eq!(
            error(&text),
            "/etc/tandem/tandem.toml: pools[1].backend: unknown backend 'zfs' \
             (expected 'file' or 'lvm-thin')"
        );
    }

    #[test]
    fn cross_field_rules_are_checked() {
        let pool = "[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n";
        assert_eq!(
            error(NODES),
            "/etc/tandem/tandem.toml: pools: node 'hv1' stores volumes and needs at least one \
             [[pools]] entry (add one, or set `diskless = true` in its [[nodes]] entry to make \
             it a tiebreaker)"
        );
        assert!(error(&format!(
            "{}{pool}",
            NODES.replace("node = \"hv1\"", "node = \"hv9\"")
        ))
        .contains("node: this node 'hv9' is not listed"));
        assert!(error(&format!("{NODES}{pool}{pool}"))
            .contains("pools[1].name: pool 'f' is defined twice"));
        assert!(error(&format!(
            "{NODES}[[pools]]\nname = \"f\"\nbackend = \"file\"\n"
        ))
        .contains("pools[0].path: is required for backend 'file'"));
        assert!(error(&format!(
            "{NODES}[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/x\"\nvg = \"vg\"\n"
        ))
        .contains("pools[0].vg: is not a key of backend 'file'"));
        assert!(error(&format!(
            "{NODES}[[pools]]\nname = \"n\"\nbackend = \"lvm-thin\"\nvg = \"vg\"\n"
        ))
        .contains("pools[0].thinpool: is required"));
        assert!(error(&format!(
            "{NODES}[[pools]]\nname = \"n\"\nbackend = \"lvm-thin\"\nvg = \"vg\"\nthinpool = \"t\"\nmax_fill_percent = 0\n"
        ))
        .contains("pools[0].max_fill_percent: 0 is not between 1 and 100"));
        assert!(error(&format!(
            "{NODES}[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"rel\"\n"
        ))
        .contains("pools[0].path: 'rel' must be an absolute path"));
        assert!(error(&format!("state_dir = \"tmp\"\n{NODES}{pool}"))
            .contains("state_dir: 'tmp' must be an absolute path"));
    }

    #[test]
    fn a_diskless_tiebreaker_needs_no_pool() {
        let cluster = |this: &str| {
            format!(
                "node = \"{this}\"\n\
                 [[nodes]]\nname = \"hv1\"\ncontrol = \"10.0.0.1:7700\"\nreplication = \"10.1.0.1:7788\"\n\
                 [[nodes]]\nname = \"hv2\"\ncontrol = \"10.0.0.2:7700\"\nreplication = \"10.1.0.2:7788\"\n\
                 [[nodes]]\nname = \"witness\"\ncontrol = \"10.0.0.3:7700\"\nreplication = \"10.1.0.3:7788\"\n\
                 diskless = true\n"
            )
        };
        let witness = parse(&cluster("witness")).unwrap();
        assert!(witness.is_diskless());
        assert!(witness.pools.is_empty());
        // The same node list without a pool is refused on a data node, naming it.
        let e = error(&cluster("hv2"));
        assert!(
            e.starts_with("/etc/tandem/tandem.toml: pools: node 'hv2' stores volumes"),
            "{e}"
        );
        assert!(e.contains("diskless = true"), "{e}");
        // A witness may still list pools (they stay unused).
        let with_pool = parse(&format!(
            "{}[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n",
            cluster("witness")
        ))
        .unwrap();
        assert!(with_pool.is_diskless());
        assert_eq!(with_pool.pools.len(), 1);
    }

    #[test]
    fn unknown_keys_and_bad_types_name_the_line() {
        let pool = "[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n";
        let e = error(&format!("{NODES}{pool}colour = \"blue\"\n"));
        assert!(e.starts_with("/etc/tandem/tandem.toml: line 11"), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = error(&format!(
            "{}{pool}",
            NODES.replace("10.10.10.11:7788", "not-an-address")
        ));
        assert!(e.contains("line 6"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn the_packaged_example_parses_and_every_commented_key_is_known() {
        let example = include_str!("../../packaging/tandem.toml.example");
        let config = parse(example).unwrap();
        assert_eq!(config.pools[0].name, "files");
        // Uncommenting every `#key = value` line (and `#[table]` header) must stay valid.
        let uncommented: String = example
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if !rest.starts_with(' ')
                        && (rest.starts_with('[') || rest.contains(" = ")) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let config = parse(&uncommented).unwrap();
        assert_eq!(config.nodes.len(), 3);
        assert_eq!(config.pools.len(), 2);
        assert!(config.nbd.tcp_listen.is_some());
    }

    #[test]
    fn replication_defaults_and_bad_values_name_the_key() {
        let pool = "[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n";
        let config = parse(&format!("{NODES}{pool}")).unwrap();
        assert_eq!(config.replication, VolumeOptions::default());
        let config = parse(&format!(
            "{NODES}{pool}[replication]\nprotocol = \"A\"\nresync_rate = \"20M\"\n"
        ))
        .unwrap();
        assert_eq!(config.replication.protocol, replication::role::Protocol::A);
        assert_eq!(config.replication.resync_max_rate_bytes, 20 << 20);
        let config = parse(&format!(
            "{NODES}{pool}[replication]\nresync_max_rate = \"400M\"\nresync_min_rate = \"50M\"\nresync_plan_ahead = \"5s\"\n"
        ))
        .unwrap();
        assert_eq!(config.replication.resync_max_rate_bytes, 400 << 20);
        assert_eq!(config.replication.resync_min_rate_bytes, 50 << 20);
        assert_eq!(config.replication.resync_plan_ahead_ms, 5000);
        let e = error(&format!(
            "{NODES}{pool}[replication]\nresync_max_rate = \"40M\"\nresync_min_rate = \"50M\"\n"
        ));
        assert!(
            e.starts_with(
                "/etc/tandem/tandem.toml: replication.resync_min_rate: 50 MiB/s is above"
            ),
            "{e}"
        );
        let e = error(&format!(
            "{NODES}{pool}[replication]\nresync_plan_ahead = \"1h\"\n"
        ));
        assert!(
            e.starts_with(
                "/etc/tandem/tandem.toml: replication.resync_plan_ahead: '1h' is outside"
            ),
            "{e}"
        );
        let e = error(&format!(
            "{NODES}{pool}[replication]\nafter_split_brain = \"coin-toss\"\n"
        ));
        assert!(
            e.starts_with("/etc/tandem/tandem.toml: replication.after_split_brain: unknown"),
            "{e}"
        );
    }

    #[test]
    fn engine_tunables_are_read_and_bad_values_name_the_key() {
        let pool = "[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n";
        let config = parse(&format!(
            "{NODES}{pool}[engine]\nping_interval = \"200ms\"\npeer_ack_timeout = \"10s\"\n"
        ))
        .unwrap();
        assert_eq!(config.engine.ping_interval, Duration::from_millis(200));
        assert_eq!(
            config.engine.tunables.peer_ack_timeout,
            Duration::from_secs(10)
        );
        let e = error(&format!("{NODES}{pool}[engine]\nreconnect_grace = \"3\"\n"));
        assert!(
            e.starts_with("/etc/tandem/tandem.toml: engine.reconnect_grace: '3' is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn a_cluster_needs_a_private_secret_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        let text = format!(
            "secret_file = \"{}\"\n{NODES}[[nodes]]\nname = \"hv2\"\ncontrol = \"127.0.0.1:7701\"\n\
             replication = \"127.0.0.1:7789\"\n[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n",
            secret.display()
        );
        let config = parse(&text).unwrap();
        let e = error_chain(&config.load_secret().unwrap_err());
        assert!(e.contains("secret_file: the cluster has 2 nodes"), "{e}");
        assert!(e.contains("cannot read the peer secret file"), "{e}");
        std::fs::write(&secret, "s3cret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = error_chain(&config.load_secret().unwrap_err());
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(config.load_secret().unwrap().is_some());
        // One node: no secret needed.
        let single = parse(&format!(
            "{NODES}[[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n"
        ))
        .unwrap();
        assert!(single.load_secret().unwrap().is_none());
    }

    #[test]
    fn a_missing_file_names_it() {
        let e = Config::load(Path::new("/nonexistent/tandem.toml")).unwrap_err();
        assert_eq!(e.to_string(), "cannot read config /nonexistent/tandem.toml");
    }
}
