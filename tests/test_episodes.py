"""Test episodes: the original split files parse to the published sizes, and the episode lists equal
those of a transcription of the original samplers (global numpy stream seeded with 0)."""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from hypertriton.cli import main as cli_main
from hypertriton.data import DatasetError
from hypertriton.data import coco, fss, pascal
from hypertriton.data.episodes import list_episodes

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "hsnet-splits"
needs_splits = pytest.mark.skipif(not SPLITS.is_dir(), reason=f"original split files not found at {SPLITS}")


# -- the original samplers, transcribed (global np.random, names and loops as in the original) -------

def original_supports(pool, query_name, shot):
    support_names = []
    while True:  # keep sampling support set if query == support
        support_name = np.random.choice(pool, 1, replace=False)[0]
        if query_name != support_name:
            support_names.append(support_name)
        if len(support_names) == shot:
            break
    return support_names


def original_pascal(fold, shot, count=1000):
    with open(SPLITS / "pascal" / "val" / f"fold{fold}.txt") as f:
        metadata = [[d.split("__")[0], int(d.split("__")[1]) - 1] for d in f.read().split("\n")[:-1]]
    classwise = {c: [] for c in range(20)}
    for name, c in metadata:
        classwise[c] += [name]
    np.random.seed(0)
    episodes = []
    for idx in range(count):
        query_name, class_sample = metadata[idx % len(metadata)]
        support_names = original_supports(classwise[class_sample], query_name, shot)
        episodes.append((query_name, tuple(str(s) for s in support_names), class_sample))
    return episodes


def original_coco(fold, shot, count):
    with open(SPLITS / "coco" / "val" / f"fold{fold}.pkl", "rb") as f:
        classwise = pickle.load(f)  # trusted test data; the package itself never calls pickle.load
    class_ids = [fold + 4 * v for v in range(20)]
    np.random.seed(0)
    episodes = []
    for _ in range(count):
        class_sample = np.random.choice(class_ids, 1, replace=False)[0]
        query_name = np.random.choice(classwise[class_sample], 1, replace=False)[0]
        support_names = original_supports(classwise[class_sample], query_name, shot)
        episodes.append((str(query_name), tuple(str(s) for s in support_names), int(class_sample)))
    return episodes


def original_fss(base_path, split, shot):
    with open(SPLITS / "fss" / f"{split}.txt") as f:
        categories = sorted(f.read().split("\n")[:-1])
    img_metadata = []
    for cat in categories:
        for img_path in sorted(glob.glob("%s/*" % os.path.join(base_path, cat))):
            if os.path.basename(img_path).split(".")[1] == "jpg":
                img_metadata.append(img_path)
    np.random.seed(0)
    episodes = []
    for query_name in img_metadata:
        class_sample = categories.index(query_name.split("/")[-2]) + {"val": 520, "test": 760}[split]
        support_names = []
        while True:
            support_name = np.random.choice(range(1, 11), 1, replace=False)[0]
            support_name = os.path.join(os.path.dirname(query_name), str(support_name)) + ".jpg"
            if query_name != support_name:
                support_names.append(support_name)
            if len(support_names) == shot:
                break

        def rel(path):
            return "/".join(path.split("/")[-2:])
        episodes.append((rel(query_name), tuple(rel(s) for s in support_names), class_sample))
    return episodes


def as_tuples(episodes):
    return [(e.query, e.supports, e.class_id) for e in episodes]


@pytest.fixture(scope="module")
def fss_listing(tmp_path_factory):
    """Empty files in the FSS-1000 layout for the real val/test classes (listing needs no pixels)."""
    root = tmp_path_factory.mktemp("fss_listing")
    for split in ("val", "test"):
        for name in (SPLITS / "fss" / f"{split}.txt").read_text().splitlines():
            folder = root / "FSS-1000" / name
            folder.mkdir(parents=True)
            for n in range(1, 11):
                (folder / f"{n}.jpg").touch()
                (folder / f"{n}.png").touch()
    return root


# -- split files ----------------------------------------------------------------------------------

@needs_splits
def test_pascal_val_folds_have_published_sizes():
    sizes = [len(pascal.read_metadata(SPLITS, fold, "test")[0]) for fold in range(4)]
    assert sizes == [346, 451, 725, 346]
    for fold in range(4):
        metadata, _ = pascal.read_metadata(SPLITS, fold, "val")
        assert {c for _, c in metadata} == set(range(5 * fold, 5 * fold + 5))
        trn, files = pascal.read_metadata(SPLITS, fold, "trn")
        assert [f.name for f in files] == [f"fold{f}.txt" for f in range(4) if f != fold]
        assert {c for _, c in trn}.isdisjoint(range(5 * fold, 5 * fold + 5))


