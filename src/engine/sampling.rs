//! Per-request sampling, in vLLM's order: logit bias, repetition / presence / frequency
//! penalties on the raw logits, then temperature, top-k, top-p and min-p on the
//! probabilities, then a draw from the request's own seeded generator. Log-probabilities
//! reported to the client are those of the model's raw logits, as vLLM reports them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustc_hash::FxHashMap;

/// Temperatures below this sample greedily (as vLLM does): dividing logits by a tiny
/// temperature overflows to infinities, whose softmax is not the greedy choice.
pub const GREEDY_BELOW_TEMPERATURE: f32 = 1e-5;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Below [`GREEDY_BELOW_TEMPERATURE`] (0 included) means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 means none.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub logit_bias: Vec<(u32, f32)>,
    /// Report this many most likely alternatives per generated token (`None`: no
    /// log-probabilities at all).
    pub logprobs: Option<usize>,
}

impl SamplingConfig {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        SamplingConfig {
            temperature: 0.0,
            ..SamplingConfig::default()
        }
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

/// A chosen token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The sampling state of one sequence.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
    /// How often each token was generated (presence and frequency penalties).
    output_counts: FxHashMap<u32, u32>,
    /// Tokens of the prompt (repetition penalty applies to them too).
    prompt_tokens: Vec<u32>,
}

impl Sampler {
    pub fn new(config: SamplingConfig, prompt: &[u32]) -> Self {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        let mut prompt_tokens = if config.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        prompt_tokens.sort_unstable();
        prompt_tokens.dedup();
        Sampler {
            config,
            rng,
            output_counts: FxHashMap::default(),
            prompt_tokens,
        }
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// Records a generated token (forced or sampled) for the penalties.
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
    }

    /// Chooses the next token from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let mut l = logits.to_vec();
        self.apply_penalties(&mut l);
        let c = &self.config;
        if c.temperature < GREEDY_BELOW_TEMPERATURE {
            return argmax(&l);
        }
        let mut candidates: Vec<(u32, f32)> = l
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, v / c.temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 {
            candidates.truncate(c.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|x| (x.1 - max).exp()).collect();
        normalise(&mut probs);
        if c.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= c.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            normalise(&mut probs);
        }
        if c.min_p > 0.0 {
            // Probabilities are sorted, so the kept ones are a prefix.
            let floor = c.min_p * probs[0];
            let keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
            probs.truncate(keep);
            normalise(&mut probs);
        }
        let mut draw: f32 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if draw < *p {
                return candidates[i].0;
            }
            draw -= p;
        }
        candidates[probs.len() - 1].0
    }

    fn apply_penalties(&self, l: &mut [f32]) {
        let c = &self.config;
        for &(id, bias) in &c.logit_bias {
            if let Some(v) = l.get_mut(id as usize) {
                *v += bias;
            }
        }
        if c.repetition_penalty != 1.0 {
            let seen = self
                .prompt_tokens
                .iter()
                .chain(self.output_counts.keys())
                .copied();
            for id in seen {
                if let Some(v) = l.get_mut(id as usize) {
                    *v = if *v > 0.0 {
                        *v / c.repetition_penalty
                    } else {
                        *v * c.repetition_penalty
                    };
                }
            }
        }
        if c.presence_penalty != 0.0 || c.frequency_penalty != 0.0 {
            for (&id, &count) in &self.output_counts {
                if let Some(v) = l.get_mut(id as usize) {
                    *v -= c.presence_penalty + c.frequency_penalty * count as f32;
                }
            }
        }
    }
}

fn normalise(p: &mut [f32]) {
    let sum: f32 = p.iter().sum();
    if sum > 0.0 {
        p.iter_mut().for_each(|x| *x /= sum);
    }
}

/// Log-softmax of raw logits: the chosen token's value and the `top` most likely.
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
    let value = |id: u32| {
        logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |v| v - log_sum)
    };
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let k = top.min(ids.len());
        ids.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        ids.truncate(k);
        ids.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        best = ids.into_iter().map(|id| (id, value(id))).collect();
    }
    TokenLogprob {
        token: chosen,
        logprob: value(chosen),
        top: best,
    }
}

/// Index of the largest logit; ties go to the lowest index.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(temperature: f32) -> SamplingConfig {
        SamplingConfig {
            temperature,
            seed: Some(3),
            ..SamplingConfig::default()
        }
    }

    #[test]
    fn greedy_picks_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits = [0.5, 1.0, 0.9, 0.2, 0.7];
        let draw = |seed| {
            let mut s = Sampler::new(
                SamplingConfig {
                    seed: Some(seed),
                    ..config(1.0)
                },
                &[],
            );
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        let logits = [0.5, 3.0, 2.9, -1.0];
        for t in [1e-40f32, 1e-30, 1e-6] {
            let mut s = Sampler::new(config(t), &[]);
            for _ in 0..20 {
                assert_eq!(s.sample(&logits), 1, "temperature {t}");
            }
        }
    }

    #[test]
    fn penalties_and_bias_change_the_greedy_choice() {
        let logits = [1.0, 2.0, 1.9];
        let mut s = Sampler::new(config(0.0), &[]);
        assert_eq!(s.sample(&logits), 1);
        s.observe(1);
        let mut p = Sampler::new(
            SamplingConfig {
                presence_penalty: 0.5,
                ..config(0.0)
            },
            &[],
        );
        p.observe(1);
        assert_eq!(p.sample(&logits), 2);
        let mut r = Sampler::new(
            SamplingConfig {
                repetition_penalty: 1.2,
                ..config(0.0)
            },
            &[1],
        );
        assert_eq!(r.sample(&logits), 2);
        let mut b = Sampler::new(
            SamplingConfig {
                logit_bias: vec![(0, 5.0)],
                ..config(0.0)
            },
            &[],
        );
        assert_eq!(b.sample(&logits), 0);
    }

    #[test]
    fn min_p_and_top_k_cut_the_tail() {
        let logits = [10.0, 9.0, 0.0, 0.0];
        let mut s = Sampler::new(
            SamplingConfig {
                min_p: 0.5,
                ..config(1.0)
            },
            &[],
        );
        assert!((0..100).all(|_| s.sample(&logits) == 0));
        let mut k = Sampler::new(
            SamplingConfig {
                top_k: 2,
                ..config(5.0)
            },
            &[],
        );
        assert!((0..100).all(|_| k.sample(&logits) < 2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let mut s = Sampler::new(
            SamplingConfig {
                top_p: 0.5,
                ..config(1.0)
            },
            &[],
        );
        assert!((0..50).all(|_| s.sample(&[10.0, 0.0, 0.0]) == 0));
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let lp = logprobs(&[0.0, 0.0f32.ln_1p(), 2.0f32.ln()], 2, 2);
        assert!((lp.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(lp.top[0].0, 2);
        assert_eq!(lp.top.len(), 2);
    }
}
