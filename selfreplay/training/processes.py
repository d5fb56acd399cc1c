"""Many processes for one run, on PyTorch's own engine: `torchrun --nproc_per_node N -m selfreplay
finetune ...` starts N copies of the command; each joins the process group torchrun describes
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) and trains through DistributedDataParallel.

Every process reads the same global batch (and replay batch) and takes its own share of the rows,
so N processes train on the rows one process would, and DDP averages their gradients: the weights,
every measurement and every stop rule stay the same on all of them. The first process (rank 0)
writes the run directory and says what there is to say; the others follow it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from selfreplay.config import RunConfig


@dataclass(frozen=True)
class Processes:
    """This process's place among those training one run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def of_environment(cls) -> "Processes":
        """As torchrun (or accelerate launch) set them: RANK, WORLD_SIZE, LOCAL_RANK."""
        env = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
        return cls(env("RANK", 0), env("WORLD_SIZE", 1), env("LOCAL_RANK", 0))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world_size > 1

    def device_of(self, device: torch.device) -> torch.device:
        """This process's device: on CUDA the GPU of its local rank."""
        if self.many and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def share(self, rows):
        """This process's rows of a global batch (a tensor [B, ...] or ReplaySamples): the rank-th of
        world_size equal, consecutive parts; None stays None."""
        if not self.many or rows is None:
            return rows
        size = len(rows) // self.world_size
        part = slice(self.rank * size, (self.rank + 1) * size)
        return rows.rows(part) if hasattr(rows, "rows") else rows[part]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the processes of `values` (every process gets it)."""
        if not self.many:
            return values
        values = values.detach().clone()
        dist.all_reduce(values)
        return values / self.world_size

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object), on every process."""
        if not self.many:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.many:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (left to exit, gloo's threads now and then abort the process)."""
        if self.many and dist.is_initialized():
            dist.destroy_process_group()

    def trunk(self, model):
        """`model.hidden` called through DistributedDataParallel, which averages the gradients of
        every weight over the processes in backward (the head's too, used outside the call)."""
        module = getattr(model, "model", model)  # a Hugging Face model inside CausalLM, or the Transformer
        ids = [self.local_rank] if next(module.parameters()).device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(_Trunk(model, module), device_ids=ids)


class _Trunk(nn.Module):
    """`model.hidden` as a module's forward, for DDP to wrap; `module` holds the weights."""

    def __init__(self, model, module: nn.Module):
        super().__init__()
        self.module_ = module
        self._model = [model]  # not a submodule: its weights are module_'s

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._model[0].hidden(tokens)


def start_processes(config: RunConfig) -> Processes:
    """This process's place, its process group joined under torchrun (gloo on CPU, NCCL on CUDA);
    the settings that cannot be shared out over the processes were refused before (training.validate)."""
    processes = Processes.of_environment()
    if not processes.many:
        return processes
    if not dist.is_initialized():
        dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
    return processes
