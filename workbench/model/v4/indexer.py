"""V4's lightning indexer: picks, per query, the top-k compressed entries a CSA layer attends to (brief §2.4).

Shape legend: B batch, S new tokens, D hidden, Q q_lora_rank, H_I index heads, d_I index_head_dim, N entries,
k index_topk.

It has its own overlapping compressor at width d_I (kv_proj, gate_proj, position_bias, kv_norm; the same windows
as the attention's, m = 4), keys K^I_w = entries of that compressor. Queries q^I = q_b_proj(c_q) per head with the
"compress" RoPE at t on the last R channels, c_q the attention's normed query latent. Score of entry w for query t:
    I[t, w] = Σ_h (weights_proj(x)_h · H_I^-1/2) · ReLU(q^I_{t,h} · K^I_w) · d_I^-1/2,
-inf for entries not yet visible (w >= (t+1) // m). The k best visible entries are selected, best first; ties go
to the lower index (a stable sort: `torch.topk` leaves tie order to the device). Slots without a visible entry
hold -1, so the selection is always [B, S, k].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import CSA_RATIO, ModelConfig
from workbench.model.v4.cache import CompressorState
from workbench.model.v4.compressor import Compressor
from workbench.model.v4.fake_quant import indexer_fp4_fake_quant
from workbench.model.v4.rope import V4Rotary
from workbench.probes import ProbeSite
from workbench_kernels.reference import top_indices


class IndexScorer(nn.Module):
    """The per-head weights of the index score (transformers' `scorer`, DeepSeek's `weights_proj`)."""

    def __init__(self, hidden: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.weights_proj = nn.Linear(hidden, heads, bias=False)
        self.score_scale, self.head_scale = head_dim**-0.5, heads**-0.5

    def forward(self, q: torch.Tensor, keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """q [B, S, H_I, d_I], keys [B, N, d_I], x [B, S, D] -> scores [B, S, N] fp32."""
        logits = torch.einsum("bshd,bnd->bshn", q.float(), keys.float())  # [B, S, H_I, N]
        # ReLU(l * s) = s * ReLU(l) for s = d_I^-1/2 > 0: the scale goes on the [B, S, H_I] weights
        weights = self.weights_proj(x).float() * (self.head_scale * self.score_scale)  # [B, S, H_I]
        return torch.einsum("bsh,bshn->bsn", weights, F.relu(logits, inplace=True))  # [B, S, N]


class Indexer(Compressor):
    """The indexer's compressor (inherited: its parameters sit at the indexer's top level, as in transformers)
    plus its query projection and scorer."""

    def __init__(self, config: ModelConfig, rotary: V4Rotary, scores_site: ProbeSite,
                 selected_site: ProbeSite) -> None:
        super().__init__(config.hidden_size, config.index_head_dim, CSA_RATIO, config.rms_norm_eps,
                         rotary)
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        assert config.q_lora_rank is not None  # validated for V4
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.scorer = IndexScorer(config.hidden_size, self.n_heads, self.head_dim)
        self.scores_site = scores_site  # blocks.{L}.attn.hook_index_scores [B, S, N]
        self.selected_site = selected_site  # blocks.{L}.attn.hook_index_selected [B, S, k]

    def finish(self, entries: torch.Tensor, *, simulate: bool) -> torch.Tensor:
        """DeepSeek's indexer simulation on the keys: Hadamard rotation + FP4 e2m1 (off in transformers)."""
        return indexer_fp4_fake_quant(entries) if simulate else entries

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, past: int, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, state: CompressorState | None, *,
               simulate: bool = False) -> torch.Tensor:
        """Index scores [B, S, N] fp32 of every compressed entry, -inf where an entry is not yet complete for the
        query (what `select` ranks; the indexer's training loss reads them too)."""
        B, S, _ = x.shape
        keys = self.compress(x, past, state, simulate=simulate)  # [B, N, d_I]
        q = self.q_b_proj(q_latent).view(B, S, self.n_heads, self.head_dim)
        q = self.rotary.rotate(q, cos, sin)  # [B, S, H_I, d_I]
        if simulate:
            q = indexer_fp4_fake_quant(q)
        scores = self.scorer(q, keys, x)  # [B, S, N]
        visible = torch.arange(keys.shape[1], device=x.device) < ((positions + 1) // self.rate)[:, None]  # [S, N]
        return scores.masked_fill(~visible, float("-inf"))

    def select(self, x: torch.Tensor, q_latent: torch.Tensor, past: int, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, state: CompressorState | None, *,
               simulate: bool = False, topk: int | None = None) -> torch.Tensor:
        """x [B, S, D], q_latent [B, S, Q], positions [S] = past .. past+S-1 (with their compress-table cos/sin
        [S, R/2]) -> selected entry indices [B, S, k] int64, best first, -1 where no visible entry is left.
        `topk`: this run's k instead of the config's index_topk (a control)."""
        B, S, _ = x.shape
        scores = self.scores_site(self.scores(x, q_latent, past, positions, cos, sin, state, simulate=simulate))
        N = scores.shape[-1]
        k = self.topk if topk is None else topk
        order = top_indices(scores, min(k, N))  # [B, S, <=k]
        chosen = torch.where(scores.gather(-1, order) > float("-inf"), order, -1)
        if chosen.shape[-1] < k:
            chosen = torch.cat([chosen, chosen.new_full((B, S, k - chosen.shape[-1]), -1)], dim=-1)
        return self.selected_site(chosen)
