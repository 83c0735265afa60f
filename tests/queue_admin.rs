//! `estafeta queue …` against the real binary: a message for a route where nothing listens
//! stays deferred (retry in an hour); the commands list it with its reason, group it, hold,
//! release, flush (delivered at once once a peer listens), delete and bounce it, through the
//! control socket while the server runs and on the spool while it is stopped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use estafeta_e2e::{Process, estafeta_bin, free_port, maildir_new};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn queue(cfg: &Path, args: &[&str]) -> Out {
    let out = Command::new(estafeta_bin())
        .arg("queue")
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .expect("run estafeta queue");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sends one message from alice@example.test and returns its queue ID.
fn send(p: &Process, to: &str, subject: &str) -> String {
    estafeta_e2e::submit(
        p.addr,
        "alice@example.test",
        &[to],
        format!("Subject: {subject}\r\nX-Queue-Test: yes\r\n\r\nbody\r\n").as_bytes(),
    )
}

/// Waits until the server logged `n` deferrals for `to`.
fn deferred(p: &Process, to: &str, n: usize) {
    let needle = format!("to={to} status=\"deferred\"");
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.log_text().matches(&needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "{n} deferral(s) of {to}:\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn deferrals(p: &Process, to: &str) -> usize {
    p.log_text()
        .matches(&format!("to={to} status=\"deferred\""))
        .count()
}

fn write(path: PathBuf, text: String) -> PathBuf {
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn queue_commands_online_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (port, dead) = (free_port(), free_port());
    let data = dir.path().join("a");
    let cfg = write(
        dir.path().join("a.toml"),
        format!(
            r#"hostname = "mx.example.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{port}"
[relay]
mynetworks = ["127.0.0.1/32"]
[relay.routes]
"remote.test" = "[127.0.0.1]:{dead}"
[[domain]]
name = "example.test"
mailboxes = "*"
[queue]
retry = ["1h"]
"#,
            d = data.display()
        ),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut a = Process::serve(&cfg, addr, &dir.path().join("a.log"));
    assert!(data.join("control.sock").exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("control.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Two messages deferred: nothing listens on the route.
    let m1 = send(&a, "bob@remote.test", "first");
    deferred(&a, "bob@remote.test", 1);
    let m2 = send(&a, "carol@remote.test", "second");
    deferred(&a, "carol@remote.test", 1);

    // list: mailq-like, with the reason and the next attempt.
    let out = queue(&cfg, &["list"]);
    assert_eq!(out.code, 0, "{out}");
    for want in [
        m1.as_str(),
        m2.as_str(),
        "alice@example.test",
        "bob@remote.test",
        "carol@remote.test",
        "Connection refused",
        "(next attempt: ",
        "-- 1 Kbytes in 2 Requests.",
    ] {
        assert!(out.stdout.contains(want), "{want}\n{out}");
    }
    // --json: the same facts.
    let out = queue(&cfg, &["list", "--json"]);
    assert_eq!(out.code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{out}");
    assert_eq!(list[0]["id"], m1.as_str());
    assert_eq!(list[0]["sender"], "alice@example.test");
    assert_eq!(list[0]["held"], false);
    assert_eq!(list[0]["recipients"][0]["address"], "bob@remote.test");
    assert_eq!(list[0]["recipients"][0]["attempts"], 1);
    assert!(
        list[0]["recipients"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{out}"
    );
    assert!(list[0]["next_attempt"].as_u64().unwrap() > list[0]["arrival"].as_u64().unwrap());

    // summary: grouped by destination and by reason.
    let out = queue(&cfg, &["summary"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("      2  remote.test"), "{out}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("      2  451 4.4.1 connect to") && l.contains("refused")),
        "{out}"
    );
    let out = queue(&cfg, &["summary", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(v["deferred_recipients"], 2, "{out}");
    assert_eq!(v["by_domain"][0]["domain"], "remote.test");
    assert_eq!(v["by_reason"][0]["count"], 2, "{out}");

    // show: envelope, recipient state, headers.
    let out = queue(&cfg, &["show", &m1]);
    assert_eq!(out.code, 0, "{out}");
    assert!(
        out.stdout.contains("sender:       <alice@example.test>"),
        "{out}"
    );
    assert!(
        out.stdout
            .contains("recipient:    <bob@remote.test> pending, 1 attempt(s)"),
        "{out}"
    );
    assert!(out.stdout.contains("last error: 451 4.4.1"), "{out}");
    assert!(out.stdout.contains("Subject: first"), "{out}");
    assert!(!out.stdout.contains("body"), "headers only\n{out}");
    assert_eq!(queue(&cfg, &["show", "000000000001"]).code, 1);

    // hold: listed as held; a flush leaves it alone but retries the other one at once.
    let out = queue(&cfg, &["hold", &m1]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains(&format!("{m1}: held")), "{out}");
    assert!(queue(&cfg, &["list"]).stdout.contains(&format!("{m1}!")));
    let out = queue(&cfg, &["flush"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains(&format!("{m2}: flushed")), "{out}");
    assert!(
        out.stdout.contains(&format!("{m1}: held, not flushed")),
        "{out}"
    );
    deferred(&a, "carol@remote.test", 2);
    assert_eq!(deferrals(&a, "bob@remote.test"), 1, "held: not attempted");
    let out = queue(&cfg, &["summary"]);
    assert!(out.stdout.contains("held by the administrator"), "{out}");

    // Unknown and malformed IDs.
    let out = queue(&cfg, &["hold", "000000000001"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("no such message"), "{out}");
    assert_eq!(queue(&cfg, &["hold", "nonsense"]).code, 2);
    assert_eq!(queue(&cfg, &["hold"]).code, 2);

    // release: attempted at once.
    let out = queue(&cfg, &["release", &m1]);
    assert_eq!(out.code, 0, "{out}");
    deferred(&a, "bob@remote.test", 2);
    assert!(!queue(&cfg, &["list"]).stdout.contains(&format!("{m1}!")));

    // A peer starts listening on the route: flush delivers now, not in an hour.
    let b_cfg = write(
        dir.path().join("b.toml"),
        format!(
            r#"hostname = "mx.remote.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{dead}"
[relay]
mynetworks = []
[[domain]]
name = "remote.test"
mailboxes = "*"
"#,
            d = dir.path().join("b").display()
        ),
    );
    let mut b = Process::serve(
        &b_cfg,
        format!("127.0.0.1:{dead}").parse().unwrap(),
        &dir.path().join("b.log"),
    );
    let started = Instant::now();
    let out = queue(&cfg, &["flush", "--domain", "remote.test"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains(&format!("{m1}: flushed")), "{out}");
    assert!(out.stdout.contains(&format!("{m2}: flushed")), "{out}");
    let wait = Duration::from_secs(15);
    for user in ["bob", "carol"] {
        let got = maildir_new(&dir.path().join("b"), "remote.test", user, 1, wait);
        assert_eq!(got.len(), 1, "{user}\nA:\n{}", a.log_text());
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !queue(&cfg, &["list"])
        .stdout
        .contains("Mail queue is empty")
    {
        assert!(Instant::now() < deadline, "{}", queue(&cfg, &["list"]));
        std::thread::sleep(Duration::from_millis(50));
    }
    b.terminate();

    // delete: gone without a word; bounce: alice gets a failure notification.
    let m3 = send(&a, "dave@remote.test", "third");
    let m4 = send(&a, "erin@remote.test", "fourth");
    deferred(&a, "dave@remote.test", 1);
    deferred(&a, "erin@remote.test", 1);
    let out = queue(&cfg, &["delete", &m3]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains(&format!("{m3}: deleted")), "{out}");
    let out = queue(&cfg, &["bounce", &m4]);
    assert_eq!(out.code, 0, "{out}");
    let bounces = maildir_new(&data, "example.test", "alice", 1, wait);
    assert_eq!(bounces.len(), 1, "A:\n{}", a.log_text());
    let bounce = String::from_utf8_lossy(&bounces[0]).into_owned();
    assert!(
        bounce.contains("Final-Recipient: rfc822; erin@remote.test"),
        "{bounce}"
    );
    assert!(bounce.contains("Status: 5.0.0"), "{bounce}");
    assert!(bounce.contains("administrator"), "{bounce}");
    assert!(!bounce.contains("dave@remote.test"), "{bounce}");
    let out = queue(&cfg, &["list"]);
    assert!(
        !out.stdout.contains(&m3) && !out.stdout.contains(&m4),
        "{out}"
    );

    // Offline: the server stops; the commands work on the spool; the next start obeys.
    let m5 = send(&a, "frank@remote.test", "fifth");
    let m6 = send(&a, "grace@remote.test", "sixth");
    let m7 = send(&a, "henry@remote.test", "seventh");
    deferred(&a, "frank@remote.test", 1);
    deferred(&a, "grace@remote.test", 1);
    deferred(&a, "henry@remote.test", 1);
    assert!(a.terminate().success());
    assert!(
        !data.join("control.sock").exists(),
        "socket removed at stop"
    );
    let out = queue(&cfg, &["list"]);
    assert!(
        out.stdout.contains(&m5) && out.stdout.contains(&m6),
        "{out}"
    );
    let out = queue(&cfg, &["hold", &m5]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("server not running"), "{out}");
    let out = queue(&cfg, &["delete", &m6]);
    assert_eq!(out.code, 0, "{out}");
    let out = queue(&cfg, &["bounce", &m7]);
    assert_eq!(out.code, 0, "{out}");
    let out = queue(&cfg, &["list"]);
    assert!(out.stdout.contains(&format!("{m5}!")), "{out}");
    assert!(
        !out.stdout.contains(&m6) && !out.stdout.contains(&m7),
        "{out}"
    );

    let a2 = Process::serve(&cfg, addr, &dir.path().join("a2.log"));
    // The offline bounce is delivered at the start.
    let bounces = maildir_new(&data, "example.test", "alice", 2, wait);
    assert_eq!(bounces.len(), 2, "A:\n{}", a2.log_text());
    assert!(
        bounces
            .iter()
            .any(|b| String::from_utf8_lossy(b)
                .contains("Final-Recipient: rfc822; henry@remote.test")),
        "{}",
        a2.log_text()
    );
    // Still held after the restart: not attempted, even by a flush.
    let out = queue(&cfg, &["flush"]);
    assert!(
        out.stdout.contains(&format!("{m5}: held, not flushed")),
        "{out}"
    );
    assert!(queue(&cfg, &["list"]).stdout.contains(&format!("{m5}!")));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(deferrals(&a2, "frank@remote.test"), 0, "{}", a2.log_text());
    let out = queue(&cfg, &["release", &m5]);
    assert_eq!(out.code, 0, "{out}");
    assert!(!out.stdout.contains("not running"), "{out}");
    deferred(&a2, "frank@remote.test", 1);

    // After a crash the socket file stays behind: the commands see that nothing answers and
    // work on the spool; the next start replaces the stale socket.
    let mut a2 = a2;
    a2.kill9();
    assert!(data.join("control.sock").exists());
    let out = queue(&cfg, &["hold", &m5]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("server not running"), "{out}");
    let a3 = Process::serve(&cfg, addr, &dir.path().join("a3.log"));
    let out = queue(&cfg, &["release", &m5]);
    assert_eq!(out.code, 0, "{out}\n{}", a3.log_text());
    assert!(!out.stdout.contains("not running"), "{out}");
    deferred(&a3, "frank@remote.test", 1);
}
