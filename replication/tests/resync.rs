//! Resync, checksum resync and online verify end to end: a Primary (`datapath::Primary`)
//! and a Secondary (`datapath::run_secondary`) over real TCP loopback links, with sparse
//! temp-file devices.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};
use replication::auth::Secret;
use replication::bitmap::Bitmap;
use replication::datapath::{
    run_secondary, DatapathError, OutOfSyncHook, Primary, PrimaryConfig, SecondaryConfig,
};
use replication::device::{BackingDevice, DeviceError, FileDevice};
use replication::link::{LinkConfig, LinkDown, PeerLink};
use replication::resync::proto::is_resync_type;
use replication::resync::{
    run_resync_source, PeerChannel, ResyncBitmap, ResyncConfig, ResyncError, ResyncOutcome,
    ResyncProgress, ResyncSummary, ResyncTarget, ResyncTargetHooks, SourceIo,
};
use replication::verify::{run_verify, VerifyReport};
use replication::wire::{Hello, Message, ReplicationProtocol};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Disk {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dev: Arc<FileDevice>,
}

fn disk(size: u64) -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    File::create(&path).unwrap().set_len(size).unwrap();
    let dev = Arc::new(FileDevice::open(&path).unwrap());
    Disk {
        _dir: dir,
        path,
        dev,
    }
}

/// Byte-compare two files (sparse 2 GiB files: faster than hashing them in a debug build).
fn assert_same_content(a: &Path, b: &Path) {
    let mut fa = File::open(a).unwrap();
    let mut fb = File::open(b).unwrap();
    let len = fa.metadata().unwrap().len();
    assert_eq!(len, fb.metadata().unwrap().len());
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!("replicas differ at byte {}", off + i as u64);
        }
        off += n as u64;
    }
}

fn write_file_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// A source device that, once armed, holds its next read *after* reading the data (up to
/// a timeout), so a test can issue an application write in the window between a resync
/// or verify read and the exchange with the peer.
struct GatedReads {
    dev: Arc<FileDevice>,
    armed: AtomicBool,
    read_done: tokio::sync::Notify,
    released: Mutex<bool>,
    cond: std::sync::Condvar,
}

impl GatedReads {
    fn new(dev: Arc<FileDevice>) -> Arc<GatedReads> {
        Arc::new(GatedReads {
            dev,
            armed: AtomicBool::new(false),
            read_done: tokio::sync::Notify::new(),
            released: Mutex::new(false),
            cond: std::sync::Condvar::new(),
        })
    }
    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

impl BackingDevice for GatedReads {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.dev.read_at(buf, offset)?;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.read_done.notify_one();
            let released = self.released.lock().unwrap();
            let _ = self
                .cond
                .wait_timeout_while(released, Duration::from_secs(5), |r| !*r)
                .unwrap();
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.dev.write_at(buf, offset)
    }
    fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.dev.write_at_durable(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.dev.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.dev.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DeviceError> {
        self.dev.write_zeroes(offset, len, may_unmap)
    }
    fn set_size(&self, size: u64) {
        self.dev.set_size(size)
    }
}

fn secret() -> Secret {
    Secret::new(b"test secret".to_vec()).unwrap()
}

/// Dead-peer detection at 3 s: these tests load both cores of a debug build (the hammer
/// tests run 8 writers), and a starved link task must not look like a dead peer.
fn link_cfg() -> LinkConfig {
    LinkConfig {
        ping_interval: Duration::from_millis(100),
        dead_after: Duration::from_millis(3000),
        ..LinkConfig::default()
    }
}

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

/// The engine's target side, recording what it is told.
#[derive(Default)]
struct RecordingTarget {
    written_bytes: AtomicU64,
    finished: Mutex<Vec<ResyncSummary>>,
    fail_finish: AtomicBool,
}

impl ResyncTarget for RecordingTarget {
    fn written(&self, _offset: u64, len: u64) {
        self.written_bytes.fetch_add(len, Ordering::SeqCst);
    }
    fn finished(&self, summary: &ResyncSummary) -> Result<(), String> {
        if self.fail_finish.load(Ordering::SeqCst) {
            return Err("metadata disk full".into());
        }
        self.finished.lock().unwrap().push(*summary);
        Ok(())
    }
}

type RepliesSlot = Arc<Mutex<Option<mpsc::UnboundedSender<Message>>>>;

/// A Primary with the out-of-sync bitmap for "secondary", and the engine's forwarding of
/// resync replies from the extension sink into the running session.
struct Source {
    primary: Primary,
    bitmap: Arc<Mutex<Bitmap>>,
    replies: RepliesSlot,
}

impl Source {
    fn new(dev: Arc<dyn BackingDevice>, protocol: ReplicationProtocol) -> Source {
        let bitmap = Arc::new(Mutex::new(Bitmap::new(dev.size())));
        let bm = bitmap.clone();
        let hook: OutOfSyncHook = Arc::new(move |_peer: &str, offset, len| {
            bm.lock().unwrap().set_range(offset, len).unwrap();
        });
        let primary = Primary::new(dev, PrimaryConfig::new(protocol), hook);
        primary.set_known_peers(&["secondary".to_string()]);
        let replies: RepliesSlot = Arc::default();
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Message)>();
        primary.set_extension_sink(tx);
        let slot = replies.clone();
        tokio::spawn(async move {
            while let Some((_peer, msg)) = rx.recv().await {
                if is_resync_type(msg.msg_type()) {
                    if let Some(tx) = slot.lock().unwrap().as_ref() {
                        let _ = tx.send(msg);
                    }
                }
            }
        });
        Source {
            primary,
            bitmap,
            replies,
        }
    }

