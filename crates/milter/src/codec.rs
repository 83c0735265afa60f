//! The milter wire format, without I/O: the packets the MTA sends (commands) and a decoder of
//! the packets a filter answers (responses).
//!
//! Every packet is a 32-bit big-endian length (counting the command byte and the data), one
//! command byte, then the data. Strings are NUL-terminated; integers are 32-bit big-endian
//! (the port in `SMFIC_CONNECT` is 16-bit). The codes are sendmail's `include/libmilter/mfdef.h`.

use thiserror::Error;

/// The protocol version we speak (sendmail 8.14 and later, Postfix 2.6 and later, libmilter 6).
pub const VERSION: u32 = 6;

/// The largest body chunk in one `SMFIC_BODY` packet (`MILTER_CHUNK_SIZE`).
pub const MAX_BODY_CHUNK: usize = 65535;

/// The largest response packet accepted from a filter (length field, command byte included).
/// Replacement body chunks are the only big ones; libmilter sends them in 64 KiB (at most 1 MiB
/// with `SMFIP_MDS_1M`) pieces, so 64 MiB is far beyond any honest filter.
pub const MAX_PACKET: usize = 64 * 1024 * 1024;

/// Command codes the MTA sends (`SMFIC_*`).
pub mod cmd {
    /// Option negotiation.
    pub const OPTNEG: u8 = b'O';
    /// Macro definitions for the following command.
    pub const MACRO: u8 = b'D';
    /// SMTP connection information.
    pub const CONNECT: u8 = b'C';
    /// HELO/EHLO name.
    pub const HELO: u8 = b'H';
    /// MAIL FROM.
    pub const MAIL: u8 = b'M';
    /// RCPT TO.
    pub const RCPT: u8 = b'R';
    /// DATA.
    pub const DATA: u8 = b'T';
    /// One header field.
    pub const HEADER: u8 = b'L';
    /// End of the header section.
    pub const EOH: u8 = b'N';
    /// A body chunk.
    pub const BODY: u8 = b'B';
    /// End of the body: the filter answers with its modifications and final verdict.
    pub const BODYEOB: u8 = b'E';
    /// Abort the current message (RSET); the connection stays.
    pub const ABORT: u8 = b'A';
    /// Close the filter connection.
    pub const QUIT: u8 = b'Q';
    /// End of this SMTP connection, the filter connection stays for another one.
    pub const QUIT_NC: u8 = b'K';
    /// An unknown SMTP command (not sent by this client).
    pub const UNKNOWN: u8 = b'U';
}

/// Response codes a filter sends (`SMFIR_*`).
pub mod rsp {
    /// Add a recipient.
    pub const ADDRCPT: u8 = b'+';
    /// Remove a recipient.
    pub const DELRCPT: u8 = b'-';
    /// Add a recipient with ESMTP arguments.
    pub const ADDRCPT_PAR: u8 = b'2';
    /// The filter is shutting down.
    pub const SHUTDOWN: u8 = b'4';
    /// Accept: no more questions for this message (or connection).
    pub const ACCEPT: u8 = b'a';
    /// Replace the body (one chunk of the new body).
    pub const REPLBODY: u8 = b'b';
    /// Continue.
    pub const CONTINUE: u8 = b'c';
    /// Accept and silently discard the message.
    pub const DISCARD: u8 = b'd';
    /// Change the envelope sender.
    pub const CHGFROM: u8 = b'e';
    /// Cause a connection failure.
    pub const CONNFAIL: u8 = b'f';
    /// Add a header field at the end.
    pub const ADDHEADER: u8 = b'h';
    /// Insert a header field at an index.
    pub const INSHEADER: u8 = b'i';
    /// Set the list of macros wanted at a stage.
    pub const SETSYMLIST: u8 = b'l';
    /// Change (or delete) a header field.
    pub const CHGHEADER: u8 = b'm';
    /// Still working: reset the timeout.
    pub const PROGRESS: u8 = b'p';
    /// Quarantine the message.
    pub const QUARANTINE: u8 = b'q';
    /// Reject.
    pub const REJECT: u8 = b'r';
    /// Skip the rest of the body.
    pub const SKIP: u8 = b's';
    /// Temporary failure.
    pub const TEMPFAIL: u8 = b't';
    /// Reject or tempfail with this SMTP reply text.
    pub const REPLYCODE: u8 = b'y';
    /// The option negotiation answer (same code as the command).
    pub const OPTNEG: u8 = b'O';
}

