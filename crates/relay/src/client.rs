//! The outbound SMTP client: one session to one remote host, and the one classification of
//! its replies into per-recipient outcomes (DESIGN.md decision 4).
//!
//! Where to connect is decided elsewhere (MX resolution); this module is given an address and
//! the host name that led to it. A session runs: greeting, EHLO (HELO when EHLO is refused),
//! STARTTLS as the [`TlsPolicy`] asks (then EHLO again), AUTH when credentials are configured,
//! and then one transaction per message: MAIL, RCPT for each recipient, DATA, the content
//! dot-stuffed by [`estafeta_proto::data::Stuffer`] a block at a time, the final reply. With PIPELINING (RFC 2920)
//! MAIL, every RCPT and DATA go out in one write and the replies are read in order.
//!
//! Errors are sorted in two places only:
//!
//! - [`SessionError`]: the session could not be set up (no connection, timeout, greeting or
//!   EHLO refused, TLS required but not achieved, AUTH failed). No recipient was decided; the
//!   caller tries the next MX host or retries later.
//! - [`classify`]: every reply to MAIL, RCPT, DATA and the end of the content becomes an
//!   [`Outcome`] per recipient by one exhaustive `match` on the reply code (the shape of
//!   Stalwart's `Status::from_smtp_error`; the failure carries the reply, the remote host and
//!   the command, like mox's `smtpclient.Error`).
//!
//! Problems found locally (the connection dropped, a reply that does not parse, a message that
//! needs SMTPUTF8 or is too big for the peer) get a reply built here with the enhanced status
//! code Postfix uses for the same situation; their text names the host, and their
//! [`Failure::remote`] is `None` because no remote server said it.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use estafeta_proto::data::Stuffer;
use estafeta_proto::reply::{self as replies};
use estafeta_proto::{MailParams, RcptParams, Reply};
use estafeta_queue::{Failure, Outcome};

use crate::opening::{OpenStep, Opening};
pub use crate::transaction::{RcptResult, classify, rcpt_result};
use crate::transaction::{Step, Transaction, Wait};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// The longest reply line accepted, in octets (RFC 5321 §4.5.3.1.5 allows 512; some servers
/// write longer ones). A longer line ends the session with a temporary failure.
pub const MAX_REPLY_LINE: usize = 2048;

/// The most lines accepted in one reply. More end the session with a temporary failure.
pub const MAX_REPLY_LINES: usize = 100;

/// The system's trusted roots for [`TlsPolicy::Verify`] (Debian's bundle).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The size of one block of content written under the data-block timeout.
const DATA_BLOCK: usize = 64 * 1024;

/// What to do about TLS on the connection (per route; Postfix's `smtp_tls_security_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// Never send STARTTLS.
    None,
    /// STARTTLS when the peer offers it, without verifying the certificate (Postfix `may`).
    /// A peer that refuses STARTTLS gets the message in plaintext; a failed TLS handshake is
    /// followed by one new connection in plaintext.
    #[default]
    Opportunistic,
    /// STARTTLS must succeed, but the certificate is not verified (Postfix `encrypt`).
    Required,
    /// STARTTLS must succeed and the certificate must match the host's DANE TLSA records
    /// ([`ClientConfig::dane`]; RFC 7672).
    Dane,
    /// STARTTLS must succeed and the certificate must chain to a trusted root and match the
    /// host name as given to [`deliver`] (Postfix `verify`: for MX delivery that name comes
    /// from DNS, so this does not protect against a forged MX answer; DANE and MTA-STS will).
    Verify,
}

impl TlsPolicy {
    /// The policy's name in the configuration and the logs.
    pub fn name(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Required => "required",
            TlsPolicy::Verify => "verify",
            TlsPolicy::Dane => "dane",
        }
    }
}

/// The TLS a session runs, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: &'static str,
    /// The cipher suite, as IANA names it.
    pub cipher: &'static str,
    /// The certificate was verified (chain to a trusted root, name of the host).
    pub verified: bool,
    /// Under an audit ([`ClientConfig::audit`]): why the certificate would have failed.
    pub audit_error: Option<String>,
}

