//! The client against a real milter: tests/milters/scripted.py on Debian's python3-milter
//! (libmilter underneath), which exercises every action. Also: a filter that is down, and one
//! that accepts the connection but never answers.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, free_port, listening, macros, python_milter, scripted_script, skip};
use estafeta_milter::codec::proto;
use estafeta_milter::{Address, Error, Milter, Modification, Timeouts, Verdict, apply};

const CLIENT: &str = "192.0.2.10";

fn start_scripted(mode: &str) -> Option<(Daemon, Address)> {
    let py = match python_milter() {
        Ok(py) => py,
        Err(why) => {
            skip(&why);
            return None;
        }
    };
    let port = free_port();
    let mut cmd = Command::new(py);
    cmd.arg(scripted_script()).arg(port.to_string()).arg(mode);
    let d = Daemon::start("scripted milter", cmd, Duration::from_secs(20), || {
        listening(port)
    });
    let address = format!("inet:127.0.0.1:{port}").parse().unwrap();
    Some((d, address))
}

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        command: Duration::from_secs(10),
        eom: Duration::from_secs(10),
    }
}

async fn session(address: &Address) -> Milter {
    let mut m = Milter::connect(address, timeouts()).await.expect("connect");
    let ip: IpAddr = CLIENT.parse().unwrap();
    let conn_macros = macros(&[("j", "mx.example.org"), ("{daemon_name}", "estafeta")]);
    let v = m
        .connect_step("client.example.net", ip, 4242, &conn_macros)
        .await
        .unwrap();
    assert_eq!(v, Verdict::Continue);
    assert_eq!(
        m.helo("client.example.net", &[]).await.unwrap(),
        Verdict::Continue
    );
    m
}

/// One transaction from alice to `rcpts`, with header `X-Test: action`; the verdict and the
/// modifications at the end of the message.
async fn transaction(
    m: &mut Milter,
    action: &str,
    rcpts: &[&str],
    body: &[u8],
) -> (Verdict, Vec<Modification>, Vec<u8>) {
    let mail_macros = macros(&[("{mail_addr}", "alice@example.com")]);
    let args = vec!["SIZE=1000".to_string(), "BODY=8BITMIME".to_string()];
    assert_eq!(
        m.mail("alice@example.com", &args, &mail_macros)
            .await
            .unwrap(),
        Verdict::Continue
    );
    for r in rcpts {
        assert_eq!(m.rcpt(r, &[], &[]).await.unwrap(), Verdict::Continue, "{r}");
    }
    let mut msg = format!(
        "Received: from client.example.net\r\n\tby mx.example.org; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
         Subject: hello\r\nX-Remove: me\r\nX-Test: {action}\r\n\r\n"
    )
    .into_bytes();
    msg.extend_from_slice(body);
    let (v, mods) = m
        .message(&msg, &macros(&[("i", "QUEUEID1")]))
        .await
        .unwrap();
    (v, mods, msg)
}

fn added(mods: &[Modification], name: &str) -> Option<String> {
    mods.iter().find_map(|m| match m {
        Modification::AddHeader { name: n, value } if n == name => Some(value.clone()),
        _ => None,
    })
}

