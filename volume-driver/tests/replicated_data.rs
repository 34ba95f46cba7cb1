//! The frontend path of a replicated volume with the real engine, in one process: two
//! `VolumeService`s on loopback (peer control API and replication listener each), a volume
//! created with two replicas, I/O through `Exports` as the NBD server does it. Checks that
//! acknowledged writes are on both replicas' disks byte for byte, that a writer on the
//! Secondary is refused with the engine's message while the other node is Primary, that a
//! Secondary serves no reads, and that the last writer closing demotes.

#![allow(clippy::unwrap_used)] // a test: unwrapping is asserting

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use control_api::{ConnectionState, DiskState, Role};
use replication::auth::load_secret;
use volume_driver::config::Config;
use volume_driver::engine_adapter::ReplicationEngine;
use volume_driver::frontend::{Exports, OpenError};
use volume_driver::peer;
use volume_driver::service::VolumeService;

struct Node {
    service: Arc<VolumeService>,
    root: std::path::PathBuf,
}

/// `n` distinct loopback ports that were free a moment ago (all held at once, so no port is
/// handed out twice).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

async fn start_node(name: &str, root: &Path, secret: &Path, nodes_toml: &str) -> Node {
    let text = format!(
        "node = \"{name}\"\nstate_dir = \"{root}/state\"\nrun_dir = \"{root}/run\"\n\
         secret_file = \"{secret}\"\n{nodes_toml}\n[[pools]]\nname = \"files\"\n\
         backend = \"file\"\npath = \"{root}/images\"\n",
        root = root.display(),
        secret = secret.display()
    );
    let config = Config::parse(&text, Path::new("test.toml")).unwrap();
    let secret = config.load_secret().unwrap().unwrap();
    let this = config.this_node().unwrap().clone();
    let engine = ReplicationEngine::start(name, this.replication, secret.clone(), &config.engine)
        .await
        .unwrap();
    let service = Arc::new(VolumeService::open_with(config, engine, Some(secret.clone())).unwrap());
    service.start_replicas().await;
    let listener = peer::bind(this.control).await.unwrap();
    tokio::spawn(peer::serve(listener, Arc::clone(&service), secret));
    Node {
        service,
        root: root.to_path_buf(),
    }
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..300 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn connected(node: &Node, volume: &str) -> bool {
    let s = node.service.status(volume).unwrap();
    s.replica.disk_state == DiskState::UpToDate
        && s.replica.peers.iter().all(|p| {
            p.connection == ConnectionState::Connected && p.disk_state == DiskState::UpToDate
        })
}

fn image(node: &Node, volume: &str) -> Vec<u8> {
    std::fs::read(node.root.join(format!("images/{volume}.img"))).unwrap()
}

async fn two_nodes() -> (tempfile::TempDir, Node, Node) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "data-test-secret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(load_secret(&secret).is_ok());
    let ports = free_ports(4);
    let nodes_toml: String = ["hv1", "hv2"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                "[[nodes]]\nname = \"{n}\"\ncontrol = \"127.0.0.1:{}\"\nreplication = \"127.0.0.1:{}\"\n",
                ports[2 * i],
                ports[2 * i + 1]
            )
        })
        .collect();
    let (r1, r2) = (dir.path().join("hv1"), dir.path().join("hv2"));
    let hv1 = start_node("hv1", &r1, &secret, &nodes_toml).await;
    let hv2 = start_node("hv2", &r2, &secret, &nodes_toml).await;

    (dir, hv1, hv2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_right_after_the_peer_promoted_is_refused() {
    let (_dir, hv1, hv2) = two_nodes().await;
    hv1.service
        .create("race", 4 << 20, None, Some(2), None, None)
        .await
        .unwrap();
    for round in 0..20 {
        wait_for("both replicas connected", || {
            connected(&hv1, "race") && connected(&hv2, "race")
        })
        .await;
        hv1.service.promote("race").await.unwrap();
        let second = hv2.service.promote("race").await;
        assert!(
            second.is_err(),
            "round {round}: hv2 was promoted while hv1 is Primary (two Primaries)"
        );
        hv1.service.demote("race").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_both_disks_and_roles_follow_the_writers() {
    let (dir, hv1, hv2) = two_nodes().await;
    let (r1, r2) = (dir.path().join("hv1"), dir.path().join("hv2"));
    hv1.service
        .create("data", 8 << 20, None, Some(2), None, None)
        .await
        .unwrap();
    wait_for("both replicas connected", || {
        connected(&hv1, "data") && connected(&hv2, "data")
    })
    .await;

    // A Secondary serves no reads.
    match hv2.service.open("data", false).await {
        Err(OpenError::Refused(m)) => assert!(m.contains("Secondary"), "{m}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a Secondary was opened for reading"),
    }

    // A writer on hv1 promotes it.
    let writer = hv1.service.open("data", true).await.unwrap();
    let status = hv1.service.status("data").unwrap();
    assert_eq!(status.replica.role, Role::Primary);
    assert_eq!(status.open_writers, 1);
    assert!(!status.promoted_explicitly);

    // Meanwhile a writer on hv2 is refused with the engine's message. (Waiting until hv2 knows
    // hv1 is Primary keeps the expected message exact; a promote racing the commit is refused
    // too, with "being promoted", see `a_promote_right_after_the_peer_promoted_is_refused`.)
    wait_for("hv2 sees hv1 Primary", || {
        hv2.service.status("data").unwrap().replica.peers[0].role == Role::Primary
    })
    .await;
    match hv2.service.open("data", true).await {
        Err(OpenError::Refused(m)) => assert!(m.contains("Primary on hv1"), "{m}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("two writers on two nodes"),
    }

    // Writes (plain, FUA, zeroes, trim) are on both disks once acknowledged (protocol C).
    let mut pattern = vec![0u8; 256 << 10];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    writer
        .write(1 << 20, Bytes::from(pattern.clone()), false)
        .await
        .unwrap();
    writer
        .write(5 << 20, Bytes::from(vec![0xA5; 4096]), true)
        .await
        .unwrap();
    writer
        .write((8 << 20) - 4096, Bytes::from(vec![0x3C; 4096]), false)
        .await
        .unwrap();
    writer
        .write_zeroes((1 << 20) + 4096, 8192, false)
        .await
        .unwrap();
    writer.flush().await.unwrap();
    let read = writer.read(1 << 20, 256 << 10).await.unwrap();
    let mut expected = pattern.clone();
    expected[4096..12288].fill(0);
    assert_eq!(&read[..], &expected[..]);
    let (a, b) = (image(&hv1, "data"), image(&hv2, "data"));
    assert_eq!(a.len(), 8 << 20);
    assert!(
        a == b,
        "the replicas' disks differ after acknowledged writes"
    );
    assert_eq!(&a[(1 << 20)..(1 << 20) + (256 << 10)], &expected[..]);
    assert_eq!(&a[5 << 20..(5 << 20) + 4096], &[0xA5; 4096][..]);

    // A beyond-the-end request is refused before the engine.
    assert!(writer.read((8 << 20) - 512, 4096).await.is_err());

    // The last writer closing demotes hv1; then hv2 may take over.
    drop(writer);
    wait_for("hv1 demoted after its last writer", || {
        hv1.service.status("data").unwrap().replica.role == Role::Secondary
    })
    .await;
    // Demotion re-establishes the links (engine: Secondary/Secondary handshake); take over
    // once they are back, so hv2's writes replicate rather than go to its bitmap.
    wait_for("links back after the demotion", || {
        connected(&hv1, "data") && connected(&hv2, "data")
    })
    .await;
    let mut taken = None;
    for _ in 0..100 {
        match hv2.service.open("data", true).await {
            Ok(h) => {
                taken = Some(h);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let writer2 = taken.expect("hv2 could not open for writing after hv1 demoted");
    let read = writer2.read(5 << 20, 4096).await.unwrap();
    assert_eq!(&read[..], &[0xA5; 4096][..], "hv2 serves what hv1 wrote");
    writer2
        .write(0, Bytes::from(vec![0x11; 4096]), true)
        .await
        .unwrap();
    assert_eq!(image(&hv1, "data")[..4096], [0x11; 4096][..]);

    // An explicit promote keeps the role after the writer is gone.
    hv2.service.promote("data").await.unwrap();
    drop(writer2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = hv2.service.status("data").unwrap();
    assert_eq!(s.replica.role, Role::Primary);
    assert!(s.promoted_explicitly);
    assert_eq!(s.open_writers, 0);
    hv2.service.demote("data").await.unwrap();

    // Grow online: both disks grow, the engine reports the new size.
    hv1.service.resize("data", 12 << 20).await.unwrap();
    assert_eq!(image(&hv2, "data").len(), 12 << 20);
    wait_for("size reported", || {
        hv2.service.status("data").unwrap().replica.size_bytes == 12 << 20
    })
    .await;

    hv1.service.delete("data", false).await.unwrap();
    assert!(!r1.join("images/data.img").exists());
    assert!(!r2.join("images/data.img").exists());
    hv1.service.shutdown().await;
    hv2.service.shutdown().await;
}
