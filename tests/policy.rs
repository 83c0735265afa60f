//! The relay policy end to end with the real binary: who may relay (mynetworks, AUTH), the
//! open-relay guard, VRFY, and `estafeta explain`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use estafeta_e2e::{Client, Process, estafeta_bin, free_port};

fn python_ok() -> bool {
    Command::new("python3").arg("--version").output().is_ok()
}

fn write_config(dir: &Path, port: u16, relay: &str) -> std::path::PathBuf {
    let config = dir.join("estafeta.toml");
    std::fs::write(
        &config,
        format!(
            r#"hostname = "mx.test.example"
data_dir = "{data}"
run_as_root = true

[[listener]]
kind = "smtp"
address = "0.0.0.0:{port}"

[relay]
{relay}

[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[domain.aliases]
postmaster = "alice"
"#,
            data = dir.join("data").display()
        ),
    )
    .unwrap();
    config
}

fn rcpt_from(port: u16, source: &str, rcpt: &str, auth: Option<(&str, &str)>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/relay.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args(["127.0.0.1", &port.to_string(), source, rcpt]);
    if let Some((u, p)) = auth {
        cmd.args([u, p]);
    }
    let out = cmd.output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn mynetworks_and_auth_decide_who_may_relay() {
    if !python_ok() {
        estafeta_e2e::skip("python3 not found: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, r#"mynetworks = ["127.0.0.1/32"]"#);
    let mut add = Command::new(estafeta_bin())
        .args([
            "user",
            "add",
            "alice@example.test",
            "--password-stdin",
            "--config",
        ])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(add.stdin.take().unwrap(), "pw-alice-1").unwrap();
    assert!(add.wait().unwrap().success());
    let p = Process::serve(
        &config,
        format!("127.0.0.1:{port}").parse().unwrap(),
        &dir.path().join("log"),
    );
    // Inside mynetworks: may relay.
    let r = rcpt_from(port, "127.0.0.1", "someone@elsewhere.example", None);
    assert!(r.starts_with("250 2.1.5"), "{r}\n{}", p.log_text());
    // Outside (a second loopback address): refused.
    let r = rcpt_from(port, "127.0.0.2", "someone@elsewhere.example", None);
    assert!(
        r.starts_with("554 5.7.1 <someone@elsewhere.example>: Relay access denied"),
        "{r}"
    );
    // The percent hack through a local domain: refused too.
    let r = rcpt_from(
        port,
        "127.0.0.2",
        "someone%elsewhere.example@example.test",
        None,
    );
    assert!(r.starts_with("554 5.7.1"), "{r}");
    // Local recipients are fine from anywhere.
    let r = rcpt_from(port, "127.0.0.2", "postmaster@example.test", None);
    assert!(r.starts_with("250 2.1.5"), "{r}");
    // After AUTH the outside client may relay.
    let r = rcpt_from(
        port,
        "127.0.0.2",
        "someone@elsewhere.example",
        Some(("alice@example.test", "pw-alice-1")),
    );
    assert!(r.starts_with("250 2.1.5"), "{r}\n{}", p.log_text());
}

#[test]
fn open_relay_is_refused_unless_explicitly_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, r#"mynetworks = ["0.0.0.0/0"]"#);
    let out = Command::new(estafeta_bin())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("any host on the internet may relay mail through this server"),
        "{err}"
    );
    let out = Command::new(estafeta_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    // With allow_open_relay = true it starts, and warns.
    let config = write_config(
        dir.path(),
        port,
        "mynetworks = [\"0.0.0.0/0\"]\nallow_open_relay = true",
    );
    let p = Process::serve(
        &config,
        format!("127.0.0.1:{port}").parse().unwrap(),
        &dir.path().join("log"),
    );
    let mut c = Client::connect(p.addr);
    c.reply();
    c.line("HELO x");
    c.reply();
    c.line("MAIL FROM:<a@outside.example>");
    c.reply();
    assert!(c.cmd("RCPT TO:<b@elsewhere.example>").starts_with("250"));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !p.log_text().contains("open relay") {
        assert!(std::time::Instant::now() < deadline, "{}", p.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn vrfy_says_the_same_for_existing_and_unknown_users() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "mynetworks = []");
    let p = Process::serve(
        &config,
        format!("127.0.0.1:{port}").parse().unwrap(),
        &dir.path().join("log"),
    );
    let mut c = Client::connect(p.addr);
    c.reply();
    let a = c.cmd("VRFY alice@example.test");
    let b = c.cmd("VRFY nobody@example.test");
    assert_eq!(a, b);
    assert!(a.starts_with("252 2.5.2"));
    assert!(c.cmd("EXPN postmaster").starts_with("502 5.5.1"));
}

#[test]
fn explain_prints_the_deciding_rule() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2599, r#"mynetworks = ["192.168.1.0/24"]"#);
    let run = |args: &[&str]| {
        let out = Command::new(estafeta_bin())
            .arg("explain")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&[
        "--client",
        "203.0.113.5",
        "--from",
        "a@b.example",
        "--rcpt",
        "c@d.example",
    ]);
    assert_eq!(code, Some(1));
    assert!(out.contains("no mynetworks entry holds it"), "{out}");
    assert!(
        out.contains("→ 554 5.7.1 <c@d.example>: Relay access denied"),
        "{out}"
    );
    let (code, out) = run(&[
        "--client",
        "192.168.1.20",
        "--from",
        "a@b.example",
        "--rcpt",
        "c@d.example",
    ]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("inside mynetworks entry 192.168.1.0/24"),
        "{out}"
    );
    assert!(out.contains("→ 250 2.1.5 Ok"), "{out}");
    let (_, out) = run(&[
        "--client",
        "203.0.113.5",
        "--from",
        "a@b.example",
        "--rcpt",
        "postmaster@example.test",
        "--rcpt",
        "carol@example.test",
    ]);
    assert!(
        out.contains("postmaster@example.test: alias → alice"),
        "{out}"
    );
    assert!(
        out.contains("→ 550 5.1.1 <carol@example.test>: Recipient address rejected: User unknown"),
        "{out}"
    );
}

#[test]
fn recipient_probing_is_slowed_then_cut_off_and_vrfy_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "mynetworks = [\"127.0.0.1/32\"]");
    let text = std::fs::read_to_string(&config).unwrap()
        + "\n[smtp]\nvrfy = \"trusted\"\nexpn = \"trusted\"\nmax_unknown_recipients = 2\n";
    std::fs::write(&config, text).unwrap();
    let p = Process::serve(
        &config,
        format!("127.0.0.1:{port}").parse().unwrap(),
        &dir.path().join("log"),
    );
    // 127.0.0.1 is trusted: VRFY and EXPN tell the truth.
    let mut c = Client::connect(p.addr);
    c.reply();
    assert_eq!(
        c.cmd("VRFY alice@example.test"),
        "250 2.1.5 <alice@example.test>"
    );
    assert!(c.cmd("VRFY carol@example.test").starts_with("550 5.1.1"));
    assert_eq!(
        c.cmd("EXPN postmaster@example.test"),
        "250 2.1.5 <alice@example.test>"
    );
    // Probing: two unknown recipients answered at once, the third slowed, the fourth ends it.
    c.line("HELO x");
    c.reply();
    c.line("MAIL FROM:<a@outside.example>");
    c.reply();
    for i in 0..2 {
        let t = std::time::Instant::now();
        assert!(
            c.cmd(&format!("RCPT TO:<u{i}@example.test>"))
                .starts_with("550 5.1.1")
        );
        assert!(t.elapsed() < Duration::from_millis(900));
    }
    let t = std::time::Instant::now();
    assert!(c.cmd("RCPT TO:<u3@example.test>").starts_with("550 5.1.1"));
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t.elapsed()
    );
    c.line("RCPT TO:<u4@example.test>");
    assert!(c.last().starts_with("550 5.1.1"));
    assert!(c.last().starts_with("421 4.7.0"));
    assert!(c.is_closed());
}
