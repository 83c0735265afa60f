//! The client against rspamd 3.4 (Debian's /usr/bin/rspamd): its proxy worker in milter mode,
//! scanning by itself (`self_scan`), started from a private configuration in a temporary
//! directory that includes the system's rules but none of its workers, redis or network
//! lookups beyond 127.0.0.1.
//!
//! rspamd declares the protocol flags 0x000ff080 (no reply for connect, HELO, MAIL, RCPT,
//! DATA, unknown, headers, end of headers and body): a client that waits for those replies
//! hangs, so this test is also the test of the no-reply flags.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, free_port, listening, macros, skip};
use estafeta_milter::codec::proto;
use estafeta_milter::{Address, Milter, Modification, Timeouts, Verdict};

const RSPAMD: &str = "/usr/bin/rspamd";
const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// The configuration: the system's rules (`$CONFDIR/common.conf`, options) with our own
/// logging, pid file, database directory, DNS (127.0.0.1 only: no lookup leaves the host)
/// and only the proxy worker, in milter mode, scanning by itself.
fn config(port: u16) -> String {
    // ESTAFETA_RSPAMD_LOG=/path/file: rspamd's log at level info there, to see what it did.
    let logging = match std::env::var("ESTAFETA_RSPAMD_LOG") {
        Ok(file) => format!("type = \"file\"; filename = \"{file}\"; level = \"info\";"),
        Err(_) => "type = \"console\"; level = \"error\";".to_string(),
    };
    format!(
        r#".include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/options.inc"
}}
logging {{
    {logging}
}}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 120s;
    upstream "local" {{
        default = yes;
        self_scan = yes;
    }}
    count = 1;
}}
"#
    )
}

/// `override.d/options.inc`: DNS goes to 127.0.0.1 only (refused at once: no lookup leaves
/// the host, none waits); no fuzzy_check, whose servers (fuzzy*.rspamd.com) would be
/// resolved through the system's resolver at start.
const OPTIONS: &str = r#"filters = "chartable,dkim,regexp";
dns {
    nameserver = ["127.0.0.1:53"];
    timeout = 1s;
    retransmits = 1;
}
"#;

/// `local.d/milter_headers.conf`: the headers added to every scanned message.
const MILTER_HEADERS: &str = r#"use = ["x-spamd-result", "x-spam-status"];
skip_local = false;
skip_authenticated = false;
"#;

fn start_rspamd() -> Option<(Daemon, Address, tempfile::TempDir)> {
    if !Path::new(RSPAMD).exists() {
        skip(&format!("{RSPAMD} not found (install rspamd)"));
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::create_dir_all(dir.path().join("local.d")).unwrap();
    std::fs::create_dir_all(dir.path().join("override.d")).unwrap();
    std::fs::create_dir_all(dir.path().join("db")).unwrap();
    std::fs::write(dir.path().join("override.d/options.inc"), OPTIONS).unwrap();
    let conf = dir.path().join("rspamd.conf");
    std::fs::write(&conf, config(port)).unwrap();
    std::fs::write(
        dir.path().join("local.d/milter_headers.conf"),
        MILTER_HEADERS,
    )
    .unwrap();
    let d = dir.path().display().to_string();
    let mut cmd = Command::new(RSPAMD);
    cmd.arg("-f").arg("-c").arg(&conf);
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false);
    if root {
        // rspamd refuses to keep root without being told.
        cmd.args(["-u", "root", "-g", "root"]);
    }
    for (var, value) in [
        ("CONFDIR", "/etc/rspamd".to_string()),
        ("LOCAL_CONFDIR", d.clone()),
        ("DBDIR", format!("{d}/db")),
        ("RUNDIR", d.clone()),
        ("LOGDIR", d.clone()),
    ] {
        cmd.arg("--var").arg(format!("{var}={value}"));
    }
    cmd.current_dir(dir.path()).stdout(Stdio::null());
    // A fresh database directory: rspamd compiles its rules first (about 15 s here).
    let daemon = Daemon::start("rspamd", cmd, Duration::from_secs(120), || listening(port));
    let address = format!("inet:127.0.0.1:{port}").parse().unwrap();
    Some((daemon, address, dir))
}

