//! The one table of SMTP replies: every reply code and enhanced status code the server sends.
//!
//! No other crate writes a reply by hand. Each constructor names the situation and cites where the
//! code comes from: RFC 5321 (basic codes), RFC 3463 (enhanced status codes, registered in
//! RFC 5248), and the RFC of the extension concerned.

use std::fmt;

/// An enhanced mail system status code (RFC 3463): `class.subject.detail`, e.g. `2.1.5`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    /// 2 success, 4 persistent transient failure, 5 permanent failure.
    pub class: u8,
    /// The subject: 0 other, 1 addressing, 2 mailbox, 3 mail system, 4 network/routing,
    /// 5 mail delivery protocol, 6 message content, 7 security or policy.
    pub subject: u16,
    /// The detail within the subject.
    pub detail: u16,
}

impl Status {
    /// Builds a status code from its three parts.
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Status {
            class,
            subject,
            detail,
        }
    }

    /// `2.0.0` Other undefined status: success (RFC 3463 §3.1).
    pub const SUCCESS: Status = Status::new(2, 0, 0);
    /// `4.0.0` Other undefined status, temporary: a failure that says no more.
    pub const TEMPORARY: Status = Status::new(4, 0, 0);
    /// `5.0.0` Other undefined status, permanent: a failure that says no more.
    pub const PERMANENT: Status = Status::new(5, 0, 0);
    /// `5.1.1` Bad destination mailbox address (RFC 3463 §3.2).
    pub const BAD_MAILBOX: Status = Status::new(5, 1, 1);
    /// `5.1.2` Bad destination system address: no such domain (RFC 3463 §3.2).
    pub const BAD_SYSTEM: Status = Status::new(5, 1, 2);
    /// `5.1.3` Bad destination mailbox address syntax (RFC 3463 §3.2).
    pub const BAD_MAILBOX_SYNTAX: Status = Status::new(5, 1, 3);
    /// `5.1.10` Recipient address has null MX (RFC 7505 §4.2).
    pub const NULL_MX: Status = Status::new(5, 1, 10);
    /// `5.2.0` Other or undefined mailbox status (RFC 3463 §3.3).
    pub const MAILBOX_OTHER: Status = Status::new(5, 2, 0);
    /// `4.3.0` Other or undefined mail system status, temporary (RFC 3463 §3.4).
    pub const SYSTEM_TEMPORARY: Status = Status::new(4, 3, 0);
    /// `5.3.0` Other or undefined mail system status (RFC 3463 §3.4).
    pub const SYSTEM_OTHER: Status = Status::new(5, 3, 0);
    /// `5.3.5` System incorrectly configured (RFC 3463 §3.4).
    pub const SYSTEM_MISCONFIGURED: Status = Status::new(5, 3, 5);
    /// `4.4.3` Directory server failure: DNS could not answer (RFC 3463 §3.5).
    pub const DIRECTORY_FAILURE: Status = Status::new(4, 4, 3);
    /// `5.4.4` Unable to route (RFC 3463 §3.5).
    pub const UNABLE_TO_ROUTE: Status = Status::new(5, 4, 4);
    /// `5.4.6` Routing loop detected (RFC 3463 §3.5).
    pub const ROUTING_LOOP: Status = Status::new(5, 4, 6);
    /// `5.4.7` Delivery time expired (RFC 3463 §3.5).
    pub const EXPIRED: Status = Status::new(5, 4, 7);
    /// `5.5.0` Other or undefined protocol status (RFC 3463 §3.6).
    pub const PROTOCOL_OTHER: Status = Status::new(5, 5, 0);
    /// `5.6.0` Other or undefined media error: the content (RFC 3463 §3.7).
    pub const MEDIA_OTHER: Status = Status::new(5, 6, 0);
    /// `4.7.0` Other or undefined security status, temporary (RFC 3463 §3.8).
    pub const SECURITY_TEMPORARY: Status = Status::new(4, 7, 0);
    /// `4.7.10` Encryption needed, temporary (RFC 5248's registry, from RFC 4954 §6).
    pub const ENCRYPTION_NEEDED_TEMPORARY: Status = Status::new(4, 7, 10);
    /// `5.7.0` Other or undefined security status (RFC 3463 §3.8).
    pub const SECURITY_OTHER: Status = Status::new(5, 7, 0);
    /// `5.7.10` Encryption needed (RFC 5248's registry): a command that needs TLS outside it.
    pub const ENCRYPTION_NEEDED: Status = Status::new(5, 7, 10);
    /// `5.7.30` REQUIRETLS support required (RFC 8689 §6): the message asked for REQUIRETLS
    /// and no next hop can meet it.
    pub const REQUIRETLS_SUPPORT: Status = Status::new(5, 7, 30);
    /// `4.7.30`: REQUIRETLS cannot be judged now (a lookup or policy fetch failed).
    pub const REQUIRETLS_SUPPORT_TEMPORARY: Status = Status::new(4, 7, 30);

    /// The undefined status of a reply code's class (`4.0.0` for a 4xx, `5.0.0` otherwise):
    /// what a failure reply without an enhanced status code stands for.
    pub fn of_code(code: u16) -> Status {
        match code / 100 {
            2 => Status::SUCCESS,
            4 => Status::TEMPORARY,
            _ => Status::PERMANENT,
        }
    }

    /// Parses `"4.7.0"`-style text.
    pub fn parse(text: &str) -> Option<Status> {
        let mut it = text.split('.');
        let class: u8 = it.next()?.parse().ok()?;
        let subject: u16 = it.next()?.parse().ok()?;
        let detail: u16 = it.next()?.parse().ok()?;
        if it.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
            return None;
        }
        Some(Status::new(class, subject, detail))
    }
}

