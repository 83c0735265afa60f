//! Submission end to end: the real binary, users added with `estafeta user add`, real TLS
//! with Python's smtplib/ssl and openssl s_client, on all three listener kinds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use estafeta_e2e::{Client, Process, free_port, maildir_new};

struct Submission {
    dir: tempfile::TempDir,
    data: PathBuf,
    smtp: u16,
    submission: u16,
    submissions: u16,
    process: Process,
}

const USER: &str = "alice@example.test";
const PASSWORD: &str = "correct horse battery staple";

fn start() -> Submission {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (smtp, submission, submissions) = (free_port(), free_port(), free_port());
    let config = dir.path().join("estafeta.toml");
    std::fs::write(
        &config,
        format!(
            r#"hostname = "mx.test.example"
data_dir = "{data}"
run_as_root = true

[[listener]]
kind = "smtp"
address = "127.0.0.1:{smtp}"

[[listener]]
kind = "submission"
address = "127.0.0.1:{submission}"

[[listener]]
kind = "submissions"
address = "127.0.0.1:{submissions}"

[[domain]]
name = "example.test"
mailboxes = "*"

# No mailboxes: the users of this domain in the users file.
[[domain]]
name = "users.test"
"#,
            data = data.display()
        ),
    )
    .unwrap();
    add_user(&config, USER);
    let process = Process::serve(
        &config,
        format!("127.0.0.1:{smtp}").parse().unwrap(),
        &dir.path().join("server.log"),
    );
    // The other two listeners are bound in the same start; wait for them too.
    for port in [submission, submissions] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "port {port} not listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Submission {
        dir,
        data,
        smtp,
        submission,
        submissions,
        process,
    }
}

/// `estafeta user add ADDRESS --password-stdin --config FILE`.
fn add_user(config: &Path, address: &str) {
    estafeta_e2e::add_user(config, address, PASSWORD);
}

fn python() -> Option<&'static str> {
    Command::new("python3")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "python3")
}

/// Runs a scenario of tests/py/submission.py; returns its JSON output as text.
fn scenario(s: &Submission, name: &str, port: u16) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/submission.py");
    let out = Command::new("python3")
        .arg(script)
        .args([name, "127.0.0.1", &port.to_string(), USER, PASSWORD])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.process.log_text()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Waits (up to 10 s) for the message with this subject in bob's Maildir: earlier
