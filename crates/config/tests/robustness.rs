//! The loader never panics and always explains itself, whatever the input: every prefix of the
//! example and the example with any one line removed or doubled.

use std::path::Path;

use estafeta_config::Config;

fn check(text: &str) {
    if let Err(errors) = Config::parse(text, Path::new("x.toml")) {
        assert!(!errors.is_empty());
        for e in errors.iter() {
            assert!(!e.message.is_empty(), "{e}");
            assert!(e.line > 0 && e.column > 0, "{e}");
        }
    }
}

#[test]
fn mangled_examples_do_not_panic() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/estafeta.toml");
    let text = std::fs::read_to_string(file).expect("readable");
    for (i, _) in text.char_indices() {
        check(&text[..i]);
    }
    let lines: Vec<&str> = text.lines().collect();
    for i in 0..lines.len() {
        let mut without = lines.clone();
        without.remove(i);
        check(&without.join("\n"));
        let mut doubled = lines.clone();
        doubled.insert(i, lines[i]);
        check(&doubled.join("\n"));
        // Uncomment commented-out examples, and break values.
        let mut changed = lines.clone();
        let uncommented = lines[i].trim_start_matches("# ");
        changed[i] = uncommented;
        check(&changed.join("\n"));
        let broken = lines[i].replace('"', "");
        changed[i] = &broken;
        check(&changed.join("\n"));
    }
}
