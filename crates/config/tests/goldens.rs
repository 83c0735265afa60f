//! Golden tests: each `bad/NAME.toml` must fail with exactly the errors in `bad/NAME.err`.
//!
//! The file is parsed with its bare file name as origin, so the expected output does not depend
//! on where the repository is checked out. Run with `UPDATE_GOLDENS=1` to rewrite the `.err`
//! files after an intended change, and review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use estafeta_config::Config;

fn bad_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad")
}

#[test]
fn bad_configs_produce_the_expected_errors() {
    let update = std::env::var_os("UPDATE_GOLDENS").is_some_and(|v| v == "1");
    let mut cases: Vec<PathBuf> = fs::read_dir(bad_dir())
        .expect("tests/bad exists")
        .map(|e| e.expect("readable directory").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "expected at least 15 golden cases");

    let mut failures = Vec::new();
    for case in &cases {
        let text = fs::read_to_string(case).expect("readable case");
        let name = case.file_name().expect("file name");
        let actual = match Config::parse(&text, Path::new(name)) {
            Ok(_) => format!("(no error: {} was accepted)\n", name.to_string_lossy()),
            Err(errors) => format!("{errors}\n"),
        };
        let golden = case.with_extension("err");
        if update {
            fs::write(&golden, &actual).expect("writable golden");
            continue;
        }
        let expected = fs::read_to_string(&golden).unwrap_or_default();
        if expected != actual {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- actual\n{actual}",
                case.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden(s) differ (UPDATE_GOLDENS=1 rewrites them):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_golden_has_a_case() {
    for entry in fs::read_dir(bad_dir()).expect("tests/bad exists") {
        let path = entry.expect("readable directory").path();
        if path.extension().is_some_and(|e| e == "err") {
            assert!(
                path.with_extension("toml").exists(),
                "{} has no .toml beside it",
                path.display()
            );
        }
    }
}
