"""What each query of the live prompt reads in every attention layer, straight from the model's probes.

Per attention layer (V4 / V3.2; V2 and V3 run dense MLA, nothing is selected):
- kind: "window" (V4 ratio 0: the sliding window only), "CSA" (ratio 4: window + the indexer's top-k compressed
  entries), "HCA" (other ratios: window + every complete entry), "V3.2 sparse" (MLA over the indexer's top-k keys).
- Spans: entry w of a rate-m layer is complete, and visible to query t, once w < (t+1) // m. HCA pools its own
  window w·m .. w·m+m-1; CSA pools 2m slots (compressor.py): the a-halves of window w-1 and the b-halves of window
  w, so entry w spans max(0, (w-1)·m) .. w·m+m-1, [lo, own_lo, hi] with own_lo = w·m. V3.2 "entries" are single
  key tokens.
- Selected entries (best first) and their index scores from hook_index_selected / hook_index_scores; layers that
  read every complete entry (HCA, or a CSA layer under a dense control) send no lists.
- V4's attention mass per head on the window, the compressed entries and the sink (hook_attn_mass, sums to 1).
The live controls (an index_topk, a shorter window, dense or no compressed branch) change what is captured.

Bound: the capture runs on the first n = min(S, max_tokens, PAYLOAD_NUMBERS / numbers per token) tokens (causal,
so those queries read exactly what they read in the whole prompt): O(n·(k + 3·nH)) numbers per layer.
Shape legend: S prompt tokens, n tokens shown, nH heads, N entries, k index_topk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workbench.config import CSA, CSA_RATIO, KIND_NAMES, ModelConfig
from workbench.controls import Controls
from workbench.model.indexer import selected_scores
from workbench.widgets.live import LiveSession

DEFAULT_MAX_TOKENS = 256
PAYLOAD_NUMBERS = 2_000_000  # selections + scores + mass across all layers, before the token cap bites
DENSE_MESSAGE = ("{name} ({model_type}) runs dense MLA: every query attends to every earlier token, there is no "
                 "sliding window, no compressed entry and no indexer selection to show. The sparse-attention view "
                 "needs a DeepSeek-V3.2 or V4 model (e.g. load_model('tiny-v4-random')).")


def is_sparse(config: ModelConfig) -> bool:
    """Whether the model selects what its queries read (V4, or V3.2's lightning indexer)."""
    return config.is_v4 or config.model_type == "deepseek_v32"


def dense_message(name: str, config: ModelConfig) -> str:
    return DENSE_MESSAGE.format(name=name, model_type=config.model_type)


def entry_spans(ratio: int, n_entries: int) -> list[list[int]]:
    """[lo, own_lo, hi] tokens of each compressed entry of a rate-`ratio` layer (see the module docstring)."""
    overlap = ratio == CSA_RATIO
    return [[max(0, (w - 1) * ratio) if overlap else w * ratio, w * ratio, w * ratio + ratio - 1]
            for w in range(n_entries)]


def shown_tokens(config: ModelConfig, S: int, max_tokens: int) -> int:
    """n: the prompt cut to max_tokens and to the payload budget."""
    per_token = 0
    for layer in range(config.num_hidden_layers):
        if config.is_v4:
            per_token += 3 * config.num_attention_heads
            if config.attention_kind(layer) == CSA:
                per_token += 2 * config.index_topk
        else:
            per_token += 2 * config.index_topk
    return max(1, min(S, max_tokens, PAYLOAD_NUMBERS // max(1, per_token)))


def _round(values: np.ndarray) -> list[Any]:
    """Probabilities to 4 decimals (what the bars can show)."""
    return np.round(values.astype(np.float64), 4).tolist()


def _significant(values: np.ndarray) -> list[float]:
    """Index scores to 5 significant digits: they can be ~1e-3 on a random model, where decimals would erase them."""
    return [float(f"{v:.5g}") for v in values.tolist()]


def _layer_sites(config: ModelConfig, layer: int) -> list[str]:
    sites = []
    if config.is_v4:
        sites.append(f"blocks.{layer}.attn.hook_attn_mass")
    if config.model_type == "deepseek_v32" or (config.is_v4 and config.attention_kind(layer) == CSA):
        sites += [f"blocks.{layer}.attn.hook_index_scores", f"blocks.{layer}.attn.hook_index_selected"]
    return sites


@torch.no_grad()
def attention_reads(live: LiveSession, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                    controls: Controls | None = None) -> dict[str, Any]:
    """The view's data for the live prompt under `controls` (default: the session's current ones), JSON-ready:
    {model, family, message, n, n_prompt, capped, text[n], heads, layers: [per-layer dict]} (see the module
    docstring; `message` explains a dense model, whose `layers` is empty)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    cfg, name = live.config, live.loaded.name
    ids = live.input_ids  # [1, S]
    S = int(ids.shape[1])
    base: dict[str, Any] = {"model": name, "n_prompt": S, "heads": cfg.num_attention_heads}
    if not is_sparse(cfg):
        return {**base, "family": "dense", "message": dense_message(name, cfg), "n": 0, "capped": False,
                "text": [], "layers": []}
    controls = live.controls() if controls is None else controls
    n = shown_tokens(cfg, S, max_tokens)
    sites = [s for layer in range(cfg.num_hidden_layers) for s in _layer_sites(cfg, layer)]
    got = {site: v.float() for site, v in live.probe_run(sites, controls, tokens=n).items()}
    text = [live.tokenizer.token_text(int(t)) for t in ids[0, :n].tolist()]
    layers = [_layer(cfg, layer, n, got, controls) for layer in range(cfg.num_hidden_layers)]
    return {**base, "family": "v4" if cfg.is_v4 else "v32", "message": "", "n": n, "capped": n < S, "text": text,
            "layers": layers}


def _layer(cfg: ModelConfig, layer: int, n: int, got: dict[str, torch.Tensor], controls: Controls) -> dict[str, Any]:
    ac = controls.attention_for(layer, cfg)
    prefix = f"blocks.{layer}.attn."
    out: dict[str, Any] = {"layer": layer, "control": ac.to_dict() if ac is not None else {}}
    selected = got.get(prefix + "hook_index_selected")  # [1, n, k] (-1 none), absent when the indexer did not run
    if cfg.is_v4:
        ratio = cfg.compress_ratio(layer)
        compressed = ratio > 0 and not (ac is not None and ac.compressed is False)
        window = 0 if ac is not None and ac.window is False else (
            ac.sliding_window if ac is not None and ac.sliding_window is not None else cfg.sliding_window)
        N = n // ratio if compressed else 0
        mass = got[prefix + "hook_attn_mass"][0]  # [n, nH, 3]
        out.update(kind=KIND_NAMES[cfg.attention_kind(layer)], ratio=ratio, window=window, n_entries=N,
                   compressed=compressed, overlap=ratio == CSA_RATIO, spans=entry_spans(ratio, N) if compressed else [],
                   reads_all=compressed and selected is None, mass=_round(mass.reshape(-1).numpy()))
    else:  # V3.2: the indexer picks key tokens of MLA
        out.update(kind="V3.2 sparse", ratio=1, window=0, n_entries=n, compressed=True, overlap=False,
                   spans=[[s, s, s] for s in range(n)], reads_all=selected is None, mass=None)
    dense = bool(ac is not None and ac.dense)
    out["dense"] = dense
    out["topk"] = None if selected is None or dense else (
        ac.index_topk if ac is not None and ac.index_topk is not None else cfg.index_topk)
    if selected is not None:
        scores = got[prefix + "hook_index_scores"][0]  # [n, N]
        sel = selected[0].long()  # [n, k]
        chosen = [[int(w) for w in row if w >= 0] for row in sel.tolist()]
        values = selected_scores(scores, sel).numpy()  # [n, k], NaN at -1
        out["selected"] = chosen
        out["scores"] = [_significant(values[t, : len(row)]) for t, row in enumerate(chosen)]
    else:
        out["selected"] = out["scores"] = None
    return out
