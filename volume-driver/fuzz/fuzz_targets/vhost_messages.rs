//! Fuzz the vhost-user message handling of the vhost-user-blk frontend: the input is
//! everything a frontend sends on the socket (after a valid GET_FEATURES / SET_OWNER prefix
//! half of the time), handled by rust-vmm's daemon with tandemd's `BlkBackend` over an
//! in-memory export. It must never panic and must end once the frontend's bytes end.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use volume_driver::vhost::backend::BlkBackend;

#[path = "common/mem_export.rs"]
mod mem_export;
use mem_export::One;

fn header(request: u32, size: u32) -> Vec<u8> {
    let mut h = request.to_le_bytes().to_vec();
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::new();
    if mode & 1 == 1 {
        input.extend(header(1, 0)); // GET_FEATURES
        input.extend(header(3, 0)); // SET_OWNER
    }
    input.extend_from_slice(rest);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(BlkBackend::new(
        "m",
        Arc::new(One),
        rt.handle().clone(),
        2,
        mem.clone(),
        Arc::default(),
    ));
    let mut daemon = VhostUserDaemon::new("fuzz".into(), Arc::clone(&backend), mem).unwrap();
    let frontend = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let _ = stream.write_all(&input);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Drain replies until the daemon closes.
        let _ = std::io::copy(&mut stream, &mut std::io::sink());
    });
    daemon.start_client(path.to_str().unwrap()).unwrap();
    let _ = daemon.wait();
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    drop(daemon);
    backend.release();
    frontend.join().unwrap();
});