impl std::str::FromStr for Status {
    type Err = InvalidStatus;
    fn from_str(s: &str) -> Result<Status, InvalidStatus> {
        Status::parse(s).ok_or(InvalidStatus)
    }
}

/// Text that is not an enhanced status code (`class.subject.detail`, class 2, 4 or 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidStatus;

impl fmt::Display for InvalidStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not an enhanced status code (class.subject.detail)")
    }
}

impl std::error::Error for InvalidStatus {}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One SMTP reply: a three-digit code, an optional enhanced status code and one or more text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply code (RFC 5321 §4.2), e.g. 250.
    pub code: u16,
    /// The enhanced status code written at the start of every line (RFC 2034), when the reply
    /// carries one (the greeting and the EHLO reply do not).
    pub status: Option<Status>,
    /// The text lines; at least one.
    pub lines: Vec<String>,
}

/// The broad meaning of a reply code's first digit (RFC 5321 §4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// 2yz: the action was completed.
    Positive,
    /// 3yz: send more (354, 334).
    Intermediate,
    /// 4yz: try again later.
    Transient,
    /// 5yz: do not try again as is.
    Permanent,
}

impl Reply {
    /// A reply with an enhanced status code and one line of text.
    pub fn new(code: u16, status: Status, text: impl Into<String>) -> Self {
        Reply {
            code,
            status: Some(status),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced status code (greeting, EHLO, HELO).
    pub fn plain(code: u16, lines: Vec<String>) -> Self {
        debug_assert!(!lines.is_empty());
        Reply {
            code,
            status: None,
            lines,
        }
    }

    /// What the first digit of the code says.
    pub fn severity(&self) -> Severity {
        match self.code / 100 {
            2 => Severity::Positive,
            3 => Severity::Intermediate,
            4 => Severity::Transient,
            _ => Severity::Permanent,
        }
    }

    /// True for 4yz and 5yz replies.
    pub fn is_error(&self) -> bool {
        matches!(self.severity(), Severity::Transient | Severity::Permanent)
    }

    /// The text of the reply on one line (lines joined by a space), for logs and bounces.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// Appends the reply in wire form, CRLF-terminated, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            // Writing into a Vec cannot fail.
            let _ = match self.status {
                Some(status) => write!(out, "{}{}{} {}\r\n", self.code, sep, status, line),
                None => write!(out, "{}{}{}\r\n", self.code, sep, line),
            };
        }
    }

    /// The reply in wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.write_to(&mut out);
        out
    }

    /// Client side: a reply received as `lines` (their texts, after `ddd-`/`ddd `) with
    /// `code`. The enhanced status code (RFC 2034) is taken from the first word of the first
    /// line when it is one of the code's class, and removed from every line starting with it.
    pub fn from_received(code: u16, mut lines: Vec<String>) -> Reply {
        let status = lines
            .first()
            .and_then(|l| l.split(' ').next())
            .and_then(Status::parse)
            .filter(|s| u16::from(s.class) == code / 100);
        if let Some(status) = status {
            let prefix = status.to_string();
            for line in &mut lines {
                if let Some(rest) = line.strip_prefix(&prefix)
                    && (rest.is_empty() || rest.starts_with(' '))
                {
                    *line = rest.trim_start_matches(' ').to_string();
                }
            }
        }
        Reply {
            code,
            status,
            lines,
        }
    }
}

/// Client side: one received reply line without its CRLF (RFC 5321 §4.2.1): its code, whether
/// it is the last line of the reply (`ddd text` or a bare `ddd`, not `ddd-text`), and its
/// text. `None` when it is not a reply line.
pub fn parse_received_line(raw: &[u8]) -> Option<(u16, bool, String)> {
    if raw.len() < 3 || !raw[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = raw[..3]
        .iter()
        .fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));
    let (last, text) = match raw.get(3) {
        None => (true, &raw[3..]),
        Some(b' ') => (true, &raw[4..]),
        Some(b'-') => (false, &raw[4..]),
        Some(_) => return None,
    };
    Some((code, last, String::from_utf8_lossy(text).into_owned()))
}

impl fmt::Display for Reply {
    /// One line: `550 5.1.1 text text`, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} {} {}", self.code, s, self.text()),
            None => write!(f, "{} {}", self.code, self.text()),
        }
    }
}

const fn st(class: u8, subject: u16, detail: u16) -> Status {
    Status::new(class, subject, detail)
}

// ---- 2yz -------------------------------------------------------------------------------------

/// `220 <host> <banner>`: the greeting (RFC 5321 §4.2, §3.1). No enhanced code (RFC 2034 §3).
pub fn greeting(hostname: &str, banner: &str) -> Reply {
    Reply::plain(220, vec![format!("{hostname} {banner}")])
}

/// `250 <host>`: the answer to HELO (RFC 5321 §4.1.1.1).
pub fn helo(hostname: &str) -> Reply {
    Reply::plain(250, vec![hostname.to_string()])
}

/// The multi-line answer to EHLO: the host name, then one extension keyword a line
/// (RFC 5321 §4.1.1.1). No enhanced codes (RFC 2034 §3).
pub fn ehlo(hostname: &str, extensions: &[String]) -> Reply {
    let mut lines = Vec::with_capacity(extensions.len() + 1);
    lines.push(hostname.to_string());
    lines.extend(extensions.iter().cloned());
    Reply::plain(250, lines)
}

