//! The DATA byte stream: where a message ends, how lines are unstuffed and what bare CR and
//! bare LF become. This is the one interpretation of the stream for every path (DESIGN.md,
//! decision 2); the outbound side ([`stuff`]) applies the same rules when it writes.
//!
//! # The decision
//!
//! - **Only `<CRLF>.<CRLF>` ends the message**, where both line breaks are real CRLF pairs
//!   (RFC 5321 §4.1.1.4). `\n.\n`, `\n.\r\n`, `\r\n.\n`, `\r.\r\n`, `\r\n.\r` … never end it.
//!   The line break that ends the `DATA` command counts as the CRLF before the first line.
//! - **A bare LF or a bare CR inside the content is normalised to CRLF.** Clients that write
//!   bare LF (scripts, `nc` users) get their text stored with proper line breaks. A line
//!   that starts after a normalised break is still a line: a leading dot on it is unstuffed
//!   like any other (`\n..x` stores `.x`).
//! - A lone `.` that reaches the content this way (from `\n.\n`, say) is stored as a line
//!   holding one dot. It can never end a message downstream: whenever estafeta sends a message
//!   on, [`stuff`] doubles every leading dot, so such a line goes out as `..`.
//!
//! Hence no input splits one message into two here, and no message stored here can be split
//! in two by a strict or a lax server it is relayed to (the CVE-2023-51764 family).
//!
//! BDAT chunks (RFC 3030) carry exact octet counts and are stored as they are.

/// The state of the receiver between two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line that follows a real CRLF: a dot here may begin the end marker.
    LineStartReal,
    /// At the start of a line that follows a normalised bare CR or LF.
    LineStartBare,
    /// Inside a line.
    Middle,
    /// After a CR inside or at the end of a line.
    Cr,
    /// After a dot at the start of a line (`real` tells which kind of line start).
    Dot { real: bool },
    /// After `.` CR at the start of a line.
    DotCr { real: bool },
    /// The end marker was seen.
    Done,
}

/// Receives the content of a `DATA` command, unstuffing dots and normalising line breaks,
/// until the `<CRLF>.<CRLF>` end marker.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    state: State,
    /// Octets stored so far (after unstuffing and normalisation).
    size: u64,
    /// The size limit; content beyond it is counted but not stored.
    limit: u64,
    /// True once the content went over the limit.
    overflow: bool,
}

/// The result of feeding bytes to a [`DataReceiver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStatus {
    /// All the bytes were consumed; the message goes on.
    More,
    /// The end marker was found after consuming this many bytes of the input; the rest of the
    /// input belongs to the command stream.
    Done(usize),
}

impl DataReceiver {
    /// A receiver at the start of the content, storing at most `limit` octets.
    pub fn new(limit: u64) -> Self {
        DataReceiver {
            state: State::LineStartReal,
            size: 0,
            limit,
            overflow: false,
        }
    }

    /// True when the content went over the size limit (the message must be refused).
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// The number of octets of content seen (stored or not).
    pub fn size(&self) -> u64 {
        self.size
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        let n = bytes.len() as u64;
        if !self.overflow {
            if self.size + n > self.limit {
                self.overflow = true;
            } else {
                out.extend_from_slice(bytes);
            }
        }
        self.size += n;
    }

    /// Consumes `input`, appending content to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> DataStatus {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Done => return DataStatus::Done(i),
                State::Middle => {
                    // Fast path: copy the run up to the next CR or LF in one go.
                    let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                    if run > 0 {
                        self.emit(out, &input[i..i + run]);
                        i += run;
                        continue;
                    }
                    let b = input[i];
                    i += 1;
                    if b == b'\r' {
                        self.state = State::Cr;
                    } else {
                        // Bare LF: normalised.
                        self.emit(out, b"\r\n");
                        self.state = State::LineStartBare;
                    }
                }
                State::LineStartReal | State::LineStartBare => {
                    let real = self.state == State::LineStartReal;
                    match input[i] {
                        b'.' => {
                            i += 1;
                            self.state = State::Dot { real };
                        }
                        b'\r' => {
                            i += 1;
                            self.state = State::Cr;
                        }
                        b'\n' => {
                            i += 1;
                            self.emit(out, b"\r\n");
                            self.state = State::LineStartBare;
                        }
                        // Any other byte starts the line's run, copied with it.
                        _ => self.state = State::Middle,
                    }
                }
                State::Cr => {
                    let b = input[i];
                    if b == b'\n' {
                        i += 1;
                        self.emit(out, b"\r\n");
                        self.state = State::LineStartReal;
                    } else {
                        // Bare CR: normalised; this byte starts the next line.
                        self.emit(out, b"\r\n");
                        self.state = State::LineStartBare;
                    }
                }
                State::Dot { real } => {
                    let b = input[i];
                    match b {
                        b'\r' => {
                            i += 1;
                            self.state = State::DotCr { real };
                        }
                        b'\n' => {
                            // `.` then bare LF: a line holding one dot, never the end.
                            i += 1;
                            self.emit(out, b".\r\n");
                            self.state = State::LineStartBare;
                        }
                        _ => {
                            // RFC 5321 §4.5.2: a leading dot with more on the line is removed.
                            // The byte is processed as the line's first character.
                            self.state = State::Middle;
                            if b == b'.' {
                                i += 1;
                                self.emit(out, b".");
                            }
                        }
                    }
                }
                State::DotCr { real } => {
                    let b = input[i];
                    if b == b'\n' {
                        i += 1;
                        if real {
                            self.state = State::Done;
                            return DataStatus::Done(i);
                        }
                        self.emit(out, b".\r\n");
                        self.state = State::LineStartReal;
                    } else {
                        // `.` then bare CR: a line holding one dot; the byte starts a new line.
                        self.emit(out, b".\r\n");
                        self.state = State::LineStartBare;
                    }
                }
            }
        }
        if self.state == State::Done {
            DataStatus::Done(i)
        } else {
            DataStatus::More
        }
    }
}

