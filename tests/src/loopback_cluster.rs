//! Several `tandemd`s on 127.0.0.1, each with its own directory and its own control and
//! replication ports, sharing one secret: the cheapest cluster for lifecycle tests of the
//! peer control API and the replication engine. (Hosts with their own network namespaces
//! and fault injection are the namespace cluster fixture's job.)
//!
//! ```text
//! <secret dir>/secret (0600)   node i: <tmp_i>/tandem.toml, state/, run/, images/, tandemd.log
//! ```
//!
//! A diskless node's config has no `[[pools]]`, as on a real tiebreaker.
//!
//! Dropping the cluster kills every daemon and removes the directories.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::TandemNode;

/// Loopback ports that were free a moment ago (bound to port 0, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// One node of a [`LoopbackCluster`] as configured.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub control_port: u16,
    pub replication_port: u16,
    pub diskless: bool,
}

/// A cluster of daemons on loopback.
pub struct LoopbackCluster {
    pub specs: Vec<NodeSpec>,
    pub nodes: Vec<TandemNode>,
    secret_dir: tempfile::TempDir,
}

impl LoopbackCluster {
    /// Write the configs of `names` (`(name, diskless)`) and start every daemon.
    pub fn start(names: &[(&str, bool)]) -> LoopbackCluster {
        let mut cluster = LoopbackCluster::new(names);
        for node in &mut cluster.nodes {
            node.start();
        }
        cluster
    }

    /// Write the configs without starting the daemons.
    pub fn new(names: &[(&str, bool)]) -> LoopbackCluster {
        let secret_dir = tempfile::Builder::new()
            .prefix("tandem-secret")
            .tempdir()
            .expect("create secret dir");
        let secret = secret_dir.path().join("secret");
        std::fs::write(&secret, format!("loopback-{}\n", std::process::id())).expect("secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
            .expect("chmod secret");
        let ports = free_ports(names.len() * 2);
        let specs: Vec<NodeSpec> = names
            .iter()
            .enumerate()
            .map(|(i, (name, diskless))| NodeSpec {
                name: name.to_string(),
                control_port: ports[2 * i],
                replication_port: ports[2 * i + 1],
                diskless: *diskless,
            })
            .collect();
        let nodes_toml: String = specs
            .iter()
            .map(|s| {
                format!(
                    "\n[[nodes]]\nname = \"{}\"\ncontrol = \"127.0.0.1:{}\"\nreplication = \"127.0.0.1:{}\"\ndiskless = {}\n",
                    s.name, s.control_port, s.replication_port, s.diskless
                )
            })
            .collect();
        let nodes = specs
            .iter()
            .map(|spec| {
                TandemNode::with_config(|root| {
                    // A diskless tiebreaker stores nothing: no pool.
                    let pool = if spec.diskless {
                        String::new()
                    } else {
                        format!(
                            "\n[[pools]]\nname = \"files\"\nbackend = \"file\"\npath = \"{}/images\"\n",
                            root.display()
                        )
                    };
                    format!(
                        "node = \"{name}\"\nstate_dir = \"{root}/state\"\nrun_dir = \"{root}/run\"\n\
                         secret_file = \"{secret}\"\n{nodes_toml}{pool}",
                        name = spec.name,
                        root = root.display(),
                        secret = secret.display(),
                    )
                })
            })
            .collect();
        LoopbackCluster {
            specs,
            nodes,
            secret_dir,
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &TandemNode {
        let i = self.index(name);
        &self.nodes[i]
    }

    /// The node named `name`, mutably (to stop or restart it).
    pub fn node_mut(&mut self, name: &str) -> &mut TandemNode {
        let i = self.index(name);
        &mut self.nodes[i]
    }

    fn index(&self, name: &str) -> usize {
        self.specs
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// The shared secret file.
    pub fn secret_file(&self) -> PathBuf {
        self.secret_dir.path().join("secret")
    }

    /// Every daemon's log, labelled, for failure messages.
    pub fn logs(&self) -> String {
        self.specs
            .iter()
            .zip(&self.nodes)
            .map(|(s, n)| format!("==== {} ====\n{}", s.name, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
