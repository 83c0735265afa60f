//! The scheduler on tokio's paused time: retries, the delay warning and the lifetime, each
//! asserted at the instant it is due (and just before), an hour of queue life in no time.
//!
//! The scheduler is given [`Clock::following_tokio`], so its Unix time moves only with tokio's
//! clock. Paused time advances by itself whenever the runtime has nothing to do, and the spool
//! waits for its syncer thread, which tokio cannot see: while the spool syncs, the clock would
//! run on from timer to timer. So every wait here keeps the test task ready ([`hold`]), and the
//! clock moves only when a test calls [`at`].

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::reply;
use estafeta_proto::{ClientInfo, Envelope, MailParams, Recipient};
use estafeta_queue::{
    Clock, DeliveryJob, Failure, Outcome, QueueHandle, QueueStats, SchedulerConfig, Transport,
};
use tokio::time::Instant;

/// Polls `f` to completion while keeping the task ready, so that paused time cannot advance
/// meanwhile (at most 10 s of real time).
async fn hold<F: Future>(f: F) -> F::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut f = pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(v),
        Poll::Pending => {
            assert!(std::time::Instant::now() < deadline, "held for 10 s");
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Waits, without letting time move, until `f` holds (at most 10 s of real time).
async fn settle(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    std::future::poll_fn(|cx| {
        if f() {
            return Poll::Ready(());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Waits until the scheduler is idle: nothing in flight. (A due message is dispatched at the
/// top of the loop's turn, before the loop answers for its stats; a notification is queued
/// before the attempt that caused it returns.)
async fn quiet(q: &QueueHandle) -> QueueStats {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = hold(q.stats()).await.unwrap();
        if s.in_flight == 0 {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "never quiet: {s:?}");
        hold(tokio::task::yield_now()).await;
    }
}

/// Moves paused time second by second to `t` after `start`, letting the scheduler do what is
/// due at each second before the next.
async fn at(q: &QueueHandle, start: Instant, t: Duration) {
    assert!(
        t >= start.elapsed(),
        "{t:?} is before {:?}",
        start.elapsed()
    );
    while start.elapsed() < t {
        let step = (t - start.elapsed()).min(Duration::from_secs(1));
        tokio::time::advance(step).await;
        quiet(q).await;
    }
}

/// Fails temporarily `failures` times, then delivers; records when each attempt started and
/// every notification the queue sends back (to `alice@example.test`).
struct Script {
    start: Instant,
    failures: Mutex<u32>,
    attempts: Mutex<Vec<Duration>>,
    delivered: Mutex<Vec<(String, String)>>,
}

impl Script {
    fn new(failures: u32) -> Arc<Script> {
        Arc::new(Script {
            start: Instant::now(),
            failures: Mutex::new(failures),
            attempts: Mutex::new(Vec::new()),
            delivered: Mutex::new(Vec::new()),
        })
    }
    fn attempts(&self) -> Vec<Duration> {
        self.attempts.lock().unwrap().clone()
    }
    fn notices(&self) -> Vec<String> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .filter(|(to, _)| to == "alice@example.test")
            .map(|(_, m)| m.clone())
            .collect()
    }
}

impl Transport for Script {
    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let to = job.envelope.rcpts[job.rcpts[0]].path.to_string();
        let body = String::from_utf8_lossy(job.content.as_bytes()).into_owned();
        if to == "alice@example.test" {
            self.delivered.lock().unwrap().push((to, body));
            return job
                .rcpts
                .iter()
                .map(|&i| (i, Outcome::Delivered("ok".into())))
                .collect();
        }
        self.attempts.lock().unwrap().push(self.start.elapsed());
        let mut left = self.failures.lock().unwrap();
        let outcome = if *left > 0 {
            *left -= 1;
            Outcome::TempFail(Failure::local(reply::local_error()))
        } else {
            self.delivered.lock().unwrap().push((to, body));
            Outcome::Delivered("ok".into())
        };
        job.rcpts.iter().map(|&i| (i, outcome.clone())).collect()
    }
}

fn envelope(rcpt: &str) -> Envelope {
    Envelope {
        client: ClientInfo {
            ip: "192.0.2.1".parse().unwrap(),
            port: 4000,
            helo: "client.example".into(),
            protocol: "ESMTP".into(),
            tls: None,
            auth: None,
            local_uid: None,
            name: None,
        },
        from: parse_reverse_path("<alice@example.test>").unwrap().0,
        params: MailParams::default(),
        rcpts: vec![Recipient {
            path: parse_forward_path(&format!("<{rcpt}>")).unwrap().0,
            params: Default::default(),
        }],
    }
}

const MIN: Duration = Duration::from_secs(60);

/// Retries [1 min, 5 min] (±10%); fails twice, then delivers. Nothing happens before each
/// retry is due; each happens when it is; then the file is gone and nobody is told.
#[tokio::test(start_paused = true)]
async fn each_retry_happens_when_due_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(common::spool(dir.path()));
    let t = Script::new(2);
    let q = common::start(
        spool.clone(),
        t.clone(),
        SchedulerConfig {
            retry: vec![MIN, 5 * MIN],
            clock: Clock::following_tokio(),
            ..common::config()
        },
    );
    let id = hold(
        q.handle
            .submit(envelope("bob@remote.example"), b"x\r\n".to_vec()),
    )
    .await
    .unwrap();
    settle("the first attempt", || t.attempts().len() == 1).await;
    let s = quiet(&q.handle).await;
    assert_eq!((s.messages, s.recipients_pending), (1, 1));
    assert_eq!(t.attempts()[0], Duration::ZERO, "attempted at once");

    // 1 min ± 10%: not at 53 s, done by 67 s.
    at(&q.handle, t.start, Duration::from_secs(53)).await;
    assert_eq!(quiet(&q.handle).await.messages, 1);
    assert_eq!(t.attempts().len(), 1, "{:?}", t.attempts());
    at(&q.handle, t.start, Duration::from_secs(67)).await;
    settle("the second attempt", || t.attempts().len() == 2).await;
    let second = t.attempts()[1];
    assert!((54..=66).contains(&second.as_secs()), "{second:?}");
    quiet(&q.handle).await;

    // 5 min ± 10% after the second: not 4 min 29 s after it, done by 5 min 31 s.
    at(&q.handle, t.start, second + Duration::from_secs(269)).await;
    assert_eq!(quiet(&q.handle).await.messages, 1);
    assert_eq!(t.attempts().len(), 2, "{:?}", t.attempts());
    at(&q.handle, t.start, second + Duration::from_secs(331)).await;
    settle("the third attempt", || t.attempts().len() == 3).await;
    assert_eq!(quiet(&q.handle).await.messages, 0);
    assert!(!spool.dir().join(id.to_string()).exists());
    assert!(t.notices().is_empty(), "{:?}", t.notices());

    q.shutdown.cancel();
    q.tracker.close();
    hold(q.tracker.wait()).await;
}

/// A message that keeps failing, retried every 10 min, a delay warning after 30 min, a
/// lifetime of 1 h: exactly one "delayed" notice at the first attempt past 30 min, exactly one
/// failure (5.4.7) at the first attempt past 1 h, then the message is gone.
#[tokio::test(start_paused = true)]
async fn the_delay_warning_and_the_lifetime_each_come_once_at_their_time() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(common::spool(dir.path()));
    let t = Script::new(u32::MAX);
    let q = common::start(
        spool.clone(),
        t.clone(),
        SchedulerConfig {
            retry: vec![10 * MIN],
            delay_warning: Some(30 * MIN),
            max_lifetime: 60 * MIN,
            clock: Clock::following_tokio(),
            ..common::config()
        },
    );
    let id = hold(
        q.handle
            .submit(envelope("bob@remote.example"), b"x\r\n".to_vec()),
    )
    .await
    .unwrap();
    settle("the first attempt", || t.attempts().len() == 1).await;
    quiet(&q.handle).await;

    // Second by second: what has happened by then.
    let mut warned_at = None;
    let mut failed_at = None;
    for second in 1..=90 * 60 {
        at(&q.handle, t.start, Duration::from_secs(second)).await;
        let notices = t.notices();
        let warned = notices
            .iter()
            .filter(|m| m.contains("Action: delayed"))
            .count();
        let failed = notices
            .iter()
            .filter(|m| m.contains("Action: failed"))
            .count();
        assert!(warned <= 1 && failed <= 1, "{notices:?}");
        if warned == 1 && warned_at.is_none() {
            warned_at = Some(second);
        }
        if failed == 1 && failed_at.is_none() {
            failed_at = Some(second);
            let s = quiet(&q.handle).await;
            assert_eq!(s.messages, 0, "the expired message is removed");
            assert!(!spool.dir().join(id.to_string()).exists());
            let text = notices
                .iter()
                .find(|m| m.contains("Action: failed"))
                .unwrap();
            assert!(text.contains("Status: 5.4.7"), "{text}");
            assert!(text.contains("delivery time expired"), "{text}");
        }
    }
    let attempts: Vec<u64> = t.attempts().iter().map(|d| d.as_secs()).collect();
    // Attempts 10 min ± 10% apart; the warning with the first one 30 min after the arrival,
    // the failure with the first one 60 min after, and no attempt after it. (The spool
    // stamps the arrival from the wall clock, in whole seconds: up to a second after the
    // scheduler's clock started.)
    for w in attempts.windows(2) {
        assert!((540..=660).contains(&(w[1] - w[0])), "{attempts:?}");
    }
    let first_past = |limit: u64| {
        let a = attempts.iter().copied().find(|&a| a >= limit).unwrap();
        let b = attempts.iter().copied().find(|&a| a > limit).unwrap_or(a);
        [a, b]
    };
    let warned_at = warned_at.expect("a delay warning");
    let failed_at = failed_at.expect("a failure notice");
    assert!(
        first_past(30 * 60).contains(&warned_at),
        "{warned_at} {attempts:?}"
    );
    assert!(
        first_past(60 * 60).contains(&failed_at),
        "{failed_at} {attempts:?}"
    );
    assert_eq!(*attempts.last().unwrap(), failed_at, "{attempts:?}");
    // Never delivered: only the two notices reached anybody.
    assert_eq!(t.delivered.lock().unwrap().len(), 2);

    q.shutdown.cancel();
    q.tracker.close();
    hold(q.tracker.wait()).await;
}