/// Actions a filter may ask for (`SMFIF_*`), negotiated in `SMFIC_OPTNEG`.
pub mod action {
    /// Add header fields.
    pub const ADDHDRS: u32 = 0x0001;
    /// Replace the body.
    pub const CHGBODY: u32 = 0x0002;
    /// Add recipients.
    pub const ADDRCPT: u32 = 0x0004;
    /// Remove recipients.
    pub const DELRCPT: u32 = 0x0008;
    /// Change or delete header fields.
    pub const CHGHDRS: u32 = 0x0010;
    /// Quarantine.
    pub const QUARANTINE: u32 = 0x0020;
    /// Change the envelope sender.
    pub const CHGFROM: u32 = 0x0040;
    /// Add recipients with ESMTP arguments.
    pub const ADDRCPT_PAR: u32 = 0x0080;
    /// Send the list of macros wanted per stage.
    pub const SETSYMLIST: u32 = 0x0100;
    /// Every action this client carries out.
    pub const ALL: u32 = ADDHDRS
        | CHGBODY
        | ADDRCPT
        | DELRCPT
        | CHGHDRS
        | QUARANTINE
        | CHGFROM
        | ADDRCPT_PAR
        | SETSYMLIST;
}

/// Protocol step flags (`SMFIP_*`), negotiated in `SMFIC_OPTNEG`.
pub mod proto {
    /// Do not send the connect step.
    pub const NOCONNECT: u32 = 0x0000_0001;
    /// Do not send HELO.
    pub const NOHELO: u32 = 0x0000_0002;
    /// Do not send MAIL.
    pub const NOMAIL: u32 = 0x0000_0004;
    /// Do not send RCPT.
    pub const NORCPT: u32 = 0x0000_0008;
    /// Do not send the body.
    pub const NOBODY: u32 = 0x0000_0010;
    /// Do not send the header fields.
    pub const NOHDRS: u32 = 0x0000_0020;
    /// Do not send end of headers.
    pub const NOEOH: u32 = 0x0000_0040;
    /// No reply for each header field (also called `SMFIP_NOHREPL`).
    pub const NR_HDR: u32 = 0x0000_0080;
    /// Do not send unknown commands.
    pub const NOUNKNOWN: u32 = 0x0000_0100;
    /// Do not send DATA.
    pub const NODATA: u32 = 0x0000_0200;
    /// The MTA understands `SMFIR_SKIP`.
    pub const SKIP: u32 = 0x0000_0400;
    /// The filter wants rejected recipients too (not offered here).
    pub const RCPT_REJ: u32 = 0x0000_0800;
    /// No reply for connect.
    pub const NR_CONN: u32 = 0x0000_1000;
    /// No reply for HELO.
    pub const NR_HELO: u32 = 0x0000_2000;
    /// No reply for MAIL.
    pub const NR_MAIL: u32 = 0x0000_4000;
    /// No reply for RCPT.
    pub const NR_RCPT: u32 = 0x0000_8000;
    /// No reply for DATA.
    pub const NR_DATA: u32 = 0x0001_0000;
    /// No reply for unknown commands.
    pub const NR_UNKN: u32 = 0x0002_0000;
    /// No reply for end of headers.
    pub const NR_EOH: u32 = 0x0004_0000;
    /// No reply for body chunks.
    pub const NR_BODY: u32 = 0x0008_0000;
    /// Header values keep their leading space (not offered here).
    pub const HDR_LEADSPC: u32 = 0x0010_0000;
    /// The steps and no-reply flags this client honours, offered in negotiation.
    pub const OFFERED: u32 = NOCONNECT
        | NOHELO
        | NOMAIL
        | NORCPT
        | NOBODY
        | NOHDRS
        | NOEOH
        | NR_HDR
        | NOUNKNOWN
        | NODATA
        | SKIP
        | NR_CONN
        | NR_HELO
        | NR_MAIL
        | NR_RCPT
        | NR_DATA
        | NR_UNKN
        | NR_EOH
        | NR_BODY;
}

/// The macro stages of `SMFIR_SETSYMLIST` (`SMFIM_*`), in protocol order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Connect.
    Connect = 0,
    /// HELO/EHLO.
    Helo = 1,
    /// MAIL FROM.
    Mail = 2,
    /// RCPT TO.
    Rcpt = 3,
    /// DATA.
    Data = 4,
    /// End of message.
    Eom = 5,
    /// End of headers.
    Eoh = 6,
}

