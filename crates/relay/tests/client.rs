//! The outbound SMTP client against real servers on loopback: a scripted peer (below, a
//! plain TCP server that answers each command line with the next reply of a fixed script and
//! records every byte it read) and, when installed, Postfix's `smtp-sink`.

mod common;
use common::{acceptor, certificate, skip};

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use estafeta_proto::{MailParams, Notify, Orcpt, RcptParams, Reply, Ret, Status};
use estafeta_queue::{Failure, Outcome};
use estafeta_relay::client::{
    ClientConfig, Connection, OutboundMessage, Timeouts, TlsPolicy, classify, deliver,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

// ---- the scripted peer -------------------------------------------------------------------

/// What the peer saw on one connection.
#[derive(Debug, Default)]
struct Record {
    /// Every read, as it came (decrypted after STARTTLS).
    chunks: Vec<Vec<u8>>,
    /// The command lines, without CRLF.
    lines: Vec<String>,
    /// The content of each DATA, exactly as received, end marker included.
    data: Vec<Vec<u8>>,
    /// Lines that did not match the script.
    unexpected: Vec<String>,
    /// True once TLS was started.
    tls: bool,
}

impl Record {
    fn commands(&self) -> Vec<&str> {
        self.lines
            .iter()
            .map(|l| l.split([' ', ':']).next().unwrap_or(""))
            .collect()
    }

    fn line(&self, prefix: &str) -> &str {
        self.lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in {:?}", self.lines))
    }
}

/// One connection's script: the greeting, then (start of the expected command, reply) pairs.
/// A reply is written with `\n` between lines. QUIT is always answered `221` and ends the
/// connection. The expected command `.` stands for the end of the content after a 354. An
/// empty reply means "say nothing" (the peer goes on reading until the client leaves). A 220
/// to STARTTLS starts TLS with the peer's acceptor, or hangs up when it has none.
struct Script {
    greeting: &'static str,
    steps: Vec<(&'static str, &'static str)>,
}

fn script(greeting: &'static str, steps: &[(&'static str, &'static str)]) -> Script {
    Script {
        greeting,
        steps: steps.to_vec(),
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Starts a peer that plays one script per incoming connection, in order.
async fn peer(
    scripts: Vec<Script>,
    tls: Option<TlsAcceptor>,
) -> (SocketAddr, JoinHandle<Vec<Record>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let mut records = Vec::new();
        for script in scripts {
            let (tcp, _) = listener.accept().await.unwrap();
            records.push(play(Box::new(tcp), script, tls.clone()).await);
        }
        records
    });
    (addr, handle)
}

async fn play(mut stream: Box<dyn Io>, script: Script, tls: Option<TlsAcceptor>) -> Record {
    let mut rec = Record::default();
    let mut steps = script.steps.into_iter();
    let mut buf: Vec<u8> = Vec::new();
    let mut in_data = false;
    let wire = |reply: &str| format!("{}\r\n", reply.replace('\n', "\r\n"));
    if stream
        .write_all(wire(script.greeting).as_bytes())
        .await
        .is_err()
    {
        return rec;
    }
    if !script.greeting.starts_with("220") {
        return rec;
    }
    loop {
        // Handle everything complete in the buffer.
        loop {
            let reply: String;
            let mut start_tls = false;
            if in_data {
                // The CRLF ending the DATA line counts as the one before the marker.
                let mut seen = b"\r\n".to_vec();
                seen.extend_from_slice(&buf);
                let Some(end) = seen.windows(5).position(|w| w == b"\r\n.\r\n") else {
                    break;
                };
                let taken = end + 5 - 2;
                rec.data.push(buf.drain(..taken).collect());
                in_data = false;
                reply = next(&mut steps, ".", ".", &mut rec);
            } else {
                let Some(p) = buf.windows(2).position(|w| w == b"\r\n") else {
                    break;
                };
                let line = String::from_utf8_lossy(&buf[..p]).into_owned();
                buf.drain(..p + 2);
                rec.lines.push(line.clone());
                if line.eq_ignore_ascii_case("QUIT") {
                    let _ = stream.write_all(b"221 2.0.0 Bye\r\n").await;
                    let _ = stream.shutdown().await;
                    return rec;
                }
                let expected = steps.as_slice().first().map(|s| s.0).unwrap_or("");
                reply = next(&mut steps, expected, &line, &mut rec);
                in_data = reply.starts_with("354");
                start_tls = line.eq_ignore_ascii_case("STARTTLS") && reply.starts_with("220");
            }
            if reply.is_empty() {
                continue;
            }
            // The peer hangs up instead of answering.
            if reply == "<close>" {
                return rec;
            }
            if stream.write_all(wire(&reply).as_bytes()).await.is_err() {
                return rec;
            }
            if start_tls {
                // Without an acceptor the peer is a broken TLS server: it hangs up.
                let Some(acceptor) = tls.clone() else {
                    return rec;
                };
                if !buf.is_empty() {
                    rec.unexpected
                        .push(format!("plaintext after STARTTLS: {buf:?}"));
                    buf.clear();
                }
                match acceptor.accept(stream).await {
                    Ok(s) => stream = Box::new(s),
                    Err(_) => return rec,
                }
                rec.tls = true;
            }
            if reply.starts_with("421") {
                return rec;
            }
        }
        let mut chunk = vec![0u8; 65536];
        let n = match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return rec,
        };
        chunk.truncate(n);
        buf.extend_from_slice(&chunk);
        rec.chunks.push(chunk);
    }
}

