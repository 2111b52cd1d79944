"""Notebooks the server writes on request, next to a trace store; an existing file is never overwritten."""

from __future__ import annotations

from pathlib import Path

import nbformat

KINDS = ("analysis",)


def _cells(kind: str, store_name: str) -> list[nbformat.NotebookNode]:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    if kind != "analysis":
        raise ValueError(f"unknown notebook kind {kind!r}; known: {list(KINDS)}")
    return [
        md(f"# Analysis of `{store_name}`\n\nOpened lazily with dask: nothing is loaded until a result is computed."),
        code(f"from workbench import analysis, open_trace\n\nds = open_trace({store_name!r})\nds"),
        md("## Expert load and balance per MoE layer"),
        code("analysis.load_balance(ds).to_dataframe()"),
        md("## Tokens each expert prefers (lift over its base rate)"),
        code("analysis.top_tokens_per_expert(ds, n=8)"),
        md("## Which experts fire together"),
        code("analysis.coactivation(ds)"),
    ]


def create_notebook(store: Path, kind: str) -> Path:
    """Write `<store>-<kind>.ipynb` (or `-1`, `-2`, ... when taken) beside the store; return its path."""
    cells = _cells(kind, store.name)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    stem = store.name.removesuffix(".zarr")
    for i in range(1000):
        target = store.parent / (f"{stem}-{kind}.ipynb" if i == 0 else f"{stem}-{kind}-{i}.ipynb")
        try:
            with target.open("x", encoding="utf-8") as f:  # "x": fails if the file exists, atomically
                nbformat.write(nb, f)
            return target
        except FileExistsError:
            continue
    raise FileExistsError(f"too many {kind} notebooks beside {store}")
