//! The header section of a message as the checks see it: fields found by name (folded lines
//! joined), `Authentication-Results:` fields claiming our name removed, and `Message-ID:` and
//! `Date:` added to a submission that lacks them. Pure functions on bytes.

/// One header field: where it starts and ends in the message (its folded lines included, the
/// final CRLF included) and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Field {
    start: usize,
    end: usize,
    colon: usize,
}

/// The header fields of `message`, in order, up to the empty line that ends the header
/// section, and where new fields go: before that empty line, or before the first line that is
/// not a header field. A line that is not a field (no colon) does not end the scan: lenient
/// readers still take what follows it for header fields, so the checks do too.
fn fields(message: &[u8]) -> (Vec<Field>, usize) {
    let mut out: Vec<Field> = Vec::new();
    let mut insert_at: Option<usize> = None;
    let mut pos = 0;
    // A continuation line belongs to the field before it, not after an invalid line.
    let mut in_field = false;
    while pos < message.len() {
        let line_end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..line_end];
        let content = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        if content.is_empty() {
            return (out, insert_at.unwrap_or(pos));
        }
        if matches!(content[0], b' ' | b'\t') {
            match out.last_mut() {
                Some(f) if in_field => f.end = line_end,
                _ => {
                    insert_at.get_or_insert(pos);
                }
            }
        } else {
            let colon = content.iter().position(|&b| b == b':');
            // Obsolete syntax allows blanks before the colon (RFC 5322 §4.5.8).
            let name = colon.map(|c| trim_end(&content[..c]));
            match (colon, name) {
                (Some(colon), Some(name))
                    if !name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b)) =>
                {
                    out.push(Field {
                        start: pos,
                        end: line_end,
                        colon: pos + colon,
                    });
                    in_field = true;
                }
                _ => {
                    insert_at.get_or_insert(pos);
                    in_field = false;
                }
            }
        }
        pos = line_end;
    }
    (out, insert_at.unwrap_or(pos))
}

fn trim_end(b: &[u8]) -> &[u8] {
    let mut end = b.len();
    while end > 0 && matches!(b[end - 1], b' ' | b'\t') {
        end -= 1;
    }
    &b[..end]
}

fn name_is(message: &[u8], f: &Field, name: &str) -> bool {
    trim_end(&message[f.start..f.colon]).eq_ignore_ascii_case(name.as_bytes())
}

/// The value of a field, unfolded, trimmed.
fn value(message: &[u8], f: &Field) -> String {
    let raw = &message[f.colon + 1..f.end];
    let text = String::from_utf8_lossy(raw);
    let unfolded: String = text.chars().filter(|&c| c != '\r' && c != '\n').collect();
    unfolded.trim().to_string()
}

/// The values of every field named `name` (case-insensitive), unfolded.
pub fn header_values(message: &[u8], name: &str) -> Vec<String> {
    let (fields, _) = fields(message);
    fields
        .iter()
        .filter(|f| name_is(message, f, name))
        .map(|f| value(message, f))
        .collect()
}

/// True when the header section has a field named `name`.
pub fn has_header(message: &[u8], name: &str) -> bool {
    let (fields, _) = fields(message);
    fields.iter().any(|f| name_is(message, f, name))
}

/// The domain of the author: the single domain of the single `From:` field, lower-cased.
/// `None` when there is no From, several, or addresses in several domains (or none).
pub fn from_domain(message: &[u8]) -> Option<String> {
    let froms = header_values(message, "From");
    let [from] = froms.as_slice() else {
        return None;
    };
    let domains = address_domains(from);
    let first = domains.first()?;
    if domains.iter().any(|d| d != first) || first.contains(['<', '>', '"', '@']) {
        return None;
    }
    Some(first.clone())
}

