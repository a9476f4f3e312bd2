"""EWC: the empirical Fisher is the mean squared batch gradient, leaves no trace (grads, flags,
modes), is zero for LoRA's A at init (why EWC uses the base weight's Fisher instead); the penalty
is 0 at the anchor and the hand formula after a perturbation, in parameter space for weights
trained in place and as sum F_W ⊙ ΔW² for LoRA layers; clear refusals."""
from __future__ import annotations

import pytest
import torch

from deltatune.errors import ConfigError, DataError, TrainingError
from deltatune.forgetting.ewc import EWCPenalty, estimate_fisher
from deltatune.methods import apply
from deltatune.methods.full import FullFinetuneConfig
from deltatune.methods.lora import LoraConfig
from deltatune.quant.model import quantize_model
from deltatune.train.objectives import CausalLMObjective, ClassificationObjective
from tests.conftest import random_batch, tiny_bert, tiny_llama


def _lm_batches(count: int = 3) -> list[dict]:
    batches = []
    for seed in range(count):
        batch = random_batch(batch=2, length=8, seed=seed + 1)
        batch["labels"] = batch["input_ids"].clone()
        batches.append(batch)
    return batches


def _lm_loss(model, batch):
    return CausalLMObjective()(model, batch).loss


def _classification_batches(count: int = 3) -> list[dict]:
    batches = []
    for seed in range(count):
        batch = random_batch(batch=2, length=8, seed=seed + 1)
        batch["labels"] = torch.tensor([seed % 2, 1 - seed % 2])
        batches.append(batch)
    return batches


def _classification_loss(model, batch):
    return ClassificationObjective()(model, batch).loss


def _perturb(parameters, scale: float = 0.1, seed: int = 0) -> None:
    with torch.no_grad():
        for index, parameter in enumerate(parameters):
            generator = torch.Generator().manual_seed(seed + index)
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def _lora_llama():
    return apply(tiny_llama(), LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))


def test_fisher_is_the_mean_squared_batch_gradient():
    model = tiny_llama()
    parameters = {"model.layers.0.mlp.up_proj.weight": model.model.layers[0].mlp.up_proj.weight,
                  "model.norm.weight": model.model.norm.weight}
    batches = _lm_batches(3)
    fisher = estimate_fisher(model, parameters, batches, _lm_loss, max_batches=2)
    expected = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for batch in batches[:2]:  # max_batches
        gradients = torch.autograd.grad(_lm_loss(model, batch), list(parameters.values()))
        for name, gradient in zip(parameters, gradients):
            expected[name] += gradient.pow(2) / 2
    for name in parameters:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-12)
        assert fisher[name].dtype == torch.float32 and (fisher[name] > 0).any()


