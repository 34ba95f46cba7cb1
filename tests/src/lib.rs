//! Test support shared by the cross-crate tests: locating the built binaries, running
//! daemons in throw-away directories, and cleaning up after them.

use std::path::PathBuf;

pub mod vm;

/// Directory holding the workspace's built binaries (`target/<profile>`), found from the
/// running test executable (`target/<profile>/deps/<test>`). `TANDEM_BIN_DIR` overrides it.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    let deps = exe
        .parent()
        .expect("test executable has a parent directory");
    deps.parent()
        .expect("deps directory has a parent directory")
        .to_path_buf()
}

/// Full path of a workspace binary, e.g. `bin("tandemd")`. Panics with a hint if it has not
/// been built (the test command builds all binaries first).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found; run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}
