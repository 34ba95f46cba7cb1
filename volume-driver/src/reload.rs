//! Cluster membership without a restart: reloading `tandem.toml` (SIGHUP or
//! `tandem node reload`) and the node list's digest.
//!
//! A reload re-reads the file the daemon started with and puts it in force only when
//! [`check_reload`] accepts it; otherwise the running config stays and the reason is
//! logged and returned (one line). What a reload may change:
//!
//! - `[[nodes]]`: new nodes become reachable at once (peer calls, new volumes, replica
//!   add); a removed node is refused from then on (peer calls name it unknown, and no
//!   volume lists it, so its replication links find no peer slot). A node that still holds
//!   a replica or tiebreaker of a volume here cannot be removed: evict it first.
//! - `[replication]` defaults for new volumes.
//!
//! Everything else (this node's name and own `[[nodes]]` entry, directories, secret file,
//! pools, NBD, metrics, engine tunables, and turning a one-node install into a cluster) is
//! bound to listeners and open devices: a change is refused with "restart tandemd".
//!
//! [`config_digest`] hashes the node list (sorted by name) so that `tandem node list` shows
//! at a glance which hosts run a different list.

use std::collections::BTreeMap;

use control_api::{ApiError, ErrorKind, NodeConfig, NodeListEntry, Reply};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::peer::{PeerReply, PeerRequest};
use crate::report::error_chain;
use crate::service::VolumeService;