/// `250 2.1.0 Ok`: MAIL accepted (RFC 3463 X.1.0: other address status).
pub fn mail_ok() -> Reply {
    Reply::new(250, st(2, 1, 0), "Ok")
}

/// `250 2.1.5 Ok`: RCPT accepted (RFC 3463 X.1.5: destination address valid).
pub fn rcpt_ok() -> Reply {
    Reply::new(250, st(2, 1, 5), "Ok")
}

/// `250 2.0.0 Ok`: RSET, NOOP and other plain successes.
pub fn ok() -> Reply {
    Reply::new(250, st(2, 0, 0), "Ok")
}

/// `354 End data with <CR><LF>.<CR><LF>` (RFC 5321 §4.1.1.4). No enhanced code on 3yz.
pub fn start_data() -> Reply {
    Reply::plain(354, vec!["End data with <CR><LF>.<CR><LF>".to_string()])
}

/// `250 2.0.0 Ok: queued as ID`: the message is on stable storage.
pub fn queued(id: &str) -> Reply {
    Reply::new(250, st(2, 0, 0), format!("Ok: queued as {id}"))
}

/// `250 2.0.0 N octets received`: one BDAT chunk that is not the last (RFC 3030 §2).
pub fn chunk_ok(size: u64) -> Reply {
    Reply::new(250, st(2, 0, 0), format!("{size} octets received"))
}

/// `221 2.0.0 Bye`: answer to QUIT (RFC 5321 §4.1.1.10).
pub fn bye() -> Reply {
    Reply::new(221, st(2, 0, 0), "Bye")
}

/// `252 2.5.2 …`: VRFY answered without saying whether the user exists (RFC 5321 §3.5.3).
pub fn vrfy_ambiguous() -> Reply {
    Reply::new(
        252,
        st(2, 5, 2),
        "Cannot VRFY user, but will accept message and attempt delivery",
    )
}

/// `214 2.0.0 …`: HELP (RFC 5321 §4.1.1.8). Names the commands, never the software version.
pub fn help() -> Reply {
    Reply {
        code: 214,
        status: Some(st(2, 0, 0)),
        lines: vec![
            "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP".to_string(),
            "See RFC 5321".to_string(),
        ],
    }
}

/// `220 2.0.0 Ready to start TLS` (RFC 3207 §4).
pub fn ready_to_start_tls() -> Reply {
    Reply::new(220, st(2, 0, 0), "Ready to start TLS")
}

/// `334 <challenge>`: a SASL continuation (RFC 4954 §4); the challenge is base64, possibly empty.
pub fn auth_continue(challenge: &str) -> Reply {
    Reply::plain(334, vec![challenge.to_string()])
}

/// `235 2.7.0 Authentication successful` (RFC 4954 §6).
pub fn auth_ok() -> Reply {
    Reply::new(235, st(2, 7, 0), "Authentication successful")
}

// ---- 4yz -------------------------------------------------------------------------------------

/// `421 4.7.0 <host> Error: too many errors`: the session's error budget is spent; closing.
pub fn too_many_errors(hostname: &str) -> Reply {
    Reply::new(
        421,
        st(4, 7, 0),
        format!("{hostname} Error: too many errors"),
    )
}

/// `421 4.4.2 <host> Error: timeout exceeded`: the client was silent too long
/// (RFC 5321 §4.5.3.2; RFC 3463 X.4.2 bad connection).
pub fn timeout(hostname: &str) -> Reply {
    Reply::new(
        421,
        st(4, 4, 2),
        format!("{hostname} Error: timeout exceeded"),
    )
}

/// `421 4.3.2 <host> Service shutting down`: the server is stopping (RFC 3463 X.3.2).
pub fn shutting_down(hostname: &str) -> Reply {
    Reply::new(
        421,
        st(4, 3, 2),
        format!("{hostname} Service shutting down, closing transmission channel"),
    )
}

/// `421 4.3.2 …`: what `sendmail -bs` answers its SMTP client when it cannot reach the
/// server's submit socket (RFC 3463 X.3.2: system not accepting messages).
pub fn submission_unavailable(detail: &str) -> Reply {
    Reply::new(
        421,
        st(4, 3, 2),
        format!("Local mail system unavailable: {detail}"),
    )
}

/// `421 4.7.0 <host> Error: too many connections`: the global connection cap is reached.
pub fn too_many_connections(hostname: &str) -> Reply {
    Reply::new(
        421,
        st(4, 7, 0),
        format!("{hostname} Error: too many connections"),
    )
}

/// `421 4.7.0 <host> Error: too many connections from <ip>`: the per-address cap is reached.
pub fn too_many_connections_from(hostname: &str, ip: &str) -> Reply {
    Reply::new(
        421,
        st(4, 7, 0),
        format!("{hostname} Error: too many connections from {ip}"),
    )
}

/// `421 4.7.0 <host> Error: too many failed authentication attempts` (then close).
pub fn too_many_auth_failures(hostname: &str) -> Reply {
    Reply::new(
        421,
        st(4, 7, 0),
        format!("{hostname} Error: too many failed authentication attempts"),
    )
}

