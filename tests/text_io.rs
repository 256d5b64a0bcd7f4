//! Text in, text out: the tokenizer against the `tiktoken` package, chat templates against
//! jinja2/transformers, the incremental detokenizer and the kimi_k2 output parser.
//! Goldens come from tests/reference/make_text_goldens.py.

use kimi_hybrid::tokenizer::chat_template::ChatTemplate;
use kimi_hybrid::tokenizer::parser::{OutputParser, ParsedOutput};
use kimi_hybrid::tokenizer::{IncrementalDecoder, Specials, Tokenizer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join(path)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

fn fnv64(ids: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in ids {
        for b in id.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn kimi_tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&root().join("tests/fixtures/tokenizer-kimi")).unwrap()
}

#[test]
fn tokenizer_matches_tiktoken_on_every_sample() {
    let tok = kimi_tokenizer();
    let golden = read_json("tests/fixtures/tokenizer-kimi/golden.json");
    let samples = golden["samples"].as_array().unwrap();
    for s in samples {
        let text = s["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, Specials::Recognise),
            ids(&s["ids"]),
            "special-aware ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, Specials::AsText),
            ids(&s["ids_plain"]),
            "plain ids of {text:?}"
        );
        assert_eq!(tok.decode(&ids(&s["ids"])).unwrap(), text);
        assert_eq!(tok.decode(&ids(&s["ids_plain"])).unwrap(), text);
    }
    let long = golden["long"].as_array().unwrap();
    for l in long {
        let text = l["repeat"]
            .as_str()
            .unwrap()
            .repeat(l["count"].as_u64().unwrap() as usize);
        let got = tok.encode(&text, Specials::Recognise);
        assert_eq!(
            got.len() as u64,
            l["len"].as_u64().unwrap(),
            "length of ids for {:?} x {}",
            l["repeat"],
            l["count"]
        );
        assert_eq!(fnv64(&got), l["fnv64"].as_str().unwrap());
        assert_eq!(tok.decode(&got).unwrap(), text);
    }
    println!(
        "tokenizer: {} samples x 2 modes and {} long inputs identical to tiktoken",
        samples.len(),
        long.len()
    );
}

#[test]
fn special_tokens_and_stop_ids() {
    let tok = kimi_tokenizer();
    let base = 16384;
    assert_eq!(tok.token_id("[BOS]"), Some(base));
    assert_eq!(tok.token_id("<|im_end|>"), Some(base + 2));
    assert_eq!(tok.token_id("</think>"), Some(base + 23));
    assert_eq!(tok.token_id("<|reserved_token_16389|>"), Some(base + 5));
    assert_eq!(
        tok.encode("<|im_end|>", Specials::Recognise),
        vec![base + 2]
    );
    assert!(tok.encode("<|im_end|>", Specials::AsText).len() > 1);
    assert_eq!(tok.bos_id(), Some(base));
    assert_eq!(tok.stop_ids(), &[base + 1, base + 2]);
    assert_eq!(tok.vocab_size(), base as usize + 256);
}

#[test]
fn incremental_decoding_equals_one_shot_decoding() {
    let tok = kimi_tokenizer();
    let golden = read_json("tests/fixtures/tokenizer-kimi/golden.json");
    for s in golden["samples"].as_array().unwrap() {
        for key in ["ids", "ids_plain"] {
            let ids = ids(&s[key]);
            assert_eq!(stream_decode(&tok, &ids), s["text"].as_str().unwrap());
        }
    }
    // Byte-level tokens that split characters: every emitted delta is valid UTF-8 by type,
    // and nothing is lost or repeated.
    let text = "é€😀你";
    let byte_ids: Vec<u32> = text
        .bytes()
        .map(|b| {
            tok.token_id(std::str::from_utf8(&[b]).unwrap_or(""))
                .unwrap_or_else(|| byte_token(&tok, b))
        })
        .collect();
    let streamed = stream_decode(&tok, &byte_ids);
    assert_eq!(streamed, text);
}

/// Decodes `ids` one token at a time with the incremental detokenizer.
fn stream_decode(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut d = IncrementalDecoder::new();
    let mut out: String = ids.iter().map(|&i| d.push(tok, i).unwrap()).collect();
    out.push_str(&d.finish());
    out
}

fn byte_token(tok: &Tokenizer, b: u8) -> u32 {
    (0..16384)
        .find(|&id| tok.token_bytes(id).unwrap() == [b])
        .unwrap()
}

#[test]
fn encoding_one_megabyte_round_trips() {
    let tok = kimi_tokenizer();
    let golden = read_json("tests/fixtures/tokenizer-kimi/golden.json");
    let mut text = String::new();
    let samples: Vec<&str> = golden["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    while text.len() < 1 << 20 {
        for s in &samples {
            text.push_str(s);
        }
    }
    // Timings are printed, not asserted; the checks are that the split into bounded runs
    // loses nothing and that pieces of a concatenation encode as the pieces do.
    let start = std::time::Instant::now();
    let ids = tok.encode(&text, Specials::Recognise);
    let mixed = start.elapsed();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let repeated_text = "x".repeat(1 << 20);
    let start = std::time::Instant::now();
    let repeated_ids = tok.encode(&repeated_text, Specials::Recognise);
    let repeated = start.elapsed();
    assert_eq!(tok.decode(&repeated_ids).unwrap(), repeated_text);
    let runs_of_25k = tok.encode(&"x".repeat(25_000), Specials::Recognise);
    assert_eq!(
        repeated_ids[..runs_of_25k.len()],
        runs_of_25k[..],
        "the first 25,000-character run encodes on its own"
    );
    println!(
        "encode 1 MiB: mixed text {} ids in {mixed:?}; 1 MiB of one repeated character {} ids in {repeated:?}",
        ids.len(),
        repeated_ids.len()
    );
}

#[test]
fn chat_templates_match_jinja2_byte_for_byte() {
    let golden = read_json("tests/fixtures/templates/golden.json");
    let cases = golden["cases"].as_array().unwrap();
    let mut per_template = std::collections::BTreeMap::<String, usize>::new();
    for case in cases {
        let source = std::fs::read_to_string(root().join(case["path"].as_str().unwrap())).unwrap();
        let t = ChatTemplate::new(
            source,
            case["template"].as_str().unwrap(),
            case["bos_token"].as_str().map(str::to_string),
            case["eos_token"].as_str().map(str::to_string),
        )
        .unwrap();
        let tools = case.get("tools").filter(|t| !t.is_null());
        let kwargs = case["kwargs"].as_object().unwrap();
        let got = t.render(
            &case["messages"],
            tools,
            case["add_generation_prompt"].as_bool().unwrap(),
            kwargs,
        );
        let got =
            got.unwrap_or_else(|e| panic!("{} / {}: {e}", case["template"], case["conversation"]));
        assert_eq!(
            got,
            case["expected"].as_str().unwrap(),
            "{} / {} / agp {} / {:?}",
            case["template"],
            case["conversation"],
            case["add_generation_prompt"],
            kwargs
        );
        *per_template
            .entry(case["template"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    println!(
        "chat templates: {} cases identical to jinja2: {per_template:?}",
        cases.len()
    );
}

#[test]
fn checkpoint_template_lookup_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // No template anywhere: the built-in one.
    let t = ChatTemplate::from_dir(tmp.path()).unwrap();
    assert_eq!(t.source_name(), "built-in K2.6 template");
    // chat_template in tokenizer_config.json, as a named list.
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}!"}]}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_dir(tmp.path()).unwrap();
    let msgs: Value = serde_json::json!([{"role": "user", "content": "hi"}]);
    assert_eq!(
        t.render(&msgs, None, false, &Default::default()).unwrap(),
        "hi!"
    );
    // chat_template.jinja wins; a broken one is an error naming the file.
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }",
    )
    .unwrap();
    let e = ChatTemplate::from_dir(tmp.path())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("chat_template.jinja"), "{e}");
}

