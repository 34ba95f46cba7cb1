//! The Secondary's core driven step by step: hand-written cases, then seeded schedules
//! (random completion order, backpressure, device failures) checked against its rules after
//! every step. `TANDEM_SIM_SEEDS=N` runs N schedules instead of the default.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::device::DeviceError;
use crate::wire::{WriteOutcome, WriteRequest};

const UNIT: u64 = 4096;
const UNITS: u64 = 16;
const SIZE: u64 = UNIT * UNITS;

fn write(seq: u64, epoch: u64, unit: u64, units: u64, fua: bool) -> Message {
    let mut data = vec![0u8; (units * UNIT) as usize];
    for u in 0..units as usize {
        data[u * UNIT as usize..][..8].copy_from_slice(&seq.to_le_bytes());
    }
    Message::Write(WriteRequest {
        seq,
        epoch,
        offset: unit * UNIT,
        fua,
        ack_on_receive: false,
        data: Bytes::from(data),
    })
}

fn write_ack(seq: u64) -> Message {
    Message::WriteAck {
        seq,
        outcome: WriteOutcome::Written,
    }
}

fn drain(core: &mut SecondaryCore) -> Vec<SecondaryAction> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

fn started(actions: &[SecondaryAction]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            SecondaryAction::Start(Job {
                work: Work::Request { seq, .. },
                ..
            }) => Some(*seq),
            _ => None,
        })
        .collect()
}

#[test]
fn requests_of_one_epoch_start_together_and_the_next_epoch_waits_for_all_of_them() {
    let mut core = SecondaryCore::new(false, 1 << 20);
    for (seq, unit) in [(1, 0), (2, 1), (3, 2)] {
        core.handle_message(write(seq, 7, unit, 1, false), SIZE)
            .unwrap();
    }
    core.handle_message(Message::Barrier { epoch: 7 }, SIZE)
        .unwrap();
    core.handle_message(write(4, 8, 0, 1, false), SIZE).unwrap();
    assert_eq!(started(&drain(&mut core)), vec![1, 2, 3]);

    core.handle_done(UNIT as usize + FRAME_OVERHEAD, Ok(write_ack(2)));
    core.handle_done(UNIT as usize + FRAME_OVERHEAD, Ok(write_ack(1)));
    let actions = drain(&mut core);
    assert!(
        started(&actions).is_empty(),
        "epoch 8 started before epoch 7 was done"
    );

    core.handle_done(UNIT as usize + FRAME_OVERHEAD, Ok(write_ack(3)));
    let actions = drain(&mut core);
    let acked: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            SecondaryAction::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(acked, vec![write_ack(3), Message::BarrierAck { epoch: 7 }]);
    assert_eq!(started(&actions), vec![4]);
}

#[test]
fn a_request_beyond_the_device_is_refused_before_anything_starts() {
    let mut core = SecondaryCore::new(false, 1 << 20);
    let err = core
        .handle_message(write(1, 0, UNITS - 1, 2, false), SIZE)
        .unwrap_err();
    assert!(matches!(err, DatapathError::PeerOutOfRange { .. }), "{err}");
    assert!(drain(&mut core).is_empty());
}

#[test]
fn a_request_of_a_closed_epoch_is_a_protocol_error() {
    let mut core = SecondaryCore::new(false, 1 << 20);
    core.handle_message(write(1, 3, 0, 1, false), SIZE).unwrap();
    core.handle_message(Message::Barrier { epoch: 3 }, SIZE)
        .unwrap();
    let err = core
        .handle_message(write(2, 3, 1, 1, false), SIZE)
        .unwrap_err();
    assert!(matches!(err, DatapathError::PeerProtocol(_)), "{err}");
}

#[test]
fn protocol_b_acknowledges_on_receipt_and_never_applies_inline() {
    let mut core = SecondaryCore::new(true, 1 << 20);
    let Message::Write(mut w) = write(1, 0, 0, 1, false) else {
        unreachable!()
    };
    w.ack_on_receive = true;
    core.handle_message(Message::Write(w), SIZE).unwrap();
    let actions = drain(&mut core);
    assert!(matches!(
        &actions[0],
        SecondaryAction::Send(Message::RecvAck { seq: 1 })
    ));
    assert!(matches!(
        &actions[1],
        SecondaryAction::Start(Job { inline: false, .. })
    ));
}

