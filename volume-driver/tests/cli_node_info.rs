//! `tandem node info --pools` against a real tandemd: the node info and `pool list`'s array
//! in one answer (the Proxmox plugin's status polls it), and a pool whose backend cannot be
//! queried reported in its entry without failing the command.

#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const TANDEMD: &str = env!("CARGO_BIN_EXE_tandemd");
const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// tandemd on a single-node config with the file pools `files` and `spare`, killed on drop.
struct Daemon {
    child: Child,
    config: PathBuf,
    spare: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let config = root.join("tandem.toml");
        let spare = root.join("spare");
        std::fs::write(
            &config,
            format!(
                "node = \"hv1\"\nstate_dir = \"{root}/state\"\nrun_dir = \"{root}/run\"\n\
                 secret_file = \"{root}/secret\"\n\n\
                 [[nodes]]\nname = \"hv1\"\ncontrol = \"127.0.0.1:7700\"\n\
                 replication = \"127.0.0.1:7788\"\n\n\
                 [[pools]]\nname = \"files\"\nbackend = \"file\"\npath = \"{root}/images\"\n\n\
                 [[pools]]\nname = \"spare\"\nbackend = \"file\"\npath = \"{spare}\"\n",
                root = root.display(),
                spare = spare.display(),
            ),
        )
        .unwrap();
        let child = Command::new(TANDEMD)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let socket = root.join("run/tandemd.sock");
        let daemon = Daemon {
            child,
            config,
            spare,
            _dir: dir,
        };
        let started = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tandemd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn tandem(&self, args: &[&str]) -> Output {
        Command::new(TANDEM)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("TANDEM_CONFIG")
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.tandem(args);
        assert!(out.status.success(), "tandem {args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pool entry without the numbers the host file system may change between two calls.
fn stable(pool: &Value) -> Value {
    let mut pool = pool.clone();
    let map = pool.as_object_mut().unwrap();
    map.remove("used_bytes");
    map.remove("free_bytes");
    pool
}

#[test]
fn node_info_with_pools_is_node_info_plus_pool_list() {
    let daemon = Daemon::start();
    let info = daemon.json(&["--json", "node", "info"]);
    let pools = daemon.json(&["--json", "pool", "list"]);
    let both = daemon.json(&["--json", "node", "info", "--pools"]);

    let mut node_part = both.clone();
    let pool_list = node_part
        .as_object_mut()
        .unwrap()
        .remove("pool_list")
        .unwrap();
    assert_eq!(node_part, info, "the node info, unchanged");
    let pool_list = pool_list.as_array().unwrap();
    assert_eq!(pool_list.len(), 2);
    assert_eq!(
        pool_list.iter().map(stable).collect::<Vec<_>>(),
        pools
            .as_array()
            .unwrap()
            .iter()
            .map(stable)
            .collect::<Vec<_>>(),
        "`pool list`'s array"
    );
    assert!(pool_list[0]["total_bytes"].as_u64().unwrap() > 0);

    let human = daemon.tandem(&["node", "info", "--pools"]);
    assert!(human.status.success(), "{human:?}");
    let text = String::from_utf8(human.stdout).unwrap();
    assert!(text.starts_with("node:       hv1\n"), "{text}");
    assert!(text.contains("\nPOOL "), "the pool table: {text}");
}

#[test]
fn a_failing_pool_is_reported_without_failing_node_info_pools() {
    let daemon = Daemon::start();
    std::fs::remove_dir_all(&daemon.spare).unwrap();

    let both = daemon.json(&["--json", "node", "info", "--pools"]);
    let pool_list = both["pool_list"].as_array().unwrap();
    assert_eq!(pool_list[0]["name"], "files");
    assert!(pool_list[0].get("error").is_none(), "{both}");
    assert_eq!(pool_list[1]["name"], "spare");
    let error = pool_list[1]["error"].as_str().unwrap();
    assert!(error.contains(&*daemon.spare.to_string_lossy()), "{error}");

    // `pool list` fails on the same pool.
    let out = daemon.tandem(&["--json", "pool", "list"]);
    assert!(!out.status.success(), "{out:?}");
}

#[test]
fn help_documents_the_flag() {
    let out = Command::new(TANDEM)
        .args(["node", "info", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("--pools"), "{help}");
    assert!(help.contains("pool list"), "{help}");
}
