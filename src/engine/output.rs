//! Turning a sequence's generated tokens into text deltas: incremental detokenization,
//! special tokens shown or skipped, and stop strings (cut from the output, text that
//! could still become a stop string held back until it is decided).

use crate::tokenizer::incremental::IncrementalDecoder;
use crate::tokenizer::Tokenizer;

pub struct TextOutput {
    decoder: IncrementalDecoder,
    skip_special: bool,
    /// Special tokens kept even when skipping (the reasoning and tool-call markers).
    keep: Vec<u32>,
    stops: Vec<String>,
    /// Decoded text not yet sent (may end in the start of a stop string).
    pending: String,
}

impl TextOutput {
    pub fn new(stops: Vec<String>, skip_special: bool, keep: Vec<u32>) -> Self {
        TextOutput {
            decoder: IncrementalDecoder::new(),
            skip_special,
            keep,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds a token. Returns the text that can be sent now, and the stop string when
    /// one was completed (the text before it is returned, nothing after).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> (String, Option<String>) {
        let skip = self.skip_special && tokenizer.is_special(token) && !self.keep.contains(&token);
        if !skip {
            // Ids come from the model's vocabulary; a byte-less id adds no text.
            let text = self.decoder.push(tokenizer, token).unwrap_or_default();
            self.pending.push_str(&text);
        }
        if let Some((at, stop)) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at)
        {
            let stop = stop.clone();
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return (before, Some(stop));
        }
        let hold = self.held_back();
        let ready = self.pending.len() - hold;
        let out = self.pending[..ready].to_string();
        self.pending.drain(..ready);
        (out, None)
    }

    /// The rest of the text when the sequence ends without a stop string.
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.pending);
        out.push_str(&self.decoder.finish());
        out
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > hold && self.pending.ends_with(&stop[..i]) {
                    hold = i;
                }
            }
        }
        hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_cut_and_partial_matches_held() {
        let tok = crate::tokenizer::Tokenizer::from_dir(
            &crate::demo::demo_checkpoint_dir().expect("demo checkpoint"),
        )
        .expect("demo tokenizer");
        let ids = tok.encode("hello world, stop here", crate::tokenizer::Specials::AsText);
        let mut out = TextOutput::new(vec!["stop".into()], true, Vec::new());
        let mut text = String::new();
        let mut stopped = None;
        for &id in &ids {
            let (delta, stop) = out.push(&tok, id);
            text.push_str(&delta);
            if stop.is_some() {
                stopped = stop;
                break;
            }
        }
        assert_eq!(stopped.as_deref(), Some("stop"));
        assert_eq!(text, "hello world, ");
    }
}
