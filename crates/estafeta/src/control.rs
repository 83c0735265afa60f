//! The local control socket: how `estafeta queue flush|hold|release|delete|bounce` reaches the
//! running server.
//!
//! A Unix stream socket at `[control] socket` (default `data_dir/control.sock`), mode 0600: only
//! the service user (and root) may connect; the server also checks the peer's uid. One request
//! line, one answer line, then the server closes the connection:
//!
//! ```text
//! → flush                      every deferred message
//! → flush ID…                  these messages
//! → flush-domain DOMAIN        messages with a pending recipient in DOMAIN
//! → hold ID… | release ID… | delete ID… | bounce ID…
//! ← {"ok":true,"done":["ID",…],"skipped":["ID",…],"unknown":["ID",…]}
//! ← {"ok":false,"error":"…"}
//! → reload                     re-read the configuration file (`estafeta reload`)
//! ← {"ok":true,"warnings":["…",…]}
//! ← {"ok":false,"error":"<every error, file:line:column>"}
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use estafeta_queue::{AdminAction, AdminReport, QueueHandle, QueueId, Selection};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a reload asked for on the control socket came to: the warnings of an applied
/// reload, or why nothing changed (the configuration's errors, as `check-config` prints them).
pub type ReloadOutcome = Result<Vec<String>, String>;

/// A reload asked for on the control socket; the server's signal loop carries it out and
/// answers on the channel.
pub type ReloadRequest = tokio::sync::oneshot::Sender<ReloadOutcome>;

/// The longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// The request line for `action`.
pub fn encode_request(action: &AdminAction) -> String {
    action.to_string()
}

/// Parses a request line.
pub fn parse_request(line: &str) -> Result<AdminAction, String> {
    let mut words = line.split_ascii_whitespace();
    let verb = words.next().ok_or("empty request")?;
    let rest: Vec<&str> = words.collect();
    let ids = || -> Result<Vec<QueueId>, String> {
        if rest.is_empty() {
            return Err(format!("{verb}: no queue ID given"));
        }
        rest.iter()
            .map(|w| QueueId::parse(w).ok_or_else(|| format!("{w}: not a queue ID")))
            .collect()
    };
    Ok(match verb {
        "flush" if rest.is_empty() => AdminAction::Flush(Selection::All),
        "flush" => AdminAction::Flush(Selection::Ids(ids()?)),
        "flush-domain" => match rest[..] {
            [d] => AdminAction::Flush(Selection::Domain(d.to_string())),
            _ => return Err("flush-domain: exactly one domain expected".into()),
        },
        "hold" => AdminAction::Hold(ids()?),
        "release" => AdminAction::Release(ids()?),
        "delete" => AdminAction::Delete(ids()?),
        "bounce" => AdminAction::Bounce(ids()?),
        other => return Err(format!("unknown request {other:?}")),
    })
}

fn ids_json(ids: &[QueueId]) -> serde_json::Value {
    ids.iter().map(|i| i.to_string()).collect()
}

/// The answer line for a report.
pub fn encode_report(r: &AdminReport) -> String {
    serde_json::json!({
        "ok": true,
        "done": ids_json(&r.done),
        "skipped": ids_json(&r.skipped),
        "unknown": ids_json(&r.unknown),
    })
    .to_string()
}

/// Parses an answer line: the report, or the server's error.
pub fn parse_report(line: &str) -> Result<AdminReport, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("bad answer from the server: {e}"))?;
    if v["ok"] != serde_json::Value::Bool(true) {
        return Err(v["error"].as_str().unwrap_or("unknown error").to_string());
    }
    let ids = |k: &str| -> Vec<QueueId> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().and_then(QueueId::parse))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(AdminReport {
        done: ids("done"),
        skipped: ids("skipped"),
        unknown: ids("unknown"),
    })
}