    fn channel(&self) -> PeerChannel {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.replies.lock().unwrap() = Some(tx);
        PeerChannel {
            sender: self.primary.peer_sender("secondary").unwrap(),
            replies: rx,
        }
    }

    fn dyn_bitmap(&self) -> Arc<dyn ResyncBitmap> {
        self.bitmap.clone()
    }

    fn dirty(&self) -> u64 {
        self.bitmap.lock().unwrap().dirty_bytes()
    }

    async fn resync(&self, cfg: &ResyncConfig) -> Result<ResyncOutcome, ResyncError> {
        run_resync_source(
            SourceIo::Primary(self.primary.clone()),
            self.channel(),
            self.dyn_bitmap(),
            cfg,
            Arc::new(ResyncProgress::default()),
        )
        .await
    }

    /// [`Self::resync`] as a task, reporting to `progress`.
    fn spawn_resync(
        &self,
        cfg: &ResyncConfig,
        progress: &Arc<ResyncProgress>,
    ) -> JoinHandle<Result<ResyncOutcome, ResyncError>> {
        let (io, ch, bm, cfg, pr) = (
            SourceIo::Primary(self.primary.clone()),
            self.channel(),
            self.dyn_bitmap(),
            cfg.clone(),
            progress.clone(),
        );
        tokio::spawn(async move { run_resync_source(io, ch, bm, &cfg, pr).await })
    }

    async fn verify(&self, cfg: &ResyncConfig) -> VerifyReport {
        run_verify(
            SourceIo::Primary(self.primary.clone()),
            self.channel(),
            self.dyn_bitmap(),
            cfg,
            Arc::new(ResyncProgress::default()),
        )
        .await
        .unwrap()
    }

    /// Write random data while the secondary is not attached: the bitmap records it.
    async fn diverge(&self, seed: u64, writes: usize, len: usize, region: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..writes {
            let offset = rng.gen_range(0..(region - len as u64) / 4096) * 4096;
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            self.primary
                .submit_write(offset, Bytes::from(data), false)
                .await
                .unwrap();
        }
    }
}

type SecondaryTask = JoinHandle<Result<LinkDown, DatapathError>>;

/// Connect the secondary (on `dev`) to the Primary: attach the link, start run_secondary.
async fn connect(
    src: &Source,
    dev: Arc<FileDevice>,
    protocol: ReplicationProtocol,
    target: Arc<RecordingTarget>,
) -> SecondaryTask {
    let (plink, slink) = tcp_links(protocol, dev.size()).await;
    src.primary.attach_peer(plink);
    let cfg = SecondaryConfig {
        resync_target: Some(ResyncTargetHooks(target)),
        ..SecondaryConfig::default()
    };
    tokio::spawn(run_secondary(slink, dev, cfg))
}

