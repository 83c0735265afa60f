//! The spool on a real directory: durability contract, recovery, state records, scheduling.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::command::{Notify, RcptParams};
use estafeta_proto::reply;
use estafeta_proto::{ClientInfo, Envelope, MailParams, Recipient};
use estafeta_queue::{
    DeliveryJob, Failure, Outcome, RcptState, SchedulerConfig, Spool, Syncer, Transport,
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

fn spool(dir: &std::path::Path) -> Spool {
    Spool::open(
        &dir.join("queue"),
        "mx.example.test",
        Syncer::start().unwrap(),
    )
    .unwrap()
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
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let q = estafeta_queue::start(
        s.clone(),
        t.clone(),
        SchedulerConfig {
            max_deliveries: 4,
            retry: vec![Duration::from_secs(1)],
        },
        shutdown.clone(),
        &tracker,
    )
    .unwrap();
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
    assert_eq!(
        *t.delivered.lock().unwrap(),
        vec!["bob@localhost".to_string()]
    );
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}
