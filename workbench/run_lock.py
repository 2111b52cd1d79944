"""One lock per model for the runs that use its shared state.

A model's probe sites hold their listeners on the model itself, and the FP8 comparison view switches modules of
the shared model for a moment. Two sessions or views on one model (two dashboards in a notebook, two browser tabs
of `workbench serve`) run on their own threads (the live worker thread, the server's sessions), so a run that listens on
probes could collect another run's values, or see modules another run has switched. Every such run takes
`model_lock(model)`: a reentrant lock kept in a side table keyed weakly by the model (an attribute would break
`copy.deepcopy` of the model, and the table lets it be collected with the model).
"""

from __future__ import annotations

import threading
import weakref

from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_TABLE_LOCK = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The reentrant lock every session and view takes around runs of `model` (the same object for one model)."""
    with _TABLE_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock
