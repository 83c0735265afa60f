//! The configuration loader on arbitrary text: `Config::parse` must never panic, and every
//! refusal explains itself (as `crates/config/tests/robustness.rs` checks on mangled
//! examples): at least one error, each with a message and a line and column from 1, and the
//! whole report prints.
//!
//! The input is read as UTF-8, invalid sequences replaced (the loader reads a file with
//! `read_to_string`, which refuses invalid UTF-8 before the parser sees it).

#![no_main]

use std::path::Path;

use estafeta_config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, Path::new("fuzz.toml")) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "refused without an error");
            for e in errors.iter() {
                assert!(!e.message.is_empty(), "an error without a message: {e:?}");
                assert!(
                    e.line > 0 && e.column > 0,
                    "an error without a place: {e:?}"
                );
            }
            let _ = errors.to_string();
        }
    }
});
