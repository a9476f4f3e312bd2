"""Switching an adapter off (`handle.disabled()`) and scaling it (`handle.scaled(alpha)`,
`set_delta_scale`) for every method: disabled equals a pristine copy of the base model bit for
bit (also in training mode, with no gradient reaching the adapter), state comes back on exit,
after an exception and when nested, merged handles refuse, alpha = 0 / 1 / 0.5 match the base,
the unscaled adapter and an explicit computation, merge folds the scale, the capability flags,
the clear errors of methods that keep no delta, and `base_weight` for quantized layers."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune.errors import AdapterStateError, ConfigError
from deltatune.methods import config_class, method_names
from deltatune.methods.base import MethodHandle, base_weight
from deltatune.methods.lora import LoraLinear
from tests.conftest import random_batch, tiny_bert, tiny_llama


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(F.relu(self.conv1(x))).mean(dim=(2, 3)))


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str = "llama"  # "llama", "bert" (classifier) or "conv"


QKV = ["q_proj", "v_proj"]
TI_OPTIONS = {"placeholder_tokens": ["<a>", "<b>"], "token_ids": [128, 129]}
DISABLE_CASES = [
    Case("lora", "lora", {"r": 4, "targets": QKV}),
    Case("lora-rslora", "lora", {"r": 4, "use_rslora": True, "targets": QKV}),
    Case("lora-dora", "lora", {"r": 4, "use_dora": True, "targets": QKV + ["down_proj"]}),
    Case("lora-embedding", "lora", {"r": 4, "targets": ["embed_tokens"]}),
    Case("lora-embedding-dora", "lora", {"r": 4, "use_dora": True, "targets": ["embed_tokens"]}),
    Case("lora-conv", "lora", {"r": 2, "targets": ["conv1", "conv2"]}, "conv"),
    Case("lora-conv-dora", "lora", {"r": 2, "use_dora": True, "targets": ["conv1", "conv2"]},
         "conv"),
    Case("lora-bert-biases-head", "lora", {"r": 4, "targets": ["query", "value"], "bias": "all",
                                           "modules_to_save": ["classifier"]}, "bert"),
    Case("ia3", "ia3"),
    Case("adapter", "adapter", {"bottleneck_size": 8}),
    Case("hyperlora", "hyperlora", {"r": 4}),
    Case("prefix", "prefix", {"num_virtual_tokens": 4}),
    Case("prompt", "prompt", {"num_virtual_tokens": 4}),
    Case("ptuning", "ptuning", {"num_virtual_tokens": 4}),
    Case("prompt-bert-head", "prompt", {"num_virtual_tokens": 4}, "bert"),
    Case("textual-inversion", "textual-inversion", TI_OPTIONS),
]
SCALE_CASES = [c for c in DISABLE_CASES if config_class(c.method).supports_scale]
MERGE_SCALE_CASES = [c for c in SCALE_CASES if c.method != "adapter"]
MERGE_CASES = [c for c in DISABLE_CASES
               if c.method in ("lora", "ia3", "hyperlora", "textual-inversion")]
# (supports_disable, supports_scale) for every registered method.
EXPECTED_FLAGS = {"lora": (True, True), "qlora": (True, True), "ia3": (True, True), "adapter": (True, True),
                  "hyperlora": (True, True), "prefix": (True, False), "prompt": (True, False),
                  "ptuning": (True, False), "textual-inversion": (True, False),
                  "full": (False, False), "freeze": (False, False), "subspace": (True, True)}


def case_ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


def make_model(kind: str) -> nn.Module:
    return {"llama": tiny_llama, "bert": tiny_bert, "conv": TinyConvNet}[kind]()


def inputs_for(kind: str) -> dict[str, torch.Tensor]:
    if kind == "conv":
        return {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    return random_batch()


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return forward(model, inputs)


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    result = model(**inputs)
    return result if isinstance(result, torch.Tensor) else result.logits


def perturb(handle: MethodHandle, seed: int = 3, scale: float = 0.3) -> None:
    """Moves every trainable tensor (LoRA's zero B, IA3's ones, heads, biases, prompts) off its
    initial value, so the adapter really changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def build(case: Case) -> tuple[nn.Module, nn.Module, MethodHandle]:
    """(pristine base copy, adapted model, handle) with a non-trivial adapter."""
    model = make_model(case.model)
    pristine = copy.deepcopy(model)
    handle = deltatune.apply(model, deltatune.make_config(case.method, dict(case.options)))
    perturb(handle)
    return pristine, model, handle


