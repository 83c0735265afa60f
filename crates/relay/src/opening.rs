//! The opening of an outbound session without I/O: the greeting, EHLO (HELO when EHLO is
//! refused permanently), STARTTLS as the TLS policy asks (RFC 3207), EHLO again over TLS, and
//! AUTH PLAIN or LOGIN when credentials are configured (RFC 4954). Like
//! [`crate::transaction::Transaction`], it says what to send and what to read and takes the
//! replies; the driver in [`crate::client`] does the I/O and the TLS handshake.

use std::collections::VecDeque;

use estafeta_proto::Reply;
use estafeta_proto::reply::{self as replies, Status};
use estafeta_queue::Failure;

use crate::client::{Extensions, SessionError, TlsPolicy, base64};
use crate::transaction::classify;

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenStep {
    /// Write `bytes` (under the EHLO timeout). With `best_effort`, a failed write is not an
    /// error (the cancellation of an AUTH exchange: the reply that follows tells).
    Send {
        /// The command, CRLF-terminated.
        bytes: Vec<u8>,
        /// What a broken connection was doing.
        doing: &'static str,
        /// A failed write is ignored.
        best_effort: bool,
        /// It carries credentials: never written to a log, even at TRACE level.
        secret: bool,
    },
    /// Read one reply (the greeting under its own timeout, the others under EHLO's) and hand
    /// it to [`Opening::reply`].
    Receive {
        /// The server greeting.
        greeting: bool,
        /// What a broken connection was doing.
        doing: &'static str,
    },
    /// Run the TLS handshake, then call [`Opening::tls_started`].
    StartTls,
    /// Over: [`Opening::result`] says whether the session is ready.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    /// The reply after the n-th AUTH LOGIN step (0: after `AUTH LOGIN`).
    Login(usize),
    AuthFinal,
    AuthCancelled,
}

/// The opening of one session.
#[derive(Debug)]
pub struct Opening {
    helo: String,
    policy: TlsPolicy,
    credentials: Option<(String, String)>,
    host: String,
    peer: String,
    ext: Extensions,
    tls: bool,
    steps: VecDeque<OpenStep>,
    expect: Option<Expect>,
    failed: Option<SessionError>,
}

impl Opening {
    /// The opening of a session to `host` (`peer`: `host[address]:port`), saying `helo`,
    /// with this TLS policy and these credentials.
    pub fn new(
        helo: &str,
        policy: TlsPolicy,
        credentials: Option<(String, String)>,
        host: &str,
        peer: &str,
    ) -> Opening {
        let mut o = Opening {
            helo: helo.to_string(),
            policy,
            credentials,
            host: host.to_string(),
            peer: peer.to_string(),
            ext: Extensions::default(),
            tls: false,
            steps: VecDeque::new(),
            expect: None,
            failed: None,
        };
        o.receive(
            Expect::Greeting,
            true,
            "receiving the initial server greeting",
        );
        o
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> OpenStep {
        self.steps.pop_front().unwrap_or(OpenStep::Done)
    }

    /// What the peer offered in its last EHLO (empty after HELO).
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// Ready, or why not.
    pub fn result(&self) -> Result<(), SessionError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// The TLS handshake after `220` to STARTTLS succeeded: EHLO again (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.hello();
    }

    /// The reply the last [`OpenStep::Receive`] read.
    pub fn reply(&mut self, reply: Reply) {
        let Some(expect) = self.expect.take() else {
            return;
        };
        match expect {
            Expect::Greeting => {
                if reply.code == 220 {
                    self.hello();
                } else {
                    self.refused(&reply, "the initial server greeting");
                }
            }
            Expect::Ehlo => match reply.code / 100 {
                2 => {
                    self.ext = Extensions::parse(&reply);
                    self.after_hello();
                }
                5 => {
                    let helo = format!("HELO {}\r\n", self.helo);
                    self.send(helo.into_bytes(), "sending HELO");
                    self.receive(Expect::Helo, false, "receiving the HELO reply");
                }
                _ => self.refused(&reply, "EHLO"),
            },
            Expect::Helo => {
                if reply.code / 100 == 2 {
                    self.ext = Extensions::default();
                    self.after_hello();
                } else {
                    self.refused(&reply, "HELO");
                }
            }
            Expect::StartTls => {
                if reply.code == 220 {
                    self.steps.push_back(OpenStep::StartTls);
                } else if self.policy == TlsPolicy::Opportunistic && reply.code != 421 {
                    tracing::info!(peer = %self.peer, %reply, "STARTTLS refused; going on in plaintext");
                    self.auth();
                } else {
                    self.fail(Failure {
                        reply,
                        remote: Some(self.host.clone()),
                        command: Some("STARTTLS".to_string()),
                    });
                }
            }
            Expect::Login(n) => {
                let secret = self
                    .credentials
                    .as_ref()
                    .map(|(user, pass)| if n == 0 { user.clone() } else { pass.clone() });
                match secret {
                    Some(secret) if reply.code == 334 && n < 2 => {
                        let line = format!("{}\r\n", base64(secret.as_bytes()));
                        self.send_secret(line.into_bytes());
                        self.receive(Expect::Login(n + 1), false, "receiving the AUTH reply");
                    }
                    _ => self.auth_final(reply),
                }
            }
            Expect::AuthFinal => self.auth_final(reply),
            Expect::AuthCancelled => self.auth_done(reply),
        }
    }

