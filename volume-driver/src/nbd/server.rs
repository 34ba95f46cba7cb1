//! NBD server: listeners, the per-connection handshake and the transmission loop.
//!
//! Three tasks per connection: the reader reads requests; the runner runs them together
//! against the [`ExportHandle`] and hands their replies, in completion order, to the writer,
//! which sends them. The runner collects the replies of every request that finished at once
//! (say, a burst of acknowledgements from a peer) into one batch, so they usually leave in
//! one system call and wake the client once. It never waits for the socket: a client that
//! stops reading holds up only its replies (and, through the budget below, its reader),
//! never a finished request's hold on the volume.
//! In-flight requests are bounded by count and by bytes (see [`MAX_IN_FLIGHT`],
//! [`MAX_IN_FLIGHT_BYTES`]): the reader stops reading from the socket when the budget is
//! used up, so a fast client cannot make the server buffer without limit.
//!
//! A failed request is logged with its cause (the OS error included, e.g. "No space left
//! on device (os error 28)"), at most one line per connection and interval: a full pool
//! fails every write, and the lines in between are only counted (`suppressed=`).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::StreamExt;
use futures_util::FutureExt;
use replication::device::AlignedBufMut;
use replication::failure_log::FailureLog;
use replication::future_set::FutureSet;
use std::panic::AssertUnwindSafe;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::proto::{self, ClientOption, Command, InfoRequest};
use crate::frontend::{ExportHandle, ExportInfo, ExportIoError, Exports, IoErrorKind, OpenError};

/// Most requests one connection may have in flight (QEMU and fio use up to 32 or 64).
pub const MAX_IN_FLIGHT: usize = 128;
/// Most payload bytes (write data plus read buffers) one connection may have in flight.
pub const MAX_IN_FLIGHT_BYTES: u32 = 256 << 20;
/// Option payloads beyond [`proto::MAX_OPTION_LEN`] up to this size are read and refused
/// with `NBD_REP_ERR_TOO_BIG`; larger ones end the connection.
const MAX_DISCARDED_OPTION_LEN: u32 = 1 << 20;
/// At shutdown, how long a connection's last replies may wait for a client to read them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Time a client has from connecting to choosing an export.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Options one connection may send before we consider it abusive.
const MAX_OPTIONS: u32 = 1024;

