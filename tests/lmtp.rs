//! Delivery into Dovecot over LMTP (`delivery = "lmtp:…"`) with the real binary and a real,
//! private Dovecot (Debian's dovecot-lmtpd, started by the test; the harness is the LMTP
//! crate's): mail lands in Dovecot's mailbox, Sieve files it, an unknown user is refused at
//! RCPT (verified live against Dovecot: no backscatter), an over-quota user bounces, and a
//! Dovecot that is down defers delivery and refuses unverifiable recipients for now.

#[path = "../crates/lmtp/tests/common/mod.rs"]
mod dovecot;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dovecot::{Dovecot, Options};
use estafeta_e2e::{Client, Process, free_port, test_config};

fn wait(what: &str, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not seen\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn rcpt_replies(addr: SocketAddr, to: &[&str], message: Option<&str>) -> (Vec<String>, String) {
    let mut c = Client::connect(addr);
    c.set_timeout(Duration::from_secs(60));
    c.reply();
    c.cmd("EHLO client.example");
    c.cmd("MAIL FROM:<sender@example.test>");
    let rcpts: Vec<String> = to
        .iter()
        .map(|t| c.cmd(&format!("RCPT TO:<{t}>")))
        .collect();
    let mut end = String::new();
    if let Some(m) = message {
        let r = c.cmd("DATA");
        assert!(r.starts_with("354"), "{r}");
        c.write(m.as_bytes());
        c.write(b".\r\n");
        end = c.last();
    }
    c.cmd("QUIT");
    (rcpts, end)
}

#[test]
fn mail_for_an_lmtp_domain_is_delivered_by_dovecot() {
    let Some(mut dovecot) = Dovecot::start(Options::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let extra = format!(
        "[[domain]]\nname = \"example.org\"\nmailboxes = \"*\"\ndelivery = \"lmtp:{}\"\n",
        dovecot.unix_address()
    );
    let config = dir.path().join("c.toml");
    std::fs::write(&config, test_config(&dir.path().join("data"), port, &extra)).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Process::serve(&config, addr, &dir.path().join("log"));

    // An unknown user is refused now, not bounced later.
    let (rcpts, _) = rcpt_replies(addr, &["nobody@example.org"], None);
    assert_eq!(
        rcpts[0],
        "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"
    );

    // alice gets it in her Maildir; bob's Sieve script files "[list]" mail into Lists.
    let (rcpts, end) = rcpt_replies(
        addr,
        &["alice@example.org", "bob@example.org"],
        Some("Subject: [list] news\r\n\r\nhello from estafeta\r\n"),
    );
    assert!(rcpts.iter().all(|r| r.starts_with("250")), "{rcpts:?}");
    assert!(end.starts_with("250 "), "{end}");
    wait(
        "alice's message in Dovecot's Maildir",
        || !dovecot.maildir_new("alice", "").is_empty(),
        || format!("{}\n{}", server.log_text(), dovecot.logs()),
    );
    let alice = &dovecot.maildir_new("alice", "")[0];
    assert!(alice.contains("hello from estafeta"), "{alice}");
    assert!(
        alice.contains("Return-Path: <sender@example.test>"),
        "{alice}"
    );
    wait(
        "bob's message filed by Sieve",
        || !dovecot.maildir_new("bob", ".Lists").is_empty(),
        || format!("{}\n{}", server.log_text(), dovecot.logs()),
    );
    wait(
        "the delivered events",
        || server.log_text().matches("lmtp unix:").count() >= 2,
        || server.log_text(),
    );

    // carol is over quota: Dovecot's 552 5.2.2 bounces the message.
    let (_, end) = rcpt_replies(
        addr,
        &["carol@example.org"],
        Some(&format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(4000))),
    );
    assert!(end.starts_with("250 "), "{end}");
    wait(
        "the over-quota bounce",
        || server.log_text().contains("552 5.2.2"),
        || format!("{}\n{}", server.log_text(), dovecot.logs()),
    );

    // Dovecot down: alice (verified a moment ago, cached) is accepted and her mail waits in
    // the queue; a recipient that cannot be verified now is refused for now.
    dovecot.stop();
    let (rcpts, end) = rcpt_replies(
        addr,
        &["alice@example.org", "dave@example.org"],
        Some("Subject: later\r\n\r\nlater\r\n"),
    );
    assert!(rcpts[0].starts_with("250"), "{rcpts:?}");
    assert!(
        rcpts[1].starts_with(
            "450 4.1.1 <dave@example.org>: Recipient address rejected: unverified address"
        ),
        "{rcpts:?}"
    );
    assert!(end.starts_with("250 "), "{end}");
    wait(
        "the deferral",
        || server.log_text().contains("451 4.4.1"),
        || server.log_text(),
    );
}
