//! The NBD server against real clients: qemu-img, qemu-io, nbdinfo and fio, plus a raw
//! socket client that sends malformed input. Each test runs the server in-process on a temp
//! unix socket over sparse temp files.
//!
//! Needs `qemu-utils`, `libnbd-bin` and `fio`. A missing tool fails the test with a message
//! unless `TANDEM_SKIP_NBD_INTEROP=1` is set.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use replication::device::FileDevice;
use volume_driver::frontend::{
    ExportHandle, ExportInfo, ExportIoError, Exports, IoErrorKind, OpenError,
};
use volume_driver::local_export::LocalExport;
use volume_driver::nbd;

// ---- Test server ------------------------------------------------------------------------

struct Volume {
    device: Arc<FileDevice>,
    read_only: bool,
}

struct TestExports {
    volumes: HashMap<String, Volume>,
    refused: HashMap<String, String>,
}

/// A volume whose disk fails: reads at block `k` fail with the k-th error kind, writes and
/// flushes with `Io`.
struct FaultyHandle;

const KINDS: [IoErrorKind; 5] = [
    IoErrorKind::Io,
    IoErrorKind::NoSpace,
    IoErrorKind::Invalid,
    IoErrorKind::ReadOnly,
    IoErrorKind::Shutdown,
];

#[async_trait]
impl ExportHandle for FaultyHandle {
    fn name(&self) -> &str {
        "faulty"
    }
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, _len: u32) -> Result<Bytes, ExportIoError> {
        let kind = KINDS[(offset / 4096) as usize % KINDS.len()];
        Err(ExportIoError::new(kind, "injected"))
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), ExportIoError> {
        Err(ExportIoError::new(IoErrorKind::Io, "injected"))
    }
    async fn flush(&self) -> Result<(), ExportIoError> {
        Err(ExportIoError::new(IoErrorKind::Io, "injected"))
    }
    async fn trim(&self, _: u64, _: u64) -> Result<(), ExportIoError> {
        Err(ExportIoError::new(IoErrorKind::NoSpace, "injected"))
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), ExportIoError> {
        Err(ExportIoError::new(IoErrorKind::Shutdown, "injected"))
    }
}

#[async_trait]
impl Exports for TestExports {
    fn list(&self) -> Vec<String> {
        // Refused volumes are left out: `nbdinfo --list` gives up on the whole listing when
        // one listed export refuses to open.
        let mut names: Vec<String> = self.volumes.keys().cloned().collect();
        names.sort();
        names
    }

    async fn describe(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let handle = self.open(name, false).await?;
        Ok(ExportInfo {
            size: handle.size(),
            read_only: handle.read_only(),
        })
    }
    async fn open(&self, name: &str, _writable: bool) -> Result<Arc<dyn ExportHandle>, OpenError> {
        if name == "faulty" {
            return Ok(Arc::new(FaultyHandle));
        }
        if let Some(msg) = self.refused.get(name) {
            return Err(OpenError::Refused(msg.clone()));
        }
        let vol = self
            .volumes
            .get(name)
            .ok_or_else(|| OpenError::NotFound(name.to_string()))?;
        Ok(Arc::new(LocalExport::new(
            name,
            vol.device.clone(),
            vol.read_only,
            Arc::default(),
        )))
    }
}

enum Listen {
    Unix,
    Tcp,
}

