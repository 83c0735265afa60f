//! The spool on a real directory: durability contract, recovery, state records, scheduling.

mod common;
use common::spool;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::command::{Notify, RcptParams};
use estafeta_proto::reply;
use estafeta_proto::{ClientInfo, Envelope, MailParams, Recipient};
use estafeta_queue::{DeliveryJob, Failure, Outcome, RcptState, SchedulerConfig, Transport};
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
        params: MailParams {
            envid: Some("QQ+2B1".into()),
            ..Default::default()
        },
        rcpts: rcpts
            .iter()
            .map(|r| Recipient {
                path: parse_forward_path(&format!("<{r}>")).unwrap().0,
                params: RcptParams {
                    notify: Some(Notify {
                        success: true,
                        failure: true,
                        ..Default::default()
                    }),
                    orcpt: None,
                },
            })
            .collect(),
    }
}

#[tokio::test]
async fn put_load_recover_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    let env = envelope(&["bob@localhost", "carol@localhost"]);
    let m = s
        .put(env.clone(), b"Subject: x\r\n\r\nbody\r\n".to_vec())
        .await
        .unwrap();
    assert_eq!(m.id.to_string().len(), 12);
    let content = s.read_content(m.id).unwrap();
    let text = String::from_utf8(content.as_bytes().to_vec()).unwrap();
    assert_eq!(m.content.as_ref().unwrap().as_bytes(), content.as_bytes());
    assert!(
        text.starts_with("Received: from client.example (unknown [192.0.2.1])"),
        "{text}"
    );
    assert!(text.contains(&format!("id {}", m.id)));
    assert!(text.ends_with("Subject: x\r\n\r\nbody\r\n"));
    assert_eq!(m.size, content.as_bytes().len() as u64);

    // A half-written file left by a crash is removed at recovery; the real one is kept.
    std::fs::write(s.dir().join("000000000001.tmp"), b"half").unwrap();
    let s2 = spool(dir.path());
    let all = s2.recover().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].envelope, env);
    assert_eq!(all[0].id, m.id);
    assert!(!s2.dir().join("000000000001.tmp").exists());
}

/// A milter's quarantine: the message is stored held, and still held after a restart. The
/// mark is written first, so a crash can never leave the message without it.
#[tokio::test]
async fn a_held_message_is_held_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    let m = s
        .put_held(
            envelope(&["bob@localhost"]),
            b"Subject: q\r\n\r\nq\r\n".to_vec(),
        )
        .await
        .unwrap();
    assert!(m.held && m.has_status_file);
    assert!(
        s.read_content(m.id)
            .unwrap()
            .as_bytes()
            .ends_with(b"Subject: q\r\n\r\nq\r\n")
    );
    let all = spool(dir.path()).recover().unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].held);
    assert_eq!(all[0].id, m.id);
}

#[tokio::test]
async fn status_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    let mut m = s
        .put(envelope(&["a@localhost", "b@localhost"]), b"x\r\n".to_vec())
        .await
        .unwrap();
    m.status[0].state = RcptState::Delivered;
    m.status[0].attempts = 1;
    m.status[1].attempts = 1;
    m.status[1].last_error = Some("451 4.3.0 disk full".into());
    m.next_attempt = 4_000_000_000;
    s.write_status(&mut m).await.unwrap();
    let back = spool(dir.path()).recover().unwrap().pop().unwrap();
    assert_eq!(back.status, m.status);
    assert_eq!(back.next_attempt, 4_000_000_000);
    assert_eq!(back.pending(), vec![1]);
}

/// A transport that fails a recipient a given number of times, then delivers.
struct Flaky {
    failures_left: Mutex<u32>,
    delivered: Mutex<Vec<String>>,
}

impl Transport for Flaky {
    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let mut left = self.failures_left.lock().unwrap();
        job.rcpts
            .iter()
            .map(|&i| {
                if *left > 0 {
                    *left -= 1;
                    (i, Outcome::TempFail(Failure::local(reply::local_error())))
                } else {
                    self.delivered
                        .lock()
                        .unwrap()
                        .push(job.envelope.rcpts[i].path.to_string());
                    (i, Outcome::Delivered("ok".into()))
                }
            })
            .collect()
    }
}

