//! Dialogue tests: each `tests/dialogues/*.smtp` file is an SMTP session played against a real
//! server (in-process, real TCP on a random port, real spool and Maildir in a temporary
//! directory), as an untrusted client (`mynetworks = []`).
//!
//! Script syntax, one directive a line:
//! - `c -> TEXT`: the client sends TEXT and CRLF.
//! - `c => BYTES`: the client sends BYTES as they are, with escapes `\r`, `\n`, `\t`, `\\`,
//!   `\xNN` (no line ending added).
//! - `s <- TEXT`: the next line from the server is exactly TEXT; a trailing `...` makes it a
//!   prefix match.
//! - `s <- (closed)`: the server has closed the connection.
//! - `maildir USER@DOMAIN N`: N messages are (or arrive within 5 s) in that Maildir.
//! - `maildir-contains USER@DOMAIN TEXT`: the newest message there contains TEXT.
//! - `#` starts a comment; blank lines are ignored.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use estafeta_e2e::{InProcess, maildir_new};

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                other => panic!("unknown escape \\{}", other as char),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn run_script(name: &str, script: &str) -> Result<(), String> {
    // The client is an untrusted host on the internet: nothing may be relayed for it.
    let server = InProcess::start("[relay]\nmynetworks = []\n");
    let stream = TcpStream::connect(server.addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for (n, raw) in script.lines().enumerate() {
        let line_no = n + 1;
        let line = raw.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |msg: String| format!("{name}:{line_no}: {msg}");
        if line == "c ->" {
            writer
                .write_all(b"\r\n")
                .map_err(|e| at(format!("write: {e}")))?;
        } else if let Some(text) = line.strip_prefix("c -> ") {
            writer
                .write_all(format!("{text}\r\n").as_bytes())
                .map_err(|e| at(format!("write: {e}")))?;
        } else if let Some(bytes) = line.strip_prefix("c => ") {
            writer
                .write_all(&unescape(bytes))
                .map_err(|e| at(format!("write: {e}")))?;
        } else if let Some(want) = line.strip_prefix("s <- ") {
            if want == "(closed)" {
                let mut rest = Vec::new();
                reader
                    .read_to_end(&mut rest)
                    .map_err(|e| at(format!("expected close, got error {e}")))?;
                if !rest.is_empty() {
                    return Err(at(format!(
                        "expected close, got {:?}",
                        String::from_utf8_lossy(&rest)
                    )));
                }
                continue;
            }
            let mut got = String::new();
            reader
                .read_line(&mut got)
                .map_err(|e| at(format!("read: {e} (expected {want:?})")))?;
            let got = got.trim_end_matches(['\r', '\n']);
            let ok = match want.strip_suffix("...") {
                Some(prefix) => got.starts_with(prefix),
                None => got == want,
            };
            if !ok {
                return Err(at(format!(
                    "expected {want:?}\n{:>width$}got      {got:?}",
                    "",
                    width = 0
                )));
            }
        } else if let Some(rest) = line.strip_prefix("maildir-contains ") {
            let (addr, text) = rest
                .split_once(' ')
                .ok_or_else(|| at("bad maildir-contains".into()))?;
            let (user, domain) = addr.split_once('@').unwrap();
            let msgs = maildir_new(server.dir.path(), domain, user, 1, Duration::from_secs(5));
            let last = msgs
                .last()
                .ok_or_else(|| at(format!("no message for {addr}")))?;
            if !String::from_utf8_lossy(last).contains(&*String::from_utf8_lossy(&unescape(text))) {
                return Err(at(format!(
                    "message for {addr} lacks {text:?}:\n{}",
                    String::from_utf8_lossy(last)
                )));
            }
        } else if let Some(rest) = line.strip_prefix("maildir ") {
            let (addr, count) = rest
                .split_once(' ')
                .ok_or_else(|| at("bad maildir".into()))?;
            let count: usize = count.parse().unwrap();
            let (user, domain) = addr.split_once('@').unwrap();
            let msgs = maildir_new(
                server.dir.path(),
                domain,
                user,
                count,
                Duration::from_secs(5),
            );
            if msgs.len() != count {
                return Err(at(format!(
                    "{addr}: {} messages, expected {count}",
                    msgs.len()
                )));
            }
        } else {
            return Err(at(format!("unknown directive {line:?}")));
        }
    }
    Ok(())
}

#[test]
fn dialogues() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dialogues");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "smtp"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "dialogue scripts missing in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let script = std::fs::read_to_string(f).unwrap();
        match run_script(&name, &script) {
            Ok(()) => eprintln!("ok   {name}"),
            Err(e) => {
                eprintln!("FAIL {e}");
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} dialogue(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
