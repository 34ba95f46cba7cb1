//! One virtqueue's service loop, run by the queue's worker thread when the guest kicks it:
//! many requests in flight at once.
//!
//! Every available descriptor chain is taken and its request started at once; the
//! requests run together on this thread (the volume's async I/O, polled here under
//! `block_on`, so no other thread carries a request and waits for it). Finished requests
//! go into the used ring in the order they were taken, each as soon as it and every
//! earlier one are done, and the guest is notified once per batch of completions (when
//! `needs_notification` says so, which follows EVENT_IDX). In-order completion is what lets
//! a QEMU that reconnects after a tandemd restart resume without inflight tracking: it
//! restarts the queue at its used index, which then counts exactly the requests that were
//! answered, and resubmits all the others. Requests that come while others run are taken
//! after the next completion. Kicks are suppressed while the loop runs; before it returns it re-enables
//! them and looks once more, so no request is missed.
//!
//! When nothing is in flight the loop polls the available ring for [`POLL`] before going
//! back to waiting for a kick: a guest that sends its next request right after reading a
//! completion (queue depth 1) needs no kick, and the worker no wake-up. (Spinning also
//! while requests are in flight, instead of sleeping in `block_on`, was tried: it cut the
//! context switches per QD1 read from about 3.8 to 2.4-3.2 but cost 60-100 us of CPU per
//! request and brought no latency gain on the shared 2-vCPU dev VM, so it is not done.)
//!
//! Safety rules kept from the one-at-a-time loop:
//! * The vring's lock is held from taking the first request until the last completion is in
//!   the used ring. When QEMU stops the queue (`GET_VRING_BASE`: guest reset, pause,
//!   shutdown) its handler waits on that lock, so it returns only once every request of the
//!   queue has finished, and no completion is written into guest memory after the ring was
//!   handed back.
//! * Once `stopping` is set (the frontend is gone, or the connection is being hung up) no
//!   new request is taken, and no completion reaches the used ring: each batch of
//!   completions is added under `completions` (read), which
//!   [`BlkBackend::stop_completions`](super::backend::BlkBackend::stop_completions) takes
//!   (write) after setting `stopping`, since QEMU reads the used index when it sees the
//!   hang-up and a completion added later would be replayed on reconnect. Requests in
//!   flight still finish against the volume; QEMU resubmits them.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use tokio::runtime::Handle;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{DescriptorChain, QueueT};

use super::backend::{GuestMemory, Mem};

/// How long an idle queue polls its available ring before it waits for a kick again.
pub const POLL: Duration = Duration::from_micros(50);

/// A request taken from the queue, as `serve`'s caller answers it: its descriptor chain.
pub type Taken<'m> = DescriptorChain<&'m Mem>;

/// What answering a request gives back: the chain's head index and the bytes written to
/// the guest (the used length).
pub type Answered = (u16, u32);

/// Answer every request of `vring` as described in the module doc; `answer` runs one
/// request (it writes the data and status into guest memory) and returns its used entry.
pub fn serve<'m, F, Fut>(
    runtime: &Handle,
    vring: &VringRwLock<GuestMemory>,
    mem: &'m Mem,
    stopping: &AtomicBool,
    completions: &RwLock<()>,
    answer: F,
) where
    F: Fn(Taken<'m>) -> Fut,
    Fut: Future<Output = Answered>,
{
    let mut state = vring.get_mut();
    runtime.block_on(run(&mut state, mem, stopping, completions, answer));
}

async fn run<'m, F, Fut>(
    state: &mut VringState<GuestMemory>,
    mem: &'m Mem,
    stopping: &AtomicBool,
    completions: &RwLock<()>,
    answer: F,
) where
    F: Fn(Taken<'m>) -> Fut,
    Fut: Future<Output = Answered>,
{
    let mut in_flight = FuturesOrdered::new();
    let mut idle_since: Option<Instant> = None;
    // Errors here only mean more kicks than needed.
    let _ = state.disable_notification();
    loop {
        while !stopping.load(Ordering::Acquire) {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
                break;
            };
            in_flight.push_back(answer(chain));
        }
        if in_flight.is_empty() {
            if stopping.load(Ordering::Acquire) {
                break;
            }
            let idle = *idle_since.get_or_insert_with(Instant::now);
            if idle.elapsed() < POLL {
                std::hint::spin_loop();
                continue;
            }
            match state.enable_notification() {
                // A request came just before the kicks were back on: take it.
                Ok(true) => {
                    let _ = state.disable_notification();
                    idle_since = None;
                    continue;
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-enable the queue's kicks");
                    break;
                }
            }
        }
        idle_since = None;
        let Some(first) = in_flight.next().await else {
            continue;
        };
        // Not held across an await: a hang-up waits only for this batch.
        let completing = completions.read().unwrap_or_else(|e| e.into_inner());
        if stopping.load(Ordering::Acquire) {
            drop(completing);
            // Nothing more reaches the used ring; the rest finish against the volume.
            while in_flight.next().await.is_some() {}
            break;
        }
        complete(state, first);
        while let Some(Some(done)) = in_flight.next().now_or_never() {
            complete(state, done);
        }
        notify(state);
        drop(completing);
    }
}

fn complete(state: &mut VringState<GuestMemory>, (head, len): Answered) {
    if let Err(e) = state.add_used(head, len) {
        tracing::warn!(error = %e, "cannot return a descriptor to the guest");
    }
}

fn notify(state: &mut VringState<GuestMemory>) {
    // When in doubt, notify: a spurious interrupt is harmless, a missing one hangs the guest.
    if !state.needs_notification().unwrap_or(true) {
        return;
    }
    if let Err(e) = state.signal_used_queue() {
        tracing::warn!(error = %e, "cannot notify the guest");
    }
}
