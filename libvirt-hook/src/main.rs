//! `tandem-libvirt-hook`: libvirt's QEMU hook for Tandem volumes, plus operator helpers.
//!
//! Hook mode: libvirt runs `/etc/libvirt/hooks/qemu.d/tandem DOMAIN OPERATION SUBOP EXTRA`
//! with the domain XML on stdin. Any invocation whose program name is not
//! `tandem-libvirt-hook`, or whose first argument is not a subcommand or option, is a hook
//! call. Failures print one line on stderr (libvirt shows it to the user) and exit 1. The
//! hook logs what it did to `<run_dir>/libvirt-hook/hook.log`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use control_api::{Client, ClientError};
use libvirt_hook::control::{Control, StatusAnswer, DEFAULT_TIMEOUT};
use libvirt_hook::decide::{decide, Facts, HookCall, Operation, Plan, Step};
use libvirt_hook::disk_spec::{
    DiskSpec, Frontend, LibvirtVersion, MEMORY_BACKING, RECONNECT_MIN_VERSION,
};
use libvirt_hook::domain_xml::{has_candidate_disks, parse_domain, tandem_volumes, Endpoints};
use libvirt_hook::execute::{error_chain, execute};
use libvirt_hook::{incoming, promoted};
use volume_driver::config::{self, Config};

const PROGRAM: &str = "tandem-libvirt-hook";
/// Largest domain XML accepted on stdin.
const MAX_XML: u64 = 16 << 20;
/// The hook log is moved to `hook.log.1` when it grows past this.
const MAX_LOG: u64 = 1 << 20;
/// `[frontends] vhost_max_queues` when there is no Tandem config.
const DEFAULT_VHOST_QUEUES: u16 = 4;
/// Reconnect delay (NBD) or timeout (vhost-user) written into `<disk>` when libvirt
/// supports it and none is given.
const DEFAULT_RECONNECT_DELAY: u32 = 5;

#[derive(Parser, Debug)]
#[command(
    name = PROGRAM,
    version,
    about = "libvirt QEMU hook for Tandem volumes, and helpers to put Tandem volumes into domains",
    long_about = "libvirt QEMU hook for Tandem volumes.\n\n\
        Installed as /etc/libvirt/hooks/qemu.d/tandem, libvirt runs it around every domain's \
        life: before QEMU starts it promotes the domain's Tandem volumes on this host (and \
        refuses the start, with a message, if a volume cannot be promoted here); after QEMU is \
        gone it demotes them; for a live migration it allows two Primaries for the migration \
        window. Domains without Tandem disks are not touched.",
    after_help = "Examples:\n  \
        tandem-libvirt-hook install            # then: virsh start works with Tandem disks\n  \
        tandem-libvirt-hook disk-xml vm-100-disk-0 --target vda > disk.xml && virsh attach-device vm100 disk.xml --config\n  \
        virt-install ... $(tandem-libvirt-hook virt-install-disk vm-100-disk-0)\n\n\
        libvirt calls it as: qemu.d/tandem DOMAIN OPERATION SUBOP EXTRA  (domain XML on stdin)\n\n\
        Disk snapshots are taken with `tandem`, on every replica at once, while the domain runs\n\
        (the hook has nothing to do for them; see README \"Snapshots, golden images and linked clones\"):\n  \
        virsh domfsfreeze vm100; tandem snapshot create vm-100-disk-0 pre-upgrade; virsh domfsthaw vm100\n  \
        tandem snapshot rollback vm-100-disk-0 pre-upgrade   # domain shut off\n  \
        tandem volume set golden --read-only; tandem volume clone golden vm-101-disk-0"
)]
struct Cli {
    /// Tandem config file [default: /etc/tandem/tandem.toml]. libvirt clears the environment
    /// of hooks, so the installed hook always reads the default path.
    #[arg(long, short = 'c', global = true, env = config::CONFIG_ENV, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install this binary as libvirt's hook `<hooks-dir>/qemu.d/tandem` (mode 0755) and
    /// reload this host's libvirtd/virtqemud (SIGHUP) so it rescans its hooks
    Install {
        /// libvirt's hooks directory
        #[arg(long, default_value = "/etc/libvirt/hooks", value_name = "DIR")]
        hooks_dir: PathBuf,
        /// Do not send SIGHUP to this host's running libvirtd/virtqemud. Without the reload
        /// (what `systemctl reload libvirtd` does), a daemon that started while no hook was
        /// installed never runs the new one
        #[arg(long)]
        no_reload: bool,
    },
    /// Print the libvirt `<disk>` element for a Tandem volume
    #[command(
        after_help = "Example:\n  tandem-libvirt-hook disk-xml vm-100-disk-0 --target vda > disk.xml\n  \
        virsh attach-device vm100 disk.xml --config"
    )]
    DiskXml(DiskArgs),
    /// Print the virt-install arguments (`--disk ...`) for a Tandem volume
    #[command(
        after_help = "Example:\n  virt-install --name vm100 ... $(tandem-libvirt-hook virt-install-disk vm-100-disk-0)"
    )]
    VirtInstallDisk(DiskArgs),
    /// Run the hook by hand: DOMAIN OPERATION SUBOP EXTRA, domain XML on stdin (what libvirt
    /// does; useful for testing)
    Hook {
        domain: String,
        operation: String,
        #[arg(default_value = "-")]
        subop: String,
        #[arg(default_value = "-")]
        extra: String,
    },
}

