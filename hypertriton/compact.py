"""The compact checkpoint format of the bundled weights: per-tensor k-means codebooks.

A resnet18 HSNet holds 14.3M parameters (29 MB even in fp16); storing each large tensor as a codebook
of 16 or 256 fp16 values plus 4- or 8-bit indices keeps the bundled file under 10 MB.
:func:`hypertriton.checkpoint.read_state_dict` (and so ``HSNet.from_checkpoint``) expands such files
transparently.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ._io import atomic_save, load_on_cpu
from ._pickle_guard import UnsafeFileError
from .checkpoint import CheckpointError

__all__ = ["COMPACT_FORMAT", "save_compact", "is_compact", "load_compact"]

COMPACT_FORMAT = "hypertriton-compact-checkpoint"
COMPACT_VERSION = 1
_MIN_QUANTIZED = 4096  # smaller tensors (BN, GroupNorm, biases) are kept in fp16
_KINDS = {"raw": None, "fp16": None, "codebook4": 16, "codebook8": 256}  # kind -> codebook levels
_MAX_ELEMENTS = 2**31  # per tensor: a VGG-16 classifier weight has 103M
# The dtypes save_compact can quantize: the floating ones that convert to float32 and back (torch implements
# no such conversion for float4_e2m1fn_x2, so the writer cannot produce it).
_CODEBOOK_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in
                    (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                     *(getattr(torch, name) for name in dir(torch)
                       if name.startswith("float8_") and isinstance(getattr(torch, name), torch.dtype)))}


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
        state_dict: names to tensors (e.g. ``model.state_dict()``).
        path: the file to write.
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
    payload = {"format": COMPACT_FORMAT, "version": COMPACT_VERSION, "metadata": dict(metadata or {}),
               "tensors": entries}
    return atomic_save(payload, path)


def is_compact(loaded) -> bool:
    """Whether an object read by ``torch.load`` is a compact checkpoint."""
    return isinstance(loaded, Mapping) and loaded.get("format") == COMPACT_FORMAT


def _expand_entry(key: str, entry, where: str) -> torch.Tensor:
    """One tensor of ``tensors``, checked against what :func:`save_compact` writes for it."""
    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint: {where}: tensor {key!r}: {problem}")

    def tensor_field(name: str, dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
        if name not in entry:
            raise refuse(f"no {name!r} field (kind {entry['kind']!r} needs it)")
        value = entry[name]
        if not isinstance(value, torch.Tensor):
            raise refuse(f"{name!r} is a {type(value).__name__}, expected a tensor")
        if dtypes is not None and value.dtype not in dtypes:
            raise refuse(f"{name!r} is {value.dtype}, expected {' or '.join(map(str, dtypes))}")
        # The writer stores whole tensors. A stride-0 view (torch.save keeps expand()'s) would let a
        # 3-KB file declare gigabytes that expanding it then allocates.
        if not (value.is_contiguous() and value.storage_offset() == 0
                and value.untyped_storage().nbytes() == value.numel() * value.element_size()):
            raise refuse(f"{name!r} is a view of a storage of another size (strides {list(value.stride())}, "
                         f"{value.untyped_storage().nbytes()} bytes for {value.numel()} elements); the writer "
                         "stores whole tensors")
        return value

    if not isinstance(entry, Mapping) or entry.get("kind") not in _KINDS:
        got = entry.get("kind") if isinstance(entry, Mapping) else type(entry).__name__
        raise refuse(f"unknown kind {got!r}; expected one of {list(_KINDS)}")
    kind = entry["kind"]
    if kind == "raw":
        data = tensor_field("data")
        if data.is_floating_point():  # the writer turns every floating tensor into fp16 or a codebook
            raise refuse(f"a raw entry holds {data.dtype}; expected a non-floating tensor")
        return data
    if kind == "fp16":
        return tensor_field("data", (torch.float16,)).float()
    levels = _KINDS[kind]
    shape = tensor_field("shape", (torch.int64,))
    if shape.dim() != 1 or bool((shape < 0).any()):
        raise refuse(f"'shape' is {shape.tolist()}, expected a list of sizes >= 0")
    if math.prod(shape.tolist()) > _MAX_ELEMENTS:  # in Python: a product past int64 would wrap in torch
        raise refuse(f"'shape' {shape.tolist()} holds more than {_MAX_ELEMENTS} elements")
    shape = torch.Size(shape.tolist())
    dtype_name = entry.get("dtype")
    if dtype_name not in _CODEBOOK_DTYPES:
        raise refuse(f"dtype {dtype_name!r} is not one the writer stores as a codebook; expected one of "
                     f"{sorted(_CODEBOOK_DTYPES)}")
    codebook = tensor_field("codebook", (torch.float16,))
    if codebook.shape != (levels,):
        raise refuse(f"{kind} needs a codebook of {levels} values, got shape {list(codebook.shape)}")
    index = tensor_field("index", (torch.uint8,))
    expected = (shape.numel() + 1) // 2 if kind == "codebook4" else shape.numel()
    if index.shape != (expected,):
        raise refuse(f"'index' has shape {list(index.shape)}; shape {list(shape)} needs {expected} "
                     f"{'bytes (two 4-bit indices per byte)' if kind == 'codebook4' else 'bytes'}")
    if kind == "codebook4":
        index = torch.stack([index & 0x0F, index >> 4], dim=1).reshape(-1)[: shape.numel()]
    # uint8 indices cannot exceed 255 = the last of codebook8's 256 levels, nor 4-bit ones codebook4's 16
    return codebook.float()[index.long()].reshape(shape).to(_CODEBOOK_DTYPES[dtype_name])


def load_compact(source, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Expand a compact checkpoint to ``(state_dict, metadata)``; every floating tensor comes back as
    float32 (or its saved dtype).

    Args:
        source: a path (``str`` or ``os.PathLike``) of a file written by :func:`save_compact`, or the
            object ``torch.load`` read from one.
        name: how messages call ``source`` when it is an object (e.g. the file it was read from).

    Only what :func:`save_compact` writes is accepted: version 1; entries of kind ``raw`` (a non-floating
    tensor), ``fp16`` (a float16 tensor) or ``codebook4``/``codebook8`` (16/256 float16 levels, uint8
    indices that cover ``shape`` exactly, and a floating ``dtype``); ``metadata`` a mapping.

    Raises:
        CheckpointError: naming the file (or ``name``), the entry and what is wrong with it.
    """
    if isinstance(source, (str, os.PathLike)):
        where = repr(str(source))
        try:
            loaded = load_on_cpu(source)
        except UnsafeFileError as error:
            raise CheckpointError(f"checkpoint: {error}") from None
    else:
        where = name if name is not None else "the given object"
        loaded = source
    if not is_compact(loaded):
        raise CheckpointError(f"checkpoint: {where} is not a compact hypertriton checkpoint")
    version = loaded.get("version")
    if type(version) is not int or version != COMPACT_VERSION:  # not isinstance: True == 1, but is no version
        newer = " (written by a newer hypertriton? upgrade it)" if type(version) is int and version > 1 else ""
        raise CheckpointError(f"checkpoint: {where} is compact format version {version!r}; this hypertriton "
                              f"reads version {COMPACT_VERSION}{newer}")
    tensors, metadata = loaded.get("tensors"), loaded.get("metadata", {})
    if not isinstance(tensors, Mapping) or not all(isinstance(key, str) for key in tensors):
        raise CheckpointError(f"checkpoint: {where}: 'tensors' is a {type(tensors).__name__}, expected a mapping "
                              "of name -> entry")
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"checkpoint: {where}: 'metadata' is a {type(metadata).__name__}, expected a mapping")
    state_dict = {key: _expand_entry(key, entry, where) for key, entry in tensors.items()}
    return state_dict, dict(metadata)
