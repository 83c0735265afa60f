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
