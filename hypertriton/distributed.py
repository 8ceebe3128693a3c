"""Process-group setup and small collective helpers for training and evaluation under ``torchrun``.

``torchrun`` (``python -m torch.distributed.run``) starts one process per device and describes the job
through environment variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_distributed` reads them and joins the process group (NCCL for CUDA
devices, gloo for CPU); without them it returns a single-process context, so the same code path serves
``python -m hypertriton train`` and ``torchrun --nproc_per_node 8 -m hypertriton train`` alike.

Every helper here is a no-op (or the identity) when no process group is initialized, so callers never
branch on "am I distributed?".

Example::

    ctx = init_distributed()             # cpu/gloo or cuda:LOCAL_RANK/nccl, or single process
    total = all_reduce_sum(torch.tensor([loss_sum, count], device=ctx.device))
    if ctx.is_main:
        print(total[0] / total[1])
    cleanup_distributed()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "all_reduce_sum",
    "all_reduce_max",
    "any_rank",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "env_ranks",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "resolve_device",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, ``0 .. world_size - 1``.
        world_size: number of processes in the job (1 without torchrun).
        local_rank: rank on this node; picks the CUDA device.
        device: the device this process computes on.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment, ``(0, 1, 0)`` without it.

    Raises:
        ValueError: if the variables are not integers or are inconsistent (rank outside the world).
    """
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world_size is None:
        if rank not in (None, 0):
            raise ValueError(f"RANK={rank} is set but WORLD_SIZE is not; launch with torchrun")
        return 0, 1, 0
    rank = 0 if rank is None else rank
    local_rank = rank if local_rank is None else local_rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world_size}")
    if local_rank < 0:
        raise ValueError(f"expected LOCAL_RANK >= 0, got {local_rank}")
    return rank, world_size, local_rank


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` this machine has (None: CUDA when available, else the CPU).

    Raises:
        ValueError: not a device name, a device type other than cpu and cuda, or cuda without a GPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: {str(device)!r} is not a device; expected cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {str(device)!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} requested but CUDA is not available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device: {str(device)!r} requested but this machine has {count} GPU(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return resolved


def init_distributed(device: str | torch.device | None = None, backend: str | None = None,
                     timeout: timedelta | None = None) -> DistributedContext:
    """Join the torchrun process group if there is one and pick this process's device.

    Args:
        device: ``"cuda"``, ``"cpu"`` or a full device. ``None`` picks CUDA when available. Under
            torchrun a bare ``"cuda"`` becomes ``cuda:LOCAL_RANK``.
        backend: process-group backend; ``None`` picks NCCL for CUDA and gloo for CPU.
        timeout: collective timeout passed to ``init_process_group`` (``None``: torch's default).

    Returns:
        A :class:`DistributedContext`. If a process group is already initialized (for example by the
        caller), it is reused rather than initialized twice.
    """
    rank, world_size, local_rank = env_ranks()
    device = resolve_device(device)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if world_size > 1 and count > 1 and device.index not in (None, local_rank):
            # The same cuda:N on every rank: NCCL refuses two ranks on one GPU, with an error that names
            # neither the flag nor the fix.
            raise ValueError(f"device: {str(device)!r} under torchrun (LOCAL_RANK={local_rank}): each of the "
                             f"{world_size} processes needs a GPU of its own; pass 'cuda' and each takes "
                             "cuda:LOCAL_RANK")
        if device.index is None:
            # One GPU per process: torchrun's LOCAL_RANK is the only reliable way to pick it on a node. One
            # visible GPU per process (CUDA_VISIBLE_DEVICES set per rank) is cuda:0 for each.
            if count > 1 and local_rank >= count:
                raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {count} GPUs: start at most "
                                 f"{count} processes per node (torchrun --nproc_per_node {count})")
            device = torch.device("cuda", local_rank if count > 1 else 0)
        torch.cuda.set_device(device)

    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device,
                                  dist.get_backend())
    if world_size == 1:
        return DistributedContext(0, 1, 0, device, None)

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    if backend == "nccl":
        # Binds the group to this rank's GPU: NCCL then sets up its communicator for that device at once,
        # and barrier() need not guess which GPU this rank uses (a warning, or a hang if it guesses wrong).
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    return DistributedContext(rank, world_size, local_rank, device, backend)


def cleanup_distributed() -> None:
    """Leave the process group (if any); safe to call more than once."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group is initialized (even a group of one)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device(tensor: torch.Tensor) -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors (and CUDA ones through a host copy).
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed():
        return tensor
    work = tensor.to(_collective_device(tensor))
    dist.all_reduce(work, op=op)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it. Identity without a process group.

    Integer-valued float tensors (pixel counts below 2**24 per rank in fp32, 2**53 in fp64) sum exactly,
    so counts reduced here equal a single-process count.
    """
    return _all_reduce(tensor, dist.ReduceOp.SUM if dist.is_available() else None)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place; returns it."""
    return _all_reduce(tensor, dist.ReduceOp.MAX if dist.is_available() else None)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True if ``flag`` is true on at least one rank (a collective: every rank must call it)."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce_max(torch.tensor([int(bool(flag))], device=device)).item())


def broadcast_object(obj, src: int = 0):
    """Return rank ``src``'s ``obj`` on every rank (picklable objects only)."""
    if not is_distributed():
        return obj
    holder = [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(holder, src=src, device=device)
    return holder[0]
