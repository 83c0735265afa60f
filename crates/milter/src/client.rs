//! The connection to one filter: where it listens ([`Address`]), the negotiation, and one
//! call per SMTP step answering the filter's [`Verdict`].
//!
//! One [`Milter`] serves one SMTP connection at a time: `connect`, `helo`, then per
//! transaction `mail`, `rcpt`…, `message`, and `abort` at RSET; `quit` at the end. The wire
//! format is [`crate::codec`]'s; this module only moves its bytes and keeps the protocol state.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use estafeta_proto::Reply;
use estafeta_proto::reply::parse_received_line;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{Instant, timeout, timeout_at};

use crate::codec::{self, Command, ConnectFamily, Decoded, Response, Stage, action, proto};
use crate::{Modification, Verdict};

/// Where a filter listens, as written in Postfix's `smtpd_milters` and sendmail's `X` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP socket: `inet:host:port`, `inet:[::1]:port` or sendmail's `inet:port@host`.
    Inet {
        /// Host name or IP address (IPv6 without the brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A local socket: `unix:/path` (or `local:/path`).
    Unix(PathBuf),
}

/// Why a milter address could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("milter address \"{address}\": {why}")]
pub struct AddressError {
    /// The address as written.
    pub address: String,
    /// What is wrong with it.
    pub why: String,
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Address, AddressError> {
        let err = |why: &str| AddressError {
            address: s.to_string(),
            why: why.to_string(),
        };
        let Some((kind, rest)) = s.split_once(':') else {
            return Err(err(
                "expected inet:host:port or unix:/path/to/socket (no \"inet:\" or \"unix:\" prefix)",
            ));
        };
        match kind {
            "unix" | "local" => {
                if rest.is_empty() {
                    return Err(err("the socket path after \"unix:\" is empty"));
                }
                Ok(Address::Unix(PathBuf::from(rest)))
            }
            "inet" | "inet6" => {
                let (host, port) = if let Some((port, host)) = rest.split_once('@') {
                    (host, port) // sendmail's inet:port@host
                } else if let Some(bracketed) = rest.strip_prefix('[') {
                    let Some((host, port)) = bracketed.split_once("]:") else {
                        return Err(err("expected inet:[IPv6 address]:port"));
                    };
                    (host, port)
                } else {
                    let Some((host, port)) = rest.rsplit_once(':') else {
                        return Err(err("the port is missing: expected inet:host:port"));
                    };
                    if host.contains(':') {
                        return Err(err(
                            "an IPv6 address goes in brackets: inet:[2001:db8::1]:11332",
                        ));
                    }
                    (host, port)
                };
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() {
                    return Err(err("the host is empty: expected inet:host:port"));
                }
                let port: u16 = port
                    .parse()
                    .map_err(|_| err(&format!("\"{port}\" is not a port number (1-65535)")))?;
                if port == 0 {
                    return Err(err("port 0 is not a port a filter can listen on"));
                }
                Ok(Address::Inet {
                    host: host.to_string(),
                    port,
                })
            }
            other => Err(err(&format!(
                "unknown transport \"{other}\": expected inet:host:port or unix:/path/to/socket"
            ))),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Inet { host, port } if host.contains(':') => write!(f, "inet:[{host}]:{port}"),
            Address::Inet { host, port } => write!(f, "inet:{host}:{port}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How long to wait for a filter (Postfix's `milter_connect_timeout`,
/// `milter_command_timeout`, `milter_content_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// To open the connection.
    pub connect: Duration,
    /// For each write and for the answer to each step but the end of the message.
    pub command: Duration,
    /// For the answers at the end of the message (modifications and the final verdict).
    pub eom: Duration,
}

impl Default for Timeouts {
    /// Postfix's defaults: 30 s, 30 s and 300 s.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            command: Duration::from_secs(30),
            eom: Duration::from_secs(300),
        }
    }
}

/// A `SMFIR_PROGRESS` restarts the wait for an answer, but one answer is never awaited longer
/// than this many times its timeout.
const PROGRESS_CEILING: u32 = 10;

/// The most modifications taken from one message.
const MAX_MODIFICATIONS: usize = 100_000;

/// Why talking to a filter failed: the caller applies its `default_action`.
#[derive(Debug, Error)]
pub enum Error {
    /// The connection could not be opened (refused, no such socket, no route…).
    #[error("milter {address}: cannot connect: {source}")]
    Connect {
        /// The filter's address.
        address: String,
        /// The system's reason.
        source: io::Error,
    },
    /// The filter did not answer in time.
    #[error("milter {address}: no answer to {step} within {}s", after.as_secs_f64())]
    Timeout {
        /// The filter's address.
        address: String,
        /// The step waited for: "connect", "negotiation", "MAIL"…
        step: &'static str,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The filter sent something malformed or out of place.
    #[error("milter {address}: protocol error after {step}: {detail}")]
    Protocol {
        /// The filter's address.
        address: String,
        /// The step answered.
        step: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The filter closed the connection, or reading or writing failed.
    #[error("milter {address}: connection lost during {step}{}", source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Closed {
        /// The filter's address.
        address: String,
        /// The step under way.
        step: &'static str,
        /// The system's reason, when there is one (none: the filter closed).
        source: Option<io::Error>,
    },
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes).await,
            Stream::Unix(s) => s.write_all(bytes).await,
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf).await,
            Stream::Unix(s) => s.read(buf).await,
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown().await,
            Stream::Unix(s) => s.shutdown().await,
        };
    }
}

