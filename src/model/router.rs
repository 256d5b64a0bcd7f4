//! MoE routing: which experts each token visits and with what weight.
//!
//! DeepSeek-V3/Kimi (`noaux_tc`, sigmoid): selection uses `score + e_score_correction_bias`,
//! groups (when n_group > 1) are ranked by the sum of their two best biased scores and
//! only the best `topk_group` survive; the weights come from the unbiased scores,
//! normalised when `norm_topk_prob`, then multiplied by `routed_scaling_factor`.
//! `greedy` and `group_limited_greedy` (DeepSeek-V2, usually softmax) rank plainly by
//! score, groups by their best score.

use crate::config::{ModelConfig, ScoringFunc, TopkMethod};

/// Routes one token from its router logits. Returns `(expert, weight)` pairs, best first.
pub fn route(cfg: &ModelConfig, logits: &[f32], bias: Option<&[f32]>) -> Vec<(usize, f32)> {
    let scores: Vec<f32> = match cfg.scoring_func {
        ScoringFunc::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
        ScoringFunc::Softmax => {
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            exp.iter().map(|e| e / sum).collect()
        }
    };
    let mut choice: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };

    if cfg.n_group > 1 && cfg.topk_method != TopkMethod::Greedy {
        let per_group = cfg.experts_per_group();
        let group_scores: Vec<f32> = choice
            .chunks(per_group)
            .map(|g| match cfg.topk_method {
                TopkMethod::NoauxTc => top_indices(g, 2).iter().map(|&i| g[i]).sum(),
                _ => g.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
            })
            .collect();
        let kept = top_indices(&group_scores, cfg.topk_group);
        for (g, chunk) in choice.chunks_mut(per_group).enumerate() {
            if !kept.contains(&g) {
                chunk.fill(f32::NEG_INFINITY);
            }
        }
    }

    let chosen = top_indices(&choice, cfg.num_experts_per_tok);
    let mut weights: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
    if cfg.norm_topk_prob {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        for w in weights.iter_mut() {
            *w /= sum;
        }
    }
    chosen
        .into_iter()
        .zip(weights)
        .map(|(e, w)| (e, w * cfg.routed_scaling_factor))
        .collect()
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_experts: usize, k: usize, n_group: usize, topk_group: usize) -> ModelConfig {
        let mut c = ModelConfig::kimi_k26();
        c.n_routed_experts = n_experts;
        c.num_experts_per_tok = k;
        c.n_group = n_group;
        c.topk_group = topk_group;
        c.routed_scaling_factor = 2.0;
        c
    }

    #[test]
    fn bias_changes_selection_but_not_weights() {
        let c = cfg(4, 2, 1, 1);
        let logits = [2.0, 1.0, 0.0, -1.0];
        let plain = route(&c, &logits, None);
        assert_eq!(plain.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
        let bias = [0.0, 0.0, 0.0, 5.0];
        let biased = route(&c, &logits, Some(&bias));
        assert_eq!(biased.iter().map(|p| p.0).collect::<Vec<_>>(), vec![3, 0]);
        // Weights from unbiased sigmoid scores, normalised, times the scaling factor.
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (s3, s0) = (s(-1.0), s(2.0));
        assert!((biased[0].1 - 2.0 * s3 / (s3 + s0)).abs() < 1e-6);
        assert!((biased[1].1 - 2.0 * s0 / (s3 + s0)).abs() < 1e-6);
    }

    #[test]
    fn group_limited_selection_uses_top2_sum() {
        // Two groups of 4. Group 0 has the single best expert, group 1 the best pair.
        let c = cfg(8, 2, 2, 1);
        let logits = [4.0, -4.0, -4.0, -4.0, 1.0, 1.0, 1.0, -4.0];
        let r = route(&c, &logits, None);
        let ids: Vec<usize> = r.iter().map(|p| p.0).collect();
        assert_eq!(ids, vec![4, 5]);
    }

    #[test]
    fn softmax_greedy_without_normalisation() {
        let mut c = cfg(3, 1, 1, 1);
        c.scoring_func = ScoringFunc::Softmax;
        c.topk_method = TopkMethod::Greedy;
        c.norm_topk_prob = false;
        c.routed_scaling_factor = 1.0;
        let r = route(&c, &[0.0, 1.0, 0.0], None);
        let e = std::f32::consts::E;
        assert_eq!(r[0].0, 1);
        assert!((r[0].1 - e / (e + 2.0)).abs() < 1e-6);
    }

    #[test]
    fn group_limited_greedy_ranks_groups_by_max() {
        let mut c = cfg(8, 2, 2, 1);
        c.scoring_func = ScoringFunc::Softmax;
        c.topk_method = TopkMethod::GroupLimitedGreedy;
        let logits = [4.0, -4.0, -4.0, -4.0, 1.0, 1.0, 1.0, -4.0];
        let ids: Vec<usize> = route(&c, &logits, None).iter().map(|p| p.0).collect();
        assert_eq!(ids, vec![0, 1]);
    }
}