impl Stage {
    /// The stage numbered `n` in `SMFIR_SETSYMLIST`.
    pub fn from_u32(n: u32) -> Option<Stage> {
        Some(match n {
            0 => Stage::Connect,
            1 => Stage::Helo,
            2 => Stage::Mail,
            3 => Stage::Rcpt,
            4 => Stage::Data,
            5 => Stage::Eom,
            6 => Stage::Eoh,
            _ => return None,
        })
    }

    /// The command whose macros this stage lists.
    pub fn command(self) -> u8 {
        match self {
            Stage::Connect => cmd::CONNECT,
            Stage::Helo => cmd::HELO,
            Stage::Mail => cmd::MAIL,
            Stage::Rcpt => cmd::RCPT,
            Stage::Data => cmd::DATA,
            Stage::Eom => cmd::BODYEOB,
            Stage::Eoh => cmd::EOH,
        }
    }
}

/// The client address in `SMFIC_CONNECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFamily<'a> {
    /// Family '4': an IPv4 address in dotted form and the client's port.
    Inet4 {
        /// Dotted quad.
        address: &'a str,
        /// The client's port.
        port: u16,
    },
    /// Family '6': an IPv6 address in text form and the client's port.
    Inet6 {
        /// RFC 5952 text.
        address: &'a str,
        /// The client's port.
        port: u16,
    },
    /// Family 'L': a local socket path.
    Unix(&'a str),
    /// Family 'U': unknown (no address follows).
    Unknown,
}

/// A command packet the MTA sends to a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `SMFIC_OPTNEG`: the version, actions and protocol steps we offer.
    OptNeg {
        /// Protocol version.
        version: u32,
        /// `SMFIF_*` actions offered.
        actions: u32,
        /// `SMFIP_*` steps offered.
        protocol: u32,
    },
    /// `SMFIC_MACRO`: macros for the command `for_command` that follows.
    Macro {
        /// The command code these macros go with (`cmd::CONNECT`…).
        for_command: u8,
        /// Name and value pairs: `j`, `{daemon_name}`…
        macros: &'a [(String, String)],
    },
    /// `SMFIC_CONNECT`: the client's host name and address.
    Connect {
        /// The client's host name (its address in brackets when it has none).
        hostname: &'a str,
        /// The client's address.
        family: ConnectFamily<'a>,
    },
    /// `SMFIC_HELO`: the HELO/EHLO argument.
    Helo(&'a str),
    /// `SMFIC_MAIL`: the sender, written `<address>`, then the ESMTP parameters.
    Mail {
        /// The sender address without angle brackets (empty for the null sender).
        sender: &'a str,
        /// ESMTP parameters (`SIZE=123`, `BODY=8BITMIME`…).
        args: &'a [String],
    },
    /// `SMFIC_RCPT`: the recipient, written `<address>`, then the ESMTP parameters.
    Rcpt {
        /// The recipient address without angle brackets.
        rcpt: &'a str,
        /// ESMTP parameters (`NOTIFY=…`, `ORCPT=…`).
        args: &'a [String],
    },
    /// `SMFIC_DATA`.
    Data,
    /// `SMFIC_HEADER`: one header field.
    Header {
        /// The field name.
        name: &'a [u8],
        /// The field value (folding kept).
        value: &'a [u8],
    },
    /// `SMFIC_EOH`.
    Eoh,
    /// `SMFIC_BODY`: one chunk of at most [`MAX_BODY_CHUNK`] bytes (see [`encode_body`]).
    Body(&'a [u8]),
    /// `SMFIC_BODYEOB`.
    BodyEob,
    /// `SMFIC_ABORT`.
    Abort,
    /// `SMFIC_QUIT`.
    Quit,
    /// `SMFIC_QUIT_NC`.
    QuitNc,
}

/// Writes `s` as a NUL-terminated string; a NUL inside would cut the string short for the
/// filter and shift every following field, so NULs are dropped.
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(s.iter().copied().filter(|&b| b != 0));
    out.push(0);
}

fn put_u32(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&n.to_be_bytes());
}

