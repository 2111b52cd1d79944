"""Scaled dot-product attention as MLA (and the sparse kinds after it) needs it: one query block after a cached
history, per-head or shared keys, and query/key widths that differ from the value width.

Shape legend: B batch, S new tokens, T cached + new tokens, nH heads, d q/k width, dv value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: torch.Tensor | None, scale: float, *,
           fused: bool = True) -> torch.Tensor:
    """softmax(q·k * scale) v with q [B, S, nH, d], k [B, T, nH or 1, d], v [B, T, nH or 1, dv] -> [B, S, nH, dv].

    `causal` [S, T] bool (True = may attend) for a query block after cached history, or [B, 1, S, T] for a
    per-sequence key selection (V3.2's indexer); None: causal from the start.
    `fused` (the default): one `F.scaled_dot_product_attention` call with the narrower of q·k / v zero-padded to the
    other's width, since torch's CPU flash kernel needs equal widths and its math fallback is ~4x slower (MLA's q·k
    width D+R or C+R never equals V or C). Zero columns change neither q·k nor the kept part of the output.
    `fused=False`: the plain reference, softmax(q k^T * scale) v spelled out, which the fused path is tested against.
    """
    nH, S = q.shape[2], q.shape[1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, nH or 1, S or T, d] heads first
    dv = v.shape[-1]
    if not fused:
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, nH, S, T]
        T = k.shape[2]
        allowed = causal if causal is not None else torch.ones(S, T, dtype=torch.bool, device=q.device).tril()
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # [B, nH, S, T]
        return (probs @ v.float()).to(q.dtype).transpose(1, 2)
    width = max(q.shape[-1], dv)
    q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in (q, k, v))
    if k.shape[1] != nH:  # one key/value shared by all heads (absorbed MLA): padded above, expanded as a view here
        k, v = k.expand(-1, nH, -1, -1), v.expand(-1, nH, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, is_causal=causal is None and S > 1,
                                         scale=scale)  # [B, nH, S, width]
    return out[..., :dv].transpose(1, 2)


def attend_latent_step(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """One absorbed-MLA decode step over its whole cached history, in three batched matmuls and a softmax.

    q_latent [B, nH, C], q_pe [B, nH, R], c_kv [B, T, C], k_pe [B, T, R] -> o_latent [B, nH, C].
    The same softmax([q_latent | q_pe]·[c_kv | k_pe] * scale) c_kv as `attend` on the concatenated key, with no
    mask (a step's query is the last position: every cached key is causal), but the two halves of the logit are
    added instead of concatenating the key: `attend` copies the whole history [B, T, C + R] into a new key every
    step and pads it for SDPA, this reads the cache where it lies. For fp32 (wider dtypes keep `attend`'s
    fp32-accumulating kernel); tested against `attend(fused=False)`.
    """
    logits = torch.bmm(q_latent, c_kv.transpose(1, 2))  # [B, nH, T]
    logits = torch.baddbmm(logits, q_pe, k_pe.transpose(1, 2), beta=scale, alpha=scale)  # [B, nH, T] scaled
    return torch.bmm(logits.softmax(dim=-1), c_kv)  # [B, nH, C]
