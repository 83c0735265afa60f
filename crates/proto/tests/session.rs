//! Dialogue tests of the sans-IO session: `c -> …` lines are fed, `s <- …` replies are checked.
//! No sockets: the test plays the driver, answering recipient checks and storing messages.

use std::sync::Arc;

use estafeta_proto::reply::{self, Reply};
use estafeta_proto::{Action, Envelope, Recipient, Session, SessionConfig, VrfyMode};

struct Harness {
    session: Session,
    /// Messages "stored" by the driver.
    queued: Vec<(Envelope, Vec<u8>)>,
    closed: bool,
    tls_handshakes: usize,
    auth_attempts: Vec<(String, Vec<String>)>,
    verifies: Vec<(String, bool)>,
    pauses: Vec<std::time::Duration>,
}

fn config() -> SessionConfig {
    SessionConfig {
        hostname: "mx.example.test".into(),
        banner: "ESMTP estafeta".into(),
        max_message_size: 1000,
        max_recipients: 3,
        max_errors: 5,
        max_received_headers: 3,
        vrfy: VrfyMode::Ambiguous,
        starttls: false,
        auth: estafeta_proto::AuthMode::Never,
        require_auth: false,
        max_auth_failures: 3,
        check_sender: false,
        authenticated_header: false,
        expn_trusted: false,
        max_unknown_recipients: 0,
    }
}

/// The test's recipient policy: local domain `example.test`, user `nobody` unknown.
fn verdict(rcpt: &Recipient) -> Result<(), Reply> {
    let addr = rcpt.path.to_string();
    let domain = rcpt.path.mailbox.domain.key();
    if domain != "example.test" && !rcpt.path.bare_postmaster {
        Err(reply::relay_denied(&addr))
    } else if rcpt.path.mailbox.local == "nobody" {
        Err(reply::user_unknown(&addr))
    } else {
        Ok(())
    }
}

impl Harness {
    fn new(cfg: SessionConfig) -> (Self, String) {
        let mut h = Harness {
            session: Session::new(Arc::new(cfg), "192.0.2.9:40000".parse().unwrap()),
            queued: Vec::new(),
            closed: false,
            tls_handshakes: 0,
            auth_attempts: Vec::new(),
            verifies: Vec::new(),
            pauses: Vec::new(),
        };
        let greeting = h.drive();
        (h, greeting)
    }

    /// Runs the session until it needs input; returns the replies written.
    fn drive(&mut self) -> String {
        let mut out = Vec::new();
        while let Some(action) = self.session.poll() {
            match action {
                Action::Send(r) => r.write_to(&mut out),
                Action::CheckRcpt(rcpt) => {
                    let v = verdict(&rcpt);
                    self.session.rcpt_checked(v);
                }
                Action::Enqueue(env, body) => {
                    let id = format!("{:012X}", self.queued.len() + 1);
                    self.queued.push((*env, body));
                    self.session.enqueued(Ok(id));
                }
                Action::CheckMail { user, from } => {
                    let v = if from.to_string() == user {
                        Ok(())
                    } else {
                        Err(reply::sender_not_owned(&from.to_string(), &user))
                    };
                    self.session.mail_checked(v);
                }
                Action::Etrn(domain) => {
                    // The driver's decision, here: "trusted.test" has two messages waiting.
                    let r = if domain == "trusted.test" {
                        reply::etrn_started(&domain, 2)
                    } else if domain == "empty.test" {
                        reply::etrn_started(&domain, 0)
                    } else {
                        reply::etrn_not_allowed(&domain)
                    };
                    self.session.etrn_done(r);
                }
                Action::StartTls => {
                    self.tls_handshakes += 1;
                    self.session
                        .tls_started("TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384".into());
                }
                Action::Authenticate(answer) => {
                    let responses: Vec<String> =
                        answer.responses().iter().map(|r| r.to_string()).collect();
                    self.auth_attempts
                        .push((answer.mechanism().as_str().to_string(), responses.clone()));
                    // base64("\0alice@example.test\0secret") and LOGIN's two steps.
                    let good_plain = ["AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ="];
                    let good_login = ["YWxpY2VAZXhhbXBsZS50ZXN0", "c2VjcmV0"];
                    let ok = responses == good_plain || responses == good_login;
                    self.session.auth_checked(if ok {
                        Ok("alice@example.test".into())
                    } else {
                        Err(reply::auth_failed())
                    });
                }
                Action::Verify { argument, expn } => {
                    self.verifies.push((argument.clone(), expn));
                    let r = if argument.contains("bob") {
                        reply::vrfy_ok("bob@example.test")
                    } else {
                        reply::user_unknown(&argument)
                    };
                    self.session.verified(r);
                }
                Action::Pause(d) => self.pauses.push(d),
                Action::Close => self.closed = true,
            }
        }
        String::from_utf8(out).unwrap()
    }

