//! `tandem`: the Tandem command-line client. Every command talks to the local `tandemd`
//! over its control socket; `--json` prints the API's structures unchanged.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use control_api::{
    Client, ClientError, EventStream, PoolInfo, Reply, Request, ResyncProgress, VolumeInfo,
    VolumeStatus,
};
use indicatif::{ProgressBar, ProgressStyle};
use volume_driver::config::{self, Config};
use volume_driver::options::{check_change, format_rate, format_resync, OptionsChange};
use volume_driver::report::error_chain;
use volume_driver::units::{format_size, parse_size};

/// Manage replicated volumes on this host through the local tandemd.
///
/// Sizes take plain bytes or K, M, G, T suffixes (binary units: 1G = 1 GiB) and are rounded
/// up to 4 KiB. Exit status is 0 on success and 1 on any failure, bad arguments included,
/// with the reason on stderr.
#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    after_help = "Examples:\n  tandem volume create vm-100-disk-0 --size 32G --pool nvme\n  \
                  tandem volume resize vm-100-disk-0 --size 40G\n  \
                  tandem volume list --json\n  tandem pool list"
)]
struct Cli {
    /// Configuration file, used to find tandemd's socket [default: /etc/tandem/tandem.toml]
    #[arg(long, short = 'c', global = true, env = config::CONFIG_ENV, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// This node: name, cluster nodes, pools
    #[command(subcommand)]
    Node(NodeCommand),
    /// Storage pools
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Volumes: create, list, show, resize, delete
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots of a volume, taken on every data replica at once
    ///
    /// A snapshot shares blocks with its volume (lvm-thin: a thin snapshot; file pools: a
    /// reflink copy, which needs XFS with reflink=1 or btrfs). On an open volume the Primary
    /// holds new writes and drains the ones in flight until every replica applied them,
    /// so all copies hold the same point of the write stream; the pause is printed.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Stream state changes, one line each, like `drbdsetup events2`
    ///
    /// First an `exists` line per volume and peer, then `exists -`, then `create`, `change`
    /// (only what changed) and `destroy` lines as they happen: roles and promotions, disk,
    /// connection and replication states, quorum, split brain, and resync progress every
    /// few seconds. Runs until interrupted; if tandemd restarts it reconnects and starts
    /// again with `exists` lines.
    Events {
        /// Print the current state (the `exists` lines) and exit
        #[arg(long)]
        now: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Snapshot VOLUME as SNAPSHOT on every data replica
    ///
    /// Refused, with nothing changed anywhere, when a node of the volume is unreachable, a
    /// replica is not UpToDate, or the name is taken. If a replica fails to snapshot, the
    /// snapshot is removed everywhere. For a running VM, `virsh domfsfreeze` first (if the
    /// guest agent runs) makes the snapshot file-system consistent.
    Create {
        /// Volume name
        volume: String,
        /// Snapshot name: letters, digits, '_', '.', '-'
        snapshot: String,
    },
    /// List the volume's snapshots and the nodes holding each
    List {
        /// Volume name
        volume: String,
    },
    /// Delete a snapshot on every data replica
    Delete {
        /// Volume name
        volume: String,
        /// Snapshot name
        snapshot: String,
    },
    /// Roll the volume back to a snapshot on every replica (its later writes are lost)
    ///
    /// The volume must be closed everywhere (VM stopped, not Primary). All replicas get
    /// the snapshot's bytes and one new generation, so no resync follows.
    Rollback {
        /// Volume name
        volume: String,
        /// Snapshot name
        snapshot: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Show this node's name, configuration paths and cluster members
    Info {
        /// Also show every pool's space, as `pool list` does, in the same call (for status
        /// polling). A pool whose backend cannot be queried carries its `error` and, unlike
        /// in `pool list`, does not fail the command
        #[arg(long)]
        pools: bool,
    },
    /// List every configured node: reachable or not, and the digest of its node list
    ///
    /// Every tandemd of a cluster should run the same [[nodes]] list: a digest that
    /// differs from this node's is flagged, so an edit missed on one host is visible.
    List,
    /// Re-read the config file without a restart (tandemd also does on SIGHUP)
    ///
    /// New [[nodes]] become reachable at once; removed ones are refused from then on. A
    /// malformed config, one that removes a node still holding volumes, or one that
    /// changes what needs a restart (directories, pools, this node's addresses) is
    /// refused, and the running config stays in force.
    Reload,
    /// Move every replica off NODE (e.g. a dead host) to other nodes, one volume at a time
    ///
    /// Each volume gets a new replica (full sync from an UpToDate replica; zero ranges
    /// stay unallocated on thin pools), and once it is UpToDate the replica on NODE is
    /// removed. Run it on another node: it asks every reachable node for the volumes on
    /// NODE, so volumes this node holds no part of are moved too. Running it again resumes
    /// an interrupted evict.
    Evict {
        /// The node to empty
        node: String,
        /// Put every new replica on this node [default: the node with the most free space
        /// in its first pool, per volume]
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ReplicaCommand {
    /// Put a new data replica on NODE while the volume is in use; it starts Inconsistent
    /// and full-syncs from an UpToDate replica
    Add {
        /// Volume name
        name: String,
        /// The node to hold the new replica
        #[arg(long)]
        node: String,
    },
    /// Remove NODE's replica (works while NODE is down)
    ///
    /// Refused when it would leave fewer than two replicas, no UpToDate replica, or a
    /// minority of the remaining replicas reachable (quorum), or while NODE is Primary.
    Remove {
        /// Volume name
        name: String,
        /// The node whose replica goes
        #[arg(long)]
        node: String,
    },
    /// Move a replica: add on --to, wait until it is UpToDate, then remove from --from
    Move {
        /// Volume name
        name: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Show total, used and free bytes of every pool, as the backend reports them
    List,
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume (replicated with --replicas 2 or more)
    ///
    /// A replicated volume gets a replica on each chosen node and the cluster's diskless
    /// nodes as quorum tiebreakers. All replicas start UpToDate (no initial sync). If any
    /// node refuses or fails, nothing is kept anywhere.
    Create {
        /// Volume name: letters, digits, '_', '.', '-' (at most 64, not starting with '-')
        name: String,
        /// Size, e.g. 64M, 10G, 1T
        #[arg(long, short = 's')]
        size: String,
        /// Pool to allocate from, on every node [default: each node's first pool]
        #[arg(long, short = 'p')]
        pool: Option<String>,
        /// Number of data replicas [default: 1, or the number of --nodes]
        #[arg(long, short = 'r')]
        replicas: Option<u32>,
        /// Replication protocol: A (async), B (peer memory) or C (peer disk)
        /// [default: [replication] protocol in the config, else C]
        #[arg(long)]
        protocol: Option<String>,
        /// Nodes holding the replicas, comma-separated [default: this node, then the others
        /// in config order]
        #[arg(long, value_delimiter = ',')]
        nodes: Option<Vec<String>>,
    },
    /// Make a writable linked clone of a volume or of one of its snapshots
    ///
    /// The clone shares every block with its origin (thin snapshot or reflink), lives on
    /// the same nodes and pool, and starts UpToDate on every replica with no initial sync.
    /// Cloning a volume without @SNAPSHOT needs a read-only template (`volume set
    /// --read-only`), closed and in sync on every replica. The origin cannot be deleted while it has clones.
    Clone {
        /// VOLUME or VOLUME@SNAPSHOT
        origin: String,
        /// Name of the new volume
        new: String,
    },
    /// List all volumes
    List,
    /// Show one volume
    Show {
        /// Volume name
        name: String,
    },
    /// Grow a volume (shrinking is refused)
    Resize {
        /// Volume name
        name: String,
        /// New size, e.g. 128M, 20G
        #[arg(long, short = 's')]
        size: String,
    },
    /// Delete a volume and its storage on every node (its data is lost)
    ///
    /// Refused while the volume is open anywhere, Primary anywhere, or while one of its
    /// nodes cannot be reached.
    Delete {
        /// Volume name
        name: String,
        /// Delete even if Primary somewhere (not if open), and skip unreachable nodes (their
        /// replica stays there until you delete it on that node)
        #[arg(long)]
        force: bool,
    },
    /// Rename a volume on every node that holds it
    ///
    /// Refused while the volume is open or Primary anywhere (stop the VM first), while a
    /// node cannot be reached, or when NEW exists on any node. Nothing changes until every
    /// node accepted; a failure half-way renames the done nodes back.
    Rename {
        /// Current volume name
        old: String,
        /// New volume name (same rules as for create)
        new: String,
    },
    /// Replication status like `drbdadm status`: role, disk, peers, sync, quorum
    Status {
        /// Volume name [default: every volume]
        name: Option<String>,
    },
    /// Make the local replica Primary; it stays Primary until `volume demote`
    Promote {
        /// Volume name
        name: String,
    },
    /// Make the local replica Secondary (refused while a writer has it open)
    Demote {
        /// Volume name
        name: String,
        /// Demote even while writers have it open; I/O requests frozen for lack of quorum
        /// fail with an I/O error (none of them was acknowledged). For fencing an isolated
        /// Primary (DRBD's `secondary --force`)
        #[arg(long)]
        force: bool,
    },
    /// Allow or forbid two Primaries on every node of the volume (live migration; protocol C
    /// and every replica UpToDate; switches itself off once only one Primary is left)
    AllowTwoPrimaries {
        /// Volume name
        name: String,
        /// on or off
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Resolve a split brain: run on the node whose changes you give up
    Resolve {
        /// Volume name
        name: String,
        /// Throw away this node's changes since the split; it resyncs from the peer
        #[arg(long, required = true)]
        discard_local: bool,
    },
    /// Online verify against the peers; prints the number of differing 4 KiB blocks
    Verify {
        /// Volume name
        name: String,
    },
    /// Wait until every replica is UpToDate and in sync (exit 1 on timeout)
    WaitSync {
        /// Volume name
        name: String,
        /// Give up after this many seconds [default: wait forever]
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Change replication options on every replica (persisted)
    Set {
        /// Volume name
        name: String,
        /// A, B or C
        #[arg(long)]
        protocol: Option<String>,
        /// What a Primary does without quorum
        #[arg(long, value_parser = ["suspend-io", "io-error"])]
        on_no_quorum: Option<String>,
        /// Automatic split-brain recovery
        #[arg(long, value_parser = ["disconnect", "discard-zero-changes", "discard-younger-primary", "discard-least-changes"])]
        after_split_brain: Option<String>,
        /// Resync rate while the volume is idle, per second, e.g. 400M (DRBD c-max-rate)
        #[arg(long)]
        resync_max_rate: Option<String>,
        /// Resync rate kept however busy the volume is, per second, e.g. 50M; at most the
        /// max rate (DRBD c-min-rate)
        #[arg(long)]
        resync_min_rate: Option<String>,
        /// How long the volume's write rate is averaged before the resync rate follows it,
        /// 100ms to 30s, e.g. 2s (DRBD c-plan-ahead)
        #[arg(long)]
        resync_plan_ahead: Option<String>,
        /// Old name of --resync-max-rate
        #[arg(long, conflicts_with = "resync_max_rate")]
        resync_rate: Option<String>,
        /// Make the volume a template: writable opens are refused on every node, linked
        /// clones (`tandem volume clone`) are made from it. Also for single-replica volumes
        #[arg(long, conflicts_with = "writable")]
        read_only: bool,
        /// Undo --read-only
        #[arg(long)]
        writable: bool,
    },
    /// Add, remove or move a volume's replicas online
    #[command(subcommand)]
    Replica(ReplicaCommand),
}

fn main() -> ExitCode {
    let cli: Cli = volume_driver::cli::parse_args();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tandem: {message}");
            ExitCode::FAILURE
        }
    }
}

fn size_arg(text: &str) -> Result<u64, String> {
    let size = parse_size(text).map_err(|e| e.to_string())?;
    if size == 0 {
        return Err("size must be greater than 0".into());
    }
    Ok(size)
}

fn run(cli: &Cli) -> Result<(), String> {
    // Parse arguments before contacting the daemon.
    let request = match &cli.command {
        Command::Node(NodeCommand::Info { pools: false }) => Request::NodeInfo,
        Command::Node(NodeCommand::Info { pools: true }) => return node_info_with_pools(cli),
        Command::Node(NodeCommand::List) => Request::NodeList,
        Command::Node(NodeCommand::Reload) => Request::NodeReload,
        Command::Node(NodeCommand::Evict { node, to }) => Request::NodeEvict {
            node: node.clone(),
            to: to.clone(),
        },
        Command::Volume(VolumeCommand::Replica(ReplicaCommand::Add { name, node })) => {
            Request::ReplicaAdd {
                name: name.clone(),
                node: node.clone(),
            }
        }
        Command::Volume(VolumeCommand::Replica(ReplicaCommand::Remove { name, node })) => {
            Request::ReplicaRemove {
                name: name.clone(),
                node: node.clone(),
            }
        }
        Command::Volume(VolumeCommand::Replica(ReplicaCommand::Move { name, from, to })) => {
            Request::ReplicaMove {
                name: name.clone(),
                from: from.clone(),
                to: to.clone(),
            }
        }
        Command::Pool(PoolCommand::List) => Request::PoolList,
        Command::Events { now } => return events(cli, *now),
        Command::Volume(VolumeCommand::Create {
            name,
            size,
            pool,
            replicas,
            protocol,
            nodes,
        }) => Request::VolumeCreate {
            name: name.clone(),
            size_bytes: size_arg(size)?,
            pool: pool.clone(),
            replicas: *replicas,
            protocol: protocol.clone(),
            nodes: nodes.clone(),
        },
        Command::Snapshot(SnapshotCommand::Create { volume, snapshot }) => {
            Request::SnapshotCreate {
                name: volume.clone(),
                snapshot: snapshot.clone(),
            }
        }
        Command::Snapshot(SnapshotCommand::List { volume }) => Request::SnapshotList {
            name: volume.clone(),
        },
        Command::Snapshot(SnapshotCommand::Delete { volume, snapshot }) => {
            Request::SnapshotDelete {
                name: volume.clone(),
                snapshot: snapshot.clone(),
            }
        }
        Command::Snapshot(SnapshotCommand::Rollback { volume, snapshot }) => {
            Request::SnapshotRollback {
                name: volume.clone(),
                snapshot: snapshot.clone(),
            }
        }
        Command::Volume(VolumeCommand::Clone { origin, new }) => Request::VolumeClone {
            origin: origin.clone(),
            new_name: new.clone(),
        },
        Command::Volume(VolumeCommand::List) => Request::VolumeList,
        Command::Volume(VolumeCommand::Show { name }) => Request::VolumeShow { name: name.clone() },
        Command::Volume(VolumeCommand::Resize { name, size }) => Request::VolumeResize {
            name: name.clone(),
            size_bytes: size_arg(size)?,
        },
        Command::Volume(VolumeCommand::Delete { name, force }) => Request::VolumeDelete {
            name: name.clone(),
            force: *force,
        },
        Command::Volume(VolumeCommand::Rename { old, new }) => Request::VolumeRename {
            name: old.clone(),
            new_name: new.clone(),
        },
        Command::Volume(VolumeCommand::Status { name }) => match name {
            Some(name) => Request::VolumeStatus { name: name.clone() },
            None => Request::VolumeStatusAll,
        },
        Command::Volume(VolumeCommand::Promote { name }) => {
            Request::VolumePromote { name: name.clone() }
        }
        Command::Volume(VolumeCommand::Demote { name, force }) => Request::VolumeDemote {
            name: name.clone(),
            force: *force,
        },
        Command::Volume(VolumeCommand::AllowTwoPrimaries { name, state }) => {
            Request::VolumeAllowTwoPrimaries {
                name: name.clone(),
                allow: state == "on",
            }
        }
        Command::Volume(VolumeCommand::Resolve {
            name,
            discard_local,
        }) => Request::VolumeResolve {
            name: name.clone(),
            discard_local: *discard_local,
        },
        Command::Volume(VolumeCommand::Verify { name }) => {
            Request::VolumeVerify { name: name.clone() }
        }
        Command::Volume(VolumeCommand::WaitSync { name, timeout }) => {
            return wait_sync(cli, name, *timeout)
        }
        Command::Volume(VolumeCommand::Set {
            name,
            protocol,
            on_no_quorum,
            after_split_brain,
            resync_max_rate,
            resync_min_rate,
            resync_plan_ahead,
            resync_rate,
            read_only,
            writable,
        }) => {
            let change = OptionsChange {
                protocol: protocol.clone(),
                on_no_quorum: on_no_quorum.clone(),
                after_split_brain: after_split_brain.clone(),
                resync_rate: resync_rate.clone(),
                resync_max_rate: resync_max_rate.clone(),
                resync_min_rate: resync_min_rate.clone(),
                resync_plan_ahead: resync_plan_ahead.clone(),
                read_only: (*read_only || *writable).then_some(*read_only),
            };
            // The daemon's checks of each value, before contacting it (it also compares
            // them with the volume's current options).
            check_change(&change)?;
            Request::VolumeSet {
                name: name.clone(),
                change,
            }
        }
    };
    let mut client = if request == Request::NodeReload {
        // The daemon judges the new config: a file that fails validation must still reach
        // it, so only `run_dir` is read here.
        Client::connect(&reload_socket(cli), None).map_err(|e| client_error(&e))?
    } else {
        connect(cli)?
    };
    let spinner = long_operation(&request);
    let watcher = match &request {
        Request::NodeEvict { node, .. } => Some(EvictWatcher::start(
            control_socket(cli)?,
            node.clone(),
            spinner.clone(),
        )),
        _ => None,
    };
    let reply = client.call(&request).map_err(|e| client_error(&e));
    drop(watcher);
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    let reply = reply?;
    // A pool whose backend could not be queried is still listed, but the command fails.
    let pool_error = match &reply {
        Reply::Pools { pools } => pools.iter().find_map(|p| p.error.clone()),
        _ => None,
    };
    if cli.json {
        print_json(reply)?;
    } else {
        print_human(reply);
    }
    match pool_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn connect(cli: &Cli) -> Result<Client, String> {
    // No timeout: a create, resize or verify takes as long as the storage needs.
    Client::connect(&control_socket(cli)?, None).map_err(|e| client_error(&e))
}

fn control_socket(cli: &Cli) -> Result<PathBuf, String> {
    let path = config::resolve_path(cli.config.as_deref());
    let config = Config::load(&path).map_err(|e| error_chain(&e))?;
    Ok(config.control_socket())
}

/// The control socket for `node reload`: from the config's `run_dir` if the file is TOML
/// with that key, else the default, without validating the rest.
fn reload_socket(cli: &Cli) -> PathBuf {
    let path = config::resolve_path(cli.config.as_deref());
    let run_dir = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| table.get("run_dir")?.as_str().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/tandem"));
    run_dir.join("tandemd.sock")
}

/// `tandem events`: print the daemon's event stream; reconnect (once a second) while
/// tandemd is away, unless `now`.
fn events(cli: &Cli, now: bool) -> Result<(), String> {
    let socket = control_socket(cli)?;
    let mut out = std::io::stdout().lock();
    let mut said_waiting = false;
    loop {
        match EventStream::open(&socket, now) {
            Ok(mut stream) => {
                said_waiting = false;
                loop {
                    match stream.next_event() {
                        Ok(Some(event)) => {
                            let line = if cli.json {
                                serde_json::to_string(&event)
                                    .map_err(|e| format!("cannot print JSON: {e}"))?
                            } else {
                                event.to_string()
                            };
                            // A closed stdout (`| head`) ends the command quietly.
                            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                                return Ok(());
                            }
                        }
                        Ok(None) => break,
                        Err(e) if now => return Err(client_error(&e)),
                        Err(e) => {
                            eprintln!("tandem: event stream interrupted: {}", client_error(&e));
                            break;
                        }
                    }
                }
                if now {
                    return Ok(());
                }
            }
            Err(e) if now => return Err(client_error(&e)),
            Err(e) => {
                if !said_waiting {
                    eprintln!("tandem: {}; retrying every second", client_error(&e));
                    said_waiting = true;
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `node info --pools`: `node_info` then `pool_list` over one connection. JSON: the node info
/// object with `pool_list`, the array `pool list` prints.
fn node_info_with_pools(cli: &Cli) -> Result<(), String> {
    let mut client = connect(cli)?;
    let node = match client
        .call(&Request::NodeInfo)
        .map_err(|e| client_error(&e))?
    {
        Reply::NodeInfo { node } => node,
        other => return Err(format!("unexpected answer from tandemd: {other:?}")),
    };
    let pools = match client
        .call(&Request::PoolList)
        .map_err(|e| client_error(&e))?
    {
        Reply::Pools { pools } => pools,
        other => return Err(format!("unexpected answer from tandemd: {other:?}")),
    };
    if cli.json {
        let mut value =
            serde_json::to_value(&node).map_err(|e| format!("cannot print JSON: {e}"))?;
        value["pool_list"] =
            serde_json::to_value(&pools).map_err(|e| format!("cannot print JSON: {e}"))?;
        let text =
            serde_json::to_string_pretty(&value).map_err(|e| format!("cannot print JSON: {e}"))?;
        println!("{text}");
    } else {
        print_human(Reply::NodeInfo { node });
        println!();
        print_pools(&pools);
    }
    Ok(())
}

/// Poll `volume_status` until the volume is in sync; progress on stderr when it is a terminal.
fn wait_sync(cli: &Cli, name: &str, timeout: Option<u64>) -> Result<(), String> {
    let mut client = connect(cli)?;
    let started = Instant::now();
    let mut progress = Progress::new();
    loop {
        let status = client.status(name).map_err(|e| client_error(&e))?;
        if status.in_sync() {
            progress.finish(&format!("{name}: in sync"));
            if cli.json {
                print_json(Reply::Status { status })?;
            }
            return Ok(());
        }
        progress.show(&status);
        if let Some(limit) = timeout {
            if started.elapsed() >= Duration::from_secs(limit) {
                progress.finish(&sync_progress(&status));
                return Err(format!(
                    "{name} is not in sync after {limit} s: {}",
                    sync_progress(&status)
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A spinner on stderr while a request that may take minutes (verify, create, resize,
/// delete) runs, on a terminal only: their result line says the rest.
fn long_operation(request: &Request) -> Option<ProgressBar> {
    let what = match request {
        Request::VolumeVerify { name } => format!("verifying {name} against its peers"),
        Request::VolumeCreate { name, .. } => format!("creating {name}"),
        Request::VolumeResize { name, .. } => format!("resizing {name}"),
        Request::VolumeDelete { name, .. } => format!("deleting {name}"),
        Request::ReplicaAdd { name, node } => format!("adding a replica of {name} on {node}"),
        Request::ReplicaRemove { name, node } => format!("removing {node}'s replica of {name}"),
        Request::ReplicaMove { name, from, to } => {
            format!("moving {name} from {from} to {to} (waits for the full sync)")
        }
        Request::NodeEvict { node, .. } => format!("evicting {node}"),
        _ => return None,
    };
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let spinner = ProgressBar::new_spinner().with_message(what);
    spinner.enable_steady_tick(Duration::from_millis(120));
    Some(spinner)
}

/// While `tandem node evict` waits: the volume being moved, asked every second on a second
/// connection, on the spinner (a terminal) or as a line on stderr whenever it changes.
struct EvictWatcher {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EvictWatcher {
    fn start(socket: PathBuf, node: String, spinner: Option<ProgressBar>) -> EvictWatcher {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut last = String::new();
            let request = Request::NodeEvictProgress { node: node.clone() };
            loop {
                let step = Client::connect(&socket, Some(Duration::from_secs(5)))
                    .and_then(|mut client| client.call(&request));
                if let Ok(Reply::EvictProgress { step: Some(s) }) = step {
                    let line = format!(
                        "evicting {node}: {} ({} of {}) to {}",
                        s.volume, s.step, s.of, s.to
                    );
                    if line != last {
                        match &spinner {
                            Some(spinner) => spinner.set_message(line.clone()),
                            None => eprintln!("{line}"),
                        }
                        last = line;
                    }
                }
                if stopped.recv_timeout(Duration::from_secs(1))
                    != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    return;
                }
            }
        });
        EvictWatcher {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EvictWatcher {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How `wait-sync` shows progress on stderr: a bar (indicatif) on a terminal, else a plain
/// line whenever the state changes and every 10 s while a resync runs.
struct Progress {
    bar: Option<ProgressBar>,
    last_line: String,
    last_print: Option<Instant>,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {percent:>3}% {binary_bytes_per_sec} eta {eta} {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Progress {
            bar,
            last_line: String::new(),
            last_print: None,
        }
    }

    fn show(&mut self, status: &VolumeStatus) {
        let line = sync_progress(status);
        // The running resync with the most left, if any.
        let resync = status
            .replica
            .peers
            .iter()
            .filter_map(|p| p.resync.as_ref())
            .max_by_key(|r| r.total_bytes.saturating_sub(r.done_bytes));
        match &self.bar {
            Some(bar) => {
                if let Some(r) = resync {
                    bar.set_length(r.total_bytes);
                    bar.set_position(r.done_bytes);
                }
                bar.set_message(line);
            }
            None => {
                let due = self
                    .last_print
                    .is_none_or(|t| resync.is_some() && t.elapsed() >= Duration::from_secs(10));
                if line != self.last_line || due {
                    eprintln!("{line}");
                    self.last_print = Some(Instant::now());
                    self.last_line = line;
                }
            }
        }
    }

    fn finish(&mut self, line: &str) {
        match self.bar.take() {
            Some(bar) => bar.finish_with_message(line.to_string()),
            None => eprintln!("{line}"),
        }
    }
}

fn sync_progress(status: &VolumeStatus) -> String {
    let mut parts = vec![format!(
        "{}: disk {}",
        status.replica.volume, status.replica.disk_state
    )];
    for peer in status.replica.peers.iter().filter(|p| !p.diskless) {
        let mut part = format!(
            "{} {} {} {}",
            peer.node, peer.connection, peer.replication, peer.disk_state
        );
        if let Some(r) = &peer.resync {
            part.push_str(&format!(" {}", resync_text(r)));
        } else if peer.out_of_sync_bytes > 0 {
            part.push_str(&format!(
                " out-of-sync {}",
                format_size(peer.out_of_sync_bytes)
            ));
        }
        parts.push(part);
    }
    parts.join("; ")
}

fn resync_text(r: &ResyncProgress) -> String {
    let percent = if r.total_bytes == 0 {
        100.0
    } else {
        r.done_bytes as f64 * 100.0 / r.total_bytes as f64
    };
    format!(
        "{percent:.1}% ({} of {}, {}, eta {})",
        format_size(r.done_bytes),
        format_size(r.total_bytes),
        format_rate(r.bytes_per_sec),
        eta(r)
    )
}

/// Time left at the current rate, as `1h02m`, `3m05s` or `12s`; `?` while the rate is 0.
fn eta(r: &ResyncProgress) -> String {
    let left = r.total_bytes.saturating_sub(r.done_bytes);
    if left == 0 {
        return "0s".into();
    }
    if r.bytes_per_sec == 0 {
        return "?".into();
    }
    let secs = left.div_ceil(r.bytes_per_sec);
    match (secs / 3600, secs / 60 % 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

fn print_status(status: &VolumeStatus) {
    let r = &status.replica;
    let mut notes = Vec::new();
    if status.promoted_explicitly {
        notes.push("promoted explicitly".to_string());
    }
    if status.open_writers > 0 {
        notes.push(format!("{} writer(s)", status.open_writers));
    }
    if r.io_suspended {
        notes.push("I/O SUSPENDED".to_string());
    }
    if r.allow_two_primaries {
        notes.push("two primaries allowed".to_string());
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("  ({})", notes.join(", "))
    };
    println!("{} role:{}{notes}", r.volume, r.role);
    println!(
        "  disk:{} quorum:{} protocol:{} size:{}",
        r.disk_state,
        if r.quorum { "yes" } else { "no" },
        r.protocol,
        format_size(r.size_bytes)
    );
    for peer in &r.peers {
        println!(
            "  {} connection:{} role:{}{}",
            peer.node,
            peer.connection,
            peer.role,
            if peer.diskless { " (tiebreaker)" } else { "" }
        );
        println!(
            "    replication:{} peer-disk:{} out-of-sync:{}",
            peer.replication,
            peer.disk_state,
            format_size(peer.out_of_sync_bytes)
        );
        if let Some(resync) = &peer.resync {
            println!("    resync: {}", resync_text(resync));
        }
        if let Some(split) = &peer.split_brain {
            println!("    SPLIT BRAIN: {split}");
        }
        if let Some(conflict) = &peer.two_primaries_conflict {
            println!("    TWO-PRIMARIES CONFLICT: {conflict}");
        }
    }
    if let Some(v) = &r.last_verify {
        println!(
            "  last verify: {} differing block(s) in {}",
            v.differing_blocks,
            format_size(v.checked_bytes)
        );
    }
}

fn client_error(e: &ClientError) -> String {
    match e {
        // The daemon's message is already the one line to show.
        ClientError::Api(api) => api.message.clone(),
        // "cannot reach tandemd at ... (is it running?)" is clearer without the errno.
        ClientError::Connect { .. } => e.to_string(),
        other => error_chain(other),
    }
}

/// `node list`: one row per node; a digest unlike this node's is marked.
fn print_nodes(nodes: &[control_api::NodeListEntry]) {
    let ours = nodes
        .iter()
        .find(|n| n.this_node)
        .and_then(|n| n.config_digest.clone());
    let mut differ = Vec::new();
    let rows = nodes
        .iter()
        .map(|n| {
            let digest = match (&n.config_digest, &ours) {
                (Some(d), Some(o)) if d != o => {
                    differ.push(n.node.name.clone());
                    format!("{d} (differs)")
                }
                (Some(d), _) => d.clone(),
                (None, _) => "-".into(),
            };
            vec![
                n.node.name.clone(),
                if n.node.diskless { "diskless" } else { "disk" }.to_string(),
                n.node.control.to_string(),
                if n.this_node {
                    "this node".to_string()
                } else if n.reachable {
                    "reachable".to_string()
                } else {
                    "unreachable".to_string()
                },
                digest,
            ]
        })
        .collect();
    print_table(&["NODE", "KIND", "CONTROL", "STATE", "CONFIG DIGEST"], rows);
    for n in nodes.iter().filter(|n| !n.reachable) {
        if let Some(e) = &n.error {
            eprintln!("tandem: {}: {e}", n.node.name);
        }
    }
    if !differ.is_empty() {
        eprintln!(
            "tandem: warning: the node list differs on {} (edit [[nodes]] everywhere, then `tandem node reload` there)",
            differ.join(", ")
        );
    }
}

fn print_json(reply: Reply) -> Result<(), String> {
    let value = match reply {
        Reply::NodeInfo { node } => serde_json::to_value(node),
        Reply::Pools { pools } => serde_json::to_value(pools),
        Reply::Volume { volume } => serde_json::to_value(volume),
        Reply::Volumes { volumes } => serde_json::to_value(volumes),
        Reply::Deleted { name, left_on } => Ok(if left_on.is_empty() {
            serde_json::json!({ "name": name, "deleted": true })
        } else {
            serde_json::json!({ "name": name, "deleted": true, "left_on": left_on })
        }),
        Reply::Status { status } => serde_json::to_value(status),
        Reply::Statuses { statuses } => serde_json::to_value(statuses),
        Reply::Verified { name, report } => Ok(serde_json::json!({
            "name": name,
            "differing_blocks": report.differing_blocks,
            "checked_bytes": report.checked_bytes,
        })),
        Reply::Event { event } => serde_json::to_value(event),
        Reply::Nodes { nodes } => serde_json::to_value(nodes),
        Reply::Reloaded {
            config_digest,
            added,
            removed,
        } => Ok(serde_json::json!({
            "config_digest": config_digest,
            "added": added,
            "removed": removed,
        })),
        Reply::Evicted { node, moves } => Ok(serde_json::json!({ "node": node, "moves": moves })),
        Reply::EvictProgress { step } => serde_json::to_value(step),
        Reply::Snapshot { snapshot } => serde_json::to_value(snapshot),
        Reply::Snapshots { snapshots } => serde_json::to_value(snapshots),
    }
    .map_err(|e| format!("cannot print JSON: {e}"))?;
    let text =
        serde_json::to_string_pretty(&value).map_err(|e| format!("cannot print JSON: {e}"))?;
    println!("{text}");
    Ok(())
}

fn print_human(reply: Reply) {
    match reply {
        Reply::NodeInfo { node } => {
            println!("node:       {}", node.name);
            println!("version:    {}", node.version);
            println!("config:     {}", node.config_path.display());
            println!("state_dir:  {}", node.state_dir.display());
            println!("run_dir:    {}", node.run_dir.display());
            if node.pools.is_empty() {
                println!("pools:      none");
            } else {
                println!("pools:      {}", node.pools.join(", "));
            }
            println!("volumes:    {}", node.volumes);
            let rows = node
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.control.to_string(),
                        n.replication.to_string(),
                        if n.diskless { "diskless" } else { "disk" }.to_string(),
                        if n.name == node.name { "*" } else { "" }.to_string(),
                    ]
                })
                .collect();
            println!();
            print_table(&["NODE", "CONTROL", "REPLICATION", "KIND", "THIS"], rows);
        }
        Reply::Pools { pools } => print_pools(&pools),
        Reply::Nodes { nodes } => print_nodes(&nodes),
        Reply::Reloaded {
            config_digest,
            added,
            removed,
        } => {
            println!("config reloaded, node list digest {config_digest}");
            if !added.is_empty() {
                println!("added:   {}", added.join(", "));
            }
            if !removed.is_empty() {
                println!("removed: {}", removed.join(", "));
            }
        }
        Reply::Evicted { node, moves } => {
            if moves.is_empty() {
                println!("node '{node}' holds no replica of any volume");
            }
            for m in moves {
                println!("{}: moved from {node} to {}", m.volume, m.to);
            }
        }
        Reply::EvictProgress { step } => match step {
            Some(s) => println!("{} ({} of {}) to {}", s.volume, s.step, s.of, s.to),
            None => println!("no evict running"),
        },
        Reply::Volume { volume } => {
            println!("name:     {}", volume.name);
            println!("pool:     {}", volume.pool);
            println!(
                "size:     {} ({} bytes)",
                format_size(volume.size_bytes),
                volume.size_bytes
            );
            println!("state:    {}", state_name(&volume));
            println!("path:     {}", volume.path.display());
            if !volume.nodes.is_empty() {
                println!("replicas: {}", volume.nodes.join(", "));
            }
            if !volume.tiebreakers.is_empty() {
                println!("tiebreakers: {}", volume.tiebreakers.join(", "));
            }
            if volume.diskless {
                println!("this node: diskless tiebreaker");
            }
            if volume.read_only {
                println!("read-only: yes (template)");
            }
            if let Some(origin) = &volume.clone_of {
                println!("clone of: {origin}");
            }
            if let Some(o) = &volume.options {
                println!(
                    "options:  protocol {}, on-no-quorum {}, after-split-brain {}",
                    o.protocol, o.on_no_quorum, o.after_split_brain,
                );
                println!("resync:   {}", format_resync(o));
            }
        }
        Reply::Volumes { volumes } => print_volumes(&volumes),
        Reply::Deleted { name, left_on } => {
            println!("volume '{name}' deleted");
            for node in left_on {
                eprintln!("tandem: warning: node '{node}' was unreachable; its replica of '{name}' remains (run `tandem volume delete {name} --force` there)");
            }
        }
        Reply::Status { status } => print_status(&status),
        Reply::Snapshot { snapshot } => {
            println!(
                "snapshot '{}@{}' on {}",
                snapshot.volume,
                snapshot.name,
                snapshot.nodes.join(", ")
            );
            if let Some(ms) = snapshot.pause_ms {
                println!("write pause: {ms} ms");
            }
        }
        Reply::Snapshots { snapshots } => {
            let rows = snapshots
                .into_iter()
                .map(|s| vec![s.volume, s.name, s.nodes.join(",")])
                .collect();
            print_table(&["VOLUME", "SNAPSHOT", "NODES"], rows);
        }
        Reply::Statuses { statuses } => {
            for (i, status) in statuses.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_status(status);
            }
        }
        Reply::Verified { name, report } => println!(
            "{name}: {} differing block(s) ({} checked)",
            report.differing_blocks,
            format_size(report.checked_bytes)
        ),
        Reply::Event { event } => println!("{event}"),
    }
}

fn state_name(volume: &VolumeInfo) -> &'static str {
    match volume.state {
        control_api::VolumeState::Ok => "ok",
        control_api::VolumeState::Missing => "missing",
    }
}

fn print_volumes(volumes: &[VolumeInfo]) {
    let rows = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.pool.clone(),
                format_size(v.size_bytes),
                state_name(v).to_string(),
                if v.nodes.is_empty() {
                    "-".to_string()
                } else {
                    v.nodes.join(",")
                },
                if v.diskless {
                    "(diskless)".to_string()
                } else {
                    v.path.display().to_string()
                },
            ]
        })
        .collect();
    print_table(&["NAME", "POOL", "SIZE", "STATE", "REPLICAS", "PATH"], rows);
}

fn print_pools(pools: &[PoolInfo]) {
    let rows = pools
        .iter()
        .map(|p| {
            let (total, used, free) = match &p.error {
                None => (
                    format_size(p.total_bytes),
                    format_size(p.used_bytes),
                    format_size(p.free_bytes),
                ),
                Some(_) => ("?".into(), "?".into(), "?".into()),
            };
            vec![
                p.name.clone(),
                p.backend.clone(),
                p.cache.clone(),
                total,
                used,
                free,
                p.volumes.to_string(),
                format_size(p.provisioned_bytes),
            ]
        })
        .collect();
    print_table(
        &[
            "POOL",
            "BACKEND",
            "CACHE",
            "TOTAL",
            "USED",
            "FREE",
            "VOLUMES",
            "PROVISIONED",
        ],
        rows,
    );
    for p in pools {
        if let Some(error) = &p.error {
            eprintln!("tandem: warning: {error}");
        }
    }
}

/// Left-aligned columns separated by two spaces, like `lvs`.
fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: u64, total: u64, rate: u64) -> ResyncProgress {
        ResyncProgress {
            done_bytes: done,
            total_bytes: total,
            bytes_per_sec: rate,
        }
    }

    #[test]
    fn the_resync_line_shows_percent_rate_and_eta() {
        let mib = 1 << 20;
        assert_eq!(eta(&progress(0, 100 * mib, 10 * mib)), "10s");
        assert_eq!(eta(&progress(0, 3000 * mib, 10 * mib)), "5m00s");
        assert_eq!(eta(&progress(0, 40_000 * mib, 10 * mib)), "1h06m");
        assert_eq!(eta(&progress(5, 10, 0)), "?");
        assert_eq!(eta(&progress(10, 10, 0)), "0s");
        let line = resync_text(&progress(25 * mib, 100 * mib, 10 * mib));
        assert!(line.starts_with("25.0% ("), "{line}");
        assert!(line.ends_with(", eta 8s)"), "{line}");
    }
}
