//! Quorum: may this partition keep (or start) writing? (ref `drbd.md` §4 "Quorum", DRBD's
//! `calc_quorum`).
//!
//! Pure: [`evaluate`] takes what this node sees of the volume's voters and whether it had
//! quorum a moment ago, and answers with a [`QuorumVerdict`] that explains itself.
//!
//! Rules (DRBD 9, with our choices written down):
//! - **Voters** are the volume's diskful replicas (this node included). Diskless tiebreakers
//!   (the `diskless = true` nodes of the config) are not voters; they break ties.
//! - **Majority**: more than half of the voters reachable (this node counts when diskful).
//! - **Tiebreaker** (even voter count, exactly half reachable): quorum is *kept* if a
//!   majority of the tiebreakers is reachable and this node already had quorum. It is
//!   sticky: a node that lost quorum cannot regain it through a tiebreaker alone. This is
//!   what stops both halves of a two-host cluster with a witness from writing when the
//!   witness can see both.
//! - **Last man standing**: replicas that left *gracefully* (cleanly demoted and
//!   disconnected, i.e. marked Outdated) stop being voters, but only while no voter is in
//!   an unknown state (unreachable without a graceful goodbye).
//! - A diskless node itself (a tiebreaker evaluating its own view) has quorum when it
//!   reaches a majority of the voters.
//! - [`QuorumMode::Off`] always has quorum. The default is on (majority) for 3+ voting
//!   members (replicas + tiebreakers), off below (a lone pair without witness).
//!
//! Caveat the engine must handle: when only the link *between* the two data nodes breaks
//! and both still reach the witness, both keep quorum through the tiebreaker (as in DRBD).
//! They are then one partition joined through the witness: the witness relays that the
//! other node is Primary (so `role::may_promote` refuses), and the Secondary, which no
//! longer receives writes, must be marked Outdated (DRBD does both through its cluster-wide
//! two-phase state change).
//!
//! When quorum is lost, [`OnNoQuorum`] says what happens to I/O: `suspend-io` (default:
//! freeze; resumes when quorum returns) or `io-error`.
//!
//! Differences from DRBD: no `quorum all`/numeric quorum and no
//! `quorum-minimum-redundancy` yet; DRBD's quorum is per device, ours per volume.

use std::fmt;
use std::str::FromStr;

/// Quorum setting of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumMode {
    /// No quorum: every partition may write (only safe with fencing).
    Off,
    /// A majority of the voters, with the tiebreaker rules.
    Majority,
}

impl QuorumMode {
    /// The default for a volume with `replicas` diskful replicas and `tiebreakers` diskless
    /// voters: majority for 3+ members, off otherwise.
    pub fn default_for(replicas: usize, tiebreakers: usize) -> QuorumMode {
        if replicas + tiebreakers >= 3 {
            QuorumMode::Majority
        } else {
            QuorumMode::Off
        }
    }
}

/// What happens to I/O on a Primary without quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnNoQuorum {
    /// Freeze I/O until quorum returns (DRBD's kernel default).
    #[default]
    SuspendIo,
    /// Fail I/O with EIO.
    IoError,
}

impl fmt::Display for OnNoQuorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnNoQuorum::SuspendIo => "suspend-io",
            OnNoQuorum::IoError => "io-error",
        })
    }
}

/// An unknown on-no-quorum policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown on-no-quorum policy {0:?} (expected suspend-io or io-error)")]
pub struct ParseOnNoQuorumError(pub String);

impl FromStr for OnNoQuorum {
    type Err = ParseOnNoQuorumError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "suspend-io" | "freeze" => Ok(OnNoQuorum::SuspendIo),
            "io-error" => Ok(OnNoQuorum::IoError),
            other => Err(ParseOnNoQuorumError(other.to_string())),
        }
    }
}

/// How this node sees one member of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberStatus {
    /// This node itself, or a peer it is connected to.
    Reachable,
    /// A peer that is not reachable and did not say goodbye.
    Unknown,
    /// A peer that left gracefully (cleanly demoted and disconnected; Outdated).
    LeftGracefully,
}

/// One member of the volume as seen from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Diskful replica (voter) or diskless tiebreaker.
    pub diskful: bool,
    /// Reachability.
    pub status: MemberStatus,
}

/// The answer of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumVerdict {
    /// Whether this node has quorum.
    pub has_quorum: bool,
    /// Voters counted.
    pub voters: usize,
    /// Voters reachable.
    pub reachable: usize,
    /// Votes needed for a majority.
    pub needed: usize,
    /// Whether the tiebreaker rule decided.
    pub by_tiebreaker: bool,
    /// One line for logs and `volume status`.
    pub reason: String,
}

