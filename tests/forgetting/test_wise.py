"""WiSE-FT weight operations (deltatune/forgetting/wise.py): the state interpolation's maths, exact
end points (α = 0 is the original bit for bit, α = 1 the fine-tuned weights), in-place writing
into a model without reallocating its parameters, restore, refusal of methods with no weight
delta, and LoRA's scaled delta equal to interpolating the merged weights."""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune
from deltatune.errors import ConfigError
from deltatune.forgetting.wise import (SCALE, WEIGHTS, DeltaInterpolation, WeightInterpolation,
                                       interpolate_state, interpolation_route, scaled_handle)
from deltatune.methods.full import FullFinetuneConfig
from deltatune.methods.lora import LoraConfig
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.ptuning import PTuningConfig
from tests.conftest import random_batch, tiny_llama
from tests.test_fuzz import one_thread  # noqa: F401 (autouse fixture: one torch thread)


def _states(seed: int = 0) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    original = {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(3, generator=generator),
                "steps": torch.tensor([3])}
    tuned = {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(3, generator=generator),
             "steps": torch.tensor([7])}
    return original, tuned


def _clone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_interpolate_state_maths_and_exact_end_points():
    original, tuned = _states()
    half = interpolate_state(original, tuned, 0.3)
    assert torch.allclose(half["w"], 0.7 * original["w"] + 0.3 * tuned["w"], atol=1e-6)
    assert torch.allclose(half["b"], original["b"] + 0.3 * (tuned["b"] - original["b"]), atol=1e-6)
    assert half["steps"].item() == 7  # integer buffers come from the fine-tuned state
    for key in ("w", "b"):
        assert torch.equal(interpolate_state(original, tuned, 0.0)[key], original[key])
        assert torch.equal(interpolate_state(original, tuned, 1)[key], tuned[key])
    beyond = interpolate_state(original, tuned, 1.5)["w"]
    assert torch.allclose(beyond, tuned["w"] + 0.5 * (tuned["w"] - original["w"]), atol=1e-5)
    # The original tensors are untouched and the result is new memory.
    assert half["w"].data_ptr() not in (original["w"].data_ptr(), tuned["w"].data_ptr())


def test_interpolate_state_computes_in_fp32_and_keeps_the_tuned_dtype():
    original, tuned = _states()
    tuned_bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                  for k, v in tuned.items()}
    result = interpolate_state(original, tuned_bf16, 0.5)
    assert result["w"].dtype == torch.bfloat16
    expected = (0.5 * original["w"] + 0.5 * tuned_bf16["w"].float()).to(torch.bfloat16)
    assert torch.equal(result["w"], expected)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("b"), "same tensors"),
    (lambda s: s.__setitem__("extra", torch.zeros(1)), "same tensors"),
    (lambda s: s.__setitem__("w", torch.zeros(5, 3)), r"shape \(5, 3\)"),
])
def test_interpolate_state_refuses_different_layouts(change, message):
    original, tuned = _states()
    change(tuned)
    with pytest.raises(ConfigError, match=message):
        interpolate_state(original, tuned, 0.5)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "0.5", True, None])
def test_alpha_must_be_a_finite_number(alpha):
    original, tuned = _states()
    with pytest.raises(ConfigError, match="finite number"):
        interpolate_state(original, tuned, alpha)


def test_weight_interpolation_writes_in_place_and_restores():
    original_model, model = tiny_llama(seed=0), tiny_llama(seed=1)
    original, tuned = _clone(original_model), _clone(model)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    batch = random_batch()
    with torch.no_grad():
        tuned_logits = model(**batch).logits
        original_logits = original_model(**batch).logits
    interpolation = WeightInterpolation(model, original, tuned)
    assert interpolation._buffer is None  # fp32 model: lerp writes straight into parameters

    interpolation.set(0.0)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, original_logits)
    interpolation.set(0.5)
    expected = interpolate_state(original, tuned, 0.5)
    assert all(torch.allclose(v, expected[k], atol=1e-6) for k, v in model.state_dict().items())
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, tuned[
        "model.layers.0.mlp.up_proj.weight"])
    # Tied head and embeddings are one tensor, written once, still tied.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    interpolation.restore()
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, tuned_logits)


def test_weight_interpolation_context_copies_the_model_and_restores_on_exit():
    original = _clone(tiny_llama(seed=0))
    model = tiny_llama(seed=1)
    tuned = _clone(model)
    with WeightInterpolation(model, original) as interpolation:  # tuned: a copy of the model
        interpolation.set(0.25)
        assert not any(torch.equal(v, tuned[k]) for k, v in model.state_dict().items()
                       if v.is_floating_point() and "norm" not in k)
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())


