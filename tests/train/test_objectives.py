"""Objectives on tiny models: the fused (chunked) head + causal-LM loss, installed as a model change,
equals the plain full-logits loss in value and gradients (tied, untied, LoRA-wrapped heads; padded
and packed batches), goes through the model's forward, never builds the full logits, computes
nothing for frozen embeddings, and is refused for heads it cannot fuse exactly; classification and
named loss terms."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune
from deltatune.data.packing import collate_packed, pack_examples
from deltatune.methods.lora import LoraConfig
from deltatune.errors import ConfigError
from deltatune.models.fused_loss import (fused_loss_installed, install_fused_loss,
                                         linear_cross_entropy_sum, remove_fused_loss)
from deltatune.train.objectives import (ClassificationObjective, CausalLMObjective, FunctionTerm,
                                        ObjectiveOutput)
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


def _fused_loss(model, batch, chunk_size: int = 256) -> torch.Tensor:
    with fused_loss_installed(model, chunk_size) as installed:
        assert installed
        return CausalLMObjective()(model, batch).loss


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
    chunked = _loss_and_grads(model, lambda: _fused_loss(model, batch, chunk_size))
    reference = _loss_and_grads(model, lambda: _reference_loss(model, batch))
    _assert_same(chunked, reference, 1e-6)
    assert "lm_head.weight" in chunked[1] or tie  # the untied head is trained and checked


def test_plain_path_matches_too_and_counts_tokens():
    model = tiny_llama()
    batch = _padded_batch()
    plain = CausalLMObjective()(model, batch)
    with fused_loss_installed(model):
        chunked = CausalLMObjective()(model, batch)
    assert plain.loss.item() == pytest.approx(chunked.loss.item(), abs=1e-6)
    assert chunked.label_tokens == int((batch["labels"][:, 1:] != -100).sum()) == 16
    assert chunked.input_tokens == 14 + 9 + 5


def test_double_precision_is_exact():
    model = tiny_llama(tie=False).double()
    batch = _padded_batch()
    chunked = _loss_and_grads(model, lambda: _fused_loss(model, batch, 4))
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
    for fused in (True, False):
        if fused:
            install_fused_loss(model, chunk_size=8)
        with _LargestTensor() as recorder:
            CausalLMObjective()(model, batch).loss.backward()
        assert (recorder.largest >= rows * (length - 1) * 4096) == (not fused)
        remove_fused_loss(model)


def test_frozen_embeddings_and_tied_head_get_no_gradient_work():
    model = tiny_llama()
    handle = deltatune.apply(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    inputs_need_grad = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args: inputs_need_grad.append(args[0].requires_grad))
    _fused_loss(model, _padded_batch()).backward()
    assert inputs_need_grad and not any(inputs_need_grad)  # the exactness probe, the batch
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
    chunked = _loss_and_grads(model, lambda: _fused_loss(model, batch, 3))
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
    padded = _loss_and_grads(model, lambda: _fused_loss(model, batch))
    hf_packed = _loss_and_grads(model, lambda: _fused_loss(model, packed))
    enable_packed_attention(model)
    own_packed = _loss_and_grads(model, lambda: _fused_loss(model, packed))
    _assert_same(hf_packed, padded, 1e-5)
    _assert_same(own_packed, padded, 1e-5)


def test_no_labelled_token_gives_zero_loss_that_backpropagates():
    model = tiny_llama()
    batch = _padded_batch()
    batch["labels"][:] = -100
    with fused_loss_installed(model):
        output = CausalLMObjective()(model, batch)
    output.loss.backward()
    assert output.loss.item() == 0.0 and output.label_tokens == 0


def test_evaluation_without_grad():
    model = tiny_llama()
    batch = _padded_batch()
    with torch.no_grad():
        loss = _fused_loss(model, batch, 2)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(_reference_loss(model, batch).item(), abs=1e-6)


def test_named_terms_are_weighted_reported_and_see_the_output():
    model = tiny_llama()
    batch = _padded_batch()
    seen: list[ObjectiveOutput] = []

    def penalty(model, batch, output):
        seen.append(output)
        return sum(p.pow(2).sum() for p in model.model.norm.parameters())

    base = CausalLMObjective()(model, batch).loss.item()
    total = CausalLMObjective([FunctionTerm("norm", penalty, weight=0.5)])(model, batch)
    assert total.loss.item() == pytest.approx(base + 0.5 * 32.0, abs=1e-5)  # RMSNorm weights: 1
    assert set(total.terms) == {"ce", "norm"}
    assert total.terms["ce"].item() == pytest.approx(base, abs=1e-6)
    assert total.terms["norm"].item() == pytest.approx(32.0)
    assert seen and seen[0].label_tokens == 16


def test_term_names_must_be_unique():
    one = FunctionTerm("kl", lambda m, b, o: torch.tensor(0.0))
    with pytest.raises(ConfigError, match=r"\['kl'\] used twice"):
        CausalLMObjective([one, FunctionTerm("kl", one.function)])
    with pytest.raises(ConfigError, match=r"\['ce'\] used twice"):
        CausalLMObjective([FunctionTerm("ce", one.function)])


class _ScaledHead(torch.nn.Module):
    """A model-level change the head alone does not show: the model's forward post-processes
    the logits (as Gemma's soft-capping does). The fused loss must refuse it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        output = self.model(*args, **kwargs)
        output.logits = 30.0 * torch.tanh(output.logits / 30.0) * 2.0
        return output

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_decoder(self):
        return self.model.get_decoder()


def test_a_head_it_cannot_fuse_takes_the_plain_path_never_a_wrong_loss():
    model = _ScaledHead(tiny_llama())
    batch = _padded_batch()
    with fused_loss_installed(model) as installed:
        loss = CausalLMObjective()(model, batch).loss
    assert not installed
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_the_loss_goes_through_the_model_forward_and_wrappers():
    """A wrapper's forward (DDP's gradient sync, FSDP's unsharding) must run: the fused loss
    is computed inside `model(...)`, so a forward hook on the model sees every loss call."""
    model = tiny_llama()
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(type(output).__name__))
    _fused_loss(model, _padded_batch())
    assert calls[-1] == "LabelLoss"


