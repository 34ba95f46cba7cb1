//! The built `tandem-libvirt-hook` binary called the way libvirt calls it (positional
//! arguments, domain XML on stdin, program name `qemu.d/tandem`), against a dummy tandemd
//! on a real unix socket that implements the replication engine's control-API contract
//! (`volume_status`, `volume_promote`, `volume_demote`, `volume_allow_two_primaries`) or,
//! in "old" mode, answers them like a tandemd without the engine.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

#[derive(Default)]
struct State {
    volumes: BTreeMap<String, Value>,
    /// Volume -> message with which `volume_promote` is refused.
    refuse_promote: BTreeMap<String, String>,
    /// Answer like a tandemd without the replication engine.
    old: bool,
    /// `volume_promote` sets `promoted_explicitly` (an engine that cannot tell who asks).
    promote_marks_explicit: bool,
    /// Volumes whose `volume_status` fails (kind `internal`).
    fail_status: Vec<String>,
    calls: Vec<String>,
}

struct DummyTandemd {
    dir: tempfile::TempDir,
    state: Arc<Mutex<State>>,
}

/// A `volume_status` object as tandemd sends it.
fn status(name: &str, protocol: &str) -> Value {
    json!({
        "volume": name, "node": "hv1", "role": "Secondary", "disk_state": "UpToDate",
        "protocol": protocol, "quorum": true, "quorum_reason": "", "io_suspended": false,
        "allow_two_primaries": false, "size_bytes": 4096, "current_uuid": "1",
        "peers": [peer("hv2", "Secondary")], "last_verify": null,
        "promoted_explicitly": false, "open_writers": 0
    })
}

/// A connected UpToDate peer with `role`.
fn peer(node: &str, role: &str) -> Value {
    json!({
        "node": node, "diskless": false, "connection": "Connected", "role": role,
        "disk_state": "UpToDate", "replication": "Established", "out_of_sync_bytes": 0,
        "resync": null, "split_brain": null, "decision": null, "last_error": null
    })
}

fn error(kind: &str, message: &str) -> Value {
    json!({"status": "error", "error": {"kind": kind, "message": message}})
}

fn handle(state: &Mutex<State>, request: &Value) -> Value {
    let mut s = state.lock().unwrap();
    let kind = request["request"].as_str().unwrap_or("").to_string();
    let name = request["name"].as_str().unwrap_or("").to_string();
    s.calls.push(match request.get("allow") {
        Some(allow) => format!("{kind} {name} {allow}"),
        None => format!("{kind} {name}"),
    });
    if s.old && kind != "volume_show" {
        return error(
            "bad_request",
            &format!("request not understood: unknown variant `{kind}`, expected one of `node_info`, `volume_show` at line 1 column 20"),
        );
    }
    if kind == "volume_status" && s.fail_status.contains(&name) {
        return error("internal", &format!("{name}: metadata read failed"));
    }
    if !s.volumes.contains_key(&name) {
        return error("not_found", &format!("volume '{name}' does not exist"));
    }
    if let Some(message) = s.refuse_promote.get(&name).cloned() {
        if kind == "volume_promote" {
            return error("invalid_argument", &message);
        }
    }
    let marks_explicit = s.promote_marks_explicit;
    let volume = s.volumes.get_mut(&name).unwrap();
    match kind.as_str() {
        "volume_show" => {
            return json!({"status": "ok", "result": {"type": "volume", "volume": {
                "name": name, "pool": "files", "size_bytes": 4096,
                "path": format!("/images/{name}.img"), "state": "ok", "created_unix": 0
            }}})
        }
        "volume_status" => {}
        "volume_promote" => {
            volume["role"] = json!("Primary");
            if marks_explicit {
                volume["promoted_explicitly"] = json!(true);
            }
        }
        "volume_demote" => volume["role"] = json!("Secondary"),
        "volume_allow_two_primaries" => {
            if volume["protocol"] != "C" {
                return error("invalid_argument", "dual-primary needs protocol C");
            }
            volume["allow_two_primaries"] = request["allow"].clone();
        }
        _ => return error("bad_request", "unknown"),
    }
    json!({"status": "ok", "result": {"type": "status", "status": volume.clone()}})
}

