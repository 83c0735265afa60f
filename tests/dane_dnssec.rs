//! DANE (RFC 7672) against real DNSSEC: a zone signed by `ldns-signzone` (Debian's ldnsutils),
//! served by NSD on 127.0.0.22, validated by Unbound on 127.0.0.23 (its trust anchor the
//! zone's key), which the sender names with `[dns] nameservers` and `dnssec = true`. The peer
//! is an estafeta on port 25 of 127.0.0.21 whose certificate the TLSA records describe.
//!
//! | domain | TLSA of its MX | expected |
//! |---|---|---|
//! | good.dnssec.test | 3 1 1, the peer's key | delivered, `tls_policy="dane"`, verified |
//! | bad.dnssec.test | 3 1 1, another key | deferred (`DANE: no TLSA record matches`), never sent |
//! | bogus.dnssec.test | 3 1 1, altered after signing | Unbound answers SERVFAIL: deferred, never sent |
//!
//! Needs root (port 25) and ldnsutils, nsd and unbound (CI installs them); elsewhere it is
//! skipped with a note.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::{Process, free_port, maildir_new, submit};

/// A child process killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(cmd: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(cmd).exists())
}

fn run(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until a DNS server answers on `addr` (a query for the zone's SOA).
fn wait_dns(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    // A minimal query: id 1, RD, one question "dnssec.test. SOA IN".
    let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["dnssec", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 6, 0, 1]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    loop {
        let _ = sock.send_to(&q, addr);
        let mut buf = [0u8; 512];
        if sock.recv_from(&mut buf).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} on {addr} never answered");
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dane_against_a_signed_zone_and_a_validating_resolver() {
    let missing: Vec<&str> = ["ldns-keygen", "ldns-signzone", "nsd", "unbound"]
        .into_iter()
        .filter(|c| !have(c))
        .collect();
    if !missing.is_empty() {
        estafeta_e2e::skip(&format!(
            "dane_dnssec: {} not installed",
            missing.join(", ")
        ));
        return;
    }
    if let Err(e) = std::net::TcpListener::bind("127.0.0.21:25")
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        estafeta_e2e::skip("dane_dnssec: binding port 25 needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The peer's certificate, and the SHA-256 of its key (TLSA 3 1 1).
    estafeta_e2e::self_signed(d, "mx", &["mx.good.dnssec.test"]);
    let good = run(
        d,
        "openssl x509 -in mx.pem -pubkey -noout | openssl pkey -pubin -outform DER \
         | openssl dgst -sha256 -hex | sed 's/.*= //'",
    );
    assert_eq!(good.len(), 64, "{good}");
    let bad = format!(
        "{}{}",
        if good.starts_with('0') { "1" } else { "0" },
        &good[1..]
    );
    let zone = format!(
        "$ORIGIN dnssec.test.\n$TTL 60\n\
         @ IN SOA ns.dnssec.test. hostmaster.dnssec.test. 1 3600 600 86400 60\n\
         @ IN NS ns.dnssec.test.\nns IN A 127.0.0.22\n\
         good IN MX 10 mx.good.dnssec.test.\nmx.good IN A 127.0.0.21\n\
         _25._tcp.mx.good IN TLSA 3 1 1 {good}\n\
         bad IN MX 10 mx.bad.dnssec.test.\nmx.bad IN A 127.0.0.21\n\
         _25._tcp.mx.bad IN TLSA 3 1 1 {bad}\n\
         bogus IN MX 10 mx.bogus.dnssec.test.\nmx.bogus IN A 127.0.0.21\n\
         _25._tcp.mx.bogus IN TLSA 3 1 1 {good}\n"
    );
    std::fs::write(d.join("dnssec.test.zone"), zone).unwrap();
    let ksk = run(d, "ldns-keygen -a ECDSAP256SHA256 -k dnssec.test");
    let zsk = run(d, "ldns-keygen -a ECDSAP256SHA256 dnssec.test");
    run(d, &format!("ldns-signzone dnssec.test.zone {zsk} {ksk}"));
    // bogus: its TLSA data altered after signing, so its signature no longer verifies.
    let signed = std::fs::read_to_string(d.join("dnssec.test.zone.signed")).unwrap();
    let mut tampered = String::new();
    let mut altered = 0;
    for line in signed.lines() {
        if line.starts_with("_25._tcp.mx.bogus.dnssec.test.") && line.contains("TLSA\t3 1 1") {
            tampered.push_str(&line.replace(&good, &bad));
            altered += 1;
        } else {
            tampered.push_str(line);
        }
        tampered.push('\n');
    }
    assert_eq!(altered, 1, "{signed}");
    std::fs::write(d.join("dnssec.test.zone.signed"), tampered).unwrap();
    std::fs::copy(d.join(format!("{ksk}.key")), d.join("anchor.key")).unwrap();

    let (nsd_port, unbound_port) = (free_port(), free_port());
    let dd = d.display();
    std::fs::write(
        d.join("nsd.conf"),
        format!(
            "server:\n  ip-address: 127.0.0.22@{nsd_port}\n  username: \"\"\n  database: \"\"\n\
             \x20 zonelistfile: \"{dd}/zone.list\"\n  xfrdfile: \"{dd}/xfrd.state\"\n\
             \x20 pidfile: \"{dd}/nsd.pid\"\n  zonesdir: \"{dd}\"\n  logfile: \"{dd}/nsd.log\"\n\
             remote-control:\n  control-enable: no\n\
             zone:\n  name: dnssec.test\n  zonefile: dnssec.test.zone.signed\n"
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("unbound.conf"),
        format!(
            "server:\n  interface: 127.0.0.23\n  port: {unbound_port}\n  username: \"\"\n\
             \x20 chroot: \"\"\n  directory: \"{dd}\"\n  pidfile: \"{dd}/unbound.pid\"\n\
             \x20 use-syslog: no\n  logfile: \"{dd}/unbound.log\"\n\
             \x20 do-not-query-localhost: no\n  trust-anchor-file: \"{dd}/anchor.key\"\n\
             \x20 module-config: \"validator iterator\"\n  access-control: 127.0.0.0/8 allow\n\
             \x20 local-zone: \"test.\" nodefault\n  val-log-level: 2\n\
             stub-zone:\n  name: \"dnssec.test\"\n  stub-addr: 127.0.0.22@{nsd_port}\n\
             remote-control:\n  control-enable: no\n"
        ),
    )
    .unwrap();
    let _nsd = Daemon(
        Command::new("nsd")
            .args(["-d", "-c"])
            .arg(d.join("nsd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_dns(format!("127.0.0.22:{nsd_port}").parse().unwrap(), "nsd");
    let _unbound = Daemon(
        Command::new("unbound")
            .args(["-d", "-c"])
            .arg(d.join("unbound.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let resolver = format!("127.0.0.23:{unbound_port}");
    wait_dns(resolver.parse().unwrap(), "unbound");

    let peer_cfg = d.join("peer.toml");
    let mut peer_text = format!(
        "hostname = \"mx.good.dnssec.test\"\ndata_dir = \"{dd}/peer\"\nrun_as_root = true\n\
         [[listener]]\nkind = \"smtp\"\naddress = \"127.0.0.21:25\"\n\
         [tls]\ncertificate = \"{dd}/mx.pem\"\nprivate_key = \"{dd}/mx.key\"\n\
         [relay]\nmynetworks = []\n[dns]\nnameservers = [\"{resolver}\"]\n"
    );
    for dom in ["good", "bad", "bogus"] {
        peer_text.push_str(&format!(
            "[[domain]]\nname = \"{dom}.dnssec.test\"\nmailboxes = \"*\"\n"
        ));
    }
    std::fs::write(&peer_cfg, peer_text).unwrap();
    let peer = Process::serve(
        &peer_cfg,
        "127.0.0.21:25".parse().unwrap(),
        &d.join("peer.log"),
    );
    let port = free_port();
    let sender_cfg = d.join("sender.toml");
    std::fs::write(
        &sender_cfg,
        format!(
            "hostname = \"mx.sender.test\"\ndata_dir = \"{dd}/sender\"\nrun_as_root = true\n\
             [[listener]]\nkind = \"smtp\"\naddress = \"127.0.0.1:{port}\"\n\
             [relay]\nmynetworks = [\"127.0.0.1/32\"]\n\
             [dns]\nnameservers = [\"{resolver}\"]\ndnssec = true\n\
             [[domain]]\nname = \"example.test\"\nmailboxes = \"*\"\n[queue]\nretry = [\"1s\"]\n"
        ),
    )
    .unwrap();
    let sender = Process::serve(
        &sender_cfg,
        format!("127.0.0.1:{port}").parse().unwrap(),
        &d.join("sender.log"),
    );
    let logs = || {
        format!(
            "sender:\n{}\npeer:\n{}\nunbound:\n{}",
            sender.log_text(),
            peer.log_text(),
            std::fs::read_to_string(d.join("unbound.log")).unwrap_or_default()
        )
    };

    for to in [
        "bob@good.dnssec.test",
        "carol@bad.dnssec.test",
        "dave@bogus.dnssec.test",
    ] {
        submit(
            sender.addr,
            "alice@example.test",
            &[to],
            b"Subject: over DANE\r\n\r\nhello\r\n",
        );
    }
    let got = maildir_new(
        &d.join("peer"),
        "good.dnssec.test",
        "bob",
        1,
        Duration::from_secs(20),
    );
    assert_eq!(got.len(), 1, "{}", logs());
    wait_for(
        "the TLS status line of good.dnssec.test",
        || sender.log_text().contains("domain=good.dnssec.test"),
        logs,
    );
    let log = sender.log_text();
    let status = log
        .lines()
        .find(|l| l.contains("TLS status") && l.contains("domain=good.dnssec.test"))
        .unwrap();
    for field in [
        "tls_policy=\"dane\"",
        "tls_policy_from=\"dane\"",
        "tls_verified=true",
    ] {
        assert!(status.contains(field), "{field}: {status}");
    }
    for (to, why) in [
        ("carol@bad.dnssec.test", "DANE: no TLSA record matches"),
        ("dave@bogus.dnssec.test", "DANE for mx.bogus.dnssec.test"),
    ] {
        wait_for(
            &format!("two deferrals of {to}"),
            || {
                sender
                    .log_text()
                    .lines()
                    .filter(|l| {
                        l.contains(&format!("to={to} status=\"deferred\"")) && l.contains(why)
                    })
                    .count()
                    >= 2
            },
            logs,
        );
        assert!(!peer.log_text().contains(to), "{}", logs());
    }
}
