//! Building the test message: headers plus a body of printable ASCII lines, CRLF line endings,
//! `size` bytes before dot-stuffing, sent dot-stuffed and terminated by `.\r\n`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Width of the message number in the Message-ID, patched in place for every message.
const NUM_WIDTH: usize = 10;

pub struct Template {
    /// Dot-stuffed message followed by `.\r\n`, ready to write after a 354.
    pub wire: Vec<u8>,
    /// Size of the message as stored (before dot-stuffing, without the final dot).
    pub size: usize,
    /// Offset in `wire` of the message number in the Message-ID header.
    num_at: usize,
}

impl Template {
    pub fn new(size: usize, from: &str) -> Template {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut msg = Vec::with_capacity(size + 512);
        msg.extend_from_slice(format!("From: <{from}>\r\n").as_bytes());
        msg.extend_from_slice(b"To: undisclosed-recipients:;\r\n");
        msg.extend_from_slice(b"Subject: estafeta-bench test message\r\n");
        msg.extend_from_slice(format!("Date: {}\r\n", rfc5322_date(now)).as_bytes());
        let prefix = format!("Message-ID: <{now}.{}.", std::process::id());
        msg.extend_from_slice(prefix.as_bytes());
        let num_at = msg.len();
        msg.extend_from_slice(&[b'0'; NUM_WIDTH]);
        msg.extend_from_slice(b"@bench.example>\r\n\r\n");

        // Body: lines of at most 78 printable characters plus CRLF; the last line is shortened
        // so that the whole message is exactly `size` bytes (when `size` leaves room for it).
        let mut remaining = size.saturating_sub(msg.len());
        if remaining == 1 {
            remaining = 2;
        }
        let mut i = 0usize;
        while remaining > 0 {
            let len = match remaining {
                80 | 82.. => 78,
                81 => 77,
                r => r - 2,
            };
            // Rotate through the 94 printable characters; line 1 (then every 94th line) starts
            // with '.', which exercises dot-stuffing.
            for j in 0..len {
                msg.push(b'!' + ((i + j) % 94) as u8);
            }
            msg.extend_from_slice(b"\r\n");
            remaining -= len + 2;
            i += 13;
        }
        let size = msg.len();

        // Dot-stuff: every line starting with '.' gets another one (header lines never do).
        let mut wire = Vec::with_capacity(size + size / 40 + 3);
        let mut at_line_start = true;
        for &b in &msg {
            if at_line_start && b == b'.' {
                wire.push(b'.');
            }
            wire.push(b);
            at_line_start = b == b'\n';
        }
        wire.extend_from_slice(b".\r\n");
        Template { wire, size, num_at }
    }

    /// Writes message number `n` into the Message-ID.
    pub fn set_number(&mut self, n: u64) {
        let mut n = n;
        for k in (0..NUM_WIDTH).rev() {
            self.wire[self.num_at + k] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
}

/// `Thu, 01 Jan 1970 00:00:00 +0000` for a Unix time.
fn rfc5322_date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WD[(days % 7) as usize],
        d,
        MON[(m - 1) as usize],
        y,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let body = wire.strip_suffix(b".\r\n").expect("terminator");
        let mut out = Vec::new();
        for line in body.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }

    #[test]
    fn exact_sizes_and_line_lengths() {
        for size in (300..1200).chain([4096, 65536]) {
            let t = Template::new(size, "bench@example.test");
            assert_eq!(t.size, size, "size {size}");
            let plain = unstuff(&t.wire);
            assert_eq!(plain.len(), size);
            for line in plain.split_inclusive(|&b| b == b'\n') {
                assert!(line.ends_with(b"\r\n"));
                assert!(line.len() <= 80);
                assert!(
                    line[..line.len() - 2]
                        .iter()
                        .all(|b| (b' '..=b'~').contains(b))
                );
            }
        }
    }

    #[test]
    fn dot_stuffed() {
        let t = Template::new(1000, "a@b");
        assert!(t.wire.windows(3).any(|w| w == b"\n.."));
        assert_eq!(unstuff(&t.wire).len(), 1000);
    }

    #[test]
    fn numbers_and_dates() {
        let mut t = Template::new(4096, "a@b");
        t.set_number(42);
        let s = String::from_utf8_lossy(&t.wire);
        assert!(s.contains(".0000000042@bench.example>"));
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
    }
}
