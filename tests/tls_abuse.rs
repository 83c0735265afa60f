//! TLS state changes in the middle of a transaction (the 2026 Exim "Dead.Letter" class): a TLS
//! close_notify in the middle of DATA or of a BDAT chunk, followed by plaintext, and a TLS 1.2
//! renegotiation attempt. Each ends the session; nothing half-received is queued; the server
//! keeps serving everybody else. Driven by Python's ssl module and `openssl s_client`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use estafeta_e2e::{Process, free_port, maildir_new, submit, test_config};

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py/tls_abuse.py")
}

#[test]
fn close_notify_mid_message_then_plaintext_queues_nothing() {
    if Command::new("python3").arg("--version").output().is_err() {
        estafeta_e2e::skip("python3 is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        test_config(&data, port, "[relay]\nmynetworks = []\n[verify]\nspf = \"off\"\ndkim = \"off\"\ndmarc = \"off\"\narc = \"off\"\n"),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Process::serve(&config, addr, &dir.path().join("log"));
    for mode in ["close-notify-in-data", "close-notify-in-bdat"] {
        let out = Command::new("python3")
            .arg(script())
            .args(["127.0.0.1", &port.to_string(), mode])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !said.contains("got: 250"),
            "{mode}: plaintext was read after close_notify: {said}"
        );
        assert!(!said.contains("got: 354"), "{mode}: {said}");
    }
    // Nothing was queued; everybody else is still served.
    std::thread::sleep(Duration::from_millis(300));
    let log = server.log_text();
    assert!(!log.contains(" queued"), "{log}");
    assert!(maildir_new(&data, "example.test", "bob", 1, Duration::from_millis(200)).is_empty());
    submit(
        addr,
        "a@example.net",
        &["carol@example.test"],
        b"Subject: after\r\n\r\nok\r\n",
    );
    assert_eq!(
        maildir_new(&data, "example.test", "carol", 1, Duration::from_secs(10)).len(),
        1
    );
}

#[test]
fn a_tls_renegotiation_is_refused_and_the_server_goes_on() {
    if Command::new("openssl").arg("version").output().is_err() {
        estafeta_e2e::skip("openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        test_config(&data, port, "[limits]\ncommand_timeout = \"5s\"\n"),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Process::serve(&config, addr, &dir.path().join("log"));
    // "R" on a line of its own asks s_client to renegotiate (TLS 1.2 only).
    let mut child = Command::new("openssl")
        .args(["s_client", "-starttls", "smtp", "-tls1_2", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let _ = stdin.write_all(b"EHLO renegotiator.example\n");
        std::thread::sleep(Duration::from_millis(300));
        let _ = stdin.write_all(b"R\n");
        std::thread::sleep(Duration::from_millis(800));
        let _ = stdin.write_all(b"MAIL FROM:<a@example.net>\n");
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(child.stdin.take());
    // s_client may wait for the server to time the session out (5 s here); never longer.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("RENEGOTIATING"), "{said}");
    // rustls never renegotiates: the attempt gets a no_renegotiation alert or the session ends;
    // the MAIL after it is never answered 250 inside a renegotiated session.
    assert!(!said.contains("250 2.1.0"), "{said}");
    // The server goes on.
    submit(
        addr,
        "a@example.test",
        &["carol@example.test"],
        b"Subject: after\r\n\r\nok\r\n",
    );
    assert_eq!(
        maildir_new(&data, "example.test", "carol", 1, Duration::from_secs(10)).len(),
        1,
        "{}",
        server.log_text()
    );
}
