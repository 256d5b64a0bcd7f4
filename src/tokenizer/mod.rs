//! Text <-> token ids, chat templates and output parsing.
//!
//! Two tokenizer families: Kimi's tiktoken BPE (`tiktoken.model` + the Kimi pre-tokenizer
//! pattern + 256 reserved special ids after the base vocabulary) and HF `tokenizer.json`
//! (DeepSeek-V3 and friends).

pub mod chat_template;
pub mod incremental;
pub mod parser;
pub mod quote;
mod tiktoken;

pub use incremental::IncrementalDecoder;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{dir} holds neither tiktoken.model nor tokenizer.json")]
    NotFound { dir: String },
    #[error("token id {id} is not in the vocabulary")]
    UnknownId { id: u32 },
}

fn invalid(path: &Path, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    crate::files::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    crate::files::read(path).map_err(|source| TokenizerError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| invalid(path, format!("not valid JSON: {e}")))
}

/// How special-token text inside the input is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Specials {
    /// `<|im_end|>` in the text becomes the special id (trusted text: rendered templates).
    Recognise,
    /// Special-token text is encoded as ordinary text (untrusted content).
    AsText,
}

enum Engine {
    Tiktoken(Box<tiktoken::KimiBpe>),
    Hf {
        normal: Box<tokenizers::Tokenizer>,
        plain: Box<tokenizers::Tokenizer>,
    },
}

pub struct Tokenizer {
    engine: Engine,
    /// Special token text -> id.
    specials: BTreeMap<String, u32>,
    special_names: BTreeMap<u32, String>,
    bos: Option<u32>,
    eos: Option<u32>,
    stop_ids: Vec<u32>,
    vocab_size: usize,
}

