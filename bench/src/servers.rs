//! The servers of the comparison: smtp-sink, estafeta and a private Postfix instance. Their
//! configuration files, starting them, waiting for their greeting, and stopping them (also when
//! the run fails or is interrupted: [`Fleet`] stops everything when dropped).

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::smtp::Conn;

/// The domain relayed to the relay sink in `--relay` mode.
pub const RELAY_DOMAIN: &str = "remote.test";
/// The local domain of both servers.
pub const LOCAL_DOMAIN: &str = "localhost";

/// How long a server may take to answer its first 220.
const GREETING_WITHIN: Duration = Duration::from_secs(20);
/// How long `postfix check|start|stop` and `estafeta check-config` may take.
const COMMAND_WITHIN: Duration = Duration::from_secs(60);

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of a system user, if it exists.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam reads a NUL-terminated string; the result (static storage) is read at
    // once, before any other call that could overwrite it; this program calls it from one thread
    // at a time.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

/// A free TCP port on 127.0.0.1 (bound, then released: another process could take it before
/// the server binds it, which then fails to start with a clear error).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// A string as a TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// estafeta's configuration for the comparison (docs/performance.md, "How to reproduce"), plus
/// `run_as_root` when started as root and a route to the relay sink with `--relay`.
pub fn estafeta_config(
    data_dir: &Path,
    port: u16,
    run_as_root: bool,
    relay: Option<u16>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "hostname = \"bench.example\"");
    let _ = writeln!(s, "data_dir = {}", toml_str(&data_dir.to_string_lossy()));
    if run_as_root {
        let _ = writeln!(s, "run_as_root = true");
    }
    s.push_str("[log]\nlevel = \"warn\"\n");
    let _ = writeln!(
        s,
        "[[listener]]\nkind = \"smtp\"\naddress = \"127.0.0.1:{port}\""
    );
    let _ = writeln!(
        s,
        "[[domain]]\nname = \"{LOCAL_DOMAIN}\"\nmailboxes = \"*\""
    );
    s.push_str("[limits]\nmax_connections = 20000\nmax_connections_per_ip = 20000\n");
    if let Some(sink) = relay {
        // mynetworks defaults to loopback: the bench client may relay.
        let _ = writeln!(
            s,
            "[relay.routes]\n\"{RELAY_DOMAIN}\" = \"[127.0.0.1]:{sink}\""
        );
    }
    s
}

/// The private Postfix instance's directories and settings.
pub struct PostfixLayout {
    pub config_dir: PathBuf,
    pub queue_dir: PathBuf,
    pub data_dir: PathBuf,
    pub mail_base: PathBuf,
    pub log_file: PathBuf,
    pub workdir: PathBuf,
    pub port: u16,
    /// uid and gid the virtual delivery agent writes the Maildirs as.
    pub virtual_ids: (u32, u32),
    /// The relay sink's port with `--relay`.
    pub relay: Option<u16>,
}

impl PostfixLayout {
    pub fn new(workdir: &Path, port: u16, virtual_ids: (u32, u32), relay: Option<u16>) -> Self {
        let dir = workdir.join("postfix");
        PostfixLayout {
            config_dir: dir.join("conf"),
            queue_dir: dir.join("queue"),
            data_dir: dir.join("data"),
            mail_base: workdir.join("pfmail"),
            log_file: workdir.join("postfix.log"),
            workdir: workdir.to_path_buf(),
            port,
            virtual_ids,
            relay,
        }
    }

    fn vmailbox(&self) -> PathBuf {
        self.config_dir.join("vmailbox")
    }

    fn transport(&self) -> PathBuf {
        self.config_dir.join("transport")
    }

    pub fn main_cf(&self) -> String {
        let p = |p: &Path| p.to_string_lossy().into_owned();
        let mut s = format!(
            "# estafeta-bench compare: a private Postfix instance (not the system's)
compatibility_level = 3.6
config_directory = {config}
queue_directory = {queue}
data_directory = {data}
myhostname = pfbench.example
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
biff = no
default_process_limit = 100
maillog_file = {log}
maillog_file_prefixes = {workdir}
virtual_mailbox_domains = {LOCAL_DOMAIN}
virtual_mailbox_base = {base}
virtual_mailbox_maps = texthash:{vmailbox}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
",
            config = p(&self.config_dir),
            queue = p(&self.queue_dir),
            data = p(&self.data_dir),
            log = p(&self.log_file),
            workdir = p(&self.workdir),
            base = p(&self.mail_base),
            vmailbox = p(&self.vmailbox()),
            uid = self.virtual_ids.0,
            gid = self.virtual_ids.1,
        );
        if self.relay.is_some() {
            let _ = write!(
                s,
                "relay_domains = {RELAY_DOMAIN}\ntransport_maps = texthash:{}\n",
                p(&self.transport())
            );
        }
        s
    }

