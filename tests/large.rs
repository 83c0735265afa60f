//! Large messages in bounded memory (issue 12), with the real binary: 25 MB messages received,
//! spooled, delivered into a Maildir and relayed to a second server, byte for byte, while the
//! server's peak resident memory grows by a few blocks, not by the message size. Several at
//! once as well.
//!
//! The figure is the kernel's: `VmHWM` of /proc/PID/status, the peak resident set (heap and
//! mapped file pages alike).

use std::path::{Path, PathBuf};
use std::time::Duration;

use estafeta_e2e::{Client, Process, free_port, maildir_new, strip_trace};

const MB: usize = 1_000_000;

fn write(dir: &Path, name: &str, text: String) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A message of about `size` octets: varied 76-octet lines, some starting with a dot.
fn message(size: usize, tag: &str) -> Vec<u8> {
    let mut m = format!(
        "From: big@local.test\r\nTo: someone\r\nSubject: large {tag}\r\nMessage-ID: <{tag}@local.test>\r\n\r\n"
    )
    .into_bytes();
    let mut i = 0u64;
    while m.len() < size {
        i += 1;
        if i.is_multiple_of(1000) {
            m.extend_from_slice(b".a line that starts with a dot\r\n");
        }
        let line = format!("{tag} {i:012} {}\r\n", "abcdefghij".repeat(6));
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// `content` dot-stuffed, as a client sends it.
fn stuffed(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + content.len() / 500);
    let mut line_start = true;
    for &b in content {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

/// Sends one message on a new connection; returns the last line of the final reply.
fn send(addr: std::net::SocketAddr, to: &str, content: &[u8]) -> String {
    let mut c = Client::connect(addr);
    c.set_timeout(Duration::from_secs(120));
    c.reply();
    c.line("EHLO client.local.test");
    c.reply();
    assert!(c.cmd("MAIL FROM:<big@local.test>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{to}>")).starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    for chunk in stuffed(content).chunks(64 * 1024) {
        c.write(chunk);
    }
    c.write(b".\r\n");
    let r = c.last();
    c.line("QUIT");
    r
}

/// A figure of /proc/PID/status, in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| {
            v.trim_start_matches(':')
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

struct Pair {
    _dir: tempfile::TempDir,
    a_data: PathBuf,
    b_data: PathBuf,
    a: Process,
    _b: Process,
}

/// A (the server measured: local domain local.test, remote.test routed to B) and B.
fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let (a_port, b_port) = (free_port(), free_port());
    let (a_data, b_data) = (dir.path().join("a"), dir.path().join("b"));
    let b_cfg = write(
        dir.path(),
        "b.toml",
        format!(
            r#"hostname = "mx.remote.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.2:{b_port}"
[relay]
mynetworks = ["127.0.0.0/8"]
[limits]
max_message_size = "50MB"
[[domain]]
name = "remote.test"
mailboxes = "*"
"#,
            d = b_data.display()
        ),
    );
    let a_cfg = write(
        dir.path(),
        "a.toml",
        format!(
            r#"hostname = "mx.local.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{a_port}"
[relay]
mynetworks = ["127.0.0.1/32"]
[relay.routes]
"remote.test" = "[127.0.0.2]:{b_port}"
[limits]
max_message_size = "50MB"
[[domain]]
name = "local.test"
mailboxes = "*"
[queue]
retry = ["1s"]
"#,
            d = a_data.display()
        ),
    );
    let b = Process::serve(
        &b_cfg,
        format!("127.0.0.2:{b_port}").parse().unwrap(),
        &dir.path().join("b.log"),
    );
    let a = Process::serve(
        &a_cfg,
        format!("127.0.0.1:{a_port}").parse().unwrap(),
        &dir.path().join("a.log"),
    );
    Pair {
        _dir: dir,
        a_data,
        b_data,
        a,
        _b: b,
    }
}

/// The delivered copies of `user@domain` in `data`, without the trace fields, sorted.
fn delivered(data: &Path, domain: &str, user: &str, n: usize) -> Vec<Vec<u8>> {
    let mut got: Vec<Vec<u8>> = maildir_new(data, domain, user, n, Duration::from_secs(120))
        .iter()
        .map(|m| strip_trace(m))
        .collect();
    got.sort();
    got
}

#[test]
fn a_25_mb_message_is_delivered_and_relayed_in_bounded_memory() {
    let p = pair();
    let pid = p.a.child.id();
    // Warm up: a small message each way, so that the figure below is the large ones' cost.
    for to in ["warm@local.test", "warm@remote.test"] {
        let r = send(p.a.addr, to, b"Subject: warm\r\n\r\nup\r\n");
        assert!(r.starts_with("250 "), "{r}");
    }
    delivered(&p.a_data, "local.test", "warm", 1);
    delivered(&p.b_data, "remote.test", "warm", 1);
    let before = status_kib(pid, "VmHWM");

    let local = message(25 * MB, "local");
    let r = send(p.a.addr, "bob@local.test", &local);
    assert!(r.starts_with("250 "), "{r}");
    let remote = message(25 * MB, "remote");
    let r = send(p.a.addr, "carol@remote.test", &remote);
    assert!(r.starts_with("250 "), "{r}");

    let got = delivered(&p.a_data, "local.test", "bob", 1);
    assert_eq!(got.len(), 1);
    assert!(got[0] == local, "the local copy differs from what was sent");
    let got = delivered(&p.b_data, "remote.test", "carol", 1);
    assert_eq!(got.len(), 1);
    // B's copy carries A's Received field too: strip_trace took B's; A's is the next.
    let relayed = &got[0];
    let at = relayed
        .windows(b"From: big@".len())
        .position(|w| w == b"From: big@")
        .unwrap();
    assert!(
        relayed[at..] == remote[..],
        "the relayed copy differs from what was sent"
    );

    let grown = status_kib(pid, "VmHWM").saturating_sub(before);
    eprintln!("peak resident memory grew by {grown} KiB for two 25 MB messages");
    assert!(
        grown < 24 * 1024,
        "peak resident memory grew by {grown} KiB for a 25 MB message"
    );
    // Nothing left behind: the spool holds no message and no spill file.
    let queue = std::fs::read_dir(p.a_data.join("queue"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect::<Vec<_>>();
    assert!(queue.is_empty(), "left in the queue: {queue:?}");
}

#[test]
fn eight_25_mb_messages_at_once_do_not_need_eight_times_the_memory() {
    let p = pair();
    let pid = p.a.child.id();
    let r = send(p.a.addr, "warm@local.test", b"Subject: warm\r\n\r\nup\r\n");
    assert!(r.starts_with("250 "), "{r}");
    delivered(&p.a_data, "local.test", "warm", 1);
    let before = status_kib(pid, "VmHWM");

    let n = 8;
    let addr = p.a.addr;
    let senders: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                let m = message(25 * MB, &format!("m{i}"));
                let to = if i % 2 == 0 {
                    "many@local.test"
                } else {
                    "many@remote.test"
                };
                let r = send(addr, to, &m);
                (r, m)
            })
        })
        .collect();
    let mut sent = Vec::new();
    for s in senders {
        let (r, m) = s.join().unwrap();
        assert!(r.starts_with("250 "), "{r}");
        sent.push(m);
    }
    let local = delivered(&p.a_data, "local.test", "many", n / 2);
    let remote = delivered(&p.b_data, "remote.test", "many", n / 2);
    assert_eq!(local.len() + remote.len(), n);
    let grown = status_kib(pid, "VmHWM").saturating_sub(before);
    eprintln!("peak resident memory grew by {grown} KiB for {n} concurrent 25 MB messages");
    assert!(
        grown < 64 * 1024,
        "peak resident memory grew by {grown} KiB for {n} concurrent 25 MB messages ({} MB)",
        n * 25
    );
}