/// How long to wait for each step (RFC 5321 §4.5.3.2). Each wait is bounded; when one runs
/// out, the session ends with a temporary failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (Postfix `smtp_connect_timeout`, 30 s).
    pub connect: Duration,
    /// The 220 greeting (5 min).
    pub greeting: Duration,
    /// EHLO/HELO, STARTTLS with its handshake, AUTH and RSET (5 min).
    pub ehlo: Duration,
    /// MAIL (5 min).
    pub mail: Duration,
    /// Each RCPT (5 min).
    pub rcpt: Duration,
    /// The reply to DATA (2 min).
    pub data_init: Duration,
    /// Writing each block of the content (3 min).
    pub data_block: Duration,
    /// The reply after the end of the content (10 min).
    pub data_final: Duration,
    /// QUIT: the outcomes are known by then, so this is short (30 s).
    pub quit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        const MIN: u64 = 60;
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(5 * MIN),
            ehlo: Duration::from_secs(5 * MIN),
            mail: Duration::from_secs(5 * MIN),
            rcpt: Duration::from_secs(5 * MIN),
            data_init: Duration::from_secs(2 * MIN),
            data_block: Duration::from_secs(3 * MIN),
            data_final: Duration::from_secs(10 * MIN),
            quit: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// Every timeout set to `d` (for tests).
    pub fn all(d: Duration) -> Self {
        Timeouts {
            connect: d,
            greeting: d,
            ehlo: d,
            mail: d,
            rcpt: d,
            data_init: d,
            data_block: d,
            data_final: d,
            quit: d,
        }
    }
}

/// How the client presents itself and secures the session.
#[derive(Clone)]
pub struct ClientConfig {
    /// The name sent with EHLO/HELO (this server's host name).
    pub helo: String,
    /// The TLS policy.
    pub tls: TlsPolicy,
    /// The local address to connect from. Ignored for a destination of the other address
    /// family.
    pub source: Option<IpAddr>,
    /// Timeouts per step.
    pub timeouts: Timeouts,
    /// User name and password for AUTH (PLAIN when offered, else LOGIN), for a smarthost.
    /// They are sent only inside TLS: a session that did not reach TLS ends with a temporary
    /// failure instead of sending them in clear (DESIGN.md decision 6).
    pub credentials: Option<(String, String)>,
    /// The trusted roots for [`TlsPolicy::Verify`]; `None` reads [`SYSTEM_ROOTS`] (once per
    /// process).
    pub roots: Option<Arc<RootCertStore>>,
    /// The usable TLSA records of the host, for [`TlsPolicy::Dane`].
    pub dane: Option<Arc<Vec<hickory_resolver::proto::rr::rdata::TLSA>>>,
    /// Under `opportunistic` and `required`: check the certificate anyway, without acting on
    /// the result, so that [`TlsInfo`] says whether it would have passed (MTA-STS `testing`,
    /// whose failures TLS-RPT reports).
    pub audit: bool,
}

impl ClientConfig {
    /// A configuration with the default timeouts, opportunistic TLS and no credentials.
    pub fn new(helo: impl Into<String>) -> Self {
        ClientConfig {
            helo: helo.into(),
            tls: TlsPolicy::Opportunistic,
            source: None,
            timeouts: Timeouts::default(),
            credentials: None,
            roots: None,
            dane: None,
            audit: false,
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("helo", &self.helo)
            .field("tls", &self.tls)
            .field("source", &self.source)
            .field("timeouts", &self.timeouts)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(u, _)| (u, "<secret>")),
            )
            .field("roots", &self.roots.as_ref().map(|r| r.len()))
            .finish()
    }
}

/// One message to send: the envelope as the queue holds it and the content.
#[derive(Debug, Clone, Copy)]
pub struct OutboundMessage<'a> {
    /// The queue ID, for the log.
    pub id: &'a str,
    /// The reverse path without `<>`; empty for the null sender.
    pub from: &'a str,
    /// The MAIL parameters of the original transaction (RET and ENVID are passed on).
    pub params: &'a MailParams,
    /// The recipients (without `<>`) with their RCPT parameters (NOTIFY and ORCPT are passed
    /// on).
    pub rcpts: &'a [(String, RcptParams)],
    /// The message with CRLF line breaks, not dot-stuffed.
    pub content: &'a [u8],
    /// The envelope or the headers need SMTPUTF8 (RFC 6531).
    pub needs_smtputf8: bool,
    /// The content has 8-bit octets (RFC 6152). `BODY=8BITMIME` is sent when the peer offers
    /// 8BITMIME; to a peer that does not, the content is sent as it is (no conversion).
    pub needs_8bit: bool,
}

