//! End-to-end tests with the real `estafeta` binary: every test starts its own server process
//! (`estafeta serve --config FILE` on a free port, data in its own temporary directory) and
//! talks to it over real TCP, with a raw client or with Python's smtplib, then looks at the
//! Maildir folders and the spool on disk.
//!
//! Every wait is bounded; a failure prints the server's log.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Client, Process, estafeta_bin, free_port, maildir_new, strip_trace, test_config,
};
use tempfile::TempDir;

/// How long a delivery may take before a test gives up.
const DELIVERY_WAIT: Duration = Duration::from_secs(10);

/// The host name every test configuration gives the server.
const HOST: &str = "mx.test.example";

// ---- helpers ---------------------------------------------------------------------------------

/// Fails the test with `msg` and the server's log.
macro_rules! ensure {
    ($srv:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            panic!("{}\n{}", format_args!($($msg)+), $srv.logs());
        }
    };
}

/// `assert_eq!` that also prints the server's log.
macro_rules! ensure_eq {
    ($srv:expr, $left:expr, $right:expr $(,)?) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            panic!(
                "assertion `left == right` failed: {}\n  left: {:?}\n right: {:?}\n{}",
                stringify!($left),
                l,
                r,
                $srv.logs()
            );
        }
    }};
}

/// A running server: its data directory (which also holds its config and logs) and process.
struct Server {
    dir: TempDir,
    config: PathBuf,
    extra: String,
    proc: Process,
    /// How many processes were started in this directory (names the log files).
    starts: usize,
}

impl Server {
    /// Starts the binary with [`test_config`] + `extra` in a new temporary directory.
    fn start(extra: &str) -> Server {
        Server::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// Starts the binary with its data in `dir` (prepared by the caller).
    fn start_in(dir: TempDir, extra: &str) -> Server {
        let config = dir.path().join("estafeta.toml");
        let proc = spawn(dir.path(), &config, extra, 1);
        Server {
            dir,
            config,
            extra: extra.to_string(),
            proc,
            starts: 1,
        }
    }

    /// Starts the binary again in the same directory, with the same configuration (and the same
    /// port, unless that port was taken in between). The previous process must be gone.
    fn restart(&mut self) {
        assert!(
            self.proc.child.try_wait().unwrap().is_some(),
            "restart while running"
        );
        self.starts += 1;
        self.proc = spawn(self.dir.path(), &self.config, &self.extra, self.starts);
    }

    fn data(&self) -> &Path {
        self.dir.path()
    }

    fn addr(&self) -> SocketAddr {
        self.proc.addr
    }

    /// Every log this directory's processes wrote, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let path = self.dir.path().join(format!("server{n}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            out.push_str(&format!("--- server log {} ---\n{text}", path.display()));
        }
        out
    }

    /// A connected client that has read the greeting.
    fn client(&self) -> Client {
        let mut c = Client::connect(self.addr());
        let greeting = c.last();
        ensure_eq!(self, greeting, format!("220 {HOST} ESMTP estafeta"));
        c
    }

    /// Sends one message (EHLO, MAIL, RCPT…, DATA) on a fresh connection and returns the
    /// queue ID from the `250` reply. `body` is written as is and must end with CRLF.
    fn send(&self, from: &str, rcpts: &[&str], body: &[u8]) -> String {
        let mut c = self.client();
        self.expect_reply(&mut c, "EHLO client.example", "250 CHUNKING");
        self.expect_reply(&mut c, &format!("MAIL FROM:<{from}>"), "250 2.1.0 Ok");
        for r in rcpts {
            self.expect_reply(&mut c, &format!("RCPT TO:<{r}>"), "250 2.1.5 Ok");
        }
        self.expect_reply(&mut c, "DATA", "354 End data with <CR><LF>.<CR><LF>");
        c.write(body);
        c.write(b".\r\n");
        let id = self.queued_id(&c.last());
        self.expect_reply(&mut c, "QUIT", "221 2.0.0 Bye");
        id
    }

    /// Sends `command` and checks the last line of the reply.
    fn expect_reply(&self, c: &mut Client, command: &str, want: &str) {
        let got = c.cmd(command);
        ensure!(self, got == want, "{command:?}: got {got:?}, want {want:?}");
    }

    /// The queue ID of a `250 2.0.0 Ok: queued as ID` reply (12 upper-case hex digits).
    fn queued_id(&self, reply: &str) -> String {
        let id = reply.strip_prefix("250 2.0.0 Ok: queued as ");
        let ok = id.is_some_and(|id| {
            id.len() == 12
                && id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
        });
        ensure!(self, ok, "not a `queued as` reply: {reply:?}");
        id.unwrap().to_string()
    }

    /// Messages (file names of 12 hex digits) in the spool.
    fn spool(&self) -> Vec<String> {
        spool_files(self.data())
            .into_iter()
            .filter(|n| n.len() == 12 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect()
    }

    /// Waits (bounded) until the spool holds no message.
    fn wait_spool_empty(&self) {
        let empty = wait_until(DELIVERY_WAIT, || self.spool().is_empty());
        ensure!(
            self,
            empty,
            "spool not emptied: {:?}",
            spool_files(self.data())
        );
    }

    /// The delivered messages of `user@domain`, waiting for at least `at_least`.
    fn mailbox(&self, domain: &str, user: &str, at_least: usize) -> Vec<Vec<u8>> {
        let wait = if at_least == 0 {
            Duration::ZERO
        } else {
            DELIVERY_WAIT
        };
        let got = maildir_new(self.data(), domain, user, at_least, wait);
        ensure!(
            self,
            got.len() >= at_least,
            "{user}@{domain}: {} message(s) delivered, want at least {at_least}",
            got.len()
        );
        got
    }
}

