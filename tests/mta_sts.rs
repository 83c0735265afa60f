//! MTA-STS (RFC 8461) with the real binary: the sender resolves MX and `_mta-sts` records from
//! the test DNS server (`[dns] nameservers`), fetches the policy from Python's `http.server`
//! over HTTPS on port 443, trusts the test certificates through `[relay] ca_file`, and
//! delivers to an estafeta peer on port 25 whose `[tls]` certificate names its MX host.
//!
//! | domain | MX | policy (served on) | expected |
//! |---|---|---|---|
//! | sts.test | mx.sts.test (127.0.0.6) | enforce, mx: mx.sts.test (127.0.0.6:443) | delivered over verified TLS |
//! | stsbad.test | mx.stsbad.test (127.0.0.6) | enforce, mx: mx.other.test (127.0.0.7:443) | deferred 4.7.5, never sent |
//!
//! Ports 25 and 443 need root (CI runs as root); elsewhere the test is skipped with a note.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::dns::{DnsServer, Zones};
use estafeta_e2e::{Process, free_port, maildir_new, submit};

/// Python's HTTPS file server on `ip:443`, serving `root`.
struct Https(Child);

impl Https {
    fn start(root: &Path, cert: &str, key: &str, ip: &str) -> Https {
        let script = "import http.server,ssl,sys,os\n\
            os.chdir(sys.argv[1])\n\
            ctx=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            ctx.load_cert_chain(sys.argv[2], sys.argv[3])\n\
            s=http.server.ThreadingHTTPServer((sys.argv[4],443), http.server.SimpleHTTPRequestHandler)\n\
            s.socket=ctx.wrap_socket(s.socket, server_side=True)\n\
            s.serve_forever()\n";
        let child = Command::new("python3")
            .args(["-c", script])
            .arg(root)
            .args([cert, key, ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let addr: SocketAddr = format!("{ip}:443").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the HTTPS server on {addr} never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Https(child)
    }
}

impl Drop for Https {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn may_bind_low_ports() -> bool {
    match std::net::TcpListener::bind("127.0.0.254:443") {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            estafeta_e2e::skip("mta_sts: ports 25 and 443 need root or CAP_NET_BIND_SERVICE");
            false
        }
        _ => true,
    }
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_enforced_policy_is_fetched_honoured_and_logged() {
    if !may_bind_low_ports() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mx_cert, mx_key) = estafeta_e2e::self_signed(d, "mx", &["mx.sts.test", "mx.stsbad.test"]);
    let (web_cert, web_key) =
        estafeta_e2e::self_signed(d, "web", &["mta-sts.sts.test", "mta-sts.stsbad.test"]);
    let bundle = d.join("roots.pem");
    std::fs::write(
        &bundle,
        std::fs::read_to_string(&mx_cert).unwrap() + &std::fs::read_to_string(&web_cert).unwrap(),
    )
    .unwrap();
    for (ip, mx) in [("127.0.0.6", "mx.sts.test"), ("127.0.0.7", "mx.other.test")] {
        let root = d.join(ip);
        std::fs::create_dir_all(root.join(".well-known")).unwrap();
        std::fs::write(
            root.join(".well-known/mta-sts.txt"),
            format!("version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"),
        )
        .unwrap();
    }
    let _web6 = Https::start(&d.join("127.0.0.6"), &web_cert, &web_key, "127.0.0.6");
    let web7 = Https::start(&d.join("127.0.0.7"), &web_cert, &web_key, "127.0.0.7");
    let dns = DnsServer::start(
        Zones::new()
            .mx("sts.test", 10, "mx.sts.test")
            .a("mx.sts.test", "127.0.0.6")
            .txt("_mta-sts.sts.test", "v=STSv1; id=2026120301;")
            .txt(
                "_smtp._tls.sts.test",
                "v=TLSRPTv1; rua=mailto:tlsrpt@example.test,https://reports.example/x",
            )
            .a("mta-sts.sts.test", "127.0.0.6")
            .mx("stsbad.test", 10, "mx.stsbad.test")
            .a("mx.stsbad.test", "127.0.0.6")
            .txt("_mta-sts.stsbad.test", "v=STSv1; id=2026120301;")
            .a("mta-sts.stsbad.test", "127.0.0.7"),
    );
    // The peer: port 25 of 127.0.0.6, its certificate naming its MX host.
    let peer_cfg = d.join("peer.toml");
    std::fs::write(
        &peer_cfg,
        format!(
            r#"hostname = "mx.sts.test"
data_dir = "{data}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.6:25"
[tls]
certificate = "{mx_cert}"
private_key = "{mx_key}"
[relay]
mynetworks = []
ca_file = "{bundle}"
[dns]
nameservers = ["{dns}"]
[[domain]]
name = "sts.test"
mailboxes = "*"
[[domain]]
name = "stsbad.test"
mailboxes = "*"
"#,
            data = d.join("peer").display(),
            dns = dns.addr,
            bundle = bundle.display(),
        ),
    )
    .unwrap();
    let peer = Process::serve(
        &peer_cfg,
        "127.0.0.6:25".parse().unwrap(),
        &d.join("peer.log"),
    );
    let port = free_port();
    let sender_cfg = d.join("sender.toml");
    std::fs::write(
        &sender_cfg,
        format!(
            r#"hostname = "mx.sender.test"
data_dir = "{data}"
run_as_root = true
[[listener]]
kind = "smtp"
address = "127.0.0.1:{port}"
[relay]
mynetworks = ["127.0.0.1/32"]
ca_file = "{bundle}"
tls_reports = true
[dns]
nameservers = ["{dns}"]
[[domain]]
name = "example.test"
mailboxes = "*"
[queue]
retry = ["1s"]
"#,
            data = d.join("sender").display(),
            bundle = bundle.display(),
            dns = dns.addr,
        ),
    )
    .unwrap();
    let mut sender = Process::serve(
        &sender_cfg,
        format!("127.0.0.1:{port}").parse().unwrap(),
        &d.join("sender.log"),
    );
    let logs = || format!("sender:\n{}\npeer:\n{}", sender.log_text(), peer.log_text());

    submit(
        sender.addr,
        "alice@example.test",
        &["bob@sts.test"],
        b"Subject: over MTA-STS\r\n\r\nhello\r\n",
    );
    let got = maildir_new(
        &d.join("peer"),
        "sts.test",
        "bob",
        1,
        Duration::from_secs(20),
    );
    assert_eq!(got.len(), 1, "{}", logs());
    // The peer keeps the message before it answers 250; the sender logs after it.
    wait_for(
        "the TLS status line",
        10,
        || sender.log_text().contains("TLS status"),
        logs,
    );
    let log = sender.log_text();
    assert!(log.contains("MTA-STS: policy fetched"), "{}", logs());
    let status = log
        .lines()
        .find(|l| l.contains("TLS status") && l.contains("domain=sts.test"))
        .unwrap_or_else(|| panic!("{}", logs()));
    for field in [
        "tls_policy=\"verify\"",
        "tls_policy_from=\"mta-sts\"",
        "tls_verified=true",
    ] {
        assert!(status.contains(field), "{field}: {status}");
    }

    // stsbad.test: its policy lists another MX: deferred, retried, never sent.
    submit(
        sender.addr,
        "alice@example.test",
        &["carol@stsbad.test"],
        b"Subject: not over MTA-STS\r\n\r\nhello\r\n",
    );
    wait_for(
        "two deferrals of carol@stsbad.test",
        20,
        || {
            sender
                .log_text()
                .matches("to=carol@stsbad.test status=\"deferred\"")
                .count()
                >= 2
        },
        logs,
    );
    let log = sender.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("to=carol@stsbad.test status=\"deferred\""))
        .unwrap();
    assert!(
        line.contains("4.7.5") && line.contains("MTA-STS policy of stsbad.test"),
        "{line}"
    );
    // The policy was fetched once and then taken from the cache.
    assert_eq!(
        log.matches("MTA-STS: policy fetched").count(),
        2,
        "{}",
        logs()
    );
    assert!(!peer.log_text().contains("carol@stsbad.test"), "{}", logs());

    // The receiving side's view: `dns-records --check` fetches each domain's policy as a
    // sender would and says whether it lets this host (mx.sts.test) receive.
    let check = |domain: &str| {
        let out = Command::new(estafeta_e2e::estafeta_bin())
            .args([
                "dns-records",
                domain,
                "--check",
                "--address",
                "127.0.0.6",
                "--config",
            ])
            .arg(&peer_cfg)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let out = check("sts.test");
    assert!(
        out.contains(
            "ok: https://mta-sts.sts.test/.well-known/mta-sts.txt: mode enforce, mx mx.sts.test"
        ),
        "{out}"
    );
    assert!(out.contains("ok: v=STSv1; id=2026120301;"), "{out}");
    assert!(
        out.contains(
            "_smtp._tls.sts.test. 3600 IN TXT \"v=TLSRPTv1; rua=mailto:postmaster@sts.test\""
        ),
        "{out}"
    );
    let out = check("stsbad.test");
    assert!(
        out.contains("WRONG: https://mta-sts.stsbad.test/.well-known/mta-sts.txt does not list this host (mx.sts.test)"),
        "{out}"
    );

    // The policies are kept on disk: after a restart with stsbad.test's policy server gone,
    // the policy still holds (no fetch: the record's id is the same), and carol waits.
    let kept = std::fs::read_to_string(d.join("sender/mta-sts/stsbad.test")).unwrap();
    assert!(
        kept.contains("cache-id: 2026120301") && kept.contains("mx: mx.other.test"),
        "{kept}"
    );
    // TLS-RPT: the session to sts.test's MX is kept for today's report. Renamed to
    // yesterday, the restarted server sends it.
    let reports = d.join("sender/tls-reports");
    let today: Vec<_> = std::fs::read_dir(&reports)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(today.len(), 1, "{today:?}");
    let kept = std::fs::read_to_string(&today[0]).unwrap();
    assert!(
        kept.starts_with("sts.test\tsts\tversion: STSv1|mode: enforce|mx: mx.sts.test|max_age: 86400\tmx.sts.test\tmx.sts.test\t127.0.0.6\tok\t"),
        "{kept}"
    );
    std::fs::rename(&today[0], reports.join("2026-01-01")).unwrap();
    // A DKIM key for sender.test, the domain of mx.sender.test: the report is signed with it.
    let key = d.join("tr.key");
    let made = Command::new(estafeta_e2e::estafeta_bin())
        .args(["dkim", "generate", "sender.test", "--selector", "tr"])
        .args(["--algorithm", "ed25519", "--output"])
        .arg(&key)
        .arg("--config")
        .arg(&sender_cfg)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut text = std::fs::read_to_string(&sender_cfg).unwrap();
    text.push_str(&format!(
        "[[dkim]]\ndomain = \"sender.test\"\nselector = \"tr\"\nprivate_key = \"{}\"\n",
        key.display()
    ));
    std::fs::write(&sender_cfg, text).unwrap();
    drop(web7);
    sender.terminate();
    drop(sender);
    let sender = Process::serve(
        &sender_cfg,
        format!("127.0.0.1:{port}").parse().unwrap(),
        &d.join("sender2.log"),
    );
    let logs = || format!("sender:\n{}\npeer:\n{}", sender.log_text(), peer.log_text());
    wait_for(
        "a deferral of carol@stsbad.test after the restart",
        20,
        || {
            sender.log_text().lines().any(|l| {
                l.contains("to=carol@stsbad.test status=\"deferred\"")
                    && l.contains("MTA-STS policy of stsbad.test")
            })
        },
        logs,
    );
    assert!(!sender.log_text().contains("policy fetched"), "{}", logs());
    assert!(!peer.log_text().contains("carol@stsbad.test"), "{}", logs());
    // The report of 2026-01-01 reached tlsrpt@example.test (the mailto: of the record; the
    // https: one is not supported), and Python's email and jsonschema accept it.
    let got = maildir_new(
        &d.join("sender"),
        "example.test",
        "tlsrpt",
        1,
        Duration::from_secs(20),
    );
    assert_eq!(got.len(), 1, "{}", logs());
    let report = String::from_utf8_lossy(&got[0]).into_owned();
    assert!(
        report.contains("From: TLS reports <postmaster@sender.test>"),
        "{report}"
    );
    let signature = report
        .lines()
        .skip_while(|l| !l.starts_with("DKIM-Signature:"))
        .take_while(|l| l.starts_with("DKIM-Signature:") || l.starts_with([' ', '\t']))
        .collect::<String>();
    assert!(
        signature.contains("d=sender.test") && signature.contains("s=tr"),
        "{report}"
    );
    let file = d.join("report.eml");
    std::fs::write(&file, &got[0]).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/tlsrpt_check.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&file)
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{json}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for part in [
        "\"start-datetime\":\"2026-01-01T00:00:00Z\"",
        "\"policy-type\":\"sts\"",
        "\"policy-domain\":\"sts.test\"",
        "\"mx-host\":[\"mx.sts.test\"]",
        "\"total-successful-session-count\":1",
        "\"total-failure-session-count\":0",
    ] {
        assert!(json.contains(part), "{part}: {json}");
    }
    assert!(
        !reports.join("2026-01-01").exists(),
        "the day's results are gone once sent"
    );
}
