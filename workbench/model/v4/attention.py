"""DeepSeek-V4 attention: one shared K = V head over a sliding window plus compressed entries (CSA / HCA).

Shape legend: B batch, S new tokens, D hidden, Q q_lora_rank, nH heads, d head_dim, R qk_rope_head_dim,
W sliding_window, P window keys in reach (W-1 cached ring slots + S new, or S without a cache), N compressed
entries, k index_topk, g o_groups, r o_lora_rank, K keys gathered per query.

Per query t (brief §2.4):
- q = UnweightedRMSNorm per head of q_b_proj(c_q), c_q = q_a_norm(q_a_proj x); kv = kv_norm(kv_proj x); both get
  RoPE at t on their last R channels (a "main" table for sliding-only layers, "compress" for CSA/HCA).
- Keys: the window t-W < s <= t, plus compressed entries w < (t+1)//m: HCA all of them, CSA those the lightning
  indexer selects. softmax(q·k / sqrt(d)) over those keys and a per-head sink logit whose value is zero.
- The output's rope channels are rotated back by -t (V carries the key's rotation), then the grouped low-rank
  projection o_b_proj(concat_g o_a_proj_g(heads of group g)).
Two computations, chosen by `mode`, equal up to float reassociation (a test holds them to it):
- `naive`: logits against every key in reach (all P window keys, all N entries) under a dense mask. The reference.
- `fast`: gather, per query, only its W window keys and its chosen entries (HCA: the visible ones), as a decoder
  does; the cost per query no longer grows with the entries it may not use. One new token with a cache (a decode
  step) takes `_attend_step`: the window's keys straight from the ring and the entries it may use, one matmul
  each way, no masks but for the indexer's empty picks (tested against `naive` under every attention control).
DeepSeek's QAT simulations (FP8 KV, Hadamard + FP4 indexer) are off unless `set_reference_quant` turns them on.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from workbench.config import CSA, ModelConfig
from workbench.model.norm import RMSNorm
from workbench.model.v4.cache import V4LayerCache
from workbench.model.v4.compressor import Compressor
from workbench.model.v4.fake_quant import kv_fp8_fake_quant
from workbench.model.v4.indexer import Indexer
from workbench.model.v4.rope import V4Rotary
from workbench.probes import ProbeRegistry

V4AttnMode = Literal["naive", "fast"]


class GroupedLinear(nn.Module):
    """`o_a_proj`: one [in -> r] projection per group of consecutive heads (a block-diagonal linear).
    weight [g*r, in] as transformers and DeepSeek store it (rows g*r .. (g+1)*r belong to group g)."""

    def __init__(self, in_per_group: int, rank: int, groups: int) -> None:
        super().__init__()
        self.groups, self.rank = groups, rank
        self.weight = nn.Parameter(torch.empty(groups * rank, in_per_group))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, g, in] -> [B, S, g, r]"""
        w = self.weight.view(self.groups, self.rank, -1)  # [g, r, in]
        return torch.einsum("bsgi,gri->bsgr", x, w.to(x.dtype))


