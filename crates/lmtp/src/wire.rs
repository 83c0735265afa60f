//! The sans-IO half of the client: what the LMTP server offered, the command lines, reply
//! assembly with its limits, the one classification of replies, and the bookkeeping of a
//! transaction's per-recipient outcomes. No sockets, no clock.

use estafeta_proto::reply::{self as replies, parse_received_line};
use estafeta_proto::{Body, MailParams, RcptParams, Reply};
use estafeta_queue::{Failure, Outcome};

/// The longest reply line accepted, in octets (as the relay client: RFC 5321 §4.5.3.1.5
/// allows 512; some servers write longer ones). A longer line is a protocol error.
pub const MAX_REPLY_LINE: usize = 2048;

/// The most lines accepted in one reply. More are a protocol error.
pub const MAX_REPLY_LINES: usize = 100;

/// What the server offered in its LHLO reply (RFC 2033 §4.1: the EHLO keywords).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extensions {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE (RFC 1870).
    pub size: bool,
    /// 8BITMIME (RFC 6152).
    pub eight_bit_mime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
}

impl Extensions {
    /// Reads the keywords of a LHLO reply (every line but the first).
    pub fn parse(reply: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let keyword = line.split_ascii_whitespace().next().unwrap_or("");
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => ext.size = true,
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "DSN" => ext.dsn = true,
                _ => {}
            }
        }
        ext
    }
}

/// True when `addr` could break out of its command line (a CR or LF, or `>`); addresses
/// come validated from the queue, so this is a last guard against command injection.
pub(crate) fn unsafe_address(addr: &str) -> bool {
    addr.contains(['\r', '\n', '>', '<'])
}

/// `MAIL FROM:<…>` with the parameters the server offered: `SIZE=` (SIZE), `BODY=`
/// (8BITMIME; BINARYMIME content goes as 8BITMIME, since LMTP here sends with DATA),
/// `SMTPUTF8` (SMTPUTF8), `RET=` and `ENVID=` (DSN). A parameter the server did not offer is
/// left out and the message sent anyway: a local server that takes the content as it is
/// (Dovecot 2.3 offers neither SMTPUTF8 nor DSN) is better than a bounce.
pub(crate) fn mail_command(
    from: &str,
    params: &MailParams,
    ext: &Extensions,
    size: usize,
) -> String {
    let mut cmd = format!("MAIL FROM:<{from}>");
    if ext.size {
        cmd.push_str(&format!(" SIZE={size}"));
    }
    if ext.eight_bit_mime {
        match params.body {
            Some(Body::SevenBit) => cmd.push_str(" BODY=7BIT"),
            Some(Body::EightBitMime | Body::BinaryMime) => cmd.push_str(" BODY=8BITMIME"),
            None => {}
        }
    }
    if params.smtputf8 && ext.smtputf8 {
        cmd.push_str(" SMTPUTF8");
    }
    if ext.dsn {
        if let Some(ret) = params.ret {
            cmd.push_str(" RET=");
            cmd.push_str(ret.as_str());
        }
        if let Some(envid) = &params.envid {
            cmd.push_str(" ENVID=");
            cmd.push_str(envid);
        }
    }
    cmd.push_str("\r\n");
    cmd
}

/// `RCPT TO:<…>` with `NOTIFY=` and `ORCPT=` when the server offered DSN.
pub(crate) fn rcpt_command(addr: &str, params: &RcptParams, ext: &Extensions) -> String {
    let mut cmd = format!("RCPT TO:<{addr}>");
    if ext.dsn {
        if let Some(notify) = params.notify {
            cmd.push_str(" NOTIFY=");
            cmd.push_str(&notify.to_wire());
        }
        if let Some(orcpt) = &params.orcpt {
            cmd.push_str(&format!(" ORCPT={};{}", orcpt.addr_type, orcpt.xtext));
        }
    }
    cmd.push_str("\r\n");
    cmd
}

/// Why the conversation stopped without a reply to classify.
#[derive(Debug)]
pub(crate) enum Broken {
    /// The wait ran out.
    Timeout,
    /// The server closed the connection.
    Closed,
    /// A read or write failed.
    Io(std::io::Error),
    /// A reply that does not follow RFC 5321 §4.2 (or is over the limits).
    Malformed(String),
}

