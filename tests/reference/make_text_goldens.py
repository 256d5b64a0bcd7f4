#!/usr/bin/env python3
"""Goldens for the text side: tokenizer ids from the `tiktoken` package and chat prompts
rendered by transformers' own jinja2 chat-template renderer.

Writes
  tests/fixtures/tokenizer-kimi/   tiktoken.model (first 16384 o200k ranks), tokenizer_config.json,
                                   golden.json (ids for every sample, both special-token modes)
  tests/fixtures/templates/golden.json   rendered prompts for every template x conversation x flags

Regenerate with:  cargo fetch && python3 tests/reference/make_text_goldens.py
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kimi_tokenizer as kt  # noqa: E402
import jinja2  # noqa: E402
import jinja2.ext  # noqa: E402
import jinja2.sandbox  # noqa: E402
from transformers.utils import chat_template_utils as ctu  # noqa: E402
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
RANKS = 16384

SAMPLES = [
    "Hello, world! This is a test.",
    "I'm sure they'll say it's what we've done; you'd know, I'd've guessed. DON'T SHOUT, We'RE here.",
    "def fib(n):\r\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\r\n\r\n\tprint(fib(10))  # tabs\tand  spaces",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{:?}\", v); }",
    "汉字测试：我们今天去北京。中文和English混合Text。",
    "日本語のテキスト、カタカナとひらがな。漢字も。",
    "한국어 텍스트입니다. 안녕하세요!",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ❤️",
    "Combining marks: e\u0301 a\u0308 n\u0303 \u0915\u093f\u0928\u094d\u0926\u0940 Zalgo: Z\u0351\u036b\u0343a\u0310l\u0357g\u0351o",
    "Numbers 1234567890 3.14159 1,000,000 and 00042 x2 v1.2.3",
    "   leading spaces, trailing spaces   \n\n\n   multiple\n\n\nnewlines\r\n\r\nCRLF   ",
    "Long whitespace:" + " " * 300 + "end" + "\t" * 50 + "\n" * 20 + "x",
    "Special tokens: <|im_start|> <|im_end|> [BOS] <think>reason</think> <|tool_calls_section_begin|>",
    "<|im_system|>system<|im_middle|>You are Kimi.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย",
    "Mixed-case: camelCaseIdentifier PascalCase snake_case SCREAMING_CASE kebab-case",
    "URLs https://example.com/path?q=1&r=2#frag and emails someone@example.org",
    "Punctuation!!! ??? ... --- *** ((())) [[[]]] {{{}}} <<<>>> ''' \"\"\" ```",
    "\u00a0non-breaking\u2003em-space\u3000ideographic\u200bzero-width\ufeffbom",
    "",
    " ",
    "a",
]

# Long inputs that exercise the 25,000-character run splitting; stored as a hash.
LONG = [
    {"repeat": "a", "count": 100000},
    {"repeat": " ", "count": 30000},
    {"repeat": "ab1 ", "count": 20000},
    {"repeat": "你好", "count": 30000},
    {"repeat": "\n", "count": 26000},
]


def fnv64(ids):
    h = 0xCBF29CE484222325
    for i in ids:
        for b in int(i).to_bytes(4, "little"):
            h ^= b
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def tokenizer_goldens():
    path = os.path.join(FIX, "tokenizer-kimi")
    ranks = kt.write_tokenizer_dir(path, RANKS)
    enc = kt.encoding(ranks)
    out = {"base_vocab": RANKS, "samples": [], "long": []}
    for text in SAMPLES:
        ids = kt.kimi_encode(enc, text, True)
        plain = kt.kimi_encode(enc, text, False)
        assert enc.decode(ids) == text and enc.decode(plain) == text
        out["samples"].append({"text": text, "ids": ids, "ids_plain": plain})
    for spec in LONG:
        text = spec["repeat"] * spec["count"]
        ids = kt.kimi_encode(enc, text, True)
        out["long"].append(dict(spec, len=len(ids), fnv64=fnv64(ids)))
    with open(os.path.join(path, "golden.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"tokenizer: {len(SAMPLES)} samples, {len(LONG)} long inputs")


def hf_tokenizer_goldens():
    """A DeepSeek-style HF tokenizer.json (byte-level BPE with added special tokens),
    trained on the samples by the `tokenizers` package; ids from the same package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = os.path.join(FIX, "tokenizer-hf")
    os.makedirs(path, exist_ok=True)
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLES * 3, trainer=trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": {"content": specials[0]}, "eos_token": {"content": specials[1]},
                   "tokenizer_class": "LlamaTokenizerFast"}, f, ensure_ascii=False, indent=2)
    texts = SAMPLES + ["<｜User｜>hi<｜Assistant｜><think>x</think>y<｜end▁of▁sentence｜>"]
    out = {"samples": []}
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        out["samples"].append({"text": text, "ids": ids})
    with open(os.path.join(path, "golden.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"hf tokenizer: {len(texts)} samples")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city. Units: \"c\" or \"f\".",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"},
                           "units": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Web search",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "top_k": {"type": "integer", "default": 3}}}}}

CONVERSATIONS = {
    "user-only": ([{"role": "user", "content": "Hi there!"}], None),
    "system-user": ([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"}], None),
    "multi-turn": ([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ], None),
    "tools-declared": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER, SEARCH]),
    "tool-call-string-args": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
        {"role": "assistant", "content": "It is 21°C and clear."},
        {"role": "user", "content": "Thanks!"},
    ], [WEATHER]),
    "tool-calls-object-args": ([
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Oslo and news?"},
        {"role": "assistant", "content": "Let me check both.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "units": "c"}}},
            {"id": "b", "type": "function", "function": {"name": "search", "arguments": {"q": "news <today>: \"Oslo\"", "top_k": 2}}}]},
        {"role": "tool", "tool_call_id": "a", "name": "get_weather", "content": "-3 C"},
        {"role": "tool", "tool_call_id": "b", "content": "Headline 1\nHeadline 2"},
    ], [WEATHER, SEARCH]),
    "reasoning": ([
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "content": "No: 91 = 7 x 13.", "reasoning_content": "Check small primes: 7*13=91."},
        {"role": "user", "content": "And 97?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need a tool.", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"is 97 prime\"}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "97 is prime"},
    ], [SEARCH]),
    "content-parts": ([
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "text", "text": " Be precise."}]},
    ], None),
    "unicode-and-markup": ([
        {"role": "system", "content": "Reply in 中文 😀."},
        {"role": "user", "content": "Quote: \"a < b && c > d\"\nNew line\ttab — done."},
    ], None),
    "named-messages": ([
        {"role": "system", "content": "Group chat."},
        {"role": "user", "name": "alice", "content": "Hi bob"},
        {"role": "assistant", "content": "Hi alice"},
    ], None),
    "empty": ([], None),
}