class V4Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, probes: ProbeRegistry) -> None:
        super().__init__()
        if not config.is_v4:
            raise ValueError(f"V4Attention needs a deepseek_v4 config, got model_type {config.model_type!r}")
        assert config.q_lora_rank is not None  # validated for V4
        self.layer, self.kind, self.rate = layer, config.attention_kind(layer), config.compress_ratio(layer)
        self.hidden, self.n_heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.rope_dim, self.window, self.eps = config.qk_rope_head_dim, config.sliding_window, config.rms_norm_eps
        self.o_groups, self.softmax_scale = config.o_groups, config.head_dim**-0.5
        # 1/sqrt(d) a power of two (d = 4^j, e.g. 64): scaling q instead of the logits is then exact, bit for bit,
        # and the dense path saves a pass over its [B, S, nH, P + N] logits
        self.scale_queries = math.frexp(self.softmax_scale)[0] == 0.5
        self.rotary = V4Rotary.for_layer(config, layer)
        D, nH, d, g = config.hidden_size, config.num_attention_heads, config.head_dim, config.o_groups
        self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, nH * d, bias=False)
        self.kv_proj = nn.Linear(D, d, bias=False)
        self.kv_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_a_proj = GroupedLinear(nH * d // g, config.o_lora_rank, g)
        self.o_b_proj = nn.Linear(g * config.o_lora_rank, D, bias=False)
        self.sinks = nn.Parameter(torch.zeros(nH, dtype=torch.float32))  # [nH] logit of the zero-valued sink
        # DeepSeek's reference-code quantization simulations (transformers has neither): see set_reference_quant
        self.simulate_kv_fp8 = False
        self.simulate_indexer_fp4 = False
        self.hook_attn_mass = probes.site(f"blocks.{layer}.attn.hook_attn_mass")  # [B, S, nH, 3] window/comp/sink
        self.compressor: Compressor | None = None
        if self.rate:
            weights_site = probes.site(f"blocks.{layer}.attn.hook_compress_weights")  # [B, n, m or 2m, d]
            self.compressor = Compressor(D, d, self.rate, config.rms_norm_eps, self.rotary, weights_site)
            if self.kind == CSA:
                self.compressor.indexer = Indexer(
                    config, self.rotary,
                    probes.site(f"blocks.{layer}.attn.hook_index_scores"),  # [B, S, N] fp32, invisible = -inf
                    probes.site(f"blocks.{layer}.attn.hook_index_selected"))  # [B, S, k] int64, -1 = none

    @property
    def indexer(self) -> Indexer | None:
        """The CSA lightning indexer (registered under `compressor.indexer`, transformers' name)."""
        found = getattr(self.compressor, "indexer", None)
        return found if isinstance(found, Indexer) else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: V4LayerCache | None = None,
                mode: V4AttnMode = "naive", *, index_topk: int | None = None, dense: bool = False,
                window: int | None = None, use_window: bool = True, use_compressed: bool = True) -> torch.Tensor:
        """x [B, S, D] (the attn_norm'ed block input), positions [S] int64 = past .. past+S-1 (past = tokens in
        `cache`, 0 without one) -> [B, S, D]. A cache is written in place; `V4Cache.advance` moves it on.
        Positions on the CPU are checked against `past`; elsewhere that check would cost a device sync per layer.

        This run's controls (validated by `workbench.controls`): `index_topk` the indexer's k; `dense` every visible
        compressed entry instead of the indexer's choice (the indexer does not run); `window` keys per query (at
        most the config's, which the cache's ring holds); `use_window=False` no window keys; `use_compressed=False`
        no compressed entries (the compressors and the indexer do not run, their cache state is left as it is)."""
        if mode not in ("naive", "fast"):
            raise ValueError(f"V4 attention mode must be 'naive' or 'fast', got {mode!r}")
        B, S = self._check_input(x, positions, cache)
        past = cache.length if cache is not None else 0
        nH, d = self.n_heads, self.head_dim
        cos, sin = self.rotary.cos_sin(positions)  # [S, R/2]
        q_latent = self.q_a_norm(self.q_a_proj(x)).to(x.dtype)  # [B, S, Q]
        q = self.q_b_proj(q_latent).view(B, S, nH, d)
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.eps).to(q.dtype)  # unweighted RMSNorm
        q = self.rotary.rotate(q, cos, sin)  # [B, S, nH, d]
        kv = self.rotary.rotate(self.kv_norm(self.kv_proj(x)).to(x.dtype), cos, sin)  # [B, S, d]
        if self.simulate_kv_fp8:
            kv = kv_fp8_fake_quant(kv, self.rope_dim)
        step = cache is not None and S == 1 and mode == "fast"  # a decode step: `_attend_step`
        W = (self.window if window is None else window) if use_window else 0
        if cache is None:
            keys, key_pos = kv, positions
        elif step:
            keys, key_pos = cache.step_keys(kv, W), positions  # [B, P, d]: the window's keys, the new one last
        else:
            keys, key_pos = cache.window_keys(kv)  # [B, P, d], [P] (-1: empty ring slot)
        entries, selected = None, None  # [B, N, d]; CSA: [B, S, k]
        if self.compressor is not None and use_compressed:
            entries = self.compressor.compress(x, past, cache.compressor if cache is not None else None,
                                               simulate=self.simulate_kv_fp8)
            indexer = self.indexer
            if indexer is not None and not dense:
                selected = indexer.select(x, q_latent, past, positions, cos, sin,
                                          cache.indexer if cache is not None else None,
                                          simulate=self.simulate_indexer_fp4, topk=index_topk)
        if step:
            out = self._attend_step(q, keys, entries, selected)
        elif mode == "naive":
            out = self._attend_dense(q, keys, key_pos, entries, selected, positions, W)
        else:
            out = self._attend_gathered(q, keys, entries, selected, positions, past,
                                        cache.window.shape[1] if cache is not None else 0, W)
        out = self.rotary.unrotate(out, cos, sin)  # [B, S, nH, d]: take the keys' rotation off the values
        grouped = self.o_a_proj(out.reshape(B, S, self.o_groups, -1))  # [B, S, g, r]
        return self.o_b_proj(grouped.flatten(2))  # [B, S, D]

    # ------------------------------------------------------------------ the two computations
    def _attend_dense(self, q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, entries: torch.Tensor | None,
                      selected: torch.Tensor | None, positions: torch.Tensor, window: int) -> torch.Tensor:
        """Every key in reach under a dense mask. q [B, S, nH, d], keys [B, P, d] at key_pos [P] -> [B, S, nH, d];
        `window` keys per query (0: none)."""
        t = positions[:, None]  # [S, 1]
        window_ok = (key_pos >= 0) & (key_pos <= t) & (key_pos > t - window)  # [S, P]
        if self.scale_queries:
            q = q * self.softmax_scale  # [B, S, nH, d]: exact (see __init__), the logits come out scaled
        # .float() is the einsum's own fresh tensor when it is fp32 already: masked in place
        logits = [torch.einsum("bshd,bpd->bshp", q, keys).float().masked_fill_(~window_ok[None, :, None], -math.inf)]
        if entries is not None:
            N = entries.shape[1]
            if selected is None:  # HCA: every complete window so far
                entry_ok = (torch.arange(N, device=q.device) < (positions[:, None] + 1) // self.rate)[None]  # [1,S,N]
            else:  # CSA: the indexer's picks (-1 = none) as a dense mask
                hits = torch.zeros(*selected.shape[:2], N + 1, dtype=torch.bool, device=q.device)
                entry_ok = hits.scatter_(-1, torch.where(selected >= 0, selected, N), True)[..., :N]  # [B, S, N]
            logits.append(torch.einsum("bshd,bnd->bshn", q, entries).float()
                          .masked_fill_(~entry_ok[:, :, None], -math.inf))
        probs = self._softmax_with_sink(logits, scaled=self.scale_queries)  # [B, S, nH, P (+N)] without the sink
        out = torch.einsum("bshp,bpd->bshd", probs[0].to(keys.dtype), keys)
        if entries is not None:
            out = out + torch.einsum("bshn,bnd->bshd", probs[1].to(entries.dtype), entries)
        return out

    def _attend_gathered(self, q: torch.Tensor, keys: torch.Tensor, entries: torch.Tensor | None,
                         selected: torch.Tensor | None, positions: torch.Tensor, past: int,
                         slots: int, window: int) -> torch.Tensor:
        """Each query's own keys only: its `window` window keys and its chosen entries, gathered (-1 = no key)."""
        B = q.shape[0]
        window_pos = positions[:, None] - torch.arange(window, device=q.device)  # [S, W], newest first
        # where each window position sits in `keys`: the ring slot p % (W-1) if cached before, else after the ring
        index = torch.where(window_pos >= past, slots + window_pos - past, window_pos % max(slots, 1))
        window_idx = torch.where(window_pos >= 0, index, -1)[None].expand(B, -1, -1)  # [B, S, W]
        gathered, valid = [_gather(keys, window_idx)], [window_idx >= 0]
        if entries is not None:
            if selected is None:  # HCA: all visible entries, -1 past the causal threshold
                N = entries.shape[1]
                w = torch.arange(N, device=q.device)
                entry_idx = torch.where(w < (positions[:, None] + 1) // self.rate, w, -1)[None].expand(B, -1, -1)
            else:
                entry_idx = selected  # [B, S, k]
            gathered.append(_gather(entries, entry_idx))
            valid.append(entry_idx >= 0)
        logits = [torch.einsum("bshd,bskd->bshk", q, k).float().masked_fill(~ok[:, :, None], -math.inf)
                  for k, ok in zip(gathered, valid, strict=True)]
        probs = self._softmax_with_sink(logits)
        return sum((torch.einsum("bshk,bskd->bshd", p.to(k.dtype), k) for p, k in zip(probs, gathered, strict=True)),
                   torch.zeros_like(q))

    def _attend_step(self, q: torch.Tensor, window_keys: torch.Tensor, entries: torch.Tensor | None,
                     selected: torch.Tensor | None) -> torch.Tensor:
        """One new token per sequence (a decode step, "fast" mode): q [B, 1, nH, d] against exactly the keys it
        may use, laid out so that no mask is needed but for the indexer's empty picks: `window_keys` [B, P, d]
        (the window's cached keys and the new one, `V4LayerCache.step_keys`), then the entries: all of them
        without an indexer (after this token's compression every entry there is is complete for it, HCA and
        dense CSA alike), the `selected` ones [B, 1, k] for CSA. One matmul for the logits and one for the output
        over the keys concatenated, the sink joined to the softmax: about 12 ops for the ~80 of the general
        gathered path, the same numbers up to float reassociation (tested against it and the dense reference)."""
        B, _, nH, d = q.shape
        keys, masked = window_keys, None  # [B, K, d]; [B, k] picks that are empty (-1)
        if entries is not None:
            if selected is not None:
                picks = selected[:, 0]  # [B, k]
                entries = _gather(entries, picks[:, None])[:, 0]  # [B, k, d]
                masked = picks < 0
            keys = torch.cat([window_keys, entries], dim=1)  # [B, K, d]
        P, K = window_keys.shape[1], keys.shape[1]
        logits = torch.bmm(q.view(B, nH, d), keys.transpose(1, 2)).float().mul_(self.softmax_scale)  # [B, nH, K]
        if masked is not None:
            logits[..., P:].masked_fill_(masked[:, None], -math.inf)
        sink = self.sinks.float().view(1, nH, 1).expand(B, nH, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)  # [B, nH, K + 1]
        if self.hook_attn_mass.listened():
            mass = torch.stack([probs[..., :P].sum(-1), probs[..., P:K].sum(-1), probs[..., K]], dim=-1)
            self.hook_attn_mass(mass[:, None])  # [B, 1, nH, 3] window / compressed / sink
        return torch.bmm(probs[..., :K].to(keys.dtype), keys).view(B, 1, nH, d)

    def _softmax_with_sink(self, logits: list[torch.Tensor], scaled: bool = False) -> list[torch.Tensor]:
        """softmax over the key groups [B, S, nH, K_i] and the sink logit (value zero), the groups scaled by
        1/sqrt(d) unless `scaled` (their queries carried it); returns each group's probabilities and reports the
        mass per group to hook_attn_mass."""
        B, S, nH, _ = logits[0].shape
        sink = self.sinks.float().view(1, 1, nH, 1).expand(B, S, nH, 1)
        widths = [t.shape[-1] for t in logits]
        groups = logits if scaled else [t * self.softmax_scale for t in logits]
        probs = torch.cat([*groups, sink], dim=-1).softmax(dim=-1)
        parts = list(probs.split([*widths, 1], dim=-1))
        if self.hook_attn_mass.listened():
            window = parts[0].sum(-1)
            compressed = parts[1].sum(-1) if len(widths) > 1 else torch.zeros_like(window)
            self.hook_attn_mass(torch.stack([window, compressed, parts[-1][..., 0]], dim=-1))  # [B, S, nH, 3]
        return parts[:-1]

    def _check_input(self, x: torch.Tensor, positions: torch.Tensor, cache: V4LayerCache | None) -> tuple[int, int]:
        if x.dim() != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"V4 attention input must be [B, S, {self.hidden}], got {tuple(x.shape)}")
        B, S = x.shape[:2]
        if positions.dim() != 1 or positions.shape[0] != S or positions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"positions must be a [S={S}] integer tensor, got {tuple(positions.shape)} "
                             f"{positions.dtype}")
        past = 0
        if cache is not None:
            if cache.layer != self.layer or cache.kind != self.kind:
                raise ValueError(f"layer {self.layer} ({self.kind}) was handed the cache of layer {cache.layer} "
                                 f"({cache.kind})")
            cache.check(B, S)
            past = cache.length
        if positions.device.type == "cpu" and S and not torch.equal(
                positions, torch.arange(past, past + S, dtype=positions.dtype)):
            what = f"the {past} cached tokens" if cache is not None else "the start (no cache)"
            raise ValueError(f"positions must continue from {what}: expected {past}..{past + S - 1}, got "
                             f"{positions.tolist()}")
        return B, S


