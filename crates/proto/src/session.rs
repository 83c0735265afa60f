//! The server side of an SMTP session as a deterministic state machine without I/O.
//!
//! The driver (the listener) feeds it bytes with [`Session::feed`] and takes [`Action`]s
//! from [`Session::poll`] until it returns `None`, which means "flush your replies and read more
//! input". Some actions ask a question (is this recipient acceptable? please store this
//! message); the session then waits, and `poll` returns `None`, until the driver gives the
//! answer with [`Session::rcpt_checked`] or [`Session::enqueued`]. Replies to pipelined
//! commands come out in order (RFC 2920), one `Send` each; the driver batches them.
//!
//! Each verb has a check step (sequence, syntax, limits) that returns the error reply, and a
//! proceed step that changes the state (as OpenSMTPD's smtp_session.c does).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::address::ReversePath;
use crate::command::{Body, Command, MailParams, RcptParams, parse_command};
use crate::data::{DataReceiver, DataStatus};
use crate::envelope::{ClientInfo, Envelope, Recipient};
use crate::reply::{self, Reply};
use crate::trace::{HeaderStats, header_stats};

/// RFC 5321 §4.5.3.1.4 allows 512 octets for a command line, and each extension adds what its
/// parameters need: SIZE (RFC 1870 §3: +26), BODY (+16), SMTPUTF8 (+9), RET and ENVID
/// (RFC 3461 §4: +9 and +107), NOTIFY (+30) and ORCPT (RFC 3461 §4: +507). The longest MAIL is
/// under 700 octets, the longest RCPT about 1050; 1280 leaves room for separators.
pub const COMMAND_LINE_LIMIT: usize = 1280;

/// RFC 4954 §4: an AUTH command line or SASL response may be up to 12288 octets.
pub const AUTH_LINE_LIMIT: usize = 12288;

/// The largest header section accepted (Exim's `header_maxsize` default). No real message
/// comes near it; a larger one only costs memory and time in everything that parses headers
/// (the authentication checks, milters, DKIM signing), so it is refused at the end of data.
pub const MAX_HEADER_SIZE: usize = 1 << 20;

/// How VRFY is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VrfyMode {
    /// `252 2.5.2` for every address: reveals nothing (the default).
    Ambiguous,
    /// `502 5.5.1`: the command is turned off.
    Off,
    /// The truth (250/550) for trusted clients, `252` for the others: the driver decides
    /// ([`Action::Verify`]).
    Trusted,
}

/// When AUTH is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Never (the port-25 MTA without users, or no users file).
    Never,
    /// Only once the session is encrypted (RFC 8314 §3, DESIGN.md decision 6): before TLS,
    /// AUTH is not advertised and gets `538 5.7.11`.
    AfterTls,
}

/// RFC 4954 / draft-murchison-sasl-login: the LOGIN challenges, base64 of "Username:" and
/// "Password:".
const LOGIN_USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// The per-listener settings a session needs. Built once by the driver, shared by sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The name in the greeting, the EHLO reply and Received headers.
    pub hostname: String,
    /// The greeting text after the host name, e.g. `ESMTP estafeta`.
    pub banner: String,
    /// The largest message accepted, in octets (SIZE, RFC 1870).
    pub max_message_size: u64,
    /// The most recipients in one transaction.
    pub max_recipients: usize,
    /// Errors (syntax, sequence, unknown command, refused recipient) before `421` and close.
    pub max_errors: u32,
    /// More `Received:` headers than this is a mail loop: `554 5.4.6`.
    pub max_received_headers: usize,
    /// How VRFY is answered.
    pub vrfy: VrfyMode,
    /// Offer STARTTLS (a certificate is available and the session is not encrypted yet).
    pub starttls: bool,
    /// When AUTH is offered.
    pub auth: AuthMode,
    /// MAIL needs a successful AUTH first (submission, RFC 6409 §4.3): `530 5.7.0`.
    pub require_auth: bool,
    /// Failed AUTH attempts before `421 4.7.0` and close.
    pub max_auth_failures: u32,
    /// Ask the driver whether an authenticated user may use the MAIL FROM address
    /// ([`Action::CheckMail`]).
    pub check_sender: bool,
    /// Record the authenticated user in the envelope, and so in the Received header.
    pub authenticated_header: bool,
    /// EXPN answered for trusted clients (the driver decides); `502 5.5.1` otherwise.
    pub expn_trusted: bool,
    /// Unknown recipients (`5.1.1`) in one session before each further RCPT reply is slowed;
    /// twice as many end the session with `421 4.7.0`. 0 turns this off.
    pub max_unknown_recipients: u32,
}

