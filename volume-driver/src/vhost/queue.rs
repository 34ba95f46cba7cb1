//! One virtqueue's service loop, run by the queue's worker thread when the guest kicks it:
//! many requests in flight at once, within budgets.
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
//! When nothing is in flight the loop re-enables kicks and returns: it does not poll the
//! available ring. Polling for 50 us after each completion (so a queue-depth-1 guest's
//! next request needed no kick) cost about 55 us of CPU per QD1 request with no latency
//! gain on the 2-vCPU dev VM, and a host's CPUs belong to its VMs; spinning while requests
//! are in flight (instead of sleeping in `block_on`) cost 60-100 us per request, also for
//! no gain.
//!
//! Guest memory is loaded at each pass over the available ring, so a region the frontend
//! adds (`ADD_MEM_REG`) serves the next request taken; a request keeps the memory it was
//! taken with until it is answered.
//!
//! What a guest can make us hold is bounded, since it can reuse descriptors and so offer
//! more chains than the queue has: at most the queue's size in requests per queue, and
//! [`MAX_IN_FLIGHT_BYTES`] (NBD's bound) of request bytes per connection, shared by its
//! queues ([`Shared`]). A chain that does not fit is left in the ring until completions
//! free the budget; a queue with nothing in flight waits for the other queues to free it.
//!
//! A ring that cannot be read (the queue is not ready, the guest's available index is more
//! than a queue ahead, an entry is out of guest memory) ends the pass once the requests in
//! flight are answered; the guest's next kick looks again. A completion that cannot be put
//! in the used ring (a head index out of range) would break the in-order rule, so nothing
//! more is completed on the connection and the caller hangs it up ([`Outcome::HangUp`]).
//!
//! Safety rules kept from the one-at-a-time loop:
//! * The vring's lock is held from taking the first request until the last completion is in
//!   the used ring. When QEMU stops the queue (`GET_VRING_BASE`: guest reset, pause,
//!   shutdown) its handler waits on that lock, so it returns only once every request of the
//!   queue has finished, and no completion is written into guest memory after the ring was
//!   handed back.
//! * Once `stopping` is set (the frontend is gone, or the connection is being hung up) no
//!   new request is taken, and no completion reaches the used ring: each batch of
//!   completions is added under `completions` (read), which [`Shared::stop_completions`]
//!   takes (write) after setting `stopping`, since QEMU reads the used index when it sees
//!   the hang-up and a completion added later would be replayed on reconnect. Requests in
//!   flight still finish against the volume; QEMU resubmits them.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, SemaphorePermit};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;

use super::backend::{GuestMemory, Mem};
use super::request::Chain;
pub use crate::nbd::MAX_IN_FLIGHT_BYTES;

/// A request taken from the queue, as `serve`'s caller answers it: its descriptor chain as
/// read from the ring, with the guest memory it was taken in.
///
/// The chain is walked once, when the request is taken, and everything about the request
/// comes from that walk: whether the chain ends, its parts, the status address of a
/// refusal, its cost against the byte budget. A guest rewriting its descriptor table in
/// between cannot make the request that runs differ from the one that was checked and
/// budgeted. The walk reads at most one descriptor more than the queue holds (no
/// legitimate chain is longer: INDIRECT_DESC is not offered), so a chain through an
/// indirect table of 65535 entries costs no more than a direct one.
pub struct Taken {
    head: u16,
    memory: Arc<Mem>,
    descriptors: Vec<Descriptor>,
    queue_size: u16,
}

impl Taken {
    /// Walk `chain`, of a queue of `queue_size` descriptors, taken in `memory`.
    fn walk(chain: DescriptorChain<Arc<Mem>>, memory: Arc<Mem>, queue_size: u16) -> Taken {
        Taken {
            head: chain.head_index(),
            memory,
            descriptors: chain.take(usize::from(queue_size) + 1).collect(),
            queue_size,
        }
    }

    /// The index of the chain's first descriptor, which its used element names.
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// The guest memory the request was taken in.
    pub fn memory(&self) -> &Mem {
        &self.memory
    }

    /// The descriptors as read, in chain order: at most the queue's size plus one. A chain
    /// the queue stopped following (see [`super::request::check_ends`]) ends in one that
    /// still says NEXT, or holds more than the queue's size.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    /// The size of the queue the request was taken from.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }
}

/// What answering a request gives back: the chain's head index and the bytes written to
/// the guest (the used length).
pub type Answered = (u16, u32);

