//! The TLS of every listener judged by sslscan (a third-party scanner): STARTTLS on smtp and
//! implicit TLS on submissions offer TLS 1.2 and 1.3 only, ciphers of 128 bits or more with
//! forward secrecy, no renegotiation, nothing vulnerable to heartbleed.

use std::net::SocketAddr;
use std::process::Command;

use estafeta_e2e::{Process, free_port, test_config};

#[test]
fn sslscan_finds_only_modern_tls() {
    if Command::new("sslscan").arg("--version").output().is_err() {
        estafeta_e2e::skip("sslscan is not installed (Debian sslscan)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (smtp, smtps) = (free_port(), free_port());
    let extra = format!("[[listener]]\nkind = \"submissions\"\naddress = \"127.0.0.1:{smtps}\"\n");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, test_config(&dir.path().join("data"), smtp, &extra)).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{smtp}").parse().unwrap();
    let _server = Process::serve(&config, addr, &dir.path().join("log"));
    for args in [
        vec!["--starttls-smtp".to_string(), format!("127.0.0.1:{smtp}")],
        vec![format!("127.0.0.1:{smtps}")],
    ] {
        let out = Command::new("sslscan")
            .arg("--no-colour")
            .args(&args)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        for (protocol, state) in [
            ("SSLv2", "disabled"),
            ("SSLv3", "disabled"),
            ("TLSv1.0", "disabled"),
            ("TLSv1.1", "disabled"),
            ("TLSv1.2", "enabled"),
            ("TLSv1.3", "enabled"),
        ] {
            let line = report
                .lines()
                .find(|l| l.starts_with(&format!("{protocol} ")))
                .unwrap_or_else(|| panic!("{args:?}: no {protocol} line: {report}"));
            assert!(line.ends_with(state), "{args:?}: {line}\n{report}");
        }
        assert!(
            report.contains("Session renegotiation not supported"),
            "{report}"
        );
        for l in report.lines().filter(|l| l.contains("heartbleed")) {
            assert!(l.contains("not vulnerable"), "{args:?}: {l}");
        }
        let ciphers: Vec<&str> = report
            .lines()
            .filter(|l| l.starts_with("Preferred ") || l.starts_with("Accepted "))
            .collect();
        assert!(!ciphers.is_empty(), "{report}");
        for c in ciphers {
            let fields: Vec<&str> = c.split_whitespace().collect();
            let bits: u32 = fields[2].parse().unwrap();
            let name = fields[4];
            assert!(bits >= 128, "{args:?}: weak cipher {c}");
            assert!(
                name.starts_with("TLS_") || name.starts_with("ECDHE-"),
                "{args:?}: a cipher without forward secrecy: {c}"
            );
            for weak in ["RC4", "3DES", "DES-", "NULL", "EXP", "MD5", "CBC"] {
                assert!(!name.contains(weak), "{args:?}: {c}");
            }
        }
    }
}
