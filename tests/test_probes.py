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