impl Broken {
    /// The reply this side writes about it (from the one reply table): `peer` names the
    /// server (`LMTP server unix:/run/dovecot/lmtp`), `doing` the step.
    pub fn reply(&self, peer: &str, doing: &str) -> Reply {
        match self {
            Broken::Timeout => replies::conversation_timed_out(peer, doing),
            Broken::Closed => replies::connection_lost(peer, doing, None),
            Broken::Io(e) => replies::connection_lost(peer, doing, Some(&e.to_string())),
            Broken::Malformed(what) => replies::peer_protocol_error(peer, doing, what),
        }
    }
}

/// Assembles one (possibly multi-line) reply from received lines: `ddd-text` lines, then
/// `ddd text` (RFC 5321 §4.2.1), with at most [`MAX_REPLY_LINES`] lines of one code.
#[derive(Debug, Default)]
pub(crate) struct ReplyAssembler {
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyAssembler {
    /// Feeds one line without its line break: `Ok(Some(reply))` when it was the last.
    pub fn line(&mut self, raw: &[u8]) -> Result<Option<Reply>, Broken> {
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(Broken::Malformed(format!(
                "reply longer than {MAX_REPLY_LINES} lines"
            )));
        }
        let (code, last, text) = parse_received_line(raw).ok_or_else(|| {
            Broken::Malformed(format!(
                "malformed reply line: {}",
                String::from_utf8_lossy(&raw[..raw.len().min(80)])
            ))
        })?;
        if self.code.is_some_and(|c| c != code) {
            return Err(Broken::Malformed(format!(
                "reply code changed within a reply: {}",
                String::from_utf8_lossy(&raw[..raw.len().min(80)])
            )));
        }
        self.code = Some(code);
        self.lines.push(text);
        if !last {
            return Ok(None);
        }
        let lines = std::mem::take(&mut self.lines);
        Ok(Some(Reply::from_received(
            self.code.take().unwrap_or_default(),
            lines,
        )))
    }
}

/// THE classification of an LMTP server's reply to a command that concerns recipients, as
/// one exhaustive match on the reply code (the same table as the relay client's):
///
/// - 2yz: delivered (for RCPT: accepted); the text is `lmtp <remote> said: <reply>`;
/// - 421 on any command: temporary, and the session is over (the caller marks every
///   recipient still open with it);
/// - 552 on RCPT: temporary (RFC 5321 §4.5.3.1.10: old servers say 552 for "too many
///   recipients"; Postfix reads it as 452 too);
/// - any other 4yz: temporary; 5yz: permanent;
/// - 3yz where a final reply was expected, and codes outside 200–599: temporary.
pub fn classify(reply: &Reply, command: &str, remote: &str) -> Outcome {
    let failure = || Failure {
        reply: reply.clone(),
        remote: Some(remote.to_string()),
        command: Some(command.to_string()),
    };
    let is_rcpt = command
        .get(..4)
        .is_some_and(|c| c.eq_ignore_ascii_case("RCPT"));
    match (reply.code / 100, reply.code) {
        (2, _) => Outcome::Delivered(format!("lmtp {remote} said: {reply}")),
        (4, 421) => Outcome::TempFail(failure()),
        (5, 552) if is_rcpt => Outcome::TempFail(failure()),
        (4, _) => Outcome::TempFail(failure()),
        (5, _) => Outcome::PermFail(failure()),
        (3, _) => Outcome::TempFail(failure()),
        (0 | 1 | 6.., _) => Outcome::TempFail(failure()),
    }
}

/// What a server says about one recipient when asked at RCPT time (see
/// [`crate::Lmtp::verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The server accepted the recipient.
    Exists,
    /// The server refused the recipient permanently (a 5yz reply other than 552, such as
    /// Dovecot's `550 5.1.1 <x> User doesn't exist`); its reply.
    Unknown(Reply),
    /// The question could not be answered now: the server is unreachable, or answered
    /// with a temporary failure (4yz, 552). The reply says why; the caller answers the SMTP
    /// client with a temporary failure or accepts the recipient, as its policy says.
    Unavailable(Reply),
}

