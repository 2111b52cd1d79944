"""One small random model and prompt per test module, shared by the tests that run controls through the model."""

from __future__ import annotations

import pytest
import torch

from workbench.config import PRESETS
from workbench.model.transformer import DeepSeekModel


@pytest.fixture(scope="module")
def model():
    return DeepSeekModel.random(PRESETS["tiny"], seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 258, (1, 12), generator=torch.Generator().manual_seed(0))
