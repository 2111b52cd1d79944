"""tid2eid edits: per V4 hash-routed layer, replacement rows of the table token id -> expert ids.

Design choices:
- An edit is {layer or "all": {token id: [experts]}}; "all" means every hash-routed layer, a layer's own rows win
  over "all"'s for the same token. Rows are checked against the config (a hash layer, token in the vocabulary,
  exactly num_experts_per_tok distinct experts in range) before anything runs.
- The model's buffer is never written: `hash_rows` hands the edited rows to the run as tensors, and the MoE layer
  substitutes them for the tokens they name (`workbench.model.moe`).

Shape legend: r edited rows, k experts per token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from workbench.config import ModelConfig
from workbench.controls.keys import ControlError, LayerKey, _integral, _layer_key, _need_mapping

Rows = Mapping[int, tuple[int, ...]]  # token id -> its experts


def frozen_tid2eid(edits: Mapping[Any, Any]) -> Mapping[LayerKey, Rows]:
    """{layer key: {token: experts}} with int keys and tuple rows, "all" first then layers and tokens in order."""
    _need_mapping(edits, "tid2eid", "an object of layer (or 'all') -> {token id: [expert ids]}")
    out: dict[LayerKey, Rows] = {}
    for key, rows in dict(edits).items():
        layer = _layer_key(key, "tid2eid")
        where = f"tid2eid[{layer!r}]"
        rows = _need_mapping(rows, where, "an object of token id -> [expert ids]")
        table: dict[int, tuple[int, ...]] = {}
        for token_key, experts in rows.items():
            token = _integral(token_key)
            if token is None:
                raise ControlError(f"{where}: token key must be an int (in JSON a string of digits), got {token_key!r}")
            ok = isinstance(experts, Iterable) and not isinstance(experts, (str, bytes, Mapping))
            ids = list(experts) if ok else []
            if not ok or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
                raise ControlError(f"{where}[{token}] must be a list of expert ids, got {experts!r}")
            table[token] = tuple(int(e) for e in ids)
        out[layer] = MappingProxyType(dict(sorted(table.items())))
    ordered: dict[LayerKey, Rows] = {"all": out["all"]} if "all" in out else {}
    ordered.update({k: out[k] for k in sorted(k for k in out if k != "all")})
    return MappingProxyType(ordered)


def check_tid2eid(edits: Mapping[LayerKey, Rows], config: ModelConfig) -> None:
    """Raise ControlError naming the layer, token and fault of the first impossible row."""
    hash_layers = [i for i in range(config.num_hidden_layers) if config.is_hash_layer(i)]
    E, k, V = config.n_routed_experts, config.num_experts_per_tok, config.vocab_size
    for key, rows in edits.items():
        where = f"tid2eid[{key!r}]"
        if key == "all":
            if not hash_layers:
                raise ControlError(f"{where}: this {config.model_type} model has no hash-routed layers")
        elif key not in hash_layers:
            raise ControlError(f"{where}: layer {key} is not hash-routed (no tid2eid table); hash-routed layers: "
                               f"{hash_layers}")
        for token, experts in rows.items():
            if not 0 <= token < V:
                raise ControlError(f"{where}: token {token} is outside the vocabulary 0..{V - 1}")
            if len(experts) != k:
                raise ControlError(f"{where}[{token}]: a row holds num_experts_per_tok={k} experts, got "
                                   f"{len(experts)}: {list(experts)}")
            bad = [e for e in experts if not 0 <= e < E]
            if bad:
                raise ControlError(f"{where}[{token}]: expert(s) {bad} outside 0..{E - 1}")
            if len(set(experts)) != k:
                raise ControlError(f"{where}[{token}]: lists an expert twice: {list(experts)}")


def rows_for(edits: Mapping[LayerKey, Rows], layer: int) -> Rows:
    """The rows that apply to `layer`: "all"'s, then the layer's own (which win for the same token)."""
    return {**edits.get("all", {}), **edits.get(layer, {})}


def hash_rows(rows: Rows, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked rows -> (token ids [r], experts [r, k]) int64 for the MoE layer."""
    tokens = torch.tensor(list(rows), dtype=torch.long, device=device)  # [r]
    experts = torch.tensor([list(e) for e in rows.values()], dtype=torch.long, device=device)  # [r, k]
    return tokens, experts
