//! In-process clusters for the replica engine tests: several `ReplicationNode`s on
//! 127.0.0.1 ports with temp-file devices, every dialled link running through a TCP proxy
//! that can be cut (connections closed, new ones refused) and healed.

#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use replication::activity_log::DEFAULT_AL_EXTENTS;
use replication::auth::Secret;
use replication::device::{BackingDevice, FileDevice};
use replication::link::LinkConfig;
use replication::replica::{
    EngineTunables, NodeConfig, PeerSpec, Replica, ReplicaOptions, ReplicaSpec, ReplicaStatus,
    ReplicationNode,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const VOLUME: &str = "vm-100-disk-0";

/// A TCP forwarder that can be cut and healed, or frozen (bytes stop moving, nothing is
/// closed).
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c2, k2, f2) = (cut.clone(), conns.clone(), frozen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if c2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let f = f2.clone();
                let h = tokio::spawn(async move {
                    if let Ok(out) = TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = out.set_nodelay(true);
                        let (ir, iw) = inbound.into_split();
                        let (or, ow) = out.into_split();
                        tokio::join!(forward(&f, ir, ow), forward(&f, or, iw));
                    }
                });
                k2.lock().unwrap().push(h);
            }
        });
        Proxy {
            addr,
            cut,
            frozen,
            conns,
            task,
        }
    }

    /// Stop moving bytes in both directions; connections stay open. What was in flight is
    /// lost, so `cut` before `heal`.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Close every forwarded connection and refuse new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.frozen.store(false, Ordering::SeqCst);
    }
}

/// Copy `r` to `w` until either ends or `frozen` is set.
pub async fn forward(frozen: &AtomicBool, mut r: OwnedReadHalf, mut w: OwnedWriteHalf) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Swallow this and stop reading: the sender's buffers fill up, as on a dead
            // cable; both sockets stay open.
            std::future::pending::<()>().await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

pub struct Host {
    pub name: String,
    pub diskless: bool,
    pub addr: SocketAddr,
    pub node: Option<Arc<ReplicationNode>>,
    pub replica: Option<Arc<Replica>>,
    pub disk: PathBuf,
    pub meta: PathBuf,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub size: u64,
    pub options: ReplicaOptions,
    pub tunables: EngineTunables,
    pub hosts: Vec<Host>,
    /// (dialer, acceptor) -> proxy the dialer uses.
    pub proxies: BTreeMap<(String, String), Proxy>,
}

pub fn secret() -> Secret {
    Secret::new(b"replica test secret".to_vec()).unwrap()
}

pub fn link_config() -> LinkConfig {
    LinkConfig {
        ping_interval: Duration::from_millis(200),
        dead_after: Duration::from_millis(1000),
        ..LinkConfig::default()
    }
}

/// Shorter waits than the defaults, so scenarios do not sit in reconnect backoff; a
/// promotion waits 1 s for a peer whose link just ended.
pub fn tunables() -> EngineTunables {
    EngineTunables {
        reconnect_grace: Duration::from_secs(1),
        reconnect_interval: Duration::from_millis(250),
        ..EngineTunables::default()
    }
}