/// `text` without its comments (nested, with quoted pairs, RFC 5322 §3.2.2); quoted strings
/// are kept when `keep_quoted`, else removed.
fn uncomment(text: &str, keep_quoted: bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut depth = 0usize;
    let mut quoted = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let next = chars.next();
                if depth == 0 && (!quoted || keep_quoted) {
                    out.push(c);
                    out.extend(next);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                if keep_quoted {
                    out.push(c);
                }
            }
            _ if quoted => out.extend(keep_quoted.then_some(c)),
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// The authserv-id of an `Authentication-Results:` value (RFC 8601 §2.2): its first token,
/// after any comments, before a `;` or a version.
fn authserv_id(value: &str) -> String {
    let v = uncomment(value, true);
    let v = v.trim_start();
    let end = v
        .find(|c: char| c == ';' || c.is_whitespace())
        .unwrap_or(v.len());
    v[..end].trim_matches('"').to_string()
}

/// The domains of the addresses in an address-list value (a `From:` field): comments and
/// quoted display names removed, each address the part in `<…>` or the bare one, groups
/// opened. Lower-cased, without trailing dots, in order, repeated as often as they occur.
pub fn address_domains(value: &str) -> Vec<String> {
    let bare = uncomment(value, false);
    bare.split([',', ';'])
        .filter_map(|part| {
            // A group: "name: a@x, b@y;" — the first member follows the colon.
            let part = match (part.find(':'), part.find('<')) {
                (Some(c), None) => &part[c + 1..],
                (Some(c), Some(a)) if c < a => &part[c + 1..],
                _ => part,
            };
            let addr = match (part.find('<'), part.rfind('>')) {
                (Some(a), Some(b)) if a < b => &part[a + 1..b],
                _ => part,
            };
            let domain = addr.trim().rsplit_once('@')?.1.trim();
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            (!domain.is_empty() && !domain.contains(char::is_whitespace)).then_some(domain)
        })
        .collect()
}

/// `message` without the `Authentication-Results:` fields (and `ARC-Authentication-Results`
/// are left alone: they belong to the ARC sets of other hosts) whose authserv-id is
/// `hostname`: a result that claims to be ours must have been forged upstream
/// (RFC 8601 §5). Returns how many were removed.
pub fn strip_our_results(message: &mut Vec<u8>, hostname: &str) -> usize {
    let (fields, _) = fields(message);
    let ours: Vec<Field> = fields
        .into_iter()
        .filter(|f| {
            name_is(message, f, "Authentication-Results")
                && authserv_id(&value(message, f)).eq_ignore_ascii_case(hostname)
        })
        .collect();
    for f in ours.iter().rev() {
        message.drain(f.start..f.end);
    }
    ours.len()
}

/// Adds the fields a submitted message must have and its author left out, the way Postfix
/// does for its submission clients: `Date:` (now) and `Message-ID:` (unique, in our
/// hostname). They go at the end of the header section. Returns the names added.
pub fn add_missing(message: &mut Vec<u8>, hostname: &str, now: u64) -> Vec<&'static str> {
    let (fields, end) = fields(message);
    let has = |name: &str| fields.iter().any(|f| name_is(message, f, name));
    let mut add = String::new();
    let mut added = Vec::new();
    if !has("Date") {
        add.push_str(&format!(
            "Date: {}\r\n",
            estafeta_proto::trace::rfc5322_date(now)
        ));
        added.push("Date");
    }
    if !has("Message-ID") {
        add.push_str(&format!("Message-ID: <{}@{hostname}>\r\n", unique_id(now)));
        added.push("Message-ID");
    }
    if !add.is_empty() {
        // A message with no empty line after its header fields (no body) still gets a
        // well-formed header section.
        let mut insert = add.into_bytes();
        if end == message.len() && !message.is_empty() && !message.ends_with(b"\n") {
            insert.splice(0..0, *b"\r\n");
        }
        // No header field at all: what there is is the body, after the new header section.
        let at_empty_line =
            message[end..].starts_with(b"\r\n") || message[end..].starts_with(b"\n");
        if fields.is_empty() && end < message.len() && !at_empty_line {
            insert.extend_from_slice(b"\r\n");
        }
        message.splice(end..end, insert);
    }
    added
}

