//! What the hook asks of this node's tandemd, as a trait ([`Control`]) so the executor can
//! be tested without a daemon, implemented for the control API's one client
//! ([`control_api::Client`], with a timeout on every exchange: a hook must never hang
//! libvirt).
//!
//! A tandemd without the replication engine answers `volume_status` with kind
//! `bad_request` ("unknown variant `volume_status`"): [`Control::status`] reports that as
//! [`StatusAnswer::NoRoles`] after confirming with `volume_show` that the volume exists, and
//! nothing else is ever read as "no roles".

use std::time::Duration;

use control_api::{ApiError, Client, ClientError, ErrorKind, Request, VolumeStatus};

/// How long one exchange with tandemd may take before the hook gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What this node's tandemd says about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusAnswer {
    /// The replication engine's status.
    Replicated(VolumeStatus),
    /// This tandemd has no replication engine (no roles): the volume exists and is a
    /// single-host volume, there is nothing to promote or demote.
    NoRoles,
    /// No such volume on this node (tandemd's message).
    NotFound(String),
}

/// What the hook asks of tandemd.
pub trait Control {
    fn status(&mut self, volume: &str) -> Result<StatusAnswer, ClientError>;
    fn promote(&mut self, volume: &str) -> Result<(), ClientError>;
    fn demote(&mut self, volume: &str) -> Result<(), ClientError>;
    fn allow_two_primaries(&mut self, volume: &str, allow: bool) -> Result<(), ClientError>;
}

/// Whether an error means "this tandemd does not know request `request`".
pub fn is_unknown_request(error: &ApiError, request: &str) -> bool {
    error.kind == ErrorKind::BadRequest
        && error.message.contains("unknown variant")
        && error.message.contains(&format!("`{request}`"))
}

impl Control for Client {
    fn status(&mut self, volume: &str) -> Result<StatusAnswer, ClientError> {
        match Client::status(self, volume) {
            Ok(status) => Ok(StatusAnswer::Replicated(status)),
            Err(ClientError::Api(e)) if e.kind == ErrorKind::NotFound => {
                Ok(StatusAnswer::NotFound(e.message))
            }
            Err(ClientError::Api(e)) if is_unknown_request(&e, "volume_status") => {
                // An older tandemd: no replication, no roles. Make sure the volume exists.
                match self.call(&Request::VolumeShow {
                    name: volume.to_string(),
                }) {
                    Ok(_) => Ok(StatusAnswer::NoRoles),
                    Err(ClientError::Api(e)) if e.kind == ErrorKind::NotFound => {
                        Ok(StatusAnswer::NotFound(e.message))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn promote(&mut self, volume: &str) -> Result<(), ClientError> {
        self.call(&Request::VolumePromote {
            name: volume.to_string(),
        })
        .map(drop)
    }

    fn demote(&mut self, volume: &str) -> Result<(), ClientError> {
        self.call(&Request::VolumeDemote {
            name: volume.to_string(),
            force: false,
        })
        .map(drop)
    }

    fn allow_two_primaries(&mut self, volume: &str, allow: bool) -> Result<(), ClientError> {
        self.call(&Request::VolumeAllowTwoPrimaries {
            name: volume.to_string(),
            allow,
        })
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unknown_variant_error_means_no_roles() {
        let old = ApiError::new(
            ErrorKind::BadRequest,
            "request not understood: unknown variant `volume_status`, expected one of `node_info`, `pool_list` at line 1 column 26",
        );
        assert!(is_unknown_request(&old, "volume_status"));
        assert!(!is_unknown_request(&old, "volume_promote"));
        let other = ApiError::new(ErrorKind::BadRequest, "invalid volume name");
        assert!(!is_unknown_request(&other, "volume_status"));
        let wrong_kind = ApiError::new(ErrorKind::Internal, "unknown variant `volume_status`");
        assert!(!is_unknown_request(&wrong_kind, "volume_status"));
    }
}