struct TestServer {
    dir: tempfile::TempDir,
    sock: PathBuf,
    tcp_port: Option<u16>,
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const REFUSAL: &str = "vm-100-disk-0 is Primary on hv2; refusing to open here";

impl TestServer {
    /// Volumes: `vol` (64 MiB, writable), `small` (1 MiB), `ro` (1 MiB, read-only), and
    /// `vm-100-disk-0` which is refused.
    fn start(listen: Listen) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut volumes = HashMap::new();
        for (name, size, read_only) in [
            ("vol", 64u64 << 20, false),
            ("small", 1 << 20, false),
            ("ro", 1 << 20, true),
        ] {
            let path = dir.path().join(format!("{name}.img"));
            std::fs::File::create(&path).unwrap().set_len(size).unwrap();
            let device = Arc::new(FileDevice::open(&path).unwrap());
            volumes.insert(name.to_string(), Volume { device, read_only });
        }
        let refused = HashMap::from([("vm-100-disk-0".to_string(), REFUSAL.to_string())]);
        let exports: Arc<dyn Exports> = Arc::new(TestExports { volumes, refused });
        let sock = dir.path().join("nbd.sock");
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sock2 = sock.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                match listen {
                    Listen::Unix => {
                        let listener = nbd::bind_unix(&sock2).unwrap();
                        ready_tx.send(None).unwrap();
                        nbd::serve_unix(listener, exports, rx).await;
                    }
                    Listen::Tcp => {
                        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                        ready_tx
                            .send(Some(listener.local_addr().unwrap().port()))
                            .unwrap();
                        nbd::serve_tcp(listener, exports, rx).await;
                    }
                }
            });
        });
        let tcp_port = ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        TestServer {
            dir,
            sock,
            tcp_port,
            shutdown,
            thread: Some(thread),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn backing(&self, export: &str) -> PathBuf {
        self.dir.path().join(format!("{export}.img"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- Tools ------------------------------------------------------------------------------

/// Whether the tool exists; panics with a clear message when it does not, unless skipping
/// was asked for explicitly.
fn need(tools: &[&str]) -> bool {
    for tool in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            if std::env::var_os("TANDEM_SKIP_NBD_INTEROP").is_some() {
                eprintln!("skipping: {tool} not installed and TANDEM_SKIP_NBD_INTEROP is set");
                return false;
            }
            panic!(
                "{tool} is not installed; install qemu-utils, libnbd-bin and fio \
                 (or set TANDEM_SKIP_NBD_INTEROP=1 to skip)"
            );
        }
    }
    true
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---- Real clients -----------------------------------------------------------------------

#[test]
fn qemu_img_info_and_convert_both_ways() {
    if !need(&["qemu-img"]) {
        return;
    }
    let srv = TestServer::start(Listen::Unix);
    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &srv.uri("vol")]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 64u64 << 20, "{info}");

    // Into the export: a 64 MiB image with data in a few places.
    let src = srv.dir.path().join("src.img");
    let mut image = vec![0u8; 64 << 20];
    image[..3 << 20].copy_from_slice(&pattern(3 << 20, 1));
    image[(40 << 20) + 512..(41 << 20) + 512].copy_from_slice(&pattern(1 << 20, 2));
    std::fs::write(&src, &image).unwrap();
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &srv.uri("vol"),
    ]));
    assert!(std::fs::read(srv.backing("vol")).unwrap() == image);

    // And back out of it.
    let dst = srv.dir.path().join("dst.img");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &srv.uri("vol"),
        dst.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&dst).unwrap() == image);
}

fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c)
}

