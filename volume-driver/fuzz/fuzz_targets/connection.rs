//! Fuzz a whole connection: the input is everything a client sends (after a valid prefix
//! half of the time), the server runs against an in-memory export. It must never panic
//! and must finish once the client's bytes end.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use volume_driver::nbd;

#[path = "common/mem_export.rs"]
mod mem_export;
use mem_export::One;

/// Client flags + NBD_OPT_GO "m": lets the fuzzer spend its time in transmission.
fn valid_prefix() -> Vec<u8> {
    let mut p = 1u32.to_be_bytes().to_vec();
    p.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    p.extend_from_slice(&7u32.to_be_bytes());
    p.extend_from_slice(&7u32.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes());
    p.push(b'm');
    p.extend_from_slice(&0u16.to_be_bytes());
    p
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = if mode & 1 == 1 {
        valid_prefix()
    } else {
        Vec::new()
    };
    input.extend_from_slice(rest);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let conn = tokio::spawn(nbd::serve_connection(
            sr,
            sw,
            Arc::new(One),
            shutdown,
            "fuzz",
        ));
        let drain = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut tokio::io::sink()).await;
        });
        let _ = cw.write_all(&input).await;
        let _ = cw.shutdown().await;
        drop(cw);
        tokio::time::timeout(std::time::Duration::from_secs(10), conn)
            .await
            .expect("connection did not finish after the client's bytes ended")
            .expect("connection task panicked");
        drain.abort();
    });
});