/// The session could not be set up, so no recipient was decided: connection refused or
/// timed out, greeting or EHLO refused, TLS required but not achieved, AUTH failed. The
/// caller tries the next MX host (or, when `permanent`, may give up on this one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{failure}")]
pub struct SessionError {
    /// True when the host refused permanently (a 5yz greeting, or 5yz to both EHLO and HELO).
    pub permanent: bool,
    /// The reply (remote, or built here for a local problem), the host and the command.
    pub failure: Failure,
}

impl SessionError {
    pub(crate) fn temporary(failure: Failure) -> Self {
        SessionError {
            permanent: false,
            failure,
        }
    }

    pub(crate) fn from_outcome(outcome: Outcome) -> Self {
        match outcome {
            Outcome::PermFail(failure) => SessionError {
                permanent: true,
                failure,
            },
            Outcome::TempFail(failure) => SessionError::temporary(failure),
            Outcome::Delivered(text) | Outcome::Relayed { detail: text, .. } => {
                SessionError::temporary(Failure::local(replies::unexpected_success(&text)))
            }
        }
    }
}

/// Delivers one message in one session to `addr` (an address of `host`) and returns one
/// [`Outcome`] per entry of `msg.rcpts`, in the same order. Opens the session, sends the
/// message and says QUIT; see [`Connection`] to send several messages in one session.
pub async fn deliver(
    addr: SocketAddr,
    host: &str,
    cfg: &ClientConfig,
    msg: &OutboundMessage<'_>,
) -> Result<Vec<Outcome>, SessionError> {
    if msg.rcpts.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = Connection::open(addr, host, cfg).await?;
    let outcomes = conn.send(msg).await;
    conn.quit().await;
    Ok(outcomes)
}

/// What the peer offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE (RFC 1870): `Some(limit)`, where 0 means no fixed limit.
    pub size: Option<u64>,
    /// 8BITMIME (RFC 6152).
    pub eight_bit_mime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// REQUIRETLS (RFC 8689).
    pub requiretls: bool,
    /// The AUTH mechanisms (RFC 4954), upper case.
    pub auth: Vec<String>,
}

impl Extensions {
    /// Reads the keywords of an EHLO reply (every line but the first).
    pub fn parse(reply: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            // Old servers write `AUTH=PLAIN LOGIN`.
            if let Some(first) = keyword.strip_prefix("AUTH=") {
                ext.auth.push(first.to_string());
                ext.auth.extend(words.map(|w| w.to_ascii_uppercase()));
                continue;
            }
            match keyword.as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => {
                    ext.size = Some(words.next().and_then(|w| w.parse().ok()).unwrap_or(0));
                }
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "DSN" => ext.dsn = true,
                "STARTTLS" => ext.starttls = true,
                "REQUIRETLS" => ext.requiretls = true,
                "AUTH" => ext.auth.extend(words.map(|w| w.to_ascii_uppercase())),
                _ => {}
            }
        }
        ext.auth.sort();
        ext.auth.dedup();
        ext
    }
}

// ---- the connection ----------------------------------------------------------------------

/// Anything the session can run over: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The byte stream, buffered for reading (writes pass through).
struct Stream(BufReader<Box<dyn Io>>);

/// Why the conversation stopped without a reply to classify.
#[derive(Debug)]
enum Broken {
    /// The wait ran out.
    Timeout,
    /// The peer closed the connection.
    Closed,
    /// A read or write failed.
    Io(io::Error),
    /// The reply does not follow RFC 5321 §4.2 (or is too long).
    Malformed(String),
}

/// An open SMTP session with one host, ready for a transaction.
pub struct Connection {
    stream: Option<Stream>,
    /// The host name, for [`Failure::remote`] and the texts.
    host: String,
    /// `host[ip]:port`, for texts and logs.
    peer: String,
    /// What the peer offered (after TLS, if TLS was started).
    ext: Extensions,
    /// What TLS runs, once it does.
    tls: Option<TlsInfo>,
    /// In plaintext because the TLS handshake failed under the opportunistic policy.
    tls_fallback: bool,
    timeouts: Timeouts,
    /// A transaction ended early (refused MAIL, no recipient); RSET before the next.
    needs_rset: bool,
    /// Why the session is unusable, once it is.
    dead: Option<Failure>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("ext", &self.ext)
            .field("tls", &self.tls)
            .field("dead", &self.dead)
            .finish()
    }
}