/// `421 4.7.0 <host> Error: too many unknown recipients`: recipient probing; closing.
pub fn too_many_unknown_recipients(hostname: &str) -> Reply {
    Reply::new(
        421,
        st(4, 7, 0),
        format!("{hostname} Error: too many unknown recipients"),
    )
}

/// `250 2.1.5 <addr>`: VRFY for a trusted client, the address exists (RFC 5321 §3.5.3).
pub fn vrfy_ok(address: &str) -> Reply {
    Reply::new(250, st(2, 1, 5), format!("<{address}>"))
}

/// `250 2.1.5 …` with one address a line: EXPN for a trusted client (RFC 5321 §3.5.2).
pub fn expn_list(addresses: &[String]) -> Reply {
    Reply {
        code: 250,
        status: Some(st(2, 1, 5)),
        lines: addresses.iter().map(|a| format!("<{a}>")).collect(),
    }
}

/// `454 4.7.0 TLS not available due to temporary reason` (RFC 3207 §4).
pub fn tls_unavailable() -> Reply {
    Reply::new(
        454,
        st(4, 7, 0),
        "TLS not available due to temporary reason",
    )
}

/// `454 4.7.0 Temporary authentication failure` (RFC 4954 §6): the check itself failed.
pub fn auth_temporary_failure() -> Reply {
    Reply::new(454, st(4, 7, 0), "Temporary authentication failure")
}

/// `452 4.5.3 Error: too many recipients` (RFC 5321 §4.5.3.1.10 asks for 452; RFC 3463 X.5.3).
pub fn too_many_recipients() -> Reply {
    Reply::new(452, st(4, 5, 3), "Error: too many recipients")
}

/// `451 4.3.0 Error: queue file write error`: the spool could not make the message durable.
pub fn queue_error() -> Reply {
    Reply::new(451, st(4, 3, 0), "Error: queue file write error")
}

/// `452 4.3.1 …`: the spool's file system is full (RFC 3463 X.3.1, "mail system full"); the
/// client tries again later.
pub fn insufficient_storage() -> Reply {
    Reply::new(452, st(4, 3, 1), "Error: insufficient system storage")
}

/// `451 4.3.0 Error: internal error`: a temporary local problem while checking.
pub fn local_error() -> Reply {
    Reply::new(451, st(4, 3, 0), "Error: local error in processing")
}

/// `451 4.3.0 …`: local delivery (Maildir) failed; the message stays queued.
pub fn local_delivery_failed(detail: &str) -> Reply {
    Reply::new(451, st(4, 3, 0), format!("Local delivery failed: {detail}"))
}

/// `451 4.4.0 …`: a recipient elsewhere, accepted for relay, while remote delivery is off
/// (the embedded development default): it stays queued.
pub fn remote_delivery_unavailable() -> Reply {
    Reply::new(
        451,
        st(4, 4, 0),
        "Remote delivery is off in the embedded development default (run with --config to relay); the message stays queued",
    )
}

// ---- 5yz -------------------------------------------------------------------------------------

/// `554 5.0.0 …`: the operator returned the message to its sender (`estafeta queue bounce`);
/// the text goes into the notification's Diagnostic-Code.
pub fn bounced_by_administrator() -> Reply {
    Reply::new(
        554,
        st(5, 0, 0),
        "Message returned to the sender by the mail system administrator",
    )
}

/// `500 5.5.2 Error: line too long` (RFC 5321 §4.5.3.1.4, §4.5.3.1.9).
pub fn line_too_long() -> Reply {
    Reply::new(500, st(5, 5, 2), "Error: line too long")
}

/// `500 5.5.2 Error: bad UTF-8 syntax`: a command line that is not valid UTF-8.
pub fn bad_encoding() -> Reply {
    Reply::new(500, st(5, 5, 2), "Error: bad UTF-8 syntax")
}

/// `502 5.5.2 Error: command not recognized` (RFC 5321 §4.2.4: 500 or 502 for unknown commands).
pub fn unknown_command() -> Reply {
    Reply::new(502, st(5, 5, 2), "Error: command not recognized")
}

/// `502 5.5.1 Error: command not implemented`: a known command that is not available here.
pub fn not_implemented() -> Reply {
    Reply::new(502, st(5, 5, 1), "Error: command not implemented")
}

/// `502 5.5.1 …`: VRFY turned off by configuration.
pub fn vrfy_disabled() -> Reply {
    Reply::new(502, st(5, 5, 1), "VRFY command is disabled")
}

/// `502 5.5.1 …`: EXPN turned off by configuration.
pub fn expn_disabled() -> Reply {
    Reply::new(502, st(5, 5, 1), "EXPN command is disabled")
}

/// ETRN (RFC 1985 §5): the delivery of `n` queued messages for `node` was started
/// (`253`), or there was nothing to start (`251`).
pub fn etrn_started(node: &str, n: usize) -> Reply {
    if n == 0 {
        Reply::new(
            251,
            st(2, 0, 0),
            format!("OK, no messages waiting for node {node}"),
        )
    } else {
        Reply::new(
            253,
            st(2, 0, 0),
            format!("OK, {n} pending messages for node {node} started"),
        )
    }
}

/// `459 4.7.1`: ETRN from a client that is neither in mynetworks nor authenticated
/// (RFC 1985 §5: "node not allowed").
pub fn etrn_not_allowed(node: &str) -> Reply {
    Reply::new(
        459,
        st(4, 7, 1),
        format!("Node {node} not allowed: ETRN is for trusted clients only"),
    )
}

