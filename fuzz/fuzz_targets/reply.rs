//! The outbound client's reading of a server's replies, on arbitrary bytes from the server.
//!
//! The relay client (`crates/relay/src/client.rs`, `read_line` and `read_reply`) is async and
//! private; what it does with the bytes is public in proto: each line goes through
//! `reply::parse_received_line` and the lines of one reply through `Reply::from_received`.
//! This target repeats its loop over the input without I/O: lines end at LF (a CR before it is
//! dropped), a line over `MAX_REPLY_LINE` octets, a reply over `MAX_REPLY_LINES` lines, a
//! malformed line or a code that changes within a reply ends the connection (as `Broken`).
//!
//! Checked: nothing panics; an accepted line starts with its three digits and gives the code
//! they spell; an enhanced status code found in a reply prints back to itself; every method a
//! caller uses on a reply (severity, text, Display, wire form) works; and a reply written back
//! in wire form (`Reply::to_bytes`, for a code of three digits) is read back with the same
//! code, status and lines (but for spaces at the start of a line), and is stable from then on.

#![no_main]

use estafeta_proto::reply::{Reply, Status, parse_received_line};
use libfuzzer_sys::fuzz_target;

/// As in crates/relay/src/client.rs.
const MAX_REPLY_LINE: usize = 2048;
const MAX_REPLY_LINES: usize = 100;

/// Reads one line like the relay client's `read_line`; `None` when the connection breaks.
fn read_line<'a>(input: &mut &'a [u8], limit: bool) -> Option<&'a [u8]> {
    let lf = input.iter().position(|&b| b == b'\n')?; // no LF: the server closed
    if limit && lf + 1 > MAX_REPLY_LINE + 2 {
        return None;
    }
    let mut line = &input[..lf];
    *input = &input[lf + 1..];
    if line.last() == Some(&b'\r') {
        line = &line[..line.len() - 1];
    }
    Some(line)
}

/// Reads one reply like the relay client's `read_reply`; `None` when the connection breaks.
fn read_reply(input: &mut &[u8], limit: bool) -> Option<Reply> {
    let mut code: Option<u16> = None;
    let mut lines = Vec::new();
    loop {
        if limit && lines.len() >= MAX_REPLY_LINES {
            return None;
        }
        let raw = read_line(input, limit)?;
        let parsed = parse_received_line(raw);
        check_line(raw, parsed.as_ref());
        let (this, last, text) = parsed?;
        if code.is_some_and(|c| c != this) {
            return None;
        }
        code = Some(this);
        lines.push(text);
        if last {
            break;
        }
    }
    Some(Reply::from_received(code.unwrap_or_default(), lines))
}

fn check_line(raw: &[u8], parsed: Option<&(u16, bool, String)>) {
    let Some((code, last, text)) = parsed else {
        return;
    };
    assert!(
        raw.len() >= 3 && raw[..3].iter().all(u8::is_ascii_digit),
        "{raw:?}"
    );
    let digits = std::str::from_utf8(&raw[..3]).unwrap();
    assert_eq!(digits.parse::<u16>().unwrap(), *code, "{raw:?}");
    assert_eq!(*last, raw.get(3) != Some(&b'-'), "{raw:?}");
    assert_eq!(
        *text,
        String::from_utf8_lossy(raw.get(4..).unwrap_or_default()),
        "{raw:?}"
    );
}

fn check_reply(reply: &Reply) {
    assert!(!reply.lines.is_empty());
    let _ = (
        reply.severity(),
        reply.is_error(),
        reply.text(),
        reply.to_string(),
    );
    if let Some(status) = reply.status {
        assert_eq!(u16::from(status.class), reply.code / 100, "{reply:?}");
        assert_eq!(
            Status::parse(&status.to_string()),
            Some(status),
            "{reply:?}"
        );
    }
    if reply.code >= 100 {
        // Written back and read again, a reply keeps its code, status and lines; only the
        // spaces at the start of a line may go (a line without the status code that started
        // with spaces gets the code in front when written, and the spaces after a code are
        // dropped when read). Once written and read, it stays the same.
        let back = write_and_read(reply);
        assert_eq!(back.code, reply.code, "{reply:?}");
        assert_eq!(back.status, reply.status, "{reply:?}");
        assert_eq!(back.lines.len(), reply.lines.len(), "{reply:?}");
        for (b, r) in back.lines.iter().zip(&reply.lines) {
            assert!(
                b == r || b == r.trim_start_matches(' '),
                "{reply:?} came back as {back:?}"
            );
        }
        assert_eq!(write_and_read(&back), back, "{reply:?}");
    }
}

/// The reply in wire form, read back as the client reads it.
fn write_and_read(reply: &Reply) -> Reply {
    let wire = reply.to_bytes();
    let mut rest = wire.as_slice();
    let back = read_reply(&mut rest, false)
        .unwrap_or_else(|| panic!("{reply:?} written as {wire:?} does not read back"));
    assert!(
        rest.is_empty(),
        "{reply:?} written as {wire:?}: {rest:?} left"
    );
    back
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    while let Some(reply) = read_reply(&mut input, true) {
        check_reply(&reply);
    }
});
