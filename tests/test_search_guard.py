"""The held-back guard of the layer-wise search, and the folds it searches and checks on."""

from __future__ import annotations

import numpy as np

from node.zoo.scores import heldout
from node.zoo.search import cma_search


def test_folds_are_disjoint_parts_of_the_search_half() -> None:
    for domain in ("logic", "arithlogic"):
        a = {e.text for e in heldout(domain, 60, "search:a")}
        b = {e.text for e in heldout(domain, 60, "search:b")}
        test = {e.text for e in heldout(domain, 300, "test")}
        assert a and b and not a & b and not (a | b) & test


def test_guard_returns_the_start_when_the_search_only_fits_its_own_data() -> None:
    x0 = np.full((2, 3), 0.5)

    def fit(w: np.ndarray) -> float:  # rewards moving away from the start
        return float(np.abs(w - 0.5).sum())

    def check(w: np.ndarray) -> float:  # other data: the start is best
        return -float(np.abs(w - 0.5).sum())

    free = cma_search(fit, x0, 0.2, 4, 6, 0)
    assert free.best_value > 0.5 and free.holdout is None
    guarded = cma_search(fit, x0, 0.2, 4, 6, 0, holdout=check)
    assert guarded.picked == 0 and np.array_equal(guarded.best, x0)
    assert len(guarded.holdout or []) == 5 and guarded.holdout[0] == 0.0


TARGET = np.array([[1.0, 0.2, 0.8], [0.3, 0.9, 0.6]])


def near(w: np.ndarray) -> float:
    """An objective both the search and the held-back check agree on: closeness to TARGET."""
    return -float(((w - TARGET) ** 2).sum())


def test_guard_keeps_a_generation_that_also_wins_on_held_back_data() -> None:
    x0 = np.full((2, 3), 0.5)
    res = cma_search(near, x0, 0.3, 6, 8, 0, holdout=near)
    assert res.picked > 0 and res.holdout is not None
    assert res.holdout[res.picked] == max(res.holdout) > res.holdout[0]
    assert res.best_value == near(res.best)


def test_guard_margin_keeps_the_start_unless_a_generation_wins_by_more() -> None:
    x0 = np.full((2, 3), 0.5)
    free = cma_search(near, x0, 0.3, 6, 8, 0, holdout=near)
    assert free.holdout is not None
    gain = max(free.holdout) - free.holdout[0]
    wide = cma_search(near, x0, 0.3, 6, 8, 0, holdout=near, margin=gain + 1e-6)
    assert wide.picked == 0 and np.array_equal(wide.best, x0)
    narrow = cma_search(near, x0, 0.3, 6, 8, 0, holdout=near, margin=gain / 2)
    assert narrow.picked == free.picked and np.array_equal(narrow.best, free.best)
