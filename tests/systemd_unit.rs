//! The shipped systemd files (systemd/) as systemd itself judges them: `systemd-analyze verify`
//! finds nothing to warn about, `systemd-analyze security` rates the service's sandbox "OK" or
//! better (exposure ≤ 2.5), the socket units pass the names estafeta knows its listener kinds
//! by, sysusers.d + tmpfiles.d create the user and directories with the intended modes, and
//! the real server, traced with strace, makes no system call the unit's filter would refuse.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::{estafeta_bin, free_port, maildir_new, submit, test_config};

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

/// The system calls the unit's `SystemCallFilter=` lines allow: the allow-lists' groups
/// expanded with `systemd-analyze syscall-filter`, minus the `~` deny-lists'.
fn allowed_syscalls(service: &[(String, String)]) -> BTreeSet<String> {
    let out = run("systemd-analyze", &["syscall-filter"]).unwrap();
    assert!(out.status.success(), "syscall-filter: {}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    let mut current = None;
    for line in listing.lines() {
        let item = line.trim();
        if line.starts_with('@') {
            current = Some(item.to_string());
            groups.entry(item.to_string()).or_default();
        } else if let Some(g) = &current
            && !item.is_empty()
            && !item.starts_with('#')
        {
            groups.get_mut(g).unwrap().push(item.to_string());
        }
    }
    fn expand(item: &str, groups: &HashMap<String, Vec<String>>, into: &mut BTreeSet<String>) {
        if item.starts_with('@') {
            for i in groups
                .get(item)
                .unwrap_or_else(|| panic!("unknown group {item}"))
            {
                expand(i, groups, into);
            }
        } else {
            into.insert(item.to_string());
        }
    }
    let (mut allow, mut deny) = (BTreeSet::new(), BTreeSet::new());
    for value in values(service, "SystemCallFilter") {
        let (list, items) = match value.strip_prefix('~') {
            Some(rest) => (&mut deny, rest),
            None => (&mut allow, value),
        };
        for item in items.split_whitespace() {
            expand(item, &groups, list);
        }
    }
    assert!(!allow.is_empty(), "no allow-list in SystemCallFilter=");
    allow.difference(&deny).cloned().collect()
}

/// Runs the real server under strace through a start, an SMTP delivery into Maildir, a
/// STARTTLS + AUTH session (wrong and right password), a control-socket request, SIGHUP and a
/// graceful stop, and checks every system call it made against the unit's
/// SystemCallFilter= (a call outside it fails with EPERM under systemd) and every socket
/// family against RestrictAddressFamilies=.
#[test]
fn the_server_makes_only_system_calls_the_unit_allows() {
    if !have("systemd-analyze") {
        estafeta_e2e::skip("systemd-analyze not found (Debian: systemd)");
        return;
    }
    if !have("strace") {
        estafeta_e2e::skip("strace not found (Debian: strace)");
        return;
    }
    if !have("python3") {
        estafeta_e2e::skip("python3 not found");
        return;
    }
    let service = settings("estafeta.service");
    let allowed = allowed_syscalls(&service);
    let families: Vec<String> = values(&service, "RestrictAddressFamilies")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (smtp, submission) = (free_port(), free_port());
    let config = dir.path().join("estafeta.toml");
    std::fs::write(
        &config,
        test_config(
            &data,
            smtp,
            &format!("[[listener]]\nkind = \"submission\"\naddress = \"127.0.0.1:{submission}\"\n"),
        ),
    )
    .unwrap();
    estafeta_e2e::add_user(&config, "alice@example.test", "right password");

    let trace = dir.path().join("trace");
    let log = dir.path().join("server.log");
    let strace = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(estafeta_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn strace");
    let mut traced = Traced {
        strace,
        server: None,
    };
    for port in [smtp, submission] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = traced.strace.try_wait().unwrap() {
                panic!("strace/estafeta exited ({status}): {}", read(&log));
            }
            assert!(Instant::now() < deadline, "port {port}: {}", read(&log));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The server is strace's child.
    let spid = traced.strace.id();
    let children = read(Path::new(&format!("/proc/{spid}/task/{spid}/children")));
    let server: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    traced.server = Some(server);

    let addr = format!("127.0.0.1:{smtp}").parse().unwrap();
    submit(
        addr,
        "a@example.test",
        &["bob@example.test"],
        b"Subject: one\r\n\r\nhi\r\n",
    );
    // A large message: written to a file as it arrives, linked into the spool, mapped for
    // delivery (O_TMPFILE, linkat, mmap, madvise).
    submit(
        addr,
        "a@example.test",
        &["dave@example.test"],
        format!(
            "Subject: large\r\n\r\n{}",
            "a large line\r\n".repeat(200_000)
        )
        .as_bytes(),
    );
    let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.starttls(context=ctx); s.ehlo()
try:
    s.login("alice@example.test", "wrong")
except smtplib.SMTPAuthenticationError:
    pass
s.login("alice@example.test", "right password")
s.sendmail("alice@example.test", ["carol@example.test"], "Subject: two\r\n\r\nhi\r\n")
s.quit()
"#;
    let out = Command::new("python3")
        .args(["-c", script, &submission.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), read(&log));
    for user in ["bob", "carol", "dave"] {
        let got = maildir_new(&data, "example.test", user, 1, Duration::from_secs(20));
        assert_eq!(got.len(), 1, "{user}: {}", read(&log));
    }
    let flush = Command::new(estafeta_bin())
        .args(["queue", "flush", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(flush.status.success(), "queue flush: {}", text(&flush));
    // SAFETY: kill(2) on the server we started (strace's only child).
    unsafe { libc::kill(server, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe { libc::kill(server, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = traced.strace.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "estafeta did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    traced.server = None;
    assert!(
        status.success(),
        "estafeta under strace: {status}\n{}",
        read(&log)
    );

    let trace = read(&trace);
    let mut used = BTreeSet::new();
    let mut used_families = BTreeSet::new();
    for line in trace.lines() {
        // "PID name(args…) = result", "PID <... name resumed>…", "PID +++ exited …".
        let Some((_, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            continue;
        }
        used.insert(name.to_string());
        if name == "socket" || name == "socketpair" {
            used_families.insert(args.split(',').next().unwrap().trim().to_string());
        }
    }
    assert!(
        used.contains("accept4") && used.contains("fsync"),
        "{used:?}"
    );
    let denied: Vec<&String> = used.difference(&allowed).collect();
    println!(
        "{} distinct system calls, all allowed: {used:?}",
        used.len()
    );
    assert!(
        denied.is_empty(),
        "system calls the unit's SystemCallFilter= would refuse with EPERM: {denied:?}"
    );
    for family in &used_families {
        assert!(
            families.iter().any(|f| f == family),
            "socket family {family} is not in RestrictAddressFamilies={families:?}"
        );
    }
}

/// strace and the server under it; both are killed (by PID) if the test fails half-way.
struct Traced {
    strace: std::process::Child,
    server: Option<i32>,
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(pid) = self.server {
            // SAFETY: kill(2) on the server this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