def assert_differs(tuned: torch.Tensor, base: torch.Tensor) -> None:
    assert tuned.shape != base.shape or (tuned - base).abs().max() > 1e-3


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# -- disabled() ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", DISABLE_CASES, ids=case_ids(DISABLE_CASES))
def test_disabled_equals_the_base_model_exactly_and_restores(case: Case) -> None:
    pristine, model, handle = build(case)
    inputs = inputs_for(case.model)
    base, tuned = outputs(pristine, inputs), outputs(model, inputs)
    assert_differs(tuned, base)
    with handle.disabled() as same:
        assert same is handle and handle.is_disabled
        assert torch.equal(outputs(model, inputs), base)
    assert not handle.is_disabled
    assert torch.equal(outputs(model, inputs), tuned)


@pytest.mark.parametrize("case", DISABLE_CASES, ids=case_ids(DISABLE_CASES))
def test_disabled_restores_after_an_exception_and_nests(case: Case) -> None:
    pristine, model, handle = build(case)
    inputs = inputs_for(case.model)
    base, tuned = outputs(pristine, inputs), outputs(model, inputs)
    with pytest.raises(RuntimeError, match="inside"):
        with handle.disabled():
            raise RuntimeError("inside")
    assert not handle.is_disabled and torch.equal(outputs(model, inputs), tuned)
    with handle.disabled():
        with handle.disabled():
            assert torch.equal(outputs(model, inputs), base)
        assert handle.is_disabled
        assert torch.equal(outputs(model, inputs), base)
    assert torch.equal(outputs(model, inputs), tuned)