TEMPLATES = {
    "Kimi-K2-Instruct": ("tests/fixtures/templates/Kimi-K2-Instruct.jinja", "[BOS]", "[EOS]", [{}]),
    "Kimi-K2-Thinking": ("tests/fixtures/templates/Kimi-K2-Thinking.jinja", "[BOS]", "[EOS]", [{}]),
    "DeepSeek-V3.1": ("tests/fixtures/templates/deepseek-ai-DeepSeek-V3.1.jinja", "<｜begin▁of▁sentence｜>",
                      "<｜end▁of▁sentence｜>", [{}, {"thinking": True}]),
    "builtin-k2.6": ("src/tokenizer/templates/kimi-k2.6.jinja", "[BOS]", "<|im_end|>", [
        {}, {"thinking": False}, {"thinking": True, "preserve_thinking": True}]),
}


def render_mutable(source, messages, tools, agp, bos, eos, kwargs):
    """transformers' environment, except that lists may be changed: its
    ImmutableSandboxedEnvironment refuses `list.append`, which the published Kimi
    templates call to track tool-call ids. Same filters, globals, options and message
    preprocessing; jinja2's mutable sandbox."""
    reference = ctu._compile_jinja_template(source).environment
    env = jinja2.sandbox.SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = reference.filters["tojson"]
    for name in ("raise_exception", "strftime_now", "dict", "namespace"):
        env.globals[name] = reference.globals[name]
    chat = ctu._alias_reasoning_fields(ctu._plain_template_data(messages))
    return env.from_string(source).render(messages=chat, tools=ctu._plain_template_data(tools),
                                          add_generation_prompt=agp, bos_token=bos, eos_token=eos, **kwargs)


def template_goldens():
    cases = []
    skipped = []
    for tname, (path, bos, eos, kwarg_sets) in TEMPLATES.items():
        with open(os.path.join(ROOT, path)) as f:
            source = f.read()
        for cname, (messages, tools) in CONVERSATIONS.items():
            for agp in (False, True):
                for kwargs in kwarg_sets:
                    renderer = "transformers"
                    try:
                        rendered = render_jinja_template(
                            conversations=[messages], tools=tools, chat_template=source,
                            add_generation_prompt=agp, bos_token=bos, eos_token=eos, **kwargs)[0][0]
                    except jinja2.exceptions.SecurityError:
                        renderer = "jinja2 mutable sandbox"
                        rendered = render_mutable(source, messages, tools, agp, bos, eos, kwargs)
                    except Exception as e:  # the template itself rejects this input
                        skipped.append(f"{tname}/{cname}/agp={agp}/{kwargs}: {type(e).__name__}")
                        continue
                    cases.append({"template": tname, "path": path, "bos_token": bos, "eos_token": eos,
                                  "conversation": cname, "messages": messages, "tools": tools,
                                  "add_generation_prompt": agp, "kwargs": kwargs, "renderer": renderer,
                                  "expected": rendered})
    with open(os.path.join(FIX, "templates", "golden.json"), "w") as f:
        json.dump({"cases": cases, "skipped_in_jinja2": skipped}, f, ensure_ascii=False, indent=1)
    print(f"templates: {len(cases)} rendered cases, {len(skipped)} rejected by the template in jinja2")


if __name__ == "__main__":
    tokenizer_goldens()
    hf_tokenizer_goldens()
    template_goldens()
