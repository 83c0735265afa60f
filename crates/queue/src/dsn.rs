//! Delivery status notifications (RFC 3464): `multipart/report; report-type=delivery-status`
//! messages for failed, delayed and successful deliveries, and the rules of who gets one
//! (RFC 3461 `NOTIFY`, never to `<>`).
//!
//! Everything here is pure: no I/O and no clock; the caller passes the time, the original
//! message and a seed for the MIME boundary, and queues the result from `<>` to the original
//! sender.

use std::fmt::Write;

use estafeta_proto::reply::Status;
use estafeta_proto::trace::rfc5322_date;
use estafeta_proto::{Notify, ReversePath};

use crate::transport::Failure;

/// RFC 5322 §2.1.1: a line is at most 998 octets without its CRLF.
const MAX_LINE: usize = 998;
/// Where header-like fields and the human text are wrapped when they can be.
const WRAP: usize = 76;
/// The longest unbroken piece of a word (leaves room for a field name or an indent).
const MAX_CHUNK: usize = 900;

/// The `Action` of one recipient (RFC 3464 §2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DsnAction {
    /// Not delivered and not retried (`failed`).
    Failed,
    /// Not delivered yet; still being retried (`delayed`).
    Delayed,
    /// Delivered to the recipient's mailbox (`delivered`).
    Delivered,
    /// Handed to a system that does not report further (`relayed`).
    Relayed,
    /// Delivered to a list or alias and expanded (`expanded`).
    Expanded,
}

impl DsnAction {
    /// The keyword of the `Action:` field.
    pub fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
            DsnAction::Relayed => "relayed",
            DsnAction::Expanded => "expanded",
        }
    }

    /// True for the actions reported under `NOTIFY=SUCCESS`.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            DsnAction::Delivered | DsnAction::Relayed | DsnAction::Expanded
        )
    }
}

/// What a report says about one recipient (RFC 3464 §2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The address as delivered to (`Final-Recipient: rfc822; …`).
    pub final_recipient: String,
    /// The original recipient from `ORCPT`, decoded (`Original-Recipient: rfc822; …`).
    pub original_recipient: Option<String>,
    /// What happened.
    pub action: DsnAction,
    /// The status code, e.g. `5.1.1`, `4.4.1`, `2.0.0`.
    pub status: Status,
    /// The remote MTA with its type, e.g. `dns; mx1.example.net`.
    pub remote_mta: Option<String>,
    /// The diagnostic with its type, e.g. `smtp; 550 5.1.1 <x@y>: User unknown`.
    pub diagnostic: Option<String>,
    /// The last attempt (Unix seconds).
    pub last_attempt: Option<u64>,
    /// For `Delayed`: until when it will be retried (Unix seconds).
    pub will_retry_until: Option<u64>,
}

impl DsnRecipient {
    /// A recipient entry from a transport [`Failure`]: the status from the reply (or `5.0.0` /
    /// `4.0.0` by its code), `Remote-MTA: dns; host` when a remote answered, and
    /// `Diagnostic-Code: smtp; <code> <status> <text>`. Set `original_recipient`,
    /// `last_attempt` and `will_retry_until` afterwards.
    pub fn from_failure(
        final_recipient: impl Into<String>,
        action: DsnAction,
        failure: &Failure,
    ) -> Self {
        let status = failure
            .reply
            .status
            .unwrap_or_else(|| Status::of_code(failure.reply.code));
        let remote_mta = failure.remote.as_deref().map(|r| {
            // "mx.example.net[192.0.2.1]" → "mx.example.net"
            let host = r.split('[').next().unwrap_or(r).trim();
            format!("dns; {}", if host.is_empty() { r } else { host })
        });
        DsnRecipient {
            final_recipient: final_recipient.into(),
            original_recipient: None,
            action,
            status,
            remote_mta,
            diagnostic: Some(format!("smtp; {}", failure.reply)),
            last_attempt: None,
            will_retry_until: None,
        }
    }
}

