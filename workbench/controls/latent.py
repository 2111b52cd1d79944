"""Latent controls: keep only the first r directions of one layer's MLA KV latent c_kv.

Design choices:
- Latent truncation keeps the first r directions of a basis: the raw first r dims of c_kv, or the right singular
  vectors of a calibration run's latents (`svd_basis`; uncentred, so the projection stays linear and absorb-safe).
- A layer's own `LatentControl` replaces the "all" entry as a whole (a rank and a basis only make sense together).

Shape legend: C kv_lora_rank, r kept latent directions, N calibration tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch

from workbench.config import ModelConfig
from workbench.controls.keys import ControlError, _need_mapping, _need_type

LatentBasis = Literal["svd", "raw"]


@dataclasses.dataclass(frozen=True)
class LatentControl:
    """Keep only the first `rank` directions of one layer's KV latent c_kv."""

    rank: int
    basis: LatentBasis = "svd"  # svd: of a calibration run's latents; raw: the first `rank` dims of c_kv

    def __post_init__(self) -> None:
        _need_type(self, "rank", int)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "basis": self.basis}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "latent control") -> LatentControl:
        """From JSON's object {rank, basis}; `where` (e.g. "latent[0]") starts every message, so it names the layer."""
        d = _need_mapping(d, where, "an object {rank, basis}")
        unknown = sorted(set(d) - {"rank", "basis"}, key=str)
        if unknown or "rank" not in d:
            raise ControlError(f"{where} needs 'rank' (and optionally 'basis'); got fields {sorted(d, key=str)}")
        try:
            return cls(d["rank"], d.get("basis", "svd"))
        except ControlError as e:
            raise ControlError(f"{where}: {e}") from None


def svd_basis(latents: torch.Tensor) -> torch.Tensor:
    """Calibration latents [N, C] -> orthonormal basis [C, C], columns by decreasing singular value.

    Uncentred on purpose: truncation must stay a linear map of c_kv. With N < C the trailing columns are an arbitrary
    orthonormal completion (their singular values are zero).
    """
    _, _, vh = torch.linalg.svd(latents.double(), full_matrices=True)  # vh [C, C]
    return vh.T.float()


def _latent_basis(lc: LatentControl, config: ModelConfig, layer: int, svd_bases: Mapping[int, torch.Tensor] | None,
                  dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    C = config.kv_lora_rank
    if lc.basis == "raw":
        return torch.eye(C, dtype=dtype, device=device)[:, : lc.rank]  # [C, r]
    if svd_bases is None or layer not in svd_bases:
        raise ControlError(f"latent for layer {layer}: basis 'svd' needs a calibration run (none given for this layer)")
    full = svd_bases[layer]
    if tuple(full.shape) != (C, C):
        raise ControlError(f"latent for layer {layer}: calibration basis has shape {tuple(full.shape)}, expected {(C, C)}")
    return full[:, : lc.rank].to(dtype=dtype, device=device)  # [C, r]