def _gather(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source [B, T, d], index [B, S, K] (-1 = none, read as row 0 and masked by the caller) -> [B, S, K, d]."""
    B, T, d = source.shape
    if T == 0:  # nothing to gather yet (no entry before the first window closes): every index is -1
        return source.new_zeros(*index.shape, d)
    rows = torch.arange(B, device=source.device)[:, None, None]
    return source[rows, index.clamp(min=0)]


def set_reference_quant(model_or_module: nn.Module, *, kv_fp8: bool, indexer_fp4: bool) -> int:
    """Switch DeepSeek's QAT simulations on or off in every V4Attention under `model_or_module` (itself
    included): `kv_fp8` = FP8 e4m3 (blocks of 64, power-of-two scales) on the non-rope channels of window keys
    and compressed entries; `indexer_fp4` = Hadamard rotation + FP4 e2m1 (blocks of 32) of indexer queries and
    keys. Returns how many attention modules were switched; cached state keeps what it was computed with."""
    found = [m for m in model_or_module.modules() if isinstance(m, V4Attention)]
    if not found:
        raise ValueError(f"set_reference_quant: no V4Attention in {type(model_or_module).__name__}")
    for attn in found:
        indexer = attn.indexer
        if indexer_fp4 and indexer is not None and indexer.head_dim & (indexer.head_dim - 1):
            raise ValueError(f"set_reference_quant: the indexer's Hadamard rotation needs a power-of-two "
                             f"index_head_dim, got {indexer.head_dim} (layer {attn.layer})")
    for attn in found:
        attn.simulate_kv_fp8, attn.simulate_indexer_fp4 = bool(kv_fp8), bool(indexer_fp4)
    return len(found)
