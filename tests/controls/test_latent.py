"""Latent controls: the messages for impossible or malformed ranks and bases, and truncation of the MLA latent."""

from __future__ import annotations

import pytest
import torch

from workbench.config import PRESETS
from workbench.controls import ControlError, Controls, LatentControl, svd_basis

TINY = PRESETS["tiny"]  # 3 layers, layer 0 dense, MoE layers 1-2; 16 experts in 4 groups, top-4 from 2 groups; C = 32


@pytest.mark.parametrize(("controls", "message"), [
    (Controls(latent={0: LatentControl(33)}), r"latent\[0\].rank=33 must be in 1..kv_lora_rank=32"),
    (Controls(latent={"all": LatentControl(0)}), r"latent\['all'\].rank=0"),
    (Controls(latent={3: LatentControl(4)}), r"latent\[3\]: unknown layer"),
    (Controls(latent={0: LatentControl(4, "pca")}), "basis must be 'svd' or 'raw'"),  # type: ignore[arg-type]
])
def test_impossible_latent_settings_are_named(controls, message):
    with pytest.raises(ControlError, match=message):
        controls.validate(TINY)


@pytest.mark.parametrize(("text", "message"), [
    ('{"latent": {"0": {"rank": "8"}}}', r"latent\[0\]: LatentControl.rank must be int, got '8'"),
    ('{"latent": {"0": {"rank": 8.0}}}', "rank must be int, got 8.0"),
    ('{"latent": {"all": {"rank": true}}}', r"latent\['all'\]: LatentControl.rank must be int, got True"),
    ('{"latent": {"1": {"basis": "raw"}}}', r"latent\[1\] needs 'rank' \(and optionally 'basis'\); got fields \['basis'\]"),
    ('{"latent": {"1": {"rank": 4, "bases": "raw"}}}', r"latent\[1\] needs 'rank'.*\['bases', 'rank'\]"),
    ('{"latent": {"1.5": {"rank": 4}}}', "latent: layer key must be an int or 'all'"),
])
def test_bad_latent_json_is_named(text, message):
    with pytest.raises(ControlError, match=message):
        Controls.from_json(text)


def test_latent_truncation(model, ids):
    latents = torch.randn(40, 32, generator=torch.Generator().manual_seed(5)) @ torch.randn(32, 32)  # [N, C]
    basis = svd_basis(latents)  # [C, C]
    torch.testing.assert_close(basis.T @ basis, torch.eye(32), atol=1e-5, rtol=0)
    c = Controls(latent={0: LatentControl(8)})
    with pytest.raises(ControlError, match="basis 'svd' needs a calibration run"):
        c.resolve(TINY)
    resolved = c.resolve(TINY, svd_bases={0: basis})
    assert resolved[0].latent_basis is not None and resolved[0].latent_basis.shape == (32, 8)
    assert not torch.allclose(model(ids, controls=resolved), model(ids))
    full = Controls(latent={"all": LatentControl(32)}).resolve(TINY, svd_bases=dict.fromkeys(range(3), basis))
    torch.testing.assert_close(model(ids, controls=full), model(ids), atol=1e-4, rtol=1e-4)  # a full basis is a rotation