/// Errors of the NBD listeners.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The unix socket could not be created.
    #[error("cannot bind NBD socket {path}")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    /// A stale socket file could not be removed.
    #[error("cannot remove stale NBD socket {path}")]
    RemoveStale {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    /// The socket's mode could not be set to 0660.
    #[error("cannot set mode 0660 on NBD socket {path}")]
    Chmod {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The shutdown signal: serve until the value becomes `true` (or the sender is dropped).
pub type Shutdown = watch::Receiver<bool>;

/// Create the unix listening socket at `path` with mode 0660, replacing a stale socket.
/// Must be called inside a tokio runtime.
pub fn bind_unix(path: &Path) -> Result<UnixListener, NbdError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NbdError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| NbdError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        NbdError::Chmod {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

async fn shutdown_requested(shutdown: &mut Shutdown) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Serve NBD on a unix listener until `shutdown`; then wait for open connections to finish
/// their in-flight requests.
pub async fn serve_unix(listener: UnixListener, exports: Arc<dyn Exports>, shutdown: Shutdown) {
    serve_loop(
        || async {
            let (stream, _) = listener.accept().await?;
            let (r, w) = stream.into_split();
            Ok((r, w, "unix".to_string()))
        },
        exports,
        shutdown,
    )
    .await
}

/// Serve NBD on a TCP listener (TCP_NODELAY on every connection) until `shutdown`.
pub async fn serve_tcp(listener: TcpListener, exports: Arc<dyn Exports>, shutdown: Shutdown) {
    serve_loop(
        || async {
            let (stream, peer) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            Ok((r, w, peer.to_string()))
        },
        exports,
        shutdown,
    )
    .await
}

async fn serve_loop<A, Fut, R, W>(mut accept: A, exports: Arc<dyn Exports>, mut shutdown: Shutdown)
where
    A: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<(R, W, String)>>,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown_requested(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept() => match accepted {
                Ok((r, w, peer)) => {
                    let exports = Arc::clone(&exports);
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        serve_connection(r, w, exports, shutdown, &peer).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: keep serving the connections we have.
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Why a connection ended without a clean disconnect.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("client aborted the handshake")]
    Aborted,
    #[error("export '{name}' cannot be opened: {source}")]
    ExportName {
        name: String,
        #[source]
        source: OpenError,
    },
    #[error("server shutting down")]
    Shutdown,
}

/// Serve one client on any byte stream: handshake, then transmission until the client
/// disconnects, the stream breaks, or `shutdown`. Never panics on client input.
pub async fn serve_connection<R, W>(
    mut reader: R,
    mut writer: W,
    exports: Arc<dyn Exports>,
    mut shutdown: Shutdown,
    peer: &str,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let negotiate = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&mut reader, &mut writer, exports.as_ref()),
    );
    let handshake = tokio::select! {
        r = negotiate => r.unwrap_or_else(|_| Err(ConnError::Protocol(format!(
            "no export chosen within {}s",
            HANDSHAKE_TIMEOUT.as_secs()
        )))),
        _ = shutdown_requested(&mut shutdown) => Err(ConnError::Shutdown),
    };
    let handle = match handshake {
        Ok(handle) => handle,
        Err(ConnError::Aborted) => {
            tracing::debug!(peer, "NBD client aborted negotiation");
            return;
        }
        Err(e) => {
            tracing::info!(peer, error = %error_chain(&e), "NBD handshake ended");
            return;
        }
    };
    tracing::info!(peer, export = handle.name(), "NBD client connected");
    let _counted = super::connections::Connection::open(handle.name());
    match transmission(reader, writer, Arc::clone(&handle), shutdown).await {
        Ok(()) => tracing::info!(peer, export = handle.name(), "NBD client disconnected"),
        Err(e) => tracing::info!(
            peer,
            export = handle.name(),
            error = %error_chain(&e),
            "NBD connection ended"
        ),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

// ---- Handshake ------------------------------------------------------------------------

async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *reader).take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn handshake<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &dyn Exports,
) -> Result<Arc<dyn ExportHandle>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&proto::encode_server_greeting()).await?;
    writer.flush().await?;
    let mut raw = [0u8; 4];
    reader.read_exact(&mut raw).await?;
    let client = proto::parse_client_flags(raw).map_err(|e| ConnError::Protocol(e.to_string()))?;

    for _ in 0..MAX_OPTIONS {
        let mut raw = [0u8; 16];
        reader.read_exact(&mut raw).await?;
        let hdr =
            proto::parse_option_header(&raw).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if hdr.len > proto::MAX_OPTION_LEN {
            if hdr.len > MAX_DISCARDED_OPTION_LEN {
                return Err(ConnError::Protocol(format!(
                    "option {} with {} bytes of data",
                    hdr.option, hdr.len
                )));
            }
            discard(reader, u64::from(hdr.len)).await?;
            let msg = "option data too long";
            send(
                writer,
                &proto::encode_option_error(hdr.option, proto::NBD_REP_ERR_TOO_BIG, msg),
            )
            .await?;
            continue;
        }
        let mut payload = vec![0u8; hdr.len as usize];
        reader.read_exact(&mut payload).await?;
        match proto::parse_option(hdr.option, &payload) {
            ClientOption::ExportName(name) => {
                let handle = exports
                    .open(&name, true)
                    .await
                    .map_err(|source| ConnError::ExportName { name, source })?;
                let reply = proto::encode_export_name_reply(
                    handle.size(),
                    proto::transmission_flags(handle.read_only()),
                    client.no_zeroes,
                );
                send(writer, &reply).await?;
                return Ok(handle);
            }
            ClientOption::Abort => {
                // The client may already have closed; the ACK is a courtesy.
                let _ = send(
                    writer,
                    &proto::encode_option_reply(hdr.option, proto::NBD_REP_ACK, &[]),
                )
                .await;
                return Err(ConnError::Aborted);
            }
            ClientOption::List => {
                let mut out = Vec::new();
                for name in exports.list() {
                    out.extend_from_slice(&proto::encode_rep_server(&name));
                }
                out.extend_from_slice(&proto::encode_option_reply(
                    hdr.option,
                    proto::NBD_REP_ACK,
                    &[],
                ));
                send(writer, &out).await?;
            }
            ClientOption::Info(req) => {
                // Information only: describe, never open (an open may promote).
                match exports.describe(&req.name).await {
                    Ok(info) => send_info(writer, hdr.option, &req, &req.name, &info).await?,
                    Err(e) => send_open_error(writer, hdr.option, &req.name, e).await?,
                }
            }
            ClientOption::Go(req) => match exports.open(&req.name, true).await {
                Ok(handle) => {
                    let info = ExportInfo {
                        size: handle.size(),
                        read_only: handle.read_only(),
                    };
                    send_info(writer, hdr.option, &req, handle.name(), &info).await?;
                    return Ok(handle);
                }
                Err(e) => send_open_error(writer, hdr.option, &req.name, e).await?,
            },
            ClientOption::StructuredReply => {
                // Simple replies only: see the module documentation of `nbd`.
                let msg = "structured replies are not supported by this server";
                send(
                    writer,
                    &proto::encode_option_error(hdr.option, proto::NBD_REP_ERR_UNSUP, msg),
                )
                .await?;
            }
            ClientOption::Unsupported(option) => {
                let msg = format!("option {option} is not supported");
                send(
                    writer,
                    &proto::encode_option_error(option, proto::NBD_REP_ERR_UNSUP, &msg),
                )
                .await?;
            }
            ClientOption::Invalid(why) => {
                send(
                    writer,
                    &proto::encode_option_error(hdr.option, proto::NBD_REP_ERR_INVALID, why),
                )
                .await?;
            }
        }
    }
    Err(ConnError::Protocol(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// Refuse an NBD_OPT_INFO / NBD_OPT_GO with the reason as the reply's message, which
/// clients such as QEMU print.
async fn send_open_error<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    name: &str,
    error: OpenError,
) -> io::Result<()> {
    let rep = match error {
        OpenError::NotFound(_) => proto::NBD_REP_ERR_UNKNOWN,
        OpenError::Refused(_) => proto::NBD_REP_ERR_POLICY,
    };
    tracing::info!(export = name, error = %error, "NBD open refused");
    send(
        writer,
        &proto::encode_option_error(option, rep, &error.to_string()),
    )
    .await
}

/// Answer NBD_OPT_INFO / NBD_OPT_GO with the export's information and ACK.
async fn send_info<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    req: &InfoRequest,
    name: &str,
    info: &ExportInfo,
) -> io::Result<()> {
    let mut out =
        proto::encode_info_export(option, info.size, proto::transmission_flags(info.read_only));
    out.extend_from_slice(&proto::encode_info_block_size(option));
    if req.requests.contains(&proto::NBD_INFO_NAME) {
        out.extend_from_slice(&proto::encode_info_name(option, name));
    }
    out.extend_from_slice(&proto::encode_option_reply(option, proto::NBD_REP_ACK, &[]));
    send(writer, &out).await
}

// ---- Transmission ---------------------------------------------------------------------

/// What the reader hands the request runner.
enum Job {
    /// A request refused when it was read: its reply, as is.
    Refused(Reply),
    /// A request to run against the export.
    Run(Request),
}

/// A request read and admitted, with what it holds of the connection's budget.
struct Request {
    cookie: u64,
    command: Command,
    payload: Bytes,
    permits: Permits,
}

/// A reply to send. The permits are returned once it is in the writer's buffer.
struct Reply {
    cookie: u64,
    errno: u32,
    data: Option<Bytes>,
    _permits: Permits,
}

struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

fn errno_of(e: &ExportIoError) -> u32 {
    match e.kind {
        IoErrorKind::Io => proto::NBD_EIO,
        IoErrorKind::NoSpace => proto::NBD_ENOSPC,
        IoErrorKind::Invalid => proto::NBD_EINVAL,
        IoErrorKind::ReadOnly => proto::NBD_EPERM,
        IoErrorKind::Shutdown => proto::NBD_ESHUTDOWN,
    }
}

/// What every request of one connection shares: its export and the rate limit of its
/// failure log lines.
struct Connection {
    handle: Arc<dyn ExportHandle>,
    failures: FailureLog,
}

/// Request bytes read from the socket at once: a queue of small requests (headers and 4 KiB
/// payloads) arrives in one system call instead of one or two per request. Larger payloads
/// bypass the buffer.
const READ_BUFFER: usize = 64 << 10;

async fn transmission<R, W>(
    reader: R,
    writer: W,
    handle: Arc<dyn ExportHandle>,
    mut shutdown: Shutdown,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    let conn = Arc::new(Connection {
        handle,
        failures: FailureLog::default(),
    });
    let (replies, batches) = mpsc::unbounded_channel::<Vec<Reply>>();
    let mut writer_task = tokio::spawn(write_replies(writer, batches));
    let runner = tokio::spawn(run_requests(Arc::clone(&conn), rx, replies));
    let count = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES as usize));

    let result = loop {
        let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
        let read = tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => break Err(ConnError::Shutdown),
            // The replies can no longer be sent: the client cannot receive any more.
            _ = tx.closed() => break Ok(()),
            r = reader.read_exact(&mut raw) => r,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                break Err(ConnError::Protocol(
                    "client closed the connection without NBD_CMD_DISC".into(),
                ))
            }
            Err(e) => break Err(e.into()),
        }
        let hdr = match proto::parse_request_header(&raw) {
            Ok(h) => h,
            Err(e) => break Err(ConnError::Protocol(e.to_string())),
        };
        let limits = proto::ExportLimits {
            size: conn.handle.size(),
            read_only: conn.handle.read_only(),
        };
        // Both semaphores live as long as this function: acquire cannot fail. A client
        // that stops reading replies keeps the budget used up: wait for it, for shutdown or
        // for the replies to fail.
        let acquired = unless_ending(Arc::clone(&count).acquire_owned(), &mut shutdown, &tx);
        let Some(count_permit) = acquired.await else {
            break Err(ConnError::Shutdown);
        };
        let command = match proto::validate_request(&hdr, limits) {
            Ok(c) => c,
            Err(rej) => {
                tracing::debug!(request = ?hdr, reason = rej.reason, errno = rej.errno, "NBD request refused");
                if rej.discard > 0 {
                    if let Err(e) = discard(&mut reader, u64::from(rej.discard)).await {
                        break Err(e.into());
                    }
                }
                let permits = Permits {
                    _count: count_permit,
                    _bytes: None,
                };
                let _ = tx.send(Job::Refused(Reply {
                    cookie: hdr.cookie,
                    errno: rej.errno,
                    data: None,
                    _permits: permits,
                }));
                continue;
            }
        };
        let cost = match command {
            Command::Read { len, .. } | Command::Write { len, .. } => len,
            _ => 0,
        };
        let bytes_permit = if cost > 0 {
            let acquired = Arc::clone(&bytes).acquire_many_owned(cost);
            match unless_ending(acquired, &mut shutdown, &tx).await {
                Some(p) => Some(p),
                None => break Err(ConnError::Shutdown),
            }
        } else {
            None
        };
        let permits = Permits {
            _count: count_permit,
            _bytes: bytes_permit,
        };
        let payload = match command {
            Command::Write { len, .. } => match read_payload(&mut reader, len as usize).await {
                Ok(buf) => buf,
                Err(e) => break Err(e.into()),
            },
            Command::Disconnect => break Ok(()),
            _ => Bytes::new(),
        };
        let _ = tx.send(Job::Run(Request {
            cookie: hdr.cookie,
            command,
            payload,
            permits,
        }));
    };
    // The runner answers what it was given, then ends, and so does the writer.
    drop(tx);
    if let Err(e) = runner.await {
        return Err(ConnError::Protocol(format!("request runner failed: {e}")));
    }
    // The writer waits for the client to read; at shutdown, a client that does not within
    // a grace period loses its remaining replies (its requests have all finished).
    let written = tokio::select! {
        w = &mut writer_task => w,
        _ = async {
            shutdown_requested(&mut shutdown).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            writer_task.abort();
            return Err(ConnError::Shutdown);
        }
    };
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(ConnError::Protocol(format!("reply writer failed: {e}"))),
    }
    result
}

