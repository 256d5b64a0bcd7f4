//! Expert activation statistics: how often each (layer, expert) was routed to, recorded
//! by `kimi-hybrid calibrate` and read by `plan --stats`.
//!
//! Format (JSON):
//! ```json
//! {"format": "kimi-hybrid-expert-stats/1", "model": "...", "tokens": 12345, "top_k": 8,
//!  "layers": {"1": [c_0, c_1, ...], "2": [...], ...}}
//! ```
//! `layers` maps each MoE layer index to one count per routed expert: the number of
//! tokens routed to it. `tokens` is how many tokens were observed.

use super::model_desc::ModelDesc;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const FORMAT: &str = "kimi-hybrid-expert-stats/1";

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertStats {
    pub format: String,
    #[serde(default)]
    pub model: String,
    pub tokens: u64,
    pub top_k: usize,
    /// MoE layer index (as a string key) -> count per expert.
    pub layers: BTreeMap<String, Vec<u64>>,
}

impl ExpertStats {
    pub fn new(model: &str, top_k: usize) -> Self {
        ExpertStats {
            format: FORMAT.into(),
            model: model.into(),
            tokens: 0,
            top_k,
            layers: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, layer: usize, expert: usize, experts_per_layer: usize) {
        let counts = self
            .layers
            .entry(layer.to_string())
            .or_insert_with(|| vec![0; experts_per_layer]);
        if let Some(c) = counts.get_mut(expert) {
            *c += 1;
        }
    }

    pub fn load(path: &Path) -> Result<Self, StatsError> {
        let text = crate::files::read_to_string(path).map_err(|source| StatsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let invalid = |message: String| StatsError::Invalid {
            path: path.display().to_string(),
            message,
        };
        let stats: ExpertStats = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if stats.format != FORMAT {
            return Err(invalid(format!(
                "field `format` is {:?}, expected {FORMAT:?}",
                stats.format
            )));
        }
        for key in stats.layers.keys() {
            key.parse::<usize>().map_err(|_| {
                invalid(format!("field `layers`: key {key:?} is not a layer index"))
            })?;
        }
        Ok(stats)
    }

    /// Checks the statistics against a model: every MoE layer present with one count per expert.
    pub fn validate(&self, model: &ModelDesc, path: &str) -> Result<(), StatsError> {
        let invalid = |message: String| StatsError::Invalid {
            path: path.to_string(),
            message,
        };
        for (key, counts) in &self.layers {
            let layer: usize = key.parse().map_err(|_| {
                invalid(format!("field `layers`: key {key:?} is not a layer index"))
            })?;
            if model.moe_index(layer).is_none() {
                return Err(invalid(format!(
                    "field `layers.{key}`: layer {layer} is not a MoE layer of {}",
                    model.name
                )));
            }
            if counts.len() != model.experts_per_layer {
                return Err(invalid(format!(
                    "field `layers.{key}`: {} counts, the model has {} experts per layer",
                    counts.len(),
                    model.experts_per_layer
                )));
            }
        }
        if self.tokens == 0 {
            return Err(invalid("field `tokens` is 0".into()));
        }
        Ok(())
    }

    /// Probability that a token visits expert e of `layer` (sums to top_k over a layer);
    /// uniform `top_k / experts` for layers without counts.
    pub fn visit_probability(&self, layer: usize, experts: usize, top_k: usize) -> Vec<f64> {
        match self.layers.get(&layer.to_string()) {
            Some(counts) if counts.iter().sum::<u64>() > 0 => {
                let total: u64 = counts.iter().sum();
                counts
                    .iter()
                    .map(|&c| c as f64 / total as f64 * top_k as f64)
                    .collect()
            }
            _ => vec![top_k as f64 / experts as f64; experts],
        }
    }
}
