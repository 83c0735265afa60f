//! One outbound mail transaction without I/O: MAIL, every RCPT, DATA, the content and the
//! final reply (RFC 5321 §3.3), pipelined when the peer offers PIPELINING (RFC 2920), with an
//! RSET first when the session's previous transaction needs one.
//!
//! The machine says what to do next ([`Transaction::poll`]: send these commands, send the
//! content, read a reply) and takes in the replies ([`Transaction::reply`]). It owns the one
//! classification of every reply into per-recipient outcomes ([`classify`]) and knows when the
//! session is over (a 421 anywhere). The driver in [`crate::client`] does the reading and the
//! writing, with the timeouts [`Wait`] names; the tests below drive it with scripted replies
//! and no socket, the way the server's session tests drive `proto::Session`.

use std::collections::VecDeque;

use estafeta_proto::reply::{self as replies};
use estafeta_proto::{Body, MailParams, RcptParams, Reply};
use estafeta_queue::{Failure, Outcome};

use crate::client::{Extensions, OutboundMessage};

/// Which of RFC 5321 §4.5.3.2's timeouts a step runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// RSET (the short one of EHLO).
    Rset,
    /// MAIL (5 min).
    Mail,
    /// RCPT (5 min).
    Rcpt,
    /// The reply to DATA (2 min).
    DataInit,
    /// Each block of content (3 min).
    DataBlock,
    /// The reply to the end of the content (10 min).
    DataFinal,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write `bytes` (one command, or a pipelined group).
    Send {
        /// The commands, CRLF-terminated.
        bytes: Vec<u8>,
        /// The timeout.
        wait: Wait,
        /// What a broken connection was doing ("sending MAIL FROM").
        doing: &'static str,
        /// The command a failure is reported for.
        command: String,
    },
    /// Write the message content, dot-stuffed, and the end marker (`command` is DATA).
    SendContent,
    /// Read one reply and hand it to [`Transaction::reply`].
    Receive {
        /// The timeout.
        wait: Wait,
        /// What a broken connection was doing ("receiving the RCPT TO reply").
        doing: &'static str,
        /// The command a failure is reported for.
        command: String,
    },
    /// Over: every recipient is decided, or the session ended ([`Transaction::over`]).
    Done,
}

/// What the next reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Rset,
    Mail,
    Rcpt(usize),
    Data,
    /// The end of an empty content, sent after a pipelined 354 when no RCPT was accepted.
    EmptyEnd,
    Final,
}

/// What the RCPT reply said about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// 2yz: the recipient is accepted; its outcome comes from the end of the content.
    Accepted,
    /// Refused (temporarily or permanently, as [`classify`] said).
    Rejected(Outcome),
}

/// THE classification of a reply to a command that concerns recipients, as one exhaustive
/// match on the reply code:
///
/// - 2yz: delivered (or, for RCPT, accepted); the text is `remote said: <reply>`;
/// - 421 on any command: temporary (and the session is over: the caller marks every
///   recipient still open with it);
/// - 552 on RCPT: temporary — RFC 5321 §4.5.3.1.10 asks for 452 "too many recipients", but
///   old servers say 552 (RFC 5321 §4.5.3.1.10, last paragraph);
/// - any other 4yz: temporary;
/// - 5yz: permanent;
/// - 3yz where a final reply was expected, and codes outside 200–599: temporary (the peer
///   does not speak the protocol; another attempt may reach a better one). A reply that does
///   not parse at all never becomes a [`Reply`]; the client turns it into a temporary
///   failure before classification.
///
/// The enhanced status code is carried along but does not decide: the basic code is what
/// RFC 5321 defines the client's behaviour by.
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
        (2, _) => Outcome::Delivered(format!("{remote} said: {reply}")),
        (4, 421) => Outcome::TempFail(failure()),
        (5, 552) if is_rcpt => Outcome::TempFail(failure()),
        (4, _) => Outcome::TempFail(failure()),
        (5, _) => Outcome::PermFail(failure()),
        (3, _) => Outcome::TempFail(failure()),
        (0 | 1 | 6.., _) => Outcome::TempFail(failure()),
    }
}

/// The [`RcptResult`] of a reply to RCPT, from [`classify`].
pub fn rcpt_result(reply: &Reply, command: &str, remote: &str) -> RcptResult {
    match classify(reply, command, remote) {
        Outcome::Delivered(_) | Outcome::Relayed { .. } => RcptResult::Accepted,
        other => RcptResult::Rejected(other),
    }
}