impl DummyTandemd {
    fn start() -> DummyTandemd {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::write(
            root.join("tandem.toml"),
            format!(
                r#"node = "hv1"
state_dir = "{root}/state"
run_dir = "{root}/run"
secret_file = "{root}/secret"
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
            ),
        )
        .unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let listener = UnixListener::bind(root.join("run/tandemd.sock")).unwrap();
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let state = shared.clone();
                std::thread::spawn(move || {
                    let mut writer = conn.try_clone().unwrap();
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        let request: Value = serde_json::from_str(&line).unwrap();
                        let answer = handle(&state, &request);
                        if writeln!(writer, "{answer}").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        DummyTandemd { dir, state }
    }

    fn add(&self, name: &str, protocol: &str) {
        self.state
            .lock()
            .unwrap()
            .volumes
            .insert(name.into(), status(name, protocol));
    }

    fn volume(&self, name: &str) -> Value {
        self.state.lock().unwrap().volumes[name].clone()
    }

    fn set(&self, name: &str, key: &str, value: Value) {
        self.state.lock().unwrap().volumes.get_mut(name).unwrap()[key] = value;
    }

    /// Calls that change something (status queries left out).
    fn changes(&self) -> Vec<String> {
        let mut s = self.state.lock().unwrap();
        let calls = std::mem::take(&mut s.calls);
        calls
            .into_iter()
            .filter(|c| !c.starts_with("volume_status") && !c.starts_with("volume_show"))
            .collect()
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("tandem.toml")
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
}

/// The hook binary under the name libvirt runs it by (`.../qemu.d/tandem`).
fn hook_path() -> PathBuf {
    static INSTALLED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // Inside target/ (Cargo's scratch dir for integration tests), not /tmp.
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hook-calls-hooks");
            let out = Command::new(env!("CARGO_BIN_EXE_tandem-libvirt-hook"))
                .args(["install", "--no-reload", "--hooks-dir"])
                .arg(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            dir.join("qemu.d/tandem")
        })
        .clone()
}

struct HookRun {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Run the hook as libvirt does; `TANDEM_CONFIG` stands in for /etc/tandem/tandem.toml.
fn call(config: &Path, args: [&str; 4], xml: &str) -> HookRun {
    let mut child = Command::new(hook_path())
        .args(args)
        .env("TANDEM_CONFIG", config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    HookRun {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn domain_xml(run_dir: &Path, volumes: &[&str]) -> String {
    domain_xml_on(run_dir, volumes, false)
}

/// A domain with a CD-ROM and one disk per volume: NBD disks, or vhostuser disks on the
/// volumes' sockets (and a shared-memory backing) when `vhost_user`.
fn domain_xml_on(run_dir: &Path, volumes: &[&str], vhost_user: bool) -> String {
    let mut disks = String::new();
    for (i, v) in volumes.iter().enumerate() {
        let target = (b'a' + i as u8) as char;
        let run_dir = run_dir.display();
        disks.push_str(&if vhost_user {
            format!(
                "<disk type='vhostuser' device='disk'><driver name='qemu' type='raw' queues='4'/>\
                 <source type='unix' path='{run_dir}/vhost/{v}.sock'><reconnect enabled='yes' timeout='5'/></source>\
                 <target dev='vd{target}' bus='virtio'/></disk>\n"
            )
        } else {
            format!(
                "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>\
                 <source protocol='nbd' name='{v}'><host transport='unix' socket='{run_dir}/nbd.sock'/></source>\
                 <target dev='vd{target}' bus='virtio'/></disk>\n"
            )
        });
    }
    let memory = if vhost_user {
        "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n"
    } else {
        ""
    };
    format!(
        "<domain type='kvm'>\n  <name>vm100</name>\n  <uuid>11111111-2222-3333-4444-555555555555</uuid>\n  {memory}<devices>\n\
         <disk type='file' device='cdrom'><source file='/iso/debian.iso'/><target dev='sda' bus='sata'/><readonly/></disk>\n\
         {disks}  </devices>\n</domain>\n"
    )
}

/// `prepare begin` promotes both volumes of `xml`, `release end` demotes them.
fn start_promotes_and_release_demotes(d: &DummyTandemd, xml: &str) {
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], xml);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        d.changes(),
        [
            "volume_promote vm-100-disk-0",
            "volume_promote vm-100-disk-1"
        ]
    );
    let run = call(&d.config(), ["vm100", "release", "end", "destroyed"], xml);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        d.changes(),
        ["volume_demote vm-100-disk-0", "volume_demote vm-100-disk-1"]
    );
}

#[test]
fn start_promotes_and_stop_demotes() {
    let d = DummyTandemd::start();
    d.add("vm-100-disk-0", "C");
    d.add("vm-100-disk-1", "C");
    let xml = domain_xml(&d.run_dir(), &["vm-100-disk-0", "vm-100-disk-1"]);
    start_promotes_and_release_demotes(&d, &xml);
    // An operator promoted disk-1 explicitly before the start: it stays Primary.
    d.set("vm-100-disk-1", "role", json!("Primary"));
    d.set("vm-100-disk-1", "promoted_explicitly", json!(true));
    assert!(call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml).ok);
    assert_eq!(d.changes(), ["volume_promote vm-100-disk-0"]);
    for op in [
        ["vm100", "start", "begin", "-"],
        ["vm100", "started", "begin", "-"],
        ["vm100", "stopped", "end", "-"],
    ] {
        assert!(call(&d.config(), op, &xml).ok);
    }
    assert!(
        d.changes().is_empty(),
        "start/started/stopped change nothing"
    );
    let run = call(&d.config(), ["vm100", "release", "end", "-"], &xml);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(d.changes(), ["volume_demote vm-100-disk-0"]);
    assert_eq!(d.volume("vm-100-disk-1")["role"], "Primary");
    let log = std::fs::read_to_string(d.run_dir().join("libvirt-hook/hook.log")).unwrap();
    assert!(log.contains("promoted explicitly"), "{log}");
}

#[test]
fn vhost_user_disks_are_promoted_refused_and_demoted_like_nbd_disks() {
    let d = DummyTandemd::start();
    d.add("vm-100-disk-0", "C");
    d.add("vm-100-disk-1", "C");
    let mut xml = domain_xml_on(&d.run_dir(), &["vm-100-disk-0", "vm-100-disk-1"], true);
    // Another daemon's vhost-user disk is not Tandem's.
    xml = xml.replace(
        "  </devices>",
        "<disk type='vhostuser' device='disk'><source type='unix' path='/run/elsewhere/vm-100-disk-9.sock'/>\
         <target dev='vdc' bus='virtio'/></disk>\n  </devices>",
    );
    start_promotes_and_release_demotes(&d, &xml);
    // Primary on the other host: the start is refused with the reason, nothing changes.
    let peers = json!([peer("hv2", "Primary")]);
    d.set("vm-100-disk-1", "peers", peers);
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml);
    assert!(!run.ok);
    assert_eq!(
        run.stderr,
        "tandem: vm-100-disk-1 is Primary on hv2 (stop or migrate the VM there first)\n"
    );
    assert!(d.changes().is_empty());
}

