"""Dense attention's own top-k for V3.2 and V4: the reference an indexer's selection is scored against.

Design choices:
- "Dense" is the same weights with `index_topk` >= the window, which for V3.2 is exactly V3's MLA (every causal key
  kept), run on a copy of the model so the caller's model is never changed.
- MLA never materialises its probabilities (scaled_dot_product_attention, or the absorbed latent form), so they
  are rebuilt here from each layer's input with the layer's own projections, spelled out as MLA's naive formula:
  p[h, t, s] = softmax_s(q_h(t) . k_h(s) * softmax_scale) over s <= t. `attention_probs` is held equal to MLA by
  checking p @ v against the layer's `hook_z` in the tests.
- V4 (CSA layers): "dense" keeps every complete compressed entry (index_topk >= the entries), and p is V4's own
  softmax over the window keys, every visible entry and the sink (`v4_attention_probs`; its window / entry /
  sink sums are held equal to the layer's `hook_attn_mass` in the tests); the ranking is of the entries' part.
- The top-k is of the head-averaged probabilities p_bar[t, s] = mean_h p[h, t, s], ties to the lower position
  (as the indexer breaks them), k = the sparse model's `index_topk`; queries with fewer than k causal keys
  (V4: complete entries) keep them all and pad with -1, like `hook_index_selected`.
Shape legend: B windows, S positions (= T keys, no cache), nH heads, D nope dim, R rope dim, V value dim, k top-k,
I indexer layers, N compressed entries (V4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workbench.model.transformer import DeepSeekModel


def call_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    """The leading parameters `names` of a forward call, given positionally or by keyword (a forward pre-hook
    registered `with_kwargs=True` sees either)."""
    return (*args, *(kwargs[n] for n in names[len(args):]))[: len(names)]


def dense_copy(model: DeepSeekModel, keys: int) -> DeepSeekModel:
    """A V3.2 / V4 model with the same weights whose indexer keeps every one of `keys` causal keys (V3.2: V3's
    MLA; V4: every complete compressed entry, `keys` tokens giving at most keys // 4 of them)."""
    cfg = model.config
    if cfg.model_type not in ("deepseek_v32", "deepseek_v4"):
        raise ValueError(f"dense attention top-k is defined for V3.2 and V4 models, not {cfg.model_type}")
    dense = DeepSeekModel(cfg.replace(index_topk=max(keys, cfg.index_topk)))
    dense.load_state_dict(model.state_dict())
    return dense.eval()


def attention_probs(attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: Any) -> torch.Tensor:
    """One MLA layer's dense causal probabilities [B, nH, S, S] fp32 from its input x [B, S, H] (no cache)."""
    B, S, _ = x.shape
    nH, D, R, C = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.latent_dim
    q, _ = attn.project_q(x)
    q_nope, q_pe = q.view(B, S, nH, D + R).split([D, R], dim=-1)
    c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([C, R], dim=-1)
    c_kv = attn.kv_a_layernorm(c_kv)  # [B, S, C]
    q_pe, k_pe = rotary.apply(q_pe, cos, sin), rotary.apply(k_pe, cos, sin)  # [B, S, nH, R], [B, S, R]
    k_nope = attn.kv_b_proj(c_kv).view(B, S, nH, D + attn.v_dim)[..., :D]  # [B, S, nH, D]
    logits = (torch.einsum("bshd,bthd->bhst", q_nope.float(), k_nope.float())
              + torch.einsum("bshr,btr->bhst", q_pe.float(), k_pe.float())) * attn.softmax_scale  # [B, nH, S, S]
    future = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(diagonal=1)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def v4_attention_probs(attn: Any, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One V4 layer's dense probabilities from its input x [B, S, D] at positions 0..S-1 (no cache): every window
    key and every complete compressed entry -> (window [B, S, nH, S] over key positions, entries [B, S, nH, N]);
    what they leave of 1 is the sink's. Follows V4's formula: unweighted RMSNorm on q, partial RoPE on q and the
    shared K = V head, logits * head_dim^-1/2, the sink's logit unscaled."""
    B, S, _ = x.shape
    nH, d = attn.n_heads, attn.head_dim
    cos, sin = attn.rotary.cos_sin(positions)
    q = attn.q_b_proj(attn.q_a_norm(attn.q_a_proj(x)).to(x.dtype)).view(B, S, nH, d)
    q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + attn.eps).to(q.dtype)
    q = attn.rotary.rotate(q, cos, sin)  # [B, S, nH, d]
    kv = attn.rotary.rotate(attn.kv_norm(attn.kv_proj(x)).to(x.dtype), cos, sin)  # [B, S, d]
    t = positions[:, None]
    window_ok = (positions <= t) & (positions > t - attn.window)  # [S, S]
    groups = [(torch.einsum("bshd,bpd->bshp", q.float(), kv.float()) * attn.softmax_scale)
              .masked_fill(~window_ok[None, :, None], float("-inf"))]
    N = 0
    if attn.compressor is not None:
        entries = attn.compressor.compress(x, 0, None, simulate=attn.simulate_kv_fp8)  # [B, N, d]
        N = entries.shape[1]
        visible = torch.arange(N) < ((positions + 1) // attn.rate)[:, None]  # [S, N]
        groups.append((torch.einsum("bshd,bnd->bshn", q.float(), entries.float()) * attn.softmax_scale)
                      .masked_fill(~visible[None, :, None], float("-inf")))
    sink = attn.sinks.float().view(1, 1, nH, 1).expand(B, S, nH, 1)
    probs = torch.cat([*groups, sink], dim=-1).softmax(dim=-1)
    return probs[..., :S], probs[..., S:S + N]


@torch.no_grad()
def dense_attention_topk(model: DeepSeekModel, input_ids: torch.Tensor, k: int | None = None) -> np.ndarray:
    """The top-`k` key positions of dense attention's head-averaged probabilities, per token and layer with an
    indexer: int32 [B*S, I, k] (tokens flattened window by window, as a trace holds them), best first, -1 where a
    query has fewer than k causal keys. `k` defaults to the model's `index_topk`; the run uses a dense copy
    (`dense_copy`), so `model` is untouched."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    k = model.config.index_topk if k is None else k
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    B, S = input_ids.shape
    v4 = model.config.is_v4
    dense = dense_copy(model, S)
    attns: list[Any] = [block.self_attn for block in dense.layers]
    layers = [i for i, attn in enumerate(attns) if getattr(attn, "indexer", None) is not None]
    found: dict[int, torch.Tensor] = {}

    def capture(layer: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if v4:  # forward(x, positions, ...)
                x, positions = call_arguments(args, kwargs, ("x", "positions"))
                found[layer] = v4_attention_probs(module, x, positions)[1].mean(dim=2)  # [B, S, N]
                return
            x, cos, sin, rotary = call_arguments(args, kwargs, ("x", "cos", "sin", "rotary"))
            found[layer] = attention_probs(module, x, cos, sin, rotary).mean(dim=1)  # [B, S, S]
        return hook

    handles = [attns[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in layers]
    try:
        dense(input_ids)
    finally:
        for h in handles:
            h.remove()
    out = np.full((B * S, len(layers), k), -1, dtype=np.int32)
    for j, layer in enumerate(layers):
        probs = found[layer]  # [B, S, keys], 0 on keys a query cannot see
        width = min(k, probs.shape[-1])
        if width == 0:
            continue
        # ties to the lower position: a stable sort of -p keeps equal values in position order
        order = torch.sort(-probs, dim=-1, stable=True).indices[..., :width]  # [B, S, width]
        limit = torch.arange(S) + 1 if not v4 else (torch.arange(S) + 1) // attns[layer].rate  # [S] keys seen
        visible = order < limit[None, :, None]  # [B, S, width]
        out[:, j, :width] = torch.where(visible, order, -1).reshape(B * S, width).numpy()
    return out
