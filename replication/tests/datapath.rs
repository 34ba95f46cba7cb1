//! The replicated write path end to end: a Primary and a Secondary over a real TCP loopback
//! connection, with file-backed devices (wrapped to block, delay, record and count).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

mod replica_support;

use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};
use replica_support::forward;
use replication::auth::Secret;
use replication::core::op::Op;
use replication::datapath::{
    run_secondary, DatapathError, Holds, OutOfSyncHook, Primary, PrimaryConfig, ReleaseHolds,
    SecondaryConfig, WriteIntentHooks, WriteIntentLog,
};
use replication::device::{BackingDevice, DeviceError, DeviceFuture, FileDevice};
use replication::failure_log::{error_chain, FailureLog};
use replication::link::{LinkConfig, LinkDown, LinkSender, PeerLink};
use replication::wire::{error_code, Hello, Message, ReplicationProtocol, WriteRequest};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Start(u64),
    End(u64),
    /// The Secondary's write-intent log took / released the range at this offset.
    Logged(u64),
    Released(u64),
}

/// A FileDevice that can hold writes at a gate, delay writes at chosen offsets, record
/// write start/end order, count flushes and durable writes, and fail writes as a full disk
/// does (ENOSPC). Its writes may block, so the data path hands them to the blocking pool,
/// unless `cached` says they only copy into a cache (then small ones are applied inline,
/// see `datapath::write_is_inline`).
struct TestDevice {
    cached: AtomicBool,
    inner: FileDevice,
    open: Mutex<bool>,
    gate: Condvar,
    delays: Mutex<HashMap<u64, Duration>>,
    events: Mutex<Vec<Event>>,
    flushes: AtomicUsize,
    durable_writes: AtomicUsize,
    writes_started: AtomicUsize,
    fail_writes: AtomicBool,
    /// Panic when the data path asks for an async write: a bug on the volume task itself.
    panic_on_async_write: AtomicBool,
}

impl TestDevice {
    fn new(path: &Path) -> Arc<Self> {
        Arc::new(TestDevice {
            cached: AtomicBool::new(false),
            inner: FileDevice::open(path).unwrap(),
            open: Mutex::new(true),
            gate: Condvar::new(),
            delays: Mutex::new(HashMap::new()),
            events: Mutex::new(Vec::new()),
            flushes: AtomicUsize::new(0),
            durable_writes: AtomicUsize::new(0),
            writes_started: AtomicUsize::new(0),
            fail_writes: AtomicBool::new(false),
            panic_on_async_write: AtomicBool::new(false),
        })
    }

    fn set_gate(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.gate.notify_all();
    }

    fn before_write(&self, offset: u64) {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        self.events.lock().unwrap().push(Event::Start(offset));
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.gate.wait(open).unwrap();
        }
        drop(open);
        let delay = self.delays.lock().unwrap().get(&offset).copied();
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    }

    fn after_write(&self, offset: u64) {
        self.events.lock().unwrap().push(Event::End(offset));
    }
}

impl BackingDevice for TestDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.before_write(offset);
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(DeviceError::Io {
                op: "write",
                offset,
                len: buf.len() as u64,
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        let r = self.inner.write_at(buf, offset);
        self.after_write(offset);
        r
    }
    fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.before_write(offset);
        let r = self.inner.write_at_durable(buf, offset);
        self.durable_writes.fetch_add(1, Ordering::SeqCst);
        self.after_write(offset);
        r
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.before_write(offset);
        let r = self.inner.discard(offset, len);
        self.after_write(offset);
        r
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DeviceError> {
        self.before_write(offset);
        let r = self.inner.write_zeroes(offset, len, may_unmap);
        self.after_write(offset);
        r
    }
    fn set_size(&self, size: u64) {
        self.inner.set_size(size)
    }
    fn cached_writes(&self) -> bool {
        self.cached.load(Ordering::SeqCst)
    }
    fn write_async(&self, _offset: u64, _data: &Bytes, _fua: bool) -> Option<DeviceFuture<()>> {
        assert!(
            !self.panic_on_async_write.load(Ordering::SeqCst),
            "test device: a bug on the volume task"
        );
        None
    }
}

struct Disk {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dev: Arc<TestDevice>,
}

fn disk(size: u64) -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    File::create(&path).unwrap().set_len(size).unwrap();
    let dev = TestDevice::new(&path);
    Disk {
        _dir: dir,
        path,
        dev,
    }
}

fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&data))
}

fn secret() -> Secret {
    Secret::new(b"test secret".to_vec()).unwrap()
}

fn link_cfg() -> LinkConfig {
    LinkConfig {
        ping_interval: Duration::from_millis(100),
        dead_after: Duration::from_millis(1000),
        ..LinkConfig::default()
    }
}

type OosLog = Arc<Mutex<Vec<(String, u64, u64)>>>;

/// Connect a Primary-side link and a Secondary-side link over TCP loopback.
async fn tcp_links(protocol: ReplicationProtocol, size: u64) -> (PeerLink, PeerLink) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        PeerLink::accept(&listener, &secret(), &link_cfg(), |_| {
            Some(Hello::new("secondary", "vol", size, protocol))
        })
        .await
        .unwrap()
    });
    let primary_link = PeerLink::connect(
        addr,
        &secret(),
        &Hello::new("primary", "vol", size, protocol),
        &link_cfg(),
    )
    .await
    .unwrap();
    (primary_link, accept.await.unwrap())
}

struct Pair {
    primary: Primary,
    oos: OosLog,
    /// Marks the hook refused (see `pair_with_hook`).
    failed_marks: Arc<AtomicUsize>,
    secondary_sender: LinkSender,
    secondary: JoinHandle<Result<LinkDown, DatapathError>>,
}

async fn pair(
    protocol: ReplicationProtocol,
    primary_dev: Arc<dyn BackingDevice>,
    secondary_dev: Arc<dyn BackingDevice>,
) -> Pair {
    pair_with(
        protocol,
        primary_dev,
        secondary_dev,
        SecondaryConfig::default(),
    )
    .await
}

async fn pair_with(
    protocol: ReplicationProtocol,
    primary_dev: Arc<dyn BackingDevice>,
    secondary_dev: Arc<dyn BackingDevice>,
    secondary_cfg: SecondaryConfig,
) -> Pair {
    pair_with_hook(protocol, primary_dev, secondary_dev, secondary_cfg, None).await
}

/// A pair whose out-of-sync hook panics the first time it is asked to mark the range at
/// `fail_once_at` (counted in `Pair::failed_marks`), and records every other mark.
async fn pair_with_hook(
    protocol: ReplicationProtocol,
    primary_dev: Arc<dyn BackingDevice>,
    secondary_dev: Arc<dyn BackingDevice>,
    secondary_cfg: SecondaryConfig,
    fail_once_at: Option<u64>,
) -> Pair {
    let (plink, slink) = tcp_links(protocol, primary_dev.size()).await;
    let oos: OosLog = Arc::default();
    let log = oos.clone();
    let failed_marks = Arc::new(AtomicUsize::new(0));
    let failed = failed_marks.clone();
    let hook: OutOfSyncHook = Arc::new(move |peer: &str, offset, len| {
        if Some(offset) == fail_once_at
            && failed
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            panic!("test: the out-of-sync hook fails");
        }
        log.lock().unwrap().push((peer.to_string(), offset, len));
    });
    let primary = Primary::new(primary_dev, PrimaryConfig::new(protocol), hook);
    primary.attach_peer(plink);
    let secondary_sender = slink.sender.clone();
    let secondary = tokio::spawn(run_secondary(slink, secondary_dev, secondary_cfg));
    Pair {
        primary,
        oos,
        failed_marks,
        secondary_sender,
        secondary,
    }
}