impl Verification {
    /// The verification that `reply` to `RCPT TO:<x>` gives, by [`classify`].
    pub(crate) fn from_rcpt_reply(reply: &Reply, command: &str, remote: &str) -> Verification {
        match classify(reply, command, remote) {
            Outcome::Delivered(_) | Outcome::Relayed { .. } => Verification::Exists,
            Outcome::PermFail(f) => Verification::Unknown(f.reply),
            Outcome::TempFail(f) => Verification::Unavailable(f.reply),
        }
    }
}

/// Whether the session can go on after a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Go on with the next step of the transaction.
    Continue,
    /// The transaction is over (every recipient decided); the session may carry another.
    Done,
    /// The server said 421: the session is over; every recipient still open was decided.
    Closed,
}

/// The per-recipient bookkeeping of one transaction: MAIL, RCPT each, DATA, then one reply
/// per accepted recipient after the final dot (RFC 2033 §4.2), in the order of the accepted
/// RCPTs. Fed with replies, it decides outcomes; it never does I/O.
#[derive(Debug)]
pub(crate) struct Transaction {
    remote: String,
    rcpts: Vec<String>,
    out: Vec<Option<Outcome>>,
    accepted: Vec<usize>,
    answered: usize,
}

impl Transaction {
    /// A transaction to `rcpts` (addresses without `<>`) with the server `remote`
    /// (its address, as [`Failure::remote`] shows it).
    pub fn new(remote: &str, rcpts: Vec<String>) -> Self {
        let n = rcpts.len();
        Transaction {
            remote: remote.to_string(),
            rcpts,
            out: vec![None; n],
            accepted: Vec::new(),
            answered: 0,
        }
    }

    /// `RCPT TO:<addr>`, the command name for recipient `i` in failures.
    pub fn rcpt_name(&self, i: usize) -> String {
        format!("RCPT TO:<{}>", self.rcpts[i])
    }

    /// Decides recipient `i` before any command (an address that cannot be sent).
    pub fn refuse(&mut self, i: usize, outcome: Outcome) {
        self.out[i] = Some(outcome);
    }

    /// True when recipient `i` is still undecided and was not refused locally.
    pub fn open(&self, i: usize) -> bool {
        self.out[i].is_none()
    }

    /// The reply to MAIL (`name`: `MAIL FROM:<x>`). A refusal decides every recipient.
    pub fn mail(&mut self, reply: &Reply, name: &str) -> Step {
        match classify(reply, name, &self.remote) {
            Outcome::Delivered(_) | Outcome::Relayed { .. } => Step::Continue,
            refused => {
                self.decide_open(&refused);
                if reply.code == 421 {
                    Step::Closed
                } else {
                    Step::Done
                }
            }
        }
    }

    /// The reply to recipient `i`'s RCPT.
    pub fn rcpt(&mut self, i: usize, reply: &Reply) -> Step {
        let name = self.rcpt_name(i);
        match classify(reply, &name, &self.remote) {
            Outcome::Delivered(_) | Outcome::Relayed { .. } => {
                self.accepted.push(i);
                Step::Continue
            }
            refused => {
                self.out[i] = Some(refused.clone());
                if reply.code == 421 {
                    self.decide_open(&refused);
                    Step::Closed
                } else {
                    Step::Continue
                }
            }
        }
    }

    /// The recipients accepted so far, in the order of their RCPTs.
    pub fn accepted(&self) -> &[usize] {
        &self.accepted
    }

    /// The reply to DATA: 354 goes on to the content; anything else decides every accepted
    /// recipient.
    pub fn data(&mut self, reply: &Reply) -> Step {
        if reply.code == 354 {
            return Step::Continue;
        }
        let outcome = classify(reply, "DATA", &self.remote);
        self.decide_open(&outcome);
        if reply.code == 421 {
            Step::Closed
        } else {
            Step::Done
        }
    }

