//! `sendmail`, `mailq` and `estafeta sendmail`: the real binary, run through symlinks named
//! like the commands, submitting to a real server's submit socket — as an unprivileged user
//! where the test runs as root.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use estafeta_e2e::{Process, estafeta_bin, free_port, maildir_new, skip, test_config};

/// A server with its submit socket in a directory every user may enter, and symlinks named
/// `sendmail` and `mailq` to the binary.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    data: PathBuf,
    socket: PathBuf,
    server: Option<Process>,
}

impl Setup {
    /// Writes the configuration (with `extra`) and starts the server when `start`.
    fn new(extra: &str, start: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        // tempfile directories are 0700: an unprivileged user could not reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("data");
        let socket = dir.path().join("run").join("submit.sock");
        let port = free_port();
        let text = test_config(
            &data,
            port,
            &format!(
                "[control]\nsubmit_socket = \"{}\"\n\n{extra}",
                socket.display()
            ),
        );
        let config = dir.path().join("estafeta.toml");
        std::fs::write(&config, text).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        for name in ["sendmail", "mailq"] {
            std::os::unix::fs::symlink(estafeta_bin(), dir.path().join(name)).unwrap();
        }
        let server = start.then(|| {
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            Process::serve(&config, addr, &dir.path().join("server.log"))
        });
        Setup {
            dir,
            config,
            data,
            socket,
            server,
        }
    }

    /// `sendmail ARGS` (through the symlink) with `stdin`, as the current user.
    fn sendmail(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.run("sendmail", args, stdin, None)
    }

    /// `NAME ARGS` through the symlink, with `ESTAFETA_CONFIG` set, as `user` (uid, gid) when
    /// given.
    fn run(&self, name: &str, args: &[&str], stdin: &[u8], user: Option<(u32, u32)>) -> Output {
        let mut cmd = Command::new(self.dir.path().join(name));
        cmd.args(args)
            .env("ESTAFETA_CONFIG", &self.config)
            .env("LOGNAME", "tester")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid).env("LOGNAME", "nobody");
        }
        let mut child = cmd.spawn().expect("spawn sendmail");
        // A usage error ends the command before it reads anything: a broken pipe then.
        let _ = child.stdin.take().unwrap().write_all(stdin);
        child.wait_with_output().unwrap()
    }

    fn log(&self) -> String {
        self.server
            .as_ref()
            .map(|s| s.log_text())
            .unwrap_or_default()
    }

    /// The messages delivered to `user@localhost`, at least `n` of them.
    fn mailbox(&self, user: &str, n: usize) -> Vec<String> {
        let got = maildir_new(&self.data, "localhost", user, n, Duration::from_secs(10));
        assert!(
            got.len() >= n,
            "{user}: {} message(s); log:\n{}",
            got.len(),
            self.log()
        );
        got.into_iter()
            .map(|m| String::from_utf8(m).unwrap())
            .collect()
    }
}

impl Setup {
    /// Of the (at least `n`) messages of `user@localhost`, the one whose subject is `subject`
    /// (Maildir names do not sort in delivery order).
    fn message(&self, user: &str, n: usize, subject: &str) -> String {
        let all = self.mailbox(user, n);
        let wanted = format!("\r\nSubject: {subject}\r\n");
        all.iter()
            .find(|m| m.contains(&wanted))
            .unwrap_or_else(|| panic!("no message {subject:?} in {all:?}"))
            .clone()
    }
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `nobody`'s uid and gid.
fn nobody() -> (u32, u32) {
    // SAFETY: getpwnam with a NUL-terminated name; the result is read at once, in this thread.
    unsafe {
        let pw = libc::getpwnam(c"nobody".as_ptr());
        if pw.is_null() {
            (65534, 65534)
        } else {
            ((*pw).pw_uid, (*pw).pw_gid)
        }
    }
}

#[test]
fn sendmail_t_as_an_unprivileged_user() {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip("running a child as nobody needs root");
        return;
    }
    let s = Setup::new("", true);
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o666,
        "the submit socket is open to every user"
    );
    let (uid, gid) = nobody();
    // carol is also on the command line: added to the header's recipients, once.
    let out = s.run(
        "sendmail",
        &["-t", "-i", "carol@localhost"],
        b"To: bob@localhost\nBcc: carol@localhost\nSubject: t\n\nhi\n",
        Some((uid, gid)),
    );
    assert_eq!(code(&out), 0, "{}\nlog:\n{}", stderr(&out), s.log());
    for user in ["bob", "carol"] {
        let m = &s.mailbox(user, 1)[0];
        assert!(
            m.contains(&format!(
                "Received: by mx.test.example (estafeta, from userid {uid})\r\n\tid "
            )),
            "{m}"
        );
        assert!(
            m.starts_with("Return-Path: <nobody@mx.test.example>\r\n"),
            "{m}"
        );
        assert!(!m.contains("Bcc:"), "{m}");
        assert!(m.contains("\r\nFrom: nobody@mx.test.example\r\n"), "{m}");
        assert!(
            m.contains("\r\nDate: ") && m.contains("\r\nMessage-ID: <"),
            "{m}"
        );
        assert!(m.ends_with("\r\n\r\nhi\r\n"), "{m}");
    }
    let log = s.log();
    assert!(log.contains("nrcpt=2"), "{log}");
    assert!(
        log.contains(&format!(
            "connect client=\"local\" listener=\"local\" uid={uid} user=\"nobody\""
        )),
        "{log}"
    );
}

