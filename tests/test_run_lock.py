"""One lock per model: the same object for one model, another for another, reentrant, gone with the model."""

from __future__ import annotations

import copy
import gc
import weakref

from workbench.config import PRESETS
from workbench.model.transformer import DeepSeekModel
from workbench.run_lock import model_lock


def test_one_reentrant_lock_per_model_that_does_not_keep_the_model_alive():
    a, b = DeepSeekModel.random(PRESETS["tiny"], seed=0), DeepSeekModel.random(PRESETS["tiny"], seed=1)
    lock = model_lock(a)
    assert model_lock(a) is lock and model_lock(b) is not lock
    with lock, model_lock(a):  # reentrant: a session run inside a view's locked section
        pass
    copy.deepcopy(a)  # the lock is not an attribute, so models still copy
    gone = weakref.ref(a)
    del a
    gc.collect()
    assert gone() is None
