//! The LMTP client against a real Dovecot LMTP server (Debian: dovecot-core, dovecot-lmtpd,
//! dovecot-sieve). Each test starts its own private Dovecot (see `common`); a test that
//! cannot prints "skipped: …", or panics when ESTAFETA_NO_SKIP is set.

mod common;

use std::time::Duration;

use common::{Dovecot, Options};
use estafeta_lmtp::{Lmtp, Timeouts, Verification};
use estafeta_proto::{Body, MailParams, RcptParams, Status};
use estafeta_queue::Outcome;

fn client(address: &str) -> Lmtp {
    Lmtp::new(
        address.parse().unwrap(),
        "mx.estafeta.test".into(),
        Timeouts::all(Duration::from_secs(20)),
    )
}

fn rcpts(addrs: &[&str]) -> Vec<(String, RcptParams)> {
    addrs
        .iter()
        .map(|a| (a.to_string(), RcptParams::default()))
        .collect()
}

fn message(subject: &str, body_lines: usize) -> Vec<u8> {
    let mut m = format!(
        "From: sender@remote.test\r\nTo: someone@example.org\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@remote.test>\r\n\r\n"
    );
    for i in 0..body_lines {
        m.push_str(&format!("line {i} of the body\r\n"));
    }
    // A line that must be dot-stuffed on the wire and unstuffed in the mailbox.
    m.push_str(".a line starting with a dot\r\n");
    m.into_bytes()
}

fn params() -> MailParams {
    MailParams {
        body: Some(Body::EightBitMime),
        ..MailParams::default()
    }
}

#[tokio::test]
async fn delivers_into_the_maildir_over_unix_and_inet() {
    let Some(dovecot) = Dovecot::start(Options::default()) else {
        return;
    };
    for (n, address) in [dovecot.unix_address(), dovecot.inet_address()]
        .iter()
        .enumerate()
    {
        let lmtp = client(address);
        let out = lmtp
            .deliver(
                "sender@remote.test",
                &params(),
                &rcpts(&["alice@example.org"]),
                &message(&format!("hello{n}"), 3),
            )
            .await;
        assert_eq!(out.len(), 1);
        let Outcome::Delivered(text) = &out[0] else {
            panic!("{address}: {out:?}\n{}", dovecot.logs());
        };
        assert!(
            text.starts_with(&format!(
                "lmtp {address} said: 250 2.0.0 <alice@example.org>"
            )),
            "{text}"
        );
        lmtp.close_idle().await;
    }
    let mails = dovecot.maildir_new("alice", "");
    assert_eq!(mails.len(), 2, "{}", dovecot.logs());
    for (n, mail) in ["hello0", "hello1"].iter().enumerate() {
        let mail = mails
            .iter()
            .find(|m| {
                m.contains(&format!("Subject: {mail}\r\n"))
                    || m.contains(&format!("Subject: {mail}\n"))
            })
            .unwrap_or_else(|| panic!("message {n} not found in {mails:?}"));
        // Dovecot adds the envelope: Return-Path first, Delivered-To (one recipient).
        assert!(
            mail.starts_with("Return-Path: <sender@remote.test>"),
            "{mail}"
        );
        assert!(mail.contains("Delivered-To: alice@example.org"), "{mail}");
        assert!(mail.contains("by "), "Received by Dovecot: {mail}");
        assert!(mail.contains("line 2 of the body"), "{mail}");
        // Unstuffed: one dot.
        assert!(mail.contains("\n.a line starting with a dot"), "{mail}");
        assert!(!mail.contains("..a line"), "{mail}");
    }
}

#[tokio::test]
async fn one_reply_per_recipient_unknown_user_refused() {
    let Some(dovecot) = Dovecot::start(Options::default()) else {
        return;
    };
    let lmtp = client(&dovecot.unix_address());
    let out = lmtp
        .deliver(
            "sender@remote.test",
            &params(),
            &rcpts(&["alice@example.org", "nobody@example.org", "bob@example.org"]),
            &message("three", 2),
        )
        .await;
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(
        matches!(&out[0], Outcome::Delivered(t) if t.contains("<alice@example.org>")),
        "{out:?}"
    );
    assert!(
        matches!(&out[2], Outcome::Delivered(t) if t.contains("<bob@example.org>")),
        "{out:?}"
    );
    let Outcome::PermFail(f) = &out[1] else {
        panic!("{out:?}")
    };
    assert_eq!(f.reply.code, 550);
    assert_eq!(f.reply.status, Some(Status::new(5, 1, 1)));
    assert_eq!(f.remote.as_deref(), Some(dovecot.unix_address().as_str()));
    assert_eq!(f.command.as_deref(), Some("RCPT TO:<nobody@example.org>"));
    assert_eq!(dovecot.maildir_new("alice", "").len(), 1);
    assert_eq!(dovecot.maildir_new("bob", "").len(), 1);
    lmtp.close_idle().await;
}

