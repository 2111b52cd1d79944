"""FP8 on a whole model: which linears are FP8 sites, and switching them on and off per layer and per site.

`enable_fp8(model, layers=..., sites=...)` swaps the chosen `nn.Linear`s for `FP8Linear`s (`workbench.model.fp8_linear`)
that hold the *same* Parameter (state-dict names unchanged, no copy) and flags the stacked `Experts`; `disable_fp8`
swaps them back, so the high-precision baseline is one call away. Every simulated site reports the per-token
relative error ||y_fp8 - y_hp|| / ||y_hp|| through the probe `blocks.{L}.<site>.hook_fp8_rel_error`; the
high-precision product is computed only while someone listens. An FP8 checkpoint loaded with
`load_checkpoint(..., keep_fp8=True)` keeps its e4m3 codes and `weight_scale_inv` in the same modules
(`install_fp8_weights`). The arithmetic (DeepSeek-V3's recipe) is `workbench.model.quant`.

Sites (probe paths below `blocks.{L}.`):
- V2/V3 MLA projections: q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj (`attn.<name>`).
- V4 attention: q_a_proj, q_b_proj, kv_proj, o_a_proj (the grouped output, `FP8GroupedLinear`: each group's
  slice of a token's heads is one activation row, the [g*r, in] weight is quantized in 128x128 blocks as DeepSeek
  stores `wo_a`), o_b_proj. "attn" = the attention projections of either generation.
- "compressor": the V4 CSA/HCA compressor's kv_proj and gate_proj (`attn.compressor.<name>`).
- Lightning indexer (V3.2 `attn.indexer.*`, V4 `attn.compressor.indexer.*`): "indexer_q" (V3.2 wq_b, V4 q_b_proj),
  "indexer_k" (V3.2 wk, V4 its compressor's kv_proj and gate_proj), "indexer_weights" (weights_proj); group
  "indexer" = all three.
- "experts" (routed), "shared_experts", "mlp" (dense layers' MLP).
- Group "v4_checkpoint": the sites DeepSeek-V4's released checkpoints store in FP8 (attention, indexer query,
  shared experts) plus the routed experts (FP4 there: combine with `experts="fp4"`). Its compressors, indexer key
  projections and weights_proj are bf16.
`experts="fp4"` simulates the routed experts as DeepSeek-V4 ships them (`FP4Experts`): FP4 e2m1 weights with a
power-of-two scale per 32 input values (`workbench.model.fp4`), FP8 activations (1x128 tiles, `fmt`/`ue8m0`); its
error probe is the same `blocks.{L}.mlp.experts.hook_fp8_rel_error`.

Per run, without touching the shared model (`Controls(fp8=...)`, read by `Block.forward`):
`dispatch.run_fp8_sites(sites)` sets, for the layer running now and only in the calling thread/task, exactly which
sites compute in FP8. `FP8Linear` and `Experts` read it directly; plain linears get a forward hook
(`install_fp8_run_hooks`, once per module) that swaps in the output of a shadow `FP8Linear` (`FP8GroupedLinear`)
holding the same Parameter, so a controlled run equals a run with `enable_fp8` on those sites.

Shape legend: B batch, S tokens, g output groups, r o_lora_rank, K inputs per group; T tokens, H hidden,
E experts, I expert width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from workbench.config import CSA, ModelConfig
from workbench.model import dispatch
from workbench.model.block import Block
from workbench.model.experts import MLP, PROJS, Experts, experts_forward
from workbench.model.fp4 import FP4_BLOCK, fake_quant_fp4
from workbench.model.fp8_linear import FP8Linear
from workbench.model.moe import MoE
from workbench.model.quant import RUN_FORMAT, FP8Format, act_qdq, rel_error
from workbench.model.v4.attention import GroupedLinear
from workbench.probes import ProbeSite

if TYPE_CHECKING:
    from workbench.model.transformer import DeepSeekModel

ATTN_SITES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")  # V2/V3 MLA
V4_ATTN_SITES = ("q_a_proj", "q_b_proj", "kv_proj", "o_a_proj", "o_b_proj")
INDEXER_SITES = ("indexer_q", "indexer_k", "indexer_weights")
MLP_PROJS = PROJS
SITES = (*ATTN_SITES, "kv_proj", "o_a_proj", "o_b_proj", "compressor", *INDEXER_SITES, "experts", "shared_experts",
         "mlp")
SITE_GROUPS = {"attn": (*ATTN_SITES, "kv_proj", "o_a_proj", "o_b_proj"), "indexer": INDEXER_SITES,
               "v4_checkpoint": (*V4_ATTN_SITES, "indexer_q", "shared_experts", "experts")}
# linears below the attention module: (site, path of their parent under self_attn, their names). V3.2's indexer
# is `self_attn.indexer`; V4's lives in its CSA compressor (transformers' tree).
_NESTED_SITES = (
    ("compressor", "compressor", ("kv_proj", "gate_proj")),
    ("indexer_q", "compressor.indexer", ("q_b_proj",)),
    ("indexer_k", "compressor.indexer", ("kv_proj", "gate_proj")),
    ("indexer_weights", "compressor.indexer.scorer", ("weights_proj",)),
    ("indexer_q", "indexer", ("wq_b",)),
    ("indexer_k", "indexer", ("wk",)),
    ("indexer_weights", "indexer", ("weights_proj",)),
)
ExpertsFormat = Literal["fp8", "fp4"]


def layer_sites_from_config(config: ModelConfig, layer: int) -> set[str]:
    """The SITES that exist in `layer` of a model of this config (what `layer_sites` finds on the model)."""
    if config.is_v4:
        out = {*V4_ATTN_SITES, "experts", "shared_experts"}
        if config.compress_ratio(layer):
            out.add("compressor")
        if config.attention_kind(layer) == CSA:
            out.update(INDEXER_SITES)
        return out
    attn = {p for p in ATTN_SITES if p not in (("q_a_proj", "q_b_proj") if config.q_lora_rank is None else ("q_proj",))}
    if config.model_type == "deepseek_v32":
        attn.update(INDEXER_SITES)
    if not config.is_moe_layer(layer):
        return attn | {"mlp"}
    return attn | {"experts"} | ({"shared_experts"} if config.n_shared_experts > 0 else set())


# ---------------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class _Target:
    layer: int
    site: str  # one of SITES
    parent: nn.Module
    attr: str  # child name in parent (the MoE's "experts" for the routed experts)
    probe: str  # probe site name


def _resolve_sites(sites: Iterable[str] | None) -> set[str]:
    if sites is None:
        return set(SITES)
    if isinstance(sites, str):
        sites = [sites]
    out: set[str] = set()
    for s in sites:
        if s in SITE_GROUPS:
            out.update(SITE_GROUPS[s])
        elif s in SITES:
            out.add(s)
        else:
            raise ValueError(f"unknown FP8 site {s!r}; known: {[*SITE_GROUPS, *SITES]}")
    return out


def resolve_layers(model: DeepSeekModel, layers: Iterable[int] | int | None) -> list[int]:
    L = len(model.layers)
    if layers is None:
        return list(range(L))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in chosen if not 0 <= i < L]
    if bad:
        raise ValueError(f"layers {bad} are outside 0..{L - 1}")
    return chosen


def _targets(model: DeepSeekModel, layers: Iterable[int] | int | None, sites: Iterable[str] | None
             ) -> Iterator[_Target]:
    wanted = _resolve_sites(sites)
    for L in resolve_layers(model, layers):
        block = cast("Block", model.layers[L])
        for proj in SITE_GROUPS["attn"]:
            if proj in wanted and hasattr(block.self_attn, proj):
                yield _Target(L, proj, block.self_attn, proj, f"blocks.{L}.attn.{proj}.hook_fp8_rel_error")
        for site, path, names in _NESTED_SITES:
            parent = _submodule(block.self_attn, path)
            if site not in wanted or parent is None:
                continue
            for name in names:
                if isinstance(getattr(parent, name, None), nn.Linear | FP8Linear):
                    yield _Target(L, site, parent, name, f"blocks.{L}.attn.{path}.{name}.hook_fp8_rel_error")
        mlp = block.mlp
        if isinstance(mlp, MoE):
            if "experts" in wanted:
                yield _Target(L, "experts", mlp, "experts", f"blocks.{L}.mlp.experts.hook_fp8_rel_error")
            if "shared_experts" in wanted and mlp.shared_experts is not None:
                for proj in MLP_PROJS:
                    yield _Target(L, "shared_experts", mlp.shared_experts, proj,
                                  f"blocks.{L}.mlp.shared_experts.{proj}.hook_fp8_rel_error")
        elif isinstance(mlp, MLP) and "mlp" in wanted:
            for proj in MLP_PROJS:
                yield _Target(L, "mlp", mlp, proj, f"blocks.{L}.mlp.{proj}.hook_fp8_rel_error")


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """root's submodule at the dotted `path`, or None where the model has none (an HCA layer has no indexer)."""
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _probe(model: DeepSeekModel, name: str) -> ProbeSite:
    """The probe site `name`, registered on first use (enable/disable cycles must not register it twice)."""
    return model.probes.sites.get(name) or model.probes.site(name)