/// How an attempt to open a session ended.
enum Opened {
    Ready(Box<Connection>),
    Failed(SessionError),
    /// The TLS handshake failed under [`TlsPolicy::Opportunistic`]: try again in plaintext.
    HandshakeFailed(SessionError),
}

impl Connection {
    /// Connects to `addr` (an address of `host`) and sets the session up: greeting, EHLO or
    /// HELO, STARTTLS per the policy, AUTH when credentials are configured.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        cfg: &ClientConfig,
    ) -> Result<Connection, SessionError> {
        match Self::attempt(addr, host, cfg, cfg.tls).await {
            Opened::Ready(conn) => Ok(*conn),
            Opened::Failed(err) => Err(err),
            Opened::HandshakeFailed(err) => {
                tracing::info!(target: "estafeta::maillog", host, address = %addr, reason = %err.failure, "TLS handshake failed; retrying in plaintext");
                match Self::attempt(addr, host, cfg, TlsPolicy::None).await {
                    Opened::Ready(mut conn) => {
                        conn.tls_fallback = true;
                        Ok(*conn)
                    }
                    Opened::Failed(err) | Opened::HandshakeFailed(err) => Err(err),
                }
            }
        }
    }

    /// What the peer offered in EHLO (empty after a HELO fallback).
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// `host[ip]:port`, for texts and logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// True when the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// What the session's TLS is, once it runs.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// True when the session runs in plaintext because its TLS handshake failed under the
    /// opportunistic policy.
    pub fn tls_fallback(&self) -> bool {
        self.tls_fallback
    }

    /// True while the session can carry another message.
    pub fn is_usable(&self) -> bool {
        self.dead.is_none()
    }

    async fn attempt(addr: SocketAddr, host: &str, cfg: &ClientConfig, tls: TlsPolicy) -> Opened {
        let peer = format!("{host}[{}]:{}", addr.ip(), addr.port());
        let t = cfg.timeouts;
        let tcp = match timeout(t.connect, connect(addr, cfg.source)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Opened::Failed(SessionError::temporary(Failure::local(
                    replies::connect_failed(&peer, &e.to_string()),
                )));
            }
            Err(_) => {
                return Opened::Failed(SessionError::temporary(Failure::local(
                    replies::connect_failed(&peer, "timed out"),
                )));
            }
        };
        let mut conn = Connection {
            stream: Some(Stream(BufReader::new(Box::new(tcp)))),
            host: host.to_string(),
            peer,
            ext: Extensions::default(),
            tls: None,
            tls_fallback: false,
            timeouts: t,
            needs_rset: false,
            dead: None,
        };
        match conn.setup(addr, cfg, tls).await {
            Ok(()) => Opened::Ready(Box::new(conn)),
            Err(Setup::Failed(e)) => {
                conn.close().await;
                Opened::Failed(e)
            }
            Err(Setup::Handshake(e)) => {
                if tls == TlsPolicy::Opportunistic {
                    Opened::HandshakeFailed(e)
                } else {
                    Opened::Failed(e)
                }
            }
        }
    }

    /// Runs the session's [`Opening`] (greeting, EHLO, STARTTLS, AUTH): it decides, this
    /// reads, writes and runs the TLS handshake.
    async fn setup(
        &mut self,
        addr: SocketAddr,
        cfg: &ClientConfig,
        tls: TlsPolicy,
    ) -> Result<(), Setup> {
        let t = self.timeouts;
        let mut opening = Opening::new(
            &cfg.helo,
            tls,
            cfg.credentials.clone(),
            &self.host,
            &self.peer,
        );
        loop {
            match opening.poll() {
                OpenStep::Send {
                    bytes,
                    doing,
                    best_effort,
                    secret,
                } => {
                    let written = self.write_traced(&bytes, t.ehlo, !secret).await;
                    if !best_effort {
                        written.map_err(|b| self.setup_broken(b, doing))?;
                    }
                }
                OpenStep::Receive { greeting, doing } => {
                    let limit = if greeting { t.greeting } else { t.ehlo };
                    let reply = self
                        .read_reply(limit)
                        .await
                        .map_err(|b| self.setup_broken(b, doing))?;
                    opening.reply(reply);
                }
                OpenStep::StartTls => {
                    self.start_tls(addr, cfg, tls).await?;
                    opening.tls_started();
                }
                OpenStep::Done => {
                    self.ext = opening.extensions().clone();
                    return opening.result().map_err(Setup::Failed);
                }
            }
        }
    }

    async fn start_tls(
        &mut self,
        addr: SocketAddr,
        cfg: &ClientConfig,
        tls: TlsPolicy,
    ) -> Result<(), Setup> {
        let handshake_failed = |peer: &str, detail: String| {
            Setup::Handshake(SessionError::temporary(Failure::local(
                replies::tls_failed(peer, &detail),
            )))
        };
        let audit = (cfg.audit && matches!(tls, TlsPolicy::Opportunistic | TlsPolicy::Required))
            .then(|| Arc::new(Mutex::new(None::<Result<(), String>>)));
        let config = match &audit {
            Some(seen) => audit_config(cfg, seen.clone()),
            None => tls_config(cfg, tls),
        };
        let config = match config {
            Ok(config) => config,
            Err(e) => {
                return Err(Setup::Failed(SessionError::temporary(Failure::local(
                    replies::tls_failed(&self.peer, &e),
                ))));
            }
        };
        let name = match ServerName::try_from(self.host.clone()) {
            Ok(name) => name,
            Err(_) => ServerName::IpAddress(addr.ip().into()),
        };
        let Some(Stream(reader)) = self.stream.take() else {
            return Err(handshake_failed(&self.peer, "connection closed".into()));
        };
        if !reader.buffer().is_empty() {
            // Plaintext sent after the 220 could be an injection (CVE-2011-0411 class):
            // it is dropped with the buffer.
            tracing::warn!(peer = %self.peer, octets = reader.buffer().len(), "discarding plaintext received after STARTTLS");
        }
        let inner = reader.into_inner();
        let connector = tokio_rustls::TlsConnector::from(config);
        match timeout(self.timeouts.ehlo, connector.connect(name, inner)).await {
            Ok(Ok(stream)) => {
                let session = stream.get_ref().1;
                self.tls = Some(TlsInfo {
                    version: match session.protocol_version() {
                        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                        _ => "TLS",
                    },
                    cipher: session
                        .negotiated_cipher_suite()
                        .and_then(|c| c.suite().as_str())
                        .unwrap_or("unknown"),
                    verified: tls == TlsPolicy::Verify
                        || tls == TlsPolicy::Dane
                        || audit.as_ref().is_some_and(|a| {
                            matches!(*a.lock().unwrap_or_else(|e| e.into_inner()), Some(Ok(())))
                        }),
                    audit_error: audit.as_ref().and_then(|a| {
                        match &*a.lock().unwrap_or_else(|e| e.into_inner()) {
                            Some(Err(e)) => Some(e.clone()),
                            _ => None,
                        }
                    }),
                });
                self.stream = Some(Stream(BufReader::new(Box::new(stream))));
                Ok(())
            }
            Ok(Err(e)) => Err(handshake_failed(&self.peer, e.to_string())),
            Err(_) => Err(handshake_failed(&self.peer, "handshake timed out".into())),
        }
    }

    fn setup_broken(&self, broken: Broken, doing: &str) -> Setup {
        Setup::Failed(SessionError::temporary(
            self.broken_failure(broken, doing, None),
        ))
    }

    fn broken_failure(&self, broken: Broken, doing: &str, command: Option<&str>) -> Failure {
        let reply = match broken {
            Broken::Timeout => replies::conversation_timed_out(&self.peer, doing),
            Broken::Closed => replies::connection_lost(&self.peer, doing, None),
            Broken::Io(e) => replies::connection_lost(&self.peer, doing, Some(&e.to_string())),
            Broken::Malformed(what) => replies::peer_protocol_error(&self.peer, doing, &what),
        };
        Failure {
            reply,
            remote: None,
            command: command.map(str::to_string),
        }
    }

    // ---- the transaction ---------------------------------------------------------------

    /// Sends one message and returns one [`Outcome`] per entry of `msg.rcpts`, in order.
    /// After a refused MAIL or when no recipient was accepted, RSET comes before the next
    /// message; after a 421 or a broken connection, the session is unusable and this and
    /// every later message get temporary failures.
    pub async fn send(&mut self, msg: &OutboundMessage<'_>) -> Vec<Outcome> {
        let mut out: Vec<Option<Outcome>> = vec![None; msg.rcpts.len()];
        if let Err(failure) = self.transaction(msg, &mut out).await {
            self.kill(failure, &mut out);
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    // Cannot happen: every path decides every recipient. Safe default.
                    Outcome::TempFail(Failure::local(replies::recipient_undecided()))
                })
            })
            .collect()
    }

    /// Marks the session dead and every undecided recipient with `failure`.
    fn kill(&mut self, failure: Failure, out: &mut [Option<Outcome>]) {
        for o in out.iter_mut().filter(|o| o.is_none()) {
            *o = Some(Outcome::TempFail(failure.clone()));
        }
        self.stream = None;
        self.dead = Some(failure);
    }

    /// Runs MAIL … end of content ([`Transaction`], which decides; this only reads and
    /// writes). `Err` means the session is over (421 or broken), with the failure for the
    /// recipients still undecided.
    async fn transaction(
        &mut self,
        msg: &OutboundMessage<'_>,
        out: &mut [Option<Outcome>],
    ) -> Result<(), Failure> {
        if let Some(failure) = &self.dead {
            return Err(failure.clone());
        }
        let mut txn = Transaction::new(msg, &self.ext, self.needs_rset, &self.host, &self.peer);
        let driven = self.drive(&mut txn, msg).await;
        for (o, decided) in out.iter_mut().zip(txn.outcomes()) {
            if o.is_none() {
                o.clone_from(decided);
            }
        }
        self.needs_rset = txn.needs_rset();
        driven?;
        match txn.over() {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        }
    }

    /// Carries out `txn`'s steps on the connection.
    async fn drive(
        &mut self,
        txn: &mut Transaction,
        msg: &OutboundMessage<'_>,
    ) -> Result<(), Failure> {
        loop {
            match txn.poll() {
                Step::Send {
                    bytes,
                    wait,
                    doing,
                    command,
                } => {
                    let limit = self.wait(wait);
                    self.write(&bytes, limit)
                        .await
                        .map_err(|b| self.broken_failure(b, doing, Some(&command)))?;
                }
                Step::SendContent => self.send_content(msg.content).await?,
                Step::Receive {
                    wait,
                    doing,
                    command,
                } => {
                    let limit = self.wait(wait);
                    let reply = self
                        .read_reply(limit)
                        .await
                        .map_err(|b| self.broken_failure(b, doing, Some(&command)))?;
                    txn.reply(reply);
                }
                Step::Done => return Ok(()),
            }
        }
    }

    /// The timeout of a step.
    fn wait(&self, wait: Wait) -> Duration {
        let t = self.timeouts;
        match wait {
            Wait::Rset => t.ehlo,
            Wait::Mail => t.mail,
            Wait::Rcpt => t.rcpt,
            Wait::DataInit => t.data_init,
            Wait::DataBlock => t.data_block,
            Wait::DataFinal => t.data_final,
        }
    }

    /// The content, dot-stuffed a block at a time (a large message is never copied whole),
    /// and the end marker.
    async fn send_content(&mut self, content: &[u8]) -> Result<(), Failure> {
        let limit = self.timeouts.data_block;
        let mut wire = Vec::with_capacity(DATA_BLOCK + DATA_BLOCK / 32 + 8);
        let mut stuffer = Stuffer::default();
        let mut blocks = estafeta_queue::blocks(content, DATA_BLOCK).peekable();
        loop {
            wire.clear();
            if let Some(block) = blocks.next() {
                stuffer.feed(block, &mut wire);
            }
            let last = blocks.peek().is_none();
            if last {
                stuffer.finish(&mut wire);
            }
            self.write(&wire, limit)
                .await
                .map_err(|b| self.broken_failure(b, "sending message body", Some("DATA")))?;
            if last {
                return Ok(());
            }
        }
    }

    /// Says QUIT (when the session is still usable), waits briefly for the reply and closes.
    pub async fn quit(mut self) {
        if self.dead.is_none() {
            let t = self.timeouts.quit;
            if self.write(b"QUIT\r\n", t).await.is_ok() {
                let _ = self.read_reply(t).await;
            }
        }
        self.close().await;
    }

    async fn close(&mut self) {
        if let Some(mut stream) = self.stream.take() {
            let _ = timeout(Duration::from_secs(1), stream.0.shutdown()).await;
        }
    }

    // ---- bytes -------------------------------------------------------------------------

    async fn write(&mut self, bytes: &[u8], limit: Duration) -> Result<(), Broken> {
        self.write_traced(bytes, limit, true).await
    }

    /// [`Connection::write`], traced at TRACE level unless `trace` is false (credentials).
    async fn write_traced(
        &mut self,
        bytes: &[u8],
        limit: Duration,
        trace: bool,
    ) -> Result<(), Broken> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Broken::Closed);
        };
        if trace && tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(peer = %self.peer, out = %String::from_utf8_lossy(&bytes[..bytes.len().min(512)]));
        }
        let io = async {
            stream.0.write_all(bytes).await?;
            stream.0.flush().await
        };
        match timeout(limit, io).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Broken::Io(e)),
            Err(_) => Err(Broken::Timeout),
        }
    }

    async fn read_reply(&mut self, limit: Duration) -> Result<Reply, Broken> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Broken::Closed);
        };
        let reply = match timeout(limit, read_reply(&mut stream.0)).await {
            Ok(r) => r?,
            Err(_) => return Err(Broken::Timeout),
        };
        tracing::debug!(peer = %self.peer, %reply, "reply");
        Ok(reply)
    }
}

