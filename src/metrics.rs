//! Prometheus metrics on one explicit registry, passed down to every
//! component. Labelled series used per message are resolved once here so the
//! hot path only touches atomics. No channel name or user id is ever a label.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::error::{CloseReason, ConnResult, Fault};

/// Every series wsrelay exports (names get the `wsrelay_` prefix).
pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    connections_total: IntCounterVec,
    pub subscriptions: IntGauge,
    pub channels: IntGauge,
    pub messages_received: IntCounter,
    pub published_api: IntCounter,
    pub published_client: IntCounter,
    pub delivered: IntCounter,
    pub dropped_slow_consumer: IntCounter,
    /// Larger than `--max-message-bytes` (python-socketio bridge emits).
    pub dropped_too_large: IntCounter,
    disconnects: IntCounterVec,
    pub broker_up: IntGauge,
    /// The Redis server(s) the subscriber talks to, by address.
    broker_server: IntGaugeVec,
    pub broker_publish_seconds: Histogram,
    pub broker_reconnects: IntCounter,
    pub broker_probe_failures: IntCounter,
    pub broker_connection_errors: IntCounter,
    pub broker_receive_overflow: IntCounter,
    pub broker_subscriptions: IntGauge,
    pub delivery_seconds: Histogram,
    hook_requests: IntCounterVec,
    hook_seconds: HistogramVec,
    pub disconnect_hook_dropped: IntCounter,
    upstream_requests: IntCounterVec,
    pub upstream_seconds: Histogram,
    pub tunnels: IntGauge,
    pub history_reads: IntCounter,
    pub history_recovered: IntCounter,
    pub history_gaps: IntCounter,
    pub history_lives_ended: IntCounter,
    pub broker_unreplicated: IntCounter,
    pub presence_size: Histogram,
    pub queued_bytes: IntGauge,
    pub socketio_forwards: IntCounterVec,
    pub socketio_recoveries: IntCounterVec,
    pub socketio_bridge: IntCounterVec,
    pub calls: IntCounterVec,
    errors: [IntCounter; 4],
}

const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> Result<C, prometheus::Error> {
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }
    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.add(IntGauge::new(prefixed(name), help)?)
    }
    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.add(IntCounter::new(prefixed(name), help)?)
    }
    fn counters(&self, name: &str, help: &str, label: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
        self.add(IntCounterVec::new(Opts::new(prefixed(name), help), label)?)
    }
    fn histogram(&self, name: &str, help: &str) -> Result<Histogram, prometheus::Error> {
        self.add(Histogram::with_opts(HistogramOpts::new(prefixed(name), help).buckets(LATENCY_BUCKETS.to_vec()))?)
    }
}

/// Our series are named here without `wsrelay_` and get it from this; the
/// process collector keeps the standard `process_` names, so the prefix
/// cannot be registry-wide.
fn prefixed(name: &str) -> String {
    format!("wsrelay_{name}")
}

