"""The Triton backend (run in the interpreter on CPU, see conftest.py) against the torch backend, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from workbench.config import PRESETS
from workbench.model.backend import set_backend
from workbench.model.fp8 import enable_fp8
from workbench.model.routing import Gate, RoutingParams, route
from workbench.model.transformer import DeepSeekModel


@pytest.fixture
def tiny():
    return DeepSeekModel.random(PRESETS["tiny"], seed=0)


@torch.no_grad()
def _prefill_and_decode(model):
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 8)
    prefill = model(ids[:, :6], cache=cache, mode="absorb")  # experts + FP8 linears on the backend
    step = model(ids[:, 6:], cache=cache, mode="absorb")  # S == 1 with a cache: mla_decode
    return prefill, step


@pytest.mark.parametrize("fp8", [False, True])
def test_triton_backend_gives_the_torch_logits(tiny, fp8):
    if fp8:
        enable_fp8(tiny)
    want = _prefill_and_decode(tiny)
    switched = set_backend(tiny, "triton")
    assert "blocks.2.mlp.experts" in switched and "blocks.0.attn" in switched and "blocks.1.mlp.gate" in switched
    assert ("blocks.0.attn.q_a_proj" in switched) == fp8
    got = _prefill_and_decode(tiny)
    # fp32 everywhere, "ieee" dots, same FP8 codes (the patched interpreter rounds as the GPU does): only the
    # summation order differs, ~1e-7 on logits of size ~1; 1e-5 leaves room and would still catch a wrong expert,
    # a wrong scale block or a masked-out cache row (each moves logits by >= 1e-3).
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    set_backend(tiny, "torch")
    assert all(torch.equal(a, b) for a, b in zip(_prefill_and_decode(tiny), want, strict=True))


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy", "greedy"])
def test_gate_kernel_routes_like_route(method):
    g = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(40, 16, generator=g), torch.randn(16, generator=g) * 0.1
    p = RoutingParams(4, 4, 2, method, "sigmoid" if method == "noaux_tc" else "softmax", True, 2.5)
    want = route(logits, bias if method == "noaux_tc" else None, p)
    gate = Gate(PRESETS["tiny"].replace(n_routed_experts=16, topk_method=method))  # the gate keeps its bias for noaux_tc
    if method == "noaux_tc":
        gate.e_score_correction_bias.copy_(bias)
    gate.backend = "triton"
    got = gate.select(logits, p)  # the moe_gate kernel
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[2])


def test_unsupported_cases_are_named(tiny):
    enable_fp8(tiny, sites="experts", ue8m0=True)
    set_backend(tiny, "triton", modules="experts")
    with pytest.raises(ValueError, match="fused_moe takes"):
        tiny(torch.tensor([[1, 2, 3]]))
    set_backend(tiny, "auto", modules="experts")  # auto falls back to torch where the kernel cannot do it
    tiny(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="unknown module kinds"):
        set_backend(tiny, "triton", modules="router")
    with pytest.raises(ValueError, match="backend must be"):
        set_backend(tiny, "cuda")  # type: ignore[arg-type]


def test_triton_without_cuda_or_interpreter_raises_a_clear_error():
    script = (
        "import torch\n"
        "from workbench.config import PRESETS\n"
        "from workbench.model.transformer import DeepSeekModel\n"
        "from workbench import KernelUnavailableError, set_backend\n"
        "m = DeepSeekModel.random(PRESETS['tiny'])\n"
        "try:\n    set_backend(m, 'triton')\nexcept KernelUnavailableError as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR") and "TRITON_INTERPRET" in out.stdout and "CUDA" in out.stdout
