//! SMTP command syntax: one command line in, a typed [`Command`] or the error [`Reply`] out.
//!
//! RFC 5321 §4.1 for the verbs, RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 3030 (CHUNKING,
//! BINARYMIME), RFC 6531 (SMTPUTF8) and RFC 3461 (DSN) for the parameters.

use crate::address::{
    AddressError, ForwardPath, ReversePath, parse_forward_path, parse_reverse_path,
};
use crate::reply::{self, Reply};

/// `BODY=` of MAIL (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `BODY=7BIT`
    SevenBit,
    /// `BODY=8BITMIME`
    EightBitMime,
    /// `BODY=BINARYMIME` (only with BDAT)
    BinaryMime,
}

impl Body {
    /// The keyword as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Body::SevenBit => "7BIT",
            Body::EightBitMime => "8BITMIME",
            Body::BinaryMime => "BINARYMIME",
        }
    }
}

/// `RET=` of MAIL (RFC 3461 §4.3): what a failure DSN returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    /// `RET=FULL`: the whole message.
    Full,
    /// `RET=HDRS`: the headers only.
    Hdrs,
}

impl Ret {
    /// The keyword as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

/// `NOTIFY=` of RCPT (RFC 3461 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notify {
    /// `NOTIFY=NEVER`: no DSN at all.
    pub never: bool,
    /// Report successful delivery.
    pub success: bool,
    /// Report failure.
    pub failure: bool,
    /// Report delay.
    pub delay: bool,
}

impl Notify {
    /// The value as written on the wire, e.g. `SUCCESS,FAILURE`.
    pub fn to_wire(self) -> String {
        if self.never {
            return "NEVER".to_string();
        }
        let mut parts = Vec::new();
        if self.success {
            parts.push("SUCCESS");
        }
        if self.failure {
            parts.push("FAILURE");
        }
        if self.delay {
            parts.push("DELAY");
        }
        parts.join(",")
    }

    /// Parses the value of `NOTIFY=`.
    pub fn parse(value: &str) -> Option<Notify> {
        let mut n = Notify::default();
        for part in value.split(',') {
            let flag = match part.to_ascii_uppercase().as_str() {
                "NEVER" => &mut n.never,
                "SUCCESS" => &mut n.success,
                "FAILURE" => &mut n.failure,
                "DELAY" => &mut n.delay,
                _ => return None,
            };
            if *flag {
                return None; // the same keyword twice
            }
            *flag = true;
        }
        // RFC 3461 §4.1: NEVER must appear alone.
        if n.never && (n.success || n.failure || n.delay) {
            return None;
        }
        Some(n)
    }
}

/// `ORCPT=addr-type;xtext` of RCPT (RFC 3461 §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orcpt {
    /// The address type, e.g. `rfc822` or `utf-8`.
    pub addr_type: String,
    /// The original recipient, still xtext-encoded as received.
    pub xtext: String,
}

impl Orcpt {
    /// The decoded original address.
    pub fn address(&self) -> String {
        xtext_decode(&self.xtext).unwrap_or_else(|| self.xtext.clone())
    }
}

/// The parameters of `MAIL FROM`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    /// `SIZE=` (RFC 1870): the size the client declares.
    pub size: Option<u64>,
    /// `BODY=` (RFC 6152, RFC 3030).
    pub body: Option<Body>,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `RET=` (RFC 3461).
    pub ret: Option<Ret>,
    /// `ENVID=` (RFC 3461), xtext as received.
    pub envid: Option<String>,
    /// `AUTH=` (RFC 4954 §5): the original submitter as the client claims it, xtext or `<>`.
    /// Accepted and not trusted.
    pub auth: Option<String>,
    /// `REQUIRETLS` (RFC 8689): relay this message only over TLS to servers authenticated by
    /// MTA-STS or DANE that support REQUIRETLS.
    pub requiretls: bool,
}

/// The parameters of `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RcptParams {
    /// `NOTIFY=` (RFC 3461).
    pub notify: Option<Notify>,
    /// `ORCPT=` (RFC 3461).
    pub orcpt: Option<Orcpt>,
}

