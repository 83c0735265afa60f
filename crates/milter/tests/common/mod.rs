//! What the integration tests share: free ports, real filter processes started and killed,
//! and the skip rule (a missing tool skips the test, unless `ESTAFETA_NO_SKIP` is set).

#![allow(dead_code)] // each test file uses its own part

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Says why a test cannot run: prints "skipped: …", or panics when `ESTAFETA_NO_SKIP` is
/// set (CI installs every tool, so a skip there is a failure).
pub fn skip(why: &str) {
    if std::env::var_os("ESTAFETA_NO_SKIP").is_some() {
        panic!("ESTAFETA_NO_SKIP is set but the test cannot run: {why}");
    }
    eprintln!("skipped: {why}");
}

/// A 127.0.0.1 port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A filter process, killed (and reaped) when dropped.
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
}

impl Drop for Daemon {
    /// SIGTERM first, so that a daemon with workers (rspamd) stops them too; SIGKILL if it is
    /// still there after 5 s.
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `command` and waits until `ready` holds (at most `within`); panics with the
    /// process's output if it dies or never gets ready.
    pub fn start(
        name: &'static str,
        mut command: Command,
        within: Duration,
        ready: impl Fn() -> bool,
    ) -> Daemon {
        command.stdin(Stdio::null());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut d = Daemon { child, name };
        let deadline = Instant::now() + within;
        loop {
            if ready() {
                return d;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("{name} exited before it was ready: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "{name} not ready within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Debian's python3 with the `Milter` module (python3-milter), or why not.
pub fn python_milter() -> Result<&'static str, String> {
    const PY: &str = "/usr/bin/python3";
    if !Path::new(PY).exists() {
        return Err(format!("{PY} not found (install python3-milter)"));
    }
    let ok = Command::new(PY)
        .args(["-c", "import Milter"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(PY)
    } else {
        Err(format!(
            "{PY} has no Milter module (install python3-milter)"
        ))
    }
}

/// The scripted milter script.
pub fn scripted_script() -> String {
    format!("{}/tests/milters/scripted.py", env!("CARGO_MANIFEST_DIR"))
}

/// Macro list helper.
pub fn macros(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}
