"""Run by tests/train/test_distributed.py under torchrun (or alone, as the single-process
reference): a few LoRA steps on a tiny Llama with examples of different lengths, written to
OUT/losses.json and OUT/adapter.safetensors by the main process."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import deltatune
from deltatune.data.batches import make_batch_source
from deltatune.fileio import write_safetensors
from deltatune.methods.lora import LoraConfig
from deltatune.models.fused_loss import install_fused_loss
from deltatune.train.callbacks import MetricsLog
from deltatune.train.config import TrainConfig
from deltatune.train.distributed import from_environment, full_tensors
from deltatune.train.loop import train
from deltatune.train.objectives import CausalLMObjective
from tests.conftest import tiny_llama

GLOBAL_BATCH = 4


def examples(count: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    result = []
    for index in range(count):
        length = 6 + index % 5  # unequal lengths: ranks see unequal label counts
        ids = torch.randint(3, 128, (length,), generator=generator).tolist()
        labels = [-100] * 2 + ids[2:]
        result.append({"input_ids": ids, "labels": labels})
    return result


def main(out: Path, strategy: str, packed: bool) -> None:
    torch.set_num_threads(1)
    distributed = from_environment(strategy)
    world = distributed.world_size if distributed else 1
    rank = distributed.rank if distributed else 0
    model = tiny_llama()
    handle = deltatune.apply(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"],
                                               init="gaussian"))
    with torch.no_grad():  # B = 0 at init would make the first steps trivially equal
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    install_fused_loss(model)
    wrapped = distributed.wrap(model) if distributed else model
    source = make_batch_source(examples(), GLOBAL_BATCH // world, seed=0, pad_token_id=0,
                               packed=packed, rank=rank, world_size=world)
    losses: list[dict] = []
    config = TrainConfig(learning_rate=1e-2, max_steps=4, gradient_accumulation=2, log_every=1)
    train(handle, source, CausalLMObjective(), config, [MetricsLog(losses.append, 1)],
          model=wrapped, distributed=distributed)
    state = full_tensors(handle.state_dict())
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps([line["loss"] for line in losses]))
        write_safetensors(out / "adapter.safetensors", state)
    if distributed:
        distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "packed")
