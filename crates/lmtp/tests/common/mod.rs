//! A private Dovecot LMTP server in a temporary directory, for the integration tests: users
//! alice, bob (a Sieve script filing "[list]" mail into Lists) and carol (a 1 KiB quota),
//! listening on a Unix socket and on 127.0.0.1:<free port>. Stopped (and its processes
//! killed) when dropped.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs the pieces the tests need.
const DOVECOT: &str = "/usr/sbin/dovecot";
const LMTP: &str = "/usr/lib/dovecot/lmtp";
const SIEVE: &str = "/usr/lib/dovecot/modules/lib90_sieve_plugin.so";
const QUOTA: &str = "/usr/lib/dovecot/modules/lib10_quota_plugin.so";

/// Prints "skipped: <why>" and returns `None`, or panics when `ESTAFETA_NO_SKIP` is set
/// (CI installs everything).
pub fn skip<T>(why: &str) -> Option<T> {
    if std::env::var_os("ESTAFETA_NO_SKIP").is_some() {
        panic!("ESTAFETA_NO_SKIP is set, but: {why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// What differs between the tests' servers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Dovecot's `quota_full_tempfail`: 452 4.2.2 instead of 552 5.2.2 for a full mailbox.
    pub quota_full_tempfail: bool,
}

/// A running Dovecot.
pub struct Dovecot {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

/// The uid, gid and name of a user in /etc/passwd.
fn passwd_entry(pred: impl Fn(&[&str]) -> bool) -> Option<(u32, u32, String)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && pred(&f) {
            Some((f[2].parse().ok()?, f[3].parse().ok()?, f[0].to_string()))
        } else {
            None
        }
    })
}

/// The name of group `gid` in /etc/group.
fn group_name(gid: u32) -> Option<String> {
    let text = fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[2] == gid.to_string()).then(|| f[0].to_string())
    })
}