/// What the session asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this reply (batch it with the following ones; flush when `poll` returns `None`).
    Send(Reply),
    /// Decide whether the authenticated user may send as this reverse path and answer with
    /// [`Session::mail_checked`] (only when `check_sender` is on and the session is
    /// authenticated).
    CheckMail {
        /// The user who authenticated.
        user: String,
        /// The reverse path of MAIL FROM.
        from: ReversePath,
    },
    /// Decide on this recipient and answer with [`Session::rcpt_checked`].
    CheckRcpt(Recipient),
    /// Flush the replies, then run the TLS handshake on the connection and answer with
    /// [`Session::tls_started`] (or close the connection if the handshake fails). Buffered
    /// plaintext has been discarded (RFC 3207 §6; the CVE-2011-0411 class).
    StartTls,
    /// Check these SASL credentials and answer with [`Session::auth_checked`].
    Authenticate(SaslAnswer),
    /// Store this message durably and answer with [`Session::enqueued`].
    Enqueue(Box<Envelope>, Vec<u8>),
    /// Answer VRFY (`expn` false) or EXPN (`expn` true) for this argument and give the reply
    /// with [`Session::verified`]: the truth for a trusted client, `252`/`502` for others.
    Verify {
        /// The argument as the client wrote it.
        argument: String,
        /// EXPN rather than VRFY.
        expn: bool,
    },
    /// Start delivery of the queued mail for this domain (ETRN, RFC 1985) if the client may,
    /// and answer with [`Session::etrn_done`]. The argument has been checked: a domain name
    /// (without the optional leading `@`), lower-cased.
    Etrn(String),
    /// Wait this long before going on (the replies so far are flushed first): slows down
    /// recipient probing.
    Pause(std::time::Duration),
    /// Flush what was sent and close the connection.
    Close,
}

/// A SASL mechanism the session offers (RFC 4954).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// PLAIN (RFC 4616): one response.
    Plain,
    /// LOGIN (draft-murchison-sasl-login): the user name, then the password.
    Login,
}

impl Mechanism {
    /// The mechanism of `AUTH name`, case-insensitively; `None` for one not offered.
    pub fn parse(name: &str) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case("PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    /// `PLAIN` or `LOGIN`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// What the client answered, as it sent it (base64), per mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslAnswer {
    /// PLAIN's response: `authzid NUL authcid NUL passwd` (RFC 4616 §2).
    Plain(String),
    /// LOGIN's two responses.
    Login {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
}

impl SaslAnswer {
    /// The mechanism answered.
    pub fn mechanism(&self) -> Mechanism {
        match self {
            SaslAnswer::Plain(_) => Mechanism::Plain,
            SaslAnswer::Login { .. } => Mechanism::Login,
        }
    }

    /// The responses in the order sent.
    pub fn responses(&self) -> Vec<&str> {
        match self {
            SaslAnswer::Plain(r) => vec![r],
            SaslAnswer::Login { user, password } => vec![user, password],
        }
    }
}

/// Which inactivity timeout applies now (RFC 5321 §4.5.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// Waiting for a command (5 minutes by default).
    Command,
    /// Waiting for message content (10 minutes by default: the data block timeout).
    Data,
}

/// How the incoming bytes are read at this moment.
#[derive(Debug)]
enum Input {
    /// Command lines.
    Command,
    /// SASL responses to `334` challenges (RFC 4954 §4): for LOGIN, the user name once it
    /// came.
    Sasl {
        mechanism: Mechanism,
        user: Option<String>,
    },
    /// The content of DATA.
    Data(DataReceiver),
    /// The bytes of a BDAT chunk: how many are still to come, whether it is the last chunk,
    /// and the error reply to give once it is consumed, if the chunk is refused.
    Bdat {
        remaining: u64,
        size: u64,
        last: bool,
        refusal: Option<Reply>,
    },
}

/// The mail transaction in progress (RFC 5321 §3.3).
#[derive(Debug)]
struct Transaction {
    from: ReversePath,
    params: MailParams,
    rcpts: Vec<Recipient>,
    /// RCPT commands tried, accepted or not (to tell "need RCPT" from "no valid recipients").
    rcpt_attempts: usize,
    /// The content received so far (since the last [`Session::take_body`]).
    body: Vec<u8>,
    /// Octets of content handed to the driver by [`Session::take_body`].
    taken: u64,
    /// The header section's figures, read before the first [`Session::take_body`].
    head: Option<HeaderStats>,
    /// True once a BDAT chunk was received (DATA is then out of sequence).
    chunking: bool,
}

/// What the session waits for from the driver.
#[derive(Debug)]
enum Waiting {
    Nothing,
    Verify,
    Etrn,
    Mail(ReversePath, MailParams),
    Rcpt(Recipient),
    Enqueue,
    Tls,
    Auth,
}

/// One SMTP server session.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<SessionConfig>,
    peer: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<String>,
    auth_user: Option<String>,
    /// The uid of a local submission (see [`Session::local`]).
    local_uid: Option<u32>,
    /// The client's verified reverse DNS name, for the Received header.
    client_name: Option<String>,
    auth_failures: u32,
    unknown_rcpts: u32,
    txn: Option<Box<Transaction>>,
    input: Input,
    buf: Vec<u8>,
    pos: usize,
    /// How many bytes from `pos` on are known to hold no LF: a command line that arrives a
    /// byte at a time is searched once, not once per byte (which was quadratic in its length).
    scanned: usize,
    /// Inside a command line longer than the limit: discard up to its LF.
    discarding: bool,
    waiting: Waiting,
    out: VecDeque<Action>,
    errors: u32,
    closed: bool,
}

