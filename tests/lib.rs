//! Helpers for end-to-end tests: the real `estafeta` binary as a child process, an in-process
//! server for dialogue tests, a raw SMTP client that speaks over a real socket, and Maildir
//! inspection.

pub mod dns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Skips a test whose tool or privilege is missing on this machine: a note on a developer's
/// machine, a failure where `ESTAFETA_NO_SKIP` is set (`.ci/run` sets it: CI installs every
/// tool and runs as root, so a skip there means a broken install, not a pass).
pub fn skip(why: &str) {
    if std::env::var_os("ESTAFETA_NO_SKIP").is_some() {
        panic!("would skip, but ESTAFETA_NO_SKIP is set: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// A self-signed end-entity certificate made by openssl into `dir/TAG.pem` and
/// `dir/TAG.key`, for `names` (host names, or IP addresses): the first is its CN. Returns the
/// two paths as text, for configuration files.
pub fn self_signed(dir: &Path, tag: &str, names: &[&str]) -> (String, String) {
    let cert = dir.join(format!("{tag}.pem"));
    let key = dir.join(format!("{tag}.key"));
    let san = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(_) => format!("IP:{n}"),
            Err(_) => format!("DNS:{n}"),
        })
        .collect::<Vec<_>>()
        .join(",");
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={}", names[0])])
        .args(["-addext", &format!("subjectAltName={san}")])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl could not make a certificate");
    (cert.display().to_string(), key.display().to_string())
}

/// Adds a user to the users file of `config` with `estafeta user add --password-stdin`, as
/// a sysadmin would; panics when the command fails.
pub fn add_user(config: &Path, address: &str, password: &str) {
    let mut add = Command::new(estafeta_bin())
        .args(["user", "add", address, "--password-stdin", "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run estafeta user add");
    writeln!(add.stdin.take().expect("stdin"), "{password}").expect("write the password");
    let out = add.wait_with_output().expect("estafeta user add");
    assert!(
        out.status.success(),
        "estafeta user add {address} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The path of the `estafeta` binary, built (once per test process) so that it is never stale.
pub fn estafeta_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("ESTAFETA_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test> → target/<profile>
        let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "estafeta", "--bin", "estafeta"]);
        // What `cargo test` sets for the test process describes the test package, not the
        // build: build scripts that watch these variables (ring's CARGO_MANIFEST_DIR) would
        // see them change between this build and the outer one and rebuild the binary's
        // dependencies every time, in both.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || matches!(
                    &*name,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                )
            {
                cmd.env_remove(&*name);
            }
        }
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the estafeta binary failed"
        );
        profile_dir.join("estafeta")
    })
    .clone()
}

/// A free TCP port on 127.0.0.1 (bound and released). The kernel may hand the same
/// ephemeral port out again once it is released, so the ports given to this test process
/// are remembered and never given twice (two listeners of one config once got the same).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<std::collections::HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(Default::default);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

/// A configuration file for tests: SMTP on `port`, data in `data_dir`, local domains
/// `localhost` and `example.test` accepting every local part. `extra` is appended.
pub fn test_config(data_dir: &Path, port: u16, extra: &str) -> String {
    format!(
        r#"hostname = "mx.test.example"
data_dir = "{data}"
run_as_root = true

[log]
level = "info"

[[listener]]
kind = "smtp"
address = "127.0.0.1:{port}"

[[domain]]
name = "localhost"
mailboxes = "*"

[[domain]]
name = "example.test"
mailboxes = "*"

[queue]
retry = ["1s"]

{extra}
"#,
        data = data_dir.display()
    )
}

