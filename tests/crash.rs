//! `kill -9` (and, every third trial, SIGTERM) at random moments under load, then a restart:
//! every message that got its `250` is delivered, and no message is delivered twice into a
//! mailbox (a delivery repeated after the crash finds the first one by its name). Each message
//! carries a unique Message-ID.
//!
//! `ESTAFETA_CRASH_TRIALS=N` sets the number of trials (default 3, enough for CI); run 20 or
//! more on demand: `ESTAFETA_CRASH_TRIALS=20 cargo test --release -p estafeta-e2e --test crash
//! -- --nocapture` prints each trial's figures.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estafeta_e2e::{Client, Process, free_port, test_config};

const MAILBOXES: [&str; 4] = ["m0", "m1", "m2", "m3"];

/// Sends messages in a loop until `stop`; records the Message-IDs that got a 250.
fn load(
    addr: SocketAddr,
    worker: usize,
    trial: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // The server may be gone (killed): Client panics then, which ends this connection.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut c = Client::connect(addr);
            c.set_timeout(Duration::from_secs(5));
            c.reply();
            c.cmd("EHLO loader.example");
            let mut sent = Vec::new();
            for _ in 0..5 {
                n += 1;
                let id = format!("t{trial}w{worker}n{n}@crash.test");
                let to = MAILBOXES[(n as usize + worker) % MAILBOXES.len()];
                if !c.cmd("MAIL FROM:<a@crash.test>").starts_with("250") {
                    break;
                }
                if !c
                    .cmd(&format!("RCPT TO:<{to}@example.test>"))
                    .starts_with("250")
                {
                    break;
                }
                if !c.cmd("DATA").starts_with("354") {
                    break;
                }
                c.write(
                    format!(
                        "Message-ID: <{id}>\r\nSubject: crash\r\n\r\n{}\r\n.\r\n",
                        "x".repeat(4000)
                    )
                    .as_bytes(),
                );
                if c.last().starts_with("250 ") {
                    sent.push(id);
                } else {
                    break;
                }
            }
            (sent, n)
        }));
        // A connection cut by the kill: what was acknowledged before it counts.
        match result {
            Ok((sent, m)) => {
                n = m;
                acked.lock().unwrap().extend(sent);
            }
            Err(_) => {
                n += 5;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Message-ID → how many times it is in the mailboxes.
fn delivered(data: &Path) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for mb in MAILBOXES {
        for sub in ["new", "cur"] {
            let dir = data
                .join("mail/example.test")
                .join(mb)
                .join("Maildir")
                .join(sub);
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                if let Some(id) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Message-ID: <"))
                    .map(|l| l.trim_end_matches('>').to_string())
                {
                    *out.entry(id).or_insert(0) += 1;
                }
            }
        }
    }
    out
}

fn spool_empty(data: &Path) -> bool {
    std::fs::read_dir(data.join("queue"))
        .map(|rd| {
            rd.flatten().all(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n == ".lock" || n == "damaged" || n == "free"
            })
        })
        .unwrap_or(true)
}

#[test]
fn kill_9_under_load_loses_nothing_and_delivers_nothing_twice() {
    let trials: usize = std::env::var("ESTAFETA_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        test_config(&data, port, "[log]\nlevel = \"warn\"\n")
            .replace("[log]\nlevel = \"info\"\n", ""),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    // The loaders' connections die with the server: their panics are expected, and quiet.
    std::panic::set_hook(Box::new(|_| {}));
    let mut seed = std::process::id() as u64;
    for trial in 0..trials {
        let mut server = Process::serve(&config, addr, &dir.path().join(format!("log{trial}")));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (stop, acked) = (stop.clone(), acked.clone());
                std::thread::spawn(move || load(addr, w, trial, stop, acked))
            })
            .collect();
        // A pseudo-random moment between 0.3 and 1.5 s into the load.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = 300 + (seed >> 33) % 1200;
        std::thread::sleep(Duration::from_millis(wait));
        let how = if trial % 3 == 2 {
            let status = server.terminate();
            assert!(status.success(), "SIGTERM under load: {status}");
            "SIGTERM"
        } else {
            server.kill9();
            "kill -9"
        };
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.join();
        }
        let count = acked.lock().unwrap().len();
        eprintln!("trial {trial}: {how} after {wait} ms; {count} messages acknowledged so far");
    }
    // Panics are reported again from here on.
    let _ = std::panic::take_hook();
    // The last start delivers what is left.
    let server = Process::serve(&config, addr, &dir.path().join("log-final"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !spool_empty(&data) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        spool_empty(&data),
        "the queue did not empty: {}",
        server.log_text()
    );
    let got = delivered(&data);
    let acked = acked.lock().unwrap().clone();
    let acked_set: HashSet<&String> = acked.iter().collect();
    let lost: Vec<&&String> = acked_set
        .iter()
        .filter(|id| !got.contains_key(id.as_str()))
        .collect();
    let twice: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "{trials} trials: {} acknowledged, {} delivered (unique), {} lost, {} delivered twice or more",
        acked.len(),
        got.len(),
        lost.len(),
        twice.len()
    );
    assert!(!acked.is_empty(), "the load sent nothing");
    assert!(lost.is_empty(), "acknowledged but not delivered: {lost:?}");
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    // Nothing damaged: every kill came between whole files or left a never-acknowledged one.
    let damaged = std::fs::read_dir(data.join("queue/damaged"))
        .map(|d| d.count())
        .unwrap_or(0);
    eprintln!("set aside as damaged (never acknowledged): {damaged}");
}
