//! estafeta as a service, with the real binary: systemd's notification protocol (a fake
//! NOTIFY_SOCKET), socket activation (systemd's own `systemd-socket-activate`), dropping root,
//! reloading the whole configuration (SIGHUP and `estafeta reload`, broken and good files),
//! SIGTERM under load and during DATA, `check-config` on what the server could not read, and
//! the log formats (JSON, the journal's native protocol).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Client, Process, estafeta_bin, free_port, maildir_new, skip, submit, test_config,
};

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn wait_until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Starts `estafeta serve --config FILE` with extra environment, not waiting.
fn spawn(config: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(estafeta_bin());
    cmd.args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn wait_listening(addr: SocketAddr, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!(
                "exited ({s}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "not listening on {addr}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The datagrams received on a fake NOTIFY_SOCKET (or journal socket), read by a thread of
/// their own as they come (a datagram socket's queue holds only a few: a sender blocks when
/// nobody reads).
struct Notifications {
    received: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    got: Vec<String>,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        let socket = UnixDatagram::bind(path).unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Notifications {
            received,
            got: Vec::new(),
        }
    }

    fn pump(&mut self) {
        std::thread::sleep(Duration::from_millis(20));
        self.got = self.received.lock().unwrap().clone();
    }

    /// Waits for a datagram with `line` in it; returns its index.
    fn wait_for(&mut self, line: &str, from: usize, secs: u64) -> usize {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(i) = self.got[from.min(self.got.len())..]
                .iter()
                .position(|d| d.lines().any(|l| l == line))
            {
                return from + i;
            }
            assert!(
                Instant::now() < deadline,
                "no {line} notification; got {:?}",
                self.got
            );
            self.pump();
        }
    }
}

/// Submits a message to `to` (`user@domain`) and waits until it is in that Maildir of
/// `data`; returns its queue ID.
fn submit_and_deliver(addr: SocketAddr, data: &Path, user: &str, domain: &str) -> String {
    let id = submit(
        addr,
        "a@example.test",
        &[&format!("{user}@{domain}")],
        b"Subject: t\r\n\r\nhi\r\n",
    );
    let got = maildir_new(data, domain, user, 1, Duration::from_secs(10));
    assert!(
        got.iter().any(|m| String::from_utf8_lossy(m).contains(&id)),
        "{id} not delivered to {user}@{domain}"
    );
    id
}

fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("estafeta.toml");
    std::fs::write(&path, test_config(&dir.join("data"), port, extra)).unwrap();
    path
}