/// One transaction in progress.
#[derive(Debug)]
pub struct Transaction {
    /// The MAIL command (CRLF-terminated) and its name for reports.
    mail: String,
    mail_name: String,
    /// Each RCPT command (CRLF-terminated) and its name.
    rcpts: Vec<(String, String)>,
    pipelining: bool,
    dsn: bool,
    /// The host name (for failures) and `host[address]` (for the success detail).
    host: String,
    peer: String,
    steps: VecDeque<Step>,
    expect: VecDeque<Expect>,
    out: Vec<Option<Outcome>>,
    accepted: Vec<usize>,
    mail_ok: bool,
    needs_rset: bool,
    over: Option<Failure>,
}

impl Transaction {
    /// A transaction for `msg` in a session whose peer offered `ext`; `needs_rset` when the
    /// session's previous transaction was left open (refused MAIL, no recipient accepted).
    /// `host` is the peer's name, `peer` its `host[address]`. A message the peer cannot take
    /// (SMTPUTF8 not offered, over its SIZE) is decided at once, nothing sent.
    pub fn new(
        msg: &OutboundMessage<'_>,
        ext: &Extensions,
        needs_rset: bool,
        host: &str,
        peer: &str,
    ) -> Transaction {
        let mut t = Transaction {
            mail: mail_command(msg, ext),
            mail_name: format!("MAIL FROM:<{}>", msg.from),
            rcpts: msg
                .rcpts
                .iter()
                .map(|(addr, params)| {
                    (rcpt_command(addr, params, ext), format!("RCPT TO:<{addr}>"))
                })
                .collect(),
            pipelining: ext.pipelining,
            dsn: ext.dsn,
            host: host.to_string(),
            peer: peer.to_string(),
            steps: VecDeque::new(),
            expect: VecDeque::new(),
            out: vec![None; msg.rcpts.len()],
            accepted: Vec::new(),
            mail_ok: false,
            needs_rset,
            over: None,
        };
        if msg.needs_smtputf8 && !ext.smtputf8 {
            let outcome = Outcome::PermFail(Failure::local(replies::smtputf8_not_offered(peer)));
            t.decide_all(&outcome);
            return t;
        }
        let size = msg.content.len() as u64;
        if let Some(limit) = ext.size
            && limit > 0
            && size > limit
        {
            let outcome =
                Outcome::PermFail(Failure::local(replies::too_big_for_peer(size, limit, peer)));
            t.decide_all(&outcome);
            return t;
        }
        if t.needs_rset {
            t.send(b"RSET\r\n".to_vec(), Wait::Rset, "sending RSET", "RSET");
            t.receive(Expect::Rset, Wait::Rset, "receiving the RSET reply", "RSET");
        } else {
            t.start();
        }
        t
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Step {
        self.steps.pop_front().unwrap_or(Step::Done)
    }

    /// The reply the last [`Step::Receive`] read.
    pub fn reply(&mut self, reply: Reply) {
        let Some(expect) = self.expect.pop_front() else {
            return;
        };
        // RFC 5321 §3.8: a 421 to any command ends the session; the recipients still open
        // get it (as a temporary failure) from the driver.
        if reply.code == 421 {
            let command = match expect {
                Expect::Rset => "RSET".to_string(),
                Expect::Mail => self.mail_name.clone(),
                Expect::Rcpt(i) => self.rcpts[i].1.clone(),
                Expect::Data => "DATA".to_string(),
                Expect::EmptyEnd | Expect::Final => "end of DATA".to_string(),
            };
            return self.end_session(reply, &command);
        }
        match expect {
            Expect::Rset => {
                if reply.code / 100 == 2 {
                    self.needs_rset = false;
                    self.start();
                } else {
                    self.end_session(reply, "RSET");
                }
            }
            Expect::Mail => {
                match classify(&reply, &self.mail_name, &self.host) {
                    Outcome::Delivered(_) | Outcome::Relayed { .. } => {
                        self.mail_ok = true;
                        if self.pipelining {
                            // The group's RCPT and DATA replies come next.
                        } else if self.rcpts.is_empty() {
                            // Nobody to send to: the transaction stays open.
                            self.needs_rset = true;
                            self.finish();
                        } else {
                            self.next_rcpt(0);
                        }
                    }
                    refused => {
                        self.needs_rset = true;
                        self.decide_all(&refused);
                        if !self.pipelining {
                            self.finish();
                        }
                        // Pipelined: the RCPT and DATA replies are read and ignored (but a
                        // 421 among them).
                    }
                }
            }
            Expect::Rcpt(i) => {
                let name = self.rcpts[i].1.clone();
                if self.mail_ok {
                    match rcpt_result(&reply, &name, &self.host) {
                        RcptResult::Accepted => self.accepted.push(i),
                        RcptResult::Rejected(outcome) => self.out[i] = Some(outcome),
                    }
                }
                if !self.pipelining {
                    if i + 1 < self.rcpts.len() {
                        self.next_rcpt(i + 1);
                    } else if self.accepted.is_empty() {
                        self.needs_rset = true;
                        self.finish();
                    } else {
                        self.send(b"DATA\r\n".to_vec(), Wait::DataInit, "sending DATA", "DATA");
                        self.receive(
                            Expect::Data,
                            Wait::DataInit,
                            "receiving the DATA reply",
                            "DATA",
                        );
                    }
                }
            }
            Expect::Data => {
                if reply.code == 354 {
                    if self.accepted.is_empty() {
                        // Pipelined: the group went out before the refusals came back; end
                        // the empty content and forget the reply (RFC 2920 §3.1).
                        self.send(
                            b".\r\n".to_vec(),
                            Wait::DataBlock,
                            "sending end of DATA",
                            "DATA",
                        );
                        self.receive(
                            Expect::EmptyEnd,
                            Wait::DataFinal,
                            "receiving the end of DATA reply",
                            "DATA",
                        );
                    } else {
                        self.steps.push_back(Step::SendContent);
                        self.receive(
                            Expect::Final,
                            Wait::DataFinal,
                            "receiving the end of DATA reply",
                            "end of DATA",
                        );
                    }
                } else {
                    self.needs_rset = true;
                    if !self.accepted.is_empty() {
                        let outcome = classify(&reply, "DATA", &self.host);
                        self.decide_all(&outcome);
                    }
                    self.finish();
                }
            }
            Expect::EmptyEnd => {
                self.needs_rset = true;
                self.finish();
            }
            Expect::Final => {
                let outcome = match classify(&reply, "end of DATA", &self.host) {
                    Outcome::Delivered(_) => Outcome::Relayed {
                        detail: format!("{} said: {reply}", self.peer),
                        dsn_passed: self.dsn,
                    },
                    other => other,
                };
                self.decide_all(&outcome);
                self.finish();
            }
        }
    }

    /// The outcome of each recipient, in order (`None`: undecided, when the session ended).
    pub fn outcomes(&self) -> &[Option<Outcome>] {
        &self.out
    }

    /// The session is over (a 421, a refused RSET), with the failure for the recipients
    /// still undecided.
    pub fn over(&self) -> Option<&Failure> {
        self.over.as_ref()
    }

    /// The next transaction of the session must start with RSET.
    pub fn needs_rset(&self) -> bool {
        self.needs_rset
    }

    /// MAIL, then (pipelined) every RCPT and DATA in one group (RFC 2920 §3.1), DATA last.
    fn start(&mut self) {
        if self.pipelining {
            let mut group = self.mail.clone();
            for (cmd, _) in &self.rcpts {
                group.push_str(cmd);
            }
            group.push_str("DATA\r\n");
            let name = self.mail_name.clone();
            self.send(group.into_bytes(), Wait::Mail, "sending MAIL FROM", &name);
            self.receive(
                Expect::Mail,
                Wait::Mail,
                "receiving the MAIL FROM reply",
                &name,
            );
            for i in 0..self.rcpts.len() {
                let name = self.rcpts[i].1.clone();
                self.receive(
                    Expect::Rcpt(i),
                    Wait::Rcpt,
                    "receiving the RCPT TO reply",
                    &name,
                );
            }
            self.receive(
                Expect::Data,
                Wait::DataInit,
                "receiving the DATA reply",
                "DATA",
            );
        } else {
            let (mail, name) = (self.mail.clone(), self.mail_name.clone());
            self.send(mail.into_bytes(), Wait::Mail, "sending MAIL FROM", &name);
            self.receive(
                Expect::Mail,
                Wait::Mail,
                "receiving the MAIL FROM reply",
                &name,
            );
        }
    }

    fn next_rcpt(&mut self, i: usize) {
        let (cmd, name) = self.rcpts[i].clone();
        self.send(cmd.into_bytes(), Wait::Rcpt, "sending RCPT TO", &name);
        self.receive(
            Expect::Rcpt(i),
            Wait::Rcpt,
            "receiving the RCPT TO reply",
            &name,
        );
    }

    fn send(&mut self, bytes: Vec<u8>, wait: Wait, doing: &'static str, command: &str) {
        self.steps.push_back(Step::Send {
            bytes,
            wait,
            doing,
            command: command.to_string(),
        });
    }

    fn receive(&mut self, expect: Expect, wait: Wait, doing: &'static str, command: &str) {
        self.expect.push_back(expect);
        self.steps.push_back(Step::Receive {
            wait,
            doing,
            command: command.to_string(),
        });
    }

    /// Nothing more to send or read.
    fn finish(&mut self) {
        self.steps.clear();
        self.expect.clear();
    }

    fn end_session(&mut self, reply: Reply, command: &str) {
        self.over = Some(Failure {
            reply,
            remote: Some(self.host.clone()),
            command: Some(command.to_string()),
        });
        self.finish();
    }

    fn decide_all(&mut self, outcome: &Outcome) {
        for o in self.out.iter_mut().filter(|o| o.is_none()) {
            *o = Some(outcome.clone());
        }
    }
}

/// `MAIL FROM:<…> [SIZE=] [BODY=8BITMIME] [SMTPUTF8] [RET= ENVID=] [REQUIRETLS]\r\n`: what the
/// peer offers (a REQUIRETLS message reaches only a peer that offers REQUIRETLS: the remote
/// agent sees to it).
fn mail_command(msg: &OutboundMessage<'_>, ext: &Extensions) -> String {
    let params = MailParams {
        size: ext.size.map(|_| msg.content.len() as u64),
        body: (msg.needs_8bit && ext.eight_bit_mime).then_some(Body::EightBitMime),
        smtputf8: msg.needs_smtputf8,
        ret: msg.params.ret.filter(|_| ext.dsn),
        envid: msg.params.envid.clone().filter(|_| ext.dsn),
        auth: None,
        requiretls: msg.params.requiretls && ext.requiretls,
    };
    format!("MAIL FROM:<{}>{params}\r\n", msg.from)
}

/// `RCPT TO:<…> [NOTIFY= ORCPT=]\r\n`: DSN's parameters only to a peer that offers DSN.
fn rcpt_command(addr: &str, params: &RcptParams, ext: &Extensions) -> String {
    if ext.dsn {
        format!("RCPT TO:<{addr}>{params}\r\n")
    } else {
        format!("RCPT TO:<{addr}>\r\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(line: &str) -> Reply {
        let (code, rest) = line.split_at(3);
        let rest = rest.trim_start();
        let (status, text) = match rest.split_once(' ') {
            Some((s, t)) if estafeta_proto::Status::parse(s).is_some() => {
                (estafeta_proto::Status::parse(s), t.to_string())
            }
            _ => (None, rest.to_string()),
        };
        Reply {
            code: code.parse().unwrap(),
            status,
            lines: vec![text],
        }
    }

    fn ext(pipelining: bool) -> Extensions {
        Extensions {
            pipelining,
            size: Some(0),
            ..Default::default()
        }
    }

    /// Runs `t` against scripted replies, one per Receive; returns what was written (the
    /// content as `<content>`).
    fn run(t: &mut Transaction, replies: &[&str]) -> String {
        let mut sent = String::new();
        let mut replies = replies.iter();
        loop {
            match t.poll() {
                Step::Send { bytes, .. } => sent.push_str(&String::from_utf8(bytes).unwrap()),
                Step::SendContent => sent.push_str("<content>"),
                Step::Receive { .. } => {
                    let r = replies.next().expect("a reply for every read");
                    t.reply(reply(r));
                }
                Step::Done => break,
            }
        }
        assert!(replies.next().is_none(), "replies left over");
        sent
    }

    fn kinds(t: &Transaction) -> Vec<&'static str> {
        t.outcomes()
            .iter()
            .map(|o| match o {
                None => "undecided",
                Some(Outcome::Delivered(_)) => "delivered",
                Some(Outcome::Relayed { .. }) => "relayed",
                Some(Outcome::TempFail(_)) => "temporary",
                Some(Outcome::PermFail(_)) => "permanent",
            })
            .collect()
    }

    fn msg<'a>(rcpts: &'a [(String, RcptParams)], params: &'a MailParams) -> OutboundMessage<'a> {
        OutboundMessage {
            id: "",
            from: "a@local.test",
            params,
            rcpts,
            content: b"Subject: x\r\n\r\nhi\r\n",
            needs_smtputf8: false,
            needs_8bit: false,
        }
    }

    fn rcpts(names: &[&str]) -> Vec<(String, RcptParams)> {
        names
            .iter()
            .map(|n| (n.to_string(), RcptParams::default()))
            .collect()
    }

    #[test]
    fn pipelined_one_group_then_the_content() {
        let (r, p) = (rcpts(&["b@x.test", "c@x.test"]), MailParams::default());
        let mut t = Transaction::new(&msg(&r, &p), &ext(true), false, "mx.x.test", "mx[1]");
        let sent = run(
            &mut t,
            &[
                "250 2.1.0 Ok",
                "250 2.1.5 Ok",
                "550 5.1.1 no such user",
                "354 go",
                "250 2.0.0 queued as X",
            ],
        );
        assert_eq!(
            sent,
            "MAIL FROM:<a@local.test> SIZE=18\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n<content>"
        );
        assert_eq!(kinds(&t), ["relayed", "permanent"]);
        assert!(!t.needs_rset() && t.over().is_none());
    }

    #[test]
    fn pipelined_every_recipient_refused_ends_an_empty_content() {
        let (r, p) = (rcpts(&["b@x.test"]), MailParams::default());
        let mut t = Transaction::new(&msg(&r, &p), &ext(true), false, "mx", "mx[1]");
        let sent = run(
            &mut t,
            &[
                "250 Ok",
                "452 4.2.2 full",
                "354 go",
                "554 5.5.1 no valid recipients",
            ],
        );
        assert!(sent.ends_with("DATA\r\n.\r\n"), "{sent}");
        assert_eq!(kinds(&t), ["temporary"]);
        assert!(t.needs_rset());
    }

    #[test]
    fn pipelined_refused_mail_decides_everyone_and_reads_the_rest() {
        let (r, p) = (rcpts(&["b@x.test", "c@x.test"]), MailParams::default());
        let mut t = Transaction::new(&msg(&r, &p), &ext(true), false, "mx", "mx[1]");
        run(
            &mut t,
            &[
                "553 5.1.8 bad sender",
                "503 5.5.1 need MAIL",
                "503 5.5.1 need MAIL",
                "503 no",
            ],
        );
        assert_eq!(kinds(&t), ["permanent", "permanent"]);
        let Some(Outcome::PermFail(f)) = &t.outcomes()[0] else {
            unreachable!()
        };
        assert_eq!(f.command.as_deref(), Some("MAIL FROM:<a@local.test>"));
        assert!(t.needs_rset());
    }

    #[test]
    fn a_421_anywhere_ends_the_session_with_the_rest_undecided() {
        let (r, p) = (rcpts(&["b@x.test", "c@x.test"]), MailParams::default());
        let mut t = Transaction::new(&msg(&r, &p), &ext(true), false, "mx", "mx[1]");
        run(&mut t, &["250 Ok", "550 5.1.1 no", "421 4.3.2 closing"]);
        assert_eq!(kinds(&t), ["permanent", "undecided"]);
        assert_eq!(
            t.over().unwrap().command.as_deref(),
            Some("RCPT TO:<c@x.test>")
        );
        let mut t = Transaction::new(&msg(&r, &p), &ext(false), false, "mx", "mx[1]");
        run(
            &mut t,
            &["250 Ok", "250 Ok", "250 Ok", "354 go", "421 4.3.2 bye"],
        );
        assert_eq!(kinds(&t), ["undecided", "undecided"]);
        assert_eq!(t.over().unwrap().command.as_deref(), Some("end of DATA"));
    }

    /// Each step says under which timeout it runs and what a failure is reported for.
    #[test]
    fn steps_carry_their_timeouts_and_names() {
        let (r, p) = (rcpts(&["b@x.test"]), MailParams::default());
        let mut t = Transaction::new(&msg(&r, &p), &ext(false), true, "mx", "mx[1]");
        let mut seen = Vec::new();
        let mut replies = ["250 Ok", "250 Ok", "250 Ok", "354 go", "250 Ok"].iter();
        loop {
            match t.poll() {
                Step::Send {
                    wait,
                    doing,
                    command,
                    ..
                } => seen.push(format!("{wait:?} {doing} / {command}")),
                Step::SendContent => seen.push("content".into()),
                Step::Receive {
                    wait,
                    doing,
                    command,
                } => {
                    seen.push(format!("{wait:?} {doing} / {command}"));
                    t.reply(reply(replies.next().unwrap()));
                }
                Step::Done => break,
            }
        }
        assert_eq!(
            seen,
            [
                "Rset sending RSET / RSET",
                "Rset receiving the RSET reply / RSET",
                "Mail sending MAIL FROM / MAIL FROM:<a@local.test>",
                "Mail receiving the MAIL FROM reply / MAIL FROM:<a@local.test>",
                "Rcpt sending RCPT TO / RCPT TO:<b@x.test>",
                "Rcpt receiving the RCPT TO reply / RCPT TO:<b@x.test>",
                "DataInit sending DATA / DATA",
                "DataInit receiving the DATA reply / DATA",
                "content",
                "DataFinal receiving the end of DATA reply / end of DATA",
            ]
        );
    }

    #[test]
    fn one_by_one_without_pipelining() {
        let (r, p) = (rcpts(&["b@x.test", "c@x.test"]), MailParams::default());
        let mut t = Transaction::new(&msg(&r, &p), &ext(false), false, "mx", "mx[1]");
        let sent = run(
            &mut t,
            &[
                "250 Ok",
                "250 Ok",
                "250 Ok",
                "354 go",
                "451 4.3.0 try later",
            ],
        );
        assert_eq!(
            sent,
            "MAIL FROM:<a@local.test> SIZE=18\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n<content>"
        );
        assert_eq!(kinds(&t), ["temporary", "temporary"]);
        // No recipient accepted: no DATA, RSET next time.
        let mut t = Transaction::new(&msg(&r, &p), &ext(false), false, "mx", "mx[1]");
        let sent = run(&mut t, &["250 Ok", "550 no", "550 no"]);
        assert!(!sent.contains("DATA"), "{sent}");
        assert!(t.needs_rset());
        // DATA refused: the accepted recipient gets its reply, the refused one keeps its own.
        let mut t = Transaction::new(&msg(&r, &p), &ext(false), false, "mx", "mx[1]");
        run(
            &mut t,
            &["250 Ok", "250 Ok", "450 later", "554 5.3.4 too much"],
        );
        assert_eq!(kinds(&t), ["permanent", "temporary"]);
        // No recipient at all: MAIL, then nothing; RSET next time.
        let none = rcpts(&[]);
        let mut t = Transaction::new(&msg(&none, &p), &ext(false), false, "mx", "mx[1]");
        let sent = run(&mut t, &["250 Ok"]);
        assert_eq!(sent, "MAIL FROM:<a@local.test> SIZE=18\r\n");
        assert!(t.needs_rset());
    }

    #[test]
    fn rset_first_when_the_last_transaction_left_one_open() {
        let (r, p) = (rcpts(&["b@x.test"]), MailParams::default());
        let mut t = Transaction::new(&msg(&r, &p), &ext(true), true, "mx", "mx[1]");
        let sent = run(&mut t, &["250 Ok", "250 Ok", "250 Ok", "354 go", "250 Ok"]);
        assert!(sent.starts_with("RSET\r\nMAIL FROM:"), "{sent}");
        assert!(!t.needs_rset());
        let mut t = Transaction::new(&msg(&r, &p), &ext(true), true, "mx", "mx[1]");
        run(&mut t, &["500 what"]);
        assert_eq!(t.over().unwrap().command.as_deref(), Some("RSET"));
        assert_eq!(kinds(&t), ["undecided"]);
    }

    #[test]
    fn what_the_peer_cannot_take_is_decided_without_a_word() {
        let (r, p) = (rcpts(&["b@x.test"]), MailParams::default());
        let mut small = ext(true);
        small.size = Some(10);
        let mut t = Transaction::new(&msg(&r, &p), &small, true, "mx", "mx[1]");
        assert_eq!(run(&mut t, &[]), "");
        assert_eq!(kinds(&t), ["permanent"]);
        let mut m = msg(&r, &p);
        m.needs_smtputf8 = true;
        let mut t = Transaction::new(&m, &ext(true), false, "mx", "mx[1]");
        assert_eq!(run(&mut t, &[]), "");
        assert_eq!(kinds(&t), ["permanent"]);
    }
}
