"""The IPython extension in a real InteractiveShell: `%load_ext workbench`, `%workbench`, `%%workbench_trace`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ipywidgets
import numpy as np
import pytest
import xarray as xr
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import workbench.magics
from workbench.cli import main as workbench_cli
from workbench.magics import WorkbenchMagics

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
TEXT = "def add(a, b): return a + b  # the router picks experts per token"


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    """A fresh shell with the extension loaded; what the magics display is kept in `shell.shown` (and published
    through a capturing publisher, so its mime bundles can be checked too)."""
    ip = InteractiveShell.instance()
    ip.display_pub = CapturingDisplayPublisher()
    shown: list[Any] = []
    real_display = workbench.magics.display

    def recording_display(obj: Any) -> None:
        shown.append(obj)
        real_display(obj)

    monkeypatch.setattr(workbench.magics, "display", recording_display)
    ip.shown = shown  # type: ignore[attr-defined]
    ip.run_line_magic("load_ext", "workbench")
    try:
        yield ip
    finally:
        InteractiveShell.clear_instance()


def magics(shell: InteractiveShell) -> WorkbenchMagics:
    found = shell.magics_manager.registry["WorkbenchMagics"]
    assert isinstance(found, WorkbenchMagics)
    return found


def displayed_widgets(shell: InteractiveShell) -> list[Any]:
    """What the magics displayed; each must have reached the front end as a widget view of that very widget."""
    outputs: list[dict[str, Any]] = shell.display_pub.outputs  # type: ignore[attr-defined]
    published = [o["data"][WIDGET_MIME]["model_id"] for o in outputs if WIDGET_MIME in o["data"]]
    shown: list[Any] = shell.shown  # type: ignore[attr-defined]
    assert all(isinstance(w, ipywidgets.Widget) for w in shown)
    assert published == [w.model_id for w in shown]
    return shown


def test_load_ext_registers_both_magics(shell: InteractiveShell) -> None:
    assert "workbench" in shell.magics_manager.magics["line"]
    assert "workbench_trace" in shell.magics_manager.magics["cell"]
    assert "workbench.magics" in shell.extension_manager.loaded or "workbench" in shell.extension_manager.loaded


def test_cell_trace_equals_the_store_workbench_trace_writes(shell: InteractiveShell, tmp_path: Path) -> None:
    """The cell's routing matches `workbench trace` on the same text, read back by plain xarray.open_zarr."""
    shell.run_cell_magic("workbench_trace", "--out routing", TEXT + "\n")
    ds = shell.user_ns["routing"]
    assert isinstance(ds, xr.Dataset)
    (tmp_path / "in.txt").write_text(TEXT + "\n")
    assert workbench_cli(["trace", "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "s.zarr"),
                          "--sites", "expert_ids", "expert_weights"]) == 0
    ref = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    np.testing.assert_array_equal(ds["token_id"].values, ref["token_id"].values)
    np.testing.assert_array_equal(ds["expert_ids"].values, ref["expert_ids"].values)
    # same model, same fp32 forward on the same single window: the weights agree to float rounding
    np.testing.assert_allclose(ds["expert_weights"].values, ref["expert_weights"].values, rtol=1e-5, atol=1e-6)
    assert ds.attrs["checkpoint"] == ref.attrs["checkpoint"]

    from workbench.widgets import RoutingExplorer

    shown = displayed_widgets(shell)
    assert len(shown) == 1 and isinstance(shown[0], RoutingExplorer)
    assert shown[0].traces["trace"] is ds


def test_models_are_loaded_once_per_shell(shell: InteractiveShell) -> None:
    shell.run_cell_magic("workbench_trace", "default", "first")
    shell.run_cell_magic("workbench_trace", "default", "second")
    assert list(magics(shell)._models) == ["default"]
    assert len(displayed_widgets(shell)) == 2


