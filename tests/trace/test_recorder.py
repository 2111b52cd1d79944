"""The recorder against the model's own probe values and logits, computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from workbench.trace import Trace
from workbench.trace.recorder import Scratch, SiteError, argmax_and_logsumexp, first_argmax


def test_routing_and_next_token_stats_match_direct_computation(loaded):
    model = loaded.model
    ids = torch.randint(2, 250, (2, 11), generator=torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        seen[name] = value.clone()

    with torch.no_grad(), model.probes.listen(["blocks.*.mlp.hook_expert_*"], keep):
        logits = model(ids)
    with workbench.trace(model, sites=["all"], tokenizer=loaded.tokenizer) as t, torch.no_grad():
        model(ids)
    ds = t.to_xarray()
    cfg = model.config
    assert ds.sizes["token"] == 22 and list(ds.layer.values) == list(cfg.moe_layers)
    for i, layer in enumerate(cfg.moe_layers):
        want = seen[f"blocks.{layer}.mlp.hook_expert_indices"].numpy()  # [T, k], T = B*S
        np.testing.assert_array_equal(ds.expert_ids.values[:, i], want)
        np.testing.assert_allclose(ds.expert_weights.values[:, i], seen[f"blocks.{layer}.mlp.hook_expert_weights"])
    # weights are after normalisation and scaling: they sum to routed_scaling_factor
    np.testing.assert_allclose(ds.expert_weights.sum("slot"), cfg.routed_scaling_factor, rtol=1e-5)
    logp = logits.log_softmax(-1)  # [B, S, V]
    for b in range(2):
        row = slice(b * 11, (b + 1) * 11)
        lp = logp[b, :-1].gather(1, ids[b, 1:, None])[:, 0].numpy()
        np.testing.assert_allclose(ds.logprob.values[row][1:], lp, rtol=1e-5)
        np.testing.assert_allclose(ds.loss.values[row][:-1], -lp, rtol=1e-5)
        assert np.isnan(ds.logprob.values[row][0]) and np.isnan(ds.loss.values[row][-1])
        np.testing.assert_array_equal(ds.pred_id.values[row], logits[b].argmax(-1).numpy())
    assert list(ds.pos.values[:11]) == list(range(11)) and list(ds.seq.values) == [0] * 11 + [1] * 11
    assert ds.text.values[0] == loaded.tokenizer.token_text(int(ids[0, 0]))
    norms = np.linalg.norm(ds.kv_latent.values.astype(np.float32), axis=-1)
    np.testing.assert_allclose(ds.kv_latent_norm.values, norms, rtol=2e-3)


def test_padding_is_dropped_and_does_not_change_real_tokens(loaded):
    model = loaded.model
    a, b = [0, 5, 9, 77, 120, 33, 8], [0, 200, 41]
    with Trace(model, ["expert_ids", "expert_weights"]) as t:
        solo = [t.forward(torch.tensor([x])) for x in (a, b)]
        padded = torch.tensor([a, b + [0] * (len(a) - len(b))])
        both = t.forward(padded, lengths=[len(a), len(b)])
    assert len(both["token_id"]) == len(a) + len(b)
    np.testing.assert_array_equal(both["expert_ids"], np.concatenate([s["expert_ids"] for s in solo]))
    np.testing.assert_allclose(both["logprob"], np.concatenate([s["logprob"] for s in solo]), rtol=1e-4)


def test_layers_left_out_hold_fill_values(loaded):
    with Trace(loaded.model, ["blocks.2.mlp.hook_expert_indices"]) as t:
        t.forward(torch.tensor([[0, 4, 5, 6]]))
    ds = t.to_xarray()
    assert list(ds.data_vars) == ["expert_ids", "logprob", "loss", "pred_id"]
    assert (ds.expert_ids.sel(layer=1) == -1).all() and (ds.expert_ids.sel(layer=2) >= 0).all()


@pytest.mark.parametrize(("sites", "needle"), [
    (["blocks.0.hook_resid_pre"], "no trace variable"),
    (["blocks.9.mlp.hook_expert_indices"], "no probe site matches"),
    (["expert_idz"], "not a trace variable"),
    (["fp8_rel_error"], "FP8 simulation is off"),
])
def test_invalid_sites_are_refused_with_a_clear_message(loaded, sites, needle):
    with pytest.raises(SiteError, match=needle):
        Trace(loaded.model, sites)


def test_fp8_errors_are_taken_from_fp8_probe_sites_when_they_exist():
    """Another component will add `blocks.{L}.<site>.hook_fp8_rel_error`; simulate it firing from a listener."""
    from workbench.loader import load_model

    model = load_model("default-v3").model  # a private copy: we add probe sites to it (MLA site names)
    names = {layer: model.probes.site(f"blocks.{layer}.attn.kv_a_proj_with_mqa.hook_fp8_rel_error")
             for layer in range(model.config.num_hidden_layers)}

    def fire(name: str, value: torch.Tensor) -> None:  # value [B, S, C] -> a per-token error [B, S]
        layer = int(name.split(".")[1])
        names[layer](value[..., 0].abs() * 0 + (layer + 1) / 100)

    with model.probes.listen(["blocks.*.attn.hook_kv_latent"], fire), Trace(model) as t:
        t.forward(torch.tensor([[0, 7, 8, 9]]))
    ds = t.to_xarray()
    assert list(ds.site.values) == ["attn.kv_a_proj_with_mqa"]
    want = [[(layer + 1) / 100 for layer in range(model.config.num_hidden_layers)]] * 4
    np.testing.assert_allclose(ds.fp8_rel_error.values[:, :, 0], want, rtol=1e-6)


def test_empty_trace_has_the_schema(loaded):
    with Trace(loaded.model) as t:
        pass
    ds = t.to_xarray()
    assert ds.sizes["token"] == 0 and ds.expert_ids.dims == ("token", "layer", "slot")


def test_a_probe_of_another_width_is_a_clear_error(loaded):
    from workbench.controls import Controls, RoutingControl

    top2 = Controls(routing={"all": RoutingControl(top_k=2)}).resolve(loaded.model.config)
    t = Trace(loaded.model, ["expert_ids"])
    real = loaded.model.forward
    loaded.model.forward = lambda ids, cache=None, mode="naive", controls=None: real(ids, controls=top2)
    try:
        with t, pytest.raises(ValueError, match=r"expert_ids: a probe gave 2 values per token .* holds \d+"):
            t.forward(torch.tensor([[0, 7, 8, 9]]))
    finally:
        del loaded.model.forward


@pytest.mark.parametrize("V", [2048, 384, 300, 64])
def test_first_argmax_equals_torch_max_including_ties(V):
    """The blocked arg-reduction behind `pred_id` against `torch.max` (first maximum), ties across blocks included."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, 7, V, generator=g)
    x[0, 0, [V - 1, 5, V // 2]] = 9.0  # a three-way tie in different blocks: the first index wins
    x[1, 2] = 0.0  # a constant row: index 0
    x[2, 3, V - 1] = 50.0  # the maximum in the last column
    idx, top = first_argmax(x)
    want = x.max(dim=-1)
    assert torch.equal(idx, want.indices) and torch.equal(top, want.values)
    assert int(idx[0, 0]) == 5 and int(idx[1, 2]) == 0 and int(idx[2, 3]) == V - 1


@pytest.mark.parametrize("block_rows", [None, 64, 7])
@pytest.mark.parametrize("T", [1, 64, 150])
def test_argmax_and_logsumexp_equal_torch(T, block_rows):
    """The next-token statistics against torch's argmax and logsumexp, odd row counts and odd rows included, in one
    cache block and in several (a partial last block, the scratch buffer reused across blocks and calls)."""
    x = torch.randn(T, 2048, generator=torch.Generator().manual_seed(T)) * 4
    x[0, 7] = x[0].max() + 1  # a clear maximum in the first block
    if T > 100:
        x[100, 3] = float("inf")  # an infinite logit: logsumexp is inf, argmax points at it
        x[101] = float("-inf")  # a fully masked row: logsumexp is -inf
        x[102] += 300.0  # exp(x) overflows fp32: the row must take the shifted path
        x[103] -= 300.0  # exp(x) underflows to zero: likewise
        x[104, :5] = 95.0  # one large logit, the rest ordinary
    scratch = Scratch()
    for _ in range(2):  # the second call reuses the first call's buffer
        pred, lse = argmax_and_logsumexp(x[None], scratch, block_rows=block_rows)
        assert pred.shape == lse.shape == (1, T)
        assert torch.equal(pred[0], x.max(dim=-1).indices)
        torch.testing.assert_close(lse[0], x.logsumexp(dim=-1), rtol=1e-6, atol=1e-5)


def test_forward_calls_of_other_threads_are_not_recorded(loaded):
    """A dashboard's background run (or another session) on the same model runs on its own thread while a trace is
    open: only the calls of the thread that opened the trace are recorded, and they are recorded unchanged."""
    import threading

    t = Trace(loaded.model, ["expert_ids"])
    mine, theirs = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]])
    with t:
        started, may_finish = threading.Event(), threading.Event()

        def other() -> None:
            started.set()
            for _ in range(3):
                loaded.model(theirs)
            may_finish.wait(30)

        worker = threading.Thread(target=other)
        worker.start()
        started.wait(30)
        t.forward(mine)
        may_finish.set()
        worker.join(30)
    ds = t.to_xarray()
    assert ds.token_id.values.tolist() == [5, 6, 7, 8, 9]
    alone = Trace(loaded.model, ["expert_ids"])
    with alone:
        alone.forward(mine)
    np.testing.assert_array_equal(ds.expert_ids.values, alone.to_xarray().expert_ids.values)
