"""The one place that knows about ranks: reduce scores, compute on the main rank, broadcast the result.

Works without torch.distributed (a single process) and under any launcher that initialises it
(accelerate, torchrun). Errors raised on the main rank are re-raised on every rank, so a failed solve
never leaves the other ranks waiting in a collective or training with stale masks.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def use_cpu_ranks_without_gpu() -> None:
    """Let a multi-process launch on a machine without GPUs run its ranks on the CPU over gloo.

    ``accelerate launch --multi_gpu`` (and torchrun) start the processes, but without CUDA Accelerate
    falls back to a single-process setup in each of them unless it is told to use the CPU. Call this
    before TrainingArguments / Accelerator are created.
    """
    import os

    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        # Trainer never tears the process group down; a gloo group left to interpreter shutdown sometimes aborts
        # the process ("terminate called without an active exception", exit -6) after the run's work is done
        import atexit

        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise mean of each tensor over all ranks (identity in a single process)."""
    if not is_distributed():
        return {name: t.clone() for name, t in tensors.items()}
    names = sorted(tensors)
    flat = torch.cat([tensors[n].reshape(-1).double() for n in names]).to(_collective_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = (flat / dist.get_world_size()).cpu()
    out, offset = {}, 0
    for name in names:
        size = tensors[name].numel()
        out[name] = flat[offset : offset + size].reshape(tensors[name].shape).to(tensors[name].dtype)
        offset += size
    return out


def run_on_main_and_broadcast(compute: Callable[[], T]) -> T:
    """Run ``compute`` on rank 0 only and give every rank its (picklable) result, or its exception."""
    if not is_distributed():
        return compute()
    payload: list = [None]
    raised = None
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", compute())
        except Exception as error:  # re-raised on every rank below
            raised = error
            payload[0] = ("error", portable_error(error))
    if dist.get_backend() == "nccl":
        dist.broadcast_object_list(payload, src=0, device=_collective_device())
    else:
        dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise raised if raised is not None else rebuilt_error(value)  # rank 0 keeps its own traceback
    return value


def portable_error(error: Exception) -> tuple:
    """``error`` as (type, args, attributes), which every rank can rebuild with :func:`rebuilt_error` whatever the
    class's ``__init__`` takes (plain pickling calls it again with ``args`` alone, which fails for errors that
    carry fields of their own). Attributes that do not pickle: a RuntimeError naming the error instead."""
    packed = (type(error), tuple(error.args), dict(vars(error)))
    try:
        pickle.dumps(packed)
    except Exception:
        packed = (RuntimeError, (f"{type(error).__qualname__}: {error}",), {})
    return packed


def rebuilt_error(packed: tuple) -> Exception:
    """The exception :func:`portable_error` packed, without calling its ``__init__``."""
    cls, args, attributes = packed
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(attributes)
    return error
