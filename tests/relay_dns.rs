//! Relaying end to end with a real DNS server and real peers on port 25: the server under test
//! (127.0.0.1:<free port>) resolves MX records from the test DNS server of `dns.rs` through
//! `[dns] nameservers`, then connects to port 25 of the loopback addresses the zones name:
//!
//! | domain | records | what listens |
//! |---|---|---|
//! | remote.test | MX 10 mx1 (127.0.0.2), MX 20 mx2 (127.0.0.3) | .2: nothing, then smtp-sink; .3: estafeta |
//! | a-only.test | A 127.0.0.3 (implicit MX) | estafeta |
//! | null-mx.test | MX 0 . (RFC 7505) | — |
//! | dead-mx.test | MX 10 → 127.0.0.4 | nothing |
//! | stall.test | MX 10 → 127.0.0.5 | a peer that stalls after DATA |
//! | anything else | NXDOMAIN | — |
//!
//! Bounces go to the local sender alice@example.test and are read from her Maildir with
//! mail-parser. Tests that bind port 25 use distinct addresses, so they may run in parallel.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estafeta_e2e::dns::{DnsServer, Zones};
use estafeta_e2e::{Process, free_port, maildir_new};
use mail_parser::{MessageParser, MessagePart, MimeHeaders};

/// The zones of the table above.
fn zones() -> Zones {
    Zones::new()
        .mx("remote.test", 10, "mx1.remote.test")
        .mx("remote.test", 20, "mx2.remote.test")
        .a("mx1.remote.test", "127.0.0.2")
        .a("mx2.remote.test", "127.0.0.3")
        .a("a-only.test", "127.0.0.3")
        .mx("null-mx.test", 0, ".")
        .mx("dead-mx.test", 10, "mx.dead-mx.test")
        .a("mx.dead-mx.test", "127.0.0.4")
        .mx("stall.test", 10, "mx.stall.test")
        .a("mx.stall.test", "127.0.0.5")
}

/// Polls `done` every 50 ms for at most `secs` seconds; panics with `what()` when time is up.
fn wait_until(secs: u64, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {}", what());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether this process may bind port 25 (root, or CAP_NET_BIND_SERVICE); CI runs as root.
/// Tests that need it are skipped, with a note, when it may not.
fn may_bind_port_25(test: &str) -> bool {
    match TcpListener::bind("127.0.0.254:25") {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            estafeta_e2e::skip(&format!(
                "{test}: binding port 25 needs root or CAP_NET_BIND_SERVICE"
            ));
            false
        }
        _ => true,
    }
}

/// Nothing may listen on port 25 of `ip` before the test puts its own peer there: a system
/// MTA (Debian's Postfix started by its package) would take the mail instead.
fn assert_port_25_free(ip: &str) {
    let addr: SocketAddr = format!("{ip}:25").parse().unwrap();
    if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
        panic!(
            "something already listens on {addr}: these tests need port 25 of 127.0.0.2-5 \
             free (is a system Postfix or another MTA running? stop it)"
        );
    }
}

/// The server under test: SMTP on 127.0.0.1, the test DNS server, 127.0.0.1 in mynetworks,
/// every local part of example.test a mailbox, retries every second. `queue` is added to the
/// `[queue]` table.
struct Sender {
    dir: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
    process: Option<Process>,
    starts: usize,
}

impl Sender {
    fn start(dir: &Path, dns: &DnsServer, queue: &str) -> Sender {
        let port = free_port();
        let data = dir.join("sender");
        let config = dir.join("sender.toml");
        std::fs::write(
            &config,
            format!(
                r#"hostname = "mx.sender.test"
data_dir = "{data}"
run_as_root = true
[log]
level = "info"
[[listener]]
kind = "smtp"
address = "127.0.0.1:{port}"
[relay]
mynetworks = ["127.0.0.1/32"]
[dns]
nameservers = ["{dns}"]
[[domain]]
name = "example.test"
mailboxes = "*"
[queue]
retry = ["1s"]
{queue}
"#,
                data = data.display(),
                dns = dns.addr,
            ),
        )
        .unwrap();
        let mut s = Sender {
            dir: dir.to_path_buf(),
            config,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            process: None,
            starts: 0,
        };
        s.restart();
        s
    }

