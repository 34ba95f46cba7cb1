//! Test support shared by the cross-crate tests: locating the built binaries, running
//! daemons in throw-away directories, and cleaning up after them.

use std::path::PathBuf;

pub mod checker;
pub mod cluster;
pub mod fake_nbd;
pub mod ha;
pub mod lab;
pub mod libvirt;
pub mod loopback_cluster;
pub mod nbd_client;
pub mod netns;
pub mod prometheus;
pub mod reflink_mount;
pub mod replica_data;
pub mod vhost_frontend;
pub mod vm;
pub mod volume_status;

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

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// Panic with everything printed unless the command succeeded.
    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "command failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panic unless the command failed; returns its stderr.
    pub fn failed(self) -> String {
        assert!(
            !self.status.success(),
            "command unexpectedly succeeded:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self.stderr
    }

    /// Parse stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Poll `check` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A `tandemd` in a throw-away directory with one `file` pool named `files`:
///
/// ```text
/// <tmp>/tandem.toml  <tmp>/state/volumes/  <tmp>/run/tandemd.sock  <tmp>/images/
/// <tmp>/tandemd.log  (the daemon's stderr)
/// ```
///
/// Dropping it kills the daemon (SIGKILL) and removes the directory.
pub struct TandemNode {
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl TandemNode {
    /// Write the config (not starting the daemon).
    pub fn new() -> TandemNode {
        let dir = tempfile::Builder::new()
            .prefix("tandem-test")
            .tempdir()
            .expect("create temp dir");
        let root = dir.path();
        let config = format!(
            r#"node = "hv1"
state_dir = "{root}/state"
run_dir = "{root}/run"
secret_file = "{root}/secret"
metrics_listen = ""

[[nodes]]
name = "hv1"
control = "127.0.0.1:7700"
replication = "127.0.0.1:7788"

[[pools]]
name = "files"
backend = "file"
path = "{root}/images"
"#,
            root = root.display()
        );
        std::fs::write(root.join("tandem.toml"), config).expect("write config");
        TandemNode { dir, child: None }
    }

    /// A node whose config is `config(root)` (not starting the daemon); multi-node
    /// fixtures use it. The same directory layout as [`TandemNode::new`].
    pub fn with_config(config: impl FnOnce(&std::path::Path) -> String) -> TandemNode {
        let dir = tempfile::Builder::new()
            .prefix("tandem-test")
            .tempdir()
            .expect("create temp dir");
        let text = config(dir.path());
        std::fs::write(dir.path().join("tandem.toml"), text).expect("write config");
        TandemNode { dir, child: None }
    }

    /// Whether the daemon is running (started and not stopped or crashed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Write the config and start the daemon.
    pub fn start_new() -> TandemNode {
        let mut node = TandemNode::new();
        node.start();
        node
    }

    pub fn root(&self) -> &std::path::Path {
        self.dir.path()
    }
    pub fn config(&self) -> PathBuf {
        self.root().join("tandem.toml")
    }
    pub fn socket(&self) -> PathBuf {
        self.root().join("run/tandemd.sock")
    }
    pub fn images(&self) -> PathBuf {
        self.root().join("images")
    }
    pub fn definitions(&self) -> PathBuf {
        self.root().join("state/volumes")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("tandemd.log")).unwrap_or_default()
    }

    /// Start `tandemd` and wait (up to 10 s) until its socket answers.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// [`TandemNode::start`] with extra environment variables (fault switches).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::File::create(self.root().join("tandemd.log")).expect("create log");
        let child = std::process::Command::new(bin("tandemd"))
            .arg("--config")
            .arg(self.config())
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tandemd");
        self.child = Some(child);
        let socket = self.socket();
        let mut exited = None;
        let ready = wait_until(std::time::Duration::from_secs(10), || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                exited = Some(status);
                return true;
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        if let Some(status) = exited {
            self.child = None;
            panic!("tandemd exited during startup ({status}):\n{}", self.log());
        }
        assert!(
            ready,
            "tandemd did not open {} within 10 s:\n{}",
            socket.display(),
            self.log()
        );
    }

    /// Send SIGTERM and wait for the daemon to exit (up to 10 s).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon is running");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let mut status = None;
        wait_until(std::time::Duration::from_secs(10), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        match status {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tandemd ignored SIGTERM for 10 s:\n{}", self.log());
            }
        }
    }

    /// SIGKILL the daemon (a crash), leaving its socket file behind.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Run `tandem --config <config> ARGS...` and collect its output.
    pub fn tandem(&self, args: &[&str]) -> CmdOutput {
        let out = self.tandem_command(args).output().expect("run tandem");
        CmdOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    /// `nbd+unix:///VOLUME?socket=<run_dir>/nbd.sock`: this node's NBD export of a volume.
    pub fn nbd_uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.root().join("run/nbd.sock").display()
        )
    }

    /// Run `qemu-io -f raw <nbd_uri> -c CMD...`; (success, stdout + stderr). qemu-io exits 0
    /// even when a command fails, so printed failures count as failure too.
    pub fn qemu_io(&self, volume: &str, cmds: &[&str]) -> (bool, String) {
        let mut command = std::process::Command::new("qemu-io");
        command.args(["-f", "raw"]).arg(self.nbd_uri(volume));
        for cmd in cmds {
            command.args(["-c", cmd]);
        }
        let out = command
            .stdin(std::process::Stdio::null())
            .output()
            .expect("qemu-io (package qemu-utils) must be installed");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let failed = !out.status.success()
            || text.contains("Could not open")
            || text.contains("failed")
            || text.contains("Pattern verification failed");
        (!failed, text)
    }

    /// The `tandem` command for this node, to spawn by hand (e.g. concurrently).
    pub fn tandem_command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(bin("tandem"));
        command
            .arg("--config")
            .arg(self.config())
            .args(args)
            .stdin(std::process::Stdio::null());
        command
    }
}

impl Default for TandemNode {
    fn default() -> Self {
        TandemNode::new()
    }
}

impl Drop for TandemNode {
    fn drop(&mut self) {
        self.crash();
    }
}
