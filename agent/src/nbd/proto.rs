//! The NBD wire format (fixed newstyle negotiation, simple replies): constants, and pure
//! encoders/decoders over byte slices. No I/O happens here; [`super::server`] owns the
//! sockets.
//!
//! Reference: the NBD protocol, `doc/proto.md` of NetworkBlockDevice/nbd. All integers
//! are big-endian on the wire.

use std::io;

use thiserror::Error;

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the greeting, and the magic in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic in front of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options (`NBD_OPT_*`).
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY` (not implemented: answered `NBD_REP_ERR_UNSUP`).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types (`NBD_REP_*`).
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export in a LIST answer.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one information item in an INFO/GO answer.
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// `NBD_REP_ERR_POLICY`: forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
/// `NBD_REP_ERR_INVALID`: syntactically or semantically invalid option.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// `NBD_REP_ERR_TLS_REQD`: the server requires TLS first (`NBD_OPT_STARTTLS`).
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
/// `NBD_REP_ERR_UNKNOWN`: the requested export is not available.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
/// `NBD_REP_ERR_TOO_BIG`: the option's data is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (`NBD_FLAG_*`).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_SEND_TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_CAN_MULTI_CONN`: a flush on any connection covers writes completed on all.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// The transmission flags every export advertises.
///
/// `CAN_MULTI_CONN` is correct because [`crate::blockdev::BlockDevice::flush`] makes every
/// completed write of the device durable, whichever connection made it.
pub const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

/// Command flag `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE` (WRITE_ZEROES only; honoured trivially).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Commands (`NBD_CMD_*`).
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Error values of a simple reply (errno numbers, as the protocol defines them).
pub const EPERM: u32 = 1;
/// `NBD_EIO`.
pub const EIO: u32 = 5;
/// `NBD_ENOMEM`.
pub const ENOMEM: u32 = 12;
/// `NBD_EINVAL`.
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`.
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`.
pub const ESHUTDOWN: u32 = 108;

/// Size of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// A violation of the protocol by the peer: the connection is closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// bad magic {found:#x} in {what}
    #[error("bad magic {found:#x} in {what}")]
    BadMagic {
        /// Which message carried it.
        what: &'static str,
        /// The magic received.
        found: u64,
    },
    /// client flags {0:#x} lack FIXED_NEWSTYLE or have unknown bits
    #[error("client flags {0:#x} lack FIXED_NEWSTYLE or carry unknown bits")]
    ClientFlags(u32),
    /// malformed option data
    #[error("malformed {option} data: {reason}")]
    BadOption {
        /// Option name.
        option: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Client flags negotiated in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Parses the client flags; only fixed-newstyle clients are served, and unknown bits are
/// refused as the protocol requires.
pub fn parse_client_flags(raw: [u8; 4]) -> Result<ClientFlags, ProtoError> {
    let flags = u32::from_be_bytes(raw);
    if flags & FLAG_C_FIXED_NEWSTYLE == 0
        || flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
    {
        return Err(ProtoError::ClientFlags(flags));
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// The header of one option sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// Parses an option header.
pub fn parse_option_header(raw: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(&raw[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option header",
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: be_u32(&raw[8..12]),
        len: be_u32(&raw[12..16]),
    })
}

/// Human name of an option, for logs and errors.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        _ => "unknown option",
    }
}

/// Appends one option reply to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error reply carrying a message (truncated to [`MAX_STRING`] bytes at a
/// character boundary).
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    encode_option_reply(out, option, reply, truncate(message).as_bytes());
}

/// Appends an `NBD_REP_SERVER` entry of a LIST answer.
pub fn encode_list_entry(out: &mut Vec<u8>, name: &str) {
    let name = truncate(name).as_bytes();
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name);
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// The data of an `NBD_OPT_INFO` / `NBD_OPT_GO` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Requested export name (may be empty: the default export).
    pub name: String,
    /// Information items the client asked for (`NBD_INFO_*`).
    pub items: Vec<u16>,
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let bad = |reason| ProtoError::BadOption {
        option: "NBD_OPT_INFO/GO",
        reason,
    };
    if data.len() < 6 {
        return Err(bad("shorter than 6 bytes"));
    }
    let name_len = be_u32(&data[0..4]) as usize;
    if name_len > MAX_STRING {
        return Err(bad("export name longer than 4096 bytes"));
    }
    let rest = &data[4..];
    if rest.len() < name_len + 2 {
        return Err(bad("export name length past the end of the data"));
    }
    let name = parse_name(&rest[..name_len]).ok_or_else(|| bad("export name is not UTF-8"))?;
    let rest = &rest[name_len..];
    let count = be_u16(&rest[0..2]) as usize;
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return Err(bad(
            "information request count does not match the data length",
        ));
    }
    let items = rest.chunks_exact(2).map(be_u16).collect();
    Ok(InfoRequest { name, items })
}