/// How setting the session up failed.
enum Setup {
    Failed(SessionError),
    /// The TLS handshake itself failed (the connection is lost).
    Handshake(SessionError),
}

async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source
        && ip.is_ipv4() == addr.is_ipv4()
    {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Reads one line, without its CRLF (or bare LF), refusing lines over [`MAX_REPLY_LINE`].
async fn read_line<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> Result<(), Broken> {
    line.clear();
    loop {
        let buf = r.fill_buf().await.map_err(Broken::Io)?;
        if buf.is_empty() {
            return Err(Broken::Closed);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(p) => (p + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_REPLY_LINE + 2 {
            return Err(Broken::Malformed(format!(
                "reply line longer than {MAX_REPLY_LINE} octets"
            )));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(());
        }
    }
}

/// Reads one (possibly multi-line) reply: `ddd-text` lines, then `ddd text` (RFC 5321 §4.2.1),
/// parsed by proto ([`Reply::from_received`]).
async fn read_reply<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Reply, Broken> {
    let mut code: Option<u16> = None;
    let mut lines: Vec<String> = Vec::new();
    let mut raw = Vec::with_capacity(128);
    loop {
        if lines.len() >= MAX_REPLY_LINES {
            return Err(Broken::Malformed(format!(
                "reply longer than {MAX_REPLY_LINES} lines"
            )));
        }
        read_line(r, &mut raw).await?;
        let (this, last, text) = replies::parse_received_line(&raw).ok_or_else(|| {
            Broken::Malformed(format!(
                "malformed reply line: {}",
                String::from_utf8_lossy(&raw[..raw.len().min(80)])
            ))
        })?;
        if code.is_some_and(|c| c != this) {
            return Err(Broken::Malformed(format!(
                "reply code changed within a reply: {}",
                String::from_utf8_lossy(&raw)
            )));
        }
        code = Some(this);
        lines.push(text);
        if last {
            break;
        }
    }
    Ok(Reply::from_received(code.unwrap_or_default(), lines))
}

// ---- TLS -----------------------------------------------------------------------------------

pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The client configuration for `policy`: verifying against the configured or the system
/// roots for [`TlsPolicy::Verify`], accepting any certificate otherwise.
fn tls_config(cfg: &ClientConfig, policy: TlsPolicy) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?;
    if policy == TlsPolicy::Dane {
        let records = cfg.dane.as_ref().map(|r| r.to_vec()).unwrap_or_default();
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::dane::DaneVerifier::new(
                records,
                provider(),
            )))
            .with_no_client_auth();
        return Ok(Arc::new(config));
    }
    let config = if policy == TlsPolicy::Verify {
        let roots = match &cfg.roots {
            Some(roots) => roots.clone(),
            None => system_roots()?,
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        static UNVERIFIED: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        return Ok(UNVERIFIED
            .get_or_init(|| {
                Arc::new(
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
                        .with_no_client_auth(),
                )
            })
            .clone());
    };
    Ok(Arc::new(config))
}

/// A client configuration that checks the certificate against the roots and the name but
/// accepts it whatever the result, which goes into `seen`.
fn audit_config(
    cfg: &ClientConfig,
    seen: Arc<Mutex<Option<Result<(), String>>>>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = match &cfg.roots {
        Some(roots) => roots.clone(),
        None => system_roots()?,
    };
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("TLS configuration: {e}"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Audit { inner, seen }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Verifies like the roots would, records the outcome, and accepts the certificate; the
/// handshake's signatures are still checked.
#[derive(Debug)]
struct Audit {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    seen: Arc<Mutex<Option<Result<(), String>>>>,
}

impl ServerCertVerifier for Audit {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map(|_| ())
            .map_err(|e| e.to_string());
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The trusted roots in the PEM bundle at `path` (config `[relay] ca_file`).
pub fn load_roots(path: &std::path::Path) -> Result<Arc<RootCertStore>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut store = RootCertStore::empty();
    for cert in certs.flatten() {
        let _ = store.add(cert);
    }
    if store.is_empty() {
        return Err(format!("no usable certificate in {}", path.display()));
    }
    Ok(Arc::new(store))
}

/// The system's roots ([`SYSTEM_ROOTS`]), read once.
pub fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let certs = CertificateDer::pem_file_iter(SYSTEM_ROOTS)
                .map_err(|e| format!("cannot read {SYSTEM_ROOTS}: {e}"))?;
            let mut store = RootCertStore::empty();
            for cert in certs.flatten() {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(format!("no usable certificate in {SYSTEM_ROOTS}"));
            }
            Ok(Arc::new(store))
        })
        .clone()
}