#[tokio::test]
async fn scheduler_retries_then_removes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(spool(dir.path()));
    let t = Arc::new(Flaky {
        failures_left: Mutex::new(1),
        delivered: Mutex::new(Vec::new()),
    });
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(
        s.clone(),
        t.clone(),
        SchedulerConfig {
            retry: vec![Duration::from_secs(1)],
            ..common::config()
        },
    );
    let id = q
        .submit(envelope(&["bob@localhost"]), b"x\r\n".to_vec())
        .await
        .unwrap();
    // The first attempt fails; the retry one second later delivers and removes the file.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.dir().join(id.to_string()).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "not delivered in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // bob got the message, and alice (NOTIFY=SUCCESS) a success report.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t.delivered.lock().unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no success report");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        *t.delivered.lock().unwrap(),
        vec![
            "bob@localhost".to_string(),
            "alice@example.test".to_string()
        ]
    );
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

/// A transport that fails `bad@…` for good, keeps failing `slow@…` for now, delivers the rest,
/// and keeps what it delivered.
struct Judge {
    delivered: Mutex<Vec<(String, Vec<u8>)>>,
}

impl Transport for Judge {
    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        job.rcpts
            .iter()
            .map(|&i| {
                let to = job.envelope.rcpts[i].path.to_string();
                if to.starts_with("bad@") {
                    let r = estafeta_proto::Reply::new(
                        550,
                        estafeta_proto::Status::new(5, 1, 1),
                        format!("<{to}>: User unknown"),
                    );
                    let f = Failure {
                        reply: r,
                        remote: Some("mx.remote.example".into()),
                        command: Some("RCPT TO".into()),
                    };
                    (i, Outcome::PermFail(f))
                } else if to.starts_with("slow@") {
                    (i, Outcome::TempFail(Failure::local(reply::local_error())))
                } else {
                    self.delivered
                        .lock()
                        .unwrap()
                        .push((to, job.content.as_bytes().to_vec()));
                    (i, Outcome::Delivered("ok".into()))
                }
            })
            .collect()
    }
}

fn judge_queue(
    dir: &std::path::Path,
    max_lifetime: Duration,
) -> (
    Arc<Judge>,
    estafeta_queue::QueueHandle,
    CancellationToken,
    TaskTracker,
) {
    let s = Arc::new(spool(dir));
    let t = Arc::new(Judge {
        delivered: Mutex::new(Vec::new()),
    });
    let common::Queue {
        handle: q,
        shutdown,
        tracker,
    } = common::start(
        s,
        t.clone(),
        SchedulerConfig {
            retry: vec![Duration::from_secs(1)],
            max_lifetime,
            ..common::config()
        },
    );
    (t, q, shutdown, tracker)
}

