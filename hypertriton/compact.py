"""The compact checkpoint format of the bundled weights: per-tensor k-means codebooks.

A resnet18 HSNet holds 14.3M parameters (29 MB even in fp16); storing each large tensor as a codebook
of 16 or 256 fp16 values plus 4- or 8-bit indices keeps the bundled file under 10 MB.
:func:`hypertriton.checkpoint.read_state_dict` (and so ``HSNet.from_checkpoint``) expands such files
transparently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ._io import atomic_save, load_on_cpu
from .checkpoint import CheckpointError

__all__ = ["COMPACT_FORMAT", "save_compact", "is_compact", "load_compact"]

COMPACT_FORMAT = "hypertriton-compact-checkpoint"
_MIN_QUANTIZED = 4096  # smaller tensors (BN, GroupNorm, biases) are kept in fp16


def _kmeans_codebook(values: torch.Tensor, levels: int, iterations: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """1D k-means of ``values`` (flat float32): ``(codebook [levels], index [N] int64)``.

    At most ``levels`` distinct values are kept exactly (the codebook is then those values, padded)."""
    distinct = values.unique()
    if len(distinct) <= levels:
        codebook = torch.cat([distinct, distinct[-1:].expand(levels - len(distinct))])
        return codebook, torch.bucketize(values, distinct)
    sorted_values = values.sort().values
    quantiles = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    codebook = sorted_values[(quantiles * (len(values) - 1)).round().long()].clone()
    for _ in range(iterations):
        codebook = codebook.sort().values
        index = torch.bucketize(values, (codebook[1:] + codebook[:-1]) / 2)
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, index, values.double())
        counts = torch.bincount(index, minlength=levels).double()
        codebook = torch.where(counts > 0, sums / counts.clamp(min=1), codebook.double()).float()
    codebook = codebook.sort().values
    return codebook, torch.bucketize(values, (codebook[1:] + codebook[:-1]) / 2)


def save_compact(state_dict: Mapping[str, torch.Tensor], path, bits: Mapping[str, int] | int = 4,
                 metadata: Mapping[str, object] | None = None) -> Path:
    """Write a state_dict in the compact format, atomically.

    Floating tensors of at least 4096 elements are stored as a per-tensor k-means codebook of
    ``2**bits`` fp16 values plus ``bits``-bit indices (4-bit indices packed two per byte); smaller
    floating tensors as fp16; other tensors unchanged. The keys (``module.`` prefix included) are kept.

    Args:
        bits: 4 or 8 for every quantized tensor, or ``{key_prefix: bits}`` (the longest matching prefix
            wins; ``""`` is the default).
        metadata: strings and numbers stored next to the weights (backbone, image size, ...).
    """
    def bits_for(key: str) -> int:
        if isinstance(bits, int):
            return bits
        matches = [prefix for prefix in bits if key.startswith(prefix)]
        if not matches:
            raise ValueError(f"bits: no entry matches {key!r} (add a default under the key '')")
        return bits[max(matches, key=len)]

    entries = {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if not value.is_floating_point():
            entries[key] = {"kind": "raw", "data": value.clone()}
        elif value.numel() < _MIN_QUANTIZED:
            entries[key] = {"kind": "fp16", "data": value.to(torch.float16)}
        else:
            nbits = bits_for(key)
            if nbits not in (4, 8):
                raise ValueError(f"bits: expected 4 or 8 for {key!r}, got {nbits!r}")
            codebook, index = _kmeans_codebook(value.float().reshape(-1), 2 ** nbits)
            index = index.to(torch.uint8)
            if nbits == 4:
                if index.numel() % 2:
                    index = torch.cat([index, index.new_zeros(1)])
                index = index[0::2] | (index[1::2] << 4)
            entries[key] = {"kind": f"codebook{nbits}", "codebook": codebook.to(torch.float16), "index": index,
                            "shape": torch.tensor(value.shape, dtype=torch.int64),
                            "dtype": str(value.dtype).removeprefix("torch.")}
    payload = {"format": COMPACT_FORMAT, "version": 1, "metadata": dict(metadata or {}), "tensors": entries}
    return atomic_save(payload, path)


def is_compact(loaded) -> bool:
    """Whether an object read by ``torch.load`` is a compact checkpoint."""
    return isinstance(loaded, Mapping) and loaded.get("format") == COMPACT_FORMAT


def load_compact(source) -> tuple[dict[str, torch.Tensor], dict]:
    """Expand a compact checkpoint (a path or the loaded object) to ``(state_dict, metadata)``; every
    floating tensor comes back as float32 (or its saved dtype)."""
    loaded = load_on_cpu(source) if isinstance(source, (str, os.PathLike)) \
        else source
    if not is_compact(loaded):
        raise CheckpointError(f"checkpoint: {source!r} is not a compact hypertriton checkpoint")
    state_dict = {}
    for key, entry in loaded["tensors"].items():
        kind = entry["kind"]
        if kind == "raw":
            state_dict[key] = entry["data"]
        elif kind == "fp16":
            state_dict[key] = entry["data"].float()
        else:
            shape = torch.Size(entry["shape"].tolist())
            index = entry["index"]
            if kind == "codebook4":
                index = torch.stack([index & 0x0F, index >> 4], dim=1).reshape(-1)
            index = index[: shape.numel()].long()
            dtype = getattr(torch, entry["dtype"])
            state_dict[key] = entry["codebook"].float()[index].reshape(shape).to(dtype)
    return state_dict, dict(loaded.get("metadata", {}))
