//! `estafeta user add|passwd|del|list` through the built binary, against a users file in a
//! temporary directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    users: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let config = dir.path().join("estafeta.toml");
    fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[auth]\nusers_file = {:?}\n",
            dir.path().display().to_string(),
            users.display().to_string()
        ),
    )
    .unwrap();
    Setup {
        _dir: dir,
        config,
        users,
    }
}

fn estafeta(args: &[&str], config: &Path, stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_estafeta"))
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        // The command may exit without reading (e.g. an invalid address): ignore a broken pipe.
        let _ = input.write_all(text.as_bytes());
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The users file's lines as (address, hash).
fn entries(users: &Path) -> Vec<(String, String)> {
    fs::read_to_string(users)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (a, h) = l.split_once(':').unwrap();
            (a.to_string(), h.to_string())
        })
        .collect()
}

#[test]
fn the_config_parses() {
    let s = setup();
    let out = Command::new(env!("CARGO_BIN_EXE_estafeta"))
        .arg("check-config")
        .arg(&s.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn add_list_passwd_del() {
    let s = setup();

    // add: the file is created, mode 0600, with an argon2id hash and no password in clear.
    let out = estafeta(
        &["user", "add", "A@Example.test", "--password-stdin"],
        &s.config,
        Some("first password\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("added a@example.test to {}\n", s.users.display())
    );
    let mode = fs::metadata(&s.users).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let file = fs::read_to_string(&s.users).unwrap();
    assert!(!file.contains("first password"));
    let first = entries(&s.users);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, "a@example.test");
    assert!(first[0].1.starts_with("$argon2id$v=19$"), "{}", first[0].1);
    assert!(estafeta_auth::verify_password(
        &first[0].1,
        "first password"
    ));
    // Nothing secret on the output.
    assert!(!text(&out.stdout).contains("argon2"));

    // add twice: refused, file unchanged.
    let out = estafeta(
        &["user", "add", "a@example.test", "--password-stdin"],
        &s.config,
        Some("other password\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(entries(&s.users), first);

    // A comment written by the sysadmin survives the edits.
    let mut with_comment = String::from("# mail users\n");
    with_comment.push_str(&fs::read_to_string(&s.users).unwrap());
    fs::write(&s.users, &with_comment).unwrap();

    let out = estafeta(
        &["user", "add", "b@example.test", "--password-stdin"],
        &s.config,
        Some("second password\r\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // list: one address a line.
    let out = estafeta(&["user", "list"], &s.config, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "a@example.test\nb@example.test\n");

    // passwd: a new hash for a, b untouched.
    let before = entries(&s.users);
    let out = estafeta(
        &["user", "passwd", "a@example.test", "--password-stdin"],
        &s.config,
        Some("new password\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "changed the password of a@example.test in {}\n",
            s.users.display()
        )
    );
    let after = entries(&s.users);
    assert_ne!(after[0].1, before[0].1);
    assert!(estafeta_auth::verify_password(&after[0].1, "new password"));
    assert_eq!(after[1], before[1]);
    assert!(
        fs::read_to_string(&s.users)
            .unwrap()
            .starts_with("# mail users\n")
    );

    // A password shorter than 8 characters: refused, nothing changed.
    let out = estafeta(
        &["user", "passwd", "a@example.test", "--password-stdin"],
        &s.config,
        Some("2short\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("at least 8 characters"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(entries(&s.users), after);

    // passwd of an unknown user, an empty password, no terminal: refused.
    let out = estafeta(
        &["user", "passwd", "nobody@example.test", "--password-stdin"],
        &s.config,
        Some("x\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    let out = estafeta(
        &["user", "passwd", "a@example.test", "--password-stdin"],
        &s.config,
        Some("\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("empty password"),
        "{}",
        text(&out.stderr)
    );
    // No terminal (a new session has no controlling terminal) and no --password-stdin.
    let mut command = Command::new(env!("CARGO_BIN_EXE_estafeta"));
    command
        .args(["user", "add", "c@example.test", "--config"])
        .arg(&s.config)
        .stdin(Stdio::null());
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no terminal"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(entries(&s.users), after);

    // An invalid address.
    let out = estafeta(
        &["user", "add", "no-at-sign", "--password-stdin"],
        &s.config,
        Some("x\n"),
    );
    assert_eq!(out.status.code(), Some(1));

    // del.
    let out = estafeta(&["user", "del", "A@EXAMPLE.TEST"], &s.config, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("deleted a@example.test from {}\n", s.users.display())
    );
    assert_eq!(entries(&s.users), vec![after[1].clone()]);
    let out = estafeta(&["user", "del", "a@example.test"], &s.config, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no user a@example.test"),
        "{}",
        text(&out.stderr)
    );

    let out = estafeta(&["user", "list"], &s.config, None);
    assert_eq!(text(&out.stdout), "b@example.test\n");
    let mode = fs::metadata(&s.users).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn list_without_a_users_file_is_empty() {
    let s = setup();
    let out = estafeta(&["user", "list"], &s.config, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
}
