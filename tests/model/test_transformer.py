"""Input checks, generation, costs and probes of the DeepSeek model."""

from __future__ import annotations

import warnings

import pytest
import torch

from workbench.config import PRESETS
from workbench.model.costs import estimate_flops, kv_bytes_per_token, parameter_counts
from workbench.model.transformer import DeepSeekModel


@pytest.fixture(scope="module")
def tiny():
    return DeepSeekModel.random(PRESETS["tiny"], seed=1)


@pytest.mark.parametrize(("ids", "message"), [
    (torch.tensor([[1, 2, 512]]), r"token id 512 at position \[0, 2\] is outside the vocabulary \[0, 512\)"),
    (torch.tensor([[-1, 2]]), "token id -1"),
    (torch.zeros(1, 0, dtype=torch.long), "empty input"),
    (torch.zeros(1, 1025, dtype=torch.long), "beyond max_position_embeddings=1024"),
    (torch.tensor([1, 2]), r"must be \[batch, seq\]"),
    (torch.tensor([[1.0, 2.0]]), "integer tensor"),
])
def test_bad_input_is_named(tiny, ids, message):
    with pytest.raises(ValueError, match=message):
        tiny(ids)


def test_sampling_is_reproducible_and_differs_from_greedy(tiny):
    ids = torch.tensor([[5, 6, 7]])
    a = tiny.generate(ids, 8, temperature=1.0, top_k=50, seed=7)
    b = tiny.generate(ids, 8, temperature=1.0, top_k=50, seed=7)
    assert torch.equal(a, b) and a.shape == (1, 11)
    greedy = tiny.generate(ids, 8)
    assert not torch.equal(a, greedy)
    assert torch.equal(greedy, tiny.generate(ids, 8, mode="naive"))
    with pytest.raises(ValueError, match="top_p must be in"):
        tiny.generate(ids, 2, temperature=1.0, top_p=1.5)


def test_generate_stops_at_the_position_limit_and_says_so(tiny):
    ids = torch.ones(1, 1020, dtype=torch.long)
    with pytest.warns(UserWarning, match=r"only 4 of the 50 new tokens asked for fit: the prompt's 1020 tokens plus 50 "
                                         r"would pass max_position_embeddings=1024") as record:
        assert tiny.generate(ids, 50).shape == (1, 1024)
    assert [w.filename for w in record] == [__file__]  # the warning points at the caller, not at torch's wrapper
    with pytest.warns(UserWarning, match="only 0 of the 3 new tokens"):
        assert tiny.generate(torch.ones(1, 1024, dtype=torch.long), 3).shape == (1, 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly up to the limit, or nothing asked: no warning
        assert tiny.generate(torch.ones(1, 1000, dtype=torch.long), 24).shape == (1, 1024)
        assert tiny.generate(torch.ones(1, 1024, dtype=torch.long), 0).shape == (1, 1024)


def test_generate_runs_one_forward_per_new_token(tiny):
    """The prefill gives the first token, each decode step one more; the last token needs no forward of its own."""
    calls = []
    handle = tiny.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[1]))
    try:
        out = tiny.generate(torch.tensor([[5, 6, 7]]), 4)
    finally:
        handle.remove()
    assert out.shape == (1, 7) and calls == [3, 1, 1, 1]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0, got -1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an int >= 0, got 2.5"),
    ({"max_new_tokens": True}, "max_new_tokens must be an int >= 0, got True"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0, got inf"),
    ({"temperature": 1.0, "top_k": 0}, "top_k must be >= 1"),
    ({"temperature": 1.0, "top_k": 2.5}, r"top_k must be >= 1 \(an int\), got 2.5"),
    ({"temperature": 1.0, "top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),  # refused under greedy too, where it was silently ignored
])
def test_bad_generate_arguments_are_named_before_any_forward(tiny, kwargs, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    calls = []
    handle = tiny.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            tiny.generate(torch.tensor([[5, 6, 7]]), **kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_kv_bytes_match_published_figures():
    v3 = kv_bytes_per_token(PRESETS["deepseek-v3"], dtype_bytes=1)
    assert v3["mla_elements_per_layer"] == 576  # DeepSeek-V3: 512 latent + 64 rope key per layer
    assert v3["mla"] == 61 * 576
    assert v3["mla_equivalent_gqa_groups"] == 2.25  # DeepSeek-V2 Table 1: MLA ~ GQA with 2.25 groups
    v2 = kv_bytes_per_token(PRESETS["deepseek-v2"], dtype_bytes=2)
    assert v2["mha"] / v2["mla"] == pytest.approx(128 * 320 / 576)


def test_parameter_counts_match_published_sizes():
    v3 = parameter_counts(PRESETS["deepseek-v3"])
    assert v3["total"] == pytest.approx(671e9, rel=0.002) and v3["active"] == pytest.approx(37e9, rel=0.02)
    v2 = parameter_counts(PRESETS["deepseek-v2"])
    assert v2["total"] == pytest.approx(236e9, rel=0.002) and v2["active"] == pytest.approx(21e9, rel=0.02)
    lite = parameter_counts(PRESETS["deepseek-v2-lite"])
    assert lite["total"] == pytest.approx(15.7e9, rel=0.01) and lite["active"] == pytest.approx(2.4e9, rel=0.12)
    tiny = DeepSeekModel.random(PRESETS["tiny"])
    assert parameter_counts(PRESETS["tiny"])["total"] == sum(p.numel() for p in tiny.parameters())


def test_flops_grow_with_context():
    f1, f4k = estimate_flops(PRESETS["deepseek-v3"], 1), estimate_flops(PRESETS["deepseek-v3"], 4096)
    assert f1["matmul"] == f4k["matmul"] == pytest.approx(2 * parameter_counts(PRESETS["deepseek-v3"])["active"]
                                                           - 2 * 129280 * 7168)
    assert f4k["attention"] == 4096 * f1["attention"]


def test_probe_sites_observe_and_replace(tiny):
    names = tiny.probes.names()
    assert "blocks.1.mlp.hook_expert_indices" in names and "blocks.0.attn.hook_kv_latent" in names
    assert "blocks.0.mlp.hook_expert_indices" not in names  # layer 0 is dense
    ids = torch.tensor([[3, 4, 5, 6]])
    seen = {}

    def observe(name, value):
        seen[name] = tuple(value.shape)

    with tiny.probes.listen(["blocks.*.attn.hook_kv_latent"], observe):
        base = tiny(ids)
    assert seen == {f"blocks.{i}.attn.hook_kv_latent": (1, 4, 32) for i in range(3)}
    with tiny.probes.listen(["blocks.2.mlp.hook_expert_weights"], lambda n, v: torch.zeros_like(v)):
        changed = tiny(ids)
    assert not torch.equal(base, changed)
    assert torch.equal(tiny(ids), base)  # listeners are gone after the block
    with pytest.raises(KeyError, match="no probe site matches 'blocks.9.nothing'"):
        tiny.probes.resolve(["blocks.9.nothing"])
