//! Every example in `config/` is valid, and injecting an unknown key into any of its tables is
//! reported as an unknown key at the right place.

use std::fs;
use std::path::{Path, PathBuf};

use estafeta_config::{Config, ListenerKind, Mailboxes};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("config/ exists")
        .map(|e| e.expect("readable directory").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
}

#[test]
fn every_example_parses() {
    for file in examples() {
        if let Err(errors) = Config::from_file(&file) {
            panic!("{} is invalid:\n{errors}", file.display());
        }
    }
}

#[test]
fn the_annotated_example_means_what_it_says() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/estafeta.toml");
    let config = Config::from_file(&file).expect("valid");
    assert_eq!(config.source.as_deref(), Some(file.as_path()));
    assert_eq!(config.hostname, "mail.example.org");
    assert_eq!(config.listeners.len(), 3);
    assert_eq!(config.listeners[1].kind, ListenerKind::Submission);
    assert!(config.listeners[1].sender_check);
    assert!(!config.listeners[0].sender_check);
    assert_eq!(config.limits.max_message_size, 26_214_400);
    assert_eq!(config.domains[0].name, "example.org");
    assert_eq!(
        config.domains[0].mailboxes,
        Mailboxes::List(vec!["alice".into(), "bob".into()])
    );
    assert_eq!(config.domains[1].mailboxes, Mailboxes::Users);
    assert_eq!(
        config.domains[0].aliases["team"],
        ["alice", "bob", "carol@elsewhere.example"]
    );
    assert_eq!(config.delivery.maildir, "/var/mail/{domain}/{user}/Maildir");
}

/// Tables whose keys are names chosen by the user (any key is valid there).
const FREE_FORM: &[&str] = &["relay.routes", "relay.tls_policy", "aliases"];

/// Every table of `table`, as (display path, path of keys and indices).
fn tables(
    table: &toml::Table,
    path: &mut Vec<Step>,
    display: String,
    out: &mut Vec<(String, Vec<Step>)>,
) {
    out.push((display.clone(), path.clone()));
    for (key, value) in table {
        let child = if display.is_empty() {
            key.clone()
        } else {
            format!("{display}.{key}")
        };
        match value {
            toml::Value::Table(t) => {
                if FREE_FORM
                    .iter()
                    .any(|f| child == *f || child.ends_with(&format!(".{f}")))
                {
                    continue;
                }
                path.push(Step::Key(key.clone()));
                tables(t, path, child, out);
                path.pop();
            }
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        path.push(Step::Key(key.clone()));
                        path.push(Step::Index(i));
                        tables(t, path, format!("{child}[{i}]"), out);
                        path.pop();
                        path.pop();
                    }
                }
            }
            _ => {}
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn table_at<'a>(root: &'a mut toml::Table, path: &[Step]) -> &'a mut toml::Table {
    let mut value_path = path.iter();
    let mut table = root;
    while let Some(step) = value_path.next() {
        let Step::Key(key) = step else { unreachable!() };
        let value = table.get_mut(key).expect("path exists");
        table = match value {
            toml::Value::Table(t) => t,
            toml::Value::Array(items) => {
                let Some(Step::Index(i)) = value_path.next() else {
                    unreachable!()
                };
                items[*i].as_table_mut().expect("array of tables")
            }
            _ => unreachable!(),
        };
    }
    table
}

#[test]
fn an_unknown_key_in_any_table_is_reported() {
    for file in examples() {
        let text = fs::read_to_string(&file).expect("readable");
        let root: toml::Table = toml::from_str(&text).expect("valid TOML");
        let mut all = Vec::new();
        tables(&root, &mut Vec::new(), String::new(), &mut all);
        assert!(all.len() > 10, "expected many tables in {}", file.display());
        for (display, path) in all {
            let mut broken = root.clone();
            table_at(&mut broken, &path).insert("no_such_key".into(), toml::Value::Integer(1));
            let broken_text = toml::to_string(&broken).expect("serializable");
            let errors = Config::parse(&broken_text, Path::new("injected.toml"))
                .expect_err(&format!("an unknown key in [{display}] must be rejected"));
            let expected_key = if display.is_empty() {
                "no_such_key".to_owned()
            } else {
                format!("{display}.no_such_key")
            };
            assert_eq!(errors.len(), 1, "[{display}]: {errors}");
            let error = &errors.0[0];
            assert_eq!(error.key, expected_key, "{errors}");
            assert_eq!(error.message, "unknown key", "{errors}");
            assert!(
                error
                    .help
                    .as_deref()
                    .is_some_and(|h| h.contains("expected one of: ")),
                "{errors}"
            );
            assert!(error.line > 0 && error.column > 0, "{errors}");
        }
    }
}

/// The keys a table accepts, as the parser lists them when it meets an unknown one.
fn accepted_keys(root: &toml::Table, path: &[Step]) -> Vec<String> {
    let mut broken = root.clone();
    table_at(&mut broken, path).insert("no_such_key".into(), toml::Value::Integer(1));
    let text = toml::to_string(&broken).expect("serializable");
    let errors = Config::parse(&text, Path::new("injected.toml")).expect_err("unknown key");
    let help = errors.0[0].help.clone().unwrap_or_default();
    let list = help
        .split("expected one of: ")
        .nth(1)
        .expect("the help lists the keys");
    list.split(", ").map(|k| k.trim().to_string()).collect()
}

/// docs/configuration.md documents every key the parser accepts: a new key without a line
/// in its table fails here.
#[test]
fn every_key_is_documented() {
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let docs = fs::read_to_string(root_dir.join("docs/configuration.md")).expect("docs");
    let text = fs::read_to_string(root_dir.join("config/estafeta.toml")).expect("example");
    let root: toml::Table = toml::from_str(&text).expect("valid TOML");
    let mut all = Vec::new();
    tables(&root, &mut Vec::new(), String::new(), &mut all);
    let mut missing = Vec::new();
    for (display, path) in all {
        // "listener[0]" → "listener"; arrays of tables are written [[name]] in the docs.
        let name: String = display.split('[').next().unwrap_or("").to_string();
        let is_array = display.contains('[');
        for key in accepted_keys(&root, &path) {
            let documented = if name.is_empty() {
                docs.contains(&format!("`{key}`"))
                    || docs.contains(&format!("`[{key}]"))
                    || docs.contains(&format!("`[[{key}]]"))
            } else {
                let head = if is_array {
                    format!("[[{name}]]")
                } else {
                    format!("[{name}]")
                };
                docs.contains(&format!("`{head} {key}`"))
                    || docs.lines().any(|l| {
                        l.starts_with(&format!("| `{head} ")) && l.contains(&format!("`{key}`"))
                    })
                    || docs.contains(&format!("`[{name}.{key}]`"))
            };
            if !documented {
                missing.push(if name.is_empty() {
                    key
                } else {
                    format!("{name}.{key}")
                });
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "keys missing from docs/configuration.md: {missing:?}"
    );
}
