//! The shipped systemd files (systemd/) as systemd itself judges them: `systemd-analyze verify`
//! finds nothing to warn about, `systemd-analyze security` rates the service's sandbox "OK" or
//! better (exposure ≤ 2.5), the socket units pass the names estafeta knows its listener kinds
//! by, and sysusers.d + tmpfiles.d create the user and directories with the intended modes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use estafeta_e2e::estafeta_bin;

/// The highest exposure level accepted for estafeta.service (systemd rates ≤ 2.5 "OK").
const MAX_EXPOSURE: f64 = 2.5;

/// The path the shipped units run the binary from.
const INSTALLED_BIN: &str = "/usr/local/bin/estafeta";

const SOCKETS: [(&str, &str); 3] = [
    ("estafeta-smtp.socket", "smtp"),
    ("estafeta-submission.socket", "submission"),
    ("estafeta-submissions.socket", "submissions"),
];

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// Runs a tool; `None` when it is not installed.
fn run(program: &str, args: &[&str]) -> Option<Output> {
    match Command::new(program).args(args).output() {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("{program}: {e}"),
    }
}

fn have(program: &str) -> bool {
    run(program, &["--version"]).is_some_and(|o| o.status.success())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The shipped units copied into a temporary directory, with the binary path pointing at the
/// freshly built binary: `verify` checks that every Exec*= command exists and is executable.
fn units_with_built_binary() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let bin = estafeta_bin();
    let mut paths = Vec::new();
    for name in std::iter::once("estafeta.service").chain(SOCKETS.iter().map(|(n, _)| *n)) {
        let text = std::fs::read_to_string(systemd_dir().join(name))
            .unwrap_or_else(|e| panic!("systemd/{name}: {e}"));
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace(INSTALLED_BIN, bin.to_str().unwrap())).unwrap();
        paths.push(path);
    }
    (dir, paths)
}

/// Lines that describe the machine the test runs on (a container without systemd as PID 1),
/// not the units.
fn is_environment_noise(line: &str) -> bool {
    line.trim().is_empty()
        || line.contains("System has not been booted with systemd")
        || line.contains("Failed to connect to bus")
}

#[test]
fn systemd_analyze_verify_finds_nothing_to_warn_about() {
    if !have("systemd-analyze") {
        estafeta_e2e::skip("systemd-analyze not found (Debian: systemd)");
        return;
    }
    let (_dir, paths) = units_with_built_binary();
    let mut args = vec!["verify", "--man=no", "--generators=no"];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    let out = run("systemd-analyze", &args).unwrap();
    let all = text(&out);
    let warnings: Vec<&str> = all.lines().filter(|l| !is_environment_noise(l)).collect();
    assert!(
        out.status.success() && warnings.is_empty(),
        "systemd-analyze verify ({}):\n{all}",
        out.status
    );

    // The check is a real one: a unit with a typo is reported, and through the same filter.
    let typo = paths[0].with_file_name("typo.service");
    std::fs::write(
        &typo,
        std::fs::read_to_string(&paths[0])
            .unwrap()
            .replace("NotifyAccess=main", "NotifyAcess=main"),
    )
    .unwrap();
    let out = run(
        "systemd-analyze",
        &[
            "verify",
            "--man=no",
            "--generators=no",
            typo.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        text(&out)
            .lines()
            .any(|l| !is_environment_noise(l) && l.contains("NotifyAcess")),
        "a misspelt key went unnoticed:\n{}",
        text(&out)
    );
}

/// "→ Overall exposure level for estafeta.service: 1.4 OK 🙂" → 1.4.
fn exposure(report: &str) -> Option<(f64, String)> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    let mut words = rest.split_whitespace();
    let level = words.next()?.parse().ok()?;
    Some((level, words.next().unwrap_or_default().to_string()))
}

#[test]
fn the_service_sandbox_is_rated_ok_by_systemd_analyze_security() {
    if !have("systemd-analyze") {
        estafeta_e2e::skip("systemd-analyze not found (Debian: systemd)");
        return;
    }
    let (_dir, paths) = units_with_built_binary();
    let out = run(
        "systemd-analyze",
        &["security", "--offline=true", paths[0].to_str().unwrap()],
    )
    .unwrap();
    let report = text(&out);
    assert!(out.status.success(), "systemd-analyze security:\n{report}");
    let (level, rating) =
        exposure(&report).unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    println!("estafeta.service: overall exposure level {level} {rating}");
    assert!(
        level <= MAX_EXPOSURE,
        "exposure {level} {rating} is above {MAX_EXPOSURE}:\n{report}"
    );
    assert!(
        matches!(rating.as_str(), "OK" | "SAFE" | "PERFECT"),
        "rated {rating}:\n{report}"
    );
}