fn received_under_b(seq: u64, epoch: u64, unit: u64) -> Message {
    let Message::Write(mut w) = write(seq, epoch, unit, 1, false) else {
        unreachable!()
    };
    w.ack_on_receive = true;
    Message::Write(w)
}

/// Under B the Primary may have completed a request on its RecvAck while it waits here
/// behind a barrier: after the link is lost it still runs, in epoch order, unacknowledged.
/// Under C nothing queued was acknowledged, and nothing queued runs.
#[test]
fn after_link_loss_requests_received_under_b_still_run_in_epoch_order() {
    let mut core = SecondaryCore::new(false, 1 << 20);
    core.handle_message(received_under_b(1, 0, 0), SIZE)
        .unwrap();
    core.handle_message(Message::Barrier { epoch: 0 }, SIZE)
        .unwrap();
    core.handle_message(received_under_b(2, 1, 1), SIZE)
        .unwrap();
    core.handle_message(Message::Flush { id: 9 }, SIZE).unwrap();
    assert_eq!(started(&drain(&mut core)), vec![1]);
    core.handle_link_down();
    assert!(!core.wants_input());
    assert!(
        started(&drain(&mut core)).is_empty(),
        "epoch 1 overtook epoch 0"
    );
    core.handle_done(UNIT as usize + FRAME_OVERHEAD, Ok(write_ack(1)));
    let actions = drain(&mut core);
    assert_eq!(started(&actions), vec![2]);
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            SecondaryAction::Start(Job {
                work: Work::Flush { .. },
                ..
            })
        )),
        "a flush queued after the link went down was started"
    );

    let mut core = SecondaryCore::new(false, 1 << 20);
    core.handle_message(write(1, 0, 0, 1, false), SIZE).unwrap();
    core.handle_message(Message::Barrier { epoch: 0 }, SIZE)
        .unwrap();
    core.handle_message(write(2, 1, 1, 1, false), SIZE).unwrap();
    assert_eq!(started(&drain(&mut core)), vec![1]);
    core.handle_link_down();
    core.handle_done(UNIT as usize + FRAME_OVERHEAD, Ok(write_ack(1)));
    assert!(started(&drain(&mut core)).is_empty());
}

#[test]
fn a_failed_request_is_never_acknowledged_and_stops_the_pipeline() {
    let mut core = SecondaryCore::new(false, 1 << 20);
    core.handle_message(write(1, 0, 0, 1, false), SIZE).unwrap();
    core.handle_message(Message::Barrier { epoch: 0 }, SIZE)
        .unwrap();
    core.handle_message(write(2, 1, 1, 1, false), SIZE).unwrap();
    drain(&mut core);
    let failure = DatapathError::Local {
        op: "write",
        source: DeviceError::Io {
            op: "write",
            offset: 0,
            len: UNIT,
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        },
    };
    core.handle_done(UNIT as usize + FRAME_OVERHEAD, Err(failure));
    let actions = drain(&mut core);
    assert_eq!(actions.len(), 1);
    assert!(matches!(actions[0], SecondaryAction::Fail(_)));
    assert!(!core.wants_input());
}

#[test]
fn inline_writes_are_bounded_per_pass() {
    let mut core = SecondaryCore::new(true, 64 << 20);
    // 12 writes of 128 KiB = 1.5 MiB in one epoch: only 1 MiB of it inline per pass.
    let big = Bytes::from(vec![1u8; INLINE_WRITE_MAX]);
    for seq in 0..12u64 {
        let msg = Message::Write(WriteRequest {
            seq,
            epoch: 0,
            offset: seq * INLINE_WRITE_MAX as u64,
            fua: false,
            ack_on_receive: false,
            data: big.clone(),
        });
        core.handle_message(msg, 64 << 20).unwrap();
    }
    let inline: usize = drain(&mut core)
        .iter()
        .filter(|a| matches!(a, SecondaryAction::Start(Job { inline: true, .. })))
        .count();
    assert_eq!(inline * INLINE_WRITE_MAX, INLINE_BYTES_PER_PASS);
}