/// `458 4.3.0`: an ETRN form this server does not run (`#queue`), or the queue could not be
/// asked (RFC 1985 §5: "unable to queue messages for node").
pub fn etrn_unable(node: &str) -> Reply {
    Reply::new(
        458,
        st(4, 3, 0),
        format!("Unable to queue messages for node {node}"),
    )
}

/// `503 5.5.1 Error: …`: a command out of sequence (RFC 5321 §4.1.4).
pub fn bad_sequence(text: &str) -> Reply {
    Reply::new(503, st(5, 5, 1), format!("Error: {text}"))
}

/// `501 5.5.4 Syntax: …`: bad arguments to a command (RFC 3463 X.5.4).
pub fn syntax(text: &str) -> Reply {
    Reply::new(501, st(5, 5, 4), format!("Syntax: {text}"))
}

/// `501 5.5.4 Error: …`: a bad command parameter.
pub fn bad_parameter(text: &str) -> Reply {
    Reply::new(501, st(5, 5, 4), format!("Error: {text}"))
}

/// `555 5.5.4 Unsupported option: …` (RFC 5321 §4.1.1.11: unrecognised MAIL/RCPT parameters).
pub fn unsupported_parameter(keyword: &str) -> Reply {
    Reply::new(555, st(5, 5, 4), format!("Unsupported option: {keyword}"))
}

/// `501 5.1.7 Bad sender address syntax` (RFC 3463 X.1.7).
pub fn bad_sender_syntax(detail: &str) -> Reply {
    Reply::new(
        501,
        st(5, 1, 7),
        format!("Bad sender address syntax: {detail}"),
    )
}

/// `501 5.1.3 Bad recipient address syntax` (RFC 3463 X.1.3).
pub fn bad_recipient_syntax(detail: &str) -> Reply {
    Reply::new(
        501,
        st(5, 1, 3),
        format!("Bad recipient address syntax: {detail}"),
    )
}

/// `553 5.1.7`/`553 5.1.3`: an address whose parts exceed RFC 5321 §4.5.3.1 limits.
pub fn address_too_long(sender: bool, what: &str) -> Reply {
    let status = if sender { st(5, 1, 7) } else { st(5, 1, 3) };
    Reply::new(553, status, format!("Error: {what} too long"))
}

/// `530 5.7.10`: `MAIL FROM … REQUIRETLS` outside TLS (RFC 8689 §4.1: the session that
/// carries such a message must itself be protected by TLS).
pub fn requiretls_needs_tls() -> Reply {
    Reply::new(
        530,
        Status::ENCRYPTION_NEEDED,
        "REQUIRETLS needs a TLS session: use STARTTLS first",
    )
}

/// `550 5.7.30`: a REQUIRETLS message cannot be relayed as RFC 8689 §4.2 requires (`why`).
pub fn requiretls_unmet(why: &str) -> Reply {
    Reply::new(
        550,
        Status::REQUIRETLS_SUPPORT,
        format!("REQUIRETLS support required: {why}"),
    )
}

/// `451 4.7.30`: whether a REQUIRETLS message can be relayed cannot be known now (`why`: a
/// lookup or a policy fetch failed); retried.
pub fn requiretls_unknown(why: &str) -> Reply {
    Reply::new(
        451,
        Status::REQUIRETLS_SUPPORT_TEMPORARY,
        format!("REQUIRETLS support cannot be checked now: {why}"),
    )
}

/// `530 5.7.0 Authentication required` (RFC 4954 §6): MAIL before AUTH on a submission port.
pub fn auth_required() -> Reply {
    Reply::new(530, st(5, 7, 0), "Authentication required")
}

/// `538 5.7.11 Encryption required for requested authentication mechanism` (RFC 4954 §6):
/// AUTH before STARTTLS.
pub fn encryption_required() -> Reply {
    Reply::new(
        538,
        st(5, 7, 11),
        "Encryption required for requested authentication mechanism",
    )
}

/// `535 5.7.8 Authentication credentials invalid` (RFC 4954 §6).
pub fn auth_failed() -> Reply {
    Reply::new(535, st(5, 7, 8), "Authentication credentials invalid")
}

/// `501 5.0.0 Authentication aborted`: the client sent `*` (RFC 4954 §4).
pub fn auth_aborted() -> Reply {
    Reply::new(501, st(5, 0, 0), "Authentication aborted")
}

/// `501 5.5.2 Cannot decode response`: a SASL response that is not base64 (RFC 4954 §4).
pub fn auth_bad_response() -> Reply {
    Reply::new(501, st(5, 5, 2), "Cannot decode response")
}

/// `504 5.5.4 Unrecognized authentication type` (RFC 4954 §6).
pub fn auth_unknown_mechanism() -> Reply {
    Reply::new(504, st(5, 5, 4), "Unrecognized authentication type")
}

/// `553 5.7.1 <addr>: Sender address not owned by user <user>`: an authenticated user used
/// a sender address that is not theirs.
pub fn sender_not_owned(address: &str, user: &str) -> Reply {
    Reply::new(
        553,
        st(5, 7, 1),
        format!("<{address}>: Sender address rejected: not owned by user {user}"),
    )
}

/// `550 5.7.23 …`: SPF says the client may not send for the sender's domain (`-all`), and
/// `[verify] spf = "reject"` (RFC 7208 §8.4, RFC 7372 §3.2).
pub fn spf_fail(domain: &str, ip: &str) -> Reply {
    Reply::new(
        550,
        st(5, 7, 23),
        format!("SPF check failed: {domain} does not designate {ip} as a permitted sender"),
    )
}