impl Metrics {
    /// Builds every series on a fresh registry: one per relay, so tests can
    /// run several relays in one process.
    pub fn new(node_id: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let r = Reg(&registry);
        let published = r.counters("messages_published_total", "Messages published, by source", &["source"])?;
        let dropped = r.counters("messages_dropped_total", "Messages not delivered, by reason", &["reason"])?;
        let hook_dropped = r.counters(
            "hook_notifications_dropped_total",
            "Best-effort hook notifications dropped because their queue was full",
            &["hook"],
        )?;
        let info = r.add(IntGaugeVec::new(
            Opts::new(prefixed("build_info"), "Version and node id of this process"),
            &["version", "node"],
        )?)?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), node_id]).set(1);

        let m = Metrics {
            connections: r.gauge("connections", "Open WebSocket sessions")?,
            connections_total: r.counters("connections_total", "WebSocket upgrade attempts by result", &["result"])?,
            subscriptions: r.gauge("subscriptions", "Session subscriptions on this node")?,
            channels: r.gauge("channels", "Channels with at least one local subscriber")?,
            messages_received: r.counter("messages_received_total", "Frames received from clients")?,
            published_api: published.with_label_values(&["api"]),
            published_client: published.with_label_values(&["client"]),
            delivered: r.counter("messages_delivered_total", "Messages written to client sockets")?,
            dropped_slow_consumer: dropped.with_label_values(&["slow_consumer"]),
            dropped_too_large: dropped.with_label_values(&["too_large"]),
            disconnects: r.counters("disconnects_total", "Closed sessions by reason", &["reason"])?,
            broker_up: r.gauge("broker_up", "1 while the broker is reachable and delivering")?,
            broker_server: r.add(IntGaugeVec::new(
                Opts::new(
                    prefixed("broker_server"),
                    "The Redis server this node's subscriber connection talks to (1): the master now, or each cluster shard's",
                ),
                &["address"],
            )?)?,
            broker_publish_seconds: r.histogram("broker_publish_seconds", "Time to publish to the broker")?,
            broker_reconnects: r
                .counter("broker_reconnects_total", "Broker subscriber connections re-established after a loss")?,
            broker_probe_failures: r.counter(
                "broker_probe_failures_total",
                "Self-probes not received back in time (a dead subscriber connection)",
            )?,
            broker_connection_errors: r.counter(
                "broker_connection_errors_total",
                "Broker subscriber connections that could not be made or were lost",
            )?,
            broker_receive_overflow: r.counter(
                "broker_receive_overflow_total",
                "Messages from Redis dropped because the receive buffer was full (history channels are repaired)",
            )?,
            broker_subscriptions: r
                .gauge("broker_subscriptions", "Channels this node is subscribed to in the broker")?,
            delivery_seconds: r.histogram("delivery_seconds", "Time from publish to socket write")?,
            hook_requests: r.counters("hook_requests_total", "Hook calls by hook and outcome", &["hook", "status"])?,
            hook_seconds: r.add(HistogramVec::new(
                HistogramOpts::new(prefixed("hook_seconds"), "Hook call latency").buckets(LATENCY_BUCKETS.to_vec()),
                &["hook"],
            )?)?,
            disconnect_hook_dropped: hook_dropped.with_label_values(&["disconnect"]),
            upstream_requests: r.counters(
                "upstream_requests_total",
                "Proxied requests by the status returned downstream",
                &["status"],
            )?,
            upstream_seconds: r.histogram("upstream_seconds", "Time to the app's response headers")?,
            tunnels: r.gauge("tunnels", "WebSockets on other paths tunnelled to the app")?,
            history_reads: r
                .counter("history_reads_total", "Reads of a channel's history (recovery, catch-up, the API)")?,
            history_recovered: r.counter(
                "history_recovered_total",
                "Messages delivered from history: recovered by clients (since) or caught up by this node after a gap",
            )?,
            queued_bytes: r.gauge(
                "queued_bytes",
                "Bytes of channel messages queued for clients on this node (bounded by --max-queued-bytes)",
            )?,
            presence_size: r.add(Histogram::with_opts(
                HistogramOpts::new(prefixed("presence_size"), "Members of a channel's presence, per presence answer")
                    .buckets(vec![1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 10000.0]),
            )?)?,
            history_gaps: r.counter(
                "history_gaps_total",
                "Gaps history could not cover: subscribers told to reload (gap frame, recovered:false)",
            )?,
            history_lives_ended: r.counter(
                "history_lives_ended_total",
                "Times this node found Redis without acknowledged writes (failover, older copy): every channel's history starts a new epoch",
            )?,
            broker_unreplicated: r.counter(
                "broker_unreplicated_total",
                "Publish batches not on --redis-wait-replicas replicas within --redis-timeout (answered 200: delivered)",
            )?,
            socketio_forwards: r.counters(
                "socketio_forwards_total",
                "Socket.IO polling requests for a session on another sidecar: forwarded, gone (its node is), error",
                &["result"],
            )?,
            socketio_recoveries: r.counters(
                "socketio_recoveries_total",
                "Socket.IO reconnections with a pid: recovered, not_recovered",
                &["result"],
            )?,
            socketio_bridge: r.counters(
                "socketio_bridge_messages_total",
                "Messages from python-socketio's Redis manager (--socketio-redis-channel) by method; refused: pickle or malformed",
                &["method"],
            )?,
            calls: r.counters(
                "calls_total",
                "POST /api/call by result: answered, timeout, gone, unsupported",
                &["result"],
            )?,
            errors: {
                let errors = r.counters(
                    "errors_total",
                    "Errors answered to clients and the app, by who caused them (client, app, broker, internal)",
                    &["source"],
                )?;
                Fault::ALL.map(|f| errors.with_label_values(&[f.label()]))
            },
            registry: registry.clone(),
        };
        // Zero series exist before the first event, so rates and alerts work at once.
        for reason in CloseReason::ALL {
            m.disconnects.with_label_values(&[reason.label()]);
        }
        for result in ConnResult::ALL {
            m.connections_total.with_label_values(&[result.label()]);
        }
        for result in ["forwarded", "gone", "error"] {
            m.socketio_forwards.with_label_values(&[result]);
        }
        for result in ["recovered", "not_recovered"] {
            m.socketio_recoveries.with_label_values(&[result]);
        }
        for result in ["answered", "timeout", "gone", "unsupported"] {
            m.calls.with_label_values(&[result]);
        }
        for method in [
            "emit",
            "enter_room",
            "leave_room",
            "close_room",
            "disconnect",
            "callback",
            "refused",
            "too_large",
            "unknown",
        ] {
            m.socketio_bridge.with_label_values(&[method]);
        }
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(m)
    }

    /// The subscriber now talks to these Redis servers (the master, or the shards).
    pub fn set_broker_servers<'a>(&self, addresses: impl IntoIterator<Item = &'a str>) {
        self.broker_server.reset();
        for a in addresses {
            self.broker_server.with_label_values(&[a]).set(1);
        }
    }

    pub fn connection_result(&self, result: ConnResult) {
        self.connections_total.with_label_values(&[result.label()]).inc();
    }

    /// An error answered (reply, API response or refused upgrade), by its fault.
    pub fn error(&self, fault: Fault) {
        self.errors[fault as usize].inc();
    }

    pub fn disconnect(&self, reason: CloseReason) {
        self.disconnects.with_label_values(&[reason.label()]).inc();
    }

    pub fn hook(&self, hook: &'static str, status: &str, seconds: f64) {
        self.hook_requests.with_label_values(&[hook, status]).inc();
        self.hook_seconds.with_label_values(&[hook]).observe(seconds);
    }

    pub fn upstream(&self, status: http::StatusCode, seconds: f64) {
        self.upstream_requests.with_label_values(&[status.as_str()]).inc();
        self.upstream_seconds.observe(seconds);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
