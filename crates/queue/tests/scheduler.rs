//! The scheduler's limits: in total and per destination, with a transport that takes its
//! time and counts how many attempts run at once.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::{ClientInfo, Envelope, MailParams, Recipient};
use estafeta_queue::{DeliveryJob, Outcome, SchedulerConfig, Spool, Syncer, Transport};

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
        from: parse_reverse_path("<>").unwrap().0,
        params: MailParams::default(),
        rcpts: vec![Recipient {
            path: parse_forward_path(&format!("<{rcpt}>")).unwrap().0,
            params: Default::default(),
        }],
    }
}

/// Every recipient domain is a destination; an attempt takes 150 ms.
#[derive(Default)]
struct Slow {
    now: Mutex<HashMap<String, usize>>,
    most: Mutex<HashMap<String, usize>>,
    total_now: Mutex<usize>,
    total_most: Mutex<usize>,
    done: Mutex<usize>,
}

impl Transport for Slow {
    fn destinations(&self, envelope: &Envelope, rcpts: &[usize]) -> Vec<String> {
        rcpts
            .iter()
            .map(|&i| envelope.rcpts[i].path.mailbox.domain.key())
            .collect()
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let domain = job.envelope.rcpts[0].path.mailbox.domain.key();
        {
            let mut now = self.now.lock().unwrap();
            let n = now.entry(domain.clone()).or_default();
            *n += 1;
            let mut most = self.most.lock().unwrap();
            let m = most.entry(domain.clone()).or_default();
            *m = (*m).max(*n);
            let mut t = self.total_now.lock().unwrap();
            *t += 1;
            let mut tm = self.total_most.lock().unwrap();
            *tm = (*tm).max(*t);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        *self.now.lock().unwrap().get_mut(&domain).unwrap() -= 1;
        *self.total_now.lock().unwrap() -= 1;
        *self.done.lock().unwrap() += 1;
        job.rcpts
            .iter()
            .map(|&i| (i, Outcome::Delivered("ok".into())))
            .collect()
    }
}

#[tokio::test]
async fn one_busy_destination_does_not_hold_up_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(common::spool(dir.path()));
    let t = Arc::new(Slow::default());
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(
        spool,
        t.clone(),
        SchedulerConfig {
            max_deliveries: 6,
            max_per_destination: 2,
            ..common::config()
        },
    );
    // Ten messages for the busy domain first, then three for two others.
    for i in 0..10 {
        q.submit(envelope(&format!("u{i}@busy.test")), b"x\r\n".to_vec())
            .await
            .unwrap();
    }
    for rcpt in ["a@one.test", "b@one.test", "c@two.test"] {
        q.submit(envelope(rcpt), b"x\r\n".to_vec()).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while *t.done.lock().unwrap() < 13 {
        assert!(std::time::Instant::now() < deadline, "not all delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let most = t.most.lock().unwrap().clone();
    assert_eq!(most["busy.test"], 2, "{most:?}");
    assert_eq!(most["one.test"], 2, "{most:?}");
    assert_eq!(most["two.test"], 1, "{most:?}");
    // The others ran beside the busy one: more than its 2 at once in total, never over 6.
    let total = *t.total_most.lock().unwrap();
    assert!((3..=6).contains(&total), "{total}");
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Relays every recipient: `nodsn@…` to a server without DSN, the others to one with DSN;
/// keeps what is sent to `alice@…` (the notifications).
#[derive(Default)]
struct Relay {
    to_alice: Mutex<Vec<String>>,
}

impl Transport for Relay {
    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        job.rcpts
            .iter()
            .map(|&i| {
                let rcpt = job.envelope.rcpts[i].path.to_string();
                if rcpt.starts_with("alice@") {
                    self.to_alice
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(job.content.as_bytes()).into_owned());
                    return (i, Outcome::Delivered("maildir".into()));
                }
                (
                    i,
                    Outcome::Relayed {
                        detail: "mx.remote.test said: 250 ok".into(),
                        dsn_passed: !rcpt.starts_with("nodsn@"),
                    },
                )
            })
            .collect()
    }
}

#[tokio::test]
async fn notify_success_gives_relayed_only_where_the_next_server_has_no_dsn() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(common::spool(dir.path()));
    let t = Arc::new(Relay::default());
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(spool, t.clone(), common::config());
    let mut env = envelope("nodsn@remote.test");
    env.from = parse_reverse_path("<alice@example.test>").unwrap().0;
    env.rcpts
        .push(envelope("withdsn@remote.test").rcpts.remove(0));
    for r in &mut env.rcpts {
        r.params.notify = Some(estafeta_proto::command::Notify {
            success: true,
            failure: true,
            ..Default::default()
        });
    }
    q.submit(env, b"Subject: x\r\n\r\nx\r\n".to_vec())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t.to_alice.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no report");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give a second (wrong) report the time to appear.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reports = t.to_alice.lock().unwrap().clone();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = &reports[0];
    assert!(
        r.contains("Final-Recipient: rfc822; nodsn@remote.test"),
        "{r}"
    );
    assert!(r.contains("Action: relayed"), "{r}");
    assert!(!r.contains("withdsn@remote.test"), "{r}");
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Fails every recipient for good; keeps the messages offered to the postmaster, and fails
/// those too when `postmaster_fails`.
struct Refuser {
    postmaster_fails: bool,
    to_postmaster: Mutex<Vec<String>>,
}

impl Transport for Refuser {
    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        job.rcpts
            .iter()
            .map(|&i| {
                let rcpt = job.envelope.rcpts[i].path.to_string();
                if rcpt == "postmaster@example.test" {
                    self.to_postmaster
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(job.content.as_bytes()).into_owned());
                    if !self.postmaster_fails {
                        return (i, Outcome::Delivered("maildir".into()));
                    }
                }
                let r = estafeta_proto::reply::user_unknown(&rcpt);
                (i, Outcome::PermFail(estafeta_queue::Failure::local(r)))
            })
            .collect()
    }
}

