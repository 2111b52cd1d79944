"""FP8 on a whole model: which linears are FP8 sites, and switching them on and off per layer and per site.

`enable_fp8(model, layers=..., sites=...)` swaps the chosen `nn.Linear`s for `FP8Linear`s (`workbench.model.fp8_linear`)
that hold the *same* Parameter (state-dict names unchanged, no copy) and flags the stacked `Experts`; `disable_fp8`
swaps them back, so the high-precision baseline is one call away. Every simulated site reports the per-token
relative error ||y_fp8 - y_hp|| / ||y_hp|| through the probe `blocks.{L}.<site>.hook_fp8_rel_error`; the
high-precision product is computed only while someone listens. An FP8 checkpoint loaded with
`load_checkpoint(..., keep_fp8=True)` keeps its e4m3 codes and `weight_scale_inv` in the same modules
(`install_fp8_weights`). The arithmetic (DeepSeek-V3's recipe) is `workbench.model.quant`.

Sites: attention projections by name (q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj; "attn" =
all), "experts" (routed), "shared_experts", "mlp" (dense layers' MLP).

Per run, without touching the shared model (`Controls(fp8=...)`, read by `Block.forward`):
`dispatch.run_fp8_sites(sites)` sets, for the layer running now and only in the calling thread/task, exactly which
sites compute in FP8. `FP8Linear` and `Experts` read it directly; plain `nn.Linear`s get a forward hook
(`install_fp8_run_hooks`, once per module) that swaps in the output of a shadow `FP8Linear` holding the same
Parameter, so a controlled run equals a run with `enable_fp8` on those sites.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from workbench.model import dispatch
from workbench.model.block import Block
from workbench.model.experts import MLP, PROJS, Experts
from workbench.model.fp8_linear import FP8Linear
from workbench.model.moe import MoE
from workbench.model.quant import RUN_FORMAT, FP8Format
from workbench.probes import ProbeSite

if TYPE_CHECKING:
    from workbench.model.transformer import DeepSeekModel

ATTN_SITES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJS = PROJS
SITES = (*ATTN_SITES, "experts", "shared_experts", "mlp")
SITE_GROUPS = {"attn": ATTN_SITES}


# ---------------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class _Target:
    layer: int
    site: str  # one of SITES
    parent: nn.Module
    attr: str  # child name in parent; "" for the Experts module itself
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
        for proj in ATTN_SITES:
            if proj in wanted and hasattr(block.self_attn, proj):
                yield _Target(L, proj, block.self_attn, proj, f"blocks.{L}.attn.{proj}.hook_fp8_rel_error")
        mlp = block.mlp
        if isinstance(mlp, MoE):
            if "experts" in wanted:
                yield _Target(L, "experts", mlp.experts, "", f"blocks.{L}.mlp.experts.hook_fp8_rel_error")
            if "shared_experts" in wanted and mlp.shared_experts is not None:
                for proj in MLP_PROJS:
                    yield _Target(L, "shared_experts", mlp.shared_experts, proj,
                                  f"blocks.{L}.mlp.shared_experts.{proj}.hook_fp8_rel_error")
        elif isinstance(mlp, MLP) and "mlp" in wanted:
            for proj in MLP_PROJS:
                yield _Target(L, "mlp", mlp, proj, f"blocks.{L}.mlp.{proj}.hook_fp8_rel_error")


def _probe(model: DeepSeekModel, name: str) -> ProbeSite:
    """The probe site `name`, registered on first use (enable/disable cycles must not register it twice)."""
    return model.probes.sites.get(name) or model.probes.site(name)


def _module_name(t: _Target) -> str:
    return t.probe.removesuffix(".hook_fp8_rel_error")


def enable_fp8(model: DeepSeekModel, *, layers: Iterable[int] | int | None = None,
               sites: Iterable[str] | str | None = None, fmt: str = "e4m3", ue8m0: bool = False) -> list[str]:
    """Simulate FP8 in the chosen linears of the chosen layers (default: all); returns the sites switched on.

    Sites already in FP8 are left as they are (so FP8 weights from a checkpoint are never re-quantized).
    """
    f = FP8Format(fmt, ue8m0).validate()  # before any module changes
    switched = []
    for t in _targets(model, layers, sites):
        if t.attr == "":
            experts = t.parent
            assert isinstance(experts, Experts)
            if experts.fp8 is None:
                experts.fp8 = f
                experts.hook_fp8_rel_error = _probe(model, t.probe)
                switched.append(_module_name(t))
            continue
        child = getattr(t.parent, t.attr)
        if isinstance(child, FP8Linear):
            continue
        new = FP8Linear.from_linear(child, f)
        new.site = t.site
        new.hook_fp8_rel_error = _probe(model, t.probe)
        setattr(t.parent, t.attr, new)
        switched.append(_module_name(t))
    if not switched and not list(fp8_sites(model)):
        raise ValueError(f"no linear matches layers={layers!r}, sites={sites!r}")
    return switched


def disable_fp8(model: DeepSeekModel, *, layers: Iterable[int] | int | None = None,
                sites: Iterable[str] | str | None = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Back to high precision for the chosen sites (default: all); FP8 checkpoint weights are dequantized to
    `dtype`, simulated ones get their untouched Parameter back. Returns the sites switched off."""
    switched = []
    for t in _targets(model, layers, sites):
        if t.attr == "":
            experts = t.parent
            assert isinstance(experts, Experts)
            if experts.fp8 is None:
                continue
            if experts.gate_proj_scale_inv is not None:
                for name, w in zip(MLP_PROJS, experts.dense_weights(), strict=True):
                    setattr(experts, name, nn.Parameter(w.to(dtype)))
                    setattr(experts, f"{name}_scale_inv", None)
            experts.fp8 = None
            experts.hook_fp8_rel_error = None
            experts._fp8_cache.clear()
            switched.append(_module_name(t))
            continue
        child = getattr(t.parent, t.attr)
        if isinstance(child, FP8Linear):
            setattr(t.parent, t.attr, child.to_linear(dtype))
            switched.append(_module_name(t))
    return switched


def _site_of(parent_path: str, attr: str) -> str:
    """SITES name of the linear `attr` under `parent_path` (`layers.3.mlp.shared_experts`, `gate_proj`)."""
    if attr in ATTN_SITES:
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
        if t.attr == "":
            continue  # Experts read RUN_SITES themselves
        linear = getattr(t.parent, t.attr)
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
            shadow[:] = [FP8Linear.from_linear(cast(nn.Linear, module), RUN_FORMAT)]
            shadow[0].site = site
        return shadow[0](args[0])

    return hook


def fp8_sites(model: DeepSeekModel) -> Iterator[str]:
    """Names (`blocks.{L}.attn.q_a_proj`, `blocks.{L}.mlp.experts`, ...) of the sites now in FP8."""
    for t in _targets(model, None, None):
        m = t.parent if t.attr == "" else getattr(t.parent, t.attr)
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
        new = FP8Linear(nn.Parameter(q, requires_grad=False), cast(nn.Linear, old).bias, fmt,
                        weight_scale_inv=s.float())
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
