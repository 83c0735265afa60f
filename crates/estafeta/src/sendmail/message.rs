//! The message `sendmail` reads from its standard input: lines, the header section, the
//! recipients of `-t`, the headers added when missing.
//!
//! Pure functions over bytes: no I/O but the reader handed in, no clock but the time handed in.

use std::io::{self, BufRead};

/// A message read from the standard input, split into lines without their line endings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The header fields, in order.
    pub fields: Vec<Field>,
    /// The lines after the header section.
    pub body: Vec<Vec<u8>>,
    /// An empty line separated the header section from the body.
    pub separated: bool,
}

/// One header field: its name and its lines (the first `Name: value`, then any folded
/// continuation lines), without line endings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The field name as written.
    pub name: String,
    /// The raw lines.
    pub lines: Vec<Vec<u8>>,
}

impl Field {
    /// True when the field is called `name` (any case).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// The value, unfolded (RFC 5322 §2.2.3): the text after the colon, continuation lines
    /// joined without their line breaks.
    pub fn value(&self) -> String {
        let mut v = Vec::new();
        for (i, l) in self.lines.iter().enumerate() {
            if i == 0 {
                // After the colon (there may be blanks before it: "Name :").
                let colon = l.iter().position(|&b| b == b':').map_or(l.len(), |c| c + 1);
                v.extend_from_slice(&l[colon..]);
            } else {
                v.extend_from_slice(l);
            }
        }
        String::from_utf8_lossy(&v).trim().to_string()
    }
}

/// Reads the message from `input`. Line endings (LF or CRLF) are dropped: they are written
/// back as CRLF. Unless `ignore_dots` (`-i`, `-oi`), a line holding a single `.` ends the
/// message, as with sendmail(8); the rest of the input is not read.
pub fn read_lines(input: &mut impl BufRead, ignore_dots: bool) -> io::Result<Vec<Vec<u8>>> {
    let mut lines = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(lines);
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        if !ignore_dots && line == b"." {
            return Ok(lines);
        }
        lines.push(line.clone());
    }
}

/// The field name of a header line, when it is one (RFC 5322 §2.2: printable US-ASCII
/// except the colon, then a colon).
fn field_name(line: &[u8]) -> Option<&str> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    // Tolerate "Name :" (obsolete syntax, RFC 5322 §4.5.8).
    let trimmed = name.trim_ascii_end();
    if trimmed.is_empty() || !trimmed.iter().all(|&b| (33..=126).contains(&b)) {
        return None;
    }
    std::str::from_utf8(trimmed).ok()
}

impl Message {
    /// Splits `lines` into the header section and the body. The header section ends at the
    /// first empty line, or at the first line that is neither a field nor the continuation of
    /// one (the body then starts there, and an empty line is put back when the message is
    /// written). A leading mbox `From ` line is dropped, as Postfix does.
    pub fn parse(mut lines: Vec<Vec<u8>>) -> Message {
        if lines.first().is_some_and(|l| l.starts_with(b"From ")) {
            lines.remove(0);
        }
        let mut m = Message::default();
        let mut it = lines.into_iter();
        for line in it.by_ref() {
            if line.is_empty() {
                m.separated = true;
                break;
            }
            if matches!(line.first(), Some(b' ') | Some(b'\t'))
                && let Some(last) = m.fields.last_mut()
            {
                last.lines.push(line);
                continue;
            }
            match field_name(&line) {
                Some(name) => {
                    let name = name.to_string();
                    m.fields.push(Field {
                        name,
                        lines: vec![line],
                    });
                }
                None => {
                    m.body.push(line);
                    break;
                }
            }
        }
        m.body.extend(it);
        m
    }

