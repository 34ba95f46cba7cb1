//! NBD wire format: constants, parsers for what clients send, encoders for what the server
//! sends. Pure functions over byte slices, no I/O, so every parser is unit-tested and fuzzed.
//!
//! Reference: the NBD project's `doc/proto.md` (fixed newstyle negotiation, `NBD_OPT_GO`
//! with `NBD_INFO_*`, simple replies).

use std::fmt;

// ---- Handshake ------------------------------------------------------------------------

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server, 16 bits).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (32 bits).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option types.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

/// Information types of `NBD_REP_INFO`.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (16 bits).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Longest option payload we read into memory. Names are at most 4096 bytes by the spec;
/// `NBD_OPT_GO` adds the name length and a short list of info requests.
pub const MAX_OPTION_LEN: u32 = 8192;
/// Longest string the spec allows (export names, messages).
pub const MAX_STRING_LEN: usize = 4096;

// ---- Transmission ---------------------------------------------------------------------

pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// NBD error values (the only ones the protocol allows on the wire).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Block size constraints we advertise: any alignment works (the backing device does
/// positional byte I/O), 4 KiB is efficient, 32 MiB is the largest READ/WRITE payload.
pub const MIN_BLOCK_SIZE: u32 = 1;
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 32 << 20;

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// What the server sends first: magic, newstyle magic, handshake flags.
pub fn encode_server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// The client's answer to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

/// Why the client's flags end the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientFlagsError {
    #[error("client sent unknown handshake flags {0:#x}")]
    Unknown(u32),
    #[error("client does not speak fixed newstyle negotiation (oldstyle/newstyle clients are not supported)")]
    NotFixedNewstyle,
}

/// Parse the 32-bit client flags. Unknown bits and non-fixed-newstyle clients are refused.
pub fn parse_client_flags(raw: [u8; 4]) -> Result<ClientFlags, ClientFlagsError> {
    let flags = u32::from_be_bytes(raw);
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if flags & !known != 0 {
        return Err(ClientFlagsError::Unknown(flags));
    }
    if flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ClientFlagsError::NotFixedNewstyle);
    }
    Ok(ClientFlags {
        no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// An option header: `IHAVEOPT`, option, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// The option header did not start with `IHAVEOPT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad option magic {0:#018x}")]
pub struct BadOptionMagic(pub u64);

pub fn parse_option_header(raw: &[u8; 16]) -> Result<OptionHeader, BadOptionMagic> {
    let magic = u64::from_be_bytes([
        raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
    ]);
    if magic != IHAVEOPT {
        return Err(BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]),
        len: u32::from_be_bytes([raw[12], raw[13], raw[14], raw[15]]),
    })
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// `NBD_INFO_*` types the client asked for (unknown ones are kept and ignored later).
    pub requests: Vec<u16>,
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    /// Known to the protocol or not, we do not implement it: `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
    /// Syntactically wrong: `NBD_REP_ERR_INVALID` with the reason as message.
    Invalid(&'static str),
}

fn parse_name(bytes: &[u8]) -> Result<String, &'static str> {
    if bytes.len() > MAX_STRING_LEN {
        return Err("export name longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("export name contains NUL");
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| "export name is not UTF-8")
}

fn parse_info_request(payload: &[u8]) -> Result<InfoRequest, &'static str> {
    let name_len = be_u32(payload, 0).ok_or("option data too short for a name length")? as usize;
    let rest = payload.len() - 4;
    if name_len > rest.saturating_sub(2) {
        return Err("name length exceeds option data");
    }
    let name = parse_name(&payload[4..4 + name_len])?;
    let count_at = 4 + name_len;
    let count = be_u16(payload, count_at).ok_or("missing information request count")? as usize;
    let list = &payload[count_at + 2..];
    if list.len() != count * 2 {
        return Err("information request count does not match option length");
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

/// Parse an option payload (already length-checked against [`MAX_OPTION_LEN`]).
pub fn parse_option(option: u32, payload: &[u8]) -> ClientOption {
    match option {
        NBD_OPT_EXPORT_NAME => match parse_name(payload) {
            Ok(name) => ClientOption::ExportName(name),
            Err(why) => ClientOption::Invalid(why),
        },
        // The spec: a server SHOULD ignore data sent with NBD_OPT_ABORT.
        NBD_OPT_ABORT => ClientOption::Abort,
        NBD_OPT_LIST if payload.is_empty() => ClientOption::List,
        NBD_OPT_LIST => ClientOption::Invalid("NBD_OPT_LIST takes no data"),
        NBD_OPT_STRUCTURED_REPLY if payload.is_empty() => ClientOption::StructuredReply,
        NBD_OPT_STRUCTURED_REPLY => ClientOption::Invalid("NBD_OPT_STRUCTURED_REPLY takes no data"),
        NBD_OPT_INFO | NBD_OPT_GO => match parse_info_request(payload) {
            Ok(req) if option == NBD_OPT_GO => ClientOption::Go(req),
            Ok(req) => ClientOption::Info(req),
            Err(why) => ClientOption::Invalid(why),
        },
        other => ClientOption::Unsupported(other),
    }
}

/// One option reply: magic, option, reply type, length, data.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An error reply whose message QEMU and nbdinfo show the user (cut to the spec's 4096).
pub fn encode_option_error(option: u32, reply_type: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    encode_option_reply(option, reply_type, &message.as_bytes()[..end])
}

/// `NBD_REP_SERVER` data for `NBD_OPT_LIST`.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(NBD_OPT_LIST, NBD_REP_SERVER, &data)
}

/// `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(option: u32, size: u64, flags: u16) -> Vec<u8> {
    let mut data = Vec::with_capacity(12);
    data.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    encode_option_reply(option, NBD_REP_INFO, &data)
}

/// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` with our constraints.
pub fn encode_info_block_size(option: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(14);
    data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&MAX_BLOCK_SIZE.to_be_bytes());
    encode_option_reply(option, NBD_REP_INFO, &data)
}

/// `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn encode_info_name(option: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(2 + name.len());
    data.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(option, NBD_REP_INFO, &data)
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeroes unless negotiated away.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// Transmission flags for an export.
pub fn transmission_flags(read_only: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= NBD_FLAG_READ_ONLY;
    }
    flags
}

/// A request header as sent by the client (28 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl fmt::Debug for RequestHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request(type {}, flags {:#x}, cookie {:#x}, offset {}, length {})",
            self.kind, self.flags, self.cookie, self.offset, self.len
        )
    }
}

/// The request header did not start with the request magic: the stream is out of sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadRequestMagic(pub u32);

pub fn parse_request_header(
    raw: &[u8; REQUEST_HEADER_LEN],
) -> Result<RequestHeader, BadRequestMagic> {
    // Indexing a fixed-size array with constant in-range offsets cannot fail.
    let magic = be_u32(raw, 0).unwrap_or(0);
    if magic != NBD_REQUEST_MAGIC {
        return Err(BadRequestMagic(magic));
    }
    Ok(RequestHeader {
        flags: be_u16(raw, 4).unwrap_or(0),
        kind: be_u16(raw, 6).unwrap_or(0),
        cookie: be_u64(raw, 8).unwrap_or(0),
        offset: be_u64(raw, 16).unwrap_or(0),
        len: be_u32(raw, 24).unwrap_or(0),
    })
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_unmap: bool,
    },
    Disconnect,
}

/// A request refused before it reaches the export: reply `errno`, after reading and
/// discarding `discard` payload bytes the client sends with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub discard: u32,
    pub reason: &'static str,
}

/// What a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct ExportLimits {
    pub size: u64,
    pub read_only: bool,
}

fn in_range(offset: u64, len: u32, size: u64) -> bool {
    matches!(offset.checked_add(u64::from(len)), Some(end) if end <= size)
}

