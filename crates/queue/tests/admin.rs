//! Queue administration on a real spool directory: the durable hold mark, the read-only scan,
//! the offline actions, and the running scheduler's flush / hold / release / delete / bounce.

mod common;
use common::{spool, until};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::reply;
use estafeta_proto::{ClientInfo, Envelope, MailParams, Recipient};
use estafeta_queue::{
    AdminAction, DeliveryJob, Failure, Outcome, QueueId, SchedulerConfig, Selection, Spool, Syncer,
    Transport, apply_offline,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn envelope(rcpts: &[&str]) -> Envelope {
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
        rcpts: rcpts
            .iter()
            .map(|r| Recipient {
                path: parse_forward_path(&format!("<{r}>")).unwrap().0,
                params: Default::default(),
            })
            .collect(),
    }
}

fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        retry: vec![Duration::from_secs(3600)],
        max_lifetime: Duration::from_secs(5 * 86_400),
        ..common::config()
    }
}

const BODY: &[u8] = b"Subject: queued\r\nX-Test: yes\r\n\r\nbody\r\n";

#[tokio::test]
async fn the_hold_mark_is_durable_and_old_state_files_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    let mut m = s
        .put(envelope(&["bob@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    m.held = true;
    m.status[0].attempts = 2;
    m.status[0].last_error = Some("451 4.4.1 connection refused".into());
    s.write_status(&mut m).await.unwrap();
    let back = s.load(m.id).unwrap();
    assert!(back.held);
    assert_eq!(back.status[0].attempts, 2);
    // A state file written before the hold mark existed: not held.
    let st = dir.path().join("queue").join(format!("{}.st", m.id));
    std::fs::write(
        &st,
        "estafeta-status 1\nnext 0\nrcpt 0 pending 1 451 4.4.1 refused\n",
    )
    .unwrap();
    let old = s.load(m.id).unwrap();
    assert!(!old.held);
    assert_eq!(
        old.status[0].last_error.as_deref(),
        Some("451 4.4.1 refused")
    );
    let headers = String::from_utf8(s.read_headers(m.id).unwrap()).unwrap();
    assert!(
        headers.starts_with("Received: from client.example"),
        "{headers}"
    );
    assert!(headers.ends_with("X-Test: yes\r\n"), "{headers}");
}

#[tokio::test]
async fn scanning_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    let m = s
        .put(envelope(&["bob@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    let q = dir.path().join("queue");
    std::fs::write(q.join("0123456789AB.tmp"), "half").unwrap();
    std::fs::write(q.join("0123456789AC"), "garbage").unwrap();
    let before: Vec<_> = std::fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let ro = Spool::open_existing(&q, "mx.example.test", Syncer::start().unwrap()).unwrap();
    let (list, broken) = ro.scan().unwrap();
    assert_eq!(list.iter().map(|m| m.id).collect::<Vec<_>>(), vec![m.id]);
    assert_eq!(broken.len(), 1);
    assert_eq!(broken[0].0, "0123456789AC");
    let after: Vec<_> = std::fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before.len(), after.len());
    assert!(Spool::open_existing(&dir.path().join("none"), "h", Syncer::start().unwrap()).is_err());
}

#[tokio::test]
async fn offline_actions_edit_the_spool_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    let c = cfg();
    let mut a = s
        .put(envelope(&["bob@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    a.next_attempt = estafeta_queue::unix_now() + 3600;
    s.write_status(&mut a).await.unwrap();
    let b = s
        .put(envelope(&["carol@other.example"]), BODY.to_vec())
        .await
        .unwrap();
    let unknown = QueueId::parse("000000000001").unwrap();

    let r = apply_offline(&s, &c, AdminAction::Hold(vec![a.id, unknown]))
        .await
        .unwrap();
    assert_eq!((r.done, r.unknown), (vec![a.id], vec![unknown]));
    assert!(s.load(a.id).unwrap().held);
    // A held message is not flushed.
    let r = apply_offline(&s, &c, AdminAction::Flush(Selection::All))
        .await
        .unwrap();
    assert_eq!((r.done, r.skipped), (vec![b.id], vec![a.id]));
    assert!(s.load(a.id).unwrap().next_attempt > 0);
    let r = apply_offline(&s, &c, AdminAction::Release(vec![a.id]))
        .await
        .unwrap();
    assert_eq!(r.done, vec![a.id]);
    let back = s.load(a.id).unwrap();
    assert!(!back.held);
    assert_eq!(
        back.next_attempt, 0,
        "released: tried at once at the next start"
    );
    // Flush by domain: only the messages with a pending recipient there.
    let mut a = s.load(a.id).unwrap();
    a.next_attempt = estafeta_queue::unix_now() + 3600;
    s.write_status(&mut a).await.unwrap();
    let r = apply_offline(
        &s,
        &c,
        AdminAction::Flush(Selection::Domain("REMOTE.example".into())),
    )
    .await
    .unwrap();
    assert_eq!(r.done, vec![a.id]);
    assert_eq!(s.load(a.id).unwrap().next_attempt, 0);
    // Delete: gone, without a notification.
    let r = apply_offline(&s, &c, AdminAction::Delete(vec![b.id]))
        .await
        .unwrap();
    assert_eq!(r.done, vec![b.id]);
    assert!(s.load(b.id).is_err());
    let (left, _) = s.scan().unwrap();
    assert_eq!(left.len(), 1);
    // Bounce: the message is replaced by a notification to its sender.
    let r = apply_offline(&s, &c, AdminAction::Bounce(vec![a.id]))
        .await
        .unwrap();
    assert_eq!(r.done, vec![a.id]);
    let (left, _) = s.scan().unwrap();
    assert_eq!(left.len(), 1);
    let dsn = &left[0];
    assert_ne!(dsn.id, a.id);
    assert_eq!(dsn.envelope.from.to_string(), "");
    assert_eq!(dsn.envelope.rcpts[0].path.to_string(), "alice@example.test");
    let text = String::from_utf8_lossy(s.read_content(dsn.id).unwrap().as_bytes()).into_owned();
    assert!(
        text.contains("Final-Recipient: rfc822; bob@remote.example"),
        "{text}"
    );
    assert!(text.contains("Status: 5.0.0"), "{text}");
    assert!(text.contains("administrator"), "{text}");
}

/// Defers everything at remote.example until opened; delivers the rest. Counts attempts.
struct Gate {
    open: Mutex<bool>,
    attempts: Mutex<Vec<(QueueId, String)>>,
    delivered: Mutex<Vec<(String, Vec<u8>)>>,
}

impl Transport for Gate {
    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let open = *self.open.lock().unwrap();
        job.rcpts
            .iter()
            .map(|&i| {
                let to = job.envelope.rcpts[i].path.to_string();
                self.attempts.lock().unwrap().push((job.id, to.clone()));
                if to.ends_with("@remote.example") && !open {
                    (i, Outcome::TempFail(Failure::local(reply::local_error())))
                } else {
                    let body = job.content.as_bytes().to_vec();
                    self.delivered.lock().unwrap().push((to, body));
                    (i, Outcome::Delivered("ok".into()))
                }
            })
            .collect()
    }
}

impl Gate {
    fn attempts_of(&self, id: QueueId) -> usize {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| *i == id)
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_scheduler_obeys_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(spool(dir.path()));
    let gate = Arc::new(Gate {
        open: Mutex::new(false),
        attempts: Mutex::new(Vec::new()),
        delivered: Mutex::new(Vec::new()),
    });
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(s.clone(), gate.clone(), cfg());
    let a = q
        .submit(envelope(&["bob@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    until("first attempt", || gate.attempts_of(a) == 1).await;
    until("state recorded", || {
        s.load(a).map(|m| m.next_attempt > 0).unwrap_or(false)
    })
    .await;

    // Hold: a flush leaves it alone, and the mark is on disk.
    let r = q.admin(AdminAction::Hold(vec![a])).await.unwrap();
    assert_eq!(r.done, vec![a]);
    // (Should the attempt still be returning, the hold takes effect when it does.)
    until("held on disk", || {
        s.load(a).map(|m| m.held).unwrap_or(false)
    })
    .await;
    let r = q.admin(AdminAction::Flush(Selection::All)).await.unwrap();
    assert_eq!(r.skipped, vec![a]);
    assert_eq!(q.flush_domain("remote.example").await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gate.attempts_of(a), 1);

    // Release: attempted at once (not in an hour).
    let r = q.admin(AdminAction::Release(vec![a])).await.unwrap();
    assert_eq!(r.done, vec![a]);
    until("attempt after release", || gate.attempts_of(a) == 2).await;
    until("state recorded", || {
        s.load(a)
            .map(|m| !m.held && m.next_attempt > 0)
            .unwrap_or(false)
    })
    .await;

    // Flush by domain (ETRN's entry point): attempted at once, and delivered once open.
    *gate.open.lock().unwrap() = true;
    // Right after the attempt the message may still be on its way back to the scheduler.
    let deadline = Instant::now() + Duration::from_secs(10);
    while q.flush_domain("Remote.Example").await.unwrap() != 1 {
        assert!(Instant::now() < deadline, "flush_domain never matched");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    until("delivered after flush", || {
        gate.delivered
            .lock()
            .unwrap()
            .iter()
            .any(|(to, _)| to == "bob@remote.example")
    })
    .await;
    until("removed", || s.load(a).is_err()).await;
    *gate.open.lock().unwrap() = false;

    // Delete and bounce.
    let b = q
        .submit(envelope(&["x@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    let c = q
        .submit(envelope(&["y@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    until("attempts", || {
        gate.attempts_of(b) == 1 && gate.attempts_of(c) == 1
    })
    .await;
    until("parked", || {
        s.load(b).map(|m| m.next_attempt > 0).unwrap_or(false)
            && s.load(c).map(|m| m.next_attempt > 0).unwrap_or(false)
    })
    .await;
    let unknown = QueueId::parse("000000000001").unwrap();
    let r = q
        .admin(AdminAction::Delete(vec![b, unknown]))
        .await
        .unwrap();
    assert_eq!((r.done, r.unknown), (vec![b], vec![unknown]));
    until("deleted", || s.load(b).is_err()).await;
    let r = q.admin(AdminAction::Bounce(vec![c])).await.unwrap();
    assert_eq!(r.done, vec![c]);
    until("bounce to the sender", || {
        gate.delivered
            .lock()
            .unwrap()
            .iter()
            .any(|(to, _)| to == "alice@example.test")
    })
    .await;
    let bounce = gate
        .delivered
        .lock()
        .unwrap()
        .iter()
        .find(|(to, _)| to == "alice@example.test")
        .map(|(_, m)| String::from_utf8_lossy(m).into_owned())
        .unwrap();
    assert!(
        bounce.contains("Final-Recipient: rfc822; y@remote.example"),
        "{bounce}"
    );
    assert!(bounce.contains("Action: failed"), "{bounce}");
    assert!(bounce.contains("Status: 5.0.0"), "{bounce}");
    until("bounced message removed", || s.load(c).is_err()).await;
    assert_eq!(gate.attempts_of(b), 1, "deleted: never attempted again");
    assert_eq!(
        s.scan().unwrap().0.len(),
        0,
        "only the delivered bounce passed through"
    );
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Blocks every attempt until the test lets it go, then defers it.
struct Blocker {
    entered: std::sync::atomic::AtomicUsize,
    go: tokio::sync::Semaphore,
}

impl Transport for Blocker {
    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        self.entered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.go.acquire().await.unwrap().forget();
        job.rcpts
            .iter()
            .map(|&i| (i, Outcome::TempFail(Failure::local(reply::local_error()))))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_flight_is_acted_on_when_its_attempt_returns() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(spool(dir.path()));
    let t = Arc::new(Blocker {
        entered: 0.into(),
        go: tokio::sync::Semaphore::new(0),
    });
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(s.clone(), t.clone(), cfg());

    // Delete while the transport holds the message: the file stays until the attempt returns.
    let a = q
        .submit(envelope(&["bob@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    until("in flight", || t.entered.load(Ordering::SeqCst) == 1).await;
    let r = q.admin(AdminAction::Delete(vec![a])).await.unwrap();
    assert_eq!(r.done, vec![a]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.load(a).is_ok(), "not removed under the transport's feet");
    t.go.add_permits(1);
    until("removed after the attempt", || s.load(a).is_err()).await;

    // Hold while in flight: held once the attempt is back, and a release undoes it.
    let b = q
        .submit(envelope(&["carol@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    until("in flight", || t.entered.load(Ordering::SeqCst) == 2).await;
    let r = q.admin(AdminAction::Hold(vec![b])).await.unwrap();
    assert_eq!(r.done, vec![b]);
    t.go.add_permits(1);
    until("held after the attempt", || {
        s.load(b).map(|m| m.held).unwrap_or(false)
    })
    .await;
    let r = q
        .admin(AdminAction::Flush(Selection::Ids(vec![b])))
        .await
        .unwrap();
    assert_eq!((r.done, r.skipped), (vec![], vec![b]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.entered.load(Ordering::SeqCst), 2, "held: not attempted");
    let r = q.admin(AdminAction::Release(vec![b])).await.unwrap();
    assert_eq!(r.done, vec![b]);
    until("attempted after release", || {
        t.entered.load(Ordering::SeqCst) == 3
    })
    .await;
    t.go.add_permits(1);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

/// A hold or delete asked for a message being attempted is carried out when the attempt
/// returns — also when the server is stopping by then (the scheduler waits for its attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_actions_are_carried_out_during_shutdown() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(spool(dir.path()));
    let t = Arc::new(Blocker {
        entered: 0.into(),
        go: tokio::sync::Semaphore::new(0),
    });
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(s.clone(), t.clone(), cfg());
    let a = q
        .submit(envelope(&["bob@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    let b = q
        .submit(envelope(&["carol@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    until("in flight", || t.entered.load(Ordering::SeqCst) == 2).await;
    assert_eq!(
        q.admin(AdminAction::Delete(vec![a])).await.unwrap().done,
        vec![a]
    );
    assert_eq!(
        q.admin(AdminAction::Hold(vec![b])).await.unwrap().done,
        vec![b]
    );
    shutdown.cancel(); // e.g. systemctl stop while a slow remote delivery runs
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.go.add_permits(2); // the attempts return (temporary failures)
    tracker.close();
    tracker.wait().await;
    let deleted_still_there = s.load(a).is_ok();
    let hold_on_disk = s.load(b).map(|m| m.held).unwrap_or(false);
    assert!(
        !deleted_still_there && hold_on_disk,
        "deleted message still queued: {deleted_still_there}; hold recorded: {hold_on_disk}"
    );
}

/// During shutdown the control socket is already gone while attempts still run: an offline
/// edit then is refused (the scheduler holds the spool's lock until its last attempt has
/// returned), so it can never be overwritten by a returning attempt; afterwards it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_wait_until_the_last_attempt_has_returned() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(spool(dir.path()));
    let t = Arc::new(Blocker {
        entered: 0.into(),
        go: tokio::sync::Semaphore::new(0),
    });
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(s.clone(), t.clone(), cfg());
    let a = q
        .submit(envelope(&["bob@remote.example"]), BODY.to_vec())
        .await
        .unwrap();
    until("in flight", || t.entered.load(Ordering::SeqCst) == 1).await;
    // A second scheduler on the same spool is refused too.
    let other = estafeta_queue::start(
        Arc::new(spool(dir.path())),
        t.clone(),
        cfg(),
        CancellationToken::new(),
        &TaskTracker::new(),
    );
    assert_eq!(other.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
    shutdown.cancel();
    let refused = apply_offline(&s, &cfg(), AdminAction::Hold(vec![a])).await;
    assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
    t.go.add_permits(1);
    tracker.close();
    tracker.wait().await;
    let r = apply_offline(&s, &cfg(), AdminAction::Hold(vec![a]))
        .await
        .unwrap();
    assert_eq!(r.done, vec![a]);
    assert!(s.load(a).unwrap().held);
}
