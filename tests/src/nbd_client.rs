//! A minimal, strict NBD client (blocking std I/O, one request in flight) for tests and
//! `tandem-check`: fixed newstyle handshake with `NBD_OPT_GO`, then READ, WRITE (+FUA),
//! FLUSH and DISC with simple replies.
//!
//! Everything the server sends is checked: greeting magics, option reply magic and option
//! echo, reply lengths, the transmission reply magic and the cookie of every reply. A
//! refused `NBD_OPT_GO` yields [`NbdClientError::Refused`] with the server's message, which
//! is how a Secondary says "not Primary here". Errors say whether the connection is still
//! usable ([`NbdClientError::is_connection_lost`]): an errno reply keeps it, anything else
//! ends it.
//!
//! ```text
//! S: NBDMAGIC IHAVEOPT u16 flags      C: u32 FIXED_NEWSTYLE|NO_ZEROES
//! C: IHAVEOPT GO len {u32 namelen, name, u16 0}
//! S: (REPLY_MAGIC GO INFO {EXPORT size flags})* REPLY_MAGIC GO ACK | REPLY_MAGIC GO ERR_* msg
//! C: 0x25609513 flags type cookie offset len [data]   S: 0x67446698 errno cookie [data]
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const OPT_ABORT: u32 = 2;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

/// Transmission flag: the export refuses writes.
pub const TRANSMIT_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server supports FLUSH.
pub const TRANSMIT_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server supports FUA.
pub const TRANSMIT_SEND_FUA: u16 = 1 << 3;

/// Request types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

/// Largest option reply payload accepted (the spec's servers stay far below).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest READ/WRITE this client issues.
pub const MAX_IO: u32 = 32 * 1024 * 1024;

