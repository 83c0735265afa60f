//! Applying a filter's header and body modifications to the raw message, as Postfix's cleanup
//! server does. Pure: bytes in, bytes out. Envelope changes (recipients, sender, quarantine)
//! are the caller's.

use crate::Modification;

/// The header section split into fields (each with its continuation lines and its CRLF), and
/// the body after the empty line.
struct Parsed<'a> {
    fields: Vec<Vec<u8>>,
    /// The body, when the message has an empty line ending its header section.
    body: Option<&'a [u8]>,
}

/// Splits `message` into header fields and body. Lines end at LF; a field's continuation
/// lines start with a space or a tab. A missing final CRLF is added.
fn parse(message: &[u8]) -> Parsed<'_> {
    let mut fields: Vec<Vec<u8>> = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        if line == b"\r\n" || line == b"\n" {
            return Parsed {
                fields,
                body: Some(&message[end..]),
            };
        }
        let mut line = line.to_vec();
        if !line.ends_with(b"\n") {
            line.extend_from_slice(b"\r\n");
        }
        match fields.last_mut() {
            Some(last) if matches!(line[0], b' ' | b'\t') => last.extend_from_slice(&line),
            _ => fields.push(line),
        }
        pos = end;
    }
    Parsed { fields, body: None }
}

/// The name of a field: what comes before the colon, without trailing blanks.
fn field_name(field: &[u8]) -> &[u8] {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(0);
    field[..colon].trim_ascii_end()
}

/// Converts bare LF (and bare CR) to CRLF.
fn crlf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 32);
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\r' if text.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// A header field as Postfix writes a filter's field: `Name: value` (no `SMFIP_HDR_LEADSPC`:
/// the space after the colon is ours), line breaks in the value as CRLF.
fn new_field(name: &str, value: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(name.len() + value.len() + 4);
    f.extend_from_slice(name.as_bytes());
    f.extend_from_slice(b": ");
    f.extend_from_slice(&crlf(value.as_bytes()));
    f.extend_from_slice(b"\r\n");
    f
}

/// Applies the header and body modifications in `mods`, in order, to `message` (CRLF line
/// endings, header section up to the first empty line):
///
/// - `AddHeader` appends a field at the end of the header section;
/// - `InsertHeader` inserts a field before the `index`-th field (0: at the top; past the end:
///   at the end);
/// - `ChangeHeader` replaces the `index`-th (from 1; 0 counts as 1) field of that name
///   (compared without case); an empty value deletes it; when there is no such occurrence a
///   value adds the field at the end (sendmail's and Postfix's behaviour);
/// - `ReplaceBody` replaces everything after the empty line (bare LF become CRLF).
///
/// Envelope modifications and `Quarantine` are left to the caller.
pub fn apply(message: &[u8], mods: &[Modification]) -> Vec<u8> {
    let parsed = parse(message);
    let mut fields = parsed.fields;
    let mut body: Option<Vec<u8>> = None;
    for m in mods {
        match m {
            Modification::AddHeader { name, value } => fields.push(new_field(name, value)),
            Modification::InsertHeader { index, name, value } => {
                let at = (*index as usize).min(fields.len());
                fields.insert(at, new_field(name, value));
            }
            Modification::ChangeHeader { name, index, value } => {
                let nth = (*index).max(1) as usize;
                let found = fields
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| field_name(f).eq_ignore_ascii_case(name.as_bytes()))
                    .nth(nth - 1)
                    .map(|(i, _)| i);
                match (found, value.is_empty()) {
                    (Some(i), true) => {
                        fields.remove(i);
                    }
                    (Some(i), false) => fields[i] = new_field(name, value),
                    (None, true) => {}
                    (None, false) => fields.push(new_field(name, value)),
                }
            }
            Modification::ReplaceBody(new) => body = Some(crlf(new)),
            Modification::AddRcpt { .. }
            | Modification::DelRcpt(_)
            | Modification::ChangeFrom { .. }
            | Modification::Quarantine(_) => {}
        }
    }
    let old_body = parsed.body;
    let mut out = Vec::with_capacity(message.len() + 256);
    for f in &fields {
        out.extend_from_slice(f);
    }
    match (body, old_body) {
        (Some(new), _) => {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&new);
        }
        (None, Some(old)) => {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(old);
        }
        (None, None) => {}
    }
    out
}

/// A header field's name and value, borrowed from the message.
pub type HeaderField<'a> = (&'a [u8], &'a [u8]);

