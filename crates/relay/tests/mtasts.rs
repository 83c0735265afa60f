//! MTA-STS (RFC 8461) end to end in the relay: the real hickory resolver asks the test DNS
//! server (tests/dns.rs) for MX and `_mta-sts` TXT records, the policy comes over HTTPS from a
//! local server whose certificate a test CA signed, and the message goes to a local SMTP peer
//! that offers STARTTLS — all on 127.0.0.1.
//!
//! Domains: `good.test` (enforce, its MX matches, the MX certificate names it: delivered over
//! verified TLS), `mismatch.test` (enforce, its MX is not in the policy: deferred, nothing
//! sent), `badcert.test` (enforce, the MX certificate does not name the MX: deferred),
//! `testing.test` (testing, MX not in the policy: delivered anyway), `plain.test` (no record:
//! delivered as usual), `short.test` (enforce, max_age 1: once expired and no longer served,
//! no policy), `redirect.test` (the policy URL redirects: no policy).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use estafeta_proto::{MailParams, RcptParams};
use estafeta_queue::Outcome;
use estafeta_relay::client::{ClientConfig, OutboundMessage, TlsPolicy};
use estafeta_relay::dane::SecureDns;
use estafeta_relay::mtasts::{MtaSts, PolicyCache};
use estafeta_relay::remote::{Hop, Remote, StsSettings};
use estafeta_relay::resolve::{IpVersion, LocalIdentity, Resolver};
use estafeta_relay::tlsrpt::{PolicyApplied, TlsReporter, TlsResult};

/// Keeps what the relay reports for TLS-RPT.
#[derive(Debug, Default)]
struct Collected(Mutex<Vec<TlsResult>>);

impl TlsReporter for Collected {
    fn record(&self, result: TlsResult) {
        self.0.lock().unwrap().push(result);
    }
}
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

mod common;
use common::{acceptor, certificate};

#[allow(dead_code)]
#[path = "../../../tests/dns.rs"]
mod dns;
use dns::{DnsServer, Zones};

/// The policy server: answers `GET /.well-known/mta-sts.txt` by the Host header from
/// `policies` (host → response), counting requests per host.
struct PolicyServer {
    addr: SocketAddr,
    requests: Arc<Mutex<HashMap<String, usize>>>,
    /// When set, every request gets 404.
    gone: Arc<AtomicBool>,
}

async fn policy_server(tls: TlsAcceptor, policies: HashMap<String, String>) -> PolicyServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(HashMap::new()));
    let gone = Arc::new(AtomicBool::new(false));
    let (r, g) = (requests.clone(), gone.clone());
    let policies = Arc::new(policies);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (tls, r, g, policies) = (tls.clone(), r.clone(), g.clone(), policies.clone());
            tokio::spawn(async move {
                let Ok(mut stream) = tls.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let host = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("host").then(|| v.trim().to_string())
                    })
                    .unwrap_or_default();
                *r.lock().unwrap().entry(host.clone()).or_default() += 1;
                let ok_path = head.starts_with("GET /.well-known/mta-sts.txt HTTP/1.1\r\n");
                let response = match policies.get(&host) {
                    _ if g.load(Ordering::SeqCst) || !ok_path => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
                    }
                    Some(text) if text.starts_with("HTTP/") => text.clone(),
                    Some(text) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    ),
                    None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    PolicyServer {
        addr,
        requests,
        gone,
    }
}

/// An SMTP peer on `addr` offering STARTTLS with `tls` (or, with `starttls` false, nothing
/// but plaintext); counts the messages it accepted.
async fn smtp_peer(addr: &str, tls: TlsAcceptor, starttls: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, messages, _) = smtp_peer_offering(addr, tls, starttls, false).await;
    (addr, messages)
}

