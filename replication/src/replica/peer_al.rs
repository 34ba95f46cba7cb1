//! The activity log for peer writes: the requests this replica applies for a Primary (as a
//! Secondary, or as the first of two Primaries for the second's writes) take their extents
//! in the same log as local writes, as DRBD 9 does. A replica that crashes with such writes
//! in flight then comes back with their extents in every peer bitmap and uncertain towards
//! its peers (`metadata.rs`), so it is resynced there even when the Primary that sent them
//! is gone too.

use std::sync::{Arc, Weak};

use crate::datapath::{WriteIntentHooks, WriteIntentLog};

use super::volume::Replica;

struct PeerWriteIntent {
    replica: Weak<Replica>,
}

impl WriteIntentLog for PeerWriteIntent {
    fn try_begin(&self, offset: u64, len: u64) -> bool {
        self.replica
            .upgrade()
            .is_none_or(|r| r.al_try_begin(offset, len))
    }

    fn begin(&self, offset: u64, len: u64) -> Result<(), String> {
        match self.replica.upgrade() {
            Some(r) => r.al_begin_blocking(offset, len).map_err(|e| {
                // The whole chain: the cause (an I/O error) is what an operator needs.
                let mut msg = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    msg = format!("{msg}: {c}");
                    cause = c.source();
                }
                msg
            }),
            None => Err("the replica is closed".into()),
        }
    }

    fn end(&self, offset: u64, len: u64) {
        if let Some(r) = self.replica.upgrade() {
            r.al_end(offset, len);
        }
    }
}

impl Replica {
    /// The write-intent log for the peer writes applied on this replica.
    pub(super) fn peer_write_intent(&self) -> WriteIntentHooks {
        WriteIntentHooks(Arc::new(PeerWriteIntent {
            replica: self.me.clone(),
        }))
    }
}
