"""Train the bundled models: small DeepSeek-V4- and V3-style MoEs on the standard library and its documentation.

Design choices:
- Our own `DeepSeekModel` is the model trained, so the bundled checkpoint is by construction the architecture the
  workbench inspects. `arch="v4"` (the default model): sliding-window, CSA and HCA layers with the lightning indexer,
  4 hyper-connection streams (mHC), hash-routed first layers then learned sqrt-softplus routing, clamped SwiGLU.
  `arch="v3"` (`default-v3`): MLA with a latent KV cache, sigmoid gate with group-limited routing (noaux_tc), a
  dense first layer. Both have fine-grained routed experts plus one shared expert.
- A learned router learns through the chosen experts' weights (the unbiased scores of the top-k multiply the
  expert outputs); balance comes from V3's bias update plus a small sequence-wise loss (`balance.py`). A hash layer's
  experts are its fixed random `tid2eid` table (drawn from the seed); only its weights are learned.
- V4's lightning indexer only selects, so the language-model loss cannot train it: it learns from its own KL to
  dense attention's distribution over compressed entries, on a detached input (`indexer_loss.py`, DeepSeek-V3.2's
  recipe), logged as `indexer_kl`.
- A fixed number of steps, one seed for init, batches and tokenizer, `torch.set_num_threads`: the same command gives
  the same losses on the same machine and Python (the corpus is the running interpreter's, see `data.py`).
- The run log (losses, held-out loss, load balance per MoE layer over training) is written as JSON beside the
  checkpoint; `plot.py` draws it.

Shape legend: B batch, S sequence length, V vocab, T = B*S tokens, E routed experts, k experts per token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from workbench.checkpoint import save_checkpoint
from workbench.config import ModelConfig
from workbench.model.moe import MoE
from workbench.model.routing import Gate
from workbench.model.transformer import DeepSeekModel
from workbench.training.balance import expert_load, max_over_mean, sequence_balance_loss, update_bias
from workbench.training.data import Document, corpus_manifest, eval_windows, load_corpus, sample_batch, split_corpus, token_stream
from workbench.training.indexer_loss import IndexerTap, indexer_loss
from workbench.training.tokenizer import train_bpe

RUN_LOG = "run-log.json"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 2048  # BPE vocabulary, special tokens included
    steps: int = 1000
    batch: int = 8  # sequences per step
    seq_len: int = 256  # tokens per training sequence
    lr: float = 3e-3  # peak AdamW learning rate, after `warmup` linear steps, cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup: int = 80
    weight_decay: float = 0.1  # on matrices only (not norms, not the router)
    grad_clip: float = 1.0
    bias_gamma: float = 1e-3  # V3's bias update speed
    balance_alpha: float = 1e-3  # weight of the sequence-wise balance loss (V3 calls it "extremely small")
    log_every: int = 10  # steps per run-log record (loss and load are averaged over them)
    eval_every: int = 50  # steps between held-out evaluations
    eval_windows: int = 16  # held-out windows per evaluation during training
    final_eval_windows: int = 256  # held-out windows for the final figure
    arch: str = "v4"  # "v4" or "v3": the model shape (`MODEL_SHAPES`)
    threads: int = 1  # on a shared 2-core machine one thread ran ~3x faster per step than two (no OpenMP spin-waits)


def v3_model_config(vocab_size: int) -> ModelConfig:
    """`default-v3`'s shape: V3-style and small enough to train on two CPU cores in half an hour."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
        first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )


def v4_model_config(vocab_size: int) -> ModelConfig:
    """The default model's shape: V4-style, one layer of each attention kind and more, small enough to train on two
    CPU cores in half an hour. Layer 0 attends to its 32-token window only; CSA layers (1, 3) compress 4 tokens per
    entry (overlapping windows) and the indexer keeps 16 entries; HCA layers (2, 4) compress 16 tokens per entry and
    attend to all of them; layers 0-1 are hash-routed."""
    return ModelConfig(
        model_type="deepseek_v4", vocab_size=vocab_size, hidden_size=128, moe_intermediate_size=64,
        num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sqrtsoftplus",
        norm_topk_prob=True, routed_scaling_factor=1.5, first_k_dense_replace=0, q_lora_rank=64, qk_rope_head_dim=16,
        head_dim=64, o_groups=2, o_lora_rank=64, sliding_window=32, compress_ratios=(0, 4, 16, 4, 16),
        index_n_heads=4, index_head_dim=32, index_topk=16, hc_mult=4, num_hash_layers=2, swiglu_limit=10.0,
        max_position_embeddings=1024, rope_layout="rope_scaling", tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1,
    )


MODEL_SHAPES = {"v4": v4_model_config, "v3": v3_model_config}


def default_model_config(vocab_size: int, arch: str = "v4") -> ModelConfig:
    """The bundled model's shape for `arch` ("v4": `default`, "v3": `default-v3`)."""
    if arch not in MODEL_SHAPES:
        raise ValueError(f"arch must be one of {sorted(MODEL_SHAPES)}, got {arch!r}")
    return MODEL_SHAPES[arch](vocab_size)


@dataclass
class TrainResult:
    model: DeepSeekModel
    tokenizer: Tokenizer
    log: dict[str, Any]


def _gate(model: DeepSeekModel, layer: int) -> Gate:
    mlp = model.layers[layer].mlp
    if not isinstance(mlp, MoE):
        raise TypeError(f"layer {layer} is dense; it has no router")
    return mlp.gate


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _optimizer(model: DeepSeekModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("mlp.gate.weight")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("mlp.gate.weight"))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


