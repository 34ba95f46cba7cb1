//! Test of the dirty-page log that live migration needs: a vhost-user frontend (the `vhost`
//! crate's, speaking the protocol over a real socket as QEMU does) negotiates `LOG_ALL` and
//! `LOG_SHMFD`, hands the daemon a log (`SET_LOG_BASE`) and sends one read request. Every
//! page the device wrote (read data, status byte, used ring, and with EVENT_IDX the used
//! ring's `avail_event` field, placed alone on its page) is marked in the log, and a page
//! it only read is not. Switching the log on for a running ring (SET_VRING_ADDR with the
//! log flag, as QEMU does when a migration starts) keeps the ring's used index, and a
//! region added while logging (ADD_MEM_REG) logs into the same log.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::VhostUserDaemon;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

use super::backend::BlkBackend;
use super::dummy_exports::DummyExports;
use super::request::Status;

const MEM_SIZE: usize = 16 << 20;
const PAGE: u64 = 4096;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x40_0000;
/// A region added while logging, right after the first one.
const ADDED: u64 = MEM_SIZE as u64;
const ADDED_SIZE: u64 = 1 << 20;
/// The used ring of the 16-entry queue: its header (4 bytes) and elements (16 of 8) end
/// exactly at 0x3000, so the `avail_event` field that follows them (EVENT_IDX) is the only
/// thing on page 3.
const USED: u64 = 0x3000 - (4 + 8 * 16);
const AVAIL_EVENT: u64 = 0x3000;

/// A read of the sector in the header at HEADER into `data` (512 bytes), status at
/// STATUS, as descriptors `first`, `first + 1` and `first + 2`.
fn read_chain(first: u16, data: u64) -> Vec<RawDescriptor> {
    [
        (HEADER, 16, 0),
        (data, 512, VRING_DESC_F_WRITE),
        (STATUS, 1, VRING_DESC_F_WRITE),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(addr, len, flags))| {
        let next = if i < 2 { VRING_DESC_F_NEXT } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            (flags | next) as u16,
            first + i as u16 + 1,
        ))
    })
    .collect()
}

/// Whether guest page `page` is marked in `log` (one bit per 4 KiB page, LSB first).
fn dirty(log: &[u8], page: u64) -> bool {
    log[(page / 8) as usize] & (1 << (page % 8)) != 0
}

