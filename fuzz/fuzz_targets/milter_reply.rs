//! The milter client's decoder of filter responses (`estafeta_milter::codec::decode`), on
//! arbitrary bytes from a filter, read packet after packet as the client does.
//!
//! Checked: nothing panics; a decoded packet takes between 5 bytes and the whole input and
//! never more than `MAX_PACKET` + 4; every cut of a decoded packet is `Incomplete`; a decoded
//! response written back (`Response::encode`) decodes to itself; and where the encoding is
//! canonical (every string valid UTF-8 and NUL-terminated, which is what libmilter writes) it
//! gives back the very same bytes. A reply code text goes through the same conversion to an
//! SMTP reply as the client's (`Reply::from_received` on the parsed lines) without panicking.

#![no_main]

use estafeta_milter::codec::{Decoded, MAX_PACKET, Response, decode};
use estafeta_proto::reply::{Reply, parse_received_line};
use libfuzzer_sys::fuzz_target;

/// The strings a response carries.
fn strings(response: &Response) -> Vec<&str> {
    match response {
        Response::OptNeg { symlists, .. } => symlists.iter().map(|(_, s)| s.as_str()).collect(),
        Response::ReplyCode(s)
        | Response::Quarantine(s)
        | Response::AddRcpt(s)
        | Response::DelRcpt(s)
        | Response::SetSymList { macros: s, .. } => vec![s],
        Response::AddHeader { name, value }
        | Response::InsertHeader { name, value, .. }
        | Response::ChangeHeader { name, value, .. } => vec![name, value],
        Response::AddRcptPar { rcpt: a, args } | Response::ChangeFrom { from: a, args } => {
            let mut v = vec![a.as_str()];
            v.extend(args.as_deref());
            v
        }
        _ => vec![],
    }
}

/// True when re-encoding must give the input bytes back: no string went through the lossy
/// UTF-8 conversion (none holds U+FFFD; a literal U+FFFD in the input only skips the check),
/// and the texts of 'y' and 'q' ended with their NUL (it is optional when reading).
fn canonical(packet: &[u8], response: &Response) -> bool {
    if strings(response).iter().any(|s| s.contains('\u{FFFD}')) {
        return false;
    }
    match response {
        Response::ReplyCode(_) | Response::Quarantine(_) => packet.last() == Some(&0),
        _ => true,
    }
}

fn check_reply_text(text: &str) {
    let mut lines = Vec::new();
    let mut code = None;
    for raw in text.split('\n') {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some((c, _, t)) = parse_received_line(raw.as_bytes()) {
            code = Some(c);
            lines.push(t);
        }
    }
    if let Some(code) = code {
        let reply = Reply::from_received(code, lines);
        let _ = (reply.to_bytes(), reply.to_string());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    // At most as many packets as there are 5-byte slices: the loop always advances.
    for _ in 0..=data.len() / 5 {
        match decode(input) {
            Ok(Decoded::Incomplete) | Err(_) => break,
            Ok(Decoded::Packet(response, used)) => {
                assert!(used >= 5 && used <= input.len() && used <= MAX_PACKET + 4);
                let packet = &input[..used];
                for cut in [0, 4, used / 2, used - 1] {
                    assert_eq!(
                        decode(&packet[..cut]),
                        Ok(Decoded::Incomplete),
                        "{packet:?}"
                    );
                }
                let wire = response.to_bytes();
                assert_eq!(
                    decode(&wire),
                    Ok(Decoded::Packet(response.clone(), wire.len())),
                    "{packet:?} re-encoded as {wire:?}"
                );
                if canonical(packet, &response) {
                    assert_eq!(wire, packet, "{response:?}");
                }
                if let Response::ReplyCode(text) = &response {
                    check_reply_text(text);
                }
                input = &input[used..];
            }
        }
    }
});