    /// Starts (again) on the same data directory, logging into a new file.
    fn restart(&mut self) {
        self.starts += 1;
        let log = self.dir.join(format!("sender-{}.log", self.starts));
        self.process = Some(Process::serve(&self.config, self.addr, &log));
    }

    fn data(&self) -> PathBuf {
        self.dir.join("sender")
    }

    /// The log of the current run.
    fn log(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill9();
        }
    }

    /// Submits one message as a mynetworks client; returns its queue ID.
    fn send(&self, from: &str, to: &[&str], subject: &str) -> String {
        estafeta_e2e::submit(
            self.addr,
            from,
            to,
            format!("From: <{from}>\r\nSubject: {subject}\r\n\r\nthe body of {subject}\r\n")
                .as_bytes(),
        )
    }

    /// Waits until the log has `n` lines containing `what`.
    fn wait_log(&self, what: &str, n: usize, secs: u64) {
        wait_until(
            secs,
            || self.log().matches(what).count() >= n,
            || format!("{n}× {what:?} in the log:\n{}", self.log()),
        );
    }

    /// Waits until the log has a line containing every one of `parts`.
    fn wait_line(&self, parts: &[&str], secs: u64) {
        wait_until(
            secs,
            || {
                self.log()
                    .lines()
                    .any(|l| parts.iter().all(|p| l.contains(p)))
            },
            || format!("a line with {parts:?} in the log:\n{}", self.log()),
        );
    }

    /// alice's Maildir (where bounces land), waiting for at least `n` messages.
    fn alice(&self, n: usize, secs: u64) -> Vec<Vec<u8>> {
        maildir_new(
            &self.data(),
            "example.test",
            "alice",
            n,
            Duration::from_secs(secs),
        )
    }
}

/// An estafeta peer on port 25 of `ip`, receiving mail for `domains` (every local part).
fn peer(dir: &Path, ip: &str, hostname: &str, domains: &[&str], dns: &DnsServer) -> Process {
    assert_port_25_free(ip);
    let data = dir.join(hostname);
    let mut text = format!(
        r#"hostname = "{hostname}"
data_dir = "{data}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "{ip}:25"
[relay]
mynetworks = []
[dns]
nameservers = ["{dns}"]
"#,
        data = data.display(),
        dns = dns.addr,
    );
    for d in domains {
        text.push_str(&format!("[[domain]]\nname = \"{d}\"\nmailboxes = \"*\"\n"));
    }
    let config = dir.join(format!("{hostname}.toml"));
    std::fs::write(&config, text).unwrap();
    Process::serve(
        &config,
        format!("{ip}:25").parse().unwrap(),
        &dir.join(format!("{hostname}.log")),
    )
}

/// The delivery-status part as field groups (per-message first, then one per recipient),
/// each read by mail-parser as a header block; values unfolded.
fn status_groups(part: &MessagePart) -> Vec<Vec<(String, String)>> {
    let text = part.text_contents().expect("the delivery status is text");
    text.split("\r\n\r\n")
        .filter(|g| !g.trim().is_empty())
        .map(|group| {
            let block = format!("{}\r\n\r\n", group.trim_end());
            MessageParser::default()
                .parse_headers(block.as_bytes())
                .expect("a field group")
                .headers_raw()
                .map(|(k, v)| {
                    let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
                    (k.to_string(), v)
                })
                .collect()
        })
        .collect()
}

fn field<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn ctype(part: &MessagePart) -> String {
    let ct = part.content_type().expect("a Content-Type");
    format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
}

/// What one delivery status notification says about its single recipient.
#[derive(Debug)]
struct Report {
    action: String,
    status: String,
    final_recipient: String,
    diagnostic: String,
}