/// Dovecot answers a full mailbox after the data with `552 5.2.2 <carol@…> Quota exceeded
/// (mailbox for user is full)` (permanent), or with `452 4.2.2` when `quota_full_tempfail =
/// yes`.
#[tokio::test]
async fn over_quota_is_the_recipients_own_reply() {
    for tempfail in [false, true] {
        let Some(dovecot) = Dovecot::start(Options {
            quota_full_tempfail: tempfail,
        }) else {
            return;
        };
        let lmtp = client(&dovecot.unix_address());
        let out = lmtp
            .deliver(
                "sender@remote.test",
                &params(),
                &rcpts(&["carol@example.org", "alice@example.org"]),
                &message("big", 200),
            )
            .await;
        assert!(matches!(out[1], Outcome::Delivered(_)), "{out:?}");
        let f = match (&out[0], tempfail) {
            (Outcome::PermFail(f), false) => {
                assert_eq!(
                    (f.reply.code, f.reply.status),
                    (552, Some(Status::new(5, 2, 2)))
                );
                f
            }
            (Outcome::TempFail(f), true) => {
                assert_eq!(
                    (f.reply.code, f.reply.status),
                    (452, Some(Status::new(4, 2, 2)))
                );
                f
            }
            _ => panic!("quota_full_tempfail={tempfail}: {out:?}"),
        };
        assert!(f.reply.text().contains("Quota exceeded"), "{f}");
        assert_eq!(f.command.as_deref(), Some("end of data"));
        assert!(dovecot.maildir_new("carol", "").is_empty());
        lmtp.close_idle().await;
    }
}

#[tokio::test]
async fn sieve_files_list_mail_into_a_folder() {
    let Some(dovecot) = Dovecot::start(Options::default()) else {
        return;
    };
    let lmtp = client(&dovecot.inet_address());
    let out = lmtp
        .deliver(
            "list-bounces@lists.test",
            &params(),
            &rcpts(&["bob@example.org"]),
            &message("[list] weekly digest", 2),
        )
        .await;
    assert!(matches!(out[0], Outcome::Delivered(_)), "{out:?}");
    let out = lmtp
        .deliver(
            "friend@remote.test",
            &params(),
            &rcpts(&["bob@example.org"]),
            &message("lunch", 2),
        )
        .await;
    assert!(matches!(out[0], Outcome::Delivered(_)), "{out:?}");
    // Maildir++: the folder Lists is the directory .Lists.
    let lists = dovecot.maildir_new("bob", ".Lists");
    assert_eq!(lists.len(), 1, "{}", dovecot.logs());
    assert!(lists[0].contains("Subject: [list] weekly digest"));
    let inbox = dovecot.maildir_new("bob", "");
    assert_eq!(inbox.len(), 1);
    assert!(inbox[0].contains("Subject: lunch"));
    lmtp.close_idle().await;
}

#[tokio::test]
async fn verify_knows_users() {
    let Some(dovecot) = Dovecot::start(Options::default()) else {
        return;
    };
    let lmtp = client(&dovecot.unix_address());
    assert_eq!(lmtp.verify("alice@example.org").await, Verification::Exists);
    assert_eq!(lmtp.verify("carol@example.org").await, Verification::Exists);
    let Verification::Unknown(reply) = lmtp.verify("nobody@example.org").await else {
        panic!("nobody exists?")
    };
    assert_eq!(
        (reply.code, reply.status),
        (550, Some(Status::new(5, 1, 1)))
    );
    assert!(reply.text().contains("nobody@example.org"), "{reply}");
    // The probe left nothing behind, and the session delivers afterwards.
    let out = lmtp
        .deliver(
            "s@remote.test",
            &params(),
            &rcpts(&["alice@example.org"]),
            &message("after", 1),
        )
        .await;
    assert!(matches!(out[0], Outcome::Delivered(_)), "{out:?}");
    assert_eq!(dovecot.maildir_new("alice", "").len(), 1);
    // One connection for all of it.
    assert_eq!(
        dovecot.wait_log_count("Connect from", 1),
        1,
        "{}",
        dovecot.logs()
    );
    lmtp.close_idle().await;
}

