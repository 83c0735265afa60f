//! Recovery's reading of a spool file and its state file (`spool::parse_files`, what
//! `Spool::recover` does with the bytes it reads): whatever the files hold, it must never
//! panic. A damaged file is an error (`InvalidData`, set aside), never a crash of the server
//! at start.
//!
//! Input: the first byte says whether there is a state file (`ID.st`): when it is odd, the
//! rest is split at its last 0xFF byte into the spool file and the state file; when it is
//! even, or there is no 0xFF, the rest is the spool file alone. (The seeds start with `0` or
//! `1`.)
//!
//! Checked: no panic; a message read has one state per recipient and a size that is at most
//! the file's.

#![no_main]

use estafeta_queue::QueueId;
use estafeta_queue::spool::parse_files;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (file, status) = match rest.iter().rposition(|&b| b == 0xFF) {
        Some(i) if mode & 1 == 1 => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    let id = QueueId::parse("0123456789AB").unwrap();
    let Ok(msg) = parse_files(id, file, status) else {
        return;
    };
    assert_eq!(msg.id, id);
    assert_eq!(msg.status.len(), msg.envelope.rcpts.len());
    assert!(msg.size <= file.len() as u64);
    assert_eq!(msg.has_status_file, status.is_some());
    let _ = (msg.pending(), format!("{msg:?}"));
});
