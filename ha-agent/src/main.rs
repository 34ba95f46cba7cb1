//! `tandem-ha`: the HA agent and its operator commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ha_agent::config::AgentConfig;
use ha_agent::disks::volumes_of;
use ha_agent::events::{now_ms, read_events, Event};
use ha_agent::hypervisor::Hypervisor;
use ha_agent::registry::ManagedVm;
use ha_agent::status::{render, AgentStatus};
use ha_agent::wire::{one_request, Message};
use replication::auth::Secret;

/// How long one CLI request to an agent may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Parser)]
#[command(
    name = "tandem-ha",
    version,
    about = "Tandem HA agent: restarts a dead host's VMs on a survivor with UpToDate replicas and quorum",
    long_about = "Tandem HA agent, one per host (`tandem-ha run`, e.g. as a systemd service).\n\n\
        Agents watch each other on the management network (heartbeats to <control IP>:7701, \
        authenticated with /etc/tandem/secret) and the replication link (the volumes' peer \
        connections reported by tandemd). When a host is silent on both paths, the first \
        survivor in preference order that holds UpToDate replicas of all the VM's disks with \
        quorum starts the VM (libvirt; the Tandem hook promotes the disks, and only one node \
        can promote). A host that lost quorum destroys its VMs (their I/O is frozen).\n\n\
        Settings: the cluster from /etc/tandem/tandem.toml (--config), the agent's own from \
        /etc/tandem/ha.toml (--ha-config; optional: port, heartbeat_interval_ms = 500, \
        dead_after_ms = 3000, tick_ms, start_backoff_ms, start_timeout_ms, libvirt_uri, fence_command).",
    after_help = "Examples:\n  \
        tandem-ha run                          # the agent (every host)\n  \
        tandem-ha manage vm100 --prefer hv1,hv2 # HA-manage a defined domain\n  \
        tandem-ha status                       # where each VM runs, health, last failover\n  \
        tandem-ha events --json                # the events log, JSON lines\n  \
        tandem-ha drill vm100 --kill-host hv1 --kill-command 'ipmitool -H {host}-ipmi chassis power off'"
)]
struct Cli {
    /// Cluster config (default /etc/tandem/tandem.toml, or TANDEM_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The agent's own settings (default /etc/tandem/ha.toml, or TANDEM_HA_CONFIG; optional).
    #[arg(long, global = true)]
    ha_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (foreground; logs to stderr, events to <state_dir>/ha/events.jsonl).
    Run,
    /// HA-manage a domain defined on this host: capture its XML and store it on every agent.
    Manage {
        domain: String,
        /// Preferred hosts for a restart, most preferred first (comma separated).
        #[arg(long, value_delimiter = ',')]
        prefer: Vec<String>,
    },
    /// Stop HA-managing a domain (on every agent; the domain itself is left alone).
    Unmanage { domain: String },
    /// Per managed VM: where it runs, health, what the agent would do and why, last failover.
    Status {
        #[arg(long)]
        json: bool,
        /// Ask the agent of this node instead of the local one.
        #[arg(long)]
        node: Option<String>,
    },
    /// The events log of this host's agent.
    Events {
        #[arg(long)]
        json: bool,
        /// Only the last N events.
        #[arg(long)]
        tail: Option<usize>,
    },
    /// Failover drill: kill the VM's host with a command of yours and measure the failover.
    ///
    /// Runs KILL_COMMAND (through sh -c, `{host}` replaced by each --kill-host) as a real
    /// failure would happen (power off, SIGKILL the host's daemons and QEMU, take its links
    /// down), then polls the surviving agents until one reports the VM running there, and
    /// prints the time from the kill to that report. With --check-command it then runs your
    /// checker (e.g. tandem-check) and reports its verdict (exit status 0 = pass).
    Drill {
        domain: String,
        /// Host(s) to kill; must include the host the VM runs on.
        #[arg(long = "kill-host", required = true, value_delimiter = ',')]
        kill_hosts: Vec<String>,
        /// How to kill a host (sh -c; `{host}` = the host's node name).
        #[arg(long)]
        kill_command: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Run after the failover (sh -c); its exit status is the verdict.
        #[arg(long)]
        check_command: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli: Cli = volume_driver::cli::parse_args();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem-ha: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    let cfg = AgentConfig::load(cli.config.as_deref(), cli.ha_config.as_deref())?;
    match cli.command {
        Command::Run => {
            runtime()?.block_on(ha_agent::agent::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Manage { domain, prefer } => manage(&cfg, &domain, prefer, false),
        Command::Unmanage { domain } => manage(&cfg, &domain, Vec::new(), true),
        Command::Status { json, node } => {
            let node = node.unwrap_or_else(|| cfg.here().to_string());
            let status = query_status(&cfg, &node)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Events { json, tail } => {
            let path = cfg.ha_dir().join("events.jsonl");
            let events =
                read_events(&path).with_context(|| format!("reading {}", path.display()))?;
            let skip = tail.map_or(0, |n| events.len().saturating_sub(n));
            for e in &events[skip..] {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    println!("{}", human_event(e));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Drill {
            domain,
            kill_hosts,
            kill_command,
            timeout,
            check_command,
            json,
        } => drill(
            &cfg,
            &domain,
            &kill_hosts,
            &kill_command,
            Duration::from_secs(timeout),
            check_command.as_deref(),
            json,
        ),
    }
}

fn secret(cfg: &AgentConfig) -> Result<Secret> {
    replication::auth::load_secret(&cfg.cluster.secret_file).with_context(|| {
        format!(
            "loading the shared secret {}",
            cfg.cluster.secret_file.display()
        )
    })
}

fn agent_addr(cfg: &AgentConfig, node: &str) -> Result<SocketAddr> {
    cfg.agent_addr(node)
        .with_context(|| format!("node '{node}' is not in the config's [[nodes]]"))
}

fn query_status(cfg: &AgentConfig, node: &str) -> Result<AgentStatus> {
    let addr = agent_addr(cfg, node)?;
    let secret = secret(cfg)?;
    let answer = runtime()?
        .block_on(one_request(
            addr,
            &secret,
            &Message::StatusQuery,
            REQUEST_TIMEOUT,
        ))
        .with_context(|| {
            format!("asking the agent of {node} at {addr} (is `tandem-ha run` running there?)")
        })?;
    match answer {
        Message::Status { status } => Ok(*status),
        Message::Error { message } => bail!("the agent of {node} refused: {message}"),
        other => bail!("the agent of {node} answered {other:?}"),
    }
}

fn manage(cfg: &AgentConfig, domain: &str, prefer: Vec<String>, remove: bool) -> Result<ExitCode> {
    for p in &prefer {
        if !cfg.cluster.nodes.iter().any(|n| &n.name == p) {
            bail!("--prefer {p}: no such node in the config");
        }
    }
    let xml = if remove {
        String::new()
    } else {
        let mut hv = Hypervisor::new(&cfg.ha.libvirt_uri);
        let xml = hv.domain_xml(domain)?;
        let volumes = volumes_of(&xml, &cfg.cluster).map_err(anyhow::Error::msg)?;
        if volumes.is_empty() {
            bail!(
                "{domain} has no Tandem disk (an NBD disk on {} or a vhost-user disk in {}): nothing could restart it elsewhere",
                cfg.cluster.nbd_socket().display(),
                cfg.cluster.vhost_dir().display()
            );
        }
        xml
    };
    let vm = ManagedVm {
        name: domain.to_string(),
        prefer,
        xml,
        version: now_ms(),
        origin: cfg.here().to_string(),
        removed: remove,
    };
    let secret = secret(cfg)?;
    let rt = runtime()?;
    let mut stored = Vec::new();
    let mut missed = Vec::new();
    for node in &cfg.cluster.nodes {
        let addr = agent_addr(cfg, &node.name)?;
        let answer = rt.block_on(one_request(
            addr,
            &secret,
            &Message::Manage { vm: vm.clone() },
            REQUEST_TIMEOUT,
        ));
        match answer {
            Ok(Message::Ok) => stored.push(node.name.clone()),
            Ok(Message::Error { message }) => missed.push(format!("{}: {message}", node.name)),
            Ok(other) => missed.push(format!("{}: answered {other:?}", node.name)),
            Err(e) => missed.push(format!("{}: {e:#}", node.name)),
        }
    }
    let verb = if remove { "unmanaged" } else { "managed" };
    if stored.is_empty() {
        bail!(
            "{domain} not {verb}: no agent reachable ({})",
            missed.join("; ")
        );
    }
    println!(
        "{domain} {verb}; stored by the agents of {}",
        stored.join(", ")
    );
    for m in &missed {
        println!("  not reached: {m} (it gets the change when it is back)");
    }
    Ok(ExitCode::SUCCESS)
}

fn human_event(e: &Event) -> String {
    let props: Vec<String> = e
        .properties
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s:?}"),
            other => format!("{k}={other}"),
        })
        .collect();
    format!(
        "{} {} {} {}",
        utc(e.ts_ms),
        e.source,
        e.event,
        props.join(" ")
    )
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from milliseconds since the epoch.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn run_shell(cmd: &str, host: Option<&str>) -> Result<(bool, String)> {
    let mut command = std::process::Command::new("sh");
    command.arg("-c").arg(match host {
        Some(h) => cmd.replace("{host}", h),
        None => cmd.to_string(),
    });
    if let Some(h) = host {
        command.env("TANDEM_DRILL_HOST", h);
    }
    let out = command
        .output()
        .with_context(|| format!("running `{cmd}`"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

fn drill(
    cfg: &AgentConfig,
    domain: &str,
    kill_hosts: &[String],
    kill_command: &str,
    timeout: Duration,
    check_command: Option<&str>,
    json: bool,
) -> Result<ExitCode> {
    for h in kill_hosts {
        agent_addr(cfg, h)?;
    }
    // Where does it run now? Ask every agent; the one running it says so.
    let mut runs_on = None;
    for node in &cfg.cluster.nodes {
        if let Ok(status) = query_status(cfg, &node.name) {
            if status
                .vms
                .iter()
                .any(|v| v.name == domain && v.running_here)
            {
                runs_on = Some(node.name.clone());
            }
        }
    }
    let Some(from) = runs_on else {
        bail!("no agent reports {domain} running (is it managed and started?)");
    };
    if !kill_hosts.contains(&from) {
        bail!("{domain} runs on {from}, which is not among --kill-host {}: the drill would measure nothing", kill_hosts.join(","));
    }
    let survivors: Vec<String> = cfg
        .cluster
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| !kill_hosts.contains(n))
        .collect();
    if !json {
        println!("{domain} runs on {from}; killing {}", kill_hosts.join(", "));
    }
    let killed_at = Instant::now();
    for h in kill_hosts {
        let (ok, out) = run_shell(kill_command, Some(h))?;
        if !ok {
            bail!("the kill command failed for {h}: {}", out.trim());
        }
    }
    let mut to = None;
    let mut agent_view = None;
    while killed_at.elapsed() < timeout && to.is_none() {
        for node in &survivors {
            if let Ok(status) = query_status(cfg, node) {
                if let Some(v) = status
                    .vms
                    .iter()
                    .find(|v| v.name == domain && v.running_here)
                {
                    to = Some(node.clone());
                    agent_view = v.last_failover.clone();
                }
            }
        }
        if to.is_none() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let failover_ms = killed_at.elapsed().as_millis() as u64;
    let check = match check_command {
        Some(cmd) if to.is_some() => Some(run_shell(cmd, None)?),
        _ => None,
    };
    let passed = to.is_some() && check.as_ref().is_none_or(|(ok, _)| *ok);
    if json {
        let report = serde_json::json!({
            "vm": domain, "from": from, "killed": kill_hosts, "to": to,
            "failover_ms": to.as_ref().map(|_| failover_ms),
            "agent_failover": agent_view,
            "check": check.as_ref().map(|(ok, out)| serde_json::json!({"passed": ok, "output": out})),
            "passed": passed,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        match &to {
            Some(t) => println!(
                "{domain} running on {t} {:.2} s after the kill{}",
                failover_ms as f64 / 1000.0,
                agent_view
                    .as_ref()
                    .map(|f| format!(
                        " (agent: {:.2} s from {}'s last heartbeat, detected after {:.2} s)",
                        f.total_ms as f64 / 1000.0,
                        f.from,
                        f.detect_ms as f64 / 1000.0
                    ))
                    .unwrap_or_default()
            ),
            None => println!(
                "{domain} NOT running on any survivor ({}) {} s after the kill; see `tandem-ha status` there",
                survivors.join(", "),
                timeout.as_secs()
            ),
        }
        if let Some((ok, out)) = &check {
            println!(
                "check: {}\n{}",
                if *ok { "PASSED" } else { "FAILED" },
                out.trim_end()
            );
        }
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_utc_formats() {
        Cli::command().debug_assert();
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_763_726_400_123), "2025-11-21T12:00:00.123Z");
        let cli =
            Cli::try_parse_from(["tandem-ha", "manage", "vm1", "--prefer", "hv1,hv2"]).unwrap();
        assert!(
            matches!(cli.command, Command::Manage { ref prefer, .. } if prefer == &["hv1", "hv2"])
        );
    }
}