#[tokio::test]
async fn every_action_of_a_libmilter_filter() {
    let Some((_d, address)) = start_scripted("full") else {
        return;
    };
    let mut m = session(&address).await;
    assert_eq!(m.version(), 6);
    assert_eq!(
        m.protocol() & (proto::NR_HDR | proto::NR_CONN | proto::NOHELO),
        0
    );

    // Recipients refused one by one, with the filter's own reply or without.
    m.mail("alice@example.com", &[], &[]).await.unwrap();
    let v = m.rcpt("reject-rcpt@example.org", &[], &[]).await.unwrap();
    let Verdict::Reject(Some(reply)) = v else {
        panic!("{v:?}")
    };
    assert_eq!(reply.to_string(), "550 5.1.1 No such user here");
    let v = m.rcpt("tempfail-rcpt@example.org", &[], &[]).await.unwrap();
    assert_eq!(v, Verdict::TempFail(None));
    m.abort().await.unwrap();

    // Every modification; the body in three chunks (65535 + 65535 + 10).
    let body = vec![b'x'; 2 * 65535 + 10];
    let (v, mods, msg) = transaction(
        &mut m,
        "modify",
        &["bob@example.org", "carol@example.org"],
        &body,
    )
    .await;
    assert_eq!(v, Verdict::Accept);
    assert_eq!(
        added(&mods, "X-Seen-Client").unwrap(),
        format!("client.example.net {CLIENT} 4242")
    );
    assert_eq!(added(&mods, "X-Seen-Helo").unwrap(), "client.example.net");
    assert_eq!(
        added(&mods, "X-Seen-From").unwrap(),
        "<alice@example.com> SIZE=1000 BODY=8BITMIME"
    );
    assert_eq!(
        added(&mods, "X-Seen-Rcpts").unwrap(),
        "<bob@example.org> <carol@example.org>"
    );
    assert_eq!(
        added(&mods, "X-Seen-Headers").unwrap(),
        "Received=from client.example.net\\r\\n\tby mx.example.org; Mon, 1 Jan 2024 00:00:00 +0000\
         |Subject=hello|X-Remove=me|X-Test=modify"
    );
    assert_eq!(
        added(&mods, "X-Seen-Body").unwrap(),
        "131080 bytes in 3 chunks"
    );
    assert_eq!(
        added(&mods, "X-Seen-Macros").unwrap(),
        "j=mx.example.org i=QUEUEID1 mail_addr=alice@example.com"
    );
    let expected_tail = [
        Modification::ChangeHeader {
            name: "Subject".into(),
            index: 1,
            value: "changed subject".into(),
        },
        Modification::ChangeHeader {
            name: "X-Remove".into(),
            index: 1,
            value: String::new(),
        },
        Modification::InsertHeader {
            index: 0,
            name: "X-Top".into(),
            value: "first".into(),
        },
        Modification::ReplaceBody(b"replaced body\r\nline two\r\n".to_vec()),
        Modification::AddRcpt {
            rcpt: "added@example.org".into(),
            args: vec![],
        },
        Modification::AddRcpt {
            rcpt: "added-par@example.org".into(),
            args: vec!["NOTIFY=NEVER".into()],
        },
        Modification::DelRcpt("bob@example.org".into()),
        Modification::ChangeFrom {
            from: "new-sender@example.org".into(),
            args: vec!["SIZE=100".into()],
        },
        Modification::Quarantine("held for review".into()),
    ];
    assert_eq!(&mods[7..], &expected_tail, "{mods:#?}");

    let edited = String::from_utf8(apply(&msg, &mods)).unwrap();
    assert!(
        edited.starts_with("X-Top: first\r\nReceived: from client.example.net\r\n\tby mx"),
        "{edited}"
    );
    assert!(
        edited.contains("\r\nSubject: changed subject\r\nX-Test: modify\r\nX-Seen-Client: "),
        "{edited}"
    );
    assert!(!edited.contains("\r\nX-Remove:"), "{edited}");
    assert!(
        edited.ends_with("\r\n\r\nreplaced body\r\nline two\r\n"),
        "{edited}"
    );

    // The same connection, one verdict per transaction.
    let cases: Vec<(&str, Verdict)> = vec![
        (
            "reply",
            Verdict::Reject(Some(estafeta_proto::Reply::from_received(
                554,
                vec!["5.7.1 Custom refusal".into()],
            ))),
        ),
        ("tempfail", Verdict::TempFail(None)),
        ("discard", Verdict::Discard),
        ("reject", Verdict::Reject(None)),
        ("accept", Verdict::Accept),
        ("none", Verdict::Continue),
    ];
    for (action, expected) in cases {
        let (v, _, _) = transaction(&mut m, action, &["dave@example.org"], b"hi\r\n").await;
        assert_eq!(v, expected, "{action}");
    }
    let (v, _, _) = transaction(&mut m, "multiline", &["dave@example.org"], b"hi\r\n").await;
    let Verdict::TempFail(Some(reply)) = v else {
        panic!("{v:?}")
    };
    assert_eq!(
        reply.to_bytes(),
        b"451-4.7.1 first line\r\n451 4.7.1 second line\r\n"
    );

    // A reject at a header ends the message early; the next transaction aborts it first.
    let (v, mods, _) = transaction(&mut m, "header-reject", &["dave@example.org"], b"hi\r\n").await;
    assert_eq!(v, Verdict::Reject(None));
    assert!(mods.is_empty());
    let (v, _, _) = transaction(&mut m, "accept", &["dave@example.org"], b"hi\r\n").await;
    assert_eq!(v, Verdict::Accept);

    // SKIP after the first body chunk: the rest is not sent.
    let (v, mods, _) = transaction(&mut m, "skip", &["dave@example.org"], &body).await;
    assert_eq!(v, Verdict::Continue);
    assert_eq!(
        added(&mods, "X-Seen-Body").unwrap(),
        "65535 bytes in 1 chunks"
    );

    // ACCEPT at RCPT: no more questions for this message.
    m.mail("alice@example.com", &[], &[]).await.unwrap();
    assert_eq!(
        m.rcpt("accept-rcpt@example.org", &[], &[]).await.unwrap(),
        Verdict::Accept
    );
    let (v, mods) = m.message(b"Subject: x\r\n\r\nhi\r\n", &[]).await.unwrap();
    assert_eq!((v, mods), (Verdict::Accept, vec![]));
    m.abort().await.unwrap();
    let (v, _, _) = transaction(&mut m, "reject", &["dave@example.org"], b"hi\r\n").await;
    assert_eq!(v, Verdict::Reject(None));
    m.quit().await;
}