/// The next reply of the script for `line`, which should start with `expected`.
fn next(
    steps: &mut std::vec::IntoIter<(&'static str, &'static str)>,
    expected: &str,
    line: &str,
    rec: &mut Record,
) -> String {
    match steps.next() {
        Some((want, reply))
            if line
                .to_ascii_uppercase()
                .starts_with(&want.to_ascii_uppercase()) =>
        {
            reply.to_string()
        }
        Some((want, _)) => {
            rec.unexpected.push(format!("{line} (expected {want})"));
            "500 5.5.0 unexpected by the script".to_string()
        }
        None => {
            rec.unexpected.push(format!("{line} (after {expected})"));
            "500 5.5.0 script is over".to_string()
        }
    }
}

async fn finish(handle: JoinHandle<Vec<Record>>) -> Vec<Record> {
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("the peer finished")
        .unwrap()
}

async fn one(handle: JoinHandle<Vec<Record>>) -> Record {
    let mut records = finish(handle).await;
    assert_eq!(records.len(), 1);
    let rec = records.pop().unwrap();
    assert!(rec.unexpected.is_empty(), "{:?}", rec.unexpected);
    rec
}

// ---- messages ----------------------------------------------------------------------------

const HOST: &str = "mx.test";
const CONTENT: &[u8] = b"Subject: hello\r\n\r\nHello.\r\n";

fn config() -> ClientConfig {
    let mut cfg = ClientConfig::new("client.test");
    cfg.timeouts = Timeouts::all(Duration::from_secs(5));
    cfg
}

fn rcpts(list: &[&str]) -> Vec<(String, RcptParams)> {
    list.iter()
        .map(|r| (r.to_string(), RcptParams::default()))
        .collect()
}

fn message<'a>(
    params: &'a MailParams,
    rcpts: &'a [(String, RcptParams)],
    content: &'a [u8],
) -> OutboundMessage<'a> {
    OutboundMessage {
        id: "",
        from: "sender@origin.test",
        params,
        rcpts,
        content,
        needs_smtputf8: false,
        needs_8bit: false,
    }
}

fn failure(o: &Outcome) -> &Failure {
    match o {
        Outcome::TempFail(f) | Outcome::PermFail(f) => f,
        Outcome::Delivered(d) | Outcome::Relayed { detail: d, .. } => panic!("delivered: {d}"),
    }
}

fn status(o: &Outcome) -> String {
    failure(o)
        .reply
        .status
        .map(|s| s.to_string())
        .unwrap_or_default()
}

const EHLO_PLAIN: &str = "250-mx.test\n250 8BITMIME";
const DELIVER_STEPS: [(&str, &str); 4] = [
    ("MAIL FROM:", "250 2.1.0 Ok"),
    ("RCPT TO:", "250 2.1.5 Ok"),
    ("DATA", "354 go ahead"),
    (".", "250 2.0.0 Ok: queued as X1"),
];

fn steps_with(
    ehlo: &'static str,
    rest: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("EHLO", ehlo)];
    v.extend_from_slice(rest);
    v
}

// ---- per-recipient results, pipelining, SIZE ---------------------------------------------