async fn double_bounce(postmaster_fails: bool) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(common::spool(dir.path()));
    let t = Arc::new(Refuser {
        postmaster_fails,
        to_postmaster: Mutex::new(Vec::new()),
    });
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(
        spool,
        t.clone(),
        SchedulerConfig {
            double_bounce_to: Some(
                parse_forward_path("<postmaster@example.test>")
                    .unwrap()
                    .0
                    .mailbox,
            ),
            ..common::config()
        },
    );
    // A bounce (from <>) to an address that does not exist.
    q.submit(
        envelope("gone@remote.test"),
        b"Subject: bounce\r\n\r\nx\r\n".to_vec(),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t.to_postmaster.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no report");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Time for a (wrong) report about the report.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    t.to_postmaster.lock().unwrap().clone()
}

#[tokio::test]
async fn an_undeliverable_bounce_goes_to_the_postmaster_once() {
    let reports = double_bounce(false).await;
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(
        reports[0].contains("Final-Recipient: rfc822; gone@remote.test"),
        "{}",
        reports[0]
    );
    // Even when the postmaster cannot be reached, there is no report about the report.
    assert_eq!(double_bounce(true).await.len(), 1);
}

/// busy.example never answers; everything else is delivered at once.
#[derive(Default)]
struct Hang {
    other_done: std::sync::atomic::AtomicBool,
}

impl Transport for Hang {
    fn destinations(&self, envelope: &Envelope, rcpts: &[usize]) -> Vec<String> {
        rcpts
            .iter()
            .map(|&i| envelope.rcpts[i].path.mailbox.domain.key())
            .collect()
    }
    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        if job.envelope.rcpts[0].path.mailbox.domain.key() == "busy.example" {
            std::future::pending::<()>().await;
        }
        self.other_done
            .store(true, std::sync::atomic::Ordering::SeqCst);
        job.rcpts
            .iter()
            .map(|&i| (i, Outcome::Delivered("ok".into())))
            .collect()
    }
}

/// A deep backlog for one busy destination (10,000 due messages) does not hold up the mail
/// for another one: blocked messages are set aside per destination, never rescanned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deep_backlog_for_one_domain_does_not_starve_the_others() {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let spool = Arc::new(
        Spool::open(
            &dir.path().join("q"),
            "mx.example.test",
            Syncer::start().unwrap(),
        )
        .unwrap(),
    );
    let t = Arc::new(Hang::default());
    let cfg = SchedulerConfig {
        max_deliveries: 8,
        max_per_destination: 1,
        retry: vec![Duration::from_secs(3600)],
        max_lifetime: Duration::from_secs(86_400),
        ..common::config()
    };
    // Queued while the server was down (or: an outage at a big provider, then a flush).
    for _ in 0..10_002 {
        spool
            .put(envelope("x@busy.example"), b"x\r\n".to_vec())
            .await
            .unwrap();
    }
    spool
        .put(envelope("y@other.example"), b"x\r\n".to_vec())
        .await
        .unwrap();
    let common::Queue {
        handle: _q,
        shutdown,
        ..
    } = common::start(spool.clone(), t.clone(), cfg);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ok = t.other_done.load(std::sync::atomic::Ordering::SeqCst);
    shutdown.cancel();
    assert!(
        ok,
        "other.example never attempted: 7 of 8 delivery slots idle"
    );
}

/// Delivers each message once the test lets it (one permit per attempt); counts the attempts
/// started.
struct Gate {
    open: tokio::sync::Semaphore,
    started: std::sync::atomic::AtomicUsize,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            open: tokio::sync::Semaphore::new(0),
            started: Default::default(),
        }
    }
}

