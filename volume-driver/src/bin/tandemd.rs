//! `tandemd`: the Tandem node daemon.
fn main() {}