#[test]
fn notify_ready_reloading_stopping_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let sock = dir.path().join("notify.sock");
    let mut n = Notifications::bind(&sock);
    let log = dir.path().join("server.log");
    let mut child = spawn(
        &config,
        &log,
        &[
            ("NOTIFY_SOCKET", sock.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let ready = n.wait_for("READY=1", 0, 20);
    // Ready means listening.
    TcpStream::connect(("127.0.0.1", port)).expect("READY=1 came before the listener");
    assert!(n.got[ready].contains("STATUS="), "{:?}", n.got[ready]);
    // The watchdog is fed from the status loop (every WATCHDOG_USEC/2 at most).
    n.wait_for("WATCHDOG=1", ready, 5);
    signal(&child, libc::SIGHUP);
    let reloading = n.wait_for("RELOADING=1", ready, 10);
    assert!(
        n.got[reloading].contains("MONOTONIC_USEC="),
        "{:?}",
        n.got[reloading]
    );
    let ready2 = n.wait_for("READY=1", reloading, 10);
    assert!(n.got[ready2].contains("last reload"), "{:?}", n.got[ready2]);
    signal(&child, libc::SIGTERM);
    n.wait_for("STOPPING=1", ready2, 10);
    assert!(wait_exit(&mut child, 30).success());
}

#[test]
fn socket_activation_with_systemd_socket_activate() {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("systemd-socket-activate not found (Debian's systemd package)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let smtp = free_port();
    let submission = free_port();
    // The configuration names other ports: systemd's sockets win for their kinds.
    let unused = free_port();
    let config = write_config(
        dir.path(),
        unused,
        &format!(
            "[[listener]]\nkind = \"submission\"\naddress = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    );
    // test_config has one smtp listener; add a submission one above.
    let log = dir.path().join("server.log");
    let mut child = Command::new("systemd-socket-activate")
        .arg(format!("--listen=127.0.0.1:{smtp}"))
        .arg(format!("--listen=127.0.0.1:{submission}"))
        .arg("--fdname=smtp:submission")
        .arg(estafeta_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // systemd-socket-activate listens at once and starts estafeta on the first connection,
    // which waits in the backlog meanwhile.
    let addr: SocketAddr = format!("127.0.0.1:{smtp}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            drop(s);
            break Client::connect(addr);
        }
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    let greeting = c.last();
    assert!(
        greeting.starts_with("220 mx.test.example"),
        "{greeting}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    c.line("EHLO t.example");
    let ehlo = c.reply();
    assert!(ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
    // The passed submission socket serves submission: MAIL before AUTH is refused.
    let mut s = Client::connect(format!("127.0.0.1:{submission}").parse().unwrap());
    assert!(s.last().starts_with("220"));
    s.line("EHLO t.example");
    s.reply();
    let r = s.cmd("MAIL FROM:<a@example.test>");
    assert!(r.starts_with("530 5.7.0"), "{r}");
    // The configured smtp address was not bound: systemd's socket replaced it.
    assert!(
        TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "the configured smtp address was bound although systemd passed an smtp socket"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("using the listening socket passed by systemd"),
        "{text}"
    );
    submit_and_deliver(addr, &dir.path().join("data"), "bob", "localhost");
    signal(&child, libc::SIGTERM);
    let _ = wait_exit(&mut child, 30);
}

#[test]
fn started_as_root_it_runs_as_the_configured_user() {
    if !is_root() {
        skip("dropping privileges needs root");
        return;
    }
    // A directory every user may enter, the data directory inside it created by the test
    // (the server gives it to its user).
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let text = test_config(&data, port, "").replace("run_as_root = true\n", "user = \"nobody\"\n");
    let config = dir.path().join("estafeta.toml");
    std::fs::write(&config, text).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = dir.path().join("server.log");
    let mut child = spawn(&config, &log, &[]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child, &log);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Real, effective, saved and file-system ids: all nobody/nogroup.
    assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Groups:"), "65534", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    // It works as that user: a message is spooled and delivered into data_dir.
    submit_and_deliver(addr, &data, "bob", "localhost");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&data).unwrap().uid(), 65534);
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, 30).success());

    // Without `user` and without run_as_root: refused, exit 78, said once.
    let refused = test_config(&data, free_port(), "").replace("run_as_root = true\n", "");
    std::fs::write(&config, refused).unwrap();
    let out = Command::new(estafeta_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("refusing to run as root").count(), 1, "{err}");
}

#[test]
fn reload_applies_a_good_file_and_keeps_serving_on_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let log = dir.path().join("server.log");
    let mut child = spawn(&config, &log, &[]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child, &log);
    let rcpt = |to: &str| {
        let mut c = Client::connect(addr);
        c.reply();
        c.line("EHLO t.example");
        c.reply();
        c.cmd("MAIL FROM:<a@example.test>");
        let r = c.cmd(&format!("RCPT TO:<{to}>"));
        c.cmd("QUIT");
        r
    };
    // 127.0.0.1 is in mynetworks by default: take it out so that other domains are refused.
    let good = test_config(&dir.path().join("data"), port, "[relay]\nmynetworks = []\n");
    std::fs::write(&config, &good).unwrap();
    signal(&child, libc::SIGHUP);
    wait_until(10, "the first reload", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("configuration reloaded")
    });
    assert!(rcpt("x@new.example").starts_with("554 5.7.1"));

    // A session opened before the reload keeps its configuration.
    let mut before = Client::connect(addr);
    before.reply();
    before.line("EHLO t.example");
    before.reply();

    // A broken file: still serving on the running configuration, errors logged.
    std::fs::write(
        &config,
        format!("{good}\n[limits]\nmax_message_size = \"huge\"\n"),
    )
    .unwrap();
    signal(&child, libc::SIGHUP);
    wait_until(10, "the refused reload", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("reload refused, the running configuration stays in service")
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("estafeta.toml:"),
        "errors name file:line:column: {text}"
    );
    assert!(text.contains("max_message_size"), "{text}");
    assert!(rcpt("bob@localhost").starts_with("250"));
    // `estafeta reload` says the same, with a non-zero exit.
    let out = Command::new(estafeta_bin())
        .args(["reload", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_message_size") && err.contains("stays in service"),
        "{err}"
    );

    // A good file adding a domain: the next session accepts mail for it.
    std::fs::write(
        &config,
        format!("{good}\n[[domain]]\nname = \"new.example\"\nmailboxes = \"*\"\n"),
    )
    .unwrap();
    let out = Command::new(estafeta_bin())
        .args(["reload", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(rcpt("x@new.example").starts_with("250"));
    submit_and_deliver(addr, &dir.path().join("data"), "x", "new.example");
    // The session opened before the reload still refuses it (its configuration is the old one).
    before.cmd("MAIL FROM:<a@example.test>");
    let r = before.cmd("RCPT TO:<x@new.example>");
    assert!(r.starts_with("554 5.7.1"), "{r}");

    // A change that needs a restart is named.
    std::fs::write(
        &config,
        format!(
            "{}\n[[domain]]\nname = \"new.example\"\nmailboxes = \"*\"\n",
            good.replace(
                &format!("127.0.0.1:{port}"),
                &format!("127.0.0.1:{}", free_port())
            )
        ),
    )
    .unwrap();
    let out = Command::new(estafeta_bin())
        .args(["reload", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[[listener]]") && err.contains("restart"),
        "{err}"
    );
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, 30).success());
}

#[test]
fn sigterm_lets_a_message_in_data_finish_and_loses_nothing_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), port, "");
    let log = dir.path().join("server.log");
    let mut p = Process::serve(&config, format!("127.0.0.1:{port}").parse().unwrap(), &log);
    let addr = p.addr;

    // A client in the middle of DATA when the server is told to stop.
    let mut slow = Client::connect(addr);
    slow.reply();
    slow.line("EHLO t.example");
    slow.reply();
    slow.cmd("MAIL FROM:<a@example.test>");
    slow.cmd("RCPT TO:<slow@localhost>");
    assert!(slow.cmd("DATA").starts_with("354"));
    slow.write(b"Subject: in flight\r\n\r\nfirst half\r\n");

    // Load: clients sending messages one after the other, until refused.
    let stop_at = Instant::now() + Duration::from_secs(20);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..10_000 {
                    if Instant::now() > stop_at {
                        break;
                    }
                    let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
                        break;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    let mut w8 = s;
                    let mut line = String::new();
                    let mut read = |r: &mut BufReader<TcpStream>| -> Option<String> {
                        line.clear();
                        loop {
                            let mut l = String::new();
                            if r.read_line(&mut l).ok()? == 0 {
                                return None;
                            }
                            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                                return Some(l);
                            }
                        }
                    };
                    let send = |w8: &mut TcpStream, t: &str| w8.write_all(t.as_bytes()).is_ok();
                    if !read(&mut r).is_some_and(|l| l.starts_with("220")) {
                        break;
                    }
                    let to = format!("w{w}@localhost");
                    let script = format!(
                        "EHLO t\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<{to}>\r\nDATA\r\n"
                    );
                    if !send(&mut w8, &script) {
                        break;
                    }
                    let ok = (0..4).all(|_| {
                        read(&mut r).is_some_and(|l| l.starts_with('2') || l.starts_with('3'))
                    });
                    if !ok {
                        break;
                    }
                    if !send(
                        &mut w8,
                        &format!("Subject: load {w}-{i}\r\n\r\nbody\r\n.\r\n"),
                    ) {
                        break;
                    }
                    match read(&mut r) {
                        Some(l) if l.starts_with("250") => {
                            acked.push(l.trim().rsplit(' ').next().unwrap().to_string())
                        }
                        _ => break,
                    }
                    let _ = send(&mut w8, "QUIT\r\n");
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    signal(&p.child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    // The message in DATA is let finish and answered, then the session ends with 421.
    slow.write(b"second half\r\n.\r\n");
    let r = slow.last();
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    let slow_id = r.rsplit(' ').next().unwrap().to_string();
    let bye = slow.last();
    assert!(bye.starts_with("421 4.3.2"), "{bye}");
    let mut acked: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    acked.push(slow_id);
    let status = p.terminate();
    assert!(status.success(), "{status}");
    assert!(acked.len() > 5, "too little load: {}", acked.len());
    // Restart: every acknowledged message is delivered, none twice.
    let _p2 = Process::serve(&config, addr, &dir.path().join("server2.log"));
    let mut found = std::collections::HashMap::new();
    wait_until(30, "every acknowledged message in a Maildir", || {
        found.clear();
        for user in ["w0", "w1", "w2", "w3", "slow"] {
            let dir = data.join("mail/localhost").join(user).join("Maildir/new");
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                if let Some(id) = text.split("with ESMTP id ").nth(1) {
                    let id: String = id
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric())
                        .collect();
                    *found.entry(id).or_insert(0) += 1;
                }
            }
        }
        acked.iter().all(|id| found.contains_key(id))
    });
    // And none twice: a graceful stop records what it delivered.
    for id in &acked {
        assert_eq!(found[id], 1, "{id} delivered {} times", found[id]);
    }
    eprintln!(
        "{} messages acknowledged under load, all delivered",
        acked.len()
    );
}

