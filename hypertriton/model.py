"""HSNet: frozen backbone -> multi-layer hypercorrelation -> HPNLearner -> mask logits.

Numerically the original model when given the same weights, with these additions: any image size
from 64 px up (square or not), k-shot prediction that computes the query's backbone features once,
multi-class segmentation against several classes' supports, and loading the original checkpoints on
any device.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .backend import check_backend_name
from .backbones import BackboneSpec, build_backbone, extract_features, freeze, get_spec
from .learner import HPNLearner
from .ops._autocast import autocast_enabled
from .ops._validation import AUTOCAST_INPUT_DTYPES
from .ops._validation import shape_of as _tensor_shape
from .ops.hypercorrelation import hypercorrelation

__all__ = ["HSNet", "foreground", "vote_nshot"]

MIN_IMAGE_SIZE = 32  # VGG16's pool5 is empty below this; 64 px and up is the supported range


def foreground(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=1)`` of two-class logits ``[B, 2, H, W]``: the ``[B, H, W]`` int64 0/1 mask,
    ties and NaN included (a NaN counts as the largest, the first one wins). A comparison: PyTorch's CPU
    argmax over a dim of 2 costs about 100 ns per pixel (0.6 s for a 1600x1200 photo), this 1-2."""
    background, object_ = logits[:, 0], logits[:, 1]
    return ((object_ > background) | (object_.isnan() & ~background.isnan())).long()


def vote_nshot(vote_sum: torch.Tensor, nshot: int) -> torch.Tensor:
    """The original k-shot voting on the sum of per-shot argmax masks ``[B, H, W]`` (int).

    ``nshot == 1``: ``vote_sum`` unchanged (the argmax mask). Otherwise each image's votes are divided
    by ``max(max vote in the image, 1)`` and thresholded at 0.5 (``>= 0.5`` is foreground); returns a
    float 0/1 mask, as the original.
    """
    if nshot == 1:
        return vote_sum
    batch = vote_sum.shape[0]
    max_vote = vote_sum.reshape(batch, -1).max(dim=1).values.clamp(min=1).view(batch, 1, 1)
    return (vote_sum.float() / max_vote >= 0.5).float()


def _shape(value) -> str:
    """A tensor's shape, or the type name of anything else, for error messages."""
    return _tensor_shape(value) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_images(img, name: str) -> torch.Tensor:
    if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3:
        got = _shape(img)
        raise ValueError(f"{name}: expected an image batch [B, 3, H, W], got {got}")
    if min(img.shape[-2:]) < MIN_IMAGE_SIZE:
        raise ValueError(f"{name}: images must be at least {MIN_IMAGE_SIZE} px on each side (64 px and up is "
                         f"supported), got {_shape(img)}")
    if img.shape[0] == 0:
        raise ValueError(f"{name}: an empty batch {_shape(img)}; expected at least one image")
    return img


def _org_size(org_query_imsize) -> tuple[int, int]:
    """``(H, W)`` from the original batch's ``org_query_imsize`` (PIL order: width, height; each an int or
    a one-element tensor, as the original's collated batch of size 1 holds it)."""
    values = org_query_imsize.reshape(-1).tolist() if isinstance(org_query_imsize, torch.Tensor) else org_query_imsize
    try:
        width, height = (int(v.item()) if isinstance(v, torch.Tensor) else int(v) for v in values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"batch['org_query_imsize']: expected one (width, height) pair (a batch of one image, as "
                         f"the original), got {org_query_imsize!r}") from error
    return height, width


