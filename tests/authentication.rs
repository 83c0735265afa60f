//! Email authentication end to end, with the real binary, the test DNS server (dns.rs) and
//! independent verifiers:
//! - our DKIM signatures (ed25519 and rsa, keys made by `estafeta dkim generate`) verified by
//!   dkimpy and by OpenDKIM's `opendkim-testmsg`; a message signed by dkimpy verified by us;
//! - SPF pass / fail / softfail / neutral / none / permerror / temperror in
//!   `Authentication-Results:`; `spf = "reject"` at RCPT;
//! - DMARC `p=reject` refused with 550 5.7.1, `p=quarantine` marked, a DNS failure answered
//!   451 (no bounce); a forged `Authentication-Results:` removed;
//! - SRS through two servers; `dns-records --check`; `explain --message`.
//!
//! dkimpy runs under Debian's python3 (python3-dkim) or any python3 with dkimpy; OpenDKIM
//! needs root (its resolver reads /etc/resolv.conf: the test bind-mounts its own in a private
//! mount namespace). Missing tools skip with a note (fail under ESTAFETA_NO_SKIP).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use estafeta_e2e::dns::{DnsServer, Zones};
use estafeta_e2e::{Client, Process, estafeta_bin, free_port, maildir_new, test_config};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `estafeta dkim generate`; returns the TXT record text it printed (the strings joined).
fn generate(config: &Path, domain: &str, selector: &str, algorithm: &str, out: &Path) -> String {
    let o = Command::new(estafeta_bin())
        .args([
            "dkim",
            "generate",
            domain,
            "--selector",
            selector,
            "--algorithm",
            algorithm,
        ])
        .arg("--output")
        .arg(out)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{selector}._domainkey.{domain}. ")))
        .unwrap_or_else(|| panic!("no TXT record printed: {stdout}"));
    txt_of(line)
}

/// The text of a zone-file TXT line: its quoted strings, joined.
fn txt_of(line: &str) -> String {
    let data = line.split_once(" TXT ").unwrap().1;
    data.split('"').skip(1).step_by(2).collect()
}

/// A python3 that has dkimpy: Debian's (python3-dkim), else the one on PATH.
fn python_with_dkim() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import dkim, dns.message"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py/dkim_check.py")
}

/// The `[dns]` table pointing at the test DNS server.
fn dns_table(dns: &DnsServer) -> String {
    format!("[dns]\nnameservers = [\"{}\"]\n", dns.addr)
}

/// Sends one message; returns the reply to the end of data (or the first refusal).
fn send(addr: SocketAddr, helo: &str, from: &str, to: &str, content: &str) -> String {
    let mut c = Client::connect(addr);
    // Checks that wait for a DNS server that does not answer take their time (an SMTP client
    // waits 10 minutes for the reply to the end of data, RFC 5321 §4.5.3.2.6).
    c.set_timeout(Duration::from_secs(120));
    c.reply();
    c.cmd(&format!("EHLO {helo}"));
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    if !r.starts_with("250") {
        return r;
    }
    let r = c.cmd(&format!("RCPT TO:<{to}>"));
    if !r.starts_with("250") {
        return r;
    }
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "DATA: {r}");
    c.write(content.as_bytes());
    c.write(b".\r\n");
    let r = c.last();
    c.cmd("QUIT");
    r
}

fn message(from: &str, subject: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\nDate: Wed, 2 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@client.test>\r\n\r\nHello.\r\n"
    )
}