    /// `c -> bytes`, returns `s <- replies`.
    fn c(&mut self, input: &str) -> String {
        self.session.feed(input.as_bytes());
        self.drive()
    }
}

fn ready() -> Harness {
    let (mut h, _) = Harness::new(config());
    h.c("EHLO client.example\r\n");
    h
}

#[test]
fn greeting_and_ehlo_list() {
    let (mut h, greeting) = Harness::new(config());
    assert_eq!(greeting, "220 mx.example.test ESMTP estafeta\r\n");
    assert_eq!(
        h.c("EHLO client.example\r\n"),
        "250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-ETRN\r\n250-ENHANCEDSTATUSCODES\r\n\
         250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"
    );
    assert_eq!(h.c("HELO client.example\r\n"), "250 mx.example.test\r\n");
}

#[test]
fn the_readme_dialogue() {
    let mut h = ready();
    assert_eq!(
        h.c("MAIL FROM:<alice@example.test>\r\n"),
        "250 2.1.0 Ok\r\n"
    );
    assert_eq!(
        h.c("RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE\r\n"),
        "250 2.1.5 Ok\r\n"
    );
    assert_eq!(h.c("DATA\r\n"), "354 End data with <CR><LF>.<CR><LF>\r\n");
    assert_eq!(
        h.c("Subject: hi\r\n\r\nhello\r\n.\r\n"),
        "250 2.0.0 Ok: queued as 000000000001\r\n"
    );
    assert_eq!(h.c("QUIT\r\n"), "221 2.0.0 Bye\r\n");
    assert!(h.closed);
    let (env, body) = &h.queued[0];
    assert_eq!(body, b"Subject: hi\r\n\r\nhello\r\n");
    assert_eq!(env.from.to_string(), "alice@example.test");
    assert_eq!(env.client.protocol, "ESMTP");
    assert_eq!(env.client.helo, "client.example");
    assert!(env.rcpts[0].params.notify.unwrap().success);
}

