//! Token generation for one sequence: prefill the prompt, then decode token by token,
//! choosing each token greedily (temperature 0) or by seeded sampling.

use crate::backend::Backend;
use crate::model::{AttentionForm, KvCache, Logits, Model, ModelError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced (it is included in the output).
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The model's context limit was reached.
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub generated_ids: Vec<u32>,
    /// Logits at every prompt position `[prompt_len, vocab]`, when asked for.
    pub prompt_logits: Option<Vec<f32>>,
    pub finish_reason: FinishReason,
}

pub struct GenerateRequest<'a> {
    pub prompt: &'a [u32],
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: &'a [u32],
    pub keep_prompt_logits: bool,
}

pub fn generate(
    model: &Model,
    backend: &dyn Backend,
    req: &GenerateRequest,
) -> Result<Generation, ModelError> {
    let mut cache = KvCache::new(&model.config);
    let vocab = model.config.vocab_size;
    let mode = if req.keep_prompt_logits {
        Logits::All
    } else {
        Logits::Last
    };
    let logits = model.forward(backend, req.prompt, &mut cache, AttentionForm::Auto, mode)?;
    let mut last = logits[logits.len() - vocab..].to_vec();
    let prompt_logits = req.keep_prompt_logits.then_some(logits);
    let mut rng = StdRng::seed_from_u64(req.sampling.seed);
    let mut generated = Vec::with_capacity(req.max_new_tokens);
    let limit = model.config.max_position_embeddings;
    let mut finish = FinishReason::Length;
    while generated.len() < req.max_new_tokens {
        let next = sample(&last, &req.sampling, &mut rng);
        generated.push(next);
        if req.stop_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        if generated.len() == req.max_new_tokens {
            break;
        }
        if cache.len() >= limit {
            finish = FinishReason::ContextFull;
            break;
        }
        last = model.forward(
            backend,
            &[next],
            &mut cache,
            AttentionForm::Auto,
            Logits::Last,
        )?;
    }
    Ok(Generation {
        generated_ids: generated,
        prompt_logits,
        finish_reason: finish,
    })
}

/// Picks the next token from one position's logits.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut impl Rng) -> u32 {
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / params.temperature))
        .collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        candidates.truncate(params.top_k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p;
                cumulative >= params.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    let mut draw: f32 = rng.random();
    for (i, p) in probs.iter().enumerate() {
        if draw < *p {
            return candidates[i].0;
        }
        draw -= p;
    }
    candidates[probs.len() - 1].0
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

    #[test]
    fn greedy_picks_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn sampling_respects_top_k_and_seed() {
        let logits = [0.0, 5.0, 4.9, -2.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 7,
        };
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<u32> = (0..200)
            .map(|_| sample(&logits, &params, &mut rng))
            .collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 2));
        assert!(draws.contains(&1) && draws.contains(&2));
        let mut rng2 = StdRng::seed_from_u64(7);
        let again: Vec<u32> = (0..200)
            .map(|_| sample(&logits, &params, &mut rng2))
            .collect();
        assert_eq!(draws, again);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let logits = [10.0, 0.0, 0.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 1,
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert!((0..50).all(|_| sample(&logits, &params, &mut rng) == 0));
    }
}
