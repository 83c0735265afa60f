//! The verdict as a table: local/remote × untrusted/mynetworks/authenticated × tricks.

use super::*;
use estafeta_proto::address::{parse_forward_path, parse_reverse_path};

fn policy() -> Policy {
    let cfg = Config::parse(
        r#"
hostname = "mail.example.org"
[relay]
mynetworks = ["127.0.0.0/8", "::1/128", "192.168.1.0/24", "192.168.1.128/25"]
[[domain]]
name = "example.org"
mailboxes = ["alice", "bob"]
catch_all = "alice"
[domain.aliases]
postmaster = "alice"
abuse = "alice"
team = ["alice", "bob", "carol@elsewhere.example"]
loop1 = "loop2"
loop2 = ["loop1", "bob"]
ghost = "nobody@example.net"
[[domain]]
name = "example.net"
mailboxes = ["dave"]
[[domain]]
name = "Example.Test"
mailboxes = "*"
"#,
        std::path::Path::new("t.toml"),
    )
    .unwrap();
    Policy::new(&cfg)
}

const UNTRUSTED: &str = "203.0.113.5";
const MYNET: &str = "192.168.1.7";

fn client(ip: &str, user: Option<&str>) -> Client {
    Client {
        ip: ip.parse().unwrap(),
        user: user.map(str::to_string),
        local_uid: None,
    }
}