/// Why an NBD operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    /// The unix socket could not be connected.
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed during `op` (includes EOF and timeouts).
    #[error("NBD connection failed during {op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The server broke the protocol.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server refused to open the export (`NBD_REP_ERR_*`).
    #[error("server refused export '{export}' ({code}): {message}")]
    Refused {
        export: String,
        code: &'static str,
        message: String,
    },
    /// The server answered a command with an errno.
    #[error("{op} at offset {offset} failed: server replied {} ({errno})", errno_name(*.errno))]
    Command {
        op: &'static str,
        offset: u64,
        errno: u32,
    },
    /// A request this client refuses to send (range, size, read-only export).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl NbdClientError {
    /// Whether the connection is gone (reconnect) rather than a request failing on a
    /// working connection.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            NbdClientError::Connect { .. }
                | NbdClientError::Io { .. }
                | NbdClientError::Protocol(_)
        )
    }

    /// The errno of a failed command, if that is what this is.
    pub fn errno(&self) -> Option<u32> {
        match self {
            NbdClientError::Command { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Name of an NBD errno value (the spec's subset of Linux errno values).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown errno",
    }
}

/// NBD errno value for ENOSPC.
pub const NBD_ENOSPC: u32 = 28;

fn rep_err_name(reply: u32) -> &'static str {
    match reply & !REP_ERR_BIT {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        _ => "NBD_REP_ERR_(unknown)",
    }
}

/// An open export in transmission phase.
pub struct NbdClient {
    stream: UnixStream,
    export: String,
    size: u64,
    flags: u16,
    next_cookie: u64,
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> NbdClientError {
    move |source| NbdClientError::Io { op, source }
}

impl NbdClient {
    /// Connect to a unix socket and open `export` with `NBD_OPT_GO`. `timeout` bounds every
    /// socket read and write afterwards (a frozen server then yields an `Io` error).
    pub fn connect(
        socket: &Path,
        export: &str,
        timeout: Option<Duration>,
    ) -> Result<NbdClient, NbdClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| NbdClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .map_err(io("setting socket timeouts"))?;
        let mut client = NbdClient {
            stream,
            export: export.to_string(),
            size: 0,
            flags: 0,
            next_cookie: 1,
        };
        client.handshake()?;
        Ok(client)
    }

    fn handshake(&mut self) -> Result<(), NbdClientError> {
        let mut greeting = [0u8; 18];
        self.stream
            .read_exact(&mut greeting)
            .map_err(io("reading the server greeting"))?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap_or_default());
        let opt_magic = u64::from_be_bytes(greeting[8..16].try_into().unwrap_or_default());
        let handshake_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if magic != NBDMAGIC {
            return Err(NbdClientError::Protocol(format!(
                "greeting magic {magic:#x}, expected NBDMAGIC"
            )));
        }
        if opt_magic != IHAVEOPT {
            return Err(NbdClientError::Protocol(format!(
                "greeting {opt_magic:#x} is not IHAVEOPT (oldstyle servers are not supported)"
            )));
        }
        if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdClientError::Protocol(
                "server does not offer fixed newstyle negotiation".into(),
            ));
        }
        let client_flags = u32::from(handshake_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        self.stream
            .write_all(&client_flags.to_be_bytes())
            .map_err(io("sending client flags"))?;

        let name = self.export.as_bytes();
        let name_len = u32::try_from(name.len())
            .ok()
            .filter(|n| *n <= 4096)
            .ok_or_else(|| NbdClientError::Invalid("export name longer than 4096 bytes".into()))?;
        let mut data = Vec::with_capacity(6 + name.len());
        data.extend_from_slice(&name_len.to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes()); // no extra info requests
        self.send_option(OPT_GO, &data)?;

        let mut got_export_info = false;
        loop {
            let (reply, payload) = self.read_option_reply(OPT_GO)?;
            match reply {
                REP_ACK => break,
                REP_INFO => {
                    if payload.len() < 2 {
                        return Err(NbdClientError::Protocol(
                            "NBD_REP_INFO shorter than 2".into(),
                        ));
                    }
                    let info = u16::from_be_bytes([payload[0], payload[1]]);
                    if info == INFO_EXPORT {
                        if payload.len() != 12 {
                            return Err(NbdClientError::Protocol(format!(
                                "NBD_INFO_EXPORT of length {}, expected 12",
                                payload.len()
                            )));
                        }
                        self.size =
                            u64::from_be_bytes(payload[2..10].try_into().unwrap_or_default());
                        self.flags = u16::from_be_bytes([payload[10], payload[11]]);
                        got_export_info = true;
                    }
                }
                r if r & REP_ERR_BIT != 0 => {
                    let message = String::from_utf8_lossy(&payload).into_owned();
                    // Be polite: end negotiation (best effort, the connection is useless).
                    let _ = self.send_option(OPT_ABORT, &[]);
                    return Err(NbdClientError::Refused {
                        export: self.export.clone(),
                        code: rep_err_name(r),
                        message,
                    });
                }
                other => {
                    return Err(NbdClientError::Protocol(format!(
                        "unexpected option reply type {other} to NBD_OPT_GO"
                    )))
                }
            }
        }
        if !got_export_info {
            return Err(NbdClientError::Protocol(
                "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
            ));
        }
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdClientError> {
        let mut frame = Vec::with_capacity(16 + data.len());
        frame.extend_from_slice(&IHAVEOPT.to_be_bytes());
        frame.extend_from_slice(&option.to_be_bytes());
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
        frame.extend_from_slice(data);
        self.stream
            .write_all(&frame)
            .map_err(io("sending an option"))
    }

    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdClientError> {
        let mut header = [0u8; 20];
        self.stream
            .read_exact(&mut header)
            .map_err(io("reading an option reply"))?;
        let magic = u64::from_be_bytes(header[0..8].try_into().unwrap_or_default());
        let echoed = u32::from_be_bytes(header[8..12].try_into().unwrap_or_default());
        let reply = u32::from_be_bytes(header[12..16].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default());
        if magic != OPTION_REPLY_MAGIC {
            return Err(NbdClientError::Protocol(format!(
                "option reply magic {magic:#x}"
            )));
        }
        if echoed != option {
            return Err(NbdClientError::Protocol(format!(
                "option reply for option {echoed}, expected {option}"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(NbdClientError::Protocol(format!(
                "option reply of {len} bytes"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.stream
            .read_exact(&mut payload)
            .map_err(io("reading an option reply payload"))?;
        Ok((reply, payload))
    }

    /// Export size in bytes (from `NBD_INFO_EXPORT`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags (`TRANSMIT_*`).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether the server advertised the export as read-only.
    pub fn read_only(&self) -> bool {
        self.flags & TRANSMIT_READ_ONLY != 0
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdClientError> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| NbdClientError::Invalid("offset + length overflows".into()))?;
        if end > self.size {
            return Err(NbdClientError::Invalid(format!(
                "range {offset}+{len} is past the export's end ({})",
                self.size
            )));
        }
        if len > u64::from(MAX_IO) {
            return Err(NbdClientError::Invalid(format!(
                "request of {len} bytes is over {MAX_IO}"
            )));
        }
        Ok(())
    }

    fn send_request(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64, NbdClientError> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let mut frame = Vec::with_capacity(28 + data.len());
        frame.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        frame.extend_from_slice(&flags.to_be_bytes());
        frame.extend_from_slice(&command.to_be_bytes());
        frame.extend_from_slice(&cookie.to_be_bytes());
        frame.extend_from_slice(&offset.to_be_bytes());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(data);
        self.stream
            .write_all(&frame)
            .map_err(io("sending a request"))?;
        Ok(cookie)
    }

    /// Read one simple reply header, check magic and cookie; returns the errno.
    fn read_reply(&mut self, cookie: u64) -> Result<u32, NbdClientError> {
        let mut header = [0u8; 16];
        self.stream
            .read_exact(&mut header)
            .map_err(io("reading a reply"))?;
        let magic = u32::from_be_bytes(header[0..4].try_into().unwrap_or_default());
        let errno = u32::from_be_bytes(header[4..8].try_into().unwrap_or_default());
        let got = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(NbdClientError::Protocol(format!(
                "reply magic {magic:#x} (structured replies were not negotiated)"
            )));
        }
        if got != cookie {
            return Err(NbdClientError::Protocol(format!(
                "reply for cookie {got}, expected {cookie}"
            )));
        }
        Ok(errno)
    }

    /// Read `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdClientError> {
        self.check_range(offset, u64::from(len))?;
        let cookie = self.send_request(0, CMD_READ, offset, len, &[])?;
        let errno = self.read_reply(cookie)?;
        if errno != 0 {
            return Err(NbdClientError::Command {
                op: "READ",
                offset,
                errno,
            });
        }
        let mut data = vec![0u8; len as usize];
        self.stream
            .read_exact(&mut data)
            .map_err(io("reading READ data"))?;
        Ok(data)
    }

    /// Write `data` at `offset`; with `fua` the server must make it durable first.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdClientError::Invalid("write larger than 4 GiB".into()))?;
        self.check_range(offset, u64::from(len))?;
        if self.read_only() {
            return Err(NbdClientError::Invalid(format!(
                "export '{}' is read-only",
                self.export
            )));
        }
        if fua && self.flags & TRANSMIT_SEND_FUA == 0 {
            return Err(NbdClientError::Invalid(
                "server does not support FUA".into(),
            ));
        }
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let cookie = self.send_request(flags, CMD_WRITE, offset, len, data)?;
        match self.read_reply(cookie)? {
            0 => Ok(()),
            errno => Err(NbdClientError::Command {
                op: "WRITE",
                offset,
                errno,
            }),
        }
    }

    /// Make every acknowledged write durable.
    pub fn flush(&mut self) -> Result<(), NbdClientError> {
        if self.flags & TRANSMIT_SEND_FLUSH == 0 {
            return Err(NbdClientError::Invalid(
                "server does not support FLUSH".into(),
            ));
        }
        let cookie = self.send_request(0, CMD_FLUSH, 0, 0, &[])?;
        match self.read_reply(cookie)? {
            0 => Ok(()),
            errno => Err(NbdClientError::Command {
                op: "FLUSH",
                offset: 0,
                errno,
            }),
        }
    }

    /// A second handle on the connection, to close it from another thread while a request
    /// waits (`shutdown(Both)`: a client that goes away with a request in flight).
    pub fn closer(&self) -> std::io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// The socket, in the transmission phase, for a caller that speaks that phase itself
    /// (the `frontends` bench keeps many requests in flight on it).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Send NBD_CMD_DISC and close (the server sends no reply to DISC).
    pub fn disconnect(mut self) -> Result<(), NbdClientError> {
        self.send_request(0, CMD_DISC, 0, 0, &[])?;
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        Ok(())
    }
}
