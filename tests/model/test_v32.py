"""DeepSeek-V3.2 (the lightning indexer masking MLA) against transformers' DeepseekV32ForCausalLM, fp32 eager.

Every parameter and buffer is random (tests/hf_models.py): weights std 0.15, norms 1 + 0.1 N, the indexer's k_norm
bias and the balancing bias 0.05 N. With 16 index heads no index score is an exact ReLU zero, and the top-k boundary
gap is asserted (else the data, not the code, would decide a selection).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import workbench as wb
from tests.hf_models import V32_VARIANTS, build_hf, save_hf
from workbench.checkpoint import load_checkpoint, save_checkpoint
from workbench.model.cache import LatentKVCache
from workbench.model.indexer import LightningIndexer
from workbench.model.transformer import DeepSeekModel
from workbench.probes import ProbeRegistry

transformers = pytest.importorskip("transformers")

T = 48  # > index_topk of every variant: the selection is live from the 7th (12th) token on
PREFILL = 20
IDS = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(1))
TIE_MARGIN = 1e-4  # fp32 scores of size ~1 differ by ~1e-6 between implementations: 100x that is a safe gap


@pytest.fixture(scope="module", params=V32_VARIANTS, ids=[v[0] for v in V32_VARIANTS])
def pair(request, tmp_path_factory) -> tuple[torch.nn.Module, DeepSeekModel, Path]:
    """(transformers' model, ours loaded from its save_pretrained folder, that folder)."""
    name, overrides = request.param
    hf = build_hf("deepseek_v32", overrides)
    path = save_hf(hf, tmp_path_factory.mktemp(name) / "ckpt")
    return hf, load_checkpoint(path), path


@pytest.fixture(scope="module")
def hf_runs(pair) -> dict[str, object]:
    """transformers' greedy continuation of the prompt and its cache after a full forward, once per variant."""
    hf = pair[0]
    prompt = IDS[:, :PREFILL]
    with torch.no_grad():
        tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=T - PREFILL,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # the mask: else 0 reads as padding
        out = hf(IDS, use_cache=True)
    return {"tokens": tokens, "cache": getattr(out, "cache", None) or out.past_key_values}


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Within 1e-5 relative to the logits' scale: fp32 with another summation order (MLA split into nope + rope
    parts, the indexer's einsums) is ~1e-6; a wrong selected key or expert moves logits by >= 1e-2."""
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"{what}: max |diff| {err:.3g} on logits up to {want.abs().max():.3g}"


def _hf_selections(hf: torch.nn.Module) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], list]:
    """Forward hooks collecting, per layer, transformers' indexer output [B, S, k] and the MoE experts [T, k]."""
    selected: dict[int, torch.Tensor] = {}
    experts: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.self_attn.indexer.register_forward_hook(
            lambda _m, _i, out, i=i: selected.__setitem__(i, out.long())))
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):  # out = (router_logits, topk_weights, topk_indices)
            handles.append(gate.register_forward_hook(lambda _m, _i, out, i=i: experts.__setitem__(i, out[2])))
    return selected, experts, handles


def _as_causal_sets(selected: torch.Tensor, past: int = 0) -> list[list[set[int]]]:
    """[B, S, k] positions -> per query the set of selected keys it may see (transformers' top-k also returns
    future keys for the first queries, which its causal mask then drops; ours marks them -1)."""
    B, S, _ = selected.shape
    return [[{int(p) for p in selected[b, s] if 0 <= p <= past + s} for s in range(S)] for b in range(B)]


def _assert_top_k_gaps(scores: torch.Tensor, k: int) -> None:
    """Where a query has more than k causal keys, its k-th and (k+1)-th index scores must differ by TIE_MARGIN."""
    top = scores.sort(dim=-1, descending=True).values  # [B, S, T]
    rows = torch.isfinite(top[..., k])  # queries with > k causal keys
    gap = (top[..., k - 1] - top[..., k])[rows]
    assert rows.any() and gap.min() > TIE_MARGIN, f"test data has a near-tie at the top-{k} boundary: {gap.min():.3g}"


