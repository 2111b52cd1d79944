"""What a checkpoint must satisfy before and while it loads: its layers and header shapes against the config
(checked before the model is built, so a wrong config costs milliseconds), and finite values in every tensor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from workbench.checkpoint.files import FP4_PACKED_ST, CheckpointError, CheckpointReader
from workbench.checkpoint.layouts import FUSED_RE, LAYER_RE, MTP_RE
from workbench.config import ModelConfig
from workbench.model.transformer import DeepSeekModel


def check_layers(reader: CheckpointReader) -> None:
    """Refuse layer indices the config does not declare, from the tensor names alone (nothing built or read).

    Layers [N, N + num_nextn_predict_layers) are DeepSeek's multi-token-prediction modules (skipped when loading);
    any other index >= N, or a main layer without tensors, means config.json describes another model.
    """
    cfg = reader.config
    N, mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    held = sorted({i for i in map(reader.layer_index, reader.names()) if i is not None})
    beyond = [i for i in held if i >= N + mtp]
    declared = f"{N} layers" + (f" (+ {mtp} multi-token-prediction)" if mtp else "")
    if beyond:
        raise CheckpointError(f"{reader.path}: config.json declares {declared} but the weights hold layer "
                              f"{beyond[0]}{f' (layers {held[0]}..{held[-1]})' if len(held) > 1 else ''}; "
                              "config.json does not match the weights")
    hub_mtp = sorted({int(m.group(1)) for m in map(MTP_RE.match, reader.names()) if m})  # DeepSeek's `mtp.K.*`
    if hub_mtp and hub_mtp[-1] >= mtp:
        raise CheckpointError(f"{reader.path}: config.json declares {declared} but the weights hold "
                              f"multi-token-prediction module mtp.{hub_mtp[-1]}; config.json does not match the weights")
    main = {i for i in held if i < N}
    if len(main) < N:
        lost = next(i for i in range(N) if i not in main)
        raise CheckpointError(f"{reader.path}: config.json declares {declared} but the weights hold {len(main)} "
                              f"(layer {lost} has no tensors); config.json does not match the weights")


def check_shapes(reader: CheckpointReader) -> None:
    """Compare every header shape with what the config implies, before the full model is built.

    Layer j is compared with the same kind of layer (V2/V3: dense or MoE; V4: attention kind, compress rate and
    hash routing) of a meta model of at most a few layers, so the check costs milliseconds whatever
    num_hidden_layers says. A packed FP4 weight holds two values per byte ([N, K/2]). Names the model has no place
    for are left to the load, which reports them all at once.
    """
    cfg = reader.config
    N = cfg.num_hidden_layers
    kind_of, template_cfg = _layer_kinds(cfg)
    with torch.device("meta"):
        template = DeepSeekModel(template_cfg)
    want = {n: tuple(t.shape) for n, t in loadable_tensors(template, template_cfg).items()}
    for name in reader.names():
        stored = reader.ours(name)
        if stored is None or stored.scale:
            continue
        ours = stored.ours
        m = LAYER_RE.match(ours)
        if MTP_RE.match(ours) or (m and int(m.group(1)) >= N):
            continue
        if m:
            ours = f"layers.{kind_of(int(m.group(1)))}.{ours[m.end():]}"
        expect = _expected_shape(ours, stored.expert, want)
        got = reader.shape(name)
        if expect is not None and reader.dtypes.get(name) == FP4_PACKED_ST and reader.is_weight(name):
            expect = (*expect[:-1], expect[-1] // 2)  # two e2m1 codes per byte
        if expect is not None and got != expect:
            raise CheckpointError(f"{reader.weight_map[name]}: {name}: shape {got}, the config implies "
                                  f"{expect}; config.json does not match the weights")


def _layer_kinds(cfg: ModelConfig) -> tuple[Callable[[int], int], ModelConfig]:
    """(layer -> the first layer of its kind, a config of just enough layers to hold one of each kind)."""
    N = cfg.num_hidden_layers
    if cfg.is_v4:
        first: dict[tuple[int, bool], int] = {}
        for i in range(N):
            first.setdefault((cfg.compress_ratio(i), cfg.is_hash_layer(i)), i)
        n = max(first.values()) + 1
        small = cfg.replace(num_hidden_layers=n, compress_ratios=cfg.compress_ratios[:n],
                            num_hash_layers=min(cfg.num_hash_layers, n))
        return (lambda i: first[(cfg.compress_ratio(i), cfg.is_hash_layer(i))]), small
    scan = range(min(N, cfg.first_k_dense_replace + max(cfg.moe_layer_freq, 1) + 1))
    dense = next((i for i in scan if not cfg.is_moe_layer(i)), None)
    moe = next((i for i in scan if cfg.is_moe_layer(i)), None)
    kinds = [i for i in (dense, moe) if i is not None]

    def same_kind(i: int) -> int:
        kind = moe if cfg.is_moe_layer(i) else dense
        assert kind is not None
        return kind

    return same_kind, cfg.replace(num_hidden_layers=max(kinds) + 1)


def _expected_shape(ours: str, expert: int | None, want: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape a checkpoint tensor (our name, expert of a per-expert tensor) must have; None: the model has no
    such tensor (reported at load with every other unexpected name; an expert index past E is checked there too)."""
    if expert is not None:
        stacked = want.get(ours)
        return stacked[1:] if stacked else None  # one expert: [N, K] of the stacked [E, N, K]
    fused = FUSED_RE.match(ours)
    if fused and fused.group(2) == "gate_up_proj":  # transformers' [E, 2I, H]
        gate = want.get(f"layers.{fused.group(1)}.mlp.experts.gate_proj")
        return (gate[0], 2 * gate[1], gate[2]) if gate else None
    return want.get(ours)


