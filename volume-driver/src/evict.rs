//! `tandem node evict NODE`: every replicated volume with a replica on NODE is moved, one
//! at a time, to `--to` or to the data node with the most free space in its first pool.
//! The volumes this node holds are moved from here ([`VolumeService::replica_move`]); the
//! ones only other nodes know (asked with `evict_candidates`) are moved by one of their
//! members (`evict_add`, wait for UpToDate, `evict_remove`). The choice per volume is kept in
//! `<state_dir>/evict/<NODE>.json` until the evict finished, so running it again after a
//! crash resumes with the same targets (by then a node of the volume, which the free-space
//! choice would skip). Progress is logged per volume (`step`, `of`).

use control_api::{ApiError, ErrorKind, EvictMove, EvictStep, Reply, VolumeState};

use crate::membership::refused;
use crate::peer::{PeerReply, PeerRequest};
use crate::service::{blocking, VolumeService};
use crate::store::VolumeDefinition;

impl VolumeService {
    /// `node_evict`: move every replica on `node`.
    pub async fn evict(&self, node: &str, to: Option<&str>) -> Result<Reply, ApiError> {
        let config = self.config();
        if node == config.node {
            return Err(refused(format!(
                "cannot evict this node ('{node}') from itself; run `tandem node evict {node}` \
                 on another node"
            )));
        }
        if config.node_named(node).is_none() {
            return Err(refused(format!(
                "node '{node}' is not in {}",
                config.path.display()
            )));
        }
        if let Some(to) = to {
            if to == node {
                return Err(refused("--to names the evicted node".into()));
            }
            match config.node_named(to) {
                None => {
                    return Err(refused(format!(
                        "node '{to}' is not in {}",
                        config.path.display()
                    )))
                }
                Some(n) if n.diskless => {
                    return Err(refused(format!(
                        "node '{to}' is a diskless tiebreaker and cannot hold a data replica"
                    )))
                }
                Some(_) => {}
            }
        }
        let (volumes, unasked) = self.evict_candidates(node).await;
        let total = volumes.len();
        let _shown = ShownStep(self, node.to_string());
        let mut moves = Vec::new();
        // Where each volume goes, kept until the evict finished: a resumed evict picks
        // the same node (by then a node of the volume, so free space would not pick it).
        let mut plan = self.evict_plan(node).await?;
        for (i, (definition, via)) in volumes.into_iter().enumerate() {
            let name = definition.name.clone();
            let target = match (plan.get(&name), to) {
                (Some(planned), _) => planned.clone(),
                (None, Some(to)) => to.to_string(),
                (None, None) => self.roomiest_node(&definition, node).await?,
            };
            if plan.insert(name.clone(), target.clone()).is_none() {
                self.save_evict_plan(node, Some(&plan)).await?;
            }
            self.lock_evict_steps().insert(
                node.to_string(),
                EvictStep {
                    volume: name.clone(),
                    to: target.clone(),
                    step: i + 1,
                    of: total,
                },
            );
            tracing::info!(volume = %name, from = node, to = %target, via = via.as_deref().unwrap_or("this node"),
                step = i + 1, of = total, "evict: moving the replica");
            let moved = match &via {
                None => self.replica_move(&name, node, &target).await.map(drop),
                Some(via) => self.move_via(via, &definition, node, &target).await,
            };
            moved.map_err(|e| {
                ApiError::new(
                    e.kind,
                    format!(
                        "evict of '{node}' stopped at volume '{name}' ({} of {total}, moved so \
                         far: {}): {}; run it again to resume",
                        i + 1,
                        moves.len(),
                        e.message
                    ),
                )
            })?;
            tracing::info!(volume = %name, from = node, to = %target, step = i + 1, of = total,
                "evict: volume moved");
            moves.push(EvictMove {
                volume: name,
                to: target,
            });
        }
        self.save_evict_plan(node, None).await?;
        if !unasked.is_empty() {
            return Err(ApiError::new(
                ErrorKind::Peer,
                format!(
                    "evict of '{node}' moved {} volume(s), but {} did not answer: a volume \
                     known only there was not checked; run it again once they answer",
                    moves.len(),
                    unasked.join("; ")
                ),
            ));
        }
        Ok(Reply::Evicted {
            node: node.to_string(),
            moves,
        })
    }

    /// The volume an evict of `node` running here is moving now.
    pub fn evict_step(&self, node: &str) -> Option<EvictStep> {
        self.lock_evict_steps().get(node).cloned()
    }