/// How a pass over the queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing more to do until the next kick.
    Idle,
    /// A completion could not be put in the used ring: hang up the connection.
    HangUp,
}

/// What the queues of one connection share: the hang-up switch and the byte budget.
pub struct Shared {
    volume: String,
    /// Set once the frontend is gone or the connection is being hung up.
    stopping: AtomicBool,
    /// Held (read) from checking `stopping` to putting a batch of completions in the used
    /// ring; taken (write) by [`Shared::stop_completions`].
    completions: RwLock<()>,
    /// Request bytes the connection may still take.
    bytes: Semaphore,
    /// Whether an unreadable available ring was logged at warn level already.
    ring_warned: AtomicBool,
}

impl Shared {
    /// The budget and switches of a new connection to `volume`.
    pub fn new(volume: &str) -> Shared {
        Shared {
            volume: volume.to_string(),
            stopping: AtomicBool::new(false),
            completions: RwLock::default(),
            bytes: Semaphore::new(MAX_IN_FLIGHT_BYTES as usize),
            ring_warned: AtomicBool::new(false),
        }
    }

    /// Take no new request from here on (the frontend is gone). A queue waiting for the
    /// byte budget stops waiting (the budget is closed).
    pub fn stop_taking(&self) {
        self.stopping.store(true, Ordering::Release);
        self.bytes.close();
    }

    /// Take no new request and put no completion in any used ring from here on; a batch
    /// being added is waited for.
    pub fn stop_completions(&self) {
        self.stop_taking();
        drop(self.completions.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// Whether the queues stopped taking requests.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Request bytes the connection may still take.
    #[cfg(test)]
    pub fn bytes_available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// The available ring cannot be read, for this `reason`: warn once per connection.
    fn ring_unreadable(&self, reason: &str) {
        if !self.ring_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(volume = %self.volume, reason, "vhost-user-blk: the guest's available ring cannot be read; the queue takes no request until it can (logged once per connection)");
        } else {
            tracing::debug!(volume = %self.volume, reason, "vhost-user-blk: the guest's available ring cannot be read");
        }
    }
}

/// Answer every request of `vring` as described in the module doc; `answer` runs one
/// request (it writes the data and status into guest memory) and returns its used entry.
pub fn serve<F, Fut>(
    runtime: &Handle,
    vring: &VringRwLock<GuestMemory>,
    memory: &GuestMemory,
    shared: &Shared,
    answer: F,
) -> Outcome
where
    F: Fn(Taken) -> Fut,
    Fut: Future<Output = Answered>,
{
    let mut state = vring.get_mut();
    runtime.block_on(run(&mut state, memory, shared, answer))
}

async fn run<'s, F, Fut>(
    state: &mut VringState<GuestMemory>,
    memory: &GuestMemory,
    shared: &'s Shared,
    answer: F,
) -> Outcome
where
    F: Fn(Taken) -> Fut,
    Fut: Future<Output = Answered>,
{
    // The byte budget is given back as soon as the request is done.
    let start = |chain: Taken, budget: SemaphorePermit<'s>| {
        let request = answer(chain);
        async move {
            let answered = request.await;
            drop(budget);
            answered
        }
    };
    let mut in_flight = FuturesOrdered::new();
    // Cleared when the available ring cannot be read: no more is taken in this pass.
    let mut readable = true;
    // Set when `enable_notification` saw more requests than were taken.
    let mut more_announced = false;
    // Errors here only mean more kicks than needed.
    let _ = state.disable_notification();
    loop {
        if readable && !shared.stopping() {
            match take(state, memory, shared, &mut in_flight, &start).await {
                // The index says there is more, yet no entry can be read: looking again
                // would spin.
                Ok(0) if more_announced && !shared.stopping() => {
                    shared.ring_unreadable("an available entry is out of guest memory");
                    readable = false;
                }
                Ok(_) => {}
                Err(virtio_queue::Error::QueueNotReady) => {
                    // A kick racing a reset or a pause: nothing wrong with the guest.
                    tracing::debug!(volume = %shared.volume, "vhost-user-blk queue kicked while not ready");
                    readable = false;
                }
                Err(e) => {
                    shared.ring_unreadable(&e.to_string());
                    readable = false;
                }
            }
            more_announced = false;
        }
        if in_flight.is_empty() {
            if shared.stopping() {
                return Outcome::Idle;
            }
            if !readable {
                // Kicks back on (the pass began by turning them off), so that the guest's
                // next kick looks again.
                let _ = state.enable_notification();
                return Outcome::Idle;
            }
            match state.enable_notification() {
                // A request came just before the kicks were back on: take it.
                Ok(true) => {
                    let _ = state.disable_notification();
                    more_announced = true;
                    continue;
                }
                Ok(false) => return Outcome::Idle,
                Err(e) => {
                    tracing::warn!(volume = %shared.volume, error = %e, "cannot re-enable the queue's kicks");
                    return Outcome::Idle;
                }
            }
        }
        let Some(first) = in_flight.next().await else {
            continue;
        };
        // Not held across an await: a hang-up waits only for this batch.
        let completing = shared.completions.read().unwrap_or_else(|e| e.into_inner());
        if shared.stopping() {
            drop(completing);
            // Nothing more reaches the used ring; the rest finish against the volume.
            while in_flight.next().await.is_some() {}
            return Outcome::Idle;
        }
        let mut added = complete(state, shared, first);
        while added {
            match in_flight.next().now_or_never() {
                Some(Some(done)) => added = complete(state, shared, done),
                _ => break,
            }
        }
        notify(state, shared);
        if !added {
            shared.stop_taking();
            drop(completing);
            while in_flight.next().await.is_some() {}
            return Outcome::HangUp;
        }
        drop(completing);
    }
}

