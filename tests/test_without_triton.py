"""The workbench on a machine without Triton (macOS and Windows laptops, where pyproject installs none).

Each check runs in a fresh interpreter whose `sitecustomize` makes `import triton` raise ImportError, as it does
where Triton is absent; child processes (the notebook kernel of the headless demo) inherit it through PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BLOCKER = '''
import importlib.abc
import sys


class _NoTriton(importlib.abc.MetaPathFinder):
    """`import triton` fails as on a machine where it is not installed."""

    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (blocked: simulating a machine without Triton)")
        return None


sys.meta_path.insert(0, _NoTriton())
'''

QUICKSTART = '''
import json, sys, tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import workbench as wb
from workbench.cli import main as workbench_cli
from workbench_kernels.reference import weight_quant_ref

try:
    import triton  # noqa: F401
    raise SystemExit("the blocker did not work: triton imported")
except ImportError:
    pass

work = Path(tempfile.mkdtemp())
loaded = wb.load_model("default", device="auto")
model, tok = loaded.model, loaded.tokenizer
ids = torch.tensor([tok.encode("def mean(values):\\n    return sum(values) / len(values)\\n")])
with torch.no_grad():
    naive, absorb = model(ids, mode="naive"), model(ids, mode="absorb")
torch.testing.assert_close(absorb, naive, rtol=1e-4, atol=1e-4)
out = model.generate(ids, 8)
assert out.shape == (1, ids.shape[1] + 8)

# a control, unresolved, in a bare forward; and in a live session
layer = model.config.moe_layers[0]
seen = {}
with model.probes.listen([f"blocks.{layer}.mlp.hook_expert_indices"], lambda n, v: seen.setdefault(n, v.clone())):
    model(ids)
first_choice = int(seen[f"blocks.{layer}.mlp.hook_expert_indices"][0, 0])
ablated = model(ids, controls=wb.Controls.ablate({layer: [first_choice]}))
assert not torch.equal(ablated, naive)
report = wb.Session(model, ids, tok).apply(wb.Controls.top_k(2))
assert report.kl > 0

# a trace to a store, read back lazily
(work / "c.jsonl").write_text(json.dumps({"text": "import os"}) + "\\n")
assert workbench_cli(["trace", "--input", str(work / "c.jsonl"), "--out", str(work / "c.zarr"), "--no-progress",
                      "--sites", "expert_ids", "index_selected", "attn_mass"]) == 0
ds = wb.open_trace(work / "c.zarr")
assert ds.attrs["schema_version"] == "1.2" and {"index_selected", "attn_mass"} <= set(ds)  # the V4 default's sites
assert int(wb.analysis.expert_load(ds).sum()) == ds.sizes["token"] * ds.sizes["layer"] * model.config.num_experts_per_tok

# FP8 simulation on the torch path, and an FP8 checkpoint kept, run and saved back bit for bit
wb.enable_fp8(model)
with torch.no_grad():
    fp8_logits = model(ids)
assert not torch.equal(fp8_logits, naive) and torch.isfinite(fp8_logits).all()
wb.disable_fp8(model)
tiny = wb.load_model("tiny-random").model
wb.save_checkpoint(tiny, work / "src")
tensors = {}
for name, t in load_file(str(work / "src" / "model.safetensors")).items():
    if name.endswith(("proj.weight", "proj_with_mqa.weight")):
        tensors[name], tensors[name + "_scale_inv"] = weight_quant_ref(t)
    else:
        tensors[name] = t
save_file(tensors, str(work / "src" / "model.safetensors"), metadata={"format": "pt"})
cfg = json.loads((work / "src" / "config.json").read_text())
cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                              "activation_scheme": "dynamic"}
(work / "src" / "config.json").write_text(json.dumps(cfg))
kept = wb.load_checkpoint(work / "src", keep_fp8=True)
with torch.no_grad():
    assert torch.isfinite(kept(torch.tensor([[1, 2, 3]]))).all()
wb.save_checkpoint(kept, work / "out")
again = load_file(str(work / "out" / "model.safetensors"))
assert all(torch.equal(again[n].view(torch.uint8) if again[n].element_size() == 1 else again[n],
                       t.view(torch.uint8) if t.element_size() == 1 else t) for n, t in tensors.items())

# the dashboard and its static export; the server extension's handlers
dashboard = wb.Workbench(loaded, trace=ds, prompt="def f(x):")
assert Path(dashboard.save_html(work / "dash.html")).stat().st_size > 10_000
import workbench.server.handlers  # noqa: E402,F401

# asking for the Triton backend says why it cannot run
try:
    wb.set_backend(model, "triton")
    raise SystemExit("set_backend(triton) did not raise")
except wb.KernelUnavailableError as e:
    assert "Triton is not installed" in str(e), e
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "something imported triton"
print("ok")
'''


def _env_without_triton(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "no_triton"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_quickstart_steps_run_without_triton(tmp_path: Path) -> None:
    """load, forward, generate, a control (bare and live), a trace to a store, FP8 (simulated and kept from a
    checkpoint), the dashboard, the server extension: all on the torch path, and nothing imports Triton."""
    out = subprocess.run([sys.executable, "-c", QUICKSTART], env=_env_without_triton(tmp_path), cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]


def test_the_blocker_blocks(tmp_path: Path) -> None:
    """The simulation is real: in that environment `import triton` fails (this machine has Triton installed)."""
    out = subprocess.run([sys.executable, "-c", "import triton"], env=_env_without_triton(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "simulating a machine without Triton" in out.stderr


@pytest.mark.slow
def test_headless_demo_runs_without_triton(tmp_path: Path) -> None:
    """The main job's `--headless` form: the quickstart notebook runs in a kernel that cannot import Triton."""
    work = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "demo", "--headless", "--workdir", str(work)],
                         env=_env_without_triton(tmp_path), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert (work / "quickstart.zarr" / "zarr.json").is_file()
