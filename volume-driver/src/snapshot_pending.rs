//! Pending snapshots left behind when `tandem snapshot create` stopped half-way (a crash, a
//! kill, a node that went away), and how each node resolves its own.
//!
//! A snapshot is taken under its pending name on every data node and renamed to its final
//! name on each only after every node took it and the coordinator found the cut good
//! ([`crate::snapshot`]); a failed command removes what it took. So a final name on any
//! node means the decision was "keep", and a pending snapshot that no command works on any
//! more is resolved by one rule:
//!
//! - final on some data node: rename it here too (roll forward);
//! - final on none: remove it here (roll back).
//!
//! Whether a command works on it is asked of every node of the volume (the coordinator is
//! one of them): each keeps the snapshots its running `snapshot create`s take in memory
//! ([`VolumeService::snapshot_in_flight`]), so a coordinator that crashed or restarted
//! answers "none". That question is asked only after the pending snapshot was seen here,
//! and the final names only after every node answered "none", when no command renames
//! anything any more; so the rule never races a running command. A node that cannot be
//! asked decides nothing: the snapshot stays pending (never listed) and is tried again.
//!
//! Each node resolves its own leftovers ([`VolumeService::run_pending_snapshots`]): every
//! one found at daemon start, and every one it took whose command neither committed nor
//! discarded it within [`STALE_AFTER`] (its coordinator may have died while this node
//! stayed up); undecided ones are tried again every [`RETRY_INTERVAL`]. A volume rename
//! carries its take records to the new name ([`VolumeService::rename_takes`]), and an
//! undecided leftover whose volume is gone makes the node look for leftovers again, so
//! one renamed meanwhile is found under its new name. A `snapshot
//! create` that finds a leftover of its name resolves it first (`replica_snapshot_check`).
//! Only a data node's own copy is ever touched, and nothing is listed or polled while no
//! snapshot is pending.
//!
//! **Ownership.** A resolution holds the node's lock of that `(volume, snapshot)` for all
//! of its steps and a take needs it too, so no command's take lands between a resolution's
//! question and its decision. Each take is recorded with its command's token before it is
//! attempted, and a commit or discard must carry the same token: a command never renames or
//! removes another one's copy, nor forgets its record.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use control_api::{ApiError, ErrorKind};

use crate::links::Links;
use crate::peer::{PeerReply, PeerRequest};
use crate::service::{blocking, lock_set, pool_error, VolumeService};

/// How often leftovers are looked at (and undecided ones tried again).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// How long a snapshot taken here may stay pending before this node resolves it itself.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// What became of a pending snapshot here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Final on another node: renamed to its final name here too (or final here already).
    Kept,
    /// Final nowhere: removed.
    Removed,
}

/// A `(volume, snapshot)` held in a set of this node (a command taking it, or its lock);
/// released when dropped.
pub(crate) struct Held<'a> {
    set: &'a Mutex<BTreeSet<(String, String)>>,
    key: (String, String),
}

impl<'a> Held<'a> {
    /// Hold `name@snapshot` in `set`, unless it is held already.
    fn new(set: &'a Mutex<BTreeSet<(String, String)>>, name: &str, snapshot: &str) -> Option<Self> {
        let key = (name.to_string(), snapshot.to_string());
        let inserted = lock_set(set).insert(key.clone());
        // Built only when inserted: dropping one releases the key.
        inserted.then(|| Held { set, key })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        lock_set(self.set).remove(&self.key);
    }
}

/// A snapshot taken here under its pending name by the command holding `token`, since
/// `since`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Take {
    pub since: Instant,
    pub token: u64,
}

/// The names in a `names` answer, or why there are none.
fn names(node: &str, answer: Result<PeerReply, ApiError>) -> Result<BTreeSet<String>, String> {
    match answer {
        Ok(PeerReply::Names { names }) => Ok(names.into_iter().collect()),
        Ok(other) => Err(format!("node '{node}' answered {other:?}")),
        Err(e) => Err(format!("node '{node}' cannot be asked: {}", e.message)),
    }
}