impl Session {
    /// A new session for a client at `peer`; the first action is the greeting.
    pub fn new(cfg: Arc<SessionConfig>, peer: SocketAddr) -> Self {
        Self::with_tls(cfg, peer, None)
    }

    /// A new session for a local submission over the submit socket by the user `uid` (as the
    /// kernel reports it, SO_PEERCRED). The peer is 127.0.0.1 port 0; the Received header
    /// names the user: `by <host> (estafeta, from userid <uid>)`.
    pub fn local(cfg: Arc<SessionConfig>, uid: u32) -> Self {
        let mut s = Self::with_tls(cfg, SocketAddr::from(([127, 0, 0, 1], 0)), None);
        s.local_uid = Some(uid);
        s
    }

    /// A new session on a connection that is already encrypted (implicit TLS, RFC 8314 §3.3):
    /// `tls` describes it (version and cipher) for the Received header.
    pub fn with_tls(cfg: Arc<SessionConfig>, peer: SocketAddr, tls: Option<String>) -> Self {
        let mut s = Session {
            peer,
            helo: None,
            esmtp: false,
            tls,
            auth_user: None,
            local_uid: None,
            client_name: None,
            auth_failures: 0,
            unknown_rcpts: 0,
            txn: None,
            input: Input::Command,
            buf: Vec::new(),
            pos: 0,
            scanned: 0,
            discarding: false,
            waiting: Waiting::Nothing,
            out: VecDeque::new(),
            errors: 0,
            closed: false,
            cfg,
        };
        let greeting = reply::greeting(&s.cfg.hostname, &s.cfg.banner);
        s.send(greeting);
        s
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The name the client gave in HELO/EHLO, if any.
    pub fn helo_name(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// Records the client's forward-confirmed reverse DNS name (looked up by the driver); the
    /// Received header names it.
    pub fn set_client_name(&mut self, name: Option<String>) {
        self.client_name = name;
    }

    /// The client's verified reverse DNS name, when the driver found one.
    pub fn client_name(&self) -> Option<&str> {
        self.client_name.as_deref()
    }

    /// The reverse path of the transaction in progress (after MAIL FROM).
    pub fn mail_from(&self) -> Option<&crate::ReversePath> {
        self.txn.as_ref().map(|t| &t.from)
    }

    /// The content received so far, once at least `min` octets of it wait: the driver writes
    /// them to a file, so that a large message is never whole in memory. The content that
    /// arrives afterwards, up to the end of the message, is what [`Action::Enqueue`] carries;
    /// the message is the concatenation of what was taken, in order, and that.
    ///
    /// Nothing is taken before the header section is complete (or over its limit, and the
    /// message refused), so that the session can still judge it (hop count, size).
    pub fn take_body(&mut self, min: usize) -> Option<Vec<u8>> {
        let txn = self.txn.as_mut()?;
        if txn.body.len() < min.max(1) {
            return None;
        }
        if txn.head.is_none() {
            let stats = header_stats(&txn.body);
            if stats.size >= txn.body.len() && txn.body.len() <= MAX_HEADER_SIZE {
                // The empty line after the header section has not arrived yet.
                return None;
            }
            txn.head = Some(stats);
        }
        txn.taken += txn.body.len() as u64;
        Some(std::mem::take(&mut txn.body))
    }

    /// Octets of the transaction's content handed over by [`Session::take_body`] so far: 0
    /// in a new transaction (what the driver holds from an earlier one is not this one's).
    pub fn body_taken(&self) -> u64 {
        self.txn.as_ref().map_or(0, |t| t.taken)
    }

    /// Recipients accepted so far in the transaction in progress.
    pub fn rcpt_count(&self) -> usize {
        self.txn.as_ref().map_or(0, |t| t.rcpts.len())
    }

    /// The user who authenticated, if any.
    pub fn auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// True when the session is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True once the session has decided to close (after QUIT, a fatal error or a timeout).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Which timeout applies while waiting for input now.
    pub fn timeout_kind(&self) -> Timeout {
        match self.input {
            Input::Command | Input::Sasl { .. } => Timeout::Command,
            Input::Data(_) | Input::Bdat { .. } => Timeout::Data,
        }
    }

    /// True when bytes are buffered that have not been processed yet (for example pipelined
    /// commands behind a question the driver has not answered).
    pub fn has_buffered_input(&self) -> bool {
        self.pos < self.buf.len()
    }

    /// Adds bytes read from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.closed {
            return;
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 4096 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next action, or `None` when the session needs more input or an answer.
    pub fn poll(&mut self) -> Option<Action> {
        loop {
            if let Some(a) = self.out.pop_front() {
                return Some(a);
            }
            if self.closed || !matches!(self.waiting, Waiting::Nothing) {
                return None;
            }
            if !self.step() {
                // Out of input: give memory back after a large message.
                if self.pos == self.buf.len() {
                    self.buf.clear();
                    self.pos = 0;
                    if self.buf.capacity() > 16 * 1024 {
                        self.buf = Vec::new();
                    }
                }
                return None;
            }
        }
    }

    /// The answer to [`Action::CheckMail`]: `Ok` starts the transaction, `Err` refuses MAIL.
    pub fn mail_checked(&mut self, verdict: Result<(), Reply>) {
        let Waiting::Mail(from, params) = std::mem::replace(&mut self.waiting, Waiting::Nothing)
        else {
            debug_assert!(false, "mail_checked without a pending MAIL");
            return;
        };
        match verdict {
            Ok(()) => self.start_transaction(from, params),
            Err(r) => self.error(r),
        }
    }

    /// The answer to [`Action::StartTls`]: the handshake succeeded; `description` (version
    /// and cipher) goes into the Received header. The session starts over (RFC 3207 §4.2):
    /// the client must say EHLO again.
    pub fn tls_started(&mut self, description: String) {
        if !matches!(self.waiting, Waiting::Tls) {
            debug_assert!(false, "tls_started without STARTTLS");
            return;
        }
        self.waiting = Waiting::Nothing;
        self.tls = Some(description);
        self.helo = None;
        self.esmtp = false;
        self.txn = None;
        self.auth_user = None;
        self.buf.clear();
        self.pos = 0;
        self.scanned = 0;
    }

    /// The answer to [`Action::Authenticate`]: the user name that authenticated, or the reply
    /// to give (`535 5.7.8` for bad credentials, `454 4.7.0` for a temporary problem,
    /// `501 5.5.2` for an undecodable response).
    pub fn auth_checked(&mut self, result: Result<String, Reply>) {
        if !matches!(self.waiting, Waiting::Auth) {
            debug_assert!(false, "auth_checked without AUTH");
            return;
        }
        self.waiting = Waiting::Nothing;
        match result {
            Ok(user) => {
                self.auth_user = Some(user);
                self.send(reply::auth_ok());
            }
            Err(r) => {
                let failed = r.code == 535;
                self.send(r);
                if failed {
                    self.auth_failures += 1;
                    if self.auth_failures >= self.cfg.max_auth_failures {
                        let r = reply::too_many_auth_failures(&self.cfg.hostname);
                        self.send(r);
                        self.close();
                    }
                }
            }
        }
    }

    /// The answer to [`Action::CheckRcpt`]: `Ok` accepts the recipient, `Err` refuses it with
    /// that reply.
    pub fn rcpt_checked(&mut self, verdict: Result<(), Reply>) {
        let Waiting::Rcpt(rcpt) = std::mem::replace(&mut self.waiting, Waiting::Nothing) else {
            debug_assert!(false, "rcpt_checked without a pending RCPT");
            return;
        };
        match verdict {
            Ok(()) => {
                if let Some(txn) = self.txn.as_mut() {
                    txn.rcpts.push(rcpt);
                }
                self.send(reply::rcpt_ok());
            }
            Err(r) => {
                let unknown = r.status == Some(crate::reply::Status::new(5, 1, 1));
                let limit = self.cfg.max_unknown_recipients;
                if unknown && limit > 0 {
                    self.unknown_rcpts += 1;
                    if self.unknown_rcpts > limit {
                        // Probing for user names: each further answer takes longer.
                        let excess = (self.unknown_rcpts - limit).min(5);
                        self.out
                            .push_back(Action::Pause(std::time::Duration::from_secs(u64::from(
                                excess,
                            ))));
                    }
                    if self.unknown_rcpts >= limit.saturating_mul(2) {
                        self.send(r);
                        let r = reply::too_many_unknown_recipients(&self.cfg.hostname);
                        self.send(r);
                        self.close();
                        return;
                    }
                }
                // A refused recipient is a policy answer, not a protocol error: it does not
                // count towards max_errors (probing for users has its own limit above).
                self.send_closing(r)
            }
        }
    }

    /// The answer to [`Action::Verify`]: the reply to give.
    pub fn verified(&mut self, reply: Reply) {
        if !matches!(self.waiting, Waiting::Verify) {
            debug_assert!(false, "verified without VRFY/EXPN");
            return;
        }
        self.waiting = Waiting::Nothing;
        if reply.is_error() {
            self.error(reply);
        } else {
            self.send(reply);
        }
    }

    /// The answer to [`Action::Etrn`]: the reply to give.
    pub fn etrn_done(&mut self, reply: Reply) {
        if !matches!(self.waiting, Waiting::Etrn) {
            debug_assert!(false, "etrn_done without ETRN");
            return;
        }
        self.waiting = Waiting::Nothing;
        self.send(reply);
    }

    /// The answer to [`Action::Enqueue`]: the queue ID, or the reply to give instead
    /// (a temporary failure when the spool could not store the message).
    pub fn enqueued(&mut self, result: Result<String, Reply>) {
        if !matches!(self.waiting, Waiting::Enqueue) {
            debug_assert!(false, "enqueued without a pending message");
            return;
        }
        self.waiting = Waiting::Nothing;
        self.txn = None;
        match result {
            Ok(id) => self.send(reply::queued(&id)),
            Err(r) => self.send_closing(r),
        }
    }

    /// Sends a refusal given by the driver; a `421` (a milter that asks to end the
    /// connection, for example) closes the session, as RFC 5321 §3.8 says it does.
    fn send_closing(&mut self, r: Reply) {
        let closing = r.code == 421;
        self.send(r);
        if closing {
            self.close();
        }
    }

    /// The client was silent longer than the timeout: say so and close.
    pub fn timed_out(&mut self) {
        let r = reply::timeout(&self.cfg.hostname);
        self.send(r);
        self.close();
    }

    /// The server is shutting down: say so and close.
    pub fn shutting_down(&mut self) {
        let r = reply::shutting_down(&self.cfg.hostname);
        self.send(r);
        self.close();
    }

    fn send(&mut self, r: Reply) {
        self.out.push_back(Action::Send(r));
    }

    fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.out.push_back(Action::Close);
        }
    }

