//! The demo checkpoint bundled in the binary: the `kimi-int4` golden fixture (Kimi
//! layout, INT4 pack-quantized routed experts, YaRN 64, a small Kimi tokenizer). `run`,
//! `inspect` and the text commands use it when no `--model` is given. It is written once
//! to the user's cache directory because the loader memory-maps files.

use std::path::{Path, PathBuf};

const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../tests/fixtures/kimi-int4/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../tests/fixtures/kimi-int4/generation_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../tests/fixtures/kimi-int4/model.safetensors"),
    ),
    (
        "tiktoken.model",
        include_bytes!("../tests/fixtures/kimi-int4/tiktoken.model"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../tests/fixtures/kimi-int4/tokenizer_config.json"),
    ),
];

/// Returns the directory of the demo checkpoint, writing it on first use.
pub fn demo_checkpoint_dir() -> std::io::Result<PathBuf> {
    let dir = cache_root().join(format!("demo-kimi-int4-{:016x}", content_hash()));
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in FILES {
        // A cached file is used only when it holds exactly the bundled bytes (a few
        // hundred KB, read at every start): a corrupted cache is rewritten, not trusted.
        if file_matches(&dir.join(name), bytes) {
            continue;
        }
        // Write then rename, so a concurrent or interrupted run never sees half a file.
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(dir)
}

fn file_matches(path: &Path, bytes: &[u8]) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
        && std::fs::read(path).is_ok_and(|held| held == bytes)
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kimi-hybrid");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache").join("kimi-hybrid");
    }
    std::env::temp_dir().join("kimi-hybrid")
}

/// FNV-1a over the bundled bytes: a new build with a new demo gets a new directory.
fn content_hash() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for b in name.as_bytes().iter().chain(bytes.iter()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}
