//! Delivery status notifications (RFC 3464), checked by parsing them with mail-parser.

use estafeta_proto::{Notify, Reply, ReversePath, Status};
use estafeta_queue::dsn::{DsnAction, DsnInput, DsnRecipient, build_dsn, may_bounce, wants_dsn};
use estafeta_queue::transport::Failure;
use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders};

const NOW: u64 = 1_790_000_000;
const ARRIVAL: u64 = NOW - 5 * 3600;

const ORIGINAL: &[u8] = b"Received: from client.example.org by mx.example.test\r\n\
From: Alice <alice@example.org>\r\n\
To: bob@remote.example\r\n\
Subject: quarterly numbers\r\n\
Message-ID: <orig-1@example.org>\r\n\
\r\n\
Hello Bob,\r\n\
the numbers are attached.\r\n\
SECRET-BODY-LINE\r\n";

fn failed(addr: &str) -> DsnRecipient {
    DsnRecipient {
        final_recipient: addr.to_string(),
        original_recipient: None,
        action: DsnAction::Failed,
        status: Status::BAD_MAILBOX,
        remote_mta: Some("dns; mx1.remote.example".into()),
        diagnostic: Some(format!("smtp; 550 5.1.1 <{addr}>: User unknown")),
        last_attempt: Some(NOW - 10),
        will_retry_until: None,
    }
}

fn input<'a>(recipients: &'a [DsnRecipient], original: &'a [u8]) -> DsnInput<'a> {
    DsnInput {
        reporting_mta: "mx.example.test",
        queue_id: "4F2A9C01",
        envid: None,
        arrival: ARRIVAL,
        now: NOW,
        sender: "alice@example.org",
        recipients,
        original,
        return_full: false,
        max_returned: 100_000,
        boundary_seed: 7,
    }
}

fn parse(raw: &[u8]) -> Message<'_> {
    MessageParser::default()
        .parse(raw)
        .expect("mail-parser reads the report")
}

