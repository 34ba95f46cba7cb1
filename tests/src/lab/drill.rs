//! The failover drill on a running lab: seeded cycles of workload, fault, failover, checks.
//!
//! One cycle, with P the host running the workload (the Primary) and S the other replica:
//!
//! 1. `tandem-check write` runs inside P against volume `drill` over `/run/tandem/nbd.sock`,
//!    logging to P's persistent disk (fsync'd at every FLUSH), until it has at least two
//!    acknowledged FLUSHes, plus a seeded while.
//! 2. The fault, chosen by the seed: power cut (SIGKILL of QEMU) of P or S, replication
//!    NIC down on P or S, management NIC down, freeze (SIGSTOP, then SIGCONT) of P or S,
//!    or an orderly reboot of P or S (the workload is stopped first on P; tandemd stops,
//!    the guest syncs and powers off, and a fresh QEMU boots the same disk).
//! 3. Failover: after a power cut or a reboot of P, the drill promotes S (`tandem volume
//!    promote`; under TCG there is no nested libvirt guest, so no HA agent restarts one:
//!    the drill says so). The workload is stopped (or died with P).
//! 4. Checks: the workload log is fetched to the outer host (kept in the lab's `drill/`) and
//!    sent to the checked host, where `tandem-check verify --image` reads the replica's LV:
//!    - a host that lost power is booted with tandemd held back and its replica is read as
//!      the power cut left it: every write acknowledged as durable (FUA, or before an
//!      acknowledged FLUSH) while it was connected must be there (`durable-only`);
//!    - a rebooted host is booted the same way, and must hold every write acknowledged
//!      while it was connected (its shutdown was orderly);
//!    - the replica that serves after the fault holds every acknowledged write;
//!    - tandemd of the returning host starts, resync runs (`tandem volume wait-sync`), no
//!      split brain is reported, the replicas' sha256 sums are equal and the returned
//!      replica holds every acknowledged write too.
//! 5. One line per cycle; totals at the end.
//!
//! A log whose writer died with its host may lack its last lines; the checks then accept
//! versions newer than the log knows ([`crate::checker::log::History::writer_crashed`]).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::agent::encode;
use super::Lab;
use crate::checker::log::read_history;

/// A workload log fetched from the writer's host.
struct Log {
    /// Where [`Cycle::check`] puts it on the checked host.
    guest_path: String,
    bytes: Vec<u8>,
    acknowledged: u64,
}

/// The drill's volume.
pub const VOLUME: &str = "drill";
/// Blocks the workload writes (from offset 0): 8 MiB.
pub const BLOCKS: u64 = 2048;
const STATE: &str = "/var/lib/tandem-lab/drill";
const SHORT: Duration = Duration::from_secs(60);
/// `tandem-check verify` rules: every acknowledged write; only durable ones; and the same
/// when the writer may have lost the tail of its log.
const ACKED: &str = "";
const DURABLE: &str = "--durable-only --writer-crashed";
const ACKED_WRITER_CRASHED: &str = "--writer-crashed";

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    PowerCut,
    ReplicationCut,
    ManagementCut,
    Freeze,
    Reboot,
}

impl FaultKind {
    pub const ALL: [FaultKind; 5] = [
        FaultKind::PowerCut,
        FaultKind::ReplicationCut,
        FaultKind::ManagementCut,
        FaultKind::Freeze,
        FaultKind::Reboot,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::PowerCut => "power-cut",
            FaultKind::ReplicationCut => "replication-cut",
            FaultKind::ManagementCut => "management-cut",
            FaultKind::Freeze => "freeze",
            FaultKind::Reboot => "reboot",
        }
    }
}

impl std::str::FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown fault {s:?} ({})", known.join(", "))
            })
    }
}

/// One cycle's fault, decided by the seed before anything runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// The fault hits the Primary (else the Secondary).
    pub on_primary: bool,
    /// Extra workload time before the fault, after the first two flushes.
    pub before: Duration,
    /// How long a link stays down or a VM frozen; after a power cut or the shutdown of the
    /// Secondary, how long the workload keeps running without it.
    pub hold: Duration,
}