#[test]
fn a_refused_promotion_undoes_the_others_and_explains_in_one_line() {
    let d = DummyTandemd::start();
    d.add("vm-100-disk-0", "C");
    d.add("vm-100-disk-1", "C");
    d.state.lock().unwrap().refuse_promote.insert(
        "vm-100-disk-1".into(),
        "vm-100-disk-1: local replica is Outdated; newest data is on hv2".into(),
    );
    let xml = domain_xml(&d.run_dir(), &["vm-100-disk-0", "vm-100-disk-1"]);
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml);
    assert!(!run.ok);
    assert_eq!(
        run.stderr,
        "tandem: vm-100-disk-1: local replica is Outdated; newest data is on hv2 (undone: demote vm-100-disk-0)\n"
    );
    assert_eq!(
        d.changes(),
        [
            "volume_promote vm-100-disk-0",
            "volume_promote vm-100-disk-1",
            "volume_demote vm-100-disk-0"
        ]
    );
    // Refused by the hook's own checks: nothing is touched at all.
    d.set("vm-100-disk-1", "disk_state", json!("Outdated"));
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml);
    assert!(!run.ok);
    assert_eq!(
        run.stderr,
        "tandem: vm-100-disk-1: local replica on hv1 is Outdated; newest data is on hv2\n"
    );
    assert!(d.changes().is_empty());
}