impl Tokenizer {
    /// Loads the tokenizer of a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let (engine, specials) = if dir.join("tiktoken.model").exists() {
            let config = config.as_ref().ok_or_else(|| {
                invalid(
                    &config_path,
                    "missing (needed for the special tokens of tiktoken.model)",
                )
            })?;
            let bpe = tiktoken::KimiBpe::load(&dir.join("tiktoken.model"), config, &config_path)?;
            let specials = bpe.specials().clone();
            (Engine::Tiktoken(Box::new(bpe)), specials)
        } else if dir.join("tokenizer.json").exists() {
            let path = dir.join("tokenizer.json");
            let normal = tokenizers::Tokenizer::from_bytes(read_bytes(&path)?)
                .map_err(|e| invalid(&path, e.to_string()))?;
            let mut plain = normal.clone();
            plain.set_encode_special_tokens(true);
            let specials: BTreeMap<String, u32> = normal
                .get_added_tokens_decoder()
                .iter()
                .filter(|(_, t)| t.special)
                .map(|(id, t)| (t.content.clone(), *id))
                .collect();
            (
                Engine::Hf {
                    normal: Box::new(normal),
                    plain: Box::new(plain),
                },
                specials,
            )
        } else {
            return Err(TokenizerError::NotFound {
                dir: dir.display().to_string(),
            });
        };
        let special_names = specials.iter().map(|(k, v)| (*v, k.clone())).collect();
        let mut tok = Tokenizer {
            engine,
            specials,
            special_names,
            bos: None,
            eos: None,
            stop_ids: Vec::new(),
            vocab_size: 0,
        };
        tok.vocab_size = match &tok.engine {
            Engine::Tiktoken(b) => b.vocab_size(),
            Engine::Hf { normal, .. } => normal.get_vocab_size(true),
        };
        if let Some(cfg) = &config {
            tok.bos = tok.config_token(cfg, "bos_token", &config_path)?;
            tok.eos = tok.config_token(cfg, "eos_token", &config_path)?;
        }
        tok.stop_ids = tok.collect_stop_ids(dir)?;
        Ok(tok)
    }

    /// Resolves `bos_token`/`eos_token` (a string or an AddedToken object) to an id.
    fn config_token(
        &self,
        cfg: &Value,
        key: &str,
        path: &Path,
    ) -> Result<Option<u32>, TokenizerError> {
        let text = match cfg.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => match o.get("content").and_then(|c| c.as_str()) {
                Some(s) => s.to_string(),
                None => {
                    return Err(invalid(
                        path,
                        format!("`{key}` object has no string `content`"),
                    ))
                }
            },
            Some(other) => {
                return Err(invalid(
                    path,
                    format!("`{key}` must be a string, got {other}"),
                ))
            }
        };
        match self.token_id(&text) {
            Some(id) => Ok(Some(id)),
            None => Err(invalid(
                path,
                format!("`{key}` names {text:?}, which is not a token of this tokenizer"),
            )),
        }
    }

    /// Ids that end generation: `eos_token`, every `eos_token_id` of generation_config.json
    /// and config.json, and the Kimi end markers `<|im_end|>` and `[EOS]` when present.
    fn collect_stop_ids(&self, dir: &Path) -> Result<Vec<u32>, TokenizerError> {
        let mut ids: Vec<u32> = self.eos.into_iter().collect();
        for file in ["generation_config.json", "config.json"] {
            let path = dir.join(file);
            if !path.exists() {
                continue;
            }
            let v = read_json(&path)?;
            let v = v
                .get("text_config")
                .filter(|t| t.get("eos_token_id").is_some())
                .unwrap_or(&v);
            match v.get("eos_token_id") {
                Some(Value::Array(items)) => {
                    for i in items {
                        ids.push(i.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(
                            || invalid(&path, format!("eos_token_id entry {i} is not a token id")),
                        )?);
                    }
                }
                Some(Value::Null) | None => {}
                Some(i) => ids.push(i.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(
                    || invalid(&path, format!("eos_token_id {i} is not a token id")),
                )?),
            }
        }
        for marker in ["<|im_end|>", "[EOS]"] {
            if let Some(&id) = self.specials.get(marker) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    pub fn encode(&self, text: &str, specials: Specials) -> Vec<u32> {
        match &self.engine {
            Engine::Tiktoken(b) => b.encode(text, specials),
            Engine::Hf { normal, plain } => {
                let t = if specials == Specials::Recognise {
                    normal
                } else {
                    plain
                };
                // Encoding a &str with no truncation or padding cannot fail.
                t.encode(text, false)
                    .map(|e| e.get_ids().to_vec())
                    .unwrap_or_default()
            }
        }
    }

    /// The bytes of a sequence of tokens (special tokens as their text).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(&self.token_bytes(id)?);
        }
        Ok(out)
    }

    /// Decodes to text; invalid UTF-8 becomes U+FFFD, as Python's `errors="replace"`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// The bytes of one token.
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>, TokenizerError> {
        if let Some(name) = self.special_names.get(&id) {
            return Ok(name.as_bytes().to_vec());
        }
        match &self.engine {
            Engine::Tiktoken(b) => b
                .token_bytes(id)
                .map(<[u8]>::to_vec)
                .ok_or(TokenizerError::UnknownId { id }),
            Engine::Hf { normal, .. } => {
                let piece = normal
                    .id_to_token(id)
                    .ok_or(TokenizerError::UnknownId { id })?;
                Ok(hf_piece_bytes(normal, id, &piece))
            }
        }
    }

    /// The id of a token given its text (special tokens, or a whole vocabulary entry).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        if let Some(&id) = self.specials.get(text) {
            return Some(id);
        }
        match &self.engine {
            Engine::Tiktoken(b) => b.rank_of(text.as_bytes()),
            Engine::Hf { normal, .. } => normal.token_to_id(text),
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos
            .and_then(|id| self.special_names.get(&id))
            .map(String::as_str)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos
            .and_then(|id| self.special_names.get(&id))
            .map(String::as_str)
    }

    /// Whether `id` is a special token (control markers, not text).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_names.contains_key(&id)
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Ids the tokenizer can produce (base vocabulary plus special tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Bytes of an HF vocabulary piece: byte-level BPE pieces map back through the GPT-2 byte
/// alphabet; other pieces are decoded by the tokenizer's own decoder.
fn hf_piece_bytes(t: &tokenizers::Tokenizer, id: u32, piece: &str) -> Vec<u8> {
    if is_byte_level(t) {
        let table = byte_level_inverse();
        if let Some(bytes) = piece.chars().map(|c| table.get(&c).copied()).collect() {
            return bytes;
        }
    }
    t.decode(&[id], false)
        .map(String::into_bytes)
        .unwrap_or_else(|_| piece.as_bytes().to_vec())
}

fn is_byte_level(t: &tokenizers::Tokenizer) -> bool {
    matches!(
        t.get_decoder(),
        Some(tokenizers::DecoderWrapper::ByteLevel(_))
    )
}

/// The GPT-2 byte-to-unicode table, inverted.
fn byte_level_inverse() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut chars: Vec<u32> = printable.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !printable.contains(&b) {
                printable.push(b);
                chars.push(256 + n);
                n += 1;
            }
        }
        printable
            .iter()
            .zip(chars)
            .filter_map(|(&b, c)| char::from_u32(c).map(|c| (c, b as u8)))
            .collect()
    })
}
