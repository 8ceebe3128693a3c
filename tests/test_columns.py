"""Placing a product's columns at their positions in a wider buffer (``hypertriton.ops._columns``): run by
run or by ``index_copy_``, against plain indexing."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from helpers import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hypertriton.ops import _columns


@settings(max_examples=examples(60), deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), width=st.integers(1, 40), share=st.floats(0, 1),
       shuffled=st.booleans(), zero_rest=st.booleans(), strided=st.booleans(), min_elements=st.sampled_from([0, 10**9]))
@example(seed=0, rows=1, width=1, share=1.0, shuffled=False, zero_rest=True, strided=False, min_elements=0)
@example(seed=1, rows=3, width=9, share=0.0, shuffled=False, zero_rest=True, strided=True, min_elements=0)
@example(seed=2, rows=4, width=30, share=0.5, shuffled=True, zero_rest=False, strided=True, min_elements=0)
def test_copy_columns_is_indexed_assignment(seed, rows, width, share, shuffled, zero_rest, strided, min_elements):
    gen = torch.Generator().manual_seed(seed)
    positions = (torch.rand(width, generator=gen) < share).nonzero().squeeze(1)
    if shuffled:  # runs must not assume sorted positions
        positions = positions[torch.randperm(positions.numel(), generator=gen)]
    source = torch.randn(rows, positions.numel(), generator=gen)
    storage = torch.randn(rows, 3, width, generator=gen)
    target = storage[:, 1] if strided else storage[:, 1].clone()
    expected = torch.zeros_like(target) if zero_rest else target.clone()
    expected[:, positions] = source
    with mock.patch.object(_columns, "MIN_ELEMENTS_PER_RUN", min_elements):
        out = _columns.copy_columns_(target, source, positions, zero_rest=zero_rest)
    assert out is target
    assert torch.equal(target, expected)


@pytest.mark.parametrize("positions, runs", [
    ([], []),
    ([4], [(0, 4, 1)]),
    ([0, 1, 2, 5, 6, 9], [(0, 0, 3), (3, 5, 2), (5, 9, 1)]),
    ([3, 4, 0, 1], [(0, 3, 2), (2, 0, 2)]),
])
def test_column_runs_by_hand(positions, runs):
    assert _columns.column_runs(torch.tensor(positions, dtype=torch.long)) == runs


def test_runs_pay_off_only_for_long_runs_on_cpu():
    runs = [(0, 0, 10)] * 4
    limit = _columns.MIN_ELEMENTS_PER_RUN * 4
    assert _columns.runs_pay_off(runs, 1, limit, torch.device("cpu"))
    assert not _columns.runs_pay_off(runs, 1, limit - 1, torch.device("cpu"))
    assert not _columns.runs_pay_off([], 100, limit, torch.device("cpu"))
    assert not _columns.runs_pay_off(runs, 1, limit, torch.device("meta"))