def _embedding_input(pristine: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    embedding = pristine.get_input_embeddings()
    return embedding(inputs["input_ids"]).detach().requires_grad_(True)


def _grad_forward(model: nn.Module, kind: str, leaf: torch.Tensor,
                  inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    torch.manual_seed(0)  # BERT's dropout draws the same masks in both models
    if kind == "conv":
        return model(leaf)
    return model(inputs_embeds=leaf, attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("case", DISABLE_CASES, ids=case_ids(DISABLE_CASES))
def test_disabled_in_training_mode_sends_gradients_through_the_base_path_only(case: Case) -> None:
    pristine, model, handle = build(case)
    pristine.train(), model.train()
    inputs = inputs_for(case.model)
    adapter_parameters = handle.trainable_parameters()
    make_leaf = ((lambda: inputs["x"].clone().requires_grad_(True)) if case.model == "conv"
                 else (lambda: _embedding_input(pristine, inputs)))
    base_leaf, leaf = make_leaf(), make_leaf()
    _grad_forward(pristine, case.model, base_leaf, inputs).square().sum().backward()
    with handle.disabled():
        output = _grad_forward(model, case.model, leaf, inputs)
        output.square().sum().backward()
        plain = forward(model, inputs)
    assert torch.equal(leaf.grad, base_leaf.grad)
    assert not plain.requires_grad  # no adapter parameter is in the graph at all
    assert all(p.grad is None for p in adapter_parameters)
    forward(model, inputs).square().sum().backward()  # enabled again: the adapter trains
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters)


@pytest.mark.parametrize("case", MERGE_CASES, ids=case_ids(MERGE_CASES))
def test_a_merged_handle_refuses_to_disable_or_scale(case: Case) -> None:
    pristine, model, handle = build(case)
    inputs = inputs_for(case.model)
    handle.merge()
    with pytest.raises(AdapterStateError, match="unmerge"):
        with handle.disabled():
            pass
    if handle.supports_scale:
        with pytest.raises(AdapterStateError, match="unmerge"):
            handle.set_delta_scale(0.5)
        with pytest.raises(AdapterStateError, match="unmerge"):
            with handle.scaled(0.5):
                pass
        assert handle.delta_scale == 1.0
    assert not handle.is_disabled
    handle.unmerge()
    with handle.disabled():
        # In-place merges (plain LoRA, IA3, HyperLoRA) leave fp32 rounding in the base weights.
        assert_close(outputs(model, inputs), outputs(pristine, inputs), atol=1e-5)


@pytest.mark.parametrize("case", MERGE_CASES, ids=case_ids(MERGE_CASES))
def test_merge_inside_disabled_or_scaled_is_refused(case: Case) -> None:
    _, _, handle = build(case)
    with handle.disabled():
        with pytest.raises(AdapterStateError, match="disabled"):
            handle.merge()
    if handle.supports_scale:
        with handle.scaled(0.5):
            with pytest.raises(AdapterStateError, match="set_delta_scale"):
                handle.merge()
    assert not handle.merged


def test_adapter_weights_are_not_read_inside_disabled_and_trained_ones_come_back() -> None:
    case = next(c for c in DISABLE_CASES if c.id == "lora-bert-biases-head")
    pristine, model, handle = build(case)
    trained = {k: v.clone() for k, v in handle.state_dict().items()}
    with handle.disabled():
        assert torch.equal(model.classifier.weight, pristine.classifier.weight)
        with pytest.raises(AdapterStateError, match="after"):
            handle.state_dict()
        with pytest.raises(AdapterStateError, match="after"):
            handle.load_state_dict(trained)
    state = handle.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    assert model.classifier.weight.requires_grad


def test_the_fused_lora_path_is_skipped_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    pristine, model, handle = build(DISABLE_CASES[0])
    inputs = inputs_for("llama")
    layer = handle.layers["model.layers.0.self_attn.q_proj"]
    assert layer._fusable(torch.zeros(1, 32))

    def fail(*args: Any) -> torch.Tensor:
        raise AssertionError("fused path used while disabled")

    monkeypatch.setattr("deltatune.methods.lora.fused_lora_linear", fail)
    with handle.disabled():
        assert torch.equal(outputs(model, inputs), outputs(pristine, inputs))


VIRTUAL_TOKEN_CASES = [c for c in DISABLE_CASES if c.method in ("prefix", "prompt", "ptuning")
                       and c.model == "llama"]


@pytest.mark.parametrize("case", VIRTUAL_TOKEN_CASES, ids=case_ids(VIRTUAL_TOKEN_CASES))
def test_cached_generation_inside_disabled_is_the_base_models(case: Case) -> None:
    pristine, model, handle = build(case)
    prompt = random_batch(batch=1, length=5)["input_ids"]
    options = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 4,
               "do_sample": False, "output_logits": True, "return_dict_in_generate": True,
               "pad_token_id": 0}
    expected = pristine.generate(prompt, **options)
    with handle.disabled():
        generated = model.generate(prompt, **options)
    assert torch.equal(generated.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(generated.logits, expected.logits))
    tuned = model.generate(prompt, **options)  # the virtual tokens are back
    assert not torch.equal(tuned.logits[0], expected.logits[0])


# -- textual inversion: the base vocabulary ----------------------------------------------------

def test_textual_inversion_disabled_is_the_base_vocabulary() -> None:
    pristine, model, handle = build(DISABLE_CASES[-1])
    batch = random_batch()
    with handle.disabled():
        assert model.config.vocab_size == 128
        assert outputs(model, batch).shape[-1] == 128
        with_new = batch["input_ids"].clone()
        with_new[0, 3] = 129
        with pytest.raises(AdapterStateError, match=r"\[129\].*without the new tokens"):
            model(input_ids=with_new)
    assert model.config.vocab_size == 130
    assert outputs(model, {"input_ids": with_new}).shape[-1] == 130


def test_textual_inversion_disabled_uses_the_base_row_of_a_replaced_id() -> None:
    # An id inside the base table (a padded vocabulary's unused row) takes the new row when
    # active and the base model's own row when disabled.
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    handle = deltatune.apply(model, deltatune.make_config(
        "textual-inversion", {"placeholder_tokens": ["<a>"], "token_ids": [5]}))
    perturb(handle)
    batch = random_batch()
    batch["input_ids"][:, 2] = 5
    assert_differs(outputs(model, batch), outputs(pristine, batch))
    with handle.disabled():
        assert torch.equal(outputs(model, batch), outputs(pristine, batch))


# -- scaled() / set_delta_scale() ------------------------------------------------------------

def with_trained_base_parameters(pristine: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of the base model holding the parameters the method trained in place
    (modules_to_save, biases): those are not scaled, so this is what scale 0 computes."""
    expected = copy.deepcopy(pristine)
    own = dict(expected.named_parameters())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            key = name.replace(".base_layer", "")
            if parameter.requires_grad and key in own:
                own[key].copy_(parameter)
    return expected


@pytest.mark.parametrize("case", SCALE_CASES, ids=case_ids(SCALE_CASES))
def test_scale_zero_is_disabled_and_scale_one_is_the_adapter_bit_for_bit(case: Case) -> None:
    pristine, model, handle = build(case)
    inputs = inputs_for(case.model)
    base, tuned = outputs(pristine, inputs), outputs(model, inputs)
    zero = outputs(with_trained_base_parameters(pristine, model), inputs)
    with handle.scaled(0.0):
        assert handle.delta_scale == 0.0
        assert_close(outputs(model, inputs), zero, atol=1e-6)
        if "modules_to_save" not in case.options:
            with handle.disabled():
                assert_close(outputs(model, inputs), zero, atol=1e-6)
    with handle.scaled(1):
        assert torch.equal(outputs(model, inputs), tuned)
    with handle.scaled(0.5):
        half = outputs(model, inputs)
        with handle.disabled():  # disabled() wins over any scale
            assert torch.equal(outputs(model, inputs), base)
        assert torch.equal(outputs(model, inputs), half)
    assert_differs(half, base), assert_differs(half, tuned)
    assert handle.delta_scale == 1.0 and torch.equal(outputs(model, inputs), tuned)


@pytest.mark.parametrize("case", SCALE_CASES, ids=case_ids(SCALE_CASES))
def test_set_delta_scale_persists_and_scaled_restores_the_previous_value(case: Case) -> None:
    _, model, handle = build(case)
    inputs = inputs_for(case.model)
    tuned = outputs(model, inputs)
    handle.set_delta_scale(0.5)
    assert handle.delta_scale == 0.5
    half = outputs(model, inputs)
    assert torch.equal(outputs(model, inputs), half)
    with handle.scaled(2.0):
        with handle.scaled(-1.0):
            assert handle.delta_scale == -1.0
        assert handle.delta_scale == 2.0
        assert_differs(outputs(model, inputs), half)
    assert handle.delta_scale == 0.5 and torch.equal(outputs(model, inputs), half)
    with pytest.raises(RuntimeError):
        with handle.scaled(3.0):
            raise RuntimeError
    assert handle.delta_scale == 0.5 and torch.equal(outputs(model, inputs), half)
    handle.set_delta_scale(1.0)
    assert torch.equal(outputs(model, inputs), tuned)


@pytest.mark.parametrize("case", MERGE_SCALE_CASES, ids=case_ids(MERGE_SCALE_CASES))
def test_merge_folds_the_current_scale(case: Case) -> None:
    _, model, handle = build(case)
    inputs = inputs_for(case.model)
    tuned = outputs(model, inputs)
    handle.set_delta_scale(0.5)
    half = outputs(model, inputs)
    handle.merge()
    assert_close(outputs(model, inputs), half, atol=1e-5)
    handle.unmerge()
    assert handle.delta_scale == 0.5
    assert_close(outputs(model, inputs), half, atol=1e-5)
    handle.set_delta_scale(1.0)
    assert_close(outputs(model, inputs), tuned, atol=1e-5)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, True, "0.5", None])
def test_a_scale_must_be_a_finite_number(alpha: Any) -> None:
    _, _, handle = build(DISABLE_CASES[0])
    with pytest.raises(ConfigError, match="finite number"):
        handle.set_delta_scale(alpha)
    with pytest.raises(ConfigError, match="finite number"):
        with handle.scaled(alpha):
            pass
    assert handle.delta_scale == 1.0


# -- scaled(0.5) against explicit maths, layer by layer ----------------------------------------

HALF = 0.5


def _lora_handle(options: dict[str, Any], kind: str = "llama") -> tuple[nn.Module, MethodHandle]:
    case = Case("explicit", "lora", {"r": 4, **options}, kind)
    _, model, handle = build(case)
    return model, handle


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_half_scale_is_base_plus_half_the_delta(use_rslora: bool) -> None:
    _, handle = _lora_handle({"targets": QKV, "use_rslora": use_rslora})
    layer = handle.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = layer.base_layer(x) + HALF * layer.scaling * (x @ A.T @ B.T)
    with torch.no_grad(), handle.scaled(HALF):
        assert_close(layer(x), expected, atol=1e-6)  # the fused path
        layer._fusable = lambda _: False
        assert_close(layer(x), expected, atol=1e-6)  # the modular path


def _dora_linear_weight(layer: LoraLinear) -> torch.Tensor:
    combined = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    norm = torch.linalg.norm(combined, dim=1, keepdim=True)
    return layer.lora_magnitude_vector.view(-1, 1) / norm * combined


def test_dora_linear_half_scale_interpolates_the_rescaled_weight() -> None:
    _, handle = _lora_handle({"targets": QKV, "use_dora": True})
    layer = handle.layers["model.layers.0.self_attn.v_proj"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    weight = layer.base_layer.weight
    expected_weight = weight + HALF * (_dora_linear_weight(layer) - weight)
    with torch.no_grad(), handle.scaled(HALF):
        assert_close(layer(x), F.linear(x, expected_weight), atol=1e-5)
        assert_close(layer.merged_weight(), expected_weight, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_embedding_half_scale_is_explicit(use_dora: bool) -> None:
    _, handle = _lora_handle({"targets": ["embed_tokens"], "use_dora": use_dora})
    layer = handle.layers["model.embed_tokens"]
    token_ids = random_batch()["input_ids"]
    weight = layer.base_layer.weight
    combined = weight + layer.scaling * (layer.lora_embedding_B @ layer.lora_embedding_A).T
    if use_dora:
        combined = layer.lora_magnitude_vector.view(1, -1) \
            / torch.linalg.norm(combined, dim=0, keepdim=True) * combined
    expected_weight = weight + HALF * (combined - weight)
    with torch.no_grad(), handle.scaled(HALF):
        assert_close(layer(token_ids), F.embedding(token_ids, expected_weight), atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_conv2d_half_scale_is_explicit(use_dora: bool) -> None:
    _, handle = _lora_handle({"r": 2, "targets": ["conv1"], "use_dora": use_dora}, "conv")
    layer = handle.layers["conv1"]
    base = layer.base_layer
    x = inputs_for("conv")["x"]
    product = layer.lora_B.weight.view(-1, 2) @ layer.lora_A.weight.view(2, -1)
    combined = base.weight + layer.scaling * product.view(base.weight.shape)
    if use_dora:
        norm = torch.linalg.vector_norm(combined, dim=(1, 2, 3)).view(-1, 1, 1, 1)
        combined = layer.lora_magnitude_vector.view(-1, 1, 1, 1) / norm * combined
    expected_weight = base.weight + HALF * (combined - base.weight)
    with torch.no_grad(), handle.scaled(HALF):
        expected = F.conv2d(x, expected_weight, base.bias, base.stride, base.padding)
        assert_close(layer(x), expected, atol=1e-5)


def test_ia3_half_scale_uses_one_plus_half_of_l_minus_one() -> None:
    _, _, handle = build(Case("ia3", "ia3"))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(5))
    key = handle.layers["model.layers.0.self_attn.k_proj"]
    down = handle.layers["model.layers.0.mlp.down_proj"]
    with torch.no_grad(), handle.scaled(HALF):
        key_vector = 1 + HALF * (key.ia3_l.flatten() - 1)
        assert_close(key(x), key.base_layer(x) * key_vector, atol=1e-6)
        down_vector = 1 + HALF * (down.ia3_l.flatten() - 1)
        assert_close(down(hidden), down.base_layer(hidden * down_vector), atol=1e-6)


def test_bottleneck_half_scale_halves_the_residual_branch() -> None:
    _, _, handle = build(Case("adapter", "adapter", {"bottleneck_size": 8}))
    adapter = handle.adapters["model.layers.0.mlp.down_proj"]
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), handle.scaled(HALF):
        y = adapter.base_layer(hidden)
        branch = adapter.adapter_up(adapter.nonlinearity(adapter.adapter_down(y)))
        assert_close(adapter(hidden), y + HALF * branch, atol=1e-6)


def test_hyperlora_half_scale_halves_the_generated_delta() -> None:
    _, _, handle = build(Case("hyperlora", "hyperlora", {"r": 4}))
    layer = handle.layers["model.layers.1.self_attn.q_proj"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), handle.scaled(HALF):
        A, B = handle.generator.generate(layer.slot)
        expected = layer.base_layer(x) + HALF * layer.scaling * (x @ A.T @ B.T)
        assert_close(layer(x), expected, atol=1e-6)


# -- capability flags and clear errors ---------------------------------------------------------

def test_every_method_declares_its_capabilities() -> None:
    assert set(method_names()) == set(EXPECTED_FLAGS)
    for name in method_names():
        config = config_class(name)
        assert (config.supports_disable, config.supports_scale) == EXPECTED_FLAGS[name], name


@pytest.mark.parametrize("method,options", [("full", {}), ("freeze", {"mode": "probe"})])
def test_methods_that_keep_no_delta_refuse_with_the_alternative(method: str,
                                                                options: dict) -> None:
    handle = deltatune.apply(tiny_llama(), deltatune.make_config(method, options))
    assert not handle.supports_disable and not handle.supports_scale
    with pytest.raises(AdapterStateError, match=rf"{method}: disabled\(\).*frozen copy"):
        with handle.disabled():
            pass
    with pytest.raises(AdapterStateError, match="frozen copy of the original model"):
        with handle.scaled(0.5):
            pass
    with pytest.raises(AdapterStateError, match="no delta"):
        handle.set_delta_scale(0.5)
    assert not handle.is_disabled and handle.delta_scale == 1.0


NO_SCALE_CASES = [c for c in DISABLE_CASES if c not in SCALE_CASES]


@pytest.mark.parametrize("case", NO_SCALE_CASES, ids=case_ids(NO_SCALE_CASES))
def test_methods_without_a_weight_delta_refuse_to_scale(case: Case) -> None:
    _, _, handle = build(case)
    assert handle.supports_disable and not handle.supports_scale
    with pytest.raises(AdapterStateError, match="not defined"):
        handle.set_delta_scale(0.5)
    with pytest.raises(AdapterStateError, match="disabled"):
        with handle.scaled(0.0):
            pass
    assert handle.delta_scale == 1.0


# -- base_weight -----------------------------------------------------------------------------

class QuantizedLinearStub(nn.Linear):
    """A linear layer whose effective weight is a rounded (4-bit-like) copy of `weight`, exposed
    through `dequantized_weight()` as a quantized layer would."""

    def dequantized_weight(self) -> torch.Tensor:
        return torch.round(self.weight * 8) / 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


def test_base_weight_reads_plain_wrapped_and_quantized_layers() -> None:
    linear = nn.Linear(4, 3)
    assert base_weight(linear) is linear.weight
    assert base_weight(LoraLinear(linear, r=2, scaling=1.0)) is linear.weight
    torch.manual_seed(0)
    stub = QuantizedLinearStub(16, 8)
    assert torch.equal(base_weight(stub), stub.dequantized_weight())
    assert torch.equal(base_weight(LoraLinear(stub, r=2, scaling=1.0)), stub.dequantized_weight())
    with pytest.raises(TypeError, match="no dense weight"):
        base_weight(nn.ReLU())


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_merge_and_dora_norms_read_the_dequantized_weight(use_dora: bool) -> None:
    torch.manual_seed(0)
    stub = QuantizedLinearStub(16, 8)
    layer = LoraLinear(stub, r=2, scaling=2.0, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.3)
    x = torch.randn(3, 16)
    with torch.no_grad():
        for alpha in (1.0, HALF):
            layer.delta_scale = alpha
            assert_close(F.linear(x, layer.merged_weight(), stub.bias), layer(x), atol=1e-5)
