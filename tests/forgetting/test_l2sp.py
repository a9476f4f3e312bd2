"""L2-SP: 0 where training starts; for LoRA the effective-weight distance ||ΔW||²_F (the Gram
form equals ||delta_weight()||² with the scaling, for Linear, Conv2d and Embedding), with the
gradient of the naive formula; parameter distance for weights trained in place and for delta
modules without a weight delta; the new head left out; clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.errors import AdapterStateError, ConfigError
from deltatune.forgetting.l2sp import L2SPPenalty, WeightDelta
from deltatune.methods import apply
from deltatune.methods.full import FullFinetuneConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.lora import LoraConfig
from deltatune.train.objectives import CausalLMObjective
from tests.conftest import random_batch, tiny_bert, tiny_llama


def _perturb(parameters, scale: float = 0.1, seed: int = 0) -> None:
    with torch.no_grad():
        for index, parameter in enumerate(parameters):
            generator = torch.Generator().manual_seed(seed + index)
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def _lora_llama(**options):
    model = tiny_llama()
    return apply(model, LoraConfig(r=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"],
                                   **options))


def _naive_lora_penalty(handle) -> torch.Tensor:
    """The definition: ||delta_weight()||² per layer, ΔW formed explicitly."""
    return sum(layer.delta_weight().float().pow(2).sum() for layer in handle.delta_modules())


def test_zero_at_construction_with_grad():
    handle = _lora_llama()
    value = L2SPPenalty(handle, weight=0.1)(handle.model, {}, None)
    assert value.item() == 0.0
    assert value.dtype == torch.float32 and value.dim() == 0 and value.requires_grad


def test_lora_penalty_is_the_effective_weight_distance_with_scaling():
    handle = _lora_llama()
    penalty = L2SPPenalty(handle, weight=1.0)
    _perturb(handle.trainable_parameters())
    expected = _naive_lora_penalty(handle)
    assert expected.item() > 0
    torch.testing.assert_close(penalty.value(), expected, rtol=1e-5, atol=0)
    # Not the adapter factors' distance from their init (A starts random and moved too).
    factor_distance = sum(p.pow(2).sum() for n, p in handle.named_trainable_parameters().items()
                          if "lora_B" in n)
    assert abs(penalty.value().item() - factor_distance.item()) > 1e-3


def test_lora_penalty_gradient_equals_the_naive_formula_gradient():
    handle = _lora_llama()
    penalty = L2SPPenalty(handle, weight=1.0)
    _perturb(handle.trainable_parameters())
    parameters = handle.trainable_parameters()
    fast = torch.autograd.grad(penalty.value(), parameters)
    naive = torch.autograd.grad(_naive_lora_penalty(handle), parameters)
    for ours, reference in zip(fast, naive):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in fast)


class _ConvAndEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(3, 5, kernel_size=3)
        self.proj = nn.Linear(6, 4)


@pytest.mark.parametrize("target", ["embed", "conv", "proj"])
def test_gram_form_equals_delta_weight_norm_for_every_layer_kind(target):
    handle = apply(_ConvAndEmbedding(), LoraConfig(r=3, alpha=7, targets=[target]))
    layer = handle.delta_modules()[0]
    delta = WeightDelta(target, layer)
    assert delta.factors_only  # a fresh adapter: no ΔW is formed
    _perturb([p for p in layer.parameters() if p.requires_grad], scale=0.5)
    expected = layer.delta_weight().pow(2).sum()
    assert layer.scaling != 1.0 and expected.item() > 0
    torch.testing.assert_close(delta.squared_norm(), expected, rtol=1e-5, atol=0)


def test_dora_uses_the_rescaled_effective_weight():
    handle = _lora_llama(use_dora=True)
    penalty = L2SPPenalty(handle, weight=1.0)
    assert penalty.value().item() == 0.0
    _perturb(handle.trainable_parameters())
    expected = sum((layer.merged_weight().float() - layer.base_layer.weight.float())
                   .pow(2).sum() for layer in handle.delta_modules())
    torch.testing.assert_close(penalty.value(), expected, rtol=1e-4, atol=1e-6)


def test_an_adapter_with_a_delta_already_is_measured_from_where_it_starts():
    handle = _lora_llama()
    _perturb(handle.trainable_parameters(), seed=10)
    starts = [layer.delta_weight().detach().clone() for layer in handle.delta_modules()]
    penalty = L2SPPenalty(handle, weight=1.0)
    assert penalty.value().item() == 0.0
    _perturb(handle.trainable_parameters(), seed=20)
    expected = sum((layer.delta_weight() - start).pow(2).sum()
                   for layer, start in zip(handle.delta_modules(), starts))
    torch.testing.assert_close(penalty.value(), expected, rtol=1e-5, atol=0)


def test_full_fine_tuning_is_parameter_distance_without_the_new_head():
    handle = apply(tiny_bert(), FullFinetuneConfig())
    penalty = L2SPPenalty(handle, weight=1.0, exclude=["classifier"])
    assert not any(name.startswith("classifier") for name in penalty.parameters)
    assert "bert.embeddings.word_embeddings.weight" in penalty.parameters
    start = {n: p.detach().clone() for n, p in handle.named_trainable_parameters().items()}
    assert penalty.value().item() == 0.0
    _perturb(handle.trainable_parameters())
    expected = sum((p - start[n]).pow(2).sum()
                   for n, p in handle.named_trainable_parameters().items()
                   if not n.startswith("classifier."))
    torch.testing.assert_close(penalty.value(), expected, rtol=1e-5, atol=0)
    # The head moved too, but is not counted.
    assert handle.model.classifier.weight.sub(start["classifier.weight"]).abs().sum() > 0


def test_lora_biases_and_saved_modules_are_in_parameter_space():
    model = tiny_bert()
    handle = apply(model, LoraConfig(r=4, alpha=8, targets=["query", "value"], bias="lora_only",
                                     modules_to_save=["classifier"]))
    penalty = L2SPPenalty(handle, weight=1.0, exclude=["classifier"])
    names = set(penalty.parameters)
    assert names and all(name.endswith("base_layer.bias") for name in names)
    assert len(penalty.deltas) == 4  # query and value in both layers
    start = {n: p.detach().clone() for n, p in penalty.parameters.items()}
    _perturb(handle.trainable_parameters())
    expected = _naive_lora_penalty(handle) + sum((penalty.parameters[n] - start[n]).pow(2).sum()
                                                 for n in names)
    torch.testing.assert_close(penalty.value(), expected, rtol=1e-5, atol=0)


def test_delta_modules_without_a_weight_delta_fall_back_to_parameter_distance():
    handle = apply(tiny_llama(), IA3Config())
    penalty = L2SPPenalty(handle, weight=1.0)
    assert not penalty.deltas and penalty.parameters
    start = {n: p.detach().clone() for n, p in handle.named_trainable_parameters().items()}
    assert penalty.value().item() == 0.0
    _perturb(handle.trainable_parameters())
    expected = sum((p - start[n]).pow(2).sum()
                   for n, p in handle.named_trainable_parameters().items())
    torch.testing.assert_close(penalty.value(), expected, rtol=1e-5, atol=0)


def test_the_objective_adds_weight_times_the_term_and_logs_it():
    handle = _lora_llama()
    penalty = L2SPPenalty(handle, weight=0.5)
    _perturb(handle.trainable_parameters())
    batch = random_batch()
    batch["labels"] = batch["input_ids"].clone()
    output = CausalLMObjective([penalty])(handle.model, batch)
    torch.testing.assert_close(output.loss, output.terms["ce"] + 0.5 * output.terms["l2sp"])
    torch.testing.assert_close(output.terms["l2sp"], _naive_lora_penalty(handle), rtol=1e-5,
                               atol=0)


def test_refusals():
    handle = _lora_llama()
    handle.merge()
    with pytest.raises(AdapterStateError, match="unmerge"):
        L2SPPenalty(handle, weight=1.0)
    head_only = apply(tiny_bert(), LoraConfig(targets=["query"], modules_to_save=["classifier"]))
    with pytest.raises(ConfigError, match="nothing to act on"):
        L2SPPenalty(head_only, weight=1.0, exclude=["classifier", "query"])