def test_fisher_leaves_no_grads_and_restores_flags_and_modes():
    handle = _lora_llama()
    model = handle.model
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back as it was
    layer = handle.delta_modules()[0]
    with torch.no_grad():  # a stale gradient of the caller's must survive untouched
        layer.lora_B.weight.grad = torch.full_like(layer.lora_B.weight, 7.0)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    fisher = estimate_fisher(model, {"base": layer.base_layer.weight, "B": layer.lora_B.weight},
                             _lm_batches(2), _lm_loss, max_batches=5)
    assert (fisher["base"] > 0).any()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert layer.base_layer.weight.grad is None
    assert torch.equal(layer.lora_B.weight.grad, torch.full_like(layer.lora_B.weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != _name_of(model, layer))


def _name_of(model, layer) -> str:
    return next(n for n, p in model.named_parameters() if p is layer.lora_B.weight)


def test_adapter_fisher_of_lora_A_is_zero_at_init():
    """Why EWC does not use the adapter's own Fisher: with B = 0 no gradient reaches A."""
    handle = _lora_llama()
    layer = handle.delta_modules()[0]
    fisher = estimate_fisher(handle.model, {"A": layer.lora_A.weight, "B": layer.lora_B.weight,
                                            "W": layer.base_layer.weight},
                             _lm_batches(2), _lm_loss, max_batches=2)
    assert torch.count_nonzero(fisher["A"]) == 0
    assert (fisher["B"] > 0).any() and (fisher["W"] > 0).any()


def test_lora_penalty_is_base_weight_fisher_times_delta_squared():
    handle = _lora_llama()
    penalty = EWCPenalty.for_handle(handle, _lm_batches(3), _lm_loss, weight=2.0, max_batches=3)
    assert penalty.name == "ewc" and penalty.weight == 2.0
    assert not penalty.parameters
    assert sorted(penalty.delta_fisher) == sorted(handle.layers)
    reference = estimate_fisher(handle.model, {n: layer.base_layer.weight
                                               for n, layer in handle.layers.items()},
                                _lm_batches(3), _lm_loss, max_batches=3)
    value = penalty(handle.model, {}, None)
    assert value.item() == 0.0 and value.requires_grad and value.dtype == torch.float32
    _perturb(handle.trainable_parameters())
    expected = sum((reference[n] * layer.delta_weight().pow(2)).sum()
                   for n, layer in handle.layers.items())
    assert expected.item() > 0
    torch.testing.assert_close(penalty.value(), expected, rtol=1e-5, atol=1e-12)
    assert all(not layer.base_layer.weight.requires_grad for layer in handle.layers.values())


def test_full_fine_tuning_penalty_is_the_hand_formula_without_the_head():
    handle = apply(tiny_bert(), FullFinetuneConfig())
    penalty = EWCPenalty.for_handle(handle, _classification_batches(), _classification_loss,
                                    weight=1.0, max_batches=3, exclude=["classifier"])
    assert penalty.parameters and not any(n.startswith("classifier") for n in penalty.parameters)
    assert penalty.value().item() == 0.0
    anchors = {n: p.detach().clone() for n, p in penalty.parameters.items()}
    _perturb(handle.trainable_parameters())
    expected = sum((penalty.fisher[n] * (p - anchors[n]).pow(2)).sum()
                   for n, p in penalty.parameters.items())
    torch.testing.assert_close(penalty.value(), expected, rtol=1e-5, atol=1e-12)
    # d/dθ sum F (θ − θ*)² = 2 F (θ − θ*)
    name = "bert.encoder.layer.0.output.dense.weight"
    parameter = penalty.parameters[name]
    gradient, = torch.autograd.grad(penalty.value(), [parameter])
    torch.testing.assert_close(gradient, 2 * penalty.fisher[name] * (parameter - anchors[name]))
    assert (penalty.fisher[name] > 0).any()


def test_plain_constructor_takes_precomputed_fisher_and_anchors():
    weight = torch.nn.Parameter(torch.ones(3))
    fisher = {"w": torch.tensor([1.0, 2.0, 0.0])}
    penalty = EWCPenalty({"w": weight}, fisher, weight=1.0, anchors={"w": torch.zeros(3)})
    assert penalty.value().item() == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="shape"):
        EWCPenalty({"w": weight}, {"w": torch.ones(2)}, weight=1.0)
    with pytest.raises(ConfigError, match="missing"):
        EWCPenalty({"w": weight}, {}, weight=1.0)


def test_refusals():
    model = tiny_llama()
    quantize_model(model, "nf4")
    quantized = apply(model, LoraConfig(r=4, targets=["q_proj"]))
    with pytest.raises(ConfigError, match="quantized"):
        EWCPenalty.for_handle(quantized, _lm_batches(1), _lm_loss, weight=1.0, max_batches=1)
    handle = _lora_llama()
    with pytest.raises(DataError, match="no batches"):
        EWCPenalty.for_handle(handle, [], _lm_loss, weight=1.0, max_batches=4)
    with pytest.raises(TrainingError, match="batch 1"):
        EWCPenalty.for_handle(handle, _lm_batches(1), lambda m, b: torch.tensor(float("nan")),
                              weight=1.0, max_batches=1)
    assert all(not layer.base_layer.weight.requires_grad for layer in handle.layers.values())
