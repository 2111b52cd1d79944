"""Notebooks the server writes on request; an existing file is never overwritten and no code runs here.

Three kinds, one per action in the lab front end:
- `analysis` (beside a store): opens it lazily with xarray, runs the `workbench.analysis` functions and shows the
  trace-only views (routing explorer, expert specialisation);
- `workbench` (beside a store): the dashboard on that store, `Workbench(trace=...)`;
- `live` (in a folder): the dashboard on the default model, `Workbench()`.
Notebooks refer to the store by its name relative to the notebook, so the pair can be moved together. A store's
name is whatever its folder is called, so it is escaped for each cell: literal text in markdown (`markdown_text`),
a Python string literal (`repr`) in code. Every write checks its own target is inside the server root.
"""

from __future__ import annotations

import string
from pathlib import Path

import nbformat

from workbench.server.discovery import PathRefusedError

STORE_KINDS = ("analysis", "workbench")  # notebooks about one trace store, written beside it
FOLDER_KINDS = ("live",)  # notebooks about no store, written into a folder
KINDS = STORE_KINDS + FOLDER_KINDS
LIVE_STEM = "live-workbench"
MAX_SUFFIX = 1000  # `-1` ... `-999` before giving up on a free name


def markdown_text(text: str) -> str:
    """`text` as markdown that renders as exactly that text: every ASCII punctuation character backslash-escaped
    (CommonMark and JupyterLab's renderer honour that for all of them, so no code span, link, emphasis, heading or
    HTML can start inside a name) and characters that do not print (newlines among them) shown as \\uXXXX."""
    out = []
    for ch in text:
        if ch in string.punctuation:
            out.append("\\" + ch)
        elif not ch.isprintable():
            out.append(f"\\\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def notebook_cells(kind: str, store_name: str | None) -> list[nbformat.NotebookNode]:
    """The cells of a `kind` notebook; `store_name` (relative to the notebook) is required for store kinds."""
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    if kind not in KINDS:
        raise ValueError(f"unknown notebook kind {kind!r}; known: {list(KINDS)}")
    if kind == "live":
        return [
            md("# Live workbench\n\nThe dashboard on the default model: change the prompt and the controls, "
               "watch routing, KV compression and FP8 error respond."),
            code("from workbench.widgets import Workbench\n\nWorkbench()"),
        ]
    if store_name is None:
        raise ValueError(f"a {kind!r} notebook needs a trace store")
    title = markdown_text(store_name)
    if kind == "workbench":
        return [
            md(f"# Workbench on {title}\n\nThe dashboard on this trace store and the default model."),
            code(f"from workbench.widgets import Workbench\n\nWorkbench(trace={store_name!r})"),
        ]
    return [
        md(f"# Analysis of {title}\n\nOpened lazily with dask: nothing is loaded until a result is computed."),
        code(f"from workbench import analysis, open_trace\n\nds = open_trace({store_name!r})\nds"),
        md("## Expert load and balance per MoE layer"),
        code("analysis.load_balance(ds).to_dataframe()"),
        md("## Tokens each expert prefers (lift over its base rate)"),
        code("analysis.top_tokens_per_expert(ds, n=8)"),
        md("## Which experts fire together"),
        code("analysis.coactivation(ds)"),
        md("## The views on this store\n\nRouting per token and layer; what each expert prefers. No model is loaded."),
        code("from workbench.widgets import ExpertSpecialisation, RoutingExplorer\n\nRoutingExplorer(trace=ds)"),
        code("ExpertSpecialisation(trace=ds)"),
    ]


def create_notebook(kind: str, *, root: Path, store: Path | None = None, folder: Path | None = None) -> Path:
    """Write a `kind` notebook and return its path: `<store stem>-<kind>.ipynb` beside `store` for store kinds,
    `live-workbench.ipynb` in `folder` for `live`; `-1`, `-2`, ... are appended while a name is taken. Refuses
    (PathRefusedError) a folder that is not inside `root`, whatever the caller checked before."""
    if kind in STORE_KINDS:
        if store is None:
            raise ValueError(f"a {kind!r} notebook needs a trace store")
        cells = notebook_cells(kind, store.name)
        where, stem = store.parent, f"{store.name.removesuffix('.zarr')}-{kind}"
    elif kind in FOLDER_KINDS:
        if folder is None:
            raise ValueError(f"a {kind!r} notebook needs a folder")
        cells = notebook_cells(kind, None)
        where, stem = folder, LIVE_STEM
    else:
        raise ValueError(f"unknown notebook kind {kind!r}; known: {list(KINDS)}")
    where = _inside(root, where)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for i in range(MAX_SUFFIX):
        target = where / (f"{stem}.ipynb" if i == 0 else f"{stem}-{i}.ipynb")
        try:
            # "x" fails if the name exists, atomically, and also when it is a symlink (even a dangling one),
            # so the server never writes through a link
            with target.open("x", encoding="utf-8") as f:
                nbformat.write(nb, f)
            return target
        except FileExistsError:
            continue
    raise FileExistsError(f"{MAX_SUFFIX} {kind} notebooks named {stem!r}*.ipynb already exist in {where.name!r}")


def _inside(root: Path, where: Path) -> Path:
    """The real folder `where`, once it is the root or below it: the last check before a byte is written."""
    root, real = root.resolve(), where.resolve()
    if real != root and root not in real.parents:
        raise PathRefusedError(f"a notebook would be written in {real.name or real}, outside the server root; "
                               "nothing was written")
    return real
