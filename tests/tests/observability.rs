//! Issue 20's acceptance: metrics seen by a real Prometheus, the shipped dashboard and
//! alerts checked against what tandemd exports, and `tandem events` during a failover.
//!
//! 1. A two-host cluster with a witness; Prometheus (Debian's package) runs in hv1's
//!    namespace and scrapes hv1's tandemd every second. hv2's replication link is cut while
//!    fio writes 96 MiB through hv1's NBD socket, then healed with the resync rate limited
//!    to 16 MiB/s while fio keeps writing. Through Prometheus's HTTP API: the out-of-sync
//!    figure for hv2 rises, falls through intermediate values and reaches 0, and the write
//!    latency histogram's counts (local disk and peer acknowledgement) grow, requests were
//!    pending and writes in flight to hv2 under load, and nothing is left in flight once
//!    idle. The scrape
//!    passes `promtool check metrics`; the alerts pass `promtool check rules`; every metric
//!    the dashboard and the alerts use is exported by tandemd (or, for `tandem_ha_*`, by
//!    tandem-ha).
//! 2. `tandem events --json` on hv2 while hv1's daemon is killed, hv2 promoted and written,
//!    and hv1 restarted: the peer's connection lost, the promotion, the peer's return, the
//!    SyncSource progress towards hv1 (hv1 is SyncTarget) and hv1 UpToDate, in that order. A
//!    second stream on hv1 reconnects after hv1's tandemd restarts.
//!
//! Needs root (namespaces), `prometheus` and `promtool`, fio, and the workspace's binaries.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tandem_tests::cluster::{skip_unless_root, Cluster, ClusterSpec};
use tandem_tests::prometheus::{http_get, metric_names, promtool, Prometheus};
use tandem_tests::volume_status::peer;
use tandem_tests::{bin, wait_until};

const METRICS: &str = "127.0.0.1:9942";

fn cluster() -> Cluster {
    Cluster::new(ClusterSpec {
        hosts: 2,
        witness: true,
        rust_log: "info".into(),
        ..ClusterSpec::default()
    })
}

fn create(cluster: &Cluster, volume: &str) {
    cluster
        .tandem(
            "hv1",
            &[
                "volume",
                "create",
                volume,
                "--size",
                "256M",
                "--replicas",
                "2",
                "--protocol",
                "C",
            ],
        )
        .ok();
    cluster
        .tandem("hv1", &["volume", "wait-sync", volume, "--timeout", "30"])
        .ok();
}

