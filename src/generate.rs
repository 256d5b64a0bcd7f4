//! Token generation for one sequence: prefill the prompt, then decode token by token,
//! choosing each token greedily (temperature 0) or by seeded sampling.

use crate::engine::sampling::Sampler;
pub use crate::engine::sampling::SamplingConfig;
pub use crate::engine::FinishReason;
use crate::forward::Forward;
use crate::model::{AttentionForm, KvCache, Logits, Model, ModelError};

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
    pub sampling: SamplingConfig,
    pub stop_ids: &'a [u32],
    pub keep_prompt_logits: bool,
}

pub fn generate(
    model: &Model,
    pass: &dyn Forward,
    req: &GenerateRequest,
) -> Result<Generation, ModelError> {
    let mut cache = KvCache::new(&model.config);
    let vocab = model.config.vocab_size;
    let mode = if req.keep_prompt_logits {
        Logits::All
    } else {
        Logits::Last
    };
    let logits = pass.forward(model, req.prompt, &mut cache, AttentionForm::Auto, mode)?;
    let mut last = logits[logits.len() - vocab..].to_vec();
    let prompt_logits = req.keep_prompt_logits.then_some(logits);
    let mut sampler = Sampler::new(req.sampling.clone(), req.prompt);
    let mut generated = Vec::with_capacity(req.max_new_tokens);
    let limit = model.config.max_position_embeddings;
    let mut finish = FinishReason::Length;
    while generated.len() < req.max_new_tokens {
        let next = sampler.sample(&last);
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
        last = pass.forward(
            model,
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
