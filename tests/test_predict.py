"""``hypertriton predict`` and its library: real predictions on generated images, every bad input
refused with a clear message and nothing written, compact checkpoints."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hypertriton import predict as lib
from hypertriton.cli import main
from hypertriton.data.synthetic import SyntheticDataset

IMG_SIZE = 64  # model input side in these tests (small: fast)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-weights resnet18 HSNet in the original checkpoint format (predictions are arbitrary but
    deterministic, which is all these tests compare)."""
    from hypertriton.model import HSNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "random_resnet18.pt"
    HSNet("resnet18").save_checkpoint(path)
    return path


def _save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Support images + 0/255 masks and queries of different, non-square sizes, drawn from the
    synthetic benchmark."""
    root = tmp_path_factory.mktemp("inputs")
    episode = SyntheticDataset(split="test", nshot=2, img_size=80, episodes=1).episode(0)
    to_uint8 = lambda image: (image * 255).round().astype(np.uint8)
    supports = [_save(root / f"s{k}.png", to_uint8(img)) for k, img in enumerate(episode.support_images)]
    masks = [_save(root / f"s{k}_mask.png", (m * 255).astype(np.uint8)) for k, m in enumerate(episode.support_masks)]
    queries = root / "queries"
    queries.mkdir()
    query = Image.fromarray(to_uint8(episode.query_image))
    query.resize((120, 72)).save(queries / "wide.png")
    query.resize((56, 90)).save(queries / "tall.jpg")
    (queries / "notes.txt").write_text("not an image, and not picked up: wrong suffix")
    return {"root": root, "supports": supports, "masks": masks, "queries": queries}


def _predict(files, out, checkpoint, *extra, supports=None, masks=None, query=None) -> int:
    supports = supports or files["supports"]
    masks = masks or files["masks"]
    query = query or [files["queries"]]
    argv = ["predict", "--support", *map(str, supports), "--support-mask", *map(str, masks),
            "--query", *map(str, query), "--out", str(out), "--checkpoint", str(checkpoint),
            "--img-size", str(IMG_SIZE), "--no-progress", *extra]
    return main(argv)


def test_predict_writes_masks_and_overlays_at_each_query_size(files, checkpoint, tmp_path):
    out = tmp_path / "out"
    assert _predict(files, out, checkpoint) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tall_mask.png", "tall_overlay.png", "wide_mask.png",
                                                     "wide_overlay.png"]
    model, _ = lib.load_model(checkpoint)
    supports = [lib.read_image(p) for p in files["supports"]]
    masks = [lib.read_mask(m, s.shape[:2]) for m, s in zip(files["masks"], supports)]
    for name, size in (("wide", (72, 120)), ("tall", (90, 56))):
        written = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert written.shape == size and set(np.unique(written)) <= {0, 255}
        query = lib.read_image(next(files["queries"].glob(f"{name}.*")))
        expected = lib.segment(model, query, supports, masks, IMG_SIZE)
        np.testing.assert_array_equal(written > 0, expected)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_overlay.png")), lib.overlay(query, expected))


def test_queries_where_no_object_was_found_are_named(files, checkpoint, tmp_path, capsys, monkeypatch):
    segment = lib.segment

    def nothing_in_tall(model, query, *args, **kwargs):
        mask = segment(model, query, *args, **kwargs)
        return np.zeros_like(mask) if query.shape[:2] == (90, 56) else np.ones_like(mask)

    monkeypatch.setattr(lib, "segment", nothing_in_tall)
    assert _predict(files, tmp_path / "out", checkpoint) == 0
    assert "no object found in 1 of the 2 queries: tall.jpg" in capsys.readouterr().out


def test_support_folders_pair_images_and_masks_by_name(files, checkpoint, tmp_path):
    image_dir, mask_dir = tmp_path / "imgs", tmp_path / "masks"
    image_dir.mkdir(), mask_dir.mkdir()
    for k, (image, mask) in enumerate(zip(files["supports"], files["masks"])):
        (image_dir / f"shot{k}.png").write_bytes(image.read_bytes())
        (mask_dir / f"shot{k}.png").write_bytes(mask.read_bytes())
    query = files["queries"] / "wide.png"
    assert _predict(files, tmp_path / "a", checkpoint, supports=[image_dir], masks=[mask_dir], query=[query]) == 0
    assert _predict(files, tmp_path / "b", checkpoint, query=[query]) == 0
    assert (tmp_path / "a" / "wide_mask.png").read_bytes() == (tmp_path / "b" / "wide_mask.png").read_bytes()


def test_support_folders_pair_by_exact_name_and_png_first(files, checkpoint, tmp_path, monkeypatch):
    # Names are matched as names (brackets are not wildcards), NAME.png wins over other files of that
    # name (a labelme NAME.json is not even an image), one folder for both takes its PNGs as the masks.
    from hypertriton.commands import predict as command

    (tmp_path / "imgs").mkdir(), (tmp_path / "masks").mkdir(), (tmp_path / "both").mkdir()
    image, mask = files["supports"][0], files["masks"][0]
    for name in ("cat [1].jpg", "cat 1.jpg"):
        Image.open(image).convert("RGB").save(tmp_path / "imgs" / name)
        Image.open(image).convert("RGB").save(tmp_path / "both" / name)
    for name in ("cat [1].png", "cat [1].bmp", "cat 1.png", "cat 1.json"):
        (tmp_path / "masks" / name).write_bytes(mask.read_bytes() if name != "cat 1.json" else b"{}")
        (tmp_path / "both" / name).write_bytes(mask.read_bytes() if name != "cat 1.json" else b"{}")
    (tmp_path / "imgs" / "._cat 1.jpg").write_bytes(b"\x00\x05\x16\x07 a resource fork")
    expected = [(tmp_path / "imgs" / "cat 1.jpg", tmp_path / "masks" / "cat 1.png"),
                (tmp_path / "imgs" / "cat [1].jpg", tmp_path / "masks" / "cat [1].png")]
    assert command._support_pairs([str(tmp_path / "imgs")], [str(tmp_path / "masks")]) == expected
    pairs = command._support_pairs([str(tmp_path / "both")], [str(tmp_path / "both")])
    assert [(i.name, m.name) for i, m in pairs] == [("cat 1.jpg", "cat 1.png"), ("cat [1].bmp", "cat [1].png"),
                                                     ("cat [1].jpg", "cat [1].png")]
    (tmp_path / "masks" / "cat 1.png").unlink()
    (tmp_path / "masks" / "cat 1.tif").write_bytes(mask.read_bytes())
    (tmp_path / "masks" / "cat 1.bmp").write_bytes(mask.read_bytes())
    with pytest.raises(lib.InputError, match=r"several masks for support image .*cat 1\.jpg.* "
                                             r"\(cat 1\.bmp, cat 1\.tif\)"):
        command._support_pairs([str(tmp_path / "imgs")], [str(tmp_path / "masks")])
    out = tmp_path / "out"
    assert _predict(files, out, checkpoint, supports=[tmp_path / "both"], masks=[tmp_path / "both"],
                    query=[tmp_path / "imgs"]) == 0  # the query folder's dot file is skipped too
    assert sorted(path.name for path in out.iterdir()) == ["cat 1_mask.png", "cat 1_overlay.png",
                                                            "cat [1]_mask.png", "cat [1]_overlay.png"]


def test_each_query_is_written_when_done_so_an_interruption_keeps_them(files, checkpoint, tmp_path, monkeypatch):
    segment, calls = lib.segment, []

    def interrupted_on_the_second_query(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return segment(*args, **kwargs)

    monkeypatch.setattr(lib, "segment", interrupted_on_the_second_query)
    out = tmp_path / "out"
    assert _predict(files, out, checkpoint) == 130
    assert sorted(path.name for path in out.iterdir()) == ["tall_mask.png", "tall_overlay.png"]  # no temporaries


def test_sixteen_bit_images_are_scaled_and_masks_with_alpha_read(tmp_path):
    grey16 = np.array([[0, 257, 65535], [1000, 32768, 514]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    expected = np.array([[0, 1, 255], [4, 128, 2]], dtype=np.uint8)  # round(v / 257)
    np.testing.assert_array_equal(lib.read_image(tmp_path / "g16.png"), np.repeat(expected[..., None], 3, axis=2))
    values = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
    alpha = np.array([[255, 0, 255], [255, 255, 0]], np.uint8)  # transparency is not the object
    Image.fromarray(np.stack([values, alpha], axis=2), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(lib.read_mask(tmp_path / "la.png", (2, 3)), values > 0)
    Image.fromarray((values > 0).astype(np.uint16) * 65535).save(tmp_path / "m16.png")
    np.testing.assert_array_equal(lib.read_mask(tmp_path / "m16.png", (2, 3)), values > 0)
    Image.fromarray(np.stack([values, values, values], axis=2)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(lib.read_mask(tmp_path / "rgb.png", (2, 3)), values > 0)
    Image.fromarray(np.array([[-1.5, 2.0]], np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(lib.InputError, match=r"f\.tif' is a F image with values in \[-1\.5, 2\]"):
        lib.read_image(tmp_path / "f.tif")


def test_lean_flag_writes_the_same_masks(files, checkpoint, tmp_path):
    query = files["queries"] / "wide.png"
    assert _predict(files, tmp_path / "a", checkpoint, query=[query]) == 0
    assert _predict(files, tmp_path / "b", checkpoint, "--lean", query=[query]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / "wide_mask.png")),
                                  np.asarray(Image.open(tmp_path / "b" / "wide_mask.png")))


def _bad_inputs(files, tmp_path, checkpoint):
    """(name, keyword overrides for _predict, expected words in the error)."""
    root = tmp_path / "bad"
    root.mkdir()
    support = files["supports"][0]
    image = np.asarray(Image.open(support))
    small_mask = _save(root / "small.png", np.zeros((10, 12), np.uint8))
    grey = (np.asarray(Image.open(files["masks"][0])) // 2).astype(np.uint8)  # values 0 and 127
    grey_mask = _save(root / "grey.png", grey)
    empty_mask = _save(root / "empty.png", np.zeros(image.shape[:2], np.uint8))
    garbage = root / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 this is not a jpeg")
    truncated = root / "truncated.png"
    truncated.write_bytes(support.read_bytes()[:200])
    not_a_checkpoint = root / "ckpt.pt"
    not_a_checkpoint.write_text("hello")
    foreign = root / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, foreign)
    queries_with_bad = root / "queries"
    queries_with_bad.mkdir()
    (queries_with_bad / "a.png").write_bytes((files["queries"] / "wide.png").read_bytes())
    (queries_with_bad / "b.png").write_bytes(b"broken")
    return [
        ("missing support", {"supports": [root / "nope.png"], "masks": [files["masks"][0]]}, ["no such file", "nope.png"]),
        ("missing query", {"query": [root / "nope.png"]}, ["no such file", "nope.png"]),
        ("mask size", {"supports": [support], "masks": [small_mask]}, ["12x10", "its image's size"]),
        ("non-binary mask", {"supports": [support], "masks": [grey_mask]}, ["not a binary mask", "127"]),
        ("empty mask", {"supports": [support], "masks": [empty_mask]}, ["no object pixel"]),
        ("unreadable support", {"supports": [garbage], "masks": [files["masks"][0]]}, ["cannot read", "garbage.jpg"]),
        ("truncated support", {"supports": [truncated], "masks": [files["masks"][0]]}, ["cannot read"]),
        ("unreadable query in a folder", {"query": [queries_with_bad]}, ["cannot read", "b.png"]),
        ("mask count", {"supports": files["supports"], "masks": files["masks"][:1]}, ["2 images", "1 masks"]),
        ("not a checkpoint", {"checkpoint": not_a_checkpoint}, ["not a PyTorch checkpoint"]),
        ("foreign checkpoint", {"checkpoint": foreign}, ["not an HSNet checkpoint"]),
        ("missing checkpoint", {"checkpoint": root / "missing.pt"}, ["no such file", "missing.pt"]),
        ("folder as checkpoint", {"checkpoint": root}, ["is a folder; expected a checkpoint file"]),
        ("unknown device", {"extra": ["--device", "gpu0"]}, ["--device: 'gpu0' is not a device"]),
    ]


def test_every_bad_input_is_refused_and_nothing_is_written(files, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier file")
    for name, overrides, words in _bad_inputs(files, tmp_path, checkpoint):
        ckpt = overrides.pop("checkpoint", checkpoint)
        assert _predict(files, out, ckpt, *overrides.pop("extra", []), **overrides) == 2, name
        err = capsys.readouterr().err
        assert "error:" in err and "nothing was written" in err, name
        for word in words:
            assert word in err, (name, word, err)
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"], name  # no output, no temporary file


def test_wrong_backbone_for_a_checkpoint(files, checkpoint, tmp_path, capsys):
    assert _predict(files, tmp_path / "out", checkpoint, "--backbone", "resnet34") == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "resnet18" in err
    assert not (tmp_path / "out").exists()


def test_read_mask_accepts_zero_one_palette_and_grey_rgb(tmp_path):
    values = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)
    palette = Image.fromarray(values, mode="P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    palette.save(tmp_path / "p.png")
    _save(tmp_path / "rgb.png", np.repeat(values[..., None] * 255, 3, axis=2))
    for name in ("p.png", "rgb.png"):
        np.testing.assert_array_equal(lib.read_mask(tmp_path / name, (2, 3)), values > 0)
    _save(tmp_path / "colour.png", np.stack([values * 255, values * 0, values * 0], axis=2))
    with pytest.raises(lib.InputError, match="colour image"):
        lib.read_mask(tmp_path / "colour.png")


def test_palette_masks_are_read_by_colour_when_grey_and_by_index_when_coloured(tmp_path):
    drawn = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)  # 1 = object
    # An editor's two-colour palette may put white first: index 0 shows the object.
    inverted = Image.fromarray(1 - drawn, mode="P")
    inverted.putpalette([255, 255, 255, 0, 0, 0])
    inverted.save(tmp_path / "white_first.png")
    np.testing.assert_array_equal(lib.read_mask(tmp_path / "white_first.png", (2, 3)), drawn > 0)
    # A web palette's black and white sit at indices that are not 0/1 or 0/255.
    web = Image.fromarray(np.where(drawn > 0, 225, 16).astype(np.uint8), mode="P")
    web.putpalette([0, 0, 0] * 16 + [0, 0, 0] + [7, 7, 7] * 208 + [255, 255, 255] + [9, 9, 9] * 30)
    web.save(tmp_path / "web.png")
    np.testing.assert_array_equal(lib.read_mask(tmp_path / "web.png", (2, 3)), drawn > 0)
    # VOC's coloured palette: the indices are the classes, whatever their colours.
    voc = Image.fromarray(drawn, mode="P")
    voc.putpalette([0, 0, 0, 128, 0, 0])
    voc.save(tmp_path / "voc.png")
    np.testing.assert_array_equal(lib.read_mask(tmp_path / "voc.png", (2, 3)), drawn > 0)
    # Both entries black, the background's transparent (Pillow's RGBA.quantize(2), PNG optimizers): the alpha.
    transparent = Image.fromarray(1 - drawn, mode="P")
    transparent.putpalette([0, 0, 0, 0, 0, 0])
    transparent.save(tmp_path / "trns.png", transparency=1)
    np.testing.assert_array_equal(lib.read_mask(tmp_path / "trns.png", (2, 3)), drawn > 0)
    # A palette of other greys (0 and 128) is read by index, as before.
    mid_grey = Image.fromarray(drawn, mode="P")
    mid_grey.putpalette([0, 0, 0, 128, 128, 128])
    mid_grey.save(tmp_path / "mid_grey.png")
    np.testing.assert_array_equal(lib.read_mask(tmp_path / "mid_grey.png", (2, 3)), drawn > 0)
    voc_class = Image.fromarray(np.array([[0, 15, 15], [255, 0, 15]], np.uint8), mode="P")
    voc_class.putpalette([0, 0, 0] + [128, 0, 64] * 255)
    voc_class.save(tmp_path / "voc_class.png")
    with pytest.raises(lib.InputError, match=r"values \{0, 15, 255\}.*boundary by 255 \(ignored\)"):
        lib.read_mask(tmp_path / "voc_class.png", (2, 3))


def test_a_mask_in_the_alpha_channel_is_read_when_the_colours_are_all_the_same(tmp_path):
    drawn = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
    for name, colour in (("white", 255), ("black", 0)):
        rgba = np.dstack([np.full((2, 3, 3), colour, np.uint8), drawn])
        _save(tmp_path / f"{name}.png", rgba)
        np.testing.assert_array_equal(lib.read_mask(tmp_path / f"{name}.png", (2, 3)), drawn > 0)
        Image.fromarray(np.dstack([np.full((2, 3), colour, np.uint8), drawn]), mode="LA").save(tmp_path / "la.png")
        np.testing.assert_array_equal(lib.read_mask(tmp_path / "la.png", (2, 3)), drawn > 0)
    soft = np.dstack([np.full((2, 3, 3), 255, np.uint8), (drawn // 2)])  # half-transparent edges
    _save(tmp_path / "soft.png", soft)
    with pytest.raises(lib.InputError, match=r"values \{0, 127\} in its alpha channel"):
        lib.read_mask(tmp_path / "soft.png", (2, 3))


def test_jpeg_masks_are_refused_with_the_reason(tmp_path):
    noisy = np.zeros((16, 16), np.uint8)
    noisy[4:12, 4:12] = 255
    Image.fromarray(noisy).save(tmp_path / "mask.jpg", quality=60)
    assert len(np.unique(np.asarray(Image.open(tmp_path / "mask.jpg")))) > 2  # the premise: JPEG adds values
    with pytest.raises(lib.InputError, match="JPEG compression blurs a mask's edges .* save masks as PNG"):
        lib.read_mask(tmp_path / "mask.jpg", (16, 16))


def test_transparent_pixels_are_read_as_the_imagenet_mean_colour(tmp_path):
    from hypertriton.data.common import IMAGENET_MEAN

    fill = np.array(lib.TRANSPARENT_FILL[:3], np.float64)
    np.testing.assert_array_equal(fill, np.round(np.array(IMAGENET_MEAN) * 255))
    hidden = np.zeros((2, 3, 4), np.uint8)
    hidden[..., :3] = (250, 10, 10)  # red under the transparency, as editors leave it
    hidden[..., 3] = [[0, 0, 255], [255, 128, 0]]
    _save(tmp_path / "rgba.png", hidden)
    alpha = hidden[..., 3:4] / 255
    expected = np.rint(alpha * hidden[..., :3] + (1 - alpha) * fill)
    np.testing.assert_allclose(lib.read_image(tmp_path / "rgba.png"), expected, atol=1)
    # A palette image with one transparent index, as GIFs and small PNGs store transparency.
    palette = Image.fromarray(np.array([[0, 1, 1]], np.uint8), mode="P")
    palette.putpalette([250, 10, 10, 0, 200, 0])
    palette.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(lib.read_image(tmp_path / "p.png"), [[fill, (0, 200, 0), (0, 200, 0)]])


def test_sixteen_bit_images_keep_one_scale_and_low_bit_data_is_said_to_read_dark(tmp_path):
    # One scale for every 16-bit image (a support and a query from one camera keep their relative
    # brightness, whatever each one's brightest pixel); 12-bit data then reads dark, which a warning says.
    twelve_bit = np.array([[0, 4095, 2000]], np.uint16)
    Image.fromarray(twelve_bit).save(tmp_path / "q12.png")
    with pytest.warns(lib.InputWarning, match=r"q12\.png' is a 16-bit image whose values reach only 4095 of 65535"):
        np.testing.assert_array_equal(lib.read_image(tmp_path / "q12.png")[..., 0], [[0, 16, 8]])  # round(v / 257)
    brighter = np.array([[0, 4096, 2000]], np.uint16)
    Image.fromarray(brighter).save(tmp_path / "q12b.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # past 12 bits: no warning
        np.testing.assert_array_equal(lib.read_image(tmp_path / "q12b.png")[..., 0], [[0, 16, 8]])


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_a_large_grey_image_scales_in_blocks_to_the_whole_images_bytes_in_little_memory(tmp_path, mode):
    import tracemalloc

    generator = np.random.default_rng(0)
    if mode == "I;16":
        values = generator.integers(0, 65536, size=(2048, 2047), dtype=np.uint16)
        expected = np.rint(values / 257).astype(np.uint8)  # the same bytes as one float64 pass
    else:
        values = generator.random((2048, 2047), dtype=np.float32)
        values[0, :3] = (0.0, 1.0, 0.5 / 255)  # the ends, and a value that rounds half to even
        expected = np.rint(values.astype(np.float64) * 255).clip(0, 255).astype(np.uint8)
    tracemalloc.start()
    try:
        result = lib._grey_to_8bit(values, mode, "scan.tif", "--query")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(result, expected)
    # One uint8 output and one float64 block beside the input (a whole-image float64 pass: 13x the input).
    assert peak < result.nbytes + 3 * 8 * lib._SCALE_BLOCK_PIXELS, (peak, values.nbytes)


def test_multi_frame_files_give_their_first_frame_with_a_warning_and_are_closed(tmp_path):
    import gc
    import warnings

    frames = [Image.fromarray(np.full((4, 5, 3), value, np.uint8)) for value in (0, 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = lib.read_image(tmp_path / "anim.gif", role="--query")
        gc.collect()
    messages = [str(w.message) for w in caught]
    assert [w.category for w in caught] == [lib.InputWarning], messages  # no ResourceWarning: the file was closed
    assert "anim.gif' holds 2 frames" in messages[0] and "the first is used" in messages[0]
    np.testing.assert_array_equal(image, np.zeros((4, 5, 3), np.uint8))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_an_unreadable_image_leaves_no_file_open(files, tmp_path):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(files["supports"][0].read_bytes()[:200])
    open_files = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = open_files()
    kept = []
    for _ in range(3):
        with pytest.raises(lib.InputError, match="cannot read") as caught:
            lib.read_image(truncated)
        kept.append(caught.value)  # a caller keeping the errors (and their tracebacks) must not keep the files
    assert open_files() == before


def test_a_multi_frame_query_is_said_once_and_a_phones_mpo_not_at_all(files, checkpoint, tmp_path, capsys):
    queries = tmp_path / "queries"
    queries.mkdir()
    frames = [Image.fromarray(np.full((40, 50, 3), value, np.uint8)) for value in (90, 200)]
    frames[0].save(queries / "anim.gif", save_all=True, append_images=frames[1:])
    assert _predict(files, tmp_path / "out", checkpoint, query=[queries]) == 0
    err = capsys.readouterr().err
    assert err.count("holds 2 frames") == 1 and "hypertriton predict: warning: --query:" in err, err
    # A phone's JPEG with a preview frame behind the photo (MPO): read without a word.
    frames[0].save(tmp_path / "phone.mpo", format="MPO", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "phone.mpo").n_frames == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(lib.read_image(tmp_path / "phone.mpo")[0, 0], [90, 90, 90])


def test_outputs_that_would_replace_inputs_are_refused(files, checkpoint, tmp_path, capsys):
    folder = tmp_path / "cats"
    folder.mkdir()
    (folder / "cat.png").write_bytes((files["queries"] / "wide.png").read_bytes())
    truth = np.zeros((72, 120), np.uint8)
    truth[10:30, 20:60] = 255
    _save(folder / "cat_mask.png", truth)  # the user's own ground truth, next to its image
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for overrides, message in (
            # its outputs would land among the queries, on the user's ground truth
            ({"query": [folder]}, "is a --query folder: the masks and overlays would be written among the queries"),
            # a support mask would be replaced by the prediction
            ({"supports": [folder / "cat.png"], "masks": [folder / "cat_mask.png"], "query": [folder / "cat.png"]},
             "cat_mask.png' would replace the input")):
        assert _predict(files, folder, checkpoint, **overrides) == 2
        err = capsys.readouterr().err
        assert "--out: " in err and message in err, err
        assert "nothing was written" in err
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # An earlier run's outputs elsewhere are replaced, and the summary says so.
    out = tmp_path / "out"
    query = [files["queries"] / "wide.png"]
    assert _predict(files, out, checkpoint, query=query) == 0
    assert "replacing" not in capsys.readouterr().out
    assert _predict(files, out, checkpoint, query=query) == 0
    assert "wrote 2 files to" in (said := capsys.readouterr().out) and "(2 of them replacing files" in said


def test_a_query_folder_s_masks_and_overlays_are_not_taken_as_queries(files, checkpoint, tmp_path, capsys):
    # An --out that was a query folder left NAME_mask.png / NAME_overlay.png there, which the next run over
    # the folder segmented as queries (writing NAME_mask_mask.png ...); ground-truth masks beside their
    # images likewise.
    folder = tmp_path / "queries"
    folder.mkdir()
    for name in ("cat.png", "dog.png"):
        (folder / name).write_bytes((files["queries"] / "wide.png").read_bytes())
    for name in ("cat_mask.png", "cat_overlay.png", "dog_mask.png"):
        _save(folder / name, np.zeros((72, 120), np.uint8))
    _save(folder / "bird_mask.png", np.zeros((72, 120), np.uint8))  # no bird image: a query
    out = tmp_path / "out"
    one = {"supports": files["supports"][:1], "masks": files["masks"][:1]}
    assert _predict(files, out, checkpoint, query=[folder], **one) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{stem}_{kind}.png" for stem in ("bird_mask", "cat", "dog")
                                                           for kind in ("mask", "overlay"))
    said = capsys.readouterr()
    assert "warning: --query: skipped 3 file(s) of folder" in said.err
    assert "(cat_mask.png, cat_overlay.png, dog_mask.png)" in said.err
    assert said.out.startswith("3 queries segmented with 1 support (checkpoint ")
    # A folder of folders: said that they are not searched.
    nested = tmp_path / "nested"
    (nested / "inner").mkdir(parents=True)
    assert _predict(files, out, checkpoint, query=[nested]) == 2
    assert "holds no image file (sub-folders are not searched)" in capsys.readouterr().err


def test_the_summary_names_the_model_and_the_bundled_one_is_said_to_be_a_demonstration(files, tmp_path, capsys):
    from hypertriton.cli import main

    query = files["queries"] / "wide.png"
    assert main(["predict", "--support", str(files["supports"][0]), "--support-mask", str(files["masks"][0]),
                 "--query", str(query), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    said = capsys.readouterr()
    assert said.out.startswith("1 query segmented with 1 support (the bundled synthetic-shapes model, backend "), said
    assert "note: no --checkpoint given: using the bundled model, trained only on the synthetic" in said.err


def test_pngs_of_a_combined_support_folder_that_match_no_image_are_said_unused(files, checkpoint, tmp_path, capsys):
    folder = tmp_path / "supports"
    folder.mkdir()
    (folder / "1.png").write_bytes(files["masks"][0].read_bytes())
    Image.open(files["supports"][0]).convert("RGB").save(folder / "1.jpg", quality=95)
    _save(folder / "2.png", np.zeros((8, 8), np.uint8))  # its image missing
    assert _predict(files, tmp_path / "out", checkpoint, supports=[folder], masks=[folder]) == 0
    assert "warning: --support-mask: 1 PNG file(s) of" in (err := capsys.readouterr().err) and "(2.png)" in err, err


def test_a_long_query_name_writes_and_one_too_long_is_refused_before_any_query(files, checkpoint, tmp_path, capsys):
    import shutil

    queries = tmp_path / "queries"
    queries.mkdir()
    shutil.copy(files["queries"] / "wide.png", queries / "a.png")
    long_stem = "b" * 230  # its outputs fit (230 + 12 bytes); a temporary beside them, 32 bytes longer, would not
    shutil.copy(files["queries"] / "wide.png", queries / f"{long_stem}.png")
    out = tmp_path / "out"
    assert _predict(files, out, checkpoint, query=[queries]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["a_mask.png", "a_overlay.png", f"{long_stem}_mask.png", f"{long_stem}_overlay.png"])
    too_long = "c" * 246  # c..._overlay.png: 258 bytes
    shutil.copy(files["queries"] / "wide.png", queries / f"{too_long}.png")
    capsys.readouterr()
    assert _predict(files, tmp_path / "out2", checkpoint, query=[queries]) == 2
    err = capsys.readouterr().err
    assert f"would write '{too_long}_overlay.png', which with the temporary it is written under needs a name of " \
           "258 bytes" in err and "at most 243 bytes" in err, err
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("limit", [143, -1], ids=["eCryptfs", "no-limit-reported"])
def test_name_limits_count_the_temporaries_and_the_advice_fits(tmp_path, monkeypatch, limit):
    import re

    from hypertriton.commands import predict as command

    monkeypatch.setattr(command.os, "pathconf", lambda folder, name: limit)
    names = {"q" * 120: tmp_path / ("q" * 120 + ".png"), "short": tmp_path / "short.png"}
    targets = {stem: command._targets(tmp_path, stem, True) for stem in names}
    if limit < 0:  # "no limit": taken as 255, where 120-byte names fit
        command._refuse_unwritable_names(targets, names, tmp_path)
        return
    # 132-byte outputs fit in 143 bytes, but not the temporaries (32 bytes more) they are written under.
    with pytest.raises(lib.InputError, match=r"allows 143: rename the query \(at most (\d+) bytes") as refused:
        command._refuse_unwritable_names(targets, names, tmp_path)
    room = int(re.search(r"at most (\d+) bytes", str(refused.value)).group(1))
    for stem, fits in (("q" * room, True), ("q" * (room + 1), False)):  # the advice is exact
        renamed = {stem: tmp_path / f"{stem}.png"}
        if fits:
            command._refuse_unwritable_names({stem: command._targets(tmp_path, stem, True)}, renamed, tmp_path)
        else:
            with pytest.raises(lib.InputError):
                command._refuse_unwritable_names({stem: command._targets(tmp_path, stem, True)}, renamed, tmp_path)


def test_queries_differing_only_in_case_are_refused_where_the_output_folder_ignores_case(
        files, checkpoint, tmp_path, capsys, monkeypatch):
    import shutil

    from hypertriton.commands import predict as command

    queries = tmp_path / "queries"
    queries.mkdir()
    shutil.copy(files["queries"] / "wide.png", queries / "Cat.png")
    shutil.copy(files["queries"] / "tall.jpg", queries / "cat.jpg")
    if (queries / "CAT.png").exists():
        pytest.skip("this file system ignores case: Cat.png and cat.jpg cannot both be made to test with")
    assert command._ignores_case(tmp_path) is False
    assert _predict(files, tmp_path / "out", checkpoint, query=[queries]) == 0  # two outputs each, apart
    assert len(list((tmp_path / "out").iterdir())) == 4
    monkeypatch.setattr(command, "_ignores_case", lambda folder: True)  # as on macOS and Windows
    capsys.readouterr()
    assert _predict(files, tmp_path / "out2", checkpoint, query=[queries]) == 2
    err = capsys.readouterr().err
    assert "would write Cat_mask.png and cat_mask.png, one file on" in err, err
    assert not (tmp_path / "out2").exists()


def test_a_vanishing_support_mask_is_named_once_by_its_file(files, checkpoint, tmp_path, capsys):
    support = np.zeros((640, 640, 3), np.uint8)
    tiny = np.zeros((640, 640), np.uint8)
    tiny[1:3, 1:3] = 255
    _save(tmp_path / "big.png", support)
    _save(tmp_path / "tiny.png", tiny)
    assert _predict(files, tmp_path / "out", checkpoint, supports=[tmp_path / "big.png"],
                    masks=[tmp_path / "tiny.png"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err  # once, not once per query
    assert "hypertriton predict: warning: --support-mask: the 4 object pixels of" in err
    assert "tiny.png' all vanish" in err


def test_images_are_read_upright_by_their_exif_orientation(tmp_path):
    # A phone photo stores its pixels sideways and the EXIF tag 0x0112 says how to turn them; viewers and
    # annotation tools show (and masks are drawn on) the turned image.
    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    upright = lib.read_image(tmp_path / "phone.png")
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))
    assert upright.shape == (10, 6, 3)

    drawn_upright = np.zeros((10, 6), np.uint8)
    drawn_upright[:4, :2] = 255
    _save(tmp_path / "upright_mask.png", drawn_upright)
    np.testing.assert_array_equal(lib.read_mask(tmp_path / "upright_mask.png", upright.shape[:2]), drawn_upright > 0)
    # A mask drawn on the stored (sideways) pixels no longer fits, and the error says why.
    _save(tmp_path / "stored_mask.png", np.rot90(drawn_upright).copy())
    with pytest.raises(lib.InputError, match=r"10x6 \(WxH\) but its image is 6x10.*turned by 90 degrees.*EXIF"):
        lib.read_mask(tmp_path / "stored_mask.png", upright.shape[:2])
    # Without the tag nothing turns.
    _save(tmp_path / "plain.png", stored)
    np.testing.assert_array_equal(lib.read_image(tmp_path / "plain.png"), stored)


def test_write_pngs_leaves_nothing_when_one_file_fails(tmp_path):
    good = tmp_path / "a.png"
    with pytest.raises(TypeError):
        lib.write_pngs({good: np.zeros((4, 4), np.uint8), tmp_path / "b.png": np.zeros((4, 4), object)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shots", [1, 2])
def test_prepared_supports_run_their_backbone_once_and_give_the_originals_masks(files, monkeypatch, shots):
    model, img_size = lib.load_model()  # the bundled, trained model: masks of both classes
    supports = [lib.read_image(p) for p in files["supports"][:shots]]
    masks = [lib.read_mask(m, s.shape[:2]) for m, s in zip(files["masks"], supports)]
    queries = [lib.read_image(p) for p in sorted(files["queries"].iterdir()) if p.suffix != ".txt"]
    extract, calls = model.extract_features, []
    monkeypatch.setattr(model, "extract_features", lambda images: calls.append(len(images)) or extract(images))
    prepared = lib.prepare_supports(model, supports, masks, img_size)
    assert calls == [1] * shots
    foreground = []
    for query in queries:
        del calls[:]
        got = lib.segment(model, query, prepared)
        assert calls == [1]  # the query's backbone only
        # The original's path: every image through the backbone, logits resized to the query's size.
        batch = {"query_img": lib.image_tensor(query, img_size)[None],
                 "support_imgs": torch.stack([lib.image_tensor(s, img_size) for s in supports])[None],
                 "support_masks": torch.stack([lib.mask_tensor(m, img_size) for m in masks])[None],
                 "org_query_imsize": (query.shape[1], query.shape[0])}
        with torch.no_grad():
            want = model.predict_mask_nshot(batch, shots)[0].numpy() > 0
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(lib.segment(model, query, supports, masks, img_size), want)
        foreground.append(got.mean())
    assert any(0 < share < 1 for share in foreground)
    other, _ = lib.load_model()
    with pytest.raises(ValueError, match="prepared for another model"):
        lib.segment(other, queries[0], prepared)
    with pytest.raises(ValueError, match="pass neither"):
        lib.segment(model, queries[0], prepared, masks, img_size)


def test_segment_names_inputs_that_are_not_what_read_image_and_read_mask_return(checkpoint):
    model, _ = lib.load_model(checkpoint)
    image, mask = np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), bool)
    cases = [
        ((image.astype(float), [image], [mask]), r"query: expected a numpy RGB uint8 image .* got float64"),
        ((image[..., 0], [image], [mask]), r"query: .* got uint8 \[64, 64\]"),
        ((image, [np.zeros((64, 64, 4), np.uint8)], [mask]), r"supports\[0\]: .* got uint8 \[64, 64, 4\]"),
        ((torch.zeros(64, 64, 3), [image], [mask]), r"query: .* got Tensor"),
        ((image, [image], [mask[:, :50]]), r"support_masks\[0\]: expected a numpy array \[H, W\] = \[64, 64\]"),
        ((image, [image], None), r"support_masks: required with support images"),  # was len(None): TypeError
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            lib.segment(model, *args, IMG_SIZE)
    # A 2x2 object in a 640-px mask falls between the nearest-neighbour samples at 64 px: said, not silent.
    big, tiny = np.zeros((640, 640, 3), np.uint8), np.zeros((640, 640), bool)
    tiny[1:3, 1:3] = True
    with pytest.warns(UserWarning, match=r"support_masks\[0\]: its 4 object pixels all vanish .* 64x64"):
        lib.segment(model, image, [big], [tiny], IMG_SIZE)


def test_the_training_size_is_read_from_trains_config_next_to_the_checkpoint(checkpoint, tmp_path):
    """A best_model.pt (original format: no room for the size) trained at 64 px is not fed 400-px images."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_model.pt").write_bytes(checkpoint.read_bytes())
    assert lib.load_model(run / "best_model.pt")[1] == 400  # nothing records the size: the original's
    (run / "config.json").write_text('{"benchmark": "synthetic", "img_size": 64}')
    assert lib.load_model(run / "best_model.pt")[1] == 64
    (run / "config.json").write_text('{"img_size": 64}')  # not train's: ignored
    assert lib.load_model(run / "best_model.pt")[1] == 400
    # The file decides an allocation: a size past the compact format's bound is ignored, said so; JSON
    # nested past Python's recursion limit is an unreadable config, not a traceback.
    (run / "config.json").write_text('{"benchmark": "synthetic", "img_size": 200000}')
    with pytest.warns(lib.InputWarning, match="img_size 200000, outside 32..4096; ignored"):
        assert lib.load_model(run / "best_model.pt")[1] == 400
    (run / "config.json").write_text("[" * 100000)
    assert lib.load_model(run / "best_model.pt")[1] == 400
    with pytest.raises(ValueError, match="RecursionError"):
        lib.read_train_config(run / "best_model.pt")


