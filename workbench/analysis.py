"""Analyses of a trace: pure functions from an xarray Dataset (in memory or lazy from `open_trace`) to small results.

Design choices:
- Nothing ever holds the whole token axis. Every analysis is one blockwise task per token chunk plus a tree
  reduction, so a dask-backed trace runs where dask runs it (a `distributed.Client`'s cluster once one exists)
  with O(chunks) tasks, and a numpy trace runs the same per-chunk function once, on the whole array. Two
  exceptions read per-token arrays on the client: `indexer_recall` (its `dense_topk` argument is in memory
  already) and the shuffled baseline of `routing_specialisation` (numpy draws the permutation).
- Dense results (expert loads, co-activation, transitions, histograms, the latent Gram matrix) are sums of
  per-chunk partials (`sum_blocks`): on a dask-backed trace they come back lazy (call `.compute()`), on a numpy
  trace they are numpy.
- Sparse results (token x expert pairs, first occurrences) are sorted (key, value) frames per chunk, merged in a
  tree by key (`merge_blocks`) and returned computed: their size is the number of distinct keys, not tokens.
- Expert ids of -1 (a layer not captured) are ignored; every count is of (token, slot) choices.
- V3.2 / V4 (schema 1.2): distances of the indexer's selections, its recall against dense attention, V4's
  attention-mass split, mHC stream-mixing statistics, and hash-routed vs learned layers' specialisation.
Shape legend: N tokens, n tokens of one chunk, L MoE layers, A all layers, k top-k, E routed experts, C latent
width, P token-expert pairs, I indexer layers, B chunks.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import dask.array as da
import numpy as np
import xarray as xr

from workbench.chunked import Frame, concat_frames, merge_blocks, sum_blocks, token_positions
from workbench.config.names import CSA_RATIO

TOKEN = "token"
PAIR_BASE = 2**31  # (layer*E + expert, token id) pairs are coded (layer*E + expert) * PAIR_BASE + token id

__all__ = ["coactivation", "expert_load", "fp8_error_summary", "indexer_recall", "latent_spectrum", "load_balance",
           "mass_split", "n_experts", "routing_specialisation", "routing_transitions", "selected_distance",
           "selection_distance_summary", "stream_mixing", "token_expert_lift", "token_texts", "top_tokens_per_expert"]

def n_experts(ds: xr.Dataset) -> int:
    """Routed experts of the model that wrote `ds`: its `expert` axis, else the layout attrs, else the ids seen."""
    if "expert" in ds.sizes:
        return int(ds.sizes["expert"])
    layout = json.loads(ds.attrs.get("layout", "{}"))
    if "n_experts" in layout:
        return int(layout["n_experts"])
    return int(ds["expert_ids"].max().compute()) + 1


def _ids(ds: xr.Dataset) -> xr.DataArray:
    if "expert_ids" not in ds:
        raise ValueError("the trace has no expert_ids (routing was not captured)")
    return ds["expert_ids"].transpose(TOKEN, "layer", "slot")


def _pair_counts(a: np.ndarray, b: np.ndarray, E: int) -> np.ndarray:
    """a, b [n, k] expert ids -> [E, E] count of (token, slot i, slot j) with a[:, i] = e and b[:, j] = f; one
    layer at a time keeps the codes at n*k*k, not n*L*k*k."""
    a, b = a.astype(np.int64), b.astype(np.int64)
    codes = a[:, :, None] * E + b[:, None, :]  # [n, k, k]
    valid = (a[:, :, None] >= 0) & (b[:, None, :] >= 0)
    return np.bincount(codes[valid], minlength=E * E).reshape(E, E)


# ---------------------------------------------------------------------- load and balance
def expert_load(ds: xr.Dataset) -> xr.DataArray:
    """Token-slot choices per expert and MoE layer: [layer, expert] int64 (lazy on a dask-backed trace)."""
    ids, E = _ids(ds), n_experts(ds)
    L = ids.sizes["layer"]

    def count(block: np.ndarray) -> np.ndarray:  # [n, L, k] -> [L, E]
        out = np.zeros((L, E), dtype=np.int64)
        for layer in range(L):
            b = block[:, layer]  # [n, k]
            out[layer] = np.bincount(b[b >= 0].astype(np.int64), minlength=E)
        return out

    data = sum_blocks(count, [ids], (L, E), np.int64)
    return xr.DataArray(data, dims=("layer", "expert"), coords={"layer": ds["layer"].values}, name="load")


def load_balance(ds: xr.Dataset) -> xr.Dataset:
    """Per MoE layer: coefficient of variation, entropy (nats, and over log E), max/mean of the expert loads."""
    load = expert_load(ds).astype(np.float64)
    mean = load.mean("expert")
    p = load / load.sum("expert")
    entropy = -xr.where(p > 0, p * np.log(p.where(p > 0, 1.0)), 0.0).sum("expert")
    return xr.Dataset({"cv": load.std("expert") / mean, "entropy": entropy,
                       "entropy_norm": entropy / np.log(load.sizes["expert"]),
                       "max_over_mean": load.max("expert") / mean, "load": load})


# ---------------------------------------------------------------------- specialisation
def _lift_frames(L: int, E: int) -> Callable[[np.ndarray, np.ndarray], tuple[Frame, Frame, Frame]]:
    """Per chunk: counts of (layer*E + expert, token id) pair codes, of token ids, and of layer*E + expert."""

    def frames(tok: np.ndarray, block: np.ndarray) -> tuple[Frame, Frame, Frame]:  # [n], [n, L, k]
        tok = tok.astype(np.int64)
        pairs, loads = [], []
        for layer in range(L):  # one layer at a time: n*k codes, not n*L*k
            b = block[:, layer].astype(np.int64)  # [n, k]
            valid = b >= 0
            le = layer * E + b[valid]  # layer*E + expert of each valid (token, slot)
            pairs.append(np.unique(le * PAIR_BASE + np.broadcast_to(tok[:, None], b.shape)[valid], return_counts=True))
            loads.append(np.unique(le, return_counts=True))
        return concat_frames(pairs), np.unique(tok, return_counts=True), concat_frames(loads)

    return frames


def token_expert_lift(ds: xr.Dataset, min_count: int = 1) -> xr.Dataset:
    """How much more often a token id goes to an expert than tokens do on average, per (layer, expert, token id).

    lift = P(expert | token id) / P(expert), with P(expert | token id) the share of that id's occurrences routed
    to the expert and P(expert) the share of all tokens routed to it. Pairs seen fewer than `min_count` times are
    dropped. Returns dims [pair] with coords layer, expert, token_id and variables count, token_count, lift.
    Computed in one pass: per-chunk sparse counts, merged by key (client memory ~ distinct pairs, not tokens).
    """
    ids, E = _ids(ds), n_experts(ds)
    L = ids.sizes["layer"]
    (codes, counts), (tok_ids, tok_counts), (le_keys, le_counts) = merge_blocks(
        _lift_frames(L, E), [ds["token_id"], ids], (np.add, np.add, np.add))  # [P], [V], [<= L*E]
    load = np.zeros(L * E, dtype=np.int64)
    load[le_keys] = le_counts
    keep = counts >= min_count
    codes, counts = codes[keep], counts[keep]
    le, tok = codes // PAIR_BASE, codes % PAIR_BASE
    layer_i, expert = le // E, le % E
    tcount = tok_counts[np.searchsorted(tok_ids, tok)]  # occurrences of each pair's token id
    base = load[le] / max(ds.sizes[TOKEN], 1)  # P(expert) at that layer
    lift = (counts / tcount) / np.where(base > 0, base, np.nan)
    layers = np.asarray(ds["layer"].values)
    return xr.Dataset({"count": ("pair", counts), "token_count": ("pair", tcount), "lift": ("pair", lift)},
                      coords={"layer": ("pair", layers[layer_i]), "expert": ("pair", expert.astype(np.int64)),
                              "token_id": ("pair", tok.astype(np.int64))})


def top_tokens_per_expert(ds: xr.Dataset, n: int = 10, min_count: int = 5) -> xr.Dataset:
    """The `n` token ids with the highest lift for each (layer, expert), among ids seen at least `min_count`
    times with that expert: dims [layer, expert, rank]; token_id -1 / lift NaN / text "" where there are fewer.
    `text` is each id's decoded text as the trace recorded it (read at one occurrence per id)."""
    pairs = token_expert_lift(ds, min_count=min_count)
    layers = np.asarray(ds["layer"].values)
    E = n_experts(ds)
    tok = np.full((len(layers), E, n), -1, dtype=np.int64)
    lift = np.full((len(layers), E, n), np.nan)
    count = np.zeros((len(layers), E, n), dtype=np.int64)
    li = np.searchsorted(layers, pairs["layer"].values)
    order = np.lexsort((-pairs["lift"].values, pairs["expert"].values, li))  # by layer, expert, lift desc
    li, ex = li[order], pairs["expert"].values[order]
    group_start = np.r_[0, np.nonzero(np.diff(li * E + ex))[0] + 1]
    rank = np.arange(len(order)) - np.repeat(group_start, np.diff(np.r_[group_start, len(order)]))
    sel = rank < n
    tok[li[sel], ex[sel], rank[sel]] = pairs["token_id"].values[order][sel]
    lift[li[sel], ex[sel], rank[sel]] = pairs["lift"].values[order][sel]
    count[li[sel], ex[sel], rank[sel]] = pairs["count"].values[order][sel]
    names = token_texts(ds, np.unique(tok[tok >= 0]))
    text = np.array([names.get(int(t), "") for t in tok.ravel().tolist()], dtype=object).reshape(tok.shape)
    dims = ("layer", "expert", "rank")
    return xr.Dataset({"token_id": (dims, tok), "lift": (dims, lift), "count": (dims, count), "text": (dims, text)},
                      coords={"layer": layers})