/// Start the available requests of this pass, as many as the budgets allow: how many were
/// started, or why the ring cannot be read.
async fn take<'s, T>(
    state: &mut VringState<GuestMemory>,
    memory: &GuestMemory,
    shared: &'s Shared,
    in_flight: &mut FuturesOrdered<T>,
    start: &impl Fn(Taken, SemaphorePermit<'s>) -> T,
) -> Result<usize, virtio_queue::Error>
where
    T: Future<Output = Answered>,
{
    let mem = memory.memory().into_inner();
    let queue = state.get_queue_mut();
    let size = queue.size();
    let most = usize::from(size);
    // Errs when the queue is not ready or the available index is more than a queue ahead.
    let mut available = queue.iter(Arc::clone(&mem))?;
    let mut started = 0;
    while in_flight.len() < most && !shared.stopping() {
        let Some(chain) = available.next() else {
            break;
        };
        let chain = Taken::walk(chain, Arc::clone(&mem), size);
        let bytes = cost(&chain);
        let budget = match shared.bytes.try_acquire_many(bytes) {
            Ok(budget) => budget,
            // Over budget: completions of this queue will free some.
            Err(_) if !in_flight.is_empty() => {
                available.go_to_previous_position();
                break;
            }
            // Nothing of ours in flight: the other queues will free some.
            Err(_) => match shared.bytes.acquire_many(bytes).await {
                Ok(budget) if !shared.stopping() => budget,
                // Stopped while waiting (the budget was closed).
                _ => {
                    available.go_to_previous_position();
                    break;
                }
            },
        };
        in_flight.push_back(start(chain, budget));
        started += 1;
    }
    Ok(started)
}

// A chain at its largest fits the connection's budget, so a budget wait always ends.
const _: () = assert!(Chain::MAX_BYTES <= MAX_IN_FLIGHT_BYTES as u64);

/// The bytes a chain may make us hold: the sum of its descriptors' lengths, at most a
/// chain's largest size (a longer one is refused without reading it).
fn cost(chain: &Taken) -> u32 {
    let bytes = chain
        .descriptors()
        .iter()
        .map(|d| u64::from(d.len()))
        .fold(0u64, u64::saturating_add);
    bytes.min(Chain::MAX_BYTES) as u32
}

/// Put one completion in the used ring; `false` when it could not be.
fn complete(state: &mut VringState<GuestMemory>, shared: &Shared, (head, len): Answered) -> bool {
    match state.add_used(head, len) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(volume = %shared.volume, head, error = %e, "vhost-user-blk: cannot return a descriptor to the guest; hanging up, since later completions would be out of order");
            false
        }
    }
}