/// The wire form of the parameters, each after a space (` SIZE=1000 BODY=8BITMIME`): what
/// follows `MAIL FROM:<…>` in the command, the client and the spool alike.
impl std::fmt::Display for MailParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(size) = self.size {
            write!(f, " SIZE={size}")?;
        }
        if let Some(body) = self.body {
            write!(f, " BODY={}", body.as_str())?;
        }
        if self.smtputf8 {
            f.write_str(" SMTPUTF8")?;
        }
        if let Some(ret) = self.ret {
            write!(f, " RET={}", ret.as_str())?;
        }
        if let Some(envid) = &self.envid {
            write!(f, " ENVID={envid}")?;
        }
        if let Some(auth) = &self.auth {
            write!(f, " AUTH={auth}")?;
        }
        if self.requiretls {
            f.write_str(" REQUIRETLS")?;
        }
        Ok(())
    }
}

/// Parses the parameters as `MAIL FROM` does (RFC 1870, 6152, 3030, 6531, 3461, 4954).
impl std::str::FromStr for MailParams {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<MailParams, ParseError> {
        parse_mail_params(s)
    }
}

/// The wire form of the parameters, each after a space (` NOTIFY=FAILURE ORCPT=rfc822;a@b`).
impl std::fmt::Display for RcptParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(notify) = self.notify {
            write!(f, " NOTIFY={}", notify.to_wire())?;
        }
        if let Some(o) = &self.orcpt {
            write!(f, " ORCPT={};{}", o.addr_type, o.xtext)?;
        }
        Ok(())
    }
}

/// Parses the parameters as `RCPT TO` does (RFC 3461).
impl std::str::FromStr for RcptParams {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<RcptParams, ParseError> {
        parse_rcpt_params(s)
    }
}

/// One parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `HELO domain`
    Helo(String),
    /// `EHLO domain`
    Ehlo(String),
    /// `MAIL FROM:<path> [params]`
    Mail(ReversePath, MailParams),
    /// `RCPT TO:<path> [params]`
    Rcpt(ForwardPath, RcptParams),
    /// `DATA`
    Data,
    /// `BDAT size [LAST]` (RFC 3030)
    Bdat {
        /// The chunk size in octets.
        size: u64,
        /// True for the last chunk.
        last: bool,
    },
    /// `RSET`
    Rset,
    /// `NOOP [string]`
    Noop,
    /// `QUIT`
    Quit,
    /// `VRFY string`
    Vrfy(String),
    /// `EXPN string`
    Expn(String),
    /// `HELP [string]`
    Help,
    /// `STARTTLS` (RFC 3207)
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954)
    Auth {
        /// The SASL mechanism name, upper-cased.
        mechanism: String,
        /// The initial response, still base64.
        initial: Option<String>,
    },
    /// `ETRN domain` (RFC 1985)
    Etrn(String),
    /// An HTTP request line (`GET`, `POST`, `CONNECT`, …) sent to an SMTP port.
    Http,
}

/// How a line failed to parse: the reply to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The reply to send (a recognised verb with bad arguments or an unknown verb: both
    /// count as errors of the session).
    pub reply: Reply,
}

fn syntax_err(text: &str) -> ParseError {
    ParseError {
        reply: reply::syntax(text),
    }
}

fn param_err(reply: Reply) -> ParseError {
    ParseError { reply }
}

/// RFC 5321 `esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")`.
fn is_esmtp_keyword(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// RFC 5321 `esmtp-value = 1*(%d33-60 / %d62-126)`, extended with UTF-8 by RFC 6531.
fn is_esmtp_value(v: &str) -> bool {
    !v.is_empty()
        && v.chars()
            .all(|c| (c != '=' && ('!'..='~').contains(&c)) || !c.is_ascii())
}

/// RFC 3461 §4: `xtext = *( xchar / hexchar )`, `hexchar = "+" 2(%x30-39 / %x41-46)`,
/// `xchar` = any ASCII 33..126 except "+" and "=".
pub fn is_xtext(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if i + 2 >= b.len() || !hex(b[i + 1]) || !hex(b[i + 2]) {
                    return false;
                }
                i += 3;
            }
            b'=' => return false,
            33..=126 => i += 1,
            _ => return false,
        }
    }
    true
}