#[test]
fn resync_data_is_applied_in_link_order_with_the_requests() {
    let mut core = SecondaryCore::new(false, 1 << 20);
    core.handle_message(write(1, 0, 0, 1, false), SIZE).unwrap();
    core.handle_message(Message::Barrier { epoch: 0 }, SIZE)
        .unwrap();
    let data = crate::resync::proto::ResyncMsg::Data {
        id: 9,
        offset: 0,
        data: Bytes::from(vec![2u8; UNIT as usize]),
    };
    core.handle_message(data.to_message(), SIZE).unwrap();
    let actions = drain(&mut core);
    assert_eq!(actions.len(), 1, "resync data overtook the open epoch");
    core.handle_done(UNIT as usize + FRAME_OVERHEAD, Ok(write_ack(1)));
    let actions = drain(&mut core);
    assert!(matches!(
        actions.last(),
        Some(SecondaryAction::Start(Job {
            work: Work::ResyncData { id: 9, .. },
            ..
        }))
    ));
}

// ---- seeded schedules ----

/// One request of the Primary's history.
struct Planned {
    epoch: u64,
    units: std::ops::Range<u64>,
    /// Tag the units hold after it (0 for trim and write-zeroes).
    tag: u64,
}

/// A Primary's history in link order, as a Primary produces it: requests of one epoch never
/// overlap (conflicting writes wait), epochs end with a Barrier, a flush opens an epoch.
fn history(rng: &mut StdRng) -> (Vec<Message>, BTreeMap<u64, Planned>) {
    let mut msgs = Vec::new();
    let mut planned = BTreeMap::new();
    let mut seq = 1;
    let first_epoch = rng.gen_range(0..1000);
    let epochs = rng.gen_range(1..8);
    for epoch in first_epoch..first_epoch + epochs {
        if rng.gen_bool(0.3) {
            msgs.push(Message::Flush { id: epoch });
        }
        let mut free: Vec<u64> = (0..UNITS).collect();
        for _ in 0..rng.gen_range(1..6) {
            if free.is_empty() {
                break;
            }
            let start = free.swap_remove(rng.gen_range(0..free.len()));
            let mut units = start..start + 1;
            while rng.gen_bool(0.4) && free.contains(&units.end) {
                free.retain(|u| *u != units.end);
                units.end += 1;
            }
            let fua = rng.gen_bool(0.2);
            let range = RangeRequest {
                seq,
                epoch,
                offset: units.start * UNIT,
                len: (units.end - units.start) * UNIT,
                fua,
                ack_on_receive: rng.gen_bool(0.3),
                may_unmap: rng.gen_bool(0.5),
            };
            let (msg, tag) = match rng.gen_range(0..10) {
                0 => (Message::Trim(range), 0),
                1 => (Message::WriteZeroes(range), 0),
                _ => (
                    write(seq, epoch, units.start, units.end - units.start, fua),
                    seq,
                ),
            };
            msgs.push(msg);
            planned.insert(seq, Planned { epoch, units, tag });
            seq += 1;
        }
        msgs.push(Message::Barrier { epoch });
    }
    (msgs, planned)
}

/// The device as the core's jobs leave it: one tag per unit.
struct Disk(Vec<u64>);

impl Disk {
    fn apply(&mut self, offset: u64, op: &Op) {
        let units = offset / UNIT..(offset + op.len()) / UNIT;
        for u in units {
            self.0[u as usize] = match op {
                Op::Write { data, .. } => {
                    let at = ((u * UNIT - offset) as usize)..;
                    u64::from_le_bytes(data[at][..8].try_into().unwrap())
                }
                _ => 0,
            };
        }
    }
}

