//! The acknowledged-write checker behind `tandem-check`: a workload that writes
//! self-describing blocks and logs what was acknowledged ([`workload`], [`log`],
//! [`block`]), the verifier that proves no acknowledged write was lost, undone or corrupted
//! ([`verify`]), and the replica comparison ([`compare`]).

pub mod block;
pub mod compare;
pub mod cut;
pub mod log;
pub mod process;
pub mod verify;
pub mod workload;