#[test]
fn config_unreadable_falls_back_to_the_default_socket() {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip("running a child as nobody needs root");
        return;
    }
    let s = Setup::new("", false);
    std::fs::set_permissions(&s.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = s.run("sendmail", &["bob@localhost"], b"x\n", Some(nobody()));
    // Nothing listens on /run/estafeta/submit.sock here (or nobody may not reach it): the
    // message says which socket was tried and why.
    assert!(matches!(code(&out), 69 | 75), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("/run/estafeta/submit.sock") && e.contains("not readable"),
        "{e}"
    );
}

#[test]
fn recipients_on_the_command_line_with_f_and_full_name() {
    let s = Setup::new("", true);
    let out = s.sendmail(
        &[
            "-f",
            "sender@example.test",
            "-F",
            "Sam Q. Sender",
            "bob@localhost",
            "carol",
        ],
        b"Subject: cli\n\nhello\n",
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let m = &s.mailbox("bob", 1)[0];
    assert!(
        m.starts_with("Return-Path: <sender@example.test>\r\n"),
        "{m}"
    );
    assert!(
        m.contains("\r\nFrom: \"Sam Q. Sender\" <sender@example.test>\r\n"),
        "{m}"
    );
    // A bare name is qualified with the configuration's hostname (not a local domain here:
    // relayed, so it waits in the queue; what matters is that it was accepted).
    assert!(s.log().contains("nrcpt=2"), "{}", s.log());
    // The message's own From is kept.
    let out = s.sendmail(
        &["-fother@example.test", "bob@localhost"],
        b"From: Real <real@example.test>\nSubject: own\n\nx\n",
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let m = s.message("bob", 2, "own");
    assert!(m.contains("\r\nFrom: Real <real@example.test>\r\n"), "{m}");
    assert_eq!(m.matches("From:").count(), 1, "{m}");
}

#[test]
fn a_lone_dot_ends_the_message_without_i() {
    let s = Setup::new("", true);
    let out = s.sendmail(
        &["bob@localhost"],
        b"Subject: one\n\nfirst\n.\nafter the dot\n",
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let m = s.message("bob", 1, "one");
    assert!(m.ends_with("\r\n\r\nfirst\r\n"), "{m}");
    let out = s.sendmail(
        &["-i", "bob@localhost"],
        b"Subject: two\n\nfirst\n.\nafter the dot\n",
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let m = s.message("bob", 2, "two");
    assert!(
        m.ends_with("\r\n\r\nfirst\r\n.\r\nafter the dot\r\n"),
        "{m}"
    );
    let out = s.sendmail(&["-oi", "bob@localhost"], b"Subject: three\n\n..two\n.\n");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let m = s.message("bob", 3, "three");
    assert!(m.ends_with("\r\n..two\r\n.\r\n"), "{m}");
}

#[test]
fn sendmail_bs_speaks_smtp() {
    let s = Setup::new("", true);
    let mut child = Command::new(s.dir.path().join("sendmail"))
        .arg("-bs")
        .env("ESTAFETA_CONFIG", &s.config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // One reply: its last line.
    let mut reply = || -> String {
        loop {
            let mut l = String::new();
            assert!(stdout.read_line(&mut l).unwrap() > 0, "sendmail -bs closed");
            assert!(l.ends_with("\r\n"), "{l:?}");
            if l.as_bytes().get(3) != Some(&b'-') {
                return l.trim_end().to_string();
            }
        }
    };
    assert!(reply().starts_with("220 mx.test.example"));
    let script = [
        ("EHLO app.example\r\n", "250 "),
        ("MAIL FROM:<app@example.test>\r\n", "250 2.1.0"),
        ("RCPT TO:<bob@localhost>\r\n", "250 2.1.5"),
        ("DATA\r\n", "354 "),
        (
            "Subject: bs\r\n\r\nvia -bs\r\n.\r\n",
            "250 2.0.0 Ok: queued as ",
        ),
        ("QUIT\r\n", "221 "),
    ];
    for (send, expect) in script {
        stdin.write_all(send.as_bytes()).unwrap();
        let r = reply();
        assert!(r.starts_with(expect), "{send:?}: {r}");
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let m = &s.mailbox("bob", 1)[0];
    assert!(m.ends_with("\r\n\r\nvia -bs\r\n"), "{m}");
    assert!(m.contains("(estafeta, from userid "), "{m}");
}

#[test]
fn mailq_lists_a_queued_message() {
    let s = Setup::new(
        "[relay.routes]\n\"remote.example\" = \"[127.0.0.1]:1\"\n",
        true,
    );
    let out = s.sendmail(&["someone@remote.example"], b"Subject: q\n\nwaits\n");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = s.run("mailq", &[], b"", None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("someone@remote.example"), "{text}");
    assert!(text.contains("tester@mx.test.example"), "{text}");
    // `queue show` says where it came from.
    let id = text
        .lines()
        .find(|l| l.contains("tester@mx.test.example"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .trim_end_matches(['*', '!']);
    let out = Command::new(estafeta_bin())
        .args(["queue", "show", id, "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&out.stdout);
    assert!(show.contains(" local uid="), "{show}");
    // `sendmail -bp` is the same listing.
    let out = s.sendmail(&["-bp"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("someone@remote.example"));
}

#[test]
fn exit_codes() {
    // The server is not running (stopped, or restarting for an upgrade): EX_TEMPFAIL.
    let down = Setup::new("", false);
    let out = down.sendmail(&["bob@localhost"], b"x\n");
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is estafeta running?"),
        "{}",
        stderr(&out)
    );
    // A usage error: EX_USAGE, before anything is read or sent.
    let out = down.sendmail(&["-k", "bob@localhost"], b"x\n");
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    let out = down.sendmail(&[], b"x\n");
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stderr(&out).contains("no recipients"), "{}", stderr(&out));
    let out = down.sendmail(&["", "Nobody <>"], b"x\n");
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    // `-t` without any recipient in the header: EX_DATAERR.
    let out = down.sendmail(&["-t"], b"Subject: none\n\nx\n");
    assert_eq!(code(&out), 65, "{}", stderr(&out));

    // An unknown user: EX_NOUSER, and nothing is sent to the known one either.
    let s = Setup::new(
        "[[domain]]\nname = \"strict.test\"\nmailboxes = [\"alice\"]\n",
        true,
    );
    let out = s.sendmail(&["alice@strict.test", "bob@strict.test"], b"x\n");
    assert_eq!(code(&out), 67, "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("<bob@strict.test>: 550 5.1.1"), "{e}");
    assert!(!s.log().contains(" queued "), "{}", s.log());
    // The same through `estafeta sendmail`.
    let out = Command::new(estafeta_bin())
        .args(["sendmail", "-i", "alice@strict.test"])
        .env("ESTAFETA_CONFIG", &s.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn newaliases_has_nothing_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("newaliases");
    std::os::unix::fs::symlink(estafeta_bin(), &link).unwrap();
    let out = Command::new(&link).output().unwrap();
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("[domain.aliases]"));
}

#[test]
fn a_local_user_counts_like_one_client_address_and_sendmail_waits_for_a_slot() {
    let s = Setup::new("[limits]\nmax_connections_per_ip = 1\n", true);
    let mut held = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 4];
    std::io::Read::read_exact(&mut held, &mut greeting).unwrap();
    assert_eq!(&greeting, b"220 ");
    // -bs is a byte pipe: the refusal reaches its client as it is.
    let out = s.sendmail(&["-bs"], b"QUIT\r\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("421 4.7.0 mx.test.example Error: too many connections from uid "),
        "{text}"
    );
    // A message waits (a few seconds at most) for the slot instead of failing at once.
    let mut child = Command::new(s.dir.path().join("sendmail"))
        .arg("bob@localhost")
        .env("ESTAFETA_CONFIG", &s.config)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Subject: waited\n\nx\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    drop(held);
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    s.message("bob", 1, "waited");
}