@needs_splits
def test_fss_splits_have_published_sizes():
    sizes = {split: len(fss.read_categories(SPLITS, split)[0]) for split in ("trn", "val", "test")}
    assert sizes == {"trn": 520, "val": 240, "test": 240}
    # test.txt has CRLF line ends; no name may keep a '\r'
    assert not any("\r" in name for name in fss.read_categories(SPLITS, "test")[0])


@needs_splits
@pytest.mark.parametrize("fold", range(4))
def test_coco_fold_tests_classes_i_plus_4k(fold):
    lists, class_ids, _ = coco.read_metadata(SPLITS, fold, "test")
    assert class_ids == [fold + 4 * k for k in range(20)]
    assert sorted(c for c, names in lists.items() if names) == class_ids
    trn_lists, trn_ids, _ = coco.read_metadata(SPLITS, fold, "trn")
    assert sorted(c for c, names in trn_lists.items() if names) == trn_ids
    assert set(trn_ids) == set(range(80)) - set(class_ids)


# -- episodes against the original samplers ----------------------------------------------------------

@needs_splits
@pytest.mark.parametrize("fold,shot", [(0, 1), (1, 5), (2, 1), (3, 5)])
def test_pascal_episodes_equal_the_original(fold, shot):
    episodes = list_episodes("pascal", SPLITS, fold, shot)
    assert len(episodes) == 1000
    assert as_tuples(episodes) == original_pascal(fold, shot)
    val_list = pascal.read_metadata(SPLITS, fold, "test")[0]
    assert [e.query for e in episodes[:len(val_list) + 3]] == [n for n, _ in val_list] + [n for n, _ in val_list[:3]]


@needs_splits
@pytest.mark.parametrize("fold,shot,count", [(0, 1, 1000), (1, 5, 60), (3, 1, 60)])
def test_coco_episodes_equal_the_original(fold, shot, count):
    episodes = list_episodes("coco", SPLITS, fold, shot, count=count)
    assert as_tuples(episodes) == original_coco(fold, shot, count)
    if count == 1000:
        assert len({e.class_id for e in episodes}) == 20


@needs_splits
@pytest.mark.parametrize("split,shot", [("test", 1), ("test", 5), ("val", 1)])
def test_fss_episodes_equal_the_original(fss_listing, split, shot):
    episodes = list_episodes("fss", SPLITS, 0, shot, datapath=fss_listing, split=split)
    expected = original_fss(str(fss_listing / "FSS-1000"), split, shot)
    assert len(episodes) == 2400
    assert as_tuples(episodes) == expected
    # every image of a class is a query, ordered by path string: 1, 10, 2, ..., 9
    assert [e.query.split("/")[1] for e in episodes[:10]] == [f"{n}.jpg" for n in (1, 10, 2, 3, 4, 5, 6, 7, 8, 9)]


@needs_splits
def test_supports_never_equal_query_and_share_its_class():
    metadata, _ = pascal.read_metadata(SPLITS, 2, "test")
    names_of_class = pascal.classwise(metadata)
    for episode in list_episodes("pascal", SPLITS, 2, 5):
        assert episode.query not in episode.supports
        assert all(name in names_of_class[episode.class_id] for name in episode.supports)


@needs_splits
def test_count_is_a_prefix():
    full = list_episodes("pascal", SPLITS, 1, 2)
    assert list_episodes("pascal", SPLITS, 1, 2, count=7) == full[:7]
    assert list_episodes("pascal", SPLITS, 1, 2, count=5000) == full


# -- command line -------------------------------------------------------------------------------------

def run_cli(argv):
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli_main(argv)
    return code, out.getvalue()


@needs_splits
def test_cli_prints_json_lines():
    code, text = run_cli(["episodes", "--benchmark", "coco", "--fold", "2", "--nshot", "3", "--splits", str(SPLITS),
                          "--count", "4"])
    assert code == 0
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines == [e.to_json() for e in list_episodes("coco", SPLITS, 2, 3, count=4)]
    assert set(lines[0]) == {"query", "supports", "class_id"} and len(lines[0]["supports"]) == 3


