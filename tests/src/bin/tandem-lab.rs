//! `tandem-lab`: the VM lab for failover drills (run it through `scripts/lab`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tandem_tests::lab::drill::{self, DrillOptions, FaultKind};
use tandem_tests::lab::{Lab, LabOptions};

/// Boot hosts as QEMU VMs (hv1, hv2 and a witness by default), each with an NVMe disk
/// holding an LVM thin pool, a management and a replication NIC, and Tandem; then pull the
/// plug on them in a seeded failover drill.
///
///   scripts/lab up                      # build the image, boot the hosts (TCG: ~1 min)
///   scripts/lab ssh hv1 tandem volume status
///   scripts/lab drill --cycles 20       # prints one line per cycle, totals at the end
///   scripts/lab down                    # power everything off, delete the lab
///
/// Needs root (network namespace, taps), qemu-system-x86 and the built binaries.
/// Exit status: 0 = done / drill passed, 1 = the drill found a violation, 2 = error.
#[derive(Debug, Parser)]
#[command(name = "tandem-lab", version, verbatim_doc_comment)]
struct Cli {
    /// Lab directory: disks, console logs, sockets, drill logs
    #[arg(
        long,
        global = true,
        env = "TANDEM_LAB_DIR",
        default_value = "/var/tmp/tandem-lab"
    )]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the host image and boot every host (prints each boot time)
    Up {
        /// Host names, comma-separated; a name starting with "witness" is diskless
        #[arg(long, value_delimiter = ',', default_value = "hv1,hv2,witness")]
        hosts: Vec<String>,
        /// Memory of each host VM in MiB
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Directory of tandemd, tandem, tandem-check, tandem-ha, tandem-libvirt-hook
        /// [default: the directory of this program]
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// TEST ONLY: every tandemd drops flushes to its volumes, kept in the page cache
        /// (`cache = "writeback"`), so power cuts lose acknowledged writes (proves the
        /// drill notices)
        #[arg(long, hide = true)]
        test_unsafe_drop_flush: bool,
    },
    /// Power off every host (SIGKILL) and delete the lab
    Down,
    /// Run a command in a host (through its agent), or read commands from stdin
    Ssh {
        /// Host name, e.g. hv1
        host: String,
        /// Command line to run [default: read lines from stdin, one command each]
        command: Vec<String>,
    },
    /// Seeded failover drill: workload, fault, failover, checks, resync, compare
    Drill {
        /// Number of cycles
        #[arg(long, default_value_t = 20)]
        cycles: usize,
        /// Seed of the fault plan and the workload [default: from the clock; printed]
        #[arg(long)]
        seed: Option<u64>,
        /// Fault kinds to draw from, comma-separated: power-cut (SIGKILL of the host's
        /// QEMU), replication-cut, management-cut (a NIC down), freeze (SIGSTOP, SIGCONT),
        /// reboot (orderly: tandemd stopped, sync, power off, fresh boot of the same disk)
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "power-cut,replication-cut,management-cut,freeze,reboot"
        )]
        faults: Vec<FaultKind>,
        /// Stop at the first cycle that finds a violation
        #[arg(long)]
        stop_on_violation: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Up {
            hosts,
            memory,
            bin_dir,
            test_unsafe_drop_flush,
        } => {
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => std::env::current_exe()
                    .context("locating this program")?
                    .parent()
                    .context("this program has no directory")?
                    .to_path_buf(),
            };
            let mut options = LabOptions::new(bin_dir);
            options.hosts = hosts;
            options.memory_mib = memory;
            options.unsafe_drop_flush = test_unsafe_drop_flush;
            Lab::up(&cli.dir, &options)?;
            println!("lab: up in {}", cli.dir.display());
        }
        Command::Down => {
            Lab::load(&cli.dir)?.down()?;
            println!("lab: down");
        }
        Command::Ssh { host, command } => {
            let mut lab = Lab::load(&cli.dir)?;
            let host = lab.host(&host)?;
            if command.is_empty() {
                let mut status = 0;
                for line in std::io::stdin().lines() {
                    let out =
                        host.sh(&line.context("reading stdin")?, Duration::from_secs(3600))?;
                    print!("{}", out.text());
                    status = out.status;
                }
                return Ok(ExitCode::from(status.clamp(0, 255) as u8));
            }
            let out = host.sh(&command.join(" "), Duration::from_secs(3600))?;
            print!("{}", out.text());
            return Ok(ExitCode::from(out.status.clamp(0, 255) as u8));
        }
        Command::Drill {
            cycles,
            seed,
            faults,
            stop_on_violation,
        } => {
            let mut lab = Lab::load(&cli.dir)?;
            let options = DrillOptions {
                cycles,
                seed: seed.unwrap_or_else(tandem_tests::lab::seed_from_clock),
                faults,
                stop_on_violation,
            };
            let report = drill::run(&mut lab, &options)?;
            return Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