/// Checks the RFC 3464 structure of a notification delivered to alice (from `<>`, a
/// multipart/report with a text part, a message/delivery-status part whose per-message group
/// names this server, and the original's headers) and returns its recipient group.
fn report(raw: &[u8], original_subject: &str) -> Report {
    let text = String::from_utf8_lossy(raw);
    assert!(text.starts_with("Return-Path: <>\r\n"), "{text}");
    let msg = MessageParser::default()
        .parse(raw)
        .unwrap_or_else(|| panic!("mail-parser cannot read the report:\n{text}"));
    let ct = msg.content_type().expect("Content-Type");
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("multipart", Some("report")),
        "{text}"
    );
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    assert_eq!(
        msg.header_raw("To").map(str::trim),
        Some("<alice@example.test>")
    );
    let ids = msg.parts[0].sub_parts().expect("a multipart");
    let parts: Vec<&MessagePart> = ids.iter().map(|&i| msg.part(i).unwrap()).collect();
    assert_eq!(parts.len(), 3, "text, status, original: {text}");
    assert_eq!(ctype(parts[0]), "text/plain");
    assert_eq!(ctype(parts[1]), "message/delivery-status");
    let original = ctype(parts[2]);
    assert!(
        original == "text/rfc822-headers" || original == "message/rfc822",
        "{original}"
    );
    let returned = String::from_utf8_lossy(parts[2].contents());
    assert!(
        returned.contains(&format!("Subject: {original_subject}")),
        "the original's headers come back: {returned}"
    );
    let groups = status_groups(parts[1]);
    assert_eq!(groups.len(), 2, "one per-message and one recipient group");
    assert_eq!(
        field(&groups[0], "Reporting-MTA"),
        Some("dns; mx.sender.test")
    );
    assert!(field(&groups[0], "Arrival-Date").is_some());
    let r = &groups[1];
    let get = |name: &str| field(r, name).unwrap_or_default().to_string();
    Report {
        action: get("Action"),
        status: get("Status"),
        final_recipient: get("Final-Recipient"),
        diagnostic: get("Diagnostic-Code"),
    }
}

/// The queue files of the spool (named by their 12-character ID).
fn queued(data: &Path) -> usize {
    std::fs::read_dir(data.join("queue"))
        .map(|rd| {
            rd.filter(|e| e.as_ref().unwrap().file_name().len() == 12)
                .count()
        })
        .unwrap_or(0)
}

/// Waits until the spool is empty (notifications included: each is removed just after its
/// delivery).
fn wait_spool_empty(sender: &Sender) {
    wait_until(
        5,
        || queued(&sender.data()) == 0,
        || format!("an empty spool: {}", sender.log()),
    );
}

/// Postfix's smtp-sink on port 25 of `ip`, dumping each transaction into its own file under
/// `dir`. Killed on drop.
struct SmtpSink {
    child: Child,
    dir: PathBuf,
}

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

