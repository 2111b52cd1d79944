"""The summary's arithmetic without a server: expert load counting and the bounded load picture."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.server.discovery import PICTURE_MAX_COLS, PICTURE_MAX_ROWS, expert_load, load_picture


def test_expert_load_matches_a_per_layer_count() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 12, size=(300, 5, 4)).astype(np.int16)  # [n, L, k], -1 = no expert in that slot
    got = expert_load(ids, 12)  # [L, E]
    for l in range(5):
        chosen = ids[:, l].ravel()
        chosen = chosen[chosen >= 0]
        np.testing.assert_allclose(got[l], np.bincount(chosen, minlength=12) / chosen.size, rtol=0, atol=1e-12)


def test_small_models_get_one_cell_per_layer_and_expert() -> None:
    load = np.full((3, 8), 1 / 8)
    load[1] = [0.5, 0.5, 0, 0, 0, 0, 0, 0]
    picture = load_picture(load, [1, 2, 3])
    assert picture["rows"] == [[1, 1], [2, 2], [3, 3]]
    assert picture["cols"] == [[e, e] for e in range(8)]
    assert picture["cells"][0] == [1.0] * 8  # balanced = 1x uniform
    assert picture["cells"][1] == [4.0, 4.0, 0, 0, 0, 0, 0, 0]
    assert picture["max"] == 4.0


@pytest.mark.parametrize(("layers", "experts", "rows", "cols"), [(58, 256, 58, 64), (100, 300, 64, 64), (1, 65, 1, 64)])
def test_large_models_are_binned_within_the_bound(layers: int, experts: int, rows: int, cols: int) -> None:
    rng = np.random.default_rng(1)
    load = rng.dirichlet(np.ones(experts), size=layers)  # [L, E], each row sums to 1
    picture = load_picture(load, list(range(3, 3 + layers)))
    cells = np.array(picture["cells"])
    assert cells.shape == (rows, cols) and rows <= PICTURE_MAX_ROWS and cols <= PICTURE_MAX_COLS
    # bins cover every layer and expert exactly once, in order
    assert picture["rows"][0][0] == 3 and picture["rows"][-1][1] == 3 + layers - 1
    flat_cols = [e for c0, c1 in picture["cols"] for e in range(c0, c1 + 1)]
    assert flat_cols == list(range(experts))
    # each cell is the mean relative load of its block
    for (r0, r1), row in zip(picture["rows"], cells, strict=True):
        for (c0, c1), value in zip(picture["cols"], row, strict=True):
            block = load[r0 - 3:r1 - 3 + 1, c0:c1 + 1] * experts
            assert value == pytest.approx(block.mean(), abs=1e-4)
    if experts == 256:  # 4 experts per column exactly
        np.testing.assert_allclose(cells, (load * experts).reshape(layers, 64, 4).mean(-1), atol=1e-4)