/// The `Authentication-Results:` fields of a delivered message, unfolded.
fn auth_results(msg: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ");
    unfolded
        .lines()
        .filter(|l| {
            l.to_ascii_lowercase()
                .starts_with("authentication-results:")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn our_signatures_verify_with_dkimpy_and_opendkim() {
    let Some(python) = python_with_dkim() else {
        estafeta_e2e::skip("dkimpy is not installed (Debian python3-dkim)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let ed_key = dir.path().join("ed.key");
    let rsa_key = dir.path().join("rsa.key");
    // The keys first (the config names them), made by the command an operator runs.
    let bare = write(dir.path(), "bare.toml", &test_config(&data, port, ""));
    let ed_txt = generate(&bare, "signer.test", "ed", "ed25519", &ed_key);
    let rsa_txt = generate(&bare, "signer.test", "rsa", "rsa", &rsa_key);
    assert!(ed_txt.starts_with("v=DKIM1; k=ed25519; p="), "{ed_txt}");
    assert!(
        rsa_txt.starts_with("v=DKIM1; k=rsa; p=MIIBIjAN"),
        "{rsa_txt}"
    );
    let dns = DnsServer::start(
        Zones::new()
            .txt("ed._domainkey.signer.test", &ed_txt)
            .txt("rsa._domainkey.signer.test", &rsa_txt),
    );
    let extra = format!(
        "{}\n[[dkim]]\ndomain = \"signer.test\"\nselector = \"ed\"\nalgorithm = \"ed25519\"\nprivate_key = \"{}\"\n\n[[dkim]]\ndomain = \"signer.test\"\nselector = \"rsa\"\nalgorithm = \"rsa\"\nprivate_key = \"{}\"\n",
        dns_table(&dns),
        ed_key.display(),
        rsa_key.display()
    );
    let config = write(dir.path(), "c.toml", &test_config(&data, port, &extra));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Process::serve(&config, addr, &dir.path().join("log"));

    // From a mynetworks client (127.0.0.1): signed twice. Whitespace and an empty line at the
    // end test the relaxed body canonicalization.
    let r = send(
        addr,
        "client.test",
        "alice@signer.test",
        "bob@example.test",
        "From: Alice <alice@signer.test>\r\nTo: bob@example.test\r\nSubject: dinner\r\nDate: Wed, 2 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@signer.test>\r\n\r\nHello   there \r\n\r\n\r\n",
    );
    assert!(r.starts_with("250 "), "{r}");
    // From a local user through sendmail, without Date and Message-ID: both are added, and
    // signed.
    let mut child = Command::new(estafeta_bin())
        .args(["sendmail", "-t", "-i"])
        .env("ESTAFETA_CONFIG", &config)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        b"From: alice@signer.test\nTo: carol@example.test\nSubject: no date\n\nbody\n",
    )
    .unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());

    // A large message (3 MB: written to a file as it arrives, signed in two parts).
    let r = send(
        addr,
        "client.test",
        "alice@signer.test",
        "dave@example.test",
        &format!(
            "From: Alice <alice@signer.test>\r\nTo: dave@example.test\r\nSubject: large\r\nDate: Wed, 2 Dec 2026 12:00:00 +0000\r\nMessage-ID: <2@signer.test>\r\n\r\nHello\r\n{}",
            "One line of a large message, signed without being held whole.\r\n".repeat(50_000)
        ),
    );
    assert!(r.starts_with("250 "), "{r}");

    let bob = maildir_new(&data, "example.test", "bob", 1, Duration::from_secs(10));
    let carol = maildir_new(&data, "example.test", "carol", 1, Duration::from_secs(10));
    let dave = maildir_new(&data, "example.test", "dave", 1, Duration::from_secs(10));
    assert_eq!(
        (bob.len(), carol.len(), dave.len()),
        (1, 1, 1),
        "{}",
        server.log_text()
    );
    let carol_text = String::from_utf8_lossy(&carol[0]).into_owned();
    assert!(carol_text.contains("\r\nDate: "), "{carol_text}");
    assert!(carol_text.contains("\r\nMessage-ID: <"), "{carol_text}");
    for (name, msg) in [("bob", &bob[0]), ("carol", &carol[0]), ("dave", &dave[0])] {
        let text = String::from_utf8_lossy(msg);
        assert_eq!(text.matches("DKIM-Signature:").count(), 2, "{text}");
        assert!(
            text.contains("a=ed25519-sha256") && text.contains("a=rsa-sha256"),
            "{text}"
        );
        assert!(text.contains("c=relaxed/relaxed"), "{text}");
        let file = write(dir.path(), &format!("{name}.eml"), &text);
        let out = Command::new(python)
            .arg(script())
            .args(["verify", &dns.addr.port().to_string()])
            .arg(&file)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "dkimpy: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(said.matches(": pass").count(), 2, "{said}");
        // A changed body fails, so the check above can fail.
        let tampered = write(
            dir.path(),
            &format!("{name}-tampered.eml"),
            &text
                .replace("body\r\n", "Body\r\n")
                .replace("Hello", "Hallo"),
        );
        let out = Command::new(python)
            .arg(script())
            .args(["verify", &dns.addr.port().to_string()])
            .arg(&tampered)
            .output()
            .unwrap();
        assert!(!out.status.success(), "a tampered message verified");
    }

    // OpenDKIM: its resolver reads /etc/resolv.conf, port 53.
    if !Path::new("/usr/sbin/opendkim-testmsg").exists() {
        estafeta_e2e::skip("opendkim-testmsg is not installed (Debian opendkim-tools)");
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        estafeta_e2e::skip(
            "OpenDKIM's check needs root (a DNS server on port 53 and a private /etc/resolv.conf)",
        );
        return;
    }
    let dns53 = DnsServer::start_on(
        "127.0.0.153:53".parse().unwrap(),
        Zones::new()
            .txt("ed._domainkey.signer.test", &ed_txt)
            .txt("rsa._domainkey.signer.test", &rsa_txt),
    );
    let resolv = write(
        dir.path(),
        "resolv.conf",
        "nameserver 127.0.0.153\noptions edns0\n",
    );
    for (name, msg) in [("bob", &bob[0]), ("carol", &carol[0])] {
        // OpenDKIM verifies the first signature (the ed25519 one, which it does not know:
        // 2.11 has no ed25519) — so each signature is checked alone, rsa here.
        let text = String::from_utf8_lossy(msg).into_owned();
        let only_rsa = drop_signature(&text, "a=ed25519-sha256");
        let file = write(dir.path(), &format!("{name}-rsa.eml"), &only_rsa);
        let out = Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/resolv.conf && /usr/sbin/opendkim-testmsg < {}",
                resolv.display(),
                file.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "opendkim-testmsg {name}: {} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tampered = write(
            dir.path(),
            &format!("{name}-rsa-tampered.eml"),
            &only_rsa.replace("Subject: ", "Subject: X"),
        );
        let out = Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/resolv.conf && /usr/sbin/opendkim-testmsg < {}",
                resolv.display(),
                tampered.display()
            ))
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "OpenDKIM verified a tampered message"
        );
    }
    assert!(dns53.was_asked(
        "rsa._domainkey.signer.test",
        hickory_resolver::proto::rr::RecordType::TXT
    ));
}

