"""DeepSeek-V4 attention (sliding window, CSA, HCA) against transformers' DeepseekV4Attention, fp32 eager.

Every parameter and buffer of a tiny transformers model is randomized (its init leaves sinks and position biases
at zero, which would hide their math), each layer's self_attn weights are loaded into our V4Attention by name
(strict), and our output is compared with transformers' for the very inputs its attention saw: in one no-cache
forward, and in a cached run of chunked prefill + single-token decode. Tolerance 1e-5: observed <= 8.4e-7 on outputs
of magnitude ~3, i.e. fp32 reassociation (our softmax groups and einsums sum in another order).
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.config import CSA, HCA, SLIDING, ModelConfig
from workbench.model.v4.attention import V4Attention, set_reference_quant
from workbench.model.v4.cache import V4Cache
from workbench.model.v4.fake_quant import (
    E2M1_GRID,
    fp4_e2m1_fake_quant,
    fp8_e4m3_fake_quant,
    hadamard_rotate,
    indexer_fp4_fake_quant,
)
from workbench.model.v4.rope import V4Rotary
from workbench.probes import ProbeRegistry

transformers = pytest.importorskip("transformers")

T = 48  # > window 8, 6 HCA entries (rate 8), 12 CSA entries (rate 4) > index_topk 3
B = 2
PREFILL = (13, 17)  # crosses CSA and HCA window boundaries and leaves partial buffers; then single-token steps
TOPK_MARGIN = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


def tf_config(**overrides: object):
    """The brief's "V4 smallest covering config": [sliding, CSA, HCA, CSA], rates 4 / 8, YaRN on compress."""
    kw: dict[str, object] = dict(
        vocab_size=96, hidden_size=64, moe_intermediate_size=24, num_hidden_layers=4,
        layer_types=[SLIDING, CSA, HCA, CSA], compress_rates={CSA: 4, HCA: 8},
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], num_attention_heads=4, head_dim=32,
        qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, routed_scaling_factor=1.5, index_n_heads=16, index_head_dim=16, index_topk=3,
        sliding_window=8, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=1.0,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1},
        max_position_embeddings=128)
    kw.update(overrides)
    cfg = transformers.DeepseekV4Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def randomized(cfg, seed: int = 0):
    """transformers' model with every parameter and buffer random: norms 1+0.1N, others 0.15N, tid2eid random
    distinct experts per token, router bias 0.05N."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("scale"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                E = cfg.n_routed_experts
                b.copy_(torch.stack([torch.randperm(E, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


class Recorder:
    """Per layer and call: (attention input, positions [S], attention output, indexer selection or None)."""

    def __init__(self, model) -> None:
        self.calls: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.self_attn.register_forward_hook(self._attn_hook(i), with_kwargs=True))
            indexer = getattr(layer.self_attn.compressor, "indexer", None)
            if indexer is not None:
                self.handles.append(indexer.register_forward_hook(self._indexer_hook(i)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _attn_hook(self, i: int):
        def hook(module, args, kwargs, out):
            self.calls.setdefault(i, []).append(
                {"x": args[0].detach().clone(), "positions": kwargs["position_ids"][0].clone(),
                 "out": out[0].detach().clone()})
        return hook

    def _indexer_hook(self, i: int):
        def hook(module, args, out):  # runs before the attention's hook of the same call
            self.calls.setdefault(i, []).append({"selected": out.detach().clone()})
        return hook

    def merged(self, i: int) -> list[dict[str, torch.Tensor]]:
        """One dict per call: the indexer's record folds into the attention record after it."""
        out: list[dict[str, torch.Tensor]] = []
        pending: dict[str, torch.Tensor] = {}
        for rec in self.calls[i]:
            if "selected" in rec:
                pending = rec
            else:
                out.append({**rec, **pending})
                pending = {}
        return out


# a second config: other layer order, odd window (ring of 4), HCA rate 16, no YaRN, 8 heads in 4 groups,
# rope 6 of head_dim 24 (nope 18), index_topk 5 over 8-dim index heads
ODD = dict(layer_types=[HCA, CSA, SLIDING, CSA], compress_rates={CSA: 4, HCA: 16}, sliding_window=5,
           num_attention_heads=8, head_dim=24, qk_rope_head_dim=6, o_groups=4, o_lora_rank=12, index_head_dim=8,
           index_topk=5, rope_scaling=None, rope_theta=5000.0, compress_rope_theta=40000.0)
CONFIGS = {"smallest": {}, "odd": ODD}
_RUNS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def hf():
    """The brief's smallest covering config (the tests that check exact shapes and layer kinds use it)."""
    return recorded_runs("smallest")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_any(request):
    """Each config in turn, for the parity tests."""
    return recorded_runs(request.param)


def recorded_runs(name: str) -> dict:
    """transformers' model, its config as ours, and what its attention saw in a full and a cached run."""
    if name in _RUNS:
        return _RUNS[name]
    cfg = tf_config(**CONFIGS[name])
    model = randomized(cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = Recorder(model)
        model(ids)
        full_calls = {i: full.merged(i) for i in full.calls}
    full.remove()
    rec = Recorder(model)
    chunks = [*PREFILL] + [1] * (T - sum(PREFILL))
    with torch.no_grad():
        out = model(ids[:, : chunks[0]], use_cache=True)
        start = chunks[0]
        for c in chunks[1:]:
            out = model(ids[:, start : start + c], cache=out.cache, use_cache=True)
            start += c
    cached_calls = {i: rec.merged(i) for i in rec.calls}
    _RUNS[name] = {"model": model, "config": ModelConfig.from_hf_dict(cfg.to_dict()), "full": full_calls,
                   "cached": cached_calls, "tf_cache": out.cache, "chunks": chunks}
    return _RUNS[name]


def build_ours(hf, probes: ProbeRegistry | None = None) -> list[V4Attention]:
    probes = probes or ProbeRegistry()
    layers = []
    for i, layer in enumerate(hf["model"].model.layers):
        attn = V4Attention(hf["config"], i, probes)
        attn.load_state_dict(layer.self_attn.state_dict(), strict=True)  # names are transformers' exactly
        layers.append(attn.eval())
    return layers


def full_input(hf, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rec = hf["full"][i][0]
    return rec["x"], rec["positions"], rec["out"]


# ---------------------------------------------------------------------------------------------------- parity


def test_parameter_names_and_shapes_are_transformers(hf):
    for i, layer in enumerate(hf["model"].model.layers):
        theirs = {k: tuple(v.shape) for k, v in layer.self_attn.state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in V4Attention(hf["config"], i, ProbeRegistry()).state_dict().items()}
        assert ours == theirs, f"layer {i}"
    kinds = [hf["config"].attention_kind(i) for i in range(4)]
    assert kinds == [SLIDING, CSA, HCA, CSA]


@pytest.mark.parametrize("mode", ["naive", "fast"])
def test_full_forward_matches_transformers(hf_any, mode):
    for i, attn in enumerate(build_ours(hf_any)):
        x, positions, ref = full_input(hf_any, i)
        with torch.no_grad():
            out = attn(x, positions, None, mode)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"layer {i}: {m}")


def test_naive_and_fast_agree(hf_any):
    for i, attn in enumerate(build_ours(hf_any)):
        x, positions, _ = full_input(hf_any, i)
        with torch.no_grad():
            torch.testing.assert_close(attn(x, positions, None, "fast"), attn(x, positions, None, "naive"),
                                       atol=1e-6, rtol=1e-6)


def _index_scores(hf, i: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    probes = ProbeRegistry()
    attn = build_ours(hf, probes)[i]
    seen: dict[str, torch.Tensor] = {}
    with probes.listen([f"blocks.{i}.attn.hook_index_scores"], lambda n, v: seen.__setitem__("s", v)), \
            torch.no_grad():
        attn(x, positions)
    return seen["s"]


def _assert_topk_margin(scores: torch.Tensor, k: int) -> None:
    """The k-th and (k+1)-th visible scores of every query differ by more than TOPK_MARGIN (else the test data
    could pass or fail on tie order alone)."""
    top = scores.sort(dim=-1, descending=True).values  # [B, S, N]
    if top.shape[-1] <= k:
        return
    both_visible = torch.isfinite(top[..., k])
    gap = (top[..., k - 1] - top[..., k])[both_visible]
    assert gap.numel() > 0
    assert gap.min() > TOPK_MARGIN, f"index scores nearly tied at the top-{k} boundary: {gap.min():.2e}"


def _as_sets(selected: torch.Tensor) -> list[list[set[int]]]:
    return [[{int(j) for j in row if j >= 0} for row in seq] for seq in selected]


@pytest.mark.parametrize("layer", [1, 3])
def test_indexer_selects_what_transformers_selects(hf_any, layer):
    x, positions, _ = full_input(hf_any, layer)
    k = hf_any["config"].index_topk
    _assert_topk_margin(_index_scores(hf_any, layer, x, positions), k)
    probes = ProbeRegistry()
    attn = build_ours(hf_any, probes)[layer]
    seen: dict[str, torch.Tensor] = {}
    with probes.listen([f"blocks.{layer}.attn.hook_index_selected"], lambda n, v: seen.__setitem__("sel", v)), \
            torch.no_grad():
        attn(x, positions)
    ours = seen["sel"]
    assert ours.shape == (B, T, k) and ours.dtype == torch.int64
    assert _as_sets(ours) == _as_sets(hf_any["full"][layer][0]["selected"])
    # early queries see fewer than k entries: the rest is -1; query t sees (t+1)//4 entries
    visible = torch.clamp((positions + 1) // 4, max=k)
    torch.testing.assert_close((ours >= 0).sum(-1), visible[None].expand(B, -1))


@pytest.mark.parametrize("mode", ["naive", "fast"])
def test_cached_prefill_and_decode_match_transformers(hf_any, mode):
    """Our cache fed the inputs transformers' cached run gave its attention: same outputs, same selections."""
    ours = build_ours(hf_any)
    cache = V4Cache(hf_any["config"], B, T)
    for step, c in enumerate(hf_any["chunks"]):
        for i, attn in enumerate(ours):
            rec = hf_any["cached"][i][step]
            assert rec["x"].shape[1] == c
            with torch.no_grad():
                out = attn(rec["x"], rec["positions"], cache.layer(i), mode)
            torch.testing.assert_close(out, rec["out"], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, i=i, step=step: f"layer {i} call {step}: {m}")
        cache.advance(c)
    assert cache.length == T
    tf_cache = hf_any["tf_cache"]
    for i, layer in enumerate(cache.layers):  # the compressed entries equal transformers' cached ones
        if layer.compressor is None:
            continue
        n = T // hf_any["config"].compress_ratio(i)
        torch.testing.assert_close(layer.compressor.entries[:, :n], tf_cache.layers[i].compressed_kv["compressor"],
                                   atol=1e-5, rtol=1e-5)
        if layer.indexer is not None:
            torch.testing.assert_close(layer.indexer.entries[:, :n], tf_cache.layers[i].compressed_kv["indexer"],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [
    (13, 17) + (1,) * 18,  # the brief's run
    (4,) + (1,) * 44,  # exactly one CSA window as prompt, then decode
    (1,) * 48,  # decode from the first token
    (3, 5, 8, 32),  # chunks ending inside, at and across window boundaries
], ids=["13+17+decode", "4+decode", "all-decode", "3+5+8+32"])
@pytest.mark.parametrize("mode", ["naive", "fast"])
def test_cached_chunks_equal_one_full_forward(hf_any, chunks, mode):
    """Same inputs, cut into chunks: the cache (ring, partial windows, overlap halves, entries) loses nothing."""
    ours = build_ours(hf_any)
    inputs = [full_input(hf_any, i)[:2] for i in range(len(ours))]
    with torch.no_grad():
        full = [attn(x, positions) for attn, (x, positions) in zip(ours, inputs, strict=True)]
    cache = V4Cache(hf_any["config"], B, T)
    start = 0
    for c in chunks:
        for i, attn in enumerate(ours):
            x, positions = inputs[i]
            with torch.no_grad():
                out = attn(x[:, start : start + c], positions[start : start + c], cache.layer(i), mode)
            torch.testing.assert_close(out, full[i][:, start : start + c], atol=1e-5, rtol=1e-5)
        cache.advance(c)
        start += c


@pytest.mark.parametrize("controls", [
    {}, {"window": 3}, {"window": 1}, {"use_window": False}, {"dense": True}, {"use_compressed": False},
    {"index_topk": 1}, {"index_topk": 7},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "none")
def test_decode_steps_equal_the_dense_reference_under_every_attention_control(hf, controls):
    """The decode step's own path ("fast", one token, `_attend_step`: no masks, one matmul over the window and the
    entries) against the per-formula "naive" path step by step from the first token (so the ring fills, then
    wraps), with each run control that shapes the keys; the attention-mass probe too."""
    probes = ProbeRegistry()
    ours = build_ours(hf, probes)
    inputs = [full_input(hf, i)[:2] for i in range(len(ours))]
    caches = {mode: V4Cache(hf["config"], B, T) for mode in ("fast", "naive")}
    seen: dict[str, list[torch.Tensor]] = {"fast": [], "naive": []}
    for t in range(T):
        for mode, cache in caches.items():
            for i, attn in enumerate(ours):
                x, positions = inputs[i]
                with probes.listen(["blocks.*.attn.hook_attn_mass"], lambda n, v, m=mode: seen[m].append(v)), \
                        torch.no_grad():
                    out = attn(x[:, t : t + 1], positions[t : t + 1], cache.layer(i), mode, **controls)
                seen[mode].append(out)
            cache.advance(1)
    assert len(seen["fast"]) == len(seen["naive"]) == 2 * T * len(ours)
    for t, (got, want) in enumerate(zip(seen["fast"], seen["naive"], strict=True)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, t=t: f"output {t}: {m}")
    # the rings hold the same keys whatever path wrote them
    assert torch.equal(caches["fast"].layer(0).window, caches["naive"].layer(0).window)


# ---------------------------------------------------------------------------------------------------- probes


def test_probe_sites_exist_where_the_layer_kind_has_them(hf):
    probes = ProbeRegistry()
    build_ours(hf, probes)
    names = set(probes.names())
    for i in range(4):
        assert f"blocks.{i}.attn.hook_attn_mass" in names
        assert (f"blocks.{i}.attn.hook_compress_weights" in names) == (i != 0)
        assert (f"blocks.{i}.attn.hook_index_selected" in names) == (i in (1, 3))
        assert (f"blocks.{i}.attn.hook_index_scores" in names) == (i in (1, 3))


def test_probe_values_have_their_documented_meaning(hf):
    probes = ProbeRegistry()
    ours = build_ours(hf, probes)
    seen: dict[str, torch.Tensor] = {}
    with probes.listen(["blocks.*.attn.*"], lambda n, v: seen.__setitem__(n, v)), torch.no_grad():
        for i, attn in enumerate(ours):
            x, positions, _ = full_input(hf, i)
            attn(x, positions)
    nH = hf["config"].num_attention_heads
    for i in range(4):
        mass = seen[f"blocks.{i}.attn.hook_attn_mass"]
        assert mass.shape == (B, T, nH, 3)
        torch.testing.assert_close(mass.sum(-1), torch.ones(B, T, nH))
        assert (mass >= 0).all() and (mass[..., 2] > 0).all()  # the sink always takes some mass
    assert (seen["blocks.0.attn.hook_attn_mass"][..., 1] == 0).all()  # sliding only: nothing compressed
    assert (seen["blocks.2.attn.hook_attn_mass"][:, :7, :, 1] == 0).all()  # HCA: no entry before token 7
    assert (seen["blocks.2.attn.hook_attn_mass"][:, 7:, :, 1] > 0).all()
    for i, m, slots in ((1, 4, 8), (2, 8, 8), (3, 4, 8)):
        w = seen[f"blocks.{i}.attn.hook_compress_weights"]
        assert w.shape == (B, T // m, slots, 32)
        torch.testing.assert_close(w.sum(2), torch.ones(B, T // m, 32))
    # CSA entry 0 has no previous window: its first m slots carry no weight
    assert (seen["blocks.1.attn.hook_compress_weights"][:, 0, :4] == 0).all()
    scores = seen["blocks.1.attn.hook_index_scores"]
    assert scores.shape == (B, T, T // 4)
    invisible = torch.arange(T // 4)[None, :] >= ((torch.arange(T) + 1) // 4)[:, None]  # [S, N]
    assert torch.isneginf(scores[:, invisible]).all() and torch.isfinite(scores[:, ~invisible]).all()


def test_replacing_the_selection_through_its_probe_steers_attention(hf):
    """A listener that returns all -1 removes every compressed entry from a CSA layer: its compressed mass is 0."""
    probes = ProbeRegistry()
    attn = build_ours(hf, probes)[1]
    x, positions, ref = full_input(hf, 1)
    seen: dict[str, torch.Tensor] = {}
    with probes.listen(["blocks.1.attn.hook_index_selected"], lambda n, v: torch.full_like(v, -1)), \
            probes.listen(["blocks.1.attn.hook_attn_mass"], lambda n, v: seen.__setitem__("mass", v)), \
            torch.no_grad():
        blind = attn(x, positions)
    assert (seen["mass"][..., 1] == 0).all()
    assert (blind - ref).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- RoPE


def test_rope_tables_are_transformers(hf):
    rotary = hf["model"].model.rotary_emb
    cfg = hf["config"]
    torch.testing.assert_close(V4Rotary.main(cfg).inv_freq, rotary.main_inv_freq, atol=0, rtol=1e-6)
    torch.testing.assert_close(V4Rotary.compress(cfg).inv_freq, rotary.compress_inv_freq, atol=0, rtol=1e-6)
    assert not torch.allclose(rotary.main_inv_freq, rotary.compress_inv_freq)
    assert V4Rotary.for_layer(cfg, 0).inv_freq.equal(V4Rotary.main(cfg).inv_freq)
    assert V4Rotary.for_layer(cfg, 2).inv_freq.equal(V4Rotary.compress(cfg).inv_freq)


def test_one_position_rotates_by_a_matrix_equal_to_the_elementwise_rotation(hf):
    """A decode step's fast path (one fp32 position: x @ M) against `rotate_elementwise`, both tables (the
    compress one with YaRN), every width a step rotates (heads, keys, indexer queries), and the inverse."""
    cfg = hf["config"]
    g = torch.Generator().manual_seed(3)
    for rotary in (V4Rotary.main(cfg), V4Rotary.compress(cfg)):
        for position in (0, 7, 1023, 65535):
            cos, sin = rotary.cos_sin(torch.tensor([position]))
            for shape in ((2, 1, 4, 64), (3, 1, 64), (1, 1, 16, 32), (2, 1, rotary.dim)):
                x = torch.randn(*shape, generator=g) * 3
                y = rotary.rotate(x, cos, sin)
                assert torch.equal(y[..., : -rotary.dim], x[..., : -rotary.dim])  # identity rows: exact
                torch.testing.assert_close(y, rotary.rotate_elementwise(x, cos, sin), atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(rotary.unrotate(y, cos, sin), rotary.rotate_elementwise(y, cos, -sin),
                                           atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(rotary.unrotate(y, cos, sin), x, atol=1e-5, rtol=1e-5)
            # built once per (position, width) and reused: a step rotates q, keys and values with one matrix
            assert rotary.rotation_matrix(cos, sin, 64) is rotary.rotation_matrix(cos, sin, 64)
            assert rotary.rotation_matrix(cos, sin, 32).shape == (32, 32)
    # other dtypes and several positions take the elementwise path, unchanged
    rotary = V4Rotary.main(cfg)
    cos, sin = rotary.cos_sin(torch.arange(3))
    x = torch.randn(2, 3, 64, generator=g)
    assert torch.equal(rotary.rotate(x, cos, sin), rotary.rotate_elementwise(x, cos, sin))
    cos, sin = rotary.cos_sin(torch.tensor([9]))
    xb = x[:, :1].bfloat16()
    assert torch.equal(rotary.rotate(xb, cos, sin), rotary.rotate_elementwise(xb, cos, sin))


def test_rope_rotates_interleaved_pairs_in_place_and_unrotates():
    rotary = V4Rotary(4, 10000.0, None)
    x = torch.randn(2, 5, 3, 10, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5)
    cos, sin = rotary.cos_sin(positions)
    y = rotary.rotate(x, cos, sin)
    assert torch.equal(y[..., :6], x[..., :6])  # the non-rope channels are untouched
    # pair (6, 7) turns by angle t * inv_freq[0] = t: a plain 2-D rotation of that pair, in place
    t = positions.float().view(1, 5, 1)
    torch.testing.assert_close(y[..., 6], x[..., 6] * t.cos() - x[..., 7] * t.sin())
    torch.testing.assert_close(y[..., 7], x[..., 7] * t.cos() + x[..., 6] * t.sin())
    torch.testing.assert_close(rotary.unrotate(y, cos, sin), x, atol=1e-6, rtol=1e-6)
    # q·k of rotated vectors depends on the distance only
    q, k = torch.randn(10), torch.randn(10)
    dots = []
    for tq, tk in ((3, 1), (9, 7)):
        cq, sq = rotary.cos_sin(torch.tensor([tq]))
        ck, sk = rotary.cos_sin(torch.tensor([tk]))
        dots.append(float(rotary.rotate(q.view(1, 1, 10), cq, sq).flatten() @
                          rotary.rotate(k.view(1, 1, 10), ck, sk).flatten()))
    assert math.isclose(dots[0], dots[1], rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------------- quant sims


def _grid_round(x: torch.Tensor, grid: torch.Tensor, even: torch.Tensor) -> torch.Tensor:
    """Nearest value of `grid` (ties: the one flagged `even`), element by element, written out plainly."""
    out = torch.empty_like(x)
    for i, v in enumerate(x.flatten().tolist()):
        dist = [abs(v - g) for g in grid.tolist()]
        best = min(dist)
        tied = [j for j, dd in enumerate(dist) if dd == best]
        j = next((j for j in tied if even[j]), tied[0]) if len(tied) > 1 else tied[0]
        out.view(-1)[i] = grid[j]
    return out


def _pow2_scale(amax: float, qmax: float) -> float:
    """Smallest power of two s with amax / s <= qmax."""
    e = -200
    while amax / 2.0**e > qmax:
        e += 1
    return 2.0**e


def test_fp4_e2m1_fake_quant_is_round_to_nearest_even_with_pow2_scales():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g) * torch.tensor([0.01, 1.0, 30.0])[:, None]  # a ragged last block (8)
    x[0, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]) * 2**-7  # exact ties (scale 2^-7)
    mags = torch.tensor(E2M1_GRID)
    grid = torch.cat([-mags.flip(0), mags])
    even = torch.tensor([j % 2 == 0 for j in range(8)][::-1] + [j % 2 == 0 for j in range(8)])
    expected = torch.empty_like(x)
    for r in range(3):
        for start in range(0, 40, 32):
            block = x[r, start : start + 32]
            s = _pow2_scale(block.abs().max().item(), 6.0)
            expected[r, start : start + 32] = _grid_round(block / s, grid, even) * s
    got = fp4_e2m1_fake_quant(x)
    assert torch.equal(got, expected)
    assert torch.equal(got[0, :8] * 2**7, torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]))


def test_fp8_e4m3_fake_quant_matches_the_e4m3_grid_with_pow2_scales():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 80, generator=g) * torch.tensor([1e-3, 50.0])[:, None]  # blocks of 64: one full, one ragged
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes)]
    even = torch.tensor([int(c) % 2 == 0 for c in torch.arange(256)[torch.isfinite(codes)]])  # even code = even LSB
    expected = torch.empty_like(x)
    for r in range(2):
        for start in (0, 64):
            block = x[r, start : start + 64]
            s = _pow2_scale(max(block.abs().max().item(), 1e-4), 448.0)
            expected[r, start : start + 64] = _grid_round(block / s, grid, even) * s
    assert torch.equal(fp8_e4m3_fake_quant(x), expected)


def test_hadamard_rotation_is_the_normalised_sylvester_matrix():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    h16 = h2
    for _ in range(3):
        h16 = torch.kron(h16, h2)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hadamard_rotate(x), x @ h16 / 4.0)
    torch.testing.assert_close(hadamard_rotate(hadamard_rotate(x)), x, atol=1e-6, rtol=1e-6)  # orthogonal, H=H^T
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_rotate(torch.randn(2, 24))


def test_reference_quant_is_off_by_default_and_simulates_deepseek_when_on(hf):
    ours = build_ours(hf)
    assert not any(a.simulate_kv_fp8 or a.simulate_indexer_fp4 for a in ours)
    model = torch.nn.ModuleList(ours)
    assert set_reference_quant(model, kv_fp8=True, indexer_fp4=True) == 4
    cfg = hf["config"]
    cache = V4Cache(cfg, B, T)
    with torch.no_grad():
        outs = []
        for i, attn in enumerate(ours):
            x, positions, ref = full_input(hf, i)
            out = attn(x, positions, cache.layer(i))
            err = (out - ref).abs()
            # a perturbation, not another model (FP4 index scores may flip a few selections: max error is larger)
            assert 0 < err.mean() < 0.15 * ref.abs().mean(), f"layer {i}: {err.mean()} vs {ref.abs().mean()}"
            outs.append(out)
    cache.advance(T)
    R = cfg.qk_rope_head_dim
    layer = cache.layer(1)
    assert layer.compressor is not None and layer.indexer is not None
    for stored in (layer.window, layer.compressor.entries):  # KV nope channels on the FP8 grid, rope exact
        assert torch.equal(fp8_e4m3_fake_quant(stored[..., :-R]), stored[..., :-R])
    x, positions, _ = full_input(hf, 1)
    assert not torch.equal(fp8_e4m3_fake_quant(x[..., :24]), x[..., :24])  # (the check can fail)
    keys = layer.indexer.entries  # indexer keys: Hadamard-rotated, then on the FP4 grid
    assert torch.equal(fp4_e2m1_fake_quant(keys), keys)
    plain = ours[1].compressor.indexer  # type: ignore[union-attr]
    with torch.no_grad():
        exact = plain.compress(x, 0, None)  # type: ignore[union-attr, operator]
    torch.testing.assert_close(indexer_fp4_fake_quant(exact), keys, atol=0, rtol=0)
    set_reference_quant(model, kv_fp8=False, indexer_fp4=False)
    with torch.no_grad():
        for i, attn in enumerate(ours):
            x, positions, ref = full_input(hf, i)
            torch.testing.assert_close(attn(x, positions), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_input_is_refused_with_a_clear_error(hf):
    ours = build_ours(hf)
    x, positions, _ = full_input(hf, 1)
    with pytest.raises(ValueError, match="mode must be 'naive' or 'fast'"):
        ours[1](x, positions, None, "absorb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"continue from the start"):
        ours[1](x, positions + 1)
    with pytest.raises(ValueError, match=r"\[S=48\] integer tensor"):
        ours[1](x, positions.float())
    with pytest.raises(ValueError, match=r"must be \[B, S, 64\]"):
        ours[1](x[..., :32], positions)
    cache = V4Cache(hf["config"], B, 16)
    with pytest.raises(ValueError, match="handed the cache of layer 2"):
        ours[1](x[:, :4], positions[:4], cache.layer(2))
    with pytest.raises(ValueError, match="holds batch 2, got batch 1"):
        ours[1](x[:1, :4], positions[:4], cache.layer(1))
    with pytest.raises(ValueError, match="cache full"):
        ours[1](x[:, :20], positions[:20], cache.layer(1))
    with pytest.raises(ValueError, match=r"expected 0\.\.3"):
        ours[1](x[:, :4], positions[4:8], cache.layer(1))
    with pytest.raises(ValueError, match="needs a deepseek_v4 config"):
        V4Attention(ModelConfig(), 0, ProbeRegistry())
    with pytest.raises(ValueError, match="no V4Attention"):
        set_reference_quant(torch.nn.Linear(2, 2), kv_fp8=True, indexer_fp4=False)
    odd_indexer = V4Attention(hf["config"].replace(index_head_dim=12), 1, ProbeRegistry())
    with pytest.raises(ValueError, match="power-of-two index_head_dim, got 12"):
        set_reference_quant(odd_indexer, kv_fp8=False, indexer_fp4=True)
    assert not odd_indexer.simulate_indexer_fp4


def test_scaling_the_queries_is_exact_where_the_scale_is_a_power_of_two():
    """The dense path scales q instead of the logits only where 1/sqrt(head_dim) is a power of two (the bundled
    model's 64): then the two orders give the same logits bit for bit."""
    from workbench.loader import load_model

    model = load_model("default").model
    attns = [layer.self_attn for layer in model.layers]
    assert model.config.head_dim == 64 and all(a.scale_queries for a in attns)
    assert not V4Attention(model.config.replace(head_dim=32), 0, ProbeRegistry()).scale_queries  # 1/sqrt(32)
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        folded = model(ids, mode="naive")
        for a in attns:
            a.scale_queries = False
        try:
            plain = model(ids, mode="naive")
        finally:
            for a in attns:
                a.scale_queries = True
    assert torch.equal(folded, plain)