impl SmtpSink {
    fn start(ip: &str, dir: &Path) -> SmtpSink {
        assert_port_25_free(ip);
        std::fs::create_dir_all(dir).unwrap();
        // -u: required as root (the user it switches to after binding); -d: one file per
        // transaction, named by the strftime template plus a random suffix; 100: backlog.
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let user = if unsafe { libc::geteuid() } == 0 {
            "root".to_string()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "nobody".into())
        };
        let child = Command::new(SMTP_SINK)
            .args(["-u", &user, "-d"])
            .arg(format!("{}/%M.", dir.display()))
            .arg(format!("{ip}:25"))
            .arg("100")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn smtp-sink");
        let mut sink = SmtpSink {
            child,
            dir: dir.to_path_buf(),
        };
        let addr: SocketAddr = format!("{ip}:25").parse().unwrap();
        wait_until(
            10,
            || {
                if let Ok(Some(status)) = sink.child.try_wait() {
                    panic!("smtp-sink exited: {status}");
                }
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            },
            || format!("smtp-sink listening on {addr}"),
        );
        sink
    }

    /// The dumped transactions so far.
    fn dumps(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// remote.test's first MX is down, so its second one (an estafeta peer) gets the mail, over
/// STARTTLS; a domain with only an A record gets mail there too (implicit MX); once a
/// third-party MTA (Postfix's smtp-sink) listens on the first MX, mail goes to it.
#[test]
fn mx_preference_implicit_mx_starttls_and_a_third_party_peer() {
    if !may_bind_port_25("mx_preference_implicit_mx_starttls_and_a_third_party_peer") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start(zones());
    assert_port_25_free("127.0.0.2");
    let mx2 = peer(
        dir.path(),
        "127.0.0.3",
        "mx2.remote.test",
        &["remote.test", "a-only.test"],
        &dns,
    );
    let sender = Sender::start(dir.path(), &dns, "");
    let logs = || format!("sender:\n{}\nmx2:\n{}", sender.log(), mx2.log_text());

    sender.send("alice@example.test", &["user@remote.test"], "via mx2");
    let got = maildir_new(
        &dir.path().join("mx2.remote.test"),
        "remote.test",
        "user",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(got.len(), 1, "{}", logs());
    let m = String::from_utf8_lossy(&got[0]).into_owned();
    // The peer's Received header: the sender came in over STARTTLS.
    assert!(
        m.contains("by mx2.remote.test (estafeta) with ESMTPS"),
        "{m}"
    );
    assert!(m.contains("(using TLSv1.3"), "{m}");
    assert!(m.contains("by mx.sender.test (estafeta) with ESMTP"), "{m}");
    assert!(m.contains("the body of via mx2"), "{m}");
    // The first MX was tried first, on port 25.
    sender.wait_log("to=user@remote.test status=\"sent\"", 1, 5);
    let log = sender.log();
    let tried = log
        .lines()
        .find(|l| l.contains("trying the next host"))
        .unwrap_or_else(|| panic!("{}", logs()));
    assert!(tried.contains("127.0.0.2:25"), "{tried}");

    // A domain with only an address record: that address is its MX (RFC 5321 §5.1).
    sender.send("alice@example.test", &["bob@a-only.test"], "implicit mx");
    let got = maildir_new(
        &dir.path().join("mx2.remote.test"),
        "a-only.test",
        "bob",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(got.len(), 1, "{}", logs());
    assert!(String::from_utf8_lossy(&got[0]).contains("the body of implicit mx"));

    // A third-party peer on the first MX takes the next message.
    if !Path::new(SMTP_SINK).exists() {
        estafeta_e2e::skip(&format!(
            "the smtp-sink part: {SMTP_SINK} is missing (Debian's postfix package)"
        ));
        return;
    }
    let sink = SmtpSink::start("127.0.0.2", &dir.path().join("sink"));
    sender.send(
        "alice@example.test",
        &["carol@remote.test"],
        "via smtp-sink",
    );
    let mut dump = String::new();
    wait_until(
        15,
        || match sink
            .dumps()
            .into_iter()
            .find(|d| d.contains("the body of via smtp-sink"))
        {
            Some(d) => {
                dump = d;
                true
            }
            None => false,
        },
        || format!("smtp-sink received the message; {}", logs()),
    );
    assert!(dump.contains("X-Rcpt-Args: <carol@remote.test>"), "{dump}");
    assert!(dump.contains("X-Mail-Args: <alice@example.test>"), "{dump}");
    assert!(dump.contains("by mx.sender.test (estafeta)"), "{dump}");
    sender.wait_log("to=carol@remote.test status=\"sent\"", 1, 5);
    // …and the second MX did not see it.
    assert!(
        !dir.path()
            .join("mx2.remote.test/mail/remote.test/carol")
            .exists()
    );
}

/// Permanent DNS answers bounce at once: a null MX (556 5.1.10, RFC 7505) and NXDOMAIN
/// (5.1.2). A message from `<>` is never bounced.
#[test]
fn null_mx_and_nxdomain_bounce_at_once_but_never_to_the_null_sender() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start(zones());
    let sender = Sender::start(dir.path(), &dns, "");

    sender.send("alice@example.test", &["user@null-mx.test"], "to null mx");
    let got = sender.alice(1, 10);
    assert_eq!(got.len(), 1, "{}", sender.log());
    let r = report(&got[0], "to null mx");
    assert_eq!(r.action, "failed");
    assert_eq!(r.status, "5.1.10");
    assert_eq!(r.final_recipient, "rfc822; user@null-mx.test");
    assert!(r.diagnostic.contains("556"), "{r:?}");
    // At once: one attempt, no deferral.
    let log = sender.log();
    assert_eq!(log.matches("to=user@null-mx.test").count(), 1, "{log}");
    assert!(!log.contains("to=user@null-mx.test status=\"deferred\""));

    sender.send(
        "alice@example.test",
        &["nobody@nxdomain.test"],
        "to nowhere",
    );
    let got = sender.alice(2, 10);
    assert_eq!(got.len(), 2, "{}", sender.log());
    let raw = got
        .iter()
        .find(|m| String::from_utf8_lossy(m).contains("Subject: to nowhere"))
        .unwrap_or_else(|| panic!("no bounce for nxdomain.test: {}", sender.log()));
    let r = report(raw, "to nowhere");
    assert_eq!(r.final_recipient, "rfc822; nobody@nxdomain.test");
    assert_eq!(r.action, "failed");
    assert_eq!(r.status, "5.1.2");
    assert!(
        !sender
            .log()
            .contains("to=nobody@nxdomain.test status=\"deferred\"")
    );

    // A notification to the null-MX domain fails too, and nobody is told.
    let id = sender.send("", &["daemon@null-mx.test"], "bounce of a bounce");
    sender.wait_log("to=daemon@null-mx.test status=\"bounced\"", 1, 10);
    let id = format!("id={id}");
    sender.wait_line(&["no notification", &id], 5);
    sender.wait_line(&["removed", &id], 5);
    assert_eq!(sender.alice(3, 1).len(), 2, "no third message for alice");
    let mailboxes: Vec<_> = std::fs::read_dir(sender.data().join("mail/example.test"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(mailboxes, ["alice"], "no Maildir but alice's");
    wait_spool_empty(&sender);
}

/// The only MX of dead-mx.test refuses connections: the message stays queued with its reason,
/// is retried on schedule, a delay warning goes out after `delay_warning`, and after
/// `max_lifetime` it bounces (5.4.7).
#[test]
fn dead_mx_is_retried_then_expires_into_a_bounce() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start(zones());
    assert_port_25_free("127.0.0.4");
    let sender = Sender::start(
        dir.path(),
        &dns,
        "max_lifetime = \"5s\"\ndelay_warning = \"2s\"",
    );
    let started = Instant::now();
    let id = sender.send(
        "alice@example.test",
        &["carol@dead-mx.test"],
        "to a dead mx",
    );
    sender.wait_log("to=carol@dead-mx.test status=\"deferred\"", 2, 10);
    // Still queued, with the reason on record in its state file.
    let queue = sender.data().join("queue");
    assert!(queue.join(&id).exists(), "{}", sender.log());
    let state = std::fs::read_to_string(queue.join(format!("{id}.st"))).unwrap();
    let rcpt = state
        .lines()
        .find(|l| l.starts_with("rcpt 0 "))
        .unwrap_or_else(|| panic!("{state}"));
    assert!(rcpt.starts_with("rcpt 0 pending "), "{state}");
    assert!(rcpt.contains("4.4."), "a temporary reason: {state}");
    let log = sender.log();
    let deferred = log
        .lines()
        .find(|l| l.contains("to=carol@dead-mx.test status=\"deferred\""))
        .unwrap();
    assert!(deferred.contains("reason="), "{deferred}");
    assert!(
        log.contains("address=127.0.0.4:25"),
        "the MX was tried on port 25: {log}"
    );

    // The lifetime ends: a failure report (after one delay warning).
    sender.wait_log("to=carol@dead-mx.test status=\"expired\"", 1, 15);
    // Whole seconds since arrival: "5s" may end a little after 4 s of real time.
    assert!(started.elapsed() >= Duration::from_secs(4));
    let got = sender.alice(2, 10);
    let reports: Vec<Report> = got.iter().map(|m| report(m, "to a dead mx")).collect();
    let failed: Vec<&Report> = reports.iter().filter(|r| r.action == "failed").collect();
    assert_eq!(failed.len(), 1, "{reports:?}\n{}", sender.log());
    assert_eq!(failed[0].status, "5.4.7");
    assert_eq!(failed[0].final_recipient, "rfc822; carol@dead-mx.test");
    let delayed: Vec<&Report> = reports.iter().filter(|r| r.action == "delayed").collect();
    assert_eq!(delayed.len(), 1, "{reports:?}");
    assert!(delayed[0].status.starts_with("4."), "{reports:?}");
    assert!(
        sender
            .log()
            .matches("to=carol@dead-mx.test status=\"deferred\"")
            .count()
            >= 3,
        "retried every second or so for five seconds: {}",
        sender.log()
    );
    sender.wait_line(&["removed", &format!("id={id}")], 5);
    wait_spool_empty(&sender);
}

/// A peer that answers everything up to the end of DATA, then, until told otherwise, never
/// answers the final dot (a delivery in flight that the test can interrupt).
struct StallingPeer {
    /// Each complete message it received (the DATA content).
    received: Arc<Mutex<Vec<String>>>,
    /// When set, the final dot is answered 250.
    answer: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl StallingPeer {
    fn start(ip: &str) -> StallingPeer {
        assert_port_25_free(ip);
        let listener = TcpListener::bind((ip, 25))
            .unwrap_or_else(|e| panic!("cannot bind {ip}:25 for the stalling peer: {e}"));
        listener.set_nonblocking(true).unwrap();
        let peer = StallingPeer {
            received: Arc::default(),
            answer: Arc::default(),
            stop: Arc::default(),
        };
        let (received, answer, stop) = (
            peer.received.clone(),
            peer.answer.clone(),
            peer.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (received, answer) = (received.clone(), answer.clone());
                        std::thread::spawn(move || {
                            let _ = serve_stalling(stream, &received, &answer);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        peer
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

impl Drop for StallingPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_stalling(
    stream: TcpStream,
    received: &Mutex<Vec<String>>,
    answer: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    // Bounds every wait of this thread, the stall included.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = stream.try_clone()?;
    let mut lines = BufReader::new(stream);
    out.write_all(b"220 mx.stall.test ESMTP\r\n")?;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-mx.stall.test\r\n250 8BITMIME\r\n",
            "HELO" | "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 2.0.0 Ok\r\n",
            "QUIT" => {
                out.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            "DATA" => {
                out.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if lines.read_line(&mut line)? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(&line);
                }
                received.lock().unwrap().push(data);
                if !answer.load(Ordering::Relaxed) {
                    // Stall until the client goes away (killed) or the read times out.
                    while lines.read_line(&mut line)? != 0 {}
                    return Ok(());
                }
                b"250 2.0.0 Ok: kept\r\n"
            }
            _ => b"502 5.5.2 Not implemented\r\n",
        };
        out.write_all(reply)?;
    }
}

/// `kill -9` while a remote delivery is in flight (the peer has the whole message but has not
/// answered the final dot), then a restart on the same data: the local recipient, delivered
/// before the crash, is not delivered again; the remote one reaches the peer (at least once).
#[test]
fn kill9_during_a_remote_delivery_loses_nothing_and_repeats_no_local_delivery() {
    if !may_bind_port_25("kill9_during_a_remote_delivery") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start(zones());
    let peer = StallingPeer::start("127.0.0.5");
    let mut sender = Sender::start(dir.path(), &dns, "");
    let id = sender.send(
        "alice@example.test",
        &["bob@example.test", "carol@stall.test"],
        "crash in flight",
    );
    // bob: delivered at once; carol: the peer has the message and stalls.
    let bob = || {
        maildir_new(
            &sender.data(),
            "example.test",
            "bob",
            1,
            Duration::from_secs(10),
        )
    };
    assert_eq!(bob().len(), 1, "{}", sender.log());
    wait_until(
        10,
        || peer.count() >= 1,
        || format!("the peer received the message; {}", sender.log()),
    );
    sender.kill9();

    peer.answer.store(true, Ordering::Relaxed);
    sender.restart();
    sender.wait_log("to=carol@stall.test status=\"sent\"", 1, 15);
    sender.wait_line(&["removed", &format!("id={id}")], 5);
    assert!(peer.count() >= 2, "at least once more after the restart");
    assert!(
        peer.received
            .lock()
            .unwrap()
            .iter()
            .all(|m| m.contains("the body of crash in flight"))
    );
    let bobs = maildir_new(
        &sender.data(),
        "example.test",
        "bob",
        2,
        Duration::from_millis(500),
    );
    assert_eq!(
        bobs.len(),
        1,
        "bob's copy was delivered before the crash and must not be delivered again:\n{}",
        sender.log()
    );
    assert!(
        !sender.log().contains("to=bob@example.test"),
        "{}",
        sender.log()
    );
    // Nothing failed, so alice got no notification.
    assert!(sender.alice(1, 0).is_empty());
    wait_spool_empty(&sender);
}
