//! Logging to the systemd journal with structured fields (`[log] format = "journald"`, the
//! default when systemd connected our stderr to the journal).
//!
//! Each event becomes one journal entry sent to journald's native socket: `MESSAGE` is the
//! same line the text format writes (`queued id=60F0… client=192.0.2.10 …`), so that
//! `journalctl -u estafeta`, grep and fail2ban see what they see in a text log; and every
//! field of the event is also a journal field of its own: `QUEUE_ID` (the event's `id`),
//! `CLIENT_IP` (its `client`), the others upper-cased (`FROM`, `NRCPT`, `REPLY`…), plus
//! `PRIORITY`, `SYSLOG_IDENTIFIER=estafeta` and `TARGET` (`estafeta::maillog` for the mail
//! log). So `journalctl QUEUE_ID=60F024A4D542` follows one message and
//! `journalctl CLIENT_IP=203.0.113.7` one client.
//!
//! Written here rather than with `tracing-journald`, which puts only the event's message in
//! `MESSAGE` (the `client=` that fail2ban matches would be missing) and names fields by their
//! upper-cased Rust names with a prefix.

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// journald's native protocol socket.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Whether systemd connected our stderr to the journal: `JOURNAL_STREAM` names the device and
/// inode of that stream (systemd.exec(5)); it must still be our stderr (not inherited by a
/// process whose stderr was redirected since).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let value = value.to_string_lossy();
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat(2) on fd 2 into a valid struct.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// The journal layer.
#[derive(Debug)]
pub struct JournaldLayer {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournaldLayer {
    /// Connects to journald's socket (`ESTAFETA_JOURNAL_SOCKET` overrides its path, for
    /// tests). Fails when there is no journal to send to.
    pub fn new() -> std::io::Result<JournaldLayer> {
        let path = std::env::var_os("ESTAFETA_JOURNAL_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(JOURNAL_SOCKET));
        let socket = UnixDatagram::unbound()?;
        // A journal that does not keep up must not stop the mail server (log calls run on
        // the async workers): a send never waits; an entry journald has no room for is
        // dropped (journald reads its socket continuously; this only matters when it is
        // wedged).
        socket.set_nonblocking(true)?;
        // An empty datagram is discarded by journald: this only checks that it listens.
        socket.send_to(&[], &path)?;
        Ok(JournaldLayer { socket, path })
    }
}

/// The journal name of an event field with this value.
fn journal_name(field: &str, value: &str) -> String {
    match field {
        "id" => "QUEUE_ID".to_string(),
        // `client=local` for sendmail's sessions is no address.
        "client" if value.parse::<std::net::IpAddr>().is_ok() => "CLIENT_IP".to_string(),
        "client" => "CLIENT".to_string(),
        // MESSAGE_ID is the journal's own (a catalog ID, 128-bit hex: `journalctl -x`).
        "message_id" => "MAIL_MESSAGE_ID".to_string(),
        other => {
            let mut name: String = other
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            // Names starting with "_" are the journal's own trusted fields; digits may not
            // start a name either.
            if name.starts_with(['_', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']) {
                name.insert(0, 'F');
            }
            name.truncate(64);
            name
        }
    }
}

/// Appends `NAME=value` to a native-protocol datagram (the length-prefixed form when the value
/// holds a newline).
fn put(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        buf.extend_from_slice(value);
    } else {
        buf.push(b'=');
        buf.extend_from_slice(value);
    }
    buf.push(b'\n');
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.push((field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push((field.name(), format!("{value:?}")));
        }
    }
}

impl<S: Subscriber> Layer<S> for JournaldLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let meta = event.metadata();
        // The text format's line: the message, then key=value (strings as written).
        let mut line = f.message.clone();
        for (k, v) in &f.fields {
            let _ = write!(line, " {k}={v}");
        }
        let priority = match *meta.level() {
            Level::ERROR => "3",
            Level::WARN => "4",
            Level::INFO => "6",
            Level::DEBUG | Level::TRACE => "7",
        };
        let mut buf = Vec::with_capacity(256 + line.len() * 2);
        put(&mut buf, "MESSAGE", line.as_bytes());
        put(&mut buf, "PRIORITY", priority.as_bytes());
        put(&mut buf, "SYSLOG_IDENTIFIER", b"estafeta");
        put(&mut buf, "TARGET", meta.target().as_bytes());
        for (k, v) in &f.fields {
            put(&mut buf, &journal_name(k, v), v.as_bytes());
        }
        // A datagram journald cannot take (too large) is cut to the message alone; one it has
        // no room for now (EAGAIN) is dropped.
        if let Err(e) = self.socket.send_to(&buf, &self.path)
            && e.kind() != std::io::ErrorKind::WouldBlock
        {
            let mut short = Vec::new();
            let cut: String = line.chars().take(16 * 1024).collect();
            put(&mut short, "MESSAGE", cut.as_bytes());
            put(&mut short, "PRIORITY", priority.as_bytes());
            put(&mut short, "SYSLOG_IDENTIFIER", b"estafeta");
            let _ = self.socket.send_to(&short, &self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names() {
        assert_eq!(journal_name("id", "60F024A4D542"), "QUEUE_ID");
        assert_eq!(journal_name("client", "192.0.2.7"), "CLIENT_IP");
        assert_eq!(journal_name("client", "2001:db8::7"), "CLIENT_IP");
        assert_eq!(journal_name("client", "local"), "CLIENT");
        assert_eq!(journal_name("message_id", "\"<a@b>\""), "MAIL_MESSAGE_ID");
        assert_eq!(journal_name("delay_s", "1"), "DELAY_S");
        assert_eq!(journal_name("_x", ""), "F_X");
        assert_eq!(journal_name("2fa", ""), "F2FA");
    }

    #[test]
    fn native_protocol_encoding() {
        let mut buf = Vec::new();
        put(&mut buf, "MESSAGE", b"one line");
        put(&mut buf, "REPLY", b"a\nb");
        let mut want = b"MESSAGE=one line\nREPLY\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n");
        assert_eq!(buf, want);
    }
}
