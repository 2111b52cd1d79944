"""Trace capture and store costs on CPU, each against a named peer measured in the same run.

1. forward with routing capture vs plain forward (goal: under 10% overhead), and with full capture;
2. the same routing captured by plain forward hooks on transformers' DeepseekV3ForCausalLM of the same config,
   against that model's own plain forward;
3. TraceStore write throughput vs numpy.save of the same arrays;
4. peak memory of `workbench trace` at 1x and 10x input (goal: flat).
Medians of repeated runs; run with `python benchmarks/bench_trace.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from timing import interleaved_seconds  # benchmarks/timing.py

from workbench.config import ModelConfig
from workbench.loader import load_model
from workbench.model.transformer import DeepSeekModel
from workbench.trace import Trace, TraceStore
from workbench.trace.recorder import Scratch, argmax_and_logsumexp

REPEATS = 7
CAPTURE_REPEATS = 101  # the overhead goal is 10% and the noise of one 41-round median here was +-3%: many rounds
# bench_forward.py's wider config: vocab / hidden = 16 as in the bundled model (V3: 18), twice the hidden size
WIDE = dict(model_type="deepseek_v3", vocab_size=4096, hidden_size=256, intermediate_size=512,
            moe_intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32, n_shared_experts=1,
            num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1, max_position_embeddings=2048,
            topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True)


class TimedTrace(Trace):
    """A Trace that times its own work per forward call: assembling the batch (next-token statistics, stacks, host
    copies), the part a trace adds after the model has run. The end-to-end ratios above carry the machine's +-4%
    noise; this share of the same run's plain forward does not."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seconds: list[float] = []

    def _assemble(self, *args: object) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = super()._assemble(*args)  # type: ignore[arg-type]
        self.seconds.append(time.perf_counter() - t0)
        return out


def bench_capture(ids: torch.Tensor) -> None:
    loaded = load_model()
    plain, t_routing, t_full, t_stats, own = capture_times(loaded.model, ids, loaded.tokenizer)
    n = ids.numel()
    print(f"workbench default model, batch {tuple(ids.shape)} ({n} tokens), median of {CAPTURE_REPEATS}, "
          "interleaved in shuffled order:")
    print_capture(plain, t_routing, t_full, t_stats, own)
    bench_transformers_hooks(loaded.model.config, ids, plain, t_routing)
    # The capture's fixed cost is the next-token statistics over [tokens x vocab] logits; the bundled model's
    # head is large next to its body (vocab 2048, hidden 128), so show the same on a wider config too.
    wide = DeepSeekModel.random(ModelConfig.from_hf_dict(WIDE), seed=0)
    wide_times = capture_times(wide, torch.randint(0, WIDE["vocab_size"], ids.shape), None)
    print(f"wider random config (hidden {WIDE['hidden_size']}, {WIDE['n_routed_experts']} experts, vocab "
          f"{WIDE['vocab_size']}), same batch:")
    print_capture(*wide_times)


def print_capture(plain: float, routing: float, full: float, stats: float, own: tuple[float, float]) -> None:
    print(f"  plain forward            {plain * 1e3:8.1f} ms")
    print(f"  + routing capture        {routing * 1e3:8.1f} ms  overhead x{routing / plain:.3f}")
    print(f"  + full capture (all)     {full * 1e3:8.1f} ms  overhead x{full / plain:.3f}")
    print(f"  + next-token statistics alone (argmax + logsumexp over the logits, in every trace) "
          f"{stats * 1e3:.1f} ms  x{stats / plain:.3f}")
    print(f"  the recorder's own work per call (median, timed inside the trace): routing {own[0] * 1e3:.2f} ms "
          f"(x{1 + own[0] / plain:.3f} of the plain forward), all {own[1] * 1e3:.2f} ms (x{1 + own[1] / plain:.3f})")


def capture_times(model: DeepSeekModel, ids: torch.Tensor,
                  tokenizer: object) -> tuple[float, float, float, float, tuple[float, float]]:
    """Medians of: plain forward, forward + routing capture (expert ids and weights, plus the next-token
    statistics every trace records), forward + every traceable site, and forward + the next-token statistics'
    argmax and logsumexp alone (the share of the overhead that grows with the vocabulary); then the two traces'
    own assembling time per call (`TimedTrace`)."""
    routing = TimedTrace(model, ["expert_ids", "expert_weights"], keep=False)
    full = TimedTrace(model, ["all"], tokenizer=tokenizer, keep=False)

    def run_with(t: Trace) -> None:
        with t:
            t.forward(ids)

    scratch = Scratch()

    def forward_and_statistics() -> None:  # the part of every trace that does not depend on `sites`
        argmax_and_logsumexp(model(ids), scratch)

    with torch.inference_mode():
        plain, t_routing, t_full, t_stats = interleaved_seconds(
            [lambda: model(ids), lambda: run_with(routing), lambda: run_with(full), forward_and_statistics],
            repeats=CAPTURE_REPEATS)
    own = (statistics.median(routing.seconds), statistics.median(full.seconds))
    return plain, t_routing, t_full, t_stats, own


