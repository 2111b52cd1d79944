"""Prefill and decode speed of our model vs transformers' DeepseekV3/V32/V4ForCausalLM on the same checkpoint, same run.

Usage: python benchmarks/bench_forward.py [--repeats 7] [--families v3 v32 v4] [--profile]
Prints medians and the ratio (ours / transformers throughput; > 1 means faster) per family, then each fast path
against its reference on the default model's shapes (routed experts: sorted per-expert vs padded bmm; attention:
padded-width SDPA vs softmax(q k^T) v), then KV bytes per token for the V2-Lite / V3 shapes against the published
figure (V3: 576 elements per layer) and for V3.2 / V4 at 1M tokens (published: V4-Pro 10%, V4-Flash 7% of V3.2).
Every family is timed interleaved (`timing.interleaved_seconds`): both models alternate within every round.
`--profile` prints instead where a V3 and a V4 decode step's time goes in each model (wall ms per step, then the top-level
aten ops per step by kind and their share of the torch profiler's CPU time).
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
# V3.2: the same shapes plus the lightning indexer; index_topk below the prefill length, so attention is sparse
V32_CONFIG = dict(CONFIG, index_n_heads=16, index_head_dim=32, index_topk=128)
# V4 at a similar size: one layer of each kind (window only, CSA at rate 4, HCA at rate 16), one hash-routed layer
_SLIDING, _CSA, _HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
V4_CONFIG = dict(vocab_size=4096, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4,
                 layer_types=[_SLIDING, _CSA, _HCA, _CSA], compress_rates={_CSA: 4, _HCA: 16},
                 mlp_layer_types=["hash_moe", "moe", "moe", "moe"], num_attention_heads=8, head_dim=64,
                 qk_rope_head_dim=16, q_lora_rank=96, o_groups=2, o_lora_rank=64, n_routed_experts=32,
                 num_experts_per_tok=4, index_n_heads=16, index_head_dim=32, index_topk=32, sliding_window=64,
                 hc_mult=4, max_position_embeddings=2048)




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


def _build_hf(family: str) -> torch.nn.Module:
    """transformers' model of a family at the benchmark size (its init; V4's tid2eid random distinct experts, since
    transformers leaves it all zeros and every hash-routed token would pick expert 0)."""
    import transformers

    torch.manual_seed(0)
    if family == "v32":
        cfg = transformers.DeepseekV32Config(**V32_CONFIG)
        cfg._attn_implementation = "sdpa"
        return transformers.DeepseekV32ForCausalLM(cfg).eval()
    cfg = transformers.DeepseekV4Config(**V4_CONFIG)
    cfg._attn_implementation = "eager"  # transformers' V4 has no other attention backend
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    E, k = V4_CONFIG["n_routed_experts"], V4_CONFIG["num_experts_per_tok"]
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                buf.copy_(torch.rand(buf.shape[0], E, generator=g).argsort(dim=-1)[:, :k])
    return model


def bench_family(family: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(row, transformers tokens/s, ours tokens/s) for prefill and decode; both models on the same checkpoint,
    timed round-robin. Also checks that both compute the same logits before timing them."""
    from timing import interleaved_seconds

    from workbench.checkpoint import load_checkpoint

    hf = _build_hf(family)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_checkpoint(Path(d))
    vocab = V32_CONFIG["vocab_size"] if family == "v32" else V4_CONFIG["vocab_size"]
    ids = torch.randint(0, vocab, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    rows = []
    with torch.inference_mode():
        gap = (hf(ids[:, :128]).logits - ours(ids[:, :128])).abs().max().item()
        assert gap < 1e-3, f"{family}: our logits differ from transformers' by {gap}"
        # our prefill path per family: V4's "fast" (model mode "absorb": gathers the selected keys; tested equal to the
        # per-formula "naive" path), V3.2's "naive" (its absorb path is no faster at prefill)
        mode = "absorb" if family == "v4" else "naive"
        t_hf, t_ours = interleaved_seconds([lambda: hf(ids, use_cache=False), lambda: ours(ids, mode=mode)],
                                           args.repeats)
        rows.append((f"{family} prefill tokens/s", args.prefill / t_hf, args.prefill / t_ours))
        prompt = ids[:, :64]
        gen_kw = dict(max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False,
                      attention_mask=torch.ones_like(prompt))
        t_hf, t_ours = interleaved_seconds([lambda: hf.generate(prompt, **gen_kw),
                                            lambda: ours.generate(prompt, args.decode)], max(3, args.repeats // 2))
        rows.append((f"{family} decode tokens/s (64-token prompt)", args.decode / t_hf, args.decode / t_ours))
    return rows


def print_v32_v4_costs() -> None:
    from workbench.config import PRESETS
    from workbench.model.costs import estimate_flops, kv_bytes_per_token

    context = 2**20
    v32 = kv_bytes_per_token(PRESETS["deepseek-v3.2"], context=context)
    f32 = estimate_flops(PRESETS["deepseek-v3.2"], context)["total"]
    print(f"\nat {context:,} tokens: KV bytes per token (bf16 / released formats) and single-token FLOPs vs V3.2")
    for preset in ("deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro"):
        kv = kv_bytes_per_token(PRESETS[preset], context=context)
        f = estimate_flops(PRESETS[preset], context)["total"]
        print(f"  {preset:18s} {kv['total']:9.1f} B / {kv['stored']:8.1f} B  ({kv['stored'] / v32['stored']:6.1%} of "
              f"V3.2)  {kv['total'] * context / 2**30:6.2f} GiB/sequence bf16  {f / 1e9:7.1f} GFLOP "
              f"({f / f32:6.1%})")


def _build_v3() -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' DeepseekV3ForCausalLM at the benchmark size and ours loaded from its checkpoint."""
    import transformers

    from workbench.checkpoint import load_checkpoint

    torch.manual_seed(0)
    hf_cfg = transformers.DeepseekV3Config(**CONFIG)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_checkpoint(Path(d))
    return hf, ours


def bench_v3(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """The V3 comparison, both models interleaved within every round (as V3.2 and V4 below)."""
    from timing import interleaved_seconds

    hf, ours = _build_v3()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, args.prefill), generator=torch.Generator().manual_seed(1))
    rows = []
    with torch.inference_mode():
        gap = (hf(ids[:, :128]).logits - ours(ids[:, :128])).abs().max().item()
        assert gap < 1e-3, f"v3: our logits differ from transformers' by {gap}"
        t_hf, t_ours = interleaved_seconds([lambda: hf(ids, use_cache=False), lambda: ours(ids)], args.repeats)
        rows.append(("v3 prefill tokens/s", args.prefill / t_hf, args.prefill / t_ours))
        prompt = ids[:, :64]
        gen_kw = dict(max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False,
                      attention_mask=torch.ones_like(prompt))
        t_hf, t_ours = interleaved_seconds([lambda: hf.generate(prompt, **gen_kw),
                                            lambda: ours.generate(prompt, args.decode)], max(3, args.repeats // 2))
        rows.append(("v3 decode tokens/s (64-token prompt)", args.decode / t_hf, args.decode / t_ours))
    return rows


# top-level aten ops of a decode step, by what they do (the profile table)
_OP_KINDS = {
    "linear layers (and RoPE's matmul)": ("aten::linear", "aten::mm", "aten::addmm", "aten::matmul"),
    "attention matmuls and softmax": ("aten::bmm", "aten::baddbmm", "aten::einsum", "aten::softmax",
                                      "aten::_softmax", "aten::scaled_dot_product_attention"),
    "routing (sort, top-k, gather, masks)": ("aten::sort", "aten::topk", "aten::gather", "aten::scatter_",
                                             "aten::masked_fill", "aten::sigmoid", "aten::zeros", "aten::bitwise_not",
                                             "aten::argsort", "aten::scatter"),
    "elementwise and norms": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::pow", "aten::rsqrt",
                              "aten::mean", "aten::silu", "aten::sum", "aten::rms_norm", "aten::cos", "aten::sin",
                              "aten::neg", "aten::add_", "aten::mul_", "aten::where", "aten::cumsum"),
}


def profile_decode(family: str = "v3", steps: int = 24) -> None:
    """Where a decode step's time goes, ours vs transformers (`family` v3 or v4): wall ms per step (no profiler),
    then under the torch profiler the top-level aten ops per step and their share of the profiled time, by kind."""
    import collections
    import time

    from torch.profiler import profile
    from transformers import DynamicCache

    if family == "v3":
        hf, ours = _build_v3()
    else:
        from workbench.checkpoint import load_checkpoint

        hf = _build_hf(family)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = load_checkpoint(Path(d))
    vocab = CONFIG["vocab_size"] if family == "v3" else V4_CONFIG["vocab_size"]
    ids = torch.randint(0, vocab, (1, 64 + steps), generator=torch.Generator().manual_seed(5))

    def ours_prefill() -> object:
        cache = ours.new_cache(1, 64 + steps)
        ours(ids[:, :64], cache=cache, mode="absorb")
        return cache

    def ours_steps(cache: object) -> None:
        for i in range(64, 64 + steps):
            ours(ids[:, i : i + 1], cache=cache, mode="absorb")

    def hf_prefill() -> object:
        cache = DynamicCache(config=hf.config)
        hf(ids[:, :64], cache=cache, use_cache=True)
        return cache

    def hf_steps(cache: object) -> None:
        for i in range(64, 64 + steps):
            hf(ids[:, i : i + 1], cache=cache, use_cache=True)

    runs = {"transformers": (hf_prefill, hf_steps), "workbench": (ours_prefill, ours_steps)}
    walls: dict[str, list[float]] = {name: [] for name in runs}
    table: dict[str, dict[str, tuple[float, float]]] = {}
    with torch.inference_mode():
        for _ in range(7):
            for name, (prefill, run) in runs.items():
                cache = prefill()
                t0 = time.perf_counter()
                run(cache)
                walls[name].append((time.perf_counter() - t0) / steps)
        for name, (prefill, run) in runs.items():
            cache = prefill()
            with profile() as prof:
                run(cache)
            top = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
            total = sum(e.cpu_time_total for e in top)
            kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
            for e in top:
                kind = next((k for k, names in _OP_KINDS.items() if e.name in names), "views, copies, other")
                kinds[kind][0] += 1 / steps
                kinds[kind][1] += e.cpu_time_total / total
            table[name] = {k: (n, share) for k, (n, share) in kinds.items()}
            table[name]["all"] = (len(top) / steps, 1.0)
    hf_ms, ours_ms = (sorted(walls[n])[3] * 1e3 for n in ("transformers", "workbench"))
    print(f"\ndecode step, {family} bench config, T = 64..{64 + steps}: transformers {hf_ms:.2f} ms, workbench {ours_ms:.2f} ms "
          f"(x{hf_ms / ours_ms:.2f}); top-level aten ops per step and share of profiled CPU time:")
    kinds_order = [*_OP_KINDS, "views, copies, other", "all"]
    print(f"  {'':40s}{'transformers':>22s}{'workbench':>22s}")
    for kind in kinds_order:
        cells = [table[n].get(kind, (0.0, 0.0)) for n in ("transformers", "workbench")]
        print(f"  {kind:40s}" + "".join(f"{n:12.0f} ops {share:5.0%}" for n, share in cells))


def main() -> None:
    import transformers

    from workbench.config import PRESETS
    from workbench.model.costs import kv_bytes_per_token

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--families", nargs="+", default=["v3", "v32", "v4"], choices=["v3", "v32", "v4"])
    parser.add_argument("--profile", action="store_true", help="only the decode-step profile tables (V3, V4 configs)")
    args = parser.parse_args()
    if args.profile:
        for family in args.families:
            if family != "v32":
                profile_decode(family)
        return
    rows = []
    for family in args.families:
        rows += bench_v3(args) if family == "v3" else bench_family(family, args)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':40s}{'transformers':>14s}{'workbench':>12s}{'ratio':>8s}")
    for name, theirs, mine in rows:
        print(f"{name:40s}{theirs:14.1f}{mine:12.1f}{mine / theirs:8.2f}")
    bench_paths(args.repeats)
    print("\nKV cache per token, bf16 (elements per layer: MLA = kv_lora_rank + qk_rope_head_dim)")
    for preset in ("deepseek-v2-lite", "deepseek-v3"):
        kv = kv_bytes_per_token(PRESETS[preset], dtype_bytes=2)
        print(f"  {preset:18s} MLA {kv['mla'] / 1024:7.1f} KiB ({kv['mla_elements_per_layer']:.0f}/layer)  "
              f"MHA {kv['mha'] / 1024:8.1f} KiB  GQA-{kv['gqa_groups']:.0f} {kv['gqa'] / 1024:7.1f} KiB  "
              f"MHA/MLA {kv['mha'] / kv['mla']:.1f}x")
    assert kv_bytes_per_token(PRESETS["deepseek-v3"])["mla_elements_per_layer"] == 576  # published V3 figure
    print_v32_v4_costs()


if __name__ == "__main__":
    main()
