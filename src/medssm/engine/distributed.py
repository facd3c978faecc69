"""Data-parallel training on PyTorch's own engine: ``torchrun`` or SLURM ``srun``, one process per device.

Launch (see docs/how-to/distributed.md)::

    torchrun --nproc_per_node 4 -m medssm train --data Dataset001_LungXray --batch-size 8 ...

Both trainers call the same helpers:

* :func:`setup` reads the launcher's variables (torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``,
  or SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``), picks the device from
  ``LOCAL_RANK`` and joins the process group: NCCL on CUDA, Gloo on the CPU.
* :func:`wrap` puts the model in ``DistributedDataParallel`` (gradients averaged over ranks); the
  trainers keep the plain model beside it for validation and saving.
* ``--batch-size`` is the **global** batch: every rank draws the same global batch (same seed)
  and :func:`shard` gives each rank its contiguous slice.
* :func:`global_loss` computes the loss on the whole global batch (the logits are gathered with a
  gradient), so losses that do not split over samples (batch Dice, class-weighted cross-entropy)
  are those of one process; with DDP's averaging the update equals a single process's.
* :func:`is_main` guards logging and writing (rank 0 only); :func:`main_first` lets rank 0 build
  shared files (the preprocessing cache) before the other ranks read them.

With one process every helper is a pass-through, so the trainers have a single code path.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from ..devices import resolve_device

__all__ = ["DistEnv", "environment", "setup", "world", "is_main", "barrier", "main_first", "wrap",
           "local_batch", "shard", "data_sampler", "global_loss", "all_gather", "broadcast", "split_work",
           "gather_work"]


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """This process's place: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def environment(env: dict[str, str] | None = None) -> DistEnv:
    """The launcher's variables: torchrun's, else SLURM's (``srun`` sets them per task), else one process."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return DistEnv(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def setup(device_name: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the process group when launched with several processes; returns ``(env, device)``.

    The process group lives until the process exits (one per training process, as torchrun runs
    it); calling again in the same process reuses it.
    """
    env = environment()
    device = resolve_device(device_name, env.local_rank if env.distributed else None)
    if device.type == "cuda":  # the current device: where new tensors and the saved CUDA generator live
        torch.cuda.set_device(device)
    if not env.distributed or dist.is_initialized():
        return env, device
    if device.type == "mps":
        raise ValueError("distributed training on MPS is not supported by PyTorch; use --device cpu (Gloo)")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError("distributed launch without MASTER_ADDR/MASTER_PORT: torchrun sets them; under srun "
                           "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) and "
                           "MASTER_PORT=29500 (see docs/how-to/distributed.md)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=env.rank,
                            world_size=env.world_size, timeout=datetime.timedelta(hours=1),
                            device_id=device if device.type == "cuda" else None)
    atexit.register(_teardown)
    return env, device


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> DistEnv:
    """The current process group's rank and size (one process when there is none)."""
    if not dist.is_initialized():
        return DistEnv()
    return DistEnv(dist.get_rank(), dist.get_world_size(), environment().local_rank)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes."""
    return world().rank == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), then the others (which find it done)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when distributed (BatchNorm synchronised on CUDA), else ``model``.

    Gloo has no synchronised BatchNorm: on the CPU each rank keeps its own batch statistics
    (medssm's segmentation networks use Group/LayerNorm and are not affected).
    """
    if not world().distributed:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def local_batch(global_batch: int) -> int:
    """This rank's share of the global batch, which must split evenly over the ranks."""
    w = world()
    if global_batch % w.world_size:
        raise ValueError(f"batch size {global_batch} (the global batch) does not split over {w.world_size} "
                         f"processes; pass a --batch-size divisible by {w.world_size}")
    return global_batch // w.world_size


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (dim 0)."""
    w = world()
    if not w.distributed:
        return batch
    n = local_batch(len(batch))
    return batch[w.rank * n: (w.rank + 1) * n]


def data_sampler(dataset, seed: int) -> torch.utils.data.DistributedSampler | None:
    """Each rank's share of a shuffled dataset for a ``DataLoader`` (``set_epoch`` it every epoch);
    None in one process, where the loader shuffles by itself."""
    if not world().distributed:
        return None
    return torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), len(local)
        return all_gather(local)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n: (ctx.rank + 1) * ctx.n]


def all_gather(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` (equal shapes) concatenated along dim 0, in rank order; no gradient."""
    if not world().distributed:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def global_loss(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` on the global batch: this rank's ``logits`` gathered (with gradient) against the
    global ``target``.

    Every rank gets the same loss value L. The gathered gradient is summed over ranks (W · ∂L/∂logits),
    and DDP divides the parameter gradients by W, so the update is exactly that of one process on the
    global batch, whatever the loss (batch Dice, class weights, label smoothing).
    """
    if not world().distributed:
        return loss_fn(logits, target)
    return loss_fn(_GatherWithGrad.apply(logits), target)


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (e.g. a plan only rank 0 measured)."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def split_work(items: Sequence) -> list:
    """This rank's share of ``items`` (every ``world_size``-th, from its rank): all of them in one process."""
    w = world()
    return list(items)[w.rank::w.world_size]


def gather_work(results: list) -> list:
    """Every rank's results of :func:`split_work`, back in the order of the items (every rank gets them)."""
    w = world()
    if not w.distributed:
        return list(results)
    parts: list = [None] * w.world_size
    dist.all_gather_object(parts, list(results))
    total = sum(len(p) for p in parts)
    return [parts[i % w.world_size][i // w.world_size] for i in range(total)]
