"""Kimi tokenizer pieces shared by the fixture generators.

The rank file is a prefix of o200k_base (the copy shipped inside the tiktoken-rs crate:
run `cargo fetch` first), used with Moonshot's pre-tokenizer pattern and special-token
layout; the tokenization logic below follows Moonshot's tokenization_kimi.py.
"""

import base64
import glob
import json
import os

import tiktoken

# Moonshot's pattern, as in tokenization_kimi.py.
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Offsets of Kimi's named special tokens after the base vocabulary (163584 in K2).
KIMI_SPECIALS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    10: "<|im_system|>", 11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>",
    17: "<|im_middle|>", 18: "<|media_begin|>", 19: "<|media_content|>", 20: "<|media_end|>",
    21: "<|media_pad|>", 22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]",
}

TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def o200k_path():
    pattern = os.path.expanduser("~/.cargo/registry/src/*/tiktoken-rs-*/assets/o200k_base.tiktoken")
    found = sorted(glob.glob(pattern))
    if not found:
        raise SystemExit("o200k_base.tiktoken not found; run `cargo fetch` so the tiktoken-rs crate is unpacked")
    return found[-1]


def load_ranks(limit):
    ranks = {}
    with open(o200k_path()) as f:
        for line in f:
            if not line.strip():
                continue
            token, rank = line.split()
            rank = int(rank)
            if rank < limit:
                ranks[base64.b64decode(token)] = rank
    assert len(ranks) == limit, "ranks of o200k are not contiguous"
    assert all(bytes([b]) in ranks for b in range(256)), "a rank prefix must hold every single byte"
    return ranks


def special_names(base):
    return {base + i: KIMI_SPECIALS.get(i, f"<|reserved_token_{base + i}|>") for i in range(256)}


def write_tokenizer_dir(path, limit, eos="<|im_end|>"):
    """tiktoken.model with the first `limit` o200k ranks, and a Kimi tokenizer_config.json."""
    ranks = load_ranks(limit)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tiktoken.model"), "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    decoder = {
        str(limit + i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
        for i, name in KIMI_SPECIALS.items()
    }
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": "[BOS]",
        "eos_token": eos,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "model_max_length": 262144,
        "tokenizer_class": "TikTokenTokenizer",
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return ranks


def encoding(ranks):
    base = len(ranks)
    specials = {name: i for i, name in special_names(base).items()}
    return tiktoken.Encoding(name="kimi-test", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def split_whitespaces_or_nonwhitespaces(s, max_len):
    """tokenization_kimi.py's splitter."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def kimi_encode(enc, text, allow_special):
    ids = []
    for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        for sub in split_whitespaces_or_nonwhitespaces(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
            if allow_special:
                ids.extend(enc.encode(sub, allowed_special="all"))
            else:
                ids.extend(enc.encode(sub, disallowed_special=()))
    return ids
