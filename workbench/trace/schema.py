"""The trace schema: one table of variables shared by the recorder, the store, `open_trace` and the docs.

Design choices:
- Versioned as "MAJOR.MINOR". A minor bump only adds optional variables or attrs, so a reader opens any store of
  its own major version (unknown variables are kept, missing optional ones are simply absent); a different major
  version is refused with a message that names both versions and the store.
- 1.1 stores the token text once per vocabulary entry (`vocab_text`, dim `vocab`) instead of once per token:
  per-token strings were most of the write cost. The `text` coordinate is derived from `token_id` on reading;
  1.0 stores (a `text` array per token) still open, and `migrate_store` rewrites one as 1.1.
- Every variable has a `token` axis first; per-layer variables use `layer` (the MoE layers only) or `layer_all`
  (every transformer layer), so MoE and dense layers never share an axis padded with blanks.
- Weights are recorded *after* top-k, normalisation and `routed_scaling_factor` (what the experts' outputs are
  multiplied by); TransformerLens records them before top-k, so `router_scores` carries that view when asked for.
- Next-token statistics are aligned two ways on purpose: `logprob[t]` is how surprising token t was (useful next
  to the routing of token t), `loss[t]` / `pred_id[t]` are the prediction made *at* t for token t+1.
- 1.2 adds V3.2 / V4: the indexer's selections on their own `index_layer` axis (the layers that have an indexer,
  so layers without one are absent rather than padded with -1), V4's attention-mass split and mHC matrices on
  `layer_all`, and per-layer coords `attn_kind`, `compress_ratio`, `hash_routed`. Only a V3.2 / V4 store is written
  as 1.2; a V2 / V3 store stays 1.1 byte for byte (same layout attr, same arrays).
Shape legend: N tokens, L MoE layers, A all layers, k experts per token, E routed experts, C latent width,
F simulated FP8 sites, I indexer layers, K index_topk, H heads, n mHC streams.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

SCHEMA_VERSION = "1.2"  # the newest version this code writes and reads
BASE_VERSION = "1.1"  # what a store without V3.2/V4 axes is written as (V2/V3 stores are exactly as before 1.2)
STORED_TEXT_VERSIONS = ("1.0",)  # versions that keep a per-token `text` array

# dims
TOKEN, LAYER, LAYER_ALL, SLOT, EXPERT, LATENT, SITE, WRITER, VOCAB = (
    "token", "layer", "layer_all", "slot", "expert", "latent", "site", "writer", "vocab")
# schema 1.2 (V3.2 / V4): layers with an indexer, its top-k slots, attention heads, the mass branches, the two mHC
# sites of a layer, and the residual streams a mixing matrix maps from / to
INDEX_LAYER, INDEX_K, HEAD, BRANCH, HC_SITE, STREAM_IN, STREAM_OUT = (
    "index_layer", "index_k", "head", "branch", "hc_site", "stream_in", "stream_out")
BRANCHES = ("window", "compressed", "sink")  # the order of hook_attn_mass's last axis
HC_SITES = ("hc_attn", "hc_ffn")  # blocks.{L}.hc_attn.hook_mix, blocks.{L}.hc_ffn.hook_mix


@dataclass(frozen=True)
class Var:
    name: str
    dims: tuple[str, ...]
    dtype: str  # numpy dtype name; "str" for variable-length text
    fill: float | int | str  # value of anything not captured (a layer left out, a first token's logprob)
    coord: bool  # a coordinate along `token` rather than a data variable
    optional: bool  # absent unless asked for (large, or needs FP8 simulation)
    doc: str


VARIABLES: tuple[Var, ...] = (
    Var("token_id", (TOKEN,), "int32", -1, True, False, "token id"),
    Var("doc", (TOKEN,), "int32", -1, True, False, "index of the input record (line of .txt / .jsonl) it came from"),
    Var("seq", (TOKEN,), "int32", -1, True, False, "index of the forward window (a record longer than the window "
                                                   "spans several); unique over the store"),
    Var("pos", (TOKEN,), "int32", -1, True, False, "position inside its window (0 = first token, BOS if any)"),
    Var("text", (TOKEN,), "str", "", True, False, "decoded text of the token alone (from `vocab_text` since 1.1)"),
    Var("expert_ids", (TOKEN, LAYER, SLOT), "int16", -1, False, False,
        "routed experts chosen, slot 0 = highest selection score (-1: layer not captured)"),
    Var("expert_weights", (TOKEN, LAYER, SLOT), "float32", float("nan"), False, False,
        "weight applied to each chosen expert: after top-k, normalisation and routed_scaling_factor"),
    Var("router_scores", (TOKEN, LAYER, EXPERT), "float16", float("nan"), False, True,
        "gate scores (softmax or sigmoid) before the balancing bias and top-k"),
    Var("kv_latent", (TOKEN, LAYER_ALL, LATENT), "float16", float("nan"), False, True,
        "compressed KV latent c_kv after kv_a_layernorm: what MLA caches"),
    Var("kv_latent_norm", (TOKEN, LAYER_ALL), "float32", float("nan"), False, False, "L2 norm of kv_latent (fp32)"),
    Var("fp8_rel_error", (TOKEN, LAYER_ALL, SITE), "float32", float("nan"), False, True,
        "relative error ||y_fp8 - y|| / ||y|| of a simulated FP8 linear against its high-precision output"),
    Var("logprob", (TOKEN,), "float32", float("nan"), False, False,
        "log p(token t | tokens < t) in its window (NaN for a window's first token)"),
    Var("loss", (TOKEN,), "float32", float("nan"), False, False,
        "next-token cross-entropy at t: -log p(token t+1 | tokens <= t) (NaN for a window's last token)"),
    Var("pred_id", (TOKEN,), "int32", -1, False, False, "argmax prediction at t for token t+1"),
    # schema 1.2: V3.2 / V4
    Var("index_selected", (TOKEN, INDEX_LAYER, INDEX_K), "int32", -1, False, False,
        "entries the indexer kept, best first (-1: none): V3.2 key positions in the window, V4 compressed-entry "
        "indices (entry w covers tokens w*m .. w*m+m-1 at the layer's compress_ratio m)"),
    Var("index_scores", (TOKEN, INDEX_LAYER, INDEX_K), "float32", float("nan"), False, True,
        "the index score of each entry in index_selected (NaN where it is -1)"),
    Var("attn_mass", (TOKEN, LAYER_ALL, HEAD, BRANCH), "float32", float("nan"), False, False,
        "V4: attention probability per head on the window, the compressed entries and the sink (sums to 1)"),
    Var("hc_mix", (TOKEN, LAYER_ALL, HC_SITE, STREAM_IN, STREAM_OUT), "float32", float("nan"), False, True,
        "V4: the mHC Sinkhorn matrix M of hc_attn / hc_ffn (X' = post y + M^T X: M[i, j] takes stream i to j)"),
)
BY_NAME = {v.name: v for v in VARIABLES}
COORDS = tuple(v.name for v in VARIABLES if v.coord)
ALWAYS = ("logprob", "loss", "pred_id", *COORDS)  # captured whatever `sites` says
# variables a probe site feeds, by the site's name below `blocks.{L}.`
SITE_VARIABLES = {
    "mlp.hook_expert_indices": ("expert_ids",),
    "mlp.hook_expert_weights": ("expert_weights",),
    "mlp.hook_router_scores": ("router_scores",),
    "attn.hook_kv_latent": ("kv_latent", "kv_latent_norm"),
    "attn.hook_index_selected": ("index_selected",),
    "attn.hook_index_scores": ("index_scores",),  # gathered at the same layer's hook_index_selected
    "attn.hook_attn_mass": ("attn_mass",),
    "hc_attn.hook_mix": ("hc_mix",),
    "hc_ffn.hook_mix": ("hc_mix",),
}
FP8_SITE = re.compile(r"^blocks\.(\d+)\.(.+)\.hook_fp8_rel_error$")
DEFAULT_SELECTION = ("expert_ids", "expert_weights", "kv_latent_norm", "fp8_rel_error", "index_selected", "attn_mass")
DERIVED = ("text",)  # coords a 1.1 store does not hold per token: rebuilt from token_id and VOCAB_TEXT
VOCAB_TEXT = "vocab_text"  # [vocab] str: decoded text of every token id
# the writer-progress table: one row per writer, one chunk per row, so writers never touch each other's bytes
PROGRESS = "progress"
PROGRESS_FIELDS = ("tokens", "seqs", "done")


class SchemaError(ValueError):
    """A store or a batch that does not follow this schema; the message says what differs."""


def check_version(found: str, where: object = "the store") -> tuple[int, int]:
    """Accept any store of our major version, returning (major, minor); refuse another major, naming both
    versions and `where` (the store's path)."""
    try:
        major, minor = (int(p) for p in str(found).split("."))
    except ValueError:
        raise SchemaError(f"{where}: schema_version {found!r} is not MAJOR.MINOR") from None
    ours = int(SCHEMA_VERSION.split(".")[0])
    if major != ours:
        raise SchemaError(f"{where}: trace schema {found} cannot be read by this workbench (schema {SCHEMA_VERSION}); "
                          f"{'upgrade the workbench' if major > ours else 'convert the store with its own version'}")
    return major, minor


def numpy_dtype(var: Var) -> np.dtype:
    return np.dtype(object) if var.dtype == "str" else np.dtype(var.dtype)


@dataclass(frozen=True)
class Layout:
    """The sizes and labels of every non-token axis, plus which variables a trace holds."""

    variables: tuple[str, ...]  # data variables present (coords are always present)
    layers: tuple[int, ...]  # transformer index of each MoE layer (coord `layer`)
    n_layers: int  # all transformer layers (coord `layer_all`)
    top_k: int
    n_experts: int
    latent: int
    fp8_sites: tuple[str, ...]  # coord `site`: names below `blocks.{L}.` of the FP8 error probes
    # schema 1.2, V3.2 / V4 models only (empty / 0 otherwise, and then absent from `to_json`)
    attn_kinds: tuple[str, ...] = ()  # coord `attn_kind` per layer: transformers' layer_types names
    compress_ratios: tuple[int, ...] = ()  # coord `compress_ratio` per layer: V4's m (0: none; V3.2: all 0)
    hash_layers: tuple[int, ...] = ()  # transformer index of each hash-routed MoE layer (coord `hash_routed`)
    index_layers: tuple[int, ...] = ()  # transformer index of each layer with an indexer (coord `index_layer`)
    index_topk: int = 0
    n_heads: int = 0
    hc_mult: int = 0  # mHC residual streams (0: no mHC)

    def sizes(self) -> dict[str, int]:
        return {LAYER: len(self.layers), LAYER_ALL: self.n_layers, SLOT: self.top_k, EXPERT: self.n_experts,
                LATENT: self.latent, SITE: len(self.fp8_sites), INDEX_LAYER: len(self.index_layers),
                INDEX_K: self.index_topk, HEAD: self.n_heads, BRANCH: len(BRANCHES), HC_SITE: len(HC_SITES),
                STREAM_IN: self.hc_mult, STREAM_OUT: self.hc_mult}

    @property
    def extended(self) -> bool:
        """A V3.2 / V4 layout: written as schema 1.2 with the per-layer attention coords."""
        return bool(self.attn_kinds)

    def schema_version(self) -> str:
        return SCHEMA_VERSION if self.extended else BASE_VERSION

    def shape(self, name: str, n_tokens: int) -> tuple[int, ...]:
        sizes = self.sizes()
        return (n_tokens, *(sizes[d] for d in BY_NAME[name].dims[1:]))

    def names(self) -> tuple[str, ...]:
        """Every array of a trace: coords first, then data variables in table order."""
        wanted = set(self.variables) | set(ALWAYS)
        return tuple(v.name for v in VARIABLES if v.name in wanted)

    def stored_names(self) -> tuple[str, ...]:
        """The per-token arrays a schema-1.1 store holds: every name but the derived ones."""
        return tuple(n for n in self.names() if n not in DERIVED)

    def axis_coords(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        out: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
            LAYER: ((LAYER,), np.array(self.layers, dtype=np.int16)),
            LAYER_ALL: ((LAYER_ALL,), np.arange(self.n_layers, dtype=np.int16)),
        }
        if "fp8_rel_error" in self.variables:
            out[SITE] = ((SITE,), np.array(self.fp8_sites, dtype=object))
        if self.extended:
            out[INDEX_LAYER] = ((INDEX_LAYER,), np.array(self.index_layers, dtype=np.int16))
            out["attn_kind"] = ((LAYER_ALL,), np.array(self.attn_kinds, dtype=object))
            out["compress_ratio"] = ((LAYER_ALL,), np.array(self.compress_ratios, dtype=np.int32))
            out["hash_routed"] = ((LAYER,), np.isin(np.array(self.layers, dtype=np.int64), self.hash_layers))
        if "attn_mass" in self.variables:
            out[BRANCH] = ((BRANCH,), np.array(BRANCHES, dtype=object))
        if "hc_mix" in self.variables:
            out[HC_SITE] = ((HC_SITE,), np.array(HC_SITES, dtype=object))
        return out

    def check(self) -> None:
        """The 1.2 fields agree with each other (a hand-edited layout attr is refused, not half-read)."""
        if not self.extended:
            return
        if len(self.attn_kinds) != self.n_layers or len(self.compress_ratios) != self.n_layers:
            raise SchemaError(f"trace layout: {len(self.attn_kinds)} attn_kinds and {len(self.compress_ratios)} "
                              f"compress_ratios for {self.n_layers} layers")
        bad = [i for i in (*self.index_layers, *self.hash_layers) if not 0 <= i < self.n_layers]
        if bad or not set(self.hash_layers) <= set(self.layers):
            raise SchemaError(f"trace layout: index_layers {list(self.index_layers)} / hash_layers "
                              f"{list(self.hash_layers)} name layers outside 0..{self.n_layers - 1} or the MoE layers")
        if min(self.index_topk, self.n_heads, self.hc_mult) < 0:
            raise SchemaError("trace layout: index_topk, n_heads and hc_mult must be >= 0")

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "variables": list(self.variables), "layers": list(self.layers), "n_layers": self.n_layers,
            "top_k": self.top_k, "n_experts": self.n_experts, "latent": self.latent, "fp8_sites": list(self.fp8_sites)}
        if self.extended:  # V2/V3 layouts keep exactly their 1.1 form
            out.update({"attn_kinds": list(self.attn_kinds), "compress_ratios": list(self.compress_ratios),
                        "hash_layers": list(self.hash_layers), "index_layers": list(self.index_layers),
                        "index_topk": self.index_topk, "n_heads": self.n_heads, "hc_mult": self.hc_mult})
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layout:
        try:
            layout = cls(tuple(d["variables"]), tuple(d["layers"]), int(d["n_layers"]), int(d["top_k"]),
                         int(d["n_experts"]), int(d["latent"]), tuple(d["fp8_sites"]),
                         tuple(str(k) for k in d.get("attn_kinds", ())),
                         tuple(int(m) for m in d.get("compress_ratios", ())),
                         tuple(int(i) for i in d.get("hash_layers", ())),
                         tuple(int(i) for i in d.get("index_layers", ())), int(d.get("index_topk", 0)),
                         int(d.get("n_heads", 0)), int(d.get("hc_mult", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SchemaError(f"trace layout attr is malformed ({e!r})") from None
        layout.check()
        return layout


def build_dataset(arrays: dict[str, tuple[tuple[str, ...], Any]], layout: Layout, attrs: dict[str, Any]) -> xr.Dataset:
    """(dims, numpy or dask array) keyed by name -> a Dataset with the schema's coords; unknown names stay data."""
    coords: dict[str, Any] = dict(layout.axis_coords())
    data_vars: dict[str, Any] = {}
    for name, (dims, arr) in arrays.items():
        var = BY_NAME.get(name)
        (coords if var is not None and var.coord else data_vars)[name] = (dims, arr)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)