    fn hello(&mut self) {
        let ehlo = format!("EHLO {}\r\n", self.helo);
        self.send(ehlo.into_bytes(), "sending EHLO");
        self.receive(Expect::Ehlo, false, "receiving the EHLO reply");
    }

    /// After EHLO or HELO: STARTTLS when the policy asks for it (once), then AUTH.
    fn after_hello(&mut self) {
        if self.tls {
            return self.auth();
        }
        let wants_tls = match self.policy {
            TlsPolicy::None => false,
            TlsPolicy::Opportunistic => self.ext.starttls,
            TlsPolicy::Required | TlsPolicy::Verify | TlsPolicy::Dane => {
                if !self.ext.starttls {
                    let reply = replies::tls_not_offered(&self.peer);
                    return self.fail(Failure::local(reply));
                }
                true
            }
        };
        if wants_tls {
            self.send(b"STARTTLS\r\n".to_vec(), "sending STARTTLS");
            self.receive(Expect::StartTls, false, "receiving the STARTTLS reply");
        } else {
            self.auth();
        }
    }

    /// AUTH PLAIN, else LOGIN, over TLS only; nothing without credentials.
    fn auth(&mut self) {
        let Some((user, pass)) = self.credentials.clone() else {
            return;
        };
        let impossible = |peer: &str, status: Status, text: &str| {
            Failure::local(replies::client_auth_impossible(peer, status, text))
        };
        if !self.tls {
            let f = impossible(
                &self.peer,
                Status::ENCRYPTION_NEEDED_TEMPORARY,
                "AUTH credentials are configured, but the session is not encrypted; they are not sent in clear",
            );
            return self.fail(f);
        }
        if self.ext.auth.iter().any(|m| m == "PLAIN") {
            let mut token = Vec::with_capacity(user.len() + pass.len() + 2);
            token.push(0);
            token.extend_from_slice(user.as_bytes());
            token.push(0);
            token.extend_from_slice(pass.as_bytes());
            let line = format!("AUTH PLAIN {}\r\n", base64(&token));
            self.send_secret(line.into_bytes());
            self.receive(Expect::AuthFinal, false, "receiving the AUTH reply");
        } else if self.ext.auth.iter().any(|m| m == "LOGIN") {
            self.send(b"AUTH LOGIN\r\n".to_vec(), "sending AUTH");
            self.receive(Expect::Login(0), false, "receiving the AUTH reply");
        } else {
            let f = impossible(
                &self.peer,
                Status::SECURITY_TEMPORARY,
                "AUTH credentials are configured, but the server offers neither PLAIN nor LOGIN",
            );
            self.fail(f);
        }
    }

    /// The reply that ends an AUTH exchange: a 334 asks for more than the mechanism gives,
    /// so the exchange is cancelled (RFC 4954 §4).
    fn auth_final(&mut self, reply: Reply) {
        if reply.code == 334 {
            self.steps.push_back(OpenStep::Send {
                bytes: b"*\r\n".to_vec(),
                doing: "sending AUTH",
                best_effort: true,
                secret: false,
            });
            self.receive(Expect::AuthCancelled, false, "receiving the AUTH reply");
        } else {
            self.auth_done(reply);
        }
    }

    fn auth_done(&mut self, reply: Reply) {
        if reply.code / 100 != 2 {
            // A refused login is a configuration problem here, not the message's: temporary.
            self.fail(Failure {
                reply,
                remote: Some(self.host.clone()),
                command: Some("AUTH".to_string()),
            });
        }
    }

    fn send(&mut self, bytes: Vec<u8>, doing: &'static str) {
        self.steps.push_back(OpenStep::Send {
            bytes,
            doing,
            best_effort: false,
            secret: false,
        });
    }