/// Normalises line breaks and dot-stuffs `content` for sending with DATA, and appends the
/// end marker. Applies the same reading of bare CR and bare LF as [`DataReceiver`], so that
/// what is sent is what a strict receiver stores; every line starting with a dot gets a second
/// dot (RFC 5321 §4.5.2). Content that does not end with a line break gets one.
pub fn stuff(content: &[u8], out: &mut Vec<u8>) {
    out.reserve(content.len() + content.len() / 64 + 5);
    let mut s = Stuffer::default();
    s.feed(content, out);
    s.finish(out);
}

/// [`stuff`] in pieces: the content fed block by block (a large message is never copied
/// whole), then [`Stuffer::finish`] for the end marker. The output is the same as `stuff`'s
/// on the concatenated blocks, wherever they are cut.
#[derive(Debug, Clone)]
pub struct Stuffer {
    line_start: bool,
    /// The last block ended with a CR, already sent as CRLF: an LF opening the next is
    /// its pair.
    after_cr: bool,
}

impl Default for Stuffer {
    fn default() -> Self {
        Stuffer {
            line_start: true,
            after_cr: false,
        }
    }
}

impl Stuffer {
    /// Appends the stuffed form of `content` (the next block of the message) to `out`.
    pub fn feed(&mut self, content: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        if self.after_cr && content.first() == Some(&b'\n') {
            i = 1;
        }
        if !content.is_empty() {
            self.after_cr = false;
        }
        while i < content.len() {
            let b = content[i];
            match b {
                b'\r' => {
                    out.extend_from_slice(b"\r\n");
                    match content.get(i + 1) {
                        Some(&b'\n') => i += 1,
                        None => self.after_cr = true,
                        Some(_) => {}
                    }
                    self.line_start = true;
                }
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                }
                _ => {
                    if self.line_start && b == b'.' {
                        out.push(b'.');
                    }
                    // The run up to the next line break in one go.
                    let run =
                        memchr::memchr2(b'\r', b'\n', &content[i..]).unwrap_or(content.len() - i);
                    out.extend_from_slice(&content[i..i + run]);
                    i += run;
                    self.line_start = false;
                    continue;
                }
            }
            i += 1;
        }
    }

    /// Ends the content: a final line break when it lacks one, then the end marker.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffing_in_blocks_is_stuffing_whole() {
        let samples: [&[u8]; 6] = [
            b"a\r\n.b\r\n",
            b"x\ry\nz\r\n\r\n..\r\n.",
            b".\r",
            b"\r\n.\n.\r.",
            b"no end",
            b"",
        ];
        for sample in samples {
            let mut whole = Vec::new();
            stuff(sample, &mut whole);
            for cut in 0..=sample.len() {
                for cut2 in cut..=sample.len() {
                    let mut s = Stuffer::default();
                    let mut out = Vec::new();
                    s.feed(&sample[..cut], &mut out);
                    s.feed(&sample[cut..cut2], &mut out);
                    s.feed(&sample[cut2..], &mut out);
                    s.finish(&mut out);
                    assert_eq!(out, whole, "{sample:?} cut at {cut} and {cut2}");
                }
            }
        }
    }

    /// Feeds the whole input at once and one byte at a time; both must agree.
    fn run(input: &[u8]) -> (Vec<u8>, Option<usize>) {
        let mut r = DataReceiver::new(1 << 20);
        let mut out = Vec::new();
        let whole = match r.feed(input, &mut out) {
            DataStatus::Done(n) => Some(n),
            DataStatus::More => None,
        };
        let mut r2 = DataReceiver::new(1 << 20);
        let mut out2 = Vec::new();
        let mut end = None;
        for (k, b) in input.iter().enumerate() {
            if let DataStatus::Done(n) = r2.feed(std::slice::from_ref(b), &mut out2) {
                assert_eq!(n, 1);
                end = Some(k + 1);
                break;
            }
        }
        assert_eq!(out, out2, "chunking changed the content for {input:?}");
        assert_eq!(whole, end, "chunking changed the end for {input:?}");
        (out, whole)
    }

    #[test]
    fn simple_message() {
        let (out, end) = run(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n");
        assert_eq!(out, b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(end, Some(24));
    }

    #[test]
    fn empty_message() {
        let (out, end) = run(b".\r\n");
        assert_eq!(out, b"");
        assert_eq!(end, Some(3));
    }

    #[test]
    fn dot_unstuffing() {
        let (out, _) = run(b"..leading\r\n...\r\n.x\r\n.\r\n");
        assert_eq!(out, b".leading\r\n..\r\nx\r\n");
        let (out, _) = run(b"..\r\n.\r\n");
        assert_eq!(out, b".\r\n");
    }

    /// The smuggling table: every one of these must NOT end the message where a lax server
    /// would, and must get the documented normalisation.
    #[test]
    fn smuggling_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\n.\nMAIL", b"a\r\n.\r\nMAIL"),
            (b"a\n.\r\nMAIL", b"a\r\n.\r\nMAIL"),
            (b"a\r\n.\nMAIL", b"a\r\n.\r\nMAIL"),
            (b"a\r.\r\nMAIL", b"a\r\n.\r\nMAIL"),
            (b"a\r\n.\rMAIL", b"a\r\n.\r\nMAIL"),
            (b"a\r.\rMAIL", b"a\r\n.\r\nMAIL"),
            (b"a\n.\rMAIL", b"a\r\n.\r\nMAIL"),
            (b"a\r\n\x00.\r\nMAIL", b"a\r\n\x00.\r\nMAIL"),
            (b"a\r\n .\r\nMAIL", b"a\r\n .\r\nMAIL"),
        ];
        for (input, want) in cases {
            let (out, end) = run(input);
            assert_eq!(end, None, "{input:?} must not end the message");
            assert_eq!(&out[..], *want, "{input:?}");
        }
    }

    #[test]
    fn smuggled_then_real_end() {
        // A real CRLF.CRLF after a smuggling attempt ends the message there, and the attempt is
        // content.
        let input = b"a\n.\nMAIL FROM:<x@y>\r\n.\r\nRSET\r\n";
        let (out, end) = run(input);
        assert_eq!(out, b"a\r\n.\r\nMAIL FROM:<x@y>\r\n");
        assert_eq!(end, Some(input.len() - 6));
    }

    #[test]
    fn bare_lf_then_crlf_dot_crlf_ends() {
        // `X\n.\r\n.\r\n` holds a real `\r\n.\r\n`: every strict server ends there too.
        let (out, end) = run(b"X\n.\r\n.\r\n");
        assert_eq!(out, b"X\r\n.\r\n");
        assert_eq!(end, Some(8));
    }

    #[test]
    fn stored_content_restuffs_safely() {
        // Whatever was stored, stuffing it never produces an early end marker for a strict
        // receiver, and receiving the stuffed form gives the stored content back (with line
        // breaks normalised and a final CRLF).
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\r\n.\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
            (b".\r\n..\r\n", b".\r\n..\r\n"),
            (b"x", b"x\r\n"),
            (b"\r\n.", b"\r\n.\r\n"),
            (b"a\n.\nb", b"a\r\n.\r\nb\r\n"),
            (b"", b""),
        ];
        for (input, want) in cases {
            let mut wire = Vec::new();
            stuff(input, &mut wire);
            let (back, end) = run(&wire);
            assert_eq!(end, Some(wire.len()), "{input:?}");
            assert_eq!(&back[..], *want, "{input:?}");
        }
    }

    #[test]
    fn size_limit() {
        let mut r = DataReceiver::new(10);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"0123456789ABCDEF\r\n", &mut out), DataStatus::More);
        assert!(r.overflowed());
        assert!(out.len() <= 10);
        assert_eq!(r.feed(b".\r\n", &mut out), DataStatus::Done(3));
    }
}
