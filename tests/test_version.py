"""One version number: the Python package, the npm package of the lab extension, and what is installed agree."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from jupyter_core.paths import jupyter_path

import workbench

EXTENSIONS = Path(__file__).resolve().parents[1] / "extensions"
LAB_EXTENSION = "moe-workbench-lab"


def test_npm_package_version_is_the_python_version() -> None:
    package = json.loads((EXTENSIONS / "package.json").read_text())
    lock = json.loads((EXTENSIONS / "package-lock.json").read_text())
    assert package["name"] == LAB_EXTENSION
    assert package["version"] == workbench.__version__
    assert lock["version"] == lock["packages"][""]["version"] == workbench.__version__  # `npm install` was rerun


def test_installed_distribution_and_lab_extension_carry_this_version() -> None:
    """Catches a stale install: `pip install -e .` must have rebuilt the extension after a version change."""
    assert version("moe-workbench") == workbench.__version__
    found = [Path(d) / LAB_EXTENSION / "package.json" for d in jupyter_path("labextensions")]
    installed = [p for p in found if p.is_file()]
    assert installed, f"the lab extension is not installed in any of {[str(p.parent) for p in found]}"
    built = json.loads(installed[0].read_text())
    assert built["name"] == LAB_EXTENSION
    assert built["version"] == workbench.__version__
    assert built["jupyterlab"]["_build"]["load"].startswith("static/remoteEntry.")