/// `text` without the DKIM-Signature field containing `marker`.
fn drop_signature(text: &str, marker: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.split_inclusive("\r\n") {
        if line.starts_with("DKIM-Signature:") {
            skipping = line.contains(marker);
        } else if !line.starts_with([' ', '\t']) {
            skipping = false;
        }
        if skipping && (line.starts_with("DKIM-Signature:") || line.starts_with([' ', '\t'])) {
            // The marker may be on a continuation line: decide on the whole field.
            continue;
        }
        out.push_str(line);
    }
    out
}

/// An inbound server (mynetworks = [], so 127.0.0.1 is outside) asking `dns`.
fn inbound(dir: &Path, dns: &DnsServer, verify: &str) -> (Process, SocketAddr, PathBuf) {
    let port = free_port();
    let data = dir.join("data");
    let extra = format!(
        "[relay]\nmynetworks = []\n\n{}\n[verify]\n{verify}\n",
        dns_table(dns)
    );
    let config = write(dir, "c.toml", &test_config(&data, port, &extra));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    (
        Process::serve(&config, addr, &dir.join("log")),
        addr,
        config,
    )
}

#[test]
fn spf_results_are_marked_and_fail_is_refused_when_asked() {
    let dns = DnsServer::start(
        Zones::new()
            .txt("pass.test", "v=spf1 ip4:127.0.0.1 -all")
            .txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("softfail.test", "v=spf1 ~all")
            .txt("neutral.test", "v=spf1 ?all")
            .a("none.test", "192.0.2.1")
            // An include of a domain without SPF is a permerror (RFC 7208 §5.2).
            .txt("permerror.test", "v=spf1 include:none.test -all")
            .servfail("temperror.test"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (server, addr, _) = inbound(dir.path(), &dns, "spf = \"mark\"");
    let cases = [
        ("pass", "pass"),
        ("fail", "fail"),
        ("softfail", "softfail"),
        ("neutral", "neutral"),
        ("none", "none"),
        ("permerror", "permerror"),
        ("temperror", "temperror"),
    ];
    for (domain, _) in cases {
        // The author domain has no DMARC record (NXDOMAIN): only SPF decides what is shown.
        let r = send(
            addr,
            "client.test",
            &format!("x@{domain}.test"),
            "bob@example.test",
            &message("someone@nodmarc.test", domain),
        );
        assert!(
            r.starts_with("250 "),
            "{domain}: {r}\n{}",
            server.log_text()
        );
    }
    let data = dir.path().join("data");
    let got = maildir_new(
        &data,
        "example.test",
        "bob",
        cases.len(),
        Duration::from_secs(10),
    );
    assert_eq!(got.len(), cases.len(), "{}", server.log_text());
    for (domain, result) in cases {
        let msg = got
            .iter()
            .find(|m| String::from_utf8_lossy(m).contains(&format!("Subject: {domain}\r\n")))
            .unwrap_or_else(|| panic!("{domain} not delivered"));
        let ar = auth_results(msg);
        assert_eq!(ar.len(), 1, "{ar:?}");
        assert!(
            ar[0].starts_with("Authentication-Results: mx.test.example;"),
            "{ar:?}"
        );
        assert!(
            ar[0].contains(&format!("spf={result} ")),
            "{domain}: {ar:?}"
        );
        assert!(
            ar[0].contains(&format!("smtp.mailfrom=x@{domain}.test")),
            "{ar:?}"
        );
    }
    drop(server);

    // spf = "reject": a fail is refused at RCPT, a DNS error deferred, a pass accepted.
    let dir = tempfile::tempdir().unwrap();
    let (server, addr, _) = inbound(dir.path(), &dns, "spf = \"reject\"");
    let r = send(
        addr,
        "client.test",
        "x@fail.test",
        "bob@example.test",
        &message("x@fail.test", "f"),
    );
    assert!(r.starts_with("550 5.7.23 "), "{r}");
    let r = send(
        addr,
        "client.test",
        "x@temperror.test",
        "bob@example.test",
        &message("x@fail.test", "t"),
    );
    assert!(r.starts_with("451 4.7.24 "), "{r}");
    let r = send(
        addr,
        "client.test",
        "x@softfail.test",
        "bob@example.test",
        &message("x@nodmarc.test", "s"),
    );
    assert!(r.starts_with("250 "), "{r}");
    let r = send(
        addr,
        "client.test",
        "x@pass.test",
        "bob@example.test",
        &message("x@nodmarc.test", "p"),
    );
    assert!(r.starts_with("250 "), "{r}");
    let log = server.log_text();
    assert!(
        log.contains("reject RCPT") && log.contains("5.7.23"),
        "{log}"
    );
}

#[test]
fn dmarc_reject_quarantine_dkimpy_signatures_and_dns_failures() {
    let Some(python) = python_with_dkim() else {
        estafeta_e2e::skip("dkimpy is not installed (Debian python3-dkim)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A key for dkimpy to sign with, made by our own command; dkimpy reads PKCS#1 PEM.
    let key = dir.path().join("dkimpy.key");
    let bare = write(
        dir.path(),
        "bare.toml",
        &test_config(&dir.path().join("x"), 1, ""),
    );
    let txt = generate(&bare, "signed.test", "py", "rsa", &key);
    let dns = DnsServer::start(
        Zones::new()
            .txt("reject.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.reject.test", "v=DMARC1; p=reject")
            .txt("quarantine.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine")
            .txt("signed.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.signed.test", "v=DMARC1; p=reject")
            .txt("py._domainkey.signed.test", &txt)
            .txt("football.example.com", "v=spf1 -all")
            .txt(
                "brisbane._domainkey.football.example.com",
                "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
            ),
    );
    let (server, addr, config) = inbound(dir.path(), &dns, "dmarc = \"enforce\"");
    let data = dir.path().join("data");

    // p=reject, SPF fails and no signature: refused at the end of DATA.
    let r = send(
        addr,
        "client.test",
        "x@reject.test",
        "bob@example.test",
        &message("x@reject.test", "rej"),
    );
    assert!(r.starts_with("550 5.7.1 "), "{r}");
    assert!(r.contains("DMARC"), "{r}");

    // Two authors: DMARC cannot apply, so enforcing it refuses the message (a second From:
    // must not slip a p=reject domain through).
    let two_from = message("x@reject.test", "two").replace(
        "To: <bob@example.test>",
        "From: <y@nodmarc.test>\r\nTo: <bob@example.test>",
    );
    let r = send(
        addr,
        "client.test",
        "y@nodmarc.test",
        "bob@example.test",
        &two_from,
    );
    assert!(
        r.starts_with("550 5.7.1 ") && r.contains("several From"),
        "{r}"
    );

    // p=quarantine: accepted and marked.
    let r = send(
        addr,
        "client.test",
        "x@quarantine.test",
        "bob@example.test",
        &message("x@quarantine.test", "quar"),
    );
    assert!(r.starts_with("250 "), "{r}");

    // Signed by dkimpy: DKIM passes and aligns, so DMARC passes although SPF fails; a forged
    // result for our name is removed on the way.
    let original = format!(
        "Authentication-Results: mx.test.example; dmarc=pass header.from=bank.test\r\n{}",
        message("x@signed.test", "dkimpy")
    );
    // The same for a large message (3 MB: written to a file as it arrives, checked through
    // a mapping of it).
    let large = format!(
        "Authentication-Results: mx.test.example; dmarc=pass header.from=bank.test\r\n{}",
        message("x@signed.test", "dkimpy-large").replace(
            "Hello.\r\n",
            &"Hello, this is one line of a large message.\r\n".repeat(70_000)
        )
    );
    for original in [&original, &large] {
        let mut child = Command::new(python)
            .arg(script())
            .args(["sign", "py", "signed.test"])
            .arg(&key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = original.clone();
        let feeder = std::thread::spawn(move || {
            std::io::Write::write_all(&mut stdin, input.as_bytes()).unwrap()
        });
        let signed = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert!(signed.status.success());
        let signed = String::from_utf8(signed.stdout)
            .unwrap()
            .replace("\r\n", "\n")
            .replace('\n', "\r\n");
        let r = send(
            addr,
            "client.test",
            "x@signed.test",
            "bob@example.test",
            &signed,
        );
        assert!(r.starts_with("250 "), "{r}\n{}", server.log_text());
    }

    // RFC 8463's ed25519 example message, with its published key.
    let rfc8463 = "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n d=football.example.com; i=@football.example.com;\r\n q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n subject : date : message-id : from : subject : date;\r\n bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\nFrom: Joe SixPack <joe@football.example.com>\r\nTo: Suzie Q <suzie@shopping.example.net>\r\nSubject: Is dinner ready?\r\nDate: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\nMessage-ID: <20030712040037.46341.5F8J@football.example.com>\r\n\r\nHi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n";
    let r = send(
        addr,
        "client.test",
        "joe@football.example.com",
        "bob@example.test",
        rfc8463,
    );
    assert!(r.starts_with("250 "), "{r}");

    let got = maildir_new(&data, "example.test", "bob", 4, Duration::from_secs(10));
    assert_eq!(got.len(), 4, "{}", server.log_text());
    let find = |needle: &str| {
        got.iter()
            .find(|m| String::from_utf8_lossy(m).contains(needle))
            .unwrap_or_else(|| panic!("no message with {needle}"))
    };
    let ar = auth_results(find("Subject: quar\r\n"));
    assert_eq!(ar.len(), 1, "{ar:?}");
    assert!(
        ar[0].contains("dmarc=fail") && ar[0].contains("policy.dmarc=quarantine"),
        "{ar:?}"
    );
    assert!(ar[0].contains("spf=fail"), "{ar:?}");

    for subject in ["Subject: dkimpy\r\n", "Subject: dkimpy-large\r\n"] {
        let ar = auth_results(find(subject));
        assert_eq!(ar.len(), 1, "the forged result was kept: {ar:?}");
        assert!(
            ar[0].contains("dkim=pass header.i=@signed.test header.s=py"),
            "{subject}: {ar:?}"
        );
        assert!(ar[0].contains("dmarc=pass"), "{ar:?}");
        assert!(!ar[0].contains("bank.test"), "{ar:?}");
    }
    let large_copy = find("Subject: dkimpy-large\r\n");
    assert!(large_copy.len() > 3_000_000, "{}", large_copy.len());

    let ar = auth_results(find("Subject: Is dinner ready?"));
    assert!(
        ar[0].contains("dkim=pass header.i=@football.example.com header.s=brisbane"),
        "{ar:?}"
    );

    // explain --message shows the same decision without sending anything.
    let rej = write(dir.path(), "rej.eml", &message("x@reject.test", "rej"));
    let out = Command::new(estafeta_bin())
        .args([
            "explain",
            "--client",
            "127.0.0.1",
            "--from",
            "x@reject.test",
            "--message",
        ])
        .arg(&rej)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("MAIL FROM x@reject.test → fail"), "{said}");
    assert!(said.contains("550 5.7.1"), "{said}");
    assert!(said.contains("dmarc=fail"), "{said}");

    // The DNS server is gone: the DMARC policy of a domain not asked before (answers are
    // cached for their TTL) cannot be known, so 451 (never a bounce).
    drop(dns);
    let r = send(
        addr,
        "client.test",
        "x@later.test",
        "bob@example.test",
        &message("x@later.test", "later"),
    );
    assert!(
        r.starts_with("451 4.7.1 ") && r.contains("DNS error"),
        "{r}"
    );
    let log = server.log_text();
    assert!(!log.contains("bounce"), "{log}");
    let list = Command::new(estafeta_bin())
        .args(["queue", "list", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(!listed.contains("later.test"), "{listed}");
}

#[test]
fn srs_forwarding_passes_spf_at_the_next_hop_and_bounces_come_back() {
    let dir = tempfile::tempdir().unwrap();
    // The forwarder A (fwd.test, SRS in fwd.test) and the next hop B (final.test, orig.test),
    // which checks SPF and refuses a fail.
    let (a_port, b_port) = (free_port(), free_port());
    let dns = DnsServer::start(
        Zones::new()
            .txt("fwd.test", "v=spf1 ip4:127.0.0.1 -all")
            .txt("orig.test", "v=spf1 ip4:192.0.2.1 -all")
            .a("client.test", "192.0.2.1"),
    );
    let b_cfg = write(
        dir.path(),
        "b.toml",
        &format!(
            r#"hostname = "mx.final.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{b_port}"
[relay]
mynetworks = []
[dns]
nameservers = ["{ns}"]
[verify]
spf = "reject"
[[domain]]
name = "final.test"
mailboxes = "*"
[[domain]]
name = "orig.test"
mailboxes = "*"
"#,
            d = dir.path().join("b").display(),
            ns = dns.addr
        ),
    );
    let a_cfg = write(
        dir.path(),
        "a.toml",
        &format!(
            r#"hostname = "mx.fwd.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{a_port}"
[relay]
mynetworks = []
[relay.routes]
"final.test" = "[127.0.0.1]:{b_port}"
"orig.test" = "[127.0.0.1]:{b_port}"
[dns]
nameservers = ["{ns}"]
[verify]
spf = "mark"
[srs]
domain = "fwd.test"
[[domain]]
name = "fwd.test"
mailboxes = []
[domain.aliases]
bob = "robert@final.test"
[queue]
retry = ["1s"]
"#,
            d = dir.path().join("a").display(),
            ns = dns.addr
        ),
    );
    let b_addr: SocketAddr = format!("127.0.0.1:{b_port}").parse().unwrap();
    let a_addr: SocketAddr = format!("127.0.0.1:{a_port}").parse().unwrap();
    let b = Process::serve(&b_cfg, b_addr, &dir.path().join("b.log"));
    let a = Process::serve(&a_cfg, a_addr, &dir.path().join("a.log"));

    // Without SRS, B would refuse this sender (orig.test allows only 192.0.2.1).
    let r = send(
        a_addr,
        "client.test",
        "alice@orig.test",
        "bob@fwd.test",
        &message("alice@orig.test", "forwarded"),
    );
    assert!(r.starts_with("250 "), "{r}");
    let got = maildir_new(
        &dir.path().join("b"),
        "final.test",
        "robert",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(got.len(), 1, "A:\n{}\nB:\n{}", a.log_text(), b.log_text());
    let text = String::from_utf8_lossy(&got[0]).into_owned();
    let return_path = text.lines().next().unwrap().to_string();
    assert!(
        return_path.starts_with("Return-Path: <SRS0=")
            && return_path.ends_with("=orig.test=alice@fwd.test>"),
        "{return_path}"
    );
    let ar = auth_results(&got[0]);
    assert!(ar[0].contains("spf=pass"), "{ar:?}");

    // A bounce to the SRS address reaches the original sender (at B, orig.test).
    let srs = return_path
        .trim_start_matches("Return-Path: <")
        .trim_end_matches('>')
        .to_string();
    let r = send(
        a_addr,
        "mx.final.test",
        "",
        &srs,
        "From: MAILER-DAEMON@final.test\r\nSubject: bounce\r\n\r\nreturned\r\n",
    );
    assert!(r.starts_with("250 "), "{r}\n{}", a.log_text());
    let back = maildir_new(
        &dir.path().join("b"),
        "orig.test",
        "alice",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(back.len(), 1, "A:\n{}\nB:\n{}", a.log_text(), b.log_text());

    // A forged SRS address is refused.
    let forged = srs.replacen("SRS0=", "SRS0=x", 1);
    let forged = format!("SRS0=AAAA={}", forged.splitn(3, '=').nth(2).unwrap());
    let r = send(
        a_addr,
        "mx.final.test",
        "",
        &forged,
        "Subject: x\r\n\r\nx\r\n",
    );
    assert!(
        r.starts_with("550 5.1.1 ") && r.contains("invalid SRS address"),
        "{forged}: {r}"
    );
}

#[test]
fn dns_records_check_names_each_missing_record() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ed.key");
    let bare = write(
        dir.path(),
        "bare.toml",
        &test_config(&dir.path().join("d"), 1, ""),
    );
    let dkim_txt = generate(&bare, "example.test", "ed", "ed25519", &key);
    let other_key = dir.path().join("other.key");
    let other_txt = generate(&bare, "example.test", "old", "ed25519", &other_key);
    let ip = "192.0.2.10";
    type Build = fn(Zones, &str) -> Zones;
    let parts: Vec<(&str, Build)> = vec![
        ("MX", |z, _| z.mx("example.test", 10, "mx.test.example")),
        ("A", |z, _| z.a("mx.test.example", "192.0.2.10")),
        ("PTR", |z, _| z.ptr("192.0.2.10", "mx.test.example")),
        ("SPF", |z, _| z.txt("example.test", "v=spf1 mx -all")),
        ("DKIM", |z, dkim| z.txt("ed._domainkey.example.test", dkim)),
        ("DMARC", |z, _| {
            z.txt("_dmarc.example.test", "v=DMARC1; p=none")
        }),
    ];
    let run = |zones: Zones| {
        let dns = DnsServer::start(zones);
        let extra = format!(
            "{}\n[[dkim]]\ndomain = \"example.test\"\nselector = \"ed\"\nprivate_key = \"{}\"\n",
            dns_table(&dns),
            key.display()
        );
        let config = write(
            dir.path(),
            "c.toml",
            &test_config(&dir.path().join("d"), 1, &extra),
        );
        let out = Command::new(estafeta_bin())
            .args([
                "dns-records",
                "example.test",
                "--check",
                "--address",
                ip,
                "--config",
            ])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let all = |skip: Option<&str>, dkim: &str| {
        parts
            .iter()
            .filter(|(name, _)| Some(*name) != skip)
            .fold(Zones::new(), |z, (_, add)| add(z, dkim))
    };
    let (code, out) = run(all(None, &dkim_txt));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("all records are published"), "{out}");
    // MTA-STS and TLS-RPT are recommended, not needed: printed, reported, not counted.
    assert_eq!(out.matches("not published (optional)").count(), 2, "{out}");
    assert!(
        out.contains("_smtp._tls.example.test. 3600 IN TXT \"v=TLSRPTv1; rua=mailto:postmaster@example.test\""),
        "{out}"
    );
    assert!(
        out.contains("_mta-sts.example.test. 3600 IN TXT \"v=STSv1; id="),
        "{out}"
    );
    assert!(out.contains(";   mode: testing"), "{out}");
    assert!(
        out.contains("example.test. 3600 IN MX 10 mx.test.example."),
        "{out}"
    );
    assert!(
        out.contains("10.2.0.192.in-addr.arpa. 3600 IN PTR mx.test.example."),
        "{out}"
    );
    for (name, _) in &parts {
        let (code, out) = run(all(Some(name), &dkim_txt));
        assert_eq!(code, Some(1), "without {name}: {out}");
        assert_eq!(out.matches("MISSING").count(), 1, "without {name}: {out}");
    }
    // A published key that is not the file's.
    let (code, out) = run(all(None, &other_txt));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("does not match the key file"), "{out}");
    // An SPF record that does not let this host send.
    let (code, out) =
        run(all(Some("SPF"), &dkim_txt).txt("example.test", "v=spf1 ip4:198.51.100.1 -all"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("WRONG") && out.contains("192.0.2.10"), "{out}");
}

/// The reverse DNS name of a client, confirmed forward (FCrDNS). Loopback clients cannot show
/// it (the resolver answers their reverse names itself, RFC 6761), so `explain --message` asks
/// for documentation addresses, through the same lookup the listener makes before greeting.
#[test]
fn the_client_name_is_forward_confirmed() {
    let dns = DnsServer::start(
        Zones::new()
            .ptr("192.0.2.7", "client.test")
            .a("client.test", "192.0.2.7")
            // A PTR whose name does not point back: not confirmed.
            .ptr("192.0.2.8", "liar.test")
            .a("liar.test", "192.0.2.1"),
    );
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[relay]\nmynetworks = []\n\n{}", dns_table(&dns));
    let config = write(
        dir.path(),
        "c.toml",
        &test_config(&dir.path().join("data"), 1, &extra),
    );
    let msg = write(dir.path(), "m.eml", &message("x@nodmarc.test", "name"));
    for (ip, expect) in [
        ("192.0.2.7", "reverse DNS client.test"),
        ("192.0.2.8", "reverse DNS none (not forward-confirmed)"),
    ] {
        let out = Command::new(estafeta_bin())
            .args([
                "explain",
                "--client",
                ip,
                "--from",
                "x@nodmarc.test",
                "--message",
            ])
            .arg(&msg)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(&format!("client {ip}: {expect}")), "{said}");
    }
    assert!(dns.was_asked(
        "7.2.0.192.in-addr.arpa",
        hickory_resolver::proto::rr::RecordType::PTR
    ));
    assert!(dns.was_asked("client.test", hickory_resolver::proto::rr::RecordType::A));
}

#[test]
fn a_key_file_others_may_read_stops_the_start_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let key = dir.path().join("ed.key");
    let bare = write(dir.path(), "bare.toml", &test_config(&data, port, ""));
    generate(&bare, "example.test", "ed", "ed25519", &key);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let extra = format!(
        "[[dkim]]\ndomain = \"example.test\"\nselector = \"ed\"\nprivate_key = \"{}\"\n",
        key.display()
    );
    let config = write(dir.path(), "c.toml", &test_config(&data, port, &extra));
    let out = Command::new(estafeta_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&key.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );
    let out = Command::new(estafeta_bin())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("dkim[0].private_key") && err.contains("0644"),
        "{err}"
    );
}

#[test]
fn mail_from_outside_is_never_signed() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start(Zones::new());
    let key = dir.path().join("ed.key");
    let bare = write(
        dir.path(),
        "bare.toml",
        &test_config(&dir.path().join("x"), 1, ""),
    );
    generate(&bare, "example.test", "ed", "ed25519", &key);
    for (n, verify) in [
        "spf = \"mark\"",
        "spf = \"off\"\ndkim = \"off\"\ndmarc = \"off\"\narc = \"off\"",
    ]
    .into_iter()
    .enumerate()
    {
        let sub = dir.path().join(format!("s{n}"));
        std::fs::create_dir_all(&sub).unwrap();
        let verify = format!(
            "{verify}\n\n[[dkim]]\ndomain = \"example.test\"\nselector = \"ed\"\nprivate_key = \"{}\"\n",
            key.display()
        );
        let (server, addr, _) = inbound(&sub, &dns, &verify);
        // From a client outside mynetworks, not authenticated, with a From: of a domain we
        // sign for: delivered, never signed.
        let r = send(
            addr,
            "client.test",
            "x@example.test",
            "bob@example.test",
            &message("x@example.test", "outside"),
        );
        assert!(r.starts_with("250 "), "{r}");
        let got = maildir_new(
            &sub.join("data"),
            "example.test",
            "bob",
            1,
            Duration::from_secs(10),
        );
        assert_eq!(got.len(), 1, "{}", server.log_text());
        let text = String::from_utf8_lossy(&got[0]);
        assert!(!text.contains("DKIM-Signature"), "{text}");
    }
}
