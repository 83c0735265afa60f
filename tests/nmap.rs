//! nmap's SMTP scripts as the judge (issue: relay policy): run against the real binary on
//! loopback. Skipped, with a note, when nmap is not installed (.ci/run installs it).

use std::path::Path;
use std::process::Command;

use estafeta_e2e::{Process, free_port};

fn config(dir: &Path, port: u16, relay: &str) -> std::path::PathBuf {
    let path = dir.join(format!("estafeta-{port}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"hostname = "mx.test.example"
data_dir = "{data}"
run_as_root = true

[[listener]]
kind = "smtp"
address = "127.0.0.1:{port}"

[relay]
{relay}

[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
"#,
            data = dir.join(format!("data-{port}")).display()
        ),
    )
    .unwrap();
    path
}

/// `nmap -sV` identifies the port as SMTP from the banner, so the scripts run on a high port.
fn nmap(port: u16, script: &str, args: &str) -> String {
    let out = Command::new("nmap")
        .args(["-Pn", "-sV", "--version-light", "-p", &port.to_string()])
        .args(["--script", script])
        .args(["--script-args", args])
        .arg("127.0.0.1")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nmap_judges_relay_and_enumeration() {
    if Command::new("nmap").arg("--version").output().is_err() {
        estafeta_e2e::skip("nmap not found: skipped (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Closed: the scanning client (127.0.0.1) is outside mynetworks.
    let closed = free_port();
    let p1 = Process::serve(
        &config(dir.path(), closed, "mynetworks = []"),
        format!("127.0.0.1:{closed}").parse().unwrap(),
        &dir.path().join("closed.log"),
    );
    // Open, explicitly allowed: nmap must say so.
    let open = free_port();
    let _p2 = Process::serve(
        &config(
            dir.path(),
            open,
            "mynetworks = [\"0.0.0.0/0\"]\nallow_open_relay = true",
        ),
        format!("127.0.0.1:{open}").parse().unwrap(),
        &dir.path().join("open.log"),
    );
    let out = nmap(
        closed,
        "smtp-open-relay",
        "smtp-open-relay.domain=example.test",
    );
    assert!(
        out.contains("Server doesn't seem to be an open relay, all tests failed"),
        "{out}\n{}",
        p1.log_text()
    );
    let out = nmap(
        open,
        "smtp-open-relay",
        "smtp-open-relay.domain=example.test",
    );
    assert!(out.contains("Server is an open relay"), "{out}");
    // VRFY and EXPN reveal no user in the default configuration.
    let out = nmap(
        closed,
        "smtp-enum-users",
        "smtp-enum-users.domain=example.test,smtp-enum-users.methods={VRFY,EXPN}",
    );
    assert!(out.contains("Couldn't find any accounts"), "{out}");
    // Its RCPT method is slowed down after 5 unknown recipients.
    let _ = nmap(
        closed,
        "smtp-enum-users",
        "smtp-enum-users.domain=example.test,smtp-enum-users.methods={RCPT}",
    );
    assert!(
        p1.log_text().contains("slowing down recipient probing"),
        "{}",
        p1.log_text()
    );
}

/// nmap's smtp-vuln-* scripts (Exim and Postfix flaws of their kind) find nothing, and
/// smtp-commands lists the EHLO keywords a scanner from outside sees (no AUTH in plaintext).
#[test]
fn nmap_vulnerability_scripts_find_nothing() {
    if Command::new("nmap").arg("--version").output().is_err() {
        estafeta_e2e::skip("nmap not found: skipped (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let p = Process::serve(
        &config(dir.path(), port, "mynetworks = []"),
        format!("127.0.0.1:{port}").parse().unwrap(),
        &dir.path().join("vuln.log"),
    );
    let out = nmap(
        port,
        "smtp-commands,smtp-vuln-cve2010-4344,smtp-vuln-cve2011-1720,smtp-vuln-cve2011-1764",
        "smtp.domain=example.test",
    );
    assert!(out.contains("smtp-commands"), "{out}");
    assert!(out.contains("STARTTLS"), "{out}");
    assert!(
        !out.contains("AUTH"),
        "AUTH offered in plaintext to a remote scanner: {out}"
    );
    for l in out.lines() {
        assert!(
            !l.contains("VULNERABLE") || l.contains("NOT VULNERABLE"),
            "{l}\n{out}"
        );
    }
    // The server is still there.
    let mut c = estafeta_e2e::Client::connect(format!("127.0.0.1:{port}").parse().unwrap());
    assert!(c.last().starts_with("220 "), "{}", p.log_text());
}
