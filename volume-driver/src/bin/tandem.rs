//! `tandem`: the Tandem command-line client. Every command talks to the local `tandemd`
//! over its control socket; `--json` prints the API's structures unchanged.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use volume_driver::api::{Client, ClientError, PoolInfo, Reply, Request, VolumeInfo};
use volume_driver::config::{self, Config};
use volume_driver::report::error_chain;
use volume_driver::units::{format_size, parse_size};

/// Manage replicated volumes on this host through the local tandemd.
///
/// Sizes take plain bytes or K, M, G, T suffixes (binary units: 1G = 1 GiB) and are rounded
/// up to 4 KiB. Exit status is 0 on success and non-zero on any failure, with the reason on
/// stderr in one line.
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
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Show this node's name, configuration paths and cluster members
    Info,
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Show total, used and free bytes of every pool, as the backend reports them
    List,
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume
    Create {
        /// Volume name: letters, digits, '_', '.', '-' (at most 64, not starting with '-')
        name: String,
        /// Size, e.g. 64M, 10G, 1T
        #[arg(long, short = 's')]
        size: String,
        /// Pool to allocate from [default: the first pool in the config]
        #[arg(long, short = 'p')]
        pool: Option<String>,
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
    /// Delete a volume and its storage (its data is lost)
    Delete {
        /// Volume name
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Node(NodeCommand::Info) => Request::NodeInfo,
        Command::Pool(PoolCommand::List) => Request::PoolList,
        Command::Volume(VolumeCommand::Create { name, size, pool }) => Request::VolumeCreate {
            name: name.clone(),
            size_bytes: size_arg(size)?,
            pool: pool.clone(),
        },
        Command::Volume(VolumeCommand::List) => Request::VolumeList,
        Command::Volume(VolumeCommand::Show { name }) => Request::VolumeShow { name: name.clone() },
        Command::Volume(VolumeCommand::Resize { name, size }) => Request::VolumeResize {
            name: name.clone(),
            size_bytes: size_arg(size)?,
        },
        Command::Volume(VolumeCommand::Delete { name }) => {
            Request::VolumeDelete { name: name.clone() }
        }
    };
    let path = config::resolve_path(cli.config.as_deref());
    let config = Config::load(&path).map_err(|e| error_chain(&e))?;
    let socket = config.control_socket();
    let mut client = Client::connect(&socket).map_err(|e| client_error(&e))?;
    let reply = client.call(&request).map_err(|e| client_error(&e))?;
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

fn client_error(e: &ClientError) -> String {
    match e {
        // The daemon's message is already the one line to show.
        ClientError::Api(api) => api.message.clone(),
        // "cannot reach tandemd at ... (is it running?)" is clearer without the errno.
        ClientError::Connect { .. } => e.to_string(),
        other => error_chain(other),
    }
}

fn print_json(reply: Reply) -> Result<(), String> {
    let value = match reply {
        Reply::NodeInfo { node } => serde_json::to_value(node),
        Reply::Pools { pools } => serde_json::to_value(pools),
        Reply::Volume { volume } => serde_json::to_value(volume),
        Reply::Volumes { volumes } => serde_json::to_value(volumes),
        Reply::Deleted { name } => Ok(serde_json::json!({ "name": name, "deleted": true })),
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
            println!("pools:      {}", node.pools.join(", "));
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
        }
        Reply::Volumes { volumes } => print_volumes(&volumes),
        Reply::Deleted { name } => println!("volume '{name}' deleted"),
    }
}

fn state_name(volume: &VolumeInfo) -> &'static str {
    match volume.state {
        volume_driver::api::VolumeState::Ok => "ok",
        volume_driver::api::VolumeState::Missing => "missing",
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
                v.path.display().to_string(),
            ]
        })
        .collect();
    print_table(&["NAME", "POOL", "SIZE", "STATE", "PATH"], rows);
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