/// Parses an export name (`NBD_OPT_EXPORT_NAME` data, or the name inside INFO/GO).
pub fn parse_name(raw: &[u8]) -> Option<String> {
    if raw.len() > MAX_STRING || raw.contains(&0) {
        return None;
    }
    String::from_utf8(raw.to_vec()).ok()
}

/// Data of an `NBD_REP_INFO` reply of type `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Data of an `NBD_REP_INFO` reply of type `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// Data of an `NBD_REP_INFO` reply of type `NBD_INFO_NAME`.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut b = INFO_NAME.to_be_bytes().to_vec();
    b.extend_from_slice(truncate(name).as_bytes());
    b
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: size, flags and (unless the client
/// negotiated `NO_ZEROES`) 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// One transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`NBD_CMD_*`).
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (of the payload, for a write).
    pub len: u32,
}

/// Parses a request header.
pub fn parse_request(raw: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = be_u32(&raw[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            found: u64::from(magic),
        });
    }
    Ok(Request {
        flags: be_u16(&raw[4..6]),
        command: be_u16(&raw[6..8]),
        cookie: be_u64(&raw[8..16]),
        offset: be_u64(&raw[16..24]),
        len: be_u32(&raw[24..28]),
    })
}

/// Encodes a request header (used by tests and clients).
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&req.flags.to_be_bytes());
    b[6..8].copy_from_slice(&req.command.to_be_bytes());
    b[8..16].copy_from_slice(&req.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&req.offset.to_be_bytes());
    b[24..28].copy_from_slice(&req.len.to_be_bytes());
    b
}

/// Encodes a simple reply header; a successful read's data follows it.
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// What the server does with a well-formed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// Read the `len`-byte payload, write it at `offset`.
    Write { offset: u64, len: u32, fua: bool },
    /// Flush.
    Flush,
    /// Discard a range.
    Trim { offset: u64, len: u32 },
    /// Write zeroes over a range.
    WriteZeroes { offset: u64, len: u32, fua: bool },
    /// The client disconnects: finish in-flight requests, then close.
    Disconnect,
    /// Answer with this error at once. For a write, `drain` payload bytes follow the header
    /// and must be read and discarded first.
    Reject { error: u32, drain: u32 },
}

/// Validates a request against the export's size and the maximum payload, without I/O.
///
/// Out-of-range or too-large requests get an error and the connection continues: reads
/// and trims answer `EINVAL`, writes past the end `ENOSPC` (as the protocol suggests);
/// payloads above `max_payload` answer `EINVAL`. A write's payload is always drained so
/// the stream stays in sync (the payload is at most `u32::MAX` bytes, so draining is
/// bounded; the caller may still choose to disconnect above its own drain limit).
pub fn classify(req: &Request, size: u64, max_payload: u32) -> Action {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let drain = if req.command == CMD_WRITE { req.len } else { 0 };
    let reject = |error| Action::Reject { error, drain };
    let allowed = match req.command {
        CMD_READ | CMD_DISC | CMD_FLUSH | CMD_TRIM => 0,
        CMD_WRITE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return reject(EINVAL),
    };
    if req.flags & !allowed != 0 {
        return reject(EINVAL);
    }
    let end = req.offset.checked_add(u64::from(req.len));
    let in_range = matches!(end, Some(end) if end <= size);
    match req.command {
        CMD_DISC => Action::Disconnect,
        CMD_FLUSH => Action::Flush,
        CMD_READ | CMD_WRITE if req.len > max_payload => reject(EINVAL),
        CMD_READ if !in_range => reject(EINVAL),
        CMD_READ => Action::Read {
            offset: req.offset,
            len: req.len,
        },
        CMD_WRITE if !in_range => reject(ENOSPC),
        CMD_WRITE => Action::Write {
            offset: req.offset,
            len: req.len,
            fua,
        },
        CMD_TRIM if !in_range => reject(EINVAL),
        CMD_TRIM => Action::Trim {
            offset: req.offset,
            len: req.len,
        },
        CMD_WRITE_ZEROES if !in_range => reject(ENOSPC),
        _ => Action::WriteZeroes {
            offset: req.offset,
            len: req.len,
            fua,
        },
    }
}

