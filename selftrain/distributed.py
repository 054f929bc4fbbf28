"""Many processes: ``torchrun --nproc_per_node=N -m selftrain run CONFIG`` (or ``accelerate
launch``) starts N copies of the run, one per device.

Every process runs every stage (the trainers need all of them: DDP, set up by accelerate inside
``transformers.Trainer``; FSDP and DeepSpeed are refused for now), but only rank 0 writes the run: manifest, metrics,
pool, annotations, report, final model. The other ranks keep their stage outputs in a scratch
directory of their own (``.ranks/<rank>/``) and read rank 0's files after a barrier. Held-out
scoring is sharded over the ranks and summed; generation a stage asks for with ``sharded``
is split over the ranks and gathered back in order.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from selftrain.errors import SelftrainError

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return world_size() <= 1 or rank() == 0


_LOCAL = False  # inside ``on_main``: rank 0 works alone, so no collective may start
_SHARED_ERROR = False  # an error rank 0 found was raised on every rank: they leave together


def active() -> bool:
    return (world_size() > 1 and not _LOCAL and torch.distributed.is_available()
            and torch.distributed.is_initialized())


@contextmanager
def local():
    """Collectives off: what runs here runs on one rank only."""
    global _LOCAL
    before, _LOCAL = _LOCAL, True
    try:
        yield
    finally:
        _LOCAL = before


def init() -> None:
    """Join the process group torchrun / accelerate described in the environment (gloo on CPU,
    nccl on CUDA); nothing for a single process."""
    if world_size() <= 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # gloo for CPU tensors (the sums and objects below) beside nccl for CUDA ones; a long timeout,
    # since the other ranks wait while rank 0 alone sets the run up (data, tokenizer, baseline)
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                         timeout=timedelta(hours=3))


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks (float64, so token counts stay exact)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def sharded(fn: Callable[[list], list], items: list) -> list:
    """``fn`` over this rank's share of ``items`` (every world_size-th, from its rank), the
    results gathered back into the items' order on every rank."""
    if not active() or len(items) < 2:
        return fn(items)
    n, k = world_size(), rank()
    mine = fn(items[k::n])
    parts = all_gather(mine)
    out: list = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::n] = part
    return out


def main_path(path: Path) -> Path:
    """Rank 0's counterpart of a path in this rank's scratch directory (``.ranks/<rank>/``)."""
    parts = Path(path).parts
    for i in range(len(parts) - 1):
        if parts[i] == ".ranks" and parts[i + 1] == str(rank()):
            return Path(*parts[:i], *parts[i + 2:])
    return Path(path)


def save_once(path: Path, save: Callable[[], object]) -> Path:
    """Every rank calls this; rank 0 runs ``save`` (transformers' ``save_pretrained`` writes on
    rank 0 only), the others wait for it and link their path to rank 0's copy."""
    path = Path(path)
    if not active():
        save()
        return path
    if is_main():
        save()
    barrier()
    target = main_path(path)
    if not is_main() and target != path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target.resolve(), target_is_directory=True)
    return path


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only, then share its result (or its SelftrainError) with every rank
    after a barrier: what rank 0 wrote is there for the others to read."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            with local():
                result = fn()
        except SelftrainError as e:
            error = e
        except BaseException as e:  # the others must not wait at the barrier for a rank that died
            broadcast((None, SelftrainError(f"rank 0 failed: {type(e).__name__}: {e}")))
            raise
    result, error = broadcast((result, error))
    if error is not None:
        global _SHARED_ERROR
        _SHARED_ERROR = True
        raise error  # the same exception (and exit code) on every rank
    return result


def settle() -> None:
    """After an error ``on_main`` shared: wait until every rank has reported it (rank 0 has let
    go of the run's lock and printed the message) before any of them exits."""
    if _SHARED_ERROR:
        barrier()