/// Everything [`build_dsn`] needs.
#[derive(Debug, Clone)]
pub struct DsnInput<'a> {
    /// Our hostname (`Reporting-MTA`, the `From:` domain, the `Message-ID` domain).
    pub reporting_mta: &'a str,
    /// The queue ID of the original message.
    pub queue_id: &'a str,
    /// `ENVID`, already decoded from xtext (`estafeta_proto::command::xtext_decode`): written
    /// as `Original-Envelope-Id` (RFC 3464 §2.2.1).
    pub envid: Option<&'a str>,
    /// When the original message arrived (Unix seconds).
    pub arrival: u64,
    /// Now (Unix seconds): the `Date:` of the report.
    pub now: u64,
    /// The original envelope sender, without angle brackets: the report goes `To:` it.
    pub sender: &'a str,
    /// The recipients reported on (usually all with the same kind of action).
    pub recipients: &'a [DsnRecipient],
    /// The original message (CRLF line ends).
    pub original: &'a [u8],
    /// `RET=FULL`: return the whole message (`message/rfc822`); otherwise only its header
    /// section (`text/rfc822-headers`). RFC 3461 §4.3: callers should pass false for delay
    /// and success reports.
    pub return_full: bool,
    /// A returned full message is cut to at most this many octets (whole lines), and the
    /// report says so.
    pub max_returned: usize,
    /// Makes the MIME boundary unique (and tests deterministic).
    pub boundary_seed: u64,
}

/// Whether a recipient with this `NOTIFY` gets a report for this action (RFC 3461 §4.1):
/// without `NOTIFY`, failures and delays are reported and successes are not; `NEVER` gets none.
pub fn wants_dsn(notify: Option<Notify>, action: DsnAction) -> bool {
    let n = notify.unwrap_or(Notify {
        never: false,
        success: false,
        failure: true,
        delay: true,
    });
    if n.never {
        return false;
    }
    match action {
        DsnAction::Failed => n.failure,
        DsnAction::Delayed => n.delay,
        DsnAction::Delivered | DsnAction::Relayed | DsnAction::Expanded => n.success,
    }
}

/// False for `<>` (RFC 5321 §4.5.5): a notification is never answered by another one.
pub fn may_bounce(sender: &ReversePath) -> bool {
    !matches!(sender, ReversePath::Null)
}

/// What the third part carries.
enum Returned<'a> {
    /// The header section (`text/rfc822-headers` or `message/global-headers`).
    Headers(Vec<u8>),
    /// The message, possibly cut (`message/rfc822` or `message/global`).
    Full { data: &'a [u8], truncated: bool },
}

