"""Datasets on tiny generated trees in the original layouts: items, transforms, masks, boundary,
original image size, training episodes, and a clear error (naming the file) for each kind of bad data."""

from __future__ import annotations

import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from datagen import make_coco, make_fss, make_pascal
from PIL import Image

from hypertriton.data import DatasetError, build_dataset
from hypertriton.data.common import IMAGENET_MEAN, IMAGENET_STD

SIZE = 24  # resized side: small, and not a multiple of the generated sizes


@pytest.fixture(scope="module")
def pascal_data(tmp_path_factory):
    return make_pascal(tmp_path_factory.mktemp("pascal"), images_per_class=3)


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"), folds=(1,), images_per_class=2)


@pytest.fixture(scope="module")
def fss_data(tmp_path_factory):
    return make_fss(tmp_path_factory.mktemp("fss"), {"test": ["zebra", "bus"], "trn": ["cat", "dog"]}, crlf=True)


def copy_tree(data, tmp_path):
    """A private copy to damage."""
    shutil.copytree(data.datapath, tmp_path / "copy")
    return tmp_path / "copy", tmp_path / "copy" / "splits"


def expected_image(path, size=SIZE):
    """Independent statement of the original transform: PIL bilinear resize, /255, ImageNet norm."""
    rgb = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    normalized = (rgb - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(normalized).permute(2, 0, 1)


def test_transform_is_torchvisions_bit_for_bit(pascal_data):
    transforms = pytest.importorskip("torchvision.transforms")
    from hypertriton.data.common import build_transform

    original = transforms.Compose([transforms.Resize(size=(SIZE, SIZE)), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for path in sorted((pascal_data.datapath / "VOC2012" / "JPEGImages").glob("*.jpg"))[:5]:
        image = Image.open(path).convert("RGB")
        assert torch.equal(build_transform(SIZE)(image), original(image))


def test_transform_normalizes_with_imagenets_published_statistics():
    # The test above takes the constants from the package; these are the original's values, by hand.
    from hypertriton.backbones import IMAGENET_MEAN as backbone_mean
    from hypertriton.data.common import build_transform

    image = Image.new("RGB", (7, 5), (255, 0, 128))  # constant: any resize keeps the values
    out = build_transform(4)(image)
    want = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    assert out.shape == (3, 4, 4)
    torch.testing.assert_close(out, want.view(3, 1, 1).expand(3, 4, 4), rtol=0, atol=1e-6)
    assert backbone_mean == IMAGENET_MEAN


def test_every_benchmark_resizes_to_400_px_by_default(pascal_data, coco_data, fss_data):
    # The published protocol's size; the tests above all pass img_size themselves.
    for benchmark, data, fold in (("pascal", pascal_data, 0), ("coco", coco_data, 1), ("fss", fss_data, 0)):
        item = build_dataset(benchmark, data.datapath, data.splits, fold=fold, split="test", nshot=1)[0]
        assert item["query_img"].shape == (3, 400, 400), benchmark
        assert item["support_imgs"].shape[-2:] == item["query_mask"].shape == (400, 400), benchmark


def test_classes_have_the_names_their_files_give(pascal_data, coco_data, fss_data):
    # For pictures and reports ("class 0 (aeroplane)"); COCO's masks carry only ids, so no name is made up.
    pascal = build_dataset("pascal", pascal_data.datapath, pascal_data.splits, fold=1, split="test", nshot=1)
    assert [pascal.class_name(c) for c in pascal.class_ids] == ["bus", "car", "cat", "chair", "cow"]  # VOC 6..10
    assert pascal.class_name(0) == "aeroplane" and pascal.class_name(19) == "tvmonitor"
    assert pascal.class_name(20) is None
    fss = build_dataset("fss", fss_data.datapath, fss_data.splits, 0, "test", nshot=1)
    assert [fss.class_name(c) for c in fss.class_ids] == ["bus", "zebra"] and fss.class_name(0) is None
    coco = build_dataset("coco", coco_data.datapath, coco_data.splits, fold=1, split="test", nshot=1)
    assert coco.class_name(coco.class_ids[0]) is None
    synthetic = build_dataset("synthetic", None, None, 0, "test", nshot=1)
    from hypertriton.data.synthetic import class_name

    assert synthetic.class_name(synthetic.class_ids[0]) == class_name(synthetic.class_ids[0])


def nearest(raw: np.ndarray, size=SIZE) -> np.ndarray:
    """Nearest resize as F.interpolate(mode='nearest') picks sources: floor(dst * in / out). ``size``: a
    side or ``(H, W)``."""
    height, width = (size, size) if isinstance(size, int) else size
    rows = np.floor(np.arange(height) * raw.shape[0] / height).astype(int)
    cols = np.floor(np.arange(width) * raw.shape[1] / width).astype(int)
    return raw[rows][:, cols]


def png(path) -> np.ndarray:
    return np.array(Image.open(path))


# -- items --------------------------------------------------------------------------------------------

def test_pascal_item_matches_files(pascal_data):
    ds = build_dataset("pascal", pascal_data.datapath, pascal_data.splits, 0, "test", nshot=2, img_size=SIZE)
    assert len(ds) == 1000 and ds.class_ids == [0, 1, 2, 3, 4]
    voc = pascal_data.datapath / "VOC2012"
    for index in (0, 7):
        item, episode = ds[index], ds.episodes[index]
        assert item["query_name"] == episode.query and item["support_names"] == list(episode.supports)
        assert int(item["class_id"]) == episode.class_id and item["class_id"].dtype == torch.int64
        raw = png(voc / "SegmentationClassAug" / f"{episode.query}.png")
        torch.testing.assert_close(item["query_img"], expected_image(voc / "JPEGImages" / f"{episode.query}.jpg"),
                                   atol=1e-6, rtol=0)
        resized = nearest(raw)
        assert torch.equal(item["query_mask"], torch.from_numpy(resized == episode.class_id + 1).float())
        assert torch.equal(item["query_ignore_idx"], torch.from_numpy(resized == 255).float())
        assert item["org_query_imsize"] == (raw.shape[1], raw.shape[0])
        assert item["support_imgs"].shape == (2, 3, SIZE, SIZE)
        for k, name in enumerate(episode.supports):
            support_raw = nearest(png(voc / "SegmentationClassAug" / f"{name}.png"))
            assert torch.equal(item["support_masks"][k], torch.from_numpy(support_raw == episode.class_id + 1).float())
            assert torch.equal(item["support_ignore_idxs"][k], torch.from_numpy(support_raw == 255).float())
            torch.testing.assert_close(item["support_imgs"][k], expected_image(voc / "JPEGImages" / f"{name}.jpg"),
                                       atol=1e-6, rtol=0)
    assert item["query_ignore_idx"].sum() > 0  # the generated boundary ring survives the resize


def test_pascal_original_imgsize_keeps_query_mask_size(pascal_data):
    ds = build_dataset("pascal", pascal_data.datapath, pascal_data.splits, 0, "test", nshot=1, img_size=SIZE,
                       use_original_imgsize=True)
    item, episode = ds[3], ds.episodes[3]
    raw = png(pascal_data.datapath / "VOC2012" / "SegmentationClassAug" / f"{episode.query}.png")
    assert torch.equal(item["query_mask"], torch.from_numpy(raw == episode.class_id + 1).float())
    assert torch.equal(item["query_ignore_idx"], torch.from_numpy(raw == 255).float())
    assert item["query_img"].shape == (3, SIZE, SIZE) and item["support_masks"].shape == (1, SIZE, SIZE)


def test_coco_mask_keeps_only_the_episode_class(coco_data):
    ds = build_dataset("coco", coco_data.datapath, coco_data.splits, 1, "test", nshot=1, img_size=SIZE,
                       use_original_imgsize=True)
    assert ds.class_ids == [1 + 4 * k for k in range(20)]
    multi = [i for i, e in enumerate(ds.episodes[:200]) if len(coco_data.images[e.query]) > 1]
    assert multi, "the generator puts a second class in some images"
    for index in multi[:3] + [0]:
        item, episode = ds[index], ds.episodes[index]
        raw = png(coco_data.datapath / "COCO2014" / "annotations" / episode.query.replace(".jpg", ".png"))
        assert torch.equal(item["query_mask"], torch.from_numpy(raw == episode.class_id + 1).float())
        assert item["query_ignore_idx"].sum() == 0


def test_fss_threshold_and_crlf_split(fss_data):
    ds = build_dataset("fss", fss_data.datapath, fss_data.splits, 0, "test", nshot=1, img_size=SIZE,
                       use_original_imgsize=True)
    assert len(ds) == 20 and ds.class_ids == [760, 761]  # sorted: bus, zebra
    item = ds[0]
    assert item["query_name"] == "bus/1.jpg" and int(item["class_id"]) == 760
    raw = png(fss_data.datapath / "FSS-1000" / "bus" / "1.png")
    assert raw[0, 0] == 127 and raw[0, 1] == 128
    assert torch.equal(item["query_mask"], torch.from_numpy(raw >= 128).float())
    assert item["query_mask"][0, 0] == 0 and item["query_mask"][0, 1] == 1


# -- training episodes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pascal", "coco", "fss"])
def test_training_episodes_are_random_within_the_class(name, pascal_data, coco_data, fss_data):
    data = {"pascal": pascal_data, "coco": coco_data, "fss": fss_data}[name]
    fold = 1 if name == "coco" else 0
    ds = build_dataset(name, data.datapath, data.splits, fold, "trn", nshot=2, img_size=SIZE)
    torch.manual_seed(3)
    first = [ds.episode(i) for i in range(len(ds))]
    torch.manual_seed(3)
    assert [ds.episode(i) for i in range(len(ds))] == first
    assert len({e.supports for e in first}) > 1
    for episode in first:
        assert episode.class_id in ds.class_ids and episode.query not in episode.supports
        if name == "fss":
            assert all(s.split("/")[0] == episode.query.split("/")[0] for s in episode.supports)
        else:
            assert all(episode.class_id in data.images[s] for s in episode.supports + (episode.query,))
    if name == "pascal":
        assert set(ds.class_ids) == set(range(5, 20))
        assert [e.query for e in first] == [name for name, _ in ds.metadata]


# -- bad data --------------------------------------------------------------------------------------------

def fss_item(root, splits):
    return build_dataset("fss", root, splits, 0, "test", nshot=1, img_size=SIZE)[0]


def test_missing_image_and_mask_name_the_file(fss_data, tmp_path):
    root, splits = copy_tree(fss_data, tmp_path)
    (root / "FSS-1000" / "bus" / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"no mask file: .*bus/1\.png"):
        fss_item(root, splits)
    pascal_root = make_pascal(tmp_path / "p", images_per_class=2)
    ds = build_dataset("pascal", pascal_root.datapath, pascal_root.splits, 0, "test", nshot=1, img_size=SIZE)
    (pascal_root.datapath / "VOC2012" / "JPEGImages" / f"{ds.episodes[0].query}.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"split entry '{ds.episodes[0].query}' has no image file"):
        ds[0]


def test_unreadable_files_name_the_file(fss_data, tmp_path):
    root, splits = copy_tree(fss_data, tmp_path)
    (root / "FSS-1000" / "bus" / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"cannot read image file .*bus/1\.jpg"):
        fss_item(root, splits)
    shutil.copy(fss_data.datapath / "FSS-1000" / "bus" / "1.jpg", root / "FSS-1000" / "bus" / "1.jpg")
    (root / "FSS-1000" / "bus" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"cannot read mask file .*bus/1\.png"):
        fss_item(root, splits)


def test_mask_of_another_size_is_resized_on_its_own_with_a_warning(fss_data, tmp_path):
    # FSS-1000's test split holds a few masks that are not the size of their images; the original resizes
    # image and mask to the input size each on its own, so it runs over them, and so must we.
    root, splits = copy_tree(fss_data, tmp_path)
    episode = build_dataset("fss", root, splits, 0, "test", nshot=1, img_size=SIZE).episodes[0]
    width, height = Image.open(root / "FSS-1000" / episode.query).size
    masks = {}
    for name, (mask_height, mask_width) in ((episode.query, (height + 3, 2 * width)),
                                             (episode.supports[0], (height // 2, width + 5))):
        raw = np.zeros((mask_height, mask_width), dtype=np.uint8)
        raw[: mask_height // 3, : (2 * mask_width) // 3] = 255
        path = root / "FSS-1000" / name.replace(".jpg", ".png")
        Image.fromarray(raw).save(path)
        masks[name] = raw
    assert episode.query != episode.supports[0]

    for use_original_imgsize in (False, True):
        ds = build_dataset("fss", root, splits, 0, "test", nshot=1, img_size=SIZE,
                           use_original_imgsize=use_original_imgsize)
        with pytest.warns(UserWarning) as caught:
            item = ds[0]
        messages = sorted(str(w.message) for w in caught)
        assert len(messages) == 2
        assert f"{episode.query.replace('.jpg', '.png')} is {2 * width}x{height + 3} (WxH) but its image is " \
               f"{width}x{height}" in "\n".join(messages)
        # Scored at the image's own size, the query's truth is resized to that size.
        query_size = (height, width) if use_original_imgsize else SIZE
        expected_query = nearest(masks[episode.query], query_size) >= 128
        assert torch.equal(item["query_mask"], torch.from_numpy(expected_query).float())
        assert item["query_mask"].sum() > 0
        expected_support = nearest(masks[episode.supports[0]]) >= 128
        assert torch.equal(item["support_masks"][0], torch.from_numpy(expected_support).float())
        assert item["org_query_imsize"] == (width, height)


def test_empty_class_and_missing_class_folder(fss_data, tmp_path):
    root, splits = copy_tree(fss_data, tmp_path)
    for path in (root / "FSS-1000" / "zebra").glob("*.jpg"):
        path.unlink()
    with pytest.raises(DatasetError, match=r"empty class: folder .*zebra"):
        fss_item(root, splits)
    shutil.rmtree(root / "FSS-1000" / "zebra")
    with pytest.raises(DatasetError, match=r"class 'zebra' listed in .*test\.txt has no folder"):
        fss_item(root, splits)


def test_coco_empty_fold_class(coco_data, tmp_path):
    path = tmp_path / "coco" / "val" / "fold1.pkl"
    path.parent.mkdir(parents=True)
    with open(coco_data.splits / "coco" / "val" / "fold1.pkl", "rb") as handle:
        lists = pickle.load(handle)  # written by the test generator
    lists[5] = []
    path.write_bytes(pickle.dumps(lists))
    with pytest.raises(DatasetError, match=r"empty class: split file .*fold1\.pkl lists no images for class 5"):
        build_dataset("coco", coco_data.datapath, tmp_path, 1, "test", nshot=1)


def test_split_entry_without_file_and_bad_split_lines(pascal_data, tmp_path):
    root, splits = copy_tree(pascal_data, tmp_path)
    val = splits / "pascal" / "val" / "fold0.txt"
    val.write_text("2099_999999__01\n" + val.read_text())
    ds = build_dataset("pascal", root, splits, 0, "test", nshot=1, img_size=SIZE)
    with pytest.raises(DatasetError, match=r"split entry '2099_999999' has no image file: .*2099_999999\.jpg"):
        ds[0]
    val.write_text("2007_000000_01\n")
    with pytest.raises(DatasetError, match=r"fold0\.txt, line 1: expected '<image id>__<class id>'"):
        build_dataset("pascal", root, splits, 0, "test", nshot=1)
    val.unlink()
    with pytest.raises(DatasetError, match=r"split file not found: .*val/fold0\.txt"):
        build_dataset("pascal", root, splits, 0, "test", nshot=1)
    with pytest.raises(DatasetError, match=r"no pascal split files under .*; where to get the images, masks and "
                                           r"split files: README.md, 'Data and weights' .*juhongm999/hsnet"):
        build_dataset("pascal", root, tmp_path / "nowhere", 0, "test", nshot=1)


@pytest.mark.parametrize("how", ["absolute", "climbing"])
def test_a_split_entry_naming_a_file_outside_the_data_folder_is_refused(pascal_data, tmp_path, how):
    import os

    root, splits = copy_tree(pascal_data, tmp_path)
    ds = build_dataset("pascal", root, splits, 0, "test", nshot=1, img_size=SIZE)
    inside = ds.episodes[0].query
    outside = tmp_path / "elsewhere" / "private"
    outside.parent.mkdir()
    shutil.copy(ds.image_path(inside), outside.with_suffix(".jpg"))  # a readable image out of the data folder
    shutil.copy(ds.mask_path(inside), outside.with_suffix(".png"))
    name = str(outside) if how == "absolute" else os.path.relpath(outside, ds.image_path(inside).parent)
    val = splits / "pascal" / "val" / "fold0.txt"
    val.write_text(f"{name}__01\n" + val.read_text())
    ds = build_dataset("pascal", root, splits, 0, "test", nshot=1, img_size=SIZE)
    assert ds.episodes[0].query == name
    with pytest.raises(DatasetError, match=rf"split entry '{re.escape(name)}' does not name a file inside the data"):
        ds[0]


def test_every_benchmark_dataset_pickles_and_loads_in_a_spawned_worker(pascal_data, coco_data, fss_data):
    import pickle

    from torch.utils.data import DataLoader

    datasets = {"pascal": build_dataset("pascal", pascal_data.datapath, pascal_data.splits, 0, "test", 1,
                                        img_size=SIZE),
                "coco": build_dataset("coco", coco_data.datapath, coco_data.splits, 1, "test", 1, img_size=SIZE),
                "fss": build_dataset("fss", fss_data.datapath, fss_data.splits, 0, "test", 1, img_size=SIZE),
                "synthetic": build_dataset("synthetic", None, None, 0, "test", 1, img_size=32)}
    for name, dataset in datasets.items():
        copy = pickle.loads(pickle.dumps(dataset))  # what spawn does to a data-loader worker's dataset
        assert torch.equal(copy[0]["query_img"], dataset[0]["query_img"]), name
    # macOS's and Windows' default start method, on one benchmark (a spawned worker imports torch afresh).
    loader = DataLoader(datasets["fss"], batch_size=2, num_workers=1, multiprocessing_context="spawn")
    batch = next(iter(loader))
    assert torch.equal(batch["query_img"][1], datasets["fss"][1]["query_img"])


def test_bad_arguments(pascal_data):
    args = (pascal_data.datapath, pascal_data.splits)
    with pytest.raises(ValueError, match="benchmark must be one of"):
        build_dataset("voc", *args, 0, "test", 1)
    with pytest.raises(ValueError, match=r"fold must be an int in \[0, 3\], got 4"):
        build_dataset("pascal", *args, 4, "test", 1)
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("pascal", *args, 0, "train", 1)
    with pytest.raises(ValueError, match="nshot must be a positive int, got 0"):
        build_dataset("pascal", *args, 0, "test", 0)


@pytest.mark.parametrize("name, folder", [("pascal", "VOC2012"), ("coco", "COCO2014"), ("fss", "FSS-1000")])
def test_a_data_root_without_the_benchmarks_folder_is_named(tmp_path, monkeypatch, name, folder):
    """Not the first episode's image reported missing, which says nothing of the data root."""
    with pytest.raises(DatasetError, match=rf"datapath: '{tmp_path}' holds no {folder}/ folder.*'Data and weights'"):
        build_dataset(name, tmp_path, tmp_path, 0, "test", 1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=rf"datapath: none given, and the current folder holds no {folder}/"):
        build_dataset(name, None, tmp_path, 0, "test", 1)


def test_synthetic_is_built_through_the_same_entry_point():
    pytest.importorskip("hypertriton.data.synthetic")
    ds = build_dataset("synthetic", None, None, 0, "test", nshot=2, img_size=64)
    item = ds[0]
    assert item["support_masks"].shape == (2, 64, 64) and int(item["class_id"]) in ds.class_ids


def test_a_decompression_bomb_is_a_dataset_error_naming_the_file(tmp_path, monkeypatch):
    """PIL refuses images past twice MAX_IMAGE_PIXELS with DecompressionBombError, which is neither an
    OSError nor a ValueError: it escaped evaluate/train as a traceback (a 23-KB PNG of 190M pixels)."""
    from hypertriton.data.common import read_image, read_mask

    path = tmp_path / "bomb.png"
    Image.new("L", (20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels: past twice the limit
    with pytest.raises(DatasetError, match=r"cannot read image file .*bomb\.png"):
        read_image(path)
    with pytest.raises(DatasetError, match=r"cannot read mask file .*bomb\.png"):
        read_mask(path)