/// An open, negotiated connection to one filter.
pub struct Milter {
    address: String,
    stream: Stream,
    rbuf: Vec<u8>,
    timeouts: Timeouts,
    version: u32,
    actions: u32,
    protocol: u32,
    /// Macro names wanted per stage (`SMFIR_SETSYMLIST`), braces removed.
    symlists: [Option<Vec<String>>; 7],
    /// A final verdict for the whole SMTP connection (after connect or HELO).
    session_verdict: Option<Verdict>,
    /// A final verdict for the current transaction (after MAIL or RCPT).
    message_verdict: Option<Verdict>,
    /// MAIL was sent and the end of the message was not: an ABORT is due.
    in_transaction: bool,
}

impl fmt::Debug for Milter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Milter")
            .field("address", &self.address)
            .field("version", &self.version)
            .field("actions", &format_args!("{:#x}", self.actions))
            .field("protocol", &format_args!("{:#x}", self.protocol))
            .finish_non_exhaustive()
    }
}

/// A name as in `SMFIR_SETSYMLIST` lists, without braces: `{client_addr}` → `client_addr`.
fn bare(name: &str) -> &str {
    name.trim_start_matches('{').trim_end_matches('}')
}

/// The address inside angle brackets, as a filter writes it for ADDRCPT, DELRCPT, CHGFROM.
fn unbracket(addr: &str) -> String {
    let a = addr.trim();
    a.strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(a)
        .to_string()
}

fn split_args(args: Option<String>) -> Vec<String> {
    args.map(|a| a.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The reply text of `SMFIR_REPLYCODE` as an SMTP reply: `"554 5.7.1 Gtube pattern"`, lines
/// separated by CRLF for a multi-line reply. As Postfix does: `%%` becomes `%` (sendmail uses
/// the text as a format), a single `%` goes; the code must be 4xx or 5xx, the same on every
/// line, else the reply is malformed.
fn parse_reply_code(text: &str) -> Result<Reply, String> {
    let mut unformatted = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            if let Some(next) = chars.next() {
                if next == '%' {
                    unformatted.push('%');
                } else {
                    unformatted.push(next);
                }
            }
        } else {
            unformatted.push(c);
        }
    }
    let trimmed = unformatted.trim_end_matches(['\r', '\n']);
    let mut code = None;
    let mut lines = Vec::new();
    for raw in trimmed.split('\n') {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let Some((c, _last, text)) = parse_received_line(raw.as_bytes()) else {
            return Err(format!("malformed reply \"{text}\""));
        };
        if !matches!(c / 100, 4 | 5) || c > 599 {
            return Err(format!(
                "reply code {c} in \"{text}\" is not 4xx or 5xx (a filter may only refuse with its own reply)"
            ));
        }
        if code.is_some_and(|prev| prev != c) {
            return Err(format!("reply \"{text}\" changes its code between lines"));
        }
        code = Some(c);
        lines.push(text);
    }
    let code = code.ok_or_else(|| "empty reply".to_string())?;
    Ok(Reply::from_received(code, lines))
}

