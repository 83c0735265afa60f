//! Counting what a server did with the messages it accepted: files in its Maildirs, or
//! `status=sent` lines in its mail log (relaying), polled until all are there or time is up.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::probe;

/// What to count.
pub enum Counter {
    /// Files in `DIR/*/*/Maildir/{new,cur}` and `DIR/*/Maildir/{new,cur}`.
    Maildir(PathBuf),
    /// Lines of a log file saying `status=sent` (Postfix) or `status="sent"` (estafeta).
    Log(LogCounter),
}

impl Counter {
    pub async fn count(&mut self) -> u64 {
        match self {
            Counter::Maildir(root) => count_maildir(root).await,
            Counter::Log(l) => l.poll(),
        }
    }
}

async fn count_maildir(root: &Path) -> u64 {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || probe::count_maildir(&root))
        .await
        .unwrap_or(0)
}

/// Counts the `status=sent` lines of a growing log file, reading only what was appended since
/// the last poll.
pub struct LogCounter {
    path: PathBuf,
    pos: u64,
    count: u64,
    /// The last, unfinished line.
    partial: Vec<u8>,
}

impl LogCounter {
    pub fn new(path: &Path) -> LogCounter {
        LogCounter {
            path: path.to_path_buf(),
            pos: 0,
            count: 0,
            partial: Vec::new(),
        }
    }

    /// Reads what was appended and returns the number of `sent` lines so far. A missing file
    /// counts as empty; a file that shrank (replaced) is read again from its start.
    pub fn poll(&mut self) -> u64 {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return self.count;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.pos {
            self.pos = 0;
            self.count = 0;
            self.partial.clear();
        }
        if len == self.pos || f.seek(SeekFrom::Start(self.pos)).is_err() {
            return self.count;
        }
        let mut buf = Vec::with_capacity((len - self.pos) as usize);
        let Ok(n) = f.read_to_end(&mut buf) else {
            return self.count;
        };
        self.pos += n as u64;
        self.partial.extend_from_slice(&buf);
        let Some(last_nl) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return self.count;
        };
        self.count += self.partial[..last_nl]
            .split(|&b| b == b'\n')
            .filter(|l| is_sent(l))
            .count() as u64;
        self.partial.drain(..=last_nl);
        self.count
    }
}

/// A mail-log line for a delivered or relayed message: Postfix's `status=sent` or estafeta's
/// `status="sent"` (text format) / `"status":"sent"` (JSON format).
pub fn is_sent(line: &[u8]) -> bool {
    const NEEDLES: [&[u8]; 3] = [b"status=sent", b"status=\"sent\"", b"\"status\":\"sent\""];
    NEEDLES
        .iter()
        .any(|n| line.windows(n.len()).any(|w| w == *n))
}

/// The outcome of waiting: how many arrived (above the baseline), the time from `start` to the
/// poll that last saw the count grow, and whether `target` was reached.
#[derive(Clone, Copy, Debug)]
pub struct Delivered {
    pub count: u64,
    pub elapsed: Duration,
    pub complete: bool,
}

/// Polls every 20 ms until `target` messages above `baseline` are counted or `limit` (from now)
/// has passed.
pub async fn wait(
    counter: &mut Counter,
    baseline: u64,
    target: u64,
    start: Instant,
    limit: Duration,
) -> Delivered {
    let deadline = Instant::now() + limit;
    let mut seen = 0;
    let mut last_growth = start;
    loop {
        let n = counter.count().await.saturating_sub(baseline);
        let now = Instant::now();
        if n > seen {
            seen = n;
            last_growth = now;
        }
        if seen >= target || now >= deadline {
            return Delivered {
                count: seen,
                elapsed: last_growth - start,
                complete: seen >= target,
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sent_lines() {
        assert!(is_sent(
            b"Dec 02 21:47:33 pfbench postfix/smtp[1]: 9EB5389B9B: to=<a@remote.test>, relay=127.0.0.1[127.0.0.1]:2700, delay=0.1, dsn=2.0.0, status=sent (250 2.0.0 Ok)"
        ));
        assert!(is_sent(
            b"2026-12-02T21:47:33Z  INFO estafeta::maillog: delivered id=X to=a@remote.test status=\"sent\" delay_s=0 transport=\"smtp\""
        ));
        assert!(is_sent(
            br#"{"fields":{"message":"delivered","status":"sent"}}"#
        ));
        assert!(!is_sent(b"status=deferred (connect to 127.0.0.1: refused)"));
        assert!(!is_sent(b"status=\"bounced\""));
        assert!(!is_sent(b""));
    }

    #[test]
    fn log_counter_reads_increments() {
        let path = std::env::temp_dir().join(format!("estafeta-bench-log-{}", std::process::id()));
        let _ = fs::remove_file(&path);
        let mut c = LogCounter::new(&path);
        assert_eq!(c.poll(), 0, "missing file");
        let mut f = fs::File::create(&path).unwrap();
        f.write_all(b"a status=sent\nb status=deferred\nc status=\"se")
            .unwrap();
        assert_eq!(c.poll(), 1);
        assert_eq!(c.poll(), 1, "nothing new");
        f.write_all(b"nt\"\n").unwrap();
        assert_eq!(c.poll(), 2, "the unfinished line completed");
        f.write_all(b"status=sent\nstatus=sent").unwrap();
        assert_eq!(c.poll(), 3, "the last line is not finished");
        f.write_all(b"\n").unwrap();
        assert_eq!(c.poll(), 4);
        drop(f);
        fs::write(&path, b"status=sent\n").unwrap();
        assert_eq!(c.poll(), 1, "a shorter file is read again");
        fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn wait_gives_up_at_the_limit() {
        let path = std::env::temp_dir().join(format!("estafeta-bench-wait-{}", std::process::id()));
        fs::write(&path, b"status=sent\nstatus=sent\n").unwrap();
        let mut c = Counter::Log(LogCounter::new(&path));
        let start = Instant::now();
        let d = wait(&mut c, 0, 2, start, Duration::from_secs(5)).await;
        assert!(d.complete && d.count == 2);
        let d = wait(&mut c, 1, 5, start, Duration::from_millis(60)).await;
        assert!(!d.complete);
        assert_eq!(d.count, 1);
        fs::remove_file(&path).unwrap();
    }
}