fn notify(state: &mut VringState<GuestMemory>, shared: &Shared) {
    // When in doubt, notify: a spurious interrupt is harmless, a missing one hangs the guest.
    if !state.needs_notification().unwrap_or(true) {
        return;
    }
    if let Err(e) = state.signal_used_queue() {
        tracing::warn!(volume = %shared.volume, error = %e, "cannot notify the guest");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_ring::{VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;

    const MEM_SIZE: u64 = 0x100_0000;
    const DATA: u64 = 0x20_0000;
    /// Where a queue's used ring is, from its descriptor table.
    const USED: u64 = 0x10_0000;
    const WAIT: Duration = Duration::from_secs(10);

    type Vring = VringRwLock<GuestMemory>;

    /// Requests that finish when the test says so, in the order they were started: the
    /// `n`th started finishes once `release` reaches more than `n`.
    #[derive(Default)]
    struct Held {
        started: AtomicUsize,
        release: tokio::sync::watch::Sender<usize>,
    }

    impl Held {
        fn started(&self) -> usize {
            self.started.load(Ordering::SeqCst)
        }

        fn release(&self, n: usize) {
            self.release.send_replace(n);
        }
    }

    /// A connection's queue in 16 MiB of test memory, served by a runtime of its own.
    struct Setup {
        mem: Mem,
        memory: GuestMemory,
        shared: Arc<Shared>,
        held: Arc<Held>,
        runtime: tokio::runtime::Runtime,
    }

    fn setup() -> Setup {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("memory");
        Setup {
            memory: GuestMemoryAtomic::new(mem.clone()),
            mem,
            shared: Arc::new(Shared::new("queue-test")),
            held: Arc::default(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        }
    }

    /// One device-writable descriptor of `len` bytes, chain `head`'s only one.
    fn descriptor(len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            DATA,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    impl Setup {
        /// A ready queue of `size` descriptors, `chains` of them offered, each of one
        /// descriptor of `len` bytes.
        fn queue(&self, size: u16, chains: u16, len: u32) -> (MockSplitQueue<'_, Mem>, Vring) {
            let queue = MockSplitQueue::new(&self.mem, size);
            for head in 0..chains {
                queue
                    .add_desc_chains(&[descriptor(len)], head)
                    .expect("chain");
            }
            let vring = self.vring(&queue, size);
            (queue, vring)
        }

        /// A ready vring over `queue`'s descriptors and available ring, with a used ring
        /// of its own (the mock's overlaps the available ring past 8 entries).
        fn vring(&self, queue: &MockSplitQueue<'_, Mem>, size: u16) -> Vring {
            let vring = Vring::new(self.memory.clone(), size).expect("vring");
            let used = queue.desc_table_addr().0 + USED;
            vring
                .set_queue_info(queue.desc_table_addr().0, queue.avail_addr().0, used)
                .expect("queue addresses");
            vring.set_queue_size(size);
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vring
        }

        /// Serve `vring` once on a thread of its own; its outcome comes on the channel.
        fn serve(&self, vring: &Vring) -> mpsc::Receiver<Outcome> {
            let (tx, rx) = mpsc::channel();
            let (vring, memory) = (vring.clone(), self.memory.clone());
            let (shared, held) = (Arc::clone(&self.shared), Arc::clone(&self.held));
            let runtime = self.runtime.handle().clone();
            std::thread::spawn(move || {
                let answer = |chain: Taken| {
                    let n = held.started.fetch_add(1, Ordering::SeqCst);
                    let mut release = held.release.subscribe();
                    let head = chain.head_index();
                    async move {
                        let _ = release.wait_for(|&released| released > n).await;
                        (head, 0)
                    }
                };
                let _ = tx.send(serve(&runtime, &vring, &memory, &shared, answer));
            });
            rx
        }

        /// The used index of `queue`'s vring (read without its lock, which a pass holds).
        /// Whether the guest is asked to kick (the used ring's NO_NOTIFY flag is clear;
        /// these queues have no EVENT_IDX).
        fn kicks_on(&self, queue: &MockSplitQueue<'_, Mem>) -> bool {
            let used = queue.desc_table_addr().0 + USED;
            let flags: u16 = self.mem.read_obj(GuestAddress(used)).expect("used flags");
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        }

        fn used_idx(&self, queue: &MockSplitQueue<'_, Mem>) -> u16 {
            let used = queue.desc_table_addr().0 + USED;
            self.mem.read_obj(GuestAddress(used + 2)).expect("used idx")
        }

        fn avail_idx(&self, queue: &MockSplitQueue<'_, Mem>) -> u16 {
            self.mem
                .read_obj(queue.avail_addr().unchecked_add(2))
                .expect("avail idx")
        }

        /// Offer `heads` again (as a guest reusing descriptors does).
        fn offer(&self, queue: &MockSplitQueue<'_, Mem>, size: u16, heads: &[u16]) {
            let mut idx = self.avail_idx(queue);
            for &head in heads {
                let slot = 4 + 2 * u64::from(idx % size);
                self.mem
                    .write_obj(head, queue.avail_addr().unchecked_add(slot))
                    .expect("avail entry");
                idx = idx.wrapping_add(1);
            }
            self.mem
                .write_obj(idx, queue.avail_addr().unchecked_add(2))
                .expect("avail idx");
        }
    }

    fn wait_for(mut check: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + WAIT;
        while Instant::now() < until {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// What an unreadable ring must not do: spin forever holding the vring's lock (QEMU's
    /// GET_VRING_BASE would then hang). A hang here is that bug.
    fn ends_without_taking_anything(s: &Setup, vring: &Vring) {
        let outcome = s.serve(vring).recv_timeout(WAIT);
        assert_eq!(outcome, Ok(Outcome::Idle), "the pass did not end");
        assert_eq!(s.held.started(), 0);
    }

    #[test]
    fn an_available_index_more_than_a_queue_ahead_ends_the_pass_instead_of_spinning() {
        let s = setup();
        let (queue, vring) = s.queue(16, 1, 512);
        s.mem
            .write_obj(100u16, queue.avail_addr().unchecked_add(2))
            .expect("avail idx");
        ends_without_taking_anything(&s, &vring);
        assert!(s.kicks_on(&queue), "the guest would never kick again");
        // The next kick looks again: still nothing, still no spin.
        ends_without_taking_anything(&s, &vring);
    }

    #[test]
    fn a_queue_that_is_not_ready_ends_the_pass_instead_of_spinning() {
        let s = setup();
        let (_queue, vring) = s.queue(16, 1, 512);
        vring.set_queue_ready(false);
        ends_without_taking_anything(&s, &vring);
        // Made ready again (a resume), the next kick takes the request.
        vring.set_queue_ready(true);
        let outcome = s.serve(&vring);
        assert!(wait_for(|| s.held.started() == 1));
        s.held.release(usize::MAX);
        assert_eq!(outcome.recv_timeout(WAIT), Ok(Outcome::Idle));
    }

    #[test]
    fn an_available_entry_out_of_guest_memory_ends_the_pass_instead_of_spinning() {
        let s = setup();
        let (queue, vring) = s.queue(16, 0, 512);
        // The ring's flags and index are the last 4 bytes of guest memory; its entries lie
        // beyond.
        let avail = MEM_SIZE - 4;
        s.mem
            .write_obj(1u16, GuestAddress(avail + 2))
            .expect("avail idx");
        vring
            .set_queue_info(queue.desc_table_addr().0, avail, USED)
            .expect("queue addresses");
        ends_without_taking_anything(&s, &vring);
    }

    #[test]
    fn a_queue_holds_at_most_its_size_in_requests_even_when_the_guest_reuses_descriptors() {
        let s = setup();
        let (queue, vring) = s.queue(16, 16, 512);
        let outcome = s.serve(&vring);
        assert!(wait_for(|| s.held.started() == 16));
        // The guest offers the same 16 chains again while they are in flight.
        s.offer(&queue, 16, &(0..16).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(s.held.started(), 16, "more requests than the queue has");
        // Each completion frees room for one more.
        s.held.release(1);
        assert!(wait_for(|| s.held.started() == 17));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(s.held.started(), 17, "more requests than the queue has");
        s.held.release(usize::MAX);
        assert_eq!(outcome.recv_timeout(WAIT), Ok(Outcome::Idle));
        assert_eq!(s.held.started(), 32);
        assert_eq!(s.used_idx(&queue), 32);
    }

    #[test]
    fn a_connection_holds_at_most_nbds_budget_of_request_bytes_and_takes_more_as_they_finish() {
        const LEN: u32 = 32 << 20;
        let fit = MAX_IN_FLIGHT_BYTES / LEN;
        let s = setup();
        // Descriptors claim 32 MiB each; nothing here reads them.
        let (queue, vring) = s.queue(16, 16, LEN);
        let outcome = s.serve(&vring);
        assert!(wait_for(|| s.held.started() == fit as usize));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(s.held.started(), fit as usize, "over the byte budget");
        assert_eq!(s.shared.bytes_available(), 0);
        s.held.release(1);
        assert!(wait_for(|| s.held.started() == fit as usize + 1));
        s.held.release(usize::MAX);
        assert_eq!(outcome.recv_timeout(WAIT), Ok(Outcome::Idle));
        assert_eq!(s.used_idx(&queue), 16);
        assert_eq!(s.shared.bytes_available(), MAX_IN_FLIGHT_BYTES as usize);
    }

    /// Requests of 32 MiB: the connection's byte budget holds this many.
    const BIG: u32 = 32 << 20;
    const FIT: usize = (MAX_IN_FLIGHT_BYTES / BIG) as usize;

    /// A first queue holding the whole byte budget (its requests held), and a second queue
    /// of the connection, elsewhere in guest memory, served with one more request: its
    /// pass waits for the budget. The passes' outcomes, first then second.
    fn second_queue_waits_for_the_budget<'a>(
        s: &'a Setup,
    ) -> (
        mpsc::Receiver<Outcome>,
        MockSplitQueue<'a, Mem>,
        mpsc::Receiver<Outcome>,
    ) {
        let (_first, first_vring) = s.queue(16, FIT as u16, BIG);
        let first = s.serve(&first_vring);
        assert!(wait_for(|| s.held.started() == FIT));
        let second = MockSplitQueue::create(&s.mem, GuestAddress(0x80_0000), 16);
        second
            .add_desc_chains(&[descriptor(BIG)], 0)
            .expect("chain");
        let second_outcome = s.serve(&s.vring(&second, 16));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(s.held.started(), FIT, "over the byte budget");
        (first, second, second_outcome)
    }

    #[test]
    fn a_queue_with_nothing_in_flight_waits_for_the_budget_the_other_queues_hold() {
        let s = setup();
        let (first, second, second_outcome) = second_queue_waits_for_the_budget(&s);
        s.held.release(1);
        assert!(wait_for(|| s.held.started() == FIT + 1));
        s.held.release(usize::MAX);
        assert_eq!(first.recv_timeout(WAIT), Ok(Outcome::Idle));
        assert_eq!(second_outcome.recv_timeout(WAIT), Ok(Outcome::Idle));
        assert_eq!(s.used_idx(&second), 1);
    }

    #[test]
    fn a_queue_waiting_for_the_budget_stops_waiting_when_the_connection_stops() {
        let s = setup();
        let (first, second, second_outcome) = second_queue_waits_for_the_budget(&s);
        // The first queue's requests hang (a stalled volume); the second queue's pass ends
        // at the stop all the same, so QEMU's GET_VRING_BASE on it is not held up.
        s.shared.stop_completions();
        assert_eq!(second_outcome.recv_timeout(WAIT), Ok(Outcome::Idle));
        assert_eq!(s.held.started(), FIT, "nothing taken after the stop");
        s.held.release(usize::MAX);
        assert_eq!(first.recv_timeout(WAIT), Ok(Outcome::Idle));
        assert_eq!(s.used_idx(&second), 0);
    }

    #[test]
    fn once_completions_are_stopped_none_reaches_the_used_ring_even_at_full_queue_depth() {
        const SIZE: u16 = 64;
        let s = setup();
        let (queue, vring) = s.queue(SIZE, SIZE, 512);
        let outcome = s.serve(&vring);
        assert!(wait_for(|| s.held.started() == usize::from(SIZE)));
        // Some requests are answered before the hang-up...
        s.held.release(8);
        assert!(wait_for(|| s.used_idx(&queue) == 8));
        // ...then it comes with 56 in flight, and does not wait for them.
        let stopping = Instant::now();
        s.shared.stop_completions();
        assert!(stopping.elapsed() < Duration::from_secs(1));
        // Nothing new is taken, and what was in flight finishes unseen by the guest.
        s.offer(&queue, SIZE, &[0, 1, 2, 3, 4, 5, 6, 7]);
        s.held.release(usize::MAX);
        assert_eq!(outcome.recv_timeout(WAIT), Ok(Outcome::Idle));
        assert_eq!(s.held.started(), usize::from(SIZE));
        assert_eq!(s.used_idx(&queue), 8, "a completion came after the hang-up");
        // A later kick changes nothing.
        assert_eq!(s.serve(&vring).recv_timeout(WAIT), Ok(Outcome::Idle));
        assert_eq!(s.used_idx(&queue), 8);
    }

    #[test]
    fn a_completion_that_cannot_enter_the_used_ring_hangs_up_and_none_after_it_is_added() {
        let s = setup();
        let (queue, vring) = s.queue(16, 1, 512);
        // Head 200 of a 16-descriptor queue, then a good chain.
        s.offer(&queue, 16, &[200, 0]);
        s.held.release(usize::MAX);
        assert_eq!(s.serve(&vring).recv_timeout(WAIT), Ok(Outcome::HangUp));
        assert_eq!(s.used_idx(&queue), 1, "only the completion before it");
        assert!(s.shared.stopping());
    }
}
