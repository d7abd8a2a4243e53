//! The node's metrics: lock-free counters and histograms, grouped in one
//! [`Registry`] that renders Prometheus' text exposition format
//! (version 0.0.4) for `GET /metrics`.
//!
//! Deliberately small: every metric is declared once, up front, in
//! [`Metrics`], so the set scraped is the same on every node and
//! documented in one place. Labelled families take their label values at
//! run time (a model id, a task state) and keep one series per value.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A number that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A number that goes up and down (stored as `f64` bits).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Observations counted into fixed buckets (upper bounds, ascending).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, not cumulative; `+Inf` is `count`.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum of observations, in millionths (so it can be atomic).
    sum_micro: AtomicU64,
}

impl Histogram {
    /// A histogram over these bucket bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro.fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Metrics of one kind told apart by one label.
#[derive(Debug)]
pub struct Family<M> {
    label: &'static str,
    series: Mutex<BTreeMap<String, Arc<M>>>,
    make: fn() -> M,
}

impl<M> Family<M> {
    fn new(label: &'static str, make: fn() -> M) -> Self {
        Self { label, series: Mutex::new(BTreeMap::new()), make }
    }

    /// The series for `value`, created on first use.
    pub fn with(&self, value: &str) -> Arc<M> {
        let mut series = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        series.entry(value.to_string()).or_insert_with(|| Arc::new((self.make)())).clone()
    }

    fn snapshot(&self) -> Vec<(String, Arc<M>)> {
        let series = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        series.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Auction latency buckets, seconds: a bid window is 0.5 s by default.
pub const AUCTION_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0];

/// Routing overhead buckets, seconds: the target is under 10 ms.
pub const ROUTE_BUCKETS: &[f64] = &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5];

/// Every metric a node exports.
#[derive(Debug)]
pub struct Metrics {
    /// Peers with an open connection (set when scraped).
    pub peers_connected: Gauge,
    /// Peers whose advert is held (set when scraped).
    pub peers_known: Gauge,
    /// Valid adverts received from peers.
    pub adverts_received: Counter,
    /// Adverts dropped as invalid, stale or replayed.
    pub adverts_rejected: Counter,
    /// This node's adverts published on the model catalogue topic.
    pub catalogue_published: Counter,
    /// Connected peers by what keeps them open (`mesh`, `users`, `other`,
    /// `young`, `used`, `idle`; set at each advert interval's pruning).
    pub connections: Family<Gauge>,
    /// Peers connected to (the first connection to each, either way).
    pub connections_opened: Counter,
    /// Connections closed by the pruner to keep to the peer target.
    pub connections_pruned: Counter,
    /// Bytes of mycel messages received (request-response frames and gossip).
    pub bytes_in: Counter,
    /// Bytes of mycel messages sent.
    pub bytes_out: Counter,
    /// Tasks this node requested, by state (set when scraped).
    pub tasks: Family<Gauge>,
    /// Shards of this node's tasks, by state (set when scraped).
    pub shards: Family<Gauge>,
    /// Seconds from a CFP leaving to the award of its first shards.
    pub auction_latency: Histogram,
    /// Seconds `mycel/auto` spent choosing a model (embedding the prompt
    /// and scoring the candidates), before the task was submitted.
    pub route_latency: Histogram,
    /// Bids this node sent as a worker.
    pub bids_sent: Counter,
    /// Bids that won an award.
    pub bids_won: Counter,
    /// CFP rounds opened after the first (shards re-auctioned).
    pub reauctions: Counter,
    /// CFPs published by gossip (too few candidates known directly).
    pub cfps_gossiped: Counter,
    /// Results rejected: bad signature, wrong signer, wrong input or
    /// model, or outvoted by redundant executions.
    pub verification_failures: Counter,
    /// Items (texts or prompts) computed locally, by model.
    pub inference_items: Family<Counter>,
    /// Output tokens generated locally, by model.
    pub inference_tokens: Family<Counter>,
    /// Seconds spent computing locally, by model (items / seconds = throughput).
    pub inference_seconds: Family<Gauge>,
    /// Shards this node ran as a worker.
    pub shards_executed: Counter,
    /// Requests refused and gossiped CFPs dropped because their sender was
    /// over its rate.
    pub rate_limited: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero.
    pub fn new() -> Self {
        Self {
            peers_connected: Gauge::default(),
            peers_known: Gauge::default(),
            adverts_received: Counter::default(),
            adverts_rejected: Counter::default(),
            catalogue_published: Counter::default(),
            connections: Family::new("kept", Gauge::default),
            connections_opened: Counter::default(),
            connections_pruned: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            tasks: Family::new("state", Gauge::default),
            shards: Family::new("state", Gauge::default),
            auction_latency: Histogram::new(AUCTION_BUCKETS),
            route_latency: Histogram::new(ROUTE_BUCKETS),
            bids_sent: Counter::default(),
            bids_won: Counter::default(),
            reauctions: Counter::default(),
            cfps_gossiped: Counter::default(),
            verification_failures: Counter::default(),
            inference_items: Family::new("model", Counter::default),
            inference_tokens: Family::new("model", Counter::default),
            inference_seconds: Family::new("model", Gauge::default),
            shards_executed: Counter::default(),
            rate_limited: Counter::default(),
        }
    }