# the first non-finite FP8 code of each sign's magnitude: e4m3fn's only one is NaN (S.1111.111); e5m2 is IEEE-like
# (exponent all ones: inf, then NaNs). Read as int8, +non-finite codes are >= it; read as uint8, -non-finite >= 0x80|it.
_FP8_FIRST_NONFINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def check_finite(t: torch.Tensor, hf_name: str, file: Path) -> None:
    """Refuse a floating tensor holding NaN or inf: one NaN weight turns every logit NaN, and one in
    `e_score_correction_bias` sends every token to expert 0 with finite logits, so neither may load quietly.

    Two reductions that propagate NaN and inf (min/max: ~30-50 GB/s on one core, against ~1 GB/s for isfinite),
    so a checkpoint of hundreds of GB pays seconds; FP8 codes are compared as integers, with no float copy.
    """
    if t.numel() == 0:
        return
    if t.dtype == torch.float8_e8m0fnu:  # ue8m0 scales: 2^-127..2^127, and one NaN code (0xFF), no inf
        n_nan, n_inf = int((t.view(torch.uint8) == 0xFF).sum()), 0
        if not n_nan:
            return
    elif t.dtype in _FP8_FIRST_NONFINITE:
        first = _FP8_FIRST_NONFINITE[t.dtype]
        if int(t.view(torch.int8).max()) < first and int(t.view(torch.uint8).max()) < 0x80 | first:
            return
        magnitude = t.view(torch.uint8) & 0x7F
        bad = int((magnitude >= first).sum())
        n_inf = int((magnitude == 0x7C).sum()) if t.dtype == torch.float8_e5m2 else 0
        n_nan = bad - n_inf
    elif t.is_floating_point():
        lo, hi = torch.aminmax(t)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return
        n_nan, n_inf = int(t.isnan().sum()), int(t.isinf().sum())
    else:
        return
    raise CheckpointError(f"{file}: tensor {hf_name} holds {n_nan} NaN and {n_inf} inf of {t.numel()} values; "
                          "the checkpoint is corrupt (or was saved from a diverged run)")


def loadable_tensors(model: DeepSeekModel, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's tensors a checkpoint fills: every parameter, and the persistent buffers it saves (V3's
    `e_score_correction_bias`, V4's `tid2eid`; V2's routing has no bias, so its unused zero buffer is not read)."""
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    saved = set(model.state_dict())
    params.update({n: b for n, b in model.named_buffers() if n in saved and (
        not n.endswith("e_score_correction_bias") or cfg.topk_method == "noaux_tc")})
    return params
