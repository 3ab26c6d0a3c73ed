"""DDP for the engine: torchrun's command line, and a :class:`Runtime` for one rank.

The engine never starts processes (:mod:`workers.training.launch` builds the
command, without importing torch). ``resources.gpus: N`` (N >= 2) or
``resources.nodes: M`` (M >= 2) means the caller (the worker's task, or
``fitfleet train``) starts the very same entry point under torchrun
(:func:`torchrun_command`), and each rank builds its runtime from the
environment torchrun gives it (:func:`init_from_env`): NCCL and one GPU per
rank on CUDA, gloo on CPU.

How the engine uses it, so that N ranks train like one process:

* ``data.batch_size`` is the *global* batch: each rank takes its own disjoint
  ``batch_size / world_size`` slice of the same global batch, and DDP averages
  the gradients, so one step is the step a single process would take on the
  whole batch; learning rates are therefore used as written (no scaling rule).
* Validation: each rank evaluates a disjoint part of the validation set and the
  sums are all-reduced, so every number equals single-process evaluation.
* Every step the ranks agree on the batch loss (its mean over ranks) and on
  whether to stop, in one all-reduce: a NaN on one rank, or a cancel that only
  rank 0 hears, stops all of them at the same step instead of deadlocking.
* Only rank 0 reports and writes files; weights that only rank 0 loaded (a
  ``keep: best`` or ``better`` reload) are broadcast to the others.
* BatchNorm statistics are per rank unless ``resources.sync_bn`` asks for
  SyncBatchNorm (CUDA only; torch has no CPU implementation).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from workers.training.launch import world_from_env

log = logging.getLogger(__name__)

#: How long a collective may wait for a missing rank before failing (seconds).
#: Shorter than torch's 30 minutes: a rank that died should end the run soon,
#: so the service can resume it elsewhere.
COLLECTIVE_TIMEOUT_S = 300.0


@dataclass
class Collectives:
    """What the engine needs from torch.distributed, for one initialised rank."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    sync_bn: bool

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (returned on the CPU, in its dtype)."""
        work = tensor.to(self._comm_device())
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.cpu()

    def agree_step(self, loss: float, stop: bool) -> tuple[float, bool]:
        """The mean loss over ranks and whether any rank wants to stop: one all-reduce."""
        both = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float64)
        summed = self.all_reduce(both)
        return float(summed[0]) / self.world_size, bool(summed[1] > 0)

    def broadcast_model(self, model: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        for tensor in [*model.parameters(), *model.buffers()]:
            data = tensor.data
            if data.device.type == "cpu" or self._comm_device().type == data.device.type:
                dist.broadcast(data, src=0)
            else:  # pragma: no cover - a CPU tensor on a NCCL group
                staged = data.to(self._comm_device())
                dist.broadcast(staged, src=0)
                data.copy_(staged)

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()

    def prepare(self, model: nn.Module) -> nn.Module:
        """Before the optimizer exists: SyncBatchNorm when asked for and possible."""
        if self.sync_bn and self.device.type == "cuda":
            converted: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
            return converted
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` (re-made whenever the trainable parameters change)."""
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            return DistributedDataParallel(
                model, device_ids=[self.device.index], output_device=self.device.index
            )
        return DistributedDataParallel(model)

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_from_env(*, gpus: int, sync_bn: bool = False) -> Collectives | None:
    """Join the process group torchrun described; ``None`` when not under torchrun.

    NCCL with one GPU per local rank when the spec asks for GPUs and CUDA is
    there; gloo on CPU otherwise.
    """
    rank, local_rank, world_size = world_from_env()
    if world_size <= 1:
        return None
    use_cuda = gpus > 0 and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if use_cuda:
        dist.init_process_group(backend, timeout=timeout, device_id=device)
    else:
        dist.init_process_group(backend, timeout=timeout)
    log.info("rank %d/%d (local %d) on %s via %s", rank, world_size, local_rank, device, backend)
    return Collectives(rank, local_rank, world_size, device, sync_bn)


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says another rank vanished (its node died, its link broke)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(
        sign in text
        for sign in ("connection closed", "connection reset", "broken pipe", "gloo", "nccl")
    )


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
