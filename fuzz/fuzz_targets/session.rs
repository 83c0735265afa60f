//! The SMTP server session driven like the listener drives it, with the input cut into reads.
//!
//! The first byte of the input seeds how the rest is cut and picks the listener profile; the
//! rest is the client's byte stream. The session runs three times: all bytes in one read, in
//! reads of pseudo-random sizes, and one byte per read. It must never panic, and every run must
//! give the same actions (replies, recipient checks, messages to store, close) in the same
//! order: how TCP happens to cut the stream never changes what the server answers or stores.
//! Up to STARTTLS, that is: the plaintext buffered behind STARTTLS is discarded on purpose
//! (RFC 3207 §6), so which bytes are lost depends on the reads; once a run has reached
//! `StartTls`, the runs are compared up to that action only.
//!
//! Profiles (first byte modulo 8): 0–3 and 5 a port-25 MTA (5 also offers STARTTLS), 4 a
//! local (sendmail) session, 6 submission (STARTTLS, AUTH after TLS, AUTH required, the
//! sender checked against the user), 7 trusted VRFY/EXPN and slowed recipient probing. Bit 7
//! turns VRFY off.
//!
//! The driver answers like a listener: every recipient is accepted except those whose local
//! part starts with `unknown` (refused with `550 5.1.1`, to reach the "no valid recipients"
//! paths); a sender whose local part starts with `unknown` is not the user's; SASL credentials
//! are good when the first response has an even length; the TLS handshake always succeeds;
//! every message is stored as queue ID `X`. At the end of the input the server shuts down, so
//! every run ends with `Close`.

#![no_main]

use std::sync::Arc;

use estafeta_proto::reply;
use estafeta_proto::{Action, AuthMode, Session, SessionConfig, VrfyMode};
use libfuzzer_sys::fuzz_target;

fn config(seed: u8) -> Arc<SessionConfig> {
    let profile = seed % 8;
    let submission = profile == 6;
    Arc::new(SessionConfig {
        hostname: "mx.fuzz.test".into(),
        banner: "ESMTP estafeta".into(),
        // Small, so that SIZE refusals and oversized DATA/BDAT are within the fuzzer's reach.
        max_message_size: 2000,
        max_recipients: 5,
        max_errors: 20,
        max_received_headers: 5,
        vrfy: if seed & 0x80 != 0 {
            VrfyMode::Off
        } else if profile == 7 {
            VrfyMode::Trusted
        } else {
            VrfyMode::Ambiguous
        },
        starttls: profile == 5 || submission,
        auth: if submission {
            AuthMode::AfterTls
        } else {
            AuthMode::Never
        },
        require_auth: submission,
        max_auth_failures: 3,
        check_sender: submission,
        authenticated_header: submission,
        expn_trusted: profile == 7,
        max_unknown_recipients: if profile == 7 { 2 } else { 0 },
    })
}

fn unknown(local: &str) -> bool {
    local.to_ascii_lowercase().starts_with("unknown")
}

/// Takes every action the session has, answering its questions at once.
fn drive(s: &mut Session, actions: &mut Vec<Action>) {
    while let Some(a) = s.poll() {
        match &a {
            Action::Send(_) | Action::Close | Action::Pause(_) => {}
            Action::CheckRcpt(rcpt) => {
                if unknown(&rcpt.path.mailbox.local) {
                    s.rcpt_checked(Err(reply::user_unknown(&rcpt.path.to_string())));
                } else {
                    s.rcpt_checked(Ok(()));
                }
            }
            Action::CheckMail { user, from } => {
                let from = from.to_string();
                if unknown(&from) {
                    s.mail_checked(Err(reply::sender_not_owned(&from, user)));
                } else {
                    s.mail_checked(Ok(()));
                }
            }
            Action::StartTls => s.tls_started("TLSv1.3 fuzz".into()),
            Action::Authenticate(answer) => {
                if answer.responses().first().is_some_and(|r| r.len() % 2 == 0) {
                    s.auth_checked(Ok("user".into()));
                } else {
                    s.auth_checked(Err(reply::auth_failed()));
                }
            }
            Action::Verify { argument, expn } => s.verified(if *expn {
                reply::expn_list(std::slice::from_ref(argument))
            } else {
                reply::vrfy_ok(argument)
            }),
            Action::Etrn(domain) => s.etrn_done(reply::etrn_started(domain, 1)),
            Action::Enqueue(..) => s.enqueued(Ok("X".into())),
        }
        actions.push(a);
    }
}

fn run(seed: u8, reads: &[&[u8]]) -> Vec<Action> {
    let mut s = if seed % 8 == 4 {
        Session::local(config(seed), 1000)
    } else {
        Session::new(config(seed), "192.0.2.1:49152".parse().unwrap())
    };
    let mut actions = Vec::new();
    drive(&mut s, &mut actions);
    for read in reads {
        if s.is_closed() {
            break;
        }
        s.feed(read);
        drive(&mut s, &mut actions);
    }
    if !s.is_closed() {
        s.shutting_down();
        drive(&mut s, &mut actions);
    }
    assert!(s.is_closed());
    assert_eq!(
        actions.last(),
        Some(&Action::Close),
        "the session did not end with Close"
    );
    assert_eq!(
        actions.iter().filter(|a| **a == Action::Close).count(),
        1,
        "Close more than once"
    );
    actions
}

/// Cuts `input` into pieces of 1 to 64 bytes, sizes drawn from a generator seeded by `seed`.
fn cut(seed: u8, input: &[u8]) -> Vec<&[u8]> {
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut pieces = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (1 + (state >> 16) as usize % 64).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// The actions up to and including the first `StartTls` (all of them without one).
fn before_tls(actions: &[Action]) -> &[Action] {
    match actions.iter().position(|a| *a == Action::StartTls) {
        Some(i) => &actions[..=i],
        None => actions,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let whole = run(seed, &[input]);
    let pieces = run(seed, &cut(seed, input));
    assert_eq!(
        before_tls(&whole),
        before_tls(&pieces),
        "actions differ when the input is cut into reads"
    );
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    let bytewise = run(seed, &bytes);
    assert_eq!(
        before_tls(&whole),
        before_tls(&bytewise),
        "actions differ when the input comes one byte per read"
    );
});