/// Writes the packet header for a packet started at `start` once its data is in place.
fn finish_packet(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

impl Command<'_> {
    /// The command code.
    pub fn code(&self) -> u8 {
        match self {
            Command::OptNeg { .. } => cmd::OPTNEG,
            Command::Macro { .. } => cmd::MACRO,
            Command::Connect { .. } => cmd::CONNECT,
            Command::Helo(_) => cmd::HELO,
            Command::Mail { .. } => cmd::MAIL,
            Command::Rcpt { .. } => cmd::RCPT,
            Command::Data => cmd::DATA,
            Command::Header { .. } => cmd::HEADER,
            Command::Eoh => cmd::EOH,
            Command::Body(_) => cmd::BODY,
            Command::BodyEob => cmd::BODYEOB,
            Command::Abort => cmd::ABORT,
            Command::Quit => cmd::QUIT,
            Command::QuitNc => cmd::QUIT_NC,
        }
    }

    /// Appends the packet to `out`. A body chunk over [`MAX_BODY_CHUNK`] is split into several
    /// packets, as [`encode_body`] does.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Command::Body(chunk) = self
            && chunk.len() > MAX_BODY_CHUNK
        {
            encode_body(out, chunk);
            return;
        }
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, self.code()]);
        match *self {
            Command::OptNeg {
                version,
                actions,
                protocol,
            } => {
                put_u32(out, version);
                put_u32(out, actions);
                put_u32(out, protocol);
            }
            Command::Macro {
                for_command,
                macros,
            } => {
                out.push(for_command);
                for (name, value) in macros {
                    put_str(out, name.as_bytes());
                    put_str(out, value.as_bytes());
                }
            }
            Command::Connect { hostname, family } => {
                put_str(out, hostname.as_bytes());
                match family {
                    ConnectFamily::Inet4 { address, port } => {
                        out.push(b'4');
                        out.extend_from_slice(&port.to_be_bytes());
                        put_str(out, address.as_bytes());
                    }
                    ConnectFamily::Inet6 { address, port } => {
                        out.push(b'6');
                        out.extend_from_slice(&port.to_be_bytes());
                        put_str(out, address.as_bytes());
                    }
                    ConnectFamily::Unix(path) => {
                        out.push(b'L');
                        out.extend_from_slice(&0u16.to_be_bytes());
                        put_str(out, path.as_bytes());
                    }
                    ConnectFamily::Unknown => out.push(b'U'),
                }
            }
            Command::Helo(name) => put_str(out, name.as_bytes()),
            Command::Mail { sender: addr, args } | Command::Rcpt { rcpt: addr, args } => {
                put_str(out, format!("<{addr}>").as_bytes());
                for arg in args {
                    put_str(out, arg.as_bytes());
                }
            }
            Command::Header { name, value } => {
                put_str(out, name);
                put_str(out, value);
            }
            Command::Body(chunk) => out.extend_from_slice(chunk),
            Command::Data
            | Command::Eoh
            | Command::BodyEob
            | Command::Abort
            | Command::Quit
            | Command::QuitNc => {}
        }
        finish_packet(out, start);
    }

    /// The packet as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// Appends `body` as `SMFIC_BODY` packets of at most [`MAX_BODY_CHUNK`] bytes each (none for an
/// empty body).
pub fn encode_body(out: &mut Vec<u8>, body: &[u8]) {
    for chunk in body.chunks(MAX_BODY_CHUNK) {
        Command::Body(chunk).encode(out);
    }
}

/// A packet a filter sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `O`: the filter's answer to the negotiation, with the macro lists it wants per stage.
    OptNeg {
        /// The filter's protocol version.
        version: u32,
        /// `SMFIF_*` actions the filter may ask for.
        actions: u32,
        /// `SMFIP_*` steps the filter does not want or does not answer.
        protocol: u32,
        /// `(stage, "{macro} j …")` lists (libmilter's `smfi_setsymlist`).
        symlists: Vec<(u32, String)>,
    },
    /// `c`.
    Continue,
    /// `a`.
    Accept,
    /// `r`.
    Reject,
    /// `t`.
    TempFail,
    /// `d`.
    Discard,
    /// `y`: `"550 5.7.1 text"`, lines separated by CRLF for a multi-line reply.
    ReplyCode(String),
    /// `q`: quarantine, with the reason.
    Quarantine(String),
    /// `p`: still working.
    Progress,
    /// `s`: skip the rest of the body.
    Skip,
    /// `f`: cause a connection failure.
    ConnFail,
    /// `4`: the filter is shutting down.
    Shutdown,
    /// `l`: the macros wanted at a stage.
    SetSymList {
        /// The `SMFIM_*` stage.
        stage: u32,
        /// Space-separated macro names.
        macros: String,
    },
    /// `h`: add a header field at the end.
    AddHeader {
        /// Field name.
        name: String,
        /// Field value.
        value: String,
    },
    /// `i`: insert a header field at `index` (0: at the top).
    InsertHeader {
        /// Position among the header fields.
        index: u32,
        /// Field name.
        name: String,
        /// Field value.
        value: String,
    },
    /// `m`: change the `index`-th (from 1) field called `name`; an empty value deletes it.
    ChangeHeader {
        /// Occurrence of the name, from 1 (0 is taken as 1, as sendmail does).
        index: u32,
        /// Field name.
        name: String,
        /// New value; empty to delete.
        value: String,
    },
    /// `b`: one chunk of the replacement body.
    ReplaceBody(Vec<u8>),
    /// `+`: add a recipient.
    AddRcpt(String),
    /// `2`: add a recipient with ESMTP arguments.
    AddRcptPar {
        /// The recipient.
        rcpt: String,
        /// ESMTP arguments, when sent.
        args: Option<String>,
    },
    /// `-`: remove a recipient.
    DelRcpt(String),
    /// `e`: change the envelope sender.
    ChangeFrom {
        /// The new sender.
        from: String,
        /// ESMTP arguments, when sent.
        args: Option<String>,
    },
}

