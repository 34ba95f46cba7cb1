//! `tandem-libvirt-hook`: libvirt's QEMU hook for Tandem volumes (built in the libvirt issue).
fn main() {
    eprintln!("tandem-libvirt-hook: not implemented yet");
    std::process::exit(1);
}