class HSNet(nn.Module):
    """Hypercorrelation Squeeze Network for few-shot segmentation.

    Args:
        backbone: ``"resnet50"``, ``"resnet101"``, ``"vgg16"`` (the original's), or ``"resnet18"``,
            ``"resnet34"`` (small extras); or a module of one's own whose forward maps an image batch to
            the list of its feature maps ``[B, C_l, h_l, w_l]``, shallow to deep, described by ``spec``.
        pretrained: load torchvision's ImageNet V1 backbone weights (from torch hub's cache, else a
            download; offline, a message says how to provide the file).
        backend: backend of the hypercorrelation and center-pivot convolutions (``"triton"``,
            ``"torch"``, ``"reference"``, None for automatic).
        backbone_weights: path of a torchvision weights file for the backbone (implies ``pretrained``).
        allow_download: whether ``pretrained`` may download missing weights.
        fused: compute each level's hypercorrelation inside the first center-pivot layer of its
            squeezing block (:func:`hypertriton.ops.fused_first_layer.fused_hypercorrelation_cp_conv`):
            the 4D correlation tensors are never stored and support positions outside the mask are
            skipped (exact: their correlations are 0). Same result up to float rounding; False runs the
            original's dense order of operations (hypercorrelation, then the learner), as does a subclass
            that replaces :meth:`hypercorrelation` (the fused op computes HSNet's own). Likewise a learner
            subclass's own ``encode`` runs on the dense pyramid; its own ``mix``/``decode`` run on every path.
        spec: with a backbone module, its :class:`~hypertriton.backbones.BackboneSpec` with family
            ``"custom"``: the channels of its features and how many of them form each of the three
            pyramid levels (deepest first; a level's maps share one size). None otherwise.
        lean: with ``fused``, in inference (no gradient), stream each squeezing block's first two
            layers over query rows (:meth:`HPNLearner.squeeze_streamed`): with a full mask about half
            the peak memory of the fused path (11.5x below the original's at 400 px) at about 2x its
            time; with an object mask the fused path's column split is already within 10% of that
            memory, at half lean's time. Same result up to float rounding; an attribute, settable
            later.

    The backbone is frozen: no gradients, eval mode even under ``model.train()`` (BN statistics never
    change). Only ``hpn_learner`` is trained. State_dict keys are ``backbone.*`` and ``hpn_learner.*``,
    as in the original.

    Shape:
        - query_img: ``[B, 3, Hq, Wq]``, support_img: ``[B, 3, Hs, Ws]``, ImageNet-normalized; every side
          at least ``MIN_IMAGE_SIZE`` (32) px, 64 px and up the supported range
        - support_mask: ``[B, Hs, Ws]`` (0/1, any numeric dtype), the support image's size
        - output: logits ``[B, 2, Hq, Wq]`` at the query image's size

    Example:
        >>> model = HSNet("resnet18")
        >>> q, s, m = torch.randn(1, 3, 64, 80), torch.randn(1, 3, 64, 80), torch.ones(1, 64, 80)
        >>> model(q, s, m).shape
        torch.Size([1, 2, 64, 80])
    """

    def __init__(self, backbone: str = "resnet50", pretrained: bool = False, backend: str | None = None,
                 backbone_weights: str | os.PathLike | None = None, allow_download: bool = True,
                 fused: bool = True, lean: bool = False, spec: BackboneSpec | None = None):
        super().__init__()
        if isinstance(backbone, nn.Module):
            if not isinstance(spec, BackboneSpec) or spec.family != "custom":
                raise ValueError(f"spec: a backbone module needs a BackboneSpec(name, 'custom', channels, "
                                 f"layers_per_level, level_strides) describing the feature maps it returns, got "
                                 f"{spec!r}")
            if pretrained or backbone_weights is not None:
                raise ValueError("pretrained/backbone_weights: for the torchvision backbones named by string; load "
                                 "your module's own weights before passing it")
            self.spec = spec
        else:
            if spec is not None:
                raise ValueError(f"spec: only with a backbone module; {backbone!r} has its own")
            self.spec = get_spec(backbone)
        self.backbone_name = self.spec.name
        self.backend = check_backend_name(backend)
        self.fused, self.lean = fused, lean
        self.backbone = (freeze(backbone) if isinstance(backbone, nn.Module)
                         else build_backbone(backbone, pretrained, backbone_weights, allow_download))
        self.hpn_learner = HPNLearner(list(self.spec.layers_per_level), backend=backend)

    # ------------------------------------------------------------------ frozen backbone
    def train(self, mode: bool = True) -> HSNet:
        super().train(mode)
        self.backbone.eval()  # BN statistics of the ImageNet backbone must never move
        return self

    def _check_images(self, img, name: str) -> torch.Tensor:
        """``img`` must be an image batch ``[B, 3, H, W]`` in the backbone's dtype (under ``torch.autocast``,
        also another dtype that autocast casts: float32, float16 or bfloat16)."""
        _check_images(img, name)
        # A weight of the backbone's first convolution, not next(parameters()): a DataParallel replica has
        # no parameters (its weights are plain attributes).
        weight = next((m.weight for m in self.backbone.modules() if isinstance(m, nn.Conv2d)), None)
        if weight is None:  # a backbone of one's own without convolutions
            weight = next(self.backbone.parameters(), None)
        if weight is None:
            return img
        if img.device != weight.device:
            raise ValueError(f"{name} is on {img.device} but the model is on {weight.device}; move one of them "
                             "(.to(device))")
        dtype = weight.dtype
        cast_by_autocast = img.dtype in AUTOCAST_INPUT_DTYPES and autocast_enabled(img.device.type)
        if img.dtype != dtype and not cast_by_autocast:
            raise TypeError(f"{name}: expected {dtype} images (the model's dtype) normalized with ImageNet's mean "
                            f"and std, got dtype {img.dtype}; convert them (uint8 pixels: scale to [0, 1], then "
                            "normalize), move the model with .to(dtype), or run under torch.autocast (which "
                            "casts float32, float16 and bfloat16, not float64)")
        return img

    def extract_features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of ``img`` ``[B, 3, H, W]``: list of ``[B, C_l, h_l, w_l]``, shallow to deep
        (no gradients)."""
        self._check_images(img, "img")
        with torch.no_grad():
            return extract_features(self.backbone, self.spec, img)

    # ------------------------------------------------------------------ forward
    def _levels(self, query_feats, support_feats) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The features split into pyramid levels, deepest first, by the backbone's known layer counts
        (not by spatial size, so tiny maps whose levels coincide in size still give three levels)."""
        expected = self.spec.num_features
        for name, feats in (("query_feats", query_feats), ("support_feats", support_feats)):
            if not isinstance(feats, (list, tuple)) or len(feats) != expected:
                got = f"{len(feats)} tensors" if isinstance(feats, (list, tuple)) else type(feats).__name__
                raise ValueError(f"{name}: {self.backbone_name} gives {expected} feature maps "
                                 f"(channels {list(self.spec.channels)}), got {got}")
        levels, end = [], expected
        for layers in self.spec.layers_per_level:
            start = end - layers
            query, support = list(query_feats[start:end]), list(support_feats[start:end])
            for name, level in (("query_feats", query), ("support_feats", support)):
                if len({tuple(t.shape[-2:]) for t in level}) != 1:
                    raise ValueError(f"{name}: layers {start}..{end - 1} form one pyramid level and must share "
                                     f"a spatial size, got {[_shape(t) for t in level]}")
            levels.append((query, support))
            end = start
        return levels

    def hypercorrelation(self, query_feats, support_feats, support_mask) -> list[torch.Tensor]:
        """The learner's input ``[corr_l4, corr_l3, corr_l2]``, each ``[B, L_p, Hq, Wq, Hs, Ws]``."""
        return [hypercorrelation(query, support, support_mask, backend=self.backend)[0]
                for query, support in self._levels(query_feats, support_feats)]

    def forward_features(self, query_feats, support_feats, support_mask) -> torch.Tensor:
        """Everything after the backbone: hypercorrelation, then the learner.

        Args:
            query_feats: list of ``[B, C_l, Hq_l, Wq_l]``, shallow to deep (as :meth:`extract_features`).
            support_feats: list of ``[B, C_l, Hs_l, Ws_l]``.
            support_mask: ``[B, H, W]``.

        Returns:
            Logits ``[B, 2, 2 * Hq_2, 2 * Wq_2]`` (twice the layer2 level's query map), before the final
            resize to the image size.
        """
        learner = self.hpn_learner
        # A subclass's own hypercorrelation (the fused op computes HSNet's) runs, through the materializing
        # path: with fused=True it was skipped, silently.
        if not self.fused or type(self).hypercorrelation is not HSNet.hypercorrelation:
            return learner(self.hypercorrelation(query_feats, support_feats, support_mask))
        return learner.forward_fused(self._levels(query_feats, support_feats), support_mask, lean=self.lean)

    def _logits(self, query_feats, support_img, support_mask, size) -> torch.Tensor:
        logits = self.forward_features(query_feats, self._support_features(support_img, support_mask), support_mask)
        return F.interpolate(logits, size, mode="bilinear", align_corners=True)

    def _support_features(self, support_img, support_mask) -> list[torch.Tensor]:
        """The backbone features of ``support_img`` ``[B, 3, H, W]``, its ``support_mask`` ``[B, H, W]``
        checked against it first."""
        self._check_images(support_img, "support_img")
        if not isinstance(support_mask, torch.Tensor) or support_mask.dim() != 3:
            from .ops._validation import channel_hint

            hint = channel_hint(support_mask) if isinstance(support_mask, torch.Tensor) else ""
            raise ValueError(f"support_mask: expected [B, H, W], got {_shape(support_mask)}{hint}")
        if support_mask.shape[0] != support_img.shape[0]:
            raise ValueError(f"support_mask has batch {support_mask.shape[0]} (shape {_shape(support_mask)}) but "
                             f"support_img has batch {support_img.shape[0]}; expected one mask per support image")
        if support_mask.shape[-2:] != support_img.shape[-2:]:
            # Resizing would hide a mask paired with the wrong image; the caller knows how to resize it.
            raise ValueError(f"support_mask: expected [B, H, W] = {_shape(support_img[:, 0])} (the support images' "
                             f"size), got {_shape(support_mask)}")
        return self.extract_features(support_img)

    def forward(self, query_img: torch.Tensor, support_img: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
        """One-shot logits ``[B, 2, H, W]`` at the query image's size (bilinear, ``align_corners=True``).

        The original resized to the support image's size; the two are equal in its pipeline.
        """
        self._check_images(query_img, "query_img")
        self._check_images(support_img, "support_img")
        if support_img.shape[0] != query_img.shape[0]:
            raise ValueError(f"support_img: batch {support_img.shape[0]} differs from query_img's "
                             f"{query_img.shape[0]}")
        return self._logits(self.extract_features(query_img), support_img, support_mask, query_img.shape[-2:])

    # ------------------------------------------------------------------ k-shot and multi-class
    def _shots(self, support_imgs, support_masks, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Supports as ``[B, K, 3, H, W]`` and ``[B, K, H, W]`` (a single shot may omit K)."""
        one_shot_per_query = isinstance(support_imgs, torch.Tensor) and support_imgs.dim() == 4
        if one_shot_per_query:
            support_imgs = support_imgs.unsqueeze(1)
        if isinstance(support_masks, torch.Tensor) and support_masks.dim() == 3:
            support_masks = support_masks.unsqueeze(1)
        if not isinstance(support_imgs, torch.Tensor) or support_imgs.dim() != 5 or support_imgs.shape[2] != 3:
            raise ValueError(f"support_imgs: expected [B, K, 3, H, W], got {_shape(support_imgs)}")
        if not isinstance(support_masks, torch.Tensor) or support_masks.dim() != 4:
            raise ValueError(f"support_masks: expected [B, K, H, W], got {_shape(support_masks)}")
        if one_shot_per_query and support_imgs.shape[0] != batch:
            raise ValueError(f"support_imgs: a 4-D tensor is read as one shot per query image [B, 3, H, W] with "
                             f"B = {batch} (the query batch), got {_shape(support_imgs.squeeze(1))}; for K shots "
                             f"pass [B, K, 3, H, W]")
        if support_imgs.shape[:2] != support_masks.shape[:2] or support_imgs.shape[0] != batch:
            raise ValueError(f"support_imgs {_shape(support_imgs)} and support_masks {_shape(support_masks)} "
                             f"must share [B, K] with B = {batch} (the query batch)")
        if support_imgs.shape[1] == 0:  # (it divided by zero in segment, and asked for nshot in [1, 0])
            raise ValueError(f"support_imgs: expected at least one shot (K >= 1), got {_shape(support_imgs)}")
        return support_imgs, support_masks

    def predict_mask_nshot(self, batch: Mapping, nshot: int) -> torch.Tensor:
        """The original's k-shot prediction on its batch dict.

        Args:
            batch: ``query_img`` ``[B, 3, H, W]``, ``support_imgs`` ``[B, K, 3, H, W]``, ``support_masks``
                ``[B, K, H, W]``, optional ``query_mask`` (the logits are resized to its size, the
                evaluated resolution) or else ``org_query_imsize`` (PIL ``(width, height)``, as the
                original's ``use_original_imgsize``).
            nshot: shots to use (the first ``nshot`` of K).

        Returns:
            ``nshot == 1``: the argmax mask ``[B, H, W]`` (int64); else the voted 0/1 mask (float), see
            :func:`vote_nshot`. The query's backbone features are computed once for all shots.
        """
        query_img = self._check_images(batch["query_img"], "batch['query_img']")
        support_imgs, support_masks = self._shots(batch["support_imgs"], batch["support_masks"], query_img.shape[0])
        if not isinstance(nshot, int) or not 1 <= nshot <= support_imgs.shape[1]:
            raise ValueError(f"nshot: expected an int in [1, {support_imgs.shape[1]}] (shots in the batch), "
                             f"got {nshot!r}")
        # The truth mask's size is the evaluated resolution (the original size under
        # use_original_imgsize, else the resized one) and works for any batch size.
        org = batch.get("org_query_imsize")
        if isinstance(batch.get("query_mask"), torch.Tensor):
            size = tuple(batch["query_mask"].shape[-2:])
        elif org is not None:
            size = _org_size(org)
        else:
            size = tuple(query_img.shape[-2:])
        query_feats = self.extract_features(query_img)
        support_feats = [self._support_features(support_imgs[:, shot], support_masks[:, shot]) for shot in range(nshot)]
        return self.predict_from_features(query_feats, support_feats, support_masks[:, :nshot], size)

    def predict_from_features(self, query_feats: list[torch.Tensor], support_feats: list[list[torch.Tensor]],
                              support_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """:meth:`predict_mask_nshot` from backbone features computed beforehand (:meth:`extract_features`):
        many queries against the same supports then run the supports' backbone once.

        Args:
            query_feats: the query batch's features (``[B, C_l, H_l, W_l]`` per layer).
            support_feats: per shot, its features (batch B, or 1 for supports shared by every query).
            support_masks: ``[B or 1, K, H, W]`` at the support images' size.
            size: ``(H, W)`` of the returned mask (the logits are resized to it before the vote).

        Returns:
            As :meth:`predict_mask_nshot`.
        """
        nshot = len(support_feats)
        if nshot < 1:
            raise ValueError("support_feats: expected the features of at least one shot, got none")
        if not isinstance(support_masks, torch.Tensor) or support_masks.dim() != 4 or support_masks.shape[1] != nshot:
            raise ValueError(f"support_masks: expected [B, K, H, W] with K = {nshot} (one per shot of support_feats), "
                             f"got {_shape(support_masks)}")
        batch = query_feats[0].shape[0]
        vote_sum = 0
        for shot, feats in enumerate(support_feats):
            if feats[0].shape[0] != batch:  # supports shared by a batch of queries
                feats = [f.expand(batch, *f.shape[1:]) for f in feats]
            mask = support_masks[:, shot].expand(batch, *support_masks.shape[2:])
            logits = F.interpolate(self.forward_features(query_feats, feats, mask), size, mode="bilinear",
                                   align_corners=True)
            vote_sum = vote_sum + foreground(logits)
        return vote_nshot(vote_sum, nshot)

    def predict(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        """Foreground mask of the query from K supports (original voting), as int64 0/1.

        Args:
            query_img: ``[B, 3, H, W]``.
            support_imgs: ``[B, K, 3, Hs, Ws]`` (or ``[B, 3, Hs, Ws]`` for one shot).
            support_masks: ``[B, K, Hs, Ws]`` (or ``[B, Hs, Ws]``).

        Returns:
            ``[B, H, W]`` int64 mask at the query's size.
        """
        queries = self._check_images(query_img, "query_img").shape[0]
        support_imgs, support_masks = self._shots(support_imgs, support_masks, queries)
        batch = {"query_img": query_img, "support_imgs": support_imgs, "support_masks": support_masks}
        return self.predict_mask_nshot(batch, support_imgs.shape[1]).long()

    def segment(self, query_img: torch.Tensor, supports: Mapping, threshold: float = 0.5,
                background: int = 0) -> torch.Tensor:
        """Label map of the query against supports of several classes (query features computed once).

        Rule: for each class, the foreground probability is the softmax of the logits averaged over
        that class's shots; each pixel takes the class of highest probability if that probability is
        ``>= threshold``, else ``background`` (ties go to the class listed first).

        Args:
            query_img: ``[B, 3, H, W]`` or one image ``[3, H, W]``.
            supports: ``{class_id: (imgs, masks)}`` with int class ids other than ``background``; imgs
                ``[K, 3, Hs, Ws]`` (shared by the whole batch) or ``[B, K, 3, Hs, Ws]``, masks
                ``[K, Hs, Ws]`` or ``[B, K, Hs, Ws]``.
            threshold: minimum foreground probability for a pixel to get a class.
            background: label of pixels no class claims.

        Returns:
            int64 label map ``[B, H, W]`` (``[H, W]`` for a single query image).
        """
        single = isinstance(query_img, torch.Tensor) and query_img.dim() == 3
        query_img = self._check_images(query_img.unsqueeze(0) if single else query_img, "query_img")
        if not isinstance(supports, Mapping) or not supports:
            raise ValueError(f"supports: expected a non-empty dict {{class_id: (imgs, masks)}}, got {supports!r}")
        for label in supports:
            # Any integer type (numpy's too, as class ids read from arrays come), never a bool.
            if not isinstance(label, numbers.Integral) or isinstance(label, bool):
                raise ValueError(f"supports: class ids must be integers, got {label!r} ({type(label).__name__})")
            if label == background:
                raise ValueError(f"supports: class id {label!r} is the background label; use another id or "
                                 "pass background=")
        batch, size = query_img.shape[0], tuple(query_img.shape[-2:])
        query_feats = self.extract_features(query_img)
        probabilities = []
        for label, pair in supports.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"supports[{label}]: expected (imgs, masks), got {type(pair).__name__}")
            imgs, masks = pair
            if isinstance(imgs, torch.Tensor) and imgs.dim() == 4:  # shared by every query of the batch
                imgs = imgs.unsqueeze(0).expand(batch, *imgs.shape)
            if isinstance(masks, torch.Tensor) and masks.dim() == 3:
                masks = masks.unsqueeze(0).expand(batch, *masks.shape)
            try:  # the shared checks speak of support_imgs / support_mask: say which class they are about
                imgs, masks = self._shots(imgs, masks, batch)
                foreground = sum(self._logits(query_feats, imgs[:, k], masks[:, k], size).float().softmax(dim=1)[:, 1]
                                 for k in range(imgs.shape[1]))
            except (ValueError, TypeError) as error:
                kind = ValueError if isinstance(error, ValueError) else TypeError
                raise kind(f"supports[{label}]: {error}") from None
            unmarked = [b for b in range(batch) if not bool((masks[b] > 0).any())]
            if unmarked:
                warnings.warn(f"supports[{label}]: the support masks mark no pixel (for query {unmarked}); that "
                              "class's scores then come from the learner's biases alone and can still claim "
                              "pixels", stacklevel=2)
            probabilities.append(foreground / imgs.shape[1])
        best, index = torch.stack(probabilities, dim=1).max(dim=1)
        labels = torch.tensor(list(supports), dtype=torch.long, device=index.device)[index]
        labels = torch.where(best >= threshold, labels, torch.full_like(labels, background))
        return labels[0] if single else labels

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_checkpoint(cls, source, backbone: str | None = None, backend: str | None = None,
                        strict: bool = True, **kwargs) -> HSNet:
        """An HSNet holding the weights of an original (or :meth:`save_checkpoint`) checkpoint.

        Args:
            source: path of the file, or a state_dict; keys may carry DataParallel's ``module.``
                prefix; tensors saved on a GPU load on the CPU.
            backbone: the backbone name; inferred from the keys when None. A backbone module of one's own
                (with ``spec=`` among ``kwargs``, as for :class:`HSNet`) receives the file's backbone
                weights; what it holds outside its state_dict (non-persistent buffers) is kept.
            backend: as for :class:`HSNet`.
            strict: when False, weights missing from the checkpoint keep their initial values
                (e.g. a learner-only file with ``pretrained=True``).
            kwargs: more :class:`HSNet` arguments (``pretrained``, ``backbone_weights``, ...).

        Returns:
            The model in eval mode, on the CPU. With ``strict`` nothing is drawn from the global random
            generator; without, the weights the file lacks are drawn from it, as any new module's.

        Raises:
            FileNotFoundError, CheckpointError (a ``ValueError``): a missing file, a file that is not a
            checkpoint, or keys that do not fit, listed (missing, unexpected, mis-shaped).
        """
        state_dict = ckpt.strip_prefix(ckpt.read_state_dict(source))
        name = backbone if backbone is not None else ckpt.infer_backbone(state_dict)
        if strict:
            # Every weight comes from the file: built on the meta device, nothing is drawn from the global
            # generator (which would shift a seeded run's later draws; saving and restoring it instead
            # would rewind what other threads drew meanwhile).
            with torch.device("meta"):
                model = cls(name, backend=backend, **kwargs)
            if isinstance(name, nn.Module):  # real already: emptied, its non-persistent buffers would be garbage
                model.hpn_learner.to_empty(device="cpu")
            else:
                model = model.to_empty(device="cpu")
            for buffer_name, buffer in model.named_buffers():
                if buffer_name.endswith("num_batches_tracked"):  # a file may lack them: 0, as a new model's
                    buffer.zero_()
        else:
            model = cls(name, backend=backend, **kwargs)  # what the file lacks keeps its random initialization
        described = repr(str(source)) if isinstance(source, (str, os.PathLike)) else "the given state_dict"
        try:
            ckpt.load_into(model, state_dict, strict=strict, source=described)
        except ckpt.CheckpointError as error:
            try:
                guess = ckpt.infer_backbone(state_dict)
            except ckpt.CheckpointError:
                raise error from None
            if guess != name:
                raise ckpt.CheckpointError(f"{error}\n  (its keys look like backbone={guess!r})") from None
            raise
        return model.eval()

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write the state_dict in the original's format (``module.`` prefix), atomically."""
        return ckpt.save_checkpoint(self, path)

    def extra_repr(self) -> str:
        return (f"backbone={self.backbone_name!r}, backend={self.backend!r}, fused={self.fused}"
                + (", lean=True" if self.lean else ""))
