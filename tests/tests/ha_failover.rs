//! Issue 7's acceptance scenarios, end to end: three simulated hosts (hv1, hv2, hv3: network
//! namespaces on one bridge, a libvirtd, tandemd and `tandem-ha run` each), a volume with a
//! replica on every host (quorum: 2 of 3), a domain on it running on hv1, HA-managed with
//! `--prefer hv2,hv3`. Faults: [`ha::kill_host`] (power loss), [`ha::cut_replication`]
//! (replication traffic between two hosts dropped, management fine), [`ha::set_link`]
//! (isolation: both paths). The power loss also with the disk on vhost-user-blk (issue 17:
//! `<disk type='vhostuser'>` on each host's own `/run/tandem/vhost/<volume>.sock`, memfd
//! shared memory), a real guest writing, as with NBD.
//!
//! Also: agents restarted (placement kept in `<state_dir>/ha/placement.json`) and a hung
//! agent (its libvirtd SIGSTOPped) whose soft watchdog kills the isolated VM.
//!
//! They need the replication engine (issue 3: `volume_status`, promotion, quorum,
//! `volume_demote` with `force`) in tandemd. Each prints its measured times (`[ha]` lines,
//! `--nocapture`).

use std::time::{Duration, Instant};

use tandem_tests::ha::{self, Agent};
use tandem_tests::libvirt::{self, Cluster, LibvirtHost};
use tandem_tests::prometheus::http_get;
use tandem_tests::vm::{ImageBuilder, Vm};
use tandem_tests::{tail, wait_until};

const VOLUME: &str = "vm-1-disk-0";
const VM: &str = "vm1";

struct Bed {
    // Agents before the cluster: dropped (killed) first. In host order (hv1, hv2, hv3).
    agents: Vec<Agent>,
    cluster: Cluster,
    _work: tempfile::TempDir,
    console: std::path::PathBuf,
}

impl Bed {
    fn host(&self, node: &str) -> &LibvirtHost {
        self.cluster.host(node)
    }

    /// SIGKILL the agent of `node` (host order: hv1, hv2, hv3).
    fn kill_agent(&mut self, node: &str) {
        let i = self.index(node);
        self.agents[i].kill();
    }

    /// Start the agent of `node` again (after [`Bed::kill_agent`]).
    fn start_agent(&mut self, node: &str) {
        let i = self.index(node);
        self.agents[i].kill();
        self.agents[i] = Agent::start(self.cluster.host(node));
    }

    fn index(&self, node: &str) -> usize {
        self.cluster
            .hosts
            .iter()
            .position(|h| h.node == node)
            .unwrap()
    }

    /// What each host's agent, hook and events say, for a failure message: the agents'
    /// log without its DEBUG lines (mostly retries to reach a dead peer), then every
    /// agent's events as one timeline.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for h in &self.cluster.hosts {
            let log = std::fs::read_to_string(h.path("tandem-ha.log")).unwrap_or_default();
            let log: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
            out.push_str(&format!(
                "--- {} status: {}\n--- {} agent log (tail, no DEBUG):\n{}\n--- {} hook log:\n{}\n",
                h.node,
                ha::status(h).map_or("unavailable".to_string(), |s| s.to_string()),
                h.node,
                tail(&log.join("\n"), 15),
                h.node,
                tail(&h.hook_log(), 15),
            ));
        }
        let hosts: Vec<&LibvirtHost> = self.cluster.hosts.iter().collect();
        out.push_str("--- events of every agent:\n");
        out.push_str(&timeline(&hosts, 0));
        out
    }
}

/// Print the agents' events (those after `since_ms`) as a timeline, for the log.
fn print_timeline(hosts: &[&LibvirtHost], since_ms: u64) {
    eprint!("{}", timeline(hosts, since_ms));
}