@torch.no_grad()
def test_logits_selections_and_experts_match_transformers(pair) -> None:
    hf, ours, _ = pair
    hf_selected, hf_experts, handles = _hf_selections(hf)
    ref = hf(IDS).logits.float()
    for h in handles:
        h.remove()
    seen: dict[str, torch.Tensor] = {}
    sites = ["blocks.*.attn.hook_index_scores", "blocks.*.attn.hook_index_selected", "blocks.*.mlp.hook_expert_indices"]
    with ours.probes.listen(sites, lambda name, value: seen.__setitem__(name, value)):
        _close(ours(IDS, mode="naive"), ref, "naive")
    _close(ours(IDS, mode="absorb"), ref, "absorb")
    k = ours.config.index_topk
    assert sorted(hf_selected) == list(range(ours.config.num_hidden_layers))
    for layer, theirs in hf_selected.items():
        scores, mine = seen[f"blocks.{layer}.attn.hook_index_scores"], seen[f"blocks.{layer}.attn.hook_index_selected"]
        assert scores.shape == (2, T, T) and mine.shape == (2, T, k) and mine.dtype == torch.int64
        assert torch.isinf(scores[0].triu(diagonal=1)[torch.ones(T, T).triu(diagonal=1).bool()]).all()
        _assert_top_k_gaps(scores, k)
        assert _as_causal_sets(mine) == _as_causal_sets(theirs), f"layer {layer}: selections differ"
        assert (mine[:, : k - 1] == -1).any() and (mine[:, k - 1 :] >= 0).all()  # -1 only while < k keys exist
    assert sorted(hf_experts) == list(ours.config.moe_layers)
    for layer, theirs in hf_experts.items():
        mine = seen[f"blocks.{layer}.mlp.hook_expert_indices"]
        assert torch.equal(mine.sort(dim=-1).values, theirs.sort(dim=-1).values), f"layer {layer}: experts differ"


