//! The Prometheus endpoint end to end: the real binary with `[metrics] address`, real SMTP
//! (a local delivery, a refused relay, a delivery that waits in the queue), real TLS and AUTH
//! with swaks, scrapes before and after, and Prometheus's own `promtool check metrics` on the
//! text.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::{Client, Process, estafeta_bin, free_port, maildir_new, submit, test_config};

const USER: &str = "alice@example.test";
const PASSWORD: &str = "correct horse battery staple";

/// One HTTP/1.1 request; returns the status line, the headers and the body.
fn http(addr: SocketAddr, request: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// `GET /metrics`: the body, after checking the status and the content type.
fn scrape(addr: SocketAddr) -> String {
    let (status, headers, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers.lines().any(|l| l
            .to_ascii_lowercase()
            .starts_with("content-type: text/plain; version=0.0.4")),
        "{headers}"
    );
    body
}

/// Every sample of a scrape: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn value(s: &HashMap<String, f64>, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no {series} in {:#?}", s.keys().collect::<Vec<_>>()))
}

fn add_user(config: &Path) {
    estafeta_e2e::add_user(config, USER, PASSWORD);
}

/// swaks over STARTTLS with AUTH PLAIN on `port`; true when the message was queued.
fn swaks(port: u16, password: &str) -> bool {
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}")])
        .args(["--tls", "--auth", "PLAIN"])
        .args(["--auth-user", USER, "--auth-password", password])
        .args(["--from", USER, "--to", "carol@example.test"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("queued as")
}

#[test]
fn counters_and_gauges_follow_the_mail_and_promtool_accepts_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (smtp, submission, metrics_port) = (free_port(), free_port(), free_port());
    let config = dir.path().join("estafeta.toml");
    let extra = format!(
        r#"[relay]
mynetworks = []

[metrics]
address = "127.0.0.1:{metrics_port}"

[[listener]]
kind = "submission"
address = "127.0.0.1:{submission}"
"#
    );
    // The log shows errors only: the counters see every mail log event all the same.
    let text = test_config(&data, smtp, &extra).replace("level = \"info\"", "level = \"error\"");
    assert!(text.contains("level = \"error\""));
    std::fs::write(&config, text).unwrap();
    add_user(&config);
    let addr: SocketAddr = format!("127.0.0.1:{smtp}").parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let process = Process::serve(&config, addr, &dir.path().join("server.log"));

    // Process::serve's readiness probe is a connection too: wait until it is counted (the
    // port answers as soon as it is bound, a moment before the first accept).
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let s = samples(&scrape(metrics));
        if value(&s, "estafeta_connections_total{listener=\"smtp\"}") >= 1.0 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the readiness probe was never counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(value(&before, "estafeta_queue_messages"), 0.0);
    assert_eq!(
        value(&before, "estafeta_queue_oldest_message_age_seconds"),
        0.0
    );

    // A local delivery.
    submit(
        addr,
        "sender@example.test",
        &["bob@example.test"],
        b"Subject: one\r\n\r\nhello\r\n",
    );
    assert_eq!(
        maildir_new(&data, "example.test", "bob", 1, Duration::from_secs(10)).len(),
        1
    );
    // A refused relay: 127.0.0.1 is outside mynetworks and did not authenticate.
    let mut c = Client::connect(addr);
    c.reply();
    c.line("EHLO client.example.test");
    c.reply();
    assert!(c.cmd("MAIL FROM:<sender@example.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<someone@remote.example>");
    assert!(r.starts_with("554 5.7.1"), "{r}");
    c.cmd("QUIT");
    // A delivery that cannot happen now: a file where stuck's Maildir should be. The message
    // stays in the queue, deferred.
    let stuck = data.join("mail/example.test/stuck");
    std::fs::create_dir_all(stuck.parent().unwrap()).unwrap();
    std::fs::write(&stuck, b"not a directory").unwrap();
    submit(
        addr,
        "sender@example.test",
        &["stuck@example.test"],
        b"Subject: two\r\n\r\nwaits\r\n",
    );
    // TLS and AUTH: one submission that authenticates, one with a wrong password.
    let tls_and_auth = Command::new("swaks").arg("--version").output().is_ok();
    if tls_and_auth {
        assert!(swaks(submission, PASSWORD), "swaks with the right password");
        assert!(!swaks(submission, "wrong"), "swaks with a wrong password");
        assert_eq!(
            maildir_new(&data, "example.test", "carol", 1, Duration::from_secs(10)).len(),
            1
        );
    } else {
        estafeta_e2e::skip(
            "swaks not found: TLS and AUTH counters not checked (.ci/run installs it)",
        );
    }

    // Deliveries are recorded after the 250: wait until the counters have them.
    let delivered = "estafeta_deliveries_total{outcome=\"delivered\",transport=\"maildir\"}";
    let deferred = "estafeta_deliveries_total{outcome=\"deferred\",transport=\"maildir\"}";
    let want_delivered = value(&before, delivered) + if tls_and_auth { 2.0 } else { 1.0 };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (text, after) = loop {
        let text = scrape(metrics);
        let s = samples(&text);
        if value(&s, delivered) >= want_delivered && value(&s, deferred) >= 1.0 {
            break (text, s);
        }
        assert!(
            Instant::now() < deadline,
            "deliveries not counted:\n{text}\n{}",
            process.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let delta = |series: &str| value(&after, series) - value(&before, series);
    let accepted = if tls_and_auth { 3.0 } else { 2.0 };
    assert_eq!(delta("estafeta_connections_total{listener=\"smtp\"}"), 3.0);
    assert_eq!(delta("estafeta_messages_accepted_total"), accepted);
    assert!(delta("estafeta_messages_accepted_bytes_total") > 0.0);
    assert_eq!(
        value(
            &after,
            "estafeta_smtp_rejections_total{command=\"RCPT\",status=\"5.7.1\"}"
        ),
        1.0
    );
    assert_eq!(delta(delivered), want_delivered - value(&before, delivered));
    assert_eq!(
        delta("estafeta_delivery_latency_seconds_count{transport=\"maildir\"}"),
        want_delivered - value(&before, delivered)
    );
    assert_eq!(
        delta("estafeta_delivery_latency_seconds_bucket{transport=\"maildir\",le=\"+Inf\"}"),
        want_delivered - value(&before, delivered)
    );
    // The stuck message is the queue.
    assert_eq!(value(&after, "estafeta_queue_messages"), 1.0);
    assert_eq!(value(&after, "estafeta_queue_pending_recipients"), 1.0);
    assert_eq!(value(&after, "estafeta_queue_held_messages"), 0.0);
    let age = value(&after, "estafeta_queue_oldest_message_age_seconds");
    assert!((0.0..120.0).contains(&age), "{age}");
    assert!(value(&after, "estafeta_scheduler_last_turn_seconds") < 5.0);
    assert_eq!(
        value(&after, "estafeta_config_reloads_total{result=\"success\"}"),
        0.0
    );
    if tls_and_auth {
        assert_eq!(
            delta("estafeta_connections_total{listener=\"submission\"}"),
            2.0
        );
        let tls = delta("estafeta_tls_handshakes_total{version=\"TLSv1.3\"}")
            + delta("estafeta_tls_handshakes_total{version=\"TLSv1.2\"}");
        assert_eq!(tls, 2.0);
        assert_eq!(
            delta("estafeta_auth_attempts_total{result=\"success\",mechanism=\"PLAIN\"}"),
            1.0
        );
        assert_eq!(
            delta("estafeta_auth_attempts_total{result=\"failure\",mechanism=\"PLAIN\"}"),
            1.0
        );
    }

    assert!(
        !process.log_text().contains("queued"),
        "the log was not quiet: {}",
        process.log_text()
    );

    // Only /metrics exists.
    let (status, _, _) = http(metrics, "GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http(metrics, "POST /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");

    promtool_check(&text);
}

/// `promtool check metrics` (Prometheus's linter) on the text: no error, no lint problem.
fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        estafeta_e2e::skip("promtool not found (Debian's prometheus package; .ci/run installs it)");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {}\n{report}\n{text}",
        out.status
    );
}

/// A metrics address already in use stops the start, and the error names it.
#[test]
fn a_busy_metrics_address_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap();
    let config = dir.path().join("estafeta.toml");
    let extra = format!("[metrics]\naddress = \"{taken}\"\n");
    std::fs::write(
        &config,
        test_config(&dir.path().join("data"), free_port(), &extra),
    )
    .unwrap();
    let mut child = Command::new(estafeta_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("estafeta started on a busy metrics address");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {taken} (metrics)")),
        "{err}"
    );
}