#[test]
fn incoming_migration_arms_dual_primary_and_release_disarms() {
    let d = DummyTandemd::start();
    d.add("vm-100-disk-0", "C");
    d.set("vm-100-disk-0", "peers", json!([peer("hv2", "Primary")]));
    let xml = domain_xml(&d.run_dir(), &["vm-100-disk-0"]);
    // migrate is an XML filter: the XML comes back unchanged.
    let run = call(&d.config(), ["vm100", "migrate", "begin", "-"], &xml);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.stdout, xml);
    assert!(d.changes().is_empty(), "migrate only checks");
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        d.changes(),
        [
            "volume_allow_two_primaries vm-100-disk-0 true",
            "volume_promote vm-100-disk-0"
        ]
    );
    // The source side's (or a failed destination's) release: demote, then disarm.
    let run = call(&d.config(), ["vm100", "release", "end", "migrated"], &xml);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        d.changes(),
        [
            "volume_demote vm-100-disk-0",
            "volume_allow_two_primaries vm-100-disk-0 false"
        ]
    );
    // Without a fresh `migrate`, the next prepare is a normal start: the peer is Primary.
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml);
    assert!(!run.ok);
    assert_eq!(
        run.stderr,
        "tandem: vm-100-disk-0 is Primary on hv2 (stop or migrate the VM there first)\n"
    );
    assert!(d.changes().is_empty());
}

#[test]
fn migration_of_a_protocol_a_volume_is_refused_before_anything_changes() {
    let d = DummyTandemd::start();
    d.add("vm-100-disk-0", "A");
    let xml = domain_xml(&d.run_dir(), &["vm-100-disk-0"]);
    let run = call(&d.config(), ["vm100", "migrate", "begin", "-"], &xml);
    assert!(!run.ok);
    assert_eq!(
        run.stderr,
        "tandem: vm-100-disk-0 runs protocol A; live migration needs protocol C\n"
    );
    assert!(d.changes().is_empty());
    assert!(!d.run_dir().join("libvirt-hook/incoming/vm100").exists());
}

#[test]
fn an_older_tandemd_without_roles_serves_single_host_volumes() {
    let d = DummyTandemd::start();
    d.add("vm-100-disk-0", "C");
    d.state.lock().unwrap().old = true;
    let xml = domain_xml(&d.run_dir(), &["vm-100-disk-0"]);
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml);
    assert!(run.ok, "{}", run.stderr);
    assert!(d.changes().is_empty());
    let run = call(&d.config(), ["vm100", "release", "end", "-"], &xml);
    assert!(run.ok, "{}", run.stderr);
    let run = call(&d.config(), ["vm100", "migrate", "begin", "-"], &xml);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("no replication engine"),
        "{}",
        run.stderr
    );
    let missing = domain_xml(&d.run_dir(), &["vm-9-disk-0"]);
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], &missing);
    assert_eq!(
        run.stderr,
        "tandem: vm-9-disk-0: no such Tandem volume on hv1\n"
    );
}