/// Runs one seeded schedule; `Err` names the rule that was broken.
fn run_schedule(seed: u64, barrier_early: bool) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (msgs, planned) = history(&mut rng);
    let fail_seq = rng
        .gen_bool(0.15)
        .then(|| rng.gen_range(1..=planned.len() as u64));
    let max_held = rng.gen_range(1..4) * (UNIT as usize + FRAME_OVERHEAD);
    let mut core = SecondaryCore::new(rng.gen_bool(0.5), max_held);
    core.fault_barrier_early = barrier_early;

    let mut next = msgs.into_iter().peekable();
    let mut running: Vec<Job> = Vec::new();
    let mut done: BTreeSet<u64> = BTreeSet::new();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut barrier_acked: Option<u64> = None;
    let mut failed = false;
    let mut disk = Disk(vec![0; UNITS as usize]);
    let repro = |rule: &str| format!("seed {seed}: {rule}");

    loop {
        while let Some(action) = core.poll_action() {
            match action {
                SecondaryAction::Send(Message::WriteAck { seq, .. }) => {
                    if !done.contains(&seq) || Some(seq) == fail_seq {
                        return Err(repro(&format!(
                            "request {seq} acknowledged before it was done"
                        )));
                    }
                    acked.insert(seq);
                }
                SecondaryAction::Send(Message::BarrierAck { epoch }) => {
                    let open = planned
                        .iter()
                        .find(|(seq, p)| p.epoch <= epoch && !done.contains(seq));
                    if let Some((seq, _)) = open {
                        return Err(repro(&format!(
                            "barrier {epoch} acknowledged before request {seq} was done"
                        )));
                    }
                    if barrier_acked.is_some_and(|b| b >= epoch) {
                        return Err(repro("barrier acknowledgements out of order"));
                    }
                    barrier_acked = Some(epoch);
                }
                SecondaryAction::Send(_) | SecondaryAction::Extension(_) => {}
                SecondaryAction::Fail(_) => failed = true,
                SecondaryAction::Start(job) => {
                    if failed {
                        return Err(repro("a job started after a failure"));
                    }
                    if let Work::Request { seq, .. } = &job.work {
                        let epoch = planned[seq].epoch;
                        let earlier = planned
                            .iter()
                            .find(|(s, p)| p.epoch < epoch && !done.contains(s));
                        if let Some((s, _)) = earlier {
                            return Err(repro(&format!("request {seq} started before request {s} of an earlier epoch was done")));
                        }
                    }
                    running.push(job);
                }
            }
        }
        let can_read = core.wants_input() && next.peek().is_some();
        if !running.is_empty() && (!can_read || rng.gen_bool(0.5)) {
            let job = running.swap_remove(rng.gen_range(0..running.len()));
            let reply = match &job.work {
                Work::Request { seq, .. } if Some(*seq) == fail_seq => {
                    Err(DatapathError::WriteIntent("injected".into()))
                }
                Work::Request { seq, offset, op } => {
                    disk.apply(*offset, op);
                    done.insert(*seq);
                    Ok(write_ack(*seq))
                }
                Work::Flush { id } => Ok(Message::FlushAck { id: *id }),
                other => return Err(repro(&format!("unexpected job {other:?}"))),
            };
            core.handle_done(job.held, reply);
        } else if can_read {
            if let Some(msg) = next.next() {
                core.handle_message(msg, SIZE)
                    .map_err(|e| repro(&format!("a valid request was refused: {e}")))?;
            }
        } else {
            break;
        }
    }

    if failed || fail_seq.is_some() {
        return match fail_seq {
            Some(seq) if acked.contains(&seq) => Err(repro("a failed request was acknowledged")),
            _ => Ok(()),
        };
    }
    if acked.len() != planned.len() {
        return Err(repro("a request was never acknowledged"));
    }
    let mut expected = Disk(vec![0; UNITS as usize]);
    for p in planned.values() {
        for u in p.units.clone() {
            expected.0[u as usize] = p.tag;
        }
    }
    if disk.0 != expected.0 {
        return Err(repro(
            "the disk is not the Primary's history applied in epoch order",
        ));
    }
    Ok(())
}

fn seeds() -> u64 {
    std::env::var("TANDEM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000)
}

#[test]
fn seeded_schedules_keep_epoch_order_and_acknowledge_only_done_work() {
    for seed in 0..seeds() {
        if let Err(violation) = run_schedule(seed, false) {
            panic!("{violation} (reproduce: TANDEM_SIM_SEEDS={} cargo test -p tandem-replication seeded_schedules)", seed + 1);
        }
    }
}

#[test]
fn the_schedules_catch_a_barrier_acknowledged_early() {
    let caught = (0..seeds()).find_map(|seed| run_schedule(seed, true).err());
    assert!(caught.is_some(), "no schedule noticed the injected fault");
}
