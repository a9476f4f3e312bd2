"""The KL-to-original term: zero before training, the exact KL of the full logits after, the
same value and gradients on the fused (hidden states) and the plain (logits) path, with the
original taken from `handle.disabled()` or from a frozen copy, and packed rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.errors import ConfigError
from deltatune.forgetting.kl import KLToOriginal, OriginalModel, linear_kl_sum
from deltatune.methods import apply
from deltatune.methods.full import FullFinetuneConfig
from deltatune.methods.lora import LoraConfig
from deltatune.models.fused_loss import fused_loss_installed
from deltatune.train.objectives import CausalLMObjective, ClassificationObjective
from tests.conftest import tiny_bert, tiny_llama


def _batch(seed: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 128, (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = -100  # a prompt without loss
    labels[1, 10:] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": labels}


def _perturb(handle) -> None:
    with torch.no_grad():
        for index, parameter in enumerate(handle.trainable_parameters()):
            generator = torch.Generator().manual_seed(index)
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def _reference_kl(original_model, tuned_model, batch, temperature: float) -> torch.Tensor:
    """The definition, from full logits: T^2 * mean over labelled positions of KL(p || q)."""
    with torch.no_grad():
        reference = original_model(input_ids=batch["input_ids"]).logits
    tuned = tuned_model(input_ids=batch["input_ids"]).logits
    mask = batch["labels"][:, 1:] != -100
    p = F.log_softmax(reference[:, :-1][mask] / temperature, -1)
    q = F.log_softmax(tuned[:, :-1][mask] / temperature, -1)
    return (p.exp() * (p - q)).sum(-1).mean() * temperature ** 2


@pytest.mark.parametrize("fused", [True, False])
def test_kl_with_disabled_adapter_is_zero_then_exact(fused):
    model = tiny_llama()
    original_model = tiny_llama()
    handle = apply(model, LoraConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
    term = KLToOriginal(OriginalModel.for_handle(handle), weight=1.0, temperature=2.0)
    objective = CausalLMObjective([term])
    batch = _batch()
    with fused_loss_installed(model) if fused else torch.enable_grad():
        assert float(objective(model, batch).terms["kl"].detach()) == pytest.approx(0.0, abs=1e-6)
        _perturb(handle)
        output = objective(model, batch)
    expected = _reference_kl(original_model, model, batch, 2.0)
    assert float(output.terms["kl"].detach()) == pytest.approx(float(expected), rel=1e-4)
    assert (output.hidden_states is not None) == fused


def test_fused_and_plain_gradients_agree():
    gradients = []
    for fused in (True, False):
        model = tiny_llama()
        handle = apply(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
        _perturb(handle)
        objective = CausalLMObjective([KLToOriginal(OriginalModel.for_handle(handle), 1.0)])
        with fused_loss_installed(model) if fused else torch.enable_grad():
            objective(model, _batch()).terms["kl"].backward()
        gradients.append([p.grad.clone() for p in handle.trainable_parameters()])
    for fused_grad, plain_grad in zip(*gradients):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-4, atol=1e-6)


def test_full_finetuning_uses_a_frozen_copy_and_trains_the_tied_head():
    model = tiny_llama()
    handle = apply(model, FullFinetuneConfig())
    original = OriginalModel.for_handle(handle)
    assert original.is_copy and not any(p.requires_grad for p in original.model.parameters())
    _perturb(handle)
    term = KLToOriginal(original, weight=1.0)
    with fused_loss_installed(model):
        value = CausalLMObjective([term])(model, _batch()).terms["kl"]
    expected = _reference_kl(tiny_llama(), model, _batch(), 1.0)
    assert float(value) == pytest.approx(float(expected), rel=1e-4)
    value.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_linear_kl_matches_autograd_of_the_definition():
    torch.manual_seed(0)
    head, reference_head = torch.nn.Linear(8, 50), torch.nn.Linear(8, 50)
    hidden = torch.randn(13, 8, requires_grad=True)
    reference_hidden = torch.randn(13, 8)
    fused = linear_kl_sum(hidden, head, reference_hidden, reference_head, 1.5, chunk_size=4)
    fused.backward()
    fused_grads = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None
    p = F.log_softmax(reference_head(reference_hidden).detach() / 1.5, -1)
    q = F.log_softmax(head(hidden) / 1.5, -1)
    naive = (p.exp() * (p - q)).sum()
    naive.backward()
    assert float(fused) == pytest.approx(float(naive), rel=1e-5)
    for ours, theirs in zip(fused_grads, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_packed_rows_give_the_per_example_kl():
    """Two examples packed in one row (no cross-attention between them) give the same KL as
    the two examples padded."""
    from deltatune.data.packing import collate_packed, pack_examples
    from deltatune.data.collate import pad_batch
    from deltatune.train.speed import SpeedOptions, speed_options_applied
    model = tiny_llama()
    handle = apply(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    _perturb(handle)
    examples = [{"input_ids": list(range(3, 12)), "labels": [-100] * 3 + list(range(6, 12))},
                {"input_ids": list(range(20, 27)), "labels": [-100] * 2 + list(range(22, 27))}]
    objective = CausalLMObjective([KLToOriginal(OriginalModel.for_handle(handle), 1.0)])
    values = []
    for packed in (False, True):
        batch = collate_packed(pack_examples(examples), 0) if packed else pad_batch(examples, 0)
        with speed_options_applied(model, SpeedOptions(fused_loss=True, packed_attention=packed)):
            values.append(float(objective(model, batch).terms["kl"]))
    assert values[0] > 0 and values[1] == pytest.approx(values[0], rel=1e-4)


def test_classifier_is_refused_with_the_alternatives():
    model = tiny_bert()
    handle = apply(model, LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    objective = ClassificationObjective([KLToOriginal(OriginalModel.for_handle(handle), 1.0)])
    batch = {"input_ids": torch.randint(0, 128, (2, 6)), "labels": torch.tensor([0, 1])}
    with pytest.raises(ConfigError, match="replay, EWC or L2-SP"):
        objective(model, batch)
