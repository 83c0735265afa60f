//! `parse_command` on arbitrary bytes: it must never panic.
//!
//! And what the spool relies on: a path that was accepted in `MAIL FROM` or `RCPT TO` is
//! written into the queue file as `<path>` (its `Display` form) and parsed again when the
//! spool is loaded, so that form must parse back to the same address.

#![no_main]

use estafeta_proto::Command;
use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::command::parse_command;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = parse_command(data) else {
        return;
    };
    match cmd {
        Command::Mail(from, _) => {
            let wire = format!("<{from}>");
            let (back, rest) = parse_reverse_path(&wire)
                .unwrap_or_else(|e| panic!("MAIL FROM path {wire:?} does not parse back: {e:?}"));
            assert_eq!(
                back, from,
                "MAIL FROM path {wire:?} parses to another address"
            );
            assert_eq!(rest, "", "{wire:?}");
        }
        Command::Rcpt(path, _) => {
            let wire = format!("<{path}>");
            let (back, rest) = parse_forward_path(&wire)
                .unwrap_or_else(|e| panic!("RCPT TO path {wire:?} does not parse back: {e:?}"));
            // The source route is dropped on purpose (RFC 5321 §4.1.1.3); the rest must hold.
            assert_eq!(back.mailbox, path.mailbox, "RCPT TO path {wire:?}");
            assert_eq!(back.bare_postmaster, path.bare_postmaster, "{wire:?}");
            assert_eq!(rest, "", "{wire:?}");
        }
        _ => {}
    }
});
