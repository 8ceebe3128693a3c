"""One-shot segmentation out of the box: no download, no dataset, a minute on a laptop CPU.

With no arguments: segments episodes of UNSEEN classes of the synthetic benchmark
(:mod:`hypertriton.data.synthetic`) 1-shot and 5-shot with the checkpoint bundled in the package,
prints the IoU of every episode and the means, names the backend that ran, and writes a PNG figure
(support with its mask, query, 1-shot and 5-shot predictions, truth).

With your own images::

    python examples/one_shot_demo.py --support cat.jpg --support-mask cat.png --query other_cat.jpg \\
        [--checkpoint pascal_fold0_r50.pt --backbone resnet50]

(an original HSNet checkpoint segments natural images; the bundled one only knows coloured shapes).

Options: ``--episodes N`` (default 16), ``--out PATH`` (default ``one_shot_demo.png``), ``--fold``,
``--seed``, ``--backend``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypertriton._io import check_writable
from hypertriton.backend import resolve_backend
from hypertriton.data.synthetic import SyntheticDataset, class_name, denormalize_image
from hypertriton import visualize
from hypertriton.predict import MIN_IMG_SIZE, InputError, load_model, read_image, read_mask, segment, write_pngs

PANEL = 160  # side of one picture in the figure, pixels
FIGURE_ROWS = 6  # episodes drawn in the figure


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16, help="synthetic episodes to run (default: %(default)s)")
    parser.add_argument("--fold", type=int, default=0, help="synthetic fold whose unseen classes are used "
                        "(default: %(default)s; the bundled checkpoint was trained on fold 0's seen classes)")
    parser.add_argument("--seed", type=int, default=0, help="episode seed (default: %(default)s)")
    parser.add_argument("--out", default="one_shot_demo.png", help="figure to write (default: %(default)s)")
    parser.add_argument("--support", help="your support image")
    parser.add_argument("--support-mask", help="its binary mask (0 background, 1 or 255 object)")
    parser.add_argument("--query", help="the image to segment")
    parser.add_argument("--checkpoint", help="HSNet checkpoint (default: the bundled one)")
    parser.add_argument("--backbone", help="backbone of --checkpoint (default: inferred)")
    parser.add_argument("--img-size", type=int, help="model input side (default: the checkpoint's)")
    parser.add_argument("--backend", help="triton, torch or reference (default: automatic)")
    args = parser.parse_args(argv)
    own = [args.support, args.support_mask, args.query]
    if any(own) and not all(own):
        parser.error("--support, --support-mask and --query go together")
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.img_size is not None and args.img_size < MIN_IMG_SIZE:
        parser.error(f"--img-size must be >= {MIN_IMG_SIZE} (the model's smallest supported input), got "
                     f"{args.img_size}")
    try:  # now, not after every episode has run
        check_writable(args.out, "--out")
    except ValueError as error:
        parser.error(str(error))
    if Path(args.out).suffix.lower() != ".png":
        parser.error(f"--out: the figure is a PNG file; give a name ending in .png, got {args.out!r}")
    return args


def _tile(image: np.ndarray, title: str) -> Image.Image:
    """One figure cell: ``image`` (uint8 ``[H, W, 3]``) fitted into PANEL x PANEL px, its aspect ratio kept
    (a 2000x300 photo stays wide, on grey), under its title."""
    scale = PANEL / max(image.shape[:2])
    fitted = visualize.fit_height(image, max(1, round(image.shape[0] * scale)))
    box = Image.new("RGB", (PANEL, PANEL), (235, 235, 235))
    box.paste(fitted.crop((0, 0, min(fitted.width, PANEL), fitted.height)),
              ((PANEL - min(fitted.width, PANEL)) // 2, (PANEL - fitted.height) // 2))
    return visualize.captioned(box, title)


def _grid(images: list[np.ndarray], title: str) -> Image.Image:
    """Up to four images in a 2x2 grid as one cell (the 5-shot episode's other supports)."""
    half = PANEL // 2
    box = Image.new("RGB", (PANEL, PANEL), (235, 235, 235))
    for k, image in enumerate(images[:4]):
        box.paste(Image.fromarray(image).resize((half - 1, half - 1), Image.BOX), ((k % 2) * half, (k // 2) * half))
    return visualize.captioned(box, title)


def _figure(rows: list[list[Image.Image]], title: str) -> np.ndarray:
    return np.asarray(visualize.sheet(rows, title=title, gap=4))


def _uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().clip(0, 255).astype(np.uint8)


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def run_synthetic(args, model, img_size: int) -> list[list[Image.Image]]:
    # Test episodes cycle through the 48 unseen classes grouped by shape; a stride of 7 (coprime with
    # 48) visits a different class, and mostly a different shape, at every step.
    dataset = SyntheticDataset(split="test", fold=args.fold, nshot=5, img_size=img_size,
                               episodes=7 * args.episodes, seed=args.seed)
    indices = range(0, 7 * args.episodes, 7)
    print(f"{args.episodes} episodes of unseen classes (synthetic benchmark, fold {args.fold}, {img_size} px); "
          "the 1-shot episode uses the first of the 5 supports")
    print(f"{'episode':>7}  {'class':<26} {'IoU 1-shot':>10} {'IoU 5-shot':>10}")
    rows, ious = [], {1: [], 5: []}
    for index in indices:
        item = dataset[index]
        truth = item["query_mask"].numpy() > 0
        predictions = {}
        with torch.no_grad():
            # Each image through the backbone once; the 1-shot episode is the first support alone.
            query_feats = model.extract_features(item["query_img"][None])
            support_feats = [model.extract_features(image[None]) for image in item["support_imgs"]]
            support_masks = item["support_masks"][None]
            for shots in (1, 5):
                mask = model.predict_from_features(query_feats, support_feats[:shots], support_masks[:, :shots],
                                                   truth.shape)
                predictions[shots] = mask[0].numpy() > 0
                ious[shots].append(_iou(predictions[shots], truth))
        name = class_name(int(item["class_id"]))
        print(f"{index:>7}  {name:<26} {100 * ious[1][-1]:>10.1f} {100 * ious[5][-1]:>10.1f}")
        if len(rows) < FIGURE_ROWS:
            query = _uint8(denormalize_image(item["query_img"]))
            supports = [visualize.spotlight(_uint8(denormalize_image(image)), mask.numpy() > 0)
                        for image, mask in zip(item["support_imgs"], item["support_masks"])]
            rows.append([
                _tile(supports[0], f"{index}: {name}"),
                _grid(supports[1:], "+ supports 2-5"),
                _tile(query, "query"),
                _tile(visualize.spotlight(query, predictions[1]), f"1-shot IoU {100 * ious[1][-1]:.0f}"),
                _tile(visualize.spotlight(query, predictions[5]), f"5-shot IoU {100 * ious[5][-1]:.0f}"),
                _tile(visualize.spotlight(query, truth), "truth"),
            ])
    print(f"mean IoU over {len(indices)} episodes: 1-shot {100 * np.mean(ious[1]):.1f}, "
          f"5-shot {100 * np.mean(ious[5]):.1f}  (docs/synthetic.md: class mIoU on 1000 episodes)")
    if len(indices) > FIGURE_ROWS:
        print(f"the figure shows the first {FIGURE_ROWS} episodes")
    return rows


def run_own(args, model, img_size: int) -> list[list[Image.Image]]:
    support = read_image(args.support, role="--support")
    mask = read_mask(args.support_mask, support.shape[:2], role="--support-mask", image_path=args.support)
    query = read_image(args.query, role="--query")
    prediction = segment(model, query, [support], [mask], img_size)
    print(f"{args.query}: {100 * prediction.mean():.1f}% of the pixels segmented ({img_size} px model input)")
    return [[_tile(visualize.spotlight(support, mask), "support + mask"), _tile(query, "query"),
             _tile(visualize.spotlight(query, prediction), "prediction")]]


def main(argv=None) -> int:
    args = _parse(argv)
    # 96-px episodes are small tensors: extra threads gain little, and on a busy machine OpenMP's
    # waiting threads made this demo 15x slower (80 s instead of 5 s on 2 shared cores). The previous
    # setting is restored so that calling main() from Python leaves the process as it was.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    start = time.time()
    try:
        backend = resolve_backend(args.backend, torch.device("cpu"))
        model, img_size = load_model(args.checkpoint, args.backbone, backend=backend)
        img_size = args.img_size or img_size
        print(f"model: HSNet {model.backbone_name}, backend {backend!r} on cpu, checkpoint "
              f"{args.checkpoint or 'bundled (trained on the synthetic seen classes)'}")
        rows = run_own(args, model, img_size) if args.support else run_synthetic(args, model, img_size)
    except (InputError, ValueError, RuntimeError) as error:
        print(f"one_shot_demo: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    title = ("your images" if args.support else
             "unseen classes of the synthetic benchmark: supports with their masks, the query, its predictions")
    write_pngs({out: _figure(rows, title)})
    print(f"figure: {out}")
    print(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
