//! The large INT4 fixture (about 1.7 GB, not committed): the checkpoint is memory-mapped,
//! not read into anonymous memory, and the forward still matches transformers.
//!
//! Generate it, then run this ignored test:
//!   python3 tests/reference/make_fixtures.py --only none --large
//!   cargo test --release --test large_fixture -- --ignored --nocapture

mod common;

use common::max_abs_diff;
use kimi_hybrid::device::cpu::kernels::ReferenceBackend;
use kimi_hybrid::model::{AttentionForm, KvCache, Logits, Model};
use kimi_hybrid::weights::Checkpoint;
use std::path::PathBuf;

fn rss_anon_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .expect("RssAnon line");
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("RssAnon value");
    kib * 1024
}

#[test]
#[ignore = "needs the large fixture: python3 tests/reference/make_fixtures.py --only none --large"]
fn large_checkpoint_is_mapped_not_copied_and_matches_transformers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures-large/large-int4");
    assert!(
        dir.exists(),
        "{} is missing; generate it with tests/reference/make_fixtures.py --large",
        dir.display()
    );

    let before = rss_anon_bytes();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = Model::load(&ckpt).unwrap();
    let after = rss_anon_bytes();
    let size = ckpt.file_bytes();
    let grew = after.saturating_sub(before);
    let share = grew as f64 / size as f64 * 100.0;
    println!(
        "large-int4: checkpoint {:.2} GB, RssAnon {:.1} MiB -> {:.1} MiB after load (+{:.2} MiB = {share:.3}% of the checkpoint)",
        size as f64 / 1e9,
        before as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64,
        grew as f64 / (1 << 20) as f64,
    );
    assert!(
        share < 5.0,
        "loading grew anonymous memory by {share:.2}% of the checkpoint"
    );

    let g = {
        let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let prompt: Vec<u32> = st
            .tensor("prompt_ids")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect();
        let logits: Vec<f32> = st
            .tensor("logits")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (prompt, logits)
    };
    let mut cache = KvCache::new(&model.config);
    let reference: &dyn kimi_hybrid::forward::Forward =
        &kimi_hybrid::forward::on_cpu(std::sync::Arc::new(ReferenceBackend));
    let logits = reference
        .forward(&model, &g.0, &mut cache, AttentionForm::Naive, Logits::All)
        .unwrap();
    let diff = max_abs_diff(&logits, &g.1);
    println!("large-int4: prefill logits max abs diff vs transformers {diff:.3e}");
    assert!(diff <= 2e-3);
}