    /// Adds `seconds` to a model's compute time.
    pub fn add_inference_seconds(&self, model: &str, seconds: f64) {
        let g = self.inference_seconds.with(model);
        g.set(g.get() + seconds);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        gauge(w, "mycel_peers_connected", "Peers with an open connection.", &self.peers_connected);
        gauge(w, "mycel_peers_known", "Peers whose advert this node holds.", &self.peers_known);
        counter(w, "mycel_adverts_received_total", "Valid adverts received.", &self.adverts_received);
        counter(
            w,
            "mycel_adverts_rejected_total",
            "Adverts dropped: invalid, stale or replayed.",
            &self.adverts_rejected,
        );
        counter(
            w,
            "mycel_catalogue_published_total",
            "This node's adverts published on the model catalogue.",
            &self.catalogue_published,
        );
        gauge_family(
            w,
            "mycel_connections",
            "Connected peers by what keeps them open (mesh, users, other, young, used, idle).",
            &self.connections,
        );
        counter(
            w,
            "mycel_connections_opened_total",
            "Peers connected to (their first connection, either way).",
            &self.connections_opened,
        );
        counter(
            w,
            "mycel_connections_pruned_total",
            "Connections closed to keep to the peer target.",
            &self.connections_pruned,
        );
        counter(w, "mycel_bytes_received_total", "Bytes of mycel messages received.", &self.bytes_in);
        counter(w, "mycel_bytes_sent_total", "Bytes of mycel messages sent.", &self.bytes_out);
        gauge_family(w, "mycel_tasks", "Tasks this node requested, by state.", &self.tasks);
        gauge_family(w, "mycel_shards", "Shards of this node's tasks, by state.", &self.shards);
        histogram(w, "mycel_auction_latency_seconds", "From a CFP to the first award.", &self.auction_latency);
        histogram(w, "mycel_route_seconds", "Choosing a model for mycel/auto.", &self.route_latency);
        counter(w, "mycel_bids_sent_total", "Bids sent as a worker.", &self.bids_sent);
        counter(w, "mycel_bids_won_total", "Bids that won an award.", &self.bids_won);
        counter(w, "mycel_reauctions_total", "CFP rounds after a task's first.", &self.reauctions);
        counter(w, "mycel_cfps_gossiped_total", "CFPs published by gossip.", &self.cfps_gossiped);
        counter(
            w,
            "mycel_verification_failures_total",
            "Results rejected (signature, signer, input, model, outvoted).",
            &self.verification_failures,
        );
        counter(w, "mycel_shards_executed_total", "Shards run as a worker.", &self.shards_executed);
        counter(
            w,
            "mycel_rate_limited_total",
            "Requests refused and gossiped CFPs dropped: their sender was over its rate.",
            &self.rate_limited,
        );
        counter_family(w, "mycel_inference_items_total", "Items computed locally, by model.", &self.inference_items);
        counter_family(
            w,
            "mycel_inference_tokens_total",
            "Tokens generated locally, by model.",
            &self.inference_tokens,
        );
        let seconds = &self.inference_seconds;
        header(w, "mycel_inference_seconds_total", "Seconds computing locally, by model.", "counter");
        for (value, g) in seconds.snapshot() {
            let _ =
                writeln!(w, "mycel_inference_seconds_total{{{}=\"{}\"}} {}", seconds.label, escape(&value), g.get());
        }
        out
    }
}

fn header(w: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(w, "# HELP {name} {help}");
    let _ = writeln!(w, "# TYPE {name} {kind}");
}

fn counter(w: &mut String, name: &str, help: &str, c: &Counter) {
    header(w, name, help, "counter");
    let _ = writeln!(w, "{name} {}", c.get());
}

fn gauge(w: &mut String, name: &str, help: &str, g: &Gauge) {
    header(w, name, help, "gauge");
    let _ = writeln!(w, "{name} {}", g.get());
}

fn gauge_family(w: &mut String, name: &str, help: &str, f: &Family<Gauge>) {
    header(w, name, help, "gauge");
    for (value, g) in f.snapshot() {
        let _ = writeln!(w, "{name}{{{}=\"{}\"}} {}", f.label, escape(&value), g.get());
    }
}

fn counter_family(w: &mut String, name: &str, help: &str, f: &Family<Counter>) {
    header(w, name, help, "counter");
    for (value, c) in f.snapshot() {
        let _ = writeln!(w, "{name}{{{}=\"{}\"}} {}", f.label, escape(&value), c.get());
    }
}

fn histogram(w: &mut String, name: &str, help: &str, h: &Histogram) {
    header(w, name, help, "histogram");
    let mut cumulative = 0;
    for (bound, bucket) in h.bounds.iter().zip(&h.buckets) {
        cumulative += bucket.load(Ordering::Relaxed);
        let _ = writeln!(w, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let count = h.count();
    let _ = writeln!(w, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(w, "{name}_sum {}", h.sum_micro.load(Ordering::Relaxed) as f64 / 1e6);
    let _ = writeln!(w, "{name}_count {count}");
}

/// Label values escape backslash, quote and newline.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_families_and_cumulative_buckets() {
        let m = Metrics::new();
        m.bytes_in.add(10);
        m.inference_items.with("all-minilm-l6-v2").add(32);
        m.inference_items.with("a\"b").inc();
        m.tasks.with("done").set(2.0);
        m.auction_latency.observe(0.2);
        m.auction_latency.observe(0.7);
        m.auction_latency.observe(30.0);
        let text = m.render();
        assert!(text.contains("mycel_bytes_received_total 10\n"), "{text}");
        assert!(text.contains("mycel_inference_items_total{model=\"all-minilm-l6-v2\"} 32\n"));
        assert!(text.contains("mycel_inference_items_total{model=\"a\\\"b\"} 1\n"));
        assert!(text.contains("mycel_tasks{state=\"done\"} 2\n"));
        assert!(text.contains("mycel_auction_latency_seconds_bucket{le=\"0.25\"} 1\n"));
        assert!(text.contains("mycel_auction_latency_seconds_bucket{le=\"1\"} 2\n"));
        assert!(text.contains("mycel_auction_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("mycel_auction_latency_seconds_count 3\n"));
        // Every sample line belongs to a declared metric.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {base} ")) || text.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }
}