#[test]
fn tokenizer_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("tiktoken.model") && e.contains("tokenizer.json"),
        "{e}"
    );

    let src = root().join("tests/fixtures/tokenizer-kimi");
    std::fs::copy(
        src.join("tiktoken.model"),
        tmp.path().join("tiktoken.model"),
    )
    .unwrap();
    let e = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer_config.json"), "{e}");

    let mut cfg = read_json("tests/fixtures/tokenizer-kimi/tokenizer_config.json");
    cfg["eos_token"] = "<|no_such_token|>".into();
    std::fs::write(tmp.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let e = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("<|no_such_token|>"),
        "{e}"
    );

    let mut cfg = read_json("tests/fixtures/tokenizer-kimi/tokenizer_config.json");
    cfg["added_tokens_decoder"]["5"] = serde_json::json!({"content": "<|bad|>"});
    std::fs::write(tmp.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let e = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("outside the special range"),
        "{e}"
    );

    // An empty special token would match everywhere (encoding never advances).
    let mut cfg = read_json("tests/fixtures/tokenizer-kimi/tokenizer_config.json");
    let first = cfg["added_tokens_decoder"]
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .expect("the fixture names special tokens");
    cfg["added_tokens_decoder"][&first]["content"] = "".into();
    std::fs::write(tmp.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let e = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains(&format!("[{first}] has an empty")),
        "{e}"
    );

    std::fs::write(
        tmp.path().join("tiktoken.model"),
        "QQ== 0\nnot-base64!! 1\n",
    )
    .unwrap();
    let e = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(e.contains("tiktoken.model") && e.contains("line 2"), "{e}");
}