/// Accepts any server certificate (opportunistic TLS, like Postfix `may` and `encrypt`) but
/// still checks the handshake signatures, so the session is encrypted to whoever holds the
/// key of the certificate it showed.
#[derive(Debug)]
pub(crate) struct AnyCertificate(pub(crate) Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Standard base64 with padding (RFC 4648 §4), for AUTH.
pub(crate) fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(wire: &str) -> Result<Reply, Broken> {
        let mut r = BufReader::new(wire.as_bytes());
        read_reply(&mut r).await
    }

    #[tokio::test]
    async fn multi_line_reply_with_enhanced_code() {
        let r = parse("550-5.1.1 first\r\n550 5.1.1 second\r\n")
            .await
            .unwrap();
        assert_eq!(r.code, 550);
        assert_eq!(r.status, Some(estafeta_proto::Status::BAD_MAILBOX));
        assert_eq!(r.lines, vec!["first", "second"]);
    }

    #[tokio::test]
    async fn reply_without_enhanced_code_or_text() {
        let r = parse("250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
            .await
            .unwrap();
        assert_eq!(r.status, None);
        assert_eq!(r.lines.len(), 3);
        let r = parse("250\r\n").await.unwrap();
        assert_eq!((r.code, r.lines.clone()), (250, vec![String::new()]));
        // A status of another class is text.
        let r = parse("250 5.1.1 odd\n").await.unwrap();
        assert_eq!((r.status, r.text()), (None, "5.1.1 odd".to_string()));
    }

    #[tokio::test]
    async fn malformed_replies() {
        assert!(matches!(
            parse("25O ok\r\n").await,
            Err(Broken::Malformed(_))
        ));
        assert!(matches!(parse("250x\r\n").await, Err(Broken::Malformed(_))));
        assert!(matches!(
            parse("250-a\r\n251 b\r\n").await,
            Err(Broken::Malformed(_))
        ));
        assert!(matches!(parse("250-a\r\n").await, Err(Broken::Closed)));
        let long = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE));
        assert!(matches!(parse(&long).await, Err(Broken::Malformed(_))));
        let exact = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE - 4));
        assert!(parse(&exact).await.is_ok());
        let many = "250-x\r\n".repeat(MAX_REPLY_LINES) + "250 x\r\n";
        assert!(matches!(parse(&many).await, Err(Broken::Malformed(_))));
        let enough = "250-x\r\n".repeat(MAX_REPLY_LINES - 1) + "250 x\r\n";
        assert!(parse(&enough).await.is_ok());
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn extensions() {
        let r = Reply::plain(
            250,
            vec![
                "mx".into(),
                "pipelining".into(),
                "SIZE 1000".into(),
                "AUTH=LOGIN".into(),
                "AUTH PLAIN LOGIN".into(),
                "STARTTLS".into(),
            ],
        );
        let e = Extensions::parse(&r);
        assert!(e.pipelining && e.starttls && !e.dsn);
        assert_eq!(e.size, Some(1000));
        assert_eq!(e.auth, vec!["LOGIN", "PLAIN"]);
    }
}
