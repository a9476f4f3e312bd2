"""Pruning during training with the real loop on a tiny Llama: the cubic schedule's values,
gradual pruning reaching its target with exact zeros and masks that only grow, fixed masks held
while the rest keeps training (optimizer moments zeroed too), Wanda as the schedule's method,
and a resumed run that prunes exactly like an uninterrupted one."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from deltatune.compress.gradual import GradualPruning, MaskKeeper, cubic_sparsity
from deltatune.compress.unstructured import magnitude_masks, prunable_linears, sparsity_report
from deltatune.errors import ConfigError
from deltatune.train.callbacks import Checkpointing
from deltatune.train.checkpoint import Checkpoint, complete_checkpoints
from deltatune.train.config import TrainConfig
from deltatune.train.loop import Callback, train
from tests.conftest import random_batch, tiny_llama


class _Everything:
    """The loop's `Trainable` protocol without any method: the whole model trains."""

    def __init__(self, model):
        self.model = model

    def parameter_groups(self, learning_rate, weight_decay):
        return [{"params": list(self.model.parameters()), "lr": learning_rate,
                 "weight_decay": weight_decay}]

    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


@dataclass
class _Output:
    loss: torch.Tensor
    label_tokens: int
    input_tokens: int
    terms: dict


def _next_token_objective(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["input_ids"][:, 1:].reshape(-1))
    return _Output(loss, batch["input_ids"][:, 1:].numel(), batch["input_ids"].numel(),
                   {"ce": loss})


BATCHES = [random_batch(batch=4, length=12, seed=seed) for seed in range(3)]


class _MaskSnapshots(Callback):
    """Records every step's keep-masks (from the weights' zeros) after the pruning callback."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_step_end(self, state):
        self.steps.append({name: module.weight.detach() != 0
                           for name, module in prunable_linears(self.model)})


def _train(model, callbacks, steps, learning_rate=1e-2, resume=None):
    config = TrainConfig(learning_rate=learning_rate, max_steps=steps, schedule="constant")
    return train(_Everything(model), lambda epoch: BATCHES, _next_token_objective, config,
                 callbacks, resume=resume)


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 0.0, 0.8, 10, 50) == 0.0
    assert cubic_sparsity(10, 0.1, 0.8, 10, 50) == 0.1
    assert cubic_sparsity(30, 0.0, 0.8, 10, 50) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert cubic_sparsity(50, 0.0, 0.8, 10, 50) == 0.8
    assert cubic_sparsity(99, 0.0, 0.8, 10, 50) == 0.8
    values = [cubic_sparsity(t, 0.0, 0.8, 10, 50) for t in range(10, 51)]
    assert values == sorted(values)
    rises = [b - a for a, b in zip(values, values[1:])]
    assert rises[0] > rises[-1]  # fast at first, slow near the end


def test_gradual_pruning_reaches_the_target_with_exact_zeros_and_growing_masks():
    model = tiny_llama()
    pruning = GradualPruning(model, final_sparsity=0.6, start_step=2, end_step=10, every=2)
    snapshots = _MaskSnapshots(model)
    _train(model, [pruning, snapshots], steps=14)
    assert [entry["step"] for entry in pruning.history] == [2, 4, 6, 8, 10]
    targets = [entry["target_sparsity"] for entry in pruning.history]
    assert targets[0] == 0.0 and targets[-1] == 0.6 and targets == sorted(targets)
    for entry in pruning.history:
        assert entry["sparsity"] == pytest.approx(entry["target_sparsity"], abs=2e-3)
    report = sparsity_report(model)
    assert report["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert all(value == pytest.approx(0.6, abs=2e-3) for value in report["layers"].values())
    for name, mask in pruning.masks.items():
        assert torch.all(model.get_submodule(name).weight[~mask] == 0)
    for earlier, later in zip(snapshots.steps, snapshots.steps[1:]):
        for name in earlier:
            assert not torch.any(later[name] & ~earlier[name]), "a pruned weight came back"
    assert pruning.current_sparsity == 0.6


def test_mask_keeper_holds_masks_while_the_rest_trains():
    model = tiny_llama()
    masks = magnitude_masks(model, 0.5)
    keeper = MaskKeeper(model, masks)
    before = {name: model.get_submodule(name).weight.detach().clone() for name in masks}
    moments = {}

    class OptimizerProbe(Callback):
        def on_step_end(self, state):
            for name, mask in masks.items():
                slots = state.optimizer.state[model.get_submodule(name).weight]
                moments[name] = (slots["exp_avg"][~mask].abs().max(),
                                 slots["exp_avg_sq"][~mask].abs().max())

    _train(model, [keeper, OptimizerProbe()], steps=4, learning_rate=5e-2)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.all(weight[~mask] == 0), name
        assert not torch.equal(weight[mask], before[name][mask]), f"{name} did not train"
        assert moments[name] == (0.0, 0.0), name
    assert sparsity_report(model)["sparsity"] == 0.5


def test_gradual_wanda_prunes_each_row_to_the_target():
    model = tiny_llama()
    pruning = GradualPruning(model, 0.5, start_step=0, end_step=4, every=2, method="wanda",
                             batches_for_wanda=BATCHES[:2], initial_sparsity=0.25)
    _train(model, [pruning], steps=6)
    assert [entry["step"] for entry in pruning.history] == [0, 2, 4]
    assert pruning.history[0]["target_sparsity"] == 0.25
    for name, module in prunable_linears(model):
        zeros_per_row = (module.weight == 0).sum(1)
        assert torch.all(zeros_per_row == module.in_features // 2), name


def _resumable(path, crash_after=None, resume=None):
    model = tiny_llama()
    pruning = GradualPruning(model, 0.7, start_step=1, end_step=7, every=2)

    class Crash(Callback):
        def on_step_end(self, state):
            if state.step == crash_after:
                raise RuntimeError("simulated crash")

    callbacks = [pruning, Checkpointing(path, 2), Crash()]
    try:
        _train(model, callbacks, steps=9, resume=resume)
    except RuntimeError:
        return None, pruning
    return model, pruning


def test_resumed_gradual_pruning_equals_an_uninterrupted_run(tmp_path):
    full, full_pruning = _resumable(tmp_path / "a")
    assert _resumable(tmp_path / "b", crash_after=5)[0] is None
    checkpoint = Checkpoint(complete_checkpoints(tmp_path / "b")[-1])
    assert checkpoint.step == 4
    resumed, resumed_pruning = _resumable(tmp_path / "b", resume=checkpoint)
    assert resumed_pruning.history == full_pruning.history
    for key, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[key]), key
    assert sparsity_report(resumed)["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_schedule_mistakes_are_config_errors():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="only 3 steps"):
        _train(model, [GradualPruning(model, 0.5, 0, 10, 2)], steps=3)
    with pytest.raises(ConfigError, match="batches_for_wanda"):
        GradualPruning(model, 0.5, 0, 10, 2, method="wanda")
    with pytest.raises(ConfigError, match="initial_sparsity <= final_sparsity"):
        GradualPruning(model, 0.5, 0, 10, 2, initial_sparsity=0.7)
    with pytest.raises(ConfigError, match="unknown pruning method"):
        GradualPruning(model, 0.5, 0, 10, 2, method="random")
