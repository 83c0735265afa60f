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

/// The header fields of `message`, in order, and the offset where the header section ends
/// (the start of the empty line, or of the first line that is not a header field).
fn fields(message: &[u8]) -> (Vec<Field>, usize) {
    let mut out: Vec<Field> = Vec::new();
    let mut pos = 0;
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
            return (out, pos);
        }
        if matches!(content[0], b' ' | b'\t') {
            match out.last_mut() {
                Some(f) => f.end = line_end,
                None => return (out, pos),
            }
        } else {
            let Some(colon) = content.iter().position(|&b| b == b':') else {
                return (out, pos);
            };
            let name = &content[..colon];
            // Obsolete syntax allows blanks before the colon (RFC 5322 §4.5.8).
            let name = trim_end(name);
            if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
                return (out, pos);
            }
            out.push(Field {
                start: pos,
                end: line_end,
                colon: pos + colon,
            });
        }
        pos = line_end;
    }
    (out, pos)
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

/// The domain of the author: the address in the single `From:` field, lower-cased. `None`
/// when there is no From, several, or it holds no address with a domain.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let froms = header_values(message, "From");
    let [from] = froms.as_slice() else {
        return None;
    };
    // The address is inside <…> when there is a display name, else the whole value (minus a
    // comment).
    let addr = match (from.rfind('<'), from.rfind('>')) {
        (Some(a), Some(b)) if a < b => &from[a + 1..b],
        _ => from.split('(').next().unwrap_or(from),
    };
    let domain = addr.trim().rsplit_once('@')?.1.trim();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if domain.is_empty() || domain.contains([' ', ',', ';', '<', '>', '"']) {
        return None;
    }
    Some(domain)
}

/// The authserv-id of an `Authentication-Results:` value (RFC 8601 §2.2): its first token,
/// before any `;`, comment or version.
fn authserv_id(value: &str) -> &str {
    let mut v = value.trim_start();
    // A leading comment.
    while v.starts_with('(') {
        match v.find(')') {
            Some(i) => v = v[i + 1..].trim_start(),
            None => return "",
        }
    }
    let end = v
        .find(|c: char| c == ';' || c == '(' || c.is_whitespace())
        .unwrap_or(v.len());
    v[..end].trim_matches('"')
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
    }

    #[test]
    fn message_ids_differ() {
        assert_ne!(unique_id(1), unique_id(1));
    }
}
