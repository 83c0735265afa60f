//! Milters (`[[milter]]`) with the real binary and a real milter: the scripted filter of
//! crates/milter/tests/milters/scripted.py, written with Debian's python3-milter (libmilter's
//! protocol as Sendmail and Postfix speak it), chooses what to do from the message: every
//! modification, quarantine, custom replies, discard, tempfail; and a filter that is down.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::{Client, Process, estafeta_bin, free_port, maildir_new, skip, test_config};

struct Filter {
    child: Child,
    port: u16,
}

impl Drop for Filter {
    /// Kills the filter and whatever it started (rspamd's workers): its process group.
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the group is the filter's own
        // (process_group(0) at spawn).
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/milter/tests/milters/scripted.py")
}

/// The scripted milter on a free port, `mode` "full" or "lean" (rspamd's no-reply flags).
fn filter(mode: &str) -> Option<Filter> {
    let python = Path::new("/usr/bin/python3");
    let ok = python.exists()
        && Command::new(python)
            .args(["-c", "import Milter"])
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        skip("Debian's python3-milter (/usr/bin/python3, module Milter) is not installed");
        return None;
    }
    let port = free_port();
    let child = Command::new(python)
        .arg(script())
        .arg(port.to_string())
        .arg(mode)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the milter did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Filter { child, port })
}

fn serve(dir: &Path, milters: &str) -> (Process, SocketAddr, PathBuf) {
    let port = free_port();
    let extra = format!(
        "[relay]\nmynetworks = []\n\n[[domain]]\nname = \"example.org\"\nmailboxes = \"*\"\n\n{milters}"
    );
    let config = dir.join("c.toml");
    std::fs::write(&config, test_config(&dir.join("data"), port, &extra)).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    (
        Process::serve(&config, addr, &dir.join("log")),
        addr,
        config,
    )
}

/// One transaction; the replies to each RCPT and to the end of data (or DATA).
fn send(
    addr: SocketAddr,
    helo: &str,
    from: &str,
    to: &[&str],
    message: &str,
) -> (Vec<String>, String) {
    let mut c = Client::connect(addr);
    c.set_timeout(Duration::from_secs(60));
    c.reply();
    c.cmd(&format!("EHLO {helo}"));
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    assert!(r.starts_with("250"), "{r}");
    let rcpts: Vec<String> = to
        .iter()
        .map(|t| c.cmd(&format!("RCPT TO:<{t}>")))
        .collect();
    if !rcpts.iter().any(|r| r.starts_with("250")) {
        return (rcpts, String::new());
    }
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "{r}");
    c.write(message.as_bytes());
    c.write(b".\r\n");
    let end = c.reply().join("\n");
    c.cmd("QUIT");
    (rcpts, end)
}