/// splitmix64: small, seedable, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The faults of `cycles` cycles for `seed`, drawn from `kinds` (pure: same seed, same plan).
pub fn plan(seed: u64, cycles: usize, kinds: &[FaultKind]) -> Vec<Fault> {
    let mut rng = Rng(seed);
    (0..cycles)
        .map(|_| Fault {
            kind: kinds[rng.below(kinds.len() as u64) as usize],
            on_primary: rng.below(2) == 0,
            before: Duration::from_millis(rng.below(3000)),
            hold: Duration::from_millis(3000 + rng.below(5000)),
        })
        .collect()
}

/// How to run a drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub cycles: usize,
    pub seed: u64,
    pub faults: Vec<FaultKind>,
    /// Stop after the first cycle that found a violation.
    pub stop_on_violation: bool,
}

/// What one cycle found.
#[derive(Debug, Clone, Default)]
pub struct CycleResult {
    pub acknowledged: u64,
    /// Lost, stale or garbage blocks over every check of the cycle.
    pub lost: u64,
    pub split_brains: u64,
    /// Resyncs after which the replicas' checksums differed.
    pub replicas_differ: u64,
    pub notes: Vec<String>,
}

impl CycleResult {
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.split_brains == 0 && self.replicas_differ == 0
    }
}

/// Totals of a drill.
#[derive(Debug, Clone, Default)]
pub struct DrillReport {
    pub cycles: usize,
    pub power_cuts: usize,
    pub reboots: usize,
    pub acknowledged: u64,
    pub lost: u64,
    pub split_brains: u64,
    pub replicas_differ: u64,
    pub total: Duration,
    /// The first cycle (1-based) that found a violation.
    pub first_violation: Option<usize>,
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.split_brains == 0 && self.replicas_differ == 0
    }
}

/// Runs the drill, printing one line per cycle and the totals.
pub fn run(lab: &mut Lab, options: &DrillOptions) -> Result<DrillReport> {
    if options.faults.is_empty() {
        bail!("no fault kinds to draw from");
    }
    let data: Vec<String> = lab
        .hosts
        .iter()
        .filter(|h| !super::is_witness(&h.name))
        .map(|h| h.name.clone())
        .collect();
    if data.len() != 2 {
        bail!("the drill needs exactly two data hosts, the lab has {data:?}");
    }
    let out_dir = lab.dir.join("drill");
    std::fs::create_dir_all(&out_dir).context("creating the drill directory")?;
    lab.boot_all()?;
    let mut primary = prepare(lab, &data)?;
    println!(
        "drill: seed {} ({} cycles, faults {}); accel {}; no nested guest under {}: the drill promotes the survivor itself",
        options.seed,
        options.cycles,
        options
            .faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(","),
        lab.boot.accel,
        lab.boot.accel
    );
    let started = Instant::now();
    let mut report = DrillReport::default();
    for (i, fault) in plan(options.seed, options.cycles, &options.faults)
        .into_iter()
        .enumerate()
    {
        let n = i + 1;
        let secondary = data
            .iter()
            .find(|h| **h != primary)
            .cloned()
            .unwrap_or_default();
        let cycle_started = Instant::now();
        let seed = options.seed.wrapping_add(n as u64);
        let mut cycle = Cycle {
            lab: &mut *lab,
            n,
            primary: primary.clone(),
            secondary: secondary.clone(),
            out_dir: out_dir.clone(),
            result: CycleResult::default(),
        };
        let next_primary = cycle
            .run(fault, seed)
            .with_context(|| format!("drill cycle {n} ({})", fault.kind.name()))?;
        let result = cycle.result;
        report.cycles += 1;
        match fault.kind {
            FaultKind::PowerCut => report.power_cuts += 1,
            FaultKind::Reboot => report.reboots += 1,
            _ => {}
        }
        report.acknowledged += result.acknowledged;
        report.lost += result.lost;
        report.split_brains += result.split_brains;
        report.replicas_differ += result.replicas_differ;
        println!(
            "cycle {n}/{}: {} {} ({}) -> Primary {}; {} acked; {}; {:.1} s",
            options.cycles,
            fault.kind.name(),
            if fault.on_primary {
                &primary
            } else {
                &secondary
            },
            if fault.on_primary {
                "Primary"
            } else {
                "Secondary"
            },
            next_primary,
            result.acknowledged,
            if result.clean() {
                "OK".to_string()
            } else {
                format!(
                    "VIOLATION: {} lost/stale/garbage, {} split brain, {} replica mismatch: {}",
                    result.lost,
                    result.split_brains,
                    result.replicas_differ,
                    result.notes.join("; ")
                )
            },
            cycle_started.elapsed().as_secs_f64()
        );
        primary = next_primary;
        if !result.clean() {
            report.first_violation.get_or_insert(n);
            if options.stop_on_violation {
                break;
            }
        }
    }
    report.total = started.elapsed();
    println!(
        "drill: {} cycles ({} power cuts, {} reboots) in {:.1} s, {:.1} s per cycle; {} writes acknowledged; {} lost/stale/garbage, {} split brains, {} replica mismatches: {}",
        report.cycles,
        report.power_cuts,
        report.reboots,
        report.total.as_secs_f64(),
        report.total.as_secs_f64() / report.cycles.max(1) as f64,
        report.acknowledged,
        report.lost,
        report.split_brains,
        report.replicas_differ,
        if report.passed() { "PASS" } else { "FAIL" }
    );
    Ok(report)
}

