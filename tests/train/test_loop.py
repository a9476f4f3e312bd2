"""The training loop on a tiny model with a plain objective: it is method-agnostic, so these tests
use a minimal handle that trains the whole model and an inline objective."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from deltatune.errors import TrainingError
from deltatune.methods.base import MethodConfig, MethodHandle
from deltatune.train.config import TrainConfig
from deltatune.train.loop import train
from deltatune.train.run_dir import RunDirectory
from deltatune.train.schedule import lr_multiplier
from tests.conftest import tiny_bert


@dataclass
class _Everything(MethodConfig):
    method_name = "everything"


class _EverythingHandle(MethodHandle):
    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


@dataclass
class _Output:
    loss: torch.Tensor
    label_tokens: int
    input_tokens: int


def _objective(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _Output(torch.nn.functional.cross_entropy(logits, batch["labels"]),
                   len(batch["labels"]), batch["input_ids"].numel())


def _task(seed: int = 0):
    """Label = whether token 7 occurs in the row: learnable by a tiny BERT in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, 100, (32, 6), generator=generator)
    labels = torch.arange(32) % 2
    input_ids[labels == 1, 2] = 7
    batches = [{"input_ids": input_ids[i:i + 8], "attention_mask": torch.ones(8, 6, dtype=torch.long),
                "labels": labels[i:i + 8]} for i in range(0, 32, 8)]
    return batches


def _handle(seed=0):
    model = tiny_bert(seed=seed)
    for module in model.modules():  # dropout would make runs with equal maths differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return _EverythingHandle(model, _Everything())


def test_loss_decreases_and_run_directory_is_written(tmp_path):
    batches = _task()
    handle = _handle()
    run = RunDirectory(tmp_path / "run")
    before = sum(_objective(handle.model, b).loss.item() for b in batches)
    result = train(handle, lambda epoch: batches, len(batches), _objective,
                   TrainConfig(learning_rate=3e-3, epochs=8, log_every=2, grad_clip=1.0),
                   run, show_progress=False)
    after = sum(_objective(handle.model, b).loss.item() for b in batches)
    assert result.steps == 32
    assert after < 0.5 * before
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(2, 33, 2))
    assert all(line["tokens_per_second"] > 0 for line in lines)


def test_same_seed_same_result():
    def run_once():
        handle = _handle()
        batches = _task()
        train(handle, lambda epoch: batches, len(batches), _objective,
              TrainConfig(learning_rate=1e-3, epochs=2), show_progress=False)
        return handle.model.classifier.weight.detach().clone()

    assert torch.equal(run_once(), run_once())


def test_gradient_accumulation_equals_bigger_batch():
    """Two micro-batches of 8 accumulated == one batch of 16 (mean losses, equal sizes)."""
    batches = _task()
    merged = [{k: torch.cat([batches[0][k], batches[1][k]]) for k in batches[0]}]
    a, b = _handle(), _handle()
    config = dict(learning_rate=1e-3, max_steps=1, grad_clip=None)
    train(a, lambda e: batches[:2], 2, _objective, TrainConfig(gradient_accumulation=2, **config),
          show_progress=False)
    train(b, lambda e: merged, 1, _objective, TrainConfig(**config), show_progress=False)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-6, rtol=1e-4, msg=name)


def test_nan_loss_is_a_clear_error():
    def broken(model, batch):
        out = _objective(model, batch)
        return _Output(out.loss * float("nan"), out.label_tokens, out.input_tokens)

    batches = _task()
    with pytest.raises(TrainingError, match="lower the learning rate"):
        train(_handle(), lambda e: batches, 4, broken, TrainConfig(), show_progress=False)


def test_early_stopping_restores_best_state():
    batches = _task()
    handle = _handle()
    scores = iter([0.9, 0.5, 0.4, 0.3])
    snapshots = []

    def evaluate():
        snapshots.append(handle.model.classifier.weight.detach().clone())
        return {"accuracy": next(scores)}

    result = train(handle, lambda e: batches, 4, _objective,
                   TrainConfig(learning_rate=1e-2, epochs=10, eval_every=2,
                               early_stopping_patience=2, metric_for_best="accuracy"),
                   evaluate=evaluate, show_progress=False)
    assert result.stopped_early and result.steps == 6
    assert result.best_metrics == {"accuracy": 0.9}
    assert torch.equal(handle.model.classifier.weight, snapshots[0])


def test_warmup_then_linear_and_cosine_decay():
    assert lr_multiplier(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(70, 100, 0, "constant") == 1.0