/// `451 4.7.24 …`: the SPF record of the sender's domain could not be looked up now
/// (RFC 7208 §8.6, RFC 7372 §3.2): try again later, never a bounce for a DNS hiccup.
pub fn spf_temperror(domain: &str) -> Reply {
    Reply::new(
        451,
        st(4, 7, 24),
        format!("SPF check of {domain} failed temporarily (DNS error); try again later"),
    )
}

/// `550 5.7.1 …`: the message fails DMARC and its author domain publishes `p=reject`
/// (RFC 7489 §6.6.2, `[verify] dmarc = "enforce"`).
pub fn dmarc_reject(domain: &str) -> Reply {
    Reply::new(
        550,
        st(5, 7, 1),
        format!(
            "Message rejected: DMARC policy of {domain} is reject, and neither SPF nor DKIM aligns with it"
        ),
    )
}

/// `451 4.7.1 …`: the DMARC policy of the author domain, or a result it depends on, could not
/// be looked up now: try again later.
pub fn dmarc_temperror(domain: &str) -> Reply {
    Reply::new(
        451,
        st(4, 7, 1),
        format!("DMARC check of {domain} failed temporarily (DNS error); try again later"),
    )
}

/// `550 5.7.1 …`: several `From:` fields, or one with addresses in several domains: exempt
/// from DMARC (RFC 7489 §6.6.1), so refused when DMARC is enforced.
pub fn several_authors() -> Reply {
    Reply::new(
        550,
        st(5, 7, 1),
        "Message rejected: several From: fields or author domains; DMARC cannot be checked",
    )
}

/// `451 4.7.1 …`: the checks of a message took too long (a DNS server that does not answer).
pub fn checks_timed_out() -> Reply {
    Reply::new(
        451,
        st(4, 7, 1),
        "Authentication checks timed out; try again later",
    )
}

/// `554 5.7.1 …` as the greeting: the client's address is listed in a DNS blocklist
/// (`[antispam] dnsbl`); the connection is closed (RFC 5321 §3.1 allows 554 instead of 220).
pub fn dnsbl_listed(ip: &str, zone: &str) -> Reply {
    Reply::new(
        554,
        st(5, 7, 1),
        format!("Service unavailable; client [{ip}] blocked using {zone}"),
    )
}

/// `554 5.5.1 …`: the client sent before the greeting (`[limits] greet_delay`), as spam bots
/// that do not wait do (RFC 5321 §4.3.1: the client waits for the 220); disconnected, as
/// Postfix's postscreen does.
pub fn early_talker() -> Reply {
    Reply::new(
        554,
        st(5, 5, 1),
        "Protocol error: commands sent before the greeting",
    )
}

/// `421 4.7.0 …` at connect: the client opened connections faster than
/// `[limits] connection_rate_per_ip` allows.
pub fn connection_rate_exceeded(hostname: &str, ip: &str, limit: &str) -> Reply {
    Reply::new(
        421,
        st(4, 7, 0),
        format!(
            "{hostname} Error: too many connections from {ip} (connection_rate_per_ip {limit}); try again later"
        ),
    )
}

/// `450 4.7.1 …` to a RCPT: a message or recipient rate limit is reached (`what` names it,
/// e.g. `message_rate_per_ip 300/1h`); the client may try again later.
pub fn rate_exceeded(what: &str, who: &str) -> Reply {
    Reply::new(
        450,
        st(4, 7, 1),
        format!("Error: too much mail from {who} ({what}); try again later"),
    )
}

/// `550 5.1.1 …`: a bounce to an SRS address that is not ours, expired or forged.
pub fn srs_invalid(address: &str, why: &str) -> Reply {
    Reply::new(
        550,
        st(5, 1, 1),
        format!("<{address}>: Recipient address rejected: invalid SRS address ({why})"),
    )
}

/// `553 5.6.7 …`: a non-ASCII address without SMTPUTF8 (RFC 6531 §3.5).
pub fn non_ascii_address() -> Reply {
    Reply::new(
        553,
        st(5, 6, 7),
        "Non-ASCII addresses require the SMTPUTF8 parameter",
    )
}

/// `552 5.3.4 Message size exceeds fixed limit`: the SIZE parameter is over the limit
/// (RFC 1870 §6.1; RFC 3463 X.3.4).
pub fn size_exceeds_limit() -> Reply {
    Reply::new(552, st(5, 3, 4), "Message size exceeds fixed limit")
}

/// `552 5.3.4 Error: message file too big`: the received content is over the limit.
pub fn message_too_big() -> Reply {
    Reply::new(552, st(5, 3, 4), "Error: message file too big")
}

/// `552 5.3.4`: the header section is over the limit (`limit` octets); the message is
/// refused as too big, as Exim does with its `header_maxsize`.
pub fn header_too_big(limit: usize) -> Reply {
    Reply::new(
        552,
        st(5, 3, 4),
        format!("Error: message header too big (over {limit} octets)"),
    )
}

/// `554 5.5.1 Error: no valid recipients`: DATA/BDAT after every RCPT was refused
/// (RFC 2920 §3.1).
pub fn no_valid_recipients() -> Reply {
    Reply::new(554, st(5, 5, 1), "Error: no valid recipients")
}

/// `554 5.4.6 Too many hops`: a mail loop (RFC 5321 §6.3; RFC 3463 X.4.6 routing loop).
pub fn too_many_hops(count: usize) -> Reply {
    Reply::new(
        554,
        st(5, 4, 6),
        format!("Too many hops: {count} Received headers (mail loop?)"),
    )
}

