//! mdserver's Prometheus metrics (served on `--metrics-listen`; every name in
//! `docs/METRICS.md`).
//!
//! Event metrics (publishes, etcd calls, gRPC calls, session expirations) live in one
//! process-wide [`ServerMetrics`] ([`server`]), each counted at one place: etcd calls in
//! [`crate::etcd`]'s bound, gRPC calls in [`GrpcMetricsLayer`], publishes in
//! [`crate::message`], expirations in [`crate::session`]. Status metrics are read at
//! scrape: the session streams this replica serves, and the locks held and waiting in
//! the whole cluster from a snapshot of etcd's lock queues that a task refreshes every
//! [`LOCKS_PERIOD`] (a scrape never waits for etcd).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::Ctx;

/// How often the lock snapshot is refreshed from etcd.
pub const LOCKS_PERIOD: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    service: String,
    method: String,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcMethod {
    service: String,
    method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 1 ms to about 65 s.
fn histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-3, 2.0, 17))
}

/// mdserver's event metrics (one per process).
#[derive(Debug)]
pub struct ServerMetrics {
    publishes: Family<ResultLabel, Counter>,
    publish_ack: Histogram,
    etcd_duration: HistogramFamily<OpLabel>,
    etcd_errors: Family<OpLabel, Counter>,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_duration: HistogramFamily<GrpcMethod>,
    expirations: Counter,
    /// Lock snapshot: exclusive held, shared held, waiting; -1 before the first read.
    locks: [AtomicI64; 3],
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            publishes: Family::default(),
            publish_ack: histogram(),
            etcd_duration: Family::new_with_constructor(histogram),
            etcd_errors: Family::default(),
            grpc_requests: Family::default(),
            grpc_duration: Family::new_with_constructor(histogram),
            expirations: Counter::default(),
            locks: [AtomicI64::new(-1), AtomicI64::new(-1), AtomicI64::new(-1)],
        }
    }
}

/// This process's metrics.
pub fn server() -> &'static ServerMetrics {
    static M: OnceLock<ServerMetrics> = OnceLock::new();
    M.get_or_init(ServerMetrics::default)
}

impl ServerMetrics {
    /// An etcd call of kind `op` (get, put, delete, txn, lease_grant, ...) that took
    /// `took` and failed or not (a timeout is a failure).
    pub fn etcd_call(&self, op: &'static str, took: Duration, ok: bool) {
        self.etcd_duration
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
        if !ok {
            self.etcd_errors.get_or_create(&OpLabel { op }).inc();
        }
    }

    /// A publish ended with `result` (ok, nack or timeout) after `took`.
    pub fn publish(&self, result: &'static str, took: Duration) {
        self.publishes.get_or_create(&ResultLabel { result }).inc();
        if result == "ok" {
            self.publish_ack.observe(took.as_secs_f64());
        }
    }

    /// A session expired (its lease ran out, or the replica found it gone).
    pub fn session_expired(&self) {
        self.expirations.inc();
    }

    fn set_locks(&self, exclusive: i64, shared: i64, waiting: i64) {
        self.locks[0].store(exclusive, Ordering::Relaxed);
        self.locks[1].store(shared, Ordering::Relaxed);
        self.locks[2].store(waiting, Ordering::Relaxed);
    }
}

/// Scrape-time status of the replica.
struct Status {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Status")
    }
}

fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

impl Collector for Status {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sessions = Gauge::<i64>::default();
        sessions.set(self.ctx.sessions_limit.in_use() as i64);
        family(
            &mut enc,
            "mdcluster_server_sessions",
            "Session streams this replica serves now",
            &sessions,
        )?;
        let m = server();
        let [ex, sh, wait] = [0, 1, 2].map(|i| m.locks[i].load(Ordering::Relaxed));
        if ex < 0 {
            // Not read from etcd yet: no value rather than a wrong one.
            return Ok(());
        }
        let held = Family::<ModeLabel, Gauge>::default();
        held.get_or_create(&ModeLabel { mode: "exclusive" }).set(ex);
        held.get_or_create(&ModeLabel { mode: "shared" }).set(sh);
        family(
            &mut enc,
            "mdcluster_server_locks_held",
            "Locks held in the cluster (from etcd), by mode",
            &held,
        )?;
        let waiting = Gauge::<i64>::default();
        waiting.set(wait);
        family(
            &mut enc,
            "mdcluster_server_locks_waiting",
            "Lock requests waiting in the cluster (from etcd)",
            &waiting,
        )
    }
}

/// Refreshes the lock snapshot every [`LOCKS_PERIOD`] until the task is aborted.
pub fn spawn_lock_snapshot(ctx: Arc<Ctx>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LOCKS_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match crate::lock::count_locks(&ctx).await {
                Ok((ex, sh, wait)) => server().set_locks(ex, sh, wait),
                Err(e) => tracing::debug!("metrics: reading the lock queues: {e}"),
            }
        }
    })
}

