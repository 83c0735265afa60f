//! The fail2ban filter (config/fail2ban/filter.d/estafeta.conf) against the real binary's real
//! log: wrong AUTH passwords over STARTTLS and relay probes from python's smtplib are matched,
//! each with the address of the client that did it; successful AUTH, accepted and delivered
//! messages, connects and disconnects are not. `fail2ban-regex` is the judge, in every mode
//! of the filter and in the line form of fail2ban's systemd (journal) backend.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::{Process, free_port};

const USER: &str = "alice@example.test";
const PASSWORD: &str = "correct horse battery staple";

/// The clients, each on its own loopback address (mynetworks is 127.0.0.1/32 only).
const GUESSER: &str = "127.0.0.3"; // two wrong passwords (AUTH PLAIN), then the right one
const GUESSER_LOGIN: &str = "127.0.0.4"; // one wrong password (AUTH LOGIN)
const PROBER: &str = "127.0.0.2"; // two relay probes on port 25, then a local message
const HARVESTER: &str = "127.0.0.5"; // one unknown local user
const TRUSTED: &str = "127.0.0.1"; // in mynetworks: a message

/// The failures the default mode (auth + relay) must report, in log order.
const EXPECTED_NORMAL: [&str; 5] = [GUESSER, GUESSER, GUESSER_LOGIN, PROBER, PROBER];

/// What the clients do, with smtplib (over STARTTLS on the submission port).
const SCENARIO: &str = r#"
import base64, json, smtplib, ssl, sys
host, smtp, sub, user, pw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
out = {}
def b64(s): return base64.b64encode(s.encode()).decode()
def r(reply): return [reply[0], reply[1].decode()]
def submission(src):
    s = smtplib.SMTP(host, sub, source_address=(src, 0), timeout=30)
    s.ehlo("client.example"); s.starttls(context=ctx); s.ehlo("client.example")
    return s
def mta(src):
    s = smtplib.SMTP(host, smtp, source_address=(src, 0), timeout=30)
    s.ehlo("mta.example")
    return s

s = submission("127.0.0.3")
out["wrong_plain"] = r(s.docmd("AUTH", "PLAIN " + b64("\0" + user + "\0wrong password")))
# A user name that carries a client= field of its own: the host must stay 127.0.0.3.
out["forged_field"] = r(s.docmd("AUTH", "PLAIN " + b64("\0x client=192.0.2.98\0wrong")))
out["login"] = r(s.login(user, pw))
out["refused"] = s.sendmail(user, ["bob@example.test"], "Subject: after two failures\r\n\r\nhi\r\n")
s.quit()

s = submission("127.0.0.4")
out["login_user"] = r(s.docmd("AUTH", "LOGIN " + b64(user)))
out["login_wrong"] = r(s.docmd(b64("not the password")))
s.quit()

s = mta("127.0.0.2")
out["mail"] = r(s.mail("probe@remote.example"))
out["relay1"] = r(s.rcpt("victim@remote.example"))
out["relay2"] = r(s.rcpt("other@elsewhere.example"))
out["local"] = r(s.rcpt("bob@example.test"))
out["data"] = r(s.data("Subject: from outside\r\n\r\nhi\r\n"))
s.quit()

s = mta("127.0.0.5")
s.mail("someone@remote.example")
out["unknown"] = r(s.rcpt("nobody@list.test"))
s.rset()
s.quit()

s = mta("127.0.0.1")
out["trusted"] = s.sendmail("root@example.test", ["bob@example.test"], "Subject: trusted\r\n\r\nhi\r\n")
s.quit()
print(json.dumps(out))
"#;

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn filter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/fail2ban/filter.d/estafeta.conf")
}

/// A real log: the binary, the scenario above, then a graceful stop (everything written).
struct Log {
    _dir: tempfile::TempDir,
    path: PathBuf,
    text: String,
}

