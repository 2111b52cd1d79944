"""The package's layering: no import cycles among its modules (imports inside functions included), every module
imports on its own, and the front door `import workbench as wb` is lazy and complete."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import workbench

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"workbench": ROOT / "workbench", "workbench_kernels": ROOT / "kernels" / "workbench_kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for top, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = f.relative_to(folder).with_suffix("").parts
            name = ".".join((top, *parts))
            out[name.removesuffix(".__init__")] = f
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (never run, so no edge)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (module level and inside functions)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        tree = ast.parse(f.read_text())
        skip = _type_checking_only(tree)
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                names = [node.args[0].value]  # importlib.import_module("workbench.x") counts too
            for n in names:
                while n and n not in mods:
                    n = n.rsplit(".", 1)[0] if "." in n else ""
                # a module importing its own package's __init__ (or a parent of it) is no layering edge
                if n and n != m and not m.startswith(n + "."):
                    edges[m].add(n)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles (counting imports inside functions):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_model_layers_import_one_way() -> None:
    """Blocks never import the decoder, the families or the whole-model operations; dispatch imports no block."""
    edges = import_graph()
    model = "workbench.model"
    blocks = [f"{model}.{b}" for b in ("norm", "rope", "attention", "cache", "indexer", "mla", "routing", "experts",
                                       "fp8_linear", "moe", "block", "quant", "dispatch")]
    above = {f"{model}.transformer", f"{model}.families", f"{model}.families.v2", f"{model}.families.v3",
             f"{model}.families.v32", f"{model}.fp8", f"{model}.backend"}
    for b in blocks:
        assert not edges[b] & above, f"{b} imports {sorted(edges[b] & above)}"
    assert not {e for e in edges[f"{model}.dispatch"] if e.startswith(model + ".")}
    for fam in ("v2", "v3", "v32"):
        assert f"{model}.transformer" not in edges[f"{model}.families.{fam}"]


@pytest.mark.parametrize("module", sorted(m for m in _modules() if not m.endswith("__main__")))
def test_every_module_imports_on_its_own(module: str) -> None:
    importlib.import_module(module)


def test_front_door_is_lazy_and_complete() -> None:
    script = ("import sys, time; t = time.perf_counter(); import workbench as wb; dt = time.perf_counter() - t\n"
              "heavy = [m for m in ('torch', 'triton', 'zarr', 'xarray', 'ipywidgets', 'panel') if m in sys.modules]\n"
              "print(heavy, dt)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    heavy, seconds = out.stdout.rsplit("]", 1)
    assert heavy + "]" == "[]", f"`import workbench` imported {heavy}]"
    assert float(seconds) < 0.5
    for name in workbench.__all__:
        assert getattr(workbench, name) is not None, name
    assert set(dir(workbench)) == set(workbench.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = workbench.nope  # type: ignore[attr-defined]
