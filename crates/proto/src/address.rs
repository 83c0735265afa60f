//! Envelope addresses: `Mailbox`, `ReversePath` and `ForwardPath` (RFC 5321 §4.1.2), with the
//! length limits of §4.5.3.1 and internationalised forms (RFC 6531) only where allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// RFC 5321 §4.5.3.1.1: the maximum total length of a local part is 64 octets.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 §4.5.3.1.2: the maximum total length of a domain name or number is 255 octets.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 §4.5.3.1.3: the maximum total length of a reverse-path or forward-path is 256
/// octets, including the punctuation.
pub const MAX_PATH: usize = 256;

/// The domain part of a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A host name, as written (case kept; compare with [`Domain::key`]).
    Name(String),
    /// An address literal such as `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
    Literal(AddressLiteral),
}

/// The content of an address literal (RFC 5321 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AddressLiteral {
    /// `[192.0.2.1]`
    Ipv4(Ipv4Addr),
    /// `[IPv6:2001:db8::1]`
    Ipv6(Ipv6Addr),
    /// `[tag:content]`: a general literal, kept as written.
    General(String),
}

impl Domain {
    /// The domain as a lower-case key for comparisons and routing: names are compared
    /// case-insensitively (RFC 5321 §2.4).
    pub fn key(&self) -> String {
        match self {
            Domain::Name(n) => n.to_lowercase(),
            Domain::Literal(_) => self.to_string(),
        }
    }

    /// The IP address of an IPv4 or IPv6 address literal.
    pub fn literal_ip(&self) -> Option<IpAddr> {
        match self {
            Domain::Literal(AddressLiteral::Ipv4(a)) => Some(IpAddr::V4(*a)),
            Domain::Literal(AddressLiteral::Ipv6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Name(n) => f.write_str(n),
            Domain::Literal(AddressLiteral::Ipv4(a)) => write!(f, "[{a}]"),
            Domain::Literal(AddressLiteral::Ipv6(a)) => write!(f, "[IPv6:{a}]"),
            Domain::Literal(AddressLiteral::General(g)) => write!(f, "[{g}]"),
        }
    }
}

/// A mailbox `local-part@domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// The local part, unquoted (the value a quoted string stands for). Case is kept: it is
    /// the receiving domain's to interpret (RFC 5321 §2.4).
    pub local: String,
    /// The domain.
    pub domain: Domain,
}

impl Mailbox {
    /// True when the local part or the domain holds non-ASCII characters (RFC 6531).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || matches!(&self.domain, Domain::Name(n) if !n.is_ascii())
    }

    /// The local part as it must be written on the wire: a dot-string when possible,
    /// otherwise a quoted string.
    pub fn local_wire(&self) -> String {
        if is_dot_string(&self.local) {
            self.local.clone()
        } else {
            let mut s = String::with_capacity(self.local.len() + 2);
            s.push('"');
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    s.push('\\');
                }
                s.push(c);
            }
            s.push('"');
            s
        }
    }
}

impl fmt::Display for Mailbox {
    /// The address in wire form without angle brackets: `local@domain`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local_wire(), self.domain)
    }
}

/// The reverse path of `MAIL FROM`: a mailbox, or the null path `<>` of bounces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>` (RFC 5321 §4.5.5): notifications; never bounced.
    Null,
    /// A sender mailbox.
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    /// The path without angle brackets (empty for the null path).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(m) => m.fmt(f),
        }
    }
}

/// The forward path of `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ForwardPath {
    /// The recipient mailbox. `<Postmaster>` without a domain (RFC 5321 §4.1.1.3) is parsed
    /// as `postmaster` at the empty-named domain and resolved by the policy to the local one.
    pub mailbox: Mailbox,
    /// True for the bare `<Postmaster>` form.
    pub bare_postmaster: bool,
    /// A source route (`<@a,@b:user@c>`) given before the mailbox. RFC 5321 §4.1.1.3 says to
    /// accept and ignore it; kept so the policy can see it.
    pub source_route: Vec<String>,
}

impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.bare_postmaster {
            f.write_str(&self.mailbox.local)
        } else {
            self.mailbox.fmt(f)
        }
    }
}

/// Why an address could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// The syntax is wrong; the text says where.
    Syntax(&'static str),
    /// The local part is over 64 octets.
    LocalPartTooLong,
    /// The domain is over 255 octets.
    DomainTooLong,
    /// The path is over 256 octets.
    PathTooLong,
}

const ATEXT_SPECIALS: &[u8] = b"!#$%&'*+-/=?^_`{|}~";

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || (c.is_ascii() && ATEXT_SPECIALS.contains(&(c as u8)))
        || !c.is_ascii()
}

/// RFC 5321 Dot-string: `Atom *("." Atom)`, with UTF-8 allowed in atoms (RFC 6531).
pub fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// RFC 5321 `Domain = sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]`
/// (U-labels allowed as RFC 6531 §3.3 extends `sub-domain`).
pub fn is_domain_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        })
}

/// A cursor over the text of a path.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }
    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }
}