def token_texts(ds: xr.Dataset, token_ids: np.ndarray) -> dict[int, str]:
    """The recorded `text` of each id in `token_ids` that occurs in the trace, from its first occurrence (dict in
    order of first occurrence): per chunk the first position of each wanted id, merged by min, then one read of
    `text` at those positions ({} when the trace has no text)."""
    if "text" not in ds.variables or len(token_ids) == 0:
        return {}
    wanted = np.unique(np.asarray(token_ids, dtype=np.int64))

    def first(tok: np.ndarray, pos: np.ndarray) -> tuple[Frame]:  # [n], [n] -> (id, its first position)
        u, at = np.unique(tok.astype(np.int64), return_index=True)
        seen = np.isin(u, wanted)
        return ((u[seen], pos[at[seen]]),)

    tok = ds["token_id"]
    ((ids, where),) = merge_blocks(first, [tok, token_positions(tok)], (np.minimum,))
    if len(ids) == 0:
        return {}
    order = np.argsort(where, kind="stable")
    ids, where = ids[order], where[order]
    texts = np.asarray(ds["text"].isel({TOKEN: where}).values)  # [len(ids)]
    return {int(t): str(x) for t, x in zip(ids.tolist(), texts.tolist(), strict=True)}


# ---------------------------------------------------------------------- co-activation and transitions
def coactivation(ds: xr.Dataset) -> xr.Dataset:
    """Tokens that chose both experts i and j in the same layer: count [layer, expert, expert_b] (diagonal = load)
    and lift = count * N / (load_i * load_j), 1 when choices are independent (lazy on a dask-backed trace)."""
    ids, E = _ids(ds), n_experts(ds)
    L = ids.sizes["layer"]

    def pairs(block: np.ndarray) -> np.ndarray:  # [n, L, k] -> [L, E, E]
        return np.stack([_pair_counts(block[:, layer], block[:, layer], E) for layer in range(L)])

    count = xr.DataArray(sum_blocks(pairs, [ids], (L, E, E), np.int64), dims=("layer", "expert", "expert_b"),
                         coords={"layer": ds["layer"].values})
    diag = xr.DataArray(np.diagonal(count.data, axis1=1, axis2=2), dims=("layer", "expert"),
                        coords={"layer": ds["layer"].values})
    n = ds.sizes[TOKEN]
    lift = count * n / (diag * diag.rename(expert="expert_b")).where(lambda x: x > 0)
    return xr.Dataset({"count": count, "lift": lift})


