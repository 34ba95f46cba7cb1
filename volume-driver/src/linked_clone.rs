//! `tandem volume clone SOURCE[@SNAPSHOT] NEW`: a writable linked clone (a thin snapshot or
//! a reflink copy, sharing every block with its origin) on the same nodes as the source.
//!
//! A clone is created exactly like a new replicated volume ([`crate::cluster`]: prepare on
//! every node, then commit on all at once, undo on failure), except that each data node
//! makes its storage with [`Pool::clone_volume`] from its own copy of the origin instead of
//! allocating it. The origins are identical on every replica (a snapshot is a consistent
//! cut; a volume without a snapshot must be closed everywhere, e.g. a read-only template),
//! so the clones are too, and like a new volume they share one `day0` generation and start
//! UpToDate with no initial sync.
//!
//! The definition records the origin (`clone_of`): an origin that still has clones is not
//! deleted (nor a snapshot that has some), and the refusal names the clones.

use control_api::{ApiError, ErrorKind, VolumeInfo};

use crate::cluster::CreatePlan;
use crate::links::Links;
use crate::names::validate_volume_name;
use crate::peer::{PeerReply, PeerRequest};
use crate::phases::Phases;
use crate::pool::{Pool, PoolError};
use crate::rename::check_renamable;
use crate::service::{invalid, VolumeService};
use crate::store::VolumeDefinition;

/// Split `VOLUME[@SNAPSHOT]`.
pub fn parse_origin(origin: &str) -> (&str, Option<&str>) {
    match origin.split_once('@') {
        Some((volume, snapshot)) => (volume, Some(snapshot)),
        None => (origin, None),
    }
}

/// Make the storage of a new volume: a linked clone of `clone_of`, or `size` bytes.
pub fn allocate(
    backend: &dyn Pool,
    name: &str,
    size: u64,
    clone_of: Option<&str>,
) -> Result<u64, PoolError> {
    match clone_of.map(parse_origin) {
        Some((volume, snapshot)) => {
            // A peer's definition names the origin: checked before a path or LV name is
            // built from it.
            validate_volume_name(volume).map_err(|e| PoolError::BadName {
                pool: backend.name().to_string(),
                message: format!("origin: {e}"),
            })?;
            if let Some(snapshot) = snapshot {
                crate::pool::validate_snapshot_name(backend.name(), snapshot)?;
            }
            backend.clone_volume(volume, snapshot, name)
        }
        None => {
            backend.check_room(size)?;
            backend.create(name, size)
        }
    }
}

/// The volumes among `definitions` cloned from `volume` (any of its snapshots too when
/// `snapshot` is `None`), sorted.
pub fn clones_of(
    definitions: &[VolumeDefinition],
    volume: &str,
    snapshot: Option<&str>,
) -> Vec<String> {
    let mut clones: Vec<String> = definitions
        .iter()
        .filter(|d| {
            d.clone_of.as_deref().is_some_and(|o| {
                let (v, s) = parse_origin(o);
                v == volume && (snapshot.is_none() || s == snapshot)
            })
        })
        .map(|d| d.name.clone())
        .collect();
    clones.sort();
    clones
}

impl VolumeService {
    /// Refuse to delete `volume` (or its `snapshot`) while linked clones depend on it.
    pub(crate) fn check_no_clones(
        &self,
        volume: &str,
        snapshot: Option<&str>,
    ) -> Result<(), ApiError> {
        let definitions: Vec<VolumeDefinition> = self
            .lock()
            .values()
            .filter_map(|s| s.definition.clone())
            .collect();
        let clones = clones_of(&definitions, volume, snapshot);
        if clones.is_empty() {
            return Ok(());
        }
        let what = match snapshot {
            Some(s) => format!("snapshot '{volume}@{s}'"),
            None => format!("volume '{volume}'"),
        };
        Err(ApiError::new(
            ErrorKind::InUse,
            format!(
                "{what} is the base of linked clone(s) {}; delete them first",
                clones.join(", ")
            ),
        ))
    }