/// A budget permit from `acquire`, or `None` once the connection is ending (shutdown, or
/// the replies can no longer be sent) before it comes.
async fn unless_ending<P>(
    acquire: impl std::future::Future<Output = Result<P, tokio::sync::AcquireError>>,
    shutdown: &mut Shutdown,
    jobs: &mpsc::UnboundedSender<Job>,
) -> Option<P> {
    tokio::select! {
        p = acquire => p.ok(),
        _ = shutdown_requested(shutdown) => None,
        _ = jobs.closed() => None,
    }
}

/// Read exactly `len` bytes into a fresh buffer without zero-filling it first. The buffer
/// is aligned for O_DIRECT, so an aligned write goes to the disk without a bounce copy.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> io::Result<Bytes> {
    let mut buf = AlignedBufMut::with_capacity(len);
    while buf.len() < len {
        let want = len - buf.len();
        let n = (&mut *reader).take(want as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

async fn execute(
    handle: &dyn ExportHandle,
    command: Command,
    payload: Bytes,
    failures: &FailureLog,
) -> (u32, Option<Bytes>) {
    let failed = |e: &ExportIoError| {
        if let Some(suppressed) = failures.admit(std::time::Instant::now()) {
            tracing::warn!(export = handle.name(), ?command, error = %e, suppressed,
                "NBD request failed");
        }
    };
    let result = match command {
        Command::Read { offset, len } => {
            return match handle.read(offset, len).await {
                Ok(data) if data.len() == len as usize => (0, Some(data)),
                Ok(data) => {
                    tracing::error!(
                        export = handle.name(),
                        offset,
                        len,
                        got = data.len(),
                        "export returned a short read"
                    );
                    (proto::NBD_EIO, None)
                }
                Err(e) => {
                    failed(&e);
                    (errno_of(&e), None)
                }
            };
        }
        Command::Write { offset, fua, .. } => handle.write(offset, payload, fua).await,
        Command::Flush => handle.flush().await,
        Command::Trim { offset, len, fua } => match handle.trim(offset, u64::from(len)).await {
            Ok(()) if fua => handle.flush().await,
            other => other,
        },
        Command::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap,
        } => match handle.write_zeroes(offset, u64::from(len), may_unmap).await {
            Ok(()) if fua => handle.flush().await,
            other => other,
        },
        Command::Disconnect => Ok(()),
    };
    match result {
        Ok(()) => (0, None),
        Err(e) => {
            failed(&e);
            (errno_of(&e), None)
        }
    }
}

/// Large read payloads bypass the write buffer (no copy); small replies are batched.
const DIRECT_WRITE_THRESHOLD: usize = 64 << 10;

/// Run the connection's requests together: each time something happens, start every
/// request the reader has handed over and collect the reply of every one that finished,
/// then give the writer those replies as one batch.
///
/// A request handed over runs to its end even when its reply can no longer be sent (the
/// writer failed): it may already have reached the volume, and the client resends what it
/// got no reply for. The reader then stops (the job channel closes).
async fn run_requests(
    conn: Arc<Connection>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    replies: mpsc::UnboundedSender<Vec<Reply>>,
) {
    let run = |request: Request| {
        let conn = &conn;
        async move {
            let Request {
                cookie,
                command,
                payload,
                permits,
            } = request;
            let work = execute(conn.handle.as_ref(), command, payload, &conn.failures);
            let (errno, data) = AssertUnwindSafe(work)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!(
                        export = conn.handle.name(),
                        ?command,
                        "NBD request panicked; answering it with EIO"
                    );
                    (proto::NBD_EIO, None)
                });
            Reply {
                cookie,
                errno,
                data,
                _permits: permits,
            }
        }
    };
    let mut running = FutureSet::new();
    let mut batch = Vec::new();
    let mut reading = true;
    let mut writer_gone = false;
    while reading || !running.is_empty() {
        tokio::select! {
            Some(reply) = running.next(), if !running.is_empty() => batch.push(reply),
            job = jobs.recv(), if reading => match job {
                Some(Job::Run(request)) => running.push(run(request)),
                Some(Job::Refused(reply)) => batch.push(reply),
                None => reading = false,
            },
            _ = replies.closed(), if !writer_gone => {
                writer_gone = true;
                jobs.close();
            }
        }
        // Take everything else that is ready now. A busy client keeps both sources ready,
        // so the batch is cut at some point.
        for _ in 0..2 * MAX_IN_FLIGHT {
            if let Ok(job) = jobs.try_recv() {
                match job {
                    Job::Run(request) => running.push(run(request)),
                    Job::Refused(reply) => batch.push(reply),
                }
            } else if let Some(Some(reply)) = running.next().now_or_never() {
                batch.push(reply);
            } else {
                break;
            }
        }
        if !batch.is_empty() && replies.send(std::mem::take(&mut batch)).is_err() {
            writer_gone = true;
            jobs.close();
        }
    }
}