/// Builds the report: a complete message with CRLF line ends and no line over 998 octets,
/// to be queued from `<>` to `input.sender`.
pub fn build_dsn(input: &DsnInput) -> Vec<u8> {
    let mta = clean(input.reporting_mta);
    let (returned, note) = returned_part(input);

    let human = human_text(input, &mta, note.as_deref());
    let status = delivery_status(input, &mta);

    let human_8bit = !human.is_ascii();
    let status_8bit = !status.is_ascii();
    let (ret_type, ret_body, ret_8bit): (&str, &[u8], bool) = match &returned {
        Returned::Headers(h) => {
            let global = !h.is_ascii();
            let ty = if global {
                "message/global-headers"
            } else {
                "text/rfc822-headers"
            };
            (ty, h, global)
        }
        Returned::Full { data, .. } => {
            let global = !header_section(data).is_ascii();
            let ty = if global {
                "message/global"
            } else {
                "message/rfc822"
            };
            (ty, data, !data.is_ascii())
        }
    };

    let boundary = pick_boundary(input, &[human.as_bytes(), status.as_bytes(), ret_body]);

    let mut out = String::new();
    let subject = subject(input.recipients);
    let _ = write!(
        out,
        "From: Mail Delivery System <MAILER-DAEMON@{mta}>\r\n\
         To: <{}>\r\n\
         Subject: {subject}\r\n\
         Date: {}\r\n\
         Message-ID: <{}.{}.dsn@{mta}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n",
        clean(input.sender),
        rfc5322_date(input.now),
        clean(input.queue_id),
        input.now,
    );
    if human_8bit || status_8bit || ret_8bit {
        out.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    out.push_str("\r\nThis is a MIME-encapsulated message.\r\n");

    // Part 1: the explanation for people.
    let _ = write!(
        out,
        "\r\n--{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset={}\r\n",
        if human_8bit { "utf-8" } else { "us-ascii" }
    );
    if human_8bit {
        out.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&human);

    // Part 2: the machine-readable report.
    let _ = write!(
        out,
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: {}\r\n",
        if status_8bit {
            "message/global-delivery-status"
        } else {
            "message/delivery-status"
        }
    );
    if status_8bit {
        out.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&status);

    // Part 3: the returned message or its headers.
    let what = if input
        .recipients
        .iter()
        .any(|r| r.action == DsnAction::Failed)
    {
        "Undelivered Message"
    } else if input
        .recipients
        .iter()
        .any(|r| r.action == DsnAction::Delayed)
    {
        "Delayed Message"
    } else {
        "Message"
    };
    let description = match &returned {
        Returned::Headers(_) => format!("{what} Headers"),
        Returned::Full {
            truncated: true, ..
        } => format!("{what} (truncated)"),
        Returned::Full { .. } => what.to_string(),
    };
    let _ = write!(
        out,
        "\r\n--{boundary}\r\n\
         Content-Description: {description}\r\n\
         Content-Type: {ret_type}\r\n"
    );
    if ret_8bit {
        out.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    out.push_str("\r\n");

    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(ret_body);
    if !ret_body.is_empty() && !ret_body.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// The subject by the most important action reported.
fn subject(recipients: &[DsnRecipient]) -> &'static str {
    if recipients.iter().any(|r| r.action == DsnAction::Failed) {
        "Undelivered Mail Returned to Sender"
    } else if recipients.iter().any(|r| r.action == DsnAction::Delayed) {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    }
}

/// Chooses what to return and the note about it for the human part.
fn returned_part<'a>(input: &DsnInput<'a>) -> (Returned<'a>, Option<String>) {
    let headers = header_section(input.original);
    if !input.return_full {
        return (Returned::Headers(normalize_lines(headers)), None);
    }
    if !is_8bit_clean(input.original) {
        return (
            Returned::Headers(normalize_lines(headers)),
            Some(
                "The message body could not be returned as it was sent (binary content or \
                 overlong lines); only its headers are attached."
                    .to_string(),
            ),
        );
    }
    if input.original.len() <= input.max_returned {
        return (
            Returned::Full {
                data: input.original,
                truncated: false,
            },
            None,
        );
    }
    // Cut after the last complete line that fits.
    let cut = input.original[..input.max_returned]
        .windows(2)
        .rposition(|w| w == b"\r\n")
        .map(|p| p + 2)
        .unwrap_or(0);
    if cut < headers.len() {
        return (
            Returned::Headers(normalize_lines(headers)),
            Some(format!(
                "The returned message would exceed {} octets; only its headers are attached.",
                input.max_returned
            )),
        );
    }
    (
        Returned::Full {
            data: &input.original[..cut],
            truncated: true,
        },
        Some(format!(
            "The returned message was truncated to {cut} of its {} octets; the remaining \
             lines were removed.",
            input.original.len()
        )),
    )
}

/// The header section of a message: up to and including the CRLF that ends the last field
/// (the whole message when it has no body).
fn header_section(msg: &[u8]) -> &[u8] {
    if msg.starts_with(b"\r\n") {
        return &[];
    }
    match msg.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => &msg[..p + 2],
        None => msg,
    }
}

/// True when `msg` can be sent as `7bit`/`8bit`: CRLF line ends only, no NUL, no line over
/// 998 octets.
fn is_8bit_clean(msg: &[u8]) -> bool {
    let mut line = 0usize;
    let mut cr = false;
    // In blocks: a large (mapped) message's pages are let go as they are read.
    for block in crate::body::blocks(msg, 1 << 20) {
        for &b in block {
            if cr {
                if b != b'\n' {
                    return false;
                }
                cr = false;
                line = 0;
                continue;
            }
            match b {
                b'\r' => cr = true,
                b'\n' | 0 => return false,
                _ => {
                    line += 1;
                    if line > MAX_LINE {
                        return false;
                    }
                }
            }
        }
    }
    !cr
}

