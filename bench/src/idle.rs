//! Idle mode: open many connections, read each greeting, hold them open, measure the server's
//! memory, then QUIT them all. Every phase ends by a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::time::timeout_at;

use crate::smtp::Conn;

pub struct Params {
    pub addr: SocketAddr,
    pub connections: usize,
    pub in_flight: usize,
    pub timeout: Duration,
}

pub struct Outcome {
    /// Connections whose greeting was a 220, still open.
    pub greeted: Vec<Conn>,
    /// Greetings with another code.
    pub refused: usize,
    /// Connect or read errors, and connections not greeted by the deadline.
    pub errors: usize,
    pub timed_out: usize,
    /// From the start to the last 220 greeting.
    pub greet_time: Duration,
    pub error_samples: Vec<String>,
}

enum One {
    Greeted(Conn, Instant),
    Refused,
    Error(String),
    TimedOut,
}

pub async fn open_all(p: &Params) -> Outcome {
    let sem = Arc::new(Semaphore::new(p.in_flight.max(1)));
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + p.timeout);
    let mut tasks = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        let sem = Arc::clone(&sem);
        let (addr, timeout) = (p.addr, p.timeout);
        tasks.push(tokio::spawn(async move {
            let r = timeout_at(deadline, async {
                let _permit = sem.acquire_owned().await;
                // A small read buffer: thousands of these are held at once.
                let mut conn = match Conn::connect(addr, timeout, 512).await {
                    Ok(c) => c,
                    Err(e) => return One::Error(e.to_string()),
                };
                match conn.reply().await {
                    Ok(220) => One::Greeted(conn, Instant::now()),
                    Ok(_) => One::Refused,
                    Err(e) => One::Error(e.to_string()),
                }
            })
            .await;
            r.unwrap_or(One::TimedOut)
        }));
    }
    let mut out = Outcome {
        greeted: Vec::with_capacity(p.connections),
        refused: 0,
        errors: 0,
        timed_out: 0,
        greet_time: Duration::ZERO,
        error_samples: Vec::new(),
    };
    let mut last = start;
    for t in tasks {
        match t.await {
            Ok(One::Greeted(c, at)) => {
                out.greeted.push(c);
                last = last.max(at);
            }
            Ok(One::Refused) => out.refused += 1,
            Ok(One::TimedOut) => out.timed_out += 1,
            Ok(One::Error(e)) => {
                out.errors += 1;
                if out.error_samples.len() < 3 && !out.error_samples.contains(&e) {
                    out.error_samples.push(e);
                }
            }
            Err(e) => out.errors += usize::from(e.is_panic()),
        }
    }
    out.greet_time = last - start;
    out
}

/// Sends QUIT on every connection (bounded concurrency, overall deadline); returns how many
/// answered 221 and how long it took.
pub async fn quit_all(conns: Vec<Conn>, in_flight: usize, limit: Duration) -> (usize, Duration) {
    let sem = Arc::new(Semaphore::new(in_flight.max(1)));
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + limit);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let sem = Arc::clone(&sem);
            tokio::spawn(async move {
                timeout_at(deadline, async {
                    let _permit = sem.acquire_owned().await;
                    matches!(c.quit().await, Ok(221))
                })
                .await
                .unwrap_or(false)
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(matches!(t.await, Ok(true)));
    }
    (ok, start.elapsed())
}