def routing_transitions(ds: xr.Dataset) -> xr.Dataset:
    """How routing at one MoE layer predicts the next: count [layer, expert_from, expert_to] of (token, slot pair)
    choices, `layer` being the source layer and `next_layer` the one after it, and prob = P(to | from) (lazy on a
    dask-backed trace)."""
    ids, E = _ids(ds), n_experts(ds)
    L = ids.sizes["layer"]
    if L < 2:
        raise ValueError("routing transitions need at least two MoE layers")

    def trans(block: np.ndarray) -> np.ndarray:  # [n, L, k] -> [L-1, E, E]
        return np.stack([_pair_counts(block[:, layer], block[:, layer + 1], E) for layer in range(L - 1)])

    layers = np.asarray(ds["layer"].values)
    count = xr.DataArray(sum_blocks(trans, [ids], (L - 1, E, E), np.int64),
                         dims=("layer", "expert_from", "expert_to"),
                         coords={"layer": layers[:-1], "next_layer": ("layer", layers[1:])})
    total = count.sum("expert_to")
    return xr.Dataset({"count": count, "prob": count / total.where(total > 0)})


# ---------------------------------------------------------------------- KV latent spectrum
def _gram(block: np.ndarray) -> np.ndarray:
    """[n, a, C] -> [a, C+1, C]: each layer's Gram rows, then its column sums."""
    b = block.astype(np.float64)
    return np.concatenate([np.einsum("nac,nad->acd", b, b), b.sum(axis=0)[:, None, :]], axis=1)