/// Creates the volume on the first run, waits for both replicas in sync and returns the
/// host to start as Primary (the current Primary, if any).
fn prepare(lab: &mut Lab, data: &[String]) -> Result<String> {
    let first = data[0].clone();
    let exists = lab
        .host(&first)?
        .sh(&format!("tandem volume show {VOLUME}"), SHORT)?
        .status
        == 0;
    if !exists {
        let create = format!(
            "tandem volume create {VOLUME} --size 64M --replicas 2 --nodes {} --pool nvme",
            data.join(",")
        );
        retry(SHORT, || lab.host(&first)?.sh_ok(&create, SHORT))
            .context("creating the drill volume")?;
    }
    wait_sync(lab, &first)?;
    for name in data {
        let status = volume_status(lab, name)?;
        if status["role"] == "Primary" {
            return Ok(name.clone());
        }
    }
    Ok(first)
}

fn retry<T>(timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

fn volume_status(lab: &mut Lab, host: &str) -> Result<serde_json::Value> {
    let text = lab
        .host(host)?
        .sh_ok(&format!("tandem volume status {VOLUME} --json"), SHORT)?;
    serde_json::from_str(&text).with_context(|| format!("status of {host}: {text}"))
}

fn wait_sync(lab: &mut Lab, host: &str) -> Result<Duration> {
    let started = Instant::now();
    lab.host(host)?.sh_ok(
        &format!("tandem volume wait-sync {VOLUME} --timeout 300"),
        Duration::from_secs(330),
    )?;
    Ok(started.elapsed())
}

struct Cycle<'a> {
    lab: &'a mut Lab,
    n: usize,
    primary: String,
    secondary: String,
    out_dir: PathBuf,
    result: CycleResult,
}

