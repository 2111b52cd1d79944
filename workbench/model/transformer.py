"""The DeepSeek decoder: embed -> L blocks -> RMSNorm -> lm_head, each block built by the config's family.

Shape legend: B batch, S new tokens, H hidden, V vocab, n mHC streams (V4's hc_mult).
The family (`workbench.model.families`, keyed by `config.model_type`) assembles each layer: for V2/V3
[RMSNorm -> MLA -> RMSNorm -> MoE or dense MLP] on a plain residual stream. DeepSeek-V4 keeps n residual streams
[B, S, n, H] instead (the embedding copied n times; `V4Block` mixes them around each sublayer), routes its first
layers by token id (so the token ids travel with the residual to every block), and collapses the streams with
`hc_head` before the final norm. Its attention has two paths, "naive" (per formula) and "fast" (gathering only
the chosen keys); the model-level `mode` maps "naive" to "naive" and "absorb" (V2/V3's serving path, the default
of `generate`) to "fast". Its cache is a `V4Cache`.
Parameter names equal the HF checkpoint names (minus the `model.` prefix), except that routed experts are
stacked (`mlp.experts.gate_proj` [E, I, H]); `workbench.checkpoint` holds the one table between the two.
Interventions arrive as an explicit `controls` argument (a `workbench.Controls`, resolved here against the config,
or the {layer: LayerControls} it resolves to), not as state on the modules, so one model serves many sessions and
a run without controls is the untouched path.
`forward_from(layer, resid)` runs the tail of the stack from a stored residual: what a live session re-runs (for
V4 the streams, and the token ids when a hash-routed layer is among those run).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.model.block import Block, LayerControls, ResolvableControls
from workbench.model.cache import LatentKVCache
from workbench.model.costs import estimate_flops, kv_bytes_per_token
from workbench.model.families import family_for
from workbench.model.fp8 import install_fp8_run_hooks
from workbench.model.mla import AttnMode
from workbench.model.norm import RMSNorm
from workbench.model.rope import Rotary
from workbench.model.sampling import check_sampling, sample_next
from workbench.model.v4.attention import V4AttnMode
from workbench.model.v4.block import V4Block
from workbench.model.v4.cache import V4Cache
from workbench.model.v4.hyper import HyperHead
from workbench.probes import ProbeRegistry

RunControls = Mapping[int, LayerControls] | ResolvableControls  # what forward/generate take as `controls`
ModelCache = LatentKVCache | V4Cache  # what `new_cache` returns for the model's family


class DeepSeekModel(nn.Module):
    """A DeepSeek MoE + MLA causal LM. `forward(input_ids)` returns fp32 logits [B, S, V]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.family = family_for(config.model_type)
        self.checkpoint_digest: str | None = None  # set by the loader: which weights these are (replays check it)
        self.checkpoint_source: object | None = None  # set by load_checkpoint: how the files stored it (for saving)
        self.probes = ProbeRegistry()
        self.rotary = Rotary(config)  # MLA's table; V4's attention layers hold their own two tables
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.family.build_block(config, i, self.probes)
                                    for i in range(config.num_hidden_layers))
        self.hc_head = HyperHead(config) if config.is_v4 else None  # V4: collapses the n streams to one
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:  # [V, H] held column-major ([H, V] in memory): a decode step's x @ W^T then streams rows of the
            # memory (2x faster for one token on CPU, the step's largest matmul); loading keeps this layout
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().t().contiguous().t())
        self.hook_resid_final = self.probes.site("hook_resid_final")  # [B, S, H] after the final norm

    # ------------------------------------------------------------------ construction
    def init_weights(self, seed: int = 0) -> DeepSeekModel:
        """Random N(0, initializer_range) weights, norms at 1, bias 0: a deterministic random model.

        V4 also: mHC scales at 1 and bases at 0 (as transformers initialises them: pre ~ 1/2, post ~ 1, mixing near
        uniform), and each hash layer's tid2eid a random set of distinct experts per token.
        """
        gen = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                elif name.endswith(("_hc.scale", "hc_head.hc_scale")):
                    p.fill_(1.0)
                elif name.endswith(("_hc.base", "hc_head.hc_base")):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        E, k = self.config.n_routed_experts, self.config.num_experts_per_tok
        for name, b in self.named_buffers():
            if name.endswith("gate.tid2eid"):
                b.copy_(torch.rand(b.shape[0], E, generator=gen).argsort(dim=-1)[:, :k])  # [vocab, k] distinct
        return self

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0) -> DeepSeekModel:
        return cls(config).init_weights(seed).eval()

    # ------------------------------------------------------------------ forward
    def check_input(self, input_ids: torch.Tensor, past: int = 0) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError("empty input: input_ids has no tokens")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            pos = (input_ids == bad).nonzero()[0].tolist()
            raise ValueError(f"token id {bad} at position {pos} is outside the vocabulary [0, {self.config.vocab_size})")
        end = past + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(f"input reaches position {end}, beyond max_position_embeddings="
                             f"{self.config.max_position_embeddings}")

    def resolve_controls(self, controls: RunControls | None) -> Mapping[int, LayerControls] | None:
        """{layer: LayerControls} for a run: a `workbench.Controls` is validated and resolved against this model's
        config, dtype and device (ControlError naming the bad setting); a resolved mapping passes as it is."""
        if controls is None or isinstance(controls, Mapping):
            return controls
        p = next(self.parameters())
        return controls.resolve(self.config, dtype=p.dtype if p.is_floating_point() else torch.float32,
                                device=p.device, checkpoint=self.checkpoint_digest)

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                mode: AttnMode = "naive", controls: RunControls | None = None) -> torch.Tensor:
        past = cache.length if cache is not None else 0
        self.check_input(input_ids, past)
        x = self.embed_tokens(input_ids)  # [B, S, H]
        if self.config.is_v4:
            x = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()  # [B, S, n, H] n equal streams
        return self.forward_from(0, x, cache=cache, mode=mode, controls=self.resolve_controls(controls),
                                 input_ids=input_ids)

    def forward_from(self, start: int, x: torch.Tensor, *, cache: ModelCache | None = None,
                     mode: AttnMode = "naive", controls: Mapping[int, LayerControls] | None = None,
                     residuals: list[torch.Tensor] | None = None,
                     input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run blocks start.. on `x` [B, S, H] (V4: the streams [B, S, n, H]), the input of block `start`, and the
        head -> fp32 logits [B, S, V].

        Appends each block's input to `residuals` when given. With a cache, every block run writes its latents at
        the cache's current length; blocks before `start` keep what the cache already holds. `input_ids` [B, S]:
        the tokens of x, which V4's hash-routed layers need (without them such a layer raises ValueError).
        """
        if not 0 <= start <= len(self.layers):
            raise ValueError(f"start layer {start} is outside 0..{len(self.layers)}")
        if controls and any(c.fp8_sites is not None for c in controls.values()):
            install_fp8_run_hooks(self)
        past = cache.length if cache is not None else 0
        S = x.shape[1]
        positions = torch.arange(past, past + S, device=x.device)
        if self.config.is_v4:
            x = self._v4_blocks(start, x, positions, cache, mode, controls, residuals, input_ids)
        else:
            if cache is not None and not isinstance(cache, LatentKVCache):
                raise ValueError(f"a {self.config.model_type} model caches in a LatentKVCache (model.new_cache), "
                                 f"got {type(cache).__name__}")
            cos, sin = self.rotary.cos_sin(positions)  # [S, R/2]
            for layer in range(start, len(self.layers)):
                if residuals is not None:
                    residuals.append(x)
                block = cast("Block", self.layers[layer])
                x = block(x, cos, sin, self.rotary, cache, mode, controls.get(layer) if controls else None)
        if cache is not None:
            cache.advance(S)
        if self.hc_head is not None:
            x = self.hc_head(x)  # [B, S, H]
        x = self.hook_resid_final(self.norm(x))
        return self.lm_head(x).float()  # [B, S, V]

    def _v4_blocks(self, start: int, x: torch.Tensor, positions: torch.Tensor, cache: ModelCache | None,
                   mode: AttnMode, controls: Mapping[int, LayerControls] | None,
                   residuals: list[torch.Tensor] | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        """V4's blocks start.. on the streams x [B, S, n, H] -> [B, S, n, H]."""
        c = self.config
        if x.dim() != 4 or x.shape[2:] != (c.hc_mult, c.hidden_size):
            raise ValueError(f"deepseek_v4 blocks take the residual streams [batch, seq, hc_mult={c.hc_mult}, "
                             f"hidden={c.hidden_size}], got shape {tuple(x.shape)}")
        if input_ids is not None and tuple(input_ids.shape) != tuple(x.shape[:2]):
            raise ValueError(f"input_ids {tuple(input_ids.shape)} do not match the streams' [batch, seq] "
                             f"{tuple(x.shape[:2])}")
        if cache is not None and not isinstance(cache, V4Cache):
            raise ValueError(f"a deepseek_v4 model caches in a V4Cache (model.new_cache), got {type(cache).__name__}")
        if mode not in ("naive", "absorb"):
            raise ValueError(f"mode must be 'naive' or 'absorb' (V4: the 'fast' attention path), got {mode!r}")
        v4_mode: V4AttnMode = "naive" if mode == "naive" else "fast"
        for layer in range(start, len(self.layers)):
            if residuals is not None:
                residuals.append(x)
            block = cast("V4Block", self.layers[layer])
            x = block(x, positions, cache.layer(layer) if cache is not None else None, v4_mode,
                      controls.get(layer) if controls else None, input_ids)
        return x

    def new_cache(self, batch: int, max_len: int) -> ModelCache:
        """An empty cache for `batch` sequences of up to `max_len` tokens: V4's `V4Cache`, else MLA's latents."""
        p = next(self.parameters())
        if self.config.is_v4:
            return V4Cache(self.config, batch, max_len, dtype=p.dtype, device=p.device)
        return LatentKVCache(self.config, batch, max_len, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 mode: AttnMode = "absorb", eos_token_id: int | None = None,
                 controls: RunControls | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation on the model's cache; returns prompt + new ids [B, S+n].

        Stops at max_position_embeddings: then n < max_new_tokens, and a UserWarning gives both numbers (the tokens
        generated are still useful, so this does not raise).
        """
        controls = self.resolve_controls(controls)  # once, not per step
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        self.check_input(input_ids)
        B, S = input_ids.shape
        limit = self.config.max_position_embeddings
        total = min(S + max_new_tokens, limit)
        if total - S < max_new_tokens:
            warnings.warn(f"generate: only {total - S} of the {max_new_tokens} new tokens asked for fit: the "
                          f"prompt's {S} tokens plus {max_new_tokens} would pass max_position_embeddings={limit}",
                          UserWarning, stacklevel=3)  # 3: past torch.no_grad's wrapper, at the caller
        cache = self.new_cache(B, total)
        gen = torch.Generator(device=input_ids.device)
        if seed is not None:
            gen.manual_seed(seed)
        out = input_ids
        logits = self(input_ids, cache=cache, mode=mode, controls=controls)[:, -1]  # [B, V]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(total - S):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)  # [B]
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if out.shape[1] >= total or bool(finished.all()):  # the last token needs no forward of its own
                break
            logits = self(nxt[:, None], cache=cache, mode=mode, controls=controls)[:, -1]
        return out

    # ------------------------------------------------------------------ costs
    def kv_bytes_per_token(self, dtype_bytes: int = 2, *, context: int | None = None) -> dict[str, float]:
        return kv_bytes_per_token(self.config, dtype_bytes, context=context)

    def estimate_flops(self, context: int = 1) -> dict[str, float]:
        return estimate_flops(self.config, context)