fn produce_log() -> Log {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (smtp, submission) = (free_port(), free_port());
    let config = dir.path().join("estafeta.toml");
    std::fs::write(
        &config,
        format!(
            r#"hostname = "mx.test.example"
data_dir = "{data}"
run_as_root = true

[log]
level = "info"
format = "text"

[[listener]]
kind = "smtp"
address = "127.0.0.1:{smtp}"

[[listener]]
kind = "submission"
address = "127.0.0.1:{submission}"

[relay]
mynetworks = ["127.0.0.1/32"]

[[domain]]
name = "example.test"
mailboxes = "*"

[[domain]]
name = "list.test"
mailboxes = ["bob"]

[queue]
retry = ["1s"]
"#,
            data = data.display()
        ),
    )
    .unwrap();
    estafeta_e2e::add_user(&config, USER, PASSWORD);

    let log = dir.path().join("estafeta.log");
    let mut server = Process::serve(&config, format!("127.0.0.1:{smtp}").parse().unwrap(), &log);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", submission)).is_err() {
        assert!(Instant::now() < deadline, "submission port not listening");
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = Command::new("python3")
        .args(["-c", SCENARIO, "127.0.0.1"])
        .args([&smtp.to_string(), &submission.to_string(), USER, PASSWORD])
        .output()
        .unwrap();
    let replies = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scenario: {replies}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    // The clients saw what the log lines are about.
    for expected in [
        r#""wrong_plain": [535, "5.7.8"#,
        r#""forged_field": [535, "5.7.8"#,
        r#""login": [235, "2.7.0"#,
        r#""login_wrong": [535, "5.7.8"#,
        r#""relay1": [554, "5.7.1 <victim@remote.example>: Relay access denied"]"#,
        r#""relay2": [554, "5.7.1 <other@elsewhere.example>: Relay access denied"]"#,
        r#""local": [250"#,
        r#""data": [250"#,
        r#""unknown": [550, "5.1.1"#,
        r#""refused": {}"#,
        r#""trusted": {}"#,
    ] {
        assert!(replies.contains(expected), "{expected} not in {replies}");
    }

    // Wait for the three messages to be delivered and the five sessions to be over, then stop
    // the server so that every line is written.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = server.log_text();
        let count = |event: &str| {
            text.lines()
                .filter(|l| l.contains(&format!("estafeta::maillog: {event} ")))
                .count()
        };
        if count("delivered") >= 3 && count("disconnect") >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log never showed 3 deliveries and 5 disconnects:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.terminate().success());
    let text = server.log_text();
    Log {
        _dir: dir,
        path: log,
        text,
    }
}

/// `fail2ban-regex -o '<ip> <msg>' LOG FILTER[options]`: the address and the line of every
/// failure it found, in order.
fn fail2ban_regex(log: &Path, filter_arg: &str, extra: &[&str]) -> Vec<(IpAddr, String)> {
    let out = Command::new("fail2ban-regex")
        .args(extra)
        .args(["-o", "<ip> <msg>"])
        .arg(log)
        .arg(filter_arg)
        // The log's timestamps are UTC ("Z"): the local time zone must not matter.
        .env("TZ", "America/New_York")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fail2ban-regex {filter_arg}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| {
            let (ip, msg) = l.split_once(' ')?;
            Some((ip.parse().ok()?, msg.to_string()))
        })
        .collect()
}

fn ips(found: &[(IpAddr, String)]) -> Vec<String> {
    found.iter().map(|(ip, _)| ip.to_string()).collect()
}

fn filter_with(mode: &str) -> String {
    format!("{}[mode={mode}]", filter().display())
}

