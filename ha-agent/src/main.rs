//! `tandem-ha`: the HA agent (built in the HA issue).
fn main() {
    eprintln!("tandem-ha: not implemented yet");
    std::process::exit(1);
}