@needs_splits
def test_cli_fss_needs_the_listing(tmp_path, capsys):
    code, text = run_cli(["episodes", "--benchmark", "fss", "--splits", str(SPLITS), "--datapath", str(tmp_path)])
    assert code == 2 and text == ""
    assert "has no folder" in capsys.readouterr().err


# -- restricted unpickler -----------------------------------------------------------------------------

class _Touch:
    """Unpickling this would create a file, if the loader let it call pathlib."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_coco_pickle_with_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "coco" / "val" / "fold0.pkl"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(pickle.dumps({0: [_Touch(marker)]}))
    with pytest.raises(DatasetError, match=r"refusing to load .*fold0\.pkl.*pathlib"):
        coco.read_metadata(tmp_path, 0, "test")
    assert not marker.exists()
    bad.write_bytes(pickle.dumps({0: np.array(["a"])}))
    with pytest.raises(DatasetError, match="numpy"):
        coco.load_class_lists(bad)


def test_coco_pickle_of_plain_data_loads_and_shape_is_checked(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({1: ["a.jpg", "b.jpg"], 2: [], "x": [1.5, None]}, protocol=2))
    with pytest.raises(DatasetError, match=r"entry 'x' is not"):
        coco.load_class_lists(path)
    path.write_bytes(pickle.dumps({1: ["a.jpg", "b.jpg"], 2: []}, protocol=2))
    assert coco.load_class_lists(path) == {1: ["a.jpg", "b.jpg"], 2: []}
    path.write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="cannot unpickle split file .*plain.pkl"):
        coco.load_class_lists(path)


@pytest.mark.parametrize("protocol", [2, 4])
def test_coco_pickles_with_tuples_or_sets_are_refused_before_unpickling(tmp_path, protocol):
    """A key that nests a tuple in itself 60 times is a 505-byte file whose hashing takes 2^60 steps (a
    million levels crash the interpreter); frozensets nest alike. The format needs neither."""
    # Written by hand: building that dict here would hash the key. PROTO 2, EMPTY_DICT, the key as
    # (0,), then 60 times (key, key) through the memo, then its value ["a"], SETITEM, STOP.
    bomb = bytearray(b"\x80\x02}q\x00" + b"K\x00\x85q\x010")
    bomb += b"h\x01h\x01\x86q\x010" * 60
    bomb += b"h\x01]q\x02X\x01\x00\x00\x00aas."
    path = tmp_path / "fold0.pkl"
    path.write_bytes(bytes(bomb))
    with pytest.raises(DatasetError, match=r"refusing to load .*fold0\.pkl: it builds tuples or sets"):
        coco.load_class_lists(path)
    for value in ({1: ["a.jpg"], 2: (["b.jpg"],)}, {1: {"a.jpg"}}, {1: [frozenset()]}):
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        with pytest.raises(DatasetError, match=r"refusing to load .*fold0\.pkl"):
            coco.load_class_lists(path)


def test_empty_class_is_an_error_not_an_endless_loop():
    with pytest.raises(DatasetError, match="empty class"):
        pascal.draw_test_episodes([("a", 0), ("b", 1)], nshot=1, source="fold.txt")


def test_cli_lists_synthetic_episodes_by_the_names_its_items_carry():
    from hypertriton.data.synthetic import SyntheticDataset

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli_main(["episodes", "--benchmark", "synthetic", "--nshot", "2", "--count", "3"]) == 0
    rows = [json.loads(line) for line in buffer.getvalue().splitlines()]
    dataset = SyntheticDataset(split="test", nshot=2)
    assert len(rows) == 3
    for index, row in enumerate(rows):
        item = dataset[index]
        assert row == {"query": item["query_name"], "supports": list(item["support_names"]),
                       "class_id": int(item["class_id"])}


def test_cli_real_benchmarks_need_splits(capsys):
    assert cli_main(["episodes", "--benchmark", "pascal", "--count", "1"]) == 2
    assert "--splits" in capsys.readouterr().err


@pytest.mark.parametrize("nshot", [0, -3])
def test_cli_refuses_episodes_without_supports(capsys, nshot):
    """Checked before the split files are read, as for the synthetic benchmark."""
    assert cli_main(["episodes", "--benchmark", "pascal", "--nshot", str(nshot), "--splits", str(SPLITS)]) == 2
    assert f"nshot must be a positive int, got {nshot}" in capsys.readouterr().err