impl Gate {
    fn started(&self) -> usize {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Transport for Gate {
    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.open.acquire().await.unwrap().forget();
        job.rcpts
            .iter()
            .map(|&i| (i, Outcome::Delivered("ok".into())))
            .collect()
    }
}

fn envelope_to(rcpts: &[&str]) -> Envelope {
    let mut e = envelope(rcpts[0]);
    for r in &rcpts[1..] {
        e.rcpts.push(Recipient {
            path: parse_forward_path(&format!("<{r}>")).unwrap().0,
            params: Default::default(),
        });
    }
    e
}

#[tokio::test]
async fn stats_count_every_message_wherever_it_waits() {
    use estafeta_queue::{AdminAction, QueueStats, unix_now};
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(common::spool(dir.path()));
    let t = Arc::new(Gate::default());
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(
        spool,
        t.clone(),
        SchedulerConfig {
            max_deliveries: 1,
            ..common::config()
        },
    );
    assert_eq!(q.stats().await.unwrap(), QueueStats::default());
    let before = unix_now();
    q.submit(envelope_to(&["a@x.test", "b@x.test"]), b"x\r\n".to_vec())
        .await
        .unwrap();
    q.submit(envelope("c@x.test"), b"x\r\n".to_vec())
        .await
        .unwrap();
    let third = q
        .submit(envelope("d@x.test"), b"x\r\n".to_vec())
        .await
        .unwrap();
    let after = unix_now();
    // One in flight (the limit), two due, four recipients in all.
    let s = q.stats().await.unwrap();
    assert_eq!(
        (s.messages, s.in_flight, s.held, s.recipients_pending),
        (3, 1, 0, 4),
        "{s:?}"
    );
    let oldest = s.oldest_arrival.expect("an oldest message");
    assert!(
        (before..=after).contains(&oldest),
        "{oldest} not in {before}..={after}"
    );
    // A held message still counts, as held.
    q.admin(AdminAction::Hold(vec![third])).await.unwrap();
    let s = q.stats().await.unwrap();
    assert_eq!((s.messages, s.held), (3, 1), "{s:?}");
    // The two others delivered: only the held one is left.
    t.open.add_permits(2);
    common::until("two deliveries", || t.started() >= 2).await;
    until_stats(&q, |s| s.messages == 1).await;
    let s = q.stats().await.unwrap();
    assert_eq!(
        (s.held, s.in_flight, s.recipients_pending),
        (1, 0, 1),
        "{s:?}"
    );
    q.admin(AdminAction::Delete(vec![third])).await.unwrap();
    assert_eq!(q.stats().await.unwrap(), QueueStats::default());
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    // Stopped: the question fails instead of waiting forever.
    assert!(q.stats().await.is_err());
}

#[tokio::test]
async fn reconfigure_changes_the_limits_of_a_running_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(common::spool(dir.path()));
    let t = Arc::new(Gate::default());
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(
        spool,
        t.clone(),
        SchedulerConfig {
            max_deliveries: 1,
            ..common::config()
        },
    );
    for rcpt in ["a@x.test", "b@x.test", "c@x.test", "d@x.test"] {
        q.submit(envelope(rcpt), b"x\r\n".to_vec()).await.unwrap();
    }
    // Events are handled in order: each answer below comes after the loop dispatched.
    assert_eq!(q.stats().await.unwrap().in_flight, 1);
    q.reconfigure(SchedulerConfig {
        max_deliveries: 3,
        ..common::config()
    })
    .unwrap();
    assert_eq!(q.stats().await.unwrap().in_flight, 3);
    common::until("three attempts", || t.started() == 3).await;
    // Down again: the attempts running go on; no new one starts until there is room.
    q.reconfigure(SchedulerConfig {
        max_deliveries: 1,
        ..common::config()
    })
    .unwrap();
    t.open.add_permits(1);
    until_stats(&q, |s| s.messages == 3).await;
    let s = q.stats().await.unwrap();
    assert_eq!((s.messages, s.in_flight), (3, 2), "{s:?}");
    t.open.add_permits(10);
    until_stats(&q, |s| s.messages == 0).await;
    assert_eq!(t.started(), 4);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    assert!(q.reconfigure(common::config()).is_err());
}

/// Waits (at most 10 s) until the queue's stats satisfy `f`.
async fn until_stats(
    q: &estafeta_queue::QueueHandle,
    f: impl Fn(&estafeta_queue::QueueStats) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = q.stats().await.unwrap();
        if f(&s) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The loop turns at least every second when idle, so `last_turn` stays fresh; once the loop
/// has stopped (as a wedged one would), it grows. On paused time: every instant is exact.
#[tokio::test(start_paused = true)]
async fn an_idle_scheduler_keeps_its_heartbeat_fresh() {
    use estafeta_queue::scheduler::TICK;
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(common::spool(dir.path()));
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(spool, Arc::new(Gate::default()), common::config());
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(2_700)).await;
        assert!(q.last_turn() <= TICK, "{:?}", q.last_turn());
    }
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        q.last_turn() >= Duration::from_secs(30),
        "{:?}",
        q.last_turn()
    );
}