/// The replica's registry.
pub fn registry(ctx: Arc<Ctx>) -> Registry {
    let m = server();
    let mut r = Registry::default();
    let build = Family::<VersionLabel, Gauge>::default();
    build
        .get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    r.register("mdcluster_build_info", "mdserver's version (1)", build);
    r.register_collector(Box::new(Status { ctx }));
    for result in ["ok", "nack", "timeout"] {
        drop(m.publishes.get_or_create(&ResultLabel { result }));
    }
    r.register(
        "mdcluster_server_publishes",
        "Acknowledged messages published through this replica, by result",
        m.publishes.clone(),
    );
    r.register(
        "mdcluster_server_publish_ack_duration_seconds",
        "Time from a publish to its last acknowledgement",
        m.publish_ack.clone(),
    );
    r.register(
        "mdcluster_server_etcd_request_duration_seconds",
        "Time of etcd calls, by operation",
        m.etcd_duration.clone(),
    );
    r.register(
        "mdcluster_server_etcd_errors",
        "etcd calls that failed or timed out, by operation",
        m.etcd_errors.clone(),
    );
    r.register(
        "mdcluster_server_grpc_requests",
        "gRPC calls served, by service, method and status code",
        m.grpc_requests.clone(),
    );
    r.register(
        "mdcluster_server_grpc_request_duration_seconds",
        "Time to the response headers of gRPC calls (streams: to their opening)",
        m.grpc_duration.clone(),
    );
    r.register(
        "mdcluster_server_session_expirations",
        "Sessions found expired by this replica",
        m.expirations.clone(),
    );
    r
}

pub use mdcluster_proto::metrics_http::encode as render;

/// The gRPC status code name of a numeric `grpc-status`.
fn code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// `(service, method)` of a gRPC path `/pkg.Service/Method`; unknown paths share one
/// label pair so a scanner cannot grow the series without bound.
fn split_path(path: &str) -> (String, String) {
    let known = path.strip_prefix('/').and_then(|p| p.split_once('/'));
    match known {
        Some((s, m))
            if (s.starts_with("mdcluster.v1.") || s.starts_with("grpc.health.v1."))
                && !m.is_empty()
                && m.len() <= 64
                && m.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            (s.to_owned(), m.to_owned())
        }
        _ => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

/// Counts every gRPC call by service, method and code, and times it to its response
/// headers. The code is the `grpc-status` of the headers (errors are answered
/// trailers-only, so they carry it there); a response without one is `OK` (its status
/// follows in the trailers, which this layer does not wait for).
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = split_path(req.uri().path());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            let code = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .map_or("OK", code_name),
                Err(_) => "UNAVAILABLE",
            };
            let m = server();
            m.grpc_duration
                .get_or_create(&GrpcMethod {
                    service: service.clone(),
                    method: method.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            m.grpc_requests
                .get_or_create(&GrpcLabels {
                    service,
                    method,
                    code,
                })
                .inc();
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mdcluster_proto::metrics_http::Format;

    #[test]
    fn paths_and_codes_have_bounded_labels() {
        assert_eq!(
            split_path("/mdcluster.v1.LockService/Acquire"),
            ("mdcluster.v1.LockService".into(), "Acquire".into())
        );
        assert_eq!(
            split_path("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health".into(), "Check".into())
        );
        for junk in [
            "/",
            "/x/y",
            "/mdcluster.v1.LockService/",
            "/mdcluster.v1.A/b/c",
            "nope",
        ] {
            assert_eq!(
                split_path(junk),
                ("unknown".into(), "unknown".into()),
                "{junk}"
            );
        }
        assert_eq!(code_name("0"), "OK");
        assert_eq!(code_name("9"), "FAILED_PRECONDITION");
        assert_eq!(code_name("99"), "UNKNOWN");
    }

    #[test]
    fn events_show_in_the_encoding() {
        let m = server();
        m.etcd_call("txn", Duration::from_millis(3), false);
        m.publish("nack", Duration::from_millis(1));
        m.session_expired();
        let mut r = Registry::default();
        r.register("mdcluster_server_etcd_errors", "x", m.etcd_errors.clone());
        r.register("mdcluster_server_publishes", "x", m.publishes.clone());
        r.register(
            "mdcluster_server_session_expirations",
            "x",
            m.expirations.clone(),
        );
        let text = render(&r, Format::Text);
        assert!(
            text.contains(r#"mdcluster_server_etcd_errors_total{op="txn"} "#),
            "{text}"
        );
        assert!(
            text.contains(r#"mdcluster_server_publishes_total{result="nack"} "#),
            "{text}"
        );
        assert!(text.contains("# TYPE mdcluster_server_session_expirations_total counter"));
    }
}