fn verdict(p: &Policy, c: &Client, addr: &str) -> String {
    let (fp, _) = parse_forward_path(addr).unwrap();
    match p.rcpt_verdict(c, &fp) {
        Verdict::Accept(targets) => targets
            .iter()
            .map(|t| match t {
                Target::Local(mb) => format!("local {}", mb.address()),
                Target::Remote(a) => format!("relay {a}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        Verdict::Reject(r) => r.to_string(),
    }
}

const DENIED: &str = "554 5.7.1";
const UNKNOWN: &str = "550 5.1.1";

#[test]
fn local_recipients_for_everybody() {
    let p = policy();
    for c in [
        client(UNTRUSTED, None),
        client(MYNET, None),
        client(UNTRUSTED, Some("alice@example.org")),
    ] {
        let cases = [
            ("<alice@example.org>", "local alice@example.org"),
            ("<ALICE@EXAMPLE.ORG>", "local alice@example.org"),
            ("<bob+lists@example.org>", "local bob@example.org"),
            ("<postmaster@example.org>", "local alice@example.org"),
            ("<Postmaster>", "local alice@example.org"),
            ("<abuse@example.org>", "local alice@example.org"),
            (
                "<team@example.org>",
                "local alice@example.org, local bob@example.org, relay carol@elsewhere.example",
            ),
            ("<loop1@example.org>", "local bob@example.org"),
            ("<nobody-here@example.org>", "local alice@example.org"), // catch-all
            ("<dave@example.net>", "local dave@example.net"),
            ("<anyone@example.test>", "local anyone@example.test"),
            ("<anyone@EXAMPLE.test>", "local anyone@example.test"),
            ("<postmaster@example.net>", "local postmaster@example.net"),
        ];
        for (addr, want) in cases {
            assert_eq!(verdict(&p, &c, addr), want, "{addr} from {c:?}");
        }
        for addr in [
            "<erin@example.net>",
            "<ghost@example.net>",
            "<\"../etc\"@example.test>",
            "<a/b@example.test>",
        ] {
            assert!(
                verdict(&p, &c, addr).starts_with(UNKNOWN),
                "{addr} from {c:?}"
            );
        }
    }
}

#[test]
fn an_alias_to_an_unknown_address_is_unknown() {
    let p = policy();
    // ghost → nobody@example.net, which does not exist (example.net lists only dave).
    assert!(verdict(&p, &client(MYNET, None), "<ghost@example.org>").starts_with(UNKNOWN));
}

#[test]
fn remote_recipients_only_for_trusted_clients() {
    let p = policy();
    let remote = [
        "<someone@elsewhere.example>",
        "<someone@[203.0.113.9]>",
        "<someone@[IPv6:2001:db8::9]>",
        "<@example.org:someone@elsewhere.example>", // source route through us
        "<@example.org,@example.net:someone@elsewhere.example>",
        "<someone@example.org.evil.example>",
        "<someone@sub.example.org>",
    ];
    for addr in remote {
        assert!(
            verdict(&p, &client(UNTRUSTED, None), addr).starts_with(DENIED),
            "{addr} must not be relayed for an untrusted client"
        );
        assert!(
            verdict(&p, &client(MYNET, None), addr).starts_with("relay "),
            "{addr}"
        );
        assert!(
            verdict(&p, &client(UNTRUSTED, Some("alice@example.org")), addr).starts_with("relay "),
            "{addr}"
        );
        // The submit socket (`sendmail`): trusted whatever the address says.
        let local = Client {
            local_uid: Some(1000),
            ..client(UNTRUSTED, None)
        };
        assert!(verdict(&p, &local, addr).starts_with("relay "), "{addr}");
        assert_eq!(p.trust(&local), Trust::Local(1000));
    }
}

#[test]
fn routing_tricks_in_local_parts_are_refused_for_untrusted_clients() {
    let p = policy();
    let tricks = [
        "<someone%elsewhere.example@example.org>",  // percent hack
        "<someone%elsewhere.example@example.test>", // even where every local part exists
        "<elsewhere.example!someone@example.test>", // bang path
        "<\"someone@elsewhere.example\"@example.test>", // quoted @
        "<\"someone%elsewhere.example\"@example.test>",
    ];
    for addr in tricks {
        assert!(
            verdict(&p, &client(UNTRUSTED, None), addr).starts_with(DENIED),
            "{addr} from an untrusted client"
        );
        // Trusted clients: the local part is taken literally, never as a route.
        let v = verdict(&p, &client(MYNET, None), addr);
        assert!(!v.contains("relay"), "{addr}: {v}");
    }
}

#[test]
fn mynetworks_longest_prefix_and_mapped_ipv4() {
    let p = policy();
    assert_eq!(
        p.mynetworks_match("192.168.1.200".parse().unwrap()),
        Some("192.168.1.128/25".parse().unwrap())
    );
    assert_eq!(
        p.mynetworks_match("192.168.1.5".parse().unwrap()),
        Some("192.168.1.0/24".parse().unwrap())
    );
    assert_eq!(
        p.mynetworks_match("::ffff:127.0.0.1".parse().unwrap()),
        Some("127.0.0.0/8".parse().unwrap())
    );
    assert_eq!(
        p.mynetworks_match("::ffff:203.0.113.5".parse().unwrap()),
        None
    );
    assert_eq!(p.mynetworks_match("2001:db8::1".parse().unwrap()), None);
    assert!(
        verdict(
            &p,
            &client("::ffff:192.168.1.9", None),
            "<x@elsewhere.example>"
        )
        .starts_with("relay")
    );
}

#[test]
fn explain_names_the_deciding_rule() {
    let p = policy();
    let (fp, _) = parse_forward_path("<team@example.org>").unwrap();
    let (_, steps) = p.explain_rcpt(&client(UNTRUSTED, None), &fp);
    let text = steps.join("\n");
    assert!(text.contains("no mynetworks entry holds it"), "{text}");
    assert!(
        text.contains("team@example.org: alias → alice, bob, carol@elsewhere.example"),
        "{text}"
    );
    let (fp, _) = parse_forward_path("<x@elsewhere.example>").unwrap();
    let (_, steps) = p.explain_rcpt(&client(MYNET, None), &fp);
    let text = steps.join("\n");
    assert!(
        text.contains("inside mynetworks entry 192.168.1.0/24"),
        "{text}"
    );
    assert!(text.contains("relay allowed"), "{text}");
}

#[test]
fn mailboxes_from_the_users_file() {
    let cfg = Config::parse(
        "[[domain]]\nname = \"example.net\"\n",
        std::path::Path::new("t.toml"),
    )
    .unwrap();
    let p = Policy::new(&cfg).with_users(std::sync::Arc::new(|a: &str| a == "carol@example.net"));
    let c = client(UNTRUSTED, None);
    assert_eq!(
        verdict(&p, &c, "<Carol+x@example.net>"),
        "local carol@example.net"
    );
    assert_eq!(
        verdict(&p, &c, "<postmaster@example.net>"),
        "local postmaster@example.net"
    );
    assert!(verdict(&p, &c, "<dave@example.net>").starts_with(UNKNOWN));
}

#[test]
fn sender_ownership() {
    let p = policy();
    let owned = |user: &str, from: &str| p.sender_owned(user, &parse_reverse_path(from).unwrap().0);
    assert!(owned("alice@example.org", "<alice@example.org>"));
    assert!(owned("alice@example.org", "<ALICE@Example.ORG>"));
    assert!(owned("alice@example.org", "<alice+lists@example.org>"));
    assert!(owned("alice@example.org", "<>"));
    assert!(!owned("alice@example.org", "<bob@example.org>"));
    assert!(!owned("alice@example.org", "<alice@example.net>"));
    assert!(!owned("alice@example.org", "<alicex@example.org>"));
    assert!(owned("alice@example.org", "<postmaster@example.org>"));
    assert!(owned("bob@example.org", "<team@example.org>"));
    assert!(owned("carol@elsewhere.example", "<team@example.org>"));
    assert!(!owned("bob@example.org", "<postmaster@example.org>"));
}

#[test]
fn expansion_before_queueing() {
    use estafeta_proto::{RcptParams, Recipient};
    let p = policy();
    let rcpt = |a: &str| Recipient {
        path: parse_forward_path(a).unwrap().0,
        params: RcptParams::default(),
    };
    let out = p.expand_recipients(vec![
        rcpt("<team@example.org>"),
        rcpt("<alice@example.org>"),
        rcpt("<x@elsewhere.example>"),
    ]);
    let addrs: Vec<String> = out.iter().map(|r| r.path.to_string()).collect();
    assert_eq!(
        addrs,
        [
            "alice@example.org",
            "bob@example.org",
            "carol@elsewhere.example",
            "x@elsewhere.example"
        ]
    );
    assert_eq!(
        out[0].params.orcpt.as_ref().unwrap().address(),
        "team@example.org"
    );
    assert!(out[3].params.orcpt.is_none());
}

#[test]
fn internationalized_domains_match_in_either_form() {
    let cfg = Config::parse(
        r#"
hostname = "mail.example.org"
[[domain]]
name = "xn--bcher-kva.example"
mailboxes = "*"
[[domain]]
name = "xn--caf-dma.example"
mailboxes = ["bob"]
"#,
        std::path::Path::new("t.toml"),
    )
    .unwrap();
    let p = Policy::new(&cfg);
    let c = client(UNTRUSTED, None);
    // The configuration writes A-labels; an SMTPUTF8 recipient may use the U-label.
    assert_eq!(
        verdict(&p, &c, "<anna@xn--bcher-kva.example>"),
        "local anna@xn--bcher-kva.example"
    );
    assert_eq!(
        verdict(&p, &c, "<anna@BÜCHER.example>"),
        "local anna@xn--bcher-kva.example"
    );
    assert_eq!(
        verdict(&p, &c, "<bob@café.example>"),
        "local bob@xn--caf-dma.example"
    );
    // Still a real check: someone else's domain is not ours.
    assert!(verdict(&p, &c, "<bob@cafe.example>").starts_with("554 5.7.1"));
    assert_eq!(domain_key("Example.ORG"), "example.org");
}

/// `route`: the one decision of how a stored recipient is delivered.
#[test]
fn routes() {
    let cfg = Config::parse(
        r#"
hostname = "mail.example.org"
[relay]
smarthost = "smtp.isp.example:587"
[relay.routes]
"partner.example" = "[192.0.2.7]:2525"
[[domain]]
name = "example.org"
mailboxes = ["alice"]
[[domain]]
name = "dove.example"
mailboxes = "*"
delivery = "lmtp:unix:/run/dovecot/lmtp"
[[domain]]
name = "lists.example"
mailboxes = "*"
delivery = "pipe:mailman"
[pipe.mailman]
command = ["/usr/bin/true", "{user}"]
"#,
        std::path::Path::new("t.toml"),
    )
    .unwrap();
    let p = Policy::new(&cfg);
    let route = |a: &str| p.route(&parse_forward_path(&format!("<{a}>")).unwrap().0);
    let mb = |user: &str, domain: &str| LocalMailbox {
        domain: domain.into(),
        user: user.into(),
    };
    assert_eq!(
        route("Alice+tag@Example.ORG"),
        Route::Maildir(mb("alice", "example.org"))
    );
    // Not a mailbox (any more): returned as unknown, no Maildir made for it.
    assert_eq!(route("mallory@example.org"), Route::Unknown);
    assert_eq!(
        route("postmaster@example.org"),
        Route::Maildir(mb("postmaster", "example.org"))
    );
    assert_eq!(
        route("bob@dove.example"),
        Route::Lmtp {
            mailbox: mb("bob", "dove.example"),
            server: "unix:/run/dovecot/lmtp".into()
        }
    );
    assert_eq!(
        route("announce@lists.example"),
        Route::Pipe {
            mailbox: mb("announce", "lists.example"),
            pipe: "mailman".into()
        }
    );
    // A route wins over the smarthost; everything else goes through the smarthost.
    let partner = route("x@Partner.example");
    assert_eq!(
        partner.destination().as_deref(),
        Some("route 192.0.2.7:2525")
    );
    assert_eq!(partner.agent(), "smtp");
    assert_eq!(
        route("x@elsewhere.example").destination().as_deref(),
        Some("smarthost smtp.isp.example:587")
    );
    assert_eq!(route("bob@dove.example").agent(), "lmtp");
    assert_eq!(route("a@lists.example").agent(), "pipe");
    assert_eq!(route("alice@example.org").destination(), None);
}