#[tokio::test]
async fn pooled_session_is_reused_and_replaced_when_the_server_closed_it() {
    let Some(mut dovecot) = Dovecot::start(Options::default()) else {
        return;
    };
    let lmtp = client(&dovecot.unix_address());
    for n in 0..3 {
        let out = lmtp
            .deliver(
                "s@remote.test",
                &params(),
                &rcpts(&["alice@example.org"]),
                &message(&format!("m{n}"), 1),
            )
            .await;
        assert!(matches!(out[0], Outcome::Delivered(_)), "{out:?}");
    }
    assert_eq!(
        dovecot.wait_log_count("Connect from", 1),
        1,
        "{}",
        dovecot.logs()
    );
    assert_eq!(
        dovecot.logs().matches("Connect from").count(),
        1,
        "{}",
        dovecot.logs()
    );

    // Dovecot restarts: the idle session is closed under the client's feet. The next
    // delivery notices at RSET, opens a new session and delivers.
    dovecot.stop();
    dovecot.run();
    let out = lmtp
        .deliver(
            "s@remote.test",
            &params(),
            &rcpts(&["alice@example.org"]),
            &message("after-restart", 1),
        )
        .await;
    assert!(
        matches!(out[0], Outcome::Delivered(_)),
        "{out:?}\n{}",
        dovecot.logs()
    );
    assert_eq!(
        dovecot.wait_log_count("Connect from", 2),
        2,
        "{}",
        dovecot.logs()
    );
    assert_eq!(dovecot.maildir_new("alice", "").len(), 4);
    lmtp.close_idle().await;
}

#[tokio::test]
async fn concurrent_deliveries_share_the_client() {
    let Some(dovecot) = Dovecot::start(Options::default()) else {
        return;
    };
    let lmtp = std::sync::Arc::new(client(&dovecot.inet_address()));
    let mut tasks = Vec::new();
    for n in 0..8 {
        let lmtp = lmtp.clone();
        tasks.push(tokio::spawn(async move {
            lmtp.deliver(
                "s@remote.test",
                &params(),
                &rcpts(&["alice@example.org", "bob@example.org"]),
                &message(&format!("c{n}"), 1),
            )
            .await
        }));
    }
    for t in tasks {
        let out = t.await.unwrap();
        assert!(
            out.iter().all(|o| matches!(o, Outcome::Delivered(_))),
            "{out:?}"
        );
    }
    assert_eq!(dovecot.maildir_new("alice", "").len(), 8);
    assert_eq!(dovecot.maildir_new("bob", "").len(), 8);
    lmtp.close_idle().await;
}

#[tokio::test]
async fn stopped_server_fails_every_recipient_temporarily() {
    let Some(mut dovecot) = Dovecot::start(Options::default()) else {
        return;
    };
    dovecot.stop();
    for address in [dovecot.unix_address(), dovecot.inet_address()] {
        let lmtp = client(&address);
        let out = lmtp
            .deliver(
                "s@remote.test",
                &params(),
                &rcpts(&["alice@example.org", "bob@example.org"]),
                &message("lost", 1),
            )
            .await;
        assert_eq!(out.len(), 2);
        for o in &out {
            let Outcome::TempFail(f) = o else {
                panic!("{address}: {o:?}")
            };
            assert_eq!(
                (f.reply.code, f.reply.status),
                (451, Some(Status::new(4, 4, 1)))
            );
            assert!(
                f.reply.text().contains(&format!("LMTP server {address}")),
                "{f}"
            );
        }
        let Verification::Unavailable(reply) = lmtp.verify("alice@example.org").await else {
            panic!("verify of a stopped server")
        };
        assert_eq!(reply.code, 451);
    }
}
