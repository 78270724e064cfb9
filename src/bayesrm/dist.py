"""Several processes on one job (`accelerate launch` / `torchrun`): ranks, data shards and the few collectives that
training, the Laplace fit and ensembles need.

torch.distributed carries them; accelerate's `PartialState` starts it from the launcher's environment (gloo on CPU,
NCCL on GPUs). Without a process group every function is the one-process identity, so library code calls them
unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from bayesrm.shard import shard_range

T = TypeVar("T")
_SOLO = [False]  # inside `solo()`: this process works alone although a process group runs


def world() -> tuple[int, int]:
    """(rank, number of processes) of the running process group, (0, 1) without one or inside `solo()`."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized() and not _SOLO[0]:
        return td.get_rank(), td.get_world_size()
    return 0, 1


@contextmanager
def solo() -> Iterator[None]:
    """Run the block as a one-process job (e.g. one ensemble member per rank): no collectives, rank 0 writes."""
    old = _SOLO[0]
    _SOLO[0] = True
    try:
        yield
    finally:
        _SOLO[0] = old


def in_solo() -> bool:
    """Whether a `solo()` block is active."""
    return _SOLO[0]


def launched_on_cpu() -> bool:
    """Started by a launcher (WORLD_SIZE > 1) on a machine without CUDA: accelerate then needs `cpu=True` to
    set up gloo data parallelism (otherwise every process trains alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def init_from_launcher() -> tuple[int, int]:
    """Join the launcher's process group when started with WORLD_SIZE > 1 (accelerate, torchrun); (rank, size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and world()[1] == 1:
        from accelerate import PartialState

        PartialState(cpu=launched_on_cpu())  # init_process_group from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    return world()


def is_main() -> bool:
    """Whether this is rank 0 (the process that writes shared files)."""
    return world()[0] == 0


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of `items` (sizes differ by at most one; concatenated in rank order = all)."""
    rank, size = world()
    span = shard_range(len(items), rank, size)
    return items[span.start:span.stop]


def _flatten(tree: Any, out: list[torch.Tensor]) -> None:
    if isinstance(tree, torch.Tensor):
        out.append(tree.detach().reshape(-1).to(torch.float64))
    elif isinstance(tree, (int, float)):
        out.append(torch.tensor([float(tree)], dtype=torch.float64))
    elif isinstance(tree, dict):
        for v in tree.values():
            _flatten(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _flatten(v, out)
    else:
        raise TypeError(f"cannot sum a {type(tree).__name__} over processes")


def _unflatten(tree: Any, flat: torch.Tensor, pos: int) -> tuple[Any, int]:
    if isinstance(tree, torch.Tensor):
        n = tree.numel()
        return flat[pos:pos + n].reshape(tree.shape).to(tree.dtype), pos + n
    if isinstance(tree, (int, float)):
        return float(flat[pos]), pos + 1
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out[k], pos = _unflatten(v, flat, pos)
        return out, pos
    items = []
    for v in tree:
        x, pos = _unflatten(v, flat, pos)
        items.append(x)
    return type(tree)(items), pos


def all_reduce_sum(tree: T) -> T:
    """Sum of `tree` (tensors and numbers, nested in dicts/lists/tuples) over all processes, in ONE fp64 all-reduce.

    Every rank gets the same result (same structure, dtypes and CPU tensors); numbers come back as floats.
    """
    import torch.distributed as td

    if world()[1] == 1:
        return tree
    parts: list[torch.Tensor] = []
    _flatten(tree, parts)
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if td.get_backend() == "nccl":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    td.all_reduce(flat)
    out, _ = _unflatten(tree, flat.cpu(), 0)
    return out


def gather(obj: T) -> list[T]:
    """`obj` of every rank, in rank order, on every rank (picklable objects)."""
    import torch.distributed as td

    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * world()[1]
    td.all_gather_object(out, obj)
    return out


def spread(fn: Callable[[str], T], keys: Sequence[str]) -> dict[str, T]:
    """{k: fn(k)} on every rank, each rank computing every P-th key (e.g. one eigendecomposition per block)."""
    rank, size = world()
    mine = {k: fn(k) for k in keys[rank::size]}
    if size == 1:
        return mine
    out: dict[str, T] = {}
    for part in gather(mine):
        out |= part
    return {k: out[k] for k in keys}


def broadcast(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank."""
    import torch.distributed as td

    if world()[1] == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, size: int, port: int, threads: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(size),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(size), "OMP_NUM_THREADS": str(threads)}
    torch.set_num_threads(threads)
    init_from_launcher()
    try:
        fn(*args)
    finally:
        import torch.distributed as td

        td.destroy_process_group()


def run_local(fn: Callable[..., Any], *args: Any, processes: int = 2, threads: int = 1) -> None:
    """Run fn(*args) in `processes` new local processes joined in one process group, as `torchrun --nproc_per_node`
    would (gloo on CPU); `fn` must be importable. Raises when a process fails (the others are then stopped)."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(processes, free_port(), threads, fn, args), nprocs=processes, join=True)


def barrier() -> None:
    """Wait until every rank reaches this point."""
    import torch.distributed as td

    if world()[1] > 1:
        td.barrier()
