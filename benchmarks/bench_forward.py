"""Prefill and decode speed of our model vs transformers' DeepseekV3ForCausalLM on the same checkpoint, same run.

Usage: python benchmarks/bench_forward.py [--repeats 7]
Prints medians and the ratio (ours / transformers throughput; > 1 means faster), then each fast path against its
reference on the default model's shapes (routed experts: sorted per-expert vs padded bmm; attention: padded-width
SDPA vs softmax(q k^T) v), then KV bytes per token for the V2-Lite / V3 shapes against the published figure
(V3: 576 elements per layer).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import median_seconds  # benchmarks/timing.py

# tiny-but-not-trivial: V3-style routing at a size where a CPU forward takes milliseconds, not microseconds
CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32, n_shared_experts=1,
              num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
              qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1, max_position_embeddings=2048)




def bench_paths(repeats: int) -> None:
    """Fast path vs reference path (medians of each) on the bundled model's shapes (4 x 256 tokens)."""
    from workbench.model.attention import attend
    from workbench.model.experts import experts_forward

    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 1024, 128, 64, 16, 4
    x = torch.randn(T, H, generator=g)
    w = [torch.randn(E, I, H, generator=g) * 0.1, torch.randn(E, I, H, generator=g) * 0.1,
         torch.randn(E, H, I, generator=g) * 0.1]
    skew = torch.tensor([4.0, 2.0, 1.0] + [0.5] * (E - 3))  # trained routers are unbalanced
    ids = torch.stack([torch.multinomial(skew, k, generator=g) for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    q, kk = torch.randn(4, 256, 4, 48, generator=g), torch.randn(4, 256, 4, 48, generator=g)
    v = torch.randn(4, 256, 4, 32, generator=g)
    pairs = [("routed experts: sorted vs padded",
              lambda: experts_forward(x, ids, weights, *w, path="sorted"),
              lambda: experts_forward(x, ids, weights, *w, path="padded")),
             ("attention: fused SDPA vs reference",
              lambda: attend(q, kk, v, None, 0.1), lambda: attend(q, kk, v, None, 0.1, fused=False))]
    print("\nfast path vs reference (default model shapes), median ms:")
    with torch.inference_mode():
        for name, fast, ref in pairs:
            t_fast = median_seconds(fast, 3 * repeats)
            t_ref = median_seconds(ref, 3 * repeats)
            print(f"  {name:36s}{t_fast * 1e3:8.2f}{t_ref * 1e3:8.2f}  x{t_ref / t_fast:.2f} faster")


def main() -> None:
    import transformers

    from workbench.checkpoint import load_checkpoint
    from workbench.config import PRESETS
    from workbench.model.costs import kv_bytes_per_token

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    hf_cfg = transformers.DeepseekV3Config(**CONFIG)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_checkpoint(Path(d))
    ids = torch.randint(0, CONFIG["vocab_size"], (1, args.prefill))
    rows = []
    with torch.inference_mode():
        t_hf = median_seconds(lambda: hf(ids, use_cache=False), args.repeats)
        t_ours = median_seconds(lambda: ours(ids), args.repeats)
        rows.append(("prefill tokens/s", args.prefill / t_hf, args.prefill / t_ours))
        prompt = ids[:, :64]
        mask = torch.ones_like(prompt)
        gen_kw = dict(max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False, attention_mask=mask)
        t_hf = median_seconds(lambda: hf.generate(prompt, **gen_kw), max(3, args.repeats // 2))
        t_ours = median_seconds(lambda: ours.generate(prompt, args.decode), max(3, args.repeats // 2))
        rows.append(("decode tokens/s (64-token prompt)", args.decode / t_hf, args.decode / t_ours))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':36s}{'transformers':>14s}{'workbench':>12s}{'ratio':>8s}")
    for name, theirs, mine in rows:
        print(f"{name:36s}{theirs:14.1f}{mine:12.1f}{mine / theirs:8.2f}")
    bench_paths(args.repeats)
    print("\nKV cache per token, bf16 (elements per layer: MLA = kv_lora_rank + qk_rope_head_dim)")
    for preset in ("deepseek-v2-lite", "deepseek-v3"):
        kv = kv_bytes_per_token(PRESETS[preset], dtype_bytes=2)
        print(f"  {preset:18s} MLA {kv['mla'] / 1024:7.1f} KiB ({kv['mla_elements_per_layer']:.0f}/layer)  "
              f"MHA {kv['mha'] / 1024:8.1f} KiB  GQA-{kv['gqa_groups']:.0f} {kv['gqa'] / 1024:7.1f} KiB  "
              f"MHA/MLA {kv['mha'] / kv['mla']:.1f}x")
    assert kv_bytes_per_token(PRESETS["deepseek-v3"])["mla_elements_per_layer"] == 576  # published V3 figure


if __name__ == "__main__":
    main()
