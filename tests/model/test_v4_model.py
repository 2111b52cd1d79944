"""The whole DeepSeek-V4 model (family v4: V4Block, mHC, V4 MoE, HyperHead) against transformers 5.24's
DeepseekV4ForCausalLM in fp32 eager, with every parameter and buffer randomized.

Two configs: brief §4's smallest covering one ([sliding, CSA, HCA, CSA], rates 4/8, hash routing on a sliding and
a CSA layer, YaRN on the compressed table only, sqrtsoftplus, swiglu_limit 1 so the clamp fires) and a second with
other rates (HCA 16), window, hc_mult 2, one hash layer, top-3 sigmoid scoring and no YaRN.
Tolerance: logits within 1e-5 of the largest |logit| (fp32 through 4-5 layers of reassociated sums: measured
~1e-6). Ties would make top-k choices implementation-defined, so the tests assert margins at every top-k boundary
(router choice scores; indexer scores, with 16 indexer heads) before comparing selections.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workbench.config import CSA, ModelConfig
from workbench.model.transformer import DeepSeekModel
from workbench.model.v4.block import V4Block
from workbench.model.v4.cache import V4Cache
from workbench.session import Session

transformers = pytest.importorskip("transformers", minversion="5.24")

LOGIT_RTOL = 1e-5  # of max |logit|
MARGIN = 1e-4  # smallest accepted gap at a top-k boundary

COVERING: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, moe_intermediate_size=24, num_hidden_layers=4,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], num_attention_heads=4, head_dim=32, qk_rope_head_dim=8,
    q_lora_rank=24, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    routed_scaling_factor=1.5, index_n_heads=16, index_head_dim=16, index_topk=3, sliding_window=8, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=1.0, scoring_func="sqrtsoftplus",
    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1},
    max_position_embeddings=128)
SECOND: dict[str, Any] = {
    **COVERING, "num_hidden_layers": 5,
    "layer_types": ["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention",
                    "compressed_sparse_attention", "heavily_compressed_attention"],
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    "mlp_layer_types": ["hash_moe", "moe", "moe", "moe", "moe"], "num_experts_per_tok": 3, "scoring_func": "sigmoid",
    "sliding_window": 12, "hc_mult": 2, "hc_sinkhorn_iters": 7, "index_topk": 5, "routed_scaling_factor": 2.0,
    "swiglu_limit": 0.7, "rope_scaling": None, "rope_theta": 5000.0, "compress_rope_theta": 40000.0}
CONFIGS = {"covering": COVERING, "second": SECOND}


def randomize_transformers(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer random (transformers zero-initialises tid2eid, sinks, position biases, hc bases and
    the balancing bias, which would hide errors in them)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("hc.scale", "hc_scale")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("sinks", "position_bias", "hc.base", "hc_base")):
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
            elif name.endswith("tid2eid"):  # distinct experts per token
                b.copy_(torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=gen).argsort(-1)
                        [:, : cfg.num_experts_per_tok])


def to_ours(state: dict[str, torch.Tensor], I: int) -> dict[str, torch.Tensor]:
    """transformers' state dict -> ours: `model.` dropped, gate_up_proj [E, 2I, D] split into stacked gate / up."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if "rotary_emb" in name:
            continue
        name = name.removeprefix("model.")
        if name.endswith("experts.gate_up_proj"):
            out[name.replace("gate_up_proj", "gate_proj")] = t[:, :I].clone()
            out[name.replace("gate_up_proj", "up_proj")] = t[:, I:].clone()
        else:
            out[name] = t.clone()
    return out


_PAIRS: dict[str, tuple[DeepSeekModel, torch.nn.Module]] = {}


def pair(which: str) -> tuple[DeepSeekModel, torch.nn.Module]:
    """(ours, transformers') with the same random weights; built once per config (the tests only read them)."""
    if which not in _PAIRS:
        tf_cfg = transformers.DeepseekV4Config(**CONFIGS[which])
        tf_cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        theirs = transformers.DeepseekV4ForCausalLM(tf_cfg).eval()
        randomize_transformers(theirs, seed=len(which))
        theirs.generation_config.eos_token_id = None  # generate exactly n tokens, as ours does without eos
        ours = DeepSeekModel(ModelConfig.from_hf_dict(tf_cfg.to_dict())).eval()
        ours.load_state_dict(to_ours(theirs.state_dict(), tf_cfg.moe_intermediate_size), strict=True)
        _PAIRS[which] = ours, theirs
    return _PAIRS[which]


