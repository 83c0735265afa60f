//! Reading a file: TOML syntax, then the serde structs, then validation, collecting every error
//! found along the way.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::de::{DeTable, Deserializer};

use crate::error::{ConfigError, ConfigErrors, Reporter};
use crate::raw::RawConfig;
use crate::tree;
use crate::types::Config;
use crate::validate::validate;

/// Stops deserialization retries after this many errors (a file that bad needs no more).
const MAX_DESERIALIZE_ERRORS: usize = 100;

pub(crate) fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the configuration file: {e}"),
            help: match e.kind() {
                std::io::ErrorKind::NotFound => Some(
                    "check the path, or run without --config to use the embedded development default"
                        .to_owned(),
                ),
                std::io::ErrorKind::InvalidData => {
                    Some("the file must be UTF-8 text".to_owned())
                }
                _ => None,
            },
        }])
    })?;
    parse(&text, path)
}

pub(crate) fn parse(text: &str, origin: &Path) -> Result<Config, ConfigErrors> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        // The recovered document still names the key of most syntax errors.
        let recovered = root.into_inner();
        let mut r = Reporter::new(origin, text, Some(&recovered));
        let mut lines_seen = Vec::new();
        for e in syntax_errors {
            let span = e.span().unwrap_or(0..0);
            // One error per line: recovery after the first error often produces echoes.
            let (line, _) = r.position(span.start);
            if lines_seen.contains(&line) {
                continue;
            }
            lines_seen.push(line);
            let line_text = text[..span.start.min(text.len())]
                .rsplit('\n')
                .next()
                .unwrap_or("");
            let in_header = line_text.trim_start().starts_with('[');
            let spanned_text = text.get(span.clone()).unwrap_or("");
            let (message, help) = syntax_message(e.message(), spanned_text, in_header);
            let key = r.key_at(&span);
            r.error(span, key, message, help);
        }
        return Err(ConfigErrors(r.finish()));
    }
    let root = root.into_inner();
    let mut r = Reporter::new(origin, text, Some(&root));

    // Deserialize; on an error, report it, drop the offending entry and try again.
    let mut work = root.clone();
    let mut tainted: Vec<String> = Vec::new();
    // Tables with an unknown key: a "missing key" there is most likely the same typo.
    let mut misspelled_in: Vec<String> = Vec::new();
    let raw = loop {
        let deserializer = Deserializer::from(toml::Spanned::new(0..text.len(), work.clone()));
        match RawConfig::deserialize(deserializer) {
            Ok(raw) => break raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let key = r.key_at(&span);
                let message = e.message();
                if message.starts_with("unknown field ") {
                    misspelled_in.push(key.rsplit_once('.').map_or("", |(t, _)| t).to_owned());
                }
                if !(message.starts_with("missing field ") && misspelled_in.contains(&key)) {
                    report_serde_error(&mut r, span.clone(), &key, message);
                }
                tainted.push(key);
                if r.len() >= MAX_DESERIALIZE_ERRORS || !tree::remove(&mut work, &span) {
                    return Err(ConfigErrors(r.finish()));
                }
            }
        }
    };
    let serde_errors = r.len();
    let config = validate(raw, origin, &mut r);
    // Keys dropped above fell back to defaults; checks that involve them would only confuse.
    r.suppress_under(serde_errors, &tainted);
    if r.has_errors() {
        Err(ConfigErrors(r.finish()))
    } else {
        Ok(config)
    }
}

/// Turns a TOML parser message into a message and a help line. `spanned` is the text the error
/// points at; `in_header` says whether it is on a `[table]` header line.
fn syntax_message(message: &str, spanned: &str, in_header: bool) -> (String, Option<String>) {
    let message = message.trim();
    if message.starts_with("duplicate key") {
        return if in_header {
            (
                format!("TOML syntax error: table [{spanned}] is defined twice"),
                Some("merge the two sections; use [[name]] only for repeatable sections like [[listener]] and [[domain]]".to_owned()),
            )
        } else {
            (
                format!("TOML syntax error: duplicate key {spanned:?}"),
                Some("each key may appear once per table; remove one of them".to_owned()),
            )
        };
    }
    let help = if message.contains("string") {
        "strings are written in double quotes on one line: key = \"value\""
    } else {
        "values are written like key = \"text\", key = 10, key = true or key = [\"a\", \"b\"]; see https://toml.io"
    };
    (
        format!("TOML syntax error: {message}"),
        Some(help.to_owned()),
    )
}