fn wait_for(t: &Judge, to: &str) -> Vec<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, m)) = t.delivered.lock().unwrap().iter().find(|(a, _)| a == to) {
            return m.clone();
        }
        assert!(std::time::Instant::now() < deadline, "nothing for {to}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first message delivered to `to` that contains `text`.
fn wait_for_matching(t: &Judge, to: &str, text: &str) -> Vec<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, m)) = t
            .delivered
            .lock()
            .unwrap()
            .iter()
            .find(|(a, m)| a == to && String::from_utf8_lossy(m).contains(text))
        {
            return m.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing for {to} with {text:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_bounced_to_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let (t, q, shutdown, tracker) = judge_queue(dir.path(), Duration::from_secs(3600));
    let mut env = envelope(&["bad@remote.example", "good@localhost"]);
    env.rcpts[0].params.orcpt = Some(estafeta_proto::Orcpt {
        addr_type: "rfc822".into(),
        xtext: "Bad@Remote.Example".into(),
    });
    q.submit(env, b"Subject: hello\r\n\r\nbody\r\n".to_vec())
        .await
        .unwrap();
    // good@localhost asked for NOTIFY=SUCCESS too: its success report is another message to
    // alice, which may arrive first. The failure report is the one about bad@remote.example.
    let bounce = tokio::task::spawn_blocking(move || {
        wait_for_matching(&t, "alice@example.test", "Action: failed")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&bounce);
    assert!(text.contains("multipart/report"), "{text}");
    assert!(text.contains("report-type=delivery-status"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; bad@remote.example"),
        "{text}"
    );
    assert!(
        text.contains("Original-Recipient: rfc822; Bad@Remote.Example"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(
        text.contains("Remote-MTA: dns; mx.remote.example"),
        "{text}"
    );
    assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1"), "{text}");
    assert!(
        text.contains("Original-Envelope-Id: QQ+1")
            || text.contains("Original-Envelope-Id: QQ+2B1"),
        "{text}"
    );
    assert!(!text.contains("good@localhost\r\nAction"), "{text}");
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_is_never_bounced_and_an_expired_message_bounces() {
    let dir = tempfile::tempdir().unwrap();
    let (t, q, shutdown, tracker) = judge_queue(dir.path(), Duration::from_secs(1));
    // From <>: fails, and nothing is sent back.
    let mut env = envelope(&["bad@remote.example"]);
    env.from = estafeta_proto::ReversePath::Null;
    q.submit(env, b"Subject: a bounce\r\n\r\nx\r\n".to_vec())
        .await
        .unwrap();
    // Keeps failing temporarily: after the 1 s lifetime, it fails for good (5.4.7).
    q.submit(
        envelope(&["slow@remote.example"]),
        b"Subject: slow\r\n\r\nx\r\n".to_vec(),
    )
    .await
    .unwrap();
    let t2 = t.clone();
    let bounce = tokio::task::spawn_blocking(move || wait_for(&t2, "alice@example.test"))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bounce);
    assert!(
        text.contains("Final-Recipient: rfc822; slow@remote.example"),
        "{text}"
    );
    assert!(text.contains("Status: 5.4.7"), "{text}");
    assert!(text.contains("delivery time expired"), "{text}");
    // Exactly one notification: the null-sender message produced none.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = t
        .delivered
        .lock()
        .unwrap()
        .iter()
        .filter(|(a, _)| a == "alice@example.test")
        .count();
    assert_eq!(n, 1);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

/// A transport whose local recipients (`@localhost`) are delivered at once, in a first batch,
/// and whose remote ones hang (a delivery in flight when the machine crashes).
struct LocalThenHang {
    local_deliveries: Mutex<u32>,
}

impl Transport for LocalThenHang {
    fn batches(&self, job: &DeliveryJob) -> Vec<Vec<usize>> {
        let (local, remote) = job.rcpts.iter().partition(|&&i| {
            job.envelope.rcpts[i]
                .path
                .to_string()
                .ends_with("@localhost")
        });
        vec![local, remote]
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let local = job.rcpts.iter().all(|&i| {
            job.envelope.rcpts[i]
                .path
                .to_string()
                .ends_with("@localhost")
        });
        if !local {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        *self.local_deliveries.lock().unwrap() += 1;
        job.rcpts
            .iter()
            .map(|&i| (i, Outcome::Delivered("ok".into())))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_delivered_is_recorded_before_the_next_batch_ends() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(spool(dir.path()));
    let t = Arc::new(LocalThenHang {
        local_deliveries: Mutex::new(0),
    });
    let common::Queue {
        handle: q,
        shutdown,
        ..
    } = common::start(
        s.clone(),
        t.clone(),
        SchedulerConfig {
            retry: vec![Duration::from_secs(1)],
            ..common::config()
        },
    );
    let id = q
        .submit(
            envelope(&["bob@localhost", "carol@remote.example"]),
            b"x\r\n".to_vec(),
        )
        .await
        .unwrap();
    // While carol's delivery hangs, what a restart would read says bob is done.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // What is on disk (load, not recover: recover would remove the scheduler's
        // half-written state file).
        let m = s.load(id).expect("still queued");
        if m.status[0].state == RcptState::Delivered {
            assert_eq!(m.status[1].state, RcptState::Pending);
            assert_eq!(m.pending(), vec![1]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob's delivery was not recorded while carol's was in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*t.local_deliveries.lock().unwrap(), 1);
    // The hanging delivery is abandoned, as a crash would.
    shutdown.cancel();
}

/// The local batch is recorded "delivered" before the remote one runs; its NOTIFY=SUCCESS
/// report is queued before that record, so a crash during the remote batch loses no report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_report_is_queued_before_the_early_record() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(spool(dir.path()));
    let t = Arc::new(LocalThenHang {
        local_deliveries: Mutex::new(0),
    });
    let cfg = SchedulerConfig {
        retry: vec![Duration::from_secs(1)],
        ..common::config()
    };
    let common::Queue {
        handle: q,
        shutdown,
        ..
    } = common::start(s.clone(), t.clone(), cfg);
    let mut env = envelope(&["bob@localhost", "carol@remote.example"]);
    env.rcpts[0].params = RcptParams {
        notify: Some(Notify {
            never: false,
            success: true,
            failure: true,
            delay: false,
        }),
        ..Default::default()
    };
    let id = q.submit(env, b"x\r\n".to_vec()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.load(id).unwrap().status[0].state != RcptState::Delivered {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // "Crash" now: what is on disk?
    let queued: Vec<_> = s
        .scan()
        .unwrap()
        .0
        .into_iter()
        .filter(|m| m.id != id)
        .collect();
    shutdown.cancel();
    assert!(
        !queued.is_empty(),
        "bob recorded delivered, but no success report is in the spool"
    );
}

/// A crash between the rename of `ID` and its sync can leave the file empty or cut at any
/// length: such a file was never acknowledged. Recovery sets it aside and never delivers it,
/// and never panics, whatever the length; the whole file is recovered.
#[tokio::test]
async fn a_file_cut_at_any_length_is_set_aside_and_the_whole_one_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    let m = s
        .put(
            envelope(&["bob@localhost"]),
            b"Subject: x\r\n\r\nbody line\r\n".to_vec(),
        )
        .await
        .unwrap();
    let path = s.dir().join(m.id.to_string());
    let whole = std::fs::read(&path).unwrap();
    assert!(
        String::from_utf8_lossy(&whole).contains("\ncontent "),
        "no content line"
    );
    for cut in 0..whole.len() {
        let d = tempfile::tempdir().unwrap();
        let s2 = spool(d.path());
        let file = s2.dir().join(m.id.to_string());
        std::fs::write(&file, &whole[..cut]).unwrap();
        let all = s2.recover().unwrap();
        assert!(
            all.is_empty(),
            "a file cut at {cut} of {} was recovered",
            whole.len()
        );
        assert!(!file.exists(), "cut at {cut}: left in the queue");
        assert!(
            s2.dir().join("damaged").join(m.id.to_string()).exists(),
            "cut at {cut}: not set aside"
        );
    }
    // One changed octet of content.
    let mut flipped = whole.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x20;
    let d = tempfile::tempdir().unwrap();
    let s3 = spool(d.path());
    std::fs::write(s3.dir().join(m.id.to_string()), &flipped).unwrap();
    assert!(s3.recover().unwrap().is_empty());
    // The whole file.
    let back = spool(dir.path()).recover().unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].id, m.id);
}

/// A file written before the checksum existed (no `content` line) is still an acknowledged
/// message.
#[tokio::test]
async fn a_file_without_a_checksum_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    std::fs::write(
        s.dir().join("0123456789AB"),
        "estafeta-queue 1\nid 0123456789AB\narrival 1700000000\nclient-ip 127.0.0.1\nclient-port 4000\nhelo c\nprotocol ESMTP\nfrom <a@example.test>\nrcpt <b@localhost>\n\nSubject: old\r\n\r\nx\r\n",
    )
    .unwrap();
    let all = s.recover().unwrap();
    assert_eq!(all.len(), 1);
}

/// An empty or garbled state file (cut by a crash before its sync) leaves every recipient
/// pending: delivered at least once, never stuck.
#[tokio::test]
async fn a_damaged_status_file_means_every_recipient_pending() {
    for damage in [&b""[..], b"estafeta-status 1\nrcpt 0 deliv", b"\0\0\0\0"] {
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path());
        let m = s
            .put(envelope(&["a@localhost", "b@localhost"]), b"x\r\n".to_vec())
            .await
            .unwrap();
        std::fs::write(s.dir().join(format!("{}.st", m.id)), damage).unwrap();
        let back = spool(dir.path()).recover().unwrap();
        assert_eq!(back.len(), 1, "{damage:?}");
        assert_eq!(back[0].pending(), vec![0, 1], "{damage:?}");
    }
}

/// A removed message's file is emptied and kept in `free/`, and the next message reuses it
/// (the same inode: no inode freed and allocated per message); `free/` survives a restart,
/// holds no message, and recovery never takes it for one.
#[tokio::test]
async fn removed_files_are_emptied_and_reused() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("queue");
    let s = spool(dir.path());
    let first = s
        .put(
            envelope(&["bob@localhost"]),
            b"Subject: one\r\n\r\nsecret\r\n".to_vec(),
        )
        .await
        .unwrap();
    let path = q.join(first.id.to_string());
    let ino = std::fs::metadata(&path).unwrap().ino();
    s.remove(&first).unwrap();
    assert!(!path.exists());
    let free: Vec<_> = std::fs::read_dir(q.join("free"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(free.len(), 1);
    assert_eq!(std::fs::metadata(&free[0]).unwrap().len(), 0, "emptied");

    // After a restart the pool is read again and used by the next message.
    drop(s);
    let s = spool(dir.path());
    assert!(s.recover().unwrap().is_empty());
    let second = s
        .put(
            envelope(&["carol@localhost"]),
            b"Subject: two\r\n\r\nx\r\n".to_vec(),
        )
        .await
        .unwrap();
    let path = q.join(second.id.to_string());
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        ino,
        "the file was reused"
    );
    assert_eq!(std::fs::read_dir(q.join("free")).unwrap().count(), 0);
    let loaded = s.load(second.id).unwrap();
    assert_eq!(loaded.envelope.rcpts[0].path.to_string(), "carol@localhost");
    let content = s.read_content(second.id).unwrap();
    let text = String::from_utf8_lossy(content.as_bytes());
    assert!(text.ends_with("Subject: two\r\n\r\nx\r\n"), "{text}");
    assert!(!text.contains("secret"));
}

/// A large message written to a spill file while it arrived: the spill file becomes the spool
/// file (its header written into the space left before the content, no copy), or, when the
/// edited header section does not fit there, the content is copied. Either way the file
/// reads back as the message, passes recovery's checksum, and is mapped when delivered.
#[tokio::test]
async fn a_large_message_s_spill_file_becomes_its_spool_file() {
    use estafeta_queue::{MessageBody, SpillWriter};
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    let body = "A line of a large message.\r\n".repeat(100_000);
    let received = format!("Subject: large\r\nX-Note: as received\r\n\r\n{body}");
    for added in [
        "X-Edited: a header added by a check\r\n".to_string(),
        // Larger than the space left before the content: copied.
        format!("X-Huge: {}\r\n", "h".repeat(70_000)),
    ] {
        let file = s.spill_file().unwrap();
        let inode = file.metadata().unwrap().ino();
        let mut w = SpillWriter::new(file);
        for block in received.as_bytes().chunks(1 << 20) {
            w.write_block(block).unwrap();
        }
        let mut spilled = w.finish(b"").unwrap();
        spilled.head_mut().splice(0..0, added.bytes());
        let m = s
            .put_body(envelope(&["bob@localhost"]), MessageBody::Spilled(spilled))
            .await
            .unwrap();
        let path = s.dir().join(m.id.to_string());
        let linked = std::fs::metadata(&path).unwrap().ino() == inode;
        assert_eq!(linked, added.len() < 1000, "linked: {linked}");
        s.check(m.id).unwrap();
        let content = s.read_content(m.id).unwrap();
        let text = content.as_bytes();
        assert_eq!(m.size, text.len() as u64);
        let expected = format!("{added}{received}");
        assert!(text.ends_with(expected.as_bytes()), "content differs");
        // Only our Received field comes before the message.
        let pre = &text[..text.len() - expected.len()];
        assert!(pre.starts_with(b"Received: ") && pre.ends_with(b"\r\n"));
        assert!(!pre.windows(4).any(|w| w == b"\r\n\r\n"));
    }
    // Both survive a restart (their checksums hold).
    let back = spool(dir.path()).recover().unwrap();
    assert_eq!(back.len(), 2);
}

/// Recipient parameters are read with the RCPT TO parser; ones it refuses (never written by
/// this server) are left out, and the recipient is still delivered: never set aside.
#[tokio::test]
async fn recipient_parameters_the_parser_refuses_do_not_lose_the_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path());
    let m = s
        .put(
            envelope(&["bob@localhost"]),
            b"Subject: x\r\n\r\nbody\r\n".to_vec(),
        )
        .await
        .unwrap();
    let path = s.dir().join(m.id.to_string());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("rcpt <bob@localhost> NOTIFY=SUCCESS,FAILURE\n"),
        "{text}"
    );
    std::fs::write(
        &path,
        text.replace("NOTIFY=SUCCESS,FAILURE", "NOTIFY=SOMETIMES"),
    )
    .unwrap();
    let back = spool(dir.path()).recover().unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].envelope.rcpts[0].path.to_string(), "bob@localhost");
    assert_eq!(back[0].envelope.rcpts[0].params, RcptParams::default());
}