#[test]
fn check_config_reports_what_the_server_could_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(
        dir.path(),
        port,
        "[tls]\ncertificate = \"/nonexistent/fullchain.pem\"\nprivate_key = \"/nonexistent/privkey.pem\"\n",
    );
    let out = Command::new(estafeta_bin())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.certificate: /nonexistent/fullchain.pem does not exist"),
        "{err}"
    );
    assert!(err.contains("tls.private_key"), "{err}");

    if !is_root() {
        skip("the users-file ownership checks need root");
        return;
    }
    // `user add` as root for a server that runs as nobody: the file is nobody's, and
    // check-config (as nobody) is satisfied with it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    let text = test_config(&data, port, "").replace("run_as_root = true\n", "user = \"nobody\"\n");
    std::fs::write(&config, &text).unwrap();
    estafeta_e2e::add_user(
        &config,
        "alice@example.test",
        "correct horse battery staple",
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(data.join("users")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600));
    let ok = Command::new(estafeta_bin())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    // A users file root keeps for itself: named, with the user the server runs as.
    std::os::unix::fs::chown(data.join("users"), Some(0), Some(0)).unwrap();
    let bad = Command::new(estafeta_bin())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("auth.users_file") && err.contains("nobody"),
        "{err}"
    );
}

#[test]
fn a_failed_start_says_why_once_and_leaves_no_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("users")).unwrap(); // a directory: cannot be read as a file
    let config = write_config(dir.path(), port, "");
    let out = Command::new(estafeta_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("not started").count(), 1, "{err}");
    assert!(
        !data.join("control.sock").exists(),
        "control.sock left behind"
    );
}