def _module_name(t: _Target) -> str:
    return t.probe.removesuffix(".hook_fp8_rel_error")


def enable_fp8(model: DeepSeekModel, *, layers: Iterable[int] | int | None = None,
               sites: Iterable[str] | str | None = None, fmt: str = "e4m3", ue8m0: bool = False,
               experts: ExpertsFormat = "fp8") -> list[str]:
    """Simulate FP8 in the chosen linears of the chosen layers (default: all); returns the sites switched on.

    `experts="fp4"`: the routed experts in DeepSeek-V4's FP4 recipe instead (`FP4Experts`; hidden_size and
    moe_intermediate_size must be multiples of 32). Sites already simulated are left as they are (so FP8 weights
    from a checkpoint are never re-quantized; to change the experts' format, disable them first).
    """
    f = FP8Format(fmt, ue8m0).validate()  # before any module changes
    if experts not in ("fp8", "fp4"):
        raise ValueError(f"experts must be 'fp8' or 'fp4', got {experts!r}")
    targets = list(_targets(model, layers, sites))
    if experts == "fp4":
        for t in targets:
            if t.site == "experts":
                FP4Experts.check_shape(getattr(t.parent, t.attr), t.layer)
    switched = []
    for t in targets:
        child = getattr(t.parent, t.attr)
        if isinstance(child, Experts):
            if child.fp8 is None:
                if experts == "fp4":
                    child = FP4Experts.from_experts(child)
                    setattr(t.parent, t.attr, child)
                child.fp8 = f
                child.hook_fp8_rel_error = _probe(model, t.probe)
                switched.append(_module_name(t))
            continue
        if isinstance(child, FP8Linear):
            continue
        new = _fp8_module(child, f)
        new.site = t.site
        new.hook_fp8_rel_error = _probe(model, t.probe)
        setattr(t.parent, t.attr, new)
        switched.append(_module_name(t))
    if not switched and not list(fp8_sites(model)):
        raise ValueError(f"no linear matches layers={layers!r}, sites={sites!r}")
    return switched