def test_written_pngs_get_the_umasks_permissions_like_every_other_output(tmp_path):
    """Not mkstemp's 0600: a figure or mask shared on a cluster must be readable by the group."""
    previous = os.umask(0o022)
    try:
        lib.write_pngs({tmp_path / "a.png": np.zeros((4, 4), np.uint8)})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644


def test_overlay_spotlights_the_mask_with_a_border_that_widens_with_the_photo():
    from hypertriton import visualize

    image = np.full((5, 5, 3), 100, np.uint8)
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    out = lib.overlay(image, mask)
    np.testing.assert_array_equal(out[~mask], np.full((16, 3), 30))  # outside: dimmed to 0.3
    np.testing.assert_array_equal(out[2, 2], [100, 100, 100])  # inside: the photo as it is
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])  # border: white
    # On a photo, a border wide enough to survive viewing it scaled down (1 px per 400).
    photo = np.full((1200, 1600, 3), 200, np.uint8)
    blob = np.zeros((1200, 1600), bool)
    blob[300:900, 400:1200] = True
    out = lib.overlay(photo, blob)
    assert (out[600, 400:404] == 255).all() and (out[600, 404] == 200).all()
    np.testing.assert_array_equal(out, visualize.spotlight(photo, blob, width=4))


def test_overlay_with_a_colour_still_draws_the_former_tint_and_says_it_is_deprecated():
    from hypertriton import visualize

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    mask = rng.random((40, 30)) < 0.6
    with pytest.warns(DeprecationWarning, match="former tinted overlay"):
        out = lib.overlay(image, mask, colour=(255, 40, 40), alpha=0.3)
    blend = (0.7 * image.astype(np.float32) + np.float32(0.3) * np.float32([255, 40, 40])).round().astype(np.uint8)
    edge = visualize.border(mask)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    np.testing.assert_array_equal(out[mask & ~edge], blend[mask & ~edge])
    np.testing.assert_array_equal(out[edge], np.broadcast_to([255, 40, 40], out[edge].shape))