/// Makes text safe to send as 8bit: bare CR and LF become CRLF, NUL is dropped, lines over
/// 998 octets are folded (a CRLF and a space, which keeps a header field one field).
fn normalize_lines(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 2);
    let mut line = 0usize;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        match b {
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                line = 0;
                i += if b == b'\r' && data.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                continue;
            }
            0 => {}
            _ => {
                if line >= MAX_LINE - 1 {
                    out.extend_from_slice(b"\r\n ");
                    line = 1;
                }
                out.push(b);
                line += 1;
            }
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One line of text from untrusted input: control characters (CR, LF, TAB…) become spaces.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Appends `name: value` folded at spaces near [`WRAP`] columns and never over [`MAX_LINE`].
fn field(out: &mut String, name: &str, value: &str) {
    let value = clean(value);
    let mut line = format!("{name}:");
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        for piece in chunks(word, MAX_CHUNK) {
            if line.len() + 1 + piece.len() > WRAP && line.len() > name.len() + 1 {
                out.push_str(&line);
                out.push_str("\r\n");
                line.clear();
            }
            line.push(' ');
            line.push_str(piece);
        }
    }
    out.push_str(&line);
    out.push_str("\r\n");
}

/// Appends a paragraph wrapped at [`WRAP`] columns (indenting continuation lines by `indent`).
fn paragraph(out: &mut String, text: &str, indent: usize) {
    let text = clean(text);
    let mut line = String::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        for piece in chunks(word, MAX_CHUNK) {
            if !line.is_empty() && line.len() + 1 + piece.len() > WRAP {
                out.push_str(&line);
                out.push_str("\r\n");
                line = " ".repeat(indent);
            } else if !line.trim_start().is_empty() {
                line.push(' ');
            }
            line.push_str(piece);
        }
    }
    out.push_str(&line);
    out.push_str("\r\n");
}

/// Splits `s` into pieces of at most `max` octets on character boundaries.
fn chunks(s: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

/// `rfc822` for ASCII addresses, `utf-8` for internationalised ones (RFC 6533).
fn addr_type(addr: &str) -> &'static str {
    if addr.is_ascii() { "rfc822" } else { "utf-8" }
}

/// Part 2: the `message/delivery-status` body (RFC 3464 §2.2, §2.3).
fn delivery_status(input: &DsnInput, mta: &str) -> String {
    let mut out = String::new();
    field(&mut out, "Reporting-MTA", &format!("dns; {mta}"));
    field(&mut out, "X-Estafeta-Queue-ID", input.queue_id);
    if let Some(envid) = input.envid {
        field(&mut out, "Original-Envelope-Id", envid);
    }
    field(&mut out, "Arrival-Date", &rfc5322_date(input.arrival));
    for r in input.recipients {
        out.push_str("\r\n");
        if let Some(orig) = &r.original_recipient {
            field(
                &mut out,
                "Original-Recipient",
                &format!("{}; {orig}", addr_type(orig)),
            );
        }
        field(
            &mut out,
            "Final-Recipient",
            &format!("{}; {}", addr_type(&r.final_recipient), r.final_recipient),
        );
        field(&mut out, "Action", r.action.as_str());
        field(&mut out, "Status", &r.status.to_string());
        if let Some(remote) = &r.remote_mta {
            field(&mut out, "Remote-MTA", remote);
        }
        if let Some(diag) = &r.diagnostic {
            field(&mut out, "Diagnostic-Code", diag);
        }
        if let Some(t) = r.last_attempt {
            field(&mut out, "Last-Attempt-Date", &rfc5322_date(t));
        }
        if let Some(t) = r.will_retry_until {
            field(&mut out, "Will-Retry-Until", &rfc5322_date(t));
        }
    }
    out
}

/// The value after `type;` in a typed field (`dns; mx.example.net` → `mx.example.net`).
fn untyped(value: &str) -> &str {
    match value.split_once(';') {
        Some((_, v)) => v.trim(),
        None => value.trim(),
    }
}