def test_weight_interpolation_in_half_precision_uses_one_fp32_buffer():
    original = _clone(tiny_llama(seed=0))
    model = tiny_llama(seed=1)
    tuned = _clone(model)
    model.to(torch.bfloat16)
    interpolation = WeightInterpolation(model, original, tuned)
    largest = max(p.numel() for p in model.parameters())
    assert interpolation._buffer.dtype == torch.float32 and interpolation._buffer.numel() == largest
    interpolation.set(0.5)
    expected = interpolate_state(original, tuned, 0.5)
    weight = model.model.layers[1].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, expected["model.layers.1.self_attn.q_proj.weight"].to(torch.bfloat16))


def test_weight_interpolation_refuses_end_points_sharing_the_models_memory():
    model = tiny_llama(seed=1)
    with pytest.raises(ConfigError, match="share memory"):
        WeightInterpolation(model, _clone(tiny_llama(seed=0)), model.state_dict())
    with pytest.raises(ConfigError, match="same tensors"):
        WeightInterpolation(model, {"w": torch.zeros(1)})


@pytest.mark.parametrize("config", [PrefixTuningConfig(num_virtual_tokens=2),
                                    PromptTuningConfig(num_virtual_tokens=2),
                                    PTuningConfig(num_virtual_tokens=2)])
def test_methods_without_a_weight_delta_are_refused_with_the_methods_that_work(config):
    handle = deltatune.apply(tiny_llama(), config)
    assert not handle.supports_scale and not handle.can_merge
    for attempt in (lambda: interpolation_route(handle), lambda: DeltaInterpolation(handle),
                    lambda: scaled_handle(handle, 0.5).__enter__()):
        with pytest.raises(ConfigError) as error:
            attempt()
        message = str(error.value)
        assert f"'{config.method_name}'" in message and "no weight delta" in message
        assert "lora" in message and "ia3" in message and "full" in message


def test_full_fine_tuning_interpolates_weights_not_a_delta():
    handle = deltatune.apply(tiny_llama(), FullFinetuneConfig())
    assert interpolation_route(handle) == WEIGHTS
    with pytest.raises(ConfigError, match="WeightInterpolation"):
        with scaled_handle(handle, 0.5):
            pass


def _lora_model(seed: int = 3):
    model = tiny_llama(seed=0)
    handle = deltatune.apply(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in handle.named_trainable_parameters().items():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval(), handle


def test_lora_scaled_delta_equals_interpolating_the_merged_weights():
    from deltatune.jobs.export import unwrap_merged
    original = _clone(tiny_llama(seed=0))
    model, handle = _lora_model()
    assert interpolation_route(handle) == SCALE
    batch = random_batch()
    with torch.no_grad():
        tuned_logits = model(**batch).logits
        with scaled_handle(handle, 0.5):
            scaled_logits = model(**batch).logits
        with scaled_handle(handle, 0.0):
            base_logits = model(**batch).logits
        assert torch.equal(model(**batch).logits, tuned_logits)  # the scale came back
    # One deepcopy of both: the copied handle's delta modules are the copied model's.
    merged_model, merged_handle = copy.deepcopy((model, handle))
    merged_handle.merge()
    unwrap_merged(merged_model, merged_handle)
    tuned = _clone(merged_model)
    plain = tiny_llama(seed=0)
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, base_logits)  # scale 0: the base exactly
        with WeightInterpolation(plain, original, tuned) as interpolation:
            interpolation.set(0.5)
            interpolated_logits = plain(**batch).logits
            interpolation.set(1.0)
            merged_logits = plain(**batch).logits
    assert (tuned_logits - base_logits).abs().max() > 0.05  # the delta matters
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-5)
    assert torch.allclose(interpolated_logits, scaled_logits, atol=1e-5)


def test_delta_interpolation_sets_and_restores_the_scale():
    model, handle = _lora_model()
    batch = random_batch()
    with torch.no_grad():
        tuned_logits = model(**batch).logits
        with DeltaInterpolation(handle) as interpolation:
            interpolation.set(0.0)
            with handle.disabled():
                disabled_logits = model(**batch).logits
            assert torch.equal(model(**batch).logits, disabled_logits)
            interpolation.set(-0.5)
            assert handle.delta_scale == -0.5
        assert handle.delta_scale == 1.0
        assert torch.equal(model(**batch).logits, tuned_logits)