#[test]
fn pipelined_batch_gets_replies_in_order() {
    let mut h = ready();
    let replies = h.c(
        "MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<nobody@example.test>\r\n\
         RCPT TO:<c@elsewhere.example>\r\nRCPT TO:<d@example.test>\r\nDATA\r\n",
    );
    assert_eq!(
        replies,
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n\
         550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown\r\n\
         554 5.7.1 <c@elsewhere.example>: Relay access denied\r\n250 2.1.5 Ok\r\n\
         354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    assert_eq!(
        h.c("x\r\n.\r\nQUIT\r\n"),
        "250 2.0.0 Ok: queued as 000000000001\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(h.queued[0].0.rcpts.len(), 2);
}

#[test]
fn pipelined_data_after_all_rcpts_refused() {
    let mut h = ready();
    let replies = h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\n");
    assert!(
        replies.ends_with("554 5.5.1 Error: no valid recipients\r\n"),
        "{replies}"
    );
}

#[test]
fn bdat_chunks_deliver_exact_bytes() {
    let mut h = ready();
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n");
    let part1 = "Subject: chunks\r\n\r\n".to_string() + &"x".repeat(79) + "\r\n";
    assert_eq!(part1.len(), 100);
    let part2 = ".lone dot\n\rbare".to_string() + &"y".repeat(35);
    assert_eq!(part2.len(), 50);
    assert_eq!(
        h.c(&format!("BDAT 100\r\n{part1}")),
        "250 2.0.0 100 octets received\r\n"
    );
    assert_eq!(
        h.c(&format!("BDAT 50 LAST\r\n{part2}")),
        "250 2.0.0 Ok: queued as 000000000001\r\n"
    );
    assert_eq!(h.queued[0].1, format!("{part1}{part2}").into_bytes());
}

#[test]
fn bdat_in_one_write_split_anywhere() {
    let input = "MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nBDAT 5\r\nhelloBDAT 0 LAST\r\nQUIT\r\n";
    for split in 0..input.len() {
        let mut h = ready();
        let mut replies = h.c(&input[..split]);
        replies += &h.c(&input[split..]);
        assert_eq!(
            replies,
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 5 octets received\r\n\
             250 2.0.0 Ok: queued as 000000000001\r\n221 2.0.0 Bye\r\n",
            "split at {split}"
        );
        assert_eq!(h.queued[0].1, b"hello");
    }
}

#[test]
fn refused_bdat_chunk_is_consumed_not_executed() {
    let mut h = ready();
    // No MAIL: the chunk is still read as data, so the RSET inside it is not a command.
    let replies = h.c("BDAT 6\r\nRSET\r\nNOOP\r\n");
    assert_eq!(
        replies,
        "503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn data_and_bdat_do_not_mix() {
    let mut h = ready();
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nBDAT 1\r\nx");
    assert_eq!(h.c("DATA\r\n"), "503 5.5.1 Error: DATA after BDAT\r\n");
}

#[test]
fn sequence_errors() {
    let (mut h, _) = Harness::new(config());
    assert_eq!(
        h.c("MAIL FROM:<a@example.test>\r\n"),
        "503 5.5.1 Error: send HELO/EHLO first\r\n"
    );
    h.c("EHLO x\r\n");
    assert_eq!(
        h.c("RCPT TO:<a@example.test>\r\n"),
        "503 5.5.1 Error: need MAIL command\r\n"
    );
    assert_eq!(h.c("DATA\r\n"), "503 5.5.1 Error: need MAIL command\r\n");
    h.c("MAIL FROM:<a@example.test>\r\n");
    assert_eq!(
        h.c("MAIL FROM:<a@example.test>\r\n"),
        "503 5.5.1 Error: nested MAIL command\r\n"
    );
}

#[test]
fn need_rcpt_before_data() {
    let mut h = ready();
    h.c("MAIL FROM:<a@example.test>\r\n");
    assert_eq!(h.c("DATA\r\n"), "503 5.5.1 Error: need RCPT command\r\n");
}

#[test]
fn too_many_errors_closes_with_421() {
    let mut h = ready();
    let mut all = String::new();
    for _ in 0..5 {
        all += &h.c("BOGUS\r\n");
    }
    assert!(all.ends_with(
        "502 5.5.2 Error: command not recognized\r\n421 4.7.0 mx.example.test Error: too many errors\r\n"
    ), "{all}");
    assert!(h.closed);
    assert_eq!(h.c("NOOP\r\n"), "");
}

#[test]
fn unknown_and_not_available_commands() {
    let (mut h, _) = Harness::new(SessionConfig {
        max_errors: 10,
        ..config()
    });
    assert_eq!(
        h.c("XYZZY\r\n"),
        "502 5.5.2 Error: command not recognized\r\n"
    );
    assert_eq!(
        h.c("STARTTLS\r\n"),
        "502 5.5.1 Error: command not implemented\r\n"
    );
    assert_eq!(
        h.c("AUTH PLAIN\r\n"),
        "502 5.5.1 Error: command not implemented\r\n"
    );
    assert_eq!(
        h.c("EXPN staff\r\n"),
        "502 5.5.1 EXPN command is disabled\r\n"
    );
}

#[test]
fn vrfy_is_ambiguous() {
    let mut h = ready();
    let a = h.c("VRFY bob\r\n");
    let b = h.c("VRFY nobody\r\n");
    assert_eq!(a, b);
    assert!(a.starts_with("252 2.5.2"));
}

#[test]
fn help_does_not_reveal_version() {
    let mut h = ready();
    let r = h.c("HELP\r\n");
    assert!(r.starts_with("214-2.0.0"));
    assert!(!r.contains("estafeta") && !r.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn bare_lf_commands_work() {
    let (mut h, _) = Harness::new(config());
    assert_eq!(h.c("HELO nc\n"), "250 mx.example.test\r\n");
    assert_eq!(h.c("MAIL FROM:<a@example.test>\n"), "250 2.1.0 Ok\r\n");
    assert_eq!(h.c("RCPT TO:<b@example.test>\n"), "250 2.1.5 Ok\r\n");
    assert_eq!(h.c("NOOP\n"), "250 2.0.0 Ok\r\n");
}

#[test]
fn smuggling_inside_one_message_stays_one_message() {
    let mut h = ready();
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    let replies = h.c(
        "Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n",
    );
    assert_eq!(replies, "250 2.0.0 Ok: queued as 000000000001\r\n");
    assert_eq!(h.queued.len(), 1);
    let body = String::from_utf8(h.queued[0].1.clone()).unwrap();
    assert!(body.contains("MAIL FROM:<evil@example.test>"));
    // Every smuggling variant from the table: one message each, nothing executed.
    for sep in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\r\n.\r", "\r.\r"] {
        let mut h = ready();
        h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
        let replies = h.c(&format!(
            "a{sep}MAIL FROM:<evil@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n"
        ));
        assert_eq!(
            replies, "250 2.0.0 Ok: queued as 000000000001\r\n",
            "{sep:?}"
        );
        assert_eq!(h.queued.len(), 1);
    }
}

#[test]
fn size_limits() {
    let mut h = ready();
    assert_eq!(
        h.c("MAIL FROM:<a@example.test> SIZE=1001\r\n"),
        "552 5.3.4 Message size exceeds fixed limit\r\n"
    );
    h.c("MAIL FROM:<a@example.test> SIZE=10\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    let big = "y".repeat(1200);
    assert_eq!(
        h.c(&format!("{big}\r\n.\r\n")),
        "552 5.3.4 Error: message file too big\r\n"
    );
    assert!(h.queued.is_empty());
    // The session goes on.
    assert_eq!(h.c("MAIL FROM:<a@example.test>\r\n"), "250 2.1.0 Ok\r\n");
    h.c("RCPT TO:<b@example.test>\r\n");
    assert_eq!(h.c("BDAT 1001 LAST\r\n"), "");
    assert_eq!(
        h.c(&"z".repeat(1001)),
        "552 5.3.4 Error: message file too big\r\n"
    );
}

#[test]
fn recipient_limit() {
    let mut h = ready();
    h.c("MAIL FROM:<a@example.test>\r\n");
    for i in 0..3 {
        assert_eq!(
            h.c(&format!("RCPT TO:<u{i}@example.test>\r\n")),
            "250 2.1.5 Ok\r\n"
        );
    }
    assert_eq!(
        h.c("RCPT TO:<u4@example.test>\r\n"),
        "452 4.5.3 Error: too many recipients\r\n"
    );
}

#[test]
fn line_too_long() {
    let mut h = ready();
    let long = format!("NOOP {}\r\n", "x".repeat(2000));
    assert_eq!(h.c(&long), "500 5.5.2 Error: line too long\r\n");
    let huge = format!("NOOP {}\r\n", "x".repeat(20000));
    assert_eq!(h.c(&huge), "500 5.5.2 Error: line too long\r\n");
    assert_eq!(h.c("NOOP\r\n"), "250 2.0.0 Ok\r\n");
}

/// A client that sends one byte per read (slowloris, or a bot on a bad link) gets the same
/// answers as one that sends whole lines: a line within the limit is a command, a longer one
/// is refused when its LF arrives, and the session goes on.
#[test]
fn one_byte_per_read() {
    let mut h = ready();
    let mut replies = String::new();
    let input = format!(
        "NOOP {}\r\nNOOP {}\r\nNOOP\r\n",
        "x".repeat(500),
        "y".repeat(12_000)
    );
    for b in input.as_bytes() {
        h.session.feed(std::slice::from_ref(b));
        replies.push_str(&h.drive());
    }
    assert_eq!(
        replies,
        "250 2.0.0 Ok\r\n500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn utf8_addresses_need_smtputf8() {
    let mut h = ready();
    assert_eq!(
        h.c("MAIL FROM:<jörg@example.test>\r\n"),
        "553 5.6.7 Non-ASCII addresses require the SMTPUTF8 parameter\r\n"
    );
    h.c("MAIL FROM:<a@example.test>\r\n");
    assert!(
        h.c("RCPT TO:<jörg@example.test>\r\n")
            .starts_with("553 5.6.7")
    );
    h.c("RSET\r\n");
    assert_eq!(
        h.c("MAIL FROM:<jörg@example.test> SMTPUTF8\r\n"),
        "250 2.1.0 Ok\r\n"
    );
    assert_eq!(h.c("RCPT TO:<jörg@example.test>\r\n"), "250 2.1.5 Ok\r\n");
    h.c("DATA\r\nx\r\n.\r\n");
    assert_eq!(h.queued[0].0.client.protocol, "UTF8SMTP");
}

#[test]
fn params_need_ehlo() {
    let (mut h, _) = Harness::new(config());
    h.c("HELO old.example\r\n");
    assert!(
        h.c("MAIL FROM:<a@example.test> SIZE=10\r\n")
            .starts_with("555 5.5.4")
    );
    assert_eq!(h.c("MAIL FROM:<a@example.test>\r\n"), "250 2.1.0 Ok\r\n");
    h.c("RCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n");
    assert_eq!(h.queued[0].0.client.protocol, "SMTP");
}

#[test]
fn loop_detection() {
    let mut h = ready();
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    let hops = "Received: from a\r\n".repeat(4);
    let r = h.c(&format!("{hops}\r\nbody\r\n.\r\n"));
    assert!(r.starts_with("554 5.4.6 Too many hops"), "{r}");
    assert!(h.queued.is_empty());
}

/// A header section over 1 MiB (200,000 short fields, or one huge field) is refused at the end
/// of data, whatever the message size limit; a large body under a small header is accepted.
#[test]
fn header_section_is_limited() {
    let (mut h, _) = Harness::new(SessionConfig {
        max_message_size: 10 << 20,
        ..config()
    });
    h.c("EHLO client.example\r\n");
    let many: String = (0..200_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let huge = format!("Subject: {}\r\n", "z".repeat(2 << 20));
    for header in [many, huge] {
        h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
        assert_eq!(
            h.c(&format!("{header}\r\nbody\r\n.\r\n")),
            "552 5.3.4 Error: message header too big (over 1048576 octets)\r\n"
        );
    }
    assert!(h.queued.is_empty());
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    let body = "b".repeat(998) + "\r\n";
    let r = h.c(&format!(
        "Subject: big body\r\n\r\n{}.\r\n",
        body.repeat(4000)
    ));
    assert!(r.starts_with("250 "), "{r}");
    assert_eq!(h.queued.len(), 1);
}

/// A driver's 421 (a milter's SHUTDOWN) ends the session after the reply.
#[test]
fn a_421_from_the_driver_closes() {
    let mut h = ready();
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    // The harness queues every message; answer this one by hand.
    h.session.feed(b"x\r\n.\r\n");
    let mut enqueue = false;
    while let Some(a) = h.session.poll() {
        enqueue |= matches!(a, Action::Enqueue(..));
    }
    assert!(enqueue);
    h.session.enqueued(Err(Reply::new(
        421,
        estafeta_proto::Status::new(4, 7, 0),
        "closing",
    )));
    let mut closed = false;
    let mut out = String::new();
    while let Some(a) = h.session.poll() {
        match a {
            Action::Send(r) => out.push_str(&String::from_utf8_lossy(&r.to_bytes())),
            Action::Close => closed = true,
            _ => {}
        }
    }
    assert_eq!(out, "421 4.7.0 closing\r\n");
    assert!(closed);
}

#[test]
fn http_is_refused_and_closed() {
    let (mut h, _) = Harness::new(config());
    assert_eq!(
        h.c("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        "221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
    );
    assert!(h.closed);
}

#[test]
fn rset_and_ehlo_reset_the_transaction() {
    let mut h = ready();
    h.c("MAIL FROM:<a@example.test>\r\n");
    assert_eq!(h.c("RSET\r\n"), "250 2.0.0 Ok\r\n");
    assert_eq!(h.c("MAIL FROM:<a@example.test>\r\n"), "250 2.1.0 Ok\r\n");
    h.c("EHLO again\r\n");
    assert_eq!(h.c("MAIL FROM:<a@example.test>\r\n"), "250 2.1.0 Ok\r\n");
}

#[test]
fn null_sender_and_postmaster() {
    let mut h = ready();
    assert_eq!(h.c("MAIL FROM:<>\r\n"), "250 2.1.0 Ok\r\n");
    assert_eq!(h.c("RCPT TO:<Postmaster>\r\n"), "250 2.1.5 Ok\r\n");
}

#[test]
fn timeout_and_shutdown_replies() {
    let mut h = ready();
    h.session.timed_out();
    assert_eq!(
        h.drive(),
        "421 4.4.2 mx.example.test Error: timeout exceeded\r\n"
    );
    assert!(h.closed);
    let mut h = ready();
    h.session.shutting_down();
    assert!(h.drive().starts_with("421 4.3.2"));
}

#[test]
fn received_header_shape() {
    let mut h = ready();
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n");
    let env = &h.queued[0].0;
    let hdr = estafeta_proto::trace::received_header("mx.example.test", env, "ABCDEF012345", 0);
    assert_eq!(
        hdr,
        "Received: from client.example (unknown [192.0.2.9])\r\n\tby mx.example.test (estafeta) \
         with ESMTP id ABCDEF012345\r\n\tfor <b@example.test>; Thu, 1 Jan 1970 00:00:00 +0000\r\n"
    );
}

#[test]
fn local_session_records_the_uid_for_the_received_header() {
    let mut h = Harness {
        session: Session::local(Arc::new(config()), 1000),
        queued: Vec::new(),
        closed: false,
        tls_handshakes: 0,
        auth_attempts: Vec::new(),
        verifies: Vec::new(),
        pauses: Vec::new(),
    };
    assert!(h.drive().starts_with("220 mx.example.test"));
    h.c("EHLO localhost\r\n");
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n");
    let env = &h.queued[0].0;
    assert_eq!(env.client.local_uid, Some(1000));
    assert_eq!(env.client.ip.to_string(), "127.0.0.1");
    let hdr = estafeta_proto::trace::received_header("mx.example.test", env, "ABCDEF012345", 0);
    assert_eq!(
        hdr,
        "Received: by mx.example.test (estafeta, from userid 1000)\r\n\
         \tid ABCDEF012345; Thu, 1 Jan 1970 00:00:00 +0000\r\n"
    );
}

fn submission() -> SessionConfig {
    SessionConfig {
        starttls: true,
        auth: estafeta_proto::AuthMode::AfterTls,
        require_auth: true,
        check_sender: true,
        max_errors: 20,
        ..config()
    }
}

const EHLO_PLAIN: &str = "250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-STARTTLS\r\n\
     250-ETRN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n";
const EHLO_TLS: &str = "250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-AUTH PLAIN LOGIN\r\n\
     250-ETRN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n\
     250 REQUIRETLS\r\n";

#[test]
fn submission_before_tls_offers_starttls_not_auth() {
    let (mut h, _) = Harness::new(submission());
    assert_eq!(h.c("EHLO client.example\r\n"), EHLO_PLAIN);
    assert_eq!(
        h.c("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n"),
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    );
    assert_eq!(
        h.c("MAIL FROM:<alice@example.test>\r\n"),
        "530 5.7.0 Authentication required\r\n"
    );
    assert!(h.auth_attempts.is_empty());
}

#[test]
fn starttls_discards_pipelined_plaintext_and_resets() {
    let (mut h, _) = Harness::new(submission());
    h.c("EHLO client.example\r\n");
    // CVE-2011-0411: the RSET and MAIL written with STARTTLS must not be executed.
    assert_eq!(
        h.c("STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.test>\r\n"),
        "220 2.0.0 Ready to start TLS\r\n"
    );
    assert_eq!(h.tls_handshakes, 1);
    // The session starts over: EHLO again, and now AUTH is offered, STARTTLS not.
    assert_eq!(
        h.c("MAIL FROM:<a@example.test>\r\n"),
        "503 5.5.1 Error: send HELO/EHLO first\r\n"
    );
    assert_eq!(h.c("EHLO client.example\r\n"), EHLO_TLS);
    assert_eq!(
        h.c("STARTTLS\r\n"),
        "503 5.5.1 Error: TLS already active\r\n"
    );
}

/// RFC 8689: REQUIRETLS is offered, and asked for, only inside TLS; it takes no value, and the
/// envelope carries it.
#[test]
fn requiretls_only_inside_tls() {
    let (mut h, _) = Harness::new(submission());
    assert!(!h.c("EHLO client.example\r\n").contains("REQUIRETLS"));
    let mut h = tls_session();
    assert_eq!(
        h.c("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n"),
        "235 2.7.0 Authentication successful\r\n"
    );
    assert_eq!(
        h.c("MAIL FROM:<alice@example.test> REQUIRETLS=yes\r\n"),
        "501 5.5.4 Error: REQUIRETLS takes no value\r\n"
    );
    assert_eq!(
        h.c("MAIL FROM:<alice@example.test> REQUIRETLS\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"),
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    h.c("Subject: secret\r\n\r\nx\r\n.\r\n");
    assert!(h.queued[0].0.params.requiretls);
    assert!(h.queued[0].0.params.to_string().contains(" REQUIRETLS"));
}

#[test]
fn requiretls_outside_tls_is_refused() {
    let (mut h, _) = Harness::new(config());
    h.c("EHLO client.example\r\n");
    assert_eq!(
        h.c("MAIL FROM:<alice@example.test> REQUIRETLS\r\n"),
        "530 5.7.10 REQUIRETLS needs a TLS session: use STARTTLS first\r\n"
    );
    assert_eq!(
        h.c("MAIL FROM:<alice@example.test>\r\n"),
        "250 2.1.0 Ok\r\n"
    );
}

fn tls_session() -> Harness {
    let (mut h, _) = Harness::new(submission());
    h.c("EHLO client.example\r\nSTARTTLS\r\n");
    h.c("EHLO client.example\r\n");
    h
}

#[test]
fn auth_plain_initial_response() {
    let mut h = tls_session();
    assert_eq!(
        h.c("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n"),
        "235 2.7.0 Authentication successful\r\n"
    );
    assert_eq!(
        h.c("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n"),
        "503 5.5.1 Error: already authenticated\r\n"
    );
    assert_eq!(
        h.c("MAIL FROM:<alice@example.test>\r\n"),
        "250 2.1.0 Ok\r\n"
    );
    h.c("RCPT TO:<bob@example.test>\r\nDATA\r\nx\r\n.\r\n");
    assert_eq!(h.queued[0].0.client.protocol, "ESMTPSA");
    assert_eq!(
        h.queued[0].0.client.tls.as_deref(),
        Some("TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384")
    );
}

#[test]
fn auth_plain_continuation_and_login() {
    let mut h = tls_session();
    assert_eq!(h.c("AUTH PLAIN\r\n"), "334 \r\n");
    assert_eq!(
        h.c("AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n"),
        "235 2.7.0 Authentication successful\r\n"
    );
    let mut h = tls_session();
    assert_eq!(h.c("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(h.c("YWxpY2VAZXhhbXBsZS50ZXN0\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(
        h.c("c2VjcmV0\r\n"),
        "235 2.7.0 Authentication successful\r\n"
    );
    let mut h = tls_session();
    assert_eq!(
        h.c("AUTH LOGIN YWxpY2VAZXhhbXBsZS50ZXN0\r\n"),
        "334 UGFzc3dvcmQ6\r\n"
    );
    assert_eq!(
        h.c("c2VjcmV0\r\n"),
        "235 2.7.0 Authentication successful\r\n"
    );
}

#[test]
fn auth_cancel_unknown_mechanism_and_failures() {
    let mut h = tls_session();
    assert_eq!(h.c("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(h.c("*\r\n"), "501 5.0.0 Authentication aborted\r\n");
    assert_eq!(
        h.c("AUTH CRAM-MD5\r\n"),
        "504 5.5.4 Unrecognized authentication type\r\n"
    );
    assert_eq!(
        h.c("AUTH PLAIN Ym9ndXM=\r\n"),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    assert_eq!(
        h.c("AUTH PLAIN Ym9ndXM=\r\n"),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    assert_eq!(
        h.c("AUTH PLAIN Ym9ndXM=\r\n"),
        "535 5.7.8 Authentication credentials invalid\r\n\
         421 4.7.0 mx.example.test Error: too many failed authentication attempts\r\n"
    );
    assert!(h.closed);
}

#[test]
fn sender_must_be_owned() {
    let mut h = tls_session();
    h.c("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n");
    assert_eq!(
        h.c("MAIL FROM:<bob@example.test>\r\n"),
        "553 5.7.1 <bob@example.test>: Sender address rejected: not owned by user alice@example.test\r\n"
    );
    assert_eq!(
        h.c("MAIL FROM:<alice@example.test> AUTH=<>\r\n"),
        "250 2.1.0 Ok\r\n"
    );
}

#[test]
fn implicit_tls_session() {
    let mut h = Harness {
        session: Session::with_tls(
            Arc::new(submission()),
            "192.0.2.9:40000".parse().unwrap(),
            Some("TLSv1.3 with cipher X".into()),
        ),
        queued: Vec::new(),
        closed: false,
        tls_handshakes: 0,
        auth_attempts: Vec::new(),
        verifies: Vec::new(),
        pauses: Vec::new(),
    };
    h.drive();
    assert_eq!(h.c("EHLO client.example\r\n"), EHLO_TLS);
}

#[test]
fn vrfy_and_expn_for_trusted_clients_go_to_the_driver() {
    let (mut h, _) = Harness::new(SessionConfig {
        vrfy: VrfyMode::Trusted,
        expn_trusted: true,
        ..config()
    });
    assert_eq!(h.c("VRFY bob\r\n"), "250 2.1.5 <bob@example.test>\r\n");
    assert!(h.c("VRFY nobody\r\n").starts_with("550 5.1.1"));
    assert!(h.c("EXPN team\r\n").starts_with("550 5.1.1"));
    assert_eq!(
        h.verifies,
        [
            ("bob".to_string(), false),
            ("nobody".to_string(), false),
            ("team".to_string(), true)
        ]
    );
}

#[test]
fn recipient_probing_is_slowed_then_cut_off() {
    let (mut h, _) = Harness::new(SessionConfig {
        max_unknown_recipients: 2,
        max_errors: 100,
        max_recipients: 100,
        ..config()
    });
    h.c("EHLO x\r\nMAIL FROM:<a@example.test>\r\n");
    assert!(
        h.c("RCPT TO:<nobody@example.test>\r\n")
            .starts_with("550 5.1.1")
    );
    assert!(
        h.c("RCPT TO:<nobody@example.test>\r\n")
            .starts_with("550 5.1.1")
    );
    assert!(h.pauses.is_empty());
    assert!(
        h.c("RCPT TO:<nobody@example.test>\r\n")
            .starts_with("550 5.1.1")
    );
    assert_eq!(h.pauses, [std::time::Duration::from_secs(1)]);
    // Known recipients are not slowed.
    assert_eq!(h.c("RCPT TO:<bob@example.test>\r\n"), "250 2.1.5 Ok\r\n");
    assert_eq!(h.pauses.len(), 1);
    let last = h.c("RCPT TO:<nobody@example.test>\r\n");
    assert!(
        last.ends_with("421 4.7.0 mx.example.test Error: too many unknown recipients\r\n"),
        "{last}"
    );
    assert!(h.closed);
}

#[test]
fn etrn_starts_the_queue_for_a_domain() {
    let (mut h, _) = Harness::new(config());
    // RFC 1985: after HELO/EHLO, never inside a transaction.
    assert_eq!(
        h.c("ETRN trusted.test\r\n"),
        "503 5.5.1 Error: send HELO/EHLO first\r\n"
    );
    let ehlo = h.c("EHLO client.example\r\n");
    assert!(ehlo.contains("250-ETRN\r\n"), "{ehlo}");
    assert_eq!(
        h.c("ETRN trusted.test\r\n"),
        "253 2.0.0 OK, 2 pending messages for node trusted.test started\r\n"
    );
    assert_eq!(
        h.c("ETRN @Empty.Test\r\n"),
        "251 2.0.0 OK, no messages waiting for node empty.test\r\n"
    );
    assert_eq!(
        h.c("ETRN other.test\r\n"),
        "459 4.7.1 Node other.test not allowed: ETRN is for trusted clients only\r\n"
    );
    assert_eq!(
        h.c("ETRN #queue\r\n"),
        "458 4.3.0 Unable to queue messages for node #queue\r\n"
    );
    assert_eq!(
        h.c("ETRN not..a.domain\r\n"),
        "501 5.5.4 Syntax: ETRN domain\r\n"
    );
    assert_eq!(h.c("ETRN\r\n"), "501 5.5.4 Syntax: ETRN domain\r\n");
    h.c("MAIL FROM:<a@example.test>\r\n");
    assert_eq!(
        h.c("ETRN trusted.test\r\n"),
        "503 5.5.1 Error: MAIL transaction in progress\r\n"
    );
}

/// Feeds `input` in pieces of `piece` octets as a driver does, taking the content whenever
/// `min` octets of it wait (a large message written to a file as it arrives); returns the
/// blocks taken and the `body_taken` the session reported when the message was queued.
fn feed_taking(h: &mut Harness, input: &[u8], piece: usize, min: usize) -> (Vec<Vec<u8>>, String) {
    let mut blocks = Vec::new();
    let mut replies = String::new();
    for p in input.chunks(piece) {
        h.session.feed(p);
        replies.push_str(&h.drive());
        if let Some(b) = h.session.take_body(min) {
            blocks.push(b);
        }
    }
    (blocks, replies)
}

#[test]
fn large_content_is_handed_over_in_blocks_and_joins_whole() {
    let (mut h, _) = Harness::new(SessionConfig {
        max_message_size: 10 << 20,
        ..config()
    });
    h.c("EHLO client.example\r\n");
    let line = "x".repeat(998) + "\r\n";
    let content = format!(
        "Subject: large\r\n\r\n{}..dot\r\nend\r\n",
        line.repeat(3000)
    );
    let expected = content.replace("\r\n..dot", "\r\n.dot");

    // DATA, in 16 KiB reads, taken by the MiB.
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    let input = format!("{content}.\r\n");
    let (blocks, replies) = feed_taking(&mut h, input.as_bytes(), 16 * 1024, 1 << 20);
    assert_eq!(replies, "250 2.0.0 Ok: queued as 000000000001\r\n");
    assert!(blocks.len() >= 2, "{} blocks", blocks.len());
    assert!(blocks.iter().all(|b| b.len() >= 1 << 20));
    let mut whole = blocks.concat();
    whole.extend_from_slice(&h.queued[0].1);
    assert_eq!(whole, expected.as_bytes());

    // BDAT, the same content in two chunks: the same message.
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n");
    let e = expected.as_bytes();
    let (first, second) = e.split_at(e.len() / 3);
    let mut input = format!("BDAT {}\r\n", first.len()).into_bytes();
    input.extend_from_slice(first);
    input.extend_from_slice(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
    input.extend_from_slice(second);
    let (blocks, replies) = feed_taking(&mut h, &input, 16 * 1024, 1 << 20);
    assert!(
        replies.ends_with("250 2.0.0 Ok: queued as 000000000002\r\n"),
        "{replies}"
    );
    let mut whole = blocks.concat();
    whole.extend_from_slice(&h.queued[1].1);
    assert_eq!(whole, e);

    // A new transaction starts from nothing taken.
    h.c("MAIL FROM:<a@example.test>\r\n");
    assert_eq!(h.session.body_taken(), 0);
}

/// Taking blocks early changes nothing the session judges on the header section: the hop
/// count and the header limit still refuse, and nothing is taken before the header ends.
#[test]
fn taken_content_is_still_judged_by_its_header_section() {
    let (mut h, _) = Harness::new(SessionConfig {
        max_message_size: 10 << 20,
        ..config()
    });
    h.c("EHLO client.example\r\n");
    let body = ("b".repeat(998) + "\r\n").repeat(2000);

    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    let hops = "Received: from a\r\n".repeat(4);
    let input = format!("{hops}\r\n{body}.\r\n");
    let (blocks, replies) = feed_taking(&mut h, input.as_bytes(), 64 * 1024, 1 << 20);
    assert!(!blocks.is_empty());
    assert!(replies.starts_with("554 5.4.6 Too many hops"), "{replies}");

    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    let many: String = (0..200_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let input = format!("{many}\r\n{body}.\r\n");
    let (_, replies) = feed_taking(&mut h, input.as_bytes(), 64 * 1024, 1 << 20);
    assert_eq!(
        replies,
        "552 5.3.4 Error: message header too big (over 1048576 octets)\r\n"
    );

    // Below 1 MiB of header, nothing is taken until its empty line arrives.
    h.c("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    h.c("Subject: slow\r\nX-Long: ");
    h.c(&"y".repeat(600 * 1024));
    assert!(h.session.take_body(1).is_none());
    h.c("\r\n\r\nbody\r\n");
    assert!(h.session.take_body(1).is_some());
    assert!(h.queued.is_empty());
}
