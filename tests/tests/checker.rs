//! Issue 5 acceptance for the checker itself: `tandem-check` passes an honest backend
//! (qemu-nbd on a file, and the in-memory fake) and fails a lying one — a backend that
//! acknowledges but drops writes, and one that applies an acknowledged write late, over a
//! newer one. Also: the writer reconnects to whichever socket accepts a writable open, and
//! `compare` tells identical replicas from different ones. Runs the real binary.

use std::path::Path;
use std::process::{Command, Output};

use tandem_tests::fake_nbd::{Behaviour, FakeNbdServer};
use tandem_tests::vm::QemuNbd;

const CHECK: &str = env!("CARGO_BIN_EXE_tandem-check");
const MIB: u64 = 1 << 20;

fn check(args: &[&str]) -> Output {
    let out = Command::new(CHECK).args(args).output().unwrap();
    eprintln!(
        "tandem-check {}\n  -> {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Run a write workload of `writes` writes over 64 blocks, then verify; returns the report.
fn write_then_verify(
    socket: &Path,
    export: &str,
    log: &Path,
    writes: u32,
) -> (Output, serde_json::Value) {
    let out = check(&[
        "write",
        "--socket",
        s(socket),
        "--export",
        export,
        "--blocks",
        "64",
        "--log",
        s(log),
        "--writes",
        &writes.to_string(),
        "--seed",
        "42",
        "--flush-every",
        "16",
        "--fua-every",
        "10",
        "--json",
    ]);
    assert!(out.status.success());
    let summary = json(&out);
    assert_eq!(summary["writes_acknowledged"], u64::from(writes));
    let out = check(&[
        "verify",
        "--log",
        s(log),
        "--socket",
        s(socket),
        "--export",
        export,
        "--json",
    ]);
    let report = json(&out);
    (out, report)
}

#[test]
fn honest_qemu_nbd_passes_and_image_verifies_too() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    let socket = dir.path().join("nbd.sock");
    let server = QemuNbd::serve(&image, &socket, "vol").unwrap();
    let log = dir.path().join("run.log");

    let (out, report) = write_then_verify(&socket, "vol", &log, 2000);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(report["passed"], true);
    assert_eq!(report["blocks_checked"], 64);
    assert_eq!(report["writes_acknowledged"], 2000);
    assert_eq!(report["lost"], 0);
    server.stop();

    // The same log verified against the file directly.
    let out = check(&["verify", "--log", s(&log), "--image", s(&image)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("PASS: 64 blocks checked, 2000 writes acknowledged"));

    // Corrupting one byte of a written block is garbage.
    let mut bytes = std::fs::read(&image).unwrap();
    let written = (0..64).find(|b| bytes[b * 4096] != 0).unwrap();
    bytes[written * 4096 + 100] ^= 0xff;
    std::fs::write(&image, &bytes).unwrap();
    let out = check(&["verify", "--log", s(&log), "--image", s(&image), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["garbage"], 1);
}

#[test]
fn backend_dropping_acknowledged_writes_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let _server = FakeNbdServer::start(&socket, "vol", MIB, Behaviour::DropEveryNth(7)).unwrap();
    let (out, report) = write_then_verify(&socket, "vol", &dir.path().join("run.log"), 2000);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a lying backend must fail the check"
    );
    assert_eq!(report["passed"], false);
    let violations = report["lost"].as_u64().unwrap() + report["stale"].as_u64().unwrap();
    assert!(violations > 0, "{report}");
    assert_eq!(report["garbage"], 0);
}

#[test]
fn backend_reordering_acknowledged_writes_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let _server = FakeNbdServer::start(&socket, "vol", MIB, Behaviour::ReorderEveryNth(5)).unwrap();
    let (out, report) = write_then_verify(&socket, "vol", &dir.path().join("run.log"), 2000);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a reordering backend must fail the check"
    );
    assert!(report["stale"].as_u64().unwrap() > 0, "{report}");
    let text = report["violations"][0].as_str().unwrap();
    assert!(text.starts_with("STALE block"), "{text}");
}

#[test]
fn honest_fake_passes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let _server = FakeNbdServer::start(&socket, "vol", MIB, Behaviour::Honest).unwrap();
    let (out, report) = write_then_verify(&socket, "vol", &dir.path().join("run.log"), 2000);
    assert_eq!(out.status.code(), Some(0), "{report}");
}