/// Maps an I/O error from the block device to an NBD error value.
pub fn errno_of(err: &io::Error) -> u32 {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOSPC) => ENOSPC,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        Some(_) => EIO,
        None => match err.kind() {
            io::ErrorKind::InvalidInput => EINVAL,
            io::ErrorKind::PermissionDenied => EPERM,
            io::ErrorKind::OutOfMemory => ENOMEM,
            io::ErrorKind::Unsupported => ENOTSUP,
            _ => EIO,
        },
    }
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 32 << 20;

    fn req(command: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_flags() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags_need_fixed_newstyle_and_no_unknown_bits() {
        assert_eq!(
            parse_client_flags([0, 0, 0, 3]),
            Ok(ClientFlags { no_zeroes: true })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 1]),
            Ok(ClientFlags { no_zeroes: false })
        );
        assert!(parse_client_flags([0, 0, 0, 0]).is_err());
        assert!(parse_client_flags([0, 0, 0, 2]).is_err());
        assert!(parse_client_flags([0, 0, 1, 1]).is_err());
    }

    #[test]
    fn option_header_round_trip_and_bad_magic() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(b"IHAVEOPT");
        raw[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        raw[12..16].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&raw),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 9
            })
        );
        raw[0] = b'X';
        assert!(matches!(
            parse_option_header(&raw),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_reply_layout() {
        let mut out = Vec::new();
        encode_option_reply(&mut out, OPT_LIST, REP_ACK, &[]);
        assert_eq!(out.len(), 20);
        assert_eq!(&out[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &OPT_LIST.to_be_bytes());
        assert_eq!(&out[12..16], &REP_ACK.to_be_bytes());
        assert_eq!(&out[16..20], &0u32.to_be_bytes());
        out.clear();
        encode_list_entry(&mut out, "md0");
        assert_eq!(&out[12..16], &REP_SERVER.to_be_bytes());
        assert_eq!(&out[16..20], &7u32.to_be_bytes());
        assert_eq!(&out[20..24], &3u32.to_be_bytes());
        assert_eq!(&out[24..], b"md0");
        out.clear();
        encode_option_error(&mut out, OPT_GO, REP_ERR_UNKNOWN, &"x".repeat(5000));
        assert_eq!(out.len(), 20 + MAX_STRING);
        assert_eq!(&out[12..16], &0x8000_0006u32.to_be_bytes());
    }

    #[test]
    fn info_request_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"md0");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Ok(InfoRequest {
                name: "md0".into(),
                items: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        // Count says 3 but only 2 items follow.
        let mut bad = d.clone();
        bad[7..9].copy_from_slice(&3u16.to_be_bytes());
        assert!(parse_info_request(&bad).is_err());
        // Name length past the end.
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&100u32.to_be_bytes());
        assert!(parse_info_request(&bad).is_err());
        assert!(parse_info_request(&[0, 0, 0]).is_err());
        // Empty name, no items: the default export.
        assert_eq!(
            parse_info_request(&[0, 0, 0, 0, 0, 0]),
            Ok(InfoRequest {
                name: String::new(),
                items: vec![]
            })
        );
    }

    #[test]
    fn names_reject_nul_and_non_utf8() {
        assert_eq!(parse_name(b"md0").as_deref(), Some("md0"));
        assert_eq!(parse_name(b"m\0d"), None);
        assert_eq!(parse_name(&[0xff, 0xfe]), None);
    }

    #[test]
    fn info_and_export_name_layouts() {
        let e = info_export(1 << 30, EXPORT_FLAGS);
        assert_eq!(&e[0..2], &[0, 0]);
        assert_eq!(&e[2..10], &(1u64 << 30).to_be_bytes());
        assert_eq!(&e[10..12], &EXPORT_FLAGS.to_be_bytes());
        assert_eq!(
            EXPORT_FLAGS,
            0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100
        );
        let b = info_block_size(1, 4096, MAX);
        assert_eq!(&b[0..2], &[0, 3]);
        assert_eq!(&b[2..6], &1u32.to_be_bytes());
        assert_eq!(&b[6..10], &4096u32.to_be_bytes());
        assert_eq!(&b[10..14], &MAX.to_be_bytes());
        assert_eq!(export_name_reply(5, 1, false).len(), 134);
        assert_eq!(export_name_reply(5, 1, true).len(), 10);
        assert_eq!(info_name("md0"), vec![0, 1, b'm', b'd', b'0']);
    }

    #[test]
    fn request_round_trip_and_reply() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        let mut raw = encode_request(&r);
        raw[0] ^= 1;
        assert!(parse_request(&raw).is_err());
        let rep = encode_simple_reply(0xdead_beef, EIO);
        assert_eq!(&rep[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&rep[4..8], &5u32.to_be_bytes());
        assert_eq!(&rep[8..16], &0xdead_beefu64.to_be_bytes());
    }

    #[test]
    fn classify_in_range_requests() {
        let size = 1 << 20;
        assert_eq!(
            classify(&req(CMD_READ, 0, 0, 4096), size, MAX),
            Action::Read {
                offset: 0,
                len: 4096
            }
        );
        assert_eq!(
            classify(&req(CMD_WRITE, CMD_FLAG_FUA, size - 512, 512), size, MAX),
            Action::Write {
                offset: size - 512,
                len: 512,
                fua: true
            }
        );
        assert_eq!(classify(&req(CMD_FLUSH, 0, 0, 0), size, MAX), Action::Flush);
        assert_eq!(
            classify(&req(CMD_DISC, 0, 0, 0), size, MAX),
            Action::Disconnect
        );
        assert_eq!(
            classify(&req(CMD_TRIM, 0, 0, size as u32), size, MAX),
            Action::Trim {
                offset: 0,
                len: size as u32
            }
        );
        assert_eq!(
            classify(
                &req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 512, 512),
                size,
                MAX
            ),
            Action::WriteZeroes {
                offset: 512,
                len: 512,
                fua: false
            }
        );
    }

    #[test]
    fn classify_errors_keep_the_stream_in_sync() {
        let size = 1 << 20;
        let rej = |error, drain| Action::Reject { error, drain };
        assert_eq!(
            classify(&req(CMD_READ, 0, size, 1), size, MAX),
            rej(EINVAL, 0)
        );
        assert_eq!(
            classify(&req(CMD_READ, 0, u64::MAX, 2), size, MAX),
            rej(EINVAL, 0)
        );
        assert_eq!(
            classify(&req(CMD_WRITE, 0, size - 1, 2), size, MAX),
            rej(ENOSPC, 2)
        );
        assert_eq!(
            classify(&req(CMD_WRITE, 0, 0, MAX + 1), u64::MAX, MAX),
            rej(EINVAL, MAX + 1)
        );
        assert_eq!(
            classify(&req(CMD_READ, 0, 0, MAX + 1), u64::MAX, MAX),
            rej(EINVAL, 0)
        );
        assert_eq!(
            classify(&req(CMD_READ, CMD_FLAG_FUA, 0, 1), size, MAX),
            rej(EINVAL, 0)
        );
        assert_eq!(
            classify(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), size, MAX),
            rej(EINVAL, 1)
        );
        assert_eq!(classify(&req(99, 0, 0, 1), size, MAX), rej(EINVAL, 0));
        assert_eq!(
            classify(&req(CMD_TRIM, 0, size, 1), size, MAX),
            rej(EINVAL, 0)
        );
        assert_eq!(
            classify(&req(CMD_WRITE_ZEROES, 0, size, 1), size, MAX),
            rej(ENOSPC, 0)
        );
    }

    #[test]
    fn io_errors_map_to_nbd_errors() {
        assert_eq!(
            errno_of(&io::Error::from_raw_os_error(libc::ENOSPC)),
            ENOSPC
        );
        assert_eq!(errno_of(&io::Error::from_raw_os_error(libc::EIO)), EIO);
        assert_eq!(errno_of(&io::Error::from_raw_os_error(libc::EBADF)), EIO);
        assert_eq!(
            errno_of(&io::Error::new(io::ErrorKind::InvalidInput, "x")),
            EINVAL
        );
        assert_eq!(errno_of(&io::Error::other("x")), EIO);
    }
}