/// messages being there does not mean this one is.
fn delivered(s: &Submission, subject: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msgs = maildir_new(&s.data, "example.test", "bob", 1, Duration::from_secs(10));
        if let Some(m) = msgs
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .find(|m| m.contains(&format!("Subject: {subject}")))
        {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no message {subject:?}; log:\n{}",
            s.process.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn submission_587_starttls_auth_plain_and_the_rules_before_it() {
    if python().is_none() {
        estafeta_e2e::skip("python3 not found: skipped");
        return;
    }
    let s = start();
    let out = scenario(&s, "starttls-plain", s.submission);
    // No AUTH advertised before TLS; STARTTLS is.
    assert!(
        out.contains(
            r#""ehlo_before_tls": "mx.test.example\nPIPELINING\nSIZE 26214400\nSTARTTLS\n"#
        ),
        "{out}"
    );
    assert!(
        !out.split("ehlo_after_tls")
            .next()
            .unwrap()
            .contains("AUTH PLAIN"),
        "{out}"
    );
    assert!(
        out.contains(r#""mail_before_auth": [530, "5.7.0 Authentication required"]"#),
        "{out}"
    );
    assert!(out.contains(r#""auth_before_tls": [538, "5.7.11 Encryption required for requested authentication mechanism"]"#), "{out}");
    assert!(out.contains("AUTH PLAIN LOGIN"), "{out}");
    assert!(
        !out.contains(r#""ehlo_after_tls": "mx.test.example\nPIPELINING\nSIZE 26214400\nSTARTTLS"#),
        "{out}"
    );
    assert!(out.contains(r#""tls_version": "TLSv1.3""#), "{out}");
    assert!(
        out.contains(r#""login": [235, "2.7.0 Authentication successful"]"#),
        "{out}"
    );
    assert!(out.contains(r#""refused": {}"#), "{out}");
    assert!(out.contains(r#""not_owned": [553, "5.7.1 <mallory@example.test>: Sender address rejected: not owned by user alice@example.test"]"#), "{out}");
    let m = delivered(&s, "via 587 plain");
    assert!(m.contains("with ESMTPSA id"), "{m}");
    assert!(m.contains("(using TLSv1.3 with cipher TLS13_"), "{m}");
    // The user name is not in the headers unless the configuration asks for it.
    assert!(!m.contains("Authenticated sender"), "{m}");
}

#[test]
fn submission_587_auth_login_and_465_implicit_tls() {
    if python().is_none() {
        estafeta_e2e::skip("python3 not found: skipped");
        return;
    }
    let s = start();
    let out = scenario(&s, "starttls-login", s.submission);
    assert!(
        out.contains(r#""login": [235, "2.7.0 Authentication successful"]"#),
        "{out}"
    );
    let out = scenario(&s, "implicit-tls", s.submissions);
    assert!(out.contains(r#""tls_version": "TLSv1.3""#), "{out}");
    assert!(out.contains("AUTH PLAIN LOGIN"), "{out}");
    assert!(!out.contains("STARTTLS"), "{out}");
    assert!(
        out.contains(r#""login": [235, "2.7.0 Authentication successful"]"#),
        "{out}"
    );
    let m = delivered(&s, "via 587 login");
    assert!(m.contains("with ESMTPSA"), "{m}");
    let m = delivered(&s, "via 465");
    assert!(
        m.contains("with ESMTPSA") && m.contains("(using TLSv1.3"),
        "{m}"
    );
}

#[test]
fn wrong_password_three_times_then_421_and_the_address_is_slowed() {
    if python().is_none() {
        estafeta_e2e::skip("python3 not found: skipped");
        return;
    }
    let s = start();
    let out = scenario(&s, "wrong-password", s.submission);
    // Three 535 (each after the constant delay), the third followed by 421.
    let first_session = out.split("next_session").next().unwrap();
    assert_eq!(
        first_session
            .matches("535, \"5.7.8 Authentication credentials invalid\"")
            .count(),
        3,
        "{out}"
    );
    assert!(out.contains("421"), "{out}");
    // The next session's failure waits out the throttle on top of the constant delay.
    let next: Vec<&str> = out
        .split(r#""next_session": [535, "5.7.8 Authentication credentials invalid", "#)
        .collect();
    assert_eq!(next.len(), 2, "{out}");
    let seconds: f64 = next[1].trim_end_matches(['}', ']', '\n']).parse().unwrap();
    assert!(
        seconds >= 1.9,
        "the fourth failure from this address took only {seconds}s: {out}"
    );
    let log = s.process.log_text();
    assert!(
        log.contains("authentication failed client=127.0.0.1"),
        "{log}"
    );
}

#[test]
fn plaintext_pipelined_after_starttls_is_not_executed() {
    if python().is_none() {
        estafeta_e2e::skip("python3 not found: skipped");
        return;
    }
    let s = start();
    for port in [s.smtp, s.submission] {
        let out = scenario(&s, "injection", port);
        assert!(
            out.contains(r#""starttls": ["220 2.0.0 Ready to start TLS"]"#),
            "{out}"
        );
        // Inside TLS, the first reply is the one to our NOOP, not to the injected RSET/MAIL.
        assert!(
            out.contains(r#""first_reply_inside_tls": "250 2.0.0 Ok""#),
            "{out}"
        );
        let log = s.process.log_text();
        assert!(!log.contains("evil@example.test"), "{log}");
    }
}

#[test]
fn openssl_negotiates_tls13_and_tls11_is_refused() {
    if Command::new("openssl").arg("version").output().is_err() {
        estafeta_e2e::skip("openssl not found: skipped");
        return;
    }
    let s = start();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let smtp = format!("127.0.0.1:{}", s.smtp);
    let out = run(&["s_client", "-starttls", "smtp", "-connect", &smtp, "-brief"]);
    assert!(out.contains("Protocol version: TLSv1.3"), "{out}");
    let implicit = format!("127.0.0.1:{}", s.submissions);
    let out = run(&["s_client", "-connect", &implicit, "-brief"]);
    assert!(out.contains("Protocol version: TLSv1.3"), "{out}");
    // OpenSSL 3 refuses TLS 1.1 itself at its default security level: lower it so that the
    // server is what refuses.
    let out = run(&[
        "s_client",
        "-connect",
        &implicit,
        "-tls1_1",
        "-cipher",
        "DEFAULT@SECLEVEL=0",
        "-brief",
    ]);
    assert!(!out.contains("CONNECTION ESTABLISHED"), "{out}");
    assert!(out.contains("alert") || out.contains("error"), "{out}");
}

#[test]
fn users_file_lists_the_mailboxes_and_is_picked_up_without_restart() {
    let s = start();
    let rcpt = |to: &str| {
        let mut c = Client::connect(format!("127.0.0.1:{}", s.smtp).parse().unwrap());
        c.reply();
        c.line("HELO client.example");
        c.reply();
        c.line("MAIL FROM:<x@example.test>");
        c.reply();
        c.cmd(&format!("RCPT TO:<{to}>"))
    };
    assert!(rcpt("carol@users.test").starts_with("550 5.1.1"));
    assert!(rcpt("postmaster@users.test").starts_with("250 2.1.5"));
    // Add carol while the server runs: within a couple of seconds she exists.
    add_user(&s.dir.path().join("estafeta.toml"), "carol@users.test");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = rcpt("carol@users.test");
        if r.starts_with("250 2.1.5") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "carol not picked up: {r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(rcpt("dave@users.test").starts_with("550 5.1.1"));
}

#[test]
fn swaks_submits_with_starttls_plain_login_and_implicit_tls() {
    if Command::new("swaks").arg("--version").output().is_err() {
        estafeta_e2e::skip("swaks not found: skipped (.ci/run installs it)");
        return;
    }
    let s = start();
    let swaks = |port: u16, extra: &[&str], subject: &str| {
        let out = Command::new("swaks")
            .args(["--server", &format!("127.0.0.1:{port}")])
            .args(extra)
            .args(["--from", USER, "--to", "bob@example.test"])
            .args(["--header", &format!("Subject: {subject}")])
            .args(["--auth-user", USER, "--auth-password", PASSWORD])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("235 2.7.0") && text.contains("queued as"),
            "{subject}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    swaks(s.submission, &["--tls", "--auth", "PLAIN"], "swaks plain");
    swaks(s.submission, &["--tls", "--auth", "LOGIN"], "swaks login");
    swaks(
        s.submissions,
        &["--tlsc", "--auth", "PLAIN"],
        "swaks implicit",
    );
    for subject in ["swaks plain", "swaks login", "swaks implicit"] {
        let m = delivered(&s, subject);
        assert!(
            m.contains("with ESMTPSA") && m.contains("(using TLSv1."),
            "{m}"
        );
    }
}
