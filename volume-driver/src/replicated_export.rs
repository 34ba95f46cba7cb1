//! Frontend access to a replicated volume: the role rules of issue 4 around the engine's
//! replica, and the [`ExportHandle`] that forwards I/O to it.
//!
//! - Opening for writing promotes the local replica when it is Secondary; when the engine
//!   refuses, the open is refused with the engine's message ("vm-100-disk-0 is Primary on
//!   hv2"), which the NBD server sends during the handshake.
//! - Opening read-only needs the local replica to be Primary already: a Secondary never
//!   serves reads, because its data may be stale (a peer may be writing, or it may be
//!   Outdated) and a reader cannot tell. Promote it (or open it for writing) first.
//! - Dropping the last writable handle demotes the replica, unless it was promoted with
//!   `tandem volume promote` (then it stays Primary until `tandem volume demote`).
//! - `tandem volume demote` is refused while writers are open.
//!
//! Promotion, demotion and the open/close bookkeeping of one volume are serialized by an
//! async mutex, so two clients opening at once cannot both promote, and a demotion after the
//! last close cannot race a new open.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use control_api::{ApiError, ErrorKind, Role, VolumeStatus};

use crate::engine::{EngineFailure, EngineReplica, FailureKind};
use crate::frontend::{ExportHandle, ExportIoError, IoErrorKind, OpenError};

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    writers: usize,
    handles: usize,
    promoted_explicitly: bool,
}

/// A replicated volume's engine replica plus the daemon's role bookkeeping.
pub struct ReplicaRuntime {
    name: String,
    replica: Arc<dyn EngineReplica>,
    roles: tokio::sync::Mutex<()>,
    counts: Mutex<Counts>,
}

/// Map an engine failure to the API.
pub fn engine_error(error: EngineFailure) -> ApiError {
    let kind = match error.kind {
        FailureKind::Refused | FailureKind::NotPrimary => ErrorKind::Refused,
        FailureKind::Shutdown => ErrorKind::Busy,
        FailureKind::Io | FailureKind::Failed => ErrorKind::Internal,
    };
    ApiError::new(kind, error.message)
}

fn io_error(error: EngineFailure) -> ExportIoError {
    let kind = match error.kind {
        FailureKind::NotPrimary | FailureKind::Shutdown => IoErrorKind::Shutdown,
        FailureKind::Refused => IoErrorKind::Io,
        FailureKind::Io | FailureKind::Failed => IoErrorKind::Io,
    };
    ExportIoError::new(kind, error.message)
}