def bench_transformers_hooks(config: object, ids: torch.Tensor, ours_plain: float, ours_routing: float) -> None:
    """Peer: routing captured with forward hooks on each MoE layer's router (`mlp.gate`, whose output holds the
    expert ids and weights) of transformers' model of the same config (DeepseekV3/V4ForCausalLM)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dict = dict(config.to_hf_dict())  # type: ignore[attr-defined]
    hf_config = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    hf = AutoModelForCausalLM.from_config(hf_config).eval()
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gates = [(f"layers.{i}.mlp.gate", layer.mlp.gate) for i, layer in enumerate(hf.model.layers)
             if hasattr(layer.mlp, "gate")]

    def hook(name: str) -> Callable[..., None]:
        def keep(module: torch.nn.Module, args: tuple[object, ...], out: tuple[torch.Tensor, ...]) -> None:
            captured[name] = (out[2].to(torch.int16).cpu(), out[1].float().cpu())  # ids [T, k], weights [T, k]
        return keep

    def hooked() -> None:
        handles = [m.register_forward_hook(hook(n)) for n, m in gates]
        try:
            hf(ids)
        finally:
            for h in handles:
                h.remove()

    with torch.inference_mode():
        hf_plain, hf_hooks = interleaved_seconds([lambda: hf(ids), hooked], repeats=2 * REPEATS)
    print(f"transformers {__import__('transformers').__version__} {type(hf).__name__}, same config:")
    print(f"  plain forward            {hf_plain * 1e3:8.1f} ms  (ours / theirs x{ours_plain / hf_plain:.2f})")
    print(f"  + routing forward hooks  {hf_hooks * 1e3:8.1f} ms  overhead x{hf_hooks / hf_plain:.3f} "
          f"(ours x{ours_routing / ours_plain:.3f}), {len(captured)} gates captured")


def bench_store(ids: torch.Tensor, copies: int = 32) -> None:
    """A store of `copies` batches (create, append, close) vs numpy.save of the same arrays, one file per array
    per batch (what a hand-rolled tracer does); interleaved, so machine load hits them alike. Creating a store
    (array metadata, the vocabulary table) is a fixed cost a long trace pays once, so it is timed on its own and
    the throughput is given with and without it."""
    loaded = load_model()
    t = Trace(loaded.model, ["all"], tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    with t, torch.inference_mode():
        batch = t.forward(ids)
    stored = t.layout.stored_names()  # schema 1.1: text lives once in vocab_text, not per token
    nbytes = sum(batch[k].nbytes for k in stored)
    with tempfile.TemporaryDirectory() as d:
        def create() -> TraceStore:
            return TraceStore.create(Path(d) / f"s{time.perf_counter_ns()}.zarr", t.attrs(), t.layout,
                                     chunk_tokens=4096, vocab=t.vocab())

        def fill(store: TraceStore, flush_tokens: int | None) -> None:
            if flush_tokens is not None:
                store.flush_tokens = flush_tokens
            for _ in range(copies):
                store.append(batch, windows=ids.shape[0])
            store.close()

        def to_store(flush_tokens: int | None) -> Callable[[], None]:
            def run() -> None:
                fill(create(), flush_tokens)
            return run

        def to_npy() -> None:
            out = Path(d) / f"n{time.perf_counter_ns()}"
            out.mkdir()
            for i in range(copies):
                for k in stored:
                    np.save(out / f"{k}.{i}.npy", batch[k])

        s_store, s_every, s_npy, s_create = interleaved_seconds(
            [to_store(None), to_store(1), to_npy, create], repeats=7)
    mb = nbytes * copies / 2**20
    n = len(batch["token_id"])
    print(f"store writes, full capture, {copies} batches of {n} tokens ({mb:.1f} MiB), median of 7, interleaved:")
    print(f"  numpy.save (raw .npy)        {mb / s_npy:8.1f} MiB/s  {s_npy * 1e3:7.1f} ms")
    print(f"  TraceStore, chunk flushes    {mb / s_store:8.1f} MiB/s  {s_store * 1e3:7.1f} ms  "
          f"(store / npy x{s_npy / s_store:.2f})")
    print(f"    of which creating the store  {s_create * 1e3:7.1f} ms once; appends + close "
          f"{mb / (s_store - s_create):7.1f} MiB/s (x{s_npy / (s_store - s_create):.2f})")
    print(f"  TraceStore, flush per batch  {mb / s_every:8.1f} MiB/s  {s_every * 1e3:7.1f} ms  "
          f"(store / npy x{s_npy / s_every:.2f})")


_PEAK = """
import resource, sys
from workbench.cli import main
rc = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)
"""


def bench_memory(base_records: int = 60) -> None:
    words = "the expert routes a token to latent space while loss falls and weights scale".split()  # noqa: SIM905
    rng = random.Random(0)
    peaks = {}
    with tempfile.TemporaryDirectory() as d:
        for scale in (1, 10):
            src = Path(d) / f"in{scale}.jsonl"
            with src.open("w") as f:
                for _ in range(base_records * scale):
                    f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n")
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _PEAK, "trace", "--input", str(src), "--out",
                                  str(Path(d) / f"o{scale}.zarr"), "--batch-tokens", "1024", "--max-seq-len", "128",
                                  "--no-progress"], capture_output=True, text=True, check=True)
            rss_kib, rc = out.stdout.split()[-2:]
            tokens = int(out.stdout.split("traced ")[1].split()[0])
            peaks[scale] = int(rss_kib) / 1024
            print(f"  {scale:2d}x input: {tokens:6d} tokens, peak RSS {peaks[scale]:7.1f} MiB, "
                  f"{time.perf_counter() - t0:5.1f} s wall (rc {rc})")
    print(f"  peak memory 10x / 1x: x{peaks[10] / peaks[1]:.3f}")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids = torch.randint(2, 258, (4, 256))
    bench_capture(ids)
    bench_store(ids)
    print("`workbench trace` peak memory (each run in a fresh process):")
    bench_memory()


if __name__ == "__main__":
    main()