#[tokio::test]
async fn per_recipient_results_from_rcpt_replies() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test ESMTP",
            &[
                ("EHLO client.test", EHLO_PLAIN),
                ("MAIL FROM:<sender@origin.test>", "250 2.1.0 Ok"),
                ("RCPT TO:<a@remote.test>", "250 2.1.5 Ok"),
                (
                    "RCPT TO:<b@remote.test>",
                    "550 5.1.1 <b@remote.test>: User unknown",
                ),
                (
                    "RCPT TO:<c@remote.test>",
                    "450-4.2.0 mailbox busy\n450 4.2.0 try later",
                ),
                ("DATA", "354 End data with <CR><LF>.<CR><LF>"),
                (".", "250 2.0.0 Ok: queued as ABC"),
            ],
        )],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test", "b@remote.test", "c@remote.test"]);
    let out = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    match &out[0] {
        Outcome::Relayed { detail, .. } => {
            assert!(
                detail.contains("mx.test") && detail.contains("queued as ABC"),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
    let Outcome::PermFail(b) = &out[1] else {
        panic!("{:?}", out[1])
    };
    assert_eq!(b.reply.code, 550);
    assert_eq!(b.reply.status, Some(Status::new(5, 1, 1)));
    assert_eq!(b.remote.as_deref(), Some(HOST));
    assert_eq!(b.command.as_deref(), Some("RCPT TO:<b@remote.test>"));
    let Outcome::TempFail(c) = &out[2] else {
        panic!("{:?}", out[2])
    };
    assert_eq!(c.reply.lines, vec!["mailbox busy", "try later"]);

    let rec = one(h).await;
    assert_eq!(
        rec.commands(),
        vec!["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]
    );
    // Without PIPELINING, one command per write: every read holds at most one line.
    for chunk in &rec.chunks[..rec.chunks.len() - 2] {
        assert_eq!(
            chunk.windows(2).filter(|w| w == b"\r\n").count(),
            1,
            "{chunk:?}"
        );
    }
    assert!(!rec.line("MAIL").contains("SIZE="));
}

#[tokio::test]
async fn pipelining_sends_mail_rcpts_and_data_in_one_write() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test ESMTP",
            &[
                (
                    "EHLO",
                    "250-mx.test\n250-PIPELINING\n250-SIZE 1000\n250 8BITMIME",
                ),
                ("MAIL", "250 2.1.0 Ok"),
                ("RCPT TO:<a@", "250 2.1.5 Ok"),
                ("RCPT TO:<b@", "550 5.1.1 unknown"),
                ("DATA", "354 go"),
                (".", "250 2.0.0 Ok: queued"),
            ],
        )],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test", "b@remote.test"]);
    let out = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    assert!(matches!(out[1], Outcome::PermFail(_)), "{out:?}");
    let rec = one(h).await;
    let expected = format!(
        "MAIL FROM:<sender@origin.test> SIZE={}\r\nRCPT TO:<a@remote.test>\r\nRCPT TO:<b@remote.test>\r\nDATA\r\n",
        CONTENT.len()
    );
    assert!(
        rec.chunks.iter().any(|c| c == expected.as_bytes()),
        "{:?}",
        rec.chunks
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn size_over_the_peer_limit_fails_permanently_without_mail() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &[("EHLO", "250-mx.test\n250 SIZE 10")],
        )],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let out = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::PermFail(_)), "{out:?}");
    assert_eq!(status(&out[0]), "5.3.4");
    assert_eq!(one(h).await.commands(), vec!["EHLO", "QUIT"]);
}

// ---- SMTPUTF8, 8BITMIME, DSN -------------------------------------------------------------

#[tokio::test]
async fn smtputf8_needed_but_not_offered_fails_all_with_5_6_7_and_sends_nothing() {
    let (addr, h) = peer(vec![script("220 mx.test", &[("EHLO", EHLO_PLAIN)])], None).await;
    let params = MailParams::default();
    let r = rcpts(&["jörg@remote.test", "b@remote.test"]);
    let mut msg = message(&params, &r, CONTENT);
    msg.needs_smtputf8 = true;
    let out = deliver(addr, HOST, &config(), &msg).await.unwrap();
    for o in &out {
        assert!(matches!(o, Outcome::PermFail(_)), "{o:?}");
        assert_eq!(status(o), "5.6.7");
        assert_eq!(failure(o).reply.code, 553);
    }
    // Nothing after EHLO but the farewell.
    assert_eq!(one(h).await.commands(), vec!["EHLO", "QUIT"]);
}

