//! Argument parsing for the workspace's binaries (`tandem`, `tandemd`,
//! `tandem-libvirt-hook`, `tandem-ha`): one exit status for every failure.
//!
//! clap exits 2 on a bad argument, while our binaries promise 0 on success and 1 on any
//! failure. So a parse error keeps clap's message and usage on stderr and exits 1;
//! `--help` and `--version` print to stdout and exit 0, as with clap.

/// Parse the process's arguments into `C`, exiting as the module doc says on an error.
pub fn parse_args<C: clap::Parser>() -> C {
    match C::try_parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            // Help and version go to stdout and are not failures; everything else is.
            let code = if e.use_stderr() { 1 } else { 0 };
            // Nothing better to do if stdout or stderr is gone.
            let _ = e.print();
            std::process::exit(code)
        }
    }
}
