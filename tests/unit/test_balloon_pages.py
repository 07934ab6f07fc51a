"""The balloon's page bookkeeping (pages.py) against a plain set of PFNs, and its numpy-free start-up."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from memvisor.devices.balloon.pages import PageBitmap, runs

SIZE = 300
operations = st.lists(
    st.tuples(st.sampled_from(["set", "clear"]), st.integers(-5, SIZE + 5), st.integers(-3, SIZE + 10)), max_size=30
)


def model_runs(pages: set[int]) -> list[tuple[int, int]]:
    """The runs of a set of PFNs, found the slow way."""
    out: list[tuple[int, int]] = []
    for pfn in sorted(pages):
        if pfn - 1 in pages:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((pfn, 1))
    return out


@given(operations)
def test_bitmap_matches_a_set_of_pages(ops: list[tuple[str, int, int]]) -> None:
    bitmap, model = PageBitmap(SIZE), set[int]()
    for op, first, count in ops:
        touched = set(range(max(first, 0), min(first + count, SIZE)))
        if op == "set":
            assert bitmap.set_run(first, count) == len(touched - model)
            model |= touched
        else:
            assert bitmap.clear_run(first, count) == len(touched & model)
            model -= touched
        assert bitmap.size == SIZE  # a run past the end is clipped, never grows the bitmap
    assert bitmap.count() == len(model)
    assert list(bitmap.ranges()) == model_runs(model)


@given(st.sets(st.integers(0, SIZE - 1)), st.lists(st.booleans(), max_size=SIZE + 20))
def test_clear_mask_and_array_view(pages: set[int], mask: list[bool]) -> None:
    bitmap = PageBitmap(SIZE)
    for pfn in pages:
        bitmap.set_run(pfn, 1)
    assert np.flatnonzero(bitmap.to_array()).tolist() == sorted(pages)
    dirty = {pfn for pfn, bit in enumerate(mask) if bit}
    assert bitmap.clear_mask(np.array(mask, dtype=bool)) == len(pages & dirty)
    assert list(bitmap.ranges()) == model_runs(pages - dirty)


@given(st.sets(st.integers(0, 1 << 32)))
def test_runs_cover_exactly_the_pages(pages: set[int]) -> None:
    found = runs(sorted(pages))
    assert found == model_runs(pages)
    assert sum(count for _, count in found) == len(pages)


def test_importing_the_balloon_does_not_import_numpy() -> None:
    code = "import sys, memvisor.devices.balloon; print('numpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