def test_compact_checkpoint_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    levels16 = torch.linspace(-1, 1, 16)
    levels256 = torch.linspace(-2, 2, 256)
    state = {
        "module.a.weight": levels16[torch.randint(0, 16, (4097,), generator=generator)].reshape(17, 241),  # odd count
        "module.b.weight": levels256[torch.randint(0, 256, (64, 64, 2), generator=generator)],
        "module.c.bias": torch.randn(10, generator=generator),
        "module.bn.num_batches_tracked": torch.tensor(7),
    }
    path = lib.save_compact(state, tmp_path / "c.pt", bits={"": 4, "module.b.": 8}, metadata={"img_size": 80})
    loaded, metadata = lib.load_compact(path)
    assert metadata == {"img_size": 80} and loaded.keys() == state.keys()
    # at most 2**bits distinct values are reproduced up to fp16 rounding of the codebook
    torch.testing.assert_close(loaded["module.a.weight"], state["module.a.weight"], rtol=0, atol=1e-3)
    torch.testing.assert_close(loaded["module.b.weight"], state["module.b.weight"], rtol=0, atol=2e-3)
    torch.testing.assert_close(loaded["module.c.bias"], state["module.c.bias"].half().float(), rtol=0, atol=0)
    assert loaded["module.bn.num_batches_tracked"].item() == 7 and loaded["module.a.weight"].dtype == torch.float32
    # 4-bit indices: two per byte
    assert torch.load(path, weights_only=True)["tensors"]["module.a.weight"]["index"].numel() == 2049


