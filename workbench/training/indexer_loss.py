"""The lightning indexer's own training signal: KL from dense attention's distribution over compressed entries.

The indexer only selects (a top-k), so the language-model loss sends it no gradient; left alone it stays at its
random initialisation and picks no better than chance. DeepSeek-V3.2 trains it by distillation (§2.1 of its
report): the target is the main attention's probability over the candidates, summed over heads and L1-normalised,
and the loss is KL(target || softmax(index scores)), with the indexer's input detached so that this loss trains
the indexer only and the language-model loss trains the rest. Here the target is V4's dense softmax over every
complete compressed entry (`trace.dense_topk.v4_attention_probs`, the same reference `indexer_recall` scores
against), computed without gradient from the layer's input.

Shape legend: B batch, S positions, nH heads, H_I indexer heads, d_I indexer head dim, N compressed entries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.model.transformer import DeepSeekModel
from workbench.trace.dense_topk import call_arguments, v4_attention_probs


class IndexerTap:
    """Forward pre-hooks on each CSA layer's attention that keep its input x [B, S, D] and positions [S]."""

    def __init__(self, model: DeepSeekModel) -> None:
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attns: dict[int, nn.Module] = {i: block.self_attn for i, block in enumerate(model.layers)  # type: ignore[misc]
                                            if getattr(block.self_attn, "indexer", None) is not None}
        self._handles = [attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, attn in self.attns.items()]

    def _hook(self, layer: int) -> Any:
        def keep(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x, positions = call_arguments(args, kwargs, ("x", "positions"))
            self.inputs[layer] = (x, positions)
        return keep

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def index_scores(attn: Any, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The indexer's scores [B, S, N] over every compressed entry of x [B, S, D] (no cache), -inf where an entry is
    not yet complete: `Indexer.scores`, what `Indexer.select` ranks, from the layer's query latent [B, S, Q]."""
    cos, sin = attn.rotary.cos_sin(positions)
    return attn.indexer.scores(x, q_latent, 0, positions, cos, sin, None)


def indexer_kl(attn: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean over queries with at least one complete entry of KL(p || softmax(scores)), where p is dense attention's
    entry probability summed over heads and L1-normalised. x and the query latent enter detached: the gradient
    reaches the indexer's own parameters (its compressor, query projection and scorer) only."""
    x = x.detach()
    with torch.no_grad():
        entries = v4_attention_probs(attn, x, positions)[1].sum(dim=2)  # [B, S, N]
        target = entries / entries.sum(-1, keepdim=True).clamp_min(1e-30)
        q_latent = attn.q_a_norm(attn.q_a_proj(x)).to(x.dtype)  # [B, S, Q]
    scores = index_scores(attn, x, q_latent, positions)  # [B, S, N]
    rows = torch.isfinite(scores).any(-1)  # [B, S] queries with a complete entry
    if not rows.any():
        return scores.new_zeros(())
    log_q = scores[rows].log_softmax(-1)  # [R, N]
    p = target[rows]
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p)).sum(-1)  # [R]
    return kl.mean()


def indexer_loss(tap: IndexerTap) -> torch.Tensor | None:
    """The mean `indexer_kl` over the CSA layers the last forward ran, or None for a model without an indexer."""
    if not tap.attns:
        return None
    return torch.stack([indexer_kl(tap.attns[i], *tap.inputs[i]) for i in sorted(tap.attns)]).mean()
