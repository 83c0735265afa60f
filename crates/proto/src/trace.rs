//! Trace information: the `Received:` header (RFC 5321 §4.4) and RFC 5322 dates.
//!
//! proto has no clock: callers pass the time as seconds since the Unix epoch.

use std::fmt::Write;
use std::net::IpAddr;

use crate::envelope::Envelope;

/// Formats `secs` (Unix time, UTC) as an RFC 5322 §3.3 date-time: `Mon, 23 Nov 2026 11:16:53 +0000`.
pub fn rfc5322_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Formats `secs` (Unix time, UTC) as `2026-11-23 13:14:24`, for listings (`queue list`).
pub fn utc_timestamp(secs: u64) -> String {
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Keeps a HELO name safe to write into a header: printable, no parentheses or CR/LF,
/// at most 255 characters.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && *c != '(' && *c != ')')
        .take(255)
        .collect()
}

fn ip_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("IPv6:{a}"),
    }
}

/// Builds the Received header this server prepends, CRLF-terminated and folded:
///
/// ```text
/// Received: from client.example (mail.client.example [192.0.2.1])
///         by mx.example.org (estafeta) with ESMTPS id 7D3A1F0C9B2E
///         (using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)
///         for <bob@example.org>; Mon, 23 Nov 2026 11:16:53 +0000
/// ```
///
/// `for` is written only when there is exactly one recipient, so that the header does not
/// disclose the other recipients of the message (as Postfix does).
///
/// A local submission (`env.client.local_uid`, the submit socket) has no network client to
/// name: the header names the user, the way Postfix does for mail from its `sendmail`:
///
/// ```text
/// Received: by mx.example.org (estafeta, from userid 1000)
///         id 7D3A1F0C9B2E; Mon, 23 Nov 2026 11:16:53 +0000
/// ```
pub fn received_header(hostname: &str, env: &Envelope, id: &str, now: u64) -> String {
    let mut h = String::with_capacity(256);
    if let Some(uid) = env.client.local_uid {
        let _ = write!(
            h,
            "Received: by {hostname} (estafeta, from userid {uid})\r\n\tid {id}; {}\r\n",
            rfc5322_date(now)
        );
        return h;
    }
    let _ = write!(
        h,
        "Received: from {} ({} [{}])\r\n\tby {} (estafeta) with {} id {}",
        clean(&env.client.helo),
        env.client.name.as_deref().map_or("unknown".into(), clean),
        ip_literal(env.client.ip),
        hostname,
        env.client.protocol,
        id
    );
    if let Some(tls) = &env.client.tls {
        let _ = write!(h, "\r\n\t(using {})", clean(tls));
    }
    if let Some(user) = &env.client.auth {
        let _ = write!(h, "\r\n\t(Authenticated sender: {})", clean(user));
    }
    if let [only] = env.rcpts.as_slice() {
        let _ = write!(h, "\r\n\tfor <{}>", only.path);
    }
    let _ = write!(h, "; {}\r\n", rfc5322_date(now));
    h
}

/// What the session checks in a message's header section (up to the first empty line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderStats {
    /// `Received:` fields, for loop detection (RFC 5321 §6.3).
    pub received: usize,
    /// Octets of the header section, without the empty line (all of a message that has none).
    pub size: usize,
}

/// Counts the `Received:` fields of the header section and measures it.
pub fn header_stats(message: &[u8]) -> HeaderStats {
    let mut received = 0;
    let mut rest = message;
    loop {
        if rest.starts_with(b"\r\n") || rest.starts_with(b"\n") || rest.is_empty() {
            break;
        }
        if rest.len() >= 9 && rest[..9].eq_ignore_ascii_case(b"received:") {
            received += 1;
        }
        match memchr::memchr(b'\n', rest) {
            Some(i) => rest = &rest[i + 1..],
            None => {
                rest = &[];
                break;
            }
        }
    }
    HeaderStats {
        received,
        size: message.len() - rest.len(),
    }
}

/// Counts the `Received:` fields in the header section of `message` (up to the first empty
/// line), for loop detection (RFC 5321 §6.3).
pub fn count_received(message: &[u8]) -> usize {
    header_stats(message).received
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_432_613),
            "Mon, 23 Nov 2026 11:16:53 +0000"
        );
    }

    #[test]
    fn received_for_a_local_submission_names_the_user() {
        let (path, _) = crate::address::parse_forward_path("<bob@example.org>").unwrap();
        let env = Envelope {
            client: crate::ClientInfo {
                ip: IpAddr::from([127, 0, 0, 1]),
                port: 0,
                helo: "localhost".into(),
                protocol: "ESMTP".into(),
                tls: None,
                auth: None,
                local_uid: Some(1000),
                name: None,
            },
            from: crate::address::parse_reverse_path("<alice@example.org>")
                .unwrap()
                .0,
            params: Default::default(),
            rcpts: vec![crate::Recipient {
                path,
                params: Default::default(),
            }],
        };
        assert_eq!(
            received_header("mx.example.org", &env, "7D3A1F0C9B2E", 1_795_432_613),
            "Received: by mx.example.org (estafeta, from userid 1000)\r\n\
             \tid 7D3A1F0C9B2E; Mon, 23 Nov 2026 11:16:53 +0000\r\n"
        );
        // Any other client is named by its address.
        let mut remote = env.clone();
        remote.client.local_uid = None;
        assert!(
            received_header("mx.example.org", &remote, "7D3A1F0C9B2E", 0)
                .starts_with("Received: from localhost (unknown [127.0.0.1])")
        );
    }

    #[test]
    fn counts_received_in_header_only() {
        let m = b"Received: a\r\nX: y\r\nreceived: b\r\n\tcont\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received(m), 2);
        assert_eq!(count_received(b""), 0);
        assert_eq!(header_stats(m).size, 39);
        assert_eq!(header_stats(b"A: b\r\n").size, 6);
        assert_eq!(header_stats(b"\r\nbody").size, 0);
    }
}