def _fp8_module(linear: nn.Module, f: FP8Format) -> FP8Linear:
    """The FP8 stand-in holding the same Parameter: FP8GroupedLinear for V4's grouped output, else FP8Linear."""
    if isinstance(linear, GroupedLinear):
        return FP8GroupedLinear(linear.weight, f, linear.groups)
    return FP8Linear.from_linear(cast(nn.Linear, linear), f)


def disable_fp8(model: DeepSeekModel, *, layers: Iterable[int] | int | None = None,
                sites: Iterable[str] | str | None = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Back to high precision for the chosen sites (default: all); FP8 checkpoint weights are dequantized to
    `dtype`, simulated ones get their untouched Parameter back. Returns the sites switched off."""
    switched = []
    for t in _targets(model, layers, sites):
        child = getattr(t.parent, t.attr)
        if isinstance(child, Experts):
            if child.fp8 is None:
                continue
            if isinstance(child, FP4Experts):
                child = child.to_experts()
                setattr(t.parent, t.attr, child)
            if child.gate_proj_scale_inv is not None:
                for name, w in zip(MLP_PROJS, child.dense_weights(), strict=True):
                    setattr(child, name, nn.Parameter(w.to(dtype)))
                    setattr(child, f"{name}_scale_inv", None)
            child.fp8 = None
            child.hook_fp8_rel_error = None
            child._fp8_cache.clear()
            switched.append(_module_name(t))
            continue
        if isinstance(child, FP8Linear):
            setattr(t.parent, t.attr, child.to_linear(dtype))
            switched.append(_module_name(t))
    return switched


def _site_of(parent_path: str, attr: str) -> str:
    """SITES name of the linear `attr` under `parent_path` (`layers.3.mlp.shared_experts`, `gate_proj`)."""
    for site, path, names in _NESTED_SITES:
        if parent_path.endswith(f"self_attn.{path}") and attr in names:
            return site
    if attr in SITE_GROUPS["attn"]:
        return attr
    return "shared_experts" if parent_path.endswith("shared_experts") else "mlp"


def layer_sites(model: DeepSeekModel, layer: int) -> set[str]:
    """The SITES that exist in `layer` of this model (e.g. no "experts" in a dense layer, no q_proj with q-LoRA)."""
    return {t.site for t in _targets(model, layer, None)}


def install_fp8_run_hooks(model: DeepSeekModel) -> None:
    """Give every plain linear site a forward hook that obeys `RUN_SITES` (idempotent; cheap to call per run).

    The hook does nothing unless a run's controls name its site; then it returns the output of a shadow FP8Linear
    on the same Parameter (built once, kept in the hook's closure, never registered as a submodule).
    """
    for t in _targets(model, None, None):
        linear = getattr(t.parent, t.attr)
        if isinstance(linear, Experts):
            continue  # Experts read RUN_SITES themselves
        if isinstance(linear, FP8Linear) or getattr(linear, "_fp8_run_hook", False):
            continue
        linear.register_forward_hook(_run_hook(t.site))
        linear._fp8_run_hook = True


def _run_hook(site: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor | None]:
    shadow: list[FP8Linear] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        run = dispatch.fp8_run_sites()
        if run is None or site not in run:
            return None
        if not shadow or shadow[0].weight is not module.weight:
            shadow[:] = [_fp8_module(module, RUN_FORMAT)]
            shadow[0].site = site
        return shadow[0](args[0])

    return hook


def fp8_sites(model: DeepSeekModel) -> Iterator[str]:
    """Names (`blocks.{L}.attn.q_a_proj`, `blocks.{L}.mlp.experts`, ...) of the sites now in FP8."""
    for t in _targets(model, None, None):
        m = getattr(t.parent, t.attr)
        if isinstance(m, FP8Linear) or (isinstance(m, Experts) and m.fp8 is not None):
            yield _module_name(t)


def install_fp8_weights(model: DeepSeekModel, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        fmt: FP8Format) -> None:
    """Put FP8 codes + `weight_scale_inv` from a checkpoint into their modules, by our parameter names
    (`layers.3.self_attn.q_a_proj.weight`: [N, K] + [ceil(N/128), ceil(K/128)];
    `layers.3.mlp.experts.gate_proj`: [E, N, K] + [E, ceil(N/128), ceil(K/128)])."""
    experts_done: set[str] = set()
    for name, (q, s) in tensors.items():
        layer = int(name.split(".")[1])
        if ".mlp.experts." in name:
            path, proj = name.rsplit(".", 1)
            experts = model.get_submodule(path)
            assert isinstance(experts, Experts)
            setattr(experts, proj, nn.Parameter(q, requires_grad=False))
            setattr(experts, f"{proj}_scale_inv", s.float())
            if path not in experts_done:
                experts.fp8 = fmt
                experts.hook_fp8_rel_error = _probe(model, f"blocks.{layer}.mlp.experts.hook_fp8_rel_error")
                experts_done.add(path)
            continue
        path = name.removesuffix(".weight")
        parent_path, attr = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        old = getattr(parent, attr)
        codes = nn.Parameter(q, requires_grad=False)
        new = (FP8GroupedLinear(codes, fmt, old.groups, weight_scale_inv=s.float()) if isinstance(old, GroupedLinear)
               else FP8Linear(codes, cast(nn.Linear, old).bias, fmt, weight_scale_inv=s.float()))
        probe = "blocks." + path.removeprefix("layers.").replace(".self_attn.", ".attn.") + ".hook_fp8_rel_error"
        new.hook_fp8_rel_error = _probe(model, probe)
        new.site = _site_of(parent_path, attr)
        setattr(parent, attr, new)
    for path in experts_done:
        experts = model.get_submodule(path)
        assert isinstance(experts, Experts)
        missing = [p for p in MLP_PROJS if getattr(experts, f"{p}_scale_inv") is None]
        if missing:
            raise ValueError(f"{path}: {missing} are not FP8 while the other projections are; "
                             "an Experts module is either all FP8 or not at all")


# ---------------------------------------------------------------------------------------------- V4 blocks
class FP8GroupedLinear(FP8Linear):
    """V4's grouped output projection (`o_a_proj`, `workbench.model.v4.attention.GroupedLinear`) in FP8.

    The weight [g*r, K] is quantized in 128x128 blocks as one matrix (DeepSeek's `wo_a` and its scale); each group's
    slice of a token's heads [K] is one activation row, quantized in 1x128 tiles. Torch path only (the FP8 GEMM
    kernel has no grouped form); its arithmetic equals `FP8Linear`'s per group: both operands dequantized, fp32
    products.
    """

    def __init__(self, weight: torch.Tensor, fmt: FP8Format, groups: int,
                 weight_scale_inv: torch.Tensor | None = None) -> None:
        super().__init__(weight, None, fmt, weight_scale_inv)
        self.groups = groups

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Module:  # type: ignore[override]
        """The plain GroupedLinear back: the same Parameter, or FP8 weights dequantized to `dtype`."""
        with torch.device("meta"):
            plain = GroupedLinear(self.in_features, self.out_features // self.groups, self.groups)
        plain.weight = self.weight if self.weight_scale_inv is None else nn.Parameter(self.dense_weight(dtype))
        return plain

    def _grouped(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsgk,grk->bsgr", x, w.view(self.groups, -1, self.in_features))  # [B, S, g, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, g, K] -> [B, S, g, r]"""
        run = dispatch.fp8_run_sites()
        if run is not None and self.site not in run:  # a run's controls switched this site to high precision
            w = self.weight if self.weight_scale_inv is None else self.dense_weight(torch.float32)
            return self._grouped(x, w.to(x.dtype))
        y = self._grouped(act_qdq(x, self.fmt), self.dense_weight(torch.float32)).to(x.dtype)
        site = self.hook_fp8_rel_error
        if site is not None and site.listened():
            w = self.weight if self.weight_scale_inv is None else self.dense_weight(x.dtype)
            site(rel_error(y.flatten(-2), self._grouped(x, w.to(x.dtype)).flatten(-2)))  # [B, S]
        return y


class FP4Experts(Experts):
    """Routed experts as DeepSeek-V4 ships them: FP4 e2m1 weights, one power-of-two scale per 32 input values
    (`workbench.model.fp4.fake_quant_fp4` along each weight row), FP8 activations in 1x128 tiles (the module's
    `fp8` format) for the input and the SwiGLU output, as DeepSeek's `fp4_gemm` path quantizes them.

    Holds the same Parameters as the `Experts` it replaces (state-dict names unchanged); the FP4 weights are cached
    per weight version. Weights that already are FP4 values (a dequantized FP4 checkpoint) come back unchanged.
    Torch path only.
    """

    def __init__(self, n_experts: int, hidden: int, inner: int, swiglu_limit: float | None = None) -> None:
        super().__init__(n_experts, hidden, inner, swiglu_limit)
        self._fp4_cache: dict[str, tuple[tuple[object, ...], torch.Tensor]] = {}

    @classmethod
    def check_shape(cls, experts: Experts, layer: int) -> None:
        _, inner, hidden = experts.gate_proj.shape
        if hidden % FP4_BLOCK or inner % FP4_BLOCK:
            raise ValueError(f"layer {layer}: FP4 experts need hidden_size ({hidden}) and moe_intermediate_size "
                             f"({inner}) to be multiples of {FP4_BLOCK} (one scale per {FP4_BLOCK} inputs)")

    @classmethod
    def from_experts(cls, experts: Experts) -> FP4Experts:
        E, inner, hidden = experts.gate_proj.shape
        with torch.device("meta"):  # the Parameters come from `experts`: allocate nothing
            new = cls(E, hidden, inner, experts.swiglu_limit)
        _share_weights(new, experts)
        return new

    def to_experts(self) -> Experts:
        E, inner, hidden = self.gate_proj.shape
        with torch.device("meta"):
            plain = Experts(E, hidden, inner, self.swiglu_limit)
        _share_weights(plain, self)
        plain.fp8, plain.hook_fp8_rel_error = self.fp8, self.hook_fp8_rel_error
        return plain

    def fp4_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate [E, I, H], up [E, I, H], down [E, H, I] on the FP4 grid, fp32."""
        out = []
        for name, w in zip(PROJS, self.dense_weights(), strict=True):
            key = (w.data_ptr(), w._version, w.device, w.dtype)  # this weight, as it is now
            cached = self._fp4_cache.get(name)
            if cached is None or cached[0] != key:
                cached = (key, fake_quant_fp4(w.detach().float()))
                self._fp4_cache[name] = cached
            out.append(cached[1])
        return out[0], out[1], out[2]

    def _forward_fp8(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, f: FP8Format,
                     backend: str, site: ProbeSite | None, limit: float | None) -> torch.Tensor:
        y = experts_forward(x, ids, weights, *self.fp4_weights(), act_qdq=partial(act_qdq, f=f),
                            swiglu_limit=limit)  # [T, H]
        if site is not None and site.listened():
            wg, wu, wd = (w.to(x.dtype) for w in self.dense_weights())
            site(rel_error(y, experts_forward(x, ids, weights, wg, wu, wd, swiglu_limit=limit)))  # [T]
        return y


def _share_weights(dst: Experts, src: Experts) -> None:
    """dst takes src's Parameters (and FP8 checkpoint scales) and backend: the same tensors, nothing copied."""
    for name in PROJS:
        setattr(dst, name, getattr(src, name))
        setattr(dst, f"{name}_scale_inv", getattr(src, f"{name}_scale_inv"))
    dst.backend = src.backend