def test_missing_bundled_checkpoint_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(lib, "BUNDLED_CHECKPOINT", tmp_path / "synthetic_resnet18.pt")
    with pytest.raises(lib.InputError, match="bundled checkpoint .* is missing"):
        lib.load_model()


def test_bundled_compact_checkpoint_loads_through_from_checkpoint_and_evaluate(tmp_path, capsys):
    """The bundled file is in the compact format; the generic loaders expand it transparently."""
    from hypertriton import HSNet
    from hypertriton.cli import main as cli_main
    from hypertriton.compact import load_compact

    model = HSNet.from_checkpoint(lib.BUNDLED_CHECKPOINT)
    expanded, _ = load_compact(lib.BUNDLED_CHECKPOINT)
    state = model.state_dict()
    key = "hpn_learner.encoder_layer2.0.conv1.weight"
    assert torch.equal(state[key], expanded["module." + key])
    out = tmp_path / "result.json"
    assert cli_main(["evaluate", "--benchmark", "synthetic", "--nshot", "1", "--load", str(lib.BUNDLED_CHECKPOINT),
                     "--img-size", "96", "--max-episodes", "4", "--json", str(out)]) == 0
    assert "mIoU:" in capsys.readouterr().out and out.is_file()


def test_evaluate_amp_bf16_runs_under_autocast_and_stays_close(tmp_path, capsys, monkeypatch):
    from hypertriton import HSNet
    from hypertriton.cli import main as cli_main
    from hypertriton.data.synthetic import SyntheticDataset
    from hypertriton.evaluation import evaluate

    model = HSNet.from_checkpoint(lib.BUNDLED_CHECKPOINT)
    dataset = SyntheticDataset(split="test", fold=0, nshot=1, img_size=96, episodes=8)
    dtypes = []
    original = type(model).predict_mask_nshot

    def spy(self, batch, nshot):
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(self, batch, nshot)

    monkeypatch.setattr(type(model), "predict_mask_nshot", spy)
    full = evaluate(model, dataset, 1, "cpu", progress=False, bsz=4)
    reduced = evaluate(model, dataset, 1, "cpu", progress=False, bsz=4, amp=torch.bfloat16)
    assert dtypes == [None, None, torch.bfloat16, torch.bfloat16]
    assert abs(full["miou"] - reduced["miou"]) < 5.0
    assert cli_main(["evaluate", "--benchmark", "synthetic", "--load", str(lib.BUNDLED_CHECKPOINT), "--img-size",
                     "96", "--max-episodes", "2", "--amp", "fp16", "--device", "cpu", "--no-progress"]) == 2
    assert "fp16" in capsys.readouterr().err


def test_ctrl_c_in_a_command_is_one_line_and_exit_code_130(monkeypatch, capsys):
    import hypertriton.commands.predict as command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run", interrupted)
    assert main(["predict", "--query", "q.png", "--support", "s.png", "--support-mask", "m.png", "--out", "o"]) == 130
    assert capsys.readouterr().err == "hypertriton predict: interrupted\n"


def _bundled_copy(path: Path, **metadata) -> Path:
    """The bundled checkpoint with ``metadata`` entries replaced (None: removed)."""
    payload = torch.load(lib.BUNDLED_CHECKPOINT, weights_only=True)
    payload["metadata"].update(metadata)
    payload["metadata"] = {key: value for key, value in payload["metadata"].items() if value is not None}
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("img_size", [1, 20, 31, 4097, 10**6, -8, 0, "12abc", "96", 96.7, True])
def test_load_model_refuses_a_compact_image_size_the_model_cannot_run_at(tmp_path, img_size):
    import re

    path = _bundled_copy(tmp_path / "bad_size.pt", img_size=img_size)
    with pytest.raises(lib.InputError, match=rf"checkpoint {re.escape(repr(str(path)))}: its metadata gives img_size="
                                             rf"{re.escape(repr(img_size))}; expected an integer from 32 to 4096"):
        lib.load_model(path)


def test_load_model_takes_the_smallest_compact_image_size_and_defaults_without_one(tmp_path):
    assert lib.load_model(_bundled_copy(tmp_path / "32.pt", img_size=32))[1] == 32  # the model's own minimum
    assert lib.load_model(_bundled_copy(tmp_path / "48.pt", img_size=48))[1] == 48  # trainable, so bundled
    assert lib.load_model(_bundled_copy(tmp_path / "none.pt", img_size=None))[1] == 400  # nothing recorded


def test_a_malformed_compact_checkpoint_is_one_error_line_and_exit_code_2(files, tmp_path, capsys):
    import re

    payload = torch.load(lib.BUNDLED_CHECKPOINT, weights_only=True)
    payload["version"] = 2
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(lib.InputError, match=rf"checkpoint: {re.escape(repr(str(bad)))} is compact format version 2"):
        lib.load_model(bad)
    assert _predict(files, tmp_path / "out", bad) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hypertriton predict: error: checkpoint: {str(bad)!r} is compact format version 2")
    assert err.count("\n") == 2 and "nothing was written" in err and not (tmp_path / "out").exists()