/// The bound control socket, not served yet. Dropped unserved (the start failed after it was
/// bound), it removes its file: a failed start leaves nothing behind.
#[derive(Debug)]
pub struct ControlSocket {
    listener: Option<std::os::unix::net::UnixListener>,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the control socket (mode 0600). Done before the spool is recovered, so that from the
/// start on `estafeta queue` finds the server (its requests wait until [`serve`]) and never
/// takes a starting server for a stopped one. A socket file left by a server that is gone is
/// replaced; one that a running server answers on is an error (two servers on one spool).
pub fn bind(path: &Path) -> anyhow::Result<ControlSocket> {
    let listener = bind_unix(path, 0o600, "control socket")?;
    Ok(ControlSocket {
        listener: Some(listener),
        path: path.to_path_buf(),
    })
}

/// Binds a Unix stream socket at `path` with `mode`, non-blocking: its parent directory is
/// created when missing; a socket file left by a server that is gone is replaced; one that a
/// running server answers on is an error. `what` names it in errors.
pub fn bind_unix(
    path: &Path,
    mode: u32,
    what: &str,
) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{what}: cannot create {}", parent.display()))?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{what} {}: another server answers on it (one spool, one server)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("{what}: cannot remove stale {}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot create the {what} {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("{what}: cannot set the mode of {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the control socket until `shutdown`, then removes the socket file. Must run inside
/// a tokio runtime.
pub fn serve(
    mut socket: ControlSocket,
    queue: QueueHandle,
    reloads: tokio::sync::mpsc::Sender<ReloadRequest>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<()> {
    let path = socket.path.clone();
    let listener = socket
        .listener
        .take()
        .context("control socket already served")?;
    drop(socket);
    let listener = UnixListener::from_std(listener).context("control socket")?;
    tracing::info!(socket = %path.display(), "control socket ready");
    let conns = tracker.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let queue = queue.clone();
                        let reloads = reloads.clone();
                        conns.spawn(async move {
                            if let Err(e) = serve_one(stream, &queue, &reloads).await {
                                tracing::debug!(error = %e, "control connection");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

async fn serve_one(
    stream: UnixStream,
    queue: &QueueHandle,
    reloads: &tokio::sync::mpsc::Sender<ReloadRequest>,
) -> io::Result<()> {
    // The socket's mode already keeps others out; the peer's uid is checked as well.
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let me = unsafe { libc::geteuid() };
    let peer = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let answer = if peer != 0 && peer != me {
        error_json(&format!("uid {peer} may not use the control socket"))
    } else {
        let mut line = String::new();
        let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
        match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
            Err(_) => error_json("timed out waiting for the request"),
            Ok(Err(e)) => error_json(&format!("cannot read the request: {e}")),
            Ok(Ok(_)) if line.trim() == "reload" => reload(reloads).await,
            Ok(Ok(_)) => match parse_request(line.trim_end()) {
                Err(e) => error_json(&e),
                Ok(action) => match queue.admin(action).await {
                    Ok(report) => encode_report(&report),
                    Err(e) => error_json(&e.to_string()),
                },
            },
        }
    };
    write.write_all(format!("{answer}\n").as_bytes()).await?;
    write.shutdown().await
}

/// Asks the signal loop for a reload and waits for its outcome.
async fn reload(reloads: &tokio::sync::mpsc::Sender<ReloadRequest>) -> String {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if reloads.send(tx).await.is_err() {
        return error_json("the server is stopping");
    }
    match rx.await {
        Ok(Ok(warnings)) => serde_json::json!({ "ok": true, "warnings": warnings }).to_string(),
        Ok(Err(errors)) => error_json(&errors),
        Err(_) => error_json("the server is stopping"),
    }
}

/// Asks the server listening on `path` to re-read its configuration (`estafeta reload`):
/// `Ok(warnings)` when it did, `Err` with the configuration's errors (nothing changed) or
/// with why the server could not be asked.
pub fn send_reload(path: &Path) -> Result<Result<Vec<String>, String>, String> {
    use std::io::{BufRead, Write};
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the server on its control socket {}: {e}",
            path.display()
        )
    })?;
    let talk = || -> io::Result<String> {
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        (&stream).write_all(b"reload\n")?;
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line)?;
        Ok(line)
    };
    let line = talk().map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(line.trim_end())
        .map_err(|e| format!("bad answer from the server: {e}"))?;
    if v["ok"] == serde_json::Value::Bool(true) {
        let warnings = v["warnings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|w| w.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Ok(warnings))
    } else {
        Ok(Err(v["error"]
            .as_str()
            .unwrap_or("unknown error")
            .to_string()))
    }
}

fn error_json(text: &str) -> String {
    serde_json::json!({ "ok": false, "error": text }).to_string()
}

/// What came of trying the control socket.
#[derive(Debug)]
pub enum Sent {
    /// The running server did it.
    Done(AdminReport),
    /// No server answers (no socket file, or a stale one): the spool may be edited directly.
    NoServer,
}

/// Sends `action` to the server listening on `path` and waits for its answer (at most a
/// minute). `NoServer` when nothing listens; an error when something is there but does not
/// let us in or does not answer properly, since editing the spool under a running server would
/// race with it.
pub fn send(path: &Path, action: &AdminAction) -> Result<Sent, String> {
    use std::io::{BufRead, Write};
    let stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Sent::NoServer);
        }
        Err(e) => {
            return Err(format!(
                "cannot connect to the control socket {}: {e} (run as root or as the service user)",
                path.display()
            ));
        }
    };
    let talk = || -> io::Result<String> {
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        (&stream).write_all(format!("{}\n", encode_request(action)).as_bytes())?;
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line)?;
        Ok(line)
    };
    let line = talk().map_err(|e| format!("control socket {}: {e}", path.display()))?;
    if line.trim().is_empty() {
        return Err(format!(
            "control socket {}: the server closed the connection without an answer",
            path.display()
        ));
    }
    parse_report(line.trim_end()).map(Sent::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let a = QueueId::parse("0123456789AB").unwrap();
        let b = QueueId::parse("0123456789ac").unwrap();
        for action in [
            AdminAction::Flush(Selection::All),
            AdminAction::Flush(Selection::Ids(vec![a, b])),
            AdminAction::Flush(Selection::Domain("example.net".into())),
            AdminAction::Hold(vec![a]),
            AdminAction::Release(vec![a, b]),
            AdminAction::Delete(vec![b]),
            AdminAction::Bounce(vec![a]),
        ] {
            assert_eq!(parse_request(&encode_request(&action)), Ok(action));
        }
        assert!(parse_request("hold").is_err());
        assert!(parse_request("hold nope").is_err());
        assert!(parse_request("frobnicate").is_err());
        assert!(parse_request("flush-domain a b").is_err());
        let r = AdminReport {
            done: vec![a],
            skipped: vec![],
            unknown: vec![b],
        };
        assert_eq!(parse_report(&encode_report(&r)), Ok(r));
        assert_eq!(
            parse_report(&error_json("no")),
            Err::<AdminReport, _>("no".to_string())
        );
    }
}