/// One recipient's line in the human part, like Postfix's.
fn human_line(r: &DsnRecipient) -> String {
    let mut s = format!("<{}>", r.final_recipient);
    if let Some(orig) = &r.original_recipient
        && !orig.eq_ignore_ascii_case(&r.final_recipient)
    {
        let _ = write!(s, " (expanded from <{orig}>)");
    }
    s.push_str(": ");
    match (&r.remote_mta, &r.diagnostic) {
        (Some(remote), Some(diag)) => {
            let _ = write!(s, "host {} said: {}", untyped(remote), untyped(diag));
        }
        (None, Some(diag)) => s.push_str(untyped(diag)),
        (Some(remote), None) => {
            let _ = write!(s, "{} (host {})", default_reason(r), untyped(remote));
        }
        (None, None) => s.push_str(&default_reason(r)),
    }
    s
}

/// A few words when there is no diagnostic.
fn default_reason(r: &DsnRecipient) -> String {
    match r.action {
        DsnAction::Failed => format!("delivery failed (status {})", r.status),
        DsnAction::Delayed => format!("delivery temporarily failed (status {})", r.status),
        DsnAction::Delivered => "delivered to mailbox".to_string(),
        DsnAction::Relayed => "relayed to a system that does not send reports".to_string(),
        DsnAction::Expanded => "delivered to a list or alias and expanded".to_string(),
    }
}

/// Part 1: the explanation for people.
fn human_text(input: &DsnInput, mta: &str, note: Option<&str>) -> String {
    let mut out = String::new();
    let _ = write!(out, "This is the mail system at host {mta}.\r\n\r\n");
    let failed: Vec<&DsnRecipient> = input
        .recipients
        .iter()
        .filter(|r| r.action == DsnAction::Failed)
        .collect();
    let delayed: Vec<&DsnRecipient> = input
        .recipients
        .iter()
        .filter(|r| r.action == DsnAction::Delayed)
        .collect();
    let succeeded: Vec<&DsnRecipient> = input
        .recipients
        .iter()
        .filter(|r| r.action.is_success())
        .collect();

    if !failed.is_empty() {
        out.push_str(
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n\r\n",
        );
        let _ = write!(
            out,
            "For further assistance, please send mail to <postmaster@{mta}>.\r\n\r\n\
             If you do so, please include this problem report. You can\r\n\
             delete your own text from the attached returned message.\r\n\r\n"
        );
    }
    if !delayed.is_empty() {
        out.push_str(
            "####################################################################\r\n\
             # THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n\
             ####################################################################\r\n\r\n",
        );
        let hours = input.now.saturating_sub(input.arrival) / 3600;
        let mut text = if hours >= 1 {
            format!(
                "Your message could not be delivered for more than {hours} hour{} to one \
                 or more recipients.",
                if hours == 1 { "" } else { "s" }
            )
        } else {
            "Your message could not yet be delivered to one or more recipients.".to_string()
        };
        if let Some(until) = delayed.iter().filter_map(|r| r.will_retry_until).max() {
            let _ = write!(
                text,
                " It will be retried until {}; you will be told if it fails for good.",
                rfc5322_date(until)
            );
        } else {
            text.push_str(" It will be retried; you will be told if it fails for good.");
        }
        paragraph(&mut out, &text, 0);
        out.push_str("\r\n");
    }
    if !succeeded.is_empty() {
        paragraph(
            &mut out,
            "Your message was successfully delivered to the destination(s) listed below. \
             If the message was delivered to a mailbox you will receive no further \
             notifications. Otherwise you may still receive notifications of mail delivery \
             errors from other systems.",
            0,
        );
        out.push_str("\r\n");
    }
    out.push_str("                   The mail system\r\n");

    for r in failed.iter().chain(&delayed).chain(&succeeded) {
        out.push_str("\r\n");
        paragraph(&mut out, &human_line(r), 4);
    }
    if let Some(note) = note {
        out.push_str("\r\n");
        paragraph(&mut out, note, 0);
    }
    out
}

/// A boundary from the seed that occurs in none of the parts.
fn pick_boundary(input: &DsnInput, parts: &[&[u8]]) -> String {
    let mut state = input.boundary_seed;
    loop {
        state = splitmix64(state);
        let b = format!("=_estafeta_{:016x}_{}", state, input.now);
        let needle = format!("--{b}");
        if !parts
            .iter()
            .any(|p| p.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            return b;
        }
    }
}

/// A small mixing function (splitmix64) so that nearby seeds give unrelated boundaries.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