#[test]
fn exposure_is_read_from_the_report_line() {
    assert_eq!(
        exposure("x\n→ Overall exposure level for estafeta.service: 1.4 OK 🙂\n"),
        Some((1.4, "OK".to_string()))
    );
    assert_eq!(
        exposure("→ Overall exposure level for a.service: 9.6 UNSAFE 😨"),
        Some((9.6, "UNSAFE".to_string()))
    );
    assert_eq!(exposure("nothing here"), None);
}

/// `KEY=value` lines of a unit file (comments and section headers left out).
fn settings(unit: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(systemd_dir().join(unit)).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('[') && !l.is_empty())
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn values<'a>(s: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    s.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn the_units_keep_the_contract_with_the_server() {
    let service = settings("estafeta.service");
    let one = |key: &str| {
        let v = values(&service, key);
        assert_eq!(v.len(), 1, "{key}: {v:?}");
        v[0].to_string()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/estafeta serve --config /etc/estafeta/estafeta.toml"
    );
    assert_eq!(
        one("ExecStartPre"),
        "/usr/local/bin/estafeta check-config /etc/estafeta/estafeta.toml"
    );
    assert_eq!(
        one("ExecReload"),
        "/usr/local/bin/estafeta reload --config /etc/estafeta/estafeta.toml"
    );
    assert_eq!(one("RestartPreventExitStatus"), "78");
    // The sendmail socket's directory is open to every local user; data_dir is not.
    assert_eq!(one("RuntimeDirectory"), "estafeta");
    assert_eq!(one("RuntimeDirectoryMode"), "0755");
    assert_eq!(one("StateDirectoryMode"), "0700");
    assert_eq!(one("User"), "estafeta");
    // The server waits up to 30 s for deliveries in flight: systemd must wait longer.
    let stop = one("TimeoutStopSec");
    let stop: u64 = stop.trim_end_matches('s').parse().unwrap();
    assert!(stop > 30, "TimeoutStopSec={stop}");
    // Without socket units estafeta binds 25/465/587 itself.
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert!(
        values(&service, "IPAddressDeny").is_empty(),
        "a mail server talks to any address"
    );

    for (unit, name) in SOCKETS {
        let s = settings(unit);
        assert_eq!(values(&s, "FileDescriptorName"), [name], "{unit}");
        assert_eq!(values(&s, "Service"), ["estafeta.service"], "{unit}");
        assert!(
            values(&s, "PartOf").is_empty(),
            "{unit}: PartOf= would close the socket on every restart of the service"
        );
        assert!(!values(&s, "ListenStream").is_empty(), "{unit}");
    }
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_the_directories() {
    if !have("systemd-sysusers") || !have("systemd-tmpfiles") {
        estafeta_e2e::skip("systemd-sysusers/systemd-tmpfiles not found (Debian: systemd)");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let root_arg = format!("--root={}", root.path().display());
    let sysusers = systemd_dir().join("sysusers.d-estafeta.conf");
    let out = run("systemd-sysusers", &[&root_arg, sysusers.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "systemd-sysusers: {}", text(&out));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let entry: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("estafeta:"))
        .unwrap_or_else(|| panic!("no estafeta in passwd:\n{passwd}"))
        .split(':')
        .collect();
    let uid: u32 = entry[2].parse().unwrap();
    let gid: u32 = entry[3].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system user: {entry:?}");
    assert_eq!(entry[5], "/var/lib/estafeta");
    assert_eq!(entry[6], "/usr/sbin/nologin");

    let tmpfiles = systemd_dir().join("tmpfiles.d-estafeta.conf");
    let out = run(
        "systemd-tmpfiles",
        &[&root_arg, "--create", tmpfiles.to_str().unwrap()],
    )
    .unwrap();
    assert!(out.status.success(), "systemd-tmpfiles: {}", text(&out));
    for (path, mode, owner, group) in [
        ("var/lib/estafeta", 0o700, uid, gid),
        ("etc/estafeta", 0o750, 0, gid),
    ] {
        let m = std::fs::metadata(root.path().join(path)).unwrap();
        assert!(m.is_dir(), "{path}");
        assert_eq!(m.mode() & 0o7777, mode, "{path}: mode {:o}", m.mode());
        if nix_is_root() {
            assert_eq!((m.uid(), m.gid()), (owner, group), "{path}");
        }
    }
}

/// Only root can give files away: elsewhere tmpfiles creates them as the caller.
fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