/// The header fields of `message` as a filter receives them in `SMFIC_HEADER` (sendmail's and
/// Postfix's form without `SMFIP_HDR_LEADSPC`): the name without trailing blanks, the value
/// without the blanks after the colon and without its final line break, inner folding (CRLF
/// and the blank that starts the next line) kept. Lines without a colon are left out. Also
/// returns the body: what follows the empty line (empty when there is none).
pub fn header_fields(message: &[u8]) -> (Vec<HeaderField<'_>>, &[u8]) {
    let mut fields = Vec::new();
    let mut pos = 0;
    let mut body: &[u8] = &[];
    let mut current: Option<(usize, usize)> = None; // start of the field, end of its last line
    let mut push = |start: usize, end: usize| {
        let field = &message[start..end];
        let field = field
            .strip_suffix(b"\r\n")
            .or_else(|| field.strip_suffix(b"\n"))
            .unwrap_or(field);
        if let Some(colon) = field.iter().position(|&b| b == b':') {
            let name = field[..colon].trim_ascii_end();
            let mut value = &field[colon + 1..];
            while let [b' ' | b'\t', rest @ ..] = value {
                value = rest;
            }
            fields.push((name, value));
        }
    };
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        if line == b"\r\n" || line == b"\n" {
            body = &message[end..];
            break;
        }
        match current {
            Some((start, _)) if matches!(line[0], b' ' | b'\t') => current = Some((start, end)),
            _ => {
                if let Some((start, last)) = current {
                    push(start, last);
                }
                current = Some((pos, end));
            }
        }
        pos = end;
    }
    if let Some((start, last)) = current {
        push(start, last);
    }
    (fields, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] =
        b"Received: from a\r\n\tby b\r\nSubject: one\r\nX-A: 1\r\nx-a: 2\r\n\r\nbody\r\n";

    fn add(name: &str, value: &str) -> Modification {
        Modification::AddHeader {
            name: name.into(),
            value: value.into(),
        }
    }

    fn ins(index: u32, name: &str, value: &str) -> Modification {
        Modification::InsertHeader {
            index,
            name: name.into(),
            value: value.into(),
        }
    }

    fn chg(name: &str, index: u32, value: &str) -> Modification {
        Modification::ChangeHeader {
            name: name.into(),
            index,
            value: value.into(),
        }
    }

    fn s(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn header_fields_as_sendmail_sends_them() {
        let (fields, body) = header_fields(MSG);
        let fields: Vec<(String, String)> = fields.iter().map(|(n, v)| (s(n), s(v))).collect();
        assert_eq!(
            fields,
            [
                ("Received", "from a\r\n\tby b"),
                ("Subject", "one"),
                ("X-A", "1"),
                ("x-a", "2")
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        assert_eq!(body, b"body\r\n");
        let (fields, body) = header_fields(b"Subject :  \t x\nnot a field\nEmpty:");
        assert_eq!(fields, [(&b"Subject"[..], &b"x"[..]), (b"Empty", b"")]);
        assert!(body.is_empty());
    }

    #[test]
    fn no_modification_keeps_the_message() {
        assert_eq!(s(&apply(MSG, &[])), s(MSG));
        assert_eq!(
            s(&apply(MSG, &[Modification::Quarantine("x".into())])),
            s(MSG)
        );
    }

    #[test]
    fn add_appends_at_the_end_of_the_header_section() {
        let out = apply(MSG, &[add("X-Spam", "Yes"), add("X-Two", "a\n b")]);
        assert_eq!(
            s(&out),
            "Received: from a\r\n\tby b\r\nSubject: one\r\nX-A: 1\r\nx-a: 2\r\nX-Spam: Yes\r\nX-Two: a\r\n b\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn insert_counts_fields_from_the_top() {
        let out = apply(
            MSG,
            &[
                ins(0, "X-Top", "t"),
                ins(2, "X-Third", "3"),
                ins(99, "X-End", "e"),
            ],
        );
        assert_eq!(
            s(&out),
            "X-Top: t\r\nReceived: from a\r\n\tby b\r\nX-Third: 3\r\nSubject: one\r\nX-A: 1\r\nx-a: 2\r\nX-End: e\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn change_counts_occurrences_of_the_name_without_case() {
        let out = apply(MSG, &[chg("X-A", 2, "two")]);
        assert_eq!(
            s(&out),
            "Received: from a\r\n\tby b\r\nSubject: one\r\nX-A: 1\r\nX-A: two\r\n\r\nbody\r\n"
        );
        // Index 0 is the first, as in sendmail; a folded field is replaced whole.
        let out = apply(MSG, &[chg("received", 0, "new")]);
        assert!(s(&out).starts_with("received: new\r\nSubject: one\r\n"));
        // Empty value: delete.
        let out = apply(MSG, &[chg("x-a", 1, ""), chg("Subject", 1, "")]);
        assert_eq!(
            s(&out),
            "Received: from a\r\n\tby b\r\nx-a: 2\r\n\r\nbody\r\n"
        );
        // Missing occurrence: a value adds the field, an empty one does nothing.
        let out = apply(MSG, &[chg("Subject", 2, "again"), chg("X-None", 1, "")]);
        assert_eq!(
            s(&out),
            "Received: from a\r\n\tby b\r\nSubject: one\r\nX-A: 1\r\nx-a: 2\r\nSubject: again\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn body_replacement_converts_bare_lf() {
        let out = apply(
            MSG,
            &[Modification::ReplaceBody(b"new\nbody\r\nend".to_vec())],
        );
        assert_eq!(
            s(&out),
            "Received: from a\r\n\tby b\r\nSubject: one\r\nX-A: 1\r\nx-a: 2\r\n\r\nnew\r\nbody\r\nend"
        );
        let out = apply(MSG, &[Modification::ReplaceBody(vec![])]);
        assert!(s(&out).ends_with("x-a: 2\r\n\r\n"));
    }

    #[test]
    fn messages_without_body_or_headers() {
        assert_eq!(
            s(&apply(b"Subject: x", &[add("X", "y")])),
            "Subject: x\r\nX: y\r\n"
        );
        assert_eq!(
            s(&apply(b"\r\nbody only\r\n", &[add("X", "y")])),
            "X: y\r\n\r\nbody only\r\n"
        );
        assert_eq!(
            s(&apply(
                b"A: b\r\n",
                &[Modification::ReplaceBody(b"z".to_vec())]
            )),
            "A: b\r\n\r\nz"
        );
        assert_eq!(s(&apply(b"", &[])), "");
    }
}
