"""Multi-head Latent Attention (DeepSeek-V2 §2.1) with two interchangeable computations.

Shape legend: B batch, S new tokens, T cached + new tokens, H hidden, nH heads, D qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, C kv_lora_rank (latent width).

- `naive`: expand per-head K/V from the latent with kv_b_proj, then ordinary attention. Simple, the reference.
- `absorb`: fold kv_b_proj's key half into the query and its value half into the output, so attention runs over
  the cached latent [T, C] and the shared rope key [T, R] directly; what a decoder does, since nothing per-head
  is ever materialised for the history.
Both give the same numbers up to float reassociation; a test holds them to it.
An optional `latent_basis` [C, r] (orthonormal columns) projects c_kv onto its span before it is cached or used:
the latent-rank intervention. Being linear, the projection works the same in both modes.
An optional `indexer` (DeepSeek-V3.2's `LightningIndexer`, built by the family) picks k keys per query from the
query latent c_q [B, S, Q]; keys outside a query's selection are masked in both modes. An absorbed decode step on
the kernel attends over just the k selected rows [B, k, C + R] instead. Without an indexer, or when it keeps every
causal key, the computation is V2/V3's, op for op.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.model import dispatch
from workbench.model.attention import attend, attend_latent_step
from workbench.model.cache import LatentKVCache
from workbench.model.indexer import LightningIndexer
from workbench.model.norm import RMSNorm
from workbench.model.rope import Rotary
from workbench.probes import ProbeRegistry
from workbench_kernels._runtime import ACT_DTYPES

AttnMode = Literal["naive", "absorb"]


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, probes: ProbeRegistry,
                 indexer: LightningIndexer | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        self.backend: dispatch.Backend = "auto"  # decode-step attention (kind "attn_decode"), see dispatch
        H, nH = config.hidden_size, config.num_attention_heads
        bias = config.attention_bias
        self.q_lora_rank = config.q_lora_rank
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nH * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, nH * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, nH * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nH * config.v_head_dim, H, bias=bias)
        if indexer is not None and self.q_lora_rank is None:
            raise ValueError("an indexer reads the query latent c_q: MLA needs q_lora_rank set to carry one")
        self.indexer = indexer  # a submodule (`self_attn.indexer.*`) only when given: V2/V3 state dicts unchanged
        self.hook_kv_latent = probes.site(f"blocks.{layer}.attn.hook_kv_latent")  # [B, S, C] post-norm c_kv
        self.hook_k_pe = probes.site(f"blocks.{layer}.attn.hook_k_pe")  # [B, S, R] after RoPE
        self.hook_z = probes.site(f"blocks.{layer}.attn.hook_z")  # [B, S, nH, V] per-head output before o_proj

    def project_q(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, S, H] -> (q [B, S, nH*(D+R)], the query latent c_q [B, S, Q]; None without q-LoRA)."""
        if self.q_lora_rank is None:
            return self.q_proj(x), None
        c_q = self.q_a_layernorm(self.q_a_proj(x))  # [B, S, Q]
        return self.q_b_proj(c_q), c_q

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: Rotary,
                cache: LatentKVCache | None, mode: AttnMode, latent_basis: torch.Tensor | None = None, *,
                index_topk: int | None = None) -> torch.Tensor:
        """`index_topk`: this run's indexer budget (V3.2; None: the config's)."""
        B, S, _ = x.shape
        nH, D, R, C = self.n_heads, self.nope_dim, self.rope_dim, self.latent_dim
        q, c_q = self.project_q(x)
        q = q.view(B, S, nH, D + R)  # [B, S, nH, D+R]
        q_nope, q_pe = q.split([D, R], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)  # [B, S, C+R]
        c_kv, k_pe = kv.split([C, R], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, S, C]
        if latent_basis is not None:
            c_kv = (c_kv @ latent_basis) @ latent_basis.T  # [B, S, r] -> [B, S, C], in the span of the basis
        c_kv = self.hook_kv_latent(c_kv)  # [B, S, C]
        q_pe = rotary.apply(q_pe, cos, sin)  # [B, S, nH, R]
        k_pe = self.hook_k_pe(rotary.apply(k_pe, cos, sin))  # [B, S, R]
        past = 0
        if cache is not None:
            past = cache.length
            c_kv, k_pe = cache.append(self.layer, c_kv, k_pe)  # [B, T, C], [B, T, R]
        T = c_kv.shape[1]
        selected = None  # [B, S, k] key positions per query (-1: none); None: every causal key
        if self.indexer is not None and c_q is not None:
            selected = self.indexer(x, c_q, cos, sin, cache, topk=index_topk)
        step = mode == "absorb" and S == 1 and cache is not None  # an absorbed decode step
        on_kernel = step and self._decode_on_kernel(q_nope, q_pe, c_kv, k_pe)  # mla_decode runs it
        if step and selected is None and q_nope.dtype == torch.float32 and not on_kernel:
            z = self._latent_step(q_nope, q_pe, c_kv, k_pe)  # [B, 1, nH, V]: a decode step, every key causal
            return self.o_proj(self.hook_z(z.to(x.dtype)).reshape(B, S, nH * self.v_dim))
        # which keys a query sees: causal over the whole history (new token s sits at position past + s), None for
        # causal from the start; with a selection [B, 1, S, T] causal and selected
        allowed = None if past == 0 else torch.ones(S, T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        if selected is not None:
            allowed = selection_mask(selected, T, past)
        if mode == "naive":
            kv_full = self.kv_b_proj(c_kv).view(B, T, nH, D + self.v_dim)  # [B, T, nH, D+V]
            k_nope, v = kv_full.split([D, self.v_dim], dim=-1)
            query = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, nH, D+R]
            key = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, nH, R)], dim=-1)  # [B, T, nH, D+R]
            z = self._attend(query, key, v, allowed)  # [B, S, nH, V]
        elif mode == "absorb":
            w_uk, w_uv = self._absorbed_weights(q_nope.dtype)  # [nH, D, C], [nH, V, C]
            q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [B, S, nH, C]
            query = torch.cat([q_latent, q_pe], dim=-1)  # [B, S, nH, C+R]
            key = torch.cat([c_kv, k_pe], dim=-1)[:, :, None]  # [B, T, 1, C+R]: one key shared by all heads
            if on_kernel:  # (q_latent has q_nope's dtype: the weight is taken in it)
                if selected is None:
                    o_latent = self._decode_kernel(q_latent, q_pe, c_kv, k_pe)  # [B, 1, nH, C]
                else:  # only the selected rows: [B, k, C], [B, k, R], their count per sequence [B]
                    o_latent = self._decode_kernel(q_latent, q_pe, *gather_selected(c_kv, k_pe, selected[:, 0]))
            else:
                o_latent = self._attend(query, key, c_kv[:, :, None], allowed)  # [B, S, nH, C]
            z = torch.einsum("bshc,hvc->bshv", o_latent, w_uv)  # [B, S, nH, V]
        else:
            raise ValueError(f"attention mode must be 'naive' or 'absorb', got {mode!r}")
        z = self.hook_z(z.to(x.dtype))
        return self.o_proj(z.reshape(B, S, nH * self.v_dim))

    def _latent_step(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                     k_pe: torch.Tensor) -> torch.Tensor:
        """An absorbed fp32 decode step on torch (the hot loop of `generate` on CPU): q_nope [B, 1, nH, D],
        q_pe [B, 1, nH, R], this layer's history c_kv [B, T, C] / k_pe [B, T, R] -> z [B, 1, nH, V].
        The general absorbed path's einsums and concatenated key as head-batched matmuls (`attend_latent_step`);
        the same numbers up to float reassociation (tests hold decode steps to the general path)."""
        w_uk, w_uv = self._absorbed_weights(q_nope.dtype)  # [nH, D, C], [nH, V, C]
        q_latent = torch.bmm(q_nope[:, 0].transpose(0, 1), w_uk).transpose(0, 1)  # [B, nH, C]
        o_latent = attend_latent_step(q_latent, q_pe[:, 0], c_kv, k_pe, self.softmax_scale)  # [B, nH, C]
        return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)[:, None]  # [B, 1, nH, V]

    def _absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's key and value halves per head, w_uk [nH, D, C] and w_uv [nH, V, C] (views of its weight)."""
        w_kv_b = _dense_weight(self.kv_b_proj, dtype).view(self.n_heads, self.nope_dim + self.v_dim, self.latent_dim)
        return w_kv_b[:, : self.nope_dim], w_kv_b[:, self.nope_dim :]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: torch.Tensor | None) -> torch.Tensor:
        return attend(q, k, v, causal, self.softmax_scale)

    def _decode_on_kernel(self, *tensors: torch.Tensor) -> bool:
        """Whether this absorbed decode step runs `mla_decode` (the backend of kind "attn_decode")."""
        dtypes = {t.dtype for t in tensors}
        supported = len(dtypes) == 1 and dtypes <= set(ACT_DTYPES)
        why = f"mla_decode needs one fp32/bf16/fp16 dtype for query and cache, got {sorted(map(str, dtypes))}"
        return dispatch.use_triton(self.backend, tensors[0].device, "attn_decode", supported, why)

    def _decode_kernel(self, q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                       k_pe: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """One new token over the cached history on the kernel: q_latent [B, 1, nH, C], q_pe [B, 1, nH, R],
        c_kv [B, T, C], k_pe [B, T, R] (of which the first `lengths` [B] rows count; default all T)
        -> o_latent [B, 1, nH, C]."""
        B, T = c_kv.shape[:2]
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int32, device=c_kv.device)
        out = dispatch.launcher("mla_decode").mla_decode(q_latent[:, 0].contiguous(), q_pe[:, 0].contiguous(), c_kv,
                                                          k_pe, lengths, self.softmax_scale)
        return out[:, None]