/// [`smtp_peer`], offering REQUIRETLS inside TLS when `requiretls`; also returns the MAIL
/// commands it got over TLS.
async fn smtp_peer_offering(
    addr: &str,
    tls: TlsAcceptor,
    starttls: bool,
    requiretls: bool,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let messages = Arc::new(AtomicUsize::new(0));
    let mails = Arc::new(Mutex::new(Vec::new()));
    let m = messages.clone();
    let seen = mails.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (tls, m, seen) = (tls.clone(), m.clone(), seen.clone());
            tokio::spawn(async move {
                let mut plain = BufReader::new(tcp);
                plain
                    .get_mut()
                    .write_all(b"220 peer.test ESMTP\r\n")
                    .await
                    .unwrap();
                let mut line = String::new();
                loop {
                    line.clear();
                    if plain.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    if verb == "DATA" {
                        // Plaintext content: counted, so that a test sees it was sent.
                        m.fetch_add(1, Ordering::SeqCst);
                    }
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" if !starttls => b"250 peer.test\r\n",
                        "EHLO" => b"250-peer.test\r\n250 STARTTLS\r\n",
                        "STAR" => b"220 2.0.0 go ahead\r\n",
                        "QUIT" => b"221 2.0.0 bye\r\n",
                        _ => b"250 2.0.0 Ok\r\n",
                    };
                    plain.get_mut().write_all(reply).await.unwrap();
                    if verb == "STAR" {
                        break;
                    }
                    if verb == "QUIT" {
                        return;
                    }
                }
                let Ok(stream) = tls.accept(plain.into_inner()).await else {
                    return;
                };
                let mut s = BufReader::new(stream);
                let mut data = false;
                loop {
                    line.clear();
                    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let reply: &[u8] = if data {
                        if line != ".\r\n" {
                            continue;
                        }
                        data = false;
                        m.fetch_add(1, Ordering::SeqCst);
                        b"250 2.0.0 Ok: queued\r\n"
                    } else {
                        match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
                            "EHLO" if requiretls => b"250-peer.test\r\n250 REQUIRETLS\r\n",
                            "EHLO" => b"250 peer.test\r\n",
                            "MAIL" => {
                                seen.lock().unwrap().push(line.trim_end().to_string());
                                b"250 2.0.0 Ok\r\n"
                            }
                            "DATA" => {
                                data = true;
                                b"354 go ahead\r\n"
                            }
                            "QUIT" => {
                                let _ = s.get_mut().write_all(b"221 2.0.0 bye\r\n").await;
                                return;
                            }
                            _ => b"250 2.0.0 Ok\r\n",
                        }
                    };
                    if s.get_mut().write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, messages, mails)
}

const ENFORCE_GOOD: &str =
    "version: STSv1\nmode: enforce\nmx: mx.good.test\nmx: *.good.test\nmax_age: 86400\n";

struct World {
    remote: Remote,
    sts: MtaSts,
    policies: PolicyServer,
    delivered: Arc<AtomicUsize>,
    /// Messages (DATA commands) the plaintext-only peer got.
    plain: Arc<AtomicUsize>,
    /// Messages the REQUIRETLS peer (mx.secure.test) accepted, and its MAIL commands.
    secure: Arc<AtomicUsize>,
    secure_mails: Arc<Mutex<Vec<String>>>,
    dns: DnsServer,
    zones: Zones,
    /// What the relay reported for TLS-RPT.
    reports: Arc<Collected>,
    /// The SMTP peers' certificate (PEM file).
    mx_pem: std::path::PathBuf,
}