impl Response {
    /// The response code.
    pub fn code(&self) -> u8 {
        match self {
            Response::OptNeg { .. } => rsp::OPTNEG,
            Response::Continue => rsp::CONTINUE,
            Response::Accept => rsp::ACCEPT,
            Response::Reject => rsp::REJECT,
            Response::TempFail => rsp::TEMPFAIL,
            Response::Discard => rsp::DISCARD,
            Response::ReplyCode(_) => rsp::REPLYCODE,
            Response::Quarantine(_) => rsp::QUARANTINE,
            Response::Progress => rsp::PROGRESS,
            Response::Skip => rsp::SKIP,
            Response::ConnFail => rsp::CONNFAIL,
            Response::Shutdown => rsp::SHUTDOWN,
            Response::SetSymList { .. } => rsp::SETSYMLIST,
            Response::AddHeader { .. } => rsp::ADDHEADER,
            Response::InsertHeader { .. } => rsp::INSHEADER,
            Response::ChangeHeader { .. } => rsp::CHGHEADER,
            Response::ReplaceBody(_) => rsp::REPLBODY,
            Response::AddRcpt(_) => rsp::ADDRCPT,
            Response::AddRcptPar { .. } => rsp::ADDRCPT_PAR,
            Response::DelRcpt(_) => rsp::DELRCPT,
            Response::ChangeFrom { .. } => rsp::CHGFROM,
        }
    }

    /// Appends the packet as a filter writes it (libmilter's canonical form: every string
    /// NUL-terminated). Used by tests, the fuzz target and scripted filters.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, self.code()]);
        match self {
            Response::OptNeg {
                version,
                actions,
                protocol,
                symlists,
            } => {
                put_u32(out, *version);
                put_u32(out, *actions);
                put_u32(out, *protocol);
                for (stage, list) in symlists {
                    put_u32(out, *stage);
                    put_str(out, list.as_bytes());
                }
            }
            Response::ReplyCode(s)
            | Response::Quarantine(s)
            | Response::AddRcpt(s)
            | Response::DelRcpt(s) => put_str(out, s.as_bytes()),
            Response::SetSymList { stage, macros } => {
                put_u32(out, *stage);
                put_str(out, macros.as_bytes());
            }
            Response::AddHeader { name, value } => {
                put_str(out, name.as_bytes());
                put_str(out, value.as_bytes());
            }
            Response::InsertHeader { index, name, value }
            | Response::ChangeHeader { index, name, value } => {
                put_u32(out, *index);
                put_str(out, name.as_bytes());
                put_str(out, value.as_bytes());
            }
            Response::ReplaceBody(b) => out.extend_from_slice(b),
            Response::AddRcptPar { rcpt: a, args } | Response::ChangeFrom { from: a, args } => {
                put_str(out, a.as_bytes());
                if let Some(args) = args {
                    put_str(out, args.as_bytes());
                }
            }
            Response::Continue
            | Response::Accept
            | Response::Reject
            | Response::TempFail
            | Response::Discard
            | Response::Progress
            | Response::Skip
            | Response::ConnFail
            | Response::Shutdown => {}
        }
        finish_packet(out, start);
    }

    /// The packet as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Not a whole packet yet: read more.
    Incomplete,
    /// One response, and the number of bytes it took.
    Packet(Response, usize),
}

