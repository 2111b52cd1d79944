"""Manifold-constrained hyper-connections (mHC): DeepSeek-V4's residual of n parallel streams instead of one.

Shape legend: B batch, S new tokens, n streams (hc_mult), D hidden.

The residual state is X [B, S, n, D] (the embedding copied to n streams). Around each sublayer F (attention, MoE)
a `HyperConnection` reads X and computes, per token, from a linear map of the RMS-normalised flat streams:
pre [n] = sigmoid(.) + hc_eps (how the streams collapse into F's input u = sum_i pre_i X_i), post [n] =
2 sigmoid(.) (how F's output y spreads back) and the mixing matrix M [n, n] = Sinkhorn(softmax(.) + hc_eps), made
doubly stochastic so mixing never grows the streams' norm. The new state is X' = post (x) y + M^T X, i.e.
X'_k = post_k y + sum_j M_jk X_j: M's columns say where each output stream's residual comes from (the transpose
matters, M is not symmetric). `HyperHead` collapses the streams once more (pre only) before the final norm.
Everything is computed in fp32 (the parameters are kept fp32), the collapsed u and X' in the streams' dtype.
The projection normalises the flat streams before the matmul (as transformers does; DeepSeek's code scales after,
the same in exact arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import ModelConfig
from workbench.probes import ProbeRegistry


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp on positive matrices [..., n, n]: a column step, then `iters - 1` (row, column) steps.

    DeepSeek's kernel (and transformers) end on a column step: columns sum to 1 within ~eps, rows only
    approximately (to the convergence reached in `iters` steps).
    """
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def sinkhorn_numpy(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn`, op for op in numpy: for decode-sized inputs on the CPU, where each of the 3 (2 iters - 1) tiny
    torch ops costs its dispatch (a few us) and numpy's a third of that; the same fp32 arithmetic in the same order
    (a test holds the two equal bit for bit)."""
    a = m.detach().numpy().copy()
    eps32 = np.float32(eps)
    cols, rows = np.empty((*a.shape[:-2], 1, a.shape[-1]), a.dtype), np.empty((*a.shape[:-1], 1), a.dtype)
    add_reduce, add, divide = np.add.reduce, np.add, np.divide  # ufuncs into preallocated sums: ~0.8 us per op
    add_reduce(a, axis=-2, out=cols, keepdims=True)
    divide(a, add(cols, eps32, cols), a)
    for _ in range(iters - 1):
        add_reduce(a, axis=-1, out=rows, keepdims=True)
        divide(a, add(rows, eps32, rows), a)
        add_reduce(a, axis=-2, out=cols, keepdims=True)
        divide(a, add(cols, eps32, cols), a)
    return torch.from_numpy(a)


def sinkhorn_tokens_last(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn` on a copy laid out [n, n, tokens...]: every row and column sum then runs along contiguous tokens
    (vectorised), where on [..., n, n] each sums n strided numbers per token (5x faster at 1024 tokens on CPU).
    The same sums in the same order (a test holds it equal to `sinkhorn` bit for bit)."""
    lead = m.dim() - 2
    a = m.permute(lead, lead + 1, *range(lead)).contiguous()  # [n, n, ...]
    a = a / (a.sum(dim=0, keepdim=True) + eps)
    for _ in range(iters - 1):
        a = a / (a.sum(dim=1, keepdim=True) + eps)
        a = a / (a.sum(dim=0, keepdim=True) + eps)
    return a.permute(*range(2, a.dim()), 0, 1).contiguous()  # [..., n, n]


SINKHORN_NUMPY_MAX = 1024  # elements: up to here (a few decode tokens) numpy wins; beyond, the tokens-last layout


def mix_matrix(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn on the path that is fastest for this input; every path computes the same numbers as `sinkhorn`."""
    if m.shape[-1] > 4:  # wider streams than V4's: the summation order of the fast paths is not pinned there
        return sinkhorn(m, iters, eps)
    if m.device.type == "cpu" and m.dtype == torch.float32 and not m.requires_grad \
            and m.numel() <= SINKHORN_NUMPY_MAX:  # n <= 4: both sum a row or column in the same order
        return sinkhorn_numpy(m, iters, eps)
    return sinkhorn_tokens_last(m, iters, eps)


def flat_rms(streams: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, S, n, D] -> [B, S, n*D] fp32 with unit RMS per token (stream-major flattening, no weight)."""
    flat = streams.flatten(2).float()  # [B, S, nD]
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


class HyperConnection(nn.Module):
    """The mHC weights of one sublayer: fn [(2+n)n, nD], base [(2+n)n], scale [3] (pre, post, mix)."""

    def __init__(self, config: ModelConfig, probes: ProbeRegistry, site: str) -> None:
        super().__init__()
        n = config.hc_mult
        self.n, self.iters, self.hc_eps, self.norm_eps = n, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))
        self.hook_mix = probes.site(f"{site}.hook_mix")  # [B, S, n, n] the Sinkhorn matrix M (X' = post y + M^T X)

    def weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, S, n, D] -> pre [B, S, n], post [B, S, n], mix [B, S, n, n], all fp32 (each op as
        transformers orders it: fusing the three heads' scale and bias into one addcmul, or their sigmoids into one
        over a strided slice, moved V4 logits by 1-3e-5 against it)."""
        n = self.n
        mixes = F.linear(flat_rms(streams, self.norm_eps), self.fn.float())  # [B, S, (2+n)n]
        pre_w, post_w, mix_w = mixes.split([n, n, n * n], dim=-1)
        base = self.base.float()
        pre_b, post_b, mix_b = base.split([n, n, n * n])
        scale = self.scale.float()
        pre = torch.sigmoid(pre_w * scale[0] + pre_b) + self.hc_eps  # [B, S, n]
        post = 2 * torch.sigmoid(post_w * scale[1] + post_b)  # [B, S, n]
        logits = mix_w.unflatten(-1, (n, n)) * scale[2] + mix_b.view(n, n)  # [B, S, n, n]
        mix = mix_matrix(torch.softmax(logits, dim=-1) + self.hc_eps, self.iters, self.hc_eps)
        return pre, post, self.hook_mix(mix)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, S, n, D] -> (u [B, S, D] the sublayer's input, post [B, S, n], mix [B, S, n, n])."""
        pre, post, mix = self.weights(streams)
        return collapse(streams, pre), post, mix


def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_i pre_i X_i: [B, S, n, D], [B, S, n] -> [B, S, D] in the streams' dtype."""
    return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


def expand(streams: torch.Tensor, y: torch.Tensor, post: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """X' = post (x) y + M^T X: streams [B, S, n, D], y [B, S, D], post [B, S, n], mix [B, S, n, n] -> [B, S, n, D]."""
    dtype = streams.dtype
    n, D = streams.shape[-2:]
    m_t = mix.to(dtype).transpose(-1, -2)  # [..., n, n]
    if streams[..., 0, 0].numel() <= 16:  # a few tokens (decoding): the broadcasting matmul, fewer ops
        mixed = torch.matmul(m_t, streams)  # [B, S, n, D]
    else:  # one bmm over contiguous [T, n, n] x [T, n, D]: on CPU a broadcasting matmul over [..., n, n], or a bmm
        # of strided matrices, is 15-25x slower at 1024 tokens (the same products: tests hold the two equal)
        mixed = torch.bmm(m_t.reshape(-1, n, n).contiguous(), streams.reshape(-1, n, D).contiguous()).view(streams.shape)
    return post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + mixed


class HyperHead(nn.Module):
    """The final collapse of the streams: hc_fn [n, nD], hc_base [n], hc_scale [1]; pre as in `HyperConnection`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n = config.hc_mult
        self.hc_eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [B, S, n, D] -> [B, S, D]."""
        mixes = F.linear(flat_rms(streams, self.norm_eps), self.hc_fn.float())  # [B, S, n]
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps  # [B, S, n]
        return collapse(streams, pre)