/// Send the runner's batches of replies, each flushed in one write (several, when more
/// batches are waiting).
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut batches: mpsc::UnboundedReceiver<Vec<Reply>>,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(256 << 10, writer);
    while let Some(first) = batches.recv().await {
        let mut next = Some(first);
        while let Some(batch) = next {
            for reply in batch {
                write_reply(&mut out, reply).await?;
            }
            next = batches.try_recv().ok();
        }
        out.flush().await?;
    }
    out.shutdown().await
}

/// Queue one reply in `out` (a large read payload goes to the socket directly).
async fn write_reply<W: AsyncWrite + Unpin>(
    out: &mut BufWriter<W>,
    reply: Reply,
) -> io::Result<()> {
    out.write_all(&proto::encode_simple_reply(reply.errno, reply.cookie))
        .await?;
    if let Some(data) = &reply.data {
        if data.len() >= DIRECT_WRITE_THRESHOLD {
            out.flush().await?;
            out.get_mut().write_all(data).await?;
        } else {
            out.write_all(data).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    use async_trait::async_trait;

    use super::*;

    const REQUESTS: usize = 8;
    const BLOCK: u64 = 4096;

    /// An export whose write of block N waits until the gate is above N.
    struct GatedExport {
        gate: watch::Receiver<u64>,
        started: AtomicUsize,
        finished: AtomicUsize,
    }

    #[async_trait]
    impl ExportHandle for GatedExport {
        fn name(&self) -> &str {
            "gated"
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        async fn read(&self, _: u64, len: u32) -> Result<Bytes, ExportIoError> {
            Ok(Bytes::from(vec![0; len as usize]))
        }
        async fn write(&self, offset: u64, _: Bytes, _: bool) -> Result<(), ExportIoError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let mut gate = self.gate.clone();
            let _ = gate.wait_for(|open| *open > offset / BLOCK).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn flush(&self) -> Result<(), ExportIoError> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u64) -> Result<(), ExportIoError> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), ExportIoError> {
            Ok(())
        }
    }

    /// How the client's side of the socket behaves.
    #[derive(Clone, Copy, PartialEq)]
    enum Client {
        /// Reads everything (each write's size is recorded).
        Reads,
        /// Gone: every write fails.
        Gone,
        /// Stopped reading: every write waits forever.
        Stuck,
    }

    /// The socket's sending side.
    struct Socket {
        client: Client,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            match self.client {
                Client::Reads => {
                    self.writes.lock().unwrap().push(buf.len());
                    Poll::Ready(Ok(buf.len()))
                }
                Client::Gone => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Client::Stuck => Poll::Pending,
            }
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write_request(block: u64) -> Vec<u8> {
        let mut r = Vec::with_capacity(proto::REQUEST_HEADER_LEN + BLOCK as usize);
        r.extend_from_slice(&proto::NBD_REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&proto::NBD_CMD_WRITE.to_be_bytes());
        r.extend_from_slice(&block.to_be_bytes()); // cookie
        r.extend_from_slice(&(block * BLOCK).to_be_bytes());
        r.extend_from_slice(&(BLOCK as u32).to_be_bytes());
        r.resize(proto::REQUEST_HEADER_LEN + BLOCK as usize, 0xab);
        r
    }

    /// A connection whose client sent `REQUESTS` writes, all waiting in the export.
    struct Setup {
        export: Arc<GatedExport>,
        gate: watch::Sender<u64>,
        writes: Arc<Mutex<Vec<usize>>>,
        conn: tokio::task::JoinHandle<Result<(), ConnError>>,
        _client: tokio::io::DuplexStream,
        _stop: watch::Sender<bool>,
    }

    async fn requests_in_flight(client: Client) -> Setup {
        let (gate, gated) = watch::channel(0);
        let export = Arc::new(GatedExport {
            gate: gated,
            started: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
        });
        let (mut ours, theirs) = tokio::io::duplex(1 << 20);
        for block in 0..REQUESTS as u64 {
            ours.write_all(&write_request(block)).await.unwrap();
        }
        let (stop, shutdown) = watch::channel(false);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let socket = Socket {
            client,
            writes: Arc::clone(&writes),
        };
        let handle: Arc<dyn ExportHandle> = export.clone();
        let conn = tokio::spawn(transmission(theirs, socket, handle, shutdown));
        let setup = Setup {
            export,
            gate,
            writes,
            conn,
            _client: ours,
            _stop: stop,
        };
        setup.until(|s| s.started() == REQUESTS).await;
        setup
    }

    impl Setup {
        fn started(&self) -> usize {
            self.export.started.load(Ordering::SeqCst)
        }
        fn finished(&self) -> usize {
            self.export.finished.load(Ordering::SeqCst)
        }
        /// Let the first `n` requests finish, from a task on the runtime's worker as the
        /// volume's task does (the test's own thread is not a worker: the connection would
        /// run while the gate opens).
        async fn open(&self, n: u64) {
            let gate = self.gate.clone();
            tokio::spawn(async move { gate.send_replace(n) })
                .await
                .unwrap();
        }
        /// Wait (at most 10 s) until `done` holds.
        async fn until(&self, done: impl Fn(&Self) -> bool) {
            tokio::time::timeout(Duration::from_secs(10), async {
                while !done(self) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("timed out");
        }
    }

    // The runtime tandemd runs on (a single worker keeps the schedule deterministic): a
    // task woken there runs next (its LIFO slot), so a reply writer fed by each request
    // would send the first reply before the other requests had run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn replies_of_requests_that_finish_together_leave_in_one_write() {
        let setup = requests_in_flight(Client::Reads).await;
        assert!(setup.writes.lock().unwrap().is_empty());
        setup.open(REQUESTS as u64).await;
        setup.until(|s| !s.writes.lock().unwrap().is_empty()).await;
        assert_eq!(
            *setup.writes.lock().unwrap(),
            vec![REQUESTS * proto::SIMPLE_REPLY_HEADER_LEN],
            "the {REQUESTS} replies should leave in one write"
        );
        // The client goes: the connection ends.
        let Setup { conn, _client, .. } = setup;
        drop(_client);
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the connection did not end when its client went")
            .unwrap()
            .expect_err("the client left without NBD_CMD_DISC");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_client_that_stops_reading_does_not_hold_up_the_requests_that_finish() {
        let setup = requests_in_flight(Client::Stuck).await;
        setup.open(1).await;
        setup.until(|s| s.finished() == 1).await;
        // The first reply waits in the socket for good; the others still finish, so
        // nothing they hold in the volume stays held.
        setup.open(REQUESTS as u64).await;
        setup.until(|s| s.finished() == REQUESTS).await;
        assert!(!setup.conn.is_finished(), "a stuck client is not a failure");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_client_that_stops_reading_does_not_hold_up_shutdown() {
        let setup = requests_in_flight(Client::Stuck).await;
        setup.open(REQUESTS as u64).await;
        setup.until(|s| s.finished() == REQUESTS).await;
        let Setup { conn, _stop, .. } = setup;
        _stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("shutdown waited for a client that does not read")
            .unwrap()
            .expect_err("ended by shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn requests_read_before_the_socket_failed_still_run_to_their_end() {
        let setup = requests_in_flight(Client::Gone).await;
        setup.open(1).await;
        setup.until(|s| s.finished() == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !setup.conn.is_finished(),
            "the connection ended with {} requests still running",
            REQUESTS - 1
        );
        setup.open(REQUESTS as u64).await;
        setup.until(|s| s.conn.is_finished()).await;
        assert_eq!(setup.finished(), REQUESTS);
        let Setup { conn, .. } = setup;
        assert!(
            conn.await.unwrap().is_err(),
            "the failed socket is the error"
        );
    }
}
