//! What the queue's test files share: a spool in a directory, scheduler settings, a scheduler
//! started on them, and a bounded wait.

#![allow(dead_code)] // each test file uses some of these

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use estafeta_queue::{QueueHandle, SchedulerConfig, Spool, Syncer, Transport};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The spool in `dir/queue`.
pub fn spool(dir: &Path) -> Spool {
    Spool::open(
        &dir.join("queue"),
        "mx.example.test",
        Syncer::start().unwrap(),
    )
    .unwrap()
}

/// Settings the tests start from: 4 deliveries at once (4 per destination), a retry a minute
/// later, an hour of lifetime, no delay warnings.
pub fn config() -> SchedulerConfig {
    SchedulerConfig {
        max_deliveries: 4,
        max_per_destination: 4,
        retry: vec![Duration::from_secs(60)],
        hostname: "mx.example.test".into(),
        max_lifetime: Duration::from_secs(3600),
        delay_warning: None,
        max_returned: 10_000,
        double_bounce_to: None,
        clock: estafeta_queue::Clock::System,
    }
}

/// A running scheduler: its handle, and what stops it.
pub struct Queue {
    pub handle: QueueHandle,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Starts the scheduler on `spool` with `transport`.
pub fn start<T: Transport>(spool: Arc<Spool>, transport: Arc<T>, cfg: SchedulerConfig) -> Queue {
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handle = estafeta_queue::start(spool, transport, cfg, shutdown.clone(), &tracker).unwrap();
    Queue {
        handle,
        shutdown,
        tracker,
    }
}

/// Waits (at most 10 s) until `f` holds.
pub async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
