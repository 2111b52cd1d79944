"""DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention): a cheap scorer that picks, for every query, the
`index_topk` past tokens its MLA may attend to.

Shape legend: B batch, S new tokens, T cached + new tokens, H hidden, Q q_lora_rank, nI index heads (H_I),
dI index head width (d_I), R qk_rope_head_dim, k = min(index_topk, T) tokens kept per query.

    q^I = W_qb c_q                       [B, S, nI, dI]  from MLA's query latent c_q (shared with MLA)
    k^I = LayerNorm(W_k x)               [B, T, dI]      one key head for all index heads, cached per layer
    w   = W_w x * nI^-1/2                [B, S, nI]
    I[t, s] = sum_j w[t, j] * ReLU(q^I[t, j] . k^I[s] * dI^-1/2),  causal (future = -inf)
    selected[t] = top-k of I[t, :]       ties -> the lower position (`top_indices`), -1 where I is -inf

Design choices:
- q^I and k^I are laid out [rope (first R) | pass] and rotated in the *halves* layout (rotate_half), whatever the
  checkpoint's `rope_interleave`: DeepSeek's 2025-11-17 fix, which transformers implements (the main MLA keeps its
  interleaved pairs). The cos/sin are the model's own, YaRN attention factor included.
- DeepSeek's inference code also applies a Hadamard rotation (orthogonal: no change in exact arithmetic) and FP8
  quantizes q^I/k^I before scoring; transformers skips both, and so do we: scores are computed in fp32.
- The weights projection runs in fp32 (transformers keeps `indexer.weights_proj` fp32 whatever the model dtype).
- When every causal key fits in the budget (T <= index_topk) the choice is "all", so nothing is scored unless a
  probe listens: the MLA then runs dense, op for op DeepSeek-V3.
- Listeners may replace the scores or the selection (an intervention on which keys a query sees); a replaced
  selection is honoured even when the budget covers everything. -1 (or a future position) selects nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import ModelConfig
from workbench.model.cache import LatentKVCache
from workbench.probes import ProbeRegistry
from workbench_kernels.reference import top_indices

LAYERNORM_EPS = 1e-6  # transformers' and DeepSeek's k_norm (not the config's rms_norm_eps)


class LightningIndexer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, probes: ProbeRegistry) -> None:
        super().__init__()
        if config.q_lora_rank is None:
            raise ValueError("the lightning indexer reads MLA's query latent: q_lora_rank must be set")
        self.layer = layer
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.topk = config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=LAYERNORM_EPS)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.hook_index_scores = probes.site(f"blocks.{layer}.attn.hook_index_scores")  # [B, S, T] fp32, future -inf
        self.hook_index_selected = probes.site(f"blocks.{layer}.attn.hook_index_selected")  # [B, S, k] int64, -1 none

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] -> the index keys [B, S, dI], post-LayerNorm and post-RoPE (what the cache keeps)."""
        return rotate_halves(self.k_norm(self.wk(x)), cos, sin, self.rope_dim)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentKVCache | None, topk: int | None = None) -> torch.Tensor | None:
        """x [B, S, H] (the attention input), q_latent [B, S, Q] (MLA's c_q), cos/sin [S, R/2] of positions
        past.. past+S-1 -> the selected key positions [B, S, k] int64 (-1: none), or None when every causal key is
        kept (T <= index_topk and no listener changed the choice), so MLA can run dense. `topk`: this run's budget
        instead of the config's index_topk (a control)."""
        k_index = self.keys(x, cos, sin)  # [B, S, dI]
        past = 0
        if cache is not None:
            past = cache.length
            k_index = cache.append_index_keys(self.layer, k_index)  # [B, T, dI]
        T = k_index.shape[1]
        k = min(self.topk if topk is None else topk, T)
        if k == T and not (self.hook_index_scores.listened() or self.hook_index_selected.listened()):
            return None
        computed = self.scores(x, q_latent, k_index, cos, sin, past)  # [B, S, T]
        scores = self.hook_index_scores(computed)
        chosen = top_indices(scores, k)  # [B, S, k]
        chosen = chosen.masked_fill(scores.gather(-1, chosen) == float("-inf"), -1)
        selected = self.hook_index_selected(chosen)
        if selected is not chosen:
            self._check_replaced(selected, T)
        elif k == T and scores is computed:
            return None
        return selected.long()

    def _check_replaced(self, selected: torch.Tensor, T: int) -> None:
        """A listener's selection must hold integer key positions in -1..T-1 (-1: none)."""
        name = self.hook_index_selected.name
        if selected.dtype.is_floating_point or selected.dtype == torch.bool:
            raise ValueError(f"probe {name}: a replaced selection must hold integer key positions, got {selected.dtype}")
        lo, hi = int(selected.min()), int(selected.max())
        if lo < -1 or hi >= T:
            raise ValueError(f"probe {name}: a replaced selection holds position {lo if lo < -1 else hi}, outside "
                             f"-1..{T - 1} (-1 selects nothing; the {T} keys are positions 0..{T - 1})")

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, k_index: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, past: int) -> torch.Tensor:
        """The index scores I [B, S, T] in fp32 of the S new queries over all T keys; the future is -inf."""
        B, S, _ = x.shape
        T = k_index.shape[1]
        q = self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim)  # [B, S, nI, dI]
        q = rotate_halves(q, cos, sin, self.rope_dim)
        logits = torch.einsum("bsjd,btd->bsjt", q.float(), k_index.float())  # [B, S, nI, T]
        # ReLU(l * s) = s * ReLU(l) for the scale s = dI^-1/2 > 0: folded into the [B, S, nI] weights, not the
        # [B, S, nI, T] logits (the formula's order differs from this only in float rounding)
        weights = F.linear(x.float(), self.weights_proj.weight.float()) * (self.n_heads**-0.5 * self.head_dim**-0.5)
        scores = torch.einsum("bsj,bsjt->bst", weights, F.relu(logits, inplace=True))  # [B, S, T]
        future = torch.ones(S, T, dtype=torch.bool, device=x.device).triu(diagonal=past + 1)  # [S, T]
        return scores.masked_fill(future, float("-inf"))


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """RoPE on the first `rope_dim` dims of x [B, S, *mid, d] in the halves layout (pairs (i, i + R/2));
    cos/sin [S, R/2] broadcast over batch and heads. Computed in fp32, returned in x's dtype."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    rope, rest = x.float().split([rope_dim, x.shape[-1] - rope_dim], dim=-1)
    x1, x2 = rope.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1).to(x.dtype)


def selected_scores(scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The index scores [..., N] at the selected entries [..., k] (-1 = none): float [..., k], NaN at -1 (and
    everywhere when no entry exists yet, N = 0: a window shorter than one compressed entry)."""
    selected = selected.long()
    if scores.shape[-1] == 0:
        return torch.full(selected.shape, float("nan"), device=scores.device)
    return scores.float().gather(-1, selected.clamp(min=0)).masked_fill(selected < 0, float("nan"))