/// Decodes xtext (RFC 3461 §4); None when it is not valid xtext.
pub fn xtext_decode(v: &str) -> Option<String> {
    if !is_xtext(v) {
        return None;
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes text as xtext (RFC 3461 §4).
pub fn xtext_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Splits `KEY=VALUE` parameters separated by spaces.
fn split_params(text: &str) -> Result<Vec<(String, Option<&str>)>, ParseError> {
    let mut out: Vec<(String, Option<&str>)> = Vec::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        if !is_esmtp_keyword(k) || v.is_some_and(|v| !is_esmtp_value(v)) {
            return Err(param_err(reply::bad_parameter(&format!(
                "bad parameter syntax: {}",
                truncate(word, 40)
            ))));
        }
        let key = k.to_ascii_uppercase();
        if out.iter().any(|(seen, _)| *seen == key) {
            return Err(param_err(reply::bad_parameter(&format!(
                "duplicate parameter {key}"
            ))));
        }
        out.push((key, v));
    }
    Ok(out)
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn need_value<'a>(key: &str, v: Option<&'a str>) -> Result<&'a str, ParseError> {
    v.ok_or_else(|| param_err(reply::bad_parameter(&format!("{key} needs a value"))))
}

fn no_value(key: &str, v: Option<&str>) -> Result<(), ParseError> {
    match v {
        None => Ok(()),
        Some(_) => Err(param_err(reply::bad_parameter(&format!(
            "{key} takes no value"
        )))),
    }
}

fn parse_mail_params(text: &str) -> Result<MailParams, ParseError> {
    let mut p = MailParams::default();
    for (key, v) in split_params(text)? {
        match key.as_str() {
            "SIZE" => {
                let v = need_value(&key, v)?;
                // RFC 1870: size-value = 1*20DIGIT
                if v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(param_err(reply::bad_parameter("bad SIZE value")));
                }
                // A value too large for u64 is certainly over any limit.
                p.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            "BODY" => {
                p.body = Some(match need_value(&key, v)?.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    "BINARYMIME" => Body::BinaryMime,
                    _ => return Err(param_err(reply::bad_parameter("bad BODY value"))),
                })
            }
            "SMTPUTF8" => {
                no_value(&key, v)?;
                p.smtputf8 = true;
            }
            "RET" => {
                p.ret = Some(match need_value(&key, v)?.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err(param_err(reply::bad_parameter("bad RET value"))),
                })
            }
            "ENVID" => {
                let v = need_value(&key, v)?;
                // RFC 3461 §4.4: at most 100 characters, xtext.
                if v.len() > 100 || !is_xtext(v) {
                    return Err(param_err(reply::bad_parameter("bad ENVID value")));
                }
                p.envid = Some(v.to_string());
            }
            "AUTH" => {
                let v = need_value(&key, v)?;
                if v != "<>" && !is_xtext(v) {
                    return Err(param_err(reply::bad_parameter("bad AUTH value")));
                }
                p.auth = Some(v.to_string());
            }
            "REQUIRETLS" => {
                no_value(&key, v)?;
                p.requiretls = true;
            }
            _ => return Err(param_err(reply::unsupported_parameter(&key))),
        }
    }
    Ok(p)
}

fn parse_rcpt_params(text: &str) -> Result<RcptParams, ParseError> {
    let mut p = RcptParams::default();
    for (key, v) in split_params(text)? {
        match key.as_str() {
            "NOTIFY" => {
                let v = need_value(&key, v)?;
                p.notify = Some(
                    Notify::parse(v)
                        .ok_or_else(|| param_err(reply::bad_parameter("bad NOTIFY value")))?,
                );
            }
            "ORCPT" => {
                let v = need_value(&key, v)?;
                // RFC 3461 §4.2: addr-type ";" xtext, at most 500 characters.
                let (t, x) = v
                    .split_once(';')
                    .ok_or_else(|| param_err(reply::bad_parameter("bad ORCPT value")))?;
                if v.len() > 500 || !is_esmtp_keyword(t) || x.is_empty() || !is_xtext(x) {
                    return Err(param_err(reply::bad_parameter("bad ORCPT value")));
                }
                p.orcpt = Some(Orcpt {
                    addr_type: t.to_ascii_lowercase(),
                    xtext: x.to_string(),
                });
            }
            _ => return Err(param_err(reply::unsupported_parameter(&key))),
        }
    }
    Ok(p)
}