async fn replicate_16_mib(protocol: ReplicationProtocol) {
    replicate_16_mib_with(protocol, false).await
}

async fn replicate_16_mib_with(protocol: ReplicationProtocol, cached: bool) {
    let size = 17 * MIB;
    let p = disk(size);
    let s = disk(size);
    p.dev.cached.store(cached, Ordering::SeqCst);
    s.dev.cached.store(cached, Ordering::SeqCst);
    let pair = pair(protocol, p.dev.clone(), s.dev.clone()).await;
    assert_eq!(
        pair.primary.connected_peers(),
        vec!["secondary".to_string()]
    );

    // 16 MiB of random data in random-sized, non-overlapping writes, 32 in flight, in
    // random order; then some trims and write-zeroes over part of it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut extents = Vec::new();
    let mut off = 0u64;
    while off < 16 * MIB {
        let len = (rng.gen_range(1..=64u64) * 4096).min(16 * MIB - off);
        extents.push((off, len));
        off += len;
    }
    for i in (1..extents.len()).rev() {
        extents.swap(i, rng.gen_range(0..=i));
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for (off, len) in extents {
        let mut data = vec![0u8; len as usize];
        rng.fill_bytes(&mut data);
        let primary = pair.primary.clone();
        let permit = sem.clone().acquire_owned().await.unwrap();
        let fua = rng.gen_ratio(1, 50);
        tasks.spawn(async move {
            primary
                .submit_write(off, Bytes::from(data), fua)
                .await
                .unwrap();
            drop(permit);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    pair.primary
        .submit_trim(MIB, 256 * 1024, false)
        .await
        .unwrap();
    pair.primary
        .submit_write_zeroes(3 * MIB, 128 * 1024, false, false)
        .await
        .unwrap();
    pair.primary
        .submit_write_zeroes(5 * MIB, 64 * 1024, true, true)
        .await
        .unwrap();
    pair.primary.flush().await.unwrap();
    pair.primary.wait_replicated().await;
    // A flush after everything was applied reaches the secondary's disk in every protocol.
    pair.primary.flush().await.unwrap();

    assert_eq!(
        sha256_file(&p.path),
        sha256_file(&s.path),
        "protocol {protocol}"
    );
    assert!(pair.oos.lock().unwrap().is_empty());
    assert_eq!(
        pair.primary.connected_peers(),
        vec!["secondary".to_string()]
    );
    pair.secondary_sender.close("test done");
    let exit = pair.secondary.await.unwrap().unwrap();
    assert!(matches!(exit, LinkDown::Closed(_)), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_a_replicates_16_mib_byte_identical() {
    replicate_16_mib(ReplicationProtocol::A).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_b_replicates_16_mib_byte_identical() {
    replicate_16_mib(ReplicationProtocol::B).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_c_replicates_16_mib_byte_identical() {
    replicate_16_mib(ReplicationProtocol::C).await;
}

/// Writes up to 256 KiB, so both the inline path (up to 128 KiB) and the blocking pool
/// carry them on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_c_replicates_16_mib_byte_identical_on_cached_devices() {
    replicate_16_mib_with(ReplicationProtocol::C, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_a_replicates_16_mib_byte_identical_on_cached_devices() {
    replicate_16_mib_with(ReplicationProtocol::A, true).await;
}

/// With the secondary's device holding writes, a write completes under A and B (local +
/// queued / received) but not under C (needs the peer's disk), until the device proceeds.
async fn ack_point(protocol: ReplicationProtocol) -> bool {
    ack_point_with(protocol, false).await
}

async fn ack_point_with(protocol: ReplicationProtocol, cached: bool) -> bool {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    p.dev.cached.store(cached, Ordering::SeqCst);
    s.dev.cached.store(cached, Ordering::SeqCst);
    let pair = pair(protocol, p.dev.clone(), s.dev.clone()).await;
    s.dev.set_gate(false);
    let primary = pair.primary.clone();
    let write = tokio::spawn(async move {
        primary
            .submit_write(8192, Bytes::from(vec![0x5A; 4096]), false)
            .await
    });
    // Wait until the secondary's device has the write in hand. The gate blocks the thread
    // that applies it, which for an inline write is a runtime worker, maybe the one that
    // would drive tokio's timers next: wait on this (block_on) thread's own clock instead.
    let t0 = Instant::now();
    while s.dev.writes_started.load(Ordering::SeqCst) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "write never reached the secondary"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    let completed_while_blocked = write.is_finished();
    // Under every protocol the write is in flight on the link until its WriteAck (DRBD's
    // ap-in-flight), and nothing is once the peer has acknowledged everything.
    let peer = pair.primary.connected_peers().pop().expect("a peer");
    let in_flight = || {
        let sender = pair.primary.peer_sender(&peer);
        sender.map(|s| s.figures().app_in_flight_bytes)
    };
    assert_eq!(in_flight(), Some(4096));
    s.dev.set_gate(true);
    write.await.unwrap().unwrap();
    pair.primary.wait_replicated().await;
    assert_eq!(in_flight(), Some(0));
    assert_eq!(sha256_file(&p.path), sha256_file(&s.path));
    completed_while_blocked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_c_completes_only_after_the_peer_disk_write() {
    assert!(!ack_point(ReplicationProtocol::C).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_b_completes_when_the_peer_received_the_write() {
    assert!(ack_point(ReplicationProtocol::B).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_a_completes_before_the_peer_disk_write() {
    assert!(ack_point(ReplicationProtocol::A).await);
}

/// The same acknowledgement points when both sides apply the write inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_points_hold_for_inline_writes() {
    assert!(!ack_point_with(ReplicationProtocol::C, true).await);
    assert!(ack_point_with(ReplicationProtocol::B, true).await);
    assert!(ack_point_with(ReplicationProtocol::A, true).await);
}

/// Under A the primary completes X at once; Y, issued after X completed, belongs to a
/// later epoch, so the secondary must not start Y before X is on its disk, however slow X.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_a_keeps_write_order_on_the_secondary_across_epochs() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let (x, y, z) = (0u64, MIB, 2 * MIB);
    s.dev
        .delays
        .lock()
        .unwrap()
        .insert(x, Duration::from_millis(300));
    let pair = pair(ReplicationProtocol::A, p.dev.clone(), s.dev.clone()).await;
    pair.primary
        .submit_write(x, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    pair.primary
        .submit_write(y, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    pair.primary
        .submit_write(z, Bytes::from(vec![3u8; 4096]), false)
        .await
        .unwrap();
    pair.primary.wait_replicated().await;
    let events = s.dev.events.lock().unwrap().clone();
    let pos = |e: Event| events.iter().position(|x| *x == e).unwrap();
    assert!(pos(Event::End(x)) < pos(Event::Start(y)), "{events:?}");
    assert!(pos(Event::End(y)) < pos(Event::Start(z)), "{events:?}");
    assert_eq!(sha256_file(&p.path), sha256_file(&s.path));
}

/// Writes issued together (no completion in between) share an epoch and run concurrently
/// on the secondary: the slow one does not hold back the fast one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_one_epoch_are_applied_concurrently() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let (x, y) = (0u64, MIB);
    s.dev
        .delays
        .lock()
        .unwrap()
        .insert(x, Duration::from_millis(300));
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    let (a, b) = tokio::join!(
        pair.primary
            .submit_write(x, Bytes::from(vec![1u8; 4096]), false),
        pair.primary
            .submit_write(y, Bytes::from(vec![2u8; 4096]), false),
    );
    a.unwrap();
    b.unwrap();
    let events = s.dev.events.lock().unwrap().clone();
    let pos = |e: Event| events.iter().position(|x| *x == e).unwrap();
    assert!(pos(Event::End(y)) < pos(Event::End(x)), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_lost_mid_write_completes_locally_and_reports_the_range_out_of_sync() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    s.dev.set_gate(false);
    let primary = pair.primary.clone();
    let write = tokio::spawn(async move {
        primary
            .submit_write(65536, Bytes::from(vec![0x77; 8192]), true)
            .await
    });
    let t0 = Instant::now();
    while s.dev.writes_started.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The secondary's connection dies while its disk holds the write.
    pair.secondary_sender.close("simulated crash");
    tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .expect("the application write must not hang on a dead peer")
        .unwrap()
        .unwrap();
    let mut back = vec![0u8; 8192];
    p.dev.read_at(&mut back, 65536).unwrap();
    assert!(back.iter().all(|&b| b == 0x77));
    assert_eq!(
        pair.oos.lock().unwrap().clone(),
        vec![("secondary".to_string(), 65536, 8192)]
    );
    let t0 = Instant::now();
    while !pair.primary.connected_peers().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Later writes complete without the peer and are reported out of sync for it.
    pair.primary
        .submit_write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    pair.primary.flush().await.unwrap();
    assert_eq!(
        pair.oos.lock().unwrap().last().cloned(),
        Some(("secondary".to_string(), 0, 4096))
    );
    s.dev.set_gate(true);
    let _ = pair.secondary.await.unwrap();
}

/// The completion names every known peer that did not acknowledge a request: none while
/// the peer acknowledges, the peer once its link died with the request in flight, and the
/// peer for every request issued while it is away (the engine gates acknowledgements on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_names_the_peers_that_did_not_acknowledge_the_request() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    let done = pair
        .primary
        .write_request(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    assert!(done.unacknowledged.is_empty(), "{done:?}");
    let done = pair.primary.flush_request().await.unwrap();
    assert!(done.unacknowledged.is_empty(), "{done:?}");

    s.dev.set_gate(false);
    let primary = pair.primary.clone();
    let write = tokio::spawn(async move {
        primary
            .write_request(8192, Bytes::from(vec![2u8; 4096]), false)
            .await
    });
    let t0 = Instant::now();
    while s.dev.writes_started.load(Ordering::SeqCst) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pair.secondary_sender.close("simulated crash");
    let done = tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .expect("a dead peer does not block the data path")
        .unwrap()
        .unwrap();
    assert_eq!(done.unacknowledged, vec!["secondary".to_string()]);

    let t0 = Instant::now();
    while !pair.primary.connected_peers().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = pair
        .primary
        .write_zeroes_request(16384, 4096, false, false)
        .await
        .unwrap();
    assert_eq!(done.unacknowledged, vec!["secondary".to_string()]);
    // A flush issued while the peer is away names it too (the engine holds it until the
    // loss is dealt with, as for a write).
    let done = pair.primary.flush_request().await.unwrap();
    assert_eq!(done.unacknowledged, vec!["secondary".to_string()]);
    s.dev.set_gate(true);
    let _ = pair.secondary.await.unwrap();
}

/// Under protocol A a write completes before its peer has it. When the peer is then lost,
/// `wait_replicated` (what a snapshot's pause waits on) returns only once the write's range
/// is marked out of sync for that peer, so the pause's in-sync check sees the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicated_returns_after_a_lost_peers_ranges_are_marked() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair(ReplicationProtocol::A, p.dev.clone(), s.dev.clone()).await;
    s.dev.set_gate(false);
    pair.primary
        .write_request(8192, Bytes::from(vec![7u8; 4096]), false)
        .await
        .unwrap();
    let reached = wait_for(Duration::from_secs(5), || {
        s.dev.writes_started.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(reached, "the write never reached the secondary");
    let primary = pair.primary.clone();
    let waiting = tokio::spawn(async move { primary.wait_replicated().await });
    pair.secondary_sender.close("simulated crash");
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("a lost peer ends the wait")
        .unwrap();
    assert_eq!(
        pair.oos.lock().unwrap().clone(),
        vec![("secondary".to_string(), 8192, 4096)]
    );
    s.dev.set_gate(true);
    let _ = pair.secondary.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_and_flush_reach_the_peer_disk_under_c() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    pair.primary
        .submit_write(0, Bytes::from(vec![9u8; 4096]), true)
        .await
        .unwrap();
    assert_eq!(s.dev.durable_writes.load(Ordering::SeqCst), 1);
    assert_eq!(p.dev.durable_writes.load(Ordering::SeqCst), 1);
    pair.primary
        .submit_write(4096, Bytes::from(vec![8u8; 4096]), false)
        .await
        .unwrap();
    let before = s.dev.flushes.load(Ordering::SeqCst);
    pair.primary.flush().await.unwrap();
    assert_eq!(s.dev.flushes.load(Ordering::SeqCst), before + 1);
    assert!(p.dev.flushes.load(Ordering::SeqCst) >= 1);
}

/// A malicious or broken primary: requests outside the volume or out of epoch order are
/// answered with an Error frame and a disconnect; the device is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_range_request_from_the_peer_is_rejected_and_the_device_untouched() {
    let size = 4 * MIB;
    let s = disk(size);
    let before = sha256_file(&s.path);
    for (offset, len) in [
        (size - 4096 + 1, 4096usize),
        (size, 1),
        (u64::MAX - 8192, 4096),
    ] {
        let (mut plink, slink) = tcp_links(ReplicationProtocol::C, size).await;
        let secondary = tokio::spawn(run_secondary(
            slink,
            s.dev.clone(),
            SecondaryConfig::default(),
        ));
        let _ = plink
            .sender
            .send(&Message::Write(WriteRequest {
                seq: 1,
                epoch: 1,
                offset,
                fua: false,
                ack_on_receive: true,
                data: Bytes::from(vec![0xEE; len]),
            }))
            .await;
        let exit = secondary.await.unwrap();
        // Offsets that overflow are refused by the frame decoder already.
        if offset.checked_add(len as u64).is_some() {
            assert!(
                matches!(exit, Err(DatapathError::PeerOutOfRange { .. })),
                "{exit:?}"
            );
            while plink.receiver.recv().await.is_some() {}
            match plink.receiver.down_reason() {
                Some(LinkDown::PeerError { code, .. }) => {
                    assert_eq!(code, error_code::OUT_OF_RANGE)
                }
                other => panic!("{other:?}"),
            }
        } else {
            assert!(exit.is_ok(), "{exit:?}");
        }
    }
    assert_eq!(s.dev.writes_started.load(Ordering::SeqCst), 0);
    assert_eq!(sha256_file(&s.path), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_a_closed_epoch_is_a_protocol_error() {
    let size = 4 * MIB;
    let s = disk(size);
    let (plink, slink) = tcp_links(ReplicationProtocol::C, size).await;
    let secondary = tokio::spawn(run_secondary(
        slink,
        s.dev.clone(),
        SecondaryConfig::default(),
    ));
    let write = |epoch| {
        Message::Write(WriteRequest {
            seq: epoch,
            epoch,
            offset: 0,
            fua: false,
            ack_on_receive: false,
            data: Bytes::from(vec![1u8; 512]),
        })
    };
    plink.sender.send(&write(5)).await.unwrap();
    plink
        .sender
        .send_control(&Message::Barrier { epoch: 5 })
        .unwrap();
    plink.sender.send(&write(5)).await.unwrap();
    let exit = secondary.await.unwrap();
    assert!(
        matches!(exit, Err(DatapathError::PeerProtocol(_))),
        "{exit:?}"
    );
    assert_eq!(s.dev.writes_started.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_refuses_requests_beyond_its_volume() {
    let p = disk(MIB);
    let primary = Primary::new(
        p.dev.clone(),
        PrimaryConfig::new(ReplicationProtocol::C),
        Arc::new(|_: &str, _, _| {}),
    );
    let e = primary
        .submit_write(MIB - 100, Bytes::from(vec![0u8; 4096]), false)
        .await
        .unwrap_err();
    assert!(matches!(e, DatapathError::OutOfRange { .. }), "{e:?}");
    let e = primary.submit_trim(u64::MAX, 2, false).await.unwrap_err();
    assert!(matches!(e, DatapathError::OutOfRange { .. }), "{e:?}");
    // Without peers a write is a plain local write.
    primary
        .submit_write(0, Bytes::from(vec![3u8; 4096]), false)
        .await
        .unwrap();
    assert!(primary.connected_peers().is_empty());
}

/// Many concurrent writes to the same few blocks: overlapping requests are serialized on
/// the Primary, so both replicas end up identical whatever the interleaving.
async fn overlapping_writes_converge(protocol: ReplicationProtocol) {
    let p = disk(MIB);
    let s = disk(MIB);
    let pair = pair(protocol, p.dev.clone(), s.dev.clone()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..256u64 {
        let primary = pair.primary.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(i);
        let offset = rng.gen_range(0..16u64) * 4096;
        let len = rng.gen_range(1..=4usize) * 4096;
        let data = vec![(i % 251) as u8 + 1; len];
        tasks.spawn(async move {
            primary
                .submit_write(offset, Bytes::from(data), false)
                .await
                .unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    pair.primary.flush().await.unwrap();
    pair.primary.wait_replicated().await;
    assert_eq!(
        sha256_file(&p.path),
        sha256_file(&s.path),
        "protocol {protocol}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_concurrent_writes_leave_identical_replicas_under_c() {
    overlapping_writes_converge(ReplicationProtocol::C).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_concurrent_writes_leave_identical_replicas_under_a() {
    overlapping_writes_converge(ReplicationProtocol::A).await;
}

/// A TCP forwarder between the Primary and the Secondary that can be frozen: it stops
/// moving bytes in both directions without closing anything, like a cut cable.
async fn freezable_proxy(target: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        let (inbound, _) = listener.accept().await.unwrap();
        let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
        let (ir, iw) = inbound.into_split();
        let (or, ow) = outbound.into_split();
        tokio::join!(forward(&f, ir, ow), forward(&f, or, iw));
    });
    (addr, frozen)
}

/// A Primary and a Secondary connected through a [`freezable_proxy`].
async fn pair_through_proxy(
    protocol: ReplicationProtocol,
    p: &Disk,
    s: &Disk,
) -> (Pair, Arc<AtomicBool>) {
    let size = p.dev.size();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let (proxy, frozen) = freezable_proxy(target).await;
    let accept = tokio::spawn(async move {
        PeerLink::accept(&listener, &secret(), &link_cfg(), |_| {
            Some(Hello::new("secondary", "vol", size, protocol))
        })
        .await
        .unwrap()
    });
    let plink = PeerLink::connect(
        proxy,
        &secret(),
        &Hello::new("primary", "vol", size, protocol),
        &link_cfg(),
    )
    .await
    .unwrap();
    let slink = accept.await.unwrap();
    let oos: OosLog = Arc::default();
    let log = oos.clone();
    let primary = Primary::new(
        p.dev.clone(),
        PrimaryConfig::new(protocol),
        Arc::new(move |peer: &str, offset, len| {
            log.lock().unwrap().push((peer.to_string(), offset, len));
        }),
    );
    primary.attach_peer(plink);
    let secondary_sender = slink.sender.clone();
    let secondary = tokio::spawn(run_secondary(
        slink,
        s.dev.clone() as Arc<dyn BackingDevice>,
        SecondaryConfig::default(),
    ));
    (
        Pair {
            primary,
            oos,
            failed_marks: Arc::default(),
            secondary_sender,
            secondary,
        },
        frozen,
    )
}

/// The link to the Secondary goes silent (no FIN, no RST) while a protocol C write waits
/// for it: keepalive declares the peer dead, the write completes from the local disk, and
/// the range is reported out of sync. The Secondary notices the silence too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_detected_and_the_pending_write_completes() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let (pair, frozen) = pair_through_proxy(ReplicationProtocol::C, &p, &s).await;
    pair.primary
        .submit_write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();

    frozen.store(true, Ordering::SeqCst);
    let started = Instant::now();
    pair.primary
        .submit_write(8192, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    let took = started.elapsed();
    // dead_after is 1 s in these tests; detection must come well before the 30 s ack timeout.
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(
        pair.oos.lock().unwrap().clone(),
        vec![("secondary".to_string(), 8192, 4096)]
    );
    assert!(pair.primary.connected_peers().is_empty());
    let exit = tokio::time::timeout(Duration::from_secs(5), pair.secondary)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(exit, LinkDown::Unresponsive(_)), "{exit:?}");
}

/// A peer whose link stays alive (it answers pings) but whose disk holds a write past
/// `peer_ack_timeout` is disconnected (DRBD's ko-count): the write completes from the local
/// disk, naming the peer, and its range is reported out of sync. The deadline is the
/// Primary task's one timer (`PrimaryCore::poll_timeout`), not a timer per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_silent_past_the_ack_timeout_is_disconnected_and_the_write_completes() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let protocol = ReplicationProtocol::C;
    let (plink, slink) = tcp_links(protocol, p.dev.size()).await;
    let oos: OosLog = Arc::default();
    let log = oos.clone();
    let hook: OutOfSyncHook = Arc::new(move |peer: &str, offset, len| {
        log.lock().unwrap().push((peer.to_string(), offset, len));
    });
    let cfg = PrimaryConfig {
        peer_ack_timeout: Duration::from_millis(500),
        ..PrimaryConfig::new(protocol)
    };
    let primary = Primary::new(p.dev.clone(), cfg, hook);
    primary.attach_peer(plink);
    let secondary = tokio::spawn(run_secondary(slink, s.dev.clone(), Default::default()));
    primary
        .submit_write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    s.dev.set_gate(false);
    let started = Instant::now();
    let done = tokio::time::timeout(
        Duration::from_secs(10),
        primary.write_request(8192, Bytes::from(vec![2u8; 4096]), false),
    )
    .await;
    let took = started.elapsed();
    // Open the gate before any assertion: a blocked device thread would hold the runtime.
    s.dev.set_gate(true);
    let done = done
        .expect("the write must not wait for a stuck peer past the ack timeout")
        .unwrap();
    assert!(took >= Duration::from_millis(500), "took {took:?}");
    assert_eq!(done.unacknowledged, vec!["secondary".to_string()]);
    assert_eq!(
        oos.lock().unwrap().clone(),
        vec![("secondary".to_string(), 8192, 4096)]
    );
    assert!(primary.connected_peers().is_empty());
    let mut back = vec![0u8; 4096];
    p.dev.read_at(&mut back, 8192).unwrap();
    assert!(back.iter().all(|&b| b == 2));
    let exit = tokio::time::timeout(Duration::from_secs(5), secondary)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(exit, LinkDown::PeerClosed), "{exit:?}");
}

/// A request handed to the Primary is carried through even if its caller gives up: the
/// write still reaches both disks and nothing is reported out of sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_caller_gives_up_is_still_replicated() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    s.dev.set_gate(false);
    let primary = pair.primary.clone();
    let write = tokio::spawn(async move {
        primary
            .submit_write(4096, Bytes::from(vec![0x3C; 4096]), false)
            .await
    });
    let reached = wait_for(Duration::from_secs(5), || {
        s.dev.writes_started.load(Ordering::SeqCst) > 0
    })
    .await;
    write.abort();
    let aborted = write.await;
    s.dev.set_gate(true);
    assert!(reached, "the write never reached the secondary");
    assert!(aborted.unwrap_err().is_cancelled());
    tokio::time::timeout(Duration::from_secs(5), pair.primary.wait_replicated())
        .await
        .expect("the abandoned write is still acknowledged by the peer");
    // A flush orders after the write's completion on both sides.
    pair.primary.flush().await.unwrap();
    assert!(pair.oos.lock().unwrap().is_empty());
    assert_eq!(sha256_file(&p.path), sha256_file(&s.path));
    let mut back = vec![0u8; 4096];
    s.dev.read_at(&mut back, 4096).unwrap();
    assert!(back.iter().all(|&b| b == 0x3C));
}

/// Under protocol A a silent peer first fills the link's send budget (the application
/// blocks, as DRBD blocks on a full send buffer), then is declared dead: every write
/// completes, and every write the peer did not acknowledge is reported out of sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_under_a_blocks_writers_only_until_it_is_declared_dead() {
    let p = disk(128 * MIB);
    let s = disk(128 * MIB);
    let (pair, frozen) = pair_through_proxy(ReplicationProtocol::A, &p, &s).await;
    frozen.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..128u64 {
        let primary = pair.primary.clone();
        tasks.spawn(async move {
            primary
                .submit_write(i * MIB, Bytes::from(vec![i as u8; MIB as usize]), false)
                .await
                .unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(pair.primary.connected_peers().is_empty());
    // Every MiB written after the freeze is marked for the peer.
    let mut marked = [false; 128];
    for (peer, offset, len) in pair.oos.lock().unwrap().iter() {
        assert_eq!(peer, "secondary");
        assert_eq!(*len, MIB);
        marked[(*offset / MIB) as usize] = true;
    }
    let unmarked: Vec<usize> = (0..128).filter(|&i| !marked[i]).collect();
    assert!(unmarked.is_empty(), "unmarked MiB: {unmarked:?}");
}

/// The Secondary's disk fails a write: the Secondary does not acknowledge it and
/// disconnects (an UpToDate-looking replica must not lack an acknowledged write); the
/// application write completes from the local disk, naming the peer as not having it, and
/// the range is reported out of sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_fails_a_write_disconnects_and_the_range_is_out_of_sync() {
    let p = disk(MIB);
    let s = disk(MIB);
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    s.dev.fail_writes.store(true, Ordering::SeqCst);
    let done = pair
        .primary
        .write_request(4096, Bytes::from(vec![4u8; 4096]), false)
        .await
        .unwrap();
    assert_eq!(done.unacknowledged, vec!["secondary".to_string()]);
    assert_eq!(
        pair.oos.lock().unwrap().clone(),
        vec![("secondary".to_string(), 4096, 4096)]
    );
    let exit = pair.secondary.await.unwrap();
    assert!(
        matches!(exit, Err(DatapathError::Local { op: "write", .. })),
        "{exit:?}"
    );
    assert!(pair.primary.connected_peers().is_empty());
}

/// Log lines captured by a subscriber installed on the test's thread (a current-thread
/// runtime runs every task there).
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines_with(&self, text: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(text))
            .map(String::from)
            .collect()
    }
}

const ENOSPC_TEXT: &str = "No space left on device (os error 28)";

/// Issue 22: a Secondary whose disk is full must say so. The error it returns, the Error
/// frame the Primary receives and the log line name the OS error with the volume, the
/// offset and the length; a reconnect that fails the same way is counted, not logged again
/// (one [`FailureLog`] per replica across links).
#[tokio::test(flavor = "current_thread")]
async fn a_full_disk_on_the_secondary_names_the_os_error_once_per_interval() {
    let log = CapturedLog::default();
    let _guard = log.install();
    let p = disk(MIB);
    let s = disk(MIB);
    s.dev.fail_writes.store(true, Ordering::SeqCst);
    let failures = Arc::new(FailureLog::new(Duration::from_secs(3600)));
    for attempt in 0..2 {
        let cfg = SecondaryConfig {
            local_failures: failures.clone(),
            ..SecondaryConfig::default()
        };
        let pair = pair_with(ReplicationProtocol::C, p.dev.clone(), s.dev.clone(), cfg).await;
        let done = pair
            .primary
            .write_request(8192, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(done.unacknowledged, vec!["secondary".to_string()]);
        let e = pair.secondary.await.unwrap().unwrap_err();
        assert_eq!(
            error_chain(&e),
            format!("local write failed: write at offset 8192 length 4096 failed: {ENOSPC_TEXT}"),
            "attempt {attempt}"
        );
        // The Primary learns the cause from the Error frame.
        let peer_view = "peer disconnected; its pending requests are out of sync";
        assert!(
            wait_for(Duration::from_secs(5), || log.lines_with(peer_view).len()
                == attempt + 1)
            .await,
            "{:?}",
            log.lines_with("")
        );
        for line in log.lines_with(peer_view) {
            assert!(line.contains(ENOSPC_TEXT), "{line}");
        }
    }
    let lines = log.lines_with("this replica could not apply a request");
    assert_eq!(lines.len(), 1, "one line per interval: {lines:?}");
    let line = &lines[0];
    for part in [
        "ERROR",
        "volume=vol",
        "peer=primary",
        "suppressed=0",
        "write at offset 8192 length 4096",
        ENOSPC_TEXT,
    ] {
        assert!(line.contains(part), "{part} missing in: {line}");
    }
}

async fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// A Secondary's write-intent log for tests: ranges starting in an even MiB are hot (taken
/// without waiting), the others must be taken on the blocking pool; a range starting at
/// `refuse` cannot be taken. Taking and releasing are recorded in the device's events.
struct TestIntentLog {
    dev: Arc<TestDevice>,
    refuse: u64,
    without_waiting: AtomicUsize,
    blocking: AtomicUsize,
}

impl WriteIntentLog for TestIntentLog {
    fn try_begin(&self, offset: u64, _len: u64) -> bool {
        let hot = (offset / MIB).is_multiple_of(2) && offset != self.refuse;
        if hot {
            self.without_waiting.fetch_add(1, Ordering::SeqCst);
            self.dev.events.lock().unwrap().push(Event::Logged(offset));
        }
        hot
    }
    fn begin(&self, offset: u64, _len: u64) -> Result<(), String> {
        if offset == self.refuse {
            return Err("metadata disk failed".into());
        }
        self.blocking.fetch_add(1, Ordering::SeqCst);
        self.dev.events.lock().unwrap().push(Event::Logged(offset));
        Ok(())
    }
    fn end(&self, offset: u64, _len: u64) {
        self.dev
            .events
            .lock()
            .unwrap()
            .push(Event::Released(offset));
    }
}

/// With a write-intent log, the Secondary takes each request's range before its device
/// sees the request and releases it after: inline when the log can take it at once, on the
/// blocking pool otherwise. A request the log refuses is not applied, and the Secondary
/// disconnects (the Primary reports the range out of sync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secondary_logs_every_request_range_before_applying_it() {
    let p = disk(8 * MIB);
    let s = disk(8 * MIB);
    p.dev.cached.store(true, Ordering::SeqCst);
    s.dev.cached.store(true, Ordering::SeqCst);
    let refuse = 7 * MIB + 64 * 1024;
    let log = Arc::new(TestIntentLog {
        dev: s.dev.clone(),
        refuse,
        without_waiting: AtomicUsize::new(0),
        blocking: AtomicUsize::new(0),
    });
    let cfg = SecondaryConfig {
        write_intent: Some(WriteIntentHooks(log.clone())),
        ..SecondaryConfig::default()
    };
    let pair = pair_with(ReplicationProtocol::C, p.dev.clone(), s.dev.clone(), cfg).await;
    let mut offsets = Vec::new();
    for mib in 0..8u64 {
        for block in 0..4u64 {
            let off = mib * MIB + block * 8192;
            offsets.push(off);
            let data = Bytes::from(vec![(off / 8192 % 251) as u8 + 1; 4096]);
            pair.primary.submit_write(off, data, false).await.unwrap();
        }
    }
    pair.primary.submit_trim(6 * MIB, MIB, false).await.unwrap();
    offsets.push(6 * MIB);
    pair.primary.flush().await.unwrap();
    assert!(pair.oos.lock().unwrap().is_empty());
    assert_eq!(sha256_file(&p.path), sha256_file(&s.path));
    let events = s.dev.events.lock().unwrap().clone();
    let pos = |e: Event| events.iter().position(|x| *x == e);
    for off in offsets {
        let order = [
            Event::Logged(off),
            Event::Start(off),
            Event::End(off),
            Event::Released(off),
        ]
        .map(|e| pos(e).unwrap_or_else(|| panic!("{e:?} missing: {events:?}")));
        assert!(order.is_sorted(), "offset {off}: {order:?} in {events:?}");
    }
    assert!(log.without_waiting.load(Ordering::SeqCst) >= 16);
    assert!(log.blocking.load(Ordering::SeqCst) >= 16);

    // A request the log refuses never reaches the disk, and the Secondary disconnects.
    let done = pair
        .primary
        .write_request(refuse, Bytes::from(vec![9u8; 4096]), false)
        .await
        .unwrap();
    assert_eq!(done.unacknowledged, vec!["secondary".to_string()]);
    assert_eq!(
        pair.oos.lock().unwrap().clone(),
        vec![("secondary".to_string(), refuse, 4096)]
    );
    let exit = pair.secondary.await.unwrap();
    assert!(
        matches!(exit, Err(DatapathError::WriteIntent(_))),
        "{exit:?}"
    );
    assert!(!s.dev.events.lock().unwrap().contains(&Event::Start(refuse)));
}

/// Extension messages (the lead's UUID/bitmap/resync traffic) pass through the data path
/// in both directions to the configured sinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_messages_reach_their_sinks_both_ways() {
    let p = disk(MIB);
    let s = disk(MIB);
    let (plink, slink) = tcp_links(ReplicationProtocol::C, MIB).await;
    let primary = Primary::new(
        p.dev.clone(),
        PrimaryConfig::new(ReplicationProtocol::C),
        Arc::new(|_: &str, _, _| {}),
    );
    let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel();
    primary.set_extension_sink(ptx);
    primary.attach_peer(plink);
    let (stx, mut srx) = tokio::sync::mpsc::unbounded_channel();
    let secondary_sender = slink.sender.clone();
    tokio::spawn(run_secondary(
        slink,
        s.dev.clone(),
        SecondaryConfig {
            extensions: Some(stx),
            ..SecondaryConfig::default()
        },
    ));
    let ext = |t: u16, body: &'static [u8]| Message::Extension {
        msg_type: t,
        flags: 0,
        payload: Bytes::from_static(body),
    };
    primary
        .peer_sender("secondary")
        .unwrap()
        .send(&ext(0x0101, b"uuids"))
        .await
        .unwrap();
    assert_eq!(srx.recv().await.unwrap(), ext(0x0101, b"uuids"));
    secondary_sender
        .send(&ext(0x0102, b"bitmap"))
        .await
        .unwrap();
    assert_eq!(
        prx.recv().await.unwrap(),
        ("secondary".to_string(), ext(0x0102, b"bitmap"))
    );
}

/// What an engine's holds released, in order: (offset, len, tag).
#[derive(Default)]
struct RecordedReleases(Mutex<Vec<(u64, u64, u64)>>);

impl ReleaseHolds for RecordedReleases {
    fn release_holds(&self, offset: u64, len: u64, tag: u64) {
        self.0.lock().unwrap().push((offset, len, tag));
    }

    fn unacknowledged_after_cancel(&self, _peers: &[String], _links_before: u64) {}
}

/// Opens a device's gate when dropped, also when the test fails (the runtime's shutdown
/// waits for a write held on the blocking pool).
struct OpenOnDrop(Arc<TestDevice>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.set_gate(true);
    }
}

/// The holds submitted with a request come back with its completion (the submitter
/// releases them after it has the outcome); when the submitter's future is dropped while
/// the local write is in flight, the volume task releases them, and only once that write
/// completed: never while the device may still be writing the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_of_a_dropped_request_are_released_only_after_its_local_write() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let released = Arc::new(RecordedReleases::default());
    let holds = |tag| {
        let gate = gate.clone().try_read_owned().unwrap();
        Holds::new(Some(gate), released.clone(), 8192, 4096, tag, 0)
    };
    let write = || Op::Write {
        data: Bytes::from(vec![0x3C; 4096]),
        fua: false,
    };

    // A submitter that waits gets its holds back, still held.
    let (done, back) = pair.primary.submit_held(8192, write(), holds(1)).await;
    done.unwrap();
    assert!(released.0.lock().unwrap().is_empty());
    assert!(gate.try_write().is_err());
    back.release();
    assert_eq!(*released.0.lock().unwrap(), vec![(8192, 4096, 1)]);
    assert!(gate.try_write().is_ok());

    // A submitter that goes away while the local write is held on the device.
    p.dev.set_gate(false);
    let _open = OpenOnDrop(p.dev.clone());
    let started = p.dev.writes_started.load(Ordering::SeqCst);
    {
        let submit = pair.primary.submit_held(8192, write(), holds(2));
        tokio::pin!(submit);
        let t0 = Instant::now();
        while p.dev.writes_started.load(Ordering::SeqCst) == started {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the write never reached the disk"
            );
            tokio::select! {
                r = &mut submit => panic!("completed with the device held: {:?}", r.0),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        released.0.lock().unwrap().len(),
        1,
        "released while the write was held"
    );
    assert!(
        gate.try_write().is_err(),
        "gate free while the write was held"
    );

    p.dev.set_gate(true);
    let t0 = Instant::now();
    while released.0.lock().unwrap().len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(5), "never released");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(released.0.lock().unwrap()[1], (8192, 4096, 2));
    assert!(gate.try_write().is_ok());
    pair.primary.wait_replicated().await;
    assert_eq!(sha256_file(&p.path), sha256_file(&s.path));
}

/// What an engine was told about requests whose submitter went away: (peers, links note).
#[derive(Default)]
struct RecordedCancels(Mutex<Vec<(Vec<String>, u64)>>);

impl ReleaseHolds for RecordedCancels {
    fn release_holds(&self, _offset: u64, _len: u64, _tag: u64) {}

    fn unacknowledged_after_cancel(&self, peers: &[String], links_before: u64) {
        self.0.lock().unwrap().push((peers.to_vec(), links_before));
    }
}

/// Waits until `dev` has started more writes than `before`.
async fn wait_write_started(dev: &TestDevice, before: usize) {
    let t0 = Instant::now();
    while dev.writes_started.load(Ordering::SeqCst) <= before {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the write never reached the disk"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A request whose submitter went away is finished by the volume task. If a peer did not
/// acknowledge it (lost while it was in flight), the engine is told which one, with the
/// links note the request was submitted with: the submitter can no longer make sure that
/// peer gets the range. A request every peer acknowledged tells nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_requests_unacknowledged_peers_are_handed_to_the_engine() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    let cancels = Arc::new(RecordedCancels::default());
    let submit_and_drop = |links_before| {
        let holds = Holds::new(None, cancels.clone(), 8192, 4096, 1, links_before);
        let op = Op::Write {
            data: Bytes::from(vec![0x5A; 4096]),
            fua: false,
        };
        let submit = pair.primary.submit_held(8192, op, holds);
        async move {
            // Polled until the request is in the task, then dropped.
            let _ = tokio::time::timeout(Duration::from_millis(50), submit).await;
        }
    };

    // Acknowledged by the peer after the submitter left: nothing to hand over.
    p.dev.set_gate(false);
    let open = OpenOnDrop(p.dev.clone());
    let before = p.dev.writes_started.load(Ordering::SeqCst);
    submit_and_drop(3).await;
    wait_write_started(&p.dev, before).await;
    drop(open);
    pair.primary.wait_replicated().await;
    assert!(cancels.0.lock().unwrap().is_empty());

    // The peer is lost while it holds the request: it is handed over.
    let _open = OpenOnDrop(s.dev.clone());
    s.dev.set_gate(false);
    let before = s.dev.writes_started.load(Ordering::SeqCst);
    submit_and_drop(7).await;
    wait_write_started(&s.dev, before).await;
    pair.secondary_sender.close("simulated crash");
    let t0 = Instant::now();
    while cancels.0.lock().unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5), "never handed over");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        *cancels.0.lock().unwrap(),
        vec![(vec!["secondary".to_string()], 7)]
    );
    s.dev.set_gate(true);
    let _ = pair.secondary.await.unwrap();
}

/// Write at 8192 while the Secondary's disk holds every write (so the peer never
/// acknowledges it), then submit a write at 65536 that panics the Primary's volume task.
/// Returns both answers and the ranges marked out of sync, sorted.
async fn panic_after_an_unacknowledged_write(
    protocol: ReplicationProtocol,
    fail_once_at: Option<u64>,
) -> (
    Result<(), DatapathError>,
    Result<(), DatapathError>,
    Vec<(String, u64, u64)>,
    usize,
) {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair_with_hook(
        protocol,
        p.dev.clone(),
        s.dev.clone(),
        SecondaryConfig::default(),
        fail_once_at,
    )
    .await;
    s.dev.set_gate(false);
    let _open = OpenOnDrop(s.dev.clone());
    let submit = |offset| {
        let primary = pair.primary.clone();
        tokio::spawn(async move {
            primary
                .submit_write(offset, Bytes::from(vec![0x5D; 4096]), false)
                .await
        })
    };
    let answer = |write: JoinHandle<Result<(), DatapathError>>| async move {
        tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .expect("no answer")
            .unwrap()
    };
    let unacknowledged = submit(8192);
    let reached_both = wait_for(Duration::from_secs(5), || {
        p.dev.writes_started.load(Ordering::SeqCst) == 1
            && s.dev.writes_started.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(reached_both, "the first write never reached both disks");
    // Under A it is answered once on the local disk, still pending on the peer.
    let first = match protocol {
        ReplicationProtocol::A => Ok(answer(unacknowledged).await),
        _ => Err(unacknowledged),
    };
    p.dev.panic_on_async_write.store(true, Ordering::SeqCst);
    let second = answer(submit(65536)).await;
    let first = match first {
        Ok(answered) => answered,
        Err(waiting) => answer(waiting).await,
    };
    let mut marked = pair.oos.lock().unwrap().clone();
    marked.sort();
    marked.dedup();
    (
        first,
        second,
        marked,
        pair.failed_marks.load(Ordering::SeqCst),
    )
}

/// A panic on the volume task leaves no request silently unreplicated: a write on the
/// local disk that its peer has not acknowledged, and the write that panicked, are both
/// marked out of sync for the peer, so a reconnect resyncs them. Under protocol C the
/// first write is still waiting for its peer (in the task's table); under A it was
/// answered already and only the core remembers it is pending on the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_volume_task_marks_its_unfinished_writes_out_of_sync() {
    let expected = vec![
        ("secondary".to_string(), 8192, 4096),
        ("secondary".to_string(), 65536, 4096),
    ];
    for protocol in [ReplicationProtocol::C, ReplicationProtocol::A] {
        let (first, second, marked, _) = panic_after_an_unacknowledged_write(protocol, None).await;
        assert!(matches!(second, Err(DatapathError::Stopped)), "{second:?}");
        match protocol {
            ReplicationProtocol::C => {
                assert!(matches!(first, Err(DatapathError::Stopped)), "{first:?}")
            }
            _ => assert!(first.is_ok()),
        }
        assert_eq!(marked, expected, "{protocol:?}");
    }
}

/// The engine's hook panicking while a panicked volume task marks its writes (the drop runs
/// during the unwind) does not abort the process: the failed mark is caught and the other
/// marks are still made. Under protocol C the first write is marked twice (it is in the
/// table and pending on the peer), so failing its first mark loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_mark_while_a_volume_task_unwinds_does_not_abort_the_process() {
    let (first, second, marked, failed) =
        panic_after_an_unacknowledged_write(ReplicationProtocol::C, Some(8192)).await;
    assert!(matches!(first, Err(DatapathError::Stopped)), "{first:?}");
    assert!(matches!(second, Err(DatapathError::Stopped)), "{second:?}");
    assert_eq!(
        failed, 1,
        "the hook was never asked to mark the first write"
    );
    assert_eq!(
        marked,
        vec![
            ("secondary".to_string(), 8192, 4096),
            ("secondary".to_string(), 65536, 4096),
        ]
    );
}

/// Releases holds by panicking (a bug in the engine's bookkeeping); counts the calls.
#[derive(Default)]
struct PanickingReleases(AtomicUsize);

impl ReleaseHolds for PanickingReleases {
    fn release_holds(&self, _offset: u64, _len: u64, _tag: u64) {
        self.0.fetch_add(1, Ordering::SeqCst);
        panic!("test: releasing holds fails");
    }

    fn unacknowledged_after_cancel(&self, _peers: &[String], _links_before: u64) {}
}

/// Releasing a request's holds panics while its volume task, which panicked, is dropped
/// during the unwind, and again for each write still running on the disk once it ends:
/// each is caught, so the process goes on, every submitter is answered and every release
/// is still attempted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_release_while_a_volume_task_unwinds_does_not_abort_the_process() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    let releases = Arc::new(PanickingReleases::default());
    let write = |offset, tag| {
        let holds = Holds::new(None, releases.clone(), offset, 4096, tag, 0);
        let op = Op::Write {
            data: Bytes::from(vec![0x6B; 4096]),
            fua: false,
        };
        let primary = pair.primary.clone();
        tokio::spawn(async move { primary.submit_held(offset, op, holds).await.0 })
    };
    // Two writes running on the local disk (their holds wait for it, on a task of their
    // own), then one whose start panics the volume task (its holds go in the drop).
    p.dev.set_gate(false);
    let open = OpenOnDrop(p.dev.clone());
    let mut writes = Vec::new();
    for (offset, tag) in [(8192, 1), (16384, 2)] {
        let before = p.dev.writes_started.load(Ordering::SeqCst);
        writes.push(write(offset, tag));
        wait_write_started(&p.dev, before).await;
    }
    p.dev.panic_on_async_write.store(true, Ordering::SeqCst);
    writes.push(write(65536, 3));
    for write in writes {
        let answer = tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .expect("no answer")
            .unwrap();
        assert!(matches!(answer, Err(DatapathError::Stopped)), "{answer:?}");
    }
    assert_eq!(releases.0.load(Ordering::SeqCst), 1, "the drop's release");
    drop(open);
    let t0 = Instant::now();
    while releases.0.load(Ordering::SeqCst) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the running writes' holds were never released"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Under protocol A two writes are answered while the peer still holds them; the link is
/// lost, and the hook panics marking the first (on the volume task, which fails). The
/// second, which the core had queued to be marked when the panic came, is still marked
/// when the task is dropped: only the failed mark is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_the_core_queued_before_a_failing_mark_are_made_when_the_task_drops() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair_with_hook(
        ReplicationProtocol::A,
        p.dev.clone(),
        s.dev.clone(),
        SecondaryConfig::default(),
        Some(8192),
    )
    .await;
    s.dev.set_gate(false);
    let _open = OpenOnDrop(s.dev.clone());
    for offset in [8192, 65536] {
        let before = s.dev.writes_started.load(Ordering::SeqCst);
        pair.primary
            .submit_write(offset, Bytes::from(vec![0x5D; 4096]), false)
            .await
            .expect("answered under A once on the local disk");
        if offset == 8192 {
            wait_write_started(&s.dev, before).await;
        }
    }
    pair.secondary_sender.close("simulated crash");
    let t0 = Instant::now();
    while pair.failed_marks.load(Ordering::SeqCst) == 0 || pair.oos.lock().unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5), "nothing marked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        *pair.oos.lock().unwrap(),
        vec![("secondary".to_string(), 65536, 4096)]
    );
}

/// A panic on the volume task does not release the holds of a request whose local write is
/// still running: they are released once the disk is done with it. The other request's
/// holds (it never reached the disk) go at once, and both submitters get `Stopped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_volume_task_keeps_a_running_writes_holds_until_its_disk_write_ends() {
    let p = disk(4 * MIB);
    let s = disk(4 * MIB);
    let pair = pair(ReplicationProtocol::C, p.dev.clone(), s.dev.clone()).await;
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let released = Arc::new(RecordedReleases::default());
    let submit = |offset, tag| {
        let held = gate.clone().try_read_owned().unwrap();
        let holds = Holds::new(Some(held), released.clone(), offset, 4096, tag, 0);
        let op = Op::Write {
            data: Bytes::from(vec![0x6B; 4096]),
            fua: false,
        };
        let primary = pair.primary.clone();
        tokio::spawn(async move { primary.submit_held(offset, op, holds).await.0 })
    };

    p.dev.set_gate(false);
    let _open = OpenOnDrop(p.dev.clone());
    let before = p.dev.writes_started.load(Ordering::SeqCst);
    let running = submit(8192, 1);
    wait_write_started(&p.dev, before).await;
    p.dev.panic_on_async_write.store(true, Ordering::SeqCst);
    let panicked = submit(65536, 2);
    for (name, write) in [("running", running), ("panicked", panicked)] {
        let answer = tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .unwrap_or_else(|_| panic!("the {name} write got no answer"))
            .unwrap();
        assert!(
            matches!(answer, Err(DatapathError::Stopped)),
            "{name}: {answer:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *released.0.lock().unwrap(),
        vec![(65536, 4096, 2)],
        "only the write that never reached the disk is released"
    );
    assert!(gate.try_write().is_err(), "gate free under a running write");

    p.dev.set_gate(true);
    let t0 = Instant::now();
    // The owner's release comes first, the gate's right after it.
    while released.0.lock().unwrap().len() < 2 || gate.try_write().is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5), "never released");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(released.0.lock().unwrap()[1], (8192, 4096, 1));
}