fn assert_qemu_io_ok(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && !stdout.contains("failed")
            && !stdout.contains("error")
            && !stderr.contains("failed"),
        "qemu-io failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

#[test]
fn qemu_io_patterns_discard_zeroes_and_fua() {
    if !need(&["qemu-io"]) {
        return;
    }
    let srv = TestServer::start(Listen::Unix);
    let out = qemu_io(
        &srv.uri("vol"),
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "discard 0 64k",
            "read -P 0 0 64k",
            "write -P 0xee 1M 64k",
            "write -z 1M 64k",
            "read -P 0 1M 64k",
            "write -f -P 0xcd 2M 128k",
            "read -P 0xcd 2M 128k",
            "flush",
        ],
    );
    assert_qemu_io_ok(&out);
    let backing = srv.backing("vol");
    assert!(read_range(&backing, 0, 64 << 10).iter().all(|&b| b == 0));
    assert!(read_range(&backing, 64 << 10, (1 << 20) - (64 << 10))
        .iter()
        .all(|&b| b == 0xab));
    assert!(read_range(&backing, 1 << 20, 64 << 10)
        .iter()
        .all(|&b| b == 0));
    assert!(read_range(&backing, 2 << 20, 128 << 10)
        .iter()
        .all(|&b| b == 0xcd));

    // Pattern verification really fails on a mismatch (the check above is meaningful).
    let out = qemu_io(&srv.uri("vol"), &["read -P 0x11 0 4k"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
}

#[test]
fn read_only_export_refuses_writes() {
    if !need(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let srv = TestServer::start(Listen::Unix);
    let json = run_ok(Command::new("nbdinfo").args(["--json", &srv.uri("ro")]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true, "{v}");
    let out = run(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &srv.uri("ro"),
        "-c",
        "read -P 0 0 4k",
    ]));
    assert_qemu_io_ok(&out);
    // Opening read-write is refused by qemu because the export says READ_ONLY.
    let out = qemu_io(&srv.uri("ro"), &["write -P 1 0 4k"]);
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("read-only") || all.contains("Permission denied"),
        "{all}"
    );
    assert!(read_range(&srv.backing("ro"), 0, 4096)
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn nbdinfo_shows_size_flags_and_list() {
    if !need(&["nbdinfo"]) {
        return;
    }
    let srv = TestServer::start(Listen::Unix);
    let json = run_ok(Command::new("nbdinfo").args(["--json", &srv.uri("vol")]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 64u64 << 20, "{v}");
    assert_eq!(e["is_read_only"], false, "{v}");
    assert_eq!(e["can_flush"], true, "{v}");
    assert_eq!(e["can_fua"], true, "{v}");
    assert_eq!(e["can_trim"], true, "{v}");
    assert_eq!(e["can_zero"], true, "{v}");
    assert_eq!(e["can_multi_conn"], true, "{v}");
    assert_eq!(e["block_size_minimum"], 1, "{v}");
    assert_eq!(e["block_size_preferred"], 4096, "{v}");
    assert_eq!(e["block_size_maximum"], 32 << 20, "{v}");

    let list = run_ok(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd+unix://?socket={}", srv.sock.display()),
    ]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    for name in ["ro", "small", "vol"] {
        assert!(names.contains(&name), "{list}");
    }
}

fn fio_verify(uri: &str, iodepth: u32) {
    let out = run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        &format!("--iodepth={iodepth}"),
        "--verify=crc32c",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio iodepth {iodepth} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout.find('{').expect("fio printed no JSON");
    let v: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
        "{job}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
        "{job}"
    );
}

#[test]
fn fio_verify_crc32c_at_depth_1_and_32() {
    if !need(&["fio"]) {
        return;
    }
    let srv = TestServer::start(Listen::Unix);
    fio_verify(&srv.uri("vol"), 1);
    fio_verify(&srv.uri("vol"), 32);
}

#[test]
fn unknown_and_refused_exports_show_the_reason() {
    if !need(&["qemu-img", "qemu-io"]) {
        return;
    }
    let srv = TestServer::start(Listen::Unix);
    let out = run(Command::new("qemu-img").args(["info", &srv.uri("nope")]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no volume named 'nope'"), "{stderr}");

    let out = run(Command::new("qemu-img").args(["info", &srv.uri("vm-100-disk-0")]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(REFUSAL), "{stderr}");

    let out = qemu_io(&srv.uri("vm-100-disk-0"), &["read 0 4k"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(REFUSAL), "{stderr}");

    // The server still serves others.
    assert_qemu_io_ok(&qemu_io(&srv.uri("vol"), &["read -P 0 0 4k"]));
}

#[test]
fn tcp_listener_serves_qemu_io() {
    if !need(&["qemu-io"]) {
        return;
    }
    let srv = TestServer::start(Listen::Tcp);
    let uri = format!("nbd://127.0.0.1:{}/vol", srv.tcp_port.unwrap());
    assert_qemu_io_ok(&qemu_io(
        &uri,
        &["write -P 0x5a 4k 8k", "read -P 0x5a 4k 8k"],
    ));
    assert!(read_range(&srv.backing("vol"), 4096, 8192)
        .iter()
        .all(|&b| b == 0x5a));
}

#[test]
fn socket_has_mode_0660_and_stale_socket_is_replaced() {
    let srv = TestServer::start(Listen::Unix);
    let mode = std::fs::metadata(&srv.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    // Binding again over the existing (now stale for this test) path works.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let other = srv.dir.path().join("other.sock");
    std::fs::write(&other, b"stale").unwrap();
    rt.block_on(async { nbd::bind_unix(&other).unwrap() });
}

// ---- Raw protocol client ----------------------------------------------------------------

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

struct Raw(UnixStream);

impl Raw {
    fn connect(srv: &TestServer) -> Raw {
        let s = UnixStream::connect(&srv.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut raw = Raw(s);
        let greeting = raw.read_n(18);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        raw
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.0.read_exact(&mut buf).unwrap();
        buf
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// (option, reply type, data)
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (opt, typ, self.read_n(len as usize))
    }

    fn go(&mut self, name: &str) -> (u64, u16) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        self.option(7, &d);
        let mut export = None;
        loop {
            let (opt, typ, data) = self.option_reply();
            assert_eq!(opt, 7);
            match typ {
                3 if data[..2] == [0, 0] => {
                    export = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes(data[10..12].try_into().unwrap()),
                    ))
                }
                3 => {}
                1 => return export.unwrap(),
                other => panic!("GO failed: {other:#x} {}", String::from_utf8_lossy(&data)),
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.send(&m);
    }

    /// (errno, cookie)
    fn simple_reply(&mut self) -> (u32, u64) {
        let r = self.read_n(16);
        assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes());
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    fn expect_closed(&mut self) {
        let mut buf = [0u8; 64];
        match self.0.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close the connection, got {other:?}"),
        }
    }
}

fn negotiated(srv: &TestServer, export: &str) -> Raw {
    let mut c = Raw::connect(srv);
    c.send(&3u32.to_be_bytes());
    c.go(export);
    c
}

#[test]
fn raw_client_bad_handshakes_are_handled() {
    let srv = TestServer::start(Listen::Unix);

    // Non-fixed-newstyle and unknown client flags: disconnect.
    for flags in [0u32, 0x80] {
        let mut c = Raw::connect(&srv);
        c.send(&flags.to_be_bytes());
        c.expect_closed();
    }

    // Unknown option, STARTTLS, structured replies, LIST with data, malformed GO, oversize
    // option: each an error reply, then the same connection still negotiates.
    let mut c = Raw::connect(&srv);
    c.send(&1u32.to_be_bytes());
    c.option(0x1234, b"junk");
    assert_eq!(c.option_reply().1, 0x8000_0001);
    c.option(5, b"");
    assert_eq!(c.option_reply().1, 0x8000_0001);
    c.option(8, b"");
    assert_eq!(c.option_reply().1, 0x8000_0001);
    c.option(3, b"x");
    assert_eq!(c.option_reply().1, 0x8000_0003);
    c.option(7, &[0, 0, 0, 200, b'a']);
    assert_eq!(c.option_reply().1, 0x8000_0003);
    c.option(7, &vec![0u8; 100_000]);
    assert_eq!(c.option_reply().1, 0x8000_0009);
    c.option(3, b"");
    let mut servers = 0;
    loop {
        match c.option_reply() {
            (3, 2, _) => servers += 1,
            (3, 1, _) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(servers, 3);
    // Refused open: the message arrives as the error data.
    let mut d = 13u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"vm-100-disk-0");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(7, &d);
    let (_, typ, msg) = c.option_reply();
    assert_eq!(typ, 0x8000_0002);
    assert_eq!(String::from_utf8(msg).unwrap(), REFUSAL);
    // Abort: ACK and close.
    c.option(2, b"");
    assert_eq!(c.option_reply().1, 1);
    c.expect_closed();

    // Bad option magic: disconnect.
    let mut c = Raw::connect(&srv);
    c.send(&1u32.to_be_bytes());
    c.send(&[0xff; 16]);
    c.expect_closed();

    // EXPORT_NAME of an unknown export: disconnect (the option cannot carry an error).
    let mut c = Raw::connect(&srv);
    c.send(&3u32.to_be_bytes());
    c.option(1, b"nope");
    c.expect_closed();

    // EXPORT_NAME with NO_ZEROES: size + flags, no padding, then transmission works.
    let mut c = Raw::connect(&srv);
    c.send(&3u32.to_be_bytes());
    c.option(1, b"small");
    let r = c.read_n(10);
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 1 << 20);
    c.request(0, 0, 9, 0, 512);
    assert_eq!(c.simple_reply(), (0, 9));
    assert_eq!(c.read_n(512), vec![0u8; 512]);
}

#[test]
fn raw_client_bad_requests_get_errors_and_others_carry_on() {
    let srv = TestServer::start(Listen::Unix);
    let mut c = negotiated(&srv, "small");
    let size = 1u64 << 20;

    // Out-of-range read, overflowing offset, unknown command, unknown flag: EINVAL.
    c.request(0, 0, 1, size - 100, 4096);
    assert_eq!(c.simple_reply(), (22, 1));
    c.request(0, 0, 2, u64::MAX - 10, 4096);
    assert_eq!(c.simple_reply(), (22, 2));
    c.request(42, 0, 3, 0, 0);
    assert_eq!(c.simple_reply(), (22, 3));
    c.request(0, 0x40, 4, 0, 512);
    assert_eq!(c.simple_reply(), (22, 4));
    // Oversized read: EINVAL, no payload.
    c.request(0, 0, 5, 0, (32 << 20) + 1);
    assert_eq!(c.simple_reply(), (22, 5));
    // Write past the end: payload consumed, ENOSPC.
    c.request(1, 0, 6, size - 512, 4096);
    c.send(&[0x77; 4096]);
    assert_eq!(c.simple_reply(), (28, 6));
    // Oversized write: payload consumed, EINVAL; the stream stays in sync.
    let big = (32u32 << 20) + 4096;
    c.request(1, 0, 7, 0, big);
    c.send(&vec![0x66u8; big as usize]);
    assert_eq!(c.simple_reply(), (22, 7));
    // Valid write + read still work on the same connection.
    c.request(1, 1, 8, 4096, 4096);
    c.send(&[0x42; 4096]);
    assert_eq!(c.simple_reply(), (0, 8));
    c.request(0, 0, 9, 4096, 4096);
    assert_eq!(c.simple_reply(), (0, 9));
    assert_eq!(c.read_n(4096), vec![0x42; 4096]);
    c.request(3, 0, 10, 0, 0);
    assert_eq!(c.simple_reply(), (0, 10));
    // Nothing of the refused writes reached the disk.
    assert!(read_range(&srv.backing("small"), 0, 4096)
        .iter()
        .all(|&b| b == 0));
    // Disconnect: the server closes.
    c.request(2, 0, 11, 0, 0);
    c.expect_closed();

    // Read-only export: writes get EPERM with the payload consumed.
    let mut c = negotiated(&srv, "ro");
    c.request(1, 0, 1, 0, 512);
    c.send(&[1; 512]);
    assert_eq!(c.simple_reply(), (1, 1));
    c.request(4, 0, 2, 0, 512);
    assert_eq!(c.simple_reply(), (1, 2));

    // Garbage instead of a request: the server closes this connection.
    let mut c = negotiated(&srv, "small");
    c.send(&[0xde; 28]);
    c.expect_closed();

    // Truncated request header, then the client vanishes.
    let mut c = negotiated(&srv, "small");
    c.send(&0x2560_9513u32.to_be_bytes());
    drop(c);
    // Truncated write payload, then the client vanishes.
    let mut c = negotiated(&srv, "small");
    c.request(1, 0, 1, 0, 65536);
    c.send(&[1; 1000]);
    drop(c);
    // Many pipelined requests, then the client vanishes without reading replies.
    let mut c = negotiated(&srv, "vol");
    for i in 0..200 {
        c.request(0, 0, i, 0, 65536);
    }
    drop(c);

    // A fresh client still works.
    let mut c = negotiated(&srv, "small");
    c.request(0, 0, 77, 4096, 4096);
    assert_eq!(c.simple_reply(), (0, 77));
    assert_eq!(c.read_n(4096), vec![0x42; 4096]);
}

#[test]
fn pipelined_requests_all_complete() {
    let srv = TestServer::start(Listen::Unix);
    let mut c = negotiated(&srv, "vol");
    let n = 300u64;
    for i in 0..n {
        c.request(1, 0, i, i * 4096, 4096);
        c.send(&pattern(4096, i as u32));
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let (errno, cookie) = c.simple_reply();
        assert_eq!(errno, 0);
        assert!(seen.insert(cookie));
    }
    for i in 0..n {
        c.request(0, 0, 1000 + i, i * 4096, 4096);
    }
    for _ in 0..n {
        let (errno, cookie) = c.simple_reply();
        assert_eq!(errno, 0);
        let data = c.read_n(4096);
        assert_eq!(data, pattern(4096, (cookie - 1000) as u32));
    }
}

#[test]
fn export_errors_become_nbd_errnos() {
    let srv = TestServer::start(Listen::Unix);
    let mut c = negotiated(&srv, "faulty");
    // Reads: Io, NoSpace, Invalid, ReadOnly, Shutdown -> EIO, ENOSPC, EINVAL, EPERM, ESHUTDOWN,
    // with no payload after the error header.
    for (k, errno) in [5u32, 28, 22, 1, 108].into_iter().enumerate() {
        c.request(0, 0, k as u64, k as u64 * 4096, 4096);
        assert_eq!(c.simple_reply(), (errno, k as u64));
    }
    c.request(1, 1, 10, 0, 4096);
    c.send(&[9; 4096]);
    assert_eq!(c.simple_reply(), (5, 10));
    c.request(3, 0, 11, 0, 0);
    assert_eq!(c.simple_reply(), (5, 11));
    c.request(4, 0, 12, 0, 4096);
    assert_eq!(c.simple_reply(), (28, 12));
    c.request(6, 0, 13, 0, 4096);
    assert_eq!(c.simple_reply(), (108, 13));
    // The connection is still in sync.
    c.request(0, 0, 14, 0, 4096);
    assert_eq!(c.simple_reply(), (5, 14));
}

#[test]
fn two_connections_share_the_volume() {
    let srv = TestServer::start(Listen::Unix);
    let mut a = negotiated(&srv, "vol");
    let mut b = negotiated(&srv, "vol");
    a.request(1, 0, 1, 8192, 4096);
    a.send(&[0x31; 4096]);
    assert_eq!(a.simple_reply(), (0, 1));
    b.request(3, 0, 2, 0, 0);
    assert_eq!(b.simple_reply(), (0, 2));
    b.request(0, 0, 3, 8192, 4096);
    assert_eq!(b.simple_reply(), (0, 3));
    assert_eq!(b.read_n(4096), vec![0x31; 4096]);
}

#[test]
fn shutdown_closes_connections_and_returns() {
    let srv = TestServer::start(Listen::Unix);
    let mut c = negotiated(&srv, "vol");
    c.request(0, 0, 1, 0, 4096);
    assert_eq!(c.simple_reply(), (0, 1));
    assert_eq!(c.read_n(4096), vec![0; 4096]);
    let mut idle = Raw::connect(&srv); // still in the handshake
    let started = std::time::Instant::now();
    drop(srv); // sends shutdown and joins the server thread
    assert!(started.elapsed() < Duration::from_secs(5));
    c.expect_closed();
    idle.expect_closed();
}