/// `554 5.7.1 <addr>: Relay access denied`: a recipient outside the local domains from a
/// client that may not relay.
pub fn relay_denied(address: &str) -> Reply {
    Reply::new(
        554,
        st(5, 7, 1),
        format!("<{address}>: Relay access denied"),
    )
}

/// `451 4.7.1 Service unavailable - try again later`: a milter's tempfail without its own
/// text, or `default_action = "tempfail"` for a milter that is down (Postfix's wording).
pub fn milter_tempfail() -> Reply {
    Reply::new(451, st(4, 7, 1), "Service unavailable - try again later")
}

/// `550 5.7.1 Command rejected`: a milter's reject without its own text, or
/// `default_action = "reject"` (Postfix's wording).
pub fn milter_reject() -> Reply {
    Reply::new(550, st(5, 7, 1), "Command rejected")
}

/// `421 4.7.0 Service unavailable - closing connection`: a milter asked to end the
/// connection (SMFIR_SHUTDOWN).
pub fn milter_shutdown() -> Reply {
    Reply::new(421, st(4, 7, 0), "Service unavailable - closing connection")
}

/// `451 4.3.0 pipe NAME: …`: delivery to a command failed for now (it could not be started,
/// died of a signal, or said EX_TEMPFAIL/EX_OSERR).
pub fn pipe_temporary(pipe: &str, detail: &str) -> Reply {
    Reply::new(451, st(4, 3, 0), format!("pipe {pipe}: {detail}"))
}

/// `550 <status> pipe NAME: …`: delivery to a command failed for good; `status` is the
/// enhanced code its exit status stands for (sysexits.h, as Postfix reads it).
pub fn pipe_permanent(pipe: &str, status: Status, detail: &str) -> Reply {
    Reply::new(550, status, format!("pipe {pipe}: {detail}"))
}

/// `450 4.1.1 <addr>: Recipient address rejected: unverified address: …`: the server that
/// keeps the mailbox (LMTP) could not say whether it exists; the client tries again later.
pub fn recipient_unverified(address: &str, why: &str) -> Reply {
    Reply::new(
        450,
        st(4, 1, 1),
        format!("<{address}>: Recipient address rejected: unverified address: {why}"),
    )
}

/// `550 5.1.1 <addr>: Recipient address rejected: User unknown`.
pub fn user_unknown(address: &str) -> Reply {
    Reply::new(
        550,
        st(5, 1, 1),
        format!("<{address}>: Recipient address rejected: User unknown"),
    )
}

/// `221 2.7.0 Error: I can break rules, too. Goodbye.`: an HTTP request on the SMTP port
/// (a browser or proxy abuse, as Postfix answers it).
pub fn forbidden_command() -> Reply {
    Reply::new(221, st(2, 7, 0), "Error: I can break rules, too. Goodbye.")
}

// --- Remote delivery: the verdicts this server writes itself about an attempt (they appear in
// logs, `queue list` and bounces, as "Diagnostic-Code: smtp; …"). `peer` is `host[ip]:port`.

/// `451 4.4.1`: the TCP connection to a peer could not be made.
pub fn connect_failed(peer: &str, detail: &str) -> Reply {
    Reply::new(451, st(4, 4, 1), format!("connect to {peer}: {detail}"))
}

/// `451 4.4.2`: the peer did not answer in time (RFC 5321 §4.5.3.2 timeouts).
pub fn conversation_timed_out(peer: &str, doing: &str) -> Reply {
    Reply::new(
        451,
        st(4, 4, 2),
        format!("conversation with {peer} timed out while {doing}"),
    )
}

/// `451 4.4.2`: the connection broke (`detail`: the I/O error, when there is one).
pub fn connection_lost(peer: &str, doing: &str, detail: Option<&str>) -> Reply {
    let text = match detail {
        Some(d) => format!("lost connection with {peer} while {doing}: {d}"),
        None => format!("lost connection with {peer} while {doing}"),
    };
    Reply::new(451, st(4, 4, 2), text)
}

/// `451 4.5.0`: the peer broke the protocol (a malformed reply, a success where none can be).
pub fn peer_protocol_error(peer: &str, doing: &str, what: &str) -> Reply {
    Reply::new(
        451,
        st(4, 5, 0),
        format!("protocol error from {peer} while {doing}: {what}"),
    )
}

/// `451 4.5.0`: a success reply where the protocol allows none.
pub fn unexpected_success(text: &str) -> Reply {
    Reply::new(451, st(4, 5, 0), format!("unexpected success: {text}"))
}

/// `451 4.7.4`: the policy requires TLS and the peer does not offer STARTTLS.
pub fn tls_not_offered(peer: &str) -> Reply {
    Reply::new(
        451,
        st(4, 7, 4),
        format!("TLS is required, but was not offered by host {peer}"),
    )
}

/// `451 4.7.5`: STARTTLS was tried and failed (handshake, certificate, local TLS setup).
pub fn tls_failed(peer: &str, detail: &str) -> Reply {
    Reply::new(
        451,
        st(4, 7, 5),
        format!("Cannot start TLS with {peer}: {detail}"),
    )
}

