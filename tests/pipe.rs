//! Delivery to a command (`delivery = "pipe:NAME"`, `[pipe.NAME]`) with the real binary: the
//! argv template, the message on standard input, sysexits.h read as Postfix reads it, the time
//! limit, and the user the command runs as.

use std::path::Path;
use std::time::{Duration, Instant};

use estafeta_e2e::{Process, free_port, skip, submit, test_config};

/// A command that records its arguments, environment and input in `out/<user>-<extension>`,
/// then exits with the status the recipient's user asks for (`exit75@` → 75).
fn script(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Writable by the user the command may run as.
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let path = dir.join("deliver.sh");
    std::fs::write(
        &path,
        format!(
            r#"#!/bin/sh
f="{out}/$1-$2"
{{ echo "args: $*"; echo "uid: $(id -u)"; echo "env: SENDER=$SENDER RECIPIENT=$RECIPIENT EXTENSION=$EXTENSION"; cat; }} > "$f"
case "$1" in
  exit*) echo "no such list here" >&2; exit "${{1#exit}}" ;;
  slow) sleep 30 ;;
  bg) sleep 30 & ;;
esac
exit 0
"#,
            out = out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The directory must be reachable by the other user.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

fn wait_for(what: &str, server: &Process, mut done: impl FnMut(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = server.log_text();
        if done(&log) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not seen\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn mail_is_delivered_to_a_command_and_its_exit_status_decides() {
    let dir = tempfile::tempdir().unwrap();
    let script = script(dir.path());
    let port = free_port();
    let extra = format!(
        r#"[[domain]]
name = "lists.test"
mailboxes = "*"
delivery = "pipe:lists"

[pipe.lists]
command = ["{script}", "{{user}}", "{{extension}}", "{{sender}}", "{{recipient}}"]
timeout = "2s"
"#,
        script = script.display()
    );
    let config = dir.path().join("c.toml");
    std::fs::write(&config, test_config(&dir.path().join("data"), port, &extra)).unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Process::serve(&config, addr, &dir.path().join("log"));

    submit(
        addr,
        "alice@example.test",
        &["announce+bounces@lists.test"],
        b"Subject: to the list\r\n\r\nhello list\r\n",
    );
    let out = dir.path().join("out/announce-bounces");
    wait_for("delivery to the command", &server, |_| out.exists());
    wait_for("the delivered event", &server, |log| {
        log.contains("pipe lists (exit 0)")
    });
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("args: announce bounces alice@example.test announce@lists.test"),
        "{text}"
    );
    assert!(
        text.contains(
            "env: SENDER=alice@example.test RECIPIENT=announce@lists.test EXTENSION=bounces"
        ),
        "{text}"
    );
    assert!(
        text.contains("Return-Path: <alice@example.test>\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Delivered-To: announce@lists.test\r\n"),
        "{text}"
    );
    assert!(text.contains("Received: from "), "{text}");
    assert!(
        text.ends_with("Subject: to the list\r\n\r\nhello list\r\n"),
        "{text}"
    );

    // EX_NOUSER: a bounce naming the status and what the command said.
    submit(
        addr,
        "alice@example.test",
        &["exit67@lists.test"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    wait_for("the bounce", &server, |log| {
        log.contains("550 5.1.1 pipe lists: command exited with status 67: no such list here")
    });
    // EX_TEMPFAIL: deferred, tried again.
    submit(
        addr,
        "alice@example.test",
        &["exit75@lists.test"],
        b"Subject: y\r\n\r\ny\r\n",
    );
    wait_for("a retry after EX_TEMPFAIL", &server, |log| {
        log.matches("451 4.3.0 pipe lists: command exited with status 75")
            .count()
            >= 2
    });
    // Over the time limit: killed and returned, as Postfix's pipe does.
    submit(
        addr,
        "alice@example.test",
        &["slow@lists.test"],
        b"Subject: z\r\n\r\nz\r\n",
    );
    wait_for("the time limit", &server, |log| {
        log.contains("550 5.3.0 pipe lists: command time limit of 2 s exceeded")
    });
    // A command that exits 0 leaving a background process that holds its output: delivered
    // at its exit, not held until the background process ends.
    let started = Instant::now();
    submit(
        addr,
        "alice@example.test",
        &["bg@lists.test"],
        b"Subject: bg\r\n\r\nbg\r\n",
    );
    wait_for("the background case", &server, |log| {
        log.matches("pipe lists (exit 0)").count() >= 2
    });
    assert!(started.elapsed() < Duration::from_secs(15));
    // An address that starts with '-' never reaches a command (it would read as an option).
    submit(
        addr,
        "-oQ/tmp/x@example.test",
        &["list@lists.test"],
        b"Subject: dash\r\n\r\n-\r\n",
    );
    wait_for("the refusal", &server, |log| {
        log.contains("550 5.1.3 pipe lists: an address or extension that begins with '-'")
    });
}

#[test]
fn the_command_runs_as_its_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root to switch to the pipe's user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = script(dir.path());
    let port = free_port();
    let extra = format!(
        r#"[[domain]]
name = "lists.test"
mailboxes = "*"
delivery = "pipe:lists"

[pipe.lists]
command = ["{script}", "{{user}}", "{{extension}}"]
user = "nobody"
"#,
        script = script.display()
    );
    let config = dir.path().join("c.toml");
    std::fs::write(&config, test_config(&dir.path().join("data"), port, &extra)).unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Process::serve(&config, addr, &dir.path().join("log"));
    submit(
        addr,
        "alice@example.test",
        &["who@lists.test"],
        b"Subject: who\r\n\r\n?\r\n",
    );
    let out = dir.path().join("out/who-");
    wait_for("delivery to the command", &server, |_| out.exists());
    wait_for("the delivered event", &server, |log| {
        log.contains("pipe lists (exit 0)")
    });
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("uid: 65534\n"), "{text}");
}