/// The real binary, running as a child process. Killed (SIGKILL) when dropped.
pub struct Process {
    /// The child.
    pub child: Child,
    /// Its SMTP address.
    pub addr: SocketAddr,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Process {
    /// Starts `estafeta serve --config FILE` and waits until the port accepts connections.
    pub fn serve(config_file: &Path, addr: SocketAddr, log: &Path) -> Process {
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new(estafeta_bin())
            .args(["serve", "--config"])
            .arg(config_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn estafeta");
        let mut p = Process {
            child,
            addr,
            log: log.to_path_buf(),
        };
        p.wait_ready();
        p
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("estafeta exited early ({status}): {}", self.log_text());
            }
            // Ready means greeted: the port is bound before the server has recovered its spool
            // and started accepting (a connection waits in the backlog meanwhile).
            if let Ok(s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                let left = deadline.saturating_duration_since(Instant::now());
                s.set_read_timeout(Some(left.max(Duration::from_millis(100))))
                    .unwrap();
                let mut greeting = String::new();
                // Any reply: a 220, or a refusal (421 too many connections, 554 a blocklisted
                // client) shows the accept loop serving too.
                if BufReader::new(s).read_line(&mut greeting).is_ok()
                    && greeting.len() >= 4
                    && greeting.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "estafeta did not listen on {}: {}",
            self.addr,
            self.log_text()
        );
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit (at most 30 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "estafeta did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Submits one message on a fresh connection (EHLO, MAIL, each RCPT, DATA, QUIT), asserting
/// that every step is accepted; `content` (CRLF lines, dot-stuffed by the caller if needed) is
/// followed by the end-of-data line. Returns the queue ID of the final `250`.
pub fn submit(addr: SocketAddr, from: &str, to: &[&str], content: &[u8]) -> String {
    let mut c = Client::connect(addr);
    c.reply();
    c.line("EHLO client.example.test");
    c.reply();
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    assert!(r.starts_with("250"), "MAIL FROM:<{from}>: {r}");
    for t in to {
        let r = c.cmd(&format!("RCPT TO:<{t}>"));
        assert!(r.starts_with("250"), "RCPT TO:<{t}>: {r}");
    }
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "DATA: {r}");
    c.write(content);
    c.write(b".\r\n");
    let r = c.last();
    let id = r
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("end of data: {r}"))
        .trim()
        .to_string();
    c.cmd("QUIT");
    id
}

/// A raw SMTP client over a real socket: writes exactly the bytes given and reads replies.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connects (and does not read the greeting: call [`Client::reply`]).
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// How long a read waits (10 s by default).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.writer.set_read_timeout(Some(timeout)).unwrap();
    }

    /// Writes raw bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
    }

    /// Writes `line` + CRLF.
    pub fn line(&mut self, line: &str) {
        self.write(format!("{line}\r\n").as_bytes());
    }

    /// Reads one reply (all its lines), each line without its CRLF. Empty when the server
    /// closed the connection.
    pub fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            match self.reader.read_line(&mut l) {
                Ok(0) => return lines,
                Ok(_) => {}
                Err(e) => panic!("read reply: {e} (so far {lines:?})"),
            }
            let l = l.trim_end_matches(['\r', '\n']).to_string();
            let last = l.len() < 4 || l.as_bytes()[3] != b'-';
            lines.push(l);
            if last {
                return lines;
            }
        }
    }

    /// Reads one reply and returns its last line.
    pub fn last(&mut self) -> String {
        self.reply().pop().unwrap_or_default()
    }

    /// Sends a command and returns the last line of its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.line(line);
        self.last()
    }

    /// True when the server has closed the connection (reads EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }
}

/// The files in `root/mail/<domain>/<user>/Maildir/new`, waiting up to `wait` for at least
/// `at_least` of them. Returns their contents sorted by file name.
pub fn maildir_new(
    data_dir: &Path,
    domain: &str,
    user: &str,
    at_least: usize,
    wait: Duration,
) -> Vec<Vec<u8>> {
    let dir = data_dir
        .join("mail")
        .join(domain)
        .join(user)
        .join("Maildir")
        .join("new");
    let deadline = Instant::now() + wait;
    loop {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        if names.len() >= at_least || Instant::now() >= deadline {
            names.sort();
            return names.iter().map(|p| std::fs::read(p).unwrap()).collect();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The message content after the headers this server adds on delivery (Return-Path,
/// Delivered-To and its own Received header).
pub fn strip_trace(message: &[u8]) -> Vec<u8> {
    let text = message;
    let mut pos = 0;
    for name in ["Return-Path:", "Delivered-To:", "Received:"] {
        assert!(
            text[pos..].starts_with(name.as_bytes()),
            "expected {name} at {pos}: {:?}",
            String::from_utf8_lossy(&text[pos..(pos + 80).min(text.len())])
        );
        // Skip the field and its folded continuation lines.
        loop {
            let eol = text[pos..].windows(2).position(|w| w == b"\r\n").unwrap() + pos + 2;
            pos = eol;
            if !matches!(text.get(pos), Some(b' ') | Some(b'\t')) {
                break;
            }
        }
    }
    text[pos..].to_vec()
}

/// An in-process server on a random port with its data in a temporary directory.
pub struct InProcess {
    /// The server.
    pub server: Option<estafeta::Server>,
    /// The SMTP address.
    pub addr: SocketAddr,
    /// The data directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The runtime the server runs on.
    pub runtime: tokio::runtime::Runtime,
}

impl InProcess {
    /// Starts a server from [`test_config`] with `extra` appended, on port 0.
    pub fn start(extra: &str) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let text = test_config(dir.path(), 0, extra);
        let cfg = estafeta_config::Config::parse(&text, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime
            .block_on(estafeta::Server::start(cfg))
            .expect("start server");
        let addr = server.addr(estafeta_config::ListenerKind::Smtp).unwrap();
        InProcess {
            server: Some(server),
            addr,
            dir,
            runtime,
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            self.runtime.block_on(s.wait(Duration::from_secs(5)));
        }
    }
}
