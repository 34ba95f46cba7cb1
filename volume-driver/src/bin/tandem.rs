//! `tandem`: the Tandem command-line client.
fn main() {}