#[tokio::test]
async fn smtputf8_and_8bitmime_are_announced_when_offered_and_needed() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &steps_with("250-mx.test\n250-8BITMIME\n250 SMTPUTF8", &DELIVER_STEPS),
        )],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["jörg@remote.test"]);
    let mut msg = message(&params, &r, "Subject: grüße\r\n\r\nä\r\n".as_bytes());
    msg.needs_smtputf8 = true;
    msg.needs_8bit = true;
    let out = deliver(addr, HOST, &config(), &msg).await.unwrap();
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    let rec = one(h).await;
    assert_eq!(
        rec.line("MAIL"),
        "MAIL FROM:<sender@origin.test> BODY=8BITMIME SMTPUTF8"
    );
    assert_eq!(rec.line("RCPT"), "RCPT TO:<jörg@remote.test>");
}

fn dsn_message_parts() -> (MailParams, Vec<(String, RcptParams)>) {
    let params = MailParams {
        ret: Some(Ret::Hdrs),
        envid: Some("QQ314159".into()),
        ..MailParams::default()
    };
    let r = vec![(
        "a@remote.test".to_string(),
        RcptParams {
            notify: Some(Notify {
                success: true,
                failure: true,
                ..Notify::default()
            }),
            orcpt: Some(Orcpt {
                addr_type: "rfc822".into(),
                xtext: "orig+2Bx@origin.test".into(),
            }),
        },
    )];
    (params, r)
}

#[tokio::test]
async fn dsn_parameters_pass_when_dsn_is_offered() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &steps_with("250-mx.test\n250 DSN", &DELIVER_STEPS),
        )],
        None,
    )
    .await;
    let (params, r) = dsn_message_parts();
    let out = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    let rec = one(h).await;
    assert_eq!(
        rec.line("MAIL"),
        "MAIL FROM:<sender@origin.test> RET=HDRS ENVID=QQ314159"
    );
    assert_eq!(
        rec.line("RCPT"),
        "RCPT TO:<a@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Bx@origin.test"
    );
}

#[tokio::test]
async fn dsn_parameters_are_dropped_when_dsn_is_not_offered() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &steps_with(EHLO_PLAIN, &DELIVER_STEPS),
        )],
        None,
    )
    .await;
    let (params, r) = dsn_message_parts();
    deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap();
    let rec = one(h).await;
    assert_eq!(rec.line("MAIL"), "MAIL FROM:<sender@origin.test>");
    assert_eq!(rec.line("RCPT"), "RCPT TO:<a@remote.test>");
}

// ---- the content on the wire -------------------------------------------------------------

#[tokio::test]
async fn content_is_dot_stuffed_and_ends_with_crlf_dot_crlf() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &steps_with(EHLO_PLAIN, &DELIVER_STEPS),
        )],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let mut msg = message(
        &params,
        &r,
        b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n.\r\nlast",
    );
    msg.from = "";
    let out = deliver(addr, HOST, &config(), &msg).await.unwrap();
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    let rec = one(h).await;
    assert_eq!(rec.line("MAIL"), "MAIL FROM:<>");
    assert_eq!(
        String::from_utf8_lossy(&rec.data[0]),
        "Subject: dots\r\n\r\n..hidden\r\n...two\r\n..\r\nlast\r\n.\r\n"
    );
}

// ---- refusals and the session ------------------------------------------------------------

#[tokio::test]
async fn no_accepted_recipient_means_rset_and_no_data() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &[
                ("EHLO", EHLO_PLAIN),
                ("MAIL", "250 2.1.0 Ok"),
                ("RCPT", "550 5.1.1 unknown"),
                ("RSET", "250 2.0.0 Ok"),
            ],
        )],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let cfg = config();
    let msg = message(&params, &r, CONTENT);
    let mut conn = Connection::open(addr, HOST, &cfg).await.unwrap();
    let out = conn.send(&msg).await;
    assert!(matches!(out[0], Outcome::PermFail(_)), "{out:?}");
    // RSET goes before the next transaction; here the session ends instead.
    conn.quit().await;
    let rec = one(h).await;
    assert_eq!(rec.commands(), vec!["EHLO", "MAIL", "RCPT", "QUIT"]);
}