/// How long `node list` waits for each node.
const LIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// sha256 of the node list (name, control, replication, diskless; sorted by name), the
/// first 16 hex digits.
pub fn config_digest(nodes: &[NodeConfig]) -> String {
    let mut sorted: Vec<&NodeConfig> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hash = Sha256::new();
    for n in sorted {
        hash.update(format!(
            "{}\t{}\t{}\t{}\n",
            n.name, n.control, n.replication, n.diskless
        ));
    }
    hash.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a reload changes in the node list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// May `new` replace `old`? `members` maps each node to the volumes here that list it.
pub fn check_reload(
    old: &Config,
    new: &Config,
    members: &BTreeMap<String, Vec<String>>,
) -> Result<NodeDiff, String> {
    let restart = |key: &str| Err(format!("{key} changed; restart tandemd to apply it"));
    if old.node != new.node {
        return restart("node");
    }
    if old.state_dir != new.state_dir {
        return restart("state_dir");
    }
    if old.run_dir != new.run_dir {
        return restart("run_dir");
    }
    if old.secret_file != new.secret_file {
        return restart("secret_file");
    }
    if old.pools != new.pools {
        return restart("[[pools]]");
    }
    if old.nbd != new.nbd {
        return restart("[nbd]");
    }
    if old.frontends != new.frontends {
        return restart("[frontends]");
    }
    if old.engine != new.engine {
        return restart("[engine]");
    }
    if old.metrics_listen != new.metrics_listen {
        return restart("metrics_listen");
    }
    if old.this_node() != new.this_node() {
        return restart(&format!("this node's [[nodes]] entry ('{}')", old.node));
    }
    if old.is_cluster() != new.is_cluster() {
        return restart("the number of nodes (one-node install vs cluster)");
    }
    let mut diff = NodeDiff::default();
    for n in &old.nodes {
        match new.node_named(&n.name) {
            None => {
                if let Some(volumes) = members.get(&n.name).filter(|v| !v.is_empty()) {
                    return Err(format!(
                        "node '{}' still holds volume(s) {} here; run `tandem node evict {}` \
                         before removing it",
                        n.name,
                        volumes.join(", "),
                        n.name
                    ));
                }
                diff.removed.push(n.name.clone());
            }
            Some(now) if now != n && members.get(&n.name).is_some_and(|v| !v.is_empty()) => {
                return Err(format!(
                    "node '{}' changed its addresses or diskless flag while it holds volumes \
                     here; restart tandemd to apply it",
                    n.name
                ));
            }
            Some(_) => {}
        }
    }
    for n in &new.nodes {
        if old.node_named(&n.name).is_none() {
            diff.added.push(n.name.clone());
        }
    }
    Ok(diff)
}

impl VolumeService {
    /// Re-read the config file and put it in force if [`check_reload`] accepts it.
    pub async fn reload(&self) -> Result<Reply, ApiError> {
        let old = self.config();
        let refused = |reason: String| {
            tracing::error!(config = %old.path.display(), reason = %reason,
                "config reload refused; keeping the running config");
            ApiError::new(
                ErrorKind::InvalidArgument,
                format!("reload refused, running config kept: {reason}"),
            )
        };
        let path = old.path.clone();
        let new = crate::service::blocking(move || {
            Config::load(&path)
                .map_err(|e| ApiError::new(ErrorKind::InvalidArgument, error_chain(&e)))
        })
        .await
        .map_err(|e| refused(e.message))?;
        let diff = check_reload(&old, &new, &self.node_members()).map_err(refused)?;
        let digest = config_digest(&new.nodes);
        self.set_config(new);
        tracing::info!(config = %old.path.display(), digest = %digest, added = ?diff.added,
            removed = ?diff.removed, "config reloaded");
        Ok(Reply::Reloaded {
            config_digest: digest,
            added: diff.added,
            removed: diff.removed,
        })
    }

    /// Every node that a volume here lists (data or tiebreaker), with those volumes.
    pub(crate) fn node_members(&self) -> BTreeMap<String, Vec<String>> {
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for definition in self.list() {
            for node in definition.nodes.iter().chain(&definition.tiebreakers) {
                members
                    .entry(node.clone())
                    .or_default()
                    .push(definition.name.clone());
            }
        }
        members
    }

    /// `node_list`: every configured node, this one first, asked for its digest.
    pub async fn node_list(&self) -> Vec<NodeListEntry> {
        let config = self.config();
        let mut nodes: Vec<&NodeConfig> = config.nodes.iter().collect();
        nodes.sort_by_key(|n| n.name != config.node);
        let mut out = Vec::with_capacity(nodes.len());
        for node in nodes {
            let this_node = node.name == config.node;
            let answer = if this_node {
                Ok(config_digest(&config.nodes))
            } else {
                match tokio::time::timeout(
                    LIST_TIMEOUT,
                    self.on_node(&node.name, PeerRequest::NodeInfo),
                )
                .await
                {
                    Ok(Ok(PeerReply::Node { node })) => Ok(node.config_digest),
                    Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
                    Ok(Err(e)) => Err(e.message),
                    Err(_) => Err(format!("no answer within {}s", LIST_TIMEOUT.as_secs())),
                }
            };
            let (reachable, config_digest, error) = match answer {
                Ok(digest) => (true, Some(digest), None),
                Err(e) => (false, None, Some(e)),
            };
            out.push(NodeListEntry {
                node: node.clone(),
                this_node,
                reachable,
                config_digest,
                error,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra_nodes: &str, extra: &str) -> Config {
        let text = format!(
            "node = \"hv1\"\n{extra}\
             [[nodes]]\nname = \"hv1\"\ncontrol = \"10.0.0.1:7700\"\nreplication = \"10.1.0.1:7788\"\n\
             [[nodes]]\nname = \"hv2\"\ncontrol = \"10.0.0.2:7700\"\nreplication = \"10.1.0.2:7788\"\n\
             {extra_nodes}\
             [[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n"
        );
        Config::parse(&text, Path::new("/etc/tandem/tandem.toml")).unwrap()
    }

    const HV3: &str =
        "[[nodes]]\nname = \"hv3\"\ncontrol = \"10.0.0.3:7700\"\nreplication = \"10.1.0.3:7788\"\n";

    #[test]
    fn a_new_node_is_accepted_and_changes_the_digest() {
        let old = config("", "");
        let new = config(HV3, "");
        let diff = check_reload(&old, &new, &BTreeMap::new()).unwrap();
        assert_eq!(diff.added, vec!["hv3".to_string()]);
        assert!(diff.removed.is_empty());
        assert_ne!(config_digest(&old.nodes), config_digest(&new.nodes));
        // The digest ignores the order of the entries.
        let mut reversed = new.nodes.clone();
        reversed.reverse();
        assert_eq!(config_digest(&reversed), config_digest(&new.nodes));
        assert_eq!(config_digest(&new.nodes).len(), 16);
    }

    #[test]
    fn removing_a_node_that_holds_volumes_is_refused_naming_them() {
        let old = config(HV3, "");
        let new = config("", "");
        let members = BTreeMap::from([("hv3".to_string(), vec!["vm-1".to_string()])]);
        let e = check_reload(&old, &new, &members).unwrap_err();
        assert_eq!(
            e,
            "node 'hv3' still holds volume(s) vm-1 here; run `tandem node evict hv3` before removing it"
        );
        let diff = check_reload(&old, &new, &BTreeMap::new()).unwrap();
        assert_eq!(diff.removed, vec!["hv3".to_string()]);
    }

    #[test]
    fn what_is_bound_at_start_needs_a_restart() {
        let old = config("", "");
        let e = check_reload(
            &old,
            &config("", "run_dir = \"/run/other\"\n"),
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(e, "run_dir changed; restart tandemd to apply it");
        let moved = Config {
            nodes: {
                let mut n = old.nodes.clone();
                n[0].control = "10.0.0.9:7700".parse().unwrap();
                n
            },
            ..old.clone()
        };
        let e = check_reload(&old, &moved, &BTreeMap::new()).unwrap_err();
        assert!(
            e.starts_with("this node's [[nodes]] entry ('hv1') changed"),
            "{e}"
        );
        // Replication defaults may change.
        let defaults = config("", "[replication]\nprotocol = \"A\"\n");
        assert!(check_reload(&old, &defaults, &BTreeMap::new()).is_ok());
    }
}