    /// True when a field called `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|f| f.is(name))
    }

    /// The recipients of `-t`: the addresses in To, Cc and Bcc, or in Resent-To, Resent-Cc and
    /// Resent-Bcc when the message has any of those (a resent message goes to its new
    /// recipients only). Bare local parts are returned as they are.
    pub fn header_recipients(&self) -> Vec<String> {
        let resent = ["resent-to", "resent-cc", "resent-bcc"];
        let names: &[&str] = if self.fields.iter().any(|f| resent.iter().any(|r| f.is(r))) {
            &resent
        } else {
            &["to", "cc", "bcc"]
        };
        self.fields
            .iter()
            .filter(|f| names.iter().any(|n| f.is(n)))
            .flat_map(|f| parse_address_list(&f.value()))
            .collect()
    }

    /// Removes the Bcc and Resent-Bcc fields (with `-t`: the blind copies stay blind).
    pub fn remove_bcc(&mut self) {
        self.fields.retain(|f| !f.is("bcc") && !f.is("resent-bcc"));
    }

    /// Appends a field at the end of the header section.
    pub fn add_field(&mut self, name: &str, value: &str) {
        self.fields.push(Field {
            name: name.to_string(),
            lines: vec![format!("{name}: {value}").into_bytes()],
        });
    }

    /// True when some byte is not 7-bit ASCII (the message needs BODY=8BITMIME).
    pub fn is_8bit(&self) -> bool {
        self.fields
            .iter()
            .flat_map(|f| f.lines.iter())
            .chain(self.body.iter())
            .any(|l| !l.is_ascii())
    }

    /// The message as DATA content: CRLF line endings, dot-stuffed (RFC 5321 §4.5.2), without
    /// the final `.` line.
    pub fn to_data(&self) -> Vec<u8> {
        let size: usize = self
            .fields
            .iter()
            .flat_map(|f| f.lines.iter())
            .chain(self.body.iter())
            .map(|l| l.len() + 3)
            .sum();
        let mut out = Vec::with_capacity(size + 2);
        let mut put = |l: &[u8]| {
            if l.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(l);
            out.extend_from_slice(b"\r\n");
        };
        for f in &self.fields {
            for l in &f.lines {
                put(l);
            }
        }
        if self.separated || !self.body.is_empty() {
            put(b"");
        }
        for l in &self.body {
            put(l);
        }
        out
    }
}