impl Milter {
    /// Connects to the filter at `address` and negotiates: version 6, every action in
    /// [`action::ALL`], the steps and no-reply flags in [`proto::OFFERED`]. The filter's
    /// answer decides which steps are sent and which are answered.
    pub async fn connect(address: &Address, timeouts: Timeouts) -> Result<Milter, Error> {
        let name = address.to_string();
        let opened = timeout(timeouts.connect, async {
            match address {
                Address::Inet { host, port } => {
                    let s = TcpStream::connect((host.as_str(), *port)).await?;
                    let _ = s.set_nodelay(true);
                    Ok(Stream::Tcp(s))
                }
                Address::Unix(path) => UnixStream::connect(path).await.map(Stream::Unix),
            }
        })
        .await;
        let stream = match opened {
            Err(_) => {
                return Err(Error::Timeout {
                    address: name,
                    step: "connect",
                    after: timeouts.connect,
                });
            }
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    address: name,
                    source,
                });
            }
            Ok(Ok(s)) => s,
        };
        let mut milter = Milter {
            address: name,
            stream,
            rbuf: Vec::new(),
            timeouts,
            version: 0,
            actions: 0,
            protocol: 0,
            symlists: Default::default(),
            session_verdict: None,
            message_verdict: None,
            in_transaction: false,
        };
        milter.negotiate().await?;
        Ok(milter)
    }

    async fn negotiate(&mut self) -> Result<(), Error> {
        const STEP: &str = "negotiation";
        let offer = Command::OptNeg {
            version: codec::VERSION,
            actions: action::ALL,
            protocol: proto::OFFERED,
        };
        self.send(&offer.to_bytes(), STEP).await?;
        let answer = self.read_response(STEP, self.timeouts.command).await?;
        let Response::OptNeg {
            version,
            actions,
            protocol,
            symlists,
        } = answer
        else {
            return Err(self.protocol_error(
                STEP,
                format!(
                    "expected the negotiation answer 'O', got '{}'",
                    char::from(answer.code())
                ),
            ));
        };
        // Postfix (milter8.c): a newer version or actions we did not offer end the talk.
        if !(2..=codec::VERSION).contains(&version) {
            return Err(self.protocol_error(
                STEP,
                format!("the filter speaks milter protocol version {version}; versions 2 to 6 are supported"),
            ));
        }
        if actions & !action::ALL != 0 {
            return Err(self.protocol_error(
                STEP,
                format!(
                    "the filter asks for actions {actions:#x}, beyond those offered ({:#x})",
                    action::ALL
                ),
            ));
        }
        if protocol & !proto::OFFERED != 0 {
            // HDR_LEADSPC, RCPT_REJ, the MDS_* sizes: not offered, so not done.
            tracing::debug!(
                milter = %self.address,
                "filter protocol flags {:#x} not offered, ignored",
                protocol & !proto::OFFERED
            );
        }
        self.version = version;
        self.actions = actions;
        self.protocol = protocol & proto::OFFERED;
        for (stage, list) in symlists {
            self.set_symlist(stage, &list);
        }
        tracing::debug!(
            milter = %self.address,
            version, actions = format_args!("{actions:#x}"), protocol = format_args!("{protocol:#x}"),
            "milter negotiated"
        );
        Ok(())
    }

    fn set_symlist(&mut self, stage: u32, list: &str) {
        if self.actions & action::SETSYMLIST == 0 {
            return;
        }
        if let Some(stage) = Stage::from_u32(stage) {
            self.symlists[stage as usize] = Some(
                list.split_whitespace()
                    .map(|n| bare(n).to_string())
                    .collect(),
            );
        }
    }

    /// The protocol version the filter speaks.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The `SMFIF_*` actions the filter may ask for.
    pub fn actions(&self) -> u32 {
        self.actions
    }

    /// The `SMFIP_*` flags in force: steps not sent, steps not answered.
    pub fn protocol(&self) -> u32 {
        self.protocol
    }

    /// The filter's address, as written in the configuration.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn has(&self, flag: u32) -> bool {
        self.protocol & flag != 0
    }

    fn protocol_error(&self, step: &'static str, detail: String) -> Error {
        Error::Protocol {
            address: self.address.clone(),
            step,
            detail,
        }
    }

    async fn send(&mut self, bytes: &[u8], step: &'static str) -> Result<(), Error> {
        match timeout(self.timeouts.command, self.stream.write_all(bytes)).await {
            Err(_) => Err(Error::Timeout {
                address: self.address.clone(),
                step,
                after: self.timeouts.command,
            }),
            Ok(Err(e)) => Err(Error::Closed {
                address: self.address.clone(),
                step,
                source: Some(e),
            }),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Reads the next response. `SMFIR_PROGRESS` restarts the timer (up to
    /// [`PROGRESS_CEILING`] times `wait` in all) and is not returned.
    async fn read_response(
        &mut self,
        step: &'static str,
        wait: Duration,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let ceiling = started + wait * PROGRESS_CEILING;
        let mut deadline = started + wait;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match codec::decode(&self.rbuf) {
                Ok(Decoded::Packet(response, used)) => {
                    self.rbuf.drain(..used);
                    if response == Response::Progress {
                        deadline = (Instant::now() + wait).min(ceiling);
                        continue;
                    }
                    return Ok(response);
                }
                Ok(Decoded::Incomplete) => {}
                Err(e) => return Err(self.protocol_error(step, e.to_string())),
            }
            match timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => {
                    return Err(Error::Timeout {
                        address: self.address.clone(),
                        step,
                        after: wait,
                    });
                }
                Ok(Ok(0)) => {
                    return Err(Error::Closed {
                        address: self.address.clone(),
                        step,
                        source: None,
                    });
                }
                Ok(Ok(n)) => self.rbuf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => {
                    return Err(Error::Closed {
                        address: self.address.clone(),
                        step,
                        source: Some(e),
                    });
                }
            }
        }
    }

    /// Appends the `SMFIC_MACRO` packet for `stage`, keeping only the macros the filter
    /// listed for it, if it sent a list. Nothing when no macro is left.
    fn put_macros(&self, out: &mut Vec<u8>, stage: Stage, macros: &[(String, String)]) {
        let kept: Vec<(String, String)>;
        let macros = match &self.symlists[stage as usize] {
            Some(wanted) => {
                kept = macros
                    .iter()
                    .filter(|(n, _)| wanted.iter().any(|w| w == bare(n)))
                    .cloned()
                    .collect();
                &kept[..]
            }
            None => macros,
        };
        if !macros.is_empty() {
            Command::Macro {
                for_command: stage.command(),
                macros,
            }
            .encode(out);
        }
    }

    /// The verdict a response gives to the step `step` (not the end of the message).
    fn verdict(&self, response: Response, step: &'static str) -> Result<Verdict, Error> {
        Ok(match response {
            Response::Continue | Response::Skip => Verdict::Continue,
            Response::Accept => Verdict::Accept,
            Response::Reject => Verdict::Reject(None),
            Response::TempFail => Verdict::TempFail(None),
            Response::Discard => Verdict::Discard,
            Response::Shutdown | Response::ConnFail => Verdict::Shutdown,
            Response::ReplyCode(text) => {
                let reply =
                    parse_reply_code(&text).map_err(|detail| self.protocol_error(step, detail))?;
                if reply.code / 100 == 4 {
                    Verdict::TempFail(Some(reply))
                } else {
                    Verdict::Reject(Some(reply))
                }
            }
            other => {
                return Err(self.protocol_error(
                    step,
                    format!("unexpected response '{}'", char::from(other.code())),
                ));
            }
        })
    }

    /// Sends one step (with its macros) unless the filter does not want it (`skip_flag`),
    /// and reads its verdict unless the filter does not answer it (`no_reply_flag`).
    async fn step(
        &mut self,
        step: &'static str,
        stage: Stage,
        command: Command<'_>,
        flags: (u32, u32),
        macros: &[(String, String)],
    ) -> Result<Verdict, Error> {
        let (skip_flag, no_reply_flag) = flags;
        if self.has(skip_flag) {
            return Ok(Verdict::Continue);
        }
        let mut out = Vec::new();
        self.put_macros(&mut out, stage, macros);
        command.encode(&mut out);
        self.send(&out, step).await?;
        if self.has(no_reply_flag) {
            return Ok(Verdict::Continue);
        }
        let response = self.read_response(step, self.timeouts.command).await?;
        self.verdict(response, step)
    }

    /// The connect step: the client's host name (`[address]` when it has none), address and
    /// port. A final verdict here (accept, reject, tempfail) holds for the whole SMTP
    /// connection: the later steps answer it again without asking the filter.
    pub async fn connect_step(
        &mut self,
        hostname: &str,
        ip: IpAddr,
        port: u16,
        macros: &[(String, String)],
    ) -> Result<Verdict, Error> {
        if let Some(v) = &self.session_verdict {
            return Ok(v.clone());
        }
        let ip = ip.to_canonical();
        let text = ip.to_string();
        let family = match ip {
            IpAddr::V4(_) => ConnectFamily::Inet4 {
                address: &text,
                port,
            },
            IpAddr::V6(_) => ConnectFamily::Inet6 {
                address: &text,
                port,
            },
        };
        let command = Command::Connect { hostname, family };
        let flags = (proto::NOCONNECT, proto::NR_CONN);
        let v = self
            .step("connect", Stage::Connect, command, flags, macros)
            .await?;
        Ok(self.session_level(v))
    }

    /// Keeps a connection-level final verdict (connect, HELO). Discard means nothing there
    /// (Postfix ignores it too).
    fn session_level(&mut self, v: Verdict) -> Verdict {
        match v {
            Verdict::Continue => Verdict::Continue,
            Verdict::Discard => {
                tracing::warn!(milter = %self.address, "DISCARD is not allowed for connect or HELO: ignored");
                Verdict::Continue
            }
            final_verdict => {
                self.session_verdict = Some(final_verdict.clone());
                final_verdict
            }
        }
    }

    /// The HELO/EHLO step.
    pub async fn helo(
        &mut self,
        name: &str,
        macros: &[(String, String)],
    ) -> Result<Verdict, Error> {
        if let Some(v) = &self.session_verdict {
            return Ok(v.clone());
        }
        let flags = (proto::NOHELO, proto::NR_HELO);
        let v = self
            .step("HELO", Stage::Helo, Command::Helo(name), flags, macros)
            .await?;
        Ok(self.session_level(v))
    }

    /// The MAIL step: `from` is the sender address WITHOUT angle brackets (empty for the null
    /// sender `<>`), `args` the ESMTP parameters (`SIZE=1234`, `BODY=8BITMIME`). Starts a
    /// transaction (an unfinished one is aborted first). Accept or discard here hold for the
    /// whole message: `rcpt` and `message` answer them again without asking.
    pub async fn mail(
        &mut self,
        from: &str,
        args: &[String],
        macros: &[(String, String)],
    ) -> Result<Verdict, Error> {
        if let Some(v) = &self.session_verdict {
            return Ok(v.clone());
        }
        self.abort().await?;
        self.in_transaction = true;
        let command = Command::Mail { sender: from, args };
        let flags = (proto::NOMAIL, proto::NR_MAIL);
        let v = self
            .step("MAIL", Stage::Mail, command, flags, macros)
            .await?;
        if v != Verdict::Continue {
            self.message_verdict = Some(v.clone());
        }
        Ok(v)
    }

    /// The RCPT step: `rcpt` WITHOUT angle brackets, `args` the ESMTP parameters. A reject
    /// or tempfail refuses this recipient only; accept or discard hold for the message.
    pub async fn rcpt(
        &mut self,
        rcpt: &str,
        args: &[String],
        macros: &[(String, String)],
    ) -> Result<Verdict, Error> {
        if let Some(v) = self
            .session_verdict
            .as_ref()
            .or(self.message_verdict.as_ref())
        {
            return Ok(v.clone());
        }
        let command = Command::Rcpt { rcpt, args };
        let flags = (proto::NORCPT, proto::NR_RCPT);
        let v = self
            .step("RCPT", Stage::Rcpt, command, flags, macros)
            .await?;
        if matches!(v, Verdict::Accept | Verdict::Discard) {
            self.message_verdict = Some(v.clone());
        }
        Ok(v)
    }

    /// The message: DATA, the header fields one by one (value without the blanks after the
    /// colon, folding kept), end of headers, the body in chunks of at most 64 KiB (stopped
    /// early when the filter answers SKIP), end of body; then the modifications and the final
    /// verdict. `content` is the message as received (CRLF line endings, no dot-stuffing);
    /// `macros` go with DATA and with the end of the message (e.g. `i`, the queue id).
    ///
    /// A verdict other than Continue before the end ends the talk about this message and
    /// comes back with no modification. The modifications are given even with a final
    /// reject; they matter only with Continue or Accept.
    pub async fn message(
        &mut self,
        content: &[u8],
        macros: &[(String, String)],
    ) -> Result<(Verdict, Vec<Modification>), Error> {
        if let Some(v) = self
            .session_verdict
            .as_ref()
            .or(self.message_verdict.as_ref())
        {
            return Ok((v.clone(), Vec::new()));
        }
        let early = |v: Verdict| Ok((v, Vec::new()));
        let flags = (proto::NODATA, proto::NR_DATA);
        let v = self
            .step("DATA", Stage::Data, Command::Data, flags, macros)
            .await?;
        if v != Verdict::Continue {
            return early(v);
        }
        let (fields, body) = crate::edit::header_fields(content);
        self.send_message(fields, body, macros).await
    }

    /// [`Client::message`] for a message given as its header section (with the empty line
    /// after it) and its body apart: a large message's body, mapped from its file, is sent in
    /// chunks without being copied.
    pub async fn message_parts(
        &mut self,
        head: &[u8],
        body: &[u8],
        macros: &[(String, String)],
    ) -> Result<(Verdict, Vec<Modification>), Error> {
        if let Some(v) = self
            .session_verdict
            .as_ref()
            .or(self.message_verdict.as_ref())
        {
            return Ok((v.clone(), Vec::new()));
        }
        let flags = (proto::NODATA, proto::NR_DATA);
        let v = self
            .step("DATA", Stage::Data, Command::Data, flags, macros)
            .await?;
        if v != Verdict::Continue {
            return Ok((v, Vec::new()));
        }
        let (fields, _) = crate::edit::header_fields(head);
        self.send_message(fields, body, macros).await
    }

    async fn send_message(
        &mut self,
        fields: Vec<crate::edit::HeaderField<'_>>,
        body: &[u8],
        macros: &[(String, String)],
    ) -> Result<(Verdict, Vec<Modification>), Error> {
        let early = |v: Verdict| Ok((v, Vec::new()));
        if !self.has(proto::NOHDRS) {
            if self.has(proto::NR_HDR) {
                let mut out = Vec::new();
                for (name, value) in &fields {
                    Command::Header { name, value }.encode(&mut out);
                }
                self.send(&out, "header").await?;
            } else {
                for (name, value) in &fields {
                    let v = self
                        .step(
                            "header",
                            Stage::Eoh,
                            Command::Header { name, value },
                            (0, 0),
                            &[],
                        )
                        .await?;
                    if v != Verdict::Continue {
                        return early(v);
                    }
                }
            }
        }
        let flags = (proto::NOEOH, proto::NR_EOH);
        let v = self
            .step("end of headers", Stage::Eoh, Command::Eoh, flags, &[])
            .await?;
        if v != Verdict::Continue {
            return early(v);
        }
        if !self.has(proto::NOBODY) {
            for chunk in body.chunks(codec::MAX_BODY_CHUNK) {
                self.send(&Command::Body(chunk).to_bytes(), "body").await?;
                if self.has(proto::NR_BODY) {
                    continue;
                }
                match self.read_response("body", self.timeouts.command).await? {
                    Response::Continue => {}
                    Response::Skip => break,
                    other => return early(self.verdict(other, "body")?),
                }
            }
        }
        let mut out = Vec::new();
        self.put_macros(&mut out, Stage::Eom, macros);
        Command::BodyEob.encode(&mut out);
        self.send(&out, "end of message").await?;
        let result = self.end_of_message().await;
        if result.is_ok() {
            self.in_transaction = false;
        }
        result
    }

    /// Reads the modifications and the final verdict after `SMFIC_BODYEOB`.
    async fn end_of_message(&mut self) -> Result<(Verdict, Vec<Modification>), Error> {
        const STEP: &str = "end of message";
        let mut mods: Vec<Modification> = Vec::new();
        let mut replaced = 0usize;
        loop {
            let response = self.read_response(STEP, self.timeouts.eom).await?;
            if mods.len() >= MAX_MODIFICATIONS {
                return Err(self
                    .protocol_error(STEP, format!("more than {MAX_MODIFICATIONS} modifications")));
            }
            let m = match response {
                Response::AddHeader { name, value } => Modification::AddHeader { name, value },
                Response::InsertHeader { index, name, value } => {
                    Modification::InsertHeader { index, name, value }
                }
                Response::ChangeHeader { index, name, value } => Modification::ChangeHeader {
                    name,
                    index: index.max(1),
                    value,
                },
                Response::ReplaceBody(chunk) => {
                    replaced += chunk.len();
                    if replaced > codec::MAX_PACKET {
                        return Err(self.protocol_error(
                            STEP,
                            format!("replacement body over {} bytes", codec::MAX_PACKET),
                        ));
                    }
                    if let Some(Modification::ReplaceBody(body)) = mods.last_mut() {
                        body.extend_from_slice(&chunk);
                        continue;
                    }
                    Modification::ReplaceBody(chunk)
                }
                Response::AddRcpt(rcpt) => Modification::AddRcpt {
                    rcpt: unbracket(&rcpt),
                    args: Vec::new(),
                },
                Response::AddRcptPar { rcpt, args } => Modification::AddRcpt {
                    rcpt: unbracket(&rcpt),
                    args: split_args(args),
                },
                Response::DelRcpt(rcpt) => Modification::DelRcpt(unbracket(&rcpt)),
                Response::ChangeFrom { from, args } => Modification::ChangeFrom {
                    from: unbracket(&from),
                    args: split_args(args),
                },
                Response::Quarantine(reason) => Modification::Quarantine(reason),
                final_response => {
                    let v = self.verdict(final_response, STEP)?;
                    return Ok((v, mods));
                }
            };
            mods.push(m);
        }
    }

    /// Ends the current transaction (RSET, or a transaction refused before its end): sends
    /// `SMFIC_ABORT` when MAIL was sent and the message was not finished; nothing otherwise.
    /// The connection stays for the next transaction.
    pub async fn abort(&mut self) -> Result<(), Error> {
        self.message_verdict = None;
        if self.in_transaction {
            self.in_transaction = false;
            if self.session_verdict.is_none() {
                self.send(&Command::Abort.to_bytes(), "abort").await?;
            }
        }
        Ok(())
    }

    /// Ends the talk: `SMFIC_QUIT`, then closes the connection. Errors are of no interest
    /// at that point and are not reported.
    pub async fn quit(mut self) {
        let _ = self.send(&Command::Quit.to_bytes(), "quit").await;
        let _ = timeout(self.timeouts.command, self.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_postfix_and_sendmail_write_them() {
        let inet = |h: &str, p| Address::Inet {
            host: h.into(),
            port: p,
        };
        let ok: &[(&str, Address)] = &[
            ("inet:127.0.0.1:11332", inet("127.0.0.1", 11332)),
            ("inet:localhost:8891", inet("localhost", 8891)),
            ("inet:[::1]:11332", inet("::1", 11332)),
            ("inet:11332@127.0.0.1", inet("127.0.0.1", 11332)),
            ("inet6:11332@[::1]", inet("::1", 11332)),
            (
                "unix:/run/rspamd/milter.sock",
                Address::Unix("/run/rspamd/milter.sock".into()),
            ),
            ("local:/run/x.sock", Address::Unix("/run/x.sock".into())),
        ];
        for (text, address) in ok {
            assert_eq!(&text.parse::<Address>().unwrap(), address, "{text}");
        }
        assert_eq!(inet("::1", 1).to_string(), "inet:[::1]:1");
        assert_eq!(inet("a", 2).to_string(), "inet:a:2");
        let bad: &[(&str, &str)] = &[
            ("127.0.0.1:11332", "unknown transport \"127.0.0.1\""),
            ("localhost", "no \"inet:\" or \"unix:\" prefix"),
            ("inet:127.0.0.1", "the port is missing"),
            ("inet:127.0.0.1:http", "\"http\" is not a port number"),
            ("inet:127.0.0.1:70000", "\"70000\" is not a port number"),
            ("inet:127.0.0.1:0", "port 0"),
            ("inet::11332", "the host is empty"),
            ("inet:::1:11332", "brackets"),
            ("inet:[::1:11332", "expected inet:[IPv6 address]:port"),
            ("unix:", "socket path"),
            ("tcp:1.2.3.4:5", "unknown transport \"tcp\""),
        ];
        for (text, why) in bad {
            let e = text.parse::<Address>().unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
            assert!(
                e.starts_with(&format!("milter address \"{text}\": ")),
                "{e}"
            );
        }
    }

    #[test]
    fn reply_codes_become_replies() {
        let r = parse_reply_code("554 5.7.1 Gtube pattern").unwrap();
        assert_eq!(r.to_bytes(), b"554 5.7.1 Gtube pattern\r\n");
        let r = parse_reply_code("451-4.7.1 first\r\n451 4.7.1 100%% sure\r\n").unwrap();
        assert_eq!(r.code, 451);
        assert_eq!(r.lines, ["first", "100% sure"]);
        assert_eq!(parse_reply_code("550 go away").unwrap().status, None);
        assert!(
            parse_reply_code("250 2.0.0 ok")
                .unwrap_err()
                .contains("not 4xx or 5xx")
        );
        assert!(parse_reply_code("hello").is_err());
        assert!(parse_reply_code("").is_err());
        assert!(parse_reply_code("550-a\r\n450 b").is_err());
        assert!(parse_reply_code("650 x").is_err());
    }

    #[test]
    fn envelope_addresses_lose_their_brackets() {
        assert_eq!(unbracket("<a@b>"), "a@b");
        assert_eq!(unbracket("a@b"), "a@b");
        assert_eq!(unbracket("<>"), "");
        assert_eq!(split_args(Some(" A=1  B=2 ".into())), ["A=1", "B=2"]);
        assert!(split_args(None).is_empty());
    }
}
