"""``hypertriton predict``: segment your own images given K annotated supports.

Every input is checked before anything runs (files exist and decode, each mask has its image's size,
holds only 0 and 1 or 0 and 255 and marks at least one pixel, no output would replace an input, the
checkpoint fits), so a bad input writes nothing; then each query is segmented and its files written at
once, each through a temporary file, so an interrupted run keeps the queries done and leaves no partial
file.

Outputs, per query ``NAME.ext``: ``OUT/NAME_mask.png`` (0 = background, 255 = object, the query's
size) and ``OUT/NAME_overlay.png`` (the query, dimmed outside the mask, the mask outlined in white).

Examples::

    hypertriton predict --support cat1.jpg --support-mask cat1.png --query photos/ --out masks/
    hypertriton predict --support s1.jpg s2.jpg --support-mask s1.png s2.png --query q.jpg --out out/ \\
        --checkpoint pascal_fold0_r50.pt          # an original HSNet checkpoint, images at 400 px
    hypertriton predict --support supports/ --support-mask support_masks/ --query q.jpg --out out/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--support", nargs="+", required=True, metavar="IMG",
                        help="support images, or one folder of them (K supports)")
    parser.add_argument("--support-mask", nargs="+", required=True, metavar="MASK",
                        help="their binary masks in the same order, or one folder holding a mask named like "
                        "each support image (NAME.png; the same folder as --support: its PNGs are the masks)")
    parser.add_argument("--query", nargs="+", required=True, metavar="IMG",
                        help="query images and/or folders of images")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="HSNet checkpoint (default: the bundled synthetic-benchmark resnet18 checkpoint)")
    parser.add_argument("--backbone", help="backbone of --checkpoint (default: inferred from its keys)")
    parser.add_argument("--img-size", type=int, metavar="N",
                        help="side the images are resized to for the model (default: the training size the "
                        "checkpoint records, or the config.json that train wrote next to it, else 400)")
    parser.add_argument("--no-overlay", dest="overlay", action="store_false", help="write only the masks")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", help="hypertriton op backend (triton, torch, reference; default: automatic)")
    parser.add_argument("--lean", action="store_true", help="stream the squeeze blocks over query rows: about "
                        "half the learner's peak memory with large objects (little for small ones), about 2x its "
                        "time, same masks (HSNet(lean=True))")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _images_in(folder: Path) -> list[Path]:
    from hypertriton.predict import IMAGE_SUFFIXES

    # Dot files are hidden companions (macOS '._NAME.png' resource forks), not images.
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _expand(paths: list[str], role: str) -> tuple[list[Path], bool]:
    """Files as given plus the images of every folder; ``True`` when a folder was among them. A folder's
    ``NAME_mask.png`` / ``NAME_overlay.png`` beside an image ``NAME.*`` are skipped, with a warning: an
    earlier run's outputs, or the user's ground truth, not queries."""
    import warnings

    from hypertriton.predict import InputError, InputWarning

    files, had_folder = [], False
    for text in paths:
        path = Path(text)
        if path.is_dir():
            had_folder = True
            found = _images_in(path)
            stems = {image.stem for image in found}
            companions = [image for image in found if image.suffix.lower() == ".png"
                          and any(image.stem.endswith(suffix) and image.stem[:-len(suffix)] in stems
                                  for suffix in _OUTPUT_SUFFIXES)]
            if companions:
                listed = ", ".join(image.name for image in companions[:3]) + (
                    f" and {len(companions) - 3} more" if len(companions) > 3 else "")
                warnings.warn(f"{role}: skipped {len(companions)} file(s) of folder {text!r} named as another image's "
                              f"mask or overlay ({listed}): predict's outputs or ground truth, not queries; name "
                              "them as files to segment them", InputWarning)
                found = [image for image in found if image not in companions]
            if not found:  # (a companion has its image beside it: never all there is)
                subfolders = any(entry.is_dir() for entry in path.iterdir())
                raise InputError(f"{role}: folder {text!r} holds no image file"
                                 + (" (sub-folders are not searched)" if subfolders else ""))
            files.extend(found)
        elif not path.exists():
            raise InputError(f"{role}: no such file or folder {text!r}")
        else:
            files.append(path)
    return files, had_folder


def _support_pairs(images: list[str], masks: list[str]) -> list[tuple[Path, Path]]:
    from hypertriton.predict import InputError

    if len(images) == 1 and len(masks) == 1 and Path(images[0]).is_dir():
        image_dir, mask_dir = Path(images[0]), Path(masks[0])
        if not mask_dir.is_dir():
            raise InputError(f"--support-mask: {masks[0]!r} must be a folder when --support is a folder")
        return _pairs_by_name(image_dir, mask_dir)
    if len(images) != len(masks):
        raise InputError(f"--support gives {len(images)} images but --support-mask gives {len(masks)} masks; "
                         "give one mask per support image, in the same order")
    return [(Path(i), Path(m)) for i, m in zip(images, masks)]


def _pairs_by_name(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """Each support image of ``image_dir`` with the mask of the same name (``NAME.png`` first) in
    ``mask_dir``. One folder for both (FSS-1000's ``1.jpg`` + ``1.png``): the PNGs are the masks."""
    from hypertriton.predict import InputError

    same_folder = image_dir.resolve() == mask_dir.resolve()
    files = _images_in(image_dir)
    masks_by_stem: dict[str, list[Path]] = {}
    for path in files if same_folder else _images_in(mask_dir):
        if not same_folder or path.suffix.lower() == ".png":
            masks_by_stem.setdefault(path.stem, []).append(path)
    images = [path for path in files if not (same_folder and path.suffix.lower() == ".png")]
    if same_folder and images:
        image_stems = {image.stem for image in images}
        unpaired = sorted(stem for stem in masks_by_stem if stem not in image_stems)
        if unpaired:
            import warnings

            from hypertriton.predict import InputWarning

            warnings.warn(f"--support-mask: {len(unpaired)} PNG file(s) of {str(mask_dir)!r} match no support image "
                          f"and are not used ({', '.join(name + '.png' for name in unpaired[:3])}"
                          f"{' ...' if len(unpaired) > 3 else ''})", InputWarning)
    if not images:
        found = "holds only PNG files, which are taken as the masks" if same_folder and files else "holds no image file"
        raise InputError(f"--support: folder {str(image_dir)!r} {found}")
    pairs = []
    for image in images:
        candidates = masks_by_stem.get(image.stem, [])
        pngs = [path for path in candidates if path.suffix.lower() == ".png"]
        if len(pngs) == 1 or len(candidates) == 1:
            pairs.append((image, pngs[0] if pngs else candidates[0]))
        elif not candidates:
            raise InputError(f"--support-mask: no mask named {image.stem}.png in {str(mask_dir)!r} for support "
                             f"image {str(image)!r}")
        else:
            names = ", ".join(path.name for path in candidates)
            raise InputError(f"--support-mask: several masks for support image {str(image)!r} in "
                             f"{str(mask_dir)!r} ({names}); keep one")
    return pairs


def run(args: argparse.Namespace) -> int:
    import warnings

    from hypertriton.predict import InputError, InputWarning, VanishingMaskWarning

    default_show = warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (InputWarning, VanishingMaskWarning)):  # about the user's files: one line
            print(f"hypertriton predict: warning: {message}", file=sys.stderr)
        else:  # another library's: as Python shows it, with its category and origin
            default_show(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():  # restores showwarning on the way out
            warnings.showwarning = show_warning
            return _run(args)
    except InputError as error:
        print(f"hypertriton predict: error: {error}", file=sys.stderr)
        print("nothing was written", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import warnings

    import numpy as np
    from tqdm.auto import tqdm

    from hypertriton._io import check_writable
    from hypertriton.backend import resolve_backend
    from hypertriton.distributed import resolve_device
    from hypertriton.predict import (MIN_IMG_SIZE, InputError, InputWarning, VanishingMaskWarning, load_model,
                                     overlay, prepare_supports, read_image, read_mask, segment, vanishing_masks,
                                     write_pngs)

    if args.img_size is not None and args.img_size < MIN_IMG_SIZE:
        raise InputError(f"--img-size: expected an integer >= {MIN_IMG_SIZE}, got {args.img_size}")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise InputError(f"--{error}") from None

    # 1. Validate everything before computing anything.
    pairs = _support_pairs(args.support, args.support_mask)
    supports, masks = [], []
    for image_path, mask_path in pairs:
        image = read_image(image_path, role="--support")
        supports.append(image)
        masks.append(read_mask(mask_path, image.shape[:2], role="--support-mask", image_path=image_path))
    queries, had_folder = _expand(args.query, "--query")
    names: dict[str, Path] = {}
    for query in queries:
        read_image(query, role="--query")
        if query.stem in names:
            raise InputError(f"--query: {str(names[query.stem])!r} and {str(query)!r} would both write "
                             f"{query.stem}_mask.png; rename one or run them separately")
        names[query.stem] = query
    try:
        out = check_writable(args.out, "--out", folder=True)
    except ValueError as error:
        raise InputError(str(error)) from None
    for text in args.query:
        if Path(text).is_dir() and Path(text).resolve() == out.resolve():
            raise InputError(f"--out: {args.out!r} is a --query folder: the masks and overlays would be written among "
                             "the queries (and could replace your own NAME_mask.png files); choose another folder")
    targets = {stem: _targets(out, stem, args.overlay) for stem in names}
    _refuse_overwriting_inputs(targets, pairs, queries)
    _refuse_unwritable_names(targets, names, out)
    try:
        backend = resolve_backend(args.backend, device)
    except (ValueError, RuntimeError) as error:
        raise InputError(f"--backend: {error}") from None
    model, img_size = load_model(args.checkpoint, args.backbone, backend=backend, device=device)
    model.lean = args.lean
    if args.checkpoint is None:
        checkpoint_name = "the bundled synthetic-shapes model"
        print("note: no --checkpoint given: using the bundled model, trained only on the synthetic benchmark's "
              f"shapes at {img_size} px, a demonstration; for photos pass --checkpoint with an HSNet checkpoint (the "
              "original's, or the best_model.pt of hypertriton train)", file=sys.stderr)
    else:
        checkpoint_name = f"checkpoint {Path(args.checkpoint).name}"
    img_size = args.img_size or img_size
    for k in vanishing_masks(masks, img_size):
        warnings.warn(f"--support-mask: the {int(masks[k].sum())} object pixels of {str(pairs[k][1])!r} all vanish "
                      f"at the model's {img_size}x{img_size} input, which then sees no object in that support; mark "
                      "a larger region or raise --img-size", VanishingMaskWarning)
    replaced = sum(path.exists() for paths in targets.values() for path in paths)

    # 2. Segment each query and write its files at once (each whole or not at all): memory stays that of
    # one query, and an interruption keeps the queries done.
    written, empty = 0, []
    bar = tqdm(queries, desc="segmenting", unit="image", disable=not args.progress or (len(queries) == 1 and not
                                                                                       had_folder))
    with warnings.catch_warnings():
        # Said in step 1 already, once per file (the vanishing masks with their file names).
        warnings.simplefilter("ignore", VanishingMaskWarning)
        warnings.simplefilter("ignore", InputWarning)
        prepared = prepare_supports(model, supports, masks, img_size)  # their backbone runs once, not per query
        for query_path in bar:
            query = read_image(query_path, role="--query")
            mask = segment(model, query, prepared)
            mask_path, *overlay_path = targets[query_path.stem]
            outputs = {mask_path: mask.astype(np.uint8) * 255}
            if overlay_path:
                outputs[overlay_path[0]] = overlay(query, mask)
            written += len(write_pngs(outputs))
            if not mask.any():
                empty.append(query_path.name)
    again = f" ({replaced} of them replacing files of the same name)" if replaced else ""
    print(f"{_count(len(queries), 'query', 'queries')} segmented with {_count(len(supports), 'support')} "
          f"({checkpoint_name}, backend {backend}, {img_size} px); wrote {written} files to {out}{again}")
    if empty:  # an all-black mask and an overlay that is the photo dimmed: said, not left to be noticed
        named = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        print(f"no object found in {len(empty)} of the {len(queries)} queries: {named}")
    return 0


_OUTPUT_SUFFIXES = ("_mask", "_overlay")  # what a query NAME writes: NAME_mask.png, NAME_overlay.png


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _targets(out: Path, stem: str, with_overlay: bool) -> list[Path]:
    """The files a query named ``stem`` writes: its mask, then (``with_overlay``) its overlay."""
    return [out / f"{stem}{suffix}.png" for suffix in _OUTPUT_SUFFIXES[:2 if with_overlay else 1]]


def _name_limit(folder: Path) -> int:
    """Bytes a file name may have in ``folder`` (255 where the system does not say, or says no limit)."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer
        return 255
    return limit if limit > 0 else 255


def _refuse_unwritable_names(targets: dict[str, list[Path]], names: dict[str, Path], out: Path) -> None:
    """Refuse, before the first query runs, what would fail or be lost after earlier queries were written:
    an output name (or the temporary it is written under) longer than the file system allows, and two
    queries whose outputs differ only in case where ``out`` ignores case (macOS's and Windows' default file
    systems: one would replace the other)."""
    from hypertriton._io import nearest_existing, temporary_path
    from hypertriton.predict import InputError

    folder = nearest_existing(out)
    limit = _name_limit(folder)

    def longest_name(path: Path) -> int:
        return max(len(os.fsencode(path.name)), len(os.fsencode(temporary_path(path).name)))

    for stem, paths in targets.items():
        too_long = [path for path in paths if longest_name(path) > limit]
        if too_long:
            widest = max(too_long, key=longest_name)
            # The longest stem whose outputs and their temporaries all fit (shortened temporaries: not linear).
            room = next((n for n in range(len(os.fsencode(stem)) - 1, 0, -1)
                         if all(longest_name(path.with_name(path.name.replace(stem, "x" * n, 1))) <= limit
                                for path in paths)), 0)
            advice = (f"rename the query (at most {room} bytes before its extension)" if room > 0 else
                      "no query name fits there: choose another --out")
            raise InputError(f"--query: {str(names[stem])!r} would write {widest.name!r}, which with the temporary "
                             f"it is written under needs a name of {longest_name(widest)} bytes; {str(folder)!r} "
                             f"allows {limit}: {advice}")
    by_case: dict[str, str] = {}
    twins = [(by_case.setdefault(stem.casefold(), stem), stem) for stem in names]
    twins = [(other, stem) for other, stem in twins if other != stem]
    if twins and _ignores_case(folder):  # one probe for the folder, not one per pair
        other, stem = twins[0]
        raise InputError(f"--query: {str(names[other])!r} and {str(names[stem])!r} would write "
                         f"{other}_mask.png and {stem}_mask.png, one file on {str(folder)!r}, which ignores the "
                         "case of names; rename one or run them separately")


def _ignores_case(folder: Path) -> bool:
    """Whether ``folder``'s file system takes names that differ only in case as one (asked by a probe file)."""
    import uuid

    probe = folder / f".hypertriton-case-probe-{uuid.uuid4().hex}"
    try:
        probe.touch(exist_ok=False)
    except OSError:  # cannot ask: the writes would fail anyway, and are refused elsewhere
        return False
    try:
        return (folder / probe.name.upper()).exists()
    finally:
        probe.unlink(missing_ok=True)


def _refuse_overwriting_inputs(targets: dict[str, list[Path]], pairs: list[tuple[Path, Path]],
                               queries: list[Path]) -> None:
    """An output that is one of the inputs (a query folder that is also --out, holding NAME.png and a
    NAME_mask.png, or an earlier run's outputs) would be replaced, then read as a query: refused."""
    from hypertriton.predict import InputError

    inputs = {path.resolve(): ("--support", path) for path, _mask in pairs}
    inputs.update((path.resolve(), ("--support-mask", path)) for _image, path in pairs)
    inputs.update((path.resolve(), ("--query", path)) for path in queries)
    for paths in targets.values():
        for path in paths:
            if path.resolve() in inputs:
                role, given = inputs[path.resolve()]
                raise InputError(f"--out: writing {str(path)!r} would replace the input {str(given)!r} ({role}); "
                                 "choose another --out folder")