impl ReplicaRuntime {
    pub fn new(name: &str, replica: Arc<dyn EngineReplica>) -> Arc<ReplicaRuntime> {
        Arc::new(ReplicaRuntime {
            name: name.to_string(),
            replica,
            roles: tokio::sync::Mutex::new(()),
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn replica(&self) -> &Arc<dyn EngineReplica> {
        &self.replica
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open frontend handles (readers and writers).
    pub fn open_handles(&self) -> usize {
        self.counts().handles
    }

    /// The engine's status plus `promoted_explicitly` and `open_writers`.
    pub fn status(&self) -> VolumeStatus {
        let counts = *self.counts();
        let replica = self.replica.status();
        // An explicit promotion ends with the Primary role, also when the engine stepped
        // down by itself (force-secondary) or the daemon restarted.
        let primary = replica.role == Role::Primary;
        VolumeStatus {
            replica,
            promoted_explicitly: counts.promoted_explicitly && primary,
            open_writers: counts.writers,
        }
    }

    /// Open a frontend handle under the rules in the module doc.
    pub async fn open(
        self: &Arc<Self>,
        writable: bool,
    ) -> Result<Arc<ReplicatedExport>, OpenError> {
        let _roles = self.roles.lock().await;
        let primary = self.replica.status().role == Role::Primary;
        if writable {
            if !primary {
                self.replica
                    .promote()
                    .await
                    .map_err(|e| OpenError::Refused(e.message))?;
                tracing::info!(volume = %self.name, "promoted for a writer (auto-promote)");
            }
        } else if !primary {
            return Err(OpenError::Refused(format!(
                "{}: the local replica is Secondary, and a Secondary serves no reads (its data \
                 may be stale); open it for writing, or run `tandem volume promote {}`",
                self.name, self.name
            )));
        }
        let mut counts = self.counts();
        counts.handles += 1;
        if writable {
            counts.writers += 1;
        }
        Ok(Arc::new(ReplicatedExport {
            runtime: Arc::clone(self),
            writable,
        }))
    }

    /// `tandem volume promote`: Primary until `tandem volume demote`.
    pub async fn promote_explicitly(&self) -> Result<(), ApiError> {
        let _roles = self.roles.lock().await;
        // Set before the promotion: the engine is Primary before `promote` returns (while
        // it makes that durable), and a status taken then must say why.
        let before = std::mem::replace(&mut self.counts().promoted_explicitly, true);
        if self.replica.status().role != Role::Primary {
            if let Err(e) = self.replica.promote().await {
                self.counts().promoted_explicitly = before;
                return Err(engine_error(e));
            }
        }
        tracing::info!(volume = %self.name, "promoted (explicitly)");
        Ok(())
    }

    /// `tandem volume demote`: refused while writers are open.
    pub async fn demote_explicitly(&self) -> Result<(), ApiError> {
        let _roles = self.roles.lock().await;
        let writers = self.counts().writers;
        if writers > 0 {
            return Err(ApiError::new(
                ErrorKind::InUse,
                format!(
                    "{} is open for writing by {writers} client(s) (a running VM?); stop them first",
                    self.name
                ),
            ));
        }
        self.replica.demote().await.map_err(engine_error)?;
        self.counts().promoted_explicitly = false;
        tracing::info!(volume = %self.name, "demoted");
        Ok(())
    }

    /// `tandem volume demote --force`: demote even with writers open (their frozen and
    /// later requests fail); for fencing an isolated Primary.
    pub async fn demote_forcibly(&self) -> Result<(), ApiError> {
        let _roles = self.roles.lock().await;
        self.replica.demote_force().await.map_err(engine_error)?;
        self.counts().promoted_explicitly = false;
        tracing::warn!(volume = %self.name, "demoted by force");
        Ok(())
    }

    /// Called when a handle is dropped.
    fn closed(self: &Arc<Self>, writable: bool) {
        let demote = {
            let mut counts = self.counts();
            counts.handles = counts.handles.saturating_sub(1);
            if writable {
                counts.writers = counts.writers.saturating_sub(1);
            }
            writable && counts.writers == 0 && !counts.promoted_explicitly
        };
        if !demote {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(volume = %self.name, "last writer closed outside the runtime; not demoting");
            return;
        };
        let this = Arc::clone(self);
        runtime.spawn(async move { this.demote_after_last_writer().await });
    }

    async fn demote_after_last_writer(&self) {
        let _roles = self.roles.lock().await;
        let counts = *self.counts();
        // A new writer or an explicit promote may have come in meanwhile.
        if counts.writers > 0 || counts.promoted_explicitly {
            return;
        }
        if self.replica.status().role != Role::Primary {
            return;
        }
        match self.replica.demote().await {
            Ok(()) => tracing::info!(volume = %self.name, "last writer closed; demoted"),
            Err(e) => tracing::error!(volume = %self.name, error = %e,
                "last writer closed but the demotion failed; the replica stays Primary"),
        }
    }

    /// Wait until a pending last-writer demotion has run (tests, shutdown).
    pub async fn settle(&self) {
        drop(self.roles.lock().await);
    }
}

/// An open replicated volume; I/O goes through the engine (Primary only).
pub struct ReplicatedExport {
    runtime: Arc<ReplicaRuntime>,
    writable: bool,
}

impl Drop for ReplicatedExport {
    fn drop(&mut self) {
        self.runtime.closed(self.writable);
    }
}

impl ReplicatedExport {
    fn check_writable(&self) -> Result<(), ExportIoError> {
        if self.writable {
            Ok(())
        } else {
            Err(ExportIoError::new(
                IoErrorKind::ReadOnly,
                format!("{} is open read-only", self.runtime.name),
            ))
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ExportIoError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ExportIoError::new(
                IoErrorKind::Invalid,
                format!(
                    "{}: request at {offset} + {len} is beyond the end ({size})",
                    self.runtime.name
                ),
            )),
        }
    }
}

#[async_trait]
impl ExportHandle for ReplicatedExport {
    fn name(&self) -> &str {
        &self.runtime.name
    }

    fn size(&self) -> u64 {
        self.runtime.replica.size_bytes()
    }

    fn read_only(&self) -> bool {
        !self.writable
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportIoError> {
        self.check_range(offset, u64::from(len))?;
        self.runtime
            .replica
            .read(offset, len)
            .await
            .map_err(io_error)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportIoError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        self.runtime
            .replica
            .write(offset, data, fua)
            .await
            .map_err(io_error)
    }

    async fn flush(&self) -> Result<(), ExportIoError> {
        self.runtime.replica.flush().await.map_err(io_error)
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), ExportIoError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.runtime
            .replica
            .trim(offset, len)
            .await
            .map_err(io_error)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), ExportIoError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.runtime
            .replica
            .write_zeroes(offset, len, may_unmap)
            .await
            .map_err(io_error)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::options::VolumeOptions;
    use control_api::{DiskState, Protocol, ReplicaStatus, VerifySummary};

    /// A scripted replica: promotion refused while `primary_elsewhere` is set; I/O on a
    /// byte vector, Primary only.
    pub struct DummyReplica {
        pub primary: Mutex<bool>,
        pub primary_elsewhere: Mutex<Option<String>>,
        pub data: Mutex<Vec<u8>>,
        pub demotions: Mutex<usize>,
    }

    impl DummyReplica {
        pub fn new(size: usize) -> Arc<DummyReplica> {
            Arc::new(DummyReplica {
                primary: Mutex::new(false),
                primary_elsewhere: Mutex::new(None),
                data: Mutex::new(vec![0; size]),
                demotions: Mutex::new(0),
            })
        }
        fn is_primary(&self) -> bool {
            *self.primary.lock().unwrap()
        }
        fn check_primary(&self) -> Result<(), EngineFailure> {
            if self.is_primary() {
                Ok(())
            } else {
                Err(EngineFailure::new(FailureKind::NotPrimary, "not Primary"))
            }
        }
    }

    #[async_trait]
    impl EngineReplica for DummyReplica {
        fn status(&self) -> ReplicaStatus {
            ReplicaStatus {
                volume: "vm-100-disk-0".into(),
                node: "hv1".into(),
                role: if self.is_primary() {
                    Role::Primary
                } else {
                    Role::Secondary
                },
                disk_state: DiskState::UpToDate,
                protocol: Protocol::C,
                quorum: true,
                quorum_reason: String::new(),
                io_suspended: false,
                allow_two_primaries: false,
                size_bytes: self.data.lock().unwrap().len() as u64,
                current_uuid: String::new(),
                peers: Vec::new(),
                last_verify: None,
            }
        }
        async fn promote(&self) -> Result<(), EngineFailure> {
            if let Some(other) = self.primary_elsewhere.lock().unwrap().clone() {
                return Err(EngineFailure::new(
                    FailureKind::Refused,
                    format!("vm-100-disk-0 is Primary on {other}"),
                ));
            }
            *self.primary.lock().unwrap() = true;
            Ok(())
        }
        async fn demote(&self) -> Result<(), EngineFailure> {
            *self.primary.lock().unwrap() = false;
            *self.demotions.lock().unwrap() += 1;
            Ok(())
        }
        fn set_allow_two_primaries(&self, _allow: bool) -> Result<(), EngineFailure> {
            Ok(())
        }
        async fn resolve_split_brain(&self, _discard_local: bool) -> Result<(), EngineFailure> {
            Ok(())
        }
        async fn verify(&self) -> Result<VerifySummary, EngineFailure> {
            Ok(VerifySummary {
                differing_blocks: 0,
                checked_bytes: 0,
            })
        }
        async fn resize(&self, new_size: u64) -> Result<(), EngineFailure> {
            self.data.lock().unwrap().resize(new_size as usize, 0);
            Ok(())
        }
        fn set_options(&self, _options: &VolumeOptions) -> Result<(), EngineFailure> {
            Ok(())
        }
        async fn add_peer(&self, _peer: crate::engine::PeerPlan) -> Result<(), EngineFailure> {
            Ok(())
        }
        async fn remove_peer(&self, _peer: &str) -> Result<(), EngineFailure> {
            Ok(())
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, EngineFailure> {
            self.check_primary()?;
            let data = self.data.lock().unwrap();
            Ok(Bytes::copy_from_slice(
                &data[offset as usize..offset as usize + len as usize],
            ))
        }
        async fn write(&self, offset: u64, bytes: Bytes, _fua: bool) -> Result<(), EngineFailure> {
            self.check_primary()?;
            self.data.lock().unwrap()[offset as usize..offset as usize + bytes.len()]
                .copy_from_slice(&bytes);
            Ok(())
        }
        async fn flush(&self) -> Result<(), EngineFailure> {
            self.check_primary()
        }
        async fn trim(&self, offset: u64, len: u64) -> Result<(), EngineFailure> {
            self.write_zeroes(offset, len, true).await
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            _may_unmap: bool,
        ) -> Result<(), EngineFailure> {
            self.check_primary()?;
            self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_writer_promotes_and_the_last_writer_demotes() {
        let replica = DummyReplica::new(1 << 16);
        let runtime = ReplicaRuntime::new("vm-100-disk-0", replica.clone());
        // A Secondary serves no reads.
        let e = runtime.open(false).await.err().unwrap().to_string();
        assert!(e.contains("Secondary serves no reads"), "{e}");

        let first = runtime.open(true).await.unwrap();
        let second = runtime.open(true).await.unwrap();
        assert_eq!(runtime.status().open_writers, 2);
        assert_eq!(runtime.status().replica.role, Role::Primary);
        let data = Bytes::from(vec![7u8; 4096]);
        first.write(4096, data.clone(), true).await.unwrap();
        // A reader may join a Primary, and sees the write.
        let reader = runtime.open(false).await.unwrap();
        assert_eq!(reader.read(4096, 4096).await.unwrap(), data);
        assert!(reader.write(0, data.clone(), false).await.is_err());
        // Beyond the end is refused before the engine sees it.
        let e = first.read((1 << 16) - 512, 4096).await.unwrap_err();
        assert_eq!(e.kind, IoErrorKind::Invalid);

        drop(first);
        runtime.settle().await;
        assert_eq!(
            runtime.status().replica.role,
            Role::Primary,
            "one writer left"
        );
        // Explicit demote is refused while a writer is open.
        assert_eq!(
            runtime.demote_explicitly().await.unwrap_err().kind,
            ErrorKind::InUse
        );
        drop(second);
        tokio::task::yield_now().await;
        runtime.settle().await;
        assert_eq!(runtime.status().replica.role, Role::Secondary);
        assert_eq!(*replica.demotions.lock().unwrap(), 1);
        drop(reader);
        assert_eq!(runtime.open_handles(), 0);
    }

    #[tokio::test]
    async fn an_explicit_promote_survives_the_last_writer() {
        let replica = DummyReplica::new(1 << 16);
        let runtime = ReplicaRuntime::new("vm-100-disk-0", replica.clone());
        runtime.promote_explicitly().await.unwrap();
        assert!(runtime.status().promoted_explicitly);
        let writer = runtime.open(true).await.unwrap();
        drop(writer);
        tokio::task::yield_now().await;
        runtime.settle().await;
        assert_eq!(runtime.status().replica.role, Role::Primary);
        runtime.demote_explicitly().await.unwrap();
        assert_eq!(runtime.status().replica.role, Role::Secondary);
        assert!(!runtime.status().promoted_explicitly);
    }

    #[tokio::test]
    async fn a_forced_demote_works_with_a_writer_open_and_ends_the_explicit_promotion() {
        let replica = DummyReplica::new(1 << 16);
        let runtime = ReplicaRuntime::new("vm-100-disk-0", replica.clone());
        runtime.promote_explicitly().await.unwrap();
        let writer = runtime.open(true).await.unwrap();
        assert_eq!(
            runtime.demote_explicitly().await.unwrap_err().kind,
            ErrorKind::InUse
        );
        runtime.demote_forcibly().await.unwrap();
        let status = runtime.status();
        assert_eq!(status.replica.role, Role::Secondary);
        assert!(!status.promoted_explicitly);
        // The still-open writer's requests now fail.
        assert!(writer
            .write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .is_err());
        drop(writer);
    }

    #[tokio::test]
    async fn opening_while_primary_elsewhere_is_refused_with_the_engine_message() {
        let replica = DummyReplica::new(1 << 16);
        *replica.primary_elsewhere.lock().unwrap() = Some("hv2".into());
        let runtime = ReplicaRuntime::new("vm-100-disk-0", replica.clone());
        match runtime.open(true).await {
            Err(OpenError::Refused(message)) => {
                assert_eq!(message, "vm-100-disk-0 is Primary on hv2")
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("open succeeded"),
        }
        assert_eq!(runtime.status().open_writers, 0);
        assert_eq!(
            runtime.promote_explicitly().await.unwrap_err().kind,
            ErrorKind::Refused
        );
    }
}