#[tokio::test]
async fn progress_keeps_a_slow_filter_alive_and_helo_reject_holds_for_the_connection() {
    let Some((_d, address)) = start_scripted("full") else {
        return;
    };
    // The filter sleeps 3 × 0.6 s at the end of the message, sending PROGRESS in between:
    // more than the 1 s timeout in all, never 1 s without a word.
    let t = Timeouts {
        connect: Duration::from_secs(5),
        command: Duration::from_secs(1),
        eom: Duration::from_secs(1),
    };
    let mut m = Milter::connect(&address, t).await.unwrap();
    m.connect_step("h", "192.0.2.1".parse().unwrap(), 1, &[])
        .await
        .unwrap();
    m.helo("h", &[]).await.unwrap();
    let started = Instant::now();
    let (v, _, _) = transaction(&mut m, "progress", &["dave@example.org"], b"hi\r\n").await;
    assert_eq!(v, Verdict::Continue);
    assert!(started.elapsed() > Duration::from_millis(1500));
    m.quit().await;

    let mut m = Milter::connect(&address, timeouts()).await.unwrap();
    m.connect_step("h", "::ffff:192.0.2.1".parse().unwrap(), 1, &[])
        .await
        .unwrap();
    assert_eq!(
        m.helo("reject.example", &[]).await.unwrap(),
        Verdict::Reject(None)
    );
    // Held for the connection: later steps answer it without asking.
    assert_eq!(
        m.mail("a@b", &[], &[]).await.unwrap(),
        Verdict::Reject(None)
    );
    m.quit().await;
}

#[tokio::test]
async fn a_lean_filter_gets_only_the_steps_it_wants_and_no_reply_is_awaited() {
    let Some((_d, address)) = start_scripted("lean") else {
        return;
    };
    let mut m = session(&address).await;
    let p = m.protocol();
    for (flag, name) in [
        (proto::NOHELO, "NOHELO"),
        (proto::NODATA, "NODATA"),
        (proto::NOEOH, "NOEOH"),
        (proto::NR_CONN, "NR_CONN"),
        (proto::NR_MAIL, "NR_MAIL"),
        (proto::NR_HDR, "NR_HDR"),
    ] {
        assert_ne!(p & flag, 0, "{name} not negotiated: {p:#x}");
    }
    let (v, mods, _) = transaction(&mut m, "modify", &["bob@example.org"], b"hi\r\n").await;
    assert_eq!(v, Verdict::Accept);
    assert_eq!(added(&mods, "X-Seen-Helo").unwrap(), ""); // never sent
    assert_eq!(added(&mods, "X-Seen-Body").unwrap(), "4 bytes in 1 chunks");
    assert!(
        added(&mods, "X-Seen-Headers")
            .unwrap()
            .ends_with("|X-Test=modify")
    );
    let (v, _, _) = transaction(&mut m, "reply", &["bob@example.org"], b"hi\r\n").await;
    assert!(
        matches!(v, Verdict::Reject(Some(ref r)) if r.code == 554),
        "{v:?}"
    );
    m.quit().await;
}

#[tokio::test]
async fn unix_socket() {
    let py = match python_milter() {
        Ok(py) => py,
        Err(why) => return skip(&why),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.sock");
    let mut cmd = Command::new(py);
    // The script takes a port; for a socket, start libmilter on "unix:PATH" through -c.
    cmd.arg("-c").arg(format!(
        "import sys, runpy; sys.argv=['scripted.py','0']; \
         import Milter; orig=Milter.runmilter; \
         Milter.runmilter=lambda n,c,timeout=60: orig(n,'unix:{}',timeout=timeout); \
         runpy.run_path('{}', run_name='__main__')",
        path.display(),
        scripted_script()
    ));
    let p = path.clone();
    let _d = Daemon::start(
        "scripted milter (unix)",
        cmd,
        Duration::from_secs(20),
        move || std::os::unix::net::UnixStream::connect(&p).is_ok(),
    );
    let address: Address = format!("unix:{}", path.display()).parse().unwrap();
    let mut m = session(&address).await;
    let (v, _, _) = transaction(&mut m, "discard", &["bob@example.org"], b"hi\r\n").await;
    assert_eq!(v, Verdict::Discard);
    m.quit().await;
}

#[tokio::test]
async fn a_filter_that_is_down_fails_fast() {
    let port = free_port();
    let address: Address = format!("inet:127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    let e = Milter::connect(&address, timeouts()).await.unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("milter inet:127.0.0.1:{port}: cannot connect: ")),
        "{text}"
    );

    let missing: Address = "unix:/nonexistent/milter.sock".parse().unwrap();
    let e = Milter::connect(&missing, timeouts()).await.unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
}

#[tokio::test]
async fn a_filter_that_never_answers_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts, reads whatever comes, answers nothing; ends with the test.
    let silent = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let address: Address = format!("inet:127.0.0.1:{port}").parse().unwrap();
    let t = Timeouts {
        connect: Duration::from_secs(5),
        command: Duration::from_millis(500),
        eom: Duration::from_millis(500),
    };
    let started = Instant::now();
    let e = Milter::connect(&address, t).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            e,
            Error::Timeout {
                step: "negotiation",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("milter inet:127.0.0.1:{port}: no answer to negotiation within 0.5s")
    );
    silent.abort();
}
