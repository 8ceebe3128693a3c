"""Masks drawn so that they read on any object colour: spotlight, border widths, error maps, layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hypertriton import visualize


def _case(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8), rng.random((height, width)) < 0.5


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), height=st.integers(1, 30), width=st.integers(1, 30), border=st.integers(1, 4))
@example(seed=0, height=1, width=1, border=1)
def test_spotlight_dims_outside_keeps_inside_and_draws_the_border_in_white(seed, height, width, border):
    image, mask = _case(seed, height, width)
    out = visualize.spotlight(image, mask, width=border)
    np.testing.assert_array_equal(out[~mask], np.rint(image[~mask] * np.float32(visualize.DIM)).astype(np.uint8))
    edge = visualize.border(mask, border)
    np.testing.assert_array_equal(out[edge], np.full((edge.sum(), 3), 255, np.uint8))
    np.testing.assert_array_equal(out[mask & ~edge], image[mask & ~edge])
    # A border pixel is one within `border` steps of the outside (or of the image's edge).
    padded = np.pad(~mask, border, constant_values=True)
    near_outside = np.zeros_like(mask)
    for dy in range(-border, border + 1):
        for dx in range(-border, border + 1):
            if abs(dy) + abs(dx) <= border:
                near_outside |= padded[border + dy:border + dy + height, border + dx:border + dx + width]
    np.testing.assert_array_equal(edge, mask & near_outside)


def test_the_border_widens_with_the_image_so_a_scaled_down_photo_keeps_it():
    assert [visualize.outline_width(h, w) for h, w in [(24, 24), (400, 600), (1200, 1600), (300, 2000)]] == [1, 2, 4, 5]
    image, mask = _case(1, 6, 7)
    np.testing.assert_array_equal(visualize.spotlight(image, mask), visualize.spotlight(image, mask, width=1))


def test_the_error_map_colours_each_kind_of_pixel():
    image, pred = _case(2, 9, 11)
    truth = np.random.default_rng(3).random((9, 11)) < 0.5
    ignore = np.zeros((9, 11), bool)
    ignore[0] = True
    out = visualize.error_map(image, pred, truth, ignore)
    scored = ~ignore
    np.testing.assert_array_equal(out[pred & truth & scored], image[pred & truth & scored])
    assert (out[pred & ~truth & scored] == visualize.FALSE_POSITIVE).all()
    assert (out[~pred & truth & scored] == visualize.MISSED).all()
    assert (out[ignore] == visualize.IGNORED).all()
    background = ~pred & ~truth & scored
    np.testing.assert_array_equal(out[background], np.rint(image[background] * np.float32(0.3)).astype(np.uint8))


def test_bad_input_is_named():
    image, mask = _case(4, 5, 6)
    with pytest.raises(ValueError, match=r"mask: expected bool \[H, W\] = \[5, 6\], got bool \[6, 5\]"):
        visualize.spotlight(image, mask.T)
    with pytest.raises(ValueError, match=r"image: expected uint8 \[H, W, 3\], got float32"):
        visualize.spotlight(image.astype(np.float32), mask)
    with pytest.raises(ValueError, match=r"truth: expected bool"):
        visualize.error_map(image, mask, mask.astype(np.uint8))


def test_tiles_keep_their_aspect_and_enlarge_without_blending():
    image = np.zeros((2, 5, 3), np.uint8)
    image[:, 2] = 255
    tile = np.asarray(visualize.fit_height(image, 8))
    assert tile.shape == (8, 20, 3)
    assert set(np.unique(tile)) == {0, 255}  # nearest neighbour: no blended greys at the border
    small = np.asarray(visualize.fit_height(np.full((40, 80, 3), 9, np.uint8), 10))
    assert small.shape == (10, 20, 3)


def test_a_sheet_places_rows_under_a_title_with_its_legend():
    cells = [[visualize.captioned(visualize.fit_height(np.zeros((4, 4, 3), np.uint8), 20), "a")] * 3]
    plain = visualize.sheet(cells)
    titled = visualize.sheet(cells, title="episode 3", legend=[(visualize.MISSED, "missed")])
    assert plain.width == 3 * 20 + 2 * 6 and titled.height > plain.height
    drawn = np.asarray(titled)[: titled.height - plain.height]
    assert (drawn == visualize.MISSED).all(axis=2).any()  # the legend's square


def test_dimming_takes_a_share_of_the_brightness_only():
    image, mask = _case(5, 4, 4)
    with pytest.raises(ValueError, match=r"dim: expected a share of the brightness in \[0, 1\], got 1.5"):
        visualize.spotlight(image, mask, dim=1.5)
    np.testing.assert_array_equal(visualize.spotlight(image, mask, dim=1.0, width=0), image)


@pytest.mark.parametrize("object_share", [0.0, 0.5, 0.9, 1.0])
def test_spotlight_gives_the_formulas_bytes_for_small_and_large_objects(object_share):
    # Two ways to the same bytes: a lookup over the image (small objects) or over the few pixels around a
    # large one.
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = rng.random((30, 40)) < object_share
    expected = image.copy()
    expected[~mask] = np.rint(image[~mask] * np.float32(visualize.DIM)).astype(np.uint8)
    expected[visualize.border(mask, 1)] = 255
    np.testing.assert_array_equal(visualize.spotlight(image, mask, width=1), expected)
