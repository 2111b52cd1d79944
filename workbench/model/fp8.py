"""FP8 simulation, DeepSeek-V3's recipe, on any device; switched on per linear and per layer.

Recipe (V3 report §3.3): activations quantized per token in 1x128 tiles, weights in 128x128 blocks, e4m3 codes with
fp32 scales (or power-of-two "ue8m0" scales, V3.1), products accumulated in fp32. The torch backend dequantizes both
operands to fp32 and multiplies (`fp8_gemm_ref`), so its FP8 error equals the GPU kernel's up to accumulation order;
the triton backend runs `act_quant` + `fp8_gemm` (see `workbench.model.backend`).

`enable_fp8(model, layers=..., sites=...)` swaps the chosen `nn.Linear`s for `FP8Linear`s that hold the *same*
Parameter (state-dict names unchanged, no copy) and flags the stacked `Experts`; `disable_fp8` swaps them back, so
the high-precision baseline is one call away. Every simulated site reports the per-token relative error
||y_fp8 - y_hp|| / ||y_hp|| through the probe `blocks.{L}.<site>.hook_fp8_rel_error`; the high-precision product
is computed only while someone listens. An FP8 checkpoint loaded with `load_checkpoint(..., keep_fp8=True)` keeps
its e4m3 codes and `weight_scale_inv` in the same modules (`install_fp8_weights`).

Sites: attention projections by name (q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj; "attn" =
all), "experts" (routed), "shared_experts", "mlp" (dense layers' MLP).

Per run, without touching the shared model (`Controls(fp8=...)`, read by `Block.forward`): `run_fp8_sites(sites)`
sets, for the layer running now and only in the calling thread/task (a ContextVar), exactly which sites compute in
FP8; the others compute in high precision, whatever `enable_fp8` did. `FP8Linear` and `Experts` read it directly;
plain `nn.Linear`s get a forward hook (`install_fp8_run_hooks`, once per module) that swaps in the output of a
shadow `FP8Linear` holding the same Parameter, so a controlled run equals a run with `enable_fp8` on those sites.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from workbench.model.moe import FP8_RUN_SITES, MLP, Experts, MoE
from workbench.model.moe import run_fp8_sites as run_fp8_sites  # re-exported: the run scope of FP8 controls
from workbench.probes import ProbeSite
from workbench_kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from workbench_kernels.fp8_quant import act_dequant_ref, act_quant, act_quant_ref, weight_dequant_ref, weight_quant_ref

if TYPE_CHECKING:
    from workbench.model.transformer import Block, DeepSeekModel

BLOCK = 128
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
ATTN_SITES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
SITES = (*ATTN_SITES, "experts", "shared_experts", "mlp")
SITE_GROUPS = {"attn": ATTN_SITES}
Backend = Literal["auto", "torch", "triton"]
RUN_SITES = FP8_RUN_SITES  # the run-scoped FP8 sites of the layer running now (defined in moe.py, Triton-free)


@dataclass(frozen=True)
class FP8Format:
    """How a site is quantized: code format (DeepSeek-V3: e4m3 everywhere) and whether scales are powers of two."""

    fmt: str = "e4m3"
    ue8m0: bool = False


RUN_FORMAT = FP8Format()  # what a control switches a high-precision site to: DeepSeek-V3's e4m3, fp32 scales


def act_qdq(x: torch.Tensor, f: FP8Format) -> torch.Tensor:
    """Quantize-dequantize activations per token in 1x128 tiles: [..., K] -> fp32 [..., K]."""
    return act_dequant_ref(*act_quant_ref(x, BLOCK, f.fmt, f.ue8m0), BLOCK)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token ||y - ref|| / ||ref|| over the last dim: [..., N] -> [...] fp32."""
    ref = ref.float()
    return (y.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)


def _stored_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


