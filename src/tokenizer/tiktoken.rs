//! Kimi's tiktoken BPE: `tiktoken.model` ranks, the Kimi pre-tokenizer pattern, and 256
//! reserved special ids right after the base vocabulary (named by
//! `tokenizer_config.json`'s `added_tokens_decoder`, the rest `<|reserved_token_{id}|>`).
//! Input is cut exactly as Moonshot's `tokenization_kimi.py` cuts it: 400,000-character
//! windows, then runs of at most 25,000 consecutive whitespace or non-whitespace
//! characters, so BPE never sees an unbounded piece and encoding stays linear.

use super::{invalid, read_text, Specials, TokenizerError};
use base64::Engine as _;
use rustc_hash::FxHashMap;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use tiktoken_rs::CoreBPE;

/// The Kimi pre-tokenizer (spec section 5), alternatives joined with `|`.
pub const KIMI_PATTERN: &str = concat!(
    r"[\p{Han}]+",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+",
);

const NUM_RESERVED_SPECIAL: u32 = 256;
const MAX_ENCODE_CHARS: usize = 400_000;
const MAX_RUN_CHARS: usize = 25_000;

pub struct KimiBpe {
    bpe: CoreBPE,
    /// Token bytes by rank.
    decoder: Vec<Vec<u8>>,
    ranks: FxHashMap<Vec<u8>, u32>,
    specials: BTreeMap<String, u32>,
}

impl KimiBpe {
    pub fn load(model: &Path, config: &Value, config_path: &Path) -> Result<Self, TokenizerError> {
        let text = read_text(model)?;
        let mut ranks: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(rank), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(invalid(
                    model,
                    format!("line {}: expected `base64-token rank`", n + 1),
                ));
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(token)
                .map_err(|e| {
                    invalid(model, format!("line {}: bad base64 {token:?}: {e}", n + 1))
                })?;
            let rank: u32 = rank
                .parse()
                .map_err(|_| invalid(model, format!("line {}: bad rank {rank:?}", n + 1)))?;
            if ranks.insert(bytes, rank).is_some() {
                return Err(invalid(
                    model,
                    format!("line {}: token {token:?} appears twice", n + 1),
                ));
            }
        }
        let base = ranks.len() as u32;
        let mut decoder = vec![Vec::new(); base as usize];
        for (bytes, &rank) in &ranks {
            let slot = decoder.get_mut(rank as usize).ok_or_else(|| {
                invalid(
                    model,
                    format!("rank {rank} is outside 0..{base}: ranks must be contiguous"),
                )
            })?;
            if !slot.is_empty() {
                return Err(invalid(model, format!("rank {rank} is used twice")));
            }
            *slot = bytes.clone();
        }
        for b in 0..=255u8 {
            if !ranks.contains_key(&[b][..]) {
                return Err(invalid(
                    model,
                    format!("byte 0x{b:02x} has no rank; BPE needs all 256 single bytes"),
                ));
            }
        }

        let specials = special_tokens(config, config_path, base)?;
        let encoder: rustc_hash::FxHashMap<String, u32> =
            specials.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let bpe = CoreBPE::new(ranks.clone(), encoder, KIMI_PATTERN)
            .map_err(|e| invalid(model, format!("cannot build BPE: {e}")))?;
        Ok(KimiBpe {
            bpe,
            decoder,
            ranks,
            specials,
        })
    }

    pub fn specials(&self) -> &BTreeMap<String, u32> {
        &self.specials
    }

    pub fn vocab_size(&self) -> usize {
        self.decoder.len() + self.specials.len()
    }

    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.decoder.get(id as usize).map(Vec::as_slice)
    }

    pub fn rank_of(&self, bytes: &[u8]) -> Option<u32> {
        self.ranks.get(bytes).copied()
    }

    pub fn encode(&self, text: &str, specials: Specials) -> Vec<u32> {
        let allowed: HashSet<&str> = match specials {
            Specials::Recognise => self.specials.keys().map(String::as_str).collect(),
            Specials::AsText => HashSet::new(),
        };
        let mut out = Vec::new();
        for window in char_windows(text, MAX_ENCODE_CHARS) {
            for piece in split_runs(window, MAX_RUN_CHARS) {
                let ids = match self.bpe.encode(piece, &allowed) {
                    Ok((ids, _)) => ids,
                    // Only a regex backtracking limit can fail here; pieces are bounded
                    // by the run split, so this is not expected. Encode ordinarily then.
                    Err(_) => self.bpe.encode_ordinary(piece),
                };
                out.extend(ids);
            }
        }
        out
    }
}

