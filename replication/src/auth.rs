//! Peer authentication: a mutual HMAC-SHA256 challenge-response over the shared secret,
//! run on a fresh connection before any other byte is exchanged.
//!
//! ```text
//!  initiator (connected)                               acceptor (accepted)
//!    | -- "TNDMAUTH" v1 nonce_i (32 random bytes) -->  |
//!    | <-- "TNDMAUTH" v1 nonce_a ---------------------- |
//!    | -- HMAC(s, L || 'I' || nonce_a || nonce_i) ---> |  acceptor verifies
//!    | <-- HMAC(s, L || 'A' || nonce_i || nonce_a) --- |  initiator verifies
//!    | -- verdict (1 = accepted, 0 = rejected) ------> |
//!    | <-- verdict ------------------------------------ |
//! ```
//!
//! `L` is a fixed label naming this protocol and version. Each proof binds the prover's
//! role and both nonces, with the verifier's own fresh nonce, so a proof cannot be replayed,
//! reflected back on the same connection (roles differ, and an echoed nonce is refused), or
//! relayed from a second connection to the same node (that proof carries the other role).
//! Proofs are compared in constant time (`hmac`'s `verify_slice`). The whole exchange runs
//! under one deadline ([`DEFAULT_AUTH_TIMEOUT`]) so a silent peer cannot hold a slot. A
//! failure is logged at warn with the peer address and returned as a typed [`AuthError`];
//! the caller drops the connection.
//!
//! The secret comes from a file ([`load_secret`]) that must be a regular, non-empty file
//! with no permissions for group or others (mode 0600 or stricter). Trailing whitespace
//! (the newline `echo` adds) is not part of the secret.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Greeting magic of the authentication exchange.
pub const AUTH_MAGIC: &[u8; 8] = b"TNDMAUTH";
/// Version of the authentication exchange.
pub const AUTH_VERSION: u8 = 1;
/// Length of each side's random challenge.
pub const NONCE_LEN: usize = 32;
/// Deadline for the whole exchange.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);

const LABEL: &[u8] = b"tandem peer authentication v1";
const GREETING_LEN: usize = AUTH_MAGIC.len() + 1 + NONCE_LEN;
const PROOF_LEN: usize = 32;
const VERDICT_ACCEPTED: u8 = 1;
const VERDICT_REJECTED: u8 = 0;

type HmacSha256 = Hmac<Sha256>;

/// The shared secret of the cluster. Its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret from raw bytes; refuses an empty one.
    pub fn new(bytes: Vec<u8>) -> Result<Self, SecretError> {
        if bytes.is_empty() {
            return Err(SecretError::Empty {
                path: PathBuf::from("<memory>"),
            });
        }
        Ok(Secret(bytes))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

/// Why the secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the peer secret file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the peer secret {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "the peer secret {path} has mode {mode:04o}; it must not be accessible to group or \
         others (run: chmod 600 {path})"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("the peer secret {path} is empty")]
    Empty { path: PathBuf },
}

/// Load the shared secret from `path`: a regular file, mode 0600 or stricter, non-empty
/// after trailing whitespace is removed.
pub fn load_secret(path: &Path) -> Result<Secret, SecretError> {
    let read_err = |source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(SecretError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = std::fs::read(path).map_err(read_err)?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Secret(bytes))
}

/// Which end of the connection this side is: the one that connected or the one that
/// accepted. Part of every proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthRole {
    /// This side opened the connection.
    Initiator,
    /// This side accepted the connection.
    Acceptor,
}

impl AuthRole {
    fn label(self) -> u8 {
        match self {
            AuthRole::Initiator => b'I',
            AuthRole::Acceptor => b'A',
        }
    }

    fn peer(self) -> AuthRole {
        match self {
            AuthRole::Initiator => AuthRole::Acceptor,
            AuthRole::Acceptor => AuthRole::Initiator,
        }
    }
}

/// Why authentication failed. Every variant means: drop the connection.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication {op} failed")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("authentication did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the peer does not speak Tandem peer authentication v{AUTH_VERSION}")]
    BadGreeting,
    #[error("the peer echoed our challenge (reflection attempt)")]
    ReflectedChallenge,
    #[error("the peer's proof is wrong (different shared secret, or not a Tandem peer)")]
    WrongProof,
    #[error("the peer rejected our proof (different shared secret)")]
    RejectedByPeer,
}

impl AuthError {
    /// True when the peer answered but proved the wrong secret (or refused ours): retrying
    /// will fail the same way until an operator fixes the secret.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            AuthError::WrongProof | AuthError::RejectedByPeer | AuthError::ReflectedChallenge
        )
    }
}

fn proof(
    secret: &Secret,
    prover: AuthRole,
    verifier_nonce: &[u8],
    prover_nonce: &[u8],
) -> HmacSha256 {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(&secret.0) {
        Ok(mac) => mac,
        Err(_) => unreachable_hmac(),
    };
    mac.update(LABEL);
    mac.update(&[prover.label()]);
    mac.update(verifier_nonce);
    mac.update(prover_nonce);
    mac
}

