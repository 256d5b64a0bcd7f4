#!/usr/bin/env python3
"""Generate the small golden checkpoints in tests/fixtures/ from independent references.

Each fixture is a checkpoint directory in the exact on-disk layout Moonshot and DeepSeek
publish (config.json, safetensors with the real tensor names, INT4 compressed-tensors
pack-quantized or FP8 128x128 block weights) plus `golden.safetensors`:

  prompt_ids  I64 [T]      the prompt
  logits      F32 [T, V]   logits at every prompt position, computed in f32
  greedy_ids  I64 [G]      greedy continuation (temperature 0)

and, for the fixture with K2's head dimensions, `golden-long.safetensors`: a prompt twice
as long as `original_max_position_embeddings` (YaRN's long-context range):

  prompt_ids  I64 [N]      the prompt (N = 8192)
  logits      F32 [16, V]  logits at its last 16 positions

The maths is transformers' own DeepseekV3ForCausalLM (eager attention, f32). INT4 weights
are quantized and packed by compressed-tensors' PackedQuantizationCompressor and the model
is run on exactly the values that compressor decompresses; FP8 weights are quantized to
torch.float8_e4m3fn in 128x128 blocks and the model runs on the dequantized values. Every
other weight is rounded to bf16 first, so the golden sees exactly what is stored.

Regenerate everything with:  python3 tests/reference/make_fixtures.py
(requirements: tests/reference/requirements.txt). Add --large to also write the
ignored-by-default large fixture to tests/fixtures-large/.
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kimi_tokenizer  # noqa: E402
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures")

PROMPT_LEN = 12
GREEDY_LEN = 8
# Greedy steps whose top-2 logit gap is below this would be decided by float noise.
MIN_MARGIN = 0.02

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    routed_scaling_factor=2.827,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    max_position_embeddings=262144,
    rope_theta=50000.0,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    num_nextn_predict_layers=0,
    initializer_range=0.02,
)


def yarn(factor, beta_fast, beta_slow, orig=4096):
    return {
        "type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": orig,
        "beta_fast": float(beta_fast),
        "beta_slow": float(beta_slow),
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


INT4_QUANT = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": 32,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    ],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}

FP8_QUANT = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}

DEMO_RANKS = 1024

# name -> (text config overrides, options)
FIXTURES = {
    # K2-Instruct style routing and rope (n_group 1, YaRN 32 with beta 1/1), all bf16.
    "kimi-bf16-yarn32": (dict(rope_scaling=yarn(32, 1, 1), rms_norm_eps=1e-6, max_position_embeddings=131072), dict(seed=11)),
    # K2.6 style: YaRN 64 beta 32/1, INT4 pack-quantized routed experts. Bundled demo.
    # Ships a Kimi tokenizer (first 1024 o200k ranks + 256 special ids) so the demo can
    # take text and chat messages.
    "kimi-int4": (
        dict(rope_scaling=yarn(64, 32, 1), quantization_config=INT4_QUANT,
             vocab_size=DEMO_RANKS + 256, bos_token_id=DEMO_RANKS, eos_token_id=DEMO_RANKS + 2),
        dict(seed=12, tokenizer_ranks=DEMO_RANKS),
    ),
    # DeepSeek-V3 style group-limited routing, no q LoRA, no rope scaling, bf16.
    "deepseek-groups": (
        dict(
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            q_lora_rank=None,
            rope_theta=10000.0,
            max_position_embeddings=4096,
        ),
        dict(seed=13),
    ),
    # DeepSeek-V3 / K2-Instruct FP8: every linear layer of the text model except the
    # router and lm_head stored as float8_e4m3fn with 128x128 block scales. Hidden size
    # 160 makes partial blocks at the edges.
    "fp8-block": (
        dict(
            hidden_size=160,
            intermediate_size=288,
            moe_intermediate_size=64,
            kv_lora_rank=160,
            q_lora_rank=136,
            n_group=2,
            topk_group=1,
            rope_scaling=yarn(32, 1, 1),
            max_position_embeddings=131072,
            quantization_config=FP8_QUANT,
        ),
        dict(seed=14),
    ),
    # K2.5/K2.6 wrapper: KimiK25ForConditionalGeneration with text_config, tensors under
    # language_model., vision tensors present, three shards with an index.
    "kimi-k25-wrapper": (
        dict(rope_scaling=yarn(64, 32, 1), quantization_config=INT4_QUANT),
        dict(seed=25, wrapper=True, shards=3, weight_shape_dtype=torch.int32),
    ),
    # The real K2 MLA head dimensions (qk_nope 128, qk_rope 64, v 128, kv_lora 512).
    "kimi-real-heads": (
        dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            q_lora_rank=96,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            rope_scaling=yarn(64, 32, 1),
            quantization_config=INT4_QUANT,
        ),
        dict(seed=16, long_prompt=8192),
    ),
}

# Rows of logits kept from the long prompt (its last positions).
LONG_POSITIONS = 16

LARGE = (
    dict(
        vocab_size=65536,
        hidden_size=2048,
        intermediate_size=4096,
        moe_intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_routed_experts=100,
        num_experts_per_tok=8,
        q_lora_rank=512,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_scaling=yarn(64, 32, 1),
        quantization_config=INT4_QUANT,
    ),
    # Only its logits are compared (the greedy check is for the committed fixtures).
    dict(seed=21, shards=4, check_margin=False),
)


def bf16_round(t):
    return t.to(torch.bfloat16).to(torch.float32)


def init_weights(model, cfg, gen):
    """Weights scaled so every layer contributes and the logits are far from flat."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.data = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            p.data = torch.randn(p.shape, generator=gen)
        elif name.endswith("experts.gate_up_proj"):
            p.data = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
        elif name.endswith("experts.down_proj"):
            p.data = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
        elif name.endswith("lm_head.weight"):
            p.data = 3.0 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
        else:
            p.data = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.data = 0.3 * torch.randn(b.shape, generator=gen)
    for p in model.parameters():
        p.data = bf16_round(p.data)