/// `451 4.7.5`: the domain's MTA-STS policy (RFC 8461) in `enforce` mode names none of its
/// MX hosts.
pub fn mta_sts_no_mx(domain: &str, mx: &[String]) -> Reply {
    Reply::new(
        451,
        st(4, 7, 5),
        format!(
            "MTA-STS policy of {domain} allows none of its MX hosts (policy mx: {})",
            mx.join(", ")
        ),
    )
}

/// `451 4.7.5`: DANE (RFC 7672) cannot authenticate `host` now (a bogus or unanswered TLSA
/// lookup; or DANE required and unavailable).
pub fn dane_lookup_failed(host: &str, why: &str) -> Reply {
    Reply::new(451, st(4, 7, 5), format!("DANE for {host}: {why}"))
}

/// `451 4.7.x`: AUTH towards a smarthost cannot be done as configured (`status` says why:
/// 4.7.10 no encryption, 4.7.0 no usable mechanism).
pub fn client_auth_impossible(peer: &str, status: Status, text: &str) -> Reply {
    Reply::new(451, status, format!("{text} ({peer})"))
}

/// `451 4.3.0`: a recipient the client left without an outcome (a safe default that should
/// never be seen).
pub fn recipient_undecided() -> Reply {
    Reply::new(
        451,
        st(4, 3, 0),
        "recipient left undecided by the SMTP client",
    )
}

/// `553 5.6.7`: the message needs SMTPUTF8 and the peer does not offer it (RFC 6531 §3.4).
pub fn smtputf8_not_offered(peer: &str) -> Reply {
    Reply::new(
        553,
        st(5, 6, 7),
        format!("SMTPUTF8 is required, but was not offered by host {peer}"),
    )
}

/// `552 5.3.4`: the message is larger than the peer's announced SIZE (RFC 1870).
pub fn too_big_for_peer(size: u64, limit: u64, peer: &str) -> Reply {
    Reply::new(
        552,
        st(5, 3, 4),
        format!("message size {size} exceeds size limit {limit} of server {peer}"),
    )
}

/// `451 4.4.3`: the next hop's name (a route, the smarthost, MX hosts) could not be
/// resolved now.
pub fn next_hop_unresolved(reason: &str) -> Reply {
    Reply::new(451, st(4, 4, 3), reason.to_string())
}

/// `451 4.4.4`: no address to connect to for the domain.
pub fn no_route(domain: &str) -> Reply {
    Reply::new(
        451,
        st(4, 4, 4),
        format!("no address to connect to for {domain}"),
    )
}

/// A permanent DNS verdict on a domain: `556 5.1.10` for a null MX (RFC 7505 §4.2), else
/// `550` with the resolver's status (5.1.2 no such domain, 5.4.6 mail loops back to myself…).
pub fn undeliverable_domain(status: Status, reason: &str) -> Reply {
    let code = if status == Status::NULL_MX { 556 } else { 550 };
    Reply::new(code, status, reason.to_string())
}

/// `550 5.1.2`: an address literal that is not an IP address.
pub fn bad_address_literal(domain: &str) -> Reply {
    Reply::new(
        550,
        st(5, 1, 2),
        format!("cannot route to address literal {domain}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_status() {
        assert_eq!(rcpt_ok().to_bytes(), b"250 2.1.5 Ok\r\n");
    }

    #[test]
    fn multi_line_repeats_code_and_status() {
        assert_eq!(
            help().to_bytes(),
            b"214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\r\n214 2.0.0 See RFC 5321\r\n"
        );
    }

    #[test]
    fn ehlo_has_no_status() {
        let r = ehlo("mx.example", &["PIPELINING".into(), "SIZE 100".into()]);
        assert_eq!(
            r.to_bytes(),
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n"
        );
    }

    #[test]
    fn status_parse() {
        assert_eq!(Status::parse("4.7.0"), Some(Status::new(4, 7, 0)));
        assert_eq!(Status::parse("3.1.0"), None);
        assert_eq!(Status::parse("5.1"), None);
        assert_eq!("5.1.10".parse::<Status>(), Ok(Status::NULL_MX));
        assert_eq!("5.1.10.1".parse::<Status>(), Err(InvalidStatus));
        assert_eq!(Status::EXPIRED.to_string(), "5.4.7");
        assert_eq!(Status::of_code(421), Status::TEMPORARY);
        assert_eq!(Status::of_code(554), Status::PERMANENT);
        assert_eq!(Status::of_code(250), Status::SUCCESS);
        // The null MX verdict is the only 556 (RFC 7505 §4.2).
        assert_eq!(undeliverable_domain(Status::NULL_MX, "x").code, 556);
        assert_eq!(undeliverable_domain(Status::ROUTING_LOOP, "x").code, 550);
    }

    #[test]
    fn received_replies() {
        assert_eq!(
            parse_received_line(b"250-mx.example"),
            Some((250, false, "mx.example".into()))
        );
        assert_eq!(
            parse_received_line(b"221"),
            Some((221, true, String::new()))
        );
        for bad in [&b"25"[..], b"2x0 ok", b"250_ok"] {
            assert_eq!(parse_received_line(bad), None);
        }
        let r = Reply::from_received(550, vec!["5.1.1 no such user".into(), "5.1.1 sorry".into()]);
        assert_eq!(r.status, Some(Status::new(5, 1, 1)));
        assert_eq!(r.lines, ["no such user", "sorry"]);
        // A status of another class is text.
        let r = Reply::from_received(250, vec!["5.1.1 odd".into()]);
        assert_eq!((r.status, r.text()), (None, "5.1.1 odd".to_string()));
    }
}