@pytest.mark.parametrize(("magic", "line", "cell", "message"), [
    ("workbench", "no-such-model", None, r"%workbench: cannot load model 'no-such-model': no model named .*preset"),
    ("workbench_trace", "no-such-model", "text", r"%%workbench_trace: cannot load model 'no-such-model'"),
    ("workbench_trace", "deepseek-v3", "text", r"cannot load model 'deepseek-v3': preset 'deepseek-v3' is a shape"),
    ("workbench", "--trace missing.zarr", None, r"%workbench --trace: no trace store at 'missing.zarr'"),
    ("workbench_trace", "", "  \n\n", r"the cell is empty"),
    ("workbench_trace", "--out 2bad", "text", r"--out: '2bad' is not a Python variable name"),
    ("workbench_trace", "default", "x" * 1100, r"the text is 1101 tokens, more than the model's 1024 positions"),
])
def test_bad_input_is_a_usage_error_naming_it(shell: InteractiveShell, magic: str, line: str, cell: str | None,
                                              message: str) -> None:
    before = dict(shell.user_ns)
    run = (lambda: shell.run_line_magic(magic, line)) if cell is None else (lambda: shell.run_cell_magic(magic, line, cell))
    with pytest.raises(UsageError, match=message):
        run()
    assert displayed_widgets(shell) == []
    assert magics(shell).last_dashboard is None
    assert set(shell.user_ns) == set(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of the default model, written by `workbench trace`."""
    folder = tmp_path_factory.mktemp("store")
    (folder / "in.txt").write_text(TEXT + "\nsecond record\n")
    assert workbench_cli(["trace", "--input", str(folder / "in.txt"), "--out", str(folder / "s.zarr")]) == 0
    return folder / "s.zarr"


@pytest.mark.slow  # builds the whole dashboard (~12 s on 2 cores)
def test_line_magic_shows_the_dashboard_on_a_store(shell: InteractiveShell, store: Path) -> None:
    from workbench.widgets import Workbench

    shell.run_line_magic("workbench", f"default --trace {store}")
    (dashboard,) = displayed_widgets(shell)
    assert isinstance(dashboard, Workbench)
    assert magics(shell).last_dashboard is dashboard
    assert dashboard.live.loaded is magics(shell)._models["default"]  # the model the magic loaded, not a second one
    ref = xr.open_zarr(store, consolidated=False)
    np.testing.assert_array_equal(dashboard.routing.traces["trace"]["expert_ids"].values, ref["expert_ids"].values)


@pytest.mark.slow  # builds the whole dashboard (~12 s on 2 cores)
def test_cell_magic_feeds_the_last_dashboard(shell: InteractiveShell) -> None:
    shell.run_line_magic("workbench", "")
    (dashboard,) = displayed_widgets(shell)
    shell.run_cell_magic("workbench_trace", "", TEXT + "\n")
    assert len(displayed_widgets(shell)) == 1  # nothing new: the dashboard above updates in place
    assert dashboard.live.prompt == TEXT and dashboard.prompt_box.value == TEXT
    tok = magics(shell)._models["default"].tokenizer
    bos = dashboard.live.config.bos_token_id
    assert dashboard.live.input_ids[0].tolist() == [bos, *tok.encode(TEXT)]
    # naming a model traces in memory instead, even with a dashboard open
    shell.run_cell_magic("workbench_trace", "default --out t", "other text")
    assert dashboard.live.prompt == TEXT
    assert int(shell.user_ns["t"].sizes["token"]) == len(tok.encode("other text")) + 1
    with pytest.raises(UsageError, match="--out needs a MODEL"):
        shell.run_cell_magic("workbench_trace", "--out t2", "text")


def test_a_trace_that_is_not_a_store_of_this_model_is_a_usage_error(shell: InteractiveShell, store: Path,
                                                                    tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match=r"%workbench --trace .*plain: .*is not a readable zarr v3 trace store"):
        shell.run_line_magic("workbench", f"--trace {tmp_path / 'plain'}")
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    meta = json.loads((other / "zarr.json").read_text())
    config = json.loads(meta["attributes"]["model_config"])
    config["n_routed_experts"] = 32  # as if recorded with a wider model
    meta["attributes"]["model_config"] = json.dumps(config, sort_keys=True)
    (other / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=r"other.zarr: trace was recorded with another model: .*n_routed_experts"):
        shell.run_line_magic("workbench", f"--trace {other}")
    assert displayed_widgets(shell) == [] and magics(shell).last_dashboard is None