/// The log lines with this mail-log event (the text after the target).
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn fail2ban_regex_matches_exactly_the_failures_of_a_real_log() {
    if !have("fail2ban-regex", "--version") {
        estafeta_e2e::skip("fail2ban-regex not found (Debian: fail2ban)");
        return;
    }
    if !have("python3", "--version") {
        estafeta_e2e::skip("python3 not found");
        return;
    }
    let log = produce_log();
    let auth_failures = lines_with(&log.text, "estafeta::maillog: authentication failed ");
    let relay_denied = lines_with(&log.text, "Relay access denied");
    assert_eq!(auth_failures.len(), 3, "{}", log.text);
    assert_eq!(relay_denied.len(), 2, "{}", log.text);
    // The success lines this test must not see matched are really there.
    for event in [
        "connect",
        "authenticated",
        "queued",
        "delivered",
        "disconnect",
    ] {
        assert!(
            !lines_with(&log.text, &format!("estafeta::maillog: {event} ")).is_empty(),
            "no {event} line in:\n{}",
            log.text
        );
    }

    // Default mode: auth and relay, with the right host, and nothing else.
    let found = fail2ban_regex(&log.path, filter().to_str().unwrap(), &[]);
    assert_eq!(ips(&found), EXPECTED_NORMAL, "{found:#?}\n{}", log.text);
    let matched: BTreeSet<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
    let failures: BTreeSet<&str> = auth_failures.iter().chain(&relay_denied).copied().collect();
    assert_eq!(
        matched, failures,
        "matched lines differ from the failure lines"
    );
    // The user name's "client=192.0.2.98" did not become the host.
    assert!(
        found
            .iter()
            .any(|(ip, m)| m.contains("client=192.0.2.98") && ip.to_string() == GUESSER),
        "{found:#?}"
    );

    // Each jail's mode sees its own kind only.
    let auth = fail2ban_regex(&log.path, &filter_with("auth"), &[]);
    assert_eq!(ips(&auth), [GUESSER, GUESSER, GUESSER_LOGIN], "{auth:#?}");
    let relay = fail2ban_regex(&log.path, &filter_with("relay"), &[]);
    assert_eq!(ips(&relay), [PROBER, PROBER], "{relay:#?}");
    // aggressive adds the unknown local user (directory harvesting).
    let aggressive = fail2ban_regex(&log.path, &filter_with("aggressive"), &[]);
    let mut expected: Vec<&str> = EXPECTED_NORMAL.to_vec();
    expected.push(HARVESTER);
    let mut got = ips(&aggressive);
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "{aggressive:#?}");
    // The trusted client and the successful sessions never appear.
    assert!(!ips(&aggressive).iter().any(|ip| ip == TRUSTED));

    // The times fail2ban counts with are the logged UTC instants (`-o row`: ['IP', UNIX_TIME,
    // {...}] per failure), whatever the local time zone (TZ is set far from UTC).
    let out = Command::new("fail2ban-regex")
        .args(["-o", "row"])
        .arg(&log.path)
        .arg(filter())
        .env("TZ", "America/New_York")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut times: Vec<i64> = stdout
        .lines()
        .filter_map(|l| l.split(',').nth(1)?.trim().parse().ok())
        .collect();
    let mut logged: Vec<i64> = failures.iter().map(|l| unix_seconds(&l[..19])).collect();
    times.sort();
    logged.sort();
    assert_eq!(times, logged, "{stdout}");

    // fail2ban's systemd backend hands the filter "HOST IDENTIFIER[PID]: MESSAGE" (the date
    // comes from the journal entry). With [log] format = "text" under systemd, MESSAGE is the
    // whole text line. Simulated in a file, with a syslog date in front for the date detector
    // (the backend needs none).
    let journal = log.path.with_file_name("journal.log");
    let text: String = log
        .text
        .lines()
        .map(|l| format!("Dec  2 07:30:01 mx estafeta[4242]: {l}\n"))
        .collect();
    std::fs::write(&journal, text).unwrap();
    let found = fail2ban_regex(
        &journal,
        filter().to_str().unwrap(),
        &["--datepattern", "{^LN-BEG}%b %d %H:%M:%S"],
    );
    assert_eq!(ips(&found), EXPECTED_NORMAL, "journal form: {found:#?}");
}

