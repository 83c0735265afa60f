//! Faults with the real binary: a full disk (a small tmpfs the test mounts; root only).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use estafeta_e2e::{Client, Process, free_port, test_config};

/// A tmpfs mounted for the test; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn send(addr: SocketAddr, body: &[u8]) -> String {
    let mut c = Client::connect(addr);
    c.reply();
    c.cmd("EHLO client.example");
    assert!(c.cmd("MAIL FROM:<a@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.write(body);
    c.write(b".\r\n");
    c.last()
}

fn deleted_files_held(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.ends_with("(deleted)"))
        .collect()
}

fn maildir_count(data: &Path) -> usize {
    std::fs::read_dir(data.join("mail/example.test/bob/Maildir/new"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_full_disk_answers_452_loses_nothing_and_recovers_by_itself() {
    if unsafe { libc::geteuid() } != 0 {
        estafeta_e2e::skip("mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        estafeta_e2e::skip("cannot mount a tmpfs here");
        return;
    }
    let _fs = Tmpfs(mnt.clone());
    let data = mnt.join("data");
    let port = free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, test_config(&data, port, "")).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Process::serve(&config, addr, &dir.path().join("log"));
    let pid = server.child.id();

    // 400 KB messages until the disk is full: 452 4.3.1 then, never a lost 250.
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..400 {
        body.extend_from_slice(&[b'x'; 998]);
        body.extend_from_slice(b"\r\n");
    }
    let mut acked = 0;
    let mut full = None;
    for _ in 0..20 {
        let r = send(addr, &body);
        if r.starts_with("250 ") {
            acked += 1;
        } else {
            full = Some(r);
            break;
        }
    }
    let full = full.expect("the disk never filled up");
    assert!(full.starts_with("452 4.3.1 "), "{full}");
    assert!(acked > 0);

    // Space comes back (the mailbox is emptied): the server takes mail again by itself, and
    // every acknowledged message is delivered; no deleted file is held open.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut delivered = 0;
    let mut accepted_again = false;
    while Instant::now() < deadline {
        let new = data.join("mail/example.test/bob/Maildir/new");
        for e in std::fs::read_dir(&new).into_iter().flatten().flatten() {
            if std::fs::remove_file(e.path()).is_ok() {
                delivered += 1;
            }
        }
        if !accepted_again {
            accepted_again = send(addr, b"Subject: small\r\n\r\nx\r\n").starts_with("250 ");
            if accepted_again {
                acked += 1;
            }
        }
        if accepted_again && delivered + maildir_count(&data) >= acked {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    delivered += maildir_count(&data);
    assert!(
        accepted_again,
        "no mail accepted after space came back: {}",
        server.log_text()
    );
    assert_eq!(delivered, acked, "{}", server.log_text());
    let held = deleted_files_held(pid);
    assert!(held.is_empty(), "deleted files still open: {held:?}");
}

/// A mailbox that cannot be written (a file stands where its Maildir should be): its delivery
/// fails temporarily and is retried, never bounced; the rest of the queue moves on; once the
/// obstacle is gone the mail arrives.
#[test]
fn an_unwritable_maildir_is_retried_and_the_rest_of_the_queue_moves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, test_config(&data, port, "")).unwrap();
    let blocked = data.join("mail/example.test/blocked");
    std::fs::create_dir_all(blocked.parent().unwrap()).unwrap();
    std::fs::write(&blocked, b"not a directory").unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Process::serve(&config, addr, &dir.path().join("log"));
    let mut c = Client::connect(addr);
    c.reply();
    c.cmd("EHLO client.example");
    assert!(c.cmd("MAIL FROM:<a@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<blocked@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<fine@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.write(b"Subject: two\r\n\r\nx\r\n.\r\n");
    assert!(c.last().starts_with("250 "));
    // The other recipient is delivered; the blocked one waits (deferred, not bounced).
    let fine = estafeta_e2e::maildir_new(&data, "example.test", "fine", 1, Duration::from_secs(10));
    assert_eq!(fine.len(), 1, "{}", server.log_text());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log_text().contains("deferred") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = server.log_text();
    assert!(log.contains("deferred"), "{log}");
    assert!(
        !log.contains("status=\"bounced\"") && !log.contains("status=bounced"),
        "{log}"
    );
    // The obstacle goes: the next retry (1 s in the test config) delivers.
    std::fs::remove_file(&blocked).unwrap();
    let got =
        estafeta_e2e::maildir_new(&data, "example.test", "blocked", 1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "{}", server.log_text());
    // The recipient delivered before the 250 was recorded as done in the spool with the
    // blocked one: the retries never delivered it a second time.
    let fine = estafeta_e2e::maildir_new(&data, "example.test", "fine", 1, Duration::from_secs(1));
    assert_eq!(fine.len(), 1, "{}", server.log_text());
}

/// Mail for local mailboxes only is in its Maildir when the client hears 250 (delivered
/// before the acknowledgement, no spool file); the log says "queued" before "delivered".
/// With NOTIFY=SUCCESS the message goes through the queue, which sends the success report.
#[test]
fn local_mail_is_in_the_maildir_when_the_client_hears_250() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, test_config(&data, port, "")).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Process::serve(&config, addr, &dir.path().join("log"));
    let r = send(addr, b"Subject: now\r\n\r\nx\r\n");
    assert!(r.starts_with("250 "), "{r}");
    // No waiting: the file is there already.
    assert_eq!(maildir_count(&data), 1, "{}", server.log_text());
    let id = r.split_whitespace().last().unwrap().to_string();
    let log = server.log_text();
    let queued = log.find(&format!("queued id={id}")).expect(&log);
    let delivered = log.find(&format!("delivered id={id}")).expect(&log);
    assert!(queued < delivered, "{log}");
    assert!(
        log[delivered..].contains(&format!("removed id={id}")),
        "{log}"
    );
    let spooled: Vec<_> = std::fs::read_dir(data.join("queue"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && n != "free")
        .collect();
    assert!(spooled.is_empty(), "{spooled:?}");

    // NOTIFY=SUCCESS: queued, delivered by the scheduler, and the sender gets its report.
    let mut c = Client::connect(addr);
    c.reply();
    c.cmd("EHLO client.example");
    assert!(c.cmd("MAIL FROM:<alice@example.test>").starts_with("250"));
    assert!(
        c.cmd("RCPT TO:<bob@example.test> NOTIFY=SUCCESS")
            .starts_with("250")
    );
    assert!(c.cmd("DATA").starts_with("354"));
    c.write(b"Subject: tell me\r\n\r\nx\r\n.\r\n");
    assert!(c.last().starts_with("250 "));
    let report =
        estafeta_e2e::maildir_new(&data, "example.test", "alice", 1, Duration::from_secs(10));
    assert_eq!(report.len(), 1, "{}", server.log_text());
    let text = String::from_utf8_lossy(&report[0]);
    assert!(text.contains("Action: delivered"), "{text}");

    // Over 4 MiB of writing (here 3 MiB × 2 recipients): queued first, then delivered, the
    // same bytes into both mailboxes.
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 3 * 1024 * 1024 {
        big.extend_from_slice(&[b'y'; 998]);
        big.extend_from_slice(b"\r\n");
    }
    let mut c = Client::connect(addr);
    c.reply();
    c.cmd("EHLO client.example");
    assert!(c.cmd("MAIL FROM:<alice@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<carol@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<dave@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.write(&big);
    c.write(b".\r\n");
    assert!(c.last().starts_with("250 "));
    for user in ["carol", "dave"] {
        let got =
            estafeta_e2e::maildir_new(&data, "example.test", user, 1, Duration::from_secs(20));
        assert_eq!(got.len(), 1, "{}", server.log_text());
        assert!(got[0].ends_with(&big), "{user}: the message differs");
    }
}