/// Writes the config (on a free port) and starts `estafeta serve --config`. Should the port be
/// taken between [`free_port`] and the server's bind (another test's client, say), tries again
/// on another port.
fn spawn(dir: &Path, config: &Path, extra: &str, start: usize) -> Process {
    let log = dir.join(format!("server{start}.log"));
    for _attempt in 0..3 {
        let port = free_port();
        std::fs::write(config, test_config(dir, port, extra)).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match catch_unwind(AssertUnwindSafe(|| Process::serve(config, addr, &log))) {
            Ok(p) => return p,
            Err(e) => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if !text.contains("in use") {
                    std::panic::resume_unwind(e);
                }
            }
        }
    }
    panic!("could not find a free port for estafeta");
}

/// File names in `<data>/queue` (empty when it does not exist).
fn spool_files(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("queue"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                // The spool's lock file and its pool of emptied files are not messages.
                .filter(|name| name != ".lock" && name != "free")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Polls `cond` every 20 ms for at most `wait`; true when it held.
fn wait_until(wait: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The files in `dir` sorted by name, waiting up to `wait` for at least `at_least`.
fn files_in(dir: &Path, at_least: usize, wait: Duration) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    wait_until(wait, || {
        names = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        names.len() >= at_least
    });
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Waits for `child` to exit, killing it after `limit`.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion within `limit`: (status, stdout, stderr).
fn run(cmd: &mut Command, limit: Duration) -> (ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let status = wait_exit(&mut child, limit);
    let out = std::fs::read_to_string(&out).unwrap_or_default();
    let err = std::fs::read_to_string(&err).unwrap_or_default();
    match status {
        Some(s) => (s, out, err),
        None => panic!("{cmd:?} did not finish within {limit:?}\nstdout: {out}\nstderr: {err}"),
    }
}

/// `bytes` with CR, LF and non-UTF-8 octets made visible, for failure messages.
fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

// ---- 1. a real client: Python's smtplib ------------------------------------------------------

#[test]
fn python_smtplib_sends_to_two_recipients() {
    if let Err(e) = Command::new("python3").arg("--version").output() {
        println!("SKIPPED: python3 is not available ({e})");
        return;
    }
    let srv = Server::start("");
    let sent_file = srv.data().join("sent.eml");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/send_smtplib.py");
    let port = srv.addr().port().to_string();
    let (status, out, err) = run(
        Command::new("python3")
            .arg(&script)
            .args(["127.0.0.1", &port])
            .arg(&sent_file),
        Duration::from_secs(20),
    );
    ensure!(
        srv,
        status.success(),
        "send_smtplib.py: {status}\nstdout: {out}\nstderr: {err}"
    );
    let sent = std::fs::read(&sent_file).unwrap();
    assert!(
        sent.windows(3).any(|w| w == b"\n.\r"),
        "the script sends a lone-dot line"
    );
    for (domain, user) in [("localhost", "bob"), ("example.test", "carol")] {
        let got = srv.mailbox(domain, user, 1);
        ensure_eq!(srv, got.len(), 1);
        let body = strip_trace(&got[0]);
        ensure!(
            srv,
            body == sent,
            "{user}@{domain}: stored message differs from what smtplib sent\n stored: {}\n   sent: {}\nsmtplib dialogue:\n{err}",
            show(&body),
            show(&sent)
        );
        let head = String::from_utf8_lossy(&got[0]);
        ensure!(
            srv,
            head.starts_with("Return-Path: <alice@example.test>\r\n"),
            "{head}"
        );
        ensure!(
            srv,
            head.contains(&format!("Delivered-To: {user}@{domain}\r\n")),
            "{head}"
        );
        ensure!(
            srv,
            head.contains("Received: from smtplib.example (localhost [127.0.0.1])"),
            "{head}"
        );
    }
    srv.wait_spool_empty();
}

// ---- 2. netcat: commands ending in bare LF ---------------------------------------------------

#[test]
fn bare_lf_commands_get_correct_replies() {
    let srv = Server::start("");
    let mut c = Client::connect(srv.addr());
    ensure_eq!(srv, c.last(), format!("220 {HOST} ESMTP estafeta"));
    let mut step = |cmd: &str, want: &[&str]| {
        c.write(format!("{cmd}\n").as_bytes());
        let got = c.reply();
        ensure_eq!(
            srv,
            got,
            want.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        );
    };
    step(
        "EHLO nc.example",
        &[
            "250-mx.test.example",
            "250-PIPELINING",
            "250-SIZE 26214400",
            "250-STARTTLS",
            "250-ETRN",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-DSN",
            "250-SMTPUTF8",
            "250 CHUNKING",
        ],
    );
    step("MAIL FROM:<alice@example.test>", &["250 2.1.0 Ok"]);
    step("RCPT TO:<bob@localhost>", &["250 2.1.5 Ok"]);
    step("NOOP", &["250 2.0.0 Ok"]);
    step("RSET", &["250 2.0.0 Ok"]);
    // RSET really ended the transaction: a new MAIL is accepted, RCPT works again.
    step("MAIL FROM:<carol@example.test>", &["250 2.1.0 Ok"]);
    step("RCPT TO:<dave@localhost>", &["250 2.1.5 Ok"]);
    step("QUIT", &["221 2.0.0 Bye"]);
    ensure!(srv, c.is_closed(), "connection still open after QUIT");
}

// ---- 3. nc -C: the README dialogue ("Try it with telnet"), reply by reply ------------------

#[test]
fn readme_dialogue_exact_replies_and_trace_headers() {
    let srv = Server::start("");
    let mut c = Client::connect(srv.addr());
    let step = |c: &mut Client, cmd: Option<&str>, want: &[&str]| -> Vec<String> {
        if let Some(cmd) = cmd {
            c.line(cmd);
        }
        let got = c.reply();
        let ok = got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| match w.strip_suffix('*') {
                    Some(prefix) => g.starts_with(prefix),
                    None => g == w,
                });
        ensure!(srv, ok, "{cmd:?}: got {got:?}, want {want:?}");
        got
    };
    step(&mut c, None, &["220 mx.test.example ESMTP estafeta"]);
    step(
        &mut c,
        Some("EHLO client.example"),
        &[
            "250-mx.test.example",
            "250-PIPELINING",
            "250-SIZE 26214400",
            "250-STARTTLS",
            "250-ETRN",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-DSN",
            "250-SMTPUTF8",
            "250 CHUNKING",
        ],
    );
    step(
        &mut c,
        Some("MAIL FROM:<alice@example.test>"),
        &["250 2.1.0 Ok"],
    );
    step(
        &mut c,
        Some("RCPT TO:<bob@localhost> NOTIFY=SUCCESS,FAILURE"),
        &["250 2.1.5 Ok"],
    );
    step(
        &mut c,
        Some("DATA"),
        &["354 End data with <CR><LF>.<CR><LF>"],
    );
    c.line("Subject: hi");
    c.line("");
    c.line("Hello Bob.");
    let queued = step(&mut c, Some("."), &["250 2.0.0 Ok: queued as *"]);
    let id = srv.queued_id(&queued[0]);
    step(&mut c, Some("QUIT"), &["221 2.0.0 Bye"]);
    ensure!(srv, c.is_closed(), "connection still open after QUIT");

    let got = srv.mailbox("localhost", "bob", 1);
    ensure_eq!(srv, got.len(), 1);
    let text = String::from_utf8(got[0].clone()).unwrap();
    let want_head = format!(
        "Return-Path: <alice@example.test>\r\n\
         Delivered-To: bob@localhost\r\n\
         Received: from client.example (localhost [127.0.0.1])\r\n\
         \tby mx.test.example (estafeta) with ESMTP id {id}\r\n\
         \tfor <bob@localhost>; "
    );
    ensure!(
        srv,
        text.starts_with(&want_head),
        "trace headers:\n{text}\nwant:\n{want_head}"
    );
    let (date, rest) = text[want_head.len()..].split_once("\r\n").unwrap();
    ensure!(
        srv,
        date.len() > 20 && date.contains(':'),
        "date of the Received header: {date:?}"
    );
    ensure_eq!(srv, rest, "Subject: hi\r\n\r\nHello Bob.\r\n");
    ensure_eq!(
        srv,
        strip_trace(&got[0]),
        b"Subject: hi\r\n\r\nHello Bob.\r\n".to_vec()
    );
}

// ---- 4. PIPELINING ----------------------------------------------------------------------------

#[test]
fn pipelined_envelope_in_one_write() {
    let srv = Server::start("");
    let mut c = srv.client();
    srv.expect_reply(&mut c, "EHLO client.example", "250 CHUNKING");
    c.write(
        b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@localhost>\r\n\
          RCPT TO:<carol@example.test>\r\nDATA\r\n",
    );
    for want in [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
    ] {
        ensure_eq!(srv, c.reply(), vec![want.to_string()]);
    }
    let body = b"Subject: pipelined\r\n\r\nOne write, four replies.\r\n";
    c.write(body);
    // The end of the message and QUIT in one write, too.
    c.write(b".\r\nQUIT\r\n");
    srv.queued_id(&c.last());
    ensure_eq!(srv, c.last(), "221 2.0.0 Bye");
    for (domain, user) in [("localhost", "bob"), ("example.test", "carol")] {
        let got = srv.mailbox(domain, user, 1);
        ensure_eq!(srv, got.len(), 1);
        ensure_eq!(srv, strip_trace(&got[0]), body.to_vec());
    }
}

// ---- 5. BDAT ----------------------------------------------------------------------------------

#[test]
fn bdat_chunks_are_stored_byte_for_byte() {
    let srv = Server::start("");
    // Chunk 1: a bare LF, a lone-dot line between real CRLFs (which would end DATA) and a
    // line starting with a dot (which DATA would unstuff): BDAT stores all of them as they are.
    let mut chunk1 = b"Subject: bdat\r\n\r\nbare LF here\nthen\r\n.\r\n..dot line\r\n".to_vec();
    while chunk1.len() < 98 {
        chunk1.push(b'x');
    }
    chunk1.extend_from_slice(b"\r\n");
    // Chunk 2: binary-ish octets >= 0x80, a bare CR, and the lone dot again.
    let mut chunk2 = vec![0x80, 0x81, 0xfe, 0xff, 0xc3, 0xa9, b'\r', b'z', b'\n'];
    chunk2.extend_from_slice(b".\r\n\xe2\x82\xac end\r\n.\r\n");
    while chunk2.len() < 48 {
        chunk2.push(0xa0);
    }
    chunk2.extend_from_slice(b"\r\n");
    assert_eq!((chunk1.len(), chunk2.len()), (100, 50));

    let mut c = srv.client();
    srv.expect_reply(&mut c, "EHLO client.example", "250 CHUNKING");
    srv.expect_reply(&mut c, "MAIL FROM:<alice@example.test>", "250 2.1.0 Ok");
    srv.expect_reply(&mut c, "RCPT TO:<bob@localhost>", "250 2.1.5 Ok");
    c.write(b"BDAT 100\r\n");
    c.write(&chunk1);
    ensure_eq!(
        srv,
        c.reply(),
        vec!["250 2.0.0 100 octets received".to_string()]
    );
    let mut last = b"BDAT 50 LAST\r\n".to_vec();
    last.extend_from_slice(&chunk2);
    c.write(&last);
    let id = srv.queued_id(&c.last());
    srv.expect_reply(&mut c, "QUIT", "221 2.0.0 Bye");

    let got = srv.mailbox("localhost", "bob", 1);
    ensure_eq!(srv, got.len(), 1);
    let stored = strip_trace(&got[0]);
    let want = [chunk1, chunk2].concat();
    ensure!(
        srv,
        stored == want,
        "message {id}: stored {} octets, sent 150\n stored: {}\n   sent: {}",
        stored.len(),
        show(&stored),
        show(&want)
    );
}

// ---- 6. SMTP smuggling -----------------------------------------------------------------------

#[test]
fn smuggling_with_bare_lf_dot_does_not_split_the_message() {
    let srv = Server::start("");
    let mut c = srv.client();
    srv.expect_reply(&mut c, "EHLO client.example", "250 CHUNKING");
    srv.expect_reply(&mut c, "MAIL FROM:<alice@example.test>", "250 2.1.0 Ok");
    srv.expect_reply(&mut c, "RCPT TO:<bob@localhost>", "250 2.1.5 Ok");
    srv.expect_reply(&mut c, "DATA", "354 End data with <CR><LF>.<CR><LF>");
    c.write(
        b"hello\n.\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@localhost>\r\n\
          DATA\r\nsmuggled\r\n.\r\nQUIT\r\n",
    );
    srv.queued_id(&c.last());
    ensure_eq!(srv, c.reply(), vec!["221 2.0.0 Bye".to_string()]);
    ensure!(srv, c.is_closed(), "connection still open after QUIT");

    srv.mailbox("localhost", "bob", 1);
    // Once the spool is empty every message is delivered: count them then.
    srv.wait_spool_empty();
    let got = srv.mailbox("localhost", "bob", 0);
    ensure_eq!(srv, got.len(), 1);
    // Bare LFs become CRLF; the lone dot after a bare LF stays a line holding one dot
    // (crates/proto/src/data.rs).
    ensure_eq!(
        srv,
        show(&strip_trace(&got[0])),
        show(
            b"hello\r\n.\r\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@localhost>\r\n\
              DATA\r\nsmuggled\r\n"
        )
    );
    ensure!(
        srv,
        srv.mailbox("localhost", "victim", 0).is_empty(),
        "the smuggled message was delivered to victim"
    );
    ensure!(
        srv,
        !srv.logs().contains("evil@example.test"),
        "the server saw a second envelope from evil@example.test"
    );
}

// ---- 7. kill -9 after 250 --------------------------------------------------------------------

#[test]
fn kill9_after_250_with_delivery_blocked_keeps_the_message_in_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let blocked = dir.path().join("blocked");
    // A regular file where the Maildir tree should be: delivery fails (temporarily).
    std::fs::write(&blocked, b"not a directory\n").unwrap();
    let extra = format!(
        "[delivery]\nmaildir = \"{}/{{domain}}/{{user}}/Maildir\"\n",
        blocked.display()
    );
    let mut srv = Server::start_in(dir, &extra);
    let body = b"Subject: survive\r\n\r\nThis message survives kill -9.\r\n";
    let id = srv.send("alice@example.test", &["bob@localhost"], body);
    // The first delivery attempt fails temporarily (the log says so); then the crash.
    let deferred = wait_until(DELIVERY_WAIT, || {
        srv.proc.log_text().contains(&format!("deferred id={id} "))
    });
    ensure!(srv, deferred, "no deferred delivery attempt for {id}");
    srv.proc.kill9();
    ensure!(
        srv,
        !blocked.is_dir(),
        "the blocking file was replaced by a directory"
    );
    let spooled = srv.data().join("queue").join(&id);
    ensure!(
        srv,
        spooled.is_file(),
        "no spool file {} after 250",
        spooled.display()
    );

    std::fs::remove_file(&blocked).unwrap();
    srv.restart();
    let new = blocked.join("localhost/bob/Maildir/new");
    let got = files_in(&new, 1, DELIVERY_WAIT);
    ensure!(
        srv,
        got.len() == 1,
        "{} message(s) in {} after restart",
        got.len(),
        new.display()
    );
    ensure_eq!(srv, strip_trace(&got[0]), body.to_vec());
    ensure!(
        srv,
        String::from_utf8_lossy(&got[0]).contains(&format!("with ESMTP id {id}\r\n")),
        "delivered message lacks its queue ID {id}: {}",
        show(&got[0])
    );
    let gone = wait_until(Duration::from_secs(5), || !spooled.exists());
    ensure!(
        srv,
        gone,
        "spool file {} still there after delivery",
        spooled.display()
    );
    ensure!(
        srv,
        srv.spool().is_empty(),
        "spool: {:?}",
        spool_files(srv.data())
    );
}

#[test]
fn kill9_right_after_250_then_restart_delivers_at_least_once() {
    let mut srv = Server::start("");
    let body = b"Subject: crash\r\n\r\nAcknowledged, then the server died.\r\n";
    let id = srv.send("alice@example.test", &["bob@localhost"], body);
    srv.proc.kill9();
    srv.restart();
    let got = srv.mailbox("localhost", "bob", 1);
    srv.wait_spool_empty();
    let got = maildir_new(srv.data(), "localhost", "bob", got.len(), Duration::ZERO);
    for m in &got {
        ensure_eq!(srv, strip_trace(m), body.to_vec());
        ensure!(
            srv,
            String::from_utf8_lossy(m).contains(&format!("with ESMTP id {id}\r\n")),
            "not message {id}: {}",
            show(m)
        );
    }
}

// ---- 8. spool recovery -----------------------------------------------------------------------

#[test]
fn recovery_removes_half_written_spool_files() {
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("queue");
    std::fs::create_dir_all(&queue).unwrap();
    // What a crash during the write of a message leaves: a complete-looking spool file that
    // was never renamed, hence never acknowledged.
    let half = "estafeta-queue 1\nid 0123456789AB\narrival 1700000000\nclient-ip 127.0.0.1\n\
                client-port 40000\nhelo client.example\nprotocol ESMTP\n\
                from <alice@example.test>\nrcpt <ghost@localhost>\n\n\
                Subject: never acknowledged\r\n\r\nMust not be delivered.\r\n";
    std::fs::write(queue.join("0123456789AB.tmp"), half).unwrap();
    std::fs::write(queue.join("0123456789AB.st.tmp"), "estafeta-status 1\n").unwrap();

    let srv = Server::start_in(dir, "");
    ensure_eq!(srv, spool_files(srv.data()), Vec::<String>::new());
    // The scheduler runs: a new message goes through, and well after it (longer than the
    // retry interval) nothing came from the removed file.
    srv.send(
        "alice@example.test",
        &["bob@localhost"],
        b"Subject: after\r\n\r\nx\r\n",
    );
    srv.mailbox("localhost", "bob", 1);
    srv.wait_spool_empty();
    std::thread::sleep(Duration::from_millis(1200));
    ensure!(
        srv,
        srv.mailbox("localhost", "ghost", 0).is_empty(),
        "a half-written spool file was delivered"
    );
    ensure!(
        srv,
        !srv.logs().contains("0123456789AB "),
        "0123456789AB was loaded"
    );
}

// ---- 9. SIGTERM ------------------------------------------------------------------------------

#[test]
fn sigterm_sends_421_to_idle_clients_and_exits_0() {
    let mut srv = Server::start("");
    let mut c = srv.client();
    srv.expect_reply(&mut c, "EHLO client.example", "250 CHUNKING");
    let t0 = Instant::now();
    let status = srv.proc.terminate();
    let took = t0.elapsed();
    ensure!(srv, status.success(), "exit status after SIGTERM: {status}");
    ensure!(srv, took < Duration::from_secs(5), "SIGTERM took {took:?}");
    let reply = c.reply();
    let want = format!("421 4.3.2 {HOST} Service shutting down, closing transmission channel");
    ensure_eq!(srv, reply, vec![want]);
    ensure!(srv, c.is_closed(), "connection still open after 421");
}

// ---- 10. configuration errors ----------------------------------------------------------------

#[test]
fn bad_config_exits_78_and_names_file_line_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = test_config(
        dir.path(),
        free_port(),
        "[limits]\nmax_message_size = \"25 megs\"\n",
    );
    std::fs::write(&bad, &text).unwrap();
    let (line, col) = text
        .lines()
        .enumerate()
        .find_map(|(i, l)| l.find("\"25 megs\"").map(|c| (i + 1, c + 1)))
        .unwrap();
    let want = format!(
        "{}:{line}:{col}: error: limits.max_message_size: ",
        bad.display()
    );
    let error_line = |stderr: &str| {
        stderr
            .lines()
            .find(|l| l.contains("limits.max_message_size"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no line names limits.max_message_size:\n{stderr}"))
    };

    let (status, _, serve_err) = run(
        Command::new(estafeta_bin())
            .args(["serve", "--config"])
            .arg(&bad),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(78), "serve: {status}\n{serve_err}");
    let serve_line = error_line(&serve_err);
    assert!(
        serve_line.starts_with(&want),
        "{serve_line:?}, want {want:?}…"
    );

    let (status, out, check_err) = run(
        Command::new(estafeta_bin()).arg("check-config").arg(&bad),
        Duration::from_secs(10),
    );
    assert_eq!(
        status.code(),
        Some(1),
        "check-config: {status}\n{out}\n{check_err}"
    );
    assert_eq!(error_line(&check_err), serve_line);

    let good = dir.path().join("good.toml");
    std::fs::write(&good, test_config(dir.path(), free_port(), "")).unwrap();
    let (status, out, err) = run(
        Command::new(estafeta_bin()).arg("check-config").arg(&good),
        Duration::from_secs(10),
    );
    assert!(
        status.success(),
        "check-config good.toml: {status}\n{out}\n{err}"
    );
    assert!(
        out.starts_with(&format!("{}: ok (", good.display())),
        "stdout: {out:?}"
    );
}

// ---- 11. the embedded default ----------------------------------------------------------------

/// True when `pid` holds a socket listening on 127.0.0.1:`port` (from /proc, so that another
/// process that happens to listen there is never mistaken for ours).
fn listens_on(pid: u32, port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|target| {
            let t = target.to_string_lossy();
            inodes.iter().any(|i| t == format!("socket:[{i}]"))
        })
}

#[test]
fn embedded_default_serves_on_2525() {
    const PORT: u16 = 2525;
    if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", PORT)) {
        println!("SKIPPED: 127.0.0.1:{PORT} is not free ({e})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server1.log");
    let child = Command::new(estafeta_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    let mut proc = Process { child, addr, log };
    let log_text = |p: &Process| p.log_text();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            let text = log_text(&proc);
            if text.contains("in use") {
                println!("SKIPPED: 127.0.0.1:{PORT} was taken meanwhile:\n{text}");
                return;
            }
            panic!("estafeta serve (embedded default) exited: {status}\n{text}");
        }
        if listens_on(proc.child.id(), PORT) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not listening on {addr}:\n{}",
            log_text(&proc)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut c = Client::connect(addr);
    let greeting = c.last();
    assert!(
        greeting.starts_with("220 ") && greeting.ends_with(" ESMTP estafeta"),
        "{greeting:?}\n{}",
        log_text(&proc)
    );
    let mut step = |cmd: &str, want: &str| {
        let got = c.cmd(cmd);
        assert!(
            got.starts_with(want),
            "{cmd:?}: {got:?}\n{}",
            proc.log_text()
        );
    };
    step("EHLO client.example", "250 CHUNKING");
    step("MAIL FROM:<alice@localhost>", "250 2.1.0 Ok");
    step("RCPT TO:<someone@example.test>", "250 2.1.5 Ok");
    step("DATA", "354 ");
    step(
        "Subject: embedded\r\n\r\nHello from the default.\r\n.",
        "250 2.0.0 Ok: queued as ",
    );
    step("QUIT", "221 2.0.0 Bye");

    let got = maildir_new(&data, "example.test", "someone", 1, DELIVERY_WAIT);
    assert_eq!(
        got.len(),
        1,
        "delivered under {}:\n{}",
        data.display(),
        proc.log_text()
    );
    assert_eq!(
        strip_trace(&got[0]),
        b"Subject: embedded\r\n\r\nHello from the default.\r\n".to_vec()
    );
    let status = proc.terminate();
    assert!(
        status.success(),
        "after SIGTERM: {status}\n{}",
        proc.log_text()
    );
}

// ---- 12. too many errors ---------------------------------------------------------------------

#[test]
fn too_many_errors_closes_only_that_session() {
    let srv = Server::start("");
    let mut other = srv.client();
    let mut bad = srv.client();
    for i in 1..=9 {
        let got = bad.cmd(&format!("XYZZY{i}"));
        ensure_eq!(srv, got, "502 5.5.2 Error: command not recognized");
    }
    bad.line("XYZZY10");
    ensure_eq!(
        srv,
        bad.reply(),
        vec!["502 5.5.2 Error: command not recognized".to_string()]
    );
    ensure_eq!(
        srv,
        bad.reply(),
        vec![format!("421 4.7.0 {HOST} Error: too many errors")]
    );
    ensure!(srv, bad.is_closed(), "connection still open after 421");

    // The other session, connected all along, is served.
    srv.expect_reply(&mut other, "EHLO other.example", "250 CHUNKING");
    srv.expect_reply(&mut other, "MAIL FROM:<alice@example.test>", "250 2.1.0 Ok");
    srv.expect_reply(&mut other, "RCPT TO:<bob@localhost>", "250 2.1.5 Ok");
    srv.expect_reply(&mut other, "DATA", "354 End data with <CR><LF>.<CR><LF>");
    other.write(b"Subject: still here\r\n\r\nserved\r\n.\r\n");
    srv.queued_id(&other.last());
    srv.expect_reply(&mut other, "QUIT", "221 2.0.0 Bye");
    let got = srv.mailbox("localhost", "bob", 1);
    ensure_eq!(
        srv,
        strip_trace(&got[0]),
        b"Subject: still here\r\n\r\nserved\r\n".to_vec()
    );
}

// ---- 13. relay refused -----------------------------------------------------------------------

#[test]
fn relay_to_a_foreign_domain_is_refused_and_the_server_goes_on() {
    // No trusted networks, not even loopback: 127.0.0.1 is an ordinary stranger.
    let srv = Server::start("[relay]\nmynetworks = []\n");
    let mut c = srv.client();
    srv.expect_reply(&mut c, "EHLO client.example", "250 CHUNKING");
    srv.expect_reply(&mut c, "MAIL FROM:<alice@example.test>", "250 2.1.0 Ok");
    srv.expect_reply(
        &mut c,
        "RCPT TO:<x@elsewhere.example>",
        "554 5.7.1 <x@elsewhere.example>: Relay access denied",
    );
    // The same transaction goes on with a local recipient.
    srv.expect_reply(&mut c, "RCPT TO:<bob@localhost>", "250 2.1.5 Ok");
    srv.expect_reply(&mut c, "DATA", "354 End data with <CR><LF>.<CR><LF>");
    c.write(b"Subject: local only\r\n\r\nx\r\n.\r\n");
    srv.queued_id(&c.last());
    srv.expect_reply(&mut c, "QUIT", "221 2.0.0 Bye");
    // And a new connection is served as well.
    let id = srv.send(
        "carol@example.test",
        &["dave@example.test"],
        b"Subject: next\r\n\r\ny\r\n",
    );
    ensure_eq!(srv, srv.mailbox("localhost", "bob", 1).len(), 1);
    let got = srv.mailbox("example.test", "dave", 1);
    ensure!(
        srv,
        String::from_utf8_lossy(&got[0]).contains(&format!("id {id}\r\n")),
        "{}",
        show(&got[0])
    );
    srv.wait_spool_empty();
    ensure!(
        srv,
        !srv.data().join("mail").join("elsewhere.example").exists(),
        "something was delivered for elsewhere.example"
    );
}