    fn lock_evict_steps(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, EvictStep>> {
        self.evict_steps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replicated volumes this node knows with a replica on `node`.
    pub fn volumes_with(&self, node: &str) -> Vec<VolumeDefinition> {
        self.list()
            .into_iter()
            .filter(|v| v.state == VolumeState::Ok || v.diskless)
            .filter_map(|v| self.definition(&v.name).ok())
            .filter(|d| d.is_replicated() && d.nodes.iter().any(|n| n == node))
            .collect()
    }

    /// Every volume with a replica on `node`: the ones this node knows (moved from here,
    /// `None`), then the ones only other nodes know, each with the node that moves it (a
    /// data node if one knows it). Also the nodes that did not answer, with the reason.
    async fn evict_candidates(
        &self,
        node: &str,
    ) -> (Vec<(VolumeDefinition, Option<String>)>, Vec<String>) {
        let mut volumes: Vec<(VolumeDefinition, Option<String>)> = self
            .volumes_with(node)
            .into_iter()
            .map(|d| (d, None))
            .collect();
        let config = self.config();
        let mut others: Vec<_> = config
            .nodes
            .iter()
            .filter(|n| n.name != config.node && n.name != node)
            .collect();
        others.sort_by_key(|n| n.diskless);
        let mut unasked = Vec::new();
        for other in others {
            let request = PeerRequest::EvictCandidates {
                node: node.to_string(),
            };
            match self.on_node(&other.name, request).await {
                Ok(PeerReply::Definitions { volumes: known }) => {
                    for definition in known {
                        if !volumes.iter().any(|(d, _)| d.name == definition.name) {
                            volumes.push((definition, Some(other.name.clone())));
                        }
                    }
                }
                Ok(reply) => unasked.push(format!("{}: unexpected answer {reply:?}", other.name)),
                Err(e) => unasked.push(e.message),
            }
        }
        (volumes, unasked)
    }

    /// Move `definition`'s replica from `from` to `to` through `via`, a member of the
    /// volume (this node is not): add there unless done, wait for UpToDate, remove there.
    /// Each step is one the member coordinates and journals; running it again resumes.
    async fn move_via(
        &self,
        via: &str,
        definition: &VolumeDefinition,
        from: &str,
        to: &str,
    ) -> Result<(), ApiError> {
        let name = definition.name.clone();
        if !definition.nodes.iter().any(|n| n == to) {
            let add = PeerRequest::EvictAdd {
                name: name.clone(),
                node: to.to_string(),
            };
            self.on_node(via, add).await?;
        }
        self.wait_up_to_date(&name, to).await?;
        let remove = PeerRequest::EvictRemove {
            name,
            node: from.to_string(),
        };
        self.on_node(via, remove).await.map(drop)
    }

    /// `<state_dir>/evict/<node>.json`: volume → target of an evict in progress.
    fn evict_plan_path(&self, node: &str) -> std::path::PathBuf {
        self.config()
            .state_dir
            .join("evict")
            .join(format!("{node}.json"))
    }

    async fn evict_plan(
        &self,
        node: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
        let path = self.evict_plan_path(node);
        blocking(move || match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::new(
                    ErrorKind::Storage,
                    format!("{} is corrupt: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(ApiError::new(
                ErrorKind::Storage,
                format!("cannot read {}: {e}", path.display()),
            )),
        })
        .await
    }

    /// Write the plan durably (atomic rename), or remove it (`None`).
    async fn save_evict_plan(
        &self,
        node: &str,
        plan: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<(), ApiError> {
        let path = self.evict_plan_path(node);
        let json = plan
            .map(serde_json::to_vec_pretty)
            .transpose()
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        blocking(move || {
            let io = |e: std::io::Error| {
                ApiError::new(
                    ErrorKind::Storage,
                    format!("cannot write {}: {e}", path.display()),
                )
            };
            let dir = path.parent().unwrap_or(std::path::Path::new("/"));
            std::fs::create_dir_all(dir).map_err(io)?;
            match json {
                Some(json) => {
                    let tmp = path.with_extension("tmp");
                    let mut file = std::fs::File::create(&tmp).map_err(io)?;
                    std::io::Write::write_all(&mut file, &json).map_err(io)?;
                    file.sync_all().map_err(io)?;
                    std::fs::rename(&tmp, &path).map_err(io)?;
                }
                None => match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(io(e)),
                },
            }
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)
        })
        .await
    }

    /// The data node (not of the volume, not `evicted`) with the most free bytes in its
    /// first pool, among those that answer.
    async fn roomiest_node(
        &self,
        definition: &VolumeDefinition,
        evicted: &str,
    ) -> Result<String, ApiError> {
        let config = self.config();
        let mut best: Option<(u64, String)> = None;
        let mut why = Vec::new();
        for candidate in config
            .nodes
            .iter()
            .filter(|n| !n.diskless && n.name != evicted && !definition.nodes.contains(&n.name))
        {
            match self.on_node(&candidate.name, PeerRequest::PoolList).await {
                Ok(PeerReply::Pools { pools }) => {
                    let free = pools.first().map_or(0, |p| p.free_bytes);
                    if free >= definition.size_bytes && best.as_ref().is_none_or(|b| free > b.0) {
                        best = Some((free, candidate.name.clone()));
                    } else if free < definition.size_bytes {
                        why.push(format!(
                            "{}: {} free",
                            candidate.name,
                            crate::units::format_size(free)
                        ));
                    }
                }
                Ok(_) => why.push(format!("{}: unexpected answer", candidate.name)),
                Err(e) => why.push(format!("{}: {}", candidate.name, e.message)),
            }
        }
        best.map(|(_, n)| n).ok_or_else(|| {
            refused(format!(
                "no node can take a replica of '{}' ({} needed){}",
                definition.name,
                crate::units::format_size(definition.size_bytes),
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {}", why.join("; "))
                }
            ))
        })
    }
}

/// Clears the evict's step when the evict returns, however it returns.
struct ShownStep<'a>(&'a VolumeService, String);

impl Drop for ShownStep<'_> {
    fn drop(&mut self) {
        self.0.lock_evict_steps().remove(&self.1);
    }
}