/// The agents' events after `since_ms` (0: all, times from the first), one per line. Read
/// from each host's events file, so a killed host's events are there too.
fn timeline(hosts: &[&LibvirtHost], since_ms: u64) -> String {
    let mut all: Vec<serde_json::Value> = hosts
        .iter()
        .flat_map(|h| {
            let text = std::fs::read_to_string(h.path("state/ha/events.jsonl")).unwrap_or_default();
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect();
    all.retain(|e| e["ts_ms"].as_u64().is_some_and(|t| t >= since_ms));
    all.sort_by_key(|e| e["ts_ms"].as_u64());
    let origin = match since_ms {
        0 => all.first().and_then(|e| e["ts_ms"].as_u64()).unwrap_or(0),
        t => t,
    };
    let mut out = String::new();
    for e in all {
        let t = e["ts_ms"].as_u64().unwrap_or(0).saturating_sub(origin);
        out.push_str(&format!(
            "[ha] +{:>6} ms {} {} {}\n",
            t, e["source"], e["event"], e["properties"]
        ));
    }
    out
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Guest: resume the counter stored in the first 16 bytes of /dev/vda, print it, then
/// keep writing: write N as a tagged record of its own (16 bytes at [`record_offset`]`(N)`),
/// then N into the counter, each with fsync, and print `acked N` after both are durable
/// (a failed write or fsync, e.g. EIO once the host's tandemd is gone, prints `failed N`
/// and N is tried again: it was not acknowledged).
const COUNTER_SCRIPT: &str = r#"n=$(dd if=/dev/vda bs=16 count=1 2>/dev/null | tr -dc 0-9)
[ -z "$n" ] && n=0
n=$(expr "$n" + 0)
echo "resume $n"
while true; do
  n=$((n + 1))
  if printf '%016d' "$n" | dd of=/dev/vda bs=16 seek=$((256 + n)) count=1 conv=fsync,notrunc 2>/dev/null &&
     printf '%016d' "$n" | dd of=/dev/vda bs=16 count=1 conv=fsync,notrunc 2>/dev/null; then
    echo "acked $n"
  else
    echo "failed $n"
    n=$((n - 1))
    sleep 1
  fi
done
"#;

/// Where the guest's tagged record of write `n` lives on the disk.
fn record_offset(n: u64) -> usize {
    ((256 + n) * 16) as usize
}

/// The checker: every write the guest acknowledged (1..=acked) is on `host`'s replica with
/// its own tag. Returns how many were checked; panics naming the first lost write.
fn check_acknowledged_records(host: &LibvirtHost, acked: u64) -> u64 {
    let image = std::fs::read(host.path(&format!("images/{VOLUME}.img")))
        .unwrap_or_else(|e| panic!("reading {}'s replica: {e}", host.node));
    for n in 1..=acked {
        let at = record_offset(n);
        let record = &image[at..at + 16];
        assert_eq!(
            record,
            format!("{n:016}").as_bytes(),
            "acknowledged write {n} lost on {}'s replica: holds {:?}",
            host.node,
            String::from_utf8_lossy(record)
        );
    }
    acked
}

fn last_number(console: &str, word: &str) -> Option<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix(word))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
}

/// Three hosts, the replicated volume, the domain running on hv1 (a guest writing the
/// counter when `guest` is true, else a SeaBIOS-only domain), the agents, `manage`.
fn bed(guest: bool) -> Bed {
    bed_with(guest, false)
}

/// [`bed`], the domain's disk the NBD one or (`vhost`) the `<disk type='vhostuser'>`
/// `tandem-libvirt-hook disk-xml --frontend vhost-user` prints, with shared memfd memory.
fn bed_with(guest: bool, vhost: bool) -> Bed {
    libvirt::require_tools().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&["hv1", "hv2", "hv3"]).unwrap();
    let hv1 = cluster.host("hv1");
    for h in &cluster.hosts {
        ha::write_ha_toml(h, "heartbeat_interval_ms = 500\ndead_after_ms = 3000\n");
    }
    hv1.tandem(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--replicas",
        "3",
    ])
    .ok();
    hv1.tandem(&["volume", "wait-sync", VOLUME, "--timeout", "60"])
        .ok();
    let disk = if vhost {
        libvirt::vhost_disk_xml(hv1, VOLUME)
    } else {
        ha::tandem_disk_xml(VOLUME, "vda")
    };
    let console = work.path().join("console.log");
    let xml = if guest {
        let image = ImageBuilder::new(COUNTER_SCRIPT)
            .build(&work.path().join("image"))
            .expect("building the guest initramfs");
        let cmdline = Vm::new(image.clone()).kernel_cmdline();
        libvirt::tcg_domain_xml(VM, &image, &cmdline, &disk, &console)
    } else {
        ha::bios_domain_xml(VM, &disk)
    };
    let xml = if vhost {
        libvirt::with_vhost_memory(&xml)
    } else {
        xml
    };
    ha::define(hv1, VM, &xml);
    let agents: Vec<Agent> = cluster.hosts.iter().map(Agent::start).collect();
    let hosts: Vec<&LibvirtHost> = cluster.hosts.iter().collect();
    ha::wait_all_alive(&hosts);
    hv1.virsh(&["start", VM]).ok();
    ha::ha(hv1, &["manage", VM, "--prefer", "hv2,hv3"]).ok();
    let bed = Bed {
        agents,
        cluster,
        _work: work,
        console,
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            ha::vm_status(bed.host("hv2"), VM).is_some_and(|v| v["running_on"] == "hv1")
        }),
        "hv2 does not see vm1 running on hv1\n{}",
        bed.diagnostics()
    );
    if guest {
        assert!(
            wait_until(Duration::from_secs(120), || {
                last_number(
                    &std::fs::read_to_string(&bed.console).unwrap_or_default(),
                    "acked ",
                )
                .is_some_and(|n| n > 20)
            }),
            "the guest does not write\n{}",
            std::fs::read_to_string(&bed.console).unwrap_or_default()
        );
    }
    bed
}

