"""Named probe sites: identity points in the forward pass that cost one attribute check when nobody listens.

Names follow TransformerLens (`blocks.{L}.mlp.hook_expert_indices`, `blocks.{L}.attn.hook_kv_latent`, ...) so
traces line up with tools people already use. A listener receives `(site_name, value)` and may return a tensor
to replace the value (that is how interventions and routing replay enter the model); returning None observes.
`listen(..., own_thread=True)` hears only the forward calls of the thread that attached it: the model is shared (a
dashboard's background run, another session, a notebook cell each run on their own thread), and the recorder and the
sessions must not collect another run's values. Without it a listener hears every thread.
Not an `nn.Module`: a module call costs microseconds of hook dispatch even when empty, a plain object does not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

Listener = Callable[[str, torch.Tensor], "torch.Tensor | None"]


class ProbeSite:
    __slots__ = ("listeners", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.listeners: list[tuple[Listener, int | None]] = []  # (listener, its thread; None: every thread)

    def listened(self) -> bool:
        """Whether a listener would hear the calling thread (worth computing a value only listeners read)."""
        me = threading.get_ident()
        return any(owner is None or owner == me for _, owner in self.listeners)

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        if not self.listeners:
            return value
        me = threading.get_ident()
        for listener, owner in list(self.listeners):
            if owner is not None and owner != me:
                continue
            replaced = listener(self.name, value)
            if replaced is not None:
                if not isinstance(replaced, torch.Tensor):
                    raise TypeError(f"probe {self.name}: a listener returned {type(replaced).__name__}, "
                                    "expected a tensor (to replace the value) or None (to observe)")
                if replaced.shape != value.shape:
                    raise ValueError(f"probe {self.name}: a listener returned shape {tuple(replaced.shape)}, "
                                     f"expected {tuple(value.shape)}")
                value = replaced
        return value

    def __repr__(self) -> str:
        return f"ProbeSite({self.name!r}, listeners={len(self.listeners)})"


class ProbeRegistry:
    """All sites of one model, by name. Sites are created by the modules that own them."""

    def __init__(self) -> None:
        self.sites: dict[str, ProbeSite] = {}

    def site(self, name: str) -> ProbeSite:
        if name in self.sites:
            raise ValueError(f"probe site {name!r} registered twice")
        self.sites[name] = ProbeSite(name)
        return self.sites[name]

    def names(self) -> list[str]:
        return list(self.sites)

    def resolve(self, patterns: list[str] | tuple[str, ...]) -> list[str]:
        """Expand site names and `*` globs (e.g. `blocks.*.mlp.hook_expert_indices`); unknown names raise."""
        import fnmatch

        out: list[str] = []
        for pattern in patterns:
            if pattern in self.sites:  # an exact name (the common case): no scan of every site
                if pattern not in out:
                    out.append(pattern)
                continue
            hits = [n for n in self.sites if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                known = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in self.sites})
                raise KeyError(f"no probe site matches {pattern!r}; site kinds: {known}")
            out.extend(h for h in hits if h not in out)
        return out

    @contextmanager
    def listen(self, names: list[str] | tuple[str, ...], listener: Listener, *,
               own_thread: bool = False) -> Iterator[None]:
        """Attach `listener` to the named sites for the duration of the block (always detaches); with `own_thread`
        it hears only the forward calls of the thread that attached it."""
        resolved = self.resolve(names)
        entry = (listener, threading.get_ident() if own_thread else None)
        for n in resolved:
            self.sites[n].listeners.append(entry)
        try:
            yield
        finally:
            for n in resolved:
                self.sites[n].listeners.remove(entry)