def latent_spectrum(ds: xr.Dataset, center: bool = False) -> xr.Dataset:
    """Singular values of the [N, C] KV-latent matrix of each layer (via its C x C Gram matrix, so any N fits),
    the share of energy per component, and the effective rank exp(H(s / sum s)) (Roy & Vetterli). A dask-backed
    trace is reduced one layer chunk at a time, one graph each, so no graph spans every layer's chunks."""
    if "kv_latent" not in ds:
        raise ValueError("the trace has no kv_latent (record it with sites=['kv_latent'])")
    x = ds["kv_latent"].transpose(TOKEN, "layer_all", "latent")
    A, C = x.sizes["layer_all"], x.sizes["latent"]
    split = x.data.chunks[1] if isinstance(x.data, da.Array) else (A,)  # the layer chunks of the store
    bounds = np.cumsum((0, *split))
    parts = []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        part = sum_blocks(_gram, [x.isel(layer_all=slice(lo, hi))], (hi - lo, C + 1, C), np.float64)
        parts.append(np.asarray(part.compute() if isinstance(part, da.Array) else part))
    g = np.concatenate(parts)  # [A, C+1, C]
    G, s1 = g[:, :C], g[:, C]  # [A, C, C], [A, C]
    if center:
        n = x.sizes[TOKEN]
        G = G - np.einsum("ac,ad->acd", s1, s1) / max(n, 1)
    eig = np.linalg.eigvalsh(G)[:, ::-1]  # [A, C] descending
    sv = np.sqrt(np.clip(eig, 0.0, None))
    p = sv / sv.sum(axis=1, keepdims=True)
    eff = np.exp(-np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1))
    energy = sv**2 / (sv**2).sum(axis=1, keepdims=True)
    coords = {"layer_all": ds["layer_all"].values}
    return xr.Dataset({"singular_values": (("layer_all", "component"), sv),
                       "energy": (("layer_all", "component"), energy),
                       "effective_rank": (("layer_all",), eff)}, coords=coords)


# ---------------------------------------------------------------------- FP8 error
def fp8_error_summary(ds: xr.Dataset, threshold: float = 1e-2) -> xr.Dataset:
    """Per layer and simulated linear: mean, RMS and max relative error, and the share of tokens above
    `threshold`; layers or sites that were not simulated come out NaN."""
    if "fp8_rel_error" not in ds:
        raise ValueError("the trace has no fp8_rel_error (FP8 simulation was off when it was recorded)")
    err = ds["fp8_rel_error"]
    seen = err.notnull()
    return xr.Dataset({"mean": err.mean(TOKEN), "rms": np.sqrt((err**2).mean(TOKEN)), "max": err.max(TOKEN),
                       "frac_over": (err > threshold).sum(TOKEN) / seen.sum(TOKEN).where(seen.any(TOKEN))})


# ---------------------------------------------------------------------- V3.2 / V4 (schema 1.2)
def _need(ds: xr.Dataset, name: str, what: str) -> xr.DataArray:
    if name not in ds:
        raise ValueError(f"the trace has no {name} ({what})")
    return ds[name]


def selected_distance(ds: xr.Dataset) -> xr.Dataset:
    """How far back each entry the indexer kept lies from its query, in tokens: `near` and `far`, float32
    [token, index_layer, index_k], NaN where nothing was selected.

    V3.2 (compress_ratio 0) selects key positions s: near = far = pos - s. V4 selects compressed entries w of a
    layer with rate m; entry w's own window is tokens w*m .. w*m+m-1, and a CSA entry (m = 4) also pools the
    previous window (its overlapping half), so it covers max(0, (w-1)*m) .. w*m+m-1: near = pos - (w*m + m - 1)
    (its newest token), far = pos - (its oldest). `pos` is the query's position in its window, the positions the
    selection indexes.
    """
    sel = _need(ds, "index_selected", "not a V3.2 / V4 trace, or the indexer was not captured")
    m = ds["compress_ratio"].sel(layer_all=ds["index_layer"].values).values  # [I] rate per indexer layer
    rate = xr.DataArray(np.where(m > 0, m, 1).astype(np.float32), dims="index_layer")
    picked = sel.where(sel >= 0)
    overlap = xr.DataArray((m == CSA_RATIO).astype(np.float32), dims="index_layer")  # CSA reaches one window back
    first = (picked - overlap).clip(min=0) * rate  # [token, I, k] oldest token of each entry
    newest = picked * rate + rate - 1
    pos = ds["pos"].astype(np.float32)
    near, far = pos - newest, pos - first
    return xr.Dataset({"near": near.astype(np.float32), "far": far.astype(np.float32)})


def selection_distance_summary(ds: xr.Dataset, bins: np.ndarray | None = None) -> xr.Dataset:
    """Per indexer layer: how many entries were kept, their mean `near` / `far` distance (see
    `selected_distance`), and a histogram of `near` over `bins` (edges in tokens, default 0, 1, 2, 4, 8, ...,
    right-open, the last bin closed; distances past the last edge are not counted)."""
    d = selected_distance(ds)
    edges = np.asarray(bins if bins is not None else np.concatenate([[0], 2.0 ** np.arange(21)]), dtype=np.float64)
    near = d["near"].transpose(TOKEN, "index_layer", "index_k")
    n_layers = near.sizes["index_layer"]

    def hist(block: np.ndarray) -> np.ndarray:  # [n, I, k] -> [I, bins]
        return np.stack([np.histogram(block[:, i][~np.isnan(block[:, i])], bins=edges)[0] for i in range(n_layers)])

    counts = sum_blocks(hist, [near], (n_layers, len(edges) - 1), np.int64)
    return xr.Dataset({"count": d["near"].notnull().sum((TOKEN, "index_k")),
                       "mean_near": d["near"].mean((TOKEN, "index_k")), "mean_far": d["far"].mean((TOKEN, "index_k")),
                       "hist": (("index_layer", "bin"), counts)},
                      coords={"index_layer": ds["index_layer"].values, "bin_lo": ("bin", edges[:-1]),
                              "bin_hi": ("bin", edges[1:])})


def indexer_recall(ds: xr.Dataset, dense_topk: np.ndarray) -> xr.Dataset:
    """How much of dense attention's own top-k the indexer kept, per indexer layer.

    `dense_topk` int [token, index_layer, k] (-1 = none) is, for the same tokens in the same order, the top-k
    entries of dense attention's head-averaged probabilities, ties to the lower index, k = the trace's index_topk
    (`workbench.trace.dense_topk.dense_attention_topk` computes it). V3.2: the same weights run with index_topk
    >= T (V3's MLA, every causal key kept), p_bar[t, s] = mean_h softmax_s(q_h(t) . k_h(s) * scale) over s <= t.
    V4: the same weights with every complete compressed entry kept, p_bar[t, w] = mean_h of V4's softmax over
    window keys, entries and sink, taken at entry w. With S_t the trace's `index_selected` and D_t the dense top-k
    of query t (its entries other than -1): recall_t = |S_t & D_t| / |D_t|. `recall` averages it over the queries
    that see more than k keys (V4: complete entries), where the indexer really chooses (elsewhere it keeps
    everything and recall is 1); `recall_all` over every query with a non-empty D_t; `queries` counts the former.
    """
    sel = _need(ds, "index_selected", "not a V3.2 / V4 trace, or the indexer was not captured")
    s = np.asarray(sel.transpose(TOKEN, "index_layer", "index_k").values)  # [N, I, k]
    d = np.asarray(dense_topk)
    if d.ndim != 3 or d.shape[:2] != s.shape[:2]:
        raise ValueError(f"dense_topk must be [token, index_layer, k] = [{s.shape[0]}, {s.shape[1]}, k], "
                         f"got shape {d.shape}")
    hit = ((s[:, :, :, None] == d[:, :, None, :]) & (d[:, :, None, :] >= 0)).any(axis=2)  # [N, I, k'] D in S
    size = (d >= 0).sum(axis=2)  # [N, I]
    per = np.where(size > 0, hit.sum(axis=2) / np.maximum(size, 1), np.nan)  # [N, I]
    m = np.asarray(ds["compress_ratio"].sel(layer_all=ds["index_layer"].values).values)  # [I]
    seen = (np.asarray(ds["pos"].values)[:, None] + 1) // np.where(m > 0, m, 1)[None, :]  # [N, I] keys or entries
    choosing = (seen > s.shape[2]) & (size > 0)  # [N, I]
    chosen = np.where(choosing, per, np.nan)
    with np.errstate(invalid="ignore"):
        recall = np.nanmean(chosen, axis=0) if chosen.size else np.full(s.shape[1], np.nan)
        recall_all = np.nanmean(per, axis=0) if per.size else np.full(s.shape[1], np.nan)
    return xr.Dataset({"recall": ("index_layer", recall), "recall_all": ("index_layer", recall_all),
                       "queries": ("index_layer", choosing.sum(axis=0))},
                      coords={"index_layer": ds["index_layer"].values})


def mass_split(ds: xr.Dataset) -> xr.Dataset:
    """V4's attention mass on the window, the compressed entries and the sink: `mean` [layer_all, branch] (over
    tokens and heads) and `per_head` [layer_all, head, branch] (over tokens), with each layer's `attn_kind`."""
    mass = _need(ds, "attn_mass", "V4 models only")
    return xr.Dataset({"mean": mass.mean((TOKEN, "head")), "per_head": mass.mean(TOKEN)})