async fn start_node(
    name: &str,
    addr: SocketAddr,
    tunables: &EngineTunables,
) -> Arc<ReplicationNode> {
    let mut tries = 0;
    loop {
        match ReplicationNode::start(NodeConfig {
            name: name.to_string(),
            listen: addr,
            secret: secret(),
            link: link_config(),
            tunables: tunables.clone(),
        })
        .await
        {
            Ok(n) => return n,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("start {name} on {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("start {name}: {e}"),
        }
    }
}

/// Log to the test output when RUST_LOG is set.
pub fn init_log() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

impl Cluster {
    /// Hosts named in `data` hold replicas; `witnesses` are diskless tiebreakers.
    pub async fn new(
        data: &[&str],
        witnesses: &[&str],
        size: u64,
        options: ReplicaOptions,
    ) -> Cluster {
        Cluster::with_tunables(data, witnesses, size, options, tunables()).await
    }

    /// [`Cluster::new`] with every node's engine on `tunables`.
    pub async fn with_tunables(
        data: &[&str],
        witnesses: &[&str],
        size: u64,
        options: ReplicaOptions,
        tunables: EngineTunables,
    ) -> Cluster {
        init_log();
        let dir = tempfile::tempdir().unwrap();
        let mut hosts = Vec::new();
        for (name, diskless) in data
            .iter()
            .map(|n| (n, false))
            .chain(witnesses.iter().map(|n| (n, true)))
        {
            let node = start_node(name, "127.0.0.1:0".parse().unwrap(), &tunables).await;
            let disk = dir.path().join(format!("{name}.img"));
            let meta = dir.path().join(format!("{name}.meta"));
            if !diskless {
                let f = std::fs::File::create(&disk).unwrap();
                f.set_len(size).unwrap();
                // Like the daemon: every other node of the volume, tiebreakers included.
                let peers: Vec<&str> = data
                    .iter()
                    .chain(witnesses.iter())
                    .copied()
                    .filter(|p| p != name)
                    .collect();
                ReplicationNode::create_metadata(
                    &meta,
                    size,
                    0xD0D0_0000_0000_0010,
                    &peers,
                    DEFAULT_AL_EXTENTS,
                )
                .unwrap();
            }
            hosts.push(Host {
                name: name.to_string(),
                diskless,
                addr: node.local_addr(),
                node: Some(node),
                replica: None,
                disk,
                meta,
            });
        }
        let mut proxies = BTreeMap::new();
        for a in &hosts {
            for b in &hosts {
                if a.name < b.name {
                    proxies.insert((a.name.clone(), b.name.clone()), Proxy::start(b.addr).await);
                }
            }
        }
        let mut c = Cluster {
            dir,
            size,
            options,
            tunables,
            hosts,
            proxies,
        };
        for i in 0..c.hosts.len() {
            c.open(i).await;
        }
        c
    }

    pub fn idx(&self, name: &str) -> usize {
        self.hosts.iter().position(|h| h.name == name).unwrap()
    }

    /// Wait until each of `names` has an Established link to every other one, and quorum.
    pub async fn wait_fully_connected(&self, names: &[&str]) {
        for name in names {
            let others: Vec<&str> = names.iter().copied().filter(|o| o != name).collect();
            wait_for(&self.r(name), "fully connected", 10, |s| {
                others.iter().all(|o| established(s, o)) && s.quorum
            })
            .await;
        }
    }

    pub fn r(&self, name: &str) -> Arc<Replica> {
        self.hosts[self.idx(name)].replica.clone().unwrap()
    }

    fn spec(&self, i: usize) -> ReplicaSpec {
        let me = &self.hosts[i];
        let peers = self
            .hosts
            .iter()
            .filter(|h| h.name != me.name)
            .map(|h| PeerSpec {
                name: h.name.clone(),
                replication: if me.name < h.name {
                    self.proxies[&(me.name.clone(), h.name.clone())].addr
                } else {
                    h.addr
                },
                diskless: h.diskless,
            })
            .collect();
        ReplicaSpec {
            volume: VOLUME.to_string(),
            peers,
            meta_dir: me.meta.clone(),
            options: self.options.clone(),
        }
    }

    async fn open(&mut self, i: usize) {
        self.open_on(i, |d| d).await;
    }

    /// Open host `i`'s replica on `wrap` of its file device (diskless: no device).
    async fn open_on(
        &mut self,
        i: usize,
        wrap: impl FnOnce(Arc<dyn BackingDevice>) -> Arc<dyn BackingDevice>,
    ) {
        let spec = self.spec(i);
        let h = &mut self.hosts[i];
        let device: Option<Arc<dyn BackingDevice>> = if h.diskless {
            None
        } else {
            Some(wrap(Arc::new(FileDevice::open(&h.disk).unwrap())))
        };
        let r = h
            .node
            .as_ref()
            .unwrap()
            .open_replica(spec, device)
            .await
            .unwrap();
        h.replica = Some(r);
    }

    /// Close a host's replica cleanly (its node keeps running).
    pub async fn close(&mut self, name: &str) {
        let i = self.idx(name);
        self.hosts[i].replica = None;
        self.hosts[i]
            .node
            .as_ref()
            .unwrap()
            .close_replica(VOLUME)
            .await
            .unwrap();
    }

    /// Open a closed host's replica again.
    pub async fn reopen(&mut self, name: &str) {
        let i = self.idx(name);
        self.open(i).await;
    }

    /// Close a host's replica cleanly and open it again on `wrap` of its file device (a
    /// test device that pauses or fails I/O around the real one).
    pub async fn reopen_on(
        &mut self,
        name: &str,
        wrap: impl FnOnce(Arc<dyn BackingDevice>) -> Arc<dyn BackingDevice>,
    ) {
        self.close(name).await;
        let i = self.idx(name);
        self.open_on(i, wrap).await;
    }

    /// Kill a host: its node is dropped (no clean close).
    pub fn kill(&mut self, name: &str) {
        let i = self.idx(name);
        self.hosts[i].replica = None;
        self.hosts[i].node = None;
    }

    /// Start a killed host again on the same address, from its metadata.
    pub async fn restart(&mut self, name: &str) {
        let i = self.idx(name);
        let node = start_node(name, self.hosts[i].addr, &self.tunables).await;
        self.hosts[i].node = Some(node);
        self.open(i).await;
    }

    /// Cut every link of `name` (both directions, new connections refused). Links to
    /// tiebreakers go first: an isolated node must not get a last message out through the
    /// witness after its data link broke (in-process, EOFs are seen within microseconds,
    /// so a simultaneous cut would still be staged in some order).
    pub async fn isolate(&self, name: &str) {
        let diskless: Vec<&str> = self
            .hosts
            .iter()
            .filter(|h| h.diskless)
            .map(|h| h.name.as_str())
            .collect();
        for pass in [true, false] {
            for ((a, b), p) in &self.proxies {
                let involves = a == name || b == name;
                let to_witness = diskless.contains(&a.as_str()) || diskless.contains(&b.as_str());
                if involves && to_witness == pass {
                    p.cut();
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub fn heal_all(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }

    pub fn cut(&self, a: &str, b: &str) {
        self.proxy(a, b).cut();
    }

    /// The proxy of the link between `a` and `b`.
    pub fn proxy(&self, a: &str, b: &str) -> &Proxy {
        let key = if a < b {
            (a.to_string(), b.to_string())
        } else {
            (b.to_string(), a.to_string())
        };
        &self.proxies[&key]
    }

    /// Start a new data host `name` that joins the running volume (`Replica::add_peer` on
    /// the others is the caller's job): a fresh sparse disk, JUST_CREATED metadata, links
    /// straight to the other hosts (no proxies). Returns the spec the others add.
    pub async fn join(&mut self, name: &str) -> PeerSpec {
        let node = start_node(name, "127.0.0.1:0".parse().unwrap(), &self.tunables).await;
        let disk = self.dir.path().join(format!("{name}.img"));
        let meta = self.dir.path().join(format!("{name}.meta"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(self.size)
            .unwrap();
        let others: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
        ReplicationNode::create_metadata_inconsistent(
            &meta,
            self.size,
            &others,
            DEFAULT_AL_EXTENTS,
        )
        .unwrap();
        let spec = ReplicaSpec {
            volume: VOLUME.to_string(),
            peers: self
                .hosts
                .iter()
                .map(|h| PeerSpec {
                    name: h.name.clone(),
                    replication: h.addr,
                    diskless: h.diskless,
                })
                .collect(),
            meta_dir: meta.clone(),
            options: self.options.clone(),
        };
        let device: Arc<dyn BackingDevice> = Arc::new(FileDevice::open(&disk).unwrap());
        let replica = node.open_replica(spec, Some(device)).await.unwrap();
        let addr = node.local_addr();
        self.hosts.push(Host {
            name: name.to_string(),
            diskless: false,
            addr,
            node: Some(node),
            replica: Some(replica),
            disk,
            meta,
        });
        PeerSpec {
            name: name.to_string(),
            replication: addr,
            diskless: false,
        }
    }

    /// `len` bytes at `offset` of a host's disk file, read directly.
    pub fn disk_bytes(&self, name: &str, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(&self.hosts[self.idx(name)].disk).unwrap();
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    pub fn disk_hash(&self, name: &str) -> String {
        let bytes = std::fs::read(&self.hosts[self.idx(name)].disk).unwrap();
        hex(&Sha256::digest(&bytes))
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic pseudo-random bytes.
pub fn data(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

pub fn peer<'a>(s: &'a ReplicaStatus, name: &str) -> &'a replication::replica::PeerStatus {
    s.peers.iter().find(|p| p.node == name).unwrap()
}

/// Promote `r`, retrying every 200 ms (it may be refused while the cluster still settles,
/// e.g. before the old Primary's loss is processed); panic with its status after `secs`.
pub async fn promote_within(r: &Replica, secs: u64) {
    for _ in 0..secs * 5 {
        match r.promote().await {
            Ok(()) => return,
            Err(e) => eprintln!("promote {}: {e}", r.node_name()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{} was never promoted: {:#?}", r.node_name(), r.status());
}

/// Wait until `pred` holds on `r`'s status, else panic with the status.
pub async fn wait_for(
    r: &Replica,
    what: &str,
    secs: u64,
    pred: impl FnMut(&ReplicaStatus) -> bool,
) -> ReplicaStatus {
    let (s, ok) = r.wait_status(Duration::from_secs(secs), pred).await;
    assert!(ok, "timed out waiting for {what}; status: {s:#?}");
    s
}

pub fn established(s: &ReplicaStatus, peer_name: &str) -> bool {
    s.peers.iter().any(|p| {
        p.node == peer_name
            && p.connection == replication::role::ConnectionState::Connected
            && p.replication == replication::role::ReplicationState::Established
    })
}

/// Wait until `a` and `b` are connected, Established and UpToDate on both sides with no
/// out-of-sync bytes (a resync in between finished).
pub async fn wait_converged(a: &Replica, b: &Replica, secs: u64) {
    let (an, bn) = (a.node_name().to_string(), b.node_name().to_string());
    let ok = |s: &ReplicaStatus, other: &str| {
        let p = peer(s, other);
        established(s, other)
            && s.disk_state == replication::role::DiskState::UpToDate
            && p.disk_state == replication::role::DiskState::UpToDate
            && p.out_of_sync_bytes == 0
    };
    wait_for(a, "converged", secs, |s| ok(s, &bn)).await;
    wait_for(b, "converged", secs, |s| ok(s, &an)).await;
}