/// Bad arguments to the subcommands exit 1, like every other failure (clap alone exits 2).
#[test]
fn bad_arguments_exit_1_and_help_exits_0() {
    let hook = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tandem-libvirt-hook"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = hook(&["disk-xml", "--bogus"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unexpected argument '--bogus'"), "{stderr}");
    assert_eq!(hook(&["--help"]).status.code(), Some(0));
}

#[test]
fn domains_without_tandem_disks_never_reach_tandemd_and_bad_input_fails_cleanly() {
    // No daemon and no config at all: a domain without NBD disks passes every operation.
    let nowhere = Path::new("/nonexistent/tandem.toml");
    let plain = "<domain type='kvm'><name>plain</name><devices>\
                 <disk type='file' device='disk'><source file='/x.qcow2'/><target dev='vda'/></disk>\
                 </devices></domain>";
    for op in [
        "prepare",
        "start",
        "started",
        "stopped",
        "release",
        "migrate",
        "restore",
        "reconnect",
        "attach",
    ] {
        let subop = if matches!(op, "stopped" | "release") {
            "end"
        } else {
            "begin"
        };
        let run = call(nowhere, ["plain", op, subop, "-"], plain);
        assert!(run.ok, "{op}: {}", run.stderr);
        if op == "migrate" || op == "restore" {
            assert_eq!(run.stdout, plain, "{op} echoes the XML");
        } else {
            assert!(run.stdout.is_empty());
        }
    }
    // Malformed XML: one line, exit 1, no panic.
    let run = call(
        nowhere,
        ["x", "prepare", "begin", "-"],
        "<domain><name>x</nam></domain>",
    );
    assert!(!run.ok);
    assert!(
        run.stderr
            .starts_with("tandem: domain XML is not well-formed at byte"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1);
    assert!(!run.stderr.contains("panicked"));
    // Tandem disks but tandemd is down: the start is refused with the reason.
    let d = DummyTandemd::start();
    let xml = domain_xml(&d.run_dir(), &["vm-100-disk-0"]);
    std::fs::remove_file(d.run_dir().join("tandemd.sock")).unwrap();
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("cannot reach tandemd at"),
        "{}",
        run.stderr
    );
    // ...while reconnect (libvirtd restarted, guest running) never fails.
    assert!(call(&d.config(), ["vm100", "reconnect", "begin", "-"], &xml).ok);
}

#[test]
fn release_demotes_what_the_hook_promoted_even_if_tandemd_calls_it_explicit() {
    let d = DummyTandemd::start();
    d.add("vm-100-disk-0", "C");
    d.state.lock().unwrap().promote_marks_explicit = true;
    let xml = domain_xml(&d.run_dir(), &["vm-100-disk-0"]);
    assert!(call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml).ok);
    assert_eq!(d.volume("vm-100-disk-0")["promoted_explicitly"], true);
    let run = call(&d.config(), ["vm100", "release", "end", "-"], &xml);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        d.changes(),
        [
            "volume_promote vm-100-disk-0",
            "volume_demote vm-100-disk-0"
        ]
    );
    assert!(!d.run_dir().join("libvirt-hook/promoted/vm100").exists());
}

#[test]
fn release_demotes_the_others_when_one_status_cannot_be_read() {
    let d = DummyTandemd::start();
    d.add("vm-100-disk-0", "C");
    d.add("vm-100-disk-1", "C");
    let xml = domain_xml(&d.run_dir(), &["vm-100-disk-0", "vm-100-disk-1"]);
    assert!(call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml).ok);
    d.changes();
    d.state.lock().unwrap().fail_status = vec!["vm-100-disk-0".into()];
    let run = call(&d.config(), ["vm100", "release", "end", "-"], &xml);
    assert!(!run.ok);
    assert_eq!(run.stderr, "tandem: vm-100-disk-0: metadata read failed\n");
    assert_eq!(d.changes(), ["volume_demote vm-100-disk-1"]);
    // The prepare of a start, by contrast, stops at the first unreadable volume.
    let run = call(&d.config(), ["vm100", "prepare", "begin", "-"], &xml);
    assert!(!run.ok);
    assert!(d.changes().is_empty());
}