// ---- output parser ----

const PIECES: &[&str] = &[
    "Hello",
    " world",
    "<think>",
    "</think>",
    "<|tool_calls_section_begin|>",
    "<|tool_call_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "functions.get_weather:0",
    "functions.search:1",
    "<|tool_call_argument_begin|>",
    "{\"city\": \"Paris\"}",
    "{\"q\": \"a<b: c\\nd\"}",
    "<|tool_call_end|>",
    "\n",
    " ",
    "naïve 你好 😀",
    "<",
    "<|",
    ":",
    "plain",
    "<|tool_call_end",
    "</thi",
];

fn well_formed(rng: &mut StdRng) -> String {
    let mut s = String::new();
    if rng.random_bool(0.5) {
        s.push_str("<think>");
    }
    s.push_str("let me think < about: it\n");
    if rng.random_bool(0.7) {
        s.push_str("</think>");
        s.push_str("Answer text ✓. ");
    }
    let section = if rng.random_bool(0.5) {
        "<|tool_calls_section_begin|>"
    } else {
        "<|tool_call_section_begin|>"
    };
    if rng.random_bool(0.7) {
        s.push_str(section);
        for i in 0..rng.random_range(1..4) {
            s.push_str(&format!("<|tool_call_begin|>functions.f{i}:{i}<|tool_call_argument_begin|>{{\"x\": \"{i} <y>: z\\n 你\"}}<|tool_call_end|>"));
        }
        if rng.random_bool(0.8) {
            s.push_str("<|tool_calls_section_end|>");
        }
    }
    s
}

fn stream(text: &str, cuts: &[usize], thinking: bool) -> ParsedOutput {
    let mut p = OutputParser::new(thinking, true);
    let mut out = ParsedOutput::default();
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&text.len())) {
        for e in p.push(&text[last..c]) {
            out.apply(e);
        }
        last = c;
    }
    for e in p.finish() {
        out.apply(e);
    }
    out
}