    /// Postfix's services with no chroot and the SMTP server on 127.0.0.1:PORT only.
    pub fn master_cf(&self) -> String {
        let mut s = format!(
            "# service type private unpriv chroot wakeup maxproc command
127.0.0.1:{} inet n - n - - smtpd
",
            self.port
        );
        s.push_str(
            "pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
virtual unix - n n - - virtual
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
",
        );
        s
    }

    /// user0..user{mailboxes-1}@localhost, each to its Maildir under the mailbox base.
    pub fn vmailbox_map(mailboxes: u64) -> String {
        (0..mailboxes)
            .map(|n| format!("user{n}@{LOCAL_DOMAIN} {LOCAL_DOMAIN}/user{n}/Maildir/\n"))
            .collect()
    }

    pub fn transport_map(sink: u16) -> String {
        format!("{RELAY_DOMAIN} smtp:[127.0.0.1]:{sink}\n")
    }

    /// Writes the configuration and creates the directories.
    pub fn write(&self, mailboxes: u64) -> anyhow::Result<()> {
        for d in [&self.config_dir, &self.queue_dir, &self.mail_base] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let (uid, gid) = self.virtual_ids;
        std::os::unix::fs::chown(&self.mail_base, Some(uid), Some(gid))
            .with_context(|| format!("giving {} to uid {uid}", self.mail_base.display()))?;
        let files = [
            (self.config_dir.join("main.cf"), self.main_cf()),
            (self.config_dir.join("master.cf"), self.master_cf()),
            (self.vmailbox(), Self::vmailbox_map(mailboxes)),
        ];
        for (path, text) in files {
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(sink) = self.relay {
            fs::write(self.transport(), Self::transport_map(sink))
                .with_context(|| format!("writing {}", self.transport().display()))?;
        }
        Ok(())
    }
}

/// The last `max` bytes of a file, lossily decoded, for error messages.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

fn output_file(path: &Path) -> anyhow::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Runs a command to completion, its output appended to `out`; kills it after `limit`.
pub fn run_command(cmd: &mut Command, out: &Path, limit: Duration) -> anyhow::Result<()> {
    let what = format!("{cmd:?}");
    let f = output_file(out)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("running {what}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let said = tail(out, 2000);
            if said.is_empty() {
                bail!("{what} failed ({status}), without output");
            }
            bail!(
                "{what} failed ({status}); its output ({}):\n{said}",
                out.display()
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server process we started; stopped with SIGTERM (SIGKILL after 5 s).
pub struct Proc {
    pub name: &'static str,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log` (stdout to /dev/null when
    /// `quiet_stdout`). The child gets SIGTERM if this process dies first.
    pub fn spawn(
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
        quiet_stdout: bool,
    ) -> anyhow::Result<Proc> {
        let f = output_file(log)?;
        let stdout = if quiet_stdout {
            Stdio::null()
        } else {
            Stdio::from(f.try_clone()?)
        };
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name,
            log: log.to_path_buf(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ({}):\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 2000)
            );
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill with a pid we own (our child, not yet reaped) and a valid signal.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "estafeta-bench: {} did not stop on SIGTERM: killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A started private Postfix instance.
pub struct Postfix {
    pub postfix: PathBuf,
    pub config_dir: PathBuf,
    pub cmd_log: PathBuf,
    pub running: bool,
}

impl Postfix {
    pub fn command(postfix: &Path, config_dir: &Path, what: &str) -> Command {
        let mut c = Command::new(postfix);
        c.arg("-c").arg(config_dir).arg(what);
        c.env_remove("MAIL_CONFIG");
        c
    }

    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        if let Err(e) = run_command(
            &mut Self::command(&self.postfix, &self.config_dir, "stop"),
            &self.cmd_log,
            COMMAND_WITHIN,
        ) {
            eprintln!("estafeta-bench: stopping Postfix: {e:#}");
        }
    }
}

/// Everything started for a comparison; stopped (in reverse order) when dropped.
#[derive(Default)]
pub struct Fleet {
    pub procs: Vec<Proc>,
    pub postfix: Option<Postfix>,
}

impl Fleet {
    pub fn stop_all(&mut self) {
        if let Some(pf) = &mut self.postfix {
            pf.stop();
        }
        while let Some(mut p) = self.procs.pop() {
            p.stop();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Waits until the server at `addr` greets with 220 (the process, if given, must stay alive).
pub async fn wait_greeting(
    name: &str,
    addr: SocketAddr,
    mut proc: Option<&mut Proc>,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + GREETING_WITHIN;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        if let Some(p) = proc.as_deref_mut() {
            p.check_alive()?;
        }
        match greet(addr).await {
            Ok(220) => return Ok(()),
            Ok(code) => last = format!("greeted with {code}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow!(
        "{name} did not greet with 220 on {addr} within {GREETING_WITHIN:?} (last: {last}); log {}:\n{}",
        log.display(),
        tail(log, 2000)
    ))
}

async fn greet(addr: SocketAddr) -> io::Result<u16> {
    let mut c = Conn::connect(addr, Duration::from_secs(2), 1024).await?;
    let code = c.reply().await?;
    let _ = c.quit().await;
    Ok(code)
}

/// `COMMAND_WITHIN`, for callers outside this module.
pub fn command_limit() -> Duration {
    COMMAND_WITHIN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estafeta_config_text() {
        let c = estafeta_config(Path::new("/tmp/w \"x\"/estafeta-data"), 2600, true, None);
        assert_eq!(
            c,
            "hostname = \"bench.example\"
data_dir = \"/tmp/w \\\"x\\\"/estafeta-data\"
run_as_root = true
[log]
level = \"warn\"
[[listener]]
kind = \"smtp\"
address = \"127.0.0.1:2600\"
[[domain]]
name = \"localhost\"
mailboxes = \"*\"
[limits]
max_connections = 20000
max_connections_per_ip = 20000
"
        );
        let c = estafeta_config(Path::new("/d"), 2600, false, Some(2700));
        assert!(!c.contains("run_as_root"));
        assert!(c.ends_with("[relay.routes]\n\"remote.test\" = \"[127.0.0.1]:2700\"\n"));
    }

    #[test]
    fn postfix_files() {
        let l = PostfixLayout::new(Path::new("/w"), 2700, (65534, 65534), None);
        let main = l.main_cf();
        for line in [
            "config_directory = /w/postfix/conf\n",
            "queue_directory = /w/postfix/queue\n",
            "data_directory = /w/postfix/data\n",
            "mydestination =\n",
            "inet_interfaces = 127.0.0.1\n",
            "virtual_mailbox_base = /w/pfmail\n",
            "virtual_mailbox_maps = texthash:/w/postfix/conf/vmailbox\n",
            "virtual_uid_maps = static:65534\n",
            "maillog_file = /w/postfix.log\n",
            "maillog_file_prefixes = /w\n",
            "default_process_limit = 100\n",
            "biff = no\n",
        ] {
            assert!(main.contains(line), "{line}");
        }
        assert!(!main.contains("transport_maps"));
        let master = l.master_cf();
        assert!(master.contains("\n127.0.0.1:2700 inet n - n - - smtpd\n"));
        assert!(master.contains("\npostlog unix-dgram n - n - 1 postlogd\n"));
        // No chroot anywhere, no smtpd on port 25.
        for line in master.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split_whitespace().nth(4), Some("n"), "{line}");
        }
        assert!(!master.contains("smtp inet"));

        let map = PostfixLayout::vmailbox_map(16);
        assert_eq!(map.lines().count(), 16);
        assert!(map.starts_with("user0@localhost localhost/user0/Maildir/\n"));
        assert!(map.ends_with("user15@localhost localhost/user15/Maildir/\n"));

        let l = PostfixLayout::new(Path::new("/w"), 2700, (1, 1), Some(2800));
        let main = l.main_cf();
        assert!(main.contains("relay_domains = remote.test\n"));
        assert!(main.contains("transport_maps = texthash:/w/postfix/conf/transport\n"));
        assert_eq!(
            PostfixLayout::transport_map(2800),
            "remote.test smtp:[127.0.0.1]:2800\n"
        );
    }

    #[test]
    fn toml_strings() {
        assert_eq!(toml_str("a"), "\"a\"");
        assert_eq!(toml_str("a\\b\"c\n"), "\"a\\\\b\\\"c\\u000A\"");
    }

    #[test]
    fn ports_and_users() {
        assert!(free_port().unwrap() > 0);
        assert_eq!(user_ids("root"), Some((0, 0)));
        assert_eq!(user_ids("no-such-user-estafeta-bench"), None);
    }
}