impl VolumeService {
    /// Record that a command here takes `name@snapshot` until the guard is dropped; refused
    /// while another command here takes it.
    pub(crate) fn snapshot_in_flight(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<Held<'_>, ApiError> {
        Held::new(&self.snapshots_in_flight, name, snapshot).ok_or_else(|| {
            ApiError::new(
                ErrorKind::Busy,
                format!("snapshot '{name}@{snapshot}' is being taken by another command"),
            )
        })
    }

    /// This node's lock of `name@snapshot` (see the module doc); refused while held.
    pub(crate) fn lock_snapshot(&self, name: &str, snapshot: &str) -> Result<Held<'_>, ApiError> {
        Held::new(&self.snapshots_locked, name, snapshot).ok_or_else(|| {
            ApiError::new(
                ErrorKind::Busy,
                format!(
                    "snapshot '{name}@{snapshot}' is being taken or resolved on '{}'; try again",
                    self.config().node
                ),
            )
        })
    }

    /// Peer `replica_snapshots_in_flight`: the snapshots of `name` this node's commands
    /// are taking.
    pub fn snapshots_in_flight(&self, name: &str) -> Vec<String> {
        lock_set(&self.snapshots_in_flight)
            .iter()
            .filter(|(volume, _)| volume == name)
            .map(|(_, snapshot)| snapshot.clone())
            .collect()
    }

    /// Resolve this node's pending `name@snapshot` (see the module doc); the error says why
    /// it cannot be decided now.
    pub async fn resolve_pending(&self, name: &str, snapshot: &str) -> Result<Resolution, String> {
        let _locked = self.lock_snapshot(name, snapshot).map_err(|e| e.message)?;
        let definition = self.definition(name).map_err(|e| e.message)?;
        let here_now = self
            .local_snapshot_names(name)
            .await
            .map_err(|e| e.message)?;
        if !here_now.pending.iter().any(|s| s == snapshot) {
            // Its command committed or discarded it meanwhile.
            self.forget_take(name, snapshot);
            return Ok(match here_now.done.iter().any(|s| s == snapshot) {
                true => Resolution::Kept,
                false => Resolution::Removed,
            });
        }
        let here = self.config().node.clone();
        let data = self.data_nodes(&definition);
        let members = if definition.is_replicated() {
            self.ordered_nodes(&definition)
        } else {
            data.clone()
        };
        let mut links = Links::default();
        let ask = |request: PeerRequest, nodes: &[String]| {
            nodes
                .iter()
                .map(|n| (n.clone(), request.clone()))
                .collect::<Vec<_>>()
        };
        let in_flight = PeerRequest::ReplicaSnapshotsInFlight {
            name: name.to_string(),
        };
        let answers = self
            .call_at_once(&mut links, ask(in_flight, &members))
            .await;
        for (node, answer) in members.iter().zip(answers) {
            if names(node, answer)?.contains(snapshot) {
                return Err(format!("a command on '{node}' is taking it"));
            }
        }
        let list = PeerRequest::ReplicaSnapshotList {
            name: name.to_string(),
        };
        let answers = self.call_at_once(&mut links, ask(list, &data)).await;
        let mut kept_on = None;
        for (node, answer) in data.iter().zip(answers) {
            if names(node, answer)?.contains(snapshot) {
                kept_on = Some(node.clone());
            }
        }
        let backend = self.backend_of(&definition).map_err(|e| e.message)?;
        let (volume, snap) = (name.to_string(), snapshot.to_string());
        let resolution = match kept_on {
            Some(_) => Resolution::Kept,
            None => Resolution::Removed,
        };
        let kept_here = kept_on.as_deref() == Some(here.as_str());
        blocking(move || {
            match resolution {
                // Final here already: the pending one is a stray copy.
                Resolution::Kept if !kept_here => backend.commit_snapshot(&volume, &snap),
                _ => backend.discard_snapshot(&volume, &snap),
            }
            .map_err(pool_error)
        })
        .await
        .map_err(|e| e.message)?;
        self.forget_take(name, snapshot);
        tracing::warn!(volume = %name, snapshot, ?resolution, kept_on = ?kept_on,
            "resolved a snapshot left pending by an interrupted `snapshot create`");
        Ok(resolution)
    }

    /// Remember, before it is attempted, that the command holding `token` takes
    /// `name@snapshot` here under its pending name (it commits or discards it; past
    /// [`STALE_AFTER`] this node resolves it). Returns the record it replaced.
    pub(crate) fn note_take(&self, name: &str, snapshot: &str, token: u64) -> Option<Take> {
        let take = Take {
            since: Instant::now(),
            token,
        };
        lock_set(&self.snapshots_taken).insert((name.to_string(), snapshot.to_string()), take)
    }

    /// Put back the record a take replaced (`None`: there was none).
    pub(crate) fn restore_take(&self, name: &str, snapshot: &str, previous: Option<Take>) {
        let key = (name.to_string(), snapshot.to_string());
        let mut taken = lock_set(&self.snapshots_taken);
        match previous {
            Some(take) => taken.insert(key, take),
            None => taken.remove(&key),
        };
    }

    /// The token of the command whose take of `name@snapshot` this node records, if any.
    pub(crate) fn take_token(&self, name: &str, snapshot: &str) -> Option<u64> {
        lock_set(&self.snapshots_taken)
            .get(&(name.to_string(), snapshot.to_string()))
            .map(|t| t.token)
    }

    /// Its command committed or discarded `name@snapshot` here (or it was resolved).
    pub(crate) fn forget_take(&self, name: &str, snapshot: &str) {
        lock_set(&self.snapshots_taken).remove(&(name.to_string(), snapshot.to_string()));
    }

    /// The volume `from` is now named `to` (its storage and pending copies were renamed):
    /// its take records follow (see [`crate::rename`]).
    pub(crate) fn rename_takes(&self, from: &str, to: &str) {
        let mut taken = lock_set(&self.snapshots_taken);
        let moved: Vec<(String, String)> = taken
            .keys()
            .filter(|(volume, _)| volume == from)
            .cloned()
            .collect();
        for key in moved {
            if let Some(take) = taken.remove(&key) {
                taken.insert((to.to_string(), key.1), take);
            }
        }
    }

    /// Every pending snapshot in this node's pools, of volumes defined here.
    async fn pending_here(&self) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        for backend in self.pool_backends() {
            match blocking(move || backend.pending_snapshots().map_err(pool_error)).await {
                Ok(pending) => found.extend(pending),
                Err(e) => tracing::warn!(error = %e.message, "cannot list pending snapshots"),
            }
        }
        found.retain(|(volume, snapshot)| {
            let defined = self.definition(volume).is_ok();
            if !defined {
                // Storage of no volume defined here: not this daemon's to decide.
                tracing::warn!(volume = %volume, snapshot = %snapshot,
                    "a pending snapshot of a volume not defined here; left alone");
            }
            defined
        });
        found
    }

    /// Snapshots taken here that stayed pending longer than [`STALE_AFTER`].
    fn stale_takes(&self) -> Vec<(String, String)> {
        lock_set(&self.snapshots_taken)
            .iter()
            .filter(|(_, take)| take.since.elapsed() > STALE_AFTER)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Resolve the pending snapshots found here at start, then every [`RETRY_INTERVAL`]
    /// the stale ones this node took and those still undecided, forever (tandemd spawns
    /// this; see the module doc).
    pub async fn run_pending_snapshots(&self) {
        let mut undecided = self.pending_here().await;
        loop {
            undecided.extend(self.stale_takes());
            let mut left = BTreeSet::new();
            let mut gone = false;
            for (volume, snapshot) in undecided {
                if self.definition(&volume).is_err() {
                    self.forget_take(&volume, &snapshot);
                    gone = true;
                    continue;
                }
                if let Err(why) = self.resolve_pending(&volume, &snapshot).await {
                    tracing::info!(volume = %volume, snapshot = %snapshot, reason = %why,
                        "a pending snapshot stays pending for now");
                    left.insert((volume, snapshot));
                }
            }
            if gone {
                // Deleted, or renamed: a renamed volume's leftovers are under its new name.
                left.extend(self.pending_here().await);
            }
            undecided = left;
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }
}