#[tokio::test]
async fn one_session_carries_two_messages_with_rset_after_a_refusal() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &[
                ("EHLO", EHLO_PLAIN),
                ("MAIL", "451 4.3.0 try later"),
                ("RSET", "250 2.0.0 Ok"),
                ("MAIL", "250 2.1.0 Ok"),
                ("RCPT", "250 2.1.5 Ok"),
                ("DATA", "354 go"),
                (".", "250 2.0.0 Ok"),
            ],
        )],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test", "b@remote.test"]);
    let r2 = rcpts(&["c@remote.test"]);
    let cfg = config();
    let mut conn = Connection::open(addr, HOST, &cfg).await.unwrap();
    let out = conn.send(&message(&params, &r, CONTENT)).await;
    assert!(
        out.iter().all(|o| matches!(o, Outcome::TempFail(_))),
        "{out:?}"
    );
    assert_eq!(
        failure(&out[1]).command.as_deref(),
        Some("MAIL FROM:<sender@origin.test>")
    );
    let out = conn.send(&message(&params, &r2, CONTENT)).await;
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    conn.quit().await;
    let rec = one(h).await;
    assert_eq!(
        rec.commands(),
        vec!["EHLO", "MAIL", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
    );
}

#[tokio::test]
async fn pipelined_with_every_rcpt_refused_ends_an_accepted_data_empty() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &[
                ("EHLO", "250-mx.test\n250 PIPELINING"),
                ("MAIL", "250 2.1.0 Ok"),
                ("RCPT", "550 5.1.1 unknown"),
                ("DATA", "354 go"),
                (".", "554 5.5.1 no valid recipients"),
            ],
        )],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let out = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert_eq!(status(&out[0]), "5.1.1");
    let rec = one(h).await;
    assert_eq!(rec.data, vec![b".\r\n".to_vec()]);
}

#[tokio::test]
async fn a_421_on_rcpt_fails_every_open_recipient_temporarily() {
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &[
                ("EHLO", EHLO_PLAIN),
                ("MAIL", "250 2.1.0 Ok"),
                ("RCPT TO:<a@", "250 2.1.5 Ok"),
                ("RCPT TO:<b@", "550 5.1.1 unknown"),
                ("RCPT TO:<c@", "421 4.7.0 mx.test closing"),
            ],
        )],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&[
        "a@remote.test",
        "b@remote.test",
        "c@remote.test",
        "d@remote.test",
    ]);
    let out = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert!(matches!(out[1], Outcome::PermFail(_)), "{out:?}");
    for i in [0, 2, 3] {
        let Outcome::TempFail(f) = &out[i] else {
            panic!("{:?}", out[i])
        };
        assert_eq!(f.reply.code, 421);
    }
    let rec = one(h).await;
    assert_eq!(rec.commands(), vec!["EHLO", "MAIL", "RCPT", "RCPT", "RCPT"]);
}

#[tokio::test]
async fn ehlo_refused_falls_back_to_helo() {
    let mut steps = vec![
        ("EHLO", "502 5.5.2 Error: command not recognized"),
        ("HELO client.test", "250 mx.test"),
    ];
    steps.extend_from_slice(&DELIVER_STEPS);
    let (addr, h) = peer(
        vec![Script {
            greeting: "220 mx.test",
            steps,
        }],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let out = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    let rec = one(h).await;
    assert_eq!(rec.line("MAIL"), "MAIL FROM:<sender@origin.test>");
}

#[tokio::test]
async fn greeting_421_is_a_temporary_session_error_and_554_a_permanent_one() {
    let (addr, h) = peer(
        vec![
            script("421 4.7.0 mx.test busy", &[]),
            script("554 5.7.1 go away", &[]),
        ],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let msg = message(&params, &r, CONTENT);
    let err = deliver(addr, HOST, &config(), &msg).await.unwrap_err();
    assert!(!err.permanent);
    assert_eq!(err.failure.reply.code, 421);
    assert_eq!(err.failure.remote.as_deref(), Some(HOST));
    let err = deliver(addr, HOST, &config(), &msg).await.unwrap_err();
    assert!(err.permanent);
    assert_eq!(err.failure.reply.code, 554);
    finish(h).await;
}

#[tokio::test]
async fn connection_refused_is_a_temporary_session_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let err = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap_err();
    assert!(!err.permanent);
    assert_eq!(err.failure.reply.status, Some(Status::new(4, 4, 1)));
    assert!(
        err.failure.to_string().contains("mx.test[127.0.0.1]"),
        "{}",
        err.failure
    );
}

#[tokio::test]
async fn a_silent_peer_times_out_within_the_configured_bound() {
    // No reply to EHLO: a session error.
    let (addr, h) = peer(vec![script("220 mx.test", &[("EHLO", "")])], None).await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let mut cfg = config();
    cfg.timeouts.ehlo = Duration::from_millis(300);
    let started = Instant::now();
    let err = deliver(addr, HOST, &cfg, &message(&params, &r, CONTENT))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!err.permanent);
    assert_eq!(err.failure.reply.status, Some(Status::new(4, 4, 2)));
    assert!(
        err.failure.reply.text().contains("timed out"),
        "{}",
        err.failure
    );
    finish(h).await;

    // No reply after the content: every recipient fails temporarily.
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &[
                ("EHLO", EHLO_PLAIN),
                ("MAIL", "250 2.1.0 Ok"),
                ("RCPT", "250 2.1.5 Ok"),
                ("DATA", "354 go"),
                (".", ""),
            ],
        )],
        None,
    )
    .await;
    let mut cfg = config();
    cfg.timeouts.data_final = Duration::from_millis(300);
    let out = deliver(addr, HOST, &cfg, &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::TempFail(_)), "{out:?}");
    assert_eq!(status(&out[0]), "4.4.2");
    finish(h).await;
}