#[derive(clap::Args, Debug)]
struct DiskArgs {
    /// The Tandem volume (its NBD export name)
    volume: String,
    /// Guest device name
    #[arg(long, default_value = "vda")]
    target: String,
    /// How QEMU reaches the volume: `nbd`, or `vhost-user` (vhost-user-blk on
    /// `<run_dir>/vhost/<volume>.sock`; the domain then needs shared memfd memory, printed
    /// on stderr)
    #[arg(long, value_enum, default_value = "nbd")]
    frontend: Frontend,
    /// Guest bus
    #[arg(long, default_value = "virtio")]
    bus: String,
    /// Reconnect delay in seconds: how soon QEMU reconnects after losing tandemd (e.g.
    /// across a restart). NBD: `<reconnect delay>` (libvirt >= 9.2.0); vhost-user:
    /// `<reconnect enabled='yes' timeout>` (every vhostuser-capable libvirt)
    /// [default: 5 where libvirt supports it]
    #[arg(long, value_name = "SECONDS", conflicts_with = "no_reconnect")]
    reconnect_delay: Option<u32>,
    /// Leave `<reconnect>` out even where libvirt supports it
    #[arg(long)]
    no_reconnect: bool,
    /// The target host's libvirt version (e.g. 9.0.0) [default: from `libvirtd --version`]
    #[arg(long, value_name = "VERSION", value_parser = parse_version)]
    libvirt_version: Option<LibvirtVersion>,
    /// Socket path [default: `<run_dir>/nbd.sock`, or `<run_dir>/vhost/<volume>.sock`
    /// with `--frontend vhost-user`, from the Tandem config]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print JSON (the disk's settings and the output) instead of text
    #[arg(long)]
    json: bool,
}

fn parse_version(text: &str) -> Result<LibvirtVersion, String> {
    LibvirtVersion::parse(text).ok_or_else(|| format!("'{text}' is not a version like 9.0.0"))
}

const SUBCOMMANDS: &[&str] = &["install", "disk-xml", "virt-install-disk", "hook", "help"];