fn address_error(sender: bool, e: AddressError) -> ParseError {
    let reply = match e {
        AddressError::Syntax(detail) => {
            if sender {
                reply::bad_sender_syntax(detail)
            } else {
                reply::bad_recipient_syntax(detail)
            }
        }
        AddressError::LocalPartTooLong => reply::address_too_long(sender, "local part"),
        AddressError::DomainTooLong => reply::address_too_long(sender, "domain"),
        AddressError::PathTooLong => reply::address_too_long(sender, "path"),
    };
    param_err(reply)
}

/// Takes `FROM:` / `TO:` off the argument, case-insensitively, allowing spaces after the colon
/// (a common deviation that RFC 5321 §4.1.1.2 grammar forbids but that clients send).
fn strip_keyword<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    // `get` and not `[..]`: the cut may fall inside a multi-byte character (`MAIL FROMé`).
    if arg
        .get(..keyword.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(keyword))
    {
        Some(arg[keyword.len()..].trim_start_matches(' '))
    } else {
        None
    }
}

/// Wraps a bare address (`MAIL FROM:user@host`) in angle brackets, as Postfix tolerates.
fn bracket(path: &str) -> std::borrow::Cow<'_, str> {
    if path.starts_with('<') {
        std::borrow::Cow::Borrowed(path)
    } else {
        let end = path.find(' ').unwrap_or(path.len());
        std::borrow::Cow::Owned(format!("<{}>{}", &path[..end], &path[end..]))
    }
}

