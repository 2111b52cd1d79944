"""Shared fixtures for the view tests: the `tiny-random` model (fixed shape: MoE layers 1-2, 16 experts, top-4,
kv_lora_rank 32, byte tokenizer) loaded once, the `tiny-v4-random` model, live sessions that run synchronously
(background=False, so a control change has been applied when the setter returns), and small traces."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from workbench.loader import LoadedModel, load_model
from workbench.trace.recorder import trace as record_trace
from workbench.widgets.live import LiveSession

PROMPT = "the expert routes a token. def f(x): return x"


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return load_model("tiny-random")


@pytest.fixture(scope="module")
def v4() -> LoadedModel:
    """The `tiny-v4-random` model (layers: 0 window only and hash-routed, 1 CSA, 2 HCA rate 16, 3 CSA; window 32,
    index_topk 16, 4 mHC streams; byte tokenizer), once per module."""
    return load_model("tiny-v4-random")


@pytest.fixture
def live(loaded: LoadedModel) -> LiveSession:
    return LiveSession(loaded, PROMPT, continuation=2)


@pytest.fixture(scope="session")
def corpus_trace(loaded: LoadedModel) -> xr.Dataset:
    """An in-memory trace of a few sentences (routing, weights, latents), recorded by the real recorder."""
    import torch

    texts = ["the expert routes a token to latent space", "while loss falls and weights scale",
             "the token routes the expert", "def f(x): return x + 1"]
    with record_trace(loaded.model, sites=["expert_ids", "expert_weights", "kv_latent"],
                      tokenizer=loaded.tokenizer, checkpoint=loaded.digest) as t:
        for s in texts:
            loaded.model(torch.tensor([[0, *loaded.tokenizer.encode(s)]]))
    return t.to_xarray()


def synthetic_routing(n_tokens: int, layers: tuple[int, ...] = (1, 2), k: int = 4, n_experts: int = 16,
                      seed: int = 0) -> xr.Dataset:
    """A routing-only trace of any length (random distinct experts per token and layer), built with the schema."""
    from workbench.trace.schema import SCHEMA_VERSION, Layout, build_dataset

    rng = np.random.default_rng(seed)
    L = len(layers)
    ids = np.argsort(rng.random((n_tokens, L, n_experts)), axis=2)[:, :, :k].astype(np.int16)  # [N, L, k] distinct
    w = rng.random((n_tokens, L, k)).astype(np.float32)
    layout = Layout(("expert_ids", "expert_weights"), layers, max(layers) + 1, k, n_experts, 0, ())
    tok = rng.integers(2, 258, n_tokens).astype(np.int32)
    arrays = {"token_id": (("token",), tok), "doc": (("token",), np.zeros(n_tokens, np.int32)),
              "seq": (("token",), (np.arange(n_tokens) // 64).astype(np.int32)),
              "pos": (("token",), (np.arange(n_tokens) % 64).astype(np.int32)),
              "text": (("token",), np.array([chr(t - 2) for t in tok], dtype=object)),
              "expert_ids": (("token", "layer", "slot"), ids), "expert_weights": (("token", "layer", "slot"), w)}
    return build_dataset(arrays, layout, {"schema_version": SCHEMA_VERSION, "layout": layout_json(layout),
                                          "complete": True})


def layout_json(layout: object) -> str:
    import json

    return json.dumps(layout.to_json(), sort_keys=True)  # type: ignore[attr-defined]