    /// The next of the replies after the final dot, for the next accepted recipient that
    /// has none yet (RFC 2033 §4.2). `Done` after the last one.
    pub fn final_reply(&mut self, reply: &Reply) -> Step {
        let Some(&i) = self.accepted.get(self.answered) else {
            return Step::Done;
        };
        self.answered += 1;
        let outcome = classify(reply, "end of data", &self.remote);
        self.out[i] = Some(outcome.clone());
        if reply.code == 421 {
            self.decide_open(&outcome);
            return Step::Closed;
        }
        if self.answered == self.accepted.len() {
            Step::Done
        } else {
            Step::Continue
        }
    }

    /// The session broke: every undecided recipient fails temporarily with `failure`.
    pub fn broken(&mut self, failure: Failure) {
        self.decide_open(&Outcome::TempFail(failure));
    }

    fn decide_open(&mut self, outcome: &Outcome) {
        for o in self.out.iter_mut().filter(|o| o.is_none()) {
            *o = Some(outcome.clone());
        }
    }

    /// One outcome per recipient, in order. A recipient left undecided (which no path
    /// should allow) fails temporarily.
    pub fn finish(self) -> Vec<Outcome> {
        self.out
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Outcome::TempFail(Failure::local(replies::recipient_undecided()))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use estafeta_proto::{Notify, Orcpt, Ret, Status};

    fn reply(wire: &str) -> Reply {
        let mut a = ReplyAssembler::default();
        let mut got = None;
        for line in wire.split("\r\n").filter(|l| !l.is_empty()) {
            got = a.line(line.as_bytes()).unwrap();
        }
        got.expect("a complete reply")
    }

    #[test]
    fn lhlo_keywords() {
        let e = Extensions::parse(&reply(
            "250-vm\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n",
        ));
        assert_eq!(
            e,
            Extensions {
                pipelining: true,
                eight_bit_mime: true,
                ..Extensions::default()
            }
        );
        let e = Extensions::parse(&reply(
            "250-x\r\n250-smtputf8\r\n250-DSN\r\n250 SIZE 100\r\n",
        ));
        assert!(e.smtputf8 && e.dsn && e.size && !e.pipelining);
    }

    #[test]
    fn parameters_only_when_offered() {
        let params = MailParams {
            body: Some(Body::EightBitMime),
            smtputf8: true,
            ret: Some(Ret::Hdrs),
            envid: Some("id+2B1".into()),
            ..MailParams::default()
        };
        let none = Extensions::default();
        assert_eq!(
            mail_command("a@b", &params, &none, 10),
            "MAIL FROM:<a@b>\r\n"
        );
        let all = Extensions {
            pipelining: true,
            size: true,
            eight_bit_mime: true,
            smtputf8: true,
            dsn: true,
        };
        assert_eq!(
            mail_command("a@b", &params, &all, 10),
            "MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+2B1\r\n"
        );
        assert_eq!(
            mail_command("", &MailParams::default(), &all, 0),
            "MAIL FROM:<> SIZE=0\r\n"
        );
        let rp = RcptParams {
            notify: Some(Notify {
                failure: true,
                delay: true,
                ..Notify::default()
            }),
            orcpt: Some(Orcpt {
                addr_type: "rfc822".into(),
                xtext: "x@y".into(),
            }),
        };
        assert_eq!(rcpt_command("x@y", &rp, &none), "RCPT TO:<x@y>\r\n");
        assert_eq!(
            rcpt_command("x@y", &rp, &all),
            "RCPT TO:<x@y> NOTIFY=FAILURE,DELAY ORCPT=rfc822;x@y\r\n"
        );
    }

    #[test]
    fn unsafe_addresses() {
        assert!(!unsafe_address("alice@example.org"));
        assert!(!unsafe_address(""));
        for bad in ["a\r\nRSET", "a\nb", "a>b", "<a"] {
            assert!(unsafe_address(bad), "{bad:?}");
        }
    }

    #[test]
    fn reply_assembly_and_limits() {
        let r = reply("550-5.1.1 first\r\n550 5.1.1 second\r\n");
        assert_eq!((r.code, r.status), (550, Some(Status::new(5, 1, 1))));
        assert_eq!(r.lines, ["first", "second"]);
        let mut a = ReplyAssembler::default();
        assert!(matches!(a.line(b"25O ok"), Err(Broken::Malformed(_))));
        let mut a = ReplyAssembler::default();
        a.line(b"250-a").unwrap();
        assert!(matches!(a.line(b"251 b"), Err(Broken::Malformed(_))));
        let mut a = ReplyAssembler::default();
        for _ in 0..MAX_REPLY_LINES {
            assert!(a.line(b"250-x").unwrap().is_none());
        }
        assert!(matches!(a.line(b"250 x"), Err(Broken::Malformed(_))));
        // The assembler starts afresh after each reply.
        let mut a = ReplyAssembler::default();
        assert_eq!(a.line(b"250 ok").unwrap().unwrap().code, 250);
        assert_eq!(a.line(b"451 no").unwrap().unwrap().code, 451);
    }

    #[test]
    fn classification_table() {
        let remote = "unix:/run/dovecot/lmtp";
        let cases = [
            ("250 2.0.0 <a@b> x Saved", "end of data", "D"),
            ("250 2.1.5 OK", "RCPT TO:<a@b>", "D"),
            ("421 4.3.2 shutting down", "end of data", "T"),
            (
                "451 4.3.0 <a@b> Temporary internal error",
                "end of data",
                "T",
            ),
            ("452 4.2.2 <c@d> Quota exceeded", "end of data", "T"),
            ("552 5.2.2 <c@d> Quota exceeded", "end of data", "P"),
            ("552 5.2.2 <c@d> Quota exceeded", "RCPT TO:<c@d>", "T"),
            ("550 5.1.1 <x@d> User doesn't exist", "RCPT TO:<x@d>", "P"),
            ("354 go ahead", "end of data", "T"),
            ("199 odd", "end of data", "T"),
            ("600 odd", "end of data", "T"),
        ];
        for (wire, cmd, want) in cases {
            let r = reply(&format!("{wire}\r\n"));
            let got = match classify(&r, cmd, remote) {
                Outcome::Delivered(text) => {
                    assert_eq!(text, format!("lmtp {remote} said: {r}"));
                    "D"
                }
                Outcome::TempFail(f) | Outcome::PermFail(f)
                    if f.remote.as_deref() != Some(remote) || f.command.as_deref() != Some(cmd) =>
                {
                    panic!("failure without remote/command: {f:?}")
                }
                Outcome::TempFail(_) => "T",
                Outcome::PermFail(_) => "P",
                Outcome::Relayed { .. } => "R",
            };
            assert_eq!(got, want, "{wire} to {cmd}");
        }
    }

    #[test]
    fn verification_from_rcpt() {
        let cmd = "RCPT TO:<x@d>";
        assert_eq!(
            Verification::from_rcpt_reply(&reply("250 2.1.5 OK\r\n"), cmd, "r"),
            Verification::Exists
        );
        let unknown = reply("550 5.1.1 <x@d> User doesn't exist: x@d\r\n");
        assert_eq!(
            Verification::from_rcpt_reply(&unknown, cmd, "r"),
            Verification::Unknown(unknown.clone())
        );
        for wire in [
            "451 4.3.0 later\r\n",
            "552 5.2.2 full\r\n",
            "421 4.3.2 bye\r\n",
        ] {
            let r = reply(wire);
            assert_eq!(
                Verification::from_rcpt_reply(&r, cmd, "r"),
                Verification::Unavailable(r.clone())
            );
        }
    }

    fn kinds(outcomes: &[Outcome]) -> String {
        outcomes
            .iter()
            .map(|o| match o {
                Outcome::Delivered(_) | Outcome::Relayed { .. } => 'D',
                Outcome::TempFail(_) => 'T',
                Outcome::PermFail(_) => 'P',
            })
            .collect()
    }

    fn rcpts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("u{i}@d")).collect()
    }

    #[test]
    fn one_reply_per_accepted_recipient_in_rcpt_order() {
        let mut t = Transaction::new("r", rcpts(4));
        assert_eq!(
            t.mail(&reply("250 2.1.0 OK\r\n"), "MAIL FROM:<>"),
            Step::Continue
        );
        assert_eq!(t.rcpt(0, &reply("250 2.1.5 OK\r\n")), Step::Continue);
        assert_eq!(t.rcpt(1, &reply("550 5.1.1 no\r\n")), Step::Continue);
        assert_eq!(t.rcpt(2, &reply("250 2.1.5 OK\r\n")), Step::Continue);
        assert_eq!(t.rcpt(3, &reply("250 2.1.5 OK\r\n")), Step::Continue);
        assert_eq!(t.accepted(), [0, 2, 3]);
        assert_eq!(t.data(&reply("354 OK\r\n")), Step::Continue);
        assert_eq!(t.final_reply(&reply("250 2.0.0 saved\r\n")), Step::Continue);
        assert_eq!(t.final_reply(&reply("552 5.2.2 full\r\n")), Step::Continue);
        assert_eq!(t.final_reply(&reply("451 4.3.0 later\r\n")), Step::Done);
        let out = t.finish();
        assert_eq!(kinds(&out), "DPPT");
        let Outcome::PermFail(f) = &out[2] else {
            unreachable!()
        };
        assert_eq!(f.command.as_deref(), Some("end of data"));
        let Outcome::PermFail(f) = &out[1] else {
            unreachable!()
        };
        assert_eq!(f.command.as_deref(), Some("RCPT TO:<u1@d>"));
    }

    #[test]
    fn refusals_and_breaks_decide_the_rest() {
        // MAIL refused: every recipient.
        let mut t = Transaction::new("r", rcpts(2));
        assert_eq!(
            t.mail(&reply("550 5.7.1 no\r\n"), "MAIL FROM:<x>"),
            Step::Done
        );
        assert_eq!(kinds(&t.finish()), "PP");
        // DATA refused: the accepted ones only.
        let mut t = Transaction::new("r", rcpts(2));
        t.mail(&reply("250 OK\r\n"), "MAIL FROM:<x>");
        t.rcpt(0, &reply("550 no\r\n"));
        t.rcpt(1, &reply("250 OK\r\n"));
        assert_eq!(t.data(&reply("451 4.3.0 later\r\n")), Step::Done);
        assert_eq!(kinds(&t.finish()), "PT");
        // 421 in the middle of the final replies: the answered keep their outcome.
        let mut t = Transaction::new("r", rcpts(3));
        t.mail(&reply("250 OK\r\n"), "MAIL FROM:<x>");
        for i in 0..3 {
            t.rcpt(i, &reply("250 OK\r\n"));
        }
        t.data(&reply("354 OK\r\n"));
        t.final_reply(&reply("250 2.0.0 saved\r\n"));
        assert_eq!(t.final_reply(&reply("421 4.3.2 bye\r\n")), Step::Closed);
        assert_eq!(kinds(&t.finish()), "DTT");
        // The connection broke after one final reply.
        let mut t = Transaction::new("r", rcpts(3));
        t.refuse(
            0,
            Outcome::PermFail(Failure::local(replies::bad_recipient_syntax("x"))),
        );
        assert!(!t.open(0) && t.open(1));
        t.mail(&reply("250 OK\r\n"), "MAIL FROM:<x>");
        t.rcpt(1, &reply("250 OK\r\n"));
        t.rcpt(2, &reply("250 OK\r\n"));
        t.data(&reply("354 OK\r\n"));
        t.final_reply(&reply("250 2.0.0 saved\r\n"));
        t.broken(Failure::local(
            Broken::Closed.reply("LMTP server x", "receiving"),
        ));
        assert_eq!(kinds(&t.finish()), "PDT");
        // 421 to a RCPT ends everything.
        let mut t = Transaction::new("r", rcpts(2));
        t.mail(&reply("250 OK\r\n"), "MAIL FROM:<x>");
        assert_eq!(t.rcpt(0, &reply("421 4.3.2 bye\r\n")), Step::Closed);
        assert_eq!(kinds(&t.finish()), "TT");
    }

    #[test]
    fn broken_replies_name_the_server() {
        let r = Broken::Timeout.reply("LMTP server unix:/x", "sending end of data");
        assert_eq!((r.code, r.status), (451, Some(Status::new(4, 4, 2))));
        assert!(r.text().contains("LMTP server unix:/x"), "{r}");
        let r = Broken::Malformed("bad".into()).reply("LMTP server unix:/x", "reading");
        assert_eq!(r.status, Some(Status::new(4, 5, 0)));
    }
}