/// Evaluate quorum. `members` includes this node (`Reachable`); `had_quorum` is the
/// previous verdict (for the sticky tiebreaker). Pure.
pub fn evaluate(mode: QuorumMode, members: &[Member], had_quorum: bool) -> QuorumVerdict {
    let diskful: Vec<&Member> = members.iter().filter(|m| m.diskful).collect();
    let tiebreakers: Vec<&Member> = members.iter().filter(|m| !m.diskful).collect();
    let any_unknown = diskful.iter().any(|m| m.status == MemberStatus::Unknown);
    let voters: Vec<&&Member> = diskful
        .iter()
        .filter(|m| any_unknown || m.status != MemberStatus::LeftGracefully)
        .collect();
    let reachable = voters
        .iter()
        .filter(|m| m.status == MemberStatus::Reachable)
        .count();
    let needed = voters.len() / 2 + 1;
    let mut verdict = QuorumVerdict {
        has_quorum: false,
        voters: voters.len(),
        reachable,
        needed,
        by_tiebreaker: false,
        reason: String::new(),
    };
    if mode == QuorumMode::Off {
        verdict.has_quorum = true;
        verdict.reason = "quorum is off".to_string();
        return verdict;
    }
    if voters.is_empty() {
        verdict.reason = "no voters".to_string();
        return verdict;
    }
    if reachable >= needed {
        verdict.has_quorum = true;
        verdict.reason = format!("{reachable} of {} voters reachable", voters.len());
        return verdict;
    }
    let tb_reachable = tiebreakers
        .iter()
        .filter(|m| m.status == MemberStatus::Reachable)
        .count();
    let tb_majority = !tiebreakers.is_empty() && tb_reachable > tiebreakers.len() / 2;
    if voters.len().is_multiple_of(2) && reachable * 2 == voters.len() && tb_majority {
        if had_quorum {
            verdict.has_quorum = true;
            verdict.by_tiebreaker = true;
            verdict.reason = format!(
                "{reachable} of {} voters reachable, kept by tiebreaker ({tb_reachable} of {})",
                voters.len(),
                tiebreakers.len()
            );
        } else {
            verdict.reason = format!(
                "{reachable} of {} voters reachable; a tiebreaker keeps quorum but cannot regain it",
                voters.len()
            );
        }
        return verdict;
    }
    verdict.reason = format!(
        "only {reachable} of {} voters reachable, {needed} needed",
        voters.len()
    );
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, diskful: bool, status: MemberStatus) -> Member {
        Member {
            name: name.into(),
            diskful,
            status,
        }
    }
    use MemberStatus::*;

    #[test]
    fn majority_of_three_replicas() {
        let v = evaluate(
            QuorumMode::Majority,
            &[
                m("a", true, Reachable),
                m("b", true, Reachable),
                m("c", true, Unknown),
            ],
            false,
        );
        assert!(v.has_quorum, "{}", v.reason);
        let v = evaluate(
            QuorumMode::Majority,
            &[
                m("a", true, Reachable),
                m("b", true, Unknown),
                m("c", true, Unknown),
            ],
            true,
        );
        assert!(!v.has_quorum);
        assert_eq!(v.reason, "only 1 of 3 voters reachable, 2 needed");
    }

    #[test]
    fn two_hosts_and_a_witness_the_side_with_the_witness_keeps_quorum() {
        let survivor = [
            m("hv1", true, Reachable),
            m("hv2", true, Unknown),
            m("w", false, Reachable),
        ];
        let v = evaluate(QuorumMode::Majority, &survivor, true);
        assert!(v.has_quorum && v.by_tiebreaker, "{}", v.reason);
        let isolated = [
            m("hv2", true, Reachable),
            m("hv1", true, Unknown),
            m("w", false, Unknown),
        ];
        assert!(!evaluate(QuorumMode::Majority, &isolated, true).has_quorum);
    }

    #[test]
    fn tiebreaker_is_sticky_a_node_that_lost_quorum_cannot_regain_it_through_the_witness() {
        let view = [
            m("hv2", true, Reachable),
            m("hv1", true, Unknown),
            m("w", false, Reachable),
        ];
        let v = evaluate(QuorumMode::Majority, &view, false);
        assert!(!v.has_quorum, "{}", v.reason);
    }

    #[test]
    fn last_man_standing_gracefully_left_replicas_stop_voting_unless_someone_is_unknown() {
        let view = [
            m("a", true, Reachable),
            m("b", true, LeftGracefully),
            m("c", true, LeftGracefully),
        ];
        let v = evaluate(QuorumMode::Majority, &view, true);
        assert!(v.has_quorum && v.voters == 1, "{}", v.reason);
        let view = [
            m("a", true, Reachable),
            m("b", true, LeftGracefully),
            m("c", true, Unknown),
        ];
        assert!(!evaluate(QuorumMode::Majority, &view, true).has_quorum);
    }

    #[test]
    fn quorum_off_always_has_quorum_and_defaults_follow_member_count() {
        let view = [m("a", true, Reachable), m("b", true, Unknown)];
        assert!(evaluate(QuorumMode::Off, &view, false).has_quorum);
        assert_eq!(QuorumMode::default_for(2, 0), QuorumMode::Off);
        assert_eq!(QuorumMode::default_for(2, 1), QuorumMode::Majority);
        assert_eq!(QuorumMode::default_for(3, 0), QuorumMode::Majority);
    }

    #[test]
    fn a_diskless_tiebreaker_has_quorum_when_it_reaches_a_majority_of_voters() {
        let view = [
            m("w", false, Reachable),
            m("a", true, Reachable),
            m("b", true, Unknown),
        ];
        // 1 of 2 voters reachable, tiebreaker majority (itself), sticky.
        assert!(evaluate(QuorumMode::Majority, &view, true).has_quorum);
        let view = [
            m("w", false, Reachable),
            m("a", true, Reachable),
            m("b", true, Reachable),
        ];
        assert!(evaluate(QuorumMode::Majority, &view, false).has_quorum);
    }

    #[test]
    fn on_no_quorum_parses_and_defaults_to_suspend_io() {
        assert_eq!(OnNoQuorum::default(), OnNoQuorum::SuspendIo);
        assert_eq!(
            "io-error".parse::<OnNoQuorum>().unwrap(),
            OnNoQuorum::IoError
        );
        assert_eq!(OnNoQuorum::SuspendIo.to_string(), "suspend-io");
        assert!("panic".parse::<OnNoQuorum>().is_err());
    }
}
