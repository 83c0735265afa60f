//! BDAT (RFC 3030 CHUNKING) in a session, chunk by chunk, with the sizes right.
//!
//! The `session` target gets BDAT too, but from raw bytes: a chunk only lines up with the
//! commands that follow when the fuzzer writes its exact size in decimal, so chunk sequences
//! are rare there. Here the input is a script and the target writes the `BDAT n [LAST]` lines
//! itself, after `EHLO`, `MAIL FROM` and `RCPT TO`:
//!
//! - byte 0: bit 0 adds `BODY=8BITMIME SMTPUTF8` to MAIL FROM (BINARYMIME is not offered),
//!   bit 1 a second RCPT TO, bit 2 runs the one-byte-per-read session first (both run);
//! - then operations, each starting with a byte `op`:
//!   - `op % 8 == 7`: a raw command line: the bytes up to the next LF (`RSET`, `DATA`, `NOOP`,
//!     another `MAIL FROM`…), sent with CRLF;
//!   - `op % 8 == 6`: a chunk whose declared size is off: `BDAT` names the next byte plus the
//!     byte after it times 256, and what follows is sent as is;
//!   - otherwise a chunk: the next byte is its size `n`, the `n` bytes after it its content,
//!     and bit 7 of `op` makes it `LAST`. When the input ends inside a chunk, the chunk is cut.
//!
//! Always checked: no panic; exactly one `Close`, at the end; a stored message is never over
//! the size limit; the same actions whether the session reads everything at once or one byte
//! at a time. When the script has only well-formed chunks (no raw line, no wrong size), the
//! whole exchange is predicted and compared reply by reply: `250 n octets received` for a
//! chunk, the message stored with exactly the chunks' bytes at `LAST` then `250 queued as X`,
//! `552` once the size limit would be passed (and the transaction is over), `503` for a chunk
//! with no transaction; the chunks' bytes are never read as commands.

#![no_main]

use std::sync::Arc;

use estafeta_proto::reply::{self, Reply};
use estafeta_proto::{Action, AuthMode, Session, SessionConfig, VrfyMode};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 1000;
const HOST: &str = "mx.fuzz.test";

fn config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: HOST.into(),
        banner: "ESMTP estafeta".into(),
        max_message_size: LIMIT,
        max_recipients: 5,
        // High, so that the predicted exchange is not cut by the error limit.
        max_errors: 100_000,
        max_received_headers: 100_000,
        vrfy: VrfyMode::Ambiguous,
        starttls: false,
        auth: AuthMode::Never,
        require_auth: false,
        max_auth_failures: 3,
        check_sender: false,
        authenticated_header: false,
        expn_trusted: false,
        max_unknown_recipients: 0,
    })
}

/// The client's byte stream, and the chunks when the script is only well-formed chunks.
struct Script {
    wire: Vec<u8>,
    /// `(content, last, complete)` for each chunk; `None` once a raw line or a wrong size
    /// was written.
    chunks: Option<Vec<(Vec<u8>, bool, bool)>>,
}

fn script(flags: u8, mut input: &[u8]) -> Script {
    let mut wire = Vec::new();
    wire.extend_from_slice(b"EHLO client.fuzz.test\r\nMAIL FROM:<a@client.fuzz.test>");
    if flags & 1 != 0 {
        wire.extend_from_slice(b" BODY=8BITMIME SMTPUTF8");
    }
    wire.extend_from_slice(b"\r\nRCPT TO:<b@x.test>\r\n");
    if flags & 2 != 0 {
        wire.extend_from_slice(b"RCPT TO:<c@x.test>\r\n");
    }
    let mut chunks = Some(Vec::new());
    while let Some((&op, rest)) = input.split_first() {
        input = rest;
        match op % 8 {
            7 => {
                let end = input
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap_or(input.len());
                wire.extend_from_slice(&input[..end]);
                wire.extend_from_slice(b"\r\n");
                input = input.get(end + 1..).unwrap_or_default();
                chunks = None;
            }
            6 => {
                let lo = input.first().copied().unwrap_or(0);
                let hi = input.get(1).copied().unwrap_or(0);
                input = input.get(2..).unwrap_or_default();
                let size = u32::from(lo) + 256 * u32::from(hi);
                let last = if op & 0x80 != 0 { " LAST" } else { "" };
                wire.extend_from_slice(format!("BDAT {size}{last}\r\n").as_bytes());
                chunks = None;
            }
            _ => {
                let Some((&n, rest)) = input.split_first() else {
                    break;
                };
                let n = usize::from(n);
                let take = n.min(rest.len());
                let (content, rest) = rest.split_at(take);
                input = rest;
                let last = op & 0x80 != 0;
                let tail = if last { " LAST" } else { "" };
                wire.extend_from_slice(format!("BDAT {n}{tail}\r\n").as_bytes());
                wire.extend_from_slice(content);
                if let Some(c) = chunks.as_mut() {
                    c.push((content.to_vec(), last, take == n));
                }
            }
        }
    }
    Script { wire, chunks }
}