@torch.no_grad()
def test_the_loaders_read_a_save_pretrained_folder_and_transformers_reads_ours(pair, tmp_path) -> None:
    hf, ours, path = pair
    names = {n for n, _ in ours.named_parameters()}
    assert {f"layers.0.self_attn.indexer.{n}" for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                                         "weights_proj.weight")} <= names
    loaded = wb.load_model(path)
    assert loaded.model.config.model_type == "deepseek_v32"
    _close(loaded.model(IDS[:1], mode="absorb"), hf(IDS[:1]).logits.float(), "wb.load_model")
    save_checkpoint(ours, tmp_path)  # and back: the same HF names, experts per expert
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(back(IDS).logits, hf(IDS).logits)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
@torch.no_grad()
def test_chunked_prefill_and_decode_equal_the_full_forward(pair, hf_runs, mode) -> None:
    _, ours, _ = pair
    full = ours(IDS, mode=mode)
    cache = ours.new_cache(2, T)
    steps = [ours(IDS[:, :13], cache=cache, mode=mode), ours(IDS[:, 13:PREFILL], cache=cache, mode=mode)]
    steps += [ours(IDS[:, t : t + 1], cache=cache, mode=mode) for t in range(PREFILL, T)]
    _close(torch.cat(steps, dim=1), full, f"{mode}: prefill 13 + 7, then {T - PREFILL} decode steps")
    # the cache keeps the indexer keys post-LayerNorm post-RoPE, as transformers' DynamicIndexedLayer does
    hf_cache = hf_runs["cache"]
    assert cache.index_keys is not None
    for layer in range(ours.config.num_hidden_layers):
        torch.testing.assert_close(cache.index_keys[layer], hf_cache.layers[layer].indexer_keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
@torch.no_grad()
def test_greedy_generation_is_token_identical(pair, hf_runs, mode) -> None:
    ours = pair[1]
    assert torch.equal(ours.generate(IDS[:, :PREFILL], T - PREFILL, mode=mode), hf_runs["tokens"])


@torch.no_grad()
def test_a_budget_covering_every_key_is_v3_exactly(pair) -> None:
    """index_topk >= T: every causal key is kept, so the model is DeepSeek-V3 with the same weights (minus the
    indexer), bit for bit: the same ops run (no mask), not merely close ones."""
    _, sparse, _ = pair
    dense32 = DeepSeekModel(sparse.config.replace(index_topk=T)).eval()
    dense32.load_state_dict(sparse.state_dict())
    v3 = DeepSeekModel(sparse.config.replace(model_type="deepseek_v3", index_n_heads=0, index_head_dim=0,
                                             index_topk=0)).eval()
    v3.load_state_dict({n: t for n, t in sparse.state_dict().items() if ".indexer." not in n})
    for mode in ("naive", "absorb"):
        assert torch.equal(dense32(IDS, mode=mode), v3(IDS, mode=mode))
        with dense32.probes.listen(["blocks.*.attn.hook_index_*"], lambda n, v: None):  # observing changes nothing
            assert torch.equal(dense32(IDS, mode=mode), v3(IDS, mode=mode))
        assert torch.equal(dense32.generate(IDS[:, :PREFILL], 6, mode=mode), v3.generate(IDS[:, :PREFILL], 6, mode=mode))
    # the sparse model really is sparse: its top-k mask moves the logits
    assert (sparse(IDS) - v3(IDS)).abs().max() > 1e-2


@torch.no_grad()
def test_a_replaced_selection_is_what_the_attention_sees(pair) -> None:
    """Replaying the sparse model's selections into a model whose budget covers everything gives the sparse
    logits: a listener's selection is honoured even where the indexer would keep every key."""
    _, sparse, _ = pair
    recorded: dict[str, torch.Tensor] = {}
    with sparse.probes.listen(["blocks.*.attn.hook_index_selected"], lambda n, v: recorded.__setitem__(n, v)):
        want = sparse(IDS)
    dense = DeepSeekModel(sparse.config.replace(index_topk=T)).eval()
    dense.load_state_dict(sparse.state_dict())
    k = sparse.config.index_topk

    def replay(name: str, value: torch.Tensor) -> torch.Tensor:
        return torch.cat([recorded[name], torch.full((2, T, T - k), -1)], dim=-1)  # [B, S, T]: k chosen, rest none

    with dense.probes.listen(["blocks.*.attn.hook_index_selected"], replay):
        torch.testing.assert_close(dense(IDS), want, atol=1e-6, rtol=1e-6)
    with dense.probes.listen(["blocks.1.attn.hook_index_selected"], lambda n, v: v + T), \
            pytest.raises(ValueError, match=r"blocks\.1\.attn\.hook_index_selected: a replaced selection holds "
                                            r"position \d+, outside -1\.\.47"):
        dense(IDS)


@torch.no_grad()
def test_sparse_decode_on_the_kernel_attends_to_the_selected_rows(pair) -> None:
    """The absorbed decode step on `mla_decode` (Triton's CPU interpreter here) reads only the k selected rows."""
    _, ours, _ = pair
    cache = ours.new_cache(2, 34)
    want = [ours(IDS[:, :30], cache=cache, mode="absorb")] + [
        ours(IDS[:, t : t + 1], cache=cache, mode="absorb") for t in range(30, 34)]
    wb.set_backend(ours, "triton", modules="attn_decode")
    try:
        cache = ours.new_cache(2, 34)
        got = [ours(IDS[:, :30], cache=cache, mode="absorb")] + [
            ours(IDS[:, t : t + 1], cache=cache, mode="absorb") for t in range(30, 34)]
    finally:
        wb.set_backend(ours, "auto", modules="attn_decode")
    _close(torch.cat(got, dim=1), torch.cat(want, dim=1), "decode on the kernel")


def test_v32_is_v3_plus_the_indexer_parameters() -> None:
    tiny = wb.ModelConfig.from_name("tiny")
    v32 = DeepSeekModel(tiny.replace(model_type="deepseek_v32", index_n_heads=4, index_head_dim=16, index_topk=8))
    extra = set(v32.state_dict()) - set(DeepSeekModel(tiny).state_dict())
    assert extra == {f"layers.{i}.self_attn.indexer.{n}" for i in range(tiny.num_hidden_layers)
                     for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")}
    assert set(DeepSeekModel(tiny).state_dict()) < set(v32.state_dict())
    assert v32.family.model_type == "deepseek_v32" and "blocks.2.attn.hook_index_selected" in v32.probes.names()
    with pytest.raises(ValueError, match="q_lora_rank must be set"):
        LightningIndexer(tiny.replace(q_lora_rank=None, index_n_heads=4, index_head_dim=16, index_topk=8), 0,
                         ProbeRegistry())


def test_only_v32_caches_keep_index_keys() -> None:
    v32 = wb.ModelConfig.from_name("deepseek-v3.2").replace(num_hidden_layers=2, max_position_embeddings=64)
    cache = LatentKVCache(v32, batch=1, max_len=8)
    assert cache.index_keys is not None and cache.index_keys.shape == (2, 1, 8, 128)
    cache.append(0, torch.zeros(1, 3, 512), torch.zeros(1, 3, 64))
    cache.append_index_keys(0, torch.zeros(1, 3, 128))
    cache.advance(3)
    assert cache.nbytes_used() == 3 * 2 * (512 + 64 + 128) * 4
    v3 = LatentKVCache(v32.replace(model_type="deepseek_v3"), batch=1, max_len=8)
    assert v3.index_keys is None
    with pytest.raises(ValueError, match="keeps no indexer keys"):
        v3.append_index_keys(0, torch.zeros(1, 1, 128))