/// Validate a request header against the export. Unknown commands and flags, ranges past
/// the end, lengths past [`MAX_BLOCK_SIZE`] and writes to read-only exports are refused
/// with the errno the spec asks for.
pub fn validate_request(hdr: &RequestHeader, limits: ExportLimits) -> Result<Command, Rejection> {
    let payload = if hdr.kind == NBD_CMD_WRITE {
        hdr.len
    } else {
        0
    };
    let reject = |errno, reason| Rejection {
        errno,
        discard: payload,
        reason,
    };
    let allowed_flags = match hdr.kind {
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_DISC | NBD_CMD_FLUSH | NBD_CMD_TRIM => {
            NBD_CMD_FLAG_FUA
        }
        _ => return Err(reject(NBD_EINVAL, "unknown command")),
    };
    if hdr.flags & !allowed_flags != 0 {
        return Err(reject(NBD_EINVAL, "unknown or inapplicable command flags"));
    }
    let fua = hdr.flags & NBD_CMD_FLAG_FUA != 0;
    let (offset, len) = (hdr.offset, hdr.len);
    let writes = matches!(
        hdr.kind,
        NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES
    );
    if matches!(hdr.kind, NBD_CMD_READ | NBD_CMD_WRITE) && len > MAX_BLOCK_SIZE {
        return Err(reject(NBD_EINVAL, "length exceeds the maximum block size"));
    }
    if writes && limits.read_only {
        return Err(reject(NBD_EPERM, "export is read-only"));
    }
    match hdr.kind {
        NBD_CMD_READ | NBD_CMD_TRIM if !in_range(offset, len, limits.size) => Err(reject(
            NBD_EINVAL,
            "request reaches past the end of the export",
        )),
        NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES if !in_range(offset, len, limits.size) => Err(reject(
            NBD_ENOSPC,
            "write reaches past the end of the export",
        )),
        NBD_CMD_READ => Ok(Command::Read { offset, len }),
        NBD_CMD_WRITE => Ok(Command::Write { offset, len, fua }),
        NBD_CMD_TRIM => Ok(Command::Trim { offset, len, fua }),
        NBD_CMD_WRITE_ZEROES => Ok(Command::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap: hdr.flags & NBD_CMD_FLAG_NO_HOLE == 0,
        }),
        NBD_CMD_FLUSH => Ok(Command::Flush),
        _ => Ok(Command::Disconnect),
    }
}