fn unlimited() -> ResyncConfig {
    ResyncConfig {
        max_rate_bytes_per_sec: 0,
        ..ResyncConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_resync_of_16_mib_on_a_2_gib_volume_sends_at_most_twice_the_changes() {
    let p = disk(2 * GIB);
    let s = disk(2 * GIB);
    let src = Source::new(p.dev.clone(), ReplicationProtocol::C);
    // 16 MiB written while the link is cut: 256 writes of 64 KiB anywhere in 2 GiB.
    src.diverge(1, 256, 64 << 10, 2 * GIB).await;
    let changed = src.dirty();
    assert!(changed > 8 * MIB && changed <= 16 * MIB, "{changed}");

    let target = Arc::new(RecordingTarget::default());
    let _sec = connect(&src, s.dev.clone(), ReplicationProtocol::C, target.clone()).await;
    let started = Instant::now();
    let outcome = src.resync(&ResyncConfig::default()).await.unwrap();
    eprintln!(
        "resync of {changed} bytes took {:?}: {outcome:?}",
        started.elapsed()
    );

    assert_eq!(outcome.total_bytes, changed);
    assert!(outcome.sent_bytes <= 2 * 16 * MIB, "{outcome:?}");
    assert_eq!(outcome.sent_bytes, changed);
    assert_eq!(
        target.written_bytes.load(Ordering::SeqCst),
        outcome.sent_bytes
    );
    assert_eq!(
        *target.finished.lock().unwrap(),
        vec![ResyncSummary {
            sent_bytes: changed,
            skipped_bytes: 0
        }]
    );
    assert_eq!(src.dirty(), 0);
    assert_same_content(&p.path, &s.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rate_limits_reach_a_running_resync() {
    let size = 64 * MIB;
    let p = disk(size);
    let s = disk(size);
    let src = Source::new(p.dev.clone(), ReplicationProtocol::C);
    src.diverge(7, 256, 64 << 10, size).await;
    let changed = src.dirty();
    assert!(changed > 8 * MIB, "{changed}");
    let _sec = connect(
        &src,
        s.dev.clone(),
        ReplicationProtocol::C,
        Arc::new(RecordingTarget::default()),
    )
    .await;
    // At 1 MiB/s the resync would take well over 8 s.
    let cfg = ResyncConfig {
        max_rate_bytes_per_sec: MIB,
        min_rate_bytes_per_sec: MIB,
        chunk_bytes: 64 << 10,
        ..ResyncConfig::default()
    };
    let progress = Arc::new(ResyncProgress::default());
    let started = std::time::Instant::now();
    let run = src.spawn_resync(&cfg, &progress);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = progress.snapshot().done_bytes;
    assert!(early < 2 * MIB, "paced at 1 MiB/s, yet {early} bytes done");
    // What a live `tandem volume set --resync-max-rate` does: the next chunks go faster.
    progress.set_limits(replication::resync::rate::Limits {
        min: MIB,
        max: 1 << 30,
        plan_ahead: Duration::from_secs(2),
    });
    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the resync did not finish after its max rate was raised")
        .unwrap()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(6),
        "{changed} bytes took {elapsed:?}: the new max rate was not applied"
    );
    assert_eq!(outcome.total_bytes, changed);
    assert_eq!(src.dirty(), 0);
    assert_same_content(&p.path, &s.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_resync_resumes_and_sends_only_the_rest() {
    let size = 256 * MIB;
    let p = disk(size);
    let s = disk(size);
    let src = Source::new(p.dev.clone(), ReplicationProtocol::C);
    src.diverge(2, 512, 64 << 10, size).await;
    let changed = src.dirty();

    let target = Arc::new(RecordingTarget::default());
    let sec = connect(&src, s.dev.clone(), ReplicationProtocol::C, target.clone()).await;
    // Slow enough to cut it halfway: about 2 s for the whole resync.
    let cfg = ResyncConfig {
        max_rate_bytes_per_sec: changed / 2,
        min_rate_bytes_per_sec: 0,
        chunk_bytes: 256 << 10,
        ..ResyncConfig::default()
    };
    let progress = Arc::new(ResyncProgress::default());
    let run = src.spawn_resync(&cfg, &progress);
    let halfway = async {
        while progress.snapshot().done_bytes < changed / 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), halfway)
        .await
        .expect("the resync never got halfway");
    assert!(src
        .primary
        .disconnect_peer("secondary", "test cuts the link"));
    let err = run.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ResyncError::LinkDown { .. } | ResyncError::RepliesClosed { .. }
        ),
        "{err}"
    );
    let _ = sec.await;
    assert!(target.finished.lock().unwrap().is_empty());
    let first = target.written_bytes.load(Ordering::SeqCst);
    let rest = src.dirty();
    assert!(rest > 0 && rest < changed, "rest {rest} of {changed}");
    // What is left is what was not acknowledged (in-flight chunks are sent again).
    let in_flight = cfg.max_inflight_chunks as u64 * cfg.chunk_bytes;
    assert!(
        first + rest <= changed + in_flight,
        "{first} + {rest} vs {changed}"
    );

    let target2 = Arc::new(RecordingTarget::default());
    let _sec = connect(&src, s.dev.clone(), ReplicationProtocol::C, target2.clone()).await;
    let outcome = src.resync(&unlimited()).await.unwrap();
    assert_eq!(outcome.sent_bytes, rest);
    assert_eq!(target2.written_bytes.load(Ordering::SeqCst), rest);
    assert_eq!(target2.finished.lock().unwrap().len(), 1);
    assert_same_content(&p.path, &s.path);
}

/// Resync while the application hammers overlapping writes at the same blocks: every
/// resync chunk races writes to its own range.
async fn resync_under_overlapping_writes(protocol: ReplicationProtocol, checksums: bool) {
    let size = 64 * MIB;
    let region = 8 * MIB;
    let p = disk(size);
    let s = disk(size);
    let src = Source::new(p.dev.clone(), protocol);
    // Everything in the region differs.
    src.diverge(3, 128, 64 << 10, region).await;
    src.bitmap.lock().unwrap().set_range(0, region).unwrap();

    let target = Arc::new(RecordingTarget::default());
    let sec = connect(&src, s.dev.clone(), protocol, target.clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let primary = src.primary.clone();
        let stop = stop.clone();
        writers.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + w);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let offset = rng.gen_range(0..region / 512 - 256) * 512;
                let len = rng.gen_range(1..=256usize) * 512;
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                primary
                    .submit_write(offset, Bytes::from(data), false)
                    .await
                    .unwrap();
                n += 1;
                // An application, not a flood: under protocol A a flood only measures
                // how far the secondary lags (every resync answer waits behind it).
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            n
        });
    }
    let cfg = ResyncConfig {
        max_rate_bytes_per_sec: 8 * MIB,
        min_rate_bytes_per_sec: 4 * MIB,
        chunk_bytes: 64 << 10,
        checksums,
        ..ResyncConfig::default()
    };
    let outcome = src.resync(&cfg).await;
    if outcome.is_err() {
        src.primary.disconnect_peer("secondary", "test failed");
        panic!("{outcome:?}; secondary: {:?}", sec.await.unwrap());
    }
    let outcome = outcome.unwrap();
    stop.store(true, Ordering::SeqCst);
    let mut writes = 0;
    while let Some(n) = writers.join_next().await {
        writes += n.unwrap();
    }
    src.primary.flush().await.unwrap();
    src.primary.wait_replicated().await;
    eprintln!("{protocol} checksums={checksums}: {outcome:?}, {writes} concurrent writes");
    assert!(
        writes > 50,
        "too few concurrent writes to mean anything: {writes}"
    );
    assert_eq!(src.dirty(), 0);
    assert_same_content(&p.path, &s.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_concurrent_with_overlapping_writes_ends_identical_under_c() {
    resync_under_overlapping_writes(ReplicationProtocol::C, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_concurrent_with_overlapping_writes_ends_identical_under_a() {
    resync_under_overlapping_writes(ReplicationProtocol::A, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_resync_concurrent_with_overlapping_writes_ends_identical() {
    resync_under_overlapping_writes(ReplicationProtocol::C, true).await;
}

/// Same random data on both replicas in the first `len` bytes.
fn fill_both(p: &Disk, s: &Disk, seed: u64, len: usize) {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    write_file_at(&p.path, 0, &data);
    write_file_at(&s.path, 0, &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_resync_skips_equal_blocks_and_fixes_differing_ones() {
    let size = 16 * MIB;
    let p = disk(size);
    let s = disk(size);
    fill_both(&p, &s, 4, 8 << 20);
    let src = Source::new(p.dev.clone(), ReplicationProtocol::C);
    let target = Arc::new(RecordingTarget::default());
    let _sec = connect(&src, s.dev.clone(), ReplicationProtocol::C, target.clone()).await;
    let cfg = ResyncConfig {
        checksums: true,
        ..unlimited()
    };

    // A full sync of identical replicas moves no data.
    src.bitmap.lock().unwrap().set_all();
    let outcome = src.resync(&cfg).await.unwrap();
    assert_eq!(outcome.sent_bytes, 0, "{outcome:?}");
    assert_eq!(outcome.skipped_bytes, size);
    assert_eq!(target.written_bytes.load(Ordering::SeqCst), 0);
    assert_eq!(target.finished.lock().unwrap()[0].sent_bytes, 0);

    // Corrupt three blocks (one of them partially) on the secondary: only those move.
    write_file_at(&s.path, 5 * 4096, &[0xAB; 4096]);
    write_file_at(&s.path, 7 * MIB + 100, &[0xCD; 10]);
    write_file_at(&s.path, 12 * MIB, &[0xEF; 4096]); // beyond the data: was zero
    src.bitmap.lock().unwrap().set_all();
    let outcome = src.resync(&cfg).await.unwrap();
    assert_eq!(outcome.sent_bytes, 3 * 4096, "{outcome:?}");
    assert_eq!(outcome.skipped_bytes, size - 3 * 4096);
    assert_eq!(target.written_bytes.load(Ordering::SeqCst), 3 * 4096);
    assert_same_content(&p.path, &s.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_exactly_the_corrupted_blocks() {
    let size = 16 * MIB;
    let p = disk(size);
    let s = disk(size);
    fill_both(&p, &s, 5, 8 << 20);
    let src = Source::new(p.dev.clone(), ReplicationProtocol::C);
    let target = Arc::new(RecordingTarget::default());
    let _sec = connect(&src, s.dev.clone(), ReplicationProtocol::C, target).await;

    let report = src.verify(&unlimited()).await;
    assert_eq!(
        report,
        VerifyReport {
            checked_bytes: size,
            differing_blocks: 0,
            differing_bytes: 0
        }
    );
    assert_eq!(src.dirty(), 0);

    let corrupted = [3 * 4096, 4 * 4096, 5 * MIB, 11 * MIB + 4096, size - 4096];
    for off in corrupted {
        write_file_at(&s.path, off + 17, &[0x5A; 3]);
    }
    let report = src.verify(&unlimited()).await;
    assert_eq!(report.checked_bytes, size);
    assert_eq!(report.differing_blocks, corrupted.len() as u64);
    assert_eq!(report.differing_bytes, corrupted.len() as u64 * 4096);
    let marked: Vec<(u64, u64)> = src.bitmap.lock().unwrap().runs().collect();
    assert_eq!(
        marked,
        vec![
            (3 * 4096, 8192),
            (5 * MIB, 4096),
            (11 * MIB + 4096, 4096),
            (size - 4096, 4096)
        ]
    );
    // Verify does not repair; the next resync does.
    let outcome = src.resync(&unlimited()).await.unwrap();
    assert_eq!(outcome.sent_bytes, corrupted.len() as u64 * 4096);
    assert_same_content(&p.path, &s.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_under_concurrent_overlapping_writes_finds_no_false_differences() {
    for protocol in [ReplicationProtocol::C, ReplicationProtocol::A] {
        let size = 16 * MIB;
        let p = disk(size);
        let s = disk(size);
        let src = Source::new(p.dev.clone(), protocol);
        let target = Arc::new(RecordingTarget::default());
        let _sec = connect(&src, s.dev.clone(), protocol, target).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..8u64 {
            let primary = src.primary.clone();
            let stop = stop.clone();
            writers.spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(200 + w);
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let offset = rng.gen_range(0..size / 512 - 256) * 512;
                    let len = rng.gen_range(1..=256usize) * 512;
                    let mut data = vec![0u8; len];
                    rng.fill_bytes(&mut data);
                    primary
                        .submit_write(offset, Bytes::from(data), false)
                        .await
                        .unwrap();
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                n
            });
        }
        let cfg = ResyncConfig {
            max_rate_bytes_per_sec: 16 * MIB,
            min_rate_bytes_per_sec: 8 * MIB,
            chunk_bytes: 64 << 10,
            ..ResyncConfig::default()
        };
        let report = src.verify(&cfg).await;
        stop.store(true, Ordering::SeqCst);
        let mut writes = 0;
        while let Some(n) = writers.join_next().await {
            writes += n.unwrap();
        }
        eprintln!("{protocol}: {report:?} with {writes} concurrent writes");
        assert!(writes > 50, "{writes}");
        assert_eq!(report.checked_bytes, size);
        assert_eq!(report.differing_blocks, 0, "{protocol}");
        assert_eq!(src.dirty(), 0);
        src.primary.flush().await.unwrap();
        src.primary.wait_replicated().await;
        assert_same_content(&p.path, &s.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_is_roughly_respected() {
    let size = 64 * MIB;
    let p = disk(size);
    let s = disk(size);
    let src = Source::new(p.dev.clone(), ReplicationProtocol::C);
    src.diverge(6, 64, 64 << 10, size).await;
    let changed = src.dirty();
    let target = Arc::new(RecordingTarget::default());
    let _sec = connect(&src, s.dev.clone(), ReplicationProtocol::C, target).await;
    let limit = 2 * MIB;
    let cfg = ResyncConfig {
        max_rate_bytes_per_sec: limit,
        min_rate_bytes_per_sec: 0,
        chunk_bytes: 64 << 10,
        ..ResyncConfig::default()
    };
    let started = Instant::now();
    let outcome = src.resync(&cfg).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    let rate = outcome.sent_bytes as f64 / secs;
    eprintln!(
        "{} bytes in {secs:.2} s = {rate:.0} B/s (limit {limit})",
        outcome.sent_bytes
    );
    assert_eq!(outcome.sent_bytes, changed);
    assert!(rate <= 1.3 * limit as f64, "rate {rate} vs limit {limit}");
    assert_same_content(&p.path, &s.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_source_resyncs_over_a_plain_link() {
    // Neither side is Primary: the source reads its device directly and handles the
    // link's receiver itself (what the engine does on a link without a Primary).
    let size = 32 * MIB;
    let p = disk(size);
    let s = disk(size);
    fill_both(&p, &s, 7, 8 << 20);
    write_file_at(&p.path, 2 * MIB, &[0x11; 3 * 4096]);
    let bitmap = Arc::new(Mutex::new(Bitmap::new(size)));
    bitmap.lock().unwrap().set_range(2 * MIB, 3 * 4096).unwrap();
    let (slink, tlink) = tcp_links(ReplicationProtocol::C, size).await;
    let target = Arc::new(RecordingTarget::default());
    let cfg = SecondaryConfig {
        resync_target: Some(ResyncTargetHooks(target.clone())),
        ..SecondaryConfig::default()
    };
    let _t = tokio::spawn(run_secondary(tlink, s.dev.clone(), cfg));
    let PeerLink {
        sender,
        mut receiver,
        ..
    } = slink;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = receiver.recv().await {
            let _ = tx.send(msg);
        }
    });
    let outcome = run_resync_source(
        SourceIo::Device(p.dev.clone()),
        PeerChannel {
            sender,
            replies: rx,
        },
        bitmap.clone(),
        &unlimited(),
        Arc::new(ResyncProgress::default()),
    )
    .await
    .unwrap();
    assert_eq!(outcome.sent_bytes, 3 * 4096);
    assert_eq!(target.finished.lock().unwrap().len(), 1);
    assert_same_content(&p.path, &s.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_cannot_record_the_end_fails_the_source() {
    let size = 16 * MIB;
    let p = disk(size);
    let s = disk(size);
    let src = Source::new(p.dev.clone(), ReplicationProtocol::C);
    src.diverge(8, 4, 64 << 10, size).await;
    let target = Arc::new(RecordingTarget::default());
    target.fail_finish.store(true, Ordering::SeqCst);
    let _sec = connect(&src, s.dev.clone(), ReplicationProtocol::C, target).await;
    let err = src.resync(&unlimited()).await.unwrap_err();
    assert!(
        matches!(&err, ResyncError::TargetFinish(m) if m.contains("disk full")),
        "{err}"
    );
}

/// The race the range lock exists for, forced: an application write to the same blocks
/// lands between the source's read of a chunk and the exchange with the peer. Without the
/// lock a resync would leave the target with the old data (bitmap clean), and a verify
/// would report a false difference.
async fn write_in_the_read_window(protocol: ReplicationProtocol, verify: bool) {
    let size = 4 * MIB;
    let p = disk(size);
    let s = disk(size);
    let gated = GatedReads::new(p.dev.clone());
    let src = Source::new(gated.clone(), protocol);
    let target = Arc::new(RecordingTarget::default());
    let _sec = connect(&src, s.dev.clone(), protocol, target).await;
    if !verify {
        src.bitmap.lock().unwrap().set_range(0, 64 << 10).unwrap();
    }
    let cfg = ResyncConfig {
        chunk_bytes: 64 << 10,
        max_inflight_chunks: 1,
        ..unlimited()
    };
    gated.armed.store(true, Ordering::SeqCst);
    let read_done = gated.read_done.notified();
    let run = {
        let (primary, ch, bm) = (src.primary.clone(), src.channel(), src.dyn_bitmap());
        tokio::spawn(async move {
            let io = SourceIo::Primary(primary);
            let progress = Arc::new(ResyncProgress::default());
            if verify {
                let r = run_verify(io, ch, bm, &cfg, progress).await.unwrap();
                r.differing_blocks
            } else {
                run_resync_source(io, ch, bm, &cfg, progress).await.unwrap();
                0
            }
        })
    };
    read_done.await;
    // The first chunk [0, 64 KiB) is read and held; write into it now.
    let writer = {
        let primary = src.primary.clone();
        tokio::spawn(async move {
            primary
                .submit_write(8192, Bytes::from(vec![0x77u8; 4096]), false)
                .await
                .unwrap();
        })
    };
    // Give an unguarded write ample time to reach both disks inside the window.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gated.release();
    let differing = run.await.unwrap();
    writer.await.unwrap();
    src.primary.flush().await.unwrap();
    src.primary.wait_replicated().await;
    assert_eq!(
        differing, 0,
        "{protocol}: a write in flight was reported as a difference"
    );
    assert_eq!(src.dirty(), 0);
    assert_same_content(&p.path, &s.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_the_resync_read_window_is_not_reverted_under_c() {
    write_in_the_read_window(ReplicationProtocol::C, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_the_resync_read_window_is_not_reverted_under_a() {
    write_in_the_read_window(ReplicationProtocol::A, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_the_verify_read_window_is_not_a_false_difference() {
    write_in_the_read_window(ReplicationProtocol::C, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_data_beyond_the_volume_or_malformed_is_rejected_and_the_device_untouched() {
    use replication::resync::proto::{ResyncMsg, DATA};
    let size = 4 * MIB;
    for bad in [
        ResyncMsg::Data {
            id: 1,
            offset: size - 4096,
            data: Bytes::from(vec![1u8; 8192]),
        }
        .to_message(),
        Message::Extension {
            msg_type: DATA,
            flags: 0,
            payload: Bytes::from_static(&[0u8; 12]),
        },
    ] {
        let s = disk(size);
        let (plink, slink) = tcp_links(ReplicationProtocol::C, size).await;
        let sec = tokio::spawn(run_secondary(
            slink,
            s.dev.clone(),
            SecondaryConfig::default(),
        ));
        plink.sender.send(&bad).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), sec)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                result,
                Err(DatapathError::PeerOutOfRange { .. } | DatapathError::PeerProtocol(_))
            ),
            "{result:?}"
        );
        let data = std::fs::read(&s.path).unwrap();
        assert!(data.iter().all(|&b| b == 0), "the device was written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_of_zeroes_are_sent_as_zeroes_not_data() {
    let size = 16 * MIB;
    let p = disk(size);
    let s = disk(size);
    // The target has data where the source reads zeroes (trimmed while disconnected),
    // and the source has data elsewhere.
    write_file_at(&s.path, MIB, &vec![0x42u8; MIB as usize]);
    write_file_at(&p.path, 4 * MIB, &vec![0x24u8; 8192]);
    let src = Source::new(p.dev.clone(), ReplicationProtocol::C);
    src.bitmap.lock().unwrap().set_range(MIB, MIB).unwrap();
    src.bitmap.lock().unwrap().set_range(4 * MIB, 8192).unwrap();
    let target = Arc::new(RecordingTarget::default());
    let _sec = connect(&src, s.dev.clone(), ReplicationProtocol::C, target.clone()).await;
    let outcome = src.resync(&unlimited()).await.unwrap();
    assert_eq!(outcome.sent_bytes, MIB + 8192, "{outcome:?}");
    assert_eq!(outcome.zero_bytes, MIB, "{outcome:?}");
    assert_eq!(target.written_bytes.load(Ordering::SeqCst), MIB + 8192);
    assert_same_content(&p.path, &s.path);
}