    /// `volume_clone` (see the module doc).
    pub async fn volume_clone(&self, origin: &str, name: &str) -> Result<VolumeInfo, ApiError> {
        validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
        let (source, snapshot) = parse_origin(origin);
        let definition = self.definition(source)?;
        let mut phases = Phases::start("volume clone", name);
        let what = format!("cannot clone '{origin}' (nothing changed)");
        // A clone starts in sync on every replica, so its source must hold the same bytes
        // on each and must not change while the nodes clone it one after another: a
        // snapshot (taken as one cut), or a read-only template whose replicas are in sync.
        if snapshot.is_none() && !definition.options.read_only {
            return Err(ApiError::new(
                ErrorKind::Refused,
                format!(
                    "{what}: '{source}' is writable; make it a template first (tandem volume \
                     set {source} --read-only) or clone a snapshot of it"
                ),
            ));
        }
        let mut links = Links::default();
        if definition.is_replicated() {
            let request = match snapshot {
                Some(s) => PeerRequest::ReplicaSnapshotCheck {
                    name: source.to_string(),
                    snapshot: s.to_string(),
                    exists: true,
                },
                None => PeerRequest::ReplicaStatus {
                    name: source.to_string(),
                },
            };
            let nodes = self.data_nodes(&definition);
            let calls = nodes.iter().map(|n| (n.clone(), request.clone())).collect();
            let answers = self.call_at_once(&mut links, calls).await;
            for (node, answer) in nodes.iter().zip(answers) {
                let status = match answer {
                    Ok(PeerReply::Status { status }) => status,
                    Ok(other) => {
                        return Err(ApiError::new(
                            ErrorKind::Peer,
                            format!("node '{node}' answered with {other:?}"),
                        ))
                    }
                    Err(e) => return Err(ApiError::new(e.kind, format!("{what}: {}", e.message))),
                };
                if snapshot.is_none() {
                    if !status.in_sync() {
                        return Err(ApiError::new(
                            ErrorKind::Refused,
                            format!(
                                "{what}: its replica on '{node}' is not in sync with every \
                                 other replica; wait for the resync (tandem volume wait-sync)"
                            ),
                        ));
                    }
                    check_renamable(source, node, &status, true).map_err(|e| {
                        ApiError::new(
                            e.kind,
                            format!("{what}: {} (or clone a snapshot of it)", e.message),
                        )
                    })?;
                }
            }
        } else if let Some(s) = snapshot {
            self.snapshot_check(source, s, true).await?;
        }
        phases.done("check");
        let clone_of = Some(origin.to_string());
        if !definition.is_replicated() {
            return self
                .create_local_from(
                    name,
                    definition.size_bytes,
                    Some(&definition.pool),
                    clone_of,
                )
                .await;
        }
        let plan = CreatePlan {
            data_nodes: definition.nodes.clone(),
            tiebreakers: definition.tiebreakers.clone(),
            participants: self.ordered_nodes(&definition),
        };
        let options = control_api::VolumeOptions {
            read_only: false,
            ..definition.options
        };
        self.create_on_nodes(
            &mut links,
            name,
            definition.size_bytes,
            Some(&definition.pool),
            &plan,
            options,
            clone_of,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, clone_of: Option<&str>) -> VolumeDefinition {
        VolumeDefinition {
            version: 1,
            name: name.into(),
            pool: "files".into(),
            size_bytes: 4096,
            created_unix: 0,
            nodes: vec![],
            tiebreakers: vec![],
            diskless: false,
            options: Default::default(),
            renamed_from: None,
            clone_of: clone_of.map(String::from),
        }
    }

    #[test]
    fn clones_are_found_by_volume_and_by_snapshot() {
        assert_eq!(parse_origin("base"), ("base", None));
        assert_eq!(parse_origin("v@s1"), ("v", Some("s1")));
        let defs = [
            def("base", None),
            def("c2", Some("base")),
            def("c1", Some("base")),
            def("c3", Some("v@s1")),
            def("c4", Some("v@s2")),
            def("c5", Some("basement")),
        ];
        assert_eq!(clones_of(&defs, "base", None), vec!["c1", "c2"]);
        assert_eq!(clones_of(&defs, "v", None), vec!["c3", "c4"]);
        assert_eq!(clones_of(&defs, "v", Some("s1")), vec!["c3"]);
        assert!(clones_of(&defs, "c1", None).is_empty());
    }
}