impl Cycle<'_> {
    fn log_path(&self) -> String {
        format!("{STATE}/cycle-{}.log", self.n)
    }

    /// Runs the cycle; returns the Primary for the next one.
    fn run(&mut self, fault: Fault, seed: u64) -> Result<String> {
        let (p, s) = (self.primary.clone(), self.secondary.clone());
        self.start_workload(seed)?;
        self.wait_for_flushes(2)?;
        std::thread::sleep(fault.before);
        let target = if fault.on_primary { &p } else { &s };
        match fault.kind {
            FaultKind::PowerCut if fault.on_primary => self.power_cut_primary(),
            FaultKind::PowerCut => self.power_cut_secondary(fault.hold),
            FaultKind::Reboot if fault.on_primary => self.reboot_primary(),
            FaultKind::Reboot => self.reboot_secondary(fault.hold),
            FaultKind::ReplicationCut | FaultKind::ManagementCut => {
                let net = if fault.kind == FaultKind::ReplicationCut {
                    2
                } else {
                    1
                };
                self.lab.set_link(target, net, false)?;
                std::thread::sleep(fault.hold);
                self.lab.set_link(target, net, true)?;
                self.finish_without_crash()
            }
            FaultKind::Freeze => {
                self.lab.host(target)?.freeze(true)?;
                std::thread::sleep(fault.hold);
                self.lab.host(target)?.freeze(false)?;
                self.finish_without_crash()
            }
        }
    }

    fn start_workload(&mut self, seed: u64) -> Result<()> {
        let log = self.log_path();
        let script = format!(
            "rm -f {log} {log}.out\n\
             setsid tandem-check write --socket /run/tandem/nbd.sock --export {VOLUME} \
             --blocks {BLOCKS} --log {log} --duration 100000 --seed {seed} --flush-every 32 \
             --io-timeout 30 --reconnect-timeout 60 >{log}.out 2>&1 </dev/null &\n\
             echo $! >/run/workload.pid\n"
        );
        let p = self.primary.clone();
        self.lab.host(&p)?.sh_ok(&script, SHORT)?;
        Ok(())
    }

    fn wait_for_flushes(&mut self, flushes: u32) -> Result<()> {
        let log = self.log_path();
        let p = self.primary.clone();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let out = self
                .lab
                .host(&p)?
                .sh(&format!("grep -c '^F' {log} 2>/dev/null; true"), SHORT)?
                .text();
            if out.trim().parse::<u32>().unwrap_or(0) >= flushes {
                return Ok(());
            }
            if Instant::now() > deadline {
                let out = self
                    .lab
                    .host(&p)?
                    .sh(
                        &format!("cat {log}.out; tail -n 20 /var/lib/tandem-lab/tandemd.log"),
                        SHORT,
                    )?
                    .text();
                bail!("the workload on {p} made no {flushes} flushes in 180 s:\n{out}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// SIGINT to the workload (final flush), then waits until it has exited.
    fn stop_workload(&mut self) -> Result<String> {
        let log = self.log_path();
        let p = self.primary.clone();
        self.lab.host(&p)?.sh_ok(
            &format!(
                "pid=$(cat /run/workload.pid); kill -INT $pid 2>/dev/null\n\
                 # An orphan stays a zombie here (the guest's init does not reap): not kill -0.\n\
                 alive() {{ grep -qs '^State:.*[RSDT]' /proc/$pid/status; }}\n\
                 i=0; while alive && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done\n\
                 alive && {{ echo 'workload did not stop'; exit 1; }}\n\
                 cat {log}.out"
            ),
            Duration::from_secs(240),
        )
    }

    /// The length of the workload's log on the Primary now (a cut point).
    fn log_len(&mut self) -> Result<usize> {
        let log = self.log_path();
        let p = self.primary.clone();
        self.lab
            .host(&p)?
            .sh_ok(&format!("wc -c <{log}"), SHORT)?
            .trim()
            .parse::<usize>()
            .context("length of the workload log")
    }

    /// Copies the cycle's log from `host` to the outer host (kept in the lab's `drill/`);
    /// `truncate_at` keeps only the whole lines within that many bytes.
    fn fetch_log(&mut self, host: &str, truncate_at: Option<usize>, tag: &str) -> Result<Log> {
        let log = self.log_path();
        let mut bytes = self
            .lab
            .host(host)?
            .sh(&format!("cat {log}"), SHORT)?
            .output;
        if let Some(limit) = truncate_at {
            bytes.truncate(limit);
            let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            bytes.truncate(end);
        }
        let path = self.out_dir.join(format!("cycle-{}-{tag}.log", self.n));
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        let history = read_history(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Log {
            guest_path: format!("{STATE}/cycle-{}-{tag}.log", self.n),
            bytes,
            acknowledged: history.writes_acknowledged,
        })
    }

    /// Verifies `host`'s replica (its LV, read inside the VM by `tandem-check verify
    /// --image`) against `log`; adds violations to the cycle.
    fn check(&mut self, what: &str, host: &str, log: &Log, rules: &str) -> Result<()> {
        // The log travels to the host in base64 lines, then the host judges its own disk.
        let mut script = format!("base64 -d >{} <<'LAB_LOG_EOF'\n", log.guest_path);
        for chunk in encode(&log.bytes).as_bytes().chunks(76) {
            script.push_str(&String::from_utf8_lossy(chunk));
            script.push('\n');
        }
        script.push_str("LAB_LOG_EOF\n");
        let _ = write!(
            script,
            "tandem-check verify --log {} --image /dev/vg_nvme/{VOLUME} --json {rules}",
            log.guest_path
        );
        let out = self.lab.host(host)?.sh(&script, Duration::from_secs(180))?;
        let report: serde_json::Value = serde_json::from_slice(&out.output).with_context(|| {
            format!(
                "{what}: tandem-check verify on {host} (status {}): {}",
                out.status,
                out.text().trim()
            )
        })?;
        let count = |key: &str| report[key].as_u64().unwrap_or(0);
        let bad = count("lost") + count("stale") + count("garbage");
        if bad > 0 || report["passed"] != true {
            self.result.lost += bad.max(1);
            let mut text = format!(
                "{what} on {host}: {} lost, {} stale, {} garbage",
                count("lost"),
                count("stale"),
                count("garbage")
            );
            if let Some(first) = report["violations"].get(0).and_then(|v| v.as_str()) {
                let _ = write!(text, " (first: {first})");
            }
            self.result.notes.push(text);
        }
        Ok(())
    }

    /// Boots a host that lost power with tandemd held back.
    fn reboot_held(&mut self, host: &str) -> Result<Duration> {
        let boot = self.lab.boot.clone();
        self.lab.host(host)?.boot(&boot, true, super::BOOT_TIMEOUT)
    }

    fn start_tandemd(&mut self, host: &str) -> Result<()> {
        self.lab.host(host)?.sh_ok("lab-tandemd start", SHORT)?;
        Ok(())
    }

    /// After every fault: resync, no split brain, equal checksums, the returned replica
    /// holds every acknowledged write.
    fn resync_and_compare(
        &mut self,
        primary: &str,
        other: &str,
        log: &Log,
        rules: &str,
    ) -> Result<()> {
        wait_sync(self.lab, primary)?;
        for host in [primary, other] {
            let status = volume_status(self.lab, host)?;
            if let Some(sb) = crate::volume_status::split_brain(&status) {
                self.result.split_brains += 1;
                self.result
                    .notes
                    .push(format!("split brain on {host}: {sb}"));
            }
        }
        let sum = |cycle: &mut Self, host: &str| -> Result<String> {
            let out = cycle.lab.host(host)?.sh_ok(
                &format!("sha256sum /dev/vg_nvme/{VOLUME}"),
                Duration::from_secs(120),
            )?;
            Ok(out
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string())
        };
        let (a, b) = (sum(self, primary)?, sum(self, other)?);
        if a != b || a.is_empty() {
            self.result.replicas_differ += 1;
            self.result.notes.push(format!(
                "replicas differ after resync: {primary} {a}, {other} {b}"
            ));
        }
        self.check("after resync", other, log, rules)
    }

    /// Power cut of the Primary: promote the Secondary, check the dead host's disk and the
    /// survivor, bring the dead host back.
    fn power_cut_primary(&mut self) -> Result<String> {
        let (p, s) = (self.primary.clone(), self.secondary.clone());
        self.lab.host(&p)?.power_cut()?;
        let promote = format!("tandem volume promote {VOLUME}");
        retry(SHORT, || self.lab.host(&s)?.sh_ok(&promote, SHORT))
            .with_context(|| format!("promoting {s} after the power cut of {p}"))?;
        self.reboot_held(&p)?;
        let log = self.fetch_log(&p, None, "crashed-writer")?;
        self.result.acknowledged = log.acknowledged;
        self.check("durable writes after the power cut", &p, &log, DURABLE)?;
        self.check("survivor", &s, &log, ACKED_WRITER_CRASHED)?;
        self.start_tandemd(&p)?;
        self.resync_and_compare(&s, &p, &log, ACKED_WRITER_CRASHED)?;
        Ok(s)
    }

    /// Power cut of the Secondary: the workload goes on; check the dead host's disk against
    /// the log as it was before the cut, the Primary against the whole log.
    fn power_cut_secondary(&mut self, keep_writing: Duration) -> Result<String> {
        let (p, s) = (self.primary.clone(), self.secondary.clone());
        let before = self.log_len()?;
        self.lab.host(&s)?.power_cut()?;
        std::thread::sleep(keep_writing);
        self.stop_workload()?;
        let full = self.fetch_log(&p, None, "full")?;
        self.result.acknowledged = full.acknowledged;
        // The Secondary may hold writes logged after the cut point: checked as if the
        // writer had crashed there.
        let prefix = self.fetch_log(&p, Some(before), "before-cut")?;
        self.reboot_held(&s)?;
        self.check("durable writes after the power cut", &s, &prefix, DURABLE)?;
        self.check("Primary", &p, &full, ACKED)?;
        self.start_tandemd(&s)?;
        self.resync_and_compare(&p, &s, &full, ACKED)?;
        Ok(p)
    }

    /// Orderly reboot of the Primary: stop the workload, shut P down, promote the
    /// Secondary, check it; boot P with tandemd held and check its replica (a clean stop
    /// keeps every acknowledged write), then resync.
    fn reboot_primary(&mut self) -> Result<String> {
        let (p, s) = (self.primary.clone(), self.secondary.clone());
        self.stop_workload()?;
        let full = self.fetch_log(&p, None, "full")?;
        self.result.acknowledged = full.acknowledged;
        self.lab.host(&p)?.shutdown(SHORT)?;
        let promote = format!("tandem volume promote {VOLUME}");
        retry(SHORT, || self.lab.host(&s)?.sh_ok(&promote, SHORT))
            .with_context(|| format!("promoting {s} after the shutdown of {p}"))?;
        self.check("survivor", &s, &full, ACKED)?;
        self.reboot_held(&p)?;
        self.check("rebooted host", &p, &full, ACKED)?;
        self.start_tandemd(&p)?;
        self.resync_and_compare(&s, &p, &full, ACKED)?;
        Ok(s)
    }

    /// Orderly reboot of the Secondary: the workload goes on while it is down; its replica
    /// must hold every write acknowledged before the shutdown began (newer ones may be
    /// there too), the Primary the whole log.
    fn reboot_secondary(&mut self, keep_writing: Duration) -> Result<String> {
        let (p, s) = (self.primary.clone(), self.secondary.clone());
        let before = self.log_len()?;
        self.lab.host(&s)?.shutdown(SHORT)?;
        std::thread::sleep(keep_writing);
        self.stop_workload()?;
        let full = self.fetch_log(&p, None, "full")?;
        self.result.acknowledged = full.acknowledged;
        let prefix = self.fetch_log(&p, Some(before), "before-shutdown")?;
        self.reboot_held(&s)?;
        self.check("rebooted host", &s, &prefix, ACKED_WRITER_CRASHED)?;
        self.check("Primary", &p, &full, ACKED)?;
        self.start_tandemd(&s)?;
        self.resync_and_compare(&p, &s, &full, ACKED)?;
        Ok(p)
    }

    fn finish_without_crash(&mut self) -> Result<String> {
        let (p, s) = (self.primary.clone(), self.secondary.clone());
        self.stop_workload()?;
        let full = self.fetch_log(&p, None, "full")?;
        self.result.acknowledged = full.acknowledged;
        self.check("Primary", &p, &full, ACKED)?;
        self.resync_and_compare(&p, &s, &full, ACKED)?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_plan_and_uses_every_kind() {
        let a = plan(42, 40, &FaultKind::ALL);
        assert_eq!(a, plan(42, 40, &FaultKind::ALL));
        assert_ne!(a, plan(43, 40, &FaultKind::ALL));
        for kind in FaultKind::ALL {
            assert!(a.iter().any(|f| f.kind == kind), "{kind:?} never drawn");
        }
        assert!(a.iter().any(|f| f.on_primary) && a.iter().any(|f| !f.on_primary));
        let only = plan(7, 10, &[FaultKind::PowerCut]);
        assert!(only.iter().all(|f| f.kind == FaultKind::PowerCut));
        assert_eq!("freeze".parse::<FaultKind>(), Ok(FaultKind::Freeze));
        assert_eq!("reboot".parse::<FaultKind>(), Ok(FaultKind::Reboot));
        assert!("meteor".parse::<FaultKind>().is_err());
    }

    #[test]
    fn reboots_alone_hit_both_hosts() {
        let only = plan(21, 12, &[FaultKind::Reboot]);
        assert!(only.iter().all(|f| f.kind == FaultKind::Reboot));
        assert!(only.iter().any(|f| f.on_primary) && only.iter().any(|f| !f.on_primary));
        let mixed = plan(21, 40, &[FaultKind::Reboot, FaultKind::PowerCut]);
        assert!(mixed.iter().any(|f| f.kind == FaultKind::Reboot));
        assert!(mixed.iter().any(|f| f.kind == FaultKind::PowerCut));
    }
}