/// Whether argv is libvirt's positional hook form rather than a CLI invocation.
fn is_hook_invocation(args: &[std::ffi::OsString]) -> bool {
    let program = args
        .first()
        .map(Path::new)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if program != PROGRAM && !program.is_empty() && args.len() >= 3 {
        return true;
    }
    match args.get(1).map(|a| a.to_string_lossy()) {
        None => false,
        Some(first) => !first.starts_with('-') && !SUBCOMMANDS.contains(&first.as_ref()),
    }
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if is_hook_invocation(&args) {
        let word = |i: usize| {
            args.get(i)
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_else(|| "-".to_string())
        };
        return hook_main(
            HookCall {
                domain: word(1),
                operation: Operation::parse(&word(2)),
                subop: word(3),
                extra: word(4),
            },
            None,
        );
    }
    let cli: Cli = volume_driver::cli::parse_args();
    let result = match cli.command {
        Command::Hook {
            domain,
            operation,
            subop,
            extra,
        } => {
            return hook_main(
                HookCall {
                    domain,
                    operation: Operation::parse(&operation),
                    subop,
                    extra,
                },
                cli.config,
            )
        }
        Command::Install {
            hooks_dir,
            no_reload,
        } => install(&hooks_dir, !no_reload),
        Command::DiskXml(args) => disk_output(cli.config.as_deref(), &args, false),
        Command::VirtInstallDisk(args) => disk_output(cli.config.as_deref(), &args, true),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{PROGRAM}: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Run one hook call; prints the one-line error and maps to the exit code.
fn hook_main(call: HookCall, config_path: Option<PathBuf>) -> ExitCode {
    let mut xml = String::new();
    if let Err(e) = std::io::stdin().take(MAX_XML).read_to_string(&mut xml) {
        eprintln!("tandem: cannot read the domain XML on stdin: {e}");
        return ExitCode::FAILURE;
    }
    match run_hook(&call, &xml, config_path.as_deref()) {
        Ok(()) => {
            if call.operation.is_xml_filter() {
                // migrate/restore: our stdout is the XML libvirt (or the next hook) uses.
                let mut out = std::io::stdout().lock();
                if out
                    .write_all(xml.as_bytes())
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    eprintln!("tandem: cannot write the domain XML to stdout");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            tracing::error!(domain = %call.domain, op = ?call.operation, "{message}");
            eprintln!("tandem: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Operations that read volume status (and may change roles); the others never touch tandemd.
fn needs_tandemd(call: &HookCall) -> bool {
    matches!(
        (&call.operation, call.subop.as_str()),
        (Operation::Prepare, "begin") | (Operation::Migrate, "begin") | (Operation::Release, "end")
    )
}

fn run_hook(call: &HookCall, xml: &str, config_path: Option<&Path>) -> Result<(), String> {
    let started = Instant::now();
    let domain = parse_domain(xml).map_err(|e| error_chain(&e))?;
    if !has_candidate_disks(&domain) {
        return Ok(());
    }
    let path = config::resolve_path(config_path);
    if !needs_tandemd(call) {
        // Nothing to do (start, started, stopped, restore, reconnect, attach, ...). Log it
        // when the config is readable; never fail: a failed `reconnect` kills the guest.
        if let Ok(config) = Config::load(&path) {
            init_log(&config.run_dir);
            tracing::info!(domain = %call.domain, op = ?call.operation, subop = %call.subop, extra = %call.extra, "nothing to do");
        }
        return Ok(());
    }
    let config = Config::load(&path).map_err(|e| error_chain(&e))?;
    init_log(&config.run_dir);
    let endpoints = Endpoints::of_node(&config);
    let disks = tandem_volumes(&domain, &endpoints).map_err(|e| error_chain(&e))?;
    if disks.is_empty() {
        return Ok(());
    }
    let uuid = domain.uuid.clone().unwrap_or_default();
    let socket = config.control_socket();
    let mut client =
        Client::connect(&socket, Some(DEFAULT_TIMEOUT)).map_err(|e| error_chain(&e))?;
    // A release demotes what it can even if one volume's status cannot be read.
    let releasing = call.operation == Operation::Release;
    let mut failures = Vec::new();
    let mut volumes = Vec::new();
    for disk in &disks {
        let answer = match Control::status(&mut client, &disk.volume) {
            Ok(answer) => answer,
            Err(e) => {
                let chain = error_chain(&e);
                // tandemd's own messages name the volume already.
                let message = if matches!(e, ClientError::Api(_)) && chain.contains(&disk.volume) {
                    chain
                } else {
                    format!("{}: {chain}", disk.volume)
                };
                if !releasing {
                    return Err(message);
                }
                tracing::error!(domain = %call.domain, "{message}");
                failures.push(message);
                continue;
            }
        };
        if answer == StatusAnswer::NoRoles {
            tracing::warn!(
                volume = %disk.volume,
                "tandemd answers no volume_status (no replication engine): treating the volume as single-host"
            );
        }
        volumes.push((disk.volume.clone(), answer));
    }
    let incoming_migration = match (&call.operation, call.subop.as_str()) {
        (Operation::Prepare, "begin") => incoming::take(&config.run_dir, &call.domain, &uuid),
        (Operation::Release, _) => {
            incoming::clear(&config.run_dir, &call.domain);
            false
        }
        _ => false,
    };
    let facts = Facts {
        node: config.node.clone(),
        volumes,
        incoming_migration,
        promoted_by_hook: promoted::read(&config.run_dir, &call.domain),
        shareable: disks
            .iter()
            .filter(|d| d.shareable)
            .map(|d| d.volume.clone())
            .collect(),
    };
    let plan = decide(call, &facts);
    tracing::info!(domain = %call.domain, op = ?call.operation, subop = %call.subop, extra = %call.extra, ?plan, "decided");
    let outcome = match execute(&mut client as &mut dyn Control, &plan) {
        Ok(outcome) => outcome,
        Err(message) => {
            failures.push(message);
            return Err(failures.join("; "));
        }
    };
    match plan {
        Plan::ExpectIncoming { .. } => {
            incoming::record(&config.run_dir, &call.domain, &uuid).map_err(|e| error_chain(&e))?
        }
        Plan::Activate { .. } => {
            let promoted: Vec<String> = outcome
                .done
                .iter()
                .filter(|s| matches!(s, Step::Promote(_)))
                .map(|s| s.volume().to_string())
                .collect();
            if let Err(e) = promoted::add(&config.run_dir, &call.domain, &promoted) {
                // Not fatal: release falls back to `promoted_explicitly`.
                tracing::warn!(domain = %call.domain, "{}", error_chain(&e));
            }
        }
        Plan::Deactivate { .. } => promoted::clear(&config.run_dir, &call.domain),
        Plan::Nothing { .. } | Plan::Refuse { .. } => {}
    }
    for note in &outcome.notes {
        tracing::info!(domain = %call.domain, "{note}");
    }
    tracing::info!(
        domain = %call.domain,
        done = ?outcome.done.iter().map(ToString::to_string).collect::<Vec<_>>(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "done"
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// Log to `<run_dir>/libvirt-hook/hook.log` (rotated once at 1 MiB); without it, warnings
/// and errors go to stderr.
fn init_log(run_dir: &Path) {
    let dir = run_dir.join("libvirt-hook");
    let path = dir.join("hook.log");
    let file = std::fs::create_dir_all(&dir).and_then(|()| {
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > MAX_LOG) {
            let _ = std::fs::rename(&path, dir.join("hook.log.1"));
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
    });
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false);
    let _ = match file {
        Ok(file) => builder
            .with_writer(std::sync::Mutex::new(file))
            .with_max_level(tracing::Level::INFO)
            .try_init(),
        Err(_) => builder
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::WARN)
            .try_init(),
    };
}

fn install(hooks_dir: &Path, reload: bool) -> Result<()> {
    let me = std::env::current_exe().context("finding this program's path")?;
    let dir = hooks_dir.join("qemu.d");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dest = dir.join("tandem");
    let tmp = dir.join(".tandem.tmp");
    std::fs::copy(&me, &tmp)
        .with_context(|| format!("copying {} to {}", me.display(), tmp.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    println!("installed {}", dest.display());
    let daemons = libvirt_daemons_here();
    if reload {
        if daemons.is_empty() {
            println!(
                "no libvirtd or virtqemud is running here; it will find the hook when it starts"
            );
        }
        for (pid, name) in &daemons {
            // SAFETY: kill(2) on a pid read from /proc; at worst it names no process any more.
            let rc = unsafe { libc::kill(*pid, libc::SIGHUP) };
            if rc != 0 {
                bail!(
                    "sending SIGHUP to {name} (pid {pid}): {}",
                    std::io::Error::last_os_error()
                );
            }
            println!("reloaded {name} (pid {pid}, SIGHUP) so it rescans its hooks");
        }
    } else if !daemons.is_empty() {
        println!(
            "not reloaded: libvirt looks for hooks when it starts (or reloads), so if this host \
             had no libvirt hook before, run `systemctl reload libvirtd` (or virtqemud)"
        );
    }
    Ok(())
}

/// libvirtd/virtqemud processes in this mount namespace (pid, name).
fn libvirt_daemons_here() -> Vec<(libc::pid_t, String)> {
    let Ok(my_ns) = std::fs::read_link("/proc/self/ns/mnt") else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm != "libvirtd" && comm != "virtqemud" {
            continue;
        }
        if std::fs::read_link(entry.path().join("ns/mnt"))
            .ok()
            .as_ref()
            == Some(&my_ns)
        {
            found.push((pid, comm.to_string()));
        }
    }
    found
}

/// This host's libvirt version from `libvirtd --version`, `virtqemud --version` or
/// `virsh --version`.
fn detect_libvirt_version() -> Option<LibvirtVersion> {
    for (program, arg) in [
        ("libvirtd", "--version"),
        ("virtqemud", "--version"),
        ("virsh", "--version"),
    ] {
        if let Ok(out) = std::process::Command::new(program).arg(arg).output() {
            if out.status.success() {
                if let Some(v) = LibvirtVersion::parse(&String::from_utf8_lossy(&out.stdout)) {
                    return Some(v);
                }
            }
        }
    }
    None
}

fn disk_output(config_path: Option<&Path>, args: &DiskArgs, virt_install: bool) -> Result<()> {
    // The config gives the run directory and the vhost-user queue count.
    let settings = || -> Result<(PathBuf, u16)> {
        let path = config::resolve_path(config_path);
        match Config::load(&path) {
            Ok(config) => Ok((config.run_dir.clone(), config.frontends.vhost_max_queues)),
            Err(config::ConfigError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && config_path.is_none() =>
            {
                Ok((PathBuf::from("/run/tandem"), DEFAULT_VHOST_QUEUES))
            }
            Err(e) => Err(e).context("reading the Tandem config for the socket path"),
        }
    };
    let vhost_socket =
        |run_dir: PathBuf| run_dir.join("vhost").join(format!("{}.sock", args.volume));
    let (socket, queues) = match (&args.socket, args.frontend) {
        (Some(socket), Frontend::Nbd) => (socket.clone(), 0),
        (Some(socket), Frontend::VhostUser) => (socket.clone(), settings()?.1),
        (None, Frontend::Nbd) => (settings()?.0.join("nbd.sock"), 0),
        (None, Frontend::VhostUser) => {
            let (run_dir, queues) = settings()?;
            (vhost_socket(run_dir), queues)
        }
    };
    let version = args.libvirt_version.or_else(detect_libvirt_version);
    let supported = version.is_some_and(LibvirtVersion::supports_nbd_reconnect);
    let reconnect_delay = match (args.no_reconnect, args.reconnect_delay) {
        (true, _) => None,
        // Every libvirt with vhostuser disks has their <reconnect>.
        (false, delay) if args.frontend == Frontend::VhostUser => {
            Some(delay.unwrap_or(DEFAULT_RECONNECT_DELAY))
        }
        (false, Some(_)) if !supported => bail!(
            "--reconnect-delay: libvirt {} has no <reconnect> for NBD disks (needs {RECONNECT_MIN_VERSION}); \
             leave the option out or pass --libvirt-version for the host that runs the domain",
            version.map_or("(version unknown)".to_string(), |v| v.to_string())
        ),
        (false, Some(delay)) => Some(delay),
        (false, None) if supported => Some(DEFAULT_RECONNECT_DELAY),
        (false, None) => None,
    };
    let spec = DiskSpec {
        volume: args.volume.clone(),
        frontend: args.frontend,
        socket,
        queues,
        target: args.target.clone(),
        bus: args.bus.clone(),
        reconnect_delay,
    };
    let text = if virt_install {
        let mut words = vec!["--disk".to_string(), spec.virt_install_disk()];
        for edit in spec.virt_install_xml_edits(1) {
            words.push("--xml".into());
            words.push(edit);
        }
        if args.frontend == Frontend::VhostUser {
            words.push("--memorybacking".into());
            words.push("source.type=memfd,access.mode=shared".into());
        }
        words.join(" ")
    } else {
        spec.to_xml()
    };
    if args.json {
        let value = serde_json::json!({
            "disk": spec,
            "libvirt_version": version.map(|v| v.to_string()),
            if virt_install { "arguments" } else { "xml" }: text,
            "domain_needs": (args.frontend == Frontend::VhostUser).then_some(MEMORY_BACKING),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if virt_install {
        println!("{text}");
    } else {
        print!("{text}");
        if args.frontend == Frontend::VhostUser {
            eprintln!("{PROGRAM}: the domain also needs {MEMORY_BACKING} (vhost-user shares the guest's memory)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<std::ffi::OsString> {
        words.iter().map(Into::into).collect()
    }

    #[test]
    fn libvirt_positional_calls_are_hook_calls() {
        assert!(is_hook_invocation(&args(&[
            "/etc/libvirt/hooks/qemu.d/tandem",
            "vm100",
            "prepare",
            "begin",
            "-"
        ])));
        // Even a domain named like a subcommand, when installed as the hook.
        assert!(is_hook_invocation(&args(&[
            "/etc/libvirt/hooks/qemu.d/tandem",
            "install",
            "release",
            "end",
            "-"
        ])));
        assert!(is_hook_invocation(&args(&[
            "/usr/bin/tandem-libvirt-hook",
            "vm100",
            "release",
            "end",
            "-"
        ])));
        assert!(!is_hook_invocation(&args(&[
            "tandem-libvirt-hook",
            "install"
        ])));
        assert!(!is_hook_invocation(&args(&[
            "tandem-libvirt-hook",
            "--help"
        ])));
        assert!(!is_hook_invocation(&args(&[
            "/usr/bin/tandem-libvirt-hook",
            "disk-xml",
            "v",
            "--target",
            "vdb"
        ])));
        assert!(!is_hook_invocation(&args(&["tandem-libvirt-hook"])));
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