/// Reports one serde error, rewritten in the words of the configuration file.
fn report_serde_error(r: &mut Reporter<'_>, span: Range<usize>, key: &str, message: &str) {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (field, expected) = split_backticked(rest);
        let help = if expected.is_empty() {
            "this table has no keys".to_owned()
        } else {
            let suggestion = closest(&field, &expected)
                .map(|s| format!("did you mean {s}? "))
                .unwrap_or_default();
            format!("{suggestion}expected one of: {}", expected.join(", "))
        };
        r.error(span, key, "unknown key", Some(help));
    } else if let Some(rest) = message.strip_prefix("missing field ") {
        let (field, _) = split_backticked(rest);
        let full_key = if key.is_empty() {
            field.clone()
        } else {
            format!("{key}.{field}")
        };
        let help = match field.as_str() {
            "kind" => "add kind = \"smtp\" (or \"submission\", \"submissions\")".to_owned(),
            "address" => "add address = \"[::]:25\" (or a list of addresses)".to_owned(),
            "name" => "add name = \"example.org\"".to_owned(),
            _ => format!("add {field} = …"),
        };
        r.error(span, full_key, "missing key", Some(help));
    } else if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, "?"));
        let expected = describe_expected(expected);
        let help = if (key == "listener" || key == "domain") && expected == "a list" {
            Some(format!(
                "write [[{key}]] with double brackets: the section is repeatable"
            ))
        } else {
            type_help(found, &expected)
        };
        r.error(
            span,
            key,
            format!("expected {expected}, found {}", describe_found(found)),
            help,
        );
    } else if let Some(rest) = message.strip_prefix("invalid value: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, "?"));
        let expected = describe_expected(expected);
        let found = describe_found(found);
        let found = found.strip_prefix("the number ").unwrap_or(&found);
        r.error(
            span,
            key,
            format!("invalid value {found}"),
            Some(format!("use {expected}")),
        );
    } else {
        r.error(span, key, message.to_owned(), None);
    }
}

/// From "`name`, expected one of `a`, `b`" the name and the expected names.
fn split_backticked(text: &str) -> (String, Vec<String>) {
    let mut names: Vec<String> = text
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return (String::new(), names);
    }
    let first = names.remove(0);
    (first, names)
}

/// The expected key closest to an unknown one, if it is close enough to be a typo.
fn closest<'a>(field: &str, expected: &'a [String]) -> Option<&'a String> {
    expected
        .iter()
        .map(|e| (edit_distance(field, e), e))
        .filter(|(d, e)| *d <= 2.max(e.len() / 4) && *d < e.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, e)| e)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// serde's name for what it expected, in configuration words.
fn describe_expected(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => match expected {
            "u32" => "a whole number from 0 to 4294967295".to_owned(),
            _ => "a whole number (0 or more)".to_owned(),
        },
        "a sequence" => "a list".to_owned(),
        "a map" => "a table".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a string" => "a string".to_owned(),
        s if s.starts_with("struct ") => "a table".to_owned(),
        s => s.to_owned(),
    }
}

/// serde's description of a value, in configuration words.
fn describe_found(found: &str) -> String {
    let inner = |s: &str| s.trim_matches('`').to_owned();
    if let Some(s) = found.strip_prefix("string ") {
        format!("the string {s}")
    } else if let Some(s) = found.strip_prefix("integer ") {
        format!("the number {}", inner(s))
    } else if let Some(s) = found.strip_prefix("floating point ") {
        format!("the number {}", inner(s))
    } else if let Some(s) = found.strip_prefix("boolean ") {
        inner(s)
    } else {
        match found {
            "sequence" => "a list".to_owned(),
            "map" => "a table".to_owned(),
            other => other.to_owned(),
        }
    }
}

/// A hint for a value of the wrong type.
fn type_help(found: &str, expected: &str) -> Option<String> {
    let quoted = found
        .strip_prefix("string \"")
        .and_then(|s| s.strip_suffix('"'));
    if let Some(text) = quoted {
        if expected.starts_with("a whole number") && text.parse::<u64>().is_ok() {
            return Some(format!("remove the quotes: {text}"));
        }
        if expected == "true or false" && (text == "true" || text == "false") {
            return Some(format!("remove the quotes: {text}"));
        }
    }
    if found.starts_with("floating point") && expected.starts_with("a whole number") {
        return Some("use a whole number".to_owned());
    }
    match expected {
        "true or false" => Some("write true or false, without quotes".to_owned()),
        s if s.starts_with("a whole number") => {
            Some("write a whole number without quotes, e.g. 10".to_owned())
        }
        "a table" => Some(
            "this key is a section: write it as a [table] header with keys below it".to_owned(),
        ),
        "a list" => Some("write a list in brackets: [\"a\", \"b\"]".to_owned()),
        "a string" | "a string or a list of strings" => {
            Some("write the value in double quotes".to_owned())
        }
        s if s.starts_with("a size") => Some(crate::size::SIZE_HELP.to_owned()),
        s if s.starts_with("a duration") => Some(crate::duration::DURATION_HELP.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backticked_names() {
        let (field, expected) =
            split_backticked("`mynetwork`, expected one of `mynetworks`, `allow_open_relay`");
        assert_eq!(field, "mynetwork");
        assert_eq!(expected, ["mynetworks", "allow_open_relay"]);
        let (field, expected) = split_backticked("`x`, there are no fields");
        assert_eq!(field, "x");
        assert!(expected.is_empty());
    }

    #[test]
    fn typo_suggestions() {
        let expected = vec![
            "mynetworks".to_owned(),
            "allow_open_relay".to_owned(),
            "routes".to_owned(),
        ];
        assert_eq!(
            closest("mynetwork", &expected).map(String::as_str),
            Some("mynetworks")
        );
        assert_eq!(
            closest("rout", &expected).map(String::as_str),
            Some("routes")
        );
        assert_eq!(closest("zzz", &expected), None);
    }
}