/// A simple reply header: magic, error, cookie.
pub fn encode_simple_reply(errno: u32, cookie: u64) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_LEN];
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&errno.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    const LIMITS: ExportLimits = ExportLimits {
        size: 1 << 20,
        read_only: false,
    };

    fn info_payload(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name);
        p.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            p.extend_from_slice(&r.to_be_bytes());
        }
        p
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(1u32.to_be_bytes()),
            Ok(ClientFlags { no_zeroes: false })
        );
        assert_eq!(
            parse_client_flags(3u32.to_be_bytes()),
            Ok(ClientFlags { no_zeroes: true })
        );
        assert_eq!(
            parse_client_flags(0u32.to_be_bytes()),
            Err(ClientFlagsError::NotFixedNewstyle)
        );
        assert_eq!(
            parse_client_flags(5u32.to_be_bytes()),
            Err(ClientFlagsError::Unknown(5))
        );
    }

    #[test]
    fn option_header() {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        raw[8..12].copy_from_slice(&7u32.to_be_bytes());
        raw[12..].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&raw),
            Ok(OptionHeader { option: 7, len: 9 })
        );
        raw[0] = 0;
        assert!(parse_option_header(&raw).is_err());
    }

    #[test]
    fn go_and_info_payloads() {
        let p = info_payload(b"vm-100-disk-0", &[NBD_INFO_BLOCK_SIZE, 99]);
        assert_eq!(
            parse_option(NBD_OPT_GO, &p),
            ClientOption::Go(InfoRequest {
                name: "vm-100-disk-0".into(),
                requests: vec![3, 99]
            })
        );
        assert!(matches!(
            parse_option(NBD_OPT_INFO, &info_payload(b"", &[])),
            ClientOption::Info(InfoRequest { ref name, .. }) if name.is_empty()
        ));
    }

    #[test]
    fn malformed_go_payloads_are_invalid() {
        let good = info_payload(b"abc", &[1, 3]);
        // Every truncation is invalid, never a panic.
        for cut in 0..good.len() {
            assert!(
                matches!(
                    parse_option(NBD_OPT_GO, &good[..cut]),
                    ClientOption::Invalid(_)
                ),
                "cut {cut}"
            );
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(matches!(
            parse_option(NBD_OPT_GO, &extra),
            ClientOption::Invalid(_)
        ));
        // Name length beyond the data.
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_option(NBD_OPT_GO, &huge),
            ClientOption::Invalid(_)
        ));
        // Not UTF-8, NUL inside.
        assert!(matches!(
            parse_option(NBD_OPT_GO, &info_payload(&[0xff, 0xfe], &[])),
            ClientOption::Invalid(_)
        ));
        assert!(matches!(
            parse_option(NBD_OPT_EXPORT_NAME, b"a\0b"),
            ClientOption::Invalid(_)
        ));
        assert!(matches!(
            parse_option(NBD_OPT_EXPORT_NAME, &[b'a'; 4097]),
            ClientOption::Invalid(_)
        ));
    }

    #[test]
    fn simple_options() {
        assert_eq!(parse_option(NBD_OPT_LIST, b""), ClientOption::List);
        assert!(matches!(
            parse_option(NBD_OPT_LIST, b"x"),
            ClientOption::Invalid(_)
        ));
        assert_eq!(parse_option(NBD_OPT_ABORT, b"ignored"), ClientOption::Abort);
        assert_eq!(
            parse_option(NBD_OPT_STRUCTURED_REPLY, b""),
            ClientOption::StructuredReply
        );
        assert_eq!(
            parse_option(NBD_OPT_EXPORT_NAME, b"v"),
            ClientOption::ExportName("v".into())
        );
        assert_eq!(
            parse_option(NBD_OPT_STARTTLS, b""),
            ClientOption::Unsupported(NBD_OPT_STARTTLS)
        );
        assert_eq!(
            parse_option(0xdead, b"zz"),
            ClientOption::Unsupported(0xdead)
        );
    }

    #[test]
    fn option_replies_encode() {
        let r = encode_option_error(NBD_OPT_GO, NBD_REP_ERR_POLICY, "no");
        assert_eq!(&r[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &NBD_OPT_GO.to_be_bytes());
        assert_eq!(&r[12..16], &NBD_REP_ERR_POLICY.to_be_bytes());
        assert_eq!(&r[16..20], &2u32.to_be_bytes());
        assert_eq!(&r[20..], b"no");
        let long = "é".repeat(3000);
        let r = encode_option_error(NBD_OPT_GO, NBD_REP_ERR_POLICY, &long);
        assert!(r.len() - 20 <= MAX_STRING_LEN);
        assert!(std::str::from_utf8(&r[20..]).is_ok());
        let e = encode_info_export(NBD_OPT_GO, 4096, 0x12);
        assert_eq!(e.len(), 20 + 12);
        assert_eq!(encode_info_block_size(NBD_OPT_GO).len(), 20 + 14);
        assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
        assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
        assert_eq!(encode_rep_server("ab").len(), 20 + 6);
    }

    #[test]
    fn request_header_parses_and_checks_magic() {
        let mut raw = [0u8; 28];
        raw[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        raw[4..6].copy_from_slice(&1u16.to_be_bytes());
        raw[6..8].copy_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        raw[8..16].copy_from_slice(&0xabcdu64.to_be_bytes());
        raw[16..24].copy_from_slice(&4096u64.to_be_bytes());
        raw[24..28].copy_from_slice(&512u32.to_be_bytes());
        let h = parse_request_header(&raw).unwrap();
        assert_eq!(h, header(NBD_CMD_WRITE, 1, 4096, 512).with_cookie(0xabcd));
        raw[0] ^= 1;
        assert!(parse_request_header(&raw).is_err());
    }

    impl RequestHeader {
        fn with_cookie(mut self, cookie: u64) -> Self {
            self.cookie = cookie;
            self
        }
    }

    #[test]
    fn valid_requests() {
        assert_eq!(
            validate_request(&header(NBD_CMD_READ, 0, 0, 4096), LIMITS),
            Ok(Command::Read {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            validate_request(&header(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 4096, 4096), LIMITS),
            Ok(Command::Write {
                offset: 4096,
                len: 4096,
                fua: true
            })
        );
        assert_eq!(
            validate_request(
                &header(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 1 << 20),
                LIMITS
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false,
                may_unmap: false
            })
        );
        assert_eq!(
            validate_request(&header(NBD_CMD_FLUSH, 0, 0, 0), LIMITS),
            Ok(Command::Flush)
        );
        assert_eq!(
            validate_request(&header(NBD_CMD_DISC, 0, 0, 0), LIMITS),
            Ok(Command::Disconnect)
        );
        // Reads of the very last byte are fine.
        assert!(validate_request(&header(NBD_CMD_READ, 0, (1 << 20) - 1, 1), LIMITS).is_ok());
    }

    #[test]
    fn invalid_requests_get_the_right_errno() {
        let rej = |h| validate_request(&h, LIMITS).unwrap_err();
        assert_eq!(rej(header(99, 0, 0, 0)).errno, NBD_EINVAL);
        assert_eq!(rej(header(NBD_CMD_READ, 0, 1 << 20, 1)).errno, NBD_EINVAL);
        assert_eq!(rej(header(NBD_CMD_READ, 0, u64::MAX, 2)).errno, NBD_EINVAL);
        assert_eq!(rej(header(NBD_CMD_TRIM, 0, u64::MAX, 2)).errno, NBD_EINVAL);
        let w = rej(header(NBD_CMD_WRITE, 0, (1 << 20) - 10, 4096));
        assert_eq!((w.errno, w.discard), (NBD_ENOSPC, 4096));
        assert_eq!(
            rej(header(NBD_CMD_WRITE_ZEROES, 0, 1 << 20, 1)).errno,
            NBD_ENOSPC
        );
        let big = rej(header(NBD_CMD_WRITE, 0, 0, MAX_BLOCK_SIZE + 1));
        assert_eq!((big.errno, big.discard), (NBD_EINVAL, MAX_BLOCK_SIZE + 1));
        assert_eq!(
            rej(header(NBD_CMD_READ, 0, 0, MAX_BLOCK_SIZE + 1)).errno,
            NBD_EINVAL
        );
        // Flags: NO_HOLE only on WRITE_ZEROES, unknown bits never.
        let f = rej(header(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512));
        assert_eq!((f.errno, f.discard), (NBD_EINVAL, 512));
        assert_eq!(rej(header(NBD_CMD_READ, 1 << 4, 0, 512)).errno, NBD_EINVAL);
        // Read-only exports refuse writes, trims and zeroing with EPERM.
        let ro = ExportLimits {
            read_only: true,
            ..LIMITS
        };
        for kind in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
            assert_eq!(
                validate_request(&header(kind, 0, 0, 512), ro)
                    .unwrap_err()
                    .errno,
                NBD_EPERM
            );
        }
        assert!(validate_request(&header(NBD_CMD_READ, 0, 0, 512), ro).is_ok());
    }

    #[test]
    fn flags_and_replies() {
        let f = transmission_flags(false);
        assert_eq!(f & NBD_FLAG_READ_ONLY, 0);
        assert_ne!(f & NBD_FLAG_HAS_FLAGS, 0);
        assert_ne!(transmission_flags(true) & NBD_FLAG_READ_ONLY, 0);
        let r = encode_simple_reply(NBD_EIO, 0x1122);
        assert_eq!(&r[..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..8], &5u32.to_be_bytes());
        assert_eq!(&r[8..], &0x1122u64.to_be_bytes());
    }
}