#[test]
fn with_a_log_every_page_the_device_writes_is_marked_and_no_other() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dirty.sock");
    let mut listener = Listener::new(&path, true).expect("listener");
    let backend = Arc::new(BlkBackend::new(
        "dirty-log",
        DummyExports::new(&["dirty-log"]),
        runtime.handle().clone(),
        1,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        Arc::default(),
    ));
    let mut daemon = VhostUserDaemon::new(
        "dirty-log".into(),
        Arc::clone(&backend),
        backend.guest_memory(),
    )
    .expect("daemon");
    let served = std::thread::spawn(move || {
        daemon.start(&mut listener).expect("accept");
        let _ = daemon.wait();
    });

    // The frontend's guest memory, shared with the daemon through its file.
    let mem_file = tempfile::tempfile().expect("memory file");
    mem_file.set_len(MEM_SIZE as u64).expect("memory size");
    let mem_fd = mem_file.as_raw_fd();
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(mem_file, 0)),
    )])
    .expect("guest memory");
    let host_base = mem.get_host_address(GuestAddress(0)).expect("mapped") as u64;
    // One bit per page.
    let log_file: File = tempfile::tempfile().expect("log file");
    let log_len = (MEM_SIZE as u64 / PAGE / 8).max(PAGE);
    log_file.set_len(log_len).expect("log size");

    let mut frontend = Frontend::connect(&path, 1).expect("connect");
    frontend.set_owner().expect("SET_OWNER");
    let features = frontend.get_features().expect("GET_FEATURES");
    assert_ne!(
        features & VhostUserVirtioFeatures::LOG_ALL.bits(),
        0,
        "LOG_ALL not offered"
    );
    assert_ne!(
        features & (1 << VIRTIO_RING_F_EVENT_IDX),
        0,
        "EVENT_IDX not offered"
    );
    let protocol = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    assert!(
        protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "{protocol:?}"
    );
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )
        .expect("SET_PROTOCOL_FEATURES");
    frontend
        .set_features(features)
        .expect("SET_FEATURES with LOG_ALL");
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host_base,
            mmap_offset: 0,
            mmap_handle: mem_fd,
        }])
        .expect("SET_MEM_TABLE");
    frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log_len,
                mmap_offset: 0,
                mmap_handle: log_file.as_raw_fd(),
            }),
        )
        .expect("SET_LOG_BASE");

    // One read of sector 1 into DATA, status at STATUS.
    // Descriptor table and available ring from the mock; the used ring at USED.
    let queue = MockSplitQueue::new(&mem, 16);
    let mut header = [0u8; 16];
    header[8..].copy_from_slice(&1u64.to_le_bytes()); // VIRTIO_BLK_T_IN, sector 1
    mem.write_slice(&header, GuestAddress(HEADER))
        .expect("header");
    let chain = read_chain(0, DATA);
    queue.add_desc_chains(&chain, 0).expect("chain");
    let (kick, call) = (
        EventFd::new(0).expect("kick"),
        EventFd::new(0).expect("call"),
    );
    frontend.set_vring_num(0, 16).expect("SET_VRING_NUM");
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 16,
                queue_size: 16,
                flags: 0,
                desc_table_addr: host_base + queue.desc_table_addr().0,
                used_ring_addr: host_base + USED,
                avail_ring_addr: host_base + queue.avail_addr().0,
                log_addr: None,
            },
        )
        .expect("SET_VRING_ADDR");
    frontend.set_vring_base(0, 0).expect("SET_VRING_BASE");
    frontend.set_vring_call(0, &call).expect("SET_VRING_CALL");
    frontend.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
    frontend
        .set_vring_enable(0, true)
        .expect("SET_VRING_ENABLE");
    kick.write(1).expect("kick");

    let used_idx = GuestAddress(USED + 2);
    let started = Instant::now();
    while mem.read_obj::<u16>(used_idx).expect("used idx") != 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the request was never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
        Status::Ok.byte()
    );
    // Going idle, the queue re-enables kicks: with EVENT_IDX, avail_event = next avail (1).
    while mem
        .read_obj::<u16>(GuestAddress(AVAIL_EVENT))
        .expect("avail_event")
        != 1
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "avail_event was never written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut log = vec![0u8; log_len as usize];
    log_file
        .read_exact_at(&mut log, 0)
        .expect("reading the log");
    for (what, addr) in [
        ("read data", DATA),
        ("status", STATUS),
        ("used ring", USED),
        ("avail_event", AVAIL_EVENT),
    ] {
        assert!(
            dirty(&log, addr / PAGE),
            "the {what} page at {addr:#x} is not in the log"
        );
    }
    assert!(
        !dirty(&log, HEADER / PAGE),
        "a page the device only read is in the log"
    );

    // QEMU sends SET_VRING_ADDR again, with the log flag, to a running ring when a
    // migration starts. The ring keeps its used index: here the guest memory shows an
    // older one (0), as it would to a handler reading it while the worker completes
    // requests, and the next completion must still go in entry 1 and make the index 2.
    // (vhost-user-backend 0.24 took the index back, so a completion overwrote an entry the
    // guest had consumed: guests crashed or hung after a live migration.)
    mem.write_obj::<u16>(0, used_idx).expect("used idx");
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 16,
                queue_size: 16,
                flags: VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
                desc_table_addr: host_base + queue.desc_table_addr().0,
                used_ring_addr: host_base + USED,
                avail_ring_addr: host_base + queue.avail_addr().0,
                log_addr: Some(USED),
            },
        )
        .expect("SET_VRING_ADDR with the log");
    let second = read_chain(3, DATA);
    queue.add_desc_chains(&second, 3).expect("second chain");
    kick.write(1).expect("kick");
    let started = Instant::now();
    while mem.read_obj::<u16>(used_idx).expect("used idx") != 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the second completion did not make the used index 2 (it is {}): the ring's used index was taken back",
            mem.read_obj::<u16>(used_idx).expect("used idx")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let second_entry = GuestAddress(USED + 4 + 8);
    assert_eq!(
        mem.read_obj::<u32>(second_entry).expect("used entry 1"),
        3,
        "the second completion is not in used entry 1"
    );

    // A region added while logging (ADD_MEM_REG, which QEMU sends when the backend offers
    // CONFIGURE_MEM_SLOTS) logs into the same log: the next read's data page there is
    // marked.
    log_file
        .write_all_at(&vec![0u8; log_len as usize], 0)
        .expect("clearing the log");
    let added_file = tempfile::tempfile().expect("added memory file");
    added_file.set_len(ADDED_SIZE).expect("added memory size");
    let added: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(ADDED),
        ADDED_SIZE as usize,
        Some(FileOffset::new(added_file, 0)),
    )])
    .expect("added memory");
    let added_host = added.get_host_address(GuestAddress(ADDED)).expect("mapped") as u64;
    let added_fd = added
        .find_region(GuestAddress(ADDED))
        .and_then(|r| r.file_offset())
        .expect("added memory file")
        .file()
        .as_raw_fd();
    frontend
        .add_mem_region(&VhostUserMemoryRegionInfo {
            guest_phys_addr: ADDED,
            memory_size: ADDED_SIZE,
            userspace_addr: added_host,
            mmap_offset: 0,
            mmap_handle: added_fd,
        })
        .expect("ADD_MEM_REG while logging");
    // ADD_MEM_REG has no reply: one that has (the daemon answers in order) says the region
    // is there before the request that uses it is kicked.
    frontend.get_features().expect("GET_FEATURES");
    let third = read_chain(6, ADDED);
    queue.add_desc_chains(&third, 6).expect("third chain");
    kick.write(1).expect("kick");
    let started = Instant::now();
    while mem.read_obj::<u16>(used_idx).expect("used idx") != 3 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the third request was never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    log_file
        .read_exact_at(&mut log, 0)
        .expect("reading the log");
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
        Status::Ok.byte(),
        "the read into the added region failed"
    );
    assert!(
        dirty(&log, ADDED / PAGE),
        "the read data page in the added region is not in the log"
    );

    drop(frontend);
    served.join().expect("daemon thread");
}