/// The addr-specs of an RFC 5322 address list (§3.4): `a@x, "Doe, J." <j@x> (work)`,
/// groups (`team: a@x, b@x;`, `undisclosed-recipients:;`), comments, quoted strings. The
/// display names and comments are dropped; a source route in an angle address is dropped.
pub fn parse_address_list(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut bare = String::new();
    let mut angle: Option<String> = None;
    let mut chars = text.chars();
    let flush = |bare: &mut String, angle: &mut Option<String>, out: &mut Vec<String>| {
        let addr = match angle.take() {
            Some(a) => {
                // <@a,@b:user@domain>: the route is obsolete (RFC 5321 §4.1.1.3 / C).
                match a.rfind(':') {
                    Some(i) if a.starts_with('@') => a[i + 1..].to_string(),
                    _ => a,
                }
            }
            None => std::mem::take(bare),
        };
        bare.clear();
        if !addr.is_empty() {
            out.push(addr);
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                bare.push('"');
                while let Some(q) = chars.next() {
                    bare.push(q);
                    match q {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                bare.push(n);
                            }
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '(' => {
                let mut depth = 1;
                while let Some(q) = chars.next() {
                    match q {
                        '\\' => {
                            chars.next();
                        }
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            '<' => {
                let mut a = String::new();
                let mut quoted = false;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => {
                            quoted = !quoted;
                            a.push(q);
                        }
                        '\\' if quoted => {
                            a.push(q);
                            if let Some(n) = chars.next() {
                                a.push(n);
                            }
                        }
                        '>' if !quoted => break,
                        c if c.is_whitespace() && !quoted => {}
                        _ => a.push(q),
                    }
                }
                angle = Some(a);
            }
            ',' | ';' => flush(&mut bare, &mut angle, &mut out),
            // The end of a group's display name: what came before it is no address.
            ':' if angle.is_none() => bare.clear(),
            '\\' => {
                if let Some(n) = chars.next() {
                    bare.push(n);
                }
            }
            c if c.is_whitespace() => {}
            c => bare.push(c),
        }
    }
    flush(&mut bare, &mut angle, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str, ignore_dots: bool) -> Vec<Vec<u8>> {
        read_lines(&mut text.as_bytes(), ignore_dots).unwrap()
    }

    fn msg(text: &str) -> Message {
        Message::parse(lines(text, true))
    }

    #[test]
    fn a_lone_dot_ends_the_input_unless_ignored() {
        let text = "a\n.\nb\n";
        assert_eq!(lines(text, false), vec![b"a".to_vec()]);
        assert_eq!(
            lines(text, true),
            vec![b"a".to_vec(), b".".to_vec(), b"b".to_vec()]
        );
        // CRLF input, and a dot line with CR: the same.
        assert_eq!(lines("a\r\n.\r\nb\r\n", false), vec![b"a".to_vec()]);
        // ".." is content either way; a last line without LF is kept.
        assert_eq!(
            lines("..\nend", false),
            vec![b"..".to_vec(), b"end".to_vec()]
        );
    }

    #[test]
    fn lf_becomes_crlf_and_dots_are_stuffed() {
        let m = msg("Subject: x\n\n.hidden\nline\n");
        assert_eq!(m.to_data(), b"Subject: x\r\n\r\n..hidden\r\nline\r\n");
    }

    #[test]
    fn the_header_section_ends_at_a_line_that_is_no_field() {
        let m = msg("hello there\nsecond\n");
        assert!(m.fields.is_empty());
        assert_eq!(m.body.len(), 2);
        let mut m = msg("Subject: s\nnot a header line\n");
        assert!(!m.separated);
        m.add_field("From", "a@b");
        // The empty line is put back between the fields and the body.
        assert_eq!(
            m.to_data(),
            b"Subject: s\r\nFrom: a@b\r\n\r\nnot a header line\r\n"
        );
        // An mbox "From " line is dropped.
        let m = msg("From alice Mon Nov 23 11:16:53 2026\nSubject: s\n\nb\n");
        assert_eq!(m.fields.len(), 1);
    }

    #[test]
    fn header_recipients_folded_repeated_groups_comments_quotes() {
        let m = msg("To: alice@example.org,\n\
             \tbob@example.org (Bob, at work)\n\
             Subject: hello\n\
             to: \"Doe, John\" <john@example.org>, carol\n\
             Cc: undisclosed-recipients:;\n\
             CC: team: dave@example.org, <@relay.example:erin@example.org>;, frank@example.org\n\
             Bcc: Secret <grace@example.org>\n\
             X-To: nobody@example.org\n\
             \n\
             To: not@header.example\n");
        assert_eq!(
            m.header_recipients(),
            vec![
                "alice@example.org",
                "bob@example.org",
                "john@example.org",
                "carol",
                "dave@example.org",
                "erin@example.org",
                "frank@example.org",
                "grace@example.org",
            ]
        );
    }

    #[test]
    fn resent_fields_take_over() {
        let m = msg(
            "To: old@example.org\nResent-To: new@example.org\nResent-Bcc: b@example.org\n\nx\n",
        );
        assert_eq!(
            m.header_recipients(),
            vec!["new@example.org", "b@example.org"]
        );
    }

    #[test]
    fn bcc_is_removed() {
        let mut m = msg("To: a@x.example\nBcc: b@x.example,\n c@x.example\nSubject: s\n\nbody\n");
        m.remove_bcc();
        assert_eq!(
            m.to_data(),
            b"To: a@x.example\r\nSubject: s\r\n\r\nbody\r\n"
        );
        assert!(!m.has("bcc"));
    }

    #[test]
    fn address_lists() {
        assert_eq!(parse_address_list(""), Vec::<String>::new());
        assert_eq!(parse_address_list("a@x, b@y"), vec!["a@x", "b@y"]);
        assert_eq!(
            parse_address_list("\"quoted local\"@x (c) , <>"),
            vec!["\"quoted local\"@x"]
        );
        assert_eq!(
            parse_address_list("\"a \\\" , b\" <q@x>, (nested (c, d)) r@x"),
            vec!["q@x", "r@x"]
        );
        assert_eq!(parse_address_list("g:;, h@x"), vec!["h@x"]);
    }

    #[test]
    fn eight_bit() {
        assert!(!msg("Subject: a\n\nb\n").is_8bit());
        assert!(msg("Subject: a\n\nb\u{e9}\n").is_8bit());
    }

    #[test]
    fn an_obsolete_blank_before_the_colon_is_still_a_header_field() {
        let m = Message::parse(vec![
            b"Subject : hello".to_vec(),
            b"To: bob@example.test".to_vec(),
            b"".to_vec(),
            b"body".to_vec(),
        ]);
        assert_eq!(m.fields.len(), 2);
        assert_eq!(m.fields[0].value().trim(), "hello");
        assert_eq!(m.fields[1].value().trim(), "bob@example.test");
    }
}
