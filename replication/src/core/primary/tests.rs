//! The Primary's core driven step by step: numbering and epochs, the protocols' wait
//! points, peer loss, and the in-flight table.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;

use super::*;

fn write(len: usize, fua: bool) -> Op {
    Op::Write {
        data: Bytes::from(vec![7u8; len]),
        fua,
    }
}

fn drain(core: &mut PrimaryCore) -> Vec<PrimaryAction> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

fn write_ack(seq: u64) -> Message {
    Message::WriteAck {
        seq,
        outcome: WriteOutcome::Written,
    }
}

#[test]
fn a_request_goes_to_every_sendable_peer_and_a_known_absent_one_is_out_of_sync() {
    let mut core = PrimaryCore::new(ReplicationProtocol::C, 100);
    core.set_known_peers(&["hv2".into(), "hv3".into()]);
    let hv2 = core.attach_peer("hv2");
    let started = core.start_request(4096, &write(4096, false), &[hv2]);
    assert_eq!(started.unacknowledged, vec!["hv3".to_string()]);
    let actions = drain(&mut core);
    assert!(matches!(&actions[0], PrimaryAction::SendRequest { peer, .. } if *peer == hv2));
    assert_eq!(
        actions[1],
        PrimaryAction::OutOfSync {
            peer: "hv3".into(),
            offset: 4096,
            len: 4096
        }
    );
    let wait = started.wait.unwrap();
    // The WriteAck tells the shell how many bytes left the peer's in-flight figure.
    assert_eq!(core.handle_peer_message(hv2, write_ack(started.seq)), 4096);
    assert_eq!(
        drain(&mut core),
        vec![PrimaryAction::PeersDone {
            wait,
            unacknowledged: vec![]
        }]
    );
    assert!(core.is_replicated());
}

#[test]
fn protocol_b_waits_for_receipt_but_keeps_the_request_pending_until_written() {
    let mut core = PrimaryCore::new(ReplicationProtocol::B, 100);
    let hv2 = core.attach_peer("hv2");
    let started = core.start_request(0, &write(4096, false), &[hv2]);
    drain(&mut core);
    assert_eq!(
        core.handle_peer_message(hv2, Message::RecvAck { seq: started.seq }),
        0
    );
    assert!(matches!(
        drain(&mut core)[..],
        [PrimaryAction::PeersDone { .. }]
    ));
    assert!(!core.is_replicated());
    // Lost before the WriteAck: the range is out of sync, the (ended) wait untouched.
    core.handle_link_down(hv2);
    assert_eq!(
        drain(&mut core),
        vec![PrimaryAction::OutOfSync {
            peer: "hv2".into(),
            offset: 0,
            len: 4096
        }]
    );
}

#[test]
fn protocol_a_waits_for_nothing_and_closes_the_epoch_on_completion() {
    let mut core = PrimaryCore::new(ReplicationProtocol::A, 100);
    let hv2 = core.attach_peer("hv2");
    let started = core.start_request(0, &write(4096, false), &[hv2]);
    assert_eq!(started.wait, None);
    assert!(started.closes_epoch);
    drain(&mut core);
    core.request_finished(started.epoch);
    assert_eq!(
        drain(&mut core),
        vec![PrimaryAction::Send {
            peer: hv2,
            msg: Message::Barrier {
                epoch: started.epoch
            }
        }]
    );
    let next = core.start_request(8192, &write(4096, false), &[hv2]);
    assert_eq!(next.epoch, started.epoch + 1);
}

#[test]
fn a_lost_peer_ends_every_wait_on_it_with_the_peer_named_and_its_ranges_out_of_sync() {
    let mut core = PrimaryCore::new(ReplicationProtocol::C, 100);
    let hv2 = core.attach_peer("hv2");
    let hv3 = core.attach_peer("hv3");
    let a = core.start_request(0, &write(4096, false), &[hv2, hv3]);
    let b = core.start_request(8192, &write(4096, false), &[hv2, hv3]);
    let flush = core.start_flush(true).unwrap();
    drain(&mut core);
    core.handle_peer_message(hv3, write_ack(a.seq));
    core.handle_peer_message(hv3, write_ack(b.seq));
    core.handle_peer_message(hv3, Message::FlushAck { id: 2 });
    assert!(drain(&mut core).is_empty(), "hv2 has not answered");
    assert_eq!(core.peers_holding(flush), vec![hv2]);
    assert_eq!(core.handle_link_down(hv2), 2);
    let actions = drain(&mut core);
    let lost = vec!["hv2".to_string()];
    assert_eq!(
        actions,
        vec![
            PrimaryAction::OutOfSync {
                peer: "hv2".into(),
                offset: 0,
                len: 4096
            },
            PrimaryAction::PeersDone {
                wait: a.wait.unwrap(),
                unacknowledged: lost.clone()
            },
            PrimaryAction::OutOfSync {
                peer: "hv2".into(),
                offset: 8192,
                len: 4096
            },
            PrimaryAction::PeersDone {
                wait: b.wait.unwrap(),
                unacknowledged: lost.clone()
            },
            PrimaryAction::PeersDone {
                wait: flush,
                unacknowledged: lost
            },
        ]
    );
}

