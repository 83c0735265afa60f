//! Property tests of the spool: any envelope written is read back the same (after a restart),
//! and the content is delivered byte for byte.

mod common;
use common::spool;

use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::command::{Body, Notify, Orcpt, RcptParams, Ret};
use estafeta_proto::{ClientInfo, Envelope, MailParams, Recipient};
use proptest::prelude::*;

fn address() -> impl Strategy<Value = String> {
    // A dot-atom local part: atoms joined by single dots.
    (
        "[a-z0-9_+-]{1,8}(\\.[a-z0-9_+-]{1,4}){0,2}",
        "[a-z0-9]{1,10}\\.(test|example|org)",
    )
        .prop_map(|(l, d)| format!("{l}@{d}"))
}

/// `text` as RFC 3461 §4 xtext: `+` and `=` and what is not printable ASCII as `+XX`.
fn xtext(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        "[a-zA-Z0-9.-]{1,30}",
        prop::option::of("[a-z0-9.-]{1,30}"),
        prop::option::of("TLSv1\\.[23] with cipher [A-Z0-9_]{5,30}"),
        prop::option::of(address()),
        prop::option::of(address()),
        prop::collection::vec(
            (
                address(),
                prop::option::of((any::<bool>(), any::<bool>(), any::<bool>())),
                prop::option::of(address()),
            ),
            1..5,
        ),
        (
            prop::option::of(1u64..100_000_000),
            prop::option::of(prop_oneof![Just(Body::SevenBit), Just(Body::EightBitMime)]),
            any::<bool>(),
            prop::option::of(prop_oneof![Just(Ret::Full), Just(Ret::Hdrs)]),
            prop::option::of("[A-Za-z0-9+]{1,20}"),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(helo, name, tls, auth, from, rcpts, (size, body, utf8, ret, envid, requiretls))| {
                let from = match from {
                    Some(a) => parse_reverse_path(&format!("<{a}>")).unwrap().0,
                    None => parse_reverse_path("<>").unwrap().0,
                };
                Envelope {
                    client: ClientInfo {
                        ip: "192.0.2.7".parse().unwrap(),
                        port: 2525,
                        helo,
                        protocol: "ESMTPS".into(),
                        tls,
                        auth,
                        local_uid: None,
                        name,
                    },
                    from,
                    params: MailParams {
                        size,
                        body,
                        smtputf8: utf8,
                        ret,
                        envid,
                        requiretls,
                        ..Default::default()
                    },
                    rcpts: rcpts
                        .into_iter()
                        .map(|(a, notify, orcpt)| Recipient {
                            path: parse_forward_path(&format!("<{a}>")).unwrap().0,
                            params: RcptParams {
                                // NOTIFY is NEVER or at least one of the others (RFC 3461).
                                notify: notify.map(|(success, failure, delay)| Notify {
                                    never: !(success || failure || delay),
                                    success,
                                    failure,
                                    delay,
                                }),
                                // As a client sends it (RFC 3461 §4: xtext), which is all
                                // the RCPT TO parser accepts.
                                orcpt: orcpt.map(|o| Orcpt {
                                    addr_type: "rfc822".into(),
                                    xtext: xtext(&o),
                                }),
                            },
                        })
                        .collect(),
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn envelopes_and_content_survive_a_restart(env in envelope(), body in prop::collection::vec(any::<u8>(), 0..2000)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path());
        let m = rt.block_on(s.put(env.clone(), body.clone())).unwrap();
        let back = spool(dir.path()).recover().unwrap();
        prop_assert_eq!(back.len(), 1);
        prop_assert_eq!(&back[0].envelope, &env);
        prop_assert_eq!(back[0].id, m.id);
        let content = s.read_content(m.id).unwrap();
        prop_assert!(content.as_bytes().ends_with(&body));
    }
}