/// "2026-12-02T07:30:01" (UTC) → seconds since the epoch.
fn unix_seconds(iso: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| iso[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

#[test]
fn unix_seconds_is_right() {
    assert_eq!(unix_seconds("1970-01-01T00:00:00"), 0);
    assert_eq!(unix_seconds("2026-12-02T07:23:57"), 1_796_196_237);
    assert_eq!(unix_seconds("2000-03-01T00:00:00"), 951_868_800);
}

#[test]
fn the_jails_load_in_debians_fail2ban_configuration() {
    // `fail2ban-client -t` and `-d` on a copy of /etc/fail2ban with our filter and jails (and
    // none of Debian's jail.d: its sshd jail wants /var/log/auth.log, which a container lacks).
    let etc = Path::new("/etc/fail2ban");
    if !have("fail2ban-client", "--version") || !etc.join("jail.conf").exists() {
        estafeta_e2e::skip("fail2ban-client or /etc/fail2ban not found (Debian: fail2ban)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("fail2ban");
    let cp = Command::new("cp")
        .arg("-r")
        .arg(etc)
        .arg(&conf)
        .status()
        .unwrap();
    assert!(cp.success());
    for entry in std::fs::read_dir(conf.join("jail.d")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/fail2ban");
    for file in ["filter.d/estafeta.conf", "jail.d/estafeta.conf"] {
        std::fs::copy(ours.join(file), conf.join(file)).unwrap();
    }
    let client = |flag: &str| {
        let out = Command::new("fail2ban-client")
            .arg("-c")
            .arg(&conf)
            .arg(flag)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "fail2ban-client {flag}: {all}");
        all
    };
    client("-t");
    let dump = client("-d");
    let jail_lines = |jail: &str| -> Vec<String> {
        dump.lines()
            .filter(|l| l.contains(&format!("'{jail}'")))
            .map(str::to_string)
            .collect()
    };
    for (jail, own, other) in [
        ("estafeta-auth", "authentication failed", "reject RCPT"),
        ("estafeta-relay", "reject RCPT", "authentication failed"),
    ] {
        let lines = jail_lines(jail);
        assert!(
            lines
                .iter()
                .any(|l| l == &format!("['add', '{jail}', 'systemd']")),
            "{jail} is not a systemd-backend jail: {lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("addjournalmatch")
                    && l.contains("_SYSTEMD_UNIT=estafeta.service")),
            "{jail}: {lines:#?}"
        );
        let regexes: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("addfailregex"))
            .collect();
        assert!(!regexes.is_empty(), "{jail}: {lines:#?}");
        assert!(
            regexes
                .iter()
                .all(|l| l.contains(own) && !l.contains(other)),
            "{jail}: {regexes:#?}"
        );
    }
}

#[test]
fn a_user_name_with_a_newline_cannot_forge_a_failure_of_another_host() {
    if !have("fail2ban-regex", "--version") || !have("python3", "--version") {
        estafeta_e2e::skip("fail2ban-regex or python3 not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let submission = free_port();
    let config = dir.path().join("estafeta.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        estafeta_e2e::test_config(
            &data,
            port,
            &format!("[[listener]]\nkind = \"submission\"\naddress = \"127.0.0.1:{submission}\"\n"),
        )
        .replace(
            "[log]\nlevel = \"info\"\n",
            "[log]\nlevel = \"info\"\nformat = \"text\"\n",
        ),
    )
    .unwrap();
    let log = dir.path().join("estafeta.log");
    let mut server = Process::serve(&config, format!("127.0.0.1:{port}").parse().unwrap(), &log);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", submission)).is_err() {
        assert!(Instant::now() < deadline, "submission port not listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    let forged = "x\n2026-12-02T07:30:01.123456Z  WARN estafeta::maillog: \
                  authentication failed client=192.0.2.99 user=y";
    let script = r#"
import base64, smtplib, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("x"); s.starttls(context=ctx); s.ehlo("x")
print(s.docmd("AUTH", "PLAIN " + base64.b64encode(("\0" + sys.argv[2] + "\0pw").encode()).decode()))
s.quit()
"#;
    let out = Command::new("python3")
        .args(["-c", script, &submission.to_string(), forged])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(500));
    server.terminate();
    let found = fail2ban_regex(&log, filter().to_str().unwrap(), &[]);
    assert!(
        found.iter().all(|(ip, _)| ip.to_string() == "127.0.0.1"),
        "a client made fail2ban see another host: {found:#?}"
    );
}