/// Parses one command line (without its line ending).
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| ParseError {
        reply: reply::bad_encoding(),
    })?;
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ParseError {
            reply: reply::syntax("control characters are not allowed in commands"),
        });
    }
    let (verb, arg) = match line.split_once(' ') {
        Some((v, a)) => (v, a.trim_matches(' ')),
        None => (line.trim_end_matches(' '), ""),
    };
    match verb.to_ascii_uppercase().as_str() {
        "HELO" | "EHLO" => {
            let helo = verb.eq_ignore_ascii_case("HELO");
            if arg.is_empty() || arg.contains(' ') {
                return Err(syntax_err(if helo {
                    "HELO hostname"
                } else {
                    "EHLO hostname"
                }));
            }
            Ok(if helo {
                Command::Helo(arg.to_string())
            } else {
                Command::Ehlo(arg.to_string())
            })
        }
        "MAIL" => {
            let path =
                strip_keyword(arg, "FROM:").ok_or_else(|| syntax_err("MAIL FROM:<address>"))?;
            let path = bracket(path);
            let (from, rest) = parse_reverse_path(&path).map_err(|e| address_error(true, e))?;
            if !rest.is_empty() && !rest.starts_with(' ') {
                return Err(address_error(true, AddressError::Syntax("text after >")));
            }
            let params = parse_mail_params(rest)?;
            Ok(Command::Mail(from, params))
        }
        "RCPT" => {
            let path = strip_keyword(arg, "TO:").ok_or_else(|| syntax_err("RCPT TO:<address>"))?;
            let path = bracket(path);
            let (to, rest) = parse_forward_path(&path).map_err(|e| address_error(false, e))?;
            if !rest.is_empty() && !rest.starts_with(' ') {
                return Err(address_error(false, AddressError::Syntax("text after >")));
            }
            let params = parse_rcpt_params(rest)?;
            Ok(Command::Rcpt(to, params))
        }
        "DATA" => {
            if !arg.is_empty() {
                return Err(syntax_err("DATA"));
            }
            Ok(Command::Data)
        }
        "BDAT" => {
            let mut words = arg.split(' ').filter(|w| !w.is_empty());
            let size = words.next().ok_or_else(|| syntax_err("BDAT size [LAST]"))?;
            if size.is_empty() || size.len() > 20 || !size.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax_err("BDAT size [LAST]"));
            }
            let size: u64 = size.parse().map_err(|_| syntax_err("BDAT size [LAST]"))?;
            let last = match words.next() {
                None => false,
                Some(w) if w.eq_ignore_ascii_case("LAST") => true,
                Some(_) => return Err(syntax_err("BDAT size [LAST]")),
            };
            if words.next().is_some() {
                return Err(syntax_err("BDAT size [LAST]"));
            }
            Ok(Command::Bdat { size, last })
        }
        "RSET" => {
            if !arg.is_empty() {
                return Err(syntax_err("RSET"));
            }
            Ok(Command::Rset)
        }
        "NOOP" => Ok(Command::Noop),
        "QUIT" => {
            if !arg.is_empty() {
                return Err(syntax_err("QUIT"));
            }
            Ok(Command::Quit)
        }
        "VRFY" => {
            if arg.is_empty() {
                return Err(syntax_err("VRFY address"));
            }
            Ok(Command::Vrfy(arg.to_string()))
        }
        "EXPN" => {
            if arg.is_empty() {
                return Err(syntax_err("EXPN mailing-list"));
            }
            Ok(Command::Expn(arg.to_string()))
        }
        "HELP" => Ok(Command::Help),
        "STARTTLS" => {
            if !arg.is_empty() {
                return Err(syntax_err("STARTTLS"));
            }
            Ok(Command::StartTls)
        }
        "AUTH" => {
            let mut words = arg.split(' ').filter(|w| !w.is_empty());
            let mechanism = words
                .next()
                .ok_or_else(|| syntax_err("AUTH mechanism [initial-response]"))?
                .to_ascii_uppercase();
            let initial = words.next().map(str::to_string);
            if words.next().is_some() {
                return Err(syntax_err("AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        "ETRN" => {
            if arg.is_empty() {
                return Err(syntax_err("ETRN domain"));
            }
            Ok(Command::Etrn(arg.to_string()))
        }
        "GET" | "POST" | "PUT" | "HEAD" | "CONNECT" | "OPTIONS" | "DELETE" => Ok(Command::Http),
        _ => Err(ParseError {
            reply: reply::unknown_command(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Command {
        parse_command(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {:?}", e.reply))
    }

    fn err(line: &str) -> String {
        parse_command(line.as_bytes())
            .unwrap_err()
            .reply
            .to_string()
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            ok("ehlo client.example"),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(ok("QuIt"), Command::Quit);
        assert_eq!(ok("noop anything goes"), Command::Noop);
    }

    #[test]
    fn mail_params_table() {
        let Command::Mail(from, p) =
            ok("MAIL FROM:<a@b.example> SIZE=1000 BODY=8bitmime RET=HDRS ENVID=QQ+2B1 SMTPUTF8")
        else {
            panic!()
        };
        assert_eq!(from.to_string(), "a@b.example");
        assert_eq!(p.size, Some(1000));
        assert_eq!(p.body, Some(Body::EightBitMime));
        assert_eq!(p.ret, Some(Ret::Hdrs));
        assert_eq!(p.envid.as_deref(), Some("QQ+2B1"));
        assert!(p.smtputf8);
        assert_eq!(xtext_decode("QQ+2B1").unwrap(), "QQ+1");
    }

    #[test]
    fn lenient_forms() {
        assert!(matches!(ok("MAIL FROM: <a@b.example>"), Command::Mail(..)));
        assert!(matches!(ok("mail from:a@b.example"), Command::Mail(..)));
        assert!(matches!(
            ok("MAIL FROM:<>"),
            Command::Mail(ReversePath::Null, _)
        ));
    }

    #[test]
    fn rcpt_params_table() {
        let Command::Rcpt(to, p) =
            ok("RCPT TO:<bob@localhost> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40x@localhost")
        else {
            panic!()
        };
        assert_eq!(to.to_string(), "bob@localhost");
        let n = p.notify.unwrap();
        assert!(n.success && n.failure && !n.delay && !n.never);
        assert_eq!(p.orcpt.unwrap().address(), "bob@x@localhost");
    }

    /// The parameters' wire form (what the client sends and the spool writes) reads back as
    /// the same parameters with the command's own parser, and parsing is as strict.
    #[test]
    fn params_round_trip_through_their_wire_form() {
        for text in [
            "",
            " SIZE=1000",
            " SIZE=5 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1 AUTH=<>",
            " BODY=BINARYMIME RET=FULL",
        ] {
            let p: MailParams = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
            assert_eq!(p.to_string().parse::<MailParams>().unwrap(), p);
        }
        let p: MailParams = "body=8bitmime size=7".parse().unwrap();
        assert_eq!(p.to_string(), " SIZE=7 BODY=8BITMIME");
        for text in [
            "",
            " NOTIFY=NEVER",
            " NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;bob+40x@localhost",
            " ORCPT=utf-8;b\\x{E9}b@example.test",
        ] {
            let p: RcptParams = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
        }
        assert!("NOTIFY=SOMETIMES".parse::<RcptParams>().is_err());
        assert!("SIZE=1 SIZE=2".parse::<MailParams>().is_err());
    }

    #[test]
    fn errors_table() {
        let cases = [
            ("FOO", "502 5.5.2"),
            ("MAIL", "501 5.5.4"),
            ("MAIL TO:<a@b.example>", "501 5.5.4"),
            ("MAIL FROM:<a@@b>", "501 5.1.7"),
            ("RCPT TO:<a b@c>", "501 5.1.3"),
            ("MAIL FROM:<a@b.example> FOO=BAR", "555 5.5.4"),
            ("MAIL FROM:<a@b.example> SIZE=abc", "501 5.5.4"),
            ("MAIL FROM:<a@b.example> SIZE=1 SIZE=2", "501 5.5.4"),
            ("MAIL FROM:<a@b.example> BODY=9BIT", "501 5.5.4"),
            ("MAIL FROM:<a@b.example> SMTPUTF8=yes", "501 5.5.4"),
            ("RCPT TO:<a@b.example> NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
            ("RCPT TO:<a@b.example> NOTIFY=SOMETIMES", "501 5.5.4"),
            ("RCPT TO:<a@b.example> ORCPT=rfc822", "501 5.5.4"),
            ("MAIL FROM:<a@b.example> ENVID=a=b", "501 5.5.4"),
            ("DATA now", "501 5.5.4"),
            ("BDAT", "501 5.5.4"),
            ("BDAT x", "501 5.5.4"),
            ("BDAT 10 FIRST", "501 5.5.4"),
            ("EHLO", "501 5.5.4"),
            ("HELO a b", "501 5.5.4"),
            ("VRFY", "501 5.5.4"),
            ("RCPT TO:<a@b.example>x", "501 5.1.3"),
        ];
        for (line, want) in cases {
            let got = err(line);
            assert!(got.starts_with(want), "{line}: got {got}, want {want}");
        }
    }

    #[test]
    fn bdat() {
        assert_eq!(
            ok("BDAT 100"),
            Command::Bdat {
                size: 100,
                last: false
            }
        );
        assert_eq!(
            ok("bdat 0 last"),
            Command::Bdat {
                size: 0,
                last: true
            }
        );
    }

    #[test]
    fn non_ascii_where_the_colon_belongs() {
        // Found by fuzzing: slicing inside a multi-byte character panicked.
        for line in [
            "MAIL FROMé",
            "RCPT TOé",
            "MAIL FRé",
            "RCPT é",
            "MAIL FROM:é",
        ] {
            assert!(parse_command(line.as_bytes()).is_err(), "{line}");
        }
    }

    #[test]
    fn non_utf8_and_controls() {
        assert!(parse_command(b"MAIL FROM:<\xff@x>").is_err());
        assert!(parse_command(b"NOOP \x00").is_err());
    }

    #[test]
    fn xtext_roundtrip() {
        for s in ["a+b=c", "plain", "ünï", " space"] {
            assert_eq!(xtext_decode(&xtext_encode(s)).unwrap(), s);
        }
        assert!(!is_xtext("+4"));
        assert!(!is_xtext("+zz"));
    }
}
