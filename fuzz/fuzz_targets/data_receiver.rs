//! The DATA receiver (the one place that decides where a message ends; DESIGN.md decision 2).
//!
//! The first byte of the input picks a split position in the rest. Checked:
//! - feeding the two halves gives the same content and the same end as feeding it all at once;
//! - when the receiver says the message ended after `n` bytes, those bytes end with
//!   `\r\n.\r\n` (or are exactly `.\r\n`, the end right after the DATA line): nothing else
//!   (`\n.\n`, `\r.\r\n`, …) ever ends a message;
//! - the stored content, dot-stuffed with `stuff` as it is when relayed, is received by a fresh
//!   receiver whole: the end marker is found exactly at its end and the content comes back
//!   unchanged (for content that ends with CRLF or is empty: `stuff` adds a final CRLF).

#![no_main]

use estafeta_proto::data::{DataReceiver, DataStatus, stuff};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 1 << 20;

/// Feeds `chunks` in turn; the end position is counted from the start of the first chunk.
fn receive(chunks: &[&[u8]]) -> (Vec<u8>, DataStatus, DataReceiver) {
    let mut r = DataReceiver::new(LIMIT);
    let mut out = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        if let DataStatus::Done(n) = r.feed(chunk, &mut out) {
            assert!(
                n <= chunk.len(),
                "Done({n}) past a chunk of {} bytes",
                chunk.len()
            );
            return (out, DataStatus::Done(offset + n), r);
        }
        offset += chunk.len();
    }
    (out, DataStatus::More, r)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    // 0 → split before the first byte, 255 → after the last one.
    let split = first as usize * input.len() / 255;
    let (whole, end, receiver) = receive(&[input]);
    let (halves, end_halves, receiver_halves) = receive(&[&input[..split], &input[split..]]);
    assert_eq!(whole, halves, "content differs when split at {split}");
    assert_eq!(end, end_halves, "end differs when split at {split}");
    assert_eq!(receiver.size(), receiver_halves.size());
    assert_eq!(receiver.overflowed(), receiver_halves.overflowed());

    if let DataStatus::Done(n) = end {
        let seen = &input[..n];
        assert!(
            seen == b".\r\n" || seen.ends_with(b"\r\n.\r\n"),
            "the message ended after {n} bytes that do not end with CRLF.CRLF: {:?}",
            String::from_utf8_lossy(&seen[n.saturating_sub(8)..])
        );
    }

    if !receiver.overflowed() && (whole.is_empty() || whole.ends_with(b"\r\n")) {
        let mut wire = Vec::new();
        stuff(&whole, &mut wire);
        let (back, end_back, _) = receive(&[&wire]);
        assert_eq!(
            end_back,
            DataStatus::Done(wire.len()),
            "stuffed content ends early or late"
        );
        assert_eq!(back, whole, "stuffed content does not come back unchanged");
    }
});