#[test]
fn writer_reconnects_to_the_socket_that_accepts_writes() {
    let dir = tempfile::tempdir().unwrap();
    let primary_socket = dir.path().join("a.sock");
    let secondary_socket = dir.path().join("b.sock");
    // a serves, b refuses like a Secondary; then they swap and a drops its clients. (The
    // two fakes share no data, so this test checks the reconnect, not the data.)
    let a = FakeNbdServer::start(&primary_socket, "vol", MIB, Behaviour::Honest).unwrap();
    let b = FakeNbdServer::start(
        &secondary_socket,
        "vol",
        MIB,
        Behaviour::Refuse("vol is Secondary here".into()),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let writer = Command::new(CHECK)
        .args([
            "write",
            "--socket",
            s(&primary_socket),
            "--reconnect-to",
            s(&secondary_socket),
            "--export",
            "vol",
            "--blocks",
            "32",
            "--log",
            s(&log),
            "--duration",
            "30",
            "--reconnect-timeout",
            "10",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let acked = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with('K'))
            .count()
    };
    assert!(tandem_tests::wait_until(
        std::time::Duration::from_secs(10),
        || acked(&log) > 200
    ));
    // "Failover": a refuses from now on and drops its clients; b becomes writable.
    a.set_behaviour(Behaviour::Refuse("vol is Secondary here".into()));
    b.set_behaviour(Behaviour::Honest);
    a.disconnect_all();
    let before = acked(&log);
    assert!(tandem_tests::wait_until(
        std::time::Duration::from_secs(10),
        || acked(&log) > before + 200
    ));
    // SIGTERM ends the run cleanly with a summary.
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(writer.id() as i32, libc::SIGTERM) };
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let summary = json(&out);
    assert!(summary["reconnects"].as_u64().unwrap() >= 1, "{summary}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("C {}", secondary_socket.display())),
        "{text}"
    );
}

#[test]
fn compare_reports_identical_and_differing_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let content: Vec<u8> = (0..MIB as u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&a, &content).unwrap();
    std::fs::write(&b, &content).unwrap();
    let out = check(&["compare", s(&a), s(&b), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let report = json(&out);
    assert_eq!(report["identical"], true);
    assert_eq!(
        report["replicas"][0]["crc32c"],
        report["replicas"][1]["crc32c"]
    );

    let mut other = content.clone();
    other[5 * 4096 + 1] ^= 1;
    std::fs::write(&b, &other).unwrap();
    let out = check(&["compare", s(&a), s(&b), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    assert_eq!(report["first_difference"], 5 * 4096);
    assert_eq!(report["differing_blocks"], 1);

    // Over NBD too.
    let socket = dir.path().join("nbd.sock");
    let _server = QemuNbd::serve(&a, &socket, "a").unwrap();
    let out = check(&["compare", s(&a), "--nbd", &format!("{}:a", s(&socket))]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn writer_leaves_a_server_that_fails_writes_and_verifies_on_the_new_primary() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.sock");
    let new = dir.path().join("new.sock");
    let _old = FakeNbdServer::start(&old, "vol", MIB, Behaviour::FailWrites(108)).unwrap();
    let _new = FakeNbdServer::start(&new, "vol", MIB, Behaviour::Honest).unwrap();
    let log = dir.path().join("run.log");
    let out = check(&[
        "write",
        "--socket",
        s(&old),
        "--reconnect-to",
        s(&new),
        "--export",
        "vol",
        "--blocks",
        "64",
        "--log",
        s(&log),
        "--writes",
        "500",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let summary = json(&out);
    assert_eq!(summary["writes_failed"], 1, "{summary}");
    assert_eq!(summary["writes_acknowledged"], 499, "{summary}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(" ESHUTDOWN"), "{text}");
    let out = check(&["verify", "--log", s(&log), "--socket", s(&new), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)["writes_acknowledged"], 499);
}

#[test]
fn writer_gives_up_on_a_frozen_server_after_the_io_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let frozen = dir.path().join("frozen.sock");
    let live = dir.path().join("live.sock");
    let _frozen = FakeNbdServer::start(&frozen, "vol", MIB, Behaviour::HangWrites).unwrap();
    let _live = FakeNbdServer::start(&live, "vol", MIB, Behaviour::Honest).unwrap();
    let log = dir.path().join("run.log");
    let started = std::time::Instant::now();
    let out = check(&[
        "write",
        "--socket",
        s(&frozen),
        "--reconnect-to",
        s(&live),
        "--export",
        "vol",
        "--blocks",
        "64",
        "--log",
        s(&log),
        "--writes",
        "300",
        "--io-timeout",
        "1",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let summary = json(&out);
    assert_eq!(summary["writes_unknown_outcome"], 1, "{summary}");
    assert_eq!(summary["writes_acknowledged"], 299, "{summary}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let out = check(&["verify", "--log", s(&log), "--socket", s(&live)]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn writer_without_any_primary_aborts_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("secondary.sock");
    let _server = FakeNbdServer::start(
        &socket,
        "vol",
        MIB,
        Behaviour::Refuse("vol is Secondary on this host".into()),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let out = check(&[
        "write",
        "--socket",
        s(&socket),
        "--export",
        "vol",
        "--blocks",
        "8",
        "--log",
        s(&log),
        "--writes",
        "10",
        "--reconnect-timeout",
        "0.5",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vol is Secondary on this host") && stderr.contains("NBD_REP_ERR_POLICY"),
        "{stderr}"
    );
}
