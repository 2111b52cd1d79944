"""DeepSeek-V3's expert load balancing, as used in training (V3 paper, section 2.1.2).

Shape legend: B sequences, S tokens per sequence, T = B*S tokens, E routed experts, k experts per token.

- Auxiliary-loss-free balancing: each expert's `e_score_correction_bias` (selection only, never the weights) moves
  by `gamma` after every step, up for an under-loaded expert and down for an over-loaded one:
  bias_i += gamma * sign(mean_load - load_i). It is a buffer changed by hand, not a parameter the optimiser sees.
- The complementary sequence-wise balance loss (eq. 17-20), kept small so it only stops extreme imbalance inside
  single sequences: L = alpha * sum_i f_i * P_i per sequence, where f_i = E / (k S) * (tokens of the sequence that
  chose expert i) and P_i = mean over the sequence of the expert's normalised score s_i / sum_j s_j.
"""

from __future__ import annotations

import torch


def expert_load(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """ids [T, k] -> tokens routed to each expert [E] (float)."""
    return torch.bincount(ids.reshape(-1), minlength=n_experts).float()


def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> None:
    """In place: bias [E] += gamma * sign(mean(load) - load [E]) (V3's auxiliary-loss-free update)."""
    with torch.no_grad():
        bias.add_(gamma * torch.sign(load.mean() - load))


def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """scores [T, E] (sigmoid, before bias), ids [T, k] chosen experts, T = batch * S -> mean over sequences of
    sum_i f_i P_i (eq. 17-20 without alpha). 1.0 when every sequence spreads its tokens evenly."""
    T, E = scores.shape
    S = T // batch
    normed = scores / scores.sum(dim=-1, keepdim=True)  # [T, E] s'_{i,t}
    P = normed.view(batch, S, E).mean(dim=1)  # [B, E]
    chosen = torch.zeros(T, E, device=scores.device).scatter_(1, ids, 1.0)  # [T, E] 1 where t chose i
    f = chosen.view(batch, S, E).sum(dim=1) * (E / (top_k * S))  # [B, E]
    return (f * P).sum(dim=-1).mean()


def max_over_mean(load: torch.Tensor) -> float:
    """Balance figure for one layer: busiest expert's load over the mean load (1.0 = perfectly even)."""
    return float(load.max() / load.mean().clamp_min(1e-9))