fn volume_status(host: &LibvirtHost) -> serde_json::Value {
    let v = host
        .tandem(&["--json", "volume", "status", VOLUME])
        .ok()
        .json();
    v.get("status").cloned().unwrap_or(v)
}

fn no_split_brain(host: &LibvirtHost) {
    let s = volume_status(host);
    for p in s["peers"].as_array().into_iter().flatten() {
        assert!(
            p["split_brain"].is_null(),
            "{}: split brain: {s}",
            host.node
        );
    }
}

#[test]
fn host_killed_vm_runs_on_the_survivor_with_no_acknowledged_write_lost() {
    host_killed_failover(bed(true), "");
}

/// Issue 17: the same over vhost-user-blk. hv1's guest writes over hv1's
/// `/run/tandem/vhost/vm-1-disk-0.sock`; after the power loss hv2's agent starts the domain
/// over hv2's own socket (the hook promotes in `prepare`) and the guest there resumes from
/// every write it acknowledged on hv1.
#[test]
fn host_killed_vhost_user_vm_runs_on_the_survivor_with_no_acknowledged_write_lost() {
    host_killed_failover(bed_with(true, true), " (vhost-user)");
}

/// hv1 (running the writing guest) loses power; hv2 must run it, promoted, within 10 s, with
/// no acknowledged write lost. `label` marks the `[ha]` lines.
fn host_killed_failover(bed: Bed, label: &str) {
    let hv2 = bed.host("hv2");
    let killed_ms = now_ms();
    ha::kill_host(bed.host("hv1"));
    let killed = Instant::now();
    // hv1's QEMU is dead: its console holds the last acknowledged (fsynced) counter.
    std::thread::sleep(Duration::from_millis(200));
    let acked = last_number(&std::fs::read_to_string(&bed.console).unwrap(), "acked ")
        .expect("acked writes before the kill");
    let took = ha::wait_running_here(hv2, VM, Duration::from_secs(60))
        .map(|_| killed.elapsed())
        .unwrap_or_else(|| panic!("vm1 not running on hv2\n{}", bed.diagnostics()));
    eprintln!(
        "[ha]{label} host killed -> vm1 running on hv2 after {:.2} s (goal < 10 s)",
        took.as_secs_f64()
    );
    print_timeline(&[hv2, bed.host("hv3")], killed_ms);
    // Where the start's time goes (the hook promotes the volume in `prepare`).
    let hook_log = hv2.hook_log();
    eprintln!("[ha] hv2 hook log (tail):\n{}", tail(&hook_log, 6));
    assert!(
        hook_log
            .lines()
            .any(|l| l.contains(&format!("decided domain={VM} op=Prepare")) && l.contains(VOLUME)),
        "hv2's hook did not consider the disk:\n{hook_log}"
    );
    let status = ha::vm_status(hv2, VM).unwrap();
    let f = &status["last_failover"];
    assert_eq!(f["from"], "hv1", "{status}");
    eprintln!(
        "[ha] agent: {} ms from hv1's last heartbeat, detected after {} ms",
        f["total_ms"], f["detect_ms"]
    );
    assert_eq!(hv2.domstate(VM), "running");
    assert_ne!(bed.host("hv3").domstate(VM), "running", "never twice");
    // Promoted on hv2; hv1's copy (dead) is not Primary for hv2 or hv3.
    let s = volume_status(hv2);
    assert_eq!(s["role"], "Primary", "{s}");
    for h in [hv2, bed.host("hv3")] {
        let hv1 = peer_status(h, "hv1");
        assert_ne!(hv1["role"], "Primary", "{}: {hv1}", h.node);
    }
    // The guest on hv2 resumes from what is on the promoted replica.
    let mut resumed = None;
    assert!(wait_until(Duration::from_secs(120), || {
        resumed = last_number(
            &std::fs::read_to_string(&bed.console).unwrap_or_default(),
            "resume ",
        );
        resumed.is_some()
    }));
    let resumed = resumed.unwrap();
    eprintln!("[ha] last acknowledged write on hv1: {acked}; hv2's replica holds {resumed}");
    assert!(
        resumed >= acked,
        "lost acknowledged writes: acked {acked}, replica has {resumed}"
    );
    assert!(
        resumed <= acked + 1,
        "replica ahead of every attempted write"
    );
    let checked = check_acknowledged_records(hv2, acked);
    eprintln!(
        "[ha] checker: {checked} of {checked} acknowledged writes found on hv2's replica, 0 lost"
    );
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    let events = ha::events(hv2);
    assert!(events.iter().any(|e| e["event"] == "failover"));
}