def tokens(which: str, T: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CONFIGS[which]["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= LOGIT_RTOL, f"max |Δlogit| / max |logit| = {err:.2e} > {LOGIT_RTOL}"


def assert_margins(ours: DeepSeekModel, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Run ours, check every top-k boundary is clear of ties, return our per-layer expert ids [T, k]."""
    c = ours.config
    sites = [f"blocks.{L}.mlp.hook_router_scores" for L in range(c.num_hidden_layers) if not c.is_hash_layer(L)]
    sites += [f"blocks.{L}.mlp.hook_expert_indices" for L in range(c.num_hidden_layers)]
    sites += [f"blocks.{L}.attn.hook_index_scores" for L in range(c.num_hidden_layers) if c.attention_kind(L) == CSA]
    seen: dict[str, torch.Tensor] = {}
    with ours.probes.listen(sites, lambda name, v: seen.__setitem__(name, v)), torch.no_grad():
        ours(ids)
    for L in range(c.num_hidden_layers):
        if not c.is_hash_layer(L):
            block = ours.layers[L]
            assert isinstance(block, V4Block)
            choice = (seen[f"blocks.{L}.mlp.hook_router_scores"] + block.mlp.gate.e_score_correction_bias)
            top = choice.sort(-1, descending=True).values
            k = c.num_experts_per_tok
            assert float((top[:, k - 1] - top[:, k]).min()) > MARGIN, f"layer {L}: router tie at the top-k boundary"
        name = f"blocks.{L}.attn.hook_index_scores"
        if name in seen:
            scores = seen[name].sort(-1, descending=True).values  # [B, S, N], future entries -inf
            k = c.index_topk
            if scores.shape[-1] > k:
                a, b = scores[..., k - 1], scores[..., k]
                live = torch.isfinite(b)
                assert live.any() and float((a - b)[live].min()) > MARGIN, f"layer {L}: indexer tie at top-k"
    return {L: seen[f"blocks.{L}.mlp.hook_expert_indices"] for L in range(c.num_hidden_layers)}


@pytest.mark.parametrize("which", list(CONFIGS))
def test_logits_match_transformers(which: str) -> None:
    ours, theirs = pair(which)
    ids = tokens(which, 48)
    with torch.no_grad():
        want = theirs(ids).logits
        got = ours(ids)
        fast = ours(ids, mode="absorb")
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_logits_close(got, want)
    assert_logits_close(fast, want)


@pytest.mark.parametrize("which", list(CONFIGS))
def test_expert_ids_match_transformers_per_layer(which: str) -> None:
    ours, theirs = pair(which)
    ids = tokens(which, 48, seed=8)  # a seed whose every top-k boundary clears MARGIN (the guard checks it)
    got = assert_margins(ours, ids)
    theirs_ids: dict[int, torch.Tensor] = {}
    handles = [layer.mlp.gate.register_forward_hook(
        lambda _m, _a, out, L=L: theirs_ids.__setitem__(L, out[2])) for L, layer in enumerate(theirs.model.layers)]
    try:
        with torch.no_grad():
            theirs(ids)
    finally:
        for h in handles:
            h.remove()
    for L in range(ours.config.num_hidden_layers):
        assert torch.equal(got[L].sort(-1).values, theirs_ids[L].sort(-1).values), f"layer {L}"


@pytest.mark.parametrize(("which", "mode"), [("covering", "naive"), ("second", "absorb")])
def test_cached_chunked_prefill_and_decode_match_one_forward(which: str, mode: str) -> None:
    """Prefill 13 + 17 (crossing CSA and HCA window ends, leaving partial buffers), then 12 single-token steps.
    ("absorb" is V4's fast attention path; generate, below, runs it with a cache on both configs too.)"""
    ours, theirs = pair(which)
    T = 42
    ids = tokens(which, T, seed=2)
    with torch.no_grad():
        want = theirs(ids).logits
        cache = ours.new_cache(2, T)
        assert isinstance(cache, V4Cache)
        chunks = [ours(ids[:, :13], cache=cache, mode=mode), ours(ids[:, 13:30], cache=cache, mode=mode)]
        chunks += [ours(ids[:, t : t + 1], cache=cache, mode=mode) for t in range(30, T)]  # 12 single-token steps
    assert cache.length == T
    assert_logits_close(torch.cat(chunks, dim=1), want)


@pytest.mark.parametrize("which", list(CONFIGS))
def test_greedy_generation_is_token_identical(which: str) -> None:
    ours, theirs = pair(which)
    prompt = tokens(which, 14, seed=3)
    n = 10
    with torch.no_grad():  # an explicit mask: else generate takes token 0 in the prompt for padding
        want = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                               pad_token_id=0)
    assert want.shape == (2, 14 + n)
    assert torch.equal(ours.generate(prompt, n), want)


def test_forward_from_reruns_the_tail_from_stored_streams() -> None:
    ours, _ = pair("covering")
    ids = tokens("covering", 20, seed=4)
    residuals: list[torch.Tensor] = []
    with torch.no_grad():
        full = ours.forward_from(0, ours.embed_tokens(ids).unsqueeze(2).expand(-1, -1, 4, -1).contiguous(),
                                 residuals=residuals, input_ids=ids)
        assert [r.shape for r in residuals] == [(2, 20, 4, 64)] * 4
        torch.testing.assert_close(full, ours(ids), rtol=0, atol=0)
        tail = ours.forward_from(2, residuals[2])  # layers 2, 3 are score-routed: no token ids needed
    torch.testing.assert_close(tail, full, rtol=0, atol=0)


def test_hash_layers_without_token_ids_raise_naming_the_layer() -> None:
    ours, _ = pair("covering")
    ids = tokens("covering", 6)
    streams = ours.embed_tokens(ids).unsqueeze(2).expand(-1, -1, 4, -1).contiguous()
    with pytest.raises(ValueError, match="layer 0 is hash-routed .* needs the token ids"), torch.no_grad():
        ours.forward_from(0, streams)
    residuals: list[torch.Tensor] = []
    with torch.no_grad():
        ours.forward_from(0, streams, input_ids=ids, residuals=residuals)
        with pytest.raises(ValueError, match="layer 1 is hash-routed"):
            ours.forward_from(1, residuals[1])


def test_bad_inputs_name_what_was_wrong() -> None:
    ours, _ = pair("covering")
    ids = tokens("covering", 6)
    with pytest.raises(ValueError, match=r"residual streams \[batch, seq, hc_mult=4, hidden=64\], got shape \(2, 6, 64\)"):
        ours.forward_from(2, ours.embed_tokens(ids))
    streams = torch.zeros(2, 6, 4, 64)
    with pytest.raises(ValueError, match=r"input_ids \(2, 5\) do not match"):
        ours.forward_from(0, streams, input_ids=ids[:, :5])
    with pytest.raises(ValueError, match="caches in a V4Cache"):
        ours(ids, cache=DeepSeekModel.random(ModelConfig()).new_cache(2, 8))
    with pytest.raises(ValueError, match="mode must be 'naive' or 'absorb'"):
        ours(ids, mode="fast")  # type: ignore[arg-type]


def test_probe_sites_of_a_v4_block() -> None:
    ours, _ = pair("second")
    names = ours.probes.names()
    for site in ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hc_attn.hook_mix",
                 "blocks.1.hc_ffn.hook_mix", "blocks.0.mlp.hook_expert_indices", "blocks.0.mlp.hook_router_scores"):
        assert site in names
    ids = tokens("second", 9, B=1)
    seen: dict[str, torch.Tensor] = {}
    with ours.probes.listen(["blocks.1.hook_resid_pre", "blocks.1.hc_ffn.hook_mix", "blocks.0.mlp.hook_expert_indices"],
                            lambda name, v: seen.__setitem__(name, v)), torch.no_grad():
        ours(ids)
    assert seen["blocks.1.hook_resid_pre"].shape == (1, 9, 2, 64)
    assert seen["blocks.1.hc_ffn.hook_mix"].shape == (1, 9, 2, 2)
    block0 = ours.layers[0]
    assert isinstance(block0, V4Block) and block0.mlp.gate.tid2eid is not None
    assert torch.equal(seen["blocks.0.mlp.hook_expert_indices"], block0.mlp.gate.tid2eid[ids[0]])  # hash ids recorded


def test_state_dict_names_are_transformers_minus_model_prefix() -> None:
    ours, theirs = pair("covering")
    want = set(to_ours(theirs.state_dict(), 24))
    assert set(ours.state_dict()) == want
    assert "layers.0.mlp.gate.tid2eid" in want and "layers.2.mlp.gate.e_score_correction_bias" in want
    assert "layers.0.mlp.gate.e_score_correction_bias" not in want
    assert {"hc_head.hc_fn", "hc_head.hc_base", "hc_head.hc_scale"} <= want


def test_random_v4_model_is_usable() -> None:
    cfg = ModelConfig.from_hf_dict(transformers.DeepseekV4Config(**COVERING).to_dict())
    model = DeepSeekModel.random(cfg, seed=3)
    block = model.layers[0]
    assert isinstance(block, V4Block) and block.mlp.gate.tid2eid is not None
    table = block.mlp.gate.tid2eid
    assert table.shape == (96, 2) and (table[:, 0] != table[:, 1]).all() and table.min() >= 0 and table.max() < 8
    assert len({tuple(r) for r in table.tolist()}) > 20  # not one row repeated
    assert torch.equal(block.attn_hc.scale.detach(), torch.ones(3)) and not block.attn_hc.base.detach().any()
    assert torch.equal(model.norm.weight.detach(), torch.ones(64))
    ids = tokens("covering", 30, B=1)
    with torch.no_grad():
        logits = model(ids)
    assert torch.isfinite(logits).all() and logits.std() > 0
    out = model.generate(ids[:, :5], 6)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids[:, :5])
    assert torch.equal(DeepSeekModel.random(cfg, seed=3).layers[1].mlp.gate.tid2eid, model.layers[1].mlp.gate.tid2eid)


def test_live_sessions_run_v4() -> None:  # the controls themselves: tests/test_session_v4.py
    ours, _ = pair("covering")
    session = Session(ours, [3, 4, 5], continuation=2)  # the prompt runs on a V4Cache for the continuation
    assert torch.equal(session.result.logits, ours(torch.tensor([[3, 4, 5]]), cache=ours.new_cache(1, 5))[0])