/// Every line ends in CRLF (no bare CR or LF) and is at most 998 octets.
fn assert_lines(raw: &[u8]) {
    assert!(raw.ends_with(b"\r\n"), "ends with CRLF");
    let mut start = 0;
    for (i, &b) in raw.iter().enumerate() {
        match b {
            b'\n' => {
                assert!(i > 0 && raw[i - 1] == b'\r', "bare LF at {i}");
                let len = i - 1 - start;
                assert!(len <= 998, "line of {len} octets at {start}");
                start = i + 1;
            }
            b'\r' => assert_eq!(raw.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            _ => {}
        }
    }
}

fn ctype(part: &MessagePart) -> String {
    let ct = part.content_type().expect("a Content-Type");
    format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
}

/// The three parts of the report.
fn parts<'a>(msg: &'a Message<'a>) -> Vec<&'a MessagePart<'a>> {
    let ct = msg.content_type().expect("Content-Type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let ids = msg.parts[0].sub_parts().expect("a multipart");
    assert_eq!(ids.len(), 3, "three parts");
    ids.iter().map(|&id| msg.part(id).expect("part")).collect()
}

/// The delivery-status part as field groups (per-message first, then one per recipient),
/// each group read by mail-parser as a header section; values unfolded.
fn status_groups(part: &MessagePart) -> Vec<Vec<(String, String)>> {
    let text = part.text_contents().expect("the status is text");
    text.split("\r\n\r\n")
        .filter(|g| !g.trim().is_empty())
        .map(|group| {
            let block = format!("{}\r\n\r\n", group.trim_end());
            let parsed = MessageParser::default()
                .parse_headers(block.as_bytes())
                .expect("a field group");
            parsed
                .headers_raw()
                .map(|(k, v)| {
                    let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
                    (k.to_string(), v)
                })
                .collect()
        })
        .collect()
}

/// Text with every run of whitespace (line breaks of wrapped paragraphs) made one space.
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn get<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_failure_report_has_the_rfc3464_structure() {
    let mut rcpts = vec![failed("bob@remote.example"), failed("carol@remote.example")];
    rcpts[0].original_recipient = Some("Bob.Original@alias.example".into());
    let mut inp = input(&rcpts, ORIGINAL);
    inp.envid = Some("QQ+1 env");
    let raw = build_dsn(&inp);
    assert_lines(&raw);
    let msg = parse(&raw);

    // Top-level headers.
    assert_eq!(
        msg.header_raw("From").unwrap().trim(),
        "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    );
    assert_eq!(msg.header_raw("To").unwrap().trim(), "<alice@example.org>");
    assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
    assert_eq!(
        msg.header_raw("Auto-Submitted").unwrap().trim(),
        "auto-replied"
    );
    assert_eq!(msg.header_raw("MIME-Version").unwrap().trim(), "1.0");
    assert_eq!(
        msg.message_id(),
        Some(format!("4F2A9C01.{NOW}.dsn@mx.example.test").as_str())
    );
    assert_eq!(
        msg.date().map(|d| d.to_timestamp()),
        Some(NOW as i64),
        "Date is now"
    );

    let p = parts(&msg);
    assert_eq!(ctype(p[0]), "text/plain");
    assert_eq!(ctype(p[1]), "message/delivery-status");
    assert_eq!(ctype(p[2]), "text/rfc822-headers");

    // The human part names each recipient with its diagnostic (wrapped: compare unwrapped).
    let human = flat(p[0].text_contents().unwrap());
    assert!(human.contains("mx.example.test"), "{human}");
    assert!(human.contains("could not"), "{human}");
    assert!(
        human.contains("<bob@remote.example> (expanded from <Bob.Original@alias.example>)"),
        "{human}"
    );
    assert!(
        human.contains("host mx1.remote.example said: 550 5.1.1 <carol@remote.example>: User"),
        "{human}"
    );

    let groups = status_groups(p[1]);
    assert_eq!(groups.len(), 3, "{groups:?}");
    let per_msg = &groups[0];
    assert_eq!(get(per_msg, "Reporting-MTA"), Some("dns; mx.example.test"));
    assert_eq!(get(per_msg, "X-Estafeta-Queue-ID"), Some("4F2A9C01"));
    assert_eq!(get(per_msg, "Original-Envelope-Id"), Some("QQ+1 env"));
    assert_eq!(
        get(per_msg, "Arrival-Date"),
        Some(estafeta_proto::trace::rfc5322_date(ARRIVAL).as_str())
    );

    let bob = &groups[1];
    assert_eq!(
        get(bob, "Original-Recipient"),
        Some("rfc822; Bob.Original@alias.example")
    );
    assert_eq!(
        get(bob, "Final-Recipient"),
        Some("rfc822; bob@remote.example")
    );
    assert_eq!(get(bob, "Action"), Some("failed"));
    assert_eq!(get(bob, "Status"), Some("5.1.1"));
    assert_eq!(get(bob, "Remote-MTA"), Some("dns; mx1.remote.example"));
    assert_eq!(
        get(bob, "Diagnostic-Code"),
        Some("smtp; 550 5.1.1 <bob@remote.example>: User unknown")
    );
    assert_eq!(
        get(bob, "Last-Attempt-Date"),
        Some(estafeta_proto::trace::rfc5322_date(NOW - 10).as_str())
    );
    assert_eq!(get(bob, "Will-Retry-Until"), None);

    let carol = &groups[2];
    assert_eq!(get(carol, "Original-Recipient"), None);
    assert_eq!(
        get(carol, "Final-Recipient"),
        Some("rfc822; carol@remote.example")
    );
    assert_eq!(get(carol, "Action"), Some("failed"));

    // RET=HDRS (or none): the header section only.
    let returned = p[2].text_contents().unwrap();
    assert!(
        returned.contains("Subject: quarterly numbers"),
        "{returned}"
    );
    assert!(
        returned.contains("Message-ID: <orig-1@example.org>"),
        "{returned}"
    );
    assert!(!returned.contains("SECRET-BODY-LINE"), "{returned}");
    assert!(!String::from_utf8_lossy(&raw).contains("SECRET-BODY-LINE"));
}

#[test]
fn ret_full_returns_the_whole_message() {
    let rcpts = [failed("bob@remote.example")];
    let mut inp = input(&rcpts, ORIGINAL);
    inp.return_full = true;
    let raw = build_dsn(&inp);
    assert_lines(&raw);
    let msg = parse(&raw);
    let p = parts(&msg);
    assert_eq!(ctype(p[2]), "message/rfc822");
    let inner = p[2].message().expect("a nested message");
    assert_eq!(inner.subject(), Some("quarterly numbers"));
    let body = inner.body_text(0).unwrap();
    assert!(body.contains("SECRET-BODY-LINE"), "{body}");
    assert_eq!(p[2].contents(), ORIGINAL);
    let human = p[0].text_contents().unwrap();
    assert!(!human.contains("truncated"), "{human}");
}

#[test]
fn ret_full_truncates_on_a_line_boundary_and_says_so() {
    let mut original = ORIGINAL.to_vec();
    for i in 0..2000 {
        original.extend_from_slice(format!("line {i:05} of a long body\r\n").as_bytes());
    }
    original.extend_from_slice(b"THE-LAST-LINE\r\n");
    let max = 4000;
    let rcpts = [failed("bob@remote.example")];
    let mut inp = input(&rcpts, &original);
    inp.return_full = true;
    inp.max_returned = max;
    let raw = build_dsn(&inp);
    assert_lines(&raw);
    assert!(raw.len() < 8000, "the report is small: {}", raw.len());
    let msg = parse(&raw);
    let p = parts(&msg);
    assert_eq!(ctype(p[2]), "message/rfc822");
    let returned = p[2].contents();
    assert!(returned.len() <= max, "{}", returned.len());
    assert!(
        returned.len() > max - 40,
        "cut near the limit: {}",
        returned.len()
    );
    assert!(returned.ends_with(b" of a long body\r\n"), "whole lines");
    assert_eq!(returned, &original[..returned.len()]);
    let inner = p[2].message().unwrap();
    assert_eq!(inner.subject(), Some("quarterly numbers"));
    assert!(!String::from_utf8_lossy(returned).contains("THE-LAST-LINE"));
    let human = p[0].text_contents().unwrap();
    assert!(human.contains("truncated"), "{human}");
}

#[test]
fn ret_full_with_a_limit_below_the_headers_returns_the_headers() {
    let rcpts = [failed("bob@remote.example")];
    let mut inp = input(&rcpts, ORIGINAL);
    inp.return_full = true;
    inp.max_returned = 50;
    let raw = build_dsn(&inp);
    assert_lines(&raw);
    let msg = parse(&raw);
    let p = parts(&msg);
    assert_eq!(ctype(p[2]), "text/rfc822-headers");
    assert!(p[2].text_contents().unwrap().contains("Subject: quarterly"));
    assert!(flat(p[0].text_contents().unwrap()).contains("only its headers"));
}

#[test]
fn eight_bit_content_is_returned_as_8bit() {
    let original =
        "From: a@example.org\r\nSubject: caf\u{e9}\r\n\r\nd\u{e9}j\u{e0} vu\r\n".as_bytes();
    let rcpts = [failed("bob@remote.example")];
    let mut inp = input(&rcpts, original);
    inp.return_full = true;
    let raw = build_dsn(&inp);
    assert_lines(&raw);
    let msg = parse(&raw);
    let p = parts(&msg);
    assert_eq!(p[2].content_transfer_encoding(), Some("8bit"));
    assert_eq!(p[2].contents(), original);
    assert_eq!(msg.content_transfer_encoding(), Some("8bit"));
}

#[test]
fn a_body_that_is_not_8bit_clean_is_not_returned_whole() {
    // A bare LF and a 2000-octet line cannot go as 8bit: only the headers come back.
    let mut original = b"From: a@example.org\r\nSubject: raw\r\n\r\nbare\nlf\r\n".to_vec();
    original.extend(std::iter::repeat_n(b'x', 2000));
    original.extend_from_slice(b"\r\n");
    let rcpts = [failed("bob@remote.example")];
    let mut inp = input(&rcpts, &original);
    inp.return_full = true;
    let raw = build_dsn(&inp);
    assert_lines(&raw);
    let p_msg = parse(&raw);
    let p = parts(&p_msg);
    assert_eq!(ctype(p[2]), "text/rfc822-headers");
    assert!(p[2].text_contents().unwrap().contains("Subject: raw"));
}

#[test]
fn overlong_headers_and_diagnostics_are_folded() {
    // A 1500-octet header line in the original and a 2500-octet diagnostic with a CRLF in it.
    let mut original = b"From: a@example.org\r\nX-Long: ".to_vec();
    original.extend(std::iter::repeat_n(b'y', 1500));
    original.extend_from_slice(b"\r\nSubject: s\r\n\r\nbody\r\n");
    let mut r = failed("bob@remote.example");
    let long: String = (0..250).map(|i| format!("word{i:04} ")).collect();
    r.diagnostic = Some(format!(
        "smtp; 550 5.1.1 {long}\r\nInjected: yes {}",
        "z".repeat(1200)
    ));
    let rcpts = [r];
    let raw = build_dsn(&input(&rcpts, &original));
    assert_lines(&raw);
    let msg = parse(&raw);
    let p = parts(&msg);
    let groups = status_groups(p[1]);
    assert_eq!(get(&groups[1], "Injected"), None, "no field injection");
    let diag = get(&groups[1], "Diagnostic-Code").unwrap();
    assert!(
        diag.starts_with("smtp; 550 5.1.1 word0000 word0001"),
        "{diag}"
    );
    assert!(diag.contains("word0249 Injected: yes zzz"), "{diag}");
    assert!(p[2].text_contents().unwrap().contains("Subject: s"));
}

#[test]
fn a_delay_warning_says_until_when() {
    let rcpts = [DsnRecipient {
        final_recipient: "dave@slow.example".into(),
        original_recipient: None,
        action: DsnAction::Delayed,
        status: Status::new(4, 4, 1),
        remote_mta: None,
        diagnostic: Some("smtp; 421 4.4.1 connection timed out".into()),
        last_attempt: Some(NOW - 60),
        will_retry_until: Some(ARRIVAL + 5 * 86_400),
    }];
    let raw = build_dsn(&input(&rcpts, ORIGINAL));
    assert_lines(&raw);
    let msg = parse(&raw);
    assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
    assert!(msg.header_raw("Auto-Submitted").is_some());
    let p = parts(&msg);
    let groups = status_groups(p[1]);
    let dave = &groups[1];
    assert_eq!(get(dave, "Action"), Some("delayed"));
    assert_eq!(get(dave, "Status"), Some("4.4.1"));
    assert_eq!(
        get(dave, "Will-Retry-Until"),
        Some(estafeta_proto::trace::rfc5322_date(ARRIVAL + 5 * 86_400).as_str())
    );
    let human = flat(p[0].text_contents().unwrap());
    assert!(human.contains("WARNING ONLY"), "{human}");
    assert!(human.contains("5 hours"), "{human}");
    assert!(human.contains("connection timed out"), "{human}");
    assert_eq!(ctype(p[2]), "text/rfc822-headers");
}

#[test]
fn a_success_report() {
    let rcpts = [DsnRecipient {
        final_recipient: "erin@example.test".into(),
        original_recipient: Some("erin@example.test".into()),
        action: DsnAction::Delivered,
        status: Status::SUCCESS,
        remote_mta: None,
        diagnostic: None,
        last_attempt: Some(NOW),
        will_retry_until: None,
    }];
    let raw = build_dsn(&input(&rcpts, ORIGINAL));
    assert_lines(&raw);
    let msg = parse(&raw);
    assert_eq!(msg.subject(), Some("Successful Mail Delivery Report"));
    let p = parts(&msg);
    let groups = status_groups(p[1]);
    assert_eq!(get(&groups[1], "Action"), Some("delivered"));
    assert_eq!(get(&groups[1], "Status"), Some("2.0.0"));
    assert_eq!(get(&groups[1], "Diagnostic-Code"), None);
    let human = flat(p[0].text_contents().unwrap());
    assert!(human.contains("successfully delivered"), "{human}");
    assert!(
        human.contains("<erin@example.test>: delivered to mailbox"),
        "{human}"
    );
}

#[test]
fn the_boundary_is_deterministic_and_avoids_the_content() {
    let rcpts = [failed("bob@remote.example")];
    let a = build_dsn(&input(&rcpts, ORIGINAL));
    assert_eq!(
        a,
        build_dsn(&input(&rcpts, ORIGINAL)),
        "same input, same bytes"
    );
    let msg = parse(&a);
    let boundary = msg
        .content_type()
        .unwrap()
        .attribute("boundary")
        .unwrap()
        .to_string();
    let mut other = input(&rcpts, ORIGINAL);
    other.boundary_seed = 8;
    assert_ne!(build_dsn(&other), a, "another seed, another boundary");

    // An original that contains this very boundary line gets another one.
    let mut tricky = ORIGINAL.to_vec();
    tricky.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
    let mut inp = input(&rcpts, &tricky);
    inp.return_full = true;
    let raw = build_dsn(&inp);
    assert_lines(&raw);
    let msg = parse(&raw);
    let b2 = msg.content_type().unwrap().attribute("boundary").unwrap();
    assert_ne!(b2, boundary);
    let p = parts(&msg);
    assert_eq!(p[2].contents(), &tricky[..]);
}

#[test]
fn a_recipient_from_a_transport_failure() {
    let f = Failure {
        reply: Reply::new(
            550,
            Status::new(5, 1, 1),
            "<bob@remote.example>: User unknown",
        ),
        remote: Some("mx1.remote.example[192.0.2.25]".into()),
        command: Some("RCPT TO".into()),
    };
    let r = DsnRecipient::from_failure("bob@remote.example", DsnAction::Failed, &f);
    assert_eq!(r.status, Status::BAD_MAILBOX);
    assert_eq!(r.remote_mta.as_deref(), Some("dns; mx1.remote.example"));
    assert_eq!(
        r.diagnostic.as_deref(),
        Some("smtp; 550 5.1.1 <bob@remote.example>: User unknown")
    );
    let local = Failure::local(Reply::plain(451, vec!["local problem".into()]));
    let r = DsnRecipient::from_failure("x@y.example", DsnAction::Delayed, &local);
    assert_eq!(r.status, Status::TEMPORARY);
    assert_eq!(r.remote_mta, None);
}

#[test]
fn notify_decides_who_gets_a_report() {
    use DsnAction::*;
    let never = Notify {
        never: true,
        ..Notify::default()
    };
    let success = Notify {
        success: true,
        ..Notify::default()
    };
    let failure_delay = Notify {
        failure: true,
        delay: true,
        ..Notify::default()
    };
    let all = [Failed, Delayed, Delivered, Relayed, Expanded];
    let table: [(Option<Notify>, [bool; 5]); 4] = [
        (None, [true, true, false, false, false]),
        (Some(never), [false; 5]),
        (Some(success), [false, false, true, true, true]),
        (Some(failure_delay), [true, true, false, false, false]),
    ];
    for (notify, expected) in table {
        for (action, want) in all.iter().zip(expected) {
            assert_eq!(
                wants_dsn(notify, *action),
                want,
                "NOTIFY={:?} {action:?}",
                notify.map(|n| n.to_wire())
            );
        }
    }
    assert!(wants_dsn(Notify::parse("FAILURE"), Failed));
    assert!(!wants_dsn(Notify::parse("FAILURE"), Delayed));
}

#[test]
fn the_null_sender_is_never_bounced() {
    assert!(!may_bounce(&ReversePath::Null));
    let (path, _) = estafeta_proto::address::parse_reverse_path("<alice@example.org>").unwrap();
    assert!(may_bounce(&path));
}