INT4_SCHEME = QuantizationScheme(
    targets=["Linear"],
    weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
)


def int4_compress(w, shape_dtype):
    """Quantize [out, in] with compressed-tensors; returns stored tensors and the exact dequantized weight."""
    out_f, in_f = w.shape
    groups = w.view(out_f, in_f // 32, 32)
    absmax = groups.abs().amax(dim=-1)
    scale = (absmax / 7.5).to(torch.bfloat16)  # symmetric int4: range 15 over 2, as calculate_qparams
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    stored = PackedQuantizationCompressor.compress(
        {"weight": w.to(torch.bfloat16), "weight_scale": scale}, INT4_SCHEME
    )
    # The stored values are exactly (q - 8) * scale. compressed-tensors' own decompress
    # returns them rounded to the scale dtype (bf16), so the golden takes the unpacked
    # integers from compressed-tensors and multiplies in f32 instead.
    q = unpack_from_int32(stored["weight_packed"], 4, torch.Size([out_f, in_f])).to(torch.float32)
    dequant = q * scale.to(torch.float32).repeat_interleave(32, dim=1)
    back = PackedQuantizationCompressor.decompress(dict(stored), INT4_SCHEME)["weight"].to(torch.float32)
    assert torch.allclose(back, dequant, rtol=1e-2, atol=1e-6), "compressed-tensors round trip disagrees"
    stored = {
        "weight_packed": stored["weight_packed"].contiguous(),
        "weight_scale": stored["weight_scale"].to(torch.bfloat16).contiguous(),
        "weight_shape": stored["weight_shape"].to(shape_dtype),
    }
    return stored, dequant


def fp8_compress(w, block=128):
    out_f, in_f = w.shape
    rb, cb = math.ceil(out_f / block), math.ceil(in_f / block)
    scale_inv = torch.zeros(rb, cb, dtype=torch.float32)
    q = torch.zeros(out_f, in_f, dtype=torch.float8_e4m3fn)
    dequant = torch.zeros(out_f, in_f)
    for i in range(rb):
        for j in range(cb):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            qb = (blk / s).to(torch.float8_e4m3fn)
            scale_inv[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = qb
            dequant[i * block:(i + 1) * block, j * block:(j + 1) * block] = qb.to(torch.float32) * s
    return {"weight": q, "weight_scale_inv": scale_inv}, dequant


def build_state(model, cfg, quant, shape_dtype):
    """Split transformers' fused expert tensors into the published per-expert names,
    quantizing as the checkpoint does, and write the dequantized values back into the model."""
    sd = {}
    inter = cfg["moe_intermediate_size"]
    fp8 = quant is not None and quant["quant_method"] == "fp8"
    int4 = quant is not None and quant["quant_method"] == "compressed-tensors"

    def put_linear(prefix, w, quantize):
        if quantize == "int4":
            stored, deq = int4_compress(w, shape_dtype)
            for k, v in stored.items():
                sd[f"{prefix}.{k}"] = v
            return deq
        if quantize == "fp8":
            stored, deq = fp8_compress(w)
            for k, v in stored.items():
                sd[f"{prefix}.{k}"] = v
            return deq
        sd[f"{prefix}.weight"] = w.to(torch.bfloat16)
        return w

    for name, p in list(model.named_parameters()):
        w = p.data
        if name.endswith("experts.gate_up_proj"):
            base = name[: -len(".gate_up_proj")]
            new = torch.empty_like(w)
            for e in range(w.shape[0]):
                mode = "int4" if int4 else ("fp8" if fp8 else None)
                new[e, :inter] = put_linear(f"{base}.{e}.gate_proj", w[e, :inter].clone(), mode)
                new[e, inter:] = put_linear(f"{base}.{e}.up_proj", w[e, inter:].clone(), mode)
            p.data = new
        elif name.endswith("experts.down_proj"):
            base = name[: -len(".down_proj")]
            new = torch.empty_like(w)
            for e in range(w.shape[0]):
                mode = "int4" if int4 else ("fp8" if fp8 else None)
                new[e] = put_linear(f"{base}.{e}.down_proj", w[e].clone(), mode)
            p.data = new
        elif name.endswith(".weight") and w.dim() == 2 and "embed_tokens" not in name \
                and "lm_head" not in name and not name.endswith("mlp.gate.weight"):
            # Attention, dense MLP and shared-expert linears: FP8 in DeepSeek-style
            # checkpoints, BF16 in the Kimi INT4 ones (their `ignore` list).
            p.data = put_linear(name[: -len(".weight")], w, "fp8" if fp8 else None)
        else:
            sd[name] = w.to(torch.bfloat16)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            sd[name] = b.data.to(torch.float32).contiguous()
    return sd


def golden(model, vocab, gen):
    prompt = torch.randint(3, vocab, (PROMPT_LEN,), generator=gen)
    with torch.no_grad():
        logits = model(prompt[None]).logits[0].to(torch.float32)
        seq = prompt.clone()
        out = []
        min_margin = float("inf")
        for _ in range(GREEDY_LEN):
            last = model(seq[None]).logits[0, -1]
            top2 = torch.topk(last, 2).values
            min_margin = min(min_margin, float(top2[0] - top2[1]))
            nxt = int(torch.argmax(last))
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
    return prompt, logits, torch.tensor(out), min_margin


def write_checkpoint(path, text_cfg, sd, opts):
    os.makedirs(path, exist_ok=True)
    wrapper = opts.get("wrapper", False)
    if wrapper:
        sd = {("language_model." + k): v for k, v in sd.items()}
        # Stand-ins for the MoonViT tower and projector: present on disk, not used by text.
        g = torch.Generator().manual_seed(99)
        sd["vision_tower.patch_embed.proj.weight"] = torch.randn(16, 3, 2, 2, generator=g).to(torch.bfloat16)
        sd["vision_tower.encoder.final_layernorm.weight"] = torch.ones(16, dtype=torch.bfloat16)
        sd["mm_projector.proj.0.weight"] = torch.randn(16, 64, generator=g).to(torch.bfloat16)
        config = {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "model_type": "kimi_k25",
            "media_placeholder_token_id": 163605,
            "text_config": dict(text_cfg, architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2"),
            "vision_config": {"model_type": "moonvit", "patch_size": 14, "hidden_size": 1152,
                              "num_hidden_layers": 27, "num_attention_heads": 16,
                              "intermediate_size": 4304, "merge_kernel_size": [2, 2]},
            "torch_dtype": "bfloat16",
        }
    else:
        config = dict(text_cfg, architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2",
                      torch_dtype="bfloat16")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": text_cfg["bos_token_id"], "eos_token_id": text_cfg["eos_token_id"],
                   "max_length": text_cfg["max_position_embeddings"]}, f, indent=2)

    shards = opts.get("shards", 1)
    names = sorted(sd)
    if shards == 1:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    per = math.ceil(len(names) / shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def transformers_config(text_cfg):
    kwargs = {k: v for k, v in text_cfg.items() if k not in ("quantization_config", "moe_layer_freq")}
    rope = kwargs.pop("rope_scaling", None)
    theta = kwargs.pop("rope_theta")
    params = {"rope_type": "default", "rope_theta": theta}
    if rope is not None:
        params = dict(rope, rope_type="yarn", rope_theta=theta)
        params.pop("type")
    cfg = DeepseekV3Config(rope_parameters=params, **kwargs)
    cfg._attn_implementation = "eager"
    return cfg


def make(name, overrides, opts, out_dir):
    text_cfg = dict(SMALL, **overrides)
    if "rope_scaling" not in text_cfg:
        text_cfg["rope_scaling"] = None
    quant = text_cfg.get("quantization_config")
    gen = torch.Generator().manual_seed(opts["seed"])
    torch.manual_seed(opts["seed"])
    model = DeepseekV3ForCausalLM(transformers_config(text_cfg)).to(torch.float32).eval()
    init_weights(model, text_cfg, gen)
    sd = build_state(model, text_cfg, quant, opts.get("weight_shape_dtype", torch.int64))
    prompt, logits, greedy, margin = golden(model, text_cfg["vocab_size"], gen)
    if margin < MIN_MARGIN and opts.get("check_margin", True):
        sys.exit(f"{name}: greedy top-2 margin {margin:.4f} below {MIN_MARGIN}; pick another seed")
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    write_checkpoint(path, text_cfg, sd, opts)
    if opts.get("tokenizer_ranks"):
        kimi_tokenizer.write_tokenizer_dir(path, opts["tokenizer_ranks"])
    save_file(
        {"prompt_ids": prompt.to(torch.int64), "logits": logits.contiguous(), "greedy_ids": greedy.to(torch.int64)},
        os.path.join(path, "golden.safetensors"),
        metadata={"min_greedy_margin": f"{margin:.6f}", "generator": "transformers DeepseekV3ForCausalLM f32 eager"},
    )
    if opts.get("long_prompt"):
        # Its own generator, so the short golden above stays as it was.
        long_gen = torch.Generator().manual_seed(opts["seed"] + 1000)
        long_prompt = torch.randint(3, text_cfg["vocab_size"], (opts["long_prompt"],), generator=long_gen)
        with torch.no_grad():
            long_logits = model(long_prompt[None]).logits[0, -LONG_POSITIONS:].to(torch.float32)
        save_file(
            {"prompt_ids": long_prompt.to(torch.int64), "logits": long_logits.contiguous()},
            os.path.join(path, "golden-long.safetensors"),
            metadata={"generator": "transformers DeepseekV3ForCausalLM f32 eager",
                      "positions": f"last {LONG_POSITIONS} of {opts['long_prompt']}"},
        )
        print(f"{name}: long prompt of {opts['long_prompt']} tokens, logits std {float(long_logits.std()):.3f}")
    spread = float(logits.std())
    print(f"{name}: logits std {spread:.3f}, min greedy margin {margin:.4f}, greedy {greedy.tolist()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="generate one fixture by name")
    ap.add_argument("--large", action="store_true", help="also write the large fixture (about 1.7 GB)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name, (overrides, opts) in FIXTURES.items():
        if args.only and args.only != name:
            continue
        make(name, overrides, opts, OUT)
    if args.large:
        make("large-int4", LARGE[0], LARGE[1], os.path.join(os.path.dirname(ROOT), "tests", "fixtures-large"))


if __name__ == "__main__":
    main()