/// A malformed packet from a filter. The connection cannot be trusted after one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The length field is zero: no command byte.
    #[error("empty packet (length 0)")]
    Empty,
    /// The length field is over [`MAX_PACKET`].
    #[error("packet of {0} bytes is over the limit of {MAX_PACKET} bytes")]
    TooLong(usize),
    /// A command byte this client does not know.
    #[error("unknown response code 0x{0:02x}")]
    UnknownCode(u8),
    /// The data does not have the shape the code requires.
    #[error("malformed '{code}' packet: {why}")]
    Malformed {
        /// The response code, as a character.
        code: char,
        /// What is wrong.
        why: &'static str,
    },
}

/// Reads the fields of a packet's data.
struct Fields<'a> {
    data: &'a [u8],
    code: u8,
}

impl<'a> Fields<'a> {
    fn bad(&self, why: &'static str) -> DecodeError {
        DecodeError::Malformed {
            code: char::from(self.code),
            why,
        }
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let Some((n, rest)) = self.data.split_first_chunk::<4>() else {
            return Err(self.bad("truncated 32-bit integer"));
        };
        self.data = rest;
        Ok(u32::from_be_bytes(*n))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let Some(nul) = self.data.iter().position(|&b| b == 0) else {
            return Err(self.bad("string without its terminating NUL"));
        };
        let s = String::from_utf8_lossy(&self.data[..nul]).into_owned();
        self.data = &self.data[nul + 1..];
        Ok(s)
    }

    /// The rest as one text: libmilter ends it with a NUL, which is dropped; some filters
    /// leave it out. A NUL inside is an error.
    fn text(&mut self) -> Result<String, DecodeError> {
        let mut d = self.data;
        if let Some((&0, head)) = d.split_last() {
            d = head;
        }
        if d.contains(&0) {
            return Err(self.bad("NUL inside the text"));
        }
        self.data = &[];
        Ok(String::from_utf8_lossy(d).into_owned())
    }

    fn optional_string(&mut self) -> Result<Option<String>, DecodeError> {
        if self.data.is_empty() {
            Ok(None)
        } else {
            self.string().map(Some)
        }
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(self.bad("unexpected data after the last field"))
        }
    }
}

