//! Relaying with dnsmasq as the DNS server — the third-party resolver setup the acceptance
//! suite uses (`--mx-host`, `--host-record`, `--local=/test/` for NXDOMAIN): the server under
//! test resolves through `[dns] nameservers`, tries the MX hosts in preference order on port 25
//! (the first one down), and bounces a null-MX and a non-existent domain at once.
//! Skipped with a note when dnsmasq is not installed (.ci/run installs it) or port 25 may not
//! be bound.

use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::{Process, free_port, maildir_new, submit};

struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dnsmasq(port: u16) -> Option<Dnsmasq> {
    let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let child = Command::new(bin)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--group=root",
            "--local=/test/",
            "--mx-host=dm.test,mx1.dm.test,10",
            "--mx-host=dm.test,mx2.dm.test,20",
            "--host-record=mx1.dm.test,127.0.0.8",
            "--host-record=mx2.dm.test,127.0.0.7",
            "--mx-host=nm.test,.,0",
        ])
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let d = Dnsmasq(child);
    // Up when its UDP port is taken.
    let deadline = Instant::now() + Duration::from_secs(10);
    while UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "dnsmasq did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(d)
}

fn write(dir: &Path, name: &str, text: String) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn mx_order_null_mx_and_nxdomain_through_dnsmasq() {
    if let Err(e) = TcpListener::bind("127.0.0.254:25")
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        estafeta_e2e::skip("binding port 25 needs root or CAP_NET_BIND_SERVICE");
        return;
    }
    let dns_port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let Some(_dns) = dnsmasq(dns_port) else {
        estafeta_e2e::skip("dnsmasq not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The second MX: an estafeta instance on port 25 of 127.0.0.7. The first (127.0.0.8)
    // has nothing listening.
    let peer_cfg = write(
        dir.path(),
        "peer.toml",
        format!(
            r#"hostname = "mx2.dm.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.7:25"
[relay]
mynetworks = []
[[domain]]
name = "dm.test"
mailboxes = "*"
"#,
            d = dir.path().join("peer").display()
        ),
    );
    let port = free_port();
    let cfg = write(
        dir.path(),
        "sender.toml",
        format!(
            r#"hostname = "mx.sender.test"
data_dir = "{d}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{port}"
[relay]
mynetworks = ["127.0.0.1/32"]
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
[[domain]]
name = "example.test"
mailboxes = "*"
[queue]
retry = ["1s"]
"#,
            d = dir.path().join("sender").display()
        ),
    );
    let peer = Process::serve(
        &peer_cfg,
        "127.0.0.7:25".parse().unwrap(),
        &dir.path().join("peer.log"),
    );
    let sender = Process::serve(
        &cfg,
        format!("127.0.0.1:{port}").parse().unwrap(),
        &dir.path().join("sender.log"),
    );
    for to in ["user@dm.test", "x@nm.test", "y@nowhere.test"] {
        submit(
            sender.addr,
            "alice@example.test",
            &[to],
            format!("Subject: to {to}\r\n\r\nhello\r\n").as_bytes(),
        );
    }
    let got = maildir_new(
        &dir.path().join("peer"),
        "dm.test",
        "user",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(
        got.len(),
        1,
        "sender:\n{}\npeer:\n{}",
        sender.log_text(),
        peer.log_text()
    );
    let log = sender.log_text();
    assert!(log.contains("mx2.dm.test[127.0.0.7]:25 said: 250"), "{log}");
    // Both bounces at once, no retry.
    let bounces = maildir_new(
        &dir.path().join("sender"),
        "example.test",
        "alice",
        2,
        Duration::from_secs(15),
    );
    let text: Vec<String> = bounces
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert_eq!(text.len(), 2, "{log}");
    let find = |rcpt: &str| {
        text.iter()
            .find(|b| b.contains(&format!("Final-Recipient: rfc822; {rcpt}")))
            .unwrap_or_else(|| panic!("no bounce for {rcpt}: {text:?}"))
    };
    assert!(find("x@nm.test").contains("Status: 5.1.10"));
    assert!(find("y@nowhere.test").contains("Status: 5.1.2"));
    assert!(!log.contains("to=x@nm.test status=\"deferred\""), "{log}");
    assert!(
        !log.contains("to=y@nowhere.test status=\"deferred\""),
        "{log}"
    );
}
