//! Abuse refused early, with the real binary: DNS blocklists (`[antispam] dnsbl`) answered by the
//! test DNS server (RFC 5782 query names: the client's octets reversed under the zone).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use estafeta_e2e::dns::{DnsServer, Zones};
use estafeta_e2e::{Client, Process, free_port, test_config};

fn serve(dir: &Path, dns: SocketAddr, extra: &str) -> (Process, SocketAddr) {
    let port = free_port();
    let text = test_config(
        &dir.join("data"),
        port,
        &format!("[dns]\nnameservers = [\"{dns}\"]\n\n{extra}"),
    );
    let config = dir.join("c.toml");
    std::fs::write(&config, text).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    (Process::serve(&config, addr, &dir.join("log")), addr)
}

fn greeting(addr: SocketAddr) -> (String, bool) {
    let mut c = Client::connect(addr);
    c.set_timeout(Duration::from_secs(60));
    let g = c.last();
    let closed = g.starts_with("554") && c.is_closed();
    (g, closed)
}

#[test]
fn a_client_listed_in_a_dnsbl_is_refused_at_connect() {
    let dns = DnsServer::start(Zones::new().a("1.0.0.127.listed.test", "127.0.0.2"));
    let dir = tempfile::tempdir().unwrap();

    // Listed in the second zone: 554 naming it, then the connection is closed.
    let (server, addr) = serve(
        dir.path(),
        dns.addr,
        "[relay]\nmynetworks = []\n[antispam]\ndnsbl = [\"clean.test\", \"listed.test\"]\n",
    );
    let (g, closed) = greeting(addr);
    assert_eq!(
        g,
        "554 5.7.1 Service unavailable; client [127.0.0.1] blocked using listed.test",
        "{}",
        server.log_text()
    );
    assert!(closed);
    assert!(
        server.log_text().contains("reject CONNECT"),
        "{}",
        server.log_text()
    );
    drop(server);

    // mynetworks is exempt.
    let d = tempfile::tempdir().unwrap();
    let (server, addr) = serve(
        d.path(),
        dns.addr,
        "[relay]\nmynetworks = [\"127.0.0.1/32\"]\n[antispam]\ndnsbl = [\"listed.test\"]\n",
    );
    assert!(
        greeting(addr).0.starts_with("220 "),
        "{}",
        server.log_text()
    );
    drop(server);

    // Not listed: greeted.
    let d = tempfile::tempdir().unwrap();
    let (server, addr) = serve(
        d.path(),
        dns.addr,
        "[relay]\nmynetworks = []\n[antispam]\ndnsbl = [\"clean.test\"]\n",
    );
    assert!(
        greeting(addr).0.starts_with("220 "),
        "{}",
        server.log_text()
    );
    drop(server);

    // A blocklist that does not answer lets the client pass (after its timeout).
    let port = dns.addr;
    drop(dns);
    let d = tempfile::tempdir().unwrap();
    let (server, addr) = serve(
        d.path(),
        port,
        "[relay]\nmynetworks = []\n[antispam]\ndnsbl = [\"listed.test\"]\n",
    );
    let started = Instant::now();
    assert!(
        greeting(addr).0.starts_with("220 "),
        "{}",
        server.log_text()
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Weights and a threshold as postscreen has them: a client is refused when the weights of
/// the lists that list it add up to `dnsbl_threshold`; a filter restricts which answers count;
/// a negative weight is an allowlist.
#[test]
fn dnsbl_weights_add_up_to_the_threshold() {
    let dns = DnsServer::start(
        Zones::new()
            .a("1.0.0.127.one.test", "127.0.0.2")
            .a("1.0.0.127.two.test", "127.0.0.2")
            .a("1.0.0.127.ten.test", "127.0.0.10")
            .a("1.0.0.127.white.test", "127.0.0.2"),
    );
    let cases = [
        // Listed by two.test (2) only: the filter of ten.test does not take its 127.0.0.10.
        (r#"["two.test*2", "ten.test=127.0.0.[2..3]*5"]"#, "220 "),
        // 1 + 2 reaches 3: refused, naming the list that weighs most.
        (
            r#"["one.test", "two.test*2"]"#,
            "554 5.7.1 Service unavailable; client [127.0.0.1] blocked using two.test",
        ),
        // The filter matches this time.
        (
            r#"["ten.test=127.0.[0..255].[4;10..11]*3"]"#,
            "554 5.7.1 Service unavailable; client [127.0.0.1] blocked using ten.test",
        ),
        // An allowlist outweighs a listing.
        (r#"["one.test*3", "white.test*-5"]"#, "220 "),
    ];
    for (zones, want) in cases {
        let d = tempfile::tempdir().unwrap();
        let (server, addr) = serve(
            d.path(),
            dns.addr,
            &format!(
                "[relay]\nmynetworks = []\n[antispam]\ndnsbl = {zones}\ndnsbl_threshold = 3\n"
            ),
        );
        let (g, _) = greeting(addr);
        assert!(g.starts_with(want), "{zones}: {g}\n{}", server.log_text());
        if want.starts_with("220") && zones.contains("two.test") {
            assert!(
                server.log_text().contains("dnsbl pass"),
                "{}",
                server.log_text()
            );
        }
    }
}

#[test]
fn early_talkers_are_refused_and_patient_clients_greeted_after_the_delay() {
    let dns = DnsServer::start(Zones::new());
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = serve(
        dir.path(),
        dns.addr,
        "[relay]\nmynetworks = []\n[limits]\ngreet_delay = \"1s\"\n",
    );
    // Talks at once: 554 5.5.1, disconnected.
    let mut c = Client::connect(addr);
    c.line("EHLO bot.example");
    let r = c.last();
    assert!(r.starts_with("554 5.5.1 "), "{r}\n{}", server.log_text());
    assert!(c.is_closed());
    // Waits: greeted after the delay, then served as usual.
    let started = Instant::now();
    let mut c = Client::connect(addr);
    let g = c.last();
    assert!(g.starts_with("220 "), "{g}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(c.cmd("EHLO patient.example").starts_with("250"));
    assert!(
        server.log_text().contains("early talker"),
        "{}",
        server.log_text()
    );
    drop(server);

    // mynetworks clients are not delayed.
    let d = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(
        d.path(),
        dns.addr,
        "[relay]\nmynetworks = [\"127.0.0.1/32\"]\n[limits]\ngreet_delay = \"5s\"\n",
    );
    let started = Instant::now();
    let mut c = Client::connect(addr);
    assert!(c.last().starts_with("220 "));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

fn try_send(addr: SocketAddr, from: &str, to: &str) -> String {
    let mut c = Client::connect(addr);
    c.reply();
    c.cmd("EHLO client.example");
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd(&format!("RCPT TO:<{to}>"));
    if !r.starts_with("250") {
        return r;
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.write(b"Subject: rate\r\n\r\nx\r\n.\r\n");
    c.last()
}

#[test]
fn rate_limits_refuse_and_name_the_limit() {
    let dns = DnsServer::start(Zones::new());
    // Connections per address: three, then 421 naming the limit.
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = serve(
        dir.path(),
        dns.addr,
        "[relay]\nmynetworks = []\n[limits]\nconnection_rate_per_ip = \"4/1h\"\n",
    );
    // Process::serve's readiness check was the first connection.
    for _ in 0..3 {
        let mut c = Client::connect(addr);
        assert!(c.last().starts_with("220 "), "{}", server.log_text());
    }
    let mut c = Client::connect(addr);
    let r = c.last();
    assert!(
        r.starts_with("421 4.7.0 ") && r.contains("connection_rate_per_ip 4/1h"),
        "{r}"
    );
    assert!(
        server.log_text().contains("reject CONNECT"),
        "{}",
        server.log_text()
    );
    drop(server);

    // Messages per address: two, then 450 4.7.1 at RCPT; a mynetworks client is exempt.
    let d = tempfile::tempdir().unwrap();
    let (server, addr) = serve(
        d.path(),
        dns.addr,
        "[relay]\nmynetworks = []\n[verify]\nspf = \"off\"\ndkim = \"off\"\ndmarc = \"off\"\narc = \"off\"\n[limits]\nmessage_rate_per_ip = \"2/1h\"\n",
    );
    for _ in 0..2 {
        let r = try_send(addr, "a@sender.test", "bob@example.test");
        assert!(r.starts_with("250 "), "{r}");
    }
    let r = try_send(addr, "a@sender.test", "bob@example.test");
    assert!(
        r.starts_with("450 4.7.1 ") && r.contains("message_rate_per_ip 2/1h"),
        "{r}"
    );
    assert!(
        server.log_text().contains("rate limit"),
        "{}",
        server.log_text()
    );
    drop(server);

    // Recipients per address, counted one by one.
    let d = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(
        d.path(),
        dns.addr,
        "[relay]\nmynetworks = []\n[verify]\nspf = \"off\"\ndkim = \"off\"\ndmarc = \"off\"\narc = \"off\"\n[limits]\nrecipient_rate_per_ip = \"3/1h\"\n",
    );
    let mut c = Client::connect(addr);
    c.reply();
    c.cmd("EHLO client.example");
    assert!(c.cmd("MAIL FROM:<a@sender.test>").starts_with("250"));
    for n in 0..3 {
        let r = c.cmd(&format!("RCPT TO:<r{n}@example.test>"));
        assert!(r.starts_with("250"), "{r}");
    }
    let r = c.cmd("RCPT TO:<r3@example.test>");
    assert!(
        r.starts_with("450 4.7.1 ") && r.contains("recipient_rate_per_ip 3/1h"),
        "{r}"
    );
}

/// Slowloris: a client that trickles one byte at a time without ever finishing a command is
/// cut off when the command timeout runs out, counted from the last reply, not from its last
/// byte.
#[test]
fn a_trickling_client_is_cut_off_at_the_command_timeout() {
    use std::io::{BufRead, BufReader, Write};
    let dns = DnsServer::start(Zones::new());
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = serve(dir.path(), dns.addr, "[limits]\ncommand_timeout = \"2s\"\n");
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    let started = Instant::now();
    let mut writer = stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        // One byte every 300 ms for 8 s, never a line end.
        for b in b"NOOPNOOPNOOPNOOPNOOPNOOPNOOP".iter().cycle().take(27) {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let mut line = String::new();
    let _ = reader.read_line(&mut line);
    let elapsed = started.elapsed();
    assert!(
        line.starts_with("421 4.4.2 "),
        "{line:?}\n{}",
        server.log_text()
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "cut off after {elapsed:?}"
    );
    let _ = trickle.join();
}