/// Decodes the response at the start of `buf`.
///
/// Returns [`Decoded::Incomplete`] until the whole packet is there; a length over
/// [`MAX_PACKET`] is refused as soon as the four length bytes are in, before the data arrives.
pub fn decode(buf: &[u8]) -> Result<Decoded, DecodeError> {
    let Some((len, rest)) = buf.split_first_chunk::<4>() else {
        return Ok(Decoded::Incomplete);
    };
    let len = u32::from_be_bytes(*len) as usize;
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    if len > MAX_PACKET {
        return Err(DecodeError::TooLong(len));
    }
    if rest.len() < len {
        return Ok(Decoded::Incomplete);
    }
    let code = rest[0];
    let mut f = Fields {
        data: &rest[1..len],
        code,
    };
    let no_data = |f: &Fields<'_>, r: Response| f.end().map(|()| r);
    let response = match code {
        rsp::OPTNEG => {
            let version = f.u32()?;
            let actions = f.u32()?;
            let protocol = f.u32()?;
            let mut symlists = Vec::new();
            while !f.data.is_empty() {
                let stage = f.u32()?;
                symlists.push((stage, f.string()?));
            }
            Response::OptNeg {
                version,
                actions,
                protocol,
                symlists,
            }
        }
        rsp::CONTINUE => no_data(&f, Response::Continue)?,
        rsp::ACCEPT => no_data(&f, Response::Accept)?,
        rsp::REJECT => no_data(&f, Response::Reject)?,
        rsp::TEMPFAIL => no_data(&f, Response::TempFail)?,
        rsp::DISCARD => no_data(&f, Response::Discard)?,
        rsp::PROGRESS => no_data(&f, Response::Progress)?,
        rsp::SKIP => no_data(&f, Response::Skip)?,
        rsp::CONNFAIL => no_data(&f, Response::ConnFail)?,
        rsp::SHUTDOWN => no_data(&f, Response::Shutdown)?,
        rsp::REPLYCODE => Response::ReplyCode(f.text()?),
        rsp::QUARANTINE => Response::Quarantine(f.text()?),
        rsp::SETSYMLIST => {
            let stage = f.u32()?;
            let macros = f.string()?;
            f.end()?;
            Response::SetSymList { stage, macros }
        }
        rsp::ADDHEADER => {
            let name = f.string()?;
            let value = f.string()?;
            f.end()?;
            Response::AddHeader { name, value }
        }
        rsp::INSHEADER | rsp::CHGHEADER => {
            let index = f.u32()?;
            let name = f.string()?;
            let value = f.string()?;
            f.end()?;
            if name.is_empty() {
                return Err(f.bad("empty header name"));
            }
            if code == rsp::INSHEADER {
                Response::InsertHeader { index, name, value }
            } else {
                Response::ChangeHeader { index, name, value }
            }
        }
        rsp::REPLBODY => Response::ReplaceBody(f.data.to_vec()),
        rsp::ADDRCPT | rsp::DELRCPT => {
            let rcpt = f.string()?;
            f.end()?;
            if code == rsp::ADDRCPT {
                Response::AddRcpt(rcpt)
            } else {
                Response::DelRcpt(rcpt)
            }
        }
        rsp::ADDRCPT_PAR | rsp::CHGFROM => {
            let a = f.string()?;
            let args = f.optional_string()?;
            f.end()?;
            if code == rsp::ADDRCPT_PAR {
                Response::AddRcptPar { rcpt: a, args }
            } else {
                Response::ChangeFrom { from: a, args }
            }
        }
        other => return Err(DecodeError::UnknownCode(other)),
    };
    Ok(Decoded::Packet(response, 4 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_responses() -> Vec<Response> {
        vec![
            Response::OptNeg {
                version: 6,
                actions: 0x1ff,
                protocol: 0x000f_f080,
                symlists: vec![],
            },
            Response::OptNeg {
                version: 6,
                actions: 1,
                protocol: 0,
                symlists: vec![(0, "{client_addr} j".into()), (5, "i".into())],
            },
            Response::Continue,
            Response::Accept,
            Response::Reject,
            Response::TempFail,
            Response::Discard,
            Response::ReplyCode("554 5.7.1 Gtube pattern".into()),
            Response::ReplyCode("550-5.7.1 one\r\n550 5.7.1 two".into()),
            Response::Quarantine("looks bad".into()),
            Response::Progress,
            Response::Skip,
            Response::ConnFail,
            Response::Shutdown,
            Response::SetSymList {
                stage: 3,
                macros: "{rcpt_addr}".into(),
            },
            Response::AddHeader {
                name: "X-Spam".into(),
                value: "Yes".into(),
            },
            Response::InsertHeader {
                index: 0,
                name: "X-First".into(),
                value: "1".into(),
            },
            Response::ChangeHeader {
                index: 2,
                name: "Subject".into(),
                value: String::new(),
            },
            Response::ReplaceBody(b"new body\r\n".to_vec()),
            Response::ReplaceBody(vec![]),
            Response::AddRcpt("<a@example.org>".into()),
            Response::AddRcptPar {
                rcpt: "<b@example.org>".into(),
                args: Some("NOTIFY=NEVER".into()),
            },
            Response::AddRcptPar {
                rcpt: "<b@example.org>".into(),
                args: None,
            },
            Response::DelRcpt("<c@example.org>".into()),
            Response::ChangeFrom {
                from: "<d@example.org>".into(),
                args: None,
            },
            Response::ChangeFrom {
                from: "<>".into(),
                args: Some("SIZE=10".into()),
            },
        ]
    }

    #[test]
    fn every_response_round_trips_and_every_cut_is_incomplete() {
        for r in all_responses() {
            let wire = r.to_bytes();
            assert_eq!(decode(&wire), Ok(Decoded::Packet(r.clone(), wire.len())));
            for cut in 0..wire.len() {
                assert_eq!(
                    decode(&wire[..cut]),
                    Ok(Decoded::Incomplete),
                    "{r:?} cut {cut}"
                );
            }
            // Followed by another packet: only the first is taken.
            let mut two = wire.clone();
            Response::Continue.encode(&mut two);
            assert_eq!(decode(&two), Ok(Decoded::Packet(r, wire.len())));
        }
    }

    #[test]
    fn oversize_is_refused_before_the_data() {
        let mut wire = ((MAX_PACKET + 1) as u32).to_be_bytes().to_vec();
        assert_eq!(decode(&wire), Err(DecodeError::TooLong(MAX_PACKET + 1)));
        wire.push(b'b');
        assert!(decode(&wire).is_err());
        let ok = (MAX_PACKET as u32).to_be_bytes();
        assert_eq!(decode(&ok), Ok(Decoded::Incomplete));
        assert_eq!(decode(&[0, 0, 0, 0]), Err(DecodeError::Empty));
    }

    #[test]
    fn malformed_packets_are_errors() {
        let cases: &[&[u8]] = &[
            b"\0\0\0\x02cX",                 // data after continue
            b"\0\0\0\x03hab",                // header name without NUL
            b"\0\0\0\x04hab\0",              // value missing
            b"\0\0\0\x03i\0\0",              // truncated index
            b"\0\0\0\x09m\0\0\0\x01\0v\0\0", // junk after value... and empty name
            b"\0\0\0\x02Z!",                 // unknown code
            b"\0\0\0\x05y55\x000",           // NUL inside the reply text
            b"\0\0\0\x06O\0\0\0\x06\0",      // truncated negotiation
        ];
        for case in cases {
            assert!(decode(case).is_err(), "{case:?} accepted");
        }
        // A reply text without its NUL is accepted (some filters leave it out).
        assert_eq!(
            decode(b"\0\0\0\x04y550"),
            Ok(Decoded::Packet(Response::ReplyCode("550".into()), 8))
        );
    }

    #[test]
    fn commands_encode_as_libmilter_reads_them() {
        let size = ["SIZE=5".to_string()];
        let macros = vec![
            ("j".to_string(), "mx.example.org".to_string()),
            ("{daemon_name}".to_string(), "estafeta".to_string()),
        ];
        let cases: Vec<(Command<'_>, &[u8])> = vec![
            (
                Command::OptNeg {
                    version: 6,
                    actions: 0x1ff,
                    protocol: 0x1f_ffff,
                },
                b"\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\x1f\xff\xff",
            ),
            (
                Command::Macro {
                    for_command: b'C',
                    macros: &macros,
                },
                b"\0\0\0\x2aDCj\0mx.example.org\0{daemon_name}\0estafeta\0",
            ),
            (
                Command::Connect {
                    hostname: "mail.example.net",
                    family: ConnectFamily::Inet4 {
                        address: "192.0.2.10",
                        port: 4242,
                    },
                },
                b"\0\0\0\x20Cmail.example.net\x004\x10\x92192.0.2.10\0",
            ),
            (
                Command::Connect {
                    hostname: "[2001:db8::1]",
                    family: ConnectFamily::Inet6 {
                        address: "2001:db8::1",
                        port: 25,
                    },
                },
                b"\0\0\0\x1eC[2001:db8::1]\x006\0\x192001:db8::1\0",
            ),
            (
                Command::Connect {
                    hostname: "localhost",
                    family: ConnectFamily::Unknown,
                },
                b"\0\0\0\x0cClocalhost\0U",
            ),
            (
                Command::Helo("client.example"),
                b"\0\0\0\x10Hclient.example\0",
            ),
            (
                Command::Mail {
                    sender: "a@b",
                    args: &size,
                },
                b"\0\0\0\x0eM<a@b>\0SIZE=5\0",
            ),
            (
                Command::Mail {
                    sender: "",
                    args: &[],
                },
                b"\0\0\0\x04M<>\0",
            ),
            (
                Command::Rcpt {
                    rcpt: "c@d",
                    args: &[],
                },
                b"\0\0\0\x07R<c@d>\0",
            ),
            (Command::Data, b"\0\0\0\x01T"),
            (
                Command::Header {
                    name: b"Subject",
                    value: b"hi\r\n there",
                },
                b"\0\0\0\x14LSubject\0hi\r\n there\0",
            ),
            (Command::Eoh, b"\0\0\0\x01N"),
            (Command::Body(b"abc"), b"\0\0\0\x04Babc"),
            (Command::BodyEob, b"\0\0\0\x01E"),
            (Command::Abort, b"\0\0\0\x01A"),
            (Command::Quit, b"\0\0\0\x01Q"),
            (Command::QuitNc, b"\0\0\0\x01K"),
            (Command::Helo("a\0b"), b"\0\0\0\x04Hab\0"),
        ];
        for (command, wire) in cases {
            assert_eq!(command.to_bytes(), wire, "{command:?}");
        }
    }

    #[test]
    fn body_is_cut_in_chunks_of_65535() {
        let body = vec![b'x'; MAX_BODY_CHUNK * 2 + 10];
        let mut out = Vec::new();
        encode_body(&mut out, &body);
        assert_eq!(out.len(), body.len() + 3 * 5);
        assert_eq!(&out[..5], &[0, 1, 0, 0, b'B']); // 65535 + 1
        assert_eq!(&out[65540..65545], &[0, 1, 0, 0, b'B']);
        assert_eq!(&out[131080..131085], &[0, 0, 0, 11, b'B']);
        assert_eq!(Command::Body(&body).to_bytes(), out);
        let mut none = Vec::new();
        encode_body(&mut none, b"");
        assert!(none.is_empty());
    }
}