fn drive(s: &mut Session, actions: &mut Vec<Action>) {
    while let Some(a) = s.poll() {
        match &a {
            Action::CheckRcpt(_) => s.rcpt_checked(Ok(())),
            Action::Enqueue(..) => s.enqueued(Ok("X".into())),
            Action::Verify { .. } => s.verified(reply::vrfy_ambiguous()),
            Action::Etrn(d) => s.etrn_done(reply::etrn_started(d, 0)),
            _ => {}
        }
        actions.push(a);
    }
}

fn run(wire: &[u8], bytewise: bool) -> Vec<Action> {
    let mut s = Session::new(config(), "192.0.2.1:49152".parse().unwrap());
    let mut actions = Vec::new();
    drive(&mut s, &mut actions);
    let reads: Vec<&[u8]> = if bytewise {
        wire.chunks(1).collect()
    } else {
        vec![wire]
    };
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
    assert_eq!(actions.last(), Some(&Action::Close), "no Close at the end");
    assert_eq!(
        actions.iter().filter(|a| **a == Action::Close).count(),
        1,
        "Close more than once"
    );
    for a in &actions {
        if let Action::Enqueue(_, body) = a {
            assert!(
                body.len() as u64 <= LIMIT,
                "a message of {} octets stored",
                body.len()
            );
        }
    }
    actions
}

/// What the session must answer to the chunks, after the EHLO, MAIL and RCPT replies.
fn predict(chunks: &[(Vec<u8>, bool, bool)]) -> Vec<Action> {
    let mut out = Vec::new();
    let mut body: Option<Vec<u8>> = Some(Vec::new());
    for (content, last, complete) in chunks {
        if !complete {
            break; // the session waits for the rest of the chunk
        }
        let n = content.len() as u64;
        match body.as_mut() {
            None => out.push(Action::Send(reply::bad_sequence("need MAIL command"))),
            Some(b) if b.len() as u64 + n > LIMIT => {
                out.push(Action::Send(reply::message_too_big()));
                body = None;
            }
            Some(b) => {
                b.extend_from_slice(content);
                if *last {
                    let b = body.take().unwrap();
                    out.push(Action::Enqueue(Box::new(dummy_envelope()), b));
                    out.push(Action::Send(reply::queued("X")));
                } else {
                    out.push(Action::Send(reply::chunk_ok(n)));
                }
            }
        }
    }
    out.push(Action::Send(reply::shutting_down(HOST)));
    out.push(Action::Close);
    out
}

/// Stands in for the envelope, which `same` checks apart.
fn dummy_envelope() -> estafeta_proto::Envelope {
    estafeta_proto::Envelope {
        client: estafeta_proto::ClientInfo {
            ip: [0, 0, 0, 0].into(),
            port: 0,
            helo: String::new(),
            protocol: String::new(),
            tls: None,
            auth: None,
            local_uid: None,
            name: None,
        },
        from: estafeta_proto::ReversePath::Null,
        params: Default::default(),
        rcpts: Vec::new(),
    }
}

/// Replies and stored bodies equal, and the envelope's sender and number of recipients.
fn same(got: &Action, want: &Action, rcpts: usize) -> bool {
    match (got, want) {
        (Action::Enqueue(env, a), Action::Enqueue(_, b)) => {
            a == b && env.rcpts.len() == rcpts && env.from.to_string() == "a@client.fuzz.test"
        }
        (a, b) => a == b,
    }
}

fn show(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Send(r) => String::from_utf8_lossy(&Reply::to_bytes(r)).into_owned(),
            Action::Enqueue(_, body) => format!("Enqueue({:?})", String::from_utf8_lossy(body)),
            other => format!("{other:?}"),
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let script = script(flags, input);
    let actions = run(&script.wire, flags & 4 != 0);
    let other = run(&script.wire, flags & 4 == 0);
    assert_eq!(
        actions, other,
        "actions differ between one read and one byte per read"
    );

    let Some(chunks) = &script.chunks else {
        return;
    };
    // Greeting, EHLO, MAIL, then for each RCPT the check and its reply.
    let rcpts = if flags & 2 != 0 { 2 } else { 1 };
    let prelude = 3 + 2 * rcpts;
    assert!(actions.len() >= prelude, "{:?}", show(&actions));
    for a in &actions[..prelude] {
        if let Action::Send(r) = a {
            assert!(!r.is_error(), "prelude refused: {r}");
        }
    }
    let got = &actions[prelude..];
    let want = predict(chunks);
    assert!(
        got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| same(g, w, rcpts)),
        "BDAT exchange differs from the prediction\n got: {:#?}\nwant: {:#?}",
        show(got),
        show(&want)
    );
});