fn wait_log(server: &Process, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = server.log_text();
        if log.contains(what) {
            return log;
        }
        assert!(Instant::now() < deadline, "{what:?} not in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn queue(config: &Path, args: &[&str]) -> String {
    let out = Command::new(estafeta_bin())
        .arg("queue")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_milter_changes_holds_refuses_and_discards() {
    let Some(f) = filter("full") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (server, addr, config) = serve(
        dir.path(),
        &format!(
            "[[milter]]\naddress = \"inet:127.0.0.1:{}\"\ntimeout = \"10s\"\n",
            f.port
        ),
    );
    let data = dir.path().join("data");

    // Every modification, and a quarantine: held in the queue until released.
    let (rcpts, end) = send(
        addr,
        "client.example",
        "alice@example.test",
        &["bob@example.org", "carol@example.org"],
        "Subject: original\r\nX-Remove: gone\r\nX-Test: modify\r\n\r\noriginal body\r\n",
    );
    assert!(rcpts.iter().all(|r| r.starts_with("250")), "{rcpts:?}");
    assert!(end.starts_with("250 2.0.0 Ok: queued as "), "{end}");
    let id = end
        .trim_start_matches("250 2.0.0 Ok: queued as ")
        .trim()
        .to_string();
    wait_log(&server, "quarantined by a milter (held)");
    assert!(queue(&config, &["list"]).contains(&id));
    assert!(maildir_new(&data, "example.org", "carol", 1, Duration::from_millis(500)).is_empty());
    queue(&config, &["release", &id]);
    let carol = maildir_new(&data, "example.org", "carol", 1, Duration::from_secs(20));
    assert_eq!(carol.len(), 1, "{}", server.log_text());
    let text = String::from_utf8_lossy(&carol[0]).into_owned();
    assert!(
        text.contains("Return-Path: <new-sender@example.org>"),
        "{text}"
    );
    assert!(text.contains("Subject: changed subject\r\n"), "{text}");
    assert!(!text.contains("\r\nX-Remove:"), "{text}");
    assert!(text.contains("X-Top: first\r\n"), "{text}");
    assert!(
        text.contains("X-Seen-Rcpts: <bob@example.org> <carol@example.org>"),
        "{text}"
    );
    assert!(text.contains("X-Seen-Helo: client.example"), "{text}");
    assert!(text.contains("X-Seen-Macros: j=mx.test.example"), "{text}");
    assert!(
        text.ends_with("\r\n\r\nreplaced body\r\nline two\r\n"),
        "{text}"
    );
    // A recipient added, one removed.
    assert_eq!(
        maildir_new(&data, "example.org", "added", 1, Duration::from_secs(10)).len(),
        1
    );
    assert_eq!(
        maildir_new(
            &data,
            "example.org",
            "added-par",
            1,
            Duration::from_secs(10)
        )
        .len(),
        1
    );
    assert!(maildir_new(&data, "example.org", "bob", 1, Duration::from_millis(500)).is_empty());

    // Its own reply, as it wrote it.
    let (_, end) = send(
        addr,
        "client.example",
        "a@example.test",
        &["dave@example.org"],
        "X-Test: reply\r\n\r\nx\r\n",
    );
    assert_eq!(end, "554 5.7.1 Custom refusal");
    let (_, end) = send(
        addr,
        "client.example",
        "a@example.test",
        &["dave@example.org"],
        "X-Test: multiline\r\n\r\nx\r\n",
    );
    assert_eq!(end, "451-4.7.1 first line\n451 4.7.1 second line");
    // A recipient refused at RCPT, the others kept.
    let (rcpts, end) = send(
        addr,
        "client.example",
        "a@example.test",
        &["reject-rcpt@example.org", "dave@example.org"],
        "Subject: hi\r\n\r\nhello\r\n",
    );
    assert_eq!(rcpts[0], "550 5.1.1 No such user here");
    assert!(rcpts[1].starts_with("250"), "{rcpts:?}");
    assert!(end.starts_with("250 "), "{end}");
    assert_eq!(
        maildir_new(&data, "example.org", "dave", 1, Duration::from_secs(20)).len(),
        1
    );
    // Discarded: 250 for the client, nothing delivered.
    let (_, end) = send(
        addr,
        "client.example",
        "a@example.test",
        &["erin@example.org"],
        "X-Test: discard\r\n\r\nx\r\n",
    );
    assert!(end.starts_with("250 "), "{end}");
    wait_log(&server, "discarded by a milter");
    assert!(maildir_new(&data, "example.org", "erin", 1, Duration::from_millis(500)).is_empty());
    // A large message (3 MB, written to a file as it arrives): the milter sees all of its
    // body, and its header changes land above the body, which arrives whole.
    let body = "A line of a large message for the milter to read.\r\n".repeat(60_000);
    let (_, end) = send(
        addr,
        "client.example",
        "a@example.test",
        &["frank@example.org"],
        &format!("Subject: large\r\n\r\n{body}"),
    );
    assert!(end.starts_with("250 "), "{end}");
    let frank = maildir_new(&data, "example.org", "frank", 1, Duration::from_secs(20));
    assert_eq!(frank.len(), 1, "{}", server.log_text());
    let (head, got) = frank[0]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (&frank[0][..i + 4], &frank[0][i + 4..]))
        .unwrap();
    let head = String::from_utf8_lossy(head);
    assert!(
        head.contains(&format!("X-Seen-Body: {} bytes in ", body.len())),
        "{head}"
    );
    assert!(head.contains("Subject: large\r\n"), "{head}");
    assert!(got == body.as_bytes(), "the body changed on the way");
    // The same in BDAT, whose content keeps a bare LF: the empty line that ends the header
    // section is where the milter's body starts, however it is written.
    let content = format!("Subject: bdat\n\n{body}");
    let mut c = Client::connect(addr);
    c.set_timeout(Duration::from_secs(60));
    c.reply();
    c.cmd("EHLO client.example");
    assert!(c.cmd("MAIL FROM:<a@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<grace@example.org>").starts_with("250"));
    c.write(format!("BDAT {} LAST\r\n", content.len()).as_bytes());
    c.write(content.as_bytes());
    let end = c.last();
    assert!(end.starts_with("250 "), "{end}");
    let grace = maildir_new(&data, "example.org", "grace", 1, Duration::from_secs(20));
    assert_eq!(grace.len(), 1, "{}", server.log_text());
    let text = String::from_utf8_lossy(&grace[0]);
    assert!(
        text.contains(&format!("X-Seen-Body: {} bytes in ", body.len())),
        "{}",
        &text[..2000]
    );
    // Refused at HELO: the transaction's recipients are refused.
    let (rcpts, _) = send(
        addr,
        "reject.example",
        "a@example.test",
        &["dave@example.org"],
        "",
    );
    assert!(rcpts[0].starts_with("550 5.7.1"), "{rcpts:?}");
}

/// rspamd declares that it sends no reply for most steps (flags 0x000ff080): a client that
/// waited for those replies would hang. The lean mode of the scripted milter does the same.
#[test]
fn a_milter_that_answers_few_steps_is_not_waited_for() {
    let Some(f) = filter("lean") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (server, addr, _) = serve(
        dir.path(),
        &format!(
            "[[milter]]\naddress = \"inet:127.0.0.1:{}\"\ntimeout = \"5s\"\n",
            f.port
        ),
    );
    let started = Instant::now();
    let (_, end) = send(
        addr,
        "client.example",
        "a@example.test",
        &["bob@example.org"],
        "Subject: lean\r\n\r\nhello\r\n",
    );
    assert!(end.starts_with("250 "), "{end}\n{}", server.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited for replies the filter never sends"
    );
    let got = maildir_new(
        &dir.path().join("data"),
        "example.org",
        "bob",
        1,
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&got[0]).into_owned();
    assert!(text.contains("X-Seen-Rcpts: <bob@example.org>"), "{text}");
}

/// A filter that is down gets its default_action: tempfail by default, accept when set.
#[test]
fn a_milter_that_is_down_gets_its_default_action() {
    let dir = tempfile::tempdir().unwrap();
    let dead = free_port();
    let (_server, addr, _) = serve(
        dir.path(),
        &format!("[[milter]]\naddress = \"inet:127.0.0.1:{dead}\"\n"),
    );
    let (rcpts, _) = send(
        addr,
        "client.example",
        "a@example.test",
        &["bob@example.org"],
        "",
    );
    assert_eq!(rcpts[0], "451 4.7.1 Service unavailable - try again later");

    let d = tempfile::tempdir().unwrap();
    let (server, addr, _) = serve(
        d.path(),
        &format!("[[milter]]\naddress = \"inet:127.0.0.1:{dead}\"\ndefault_action = \"accept\"\n"),
    );
    let (_, end) = send(
        addr,
        "client.example",
        "a@example.test",
        &["bob@example.org"],
        "Subject: x\r\n\r\nx\r\n",
    );
    assert!(end.starts_with("250 "), "{end}");
    assert!(
        server.log_text().contains("milter failed"),
        "{}",
        server.log_text()
    );

    let d = tempfile::tempdir().unwrap();
    let (_server, addr, _) = serve(
        d.path(),
        &format!("[[milter]]\naddress = \"inet:127.0.0.1:{dead}\"\ndefault_action = \"reject\"\n"),
    );
    let (rcpts, _) = send(
        addr,
        "client.example",
        "a@example.test",
        &["bob@example.org"],
        "",
    );
    assert_eq!(rcpts[0], "550 5.7.1 Command rejected");
}

/// rspamd 3.4 (Debian's) as the milter, its proxy worker in milter mode scanning by itself,
/// from a private configuration that includes the system's rules: GTUBE is refused with
/// rspamd's own reply, a clean message is delivered with its X-Spam headers.
#[test]
fn rspamd_refuses_gtube_and_marks_clean_mail() {
    const RSPAMD: &str = "/usr/bin/rspamd";
    if !Path::new(RSPAMD).exists() {
        skip("rspamd is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rs = dir.path().join("rspamd");
    std::fs::create_dir_all(rs.join("local.d")).unwrap();
    std::fs::create_dir_all(rs.join("db")).unwrap();
    let port = free_port();
    std::fs::write(
        rs.join("rspamd.conf"),
        format!(
            r#".include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    dns {{ nameserver = ["127.0.0.1:53"]; timeout = 1s; retransmits = 1; }}
}}
logging {{ type = "console"; level = "error"; }}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 120s;
    count = 1;
    upstream "local" {{
        default = yes;
        self_scan = yes;
    }}
}}
"#
        ),
    )
    .unwrap();
    std::fs::write(
        rs.join("local.d/milter_headers.conf"),
        "use = [\"x-spamd-result\", \"x-spam-status\"];\nskip_local = false;\nskip_authenticated = false;\n",
    )
    .unwrap();
    let d = rs.display().to_string();
    let mut cmd = Command::new(RSPAMD);
    cmd.arg("-f").arg("-c").arg(rs.join("rspamd.conf"));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.args(["-u", "root", "-g", "root"]);
    }
    for (var, value) in [
        ("CONFDIR", "/etc/rspamd".to_string()),
        ("LOCAL_CONFDIR", d.clone()),
        ("DBDIR", format!("{d}/db")),
        ("RUNDIR", d.clone()),
        ("LOGDIR", d.clone()),
    ] {
        cmd.arg("--var").arg(format!("{var}={value}"));
    }
    let child = cmd
        .current_dir(&rs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("rspamd");
    let rspamd = Filter { child, port };
    // A fresh database: rspamd compiles its rules first.
    let deadline = Instant::now() + Duration::from_secs(120);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rspamd did not start");
        std::thread::sleep(Duration::from_millis(200));
    }

    let (server, addr, _) = serve(
        dir.path(),
        &format!(
            "[[milter]]\naddress = \"inet:127.0.0.1:{}\"\ntimeout = \"60s\"\n",
            rspamd.port
        ),
    );
    let gtube = "Subject: test\r\n\r\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n";
    let (_, end) = send(
        addr,
        "mail.example.net",
        "sender@example.net",
        &["bob@example.org"],
        gtube,
    );
    assert_eq!(end, "554 5.7.1 Gtube pattern", "{}", server.log_text());
    let clean = "From: Sender <sender@example.net>\r\nTo: bob@example.org\r\nSubject: lunch\r\nDate: Wed, 02 Dec 2026 12:00:00 +0000\r\nMessage-ID: <lunch@example.net>\r\n\r\nShall we have lunch on Friday?\r\n";
    let (_, end) = send(
        addr,
        "mail.example.net",
        "sender@example.net",
        &["bob@example.org"],
        clean,
    );
    assert!(end.starts_with("250 "), "{end}\n{}", server.log_text());
    let got = maildir_new(
        &dir.path().join("data"),
        "example.org",
        "bob",
        1,
        Duration::from_secs(30),
    );
    assert_eq!(got.len(), 1, "{}", server.log_text());
    let text = String::from_utf8_lossy(&got[0]).into_owned();
    assert!(text.contains("X-Spamd-Result: default: False"), "{text}");
    assert!(text.contains("X-Spam-Status: No"), "{text}");
}
