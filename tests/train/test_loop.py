"""The training loop on a tiny model with a plain objective: it is method-agnostic, so these tests
use a minimal trainable target (not a method handle) that trains the whole model, an inline
objective and the built-in callbacks."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from deltatune.errors import TrainingError
from deltatune.train.callbacks import Checkpointing, MetricsLog, PeriodicEvaluation
from deltatune.train.checkpoint import Checkpoint, complete_checkpoints
from deltatune.train.config import TrainConfig
from deltatune.train.loop import Callback, train
from deltatune.train.run_dir import RunDirectory
from deltatune.train.schedule import lr_multiplier
from tests.conftest import tiny_bert


class _Everything:
    """The loop's `Trainable` protocol, satisfied without any method: the whole model trains."""

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


def _objective(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"])
    return _Output(ce, len(batch["labels"]), batch["input_ids"].numel(), {"ce": ce})


def _objective_with_penalty(model, batch):
    output = _objective(model, batch)
    penalty = model.classifier.weight.pow(2).mean()
    output.terms["l2"] = penalty
    output.loss = output.loss + 0.1 * penalty
    return output


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
    return _Everything(model)


def test_loss_decreases_and_run_directory_is_written(tmp_path):
    batches = _task()
    handle = _handle()
    run = RunDirectory(tmp_path / "run")
    before = sum(_objective(handle.model, b).loss.item() for b in batches)
    result = train(handle, lambda epoch: batches, _objective,
                   TrainConfig(learning_rate=3e-3, epochs=8, log_every=2, grad_clip=1.0),
                   [MetricsLog(run.log, 2)])
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
        train(handle, lambda epoch: batches, _objective, TrainConfig(learning_rate=1e-3, epochs=2))
        return handle.model.classifier.weight.detach().clone()

    assert torch.equal(run_once(), run_once())


def test_gradient_accumulation_equals_bigger_batch():
    """Two micro-batches of 8 accumulated == one batch of 16 (mean losses, equal sizes)."""
    batches = _task()
    merged = [{k: torch.cat([batches[0][k], batches[1][k]]) for k in batches[0]}]
    a, b = _handle(), _handle()
    config = dict(learning_rate=1e-3, max_steps=1, grad_clip=None)
    train(a, lambda e: batches[:2], _objective, TrainConfig(gradient_accumulation=2, **config))
    train(b, lambda e: merged, _objective, TrainConfig(**config))
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-6, rtol=1e-4, msg=name)


def test_nan_loss_is_a_clear_error():
    def broken(model, batch):
        out = _objective(model, batch)
        return _Output(out.loss * float("nan"), out.label_tokens, out.input_tokens, {})

    batches = _task()
    with pytest.raises(TrainingError, match="lower the learning rate"):
        train(_handle(), lambda e: batches, broken, TrainConfig())


def test_early_stopping_restores_best_state():
    batches = _task()
    handle = _handle()
    scores = iter([0.9, 0.5, 0.4, 0.3])
    snapshots = []

    def evaluate():
        snapshots.append(handle.model.classifier.weight.detach().clone())
        return {"accuracy": next(scores)}

    config = TrainConfig(learning_rate=1e-2, epochs=10, eval_every=2, early_stopping_patience=2,
                         metric_for_best="accuracy")
    evaluation = PeriodicEvaluation(evaluate, 2, metric="accuracy", patience=2)
    result = train(handle, lambda e: batches, _objective, config, [evaluation])
    assert result.stopped_early and result.steps == 6
    assert evaluation.best_metrics == {"accuracy": 0.9}
    assert torch.equal(handle.model.classifier.weight, snapshots[0])


def test_warmup_then_linear_and_cosine_decay():
    assert lr_multiplier(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(70, 100, 0, "constant") == 1.0


def test_short_last_accumulation_window_is_averaged_over_what_it_has():
    """5 micro-batches with gradient_accumulation=2: the last step has one micro-batch, whose
    loss must count fully (weight 1), not as half of a window of two."""
    batches = _task() + _task(seed=1)[:1]
    weights, losses = [], []

    def observed(model, batch):
        output = _objective(model, batch)
        losses.append(output.loss.item())
        output.loss.register_hook(lambda gradient: weights.append(gradient.item()))
        return output

    reported = []

    class Recorder(Callback):
        def on_step_end(self, state):
            reported.append(state.loss)

    result = train(_handle(), lambda e: batches, observed,
                   TrainConfig(learning_rate=1e-3, gradient_accumulation=2), [Recorder()])
    assert (result.steps, result.micro_batches) == (3, 5)
    assert weights == [0.5, 0.5, 0.5, 0.5, 1.0]
    assert reported[-1] == pytest.approx(losses[-1])
    assert reported[0] == pytest.approx((losses[0] + losses[1]) / 2)


def test_named_terms_are_logged_per_step(tmp_path):
    batches = _task()
    run = RunDirectory(tmp_path / "run")
    result = train(_handle(), lambda e: batches, _objective_with_penalty,
                   TrainConfig(learning_rate=1e-3, epochs=1, log_every=2), [MetricsLog(run.log, 2)])
    lines = run.logged()
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        assert line["loss"] == pytest.approx(line["loss_ce"] + 0.1 * line["loss_l2"], abs=1e-5)
    assert set(result.final_terms) == {"ce", "l2"}


def _resumable_run(path, steps_before_stop=None, resume=None, save_every=2, seed=0):
    """Trains with dropout on (so the random state matters) and a checkpoint every 2 steps;
    stops by an exception after `steps_before_stop` steps, as a crash would."""
    batches = _task()
    model = tiny_bert(seed=seed)
    model.train()
    handle = _Everything(model)
    run = RunDirectory(path)

    class Crash(Callback):
        def on_step_end(self, state):
            if steps_before_stop is not None and state.step == steps_before_stop:
                raise RuntimeError("simulated crash")

    callbacks = [MetricsLog(run.log, 1), Checkpointing(path, save_every,
                                                       metrics_path=run.metrics_path), Crash()]
    config = TrainConfig(learning_rate=1e-3, epochs=3, gradient_accumulation=1)
    try:
        train(handle, lambda e: batches, _objective, config, callbacks, resume=resume)
    except RuntimeError:
        return None, run
    return handle.state_dict(), run


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    uninterrupted, full_run = _resumable_run(tmp_path / "a")
    assert _resumable_run(tmp_path / "b", steps_before_stop=7)[0] is None
    checkpoint = Checkpoint(complete_checkpoints(tmp_path / "b")[-1])
    assert checkpoint.step == 6
    resumed, resumed_run = _resumable_run(tmp_path / "b", resume=checkpoint)
    for key, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[key]), key
    strip = lambda lines: [{k: v for k, v in l.items() if "time" not in k and "second" not in k}
                           for l in lines]
    assert strip(resumed_run.logged()) == strip(full_run.logged())
