"""Training on several processes, started by torchrun (`torchrun --nproc_per_node=N -m deltatune
train ...`, or `deltatune train --nproc N`, which runs that command).

PyTorch's engines do the work: DistributedDataParallel replicates the model and all-reduces the
gradients (the default, for adapter methods and full fine-tuning); FSDP2
(`torch.distributed.fsdp.fully_shard`, per block and then the whole model) shards parameters,
gradients and optimizer state for models that do not fit one device. gloo on CPU, NCCL on GPU.
Each process takes its share of every global micro-batch (deltatune.data.batches); the loop
weights each share by its labelled tokens so the gradient equals a single process's on the whole
global batch. Only the main process (rank 0) writes the run directory; the small all-reduces
here carry loss values, token counts and the stop flag, never gradients.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from deltatune.errors import ConfigError

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over processes (a copy on the tensor's own device)."""
        reduced = tensor.detach().clone().to(self._communication_device())
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(tensor.device)

    def broadcast_text(self, text: str | None) -> str | None:
        """Rank 0's value of `text` on every process (e.g. a time-stamped run directory)."""
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: a DDP wrapper around `model`, or `model` itself after
        FSDP2 sharded it in place."""
        if self.strategy == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        shard_model(model)
        return model

    def gradient_sync(self, model: nn.Module, last_micro_batch: bool) -> Any:
        """Gradient accumulation without communication until the window's last micro-batch."""
        if last_micro_batch:
            return nullcontext()
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return _fsdp_sync_off(model)

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        # A barrier first: on CPU (gloo) a process that leaves early can hang the others' exit.
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def _communication_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def from_environment(strategy: str = "ddp") -> Distributed | None:
    """Joins the process group torchrun described in the environment (WORLD_SIZE, RANK, ...);
    None when this is a single process."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed strategy '{strategy}' unknown; choose one of {STRATEGIES}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Distributed(rank, world_size, local_rank, device, strategy)


def shard_model(model: nn.Module) -> None:
    """FSDP2 on each repeated block (the model's largest ModuleList), then on the whole model,
    so one block's parameters are gathered at a time."""
    from torch.distributed.fsdp import fully_shard

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    blocks = max(lists, key=len, default=[])
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


@contextmanager
def _fsdp_sync_off(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded (DTensor) entries gathered into whole tensors; a collective under FSDP, so every
    process must call it."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


@contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block every FSDP-sharded parameter of `model` is a whole tensor again (for
    reading adapter weights to save them); afterwards the shards are put back. A collective:
    every process enters it."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if isinstance(parameter, DTensor):
                whole = nn.Parameter(parameter.full_tensor().detach(),
                                     requires_grad=parameter.requires_grad)
                module._parameters[name] = whole
                swapped.append((module, name, parameter))
    try:
        yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter
