//! Throw-away QEMU guests for tests that need a real kernel: device-mapper/LVM thin (the host
//! kernel has none), a guest file system on a Tandem NBD disk, later libvirt domains.
//!
//! The guest is Debian's kernel with a busybox initramfs built by `tests/vm/build-initramfs`
//! (see its header for what is inside). It runs one shell script and powers off. QEMU always
//! runs with TCG (`-accel tcg`; KVM is unusable on the build machines).
//!
//! Flow: [`ImageBuilder`] builds kernel + initrd for a guest script, [`Vm`] boots it with
//! disks ([`Disk`]), waits with a timeout (QEMU is killed on timeout and on drop) and returns
//! a [`GuestRun`]: the serial console text, the script's exit status and the *sections* the
//! script printed.
//!
//! Guest scripts get a shell helper (from `/guest/lib.sh`):
//! `section NAME CMD [ARG]...` runs CMD and prints its stdout between `@@BEGIN NAME` and
//! `@@END NAME`, its stderr as section `NAME.stderr`, and `@@STATUS NAME <rc>`; it returns
//! CMD's status. The host side reads them with [`GuestRun::section`], [`GuestRun::json`] and
//! [`GuestRun::status`]. Scripts run with `/tmp` as working directory (a tmpfs), `lo` up, and
//! the modules for virtio disks, dm-thin-pool and ext4 loaded.
//!
//! ```no_run
//! use tandem_tests::vm::{Disk, ImageBuilder, Vm};
//! let dir = tempfile::tempdir().unwrap();
//! let image = ImageBuilder::new("section lvs lvs --reportformat json\n")
//!     .build(dir.path())
//!     .unwrap();
//! let disk = dir.path().join("disk.img");
//! std::fs::File::create(&disk).unwrap().set_len(1 << 30).unwrap();
//! let run = Vm::new(image).disk(Disk::raw(&disk)).run(&dir.path().join("console.log")).unwrap();
//! run.assert_script_succeeded();
//! let report = run.json("lvs");
//! ```
//!
//! Other launchers (libvirt domains, issue 6) reuse the image: `<os>` with
//! `<kernel>`/`<initrd>` from [`GuestImage`] and `<cmdline>` from [`Vm::kernel_cmdline`],
//! `<serial type='file'>` for the console, `<on_poweroff>destroy</on_poweroff>`, disks as
//! virtio; then [`GuestRun::from_console`] on the console file.
//!
//! Set `TANDEM_SKIP_VM_TESTS=1` to skip guest tests explicitly (see [`skip_requested`]);
//! otherwise a missing QEMU or kernel download is an error, never a silent skip.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::tail;

/// The QEMU binary used for guests.
pub const QEMU: &str = "qemu-system-x86_64";

/// Default time a guest may run before it is killed. TCG on a busy 2-core machine is slow.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// True when `TANDEM_SKIP_VM_TESTS` is set (non-empty, not `0`): the only way a guest test
/// may skip. Tests call this first and return early, printing why.
pub fn skip_requested() -> bool {
    match std::env::var("TANDEM_SKIP_VM_TESTS") {
        Ok(v) => !v.is_empty() && v != "0",
        Err(_) => false,
    }
}

/// Path of `tests/vm/build-initramfs` in this checkout.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/build-initramfs")
}

/// Kernel and initrd of a built guest.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// How long `build-initramfs` took.
    pub build_time: Duration,
}

/// Builds a [`GuestImage`] for one guest script.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    script: String,
    files: Vec<(PathBuf, String)>,
    modules: Vec<String>,
}

impl ImageBuilder {
    /// A guest that runs `script` (POSIX sh, busybox) after boot.
    pub fn new(script: impl Into<String>) -> Self {
        ImageBuilder {
            script: script.into(),
            files: Vec::new(),
            modules: Vec::new(),
        }
    }

    /// Adds a host file at the absolute guest path `dest`. Executables bring their shared
    /// libraries along.
    pub fn file(mut self, src: impl AsRef<Path>, dest: impl Into<String>) -> Self {
        self.files.push((src.as_ref().to_path_buf(), dest.into()));
        self
    }

    /// Loads one more kernel module (with its dependencies) at boot, e.g. `virtio_net`.
    pub fn module(mut self, name: impl Into<String>) -> Self {
        self.modules.push(name.into());
        self
    }

    /// Runs `build-initramfs` into `out_dir` (`initrd.gz`, `vmlinuz`, `guest.sh`).
    pub fn build(&self, out_dir: &Path) -> Result<GuestImage> {
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        let script_path = out_dir.join("guest.sh");
        std::fs::write(&script_path, &self.script)
            .with_context(|| format!("writing {}", script_path.display()))?;
        let mut cmd = Command::new(build_script());
        cmd.arg("--out")
            .arg(out_dir)
            .arg("--script")
            .arg(&script_path);
        for (src, dest) in &self.files {
            if !src.exists() {
                bail!("guest file {} (for {dest}) does not exist", src.display());
            }
            let mut spec = src.clone().into_os_string();
            spec.push(":");
            spec.push(dest);
            cmd.arg("--add").arg(spec);
        }
        for module in &self.modules {
            cmd.arg("--module").arg(module);
        }
        let started = Instant::now();
        let output = cmd
            .output()
            .with_context(|| format!("running {}", build_script().display()))?;
        if !output.status.success() {
            bail!(
                "{} failed ({}):\n{}",
                build_script().display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(GuestImage {
            kernel: out_dir.join("vmlinuz"),
            initrd: out_dir.join("initrd.gz"),
            build_time: started.elapsed(),
        })
    }
}

/// A virtio disk of the guest; the first is `/dev/vda`, the second `/dev/vdb`, ...
#[derive(Debug, Clone)]
pub enum Disk {
    /// A raw image file on the host.
    Raw(PathBuf),
    /// An NBD export on a unix socket (QEMU's built-in NBD client, `cache=none`), as QEMU
    /// would open a Tandem volume.
    NbdUnix { socket: PathBuf, export: String },
    /// An NBD export over TCP (e.g. a `tandemd` inside another guest, reached through a
    /// QEMU `hostfwd`), same drive options as [`Disk::NbdUnix`].
    NbdTcp {
        addr: std::net::SocketAddr,
        export: String,
    },
    /// A vhost-user-blk device on a unix socket (tandemd's `<run_dir>/vhost/<volume>.sock`)
    /// with `queues` virtqueues. The guest's RAM then becomes a shared memfd, as
    /// vhost-user requires.
    VhostUser { socket: PathBuf, queues: u16 },
}

impl Disk {
    pub fn raw(path: impl AsRef<Path>) -> Self {
        Disk::Raw(path.as_ref().to_path_buf())
    }

    pub fn nbd_unix(socket: impl AsRef<Path>, export: impl Into<String>) -> Self {
        Disk::NbdUnix {
            socket: socket.as_ref().to_path_buf(),
            export: export.into(),
        }
    }

    pub fn nbd_tcp(addr: std::net::SocketAddr, export: impl Into<String>) -> Self {
        Disk::NbdTcp {
            addr,
            export: export.into(),
        }
    }

    pub fn vhost_user(socket: impl AsRef<Path>, queues: u16) -> Self {
        Disk::VhostUser {
            socket: socket.as_ref().to_path_buf(),
            queues,
        }
    }

    /// The QEMU arguments of the disk; `id` names its chardev (unique per guest).
    pub fn qemu_args(&self, id: usize) -> Vec<String> {
        match self {
            Disk::VhostUser { socket, queues } => vec![
                "-chardev".into(),
                format!(
                    "socket,id=vu{id},path={}",
                    qemu_escape(&socket.display().to_string())
                ),
                "-device".into(),
                format!("vhost-user-blk-pci,chardev=vu{id},num-queues={queues}"),
            ],
            _ => vec!["-drive".into(), self.drive_arg()],
        }
    }

    /// The `-drive` argument for QEMU (vhost-user disks have none: see [`Disk::qemu_args`]).
    pub fn drive_arg(&self) -> String {
        match self {
            Disk::Raw(path) => format!(
                "file={},format=raw,if=virtio,cache=writeback",
                qemu_escape(&path.display().to_string())
            ),
            Disk::NbdUnix { socket, export } => format!(
                "file=nbd+unix:///{}?socket={},format=raw,if=virtio,cache=none",
                qemu_escape(export),
                qemu_escape(&socket.display().to_string())
            ),
            Disk::NbdTcp { addr, export } => format!(
                "file=nbd://{addr}/{},format=raw,if=virtio,cache=none",
                qemu_escape(export)
            ),
            Disk::VhostUser { .. } => String::new(),
        }
    }
}

/// QEMU option values escape a comma by doubling it.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// How to boot a [`GuestImage`].
#[derive(Debug, Clone)]
pub struct Vm {
    image: GuestImage,
    disks: Vec<Disk>,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
    append: Vec<String>,
    extra_args: Vec<String>,
}

impl Vm {
    /// 512 MiB, one vCPU, no network, [`DEFAULT_TIMEOUT`].
    pub fn new(image: GuestImage) -> Self {
        Vm {
            image,
            disks: Vec::new(),
            memory_mib: 512,
            cpus: 1,
            timeout: DEFAULT_TIMEOUT,
            append: Vec::new(),
            extra_args: Vec::new(),
        }
    }

    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Virtual CPUs (default 1). Under TCG each is a host thread, so guests that run
    /// several simulated nodes at once (e.g. two `lvcreate`s) may want 2.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus.max(1);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds words to the kernel command line.
    pub fn append(mut self, words: impl Into<String>) -> Self {
        self.append.push(words.into());
        self
    }

    /// Adds raw QEMU arguments (e.g. a network device for later libvirt-less tests).
    pub fn qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// The kernel command line: serial console on ttyS0, quiet, reboot (= QEMU exits, with
    /// `-no-reboot`) at once on panic, plus [`Vm::append`]'s words.
    pub fn kernel_cmdline(&self) -> String {
        let mut append = String::from("console=ttyS0 quiet panic=-1");
        for word in &self.append {
            append.push(' ');
            append.push_str(word);
        }
        append
    }

    /// The full QEMU command line, serial console going to `console_log`.
    pub fn command(&self, console_log: &Path) -> Command {
        let append = self.kernel_cmdline();
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-smp"])
            .arg(self.cpus.to_string())
            .arg("-m")
            .arg(self.memory_mib.to_string())
            .args([
                "-display",
                "none",
                "-nodefaults",
                "-no-user-config",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!(
                "file:{}",
                qemu_escape(&console_log.display().to_string())
            ))
            .arg("-kernel")
            .arg(&self.image.kernel)
            .arg("-initrd")
            .arg(&self.image.initrd)
            .arg("-append")
            .arg(append);
        if self
            .disks
            .iter()
            .any(|d| matches!(d, Disk::VhostUser { .. }))
        {
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mib
                ))
                .args(["-numa", "node,memdev=mem"]);
        }
        for (id, disk) in self.disks.iter().enumerate() {
            cmd.args(disk.qemu_args(id));
        }
        cmd.args(&self.extra_args);
        cmd
    }

    /// Boots the guest and returns at once; [`RunningVm::wait`] collects the result.
    pub fn spawn(&self, console_log: &Path) -> Result<RunningVm> {
        if which(QEMU).is_none() {
            bail!("{QEMU} not found in PATH: install the Debian package qemu-system-x86 (or set TANDEM_SKIP_VM_TESTS=1 to skip guest tests)");
        }
        // A stale log from an earlier run would confuse the marker search.
        let _ = std::fs::remove_file(console_log);
        let stderr_log = stderr_log_path(console_log);
        let stderr = std::fs::File::create(&stderr_log)
            .with_context(|| format!("creating {}", stderr_log.display()))?;
        let mut cmd = self.command(console_log);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {QEMU} ({cmd:?})"))?;
        Ok(RunningVm {
            child: Some(child),
            console_log: console_log.to_path_buf(),
            started: Instant::now(),
            timeout: self.timeout,
        })
    }

    /// Boots the guest, waits until it powers off (or the timeout), and parses the console.
    pub fn run(&self, console_log: &Path) -> Result<GuestRun> {
        self.spawn(console_log)?.wait()
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A booted guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct RunningVm {
    child: Option<Child>,
    console_log: PathBuf,
    started: Instant,
    timeout: Duration,
}

/// After the guest printed its end marker, how long QEMU gets to exit on its own.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);

impl RunningVm {
    /// Waits for QEMU to exit (the guest powers off after its script), killing it when the
    /// timeout passes. A timeout is not an error here: [`GuestRun::timed_out`] says so and
    /// [`GuestRun::assert_script_succeeded`] fails with the console.
    pub fn wait(mut self) -> Result<GuestRun> {
        let mut child = self.child.take().context("QEMU already collected")?;
        let mut script_started_after = None;
        let mut exit_seen_at: Option<Instant> = None;
        let mut timed_out = false;
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for QEMU")? {
                break Some(status);
            }
            let console = read_console(&self.console_log);
            if script_started_after.is_none() && console.contains("@@GUEST-START") {
                script_started_after = Some(self.started.elapsed());
            }
            if exit_seen_at.is_none() && console.contains("@@GUEST-EXIT") {
                exit_seen_at = Some(Instant::now());
            }
            let poweroff_hung = exit_seen_at.is_some_and(|t| t.elapsed() > POWEROFF_GRACE);
            if self.started.elapsed() > self.timeout || poweroff_hung {
                timed_out = !poweroff_hung;
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let wall_time = self.started.elapsed();
        let qemu_stderr =
            std::fs::read_to_string(stderr_log_path(&self.console_log)).unwrap_or_default();
        let console = read_console(&self.console_log);
        if status.is_some_and(|s| !s.success()) && !console.contains("@@GUEST-EXIT") {
            bail!(
                "{QEMU} failed ({}): {}\nconsole:\n{}",
                status.map(|s| s.to_string()).unwrap_or_default(),
                qemu_stderr.trim(),
                tail(&console, 40)
            );
        }
        let mut run = GuestRun::from_console(&console);
        run.script_started_after = script_started_after;
        run.wall_time = wall_time;
        run.timed_out = timed_out;
        run.qemu_stderr = qemu_stderr;
        Ok(run)
    }

    /// Kills QEMU now.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = None;
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// QEMU's own stderr goes next to the console log: `<console_log>.qemu-stderr`.
fn stderr_log_path(console_log: &Path) -> PathBuf {
    let mut name = console_log.as_os_str().to_os_string();
    name.push(".qemu-stderr");
    PathBuf::from(name)
}

fn read_console(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).replace('\r', ""),
        Err(_) => String::new(),
    }
}

/// What a guest printed.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The whole serial console (carriage returns removed).
    pub console: String,
    /// The guest script's exit status from `@@GUEST-EXIT`; `None` when the guest never got
    /// there (crash, panic, timeout).
    pub exit_status: Option<i32>,
    /// Section name -> text between `@@BEGIN name` and `@@END name`.
    pub sections: BTreeMap<String, String>,
    /// Section name -> the command's exit status (`@@STATUS name rc`).
    pub statuses: BTreeMap<String, i32>,
    /// Guest uptime when its script started: kernel boot + module loading.
    pub guest_uptime_at_start: Option<Duration>,
    /// Guest uptime when its script ended.
    pub guest_uptime_at_exit: Option<Duration>,
    /// Wall time from starting QEMU to the script starting (as seen by polling the console).
    pub script_started_after: Option<Duration>,
    /// Wall time from starting QEMU to its exit.
    pub wall_time: Duration,
    /// QEMU was killed because the guest ran past the timeout.
    pub timed_out: bool,
    pub qemu_stderr: String,
}

impl GuestRun {
    /// A run from a console log written by someone else, e.g. a libvirt domain with
    /// `<serial type='file'>`; timings other than the guest's own uptimes are unknown.
    pub fn from_console(console: &str) -> GuestRun {
        let console = console.replace('\r', "");
        let parsed = parse_console(&console);
        GuestRun {
            exit_status: parsed.exit_status,
            sections: parsed.sections,
            statuses: parsed.statuses,
            guest_uptime_at_start: parsed.uptime_at_start,
            guest_uptime_at_exit: parsed.uptime_at_exit,
            script_started_after: None,
            wall_time: Duration::ZERO,
            timed_out: false,
            qemu_stderr: String::new(),
            console,
        }
    }

    /// Panics unless the guest script ran and exited 0. The message holds the script's part
    /// of the console (its last 150 lines) and the path of a saved copy of the whole console.
    pub fn assert_script_succeeded(&self) {
        if self.exit_status != Some(0) {
            panic!(
                "guest script did not succeed: exit status {:?}, timed out: {}\nqemu stderr: {}\nwhole console saved to {}\n--- console from script start (tail) ---\n{}",
                self.exit_status,
                self.timed_out,
                self.qemu_stderr.trim(),
                self.save_console().display(),
                tail(self.script_console(), 150)
            );
        }
    }

    /// The console from `@@GUEST-START` on (the whole console if the script never started).
    pub fn script_console(&self) -> &str {
        match self.console.find("@@GUEST-START") {
            Some(at) => &self.console[at..],
            None => &self.console,
        }
    }

    /// Writes the console to a file that outlives the test's temporary directory
    /// (`$TMPDIR/tandem-guest-console-<pid>-<n>.log`) and returns its path.
    pub fn save_console(&self) -> PathBuf {
        static SAVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SAVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "tandem-guest-console-{}-{n}.log",
            std::process::id()
        ));
        if let Err(e) = std::fs::write(&path, &self.console) {
            eprintln!(
                "could not save the guest console to {}: {e}",
                path.display()
            );
        }
        path
    }

    /// The text of section `name`; panics with the console's tail if it is missing.
    pub fn section(&self, name: &str) -> &str {
        match self.sections.get(name) {
            Some(text) => text,
            None => panic!(
                "guest printed no section '{name}' (sections: {:?}; exit status {:?}, timed out: {})\n--- console (tail) ---\n{}",
                self.sections.keys().collect::<Vec<_>>(),
                self.exit_status,
                self.timed_out,
                tail(&self.console, 80)
            ),
        }
    }

    /// Exit status of the command run by `section name ...`; panics if missing.
    pub fn status(&self, name: &str) -> i32 {
        match self.statuses.get(name) {
            Some(rc) => *rc,
            None => panic!(
                "guest printed no status for section '{name}'\n--- console (tail) ---\n{}",
                tail(&self.console, 80)
            ),
        }
    }

    /// Section `name` parsed as JSON; panics with the text and its stderr if it is not.
    pub fn json(&self, name: &str) -> serde_json::Value {
        let text = self.section(name);
        match serde_json::from_str(text) {
            Ok(value) => value,
            Err(e) => panic!(
                "section '{name}' is not JSON ({e}); status {:?}\n--- stdout ---\n{text}\n--- stderr ---\n{}",
                self.statuses.get(name),
                self.sections
                    .get(&format!("{name}.stderr"))
                    .map(String::as_str)
                    .unwrap_or("")
            ),
        }
    }

    /// Asserts that `section name ...` exited 0, showing its output if not.
    pub fn assert_section_ok(&self, name: &str) {
        let rc = self.status(name);
        assert_eq!(
            rc,
            0,
            "guest command '{name}' failed:\n{}",
            self.describe(name)
        );
    }

    /// Asserts that `section name ...` exited non-zero (an expected refusal).
    pub fn assert_section_failed(&self, name: &str) {
        let rc = self.status(name);
        assert_ne!(
            rc,
            0,
            "guest command '{name}' should have failed:\n{}",
            self.describe(name)
        );
    }

    /// Status, stdout and stderr of one section, for assertion messages.
    pub fn describe(&self, name: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "[{name}] status {:?}", self.statuses.get(name));
        let _ = writeln!(
            out,
            "[{name}] stdout:\n{}",
            self.sections.get(name).map(String::as_str).unwrap_or("")
        );
        let _ = writeln!(
            out,
            "[{name}] stderr:\n{}",
            self.sections
                .get(&format!("{name}.stderr"))
                .map(String::as_str)
                .unwrap_or("")
        );
        out
    }

    /// One line for test logs: timings of this run.
    pub fn timing_summary(&self) -> String {
        format!(
            "guest: wall {:.1}s, script started after {:.1}s (guest uptime {:.1}s), script ended at guest uptime {:.1}s",
            self.wall_time.as_secs_f64(),
            self.script_started_after.map_or(f64::NAN, |d| d.as_secs_f64()),
            self.guest_uptime_at_start.map_or(f64::NAN, |d| d.as_secs_f64()),
            self.guest_uptime_at_exit.map_or(f64::NAN, |d| d.as_secs_f64()),
        )
    }
}

/// The markers found in a console log.
#[derive(Debug, Default, PartialEq)]
pub struct ParsedConsole {
    pub exit_status: Option<i32>,
    pub sections: BTreeMap<String, String>,
    pub statuses: BTreeMap<String, i32>,
    pub uptime_at_start: Option<Duration>,
    pub uptime_at_exit: Option<Duration>,
}

/// Extracts sections, statuses and the start/exit markers from console text. A section's
/// text is the lines between its markers with trailing blank lines removed. A section that
/// never ends (guest died inside it) keeps what was printed.
pub fn parse_console(console: &str) -> ParsedConsole {
    let mut parsed = ParsedConsole::default();
    let mut open: Option<(String, Vec<&str>)> = None;
    for line in console.lines() {
        if let Some((name, lines)) = open.as_mut() {
            if line.strip_prefix("@@END ").map(str::trim) == Some(name.as_str()) {
                let (name, lines) = open.take().unwrap_or_default();
                parsed.sections.insert(name, join_trimmed(&lines));
            } else {
                lines.push(line);
            }
            continue;
        }
        if let Some(name) = line.strip_prefix("@@BEGIN ") {
            open = Some((name.trim().to_string(), Vec::new()));
        } else if let Some(rest) = line.strip_prefix("@@STATUS ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(Ok(rc))) = (words.next(), words.next().map(str::parse)) {
                parsed.statuses.insert(name.to_string(), rc);
            }
        } else if let Some(rest) = line.strip_prefix("@@GUEST-START") {
            parsed.uptime_at_start = parse_uptime(rest.split_whitespace().next());
        } else if let Some(rest) = line.strip_prefix("@@GUEST-EXIT ") {
            let mut words = rest.split_whitespace();
            parsed.exit_status = words.next().and_then(|w| w.parse().ok());
            parsed.uptime_at_exit = parse_uptime(words.next());
        }
    }
    if let Some((name, lines)) = open {
        parsed.sections.insert(name, join_trimmed(&lines));
    }
    parsed
}

fn join_trimmed(lines: &[&str]) -> String {
    let mut end = lines.len();
    while end > 0 && lines[end - 1].trim().is_empty() {
        end -= 1;
    }
    lines[..end].join("\n")
}

fn parse_uptime(word: Option<&str>) -> Option<Duration> {
    word.and_then(|w| w.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Guest script for the NBD acceptance check (issue 4): makes ext4 on `/dev/vda`, mounts it,
/// writes `content` followed by a newline to `/mnt/<file_name>`, syncs, unmounts. Prints sections `mkfs`, `write`
/// (the file's sha256sum) and `umount`. Read the file back on the host from the disk's bytes
/// with [`read_ext4_file`] (or from another replica).
pub fn mkfs_write_file_script(file_name: &str, content: &str) -> String {
    assert_plain_file_name(file_name);
    // A quoted heredoc keeps the content byte-exact (no expansion).
    format!(
        r#"set -e
section mkfs mkfs.ext4 -q -F /dev/vda
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt
cat > /mnt/{file_name} <<'TANDEM_CONTENT_EOF'
{content}
TANDEM_CONTENT_EOF
sync
section write sha256sum /mnt/{file_name}
section umount umount /mnt
"#
    )
}

/// Guest script that mounts the ext4 file system on `/dev/vda` read-only and prints
/// `/mnt/<file_name>` as section `content` and its sha256sum as section `sha256`: reads back
/// what [`mkfs_write_file_script`] wrote, through whatever serves the disk (e.g. the other
/// replica's NBD export).
pub fn read_file_script(file_name: &str) -> String {
    assert_plain_file_name(file_name);
    format!(
        r#"set -e
mkdir -p /mnt
mount -t ext4 -o ro /dev/vda /mnt
section sha256 sha256sum /mnt/{file_name}
section content cat /mnt/{file_name}
umount /mnt
"#
    )
}

fn assert_plain_file_name(file_name: &str) {
    assert!(
        !file_name.is_empty()
            && file_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
        "file name must be a plain name, got {file_name:?}"
    );
}

/// `qemu-nbd` serving a raw file on a unix socket (`-t`: stays up across clients), the
/// reference NBD server for tests. Killed on drop.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    pub socket: PathBuf,
    pub export: String,
}

impl QemuNbd {
    /// Starts `qemu-nbd -t -f raw -k SOCKET -x EXPORT FILE` and waits (up to 10 s) for the
    /// socket to appear.
    pub fn serve(file: &Path, socket: &Path, export: &str) -> Result<QemuNbd> {
        if which("qemu-nbd").is_none() {
            bail!("qemu-nbd not found in PATH: install the Debian package qemu-utils");
        }
        let child = Command::new("qemu-nbd")
            .args(["-t", "-f", "raw", "-k"])
            .arg(socket)
            .arg("-x")
            .arg(export)
            .arg(file)
            .stdin(Stdio::null())
            .spawn()
            .context("starting qemu-nbd")?;
        let mut server = QemuNbd {
            child,
            socket: socket.to_path_buf(),
            export: export.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = server.child.try_wait().context("waiting for qemu-nbd")? {
                bail!(
                    "qemu-nbd exited early ({status}) serving {}",
                    file.display()
                );
            }
            if Instant::now() > deadline {
                bail!("qemu-nbd did not create {} within 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// The guest disk for this export.
    pub fn disk(&self) -> Disk {
        Disk::nbd_unix(&self.socket, &self.export)
    }

    /// Stops the server. SIGKILL loses nothing: qemu-nbd keeps no data of its own, what was
    /// written sits in the file (or the host page cache, which readers see).
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `/path` from an ext4 image on the host with `debugfs` (e2fsprogs), no mount needed.
pub fn read_ext4_file(image: &Path, path: &str) -> Result<Vec<u8>> {
    let output = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .context("running debugfs (Debian package e2fsprogs)")?;
    if !output.status.success() {
        bail!(
            "debugfs -R 'cat {path}' {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_statuses_and_markers() {
        let console = "\
[    0.1] booting
@@GUEST-START 3.77
noise
@@BEGIN lvs
  {\"report\": []}

@@END lvs
@@BEGIN lvs.stderr

@@END lvs.stderr
@@STATUS lvs 0
@@BEGIN bad
error line
@@END bad
@@STATUS bad 5
@@GUEST-EXIT 0 6.11
[    6.1] reboot: Power down
";
        let parsed = parse_console(console);
        assert_eq!(parsed.sections["lvs"], "  {\"report\": []}");
        assert_eq!(parsed.sections["lvs.stderr"], "");
        assert_eq!(parsed.sections["bad"], "error line");
        assert_eq!(parsed.statuses["lvs"], 0);
        assert_eq!(parsed.statuses["bad"], 5);
        assert_eq!(parsed.exit_status, Some(0));
        assert_eq!(parsed.uptime_at_start, Some(Duration::from_secs_f64(3.77)));
        assert_eq!(parsed.uptime_at_exit, Some(Duration::from_secs_f64(6.11)));
    }

    #[test]
    fn unfinished_guest_has_no_exit_status_and_keeps_partial_section() {
        let parsed = parse_console("@@GUEST-START 1.0\n@@BEGIN x\npartial\nKernel panic\n");
        assert_eq!(parsed.exit_status, None);
        assert_eq!(parsed.sections["x"], "partial\nKernel panic");
    }

    #[test]
    fn drive_args_escape_commas() {
        assert_eq!(
            Disk::raw("/tmp/a,b.img").drive_arg(),
            "file=/tmp/a,,b.img,format=raw,if=virtio,cache=writeback"
        );
        assert_eq!(
            Disk::nbd_unix("/run/tandem/nbd.sock", "vm-100-disk-0").drive_arg(),
            "file=nbd+unix:///vm-100-disk-0?socket=/run/tandem/nbd.sock,format=raw,if=virtio,cache=none"
        );
        assert_eq!(
            Disk::nbd_tcp("127.0.0.1:10809".parse().unwrap(), "vm-101-disk-0").drive_arg(),
            "file=nbd://127.0.0.1:10809/vm-101-disk-0,format=raw,if=virtio,cache=none"
        );
    }
}
