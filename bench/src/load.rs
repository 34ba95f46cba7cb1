//! The load generator of the `frontends` bench: one loop ([`run`]) that keeps a fixed number
//! of 4 KiB requests in flight on any [`Client`] (vhost-user-blk, NBD, the device in
//! process), at block offsets drawn from one seeded sequence ([`Offsets`]), and times every
//! request. The same seed gives every client the same offsets in the same order.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Bytes per request.
pub const BLOCK: usize = 4096;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// A block device client with `qd` request slots, each with its own [`BLOCK`]-byte buffer.
pub trait Client {
    /// Start `op` on the block at `offset` in `slot` (which is not in flight): a write
    /// writes the slot's buffer, a read fills it. May only queue the request; the next
    /// [`Client::complete`] sends whatever is queued.
    fn submit(&mut self, slot: usize, op: Op, offset: u64) -> Result<()>;
    /// Wait until at least one request has finished and append the finished slots to
    /// `done`. A request that failed is an error.
    fn complete(&mut self, done: &mut Vec<usize>) -> Result<()>;
    /// The slot's buffer (after a read finished: the data read).
    fn data(&self, slot: usize) -> &[u8];
    /// Fill the slot's buffer (what its next write writes).
    fn set_data(&mut self, slot: usize, data: &[u8]);
}

/// Random block offsets (xorshift64*) in a volume of `blocks` blocks.
pub struct Offsets {
    state: u64,
    blocks: u64,
}

impl Offsets {
    pub fn new(seed: u64, blocks: u64) -> Offsets {
        Offsets {
            // xorshift must not start at 0.
            state: seed | 1,
            blocks: blocks.max(1),
        }
    }

    /// The byte offset of the next block.
    pub fn next_offset(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let x = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x % self.blocks) * BLOCK as u64
    }
}

/// One workload: `qd` requests of `op` in flight over `blocks` blocks, for `warmup` and
/// then a measuring window of `duration`.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub op: Op,
    pub qd: usize,
    pub blocks: u64,
    pub seed: u64,
    pub warmup: Duration,
    pub duration: Duration,
}

/// What one run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Latencies of the requests that finished inside the measuring window, sorted.
    latencies: Vec<Duration>,
    window: Duration,
    /// Every request the run made (warm-up and the final drain included), to divide a
    /// process's CPU time over the whole run by.
    pub total_requests: u64,
}

impl Outcome {
    /// Requests per second in the measuring window.
    pub fn iops(&self) -> f64 {
        self.latencies.len() as f64 / self.window.as_secs_f64()
    }

    pub fn mean(&self) -> Duration {
        let sum: Duration = self.latencies.iter().sum();
        sum / u32::try_from(self.latencies.len().max(1)).unwrap_or(u32::MAX)
    }

    /// The `p`-th percentile (0 < p <= 100), nearest rank.
    pub fn percentile(&self, p: f64) -> Duration {
        let n = self.latencies.len();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.latencies[rank.clamp(1, n) - 1]
    }
}

/// Run `workload` on `client`: fill every slot, then each time a request finishes, time it
/// and (until the window ends) start the slot's next one; finally wait for the stragglers.
pub fn run(client: &mut dyn Client, workload: &Workload) -> Result<Outcome> {
    if workload.qd == 0 {
        bail!("queue depth 0");
    }
    let mut offsets = Offsets::new(workload.seed, workload.blocks);
    let begin = Instant::now();
    let window_start = begin + workload.warmup;
    let window_end = window_start + workload.duration;
    let mut started = vec![begin; workload.qd];
    for (slot, start) in started.iter_mut().enumerate() {
        *start = Instant::now();
        client.submit(slot, workload.op, offsets.next_offset())?;
    }
    let mut in_flight = workload.qd;
    let mut total_requests = 0u64;
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut done = Vec::with_capacity(workload.qd);
    while in_flight > 0 {
        done.clear();
        client.complete(&mut done)?;
        let now = Instant::now();
        for &slot in &done {
            in_flight -= 1;
            total_requests += 1;
            if now >= window_start && now <= window_end {
                latencies.push(now - started[slot]);
            }
            if now < window_end {
                started[slot] = Instant::now();
                client.submit(slot, workload.op, offsets.next_offset())?;
                in_flight += 1;
            }
        }
    }
    latencies.sort_unstable();
    Ok(Outcome {
        latencies,
        window: workload.duration,
        total_requests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client whose requests finish in submission order, one per `complete`.
    struct Fifo {
        queue: std::collections::VecDeque<(usize, Op, u64)>,
        seen: Vec<(Op, u64)>,
        buffers: Vec<Vec<u8>>,
    }

    impl Client for Fifo {
        fn submit(&mut self, slot: usize, op: Op, offset: u64) -> Result<()> {
            assert!(
                !self.queue.iter().any(|(s, _, _)| *s == slot),
                "slot {slot} submitted while in flight"
            );
            self.queue.push_back((slot, op, offset));
            self.seen.push((op, offset));
            Ok(())
        }
        fn complete(&mut self, done: &mut Vec<usize>) -> Result<()> {
            let (slot, _, _) = self
                .queue
                .pop_front()
                .expect("complete with nothing in flight");
            done.push(slot);
            Ok(())
        }
        fn data(&self, slot: usize) -> &[u8] {
            &self.buffers[slot]
        }
        fn set_data(&mut self, slot: usize, data: &[u8]) {
            self.buffers[slot] = data.to_vec();
        }
    }

    fn fifo(qd: usize) -> Fifo {
        Fifo {
            queue: Default::default(),
            seen: Vec::new(),
            buffers: vec![vec![0; BLOCK]; qd],
        }
    }

    #[test]
    fn offsets_are_block_aligned_inside_the_volume_and_repeat_for_a_seed() {
        let (mut a, mut b) = (Offsets::new(7, 100), Offsets::new(7, 100));
        let xs: Vec<u64> = (0..1000).map(|_| a.next_offset()).collect();
        assert!(xs
            .iter()
            .all(|&x| x % BLOCK as u64 == 0 && x < 100 * BLOCK as u64));
        assert_eq!(xs, (0..1000).map(|_| b.next_offset()).collect::<Vec<_>>());
        let distinct: std::collections::HashSet<_> = xs.iter().collect();
        assert!(
            distinct.len() > 90,
            "only {} of 100 blocks drawn",
            distinct.len()
        );
    }

    #[test]
    fn a_run_keeps_qd_in_flight_uses_the_seeded_offsets_and_drains() {
        let workload = Workload {
            op: Op::Write,
            qd: 4,
            blocks: 1000,
            seed: 42,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(20),
        };
        let mut client = fifo(4);
        let outcome = run(&mut client, &workload).expect("run");
        assert!(client.queue.is_empty(), "requests left in flight");
        assert_eq!(outcome.total_requests as usize, client.seen.len());
        let mut offsets = Offsets::new(42, 1000);
        let expected: Vec<(Op, u64)> = (0..client.seen.len())
            .map(|_| (Op::Write, offsets.next_offset()))
            .collect();
        assert_eq!(client.seen, expected);
        assert!(outcome.iops() > 0.0);
        assert!(outcome.percentile(99.0) >= outcome.percentile(50.0));
    }
}
