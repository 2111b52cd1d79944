"""Probe-site name resolution: exact names, globs, order and duplicates."""

from __future__ import annotations

import pytest

from workbench.probes import ProbeRegistry


def registry() -> ProbeRegistry:
    reg = ProbeRegistry()
    for layer in range(3):
        for kind in ("mlp.hook_expert_indices", "mlp.hook_expert_weights", "attn.hook_kv_latent"):
            reg.site(f"blocks.{layer}.{kind}")
    reg.site("hook_resid_final")
    return reg


def test_exact_names_and_globs_resolve_in_order_without_duplicates():
    reg = registry()
    got = reg.resolve(["blocks.2.attn.hook_kv_latent", "blocks.*.mlp.hook_expert_weights",
                       "blocks.2.attn.hook_kv_latent", "blocks.1.mlp.hook_expert_weights", "hook_resid_final"])
    assert got == ["blocks.2.attn.hook_kv_latent", "blocks.0.mlp.hook_expert_weights",
                   "blocks.1.mlp.hook_expert_weights", "blocks.2.mlp.hook_expert_weights", "hook_resid_final"]
    assert reg.resolve(["blocks.?.attn.hook_kv_latent"]) == [f"blocks.{i}.attn.hook_kv_latent" for i in range(3)]


def test_an_unknown_name_is_refused_with_the_site_kinds():
    with pytest.raises(KeyError, match=r"no probe site matches 'blocks.7.mlp.hook_expert_indices'.*hook_kv_latent"):
        registry().resolve(["blocks.7.mlp.hook_expert_indices"])


def test_an_own_thread_listener_hears_and_changes_only_the_runs_of_the_thread_that_attached_it():
    import threading

    import torch

    reg = registry()
    site = reg.sites["hook_resid_final"]
    heard: list[str] = []
    mine, theirs = torch.ones(2), torch.full((2,), 7.0)
    other: dict[str, object] = {}

    def other_thread() -> None:
        other["listened"] = site.listened()
        other["out"] = site(theirs)

    with reg.listen(["hook_resid_final"], lambda n, v: heard.append(n) or torch.zeros_like(v), own_thread=True):
        assert site.listened()
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join(30)
        replaced = site(mine)
    assert heard == ["hook_resid_final"]  # the other thread's call was not heard
    assert other["listened"] is False and torch.equal(other["out"], theirs)  # nor changed
    assert torch.equal(replaced, torch.zeros(2))
    assert not site.listened() and site.listeners == []
    every: list[torch.Tensor] = []  # without own_thread a listener hears every thread, as before
    with reg.listen(["hook_resid_final"], lambda n, v: every.append(v)):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join(30)
    assert other["listened"] is True and len(every) == 1 and torch.equal(every[0], theirs)