#[cold]
fn unreachable_hmac() -> ! {
    // HMAC-SHA256 is defined for every key length; this branch exists only to avoid
    // unwrap on a Result whose error type is uninhabited in practice.
    panic!("HMAC-SHA256 rejected a key length")
}

/// Run the authentication exchange on `stream` as `role`, within `timeout`. `peer` names
/// the remote end in logs (its address). On error the caller must drop the stream.
pub async fn authenticate<S>(
    stream: &mut S,
    secret: &Secret,
    role: AuthRole,
    peer: &str,
    timeout: Duration,
) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let result = match tokio::time::timeout(timeout, exchange(stream, secret, role)).await {
        Ok(r) => r,
        Err(_) => Err(AuthError::Timeout(timeout)),
    };
    if let Err(e) = &result {
        tracing::warn!(peer, error = %e, "peer authentication failed; dropping the connection");
    }
    result
}

async fn exchange<S>(stream: &mut S, secret: &Secret, role: AuthRole) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = |op| move |source| AuthError::Io { op, source };

    let mut own_nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut own_nonce);
    let mut greeting = Vec::with_capacity(GREETING_LEN);
    greeting.extend_from_slice(AUTH_MAGIC);
    greeting.push(AUTH_VERSION);
    greeting.extend_from_slice(&own_nonce);
    stream
        .write_all(&greeting)
        .await
        .map_err(io("sending the challenge"))?;
    stream.flush().await.map_err(io("sending the challenge"))?;

    let mut peer_greeting = [0u8; GREETING_LEN];
    stream
        .read_exact(&mut peer_greeting)
        .await
        .map_err(io("reading the peer's challenge"))?;
    if &peer_greeting[..AUTH_MAGIC.len()] != AUTH_MAGIC
        || peer_greeting[AUTH_MAGIC.len()] != AUTH_VERSION
    {
        return Err(AuthError::BadGreeting);
    }
    let peer_nonce = &peer_greeting[AUTH_MAGIC.len() + 1..];
    if peer_nonce == own_nonce {
        return Err(AuthError::ReflectedChallenge);
    }

    let own_proof = proof(secret, role, peer_nonce, &own_nonce)
        .finalize()
        .into_bytes();
    stream
        .write_all(&own_proof)
        .await
        .map_err(io("sending our proof"))?;
    stream.flush().await.map_err(io("sending our proof"))?;

    let mut peer_proof = [0u8; PROOF_LEN];
    stream
        .read_exact(&mut peer_proof)
        .await
        .map_err(io("reading the peer's proof"))?;
    let accepted = proof(secret, role.peer(), &own_nonce, peer_nonce)
        .verify_slice(&peer_proof)
        .is_ok();

    let verdict = if accepted {
        VERDICT_ACCEPTED
    } else {
        VERDICT_REJECTED
    };
    // Best effort when rejecting: the peer learns why the connection closes.
    let sent = stream.write_all(&[verdict]).await;
    let flushed = stream.flush().await;
    if !accepted {
        return Err(AuthError::WrongProof);
    }
    sent.map_err(io("sending the verdict"))?;
    flushed.map_err(io("sending the verdict"))?;

    let mut peer_verdict = [0u8; 1];
    stream
        .read_exact(&mut peer_verdict)
        .await
        .map_err(io("reading the peer's verdict"))?;
    if peer_verdict[0] != VERDICT_ACCEPTED {
        return Err(AuthError::RejectedByPeer);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;
    use tokio::io::duplex;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec()).unwrap()
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn the_same_secret_authenticates_both_sides() {
        let (mut a, mut b) = duplex(4096);
        let s = secret("correct horse");
        let (ra, rb) = tokio::join!(
            authenticate(&mut a, &s, AuthRole::Initiator, "b", T),
            authenticate(&mut b, &s, AuthRole::Acceptor, "a", T),
        );
        ra.unwrap();
        rb.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_on_both_sides() {
        let (mut a, mut b) = duplex(4096);
        let (one, two) = (secret("one"), secret("two"));
        let (ra, rb) = tokio::join!(
            authenticate(&mut a, &one, AuthRole::Initiator, "b", T),
            authenticate(&mut b, &two, AuthRole::Acceptor, "a", T),
        );
        assert!(matches!(ra, Err(AuthError::WrongProof)), "{ra:?}");
        assert!(matches!(rb, Err(AuthError::WrongProof)), "{rb:?}");
        assert!(ra.unwrap_err().is_rejection());
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (mut a, mut b) = duplex(4096);
        let attacker = tokio::spawn(async move {
            b.write_all(&[0x42; 200]).await.unwrap();
            let mut sink = [0u8; 64];
            let _ = b.read(&mut sink).await;
            b
        });
        let r = authenticate(&mut a, &secret("s"), AuthRole::Acceptor, "x", T).await;
        assert!(matches!(r, Err(AuthError::BadGreeting)), "{r:?}");
        drop(attacker);
    }

    #[tokio::test]
    async fn a_silent_peer_is_dropped_at_the_deadline() {
        let (mut a, _b) = duplex(4096);
        let started = Instant::now();
        let r = authenticate(
            &mut a,
            &secret("s"),
            AuthRole::Acceptor,
            "silent",
            Duration::from_millis(200),
        )
        .await;
        assert!(matches!(r, Err(AuthError::Timeout(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_peer_that_closes_is_an_io_error() {
        let (mut a, b) = duplex(4096);
        drop(b);
        let r = authenticate(&mut a, &secret("s"), AuthRole::Acceptor, "gone", T).await;
        assert!(matches!(r, Err(AuthError::Io { .. })), "{r:?}");
    }

    /// A mirror: everything we send comes straight back.
    #[tokio::test]
    async fn an_echoed_challenge_is_refused() {
        let (mut a, mut b) = duplex(4096);
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                match b.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if b.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let r = authenticate(&mut a, &secret("s"), AuthRole::Acceptor, "mirror", T).await;
        assert!(matches!(r, Err(AuthError::ReflectedChallenge)), "{r:?}");
    }

    /// The attacker, without the secret, opens two connections to the victim and feeds each
    /// the victim's challenge and proof from the other. Without role labels in the proof the
    /// relayed proof would verify; with them both connections are refused.
    #[tokio::test]
    async fn a_proof_relayed_from_a_second_connection_is_refused() {
        let s = secret("victim's secret");
        let (mut v1, mut x1) = duplex(4096);
        let (mut v2, mut x2) = duplex(4096);
        let s1 = s.clone();
        let s2 = s.clone();
        let victim1 =
            tokio::spawn(
                async move { authenticate(&mut v1, &s1, AuthRole::Acceptor, "x1", T).await },
            );
        let victim2 =
            tokio::spawn(
                async move { authenticate(&mut v2, &s2, AuthRole::Acceptor, "x2", T).await },
            );
        let mut g1 = [0u8; GREETING_LEN];
        let mut g2 = [0u8; GREETING_LEN];
        x1.read_exact(&mut g1).await.unwrap();
        x2.read_exact(&mut g2).await.unwrap();
        // Swap the challenges: each victim connection sees the other's nonce as "ours".
        x1.write_all(&g2).await.unwrap();
        x2.write_all(&g1).await.unwrap();
        let mut p1 = [0u8; PROOF_LEN];
        let mut p2 = [0u8; PROOF_LEN];
        x1.read_exact(&mut p1).await.unwrap();
        x2.read_exact(&mut p2).await.unwrap();
        // Relay each proof to the other connection.
        x1.write_all(&p2).await.unwrap();
        x2.write_all(&p1).await.unwrap();
        let r1 = victim1.await.unwrap();
        let r2 = victim2.await.unwrap();
        assert!(matches!(r1, Err(AuthError::WrongProof)), "{r1:?}");
        assert!(matches!(r2, Err(AuthError::WrongProof)), "{r2:?}");
    }

    #[test]
    fn proofs_differ_by_role() {
        let s = secret("s");
        let n1 = [1u8; NONCE_LEN];
        let n2 = [2u8; NONCE_LEN];
        let as_initiator = proof(&s, AuthRole::Initiator, &n1, &n2)
            .finalize()
            .into_bytes();
        assert!(proof(&s, AuthRole::Acceptor, &n1, &n2)
            .verify_slice(&as_initiator)
            .is_err());
        assert!(proof(&s, AuthRole::Initiator, &n1, &n2)
            .verify_slice(&as_initiator)
            .is_ok());
    }

    fn write_secret(mode: u32, content: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    #[test]
    fn a_0600_secret_file_loads_without_its_trailing_newline() {
        let (_d, path) = write_secret(0o600, b"hunter2\n");
        let s = load_secret(&path).unwrap();
        assert_eq!(s.0, b"hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<7 bytes>)");
        let (_d2, path2) = write_secret(0o400, b"x");
        load_secret(&path2).unwrap();
    }

    #[test]
    fn an_open_empty_or_missing_secret_file_is_refused() {
        let (_d1, path) = write_secret(0o644, b"hunter2");
        let e = load_secret(&path).unwrap_err();
        assert!(
            matches!(e, SecretError::TooOpen { mode: 0o644, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("chmod 600"));
        let (_d2, path) = write_secret(0o640, b"hunter2");
        assert!(matches!(
            load_secret(&path),
            Err(SecretError::TooOpen { .. })
        ));
        let (_d3, path) = write_secret(0o600, b" \n");
        assert!(matches!(load_secret(&path), Err(SecretError::Empty { .. })));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_secret(&dir.path().join("missing")),
            Err(SecretError::Read { .. })
        ));
        assert!(matches!(
            load_secret(dir.path()),
            Err(SecretError::NotAFile { .. })
        ));
    }
}