fn random_cuts(rng: &mut StdRng, text: &str) -> Vec<usize> {
    let boundaries: Vec<usize> = (1..text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    let mut cuts: Vec<usize> = boundaries
        .into_iter()
        .filter(|_| rng.random_bool(0.3))
        .collect();
    cuts.dedup();
    cuts
}

#[test]
fn streaming_parser_equals_non_streaming_for_random_outputs_and_splits() {
    let mut rng = StdRng::seed_from_u64(2026);
    let mut checked = 0;
    for round in 0..3000 {
        let text = if round % 2 == 0 {
            well_formed(&mut rng)
        } else {
            (0..rng.random_range(1..25))
                .map(|_| PIECES[rng.random_range(0..PIECES.len())])
                .collect()
        };
        for thinking in [true, false] {
            let whole = OutputParser::parse(&text, thinking, true);
            // One delta per character, random deltas, and the whole text in one delta.
            let per_char: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .filter(|&i| i > 0)
                .collect();
            for cuts in [per_char, random_cuts(&mut rng, &text), Vec::new()] {
                assert_eq!(
                    stream(&text, &cuts, thinking),
                    whole,
                    "text {text:?} cuts {cuts:?}"
                );
                checked += 1;
            }
            // Nothing is lost: every non-marker character of the input is somewhere in the result.
            let visible: usize = whole.reasoning.len()
                + whole.content.len()
                + whole
                    .tool_calls
                    .iter()
                    .map(|c| c.id.len() + c.arguments.len())
                    .sum::<usize>();
            assert!(
                visible > 0 || text.trim().is_empty() || only_markers(&text),
                "{text:?} lost everything"
            );
        }
    }
    println!("parser: {checked} streamed splittings equal to the one-shot parse");
}

fn only_markers(text: &str) -> bool {
    let mut rest = text.to_string();
    for m in [
        "<think>",
        "</think>",
        "<|tool_calls_section_begin|>",
        "<|tool_call_section_begin|>",
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>",
        "<|tool_call_argument_begin|>",
        "<|tool_call_end|>",
        "<|tool_call_section_end|>",
    ] {
        rest = rest.replace(m, "");
    }
    rest.trim().is_empty()
}

#[test]
fn several_markers_in_one_delta() {
    let mut p = OutputParser::new(true, true);
    let mut out = ParsedOutput::default();
    for e in p.push("why</think>ok<|tool_calls_section_begin|><|tool_call_begin|>functions.a:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_call_begin|>functions.b:1<|tool_call_argument_begin|>[1]<|tool_call_end|><|tool_calls_section_end|>") {
        out.apply(e);
    }
    for e in p.finish() {
        out.apply(e);
    }
    assert_eq!(out.reasoning, "why");
    assert_eq!(out.content, "ok");
    let names: Vec<&str> = out.tool_calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(out.tool_calls[1].arguments, "[1]");
}

#[test]
fn hf_tokenizer_json_matches_the_tokenizers_package() {
    let dir = root().join("tests/fixtures/tokenizer-hf");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let golden = read_json("tests/fixtures/tokenizer-hf/golden.json");
    let samples = golden["samples"].as_array().unwrap();
    for s in samples {
        let text = s["text"].as_str().unwrap();
        let expected = ids(&s["ids"]);
        assert_eq!(tok.encode(text, Specials::Recognise), expected, "{text:?}");
        assert_eq!(tok.decode(&expected).unwrap(), text);
        let streamed = stream_decode(&tok, &expected);
        assert_eq!(streamed, text);
    }
    let eos = tok.token_id("<｜end▁of▁sentence｜>").unwrap();
    assert_eq!(tok.eos_id(), Some(eos));
    assert!(tok.stop_ids().contains(&eos));
    // Untrusted text: special-token text stays ordinary text.
    let plain = tok.encode("<｜User｜>", Specials::AsText);
    assert!(!plain.contains(&tok.token_id("<｜User｜>").unwrap()));
    assert_eq!(tok.decode(&plain).unwrap(), "<｜User｜>");
    println!(
        "hf tokenizer: {} samples identical to the tokenizers package",
        samples.len()
    );
}
