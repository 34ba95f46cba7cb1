//! The engine's decisions without I/O: state machines that take inputs (`handle_*`, each
//! given what it needs to know, never reading a clock, a file or a socket) and hand back
//! actions (`poll_action`) that a shell carries out in order. Tests drive them directly,
//! step by step, with seeded schedules.
//!
//! ```text
//!  op         a replicated request's operation and its wire message
//!  secondary  SecondaryCore: the Secondary's apply pipeline (epochs, acks, failures)
//! ```
//!
//! The connect-time handshake is a pure plan too (`replica::handshake`), beside the UUID
//! sync decision (`sync_decision`). The Primary's path and the per-volume engine follow
//! (issue 15's order).

pub mod op;
pub mod secondary;
