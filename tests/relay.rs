//! Relaying end to end: two real estafeta instances, the second on 127.0.0.2 as the remote
//! peer, connected by `[relay.routes]` (no DNS needed here).

use std::path::Path;
use std::time::Duration;

use estafeta_e2e::{Process, free_port, maildir_new, submit};

fn write(dir: &Path, name: &str, text: String) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn relayed_over_starttls_bounced_and_deferred() {
    let dir = tempfile::tempdir().unwrap();
    let (a_port, b_port, dead_port) = (free_port(), free_port(), free_port());
    // B: the remote peer, on another loopback address.
    let b_cfg = write(
        dir.path(),
        "b.toml",
        format!(
            r#"hostname = "mx.remote.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.2:{b_port}"
[relay]
mynetworks = []
[[domain]]
name = "remote.test"
mailboxes = "*"
[[domain]]
name = "strict.test"
mailboxes = ["only"]
[[domain]]
name = "verified.test"
mailboxes = "*"
"#,
            d = dir.path().join("b").display()
        ),
    );
    // A: the sender's server; routes remote.test, strict.test and verified.test to B,
    // dead.test nowhere. remote.test requires TLS; verified.test requires a certificate that
    // B's self-signed one is not.
    let a_cfg = write(
        dir.path(),
        "a.toml",
        format!(
            r#"hostname = "mx.local.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{a_port}"
[relay]
mynetworks = ["127.0.0.1/32"]
[relay.routes]
"remote.test" = "[127.0.0.2]:{b_port}"
"strict.test" = "[127.0.0.2]:{b_port}"
"dead.test" = "[127.0.0.1]:{dead_port}"
"verified.test" = "[127.0.0.2]:{b_port}"
[relay.tls_policy]
"remote.test" = "required"
"Verified.Test" = "verify"
[[domain]]
name = "local.test"
mailboxes = "*"
[queue]
retry = ["1s"]
"#,
            d = dir.path().join("a").display()
        ),
    );
    let b = Process::serve(
        &b_cfg,
        format!("127.0.0.2:{b_port}").parse().unwrap(),
        &dir.path().join("b.log"),
    );
    let a = Process::serve(
        &a_cfg,
        format!("127.0.0.1:{a_port}").parse().unwrap(),
        &dir.path().join("a.log"),
    );
    let send = |to: &[&str], subject: &str| {
        submit(
            a.addr,
            "alice@local.test",
            to,
            format!("Subject: {subject}\r\n\r\n..leading dot\r\nbody\r\n").as_bytes(),
        )
    };
    send(&["bob@remote.test", "nobody@strict.test"], "relay me");
    // bob@remote.test arrives at B, through STARTTLS (B's self-signed certificate).
    let msgs = maildir_new(
        &dir.path().join("b"),
        "remote.test",
        "bob",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(msgs.len(), 1, "A:\n{}\nB:\n{}", a.log_text(), b.log_text());
    let m = String::from_utf8_lossy(&msgs[0]).into_owned();
    assert!(
        m.contains("by mx.remote.test (estafeta) with ESMTPS"),
        "{m}"
    );
    assert!(m.contains("by mx.local.test (estafeta) with ESMTP"), "{m}");
    assert!(m.contains("\r\n.leading dot\r\nbody\r\n"), "{m}");
    // The TLS status line: the policy asked for, where it came from, what the session got.
    // (B keeps the message before it answers 250; A logs after that.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !a.log_text().contains("TLS status") {
        assert!(std::time::Instant::now() < deadline, "A:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = a.log_text();
    let status = log
        .lines()
        .find(|l| l.contains("TLS status") && l.contains("domain=remote.test"))
        .unwrap_or_else(|| panic!("A:\n{log}"));
    for field in [
        "tls_policy=\"required\"",
        "tls_policy_from=\"relay.tls_policy\"",
        "tls=\"TLSv1.3\"",
        "tls_verified=false",
        "tls_fallback=false",
    ] {
        assert!(status.contains(field), "{field}: {status}");
    }
    // nobody@strict.test was refused by B (550 5.1.1): alice gets a bounce.
    let bounces = maildir_new(
        &dir.path().join("a"),
        "local.test",
        "alice",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(bounces.len(), 1, "A:\n{}", a.log_text());
    let bounce = String::from_utf8_lossy(&bounces[0]).into_owned();
    assert!(bounce.contains("Return-Path: <>"), "{bounce}");
    assert!(bounce.contains("report-type=delivery-status"), "{bounce}");
    assert!(
        bounce.contains("Final-Recipient: rfc822; nobody@strict.test"),
        "{bounce}"
    );
    assert!(bounce.contains("Status: 5.1.1"), "{bounce}");
    assert!(bounce.contains("Remote-MTA: dns; 127.0.0.2"), "{bounce}");
    // verified.test: B's self-signed certificate fails verification; the message waits.
    send(&["dave@verified.test"], "verify me");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !a
        .log_text()
        .contains("to=dave@verified.test status=\"deferred\"")
    {
        assert!(std::time::Instant::now() < deadline, "A:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = a.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("to=dave@verified.test status=\"deferred\""))
        .unwrap();
    assert!(
        line.contains("4.7.") && line.to_lowercase().contains("certificate"),
        "{line}"
    );
    assert!(
        !b.log_text().contains("dave@verified.test"),
        "{}",
        b.log_text()
    );
    // dead.test: nothing listens; the message stays queued and is retried.
    send(&["carol@dead.test"], "nowhere");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a
        .log_text()
        .matches("to=carol@dead.test status=\"deferred\"")
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "A:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let queued = std::fs::read_dir(dir.path().join("a/queue"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().len() == 12)
        .count();
    assert_eq!(queued, 2, "carol's and dave's");
}

/// ETRN through Python's smtplib, from `source`: the reply code and text.
fn etrn(port: u16, source: &str, domain: &str) -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import smtplib,sys\n\
             s=smtplib.SMTP('127.0.0.1',int(sys.argv[1]),source_address=(sys.argv[2],0),timeout=10)\n\
             s.ehlo('client.test')\n\
             assert s.has_extn('etrn'), s.esmtp_features\n\
             c,t=s.docmd('ETRN',sys.argv[3])\n\
             print(c,t.decode())\n\
             s.quit()",
            &port.to_string(),
            source,
            domain,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn etrn_from_a_trusted_client_delivers_deferred_mail_at_once() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        estafeta_e2e::skip("python3 not found: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a_port, b_port) = (free_port(), free_port());
    let a_cfg = write(
        dir.path(),
        "a.toml",
        format!(
            r#"hostname = "mx.local.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{a_port}"
[relay]
mynetworks = ["127.0.0.1/32"]
[relay.routes]
"later.test" = "[127.0.0.2]:{b_port}"
[[domain]]
name = "local.test"
mailboxes = "*"
[queue]
retry = ["1h"]
"#,
            d = dir.path().join("a").display()
        ),
    );
    let a = Process::serve(
        &a_cfg,
        format!("127.0.0.1:{a_port}").parse().unwrap(),
        &dir.path().join("a.log"),
    );
    submit(
        a.addr,
        "alice@local.test",
        &["dave@later.test"],
        b"Subject: come back later\r\n\r\nhello\r\n",
    );
    // The first attempt fails (nothing listens yet); the next one would be in an hour.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !a
        .log_text()
        .contains("to=dave@later.test status=\"deferred\"")
    {
        assert!(std::time::Instant::now() < deadline, "A:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The remote site comes up.
    let b_cfg = write(
        dir.path(),
        "b.toml",
        format!(
            r#"hostname = "mx.later.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.2:{b_port}"
[relay]
mynetworks = []
[[domain]]
name = "later.test"
mailboxes = "*"
"#,
            d = dir.path().join("b").display()
        ),
    );
    let b = Process::serve(
        &b_cfg,
        format!("127.0.0.2:{b_port}").parse().unwrap(),
        &dir.path().join("b.log"),
    );
    // A client outside mynetworks may not start the queue.
    assert_eq!(
        etrn(a_port, "127.0.0.2", "later.test"),
        "459 4.7.1 Node later.test not allowed: ETRN is for trusted clients only"
    );
    assert_eq!(
        etrn(a_port, "127.0.0.1", "nothing.test"),
        "251 2.0.0 OK, no messages waiting for node nothing.test"
    );
    assert_eq!(
        etrn(a_port, "127.0.0.1", "Later.Test"),
        "253 2.0.0 OK, 1 pending messages for node later.test started"
    );
    let msgs = maildir_new(
        &dir.path().join("b"),
        "later.test",
        "dave",
        1,
        Duration::from_secs(10),
    );
    assert_eq!(msgs.len(), 1, "A:\n{}\nB:\n{}", a.log_text(), b.log_text());
}

#[test]
fn smarthost_with_starttls_and_auth_and_a_route_that_goes_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a_port, b_smtp, b_sub) = (free_port(), free_port(), free_port());
    // B: the provider's server: submission (STARTTLS + AUTH required) and plain SMTP.
    let b_cfg = write(
        dir.path(),
        "b.toml",
        format!(
            r#"hostname = "smtp.provider.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.2:{b_smtp}"
[[listener]]
kind = "submission"
address = "127.0.0.2:{b_sub}"
sender_check = false
[relay]
mynetworks = []
[[domain]]
name = "far.test"
mailboxes = "*"
[[domain]]
name = "direct.test"
mailboxes = "*"
"#,
            d = dir.path().join("b").display()
        ),
    );
    let mut add = std::process::Command::new(estafeta_e2e::estafeta_bin())
        .args([
            "user",
            "add",
            "customer@provider.test",
            "--password-stdin",
            "--config",
        ])
        .arg(&b_cfg)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        writeln!(add.stdin.take().unwrap(), "s3cret pass:word").unwrap();
    }
    assert!(add.wait().unwrap().success());
    let secret = dir.path().join("smarthost.secret");
    std::fs::write(&secret, "customer@provider.test:s3cret pass:word\n").unwrap();
    let a_cfg = write(
        dir.path(),
        "a.toml",
        format!(
            r#"hostname = "home.local.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{a_port}"
[relay]
mynetworks = ["127.0.0.1/32"]
smarthost = "127.0.0.2:{b_sub}"
smarthost_tls = "required"
smarthost_credentials = "{secret}"
[relay.routes]
"direct.test" = "[127.0.0.2]:{b_smtp}"
[[domain]]
name = "local.test"
mailboxes = "*"
[queue]
retry = ["1s"]
"#,
            d = dir.path().join("a").display(),
            secret = secret.display()
        ),
    );
    let b = Process::serve(
        &b_cfg,
        format!("127.0.0.2:{b_smtp}").parse().unwrap(),
        &dir.path().join("b.log"),
    );
    let a = Process::serve(
        &a_cfg,
        format!("127.0.0.1:{a_port}").parse().unwrap(),
        &dir.path().join("a.log"),
    );
    submit(
        a.addr,
        "alice@local.test",
        &["erin@far.test", "dan@direct.test"],
        b"Subject: via the provider\r\n\r\nhello\r\n",
    );
    let far = maildir_new(
        &dir.path().join("b"),
        "far.test",
        "erin",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(far.len(), 1, "A:\n{}\nB:\n{}", a.log_text(), b.log_text());
    let m = String::from_utf8_lossy(&far[0]).into_owned();
    // Submitted with STARTTLS and AUTH.
    assert!(m.contains("with ESMTPSA"), "{m}");
    assert!(
        b.log_text().contains(
            "authenticated client=127.0.0.1 user=customer@provider.test mechanism=\"PLAIN\""
        ),
        "{}",
        b.log_text()
    );
    // The route wins over the smarthost: plain SMTP to B's port 25 stand-in, no AUTH.
    let direct = maildir_new(
        &dir.path().join("b"),
        "direct.test",
        "dan",
        1,
        Duration::from_secs(15),
    );
    let m = String::from_utf8_lossy(&direct[0]).into_owned();
    assert!(m.contains("with ESMTPS "), "{m}");
}

/// RFC 8689 between two estafeta instances: Python's smtplib sends to A with
/// `MAIL FROM … REQUIRETLS` (refused in plaintext, offered and accepted over TLS); A relays to
/// B through a route under TLS policy `verify` (B's certificate, for its address, trusted by
/// `[relay] ca_file`), B offers REQUIRETLS and gets it. A route without `verify` cannot carry
/// such a message: it bounces at once (5.7.30), the report holding the headers only.
#[test]
fn requiretls_end_to_end_and_refused_without_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a_port, b_port) = (free_port(), free_port());
    let (cert, key) = estafeta_e2e::self_signed(d, "b", &["127.0.0.2"]);
    let b_cfg = write(
        d,
        "b.toml",
        format!(
            r#"hostname = "mx.secure.test"
data_dir = "{data}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.2:{b_port}"
[tls]
certificate = "{cert}"
private_key = "{key}"
[relay]
mynetworks = []
[[domain]]
name = "secure.test"
mailboxes = "*"
[[domain]]
name = "loose.test"
mailboxes = "*"
"#,
            data = d.join("b").display(),
            cert = cert,
            key = key,
        ),
    );
    let a_cfg = write(
        d,
        "a.toml",
        format!(
            r#"hostname = "mx.local.test"
data_dir = "{data}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{a_port}"
[relay]
mynetworks = ["127.0.0.1/32"]
ca_file = "{cert}"
[relay.routes]
"secure.test" = "[127.0.0.2]:{b_port}"
"loose.test" = "[127.0.0.2]:{b_port}"
[relay.tls_policy]
"secure.test" = "verify"
[[domain]]
name = "local.test"
mailboxes = "*"
[queue]
retry = ["1s"]
"#,
            data = d.join("a").display(),
            cert = cert,
        ),
    );
    let b = Process::serve(
        &b_cfg,
        format!("127.0.0.2:{b_port}").parse().unwrap(),
        &d.join("b.log"),
    );
    let a = Process::serve(
        &a_cfg,
        format!("127.0.0.1:{a_port}").parse().unwrap(),
        &d.join("a.log"),
    );
    let logs = || format!("A:\n{}\nB:\n{}", a.log_text(), b.log_text());
    let send = |rcpt: &str, subject: &str| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/requiretls.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .args([
                "127.0.0.1",
                &a_port.to_string(),
                "alice@local.test",
                rcpt,
                subject,
            ])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            logs()
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = send("bob@secure.test", "over verified TLS");
    assert!(out.contains("\"plain_offers\": false"), "{out}");
    assert!(
        out.contains("\"plain_mail\": \"530 5.7.10 REQUIRETLS needs a TLS session"),
        "{out}"
    );
    assert!(out.contains("\"tls_offers\": true"), "{out}");
    assert!(out.contains("\"refused\": {}"), "{out}");
    let got = maildir_new(
        &d.join("b"),
        "secure.test",
        "bob",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(got.len(), 1, "{}", logs());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !a.log_text().contains("TLS status") {
        assert!(std::time::Instant::now() < deadline, "{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = a.log_text();
    let status = log
        .lines()
        .find(|l| l.contains("TLS status") && l.contains("domain=secure.test"))
        .unwrap_or_else(|| panic!("{}", logs()));
    for field in [
        "tls_policy=\"verify\"",
        "tls_verified=true",
        "requiretls=true",
    ] {
        assert!(status.contains(field), "{field}: {status}");
    }

    // loose.test: its route is not under `verify`: bounced at once, headers only.
    let out = send("carol@loose.test", "not over a verified route");
    assert!(out.contains("\"refused\": {}"), "{out}");
    let bounces = maildir_new(
        &d.join("a"),
        "local.test",
        "alice",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(bounces.len(), 1, "{}", logs());
    let bounce = String::from_utf8_lossy(&bounces[0]).into_owned();
    assert!(bounce.contains("Status: 5.7.30"), "{bounce}");
    assert!(bounce.contains("REQUIRETLS support required"), "{bounce}");
    assert!(
        bounce.contains("Subject: not over a verified route"),
        "{bounce}"
    );
    assert!(
        !bounce.contains("confidential"),
        "the body is not returned: {bounce}"
    );
    assert!(!b.log_text().contains("carol@loose.test"), "{}", logs());
}