class RoutingTap:
    """Collects each MoE layer's router scores [T, E] (with their graph) and choices [T, k] during one forward."""

    SITES = ("blocks.*.mlp.hook_router_scores", "blocks.*.mlp.hook_expert_indices")

    def __init__(self) -> None:
        self.scores: dict[int, torch.Tensor] = {}
        self.ids: dict[int, torch.Tensor] = {}

    def __call__(self, name: str, value: torch.Tensor) -> None:
        layer = int(name.split(".")[1])
        (self.scores if name.endswith("hook_router_scores") else self.ids)[layer] = value


@torch.no_grad()
def held_out_loss(model: DeepSeekModel, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over held-out windows [W, S+1]."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        chunk = windows[i: i + batch]  # [b, S+1]
        logits = model(chunk[:, :-1])  # [b, S, V]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    return total / count


def train(cfg: TrainConfig, out: Path | None = None, *, docs: Sequence[Document] | None = None,
          model_config: ModelConfig | None = None, progress: bool = True) -> TrainResult:
    """Train tokenizer and model; with `out`, write the checkpoint (bf16), tokenizer.json and run-log.json there."""
    start_time = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    docs = load_corpus() if docs is None else list(docs)
    train_docs, held_docs = split_corpus(docs)
    tok = train_bpe((d.text for d in train_docs), cfg.vocab_size)
    mcfg = default_model_config(tok.get_vocab_size(), cfg.arch) if model_config is None else model_config
    if mcfg.vocab_size < tok.get_vocab_size():
        raise ValueError(f"model vocab_size {mcfg.vocab_size} is below the tokenizer's {tok.get_vocab_size()}")

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts)]

    eos = mcfg.eos_token_id if isinstance(mcfg.eos_token_id, int) else 1
    train_ids = token_stream(train_docs, encode_batch, eos)  # [N]
    held_ids = token_stream(held_docs, encode_batch, eos)  # [N_held]
    held_eval = eval_windows(held_ids, cfg.seq_len, cfg.eval_windows)  # [W, S+1]

    model = DeepSeekModel(mcfg).init_weights(cfg.seed).train()
    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    E, k = mcfg.n_routed_experts, mcfg.num_experts_per_tok
    moe_layers = list(mcfg.moe_layers)
    learned_layers = [layer for layer in moe_layers if not mcfg.is_hash_layer(layer)]  # hash layers do not choose
    records: list[dict[str, Any]] = []
    evals: list[dict[str, float]] = []
    window_loss: list[float] = []
    window_bal: list[float] = []
    window_load = {layer: torch.zeros(E) for layer in moe_layers}
    tap = RoutingTap()
    index_tap = IndexerTap(model)  # CSA layers' inputs, for the indexer's own loss (none on V3)
    window_index: list[float] = []
    bar = tqdm(range(cfg.steps), desc="training", unit="step", disable=not progress)
    for step in bar:
        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sample_batch(train_ids, cfg.batch, cfg.seq_len, gen)  # [B, S+1]
        with model.probes.listen(list(RoutingTap.SITES), tap):
            logits = model(batch[:, :-1])  # [B, S, V]
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        bal = torch.stack([sequence_balance_loss(tap.scores[layer], tap.ids[layer], cfg.batch, k)
                           for layer in learned_layers]).mean()
        loss = lm_loss + cfg.balance_alpha * bal
        index_kl = indexer_loss(index_tap)  # trains the indexer only (its input is detached)
        if index_kl is not None:
            loss = loss + index_kl
            window_index.append(index_kl.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        for layer in moe_layers:
            load = expert_load(tap.ids[layer], E)  # [E]
            if layer in learned_layers:
                update_bias(_gate(model, layer).e_score_correction_bias, load, cfg.bias_gamma)
            window_load[layer] += load
        window_loss.append(lm_loss.item())
        window_bal.append(bal.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            records.append({
                "step": step + 1, "loss": sum(window_loss) / len(window_loss), "lr": lr,
                "balance_loss": sum(window_bal) / len(window_bal),
                "max_over_mean_load": {str(layer): max_over_mean(window_load[layer]) for layer in moe_layers},
                "elapsed_s": time.perf_counter() - start_time,
                **({"indexer_kl": sum(window_index) / len(window_index)} if window_index else {}),
            })
            bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", refresh=False)
            window_loss, window_bal, window_index = [], [], []
            window_load = {layer: torch.zeros(E) for layer in moe_layers}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            evals.append({"step": step + 1, "held_out_loss": held_out_loss(model, held_eval)})
            model.train()
    index_tap.remove()
    model.eval()
    train_seconds = time.perf_counter() - start_time
    log: dict[str, Any] = {
        "train_config": dataclasses.asdict(cfg),
        "model_config": mcfg.to_hf_dict(),
        "corpus": corpus_manifest(docs),
        "tokens": {"train": int(train_ids.numel()), "held_out": int(held_ids.numel()),
                   "seen": cfg.steps * cfg.batch * cfg.seq_len},
        "torch": torch.__version__,
        "records": records,
        "evals": evals,
        "train_seconds": train_seconds,
        "final_bias": {str(layer): _gate(model, layer).e_score_correction_bias.tolist() for layer in learned_layers},
    }
    if out is not None:
        out = Path(out)
        save_checkpoint(model, out, dtype=torch.bfloat16)
        tok.save(str(out / "tokenizer.json"))
        final = eval_windows(held_ids, cfg.seq_len, cfg.final_eval_windows)
        log["final_held_out_loss"] = held_out_loss(model, final)
        log["final_held_out_tokens"] = int(final[:, 1:].numel())
        (out / RUN_LOG).write_text(json.dumps(log, indent=1) + "\n")
    return TrainResult(model, tok, log)
