//! Prometheus metrics: counters kept by a tracing layer that watches the operator mail log,
//! queue gauges read from the scheduler at scrape time, and the `GET /metrics` endpoint of
//! `[metrics] address`.
//!
//! # Why a layer on the mail log
//!
//! The mail log (target [`MAILLOG`]) is already one event per business event: `connect`,
//! `queued`, `reject RCPT`, `delivered`, `deferred`, `failed`, `authenticated`, `TLS
//! established`… Counting those events in a [`tracing_subscriber::Layer`] here, in the binary,
//! gives one source of truth for logs and counters (a line in the log is a step of a counter,
//! and the other way round), and keeps the libraries (listener, queue, relay) free of any
//! metrics dependency: they log, as they did, with the fields the counters need. The layer has
//! a filter of its own ([`MetricsLayer::filter`]) that lets every mail log event through,
//! whatever the level or `RUST_LOG` filter of the log output: quietening the log never stops
//! the counters. The price: a counter exists only where a mail log event does, with its
//! fields as labels; a field a label needs is part of the event's contract (docs/operations.md
//! §6), and label values are mapped onto fixed sets here so that no client-chosen text
//! becomes a series.
//!
//! What is not an event is read when Prometheus scrapes: the queue's sizes and the age of its
//! oldest message ([`QueueHandle::stats`]), and the scheduler's heartbeat
//! ([`QueueHandle::last_turn`]). Configuration reloads are counted by whoever reloads, with
//! [`Metrics::reload`].
//!
//! The text is the Prometheus text format 0.0.4 written by `prometheus-client` (the official
//! Rust client), served by a small HTTP/1.1 handler: one request per connection, bounded in
//! size and time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterFn, Filtered};
use tracing_subscriber::layer::Context;

use estafeta_queue::QueueHandle;

/// The tracing target of the operator mail log: the events counted.
pub const MAILLOG: &str = "estafeta::maillog";

/// The buckets of the delivery latency histogram, in seconds: from a local delivery (under a
/// second: the spool records arrival in whole seconds) to the five-day default lifetime.
const LATENCY_BUCKETS: [f64; 11] = [
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 43_200.0, 86_400.0, 432_000.0,
];

/// `listener`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// `command`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    command: &'static str,
    status: String,
}

/// `outcome`, `transport`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    outcome: &'static str,
    transport: &'static str,
}

/// `transport`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

/// `version`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// `result`, `mechanism`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabels {
    result: &'static str,
    mechanism: &'static str,
}