#[test]
fn barriers_separate_epochs_and_a_new_peer_starts_on_a_boundary() {
    let mut core = PrimaryCore::new(ReplicationProtocol::C, 2);
    let hv2 = core.attach_peer("hv2");
    let first = core.start_request(0, &write(4096, false), &[hv2]);
    core.start_request(4096, &write(4096, false), &[hv2]);
    let third = core.start_request(8192, &write(4096, false), &[hv2]);
    assert_eq!(
        third.epoch,
        first.epoch + 1,
        "max_epoch_requests closes the epoch"
    );
    drain(&mut core);
    let hv3 = core.attach_peer("hv3");
    let barrier = Message::Barrier { epoch: third.epoch };
    assert_eq!(
        drain(&mut core),
        vec![PrimaryAction::Send {
            peer: hv2,
            msg: barrier
        }]
    );
    let fourth = core.start_request(0, &write(4096, false), &[hv2, hv3]);
    assert_eq!(fourth.epoch, third.epoch + 1);
}

#[test]
fn an_acknowledgement_for_an_unknown_request_is_a_protocol_violation() {
    let mut core = PrimaryCore::new(ReplicationProtocol::C, 100);
    let hv2 = core.attach_peer("hv2");
    core.handle_peer_message(hv2, write_ack(42));
    assert!(matches!(
        &drain(&mut core)[..],
        [PrimaryAction::Reject { peer, reason }] if *peer == hv2 && reason.contains("42")
    ));
}

#[test]
fn overlapping_claims_wait_and_reservations_hold_back_new_requests_only() {
    let mut core = PrimaryCore::new(ReplicationProtocol::C, 100);
    assert!(core.try_claim(0, 8192, true));
    assert!(!core.try_claim(4096, 12288, true));
    assert!(
        core.try_claim(8192, 12288, true),
        "adjacent ranges do not overlap"
    );
    core.reserve(16384, 20480);
    assert!(
        !core.try_claim(16384, 20480, true),
        "a request yields to a reservation"
    );
    assert!(
        core.try_claim(16384, 20480, false),
        "the reserving caller does not"
    );
    core.unreserve(16384, 20480);
    core.release(0);
    assert!(core.try_claim(4096, 8192, true));
}

#[test]
fn a_peer_holding_a_wait_past_its_deadline_is_named_once_and_its_loss_ends_the_wait() {
    let t0 = std::time::Instant::now();
    let secs = std::time::Duration::from_secs;
    let mut core = PrimaryCore::new(ReplicationProtocol::C, 100);
    let hv2 = core.attach_peer("hv2");
    let hv3 = core.attach_peer("hv3");
    let a = core.start_request(0, &write(4096, false), &[hv2, hv3]);
    let b = core.start_request(8192, &write(4096, false), &[hv2, hv3]);
    core.set_deadline(a.wait.unwrap(), t0 + secs(30));
    core.set_deadline(b.wait.unwrap(), t0 + secs(31));
    drain(&mut core);
    assert_eq!(core.poll_timeout(), Some(t0 + secs(30)));
    // hv2 answers both; hv3 answers neither.
    core.handle_peer_message(hv2, write_ack(a.seq));
    core.handle_peer_message(hv2, write_ack(b.seq));
    assert!(core.handle_timeout(t0 + secs(29)).is_empty());
    assert_eq!(core.handle_timeout(t0 + secs(31)), vec![hv3]);
    // Each deadline fires once.
    assert_eq!(core.poll_timeout(), None);
    assert!(core.handle_timeout(t0 + secs(60)).is_empty());
    core.handle_link_down(hv3);
    let done: Vec<_> = drain(&mut core)
        .into_iter()
        .filter(|a| matches!(a, PrimaryAction::PeersDone { .. }))
        .collect();
    assert_eq!(
        done,
        vec![
            PrimaryAction::PeersDone {
                wait: a.wait.unwrap(),
                unacknowledged: vec!["hv3".into()]
            },
            PrimaryAction::PeersDone {
                wait: b.wait.unwrap(),
                unacknowledged: vec!["hv3".into()]
            },
        ]
    );
}

#[test]
fn the_deadline_of_an_answered_wait_never_fires() {
    let t0 = std::time::Instant::now();
    let mut core = PrimaryCore::new(ReplicationProtocol::C, 100);
    let hv2 = core.attach_peer("hv2");
    let a = core.start_request(0, &write(4096, false), &[hv2]);
    core.set_deadline(a.wait.unwrap(), t0);
    core.handle_peer_message(hv2, write_ack(a.seq));
    assert_eq!(core.poll_timeout(), None);
    assert!(core.handle_timeout(t0).is_empty());
}
