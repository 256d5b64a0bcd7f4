//! Prometheus metrics through `prometheus-client`: request and token counters,
//! time-to-first-token, inter-token and end-to-end latency histograms, and the engine's
//! live counters and gauges (read at each scrape). The sample names are the ones this
//! server has always exported (`kimi_hybrid_requests_total{outcome=...}`,
//! `kimi_hybrid_num_requests_running`, ...), not vLLM's.

use crate::engine::EngineStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const LATENCY_BOUNDS: [f64; 19] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// The server's own metrics; the engine's are read from [`EngineStats`] per scrape.
pub struct Metrics {
    requests: Family<Outcome, Counter>,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let latency = || Histogram::new(LATENCY_BOUNDS);
        let m = Metrics {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            ttft: latency(),
            itl: latency(),
            e2e: latency(),
        };
        // Every outcome is exported from the start, at zero.
        for outcome in ["success", "error", "aborted"] {
            let _ = m.requests.get_or_create(&Outcome { outcome });
        }
        m
    }
}

/// The engine's counters and gauges, encoded from its atomics at each scrape.
#[derive(Debug)]
struct EngineCollector(Arc<EngineStats>);

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &self.0;
        let counters = [
            (
                "kimi_hybrid_prefix_cache_hit_tokens",
                "Prompt tokens served from the prefix cache",
                e.prefix_cached_tokens.load(Ordering::Relaxed),
            ),
            (
                "kimi_hybrid_preemptions",
                "Sequences preempted because the KV cache was full",
                e.preemptions.load(Ordering::Relaxed),
            ),
            (
                "kimi_hybrid_engine_steps",
                "Batched forward passes run",
                e.steps.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(metric)?;
        }
        let used = e.kv_blocks_used.load(Ordering::SeqCst);
        let total = e.kv_blocks_total.load(Ordering::SeqCst);
        let gauges = [
            (
                "kimi_hybrid_num_requests_running",
                "Sequences in the running batch",
                e.running.load(Ordering::SeqCst) as f64,
            ),
            (
                "kimi_hybrid_num_requests_waiting",
                "Sequences waiting to be admitted",
                e.waiting.load(Ordering::SeqCst) as f64,
            ),
            (
                "kimi_hybrid_kv_blocks_used",
                "KV cache blocks referenced by sequences",
                used as f64,
            ),
            (
                "kimi_hybrid_kv_blocks_total",
                "KV cache blocks in the pool",
                total as f64,
            ),
            (
                "kimi_hybrid_kv_cache_usage_perc",
                "Fraction of KV blocks in use",
                if total == 0 {
                    0.0
                } else {
                    used as f64 / total as f64
                },
            ),
        ];
        for (name, help, v) in gauges {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(metric)?;
        }
        Ok(())
    }
}

impl Metrics {
    pub fn time_to_first_token(&self, seconds: f64) {
        self.ttft.observe(seconds);
    }

    pub fn inter_token(&self, seconds: f64) {
        self.itl.observe(seconds);
    }

    pub fn finished(&self, seconds: f64, prompt_tokens: usize, generated: usize) {
        self.e2e.observe(seconds);
        self.requests
            .get_or_create(&Outcome { outcome: "success" })
            .inc();
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.generation_tokens.inc_by(generated as u64);
    }

    pub fn error(&self) {
        self.requests
            .get_or_create(&Outcome { outcome: "error" })
            .inc();
    }

    pub fn aborted(&self) {
        self.requests
            .get_or_create(&Outcome { outcome: "aborted" })
            .inc();
    }

    /// The exposition text (OpenMetrics), with the engine's live values.
    pub fn render(&self, engine: &Arc<EngineStats>) -> String {
        let mut registry = Registry::default();
        registry.register(
            "kimi_hybrid_requests",
            "Requests by outcome",
            self.requests.clone(),
        );
        registry.register(
            "kimi_hybrid_prompt_tokens",
            "Prompt tokens of finished requests",
            self.prompt_tokens.clone(),
        );
        registry.register(
            "kimi_hybrid_generation_tokens",
            "Generated tokens of finished requests",
            self.generation_tokens.clone(),
        );
        registry.register(
            "kimi_hybrid_time_to_first_token_seconds",
            "Time to first token",
            self.ttft.clone(),
        );
        registry.register(
            "kimi_hybrid_inter_token_latency_seconds",
            "Time between tokens",
            self.itl.clone(),
        );
        registry.register(
            "kimi_hybrid_e2e_request_latency_seconds",
            "Request latency",
            self.e2e.clone(),
        );
        registry.register_collector(Box::new(EngineCollector(engine.clone())));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