def test_classification_objective():
    model = tiny_bert(num_labels=3)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (4, 9), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": torch.tensor([0, 2, 1, 2])}
    output = ClassificationObjective([FunctionTerm("one", lambda m, b, o: torch.tensor(1.0))])(
        model, batch)
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
        assert inputs_need_grad and not any(inputs_need_grad)  # the fused loss's probe, batch
        assert model.is_activation_checkpointing == checkpointing
    _assert_same(results[1], results[0], 1e-6)


def test_compile_marks_every_decoder_layer():
    from deltatune.train.speed import compile_decoder_layers
    model = tiny_llama()
    assert compile_decoder_layers(model) == 2
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)


class _LogitsTerm:
    """A term that asks for the logits and records what it received."""
    needs_logits = True

    def __init__(self):
        self.name, self.weight, self.seen = "seen", 0.0, []

    def __call__(self, model, batch, output):
        self.seen.append(output.logits)
        return output.logits.float().pow(2).mean()


@pytest.mark.parametrize("fused", [False, True])
def test_a_term_that_needs_logits_gets_them_and_the_same_ce(fused):
    """With the fused loss installed or not, a logits-reading term makes the objective build full
    logits once; its CE equals the fused path's (what runs without such a term) and the plain
    reference, in value and gradients."""
    model = tiny_llama(tie=False)
    batch = _padded_batch()
    term = _LogitsTerm()
    with fused_loss_installed(model) as installed:
        assert installed
        fused_path = _loss_and_grads(model, lambda: CausalLMObjective()(model, batch).loss)
    reference = _loss_and_grads(model, lambda: _reference_loss(model, batch))
    with fused_loss_installed(model) if fused else contextlib.nullcontext():
        output = CausalLMObjective([term])(model, batch)
        with_logits = _loss_and_grads(model, lambda: CausalLMObjective([term])(model, batch).loss)
    _assert_same(with_logits, fused_path, 1e-6)  # the term's weight is 0: the CE alone
    _assert_same(with_logits, reference, 1e-6)
    assert output.logits is term.seen[0] and output.logits.shape == (3, 14, VOCAB)
    assert output.logits.requires_grad
    assert output.label_tokens == 16 and output.input_tokens == 28
    assert output.terms["ce"].item() == pytest.approx(fused_path[0], abs=1e-6)
    assert output.terms["seen"].item() > 0


def test_no_logits_without_a_term_that_needs_them():
    model = tiny_llama()
    batch = _padded_batch()
    plain = FunctionTerm("zero", lambda m, b, o: torch.tensor(0.0))
    assert CausalLMObjective([plain])(model, batch).logits is None
    with fused_loss_installed(model):
        assert CausalLMObjective()(model, batch).logits is None
    assert not CausalLMObjective([plain]).needs_logits and CausalLMObjective(
        [plain, _LogitsTerm()]).needs_logits


def test_logits_path_with_nothing_labelled_is_a_zero_that_backpropagates():
    model = tiny_llama()
    batch = _padded_batch()
    batch["labels"][:] = -100
    output = CausalLMObjective([_LogitsTerm()])(model, batch)
    assert output.terms["ce"].item() == 0.0 and output.label_tokens == 0
    output.loss.backward()


def test_classification_objective_hands_on_its_logits():
    model = tiny_bert(num_labels=3)
    input_ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": torch.tensor([0, 2, 1, 2])}
    output = ClassificationObjective()(model, batch)
    torch.testing.assert_close(output.logits, model(input_ids=input_ids).logits)