/// The peer `node` as `host`'s replica sees it.
fn peer_status(host: &LibvirtHost, node: &str) -> serde_json::Value {
    volume_status(host)["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["node"] == node)
        .cloned()
        .unwrap_or_default()
}

fn acked(bed: &Bed) -> u64 {
    last_number(
        &std::fs::read_to_string(&bed.console).unwrap_or_default(),
        "acked ",
    )
    .unwrap_or(0)
}

#[test]
fn replication_link_cut_only_is_not_a_failover() {
    // A writing guest: hv2 misses the writes made during the cut and must resync them.
    let bed = bed(true);
    let (hv1, hv2, hv3) = (bed.host("hv1"), bed.host("hv2"), bed.host("hv3"));
    let (ip1, ip2) = (hv1.ip().unwrap(), hv2.ip().unwrap());
    ha::cut_replication(hv1, ip2);
    ha::cut_replication(hv2, ip1);
    let acked_at_cut = acked(&bed);
    // Three dead-after periods: any failover would have happened.
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(hv1.domstate(VM), "running", "{}", bed.diagnostics());
    for h in [hv2, hv3] {
        assert_ne!(h.domstate(VM), "running", "{} started vm1", h.node);
    }
    let s2 = ha::vm_status(hv2, VM).unwrap();
    assert_eq!(s2["action"], "nothing", "{s2}");
    assert!(s2["reason"].as_str().unwrap().contains("hv1"), "{s2}");
    assert!(
        volume_status(hv1)["quorum"] == true,
        "hv1 keeps quorum through hv3"
    );
    // The guest kept writing (hv1 has quorum with hv3); hv2 is behind.
    let acked_in_cut = acked(&bed);
    assert!(
        acked_in_cut > acked_at_cut + 5,
        "the guest stopped writing during the cut: {acked_at_cut} -> {acked_in_cut}"
    );
    let behind = peer_status(hv1, "hv2");
    assert_ne!(behind["connection"], "Connected", "{behind}");
    let out_of_sync = behind["out_of_sync_bytes"].as_u64().unwrap_or(0);
    assert!(
        out_of_sync > 0,
        "hv1 does not track what hv2 missed: {behind}"
    );
    eprintln!(
        "[ha] replication cut for 9 s: no failover; guest acked {acked_at_cut} -> {acked_in_cut}; hv2 {out_of_sync} bytes behind"
    );
    ha::heal_replication(hv1);
    ha::heal_replication(hv2);
    let healed = Instant::now();
    hv1.tandem(&["volume", "wait-sync", VOLUME, "--timeout", "60"])
        .ok();
    eprintln!(
        "[ha] healed: hv2 resynced in {:.2} s",
        healed.elapsed().as_secs_f64()
    );
    for h in [hv1, hv2, hv3] {
        no_split_brain(h);
    }
    assert_eq!(volume_status(hv2)["disk_state"], "UpToDate");
    let caught_up = peer_status(hv1, "hv2");
    assert_eq!(caught_up["connection"], "Connected", "{caught_up}");
    assert_eq!(caught_up["out_of_sync_bytes"], 0, "{caught_up}");
    assert_eq!(hv1.domstate(VM), "running");
    assert!(acked(&bed) > acked_in_cut, "the guest stopped writing");
    // Pause the guest (no writes in flight) and compare the replicas online.
    hv1.virsh(&["suspend", VM]).ok();
    let verified = hv1
        .tandem(&["volume", "verify", VOLUME, "--json"])
        .ok()
        .json();
    hv1.virsh(&["resume", VM]).ok();
    assert_eq!(verified["differing_blocks"], 0, "{verified}");
}

#[test]
fn isolated_running_host_is_fenced_and_rejoins_as_sync_target() {
    // A writing guest: the takeover side writes while hv1 is cut off, so hv1 must come
    // back as SyncTarget.
    let bed = bed(true);
    let (hv1, hv2) = (bed.host("hv1"), bed.host("hv2"));
    let cut_ms = now_ms();
    ha::set_link(hv1, false);
    let cut = Instant::now();
    let took = ha::wait_running_here(hv2, VM, Duration::from_secs(60))
        .map(|_| cut.elapsed())
        .unwrap_or_else(|| panic!("vm1 not running on hv2\n{}", bed.diagnostics()));
    eprintln!(
        "[ha] hv1 isolated -> vm1 running on hv2 after {:.2} s",
        took.as_secs_f64()
    );
    // The isolated side lost quorum: its agent destroys its vm1.
    assert!(
        hv1.wait_domstate(VM, "shut off", Duration::from_secs(30)),
        "isolated hv1 still runs vm1\n{}",
        bed.diagnostics()
    );
    eprintln!(
        "[ha] isolated vm1 destroyed {:.2} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    print_timeline(&[hv1, hv2], cut_ms);
    assert!(ha::events(hv1).iter().any(|e| e["event"] == "fenced"));
    // The agent demoted the fenced VM's volume by force: Secondary while still isolated.
    assert!(
        wait_until(Duration::from_secs(30), || volume_status(hv1)["role"]
            == "Secondary"),
        "isolated hv1 is still Primary: {}\n{}",
        volume_status(hv1),
        bed.diagnostics()
    );
    eprintln!(
        "[ha] isolated hv1 Secondary {:.2} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    assert!(ha::events(hv1).iter().any(|e| e["event"] == "demoted"));
    // Heal: hv1 comes back as SyncTarget, never split brain, vm1 stays on hv2 only.
    // The guest resumes on hv2 and writes there before the heal.
    assert!(
        wait_until(Duration::from_secs(120), || {
            let console = std::fs::read_to_string(&bed.console).unwrap_or_default();
            console.contains("resume ")
                && console
                    .split("resume ")
                    .last()
                    .is_some_and(|after| after.matches("acked ").count() > 5)
        }),
        "the guest does not write on hv2\n{}",
        bed.diagnostics()
    );
    ha::set_link(hv1, true);
    let mut saw_sync_target = false;
    let synced = wait_until(Duration::from_secs(60), || {
        let s = volume_status(hv1);
        saw_sync_target |= s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["replication"] == "SyncTarget")
            || s["disk_state"] == "Inconsistent";
        s["disk_state"] == "UpToDate"
            && s["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|p| p["connection"] == "Connected")
    });
    assert!(synced, "hv1 did not rejoin: {}", volume_status(hv1));
    for h in &bed.cluster.hosts {
        no_split_brain(h);
    }
    let rejoined = volume_status(hv1);
    let decisions: Vec<&str> = rejoined["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["decision"].as_str())
        .collect();
    eprintln!(
        "[ha] hv1 rejoined (SyncTarget seen while polling: {saw_sync_target}): {decisions:?}"
    );
    // SyncTarget of the side that took over: by bitmap from hv2 (the Primary), or in full
    // from hv3 when hv1 meets it first (a Secondary's bitmap lacks its Primary's writes).
    assert!(
        decisions
            .iter()
            .any(
                |d| (d.contains("bitmap resync from hv2") || d.contains("full sync from hv3"))
                    && d.ends_with(")")
                    && d.contains(" to hv1 ")
            ),
        "hv1 did not rejoin as SyncTarget: {rejoined}"
    );
    assert_eq!(volume_status(hv1)["role"], "Secondary");
    assert_eq!(hv2.domstate(VM), "running");
    assert_ne!(hv1.domstate(VM), "running");
    // Pause the guest (no writes in flight) and compare the replicas online.
    hv2.virsh(&["suspend", VM]).ok();
    let verified = hv2
        .tandem(&["volume", "verify", VOLUME, "--json"])
        .ok()
        .json();
    hv2.virsh(&["resume", VM]).ok();
    assert_eq!(verified["differing_blocks"], 0, "{verified}");
}

#[test]
fn two_hosts_dead_nothing_starts_and_status_says_why() {
    let bed = bed(false);
    let hv2 = bed.host("hv2");
    ha::kill_host(bed.host("hv1"));
    ha::kill_host(bed.host("hv3"));
    std::thread::sleep(Duration::from_secs(10));
    assert_ne!(hv2.domstate(VM), "running", "started without quorum");
    let s = ha::vm_status(hv2, VM).unwrap();
    let reason = s["reason"].as_str().unwrap();
    assert!(reason.contains("no quorum for vm-1-disk-0"), "{s}");
    let human = ha::ha(hv2, &["status"]).ok().stdout;
    assert!(human.contains("no quorum for vm-1-disk-0"), "{human}");
    eprintln!("[ha] hv2 says: {reason}");
}

#[test]
fn drill_kills_the_host_with_the_operators_command_and_reports_the_failover_time() {
    let bed = bed(false);
    let (hv1, hv2) = (bed.host("hv1"), bed.host("hv2"));
    // The operator's kill command, run by the drill inside hv2, asks this test (which can
    // reach every namespace) to power hv1 off: a watcher thread kills it within ~20 ms of
    // the request. (A namespace cannot enter the machine's root namespaces here.)
    let trigger = bed._work.path().join("kill-request");
    let kill = format!("touch {}-{{host}}", trigger.display());
    let hv1_trigger = std::path::PathBuf::from(format!("{}-hv1", trigger.display()));
    let requested = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            if wait_until(Duration::from_secs(60), || hv1_trigger.exists()) {
                ha::kill_host(hv1);
                requested.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        drill(&bed, hv2, &kill);
        assert!(requested.load(std::sync::atomic::Ordering::SeqCst));
    });
}

fn drill(bed: &Bed, hv2: &LibvirtHost, kill: &str) {
    let out = ha::ha(
        hv2,
        &[
            "drill",
            VM,
            "--kill-host",
            "hv1",
            "--kill-command",
            kill,
            "--check-command",
            "echo checker ran",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "drill failed: {out:?}\n{}",
        bed.diagnostics()
    );
    let report = out.json();
    eprintln!("[ha] drill report: {report}");
    assert_eq!(report["from"], "hv1");
    assert_eq!(report["to"], "hv2", "hv2 is preferred");
    assert_eq!(report["passed"], true);
    assert!(report["check"]["output"]
        .as_str()
        .unwrap()
        .contains("checker ran"));
    let ms = report["failover_ms"].as_u64().unwrap();
    eprintln!("[ha] drill: failover {:.2} s", ms as f64 / 1000.0);
    assert!(ms < 10_000, "{report}");
    // hv2's agent counts and times the failover on its metrics endpoint (ha.toml's
    // default metrics_listen), and shows vm1 running there.
    let want = [
        r#"tandem_ha_failovers_total{node="hv2"} 1"#,
        r#"tandem_ha_failover_duration_seconds_count{node="hv2"} 1"#,
        r#"tandem_ha_vm_running_here{node="hv2",vm="vm1"} 1"#,
    ];
    let mut scrape = String::new();
    let counted = wait_until(Duration::from_secs(5), || {
        scrape = http_get(&hv2.netns, "127.0.0.1:9943", "/metrics").unwrap_or_default();
        want.iter().all(|w| scrape.lines().any(|l| l == *w))
    });
    assert!(counted, "hv2's tandem-ha metrics lack {want:?}:\n{scrape}");
    // A drill on a VM that does not run on the named host measures nothing: refused.
    let refused = ha::ha(
        hv2,
        &["drill", VM, "--kill-host", "hv3", "--kill-command", "true"],
    )
    .failed();
    assert!(
        refused.contains("runs on hv2, which is not among --kill-host hv3"),
        "{refused}"
    );
}

/// Events of `host`'s agent named `name` emitted at or after `since_ms`.
fn events_since(host: &LibvirtHost, name: &str, since_ms: u64) -> Vec<serde_json::Value> {
    ha::events(host)
        .into_iter()
        .filter(|e| e["event"] == name && e["ts_ms"].as_u64().is_some_and(|t| t >= since_ms))
        .collect()
}

fn domid(host: &LibvirtHost) -> String {
    host.virsh(&["domid", VM]).stdout.trim().to_string()
}

/// Issue 7, agent restarts: where a VM runs survives the agent's restart
/// (`<state_dir>/ha/placement.json`). A restarted agent neither starts a VM that runs on a
/// host it has not heard from yet (or whose agent is down), nor forgets a VM whose host
/// died while the agent was down, nor loses track of a VM it started itself.
#[test]
fn restarted_agents_remember_where_the_vm_runs() {
    let mut bed = bed(false);
    let dead_after = Duration::from_millis(3000);

    // 1. hv1's agent is down (hv1 and vm1 fine); hv2's agent restarts. It knows vm1 ran on
    //    hv1 from its placement file, hears nothing from hv1's agent, sees hv1's
    //    replication link up: it waits, it does not start vm1.
    bed.kill_agent("hv1");
    let restarted_ms = now_ms();
    bed.start_agent("hv2");
    let (hv1, hv2, hv3) = (bed.host("hv1"), bed.host("hv2"), bed.host("hv3"));
    assert!(
        wait_until(Duration::from_secs(20), || ha::vm_status(hv2, VM)
            .is_some_and(|v| v["running_on"] == "hv1")),
        "restarted hv2 agent forgot that vm1 runs on hv1\n{}",
        bed.diagnostics()
    );
    std::thread::sleep(dead_after * 3);
    assert_eq!(hv1.domstate(VM), "running", "{}", bed.diagnostics());
    for h in [hv2, hv3] {
        assert_ne!(h.domstate(VM), "running", "{} started vm1", h.node);
        assert!(
            events_since(h, "started", restarted_ms).is_empty(),
            "{} started vm1",
            h.node
        );
    }
    let s2 = ha::vm_status(hv2, VM).unwrap();
    assert_eq!(s2["running_on"], "hv1", "{s2}");
    assert_eq!(s2["action"], "wait", "{s2}");
    assert!(
        s2["reason"]
            .as_str()
            .unwrap()
            .contains("its replication link is up"),
        "{s2}"
    );
    bed.start_agent("hv1");
    let hosts: Vec<&LibvirtHost> = bed.cluster.hosts.iter().collect();
    ha::wait_all_alive(&hosts);

    // 2. hv2's and hv3's agents are down when hv1 dies; started again afterwards, they
    //    still know vm1 ran on hv1 and hv2 (preferred) takes it over.
    bed.kill_agent("hv2");
    bed.kill_agent("hv3");
    ha::kill_host(bed.host("hv1"));
    std::thread::sleep(Duration::from_secs(1));
    let started_ms = now_ms();
    bed.start_agent("hv2");
    bed.start_agent("hv3");
    let started = Instant::now();
    let (hv2, hv3) = (bed.host("hv2"), bed.host("hv3"));
    let took = ha::wait_running_here(hv2, VM, Duration::from_secs(60))
        .map(|_| started.elapsed())
        .unwrap_or_else(|| {
            panic!(
                "restarted agents did not fail vm1 over from dead hv1\n{}",
                bed.diagnostics()
            )
        });
    eprintln!(
        "[ha] agents restarted after hv1 died -> vm1 running on hv2 {:.2} s after their start (dead_after 3 s)",
        took.as_secs_f64()
    );
    print_timeline(&[hv2, hv3], started_ms);
    assert!(
        took >= dead_after,
        "a restarted agent must give hv1 dead-after before calling it dead: {took:?}"
    );
    assert_ne!(hv3.domstate(VM), "running", "never twice");
    let s2 = ha::vm_status(hv2, VM).unwrap();
    assert_eq!(s2["last_failover"]["from"], "hv1", "{s2}");

    // 3. hv2's agent restarts again: it keeps the VM it started (not restarted, same
    //    QEMU) and its last failover; hv3 restarted too still sees vm1 on hv2.
    let id = domid(hv2);
    bed.start_agent("hv2");
    bed.start_agent("hv3");
    let (hv2, hv3) = (bed.host("hv2"), bed.host("hv3"));
    assert!(
        wait_until(Duration::from_secs(20), || {
            ha::vm_status(hv2, VM)
                .is_some_and(|v| v["running_here"] == true && v["last_failover"]["from"] == "hv1")
                && ha::vm_status(hv3, VM).is_some_and(|v| v["running_on"] == "hv2")
        }),
        "restarted agents lost track of vm1 on hv2\n{}",
        bed.diagnostics()
    );
    std::thread::sleep(dead_after * 2);
    assert_eq!(domid(hv2), id, "vm1 was restarted on hv2");
    assert_ne!(hv3.domstate(VM), "running", "never twice");
    let placement = std::fs::read_to_string(hv2.path("state/ha/placement.json")).unwrap();
    assert!(placement.contains("\"vm1\": \"hv2\""), "{placement}");
}

/// The pid of `host`'s process named `comm` (from its network namespace).
fn pid_of(host: &LibvirtHost, comm: &str) -> Option<i32> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", &host.netns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
}

/// Gone, or a zombie nobody reaped yet (its parent libvirtd is stopped).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Issue 7, soft watchdog: hv1's agent hangs (its libvirtd is SIGSTOPped, so the decision
/// loop blocks in a libvirt call) and hv1 is then isolated. The watchdog notices the loop
/// stopped ticking, finds vm1's disk without quorum, SIGKILLs its QEMU and demotes the
/// volume by force; hv2 takes vm1 over.
#[test]
fn hung_agent_soft_watchdog_kills_the_isolated_vm() {
    let mut bed = bed(false);
    ha::write_ha_toml(
        bed.host("hv1"),
        "heartbeat_interval_ms = 500\ndead_after_ms = 3000\nsoft_watchdog_ms = 3000\n",
    );
    bed.start_agent("hv1");
    let (hv1, hv2) = (bed.host("hv1"), bed.host("hv2"));
    let hosts: Vec<&LibvirtHost> = bed.cluster.hosts.iter().collect();
    ha::wait_all_alive(&hosts);
    assert!(wait_until(Duration::from_secs(10), || ha::vm_status(
        hv1, VM
    )
    .is_some_and(|v| v["running_here"] == true)));
    let qemu: i32 = std::fs::read_to_string(hv1.path("run-libvirt/qemu/vm1.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let libvirtd = pid_of(hv1, "libvirtd").expect("hv1's libvirtd");
    let cut_ms = now_ms();
    // SAFETY: signals to processes of a namespace this test created.
    unsafe { libc::kill(libvirtd, libc::SIGSTOP) };
    ha::set_link(hv1, false);
    let cut = Instant::now();
    let killed = wait_until(Duration::from_secs(30), || dead(qemu));
    let killed_after = cut.elapsed();
    unsafe { libc::kill(libvirtd, libc::SIGCONT) };
    assert!(
        killed,
        "the watchdog did not kill vm1's QEMU\n{}",
        bed.diagnostics()
    );
    eprintln!(
        "[ha] hung agent: isolated vm1's QEMU killed by the soft watchdog {:.2} s after the cut",
        killed_after.as_secs_f64()
    );
    let took = ha::wait_running_here(hv2, VM, Duration::from_secs(60))
        .map(|_| cut.elapsed())
        .unwrap_or_else(|| panic!("vm1 not running on hv2\n{}", bed.diagnostics()));
    eprintln!(
        "[ha] vm1 running on hv2 {:.2} s after the cut",
        took.as_secs_f64()
    );
    print_timeline(&[hv1, hv2], cut_ms);
    let kills = events_since(hv1, "watchdog_kill", cut_ms);
    assert_eq!(kills.len(), 1, "{kills:?}");
    let p = &kills[0]["properties"];
    assert_eq!(p["pid"], qemu, "{p}");
    assert_eq!(p["volumes"][0]["demoted"], true, "{p}");
    assert_eq!(volume_status(hv1)["role"], "Secondary");
}