/// A replicated volume, Primary on hv1, resyncing at most at `resync_rate` per second.
fn primary_on_hv1(cluster: &Cluster, volume: &str, resync_rate: &str) {
    create(cluster, volume);
    cluster.tandem("hv1", &["volume", "promote", volume]).ok();
    cluster
        .tandem(
            "hv1",
            &["volume", "set", volume, "--resync-rate", resync_rate],
        )
        .ok();
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// fio's nbd engine writing to `volume` through `host`'s NBD socket.
fn fio(cluster: &Cluster, host: &str, volume: &str, args: &[&str]) -> Child {
    let uri = format!(
        "nbd+unix:///{volume}?socket={}",
        cluster.nbd_socket(host).display()
    );
    std::process::Command::new("fio")
        .args(["--name=w", "--ioengine=nbd", &format!("--uri={uri}")])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio")
}

fn finish(mut child: Child, what: &str) {
    let status = child.wait().expect("wait for fio");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(status.success(), "{what} failed: {err}");
}

/// `tandem_*` names used in a PromQL expression.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("tandem_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Every PromQL expression in the dashboard (panel targets and template queries), after
/// checking its structure: unique panel ids, a datasource and targets with `refId` and
/// `expr` on every panel that is not a row.
fn dashboard_expressions(dashboard: &Value) -> Vec<String> {
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let grid = &panel["gridPos"];
        assert!(
            grid["w"].as_u64().is_some_and(|w| (1..=24).contains(&w)) && grid["h"].is_u64(),
            "{panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert!(panel["datasource"].is_object(), "no datasource: {panel}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "no targets: {}", panel["title"]);
        for t in targets {
            assert!(t["refId"].is_string(), "{t}");
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(q) = var["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    exprs
}

fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn prometheus_sees_a_resync_fall_and_write_latency_grow_and_the_dashboard_matches() {
    if skip_unless_root() {
        return;
    }
    let mut cluster = cluster();
    const VOL: &str = "metrics-vol";
    primary_on_hv1(&cluster, VOL, "16M");
    let prometheus = Prometheus::start(cluster.host("hv1").netns(), &[METRICS]);
    let started = unix_now();

    // hv2 away: 96 MiB written on hv1 are out of sync for hv2.
    cluster.cut_replication("hv2");
    cluster.wait_status("hv1", VOL, Duration::from_secs(30), |s| {
        peer(s, "hv2")["connection"] != "Connected"
    });
    finish(
        fio(
            &cluster,
            "hv1",
            VOL,
            &["--rw=write", "--bs=1M", "--iodepth=4", "--size=96M"],
        ),
        "fio during the cut",
    );
    std::thread::sleep(Duration::from_secs(3));

    // hv2 back: a rate-limited resync while fio keeps writing small blocks.
    let load = fio(
        &cluster,
        "hv1",
        VOL,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--offset=128M",
            "--size=64M",
            "--time_based",
            "--runtime=12",
        ],
    );
    cluster.heal_replication("hv2");
    cluster
        .tandem("hv1", &["volume", "wait-sync", VOL, "--timeout", "90"])
        .ok();
    finish(load, "fio during the resync");
    std::thread::sleep(Duration::from_secs(3));
    let ended = unix_now();

    // The out-of-sync figure rose, fell through intermediate values, and reached 0.
    let series = prometheus.query_range(
        &format!(r#"tandem_peer_device_out_of_sync_bytes{{volume="{VOL}",peer="hv2"}}"#),
        started,
        ended,
    );
    assert_eq!(series.len(), 1, "{series:?}\n{}", prometheus.log());
    let values: Vec<f64> = series[0].1.iter().map(|s| s.1).collect();
    let (peak_at, peak) =
        values.iter().copied().enumerate().fold(
            (0, 0.0),
            |best, (i, v)| if v > best.1 { (i, v) } else { best },
        );
    assert!(
        peak >= (64 << 20) as f64,
        "out-of-sync never rose: {values:?}"
    );
    let falling: Vec<f64> = values[peak_at..]
        .iter()
        .copied()
        .filter(|v| *v > 0.0 && *v < peak)
        .collect();
    assert!(
        falling.len() >= 2 && falling.windows(2).all(|w| w[1] <= w[0]),
        "no falling figure during the resync: {values:?}"
    );
    assert_eq!(values.last().copied(), Some(0.0), "{values:?}");

    // Write latency counts grew, for the local disk and for hv2's acknowledgements.
    for part in ["local", "peer"] {
        let q = format!(
            r#"tandem_io_latency_seconds_count{{volume="{VOL}",op="write",part="{part}"}}"#
        );
        let series = prometheus.query_range(&q, started, ended);
        let counts: Vec<f64> = series
            .first()
            .map(|s| s.1.iter().map(|x| x.1).collect())
            .unwrap_or_default();
        let (first, last) = (counts.first().copied(), counts.last().copied());
        assert!(
            matches!((first, last), (Some(a), Some(b)) if b > a + 1000.0),
            "{q} did not grow: {counts:?}"
        );
    }
    // While fio wrote, requests were pending in the engine and writes were in flight to
    // hv2; once everything was acknowledged and idle, nothing was left in flight.
    let max_and_last = |q: &str| {
        let series = prometheus.query_range(q, started, ended);
        let values: Vec<f64> = series
            .first()
            .map(|s| s.1.iter().map(|x| x.1).collect())
            .unwrap_or_default();
        let max = values.iter().copied().fold(0.0, f64::max);
        (max, values.last().copied(), values)
    };
    for q in [
        format!(r#"tandem_device_upper_pending{{volume="{VOL}"}}"#),
        format!(r#"tandem_connection_app_in_flight_bytes{{volume="{VOL}",peer="hv2"}}"#),
    ] {
        let (max, last, values) = max_and_last(&q);
        assert!(max > 0.0, "{q} never above 0: {values:?}");
        assert_eq!(last, Some(0.0), "{q} after the load: {values:?}");
    }
    for q in [
        format!(r#"tandem_connection_resync_in_flight_bytes{{volume="{VOL}",peer="hv2"}}"#),
        format!(r#"tandem_device_lower_pending{{volume="{VOL}"}}"#),
        format!(r#"tandem_connection_congested{{volume="{VOL}",peer="hv2"}}"#),
    ] {
        let (_, last, values) = max_and_last(&q);
        assert_eq!(last, Some(0.0), "{q} after the load: {values:?}");
    }
    eprintln!(
        "out-of-sync peak {:.0} MiB, {} falling samples; {}s of samples",
        peak / (1 << 20) as f64,
        falling.len(),
        values.len()
    );

    // promtool accepts the exposition and the alert rules.
    let netns = cluster.host("hv1").netns().name().to_string();
    let scrape = http_get(&netns, METRICS, "/metrics").expect("scrape hv1");
    let (ok, out) = promtool(&["check", "metrics"], &scrape);
    assert!(ok, "promtool check metrics: {out}\n{scrape}");
    let ha = ha_agent::metrics::HaMetrics::default();
    ha.failover(7_000);
    let ha_text = ha.render(&ha_agent::status::AgentStatus {
        node: "hv1".into(),
        ts_ms: 0,
        peers: Vec::new(),
        vms: Vec::new(),
    });
    let (ok, out) = promtool(&["check", "metrics"], &ha_text);
    assert!(ok, "promtool check metrics (tandem-ha): {out}\n{ha_text}");
    let alerts_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", &alerts_path.display().to_string()], "");
    assert!(ok, "promtool check rules: {out}");

    // Every metric of the dashboard and the alerts exists.
    let mut exported = metric_names(&scrape);
    exported.extend(metric_names(&ha_agent::metrics::render_empty("hv1")));
    let dashboard: Value = serde_json::from_str(&repo_file("packaging/grafana/tandem.json"))
        .expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    for expr in dashboard_expressions(&dashboard) {
        used.extend(names_in(&expr));
    }
    used.extend(names_in(&repo_file("packaging/prometheus/alerts.yml")));
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard or alerts use metrics nobody exports: {missing:?}\nexported: {exported:?}"
    );
    assert!(used.len() >= 20, "{used:?}");
    for name in [
        "tandem_connection_congested",
        "tandem_connection_app_in_flight_bytes",
        "tandem_connection_resync_in_flight_bytes",
        "tandem_device_lower_pending",
        "tandem_device_upper_pending",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
    drop(prometheus);
    cluster.stop("hv1");
}

/// A `tandem events --json` stream on `host`, read into a channel by a thread.
struct Events {
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Events {
    fn start(cluster: &Cluster, host: &str) -> Events {
        let h = cluster.host(host);
        let mut child = h
            .netns()
            .command(bin("tandem"))
            .arg("--config")
            .arg(h.config())
            .args(["events", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run tandem events");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    panic!("tandem events printed a line that is not JSON: {line}");
                };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Events {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Read events until one matches `want` (panics after `timeout`); returns the index
    /// of the first match.
    fn wait_for(&mut self, what: &str, timeout: Duration, want: impl Fn(&Value) -> bool) -> usize {
        self.wait_for_nth(what, 1, timeout, want)
    }

    /// Read events until `n` of them match `want`; returns the index of the `n`th.
    fn wait_for_nth(
        &mut self,
        what: &str,
        n: usize,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let matches: Vec<usize> = (0..self.seen.len())
                .filter(|&i| want(&self.seen[i]))
                .collect();
            if let Some(&i) = matches.get(n - 1) {
                return i;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => panic!(
                    "no event for {what} within {timeout:?}; seen:\n{}",
                    self.dump()
                ),
            }
        }
    }

    fn dump(&self) -> String {
        self.seen
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is(e: &Value, kind: &str, object: &str, volume: &str, peer: Option<&str>) -> bool {
    e["kind"] == kind
        && e["object"] == object
        && e["volume"] == volume
        && peer.is_none_or(|p| e["peer"] == p)
}

fn prop<'a>(e: &'a Value, key: &str) -> Option<&'a str> {
    e["properties"][key].as_str()
}

#[test]
fn tandem_events_show_a_failover_in_order() {
    if skip_unless_root() {
        return;
    }
    let mut cluster = cluster();
    const VOL: &str = "events-vol";
    // Slow enough that the resync lasts a few seconds and reports progress.
    primary_on_hv1(&cluster, VOL, "8M");

    // hv2 and the witness keep quorum once hv1 dies: wait until they see each other.
    cluster.wait_status("hv2", VOL, Duration::from_secs(30), |s| {
        s["quorum"] == true && peer(s, "witness")["connection"] == "Connected"
    });
    let mut on_hv2 = Events::start(&cluster, "hv2");
    let mut on_hv1 = Events::start(&cluster, "hv1");
    on_hv2.wait_for("hv2's initial state", Duration::from_secs(10), |e| {
        is(e, "exists", "peer", VOL, Some("hv1")) && prop(e, "role") == Some("Primary")
    });
    on_hv2.wait_for(
        "the end of the exists lines",
        Duration::from_secs(10),
        |e| e["kind"] == "exists" && e["object"] == "-",
    );
    on_hv1.wait_for("hv1's end marker", Duration::from_secs(10), |e| {
        e["object"] == "-"
    });

    // The demo's failover: hv1's daemon dies, hv2 is promoted and written.
    cluster.kill("hv1");
    let lost = on_hv2.wait_for("hv1's connection lost", Duration::from_secs(30), |e| {
        is(e, "change", "peer", VOL, Some("hv1"))
            && prop(e, "connection").is_some_and(|c| c != "Connected")
    });
    let promote_ok = wait_until(Duration::from_secs(20), || {
        cluster
            .tandem("hv2", &["volume", "promote", VOL])
            .status
            .success()
    });
    assert!(promote_ok, "hv2 could not be promoted\n{}", cluster.logs());
    let promoted = on_hv2.wait_for("the promotion", Duration::from_secs(10), |e| {
        is(e, "change", "volume", VOL, None) && prop(e, "role") == Some("Primary")
    });
    assert_eq!(
        prop(&on_hv2.seen[promoted], "promotion"),
        Some("explicit"),
        "{}",
        on_hv2.seen[promoted]
    );
    finish(
        fio(
            &cluster,
            "hv2",
            VOL,
            &["--rw=write", "--bs=1M", "--iodepth=4", "--size=48M"],
        ),
        "fio on hv2",
    );

    // hv1 returns and becomes SyncTarget of hv2.
    cluster.start("hv1");
    let back = on_hv2.wait_for("hv1's return", Duration::from_secs(60), |e| {
        is(e, "change", "peer", VOL, Some("hv1")) && prop(e, "connection") == Some("Connected")
    });
    let progress = on_hv2.wait_for("SyncSource progress", Duration::from_secs(60), |e| {
        is(e, "change", "peer", VOL, Some("hv1"))
            && prop(e, "replication") == Some("SyncSource")
            && prop(e, "done").is_some()
    });
    let up_to_date = on_hv2.wait_for("hv1 UpToDate", Duration::from_secs(90), |e| {
        is(e, "change", "peer", VOL, Some("hv1")) && prop(e, "peer-disk") == Some("UpToDate")
    });
    assert!(
        lost < promoted && promoted < back && back < progress && progress < up_to_date,
        "events out of order (lost {lost}, promoted {promoted}, back {back}, progress {progress}, \
         up-to-date {up_to_date}):\n{}",
        on_hv2.dump()
    );
    // The stream on hv1 outlived hv1's daemon: it reconnected and listed the state again.
    on_hv1.wait_for_nth(
        "a second end marker on hv1",
        2,
        Duration::from_secs(30),
        |e| e["kind"] == "exists" && e["object"] == "-",
    );
    eprintln!("events on hv2:\n{}", on_hv2.dump());
}