/// The 256 reserved special ids after the base vocabulary, named from
/// `added_tokens_decoder` or `<|reserved_token_{id}|>`.
fn special_tokens(
    config: &Value,
    path: &Path,
    base: u32,
) -> Result<BTreeMap<String, u32>, TokenizerError> {
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    if let Some(decoder) = config.get("added_tokens_decoder") {
        let decoder = decoder
            .as_object()
            .ok_or_else(|| invalid(path, "`added_tokens_decoder` must be an object"))?;
        for (id, entry) in decoder {
            let id: u32 = id.parse().map_err(|_| {
                invalid(
                    path,
                    format!("added_tokens_decoder key {id:?} is not a token id"),
                )
            })?;
            if id < base || id >= base + NUM_RESERVED_SPECIAL {
                return Err(invalid(
                    path,
                    format!(
                        "added_tokens_decoder id {id} is outside the special range {base}..{}",
                        base + NUM_RESERVED_SPECIAL
                    ),
                ));
            }
            let content = entry
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| {
                    invalid(
                        path,
                        format!("added_tokens_decoder[{id}] has no string `content`"),
                    )
                })?;
            // An empty special token matches everywhere: encoding would never advance.
            if content.is_empty() {
                return Err(invalid(
                    path,
                    format!("added_tokens_decoder[{id}] has an empty `content`"),
                ));
            }
            names.insert(id, content.to_string());
        }
    }
    let mut specials = BTreeMap::new();
    for id in base..base + NUM_RESERVED_SPECIAL {
        let name = names
            .remove(&id)
            .unwrap_or_else(|| format!("<|reserved_token_{id}|>"));
        if let Some(previous) = specials.insert(name.clone(), id) {
            return Err(invalid(
                path,
                format!("special token {name:?} is given to both {previous} and {id}"),
            ));
        }
    }
    Ok(specials)
}

/// Consecutive slices of at most `max` characters.
fn char_windows(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let (head, tail) = rest.split_at(cut);
        rest = tail;
        Some(head)
    })
}

/// Python's `str.isspace` (Unicode White_Space plus the information separators 0x1c-0x1f).
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `_split_whitespaces_or_nonwhitespaces` of tokenization_kimi.py: cut wherever a run of
/// whitespace or of non-whitespace would exceed `max` characters.
fn split_runs(s: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut run_len = 0usize;
    let mut run_is_space = s.chars().next().is_some_and(is_python_space);
    let mut start = 0usize;
    for (i, c) in s.char_indices() {
        let space = is_python_space(c);
        if run_is_space ^ space {
            run_len = 1;
            run_is_space = space;
        } else {
            run_len += 1;
            if run_len > max {
                pieces.push(&s[start..i]);
                start = i;
                run_len = 1;
            }
        }
    }
    pieces.push(&s[start..]);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_cut_at_the_limit() {
        let s = "a".repeat(7);
        assert_eq!(split_runs(&s, 3), vec!["aaa", "aaa", "a"]);
        let s = format!("{}{}", "  ", "bbbb");
        assert_eq!(split_runs(&s, 3), vec!["  bbb", "b"]);
        assert_eq!(split_runs("", 3), vec![""]);
    }

    #[test]
    fn windows_cut_on_char_boundaries() {
        let w: Vec<&str> = char_windows("héllo", 2).collect();
        assert_eq!(w, vec!["hé", "ll", "o"]);
    }
}
