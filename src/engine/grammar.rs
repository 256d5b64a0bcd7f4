//! Constrained decoding through llguidance: a grammar (a JSON schema, or a Lark grammar
//! for Kimi's tool-call sections) becomes an [`OutputConstraint`] that masks every
//! token the grammar cannot take next, so the output is valid whatever the model's
//! logits say. The vocabulary is handed to llguidance once per tokenizer; special
//! tokens keep their names (`<|tool_call_begin|>`) so grammars can name them.

use super::constraint::OutputConstraint;
use crate::tokenizer::{Specials, Tokenizer};
use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("the tokenizer cannot be used for constrained decoding: {0}")]
    Vocabulary(String),
    #[error("{0}")]
    Compile(String),
}

/// The tokenizer as llguidance sees it.
struct KimiTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for KimiTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.tokenizer
            .encode(&String::from_utf8_lossy(s), Specials::AsText)
    }
}

/// What grammars compile against: the vocabulary's trie and the parser settings.
pub struct GrammarVocab {
    factory: ParserFactory,
    /// The token that ends a turn: allowed when the grammar accepts, forced when it
    /// has stopped.
    end_of_turn: u32,
}

impl GrammarVocab {
    /// Builds the vocabulary trie (a few hundred milliseconds for Kimi's 163,840
    /// tokens), so it is done once and shared.
    pub fn new(tokenizer: Arc<Tokenizer>, end_of_turn: u32) -> Result<Self, GrammarError> {
        let n = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| match tokenizer.token_bytes(id) {
                Ok(bytes) if tokenizer.is_special(id) => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(&bytes);
                    w
                }
                Ok(bytes) => bytes,
                // Ids with no bytes (gaps in the vocabulary) can never be produced.
                Err(_) => Vec::new(),
            })
            .collect();
        let info = TokRxInfo {
            tok_end_of_turn: Some(end_of_turn),
            ..TokRxInfo::new(n as u32, end_of_turn)
        };
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(KimiTokEnv { trie, tokenizer });
        let caps = InferenceCapabilities {
            ff_tokens: false,
            backtrack: false,
            conditional_ff_tokens: false,
            fork: false,
        };
        let mut factory = ParserFactory::new(&env, caps, &SlicedBiasComputer::general_slices())
            .map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(GrammarVocab {
            factory,
            end_of_turn,
        })
    }

    /// A rule that holds the output to `grammar`; with `after`, only once that token
    /// (the reasoning block's `</think>`) has been emitted.
    pub fn rule(
        &self,
        grammar: TopLevelGrammar,
        after: Option<u32>,
    ) -> Result<GrammarRule, GrammarError> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Compile(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Compile(e));
        }
        Ok(GrammarRule {
            matcher: Arc::new(Mutex::new(matcher)),
            waiting_for: after,
            end_of_turn: self.end_of_turn,
            failed: false,
        })
    }
}

/// One sequence's grammar state. Cloning gives an independent copy (for `n` choices).
pub struct GrammarRule {
    matcher: Arc<Mutex<Matcher>>,
    waiting_for: Option<u32>,
    end_of_turn: u32,
    /// The matcher reached an error (it cannot, for tokens it allowed); the sequence
    /// ends rather than going on unconstrained.
    failed: bool,
}

impl GrammarRule {
    /// An independent copy with the same state.
    pub fn fork(&self) -> GrammarRule {
        let matcher = match self.matcher.lock() {
            Ok(m) => m.deep_clone(),
            Err(poisoned) => poisoned.into_inner().deep_clone(),
        };
        GrammarRule {
            matcher: Arc::new(Mutex::new(matcher)),
            waiting_for: self.waiting_for,
            end_of_turn: self.end_of_turn,
            failed: self.failed,
        }
    }

    fn with_matcher<T>(&self, f: impl FnOnce(&mut Matcher) -> T) -> T {
        match self.matcher.lock() {
            Ok(mut m) => f(&mut m),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn active(&self) -> bool {
        self.waiting_for.is_none()
    }
}

impl OutputConstraint for GrammarRule {
    fn force(&mut self) -> Option<u32> {
        let done = self.failed || self.with_matcher(|m| m.is_stopped());
        (self.active() && done).then_some(self.end_of_turn)
    }

    fn masks(&self) -> bool {
        self.active() && !self.failed
    }

    fn mask(&mut self, logits: &mut [f32]) {
        match self.with_matcher(|m| m.compute_mask()) {
            Ok(allowed) => {
                for (id, l) in logits.iter_mut().enumerate() {
                    if id >= allowed.len() || !allowed.is_allowed(id as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "grammar failed; ending the output");
                self.failed = true;
                let end = self.end_of_turn as usize;
                for (id, l) in logits.iter_mut().enumerate() {
                    if id != end {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    fn observe(&mut self, token: u32) {
        if let Some(wanted) = self.waiting_for {
            if token == wanted {
                self.waiting_for = None;
            }
            return;
        }
        if self.failed || token == self.end_of_turn {
            return;
        }
        if let Err(e) = self.with_matcher(|m| m.consume_token(token)) {
            tracing::warn!(error = %e, "grammar rejected a token; ending the output");
            self.failed = true;
        }
    }
}