// ---- TLS -----------------------------------------------------------------------------------

const TLS_STEPS: [(&str, &str); 6] = [
    ("EHLO", "250-mx.test\n250-STARTTLS\n250 SIZE 100000"),
    ("STARTTLS", "220 2.0.0 Ready to start TLS"),
    // The EHLO after TLS offers more; the client must use this one.
    (
        "EHLO",
        "250-mx.test\n250-PIPELINING\n250-AUTH PLAIN LOGIN\n250 SIZE 100000",
    ),
    ("MAIL", "250 2.1.0 Ok"),
    ("RCPT", "250 2.1.5 Ok"),
    ("DATA", "354 go"),
];

#[tokio::test]
async fn starttls_opportunistic_then_ehlo_again() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cert, key)) = certificate(dir.path(), "cert", &["mx.test"]) else {
        return;
    };
    let mut steps = TLS_STEPS.to_vec();
    steps.push((".", "250 2.0.0 Ok: queued"));
    let (addr, h) = peer(
        vec![Script {
            greeting: "220 mx.test",
            steps,
        }],
        Some(acceptor(&cert, &key)),
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let out = deliver(addr, HOST, &config(), &message(&params, &r, b".dot\r\n"))
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    let rec = one(h).await;
    assert!(rec.tls);
    assert_eq!(
        rec.commands(),
        vec!["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    );
    assert_eq!(rec.data, vec![b"..dot\r\n.\r\n".to_vec()]);
    // PIPELINING came with the second EHLO: MAIL, RCPT and DATA arrived together.
    assert!(
        rec.chunks
            .iter()
            .any(|c| c.starts_with(b"MAIL") && c.ends_with(b"DATA\r\n"))
    );
}

#[tokio::test]
async fn auth_plain_is_sent_inside_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cert, key)) = certificate(dir.path(), "cert", &["mx.test"]) else {
        return;
    };
    let mut steps = TLS_STEPS[..3].to_vec();
    steps.push((
        "AUTH PLAIN AGpvZQBzM2NyZXQ=",
        "235 2.7.0 Authentication successful",
    ));
    steps.extend_from_slice(&TLS_STEPS[3..]);
    steps.push((".", "250 2.0.0 Ok: queued"));
    let (addr, h) = peer(
        vec![Script {
            greeting: "220 mx.test",
            steps,
        }],
        Some(acceptor(&cert, &key)),
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let mut cfg = config();
    cfg.tls = TlsPolicy::Required;
    cfg.credentials = Some(("joe".into(), "s3cret".into()));
    let out = deliver(addr, HOST, &cfg, &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    one(h).await;

    // Without TLS the credentials stay at home.
    let (addr, h) = peer(
        vec![script(
            "220 mx.test",
            &[("EHLO", "250-mx.test\n250 AUTH PLAIN")],
        )],
        None,
    )
    .await;
    cfg.tls = TlsPolicy::Opportunistic;
    let err = deliver(addr, HOST, &cfg, &message(&params, &r, CONTENT))
        .await
        .unwrap_err();
    assert!(!err.permanent);
    let rec = one(h).await;
    assert_eq!(rec.commands(), vec!["EHLO"]);
}

#[tokio::test]
async fn tls_required_but_not_offered_is_a_temporary_session_error() {
    let (addr, h) = peer(vec![script("220 mx.test", &[("EHLO", EHLO_PLAIN)])], None).await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let mut cfg = config();
    cfg.tls = TlsPolicy::Required;
    let err = deliver(addr, HOST, &cfg, &message(&params, &r, CONTENT))
        .await
        .unwrap_err();
    assert!(!err.permanent);
    assert_eq!(err.failure.reply.status, Some(Status::new(4, 7, 4)));
    let rec = one(h).await;
    assert!(!rec.commands().contains(&"MAIL"));
}

#[tokio::test]
async fn tls_verify_checks_the_chain_and_the_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cert, key)) = certificate(dir.path(), "cert", &["mx.test"]) else {
        return;
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut cfg = config();
    cfg.tls = TlsPolicy::Verify;
    cfg.roots = Some(Arc::new(roots));
    let mut steps = TLS_STEPS.to_vec();
    steps.push((".", "250 2.0.0 Ok: queued"));
    let (addr, h) = peer(
        vec![
            Script {
                greeting: "220 mx.test",
                steps,
            },
            script("220 other.test", &TLS_STEPS[..2]),
        ],
        Some(acceptor(&cert, &key)),
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    let msg = message(&params, &r, CONTENT);
    let mut conn = Connection::open(addr, "mx.test", &cfg).await.unwrap();
    let tls = conn.tls().cloned().unwrap();
    assert!(tls.verified && !conn.tls_fallback(), "{tls:?}");
    let out = conn.send(&msg).await;
    conn.quit().await;
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    // The same certificate presented for another name: refused, and no plaintext fallback.
    let err = deliver(addr, "other.test", &cfg, &msg).await.unwrap_err();
    assert!(!err.permanent);
    assert_eq!(err.failure.reply.status, Some(Status::new(4, 7, 5)));
    let records = finish(h).await;
    assert!(records[0].tls);
}

#[tokio::test]
async fn opportunistic_tls_falls_back_to_plaintext_after_a_failed_handshake() {
    // The first peer says 220 to STARTTLS and then speaks no TLS (it answers the handshake
    // with an SMTP line); the client reconnects and delivers in plaintext.
    let (addr, h) = peer(
        vec![
            script(
                "220 mx.test",
                &[
                    ("EHLO", "250-mx.test\n250 STARTTLS"),
                    ("STARTTLS", "220 2.0.0 go ahead\n500 5.5.0 not really"),
                ],
            ),
            script(
                "220 mx.test",
                &steps_with("250-mx.test\n250 STARTTLS", &DELIVER_STEPS),
            ),
        ],
        None,
    )
    .await;
    let params = MailParams::default();
    let r = rcpts(&["a@remote.test"]);
    // The second connection must not try STARTTLS again: the scripted peer would answer
    // "500 unexpected" and the client would go on in plaintext anyway.
    let out = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT))
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Relayed { .. }), "{out:?}");
    let records = finish(h).await;
    assert_eq!(records.len(), 2);
    assert_eq!(
        records[1].commands(),
        vec!["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    );
}

// ---- the classification ------------------------------------------------------------------

#[test]
fn classification_table() {
    use Kind::*;
    #[derive(Debug, PartialEq)]
    enum Kind {
        Delivered,
        Temp,
        Perm,
    }
    let cases: &[(u16, &str, Kind)] = &[
        (250, "MAIL FROM:<a@b>", Delivered),
        (251, "RCPT TO:<a@b>", Delivered),
        (250, "end of DATA", Delivered),
        (421, "MAIL FROM:<a@b>", Temp),
        (421, "RCPT TO:<a@b>", Temp),
        (421, "end of DATA", Temp),
        (450, "RCPT TO:<a@b>", Temp),
        (451, "end of DATA", Temp),
        (452, "RCPT TO:<a@b>", Temp),
        (552, "RCPT TO:<a@b>", Temp),
        (552, "MAIL FROM:<a@b>", Perm),
        (552, "end of DATA", Perm),
        (550, "RCPT TO:<a@b>", Perm),
        (553, "MAIL FROM:<a@b>", Perm),
        (554, "DATA", Perm),
        (354, "RCPT TO:<a@b>", Temp),
        (199, "RCPT TO:<a@b>", Temp),
        (600, "RCPT TO:<a@b>", Temp),
        (999, "end of DATA", Temp),
    ];
    for (code, command, kind) in cases {
        let reply = Reply::new(*code, Status::new(5, 0, 0), "text");
        let got = match classify(&reply, command, "mx.test") {
            Outcome::Delivered(text) => {
                assert!(text.starts_with("mx.test said: "), "{text}");
                Delivered
            }
            Outcome::Relayed { detail, .. } => panic!("classify never says relayed: {detail}"),
            Outcome::TempFail(f) => {
                assert_eq!(f.remote.as_deref(), Some("mx.test"));
                assert_eq!(f.command.as_deref(), Some(*command));
                Temp
            }
            Outcome::PermFail(f) => {
                assert_eq!(f.reply.code, *code);
                Perm
            }
        };
        assert_eq!(&got, kind, "{code} to {command}");
    }
}

// ---- a third-party server ----------------------------------------------------------------

/// Postfix's smtp-sink, killed when dropped.
struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn delivers_to_postfix_smtp_sink() {
    const SINK: &str = "/usr/sbin/smtp-sink";
    if !Path::new(SINK).exists() {
        skip(&format!("{SINK} is not installed: test skipped"));
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let _sink = Sink(
        Command::new(SINK)
            .args(["-u", "nobody", &format!("127.0.0.1:{port}"), "10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "smtp-sink did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (params, r) = dsn_message_parts();
    let mut r = r;
    r.extend(rcpts(&["b@remote.test", "c@remote.test"]));
    let mut body = b"Subject: to the sink\r\n\r\n.leading dot\r\n".to_vec();
    body.extend(
        std::iter::repeat_n(b"0123456789abcdef0123456789abcdef\r\n".as_slice(), 5000).flatten(),
    );
    let mut msg = message(&params, &r, &body);
    msg.needs_8bit = true;
    let out = deliver(addr, "sink.test", &config(), &msg).await.unwrap();
    assert_eq!(out.len(), 3);
    for o in &out {
        assert!(matches!(o, Outcome::Relayed { .. }), "{o:?}");
    }
}

/// A peer that answers 4xx, 5xx, garbage, or hangs up, at each step of a transaction: the one
/// recipient's outcome is temporary, permanent, temporary and temporary — never "delivered"
/// for a connection closed before the reply to the end of data.
#[tokio::test]
async fn every_step_answered_badly_gives_the_right_outcome() {
    let steps = ["MAIL FROM:", "RCPT TO:", "DATA", "."];
    let answers: [(&str, &str); 4] = [
        ("451 4.3.0 try again", "temp"),
        ("554 5.7.1 refused", "perm"),
        ("hello, I am not an SMTP server", "temp"),
        ("<close>", "temp"),
    ];
    for (at, step) in steps.iter().enumerate() {
        for (answer, want) in answers {
            let mut script_steps: Vec<(&'static str, &'static str)> =
                vec![("EHLO client.test", EHLO_PLAIN)];
            for (i, (cmd, ok)) in DELIVER_STEPS.iter().enumerate() {
                if i < at {
                    script_steps.push((cmd, ok));
                } else if i == at {
                    script_steps.push((cmd, answer));
                }
            }
            // Whatever the client says next (RSET, QUIT) is answered, or not.
            script_steps.push(("RSET", "250 2.0.0 Ok"));
            let (addr, h) = peer(vec![script("220 mx.test ESMTP", &script_steps)], None).await;
            let params = MailParams::default();
            let r = rcpts(&["a@remote.test"]);
            let out = deliver(addr, HOST, &config(), &message(&params, &r, CONTENT)).await;
            let got = match &out {
                Ok(o) => match &o[0] {
                    Outcome::TempFail(_) => "temp",
                    Outcome::PermFail(_) => "perm",
                    Outcome::Delivered(_) | Outcome::Relayed { .. } => "delivered",
                },
                Err(e) if e.permanent => "perm",
                Err(_) => "temp",
            };
            assert_eq!(got, want, "{step} answered {answer:?}: {out:?}");
            let _ = finish(h).await;
        }
    }
}
