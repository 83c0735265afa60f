//! Remote delivery through a route to a small SMTP peer on 127.0.0.1 that counts sessions:
//! messages sent one after the other to the same host share one session, which is closed with
//! QUIT once it has been idle for the cache's limit.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estafeta_proto::{MailParams, RcptParams};
use estafeta_queue::Outcome;
use estafeta_relay::client::{ClientConfig, OutboundMessage, TlsPolicy};
use estafeta_relay::remote::{ConnectionCache, Hop, NextHop, Remote};
use estafeta_relay::resolve::{IpVersion, LocalIdentity, Resolver};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Default, Debug)]
struct Seen {
    sessions: usize,
    messages: usize,
    quits: usize,
}

/// A minimal SMTP server: EHLO, MAIL, RCPT, DATA, RSET, QUIT, one reply per line. With
/// `hang_up`, it closes each session after its first message (as a server whose idle timeout
/// is shorter than our cache's would).
async fn peer(hang_up: bool) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            s.lock().unwrap().sessions += 1;
            let s = s.clone();
            tokio::spawn(async move {
                let (r, mut w) = tcp.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"220 peer.test ESMTP\r\n").await.unwrap();
                let mut data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if data {
                        if line != "." {
                            continue;
                        }
                        data = false;
                        s.lock().unwrap().messages += 1;
                        b"250 2.0.0 Ok: queued\r\n"
                    } else {
                        match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
                            "EHLO" => b"250-peer.test\r\n250 PIPELINING\r\n",
                            "DATA" => {
                                data = true;
                                b"354 go ahead\r\n"
                            }
                            "QUIT" => {
                                s.lock().unwrap().quits += 1;
                                let _ = w.write_all(b"221 2.0.0 Bye\r\n").await;
                                return;
                            }
                            _ => b"250 2.0.0 Ok\r\n",
                        }
                    };
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                    if hang_up && reply.starts_with(b"250 2.0.0 Ok: queued") {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// The peer as the route of `remote.test`.
fn hop(peer: SocketAddr) -> NextHop {
    NextHop {
        host: peer.ip().to_string(),
        port: peer.port(),
    }
}

fn remote() -> Remote {
    let mut client = ClientConfig::new("mx.local.test");
    client.tls = TlsPolicy::None;
    Remote {
        resolver: Resolver::with_nameservers(&["127.0.0.1:9".parse().unwrap()]),
        smarthost_client: client.clone(),
        tls_policy: Default::default(),
        mta_sts: None,
        dane: None,
        tls_reports: None,
        client,
        ip_version: IpVersion::Any,
        local: LocalIdentity {
            hostnames: vec!["mx.local.test".into()],
            addrs: Vec::new(),
        },
        mx_port: 25,
        idle: Default::default(),
    }
}

#[tokio::test]
async fn messages_to_one_host_share_a_session_that_is_closed_when_idle() {
    let (addr, seen) = peer(false).await;
    let remote = remote();
    let params = MailParams::default();
    let rcpts = vec![("bob@remote.test".to_string(), RcptParams::default())];
    let msg = OutboundMessage {
        id: "",
        from: "alice@local.test",
        params: &params,
        rcpts: &rcpts,
        content: b"Subject: hi\r\n\r\nhello\r\n",
        needs_smtputf8: false,
        needs_8bit: false,
    };
    for _ in 0..3 {
        let out = remote
            .deliver("remote.test", Hop::Route(&hop(addr)), &msg)
            .await;
        assert!(matches!(out[..], [Outcome::Relayed { .. }]), "{out:?}");
    }
    {
        let s = seen.lock().unwrap();
        assert_eq!((s.sessions, s.messages, s.quits), (1, 3, 0), "{s:?}");
    }
    // Idle past the limit: the session is closed politely.
    let deadline = Instant::now() + ConnectionCache::IDLE_LIMIT * 3;
    while seen.lock().unwrap().quits < 1 {
        assert!(Instant::now() < deadline, "{:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next message opens a new session.
    let out = remote
        .deliver("remote.test", Hop::Route(&hop(addr)), &msg)
        .await;
    assert!(matches!(out[..], [Outcome::Relayed { .. }]), "{out:?}");
    let s = seen.lock().unwrap();
    assert_eq!((s.sessions, s.messages), (2, 4), "{s:?}");
}

#[tokio::test]
async fn a_session_the_peer_closed_while_idle_is_replaced() {
    let (addr, seen) = peer(true).await;
    let remote = remote();
    let params = MailParams::default();
    let rcpts = vec![("bob@remote.test".to_string(), RcptParams::default())];
    let msg = OutboundMessage {
        id: "",
        from: "alice@local.test",
        params: &params,
        rcpts: &rcpts,
        content: b"Subject: hi\r\n\r\nhello\r\n",
        needs_smtputf8: false,
        needs_8bit: false,
    };
    for _ in 0..3 {
        let out = remote
            .deliver("remote.test", Hop::Route(&hop(addr)), &msg)
            .await;
        assert!(matches!(out[..], [Outcome::Relayed { .. }]), "{out:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = seen.lock().unwrap();
    assert_eq!((s.sessions, s.messages), (3, 3), "{s:?}");
}

/// At shutdown the idle sessions are not dropped: `close` says QUIT to each at once (well
/// before the idle limit) and waits for them; a session handed back afterwards is closed too.
#[tokio::test]
async fn close_says_quit_to_every_idle_session() {
    let (a, seen_a) = peer(false).await;
    let (b, seen_b) = peer(false).await;
    let remote = remote();
    let params = MailParams::default();
    let rcpts = vec![("bob@remote.test".to_string(), RcptParams::default())];
    let msg = OutboundMessage {
        id: "",
        from: "alice@local.test",
        params: &params,
        rcpts: &rcpts,
        content: b"Subject: hi\r\n\r\nhello\r\n",
        needs_smtputf8: false,
        needs_8bit: false,
    };
    for addr in [a, b] {
        let out = remote
            .deliver("remote.test", Hop::Route(&hop(addr)), &msg)
            .await;
        assert!(matches!(out[..], [Outcome::Relayed { .. }]), "{out:?}");
    }
    assert_eq!(remote.idle.idle_count(), 2);
    let started = Instant::now();
    remote.idle.close(Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < ConnectionCache::IDLE_LIMIT,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(remote.idle.idle_count(), 0);
    for seen in [&seen_a, &seen_b] {
        let s = seen.lock().unwrap();
        assert_eq!((s.sessions, s.messages, s.quits), (1, 1, 1), "{s:?}");
    }
    // After close, a delivery still works, and its session is not kept.
    let out = remote
        .deliver("remote.test", Hop::Route(&hop(a)), &msg)
        .await;
    assert!(matches!(out[..], [Outcome::Relayed { .. }]), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen_a.lock().unwrap().quits < 2 {
        assert!(Instant::now() < deadline, "{:?}", seen_a.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(remote.idle.idle_count(), 0);
}

/// `[relay.tls_policy]`: a domain that requires TLS is never sent in the plaintext session
/// kept open for another domain of the same host; towards a peer without STARTTLS it waits
/// (a temporary failure that says why), while the other domains go on in plaintext.
#[tokio::test]
async fn a_domain_that_requires_tls_does_not_reuse_a_plaintext_session() {
    let (addr, seen) = peer(false).await;
    let mut remote = remote();
    let mut strict = remote.client.clone();
    strict.tls = TlsPolicy::Required;
    remote.tls_policy.insert("secure.test".into(), strict);
    let params = MailParams::default();
    let send = |to: &str| {
        let rcpts = vec![(to.to_string(), RcptParams::default())];
        let domain = to.split_once('@').unwrap().1.to_string();
        let remote = &remote;
        let params = &params;
        async move {
            let msg = OutboundMessage {
                id: "TEST",
                from: "alice@local.test",
                params,
                rcpts: &rcpts,
                content: b"Subject: hi\r\n\r\nhello\r\n",
                needs_smtputf8: false,
                needs_8bit: false,
            };
            remote.deliver(&domain, Hop::Route(&hop(addr)), &msg).await
        }
    };
    let out = send("bob@plain.test").await;
    assert!(matches!(out[..], [Outcome::Relayed { .. }]), "{out:?}");
    assert_eq!(remote.idle.idle_count(), 1);
    // Same host, same address: the idle plaintext session is not used for secure.test.
    let out = send("carol@Secure.Test").await;
    let [Outcome::TempFail(f)] = &out[..] else {
        panic!("{out:?}");
    };
    assert!(f.to_string().contains("TLS is required"), "{f}");
    {
        let s = seen.lock().unwrap();
        assert_eq!((s.sessions, s.messages), (2, 1), "{s:?}");
    }
    // plain.test still uses its open session.
    let out = send("dave@plain.test").await;
    assert!(matches!(out[..], [Outcome::Relayed { .. }]), "{out:?}");
    let s = seen.lock().unwrap();
    assert_eq!((s.sessions, s.messages), (2, 2), "{s:?}");
}

/// The router lower-cases the domain, so an IPv6 address literal arrives as `[ipv6:…]`: it is
/// still that address (a connection is tried: nothing listens on port 9, a temporary failure),
/// not a malformed literal bounced for good.
#[tokio::test]
async fn a_lower_cased_ipv6_literal_is_an_address() {
    let mut remote = remote();
    remote.mx_port = 9;
    let params = MailParams::default();
    for domain in ["[ipv6:::1]", "[IPv6:::1]", "[127.0.0.1]"] {
        let rcpts = vec![(format!("bob@{domain}"), RcptParams::default())];
        let msg = OutboundMessage {
            id: "",
            from: "alice@local.test",
            params: &params,
            rcpts: &rcpts,
            content: b"Subject: hi\r\n\r\nhello\r\n",
            needs_smtputf8: false,
            needs_8bit: false,
        };
        let out = remote.deliver(domain, Hop::Mx, &msg).await;
        assert!(
            matches!(out[..], [Outcome::TempFail(_)]),
            "{domain}: {out:?}"
        );
    }
    let rcpts = vec![("bob@[ipv6:nonsense]".to_string(), RcptParams::default())];
    let msg = OutboundMessage {
        id: "",
        from: "alice@local.test",
        params: &params,
        rcpts: &rcpts,
        content: b"x\r\n",
        needs_smtputf8: false,
        needs_8bit: false,
    };
    let out = remote.deliver("[ipv6:nonsense]", Hop::Mx, &msg).await;
    assert!(matches!(out[..], [Outcome::PermFail(_)]), "{out:?}");
}