class FP8Linear(nn.Module):
    """A linear in DeepSeek-V3's FP8 recipe. `weight` is either the high-precision Parameter of the linear it
    replaced (quantized on first use and cached per weight version) or, from an FP8 checkpoint, e4m3 codes with
    their `weight_scale_inv` [ceil(N/128), ceil(K/128)]: the same names as DeepSeek's checkpoints."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_scale_inv: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: FP8Format,
                 weight_scale_inv: torch.Tensor | None = None) -> None:
        super().__init__()
        if _stored_fp8(weight) != (weight_scale_inv is not None):
            raise ValueError("FP8 weights need their weight_scale_inv, and only FP8 weights take one")
        self.out_features, self.in_features = weight.shape
        self.fmt = fmt
        self.backend: Backend = "auto"
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.register_parameter("bias", bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias))
        self.register_buffer("weight_scale_inv", weight_scale_inv)
        self.hook_fp8_rel_error: ProbeSite | None = None
        self.site = ""  # which of SITES this linear is (set by enable_fp8 / install_fp8_weights), for run controls
        self._cache: tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: FP8Format) -> FP8Linear:
        return cls(linear.weight, linear.bias, fmt)  # the same Parameters: nothing copied

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """The plain linear back: the same Parameter, or FP8 weights dequantized to `dtype`."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight if self.weight_scale_inv is None else nn.Parameter(self.dense_weight(dtype))
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, K], scale_inv [ceil(N/128), ceil(K/128)] fp32): stored ones, or the cached quantization."""
        if self.weight_scale_inv is not None:
            return self.weight, self.weight_scale_inv
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, w.dtype, self.fmt)
        if self._cache is None or self._cache[0] != key:
            q, s = weight_quant_ref(w.detach(), BLOCK, self.fmt.fmt, self.fmt.ue8m0)
            self._cache = (key, q, s)
        return self._cache[1], self._cache[2]

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the FP8 GEMM effectively multiplies by, [N, K]; absorbed-MLA einsums use it directly."""
        return weight_dequant_ref(*self.quantized_weight(), BLOCK, out_dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from workbench.model.backend import resolve_backend

        run = RUN_SITES.get()
        if run is not None and self.site not in run:  # a run's controls switched this site to high precision
            w = self.weight if self.weight_scale_inv is None else self.dense_weight(torch.float32).to(x.dtype)
            return F.linear(x, w, self.bias)
        q, s = self.quantized_weight()
        if resolve_backend(self.backend, x.device, "fp8_linear", supported=True) == "triton":
            xq, xs = act_quant(x, BLOCK, self.fmt.fmt, self.fmt.ue8m0)  # [..., K], [..., ceil(K/128)]
            y = fp8_gemm(xq, xs, q, s, out_dtype=x.dtype)  # [..., N]
        else:
            xq, xs = act_quant_ref(x, BLOCK, self.fmt.fmt, self.fmt.ue8m0)
            y = fp8_gemm_ref(xq, xs, q, s, out_dtype=x.dtype)  # [..., N]
        if self.bias is not None:
            y = y + self.bias
        site = self.hook_fp8_rel_error
        if site is not None and site.listened():
            w = self.weight if self.weight_scale_inv is None else self.dense_weight(x.dtype)
            site(rel_error(y, F.linear(x, w, self.bias)))  # [B, S] or [T]
        return y

    def extra_repr(self) -> str:
        kept = ", fp8 weights" if self.weight_scale_inv is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt.fmt}, "
                f"ue8m0={self.fmt.ue8m0}, backend={self.backend}{kept}")


# ---------------------------------------------------------------------------------------------- experts
def _dequant_stacked(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[E, N, K] codes x [E, ceil(N/128), ceil(K/128)] scales -> fp32 [E, N, K]."""
    _, N, K = q.shape
    return q.float() * s.repeat_interleave(BLOCK, 1)[:, :N].repeat_interleave(BLOCK, 2)[:, :, :K]


def expert_weights_fp8(experts: Experts, fmt: FP8Format | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(codes [E, N, K], scale_inv [E, ceil(N/128), ceil(K/128)])] for gate, up, down; quantized per expert in
    128x128 blocks (cached per weight version and format), or the stored ones of an FP8 checkpoint."""
    f = fmt if fmt is not None else experts.fp8
    assert f is not None
    out = []
    for name in MLP_PROJS:
        w: torch.Tensor = getattr(experts, name)
        stored = getattr(experts, f"{name}_scale_inv")
        if stored is not None:
            out.append((w, stored))
            continue
        key = (w.data_ptr(), w._version, w.device, w.dtype, f)
        cached = experts._fp8_cache.get(name)
        if cached is None or cached[0] != key:
            pairs = [weight_quant_ref(w[e].detach(), BLOCK, f.fmt, f.ue8m0) for e in range(w.shape[0])]
            cached = (key, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
            experts._fp8_cache[name] = cached
        out.append((cached[1], cached[2]))
    return out


def experts_dense_weights(experts: Experts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The high-precision weights [E, ...]: the Parameters, or an FP8 checkpoint's dequantized."""
    if experts.gate_proj_scale_inv is None:
        return experts.gate_proj, experts.up_proj, experts.down_proj
    g, u, d = (_dequant_stacked(q, s) for q, s in expert_weights_fp8(experts))
    return g, u, d


def experts_forward_fp8(experts: Experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        fmt: FP8Format) -> torch.Tensor:
    """The torch FP8 path of the routed experts with an explicit format (a run's control): x [T, H] -> [T, H]."""
    from functools import partial

    from workbench.model.moe import experts_forward

    (qg, sg), (qu, su), (qd, sd) = expert_weights_fp8(experts, fmt)
    return experts_forward(x, ids, weights, _dequant_stacked(qg, sg), _dequant_stacked(qu, su),
                           _dequant_stacked(qd, sd), act_qdq=partial(act_qdq, f=fmt))


def experts_forward_hp(experts: Experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed experts in high precision (FP8 checkpoint weights dequantized): x [T, H] -> [T, H]."""
    from workbench.model.moe import experts_forward

    wg, wu, wd = experts_dense_weights(experts)
    return experts_forward(x, ids, weights, wg, wu, wd)


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


def _resolve_layers(model: DeepSeekModel, layers: Iterable[int] | int | None) -> list[int]:
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
    for L in _resolve_layers(model, layers):
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
    f = FP8Format(fmt, ue8m0)
    act_quant_ref(torch.zeros(1, 1), BLOCK, fmt)  # validates fmt before any module changes
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
                for name, w in zip(MLP_PROJS, experts_dense_weights(experts), strict=True):
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
        run = RUN_SITES.get()
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