fn parse_local_part(cur: &mut Cursor) -> Result<String, AddressError> {
    if cur.eat('"') {
        // Quoted-string = DQUOTE *QcontentSMTP DQUOTE
        let mut out = String::new();
        loop {
            match cur.bump() {
                None => return Err(AddressError::Syntax("unterminated quoted string")),
                Some('"') => break,
                Some('\\') => match cur.bump() {
                    // quoted-pairSMTP = %d92 %d32-126
                    Some(c) if (' '..='~').contains(&c) || !c.is_ascii() => out.push(c),
                    _ => return Err(AddressError::Syntax("bad quoted pair")),
                },
                // qtextSMTP = %d32-33 / %d35-91 / %d93-126 (and UTF-8)
                Some(c) if (' '..='~').contains(&c) || !c.is_ascii() => out.push(c),
                Some(_) => return Err(AddressError::Syntax("control character in quoted string")),
            }
        }
        Ok(out)
    } else {
        let start = cur.pos;
        while let Some(c) = cur.peek() {
            if c == '@' || c == '>' {
                break;
            }
            if c != '.' && !is_atext(c) {
                return Err(AddressError::Syntax("invalid character in local part"));
            }
            cur.bump();
        }
        let local = &cur.s[start..cur.pos];
        if !is_dot_string(local) {
            return Err(AddressError::Syntax("invalid local part"));
        }
        Ok(local.to_string())
    }
}

fn parse_domain(text: &str) -> Result<Domain, AddressError> {
    if text.len() > MAX_DOMAIN {
        return Err(AddressError::DomainTooLong);
    }
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or(AddressError::Syntax("unterminated address literal"))?;
        if let Some(v6) = inner
            .strip_prefix("IPv6:")
            .or_else(|| inner.strip_prefix("ipv6:"))
            .or_else(|| inner.strip_prefix("IPV6:"))
        {
            return v6
                .parse::<Ipv6Addr>()
                .map(|a| Domain::Literal(AddressLiteral::Ipv6(a)))
                .map_err(|_| AddressError::Syntax("bad IPv6 address literal"));
        }
        if let Ok(a) = inner.parse::<Ipv4Addr>() {
            return Ok(Domain::Literal(AddressLiteral::Ipv4(a)));
        }
        // General-address-literal = Standardized-tag ":" 1*dcontent
        if let Some((tag, content)) = inner.split_once(':')
            && is_domain_name(tag)
            && !tag.chars().all(|c| c.is_ascii_digit())
            && !content.is_empty()
            && content
                .bytes()
                .all(|b| (33..=126).contains(&b) && b != b'[' && b != b']' && b != b'\\')
        {
            return Ok(Domain::Literal(AddressLiteral::General(inner.to_string())));
        }
        return Err(AddressError::Syntax("bad address literal"));
    }
    if !is_domain_name(text) {
        return Err(AddressError::Syntax("invalid domain"));
    }
    Ok(Domain::Name(text.to_string()))
}

/// Parses `local@domain` (no angle brackets).
pub fn parse_mailbox(text: &str) -> Result<Mailbox, AddressError> {
    let mut cur = Cursor { s: text, pos: 0 };
    let local = parse_local_part(&mut cur)?;
    if cur.pos > MAX_LOCAL_PART {
        return Err(AddressError::LocalPartTooLong);
    }
    if !cur.eat('@') {
        return Err(AddressError::Syntax("missing @domain"));
    }
    let domain = parse_domain(cur.rest())?;
    Ok(Mailbox { local, domain })
}

/// Splits `<…>` off the start of `text` and returns (inside, rest after `>`). Angle brackets
/// inside a quoted local part do not count.
pub fn split_path(text: &str) -> Result<(&str, &str), AddressError> {
    let inner = text
        .strip_prefix('<')
        .ok_or(AddressError::Syntax("path must be enclosed in <>"))?;
    let bytes = inner.as_bytes();
    let mut quoted = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Ok((&inner[..i], &inner[i + 1..])),
            _ => {}
        }
        i += 1;
    }
    Err(AddressError::Syntax("missing closing >"))
}

/// Parses the inside of a path (between `<` and `>`): an optional source route then a mailbox.
fn parse_path_inner(inner: &str) -> Result<(Vec<String>, Mailbox), AddressError> {
    if inner.len() + 2 > MAX_PATH {
        return Err(AddressError::PathTooLong);
    }
    let mut route = Vec::new();
    let mut rest = inner;
    if rest.starts_with('@') {
        // A-d-l = At-domain *( "," At-domain ) ":"
        let (adl, mailbox) = rest
            .split_once(':')
            .ok_or(AddressError::Syntax("bad source route"))?;
        for hop in adl.split(',') {
            let d = hop
                .strip_prefix('@')
                .ok_or(AddressError::Syntax("bad source route"))?;
            parse_domain(d)?;
            route.push(d.to_string());
        }
        rest = mailbox;
    }
    Ok((route, parse_mailbox(rest)?))
}