    /// A line that carries credentials (AUTH PLAIN's token, LOGIN's answers).
    fn send_secret(&mut self, bytes: Vec<u8>) {
        self.steps.push_back(OpenStep::Send {
            bytes,
            doing: "sending AUTH",
            best_effort: false,
            secret: true,
        });
    }

    fn receive(&mut self, expect: Expect, greeting: bool, doing: &'static str) {
        self.expect = Some(expect);
        self.steps.push_back(OpenStep::Receive { greeting, doing });
    }

    /// A refusal, classified: a 5yz greeting or HELO is permanent for this host.
    fn refused(&mut self, reply: &Reply, command: &str) {
        self.failed = Some(SessionError::from_outcome(classify(
            reply, command, &self.host,
        )));
        self.steps.clear();
    }

    fn fail(&mut self, failure: Failure) {
        self.failed = Some(SessionError {
            permanent: false,
            failure,
        });
        self.steps.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, lines: &[&str]) -> Reply {
        Reply {
            code,
            status: None,
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    /// Runs `o` against scripted replies; a handshake is a `<TLS>` in what was written.
    fn run(o: &mut Opening, replies: Vec<Reply>) -> String {
        let mut sent = String::new();
        let mut replies = replies.into_iter();
        loop {
            match o.poll() {
                OpenStep::Send { bytes, .. } => sent.push_str(&String::from_utf8(bytes).unwrap()),
                OpenStep::Receive { .. } => o.reply(replies.next().expect("a reply for each read")),
                OpenStep::StartTls => {
                    sent.push_str("<TLS>");
                    o.tls_started();
                }
                OpenStep::Done => break,
            }
        }
        assert!(replies.next().is_none(), "replies left over");
        sent
    }

    fn ok() -> Reply {
        reply(250, &["ok"])
    }

    #[test]
    fn starttls_then_ehlo_again_then_auth_plain() {
        let creds = Some(("u".to_string(), "p".to_string()));
        let mut o = Opening::new("me.test", TlsPolicy::Required, creds, "mx", "mx[1]:25");
        let sent = run(
            &mut o,
            vec![
                reply(220, &["mx ESMTP"]),
                reply(250, &["mx", "STARTTLS", "PIPELINING"]),
                reply(220, &["go ahead"]),
                reply(250, &["mx", "AUTH PLAIN LOGIN", "PIPELINING"]),
                reply(235, &["ok"]),
            ],
        );
        assert_eq!(
            sent,
            "EHLO me.test\r\nSTARTTLS\r\n<TLS>EHLO me.test\r\nAUTH PLAIN AHUAcA==\r\n"
        );
        assert!(o.result().is_ok());
        assert!(o.extensions().pipelining && !o.extensions().starttls);
    }

    #[test]
    fn helo_when_ehlo_is_refused_and_no_tls_on_opportunistic() {
        let mut o = Opening::new("me.test", TlsPolicy::Opportunistic, None, "mx", "mx[1]:25");
        let sent = run(&mut o, vec![reply(220, &["hi"]), reply(502, &["no"]), ok()]);
        assert_eq!(sent, "EHLO me.test\r\nHELO me.test\r\n");
        assert!(o.result().is_ok());
        // STARTTLS refused with 454: on in plaintext; with 421 the session is over.
        let mut o = Opening::new("me.test", TlsPolicy::Opportunistic, None, "mx", "mx[1]:25");
        run(
            &mut o,
            vec![
                reply(220, &["hi"]),
                reply(250, &["mx", "STARTTLS"]),
                reply(454, &["no"]),
            ],
        );
        assert!(o.result().is_ok());
        let mut o = Opening::new("me.test", TlsPolicy::Opportunistic, None, "mx", "mx[1]:25");
        run(
            &mut o,
            vec![
                reply(220, &["hi"]),
                reply(250, &["mx", "STARTTLS"]),
                reply(421, &["bye"]),
            ],
        );
        let e = o.result().unwrap_err();
        assert!(!e.permanent && e.failure.command.as_deref() == Some("STARTTLS"));
        // TLS required and STARTTLS refused: no plaintext session.
        let mut o = Opening::new("me.test", TlsPolicy::Required, None, "mx", "mx[1]:25");
        run(
            &mut o,
            vec![
                reply(220, &["hi"]),
                reply(250, &["mx", "STARTTLS"]),
                reply(454, &["no"]),
            ],
        );
        assert_eq!(o.result().unwrap_err().failure.reply.code, 454);
    }

    #[test]
    fn refusals_say_whether_the_host_is_worth_another_try() {
        let mut o = Opening::new("me.test", TlsPolicy::None, None, "mx", "mx[1]:25");
        run(&mut o, vec![reply(554, &["go away"])]);
        assert!(o.result().unwrap_err().permanent);
        let mut o = Opening::new("me.test", TlsPolicy::None, None, "mx", "mx[1]:25");
        run(&mut o, vec![reply(220, &["hi"]), reply(421, &["busy"])]);
        assert!(!o.result().unwrap_err().permanent);
        // 5yz to EHLO and to HELO: permanent for this host.
        let mut o = Opening::new("me.test", TlsPolicy::None, None, "mx", "mx[1]:25");
        run(
            &mut o,
            vec![
                reply(220, &["hi"]),
                reply(500, &["no"]),
                reply(550, &["no"]),
            ],
        );
        let e = o.result().unwrap_err();
        assert!(e.permanent && e.failure.command.as_deref() == Some("HELO"));
        // TLS required, not offered: temporary, nothing more sent.
        let mut o = Opening::new("me.test", TlsPolicy::Verify, None, "mx", "mx[1]:25");
        let sent = run(&mut o, vec![reply(220, &["hi"]), reply(250, &["mx"])]);
        assert_eq!(sent, "EHLO me.test\r\n");
        let e = o.result().unwrap_err();
        assert!(!e.permanent && e.failure.reply.code == 451, "{e:?}");
    }

    #[test]
    fn auth_login_and_a_server_that_wants_more() {
        let creds = Some(("u".to_string(), "p".to_string()));
        let mut o = Opening::new("me.test", TlsPolicy::Required, creds.clone(), "mx", "mx[1]");
        let sent = run(
            &mut o,
            vec![
                reply(220, &["hi"]),
                reply(250, &["mx", "STARTTLS"]),
                reply(220, &["go"]),
                reply(250, &["mx", "AUTH LOGIN"]),
                reply(334, &["VXNlcm5hbWU6"]),
                reply(334, &["UGFzc3dvcmQ6"]),
                reply(235, &["ok"]),
            ],
        );
        assert!(sent.ends_with("AUTH LOGIN\r\ndQ==\r\ncA==\r\n"), "{sent}");
        assert!(o.result().is_ok());
        // What carries the credentials is marked, and never traced.
        let mut o = Opening::new("me.test", TlsPolicy::Required, creds.clone(), "mx", "mx[1]");
        let mut secrets = Vec::new();
        let mut replies = vec![
            reply(220, &["hi"]),
            reply(250, &["mx", "STARTTLS"]),
            reply(220, &["go"]),
            reply(250, &["mx", "AUTH LOGIN"]),
            reply(334, &["VXNlcm5hbWU6"]),
            reply(334, &["UGFzc3dvcmQ6"]),
            reply(235, &["ok"]),
        ]
        .into_iter();
        loop {
            match o.poll() {
                OpenStep::Send { bytes, secret, .. } => {
                    secrets.push((String::from_utf8(bytes).unwrap(), secret))
                }
                OpenStep::Receive { .. } => o.reply(replies.next().unwrap()),
                OpenStep::StartTls => o.tls_started(),
                OpenStep::Done => break,
            }
        }
        let marked: Vec<&str> = secrets
            .iter()
            .filter(|(_, s)| *s)
            .map(|(l, _)| l.as_str())
            .collect();
        assert_eq!(marked, ["dQ==\r\n", "cA==\r\n"]);
        // PLAIN answered with a 334: cancelled with "*", and the refusal is temporary.
        let mut o = Opening::new("me.test", TlsPolicy::Required, creds.clone(), "mx", "mx[1]");
        let sent = run(
            &mut o,
            vec![
                reply(220, &["hi"]),
                reply(250, &["mx", "STARTTLS"]),
                reply(220, &["go"]),
                reply(250, &["mx", "AUTH PLAIN"]),
                reply(334, &[""]),
                reply(501, &["cancelled"]),
            ],
        );
        assert!(sent.ends_with("*\r\n"), "{sent}");
        let e = o.result().unwrap_err();
        assert_eq!(e.failure.command.as_deref(), Some("AUTH"));
        assert!(
            !e.permanent,
            "a refused login is the configuration's problem: temporary"
        );
        // Credentials over plaintext: never sent.
        let mut o = Opening::new("me.test", TlsPolicy::None, creds, "mx", "mx[1]");
        let sent = run(
            &mut o,
            vec![reply(220, &["hi"]), reply(250, &["mx", "AUTH PLAIN"])],
        );
        assert!(!sent.contains("AUTH"), "{sent}");
        assert_eq!(o.result().unwrap_err().failure.reply.code, 451);
    }
}