#[test]
fn json_and_journald_logs() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "[log]\nformat = \"json\"\n");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[log]\nlevel = \"info\"\n", "");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("server.log");
    let p = Process::serve(&config, format!("127.0.0.1:{port}").parse().unwrap(), &log);
    let id = submit(
        p.addr,
        "a@example.test",
        &["bob@localhost"],
        b"Subject: j\r\n\r\nhi\r\n",
    );
    wait_until(10, "the queued line", || {
        std::fs::read_to_string(&log).unwrap().contains(&id)
    });
    let mut queued = None;
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "queued" {
            queued = Some(v);
        }
    }
    let queued = queued.expect("a queued event");
    assert_eq!(queued["target"], "estafeta::maillog");
    assert_eq!(queued["fields"]["id"], id.as_str());
    assert_eq!(queued["fields"]["client"], "127.0.0.1");
    drop(p);

    // The journal's native protocol, on a socket standing in for journald's.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "[log]\nformat = \"journald\"\n");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[log]\nlevel = \"info\"\n", "");
    std::fs::write(&config, text).unwrap();
    let journal = dir.path().join("journal.sock");
    let mut n = Notifications::bind(&journal);
    let log = dir.path().join("server.log");
    let mut child = spawn(
        &config,
        &log,
        &[("ESTAFETA_JOURNAL_SOCKET", journal.to_str().unwrap())],
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child, &log);
    let id = submit(
        addr,
        "a@example.test",
        &["bob@localhost"],
        b"Subject: j\r\n\r\nhi\r\n",
    );
    let i = n.wait_for(&format!("QUEUE_ID={id}"), 0, 10);
    let entry = &n.got[i];
    assert!(entry.contains("CLIENT_IP=127.0.0.1"), "{entry}");
    assert!(entry.contains("SYSLOG_IDENTIFIER=estafeta"), "{entry}");
    assert!(entry.contains("TARGET=estafeta::maillog"), "{entry}");
    assert!(entry.contains("PRIORITY=6"), "{entry}");
    // MESSAGE is the text line, with its fields (what grep and fail2ban match).
    assert!(
        entry.lines().any(|l| l.starts_with("MESSAGE=queued ")
            && l.contains(&format!("id={id}"))
            && l.contains("client=127.0.0.1")),
        "{entry}"
    );
    signal(&child, libc::SIGTERM);
    let _ = wait_exit(&mut child, 30);
}

#[test]
fn notify_reaches_an_abstract_socket_too() {
    use std::os::linux::net::SocketAddrExt;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let name = format!("estafeta-test-notify-{}-{port}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let log = dir.path().join("server.log");
    let mut child = spawn(&config, &log, &[("NOTIFY_SOCKET", &format!("@{name}"))]);
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification on the abstract socket");
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, 30).success());
}

#[test]
fn an_unprivileged_mailq_says_it_cannot_read_the_queue_instead_of_empty() {
    if !is_root() {
        skip("running a command as nobody needs root");
        return;
    }
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("queue")).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = write_config(dir.path(), free_port(), "");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(estafeta_bin())
        .args(["queue", "list", "--config"])
        .arg(&config)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("empty"));
}