/// `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The server's metrics: every series of `/metrics` (docs/operations.md, "Metrics"). Shared
/// by the mail log layer (counters), the endpoint (gauges, at scrape time) and the
/// configuration reload ([`Metrics::reload`]).
pub struct Metrics {
    registry: Registry,
    connections: Family<ListenerLabel, Counter>,
    accepted: Counter,
    accepted_bytes: Counter,
    rejected: Family<RejectLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
    latency: Family<TransportLabel, Histogram, fn() -> Histogram>,
    tls: Family<VersionLabel, Counter>,
    tls_failures: Counter,
    auth: Family<AuthLabels, Counter>,
    reloads: Family<ResultLabel, Counter>,
    queue_messages: Gauge,
    queue_held: Gauge,
    queue_in_flight: Gauge,
    queue_recipients: Gauge,
    queue_oldest_age: Gauge,
    scheduler_last_turn: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every series, registered, at zero.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("estafeta"),
            connections: Family::default(),
            accepted: Counter::default(),
            accepted_bytes: Counter::default(),
            rejected: Family::default(),
            deliveries: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            tls: Family::default(),
            tls_failures: Counter::default(),
            auth: Family::default(),
            reloads: Family::default(),
            queue_messages: Gauge::default(),
            queue_held: Gauge::default(),
            queue_in_flight: Gauge::default(),
            queue_recipients: Gauge::default(),
            queue_oldest_age: Gauge::default(),
            scheduler_last_turn: Gauge::default(),
        };
        let mut registry = m.registry;
        // Counters are registered without `_total`: the encoder appends it.
        let r = &mut registry;
        r.register(
            "connections",
            "SMTP connections accepted, by listener",
            m.connections.clone(),
        );
        r.register(
            "messages_accepted",
            "Messages accepted and queued (250 after DATA/BDAT)",
            m.accepted.clone(),
        );
        r.register(
            "messages_accepted_bytes",
            "Octets of the messages accepted",
            m.accepted_bytes.clone(),
        );
        r.register(
            "smtp_rejections",
            "MAIL and RCPT commands refused by policy, by command and enhanced status code",
            m.rejected.clone(),
        );
        r.register(
            "deliveries",
            "Delivery outcomes per recipient, by outcome and transport",
            m.deliveries.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Time from a message's arrival to the final outcome for a recipient (delivered or bounced)",
            m.latency.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes completed (implicit TLS and STARTTLS), by protocol version",
            m.tls.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_failures.clone(),
        );
        r.register(
            "auth_attempts",
            "SMTP AUTH attempts, by result and SASL mechanism",
            m.auth.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads, by result",
            m.reloads.clone(),
        );
        r.register(
            "queue_messages",
            "Messages in the queue (due, waiting for a retry, held, being delivered)",
            m.queue_messages.clone(),
        );
        r.register(
            "queue_held_messages",
            "Messages held by the operator",
            m.queue_held.clone(),
        );
        r.register(
            "queue_in_flight_messages",
            "Messages being delivered right now",
            m.queue_in_flight.clone(),
        );
        r.register(
            "queue_pending_recipients",
            "Recipients not yet delivered nor failed",
            m.queue_recipients.clone(),
        );
        r.register(
            "queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue (0 when empty)",
            m.queue_oldest_age.clone(),
        );
        r.register(
            "scheduler_last_turn_seconds",
            "Time since the scheduler's loop last turned (it turns at least every second)",
            m.scheduler_last_turn.clone(),
        );
        // The usual series exist from the start, at zero, so that `rate()` and `increase()`
        // see their first step.
        for listener in ["smtp", "submission", "submissions", "local"] {
            let _ = m.connections.get_or_create(&ListenerLabel { listener });
        }
        for transport in ["maildir", "smtp"] {
            for outcome in ["delivered", "deferred", "bounced"] {
                let _ = m
                    .deliveries
                    .get_or_create(&DeliveryLabels { outcome, transport });
            }
            let _ = m.latency.get_or_create(&TransportLabel { transport });
        }
        for version in ["TLSv1.3", "TLSv1.2"] {
            let _ = m.tls.get_or_create(&VersionLabel { version });
        }
        for result in ["success", "failure"] {
            for mechanism in ["PLAIN", "LOGIN"] {
                let _ = m.auth.get_or_create(&AuthLabels { result, mechanism });
            }
            let _ = m.reloads.get_or_create(&ResultLabel { result });
        }
        Metrics { registry, ..m }
    }

    /// Counts a configuration reload: `ok` false when the new configuration was refused and
    /// the old one stays in service. For the reload code (SIGHUP, `systemctl reload`):
    /// `server.metrics().reload(ok)`.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// The layer that counts the mail log's events into these metrics, with its own filter:
    /// every event of [`MAILLOG`], whatever the log output's level.
    pub fn layer<S>(self: &Arc<Self>) -> Filtered<MetricsLayer, FilterFn, S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        MetricsLayer {
            metrics: self.clone(),
        }
        .with_filter(MetricsLayer::filter())
    }

    /// The text exposition (Prometheus text format 0.0.4), with the queue gauges read from
    /// `queue` now. A scheduler that has stopped, or does not answer within [`STATS_WAIT`]
    /// (wedged: its `scheduler_last_turn_seconds` says so), leaves them as last read.
    pub async fn render(&self, queue: Option<&QueueHandle>) -> String {
        if let Some(q) = queue {
            self.scheduler_last_turn.set(q.last_turn().as_secs_f64());
            if let Ok(Ok(s)) = tokio::time::timeout(STATS_WAIT, q.stats()).await {
                let now = estafeta_queue::unix_now();
                self.queue_messages.set(gauge(s.messages as u64));
                self.queue_held.set(gauge(s.held as u64));
                self.queue_in_flight.set(gauge(s.in_flight as u64));
                self.queue_recipients
                    .set(gauge(s.recipients_pending as u64));
                let age = s.oldest_arrival.map_or(0, |a| now.saturating_sub(a));
                self.queue_oldest_age.set(gauge(age));
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Counts one mail log event.
    fn count(&self, e: &MaillogEvent) {
        match e.message.as_str() {
            "connect" => {
                let listener = one_of(&e.listener, &["smtp", "submission", "submissions", "local"]);
                self.connections
                    .get_or_create(&ListenerLabel { listener })
                    .inc();
            }
            "queued" => {
                self.accepted.inc();
                self.accepted_bytes.inc_by(e.size.unwrap_or(0));
            }
            "reject RCPT" => self.reject("RCPT", e),
            "reject MAIL: sender not owned" => self.reject("MAIL", e),
            // The checks before the 250: DMARC p=reject (5.7.1), a DNS error (4.7.1).
            "reject DATA" => self.reject("DATA", e),
            "reject CONNECT" => self.reject("CONNECT", e),
            "delivered" => self.delivery("delivered", e, true),
            "deferred" => self.delivery("deferred", e, false),
            "failed" => self.delivery("bounced", e, true),
            "TLS established" => {
                let version = one_of(&e.version, &["TLSv1.3", "TLSv1.2"]);
                self.tls.get_or_create(&VersionLabel { version }).inc();
            }
            "TLS handshake failed" => {
                self.tls_failures.inc();
            }
            "authenticated" => self.auth("success", e),
            "authentication failed" => self.auth("failure", e),
            _ => {}
        }
    }

    fn reject(&self, command: &'static str, e: &MaillogEvent) {
        // An enhanced status code from the reply table ("5.7.1"); anything else is "other".
        let status = match &e.status {
            Some(s) if s.len() <= 11 && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
                s.clone()
            }
            _ => "other".to_string(),
        };
        self.rejected
            .get_or_create(&RejectLabels { command, status })
            .inc();
    }

    fn delivery(&self, outcome: &'static str, e: &MaillogEvent, last: bool) {
        // Administrator bounces carry no transport: "none".
        let transport = match &e.transport {
            None => "none",
            t => one_of(t, &["maildir", "smtp", "lmtp", "pipe"]),
        };
        self.deliveries
            .get_or_create(&DeliveryLabels { outcome, transport })
            .inc();
        if let (true, Some(delay)) = (last, e.delay_s) {
            self.latency
                .get_or_create(&TransportLabel { transport })
                .observe(delay as f64);
        }
    }

    fn auth(&self, result: &'static str, e: &MaillogEvent) {
        let mechanism = one_of(&e.mechanism, &["PLAIN", "LOGIN"]);
        self.auth
            .get_or_create(&AuthLabels { result, mechanism })
            .inc();
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `value` when it is one of `known`, else `"other"`: label values come from a fixed set.
fn one_of(value: &Option<String>, known: &[&'static str]) -> &'static str {
    value
        .as_deref()
        .and_then(|v| known.iter().find(|k| **k == v))
        .copied()
        .unwrap_or("other")
}

/// The tracing layer that counts the mail log: see the module documentation.
#[derive(Debug)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    /// This layer's own filter: the mail log's events, whatever the log output's level. Its
    /// hint says INFO (every counted event is INFO or WARN), so that it does not turn on
    /// DEBUG and TRACE callsites elsewhere.
    pub fn filter() -> FilterFn {
        let maillog: fn(&tracing::Metadata<'_>) -> bool = |meta| meta.target() == MAILLOG;
        FilterFn::new(maillog).with_max_level_hint(tracing::level_filters::LevelFilter::INFO)
    }
}

impl<S: tracing::Subscriber> Layer<S> for MetricsLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != MAILLOG {
            return;
        }
        let mut e = MaillogEvent::default();
        event.record(&mut e);
        self.metrics.count(&e);
    }
}

/// The fields of a mail log event that the counters read.
#[derive(Debug, Default)]
struct MaillogEvent {
    message: String,
    listener: Option<String>,
    status: Option<String>,
    transport: Option<String>,
    version: Option<String>,
    mechanism: Option<String>,
    delay_s: Option<u64>,
    size: Option<u64>,
}

impl MaillogEvent {
    fn slot(&mut self, field: &Field) -> Option<&mut Option<String>> {
        match field.name() {
            "listener" => Some(&mut self.listener),
            "status" => Some(&mut self.status),
            "transport" => Some(&mut self.transport),
            "version" => Some(&mut self.version),
            "mechanism" => Some(&mut self.mechanism),
            _ => None,
        }
    }
}

impl Visit for MaillogEvent {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else if let Some(slot) = self.slot(field) {
            *slot = Some(value.to_string());
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "delay_s" => self.delay_s = Some(value),
            "size" => self.size = Some(value),
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(v) = u64::try_from(value) {
            self.record_u64(field, v);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%value` fields and the message arrive here, formatted with Display.
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else if let Some(slot) = self.slot(field) {
            *slot = Some(format!("{value:?}"));
        }
    }
}

/// How long a scrape waits for the scheduler's answer.
const STATS_WAIT: Duration = Duration::from_secs(2);
/// The largest request head accepted (request line and headers).
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 8;
/// The most one connection may take, request and answer (a client that does not read).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    queue: QueueHandle,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, "metrics endpoint listening");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let tasks = tracker.clone();
    tracker.spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let metrics = metrics.clone();
            let queue = queue.clone();
            let stop = shutdown.clone();
            tasks.spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &metrics, &queue)) => {
                        match r {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(error = %e, "metrics: request failed"),
                            Err(_) => tracing::debug!("metrics: connection timed out"),
                        }
                    }
                }
            });
        }
    });
}

/// One request, one answer, then the connection closes.
async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    queue: &QueueHandle,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", "").await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return respond(&mut stream, "408 Request Timeout", "", "").await,
    };
    let (status, body) = match route(&head) {
        Route::Metrics => ("200 OK", metrics.render(Some(queue)).await),
        Route::NotFound => ("404 Not Found", "not found: try /metrics\n".to_string()),
        Route::BadMethod => ("405 Method Not Allowed", String::new()),
        Route::BadRequest => ("400 Bad Request", String::new()),
    };
    let content_type = if status.starts_with("200") {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    respond(&mut stream, status, content_type, &body).await
}

/// Reads up to the blank line that ends the request head; None when it is too large.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    BadRequest,
}

fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::BadMethod;
    }
    // The query string (Prometheus may add one) does not matter.
    let path = target.split('?').next().unwrap_or_default();
    if path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !content_type.is_empty() {
        out.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if status.starts_with("405") {
        out.push_str("Allow: GET\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// The layer counts mail log events even when the log output shows only errors, and
    /// ignores events of other targets.
    #[test]
    fn the_layer_counts_maillog_events_whatever_the_output_level() {
        let metrics = Arc::new(Metrics::new());
        let output = tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(tracing_subscriber::EnvFilter::new("error"));
        let subscriber = tracing_subscriber::registry()
            .with(output)
            .with(metrics.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "estafeta::maillog", client = "192.0.2.1", port = 4000u16, listener = "submission", "connect");
            tracing::info!(target: "estafeta::maillog", client = "192.0.2.1", listener = "nonsense", "connect");
            tracing::info!(target: "estafeta::maillog", id = "X", size = 1234u64, nrcpt = 1u64, "queued");
            tracing::info!(target: "estafeta::maillog", to = "<a@b>", reply = "554 5.7.1 <a@b>: Relay access denied", status = tracing::field::display("5.7.1"), "reject RCPT");
            tracing::info!(target: "estafeta::maillog", id = "X", status = "sent", delay_s = 3u64, transport = "maildir", "delivered");
            tracing::info!(target: "estafeta::maillog", id = "X", status = "deferred", delay_s = 3u64, transport = "smtp", "deferred");
            tracing::info!(target: "estafeta::maillog", id = "X", status = "bounced", delay_s = 7200u64, "failed");
            tracing::info!(target: "estafeta::maillog", version = %"TLSv1.3", cipher = "TLS13_AES_128_GCM_SHA256", "TLS established");
            tracing::warn!(target: "estafeta::maillog", user = "u", mechanism = "PLAIN", failures = 1u64, "authentication failed");
            // Not the mail log: not counted.
            tracing::info!(target: "estafeta::other", listener = "smtp", "connect");
        });
        metrics.reload(true);
        let text = futures_render(&metrics);
        for line in [
            "estafeta_connections_total{listener=\"submission\"} 1",
            "estafeta_connections_total{listener=\"other\"} 1",
            "estafeta_messages_accepted_total 1",
            "estafeta_messages_accepted_bytes_total 1234",
            "estafeta_smtp_rejections_total{command=\"RCPT\",status=\"5.7.1\"} 1",
            "estafeta_deliveries_total{outcome=\"delivered\",transport=\"maildir\"} 1",
            "estafeta_deliveries_total{outcome=\"deferred\",transport=\"smtp\"} 1",
            "estafeta_deliveries_total{outcome=\"bounced\",transport=\"none\"} 1",
            "estafeta_delivery_latency_seconds_bucket{transport=\"maildir\",le=\"5\"} 1",
            "estafeta_delivery_latency_seconds_count{transport=\"none\"} 1",
            "estafeta_tls_handshakes_total{version=\"TLSv1.3\"} 1",
            "estafeta_auth_attempts_total{result=\"failure\",mechanism=\"PLAIN\"} 1",
            "estafeta_config_reloads_total{result=\"success\"} 1",
            // The event of another target was not counted.
            "estafeta_connections_total{listener=\"smtp\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    fn futures_render(metrics: &Metrics) -> String {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(metrics.render(None))
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(r("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(r("HEAD /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(r("GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("EHLO x\r\n\r\n"), Route::BadRequest);
    }
}
