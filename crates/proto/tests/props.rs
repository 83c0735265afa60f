//! Property tests: the parsers never panic, and how input is split into reads never changes
//! what the session does.

use std::sync::Arc;

use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::command::parse_command;
use estafeta_proto::data::{DataReceiver, DataStatus, Stuffer, stuff};
use estafeta_proto::{Action, Session, SessionConfig, VrfyMode};
use proptest::prelude::*;

fn smtpish() -> impl Strategy<Value = Vec<u8>> {
    // Bytes biased towards the ones that matter: CR, LF, dot, letters of commands.
    prop::collection::vec(
        prop_oneof![
            Just(b'\r'),
            Just(b'\n'),
            Just(b'.'),
            Just(b' '),
            Just(b'<'),
            Just(b'>'),
            Just(b'@'),
            Just(b':'),
            any::<u8>(),
            prop::sample::select(b"MAILFROMRCPTTODATABDAT0123456789LAST".to_vec()),
        ],
        0..300,
    )
}

fn run_session(chunks: &[&[u8]]) -> (Vec<u8>, Vec<Vec<u8>>) {
    run_session_taking(chunks, None)
}

/// [`run_session`], taking the content whenever `take` octets of it wait, as the listener
/// does with a large message (the blocks taken joined to what `Enqueue` carries).
fn run_session_taking(chunks: &[&[u8]], take: Option<usize>) -> (Vec<u8>, Vec<Vec<u8>>) {
    let cfg = SessionConfig {
        hostname: "mx.test".into(),
        banner: "ESMTP".into(),
        max_message_size: 10_000,
        max_recipients: 10,
        max_errors: 1000,
        max_received_headers: 50,
        vrfy: VrfyMode::Ambiguous,
        starttls: false,
        auth: estafeta_proto::AuthMode::Never,
        require_auth: false,
        max_auth_failures: 3,
        check_sender: false,
        authenticated_header: false,
        expn_trusted: false,
        max_unknown_recipients: 0,
    };
    let mut s = Session::new(Arc::new(cfg), "127.0.0.1:1".parse().unwrap());
    let mut out = Vec::new();
    let mut msgs = Vec::new();
    let mut taken: Vec<u8> = Vec::new();
    let mut drive = |s: &mut Session, out: &mut Vec<u8>| {
        while let Some(a) = s.poll() {
            match a {
                Action::Send(r) => r.write_to(out),
                Action::CheckRcpt(_) => s.rcpt_checked(Ok(())),
                Action::CheckMail { .. } => s.mail_checked(Ok(())),
                Action::StartTls => s.tls_started("TLS".into()),
                Action::Authenticate { .. } => s.auth_checked(Ok("u".into())),
                Action::Verify { .. } => s.verified(estafeta_proto::reply::vrfy_ambiguous()),
                Action::Etrn(d) => s.etrn_done(estafeta_proto::reply::etrn_started(&d, 0)),
                Action::Pause(_) => {}
                Action::Enqueue(_, body) => {
                    let mut whole = if s.body_taken() > 0 {
                        assert_eq!(s.body_taken(), taken.len() as u64);
                        std::mem::take(&mut taken)
                    } else {
                        Vec::new()
                    };
                    whole.extend_from_slice(&body);
                    msgs.push(whole);
                    s.enqueued(Ok("X".into()));
                }
                Action::Close => {}
            }
        }
        if let Some(min) = take {
            let before = s.body_taken();
            if let Some(block) = s.take_body(min) {
                if before == 0 {
                    taken.clear();
                }
                taken.extend_from_slice(&block);
            }
        }
        if s.body_taken() == 0 {
            taken.clear();
        }
    };
    drive(&mut s, &mut out);
    for c in chunks {
        s.feed(c);
        drive(&mut s, &mut out);
    }
    (out, msgs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Stuffing a message block by block (a large message is sent that way) gives what
    /// stuffing it whole gives, wherever the blocks are cut.
    #[test]
    fn stuffing_in_blocks_is_stuffing_whole(
        content in smtpish(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut whole = Vec::new();
        stuff(&content, &mut whole);
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(content.len() + 1)).collect();
        at.sort_unstable();
        let mut s = Stuffer::default();
        let mut out = Vec::new();
        let mut from = 0;
        for cut in at.into_iter().chain([content.len()]) {
            s.feed(&content[from..cut], &mut out);
            from = cut;
        }
        s.finish(&mut out);
        prop_assert_eq!(out, whole);
    }

    #[test]
    fn command_parser_never_panics(line in smtpish()) {
        let _ = parse_command(&line);
    }

    #[test]
    fn mail_rcpt_parser_never_panics(tail in "\\PC{0,80}") {
        let _ = parse_command(format!("MAIL FROM:{tail}").as_bytes());
        let _ = parse_command(format!("RCPT TO:<{tail}> NOTIFY=x ORCPT=rfc822;{tail}").as_bytes());
    }

    #[test]
    fn data_receiver_split_invariance(input in smtpish(), split in 0usize..300) {
        let split = split.min(input.len());
        let mut a = DataReceiver::new(1 << 20);
        let mut out_a = Vec::new();
        let end_a = a.feed(&input, &mut out_a);
        let mut b = DataReceiver::new(1 << 20);
        let mut out_b = Vec::new();
        let end_b = match b.feed(&input[..split], &mut out_b) {
            DataStatus::Done(n) => DataStatus::Done(n),
            DataStatus::More => match b.feed(&input[split..], &mut out_b) {
                DataStatus::Done(n) => DataStatus::Done(n + split),
                DataStatus::More => DataStatus::More,
            },
        };
        prop_assert_eq!(out_a, out_b);
        prop_assert_eq!(end_a, end_b);
    }

    #[test]
    fn data_ends_only_at_crlf_dot_crlf(input in smtpish()) {
        let mut r = DataReceiver::new(1 << 20);
        let mut out = Vec::new();
        if let DataStatus::Done(n) = r.feed(&input, &mut out) {
            // The end is a real CRLF.CRLF (or `.CRLF` at the very start).
            let seen = &input[..n];
            prop_assert!(seen.ends_with(b".\r\n"));
            prop_assert!(n == 3 || seen[..n - 3].ends_with(b"\r\n"));
        }
    }

    #[test]
    fn stuffed_content_round_trips(content in smtpish()) {
        let mut wire = Vec::new();
        stuff(&content, &mut wire);
        let mut r = DataReceiver::new(1 << 20);
        let mut back = Vec::new();
        prop_assert_eq!(r.feed(&wire, &mut back), DataStatus::Done(wire.len()));
        // Stuffing what was received gives the same wire form again.
        let mut again = Vec::new();
        stuff(&back, &mut again);
        prop_assert_eq!(wire, again);
    }

    /// Taking a message's content in blocks while it arrives (a large message written to a
    /// file) changes neither the replies nor the messages, however the input is cut.
    #[test]
    fn taking_content_in_blocks_changes_nothing(
        body in smtpish(),
        body2 in smtpish(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        min in 1usize..64,
    ) {
        let mut full = b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n".to_vec();
        full.extend_from_slice(b"Subject: one\r\nReceived: x\r\n\r\n");
        full.extend_from_slice(&body);
        full.extend_from_slice(b"\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n");
        let content2 = [b"Subject: two\n\n".as_slice(), &body2].concat();
        full.extend_from_slice(format!("BDAT {} LAST\r\n", content2.len()).as_bytes());
        full.extend_from_slice(&content2);
        full.extend_from_slice(b"RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n");
        full.extend_from_slice(b"Subject: aborted\r\n\r\n");
        full.extend_from_slice(&body2);
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(full.len() + 1)).collect();
        at.sort_unstable();
        let mut chunks: Vec<&[u8]> = Vec::new();
        let mut from = 0;
        for cut in at.into_iter().chain([full.len()]) {
            chunks.push(&full[from..cut]);
            from = cut;
        }
        let plain = run_session_taking(&chunks, None);
        let taking = run_session_taking(&chunks, Some(min));
        prop_assert_eq!(plain, taking);
    }

    #[test]
    fn session_split_invariance(input in smtpish(), split in 0usize..300) {
        let mut full = b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n".to_vec();
        full.extend_from_slice(&input);
        let split = split.min(full.len());
        let whole = run_session(&[&full]);
        let parts = run_session(&[&full[..split], &full[split..]]);
        prop_assert_eq!(whole, parts);
    }

    /// Any address the parser accepts is written back in a form that parses to the same
    /// address (what the spool and the relay client write is what was received).
    #[test]
    fn addresses_round_trip(
        local in prop_oneof![
            "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}){0,3}",
            "\"[ -~]{0,20}\"",
        ],
        domain in prop_oneof![
            "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}",
            "\\[(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}\\]",
        ],
    ) {
        let text = format!("<{local}@{domain}>");
        if let Ok((path, _)) = parse_forward_path(&text) {
            let written = format!("<{path}>");
            let again = parse_forward_path(&written).expect("written form parses");
            prop_assert_eq!(&again.0, &path);
            let (rev, _) = parse_reverse_path(&text).expect("a forward path is a reverse path");
            let written = format!("<{rev}>");
            let again = parse_reverse_path(&written).expect("written form parses");
            prop_assert_eq!(again.0, rev);
        }
    }
}