async fn scan(m: &mut Milter, message: &str) -> (Verdict, Vec<Modification>) {
    // As Postfix does for a client from outside: no {auth_authen}, so rspamd's
    // milter_headers does not take it for one of our users.
    let conn = macros(&[
        ("j", "mx.example.org"),
        ("{daemon_name}", "estafeta"),
        ("{client_addr}", "192.0.2.10"),
        ("{client_name}", "mail.example.net"),
    ]);
    let v = m
        .connect_step(
            "mail.example.net",
            "192.0.2.10".parse().unwrap(),
            40000,
            &conn,
        )
        .await
        .unwrap();
    assert_eq!(v, Verdict::Continue);
    assert_eq!(
        m.helo("mail.example.net", &[]).await.unwrap(),
        Verdict::Continue
    );
    let v = m
        .mail(
            "sender@example.net",
            &[],
            &macros(&[("{mail_addr}", "sender@example.net")]),
        )
        .await
        .unwrap();
    assert_eq!(v, Verdict::Continue);
    let v = m
        .rcpt(
            "user@example.org",
            &[],
            &macros(&[("{rcpt_addr}", "user@example.org")]),
        )
        .await
        .unwrap();
    assert_eq!(v, Verdict::Continue);
    let content = message.replace('\n', "\r\n");
    m.message(content.as_bytes(), &macros(&[("i", "4F2A1B3C")]))
        .await
        .unwrap()
}

const CLEAN: &str = "From: Sender <sender@example.net>
To: User <user@example.org>
Subject: lunch on Tuesday
Date: Mon, 01 Jan 2024 10:00:00 +0000
Message-ID: <20240101100000.1234@example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Hello,

shall we have lunch on Tuesday at noon, at the usual place?

Regards,
Sender
";

#[tokio::test]
async fn rspamd_refuses_gtube_and_adds_its_headers_to_a_clean_message() {
    let Some((_daemon, address, _dir)) = start_rspamd() else {
        return;
    };
    let t = Timeouts {
        connect: Duration::from_secs(5),
        command: Duration::from_secs(30),
        eom: Duration::from_secs(60),
    };
    let mut m = Milter::connect(&address, t).await.unwrap();
    // rspamd 3.4's flags: no reply for connect … body.
    let no_reply = proto::NR_CONN
        | proto::NR_HELO
        | proto::NR_MAIL
        | proto::NR_RCPT
        | proto::NR_HDR
        | proto::NR_EOH
        | proto::NR_BODY;
    assert_eq!(m.protocol() & no_reply, no_reply, "{:#x}", m.protocol());

    let gtube = CLEAN.replace("shall we", &format!("{GTUBE}\n\nshall we"));
    let (v, _mods) = scan(&mut m, &gtube).await;
    let Verdict::Reject(Some(reply)) = v else {
        panic!("GTUBE not rejected with a reply: {v:?}")
    };
    assert_eq!(reply.to_bytes(), b"554 5.7.1 Gtube pattern\r\n");
    m.abort().await.unwrap();
    m.quit().await;

    // A clean message, on a new connection (as a new SMTP session would).
    let mut m = Milter::connect(&address, t).await.unwrap();
    let (v, mods) = scan(&mut m, CLEAN).await;
    assert!(matches!(v, Verdict::Continue | Verdict::Accept), "{v:?}");
    let added = |name: &str| {
        mods.iter().find_map(|m| match m {
            Modification::AddHeader { name: n, value }
            | Modification::InsertHeader { name: n, value, .. }
                if n.eq_ignore_ascii_case(name) =>
            {
                Some(value.clone())
            }
            _ => None,
        })
    };
    let status = added("X-Spam-Status").unwrap_or_else(|| panic!("{mods:#?}"));
    assert!(status.starts_with("No, score="), "{status}");
    let result = added("X-Spamd-Result").unwrap_or_else(|| panic!("{mods:#?}"));
    assert!(result.starts_with("default: False ["), "{result}");
    let edited = estafeta_milter::apply(CLEAN.replace('\n', "\r\n").as_bytes(), &mods);
    let edited = String::from_utf8(edited).unwrap();
    assert!(edited.contains("\r\nX-Spam-Status: No, score="), "{edited}");
    m.quit().await;
}