def stream_mixing(ds: xr.Dataset) -> xr.Dataset:
    """Statistics of V4's mHC mixing matrices M (X' = post y + M^T X) per layer and site (hc_attn, hc_ffn), over
    tokens: `mean_matrix` [layer_all, hc_site, stream_in, stream_out]; `dist_identity` = mean ||M - I||_F;
    `max_offdiag` = mean of the largest off-diagonal entry; `self_weight` = mean of diag(M) / n (1: identity,
    1/n: uniform mixing); `row_error` / `col_error` = mean max |row sum - 1| / |column sum - 1| (Sinkhorn makes M
    doubly stochastic up to its iteration count)."""
    M = _need(ds, "hc_mix", "record it with sites=['hc_mix'] on a V4 model").astype(np.float64)
    n = M.sizes["stream_in"]
    eye = xr.DataArray(np.eye(n), dims=("stream_in", "stream_out"))
    diff = M - eye
    off = M.where(eye == 0)
    return xr.Dataset({
        "mean_matrix": M.mean(TOKEN),
        "dist_identity": ((diff**2).sum(("stream_in", "stream_out")) ** 0.5).mean(TOKEN),
        "max_offdiag": off.max(("stream_in", "stream_out")).mean(TOKEN),
        "self_weight": (M * eye).sum(("stream_in", "stream_out")).mean(TOKEN) / n,
        "row_error": abs(M.sum("stream_out") - 1).max("stream_in").mean(TOKEN),
        "col_error": abs(M.sum("stream_in") - 1).max("stream_out").mean(TOKEN),
    })


def routing_specialisation(ds: xr.Dataset, shuffle_seed: int | None = 0) -> xr.Dataset:
    """Expert load and token specialisation per MoE layer, with V4's `hash_routed` flag (False where absent).

    Over the (token, slot) choices of a layer, with T the token id and E the chosen expert: `mutual_info` =
    I(T; E) in nats = sum over (id, expert) pairs of p(id, expert) log lift (see `token_expert_lift`);
    `specialisation` = I(T; E) / (H(E) - log k), which is 1 when the experts are a function of the token id (hash
    routing: tid2eid) and 0 when routing ignores it; `entropy_norm` and `cv` of the load as in `load_balance`.
    On few tokens per id I(T; E) is biased upwards (an id seen once looks fully specialised), hence the baseline
    `specialisation_shuffled`: the same statistic with the token ids permuted over the tokens
    (`numpy.random.default_rng(shuffle_seed).permutation`), which keeps every count but breaks the link between id
    and expert; compare a layer against it, not against 0. `shuffle_seed=None` skips it: on a dask-backed trace
    the permutation is drawn on the client (numpy's generator is sequential), which reads `token_id` whole and
    ships the permuted ids with the graph, 12 bytes per token."""
    balance = load_balance(ds).compute()  # one pass; its entropy is needed here, the rest is returned
    layers = np.asarray(ds["layer"].values)
    k = int(ds.sizes["slot"])
    room = balance["entropy"].values - np.log(k)

    def specialisation(trace: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
        pairs = token_expert_lift(trace)
        mi = np.zeros(len(layers))
        for i, layer in enumerate(layers):
            here = np.asarray(pairs["layer"].values) == layer
            c = np.asarray(pairs["count"].values)[here].astype(np.float64)
            if c.sum() > 0:
                mi[i] = float((c / c.sum() * np.log(np.asarray(pairs["lift"].values)[here])).sum())
        return mi, np.where(room > 0, mi / np.where(room > 0, room, 1), np.nan)

    mi, spec = specialisation(ds)
    out = {"mutual_info": ("layer", mi), "specialisation": ("layer", spec)}
    if shuffle_seed is not None:
        tok = np.asarray(ds["token_id"].values)
        shuffled = ds.assign_coords(token_id=(TOKEN, tok[np.random.default_rng(shuffle_seed).permutation(len(tok))]))
        out["specialisation_shuffled"] = ("layer", specialisation(shuffled)[1])
    hashed = ds["hash_routed"].values if "hash_routed" in ds.coords else np.zeros(len(layers), dtype=bool)
    return xr.Dataset({**out, "entropy_norm": balance["entropy_norm"], "cv": balance["cv"], "load": balance["load"]},
                      coords={"layer": layers, "hash_routed": ("layer", np.asarray(hashed, dtype=bool))})