/// Parses a reverse path in angle brackets: `<>` or `<mailbox>` (with an optional, ignored
/// source route). Returns the path and the text after `>`.
pub fn parse_reverse_path(text: &str) -> Result<(ReversePath, &str), AddressError> {
    let (inner, rest) = split_path(text)?;
    if inner.is_empty() {
        return Ok((ReversePath::Null, rest));
    }
    let (_route, mailbox) = parse_path_inner(inner)?;
    Ok((ReversePath::Mailbox(mailbox), rest))
}

/// Parses a forward path in angle brackets: `<mailbox>`, `<@route:mailbox>` or the special
/// `<Postmaster>`. Returns the path and the text after `>`.
pub fn parse_forward_path(text: &str) -> Result<(ForwardPath, &str), AddressError> {
    let (inner, rest) = split_path(text)?;
    if inner.eq_ignore_ascii_case("postmaster") {
        return Ok((
            ForwardPath {
                mailbox: Mailbox {
                    local: inner.to_string(),
                    domain: Domain::Name(String::new()),
                },
                bare_postmaster: true,
                source_route: Vec::new(),
            },
            rest,
        ));
    }
    if inner.is_empty() {
        return Err(AddressError::Syntax("empty recipient"));
    }
    let (source_route, mailbox) = parse_path_inner(inner)?;
    Ok((
        ForwardPath {
            mailbox,
            bare_postmaster: false,
            source_route,
        },
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(s: &str) -> Result<ForwardPath, AddressError> {
        parse_forward_path(s).map(|(p, rest)| {
            assert_eq!(rest, "");
            p
        })
    }

    #[test]
    fn plain_and_quoted() {
        let p = fwd("<bob@localhost>").unwrap();
        assert_eq!(p.mailbox.local, "bob");
        assert_eq!(p.mailbox.domain, Domain::Name("localhost".into()));
        let p = fwd("<\"john doe\"@example.org>").unwrap();
        assert_eq!(p.mailbox.local, "john doe");
        assert_eq!(p.to_string(), "\"john doe\"@example.org");
        let p = fwd("<\"a>b\"@example.org>").unwrap();
        assert_eq!(p.mailbox.local, "a>b");
        let p = fwd("<\"a\\\"b\"@example.org>").unwrap();
        assert_eq!(p.mailbox.local, "a\"b");
        assert_eq!(p.mailbox.local_wire(), "\"a\\\"b\"");
    }

    #[test]
    fn literals() {
        let p = fwd("<u@[192.0.2.1]>").unwrap();
        assert_eq!(
            p.mailbox.domain.literal_ip(),
            Some("192.0.2.1".parse().unwrap())
        );
        let p = fwd("<u@[IPv6:2001:db8::1]>").unwrap();
        assert_eq!(p.mailbox.domain.to_string(), "[IPv6:2001:db8::1]");
        assert!(fwd("<u@[999.1.1.1]>").is_err());
        assert!(fwd("<u@[IPv6:zz]>").is_err());
    }

    #[test]
    fn postmaster_and_routes() {
        let p = fwd("<Postmaster>").unwrap();
        assert!(p.bare_postmaster);
        let p = fwd("<@relay.example,@b.example:user@c.example>").unwrap();
        assert_eq!(p.source_route, vec!["relay.example", "b.example"]);
        assert_eq!(p.mailbox.to_string(), "user@c.example");
    }

    #[test]
    fn null_reverse_path() {
        assert_eq!(parse_reverse_path("<>").unwrap().0, ReversePath::Null);
        assert!(parse_forward_path("<>").is_err());
    }

    #[test]
    fn rejects_bad_syntax() {
        for bad in [
            "<a..b@x.example>",
            "<.a@x.example>",
            "<a.@x.example>",
            "<a b@x.example>",
            "<a@x..example>",
            "<a@-x.example>",
            "<a@x-.example>",
            "<a@x.example.>",
            "<a@>",
            "<@x.example>",
            "<a>",
            "<a@x.example",
            "a@x.example",
            "<a@x_y.example>",
        ] {
            assert!(fwd(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn limits() {
        let local = "a".repeat(64);
        assert!(fwd(&format!("<{local}@x.example>")).is_ok());
        let local = "a".repeat(65);
        assert_eq!(
            fwd(&format!("<{local}@x.example>")),
            Err(AddressError::LocalPartTooLong)
        );
        let label = "a".repeat(60);
        let long_domain = [label.as_str(); 5].join(".");
        assert_eq!(
            parse_mailbox(&format!("u@{long_domain}")),
            Err(AddressError::DomainTooLong)
        );
        let domain = [label.as_str(); 4].join(".");
        assert_eq!(
            fwd(&format!("<{}@{domain}>", "b".repeat(20))),
            Err(AddressError::PathTooLong)
        );
    }

    #[test]
    fn utf8() {
        let p = fwd("<jörg@bücher.example>").unwrap();
        assert!(p.mailbox.is_utf8());
        assert!(!fwd("<a@b.example>").unwrap().mailbox.is_utf8());
    }
}
