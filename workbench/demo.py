"""Run a prompt through a model and print its routing and KV-cache summary (the README's main job)."""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from workbench.loader import load_model

DEFAULT_PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a preset name, or a checkpoint directory")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--new-tokens", type=int, default=16)


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    ids = torch.tensor([tok.encode(args.prompt)])
    routes: dict[int, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        routes[int(name.split(".")[1])] = value.clone()

    with torch.no_grad(), model.probes.listen(["blocks.*.mlp.hook_expert_indices"], keep):
        logits = model(ids)
    logprobs = logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])
    print(f"model: {loaded.name} ({cfg.architecture}, {loaded.digest})")
    print(f"  {cfg.num_hidden_layers} layers, MoE layers {list(cfg.moe_layers)}, {cfg.n_routed_experts} routed experts "
          f"(top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, {cfg.scoring_func}) + {cfg.n_shared_experts} shared")
    print(f"prompt: {ids.shape[1]} tokens, mean next-token loss {-logprobs.mean().item():.3f} nats")
    print("routing (expert load per MoE layer, share of token-slots; max/mean 1.0 = perfectly balanced):")
    for layer, chosen in sorted(routes.items()):
        counts = Counter(chosen.flatten().tolist())
        loads = [counts.get(e, 0) for e in range(cfg.n_routed_experts)]
        mean = sum(loads) / len(loads)
        top = ", ".join(f"e{e}:{c}" for e, c in counts.most_common(4))
        print(f"  layer {layer}: max/mean {max(loads) / mean:.2f}, unused {loads.count(0)}, busiest {top}")
    kv = model.kv_bytes_per_token(dtype_bytes=2)
    print(f"KV cache per token (bf16): MLA {kv['mla']:.0f} B vs MHA {kv['mha']:.0f} B "
          f"({kv['mha'] / kv['mla']:.1f}x) vs GQA-{kv['gqa_groups']:.0f} {kv['gqa']:.0f} B")
    out = model.generate(ids, args.new_tokens)
    print(f"greedy continuation: {tok.decode(out[0, ids.shape[1]:].tolist())!r}")
    return 0
