//! The engine's decisions without I/O: state machines that take inputs (`handle_*`, each
//! given what it needs to know, never reading a clock, a file or a socket) and hand back
//! actions (`poll_action`) that a shell carries out in order. Tests drive them directly,
//! step by step, with seeded schedules.
//!
//! ```text
//!  op         a replicated request's operation and its wire message
//!  primary    PrimaryCore: the in-flight table, numbering and epochs, peers' pending acks
//!  secondary  SecondaryCore: the Secondary's apply pipeline (epochs, acks, failures)
//!  promotion  who may become Primary and who may write: the 2PC votes and outcome, quorum,
//!             write admission, outdating
//!  sim        (tests) seeded simulators with faults: one Primary and its Secondaries
//!             under protocols A/B/C; roles (promotion, quorum, a witness, migrations)
//! ```
//!
//! The connect-time handshake is a pure plan too (`replica::handshake`), beside the UUID
//! sync decision (`sync_decision`). The per-volume engine around them follows.

pub mod op;
pub mod primary;
pub mod promotion;
pub mod secondary;
#[cfg(test)]
mod sim;