async fn world(dir: &Path) -> Option<World> {
    // The MX certificate names mx.good.test and the hosts that are not in a policy, never
    // mx.badcert.test; the policy server's names every mta-sts host.
    let (mx_cert, mx_key) = certificate(
        dir,
        "mx",
        &[
            "mx.good.test",
            "mx.elsewhere.test",
            "mx.short.test",
            "mx.secure.test",
        ],
    )?;
    let sts_hosts = [
        "mta-sts.testbad.test",
        "mta-sts.secure.test",
        "mta-sts.nostarttls.test",
        "mta-sts.sticky.test",
        "mta-sts.good.test",
        "mta-sts.mismatch.test",
        "mta-sts.badcert.test",
        "mta-sts.testing.test",
        "mta-sts.short.test",
        "mta-sts.redirect.test",
    ];
    let (web_cert, web_key) = certificate(dir, "web", &sts_hosts)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(mx_cert.clone()).unwrap();
    roots.add(web_cert.clone()).unwrap();
    let roots = Arc::new(roots);

    let mut zones = Zones::new()
        .ttl(0)
        .mx("good.test", 10, "mx.good.test")
        .mx("mismatch.test", 10, "mx.elsewhere.test")
        .mx("badcert.test", 10, "mx.badcert.test")
        .mx("testing.test", 10, "mx.elsewhere.test")
        .mx("plain.test", 10, "mx.elsewhere.test")
        .mx("flaky.test", 10, "mx.elsewhere.test")
        .mx("testbad.test", 10, "mx.badcert.test")
        .servfail("_mta-sts.flaky.test")
        .mx("short.test", 10, "mx.elsewhere.test")
        .mx("redirect.test", 10, "mx.elsewhere.test")
        .mx("sticky.test", 10, "mx.elsewhere.test")
        .mx("nostarttls.test", 10, "mx.nostarttls.test")
        .a("mx.nostarttls.test", "127.0.0.2")
        .mx("secure.test", 10, "mx.secure.test")
        .a("mx.secure.test", "127.0.0.3");
    for host in ["mx.good.test", "mx.elsewhere.test", "mx.badcert.test"] {
        zones = zones.a(host, "127.0.0.1");
    }
    for host in sts_hosts {
        zones = zones.a(host, "127.0.0.1");
        let domain = host.strip_prefix("mta-sts.").unwrap();
        if domain != "sticky.test" {
            zones = zones.txt(
                &format!("_mta-sts.{domain}"),
                "v=STSv1; id=20261203T000000;",
            );
        }
    }
    // sticky.test's record is the one a test changes: `zones` is kept without it.
    let first = zones
        .clone()
        .txt("_mta-sts.sticky.test", "v=STSv1; id=20261203T000000;");
    let dns = DnsServer::start(first);
    let policies: HashMap<String, String> = [
        ("mta-sts.good.test", ENFORCE_GOOD.to_string()),
        (
            "mta-sts.mismatch.test",
            "version: STSv1\nmode: enforce\nmx: mx.mismatch.test\nmax_age: 86400\n".into(),
        ),
        (
            "mta-sts.badcert.test",
            "version: STSv1\nmode: enforce\nmx: mx.badcert.test\nmax_age: 86400\n".into(),
        ),
        (
            "mta-sts.testing.test",
            "version: STSv1\nmode: testing\nmx: mx.testing.test\nmax_age: 86400\n".into(),
        ),
        (
            "mta-sts.short.test",
            "version: STSv1\nmode: enforce\nmx: mx.short.test\nmax_age: 1\n".into(),
        ),
        (
            "mta-sts.sticky.test",
            "version: STSv1\nmode: enforce\nmx: mx.sticky.test\nmax_age: 86400\n".into(),
        ),
        (
            "mta-sts.testbad.test",
            "version: STSv1\nmode: testing\nmx: mx.badcert.test\nmax_age: 86400\n".into(),
        ),
        (
            "mta-sts.secure.test",
            "version: STSv1\nmode: enforce\nmx: mx.secure.test\nmax_age: 86400\n".into(),
        ),
        (
            "mta-sts.nostarttls.test",
            "version: STSv1\nmode: enforce\nmx: mx.nostarttls.test\nmax_age: 86400\n".into(),
        ),
        (
            "mta-sts.redirect.test",
            "HTTP/1.1 302 Found\r\nLocation: https://mta-sts.good.test/.well-known/mta-sts.txt\r\nContent-Length: 0\r\n\r\n".into(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let policies = policy_server(acceptor(&web_cert, &web_key), policies).await;
    let (smtp, delivered) = smtp_peer("127.0.0.1:0", acceptor(&mx_cert, &mx_key), true).await;
    // mx.nostarttls.test: the same port on 127.0.0.2, plaintext only.
    let (_, plain) = smtp_peer(
        &format!("127.0.0.2:{}", smtp.port()),
        acceptor(&mx_cert, &mx_key),
        false,
    )
    .await;
    // mx.secure.test: the same port on 127.0.0.3, offering REQUIRETLS.
    let (_, secure, secure_mails) = smtp_peer_offering(
        &format!("127.0.0.3:{}", smtp.port()),
        acceptor(&mx_cert, &mx_key),
        true,
        true,
    )
    .await;

    let reports = Arc::new(Collected::default());
    let resolver = Resolver::with_nameservers_and_timeout(&[dns.addr], Duration::from_secs(2), 1);
    let sts = MtaSts::new(
        resolver.clone(),
        roots.clone(),
        policies.addr.port(),
        Duration::from_secs(5),
        IpVersion::Ipv4,
        PolicyCache::default(),
    );
    let client = ClientConfig::new("mx.local.test");
    let mut verify = client.clone();
    verify.tls = TlsPolicy::Verify;
    verify.roots = Some(roots);
    let remote = Remote {
        resolver,
        smarthost_client: client.clone(),
        client,
        tls_policy: Default::default(),
        mta_sts: Some(StsSettings {
            lookup: sts.clone(),
            client: verify,
        }),
        dane: Some(SecureDns::new(vec![dns.addr], Duration::from_secs(2))),
        tls_reports: Some(reports.clone()),
        ip_version: IpVersion::Ipv4,
        local: LocalIdentity {
            hostnames: vec!["mx.local.test".into()],
            addrs: Vec::new(),
        },
        mx_port: smtp.port(),
        idle: Default::default(),
    };
    Some(World {
        remote,
        sts,
        policies,
        delivered,
        plain,
        secure,
        secure_mails,
        dns,
        zones,
        reports,
        mx_pem: dir.join("mx.pem"),
    })
}

async fn send(w: &World, to: &str) -> Outcome {
    send_with(w, to, MailParams::default(), "Subject: hi\r\n\r\nhello\r\n").await
}

async fn send_with(w: &World, to: &str, params: MailParams, content: &str) -> Outcome {
    send_from(w, "alice@local.test", to, params, content).await
}

async fn send_from(w: &World, from: &str, to: &str, params: MailParams, content: &str) -> Outcome {
    let rcpts = vec![(to.to_string(), RcptParams::default())];
    let domain = to.split_once('@').unwrap().1;
    let msg = OutboundMessage {
        id: "TEST",
        from,
        params: &params,
        rcpts: &rcpts,
        content: content.as_bytes(),
        needs_smtputf8: false,
        needs_8bit: false,
    };
    let mut out = w.remote.deliver(domain, Hop::Mx, &msg).await;
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn fetches(w: &World, host: &str) -> usize {
    w.policies
        .requests
        .lock()
        .unwrap()
        .get(host)
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn enforce_delivers_only_over_verified_tls_to_a_listed_mx() {
    let dir = tempfile::tempdir().unwrap();
    let Some(w) = world(dir.path()).await else {
        return;
    };
    // good.test: listed MX, certificate valid for it; two messages at once, one fetch.
    let (a, b) = tokio::join!(send(&w, "bob@good.test"), send(&w, "dave@good.test"));
    assert!(matches!(a, Outcome::Relayed { .. }), "{a:?}");
    assert!(matches!(b, Outcome::Relayed { .. }), "{b:?}");
    assert_eq!(w.delivered.load(Ordering::SeqCst), 2);
    assert_eq!(fetches(&w, "mta-sts.good.test"), 1);
    let cached = w.sts.cached("good.test").expect("cached");
    assert_eq!(cached.id, "20261203T000000");
    assert_eq!(cached.policy.mx, ["mx.good.test", "*.good.test"]);
    // The second message uses the cached policy: one fetch in all.
    let out = send(&w, "carol@good.test").await;
    assert!(matches!(out, Outcome::Relayed { .. }), "{out:?}");
    assert_eq!(fetches(&w, "mta-sts.good.test"), 1);

    // mismatch.test: its MX is not in the policy: deferred, and the peer never sees it.
    let out = send(&w, "bob@mismatch.test").await;
    let Outcome::TempFail(f) = &out else {
        panic!("{out:?}")
    };
    assert_eq!(
        f.reply.status.map(|s| s.to_string()).as_deref(),
        Some("4.7.5")
    );
    assert!(
        f.to_string().contains("MTA-STS policy of mismatch.test"),
        "{f}"
    );
    // badcert.test: the MX is listed but its certificate does not name it.
    let out = send(&w, "bob@badcert.test").await;
    let Outcome::TempFail(f) = &out else {
        panic!("{out:?}")
    };
    assert!(f.to_string().contains("4.7.5"), "{f}");
    assert!(f.to_string().contains("certificate"), "{f}");
    // nostarttls.test: the listed MX offers no STARTTLS: deferred, never sent in the clear.
    let out = send(&w, "bob@nostarttls.test").await;
    let Outcome::TempFail(f) = &out else {
        panic!("{out:?}")
    };
    assert!(f.to_string().contains("4.7.4"), "{f}");
    assert_eq!(w.plain.load(Ordering::SeqCst), 0);
    assert_eq!(
        w.delivered.load(Ordering::SeqCst),
        3,
        "nothing more reached the peer"
    );
}

#[tokio::test]
async fn testing_no_record_and_a_redirect_deliver_as_usual() {
    let dir = tempfile::tempdir().unwrap();
    let Some(w) = world(dir.path()).await else {
        return;
    };
    for to in ["bob@testing.test", "bob@plain.test", "bob@redirect.test"] {
        let out = send(&w, to).await;
        assert!(matches!(out, Outcome::Relayed { .. }), "{to}: {out:?}");
    }
    assert_eq!(w.delivered.load(Ordering::SeqCst), 3);
    assert!(w.sts.cached("testing.test").is_some());
    assert!(w.sts.cached("plain.test").is_none());
    // The redirect was asked for once and not followed.
    assert_eq!(fetches(&w, "mta-sts.redirect.test"), 1);
    assert_eq!(fetches(&w, "mta-sts.good.test"), 0);
    assert!(w.sts.cached("redirect.test").is_none());
}

#[tokio::test]
async fn an_expired_policy_no_longer_applies() {
    let dir = tempfile::tempdir().unwrap();
    let Some(w) = world(dir.path()).await else {
        return;
    };
    // short.test: enforce with max_age 1 s, its MX not listed: deferred.
    let out = send(&w, "bob@short.test").await;
    assert!(matches!(out, Outcome::TempFail(_)), "{out:?}");
    // The policy server now fails (that a living policy survives a failed fetch is
    // a_failed_fetch_of_a_new_policy_keeps_the_cached_one)…
    w.policies.gone.store(true, Ordering::SeqCst);
    assert!(w.sts.cached("short.test").is_some());
    // …once it has expired and cannot be fetched again, there is none: delivered as usual.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(w.sts.cached("short.test").is_none());
    let out = send(&w, "bob@short.test").await;
    assert!(matches!(out, Outcome::Relayed { .. }), "{out:?}");
    assert_eq!(fetches(&w, "mta-sts.short.test"), 2);
    w.sts.settle().await;
}

/// RFC 8461 §5.1: the record's id changes, the new policy cannot be fetched: the cached one
/// still applies, and the fetch is not tried again for that id for 5 minutes.
#[tokio::test]
async fn a_failed_fetch_of_a_new_policy_keeps_the_cached_one() {
    let dir = tempfile::tempdir().unwrap();
    let Some(w) = world(dir.path()).await else {
        return;
    };
    let out = send(&w, "bob@sticky.test").await;
    assert!(matches!(out, Outcome::TempFail(_)), "{out:?}");
    assert_eq!(fetches(&w, "mta-sts.sticky.test"), 1);
    // A new id, and the policy server fails.
    w.dns.replace(
        w.zones
            .clone()
            .txt("_mta-sts.sticky.test", "v=STSv1; id=20261203T000001;"),
    );
    w.policies.gone.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let out = send(&w, "bob@sticky.test").await;
        let Outcome::TempFail(f) = &out else {
            panic!("{out:?}")
        };
        assert!(
            f.to_string().contains("MTA-STS policy of sticky.test"),
            "{f}"
        );
    }
    // One more fetch for the new id, not two.
    assert_eq!(fetches(&w, "mta-sts.sticky.test"), 2);
    assert_eq!(w.sts.cached("sticky.test").unwrap().id, "20261203T000000");
    assert_eq!(w.delivered.load(Ordering::SeqCst), 0);
}

/// RFC 8689: a REQUIRETLS message goes only to an MX that an enforced MTA-STS policy lists,
/// over verified TLS, offering REQUIRETLS, and it says REQUIRETLS there; otherwise it fails
/// for good (5.7.30), or waits when it cannot be known (4.7.30); a bounce is never held back
/// over it. `TLS-Required: No` lets a message past the recipient's policy.
#[tokio::test]
async fn requiretls_and_tls_required_no() {
    let dir = tempfile::tempdir().unwrap();
    let Some(w) = world(dir.path()).await else {
        return;
    };
    let requiretls = MailParams {
        requiretls: true,
        ..MailParams::default()
    };
    let body = "Subject: secret\r\n\r\nx\r\n";
    // secure.test: listed, verified, offers REQUIRETLS.
    let out = send_with(&w, "bob@secure.test", requiretls.clone(), body).await;
    assert!(matches!(out, Outcome::Relayed { .. }), "{out:?}");
    assert_eq!(w.secure.load(Ordering::SeqCst), 1);
    assert_eq!(
        *w.secure_mails.lock().unwrap(),
        ["MAIL FROM:<alice@local.test> REQUIRETLS"]
    );
    // good.test: listed and verified, but no REQUIRETLS: refused for good, nothing sent.
    let before = w.delivered.load(Ordering::SeqCst);
    let out = send_with(&w, "bob@good.test", requiretls.clone(), body).await;
    let Outcome::PermFail(f) = &out else {
        panic!("{out:?}")
    };
    assert!(f.to_string().contains("5.7.30"), "{f}");
    assert!(f.to_string().contains("does not offer REQUIRETLS"), "{f}");
    // plain.test: no MTA-STS policy authenticates its MX.
    let out = send_with(&w, "bob@plain.test", requiretls.clone(), body).await;
    let Outcome::PermFail(f) = &out else {
        panic!("{out:?}")
    };
    assert!(
        f.to_string()
            .contains("neither DANE nor an MTA-STS policy in enforce mode"),
        "{f}"
    );
    // testing.test: a policy in testing mode is not enough either.
    let out = send_with(&w, "bob@testing.test", requiretls.clone(), body).await;
    assert!(matches!(out, Outcome::PermFail(_)), "{out:?}");
    assert_eq!(w.delivered.load(Ordering::SeqCst), before);
    // flaky.test: its _mta-sts lookup fails: not known now, so retried rather than bounced.
    let out = send_with(&w, "bob@flaky.test", requiretls.clone(), body).await;
    let Outcome::TempFail(f) = &out else {
        panic!("{out:?}")
    };
    assert!(f.to_string().contains("451 4.7.30"), "{f}");
    // A bounce of a REQUIRETLS message (null sender) is never held back over it: delivered
    // to good.test (no REQUIRETLS there) and to plain.test (no policy).
    for to in ["bob@good.test", "bob@plain.test"] {
        let out = send_from(&w, "", to, requiretls.clone(), body).await;
        assert!(matches!(out, Outcome::Relayed { .. }), "{to}: {out:?}");
    }
    assert_eq!(w.delivered.load(Ordering::SeqCst), before + 2);
    let before = before + 2;

    // mismatch.test enforces a policy its MX is not in: deferred, unless the message says
    // TLS-Required: No (folded, any case).
    let out = send(&w, "bob@mismatch.test").await;
    assert!(matches!(out, Outcome::TempFail(_)), "{out:?}");
    let relaxed =
        "Subject: newsletter\r\ntls-required:\r\n no\r\n\r\nTLS-Required: yes in the body\r\n";
    let out = send_with(&w, "bob@mismatch.test", MailParams::default(), relaxed).await;
    assert!(matches!(out, Outcome::Relayed { .. }), "{out:?}");
    assert_eq!(w.delivered.load(Ordering::SeqCst), before + 1);
    // With REQUIRETLS, the header field is ignored: the policy holds (and defers).
    let both = MailParams {
        requiretls: true,
        ..MailParams::default()
    };
    let out = send_with(&w, "bob@mismatch.test", both, relaxed).await;
    let Outcome::TempFail(f) = &out else {
        panic!("{out:?}")
    };
    assert!(
        f.to_string().contains("MTA-STS policy of mismatch.test"),
        "{f}"
    );
    assert_eq!(w.delivered.load(Ordering::SeqCst), before + 1);
}

/// TLS-RPT: each session to an MX host is reported with the policy it was held to and what it
/// got (RFC 8460 §4.3 result types).
#[tokio::test]
async fn each_session_to_an_mx_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let Some(w) = world(dir.path()).await else {
        return;
    };
    for to in [
        "bob@good.test",
        "bob@badcert.test",
        "bob@plain.test",
        "bob@nostarttls.test",
        "bob@testing.test",
        "bob@testbad.test",
        "bob@redirect.test",
    ] {
        send(&w, to).await;
    }
    let got = w.reports.0.lock().unwrap().clone();
    let seen: Vec<(&str, &str, &str, Option<&str>)> = got
        .iter()
        .map(|r| {
            (
                r.domain.as_str(),
                match &r.policy {
                    PolicyApplied::Sts(_) => "sts",
                    PolicyApplied::NoPolicyFound => "no-policy-found",
                    PolicyApplied::Tlsa(_) => "tlsa",
                    PolicyApplied::StsUnknown => "sts-unknown",
                },
                r.mx.as_str(),
                r.failure,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("good.test", "sts", "mx.good.test", None),
            (
                "badcert.test",
                "sts",
                "mx.badcert.test",
                Some("certificate-host-mismatch")
            ),
            ("plain.test", "no-policy-found", "mx.elsewhere.test", None),
            (
                "nostarttls.test",
                "sts",
                "mx.nostarttls.test",
                Some("starttls-not-supported")
            ),
            // testing: delivered either way; the certificate is checked all the same.
            ("testing.test", "sts", "mx.elsewhere.test", None),
            (
                "testbad.test",
                "sts",
                "mx.badcert.test",
                Some("certificate-host-mismatch")
            ),
            // redirect.test: the policy's fetch failed (a redirect), then the session itself.
            (
                "redirect.test",
                "sts-unknown",
                "",
                Some("sts-policy-fetch-error")
            ),
            (
                "redirect.test",
                "no-policy-found",
                "mx.elsewhere.test",
                None
            ),
        ]
    );
    // Both testing-mode messages were delivered: 5 in all (good, plain, testing, testbad,
    // redirect).
    assert_eq!(w.delivered.load(Ordering::SeqCst), 5);
    assert!(
        got[1].detail.as_deref().unwrap().contains("certificate"),
        "{:?}",
        got[1]
    );
}

/// SHA-256 of the SubjectPublicKeyInfo of the certificate in `pem`, by openssl (a TLSA 3 1 1).
fn spki_sha256(pem: &Path) -> Vec<u8> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform DER | openssl dgst -sha256 -binary",
            pem.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout.len() == 32, "{out:?}");
    out.stdout
}

/// DANE (RFC 7672) through a validating resolver's AD bit: a secure MX with a matching TLSA
/// 3 1 1 delivers over TLS authenticated by it (no name check); a mismatching one, or a TLSA
/// lookup the resolver fails (bogus), defers and sends nothing; an insecure zone's TLSA is
/// ignored; a secure zone without TLSA gets the usual policy. DANE wins over MTA-STS.
#[tokio::test]
async fn dane_authenticates_the_mx_by_its_tlsa_records() {
    let dir = tempfile::tempdir().unwrap();
    let Some(w) = world(dir.path()).await else {
        return;
    };
    let port = w.remote.mx_port;
    let good = spki_sha256(&w.mx_pem);
    let mut bad = good.clone();
    bad[0] ^= 0xff;
    let tlsa = |host: &str| format!("_{port}._tcp.{host}");
    w.dns.replace(
        w.zones
            .clone()
            .secure("dane.test")
            .mx("dane.test", 10, "mx.dane.test")
            .a("mx.dane.test", "127.0.0.1")
            .tlsa(&tlsa("mx.dane.test"), 3, 1, 1, &good)
            .secure("danebad.test")
            .mx("danebad.test", 10, "mx.danebad.test")
            .a("mx.danebad.test", "127.0.0.1")
            .tlsa(&tlsa("mx.danebad.test"), 3, 1, 1, &bad)
            .secure("danebogus.test")
            .mx("danebogus.test", 10, "mx.danebogus.test")
            .a("mx.danebogus.test", "127.0.0.1")
            .servfail(&tlsa("mx.danebogus.test"))
            .mx("daneinsecure.test", 10, "mx.daneinsecure.test")
            .a("mx.daneinsecure.test", "127.0.0.1")
            .tlsa(&tlsa("mx.daneinsecure.test"), 3, 1, 1, &bad)
            .secure("danenone.test")
            .mx("danenone.test", 10, "mx.danenone.test")
            .a("mx.danenone.test", "127.0.0.1")
            // good.test's MX made secure with a matching TLSA: DANE wins over its MTA-STS.
            .secure("good.test")
            .tlsa(&tlsa("mx.good.test"), 3, 1, 1, &good),
    );
    let before = w.delivered.load(Ordering::SeqCst);
    for to in [
        "bob@dane.test",
        "bob@daneinsecure.test",
        "bob@danenone.test",
        "bob@good.test",
    ] {
        let out = send(&w, to).await;
        assert!(matches!(out, Outcome::Relayed { .. }), "{to}: {out:?}");
    }
    for (to, why) in [
        ("bob@danebad.test", "DANE: no TLSA record matches"),
        ("bob@danebogus.test", "DANE for mx.danebogus.test"),
    ] {
        let out = send(&w, to).await;
        let Outcome::TempFail(f) = &out else {
            panic!("{to}: {out:?}")
        };
        assert!(f.to_string().contains(why), "{to}: {f}");
    }
    assert_eq!(w.delivered.load(Ordering::SeqCst), before + 4);
    // REQUIRETLS: DANE authenticates dane.test's MX (the peer then lacks REQUIRETLS); nothing
    // authenticates daneinsecure.test's.
    let requiretls = MailParams {
        requiretls: true,
        ..MailParams::default()
    };
    let out = send_with(
        &w,
        "bob@dane.test",
        requiretls.clone(),
        "Subject: x\r\n\r\nx\r\n",
    )
    .await;
    let Outcome::PermFail(f) = &out else {
        panic!("{out:?}")
    };
    assert!(f.to_string().contains("does not offer REQUIRETLS"), "{f}");
    let out = send_with(
        &w,
        "bob@daneinsecure.test",
        requiretls,
        "Subject: x\r\n\r\nx\r\n",
    )
    .await;
    let Outcome::PermFail(f) = &out else {
        panic!("{out:?}")
    };
    assert!(f.to_string().contains("neither DANE nor"), "{f}");
    // TLS-RPT: the DANE sessions under policy-type tlsa, the bogus lookup as dnssec-invalid.
    let got = w.reports.0.lock().unwrap().clone();
    let find = |d: &str| got.iter().find(|r| r.domain == d).unwrap().clone();
    let dane = find("dane.test");
    assert!(
        matches!(&dane.policy, PolicyApplied::Tlsa(r) if r[0].starts_with("3 1 1 ")),
        "{dane:?}"
    );
    assert_eq!(dane.failure, None);
    assert!(matches!(find("good.test").policy, PolicyApplied::Tlsa(_)));
    assert_eq!(find("danebad.test").failure, Some("tlsa-invalid"));
    assert_eq!(find("danebogus.test").failure, Some("dnssec-invalid"));
    assert!(matches!(
        find("daneinsecure.test").policy,
        PolicyApplied::NoPolicyFound
    ));
}

/// A CA and a leaf it signed for `name`, by openssl: (CA certificate, leaf certificate, leaf
/// key, the CA's DER).
fn ca_and_leaf(
    dir: &Path,
    name: &str,
) -> (
    CertificateDer<'static>,
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
    Vec<u8>,
) {
    let d = dir.display();
    let script = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj '/CN=Test CA' \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
           -keyout ca.key -out ca.pem 2>/dev/null; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/CN={name}' \
           -keyout leaf.key -out leaf.csr 2>/dev/null; \
         printf 'subjectAltName=DNS:{name}\\nbasicConstraints=critical,CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > leaf.ext; \
         openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
           -extfile leaf.ext -out leaf.pem 2>/dev/null; \
         openssl x509 -in ca.pem -outform DER -out ca.der"
    );
    let ok = Command::new("sh").arg("-c").arg(&script).status().unwrap();
    assert!(ok.success(), "{script}");
    (
        CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap(),
        CertificateDer::from_pem_file(dir.join("leaf.pem")).unwrap(),
        PrivateKeyDer::from_pem_file(dir.join("leaf.key")).unwrap(),
        std::fs::read(dir.join("ca.der")).unwrap(),
    )
}

/// DANE-TA (2 0 1): the CA in the chain the server sends matches the record and anchors a
/// validation for the MX host's name; the same chain presented for another MX name defers.
#[tokio::test]
async fn dane_ta_anchors_the_chain_for_the_mx_name() {
    let dir = tempfile::tempdir().unwrap();
    let Some(w) = world(dir.path()).await else {
        return;
    };
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let (ca, leaf, key, ca_der) = ca_and_leaf(&ca_dir, "mx.daneta.test");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf, ca], key)
    .unwrap();
    let port = w.remote.mx_port;
    let (_, delivered, _) = smtp_peer_offering(
        &format!("127.0.0.4:{port}"),
        TlsAcceptor::from(Arc::new(config)),
        true,
        false,
    )
    .await;
    let digest = {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl dgst -sha256 -binary {}",
                ca_dir.join("ca.der").display()
            ))
            .output()
            .unwrap();
        assert_eq!(out.stdout.len(), 32);
        out.stdout
    };
    assert!(!ca_der.is_empty());
    let tlsa = |host: &str| format!("_{port}._tcp.{host}");
    w.dns.replace(
        w.zones
            .clone()
            .secure("daneta.test")
            .mx("daneta.test", 10, "mx.daneta.test")
            .a("mx.daneta.test", "127.0.0.4")
            .tlsa(&tlsa("mx.daneta.test"), 2, 0, 1, &digest)
            .secure("danetaname.test")
            .mx("danetaname.test", 10, "mx.danetaname.test")
            .a("mx.danetaname.test", "127.0.0.4")
            .tlsa(&tlsa("mx.danetaname.test"), 2, 0, 1, &digest),
    );
    let out = send(&w, "bob@daneta.test").await;
    assert!(matches!(out, Outcome::Relayed { .. }), "{out:?}");
    let out = send(&w, "bob@danetaname.test").await;
    let Outcome::TempFail(f) = &out else {
        panic!("{out:?}")
    };
    assert!(f.to_string().contains("DANE-TA"), "{f}");
    assert_eq!(delivered.load(Ordering::SeqCst), 1);
}
