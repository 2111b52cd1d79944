"""IPython magics, for people who prefer typing to clicking: `%load_ext workbench`, then

    %workbench [MODEL] [--trace STORE]      show the dashboard (`Workbench(model=..., trace=...)`)
    %%workbench_trace [MODEL] [--out VAR]   run the cell's text through the last dashboard's live session, or,
                                            with MODEL or no dashboard yet, trace it in memory and show the routing

Design choices:
- The model is loaded here, before any view is built, so a bad name is a one-line `UsageError` naming it (and the
  presets) instead of a traceback from deep inside a widget.
- The views are imported on first use: `%load_ext workbench` stays cheap and works before they are installed.
- State (the last dashboard, loaded models) lives on the Magics instance, one per shell: no module globals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from workbench.loader import LoadedModel, load_model

DEFAULT_MODEL = "default"
TRACE_SITES = ("expert_ids", "expert_weights")  # what the routing view needs; a cell is small, keep it light


@magics_class
class WorkbenchMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.last_dashboard: Any = None  # the dashboard `%workbench` showed last, for `%%workbench_trace`
        self._models: dict[str, LoadedModel] = {}  # name -> loaded model, so repeated cells do not reload weights

    def loaded_model(self, name: str, magic: str) -> LoadedModel:
        """The model called `name`, loaded once per shell; a bad name is a UsageError that says what exists."""
        if name not in self._models:
            try:
                self._models[name] = load_model(name)
            except (FileNotFoundError, ValueError) as e:
                raise UsageError(f"{magic}: cannot load model {name!r}: {e}") from None
        return self._models[name]

    @magic_arguments()
    @argument("model", nargs="?", default=DEFAULT_MODEL,
              help="'default', the tiny preset, or an HF checkpoint folder (default: %(default)s)")
    @argument("--trace", metavar="STORE", default=None, help="a trace store (path) to show beside the live model")
    @line_magic
    def workbench(self, line: str) -> None:
        """Show the MoE Workbench dashboard on MODEL (and a trace store with --trace)."""
        args = parse_argstring(self.workbench, line)
        if args.trace is not None and not Path(args.trace).expanduser().exists():
            raise UsageError(f"%workbench --trace: no trace store at {args.trace!r}")
        loaded = self.loaded_model(args.model, "%workbench")
        from workbench.trace.zarr_io import TraceStoreError
        from workbench.widgets import Workbench
        from workbench.widgets.trace_source import TraceMismatchError

        try:
            dashboard = Workbench(model=loaded, trace=args.trace)
        except (TraceStoreError, TraceMismatchError) as e:  # not a store, or a store of another model
            raise UsageError(f"%workbench --trace {args.trace}: {e}") from None
        self.last_dashboard = dashboard
        display(dashboard)

    @magic_arguments()
    @argument("model", nargs="?", default=None,
              help="trace with this model in memory instead of the last dashboard's live session")
    @argument("--out", metavar="VAR", default=None, help="also store the in-memory trace (xarray) as VAR")
    @cell_magic
    def workbench_trace(self, line: str, cell: str) -> None:
        """Run the cell's text through the last dashboard's live session, or trace it with MODEL and show routing."""
        args = parse_argstring(self.workbench_trace, line)
        text = cell.strip("\n")
        if not text.strip():
            raise UsageError("%%workbench_trace: the cell is empty; write the text to trace below the magic line")
        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"%%workbench_trace --out: {args.out!r} is not a Python variable name")
        if args.model is None and self.last_dashboard is not None:
            if args.out is not None:
                raise UsageError("%%workbench_trace --out needs a MODEL: without one the text goes to the live "
                                 "session of the last %workbench dashboard, which keeps no trace")
            try:
                self.last_dashboard.set_prompt(text)
            except ValueError as e:
                raise UsageError(f"%%workbench_trace: the dashboard's live session refused the text: {e}") from None
            return
        loaded = self.loaded_model(args.model or DEFAULT_MODEL, "%%workbench_trace")
        try:
            ds = trace_text(loaded, text)
        except ValueError as e:
            raise UsageError(f"%%workbench_trace: {e}") from None
        if args.out is not None and self.shell is not None:
            self.shell.user_ns[args.out] = ds
        from workbench.widgets import RoutingExplorer

        display(RoutingExplorer(trace=ds))


def trace_text(loaded: LoadedModel, text: str) -> Any:
    """One forward pass over `text` (BOS first, as `workbench trace` does) -> in-memory trace Dataset."""
    import torch

    from workbench.trace import trace

    config = loaded.model.config
    bos = config.bos_token_id
    ids = ([bos] if bos is not None else []) + list(loaded.tokenizer.encode(text))
    if len(ids) > config.max_position_embeddings:
        raise ValueError(f"the text is {len(ids)} tokens, more than the model's {config.max_position_embeddings} "
                         "positions; trace long text with `workbench trace`, which cuts it into windows")
    device = next(loaded.model.parameters()).device
    with torch.no_grad(), trace(loaded.model, TRACE_SITES, tokenizer=loaded.tokenizer, checkpoint=loaded.digest) as t:
        t.forward(torch.tensor([ids], dtype=torch.long, device=device))  # [1, S]
    return t.to_xarray()


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext workbench` registers the magics on this shell."""
    ipython.register_magics(WorkbenchMagics(ipython))
