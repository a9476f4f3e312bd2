"""Objectives on tiny models: the chunked causal-LM loss equals the plain full-logits loss in value
and gradients (tied, untied, LoRA-wrapped heads; padded and packed batches), never builds the full
logits, computes nothing for frozen embeddings; classification and extra loss terms."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune
from deltatune.data.packing import collate_packed, pack_examples
from deltatune.methods.lora import LoraConfig
from deltatune.train.objectives import (ClassificationObjective, CausalLMObjective,
                                        ObjectiveOutput, linear_cross_entropy_sum)
from deltatune.train.packed_attention import enable_packed_attention
from tests.conftest import tiny_bert, tiny_llama

VOCAB = 128


def _padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (3, 14), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[2, 5:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _reference_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100)


def _loss_and_grads(model, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _assert_same(a: tuple[float, dict], b: tuple[float, dict], tolerance: float) -> None:
    assert a[0] == pytest.approx(b[0], abs=tolerance)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=tolerance, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_chunked_loss_and_gradients_equal_full_logits(tie, chunk_size):
    model = tiny_llama(tie=tie)
    batch = _padded_batch()
    chunked = _loss_and_grads(model, lambda: CausalLMObjective(chunk_size)(model, batch).loss)
    reference = _loss_and_grads(model, lambda: _reference_loss(model, batch))
    _assert_same(chunked, reference, 1e-6)
    assert "lm_head.weight" in chunked[1] or tie  # the untied head is trained and checked


def test_plain_path_matches_too_and_counts_tokens():
    model = tiny_llama()
    batch = _padded_batch()
    plain = CausalLMObjective(chunked=False)(model, batch)
    chunked = CausalLMObjective()(model, batch)
    assert plain.loss.item() == pytest.approx(chunked.loss.item(), abs=1e-6)
    assert chunked.label_tokens == int((batch["labels"][:, 1:] != -100).sum()) == 16
    assert chunked.input_tokens == 14 + 9 + 5


def test_double_precision_is_exact():
    model = tiny_llama(tie=False).double()
    batch = _padded_batch()
    chunked = _loss_and_grads(model, lambda: CausalLMObjective(4)(model, batch).loss)
    reference = _loss_and_grads(model, lambda: _reference_loss(model, batch))
    _assert_same(chunked, reference, 1e-12)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


def test_full_logits_never_exist_forward_or_backward():
    model = tiny_llama(vocab_size=4096)
    batch = _padded_batch()
    rows, length = batch["input_ids"].shape
    for objective, expect_full in ((CausalLMObjective(chunk_size=8), False),
                                   (CausalLMObjective(chunked=False), True)):
        with _LargestTensor() as recorder:
            objective(model, batch).loss.backward()
        assert (recorder.largest >= rows * (length - 1) * 4096) == expect_full


def test_frozen_embeddings_and_tied_head_get_no_gradient_work():
    model = tiny_llama()
    handle = deltatune.apply(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    inputs_need_grad = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args: inputs_need_grad.append(args[0].requires_grad))
    CausalLMObjective()(model, _padded_batch()).loss.backward()
    assert inputs_need_grad == [False]
    assert model.model.embed_tokens.weight.grad is None
    assert all(p.grad is not None for p in handle.trainable_parameters())


def test_frozen_head_weight_gradient_is_not_computed():
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(6, 8, requires_grad=True)
    targets = torch.randint(0, 50, (6,))
    linear_cross_entropy_sum(hidden, head, targets, 4).backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_lora_wrapped_head_is_called_as_a_module():
    model = tiny_llama(tie=False)
    deltatune.apply(model, LoraConfig(r=4, targets=["q_proj", "lm_head"], init="gaussian"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)  # B = 0 at init would hide a wrong head path
    batch = _padded_batch()
    chunked = _loss_and_grads(model, lambda: CausalLMObjective(3)(model, batch).loss)
    reference = _loss_and_grads(model, lambda: _reference_loss(model, batch))
    _assert_same(chunked, reference, 1e-6)
    assert any("lm_head.lora_A" in name for name in chunked[1])


def test_packed_batch_loss_equals_padded_batch_loss():
    batch = _padded_batch()
    examples = []
    for row in range(3):
        keep = batch["attention_mask"][row].bool()
        examples.append({"input_ids": batch["input_ids"][row][keep].tolist(),
                         "labels": batch["labels"][row][keep].tolist()})
    packed = collate_packed(pack_examples(examples), pad_token_id=0)
    model = tiny_llama()
    padded = _loss_and_grads(model, lambda: CausalLMObjective()(model, batch).loss)
    hf_packed = _loss_and_grads(model, lambda: CausalLMObjective()(model, packed).loss)
    enable_packed_attention(model)
    own_packed = _loss_and_grads(model, lambda: CausalLMObjective()(model, packed).loss)
    _assert_same(hf_packed, padded, 1e-5)
    _assert_same(own_packed, padded, 1e-5)


def test_no_labelled_token_gives_zero_loss_that_backpropagates():
    model = tiny_llama()
    batch = _padded_batch()
    batch["labels"][:] = -100
    output = CausalLMObjective()(model, batch)
    output.loss.backward()
    assert output.loss.item() == 0.0 and output.label_tokens == 0


def test_evaluation_without_grad():
    model = tiny_llama()
    batch = _padded_batch()
    with torch.no_grad():
        loss = CausalLMObjective(chunk_size=2)(model, batch).loss
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(_reference_loss(model, batch).item(), abs=1e-6)


def test_extra_terms_are_added_and_see_the_output():
    model = tiny_llama()
    batch = _padded_batch()
    seen: list[ObjectiveOutput] = []

    def penalty(model, batch, output):
        seen.append(output)
        return sum(p.pow(2).sum() for p in model.model.norm.parameters())

    base = CausalLMObjective()(model, batch).loss.item()
    total = CausalLMObjective(extra_terms=[penalty])(model, batch)
    assert total.loss.item() == pytest.approx(base + 32.0, abs=1e-5)  # RMSNorm weights are 1
    assert seen and seen[0].label_tokens == 16


def test_classification_objective():
    model = tiny_bert(num_labels=3)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (4, 9), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": torch.tensor([0, 2, 1, 2])}
    output = ClassificationObjective(extra_terms=[lambda m, b, o: torch.tensor(1.0)])(model, batch)
    expected = F.cross_entropy(model(input_ids=input_ids).logits, batch["labels"]).item() + 1.0
    assert output.loss.item() == pytest.approx(expected, abs=1e-6)
    assert (output.label_tokens, output.input_tokens) == (4, 36)


def test_activation_checkpointing_keeps_gradients_and_frozen_inputs():
    from deltatune.train.speed import SpeedOptions, apply_speed_options
    batch = _padded_batch()
    results = []
    for checkpointing in (False, True):
        model = tiny_llama()
        deltatune.apply(model, LoraConfig(r=4, targets=["q_proj", "down_proj"], init="gaussian"))
        apply_speed_options(model, SpeedOptions(activation_checkpointing=checkpointing))
        model.train()
        inputs_need_grad = []
        model.model.layers[0].register_forward_pre_hook(
            lambda module, args: inputs_need_grad.append(args[0].requires_grad))
        results.append(_loss_and_grads(model, lambda: CausalLMObjective()(model, batch).loss))
        assert inputs_need_grad == [False]
        assert model.is_activation_checkpointing == checkpointing
    _assert_same(results[1], results[0], 1e-6)


def test_compile_marks_every_decoder_layer():
    from deltatune.train.speed import compile_decoder_layers
    model = tiny_llama()
    assert compile_decoder_layers(model) == 2
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