def selection_mask(selected: torch.Tensor, T: int, past: int) -> torch.Tensor:
    """Which keys each query may attend: selected [B, S, k] positions (-1: none) -> [B, 1, S, T] bool, True where
    the key is selected and not in the query's future (query s sits at position past + s)."""
    B, S, _ = selected.shape
    slots = selected.masked_fill(selected < 0, T)  # -1 -> a spare column T, dropped below
    picked = torch.zeros(B, S, T + 1, dtype=torch.bool, device=selected.device).scatter_(-1, slots, True)
    causal = torch.ones(S, T, dtype=torch.bool, device=selected.device).tril(diagonal=past)  # [S, T]
    return (picked[..., :T] & causal)[:, None]


def gather_selected(c_kv: torch.Tensor, k_pe: torch.Tensor, selected: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's selected history: c_kv [B, T, C], k_pe [B, T, R], selected [B, k] (-1: none) ->
    (c_kv rows [B, k, C], k_pe rows [B, k, R], valid rows per sequence [B] int32); valid rows come first.
    The step's query is the last position, so every cached row is causal."""
    T = c_kv.shape[1]
    valid = selected >= 0  # [B, k]
    rows = selected.masked_fill(~valid, T).sort(dim=-1).values.clamp(max=T - 1)  # [B, k] valid first
    c_rows = c_kv.gather(1, rows[..., None].expand(-1, -1, c_kv.shape[-1]))  # [B, k, C]
    pe_rows = k_pe.gather(1, rows[..., None].expand(-1, -1, k_pe.shape[-1]))  # [B, k, R]
    return c_rows.contiguous(), pe_rows.contiguous(), valid.sum(dim=-1).to(torch.int32)


def _dense_weight(linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The weight a linear multiplies by; an FP8Linear's dequantized codes (absorbed einsums bypass its GEMM)."""
    dense = getattr(linear, "dense_weight", None)
    return dense(dtype) if callable(dense) else linear.weight
