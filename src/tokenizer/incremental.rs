//! Streaming detokenization: turn generated ids into text deltas that never split a UTF-8
//! sequence. Bytes are held only while they may still complete a character; bytes that can
//! never become valid are replaced by U+FFFD exactly as a one-shot lossy decode would, so
//! the concatenated deltas always equal `String::from_utf8_lossy` of all the bytes.

use super::{Tokenizer, TokenizerError};

#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        let bytes = tokenizer.token_bytes(id)?;
        Ok(self.push_bytes(&bytes))
    }

    /// Adds raw bytes; returns the text that is now complete.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: from_utf8 just validated this prefix.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never be valid: one U+FFFD each maximal invalid run,
                        // as from_utf8_lossy does.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Flushes what is left at the end of generation (an incomplete sequence becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(chunks: &[&[u8]]) -> String {
        let mut d = IncrementalDecoder::new();
        let mut out = String::new();
        for c in chunks {
            out.push_str(&d.push_bytes(c));
        }
        out + &d.finish()
    }

    #[test]
    fn split_multibyte_characters_are_held_back() {
        let euro = "€".as_bytes(); // 3 bytes
        let mut d = IncrementalDecoder::new();
        assert_eq!(d.push_bytes(&euro[..1]), "");
        assert_eq!(d.push_bytes(&euro[1..2]), "");
        assert_eq!(d.push_bytes(&euro[2..]), "€");
    }

    #[test]
    fn every_split_of_every_byte_string_matches_lossy_decode() {
        let samples: Vec<Vec<u8>> = vec![
            "héllo wörld 你好 🎉".as_bytes().to_vec(),
            vec![0xf0, 0x9f, 0x8e, 0x41, 0xe2, 0x82, 0xac, 0xff, 0xc3],
            vec![0xed, 0xa0, 0x80, 0x41],
            vec![0xe2, 0x82],
        ];
        for s in samples {
            let expected = String::from_utf8_lossy(&s).into_owned();
            // All ways to cut into up to three pieces.
            for i in 0..=s.len() {
                for j in i..=s.len() {
                    let got = stream(&[&s[..i], &s[i..j], &s[j..]]);
                    assert_eq!(got, expected, "cuts {i},{j} of {s:?}");
                }
            }
            let bytewise: Vec<&[u8]> = s.chunks(1).collect();
            assert_eq!(stream(&bytewise), expected);
        }
    }
}