/// True when a TCP socket listens on `port` (IPv4, any address), by /proc/net/tcp.
fn tcp_listening(port: u16) -> bool {
    let port = format!(":{port:04X}");
    fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().skip(1).any(|l| {
            let mut fields = l.split_whitespace();
            let local = fields.nth(1).unwrap_or("");
            let state = fields.nth(1).unwrap_or("");
            local.ends_with(&port) && state == "0A"
        })
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Dovecot {
    /// Starts a server, or says why it cannot (see [`skip`]).
    pub fn start(opts: Options) -> Option<Dovecot> {
        for (path, what) in [
            (DOVECOT, "dovecot (Debian: dovecot-core)"),
            (LMTP, "the LMTP server (Debian: dovecot-lmtpd)"),
            (SIEVE, "the Sieve plugin (Debian: dovecot-sieve)"),
            (QUOTA, "the quota plugin (Debian: dovecot-core)"),
        ] {
            if !Path::new(path).exists() {
                return skip(&format!("{path} not found: install {what}"));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("estafeta-dovecot-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let me = fs::metadata(&root).unwrap().uid();

        // Dovecot refuses mail access as root ("Mail access not allowed for root"): as root,
        // the mailboxes belong to nobody; otherwise to the running user, who also runs
        // Dovecot's internal processes.
        // Without root, Dovecot's internal services run as the user too: their sockets get
        // the user's group, and anvil cannot chroot.
        let (internal, mail_uid, mail_gid) = if me == 0 {
            let Some((uid, gid, _)) = passwd_entry(|f| f[0] == "nobody") else {
                return skip("running as root, and there is no user nobody for the mailboxes");
            };
            (
                "default_internal_user = root\ndefault_login_user = root".to_string(),
                uid,
                gid,
            )
        } else {
            let Some((uid, gid, name)) = passwd_entry(|f| f[2] == me.to_string()) else {
                return skip(&format!("uid {me} is not in /etc/passwd"));
            };
            let Some(group) = group_name(gid) else {
                return skip(&format!("gid {gid} is not in /etc/group"));
            };
            (
                format!(
                    "default_internal_user = {name}\ndefault_login_user = {name}\n\
                     default_internal_group = {group}\nservice anvil {{\n  chroot =\n}}"
                ),
                uid,
                gid,
            )
        };

        for sub in [
            "run",
            "state",
            "mail",
            "home/alice",
            "home/bob",
            "home/carol",
        ] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        fs::write(
            root.join("home/bob/.dovecot.sieve"),
            "require \"fileinto\";\nif header :contains \"subject\" \"[list]\" { fileinto \"Lists\"; }\n",
        )
        .unwrap();
        // passwd-file: user:password:uid:gid:gecos:home:shell:extra fields. The uid and gid
        // come from mail_uid/mail_gid (passwd-file refuses uid 0 here).
        let home = root.join("home");
        fs::write(
            root.join("users"),
            format!(
                "alice:{{PLAIN}}secret::::{h}/alice::\n\
                 bob:{{PLAIN}}secret::::{h}/bob::\n\
                 carol:{{PLAIN}}secret::::{h}/carol::userdb_quota_rule=*:storage=1K\n",
                h = home.display()
            ),
        )
        .unwrap();
        if me == 0 {
            for sub in ["mail", "home", "home/alice", "home/bob", "home/carol"] {
                std::os::unix::fs::chown(root.join(sub), Some(mail_uid), Some(mail_gid)).unwrap();
            }
            std::os::unix::fs::chown(
                root.join("home/bob/.dovecot.sieve"),
                Some(mail_uid),
                Some(mail_gid),
            )
            .unwrap();
        }

        let port = free_port();
        let socket = root.join("lmtp");
        let conf = root.join("dovecot.conf");
        let r = root.display();
        let text = format!(
            r#"# A private Dovecot for estafeta's LMTP tests.
base_dir = {r}/run
state_dir = {r}/state
log_path = {r}/dovecot.log
info_log_path = {r}/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
{internal}
mail_uid = {mail_uid}
mail_gid = {mail_gid}
first_valid_uid = 1
first_valid_gid = 1
auth_username_format = %n
mail_location = maildir:{r}/mail/%u
mail_plugins = quota
lda_mailbox_autocreate = yes
quota_full_tempfail = {tempfail}
passdb {{
  driver = passwd-file
  args = {r}/users
}}
userdb {{
  driver = passwd-file
  args = {r}/users
}}
service lmtp {{
  unix_listener {socket} {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
protocol lmtp {{
  mail_plugins = $mail_plugins sieve
}}
plugin {{
  quota = maildir:User quota
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
"#,
            socket = socket.display(),
            tempfail = if opts.quota_full_tempfail {
                "yes"
            } else {
                "no"
            },
        );
        fs::write(&conf, text).unwrap();
        let mut d = Dovecot {
            dir,
            socket,
            port,
            conf,
            child: None,
        };
        d.run();
        Some(d)
    }

    /// Starts the master process and waits (at most 15 s) until it listens.
    pub fn run(&mut self) {
        assert!(self.child.is_none());
        // A socket left by an earlier run would say "listening" too early.
        let _ = fs::remove_file(&self.socket);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("dovecot.stderr"))
            .unwrap();
        let child = Command::new(DOVECOT)
            .arg("-F")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn dovecot");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        // Ready when the Unix socket exists and the TCP port listens: the kernel's socket
        // table says so without a test connection (the tests count Dovecot's "Connect from"
        // lines). The socket file alone was once not enough on a loaded machine.
        loop {
            if self.socket.exists() && tcp_listening(self.port) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dovecot exited with {status}:\n{}", self.logs());
            }
            if Instant::now() > deadline {
                panic!("dovecot did not listen within 15 s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the master (SIGTERM, then SIGKILL after 5 s); its children follow it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `unix:<socket>`.
    pub fn unix_address(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// `inet:127.0.0.1:<port>`.
    pub fn inet_address(&self) -> String {
        format!("inet:127.0.0.1:{}", self.port)
    }

    /// Dovecot's log so far (and its stderr).
    pub fn logs(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("dovecot.log"), read("dovecot.stderr"))
    }

    /// Waits (at most 5 s) until the log has `n` lines containing `needle`, and returns how
    /// many it has then (the log process writes asynchronously).
    pub fn wait_log_count(&self, needle: &str, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let count = self.logs().lines().filter(|l| l.contains(needle)).count();
            if count >= n || Instant::now() > deadline {
                return count;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The files in a Maildir folder (`mail/<user>/<folder>/new`), read.
    pub fn maildir_new(&self, user: &str, folder: &str) -> Vec<String> {
        let dir = self
            .dir
            .path()
            .join("mail")
            .join(user)
            .join(folder)
            .join("new");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}
