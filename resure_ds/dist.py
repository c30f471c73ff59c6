"""Every collective the recipe makes, in one small module that imports only torch: the lowest layer
of the package, so the statistics (stats/) import no runtime.

The statistics (stats/welford.py, stats/histogram.py, stats/sources.py), the step's token count and
metrics (step.py), validation (eval/validation.py), checkpoints and the engine's set-up all go
through here. Outside a process group (unit tests, one process) every call is the identity, so the
core stays importable and testable without DeepSpeed.

Collectives on the gloo backend (CPU) run on CPU tensors; on NCCL they need the accelerator's
device, which the caller passes (``device``), or, where it passes none, this rank's current CUDA
device (runtime/engine.init_distributed sets it to LOCAL_RANK before any collective): an NCCL
group has no CPU backend ("No backend type associated with device type cpu"). The group's timeout (``dist.timeout``) bounds how
long a rank waits in any collective for a peer that died (docs/operating.md).
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def print0(*args) -> None:
    """A line on stderr from rank 0 only."""
    if rank() == 0:
        print("[resure_ds]", *args, file=sys.stderr, flush=True)


def destroy() -> None:
    """Leave the process group (a clean exit; after a failure, leave without it: runtime/process.py)."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active() and world() > 1:
        dist.barrier()


def _device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if active() and dist.get_backend() == "nccl":  # CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, device: torch.device | str | None = None, to_cpu: bool = True) -> torch.Tensor:
    """Sum over ranks: a CPU tensor (a sync point), or (to_cpu=False) one on the device the
    collective ran on (no device-to-host copy)."""
    if not active() or world() == 1:
        return t.detach().cpu().clone() if to_cpu else t.detach().clone()
    t = t.detach().to(_device(device)).clone()
    dist.all_reduce(t)
    return t.cpu() if to_cpu else t


def all_reduce_dict(values: dict, op: str = "sum", device: torch.device | str | None = None) -> dict[str, float]:
    """Reduce named scalars (numbers or 0-d tensors) over ranks in one collective, by name: every
    rank passes the same keys, in any order. op: sum or max. One device-to-host copy at the end."""
    keys = sorted(values)
    dev = _device(device) if active() and world() > 1 else torch.device("cpu")
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(dev).reshape(()) for k in keys])
    if active() and world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist()))


def all_gather_cat(t: torch.Tensor, device: torch.device | str | None = None, to_cpu: bool = True) -> torch.Tensor:
    """Every rank's tensor of one shape, concatenated along dim 0 in rank order: a CPU tensor, or
    (to_cpu=False) one on the device the collective ran on (no device-to-host copy, no sync)."""
    if not active() or world() == 1:
        return t.detach().cpu().clone() if to_cpu else t.detach().clone()
    t = t.detach().to(_device(device)).contiguous()
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t)
    out = torch.cat(parts)
    return out.cpu() if to_cpu else out


def new_groups(size: int):
    """Groups of `size` consecutive ranks (every rank must call this, in the same order); returns
    this rank's group, or None where size is 1."""
    if size == 1 or not active():
        return None
    mine = None
    for start in range(0, world(), size):
        g = dist.new_group(list(range(start, start + size)))
        if start <= rank() < start + size:
            mine = g
    return mine


def group_gather_cat(t: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """The tensors of every rank of `group` (one shape), detached and concatenated along `dim` in
    rank order, on t's device (sequence parallelism: the whole row's per-token losses)."""
    if group is None:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)