    /// Sends an error reply and counts it; too many errors end the session.
    fn error(&mut self, r: Reply) {
        self.send(r);
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            let r = reply::too_many_errors(&self.cfg.hostname);
            self.send(r);
            self.close();
        }
    }

    /// Processes some input. Returns false when more input is needed.
    fn step(&mut self) -> bool {
        match &mut self.input {
            Input::Command | Input::Sasl { .. } => self.step_command(),
            Input::Data(receiver) => {
                let txn = self.txn.as_mut().expect("DATA without a transaction");
                match receiver.feed(&self.buf[self.pos..], &mut txn.body) {
                    DataStatus::More => {
                        self.pos = self.buf.len();
                        false
                    }
                    DataStatus::Done(n) => {
                        self.pos += n;
                        let overflow = receiver.overflowed();
                        self.input = Input::Command;
                        self.finish_message(overflow);
                        true
                    }
                }
            }
            Input::Bdat {
                remaining,
                size,
                last,
                refusal,
            } => {
                let avail = (self.buf.len() - self.pos) as u64;
                let take = avail.min(*remaining) as usize;
                if refusal.is_none()
                    && let Some(txn) = self.txn.as_mut()
                {
                    txn.body
                        .extend_from_slice(&self.buf[self.pos..self.pos + take]);
                }
                self.pos += take;
                *remaining -= take as u64;
                if *remaining > 0 {
                    return false;
                }
                let (size, last, refusal) = (*size, *last, refusal.take());
                self.input = Input::Command;
                match refusal {
                    Some(r) => {
                        // RFC 3030 §2: after a failed chunk the transaction is over.
                        self.txn = None;
                        self.error(r);
                    }
                    None if last => self.finish_message(false),
                    None => self.send(reply::chunk_ok(size)),
                }
                true
            }
        }
    }

    fn step_command(&mut self) -> bool {
        let pending = &self.buf[self.pos..];
        let from = self.scanned.min(pending.len());
        let Some(lf) = memchr::memchr(b'\n', &pending[from..]).map(|i| from + i) else {
            self.scanned = pending.len();
            if pending.len() > AUTH_LINE_LIMIT {
                // RFC 5321 §4.5.3.1.4: too long. Drop what we have and the rest of the line.
                self.discarding = true;
                self.pos = self.buf.len();
                self.scanned = 0;
            }
            return false;
        };
        self.scanned = 0;
        let mut line = &pending[..lf];
        self.pos += lf + 1;
        if std::mem::take(&mut self.discarding) {
            self.error(reply::line_too_long());
            return true;
        }
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let sasl = matches!(self.input, Input::Sasl { .. });
        let is_auth = sasl || (line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH "));
        let limit = if is_auth {
            AUTH_LINE_LIMIT
        } else {
            COMMAND_LINE_LIMIT
        };
        if line.len() + 2 > limit {
            self.error(reply::line_too_long());
            return true;
        }
        if sasl {
            let line = String::from_utf8_lossy(line).into_owned();
            self.sasl_response(line);
            return true;
        }
        match parse_command(line) {
            Err(e) => self.error(e.reply),
            Ok(cmd) => self.command(cmd),
        }
        true
    }

    /// One line of a SASL exchange.
    fn sasl_response(&mut self, line: String) {
        let Input::Sasl { mechanism, user } = std::mem::replace(&mut self.input, Input::Command)
        else {
            return;
        };
        if line == "*" {
            // RFC 4954 §4: the client cancels.
            self.send(reply::auth_aborted());
            return;
        }
        match (mechanism, user) {
            (Mechanism::Plain, _) => self.authenticate(SaslAnswer::Plain(line)),
            (Mechanism::Login, None) => {
                self.send(reply::auth_continue(LOGIN_PASSWORD_CHALLENGE));
                self.input = Input::Sasl {
                    mechanism,
                    user: Some(line),
                };
            }
            (Mechanism::Login, Some(user)) => self.authenticate(SaslAnswer::Login {
                user,
                password: line,
            }),
        }
    }

    fn authenticate(&mut self, answer: SaslAnswer) {
        self.out.push_back(Action::Authenticate(answer));
        self.waiting = Waiting::Auth;
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Helo(name) => {
                self.helo = Some(name);
                self.esmtp = false;
                self.txn = None;
                let r = reply::helo(&self.cfg.hostname);
                self.send(r);
            }
            Command::Ehlo(name) => {
                // RFC 5321 §4.1.4: EHLO resets the state as RSET does.
                self.helo = Some(name);
                self.esmtp = true;
                self.txn = None;
                let r = reply::ehlo(&self.cfg.hostname, &self.extensions());
                self.send(r);
            }
            Command::Mail(from, params) => match self.check_mail(&from, &params) {
                Err(r) => self.error(r),
                Ok(()) => match (&self.auth_user, self.cfg.check_sender) {
                    (Some(user), true) => {
                        self.out.push_back(Action::CheckMail {
                            user: user.clone(),
                            from: from.clone(),
                        });
                        self.waiting = Waiting::Mail(from, params);
                    }
                    _ => self.start_transaction(from, params),
                },
            },
            Command::Rcpt(path, params) => match self.check_rcpt(&path, &params) {
                Err(r) => {
                    // A recipient limit reply is not the client's error.
                    if r.code == 452 {
                        self.send(r)
                    } else {
                        self.error(r)
                    }
                }
                Ok(()) => {
                    let rcpt = Recipient { path, params };
                    if let Some(txn) = self.txn.as_mut() {
                        txn.rcpt_attempts += 1;
                    }
                    self.out.push_back(Action::CheckRcpt(rcpt.clone()));
                    self.waiting = Waiting::Rcpt(rcpt);
                }
            },
            Command::Data => match self.check_data() {
                Err(r) => self.error(r),
                Ok(()) => {
                    self.input = Input::Data(DataReceiver::new(self.cfg.max_message_size));
                    self.send(reply::start_data());
                }
            },
            Command::Bdat { size, last } => {
                let refusal = self.check_bdat(size).err();
                if let (None, Some(txn)) = (&refusal, self.txn.as_mut()) {
                    txn.chunking = true;
                    txn.body.reserve(size.min(1 << 20) as usize);
                }
                self.input = Input::Bdat {
                    remaining: size,
                    size,
                    last,
                    refusal,
                };
            }
            Command::Rset => {
                self.txn = None;
                self.send(reply::ok());
            }
            Command::Noop => self.send(reply::ok()),
            Command::Quit => {
                self.send(reply::bye());
                self.close();
            }
            Command::Vrfy(argument) => match self.cfg.vrfy {
                VrfyMode::Ambiguous => self.send(reply::vrfy_ambiguous()),
                VrfyMode::Off => self.error(reply::vrfy_disabled()),
                VrfyMode::Trusted => {
                    self.out.push_back(Action::Verify {
                        argument,
                        expn: false,
                    });
                    self.waiting = Waiting::Verify;
                }
            },
            Command::Expn(argument) => {
                if self.cfg.expn_trusted {
                    self.out.push_back(Action::Verify {
                        argument,
                        expn: true,
                    });
                    self.waiting = Waiting::Verify;
                } else {
                    self.error(reply::expn_disabled())
                }
            }
            Command::Help => self.send(reply::help()),
            Command::StartTls => match self.check_starttls() {
                Err(r) => self.error(r),
                Ok(()) => {
                    self.send(reply::ready_to_start_tls());
                    // RFC 3207 §6: whatever the client pipelined after STARTTLS in plaintext
                    // is thrown away, never executed.
                    self.pos = self.buf.len();
                    self.out.push_back(Action::StartTls);
                    self.waiting = Waiting::Tls;
                }
            },
            Command::Auth { mechanism, initial } => match self.check_auth(&mechanism) {
                Err(r) => self.error(r),
                Ok(mechanism) => match (mechanism, initial) {
                    // RFC 4954 §4: "=" is an empty initial response.
                    (Mechanism::Plain, Some(i)) => {
                        let i = if i == "=" { String::new() } else { i };
                        self.authenticate(SaslAnswer::Plain(i));
                    }
                    (Mechanism::Plain, None) => {
                        self.send(reply::auth_continue(""));
                        self.input = Input::Sasl {
                            mechanism,
                            user: None,
                        };
                    }
                    (Mechanism::Login, Some(user)) => {
                        self.send(reply::auth_continue(LOGIN_PASSWORD_CHALLENGE));
                        self.input = Input::Sasl {
                            mechanism,
                            user: Some(user),
                        };
                    }
                    (Mechanism::Login, None) => {
                        self.send(reply::auth_continue(LOGIN_USERNAME_CHALLENGE));
                        self.input = Input::Sasl {
                            mechanism,
                            user: None,
                        };
                    }
                },
            },
            Command::Etrn(arg) => {
                if self.helo.is_none() {
                    self.error(reply::bad_sequence("send HELO/EHLO first"));
                } else if self.txn.is_some() {
                    // RFC 1985 §3: not inside a mail transaction.
                    self.error(reply::bad_sequence("MAIL transaction in progress"));
                } else if arg.starts_with('#') {
                    // A queue name, not a domain: not run here.
                    self.send(reply::etrn_unable(&arg));
                } else {
                    let domain = arg.strip_prefix('@').unwrap_or(&arg);
                    if crate::address::is_domain_name(domain) {
                        self.out
                            .push_back(Action::Etrn(domain.to_ascii_lowercase()));
                        self.waiting = Waiting::Etrn;
                    } else {
                        self.error(reply::syntax("ETRN domain"));
                    }
                }
            }
            Command::Http => {
                self.send(reply::forbidden_command());
                self.close();
            }
        }
    }

    /// The EHLO keywords, in the order they are advertised.
    fn extensions(&self) -> Vec<String> {
        let mut ext = vec![
            "PIPELINING".to_string(),
            format!("SIZE {}", self.cfg.max_message_size),
        ];
        if self.cfg.starttls && self.tls.is_none() {
            ext.push("STARTTLS".to_string());
        }
        if self.auth_offered() && self.auth_user.is_none() {
            ext.push("AUTH PLAIN LOGIN".to_string());
        }
        ext.extend([
            "ETRN".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "8BITMIME".to_string(),
            "DSN".to_string(),
            "SMTPUTF8".to_string(),
            "CHUNKING".to_string(),
        ]);
        // RFC 8689 §4.1: only where the session itself is protected by TLS.
        if self.tls.is_some() {
            ext.push("REQUIRETLS".to_string());
        }
        ext
    }

    /// True when AUTH may be used now.
    fn auth_offered(&self) -> bool {
        match self.cfg.auth {
            AuthMode::Never => false,
            AuthMode::AfterTls => self.tls.is_some(),
        }
    }

    fn check_starttls(&self) -> Result<(), Reply> {
        if self.tls.is_some() {
            return Err(reply::bad_sequence("TLS already active"));
        }
        if !self.cfg.starttls {
            return Err(reply::not_implemented());
        }
        if self.txn.is_some() {
            return Err(reply::bad_sequence("MAIL transaction in progress"));
        }
        Ok(())
    }

    fn check_auth(&self, mechanism: &str) -> Result<Mechanism, Reply> {
        if self.cfg.auth == AuthMode::Never {
            return Err(reply::not_implemented());
        }
        if self.helo.is_none() || !self.esmtp {
            return Err(reply::bad_sequence("send EHLO first"));
        }
        if self.auth_user.is_some() {
            // RFC 4954 §4: once authenticated, AUTH is refused.
            return Err(reply::bad_sequence("already authenticated"));
        }
        if self.txn.is_some() {
            return Err(reply::bad_sequence("MAIL transaction in progress"));
        }
        if !self.auth_offered() {
            return Err(reply::encryption_required());
        }
        Mechanism::parse(mechanism).ok_or_else(reply::auth_unknown_mechanism)
    }

    fn start_transaction(&mut self, from: ReversePath, params: MailParams) {
        self.txn = Some(Box::new(Transaction {
            from,
            params,
            rcpts: Vec::new(),
            rcpt_attempts: 0,
            body: Vec::new(),
            taken: 0,
            head: None,
            chunking: false,
        }));
        self.send(reply::mail_ok());
    }

    fn check_mail(&self, from: &ReversePath, params: &MailParams) -> Result<(), Reply> {
        if self.helo.is_none() {
            return Err(reply::bad_sequence("send HELO/EHLO first"));
        }
        if self.txn.is_some() {
            return Err(reply::bad_sequence("nested MAIL command"));
        }
        if self.cfg.require_auth && self.auth_user.is_none() {
            return Err(reply::auth_required());
        }
        // RFC 4954 §5: AUTH= is a parameter of the AUTH extension.
        if params.auth.is_some() && !self.auth_offered() {
            return Err(reply::unsupported_parameter("AUTH"));
        }
        // RFC 5321 §4.1.1.11: parameters need the extension, and extensions need EHLO.
        if !self.esmtp && *params != MailParams::default() {
            return Err(reply::unsupported_parameter("ESMTP parameters need EHLO"));
        }
        // REQUIRETLS is offered only inside TLS (RFC 8689 §4.1).
        if params.requiretls && self.tls.is_none() {
            return Err(reply::requiretls_needs_tls());
        }
        // BINARYMIME is not advertised (RFC 3030 §3).
        if params.body == Some(Body::BinaryMime) {
            return Err(reply::unsupported_parameter("BODY=BINARYMIME"));
        }
        if let ReversePath::Mailbox(m) = from
            && m.is_utf8()
            && !params.smtputf8
        {
            return Err(reply::non_ascii_address());
        }
        // RFC 1870 §6.1: refuse at MAIL when the declared size is over the limit.
        if params.size.is_some_and(|s| s > self.cfg.max_message_size) {
            return Err(reply::size_exceeds_limit());
        }
        Ok(())
    }

    fn check_rcpt(
        &self,
        path: &crate::address::ForwardPath,
        params: &RcptParams,
    ) -> Result<(), Reply> {
        let Some(txn) = self.txn.as_ref() else {
            return Err(reply::bad_sequence("need MAIL command"));
        };
        if !self.esmtp && *params != RcptParams::default() {
            return Err(reply::unsupported_parameter("ESMTP parameters need EHLO"));
        }
        if path.mailbox.is_utf8() && !txn.params.smtputf8 {
            return Err(reply::non_ascii_address());
        }
        if txn.rcpts.len() >= self.cfg.max_recipients {
            return Err(reply::too_many_recipients());
        }
        Ok(())
    }

    fn check_data(&self) -> Result<(), Reply> {
        let Some(txn) = self.txn.as_ref() else {
            return Err(reply::bad_sequence("need MAIL command"));
        };
        if txn.chunking {
            // RFC 3030 §2: DATA and BDAT do not mix in one transaction.
            return Err(reply::bad_sequence("DATA after BDAT"));
        }
        if txn.rcpts.is_empty() {
            return Err(if txn.rcpt_attempts > 0 {
                reply::no_valid_recipients()
            } else {
                reply::bad_sequence("need RCPT command")
            });
        }
        Ok(())
    }

    fn check_bdat(&self, size: u64) -> Result<(), Reply> {
        let Some(txn) = self.txn.as_ref() else {
            return Err(reply::bad_sequence("need MAIL command"));
        };
        if txn.rcpts.is_empty() {
            return Err(if txn.rcpt_attempts > 0 {
                reply::no_valid_recipients()
            } else {
                reply::bad_sequence("need RCPT command")
            });
        }
        if (txn.taken + txn.body.len() as u64).saturating_add(size) > self.cfg.max_message_size {
            return Err(reply::message_too_big());
        }
        Ok(())
    }

    /// The `with` protocol name for the Received header (RFC 3848, RFC 6531 §3.7.3).
    fn protocol(&self, smtputf8: bool) -> String {
        let base = match (smtputf8, self.esmtp) {
            (true, _) => "UTF8SMTP",
            (false, true) => "ESMTP",
            (false, false) => "SMTP",
        };
        let mut p = base.to_string();
        if self.esmtp || smtputf8 {
            if self.tls.is_some() {
                p.push('S');
            }
            if self.auth_user.is_some() {
                p.push('A');
            }
        }
        p
    }

    /// The end of DATA or of the last BDAT chunk: refuse, or ask the driver to store it.
    fn finish_message(&mut self, overflow: bool) {
        if overflow {
            self.txn = None;
            self.error(reply::message_too_big());
            return;
        }
        let Some(txn) = self.txn.as_mut() else {
            return;
        };
        let stats = txn.head.unwrap_or_else(|| header_stats(&txn.body));
        if stats.received > self.cfg.max_received_headers {
            self.txn = None;
            self.send(reply::too_many_hops(stats.received));
            return;
        }
        if stats.size > MAX_HEADER_SIZE {
            self.txn = None;
            self.send(reply::header_too_big(MAX_HEADER_SIZE));
            return;
        }
        let body = std::mem::take(&mut txn.body);
        let from = txn.from.clone();
        let params = txn.params.clone();
        let rcpts = std::mem::take(&mut txn.rcpts);
        let protocol = self.protocol(params.smtputf8);
        let envelope = Envelope {
            client: ClientInfo {
                ip: canonical_ip(self.peer.ip()),
                port: self.peer.port(),
                helo: self.helo.clone().unwrap_or_default(),
                protocol,
                tls: self.tls.clone(),
                auth: if self.cfg.authenticated_header {
                    self.auth_user.clone()
                } else {
                    None
                },
                local_uid: self.local_uid,
                name: self.client_name.clone(),
            },
            from,
            params,
            rcpts,
        };
        self.out
            .push_back(Action::Enqueue(Box::new(envelope), body));
        self.waiting = Waiting::Enqueue;
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) as the IPv4 address it stands for.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}