/// A string unique to this message: the time in microseconds and 64 random bits.
fn unique_id(now: u64) -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(now * 1_000_000, |d| d.as_micros() as u64);
    let mut random = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    format!("{micros:x}.{:016x}", u64::from_be_bytes(random))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_author_domain() {
        let m = b"From: \"Alice\" <alice@Example.ORG>\r\nTo: bob@example.net\r\n\r\nhi\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("example.org"));
        let m = b"From: alice@example.org (Alice)\r\n\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("example.org"));
        let m = b"From: a@example.org\r\nFrom: b@example.net\r\n\r\n";
        assert_eq!(from_domain(m), None);
        let m = b"Subject: no from\r\n\r\n";
        assert_eq!(from_domain(m), None);
        let m = b"From:\r\n  folded <x@folded.example>\r\n\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("folded.example"));
        // Several authors in several domains: no single author domain.
        let m = b"From: a@evil.example, b@ours.example\r\n\r\n";
        assert_eq!(from_domain(m), None);
        // An address inside a comment or a quoted name is not the address.
        let m = b"From: x@ours.example (X <y@other.example>)\r\n\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("ours.example"));
        let m = b"From: \"Doe, J <j@other.example>\" <j@ours.example>\r\n\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("ours.example"));
        let m = b"From: a@ours.example, b@ours.example\r\n\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("ours.example"));
    }

    #[test]
    fn removes_only_results_claiming_our_name() {
        let mut m = b"Authentication-Results: mx.example.org;\r\n\tdmarc=pass header.from=bank.example\r\nAuthentication-Results: other.example; spf=pass\r\nauthentication-results: (comment) MX.example.org; dkim=pass\r\nSubject: x\r\n\r\nAuthentication-Results: mx.example.org; in the body\r\n".to_vec();
        assert_eq!(strip_our_results(&mut m, "mx.example.org"), 2);
        assert_eq!(
            m,
            b"Authentication-Results: other.example; spf=pass\r\nSubject: x\r\n\r\nAuthentication-Results: mx.example.org; in the body\r\n"
        );
    }

    #[test]
    fn forged_results_are_found_behind_nested_comments_and_invalid_lines() {
        let mut m = b"Authentication-Results: (a (b) c) mx.example.org; dmarc=pass\r\nX-junk line without colon\r\nAuthentication-Results: \"mx.example.org\"; spf=pass\r\nAuthentication-Results: mx.example.org (comment); dkim=pass\r\nSubject: x\r\n\r\nbody\r\n".to_vec();
        assert_eq!(strip_our_results(&mut m, "mx.example.org"), 3);
        assert_eq!(
            m,
            b"X-junk line without colon\r\nSubject: x\r\n\r\nbody\r\n"
        );
        assert_eq!(authserv_id("  mx.example.org 1; none"), "mx.example.org");
    }

    #[test]
    fn adds_date_and_message_id_when_missing() {
        let mut m = b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\n".to_vec();
        let added = add_missing(&mut m, "mail.example.org", 0);
        assert_eq!(added, ["Date", "Message-ID"]);
        let text = String::from_utf8(m.clone()).unwrap();
        assert!(
            text.starts_with("From: a@example.org\r\nSubject: s\r\nDate: Thu, 1 Jan 1970 00:00:00 +0000\r\nMessage-ID: <"),
            "{text}"
        );
        assert!(
            text.ends_with("@mail.example.org>\r\n\r\nbody\r\n"),
            "{text}"
        );
        // Nothing is added twice.
        assert!(add_missing(&mut m, "mail.example.org", 0).is_empty());

        let mut m = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-Id: <x@y>\r\n\r\n".to_vec();
        assert!(add_missing(&mut m, "h", 0).is_empty());

        // A message with header fields only.
        let mut m = b"Subject: s".to_vec();
        add_missing(&mut m, "h", 0);
        assert!(m.starts_with(b"Subject: s\r\nDate: "));
        // A message with no header section: the fields go first.
        let mut m = b"just text\r\nmore\r\n".to_vec();
        add_missing(&mut m, "h", 0);
        assert!(m.starts_with(b"Date: "), "{}", String::from_utf8_lossy(&m));
        assert!(
            m.ends_with(b">\r\n\r\njust text\r\nmore\r\n"),
            "{}",
            String::from_utf8_lossy(&m)
        );
    }

    #[test]
    fn message_ids_differ() {
        assert_ne!(unique_id(1), unique_id(1));
    }
}
